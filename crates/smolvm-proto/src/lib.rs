//! Wire types shared by the smolvm host and its guest agent.
//!
//! The channel between host and agent is one byte stream (a virtio-serial port here, vsock where
//! the VMM offers it). Many requests share it at once, so every message travels in a frame that
//! names its stream:
//!
//! ```text
//! u32 LE  length of what follows (stream id + payload)
//! u32 LE  stream id (chosen by the side that opens the stream)
//! ...     payload: one postcard-encoded `Request` (host to guest) or `Reply` (guest to host)
//! ```
//!
//! A stream starts with the host's first request on a fresh id and ends with the guest's
//! terminal reply (see [`Reply::is_terminal`]). The crate does no I/O so that the blocking agent
//! and the async host share exactly one codec.

pub mod env;
pub mod paths;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bumped whenever a message changes shape; the host refuses an agent of another version
/// because postcard is not self-describing and a mismatch would decode as garbage.
pub const PROTOCOL_VERSION: u32 = 10;

/// What a supervisor writes first on every client connection, before any frame: these four
/// bytes, then its `PROTOCOL_VERSION` (u32, little-endian). A sandbox can outlive an upgrade of
/// smolvm, and its supervisor keeps running the build that started it; a client of another
/// build learns so before it sends a request the two would encode differently (a request read
/// as another one). This never changes, whatever the version.
pub const SUPERVISOR_MAGIC: [u8; 4] = *b"smvS";

