//! `smolvm bench`: speed and memory as ratios against references measured in the same run.
//! The host is noisy (lab.md: up to 2x between batches), so the cold-boot pair is interleaved
//! round by round and reported as medians.

use crate::config::{Dirs, VmConfig};
use crate::error::{Error, IoContext, Result};
use crate::image::{self, BootImage};
use crate::sandbox::{smolvm_binary, RunOptions, Sandbox};
use crate::store::ProcId;
use crate::vmm::{self, qemu};
use serde_json::json;
use std::time::{Duration, Instant};

/// Linear between the two nearest ranks (an even count's median is its middle pair's mean).
fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let at = (samples.len() as f64 - 1.0) * p;
    let (low, high) = (at.floor() as usize, (at.ceil() as usize).min(samples.len() - 1));
    samples[low] + (samples[high] - samples[low]) * (at - low as f64)
}

/// Bytes in the MB (10^6) of the targets, from kibibytes.
fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

/// Which kernel command line a bare boot gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmdline {
    /// smolvm's own, tuned for boot time: the strict reference, which measures only what
    /// smolvm adds to the boot.
    Smolvm,
    /// lab.md's (`quiet tsc_early_khz=<kHz> nolapic_timer`), from whose bare-QEMU numbers the
    /// start-up target was set, plus `reboot=t`: else the agent's power-off spends ~0.1 s
    /// knocking on a keyboard controller that microvm does not have.
    Lab,
}

/// lab.md's command line for the reference boot that powers off at once. Its timer settings
/// were TCG's work-arounds: under KVM (no TSC rate is given there) the guest keeps its LAPIC
/// timer, which KVM emulates in the host kernel, where `nolapic_timer` would leave it ticking
/// on QEMU's emulated PIT.
fn lab_cmdline(tsc_khz: Option<u64>, accel: vmm::Accel) -> String {
    if accel == vmm::Accel::Kvm {
        return "quiet reboot=t smolvm_poweroff=1".into();
    }
    let tsc = tsc_khz.map(|k| format!(" tsc_early_khz={k}")).unwrap_or_default();
    format!("quiet{tsc} nolapic_timer reboot=t smolvm_poweroff=1")
}

/// QEMU's arguments with the kernel command line (`-append`'s value) replaced.
fn replace_cmdline(args: &mut [String], line: String) {
    if let Some(value) = args.iter().position(|a| a == "-append").and_then(|i| args.get_mut(i + 1)) {
        *value = line;
    }
}

/// Bare QEMU: the same kernel, initramfs, machine and devices, but the agent, told so on the
/// kernel command line, powers the VM off as the first thing it does.
async fn bare_boot(
    dirs: &Dirs,
    image: &BootImage,
    dir: &std::path::Path,
    accel: vmm::Accel,
    machine: qemu::Machine,
    cmdline: Cmdline,
) -> Result<f64> {
    let agent = dir.join("a.sock");
    let _ = std::fs::remove_file(&agent);
    let listener = tokio::net::UnixListener::bind(&agent).ctx(|| "binding the reference socket".into())?;
    let spec = qemu::LaunchSpec {
        image: image.clone(),
        vcpus: crate::config::DEFAULT_VCPUS,
        memory_mib: crate::config::DEFAULT_MEMORY_MIB,
        accel,
        hostname: "bare".into(),
        guest_net: None,
        extra_boot_args: Some("smolvm_poweroff=1".into()),
        verbose_boot: false,
        agent_socket: agent.clone(),
        qmp_socket: dir.join("q.sock"),
        console_log: dir.join("bare-console.log"),
        incoming: None,
        ram: None,
        net: qemu::NetBackend::User { restrict: true, forwards: vec![] },
        vsock: None,
        machine,
        tsc_khz: (accel == vmm::Accel::Tcg).then(|| vmm::host_tsc_khz(&dirs.images)).flatten(),
        mounts: vec![],
        mount_at_boot: true,
        balloon: true,
    };
    let mut args = qemu::command_line(&spec);
    if cmdline == Cmdline::Lab {
        replace_cmdline(&mut args, lab_cmdline(spec.tsc_khz, accel));
    }
    let log = std::fs::File::create(dir.join("bare.log")).ctx(|| "creating the reference's log".into())?;
    let mut command = tokio::process::Command::new(qemu::QEMU_BINARY);
    command.args(&args).stdin(std::process::Stdio::null()).stdout(log.try_clone().ctx(|| "dup log".into())?).stderr(log).kill_on_drop(true);
    let started = Instant::now();
    let mut child = command.spawn().ctx(|| format!("starting {}", qemu::QEMU_BINARY))?;
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
    let took = started.elapsed().as_secs_f64();
    drop(listener);
    // A reference that did not boot (a QEMU that refused its arguments, a kernel that
    // panicked and, with `panic=-1`, reset at once) is no sample.
    let panicked = || std::fs::read_to_string(dir.join("bare-console.log")).is_ok_and(|c| c.contains("Kernel panic"));
    match status {
        Ok(Ok(s)) if s.success() && !panicked() => Ok(took),
        Ok(Ok(s)) => {
            let said: String = ["bare.log", "bare-console.log"].iter().filter_map(|f| std::fs::read_to_string(dir.join(f)).ok()).collect();
            let tail: Vec<&str> = said.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
            Err(Error::Host(format!("the reference VM failed ({s}): {}", tail.join(" | "))))
        }
        _ => {
            let _ = child.kill().await;
            Err(Error::Host("the reference VM did not power off within 60 s".into()))
        }
    }
}

/// The kernel and initramfs to measure with, where not the default image's: a kernel of one's
/// own, or a prepared image on a host that cannot build ours (how KVM was measured elsewhere).
#[derive(Debug, Clone, Default)]
pub struct BootFiles {
    pub kernel: Option<std::path::PathBuf>,
    pub initrd: Option<std::path::PathBuf>,
}

impl BootFiles {
    fn config(&self) -> VmConfig {
        VmConfig { kernel_path: self.kernel.clone(), initrd_path: self.initrd.clone(), ..VmConfig::default() }
    }

