//! What a sandbox is made of, and the host settings smolvm reads. The only place that says
//! what is allowed.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const DEFAULT_VCPUS: u32 = 2;
pub const DEFAULT_MEMORY_MIB: u32 = 512;
pub const VCPU_RANGE: (u32, u32) = (1, 32);
pub const MEMORY_RANGE: (u32, u32) = (128, 16384);

/// A sandbox's configuration. Serialized into the state database (which is 0600: env values
/// are secrets and live nowhere else on the host).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    pub vm_id: Option<String>,
    pub vcpu_count: u32,
    /// MiB.
    pub memory: u32,
    pub kernel_path: Option<PathBuf>,
    pub initrd_path: Option<PathBuf>,
    /// An ext4 image attached as a virtio disk and made `/` by the agent.
    pub rootfs_path: Option<PathBuf>,
    /// Appended to smolvm's kernel command line.
    pub boot_args: Option<String>,
    pub env_vars: BTreeMap<String, String>,
    /// firecracker | qemu | auto; unset means `SMOLVM_BACKEND`, then auto.
    pub backend: Option<String>,
    /// nat | user | none; unset means nat where this host can (root, /dev/net/tun, nft),
    /// else user.
    pub network: Option<String>,
    pub internet_settings: Option<InternetSettings>,
    /// Guest ports exposed on 127.0.0.1 when the sandbox starts.
    pub port_forwards: Vec<PortForward>,
    /// A named image (`default`, `alpine-ssh`, `debian-ssh` or a saved custom recipe); its root
    /// disk is built on first use. Exclusive with `rootfs_path`.
    pub image: Option<String>,
    /// MiB: grows this sandbox's root disk (its own copy-on-write layer; the base never changes).
    pub disk_size_mib: Option<u32>,
    /// agent (default; `vsock` is accepted as its synonym) | ssh: how `run` and file transfers
    /// reach the guest.
    pub comm_channel: Option<String>,
    /// An OpenSSH public key allowed to log in as root, beside smolvm's own per-user key.
    pub ssh_public_key: Option<String>,
    /// Host directories shared into the guest (9p), read-only unless `writable_mounts`.
    pub workspace_mounts: Vec<Mount>,
    pub writable_mounts: bool,
}

/// A host directory seen in the guest at `guest` (default `/workspace/<its name>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    pub host: PathBuf,
    #[serde(default)]
    pub guest: Option<String>,
}

/// At most this many mounts per sandbox: each is a virtio device, and microvm has 8 slots, of
/// which the agent channel, the NIC, a root disk and the balloon take up to four.
pub const MAX_MOUNTS: usize = 4;

/// A guest path's longest, in bytes: the paths travel on the kernel command line (2 KiB).
pub const MAX_GUEST_PATH: usize = 100;

/// Guest directories a mount may not cover or sit in: the system's own, the filesystems the
/// agent mounts (a share under /tmp would be hidden by its tmpfs), and root's SSH keys (which
/// the SSH set-up writes). `/root` itself is kept too; directories in it are fine. `/init` and
/// `/linuxrc` are files of the default image (the agent, busybox), where no directory can be.
const RESERVED_GUEST_DIRS: &[&str] = &[
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/init",
    "/lib",
    "/lib64",
    "/linuxrc",
    "/proc",
    "/root/.ssh",
    "/run",
    "/sbin",
    "/sys",
    "/tmp",
    "/usr",
    "/var",
];

impl Mount {
    /// `HOST[:GUEST]`, as the CLI's `--mount` takes it. A guest path is absolute, so the split
    /// is at the last `:/`: a host path may hold colons (`/data/a:b`, or `/data/a:/b:/mnt/b`
    /// with its guest path given).
    pub fn parse(spec: &str) -> Result<Mount> {
        let (host, guest) = match spec.rfind(":/") {
            Some(i) => (&spec[..i], Some(spec[i + 1..].to_string())),
            None => (spec, None),
        };
        if host.is_empty() {
            return Err(Error::validation("mounts", format!("{spec:?} names no host directory (use HOST[:GUEST])")));
        }
        Ok(Mount { host: PathBuf::from(host), guest })
    }

    /// For a host directory that is not there: `/a:mnt` reads as one host path, so say how a
    /// guest path is written.
    pub fn colon_hint(&self) -> &'static str {
        if self.guest.is_none() && self.host.to_string_lossy().contains(':') {
            " (a guest path is absolute: HOST:/GUEST)"
        } else {
            ""
        }
    }

    /// Where it appears in the guest.
    pub fn guest_path(&self) -> String {
        match &self.guest {
            Some(g) => g.clone(),
            None => format!("/workspace/{}", self.host.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()),
        }
    }
}

