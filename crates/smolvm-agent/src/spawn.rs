//! Starting commands: a vfork-style clone whose child starts in the command's cgroup, sets up
//! its session, descriptors and signals, and execs.
//!
//! `std::process::Command` forks: the agent's page tables are copied, and every page either
//! side then writes faults once. Under TCG that cost ~2 ms a command (warm `run("true")` 5.6 ms
//! against 3.4 ms), more on a cold guest. Like musl's `posix_spawn`, the child here shares the
//! agent's memory until it execs; unlike it, the child starts in its cgroup: `clone3` with
//! `CLONE_INTO_CGROUP` (Linux 5.7). A kernel without it gets a child that writes itself into
//! `cgroup.procs` before the exec instead, a migration that cost ~4 ms of the first command on
//! a cold guest under TCG (median of 6 boots: 8 ms from the clone to the exec against 4 without).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;

/// A started command: its pid and our ends of its pipes (on a terminal: the terminal's master,
/// as `stdout` and, a second descriptor of it, as `stdin`).
pub struct Spawned {
    pub pid: i32,
    /// It entered the cgroup it was given (false without one).
    pub in_cgroup: bool,
    pub stdin: Option<File>,
    pub stdout: File,
    /// None on a terminal, which carries both streams.
    pub stderr: Option<File>,
}

fn cstring(s: &str, what: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("the {what} contains a NUL byte")))
}

/// A pipe whose ends do not survive an exec (a spawned command gets only what it is given).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// A descriptor above stdio: the child moves its pipes onto 0, 1 and 2, which must not clobber
/// one it has yet to move (PID 1 may run without stdio, and then pipes get the low numbers).
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on an open descriptor returns a new one that we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just returned by fcntl and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// A command's standard streams, made before it starts (they need none of the set-up that
/// commands wait for, so a first command makes them while it waits). Each is (read end, write
/// end); on a terminal every one of them is a descriptor of its master or its slave.
pub struct Pipes {
    stdin: Option<(OwnedFd, OwnedFd)>,
    pub(crate) stdout: (OwnedFd, OwnedFd),
    stderr: Option<(OwnedFd, OwnedFd)>,
    /// The slave side is a terminal, which becomes the command's controlling terminal.
    tty: bool,
}

impl Pipes {
    /// stdout and stderr, and stdin if `piped_stdin` (else the command reads /dev/null).
    pub fn new(piped_stdin: bool) -> io::Result<Pipes> {
        let pair = || -> io::Result<(OwnedFd, OwnedFd)> {
            let (r, w) = pipe()?;
            Ok((above_stdio(r)?, above_stdio(w)?))
        };
        Ok(Pipes { stdout: pair()?, stderr: Some(pair()?), stdin: if piped_stdin { Some(pair()?) } else { None }, tty: false })
    }

