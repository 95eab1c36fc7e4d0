//! Output windows: a stream sends at most `proto::WINDOW` bytes of output that its host reader
//! has not granted back with `Credit`. Without them a command that writes faster than its
//! reader takes in (`yes`, a download to a slow consumer) would pile its output up in the host.
//! A sender that finds its window used up waits; a command then blocks on its full pipe, as it
//! would on a slow terminal.

use crate::server::Writer;
use smolvm_proto::Reply;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

pub struct Window {
    /// (bytes that may still be sent, closed: nobody reads any more).
    state: Mutex<(i64, bool)>,
    granted: Condvar,
}

/// What waiting for room in a window ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Room {
    /// Send.
    Open,
    /// Nobody reads this stream any more (cancelled, the host went away): drop the output.
    Closed,
    /// The deadline passed first.
    Deadline,
}

fn windows() -> MutexGuard<'static, HashMap<u32, Arc<Window>>> {
    static W: OnceLock<Mutex<HashMap<u32, Arc<Window>>>> = OnceLock::new();
    W.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

impl Window {
    pub(crate) fn new(size: usize) -> Window {
        Window { state: Mutex::new((size as i64, false)), granted: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, (i64, bool)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until some room is left (or the window closes, or `deadline` passes), then take
    /// `n` bytes of it. A chunk may overshoot what is left: the reader allows one chunk of slack.
    pub fn take(&self, n: usize, deadline: Option<Instant>) -> Room {
        let mut s = self.lock();
        loop {
            if s.1 {
                return Room::Closed;
            }
            if s.0 > 0 {
                s.0 -= n as i64;
                return Room::Open;
            }
            s = match deadline {
                None => self.granted.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Room::Deadline;
                    }
                    self.granted.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
    }

    /// Send an output reply on `stream` once the host has room for it (waiting if need be).
    /// False, and nothing sent, once nobody reads the stream any more (a cancel).
    pub fn send(&self, w: &Writer, stream: u32, reply: &Reply) -> bool {
        if self.take(reply.window_bytes(), None) != Room::Open {
            return false;
        }
        w.send(stream, reply);
        true
    }

    /// Whether the window has no room left now (the sender would wait).
    pub fn is_full(&self) -> bool {
        let s = self.lock();
        !s.1 && s.0 <= 0
    }

    fn grant(&self, n: u32) {
        self.lock().0 += i64::from(n);
        self.granted.notify_all();
    }

    fn close(&self) {
        self.lock().1 = true;
        self.granted.notify_all();
    }
}

/// The window of a stream that is about to send output; `forget` it when the stream ends.
pub fn open(stream: u32) -> Arc<Window> {
    let w = Arc::new(Window::new(smolvm_proto::WINDOW));
    // A new host session may reuse a stream id: the old sender, if any, has nobody to send to.
    if let Some(old) = windows().insert(stream, w.clone()) {
        old.close();
    }
    w
}

/// Drop the stream's window, if it is still this one.
pub fn forget(stream: u32, w: &Arc<Window>) {
    let mut all = windows();
    if all.get(&stream).is_some_and(|cur| Arc::ptr_eq(cur, w)) {
        all.remove(&stream);
    }
}

pub fn credit(stream: u32, n: u32) {
    if let Some(w) = windows().get(&stream) {
        w.grant(n);
    }
}

/// The stream's reader is gone (a cancel): its sender stops waiting and drops what is left.
pub fn close(stream: u32) {
    if let Some(w) = windows().remove(&stream) {
        w.close();
    }
}

/// The host went away or a new one greeted: every sender stops waiting.
pub fn close_all() {
    for (_, w) in windows().drain() {
        w.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_sender_waits_for_credit_and_a_close_releases_it() {
        let w = Arc::new(Window::new(100));
        assert_eq!(w.take(60, None), Room::Open);
        // 40 left: a chunk larger than that still goes (one chunk of slack), then it is full.
        assert_eq!(w.take(64, None), Room::Open);
        assert!(w.is_full());
        let soon = Instant::now() + Duration::from_millis(50);
        assert_eq!(w.take(10, Some(soon)), Room::Deadline);
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.take(10, None));
        std::thread::sleep(Duration::from_millis(50));
        w.grant(30);
        assert_eq!(t.join().unwrap(), Room::Open);
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.take(10, None));
        std::thread::sleep(Duration::from_millis(50));
        w.close();
        assert_eq!(t.join().unwrap(), Room::Closed);
    }

    #[test]
    fn credit_reaches_the_streams_current_window_only() {
        let old = open(7);
        let new = open(7);
        // The reused id closed the old sender's window.
        assert_eq!(old.take(1, None), Room::Closed);
        assert_eq!(new.take(smolvm_proto::WINDOW, None), Room::Open);
        assert!(new.is_full());
        credit(7, 5);
        assert!(!new.is_full());
        forget(7, &old);
        credit(7, 5);
        assert_eq!(new.take(10, None), Room::Open);
        assert!(new.is_full());
        forget(7, &new);
        credit(7, 1_000_000);
        assert!(new.is_full(), "a forgotten window takes no credit");
    }
}
