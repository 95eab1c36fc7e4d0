//! Virtual machine monitors. Only QEMU is built so far; Firecracker slots in beside it.

pub mod qemu;
pub mod vsock;

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Whether KVM can run an ordinary guest here, and why not.
///
/// A /dev/kvm backed by nested "PVM" virtualisation (module kvm_pvm, no kvm_intel/kvm_amd)
/// opens fine but hangs a stock guest kernel, so its presence alone proves nothing.
pub fn kvm_usable() -> Result<(), String> {
    let kvm = Path::new("/dev/kvm");
    if !kvm.exists() {
        return Err("/dev/kvm does not exist (no hardware virtualisation, or the kvm module is not loaded)".into());
    }
    if std::fs::OpenOptions::new().read(true).write(true).open(kvm).is_err() {
        return Err("/dev/kvm cannot be opened for reading and writing (add yourself to the kvm group)".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err("/dev/kvm is nested PVM virtualisation (kvm_pvm), which cannot run a stock guest kernel".into());
    }
    if !Path::new("/sys/module/kvm_intel").exists() && !Path::new("/sys/module/kvm_amd").exists() {
        return Err("neither kvm_intel nor kvm_amd is loaded".into());
    }
    Ok(())
}

/// `SMOLVM_ACCEL=kvm|tcg|auto` (default auto: KVM where it can run a guest, else TCG).
pub fn choose_accel() -> Result<Accel, String> {
    match std::env::var("SMOLVM_ACCEL").unwrap_or_default().to_ascii_lowercase().as_str() {
        "" | "auto" => Ok(if kvm_usable().is_ok() { Accel::Kvm } else { Accel::Tcg }),
        "kvm" => kvm_usable().map(|_| Accel::Kvm).map_err(|why| format!("SMOLVM_ACCEL=kvm but KVM is not usable: {why}")),
        "tcg" => Ok(Accel::Tcg),
        other => Err(format!("SMOLVM_ACCEL={other:?} is not allowed (allowed: kvm, tcg, auto)")),
    }
}

/// The host's TSC frequency in kHz, from /proc/cpuinfo. microvm has no HPET or PM timer, so a
/// guest calibrating its clock without this hangs; with it, calibration is skipped.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0) as u64)
}
