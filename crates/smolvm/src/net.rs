//! Sandbox networking.
//!
//! NAT mode: each sandbox gets a TAP (created by QEMU, so it vanishes with QEMU whatever
//! happens) on its own /30 from 172.16.0.0/16 (host .1, guest .2), and an nftables table of its
//! own (`inet smolvm_<hash>`) holding every rule that concerns it: masquerade for its address,
//! no forwarding to other sandboxes or link-local/metadata addresses, no access to the host
//! except its DNS proxy, and the internet policy. Removing the table removes all of it, and
//! smolvm never touches a table it did not create.
//!
//! DNS: the supervisor answers on the host side of the TAP and forwards to the host's own
//! resolver, so it works behind stub resolvers and VPNs. In `restricted` mode it only resolves
//! allowed names and adds the addresses it hands out to the sandbox's allow set (with the
//! answer's TTL), so allowed domains keep working when their addresses change: they are
//! resolved at use, not at setup.
//!
//! Without root, all of NAT happens in a namespace of the sandbox's own (see `rootless`).
//!
//! User mode (where NAT cannot be had): QEMU's user networking, which cannot filter, so only
//! `open` and `off` are offered there.

use crate::config::InternetSettings;
use crate::error::{Error, IoContext, Result};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Nat,
    User,
    None,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "nat" => Ok(Mode::Nat),
            "user" => Ok(Mode::User),
            "none" => Ok(Mode::None),
            other => Err(Error::validation("network", format!("{other:?} is not a network mode (allowed: nat, user, none)"))),
        }
    }

    /// The config's choice, else NAT where this host can do it, else user networking.
    pub fn resolve(config: Option<&str>) -> Result<Mode> {
        match config {
            Some(m) => {
                let mode = Mode::parse(m)?;
                if mode == Mode::Nat {
                    nat_available()
                        .map_err(|why| Error::validation("network", format!("nat is not available here: {why} (use 'user')")))?;
                }
                Ok(mode)
            }
            None => Ok(if nat_available().is_ok() { Mode::Nat } else { Mode::User }),
        }
    }
}

/// Why NAT networking cannot work on this host for this user, if it cannot: as root on the
/// host itself, else in a namespace of the sandbox's own (see `rootless`).
pub fn nat_available() -> std::result::Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return crate::rootless::available();
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun is missing".into());
    }
    // Looked up, not run: this is on the path of every start.
    let on_path = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("nft").is_file()));
    if !on_path {
        return Err("nft (nftables) is not installed".into());
    }
    Ok(())
}

/// An IPv4 network `a.b.c.d/n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> std::result::Result<Cidr, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a.parse().map_err(|_| format!("{s:?} is not an IPv4 network (a.b.c.d/n; IPv6 is not supported)"))?;
        // Digits only, as written by people (`+8` or `032` parse as numbers, and mean nothing).
        let digits = !p.is_empty() && p.len() <= 2 && p.bytes().all(|b| b.is_ascii_digit()) && (p == "0" || !p.starts_with('0'));
        let prefix: u8 = p.parse().ok().filter(|p| *p <= 32 && digits).ok_or_else(|| format!("{s:?} has a bad prefix length (0..=32)"))?;
        Ok(Cidr { addr: Ipv4Addr::from(u32::from(addr) & Cidr::mask(prefix)), prefix })
    }

    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix as u32)
        }
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        let p = self.prefix.min(other.prefix);
        u32::from(self.addr) & Cidr::mask(p) == u32::from(other.addr) & Cidr::mask(p)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

pub const SANDBOX_NET: Cidr = Cidr { addr: Ipv4Addr::new(172, 16, 0, 0), prefix: 16 };
const FORBIDDEN: &[(Cidr, &str)] = &[
    (SANDBOX_NET, "the sandbox network (172.16.0.0/16)"),
    (Cidr { addr: Ipv4Addr::new(169, 254, 0, 0), prefix: 16 }, "link-local/metadata addresses (169.254.0.0/16)"),
    (Cidr { addr: Ipv4Addr::new(127, 0, 0, 0), prefix: 8 }, "loopback (127.0.0.0/8)"),
    (Cidr { addr: Ipv4Addr::new(100, 100, 100, 200), prefix: 32 }, "a cloud metadata service (Alibaba, 100.100.100.200)"),
    (Cidr { addr: Ipv4Addr::new(168, 63, 129, 16), prefix: 32 }, "a cloud metadata service (Azure WireServer, 168.63.129.16)"),
];

/// Ranges a DNS answer never opens in a `restricted` sandbox: private, shared (CGNAT), local,
/// multicast and reserved addresses, where a public name can point at the host's own network.
/// An `allow_cidrs` entry is the only way to reach them.
fn learnable(ip: Ipv4Addr) -> bool {
    let special = [
        (Ipv4Addr::new(0, 0, 0, 0), 8),
        (Ipv4Addr::new(10, 0, 0, 0), 8),
        (Ipv4Addr::new(100, 64, 0, 0), 10),
        (Ipv4Addr::new(172, 16, 0, 0), 12),
        (Ipv4Addr::new(192, 168, 0, 0), 16),
        // IETF protocol assignments, the 6to4 relay and the documentation networks (RFC 6890):
        // none is a public host's. (The benchmarking range, 198.18.0.0/15, is learnable:
        // fake-IP resolvers in front of a proxy answer every name from it.)
        (Ipv4Addr::new(192, 0, 0, 0), 24),
        (Ipv4Addr::new(192, 0, 2, 0), 24),
        (Ipv4Addr::new(192, 88, 99, 0), 24),
        (Ipv4Addr::new(198, 51, 100, 0), 24),
        (Ipv4Addr::new(203, 0, 113, 0), 24),
        (Ipv4Addr::new(224, 0, 0, 0), 3),
    ];
    let inside = |addr: Ipv4Addr, prefix: u8| Cidr { addr, prefix }.overlaps(&Cidr { addr: ip, prefix: 32 });
    !special.iter().any(|(a, p)| inside(*a, *p)) && !never_reachable(ip)
}

/// A supervisor's host-wide claim on its network slot, held for as long as it runs (an
/// exclusive `flock`, which goes with the process however it ends). The claims live in one
/// directory for the whole host, whatever the data directory.
pub struct SlotClaim {
    _held: nix::fcntl::Flock<std::fs::File>,
}

/// The host-wide directory of slot claims, created if missing.
pub fn claims_dir() -> Result<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::path::PathBuf::from("/run/smolvm/net-slots");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(|e| Error::Network(format!("creating {}: {e}", dir.display())))?;
    Ok(dir)
}

/// Claim `slot` for this process, unless another process holds it.
pub fn claim_slot(dir: &std::path::Path, slot: u32) -> Option<SlotClaim> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    // Root's alone: `flock` needs only a descriptor, and any user who could open the file
    // could hold a slot from its sandbox (or every slot from every sandbox).
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(dir.join(slot.to_string())).ok()?;
    let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).ok().map(|held| SlotClaim { _held: held })
}

/// An address a sandbox may never reach, whatever its settings.
pub fn never_reachable(ip: Ipv4Addr) -> bool {
    FORBIDDEN.iter().any(|(c, _)| c.overlaps(&Cidr { addr: ip, prefix: 32 }))
}

