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

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Whether KVM can run an ordinary guest here, and why not.
///
/// A /dev/kvm backed by nested "PVM" virtualisation (module kvm_pvm, no kvm_intel/kvm_amd)
/// opens fine but hangs a stock guest kernel, so its presence alone proves nothing.
pub fn kvm_usable() -> Result<(), String> {
    let kvm = Path::new("/dev/kvm");
    if !kvm.exists() {
        if in_container() {
            return Err("/dev/kvm does not exist in this container (pass the host's device in)".into());
        }
        return Err("/dev/kvm does not exist (no hardware virtualisation, or the kvm module is not loaded)".into());
    }
    let dev = match std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        Ok(dev) => dev,
        // A container's device cgroup refuses with EPERM, whatever groups the user is in. EACCES
        // is the device's own permissions, in a container too (passed in, but the user is not
        // in its group).
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            return Err(format!("/dev/kvm cannot be opened for reading and writing ({e}; in a container, pass the host's device in)"))
        }
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            return Err(format!("/dev/kvm cannot be opened for reading and writing ({e}; {})", kvm_access(kvm)))
        }
        Err(e) => return Err(format!("/dev/kvm cannot be opened for reading and writing ({e})")),
    };
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err("/dev/kvm is nested PVM virtualisation (kvm_pvm), which cannot run a stock guest kernel".into());
    }
    if !Path::new("/sys/module/kvm_intel").exists() && !Path::new("/sys/module/kvm_amd").exists() {
        return Err("neither kvm_intel nor kvm_amd is loaded".into());
    }
    kvm_creates_vm(&dev)
}

/// What gives this user /dev/kvm, from its owner group and mode: joining its group where the
/// group may read and write it, else a udev rule (a device of root's alone is no group's).
pub(crate) fn kvm_access(kvm: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(kvm) else {
        return "its permissions cannot be read".into();
    };
    let gid = meta.gid();
    let name = nix::unistd::Group::from_gid(gid.into()).ok().flatten().map_or(gid.to_string(), |g| g.name);
    let in_container = if in_container() { ", and in a container give it that group too (--group-add)" } else { "" };
    if gid != 0 && meta.mode() & 0o060 == 0o060 {
        format!("it belongs to group {name}: add yourself to group {name}{in_container}")
    } else {
        format!(
            "it belongs to group {name} with mode {:o}: make it group kvm's with mode 0660 (a udev rule, KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\"), then add yourself to group kvm",
            meta.mode() & 0o777
        )
    }
}

/// A stand-in for /dev/kvm in `dir` with `mode`, given a group other than root's where its
/// group may use it and this process can (as root): its path and its group's name.
#[cfg(test)]
pub(crate) fn fake_kvm_device(dir: &Path, mode: u32) -> (std::path::PathBuf, String) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dev = dir.join("kvm");
    std::fs::write(&dev, "").unwrap();
    if mode & 0o060 != 0 && nix::unistd::getegid().as_raw() == 0 {
        std::os::unix::fs::chown(&dev, None, Some(65534)).unwrap();
    }
    std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(mode)).unwrap();
    let gid = std::fs::metadata(&dev).unwrap().gid();
    let name = nix::unistd::Group::from_gid(gid.into()).unwrap().map_or(gid.to_string(), |g| g.name);
    (dev, name)
}

/// Whether this process runs in a container (Docker, Podman), whose /dev/kvm is what the
/// container was given, not what the host has.
fn in_container() -> bool {
    Path::new("/.dockerenv").exists() || Path::new("/run/.containerenv").exists()
}