/// The preamble of [`SUPERVISOR_MAGIC`], for this build.
pub fn supervisor_preamble() -> [u8; 8] {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(&SUPERVISOR_MAGIC);
    p[4..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    p
}

/// The protocol version a supervisor's preamble names; `None` for bytes that are no preamble.
pub fn preamble_version(p: [u8; 8]) -> Option<u32> {
    (p[..4] == SUPERVISOR_MAGIC).then(|| u32::from_le_bytes([p[4], p[5], p[6], p[7]]))
}

/// Name of the virtio-serial port the agent listens on.
pub const AGENT_PORT_NAME: &str = "smolvm.agent";

/// Where the VMM offers vsock (Firecracker, QEMU with a vsock device): the host port the agent
/// connects to. On the host it is the Unix socket `<vsock socket>_1024`, Firecracker's and
/// vhost-device-vsock's convention for connections the guest makes.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Frames larger than this are a protocol error: it bounds what a confused or hostile guest can
/// make the host allocate.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// Output is cut into chunks of at most this many bytes so that many streams interleave fairly.
pub const CHUNK: usize = 64 * 1024;

/// How many bytes of output (`Stdout`, `Stderr`, `Data` payloads) a stream may have in flight
/// before its reader grants more with `Credit`; the same holds for a command's input and an
/// upload's data, which the agent grants back with `Reply::Credit` as it takes them. The sender stops there (a command then blocks on
/// its full pipe), so a guest that writes faster than its reader takes in (`yes`, a download to a
/// slow consumer) holds at most this much in the host per stream. A reader that receives more than
/// this plus one chunk beyond its grants has a misbehaving peer and ends that stream.
pub const WINDOW: usize = 2 * 1024 * 1024;

/// The least an output frame counts against its stream's window, however few bytes it carries
/// (none, say): each frame costs its reader memory of its own, so a stream has at most
/// `WINDOW / FRAME_COST` frames in flight. Both ends count so where the agent says it does
/// (`CAP_FRAME_COST` in its Hello); an older agent, in a snapshot made before, counts the
/// payload's bytes alone, and its host then does too.
pub const FRAME_COST: usize = 64;

/// The capability an agent names in its Hello when it counts output by `window_bytes`.
pub const CAP_FRAME_COST: &str = "frame-cost";

/// A reader grants credit in steps of this many consumed bytes (one small frame each).
pub const CREDIT_STEP: usize = 256 * 1024;

/// The agent writes `smolvm-agent: <this>` to the console as it powers the VM off on request
/// (the host's `Shutdown`, or in the guest `poweroff`, `halt`, `reboot`, `kill -TERM 1`). A VM
/// that exits after it was stopped, not failed: its reset looks like a panic's to the VMM.
pub const POWER_OFF_MARK: &str = "powering off";

/// A supervisor's answer (with `ErrorKind::Closed`) to a request that came after its guest
/// had gone: the request never reached a running sandbox, so its client says the sandbox is
/// not running, not that it went away under the request.
pub const GONE_BEFORE: &str = "the sandbox was no longer running when the request came";

/// The agent's answer to a greeting is a frame of at least this many bytes (a test in the agent
/// holds it to that), as was every older agent's. So after a greeting, a host may read this many
/// bytes, plus the sync marker's 16, without waiting for more than any agent sends: enough to
/// tell an agent that sends no marker by its whole answer.
pub const HELLO_MIN_FRAME: usize = 46;

/// Stream id reserved for messages that belong to no stream (never used by requests).
pub const NO_STREAM: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    FrameTooLarge(usize),
    #[error("frame shorter than its header")]
    Truncated,
    #[error("undecodable message")]
    Decode(#[from] postcard::Error),
}

/// Which shell runs an exec'd command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Shell {
    /// `$SHELL -lc CMD`: a login shell, so /etc/profile and /etc/profile.d are sourced.
    #[default]
    Login,
    /// `/bin/sh -c CMD`, no profile.
    Raw,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub command: String,
    pub shell: Shell,
    /// Extra variables for this process only, on top of the agent's base environment.
    pub env: BTreeMap<String, String>,
    /// Kill the whole process group after this many milliseconds; 0 means no limit.
    pub timeout_ms: u64,
    /// When false stdin is /dev/null; when true the host sends `Stdin` frames and `StdinClose`.
    pub stdin: bool,
    pub cwd: Option<String>,
    /// Run on a terminal of this size instead of pipes (an interactive shell, `exec -t`): the
    /// command's stdin, stdout and stderr are one pseudo-terminal, whose output comes back as
    /// `Stdout` (the terminal merges the two streams); `Resize` changes its size.
    pub tty: Option<TtySize>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// First message after every boot or restore: the protocol version, the host's clock (a
    /// guest has no RTC, and a restored one lags by the snapshot's age), the sandbox's hostname
    /// (a clone must not keep its snapshot's), and fresh entropy that the agent mixes in and
    /// reseeds the kernel's RNG with (clones of one snapshot must not share random state).
    Hello {
        version: u32,
        unix_time_ns: u128,
        hostname: String,
        #[serde(with = "serde_bytes")]
        entropy: Vec<u8>,
        /// How to configure the guest's network (eth0); `None` leaves it down.
        net: Option<NetConfig>,
        /// Written raw (outside any frame) just before the answer: the host reads nothing as
        /// a frame until it has seen these bytes. A guest restored from a snapshot may have
        /// been half way through writing a frame to its previous host, and sends the rest
        /// first. The host picks them at random, so no output can contain them.
        sync: Option<[u8; 16]>,
        /// Host directories to mount now: a guest restored from a warm template, which has
        /// their devices but was saved before anything was mounted (a mounted 9p share cannot
        /// be saved). A booted guest has them from its kernel command line instead.
        mounts: Vec<Share>,
    },
    /// Round trip without a process, for health checks and benchmarks.
    Ping,
    Exec(ExecRequest),
    /// Input for the stream: a process's stdin, or the bytes of an upload.
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    /// End of that input (the upload is complete).
    StdinClose,
    /// Receive a file (or, with `tar`, a directory as a tar stream) at the absolute `path`,
    /// sent as `Stdin` frames and `StdinClose`. Parents are created; the file appears whole
    /// (temp file, then rename). Answered with `Ok`.
    FilePut {
        path: String,
        mode: u32,
        tar: bool,
    },
    /// Send the file at `path` as `Data` frames, ending with `FileDone`; a directory is sent
    /// as a tar stream.
    FileGet {
        path: String,
    },
    /// Kill the stream's process group now (client gone, host-side deadline, Ctrl-C).
    Cancel,
    EnvList,
    EnvSet {
        vars: BTreeMap<String, String>,
        merge: bool,
    },
    EnvUnset {
        keys: Vec<String>,
    },
    /// Kill every process, sync and unmount disks, then power the VM off.
    Shutdown,
    /// Supervisor-level: stop the sandbox (handled by the host supervisor, never the agent).
    Stop {
        timeout_ms: u64,
    },
    /// Supervisor-level: describe the sandbox.
    Info,
    /// Supervisor-level: for how long the VM's CPUs were stopped (paused, saved) in the last
    /// `ms` milliseconds, a stop under way included; answered with `Stopped`. The guest's clock
    /// stood still meanwhile: a host-side bound on a command does not count that time.
    StoppedWithin {
        ms: u64,
    },
    /// Supervisor-level: freeze the VM's CPUs (processes keep their state).
    Pause,
    /// Supervisor-level: thaw it.
    Resume,
    /// Supervisor-level: forward 127.0.0.1:`host` (0 = any free port) to the guest's port.
    Expose {
        guest: u16,
        host: u16,
    },
    /// Supervisor-level: stop forwarding to that guest port.
    Unexpose {
        guest: u16,
    },
    /// Supervisor-level: save the VM into `dir` (`full`: memory, devices and disk; `disk`).
    Snapshot {
        dir: String,
        kind: SnapshotKind,
    },
    /// The stream's reader has taken this many more bytes of its output: the sender may have
    /// that many more in flight (see [`WINDOW`]).
    Credit(u32),
    /// The stream's terminal (`ExecRequest::tty`) has a new size; its programs get `SIGWINCH`.
    Resize(TtySize),
    /// The TCP ports something in the guest listens on (any address, IPv4 or IPv6): answered
    /// with `Ports`.
    Listening,
    /// Set the guest's clock to the host's (Unix time in ns): its clock stood still while its
    /// CPUs were stopped (a pause, a save), and a greeting that waited in the channel during a
    /// boot is that much behind. Answered with `Ok`.
    Clock {
        unix_time_ns: u128,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request was malformed or named something invalid.
    Invalid,
    /// A command or path does not exist.
    NotFound,
    /// The guest could not carry the request out (I/O error, spawn failure).
    Failed,
    /// The request is not served by this side of the channel.
    Unsupported,
    /// The sandbox is going away.
    Closed,
    /// The VM is paused: nothing runs until it is resumed.
    Paused,
}

/// The guest's side of its network: address, prefix length, gateway and DNS server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub address: [u8; 4],
    pub prefix: u8,
    pub gateway: [u8; 4],
    pub dns: [u8; 4],
}