/// The networks the host reaches other than through a sandbox's TAP: its routes (the main
/// table, less the default route) and its interfaces' networks. A slot whose /30 lies in one
/// would take over part of it: a route more specific than the host's LAN sends the host's
/// traffic for those addresses to the guest, and a guest address that is the host's own gets
/// no network at all.
pub fn host_networks() -> Vec<Cidr> {
    let mut nets = routes_from(&std::fs::read_to_string("/proc/net/route").unwrap_or_default());
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs.filter(|a| !a.interface_name.starts_with("smv")) {
            let (Some(ip), Some(mask)) = (a.address.and_then(|x| x.as_sockaddr_in().map(|s| s.ip())), a.netmask) else { continue };
            let Some(mask) = mask.as_sockaddr_in().map(|m| u32::from(m.ip())) else { continue };
            nets.push(Cidr { addr: Ipv4Addr::from(u32::from(ip) & mask), prefix: mask.leading_ones() as u8 });
        }
    }
    nets
}

/// `/proc/net/route`'s routes, less the default one and those through sandboxes' TAPs.
/// (Addresses and masks are in the kernel's byte order, printed as hex.)
fn routes_from(table: &str) -> Vec<Cidr> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, mask) = (f.first()?, f.get(1)?, f.get(7)?);
            let dest = u32::from_str_radix(dest, 16).ok()?.swap_bytes();
            let mask = u32::from_str_radix(mask, 16).ok()?.swap_bytes();
            (!iface.starts_with("smv") && mask != 0).then(|| Cidr { addr: Ipv4Addr::from(dest & mask), prefix: mask.leading_ones() as u8 })
        })
        .collect()
}

impl Lease {
    /// Whether this slot's /30 lies in one of `nets` (see [`host_networks`]). A network that
    /// holds the whole sandbox network (a VPN's `0.0.0.0/1`, a `172.16.0.0/12` LAN) does not
    /// count: no slot could avoid it, and none did before.
    pub fn clashes(&self, nets: &[Cidr]) -> bool {
        let mine = Cidr { addr: Ipv4Addr::from(u32::from(self.host()) & !3), prefix: 30 };
        nets.iter().filter(|n| n.prefix > SANDBOX_NET.prefix).any(|n| n.overlaps(&mine))
    }
}

/// The host's own IPv4 addresses (a sandbox may never be allowed to reach them).
pub fn host_addresses() -> Vec<Ipv4Addr> {
    nix::ifaddrs::getifaddrs().map(|addrs| addrs.filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip())).collect()).unwrap_or_default()
}

/// A host name, not an address: its last label is no number (`45.0.0.2` and `999.1` are not
/// names; an address belongs in `allowed_cidrs`).
fn valid_domain(d: &str) -> bool {
    let d = d.trim_end_matches('.');
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        && !d.rsplit('.').next().is_some_and(|last| last.chars().all(|c| c.is_ascii_digit()))
}

pub fn validate_internet(i: &InternetSettings, network: Option<&str>) -> Result<()> {
    match i.mode.as_str() {
        "open" | "off" | "restricted" => {}
        other => {
            return Err(Error::validation("internet_settings", format!("mode {other:?} is not allowed (allowed: open, off, restricted)")))
        }
    }
    if i.mode != "restricted" && (!i.allowed_domains.is_empty() || !i.allowed_cidrs.is_empty()) {
        return Err(Error::validation("internet_settings", "allowed_domains and allowed_cidrs need mode 'restricted'"));
    }
    // (A name given twice counts once: unlike ranges, which nftables refuses to hold overlapping,
    // names do no harm twice over, and a saved sandbox's list must still restore.)
    for d in &i.allowed_domains {
        if !valid_domain(d) {
            let why = if d.parse::<Ipv4Addr>().is_ok() { " (an address goes in allowed_cidrs)" } else { "" };
            return Err(Error::validation("internet_settings.allowed_domains", format!("{d:?} is not a domain name{why}")));
        }
    }
    let host = host_addresses();
    let mut seen: Vec<(&String, Cidr)> = Vec::new();
    for c in &i.allowed_cidrs {
        let cidr = Cidr::parse(c).map_err(|m| Error::validation("internet_settings.allowed_cidrs", m))?;
        // nftables refuses overlapping intervals in one set: every start would fail.
        if let Some((other, _)) = seen.iter().find(|(_, o)| o.overlaps(&cidr)) {
            return Err(Error::validation(
                "internet_settings.allowed_cidrs",
                format!("{c} overlaps {other}, also in the list: give each range once"),
            ));
        }
        seen.push((c, cidr));
        for (bad, what) in FORBIDDEN {
            if cidr.overlaps(bad) {
                return Err(Error::validation(
                    "internet_settings.allowed_cidrs",
                    format!("{c} overlaps {what}, which can never be allowed"),
                ));
            }
        }
        if let Some(h) = host.iter().find(|h| cidr.overlaps(&Cidr { addr: **h, prefix: 32 })) {
            return Err(Error::validation(
                "internet_settings.allowed_cidrs",
                format!("{c} contains this host's own address {h}, which can never be allowed"),
            ));
        }
    }
    if i.mode == "restricted" && network == Some("user") {
        return Err(Error::validation("internet_settings", "'restricted' needs network 'nat' (QEMU user networking cannot filter)"));
    }
    if i.mode == "restricted" && network == Some("none") {
        return Err(Error::validation("internet_settings", "'restricted' needs network 'nat' (network 'none' has no network to restrict)"));
    }
    Ok(())
}

/// A sandbox's /30: slot N is 172.16.0.0 + 4N; the host side is .1 of it, the guest .2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease(pub u32);

pub const MAX_SLOTS: u32 = (1 << 14) - 1;

impl Lease {
    pub fn host(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(SANDBOX_NET.addr) + self.0 * 4 + 1)
    }
    pub fn guest(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(SANDBOX_NET.addr) + self.0 * 4 + 2)
    }
}

/// Names on the host (TAP, nft table) are per data directory and sandbox: two data directories
/// may each hold a sandbox of the same id, and one must never touch the other's device or
/// rules. The directory counts as resolved, so that a process that spells it otherwise
/// (`/x/d/`, `/x/./d`, a symlink) finds what another left behind. One that does not exist is
/// taken as written, less its `.` components and extra slashes.
fn host_name_hash(data_dir: &std::path::Path, id: &str) -> String {
    crate::image::fingerprint(&[resolved(data_dir).as_os_str().as_encoded_bytes(), id.as_bytes()])
}

/// The data directory as resolved (`/x/./d` and a link to it are `/x/d`), or as written where
/// it cannot be.
fn resolved(data_dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.components().collect())
}

pub fn tap_name(data_dir: &std::path::Path, id: &str) -> String {
    format!("smv{}", &host_name_hash(data_dir, id)[..10])
}

/// Take the TAP down: the tun driver then refuses what QEMU writes, so a guest that is still
/// running (its stop not done yet) sends nothing anywhere while its rules are removed.
pub fn tap_down(name: &str) {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let Ok(sock) = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None) else { return };
    // SAFETY: ifreq is plain old data; zeroed is a valid value for it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().take(15).enumerate() {
        req.ifr_name[i] = b as libc::c_char;
    }
    // SAFETY: the socket is open; `req` is a valid ifreq naming the device that outlives both
    // calls, and SIOCGIFFLAGS/SIOCSIFFLAGS read and write only its flags field.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) == 0 {
            req.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short);
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req);
        }
    }
}

/// How long a start waits for what a sandbox's previous run still holds while its supervisor
/// exits (its TAP, its address's claim): the stop does not wait for that.
pub const TAP_HANDOVER: Duration = Duration::from_secs(3);

