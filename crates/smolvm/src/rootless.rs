//! NAT networking for a user without root.
//!
//! QEMU's user-mode networking cannot filter: its gateway is the host's loopback, and cloud
//! metadata addresses are as reachable as the internet. So a supervisor run by a user without
//! root moves into a user and network namespace of its own, where it is root, and does there
//! what NAT mode does on the host: a TAP, an nftables table, the DNS proxy. The namespace's way
//! out is slirp4netns, run in the host's namespaces: it turns what leaves through the
//! namespace's own TAP (`tap0`) into the user's own sockets, with the host's loopback shut
//! (`--disable-host-loopback`).
//!
//! A few sockets must be the host's, not the namespace's: the listeners of exposed ports
//! (127.0.0.1 of the host) and the DNS proxy's upstream (a stub resolver on the host's
//! loopback). A helper process left in the host's namespaces (`smolvm __host-side`) makes them
//! on request and hands them over, and starts slirp4netns.
//!
//! Nothing outlives the supervisor: the namespace goes with its last process (the supervisor
//! and QEMU), and with it the TAP and the rules; the helper exits when its socket to the
//! supervisor closes, and slirp4netns when the helper is gone (`--exit-fd`).

use crate::error::Error;
use crate::net::Cidr;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::IoSliceMut;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

/// What a sandbox whose helper died is told: its network cannot come back without it.
const HELPER_GONE: &str = "the sandbox's host-side helper (smolvm __host-side) has exited, and its network with it; restart the sandbox";

/// The name of the namespace's way out, made by slirp4netns.
const UPLINK: &str = "tap0";

/// slirp4netns's network, seen from the namespace (its gateway .2, its DNS .3, the
/// namespace's address .100): never a sandbox's destination.
pub const UPLINK_NET: &str = "10.0.2.0/24";

/// How long slirp4netns may take to set up the namespace's way out.
const UPLINK_BOUND: Duration = Duration::from_secs(10);

/// Why a user without root cannot have NAT networking here, if they cannot. What only an
/// attempt can tell (a kernel or an AppArmor policy that gives a new user namespace no
/// capabilities, a slirp4netns that fails) is found by `enter` itself, or `doctor`'s `trial_main`.
pub fn available() -> std::result::Result<(), String> {
    if !crate::image::on_path("slirp4netns") {
        return Err("slirp4netns is not installed".into());
    }
    if !crate::image::on_path("nft") {
        return Err("nft (nftables) is not installed".into());
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun") {
        return Err(match e.kind() {
            std::io::ErrorKind::NotFound => "/dev/net/tun is missing".into(),
            _ => format!("this user cannot open /dev/net/tun ({e}; its usual mode is 0666)"),
        });
    }
    if std::fs::read_to_string("/proc/sys/user/max_user_namespaces").is_ok_and(|n| n.trim() == "0") {
        return Err("user namespaces are turned off (user.max_user_namespaces is 0)".into());
    }
    Ok(())
}

/// Why `enter` failed, and whether the supervisor had already left the host's namespaces (then
/// it cannot fall back to user-mode networking: it has no way out any more). Only joining the
/// namespace, the last step, can fail that way.
#[derive(Debug)]
pub struct EnterError {
    pub entered: bool,
    pub message: String,
}

/// The supervisor's line to its helper in the host's namespaces.
pub struct HostSide {
    /// The socket, and the number of the last request: an answer names its request, so that
    /// one that came too late is never taken for the next one's.
    sock: Mutex<(OwnedFd, u64)>,
    /// What the host delivers to itself (`local_networks`), seen before leaving: from the
    /// namespace it is reached through slirp4netns, so the rules must name it.
    pub host_local: Vec<Cidr>,
    helper: std::process::Child,
}

/// The number of threads of this process: `unshare(CLONE_NEWUSER)` needs it to be one.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