/// Checks each mount: an existing host directory, an absolute, clean guest path outside the
/// system's directories, none inside another.
pub(crate) fn validate_mounts(mounts: &[Mount]) -> Result<()> {
    if mounts.len() > MAX_MOUNTS {
        return Err(Error::validation("mounts", format!("{} mounts given (allowed at most {MAX_MOUNTS})", mounts.len())));
    }
    let within = |inner: &str, outer: &str| inner == outer || inner.starts_with(&format!("{outer}/"));
    let mut seen: Vec<String> = Vec::new();
    for m in mounts {
        if !m.host.is_absolute() || !m.host.is_dir() {
            return Err(Error::validation(
                "mounts",
                format!("{} is not an existing directory given by its absolute path{}", m.host.display(), m.colon_hint()),
            ));
        }
        if m.host.to_str().is_none() {
            return Err(Error::validation("mounts", format!("{} is not UTF-8", m.host.display())));
        }
        // QEMU, which runs as this user, would fail the boot on it with its own words.
        if let Err(e) = std::fs::read_dir(&m.host) {
            return Err(Error::validation("mounts", format!("{} cannot be read by this user: {e}", m.host.display())));
        }
        if m.host.file_name().is_none() && m.guest.is_none() {
            return Err(Error::validation("mounts", format!("{} needs a guest path (HOST:GUEST)", m.host.display())));
        }
        let guest = m.guest_path();
        // Each refusal says the rule it broke.
        if guest == "/" {
            return Err(Error::validation(
                "mounts",
                "guest path \"/\" is the guest's root, which a mount cannot replace (use e.g. /workspace or /mnt)",
            ));
        }
        if guest.chars().any(|c| c.is_control()) {
            return Err(Error::validation(
                "mounts",
                format!("guest path {guest:?} contains a control character (allowed: printable characters)"),
            ));
        }
        let clean =
            guest.starts_with('/') && !guest.ends_with('/') && guest.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..");
        if !clean {
            return Err(Error::validation(
                "mounts",
                format!("guest path {guest:?} must be absolute, without '.', '..', '//' or a trailing '/'"),
            ));
        }
        if guest.len() > MAX_GUEST_PATH {
            return Err(Error::validation("mounts", format!("guest path {guest:?} is longer than {MAX_GUEST_PATH} bytes")));
        }
        let reserved = RESERVED_GUEST_DIRS.iter().find(|r| within(&guest, r)).or(["/root"].iter().find(|r| guest == **r));
        if let Some(r) = reserved {
            return Err(Error::validation(
                "mounts",
                format!("guest path {guest:?} is in {r}, which the guest system needs (use e.g. /workspace or /mnt)"),
            ));
        }
        // One inside another: the outer would hide the inner, or the inner's mount point be
        // made in the outer's host directory.
        if let Some(other) = seen.iter().find(|o| within(&guest, o) || within(o, &guest)) {
            let what = if *other == guest { "two mounts at guest path".to_string() } else { format!("mounts may not nest: {other:?} and") };
            return Err(Error::validation("mounts", format!("{what} {guest:?}")));
        }
        seen.push(guest);
    }
    Ok(())
}

pub const DISK_SIZE_RANGE: (u32, u32) = (64, 1024 * 1024);

/// Which channel `run` and file transfers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Agent,
    Ssh,
}

impl Channel {
    pub fn parse(s: Option<&str>) -> Result<Channel> {
        match s.map(str::to_ascii_lowercase).as_deref() {
            None | Some("") | Some("agent") | Some("vsock") => Ok(Channel::Agent),
            Some("ssh") => Ok(Channel::Ssh),
            Some(other) => Err(Error::validation("comm_channel", format!("{other:?} is not a channel (allowed: agent, vsock, ssh)"))),
        }
    }
}

/// What a sandbox may reach outside itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InternetSettings {
    /// open (default) | off | restricted
    pub mode: String,
    /// For `restricted`: names (and their subdomains) the guest may resolve and reach.
    pub allowed_domains: Vec<String>,
    /// For `restricted`: IPv4 networks the guest may reach, as `a.b.c.d/n`.
    pub allowed_cidrs: Vec<String>,
}

impl Default for InternetSettings {
    fn default() -> Self {
        InternetSettings { mode: "open".into(), allowed_domains: vec![], allowed_cidrs: vec![] }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    pub guest: u16,
    /// 127.0.0.1 port on the host; unset picks a free one.
    pub host: Option<u16>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vm_id: None,
            vcpu_count: DEFAULT_VCPUS,
            memory: DEFAULT_MEMORY_MIB,
            kernel_path: None,
            initrd_path: None,
            rootfs_path: None,
            boot_args: None,
            env_vars: BTreeMap::new(),
            backend: None,
            network: None,
            internet_settings: None,
            port_forwards: Vec::new(),
            image: None,
            disk_size_mib: None,
            comm_channel: None,
            ssh_public_key: None,
            workspace_mounts: Vec::new(),
            writable_mounts: false,
        }
    }
}

/// Env values are secrets: Debug shows only the keys.
impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("vm_id", &self.vm_id)
            .field("vcpu_count", &self.vcpu_count)
            .field("memory", &self.memory)
            .field("kernel_path", &self.kernel_path)
            .field("initrd_path", &self.initrd_path)
            .field("rootfs_path", &self.rootfs_path)
            .field("boot_args", &self.boot_args)
            .field("env_vars", &self.env_vars.keys().collect::<Vec<_>>())
            .field("backend", &self.backend)
            .field("network", &self.network)
            .field("internet_settings", &self.internet_settings)
            .field("port_forwards", &self.port_forwards)
            .field("image", &self.image)
            .field("disk_size_mib", &self.disk_size_mib)
            .field("comm_channel", &self.comm_channel)
            .field("ssh_public_key", &self.ssh_public_key.is_some())
            .field("workspace_mounts", &self.workspace_mounts)
            .field("writable_mounts", &self.writable_mounts)
            .finish()
    }
}

