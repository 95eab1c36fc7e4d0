//! A multiplexed connection speaking the smolvm frame protocol over a Unix stream: to the guest
//! agent (from the supervisor) and to the supervisor (from clients), so that the library talks
//! to both the same way.

use crate::error::{Error, Result};
use smolvm_proto::{self as proto, ErrorKind, Reply, Request};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

type Routes = Arc<Mutex<HashMap<u32, Route>>>;

/// Where one stream's replies go, and how many bytes of its output are held on this side
/// (received, not yet granted back): the peer may not send more than its window beyond that.
/// Nor may it grant back more input than was sent on the stream (`input`: sent, not yet
/// granted), nor leave more than `MAX_QUEUED` replies waiting for the reader: else a guest that
/// took over the agent's channel could make this process hold as much of a client's input, or
/// as many frames, as it liked. Grants of input wait merged (`credit`: one queued `Credit`
/// stands for all granted since the reader last took one), so they take one place in the queue.
struct Route {
    tx: mpsc::UnboundedSender<Reply>,
    held: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
    credit: Arc<AtomicUsize>,
    input: usize,
}

impl Route {
    fn new(tx: mpsc::UnboundedSender<Reply>) -> Route {
        Route { tx, held: Default::default(), queued: Default::default(), credit: Default::default(), input: 0 }
    }
}

/// What a stream's reader is told when its peer broke the flow control (and the stream ended).
pub const FLOW_BROKEN: &str =
    "the guest broke the channel's flow control (output beyond its window, or a grant of input never sent); the request was cancelled";

/// Replies one stream may have waiting for its reader, where output frames count at least
/// `proto::FRAME_COST` against the window: its output frames, one merged grant and its end.
const MAX_QUEUED: usize = (proto::WINDOW + proto::CHUNK) / proto::FRAME_COST + 2;

/// What a stream's reply counts against its window: `window_bytes`, or, with an agent that
/// does not say it counts so (`CAP_FRAME_COST`), the payload's bytes alone.
fn cost(reply: &Reply, frame_cost: bool) -> usize {
    match frame_cost {
        true => reply.window_bytes(),
        false => reply.payload_len(),
    }
}

pub struct Conn {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    routes: Routes,
    next: AtomicU32,
    closed: Arc<AtomicBool>,
    /// Wakes `closed()` once `closed` is set.
    gone: Arc<tokio::sync::Notify>,
    /// When the peer last sent a frame (or, if later, when a request began waiting on it after
    /// none did), in milliseconds after `born`: a peer that stays silent while requests wait
    /// on it may be gone without closing the channel (a halted guest).
    heard: Arc<AtomicU64>,
    born: std::time::Instant,
    /// The socket's descriptor, kept open by `writer` for as long as this lives.
    fd: std::os::fd::RawFd,
    /// Output frames count at least `FRAME_COST` (see `cost`); off for an older agent.
    frame_cost: Arc<AtomicBool>,
}

/// One request's replies. Dropping it before its terminal reply cancels the request (an exec's
/// process group is killed): nobody is left to read what it produces. Late replies are dropped.
/// Output is granted back (`Credit`) as it is taken, so a peer sends only as fast as this
/// stream's reader reads (`proto::WINDOW`).
pub struct Stream {
    pub id: u32,
    conn: Arc<Conn>,
    rx: mpsc::UnboundedReceiver<Reply>,
    held: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
    credit: Arc<AtomicUsize>,
    /// Output taken by the reader and not yet granted back.
    taken: usize,
    done: bool,
}

/// Read one frame body from an async reader; `Ok(None)` on a clean end of stream.
pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R, body: &mut Vec<u8>) -> Result<Option<()>> {
    let mut header = [0u8; 4];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Error::Io { context: "reading a frame".into(), source: e }),
    }
    let len = proto::frame_len(header).map_err(|e| Error::Guest(e.to_string()))?;
    body.resize(len, 0);
    r.read_exact(body).await.map_err(|e| Error::Io { context: "reading a frame".into(), source: e })?;
    Ok(Some(()))
}

/// How much a restored guest may send before the marker: what its outgoing queue held, the
/// rest of the frame it was writing, and whole frames of the old session written before the
/// greeting reached it (each stream's window at most). Past this it is taken to be lost; the
/// greeting's own time bound usually comes first.
const BEFORE_MARKER: usize = 64 << 20;

