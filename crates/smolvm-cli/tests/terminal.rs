//! Interactive terminals on real VMs: `run_interactive`, `smolvm sandbox shell` under a real
//! host terminal, and `exec -t`.

mod common;

use common::*;
use smolvm::{Error, RunOptions, Shell, Terminal, TtySize, VmConfig};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Polls `screen` until it holds `text` (20 s at most).
async fn wait_for(screen: &Mutex<String>, text: &str) {
    for _ in 0..400 {
        if screen.lock().unwrap().contains(text) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{text:?} never showed; the screen:\n{}", screen.lock().unwrap());
}

#[tokio::test]
async fn a_shell_on_a_terminal_follows_its_size_and_takes_ctrl_c() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let (mut keys, input) = tokio::io::duplex(4096);
    let (sizes, resizes) = tokio::sync::mpsc::unbounded_channel();
    let screen = Arc::new(Mutex::new(String::new()));
    let opts = RunOptions { timeout: Duration::ZERO, shell: Shell::Raw, ..Default::default() };
    let terminal = Terminal { size: TtySize { rows: 30, cols: 100 }, resizes };
    let seen = screen.clone();
    let run = sb.run_interactive("exec /bin/sh -l", &opts, Box::new(input), terminal, move |o| {
        let (smolvm::Output::Stdout(d) | smolvm::Output::Stderr(d)) = o;
        seen.lock().unwrap().push_str(&String::from_utf8_lossy(d));
    });
    let drive = async {
        keys.write_all(b"tty; stty size\n").await.unwrap();
        wait_for(&screen, "\n30 100").await;
        sizes.send(TtySize { rows: 40, cols: 120 }).unwrap();
        // The size and the keys travel separately: ask until the new size shows.
        for _ in 0..20 {
            keys.write_all(b"stty size\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            if screen.lock().unwrap().contains("\n40 120") {
                break;
            }
        }
        wait_for(&screen, "\n40 120").await;
        // Ctrl-C reaches the foreground command through the guest's terminal, not the shell.
        // (The marker's quotes keep the echo of the typed line from passing for it.)
        keys.write_all(b"echo ar''med; sleep 1000\n").await.unwrap();
        wait_for(&screen, "\narmed").await;
        // Once `sleep` runs: a ^C before it would go to the shell and tell nothing.
        let sleeping = || async { !sb.run("pgrep -x sleep || true", &RunOptions::default()).await.unwrap().stdout.is_empty() };
        assert!(eventually(Duration::from_secs(10), sleeping).await, "the command to interrupt never ran");
        keys.write_all(b"\x03").await.unwrap();
        keys.write_all(b"echo after-$((6*7)); exit 9\n").await.unwrap();
    };
    // (Bounded: a failure here must not wait for a shell that never ends.)
    let (result, ()) = tokio::time::timeout(Duration::from_secs(120), async { tokio::join!(run, drive) }).await.expect("the shell ended");
    let result = result.unwrap();
    let screen = screen.lock().unwrap().clone();
    assert_eq!(result.exit_code, 9, "{screen}");
    assert_eq!(result.stderr, "", "a terminal carries both streams");
    assert!(screen.contains("/dev/pts/") && screen.contains("after-42"), "{screen}");
    assert!(screen.contains("\r\n"), "the terminal's line endings: {screen:?}");
    let left = sb.run("ps -o args | grep -c '^sleep 1000' || true", &RunOptions::default()).await.unwrap();
    assert_eq!(left.stdout.trim(), "0", "the interrupted command is gone");

    // Bad terminals and timeouts name what is allowed.
    let bad = |size: TtySize, timeout: Duration| {
        let sb = &sb;
        async move {
            let (_, resizes) = tokio::sync::mpsc::unbounded_channel();
            let opts = RunOptions { timeout, ..Default::default() };
            sb.run_interactive("true", &opts, Box::new(tokio::io::empty()), Terminal { size, resizes }, |_| {}).await
        }
    };
    let err = bad(TtySize { rows: 0, cols: 80 }, Duration::ZERO).await.unwrap_err();
    assert_eq!(err.to_string(), "invalid rows: must be at least 1");
    let err = bad(TtySize { rows: 24, cols: 80 }, Duration::from_millis(500)).await.unwrap_err();
    assert_eq!(err.to_string(), "invalid timeout: must be at least 1 second, or 0 for none");
    // A background job that goes on writing to the terminal does not keep the command open
    // once its shell has exited (there is no timeout to end it). It ignores the hangup the
    // kernel sends as the terminal's session leader exits, as `nohup` would have it.
    let (_, resizes) = tokio::sync::mpsc::unbounded_channel();
    let opts = RunOptions { timeout: Duration::ZERO, ..Default::default() };
    let size = TtySize { rows: 24, cols: 80 };
    let chatty = sb.run_interactive(
        "trap '' HUP; (while :; do echo x; sleep 0.02; done) & sleep 0.3; exit 2",
        &opts,
        Box::new(tokio::io::empty()),
        Terminal { size, resizes },
        |_| {},
    );
    let r = tokio::time::timeout(Duration::from_secs(60), chatty).await.expect("the command ended with its shell").unwrap();
    assert_eq!(r.exit_code, 2);
    // A timeout holds on a terminal too.
    let (_, resizes) = tokio::sync::mpsc::unbounded_channel();
    let opts = RunOptions { timeout: Duration::from_secs(2), ..Default::default() };
    let size = TtySize { rows: 24, cols: 80 };
    let err = sb.run_interactive("sleep 100", &opts, Box::new(tokio::io::empty()), Terminal { size, resizes }, |_| {}).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    sb.delete().await.unwrap();
}