/// `^[a-z0-9][a-z0-9_-]{0,62}[a-z0-9]$` or a single `[a-z0-9]`: sandbox ids and image names.
pub fn valid_name(id: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let inner = |c: char| alnum(c) || c == '_' || c == '-';
    match id.len() {
        0 => false,
        1 => id.chars().all(alnum),
        2..=64 => {
            let b: Vec<char> = id.chars().collect();
            alnum(b[0]) && alnum(b[b.len() - 1]) && b.iter().all(|c| inner(*c))
        }
        _ => false,
    }
}

pub fn validate_vm_id(id: &str) -> Result<()> {
    let ok = valid_name(id);
    if ok {
        Ok(())
    } else {
        Err(Error::validation(
            "vm_id",
            format!("{id:?} is not allowed: use 1-64 characters of a-z, 0-9, '_' and '-', starting and ending with a letter or digit"),
        ))
    }
}

fn check_file(field: &'static str, path: &Option<PathBuf>) -> Result<()> {
    let Some(p) = path else { return Ok(()) };
    // (What it is first: opening a FIFO would wait for a writer.)
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() && std::fs::File::open(p).is_ok() => {
            // (QEMU's own words for an empty kernel were "No such file or directory".)
            if m.len() == 0 {
                return Err(Error::validation(field, format!("{} is empty", p.display())));
            }
            Ok(())
        }
        _ => Err(Error::validation(field, format!("{} is not a readable file", p.display()))),
    }
}

/// A kernel QEMU can boot is an ELF `vmlinux` (PVH) or a bzImage (`vmlinuz`, its setup header
/// says "HdrS"). Anything else failed in QEMU with words about something else ("linux kernel
/// too old to load a ram disk").
fn check_kernel(path: &std::path::Path) -> Result<()> {
    use std::io::Read;
    let mut head = Vec::with_capacity(0x206);
    std::fs::File::open(path)
        .and_then(|f| f.take(0x206).read_to_end(&mut head))
        .map_err(|e| Error::validation("kernel_path", format!("{}: {e}", path.display())))?;
    if head.starts_with(b"\x7fELF") || head.get(0x202..0x206) == Some(b"HdrS".as_slice()) {
        return Ok(());
    }
    Err(Error::validation(
        "kernel_path",
        format!("{} is not a Linux kernel (allowed: an ELF vmlinux or a bzImage such as /boot/vmlinuz-*)", path.display()),
    ))
}

/// The range check of a whole-number field, on a value as wide as callers may hand over
/// (Python's ints are unbounded: `memory=2**70` is out of range, not a type error).
pub fn check_whole(field: &str, value: i128) -> Result<()> {
    match whole_field(field) {
        Some((_, (lo, hi), _)) if (i128::from(lo)..=i128::from(hi)).contains(&value) => Ok(()),
        _ => Err(out_of_range(field, &value)),
    }
}

/// The error for a whole-number field's value outside its range, shown as the caller wrote it
/// (one too large even for `check_whole`).
pub fn out_of_range(field: &str, shown: &dyn std::fmt::Display) -> Error {
    match whole_field(field) {
        Some((field, (lo, hi), unit)) => Error::validation(field, format!("{shown}{unit} is out of range (allowed {lo}..={hi}{unit})")),
        None => Error::Host(format!("{field} is not a whole-number field of VmConfig")),
    }
}

fn whole_field(field: &str) -> Option<(&'static str, (u32, u32), &'static str)> {
    match field {
        "vcpu_count" => Some(("vcpu_count", VCPU_RANGE, "")),
        "memory" => Some(("memory", MEMORY_RANGE, " MiB")),
        "disk_size_mib" => Some(("disk_size_mib", DISK_SIZE_RANGE, " MiB")),
        _ => None,
    }
}