/// Move this process (the supervisor, still single-threaded) into a new user and network
/// namespace of its own, with slirp4netns as its way out and a helper left behind for the host's
/// sockets. The namespace is made by a child (`NamespaceHolder`) and joined only once
/// slirp4netns has set it up: any failure before that leaves this process where it was.
pub fn enter() -> std::result::Result<HostSide, EnterError> {
    let before = |message: String| EnterError { entered: false, message };
    if threads() != 1 {
        return Err(before(format!("the supervisor has {} threads; a user namespace needs one", threads())));
    }
    let (ours, theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| before(format!("making the helper's socket: {e}")))?;
    let exe = std::env::current_exe().map_err(|e| before(format!("finding the smolvm binary: {e}")))?;
    let mut command = std::process::Command::new(exe);
    // It ends when this process's end of the socket closes, however this process ends (no
    // death signal: it must outlive this process long enough to reap slirp4netns).
    command.arg("__host-side").stdin(theirs).stdout(std::process::Stdio::null());
    let helper = command.spawn().map_err(|e| before(format!("starting the host-side helper: {e}")))?;
    // The helper's end goes with `command`: kept here, a dead helper would not read as gone.
    drop(command);
    // Every answer is bounded, the longest (slirp4netns's set-up) included.
    let bound = nix::sys::time::TimeVal::new(UPLINK_BOUND.as_secs() as i64 + 5, 0);
    let _ = nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::ReceiveTimeout, &bound);
    let mut side = HostSide { sock: Mutex::new((ours, 0)), host_local: vec![], helper };
    let joined = (|| {
        side.host_local = side.local_networks().map_err(before)?;
        let holder = NamespaceHolder::new().map_err(before)?;
        side.ask(&format!("uplink {}", holder.pid)).map_err(|e| before(format!("slirp4netns: {e}")))?;
        holder.join().map_err(|message| EnterError { entered: true, message })
    })();
    match joined {
        Ok(()) => Ok(side),
        Err(e) => {
            side.close();
            Err(e)
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Be root in the namespace just made: the user's own ids, mapped to 0. (A process whose id is
/// not 0 there would lose its capabilities at `exec`, and `nft` and QEMU need them.)
fn map_ids(uid: u32, gid: u32) -> std::result::Result<(), String> {
    // Without this an unprivileged process may not map its group.
    match std::fs::write("/proc/self/setgroups", "deny") {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(format!("writing /proc/self/setgroups: {e}")),
        _ => {}
    }
    std::fs::write("/proc/self/uid_map", format!("0 {uid} 1")).map_err(|e| format!("writing /proc/self/uid_map: {e}"))?;
    std::fs::write("/proc/self/gid_map", format!("0 {gid} 1")).map_err(|e| format!("writing /proc/self/gid_map: {e}"))?;
    Ok(())
}

/// `smolvm __nat-trial`: all of `enter`, and the rules, tried in a process of its own (for
/// `doctor`, whose callers may have threads): a namespace with a TAP, slirp4netns for it, and
/// then, joined, a check of a table with what the sandbox's rules use (`nft --check` sends it to
/// the kernel and commits nothing).
pub fn trial_main() -> i32 {
    let outcome = if threads() == 1 { full_trial() } else { Err(format!("the trial has {} threads; it needs one", threads())) };
    match outcome {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn full_trial() -> std::result::Result<(), String> {
    let holder = NamespaceHolder::new()?;
    let (mut slirp, exit) = start_slirp4netns(holder.pid.as_raw() as u32).map_err(|e| format!("slirp4netns: {e}"))?;
    let joined = holder.join();
    drop(holder);
    let checked =
        joined.and_then(|()| crate::net::nft_check_rootless(&blocked(&[])).map_err(|e| format!("in the namespace: {}", e.full_message())));
    drop(exit);
    let _ = slirp.wait();
    checked
}

/// What `enter`'s trial says on this host for this user, asked of a `smolvm __nat-trial`
/// (`doctor` runs in processes that have threads, Python's among them).
pub fn trial_elsewhere() -> std::result::Result<(), String> {
    let bin = crate::sandbox::smolvm_binary().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(bin)
        .arg("__nat-trial")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running the trial: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
    }
}

/// A child process in a new user and network namespace, where it has made (and dropped) a TAP,
/// waiting until it is let go. The namespace is made by a child so that this process leaves
/// the host's namespaces only once all that can fail has worked (slirp4netns included): until
/// then it has left nothing, and a start can still fall back to user-mode networking.
struct NamespaceHolder {
    pid: nix::unistd::Pid,
    /// Closed to let the child go (this process's death closes it too).
    release: Option<OwnedFd>,
}

impl NamespaceHolder {
    fn new() -> std::result::Result<NamespaceHolder, String> {
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("making a pipe: {e}"));
        let (status_r, status_w) = pipe()?;
        let (release_r, release_w) = pipe()?;
        let (uid, gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
        // SAFETY: the process is single-threaded (every caller checks), so the child may run
        // any code; it ends with `_exit` and shares nothing with the parent but the two pipes.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                drop((status_r, release_w));
                let outcome = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER | nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("making a user and network namespace: {e}"))
                    .and_then(|()| map_ids(uid, gid))
                    .and_then(|()| crate::net::open_tap("smvtrial").map(drop).map_err(|e| e.to_string()));
                let code = match outcome {
                    Ok(()) => {
                        drop(status_w);
                        // Held until let go, so that the namespace is there to be joined.
                        let mut byte = [0u8; 1];
                        while matches!(nix::unistd::read(release_r.as_raw_fd(), &mut byte), Err(nix::errno::Errno::EINTR) | Ok(1)) {}
                        0
                    }
                    Err(message) => {
                        let _ = nix::unistd::write(&status_w, message.as_bytes());
                        1
                    }
                };
                // SAFETY: _exit ends the child without running the parent's exit handlers.
                unsafe { libc::_exit(code) }
            }
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                drop((status_w, release_r));
                let holder = NamespaceHolder { pid: child, release: Some(release_w) };
                // The child closes its end once its namespace is ready, or writes why not.
                let mut message = Vec::new();
                let _ = std::io::Read::read_to_end(&mut std::fs::File::from(status_r), &mut message);
                if message.is_empty() && std::path::Path::new(&format!("/proc/{child}/ns/net")).exists() {
                    return Ok(holder);
                }
                drop(holder);
                let why = match message.is_empty() {
                    true => "the namespace's process ended before it was ready".to_string(),
                    false => String::from_utf8_lossy(&message).into_owned(),
                };
                // Ubuntu's policy: a new user namespace gets no capabilities, whatever it asks.
                let restricted =
                    std::fs::read_to_string("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").is_ok_and(|v| v.trim() == "1");
                Err(match restricted {
                    true => format!("{why} (kernel.apparmor_restrict_unprivileged_userns is 1)"),
                    false => why,
                })
            }
            Err(e) => Err(format!("forking for a namespace: {e}")),
        }
    }

    /// Move this process (single-threaded) into the child's namespaces, user first: there it
    /// is root, as the child made it.
    fn join(&self) -> std::result::Result<(), String> {
        for (ns, flag) in [("user", nix::sched::CloneFlags::CLONE_NEWUSER), ("net", nix::sched::CloneFlags::CLONE_NEWNET)] {
            let path = format!("/proc/{}/ns/{ns}", self.pid);
            let fd = std::fs::File::open(&path).map_err(|e| format!("opening {path}: {e}"))?;
            nix::sched::setns(fd, flag).map_err(|e| format!("joining the {ns} namespace: {e}"))?;
        }
        Ok(())
    }
}