/// Whether `dev` (an open /dev/kvm) can make a VM with a vCPU, as QEMU will. Where another
/// hypervisor holds the CPU's virtualisation (VirtualBox, VMware), or the firmware turned it
/// off after the module loaded, /dev/kvm opens but this fails; QEMU would then fail every
/// start, where TCG still works.
fn kvm_creates_vm(dev: &std::fs::File) -> Result<(), String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // From <linux/kvm.h>: _IO(KVMIO, 0x00), _IO(KVMIO, 0x01) and _IO(KVMIO, 0x41); KVMIO is 0xAE.
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    const KVM_CREATE_VCPU: libc::c_ulong = 0xAE41;
    // SAFETY: an ioctl that takes no pointer, on a descriptor open for the call's length; it
    // touches no memory of ours.
    let version = unsafe { libc::ioctl(dev.as_raw_fd(), KVM_GET_API_VERSION as _, 0 as libc::c_ulong) };
    if version != 12 {
        return Err(match version {
            -1 => format!("/dev/kvm does not answer as KVM ({})", std::io::Error::last_os_error()),
            v => format!("/dev/kvm speaks KVM API version {v}, not 12"),
        });
    }
    // SAFETY: as above; the argument 0 asks for the default machine type.
    let vm = unsafe { libc::ioctl(dev.as_raw_fd(), KVM_CREATE_VM as _, 0 as libc::c_ulong) };
    if vm < 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("/dev/kvm cannot create a VM ({e}); another hypervisor may hold the CPU's virtualisation"));
    }
    // SAFETY: KVM_CREATE_VM returned a new descriptor that nothing else owns.
    let vm = unsafe { OwnedFd::from_raw_fd(vm) };
    // SAFETY: an ioctl on the VM descriptor we own; the argument is the vCPU's id.
    let vcpu = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CREATE_VCPU as _, 0 as libc::c_ulong) };
    if vcpu < 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("/dev/kvm cannot create a vCPU ({e}); another hypervisor may hold the CPU's virtualisation"));
    }
    // SAFETY: KVM_CREATE_VCPU returned a new descriptor that nothing else owns; dropping it
    // closes it, before the VM's.
    drop(unsafe { OwnedFd::from_raw_fd(vcpu) });
    Ok(())
}

/// The first CPU's model and flags, and the kernel's release: what a KVM guest's CPU is made of
/// (it sees `-cpu host`).
pub fn host_cpu_identity() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let first = cpuinfo.split("\n\n").next().unwrap_or("");
    let wanted: Vec<&str> =
        first.lines().filter(|l| l.starts_with("vendor_id") || l.starts_with("model name") || l.starts_with("flags")).collect();
    let release = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    format!("{}\n{release}", wanted.join("\n"))
}

/// Whether a VM saved under KVM on the CPU `saved` ([`host_cpu_identity`]) can be resumed on
/// the CPU `here`: its guest may use any instruction set extension it saw, so every one must be
/// here too, and the CPU must be of the same vendor (a guest kernel patches itself, picks its
/// errata workarounds and sets MSRs for its vendor's CPUs, and none of that is in the saved
/// state; QEMU makes no promise for `-cpu host` across hosts). Another model of that vendor or
/// another kernel with all of them is accepted (a user's snapshot outlives kernel upgrades; a
/// warm template, only a cache, is keyed on the whole identity instead). The flags Linux adds
/// of its own (`pti`, `hypervisor`, `constant_tsc`, mitigations, VMX details) vary with boot
/// options and say nothing of what a guest can run, so only extensions count. Where this
/// host's flags cannot be read, QEMU's load is the only check.
pub fn cpu_can_resume(saved: &str, here: &str) -> Result<(), String> {
    let field = |identity: &str, name: &str| -> String {
        let line = identity.lines().find(|l| l.starts_with(name)).unwrap_or("");
        line.split_once(':').map(|(_, v)| v.trim().to_string()).unwrap_or_default()
    };
    // (Snapshots made before the vendor was recorded have none: only their flags are checked.)
    let (saved_vendor, here_vendor) = (field(saved, "vendor_id"), field(here, "vendor_id"));
    if !saved_vendor.is_empty() && !here_vendor.is_empty() && saved_vendor != here_vendor {
        return Err(format!(
            "it was saved on a {saved_vendor} CPU ({}) and this one is a {here_vendor} CPU ({})",
            field(saved, "model name"),
            field(here, "model name")
        ));
    }
    let here_flags = field(here, "flags");
    if here_flags.is_empty() {
        return Ok(());
    }
    let here_flags: std::collections::HashSet<&str> = here_flags.split_whitespace().collect();
    let missing: Vec<String> =
        field(saved, "flags").split_whitespace().filter(|f| is_isa_extension(f) && !here_flags.contains(f)).map(str::to_string).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let shown = if missing.len() > 8 { format!("{} and {} more", missing[..8].join(", "), missing.len() - 8) } else { missing.join(", ") };
    Err(format!(
        "it was saved on a CPU ({}) with features this one ({}) lacks: {shown}",
        field(saved, "model name"),
        field(here, "model name")
    ))
}

/// Instruction set extensions among /proc/cpuinfo's flags: what a guest's programs or kernel
/// may have started using, and fault on where missing.
fn is_isa_extension(flag: &str) -> bool {
    const PREFIXES: &str = "sse ssse3 pni avx amx fma f16c aes vaes pclmulqdq vpclmulqdq gfni sha_ni bmi adx abm movbe \
        popcnt xsave rdrand rdseed rdpid rdtscp erms fsrm clflushopt clwb fsgsbase pku la57 pdpe1gb cx16 movdir serialize \
        waitpkg rtm hle lm nx smep smap umip";
    // Whole names: Linux's own `invpcid_single` (there with page-table isolation) is no feature.
    const WHOLE: &str = "pcid invpcid";
    // (Not x2apic: KVM gives every guest an x2APIC, whatever the host has.)
    PREFIXES.split_whitespace().any(|p| flag.starts_with(p)) || WHOLE.split_whitespace().any(|w| flag == w)
}