impl VmConfig {
    /// A root disk (a named image's or `rootfs_path`), which may carry an SSH server; the
    /// default image runs from memory.
    pub fn has_root_disk(&self) -> bool {
        self.rootfs_path.is_some() || self.image.as_deref().is_some_and(|i| i != "default")
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(id) = &self.vm_id {
            validate_vm_id(id)?;
        }
        for (field, value) in [("vcpu_count", self.vcpu_count), ("memory", self.memory)] {
            check_whole(field, value.into())?;
        }
        check_file("kernel_path", &self.kernel_path)?;
        if let Some(k) = &self.kernel_path {
            check_kernel(k)?;
        }
        check_file("initrd_path", &self.initrd_path)?;
        check_file("rootfs_path", &self.rootfs_path)?;
        if let Some(args) = &self.boot_args {
            check_boot_args(args)?;
        }
        if let Some(b) = &self.backend {
            // (Refused here, not at the start: a backend this build cannot run is bad input.)
            Backend::resolve(Some(b))?;
        }
        smolvm_proto::env::validate_vars(&self.env_vars)?;
        if let Some(n) = &self.network {
            crate::net::Mode::parse(n)?;
        }
        if let Some(i) = &self.internet_settings {
            crate::net::validate_internet(i, self.network.as_deref())?;
        }
        for (i, p) in self.port_forwards.iter().enumerate() {
            if p.guest == 0 {
                return Err(Error::validation("port_forwards", "guest port 0 is not a port (allowed 1..=65535)"));
            }
            // (Bound as asked, port 0 is one the kernel picks, which user-mode networking
            // would then forward unknown to anyone.)
            if p.host == Some(0) {
                return Err(Error::validation("port_forwards", "host port 0 is not a port (allowed 1..=65535, or none for a free one)"));
            }
            // (User-mode networking would forward both and list one; NAT kept one silently.)
            let before = &self.port_forwards[..i];
            if before.iter().any(|q| q.guest == p.guest) {
                return Err(Error::validation(
                    "port_forwards",
                    format!("guest port {} is given twice (forward each guest port once)", p.guest),
                ));
            }
            if let Some(h) = p.host.filter(|h| before.iter().any(|q| q.host == Some(*h))) {
                return Err(Error::validation("port_forwards", format!("host port {h} is given twice")));
            }
        }
        if !self.port_forwards.is_empty() && self.network.as_deref() == Some("none") {
            return Err(Error::validation("port_forwards", "this sandbox has no network (network 'none')"));
        }
        if let Some(name) = &self.image {
            crate::recipe::validate_name(name)?;
            if self.rootfs_path.is_some() && name != "default" {
                return Err(Error::validation("image", "give either image or rootfs_path, not both"));
            }
        }
        if let Some(size) = self.disk_size_mib {
            check_whole("disk_size_mib", size.into())?;
            if !self.has_root_disk() {
                return Err(Error::validation(
                    "disk_size_mib",
                    "the default image runs from memory and has no disk to size; pick an image with a root disk (e.g. debian-ssh) or a rootfs_path",
                ));
            }
        }
        Channel::parse(self.comm_channel.as_deref())?;
        if let Some(key) = &self.ssh_public_key {
            crate::ssh::validate_public_key(key)?;
        }
        validate_mounts(&self.workspace_mounts)?;
        if self.writable_mounts && self.workspace_mounts.is_empty() {
            return Err(Error::validation("writable_mounts", "there are no mounts to make writable"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Qemu,
    Firecracker,
    Auto,
}

impl Backend {
    pub fn parse(s: &str) -> Result<Backend> {
        Backend::parse_for(s, "backend")
    }

    fn parse_for(s: &str, field: &'static str) -> Result<Backend> {
        match s.trim().to_ascii_lowercase().as_str() {
            "qemu" => Ok(Backend::Qemu),
            "firecracker" => Ok(Backend::Firecracker),
            "auto" | "" => Ok(Backend::Auto),
            other => Err(Error::validation(field, format!("{other:?} is not a backend (allowed: firecracker, qemu, auto)"))),
        }
    }

    /// Which backend actually runs: the config's choice, else `SMOLVM_BACKEND`, else auto.
    /// Auto picks what can run here; only QEMU is built so far. An error names where the
    /// choice came from (the variable, set once in a shell, is easily forgotten).
    pub fn resolve(config: Option<&str>) -> Result<Backend> {
        let env = std::env::var("SMOLVM_BACKEND").ok();
        let (chosen, field) = match (config, env.as_deref()) {
            (Some(s), _) => (Backend::parse_for(s, "backend")?, "backend"),
            (None, Some(s)) => (Backend::parse_for(s, "SMOLVM_BACKEND")?, "SMOLVM_BACKEND"),
            (None, None) => (Backend::Auto, "backend"),
        };
        match chosen {
            Backend::Qemu | Backend::Auto => Ok(Backend::Qemu),
            Backend::Firecracker => {
                Err(Error::validation(field, "firecracker is not supported by this build yet (allowed now: qemu, auto)"))
            }
        }
    }
}

/// How the host reaches the guest agent under QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A virtio-serial port on a Unix socket: needs nothing from the host kernel; the default.
    Serial,
    /// vsock, through a vhost-user device served by `vhost-device-vsock`; the agent connects to
    /// the host's `<uds>_1024`, as under Firecracker. Such a VM cannot be snapshotted.
    Vsock,
}

/// `SMOLVM_AGENT_TRANSPORT`: `serial` (default) or `vsock`.
pub fn agent_transport() -> Result<Transport> {
    parse_transport(std::env::var("SMOLVM_AGENT_TRANSPORT").ok().as_deref())
}

fn parse_transport(value: Option<&str>) -> Result<Transport> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("serial") => Ok(Transport::Serial),
        Some("vsock") => Ok(Transport::Vsock),
        Some(other) => Err(Error::validation("SMOLVM_AGENT_TRANSPORT", format!("{other:?} is not a transport (allowed: serial, vsock)"))),
    }
}

/// The longest wait anyone may ask for (a year). Longer ones can only mean "never", and would
/// overflow the clocks that deadlines are reckoned on.
pub const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

/// A wait given as a number of seconds (a CLI flag, a Python argument): finite, positive and
/// at most [`MAX_WAIT`], else an error that names `field`.
pub fn seconds(value: f64, field: &'static str) -> Result<std::time::Duration> {
    // (Infinity is positive: past the bound, as a huge number is.)
    if value.is_nan() || value <= 0.0 {
        return Err(Error::validation(field, "must be a positive number of seconds"));
    }
    let d = std::time::Duration::from_secs_f64(value.min(MAX_WAIT.as_secs_f64() + 1.0));
    check_wait(d, field)?;
    Ok(d)
}

/// As `seconds`, where 0 means at once (a stop's grace for its guest).
pub fn seconds_or_zero(value: f64, field: &'static str) -> Result<std::time::Duration> {
    if value == 0.0 {
        return Ok(std::time::Duration::ZERO);
    }
    if value.is_nan() || value < 0.0 {
        return Err(Error::validation(field, "must be 0 or a positive number of seconds"));
    }
    seconds(value, field)
}

/// A wait is at most [`MAX_WAIT`].
pub fn check_wait(d: std::time::Duration, field: &'static str) -> Result<()> {
    if d > MAX_WAIT {
        return Err(Error::validation(field, format!("must be at most {} seconds (a year)", MAX_WAIT.as_secs())));
    }
    Ok(())
}

/// A boot's bound: one under a second fails every boot (`timed out after 0s`, before QEMU has
/// printed a line), so it is refused as commands' timeouts are.
pub fn check_boot_timeout(d: std::time::Duration) -> Result<()> {
    if d < std::time::Duration::from_secs(1) {
        return Err(Error::validation("boot_timeout", "must be at least 1 second"));
    }
    check_wait(d, "boot_timeout")
}

/// How long a pause, resume or port change may take, queued behind others included
/// (`SMOLVM_CONTROL_TIMEOUT`, seconds): a client that waits longer gets a timeout, and what it
/// asked for is then not done at all.
pub fn control_timeout() -> Result<std::time::Duration> {
    parse_control_timeout(std::env::var("SMOLVM_CONTROL_TIMEOUT").ok().as_deref())
}

fn parse_control_timeout(value: Option<&str>) -> Result<std::time::Duration> {
    match value.map(str::trim) {
        None | Some("") => Ok(std::time::Duration::from_secs(30)),
        Some(v) => match v.parse::<f64>() {
            Ok(s) if (1.0..=3600.0).contains(&s) => Ok(std::time::Duration::from_secs_f64(s)),
            _ => Err(Error::validation("SMOLVM_CONTROL_TIMEOUT", format!("{v:?} is not a number of seconds (allowed: 1 to 3600)"))),
        },
    }
}

/// The most `boot_args` may take of the kernel's command line (2048 bytes on x86): smolvm's
/// own settings and the devices QEMU adds need the rest. Past the end, the kernel cuts it
/// silently, and the devices went first (a guest without its NIC, or without its agent's port).
pub const BOOT_ARGS_MAX: usize = 384;

/// The kernel arguments smolvm sets for its agent: a user's would pass for them (an address
/// the host's side does not route, a channel the VMM does not offer).
const OUR_BOOT_ARGS: [&str; 5] = ["smolvm_hostname", "smolvm_root", "smolvm_net", "smolvm_channel", "smolvm_mounts"];

/// The names of a kernel command line's parameters, split as the kernel splits it: at spaces
/// outside double quotes, which are dropped (`"smolvm_net=…"` sets `smolvm_net`, and
/// `foo="a smolvm_net=b"` sets only `foo`).
fn boot_arg_keys(args: &str) -> Vec<String> {
    let (mut keys, mut word, mut quoted) = (Vec::new(), String::new(), false);
    for c in args.chars().chain(std::iter::once(' ')) {
        match c {
            '"' => quoted = !quoted,
            c if c.is_ascii_whitespace() && !quoted => {
                if !word.is_empty() {
                    keys.push(word.split('=').next().unwrap_or_default().to_string());
                    word.clear();
                }
            }
            c => word.push(c),
        }
    }
    keys
}

fn check_boot_args(args: &str) -> Result<()> {
    if args.contains('\n') || args.contains('\0') {
        return Err(Error::validation("boot_args", "must be one line"));
    }
    if args.len() > BOOT_ARGS_MAX {
        return Err(Error::validation(
            "boot_args",
            format!(
                "{} bytes is too long (allowed: up to {BOOT_ARGS_MAX}; the kernel's command line holds 2048, and smolvm's settings and QEMU's devices need the rest)",
                args.len()
            ),
        ));
    }
    if let Some(ours) = boot_arg_keys(args).into_iter().find(|k| OUR_BOOT_ARGS.contains(&k.as_str())) {
        return Err(Error::validation(
            "boot_args",
            format!("{ours} is smolvm's own setting, made from the sandbox's config (not allowed: {})", OUR_BOOT_ARGS.join(", ")),
        ));
    }
    Ok(())
}

/// `SMOLVM_SNAPSHOT_BANDWIDTH`: the MiB per second a full snapshot's state is written at, so
/// that saving a big sandbox need not take a shared host's disk from everything else; None is
/// no limit (the default: the CPUs are stopped while it is written).
pub fn snapshot_bandwidth() -> Result<Option<u64>> {
    parse_snapshot_bandwidth(std::env::var("SMOLVM_SNAPSHOT_BANDWIDTH").ok().as_deref())
}

fn parse_snapshot_bandwidth(value: Option<&str>) -> Result<Option<u64>> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) if v.eq_ignore_ascii_case("unlimited") => Ok(None),
        Some(v) => match v.parse::<u64>() {
            Ok(mib) if (1..=1_048_576).contains(&mib) => Ok(Some(mib)),
            // (0 is a whole number: said as out of range, not as no number.)
            Ok(_) => Err(Error::validation(
                "SMOLVM_SNAPSHOT_BANDWIDTH",
                format!("{v:?} MiB per second is out of range (allowed: 1 to 1048576, or unlimited)"),
            )),
            Err(_) => Err(Error::validation(
                "SMOLVM_SNAPSHOT_BANDWIDTH",
                format!("{v:?} is not a whole number of MiB per second (allowed: 1 to 1048576, or unlimited)"),
            )),
        },
    }
}

