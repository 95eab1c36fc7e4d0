//! The sandbox handle: create, start, run, env, stop, delete. The same calls work on a sandbox
//! this process started and on one found by id: both talk to its supervisor's socket.

use crate::config::{env_flag, Backend, Channel, Dirs, VmConfig};
use crate::conn::Conn;
use crate::error::{within, Error, IoContext, Result};
use crate::image::{self, Progress};
use crate::store::{ProcId, Record, State, Store};
use crate::supervisor::{BootSpec, RestoreSpec, StartStatus};
use serde::Serialize;
use smolvm_proto::{ErrorKind, ExecRequest, Reply, Request, Shell, SnapshotKind, TtySize};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of each output stream a `run` keeps by default. A guest's command can print far
/// faster than anyone reads (`yes`, `cat /dev/urandom`), and a result held whole in the
/// caller's memory must not let it take all of the host's.
pub const DEFAULT_MAX_OUTPUT: usize = 64 << 20;
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest Unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Files of one sandbox, in a directory named by a hash of its id so that socket paths stay
/// short whatever the id and data directory.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    pub dir: PathBuf,
    pub ctl: PathBuf,
    pub agent: PathBuf,
    pub qmp: PathBuf,
    pub console: PathBuf,
    pub log: PathBuf,
    pub lock: PathBuf,
    /// The sandbox's pinned SSH host key (images with an SSH server).
    pub known_hosts: PathBuf,
    /// Serializes changes to a running sandbox's variables (see `Sandbox::env_home`).
    pub env_lock: PathBuf,
    /// Its root disk's copy-on-write overlay (images with a root disk; see `image::overlay`).
    pub overlay: PathBuf,
    /// vsock transport: the vhost-user socket QEMU's vsock device talks to.
    pub vhost_vsock: PathBuf,
    /// vsock transport: the host side of the guest's vsock (`<vsock>_<port>` per host port).
    pub vsock: PathBuf,
}

/// The supervisor's control socket, in the sandbox's directory.
const CTL_SOCKET: &str = "ctl.sock";

impl SandboxPaths {
    pub fn new(dirs: &Dirs, id: &str) -> SandboxPaths {
        let dir = dirs.data.join("vms").join(image::fingerprint(&[id.as_bytes()]));
        SandboxPaths {
            ctl: dir.join(CTL_SOCKET),
            agent: dir.join("agent.sock"),
            qmp: dir.join("qmp.sock"),
            console: dir.join("console.log"),
            log: dir.join("supervisor.log"),
            lock: dir.join("lock"),
            known_hosts: dir.join("known_hosts"),
            env_lock: dir.join("env.lock"),
            overlay: dir.join("rootfs.qcow2"),
            vhost_vsock: dir.join("vhost-vsock.sock"),
            vsock: dir.join("vsock.sock"),
            dir,
        }
    }

    pub fn remove_sockets(&self) {
        let agent_vsock = crate::vmm::vsock::port_path(&self.vsock, smolvm_proto::AGENT_VSOCK_PORT);
        for p in [&self.ctl, &self.agent, &self.qmp, &self.vhost_vsock, &self.vsock, &agent_vsock] {
            let _ = std::fs::remove_file(p);
        }
    }

    pub fn remove_all(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Everything but the start lock, which a caller holds.
    fn remove_all_but_lock(&self) {
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = e.path();
            if path != self.lock {
                let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            }
        }
    }

    /// After `start_lock` found the sandbox gone (its record removed meanwhile, by its own
    /// supervisor say): the lock made its directory again, and it goes again, with the lock
    /// file, unless a sandbox of the same name has been created since (its record is back).
    /// A start of that new sandbox that waits on this lock then locks a file of its own
    /// (`start_lock` checks that the file it locked is still there).
    fn forget_lock(&self, store: &Store, id: &str) {
        if matches!(store.get(id), Ok(None)) {
            let _ = std::fs::remove_file(&self.lock);
            let _ = std::fs::remove_dir(&self.dir);
        }
    }

    /// The lock a start holds until the sandbox runs (or has failed): a delete waits for it,
    /// and prune (`wait: false`) passes over a sandbox that holds it (`None`). Until it runs,
    /// a starting sandbox's record does not say so, and its address lease and files are in use.
    pub fn start_lock(&self, wait: bool) -> Result<Option<StartLock>> {
        use nix::fcntl::{Flock, FlockArg};
        use std::os::unix::fs::MetadataExt;
        let mut tries = 0;
        loop {
            // A record whose directory is gone (a delete interrupted half way) still gets a lock.
            let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir);
            let file = match std::fs::File::create(&self.lock) {
                Ok(f) => f,
                // A delete in another process removed the directory between the two steps
                // (`prune` then failed as a whole): once more. Who took the lock of a sandbox
                // that is gone forgets it (`forget_lock`), as after any delete.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 3 => {
                    tries += 1;
                    continue;
                }
                Err(e) => return Err(Error::Io { context: format!("creating {}", self.lock.display()), source: e }),
            };
            let how = if wait { FlockArg::LockExclusive } else { FlockArg::LockExclusiveNonblock };
            let lock = match Flock::lock(file, how) {
                Ok(l) => l,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) if !wait => return Ok(None),
                Err((_, e)) => return Err(Error::Host(format!("locking sandbox: {e}"))),
            };
            // The holder before us may have removed the file (`forget_lock`): a lock on it
            // locks nothing anyone else can find. Lock the file that is there now instead.
            let held = lock.metadata().map(|m| m.ino()).ok();
            if held.is_some() && held == std::fs::metadata(&self.lock).map(|m| m.ino()).ok() {
                return Ok(Some(StartLock(Some(lock))));
            }
        }
    }

    /// Whether another process holds the start lock now (a start, a stop, a delete), found
    /// without making the lock's file or directory, which a delete may have removed.
    pub fn start_lock_held(&self) -> bool {
        use nix::fcntl::{Flock, FlockArg};
        let Ok(file) = std::fs::File::open(&self.lock) else { return false };
        matches!(Flock::lock(file, FlockArg::LockExclusiveNonblock), Err((_, nix::errno::Errno::EWOULDBLOCK)))
    }

    /// `start_lock(true)`, waited for off the async runtime: with Python's one shared runtime,
    /// a thread blocked on it would stall the thread that holds the lock.
    pub(crate) async fn wait_start_lock(&self) -> Result<Option<StartLock>> {
        let paths = self.clone();
        tokio::task::spawn_blocking(move || paths.start_lock(true)).await.map_err(|e| Error::Host(e.to_string()))?
    }
}

/// Whether sandboxes can live in this data directory: the sockets every sandbox binds fit a
/// Unix socket address there (doctor's check, and a create's). Sandbox directories are named
/// by a fixed-length hash, so any id stands for all.
pub fn check_data_dir(dirs: &Dirs) -> Result<()> {
    let paths = SandboxPaths::new(dirs, "x");
    check_socket_paths(dirs, &[&paths.ctl, &paths.agent, &paths.qmp])
}

/// Each socket a sandbox binds must fit a Unix socket address, the longest one included.
fn check_socket_paths(dirs: &Dirs, sockets: &[&Path]) -> Result<()> {
    let longest = sockets.iter().map(|p| p.as_os_str().len()).max().unwrap_or(0);
    if longest <= MAX_SOCKET_PATH {
        return Ok(());
    }
    let room = MAX_SOCKET_PATH.saturating_sub(longest - dirs.data.as_os_str().len());
    Err(Error::validation(
        "SMOLVM_DATA_DIR",
        format!("{} is too long for Unix socket paths (keep it to {room} bytes or fewer)", dirs.data.display()),
    ))
}

/// See [`Sandbox::env_home`].
enum EnvHome {
    Config(StartLock, Store, Box<VmConfig>),
    Guest(nix::fcntl::Flock<std::fs::File>),
}

/// A held start lock (see [`SandboxPaths::start_lock`]), let go by closing it, never by
/// unlocking it (which is what dropping a `Flock` does). A supervisor holds a copy of its
/// start's lock until its VM runs, and an unlock would free the lock for everyone while that
/// boot goes on: a start dropped half way (its caller was interrupted) let a delete remove the
/// record of a VM still booting. Closed, the lock stays held through the supervisor's copy.
pub struct StartLock(Option<nix::fcntl::Flock<std::fs::File>>);

impl std::ops::Deref for StartLock {
    type Target = std::fs::File;
    fn deref(&self) -> &std::fs::File {
        self.0.as_ref().expect("held until dropped")
    }
}

impl Drop for StartLock {
    fn drop(&mut self) {
        if let Some(lock) = self.0.take() {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&*lock);
            // The Flock (and its File) go without their Drop: no unlock, and no second close.
            std::mem::forget(lock);
            // SAFETY: `fd` is the descriptor the forgotten File owned; nothing else closes or
            // uses it after this.
            unsafe { libc::close(fd) };
        }
    }
}

/// Where a supervisor finds its copy of the start's lock, and the variable that says it has one.
pub(crate) const START_LOCK_FD: i32 = 3;
pub(crate) const START_LOCK_ENV: &str = "SMOLVM_START_LOCK_FD";

/// The last `n` lines of a console log, for error messages.
pub fn console_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    last_lines(&text, n)
}

/// The last `n` lines of `text`, joined without a final newline (nor carriage returns).
pub fn last_lines(text: &str, n: usize) -> String {
    // (Cut just after a newline: still UTF-8.)
    let tail = std::str::from_utf8(last_lines_of(text.as_bytes(), n)).unwrap_or_default();
    tail.lines().collect::<Vec<_>>().join("\n")
}

/// The last `n` lines of a log, as its bytes (line ends and all, the last line's included).
pub fn last_lines_of(bytes: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &bytes[i + 1..];
            }
        }
    }
    bytes
}

/// A sandbox's whole console log for `logs`: none yet (never started) is empty; one that
/// cannot be read (another user's) is an error, not an empty log.
pub fn console_log(path: &Path) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::Io { context: format!("reading the console log {}", path.display()), source: e }),
    }
}

/// What a console gained since `pos`, and where the next read starts (`logs -f`). The
/// supervisor cuts a console past its bound back to its first MiB, then notes the cut: a file
/// shorter than `pos` was cut, and all past its first MiB is new.
pub fn console_since(path: &Path, pos: u64) -> (Vec<u8>, u64) {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return (Vec::new(), pos) };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = if len < pos { len.min(crate::supervisor::CONSOLE_KEEP) } else { pos };
    let mut data = Vec::new();
    if f.seek(SeekFrom::Start(from)).is_err() || f.read_to_end(&mut data).is_err() {
        return (Vec::new(), pos);
    }
    let next = from + data.len() as u64;
    (data, next)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CommandResult {
    pub fn ok(&self) -> bool {
        self.exit_code == 0
    }

    /// stdout without surrounding whitespace.
    pub fn output(&self) -> &str {
        self.stdout.trim()
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub timeout: Duration,
    pub shell: Shell,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// What the command reads on stdin, which then ends; `None`: stdin is /dev/null.
    pub stdin: Option<Vec<u8>>,
    /// Keep no copy of the output: the result's stdout and stderr are empty. For a caller that
    /// takes the output as it streams by (the CLI), whose memory would otherwise grow with all
    /// that a command prints, without end for `yes`.
    pub discard_output: bool,
    /// The most bytes of stdout, and of stderr, the result keeps: a command that prints more
    /// is stopped (its whole process group) and the call fails with [`Error::OutputLimit`].
    /// What came so far has been handed to `on_output`. Not used with `discard_output`.
    pub max_output: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: DEFAULT_RUN_TIMEOUT,
            shell: Shell::Login,
            env: BTreeMap::new(),
            cwd: None,
            stdin: None,
            discard_output: false,
            max_output: DEFAULT_MAX_OUTPUT,
        }
    }
}

/// A wait that has no end in practice, and still fits a clock's deadline.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 86400);

/// What a command reads on stdin as it comes (a pipe, a socket), for `run_with_input`.
pub type Input = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// A command's terminal (`run_interactive`): its size at the start, then each new size.
pub struct Terminal {
    pub size: TtySize,
    pub resizes: tokio::sync::mpsc::UnboundedReceiver<TtySize>,
}

/// Output as it arrives, for callers that stream it (the CLI).
pub enum Output<'a> {
    Stdout(&'a [u8]),
    Stderr(&'a [u8]),
}

pub struct Sandbox {
    id: String,
    dirs: Dirs,
    paths: SandboxPaths,
    /// The supervisor's connection. A handle whose sandbox another process restarted finds it
    /// closed, and takes the new supervisor's at its next call.
    conn: std::sync::Mutex<Option<Arc<Conn>>>,
    /// How `run` and file transfers reach the guest (the config's `comm_channel`).
    channel: Channel,
}

fn random_id(prefix: &str) -> String {
    let mut bytes = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    format!("{prefix}-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Resolve (building if needed) what a config boots, off the async runtime.
pub(crate) async fn resolve_image(config: &VmConfig, dirs: &Dirs, progress: Progress<'_>) -> Result<crate::image::BootImage> {
    let (config, dirs) = (config.clone(), dirs.clone());
    // Building may take minutes (the kernel, once); keep the runtime free meanwhile.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let build = tokio::task::spawn_blocking(move || {
        image::resolve(&config, &dirs, &move |line: &str| {
            let _ = tx.send(line.to_string());
        })
    });
    while let Some(line) = rx.recv().await {
        progress(&line);
    }
    build.await.map_err(|e| Error::Host(format!("image build task: {e}")))?
}

/// Where a snapshot's files live.
pub fn snapshot_dir(dirs: &Dirs, id: &str) -> PathBuf {
    dirs.data.join("snapshots").join(image::fingerprint(&[id.as_bytes()]))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    pub snapshot_id: String,
    pub vm_id: String,
    pub snapshot_type: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub name: Option<String>,
    pub env_vars: Option<BTreeMap<String, String>>,
    pub resume: bool,
    pub boot_timeout: Duration,
    /// Host directories in place of those the snapshot's sandbox had (which may be gone since);
    /// None keeps them. A disk snapshot's sandbox boots and mounts them anew; a full snapshot
    /// has none and takes none.
    pub mounts: Option<Vec<crate::config::Mount>>,
    /// Whether the mounts are writable. None: read-only for new mounts, the snapshot's setting
    /// for its own.
    pub writable_mounts: Option<bool>,
    /// Port forwards in place of the snapshot's; None keeps them. A fixed host port of the
    /// snapshot is taken while its source sandbox runs: a restore beside it needs others. (The
    /// guest sees only its own ports, so a full snapshot takes new ones as well as a disk one.)
    pub port_forwards: Option<Vec<crate::config::PortForward>>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            name: None,
            env_vars: None,
            resume: true,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            mounts: None,
            writable_mounts: None,
            port_forwards: None,
        }
    }
}

pub fn list_snapshots(dirs: &Dirs) -> Result<Vec<crate::store::SnapshotRecord>> {
    let store = Store::open(&dirs.data)?;
    if let Err(e) = reap_snapshot_leftovers(dirs, &store) {
        tracing::warn!("removing snapshots' leftovers: {}", e.full_message());
    }
    store.snapshots()
}