impl Drop for NamespaceHolder {
    fn drop(&mut self) {
        self.release = None;
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }
}

impl HostSide {
    /// Let the helper go and reap it, for a start that falls back to user mode and lives on:
    /// it would stay a zombie of the supervisor's for the sandbox's life. (It exits at once: it
    /// has no slirp4netns left to wait for, `start_slirp4netns` having ended a failed one.)
    fn close(self) {
        let HostSide { sock, mut helper, .. } = self;
        drop(sock);
        let _ = helper.wait();
    }

    /// One request, one answer (its words after `ok`), which may carry a descriptor.
    fn ask(&self, request: &str) -> std::result::Result<(String, Option<OwnedFd>), String> {
        let mut guard = lock(&self.sock);
        guard.1 += 1;
        let (sock, seq) = (guard.0.as_raw_fd(), guard.1);
        nix::sys::socket::send(sock, format!("{seq} {request}").as_bytes(), MsgFlags::empty()).map_err(|e| match e {
            nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET => HELPER_GONE.to_string(),
            e => format!("asking the host-side helper: {e}"),
        })?;
        loop {
            let mut buf = [0u8; 2048];
            let mut space = nix::cmsg_space!(RawFd);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("hearing from the host-side helper: {e}")),
                Ok(m) => m,
            };
            let mut fd = None;
            for c in msg.cmsgs().map_err(|e| e.to_string())? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for raw in fds {
                        // SAFETY: the kernel just installed this descriptor in this process for
                        // this message; nothing else owns it.
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        fd.get_or_insert(owned);
                    }
                }
            }
            let n = msg.bytes;
            if n == 0 {
                return Err(HELPER_GONE.into());
            }
            let text = String::from_utf8_lossy(&iov[0][..n]).into_owned();
            let (of, answer) = text.split_once(' ').unwrap_or((&text, ""));
            if of != seq.to_string() {
                // The late answer to an earlier request (its descriptor closes here).
                continue;
            }
            return match answer.strip_prefix("ok") {
                Some(rest) => Ok((rest.trim_start().to_string(), fd)),
                None => Err(answer.strip_prefix("error ").unwrap_or(answer).to_string()),
            };
        }
    }

    /// A listener on the host's 127.0.0.1:`port` (0: any free port).
    pub fn tcp_listener(&self, port: u16) -> std::io::Result<std::net::TcpListener> {
        match self.ask(&format!("tcp {port}")) {
            Ok((_, Some(fd))) => Ok(std::net::TcpListener::from(fd)),
            Ok((_, None)) => Err(std::io::Error::other("the host-side helper sent no socket")),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// What the host delivers to itself now (see `local_networks`).
    pub fn local_networks(&self) -> std::result::Result<Vec<Cidr>, String> {
        let (list, _) = self.ask("local")?;
        list.split(',').filter(|a| !a.is_empty()).map(Cidr::parse).collect()
    }

    /// A UDP socket of the host's, connected to `to`.
    pub fn udp_to(&self, to: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
        match self.ask(&format!("udp {to}")) {
            Ok((_, Some(fd))) => Ok(std::net::UdpSocket::from(fd)),
            Ok((_, None)) => Err(std::io::Error::other("the host-side helper sent no socket")),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// `smolvm __host-side`: the helper. Its standard input is its socket to the supervisor.
pub fn host_side_main() -> i32 {
    // SAFETY: descriptor 0 is the socket the supervisor gave this process as its standard input;
    // from here on this function alone owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(0) };
    let mut uplink: Option<(std::process::Child, OwnedFd)> = None;
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_io().build() else { return 1 };
    let mut buf = [0u8; 512];
    loop {
        let n = match nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        let (seq, request) = message.split_once(' ').unwrap_or(("0", &message));
        let (reply, fd) = match serve(request, &mut uplink, &rt) {
            Ok((words, fd)) => (format!("{seq} ok {words}"), fd),
            Err(e) => (format!("{seq} error {e}"), None),
        };
        let iov = [std::io::IoSlice::new(reply.as_bytes())];
        let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
        if sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).is_err() {
            break;
        }
    }
    // The supervisor is gone: closing the exit pipe ends slirp4netns, which is then reaped
    // (killed if it has not gone within its bound).
    if let Some((mut child, exit)) = uplink {
        drop(exit);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    0
}

fn serve(
    request: &str,
    uplink: &mut Option<(std::process::Child, OwnedFd)>,
    rt: &tokio::runtime::Runtime,
) -> std::result::Result<(String, Option<OwnedFd>), String> {
    let (what, arg) = request.split_once(' ').unwrap_or((request, ""));
    if what == "local" {
        // Asked twice a second: a way out that is gone is said here, where it shows.
        if let Some((child, _)) = uplink {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("slirp4netns has exited ({status}): the sandbox has no way out any more; restart it"));
            }
        }
        let list: Vec<String> = rt.block_on(local_networks())?.iter().map(|c| c.to_string()).collect();
        return Ok((list.join(","), None));
    }
    let fd = match what {
        "tcp" => {
            let port: u16 = arg.parse().map_err(|_| format!("bad port {arg:?}"))?;
            let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(|e| e.to_string())?;
            Ok(Some(l.into()))
        }
        "udp" => {
            let to: SocketAddr = arg.parse().map_err(|_| format!("bad address {arg:?}"))?;
            let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| format!("binding a UDP socket: {e}"))?;
            s.connect(to).map_err(|e| format!("connecting to {to}: {e}"))?;
            Ok(Some(s.into()))
        }
        "uplink" if uplink.is_none() => {
            let pid: u32 = arg.parse().map_err(|_| format!("bad process id {arg:?}"))?;
            *uplink = Some(start_slirp4netns(pid)?);
            Ok(None)
        }
        _ => Err(format!("unknown request {request:?}")),
    }?;
    Ok((String::new(), fd))
}

/// Start slirp4netns for the namespaces of process `pid` and wait until it has set up the way
/// out. It exits when the returned descriptor closes (with this helper, however it ends).
fn start_slirp4netns(pid: u32) -> std::result::Result<(std::process::Child, OwnedFd), String> {
    use std::os::unix::process::CommandExt;
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("making a pipe: {e}"));
    let (ready_r, ready_w) = pipe()?;
    let (exit_r, exit_w) = pipe()?;
    let (ready_fd, exit_fd) = (ready_w.as_raw_fd(), exit_r.as_raw_fd());
    // (Where no such file can be made, its words are lost, not the start.)
    let log = tempfile_log().ok();
    let out = || log.as_ref().and_then(|l| l.try_clone().ok()).map_or_else(std::process::Stdio::null, std::process::Stdio::from);
    let mut command = std::process::Command::new("slirp4netns");
    command
        // Confined (its own mount namespace, a seccomp filter): it parses what the guest sends.
        .args(["--configure", "--mtu=65520", "--disable-host-loopback", "--enable-sandbox", "--enable-seccomp"])
        .arg(format!("--ready-fd={ready_fd}"))
        .arg(format!("--exit-fd={exit_fd}"))
        .arg(pid.to_string())
        .arg(UPLINK)
        .stdin(std::process::Stdio::null())
        .stdout(out())
        .stderr(out());
    // SAFETY: fcntl(F_SETFD) only changes the child's own descriptor table and is
    // async-signal-safe; nothing of the parent's memory is touched between fork and exec.
    unsafe {
        command.pre_exec(move || {
            for fd in [ready_fd, exit_fd] {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| format!("cannot run slirp4netns: {e}"))?;
    drop(ready_w);
    drop(exit_r);
    let said = |log: Option<std::fs::File>| {
        let mut text = String::new();
        if let Some(mut log) = log {
            let _ = std::io::Seek::rewind(&mut log);
            let _ = std::io::Read::read_to_string(&mut log, &mut text);
        }
        crate::error::printable(text.trim(), 500)
    };
    let mut poll = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&ready_r), nix::poll::PollFlags::POLLIN)];
    let ready = nix::poll::poll(&mut poll, nix::poll::PollTimeout::from(UPLINK_BOUND.as_millis() as u16));
    let mut byte = [0u8; 1];
    let got = matches!(ready, Ok(1)) && matches!(nix::unistd::read(ready_r.as_raw_fd(), &mut byte), Ok(1));
    if !got {
        let _ = child.kill();
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        let why = if matches!(ready, Ok(0)) { format!("not ready within {}s", UPLINK_BOUND.as_secs()) } else { status };
        return Err(format!("{why}: {}", said(log)));
    }
    Ok((child, exit_w))
}