/// Create the sandbox's TAP and hold it. QEMU gets a duplicate of this descriptor (not the
/// name), so the device outlives QEMU for as long as the supervisor keeps it: unregistering a
/// network device waits for several RCU grace periods (~30 ms here), and that wait then happens
/// after the supervisor has answered a stop, not on `smolvm run`'s path. Whoever dies, the
/// kernel removes the device with the last descriptor.
pub fn open_tap(name: &str) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    const TUNSETIFF: libc::c_ulong = 0x400454ca;
    let deadline = std::time::Instant::now() + TAP_HANDOVER;
    loop {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| Error::Network(format!("opening /dev/net/tun: {e}")))?;
        // struct ifreq: the name (IFNAMSIZ = 16 bytes), then the flags as a short.
        let mut ifr = [0u8; 40];
        ifr[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, for which `ifr` is large enough
        // (40 bytes) and lives across the call; `fd` is the tun descriptor just opened.
        let rc = unsafe { libc::ioctl(fd, TUNSETIFF as _, ifr.as_mut_ptr()) };
        let err = std::io::Error::last_os_error();
        // SAFETY: `fd` came from into_raw_fd above and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        if rc == 0 {
            return Ok(owned);
        }
        drop(owned);
        // A restarted sandbox: its previous supervisor may still be letting go of the device.
        if err.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        return Err(Error::Network(format!("creating the TAP device {name}: {err}")));
    }
}

pub fn table_name(data_dir: &std::path::Path, id: &str) -> String {
    format!("smolvm_{}", host_name_hash(data_dir, id))
}

/// What a sandbox's table says of itself (its nftables comment): the name alone is a hash, and
/// whoever finds one on a host (`nft list ruleset`) should be told whose it is. At most 128
/// characters (nft's bound), of those nft takes in a quoted string.
pub fn table_comment(data_dir: &std::path::Path, id: &str) -> String {
    let clean =
        |s: &str| s.chars().map(|c| if (c.is_ascii_graphic() && c != '"' && c != '\\') || c == ' ' { c } else { '?' }).collect::<String>();
    // (As resolved, like the name: the directory itself, not the alias it was reached by.)
    let (id, dir) = (clean(id), clean(&resolved(data_dir).to_string_lossy()));
    let head = format!("smolvm sandbox {id} in ");
    let room = 128usize.saturating_sub(head.len());
    let dir = if dir.len() <= room { dir } else { format!("...{}", &dir[dir.len() - room.saturating_sub(3)..]) };
    let comment = head + &dir;
    comment[..comment.len().min(128)].to_string()
}

/// How many connections one sandbox may have open at once through the host, outward and to its
/// DNS proxy each: every one is an entry in the host's connection tracking table, which all of
/// the host shares (262144 entries by default), and a guest sending to many ports would fill it
/// in seconds, after which the host drops new connections of everyone. Past it, new ones are
/// dropped until some end.
pub const CONNECTION_LIMIT: u32 = 4096;

/// The nftables table of one sandbox.
///
/// `rootless`: the sandbox's own namespace (see `rootless`), where what the host delivers to
/// itself is not the namespace's own and must be named (the list given), and where connections are
/// counted in the namespace's own tracking table, not the host's: no limit is needed there,
/// and none is set (it would need a kernel module a user cannot load).
pub fn ruleset(table: &str, owner: &str, tap: &str, lease: Lease, internet: &InternetSettings, rootless: Option<&[Cidr]>) -> String {
    let (host, guest) = (lease.host(), lease.guest());
    let mut egress = String::new();
    match internet.mode.as_str() {
        "off" => egress.push_str("        drop\n"),
        // A connection made while its address was allowed goes on after the DNS answer that
        // allowed it expires: a download outlives a short TTL.
        "restricted" => egress.push_str("        ct state established,related accept\n        ip daddr @allow accept\n        drop\n"),
        _ => egress.push_str("        accept\n"),
    }
    let dns =
        if internet.mode == "off" { String::new() } else { format!("        iifname \"{tap}\" ip daddr {host} udp dport 53 accept\n") };
    let blocked = FORBIDDEN.iter().map(|(c, _)| c.to_string()).collect::<Vec<_>>().join(", ");
    let cidrs: Vec<Cidr> = internet.allowed_cidrs.iter().filter_map(|c| Cidr::parse(c).ok()).collect();
    let elements = set_elements(&cidrs);
    let (host_set, host_blocked, limit_out, limit_in) = match rootless {
        Some(also) => (
            format!("    set {HOST_SET} {{\n        type ipv4_addr\n        flags interval\n{}    }}\n", set_elements(also)),
            format!("        ip daddr @{HOST_SET} drop\n"),
            String::new(),
            String::new(),
        ),
        None => (
            String::new(),
            String::new(),
            format!("        ct state new ct count over {CONNECTION_LIMIT} drop\n"),
            format!("        iifname \"{tap}\" ct state new ct count over {CONNECTION_LIMIT} drop\n"),
        ),
    };
    let comment = if owner.is_empty() { String::new() } else { format!("    comment \"{owner}\"\n") };
    format!(
        "table inet {table} {{
{comment}    set allow {{
        type ipv4_addr
        flags interval, timeout
        size {ALLOW_MAX}
{elements}    }}
{host_set}    chain forward {{
        type filter hook forward priority 0; policy accept;
        oifname \"{tap}\" ct state established,related accept
        oifname \"{tap}\" drop
        iifname \"{tap}\" jump egress
    }}
    chain egress {{
        meta nfproto != ipv4 drop
        ip saddr != {guest} drop
        ct status dnat drop
        oifname \"smv*\" drop
        ip daddr {{ {blocked} }} drop
{host_blocked}{limit_out}{egress}    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname \"{tap}\" meta nfproto != ipv4 drop
        iifname \"{tap}\" ip saddr != {guest} drop
        iifname \"{tap}\" ct state established,related accept
{limit_in}{dns}        iifname \"{tap}\" drop
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        ip saddr {guest} oifname != \"smv*\" masquerade
    }}
}}
"
    )
}

/// The child `command` starts gets SIGKILL when the thread that spawned it exits, and does not
/// start at all if its parent died before it could ask for that.
pub(crate) fn die_with_this_thread(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: prctl(PR_SET_PDEATHSIG), getppid and _exit change or read only the child's own
    // state and are async-signal-safe; nothing of the parent's memory is touched between fork
    // and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The supervisor died between the fork and the prctl: the signal will not come.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

fn nft(input: &str, args: &[&str]) -> Result<()> {
    use std::io::Write;
    let mut command = Command::new("nft");
    command.args(args).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    // nft dies with the thread that waits for it: a supervisor killed while nft runs must not
    // leave an nft that commits its table after the next command has cleaned up (a leak).
    die_with_this_thread(&mut command);
    let mut child = command.spawn().map_err(|e| Error::Network(format!("running nft: {e}")))?;
    // Fed and read beside the wait, which is bounded, as every wait: a supervisor's clean-up
    // waits for its table's load to end (`NFT_BOUND` and a little more) before it removes the
    // table, which must then be the last word on it. (A kill ends both threads' pipes.)
    let (mut stdin, mut stderr) = (child.stdin.take().expect("piped"), child.stderr.take().expect("piped"));
    let input = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let deadline = std::time::Instant::now() + NFT_BOUND;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(1)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Network(format!("nft {} did not finish within {}s", args.join(" "), NFT_BOUND.as_secs())));
            }
            Err(e) => return Err(Error::Network(format!("waiting for nft: {e}"))),
        }
    };
    let stderr = reader.join().unwrap_or_default();
    let written = writer.join().unwrap_or_else(|_| Err(std::io::Error::other("the writer panicked")));
    if !status.success() {
        return Err(Error::Network(format!("nft {}: {}", args.join(" "), stderr.trim())));
    }
    written.map_err(|e| Error::Network(format!("writing to nft: {e}")))
}

/// How long one nft run may take (~15 ms here; loading nftables' modules the first time, on a
/// busy host, takes longer).
pub const NFT_BOUND: std::time::Duration = std::time::Duration::from_secs(20);