/// `SMOLVM_ACCEL` as asked (None: auto), a bad value said as bad input, as `doctor` says it too.
pub fn accel_setting() -> Result<Option<crate::vmm::Accel>> {
    crate::vmm::requested_accel().map_err(|m| Error::validation("SMOLVM_ACCEL", m.trim_start_matches("SMOLVM_ACCEL=").to_string()))
}

/// The settings each sandbox's supervisor reads from its environment when it starts, checked by
/// the starter: a bad value is the starter's error, not a dead sandbox.
pub fn check_supervisor_settings() -> Result<()> {
    accel_setting()?;
    control_timeout()?;
    snapshot_bandwidth()?;
    crate::net::dns_upstream_setting()?;
    crate::image::debian_kernel_asked()?;
    Ok(())
}

/// `1/true/yes/on` (any case) are true, `0/false/no/off` false, anything else the default.
pub fn env_flag(name: &str, default: bool) -> bool {
    match std::env::var(name).map(|v| v.trim().to_ascii_lowercase()) {
        Ok(v) if ["1", "true", "yes", "on"].contains(&v.as_str()) => true,
        Ok(v) if ["0", "false", "no", "off"].contains(&v.as_str()) => false,
        _ => default,
    }
}

/// Where state and images live: `SMOLVM_DATA_DIR`, else `$XDG_STATE_HOME/smolvm`, else
/// `~/.local/state/smolvm`; images in `SMOLVM_IMAGE_DIR`, else `<data dir>/images`.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub data: PathBuf,
    pub images: PathBuf,
}