/// Delete a snapshot, unless sandboxes started from it still stand on its disk.
pub fn delete_snapshot(dirs: &Dirs, id: &str) -> Result<()> {
    let store = Store::open(&dirs.data)?;
    if store.get_snapshot(id)?.is_none() {
        // Its record comes last, once it is saved: until then its maker owns the directory.
        let dir = snapshot_dir(dirs, id);
        if dir.is_dir() && !crate::snapshot_files::orphaned(&dir) {
            return Err(Error::validation(
                "snapshot_id",
                format!("snapshot '{id}' is still being made; delete it once the command saving it has returned"),
            ));
        }
        return Err(Error::SnapshotNotFound(id.to_string()));
    }
    // Dead ephemeral sandboxes go first: they do not hold a snapshot.
    list(dirs)?;
    // The record and the files go under the claim lock: a snapshot of the same id made in
    // between would find a directory with no record, take it over, and lose it to this removal.
    let dir = snapshot_dir(dirs, id);
    let _claims = dir.parent().map(crate::snapshot_files::lock).transpose()?;
    // The check and the removal are one statement against restores recording their origin.
    let users = store.remove_unused_snapshot(id)?;
    if !users.is_empty() {
        return Err(Error::validation(
            "snapshot_id",
            format!("snapshot '{id}' is in use by sandbox(es) {}; delete them first", users.join(", ")),
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Whether the supervisor inherits the caller's variable `name`: smolvm's own settings, the
/// logging filter, and what finding programs (QEMU, nft, ssh), temporary files and the data
/// directory's default need. Everything else of a caller's environment may be a secret.
fn supervisor_keeps(name: &std::ffi::OsStr) -> bool {
    let Some(name) = name.to_str() else { return false };
    name.starts_with("SMOLVM_")
        || matches!(
            name,
            "PATH" | "HOME" | "USER" | "LOGNAME" | "LANG" | "LC_ALL" | "LC_CTYPE" | "TMPDIR" | "RUST_BACKTRACE"
                // Where `vhost-device-vsock` is found (cargo's bin), and QEMU's libraries.
                | "CARGO_HOME" | "LD_LIBRARY_PATH"
        )
        || name.starts_with("XDG_")
}

/// The accelerator a full snapshot's saved VM loads under: the one it ran under, since QEMU's
/// microvm has other devices under KVM than under TCG (kvmclock against an RTC) and refuses a
/// state with the other's. Snapshots from before this was recorded take the host's choice.
fn restore_accel(dirs: &Dirs, dir: &Path, snapshot_id: &str) -> Result<crate::vmm::Accel> {
    use crate::vmm::Accel;
    let Ok(saved) = std::fs::read_to_string(dir.join("accel")) else {
        return crate::vmm::choose_accel().map_err(Error::Host);
    };
    let saved = match saved.trim() {
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        other => return Err(Error::Host(format!("snapshot '{snapshot_id}' is damaged: it names no accelerator ({other:?})"))),
    };
    let asked = crate::vmm::requested_accel().map_err(Error::Host)?;
    if asked.is_some_and(|a| a != saved) {
        return Err(Error::validation(
            "SMOLVM_ACCEL",
            format!(
                "snapshot '{snapshot_id}' was saved under {} and loads only under it (unset SMOLVM_ACCEL or set it to {})",
                saved.name(),
                saved.name()
            ),
        ));
    }
    if saved == Accel::Tcg {
        // The guest keeps time by this host's TSC at the rate it was told at boot: restored
        // where the TSC runs at another rate, its clock would run fast or slow for good.
        let here = crate::vmm::host_tsc_is_invariant().then(|| crate::vmm::host_tsc_khz(&dirs.images)).flatten();
        if let Some(why) = std::fs::read_to_string(dir.join("tsc-khz")).ok().and_then(|s| tsc_mismatch(s.trim().parse().ok()?, here?)) {
            return Err(Error::Host(format!("snapshot '{snapshot_id}' cannot be resumed on this host: {why}")));
        }
        return Ok(Accel::Tcg);
    }
    crate::vmm::kvm_usable().map_err(|why| {
        Error::Host(format!("snapshot '{snapshot_id}' was saved under KVM and loads only under it, which is not usable here: {why}"))
    })?;
    // (Snapshots from before the CPU was recorded have no file: QEMU's load is the check.)
    if let Ok(cpu) = std::fs::read_to_string(dir.join("cpu")) {
        crate::vmm::cpu_can_resume(&cpu, &crate::vmm::host_cpu_identity())
            .map_err(|why| Error::Host(format!("snapshot '{snapshot_id}' cannot be resumed on this host: {why}")))?;
    }
    Ok(Accel::Kvm)
}

/// Why a TCG guest saved where the TSC ran at `saved` kHz cannot keep time where it runs at
/// `here`: rates more than 0.5 % apart (one host measures its own within 0.01 %).
fn tsc_mismatch(saved: u64, here: u64) -> Option<String> {
    let ratio = here as f64 / saved as f64;
    ((ratio - 1.0).abs() > 0.005).then(|| {
        format!(
            "it was saved under TCG on a host whose TSC runs at {:.1} MHz, and this one's runs at {:.1} MHz: its clock would run at {:.0} % of real time",
            saved as f64 / 1000.0,
            here as f64 / 1000.0,
            ratio * 100.0
        )
    })
}

/// A file transfer that makes no progress for this long has stalled (the agent or the
/// supervisor is stuck): it ends with a timeout error.
const TRANSFER_IDLE: Duration = Duration::from_secs(60);

/// How long a request that starts no process may take (env, listening ports).
const CALL_BOUND: Duration = Duration::from_secs(30);

/// How long a snapshot waits for the guest's variables once its state is saved.
const SNAPSHOT_ENV_BOUND: Duration = Duration::from_secs(2);

/// The longest command: the shell gets it as one argument, and Linux takes at most 32 pages
/// for one (`MAX_ARG_STRLEN`), its terminating NUL included. Past that the guest could only
/// say that the shell did not start.
const MAX_COMMAND: usize = 32 * 4096 - 1;

/// What every way of running a command checks first. A timeout of zero is none. Public so
/// that `smolvm run` can refuse bad input before it boots anything.
pub fn check_run(command: &str, opts: &RunOptions) -> Result<()> {
    if command.trim().is_empty() {
        return Err(Error::validation("command", "must not be empty"));
    }
    if command.contains('\0') {
        return Err(Error::validation("command", "must not contain a NUL byte"));
    }
    if command.len() > MAX_COMMAND {
        return Err(Error::validation(
            "command",
            format!(
                "{} bytes is too long: at most {MAX_COMMAND} (Linux's limit on one argument); pass a longer script on stdin to `sh -s`",
                command.len()
            ),
        ));
    }
    if !opts.timeout.is_zero() && opts.timeout < Duration::from_secs(1) {
        return Err(Error::validation("timeout", "must be at least 1 second, or 0 for none"));
    }
    crate::config::check_wait(opts.timeout, "timeout")?;
    if let Some(cwd) = &opts.cwd {
        if cwd.contains('\0') {
            return Err(Error::validation("cwd", format!("{cwd:?} contains a NUL byte, which no path can hold")));
        }
        if !cwd.starts_with('/') {
            return Err(Error::validation("cwd", format!("{cwd:?} is not an absolute guest path")));
        }
    }
    if opts.max_output == 0 {
        return Err(Error::validation("max_output", "must be at least 1 byte"));
    }
    smolvm_proto::env::validate_vars(&opts.env)?;
    Ok(())
}

/// A health check's bound: an agent that answers at all answers in milliseconds.
const PING_BOUND: Duration = Duration::from_secs(10);

/// The `smolvm` executable that runs supervisors: `SMOLVM_BIN`, the running program if it is
/// `smolvm`, one beside (or above) the running program, else `smolvm` on PATH.
pub fn smolvm_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SMOLVM_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ctx(|| "locating the running executable".into())?;
    if exe.file_name().is_some_and(|n| n == "smolvm") {
        return Ok(exe);
    }
    for dir in exe.ancestors().skip(1).take(3) {
        let p = dir.join("smolvm");
        if p.is_file() {
            return Ok(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("smolvm").is_file() {
                return Ok(d.join("smolvm"));
            }
        }
    }
    Err(Error::Host("the `smolvm` executable (which supervises sandboxes) was not found: set SMOLVM_BIN".into()))
}

/// If a sandbox's supervisor died (killed, crashed), record that and remove what it left:
/// a VMM still running, sockets, and for an ephemeral sandbox everything.
///
/// That happens under the sandbox's start lock (`held`: the caller has it), from a fresh read:
/// from a stale record (another process restarted the sandbox since it was read) it would take
/// the new supervisor's sockets, firewall table and lease. A sandbox being started is passed
/// over: its start reaps for itself.
fn reap(store: &Store, dirs: &Dirs, rec: Record, held: bool) -> Result<Option<Record>> {
    if held {
        return reap_now(store, dirs, rec);
    }
    let owner_gone = rec.ephemeral && rec.owner.is_some_and(|o| !o.alive());
    let supervisor_gone = rec.state.is_live() && !rec.supervisor.is_some_and(|p| p.alive());
    // Nothing dead: shown as read. (Not looked at again without the lock: a stop that ended
    // since would read as a supervisor that died, from the record that still says running.)
    if !(owner_gone || supervisor_gone || start_died(&rec)) {
        return Ok(Some(rec));
    }
    let Some(_lock) = SandboxPaths::new(dirs, &rec.id).start_lock(false)? else {
        return Ok(Some(rec));
    };
    match store.get(&rec.id)? {
        Some(fresh) => reap_now(store, dirs, fresh),
        None => {
            SandboxPaths::new(dirs, &rec.id).forget_lock(store, &rec.id);
            Ok(None)
        }
    }
}

fn reap_now(store: &Store, dirs: &Dirs, rec: Record) -> Result<Option<Record>> {
    let kill = |p: Option<ProcId>| {
        if let Some(p) = p.filter(|p| p.alive()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), nix::sys::signal::Signal::SIGKILL);
        }
    };
    // A supervisor's end is waited for (a moment: a SIGKILL is not refused): still dying, its
    // nft could yet commit a table after the one found here was removed.
    let end_supervisor = |p: Option<ProcId>| {
        kill(p);
        if let Some(p) = p {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !p.gone() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    };
    let paths = SandboxPaths::new(dirs, &rec.id);
    // What a dead supervisor left on the host network (its TAP went with QEMU).
    let net_leftovers = |store: &Store| host_network_leftovers(store, &rec.id);
    // An ephemeral sandbox whose owner died goes with it, whatever state it was in.
    // (The record's removal or correction is written where it can be: on a full disk it
    // cannot, and the next command tries again. Meanwhile what is found is shown as it is.)
    let forget = |store: &Store| match store.remove(&rec.id) {
        Ok(_) => paths.remove_all(),
        Err(e) => tracing::warn!("removing the record of {}: {}", rec.id, e.full_message()),
    };
    if rec.ephemeral && rec.owner.is_some_and(|o| !o.alive()) {
        end_supervisor(rec.supervisor);
        kill(rec.vmm);
        net_leftovers(store);
        forget(store);
        return Ok(None);
    }
    if start_died(&rec) {
        end_supervisor(rec.supervisor);
        kill(rec.vmm);
        net_leftovers(store);
        paths.remove_sockets();
        // The sandbox stays as it was before that start (created or stopped), without the
        // dead processes' ids.
        if let Err(e) = store.set_state(&rec.id, rec.state, rec.error.as_deref()) {
            tracing::warn!("recording what {} left: {}", rec.id, e.full_message());
        }
        return store.get(&rec.id);
    }
    let supervisor_alive = rec.supervisor.is_some_and(|p| p.alive());
    if !rec.state.is_live() || supervisor_alive {
        return Ok(Some(rec));
    }
    end_supervisor(rec.supervisor);
    kill(rec.vmm);
    net_leftovers(store);
    paths.remove_sockets();
    if rec.ephemeral {
        forget(store);
        return Ok(None);
    }
    let why = SUPERVISOR_GONE;
    if let Err(e) = store.set_state(&rec.id, State::Error, Some(why)) {
        tracing::warn!("recording that {} failed: {}", rec.id, e.full_message());
        return Ok(Some(Record { state: State::Error, error: Some(why.into()), supervisor: None, vmm: None, ..rec }));
    }
    store.get(&rec.id)
}

/// A start whose starter and supervisor were killed before the VM ran (the supervisor is
/// recorded once spawned; its record still says created or stopped): its address lease,
/// firewall table and a VMM it had begun are left, which the next command removes.
fn start_died(rec: &Record) -> bool {
    !rec.state.is_live() && rec.supervisor.is_some_and(|p| !p.alive())
}

/// The reason a sandbox whose supervisor died is recorded with, by whoever finds it first.
const SUPERVISOR_GONE: &str = "the sandbox's supervisor exited unexpectedly";

/// Remove what a sandbox may have left on the host network when its supervisor could not
/// (killed mid-boot, crashed, or refused the table's removal): its nftables table and its
/// address lease. Its TAP went with QEMU. The lease is the only trace of the table: it goes only
/// once the table has (else the next command tries again); the ports, which nothing serves, go
/// either way.
pub(crate) fn host_network_leftovers(store: &Store, id: &str) {
    // A supervisor that cleaned up released its lease: then there is nothing to look for. (Asked
    // of the leases, not the record: an ephemeral sandbox's supervisor that could not remove
    // its table removed the record and kept the lease.)
    let leased = store.leased(id).unwrap_or(true);
    if leased && !remove_table(store, id) {
        let _ = store.forget_ports(id);
        return;
    }
    let _ = store.release_network(id);
}

/// Remove sandbox `id`'s nftables table, if it has one. Whether none is left. Over netlink:
/// no `nft` on PATH needed (cron's PATH has no /usr/sbin). (Without root, the table was in
/// the sandbox's own namespace, gone with its processes.)
fn remove_table(store: &Store, id: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        return true;
    }
    match crate::net::nft_remove(&crate::net::table_name(store.data_dir(), id)) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("{}", e.full_message());
            false
        }
    }
}

/// A mount holding smolvm's SSH key (`$HOME` holds the data directory by default) would hand
/// the guest the key that logs in to every other SSH sandbox of this user, whose servers
/// listen on host ports a guest with user-mode networking reaches.
fn mounts_keep_the_ssh_key_out(dirs: &Dirs, mounts: &[crate::config::Mount]) -> Result<()> {
    let key_dir = dirs.data.join("ssh");
    // (Where it does not exist yet: where it will be, by its existing ancestor's real path.)
    let real = |p: &Path| -> PathBuf {
        let known = p.ancestors().find_map(|a| std::fs::canonicalize(a).ok().map(|c| (a.to_path_buf(), c)));
        match known {
            Some((a, c)) => c.join(p.strip_prefix(&a).unwrap_or(Path::new(""))),
            None => p.to_path_buf(),
        }
    };
    let key_dir = real(&key_dir);
    for m in mounts {
        if key_dir.starts_with(real(&m.host)) {
            return Err(Error::validation(
                "mounts",
                format!(
                    "{} holds smolvm's SSH key ({}), which logs in to every SSH sandbox: mount a directory that does not hold it (or set SMOLVM_DATA_DIR elsewhere)",
                    m.host.display(),
                    key_dir.display()
                ),
            ));
        }
    }
    Ok(())
}

/// All sandboxes, with dead ones detected.
pub fn list(dirs: &Dirs) -> Result<Vec<Record>> {
    let store = Store::open(&dirs.data)?;
    let mut out = Vec::new();
    for rec in store.all()? {
        if let Some(r) = reap(&store, dirs, rec, false)? {
            out.push(r);
        }
    }
    Ok(out)
}

/// Remove stopped and failed sandboxes and anything a crashed process left behind.
/// What `prune` removed: sandboxes by id, and directories no record pointed at (an interrupted
/// delete's sandbox directory, an interrupted `snapshot create`'s files).
#[derive(Debug, Default, serde::Serialize)]
pub struct Pruned {
    pub removed: Vec<String>,
    /// (As text: a name that is not UTF-8 shows its bytes replaced.)
    pub leftovers: Vec<String>,
}

pub fn prune(dirs: &Dirs) -> Result<Pruned> {
    let store = Store::open(&dirs.data)?;
    let mut removed = Vec::new();
    let mut leftovers = Vec::new();
    let mut keep = std::collections::HashSet::new();
    for rec in list(dirs)? {
        let paths = SandboxPaths::new(dirs, &rec.id);
        // A sandbox being started reads as stopped until it runs: leave it alone.
        let _lock = match paths.start_lock(false)? {
            Some(l) => l,
            None => {
                tracing::debug!("prune: passing over {}: a start, stop or delete holds its lock", rec.id);
                keep.insert(paths.dir);
                continue;
            }
        };
        // Read again under the lock: a start that finished since `list` has made it running.
        let Some(rec) = store.get(&rec.id)? else {
            paths.forget_lock(&store, &rec.id);
            continue;
        };
        if matches!(rec.state, State::Stopped | State::Error) {
            // A supervisor that was killed (a stop past its bound) left its firewall table.
            host_network_leftovers(&store, &rec.id);
            store.remove(&rec.id)?;
            paths.remove_all();
            removed.push(rec.id);
        } else {
            // Not started, no start under way (the lock is ours) and its supervisor (recorded
            // as soon as it runs) gone: a network it holds is a boot's whose supervisor and
            // starter both died.
            if rec.state == State::Created && !rec.supervisor.is_some_and(|p| p.alive()) {
                host_network_leftovers(&store, &rec.id);
                // Nor the dead supervisor's pid (`info` showed it) and sockets.
                if rec.supervisor.is_some() {
                    store.set_state(&rec.id, State::Created, None)?;
                    paths.remove_sockets();
                }
            }
            keep.insert(paths.dir);
        }
    }
    // Directories no record points at: a delete interrupted half way. One made in the last
    // minute may belong to a sandbox being created right now, whose record is newer than the
    // list above.
    let recorded: std::collections::HashSet<PathBuf> =
        store.all()?.iter().map(|r| SandboxPaths::new(dirs, &r.id).dir).chain(keep).collect();
    if let Ok(entries) = std::fs::read_dir(dirs.data.join("vms")) {
        for e in entries.flatten() {
            let path = e.path();
            if recorded.contains(&path) || !older_than_a_minute(&path) {
                continue;
            }
            // Under its start lock, with no record naming it by then: a sandbox of that name
            // created since the list above (whose directory this is again) and being started
            // holds the lock, or has its record.
            let lock = std::fs::File::open(path.join("lock"))
                .ok()
                .and_then(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).ok());
            let named = || store.all().map(|all| all.iter().any(|r| SandboxPaths::new(dirs, &r.id).dir == path)).unwrap_or(true);
            if path.join("lock").exists() && lock.is_none() || named() {
                continue;
            }
            if end_unrecorded_supervisor(&path) && std::fs::remove_dir_all(&path).is_ok() {
                leftovers.push(path.to_string_lossy().into_owned());
            }
        }
    }
    // Leases and ports of sandboxes no record names (a delete cut off half way by an older
    // build), with any firewall table: else their address would never be handed out again.
    for id in store.unrecorded_network()? {
        if remove_table(&store, &id) {
            store.forget_network(&id)?;
        }
    }
    leftovers.extend(reap_snapshot_leftovers(dirs, &store)?);
    Ok(Pruned { removed, leftovers })
}

/// The process serving the control socket in sandbox directory `dir`, if one does (the peer
/// of a connection to it).
fn serving_supervisor(dir: &Path) -> Option<nix::unistd::Pid> {
    let stream = std::os::unix::net::UnixStream::connect(dir.join(CTL_SOCKET)).ok()?;
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    // Only a supervisor of this user's is ended for it.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", peer.pid())).ok()?;
    let supervisor = cmdline.split(|b| *b == 0).any(|arg| arg == b"__supervise");
    (supervisor && peer.uid() == nix::unistd::geteuid().as_raw()).then(|| nix::unistd::Pid::from_raw(peer.pid()))
}

/// A supervisor still serving a sandbox directory that no record names (the state database was
/// lost or replaced while it ran) is told to end: else its VM, TAP and firewall table would run
/// on with no command able to reach them, and removing its files (as prune did) hid them. On
/// SIGTERM it stops its VM and takes its network down, as for a stop. Whether none serves the
/// directory now.
fn end_unrecorded_supervisor(dir: &Path) -> bool {
    let Some(pid) = serving_supervisor(dir) else { return true };
    let Some(process) = ProcId::of(pid.as_raw()) else { return serving_supervisor(dir).is_none() };
    tracing::warn!("prune: ending supervisor {pid} of {}, a sandbox no record names", dir.display());
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
        return serving_supervisor(dir).is_none();
    }
    // (Its stop has a graceful bound of a few seconds, then a kill.)
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while process.alive() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Another build's supervisor, which cannot be sent a request, is asked to stop by SIGTERM: it
/// takes that as a stop (it powers the guest off, tears down and records it). Waited for within
/// `bound`; one still there after it is killed by the caller.
async fn end_by_signal(rec: &Record, bound: Duration) {
    if let Some(sup) = rec.supervisor.filter(|p| p.alive()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(sup.pid), nix::sys::signal::Signal::SIGTERM);
        exited_within(sup, bound).await;
    }
}

/// Whether `process` is gone within `bound`, looked for every 20 ms (a supervisor on its way
/// out has no socket to say when it is done).
async fn exited_within(process: ProcId, bound: Duration) -> bool {
    let since = std::time::Instant::now();
    while !process.gone() {
        if since.elapsed() > bound {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Snapshot directories with no record whose maker is gone: a `snapshot create` killed, or
/// interrupted and exiting before its files were removed. Removed by `prune` and by the
/// snapshot commands, which are where one would look for them. Returns what it removed.
fn reap_snapshot_leftovers(dirs: &Dirs, store: &Store) -> Result<Vec<String>> {
    let parent = dirs.data.join("snapshots");
    if !parent.is_dir() {
        return Ok(Vec::new());
    }
    let _claims = crate::snapshot_files::lock(&parent)?;
    let snapshots: std::collections::HashSet<PathBuf> = store.snapshots()?.iter().map(|s| snapshot_dir(dirs, &s.id)).collect();
    let mut removed = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&parent) {
        for e in entries.flatten() {
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if is_dir
                && !snapshots.contains(&e.path())
                && crate::snapshot_files::orphaned(&e.path())
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                removed.push(e.path().to_string_lossy().into_owned());
            }
        }
    }
    Ok(removed)
}

/// Whether ssh's (or sftp's) complaint says the server let go before the session began: too
/// many connections in their handshake at once (dropbear takes 5 from one address, OpenSSH
/// 10), so nothing ran.
fn session_never_began(diagnostics: &str) -> bool {
    ["kex_exchange_identification", "Connection closed by", "Connection reset by", "Connection refused"]
        .iter()
        .any(|m| diagnostics.contains(m))
}

/// A running sandbox whose SSH server keeps refusing sessions (killed in the guest, say):
/// said so, with the way around it, rather than as ssh's raw complaint.
fn ssh_unanswered(diagnostics: &str) -> Error {
    Error::Ssh(format!(
        "the guest's SSH server does not answer ({}); the sandbox runs on: use the agent (`--channel agent`), or restart the sandbox",
        diagnostics.lines().find(|l| session_never_began(l)).or(diagnostics.lines().last()).unwrap_or_default()
    ))
}

/// Keep a piece of a command's output for its result, within `opts.max_output`.
fn keep_output(kept: &mut Vec<u8>, piece: &[u8], opts: &RunOptions, stream: &'static str) -> Result<()> {
    if opts.discard_output {
        return Ok(());
    }
    if kept.len() + piece.len() > opts.max_output {
        return Err(Error::OutputLimit { stream, limit: opts.max_output });
    }
    kept.extend_from_slice(piece);
    Ok(())
}

/// Where a download to `dest` goes: through symbolic links there to what they name (as `cp`
/// writes; a dangling one's target is made), and refused where that is a device, a FIFO or a
/// socket, which the download's rename would replace with a regular file (`/dev/null` among
/// them), or a link that leads nowhere it can say (a loop).
fn download_destination(dest: PathBuf) -> Result<PathBuf> {
    let refused = |why: String| Err(Error::validation("local_path", why));
    let mut at = dest.clone();
    // As the kernel follows them: at most 40 links.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&at).ctx(|| format!("reading the link {}", at.display()))?;
                at = at.parent().map(|p| p.join(&target)).unwrap_or(target);
            }
            Ok(m) if !m.is_file() && !m.is_dir() => {
                return refused(format!("{} is not a regular file or a directory (a download writes one)", at.display()))
            }
            Ok(_) => return Ok(at),
            // Nothing there yet: made by the download.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(at),
            Err(e) => return Err(Error::Io { context: format!("looking at {}", at.display()), source: e }),
        }
    }
    refused(format!("{} is a symbolic link that leads through too many others (a loop?)", dest.display()))
}