/// The set of what a sandbox in its own namespace may not reach on the host's side (see
/// `rootless::blocked`), kept up to date while it runs.
pub const HOST_SET: &str = "host";

fn cidr_list(cidrs: &[Cidr]) -> String {
    cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
}

/// A set declaration's elements line, or nothing for none (nftables refuses `elements = { }`).
fn set_elements(cidrs: &[Cidr]) -> String {
    match cidrs.is_empty() {
        true => String::new(),
        false => format!("        elements = {{ {} }}\n", cidr_list(cidrs)),
    }
}

/// Replace the elements of a sandbox's `HOST_SET`, in one transaction: the set is never empty
/// on the way.
pub fn nft_set_host(table: &str, cidrs: &[Cidr]) -> Result<()> {
    nft(&host_set_script(table, cidrs), &["-f", "-"])
}

fn host_set_script(table: &str, cidrs: &[Cidr]) -> String {
    format!("flush set inet {table} {HOST_SET}\nadd element inet {table} {HOST_SET} {{ {} }}\n", cidr_list(cidrs))
}

/// Whether nftables here takes a sandbox's table as a sandbox in its own namespace would have
/// it (`restricted`, so its allow set too), without committing anything (`nft --check`).
pub fn nft_check_rootless(host_local: &[Cidr]) -> Result<()> {
    let internet = InternetSettings { mode: "restricted".into(), ..Default::default() };
    nft(&ruleset("smolvm_trial", "", "smvtrial", Lease(0), &internet, Some(host_local)), &["--check", "-f", "-"])
}

pub fn nft_apply(table: &str, owner: &str, tap: &str, lease: Lease, internet: &InternetSettings, rootless: Option<&[Cidr]>) -> Result<()> {
    // One transaction (one nft process, on the boot's critical path) that replaces a leftover
    // of a crashed run: declaring the table first makes the delete valid when there is none.
    let script =
        |owner| format!("table inet {table}\ndelete table inet {table}\n{}", ruleset(table, owner, tap, lease, internet, rootless));
    match nft(&script(owner), &["-f", "-"]) {
        // An nft older than 0.9.7 (2020) knows no table comments: the table goes without.
        Err(e) if !owner.is_empty() && e.to_string().contains("comment") => nft(&script(""), &["-f", "-"]),
        r => r,
    }
}

/// Remove a sandbox's table; a missing one is not an error.
///
/// One netlink batch rather than `nft delete table`: this is on the path of every stop (and so
/// of every `smolvm run`), and the nft process spends most of its ~16 ms waiting in the close
/// of its netlink socket, for an RCU grace period after the commit. The kernel's answer here
/// comes once the table is gone; the socket is then closed on a thread of its own.
pub fn nft_remove(table: &str) -> Result<()> {
    use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
    let fail = |what: &str, e: std::io::Error| Error::Network(format!("nftables: {what} while deleting table {table}: {e}"));
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| fail("opening netlink", e))?;
    socket.bind_auto().map_err(|e| fail("binding netlink", e))?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(|e| fail("connecting netlink", e))?;
    // Bounded like every wait: the kernel answers at once, or something is badly wrong.
    let bound = nix::sys::time::TimeVal::new(5, 0);
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &bound)
        .map_err(|e| fail("bounding the wait", std::io::Error::from(e)))?;
    const DELETE_SEQ: u32 = 2;
    socket.send(&delete_table_batch(table, DELETE_SEQ), 0).map_err(|e| fail("sending", e))?;
    let answer = loop {
        let mut buf = Vec::with_capacity(8192);
        match socket.recv(&mut buf, 0) {
            // (With a receive timeout set, a signal's handler interrupts the wait whatever
            // SA_RESTART says: the supervisor has handlers.)
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(fail("receiving", e)),
            Ok(_) => {}
        }
        match batch_answer(&buf, DELETE_SEQ) {
            Some(0) => break Ok(()),
            Some(errno) if errno == -libc::ENOENT => break Ok(()),
            Some(errno) => break Err(fail("the kernel refused", std::io::Error::from_raw_os_error(-errno))),
            None => continue,
        }
    };
    std::thread::spawn(move || drop(socket));
    answer
}

/// nfnetlink messages: header, then the nfgenmsg (family, version, big-endian resource id).
fn nfnl_message(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) {
    let len = 16 + 4 + attrs.len();
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[family, 0]);
    buf.extend_from_slice(&res_id.to_be_bytes());
    buf.extend_from_slice(attrs);
}

/// A transaction deleting `table` (family inet) whose DELTABLE message asks for an answer.
fn delete_table_batch(table: &str, seq: u32) -> Vec<u8> {
    const NFTA_TABLE_NAME: u16 = 1;
    let mut name = table.as_bytes().to_vec();
    name.push(0);
    let mut attr = Vec::new();
    attr.extend_from_slice(&((4 + name.len()) as u16).to_ne_bytes());
    attr.extend_from_slice(&NFTA_TABLE_NAME.to_ne_bytes());
    attr.extend_from_slice(&name);
    attr.resize(attr.len().div_ceil(4) * 4, 0);
    let subsys = libc::NFNL_SUBSYS_NFTABLES as u16;
    let request = libc::NLM_F_REQUEST as u16;
    let mut buf = Vec::new();
    nfnl_message(&mut buf, libc::NFNL_MSG_BATCH_BEGIN as u16, request, seq - 1, 0, subsys, &[]);
    let delete = (subsys << 8) | libc::NFT_MSG_DELTABLE as u16;
    nfnl_message(&mut buf, delete, request | libc::NLM_F_ACK as u16, seq, libc::NFPROTO_INET as u8, 0, &attr);
    nfnl_message(&mut buf, libc::NFNL_MSG_BATCH_END as u16, request, seq + 1, 0, subsys, &[]);
    buf
}

/// The kernel's answer to message `seq` in a netlink datagram: 0 (done) or a negative errno.
fn batch_answer(mut data: &[u8], seq: u32) -> Option<i32> {
    let u32_at = |d: &[u8], i: usize| d.get(i..i + 4).map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")));
    while data.len() >= 16 {
        let len = u32_at(data, 0)? as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if len < 16 || len > data.len() {
            return None;
        }
        if kind == libc::NLMSG_ERROR as u16 && u32_at(data, 8)? == seq {
            return Some(u32_at(data, 16)? as i32);
        }
        data = data.get(len.div_ceil(4) * 4..).unwrap_or(&[]);
    }
    None
}

/// Allow `add` with these timeouts, in one transaction: added (so that each is there), taken
/// out and added again. An element added again keeps its old timeout on older kernels (Debian
/// 12's), and would expire while the guest still holds the new answer; taking it out on its own
/// would fail for one that is not there, and leave a moment without it.
fn nft_allow(table: &str, add: &[(Ipv4Addr, u32)]) {
    if add.is_empty() {
        return;
    }
    let _ = nft(&allow_script(table, add), &["-f", "-"]);
}

fn allow_script(table: &str, add: &[(Ipv4Addr, u32)]) -> String {
    let timed: Vec<String> = add.iter().map(|(ip, ttl)| format!("{ip} timeout {ttl}s")).collect();
    let plain: Vec<String> = add.iter().map(|(ip, _)| ip.to_string()).collect();
    let (timed, plain) = (timed.join(", "), plain.join(", "));
    format!(
        "add element inet {table} allow {{ {timed} }}\ndelete element inet {table} allow {{ {plain} }}\nadd element inet {table} allow {{ {timed} }}\n"
    )
}

