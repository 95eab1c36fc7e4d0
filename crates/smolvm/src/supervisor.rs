//! The per-sandbox supervisor: a small process (the `smolvm` binary's hidden `__supervise`
//! command) that owns the VMM child and the agent channel for the sandbox's whole life and
//! serves any number of clients on a 0600 Unix socket. Clients speak the agent protocol to it;
//! it forwards each stream to the agent and handles `Stop`/`Info` itself.
//!
//! The process that starts it passes a [`BootSpec`] on stdin and reads one status line from
//! stdout: `{"ok":true}` once the agent answered and the env is injected, or an error.

use crate::config::Dirs;
use crate::conn::{read_frame, Conn};
use crate::error::{within, Error, IoContext, Result};
use crate::image::BootImage;
use crate::sandbox::{console_tail, SandboxPaths};
use crate::store::{ProcId, State, Store};
use crate::vmm::{qemu, Accel};
use serde::{Deserialize, Serialize};
use smolvm_proto::SnapshotKind;
use smolvm_proto::{self as proto, ErrorKind, Reply, Request};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootSpec {
    pub image: BootImage,
    pub accel: Accel,
    pub boot_timeout_ms: u64,
    pub verbose_boot: bool,
    /// Start from a saved VM state instead of booting.
    pub restore: Option<RestoreSpec>,
    /// Guest RAM in a file (warm templates and their clones).
    pub ram: Option<qemu::RamFile>,
    /// The agent over vsock (`SMOLVM_AGENT_TRANSPORT=vsock`) instead of virtio-serial.
    #[serde(default)]
    pub vsock: bool,
    /// The q35 machine (`SMOLVM_MACHINE`, or a QEMU without microvm) instead of microvm.
    #[serde(default)]
    pub q35: bool,
    /// The sandbox's shares are devices only, mounted by nothing: a warm template's boot
    /// (see `LaunchSpec::mount_at_boot`).
    #[serde(default)]
    pub unmounted_shares: bool,
    /// No balloon device (`LaunchSpec::balloon`): to load a state saved by a build that had
    /// none.
    #[serde(default)]
    pub no_balloon: bool,
    /// A warm clone of an image with a root disk: its template's disk, which the clone's
    /// overlay starts as a copy of (`image::overlay`).
    #[serde(default)]
    pub warm_disk: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreSpec {
    /// The device and memory state stream written by a `full` snapshot.
    pub state: PathBuf,
    /// Run the VM once restored; otherwise it stays paused until resumed.
    pub resume: bool,
    /// The saved guest is known to hold no environment variables (warm templates are made
    /// without), so there is none to ask about: one round trip less on a warm start.
    #[serde(default)]
    pub no_saved_env: bool,
}

/// The supervisor's one status line.
#[derive(Debug, Serialize, Deserialize)]
pub struct StartStatus {
    pub ok: bool,
    pub code: Option<String>,
    pub message: Option<String>,
    pub console: Option<String>,
}

type Done = oneshot::Sender<std::result::Result<(), (ErrorKind, String)>>;

enum Control {
    Stop {
        timeout: Duration,
        done: Done,
    },
    Pause {
        done: Done,
    },
    Resume {
        done: Done,
    },
    Snapshot {
        dir: PathBuf,
        kind: SnapshotKind,
        done: Done,
    },
    Expose {
        guest: u16,
        host: u16,
        done: oneshot::Sender<std::result::Result<u16, (ErrorKind, String)>>,
    },
    Unexpose {
        guest: u16,
        done: Done,
    },
    /// A connection of the process an ephemeral sandbox belongs to opened or closed.
    OwnerConnected,
    OwnerGone,
}

impl Control {
    /// Its client's task has stopped waiting for it (past its bound, behind a long snapshot
    /// say): it is not carried out late. A stop always is.
    fn abandoned(&self) -> bool {
        match self {
            Control::Pause { done } | Control::Resume { done } | Control::Snapshot { done, .. } | Control::Unexpose { done, .. } => {
                done.is_closed()
            }
            Control::Expose { done, .. } => done.is_closed(),
            Control::Stop { .. } | Control::OwnerConnected | Control::OwnerGone => false,
        }
    }
}

/// Why the supervisor's main loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// QEMU (or the vsock device's server) exited by itself.
    Exited,
    /// The guest stopped its CPUs for good; QEMU lives on.
    Halted,
    /// A stop, a signal, or an ephemeral sandbox's owner going away.
    Asked,
    /// The guest's kernel panicked and does not reset (see [`PANICKED`]); QEMU lives on.
    Panicked,
    /// The agent's channel closed while the VM runs on: something in the guest took over or
    /// broke the agent's port (it is root there), or the agent died. Nothing can reach the
    /// guest any more, so the VM is stopped and the sandbox failed, with why.
    AgentLost,
}

const AGENT_LOST: &str = "the guest agent's channel broke while the VM ran (a process in the guest wrote to the agent's port, or the agent died); the VM was stopped: start the sandbox again";

/// How often the supervisor asks QEMU whether the guest has stopped its CPUs for good, while
/// something waits on an agent that has said nothing for as long, and otherwise.
///
/// `halt -f` does that, and so does `poweroff -f` (without ACPI, which the microvm kernel
/// leaves out, a power-off is a halt): QEMU then lives on, and all that waits on the agent would
/// wait out its bound. The agent's silence alone proves nothing (a frozen or swamped agent is
/// silent too); the vCPUs' state does (`Qmp::cpus_stopped_for_good`). Asking costs QEMU a
/// register dump and the guest nothing under TCG.
const SILENT_LOOK: Duration = Duration::from_secs(2);
const IDLE_LOOK: Duration = Duration::from_secs(10);

/// A guest kernel that panics resets the VM (`panic=-1`), which ends QEMU, and the sandbox is
/// failed with the console's lines. But root in the guest may set `kernel.panic` to 0: the
/// kernel then spins where it panicked, QEMU lives on at a whole core, and every command waited
/// out its timeout with the sandbox `running`. So the console is read for the panic's last
/// line whenever the vCPUs are (`SILENT_LOOK`).
const PANICKED: &str = "the guest kernel panicked (set not to restart, it spun on): the VM was stopped";

/// Whether the console, from `from` on (this boot's part), holds a kernel panic's last line.
fn panicked_since(console: &std::path::Path, from: u64) -> bool {
    console_since(console, from).windows(PANIC_END.len()).any(|w| w == PANIC_END)
}

/// The console from `from` on, at most its last 16 KiB.
fn console_since(console: &std::path::Path, from: u64) -> Vec<u8> {
    use std::io::{Read, Seek};
    let Ok(mut f) = std::fs::File::open(console) else { return Vec::new() };
    let len = f.metadata().map_or(0, |m| m.len());
    let start = from.max(len.saturating_sub(16 << 10));
    let mut tail = Vec::new();
    if start >= len || f.seek(std::io::SeekFrom::Start(start)).is_err() || f.read_to_end(&mut tail).is_err() {
        return Vec::new();
    }
    tail
}

/// The line the kernel ends a panic's report with (`---[ end Kernel panic - not syncing: …`).
const PANIC_END: &[u8] = b"---[ end Kernel panic";

/// What the kernel says on its way to a halt (`halt -f`, and `poweroff -f` without ACPI),
/// before it stops the CPUs.
const HALTING: [&[u8]; 2] = [b"reboot: System halted", b"reboot: Power down"];

/// Whether the guest has stopped its CPUs for good, or is about to: a halt its kernel has
/// announced on the console is waited for (up to `HOLD_BOUND`), since a pause or snapshot taken
/// in between would hold a guest that halts the moment it runs again. (A guest that merely
/// prints those words delays the pause or snapshot by that bound, nothing more.)
async fn halted_or_halting(qmp: &mut qemu::Qmp, console: &Path, from: u64) -> bool {
    if halted_for_good(qmp).await {
        return true;
    }
    let tail = console_since(console, from);
    if !HALTING.iter().any(|m| tail.windows(m.len()).any(|w| w == *m)) {
        return false;
    }
    let deadline = Instant::now() + HOLD_BOUND;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if halted_for_good(qmp).await {
            return true;
        }
        // A power-off's QEMU exits instead (ACPI, on q35): no halt is coming.
        if bounded(qmp.execute("query-status"), "asking QEMU for the VM's state").await.is_err() {
            return false;
        }
    }
    false
}

/// What a pause or snapshot of a halted guest is answered; the sandbox is then stopped.
const HALTED: &str = "guest agent: the guest has stopped its CPUs for good (halt -f or poweroff -f inside it); the sandbox is now stopped";

/// What a client asking for anything but a resume hears while the VM is paused.
pub const PAUSED: &str = "the VM is paused; resume it first";

/// Whether QEMU has paused the VM itself because a write to its disk found the host's disk
/// full (`werror=enospc`, QEMU's default): the guest saw no error, and a resume retries the
/// write. Nothing else said so: the sandbox read as running, and each command waited out its
/// timeout.
async fn stopped_for_space(qmp: &mut qemu::Qmp) -> bool {
    bounded(qmp.execute("query-status"), "asking QEMU for the VM's state").await.is_ok_and(|v| v["status"] == "io-error")
}

/// Why a VM `stopped_for_space` is paused, and the way on.
fn out_of_space(disk: &Path, id: &str) -> String {
    let dir = disk.parent().unwrap_or(disk);
    format!(
        "the host's disk is full: a write to this sandbox's disk (under {}) found no space left, so QEMU paused the VM, losing nothing; free space there, then resume it (smolvm sandbox resume {id})",
        dir.display()
    )
}

async fn halted_for_good(qmp: &mut qemu::Qmp) -> bool {
    let halted = bounded(qmp.cpus_stopped_for_good(), "asking QEMU about the vCPUs").await.unwrap_or(false);
    if halted {
        tracing::warn!("the guest stopped its CPUs for good (halt -f, or poweroff -f, which is a halt without ACPI)");
    }
    halted
}

/// Whether a VM that exited by itself was shut down from inside rather than crashed, from its
/// console's last lines. The agent marks its own power-off (`poweroff`, `reboot`, SIGTERM to
/// PID 1); the kernel's `reboot(2)` (`reboot -f`, and the agent's own reset) ends with its
/// "reboot: Restarting system". A panic resets the VM too (`panic=-1`), but says so first.
fn shut_down_from_inside(tail: &str) -> bool {
    let mark = format!("smolvm-agent: {}", proto::POWER_OFF_MARK);
    let last: Vec<&str> = tail.lines().rev().take(5).map(str::trim_end).collect();
    !tail.contains("Kernel panic")
        && last.iter().any(|l| l.ends_with(&mark) || l.ends_with("reboot: Restarting system") || l.ends_with("reboot: Power down"))
}

/// Entry point of `smolvm __supervise ID`. Returns the process exit code.
pub fn main(id: &str) -> i32 {
    // It outlives the terminal it was started from: a hangup (the terminal closed, or a stray
    // `kill -HUP`) must not end the sandbox's supervisor. (QEMU sets its own handler.)
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler; nothing else in
    // this process has touched SIGHUP yet.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("supervisor: cannot start a runtime: {e}");
            return 1;
        }
    };
    // A single-threaded runtime on the main thread: QEMU's PDEATHSIG follows the thread that
    // spawned it, and this thread lives exactly as long as the supervisor.
    rt.block_on(supervise(id))
}

fn report(status: &StartStatus) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(status).expect("status serializes"));
    let _ = out.flush();
}

fn fail(code: &str, message: String, console: Option<String>) -> i32 {
    report(&StartStatus { ok: false, code: Some(code.into()), message: Some(message), console });
    1
}

/// Replace fd 1 with /dev/null so the starter's pipe closes and later prints go nowhere.
fn detach_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1);
    }
}

/// What the guest must be told after every boot or restore, before the first command.
struct Greeting {
    hostname: String,
    env: BTreeMap<String, String>,
    /// A guest that may carry variables of an earlier run: restored from a snapshot, or booted
    /// from its own root disk.
    saved_env: bool,
    /// The guest was restored from a saved state (a warm start, a snapshot's restore).
    restored: bool,
    /// Only for a restored guest: a booted one has it from its kernel command line.
    net: Option<proto::NetConfig>,
    /// The agent channel's first frame follows these bytes (`Request::Hello`'s `sync`).
    sync: [u8; 16],
    /// Only for a restored guest (a warm start): a booted one mounts its shares from its
    /// kernel command line.
    mounts: Vec<proto::Share>,
}

