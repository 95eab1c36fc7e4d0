//! The agent channel: framing, dispatch, and the requests that need no process.

use smolvm_proto::{self as proto, ErrorKind, Reply, Request};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Frames from many threads go out through one writer; a frame is written whole under the lock.
/// A writer bound to a host session (`for_session`) drops what it sends once another session
/// has begun: a VM restored from a snapshot greets a new host, whose stream ids start again,
/// and the output of a command the snapshot caught mid-way must not land on them.
#[derive(Clone)]
pub struct Writer {
    out: Arc<Mutex<File>>,
    session: Option<u64>,
}

/// The current host session: one per greeting.
static SESSION: AtomicU64 = AtomicU64::new(0);

impl Writer {
    pub fn send(&self, stream: u32, reply: &Reply) {
        // A reply that cannot be framed (over MAX_FRAME) is answered with why, so that the
        // host's request ends instead of waiting for its bound.
        let bytes = match proto::encode(stream, reply) {
            Ok(bytes) => bytes,
            Err(e) => {
                match proto::encode(stream, &Reply::error(ErrorKind::Failed, format!("the {} reply cannot be sent: {e}", reply.kind()))) {
                    Ok(bytes) => bytes,
                    Err(_) => return,
                }
            }
        };
        let mut f = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if self.session.is_some_and(|s| s != SESSION.load(Ordering::SeqCst)) {
            return;
        }
        // A write fails only when the host has gone; the reader notices that and cleans up.
        let _ = f.write_all(&bytes);
    }

    /// A writer into `out` (tests).
    #[cfg(test)]
    pub fn to(out: File) -> Writer {
        Writer { out: Arc::new(Mutex::new(out)), session: None }
    }

    /// This writer, for replies that belong to the current host session only.
    pub fn for_session(&self) -> Writer {
        Writer { out: self.out.clone(), session: Some(SESSION.load(Ordering::SeqCst)) }
    }

    /// A new host greeted the agent: what the previous session still sends goes nowhere.
    /// Under the write lock, so that no frame of the old session follows this point; the
    /// host's sync marker goes out there, after the rest of any frame a snapshot caught half
    /// written (see `Request::Hello`). Once per marker: a host that greets again (a resume
    /// whose first greeting failed) reads frames by then.
    fn new_session(&self, sync: Option<[u8; 16]>) {
        static LAST: Mutex<Option<[u8; 16]>> = Mutex::new(None);
        let mut f = self.out.lock().unwrap_or_else(|e| e.into_inner());
        SESSION.fetch_add(1, Ordering::SeqCst);
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(marker) = sync.filter(|m| *last != Some(*m)) {
            let _ = f.write_all(&marker);
            *last = Some(marker);
        }
    }
}

/// Where the agent's port appears: the host gives the VM one virtio-serial device whose first
/// port (1; 0 is kept for a console) is the agent's.
const AGENT_PORT_DEVICE: &str = "/dev/vport0p1";

/// Open the virtio-serial port named `smolvm.agent`. The kernel registers it asynchronously, so
/// poll for it within a bound. Its usual device node is tried first: looking it up by name in
/// /sys takes milliseconds under TCG (and /sys may still be being mounted).
pub fn open_channel(timeout: Duration) -> io::Result<File> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(f) = try_open_channel() {
            return Ok(f);
        }
        crate::pending::wait();
        if let Some(dev) = find_port() {
            if let Ok(f) = fs::OpenOptions::new().read(true).write(true).open(&dev) {
                return Ok(f);
            }
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!("virtio-serial port {} not found", proto::AGENT_PORT_NAME)));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The port's usual device node, if it is there yet.
pub fn try_open_channel() -> Option<File> {
    fs::OpenOptions::new().read(true).write(true).open(AGENT_PORT_DEVICE).ok()
}

fn find_port() -> Option<PathBuf> {
    for entry in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == proto::AGENT_PORT_NAME {
            return Some(PathBuf::from("/dev").join(entry.file_name()));
        }
    }
    None
}

