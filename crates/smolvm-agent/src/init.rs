//! PID 1 duties for minimal images.

use nix::mount::{mount, MsFlags};
use smolvm_proto::Share;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// smolvm's settings on the kernel command line, `smolvm_KEY=VALUE`. The kernel hands such
/// parameters (no dot in the name) to init as its environment, so PID 1 reads them there: the
/// first read of /proc/cmdline costs milliseconds under TCG. Any other process reads the file.
pub enum Cmdline {
    /// PID 1: the settings are its environment variables.
    Env,
    Words(Vec<String>),
}

impl Cmdline {
    pub fn read() -> Cmdline {
        if std::process::id() == 1 {
            return Cmdline::Env;
        }
        let text = fs::read_to_string("/proc/cmdline").unwrap_or_default();
        Cmdline::Words(text.split_whitespace().map(str::to_string).collect())
    }

    /// One lookup of one variable: copying the whole environment (`std::env::vars`) costs
    /// milliseconds of cold code under TCG.
    pub fn get(&self, key: &str) -> Option<String> {
        match self {
            Cmdline::Env => std::env::var(key).ok(),
            Cmdline::Words(words) => words.iter().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')).map(str::to_string),
        }
    }

    /// The host's shared directories (`smolvm_mounts=`; see the host's `SharedDir`).
    pub fn mounts(&self) -> Vec<Share> {
        self.get("smolvm_mounts").map(|v| parse_shares(&v)).unwrap_or_default()
    }

    /// The guest's network (`smolvm_net=`), if the host gave one.
    pub fn net(&self) -> Option<smolvm_proto::NetConfig> {
        self.get("smolvm_net").and_then(|v| smolvm_proto::NetConfig::from_boot_arg(&v))
    }

    pub fn flag(&self, key: &str) -> bool {
        matches!(self, Cmdline::Words(w) if w.iter().any(|w| w == key)) || self.get(key).as_deref() == Some("1")
    }
}

/// The host's `smolvm_mounts=` (see its `SharedDir::boot_arg`): `tag:hex path:ro|rw,...`;
/// entries that do not read so are left out (and logged).
fn parse_shares(arg: &str) -> Vec<Share> {
    let one = |entry: &str| -> Option<Share> {
        let mut parts = entry.split(':');
        let (tag, hex, mode) = (parts.next()?, parts.next()?, parts.next()?);
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<Vec<u8>>>()?;
        let path = String::from_utf8(bytes).ok().filter(|p| p.starts_with('/'))?;
        let readonly = match mode {
            "ro" => true,
            "rw" => false,
            _ => return None,
        };
        (parts.next().is_none() && !tag.is_empty()).then(|| Share { tag: tag.to_string(), path, readonly })
    };
    arg.split(',')
        .filter_map(|e| {
            let m = one(e);
            if m.is_none() {
                crate::log(&format!("ignoring a shared directory the host described as {e:?}"));
            }
            m
        })
        .collect()
}

