//! A cgroup (v2, no controllers) per command. A process group loses a daemon that double-forked
//! (its parent exited, so it belongs to PID 1, in a session of its own); a cgroup keeps every
//! descendant, whatever it does with sessions and groups, so a timeout or a cancel can kill all
//! of them at once (`cgroup.kill`). Where the kernel has no cgroups, nothing here does anything
//! and commands are killed by process group and process tree alone.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

const ROOT: &str = "/sys/fs/cgroup";
const PARENT: &str = "/sys/fs/cgroup/smolvm";

static AVAILABLE: AtomicBool = AtomicBool::new(false);

/// Whether the first command's group (0) was made at boot.
static PREMADE: AtomicBool = AtomicBool::new(false);

/// Groups whose command ended while processes it started still ran: removed once empty.
static LEFT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// At boot, once /sys is mounted. Commands are grouped only where the kernel can kill a group
/// (`cgroup.kill`, 5.14) and the mount has `favordynmods`: without it each move of a process
/// between groups (two at every command start) waits for an RCU grace period, tens of
/// milliseconds at this kernel's 100 Hz. Forks pay a little for it instead. Elsewhere commands
/// are killed by process group and process tree alone.
pub fn mount() {
    use nix::mount::{mount, MsFlags};
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    // Mounted here with the option, or already there (then its options are looked up).
    let favoured = if !std::path::Path::new(ROOT).join("cgroup.procs").exists() {
        if std::fs::create_dir_all(ROOT).is_err() {
            return;
        }
        // Turning `favordynmods` on waits for one RCU grace period: expedited ones (asked for
        // on the kernel command line until the first command is answered, `relax_rcu`) keep
        // that to a fraction of a millisecond.
        match mount(Some("cgroup2"), ROOT, Some("cgroup2"), flags, Some("favordynmods")) {
            Ok(()) => true,
            // A kernel without the option (before 6.0): cgroup2 for the commands' own use,
            // without a group each.
            Err(nix::errno::Errno::EINVAL) => {
                let _ = mount(Some("cgroup2"), ROOT, Some("cgroup2"), flags, None::<&str>);
                false
            }
            // ENODEV: a kernel without cgroups.
            Err(_) => false,
        }
    } else {
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with(&format!("cgroup2 {ROOT} ")) && l.contains("favordynmods"))
    };
    // (`cgroup.kill` is in every group but the root.)
    if favoured && std::fs::create_dir_all(PARENT).is_ok() && std::path::Path::new(PARENT).join("cgroup.kill").exists() {
        AVAILABLE.store(true, Ordering::SeqCst);
        // The first command's group, made now: on a cold guest a mkdir here is milliseconds
        // off the way to the first command (commands are numbered from 0).
        if std::fs::create_dir(path(0)).is_ok() {
            PREMADE.store(true, Ordering::SeqCst);
        }
    }
}

/// The host asks for expedited RCU grace periods on the kernel command line for the boot's
/// cgroup2 mount (above). Once the first command has been answered the kernel's default comes
/// back, unless the user's boot arguments asked for them too (a second setting).
pub fn relax_rcu() {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let asked: Vec<&str> = cmdline.split_whitespace().filter_map(|w| w.strip_prefix("rcupdate.rcu_expedited=")).collect();
    if asked == ["1"] {
        let _ = std::fs::write("/sys/kernel/rcu_expedited", "0");
    }
}

fn path(token: u64) -> PathBuf {
    PathBuf::from(format!("{PARENT}/{token}"))
}

/// Make the command's group, before it starts: false where commands are not grouped or the
/// group could not be made (it then runs without one).
pub fn create(token: u64) -> bool {
    if !AVAILABLE.load(Ordering::SeqCst) {
        return false;
    }
    if token == 0 && PREMADE.swap(false, Ordering::SeqCst) {
        return true;
    }
    let mut left = LEFT.lock().unwrap_or_else(|e| e.into_inner());
    // Kept: what is still there (busy); gone: removed now, or by someone else.
    left.retain(|p| !remove_tree(p) && p.exists());
    drop(left);
    std::fs::create_dir(path(token)).is_ok()
}

/// The group a command's child starts in (`spawn`): none where commands are not grouped.
pub fn dir(token: u64, grouped: bool) -> Option<PathBuf> {
    grouped.then(|| path(token))
}

/// Kill every process in the command's group: false where that could not be done.
pub fn kill(token: u64) -> bool {
    AVAILABLE.load(Ordering::SeqCst) && std::fs::write(path(token).join("cgroup.kill"), "1").is_ok()
}

/// The command has ended: its group goes, now if it is empty, else once it is.
pub fn release(token: u64) {
    if !AVAILABLE.load(Ordering::SeqCst) {
        return;
    }
    let p = path(token);
    if !remove_tree(&p) && p.exists() {
        LEFT.lock().unwrap_or_else(|e| e.into_inner()).push(p);
    }
}

/// Remove a command's group with any groups the command made inside it (a cgroup directory is
/// removed only once it holds no group and no process): false while a process is in one.
fn remove_tree(p: &std::path::Path) -> bool {
    if std::fs::remove_dir(p).is_ok() {
        return true;
    }
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path());
        }
    }
    std::fs::remove_dir(p).is_ok()
}