/// What the host reaches the agent over.
pub enum Channel {
    /// A virtio-serial port: one byte stream for the VM's life. A host that goes away and a new
    /// one (a restored snapshot) read and write the same port.
    Serial(File),
    /// vsock (Firecracker, QEMU with a vsock device): the agent connects to the host's port
    /// (the host listens from before the VM starts, so nobody polls), and again should the
    /// connection end.
    Vsock,
}

pub fn serve(channel: Channel, pid1: bool) -> ! {
    match channel {
        Channel::Serial(port) => {
            let writer = Writer { out: Arc::new(Mutex::new(port.try_clone().expect("dup channel"))), session: None };
            let mut reader = BufReader::with_capacity(256 * 1024, port);
            loop {
                let e = serve_session(&mut reader, &writer, pid1);
                host_gone(&e);
            }
        }
        Channel::Vsock => {
            let mut writer: Option<Writer> = None;
            loop {
                // At boot the host is there at once: ask often. Later (its connection ended) it
                // may never come back: ask now and then.
                let every = Duration::from_millis(if writer.is_none() { 2 } else { 200 });
                let conn = match connect_vsock(Duration::from_secs(10), every) {
                    Ok(c) => c,
                    Err(e) => {
                        crate::log(&e.to_string());
                        continue;
                    }
                };
                let Ok(out) = conn.try_clone() else { continue };
                // Writers of the previous session keep their handle but write into this one;
                // their session check drops what they send once this host has greeted.
                let w = writer
                    .get_or_insert_with(|| Writer { out: Arc::new(Mutex::new(out.try_clone().expect("dup channel"))), session: None });
                *w.out.lock().unwrap_or_else(|e| e.into_inner()) = out;
                let mut reader = BufReader::with_capacity(256 * 1024, conn);
                let e = serve_session(&mut reader, w, pid1);
                host_gone(&e);
            }
        }
    }
}

/// Read and dispatch frames until the channel fails (the host went away): the error.
fn serve_session(reader: &mut BufReader<File>, writer: &Writer, pid1: bool) -> io::Error {
    let mut body = Vec::new();
    loop {
        let mut header = [0u8; 4];
        if let Err(e) = reader.read_exact(&mut header) {
            return e;
        }
        let len = match proto::frame_len(header) {
            Ok(len) => len,
            Err(e) => return io::Error::other(e),
        };
        body.resize(len, 0);
        if let Err(e) = reader.read_exact(&mut body) {
            return e;
        }
        match proto::decode::<Request>(&body) {
            Ok((stream, req)) => dispatch(stream, req, writer, pid1),
            Err(e) => crate::log(&format!("undecodable request: {e}")),
        }
    }
}

