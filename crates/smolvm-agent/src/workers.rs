//! Threads kept for the next command. Starting a thread costs milliseconds under TCG (most on
//! a freshly booted guest, on the way to the first command), so a thread whose exec is done
//! waits for the next one instead of exiting.

use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, MutexGuard, OnceLock};

pub type Job = Box<dyn FnOnce() + Send>;

/// Idle threads kept; more finished ones exit.
const KEEP: usize = 4;

fn idle() -> MutexGuard<'static, Vec<Sender<Job>>> {
    static IDLE: OnceLock<Mutex<Vec<Sender<Job>>>> = OnceLock::new();
    IDLE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `job` on an idle thread, or on a new one if none is idle. A thread that cannot be made
/// (a command used up the guest's threads or memory) is an error for this job alone: the
/// agent is PID 1, and `std::thread::spawn` would panic and take the VM down with it.
pub fn run(job: Job) -> std::io::Result<()> {
    let job = match idle().pop() {
        Some(worker) => match worker.send(job) {
            Ok(()) => return Ok(()),
            Err(mpsc::SendError(job)) => job,
        },
        None => job,
    };
    thread(move || work(job))
}

/// `job` on the thread `start` gives it, or here, on the caller's, where none can be had.
/// (`start` consumes what it is given even when it fails, so the job waits in a shared slot
/// that exactly one side empties.)
pub fn on_thread_or_here(job: impl FnOnce() + Send + 'static, start: impl FnOnce(Job) -> std::io::Result<()>) {
    let slot = std::sync::Arc::new(Mutex::new(Some(job)));
    let theirs = slot.clone();
    let take = |s: &Mutex<Option<_>>| s.lock().unwrap_or_else(|e| e.into_inner()).take();
    if start(Box::new(move || take(&theirs).into_iter().for_each(|job| job()))).is_err() {
        take(&slot).into_iter().for_each(|job| job());
    }
}

/// A thread of its own for `f`; an error instead of a panic where none can be made.
pub fn thread(f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new().spawn(f).map(|_| ())
}

/// Start an idle thread (boot: the first command finds it; without it, it makes one).
pub fn start() {
    let _ = thread(|| work(Box::new(|| {})));
}

fn work(first: Job) {
    first();
    let (tx, rx) = mpsc::channel::<Job>();
    loop {
        {
            let mut idle = idle();
            if idle.len() >= KEEP {
                return;
            }
            idle.push(tx.clone());
        }
        match rx.recv() {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_finished_thread_takes_the_next_job() {
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        run(Box::new(move || t.send(std::thread::current().id()).unwrap())).unwrap();
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // Let the thread come back to the idle list.
        while idle().is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        run(Box::new(move || tx.send(std::thread::current().id()).unwrap())).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), first);
    }
}
