//! Child reaping and signals.
//!
//! As PID 1 the agent inherits every orphan, so it must reap with `waitpid(-1)`; that would steal
//! the exit status of the commands it runs itself. So all waiting happens here: the exec code
//! registers each child's pid and receives its status through a pipe, which it can poll along
//! with the child's output.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Children of running execs: pid -> the pipe their exit code is written to (4 bytes, native
/// endian; then the pipe closes).
type Waiters = HashMap<i32, File>;

fn waiters() -> &'static Mutex<Waiters> {
    static W: OnceLock<Mutex<Waiters>> = OnceLock::new();
    W.get_or_init(Default::default)
}

fn signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // What busybox's `halt` and `poweroff` send to init (`reboot` sends SIGTERM).
    set.add(Signal::SIGUSR1);
    set.add(Signal::SIGUSR2);
    set
}

pub fn block_signals() {
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals()), None);
}

/// Hold this while spawning and registering a child, so the reaper cannot see the child's exit
/// before its waiter is in the map.
pub fn lock() -> MutexGuard<'static, Waiters> {
    waiters().lock().unwrap_or_else(|e| e.into_inner())
}

pub fn start(pid1: bool) {
    std::thread::spawn(move || loop {
        let Ok(sig) = signals().wait() else { continue };
        match sig {
            Signal::SIGCHLD => reap(),
            Signal::SIGTERM | Signal::SIGINT | Signal::SIGUSR1 | Signal::SIGUSR2 if pid1 => crate::server::shutdown_now(),
            Signal::SIGTERM | Signal::SIGINT => std::process::exit(0),
            _ => {}
        }
    });
}

/// Reap under the waiters' lock: between a `waitpid` and its delivery a new command could
/// otherwise be given the reaped pid and take its exit code.
///
/// The status is decoded here, not by nix: nix knows no real-time signals and fails a child
/// killed by one (`kill -34 $$`) after the kernel has reaped it, whose exec then never ended.
fn reap() {
    let mut waiters = lock();
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes the status through a pointer valid for the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        // 0: none has exited; -1: no children left.
        if pid <= 0 {
            return;
        }
        if libc::WIFEXITED(status) {
            deliver(&mut waiters, pid, libc::WEXITSTATUS(status));
        } else if libc::WIFSIGNALED(status) {
            deliver(&mut waiters, pid, 128 + libc::WTERMSIG(status));
        }
    }
}

/// The 4 bytes go into an empty pipe: the write never blocks.
fn deliver(waiters: &mut Waiters, pid: i32, code: i32) {
    if let Some(mut pipe) = waiters.remove(&pid) {
        let _ = pipe.write_all(&code.to_ne_bytes());
    }
}