impl NetConfig {
    /// The `smolvm_net=` value on a cold boot's kernel command line: the agent brings the NIC
    /// up while it boots instead of after the greeting (under TCG that is milliseconds the
    /// first command would otherwise wait for). `ADDRESS/PREFIX,GATEWAY,DNS`.
    pub fn to_boot_arg(&self) -> String {
        let ip = std::net::Ipv4Addr::from;
        format!("{}/{},{},{}", ip(self.address), self.prefix, ip(self.gateway), ip(self.dns))
    }

    pub fn from_boot_arg(value: &str) -> Option<NetConfig> {
        let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().ok().map(|a| a.octets());
        let mut fields = value.split(',');
        let (address, prefix) = fields.next()?.split_once('/')?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
        let (gateway, dns) = (ip(fields.next()?)?, ip(fields.next()?)?);
        if fields.next().is_some() {
            return None;
        }
        Some(NetConfig { address: ip(address)?, prefix, gateway, dns })
    }
}

/// A host directory the guest mounts over 9p: its device's tag, where, and whether read-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub tag: String,
    pub path: String,
    pub readonly: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// Memory, device state and disk: a clone continues where the sandbox was.
    Full,
    /// The root disk only: a clone boots fresh from it.
    Disk,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Hello {
        version: u32,
        agent_version: String,
        capabilities: Vec<String>,
    },
    Pong,
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A chunk of a downloaded file.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Terminal reply of a download: the file's mode, its size, and whether `Data` was a tar.
    FileDone {
        mode: u32,
        size: u64,
        tar: bool,
    },
    /// Terminal reply of an exec. `code` follows the shell convention: 128+N for signal N.
    Exit {
        code: i32,
        timed_out: bool,
    },
    Env(BTreeMap<String, String>),
    /// Sorted names present after an `EnvSet`.
    EnvNames(Vec<String>),
    /// Removed keys with their old values.
    EnvRemoved(BTreeMap<String, String>),
    Info(String),
    /// The host port of an exposed guest port.
    Port(u16),
    Ok,
    Error {
        kind: ErrorKind,
        message: String,
    },
    /// The command has taken this many more bytes of the stream's input (`Stdin`): the host may
    /// have that many more in flight (see [`WINDOW`]). Not terminal.
    Credit(u32),
    /// TCP ports with a listener (`Listening`), ascending.
    Ports(Vec<u16>),
    /// Milliseconds the VM's CPUs were stopped (`StoppedWithin`).
    Stopped(u64),
    /// The request is still being worked on, and its answer comes later (a big directory's
    /// extraction, said every few seconds: the host bounds a transfer by its silence). Not
    /// terminal.
    GoingOn,
}