/// From the kernel's CSPRNG: neither the guest nor what runs in it may guess them.
fn random<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .ctx(|| "reading /dev/urandom".into())?;
    Ok(bytes)
}

/// How this sandbox is networked, decided once at start.
struct NetPlan {
    mode: crate::net::Mode,
    lease: Option<crate::net::Lease>,
    tap: String,
    /// The TAP, held open (NAT only): see `net::open_tap`.
    tap_fd: Option<std::os::fd::OwnedFd>,
    table: String,
    /// The table's comment: whose it is (`net::table_comment`).
    owner: String,
    internet: crate::config::InternetSettings,
    backend: qemu::NetBackend,
    /// User mode: exposed at launch as (guest, host).
    user_forwards: Vec<(u16, u16)>,
    /// NAT: this process's host-wide claim on its slot (see `Store::lease`); none in a
    /// namespace of its own, where the addresses are its alone.
    _slot_claim: Option<crate::net::SlotClaim>,
    /// NAT without root: the helper that makes the host's sockets (see `rootless`).
    host_side: Option<Arc<crate::rootless::HostSide>>,
    /// True while `nft_apply` runs. It runs on a blocking thread that goes on when a failed
    /// boot drops its future: `cleanup` waits for it, else the table would be made after its
    /// removal and stay.
    applying: std::sync::Arc<(Mutex<bool>, std::sync::Condvar)>,
}

/// A free port on 127.0.0.1 (for QEMU's hostfwd, which cannot pick one itself).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").ctx(|| "finding a free port".into())?;
    Ok(l.local_addr().ctx(|| "finding a free port".into())?.port())
}

impl NetPlan {
    fn new(id: &str, config: &crate::config::VmConfig, store: &mut Store) -> Result<NetPlan> {
        use crate::net::Mode;
        let mut mode = Mode::resolve(config.network.as_deref())?;
        let internet = config.internet_settings.clone().unwrap_or_default();
        let (mut host_side, mut no_nat) = (None, None);
        if mode == Mode::Nat && !nix::unistd::geteuid().is_root() {
            match crate::rootless::enter() {
                Ok(side) => host_side = Some(Arc::new(side)),
                // Asked for by default only, and nothing changed yet: user networking, as on a
                // host without what NAT needs.
                Err(e) if !e.entered && config.network.is_none() => {
                    tracing::warn!("NAT networking without root is not possible here ({}); using user-mode networking", e.message);
                    mode = Mode::User;
                    no_nat = Some(e.message);
                }
                Err(e) => return Err(e.into()),
            }
        }
        // User networking cannot filter: a restriction must never quietly become open.
        if mode != Mode::Nat && internet.mode == "restricted" {
            return Err(Error::validation(
                "internet_settings",
                format!(
                    "'restricted' needs NAT networking, which is not available here ({})",
                    no_nat.or_else(|| crate::net::nat_available().err()).unwrap_or_default()
                ),
            ));
        }
        // A lease an earlier NAT run kept (its table could not be removed) goes here, with its
        // table, where this run takes none; a NAT run takes it over, and its load replaces the
        // table.
        if mode != Mode::Nat {
            crate::sandbox::host_network_leftovers(store, id);
        }
        let mut plan = NetPlan {
            mode,
            lease: None,
            tap: crate::net::tap_name(store.data_dir(), id),
            tap_fd: None,
            table: crate::net::table_name(store.data_dir(), id),
            owner: crate::net::table_comment(store.data_dir(), id),
            internet,
            backend: qemu::NetBackend::User { restrict: true, forwards: vec![] },
            user_forwards: vec![],
            _slot_claim: None,
            host_side,
            applying: Default::default(),
        };
        match mode {
            Mode::Nat => {
                let (slot, claim) = match plan.host_side {
                    Some(_) => store.lease(id, crate::net::TAP_HANDOVER, |_| Some(None))?,
                    None => {
                        let claims = crate::net::claims_dir()?;
                        store.lease(id, crate::net::TAP_HANDOVER, |s| crate::net::claim_slot(&claims, s).map(Some))?
                    }
                };
                plan.lease = Some(crate::net::Lease(slot));
                plan._slot_claim = claim;
                let fd = crate::net::open_tap(&plan.tap)?;
                plan.backend = qemu::NetBackend::Tap { fd: std::os::fd::AsRawFd::as_raw_fd(&fd) };
                plan.tap_fd = Some(fd);
            }
            Mode::User => {
                for p in &config.port_forwards {
                    let host = match p.host {
                        Some(h) => {
                            // QEMU listens on it itself, and a port taken failed its start as a
                            // boot error (which also threw the warm template away): said here,
                            // by the field, as NAT says it.
                            std::net::TcpListener::bind(("127.0.0.1", h))
                                .map_err(|e| Error::validation("port_forwards", format!("cannot listen on 127.0.0.1:{h}: {e}")))?;
                            h
                        }
                        None => free_port()?,
                    };
                    plan.user_forwards.push((p.guest, host));
                }
                let restrict = plan.internet.mode == "off";
                plan.backend = qemu::NetBackend::User { restrict, forwards: plan.user_forwards.iter().map(|(g, h)| (*h, *g)).collect() };
            }
            Mode::None => {}
        }
        Ok(plan)
    }

    fn guest_config(&self) -> Option<proto::NetConfig> {
        match (self.mode, self.lease) {
            (crate::net::Mode::Nat, Some(l)) => {
                Some(proto::NetConfig { address: l.guest().octets(), prefix: 30, gateway: l.host().octets(), dns: l.host().octets() })
            }
            (crate::net::Mode::User, _) => {
                Some(proto::NetConfig { address: [10, 0, 2, 15], prefix: 24, gateway: [10, 0, 2, 2], dns: [10, 0, 2, 3] })
            }
            _ => None,
        }
    }

    /// Host side of NAT: load the sandbox's nftables table, then address the TAP and bring it
    /// up. In that order: the guest may bring its NIC up as soon as it boots (its address is
    /// on the kernel command line), and a TAP that is down drops whatever it sends until the
    /// rules are in place.
    async fn setup_host(&self) -> Result<()> {
        if let Some(lease) = self.lease {
            let (table, owner, tap, internet) = (self.table.clone(), self.owner.clone(), self.tap.clone(), self.internet.clone());
            let rootless = self.host_side.as_ref().map(|h| crate::rootless::blocked(&h.host_local));
            let applying = self.applying.clone();
            *applying.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
            tokio::task::spawn_blocking(move || {
                // Cleared however the load ends (a panic too), else a cleanup waits its bound.
                struct Done(std::sync::Arc<(Mutex<bool>, std::sync::Condvar)>);
                impl Drop for Done {
                    fn drop(&mut self) {
                        *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) = false;
                        self.0 .1.notify_all();
                    }
                }
                let _done = Done(applying);
                crate::net::nft_apply(&table, &owner, &tap, lease, &internet, rootless.as_deref())
            })
            .await
            .map_err(|e| Error::Host(e.to_string()))??;
            crate::net::setup_tap(&self.tap, lease).await?;
        }
        Ok(())
    }

    /// `cleanup`, with the table removed while `stopping` (the VM's graceful shutdown) runs, or
    /// right after a kill's signal, so that it adds little to a stop's (and `smolvm run`'s)
    /// time. The TAP stays held: the caller lets go of it once it has answered.
    async fn cleanup_during(&self, store: &Store, id: &str, graceful: bool, stopping: impl std::future::Future<Output = ()>) {
        let net = self.lease.map(|_| (self.tap.clone(), self.table.clone()));
        if graceful {
            // The TAP goes down before the rules go, so that a guest still running during a
            // graceful stop is cut off first. Both beside the stop, not ahead of it: taking a
            // link down waits for the host kernel (up to 3 ms measured).
            let nft = tokio::task::spawn_blocking(move || {
                net.map(|(tap, table)| {
                    crate::net::tap_down(&tap);
                    crate::net::nft_remove(&table)
                })
            });
            stopping.await;
            let removed = nft.await.unwrap_or_else(|e| Some(Err(Error::Host(e.to_string()))));
            release_unless_left(store, id, removed);
        } else {
            // A VM being killed sends nothing more once the signal is out (`shutdown` does not
            // wait for QEMU's death): its link is left as it is until the TAP goes, and the
            // rules go right after the signal.
            stopping.await;
            release_unless_left(store, id, net.map(|(_, table)| crate::net::nft_remove(&table)));
        }
    }

    /// Remove everything of this sandbox's network from the host, the TAP included.
    fn cleanup(&mut self, store: &Store, id: &str) {
        if self.lease.is_some() {
            let (busy, done) = &*self.applying;
            let busy = busy.lock().unwrap_or_else(|e| e.into_inner());
            let (busy, _) =
                done.wait_timeout_while(busy, crate::net::NFT_BOUND + Duration::from_secs(5), |b| *b).unwrap_or_else(|e| e.into_inner());
            let removed = if *busy {
                // (Its nft is killed at its own bound: this is past anything it could do.)
                Err(Error::Network(format!("nftables: the load of table {} did not end", self.table)))
            } else {
                crate::net::nft_remove(&self.table)
            };
            release_unless_left(store, id, Some(removed));
        }
        self.tap_fd = None;
        if self.lease.is_none() {
            let _ = store.release_network(id);
        }
    }
}

/// Forget the sandbox's network slot unless its table could not be removed (`removed`, `None`
/// where it had none): the lease is what tells the next command (a start, a delete, a prune)
/// that a table is left to remove.
fn release_unless_left(store: &Store, id: &str, removed: Option<Result<()>>) {
    if let Some(Err(e)) = removed {
        tracing::warn!("{} (left for the next command on this sandbox, or a prune)", e.full_message());
        let _ = store.forget_ports(id);
        return;
    }
    let _ = store.release_network(id);
}

/// Exposed ports of a running sandbox: guest port -> (host port, proxy task for NAT).
type Exposed = HashMap<u16, (u16, Option<tokio::task::JoinHandle<()>>)>;

async fn expose(
    plan: &NetPlan,
    qmp: &mut qemu::Qmp,
    exposed: &mut Exposed,
    guest: u16,
    host: u16,
) -> std::result::Result<u16, (ErrorKind, String)> {
    use crate::net::Mode;
    let bad = |m: String| (ErrorKind::Invalid, m);
    if let Some((h, _)) = exposed.get(&guest) {
        // Asked again: the port it has. Asked for another host port: said, not ignored.
        if host != 0 && host != *h {
            return Err(bad(format!("guest port {guest} is already exposed on host port {h}; close it first to expose it on {host}")));
        }
        return Ok(*h);
    }
    if let Some((g, _)) = exposed.iter().find(|(_, (h, _))| host != 0 && *h == host) {
        return Err(bad(format!("host port {host} already carries this sandbox's guest port {g}; close that first, or pick another")));
    }
    match (plan.mode, plan.lease) {
        (Mode::Nat, Some(lease)) => {
            let listener = match &plan.host_side {
                // The host's 127.0.0.1, not the sandbox's namespace's.
                Some(side) => side.tcp_listener(host),
                None => std::net::TcpListener::bind(("127.0.0.1", host)),
            };
            let listener = listener
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    tokio::net::TcpListener::from_std(l)
                })
                .map_err(|e| bad(format!("cannot listen on 127.0.0.1:{host}: {e}")))?;
            let port = listener.local_addr().map_err(|e| bad(e.to_string()))?.port();
            let task = tokio::spawn(crate::net::port_proxy(listener, SocketAddr::from((lease.guest(), guest))));
            exposed.insert(guest, (port, Some(task)));
            Ok(port)
        }
        (Mode::User, _) => {
            // A free port, or the one asked for if it is: QEMU's own refusal says only "Could
            // not set up host forwarding rule" for a port in use, or one below 1024 without
            // root, which are named here first, as for NAT.
            let port = std::net::TcpListener::bind(("127.0.0.1", host))
                .and_then(|l| l.local_addr())
                .map_err(|e| bad(format!("cannot listen on 127.0.0.1:{host}: {e}")))?
                .port();
            let cmd = format!("hostfwd_add net0 tcp:127.0.0.1:{port}-:{guest}");
            let out = qmp
                .execute_args("human-monitor-command", serde_json::json!({ "command-line": cmd }))
                .await
                .map_err(|e| bad(e.full_message()))?;
            if let Some(msg) = out.as_str().filter(|m| !m.trim().is_empty()) {
                return Err(bad(format!("cannot expose port {guest}: {}", msg.trim())));
            }
            exposed.insert(guest, (port, None));
            Ok(port)
        }
        _ => Err(bad("this sandbox has no network (network 'none')".into())),
    }
}

