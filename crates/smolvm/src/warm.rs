//! Warm start: a cached image (the default one, or a named one with its root disk) is booted
//! once per VM shape, saved at "agent ready", and cached with the image. Sandboxes then start
//! by restoring that state (about a third of a cold boot here) and are made their own on
//! restore: hostname, clock, fresh RNG seed, env vars, a disk and SSH host key of their own.

use crate::config::VmConfig;
use crate::error::{Error, IoContext, Result};
use crate::image::{self, Progress};
use crate::sandbox::Sandbox;
use crate::supervisor::BootSpec;
use smolvm_proto::{Reply, Request, SnapshotKind};
use std::path::{Path, PathBuf};
use std::time::Duration;

const WARM_RECIPE: &str = "warm-recipe-9";

/// The template's RAM, beside its saved state.
pub fn ram_file(state: &Path) -> PathBuf {
    state.with_file_name("ram")
}

/// The template's root disk (images with one): its overlay as the save left it.
pub fn disk_file(state: &Path) -> PathBuf {
    state.with_file_name("disk.qcow2")
}

/// Sandboxes of a cached image (the default one or a named one, nothing of their own to boot)
/// start warm. Those with mounts too: their template has as many 9p devices, saved before
/// anything was mounted (a mounted share cannot be saved), and the clone mounts its own
/// directories once restored. A root disk grown past the image's (`disk_size_mib`) has a
/// template of its own, whose guest grew its filesystem at boot.
pub fn eligible(config: &VmConfig) -> bool {
    config.kernel_path.is_none() && config.initrd_path.is_none() && config.rootfs_path.is_none() && config.boot_args.is_none()
}

/// Identity of the QEMU binary: a saved state only loads into the QEMU that wrote it.
fn qemu_identity() -> String {
    let path = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(crate::vmm::qemu::QEMU_BINARY)).find(|p| p.is_file()))
        // One binary by whichever name: /bin is /usr/bin on merged-/usr hosts, and a PATH
        // through the other made a second template of the same QEMU.
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p));
    let meta = path.as_ref().and_then(|p| std::fs::metadata(p).ok());
    format!("{path:?}:{:?}:{:?}", meta.as_ref().map(|m| m.len()), meta.and_then(|m| m.modified().ok()))
}

/// `tap` for NAT sandboxes, `user` for user-mode and network-less ones.
fn backend_kind(config: &VmConfig) -> Result<&'static str> {
    Ok(match crate::net::Mode::resolve(config.network.as_deref())? {
        crate::net::Mode::Nat => "tap",
        _ => "user",
    })
}

/// A file's size and modification time (cache entries are installed whole, by rename).
fn file_identity(path: &Path) -> Vec<u8> {
    let meta = std::fs::metadata(path).ok();
    let modified = meta.as_ref().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    format!("{}:{}", meta.map_or(0, |m| m.len()), modified.map_or(0, |d| d.as_nanos())).into_bytes()
}

fn template_dir(config: &VmConfig, spec: &BootSpec, images: &Path) -> Result<PathBuf> {
    let mut parts: Vec<Vec<u8>> = vec![
        backend_kind(config)?.as_bytes().to_vec(),
        WARM_RECIPE.as_bytes().to_vec(),
        spec.image.kernel.to_string_lossy().as_bytes().to_vec(),
        spec.image.initrd.as_deref().unwrap_or(Path::new("")).to_string_lossy().as_bytes().to_vec(),
        // And which file is there now: a cache entry made again at the same path (a published
        // kernel replaced by a local build) holds other bytes than the template's RAM.
        file_identity(&spec.image.kernel),
        spec.image.initrd.as_deref().map(file_identity).unwrap_or_default(),
        config.vcpu_count.to_le_bytes().to_vec(),
        config.memory.to_le_bytes().to_vec(),
        // A saved VM loads only where it finds the same devices.
        config.workspace_mounts.len().to_le_bytes().to_vec(),
        format!("{:?}", spec.accel).as_bytes().to_vec(),
        qemu_identity().as_bytes().to_vec(),
        smolvm_proto::PROTOCOL_VERSION.to_le_bytes().to_vec(),
    ];
    // The disk a clone's overlay will stand on is the one the template's guest has mounted,
    // at the size it saw.
    if let Some(rootfs) = &spec.image.rootfs {
        parts.push(rootfs.to_string_lossy().as_bytes().to_vec());
        parts.push(file_identity(rootfs));
        if let Some(mib) = config.disk_size_mib {
            parts.push(format!("disk {mib} MiB").into_bytes());
        }
    }
    // Under KVM the guest sees this host's CPU (`-cpu host`): a state saved on another CPU, or
    // under a kernel that offers other features, may not load, or may crash the guest later.
    // (TCG's CPU model is fixed.)
    if spec.accel == crate::vmm::Accel::Kvm {
        parts.push(crate::vmm::host_cpu_identity().into_bytes());
    }
    // Under TCG the guest's TSC runs at the host's rate, which its kernel was told at boot
    // (`tsc_early_khz`) and keeps: a template from a host with another rate would keep time
    // wrongly. In MHz, so that measuring again after a reboot seldom makes a new one.
    if spec.accel == crate::vmm::Accel::Tcg {
        let mhz = crate::vmm::host_tsc_khz(images).map_or(0, |khz| (khz + 500) / 1000);
        parts.push(mhz.to_le_bytes().to_vec());
    }
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let fp = image::fingerprint(&parts);
    Ok(images.join(format!("warm-{fp}")))
}