/// A child's output once it has exited (killed past 60 s, so a failure cannot hang the run).
fn wait_bounded(mut child: std::process::Child) -> std::process::Output {
    let pid = child.id() as i32;
    let ended = wait_until(Duration::from_secs(60), || child.try_wait().unwrap().is_some());
    if !ended {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let out = child.wait_with_output().unwrap();
    assert!(ended, "the command did not end: {:?}", String::from_utf8_lossy(&out.stdout));
    out
}

/// `cmd` started in a session of its own whose controlling terminal is its stdin (a pty), as a
/// login on that terminal would have. `cmd` goes: our copies of the pty's slave with it, so
/// that the master reads its end once the child's are closed too.
fn spawn_in_session(mut cmd: std::process::Command) -> std::process::Child {
    // SAFETY: between fork and exec only async-signal-safe calls: setsid, and the ioctl that
    // makes stdin the controlling terminal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// What the pty shows, gathered from its master on a thread until EIO (the child and we have
/// closed every slave descriptor).
fn read_screen(master: &std::os::fd::OwnedFd) -> (Arc<Mutex<String>>, std::thread::JoinHandle<()>) {
    let screen = Arc::new(Mutex::new(String::new()));
    let (shown, mut master) = (screen.clone(), std::fs::File::from(master.try_clone().unwrap()));
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = master.read(&mut buf) {
            shown.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (screen, reader)
}

fn set_size(fd: &impl AsRawFd, rows: u16, cols: u16) {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer, valid for the call.
    assert_eq!(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) }, 0);
}

#[test]
fn sandbox_shell_runs_under_a_real_terminal_and_gives_it_back_as_it_was() {
    let env = env();
    let created = env.smolvm(&["sandbox", "create", "--name", "term"]);
    assert!(created.status.success(), "{}", stderr(&created));

    let out = env.cli().args(["run", "-t", "tty; exit 3"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("/dev/pts/"), "{:?}", stdout(&out));
    // `exec -t` with no terminal of ours: the guest's terminal all the same.
    let out = env.cli().args(["sandbox", "exec", "-t", "term", "--", "tty; echo err >&2; exit 4"]).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("/dev/pts/") && stdout(&out).contains("err\r\n"), "{:?}", stdout(&out));
    // SIGTERM ends it at once, saying so (it ended without a word), with 128 + 15.
    let mut child = env
        .cli()
        .args(["sandbox", "exec", "-t", "term", "--", "echo started; sleep 60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line, "started\r\n");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait_bounded(child);
    assert_eq!((out.status.code(), stderr(&out).as_str()), (Some(143), "error: interrupted: the command was ended\n"));
    // (The supervisor ends the command once its client is gone.)
    let gone = || env.smolvm(&["sandbox", "exec", "term", "--", "pgrep sleep || echo none"]).stdout == b"none\n";
    assert!(wait_until(Duration::from_secs(10), gone), "the command runs on after its client was ended");

    // A shell fed from a pipe, as `ssh` does it: a login shell reading a script, no terminal,
    // ended by the end of its input, stderr apart.
    let mut piped = env
        .cli()
        .args(["sandbox", "shell", "term"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    piped.stdin.take().unwrap().write_all(b"echo piped-$((2+3)); tty; echo err >&2; false\n").unwrap();
    let out = wait_bounded(piped);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stdout(&out), "piped-5\nnot a tty\n");
    assert_eq!(stderr(&out), "err\n");

    let pty = nix::pty::openpty(None, None).unwrap();
    set_size(&pty.master, 30, 100);
    let before = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
    let fd = |f: &std::os::fd::OwnedFd| std::process::Stdio::from(f.try_clone().unwrap());
    let mut cmd = env.cli();
    cmd.args(["sandbox", "shell", "term"]).stdin(fd(&pty.slave)).stdout(fd(&pty.slave)).stderr(fd(&pty.slave));
    let mut child = spawn_in_session(cmd);
    let mut master = std::fs::File::from(pty.master.try_clone().unwrap());
    let (screen, reader) = read_screen(&pty.master);
    let shows = |text: &str| wait_until(Duration::from_secs(30), || screen.lock().unwrap().contains(text));
    // The login shell's prompt (the profile's PS1: host, directory).
    assert!(shows("term:~# "), "{}", screen.lock().unwrap());
    // Keys go raw: the guest's terminal echoes them and ends lines with CR LF.
    master.write_all(b"stty size\r").unwrap();
    assert!(shows("stty size\r\n30 100\r\n"), "{:?}", screen.lock().unwrap());
    set_size(&pty.master, 40, 120);
    assert!(
        wait_until(Duration::from_secs(20), || {
            let _ = master.write_all(b"stty size\r");
            std::thread::sleep(Duration::from_millis(300));
            screen.lock().unwrap().contains("\r\n40 120\r\n")
        }),
        "the new window size never reached the guest: {:?}",
        screen.lock().unwrap()
    );
    master.write_all(b"exit 5\r").unwrap();
    assert!(wait_until(Duration::from_secs(60), || child.try_wait().unwrap().is_some()), "the shell did not end");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(5), "{}", screen.lock().unwrap());
    let after = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
    assert_eq!((after.local_flags, after.input_flags, after.output_flags), (before.local_flags, before.input_flags, before.output_flags));
    drop(pty);
    let _ = reader.join();

    // A signal from `kill` while the terminal is raw (SIGINT; keys typed raw raise none): the
    // terminal is given back before smolvm goes, and the exit says which signal. (SIGINT and
    // SIGQUIT ended it at once, the terminal left raw, without echo.)
    let pty = nix::pty::openpty(None, None).unwrap();
    let before = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
    let mut cmd = env.cli();
    cmd.args(["sandbox", "exec", "-t", "term", "--", "echo started; sleep 60"])
        .stdin(fd(&pty.slave))
        .stdout(fd(&pty.slave))
        .stderr(std::process::Stdio::piped());
    let child = spawn_in_session(cmd);
    let (screen, reader) = read_screen(&pty.master);
    assert!(wait_until(Duration::from_secs(30), || screen.lock().unwrap().contains("started")), "{}", screen.lock().unwrap());
    let raw = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
    assert!(!raw.local_flags.contains(nix::sys::termios::LocalFlags::ECHO), "the terminal is raw meanwhile");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = wait_bounded(child);
    assert_eq!((out.status.code(), stderr(&out).as_str()), (Some(130), "error: interrupted: the command was ended\n"));
    let after = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
    assert_eq!((after.local_flags, after.input_flags, after.output_flags), (before.local_flags, before.input_flags, before.output_flags));
    drop(pty);
    let _ = reader.join();
    assert!(env.smolvm(&["sandbox", "delete", "--force", "term"]).status.success());
    assert!(env.qemu_processes().is_empty());
}

/// What a command wrote to its terminal before it exited all arrives, however slowly the host
/// takes it: here the host stops reading for a second at the first output, so the agent's
/// window to it (2 MiB) fills, and the command exits with its last few KB still in the guest's
/// terminal. (Where exactly the window fills depends on the terminal's chunks: a few sizes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_command_s_output_all_arrives_to_a_slow_reader() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    for n in [2_101_000, 2_105_000, 2_110_000, 2_120_000, 2_130_000] {
        let (_, resizes) = tokio::sync::mpsc::unbounded_channel();
        let opts = RunOptions { timeout: Duration::from_secs(60), shell: Shell::Raw, ..Default::default() };
        let size = TtySize { rows: 24, cols: 80 };
        let (mut got, mut paused) = (Vec::new(), false);
        let r = sb
            .run_interactive(
                &format!("head -c {n} /dev/zero | tr '\\0' a; printf END"),
                &opts,
                Box::new(tokio::io::empty()),
                Terminal { size, resizes },
                |o| {
                    let (smolvm::Output::Stdout(d) | smolvm::Output::Stderr(d)) = o;
                    got.extend_from_slice(d);
                    if !paused {
                        paused = true;
                        std::thread::sleep(Duration::from_secs(1));
                    }
                },
            )
            .await
            .unwrap();
        assert_eq!(r.exit_code, 0);
        let a = got.iter().filter(|&&b| b == b'a').count();
        assert_eq!((a, got.ends_with(b"END")), (n, true), "{n}: {} bytes arrived", got.len());
    }
    sb.delete().await.unwrap();
}