/// A name for a download in progress, beside its destination: unique per download, so that
/// downloads from several sandboxes into one directory at once never share a file.
fn download_temp(parent: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    remove_dead_downloads(parent);
    parent.join(format!(".smolvm-download-{}-{n}", std::process::id()))
}

/// What a killed download (SIGKILL, a crash: nothing of it ran to clean up) left beside its
/// destination, reaped by the next download into that directory: ours, named for a process that
/// is gone, and untouched for 10 minutes (a pid is this host's: a directory shared with another
/// host, or with a container, may hold a live download whose pid means nothing here). A pid
/// taken again since by another process keeps it until that ends.
fn remove_dead_downloads(parent: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(".smolvm-download-"))
            .and_then(|r| r.split_once('-'))
            .and_then(|(p, _)| p.parse::<i32>().ok())
        else {
            continue;
        };
        let stale =
            |m: &std::fs::Metadata| m.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > Duration::from_secs(600));
        let ours_and_stale = e.metadata().is_ok_and(|m| m.uid() == nix::unistd::geteuid().as_raw() && stale(&m));
        let gone = || matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None), Err(nix::errno::Errno::ESRCH));
        if pid > 0 && ours_and_stale && gone() {
            let _ = std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
        }
    }
}

/// An SFTP upload's temporary name in the guest, taken out by an sftp of its own when the
/// upload's future is dropped unfinished. Waited for here (nothing can be awaited in a drop),
/// within a bound: on a thread of its own it was lost when the CLI exited right after Ctrl-C,
/// and the partial file stayed in the guest.
/// The guest's temporary names of SFTP uploads whose process is gone (killed outright, with
/// nothing of it left to remove its file), as (record, path); and a record of `tmp` for this
/// one, `<sandbox dir>/sftp-uploads/<pid>-<start>-<name>`, holding the guest path (best effort:
/// without it, a killed upload leaves its file as before).
fn sftp_leftovers(dir: &Path, tmp: &str) -> (Vec<(PathBuf, String)>, Option<PathBuf>) {
    let notes = dir.join("sftp-uploads");
    let mut stale = Vec::new();
    for e in std::fs::read_dir(&notes).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let mut parts = name.splitn(3, '-');
        let owner = match (parts.next().and_then(|p| p.parse().ok()), parts.next().and_then(|s| s.parse().ok())) {
            (Some(pid), Some(start)) => crate::store::ProcId { pid, start },
            _ => continue,
        };
        if !owner.alive() {
            if let Ok(path) = std::fs::read_to_string(e.path()) {
                stale.push((e.path(), path));
            }
        }
    }
    let me = crate::store::ProcId::of(std::process::id() as i32);
    let name = Path::new(tmp).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let note = me.and_then(|me| {
        let note = notes.join(format!("{}-{}-{name}", me.pid, me.start));
        std::fs::create_dir_all(&notes).and_then(|()| std::fs::write(&note, tmp)).ok().map(|()| note)
    });
    (stale, note)
}

/// An sftp's exit and what it said, as `wait_with_output` gives them, unless it falls quiet:
/// a transfer is bounded by its silence as the agent's are ([`TRANSFER_IDLE`]). Its SSH
/// keepalives find a dead connection, not a server that hangs (a guest file on a stuck mount,
/// a stopped sftp-server), so the bound watches what moves through the sftp process itself.
async fn sftp_output(mut child: tokio::process::Child) -> Result<std::process::Output> {
    use tokio::io::AsyncReadExt;
    let stderr = child.stderr.take();
    let said = tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_end(&mut buf).await;
        }
        buf
    });
    // Bytes it has read and written, pipes to its ssh included.
    let moved = |pid: Option<u32>| -> Option<u64> {
        let io = std::fs::read_to_string(format!("/proc/{}/io", pid?)).ok()?;
        Some(
            io.lines()
                .filter(|l| l.starts_with("rchar:") || l.starts_with("wchar:"))
                .filter_map(|l| l[6..].trim().parse::<u64>().ok())
                .sum(),
        )
    };
    let pid = child.id();
    // sftp leads a process group of its own (see `Sandbox::sftp`), its ssh in it: given up
    // (a timeout, or this future dropped by Ctrl-C), both go. Its ssh alone would wait for
    // good on a server that never closes the channel.
    let _group = pid.map(KillGroup);
    let (mut last, mut quiet_since) = (moved(pid), std::time::Instant::now());
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.ctx(|| "waiting for sftp".into())?,
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                let now = moved(pid);
                // (Where the counts cannot be read, there is no telling silence: no bound.)
                if now != last || now.is_none() {
                    (last, quiet_since) = (now, std::time::Instant::now());
                } else if quiet_since.elapsed() >= TRANSFER_IDLE {
                    return Err(Error::Timeout { operation: "sftp transfer".into(), seconds: TRANSFER_IDLE.as_secs_f64() });
                }
            }
        }
    };
    Ok(std::process::Output { status, stdout: Vec::new(), stderr: said.await.unwrap_or_default() })
}

