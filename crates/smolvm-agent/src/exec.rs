//! Running commands: one process group per exec, output streamed as it comes.

use crate::flow::{Room, Window};
use crate::server::Writer;
use crate::spawn::{Pipes, Spawned};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use smolvm_proto::{ErrorKind, ExecRequest, Reply, Shell, CHUNK};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// An exec from the moment its request is read: input and a cancel that arrive before its
/// process exists (it waits for the boot's set-up, then starts) are kept, not lost.
struct Running {
    /// Which exec this is: a new host session may reuse the stream id.
    token: u64,
    /// The process group, once started.
    pgid: Option<i32>,
    /// The shell has exited (and was reaped): its pid, the group's id, may be another's now.
    exited: bool,
    /// The shell entered its cgroup, which then holds everything the command started.
    in_cgroup: bool,
    stdin: Option<Sender<Option<Vec<u8>>>>,
    cancelled: bool,
    /// The terminal's master, for `Resize` (commands run on a terminal).
    tty: Option<File>,
    /// A size that came before the terminal was there, for it to take.
    resized: Option<smolvm_proto::TtySize>,
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
    let (tx, rx) = if req.stdin {
        let (tx, rx) = mpsc::channel::<Option<Vec<u8>>>();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let token = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    running().insert(
        stream,
        Running { token, pgid: None, exited: false, in_cgroup: false, stdin: tx, cancelled: false, tty: None, resized: None },
    );
    let window = crate::flow::open(stream);
    let (w2, window2) = (w.clone(), window.clone());
    let started = crate::workers::run(Box::new(move || {
        run(stream, token, req, w, rx, &window);
        crate::flow::forget(stream, &window);
    }));
    if let Err(e) = started {
        forget(stream, token);
        crate::flow::forget(stream, &window2);
        w2.send(stream, &Reply::error(ErrorKind::Failed, format!("cannot start the command: no thread for it ({e})")));
        answered(token);
    }
}

/// This exec's entry, unless a new host session replaced it (same stream id) or it is gone.
fn forget(stream: u32, token: u64) {
    let mut running = running();
    if running.get(&stream).is_some_and(|r| r.token == token) {
        running.remove(&stream);
    }
}

/// What every exec runs: the program, its flag, the environment and the working directory.
fn invocation<'a>(req: &'a ExecRequest, shell: &'a str) -> (&'a str, &'static str, Vec<String>, &'a str) {
    let (program, flag) = match req.shell {
        Shell::Login => (shell, "-lc"),
        Shell::Raw => ("/bin/sh", "-c"),
    };
    let home = if std::path::Path::new("/root").is_dir() { "/root" } else { "/" };
    let mut env: Vec<String> = [
        ("PATH", BASE_PATH),
        ("HOME", home),
        ("USER", "root"),
        ("LOGNAME", "root"),
        ("SHELL", shell),
        ("LANG", "C.UTF-8"),
        ("TERM", "xterm"),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={v}"))
    .collect();
    for (k, v) in &req.env {
        // The request's own value wins over a base one of the same name.
        let prefix = format!("{k}=");
        env.retain(|e| !e.starts_with(&prefix));
        env.push(format!("{k}={v}"));
    }
    (program, flag, env, req.cwd.as_deref().unwrap_or(home))
}

/// Start the command as every exec runs it: the shell, a clean environment, its own session
/// and its own cgroup (so a timeout can kill all it started), registered with the reaper, which
/// writes its exit code to `exit`'s write end, whose read end comes back.
fn spawn(
    req: &ExecRequest,
    shell: &str,
    token: u64,
    grouped: bool,
    pipes: Pipes,
    exit: (OwnedFd, OwnedFd),
) -> std::io::Result<(Spawned, File)> {
    let (program, flag, env, cwd) = invocation(req, shell);
    let (exit_read, exit_write) = exit;
    let mut waiters = crate::reaper::lock();
    let cgroup = crate::cgroup::dir(token, grouped);
    // A command that starts with '-' or '+' would read as the shell's options (`+x` unsets
    // one): `--` ends them first.
    let args: &[&str] = if req.command.starts_with(['-', '+']) { &[flag, "--", &req.command] } else { &[flag, &req.command] };
    let child = crate::spawn::spawn(program, args, &env, cwd, pipes, cgroup.as_deref())?;
    waiters.insert(child.pid, File::from(exit_write));
    Ok((child, File::from(exit_read)))
}

fn run(stream: u32, token: u64, req: ExecRequest, w: Writer, input: Option<Receiver<Option<Vec<u8>>>>, window: &Window) {
    // Made while a first command waits for the set-up, which changes none of them. (A pipe
    // that cannot be made is reported as a failed start below.)
    let shell = login_shell();
    let pipes = match req.tty {
        Some(size) => Pipes::tty(size.rows, size.cols),
        None => Pipes::new(req.stdin),
    };
    let pipes = pipes.and_then(|p| Ok((p, crate::spawn::pipe()?)));
    crate::pending::wait();
    if let Some(why) = crate::pending::failure() {
        forget(stream, token);
        w.send(stream, &Reply::error(ErrorKind::Failed, why));
        return answered(token);
    }
    if running().get(&stream).is_none_or(|r| r.token != token || r.cancelled) {
        forget(stream, token);
        w.send(stream, &ended_reply(128 + 9, false));
        // (The first command's group is made at boot.)
        return answered(token);
    }
    // Else the shell's start fails with an error that blames the shell.
    let bad_cwd = req.cwd.as_deref().and_then(|cwd| match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => Some(format!("working directory {cwd} is not a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(format!("working directory {cwd} does not exist")),
        Err(e) => Some(format!("working directory {cwd}: {e}")),
    });
    if let Some(why) = bad_cwd {
        forget(stream, token);
        w.send(stream, &Reply::error(ErrorKind::NotFound, why));
        return answered(token);
    }
    let grouped = crate::cgroup::create(token);
    let (child, exit) = match pipes.and_then(|(pipes, exit)| spawn(&req, &shell, token, grouped, pipes, exit)) {
        Ok(v) => v,
        Err(e) => {
            forget(stream, token);
            let kind = if e.kind() == std::io::ErrorKind::NotFound { ErrorKind::NotFound } else { ErrorKind::Failed };
            w.send(stream, &Reply::error(kind, format!("cannot start {shell}: {e}")));
            return answered(token);
        }
    };
    let pgid = child.pid;
    // Input queued since the request arrived goes in first; the host's close ends it. What the
    // command has taken is granted back, so the host sends only as fast as it reads (input
    // waiting here is guest memory).
    let ended = Arc::new(AtomicBool::new(false));
    if let (Some(pipe), Some(rx)) = (child.stdin, input) {
        let (w, ended) = (w.clone(), ended.clone());
        // (No thread to be had: the pipe closes, and the command reads the end of its input.)
        let _ = crate::workers::thread(move || {
            // (The command's end, its stdin, stays blocking.)
            let _ = nix::fcntl::fcntl(std::os::fd::AsRawFd::as_raw_fd(&pipe), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK));
            while let Ok(Some(data)) = rx.recv() {
                if !feed(&pipe, &data, &ended) {
                    break;
                }
                w.send(stream, &Reply::Credit(data.len() as u32));
            }
        });
    }
    // (A terminal's size can change from now on; one that cannot be kept is not resized.)
    let tty = req.tty.and_then(|_| child.stdout.try_clone().ok());
    match running().get_mut(&stream) {
        Some(r) if r.token == token => {
            r.pgid = Some(pgid);
            r.tty = tty;
            if let (Some(tty), Some(size)) = (&r.tty, r.resized.take()) {
                let _ = crate::spawn::resize(tty, size.rows, size.cols);
            }
            r.in_cgroup = child.in_cgroup;
            if r.cancelled {
                kill_all(pgid, token, false);
            }
        }
        // Replaced by a new host session's exec of the same id: this one has nobody to run for.
        _ => {
            kill_all(pgid, token, false);
        }
    }
    let outputs = [Some(child.stdout), child.stderr];
    let timeout = (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms));
    let (code, timed_out) = pump(
        Output { stream, w: &w, window, tty: req.tty.is_some(), owed: Default::default() },
        outputs,
        exit,
        timeout,
        pgid,
        token,
        child.in_cgroup,
    );
    ended.store(true, Ordering::SeqCst);
    // A new host's command may have this stream id by now (a restored snapshot): only this
    // command's own entry goes.
    forget(stream, token);
    w.send(stream, &ended_reply(code, timed_out));
    answered(token);
}

