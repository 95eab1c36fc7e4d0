//! A snapshot's boot files. A snapshot outlives the image cache entries it booted from: an
//! upgrade builds a new initramfs, `image prune` keeps only the newest entries, `image rm`
//! removes one. So a snapshot holds its own hard links to its kernel, its initrd and the bottom
//! of its disk's backing chain (links cost no space, and keep a removed entry's file alive), and
//! its `image.json` names those.

use crate::error::{Error, IoContext, Result};
use crate::image::{keep_file as keep, run_checked, BootImage};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `<dir>/boot/<the file's directory>/<its name>`: the names say what the file is, as in the
/// cache (a kernel smolvm built is known by being `kernel-<fp>/vmlinux`, and boots with
/// settings of its own).
fn boot_name(dir: &Path, file: &Path) -> Result<PathBuf> {
    let name = file.file_name().ok_or_else(|| Error::Host(format!("{} is not a file", file.display())))?;
    let parent = file.parent().and_then(Path::file_name).unwrap_or(std::ffi::OsStr::new("files"));
    // (Not `create_dir_all`: a snapshot given up meanwhile is removed, and must stay so.)
    let at = dir.join("boot").join(parent);
    for d in [dir.join("boot"), at.clone()] {
        match fs::create_dir(&d) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(Error::Host(format!("creating {}: {e}", d.display()))),
            _ => {}
        }
    }
    Ok(at.join(name))
}

/// One image of a backing chain, as `qemu-img info --backing-chain` lists them, top first.
#[derive(serde::Deserialize)]
struct Layer {
    filename: PathBuf,
    format: String,
}

fn backing_chain(disk: &Path) -> Result<Vec<Layer>> {
    // -U: lower layers may be open in running sandboxes.
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(disk)
        .output()
        .ctx(|| "running qemu-img info".into())?;
    if !out.status.success() {
        return Err(Error::Host(format!("qemu-img info {}: {}", disk.display(), String::from_utf8_lossy(&out.stderr).trim())));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| Error::Host(format!("qemu-img info {}: {e}", disk.display())))
}

/// Point the snapshot's disk (a copy of the sandbox's overlay) at the snapshot's own link to
/// the chain's bottom. A chain with layers between them (a sandbox started from another
/// snapshot) is flattened into one overlay, so deleting that other snapshot breaks nothing.
fn detach_disk(disk: &Path, dir: &Path) -> Result<()> {
    let chain = backing_chain(disk)?;
    // The disk itself, then at least its base.
    let [_, .., bottom] = chain.as_slice() else { return Ok(()) };
    let base = keep(&bottom.filename, &dir.join("base"))?;
    if chain.len() == 2 {
        // Same contents under another name: only the header's backing path changes.
        return run_checked(
            Command::new("qemu-img").args(["rebase", "-u", "-F", &bottom.format, "-b"]).arg(&base).arg(disk),
            "pointing the snapshot's disk at its base",
        );
    }
    // A safe (not -u) rebase writes into the disk what the layers in between hold, so that it
    // reads the same over the base alone. (`convert -B` would not: it skips what the top layer
    // leaves to its backing, layers in between included.)
    run_checked(
        Command::new("qemu-img").args(["rebase", "-U", "-q", "-F", &bottom.format, "-b"]).arg(&base).arg(disk),
        "flattening the snapshot's disk",
    )
}

/// Give the snapshot in `dir` its own boot files and rewrite its image.json to name them.
pub fn detach(dir: &Path) -> Result<()> {
    let path = dir.join("image.json");
    let mut image: BootImage = fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| Error::Host(format!("the snapshot in {} has no readable image.json", dir.display())))?;
    image.kernel = keep(&image.kernel, &boot_name(dir, &image.kernel)?)?;
    if let Some(initrd) = &image.initrd {
        image.initrd = Some(keep(initrd, &boot_name(dir, initrd)?)?);
    }
    if let Some(disk) = image.rootfs.as_deref().filter(|d| d.starts_with(dir)) {
        detach_disk(disk, dir)?;
    }
    let tmp = dir.join("image.json.tmp");
    fs::write(&tmp, serde_json::to_vec(&image).expect("image serializes"))
        .and_then(|_| fs::rename(&tmp, &path))
        .ctx(|| "writing the snapshot's image.json".into())
}

/// Marks a snapshot directory whose snapshot is still being made, with its maker's identity
/// ("pid start"): `sandbox prune` removes directories with no record unless their maker lives.
const MAKING: &str = "making";