/// Give the sandbox's TAP its host address and bring it up (rtnetlink), and let the host
/// forward.
pub async fn setup_tap(tap: &str, lease: Lease) -> Result<()> {
    use futures::TryStreamExt;
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| Error::Network(format!("opening rtnetlink: {e}")))?;
    let conn_task = tokio::spawn(connection);
    let result = async {
        let index = match handle.link().get().match_name(tap.to_string()).execute().try_next().await {
            Ok(Some(link)) => link.header.index,
            Ok(None) => return Err(Error::Network(format!("{tap} does not exist"))),
            Err(e) => return Err(Error::Network(format!("finding {tap}: {e}"))),
        };
        handle
            .address()
            .add(index, std::net::IpAddr::V4(lease.host()), 30)
            .execute()
            .await
            .map_err(|e| Error::Network(format!("addressing {tap}: {e}")))?;
        // The sandbox's network is IPv4 only (the guest's IPv6 is dropped on the way in):
        // without this the host gives the TAP a link-local IPv6 address as it comes up and
        // sends neighbour and router solicitations and multicast reports into the guest.
        let ipv6 = format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6");
        if std::path::Path::new(&ipv6).exists() {
            std::fs::write(&ipv6, "1").map_err(|e| Error::Network(format!("turning IPv6 off on {tap}: {e}")))?;
        }
        // ARP answers on the TAP only for the TAP's own address: by default Linux answers for
        // any of the host's addresses, which told the guest the host's other addresses and
        // other sandboxes' gateways.
        let arp = format!("/proc/sys/net/ipv4/conf/{tap}/arp_ignore");
        std::fs::write(&arp, "1").map_err(|e| Error::Network(format!("setting {arp}: {e}")))?;
        handle.link().set(index).up().execute().await.map_err(|e| Error::Network(format!("bringing {tap} up: {e}")))?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| Error::Network(format!("enabling IPv4 forwarding: {e}")))?;
        Ok(())
    }
    .await;
    conn_task.abort();
    result
}

/// `SMOLVM_DNS_UPSTREAM`, where set: an IPv4 address and a port. Anything else is refused (it
/// would send a restricted sandbox's names to another resolver than the one meant).
pub fn dns_upstream_setting() -> Result<Option<SocketAddr>> {
    parse_dns_upstream(std::env::var("SMOLVM_DNS_UPSTREAM").ok().as_deref())
}

fn parse_dns_upstream(value: Option<&str>) -> Result<Option<SocketAddr>> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => match v.parse::<SocketAddr>() {
            Ok(a @ SocketAddr::V4(_)) if a.port() != 0 => Ok(Some(a)),
            _ => Err(Error::validation("SMOLVM_DNS_UPSTREAM", format!("{v:?} is not an IPv4 address and port (a.b.c.d:53)"))),
        },
    }
}

/// The host's first nameserver (from /etc/resolv.conf), or `SMOLVM_DNS_UPSTREAM` (ip:port);
/// the supervisor runs on the host, so a local stub resolver (127.0.0.53) works too.
pub fn upstream_dns() -> SocketAddr {
    if let Ok(Some(addr)) = dns_upstream_setting() {
        return addr;
    }
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let ip = conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .next()
        .unwrap_or(Ipv4Addr::new(127, 0, 0, 53));
    SocketAddr::from((ip, 53))
}

/// Which names the guest may resolve, and where learned addresses go.
pub struct DnsPolicy {
    pub allowed: Option<Vec<String>>,
    pub table: String,
    /// The allowed CIDRs (their addresses need no learning; nftables would refuse them as
    /// overlapping).
    pub cidrs: Vec<Cidr>,
}

/// The addresses of a DNS answer to allow, with their timeouts (at least 30 s, at most a day):
/// public ones only, once each, and none inside an allowed CIDR (nftables refuses an interval
/// inside another, and the whole batch with it).
fn learn(answers: &[(Ipv4Addr, u32)], cidrs: &[Cidr]) -> Vec<(Ipv4Addr, u32)> {
    let mut add: Vec<(Ipv4Addr, u32)> = Vec::new();
    for &(ip, ttl) in answers {
        if learnable(ip) && !cidrs.iter().any(|c| c.overlaps(&Cidr { addr: ip, prefix: 32 })) && !add.iter().any(|(a, _)| *a == ip) {
            add.push((ip, ttl.clamp(30, 86400)));
        }
    }
    add
}

impl DnsPolicy {
    pub fn new(allowed: Option<Vec<String>>, table: String, cidrs: &[String]) -> DnsPolicy {
        let cidrs = cidrs.iter().filter_map(|c| Cidr::parse(c).ok()).collect();
        DnsPolicy { allowed, table, cidrs }
    }

    fn permits(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match &self.allowed {
            None => true,
            Some(list) => list.iter().any(|d| {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                name == d || name.ends_with(&format!(".{d}"))
            }),
        }
    }
}

/// The question's name of a DNS message that asks exactly one (as resolvers do), and where
/// the question section ends. None for any other: a second question would go unvetted, and
/// the answers to it would be taken for the first's.
pub fn dns_question(msg: &[u8]) -> Option<(String, usize)> {
    if msg.len() < 12 || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let (name, end) = dns_name(msg, 12)?;
    Some((name, end + 4))
}

fn dns_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    let mut end = None;
    for _ in 0..128 {
        let len = *msg.get(pos)? as usize;
        if len == 0 {
            return Some((labels.join("."), end.unwrap_or(pos + 1)));
        }
        if len & 0xc0 == 0xc0 {
            let ptr = ((len & 0x3f) << 8) | *msg.get(pos + 1)? as usize;
            end.get_or_insert(pos + 2);
            pos = ptr;
            continue;
        }
        labels.push(String::from_utf8_lossy(msg.get(pos + 1..pos + 1 + len)?).into_owned());
        pos += 1 + len;
    }
    None
}

/// IPv4 addresses (with TTLs) in the answer section of a DNS response.
pub fn dns_answers(msg: &[u8]) -> Vec<(Ipv4Addr, u32)> {
    let mut out = Vec::new();
    let Some((_, mut pos)) = dns_question(msg) else { return out };
    let answers = u16::from_be_bytes([msg[6], msg[7]]);
    for _ in 0..answers {
        let Some((_, after)) = dns_name(msg, pos) else { break };
        let Some(rr) = msg.get(after..after + 10) else { break };
        let (kind, ttl, len) = (
            u16::from_be_bytes([rr[0], rr[1]]),
            u32::from_be_bytes([rr[4], rr[5], rr[6], rr[7]]),
            u16::from_be_bytes([rr[8], rr[9]]) as usize,
        );
        if kind == 1 && len == 4 {
            if let Some(a) = msg.get(after + 10..after + 14) {
                out.push((Ipv4Addr::new(a[0], a[1], a[2], a[3]), ttl));
            }
        }
        pos = after + 10 + len;
    }
    out
}

/// A REFUSED answer to a query for a name the policy does not allow.
fn dns_refused(query: &[u8], question_end: usize) -> Vec<u8> {
    let mut r = query[..question_end.min(query.len())].to_vec();
    r[2] |= 0x80; // response
    r[3] = (r[3] & 0xf0) | 5; // REFUSED
    r[6..12].fill(0);
    if question_end <= 12 {
        // The header alone: it carries no question either.
        r[4..6].fill(0);
    }
    r
}