/// Set once the VM is going down: the commands killed for it did not fail of themselves.
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// How a command's end is told: a command killed because the VM goes down ends with `Closed`,
/// which the host reports as the sandbox having stopped; an exit code of 137 alone would read
/// as the command's own doing.
fn ended_reply(code: i32, timed_out: bool) -> Reply {
    if code == 128 + 9 && !timed_out && SHUTTING_DOWN.load(Ordering::SeqCst) {
        return Reply::error(ErrorKind::Closed, "the sandbox is shutting down");
    }
    Reply::Exit { code, timed_out }
}

/// Kill every command because the VM goes down (see `ended_reply`).
pub fn cancel_all_for_shutdown() {
    SHUTTING_DOWN.store(true, Ordering::SeqCst);
    cancel_all();
}

/// Writes `data` into a command's input: false once nobody reads it, or once the command has
/// `ended` with the pipe full. A process it left behind may hold the pipe and never read; the
/// pipe then closes instead of keeping this thread for good.
fn feed(pipe: &File, data: &[u8], ended: &AtomicBool) -> bool {
    use std::io::ErrorKind::{Interrupted, WouldBlock};
    let mut rest = data;
    while !rest.is_empty() {
        match (&*pipe).write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == WouldBlock => {
                if ended.load(Ordering::SeqCst) {
                    return false;
                }
                let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLOUT)];
                let _ = poll(&mut fds, PollTimeout::from(100u16));
            }
            Err(e) if e.kind() == Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// A command has been answered, however it ended: its group goes (now if empty, else once it