/// A file without a name for slirp4netns's messages, read back only if it fails: nothing to
/// remove, however this ends.
fn tempfile_log() -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::temp_dir();
    std::fs::OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(libc::O_TMPFILE).open(dir)
}

/// How often a sandbox in its own namespace looks at the host's local routes again: what the
/// host gains (a VPN, a new interface) is out of the guest's reach about this long after.
pub const ADDRESS_POLL: Duration = Duration::from_millis(500);

/// Keep the rules' list of what the host delivers to itself (`net::HOST_SET`) up to date for
/// as long as the sandbox runs, and say in the supervisor's log when its way out is gone.
pub async fn watch_host_local(side: std::sync::Arc<HostSide>, table: String) {
    let mut known = side.host_local.clone();
    let mut said = None;
    loop {
        tokio::time::sleep(ADDRESS_POLL).await;
        let asking = side.clone();
        let now = match tokio::task::spawn_blocking(move || asking.local_networks()).await {
            Ok(Ok(now)) => now,
            Ok(Err(e)) => {
                if said.as_ref() != Some(&e) {
                    tracing::error!("{e}");
                    said = Some(e);
                }
                continue;
            }
            Err(_) => continue,
        };
        if now == known {
            continue;
        }
        let (t, cidrs) = (table.clone(), blocked(&now));
        match tokio::task::spawn_blocking(move || crate::net::nft_set_host(&t, &cidrs)).await {
            Ok(Ok(())) => {
                tracing::debug!("the host's local networks are now {now:?}");
                known = now;
            }
            other => tracing::debug!("updating the host's local networks in {table}: {other:?}"),
        }
    }
}

