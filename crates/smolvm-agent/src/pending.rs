//! Set-up that runs on threads of its own while the agent already answers the host, and that
//! commands must not overtake: they `wait` for all of it. (Under TCG each piece costs
//! milliseconds; on the way to the first command they add up.)

use std::sync::{Condvar, Mutex, OnceLock};

fn state() -> &'static (Mutex<u32>, Condvar) {
    static S: OnceLock<(Mutex<u32>, Condvar)> = OnceLock::new();
    S.get_or_init(Default::default)
}

/// Run `work` on a thread of its own.
pub fn spawn(work: impl FnOnce() + Send + 'static) {
    *state().0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    let finish = || {
        let (pending, done) = state();
        *pending.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        done.notify_all();
    };
    crate::workers::on_thread_or_here(
        move || {
            work();
            finish();
        },
        crate::workers::thread,
    );
}

/// Set-up that failed in a way every command must hear of (a host directory the sandbox was
/// given that could not be mounted): commands then fail with this, instead of running without it.
fn failures() -> &'static Mutex<Vec<String>> {
    static F: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    F.get_or_init(Default::default)
}

pub fn fail(why: String) {
    crate::log(&why);
    failures().lock().unwrap_or_else(|e| e.into_inner()).push(why);
}

/// What `fail` recorded, joined; None when all went well.
pub fn failure() -> Option<String> {
    let f = failures().lock().unwrap_or_else(|e| e.into_inner());
    (!f.is_empty()).then(|| f.join("; "))
}

/// Block until no set-up is in progress.
pub fn wait() {
    let (pending, done) = state();
    let mut n = pending.lock().unwrap_or_else(|e| e.into_inner());
    while *n > 0 {
        n = done.wait(n).unwrap_or_else(|e| e.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn waiting_covers_work_still_in_progress() {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            d.store(true, Ordering::SeqCst);
        });
        wait();
        assert!(done.load(Ordering::SeqCst));
        // Nothing pending: returns at once.
        wait();
    }
}