/// The proxy's sockets, bound before the sandbox is reported up (a proxy that could not bind
/// must fail the start, not leave the guest without DNS or with someone else's). The upstream
/// socket is connected: the kernel then takes answers from the upstream's address only.
///
/// `host`: where the sandbox has a namespace of its own, the upstream socket is made in the
/// host's (a stub resolver on the host's loopback is not the namespace's).
pub async fn dns_bind(
    bind: SocketAddr,
    upstream: SocketAddr,
    host: Option<&crate::rootless::HostSide>,
) -> Result<(tokio::net::UdpSocket, tokio::net::UdpSocket)> {
    let sock = tokio::net::UdpSocket::bind(bind).await.map_err(|e| Error::Network(format!("binding DNS on {bind}: {e}")))?;
    let up = match host {
        Some(host) => {
            let up = host.udp_to(upstream).map_err(|e| Error::Network(format!("connecting to the DNS server {upstream}: {e}")))?;
            up.set_nonblocking(true).and_then(|()| tokio::net::UdpSocket::from_std(up)).ctx(|| "taking the upstream DNS socket".into())?
        }
        None => {
            let up = tokio::net::UdpSocket::bind("0.0.0.0:0")
                .await
                .map_err(|e| Error::Network(format!("binding the upstream DNS socket: {e}")))?;
            up.connect(upstream).await.map_err(|e| Error::Network(format!("connecting to the DNS server {upstream}: {e}")))?;
            up
        }
    };
    Ok((sock, up))
}

/// Answer DNS on `sock` for one sandbox, forwarding what the policy allows upstream (`up`).
/// Queries are answered in the order they came: resolvers such as busybox's send A and AAAA
/// at once and may drop a reply that overtakes the other.
pub async fn dns_proxy(sock: tokio::net::UdpSocket, up: tokio::net::UdpSocket, policy: Arc<DnsPolicy>) -> Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut reply = vec![0u8; 4096];
    loop {
        let (n, from) = sock.recv_from(&mut buf).await.ctx(|| "receiving DNS".into())?;
        let query = &buf[..n];
        let Some((name, qend)) = dns_question(query) else {
            // (Refused with the header alone: what it asked is not read.)
            if query.len() >= 12 {
                let _ = sock.send_to(&dns_refused(query, 12), from).await;
            }
            continue;
        };
        if !policy.permits(&name) {
            let _ = sock.send_to(&dns_refused(query, qend), from).await;
            continue;
        }
        if up.send(query).await.is_err() {
            continue;
        }
        // Wait for the answer to this query (same id); stale answers are skipped.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let answer = loop {
            match tokio::time::timeout_at(deadline, up.recv(&mut reply)).await {
                Ok(Ok(m)) if m >= 2 && reply[..2] == query[..2] => break Some(m),
                Ok(Ok(_)) => continue,
                _ => break None,
            }
        };
        let Some(m) = answer else { continue };
        if policy.allowed.is_some() {
            // Allow what is handed out before the guest can use it.
            let add = learn(&dns_answers(&reply[..m]), &policy.cidrs);
            let table = policy.table.clone();
            let _ = tokio::task::spawn_blocking(move || nft_allow(&table, &add)).await;
        }
        let _ = sock.send_to(&reply[..m], from).await;
    }
}

/// The most addresses a sandbox's allow set holds. Each name the guest looks up adds its
/// answers (for their TTL): a guest asking for endless names of a wildcard domain it is allowed
/// must not grow the host kernel's memory without bound. A full set takes no more: the guest
/// then cannot reach new addresses until old ones expire (it fails closed).
const ALLOW_MAX: u32 = 65_536;