/// What came before the first frame of an agent connection.
enum Sync {
    /// The marker, and what was read past it (the start of the frames that follow).
    Marker(Vec<u8>),
    /// An agent older than the marker answered the greeting at once with a whole frame, now in
    /// the body buffer: its `Hello` names its version, which the greeting then reports.
    OldAgent,
    Lost,
}

/// How long a client waits for a supervisor's preamble. It is written on accept, on the
/// supervisor's one runtime thread, which a write to the state database can hold for up to its
/// busy timeout (10 s) while another process writes: longer than that.
const PREAMBLE_BOUND: Duration = Duration::from_secs(15);

/// Reads up to and including `marker`, dropping what comes before it (see `Request::Hello`).
async fn sync<R: AsyncReadExt + Unpin>(r: &mut R, marker: &[u8; 16], body: &mut Vec<u8>) -> Sync {
    // Reading this many bytes cannot wait for more than the agent sends, and holds the whole
    // answer of an older agent, which sends no marker.
    const SURELY_THERE: usize = 16 + proto::HELLO_MIN_FRAME;
    let mut head = [0u8; 4];
    if r.read_exact(&mut head).await.is_err() {
        return Sync::Lost;
    }
    let mut prefix = head.to_vec();
    if let Ok(len) = proto::frame_len(head) {
        if 4 + len <= SURELY_THERE {
            body.resize(len, 0);
            if r.read_exact(body).await.is_err() {
                return Sync::Lost;
            }
            if matches!(proto::decode::<Reply>(body), Ok((_, Reply::Hello { version, .. })) if version != proto::PROTOCOL_VERSION) {
                return Sync::OldAgent;
            }
            prefix.extend_from_slice(body);
        }
    }
    let mut last = [0u8; 16];
    let mut push = |b: u8, seen: usize| {
        last.copy_within(1.., 0);
        last[15] = b;
        seen >= marker.len() && last == *marker
    };
    for (i, &b) in prefix.iter().enumerate() {
        if push(b, i + 1) {
            return Sync::Marker(prefix[i + 1..].to_vec());
        }
    }
    for seen in prefix.len() + 1..=BEFORE_MARKER {
        let Ok(b) = r.read_u8().await else { return Sync::Lost };
        if push(b, seen) {
            return Sync::Marker(Vec::new());
        }
    }
    Sync::Lost
}