impl Reply {
    /// The variant's name, for messages about a reply that was not expected. Never the reply
    /// itself: env replies carry values (which may be secrets), output chunks the user's data.
    pub fn kind(&self) -> &'static str {
        match self {
            Reply::Hello { .. } => "hello",
            Reply::Pong => "pong",
            Reply::Stdout(_) => "stdout",
            Reply::Stderr(_) => "stderr",
            Reply::Data(_) => "data",
            Reply::FileDone { .. } => "file done",
            Reply::Exit { .. } => "exit",
            Reply::Env(_) => "env",
            Reply::EnvNames(_) => "env names",
            Reply::EnvRemoved(_) => "env removed",
            Reply::Info(_) => "info",
            Reply::Port(_) => "port",
            Reply::Ok => "ok",
            Reply::Error { .. } => "error",
            Reply::Credit(_) => "credit",
            Reply::Ports(_) => "ports",
            Reply::Stopped(_) => "stopped",
            Reply::GoingOn => "going on",
        }
    }

    /// What this reply counts against the stream's window: its output's bytes, and at least
    /// `FRAME_COST` for an output frame.
    pub fn window_bytes(&self) -> usize {
        match self {
            Reply::Stdout(d) | Reply::Stderr(d) | Reply::Data(d) => d.len().max(FRAME_COST),
            _ => 0,
        }
    }

    /// The bytes of output this reply carries (what an agent without `CAP_FRAME_COST` counts).
    pub fn payload_len(&self) -> usize {
        match self {
            Reply::Stdout(d) | Reply::Stderr(d) | Reply::Data(d) => d.len(),
            _ => 0,
        }
    }

    /// Whether this reply closes its stream: all do but output chunks, input credit and word
    /// that the work goes on.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, Reply::Stdout(_) | Reply::Stderr(_) | Reply::Data(_) | Reply::Credit(_) | Reply::GoingOn)
    }

    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Reply {
        Reply::Error { kind, message: message.into() }
    }
}

/// The TCP ports in LISTEN state in Linux's `/proc/net/tcp` or `tcp6` text (both may be
/// given, one after the other), ascending and each once. Lines that do not read so are skipped.
pub fn listening_ports(proc_net_tcp: &str) -> Vec<u16> {
    // "  sl  local_address rem_address   st ...": "0100007F:1F90 00000000:0000 0A" (0A: LISTEN).
    let mut ports: Vec<u16> = proc_net_tcp
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let (local, _remote, state) = (fields.next()?, fields.next()?, fields.next()?);
            let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            (state == "0A").then_some(port)
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Encode one frame: header plus postcard payload.
pub fn encode<T: Serialize>(stream: u32, msg: &T) -> Result<Vec<u8>, ProtoError> {
    let mut head = Vec::with_capacity(64);
    head.extend_from_slice(&[0u8; 4]);
    head.extend_from_slice(&stream.to_le_bytes());
    let mut out = postcard::to_extend(msg, head)?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge(len));
    }
    out[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    out[4..8].copy_from_slice(&stream.to_le_bytes());
    Ok(out)
}