/// `SMOLVM_ACCEL=kvm|tcg|auto` (default auto: KVM where it can run a guest, else TCG).
pub fn choose_accel() -> Result<Accel, String> {
    match requested_accel()? {
        None => Ok(if kvm_usable().is_ok() { Accel::Kvm } else { Accel::Tcg }),
        Some(Accel::Kvm) => kvm_usable().map(|_| Accel::Kvm).map_err(|why| format!("SMOLVM_ACCEL=kvm but KVM is not usable: {why}")),
        Some(Accel::Tcg) => Ok(Accel::Tcg),
    }
}

/// The accelerator `SMOLVM_ACCEL` asks for; None for `auto` (or unset).
pub fn requested_accel() -> Result<Option<Accel>, String> {
    match std::env::var("SMOLVM_ACCEL").unwrap_or_default().trim().to_ascii_lowercase().as_str() {
        "" | "auto" => Ok(None),
        "kvm" => Ok(Some(Accel::Kvm)),
        "tcg" => Ok(Some(Accel::Tcg)),
        other => Err(format!("SMOLVM_ACCEL={other:?} is not allowed (allowed: kvm, tcg, auto)")),
    }
}

/// The host's TSC rate in kHz, which a TCG guest's TSC runs at (QEMU hands it the host's
/// counter). microvm has no HPET or PM timer, so a guest calibrating its clock without this
/// hangs; told it, the guest skips calibration and keeps time by it.
///
/// /proc/cpuinfo's "cpu MHz" is only right where the host's cores run at one clock (a VM,
/// as here): on a host that scales its frequency it is a core's clock of the moment, and a
/// guest told that would keep time too fast or too slow. So the rate is measured against the
/// host's clock, once per host boot, and kept in `cache` (the image directory).
pub fn host_tsc_khz(cache: &Path) -> Option<u64> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|id| id.trim().to_string());
    let file = cache.join("host-tsc");
    if let Some(id) = &boot_id {
        if let Some(khz) = std::fs::read_to_string(&file).ok().and_then(|kept| kept_tsc_khz(&kept, id)) {
            return Some(khz);
        }
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let khz = if invariant_tsc(&cpuinfo) { measure_tsc_khz() } else { None };
    // Without an invariant TSC there is no one rate to measure: the kernel's figure is the
    // best there is (and it is not kept, so a later start measures again).
    let Some(khz) = khz else { return cpuinfo_mhz(&cpuinfo).map(|mhz| (mhz * 1000.0) as u64) };
    // Kept only with the boot it holds for (a host without a boot id measures at each start).
    if let Some(id) = boot_id {
        let _ = crate::image::write_whole(&file, format!("{id} {khz}\n").as_bytes());
    }
    Some(khz)
}

/// The rate kept by an earlier start, if it was measured in this boot of the host.
fn kept_tsc_khz(kept: &str, boot_id: &str) -> Option<u64> {
    let (id, khz) = kept.trim().split_once(' ')?;
    (id == boot_id).then(|| khz.parse().ok()).flatten().filter(|k| TSC_KHZ_RANGE.contains(k))
}

/// Rates a TSC can have (100 MHz to 20 GHz): a kept figure outside them was not measured
/// here, and would run the guest's clock at the wrong speed.
const TSC_KHZ_RANGE: std::ops::RangeInclusive<u64> = 100_000..=20_000_000;