async fn unexpose(plan: &NetPlan, qmp: &mut qemu::Qmp, exposed: &mut Exposed, guest: u16) -> std::result::Result<(), (ErrorKind, String)> {
    let Some((host, forwarded_by_qemu)) = exposed.get(&guest).map(|(host, task)| (*host, task.is_none())) else {
        return Err((ErrorKind::NotFound, format!("guest port {guest} is not exposed")));
    };
    if forwarded_by_qemu && plan.mode == crate::net::Mode::User {
        // QEMU says "host forwarding rule for tcp:… removed" (or "not found"): a port it
        // still forwards stays listed, as what it is (here and in the store).
        let cmd = format!("hostfwd_remove net0 tcp:127.0.0.1:{host}");
        let said = qmp.execute_args("human-monitor-command", serde_json::json!({ "command-line": cmd })).await;
        let said = said.map(|v| v.as_str().unwrap_or_default().trim().to_string()).map_err(|e| e.full_message());
        if !said.as_ref().is_ok_and(|s| s.ends_with("removed")) {
            let why = said.unwrap_or_else(|e| e);
            return Err((ErrorKind::Failed, format!("cannot close port {guest} (host port {host}): {why}")));
        }
    }
    if let Some((_, Some(task))) = exposed.remove(&guest) {
        task.abort();
    }
    Ok(())
}

/// `greet` a guest that was just restored and set running (`cont`). Its greeting, like a cold
/// boot's, sits in QEMU's socket until QEMU's main loop next looks at the channel; a restored
/// guest with nothing else to do may not wake it for a long while (a restore once timed out
/// after 30 s). So QEMU is asked something, which wakes that loop, every 100 ms until the
/// answer comes.
async fn greet_restored(agent: &Arc<Conn>, g: &Greeting, qmp: &mut qemu::Qmp) -> Result<()> {
    let hello = greet(agent, g);
    tokio::pin!(hello);
    loop {
        tokio::select! {
            r = &mut hello => return r,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                // (Bounded: a stuck QMP must not hold up a greeting that has come meanwhile.)
                let _ = tokio::time::timeout(Duration::from_secs(1), qmp.execute("query-status")).await;
            }
        }
    }
}

/// The host's clock, as the guest's is set from it.
fn unix_now_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
}

/// Set the guest's clock to the host's. The answer is not waited for: the frame is out, and
/// the agent reads in order, so what is sent next finds the clock set.
async fn tell_time(agent: &Arc<Conn>) -> Result<()> {
    let mut answer = agent.open(&Request::Clock { unix_time_ns: unix_now_ns() }).await?;
    tokio::spawn(async move { answer.recv().await });
    Ok(())
}

/// `tell_time` on a task of its own, for a guest that has just run on again (a resume, the end
/// of a save): the supervisor's control loop must not wait on a guest that reads nothing (a
/// wedged one), and a clock a moment late is no reason to fail what came before.
fn tell_time_soon(agent: &Arc<Conn>) {
    let agent = agent.clone();
    tokio::spawn(async move {
        match tokio::time::timeout(Duration::from_secs(5), tell_time(&agent)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("setting the guest's clock: {}", e.full_message()),
            Err(_) => tracing::warn!("setting the guest's clock: the agent took no request for 5 s"),
        }
    });
}

async fn greet(agent: &Arc<Conn>, g: &Greeting) -> Result<()> {
    let hello = Request::Hello {
        version: proto::PROTOCOL_VERSION,
        unix_time_ns: unix_now_ns(),
        hostname: g.hostname.clone(),
        entropy: random::<32>()?.to_vec(),
        net: g.net.clone(),
        sync: Some(g.sync),
        mounts: g.mounts.clone(),
    };
    let sent = Instant::now();
    match agent.call(&hello).await? {
        Reply::Hello { version, capabilities, .. } if version == proto::PROTOCOL_VERSION => {
            agent.count_frames(capabilities.iter().any(|c| c == proto::CAP_FRAME_COST));
        }
        Reply::Hello { version, agent_version, .. } => {
            return Err(Error::Guest(format!(
                "agent {agent_version} speaks protocol {version}, this host speaks {}",
                proto::PROTOCOL_VERSION
            )))
        }
        other => return Err(Error::Guest(format!("unexpected reply to hello: {}", other.kind()))),
    }
    // On a cold boot the greeting waits in the channel from QEMU's start until the agent reads
    // it, a few hundred milliseconds, and the guest's clock would lag by that much. Say the time
    // again now that the agent reads at once.
    if !g.restored && sent.elapsed() > Duration::from_millis(20) {
        tell_time(agent).await?;
    }
    // A restored guest carries its snapshot's variables, a root disk those of its last run:
    // replace them with this sandbox's own.
    let needed = !g.env.is_empty() || (g.saved_env && matches!(agent.call(&Request::EnvList).await?, Reply::Env(v) if !v.is_empty()));
    if needed {
        match agent.call(&Request::EnvSet { vars: g.env.clone(), merge: false }).await? {
            Reply::EnvNames(_) => {}
            Reply::Error { message, .. } => return Err(Error::Guest(format!("injecting environment variables: {message}"))),
            other => return Err(Error::Guest(format!("unexpected reply to env set: {}", other.kind()))),
        }
    }
    // A restored guest runs all its code for the first time again (TCG keeps none across a
    // snapshot): what the agent does after answering the greeting (its network, hostname,
    // entropy, the clock itself) takes it tens of milliseconds, and the time it was told is
    // that much behind once set, for good (50-65 ms here). Once a ping has come back, the agent
    // reads at once: the time said then is off by a one-way trip.
    if g.restored {
        agent.call(&Request::Ping).await?;
        tell_time(agent).await?;
    }
    Ok(())
}

/// A saved state's directory is never written once made, but it can be removed and made
/// anew (a warm template discarded by another start and rebuilt, a snapshot deleted and
/// taken again by the same name). If that happened while this start took its disk, state
/// and RAM from it, they may come from two different saves: a guest whose page cache does
/// not match its disk. Such a start fails (a warm start then boots cold) instead of running.
fn same_restore_source(state: &Path, before: crate::warm::Picked) -> Result<()> {
    // Removed (not made again) since: everything was open by then, from that one save.
    let now = crate::warm::picked(state);
    if before.is_some() && (now == before || now.is_none()) {
        return Ok(());
    }
    let dir = state.parent().unwrap_or(Path::new("."));
    Err(Error::Host(format!("{} was removed or replaced while this sandbox was restored from it", dir.display())))
}

/// The start's lock, when the starter passed a copy (see `Sandbox::spawn_supervisor`): held
/// until the boot's outcome is reported, so that a start after a killed starter waits for this
/// boot. Close-on-exec at once: QEMU and nft must not hold it.
fn inherited_start_lock() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let fd = crate::sandbox::START_LOCK_FD;
    if std::env::var(crate::sandbox::START_LOCK_ENV).ok()? != fd.to_string() {
        return None;
    }
    // SAFETY: F_SETFD on a descriptor number; it fails (EBADF) unless fd 3 is open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return None;
    }
    // SAFETY: fd 3 is open (above) and was placed there for this process by its starter;
    // nothing else in the supervisor owns it.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