/// SIGKILL to the process group led by this pid, when dropped. (Also after the leader has been
/// reaped: what it started may still run, and the group keeps its id while one member does.)
struct KillGroup(u32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.0 as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

struct SftpTemp(Option<(std::process::Command, String)>);

impl Drop for SftpTemp {
    fn drop(&mut self) {
        use std::io::Write;
        let Some((mut sftp, batch)) = self.0.take() else { return };
        let child =
            sftp.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn();
        let Ok(mut child) = child else { return };
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(batch.as_bytes());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The directories a download makes for its destination, taken out again (those still empty)
/// unless it succeeds: a download of a path the guest lacks left them on the host.
struct MadeDirs(Vec<PathBuf>);

impl MadeDirs {
    /// Those of `dir` and its ancestors that do not exist yet, deepest first.
    fn before(dir: &Path) -> MadeDirs {
        MadeDirs(dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).map(Path::to_path_buf).collect())
    }

    fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for MadeDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// A download's temporary file, removed however its future ends (an interrupted Python call
/// drops it unfinished); `stop` then also ends an extraction still running on its own thread.
struct DownloadTemp {
    path: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for DownloadTemp {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A directory a process made over a minute ago: not one whose record is on its way.
pub(crate) fn older_than_a_minute(path: &Path) -> bool {
    std::fs::metadata(path).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60))
}

impl Sandbox {
    /// Record a new sandbox (state `created`); nothing runs until `start`.
    pub fn create(config: VmConfig) -> Result<Sandbox> {
        Self::create_in(Dirs::from_env(), config, false)
    }

    /// A sandbox that lives only as long as the connection of the process that started it:
    /// if that process dies, the supervisor tears the VM down and removes every trace.
    pub fn create_ephemeral(config: VmConfig) -> Result<Sandbox> {
        Self::create_in(Dirs::from_env(), config, true)
    }

    pub fn create_in(dirs: Dirs, config: VmConfig, ephemeral: bool) -> Result<Sandbox> {
        Self::make(dirs, config, ephemeral, None)
    }

    /// `snapshot`: a restore's, which the record names; its image need not exist any more (the
    /// snapshot holds its disk whatever became of the recipe).
    fn make(dirs: Dirs, mut config: VmConfig, ephemeral: bool, snapshot: Option<&str>) -> Result<Sandbox> {
        // Taken from where this process runs: kept as given, a relative path would be taken
        // from wherever a later start or snapshot runs.
        for path in [&mut config.kernel_path, &mut config.initrd_path, &mut config.rootfs_path].into_iter().flatten() {
            if let Ok(absolute) = std::path::absolute(&*path) {
                *path = absolute;
            }
        }
        config.validate()?;
        if let Some(rootfs) = &config.rootfs_path {
            image::check_layers(rootfs, &dirs.data)?;
        }
        // An image that does not exist is said now, not at the start (after minutes of
        // building a kernel it would never boot).
        if let Some(name) = config.image.as_deref().filter(|n| snapshot.is_none() && *n != "default") {
            crate::recipe::load(&dirs, name)?;
        }
        Backend::resolve(config.backend.as_deref())?;
        // (Before the store: a data directory refused must not be made, database and all.)
        check_data_dir(&dirs)?;
        let id = config.vm_id.clone().unwrap_or_else(|| random_id("sbx"));
        let paths = SandboxPaths::new(&dirs, &id);
        let store = Store::open(&dirs.data)?;
        if let Some(old) = store.get(&id)? {
            // A dead ephemeral sandbox of the same name is reaped, not an obstacle.
            if reap(&store, &dirs, old, false)?.is_some() {
                return Err(Error::AlreadyExists(id));
            }
        }
        let owner = if ephemeral { ProcId::of(std::process::id() as i32) } else { None };
        store.insert_from(&id, &config, owner, snapshot)?;
        if let Err(e) = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&paths.dir) {
            let _ = store.remove(&id);
            return Err(Error::Io { context: format!("creating {}", paths.dir.display()), source: e });
        }
        let channel = Channel::parse(config.comm_channel.as_deref())?;
        Ok(Sandbox { id, dirs, paths, conn: Default::default(), channel })
    }

    /// Find an existing sandbox (`from_id`).
    pub async fn open(id: &str) -> Result<Sandbox> {
        Self::open_in(Dirs::from_env(), id).await
    }

    pub async fn open_in(dirs: Dirs, id: &str) -> Result<Sandbox> {
        let store = Store::open(&dirs.data)?;
        let rec = store.get(id)?.ok_or_else(|| Error::NotFound(id.to_string()))?;
        let rec = reap(&store, &dirs, rec, false)?.ok_or_else(|| Error::NotFound(id.to_string()))?;
        let paths = SandboxPaths::new(&dirs, id);
        let channel = Channel::parse(rec.config.comm_channel.as_deref())?;
        let sb = Sandbox { id: rec.id.clone(), dirs, paths, conn: Default::default(), channel };
        // One on its way down is found without a connection: its commands say it is stopping,
        // and start() waits, then boots it again.
        // (A supervisor that died since the record was read leaves the handle unconnected:
        // what is done with it next finds the sandbox failed, as a later open would.)
        // (One of another build is left unconnected too: stop and delete can still end it, and
        // what needs its connection says why there is none.)
        if rec.state.is_live() && !sb.going_down(&rec) {
            match sb.try_connect().await {
                Ok(conn) => sb.set_conn(conn),
                Err(Error::OtherBuild { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(sb)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The channel commands take (the sandbox's comm_channel, unless set for this handle).
    pub fn channel(&self) -> Channel {
        self.channel
    }

    /// Take another channel than the config's for this handle's commands and transfers.
    pub fn set_channel(&mut self, channel: Channel) {
        self.channel = channel;
    }

    pub fn paths(&self) -> &SandboxPaths {
        &self.paths
    }

    pub fn record(&self) -> Result<Record> {
        self.record_with(false)
    }

    /// `held`: this caller holds the sandbox's start lock (see `reap`).
    fn record_with(&self, held: bool) -> Result<Record> {
        let store = Store::open(&self.dirs.data)?;
        let rec = store.get(&self.id)?.ok_or_else(|| Error::NotFound(self.id.clone()))?;
        reap(&store, &self.dirs, rec, held)?.ok_or_else(|| Error::NotFound(self.id.clone()))
    }

    pub fn state(&self) -> Result<State> {
        Ok(self.record()?.state)
    }

    /// A request refused as come after its sandbox began to go down (`GONE_BEFORE`): said as
    /// for any sandbox not running, once its record has settled (stopped, or failed: a crash's
    /// supervisor records it a moment later).
    async fn down_before(&self) -> Error {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < deadline
            && Store::open(&self.dirs.data).and_then(|s| s.get(&self.id)).is_ok_and(|r| r.is_some_and(|r| r.state.is_live()))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.unreachable()
    }

    /// A request's stream closed by the supervisor (`ErrorKind::Closed`): refused as come after
    /// the sandbox began to go down, or cut off by its going.
    async fn closed(&self, message: &str, during: &str) -> Error {
        match message == smolvm_proto::GONE_BEFORE {
            true => self.down_before().await,
            false => self.went_away(during).await,
        }
    }

    /// Why a command or a transfer lost its sandbox (`during`: "while the command ran",
    /// "during the upload"): stopped, deleted, failed, as its record comes to say. Its
    /// supervisor hears of it at the same moment as the request does, and records it a few
    /// milliseconds later: the error waits for that (within 3 s), so that it can say which, and
    /// what a caller asks next (`info`, `start`) finds the sandbox as it now is, not `running`.
    async fn went_away(&self, during: &str) -> Error {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        // Read as it is, not reaped: reaping removes an ephemeral sandbox whose supervisor died,
        // which would then read as deleted.
        let raw = || Store::open(&self.dirs.data).and_then(|s| s.get(&self.id));
        let ephemeral = matches!(raw(), Ok(Some(r)) if r.ephemeral);
        let said = |what: &str| Error::Guest(format!("the sandbox {what} {during}"));
        loop {
            match raw() {
                Ok(Some(r)) if r.state == State::Running => {
                    if !r.supervisor.is_some_and(|p| p.alive()) {
                        // Recorded now (an error, or an ephemeral sandbox gone), not by the
                        // next command.
                        let _ = self.record();
                        return said("failed: its supervisor exited unexpectedly");
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return said("went away");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // (An ephemeral sandbox's record goes when it stops.)
                Ok(None) if ephemeral => return said("stopped"),
                Ok(None) => return said("was deleted"),
                // A delete stops the sandbox, then removes it, holding the start lock all the
                // while (a stop holds it too): until it lets go, this may yet be a delete.
                Ok(Some(r)) if r.state == State::Stopped && self.paths.start_lock_held() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(Some(r)) if r.state == State::Stopped => return said("stopped"),
                // Why, in its first line (the console's lines follow in `info`); a supervisor
                // found dead by another process first, as when this one finds it.
                Ok(Some(r)) if r.state == State::Error => {
                    let why = r.error.as_deref().unwrap_or_default();
                    let why = why.split("; last console lines").next().and_then(|w| w.lines().next()).unwrap_or_default().trim();
                    return match why {
                        "" => said("failed (`smolvm sandbox info` says why)"),
                        SUPERVISOR_GONE => said("failed: its supervisor exited unexpectedly"),
                        why => Error::Guest(format!("the sandbox failed {during}: {why}")),
                    };
                }
                _ => return said("went away"),
            }
        }
    }

    /// Boot the VM: build or find the image, start the supervisor, wait until the agent answers
    /// and the configured env vars are in place. Bounded by `boot_timeout`.
    ///
    /// A sandbox of a cached image (the default one, or a named one with a root disk at its
    /// first start) starts from a warm snapshot of that image booted once (cached with it)
    /// unless `SMOLVM_WARM=0` or `SMOLVM_VERBOSE_BOOT` asks for a real boot; if the warm start
    /// fails, it boots cold.
    ///
    /// A running sandbox is left as it is (this handle connects to it); a paused one is refused
    /// with `NotRunning`, since returning would tell the caller it can run commands.
    /// Whether `start` would find nothing to do: the sandbox runs, not on its way down, and
    /// this handle is connected to it. Asked without `&mut`, so that a caller sharing the
    /// handle (Python's) need not wait for the commands in flight to say so.
    pub fn is_up(&self) -> bool {
        self.open_conn().is_some() && self.record().is_ok_and(|rec| rec.state == State::Running && !self.going_down(&rec))
    }

    pub async fn start(&mut self, boot_timeout: Duration, progress: Progress<'_>) -> Result<()> {
        crate::config::check_boot_timeout(boot_timeout)?;
        crate::config::check_supervisor_settings()?;
        let lock = self.paths.wait_start_lock().await?;
        tracing::debug!("phase: start lock held");
        let mut rec = match self.record_with(true) {
            Ok(rec) => rec,
            Err(e) => {
                // Deleted meanwhile (another process): the lock must not leave a directory.
                if matches!(e, Error::NotFound(_)) {
                    if let Ok(store) = Store::open(&self.dirs.data) {
                        self.paths.forget_lock(&store, &self.id);
                    }
                }
                return Err(e);
            }
        };
        if self.stopping(&rec).await? {
            // Connecting now would reach a sandbox about to stop: start it again instead.
            rec = self.record_with(true)?;
        }
        // A paused one runs already, frozen: a start that returned would say it can run commands.
        if rec.state == State::Paused {
            return Err(Error::NotRunning { id: self.id.clone(), state: "paused".into() });
        }
        if rec.state.is_live() {
            // A closed connection is a previous supervisor's (another process restarted it).
            if self.open_conn().is_some() {
                return Ok(());
            }
            match self.connect_supervisor().await {
                Ok(c) => {
                    self.set_conn(Some(c));
                    return Ok(());
                }
                // Its supervisor died since the record was read: found so by reading it again,
                // and booted again like any sandbox that is not running.
                Err(e) => {
                    rec = self.record_with(true)?;
                    if rec.state.is_live() {
                        return Err(e);
                    }
                }
            }
        }
        // (One running is connected to above; one to boot needs its own settings.)
        rec.usable()?;
        // A sandbox that has booted stands on its own disk overlay and its own link to the
        // overlay's base (see `image::overlay`): its named image need not be in the cache, nor
        // built again after `image rm`.
        // Its host directories may have gone since it was made: said as at creation, not by
        // QEMU failing the boot (which left it in `error`).
        crate::config::validate_mounts(&rec.config.workspace_mounts).map_err(|e| match e {
            Error::Validation { field, message } if message.contains("is not an existing directory") => Error::Validation {
                field,
                message: format!("{message}; this sandbox was made with it (delete it, or make the directory again)"),
            },
            e => e,
        })?;
        mounts_keep_the_ssh_key_out(&self.dirs, &rec.config.workspace_mounts)?;
        image::drop_unfinished_warm_disk(&self.paths.overlay);
        let mut config = rec.config.clone();
        let base = image::overlay_base(&self.paths.overlay);
        if config.image.as_deref().is_some_and(|i| i != "default") && self.paths.overlay.exists() && base.exists() {
            config.image = None;
            config.rootfs_path = Some(base);
        }
        tracing::debug!("phase: record read");
        let image = resolve_image(&config, &self.dirs, progress).await?;
        tracing::debug!("phase: image resolved");
        // Said before it boots: over SSH every command and transfer would fail.
        if self.channel == Channel::Ssh && image.rootfs.is_none() {
            return Err(Error::validation(
                "comm_channel",
                "ssh needs an image with an SSH server, such as debian-ssh or alpine-ssh; this sandbox's image boots from an initramfs and has none",
            ));
        }
        if let Some(base) = &image.rootfs {
            image::check_disk_size(base, &self.paths.overlay, rec.config.disk_size_mib)?;
        }
        let accel = crate::vmm::choose_accel().map_err(Error::Host)?;
        let verbose_boot = env_flag("SMOLVM_VERBOSE_BOOT", false);
        let vsock = crate::config::agent_transport()? == crate::config::Transport::Vsock;
        if vsock {
            let agent = crate::vmm::vsock::port_path(&self.paths.vsock, smolvm_proto::AGENT_VSOCK_PORT);
            check_socket_paths(&self.dirs, &[&self.paths.vhost_vsock, &agent])?;
        }
        let q35 = crate::vmm::qemu::choose_machine(&self.dirs, Some(&image.kernel))? == crate::vmm::qemu::Machine::Q35;
        let mut spec = BootSpec {
            image,
            accel,
            boot_timeout_ms: boot_timeout.as_millis() as u64,
            verbose_boot,
            restore: None,
            ram: None,
            vsock,
            q35,
            unmounted_shares: false,
            no_balloon: false,
            warm_disk: None,
        };
        // No program to supervise with: said once, not as a warm start's failure first.
        smolvm_binary()?;
        // Warm templates are saved microvm VMs, and a VM with a vhost-user device cannot be
        // saved at all.
        let mut no_template = None;
        // (`config`, not the record's: a root disk's sandbox that has booted before starts from
        // its own overlay, which a template knows nothing of, and boots cold.)
        let first_disk = spec.image.rootfs.is_none() || !self.paths.overlay.exists();
        if crate::warm::eligible(&config) && first_disk && !verbose_boot && !vsock && !q35 && env_flag("SMOLVM_WARM", true) {
            match crate::warm::template(&self.dirs, &config, &spec, progress).await {
                Ok(state) => {
                    let picked = crate::warm::picked(&state);
                    spec.restore = Some(RestoreSpec { state: state.clone(), resume: true, no_saved_env: true });
                    spec.ram = Some(crate::vmm::qemu::RamFile { path: crate::warm::ram_file(&state), share: false });
                    spec.warm_disk = spec.image.rootfs.as_ref().map(|_| crate::warm::disk_file(&state));
                    let launched = self.launch_vm(&spec, boot_timeout, lock.as_ref()).await;
                    // The template's disk, copied for the restore, is no disk to boot from
                    // cold, nor to start again from: the cold boot, or the next start, makes a
                    // fresh overlay. (It was made by this start: a disk's sandbox starts warm
                    // only without an overlay, and the start lock is held.)
                    if launched.is_err() && spec.warm_disk.take().is_some() {
                        image::remove_warm_disk(&self.paths.overlay);
                    }
                    match launched {
                        // Its SSH server's failure is the image's, not the template's: a cold
                        // boot would fail alike.
                        Ok(()) => return self.serve_ssh(&spec).await,
                        // The user's settings, not the template: a cold boot would fail alike.
                        // (Or a supervisor binary of another build: a cold boot's would be too.)
                        Err(e @ (Error::Validation { .. } | Error::Reported { code: "validation", .. })) => return Err(e),
                        Err(e @ Error::OtherBinary { .. }) => return Err(e),
                        Err(e) => {
                            tracing::warn!("warm start failed, booting cold: {}", e.full_message());
                            // Only a restore that went wrong (it failed with the console's
                            // lines, or never ended) blames the template, which every later
                            // start shares. A supervisor or VMM killed under the start, or a
                            // host that could not record or network it, says nothing about it.
                            if matches!(e, Error::Boot { .. } | Error::Timeout { .. }) {
                                // (Off the runtime: it waits for the image lock, which a
                                // template's cold boot in another process holds.)
                                let (dirs, state) = (self.dirs.clone(), state.clone());
                                let _ = tokio::task::spawn_blocking(move || crate::warm::discard(&dirs, &state, picked)).await;
                            }
                            spec.restore = None;
                            spec.ram = None;
                        }
                    }
                }
                // (A supervisor binary of another build fails a cold boot alike.)
                Err(e @ Error::OtherBinary { .. }) => return Err(e),
                // Said once the cold boot has worked: where it fails too (a network this user
                // cannot make), its own error says the same, and the warning said it twice.
                Err(e) => no_template = Some(e),
            }
        }
        let launched = self.launch(&spec, boot_timeout, lock.as_ref()).await;
        if let (Ok(()), Some(e)) = (&launched, no_template) {
            tracing::warn!("no warm snapshot, booted cold: {}", e.full_message());
        }
        launched
    }

    /// Start the supervisor with `spec`, connect to it, and set up the image's SSH server. The
    /// start's `lock` is the supervisor's too until it has reported (see `spawn_supervisor`).
    pub(crate) async fn launch(&mut self, spec: &BootSpec, boot_timeout: Duration, lock: Option<&StartLock>) -> Result<()> {
        self.launch_vm(spec, boot_timeout, lock).await?;
        self.serve_ssh(spec).await
    }

    /// The VM's part of `launch`: what a warm template's boot does (its clones set up their
    /// own SSH server and host key), and what a warm start's fallback to a cold boot judges.
    pub(crate) async fn launch_vm(&mut self, spec: &BootSpec, boot_timeout: Duration, lock: Option<&StartLock>) -> Result<()> {
        tracing::debug!("phase: starting the supervisor");
        let status = self.spawn_supervisor(spec, boot_timeout, lock).await?;
        tracing::debug!("phase: supervisor reported");
        if !status.ok {
            let message = status.message.unwrap_or_default();
            return Err(match status.code.as_deref() {
                Some("timeout") | Some("boot") | Some("guest") | Some("host") if status.console.is_some() => {
                    Error::Boot { id: self.id.clone(), reason: message, console: status.console.unwrap_or_default() }
                }
                code => {
                    let code = match code {
                        Some("validation") => "validation",
                        Some("image") => "image",
                        Some("not_found") => "not_found",
                        Some("timeout") => "timeout",
                        Some("network") => "network",
                        _ => "host",
                    };
                    Error::Reported { code, message }
                }
            });
        }
        match Conn::connect(&self.paths.ctl, &self.id).await {
            Ok(conn) => self.set_conn(Some(conn)),
            Err(e) => {
                // Booted, but not to be used from here: what was started is stopped again (by
                // signal, for another build's supervisor), not left running unreachable. (Not
                // over a connection the handle kept from before: that one is not this boot's.)
                self.set_conn(None);
                if let Err(stop) = self.stop_with(Duration::from_secs(1), true).await {
                    tracing::warn!("stopping {} after its failed connection: {}", self.id, stop.full_message());
                }
                return Err(match e {
                    // The binary that supervises sandboxes is another build than this library.
                    Error::OtherBuild { theirs, .. } => {
                        Error::OtherBinary { path: smolvm_binary().map(|p| p.display().to_string()).unwrap_or_default(), theirs }
                    }
                    e => e,
                });
            }
        }
        Ok(())
    }

    /// The SSH part of `launch`, once the VM runs.
    async fn serve_ssh(&mut self, spec: &BootSpec) -> Result<()> {
        let running = spec.restore.as_ref().is_none_or(|r| r.resume);
        if spec.image.rootfs.is_some() && running {
            // Images with a root disk may carry an SSH server: bring it up, pinned. A sandbox
            // whose commands go over SSH needs it; any other still runs over the agent.
            // (A root disk without a server is set up without error: an error here, for
            // a sandbox whose commands go over SSH.)
            let setup = self.setup_ssh().await.and_then(|()| match self.channel == Channel::Ssh && !self.paths.known_hosts.exists() {
                true => Err(self.no_ssh_server()),
                false => Ok(()),
            });
            if let Err(e) = setup {
                if self.channel == Channel::Ssh {
                    // (This start holds the start lock: a plain stop would wait for it.)
                    let _ = self.stop_with(Duration::from_secs(1), true).await;
                    return Err(e);
                }
                tracing::warn!("SSH could not be set up in {}; the agent serves it: {}", self.id, e.full_message());
            }
        }
        Ok(())
    }

    /// Install the authorized keys, start the image's SSH server, pin its host key and expose
    /// its port on the host's loopback. Images without a server are left alone.
    async fn setup_ssh(&self) -> Result<()> {
        let dirs = self.dirs.clone();
        let (_, mut keys) =
            tokio::task::spawn_blocking(move || crate::ssh::user_key(&dirs)).await.map_err(|e| Error::Host(e.to_string()))??;
        let record = self.record()?;
        if let Some(extra) = &record.config.ssh_public_key {
            keys.push('\n');
            keys.push_str(extra.trim());
        }
        // This sandbox, as against an earlier one of the same name or a snapshot's source.
        let owner = format!("{} {}", self.id, record.created_at);
        let opts = RunOptions {
            shell: Shell::Raw,
            timeout: Duration::from_secs(60),
            env: [("SMOLVM_SSH_KEYS".to_string(), keys), ("SMOLVM_SSH_OWNER".to_string(), owner)].into(),
            ..Default::default()
        };
        let r = self.run_agent(crate::ssh::SETUP_SCRIPT, &opts, None, None, |_| {}).await?;
        let known_hosts = &self.paths.known_hosts;
        match r.exit_code {
            0 => {
                let line = crate::ssh::known_hosts_line(&self.ssh_alias(), &r.stdout)?;
                std::fs::write(known_hosts, line).ctx(|| format!("writing {}", known_hosts.display()))?;
                self.expose_local(22, None).await?;
                Ok(())
            }
            3 => {
                let _ = std::fs::remove_file(known_hosts);
                Ok(())
            }
            code => Err(Error::Guest(format!("starting the SSH server failed (exit {code}): {}", r.stderr.trim()))),
        }
    }

    fn ssh_alias(&self) -> String {
        format!("smolvm-{}", self.id)
    }

    /// How to reach this sandbox over SSH; an error says why it cannot be.
    pub fn ssh_endpoint(&self) -> Result<crate::ssh::Endpoint> {
        let rec = self.record()?;
        // A paused guest answers nothing: ssh would wait out its own timeouts, and a clone
        // restored paused has no pinned key yet either.
        if rec.state != State::Running {
            return Err(Error::NotRunning { id: self.id.clone(), state: rec.state.to_string() });
        }
        let known_hosts = self.paths.known_hosts.clone();
        let port = self.ports()?.into_iter().find(|(g, _)| *g == 22).map(|(_, h)| h);
        match port {
            Some(port) if known_hosts.exists() => {
                let (key, _) = crate::ssh::user_key(&self.dirs)?;
                crate::ssh::Endpoint { port, key, known_hosts, alias: self.ssh_alias() }.check()
            }
            _ => Err(self.no_ssh_server()),
        }
    }

    fn no_ssh_server(&self) -> Error {
        Error::Ssh(format!(
            "VM '{0}' has no SSH server (its image has none; use an SSH image such as --image debian-ssh or alpine-ssh, or the agent's shell: smolvm sandbox shell {0})",
            self.id
        ))
    }

    /// Wait until an SSH login succeeds (a real round trip, not just an open port).
    pub async fn wait_for_ssh(&self, timeout: Duration) -> Result<()> {
        crate::config::check_wait(timeout, "timeout")?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::new();
        loop {
            let ep = self.ssh_endpoint()?;
            let mut cmd = tokio::process::Command::from(ep.ssh(Some("true"), false));
            cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
            match tokio::time::timeout_at(deadline, cmd.output()).await {
                Ok(Ok(out)) if out.status.success() => return Ok(()),
                Ok(Ok(out)) => {
                    last = String::from_utf8_lossy(&out.stderr).trim().to_string();
                    if let Some(e) = crate::ssh::host_key_failure(&last) {
                        return Err(e);
                    }
                }
                Ok(Err(e)) => return Err(Error::Host(format!("running ssh (openssh-client): {e}"))),
                Err(_) => break,
            }
            if tokio::time::Instant::now() + Duration::from_millis(100) >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::debug!("ssh not ready: {last}");
        Err(Error::Timeout { operation: "wait_for_ssh".into(), seconds: timeout.as_secs_f64() })
    }

    /// `run` over SSH: the same shell, timeout and result as over the agent.
    async fn run_ssh(
        &self,
        command: &str,
        opts: &RunOptions,
        input: Option<Input>,
        mut on_output: impl FnMut(Output<'_>),
    ) -> Result<CommandResult> {
        use tokio::io::AsyncReadExt;
        if !opts.env.is_empty() {
            return Err(Error::validation(
                "env",
                "per-command variables need the agent channel (comm_channel=agent); set_env_vars works on both",
            ));
        }
        let ep = self.ssh_endpoint()?;
        let secs = opts.timeout.as_secs_f64().ceil() as u64;
        let remote = crate::ssh::remote_command(command, opts.shell == Shell::Login, secs, opts.cwd.as_deref());
        // ssh's own messages go to a file of their own, so that they are never taken for the
        // command's (nor streamed as its stderr).
        let log = self.paths.dir.join(format!("ssh-{}.log", random_id("run")));
        let _remove_log = RemoveOnDrop(log.clone());
        let timeout_err = || Error::Timeout { operation: "run".into(), seconds: opts.timeout.as_secs_f64() };
        let started = tokio::time::Instant::now();
        let deadline = started + if opts.timeout.is_zero() { FOREVER } else { opts.timeout + Duration::from_secs(5) };
        let mut input = input;
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            let _ = std::fs::remove_file(&log);
            let mut ssh = ep.ssh_logging(Some(&remote), false, Some(&log));
            // A caller killed outright (nothing of it runs to drop the child) takes its ssh along,
            // which closes the session.
            crate::net::die_with_this_thread(&mut ssh);
            let mut cmd = tokio::process::Command::from(ssh);
            let stdin = if input.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() };
            cmd.stdin(stdin).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).kill_on_drop(true);
            let mut child = cmd.spawn().map_err(|e| Error::Host(format!("running ssh (openssh-client): {e}")))?;
            // ssh's pipe is the window here; the copy ends with the command (its pipe closes).
            let feeding = match (child.stdin.take(), input.take()) {
                (Some(mut pipe), Some(mut input)) => Some(Stopping(tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut input, &mut pipe).await;
                }))),
                _ => None,
            };
            let fed = feeding.is_some();
            let (mut out, mut err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            let mut any_output = false;
            let mut keep = |to: &mut Vec<u8>, d: &[u8], stream: &'static str| {
                any_output = true;
                keep_output(to, d, opts, stream)
            };
            let mut session = crate::ssh::SessionStderr::default();
            let (mut out_open, mut err_open) = (true, true);
            let (mut b1, mut b2) = (vec![0u8; 65536], vec![0u8; 65536]);
            while out_open || err_open {
                tokio::select! {
                    n = out.read(&mut b1), if out_open => match n {
                        Ok(0) | Err(_) => out_open = false,
                        Ok(n) => {
                            on_output(Output::Stdout(&b1[..n]));
                            if let Err(e) = keep(&mut stdout, &b1[..n], "stdout") {
                                let _ = child.kill().await;
                                return Err(e);
                            }
                        }
                    },
                    n = err.read(&mut b2), if err_open => match n {
                        Ok(0) | Err(_) => err_open = false,
                        Ok(n) => {
                            let theirs = session.take(&b2[..n]);
                            if !theirs.is_empty() {
                                on_output(Output::Stderr(&theirs));
                                if let Err(e) = keep(&mut stderr, &theirs, "stderr") {
                                    let _ = child.kill().await;
                                    return Err(e);
                                }
                            }
                        }
                    },
                    _ = tokio::time::sleep_until(deadline) => {
                        let _ = child.kill().await;
                        return Err(timeout_err());
                    }
                }
            }
            let (server_closed, rest) = session.finish();
            if !rest.is_empty() {
                on_output(Output::Stderr(&rest));
                if let Err(e) = keep(&mut stderr, &rest, "stderr") {
                    let _ = child.kill().await;
                    return Err(e);
                }
            }
            let status =
                tokio::time::timeout_at(deadline, child.wait()).await.map_err(|_| timeout_err())?.ctx(|| "waiting for ssh".into())?;
            let code = status.code().unwrap_or(255);
            // coreutils' timeout exits 124 (137 after -k); busybox's kills the command, whose
            // shell then exits 143 (or, killed itself, makes the server report a signal: 255).
            if matches!(code, 124 | 137 | 143 | 255) && !opts.timeout.is_zero() && started.elapsed() >= opts.timeout {
                return Err(timeout_err());
            }
            if code == 255 {
                let diagnostics = std::fs::read_to_string(&log).unwrap_or_default();
                let diagnostics = diagnostics.trim();
                // Nothing ran: another try is safe, where no input was taken.
                if session_never_began(diagnostics) && !any_output && !fed && attempt < 20 {
                    let pause = Duration::from_millis(20 * attempt.min(10));
                    if tokio::time::Instant::now() + pause < deadline {
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                }
                // ssh's own failure, not the command's exit code.
                if let Some(e) = crate::ssh::host_key_failure(diagnostics) {
                    return Err(e);
                }
                if session_never_began(diagnostics) && self.still_runs() {
                    return Err(ssh_unanswered(diagnostics));
                }
                if !diagnostics.is_empty() {
                    return Err(Error::Ssh(diagnostics.to_string()));
                }
                // The server went away under the command (ssh says so on the session's
                // stderr, held back from the command's): with its guest, most likely, as over
                // the agent. Or the guest's SSH server alone (killed in there): said so.
                if server_closed {
                    let e = self.went_away("while the command ran").await;
                    if self.still_runs() {
                        return Err(Error::Ssh(
                            "the SSH session closed while the command ran, and the sandbox runs on: its SSH server (or the session's shell) went away in the guest".into(),
                        ));
                    }
                    return Err(e);
                }
            }
            drop(feeding);
            let stderr = String::from_utf8_lossy(&stderr).into_owned();
            return Ok(CommandResult { exit_code: code, stdout: String::from_utf8_lossy(&stdout).into_owned(), stderr });
        }
    }

    /// Whether the sandbox is recorded running, its supervisor alive.
    fn still_runs(&self) -> bool {
        self.record().is_ok_and(|r| r.state == State::Running && r.supervisor.is_some_and(|p| p.alive()))
    }

    /// Run an sftp batch; its error output, cleaned up, on failure.
    async fn sftp(&self, batch: String) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let ep = self.ssh_endpoint()?;
        let mut attempt = 0u32;
        let (out, never_began) = loop {
            attempt += 1;
            let mut sftp = ep.sftp();
            // (A caller killed outright takes its transfer along: it must not land after it.)
            crate::net::die_with_this_thread(&mut sftp);
            std::os::unix::process::CommandExt::process_group(&mut sftp, 0);
            let mut cmd = tokio::process::Command::from(sftp);
            cmd.stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true);
            let mut child = cmd.spawn().map_err(|e| Error::Host(format!("running sftp (openssh-client): {e}")))?;
            if let Some(mut stdin) = child.stdin.take() {
                // (Refused when sftp ended first, before its session: its status says why.)
                let _ = stdin.write_all(batch.as_bytes()).await;
            }
            let out = sftp_output(child).await?;
            // As for commands: transfers at once beyond what the server takes in their
            // handshake were refused, where nothing of the batch had run.
            let said = String::from_utf8_lossy(&out.stderr);
            let never_began = !out.status.success() && !said.contains("Connected to ") && session_never_began(&said);
            if never_began && attempt < 20 {
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt.min(10)))).await;
                continue;
            }
            break (out, never_began);
        };
        if out.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&out.stderr);
        if let Some(e) = crate::ssh::host_key_failure(&said) {
            return Err(e);
        }
        if never_began && self.still_runs() {
            return Err(ssh_unanswered(said.trim()));
        }
        let lines: Vec<&str> = said.lines().filter(|l| !l.starts_with("sftp>") && !l.starts_with("Connected to ")).collect();
        // The parents' `-mkdir`s fail where they exist, which is no error: said only when
        // nothing else is.
        let others: Vec<&str> = lines.iter().copied().filter(|l| !l.starts_with("remote mkdir")).collect();
        let msg = if others.is_empty() { lines.join("; ") } else { others.join("; ") };
        // As the agent says it.
        if let Some(path) = msg.strip_prefix("File \"").and_then(|m| m.strip_suffix("\" not found.")) {
            return Err(Error::validation("guest_path", format!("reading {path}: No such file or directory (os error 2)")));
        }
        if msg.contains("not found") || msg.contains("No such file") {
            return Err(Error::validation("guest_path", msg));
        }
        Err(Error::Ssh(format!("sftp failed: {msg}")))
    }

    /// Freeze the VM's CPUs; processes keep their state. Commands wait for `resume`.
    pub async fn pause(&self) -> Result<()> {
        self.control(Request::Pause, "pause").await
    }

    pub async fn resume(&self) -> Result<()> {
        self.control(Request::Resume, "resume").await?;
        // A sandbox restored paused from a snapshot runs its guest for the first time now: its
        // SSH server is set up as at a boot (its own host key, pinned; its port exposed). One
        // that has done so keeps its pinned key through later pauses; one never restored from
        // a snapshot was set up at its boot.
        let rec = self.record()?;
        if rec.snapshot.is_some() && rec.config.has_root_disk() && !self.paths.known_hosts.exists() {
            if let Err(e) = self.setup_ssh().await {
                tracing::warn!("SSH could not be set up in {}; the agent serves it: {}", self.id, e.full_message());
            }
        }
        Ok(())
    }

    async fn control(&self, req: Request, what: &str) -> Result<()> {
        // A snapshot writes all of guest RAM (and copies the disk): the supervisor's bound on it,
        // and time for what waits before it; the rest is quick.
        let reply = match req {
            Request::Snapshot { .. } => self.call_control(&req, what, crate::supervisor::SNAPSHOT_BOUND + Duration::from_secs(60)).await?,
            _ => self.call_control_timed(&req, what).await?,
        };
        match reply {
            Reply::Ok => Ok(()),
            Reply::Error { kind: ErrorKind::Invalid, message } => Err(Error::validation("snapshot_type", message)),
            Reply::Error { kind: ErrorKind::Failed, message } => Err(control_failure(what, &message)),
            // What this host's set-up cannot do for this sandbox (a q35 machine, a vsock device):
            // the supervisor's refusal, not the guest's.
            Reply::Error { kind: ErrorKind::Unsupported, message } => Err(Error::Host(message)),
            other => Err(self.unexpected(what, other)),
        }
    }

    /// Save this sandbox. `full`: memory, devices and disk, so a sandbox started from it goes on
    /// where this one was; `disk`: the root disk only. `diff` is not offered by the QEMU backend.
    pub async fn snapshot(&self, snapshot_id: Option<&str>, snapshot_type: &str) -> Result<SnapshotInfo> {
        let kind = match snapshot_type {
            "full" => SnapshotKind::Full,
            "disk" => SnapshotKind::Disk,
            "diff" => {
                return Err(Error::validation(
                    "snapshot_type",
                    "'diff' snapshots are not supported by the QEMU backend (allowed: full, disk)",
                ))
            }
            other => return Err(Error::validation("snapshot_type", format!("{other:?} is not a snapshot type (allowed: full, disk)"))),
        };
        let id = match snapshot_id {
            Some(id) => {
                crate::config::validate_vm_id(id).map_err(|_| {
                    Error::validation("snapshot_id", format!("{id:?} is not allowed: use 1-64 characters of a-z, 0-9, '_' and '-', starting and ending with a letter or digit"))
                })?;
                id.to_string()
            }
            None => random_id("snap"),
        };
        if Store::open(&self.dirs.data)?.get_snapshot(&id)?.is_some() {
            return Err(Error::validation("snapshot_id", format!("snapshot '{id}' already exists")));
        }
        let rec = self.record()?;
        rec.usable()?;
        if !rec.config.workspace_mounts.is_empty() && !rec.config.has_root_disk() {
            // Neither kind can be had: say so, not "use the other one" each way round.
            return Err(Error::validation(
                "snapshot_type",
                "this sandbox cannot be saved: with mounts only a 'disk' snapshot can be taken (QEMU cannot save a mounted 9p share's state), and it has no root disk; create the sandbox without mounts, or from an image with a root disk (e.g. debian-ssh)",
            ));
        }
        if kind == SnapshotKind::Full && !rec.config.workspace_mounts.is_empty() {
            return Err(Error::validation(
                "snapshot_type",
                "a sandbox with mounts can only be saved as 'disk' (QEMU cannot save a mounted 9p share's state)",
            ));
        }
        if kind == SnapshotKind::Disk && rec.state == State::Running {
            // What the guest wrote may still be in its page cache, which a disk snapshot does
            // not contain: flush it to the disk first.
            let opts = RunOptions { timeout: Duration::from_secs(60), shell: Shell::Raw, ..Default::default() };
            let r = self.run("sync", &opts).await?;
            if !r.ok() {
                return Err(Error::Guest(format!("flushing the guest's writes before the disk snapshot: {}", r.stderr.trim())));
            }
        }
        let dir = snapshot_dir(&self.dirs, &id);
        crate::snapshot_files::claim(&dir, &id)?;
        // Until its record is in, a failed save or one given up (this future dropped: Ctrl-C,
        // KeyboardInterrupt) takes its files with it.
        let mut making = crate::snapshot_files::Making::new(&dir);
        let req = Request::Snapshot { dir: dir.to_string_lossy().into_owned(), kind };
        self.control(req, "snapshot").await?;
        making.detach().await?;
        // The variables the guest has now are the snapshot's. The record follows every change
        // made through smolvm, so a guest that does not answer soon (busy, or saved wedged:
        // the save does not wait for it) keeps the record's instead of holding this up.
        let mut config = rec.config.clone();
        config.vm_id = None;
        if let Ok(Ok(vars)) = tokio::time::timeout(SNAPSHOT_ENV_BOUND, self.list_env_vars()).await {
            config.env_vars = vars;
        }
        Store::open(&self.dirs.data)?.insert_snapshot(&id, &self.id, snapshot_type, &config)?;
        making.made();
        Ok(SnapshotInfo { snapshot_id: id, vm_id: self.id.clone(), snapshot_type: snapshot_type.to_string(), path: dir })
    }

    /// Start a new sandbox from a snapshot. `name` defaults to a fresh id; `env_vars`, when
    /// given, replace the snapshot's variables; `resume: false` leaves it paused.
    pub async fn from_snapshot_in(dirs: Dirs, snapshot_id: &str, opts: RestoreOptions) -> Result<Sandbox> {
        Self::from_snapshot_reporting(dirs, snapshot_id, opts, &|_| {}).await
    }

    /// `from_snapshot_in`, telling `made` the new sandbox's id once its record is made: a
    /// caller that gives the restore up (Ctrl-C drops this future, whose boot goes on in its
    /// supervisor) deletes that sandbox, and only that one, as an interrupted create does.
    pub async fn from_snapshot_reporting(
        dirs: Dirs,
        snapshot_id: &str,
        opts: RestoreOptions,
        made: &(dyn Fn(&str) + Sync),
    ) -> Result<Sandbox> {
        crate::config::check_boot_timeout(opts.boot_timeout)?;
        crate::config::check_supervisor_settings()?;
        let snap = Store::open(&dirs.data)?.get_snapshot(snapshot_id)?.ok_or_else(|| Error::SnapshotNotFound(snapshot_id.to_string()))?;
        snap.usable()?;
        let dir = snapshot_dir(&dirs, snapshot_id);
        let image: crate::image::BootImage = match std::fs::read(dir.join("image.json")).ok().and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(image) => image,
            // Deleted meanwhile (the record goes first, then the files).
            None if Store::open(&dirs.data)?.get_snapshot(snapshot_id)?.is_none() => {
                return Err(Error::SnapshotNotFound(snapshot_id.to_string()))
            }
            None => return Err(Error::Host(format!("snapshot '{snapshot_id}' is damaged: {} has no image.json", dir.display()))),
        };
        crate::snapshot_files::check(snapshot_id, &image)?;
        let mut config = snap.config.clone();
        config.vm_id = opts.name.clone();
        // Files the source named itself now live in the snapshot (the originals may be gone).
        if config.kernel_path.is_some() {
            config.kernel_path = Some(image.kernel.clone());
        }
        if config.initrd_path.is_some() {
            config.initrd_path = image.initrd.clone();
        }
        if config.rootfs_path.is_some() {
            config.rootfs_path = image.rootfs.clone();
        }
        if let Some(env) = &opts.env_vars {
            config.env_vars = env.clone();
        }
        if let Some(ports) = &opts.port_forwards {
            config.port_forwards = ports.clone();
        }
        // Saved with the VM, the devices cannot change; 9p devices cannot be saved at all.
        if snap.kind == "full" && (opts.mounts.as_ref().is_some_and(|m| !m.is_empty()) || opts.writable_mounts == Some(true)) {
            return Err(Error::validation(
                "mounts",
                format!(
                    "snapshot '{snapshot_id}' is a full snapshot, which restores without mounts (give them to a 'disk' snapshot's restore)"
                ),
            ));
        }
        if let Some(mounts) = &opts.mounts {
            config.workspace_mounts = mounts.clone();
            // New directories are read-only unless asked, whatever the old ones were.
            config.writable_mounts = opts.writable_mounts.unwrap_or(false);
        } else if let Some(writable) = opts.writable_mounts {
            config.writable_mounts = writable;
        }
        // (Checked here as at a start, which a restore does not go through.)
        mounts_keep_the_ssh_key_out(&dirs, &config.workspace_mounts)?;
        // Fails if the snapshot was deleted since it was read; from here on a delete refuses.
        let mut sb = Sandbox::make(dirs.clone(), config, false, Some(snapshot_id)).map_err(|e| match e {
            // The snapshot's own host directories, gone since: say how to do without them.
            Error::Validation { field: "mounts", message } if opts.mounts.is_none() => Error::Validation {
                field: "mounts",
                message: format!("{message}; the snapshot's mounts can be replaced when restoring (--mount, --no-mounts; Python mounts=)"),
            },
            e => e,
        })?;
        made(&sb.id);
        let result = async {
            let accel = match snap.kind == "full" {
                true => restore_accel(&dirs, &dir, snapshot_id)?,
                false => crate::vmm::choose_accel().map_err(Error::Host)?,
            };
            let restore = (snap.kind == "full").then(|| RestoreSpec { state: dir.join("state"), resume: opts.resume, no_saved_env: false });
            let spec = BootSpec {
                image,
                accel,
                boot_timeout_ms: opts.boot_timeout.as_millis() as u64,
                verbose_boot: false,
                restore,
                ram: None,
                // A saved VM loads only into the same machine and devices it was saved from.
                vsock: false,
                q35: false,
                unmounted_shares: false,
                no_balloon: snap.kind == "full" && !dir.join(crate::supervisor::BALLOON_MARK).exists(),
                warm_disk: None,
            };
            // Like any start: a `start` or `delete` of this name meanwhile waits for it.
            let lock = sb.paths.wait_start_lock().await?;
            sb.launch(&spec, opts.boot_timeout, lock.as_ref()).await?;
            // A disk snapshot's sandbox boots; asked not to run on, it is paused once up.
            if spec.restore.is_none() && !opts.resume {
                sb.pause().await?;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(sb),
            Err(e) => {
                let _ = sb.delete().await;
                Err(e)
            }
        }
    }

    /// The supervisor gets a copy of the start's lock (as fd [`START_LOCK_FD`]) and keeps it
    /// until it has reported how its boot went. A starter killed meanwhile so leaves the lock
    /// held: another start waits for that boot instead of booting the sandbox a second time
    /// beside it (whose TAP it would find taken, and whose supervisor nothing would then track).
    async fn spawn_supervisor(&self, spec: &BootSpec, boot_timeout: Duration, lock: Option<&StartLock>) -> Result<StartStatus> {
        let bin = smolvm_binary()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.paths.log)
            .ctx(|| format!("opening {}", self.paths.log.display()))?;
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("__supervise")
            .arg(&self.id)
            // It lives as long as the sandbox: it keeps only what it reads of the caller's
            // environment, not the secrets that the caller took from it (`-e KEY`) or holds.
            .env_clear()
            .envs(std::env::vars_os().filter(|(name, _)| supervisor_keeps(name)))
            .env("SMOLVM_DATA_DIR", &self.dirs.data)
            .env("SMOLVM_IMAGE_DIR", &self.dirs.images)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            // Its own session: a Ctrl-C meant for the caller must not reach the supervisor,
            // which cleans up when the caller's connection goes instead.
            .process_group(0);
        let lock_fd = lock.map(|lock| std::os::fd::AsRawFd::as_raw_fd(&**lock));
        if lock_fd.is_some() {
            cmd.env(START_LOCK_ENV, START_LOCK_FD.to_string());
        }
        // SAFETY: between fork and exec only close_range, fcntl and dup2 run, all
        // async-signal-safe, on descriptors of the child's own table (the lock's stays open:
        // `lock` is borrowed for the call).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                // The supervisor (and QEMU, the helpers after it) outlives this call: it must not
                // keep what the caller left open without close-on-exec (a pipe of a shell's
                // `9>&1`, make's jobserver), or whoever waits on those waits for the sandbox.
                let all_cloexec = libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) == 0;
                if !all_cloexec {
                    // Kernels before 5.11.
                    let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(1024, 65536) as i32;
                    for fd in 3..max {
                        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                    }
                }
                // The start lock's copy at START_LOCK_FD is the one descriptor the supervisor
                // inherits on purpose.
                if let Some(fd) = lock_fd {
                    let r = if fd == START_LOCK_FD { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, START_LOCK_FD) };
                    if r < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().ctx(|| format!("starting the supervisor {}", bin.display()))?;
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(serde_json::to_string(spec).expect("spec serializes").as_bytes()).ctx(|| "sending the boot spec".into())?;
        drop(stdin);
        let stdout = child.stdout.take().expect("piped");
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        // The supervisor bounds the boot itself; this outer bound only catches a stuck one.
        let outer = boot_timeout + Duration::from_secs(10);
        let line = match tokio::time::timeout(outer, read).await {
            Ok(Ok(Ok(line))) if !line.trim().is_empty() => line,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                self.paths.remove_sockets();
                if let Ok(store) = Store::open(&self.dirs.data) {
                    host_network_leftovers(&store, &self.id);
                }
                let err = match other {
                    Err(_) => Error::Timeout { operation: "start".into(), seconds: outer.as_secs_f64() },
                    _ => {
                        let why = "the supervisor exited without a status";
                        let log = console_tail(&self.paths.log, 10);
                        Error::Host(match log.trim().is_empty() {
                            true => format!("{why}, and its log is empty (was it killed?)"),
                            false => format!("{why}; its log ends:\n{log}"),
                        })
                    }
                };
                // A start that failed leaves the sandbox in `error`, saying why, as one whose
                // supervisor reported its failure does (it stayed `stopped` or `created`).
                if let Ok(store) = Store::open(&self.dirs.data) {
                    if store.get(&self.id).ok().flatten().is_some_and(|r| !r.state.is_live()) {
                        let _ = store.set_state(&self.id, State::Error, Some(&err.to_string()));
                    }
                }
                return Err(err);
            }
        };
        // Reap the supervisor's zombie once it exits; it is not our business otherwise.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        serde_json::from_str(&line).map_err(|e| Error::Host(format!("unreadable supervisor status: {e}")))
    }

    /// A reply that is not the one asked for, as this sandbox's error: one refused because the
    /// VM is paused says so as everywhere else (`VM 'x' is paused; resume it first`).
    fn unexpected(&self, what: &str, reply: Reply) -> Error {
        match reply {
            // Paused by QEMU itself (the host's disk full): the supervisor says why.
            Reply::Error { kind: ErrorKind::Paused, message } if message != crate::supervisor::PAUSED => Error::Host(message),
            Reply::Error { kind: ErrorKind::Paused, .. } => Error::NotRunning { id: self.id.clone(), state: "paused".into() },
            // The supervisor is on its way down (stopped by another handle, or the guest itself).
            Reply::Error { kind: ErrorKind::Closed, .. } => self.unreachable(),
            other => reply_error(what, other),
        }
    }

    pub(crate) async fn connection(&self) -> Result<Arc<Conn>> {
        self.conn().await
    }

    fn open_conn(&self) -> Option<Arc<Conn>> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone().filter(|c| !c.peer_gone())
    }

    fn set_conn(&self, conn: Option<Arc<Conn>>) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = conn;
    }

    /// The supervisor's connection; a closed one is replaced by the current supervisor's where
    /// the sandbox still runs (restarted by another process), so a handle keeps working.
    async fn conn(&self) -> Result<Arc<Conn>> {
        if let Some(c) = self.open_conn() {
            return Ok(c);
        }
        let mut rec = self.record()?;
        if !rec.state.is_live() && self.paths.start_lock_held() {
            // Another process is starting it (or stopping or deleting it): what it comes to is
            // the answer, not "start it first" while it starts.
            let _ = tokio::time::timeout(Duration::from_secs(120), self.paths.wait_start_lock()).await;
            rec = self.record()?;
        }
        if !rec.state.is_live() || self.going_down(&rec) {
            return Err(self.unreachable());
        }
        let c = self.connect_supervisor().await?;
        self.set_conn(Some(c.clone()));
        Ok(c)
    }

    /// A new connection to the supervisor, where one answers: none where its socket is gone or
    /// refuses (a supervisor that died since the record was read); a refusal by permissions
    /// (another user's) is said as it is.
    async fn try_connect(&self) -> Result<Option<Arc<Conn>>> {
        match Conn::connect(&self.paths.ctl, &self.id).await {
            Ok(c) => Ok(Some(c)),
            Err(e @ (Error::Host(_) | Error::OtherBuild { .. })) => Err(e),
            Err(_) => Ok(None),
        }
    }

    /// A new connection to the supervisor; one that does not answer is said as the sandbox's
    /// state says (see `unreachable`).
    async fn connect_supervisor(&self) -> Result<Arc<Conn>> {
        self.try_connect().await?.ok_or_else(|| self.unreachable())
    }

    /// A request's failure on a connection found closed only by it (a handle's connection is
    /// not watched between calls): said as for one known closed.
    fn lost(&self, conn: &Conn, e: Error) -> Error {
        if conn.is_closed() {
            self.unreachable()
        } else {
            e
        }
    }

    /// Why this handle cannot reach its sandbox, as the sandbox's state says: stopped (or
    /// stopping), not the socket error of a connection whose supervisor has gone.
    fn unreachable(&self) -> Error {
        let rec = match self.record() {
            Ok(rec) => rec,
            Err(e) => return e,
        };
        if self.going_down(&rec) {
            return Error::NotRunning { id: self.id.clone(), state: "stopping".into() };
        }
        if rec.state.is_live() {
            // Running, but not through this handle's connection (its supervisor was restarted
            // by another process, or the connection broke).
            return Error::Guest(format!(
                "the connection to VM '{}' was lost (its supervisor does not answer); try again, or restart it (smolvm sandbox stop {} && smolvm sandbox start {})",
                self.id, self.id, self.id
            ));
        }
        Error::NotRunning { id: self.id.clone(), state: rec.state.to_string() }
    }

    /// Run a command; output is collected.
    pub async fn run(&self, command: &str, opts: &RunOptions) -> Result<CommandResult> {
        self.run_streaming(command, opts, |_| {}).await
    }

    /// Run a command, handing each piece of output to `on_output` as it arrives.
    pub async fn run_streaming(&self, command: &str, opts: &RunOptions, on_output: impl FnMut(Output<'_>)) -> Result<CommandResult> {
        let input = opts.stdin.clone().map(|bytes| Box::new(std::io::Cursor::new(bytes)) as Input);
        self.run_with_input(command, opts, input, on_output).await
    }

    /// `run_streaming` whose stdin is read from `input` as the command goes (instead of
    /// `RunOptions::stdin`, all at once). Sent only as fast as the command takes it. A timeout
    /// of zero is none (a shell reading a script for as long as its input lasts).
    pub async fn run_with_input(
        &self,
        command: &str,
        opts: &RunOptions,
        input: Option<Input>,
        on_output: impl FnMut(Output<'_>),
    ) -> Result<CommandResult> {
        check_run(command, opts)?;
        match self.channel {
            Channel::Agent => self.run_agent(command, opts, input, None, on_output).await,
            Channel::Ssh => {
                self.conn().await?;
                self.run_ssh(command, opts, input, on_output).await
            }
        }
    }

    /// Run a command on a terminal of its own, as an interactive shell wants: its stdin, stdout
    /// and stderr are one pseudo-terminal in the guest, so its output comes as `Stdout` alone
    /// (with the terminal's line endings and the echo of what was typed). `input` is what is
    /// typed, raw; each size on `terminal.resizes` is passed on (the guest's programs get
    /// SIGWINCH). `opts.timeout` of zero means no limit; `opts.stdin` is not used.
    pub async fn run_interactive(
        &self,
        command: &str,
        opts: &RunOptions,
        input: Input,
        terminal: Terminal,
        on_output: impl FnMut(Output<'_>),
    ) -> Result<CommandResult> {
        check_run(command, opts)?;
        for (field, n) in [("rows", terminal.size.rows), ("cols", terminal.size.cols)] {
            if n == 0 {
                return Err(Error::validation(field, "must be at least 1"));
            }
        }
        match self.channel {
            Channel::Agent => self.run_agent(command, opts, Some(input), Some(terminal), on_output).await,
            Channel::Ssh => Err(Error::validation(
                "comm_channel",
                "must be agent for a terminal (over SSH, log in with `smolvm sandbox ssh`, or run with `--channel agent`)",
            )),
        }
    }

    async fn run_agent(
        &self,
        command: &str,
        opts: &RunOptions,
        input: Option<Input>,
        terminal: Option<Terminal>,
        mut on_output: impl FnMut(Output<'_>),
    ) -> Result<CommandResult> {
        let conn = &self.conn().await?;
        let (tty, mut resizes) = match terminal {
            Some(t) => (Some(t.size), Some(t.resizes)),
            None => (None, None),
        };
        let req = ExecRequest {
            command: command.to_string(),
            shell: opts.shell,
            env: opts.env.clone(),
            timeout_ms: opts.timeout.as_millis() as u64,
            stdin: input.is_some(),
            cwd: opts.cwd.clone(),
            tty,
        };
        let mut stream = conn.open(&Request::Exec(req)).await.map_err(|e| self.lost(conn, e))?;
        // Input goes while the output is read (a command may answer before it has read all),
        // within the window the agent grants back as the command takes it.
        let window = Arc::new(tokio::sync::Semaphore::new(smolvm_proto::WINDOW));
        let _feeding = input.map(|input| feed(conn.clone(), stream.id, input, window.clone()));
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let timeout_err = || Error::Timeout { operation: "run".into(), seconds: opts.timeout.as_secs_f64() };
        // The agent enforces the timeout; this host-side bound catches a guest that cannot.
        // The guest's clock stands still while the VM is stopped (paused, saved), so that time
        // moves the bound: a pause that has ended by then too, not only one under way.
        // (No timeout, no bound: an interactive shell waits for its user.)
        let bound = if opts.timeout.is_zero() { FOREVER } else { opts.timeout + Duration::from_secs(5) };
        let started = tokio::time::Instant::now();
        let mut deadline = started + bound;
        loop {
            let next = async {
                loop {
                    match &mut resizes {
                        Some(sizes) => tokio::select! {
                            reply = stream.recv() => return Ok(reply),
                            size = sizes.recv() => match size {
                                // (Whole, whatever becomes of this future; in order.)
                                Some(size) => conn.send_detached(stream.id, Request::Resize(size)).await?,
                                None => resizes = None,
                            },
                        },
                        None => return Ok::<_, Error>(stream.recv().await),
                    }
                }
            };
            let reply = match tokio::time::timeout_at(deadline, next).await {
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Some(r))) => r,
                Ok(Ok(None)) => return Err(self.went_away("while the command ran").await),
                Err(_) => {
                    let extended = match self.stopped_within(started).await {
                        Some(stopped) => started + bound + stopped,
                        None if self.state().is_ok_and(|s| s == State::Paused) => tokio::time::Instant::now() + bound,
                        None => deadline,
                    };
                    if extended > tokio::time::Instant::now() {
                        deadline = extended;
                        continue;
                    }
                    let _ = stream.send(&Request::Cancel).await;
                    return Err(timeout_err());
                }
            };
            let kept = match &reply {
                Reply::Stdout(d) => {
                    on_output(Output::Stdout(d));
                    keep_output(&mut stdout, d, opts, "stdout")
                }
                Reply::Stderr(d) => {
                    on_output(Output::Stderr(d));
                    keep_output(&mut stderr, d, opts, "stderr")
                }
                _ => Ok(()),
            };
            if let Err(e) = kept {
                let _ = stream.send(&Request::Cancel).await;
                return Err(e);
            }
            match reply {
                Reply::Stdout(_) | Reply::Stderr(_) => {}
                Reply::Credit(n) => window.add_permits((n as usize).min(smolvm_proto::WINDOW)),
                Reply::Exit { timed_out: true, .. } => return Err(timeout_err()),
                // Down before the command came, or stopped, deleted or powered off meanwhile (as
                // a connection that ends, above).
                Reply::Error { kind: ErrorKind::Closed, message } => return Err(self.closed(&message, "while the command ran").await),
                Reply::Exit { code, .. } => {
                    return Ok(CommandResult {
                        exit_code: code,
                        stdout: String::from_utf8_lossy(&stdout).into_owned(),
                        stderr: String::from_utf8_lossy(&stderr).into_owned(),
                    })
                }
                // Refused before it started (its working directory, its shell): as a shell
                // says of a command it cannot run, not as the command's own failure.
                Reply::Error { kind: ErrorKind::NotFound | ErrorKind::Failed, message } => return Err(Error::CannotStart(message)),
                other => return Err(self.unexpected("exec", other)),
            }
        }
    }

    /// Copy a local file (or directory, as tar) into the guest. `guest` must be absolute; a
    /// trailing `/` puts it into that directory under its own name; parents are created.
    pub async fn upload(&self, local: &Path, guest: &str) -> Result<()> {
        let meta = std::fs::metadata(local).map_err(|_| Error::validation("local_path", format!("{} does not exist", local.display())))?;
        // A FIFO (or a device) would be read until it ends, which it may never do.
        if !meta.is_file() && !meta.is_dir() {
            return Err(Error::validation("local_path", format!("{} is not a regular file or a directory", local.display())));
        }
        let name = local.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let target = smolvm_proto::paths::guest_target(guest, &name).map_err(|m| Error::validation("guest_path", m))?;
        let conn = &self.conn().await?;
        let (mode, tar) = (std::os::unix::fs::PermissionsExt::mode(&meta.permissions()), meta.is_dir());
        if self.channel == Channel::Ssh && !tar {
            let parent = Path::new(&target).parent().unwrap_or(Path::new("/"));
            let q = |p: &str| crate::ssh::sftp_quote(p, "guest_path");
            // Absolute, so that no local path can start with '-' and read as an option.
            let local = std::path::absolute(local).ctx(|| format!("resolving {}", local.display()))?;
            // Beside the target, then renamed into place, as the agent does: whole or not at
            // all, and a directory in the way is an error, not a place to put it into.
            let tmp = format!("{}/.smolvm-upload-{}", parent.to_string_lossy().trim_end_matches('/'), random_id("sftp"));
            // (`put -p` keeps the permission bits only: setuid, setgid and sticky come with
            // `chmod`, as over the agent.)
            let batch = format!(
                "{}put -p {} {}\nchmod {:o} {}\nrename {} {}\n",
                crate::ssh::sftp_mkdirs(parent)?,
                crate::ssh::sftp_quote(&local.to_string_lossy(), "local_path")?,
                q(&tmp)?,
                mode & 0o7777,
                q(&tmp)?,
                q(&tmp)?,
                q(&target)?
            );
            let remove = format!("-rm {}\n", q(&tmp)?);
            // What uploads killed outright (SIGKILL: nothing of theirs ran to remove it) left in
            // the guest goes in this batch; this one's own temporary name is noted until it is
            // done with, for the next to find if this one is killed.
            let (stale, note) = sftp_leftovers(&self.paths.dir, &tmp);
            let _note = note.map(RemoveOnDrop);
            let batch = stale.iter().map(|(_, path)| q(path).map(|p| format!("-rm {p}\n"))).collect::<Result<String>>()? + &batch;
            let mut guard = SftpTemp(Some((self.ssh_endpoint()?.sftp(), remove.clone())));
            let mut done = self.sftp(batch).await;
            // (Their removal ran first in the batch; a batch that never ran leaves them noted.)
            if done.is_ok() {
                for (record, _) in &stale {
                    let _ = std::fs::remove_file(record);
                }
            }
            if done.is_err() {
                let _ = self.sftp(remove).await;
                // sftp says only "Failure" of a rename onto a directory: one that it can enter
                // is said as the agent says it.
                if self.sftp(format!("cd {}\n", q(&target)?)).await.is_ok() {
                    done = Err(Error::validation("guest_path", smolvm_proto::paths::upload_onto_directory(&target)));
                } else if done.as_ref().is_err_and(|e| e.to_string().contains(&tmp)) {
                    // Its temporary file could not be made: a file stands in the parents' way
                    // (their `mkdir`s fail quietly). Said of the path asked for, not of our
                    // temporary name.
                    done = Err(Error::validation(
                        "guest_path",
                        format!("receiving {target}: {} is not a directory (a part of it is a file)", parent.display()),
                    ));
                }
            }
            guard.0 = None;
            return done;
        }
        if tar {
            smolvm_tar::check_tree(local).map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => Error::validation("local_path", format!("{}: {e}", local.display())),
                _ => Error::Io { context: format!("reading {}", local.display()), source: e },
            })?;
        }
        let mut stream = conn.open(&Request::FilePut { path: target.clone(), mode, tar }).await.map_err(|e| self.lost(conn, e))?;
        // Sent as the agent stores it (it grants back what it has written, as for a command's
        // input): no more than a window waits in the supervisor or the channel, and a paused
        // VM's upload waits here, not in a socket that the same client's resume needs.
        let window = Arc::new(tokio::sync::Semaphore::new(smolvm_proto::WINDOW));
        let id = stream.id;
        // Each frame goes on a task of its own (an upload may end early: the agent's error).
        let frame = |req: Request| within("upload", TRANSFER_IDLE, conn.send_detached(id, req));
        let put = |chunk: Vec<u8>| {
            let window = window.clone();
            async move {
                let permits = within("upload", TRANSFER_IDLE, window.acquire_many(chunk.len() as u32)).await?;
                permits.map_err(|_| Error::Guest("the upload was cut off".into()))?.forget();
                frame(Request::Stdin(chunk)).await?
            }
        };
        let send = async {
            if tar {
                // Packed as it is sent, a few chunks ahead: a tree never has to fit in memory.
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
                let dir = local.to_path_buf();
                let packer = tokio::task::spawn_blocking(move || {
                    smolvm_tar::pack_chunked(&dir, smolvm_proto::CHUNK, |chunk| {
                        tx.blocking_send(chunk).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
                    })
                });
                while let Some(chunk) = rx.recv().await {
                    put(chunk).await?;
                }
                packer.await.map_err(|e| Error::Host(e.to_string()))?.ctx(|| format!("packing {}", local.display()))?;
            } else {
                let mut file = tokio::fs::File::open(local).await.ctx(|| format!("opening {}", local.display()))?;
                let mut buf = vec![0u8; smolvm_proto::CHUNK];
                // A file that changes size while it is read arrives as neither its old nor its
                // new self: given up (the agent drops what it had), not put in place torn.
                let (size, mut read) = (meta.len(), 0u64);
                let changed = |read: u64| {
                    Error::Host(format!(
                        "{} changed size while it was uploaded (it had {size} bytes when the upload began, and {read} were read): the upload was given up, and nothing of it is in the guest",
                        local.display()
                    ))
                };
                loop {
                    let n = tokio::io::AsyncReadExt::read(&mut file, &mut buf).await.ctx(|| format!("reading {}", local.display()))?;
                    if n == 0 {
                        break;
                    }
                    read += n as u64;
                    if read > size {
                        return Err(changed(read));
                    }
                    put(buf[..n].to_vec()).await?;
                }
                if read != size {
                    return Err(changed(read));
                }
            }
            frame(Request::StdinClose).await?
        };
        tokio::pin!(send);
        let mut sent = false;
        loop {
            tokio::select! {
                done = &mut send, if !sent => {
                    if let Err(e) = done {
                        return Err(if conn.is_closed() { self.went_away("during the upload").await } else { e });
                    }
                    sent = true;
                }
                // While it sends, the sending is what is bounded (a slow local source is not
                // the agent's silence); then the agent's answer.
                reply = async {
                    match sent {
                        true => within("upload", TRANSFER_IDLE, stream.recv()).await,
                        false => Ok(stream.recv().await),
                    }
                } => match reply? {
                    Some(Reply::Credit(n)) => window.add_permits((n as usize).min(smolvm_proto::WINDOW)),
                    // A big directory still being extracted: its silence bound starts again.
                    Some(Reply::GoingOn) => {}
                    // The agent has the last frame: what is left of the sending (the task that
                    // wrote it, on another thread) ends now too.
                    Some(Reply::Ok) => {
                        if !sent {
                            (&mut send).await?;
                        }
                        return Ok(());
                    }
                    Some(Reply::Error { kind: ErrorKind::Invalid, message }) => return Err(Error::validation("guest_path", message)),
                    // (Its supervisor going down: stopped, deleted, failed.)
                    Some(Reply::Error { kind: ErrorKind::Closed, message }) => return Err(self.closed(&message, "during the upload").await),
                    None => return Err(self.went_away("during the upload").await),
                    Some(other) => return Err(self.unexpected("upload", other)),
                },
            }
        }
    }

    /// Copy a guest file (or directory, as tar) to the host. Setuid, setgid and sticky bits
    /// are dropped; a directory's entries are checked before anything is written.
    pub async fn download(&self, guest: &str, local: &Path) -> Result<()> {
        let name = Path::new(guest).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        smolvm_proto::paths::guest_target(guest, &name).map_err(|m| Error::validation("guest_path", m))?;
        if name.is_empty() {
            // ("/" itself: the guest's whole tree, /proc and /sys with it.)
            return Err(Error::validation(
                "guest_path",
                format!("{guest:?} names no file or directory to download (name one, such as /root)"),
            ));
        }
        let into_dir = local.to_string_lossy().ends_with('/') || local.is_dir();
        let conn = &self.conn().await?;
        let parent = if into_dir { local.to_path_buf() } else { local.parent().map(Path::to_path_buf).unwrap_or_default() };
        let parent = if parent.as_os_str().is_empty() { PathBuf::from(".") } else { parent };
        let dest = if into_dir { local.join(&name) } else { local.to_path_buf() };
        let made = MadeDirs::before(&parent);
        smolvm_proto::paths::make_dirs(&parent).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput => Error::validation("local_path", e.to_string()),
            _ => Error::Io { context: format!("creating {}", parent.display()), source: e },
        })?;
        // Written where a link there points, and in place of nothing but a file or a directory;
        // the new file is made beside the one it replaces, to be renamed over it.
        let dest = download_destination(dest)?;
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        if self.channel == Channel::Ssh && !guest.ends_with('/') {
            match self.download_sftp(guest, &parent, &dest).await {
                // OpenSSH: "not a regular file" (newer) or "non-regular file" (older).
                Err(Error::Ssh(m)) if m.contains("regular file") => {}
                done => {
                    if done.is_ok() {
                        made.keep();
                    }
                    return done;
                }
            }
        }
        let mut stream = conn.open(&Request::FileGet { path: guest.to_string() }).await.map_err(|e| self.lost(conn, e))?;
        let temp = DownloadTemp { path: download_temp(&parent), stop: Default::default() };
        let tmp = temp.path.clone();
        let result = async {
            // New (never a link someone put there), and private until its mode is set.
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .await
                // (Named by its directory: the temporary file's name is ours, not the caller's.)
                .ctx(|| format!("cannot write into {}", parent.display()))?;
            // A chunk of zeros becomes a hole, not written: a sparse file (a disk image, or a
            // guest's `truncate -s 100G`) stays sparse here, instead of filling this disk.
            let mut size = 0u64;
            loop {
                match within("download", TRANSFER_IDLE, stream.recv()).await? {
                    Some(Reply::Data(d)) if d.iter().all(|&b| b == 0) => {
                        size += d.len() as u64;
                        tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(size))
                            .await
                            .ctx(|| format!("writing {}", tmp.display()))?;
                    }
                    Some(Reply::Data(d)) => {
                        size += d.len() as u64;
                        tokio::io::AsyncWriteExt::write_all(&mut file, &d).await.ctx(|| format!("writing {}", tmp.display()))?
                    }
                    Some(Reply::FileDone { mode, tar, .. }) => {
                        tokio::io::AsyncWriteExt::flush(&mut file).await.ctx(|| "flushing the download".into())?;
                        // (A file that ends in a hole has its length only once set.)
                        file.set_len(size).await.ctx(|| format!("writing {}", tmp.display()))?;
                        return Ok((mode, tar));
                    }
                    // Missing, or not a file or a directory (a device, a FIFO).
                    Some(Reply::Error { kind: ErrorKind::NotFound | ErrorKind::Invalid, message }) => {
                        return Err(Error::validation("guest_path", message))
                    }
                    Some(Reply::Error { kind: ErrorKind::Closed, message }) => {
                        return Err(self.closed(&message, "during the download").await)
                    }
                    None => return Err(self.went_away("during the download").await),
                    Some(other) => return Err(self.unexpected("download", other)),
                }
            }
        }
        .await;
        let done = match result {
            Ok((_, true)) => {
                let (tmp2, dest2, stop) = (tmp.clone(), dest.clone(), temp.stop.clone());
                tokio::task::spawn_blocking(move || {
                    let mut f = std::fs::File::open(&tmp2)?;
                    smolvm_tar::unpack_checked_until(&mut f, &dest2, true, &stop)
                })
                .await
                .map_err(|e| Error::Host(e.to_string()))?
                .map_err(|e| {
                    // No room, no permission, something in the way: this host's. Anything else
                    // (an entry against the rules, an archive the tar crate refuses) is what the
                    // guest sent.
                    use std::io::ErrorKind as K;
                    let host = matches!(
                        e.kind(),
                        K::PermissionDenied
                            | K::StorageFull
                            | K::QuotaExceeded
                            | K::ReadOnlyFilesystem
                            | K::AlreadyExists
                            | K::IsADirectory
                            | K::NotADirectory
                            | K::DirectoryNotEmpty
                            | K::FileTooLarge
                            | K::Interrupted
                    ) || smolvm_tar::InTarget::is(&e);
                    if host {
                        Error::Io { context: format!("extracting {guest} into {}", dest.display()), source: e }
                    } else {
                        Error::Guest(format!("downloading {guest}: {e}"))
                    }
                })
            }
            Ok((mode, false)) => std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode & 0o777))
                .and_then(|_| std::fs::rename(&tmp, &dest))
                .ctx(|| format!("storing {}", dest.display())),
            Err(e) => Err(e),
        };
        drop(temp);
        if done.is_ok() {
            made.keep();
        }
        done
    }

    /// A file over SFTP; a directory (sftp cannot tell us in advance) falls back to the agent's
    /// checked tar path.
    async fn download_sftp(&self, guest: &str, parent: &Path, dest: &Path) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        // sftp makes its file with the guest's mode: it goes into a directory of the owner's
        // alone until it is complete, and the directory goes however this ends (Ctrl-C drops
        // this future, and the sftp with it).
        let dir = std::path::absolute(download_temp(parent)).ctx(|| format!("resolving {}", parent.display()))?;
        std::fs::DirBuilder::new().mode(0o700).create(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let _remove = RemoveDirOnDrop(dir.clone());
        let tmp = dir.join("file");
        let q = crate::ssh::sftp_quote;
        self.sftp(format!("get -p {} {}\n", q(guest, "guest_path")?, q(&tmp.to_string_lossy(), "local_path")?)).await?;
        let meta = std::fs::symlink_metadata(&tmp).ctx(|| format!("reading {}", tmp.display()))?;
        std::fs::set_permissions(&tmp, PermissionsExt::from_mode(meta.permissions().mode() & 0o777))
            .and_then(|_| std::fs::rename(&tmp, dest))
            .ctx(|| format!("storing {}", dest.display()))
    }

    /// Forward 127.0.0.1:`host` (a free port when `None`) to the guest's port; returns the host
    /// port. Recorded in the state store until closed or the sandbox stops.
    pub async fn expose_local(&self, guest_port: u16, host_port: Option<u16>) -> Result<u16> {
        if guest_port == 0 {
            return Err(Error::validation("guest_port", "0 is not a port (allowed 1..=65535)"));
        }
        match self.call_control_timed(&Request::Expose { guest: guest_port, host: host_port.unwrap_or(0) }, "expose").await? {
            Reply::Port(p) => Ok(p),
            Reply::Error { kind: ErrorKind::Invalid, message } => Err(Error::validation("port", message)),
            // The supervisor's own work (QEMU, the host's proxies): its timeouts are timeouts.
            Reply::Error { kind: ErrorKind::Failed, message } => Err(control_failure("expose", &message)),
            other => Err(self.unexpected("expose", other)),
        }
    }

    pub async fn unexpose_local(&self, guest_port: u16) -> Result<()> {
        match self.call_control_timed(&Request::Unexpose { guest: guest_port }, "unexpose").await? {
            Reply::Ok => Ok(()),
            Reply::Error { kind: ErrorKind::NotFound, message } => Err(Error::validation("guest_port", message)),
            Reply::Error { kind: ErrorKind::Failed, message } => Err(control_failure("unexpose", &message)),
            other => Err(self.unexpected("unexpose", other)),
        }
    }

    /// Exposed ports as (guest, host).
    pub fn ports(&self) -> Result<Vec<(u16, u16)>> {
        Store::open(&self.dirs.data)?.ports(&self.id)
    }

    /// A control request (pause, resume, snapshot, a port's exposure) on a connection of its
    /// own: a caller that gives it up (drops this future: Ctrl-C, in Python too; or past
    /// `bound`) closes that connection, and the supervisor then drops it if it has not begun
    /// (one behind a long save was done later), or cancels a save under way and lets the VM run
    /// on. On the shared connection it would be done, the VM stopped, for nobody.
    async fn call_control(&self, req: &Request, what: &str, bound: Duration) -> Result<Reply> {
        self.conn().await?;
        let own = self.connect_supervisor().await?;
        match within(what, bound, own.call(req)).await? {
            // Its supervisor went (stopped, killed) while it worked on this: said as the
            // record comes to say, not as a supervisor that does not answer.
            Err(_) if own.is_closed() => Err(self.went_away(&format!("during the {what}")).await),
            r => r.map_err(|e| self.lost(&own, e)),
        }
    }

    /// A control request (pause, resume, ports) bounded by `SMOLVM_CONTROL_TIMEOUT` plus a
    /// margin, so that the supervisor's own timeout answer, and with it the request's dropping,
    /// comes first; a timeout says the configured bound, not the sum.
    async fn call_control_timed(&self, req: &Request, what: &str) -> Result<Reply> {
        let said = crate::config::control_timeout()?;
        self.call_control(req, what, said + Duration::from_secs(5)).await.map_err(|e| match e {
            Error::Timeout { operation, .. } => Error::Timeout { operation, seconds: said.as_secs_f64() },
            e => e,
        })
    }

    /// One request and its answer within `bound`: a stuck agent or supervisor must not hang
    /// the caller (a health check would never say no).
    async fn call_within(&self, req: &Request, what: &str, bound: Duration) -> Result<Reply> {
        let conn = &self.conn().await?;
        within(what, bound, conn.call(req)).await?.map_err(|e| self.lost(conn, e))
    }

    /// How long the VM's CPUs were stopped (paused, saved) since `since`, as its supervisor saw
    /// it; `None` if it cannot say.
    async fn stopped_within(&self, since: tokio::time::Instant) -> Option<Duration> {
        // On a connection of its own: the handle's may be held up behind a request that waits
        // for a save to end (a command's, while the agent's channel is held for the save), and
        // an answer measured back from then would miss the stop.
        // (Answered by the supervisor's client task at once, whatever its VM does: one that does
        // not answer in 2 s is stuck, and the command's timeout stands.)
        let bound = Duration::from_secs(2);
        let own = tokio::time::timeout(bound, self.connect_supervisor()).await.ok()?.ok()?;
        let req = Request::StoppedWithin { ms: since.elapsed().as_millis() as u64 };
        match tokio::time::timeout(bound, own.call(&req)).await {
            Ok(Ok(Reply::Stopped(ms))) => Some(Duration::from_millis(ms)),
            _ => None,
        }
    }

    /// Agent round trip without a process (health check, benchmarks).
    pub async fn ping(&self) -> Result<()> {
        match self.call_within(&Request::Ping, "ping", PING_BOUND).await? {
            Reply::Pong => Ok(()),
            other => Err(self.unexpected("ping", other)),
        }
    }

    /// Wait until the agent answers (a handle on a sandbox that is busy or still booting), or,
    /// over SSH (comm_channel=ssh), until an SSH login works: until commands can run. A sandbox
    /// that is stopped, paused, failed or gone cannot become ready by waiting, so that is said
    /// at once instead of after `timeout`.
    pub async fn wait_for_ready(&self, timeout: Duration) -> Result<()> {
        crate::config::check_wait(timeout, "timeout")?;
        if self.channel == Channel::Ssh {
            return self.wait_for_ssh(timeout).await.map_err(|e| match e {
                Error::Timeout { seconds, .. } => Error::Timeout { operation: "wait_for_ready".into(), seconds },
                e => e,
            });
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.ping()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e @ (Error::NotRunning { .. } | Error::NotFound(_)))) => return Err(e),
                Ok(Err(e)) => tracing::debug!("not ready: {e}"),
                Err(_) => {}
            }
            if tokio::time::Instant::now() + Duration::from_millis(50) >= deadline {
                return Err(Error::Timeout { operation: "wait_for_ready".into(), seconds: timeout.as_secs_f64() });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The TCP ports something in the guest listens on (any address, IPv4 or IPv6), ascending.
    pub async fn listening_ports(&self) -> Result<Vec<u16>> {
        match self.channel {
            Channel::Agent => match self.call_within(&Request::Listening, "listening ports", CALL_BOUND).await? {
                Reply::Ports(p) => Ok(p),
                other => Err(self.unexpected("listening ports", other)),
            },
            Channel::Ssh => {
                let opts = RunOptions { timeout: Duration::from_secs(30), shell: Shell::Raw, ..Default::default() };
                let r = self.run("cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; true", &opts).await?;
                Ok(smolvm_proto::listening_ports(&r.stdout))
            }
        }
    }

    /// Wait until something in the guest listens on each of `ports` (TCP, any address): a
    /// server started in the background is then ready for clients and `expose_local`.
    pub async fn wait_for_ports(&self, ports: &[u16], timeout: Duration) -> Result<()> {
        if ports.is_empty() || ports.contains(&0) {
            return Err(Error::validation("ports", "give at least one port, each 1..=65535"));
        }
        if timeout.is_zero() {
            return Err(Error::validation("timeout", "must be a positive number of seconds"));
        }
        crate::config::check_wait(timeout, "timeout")?;
        let timed_out = || Error::Timeout { operation: "wait_for_ports".into(), seconds: timeout.as_secs_f64() };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Each look within the time left: an agent that does not answer ends the wait on
            // time, as this wait's timeout.
            let listening = tokio::time::timeout_at(deadline, self.listening_ports()).await.map_err(|_| timed_out())??;
            if ports.iter().all(|p| listening.binary_search(p).is_ok()) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(timed_out());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether commands can run now over this handle's channel: the sandbox is running and its
    /// agent answers, or (comm_channel=ssh) its SSH server was set up with its key pinned (no
    /// connection is made: a login costs a second here; `wait_for_ready` makes one).
    pub async fn can_run_commands(&self) -> bool {
        match self.channel {
            Channel::Agent => self.ping().await.is_ok(),
            Channel::Ssh => self.ssh_endpoint().is_ok(),
        }
    }

    /// Set variables for new login shells. Returns the sorted names present afterwards.
    pub async fn set_env_vars(&self, vars: &BTreeMap<String, String>, merge: bool) -> Result<Vec<String>> {
        smolvm_proto::env::validate_vars(vars)?;
        let _held = match self.env_home().await? {
            EnvHome::Guest(lock) => lock,
            EnvHome::Config(_lock, store, mut config) => {
                if !merge {
                    config.env_vars.clear();
                }
                config.env_vars.extend(vars.clone());
                // (The whole set within the agent's bound, as at creation.)
                smolvm_proto::env::validate_vars(&config.env_vars)?;
                store.update_config(&self.id, &config)?;
                return Ok(config.env_vars.into_keys().collect());
            }
        };
        // The whole set's bound, checked here as for a stopped sandbox: the same error either
        // way (the agent checks again, and says the same as a validation error).
        let mut all = if merge { self.guest_env("env set").await? } else { BTreeMap::new() };
        all.extend(vars.clone());
        smolvm_proto::env::check_total(&all)?;
        let names = match self.call_within(&Request::EnvSet { vars: vars.clone(), merge }, "env set", CALL_BOUND).await? {
            Reply::EnvNames(n) => n,
            Reply::Error { kind: ErrorKind::Invalid, message } => return Err(Error::validation("env_vars", message)),
            other => return Err(self.unexpected("env set", other)),
        };
        self.remember_env().await?;
        Ok(names)
    }

    /// Remove variables; returns the removed ones with their old values. Missing keys are
    /// ignored and nothing is written when nothing changes.
    pub async fn unset_env_vars(&self, keys: &[String]) -> Result<BTreeMap<String, String>> {
        for k in keys {
            smolvm_proto::env::validate_key(k)?;
        }
        let _held = match self.env_home().await? {
            EnvHome::Guest(lock) => lock,
            EnvHome::Config(_lock, store, mut config) => {
                let removed: BTreeMap<String, String> = keys.iter().filter_map(|k| config.env_vars.remove_entry(k)).collect();
                if !removed.is_empty() {
                    store.update_config(&self.id, &config)?;
                }
                return Ok(removed);
            }
        };
        let removed = match self.call_within(&Request::EnvUnset { keys: keys.to_vec() }, "env unset", CALL_BOUND).await? {
            Reply::EnvRemoved(r) => r,
            other => return Err(self.unexpected("env unset", other)),
        };
        // Also where the guest had none of them (its file edited by hand): the record must not
        // keep them, or the next start would bring back what was just unset.
        let recorded = self.record()?.config.env_vars.keys().any(|k| keys.contains(k));
        if !removed.is_empty() || recorded {
            self.remember_env().await?;
        }
        Ok(removed)
    }

    /// The variables smolvm manages in this sandbox.
    pub async fn list_env_vars(&self) -> Result<BTreeMap<String, String>> {
        match self.env_home().await? {
            EnvHome::Config(_lock, _, config) => Ok(config.env_vars),
            EnvHome::Guest(_lock) => self.guest_env("env list").await,
        }
    }

    /// The guest's managed variables, its errors (a hand-edited file it cannot read) said as
    /// part of `what`, the request the user made.
    async fn guest_env(&self, what: &str) -> Result<BTreeMap<String, String>> {
        match self.call_within(&Request::EnvList, what, CALL_BOUND).await? {
            Reply::Env(vars) => Ok(vars),
            other => Err(self.unexpected(what, other)),
        }
    }

    /// Where the sandbox's variables live: the config of a sandbox that is not running
    /// (created, stopped, failed), under its start lock, until a start puts them in the guest
    /// (a start under way finishes first); the guest of a running or paused one, whose record
    /// then follows it (`remember_env`), under the sandbox's env lock, held through the change:
    /// changes of two processes do not interleave there (one's unset came back with the
    /// other's set). (Not the start lock: a stop need not wait for a guest that is slow to
    /// answer, and this handle's reconnection may take that lock.)
    async fn env_home(&self) -> Result<EnvHome> {
        // (Also before a running one's guest is changed: its record must follow.)
        let rec = self.record()?;
        rec.usable()?;
        if rec.state.is_live() {
            return Ok(EnvHome::Guest(self.env_lock().await?));
        }
        let lock = self.paths.wait_start_lock().await?;
        let store = Store::open(&self.dirs.data)?;
        match store.get(&self.id)? {
            Some(rec) if rec.state.is_live() => {
                drop(lock);
                Ok(EnvHome::Guest(self.env_lock().await?))
            }
            Some(rec) => {
                rec.usable()?;
                match lock {
                    Some(l) => Ok(EnvHome::Config(l, store, Box::new(rec.config))),
                    None => Ok(EnvHome::Guest(self.env_lock().await?)),
                }
            }
            None => Err(Error::NotFound(self.id.clone())),
        }
    }

    /// The env lock (see `env_home`), waited for off the async runtime. A sandbox deleted
    /// meanwhile has no directory to hold it: not found.
    async fn env_lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>> {
        let (path, id) = (self.paths.env_lock.clone(), self.id.clone());
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::OpenOptionsExt;
            let file = std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(&path).map_err(|e| match e
                .kind()
            {
                std::io::ErrorKind::NotFound => Error::NotFound(id),
                _ => Error::Io { context: format!("creating {}", path.display()), source: e },
            })?;
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| Error::Host(format!("locking sandbox env: {e}")))
        })
        .await
        .map_err(|e| Error::Host(e.to_string()))?
    }

    /// Keep the stored config in step with the guest, so a stopped sandbox starts again with
    /// the variables it had. (Under the env lock `env_home` took. Asked of the guest alone: one
    /// stopped meanwhile fails this, rather than its record's old set being written back.)
    async fn remember_env(&self) -> Result<()> {
        let vars = self.guest_env("env list").await?;
        let store = Store::open(&self.dirs.data)?;
        if let Some(mut rec) = store.get(&self.id)? {
            rec.config.env_vars = vars;
            store.update_config(&self.id, &rec.config)?;
        }
        Ok(())
    }

    /// Power the VM off: the agent syncs and resets it; past `timeout` it is killed.
    ///
    /// A stop issued while another process starts the sandbox (the start lock is held until
    /// it runs) stops what that start brings up; it used to find nothing running yet and
    /// return while the VM booted on. A stop issued while another stop is under way waits for
    /// that one and no more: a start issued after it is not stopped.
    pub async fn stop(&mut self, timeout: Duration) -> Result<()> {
        if self.paths.start_lock(false)?.is_none() {
            return self.stop_after_start(timeout).await;
        }
        let stopped = self.stop_with(timeout, false).await;
        if matches!(stopped, Err(Error::NotFound(_))) {
            // Deleted meanwhile: the probe of the lock must not leave a directory.
            if let Ok(store) = Store::open(&self.dirs.data) {
                self.paths.forget_lock(&store, &self.id);
            }
        }
        stopped
    }

    /// `stop`, once a start in progress has finished: for a caller that gave up on its own
    /// start (Ctrl-C), whose supervisor boots on (and for `stop` when another process holds
    /// the start lock). Without the wait it would find nothing running yet and return while
    /// the VM boots.
    pub async fn stop_after_start(&mut self, timeout: Duration) -> Result<()> {
        let _lock = self.paths.wait_start_lock().await?;
        let stopped = self.stop_with(timeout, true).await;
        if matches!(stopped, Err(Error::NotFound(_))) {
            // The start failed and took the sandbox away: the lock leaves no directory.
            if let Ok(store) = Store::open(&self.dirs.data) {
                self.paths.forget_lock(&store, &self.id);
            }
        }
        stopped
    }

    /// Whether the sandbox is on its way down: its supervisor lives, but has removed its
    /// control socket, which it does first when it stops.
    fn going_down(&self, rec: &Record) -> bool {
        // Gone for certain, not merely out of sight (another user's 0700 directory): that one
        // is running, and connecting to it says why it cannot be reached.
        let ctl_gone = matches!(std::fs::symlink_metadata(&self.paths.ctl), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
        rec.state.is_live() && rec.supervisor.is_some_and(|p| p.alive()) && ctl_gone
    }

    /// If another process is taking the sandbox down, wait until it is done (true).
    async fn stopping(&mut self, rec: &Record) -> Result<bool> {
        let Some(sup) = rec.supervisor.filter(|_| self.going_down(rec)) else {
            return Ok(false);
        };
        let bound = Duration::from_secs(60);
        if !exited_within(sup, bound).await {
            return Err(Error::Timeout { operation: "waiting for the sandbox to stop".into(), seconds: bound.as_secs_f64() });
        }
        self.set_conn(None);
        Ok(true)
    }

    async fn stop_with(&mut self, timeout: Duration, held: bool) -> Result<()> {
        crate::config::check_wait(timeout, "timeout")?;
        let rec = self.record_with(held)?;
        if !rec.state.is_live() || self.stopping(&rec).await? {
            self.set_conn(None);
            return Ok(());
        }
        let taken = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take().filter(|c| !c.is_closed());
        // (None: a supervisor that died since the record was read. What it left is cleaned up
        // below, as for one that does not answer.)
        let req = Request::Stop { timeout_ms: timeout.as_millis() as u64 };
        let bound = timeout + Duration::from_secs(5);
        let conn = match taken {
            Some(c) => Some(c),
            None => match self.try_connect().await {
                // Another build's supervisor, which cannot be sent a request, is asked by
                // SIGTERM, which it takes as a stop (it powers the guest off, tears down and
                // records it); if it is not gone within the bound it is killed below.
                Err(Error::OtherBuild { .. }) => {
                    end_by_signal(&rec, bound).await;
                    None
                }
                r => r?,
            },
        };
        let mut answered = match &conn {
            Some(conn) => tokio::time::timeout(bound, conn.call(&req)).await,
            None => Ok(Err(Error::Host("no supervisor answers".into()))),
        };
        if matches!(answered, Ok(Err(_))) {
            // The connection failed at once: it may be a previous supervisor's (another process
            // restarted the sandbox). Ask the current one before using force on it.
            match Conn::connect(&self.paths.ctl, &self.id).await {
                Ok(fresh) => answered = tokio::time::timeout(bound, fresh.call(&req)).await,
                Err(Error::OtherBuild { .. }) => end_by_signal(&rec, bound).await,
                Err(_) => {}
            }
        }
        if let Ok(Ok(Reply::Error { kind: ErrorKind::Failed, .. })) = &answered {
            // The VM is down, but its supervisor could not record that (the database's disk
            // full). It is on its way out, removing the TAP: not killed, waited for. The stop
            // is then recorded here, or fails with why it cannot be (`disk_full`, for `delete`).
            if let Some(sup) = rec.supervisor {
                exited_within(sup, Duration::from_secs(10)).await;
            }
            self.set_conn(None);
            let store = Store::open(&self.dirs.data)?;
            if store.get(&self.id)?.is_some_and(|now| now.supervisor == rec.supervisor) {
                host_network_leftovers(&store, &self.id);
                self.paths.remove_sockets();
                store.set_state(&self.id, State::Stopped, None)?;
            }
            return Ok(());
        }
        if !matches!(answered, Ok(Ok(Reply::Ok))) {
            // The supervisor did not answer in time: kill it; QEMU dies with it (PDEATHSIG).
            // Its end is waited for: still dying, its nft could yet commit the table after the
            // removal below.
            if let Some(sup) = rec.supervisor.filter(|p| p.alive()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(sup.pid), nix::sys::signal::Signal::SIGKILL);
                exited_within(sup, Duration::from_secs(2)).await;
            }
            let store = Store::open(&self.dirs.data)?;
            // Only what that supervisor ran: if another process has restarted the sandbox
            // meanwhile, the record and the host's resources are the new one's. (One that found
            // the killed supervisor first, a `list` say, recorded its death as an error, and
            // cleared its pid: that is this stop's doing, and the sandbox is stopped. A crash
            // the supervisor recorded itself keeps its reason.)
            let ours = |now: &Record| {
                now.supervisor == rec.supervisor
                    || (now.supervisor.is_none() && now.state == State::Error && now.error.as_deref() == Some(SUPERVISOR_GONE))
            };
            if let Some(rec) = store.get(&self.id)?.filter(ours) {
                if let Some(vmm) = rec.vmm.filter(|p| p.alive()) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(vmm.pid), nix::sys::signal::Signal::SIGKILL);
                }
                host_network_leftovers(&store, &self.id);
                self.paths.remove_sockets();
                store.set_state(&self.id, State::Stopped, None)?;
            }
        }
        Ok(())
    }

    /// Stop if running, then forget the sandbox and remove its files.
    pub async fn delete(mut self) -> Result<()> {
        // A start in progress (another process) finishes first; what it started is stopped.
        let _lock = self.paths.wait_start_lock().await?;
        tracing::debug!("phase: deleting");
        match self.stop_with(DEFAULT_STOP_TIMEOUT, true).await {
            Ok(()) | Err(Error::NotFound(_)) => {}
            // Stopped, and only its record could not say so (the disk is full): the delete
            // goes on, as nothing of it runs.
            Err(e) if e.disk_full() && self.nothing_runs() => {
                tracing::warn!("recording {} as stopped: {}", self.id, e.full_message())
            }
            Err(e) => return Err(e),
        }
        tracing::debug!("phase: stopped");
        let store = Store::open(&self.dirs.data)?;
        host_network_leftovers(&store, &self.id);
        let removed = match store.remove(&self.id) {
            // Its files free what the database needs to forget it (a delete failed so and left
            // them all). The start lock stays, held: a start waiting on it finds no record.
            Err(e) if e.disk_full() => {
                self.paths.remove_all_but_lock();
                store.remove(&self.id)?
            }
            r => r?,
        };
        self.paths.remove_all();
        // Another delete (or a prune) that held the lock before us had done it: one of them
        // says it deleted the sandbox, the others that it is not there.
        if !removed {
            return Err(Error::NotFound(self.id.clone()));
        }
        tracing::debug!("phase: deleted");
        Ok(())
    }

    /// Whether neither the sandbox's recorded supervisor nor its VMM runs (a record that
    /// cannot be read counts as something running).
    fn nothing_runs(&self) -> bool {
        let rec = Store::open(&self.dirs.data).and_then(|s| s.get(&self.id));
        matches!(rec, Ok(None))
            || matches!(rec, Ok(Some(r)) if !r.supervisor.is_some_and(|p| p.alive()) && !r.vmm.is_some_and(|p| p.alive()))
    }

    /// The record as users see it, and the ports it has exposed now (those of `port_forwards`
    /// whose host port was picked at start included).
    pub async fn info(&self) -> Result<serde_json::Value> {
        let rec = self.record()?;
        record_json(&rec, &self.paths, &Store::open(&self.dirs.data)?)
    }
}