/// Whether this host's TSC ticks at one measured rate (see [`host_tsc_khz`]): only then is a
/// rate worth comparing with another host's (one read from `cpu MHz` moves with the clock).
pub fn host_tsc_is_invariant() -> bool {
    invariant_tsc(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
}

/// A TSC that ticks at one rate whatever the cores do (the flags Linux shows for it).
fn invariant_tsc(cpuinfo: &str) -> bool {
    cpuinfo.lines().find(|l| l.starts_with("flags")).is_some_and(|flags| {
        let has = |f: &str| flags.split_whitespace().any(|w| w == f);
        has("constant_tsc") && has("nonstop_tsc")
    })
}

fn cpuinfo_mhz(cpuinfo: &str) -> Option<f64> {
    cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()
}

/// The TSC's ticks across 20 ms of the host's monotonic clock. Each end is read between two
/// clock reads a few microseconds apart (else, preempted there, it is read again), so the rate
/// is good to a few parts in 10^4 or better: a guest clock off by that drifts seconds a day.
#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    use std::time::{Duration, Instant};
    let sample = || {
        for _ in 0..10 {
            let before = Instant::now();
            // SAFETY: RDTSC reads a counter and touches no memory; every x86-64 CPU has it.
            let tsc = unsafe { std::arch::x86_64::_rdtsc() };
            let after = Instant::now();
            let spread = after - before;
            if spread < Duration::from_micros(20) {
                return Some((before + spread / 2, tsc));
            }
        }
        None
    };
    let (t0, c0) = sample()?;
    std::thread::sleep(Duration::from_millis(20));
    let (t1, c1) = sample()?;
    let ns = (t1 - t0).as_nanos() as u64;
    let khz = c1.checked_sub(c0)?.checked_mul(1_000_000)? / ns.max(1);
    // A TSC below 100 MHz or above 10 GHz is a measurement gone wrong.
    (100_000..10_000_000).contains(&khz).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kvm_guests_cpu_is_this_hosts_model_flags_and_kernel() {
        let id = host_cpu_identity();
        assert!(id.contains("flags") && id.lines().count() >= 2, "{id}");
        assert!(id.ends_with(&nix::sys::utsname::uname().unwrap().release().to_string_lossy().into_owned()), "{id}");
        assert_eq!(cpu_can_resume(&id, &id), Ok(()));
    }

    #[test]
    fn a_kvm_state_goes_on_only_where_every_feature_it_saw_is() {
        let cpu = |model: &str, flags: &str, kernel: &str| format!("model name\t: {model}\nflags\t\t: {flags}\n{kernel}");
        let saved = cpu("Xeon A", "fpu sse2 avx2 avx512f hypervisor pti constant_tsc", "6.1.0");
        // Another model or kernel with all of them, and more; Linux's own flags do not count.
        assert_eq!(cpu_can_resume(&saved, &cpu("Xeon B", "fpu sse2 avx2 avx512f amx_tile", "6.8.0")), Ok(()));
        // Nothing known of this host's CPU: QEMU's load decides.
        assert_eq!(cpu_can_resume(&saved, "\n6.1.0"), Ok(()));
        assert_eq!(
            cpu_can_resume(&saved, &cpu("EPYC C", "fpu sse2 avx2", "6.1.0")).unwrap_err(),
            "it was saved on a CPU (Xeon A) with features this one (EPYC C) lacks: avx512f"
        );
        // The vendor must match, where both are known; x2apic is KVM's to give, not the host's.
        let vendor = |v: &str, model: &str, flags: &str| format!("vendor_id\t: {v}\n{}", cpu(model, flags, "6.1.0"));
        let intel = vendor("GenuineIntel", "Xeon A", "fpu sse2 avx2 x2apic");
        assert_eq!(
            cpu_can_resume(&intel, &vendor("AuthenticAMD", "EPYC C", "fpu sse2 avx2 x2apic")).unwrap_err(),
            "it was saved on a GenuineIntel CPU (Xeon A) and this one is a AuthenticAMD CPU (EPYC C)"
        );
        assert_eq!(cpu_can_resume(&intel, &vendor("GenuineIntel", "Core B", "fpu sse2 avx2")), Ok(()));
        assert_eq!(cpu_can_resume(&intel, &cpu("Unknown", "fpu sse2 avx2", "6.1.0")), Ok(()));
        let many: Vec<String> = (0..10).map(|i| format!("avx512_{i}")).collect();
        let err = cpu_can_resume(&cpu("X", &many.join(" "), "k"), &cpu("Y", "fpu", "k")).unwrap_err();
        assert!(err.ends_with("lacks: avx512_0, avx512_1, avx512_2, avx512_3, avx512_4, avx512_5, avx512_6, avx512_7 and 2 more"), "{err}");
    }

    /// A device its group may use says to join that group; one of root's alone (or no group's)
    /// says how to give it a group first.
    #[test]
    fn a_kvm_device_that_will_not_open_says_which_group_gives_it() {
        let dir = tempfile::tempdir().unwrap();
        // (Made by root here, the file is group root's; as another user, of that user's group.)
        let (dev, _) = fake_kvm_device(dir.path(), 0o600);
        let said = kvm_access(&dev);
        assert!(said.contains("with mode 600: make it group kvm's with mode 0660 (a udev rule"), "{said}");
        let (dev, name) = fake_kvm_device(dir.path(), 0o660);
        let said = kvm_access(&dev);
        assert!(said.starts_with(&format!("it belongs to group {name}: add yourself to group {name}")), "{said}");
        assert_eq!(kvm_access(&dir.path().join("none")), "its permissions cannot be read");
    }

    /// PCID is an ISA extension to a saved guest: its kernel set CR4.PCIDE, which KVM refuses on
    /// a CPU without it.
    #[test]
    fn a_guest_that_saw_pcid_does_not_resume_without_it() {
        let cpu = |flags: &str| format!("model name\t: M\nflags\t\t: {flags}\n");
        let err = cpu_can_resume(&cpu("fpu pcid invpcid invpcid_single sse2"), &cpu("fpu sse2")).unwrap_err();
        assert!(err.ends_with("lacks: pcid, invpcid"), "{err}");
        // Linux's flag for its own use of INVPCID is the host kernel's choice, not the CPU's.
        assert_eq!(cpu_can_resume(&cpu("fpu pcid invpcid invpcid_single"), &cpu("fpu pcid invpcid")), Ok(()));
    }

    #[test]
    fn a_device_that_is_not_kvm_is_not_taken_for_it() {
        let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").unwrap();
        let why = kvm_creates_vm(&null).unwrap_err();
        assert!(why.starts_with("/dev/kvm does not answer as KVM ("), "{why}");
    }

    /// Where /dev/kvm opens (nested PVM here, real KVM on a workstation), a VM and a vCPU are
    /// made and closed again.
    #[test]
    fn kvm_makes_a_vm_where_it_opens() {
        let Ok(dev) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") else {
            eprintln!("no /dev/kvm here: the probe is only checked against /dev/null");
            return;
        };
        // Where another hypervisor holds the CPU's virtualisation, the probe says so instead.
        if let Err(why) = kvm_creates_vm(&dev) {
            assert!(why.contains("another hypervisor may hold the CPU's virtualisation"), "{why}");
        }
        let kvm_fds: Vec<_> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("anon_inode:kvm-"))
            .collect();
        assert!(kvm_fds.is_empty(), "the probe left {kvm_fds:?} open");
    }

    #[test]
    fn a_kept_rate_counts_only_in_the_boot_it_was_measured_in() {
        assert_eq!(kept_tsc_khz("abc 2596122\n", "abc"), Some(2596122));
        assert_eq!(kept_tsc_khz("abc 2596122\n", "def"), None);
        assert_eq!(kept_tsc_khz("abc x", "abc"), None);
        assert_eq!(kept_tsc_khz("abc 0", "abc"), None);
        assert_eq!(kept_tsc_khz("abc 1", "abc"), None);
        assert_eq!(kept_tsc_khz("abc 99999999999", "abc"), None);
        assert_eq!(kept_tsc_khz("", "abc"), None);
    }

    #[test]
    fn cpuinfo_is_read_for_the_flags_and_the_clock() {
        let info = "processor\t: 0\ncpu MHz\t\t: 3792.871\nflags\t\t: fpu tsc constant_tsc nonstop_tsc rdtscp\n";
        assert!(invariant_tsc(info));
        assert!(!invariant_tsc("flags\t\t: fpu tsc constant_tsc\n"));
        assert_eq!(cpuinfo_mhz(info), Some(3792.871));
        assert_eq!(cpuinfo_mhz("flags : x\n"), None);
    }

    #[test]
    fn the_rate_is_measured_once_per_boot_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let Some(khz) = host_tsc_khz(dir.path()) else { return };
        assert!((100_000..10_000_000).contains(&khz), "{khz}");
        let file = dir.path().join("host-tsc");
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        if !invariant_tsc(&cpuinfo) {
            assert!(!file.exists(), "a figure that was not measured is not kept");
            return;
        }
        let kept = std::fs::read_to_string(&file).unwrap();
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        assert_eq!(kept, format!("{} {khz}\n", boot.trim()));
        // Kept: a planted figure for this boot is what comes back.
        std::fs::write(&file, format!("{} 1234567\n", boot.trim())).unwrap();
        assert_eq!(host_tsc_khz(dir.path()), Some(1234567));
        // Another boot's figure is measured again, and replaced.
        std::fs::write(&file, "another-boot 1234567\n").unwrap();
        let again = host_tsc_khz(dir.path()).unwrap();
        assert!(again.abs_diff(khz) * 200 < khz, "two measurements within 0.5 %: {khz} {again}");
        assert!(std::fs::read_to_string(&file).unwrap().ends_with(&format!(" {again}\n")));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }
}