/// Writes one whole frame. A caller that gives up half way through (a timeout around a send on
/// a full socket) would leave the peer reading the next frame from the middle of this one: the
/// connection is shut instead, and every stream on it ends.
async fn write_frame(w: &mut OwnedWriteHalf, bytes: &[u8]) -> std::io::Result<()> {
    struct Unfinished(Option<std::os::fd::RawFd>);
    impl Drop for Unfinished {
        fn drop(&mut self) {
            if let Some(fd) = self.0 {
                // SAFETY: shutdown on a descriptor the connection still owns (its write half
                // is borrowed for as long as this guard lives); it closes nothing.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
    }
    let mut unfinished = Unfinished(Some(std::os::fd::AsRawFd::as_raw_fd(w.as_ref())));
    let sent = w.write_all(bytes).await;
    unfinished.0 = None;
    sent
}

/// The connection's writer, held: nothing else is sent until this goes (see [`Conn::hold`]).
pub struct Held {
    _writer: tokio::sync::OwnedMutexGuard<OwnedWriteHalf>,
}

impl Conn {
    pub fn new(stream: UnixStream) -> Arc<Conn> {
        Conn::start(stream, None)
    }

    /// A connection to an agent greeted with `Request::Hello { sync: Some(marker) }`: its
    /// first frame comes after the marker.
    pub fn new_synced(stream: UnixStream, marker: [u8; 16]) -> Arc<Conn> {
        Conn::start(stream, Some(marker))
    }

    fn start(stream: UnixStream, marker: Option<[u8; 16]>) -> Arc<Conn> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let (read, write) = stream.into_split();
        let routes: Routes = Default::default();
        let closed = Arc::new(AtomicBool::new(false));
        let gone = Arc::new(tokio::sync::Notify::new());
        let (heard, born) = (Arc::new(AtomicU64::new(0)), std::time::Instant::now());
        let frame_cost = Arc::new(AtomicBool::new(true));
        let counting = frame_cost.clone();
        let conn = Arc::new(Conn {
            writer: Arc::new(tokio::sync::Mutex::new(write)),
            routes: routes.clone(),
            next: AtomicU32::new(1),
            closed: closed.clone(),
            gone: gone.clone(),
            heard: heard.clone(),
            born,
            fd,
            frame_cost,
        });
        let this = Arc::downgrade(&conn);
        tokio::spawn(async move {
            let mut reader = BufReader::with_capacity(256 * 1024, read);
            let mut body = Vec::new();
            let (mut synced, mut have_frame, mut past_marker) = (true, false, Vec::new());
            if let Some(m) = &marker {
                match sync(&mut reader, m, &mut body).await {
                    Sync::Marker(rest) => past_marker = rest,
                    Sync::OldAgent => have_frame = true,
                    Sync::Lost => {
                        tracing::warn!("the agent's channel never carried the greeting's sync marker; closing it");
                        synced = false;
                    }
                }
            }
            let mut reader = std::io::Cursor::new(past_marker).chain(reader);
            while synced && (std::mem::take(&mut have_frame) || matches!(read_frame(&mut reader, &mut body).await, Ok(Some(())))) {
                heard.store(born.elapsed().as_millis() as u64, Ordering::Relaxed);
                let Ok((id, reply)) = proto::decode::<Reply>(&body) else {
                    tracing::warn!("undecodable reply; closing the connection");
                    break;
                };
                // An error's words may come from the guest, which chooses them: none of them
                // may act on a terminal they are printed on.
                let reply = match reply {
                    Reply::Error { kind, message } => {
                        Reply::Error { kind, message: crate::error::printable(&crate::error::cut(&message, 64 * 1024), 4096) }
                    }
                    other => other,
                };
                let mut routes = routes.lock().unwrap_or_else(|e| e.into_inner());
                let mut terminal = reply.is_terminal();
                if let Some(route) = routes.get_mut(&id) {
                    let frame_cost = counting.load(Ordering::SeqCst);
                    let n = cost(&reply, frame_cost);
                    let over_window = route.held.fetch_add(n, Ordering::SeqCst) + n > proto::WINDOW + proto::CHUNK;
                    // (An older agent's tiny frames are not bounded by count: it may send many.)
                    let queued = route.queued.load(Ordering::SeqCst);
                    let over_queue = frame_cost && queued >= MAX_QUEUED;
                    // A grant of input never sent. (One of nothing, which an agent sends for
                    // empty input, means nothing.)
                    let (false_credit, merged) = match reply {
                        Reply::Credit(0) => (false, true),
                        Reply::Credit(c) if c as usize > route.input => (true, false),
                        Reply::Credit(c) => {
                            route.input -= c as usize;
                            // Queued only where no grant waits already; the reader takes all.
                            (false, route.credit.fetch_add(c as usize, Ordering::SeqCst) > 0)
                        }
                        _ => (false, false),
                    };
                    if over_window || over_queue || false_credit {
                        // Only a peer that ignores the protocol gets here (a guest that took over
                        // the agent's channel): its stream ends rather than fill this process,
                        // and what runs for it is cancelled; its reader is told why.
                        tracing::warn!(
                            "stream {id} broke its flow control (sent beyond its window, or granted input it was not sent); ending it"
                        );
                        terminal = true;
                        route.queued.fetch_add(1, Ordering::SeqCst);
                        let _ = route.tx.send(Reply::error(ErrorKind::Failed, FLOW_BROKEN));
                        if let Some(conn) = this.upgrade() {
                            tokio::spawn(async move {
                                let _ = conn.send_on(id, &Request::Cancel).await;
                            });
                        }
                    } else if !merged {
                        route.queued.fetch_add(1, Ordering::SeqCst);
                        let _ = route.tx.send(reply);
                    }
                }
                if terminal {
                    routes.remove(&id);
                }
            }
            closed.store(true, Ordering::SeqCst);
            gone.notify_waiters();
            // Dropping every sender wakes every waiting stream with `None`.
            routes.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        conn
    }

    /// A client's connection to the supervisor of sandbox `id`, once its preamble says it
    /// speaks this build's protocol (see `proto::SUPERVISOR_MAGIC`).
    pub async fn connect(path: &std::path::Path, id: &str) -> Result<Arc<Conn>> {
        let mut s = UnixStream::connect(path).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => Error::Host(format!(
                "cannot reach the sandbox at {}: permission denied (its supervisor runs as another user; use that user, or a data directory of your own)",
                path.display()
            )),
            _ => Error::Io { context: format!("connecting to {}", path.display()), source: e },
        })?;
        // The supervisor writes it as it accepts; one that does not within the bound is as
        // good as gone.
        let mut preamble = [0u8; 8];
        let read = tokio::time::timeout(PREAMBLE_BOUND, s.read_exact(&mut preamble)).await;
        let lost = |why: String| Error::Io {
            context: format!("connecting to {}", path.display()),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionAborted, why),
        };
        match read {
            Ok(Ok(_)) => match proto::preamble_version(preamble) {
                Some(v) if v == proto::PROTOCOL_VERSION => Ok(Conn::new(s)),
                Some(theirs) => Err(Error::OtherBuild { id: id.to_string(), theirs }),
                None => Err(lost("the socket's server is no smolvm supervisor".into())),
            },
            Ok(Err(e)) => Err(lost(format!("the supervisor closed the connection ({e})"))),
            Err(_) => Err(lost(format!("no answer within {} s", PREAMBLE_BOUND.as_secs()))),
        }
    }

    /// Count output frames as the peer does: by `window_bytes` (this build's agent says so in its
    /// Hello, and supervisors and clients of this build do), or by their bytes alone (an older
    /// agent's, in a snapshot made before).
    pub fn count_frames(&self, by_cost: bool) {
        self.frame_cost.store(by_cost, Ordering::SeqCst);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Whether the peer has hung up, asked of the socket itself: a runtime that runs only
    /// during calls (Python's) has its reader notice only when it next runs, and a handle whose
    /// supervisor was replaced must not send its next request into the old one's socket.
    pub fn peer_gone(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        if self.is_closed() {
            return true;
        }
        // SAFETY: `fd` is the socket `self.writer` owns, open for as long as `self` lives.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        // (A Unix socket whose peer closed polls as hung up.)
        let mut fds = [PollFd::new(fd, PollFlags::empty())];
        let hung_up = PollFlags::POLLHUP | PollFlags::POLLERR;
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0 && fds[0].revents().is_some_and(|r| r.intersects(hung_up)))
    }

    /// Waits until the connection is closed (the peer went, or broke the protocol).
    pub async fn closed(&self) {
        loop {
            let notified = self.gone.notified();
            tokio::pin!(notified);
            // (Registered before the flag is read: a close in between still wakes it.)
            notified.as_mut().enable();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// How long the peer has sent nothing while at least one request waits on it; zero when
    /// nothing waits (a quiet peer with nothing to say is not a silent one).
    pub fn silent_for(&self) -> std::time::Duration {
        if self.routes.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            return std::time::Duration::ZERO;
        }
        let heard = std::time::Duration::from_millis(self.heard.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(heard)
    }

    pub async fn send_on(&self, id: u32, req: &Request) -> Result<()> {
        let bytes = proto::encode(id, req).map_err(|e| Error::Guest(e.to_string()))?;
        let mut writer = self.writer.lock().await;
        // Counted once it is sure to go, before it goes: the peer's grant for it may come back
        // at once.
        if let Request::Stdin(d) = req {
            if let Some(route) = self.routes.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&id) {
                route.input += d.len();
            }
        }
        let sent = write_frame(&mut writer, &bytes).await;
        drop(writer);
        if sent.is_err() {
            // The other end is gone (the reader may not have noticed yet).
            self.closed.store(true, Ordering::SeqCst);
            self.gone.notify_waiters();
        }
        sent.map_err(|e| Error::Io { context: "sending a request".into(), source: e })
    }

    /// `send_on` on a task of its own: a caller that stops waiting (a timeout, an early end)
    /// leaves the frame to finish instead of cutting it off half written, which would shut the
    /// connection and every stream on it.
    pub async fn send_detached(self: &Arc<Conn>, id: u32, req: Request) -> Result<()> {
        let conn = self.clone();
        tokio::spawn(async move { conn.send_on(id, &req).await }).await.map_err(|e| Error::Host(e.to_string()))?
    }

    /// Holds the writer once the peer has read everything sent before (a `Ping` it answers
    /// in order). An agent whose VM is stopped while this is held (paused, saved) has no frame
    /// of ours half read, whose rest a copy restored from the snapshot would take from its new
    /// host's first bytes. Within `bound`: `None` if another send holds the writer that long
    /// (the peer reads nothing); held without that promise if the ping cannot go or is not
    /// answered in time (a wedged agent).
    pub async fn hold(self: &Arc<Conn>, bound: std::time::Duration) -> Option<Held> {
        let deadline = tokio::time::Instant::now() + bound;
        let mut w = tokio::time::timeout_at(deadline, self.writer.clone().lock_owned()).await.ok()?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Route::new(tx));
        let ping = proto::encode(id, &Request::Ping).expect("a ping encodes");
        // Only when it goes at once, so that giving up (the socket full: the agent reads
        // nothing) never leaves half a ping, which would shut the connection. A write this small
        // goes whole or not at all.
        let tried = tokio::time::timeout_at(deadline, async {
            loop {
                w.as_ref().writable().await?;
                match w.try_write(&ping) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    other => return other,
                }
            }
        });
        let sent = match tried.await {
            Ok(Ok(n)) if n == ping.len() => true,
            Ok(Ok(n)) => write_frame(&mut w, &ping[n..]).await.is_ok(),
            _ => false,
        };
        if sent {
            let _ = tokio::time::timeout_at(deadline, rx.recv()).await;
        }
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        Some(Held { _writer: w })
    }

    /// Open a stream with its first request.
    pub async fn open(self: &Arc<Conn>, req: &Request) -> Result<Stream> {
        if self.is_closed() {
            return Err(Error::Guest("connection closed".into()));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let route = Route::new(tx);
        let (held, queued, credit) = (route.held.clone(), route.queued.clone(), route.credit.clone());
        {
            let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            // Waiting starts now: silence before it is not the peer's.
            if routes.is_empty() {
                self.heard.store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            routes.insert(id, route);
        }
        let stream = Stream { id, conn: self.clone(), rx, held, queued, credit, taken: 0, done: false };
        self.send_on(id, req).await?;
        Ok(stream)
    }

    /// A request whose answer is a single reply.
    pub async fn call(self: &Arc<Conn>, req: &Request) -> Result<Reply> {
        let mut s = self.open(req).await?;
        s.recv().await.ok_or_else(|| Error::Guest("connection closed before the reply".into()))
    }
}

impl Stream {
    pub async fn recv(&mut self) -> Option<Reply> {
        let reply = loop {
            let reply = self.rx.recv().await;
            if reply.is_some() {
                self.queued.fetch_sub(1, Ordering::SeqCst);
            }
            match reply {
                // The grants merged since the last one taken (none: one taken just before).
                Some(Reply::Credit(_)) => match self.credit.swap(0, Ordering::SeqCst) {
                    0 => continue,
                    n => break Some(Reply::Credit(n.min(u32::MAX as usize) as u32)),
                },
                other => break other,
            }
        };
        self.done |= reply.as_ref().is_none_or(Reply::is_terminal);
        self.taken += reply.as_ref().map_or(0, |r| cost(r, self.conn.frame_cost.load(Ordering::SeqCst)));
        if self.taken >= proto::CREDIT_STEP && !self.done {
            let grant = std::mem::take(&mut self.taken);
            self.held.fetch_sub(grant, Ordering::SeqCst);
            // On a task of its own: a caller that gives up on this future (a timeout) must not
            // cut a frame in half.
            let (conn, id) = (self.conn.clone(), self.id);
            tokio::spawn(async move {
                let _ = conn.send_on(id, &Request::Credit(grant as u32)).await;
            });
        }
        reply
    }

    pub async fn send(&self, req: &Request) -> Result<()> {
        self.conn.send_on(self.id, req).await
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.conn.routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
        if !self.done && !self.conn.is_closed() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (conn, id) = (self.conn.clone(), self.id);
                rt.spawn(async move {
                    let _ = conn.send_on(id, &Request::Cancel).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client learns the supervisor's protocol before it sends anything; a socket whose
    /// server says no preamble, or another build's, gets no request.
    #[tokio::test]
    async fn a_client_reads_the_supervisors_protocol_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let mut other = proto::supervisor_preamble();
        other[4..].copy_from_slice(&(proto::PROTOCOL_VERSION + 1).to_le_bytes());
        let serve = tokio::spawn(async move {
            let mut heard = vec![];
            for answer in [proto::supervisor_preamble().to_vec(), other.to_vec(), b"HTTP/1.1".to_vec(), vec![]] {
                let (mut s, _) = listener.accept().await.unwrap();
                s.write_all(&answer).await.unwrap();
                s.shutdown().await.unwrap();
                let mut got = vec![];
                let _ = s.read_to_end(&mut got).await;
                heard.push(got);
            }
            heard
        });
        let conn = Conn::connect(&path, "a").await.unwrap();
        drop(conn);
        let e = Conn::connect(&path, "a").await.err().unwrap();
        assert!(matches!(e, Error::OtherBuild { ref id, theirs } if id == "a" && theirs == proto::PROTOCOL_VERSION + 1), "{e}");
        assert!(e.recovery().unwrap().contains("smolvm sandbox stop a"));
        let e = Conn::connect(&path, "a").await.err().unwrap();
        assert!(e.full_message().contains("no smolvm supervisor"), "{}", e.full_message());
        let e = Conn::connect(&path, "a").await.err().unwrap();
        assert!(e.full_message().contains("the supervisor closed the connection"), "{}", e.full_message());
        let heard = serve.await.unwrap();
        assert!(heard.iter().all(Vec::is_empty), "{heard:?}");
    }

    async fn request(peer: &mut UnixStream) -> (u32, Request) {
        let mut body = Vec::new();
        read_frame(peer, &mut body).await.unwrap().expect("a request");
        proto::decode(&body).unwrap()
    }

    async fn send(peer: &mut UnixStream, id: u32, reply: &Reply) {
        peer.write_all(&proto::encode(id, reply).unwrap()).await.unwrap();
    }

    /// A `Ping` call on its own task, so the test can play the peer meanwhile.
    fn ping_in_background(conn: &Arc<Conn>) -> tokio::task::JoinHandle<Result<Reply>> {
        let conn = conn.clone();
        tokio::spawn(async move { conn.call(&Request::Ping).await })
    }

    /// A peer that hung up is seen at once, before the reader has run (Python's runtime runs
    /// only during calls): a handle then takes the current supervisor instead of the old one.
    #[tokio::test]
    async fn a_peer_that_hung_up_is_seen_without_the_reader() {
        let (ours, peer) = UnixStream::pair().unwrap();
        let conn = Conn::new(ours);
        assert!(!conn.peer_gone());
        drop(peer);
        assert!(!conn.is_closed(), "the reader ran: this shows nothing");
        assert!(conn.peer_gone());
    }

    #[tokio::test]
    async fn what_a_restored_agent_sends_before_the_marker_is_skipped() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let marker = *b"\x01sync-markers\xfe\x00\x7f";
        let conn = Conn::new_synced(ours, marker);
        let call = ping_in_background(&conn);
        let (id, _) = request(&mut peer).await;
        // The rest of a frame the snapshot caught half written (its middle reads as a length),
        // a first byte of the marker, then the marker and the answer.
        let mut tail = vec![0xaa; 300];
        tail.extend_from_slice(&64u32.to_le_bytes());
        tail.push(marker[0]);
        tail.extend_from_slice(&marker);
        peer.write_all(&tail).await.unwrap();
        send(&mut peer, id, &Reply::Pong).await;
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), call).await;
        assert!(matches!(got, Ok(Ok(Ok(Reply::Pong)))), "{got:?}");
    }

    #[tokio::test]
    async fn a_short_tail_that_reads_as_a_small_frame_is_skipped_and_what_follows_kept() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let marker = [3u8; 16];
        let conn = Conn::new_synced(ours, marker);
        let call = ping_in_background(&conn);
        let (id, _) = request(&mut peer).await;
        // Its first four bytes say 40 more follow: they end inside the answer after the marker.
        let mut bytes = vec![40, 0, 0, 0, 0xaa, 0xbb];
        bytes.extend_from_slice(&marker);
        let capabilities = ["ping", "exec", "env", "files", "shutdown"].map(String::from).to_vec();
        let answer = Reply::Hello { version: proto::PROTOCOL_VERSION, agent_version: "0.1.0".into(), capabilities };
        bytes.extend(proto::encode(id, &answer).unwrap());
        assert!(bytes.len() - 6 >= 16 + proto::HELLO_MIN_FRAME);
        peer.write_all(&bytes).await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), call).await;
        assert!(matches!(got, Ok(Ok(Ok(Reply::Hello { .. })))), "{got:?}");
    }

    #[tokio::test]
    async fn an_agent_older_than_the_marker_is_heard_so_its_version_can_be_named() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let conn = Conn::new_synced(ours, [9; 16]);
        let call = ping_in_background(&conn);
        let (id, _) = request(&mut peer).await;
        let old = Reply::Hello {
            version: 4,
            agent_version: "0.1.0".into(),
            capabilities: ["ping", "exec", "env", "files", "shutdown"].map(String::from).to_vec(),
        };
        assert!(proto::encode(id, &old).unwrap().len() >= proto::HELLO_MIN_FRAME);
        send(&mut peer, id, &old).await;
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), call).await;
        assert!(matches!(got, Ok(Ok(Ok(Reply::Hello { version: 4, .. })))), "{got:?}");
    }

    #[tokio::test]
    async fn a_hold_gives_up_on_a_writer_stuck_on_a_peer_that_reads_nothing() {
        let (ours, _peer) = UnixStream::pair().unwrap();
        let conn = Conn::new(ours);
        let stuck = tokio::spawn({
            let conn = conn.clone();
            async move { conn.send_on(1, &Request::Stdin(vec![7u8; 2 << 20])).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let held = tokio::time::timeout(std::time::Duration::from_secs(5), conn.hold(std::time::Duration::from_millis(200))).await;
        assert!(matches!(held, Ok(None)), "the hold should give up within its bound");
        stuck.abort();
    }

    #[tokio::test]
    async fn a_hold_waits_until_the_peer_has_read_everything_and_lets_nothing_through() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let conn = Conn::new(ours);
        conn.send_on(5, &Request::Stdin(vec![1; 1000])).await.unwrap();
        let holding = tokio::spawn({
            let conn = conn.clone();
            async move { conn.hold(std::time::Duration::from_secs(5)).await }
        });
        assert!(matches!(request(&mut peer).await, (5, Request::Stdin(_))));
        let (ping, req) = request(&mut peer).await;
        assert_eq!(req, Request::Ping);
        // Until the peer answers, the hold is not there yet.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!holding.is_finished());
        send(&mut peer, ping, &Reply::Pong).await;
        let held = holding.await.unwrap().expect("held");
        // While held, another send waits; it goes once the hold is let go.
        let later = tokio::spawn({
            let conn = conn.clone();
            async move { conn.send_on(6, &Request::StdinClose).await }
        });
        let mut body = Vec::new();
        let early = tokio::time::timeout(std::time::Duration::from_millis(100), read_frame(&mut peer, &mut body)).await;
        assert!(early.is_err(), "a frame went out while the writer was held");
        drop(held);
        later.await.unwrap().unwrap();
        assert_eq!(request(&mut peer).await, (6, Request::StdinClose));
    }

    #[tokio::test]
    async fn a_send_given_up_half_way_shuts_the_connection() {
        let (ours, _peer) = UnixStream::pair().unwrap();
        let conn = Conn::new(ours);
        // The peer reads nothing: a frame larger than the socket's buffers cannot go out whole.
        let big = Request::Stdin(vec![7u8; 2 << 20]);
        let cut = tokio::time::timeout(std::time::Duration::from_millis(100), conn.send_on(1, &big)).await;
        assert!(cut.is_err(), "the send should still be under way");
        // Half a frame is out: nothing more may follow it on this connection.
        for _ in 0..200 {
            if conn.is_closed() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(conn.is_closed());
        assert!(conn.send_on(2, &Request::Ping).await.is_err());
    }

    #[tokio::test]
    async fn output_is_granted_back_as_it_is_taken_and_a_peer_past_its_window_is_cut_off() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let conn = Conn::new(ours);
        let mut s = conn.open(&Request::Ping).await.unwrap();
        let (id, _) = request(&mut peer).await;
        let chunk = Reply::Stdout(vec![7u8; proto::CHUNK]);
        let chunks = proto::WINDOW / proto::CHUNK;
        for _ in 0..chunks {
            send(&mut peer, id, &chunk).await;
        }
        let mut got = 0;
        while got < proto::WINDOW {
            match s.recv().await {
                Some(Reply::Stdout(d)) => got += d.len(),
                other => panic!("{other:?}"),
            }
        }
        // What the reader took comes back as credit, in steps.
        let mut granted = 0;
        while granted < proto::WINDOW {
            match request(&mut peer).await {
                (i, Request::Credit(n)) if i == id => {
                    assert_eq!(n as usize, proto::CREDIT_STEP);
                    granted += n as usize;
                }
                other => panic!("{other:?}"),
            }
        }
        // A peer that sends on while nothing is taken: past its window and one chunk of slack,
        // the stream ends; another stream on the connection carries on.
        let mut other = conn.open(&Request::Ping).await.unwrap();
        let (other_id, _) = request(&mut peer).await;
        for _ in 0..chunks + 4 {
            send(&mut peer, id, &chunk).await;
        }
        send(&mut peer, other_id, &Reply::Pong).await;
        assert_eq!(other.recv().await, Some(Reply::Pong));
        let mut got = 0;
        while let Some(reply) = s.recv().await {
            match reply {
                Reply::Stdout(d) => got += d.len(),
                // (Its reader is told why.)
                Reply::Error { message, .. } if message == FLOW_BROKEN => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, proto::WINDOW + proto::CHUNK);
        assert!(!conn.is_closed());
    }

    /// Frames that carry nothing still count against the window (a flood of them filled the
    /// supervisor's memory), and a grant of input never sent ends the stream (it let a client's
    /// input pile up in the supervisor); the reader is told why. Grants of nothing mean
    /// nothing, and grants waiting for the reader are merged.
    #[tokio::test]
    async fn empty_frames_and_false_credit_end_their_stream() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let conn = Conn::new(ours);
        let mut s = conn.open(&Request::Ping).await.unwrap();
        let (id, _) = request(&mut peer).await;
        let most = (proto::WINDOW + proto::CHUNK) / proto::FRAME_COST;
        for _ in 0..most + 10 {
            send(&mut peer, id, &Reply::Stdout(vec![])).await;
        }
        let mut frames = 0;
        let end = loop {
            match s.recv().await {
                Some(Reply::Stdout(_)) => frames += 1,
                other => break other,
            }
        };
        assert_eq!(frames, most);
        assert_eq!(end, Some(Reply::error(ErrorKind::Failed, FLOW_BROKEN)));

        // Input granted back as it was sent is fine; more than that ends the stream. (The
        // first stream's grants and cancel come first.)
        let mut s = conn.open(&Request::Ping).await.unwrap();
        let id = loop {
            match request(&mut peer).await {
                (_, Request::Credit(_) | Request::Cancel) => continue,
                (id, got) => {
                    assert_eq!(got, Request::Ping);
                    break id;
                }
            }
        };
        s.send(&Request::Stdin(vec![1; 100])).await.unwrap();
        assert_eq!(request(&mut peer).await, (id, Request::Stdin(vec![1; 100])));
        for c in [0, 10, 0, 50] {
            send(&mut peer, id, &Reply::Credit(c)).await;
        }
        send(&mut peer, id, &Reply::Stdout(b"x".to_vec())).await;
        assert_eq!(s.recv().await, Some(Reply::Credit(60)));
        assert_eq!(s.recv().await, Some(Reply::Stdout(b"x".to_vec())));
        send(&mut peer, id, &Reply::Credit(41)).await;
        send(&mut peer, id, &Reply::Credit(1)).await;
        assert_eq!(s.recv().await, Some(Reply::error(ErrorKind::Failed, FLOW_BROKEN)));
        assert_eq!(s.recv().await, None);
        assert!(!conn.is_closed());
    }
}