/// is), and after the first command the boot's expedited RCU. The host waits for neither.
fn answered(token: u64) {
    crate::cgroup::release(token);
    if token == 0 {
        crate::cgroup::relax_rcu();
    }
}

/// Once the command has exited, how long its pipes may stay silent before the exec ends anyway
/// (background processes that keep them open are not waited for).
const QUIET: Duration = Duration::from_millis(100);

/// On a terminal, once the command has exited, how much waiting for the host to take output
/// does not count as quiet: the terminal's buffer (what the command wrote before it exited)
/// gets through to a slow host.
const HOST_GRACE: Duration = Duration::from_secs(5);

/// While the host takes none of a command's output (its window is full), how often the pump
/// looks whether the command has exited meanwhile (its last output fitting in the pipe): an
/// exit in time must not be taken for a timeout at the deadline.
const EXIT_LOOK: Duration = Duration::from_millis(50);

/// Once a command's timeout has killed it, how long what escaped the kill (a daemon that left
/// its group, and its cgroup where it had one) may keep its pipes open before the exec ends.
const AFTER_KILL: Duration = Duration::from_secs(2);

/// Where a command's output goes: the host's stream, within its window.
struct Output<'a> {
    stream: u32,
    w: &'a Writer,
    window: &'a Window,
    /// The output is a terminal's: once the command has exited, what its background jobs
    /// write there does not keep the exec open (as a terminal session ends with its shell).
    tty: bool,
    /// On a terminal, what was waiting on it when the command exited and has not been sent
    /// yet: the command's own output, which quiet must not cut off however slowly the host
    /// takes it (sends count against it, whoever wrote them: a background job cannot hold the
    /// exec open by it).
    owed: std::cell::Cell<usize>,
}