/// Claim `dir` for a new snapshot: created (0700: a snapshot holds the guest's memory and its
/// env values) or, when it is only the leftover of a maker that died, taken over. A directory
/// another process is filling is not touched: two makers of one id cannot delete each other's
/// files.
pub fn claim(dir: &Path, id: &str) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = dir.parent().expect("snapshot directories have a parent");
    fs::DirBuilder::new().recursive(true).mode(0o700).create(parent).ctx(|| format!("creating {}", parent.display()))?;
    let _claiming = lock(parent)?;
    let create = || fs::DirBuilder::new().mode(0o700).create(dir);
    match create() {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && orphaned(dir) => {
            fs::remove_dir_all(dir).ctx(|| format!("removing the leftover {}", dir.display()))?;
            create().ctx(|| format!("creating {}", dir.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Without the mark it is made, and its record on the way.
            let why = if dir.join(MAKING).exists() { "is being made by another process" } else { "already exists" };
            return Err(Error::validation("snapshot_id", format!("snapshot '{id}' {why}")));
        }
        Err(e) => return Err(Error::Host(format!("creating {}: {e}", dir.display()))),
    }
    let me = crate::store::ProcId::of(std::process::id() as i32).map(|p| format!("{} {}", p.pid, p.start)).unwrap_or_default();
    // Whole or not at all: a reader outside the lock (`orphaned`) must never find it half written.
    crate::image::write_whole(&dir.join(MAKING), me.as_bytes()).ctx(|| "marking the snapshot as being made".into())
}

/// Held while a snapshot directory is claimed, taken over, reaped or deleted: between one
/// process's look at a directory (whose maker is gone, whose record went) and its removal,
/// another's new snapshot of that id must not be made there, to be removed with it.
pub fn lock(snapshots: &Path) -> Result<nix::fcntl::Flock<fs::File>> {
    // Beside the directory, not in it: every entry there is a snapshot's.
    let path = snapshots.with_extension("lock");
    let f = fs::File::create(&path).ctx(|| format!("creating {}", path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| Error::Host(format!("locking the snapshots: {e}")))
}

/// A snapshot directory claimed by this process: removed when this goes, unless `made`.
pub struct Making {
    dir: Option<PathBuf>,
    /// Whether `detach` runs on its blocking thread, and whether this was given up meanwhile.
    busy: std::sync::Arc<std::sync::Mutex<(bool, bool)>>,
}

impl Making {
    pub fn new(dir: &Path) -> Making {
        Making { dir: Some(dir.to_path_buf()), busy: Default::default() }
    }

    /// [`detach`] on a blocking thread, which outlives this future if it is dropped (Ctrl-C):
    /// the thread then removes the directory once it is done. Removed at once, the directory
    /// would take the thread's last writes after a retry of the same id had made it again.
    pub async fn detach(&self) -> Result<()> {
        let Some(dir) = self.dir.clone() else { return Ok(()) };
        self.on_thread(move || detach(&dir)).await
    }

    async fn on_thread(&self, work: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
        let Some(dir) = self.dir.clone() else { return Ok(()) };
        let busy = self.busy.clone();
        busy.lock().unwrap_or_else(|e| e.into_inner()).0 = true;
        *IN_FLIGHT.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        tokio::task::spawn_blocking(move || {
            let r = work();
            let mut b = busy.lock().unwrap_or_else(|e| e.into_inner());
            b.0 = false;
            if b.1 {
                remove(&dir);
            }
            drop(b);
            *IN_FLIGHT.0.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
            IN_FLIGHT.1.notify_all();
            r
        })
        .await
        .map_err(|e| Error::Host(e.to_string()))?
    }

    /// The snapshot is made and recorded: its files stay.
    pub fn made(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = fs::remove_file(dir.join(MAKING));
        }
    }
}

impl Drop for Making {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        let mut b = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if b.0 {
            // `detach` still runs: it removes the directory when done.
            b.1 = true;
            return;
        }
        drop(b);
        remove(&dir);
    }
}

/// Threads of [`Making::on_thread`] still running, and word when one ends.
static IN_FLIGHT: (std::sync::Mutex<usize>, std::sync::Condvar) = (std::sync::Mutex::new(0), std::sync::Condvar::new());