/// Adds group and other write to the process's umask. What smolvm makes (the image cache, its
/// remembered figures, logs, snapshots) must not be writable by other users whatever the
/// caller's umask (000 made the cache world-writable, and later starts trust what is there).
/// For smolvm's own processes (the CLI, supervisors); a library caller's umask is its own.
pub fn restrict_umask() {
    use nix::sys::stat::{umask, Mode};
    let old = umask(Mode::from_bits_truncate(0o022));
    umask(old | Mode::S_IWGRP | Mode::S_IWOTH);
}

/// The user's home: `HOME` where it is an absolute path, else the account's own (a service
/// or `env -i` may run smolvm without `HOME`; the data directory must still be this user's,
/// not a guess such as /root).
fn home_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from).filter(|h| h.is_absolute()) {
        return home;
    }
    nix::unistd::User::from_uid(nix::unistd::Uid::effective())
        .ok()
        .flatten()
        .map(|u| u.dir)
        .filter(|d| d.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/"))
}

impl Dirs {
    pub fn from_env() -> Dirs {
        let data = std::env::var_os("SMOLVM_DATA_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            // The XDG base directory rules: a relative XDG_STATE_HOME is not one, and is ignored.
            .or_else(|| std::env::var_os("XDG_STATE_HOME").map(PathBuf::from).filter(|x| x.is_absolute()).map(|x| x.join("smolvm")))
            .unwrap_or_else(|| home_dir().join(".local/state/smolvm"));
        let images =
            std::env::var_os("SMOLVM_IMAGE_DIR").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| data.join("images"));
        // A relative path is taken from where the command runs, and made absolute here: the
        // supervisor, QEMU and the records then name the same files wherever they run, and a
        // sandbox's processes show its data directory in full (QEMU was given relative paths).
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        Dirs { data: absolute(data), images: absolute(images) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_args_are_one_line_short_and_leave_smolvms_settings_alone() {
        assert!(check_boot_args("quiet loglevel=3 smolvm_debug=1").is_ok());
        assert!(check_boot_args("foo=\"a smolvm_net=x\" smolvm_network=1").is_ok());
        assert_eq!(boot_arg_keys(" a=1  \"b=2 3\" c=\"x y\" d"), ["a", "b", "c", "d"]);
        assert!(check_boot_args(&"x".repeat(BOOT_ARGS_MAX)).is_ok());
        for (bad, why) in [
            ("a\nb".to_string(), "must be one line".to_string()),
            ("x".repeat(BOOT_ARGS_MAX + 1), format!("{} bytes is too long (allowed: up to {BOOT_ARGS_MAX};", BOOT_ARGS_MAX + 1)),
            ("quiet smolvm_net=10.9.9.2/30,10.9.9.1,10.9.9.1".to_string(), "smolvm_net is smolvm's own setting".to_string()),
            ("smolvm_channel".to_string(), "smolvm_channel is smolvm's own setting".to_string()),
            ("\"smolvm_net=10.9.9.2/30\"".to_string(), "smolvm_net is smolvm's own setting".to_string()),
        ] {
            let e = check_boot_args(&bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("invalid boot_args: {why}")), "{e}");
        }
    }

    #[test]
    fn a_wait_is_positive_finite_and_at_most_a_year() {
        assert_eq!(seconds(1.5, "timeout").unwrap(), std::time::Duration::from_millis(1500));
        assert_eq!(seconds(31_536_000.0, "timeout").unwrap(), MAX_WAIT);
        for bad in [0.0, -1.0, f64::NAN, f64::NEG_INFINITY] {
            assert_eq!(seconds(bad, "timeout").unwrap_err().to_string(), "invalid timeout: must be a positive number of seconds");
        }
        for huge in [31_536_001.0, 1e19, 1e308, f64::INFINITY] {
            assert_eq!(
                seconds(huge, "boot_timeout").unwrap_err().to_string(),
                "invalid boot_timeout: must be at most 31536000 seconds (a year)"
            );
        }
    }

    #[test]
    fn each_guest_and_host_port_is_forwarded_once() {
        let with = |ports: &[(u16, Option<u16>)]| VmConfig {
            port_forwards: ports.iter().map(|&(guest, host)| PortForward { guest, host }).collect(),
            ..Default::default()
        };
        assert!(with(&[(8000, None), (8001, Some(19000)), (8002, None)]).validate().is_ok());
        for (ports, message) in [
            (vec![(8000, None), (8000, Some(19000))], "guest port 8000 is given twice (forward each guest port once)"),
            (vec![(8000, None), (8000, None)], "guest port 8000 is given twice (forward each guest port once)"),
            (vec![(8000, Some(19000)), (8001, Some(19000))], "host port 19000 is given twice"),
            (vec![(8000, Some(0))], "host port 0 is not a port (allowed 1..=65535, or none for a free one)"),
        ] {
            assert_eq!(with(&ports).validate().unwrap_err().to_string(), format!("invalid port_forwards: {message}"));
        }
    }

    #[test]
    fn the_agent_transport_is_serial_unless_vsock_is_asked_for() {
        assert_eq!(parse_transport(None).unwrap(), Transport::Serial);
        assert_eq!(parse_transport(Some(" Serial ")).unwrap(), Transport::Serial);
        assert_eq!(parse_transport(Some("VSOCK")).unwrap(), Transport::Vsock);
        assert_eq!(
            parse_transport(Some("vhost")).unwrap_err().to_string(),
            "invalid SMOLVM_AGENT_TRANSPORT: \"vhost\" is not a transport (allowed: serial, vsock)"
        );
    }

    #[test]
    fn mounts_are_checked_for_where_they_land() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let m = |host: &std::path::Path, guest: Option<&str>| Mount { host: host.to_path_buf(), guest: guest.map(String::from) };
        let check = |mounts: Vec<Mount>| validate_mounts(&mounts).err().map(|e| e.to_string());
        assert_eq!(check(vec![m(&a, None), m(&b, Some("/mnt/b")), m(&b, Some("/root/b"))]), None);
        assert_eq!(m(&a, None).guest_path(), "/workspace/a");
        for (mounts, message) in [
            (vec![m(&a, None), m(&b, Some("/workspace/a"))], "two mounts at guest path \"/workspace/a\""),
            (vec![m(&a, Some("/workspace")), m(&b, None)], "mounts may not nest: \"/workspace\" and \"/workspace/b\""),
            (vec![m(&b, None), m(&a, Some("/workspace"))], "mounts may not nest: \"/workspace/b\" and \"/workspace\""),
            (vec![m(&a, Some("/tmp/x"))], "guest path \"/tmp/x\" is in /tmp"),
            (vec![m(&a, Some("/root"))], "guest path \"/root\" is in /root"),
            (vec![m(&a, Some("/root/.ssh"))], "guest path \"/root/.ssh\" is in /root/.ssh"),
            (vec![m(&a, Some("/etc"))], "guest path \"/etc\" is in /etc"),
            (vec![m(&a, Some("/init"))], "guest path \"/init\" is in /init"),
            (vec![m(&a, Some("/linuxrc"))], "guest path \"/linuxrc\" is in /linuxrc"),
            (vec![m(&a, Some("/"))], "guest path \"/\" is the guest's root, which a mount cannot replace"),
            (vec![m(&a, Some("/mnt/new\nline"))], "guest path \"/mnt/new\\nline\" contains a control character"),
            (vec![m(&a, Some("/mnt/../etc"))], "guest path \"/mnt/../etc\" must be absolute"),
            (vec![m(&a, Some("/mnt//x"))], "guest path \"/mnt//x\" must be absolute"),
            (vec![m(&a, Some("mnt"))], "guest path \"mnt\" must be absolute"),
            (vec![m(&a, Some(&format!("/mnt/{}", "x".repeat(100))))], "is longer than 100 bytes"),
            (vec![m(&dir.path().join("missing"), None)], "is not an existing directory"),
            (vec![m(std::path::Path::new("relative"), None)], "is not an existing directory"),
            ((0..5).map(|i| m(&a, Some(&format!("/mnt/{i}")))).collect(), "5 mounts given (allowed at most 4)"),
        ] {
            let got = check(mounts).unwrap_or_default();
            assert!(got.starts_with("invalid mounts: ") && got.contains(message), "{got:?} lacks {message:?}");
        }
        assert_eq!(Mount::parse("/a:/b").unwrap(), m(std::path::Path::new("/a"), Some("/b")));
        assert!(Mount::parse(":/b").is_err());
        // Colons in host paths: the guest path is what follows the last ":/".
        assert_eq!(Mount::parse("/data/a:b").unwrap(), m(std::path::Path::new("/data/a:b"), None));
        assert_eq!(Mount::parse("/data/a:/b:/mnt/b").unwrap(), m(std::path::Path::new("/data/a:/b"), Some("/mnt/b")));
        assert_eq!(Mount::parse("rel:/mnt").unwrap(), m(std::path::Path::new("rel"), Some("/mnt")));
        let colon = dir.path().join("x:y");
        std::fs::create_dir_all(&colon).unwrap();
        let parsed = Mount::parse(colon.to_str().unwrap()).unwrap();
        assert_eq!(check(vec![parsed.clone()]), None);
        assert_eq!(parsed.guest_path(), "/workspace/x:y");
        let got = check(vec![Mount::parse(&format!("{}:mnt", a.display())).unwrap()]).unwrap();
        assert!(got.ends_with("is not an existing directory given by its absolute path (a guest path is absolute: HOST:/GUEST)"), "{got}");
    }