/// Forward connections to 127.0.0.1:`listener` to the guest's port.
///
/// The connections are this task's own: a port closed (this task aborted) cuts those still
/// open, as a closed port should. A failed accept (out of descriptors, say) is waited out: the
/// port stays listed, so it must stay served.
pub async fn port_proxy(listener: tokio::net::TcpListener, guest: SocketAddr) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((mut inbound, _)) => {
                    connections.spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(guest).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accepting a connection for guest port {}: {e}", guest.port());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_inside_the_hosts_own_networks_are_known() {
        // A LAN on 172.16.0.0/24 (the host at .100), a sandbox's TAP, and the default route.
        let table = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t010010AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t000010AC\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     smv0123456789\t040110AC\t00000000\t0001\t0\t0\t0\tFCFFFFFF\t0\t0\t0\n";
        let nets = routes_from(table);
        assert_eq!(nets, [Cidr { addr: "172.16.0.0".parse().unwrap(), prefix: 24 }]);
        // Slots 1..=63 lie in 172.16.0.0/24; slot 64 (172.16.1.0/30) does not.
        assert!(Lease(1).clashes(&nets) && Lease(63).clashes(&nets));
        assert!(!Lease(64).clashes(&nets) && !Lease(200).clashes(&[]));
        // What holds the whole sandbox network, no slot can avoid: it counts for none.
        let broad = routes_from(
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
             tun0\t00000000\t00000000\t0001\t0\t0\t0\t00000080\t0\t0\t0\n\
             eth1\t000010AC\t00000000\t0001\t0\t0\t0\t0000F0FF\t0\t0\t0\n",
        );
        assert_eq!(broad.iter().map(|c| c.prefix).collect::<Vec<_>>(), [1, 12]);
        assert!(!Lease(1).clashes(&broad));
    }

    #[test]
    fn the_dns_upstream_is_an_ipv4_address_and_port() {
        assert_eq!(parse_dns_upstream(None).unwrap(), None);
        assert_eq!(parse_dns_upstream(Some(" ")).unwrap(), None);
        assert_eq!(parse_dns_upstream(Some("198.51.100.2:53")).unwrap(), Some("198.51.100.2:53".parse().unwrap()));
        for bad in ["bogus", "198.51.100.2", "198.51.100.2:99999", "198.51.100.2:0", "[::1]:53"] {
            let e = parse_dns_upstream(Some(bad)).unwrap_err().to_string();
            assert_eq!(e, format!("invalid SMOLVM_DNS_UPSTREAM: {bad:?} is not an IPv4 address and port (a.b.c.d:53)"));
        }
    }

    #[test]
    fn a_prefix_length_is_written_in_plain_digits() {
        assert_eq!(Cidr::parse("10.1.0.0/16").unwrap().prefix, 16);
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().prefix, 0);
        for bad in ["1.2.3.4/+8", "1.2.3.4/032", "1.2.3.4/08", "1.2.3.4/", "1.2.3.4/33"] {
            assert!(Cidr::parse(bad).unwrap_err().ends_with("has a bad prefix length (0..=32)"), "{bad}");
        }
    }

    #[test]
    fn cidrs_and_forbidden_ranges() {
        assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert!(Cidr::parse("::1/128").is_err());
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        let i = |c: &str| InternetSettings { mode: "restricted".into(), allowed_domains: vec![], allowed_cidrs: vec![c.into()] };
        let err = validate_internet(&i("169.254.169.254/32"), None).unwrap_err().to_string();
        assert!(err.contains("link-local/metadata"), "{err}");
        assert!(validate_internet(&i("172.16.5.0/24"), None).unwrap_err().to_string().contains("sandbox network"));
        assert!(validate_internet(&i("0.0.0.0/0"), None).is_err());
        assert!(validate_internet(&i("203.0.113.0/24"), None).is_ok());
        let bad = InternetSettings { mode: "sometimes".into(), ..Default::default() };
        assert!(validate_internet(&bad, None).unwrap_err().to_string().contains("allowed: open, off, restricted"));
        assert!(validate_internet(&i("203.0.113.0/24"), Some("user")).is_err());
    }

    #[test]
    fn a_slot_claim_excludes_other_claims_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = claim_slot(dir.path(), 7).expect("a free slot can be claimed");
        // Another claim (another open file, as in another process) is refused.
        assert!(claim_slot(dir.path(), 7).is_none());
        assert!(claim_slot(dir.path(), 8).is_some());
        drop(first);
        assert!(claim_slot(dir.path(), 7).is_some());
    }

    #[test]
    fn leases_are_disjoint_slash_30s() {
        assert_eq!((Lease(1).host(), Lease(1).guest()), (Ipv4Addr::new(172, 16, 0, 5), Ipv4Addr::new(172, 16, 0, 6)));
        assert_eq!(Lease(MAX_SLOTS).guest(), Ipv4Addr::new(172, 16, 255, 254));
        let (x, y) = (std::path::Path::new("/data/x"), std::path::Path::new("/data/y"));
        assert_eq!(tap_name(x, "a").len(), 13);
        // One id in two data directories: two devices, two tables.
        assert_ne!(tap_name(x, "a"), tap_name(y, "a"));
        assert_ne!(table_name(x, "a"), table_name(y, "a"));
        assert_eq!(table_name(x, "a"), table_name(x, "a"));
    }

    #[test]
    fn host_names_follow_the_data_directory_however_it_is_spelled() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("d");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let spelled = |s: String| table_name(std::path::Path::new(&s), "a");
        let want = table_name(&real, "a");
        for other in [format!("{}/", real.display()), format!("{}/./", real.display()), format!("{}//d", tmp.path().display())] {
            assert_eq!(spelled(other.clone()), want, "{other}");
        }
        assert_eq!(table_name(&link, "a"), want);
        assert_eq!(tap_name(&link, "a"), tap_name(&real, "a"));
        // One that does not exist: as written, less `.` and extra slashes.
        assert_eq!(spelled("/nowhere/x/./".into()), spelled("/nowhere//x".into()));
    }

    #[test]
    fn dns_parsing_and_policy() {
        // Query for example.com A, and a response with two A records (the second compressed).
        let q: Vec<u8> = [&[0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0][..], b"\x07example\x03com\x00", &[0, 1, 0, 1]].concat();
        assert_eq!(dns_question(&q).unwrap(), ("example.com".to_string(), q.len()));
        let mut r = q.clone();
        r[2] = 0x81;
        r[7] = 2;
        for ip in [[93, 184, 216, 34], [1, 2, 3, 4]] {
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            r.extend_from_slice(&ip);
        }
        assert_eq!(dns_answers(&r), vec![(Ipv4Addr::new(93, 184, 216, 34), 60), (Ipv4Addr::new(1, 2, 3, 4), 60)]);
        // Two questions, the second unvetted: no question to vet, no answers to learn.
        let mut two = q.clone();
        two[5] = 2;
        two.extend_from_slice(b"\x05other\x04test\x00\x00\x01\x00\x01");
        assert_eq!(dns_question(&two), None);
        let mut r2 = r.clone();
        r2[5] = 2;
        assert!(dns_answers(&r2).is_empty());
        assert_eq!(&dns_refused(&two, 12)[..], &[0x12, 0x34, 0x81, 0x05, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        let p = DnsPolicy::new(Some(vec!["example.com".into()]), String::new(), &[]);
        assert!(p.permits("example.com") && p.permits("api.example.com.") && !p.permits("badexample.com") && !p.permits("evil.com"));
        let refused = dns_refused(&q, q.len());
        assert_eq!(refused[3] & 0x0f, 5);
        // What a public name may resolve to in a restricted sandbox: public addresses only.
        for ip in ["93.184.216.34", "1.2.3.4"] {
            assert!(learnable(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.0.0.5",
            "172.31.1.1",
            "192.168.1.1",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.169.254",
            "172.16.0.6",
            "224.0.0.1",
            "0.0.0.0",
            "100.100.100.200",
            "168.63.129.16",
            "192.0.0.8",
            "192.88.99.1",
            "203.0.113.5",
            "192.0.2.1",
            "198.51.100.7",
            "240.0.0.1",
        ] {
            assert!(!learnable(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn allowed_domains_are_names_not_addresses() {
        let with = |d: &str| InternetSettings { mode: "restricted".into(), allowed_domains: vec![d.into()], ..Default::default() };
        for ok in ["example.com", "api.example.com.", "a1.b2", "xn--bcher-kva.example", "localhost"] {
            assert!(validate_internet(&with(ok), None).is_ok(), "{ok}");
        }
        for (bad, why) in
            [("bad_name", ""), ("45.0.0.2", " (an address goes in allowed_cidrs)"), ("999.999.999.999", ""), ("example.123", ""), ("", "")]
        {
            let e = validate_internet(&with(bad), None).unwrap_err().to_string();
            assert_eq!(e, format!("invalid internet_settings.allowed_domains: {bad:?} is not a domain name{why}"));
        }
    }

    #[test]
    fn delete_batch_is_begin_delete_end_and_answers_are_found_by_sequence() {
        let b = delete_table_batch("smolvm_ab", 2);
        // begin (20) + delete (20 + 4 + "smolvm_ab\0" padded to 12) + end (20)
        assert_eq!(b.len(), 20 + 36 + 20);
        assert_eq!(u16::from_ne_bytes([b[24], b[25]]), (10 << 8) | 2);
        assert_eq!(&b[44..53], b"smolvm_ab");
        // The nlmsgerr's error sits right after the header; this one is for message 2.
        let mut reply = Vec::new();
        reply.extend_from_slice(&36u32.to_ne_bytes());
        reply.extend_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        reply.extend_from_slice(&[0, 0]);
        reply.extend_from_slice(&2u32.to_ne_bytes());
        reply.extend_from_slice(&0u32.to_ne_bytes());
        reply.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
        reply.extend_from_slice(&[0; 16]);
        assert_eq!(batch_answer(&reply, 2), Some(-libc::EPERM));
        assert_eq!(batch_answer(&reply, 3), None);
        assert_eq!(batch_answer(&reply[..10], 2), None);
    }

    #[test]
    fn a_tables_comment_names_its_sandbox_within_nfts_bound_and_quoting() {
        assert_eq!(table_comment(std::path::Path::new("/tmp/d"), "web"), "smolvm sandbox web in /tmp/d");
        assert!(ruleset("t", "smolvm sandbox web in /tmp/d", "smvabc", Lease(3), &InternetSettings::default(), None)
            .starts_with("table inet t {\n    comment \"smolvm sandbox web in /tmp/d\"\n"));
        assert!(!ruleset("t", "", "smvabc", Lease(3), &InternetSettings::default(), None).contains("comment"));
        // The directory as resolved, as in the table's name.
        let tmp = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(tmp.path(), tmp.path().join("alias")).unwrap();
        let real = std::fs::canonicalize(tmp.path()).unwrap();
        assert_eq!(table_comment(&tmp.path().join("alias").join("."), "x"), format!("smolvm sandbox x in {}", real.display()));
        // Quotes and backslashes would end nft's string or escape in it; a long path keeps its end.
        assert_eq!(table_comment(std::path::Path::new("/a\"b\\c\u{e9}"), "x"), "smolvm sandbox x in /a?b?c?");
        let long = table_comment(&std::path::Path::new("/").join("d".repeat(200)).join("tail"), "x");
        assert_eq!(long.len(), 128);
        assert!(long.starts_with("smolvm sandbox x in ...") && long.ends_with("d/tail"), "{long}");
    }

    #[test]
    fn ruleset_names_only_its_own_tap() {
        let rs = ruleset("smolvm_x", "x", "smvabc", Lease(3), &InternetSettings::default(), None);
        assert!(rs.contains("table inet smolvm_x"));
        assert!(rs.contains("ip saddr 172.16.0.14 oifname != \"smv*\" masquerade"));
        assert!(rs.contains("oifname \"smv*\" drop"));
        let off = ruleset("t", "t", "smvabc", Lease(3), &InternetSettings { mode: "off".into(), ..Default::default() }, None);
        assert!(!off.contains("dport 53"));
        // From the guest: IPv4 only, its own source address only, before anything is accepted
        // (a forged source could otherwise ride another sandbox's connection).
        let input = &rs[rs.find("chain input").unwrap()..];
        let first = |rule: &str| input.find(rule).unwrap() < input.find("ct state established").unwrap();
        assert!(first("iifname \"smvabc\" meta nfproto != ipv4 drop") && first("iifname \"smvabc\" ip saddr != 172.16.0.14 drop"), "{rs}");
        assert!(
            rs.contains("        meta nfproto != ipv4 drop\n        ip saddr != 172.16.0.14 drop\n        ct status dnat drop\n"),
            "{rs}"
        );
        // DNS over UDP to its own proxy only; no TCP 53 (the proxy does not serve it).
        assert!(rs.contains("iifname \"smvabc\" ip daddr 172.16.0.13 udp dport 53 accept") && !rs.contains("tcp dport 53"), "{rs}");
        assert!(rs.contains("100.100.100.200/32") && rs.contains("168.63.129.16/32") && rs.contains("169.254.0.0/16"), "{rs}");
        // New connections are counted, outward (before any is accepted) and to the host.
        assert!(rs.contains(" drop\n        ct state new ct count over 4096 drop\n        accept\n"), "{rs}");
        assert!(rs.contains("iifname \"smvabc\" ct state new ct count over 4096 drop\n        iifname \"smvabc\" ip daddr 172.16.0.13 udp dport 53 accept"), "{rs}");
        // Restricted: connections already made go on; new ones need an allowed address; and
        // both only past the checks above.
        let r = InternetSettings { mode: "restricted".into(), ..Default::default() };
        let rs = ruleset("t", "t", "smvabc", Lease(3), &r, None);
        let egress = &rs[rs.find("chain egress").unwrap()..rs.find("chain input").unwrap()];
        assert!(
            egress
                .ends_with("drop\n        ct state established,related accept\n        ip daddr @allow accept\n        drop\n    }\n    "),
            "{egress}"
        );
        // Off: nothing out at all, established or not.
        let off = ruleset("t", "t", "smvabc", Lease(3), &InternetSettings { mode: "off".into(), ..Default::default() }, None);
        let egress = &off[off.find("chain egress").unwrap()..off.find("chain input").unwrap()];
        assert!(!egress.contains("established") && !egress.contains("accept"), "{egress}");
    }

    #[test]
    fn a_sandbox_in_its_own_namespace_may_not_reach_the_host_through_its_way_out() {
        let also = [Cidr::parse("10.0.2.0/24").unwrap(), Cidr::parse("192.168.1.5").unwrap()];
        let rs = ruleset("t", "t", "smvabc", Lease(3), &InternetSettings::default(), Some(&also));
        let egress = &rs[rs.find("chain egress").unwrap()..rs.find("chain input").unwrap()];
        assert!(
            egress.contains("169.254.0.0/16") && egress.ends_with("drop\n        ip daddr @host drop\n        accept\n    }\n    "),
            "{egress}"
        );
        let set =
            "    set host {\n        type ipv4_addr\n        flags interval\n        elements = { 10.0.2.0/24, 192.168.1.5/32 }\n    }\n";
        assert!(rs.contains(set), "{rs}");
        assert_eq!(host_set_script("t", &also), "flush set inet t host\nadd element inet t host { 10.0.2.0/24, 192.168.1.5/32 }\n");
        // Its connections fill its own namespace's table, not the host's: no count.
        assert!(!rs.contains("ct count"), "{rs}");
    }

    #[test]
    fn overlapping_allowed_cidrs_are_refused() {
        let i = |c: &[&str]| InternetSettings {
            mode: "restricted".into(),
            allowed_domains: vec![],
            allowed_cidrs: c.iter().map(|c| c.to_string()).collect(),
        };
        assert!(validate_internet(&i(&["203.0.113.0/25", "203.0.113.128/25"]), None).is_ok());
        let err = validate_internet(&i(&["203.0.113.0/24", "203.0.113.128/25"]), None).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid internet_settings.allowed_cidrs: 203.0.113.128/25 overlaps 203.0.113.0/24, also in the list: give each range once"
        );
        assert!(validate_internet(&i(&["198.51.100.7/32", "198.51.100.7/32"]), None).is_err());
    }

    #[test]
    fn an_allowed_domain_given_twice_counts_once() {
        let i = |d: &[&str]| InternetSettings {
            mode: "restricted".into(),
            allowed_domains: d.iter().map(|d| d.to_string()).collect(),
            allowed_cidrs: vec![],
        };
        assert!(validate_internet(&i(&["pypi.org", "PyPI.org.", "pypi.org"]), None).is_ok());
        let policy = DnsPolicy::new(Some(i(&["pypi.org", "PyPI.org."]).allowed_domains), "t".into(), &[]);
        assert!(policy.permits("files.pypi.org") && !policy.permits("pypi.org.evil.com"));
    }

    #[test]
    fn learned_addresses_and_how_they_are_put_in() {
        let ip = |s: &str| -> Ipv4Addr { s.parse().unwrap() };
        let cidrs = vec![Cidr::parse("203.0.113.0/24").unwrap()];
        // TTLs of at least 30 s; private addresses, those of an allowed range and a repeat in
        // the same answer are left out.
        let answers =
            [(ip("93.184.216.34"), 10), (ip("10.0.0.1"), 60), (ip("203.0.113.9"), 60), (ip("1.2.3.4"), 600), (ip("1.2.3.4"), 600)];
        let add = learn(&answers, &cidrs);
        assert_eq!(add, vec![(ip("93.184.216.34"), 30), (ip("1.2.3.4"), 600)]);
        assert_eq!(
            allow_script("t", &add),
            "add element inet t allow { 93.184.216.34 timeout 30s, 1.2.3.4 timeout 600s }\n\
             delete element inet t allow { 93.184.216.34, 1.2.3.4 }\n\
             add element inet t allow { 93.184.216.34 timeout 30s, 1.2.3.4 timeout 600s }\n"
        );
    }

    /// Against the real nftables: an address learned again gets the new answer's timeout.
    #[test]
    fn a_relearned_address_has_its_new_timeout_in_the_kernel() {
        if !nix::unistd::geteuid().is_root() || nat_available().is_err() {
            panic!("this test needs root and nftables (`make prereqs` installs nftables)");
        }
        let table = format!("smolvm_test_{}", std::process::id());
        // Removed however the test ends: a table left behind fails every later check that no
        // sandbox's rules remain.
        struct Removed<'a>(&'a str);
        impl Drop for Removed<'_> {
            fn drop(&mut self) {
                let _ = nft_remove(self.0);
            }
        }
        let _removed = Removed(&table);
        let r = InternetSettings { mode: "restricted".into(), allowed_cidrs: vec!["1.2.3.0/24".into()], ..Default::default() };
        nft_apply(&table, "test", "smvtest0", Lease(9), &r, None).unwrap();
        let list = || {
            String::from_utf8_lossy(&Command::new("nft").args(["list", "set", "inet", &table, "allow"]).output().unwrap().stdout)
                .into_owned()
        };
        let policy = DnsPolicy::new(Some(vec![]), table.clone(), &r.allowed_cidrs);
        let ip: Ipv4Addr = "93.184.216.34".parse().unwrap();
        // An address inside the allowed range would make nft refuse the whole batch.
        nft_allow(&table, &learn(&[(ip, 40), ("1.2.3.5".parse().unwrap(), 40)], &policy.cidrs));
        assert!(list().contains("93.184.216.34 timeout 40s"), "{}", list());
        nft_allow(&table, &learn(&[(ip, 300)], &policy.cidrs));
        let set = list();
        assert!(set.contains("93.184.216.34 timeout 5m"), "{set}");
        nft_remove(&table).unwrap();
    }
}
