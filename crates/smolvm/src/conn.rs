//! A multiplexed connection speaking the smolvm frame protocol over a Unix stream: to the guest
//! agent (from the supervisor) and to the supervisor (from clients), so that the library talks
//! to both the same way.

use crate::error::{Error, Result};
use smolvm_proto::{self as proto, Reply, Request};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

type Routes = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Reply>>>>;

pub struct Conn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    routes: Routes,
    next: AtomicU32,
    closed: Arc<AtomicBool>,
}

/// One request's replies. Dropping it before its terminal reply cancels the request (an exec's
/// process group is killed): nobody is left to read what it produces. Late replies are dropped.
pub struct Stream {
    pub id: u32,
    conn: Arc<Conn>,
    rx: mpsc::UnboundedReceiver<Reply>,
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

impl Conn {
    pub fn new(stream: UnixStream) -> Arc<Conn> {
        let (read, write) = stream.into_split();
        let routes: Routes = Default::default();
        let closed = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Conn {
            writer: tokio::sync::Mutex::new(write),
            routes: routes.clone(),
            next: AtomicU32::new(1),
            closed: closed.clone(),
        });
        tokio::spawn(async move {
            let mut reader = BufReader::with_capacity(256 * 1024, read);
            let mut body = Vec::new();
            while let Ok(Some(())) = read_frame(&mut reader, &mut body).await {
                let Ok((id, reply)) = proto::decode::<Reply>(&body) else {
                    tracing::warn!("undecodable reply; closing the connection");
                    break;
                };
                let mut routes = routes.lock().unwrap_or_else(|e| e.into_inner());
                let terminal = reply.is_terminal();
                if let Some(tx) = routes.get(&id) {
                    let _ = tx.send(reply);
                }
                if terminal {
                    routes.remove(&id);
                }
            }
            closed.store(true, Ordering::SeqCst);
            // Dropping every sender wakes every waiting stream with `None`.
            routes.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        conn
    }

    pub async fn connect(path: &std::path::Path) -> Result<Arc<Conn>> {
        let s =
            UnixStream::connect(path).await.map_err(|e| Error::Io { context: format!("connecting to {}", path.display()), source: e })?;
        Ok(Conn::new(s))
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub async fn send_on(&self, id: u32, req: &Request) -> Result<()> {
        let bytes = proto::encode(id, req).map_err(|e| Error::Guest(e.to_string()))?;
        let mut w = self.writer.lock().await;
        let sent = w.write_all(&bytes).await;
        if sent.is_err() {
            // The other end is gone (the reader may not have noticed yet).
            self.closed.store(true, Ordering::SeqCst);
        }
        sent.map_err(|e| Error::Io { context: "sending a request".into(), source: e })
    }

    /// Open a stream with its first request.
    pub async fn open(self: &Arc<Conn>, req: &Request) -> Result<Stream> {
        if self.is_closed() {
            return Err(Error::Guest("connection closed".into()));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        let stream = Stream { id, conn: self.clone(), rx, done: false };
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
        let reply = self.rx.recv().await;
        self.done |= reply.as_ref().is_none_or(Reply::is_terminal);
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