fn mount_fs(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> io::Result<()> {
    fs::create_dir_all(target)?;
    mount(Some(src), target, Some(fstype), flags, data).map_err(|e| io::Error::other(format!("mount {target}: {e}")))
}

static DEV_MOUNTED: AtomicBool = AtomicBool::new(false);

/// /dev first of all: the agent's channel is a device node, and opening it early lets the host
/// greet the agent while the rest of the set-up runs.
pub fn mount_dev() -> io::Result<()> {
    if !DEV_MOUNTED.load(Ordering::Relaxed) {
        mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
        DEV_MOUNTED.store(true, Ordering::Relaxed);
    }
    Ok(())
}

/// The first thing PID 1 does: read the settings, load the image's modules and, in our own
/// initramfs, start the set-up thread (NIC, /proc, /sys, cgroup2, loopback). The NIC costs the most of it
/// under TCG (its receive buffers are allocated when it comes up) and commands wait for it, so
/// it starts before anything else (after /dev and the channel it was done ~8 ms later, and the
/// first command often waited for it).
pub fn start() -> Cmdline {
    let cmdline = Cmdline::read();
    // Before the set-up thread: a kernel with modules gets its NIC driver here.
    load_modules();
    // A root disk moves /proc and /sys along when it becomes `/`, and its resolv.conf is
    // written after the switch: there the set-up runs in `setup`.
    if cmdline.get("smolvm_root").is_none() {
        spawn_setup(cmdline.net(), true, cmdline.mounts());
    }
    cmdline
}

/// The set-up that commands wait for (`pending::wait`) and the agent does not, on a thread of
/// its own: the NIC, /proc and /sys (`proc_sys`: a root disk brings its own along), cgroup2 and
/// the loopback device.
fn spawn_setup(net: Option<smolvm_proto::NetConfig>, proc_sys: bool, mounts: Vec<Share>) {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    crate::pending::spawn(move || {
        // Commands wait for these: a command that finds its workspace empty would be wrong.
        mount_shares(&mounts);
        if let Some(cfg) = net {
            crate::net::configure_now(&cfg);
        }
        if proc_sys {
            for (src, target) in [("proc", "/proc"), ("sysfs", "/sys")] {
                if let Err(e) = mount_fs(src, target, src, nosuid, None) {
                    crate::log(&e.to_string());
                }
            }
        }
        crate::cgroup::mount();
        loopback_up();
    });
}

/// Mount the host's shared directories, each tag tried once in the agent's life (a host may
/// greet a restored guest twice). One that fails is recorded for good, and every command then
/// fails with why.
fn mount_shares(mounts: &[Share]) {
    static TRIED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    for m in mounts {
        let mut tried = TRIED.lock().unwrap_or_else(|e| e.into_inner());
        if tried.contains(&m.tag) {
            continue;
        }
        tried.push(m.tag.clone());
        let flags = if m.readonly { MsFlags::MS_RDONLY } else { MsFlags::empty() };
        if let Err(e) = mount_fs(&m.tag, &m.path, "9p", flags, Some("trans=virtio,version=9p2000.L,msize=524288")) {
            crate::pending::fail(format!("the host directory for {} could not be mounted ({e})", m.path));
        }
    }
}

/// A restored guest's shares (`Request::Hello`'s `mounts`), mounted on a thread of their own
/// that commands wait for, as a booted guest's are.
pub fn mount_in_background(mounts: Vec<Share>) {
    crate::pending::spawn(move || mount_shares(&mounts));
}

/// The rest of PID 1's set-up, after `start` and the agent channel's early open.
pub fn setup(cmdline: &Cmdline) -> io::Result<()> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_dev()?;
    let root_disk = cmdline.get("smolvm_root").is_some();
    if root_disk {
        mount_fs("proc", "/proc", "proc", nosuid, None)?;
        mount_fs("sysfs", "/sys", "sysfs", nosuid, None)?;
    }
    // The thread the first command runs on, started now: not from the set-up thread, which
    // commands wait for, and not when the command comes, since a new thread costs milliseconds
    // on a cold guest.
    crate::workers::start();
    // One pool of memory for the guest's scratch space. Each a tmpfs of half the guest's
    // memory, /run, /tmp, /dev/shm (and the initramfs's own /) were together promised twice
    // what the guest has: filling two of them (a download into /tmp, another into /root) ran
    // the kernel out of memory, and it panicked where a write should have said "No space left
    // on device". In the initramfs they are directories of its own tmpfs; beside a root disk
    // they share one tmpfs at /run.
    if root_disk {
        mount_fs("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    }
    if let Some(root) = cmdline.get("smolvm_root") {
        switch_root(&root)?;
    }
    mount_fs("devpts", "/dev/pts", "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("ptmxmode=0666,mode=0620"))?;
    let mut shared = vec![("/run/shm", "/dev/shm")];
    if root_disk {
        shared.push(("/run/tmp", "/tmp"));
    }
    for (dir, target) in shared {
        scratch_dir(dir)?;
        fs::create_dir_all(target)?;
        mount(Some(dir), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| io::Error::other(format!("mount {target}: {e}")))?;
    }
    // As udev and every init make them: without these, `echo x > /dev/stderr` writes a plain
    // file on devtmpfs, and the output never reaches the caller.
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    set_hostname(&cmdline.get("smolvm_hostname").unwrap_or_else(|| "smolvm".into()));
    if root_disk {
        // After the switch, so that resolv.conf is written into the root disk.
        spawn_setup(cmdline.net(), false, cmdline.mounts());
    }
    Ok(())
}

/// A directory anyone may write into, as /tmp is (sticky: only its owner removes a file).
fn scratch_dir(dir: &str) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o1777))
}

/// Set the hostname and /etc/hostname, unless the hostname is that already (a cold boot's
/// greeting repeats the command line's name; the file's write costs a millisecond on the way to
/// the first command).
pub fn set_hostname(name: &str) {
    if nix::unistd::gethostname().is_ok_and(|h| h == name) {
        return;
    }
    let _ = nix::unistd::sethostname(name);
    let _ = replace_file("/etc/hostname", format!("{name}\n").as_bytes());
}

/// Write a small system file whole, as a new file renamed over the old: never through what is
/// there. Root in the guest may have left a FIFO at the path, whose open would hold PID 1 (or
/// the set-up every command waits for) for good, or a link.
pub fn replace_file(path: &str, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = format!("{path}.smolvm-new");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o644).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
    let written = f.write_all(data).and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Images built for a kernel with modules (Debian's cloud kernel) list them, in load order, in
/// /lib/modules/smolvm.order; our own kernel has everything built in and the file is absent.
fn load_modules() {
    let Ok(order) = fs::read_to_string("/lib/modules/smolvm.order") else {
        return;
    };
    for name in order.lines().filter(|l| !l.trim().is_empty()) {
        let path = format!("/lib/modules/{}", name.trim());
        match fs::File::open(&path) {
            Ok(f) => {
                if let Err(e) = nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty()) {
                    if e != nix::errno::Errno::EEXIST {
                        crate::log(&format!("loading {name}: {e}"));
                    }
                }
            }
            Err(e) => crate::log(&format!("opening {path}: {e}")),
        }
    }
}