    fn cli_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        for (flag, path) in [("--kernel", &self.kernel), ("--initrd", &self.initrd)] {
            if let Some(p) = path {
                args.push(flag.into());
                args.push(p.clone().into_os_string());
            }
        }
        args
    }
}

/// Megabytes (10^6 bytes, as every figure here) in the 20 MiB file the transfers move.
const BLOB_MB: f64 = 20.0 * 1048576.0 / 1e6;

/// `smolvm run true`, timed until the CLI exits (what its user waits for), in the data
/// directory `dirs.data` of the bench's own. Settings that would boot it otherwise than the
/// reference (a verbose boot, vsock) are not passed on; `SMOLVM_MACHINE` is, as the reference
/// takes it too. A warm run that booted cold after all is an error, not a warm sample.
fn cli_run(dirs: &Dirs, boot: &BootFiles, warm: bool) -> Result<f64> {
    let bin = smolvm_binary()?;
    let started = Instant::now();
    let out = std::process::Command::new(bin)
        .arg("run")
        .args(boot.cli_args())
        .arg("true")
        .env("SMOLVM_WARM", if warm { "1" } else { "0" })
        .env("SMOLVM_DATA_DIR", &dirs.data)
        .env("SMOLVM_IMAGE_DIR", &dirs.images)
        .env_remove("SMOLVM_VERBOSE_BOOT")
        .env_remove("SMOLVM_AGENT_TRANSPORT")
        .output()
        .ctx(|| "running smolvm run true".into())?;
    let took = started.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(Error::Host(format!("smolvm run true failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    if warm && String::from_utf8_lossy(&out.stderr).contains("warm start failed, booting cold") {
        return Err(Error::Host(format!("a warm `smolvm run true` booted cold: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    settle(&dirs.data);
    Ok(took)
}

/// Wait (at most 5 s) until no process of a `smolvm run` in `data` is left. The CLI exits once
/// its stop is answered, while the supervisor goes on to wait for QEMU's death and remove the
/// TAP: that work must not fall on the next sample (a reference boot, say). Found by the data
/// directory in their environment, which the supervisor and QEMU inherit.
fn settle(data: &std::path::Path) {
    let wanted = format!("SMOLVM_DATA_DIR={}", data.display()).into_bytes();
    let left = || {
        std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|e| {
            e.file_name().to_string_lossy().parse::<u32>().is_ok()
                && std::fs::read(e.path().join("environ")).is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == wanted.as_slice()))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while left() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A process's resident memory in KiB; an error where it cannot be read (a process gone
/// would otherwise count as none).
fn rss_kib(pid: i32) -> Result<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .ok_or_else(|| Error::Host(format!("reading the resident memory of process {pid}: it is gone")))
}

fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// Cold and warm `smolvm run true` against bare QEMU, interleaved: p50 seconds of each.
pub async fn startup(dirs: &Dirs, boot: &BootFiles, rounds: usize, progress: image::Progress<'_>) -> Result<Startup> {
    let img = {
        let (d, config) = (dirs.clone(), boot.config());
        tokio::task::spawn_blocking(move || image::resolve(&config, &d, &|_| {})).await.map_err(|e| Error::Host(e.to_string()))??
    };
    let accel = vmm::choose_accel().map_err(Error::Host)?;
    let machine = qemu::choose_machine(dirs, Some(&img.kernel))?;
    let work = tempfile_dir(dirs)?;
    let runs = Dirs { data: work.join("data"), images: dirs.images.clone() };
    progress(&format!("start-up: {rounds} interleaved rounds of bare QEMU (two command lines), cold and warm `smolvm run true`"));
    let (mut bare, mut bare_lab, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let result = async {
        // One unmeasured round warms the page cache (and makes the warm snapshot if missing).
        bare_boot(dirs, &img, &work, accel, machine, Cmdline::Smolvm).await?;
        bare_boot(dirs, &img, &work, accel, machine, Cmdline::Lab).await?;
        cli_run(&runs, boot, false)?;
        cli_run(&runs, boot, true)?;
        for round in 0..rounds {
            // Each pair in both orders, round by round: whatever one run leaves the host doing
            // falls on either side alike.
            if round % 2 == 0 {
                bare.push(bare_boot(dirs, &img, &work, accel, machine, Cmdline::Smolvm).await?);
                cold.push(cli_run(&runs, boot, false)?);
                bare_lab.push(bare_boot(dirs, &img, &work, accel, machine, Cmdline::Lab).await?);
                warm.push(cli_run(&runs, boot, true)?);
            } else {
                warm.push(cli_run(&runs, boot, true)?);
                bare_lab.push(bare_boot(dirs, &img, &work, accel, machine, Cmdline::Lab).await?);
                cold.push(cli_run(&runs, boot, false)?);
                bare.push(bare_boot(dirs, &img, &work, accel, machine, Cmdline::Smolvm).await?);
            }
        }
        Ok::<_, Error>(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    result?;
    // Each round's cold run against that round's bare boot: drift between rounds cancels.
    let mut paired: Vec<f64> = cold.iter().zip(&bare).map(|(c, b)| c / b).collect();
    Ok(Startup {
        accel,
        bare: percentile(&mut bare, 0.5),
        bare_lab: percentile(&mut bare_lab, 0.5),
        cold: percentile(&mut cold, 0.5),
        warm: percentile(&mut warm, 0.5),
        paired_ratio: percentile(&mut paired, 0.5),
    })
}

/// `run("true")` on a running sandbox, `rounds` times, through the Rust API: the samples in ms.
pub async fn run_true_on(dirs: &Dirs, id: &str, rounds: usize) -> Result<Vec<f64>> {
    let sb = Sandbox::open_in(dirs.clone(), id).await?;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        sb.run("true", &RunOptions::default()).await?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(samples)
}

pub struct Startup {
    pub accel: vmm::Accel,
    /// Bare QEMU with smolvm's kernel command line (the strict reference).
    pub bare: f64,
    /// Bare QEMU with lab.md's kernel command line.
    pub bare_lab: f64,
    pub cold: f64,
    pub warm: f64,
    /// The median of the rounds' own cold / bare ratios.
    pub paired_ratio: f64,
}

pub async fn run(dirs: &Dirs, rounds: usize, progress: image::Progress<'_>) -> Result<(serde_json::Value, String)> {
    let Startup { accel, bare: bare_p50, bare_lab: bare_lab_p50, cold: cold_p50, warm: warm_p50, paired_ratio } =
        startup(dirs, &BootFiles::default(), rounds, progress).await?;
    let work = tempfile_dir(dirs)?;
    let density = density(dirs, 16, progress).await?;
    let burst = burst(dirs, 32, progress).await?;

    progress("warm sandbox: agent round trips and run(\"true\")");
    let mut sb = Sandbox::create_in(dirs.clone(), VmConfig::default(), true)?;
    let result = async {
        sb.start(Duration::from_secs(60), &|_| {}).await?;
        // Idle as started (before anything below fills its memory): what a sandbox waiting for
        // work holds.
        progress("idle sandbox: host RSS and CPU over 5 s");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rec = sb.record()?;
        let pids: Vec<i32> = [rec.supervisor, rec.vmm].into_iter().flatten().map(|p: ProcId| p.pid).collect();
        if pids.len() != 2 {
            return Err(Error::Host("the idle sandbox's record names no supervisor or no QEMU".into()));
        }
        let rss_kib_total = pids.iter().map(|p| rss_kib(*p)).sum::<Result<u64>>()?;
        let vmm_rss_kib = rss_kib(pids[1])?;
        let before: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
        let window = 5.0;
        tokio::time::sleep(Duration::from_secs_f64(window)).await;
        let after: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let idle_cpu = after.saturating_sub(before) as f64 / hz / window * 100.0;
        let (rss_mb, vmm_rss_mb) = (mb(rss_kib_total), mb(vmm_rss_kib));
        let mut ping = Vec::new();
        for _ in 0..500 {
            let t = Instant::now();
            sb.ping().await?;
            ping.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let mut run_login = Vec::new();
        let mut run_raw = Vec::new();
        for _ in 0..100 {
            let t = Instant::now();
            sb.run("true", &RunOptions::default()).await?;
            run_login.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            sb.run("true", &RunOptions { shell: smolvm_proto::Shell::Raw, ..Default::default() }).await?;
            run_raw.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        progress("files: 20 MB up and down over the agent, against `cat` of the same file");
        let blob = work_file(&work, 20 * 1024 * 1024)?;
        let t = Instant::now();
        sb.upload(&blob, "/tmp/blob").await?;
        let up = BLOB_MB / t.elapsed().as_secs_f64();
        let t = Instant::now();
        sb.download("/tmp/blob", &work.join("blob.back")).await?;
        let down = BLOB_MB / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut n = 0usize;
        // (Counted as it streams by, as the CLI does: no copy kept.)
        sb.run_streaming("cat /tmp/blob", &RunOptions { discard_output: true, ..Default::default() }, |o| {
            if let crate::sandbox::Output::Stdout(d) = o {
                n += d.len();
            }
        })
        .await?;
        let cat = n as f64 / 1e6 / t.elapsed().as_secs_f64();
        Ok::<_, Error>((ping, run_login, run_raw, rss_mb, vmm_rss_mb, idle_cpu, (up, down, cat)))
    }
    .await;
    let _ = sb.delete().await;
    let (mut ping, mut run_login, mut run_raw, rss_mb, vmm_rss_mb, idle_cpu, (up, down, cat)) = result?;
    let (nat_ms, user_ms) = network_setup(dirs, rounds, progress).await?;
    let (mount_ms, no_mount_ms) = mount_start(dirs, &work, rounds, progress).await?;
    let (nat_mbs, user_mbs) = http_throughput(dirs, &work, progress).await.unwrap_or_else(|e| {
        progress(&format!("network throughput not measured: {}", e.full_message()));
        (f64::NAN, f64::NAN)
    });

    let [freed, kept] = memory_return(dirs, progress).await?;
    let snap = snapshot_speed(dirs, &work, progress).await?;
    let ssh = ssh_bench(dirs, &work, progress).await?;
    let _ = std::fs::remove_dir_all(&work);

    let ratio = cold_p50 / bare_p50;
    let lab_ratio = cold_p50 / bare_lab_p50;
    let warm_ratio = warm_p50 / cold_p50;
    let data = json!({
        "accel": accel,
        "rounds": rounds,
        "cold": { "bare_qemu_p50_s": bare_p50, "smolvm_run_true_p50_s": cold_p50, "ratio": ratio, "paired_ratio_p50": paired_ratio, "target_ratio": 1.15, "bare_qemu_lab_cmdline_p50_s": bare_lab_p50, "ratio_to_lab_cmdline": lab_ratio },
        "warm": { "smolvm_run_true_p50_s": warm_p50, "ratio_to_cold": warm_ratio, "target_ratio": 0.4 },
        "density": { "sandboxes": 16, "pss_mb_per_sandbox": density, "target_mb": 30 },
        "burst": { "started": 32, "answered": burst.0, "all_answered_s": burst.1 },
        "files_mb_per_s": { "upload": up, "download": down, "cat_reference": cat },
        "network_start_ms": { "nat_p50": nat_ms, "user_p50": user_ms, "nat_overhead": nat_ms - user_ms },
        "mount_start_ms": { "with_p50": mount_ms, "without_p50": no_mount_ms },
        "http_download_mb_per_s": { "nat": nat_mbs, "user": user_mbs },
        "agent_ping_ms": { "p50": percentile(&mut ping, 0.5), "p99": percentile(&mut ping, 0.99), "target_p50": 1.0 },
        "run_true_login_ms": { "p50": percentile(&mut run_login, 0.5), "p99": percentile(&mut run_login, 0.99), "target_p50": 10.0 },
        "run_true_raw_ms": { "p50": percentile(&mut run_raw, 0.5), "p99": percentile(&mut run_raw, 0.99) },
        "snapshot": { "state_mb": snap.state_mb, "save_s": snap.save_s[0], "save_mb_per_s": snap.state_mb / snap.save_s[0], "save_again_s": snap.save_s[1], "save_again_mb_per_s": snap.state_mb / snap.save_s[1], "file_write_mb_per_s": snap.file_mb_per_s, "restore_to_first_command_s": snap.restore_s[0], "again_s": snap.restore_s[1] },
        "ssh": ssh.json(),
        "memory_return_qemu_rss_mb": { "cold_booted": { "idle": freed[0], "filled": freed[1], "freed": freed[2] }, "warm_started": { "idle": kept[0], "filled": kept[1], "freed": kept[2] } },
        "idle": { "host_rss_mb": rss_mb, "vmm_rss_mb": vmm_rss_mb, "cpu_percent_of_core": idle_cpu, "target_rss_mb": 110, "target_cpu_percent": 2 },
    });
    let md = format!(
        "| measure ({accel:?}, {rounds} rounds) | result | reference / target |\n|---|---|---|\n\
         | cold `smolvm run true`, p50 | {cold_p50:.3} s | bare QEMU boot of the same kernel and initramfs, powering off at once: {bare_p50:.3} s |\n\
         | cold ratio smolvm / bare | **{ratio:.2}** | target <= 1.15 |\n\
         | cold ratio, median of each round's own ratio | {paired_ratio:.2} | the same runs, paired |\n\
         | cold ratio against bare QEMU with lab.md's kernel command line (without smolvm's boot tuning) | {lab_ratio:.2} | that boot, powering off at once: {bare_lab_p50:.3} s |\n\
         | warm `smolvm run true` (restored from the image's snapshot), p50 | {warm_p50:.3} s | cold {cold_p50:.3} s |\n\
         | warm ratio warm / cold | **{warm_ratio:.2}** | target <= 0.4 |\n\
         | host PSS per idle warm sandbox, 16 running (QEMU + supervisor) | {density:.1} MB | target <= 30 MB |\n\
         | 32 sandboxes started at once | {} answered, all within {:.2} s | all answer |\n\
         | agent round trip (no process) | p50 {:.3} ms, p99 {:.3} ms | target p50 <= 1 ms |\n\
         | warm `run(\"true\")`, login shell | p50 {:.2} ms, p99 {:.2} ms | target p50 <= 10 ms |\n\
         | warm `run(\"true\")`, raw shell | p50 {:.2} ms, p99 {:.2} ms | |\n\
         | idle sandbox host RSS (QEMU + supervisor), just started warm | {rss_mb:.1} MB (QEMU {vmm_rss_mb:.1}) | target <= 110 MB |\n\
         | idle sandbox CPU | {idle_cpu:.2} % of a core | target <= 2 % |\n\
         | QEMU RSS of a cold-booted sandbox: idle, with 200 MB in `/tmp`, after their `rm` (free page reporting; 3-10 s, until it stops falling) | {:.0}, {:.0}, **{:.0}** MB | a warm-started one, which cannot report: {:.0}, {:.0}, {:.0} MB |\n\
         | 20 MiB upload / download over the agent | {up:.0} / {down:.0} MB/s | `cat` of the same file through the channel: {cat:.0} MB/s |\n\
         | warm start with NAT networking (TAP, nftables, DNS), p50 | {nat_ms:.0} ms | user-mode networking: {user_ms:.0} ms |\n\
         | warm start with a read-only mount (9p) to a first command's answer, p50 | {mount_ms:.0} ms | without: {no_mount_ms:.0} ms (user-mode networking) |\n\
         | guest HTTP download of 20 MiB from a host in a network namespace, NAT | {nat_mbs:.0} MB/s | user-mode networking: {user_mbs:.0} MB/s |\n\
         | full snapshot of a sandbox holding 500 MB in RAM (2 GiB, started warm): save ({:.0} MB of state, after a `sync`), first, then again | {:.2} s ({:.0} MB/s), then {:.2} s ({:.0} MB/s) | writing as many bytes to a file in the data directory, after a `sync`: {:.0} MB/s |\n\
         | restore from that snapshot to a first command's answer: first, then again | {:.2} s, then {:.2} s | |\n{}",
        burst.0,
        burst.1,
        data["agent_ping_ms"]["p50"].as_f64().unwrap_or(0.0),
        data["agent_ping_ms"]["p99"].as_f64().unwrap_or(0.0),
        data["run_true_login_ms"]["p50"].as_f64().unwrap_or(0.0),
        data["run_true_login_ms"]["p99"].as_f64().unwrap_or(0.0),
        data["run_true_raw_ms"]["p50"].as_f64().unwrap_or(0.0),
        data["run_true_raw_ms"]["p99"].as_f64().unwrap_or(0.0),
        freed[0],
        freed[1],
        freed[2],
        kept[0],
        kept[1],
        kept[2],
        snap.state_mb,
        snap.save_s[0],
        snap.state_mb / snap.save_s[0],
        snap.save_s[1],
        snap.state_mb / snap.save_s[1],
        snap.file_mb_per_s,
        snap.restore_s[0],
        snap.restore_s[1],
        ssh.markdown(),
    );
    Ok((data, md))
}

/// `smolvm sandbox VERB NAME EXTRA...` by the CLI in `dirs`: only its environment chooses a
/// cold boot (`SMOLVM_WARM=0`) for a sandbox that would start warm.
fn cli_sandbox(dirs: &Dirs, warm: bool, verb: &[&str], name: &str, extra: &[&str]) -> Result<std::process::Output> {
    std::process::Command::new(smolvm_binary()?)
        .arg("sandbox")
        .args(verb)
        .arg(name)
        .args(extra)
        .env("SMOLVM_WARM", if warm { "1" } else { "0" })
        .env("SMOLVM_DATA_DIR", &dirs.data)
        .env("SMOLVM_IMAGE_DIR", &dirs.images)
        .output()
        .ctx(|| format!("running smolvm sandbox {}", verb[0]))
}

/// The pid of `sb`'s QEMU, once checked that it started warm or cold as asked: a warm start
/// that fell back to a cold boot would be measured as a warm one.
fn vmm_started(sb: &Sandbox, warm: bool) -> Result<i32> {
    let vmm = sb.record()?.vmm.ok_or_else(|| Error::Host(format!("sandbox {} runs without QEMU on record", sb.id())))?.pid;
    match qemu::loads_saved_state(vmm) == warm {
        true => Ok(vmm),
        false => Err(Error::Host(format!("sandbox {} was not started {}", sb.id(), if warm { "warm" } else { "cold" }))),
    }
}

/// QEMU's RSS in MB: idle (2 s after the start), with 200 MB written to the guest's `/tmp`, and
/// once it has stopped falling after their `rm` (3 to 10 s); for a cold-booted sandbox, whose
/// guest reports the memory it frees, and for a warm-started one, whose guest cannot
/// (docs/architecture.md).
async fn memory_return(dirs: &Dirs, progress: image::Progress<'_>) -> Result<[[f64; 3]; 2]> {
    progress("memory: 200 MB filled and freed in a cold-booted sandbox (free page reporting) and a warm-started one");
    let mut rss = [[0.0; 3]; 2];
    for (row, warm) in [false, true].into_iter().enumerate() {
        let name = format!("bench-mem-{}-{row}", std::process::id());
        let made = cli_sandbox(dirs, warm, &["create", "--name"], &name, &[])?;
        if !made.status.success() {
            return Err(Error::Host(format!("creating {name}: {}", String::from_utf8_lossy(&made.stderr).trim())));
        }
        let measured = async {
            let sb = Sandbox::open_in(dirs.clone(), &name).await?;
            let vmm = vmm_started(&sb, warm)?;
            let run = |cmd: &'static str| {
                let sb = &sb;
                async move {
                    let r = sb.run(cmd, &RunOptions::default()).await?;
                    match r.ok() {
                        true => Ok(()),
                        false => Err(Error::Guest(format!("{cmd}: {}", r.stderr.trim()))),
                    }
                }
            };
            tokio::time::sleep(Duration::from_secs(2)).await;
            let idle = rss_kib(vmm)?;
            run("dd if=/dev/zero of=/tmp/fill bs=1M count=200 2>/dev/null").await?;
            let full = rss_kib(vmm)?;
            run("rm /tmp/fill").await?;
            // The guest reports 2 s after the frees, a batch at a time.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let mut freed = rss_kib(vmm)?;
            for _ in 0..14 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let now = rss_kib(vmm)?;
                if now >= freed {
                    break;
                }
                freed = now;
            }
            Ok::<_, Error>([idle, full, freed].map(mb))
        }
        .await;
        // By name, whatever failed: the sandbox is this bench's.
        let _ = cli_sandbox(dirs, warm, &["delete", "--force"], &name, &[]);
        rss[row] = measured?;
    }
    Ok(rss)
}

struct SnapshotSpeed {
    state_mb: f64,
    /// The first save, and a second one: a sandbox started warm maps its memory from the
    /// template's file, and the first save reads the parts the guest never touched, which the
    /// host's page cache fills with zeros then (see docs/snapshots.md).
    save_s: [f64; 2],
    file_mb_per_s: f64,
    /// The first restore and a second one.
    restore_s: [f64; 2],
}

/// A full snapshot of a sandbox holding 500 MB of data in RAM: how long the save takes, against
/// the host writing as many bytes to a file beside it (what a save to disk cannot beat; both
/// after a `sync`), and how long a restore takes to answer a command.
async fn snapshot_speed(dirs: &Dirs, work: &std::path::Path, progress: image::Progress<'_>) -> Result<SnapshotSpeed> {
    progress("snapshots: a full snapshot of a sandbox holding 500 MB, saved and restored");
    let id = format!("bench-{}", std::process::id());
    let blob = work_file(work, 20 * 1024 * 1024)?;
    let mut sb = Sandbox::create_in(dirs.clone(), VmConfig { memory: 2048, ..VmConfig::default() }, true)?;
    let result = async {
        sb.start(Duration::from_secs(60), &|_| {}).await?;
        sb.upload(&blob, "/tmp/blob").await?;
        let opts = RunOptions { timeout: Duration::from_secs(300), ..Default::default() };
        let fill = sb.run("for i in $(seq 25); do cat /tmp/blob; done > /dev/shm/fill && rm /tmp/blob", &opts).await?;
        if !fill.ok() {
            return Err(Error::Guest(format!("filling the sandbox's memory: {}", fill.stderr.trim())));
        }
        // Both the save and its reference start with no other writes pending on the host:
        // earlier parts of the bench leave the page cache dirty, and writeback then throttles
        // whoever writes next.
        let save = |id: String| {
            let sb = &sb;
            async move {
                nix::unistd::sync();
                let t = Instant::now();
                let saved = sb.snapshot(Some(&id), "full").await;
                (t.elapsed().as_secs_f64(), saved)
            }
        };
        let (first_s, info) = save(id.clone()).await;
        let info = info?;
        let again = format!("{id}-again");
        let (again_s, saved) = save(again.clone()).await;
        let _ = crate::sandbox::delete_snapshot(dirs, &again);
        saved?;
        let save_s = [first_s, again_s];
        let state_bytes = std::fs::metadata(info.path.join("state")).ctx(|| "reading the state's size".into())?.len();
        // Twice: the first restore after a while pays for the host's first touch of the memory it
        // fills (slow on a nested VM such as this host), a second one much less.
        let mut restore_s = [0.0; 2];
        for took in &mut restore_s {
            let t = Instant::now();
            let restored = Sandbox::from_snapshot_in(dirs.clone(), &id, crate::sandbox::RestoreOptions::default()).await?;
            let answered = restored.run("true", &RunOptions::default()).await;
            *took = t.elapsed().as_secs_f64();
            let _ = restored.delete().await;
            answered?;
        }
        // The reference: the same number of bytes written to a file (not synced, as the save's).
        let reference = work.join("written");
        let chunk = vec![0x5au8; 8 << 20];
        nix::unistd::sync();
        let t = Instant::now();
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&reference).ctx(|| "creating the reference file".into())?;
            let mut left = state_bytes as usize;
            while left > 0 {
                let n = left.min(chunk.len());
                f.write_all(&chunk[..n]).ctx(|| "writing the reference file".into())?;
                left -= n;
            }
        }
        let file_s = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&reference);
        let state_mb = state_bytes as f64 / 1e6;
        Ok::<_, Error>(SnapshotSpeed { state_mb, save_s, file_mb_per_s: state_mb / file_s, restore_s })
    }
    .await;
    let _ = sb.delete().await;
    let _ = crate::sandbox::delete_snapshot(dirs, &id);
    result
}

fn pss_kib(pid: i32) -> Result<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Pss:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .ok_or_else(|| Error::Host(format!("reading the proportional memory of process {pid}: it is gone")))
}

async fn start_many(dirs: &Dirs, n: usize) -> (Vec<Sandbox>, Vec<Error>) {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let dirs = dirs.clone();
        tasks.push(tokio::spawn(async move {
            let mut sb = Sandbox::create_in(dirs, VmConfig::default(), true)?;
            match sb.start(Duration::from_secs(120), &|_| {}).await {
                Ok(()) => Ok(sb),
                Err(e) => {
                    let _ = sb.delete().await;
                    Err(e)
                }
            }
        }));
    }
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for t in tasks {
        match t.await {
            Ok(Ok(sb)) => ok.push(sb),
            Ok(Err(e)) => failed.push(e),
            Err(e) => failed.push(Error::Host(e.to_string())),
        }
    }
    (ok, failed)
}

/// PSS per sandbox (MB) with `n` idle warm sandboxes running: what each costs when pages are
/// shared.
async fn density(dirs: &Dirs, n: usize, progress: image::Progress<'_>) -> Result<f64> {
    progress(&format!("density: {n} warm sandboxes, PSS each"));
    let (sbs, failed) = start_many(dirs, n).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let measured = (|| {
        let mut total = 0u64;
        for sb in &sbs {
            let rec = sb.record()?;
            for p in [rec.supervisor, rec.vmm] {
                let p = p.ok_or_else(|| Error::Host(format!("sandbox {} runs without a supervisor or QEMU on record", sb.id())))?;
                total += pss_kib(p.pid)?;
            }
        }
        Ok::<_, Error>(total)
    })();
    let count = sbs.len();
    for sb in sbs {
        let _ = sb.delete().await;
    }
    if let Some(e) = failed.into_iter().next() {
        return Err(e);
    }
    Ok(mb(measured?) / count.max(1) as f64)
}

/// Start `n` sandboxes at once; how many answer a command, and how long until all did.
async fn burst(dirs: &Dirs, n: usize, progress: image::Progress<'_>) -> Result<(usize, f64)> {
    progress(&format!("burst: {n} sandboxes started at once"));
    let started = Instant::now();
    let (sbs, _failed) = start_many(dirs, n).await;
    let mut answered = 0;
    for sb in &sbs {
        if sb.run("true", &RunOptions::default()).await.is_ok() {
            answered += 1;
        }
    }
    let took = started.elapsed().as_secs_f64();
    for sb in sbs {
        let _ = sb.delete().await;
    }
    Ok((answered, took))
}

fn work_file(dir: &std::path::Path, size: usize) -> Result<std::path::PathBuf> {
    let mut data = vec![0u8; size];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").ctx(|| "opening /dev/urandom".into())?, &mut data)
        .ctx(|| "reading /dev/urandom".into())?;
    let path = dir.join("blob");
    std::fs::write(&path, data).ctx(|| "writing the benchmark file".into())?;
    Ok(path)
}

/// Start-to-ready of a warm sandbox with NAT networking and with user networking (p50 ms).
async fn network_setup(dirs: &Dirs, rounds: usize, progress: image::Progress<'_>) -> Result<(f64, f64)> {
    if crate::net::nat_available().is_err() {
        return Ok((f64::NAN, f64::NAN));
    }
    progress("network: sandbox start with NAT against user networking");
    let config = |mode: &str| VmConfig { network: Some(mode.into()), ..Default::default() };
    let p50 = start_p50(dirs, rounds, &[config("nat"), config("user")], false).await?;
    Ok((p50[0], p50[1]))
}

/// Start to a first command's answer of a warm sandbox with a read-only mount of `share` and
/// without (user networking, p50 ms): a sandbox with mounts starts warm too, and mounts them
/// once restored, before that command runs.
async fn mount_start(dirs: &Dirs, share: &std::path::Path, rounds: usize, progress: image::Progress<'_>) -> Result<(f64, f64)> {
    progress("mounts: sandbox start with a mount against without");
    let without = VmConfig { network: Some("user".into()), ..Default::default() };
    let with = VmConfig { workspace_mounts: vec![crate::config::Mount { host: share.to_path_buf(), guest: None }], ..without.clone() };
    let p50 = start_p50(dirs, rounds, &[with, without], true).await?;
    Ok((p50[0], p50[1]))
}

/// Start-to-ready (p50 ms) of each config, interleaved, after one unmeasured round (which
/// makes a warm template if missing); with `first_command`, to the answer of a `true`.
async fn start_p50(dirs: &Dirs, rounds: usize, configs: &[VmConfig], first_command: bool) -> Result<Vec<f64>> {
    let mut took: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for i in 0..rounds + 1 {
        for (config, out) in configs.iter().zip(took.iter_mut()) {
            let mut sb = Sandbox::create_in(dirs.clone(), config.clone(), true)?;
            let t = Instant::now();
            let mut r = sb.start(Duration::from_secs(60), &|_| {}).await;
            if first_command && r.is_ok() {
                r = sb.run("true", &RunOptions::default()).await.map(|_| ());
            }
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            let _ = sb.delete().await;
            r?;
            if i > 0 {
                out.push(ms);
            }
        }
    }
    Ok(took.iter_mut().map(|t| percentile(t, 0.5)).collect())
}

fn sh(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A test host in its own network namespace serving a 20 MB file; each sandbox downloads it
/// with busybox nc, once over NAT and once over user networking.
async fn http_throughput(dirs: &Dirs, work: &std::path::Path, progress: image::Progress<'_>) -> Result<(f64, f64)> {
    if crate::net::nat_available().is_err() {
        return Ok((f64::NAN, f64::NAN));
    }
    progress("network: 20 MB HTTP download from a test host, NAT against user networking");
    let www = work.join("www");
    std::fs::create_dir_all(&www).ctx(|| "creating the web root".into())?;
    work_file(&www, 20 * 1024 * 1024)?;
    let ns = format!("svbench{}", std::process::id()); // not "smv*": that prefix means a sandbox TAP
    let (host, gw) = ("198.19.77.2", "198.19.77.1");
    let setup = format!(
        "ip netns add {ns} && ip link add {ns}h type veth peer name eth0 netns {ns} && ip addr add {gw}/30 dev {ns}h && \
         ip link set {ns}h up && ip -n {ns} addr add {host}/30 dev eth0 && ip -n {ns} link set eth0 up && ip -n {ns} route add default via {gw}"
    );
    let cleanup = || {
        sh(&format!("ip netns del {ns}; ip link del {ns}h"));
    };
    if !sh(&setup) {
        cleanup();
        return Err(Error::Host("could not set up the benchmark namespace".into()));
    }
    let server = "import http.server, os, socketserver, sys\nos.chdir(sys.argv[3])\nclass S(socketserver.ThreadingTCPServer):\n    allow_reuse_address = True\nhttp.server.SimpleHTTPRequestHandler.log_message = lambda *a: None\nS((sys.argv[1], int(sys.argv[2])), http.server.SimpleHTTPRequestHandler).serve_forever()\n";
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "python3", "-c", server, host, "8080"])
        .arg(&www)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ctx(|| "starting the test web server".into())?;
    let result = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let mut out = Vec::new();
        for mode in ["nat", "user"] {
            let config = VmConfig { network: Some(mode.into()), ..Default::default() };
            let mut sb = Sandbox::create_in(dirs.clone(), config, true)?;
            let r = async {
                sb.start(Duration::from_secs(60), &|_| {}).await?;
                let cmd = format!("printf 'GET /blob HTTP/1.0\\r\\n\\r\\n' | nc -w 10 {host} 8080 | wc -c");
                sb.run(&cmd, &RunOptions::default()).await?; // warm the path
                let t = Instant::now();
                let r = sb.run(&cmd, &RunOptions::default()).await?;
                let secs = t.elapsed().as_secs_f64();
                let bytes: f64 = r.output().parse().unwrap_or(0.0);
                if bytes < 20.0 * 1048576.0 {
                    return Err(Error::Host(format!("the {mode} download got {bytes} bytes")));
                }
                Ok(bytes / 1e6 / secs)
            }
            .await;
            let _ = sb.delete().await;
            out.push(r?);
        }
        Ok::<_, Error>((out[0], out[1]))
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    cleanup();
    result
}

fn tempfile_dir(dirs: &Dirs) -> Result<std::path::PathBuf> {
    let d = dirs.data.join(format!("bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).ctx(|| format!("creating {}", d.display()))?;
    Ok(d)
}

/// `sandbox create --image NAME` by the CLI, cold (`SMOLVM_WARM=0`) and warm: p50 seconds, and
/// QEMU's RSS in MB 2 s after the last create of each.
struct DiskCreate {
    image: String,
    cold_s: f64,
    warm_s: f64,
    cold_rss: f64,
    warm_rss: f64,
}

/// Create, time and delete sandboxes of `image` by the CLI (only its environment chooses a cold
/// boot), cold and warm interleaved, after one unmeasured warm create that makes the template.
/// Each is checked to have started as asked: a warm start that fell back to a cold boot
/// would be timed as warm.
async fn disk_create(dirs: &Dirs, image: &str, rounds: usize) -> Result<DiskCreate> {
    // (At least one measured round: a median of none is none.)
    let rounds = rounds.max(1);
    let mut took = [Vec::new(), Vec::new()];
    let mut rss = [0.0; 2];
    for i in 0..rounds + 1 {
        for (col, warm) in [false, true].into_iter().enumerate() {
            if i == 0 && !warm {
                continue;
            }
            let name = format!("bench-disk-{}-{col}", std::process::id());
            let t = Instant::now();
            let made = cli_sandbox(dirs, warm, &["create", "--name"], &name, &["--image", image])?;
            let secs = t.elapsed().as_secs_f64();
            let measured = async {
                if !made.status.success() {
                    return Err(Error::Host(format!("creating {name}: {}", String::from_utf8_lossy(&made.stderr).trim())));
                }
                let sb = Sandbox::open_in(dirs.clone(), &name).await?;
                let vmm = vmm_started(&sb, warm)?;
                if i == rounds {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    rss[col] = mb(rss_kib(vmm)?);
                }
                Ok(())
            }
            .await;
            // By name, whatever failed: the sandbox is this bench's.
            let _ = cli_sandbox(dirs, warm, &["delete", "--force"], &name, &[]);
            measured?;
            if i > 0 {
                took[col].push(secs);
            }
        }
    }
    let [cold_s, warm_s] = took.map(|mut t| percentile(&mut t, 0.5));
    Ok(DiskCreate { image: image.to_string(), cold_s, warm_s, cold_rss: rss[0], warm_rss: rss[1] })
}

/// SSH images and the SSH channel against the agent, in the same VM.
struct SshNumbers {
    builds: Vec<(String, f64, f64)>,
    creates: Vec<DiskCreate>,
    ready_s: f64,
    ssh_ms: f64,
    agent_ms: f64,
    sftp_up: f64,
    sftp_down: f64,
}

impl SshNumbers {
    fn json(&self) -> serde_json::Value {
        json!({
            "image_build_s": self.builds.iter().map(|(n, first, cached)| json!({"image": n, "first": first, "cached": cached})).collect::<Vec<_>>(),
            "disk_image_create": self.creates.iter().map(|c| json!({"image": c.image, "cold_p50_s": c.cold_s, "warm_p50_s": c.warm_s, "cold_idle_qemu_rss_mb": c.cold_rss, "warm_idle_qemu_rss_mb": c.warm_rss})).collect::<Vec<_>>(),
            "debian_ssh_create_to_ssh_ready_s": self.ready_s,
            "run_true_raw_ms": { "ssh_p50": self.ssh_ms, "agent_p50": self.agent_ms, "agent_speedup": self.ssh_ms / self.agent_ms, "target_speedup": 20 },
            "sftp_mb_per_s": { "upload": self.sftp_up, "download": self.sftp_down },
        })
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        for (name, first, cached) in &self.builds {
            md.push_str(&format!("| image build `{name}`: first / cached | {first:.1} s / {:.1} ms | |\n", cached * 1000.0));
        }
        for c in &self.creates {
            md.push_str(&format!(
                "| `sandbox create --image {}` (CLI), p50: warm; QEMU RSS idle | {:.2} s; {:.0} MB | cold-booted: {:.2} s; {:.0} MB |\n",
                c.image, c.warm_s, c.warm_rss, c.cold_s, c.cold_rss
            ));
        }
        md.push_str(&format!("| `debian-ssh` sandbox (started warm): create to first SSH login | {:.2} s | |\n", self.ready_s));
        md.push_str(&format!(
            "| `run(\"true\")` over SSH (new connection each) vs agent, same VM, p50 | {:.1} ms vs {:.2} ms: agent **{:.0}x** faster | target >= 20x |\n",
            self.ssh_ms,
            self.agent_ms,
            self.ssh_ms / self.agent_ms
        ));
        md.push_str(&format!(
            "| 20 MiB upload / download over SFTP | {:.0} / {:.0} MB/s | agent: see above |\n",
            self.sftp_up, self.sftp_down
        ));
        md
    }
}

async fn ssh_bench(dirs: &Dirs, work: &std::path::Path, progress: image::Progress<'_>) -> Result<SshNumbers> {
    progress("images: first and cached builds of alpine-ssh and debian-ssh (in a scratch cache)");
    let scratch = Dirs { data: work.join("ssh-data"), images: work.join("ssh-images") };
    let mut builds = Vec::new();
    for name in ["alpine-ssh", "debian-ssh"] {
        let recipe = crate::recipe::builtin(name).expect("built in");
        let (d, r) = (scratch.clone(), recipe.clone());
        let (first, cached) = tokio::task::spawn_blocking(move || -> Result<(f64, f64)> {
            // The guest busybox is built once per host for every image, not per image: not
            // part of an image's first build.
            crate::busybox::guest(&d, &|_| {})?;
            let t = Instant::now();
            crate::recipe::build(&d, &r, &|_| {})?;
            let first = t.elapsed().as_secs_f64();
            let t = Instant::now();
            crate::recipe::build(&d, &r, &|_| {})?;
            Ok((first, t.elapsed().as_secs_f64()))
        })
        .await
        .map_err(|e| Error::Host(e.to_string()))??;
        builds.push((name.to_string(), first, cached));
    }
    let _ = std::fs::remove_dir_all(&scratch.images);

    progress("disk images: sandbox create, cold and warm, alpine-ssh and debian-ssh");
    let mut creates = Vec::new();
    for name in ["alpine-ssh", "debian-ssh"] {
        // Built once outside the measurement.
        let config = VmConfig { image: Some(name.into()), ..Default::default() };
        crate::sandbox::resolve_image(&config, dirs, &|_| {}).await?;
        creates.push(disk_create(dirs, name, 5).await?);
    }

    progress("ssh: debian-ssh sandbox, SSH round trips against the agent's, SFTP");
    // (Its image built and its warm template made above.)
    let config = VmConfig { image: Some("debian-ssh".into()), ..Default::default() };
    let t = Instant::now();
    let mut sb = Sandbox::create_in(dirs.clone(), config, true)?;
    let result = async {
        sb.start(Duration::from_secs(120), &|_| {}).await?;
        vmm_started(&sb, true)?;
        sb.wait_for_ssh(Duration::from_secs(60)).await?;
        let ready_s = t.elapsed().as_secs_f64();
        let raw = RunOptions { shell: smolvm_proto::Shell::Raw, ..Default::default() };
        let mut over_ssh = Vec::new();
        sb.set_channel(crate::config::Channel::Ssh);
        for _ in 0..20 {
            let t = Instant::now();
            sb.run("true", &raw).await?;
            over_ssh.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let blob = work_file(work, 20 * 1024 * 1024)?;
        let t = Instant::now();
        sb.upload(&blob, "/tmp/blob").await?;
        let sftp_up = BLOB_MB / t.elapsed().as_secs_f64();
        let t = Instant::now();
        sb.download("/tmp/blob", &work.join("blob.sftp")).await?;
        let sftp_down = BLOB_MB / t.elapsed().as_secs_f64();
        sb.set_channel(crate::config::Channel::Agent);
        let mut over_agent = Vec::new();
        for _ in 0..100 {
            let t = Instant::now();
            sb.run("true", &raw).await?;
            over_agent.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        Ok::<_, Error>(SshNumbers {
            builds,
            creates,
            ready_s,
            ssh_ms: percentile(&mut over_ssh, 0.5),
            agent_ms: percentile(&mut over_agent, 0.5),
            sftp_up,
            sftp_down,
        })
    }
    .await;
    let _ = sb.delete().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_lie_between_the_nearest_ranks() {
        assert_eq!(percentile(&mut [4.0, 1.0, 3.0, 2.0], 0.5), 2.5, "an even count's median is its middle pair's mean");
        assert_eq!(percentile(&mut [3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(percentile(&mut [7.0], 0.99), 7.0);
        let mut hundred_and_one: Vec<f64> = (0..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut hundred_and_one, 0.99), 99.0);
        assert!((mb(1024) - 1.048576).abs() < 1e-9, "a MiB in MB");
    }

    #[test]
    fn the_lab_reference_changes_only_the_kernel_command_line() {
        let mut args: Vec<String> = ["-kernel", "k", "-append", "console=ttyS0 quiet", "-initrd", "i"].map(String::from).to_vec();
        replace_cmdline(&mut args, lab_cmdline(Some(2_596_120), vmm::Accel::Tcg));
        assert_eq!(
            args,
            ["-kernel", "k", "-append", "quiet tsc_early_khz=2596120 nolapic_timer reboot=t smolvm_poweroff=1", "-initrd", "i"]
        );
        // Without a known TSC rate the kernel calibrates it itself.
        assert_eq!(lab_cmdline(None, vmm::Accel::Tcg), "quiet nolapic_timer reboot=t smolvm_poweroff=1");
        // TCG's timer work-arounds stay off a KVM guest.
        assert_eq!(lab_cmdline(None, vmm::Accel::Kvm), "quiet reboot=t smolvm_poweroff=1");
    }
}