/// Records as `list --json` shows them, each as `info` does.
pub fn records_json(dirs: &Dirs, recs: &[Record]) -> Result<Vec<serde_json::Value>> {
    let store = Store::open(&dirs.data)?;
    recs.iter().map(|r| record_json(r, &SandboxPaths::new(dirs, &r.id), &store)).collect()
}

/// A record as users see it (`info`, `list --json`): env keys, never values; the exposed
/// ports of a live one.
fn record_json(rec: &Record, paths: &SandboxPaths, store: &Store) -> Result<serde_json::Value> {
    let ports = if rec.state.is_live() { store.ports(&rec.id)? } else { Vec::new() };
    let ports: Vec<_> = ports.iter().map(|(g, h)| serde_json::json!({ "guest": g, "host": h })).collect();
    Ok(serde_json::json!({
        "id": rec.id,
        "state": rec.state,
        "ephemeral": rec.ephemeral,
        "vcpu_count": rec.config.vcpu_count,
        "memory_mib": rec.config.memory,
        "kernel_path": rec.config.kernel_path,
        "initrd_path": rec.config.initrd_path,
        "rootfs_path": rec.config.rootfs_path,
        // (A named image's disk is its own copy, made at its first start: `rootfs_path` is
        // for a disk the user gave.)
        "image": rec.config.image,
        "disk_size_mib": rec.config.disk_size_mib,
        "env_keys": rec.config.env_vars.keys().collect::<Vec<_>>(),
        "supervisor_pid": rec.supervisor.map(|p| p.pid),
        "vmm_pid": rec.vmm.map(|p| p.pid),
        "created_at": rec.created_at,
        // (Its settings above are then the defaults, not its own: see `Record::damaged`.)
        "error": match rec.damaged {
            true => Some("its settings in the state database do not parse (the file was damaged): delete it".to_string()),
            false => rec.error.clone(),
        },
        "damaged": rec.damaged,
        "network": rec.config.network,
        // What it actually got: NAT (with its address) or, without a lease, user/none.
        "network_mode": match (rec.lease, rec.config.network.as_deref()) {
            (Some(_), _) => "nat",
            (None, Some(fixed @ ("none" | "nat" | "user"))) => fixed,
            (None, _) if rec.state.is_live() => "user",
            (None, _) => "unset",
        },
        "guest_ip": rec.lease.map(|l| crate::net::Lease(l).guest().to_string()),
        "internet_settings": rec.config.internet_settings,
        // Host directories are the caller's own paths, no secret: where each is in the guest.
        "mounts": rec.config.workspace_mounts.iter().map(|m| serde_json::json!({
            "host": m.host,
            "guest": m.guest_path(),
            "writable": rec.config.writable_mounts,
        })).collect::<Vec<_>>(),
        "console_log": paths.console,
        "ports": ports,
    }))
}