/// Let given-up snapshots' threads finish removing their files, for at most `bound`. A
/// process that exits at once (the CLI after Ctrl-C, Python at the end of its script) would
/// kill them half way, leaving the half-made snapshot (hundreds of MB) until the next command
/// that reaps leftovers. (Past the bound, that command still does.)
pub fn wait_for_given_up(bound: std::time::Duration) {
    let guard = IN_FLIGHT.0.lock().unwrap_or_else(|e| e.into_inner());
    let _ = IN_FLIGHT.1.wait_timeout_while(guard, bound, |n| *n > 0);
}

/// A given-up snapshot's directory. The supervisor's save, cancelled, may still be writing its
/// last files: a few tries outlast them.
fn remove(dir: &Path) {
    // (Under the claim lock: a maker of the same id that found this directory half removed,
    // its mark gone, must not make its own there meanwhile, to lose it to the last `rmdir`.)
    let _claims = dir.parent().map(lock);
    for _ in 0..5 {
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => std::thread::sleep(std::time::Duration::from_millis(20)),
            _ => return,
        }
    }
}

/// A snapshot directory with no record is a leftover unless its maker still runs. One too new
/// to carry the mark yet counts as being made.
pub fn orphaned(dir: &Path) -> bool {
    let maker = fs::read_to_string(dir.join(MAKING)).ok().and_then(|text| {
        let mut it = text.split_whitespace().map(str::parse::<u64>);
        match (it.next(), it.next()) {
            (Some(Ok(pid)), Some(Ok(start))) => Some(crate::store::ProcId { pid: pid as i32, start }),
            _ => None,
        }
    });
    match maker {
        Some(maker) => !maker.alive(),
        // (A mark that cannot be read is taken for none.)
        None => crate::sandbox::older_than_a_minute(dir),
    }
}