/// Reads the length prefix of a frame: how many more bytes to read after these four.
pub fn frame_len(header: [u8; 4]) -> Result<usize, ProtoError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge(len));
    }
    if len < 4 {
        return Err(ProtoError::Truncated);
    }
    Ok(len)
}

/// Decode the body of a frame (everything after the length prefix).
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<(u32, T), ProtoError> {
    if body.len() < 4 {
        return Err(ProtoError::Truncated);
    }
    let stream = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
    Ok((stream, postcard::from_bytes(&body[4..])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_described_by_its_kind_never_its_contents() {
        let secret = "sk-live-0123456789";
        let env: BTreeMap<String, String> = [("API_KEY".to_string(), secret.to_string())].into();
        for reply in [Reply::Env(env.clone()), Reply::EnvRemoved(env), Reply::Stdout(secret.into()), Reply::Info(secret.into())] {
            assert!(!reply.kind().contains(secret) && !reply.kind().is_empty());
        }
        assert_eq!(Reply::Env(Default::default()).kind(), "env");
    }

    #[test]
    fn net_config_survives_the_kernel_command_line() {
        let cfg = NetConfig { address: [172, 30, 0, 6], prefix: 30, gateway: [172, 30, 0, 5], dns: [172, 30, 0, 5] };
        assert_eq!(cfg.to_boot_arg(), "172.30.0.6/30,172.30.0.5,172.30.0.5");
        assert_eq!(NetConfig::from_boot_arg(&cfg.to_boot_arg()), Some(cfg));
        for bad in [
            "",
            "1.2.3.4",
            "1.2.3.4/33,1.1.1.1,1.1.1.1",
            "1.2.3/24,1.1.1.1,1.1.1.1",
            "1.2.3.4/24,1.1.1.1",
            "1.2.3.4/24,1.1.1.1,1.1.1.1,x",
            "1.2.3.256/24,1.1.1.1,1.1.1.1",
        ] {
            assert_eq!(NetConfig::from_boot_arg(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn listening_ports_come_from_proc_net_tcp() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1235 1 0000000000000000 100 0 0 10 0
   2: 0F02000A:C350 0202000A:0050 01 00000000:00000000 00:00000000 00000000     0        0 1236 1 0000000000000000 20 4 0 10 -1
";
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000
   1: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000
   2: garbage
";
        // 8080 on both families once; 53 on loopback; 22 on v6; the connected socket is no listener.
        assert_eq!(listening_ports(&format!("{tcp}{tcp6}")), vec![22, 53, 8080]);
        assert_eq!(listening_ports(""), Vec::<u16>::new());
    }

    #[test]
    fn frame_round_trip() {
        let req = Request::Exec(ExecRequest {
            command: "echo héllo".into(),
            shell: Shell::Raw,
            env: [("A".to_string(), "1".to_string())].into(),
            timeout_ms: 5,
            stdin: false,
            cwd: None,
            tty: Some(TtySize { rows: 24, cols: 80 }),
        });
        let bytes = encode(7, &req).unwrap();
        let len = frame_len(bytes[0..4].try_into().unwrap()).unwrap();
        assert_eq!(len, bytes.len() - 4);
        let (stream, back): (u32, Request) = decode(&bytes[4..]).unwrap();
        assert_eq!(stream, 7);
        assert_eq!(back, req);
    }

    #[test]
    fn oversized_and_short_frames_are_refused() {
        assert!(matches!(frame_len(((MAX_FRAME + 1) as u32).to_le_bytes()), Err(ProtoError::FrameTooLarge(_))));
        assert!(matches!(frame_len(2u32.to_le_bytes()), Err(ProtoError::Truncated)));
        assert!(decode::<Reply>(&[1, 0]).is_err());
        assert!(decode::<Reply>(&[1, 0, 0, 0, 250, 250]).is_err());
    }

    #[test]
    fn only_output_is_non_terminal() {
        assert!(!Reply::Stdout(vec![]).is_terminal());
        assert!(!Reply::Stderr(vec![]).is_terminal());
        assert!(Reply::Exit { code: 0, timed_out: false }.is_terminal());
        assert!(Reply::Pong.is_terminal());
    }
}