/// Mount the root disk and make it `/`, carrying the pseudo filesystems along, so that commands
/// run in the user's root filesystem while the agent (already in memory) keeps serving.
fn switch_root(device: &str) -> io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !Path::new(device).exists() {
        if std::time::Instant::now() > deadline {
            return Err(io::Error::other(format!("root device {device} did not appear")));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    mount_fs(device, "/newroot", "ext4", MsFlags::empty(), None)?;
    if let Err(e) = grow_root(device, "/newroot") {
        crate::log(&format!("growing the root filesystem: {e}"));
    }
    for dir in ["/proc", "/sys", "/dev", "/run"] {
        let target = format!("/newroot{dir}");
        fs::create_dir_all(&target)?;
        mount(Some(dir), target.as_str(), None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(|e| io::Error::other(format!("move {dir}: {e}")))?;
    }
    free_initramfs();
    std::env::set_current_dir("/newroot")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|e| io::Error::other(format!("move root: {e}")))?;
    nix::unistd::chroot(".").map_err(|e| io::Error::other(format!("chroot: {e}")))?;
    std::env::set_current_dir("/")?;
    Ok(())
}

/// Remove the initramfs's files before the root disk is moved over them: hidden under it for
/// good, they would hold guest memory for the VM's life (2 MB; more with a kernel's modules),
/// as busybox's `switch_root` also knows. Only the initramfs's own: nothing on another
/// filesystem (the root disk at /newroot, and what was moved there). The agent runs on from its
/// unlinked binary.
fn free_initramfs() {
    use std::os::unix::fs::MetadataExt;
    fn clear(dir: &Path, dev: u64) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            match fs::symlink_metadata(&path) {
                Ok(m) if m.dev() != dev => {}
                Ok(m) if m.is_dir() => {
                    clear(&path, dev);
                    let _ = fs::remove_dir(&path);
                }
                Ok(_) => {
                    let _ = fs::remove_file(&path);
                }
                Err(_) => {}
            }
        }
    }
    if let Ok(root) = fs::symlink_metadata("/") {
        clear(Path::new("/"), root.dev());
    }
}

nix::ioctl_read!(blk_size_bytes, 0x12, 114, u64);
nix::ioctl_write_ptr!(ext4_resize, b'f', 16, u64);

/// When the host made the sandbox's disk larger than the image's filesystem (`disk_size_mib`),
/// grow the filesystem online to fill it. Cheap when there is nothing to do.
fn grow_root(device: &str, mountpoint: &str) -> io::Result<()> {
    use std::io::{Read, Seek};
    use std::os::fd::AsRawFd;
    let mut dev = fs::File::open(device)?;
    let mut bytes = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    unsafe { blk_size_bytes(dev.as_raw_fd(), &mut bytes) }.map_err(io::Error::from)?;
    // The ext4 superblock sits at byte 1024: block count (lo at 4, hi at 0x150 with the 64bit
    // feature), log2(block size) - 10 at 24, incompat features at 0x60.
    let mut sb = [0u8; 1024];
    dev.seek(io::SeekFrom::Start(1024))?;
    dev.read_exact(&mut sb)?;
    let le32 = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]) as u64;
    let block = 1024u64 << le32(24);
    let is64 = le32(0x60) & 0x80 != 0;
    let blocks = le32(4) | if is64 { le32(0x150) << 32 } else { 0 };
    let wanted = bytes / block;
    if wanted <= blocks {
        return Ok(());
    }
    let root = fs::File::open(mountpoint)?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 (the new block count) through the pointer.
    unsafe { ext4_resize(root.as_raw_fd(), &wanted) }.map_err(io::Error::from)?;
    Ok(())
}

fn loopback_up() {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let Ok(sock) = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None) else {
        return;
    };
    // SAFETY: ifreq is plain old data; zeroed is a valid value for it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: the socket is open, `req` is a valid ifreq naming "lo" that outlives both calls,
    // and SIOCGIFFLAGS/SIOCSIFFLAGS read and write only its flags field.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req);
        }
    }
}

/// Sync disks, then reset: with `reboot=t` on the kernel command line and QEMU's `-no-reboot`,
/// a reset makes the VMM exit, which needs no ACPI (microvm runs without it).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None::<&str>);
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_directories_read_as_the_host_writes_them() {
        // "/workspace/a b" and "/mnt/c", as the host's SharedDir::boot_arg writes them.
        let got = parse_shares("smolvm0:2f776f726b73706163652f612062:ro,smolvm1:2f6d6e742f63:rw");
        assert_eq!(
            got,
            vec![
                Share { tag: "smolvm0".into(), path: "/workspace/a b".into(), readonly: true },
                Share { tag: "smolvm1".into(), path: "/mnt/c".into(), readonly: false },
            ]
        );
        // Odd hex, a relative path, an unknown mode, extra fields: left out.
        for bad in ["smolvm0:2f6:ro", "smolvm0:61:ro", "smolvm0:2f61:rx", "smolvm0:2f61:ro:x", ":2f61:ro"] {
            assert_eq!(parse_shares(bad), vec![], "{bad}");
        }
    }
}