    #[test]
    fn control_timeouts() {
        use std::time::Duration;
        assert_eq!(parse_control_timeout(None).unwrap(), Duration::from_secs(30));
        assert_eq!(parse_control_timeout(Some(" 2.5 ")).unwrap(), Duration::from_millis(2500));
        for bad in ["0", "0.5", "3601", "x", "-1", "NaN", "inf"] {
            let err = parse_control_timeout(Some(bad)).unwrap_err().to_string();
            assert_eq!(err, format!("invalid SMOLVM_CONTROL_TIMEOUT: {bad:?} is not a number of seconds (allowed: 1 to 3600)"));
        }
    }

    #[test]
    fn snapshot_bandwidths() {
        assert_eq!(parse_snapshot_bandwidth(None).unwrap(), None);
        assert_eq!(parse_snapshot_bandwidth(Some(" Unlimited ")).unwrap(), None);
        assert_eq!(parse_snapshot_bandwidth(Some("100")).unwrap(), Some(100));
        for bad in ["1.5", "fast", "-1"] {
            let err = parse_snapshot_bandwidth(Some(bad)).unwrap_err().to_string();
            assert_eq!(
                err,
                format!("invalid SMOLVM_SNAPSHOT_BANDWIDTH: {bad:?} is not a whole number of MiB per second (allowed: 1 to 1048576, or unlimited)")
            );
        }
        for bad in ["0", "1048577"] {
            let err = parse_snapshot_bandwidth(Some(bad)).unwrap_err().to_string();
            assert_eq!(
                err,
                format!("invalid SMOLVM_SNAPSHOT_BANDWIDTH: {bad:?} MiB per second is out of range (allowed: 1 to 1048576, or unlimited)")
            );
        }
    }