/// The saved state to restore for this config, made (by one cold boot) if missing.
pub async fn template(dirs: &crate::Dirs, config: &VmConfig, spec: &BootSpec, progress: Progress<'_>) -> Result<PathBuf> {
    let dir = template_dir(config, spec, &dirs.images)?;
    let state = dir.join("state");
    if state.is_file() {
        mark_used(&state);
        return Ok(state);
    }
    let lock = {
        let images = dirs.clone();
        tokio::task::spawn_blocking(move || image::lock_images(&images)).await.map_err(|e| Error::Host(e.to_string()))??
    };
    if state.is_file() {
        return Ok(state);
    }
    progress("preparing the warm snapshot of this image (once)");
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    // A saved state only loads where the NIC's backend is of the same kind (user networking
    // carries state of its own, a TAP's offloads shape the device): one template per kind,
    // cut off from everything while it is made.
    let network = if backend_kind(config)? == "tap" { "nat" } else { "none" };
    let internet = crate::config::InternetSettings { mode: "off".into(), ..Default::default() };
    // As many shares as the sandbox has, of an empty directory: devices only, never mounted.
    let empty = tmp.join("share");
    let placeholders = (0..config.workspace_mounts.len())
        .map(|i| crate::config::Mount { host: empty.clone(), guest: Some(format!("/mnt/smolvm-share{i}")) })
        .collect();
    let shape = VmConfig {
        image: config.image.clone(),
        disk_size_mib: config.disk_size_mib,
        vcpu_count: config.vcpu_count,
        memory: config.memory,
        network: Some(network.into()),
        internet_settings: Some(internet),
        workspace_mounts: placeholders,
        ..Default::default()
    };
    let made = image::make_dir(&empty).ctx(|| format!("creating {}", empty.display()));
    let mut sb = match made.and_then(|_| Sandbox::create_in(dirs.clone(), shape, true)) {
        Ok(sb) => sb,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let mut throwaway = Throwaway { dirs: dirs.clone(), id: sb.id().to_string(), tmp: tmp.clone(), done: false };
    let made = async {
        // The template's RAM goes to a file that clones will map copy-on-write.
        let ram = crate::vmm::qemu::RamFile { path: tmp.join("ram"), share: true };
        let cold = BootSpec { restore: None, verbose_boot: false, ram: Some(ram), unmounted_shares: true, ..spec.clone() };
        {
            let start_lock = sb.paths().wait_start_lock().await?;
            sb.launch_vm(&cold, Duration::from_millis(spec.boot_timeout_ms), start_lock.as_ref()).await?;
        }
        // One command first: it waits for the boot's set-up thread (network, /proc, /sys) and
        // starts the first shell. Saved half way, that work would be finished again in every
        // clone, in memory of its own (measured: +6 MiB PSS each).
        sb.run("true", &crate::sandbox::RunOptions::default()).await?;
        let conn = &sb.connection().await?;
        let req = Request::Snapshot { dir: tmp.to_string_lossy().into_owned(), kind: SnapshotKind::Full };
        match conn.call(&req).await? {
            Reply::Ok => {}
            other => return Err(Error::Host(format!("saving the warm snapshot: unexpected reply {}", other.kind()))),
        }
        // The template's inputs, for `collect` to find still there: the save names its copy of
        // a root disk (`disk_file`) where the image's own disk is what clones stand on.
        std::fs::write(tmp.join("image.json"), serde_json::to_vec(&spec.image).expect("image serializes"))
            .ctx(|| "writing the warm snapshot's image.json".into())
    }
    .await;
    // (A delete that failed is tried again by the guard, on a thread of its own; the template
    // is not installed, its QEMU perhaps still writing the RAM file.)
    let deleted = sb.delete().await;
    throwaway.done = deleted.is_ok();
    let made = made.and(deleted);
    // (Its QEMU is gone: the placeholder is not the template's.)
    let _ = std::fs::remove_dir(&empty);
    let result = made
        .and_then(|_| image::seal(&tmp).ctx(|| format!("setting the modes of {}", tmp.display())))
        .and_then(|_| std::fs::rename(&tmp, &dir).ctx(|| format!("installing {}", dir.display())));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    // Still under the image lock: nobody is making a template while old ones go.
    collect(&dirs.images, Some(&dir));
    drop(lock);
    result.map(|_| state)
}

/// The sandbox a template is made from, while `template` may be given up half way: Python's
/// Ctrl-C drops a start's future and goes on, and the sandbox, its owner still alive, would
/// boot and run (with its half-made template's RAM) until the process ends. (The CLI's Ctrl-C
/// ends the process, and the supervisor of an ephemeral sandbox follows its owner.)
struct Throwaway {
    dirs: crate::Dirs,
    id: String,
    tmp: PathBuf,
    done: bool,
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (dirs, id, tmp) = (self.dirs.clone(), std::mem::take(&mut self.id), std::mem::take(&mut self.tmp));
        // On a thread of its own: a delete waits for the boot under way to report.
        std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(async {
                    if let Ok(sb) = Sandbox::open_in(dirs.clone(), &id).await {
                        let _ = sb.delete().await;
                    }
                });
            }
            // Under the image lock: a start of the same shape by this process since then uses
            // the same directory, and holds the lock until it has renamed its own away.
            let _lock = image::lock_images(&dirs);
            let _ = std::fs::remove_dir_all(&tmp);
        });
    }
}