    /// A new pseudo-terminal of this size for all three streams. Both sides are opened
    /// close-on-exec, so no other command started meanwhile inherits either.
    pub fn tty(rows: u16, cols: u16) -> io::Result<Pipes> {
        let dup = |fd: &OwnedFd| fd.try_clone().and_then(above_stdio);
        // SAFETY: open(2) with a NUL-terminated path; the result is checked and then owned.
        let master = unsafe { libc::open(c"/dev/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if master < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `master` was just opened and nothing else owns it.
        let master = above_stdio(unsafe { OwnedFd::from_raw_fd(master) })?;
        let unlock: libc::c_int = 0;
        // SAFETY: TIOCSPTLCK reads one int through the pointer; TIOCGPTPEER opens the slave
        // with the flags given and returns its new descriptor, which is then owned.
        let slave = unsafe {
            if libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            above_stdio(OwnedFd::from_raw_fd(fd))?
        };
        resize(&master, rows, cols)?;
        Ok(Pipes { stdin: Some((dup(&slave)?, dup(&master)?)), stdout: (master, slave), stderr: None, tty: true })
    }
}

/// Give the terminal whose master is `master` a new size (its foreground programs get SIGWINCH).
pub fn resize(master: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer, valid for the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What the child does between the clone and the exec, all of it prepared by the parent: the
/// child shares the parent's memory (vfork-style), so it only makes system calls.
struct ChildPlan {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    /// The command's `cgroup.procs`, which the child enters before anything else where it was
    /// not started in its group; null otherwise.
    cgroup: *const libc::c_char,
    /// Standard input: a pipe's read end, or -1 for /dev/null.
    stdin: libc::c_int,
    stdout: libc::c_int,
    stderr: libc::c_int,
    /// Make the terminal on stdin the new session's controlling terminal.
    ctty: bool,
    empty_mask: libc::sigset_t,
    /// The errno of the step that failed, written by the child (the memory is shared; the
    /// parent reads it once the clone has returned). 0: the exec happened.
    failed: std::sync::atomic::AtomicI32,
    /// Likewise, why the child could not enter its cgroup (it runs on without it).
    cgroup_failed: std::sync::atomic::AtomicI32,
}

/// Put `fd` at `target` for the exec (dup2 leaves a descriptor that is already there alone,
/// close-on-exec flag and all).
///
/// SAFETY: only system calls on descriptors; callable in the vfork child.
unsafe fn place(fd: libc::c_int, target: libc::c_int) -> libc::c_int {
    if fd == target {
        libc::fcntl(fd, libc::F_SETFD, 0)
    } else {
        libc::dup2(fd, target)
    }
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the parent's ChildPlan, alive until the clone returns (which is
    // after this child has exec'd or exited); every pointer in it is valid for that long. Only
    // system calls follow: nothing here allocates, locks or unwinds.
    unsafe {
        let plan = &*(arg as *const ChildPlan);
        if !plan.cgroup.is_null() {
            // Failing that, the command runs outside a group and a timeout kills it by process
            // group and tree alone.
            let fd = libc::open(plan.cgroup, libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                plan.cgroup_failed.store((*libc::__errno_location()).max(1), std::sync::atomic::Ordering::SeqCst);
            }
            if fd >= 0 {
                libc::close(fd);
            }
        }
        let failed = 'steps: {
            if libc::setsid() < 0 {
                break 'steps true;
            }
            let stdin = if plan.stdin >= 0 { plan.stdin } else { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if stdin < 0 || place(stdin, 0) < 0 || place(plan.stdout, 1) < 0 || place(plan.stderr, 2) < 0 {
                break 'steps true;
            }
            if plan.ctty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                break 'steps true;
            }
            if libc::chdir(plan.cwd) < 0 {
                break 'steps true;
            }
            // The Rust runtime ignores SIGPIPE, and ignoring survives an exec. It also handles
            // SIGSEGV and SIGBUS (stack overflows): a handler must not run here, in the agent's
            // memory, once the mask is cleared. (The agent handles no other signal: its reaper
            // takes them synchronously.)
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            for sig in [libc::SIGPIPE, libc::SIGSEGV, libc::SIGBUS] {
                libc::sigaction(sig, &dfl, ptr::null_mut());
            }
            libc::sigprocmask(libc::SIG_SETMASK, &plan.empty_mask, ptr::null_mut());
            libc::execve(plan.program, plan.argv, plan.envp);
            true
        };
        if failed {
            plan.failed.store((*libc::__errno_location()).max(1), std::sync::atomic::Ordering::SeqCst);
        }
        libc::_exit(127)
    }
}

/// `CLONE_INTO_CGROUP`, for `clone3`'s flags (64 bits wide: past what `clone` takes).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Set once `clone3` has said this kernel lacks it, or `CLONE_INTO_CGROUP`: not asked again.
static NO_CLONE3: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A child was started in its group by `clone3` (tests).
#[cfg(test)]
static STARTED_IN_GROUP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A vfork-style `clone3` whose child starts in the cgroup whose directory `group` is open and
/// runs `child_main(plan)` on `stack`: its pid, or the errno (no child then).
///
/// SAFETY: as for the `clone` in `spawn`: `stack` and `plan` outlive the child's use of them
/// (CLONE_VFORK returns here only once it has exec'd or exited), and all signals are blocked.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_into(
    group: libc::c_int,
    stack: *mut u128,
    stack_bytes: usize,
    plan: *const ChildPlan,
) -> Result<libc::c_int, libc::c_int> {
    let mut args: libc::clone_args = std::mem::zeroed();
    args.flags = (libc::CLONE_VM | libc::CLONE_VFORK) as u64 | CLONE_INTO_CGROUP;
    args.exit_signal = libc::SIGCHLD as u64;
    args.stack = stack as u64;
    args.stack_size = stack_bytes as u64;
    args.cgroup = group as u64;
    let ret: i64;
    // The child returns from the system call on its own stack (the kernel points rsp at its
    // top, 16-byte aligned) with the parent's registers otherwise: r12 and r13 survive the
    // call (rcx and r11 do not) and carry the function and its argument. It never comes back
    // from `child_main` (exec or _exit); the exit after it is for form's sake.
    std::arch::asm!(
        "syscall",
        "test rax, rax",
        "jnz 2f",
        "mov rdi, r13",
        "call r12",
        "mov edi, eax",
        "mov eax, 60",
        "syscall",
        "ud2",
        "2:",
        inlateout("rax") libc::SYS_clone3 => ret,
        in("rdi") &args as *const libc::clone_args,
        in("rsi") std::mem::size_of::<libc::clone_args>(),
        in("r12") child_main as extern "C" fn(*mut libc::c_void) -> libc::c_int as usize,
        in("r13") plan,
        lateout("rcx") _,
        lateout("r11") _,
        options(nostack),
    );
    if ret < 0 {
        Err(-ret as libc::c_int)
    } else {
        Ok(ret as libc::c_int)
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn clone3_into(_: libc::c_int, _: *mut u128, _: usize, _: *const ChildPlan) -> Result<libc::c_int, libc::c_int> {
    Err(libc::ENOSYS)
}

/// Run `program` (an absolute path) with `args`, exactly the environment `env` ("KEY=value"),
/// in `cwd`, in a new session (so a timeout can kill its whole process group) and, given one,
/// in the cgroup whose directory is `cgroup`, with no signal blocked and SIGPIPE at its
/// default. stdout and stderr are pipes; stdin a pipe or /dev/null. The child is in the cgroup
/// before the exec, so nothing it starts can be outside.
pub fn spawn(
    program: &str,
    args: &[&str],
    env: &[String],
    cwd: &str,
    pipes: Pipes,
    cgroup: Option<&std::path::Path>,
) -> io::Result<Spawned> {
    let program_c = cstring(program, "program path")?;
    let argv_c = std::iter::once(program).chain(args.iter().copied()).map(|a| cstring(a, "command")).collect::<io::Result<Vec<_>>>()?;
    let env_c = env.iter().map(|e| cstring(e, "environment")).collect::<io::Result<Vec<_>>>()?;
    let cwd_c = cstring(cwd, "working directory")?;
    let procs_c = cgroup.map(|p| cstring(&p.join("cgroup.procs").to_string_lossy(), "cgroup path")).transpose()?;
    // (One that cannot be opened is left to the write below, which then says why.)
    let group = cgroup.filter(|_| !NO_CLONE3.load(std::sync::atomic::Ordering::Relaxed)).and_then(|dir| {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(dir).ok()
    });
    let argv: Vec<*const libc::c_char> = argv_c.iter().map(|a| a.as_ptr()).chain([ptr::null()]).collect();
    let envp: Vec<*const libc::c_char> = env_c.iter().map(|e| e.as_ptr()).chain([ptr::null()]).collect();
    let Pipes { stdin, stdout: (out_r, out_w), stderr, tty } = pipes;
    let (err_r, err_w) = match stderr {
        Some((r, w)) => (Some(r), Some(w)),
        None => (None, None),
    };

    // SAFETY: sigemptyset initialises the set it is given; a sigset_t is plain bits, and all of
    // them set blocks every signal (musl's sigfillset leaves out its own internal ones).
    let (empty_mask, all) = unsafe {
        let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(empty.as_mut_ptr());
        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        ptr::write_bytes(all.as_mut_ptr(), 0xff, 1);
        (empty.assume_init(), all.assume_init())
    };
    let mut plan = ChildPlan {
        program: program_c.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: cwd_c.as_ptr(),
        cgroup: ptr::null(),
        stdin: stdin.as_ref().map_or(-1, |(r, _)| r.as_raw_fd()),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_ref().map_or(out_w.as_raw_fd(), |w| w.as_raw_fd()),
        ctty: tty,
        empty_mask,
        failed: std::sync::atomic::AtomicI32::new(0),
        cgroup_failed: std::sync::atomic::AtomicI32::new(0),
    };
    // The child's stack; it lives until the clone returns, after the child's exec or exit.
    let mut stack = vec![0u128; 4096];
    // SAFETY: the stack grows down from the end of `stack` (16-byte aligned, 64 KiB), which
    // outlives the child's use of it (CLONE_VFORK: the clone returns once the child has exec'd
    // or exited); `plan` outlives it likewise. No signal handler may run in the child on the
    // shared memory: this thread blocks all signals across the clone, and the child sets its
    // own mask just before the exec.
    let pid = unsafe {
        let base = stack.as_mut_ptr();
        let top = base.add(stack.len()).cast::<libc::c_void>();
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, old.as_mut_ptr());
        let started = match &group {
            Some(dir) => match clone3_into(dir.as_raw_fd(), base, stack.len() * std::mem::size_of::<u128>(), &plan) {
                Ok(pid) => {
                    #[cfg(test)]
                    STARTED_IN_GROUP.store(true, std::sync::atomic::Ordering::SeqCst);
                    Some(pid)
                }
                Err(e) => {
                    // No clone3 (before 5.3), or none that starts a child in a group (5.7).
                    if matches!(e, libc::ENOSYS | libc::E2BIG | libc::EINVAL) {
                        NO_CLONE3.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    None
                }
            },
            None => None,
        };
        let (pid, err) = match started {
            Some(pid) => (pid, io::Error::from_raw_os_error(0)),
            None => {
                // The child moves itself into the group instead.
                plan.cgroup = procs_c.as_ref().map_or(ptr::null(), |c| c.as_ptr());
                let plan_ptr = (&plan as *const ChildPlan).cast_mut().cast();
                let pid = libc::clone(child_main, top, libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD, plan_ptr);
                (pid, io::Error::last_os_error())
            }
        };
        libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), ptr::null_mut());
        if pid < 0 {
            return Err(err);
        }
        pid
    };
    drop(stack);
    // The child's ends close here; ours stay. (A terminal's master reads the end of its
    // output only once every descriptor of its slave is closed.)
    drop((out_w, err_w));
    let stdin = stdin.map(|(child_end, ours)| {
        drop(child_end);
        ours
    });
    let cgroup_failed = plan.cgroup_failed.load(std::sync::atomic::Ordering::SeqCst);
    if cgroup_failed != 0 {
        crate::log(&format!(
            "a command could not enter its cgroup ({}); its timeout kills by process group and tree only",
            io::Error::from_raw_os_error(cgroup_failed)
        ));
    }
    let failed = plan.failed.load(std::sync::atomic::Ordering::SeqCst);
    if failed != 0 {
        // (The child exited; the reaper collects it.)
        return Err(io::Error::from_raw_os_error(failed));
    }
    let in_cgroup = cgroup.is_some() && cgroup_failed == 0;
    drop(group);
    Ok(Spawned { pid, in_cgroup, stdin: stdin.map(File::from), stdout: File::from(out_r), stderr: err_r.map(File::from) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::Pid;
    use std::io::{Read, Write};

    fn shell(script: &str, env: &[&str], cwd: &str, input: Option<&[u8]>, cgroup: Option<&std::path::Path>) -> (String, String, i32, i32) {
        let env: Vec<String> = env.iter().map(|e| e.to_string()).collect();
        let child = spawn("/bin/sh", &["-c", script], &env, cwd, Pipes::new(input.is_some()).unwrap(), cgroup).unwrap();
        if let (Some(mut pipe), Some(data)) = (child.stdin, input) {
            pipe.write_all(data).unwrap();
        }
        let (mut out, mut err) = (String::new(), String::new());
        let mut stderr = child.stderr.unwrap();
        let reader = std::thread::spawn(move || {
            let _ = stderr.read_to_string(&mut err);
            err
        });
        let mut stdout = child.stdout;
        stdout.read_to_string(&mut out).unwrap();
        let err = reader.join().unwrap();
        let code = match waitpid(Pid::from_raw(child.pid), None).unwrap() {
            WaitStatus::Exited(_, code) => code,
            other => panic!("{other:?}"),
        };
        (out, err, code, child.pid)
    }

    #[test]
    fn the_command_gets_its_streams_environment_directory_and_exit_code() {
        let (out, err, code, _) =
            shell("echo out; echo err >&2; pwd; echo \"$FOO ${HOME-unset}\"; cat; exit 3", &["FOO=bar"], "/tmp", Some(b"in\n"), None);
        assert_eq!(out, "out\n/tmp\nbar unset\nin\n");
        assert_eq!(err, "err\n");
        assert_eq!(code, 3);
    }

    #[test]
    fn without_input_the_command_reads_nothing() {
        let (out, _, code, _) = shell("cat; echo done", &[], "/", None, None);
        assert_eq!((out.as_str(), code), ("done\n", 0));
    }

    #[test]
    fn the_command_leads_its_own_session_with_no_signal_blocked_or_ignored() {
        // The test harness ignores SIGPIPE (bit 13 of SigIgn); the command must not inherit that.
        let (out, _, _, pid) =
            shell("cat /proc/self/stat | cut -d' ' -f6; grep -E '^Sig(Blk|Ign)' /proc/self/status", &[], "/", None, None);
        let mut lines = out.lines();
        // (`cat`'s session is the shell's, whose pid is the child's.)
        assert_eq!(lines.next().unwrap().parse::<i32>().unwrap(), pid);
        for line in lines {
            let mask = u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap();
            assert_eq!(mask & (1 << (libc::SIGPIPE - 1)), 0, "{line}");
            if line.starts_with("SigBlk") {
                assert_eq!(mask, 0, "{line}");
            }
        }
    }

    #[test]
    fn the_child_enters_its_cgroup_before_the_exec() {
        // A plain directory stands in for the group: `clone3` cannot start a child in it, and
        // the child writes "0" (itself) into its `cgroup.procs` instead.
        let dir = std::env::temp_dir().join(format!("smolvm-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, "").unwrap();
        let (out, _, code, _) = shell("echo ran", &[], "/", None, Some(&dir));
        assert_eq!((out.as_str(), code), ("ran\n", 0));
        assert_eq!(std::fs::read_to_string(&procs).unwrap(), "0");
        // A group that cannot be entered: the command runs all the same.
        let (out, _, _, _) = shell("echo ran", &[], "/", None, Some(&dir.join("missing")));
        assert_eq!(out, "ran\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// In a real cgroup (the host's cgroup2, where this runs as root) the child starts in it by
    /// `clone3`, and everything it runs is there from the first instruction.
    #[test]
    fn in_a_real_cgroup_the_child_starts_in_it() {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let Some(root) = mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| std::path::PathBuf::from(f[1]))
        }) else {
            panic!("this test needs a cgroup2 hierarchy mounted on the host");
        };
        let name = format!("smolvm-spawn-test-{}", std::process::id());
        let dir = root.join(&name);
        if std::fs::create_dir(&dir).is_err() {
            panic!("this test needs to make a cgroup (run it as root, as `make test` does)");
        }
        let (out, _, code, _) = shell("cat /proc/self/cgroup", &[], "/", None, Some(&dir));
        let _ = std::fs::remove_dir(&dir);
        assert_eq!(code, 0);
        assert!(out.lines().any(|l| l == format!("0::/{name}")), "{out}");
        assert!(STARTED_IN_GROUP.load(std::sync::atomic::Ordering::SeqCst), "clone3 did not start it in the group");
    }

    #[test]
    fn on_a_terminal_the_command_has_it_as_its_controlling_terminal_at_the_given_size() {
        let pipes = Pipes::tty(33, 101).unwrap();
        let script =
            "tty; stty size; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-three; echo err >&2; read line; echo \"got $line\"; exit 4";
        let child = spawn("/bin/sh", &["-c", script], &[], "/", pipes, None).unwrap();
        assert!(child.stderr.is_none());
        let mut input = child.stdin.unwrap();
        input.write_all(b"hello\n").unwrap();
        let mut out = Vec::new();
        let mut master = child.stdout;
        // The slave's last descriptor closes with the command: the master then reads EIO.
        let mut buf = [0u8; 4096];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        let out = String::from_utf8_lossy(&out).replace("\r\n", "\n");
        let code = match waitpid(Pid::from_raw(child.pid), None).unwrap() {
            WaitStatus::Exited(_, code) => code,
            other => panic!("{other:?}"),
        };
        assert_eq!(code, 4);
        // (The terminal echoes input as it arrives: before the command's first line here.)
        assert!(out.lines().any(|l| l.starts_with("/dev/pts/")), "{out}");
        assert!(out.contains("33 101\n") && out.contains("all-three\n") && out.contains("err\n"), "{out}");
        // The terminal echoes the input, and the command read it.
        assert!(out.contains("hello\n") && out.contains("got hello\n"), "{out}");
    }

    #[test]
    fn a_failed_start_is_an_error_with_its_cause() {
        let no_program = spawn("/nonexistent/sh", &["-c", "true"], &[], "/", Pipes::new(false).unwrap(), None).err().unwrap();
        assert_eq!(no_program.kind(), io::ErrorKind::NotFound);
        let no_dir = spawn("/bin/sh", &["-c", "true"], &[], "/nonexistent", Pipes::new(false).unwrap(), None).err().unwrap();
        assert_eq!(no_dir.kind(), io::ErrorKind::NotFound);
    }
}
