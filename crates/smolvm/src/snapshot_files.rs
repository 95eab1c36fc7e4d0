//! A snapshot's boot files. A snapshot outlives the image cache entries it booted from: an
//! upgrade builds a new initramfs, `image prune` keeps only the newest entries, `image rm`
//! removes one. So a snapshot holds its own hard links to its kernel, its initrd and the bottom
//! of its disk's backing chain (links cost no space, and keep a removed entry's file alive), and
//! its `image.json` names those.

use crate::error::{Error, IoContext, Result};
use crate::image::{run_checked, BootImage};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Link `src` as `dst`. Across filesystems (a cache on another disk than the data directory)
/// small files are copied; a disk base (`copy: false`) stays where it is, and the snapshot
/// keeps depending on it.
fn keep(src: &Path, dst: &Path, copy: bool) -> Result<PathBuf> {
    let _ = fs::remove_file(dst);
    match fs::hard_link(src, dst) {
        Ok(()) => Ok(dst.to_path_buf()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) && copy => {
            fs::copy(src, dst).ctx(|| format!("copying {} into the snapshot", src.display()))?;
            Ok(dst.to_path_buf())
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => Ok(src.to_path_buf()),
        Err(e) => Err(Error::Host(format!("linking {} into the snapshot: {e}", src.display()))),
    }
}

/// `<dir>/boot/<the file's directory>/<its name>`: the names say what the file is, as in the
/// cache (a kernel smolvm built is known by being `kernel-<fp>/vmlinux`, and boots with
/// settings of its own).
fn boot_name(dir: &Path, file: &Path) -> Result<PathBuf> {
    let name = file.file_name().ok_or_else(|| Error::Host(format!("{} is not a file", file.display())))?;
    let parent = file.parent().and_then(Path::file_name).unwrap_or(std::ffi::OsStr::new("files"));
    let at = dir.join("boot").join(parent);
    fs::create_dir_all(&at).ctx(|| format!("creating {}", at.display()))?;
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
    let [.., bottom] = chain.as_slice() else { return Ok(()) };
    if chain.len() < 2 {
        return Ok(());
    }
    let base = keep(&bottom.filename, &dir.join("base"), false)?;
    if chain.len() == 2 {
        if base != bottom.filename {
            // Same contents under another name: only the header's backing path changes.
            run_checked(
                Command::new("qemu-img").args(["rebase", "-u", "-F", &bottom.format, "-b"]).arg(&base).arg(disk),
                "pointing the snapshot's disk at its base",
            )?;
        }
        return Ok(());
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
    image.kernel = keep(&image.kernel, &boot_name(dir, &image.kernel)?, true)?;
    if let Some(initrd) = &image.initrd {
        image.initrd = Some(keep(initrd, &boot_name(dir, initrd)?, true)?);
    }
    if let Some(disk) = image.rootfs.as_deref().filter(|d| d.starts_with(dir)) {
        detach_disk(disk, dir)?;
    }
    let tmp = dir.join("image.json.tmp");
    fs::write(&tmp, serde_json::to_vec(&image).expect("image serializes"))
        .and_then(|_| fs::rename(&tmp, &path))
        .ctx(|| "writing the snapshot's image.json".into())
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
    use std::os::unix::fs::MetadataExt;

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