/// Templates kept besides the newest: the most recently used. Each new agent, kernel, QEMU
/// or VM shape makes a template of its own (about 135 MB on disk for 512 MiB of RAM), so
/// without a bound upgrades alone fill the cache.
const KEEP: usize = 8;

/// A template's last use is its state file's modification time (nothing rewrites the file).
fn mark_used(state: &Path) {
    let _ = std::fs::File::open(state).and_then(|f| f.set_modified(std::time::SystemTime::now()));
}

/// Remove templates beyond the `KEEP` most recently used, those whose kernel, initramfs or
/// root disk is gone (`image prune` or `image rm`, or a rebuilt image), and the half-made ones
/// of processes that died.
/// `newest` (just made) always stays. Called under the image lock. A clone running from a
/// removed template keeps its RAM file open and is not affected (nor its disk: a copy).
pub(crate) fn collect(images: &Path, newest: Option<&Path>) {
    let Ok(entries) = std::fs::read_dir(images) else { return };
    let mut kept = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("warm-") else { continue };
        let path = entry.path();
        if let Some((_, pid)) = rest.split_once(".tmp-") {
            let alive = pid.parse::<i32>().is_ok_and(|p| crate::store::ProcId::of(p).is_some());
            if !alive {
                let _ = std::fs::remove_dir_all(&path);
            }
            continue;
        }
        if Some(path.as_path()) == newest {
            continue;
        }
        let inputs_present = std::fs::read(path.join("image.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<image::BootImage>(&b).ok())
            .is_some_and(|img| {
                img.kernel.is_file() && img.initrd.as_deref().is_none_or(Path::is_file) && img.rootfs.as_deref().is_none_or(Path::is_file)
            });
        let used = std::fs::metadata(path.join("state")).and_then(|m| m.modified()).ok();
        match used {
            Some(used) if inputs_present => kept.push((used, path)),
            _ => {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
    kept.sort_by_key(|(used, _)| std::cmp::Reverse(*used));
    for (_, path) in kept.into_iter().skip(KEEP) {
        let _ = std::fs::remove_dir_all(&path);
    }
}

/// Which saved state a start restores: by the time that restore has failed, another start may
/// have discarded the template and made it anew, and the new one is not to blame. That is the
/// directory holding the state, whose files are never written once it is in place (inode and
/// change time: a file system may give a new directory the inode just freed). Not the state
/// file's own: another start marking it used (`mark_used`) changes its change time.
pub type Picked = Option<(u64, u64, i64, i64)>;

pub fn picked(state: &Path) -> Picked {
    use std::os::unix::fs::MetadataExt;
    let dir = state.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Forget a template that failed to restore (`picked` says which), if it is still the one in
/// place; the next start makes a new one. Under the image lock, so that it never goes while
/// another start is making it.
pub fn discard(dirs: &crate::Dirs, state: &Path, picked_one: Picked) {
    let Ok(_lock) = image::lock_images(dirs) else { return };
    if picked_one.is_none() || picked(state) != picked_one {
        return;
    }
    if let Some(dir) = state.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn template(images: &Path, name: &str, used_secs_ago: u64, inputs: &image::BootImage) -> PathBuf {
        let dir = images.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("image.json"), serde_json::to_vec(inputs).unwrap()).unwrap();
        let state = std::fs::File::create(dir.join("state")).unwrap();
        state.set_modified(SystemTime::now() - Duration::from_secs(used_secs_ago)).unwrap();
        dir
    }

    /// A cold boot of `kernel` (and `initrd`) under `accel`, as far as a template's key goes.
    fn boot_spec(kernel: PathBuf, initrd: Option<PathBuf>, accel: crate::vmm::Accel) -> BootSpec {
        BootSpec {
            image: image::BootImage { kernel, initrd, rootfs: None },
            accel,
            boot_timeout_ms: 30_000,
            verbose_boot: false,
            restore: None,
            ram: None,
            vsock: false,
            q35: false,
            unmounted_shares: false,
            no_balloon: false,
            warm_disk: None,
        }
    }

    #[test]
    fn a_tcg_template_belongs_to_the_hosts_tsc_rate_in_mhz() {
        let Ok(boot_id) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") else { return };
        let images = tempfile::tempdir().unwrap();
        let spec = boot_spec("/k".into(), Some("/i".into()), crate::vmm::Accel::Tcg);
        let with_rate = |khz: u64| {
            std::fs::write(images.path().join("host-tsc"), format!("{} {khz}\n", boot_id.trim())).unwrap();
            template_dir(&VmConfig::default(), &spec, images.path()).unwrap()
        };
        let here = with_rate(2_596_120);
        assert_eq!(with_rate(2_596_300), here, "measured again after a reboot: the same MHz");
        assert_ne!(with_rate(3_000_000), here, "another host's rate");
    }

    #[test]
    fn a_failed_restore_discards_only_the_template_it_picked() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = crate::Dirs { data: tmp.path().join("data"), images: tmp.path().join("images") };
        let inputs = image::BootImage { kernel: "/k".into(), initrd: None, rootfs: None };
        let state = template(&dirs.images, "warm-a", 0, &inputs).join("state");
        let stale = picked(&state);
        // Another start marking it used changes nothing of which it is.
        mark_used(&state);
        assert_eq!(picked(&state), stale);
        // Another start discarded it meanwhile and made it anew: that one stays.
        std::fs::remove_dir_all(state.parent().unwrap()).unwrap();
        template(&dirs.images, "warm-a", 0, &inputs);
        discard(&dirs, &state, stale);
        assert!(state.exists(), "a template made after the failed start's pick was discarded");
        discard(&dirs, &state, picked(&state));
        assert!(!state.parent().unwrap().exists(), "the template that failed stayed");
    }

    #[test]
    fn a_kernel_made_again_at_the_same_path_makes_a_new_template() {
        let images = tempfile::tempdir().unwrap();
        let kernel = images.path().join("vmlinux");
        std::fs::write(&kernel, b"one kernel").unwrap();
        let spec = boot_spec(kernel.clone(), None, crate::vmm::Accel::Kvm);
        let before = template_dir(&VmConfig::default(), &spec, images.path()).unwrap();
        assert_eq!(template_dir(&VmConfig::default(), &spec, images.path()).unwrap(), before);
        std::fs::write(&kernel, b"another kernel").unwrap();
        assert_ne!(template_dir(&VmConfig::default(), &spec, images.path()).unwrap(), before);
    }

    #[test]
    fn a_root_disk_made_again_at_the_same_path_makes_a_new_template() {
        let images = tempfile::tempdir().unwrap();
        let disk = images.path().join("rootfs.ext4");
        std::fs::write(&disk, b"one disk").unwrap();
        let mut spec = boot_spec("/k".into(), None, crate::vmm::Accel::Kvm);
        let without = template_dir(&VmConfig::default(), &spec, images.path()).unwrap();
        spec.image.rootfs = Some(disk.clone());
        let config = VmConfig { image: Some("alpine-ssh".into()), ..Default::default() };
        let before = template_dir(&config, &spec, images.path()).unwrap();
        assert_ne!(before, without);
        assert_eq!(template_dir(&config, &spec, images.path()).unwrap(), before);
        // A grown disk is another guest's: it grew its filesystem at boot.
        let grown = VmConfig { disk_size_mib: Some(2048), ..config.clone() };
        assert_ne!(template_dir(&grown, &spec, images.path()).unwrap(), before);
        std::fs::write(&disk, b"another disk, longer").unwrap();
        assert_ne!(template_dir(&config, &spec, images.path()).unwrap(), before);
    }

    #[test]
    fn which_sandboxes_start_warm() {
        let named = |name: &str| VmConfig { image: Some(name.into()), ..Default::default() };
        assert!(eligible(&VmConfig::default()));
        assert!(eligible(&named("default")));
        assert!(eligible(&named("alpine-ssh")), "a named image with a root disk");
        assert!(eligible(&VmConfig { disk_size_mib: Some(2048), ..named("alpine-ssh") }), "a grown disk");
        // Anything of the user's own to boot, or a restarted disk's sandbox (its own overlay).
        assert!(!eligible(&VmConfig { rootfs_path: Some("/d.ext4".into()), ..Default::default() }));
        assert!(!eligible(&VmConfig { kernel_path: Some("/k".into()), ..Default::default() }));
        assert!(!eligible(&VmConfig { initrd_path: Some("/i".into()), ..Default::default() }));
        assert!(!eligible(&VmConfig { boot_args: Some("x=1".into()), ..Default::default() }));
    }

    #[test]
    fn collection_keeps_the_most_recently_used_templates_whose_image_exists() {
        let tmp = tempfile::tempdir().unwrap();
        let images = tmp.path();
        let kernel = images.join("vmlinux");
        let initrd = images.join("initramfs.cpio");
        let disk = images.join("rootfs.ext4");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        std::fs::write(&disk, b"d").unwrap();
        let present = image::BootImage { kernel: kernel.clone(), initrd: Some(initrd.clone()), rootfs: Some(disk) };
        let gone = image::BootImage { kernel: kernel.clone(), initrd: Some(images.join("initramfs-old.cpio")), rootfs: None };
        let disk_gone = image::BootImage { kernel, initrd: Some(initrd), rootfs: Some(images.join("rootfs-old.ext4")) };
        // Used 1..=12 hours ago: warm-01 is the most recent.
        let dirs: Vec<PathBuf> = (1..=12).map(|h| template(images, &format!("warm-{h:02}"), h * 3600, &present)).collect();
        // The newest stays even though it is the least recently "used" of all.
        let newest = template(images, "warm-new", 100 * 3600, &present);
        let orphan = template(images, "warm-orphan", 0, &gone);
        let disk_orphan = template(images, "warm-disk-orphan", 0, &disk_gone);
        let no_state = images.join("warm-nostate");
        std::fs::create_dir_all(&no_state).unwrap();
        // A half-made template: of a dead process it goes, of a live one (this test) it stays.
        let dead_tmp = images.join("warm-x.tmp-2147483646");
        let live_tmp = images.join(format!("warm-y.tmp-{}", std::process::id()));
        std::fs::create_dir_all(&dead_tmp).unwrap();
        std::fs::create_dir_all(&live_tmp).unwrap();
        let other = images.join("initramfs-1234");
        std::fs::create_dir_all(&other).unwrap();

        collect(images, Some(&newest));

        for (i, d) in dirs.iter().enumerate() {
            assert_eq!(d.exists(), i < KEEP, "{}", d.display());
        }
        assert!(newest.exists());
        assert!(!orphan.exists(), "a template whose initramfs is gone stays");
        assert!(!disk_orphan.exists(), "a template whose root disk is gone stays");
        assert!(!no_state.exists());
        assert!(!dead_tmp.exists());
        assert!(live_tmp.exists());
        assert!(other.exists(), "collection touched something that is not a template");
    }

    #[test]
    fn using_a_template_makes_it_recent() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        std::fs::File::create(&state).unwrap().set_modified(SystemTime::now() - Duration::from_secs(86400)).unwrap();
        mark_used(&state);
        let age = SystemTime::now().duration_since(std::fs::metadata(&state).unwrap().modified().unwrap()).unwrap();
        assert!(age < Duration::from_secs(60), "{age:?}");
    }
}