/// Forward the command's output as it comes, on this one thread (a thread per pipe costs
/// milliseconds each under TCG), until it has exited and its pipes are closed or quiet. Past
/// the timeout everything it started is killed (`kill_all`). While the host has all the output it may
/// hold (its window), the pipes are not read: the command blocks on them. Returns (exit code,
/// timed out).
fn pump(
    out: Output,
    mut outputs: [Option<File>; 2],
    exit: File,
    timeout: Option<Duration>,
    pgid: i32,
    token: u64,
    in_cgroup: bool,
) -> (i32, bool) {
    let mut deadline = timeout.map(|t| Instant::now() + t);
    // Once the shell has exited (`code`), by its cgroup alone where it entered one.
    let kill = |code: Option<i32>| kill_all(pgid, token, code.is_some() && in_cgroup);
    let mut exit = Some(exit);
    let mut code: Option<i32> = None;
    let mut timed_out = false;
    let mut last = Instant::now();
    // Time given back to a terminal's quiet for waiting on the host (see HOST_GRACE).
    let mut granted = Duration::ZERO;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let open = outputs.iter().filter(|o| o.is_some()).count();
        if code.is_some() && (open == 0 || (last.elapsed() >= QUIET && out.owed.get() == 0)) {
            break;
        }
        // The shell is done, but what it left in the background still writes: the timeout
        // holds for that too (else a chatty background loop would keep the exec open forever).
        if code.is_some() && deadline.is_some_and(|d| Instant::now() >= d) {
            kill(code);
            // What they wrote until the kill goes too, as far as the host takes it in time;
            // what it does not is dropped, and the exec is a timeout (as below).
            timed_out |= !drain(&out, &mut outputs, &mut buf);
            break;
        }
        let exit_ready = if out.window.is_full() {
            let waiting = Instant::now();
            // Until the exit is known, the wait is cut into looks at the exit pipe (a wait
            // without a deadline needs none: the exit is read once the host takes output).
            let look = match (&exit, deadline) {
                (Some(_), Some(d)) => Some(d.min(Instant::now() + EXIT_LOOK)),
                _ => deadline,
            };
            match out.window.take(0, look) {
                Room::Deadline if deadline.is_some_and(|d| Instant::now() < d) => {
                    if !exit.as_ref().is_some_and(readable) {
                        continue;
                    }
                    true
                }
                // The pipes may have been full all along: quiet counts from now.
                Room::Open if code.is_none() || !out.tty => {
                    last = Instant::now();
                    continue;
                }
                // On a terminal quiet counts from the exit, but not while the host took its
                // time (up to HOST_GRACE in all): what the command wrote before it exited still
                // goes, and a background job that outpaces a slow host cannot hold it for good.
                Room::Open => {
                    let grant = waiting.elapsed().min(HOST_GRACE.saturating_sub(granted));
                    granted += grant;
                    last += grant;
                    continue;
                }
                Room::Closed => continue,
                Room::Deadline => {
                    kill(code);
                    if code.is_some() || timed_out {
                        // Output left because the host did not take it in time is dropped:
                        // the exec then ends as a timeout, not as a plain exit with its output
                        // cut short.
                        timed_out |= unread(&outputs);
                        break;
                    }
                    timed_out = true;
                    deadline = Some(Instant::now() + AFTER_KILL);
                    continue;
                }
            }
        } else {
            poll_and_send(&out, &mut outputs, exit.as_ref(), code, deadline, (&mut last, &mut granted), &mut buf)
        };
        if exit_ready {
            if let Some(mut pipe) = exit.take() {
                // A pipe closed without a code: the child is gone, how is unknown.
                let mut bytes = [0u8; 4];
                code = Some(pipe.read_exact(&mut bytes).map_or(128 + 9, |_| i32::from_ne_bytes(bytes)));
                if out.tty {
                    out.owed.set(outputs.iter().flatten().map(waiting).sum());
                }
                if let Some(r) = running().get_mut(&out.stream).filter(|r| r.token == token) {
                    r.exited = true;
                }
                last = Instant::now();
                if timed_out {
                    // Members that left the group still hold the pipes; the group itself is gone.
                    kill(code);
                }
            }
        }
        if code.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
            kill(code);
            if timed_out {
                // Its shell outlived the kill and AFTER_KILL (a process the kernel cannot stop
                // at once): the exit code is not waited for either.
                break;
            }
            timed_out = true;
            deadline = Some(Instant::now() + AFTER_KILL);
        }
    }
    (code.unwrap_or(128 + 9), timed_out)
}