/// A snapshot whose files are gone (one made before snapshots kept their own, whose cache
/// entry was since removed) cannot boot: say which file, instead of letting QEMU fail.
pub fn check(snapshot_id: &str, image: &BootImage) -> Result<()> {
    for (what, path) in [("kernel", Some(&image.kernel)), ("initrd", image.initrd.as_ref()), ("disk", image.rootfs.as_ref())] {
        if let Some(p) = path.filter(|p| !p.exists()) {
            return Err(Error::Host(format!(
                "snapshot '{snapshot_id}' cannot be restored: its {what} {} is gone (removed from the image cache?)",
                p.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot given up while its thread puts its files in place: the thread removes them
    /// once done, and a process about to exit can wait for that.
    #[tokio::test]
    async fn a_given_up_snapshots_thread_is_waited_for() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snap");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("state"), b"saved").unwrap();
        let making = Making::new(&dir);
        let slow = making.on_thread(|| {
            std::thread::sleep(std::time::Duration::from_millis(300));
            Ok(())
        });
        assert!(tokio::time::timeout(std::time::Duration::from_millis(20), slow).await.is_err());
        drop(making);
        assert!(dir.exists(), "removed under the thread still writing into it");
        wait_for_given_up(std::time::Duration::from_secs(10));
        assert!(!dir.exists(), "the given-up snapshot's files stay");
    }
    use std::os::unix::fs::MetadataExt;

    fn age(dir: &Path) {
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        fs::File::open(dir).unwrap().set_modified(old).unwrap();
    }

    #[test]
    fn a_claimed_directory_is_private_and_only_a_dead_makers_is_taken_over() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snapshots").join("abc");
        claim(&dir, "s1").unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(!orphaned(&dir), "a live maker's directory counts as a leftover");
        // A second maker of the same id neither waits nor deletes the first one's files.
        fs::write(dir.join("state"), b"first").unwrap();
        let err = claim(&dir, "s1").unwrap_err().to_string();
        assert_eq!(err, "invalid snapshot_id: snapshot 's1' is being made by another process");
        assert_eq!(fs::read(dir.join("state")).unwrap(), b"first");
        // Made: no mark; recent, so not a leftover yet (its record may be in flight); old, it is.
        Making::new(&dir).made();
        let err = claim(&dir, "s1").unwrap_err().to_string();
        assert_eq!(err, "invalid snapshot_id: snapshot 's1' already exists");
        assert!(!orphaned(&dir));
        age(&dir);
        assert!(orphaned(&dir));
        // A maker that died: its directory is a leftover, and the next maker takes it over.
        fs::write(dir.join(MAKING), "2147483646 1").unwrap();
        assert!(orphaned(&dir));
        claim(&dir, "s1").unwrap();
        assert!(!dir.join("state").exists());
        // A mark that cannot be read (cut short) is no dead maker's: new, it is being made.
        fs::write(dir.join(MAKING), "").unwrap();
        assert!(!orphaned(&dir));
    }

    /// Makers of one id at once, some finding a dead maker's leftover: one of them has it,
    /// and its mark, and every other one is told so.
    #[test]
    fn of_makers_of_one_id_at_once_one_has_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snapshots").join("abc");
        for round in 0..20 {
            if round % 2 == 1 {
                fs::create_dir_all(&dir).unwrap();
                fs::write(dir.join(MAKING), "2147483646 1").unwrap();
            }
            let won: usize = std::thread::scope(|s| {
                let makers: Vec<_> = (0..6).map(|_| s.spawn(|| claim(&dir, "s1").is_ok())).collect();
                makers.into_iter().map(|m| usize::from(m.join().unwrap())).sum()
            });
            assert_eq!(won, 1, "round {round}");
            assert!(!orphaned(&dir), "round {round}: the winner's mark is not there");
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    /// A making given up (its future dropped) takes its directory with it; one made keeps it.
    #[test]
    fn a_snapshot_given_up_leaves_no_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snapshots").join("abc");
        claim(&dir, "s1").unwrap();
        fs::write(dir.join("state"), b"saved").unwrap();
        drop(Making::new(&dir));
        assert!(!dir.exists());
        claim(&dir, "s1").unwrap();
        Making::new(&dir).made();
        assert!(dir.join("boot").parent().unwrap().exists() && !dir.join(MAKING).exists());
        // Files for the boot are not put into a directory given up meanwhile.
        let gone = tmp.path().join("snapshots").join("gone");
        assert!(boot_name(&gone, Path::new("/x/kernel-1/vmlinux")).is_err());
        assert!(!gone.exists());
    }

    /// Given up while its files were being linked on a blocking thread: the directory stays
    /// until that thread is done (a retry of the id would take its last writes), then goes.
    #[tokio::test]
    async fn a_snapshot_given_up_while_its_thread_works_goes_once_that_is_done() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("snapshots").join("abc");
        claim(&dir, "s1").unwrap();
        let making = Making::new(&dir);
        let (go, wait) = std::sync::mpsc::channel::<()>();
        tokio::select! {
            _ = making.on_thread(move || { let _ = wait.recv(); Ok(()) }) => panic!("the work ended before it was let go"),
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
        }
        drop(making);
        assert!(dir.exists(), "removed under the thread still writing into it");
        go.send(()).unwrap();
        let since = std::time::Instant::now();
        while dir.exists() && since.elapsed() < std::time::Duration::from_secs(5) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!dir.exists(), "the thread left the given-up directory");
    }

    #[test]
    fn a_snapshot_keeps_its_kernel_and_initrd_when_the_cache_entry_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("initramfs-1");
        let snap = tmp.path().join("snap");
        fs::create_dir_all(&cache).unwrap();
        fs::create_dir_all(&snap).unwrap();
        fs::write(cache.join("vmlinux"), b"kernel").unwrap();
        fs::write(cache.join("initramfs.cpio"), b"initrd").unwrap();
        let image = BootImage { kernel: cache.join("vmlinux"), initrd: Some(cache.join("initramfs.cpio")), rootfs: None };
        fs::write(snap.join("image.json"), serde_json::to_vec(&image).unwrap()).unwrap();
        check("s", &image).unwrap();

        detach(&snap).unwrap();
        let kept: BootImage = serde_json::from_slice(&fs::read(snap.join("image.json")).unwrap()).unwrap();
        assert_eq!(kept.kernel, snap.join("boot/initramfs-1/vmlinux"));
        assert_eq!(kept.initrd.as_deref(), Some(snap.join("boot/initramfs-1/initramfs.cpio").as_path()));
        // A link, not a copy.
        assert_eq!(fs::metadata(&kept.kernel).unwrap().ino(), fs::metadata(&image.kernel).unwrap().ino());

        fs::remove_dir_all(&cache).unwrap();
        check("s", &kept).unwrap();
        assert_eq!(fs::read(kept.initrd.unwrap()).unwrap(), b"initrd");
        let err = check("s", &image).unwrap_err().to_string();
        assert!(err.contains("snapshot 's' cannot be restored: its kernel") && err.contains("is gone"), "{err}");
    }
}