/// A task that ends with its owner: a command whose stdin is still open when it ends (a
/// terminal, a pipe that never closes) must not keep reading it.
struct Stopping(tokio::task::JoinHandle<()>);

impl Drop for Stopping {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Send `input` as the stream's stdin, then close it; at most `window` bytes ahead of what the
/// command has taken. Stopped between frames when the returned guard goes: an abort can only
/// land at an await, and no frame is cut in half, because each send runs to its end on a task of
/// its own.
fn feed(conn: Arc<crate::conn::Conn>, id: u32, mut input: Input, window: Arc<tokio::sync::Semaphore>) -> Stopping {
    use tokio::io::AsyncReadExt;
    Stopping(tokio::spawn(async move {
        let mut buf = vec![0u8; smolvm_proto::CHUNK];
        loop {
            let n = match input.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            match window.acquire_many(n as u32).await {
                Ok(permits) => permits.forget(),
                Err(_) => return,
            }
            if conn.send_detached(id, Request::Stdin(buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
        let _ = conn.send_detached(id, Request::StdinClose).await;
    }))
}

/// A control request's failure as the supervisor put it (an error's text: the reply carries no
/// code), as the error it was: its bound running out, the guest agent failing (a restored
/// guest's greeting), or else the host's own trouble (QEMU, the disk).
fn control_failure(what: &str, message: &str) -> Error {
    let timeout = message
        .strip_prefix("Operation '")
        .and_then(|rest| rest.split_once("' timed out after "))
        .and_then(|(operation, secs)| Some((operation, secs.strip_suffix('s')?.parse::<f64>().ok()?)));
    if let Some((operation, seconds)) = timeout {
        return Error::Timeout { operation: operation.to_string(), seconds };
    }
    if let Some(why) = message.strip_prefix("guest agent: ") {
        return Error::Guest(format!("{what}: {why}"));
    }
    let why = message.strip_prefix("host: ").unwrap_or(message);
    Error::Reported { code: "host", message: format!("{what} failed: {why}") }
}

/// A file removed when this goes (on every return and error path).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn reply_error(what: &str, reply: Reply) -> Error {
    match reply {
        Reply::Error { kind: ErrorKind::Invalid, message } => Error::Guest(format!("{what}: {message}")),
        Reply::Error { message, .. } => Error::Guest(format!("{what}: {message}")),
        other => Error::Guest(format!("{what}: unexpected reply {}", other.kind())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcg_guest_resumes_only_where_the_tsc_runs_at_its_rate() {
        assert_eq!(tsc_mismatch(2_596_085, 2_596_120), None);
        assert_eq!(tsc_mismatch(2_600_000, 2_612_000), None);
        assert_eq!(
            tsc_mismatch(2_600_000, 2_000_000).as_deref(),
            Some("it was saved under TCG on a host whose TSC runs at 2600.0 MHz, and this one's runs at 2000.0 MHz: its clock would run at 77 % of real time")
        );
    }

    #[test]
    fn a_logs_tail_keeps_the_guests_bytes() {
        let log = b"one\r\ntwo \xff\r\nthree";
        assert_eq!(last_lines_of(log, 2), b"two \xff\r\nthree");
        assert_eq!(last_lines_of(b"a\nb\n", 1), b"b\n");
        assert_eq!(last_lines_of(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines_of(b"a\nb\n", 0), b"");
        assert_eq!(last_lines_of(b"", 3), b"");
    }

    #[test]
    fn a_download_goes_through_links_and_never_replaces_a_device() {
        use std::os::unix::fs::symlink;
        let t = tempfile::tempdir().unwrap();
        let p = |n: &str| t.path().join(n);
        std::fs::write(p("file"), "x").unwrap();
        symlink("file", p("l1")).unwrap();
        symlink("l1", p("l2")).unwrap();
        assert_eq!(download_destination(p("l2")).unwrap(), p("file"));
        // A chain ending nowhere makes its last target, not a file in place of a link.
        symlink("l4", p("l3")).unwrap();
        symlink("sub/../missing", p("l4")).unwrap();
        assert_eq!(download_destination(p("l3")).unwrap(), p("sub/../missing"));
        assert_eq!(download_destination(p("new")).unwrap(), p("new"));
        symlink("loop-b", p("loop-a")).unwrap();
        symlink("loop-a", p("loop-b")).unwrap();
        let err = download_destination(p("loop-a")).unwrap_err().to_string();
        assert!(err.starts_with("invalid local_path: ") && err.contains("too many others"), "{err}");
        symlink("/dev/null", p("null")).unwrap();
        let err = download_destination(p("null")).unwrap_err().to_string();
        assert_eq!(err, "invalid local_path: /dev/null is not a regular file or a directory (a download writes one)");
    }

    #[test]
    fn the_supervisor_keeps_no_variable_that_is_not_its_own() {
        for kept in ["SMOLVM_LOG", "SMOLVM_ACCEL", "PATH", "HOME", "XDG_STATE_HOME", "TMPDIR", "CARGO_HOME"] {
            assert!(supervisor_keeps(kept.as_ref()), "{kept}");
        }
        for dropped in ["OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "TOKEN", "smolvm_lower", "SSH_AUTH_SOCK"] {
            assert!(!supervisor_keeps(dropped.as_ref()), "{dropped}");
        }
    }

    /// A process that has exited: its identity can no longer be alive.
    fn dead_process() -> ProcId {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let id = ProcId::of(child.id() as i32).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        id
    }

    /// A snapshot whose maker still runs is "being made", not missing; the leftover of a maker
    /// that died is missing.
    #[test]
    fn deleting_a_snapshot_still_being_made_says_so() {
        let data = tempfile::tempdir().unwrap();
        let dirs = Dirs { data: data.path().to_path_buf(), images: data.path().join("images") };
        let dir = snapshot_dir(&dirs, "half");
        crate::snapshot_files::claim(&dir, "half").unwrap();
        let err = delete_snapshot(&dirs, "half").unwrap_err().to_string();
        assert!(err.contains("snapshot 'half' is still being made"), "{err}");
        let dead = dead_process();
        std::fs::write(dir.join("making"), format!("{} {}", dead.pid, dead.start)).unwrap();
        assert!(matches!(delete_snapshot(&dirs, "half"), Err(Error::SnapshotNotFound(_))));
    }

    /// A data directory too long for the agent's socket is refused at create, by name and
    /// with the length that fits; one byte shorter fits.
    #[test]
    fn a_data_dir_too_long_for_its_sockets_is_refused() {
        let at = |len: usize| {
            let base = format!("/tmp/smolvm-sockpath-{}-", std::process::id());
            let data = std::path::PathBuf::from(format!("{base}{}", "x".repeat(len - base.len())));
            let dirs = Dirs { data: data.clone(), images: data.join("images") };
            let made = Sandbox::create_in(dirs, VmConfig { vm_id: Some("p".into()), ..Default::default() }, false);
            // Refused before anything is made: no directory, no database.
            assert_eq!(data.exists(), made.is_ok());
            let _ = std::fs::remove_dir_all(&data);
            made.map(|_| ()).map_err(|e| e.to_string())
        };
        let err = at(76).unwrap_err();
        assert!(err.starts_with("invalid SMOLVM_DATA_DIR: /tmp/smolvm-sockpath-"), "{err}");
        assert!(err.ends_with(" is too long for Unix socket paths (keep it to 75 bytes or fewer)"), "{err}");
        assert_eq!(at(75), Ok(()));
    }

    #[test]
    fn a_command_the_guest_cannot_start_is_refused_by_name() {
        let opts = RunOptions::default();
        assert!(check_run(&"x".repeat(MAX_COMMAND), &opts).is_ok());
        let long = check_run(&"x".repeat(MAX_COMMAND + 1), &opts).unwrap_err();
        assert_eq!(
            long.to_string(),
            "invalid command: 131072 bytes is too long: at most 131071 (Linux's limit on one argument); pass a longer script on stdin to `sh -s`"
        );
        assert_eq!(check_run("echo a\0b", &opts).unwrap_err().to_string(), "invalid command: must not contain a NUL byte");
        assert_eq!(check_run(" \n", &opts).unwrap_err().to_string(), "invalid command: must not be empty");
    }

    #[test]
    fn a_control_failure_keeps_its_kind() {
        let timeout = control_failure("pause", "Operation 'pause' timed out after 1.5s");
        assert!(matches!(&timeout, Error::Timeout { operation, seconds } if operation == "pause" && *seconds == 1.5), "{timeout:?}");
        let guest = control_failure("resume", "guest agent: the greeting failed");
        assert_eq!((guest.code(), guest.to_string()), ("guest", "guest agent: resume: the greeting failed".to_string()));
        let host = control_failure("snapshot", "host: saving the VM state failed: Unable to write to file: No space left on device");
        assert_eq!(host.code(), "host");
        assert_eq!(host.to_string(), "snapshot failed: saving the VM state failed: Unable to write to file: No space left on device");
    }

    #[test]
    fn a_lock_taken_for_a_sandbox_that_is_gone_leaves_no_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = Dirs { data: tmp.path().to_path_buf(), images: tmp.path().join("images") };
        let paths = SandboxPaths::new(&dirs, "gone");
        let store = Store::open(&dirs.data).unwrap();
        let lock = paths.start_lock(false).unwrap().unwrap();
        assert!(paths.dir.exists(), "the lock makes its directory");
        paths.forget_lock(&store, "gone");
        drop(lock);
        assert!(!paths.dir.exists());
        // A directory with anything else in it is somebody's: it stays.
        let lock = paths.start_lock(false).unwrap().unwrap();
        std::fs::write(paths.dir.join("console.log"), "").unwrap();
        paths.forget_lock(&store, "gone");
        drop(lock);
        assert!(paths.dir.join("console.log").exists());
        // A sandbox of that name made meanwhile keeps its directory and lock.
        std::fs::remove_file(paths.dir.join("console.log")).unwrap();
        let lock = paths.start_lock(false).unwrap().unwrap();
        store.insert("gone", &VmConfig::default(), None).unwrap();
        paths.forget_lock(&store, "gone");
        assert!(paths.lock.exists());
        // A start waiting on a lock whose file its holder then removes locks the file that is
        // there now, not the removed one.
        let (locked, release) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let waiter = {
            let (paths, locked, release) = (paths.clone(), locked.0, release.1);
            std::thread::spawn(move || {
                let l = paths.start_lock(true).unwrap().unwrap();
                locked.send(()).unwrap();
                let _ = release.recv();
                drop(l);
            })
        };
        // (Time for the waiter to block on the lock; one that came later would find no file
        // and make it, which this test would not tell apart.)
        std::thread::sleep(std::time::Duration::from_millis(200));
        std::fs::remove_file(&paths.lock).unwrap();
        drop(lock);
        locked.1.recv_timeout(std::time::Duration::from_secs(30)).expect("the waiter never got the lock");
        assert!(paths.lock.exists(), "the waiter made the file again");
        assert!(paths.start_lock(false).unwrap().is_none(), "and holds the lock on it");
        release.0.send(()).unwrap();
        waiter.join().unwrap();
    }

    #[test]
    fn a_dead_supervisor_is_reaped_only_outside_a_start() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = Dirs { data: tmp.path().join("data"), images: tmp.path().join("images") };
        let store = Store::open(&dirs.data).unwrap();
        store.insert("s", &VmConfig::default(), None).unwrap();
        let gone = dead_process();
        store.set_running("s", gone, gone).unwrap();
        let paths = SandboxPaths::new(&dirs, "s");
        std::fs::create_dir_all(&paths.dir).unwrap();
        std::fs::write(&paths.ctl, "").unwrap();
        // Another process is starting it again: what this list read may be stale, and the
        // socket may be the new supervisor's. Nothing is touched.
        let start = paths.start_lock(true).unwrap().unwrap();
        let listed = list(&dirs).unwrap();
        assert_eq!(listed[0].state, State::Running);
        assert!(paths.ctl.exists());
        drop(start);
        // No start in progress: the dead supervisor is recorded and its leftovers go.
        let listed = list(&dirs).unwrap();
        assert_eq!(listed[0].state, State::Error);
        assert_eq!(listed[0].error.as_deref(), Some("the sandbox's supervisor exited unexpectedly"));
        assert!(!paths.ctl.exists());
    }
}
