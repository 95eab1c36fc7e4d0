//! Running commands: one process group per exec, output streamed as it comes.

use crate::server::Writer;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use smolvm_proto::{ErrorKind, ExecRequest, Reply, Shell, CHUNK};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

struct Running {
    pgid: i32,
    stdin: Option<Sender<Option<Vec<u8>>>>,
}

fn running() -> MutexGuard<'static, HashMap<u32, Running>> {
    static R: OnceLock<Mutex<HashMap<u32, Running>>> = OnceLock::new();
    R.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Root's login shell from /etc/passwd, else /bin/sh: `shell=login` means `$SHELL -lc`.
fn login_shell() -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| p.lines().find(|l| l.starts_with("root:")).and_then(|l| l.rsplit(':').next().map(str::to_string)))
        .filter(|s| !s.is_empty() && std::path::Path::new(s).exists())
        .unwrap_or_else(|| "/bin/sh".to_string())
}

pub fn start(stream: u32, req: ExecRequest, w: Writer) {
    std::thread::spawn(move || run(stream, req, w));
}

/// The command as every exec runs it: the shell, a clean environment, its own process group.
fn command(req: &ExecRequest, shell: &str) -> Command {
    let mut cmd = match req.shell {
        Shell::Login => {
            let mut c = Command::new(shell);
            c.arg("-lc").arg(&req.command);
            c
        }
        Shell::Raw => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(&req.command);
            c
        }
    };
    let home = if std::path::Path::new("/root").is_dir() { "/root" } else { "/" };
    cmd.env_clear()
        .env("PATH", BASE_PATH)
        .env("HOME", home)
        .env("USER", "root")
        .env("LOGNAME", "root")
        .env("SHELL", shell)
        .env("LANG", "C.UTF-8")
        .env("TERM", "xterm")
        .envs(&req.env)
        .current_dir(req.cwd.as_deref().unwrap_or(home))
        .stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: sigprocmask and setsid are async-signal-safe and touch no memory of the parent.
    // The agent's threads block the signals its reaper takes; a signal mask survives exec, so
    // the command gets an empty one back (else daemons such as sshd never see SIGCHLD and
    // `kill -TERM` does nothing). setsid makes it a process-group leader so that a timeout
    // can kill the whole group at once.
    unsafe {
        cmd.pre_exec(|| {
            crate::reaper::unblock_all()?;
            nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from)
        });
    }
    cmd
}

/// Spawn `cmd` and register it with the reaper, which sends its exit code on the receiver.
fn spawn(cmd: &mut Command) -> std::io::Result<(std::process::Child, mpsc::Receiver<i32>)> {
    let (exit_tx, exit_rx) = mpsc::channel();
    let mut waiters = crate::reaper::lock();
    let child = cmd.spawn()?;
    waiters.insert(child.id() as i32, exit_tx);
    Ok((child, exit_rx))
}

/// Run one login-shell `true` in the background at boot, as soon as /dev exists. Under TCG a
/// guest's first fork, exec and shell start-up cost tens of milliseconds of code translation;
/// done here, on the spare vCPU while init and the host's greeting go on, the user's first
/// command pays less of it. (The reaper, started a moment later, collects its exit.)
pub fn warm_up() {
    std::thread::spawn(|| {
        let req =
            ExecRequest { command: "true".into(), shell: Shell::Login, env: Default::default(), timeout_ms: 0, stdin: false, cwd: None };
        let mut cmd = command(&req, &login_shell());
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        if let Ok((_child, exit)) = spawn(&mut cmd) {
            let _ = exit.recv_timeout(Duration::from_secs(10));
        }
    });
}

fn run(stream: u32, req: ExecRequest, w: Writer) {
    crate::net::wait_configured();
    let shell = login_shell();
    let (mut child, exit_rx) = match spawn(&mut command(&req, &shell)) {
        Ok(v) => v,
        Err(e) => {
            let kind = if e.kind() == std::io::ErrorKind::NotFound { ErrorKind::NotFound } else { ErrorKind::Failed };
            w.send(stream, &Reply::error(kind, format!("cannot start {shell}: {e}")));
            return;
        }
    };
    let pgid = child.id() as i32;
    let stdin_tx = child.stdin.take().map(|mut pipe| {
        let (tx, rx) = mpsc::channel::<Option<Vec<u8>>>();
        std::thread::spawn(move || {
            while let Ok(Some(data)) = rx.recv() {
                if pipe.write_all(&data).is_err() {
                    break;
                }
            }
        });
        tx
    });
    running().insert(stream, Running { pgid, stdin: stdin_tx });

    let last_output = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let pumps = [
        (child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>), true),
        (child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>), false),
    ];
    for (pipe, is_stdout) in pumps {
        let Some(mut pipe) = pipe else { continue };
        let (w, done, last) = (w.clone(), done_tx.clone(), last_output.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                        let data = buf[..n].to_vec();
                        w.send(stream, &if is_stdout { Reply::Stdout(data) } else { Reply::Stderr(data) });
                    }
                }
            }
            let _ = done.send(());
        });
    }
    drop(done_tx);

    let (code, timed_out) = if req.timeout_ms > 0 {
        match exit_rx.recv_timeout(Duration::from_millis(req.timeout_ms)) {
            Ok(code) => (code, false),
            Err(RecvTimeoutError::Timeout) => {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                (exit_rx.recv().unwrap_or(128 + 9), true)
            }
            Err(RecvTimeoutError::Disconnected) => (128 + 9, false),
        }
    } else {
        (exit_rx.recv().unwrap_or(128 + 9), false)
    };
    if timed_out {
        // Members that left the group still hold the pipes; the group itself is gone.
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    drain(&done_rx, &last_output, epoch);
    running().remove(&stream);
    w.send(stream, &Reply::Exit { code, timed_out });
}

/// After the process exits, wait for its output to be read to the end, but not for background
/// processes that keep the pipes open: stop once the pipes have been quiet for a moment.
fn drain(done: &mpsc::Receiver<()>, last_output: &AtomicU64, epoch: Instant) {
    let exited = epoch.elapsed().as_millis() as u64;
    let quiet = 100;
    let mut open = 2;
    while open > 0 {
        match done.recv_timeout(Duration::from_millis(20)) {
            Ok(()) => open -= 1,
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                let now = epoch.elapsed().as_millis() as u64;
                let last = last_output.load(Ordering::Relaxed).max(exited);
                if now.saturating_sub(last) > quiet {
                    return;
                }
            }
        }
    }
}

pub fn stdin(stream: u32, data: Option<Vec<u8>>) {
    let mut running = running();
    let Some(r) = running.get_mut(&stream) else { return };
    match data {
        Some(d) => {
            if let Some(tx) = &r.stdin {
                let _ = tx.send(Some(d));
            }
        }
        // Dropping the sender ends the writer thread, which closes the pipe.
        None => r.stdin = None,
    }
}

pub fn cancel(stream: u32) {
    if let Some(r) = running().get(&stream) {
        let _ = killpg(Pid::from_raw(r.pgid), Signal::SIGKILL);
    }
}

pub fn cancel_all() {
    for r in running().values() {
        let _ = killpg(Pid::from_raw(r.pgid), Signal::SIGKILL);
    }
}