/// One round of the pump while the host has room: wait for output or the exit (until the
/// quiet or the deadline runs out), and send a chunk from each pipe that has one. Returns
/// whether the exit pipe is ready.
fn poll_and_send(
    out: &Output,
    outputs: &mut [Option<File>; 2],
    exit: Option<&File>,
    code: Option<i32>,
    deadline: Option<Instant>,
    (last, granted): (&mut Instant, &mut Duration),
    buf: &mut [u8],
) -> bool {
    let wait = match (code, deadline) {
        (Some(_), _) => Some(QUIET.saturating_sub(last.elapsed())),
        (None, Some(d)) => Some(d.saturating_duration_since(Instant::now())),
        (None, None) => None,
    };
    // Rounded up: a poll that returns a hair early would spin.
    let timeout = wait.map_or(PollTimeout::NONE, |d| PollTimeout::from((d.as_millis() + 1).min(60_000) as u16));
    let mut fds: Vec<PollFd> = outputs.iter().flatten().chain(exit).map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN)).collect();
    // An error is EINTR: look again.
    let ready: Vec<bool> = match poll(&mut fds, timeout) {
        Ok(_) => fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect(),
        Err(_) => return false,
    };
    let mut at = 0;
    for (slot, is_stdout) in outputs.iter_mut().zip([true, false]) {
        if slot.is_none() {
            continue;
        }
        // A full window (after the other pipe's chunk) waits for the next round.
        if ready[at] && !out.window.is_full() && send_chunk(out, slot, is_stdout, buf) {
            // Quiet counts from after the send, which can block: else output already waiting
            // in the pipe could be left behind. (On a terminal it counts from the exit: a
            // background job that keeps writing there would otherwise hold an exec without a
            // timeout open for good.)
            if code.is_none() || !out.tty {
                *last = Instant::now();
            } else {
                // Yet what still comes out of a terminal after the exit may be the command's
                // own: its buffers hold up to 64 KB beyond what FIONREAD counts (`owed`), and
                // a busy guest passes it on slowly. So output keeps it open after all, up to
                // HOST_GRACE in all (shared with the host's waits).
                let grant = last.elapsed().min(HOST_GRACE.saturating_sub(*granted));
                *granted += grant;
                *last += grant;
            }
        }
        at += 1;
    }
    exit.is_some() && ready[at]
}

/// Read one chunk from a pipe that is ready and send it; a pipe at its end is closed (`None`).
/// True if something was sent.
fn send_chunk(out: &Output, slot: &mut Option<File>, is_stdout: bool, buf: &mut [u8]) -> bool {
    let Some(pipe) = slot else { return false };
    match pipe.read(buf) {
        // (A terminal's master shares its non-blocking flag with the input's writer.)
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => false,
        // A terminal's master reads EIO once its slave is closed everywhere.
        Ok(0) | Err(_) => {
            *slot = None;
            false
        }
        Ok(n) => {
            out.owed.set(out.owed.get().saturating_sub(n));
            // Nobody reads any more (a cancel): the output is drained and dropped.
            let data = buf[..n].to_vec();
            out.window.send(out.w, out.stream, &if is_stdout { Reply::Stdout(data) } else { Reply::Stderr(data) });
            true
        }
    }
}

/// After the kill at the deadline: send what is still waiting in the pipes while the host has
/// room for it. True if nothing was left behind. (Bounded: a writer that escaped the kill
/// could keep a pipe full for good.)
fn drain(out: &Output, outputs: &mut [Option<File>; 2], buf: &mut [u8]) -> bool {
    for _ in 0..64 {
        if out.window.is_full() || !unread(outputs) {
            break;
        }
        for (slot, is_stdout) in outputs.iter_mut().zip([true, false]) {
            if slot.as_ref().is_some_and(|p| waiting(p) > 0) && !out.window.is_full() {
                send_chunk(out, slot, is_stdout, buf);
            }
        }
    }
    !unread(outputs)
}