/// Connect to the host's agent port over vsock. The transport registers when its device is
/// probed, which may still be under way at boot: retry `every` so often within `timeout`.
fn connect_vsock(timeout: Duration, every: Duration) -> io::Result<File> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = (|| -> nix::Result<std::os::fd::OwnedFd> {
            let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
            connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &VsockAddr::new(libc::VMADDR_CID_HOST, proto::AGENT_VSOCK_PORT))?;
            Ok(fd)
        })();
        match attempt {
            Ok(fd) => return Ok(File::from(fd)),
            Err(e) if Instant::now() > deadline => {
                return Err(io::Error::other(format!("vsock: connecting to the host's port {}: {e}", proto::AGENT_VSOCK_PORT)))
            }
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// The host end closed (a virtio-serial read returns EOF at once while no host is attached):
/// nobody is left to read the output of running commands, so stop them, then wait for a host.
fn host_gone(e: &io::Error) {
    if e.kind() != io::ErrorKind::UnexpectedEof {
        crate::log(&format!("channel: {e}"));
    }
    crate::exec::cancel_all();
    std::thread::sleep(Duration::from_millis(10));
}

fn dispatch(stream: u32, req: Request, w: &Writer, pid1: bool) {
    let reply = match req {
        Request::Hello { version, unix_time_ns, hostname, entropy, net, sync, mounts } => {
            // Whatever the previous host started (a restored snapshot's commands and uploads)
            // has nobody to report to.
            w.new_session(sync);
            crate::exec::cancel_all();
            crate::files::cancel_all();
            // The answer goes first: the host's next request is read only after what follows,
            // so nothing overtakes it, and the host's round trip overlaps with it.
            w.send(stream, &hello(version));
            if let Some(cfg) = net {
                crate::net::configure_in_background(cfg);
            }
            if !mounts.is_empty() {
                crate::init::mount_in_background(mounts);
            }
            set_clock(unix_time_ns);
            if !hostname.is_empty() {
                crate::init::set_hostname(&hostname);
            }
            reseed(&entropy);
            return;
        }
        Request::Ping => Reply::Pong,
        Request::Exec(req) => return crate::exec::start(stream, req, w.for_session()),
        Request::Stdin(data) => {
            if !crate::files::put_data(stream, &data, w) {
                crate::exec::stdin(stream, Some(data));
            }
            return;
        }
        Request::StdinClose => {
            if !crate::files::put_end(stream, w) {
                crate::exec::stdin(stream, None);
            }
            return;
        }
        Request::Credit(n) => return crate::flow::credit(stream, n),
        Request::Resize(size) => return crate::exec::resize(stream, size),
        Request::Listening => {
            let text: String = ["/proc/net/tcp", "/proc/net/tcp6"].iter().filter_map(|p| std::fs::read_to_string(p).ok()).collect();
            Reply::Ports(proto::listening_ports(&text))
        }
        Request::Clock { unix_time_ns } => {
            set_clock(unix_time_ns);
            Reply::Ok
        }
        Request::Cancel => {
            crate::files::put_cancel(stream);
            return crate::exec::cancel(stream);
        }
        Request::FilePut { path, mode, tar } => return crate::files::put_start(stream, path, mode, tar, w),
        Request::FileGet { path } => return crate::files::get(stream, path, w.for_session()),
        Request::EnvList => crate::envfile::list().map(Reply::Env).unwrap_or_else(io_reply),
        Request::EnvSet { vars, merge } => crate::envfile::set(vars, merge).map(Reply::EnvNames).unwrap_or_else(io_reply),
        Request::EnvUnset { keys } => crate::envfile::unset(keys).map(Reply::EnvRemoved).unwrap_or_else(io_reply),
        Request::Shutdown => {
            w.send(stream, &Reply::Ok);
            if pid1 {
                shutdown_now();
            }
            std::process::exit(0);
        }
        Request::Stop { .. }
        | Request::Info
        | Request::StoppedWithin { .. }
        | Request::Pause
        | Request::Resume
        | Request::Snapshot { .. }
        | Request::Expose { .. }
        | Request::Unexpose { .. } => Reply::error(ErrorKind::Unsupported, "served by the host supervisor, not the agent"),
    };
    w.send(stream, &reply);
}

fn hello(host_version: u32) -> Reply {
    Reply::Hello {
        version: proto::PROTOCOL_VERSION.min(host_version),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        capabilities: ["ping", "exec", "env", "files", "shutdown", "tty", "ports", proto::CAP_FRAME_COST].map(String::from).to_vec(),
    }
}

fn io_reply(e: io::Error) -> Reply {
    let kind = match e.kind() {
        io::ErrorKind::InvalidInput => ErrorKind::Invalid,
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        _ => ErrorKind::Failed,
    };
    Reply::error(kind, e.to_string())
}

fn set_clock(unix_time_ns: u128) {
    let ts = nix::sys::time::TimeSpec::new((unix_time_ns / 1_000_000_000) as i64, (unix_time_ns % 1_000_000_000) as i64);
    let _ = nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts);
}

