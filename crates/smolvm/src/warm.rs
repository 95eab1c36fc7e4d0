//! Warm start: the default image is booted once per VM shape, saved at "agent ready", and
//! cached with the image. Sandboxes then start by restoring that state (about a third of a cold
//! boot here) and are made their own on restore: hostname, clock, fresh RNG seed, env vars.

use crate::config::VmConfig;
use crate::error::{Error, IoContext, Result};
use crate::image::{self, Progress};
use crate::sandbox::Sandbox;
use crate::supervisor::BootSpec;
use smolvm_proto::{Reply, Request, SnapshotKind};
use std::path::{Path, PathBuf};
use std::time::Duration;

const WARM_RECIPE: &str = "warm-recipe-7";

/// The template's RAM, beside its saved state.
pub fn ram_file(state: &Path) -> PathBuf {
    state.with_file_name("ram")
}

/// Only sandboxes of the default image (nothing of their own to boot) start warm.
pub fn eligible(config: &VmConfig) -> bool {
    config.kernel_path.is_none()
        && config.initrd_path.is_none()
        && config.rootfs_path.is_none()
        && config.boot_args.is_none()
        && config.image.as_deref().is_none_or(|i| i == "default")
}

/// Identity of the QEMU binary: a saved state only loads into the QEMU that wrote it.
fn qemu_identity() -> String {
    let path = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(crate::vmm::qemu::QEMU_BINARY)).find(|p| p.is_file()));
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

fn template_dir(config: &VmConfig, spec: &BootSpec, images: &Path) -> Result<PathBuf> {
    let fp = image::fingerprint(&[
        backend_kind(config)?.as_bytes(),
        WARM_RECIPE.as_bytes(),
        spec.image.kernel.to_string_lossy().as_bytes(),
        spec.image.initrd.as_deref().unwrap_or(Path::new("")).to_string_lossy().as_bytes(),
        &config.vcpu_count.to_le_bytes(),
        &config.memory.to_le_bytes(),
        format!("{:?}", spec.accel).as_bytes(),
        qemu_identity().as_bytes(),
        &smolvm_proto::PROTOCOL_VERSION.to_le_bytes(),
    ]);
    Ok(images.join(format!("warm-{fp}")))
}

/// The saved state to restore for this config, made (by one cold boot) if missing.
pub async fn template(dirs: &crate::Dirs, config: &VmConfig, spec: &BootSpec, progress: Progress<'_>) -> Result<PathBuf> {
    let dir = template_dir(config, spec, &dirs.images)?;
    let state = dir.join("state");
    if state.is_file() {
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
    let shape = VmConfig {
        vcpu_count: config.vcpu_count,
        memory: config.memory,
        network: Some(network.into()),
        internet_settings: Some(internet),
        ..Default::default()
    };
    let mut sb = Sandbox::create_in(dirs.clone(), shape, true)?;
    let made = async {
        // The template's RAM goes to a file that clones will map copy-on-write.
        std::fs::create_dir_all(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        let ram = crate::vmm::qemu::RamFile { path: tmp.join("ram"), share: true };
        let cold = BootSpec { restore: None, verbose_boot: false, ram: Some(ram), ..spec.clone() };
        sb.launch(&cold, Duration::from_millis(spec.boot_timeout_ms)).await?;
        // One command first: it waits for the boot's set-up thread (network, /proc, /sys), and
        // the boot's warm-up shell runs alongside it. Saved half way, that work would be
        // finished again in every clone, in memory of its own (measured: +6 MiB PSS each).
        sb.run("true", &crate::sandbox::RunOptions::default()).await?;
        let conn = sb.connection()?;
        let req = Request::Snapshot { dir: tmp.to_string_lossy().into_owned(), kind: SnapshotKind::Full };
        match conn.call(&req).await? {
            Reply::Ok => Ok(()),
            other => Err(Error::Host(format!("saving the warm snapshot: {other:?}"))),
        }
    }
    .await;
    let _ = sb.delete().await;
    let result = made.and_then(|_| std::fs::rename(&tmp, &dir).ctx(|| format!("installing {}", dir.display())));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    drop(lock);
    result.map(|_| state)
}

/// Forget a template that failed to restore; the next start makes a new one.
pub fn discard(state: &Path) {
    if let Some(dir) = state.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