async fn supervise(id: &str) -> i32 {
    tracing::debug!("phase: supervisor up");
    let start_lock = inherited_start_lock();
    let dirs = Dirs::from_env();
    let paths = SandboxPaths::new(&dirs, id);
    let spec: BootSpec = match serde_json::from_reader(std::io::stdin().lock()) {
        Ok(s) => s,
        Err(e) => return fail("host", format!("supervisor got no boot spec: {e}"), None),
    };
    let mut store = match Store::open(&dirs.data) {
        Ok(s) => s,
        Err(e) => return fail("host", e.full_message(), None),
    };
    let Ok(Some(record)) = store.get(id) else {
        return fail("not_found", format!("VM '{id}' not found: it was deleted while it was starting"), None);
    };
    if let Err(e) = record.usable() {
        return fail("host", e.to_string(), None);
    }
    if let Some(me) = ProcId::of(std::process::id() as i32) {
        let _ = store.set_supervisor(id, me);
    }
    let sync = match random() {
        Ok(marker) => marker,
        Err(e) => {
            let _ = store.set_state(id, State::Error, Some(&e.full_message()));
            return fail(e.code(), e.full_message(), None);
        }
    };
    paths.remove_sockets();
    let _ = std::fs::write(&paths.console, b"");
    // Which saved state this start restores: read before anything is taken from it (the
    // template's disk, the state, its RAM), checked again once QEMU has loaded it (`boot`).
    let restore_source = spec.restore.as_ref().and_then(|r| crate::warm::picked(&r.state));
    let mut image = spec.image.clone();
    if let Some(base) = &image.rootfs {
        // The sandbox writes to its own overlay: the base image is shared and never changes,
        // and the overlay keeps the sandbox's changes across stop and start.
        // The disk's layers are looked at again at each start (a header can change after
        // `create`), before `qemu-img` or QEMU opens what they name. (The overlay, ours, stands
        // on a link to this same file.)
        let overlay = crate::image::check_layers(base, &dirs.data)
            .and_then(|()| crate::image::overlay(base, &paths.overlay, record.config.disk_size_mib, spec.warm_disk.as_deref()));
        match overlay {
            Ok(overlay) => image.rootfs = Some(overlay),
            Err(e) => {
                let _ = store.set_state(id, State::Error, Some(&e.full_message()));
                return fail(e.code(), e.full_message(), None);
            }
        }
    }
    let overlay = image.rootfs.clone();
    let mut plan = match NetPlan::new(id, &record.config, &mut store) {
        Ok(p) => p,
        Err(e) => {
            // A lease held before this start (kept by a run whose table could not be removed)
            // goes only with that table.
            crate::sandbox::host_network_leftovers(&store, id);
            let _ = store.set_state(id, State::Error, Some(&e.full_message()));
            return fail(e.code(), e.full_message(), None);
        }
    };
    let guest_net = plan.guest_config();
    let launch = qemu::LaunchSpec {
        image,
        vcpus: record.config.vcpu_count,
        memory_mib: record.config.memory,
        accel: spec.accel,
        hostname: id.to_string(),
        guest_net: guest_net.clone(),
        extra_boot_args: record.config.boot_args.clone(),
        verbose_boot: spec.verbose_boot,
        agent_socket: paths.agent.clone(),
        qmp_socket: paths.qmp.clone(),
        console_log: paths.console.clone(),
        incoming: spec.restore.as_ref().map(|r| r.state.clone()),
        ram: spec.ram.clone(),
        net: plan.backend.clone(),
        vsock: spec.vsock.then(|| paths.vhost_vsock.clone()),
        machine: if spec.q35 { qemu::Machine::Q35 } else { qemu::Machine::Microvm },
        tsc_khz: (spec.accel == Accel::Tcg).then(|| crate::vmm::host_tsc_khz(&dirs.images)).flatten(),
        mounts: record
            .config
            .workspace_mounts
            .iter()
            .map(|m| qemu::SharedDir { host: m.host.clone(), guest: m.guest_path(), readonly: !record.config.writable_mounts })
            .collect(),
        mount_at_boot: !spec.unmounted_shares,
        balloon: !spec.no_balloon,
    };
    let greeting = Greeting {
        hostname: id.to_string(),
        env: record.config.env_vars.clone(),
        // A root disk keeps the file of its last run: variables unset or removed while the
        // sandbox was stopped must not come back from it.
        saved_env: spec.restore.as_ref().map_or(overlay.is_some(), |r| !r.no_saved_env),
        restored: spec.restore.is_some(),
        // A restored guest still has its snapshot's network settings.
        net: guest_net.filter(|_| spec.restore.is_some()),
        sync,
        mounts: if spec.restore.is_some() { qemu::SharedDir::shares(&launch.mounts) } else { Vec::new() },
    };
    // What this boot writes to the console (the log is the sandbox's across starts): only that
    // tells of its panic (`panicked_since`).
    let mut console_from = std::fs::metadata(&paths.console).map_or(0, |m| m.len());
    let booted = boot(&launch, &spec, &greeting, &paths, &plan, restore_source).await;
    let Booted { mut child, mut qmp, agent, mut greeted, mut vsock } = match booted {
        Ok(v) => v,
        Err(e) => {
            paths.remove_sockets();
            plan.cleanup(&store, id);
            // A failed warm start's disk is the template's: no disk to start again from, even
            // where no starter is left to remove it (see `Sandbox::start`).
            if spec.warm_disk.is_some() {
                crate::image::remove_warm_disk(&paths.overlay);
            }
            // (A killed VMM's console tells nothing of why; without it, the starter does not
            // take this for a boot or a warm snapshot that failed.)
            let console = match e {
                Error::VmmKilled(_) => None,
                _ => Some(crate::error::printable(&console_tail(&paths.console, 30), CONSOLE_LINE_MAX)),
            };
            let reason = e.full_message();
            let _ = store.set_state(id, State::Error, Some(&reason));
            return fail(e.code(), reason, console);
        }
    };
    let ctl = match UnixListener::bind(&paths.ctl) {
        Ok(l) => l,
        Err(e) => {
            let _ = child.kill().await;
            stop_vsock(&mut vsock).await;
            paths.remove_sockets();
            plan.cleanup(&store, id);
            let _ = store.set_state(id, State::Error, Some("cannot bind the control socket"));
            return fail("host", format!("binding {}: {e}", paths.ctl.display()), None);
        }
    };
    let _ = std::fs::set_permissions(&paths.ctl, std::fs::Permissions::from_mode(0o600));
    let me = ProcId::of(std::process::id() as i32);
    let vmm = child.id().and_then(|p| ProcId::of(p as i32));
    // A sandbox its record does not show as running (a full disk under the database) could
    // not be used, stopped or found by the next command: the boot fails instead.
    let recorded = match (me, vmm) {
        (Some(me), Some(vmm)) => store.set_running(id, me, vmm).and_then(|_| match greeted {
            true => Ok(()),
            false => store.set_state(id, State::Paused, None),
        }),
        _ => Err(Error::Host("the supervisor or QEMU has no process identity".into())),
    };
    if let Err(e) = recorded {
        let msg = format!("recording the sandbox as running: {}", e.full_message());
        abandon(&mut child, &mut vsock, &paths, &mut None, &mut plan, &store, id, &msg).await;
        return fail(e.code(), msg, None);
    }
    let paused = Arc::new(AtomicBool::new(!greeted));
    // Why the VM is paused when QEMU paused it itself (`stopped_for_space`), not a client.
    let pause_reason: Arc<Mutex<Option<String>>> = Default::default();
    let stopped: Arc<Mutex<StoppedSpans>> = Default::default();
    if !greeted {
        lock(&stopped).begin();
    }
    let mut exposed = Exposed::new();
    // (It ends with this process: nothing to close.)
    if let (Some(side), Some(_)) = (&plan.host_side, plan.lease) {
        tokio::spawn(crate::rootless::watch_host_local(side.clone(), plan.table.clone()));
    }
    let mut dns = match plan.lease {
        Some(lease) if plan.internet.mode != "off" => {
            let allowed = (plan.internet.mode == "restricted").then(|| plan.internet.allowed_domains.clone());
            let policy = Arc::new(crate::net::DnsPolicy::new(allowed, plan.table.clone(), &plan.internet.allowed_cidrs));
            match crate::net::dns_bind(SocketAddr::from((lease.host(), 53)), crate::net::upstream_dns(), plan.host_side.as_deref()).await {
                Ok((sock, up)) => Some(tokio::spawn(crate::net::dns_proxy(sock, up, policy))),
                Err(e) => {
                    abandon(&mut child, &mut vsock, &paths, &mut None, &mut plan, &store, id, &e.full_message()).await;
                    return fail(e.code(), e.full_message(), None);
                }
            }
        }
        _ => None,
    };
    for (guest, host) in &plan.user_forwards {
        exposed.insert(*guest, (*host, None));
        let _ = store.add_port(id, *guest, *host);
    }
    if plan.mode == crate::net::Mode::Nat {
        for p in &record.config.port_forwards {
            match expose(&plan, &mut qmp, &mut exposed, p.guest, p.host.unwrap_or(0)).await {
                Ok(host) => {
                    let _ = store.add_port(id, p.guest, host);
                }
                Err((_, msg)) => {
                    // (Recorded as said: `info` names the field too.)
                    let msg = format!("invalid port_forwards: {msg}");
                    abandon(&mut child, &mut vsock, &paths, &mut dns, &mut plan, &store, id, &msg).await;
                    return fail("validation", msg, None);
                }
            }
        }
    }
    // The disk is this sandbox's from now on: its guest runs commands. (Before the report: a
    // start that finds the marker removes the disk, and a command may have written to it.)
    if spec.warm_disk.is_some() {
        let _ = std::fs::remove_file(crate::image::warm_disk_marker(&paths.overlay));
    }
    report(&StartStatus { ok: true, code: None, message: None, console: None });
    drop(start_lock);
    tracing::debug!("phase: reported");
    detach_stdout();

    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Control>();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    // The owner's open connections. Only they count: another process's (`sandbox start` or
    // `exec` of a sandbox a Python `with` block made) must not end the sandbox as it goes.
    let mut owner_connections = 0usize;
    // An ephemeral sandbox also goes when its owner process does, even if it never connected.
    let mut owner_check = tokio::time::interval(Duration::from_secs(1));
    // Each second: the console's bound, and whether the guest still runs (see `SILENT_LOOK`).
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let mut last_look = Instant::now();
    // A pause or snapshot that found the guest halted: answered once the sandbox is recorded
    // stopped, so that its client finds it so.
    let mut refused_as_halted: Option<Done> = None;
    let mut stop_waiter: Option<Done> = None;
    let mut stop_timeout = Duration::from_secs(3);
    // While the VM is stopped by a pause (or a snapshot that leaves it so), nothing is sent to
    // the agent: QEMU would still move it into the stopped guest's memory, and a snapshot taken
    // then could save half a frame (see `Conn::hold`). Clients' input waits meanwhile.
    let mut held: Option<crate::conn::Held> = None;
    // Clients are taken on a task of their own: a long control request (a snapshot writing all
    // of guest RAM) holds the loop below, and a client that connects meanwhile is still served,
    // its own control requests' bounds included.
    // Set once the sandbox is on its way down: requests that come after it are refused as such.
    let down = Arc::new(AtomicBool::new(false));
    let stop_asked = Arc::new(tokio::sync::Notify::new());
    let acceptor = tokio::spawn({
        let (agent, ctl_tx, id, paused, stopped) = (agent.clone(), ctl_tx.clone(), id.to_string(), paused.clone(), stopped.clone());
        let pause_reason = pause_reason.clone();
        let (down, stop_asked) = (down.clone(), stop_asked.clone());
        let owner_pid = record.owner.filter(|_| record.ephemeral).map(|o| o.pid);
        async move {
            loop {
                match ctl.accept().await {
                    Ok((stream, _)) => {
                        let owner = owner_pid.is_some() && stream.peer_cred().ok().and_then(|c| c.pid()) == owner_pid;
                        let client = Client {
                            owner,
                            agent: agent.clone(),
                            ctl: ctl_tx.clone(),
                            id: id.clone(),
                            paused: paused.clone(),
                            pause_reason: pause_reason.clone(),
                            stopped: stopped.clone(),
                            down: down.clone(),
                            stop_asked: stop_asked.clone(),
                        };
                        tokio::spawn(serve_client(stream, client));
                    }
                    // (Out of descriptors, say: no reason to spin.)
                    Err(e) => {
                        tracing::debug!("accepting a client: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    });
    // How QEMU ended, where it did by itself: a crash's record says it (killed by a signal,
    // say, which the console cannot tell).
    let mut vmm_status: Option<std::process::ExitStatus> = None;
    let ended = loop {
        tokio::select! {
            status = child.wait() => {
                tracing::warn!("VMM exited: {status:?}");
                vmm_status = status.ok();
                break Ended::Exited;
            }
            // The guest's vsock device is gone with its server, and the agent with it.
            status = async { match vsock.as_mut() { Some(d) => d.wait().await, None => std::future::pending().await } } => {
                tracing::warn!("the vsock device server exited: {status:?}");
                break Ended::Exited;
            }
            () = agent.closed() => {
                // A guest going down closes the channel a moment before QEMU exits (or, for a
                // halt, before its CPUs are found stopped): that is not a broken channel.
                // QEMU on its way out closes its sockets first, then takes a while to free the
                // guest's memory (long for a large guest): only a QEMU that still answers, with
                // its guest running, has lost its agent.
                match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
                    Ok(status) => {
                        tracing::warn!("VMM exited: {status:?}");
                        vmm_status = status.ok();
                        break Ended::Exited;
                    }
                    Err(_) if halted_for_good(&mut qmp).await => break Ended::Halted,
                    Err(_) if bounded(qmp.execute("query-status"), "asking QEMU for the VM's state").await.is_err() => {
                        let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
                        tracing::warn!("VMM exited: {status:?}");
                        vmm_status = status.ok().and_then(Result::ok);
                        break Ended::Exited;
                    }
                    Err(_) => {
                        tracing::warn!("{AGENT_LOST}");
                        break Ended::AgentLost;
                    }
                }
            }
            _ = housekeeping.tick() => {
                if cap_console(&paths.console) {
                    // (Cut back to its first MiB and a note: what follows is this boot's.)
                    console_from = console_from.min(CONSOLE_KEEP);
                }
                let every = if agent.silent_for() >= SILENT_LOOK { SILENT_LOOK } else { IDLE_LOOK };
                if !paused.load(Ordering::SeqCst) && last_look.elapsed() >= every {
                    last_look = Instant::now();
                    if panicked_since(&paths.console, console_from) {
                        tracing::warn!("{PANICKED}");
                        break Ended::Panicked;
                    }
                    if let Some(disk) = overlay.as_deref() {
                        if stopped_for_space(&mut qmp).await {
                            let reason = out_of_space(disk, id);
                            tracing::warn!("{reason}");
                            // (Not a stopped span: those move the deadlines of the commands
                            // under way, which must still end, at their timeouts.)
                            paused.store(true, Ordering::SeqCst);
                            *lock(&pause_reason) = Some(reason.clone());
                            // (The database may be on the full disk too: the clients hear why
                            // from this process either way.)
                            if let Err(e) = store.set_state(id, State::Paused, Some(&reason)) {
                                tracing::warn!("recording the pause: {}", e.full_message());
                            }
                            continue;
                        }
                    }
                    if halted_for_good(&mut qmp).await {
                        break Ended::Halted;
                    }
                }
            }
            msg = ctl_rx.recv() => match msg {
                Some(m) if m.abandoned() => {}
                Some(Control::Stop { timeout, done }) => {
                    stop_timeout = timeout;
                    stop_waiter = Some(done);
                    break Ended::Asked;
                }
                Some(Control::Pause { done }) if paused.load(Ordering::SeqCst) => {
                    let _ = done.send(Ok(()));
                }
                Some(Control::Pause { done }) => {
                    // (Else the hold below waits out its bound on an agent that is gone, and
                    // the pause "succeeds".)
                    if halted_or_halting(&mut qmp, &paths.console, console_from).await {
                        refused_as_halted = Some(done);
                        break Ended::Halted;
                    }
                    // Marked first: a request that got past the mark is then ahead of the hold
                    // for the agent's writer (the lock is fair), and none waits behind it for
                    // the whole pause. The guest stops between two of our frames: a snapshot
                    // of the paused VM then restores cleanly.
                    paused.store(true, Ordering::SeqCst);
                    let holding = agent.hold(HOLD_BOUND).await;
                    // A client that gave up while the agent's writer was being held is not
                    // paused for after all.
                    if done.is_closed() {
                        drop(holding);
                        paused.store(false, Ordering::SeqCst);
                        continue;
                    }
                    let r = bounded(qmp.execute("stop"), "pause").await.map_err(|e| (ErrorKind::Failed, e.full_message()));
                    if r.is_ok() {
                        held = holding;
                        lock(&stopped).begin();
                        let _ = store.set_state(id, State::Paused, None);
                    } else {
                        paused.store(false, Ordering::SeqCst);
                    }
                    let _ = done.send(r.map(|_| ()));
                }
                Some(Control::Resume { done }) => {
                    let for_space = lock(&pause_reason).is_some();
                    let mut running = false;
                    let r = bounded(
                        async {
                            qmp.execute("cont").await?;
                            running = true;
                            held = None;
                            if !greeted {
                                greet_restored(&agent, &greeting, &mut qmp).await?;
                                greeted = true;
                            } else {
                                // Its clock stood still while it was paused.
                                tell_time_soon(&agent);
                            }
                            Ok::<_, Error>(())
                        },
                        "resume",
                    )
                    .await
                    .map_err(|e| (ErrorKind::Failed, e.full_message()));
                    // Paused for want of space, the VM retries its write when it runs and, with
                    // the disk still full, QEMU pauses it again at once: that is no resume.
                    if r.is_ok() && for_space {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        if stopped_for_space(&mut qmp).await {
                            let reason = lock(&pause_reason).clone().unwrap_or_default();
                            let _ = done.send(Err((ErrorKind::Failed, format!("still no space: {reason}"))));
                            continue;
                        }
                    }
                    if r.is_ok() {
                        paused.store(false, Ordering::SeqCst);
                        *lock(&pause_reason) = None;
                        lock(&stopped).end();
                        let _ = store.set_state(id, State::Running, None);
                    } else if running {
                        // A restored guest whose greeting failed must run no commands: it stops
                        // again and stays paused (a later resume greets it again).
                        let _ = bounded(qmp.execute("stop"), "pause").await;
                    }
                    let _ = done.send(r);
                }
                // QEMU stopped the guest wherever it was, maybe within a frame of its channel's:
                // saved so, it would restore with a broken channel (a pause waits for a frame's
                // end first).
                Some(Control::Snapshot { done, .. }) if lock(&pause_reason).is_some() => {
                    let reason = lock(&pause_reason).clone().unwrap_or_default();
                    let _ = done.send(Err((ErrorKind::Failed, format!("not while QEMU holds the VM paused: {reason}"))));
                }
                Some(Control::Snapshot { done, .. }) if spec.vsock => {
                    let _ = done.send(Err((
                        ErrorKind::Unsupported,
                        "a sandbox whose agent is on vsock cannot be snapshotted (its vhost-user device cannot be saved); start it with SMOLVM_AGENT_TRANSPORT=serial".into(),
                    )));
                }
                Some(Control::Snapshot { done, .. }) if spec.q35 => {
                    let _ = done.send(Err((
                        ErrorKind::Unsupported,
                        "a sandbox on the q35 machine cannot be snapshotted (snapshots restore on microvm); start it with SMOLVM_MACHINE=microvm".into(),
                    )));
                }
                Some(Control::Snapshot { dir, kind, done }) => {
                    // A halted guest saved would restore halted: no agent would ever answer.
                    if halted_or_halting(&mut qmp, &paths.console, console_from).await {
                        refused_as_halted = Some(done);
                        break Ended::Halted;
                    }
                    // With RAM in a shared file the file *is* the saved memory: the VM must not
                    // run on and change it, so it stays stopped (warm templates are then deleted).
                    let shared_ram = spec.ram.as_ref().is_some_and(|r| r.share);
                    let was_paused = paused.load(Ordering::SeqCst);
                    let keep_stopped = was_paused || (shared_ram && kind == SnapshotKind::Full);
                    // As for a pause, when RAM is saved (a paused VM was stopped that way), and
                    // marked paused first when it stays stopped.
                    if keep_stopped {
                        paused.store(true, Ordering::SeqCst);
                    }
                    let mut holding = if kind == SnapshotKind::Full && !was_paused { agent.hold(HOLD_BOUND).await } else { None };
                    let mut done = done;
                    // (A save stops the CPUs, whatever the VM does after it.)
                    lock(&stopped).begin();
                    // (What to remove if the save fails: this directory, not one a retry of the
                    // same id made since its client gave this one up.)
                    let inode = |d: &Path| std::fs::metadata(d).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
                    let made = inode(&dir);
                    // Given up when its client goes (Ctrl-C, killed), or for a stop: a client's, or
                    // SIGTERM (another command ending this process, which then stops the sandbox).
                    let termed = std::cell::Cell::new(false);
                    let gave_up = async {
                        tokio::select! {
                            () = done.closed() => Error::Interrupted("the snapshot's client went away".into()),
                            () = stop_asked.notified() => Error::Host("the sandbox was stopped before the snapshot was done".into()),
                            () = terminated(&mut sigterm) => {
                                termed.set(true);
                                Error::Host("the sandbox was stopped before the snapshot was done".into())
                            }
                        }
                    };
                    let r = snapshot(&mut qmp, overlay.as_deref(), &launch, &dir, kind, keep_stopped, gave_up).await;
                    if keep_stopped && !was_paused {
                        if r.is_ok() {
                            held = holding.take();
                        } else {
                            // Nothing was saved: the VM runs on as before.
                            let _ = bounded(qmp.execute("cont"), "resume").await;
                            paused.store(false, Ordering::SeqCst);
                        }
                    }
                    if !paused.load(Ordering::SeqCst) {
                        lock(&stopped).end();
                        drop(holding);
                        // Its clock stood still while the save ran.
                        tell_time_soon(&agent);
                    }
                    if r.is_err() && (made.is_none() || inode(&dir) == made) {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                    let _ = done.send(r);
                    if termed.get() {
                        break Ended::Asked;
                    }
                }
                Some(Control::Expose { guest, host, done }) => {
                    let r = control_within(control_bound(), "expose", expose(&plan, &mut qmp, &mut exposed, guest, host)).await;
                    if let Ok(h) = r {
                        let _ = store.add_port(id, guest, h);
                    }
                    let _ = done.send(r);
                }
                Some(Control::Unexpose { guest, done }) => {
                    let r = control_within(control_bound(), "unexpose", unexpose(&plan, &mut qmp, &mut exposed, guest)).await;
                    // (Listed as long as it is served: a close that failed leaves it.)
                    if r.is_ok() || r.as_ref().is_err_and(|(kind, _)| *kind == ErrorKind::NotFound) {
                        let _ = store.remove_port(id, guest);
                    }
                    let _ = done.send(r);
                }
                Some(Control::OwnerConnected) => owner_connections += 1,
                Some(Control::OwnerGone) => {
                    owner_connections = owner_connections.saturating_sub(1);
                    // An ephemeral sandbox lives as long as its owner's connection.
                    if record.ephemeral && owner_connections == 0 {
                        break Ended::Asked;
                    }
                }
                None => {}
            },
            _ = owner_check.tick(), if record.ephemeral => {
                if record.owner.is_some_and(|o| !o.alive()) {
                    break Ended::Asked;
                }
            }
            () = terminated(&mut sigterm) => break Ended::Asked,
        }
    };
    // The shutdown request goes to the agent.
    drop(held);
    // No new clients from here on: a start that finds the control socket gone while this
    // process lives knows the sandbox is on its way down, and waits to start it again.
    acceptor.abort();
    let _ = acceptor.await;
    let _ = std::fs::remove_file(&paths.ctl);
    // (After the socket: a client told so finds the sandbox down, not its supervisor silent.)
    down.store(true, Ordering::SeqCst);
    // The host ports it listened on are free before anyone hears that it is down (another
    // sandbox or program may want one next), not when this process ends.
    close_ports(&mut exposed).await;
    if ended != Ended::Asked {
        // (Already gone, unless it was the vsock device server that went, or the guest halted.)
        let _ = child.kill().await;
        let tail = console_tail(&paths.console, 30);
        // Powered off, halted or reset from inside (`poweroff`, `halt -f`, `reboot -f`):
        // stopped, as if asked. Else it crashed.
        let powered_off = ended == Ended::Halted || shut_down_from_inside(&tail);
        // (A warm start's console can be empty: its boot was the template's.)
        let how = vmm_status.filter(|s| !s.success()).map(|s| format!(" (QEMU: {s})")).unwrap_or_default();
        let msg = if ended == Ended::AgentLost {
            AGENT_LOST.to_string()
        } else if ended == Ended::Panicked {
            format!("{PANICKED}; last console lines:\n{}", crate::error::printable(&tail, CONSOLE_LINE_MAX))
        } else if tail.trim().is_empty() {
            format!("the VM exited unexpectedly{how}; its console is empty")
        } else {
            format!("the VM exited unexpectedly{how}; last console lines:\n{}", crate::error::printable(&tail, CONSOLE_LINE_MAX))
        };
        stop_vsock(&mut vsock).await;
        paths.remove_sockets();
        close_dns(&mut dns).await;
        plan.cleanup(&store, id);
        if record.ephemeral && powered_off {
            let _ = store.remove(id);
            paths.remove_all();
        } else if powered_off {
            let _ = store.set_state(id, State::Stopped, None);
        } else {
            // (An ephemeral one too: it stays, failed, for its owner to read why and then delete,
            // as `smolvm run` and a `with` block do, or for the reaping of a dead owner's
            // sandboxes. Removed here, its clients read it as stopped.)
            let _ = store.set_state(id, State::Error, Some(&msg));
        }
        let mut answered = release_queued(&mut ctl_rx, None);
        if let Some(done) = refused_as_halted {
            answered |= done.send(Err((ErrorKind::Failed, HALTED.into()))).is_ok();
        }
        if answered {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        return if powered_off { 0 } else { 1 };
    }
    // Without a disk there is nothing to flush, and a paused guest cannot flush: go at once.
    let graceful = overlay.is_some() && !paused.load(Ordering::SeqCst);
    tracing::debug!("phase: stopping");
    close_dns(&mut dns).await;
    plan.cleanup_during(&store, id, graceful, shutdown(&mut child, &agent, &mut qmp, stop_timeout, graceful)).await;
    if overlay.is_some() || plan.mode == crate::net::Mode::User {
        // A QEMU that holds what a start right after needs goes before the answer: a disk's
        // image lock (a paused one is killed), or the host ports that user-mode networking
        // forwards (at launch or exposed later), on which QEMU listens itself. Its sockets
        // close only once its memory is freed (75 ms after a guest that used 900 MB).
        let _ = child.wait().await;
    }
    tracing::debug!("phase: cleaned up");
    stop_vsock(&mut vsock).await;
    paths.remove_sockets();
    // An ephemeral sandbox whose owner went away leaves nothing; one stopped on request stays
    // (stopped) until its owner deletes it or dies.
    // A stop whose record could not be written (the database's disk full) is not reported as
    // done: its client, told so, records it once this process is gone, or says why it cannot.
    let recorded = if record.ephemeral && stop_waiter.is_none() {
        let _ = store.remove(id);
        paths.remove_all();
        Ok(())
    } else {
        store.set_state(id, State::Stopped, None).map_err(|e| (ErrorKind::Failed, format!("recording the stop: {}", e.full_message())))
    };
    // Requests queued behind the one that ended the loop (another client's stop, say) are let
    // go too: a stop's client then hears that the sandbox is down, not a closed connection
    // (after which it used force on whatever then ran under this name).
    let mut answered = release_queued(&mut ctl_rx, Some(&recorded));
    if let Some(done) = stop_waiter {
        let _ = done.send(recorded);
        answered = true;
    }
    if answered {
        // Let the client tasks write their replies before the process ends.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The slow parts, now that nobody waits for them: QEMU's death after its SIGKILL, and
    // removing the TAP.
    let _ = child.wait().await;
    drop(plan);
    0
}

/// Let go of the control requests still queued: each client's task then answers (a stop: done,
/// or `stopped` where the stop that ended the loop has an outcome to share, such as its record's
/// failed write; anything else: the sandbox is going away). True if there were any.
fn release_queued(ctl_rx: &mut mpsc::UnboundedReceiver<Control>, stopped: Option<&std::result::Result<(), (ErrorKind, String)>>) -> bool {
    // Closed first: a request sent after this is refused at once rather than never answered.
    ctl_rx.close();
    let mut any = false;
    while let Ok(msg) = ctl_rx.try_recv() {
        match (msg, stopped) {
            (Control::Stop { done, .. }, Some(outcome)) => {
                let _ = done.send(outcome.clone());
            }
            (msg, _) => drop(msg),
        }
        any = true;
    }
    any
}

/// Start QEMU and bring the guest to the point where commands can run (or, for a restore
/// that should stay paused, to a loaded but stopped VM). Bounded by the boot timeout; on any
/// failure the VMM is killed.
async fn boot(
    launch: &qemu::LaunchSpec,
    spec: &BootSpec,
    greeting: &Greeting,
    paths: &SandboxPaths,
    plan: &NetPlan,
    restore_source: crate::warm::Picked,
) -> Result<Booted> {
    // The log is the sandbox's across starts: only what this QEMU writes explains this boot.
    let log_start = std::fs::metadata(&paths.log).map(|m| m.len()).unwrap_or(0);
    // QEMU's serial port, or the agent over vsock, connects here.
    let agent_socket = match launch.vsock {
        None => launch.agent_socket.clone(),
        Some(_) => crate::vmm::vsock::port_path(&paths.vsock, proto::AGENT_VSOCK_PORT),
    };
    let listener = UnixListener::bind(&agent_socket).ctx(|| format!("binding {}", agent_socket.display()))?;
    let mut vsock = match &launch.vsock {
        None => None,
        Some(vhost) => Some(crate::vmm::vsock::spawn_daemon(vhost, &paths.vsock, &paths.log).await?),
    };
    let mut child = match qemu::spawn(launch, &paths.log) {
        Ok(c) => c,
        Err(e) => {
            stop_vsock(&mut vsock).await;
            return Err(e);
        }
    };
    tracing::debug!("phase: qemu spawned");
    let started = Instant::now();
    let timeout = Duration::from_millis(spec.boot_timeout_ms);
    let work = async {
        // The host's side of NAT (rules first, then the TAP goes up) is made while QEMU starts
        // and, for a restore, loads the saved state. A restored guest resumes only after both;
        // a booting one sends nothing that passes before the rules are in place (the TAP is
        // down until then). The nft process takes ~15 ms, which a warm start waited for before
        // it even connected to QMP.
        let host_net = async {
            plan.setup_host().await?;
            tracing::debug!("phase: host network ready");
            Ok::<_, Error>(())
        };
        let vmm = async {
            let (stream, _) = listener.accept().await.ctx(|| "accepting the agent channel".into())?;
            tracing::debug!("phase: QEMU connected");
            let restored = match &spec.restore {
                Some(restore) => {
                    let mut qmp = qemu::Qmp::connect_when_ready(&launch.qmp_socket).await?;
                    qmp.restore_from_launch().await?;
                    tracing::debug!("phase: state loaded");
                    same_restore_source(&restore.state, restore_source)?;
                    Some(qmp)
                }
                None => None,
            };
            Ok::<_, Error>((Conn::new_synced(stream, greeting.sync), restored))
        };
        let (host_net, vmm) = tokio::join!(host_net, vmm);
        host_net?;
        let (agent, restored) = vmm?;
        let mut greeted = false;
        let qmp = if let (Some(restore), Some(mut qmp)) = (&spec.restore, restored) {
            if restore.resume {
                qmp.execute("cont").await?;
                tracing::debug!("phase: resumed");
                greet_restored(&agent, greeting, &mut qmp).await?;
                tracing::debug!("phase: agent answered");
                greeted = true;
            }
            qmp
        } else if vsock.is_some() {
            // The agent connected: it is reading, nothing to wake.
            greet(&agent, greeting).await?;
            greeted = true;
            qemu::Qmp::connect_when_ready(&launch.qmp_socket).await?
        } else {
            // The greeting waits in QEMU's socket from the start. QEMU moves it into the guest
            // only when its main loop next wakes after the agent has opened its port, which
            // under TCG can be 10 ms later; the port's open event says when to wake it (any QMP
            // command does). Once greeted, the event no longer matters.
            let answered = tokio::sync::Notify::new();
            let wake = async {
                let mut qmp = qemu::Qmp::connect_when_ready(&launch.qmp_socket).await?;
                tokio::select! {
                    _ = answered.notified() => {}
                    opened = qmp.wait_event("VSERPORT_CHANGE") => {
                        if opened.is_ok() {
                            let _ = qmp.execute("query-status").await;
                        }
                    }
                }
                Ok::<_, Error>(qmp)
            };
            let hello = async {
                let r = greet(&agent, greeting).await;
                tracing::debug!("phase: agent answered");
                answered.notify_one();
                r
            };
            let (qmp, hello) = tokio::join!(wake, hello);
            hello?;
            greeted = true;
            qmp?
        };
        tracing::info!("ready after {:?}", started.elapsed());
        Ok::<_, Error>((qmp, agent, greeted))
    };
    let exited = |status: std::io::Result<std::process::ExitStatus>| {
        // (The agent powers off when it cannot set the guest up: the console says why. A
        // panicking kernel resets the VM, which QEMU reports alike: its console tells them
        // apart.)
        if status.as_ref().is_ok_and(|s| s.success()) {
            if console_tail(&paths.console, 30).contains("Kernel panic") {
                return Error::Host("the guest kernel panicked during boot".into());
            }
            return Error::Host("the guest powered off during boot".into());
        }
        // QEMU ends itself on SIGTERM, SIGINT and SIGHUP (a success, above): only SIGKILL, from
        // outside, shows here. (A crash is SIGSEGV or SIGABRT: the VMM's own fault.)
        if status.as_ref().ok().and_then(std::os::unix::process::ExitStatusExt::signal) == Some(libc::SIGKILL) {
            return Error::VmmKilled(
                "the VMM was killed (SIGKILL) during boot: not by this start (another command's stop or delete, the OOM killer, or a kill)"
                    .into(),
            );
        }
        let status = status.map(|s| s.to_string()).unwrap_or_default();
        Error::Host(match vmm_complaints(&paths.log, log_start) {
            Some(said) => format!("the VMM exited during boot ({status}): {said}"),
            None => format!("the VMM exited during boot ({status})"),
        })
    };
    let result = tokio::select! {
        r = tokio::time::timeout(timeout, work) => match r {
            // The agent's channel or QMP closing first is how a dying VMM often shows: its
            // exit, if it follows at once, is the cause to report.
            Ok(Err(e)) => match tokio::time::timeout(Duration::from_millis(200), child.wait()).await {
                Ok(status) => Err(exited(status)),
                Err(_) => Err(e),
            },
            Ok(r) => r,
            Err(_) => Err(Error::Timeout { operation: "boot".into(), seconds: timeout.as_secs_f64() }),
        },
        status = child.wait() => Err(exited(status)),
    };
    drop(listener);
    let _ = std::fs::remove_file(&agent_socket);
    match result {
        Ok((qmp, agent, greeted)) => Ok(Booted { child, qmp, agent, greeted, vsock }),
        Err(e) => {
            let _ = child.kill().await;
            stop_vsock(&mut vsock).await;
            Err(e)
        }
    }
}

/// End the vsock device's server, and wait for it: once its VMM is gone it makes its sockets
/// anew for the next one, which must not happen after the sandbox's files are removed.
async fn stop_vsock(device: &mut Option<tokio::process::Child>) {
    if let Some(mut d) = device.take() {
        let _ = d.kill().await;
    }
}

/// A VM that has booted (or been restored) as far as `boot` takes it.
struct Booted {
    child: tokio::process::Child,
    qmp: qemu::Qmp,
    agent: Arc<Conn>,
    /// The agent has been greeted (a restore that stays paused is not yet).
    greeted: bool,
    /// The vsock device's server, when the agent is on vsock: it lives as long as this handle.
    vsock: Option<tokio::process::Child>,
}

/// A start that fails once QEMU runs: the VMM, its sockets, the DNS proxy and the host network
/// go, and the record says why.
#[allow(clippy::too_many_arguments)]
async fn abandon(
    child: &mut tokio::process::Child,
    vsock: &mut Option<tokio::process::Child>,
    paths: &SandboxPaths,
    dns: &mut Option<tokio::task::JoinHandle<Result<()>>>,
    plan: &mut NetPlan,
    store: &Store,
    id: &str,
    why: &str,
) {
    let _ = child.kill().await;
    stop_vsock(vsock).await;
    paths.remove_sockets();
    close_dns(dns).await;
    plan.cleanup(store, id);
    let _ = store.set_state(id, State::Error, Some(why));
}

/// The console log's bound. The serial port is the guest's to write, and a guest that writes to
/// it without end (`yes > /dev/ttyS0`: 0.5 MB/s under TCG) must not fill the host's disk.
const CONSOLE_MAX: u64 = 8 << 20;

/// What a console cut down to its bound keeps: its start, the boot's messages.
pub(crate) const CONSOLE_KEEP: u64 = 1 << 20;
/// How much of each console line an error carries: the guest writes the console, and a line
/// of megabytes would otherwise go into the state database and onto users' terminals.
const CONSOLE_LINE_MAX: usize = 512;

/// Cut the console log down once it passes its bound (looked at every second), saying so in it.
/// QEMU appends to it, so what it writes next follows the note.
/// Returns whether it cut the log.
fn cap_console(path: &std::path::Path) -> bool {
    if std::fs::metadata(path).map_or(true, |m| m.len() <= CONSOLE_MAX) {
        return false;
    }
    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(path) {
        let _ = f.set_len(CONSOLE_KEEP);
        let _ = f.write_all(b"\n[smolvm: the console passed 8 MiB; what it wrote after its first MiB, up to here, was dropped]\n");
        return true;
    }
    false
}

/// Stop listening on the host ports exposed in NAT mode (user mode's are QEMU's, which go
/// with it). Awaited: the listener is dropped, and its port free, once this returns.
async fn close_ports(exposed: &mut Exposed) {
    for (_, (_, task)) in exposed.drain() {
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Close the DNS proxy's socket before the lease goes: the next sandbox given the same lease
/// binds its own proxy on the same address at once.
async fn close_dns(dns: &mut Option<tokio::task::JoinHandle<Result<()>>>) {
    if let Some(task) = dns.take() {
        task.abort();
        let _ = task.await;
    }
}

/// How long a pause, resume or port's exposure may take, and wait behind others: the control
/// loop serves nothing else meanwhile.
fn control_bound() -> Duration {
    static BOUND: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    // (Checked by the starting library already: a bad value never gets here.)
    *BOUND.get_or_init(|| crate::config::control_timeout().unwrap_or(Duration::from_secs(30)))
}
/// A snapshot's bound (QEMU writes all of guest RAM, and a disk overlay is copied).
pub(crate) const SNAPSHOT_BOUND: Duration = Duration::from_secs(600);
/// How long a pause or snapshot waits for the agent to read what was sent before it: an agent
/// that does not answer by then (a wedged guest) is stopped wherever it is.
const HOLD_BOUND: Duration = Duration::from_secs(5);
/// Once a SIGTERM comes (never, without its handler).
async fn terminated(sigterm: &mut Option<tokio::signal::unix::Signal>) {
    match sigterm.as_mut() {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Cancels, ends of input and terminal sizes one client may have waiting for the agent (a
/// paused VM's, or one whose channel a long save holds): more than a terminal dragged about for
/// the whole of a 600 s save sends (one size per SIGWINCH), and a bound (a few MB) on what a
/// client that floods them makes this process keep.
const QUEUED_CONTROLS: usize = 65536;

/// A control request's work within `bound`, else a timeout error for its client.
async fn control_within<T>(
    bound: Duration,
    operation: &str,
    work: impl std::future::Future<Output = std::result::Result<T, (ErrorKind, String)>>,
) -> std::result::Result<T, (ErrorKind, String)> {
    within(operation, bound, work).await.unwrap_or_else(|e| Err((ErrorKind::Failed, e.to_string())))
}

/// A control request's answer for its client, waited for within `bound` (it may queue behind
/// others): past that the client hears of the timeout, and the request, if still queued, is
/// dropped (`Control::abandoned`).
async fn answer<T>(
    wait: oneshot::Receiver<std::result::Result<T, (ErrorKind, String)>>,
    operation: &str,
    bound: Duration,
    ok: impl FnOnce(T) -> Reply,
) -> Reply {
    match within(operation, bound, wait).await {
        Ok(Ok(Ok(v))) => ok(v),
        Ok(Ok(Err((kind, message)))) => Reply::error(kind, message),
        Ok(Err(_)) => Reply::error(ErrorKind::Closed, "the sandbox is going away"),
        Err(e) => Reply::error(ErrorKind::Failed, e.to_string()),
    }
}

/// A pause or resume that does not finish (a wedged QEMU monitor or guest agent) must not hold
/// the supervisor's loop, and with it every stop, for ever.
async fn bounded<T>(work: impl std::future::Future<Output = Result<T>>, operation: &str) -> Result<T> {
    within(operation, control_bound(), work).await?
}

/// What QEMU wrote to the log from `from` on: its own error lines, which start with its name
/// ("qemu:" or "qemu-system-x86_64:"), the last few of them. Without them a QEMU that refuses
/// to start (a missing file, an unusable option) would only say that it exited.
fn vmm_complaints(log: &Path, from: u64) -> Option<String> {
    use std::io::{Read, Seek};
    let mut bytes = Vec::new();
    let mut f = std::fs::File::open(log).ok()?;
    f.seek(std::io::SeekFrom::Start(from)).ok()?;
    f.take(64 * 1024).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let said: Vec<&str> = text.lines().map(str::trim).filter(|l| l.starts_with("qemu")).collect();
    (!said.is_empty()).then(|| said[said.len().saturating_sub(3)..].join("; "))
}

/// In a full snapshot's directory: the saved VM has a balloon device.
pub(crate) const BALLOON_MARK: &str = "balloon";

/// Save the VM into `dir`. `full`: the device and memory state (QEMU's migration stream, written
/// with the CPUs stopped: a live save never ends while the guest changes memory faster than the
/// stream goes, easily done under KVM) plus a copy of the disk overlay; `disk`: the
/// overlay alone, copied while the CPUs are stopped. The VM runs on afterwards unless it was
/// paused before.
async fn snapshot(
    qmp: &mut qemu::Qmp,
    overlay: Option<&Path>,
    launch: &qemu::LaunchSpec,
    dir: &Path,
    kind: SnapshotKind,
    was_paused: bool,
    gave_up: impl std::future::Future<Output = Error>,
) -> std::result::Result<(), (ErrorKind, String)> {
    let failed = |e: Error| (ErrorKind::Failed, e.full_message());
    // Made by the client (its claim on the id): gone, the client gave up, and a save made
    // there now would be nobody's.
    if !dir.is_dir() {
        return Err((ErrorKind::Failed, format!("{} is gone: the snapshot was given up", dir.display())));
    }
    if kind == SnapshotKind::Disk && overlay.is_none() {
        return Err((ErrorKind::Invalid, "a 'disk' snapshot needs a root disk; this sandbox has none (use 'full')".into()));
    }
    let saving = async {
        match kind {
            SnapshotKind::Full => {
                if !was_paused {
                    qmp.execute("stop").await?;
                }
                // (Its starter checked the value: a bad one never gets here.)
                qmp.save_to(&dir.join("state"), crate::config::snapshot_bandwidth().unwrap_or(None), SNAPSHOT_BOUND).await?
            }
            SnapshotKind::Disk if !was_paused => {
                qmp.execute("stop").await?;
            }
            SnapshotKind::Disk => {}
        }
        if let Some(o) = overlay {
            // Off the runtime's thread: the clients' command relays go on meanwhile.
            tokio::fs::copy(o, dir.join("disk.qcow2")).await.ctx(|| "copying the disk overlay".into())?;
        }
        let saved = BootImage { rootfs: overlay.map(|_| dir.join("disk.qcow2")), ..launch.image.clone() };
        std::fs::write(dir.join("image.json"), serde_json::to_vec(&saved).expect("image serializes"))
            .ctx(|| "writing image.json".into())?;
        // A saved VM loads only under the accelerator it ran under (`sandbox::restore_accel`).
        if kind == SnapshotKind::Full {
            std::fs::write(dir.join("accel"), launch.accel.name()).ctx(|| "writing the snapshot's accelerator".into())?;
            // A KVM guest saw this host's CPU: it can be resumed only where all its features are.
            if launch.accel == Accel::Kvm {
                std::fs::write(dir.join("cpu"), crate::vmm::host_cpu_identity()).ctx(|| "writing the snapshot's CPU".into())?;
            }
            // A TCG guest's clock runs on this host's TSC at the rate it was told at boot (here,
            // or where it came from, which had this rate to be restored here).
            if let Some(khz) = launch.tsc_khz.filter(|_| crate::vmm::host_tsc_is_invariant()) {
                std::fs::write(dir.join("tsc-khz"), khz.to_string()).ctx(|| "writing the snapshot's TSC rate".into())?;
            }
            // Its devices: states saved before the balloon came have none (`BootSpec::no_balloon`).
            if launch.balloon {
                std::fs::write(dir.join(BALLOON_MARK), "").ctx(|| "writing the snapshot's device list".into())?;
            }
        }
        Ok::<_, Error>(())
    };
    // Its client gone (Ctrl-C, killed) gives the save up: nobody waits for it, and the VM must
    // not stay stopped for it. So does a stop, which would otherwise wait for it.
    let ended = tokio::select! {
        r = within("snapshot", SNAPSHOT_BOUND, saving) => r,
        e = gave_up => Err(e),
    };
    let result = match ended {
        Ok(r) => r,
        Err(e) => {
            // A save still under way must not go on writing, nor keep the CPUs stopped.
            qmp.cancel_save().await;
            Err(e)
        }
    };
    // Whatever happened, a VM that ran before runs on.
    if !was_paused {
        match within("cont", Duration::from_secs(5), qmp.execute("cont")).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) | Err(e) => tracing::warn!("the VM could not be resumed after its snapshot: {}", e.full_message()),
        }
    }
    result.map_err(failed)
}

/// Graceful first (the agent syncs disks and resets the VM), then QMP `quit`, then SIGKILL.
///
/// Without the graceful part, QEMU's exit is not waited for: the host kernel spends 4-5 ms
/// (more for a guest that used more memory) freeing its memory, which nobody need wait for
/// (`smolvm run` did, after every command). What is waited for is QEMU's main thread letting go
/// of that memory, which comes first: from then on no process shows QEMU's command line (to
/// `ps`, `pgrep`, or a check that a stopped sandbox left no VMM). The caller reaps QEMU, before
/// its answer where QEMU holds what a next start needs.
async fn shutdown(child: &mut tokio::process::Child, agent: &Arc<Conn>, qmp: &mut qemu::Qmp, timeout: Duration, graceful: bool) {
    if !graceful {
        let killed = Instant::now();
        let _ = child.start_kill();
        if let Some(pid) = child.id() {
            let cmdline = format!("/proc/{pid}/cmdline");
            let deadline = Instant::now() + Duration::from_secs(1);
            // (Measured: 0.1-0.3 ms after the signal, at times 2-3 ms.)
            while std::fs::read(&cmdline).is_ok_and(|c| !c.is_empty()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        tracing::debug!("phase: VMM killed, its command line gone after {:?}", killed.elapsed());
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), agent.call(&Request::Shutdown)).await;
    if tokio::time::timeout(timeout, child.wait()).await.is_ok() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), qmp.execute("quit")).await;
    if tokio::time::timeout(Duration::from_secs(1), child.wait()).await.is_ok() {
        return;
    }
    let _ = child.kill().await;
}

/// When the VM's CPUs were stopped (pauses, saves), most recent last: the guest's clock stood
/// still meanwhile, so a host-side bound on a command does not count that time.
#[derive(Default)]
struct StoppedSpans(std::collections::VecDeque<(Instant, Option<Instant>)>);

impl StoppedSpans {
    /// (Spans older than any command's bound may go: the last 256 are kept.)
    const KEPT: usize = 256;

    fn begin(&mut self) {
        if !matches!(self.0.back(), Some((_, None))) {
            self.0.push_back((Instant::now(), None));
            if self.0.len() > Self::KEPT {
                self.0.pop_front();
            }
        }
    }

    fn end(&mut self) {
        if let Some((_, end @ None)) = self.0.back_mut() {
            *end = Some(Instant::now());
        }
    }

    /// How much of the last `window` the CPUs were stopped, a stop under way included.
    fn within(&self, window: Duration) -> Duration {
        let now = Instant::now();
        let from = now.checked_sub(window);
        self.0.iter().map(|(start, end)| end.unwrap_or(now).saturating_duration_since(from.map_or(*start, |f| (*start).max(f)))).sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A client's open streams: by its stream id, the agent stream it relays and how much output the
/// client still takes (its window, in bytes).
type ClientStreams = Arc<Mutex<HashMap<u32, ClientStream>>>;

/// One client stream relayed to an agent stream.
struct ClientStream {
    agent_id: u32,
    /// Output the client still takes, in bytes (its grants).
    window: Arc<tokio::sync::Semaphore>,
    /// Input sent on to the agent and not yet granted back by it.
    input: Arc<std::sync::atomic::AtomicUsize>,
    /// The client cancelled it or went away: its relay ends at once. (The agent answers a
    /// cancelled upload with nothing, and a guest whose agent stopped answering says nothing
    /// at all: a relay that waited for a last reply kept its task, route and the client's
    /// socket for the VM's lifetime.)
    given_up: Arc<tokio::sync::Notify>,
}

/// What a client's task shares with the supervisor.
struct Client {
    /// The connection is the owner's (of an ephemeral sandbox): its end may end the sandbox.
    owner: bool,
    agent: Arc<Conn>,
    ctl: mpsc::UnboundedSender<Control>,
    id: String,
    paused: Arc<AtomicBool>,
    pause_reason: Arc<Mutex<Option<String>>>,
    stopped: Arc<Mutex<StoppedSpans>>,
    /// The sandbox is on its way down (see `GONE_BEFORE`).
    down: Arc<AtomicBool>,
    /// A client asked for a stop: a snapshot under way gives up for it, instead of holding the
    /// stop (queued behind it) until the stopper's patience ran out and it killed the VM.
    stop_asked: Arc<tokio::sync::Notify>,
}

async fn serve_client(mut stream: UnixStream, client: Client) {
    let Client { owner, agent, ctl, id, paused, pause_reason, stopped, down, stop_asked } = client;
    // Which protocol this process speaks, before anything else (see `proto::SUPERVISOR_MAGIC`).
    // (Before the owner is counted: a client gone already is not counted, nor then missed.)
    if stream.write_all(&proto::supervisor_preamble()).await.is_err() {
        return;
    }
    if owner {
        let _ = ctl.send(Control::OwnerConnected);
    }
    let (read, write) = stream.into_split();
    let write = Arc::new(tokio::sync::Mutex::new(write));
    let open: ClientStreams = Default::default();
    // Input, cancels and terminal sizes go to the agent in order on a task of their own: while
    // the agent's writer is held (a paused VM) they wait there, and this client's next requests
    // (a resume) are still read. What waits is bounded by each stream's window: a client sends input only
    // as the agent grants it back, and one that sends more is cut off. Cancels, ends of input
    // and terminal sizes carry no bytes to grant: a client with more than `QUEUED_CONTROLS` of
    // them waiting is cut off too.
    let (to_agent, mut queued) = mpsc::unbounded_channel::<(u32, Request)>();
    let controls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let forward = tokio::spawn({
        let (agent, controls) = (agent.clone(), controls.clone());
        async move {
            while let Some((aid, req)) = queued.recv().await {
                let _ = agent.send_on(aid, &req).await;
                if !matches!(req, Request::Stdin(_)) {
                    controls.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    });
    let mut reader = tokio::io::BufReader::new(read);
    let mut body = Vec::new();
    let send = |w: Arc<tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>>, cid: u32, reply: Reply| async move {
        if let Ok(bytes) = proto::encode(cid, &reply) {
            let _ = w.lock().await.write_all(&bytes).await;
        }
    };
    while let Ok(Some(())) = read_frame(&mut reader, &mut body).await {
        let Ok((cid, req)) = proto::decode::<Request>(&body) else { break };
        match req {
            Request::Stop { timeout_ms } => {
                let (done, wait) = oneshot::channel();
                stop_asked.notify_one();
                let _ = ctl.send(Control::Stop { timeout: Duration::from_millis(timeout_ms.max(100)), done });
                let reply = match wait.await {
                    Ok(Err((kind, message))) => Reply::error(kind, message),
                    // (Dropped unanswered: let go behind another stop, the sandbox is down.)
                    Ok(Ok(())) | Err(_) => Reply::Ok,
                };
                send(write.clone(), cid, reply).await;
            }
            Request::Expose { .. } | Request::Unexpose { .. } | Request::Pause | Request::Resume | Request::Snapshot { .. } => {
                // A snapshot's own bound, and a little for what waits before it; the others
                // wait behind it within theirs.
                type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>>;
                let bound = control_bound();
                let (msg, answered): (Control, Answer) = match req {
                    Request::Expose { guest, host } => {
                        let (done, wait) = oneshot::channel();
                        (Control::Expose { guest, host, done }, Box::pin(answer(wait, "expose", bound, Reply::Port)))
                    }
                    other => {
                        let (done, wait) = oneshot::channel();
                        let (msg, what, bound) = match other {
                            Request::Unexpose { guest } => (Control::Unexpose { guest, done }, "unexpose", bound),
                            Request::Pause => (Control::Pause { done }, "pause", bound),
                            Request::Resume => (Control::Resume { done }, "resume", bound),
                            Request::Snapshot { dir, kind } => (
                                Control::Snapshot { dir: PathBuf::from(dir), kind, done },
                                "snapshot",
                                SNAPSHOT_BOUND + Duration::from_secs(30),
                            ),
                            _ => unreachable!("matched above"),
                        };
                        (msg, Box::pin(answer(wait, what, bound, |()| Reply::Ok)))
                    }
                };
                let _ = ctl.send(msg);
                let mut answered = answered;
                // Control requests come on a connection of their own (`Sandbox::call_control`),
                // on which the client gives one up by cancelling it (a dropped call) or by
                // going away (past its own bound). Dropping the answer's receiver tells the
                // control loop: a request not yet begun is dropped, not done later; a save
                // under way is cancelled, and the VM runs on. (Nothing else travels there.)
                let gone = loop {
                    tokio::select! {
                        reply = &mut answered => {
                            send(write.clone(), cid, reply).await;
                            break false;
                        }
                        frame = read_frame(&mut reader, &mut body) => match frame {
                            Ok(Some(())) => match proto::decode::<Request>(&body) {
                                Ok((c, Request::Cancel)) if c == cid => break false,
                                _ => continue,
                            },
                            _ => break true,
                        },
                    }
                };
                if gone {
                    break;
                }
            }
            Request::StoppedWithin { ms } => {
                let within = lock(&stopped).within(Duration::from_millis(ms));
                send(write.clone(), cid, Reply::Stopped(within.as_millis() as u64)).await;
            }
            Request::Info => {
                let info = serde_json::json!({ "id": id, "pid": std::process::id(), "protocol": proto::PROTOCOL_VERSION });
                send(write.clone(), cid, Reply::Info(info.to_string())).await;
            }
            Request::Credit(n) => {
                if let Some(s) = open.lock().unwrap_or_else(|e| e.into_inner()).get(&cid) {
                    s.window.add_permits((n as usize).min(proto::WINDOW));
                }
            }
            Request::Stdin(_) | Request::StdinClose | Request::Cancel | Request::Resize(_) => {
                let found = open.lock().unwrap_or_else(|e| e.into_inner()).get(&cid).map(|s| {
                    // A client that cancels reads no more: its relay must not wait for credit, nor
                    // for the agent's last reply.
                    if matches!(req, Request::Cancel) {
                        s.window.close();
                        s.given_up.notify_one();
                    }
                    (s.agent_id, s.input.clone())
                });
                if let Some((aid, input)) = found {
                    if let Request::Stdin(d) = &req {
                        if input.fetch_add(d.len(), Ordering::SeqCst) + d.len() > proto::WINDOW + proto::CHUNK {
                            tracing::warn!("a client sent more input than it was granted; disconnecting it");
                            break;
                        }
                    } else if controls.fetch_add(1, Ordering::SeqCst) >= QUEUED_CONTROLS {
                        tracing::warn!("a client queued more than {QUEUED_CONTROLS} cancels and terminal sizes; disconnecting it");
                        break;
                    }
                    let _ = to_agent.send((aid, req));
                }
            }
            // (Input, cancels and sizes were taken above: they wait out a pause in the queue.)
            _ if paused.load(Ordering::SeqCst) => {
                let why = lock(&pause_reason).clone().unwrap_or_else(|| PAUSED.into());
                send(write.clone(), cid, Reply::error(ErrorKind::Paused, why)).await;
            }
            Request::Hello { .. } => {
                send(
                    write.clone(),
                    cid,
                    Reply::Hello {
                        version: proto::PROTOCOL_VERSION,
                        agent_version: env!("CARGO_PKG_VERSION").into(),
                        capabilities: vec![],
                    },
                )
                .await;
            }
            // On its way down already (stopped meanwhile by another client, whose stop may have
            // returned while this process still cleans up): said so, see `GONE_BEFORE`.
            _ if down.load(Ordering::SeqCst) => send(write.clone(), cid, Reply::error(ErrorKind::Closed, proto::GONE_BEFORE)).await,
            req => match agent.open(&req).await {
                Ok(mut s) => {
                    let window = Arc::new(tokio::sync::Semaphore::new(proto::WINDOW));
                    let input = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                    let given_up = Arc::new(tokio::sync::Notify::new());
                    let stream = ClientStream { agent_id: s.id, window: window.clone(), input: input.clone(), given_up: given_up.clone() };
                    open.lock().unwrap_or_else(|e| e.into_inner()).insert(cid, stream);
                    let (w, open, agent) = (write.clone(), open.clone(), agent.clone());
                    tokio::spawn(async move {
                        loop {
                            let next = tokio::select! {
                                next = s.recv() => next,
                                // (Dropping `s` cancels it in the guest.)
                                () = given_up.notified() => break,
                            };
                            match next {
                                Some(reply) => {
                                    let terminal = reply.is_terminal();
                                    if let Reply::Credit(n) = &reply {
                                        let n = *n as usize;
                                        let _ = input.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| Some(v.saturating_sub(n)));
                                    }
                                    // Output goes on as the client grants it; meanwhile this
                                    // stream stops taking from the agent, which then stops.
                                    // (A frame larger than the window, which only a guest
                                    // that ignores the protocol sends, waits for all of it.)
                                    let n = reply.window_bytes().min(proto::WINDOW) as u32;
                                    if n > 0 {
                                        match window.acquire_many(n).await {
                                            Ok(permits) => permits.forget(),
                                            Err(_) => break,
                                        }
                                    }
                                    send(w.clone(), cid, reply).await;
                                    if terminal {
                                        break;
                                    }
                                }
                                None => {
                                    let reply = if agent.is_closed() {
                                        Reply::error(ErrorKind::Closed, "the sandbox's agent went away")
                                    } else {
                                        Reply::error(ErrorKind::Failed, crate::conn::FLOW_BROKEN)
                                    };
                                    send(w.clone(), cid, reply).await;
                                    break;
                                }
                            }
                        }
                        open.lock().unwrap_or_else(|e| e.into_inner()).remove(&cid);
                    });
                }
                Err(e) => send(write.clone(), cid, Reply::error(ErrorKind::Closed, e.full_message())).await,
            },
        }
    }
    // The client is gone: nobody will read the output of what it started.
    // Relays waiting for this client's credit end too.
    let left: Vec<u32> = open
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .map(|s| {
            s.window.close();
            s.given_up.notify_one();
            s.agent_id
        })
        .collect();
    for aid in left {
        let _ = to_agent.send((aid, Request::Cancel));
    }
    // (They go once the writer is free; nothing waits for them.)
    drop((to_agent, forward));
    if owner {
        let _ = ctl.send(Control::OwnerGone);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_fails_when_its_saved_state_was_made_anew_meanwhile() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("warm-x");
        let make = || {
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("state"), b"saved").unwrap();
            std::fs::write(dir.join("ram"), b"ram").unwrap();
        };
        make();
        let state = dir.join("state");
        let before = crate::warm::picked(&state);
        assert!(before.is_some());
        // Another start marking the template used changes nothing of it.
        std::fs::File::open(&state).unwrap().set_modified(std::time::SystemTime::now()).unwrap();
        same_restore_source(&state, before).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        make();
        let e = same_restore_source(&state, before).unwrap_err().to_string();
        assert!(e.contains("warm-x was removed or replaced"), "{e}");
        // Removed, not made again, once QEMU had it all open: all of it came from one save.
        let second = crate::warm::picked(&state);
        std::fs::remove_dir_all(&dir).unwrap();
        same_restore_source(&state, second).unwrap();
        assert!(same_restore_source(&state, None).is_err(), "one that was gone before fails");
    }

    #[test]
    fn stopped_spans_count_only_what_falls_in_the_window() {
        let mut spans = StoppedSpans::default();
        assert_eq!(spans.within(Duration::from_secs(60)), Duration::ZERO);
        let t = Instant::now();
        spans.0.push_back((t - Duration::from_secs(50), Some(t - Duration::from_secs(40))));
        spans.0.push_back((t - Duration::from_secs(10), Some(t - Duration::from_secs(5))));
        let within = |w: u64| spans.within(Duration::from_secs(w)).as_secs_f64().round() as u64;
        assert_eq!(within(60), 15);
        assert_eq!(within(45), 10, "a span cut by the window counts in part");
        assert_eq!(within(8), 3);
        assert_eq!(within(2), 0);
        // One under way counts up to now; beginning twice does not open a second.
        spans.begin();
        spans.begin();
        std::thread::sleep(Duration::from_millis(30));
        assert!(spans.within(Duration::from_millis(20)) >= Duration::from_millis(20));
        spans.end();
        spans.end();
        assert_eq!(spans.0.len(), 3);
        for _ in 0..300 {
            spans.begin();
            spans.end();
        }
        assert_eq!(spans.0.len(), StoppedSpans::KEPT);
    }

    #[test]
    fn a_reset_from_inside_is_a_shutdown_and_a_panic_is_not() {
        assert!(shut_down_from_inside("[    0.51] smolvm-agent: powering off\n[    0.52] reboot: Restarting system\n"));
        assert!(shut_down_from_inside("some output\n[    0.518045] reboot: Restarting system\n"));
        assert!(!shut_down_from_inside(
            "[    1.2] Kernel panic - not syncing: System is deadlocked on memory\n[    1.3] reboot: Restarting system\n"
        ));
        assert!(!shut_down_from_inside("[    1.2] Out of memory\n"));
        assert!(!shut_down_from_inside(""));
    }

    #[test]
    fn a_console_past_its_bound_keeps_its_start_and_says_what_went() {
        let path = std::env::temp_dir().join(format!("smolvm-console-{}", std::process::id()));
        let start: Vec<u8> = (0..CONSOLE_KEEP).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &start).unwrap();
        cap_console(&path);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CONSOLE_KEEP, "a console within its bound is left as it is");
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&vec![b'x'; CONSOLE_MAX as usize]).unwrap();
        // A follower (`logs -f`) has read all of it so far.
        let (seen, pos) = crate::sandbox::console_since(&path, 0);
        assert_eq!(seen.len() as u64, pos);
        cap_console(&path);
        // What QEMU (appending) writes next comes after the note.
        f.write_all(b"next line\n").unwrap();
        let note = "\n[smolvm: the console passed 8 MiB; what it wrote after its first MiB, up to here, was dropped]\n";
        // The follower goes on from the cut: it was left waiting for the file to grow past
        // where it had been.
        let (after, next) = crate::sandbox::console_since(&path, pos);
        assert_eq!(String::from_utf8_lossy(&after), format!("{note}next line\n"));
        assert_eq!(crate::sandbox::console_since(&path, next).0, b"");
        let got = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(&got[..CONSOLE_KEEP as usize], &start[..]);
        let rest = String::from_utf8_lossy(&got[CONSOLE_KEEP as usize..]);
        assert_eq!(rest, format!("{note}next line\n"));
    }

    #[test]
    fn the_vmm_error_is_what_this_qemu_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("supervisor.log");
        std::fs::write(&log, "qemu-system-x86_64: an error of an earlier start\n").unwrap();
        let from = std::fs::metadata(&log).unwrap().len();
        assert_eq!(vmm_complaints(&log, from), None);
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, b"2026-11-29T10:00:00Z  WARN smolvm: unrelated\nqemu: error reading initrd /x: open() failed\n")
            .unwrap();
        assert_eq!(vmm_complaints(&log, from).as_deref(), Some("qemu: error reading initrd /x: open() failed"));
    }
}