/// Mix the host's entropy into the kernel's pool, credit it, and force the CRNG to reseed, so
/// that clones restored from one snapshot stop sharing random state before anything runs.
fn reseed(entropy: &[u8]) {
    use std::os::fd::AsRawFd;
    if entropy.is_empty() {
        return;
    }
    let Ok(f) = fs::OpenOptions::new().write(true).open("/dev/urandom") else { return };
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: the fd is open; `info` is a valid rand_pool_info whose buf_size matches the bytes
    // that follow it, and it outlives the call; RNDRESEEDCRNG takes no argument.
    unsafe {
        libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr());
        libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _);
    }
}

/// Kill everything but ourselves, flush disks and power off.
pub fn shutdown_now() -> ! {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    crate::exec::cancel_all_for_shutdown();
    // An upload cut off by the stop leaves no temporary file (a root disk would keep it).
    crate::files::cancel_all();
    // SIGKILL to -1 reaches every process but PID 1 and the caller.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::Signal::SIGKILL);
    // Killed processes hold their files open for writing until they are gone: wait for them
    // (bounded), so that the sync and the read-only remount find nothing left to write.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Err(nix::errno::Errno::ECHILD) => break,
            Ok(WaitStatus::StillAlive) | Err(_) if Instant::now() > deadline => break,
            Ok(WaitStatus::StillAlive) | Err(_) => std::thread::sleep(Duration::from_millis(2)),
            Ok(_) => {}
        }
    }
    // The host tells a guest that powered itself off (a stopped sandbox) from one that crashed
    // by this line: both end in a reset, which QEMU reports alike.
    crate::log(proto::POWER_OFF_MARK);
    crate::init::power_off()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn the_answer_to_a_greeting_is_as_long_as_hosts_count_on() {
        assert!(proto::encode(1, &hello(proto::PROTOCOL_VERSION)).unwrap().len() >= proto::HELLO_MIN_FRAME);
    }

    #[test]
    fn a_new_session_starts_with_its_marker_and_drops_the_old_sessions_frames() {
        let (read, write) = nix::unistd::pipe().unwrap();
        let w = Writer { out: Arc::new(Mutex::new(File::from(write))), session: None };
        let old = w.for_session();
        w.new_session(Some(*b"0123456789abcdef"));
        old.send(7, &Reply::Pong);
        w.send(1, &Reply::Ok);
        // The same host greeting again gets no second marker.
        w.new_session(Some(*b"0123456789abcdef"));
        w.send(2, &Reply::Ok);
        drop((w, old));
        let mut got = Vec::new();
        File::from(read).read_to_end(&mut got).unwrap();
        let mut want = b"0123456789abcdef".to_vec();
        want.extend(proto::encode(1, &Reply::Ok).unwrap());
        want.extend(proto::encode(2, &Reply::Ok).unwrap());
        assert_eq!(got, want);
    }

    #[test]
    fn a_reply_too_large_for_a_frame_is_answered_with_why() {
        let file = tempfile_in_tmp();
        let w = Writer::to(file.try_clone().unwrap());
        let env = std::iter::once(("K".to_string(), "v".repeat(proto::MAX_FRAME))).collect();
        w.send(3, &Reply::Env(env));
        let mut got = Vec::new();
        let mut file = file;
        std::io::Seek::rewind(&mut file).unwrap();
        file.read_to_end(&mut got).unwrap();
        let len = proto::frame_len(got[..4].try_into().unwrap()).unwrap();
        let (stream, reply) = proto::decode::<Reply>(&got[4..4 + len]).unwrap();
        assert_eq!(stream, 3);
        match reply {
            Reply::Error { kind: ErrorKind::Failed, message } => {
                assert!(message.starts_with("the env reply cannot be sent: frame of "), "{message}");
                assert!(!message.contains("vvv"));
            }
            other => panic!("{}", other.kind()),
        }
    }

    /// An unnamed file (O_TMPFILE) in /tmp, gone when closed.
    pub(crate) fn tempfile_in_tmp() -> File {
        fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_TMPFILE).open("/tmp").unwrap()
    }
}