/// Whether a read of `pipe` would not block (the exit pipe: the code came, or the child is gone).
fn readable(pipe: &File) -> bool {
    let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

/// Whether output is still waiting in any of the command's pipes (what ending the exec now
/// would drop).
fn unread(outputs: &[Option<File>; 2]) -> bool {
    outputs.iter().flatten().any(|pipe| waiting(pipe) > 0)
}

/// The bytes waiting in a pipe (or terminal master); 0 where that cannot be told.
fn waiting(pipe: &File) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int, the bytes waiting, through a pointer valid for the call;
    // the descriptor is an open pipe or terminal master.
    let rc = unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// Kill a command: its process group, and every descendant of its shell (`pgid` is the
/// shell's pid) that left the group (`setsid`, `setpgid`). The tree is frozen before it is
/// killed: a process that forked after the walk, its parent then killed, would be handed to
/// PID 1 and lost to the walk. A descendant whose parent had already exited belongs to PID 1
/// (this agent) and only the command's cgroup finds it (kernels without cgroups: it stays).
fn kill_all(pgid: i32, token: u64, cgroup_only: bool) {
    use nix::sys::signal::kill;
    // Everything the command started, wherever it went (where the kernel has cgroups). Once a
    // shell that entered its cgroup has exited, that is all (`cgroup_only`): its group may be
    // empty by now and its number another command's. (Without the cgroup the group is still
    // the only handle left.)
    if crate::cgroup::kill(token) && cgroup_only {
        return;
    }
    let mut frozen: std::collections::HashSet<i32> = std::collections::HashSet::new();
    // A few rounds: each catches what forked before the previous round's stop arrived.
    for _ in 0..3 {
        let fresh: Vec<i32> = descendants(pgid).into_iter().filter(|p| !frozen.contains(p)).collect();
        if fresh.is_empty() {
            break;
        }
        for pid in fresh {
            let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
            frozen.insert(pid);
        }
    }
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    for pid in frozen {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// `root` and every process below it, from the parent links in /proc; nothing if `root` is no
/// longer the leader of its own group (it exited, and the pid may be another process's now).
fn descendants(root: i32) -> Vec<i32> {
    let mut children: std::collections::HashMap<i32, Vec<i32>> = std::collections::HashMap::new();
    let mut root_leads = false;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid pgrp ...": the name may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let mut fields = rest.split_whitespace().skip(1).map(|f| f.parse::<i32>().ok());
        let (Some(Some(ppid)), Some(Some(pgrp))) = (fields.next(), fields.next()) else { continue };
        root_leads |= pid == root && pgrp == root;
        children.entry(ppid).or_default().push(pid);
    }
    if !root_leads {
        return Vec::new();
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = children.get(&out[i]) {
            out.extend(kids.iter().copied().filter(|k| *k != 1));
        }
        i += 1;
    }
    out
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

/// The command's terminal has a new size (nothing for a command on pipes).
pub fn resize(stream: u32, size: smolvm_proto::TtySize) {
    let mut running = running();
    let Some(r) = running.get_mut(&stream) else { return };
    match &r.tty {
        Some(tty) => {
            let _ = crate::spawn::resize(tty, size.rows, size.cols);
        }
        // Still starting (waiting for the boot's set-up, say): the terminal takes it when made.
        None => r.resized = Some(size),
    }
}

fn cancel_one(r: &mut Running) {
    match r.pgid {
        Some(pgid) => {
            kill_all(pgid, r.token, r.exited && r.in_cgroup);
        }
        // Not started yet: it will not start.
        None => r.cancelled = true,
    }
}

pub fn cancel(stream: u32) {
    if let Some(r) = running().get_mut(&stream) {
        cancel_one(r);
    }
    crate::flow::close(stream);
}

pub fn cancel_all() {
    running().values_mut().for_each(cancel_one);
    crate::flow::close_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn pair() -> (File, File) {
        let (r, w) = crate::spawn::pipe().unwrap();
        (File::from(r), File::from(w))
    }

    /// The "shell", in a process group of its own, for the kill at the timeout.
    fn shell() -> std::process::Child {
        std::process::Command::new("sleep").arg("30").process_group(0).spawn().unwrap()
    }

    /// The output chunks written to `file` by a `Writer`: (stdout, stderr).
    fn sent(mut file: File) -> (Vec<u8>, Vec<u8>) {
        let mut got = Vec::new();
        std::io::Seek::rewind(&mut file).unwrap();
        file.read_to_end(&mut got).unwrap();
        let (mut stdout, mut stderr, mut at) = (Vec::new(), Vec::new(), 0);
        while at < got.len() {
            let len = smolvm_proto::frame_len(got[at..at + 4].try_into().unwrap()).unwrap();
            match smolvm_proto::decode::<Reply>(&got[at + 4..at + 4 + len]).unwrap().1 {
                Reply::Stdout(d) => stdout.extend(d),
                Reply::Stderr(d) => stderr.extend(d),
                _ => {}
            }
            at += 4 + len;
        }
        (stdout, stderr)
    }

    /// A command that has exited with output still in a pipe when its timeout passes, because
    /// the host took none of it in time (its window stays full): that output is dropped, so the
    /// exec must end as a timeout.
    #[test]
    fn output_left_in_a_pipe_at_the_timeout_makes_it_a_timeout() {
        let ((out_r, mut out_w), (err_r, mut err_w), (exit_r, mut exit_w)) = (pair(), pair(), pair());
        // stdout's chunk fills the window (of one byte); stderr's bytes then wait behind it.
        out_w.write_all(b"taken").unwrap();
        err_w.write_all(b"left behind").unwrap();
        exit_w.write_all(&0i32.to_ne_bytes()).unwrap();
        drop((out_w, err_w, exit_w));
        let mut shell = shell();
        let (window, w) = (Window::new(1), Writer::to(File::create("/dev/null").unwrap()));
        let out = Output { stream: 7, w: &w, window: &window, tty: false, owed: Default::default() };
        // (Long enough that the first round, which reads the exit code, comes before it.)
        let timeout = Duration::from_secs(1);
        let (code, timed_out) = pump(out, [Some(out_r), Some(err_r)], exit_r, Some(timeout), shell.id() as i32, 7, false);
        let _ = shell.kill();
        let _ = shell.wait();
        assert_eq!((code, timed_out), (0, true));

        // All of it taken in time: a plain exit.
        let ((out_r, mut out_w), (err_r, err_w), (exit_r, mut exit_w)) = (pair(), pair(), pair());
        out_w.write_all(b"all of it").unwrap();
        exit_w.write_all(&3i32.to_ne_bytes()).unwrap();
        drop((out_w, err_w, exit_w));
        let window = Window::new(CHUNK);
        let out = Output { stream: 8, w: &w, window: &window, tty: false, owed: Default::default() };
        assert_eq!(pump(out, [Some(out_r), Some(err_r)], exit_r, Some(timeout), i32::MAX, 8, false), (3, false));
    }

    /// A command that exits while the host takes none of its output (its last output fits in
    /// the pipe) has exited in time: at the deadline the exec ends with its own exit code, not
    /// as a killed shell 2 s later.
    #[test]
    fn an_exit_while_the_host_takes_nothing_is_seen() {
        let ((out_r, mut out_w), (err_r, mut err_w), (exit_r, mut exit_w)) = (pair(), pair(), pair());
        out_w.write_all(b"taken").unwrap();
        err_w.write_all(b"left behind").unwrap();
        drop((out_w, err_w));
        // The exit comes once the pump waits for the host (its window of one byte is full).
        let exits = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            exit_w.write_all(&5i32.to_ne_bytes()).unwrap();
        });
        let mut shell = shell();
        let (window, w) = (Window::new(1), Writer::to(File::create("/dev/null").unwrap()));
        let out = Output { stream: 9, w: &w, window: &window, tty: false, owed: Default::default() };
        let got = pump(out, [Some(out_r), Some(err_r)], exit_r, Some(Duration::from_secs(1)), shell.id() as i32, 9, false);
        let _ = shell.kill();
        let _ = shell.wait();
        exits.join().unwrap();
        // Its output was dropped (the host took none of it), so it is still a timeout.
        assert_eq!(got, (5, true));
    }

    /// On a terminal, what the command wrote before it exited reaches the host however slowly
    /// the host takes it (each chunk here takes longer than the quiet that ends a terminal's
    /// exec), while a background job keeps the terminal open.
    #[test]
    fn a_terminals_output_at_the_exit_is_all_sent_to_a_slow_host() {
        let ((out_r, mut out_w), (err_r, err_w), (exit_r, mut exit_w)) = (pair(), pair(), pair());
        // SAFETY: F_SETPIPE_SZ takes an int by value on an open pipe.
        assert!(unsafe { libc::fcntl(out_w.as_raw_fd(), libc::F_SETPIPE_SZ, 4 * CHUNK as libc::c_int) } >= 0);
        let written: Vec<u8> = (0..3 * CHUNK).map(|i| (i % 251) as u8).collect();
        out_w.write_all(&written).unwrap();
        exit_w.write_all(&0i32.to_ne_bytes()).unwrap();
        // `out_w` stays open: a background job that still holds the terminal.
        drop((err_w, exit_w));
        // The host: 4 KB every 10 ms, so that a chunk takes about 160 ms to go.
        let (got, stdout) = pump_terminal_to_slow_host([Some(out_r), Some(err_r)], exit_r, Duration::from_millis(10));
        drop(out_w);
        assert_eq!(got, (0, false));
        assert_eq!(stdout.len(), written.len(), "the terminal's output was cut off");
        assert!(stdout == written);
    }

    /// `pump` of a terminal's output to a host that takes 4 KB `every` so often (its pipe holds
    /// 4 KB): the pump's result, and the stdout the host got.
    fn pump_terminal_to_slow_host(outputs: [Option<File>; 2], exit: File, every: Duration) -> ((i32, bool), Vec<u8>) {
        let (host_r, host_w) = pair();
        // SAFETY: F_SETPIPE_SZ takes an int by value on an open pipe.
        assert!(unsafe { libc::fcntl(host_w.as_raw_fd(), libc::F_SETPIPE_SZ, 4096 as libc::c_int) } >= 0);
        let host = std::thread::spawn(move || {
            let (mut host_r, mut got, mut buf) = (host_r, Vec::new(), vec![0u8; 4096]);
            loop {
                std::thread::sleep(every);
                match host_r.read(&mut buf) {
                    Ok(0) | Err(_) => break got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let (window, w) = (Window::new(smolvm_proto::WINDOW), Writer::to(host_w));
        let out = Output { stream: 11, w: &w, window: &window, tty: true, owed: Default::default() };
        let got = pump(out, outputs, exit, None, i32::MAX, 11, false);
        drop(w);
        let file = crate::server::tests::tempfile_in_tmp();
        (&file).write_all(&host.join().unwrap()).unwrap();
        (got, sent(file).0)
    }

    /// On a real terminal, FIONREAD counts only what its line discipline holds (4 KB): at the
    /// exit, more that the command wrote waits in the terminal's buffers. With a host that takes
    /// it slowly (4 KB every 150 ms), the end of it went unsent once the quiet ran out.
    #[test]
    fn a_terminals_buffered_output_at_the_exit_is_all_sent() {
        let pipes = crate::spawn::Pipes::tty(24, 80).unwrap();
        let (master, slave) = (File::from(pipes.stdout.0), File::from(pipes.stdout.1));
        let (err_r, err_w) = pair();
        drop(err_w);
        let (exit_r, mut exit_w) = pair();
        // (Letters only: the terminal turns a newline into two bytes.)
        let written: Vec<u8> = (0..24 << 10).map(|i| b'a' + (i % 26) as u8).collect();
        let command = std::thread::spawn({
            let written = written.clone();
            move || {
                (&slave).write_all(&written).unwrap();
                exit_w.write_all(&0i32.to_ne_bytes()).unwrap();
                // Still open: a background job that holds the terminal.
                slave
            }
        });
        let (got, stdout) = pump_terminal_to_slow_host([Some(master), Some(err_r)], exit_r, Duration::from_millis(150));
        drop(command.join().unwrap());
        assert_eq!(got, (0, false));
        assert_eq!(stdout.len(), written.len(), "the terminal's output was cut off");
        assert!(stdout == written);
    }

    /// A shell that has exited, with a background process still writing at the deadline: what
    /// was written until the kill reaches the host, all of it, and the exec is a plain exit.
    #[test]
    fn output_in_the_pipes_at_the_deadline_is_sent() {
        let ((out_r, mut out_w), (err_r, err_w), (exit_r, mut exit_w)) = (pair(), pair(), pair());
        // More than a chunk: one round of the pump leaves the rest in the pipe.
        // SAFETY: F_SETPIPE_SZ takes an int by value on an open pipe.
        assert!(unsafe { libc::fcntl(out_w.as_raw_fd(), libc::F_SETPIPE_SZ, 4 * CHUNK as libc::c_int) } >= 0);
        let written: Vec<u8> = (0..CHUNK + 100).map(|i| (i % 251) as u8).collect();
        out_w.write_all(&written).unwrap();
        exit_w.write_all(&0i32.to_ne_bytes()).unwrap();
        // `out_w` stays open: the background process that still holds the pipe.
        drop((err_w, exit_w));
        let mut shell = shell();
        let file = crate::server::tests::tempfile_in_tmp();
        let (window, w) = (Window::new(smolvm_proto::WINDOW), Writer::to(file.try_clone().unwrap()));
        let out = Output { stream: 10, w: &w, window: &window, tty: false, owed: Default::default() };
        // A deadline that has passed by the time the exit is read.
        let got = pump(out, [Some(out_r), Some(err_r)], exit_r, Some(Duration::ZERO), shell.id() as i32, 10, false);
        let _ = shell.kill();
        let _ = shell.wait();
        drop(out_w);
        assert_eq!(got, (0, false));
        let (stdout, stderr) = sent(file);
        assert_eq!(stdout.len(), written.len());
        assert!(stdout == written && stderr.is_empty());
    }
}