    #[test]
    fn vm_ids() {
        for ok in ["a", "7", "env-vm", "a_b-c9", &"x".repeat(64)] {
            assert!(validate_vm_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Bad_ID!", "-a", "a-", "A", "a b", &"x".repeat(65), "é"] {
            let err = validate_vm_id(bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid vm_id:"), "{err}");
        }
    }

    #[test]
    fn ranges_name_the_field_and_the_bounds() {
        let c = VmConfig { memory: 64, ..Default::default() };
        assert_eq!(c.validate().unwrap_err().to_string(), "invalid memory: 64 MiB is out of range (allowed 128..=16384 MiB)");
        let c = VmConfig { vcpu_count: 0, ..Default::default() };
        assert_eq!(c.validate().unwrap_err().to_string(), "invalid vcpu_count: 0 is out of range (allowed 1..=32)");
        assert_eq!(
            check_whole("memory", 1 << 70).unwrap_err().to_string(),
            "invalid memory: 1180591620717411303424 MiB is out of range (allowed 128..=16384 MiB)"
        );
        assert!(check_whole("disk_size_mib", 64).is_ok() && check_whole("disk_size_mib", 63).is_err());
        assert_eq!(out_of_range("memory", &"1e99").to_string(), "invalid memory: 1e99 MiB is out of range (allowed 128..=16384 MiB)");
        let c = VmConfig { kernel_path: Some("/nonexistent/vmlinux".into()), ..Default::default() };
        assert_eq!(c.validate().unwrap_err().to_string(), "invalid kernel_path: /nonexistent/vmlinux is not a readable file");
        let c = VmConfig { initrd_path: Some("/".into()), ..Default::default() };
        assert_eq!(c.validate().unwrap_err().to_string(), "invalid initrd_path: / is not a readable file");
        let empty = tempfile::NamedTempFile::new().unwrap();
        let c = VmConfig { kernel_path: Some(empty.path().into()), ..Default::default() };
        assert_eq!(c.validate().unwrap_err().to_string(), format!("invalid kernel_path: {} is empty", empty.path().display()));
        // Something else than a kernel is said as such (QEMU spoke of "ram disk" support).
        let junk = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(junk.path(), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        let c = VmConfig { kernel_path: Some(junk.path().into()), ..Default::default() };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .ends_with("is not a Linux kernel (allowed: an ELF vmlinux or a bzImage such as /boot/vmlinuz-*)"));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(junk.path(), &bz).unwrap();
        assert!(c.validate().is_ok());
        let c = VmConfig { backend: Some("xen".into()), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("allowed: firecracker, qemu, auto"));
        assert!(VmConfig::default().validate().is_ok());
    }

    #[test]
    fn unknown_fields_are_rejected_and_debug_hides_values() {
        assert!(serde_json::from_str::<VmConfig>(r#"{"memroy": 1}"#).is_err());
        let c = VmConfig { env_vars: [("API_KEY".into(), "s3cret".into())].into(), ..Default::default() };
        let dbg = format!("{c:?}");
        assert!(dbg.contains("API_KEY") && !dbg.contains("s3cret"));
    }

    #[test]
    fn env_keys_are_validated_with_the_config() {
        let c = VmConfig { env_vars: [("MY-VAR".into(), "1".into())].into(), ..Default::default() };
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "Invalid environment variable key: 'MY-VAR'. Keys must match [A-Za-z_][A-Za-z0-9_]*"
        );
    }
}
