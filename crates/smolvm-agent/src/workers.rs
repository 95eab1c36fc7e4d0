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

/// Run `job` on an idle thread, or on a new one if none is idle.
pub fn run(job: Job) {
    let job = match idle().pop() {
        Some(worker) => match worker.send(job) {
            Ok(()) => return,
            Err(mpsc::SendError(job)) => job,
        },
        None => job,
    };
    std::thread::spawn(move || work(job));
}

/// Start an idle thread (boot: the first command finds it).
pub fn start() {
    std::thread::spawn(|| work(Box::new(|| {})));
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
        run(Box::new(move || t.send(std::thread::current().id()).unwrap()));
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // Let the thread come back to the idle list.
        while idle().is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        run(Box::new(move || tx.send(std::thread::current().id()).unwrap()));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), first);
    }
}