/// Every destination the host's `local` routing table delivers to the host itself: the
/// addresses of its interfaces, and whole ranges routed `local` (as AnyIP set-ups do), which
/// a list of interface addresses would miss. Sorted, each once.
async fn local_networks() -> std::result::Result<Vec<Cidr>, String> {
    use futures::TryStreamExt;
    use netlink_packet_route::{route::Nla, RTN_LOCAL, RT_TABLE_LOCAL};
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| format!("opening rtnetlink: {e}"))?;
    let task = tokio::spawn(connection);
    let mut routes = handle.route().get(rtnetlink::IpVersion::V4).execute();
    let mut out = Vec::new();
    let listed = loop {
        match routes.try_next().await {
            Ok(Some(r)) if r.header.table == RT_TABLE_LOCAL && r.header.kind == RTN_LOCAL => {
                let dst = r.nlas.iter().find_map(|n| match n {
                    Nla::Destination(b) if b.len() == 4 => Some(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
                    _ => None,
                });
                if let Some(addr) = dst {
                    out.push(Cidr { addr, prefix: r.header.destination_prefix_length });
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break Ok(()),
            Err(e) => break Err(format!("listing the host's local routes: {e}")),
        }
    };
    task.abort();
    listed?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// What the rules of a sandbox in its own namespace add: what the host delivers to itself
/// (reached through slirp4netns, not as the namespace's own) and slirp4netns's network. A
/// network inside a wider one of the list is left out: nftables refuses a set with overlapping
/// intervals.
pub fn blocked(host_local: &[Cidr]) -> Vec<Cidr> {
    let mut all: Vec<Cidr> = host_local.to_vec();
    all.push(Cidr::parse(UPLINK_NET).expect("a valid network"));
    all.sort_by_key(|c| (c.prefix, c.addr));
    let mut out: Vec<Cidr> = Vec::new();
    for c in all {
        if !out.iter().any(|o| o.overlaps(&c)) {
            out.push(c);
        }
    }
    out.sort();
    out
}

impl From<EnterError> for Error {
    fn from(e: EnterError) -> Error {
        Error::Network(format!("NAT networking without root: {}", e.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_name_each_local_network_once_the_widest_first() {
        let c = |s: &str| Cidr::parse(s).unwrap();
        let local = [c("127.0.0.0/8"), c("127.0.0.1"), c("192.168.1.5"), c("203.0.113.0/24"), c("203.0.113.7"), c("10.0.2.15")];
        let got: Vec<String> = blocked(&local).iter().map(|c| c.to_string()).collect();
        assert_eq!(got, ["10.0.2.0/24", "127.0.0.0/8", "192.168.1.5/32", "203.0.113.0/24"]);
    }

    /// The host's own addresses and loopback are among what its local table delivers to itself.
    #[test]
    fn the_local_table_holds_the_hosts_addresses() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
        let local = rt.block_on(local_networks()).unwrap();
        assert!(local.contains(&Cidr::parse("127.0.0.0/8").unwrap()), "{local:?}");
        for a in crate::net::host_addresses() {
            assert!(local.iter().any(|c| c.overlaps(&Cidr { addr: a, prefix: 32 })), "{a} not in {local:?}");
        }
    }
}
