//! The foundation, on real VMs: boot, exec, streaming, timeouts, concurrency, bad input,
//! crash recovery.

mod common;

use common::*;
use serde_json::json;
use smolvm::sandbox::console_tail;
use smolvm::{Error, RunOptions, Sandbox, Shell, State, VmConfig};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn opts(timeout: u64) -> RunOptions {
    RunOptions { timeout: Duration::from_secs(timeout), ..Default::default() }
}

#[test]
fn cli_run_separates_streams_and_exits_with_the_guest_code() {
    let env = env();
    let out = env.smolvm(&["run", "echo out; echo err >&2; exit 3"]);
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");
    assert_eq!(out.status.code(), Some(3));
    // `smolvm run` leaves nothing behind.
    assert!(env.qemu_processes().is_empty());
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
    let list = env.smolvm(&["sandbox", "list", "--all", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v["data"], serde_json::json!([]));
    let out = env.smolvm(&["run", "-w", "/etc", "pwd"]);
    assert_eq!((stdout(&out).as_str(), out.status.code()), ("/etc\n", Some(0)), "{}", stderr(&out));
    // Bad input is refused before anything boots.
    let out = env.smolvm(&["run", "--cwd", "etc", "pwd"]);
    assert_eq!((stderr(&out).as_str(), out.status.code()), ("error: invalid cwd: \"etc\" is not an absolute guest path\n", Some(1)));
    let out = env.cli().args(["run", " "]).env("SMOLVM_LOG", "debug").output().unwrap();
    assert!(stderr(&out).ends_with("error: invalid command: must not be empty\n"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("phase: created"), "{}", stderr(&out));
}

/// Most tests' `smolvm run`s start from the warm snapshot; a cold boot's first command works
/// the same: streams, exit code, input, a large output, the timeout, variables, and nothing is
/// left behind.
#[test]
fn a_cold_runs_command_works_as_a_warm_ones() {
    use std::io::Write;
    let env = env();
    let cold = |args: &[&str], input: &[u8]| {
        let mut child = env
            .cli()
            .env("SMOLVM_WARM", "0")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = cold(&["run", "echo out; echo err >&2; exit 3"], b"");
    assert_eq!((stdout(&out).as_str(), stderr(&out).as_str(), out.status.code()), ("out\n", "err\n", Some(3)));
    let out = cold(&["run", "-i", "wc -c; echo héllo ✓"], b"12345");
    assert_eq!((stdout(&out).as_str(), out.status.code()), ("5\nhéllo ✓\n", Some(0)), "{}", stderr(&out));
    let out = cold(&["run", "head -c 5000000 /dev/zero | tr '\\0' x"], b"");
    assert!(out.stdout.len() == 5_000_000 && out.stdout.iter().all(|b| *b == b'x'), "{} bytes", out.stdout.len());
    let out = cold(&["run", "-e", "MODE=ci", "echo $MODE"], b"");
    assert_eq!(stdout(&out), "ci\n", "{}", stderr(&out));
    let out = cold(&["run", "--timeout", "2", "sleep 30"], b"");
    assert!(stderr(&out).contains("Operation 'run' timed out after 2s"), "{}", stderr(&out));
    assert!(env.qemu_processes().is_empty());
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// Once nobody reads `smolvm run`'s output, the command ends (as `yes | head -1` ends `yes`),
/// instead of running on unseen until its timeout; a stdout that takes nothing more is an error.
#[test]
fn a_reader_that_goes_away_ends_the_command() {
    use std::io::Read;
    let env = env();
    let mut child = env.cli().args(["run", "--timeout", "60", "yes"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut first = [0u8; 2];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    assert_eq!(&first, b"y\n");
    // (The read end is closed as `take`'s handle drops.) A program killed by SIGPIPE: 141.
    assert_eq!(child.wait().unwrap().code(), Some(141));
    let full = std::fs::File::create("/dev/full").unwrap();
    let out = env.cli().args(["run", "--timeout", "60", "seq 1 100000; exit 3"]).stdout(full).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("error: writing the command's output: No space left on device"), "{}", stderr(&out));
    assert!(env.qemu_processes().is_empty());
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// The guest's time to the nanosecond: busybox `date` has no %N; a new file's modification
/// time has nanoseconds.
const GUEST_TIME: &str = "touch /tmp/t && stat -c %Y.%y /tmp/t";

/// `GUEST_TIME`'s output, "<seconds>.<date> <hh:mm:ss.nnnnnnnnn> <zone>", as Unix seconds: the
/// whole seconds, then the fraction.
fn guest_time(out: &std::process::Output) -> f64 {
    parse_guest_time(&stdout(out), &stderr(out))
}

fn parse_guest_time(text: &str, stderr: &str) -> f64 {
    let secs: f64 = text.split('.').next().unwrap().parse().unwrap_or_else(|_| panic!("{text:?} {stderr}"));
    let frac: f64 = format!("0.{}", text.split_whitespace().nth(1).and_then(|t| t.split('.').nth(1)).unwrap()).parse().unwrap();
    secs + frac
}

/// A cold-booted guest is told the time once its agent reads at once: the greeting waits in
/// the channel through the boot (its timestamp alone left the clock 0.3-0.5 s behind), and a
/// time sent right after it waited out the agent's first-run work (network, hostname, entropy).
#[test]
fn a_cold_booted_guest_has_the_hosts_time() {
    let env = env();
    clock_follows_the_hosts(&env, "cold-clock", &[("SMOLVM_WARM", "0")]);
}

/// A warm start's guest is told the time once it reads at once: told it with the greeting, it
/// set its clock after the greeting's work, which a restored guest does slowly, and kept it
/// 50-65 ms behind the host's.
#[test]
fn a_warm_started_guest_has_the_hosts_time() {
    let env = env();
    clock_follows_the_hosts(&env, "warm-clock", &[]);
}

/// Creates sandbox `name` (with `vars` set for its start) and reads its clock three times
/// against the host's, read before and after each exec.
fn clock_follows_the_hosts(env: &TestEnv, name: &str, vars: &[(&str, &str)]) {
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let out = env.cli().args(["sandbox", "create", "--name", name]).envs(vars.iter().copied()).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(started_warm(name), vars.is_empty(), "{vars:?}");
    for _ in 0..3 {
        let before = now();
        let out = env.smolvm(&["sandbox", "exec", name, "--", "sh", "-c", GUEST_TIME]);
        let after = now();
        let guest = guest_time(&out);
        // The time told is late by its one-way trip, some milliseconds, more on a host busy
        // with other VMs (3 ms past `before` was seen under the full suite): 40 ms of room,
        // short of the 50-65 ms lag this guards against.
        assert!(guest > before - 0.04 && guest < after, "{vars:?}: guest {guest:.3}, host {before:.3}..{after:.3}");
    }
    assert!(env.smolvm(&["sandbox", "delete", "--force", name]).status.success());
}

/// Under TCG the guest keeps time by the host's TSC at the rate the host tells it: told a rate
/// off by some percent, its clock runs that much fast or slow.
#[tokio::test]
async fn a_guests_clock_runs_at_the_hosts_rate() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    // The host's time on both sides of each reading: the guest read its clock in between.
    let uptime = || async {
        let sent = Instant::now();
        let r = sb.run("cat /proc/uptime", &opts(30)).await.unwrap();
        (sent, Instant::now(), r.stdout.split_whitespace().next().unwrap().parse::<f64>().unwrap())
    };
    let (sent0, back0, guest0) = uptime().await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (sent1, back1, guest1) = uptime().await;
    let (least, most, guest) = ((sent1 - back0).as_secs_f64(), (back1 - sent0).as_secs_f64(), guest1 - guest0);
    // /proc/uptime counts in hundredths. A rate off by 2 % is 0.16 s in 8 s.
    assert!(
        guest > least * 0.98 - 0.02 && guest < most * 1.02 + 0.02,
        "in {least:.3}..{most:.3} s of the host's time the guest counted {guest:.2} s"
    );
    sb.delete().await.unwrap();
}

#[tokio::test]
async fn unicode_and_five_megabytes_of_output_arrive_intact() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let r = sb.run("printf 'héllo wörld ✓ 日本\\n'", &opts(30)).await.unwrap();
    assert_eq!(r.stdout, "héllo wörld ✓ 日本\n");
    assert!(r.ok());
    // The standard streams by name, as on any Linux (they were missing: the output went into
    // plain files under /dev).
    let r = sb.run("echo out > /dev/stdout; echo err > /dev/stderr; echo both | tee /dev/stderr", &opts(30)).await.unwrap();
    assert_eq!((r.stdout.as_str(), r.stderr.as_str(), r.exit_code), ("out\nboth\n", "err\nboth\n", 0));
    let r = sb.run("cat /dev/stdin", &RunOptions { stdin: Some(b"in\n".to_vec()), ..opts(30) }).await.unwrap();
    assert_eq!(r.stdout, "in\n");
    let r = sb.run("seq 1 800000", &opts(120)).await.unwrap();
    let expected: String = (1..=800000).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() > 5_000_000);
    assert_eq!(r.stdout.len(), expected.len());
    assert!(r.stdout == expected, "5 MB of output differs");
    assert_eq!(r.output(), expected.trim());
    sb.delete().await.unwrap();
    assert!(env.qemu_processes().is_empty());
}

/// A guest kernel set not to restart on a panic (root in the guest may) spins where it
/// panicked: the sandbox is failed with why and its VM stopped, where it stayed `running` at a
/// whole host core and every command waited out its timeout.
#[tokio::test]
async fn a_guest_kernel_that_panics_and_spins_fails_the_sandbox() {
    let env = env();
    let sb = env.boot(VmConfig { memory: 128, ..Default::default() }).await;
    let cmd = "echo 0 > /proc/sys/kernel/panic; echo 1 > /proc/sys/vm/panic_on_oom; tail /dev/zero";
    let e = sb.run(cmd, &opts(120)).await.unwrap_err().to_string();
    assert!(e.contains("the guest kernel panicked (set not to restart, it spun on): the VM was stopped"), "{e}");
    assert_eq!(sb.state().unwrap(), State::Error);
    let why = sb.record().unwrap().error.unwrap_or_default();
    assert!(why.contains("Kernel panic"), "{why}");
    assert!(wait_until(Duration::from_secs(5), || env.qemu_processes().is_empty()), "the VM spins on");
    sb.delete().await.unwrap();
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// The guest's scratch filesystems draw on one pool of memory: filling one leaves the others
/// full too, and a write says "No space left on device". Each a tmpfs of half the guest's
/// memory, filling two of them ran the kernel out of memory, and it panicked.
#[tokio::test]
async fn filling_the_guests_scratch_space_is_no_space_left_not_a_dead_vm() {
    let env = env();
    let rootfs = smolvm::image::default_rootfs(&env.dirs).unwrap();
    for (config, places) in [
        (VmConfig { memory: 256, ..Default::default() }, ["/root", "/tmp", "/dev/shm"]),
        (VmConfig { memory: 256, rootfs_path: Some(rootfs), ..Default::default() }, ["/tmp", "/dev/shm", "/run"]),
    ] {
        let sb = env.boot(config).await;
        let fill: Vec<String> =
            places.iter().map(|p| format!("dd if=/dev/zero of={p}/fill bs=1M 2>&1 | grep -c 'No space left'")).collect();
        let r = sb.run(&format!("{}; df /tmp | tail -1", fill.join("; ")), &opts(120)).await.unwrap();
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(lines[..3], ["1", "1", "1"], "{r:?}");
        assert!(lines[3].contains("100%"), "df says: {r:?}");
        // And the sandbox goes on.
        assert_eq!(sb.run("rm /tmp/fill; echo alive", &opts(30)).await.unwrap().stdout, "alive\n");
        sb.delete().await.unwrap();
    }
    assert!(env.qemu_processes().is_empty());
}

/// A command that prints without end cannot fill the caller's memory: past `max_output` it is
/// stopped with its whole group and the call says why, while output up to the limit is kept.
#[tokio::test]
async fn output_past_the_limit_stops_the_command_instead_of_filling_the_host() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let limit = 1 << 20;
    let within = RunOptions { max_output: limit, ..opts(60) };
    let r = sb.run(&format!("head -c {limit} /dev/zero | tr '\\0' a"), &within).await.unwrap();
    assert_eq!((r.stdout.len(), r.exit_code), (limit, 0));
    let mut streamed = 0;
    let err = sb
        .run_streaming("yes smolvm-flood", &within, |o| {
            if let smolvm::sandbox::Output::Stdout(d) = o {
                streamed += d.len();
            }
        })
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "the command's stdout passed 1 MiB, the most `run` keeps; the command was stopped");
    assert_eq!(err.code(), "output_limit");
    // A streaming caller was handed all that came, the piece that passed the limit too.
    assert!(streamed > limit, "{streamed}");
    assert_eq!(processes_left(&sb, "[y]es smolvm-flood").await, 0, "the command was left running");
    // stderr has a limit of its own.
    let err = sb.run("yes smolvm-flood >&2", &RunOptions { max_output: 1000, ..opts(60) }).await.unwrap_err();
    assert!(err.to_string().starts_with("the command's stderr passed 1000 bytes,"), "{err}");
    let err = sb.run("true", &RunOptions { max_output: 0, ..opts(10) }).await.unwrap_err();
    assert_eq!(err.to_string(), "invalid max_output: must be at least 1 byte");
    assert_eq!(sb.run("echo still here", &opts(10)).await.unwrap().output(), "still here");
    sb.delete().await.unwrap();
}

/// A process that escaped a timed-out command's kill (its own session, parent gone, moved out
/// of the command's cgroup) and keeps writing to the command's output does not keep the exec
/// open: it ends 2 s after the kill, as a timeout.
#[tokio::test]
async fn a_timed_out_command_ends_though_an_escaped_writer_holds_its_output() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let started = Instant::now();
    let escape = "(setsid sh -c 'echo $$ > /sys/fs/cgroup/cgroup.procs; while :; do echo x; sleep 0.05; done' &); sleep 100";
    let err = sb.run(escape, &opts(2)).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    // The host's own bound (the timeout and 5 s) would end it at 7 s.
    assert!(took >= Duration::from_secs(2) && took < Duration::from_millis(6500), "{took:?}");
    // The writer dies of its closed pipe; the sandbox goes on.
    assert_eq!(sb.run("echo still here", &opts(10)).await.unwrap().output(), "still here");
    sb.delete().await.unwrap();
}

#[tokio::test]
async fn a_timed_out_command_is_killed_with_its_whole_group() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let started = Instant::now();
    // A child of the shell and a grandchild in the background: all in one process group.
    let err = sb.run("sleep 1234 & sleep 1235; echo never", &opts(2)).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert_eq!(err.to_string(), "Operation 'run' timed out after 2s");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(10), "{took:?}");
    let r = sb.run("ps -o pid,args | grep 'sleep 123[45]' || true", &opts(10)).await.unwrap();
    assert_eq!(r.stdout, "", "processes of the timed-out command remain:\n{}", r.stdout);
    // One that left the group (its own session) while its parent still ran goes too.
    let err = sb.run("setsid sleep 1236 & sleep 1237", &opts(2)).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let r = sb.run("ps -o pid,args | grep 'sleep 123[67]' || true", &opts(10)).await.unwrap();
    assert_eq!(r.stdout, "", "processes of the timed-out command remain:\n{}", r.stdout);
    // A daemon that double-forked (its parent gone, so it belongs to PID 1, in a session of its
    // own) goes too: the command's cgroup holds it.
    let err = sb.run("setsid sh -c 'sleep 1238 &'; sleep 1239", &opts(2)).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let r = sb.run("ps -o pid,ppid,args | grep 'sleep 123[89]' || true", &opts(10)).await.unwrap();
    assert_eq!(r.stdout, "", "processes of the timed-out command remain:\n{}", r.stdout);
    // A command that ended normally leaves its background processes running, in its cgroup.
    let r = sb.run("setsid sh -c 'sleep 1240 &'", &opts(10)).await.unwrap();
    assert_eq!(r.exit_code, 0);
    let r = sb.run("cat /proc/$(ps -o pid,args | awk '$2 == \"sleep\" && $3 == 1240 {print $1}')/cgroup", &opts(10)).await.unwrap();
    assert!(r.stdout.starts_with("0::/smolvm/"), "{:?}", r.stdout);
    // Groups a command made inside its own go with it, once empty (as its own does).
    let made = "cg=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); mkdir -p $cg/sub/deeper; echo $cg";
    let cg = sb.run(made, &opts(10)).await.unwrap().output().to_string();
    // (Removed just after the answer, which does not wait for it: seen once to come a moment
    // after the next command's look, under the full suite.)
    let gone = || async { sb.run(&format!("ls -d {cg} 2>&1 || true"), &opts(10)).await.unwrap().stdout.contains("No such file") };
    assert!(eventually(Duration::from_secs(5), gone).await, "{cg} stayed");
    // The sandbox stays usable.
    assert_eq!(sb.run("echo still here", &opts(10)).await.unwrap().output(), "still here");
    // Commands start with no signals blocked (the agent blocks the ones it reaps with): a TERM
    // ends a sleep, and daemons see their children exit.
    let r = sb.run("grep SigBlk /proc/self/status; sleep 100 & kill -TERM $!; wait $!; echo $?", &opts(10)).await.unwrap();
    assert_eq!(r.stdout, "SigBlk:\t0000000000000000\n143\n");
    // A background process that keeps the output pipes open is not waited for: the exec ends
    // once the shell has exited and the pipes are quiet, with everything written before.
    let r = sb.run("echo a; (sleep 4321 &); echo b >&2", &opts(10)).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str(), r.stderr.as_str()), (0, "a\n", "b\n"));
    let r = sb.run("ps -o args | grep -c '^sleep 4321'", &opts(10)).await.unwrap();
    assert_eq!(r.stdout, "1\n", "the background process should still run");
    // One that keeps writing holds the exec open only until the timeout: then its group goes.
    // It writes without pause (a builtin echo, no fork): a loop that slept between lines could
    // fall quiet for longer than the agent waits on a loaded host and be let go instead.
    let started = Instant::now();
    let r = sb.run("(while :; do echo tick; done) & echo started", &opts(2)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(6), "the exec outlived its timeout: {:?}", started.elapsed());
    assert_eq!(r.exit_code, 0);
    assert!(r.stdout.starts_with("started\n") || r.stdout.contains("tick\n"), "{:?}", r.stdout);
    let r = sb.run("ps -o args | grep -c '[w]hile :; do echo tick' || true", &opts(10)).await.unwrap();
    assert_eq!(r.stdout, "0\n", "the background loop survived the timeout");
    // A caller that goes away at once (Ctrl-C) leaves nothing running, even when its cancel
    // reaches the guest before the command has started.
    for _ in 0..5 {
        let _ = tokio::time::timeout(Duration::from_millis(1), sb.run("sleep 1235", &opts(60))).await;
    }
    assert_eq!(processes_left(&sb, "^sleep 1235").await, 0, "cancelled commands run on");
    // A caller that goes away once the command has left a daemon behind (forked twice): the
    // daemon goes with it.
    // (Cancelled once both run: else there would be nothing to leave behind.)
    let daemon_opts = opts(60);
    let daemon = sb.run("setsid sh -c 'sleep 1241 &'; sleep 1242", &daemon_opts);
    let both_run = eventually(Duration::from_secs(30), || async { processes_now(&sb, "^sleep 124[12]").await == 2 });
    let seen = tokio::select! {
        _ = daemon => panic!("the command ended on its own"),
        seen = both_run => seen,
    };
    assert!(seen, "the command and its daemon never both ran");
    assert_eq!(processes_left(&sb, "^sleep 124[12]").await, 0, "a cancelled command's daemon runs on");
    sb.delete().await.unwrap();
}

/// How many guest processes match `pattern` (their command lines) now.
async fn processes_now(sb: &Sandbox, pattern: &str) -> usize {
    let out = sb.run(&format!("ps -o args | grep -c '{pattern}' || true"), &opts(10)).await.unwrap().stdout;
    out.trim().parse().unwrap_or_else(|_| panic!("ps said {out:?}"))
}

/// How many guest processes match `pattern` (their command lines), once none do or after 5 s:
/// a cancel reaches the guest a moment after the caller has gone.
async fn processes_left(sb: &Sandbox, pattern: &str) -> usize {
    let mut left = 0;
    for _ in 0..50 {
        left = processes_now(sb, pattern).await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    left
}

#[tokio::test]
async fn a_reader_that_falls_behind_holds_back_the_guest_not_the_host() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let supervisor = sb.info().await.unwrap()["supervisor_pid"].as_i64().expect("a supervisor") as i32;
    let before = rss_kib(supervisor);
    let size = 64 << 20;
    let (mut first, mut during) = (true, 0);
    let r = sb
        .run_streaming(&format!("head -c {size} /dev/zero; echo done >&2"), &opts(120), |_| {
            if std::mem::take(&mut first) {
                // Nothing is read for two seconds, while the guest writes as fast as it can.
                std::thread::sleep(Duration::from_secs(2));
                during = rss_kib(supervisor);
            }
        })
        .await
        .unwrap();
    assert_eq!((r.stdout.len(), r.stderr.as_str(), r.exit_code), (size, "done\n", 0));
    let grew = during.saturating_sub(before);
    assert!(grew < 16 * 1024, "the supervisor took in {grew} KiB of output its client did not read");
    sb.delete().await.unwrap();
}

/// Free page reporting: what a command filled and then freed goes back to the host, where the
/// VM was booted. (A warm clone's RAM is a private map of its template's file, which QEMU 7.2
/// cannot hand back page by page: there the device reports nothing.)
#[test]
fn memory_the_guest_frees_goes_back_to_the_host() {
    let env = env();
    let out = env.cli().env("SMOLVM_WARM", "0").args(["sandbox", "create", "--name", "freed"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let qemu = env.qemu_processes();
    assert_eq!(qemu.len(), 1);
    let rss_kib = || rss_kib(qemu[0]);
    let exec = |cmd: &str| {
        let out = env.smolvm(&["sandbox", "exec", "freed", "--", cmd]);
        assert!(out.status.success(), "{cmd}: {}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(exec("ls /sys/bus/virtio/drivers/virtio_balloon | grep -c virtio"), "1\n", "the balloon's driver is bound");
    let before = rss_kib();
    exec("dd if=/dev/zero of=/tmp/fill bs=1M count=200 2>/dev/null");
    let full = rss_kib();
    assert!(full > before + 150 * 1024, "200 MB written into the guest's tmpfs took {} KiB of host memory", full - before);
    exec("rm /tmp/fill");
    // The guest reports freed memory two seconds after the frees, in 4 MB blocks (our kernel's).
    let back = wait_until(Duration::from_secs(30), || rss_kib() + 150 * 1024 < full);
    assert!(back, "the host still holds {} KiB of the guest's freed memory ({} KiB before the fill)", rss_kib(), before);
    assert!(env.smolvm(&["sandbox", "delete", "--force", "freed"]).status.success());
}

#[test]
fn the_agent_serves_over_vsock_where_the_vmm_offers_it() {
    let env = env();
    let vsock = |args: &[&str]| env.cli().env("SMOLVM_AGENT_TRANSPORT", "vsock").args(args).output().unwrap();
    // The streams and the exit code as over virtio-serial; the guest has a vsock device bound
    // to its driver and no serial port.
    let probe = "echo out; echo err >&2; ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport | grep -c virtio; \
                 ls /dev/vport0p1 2>/dev/null | wc -l; exit 3";
    let out = vsock(&["run", "--shell", "raw", probe]);
    assert_eq!((out.status.code(), stdout(&out).as_str(), stderr(&out).as_str()), (Some(3), "out\n1\n0\n", "err\n"));
    // A sandbox that stays: concurrent commands, 5 MB of output and files both ways.
    let out = vsock(&["sandbox", "create", "--name", "vs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let env = &env;
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..8)
            .map(|i| s.spawn(move || env.smolvm(&["sandbox", "exec", "vs", "--", &format!("sleep 0.{}; echo {i}", i % 5)])))
            .collect();
        for (i, r) in runs.into_iter().enumerate() {
            assert_eq!(stdout(&r.join().unwrap()), format!("{i}\n"));
        }
    });
    let big = env.smolvm(&["sandbox", "exec", "vs", "--", "head -c 5000000 /dev/zero"]);
    assert_eq!(big.stdout.len(), 5_000_000);
    let src = env.tmp.path().join("up.bin");
    let data = random_bytes(3 << 20);
    std::fs::write(&src, &data).unwrap();
    let back = env.tmp.path().join("down.bin");
    assert!(env.smolvm(&["sandbox", "file", "upload", "vs", src.to_str().unwrap(), "/tmp/up.bin"]).status.success());
    assert!(env.smolvm(&["sandbox", "file", "download", "vs", "/tmp/up.bin", back.to_str().unwrap()]).status.success());
    assert!(std::fs::read(&back).unwrap() == data, "the file came back different");
    // Its vhost-user device cannot be saved: a snapshot is refused with the reason.
    let out = env.smolvm(&["sandbox", "snapshot", "create", "vs"]);
    assert!(!out.status.success());
    assert!(stderr(&out).starts_with("error: host: a sandbox whose agent is on vsock cannot be snapshotted"), "{}", stderr(&out));
    assert_eq!(stdout(&env.smolvm(&["sandbox", "exec", "vs", "--", "echo still"])), "still\n");
    // Nothing of it stays: VMM, vsock device server, sockets.
    assert!(env.smolvm(&["sandbox", "delete", "--force", "vs"]).status.success());
    let data_dir = env.dirs.data.to_string_lossy().into_owned();
    assert!(wait_until(Duration::from_secs(5), || processes_mentioning("vhost-device-vsock", &data_dir).is_empty()), "vsock server left");
    // Debian's kernel carries vsock as modules; its initramfs loads them.
    let out = env
        .cli()
        .env("SMOLVM_AGENT_TRANSPORT", "vsock")
        .env("SMOLVM_KERNEL", "debian")
        .args(["run", "echo debian over vsock"])
        .output()
        .unwrap();
    assert_eq!(stdout(&out), "debian over vsock\n", "{}", stderr(&out));
    // Without its device server the guest has lost its agent: the sandbox fails, and goes.
    assert!(vsock(&["sandbox", "create", "--name", "vs2"]).status.success());
    let server = processes_mentioning("vhost-device-vsock", &data_dir);
    assert_eq!(server.len(), 1);
    assert!(std::process::Command::new("kill").args(["-9", &server[0].to_string()]).status().unwrap().success());
    let failed = wait_until(Duration::from_secs(10), || {
        let v: serde_json::Value = serde_json::from_slice(&env.smolvm(&["sandbox", "info", "vs2", "--json"]).stdout).unwrap_or_default();
        v["data"]["state"] == "error"
    });
    assert!(failed, "the sandbox did not notice its vsock device server was gone");
    assert!(wait_until(Duration::from_secs(5), || env.qemu_processes().is_empty()), "QEMU left");
    assert!(env.smolvm(&["sandbox", "delete", "--force", "vs2"]).status.success());
    assert!(wait_until(Duration::from_secs(5), || processes_mentioning("vhost-device-vsock", &data_dir).is_empty()), "vsock server left");
    assert!(env.qemu_processes().is_empty());
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

#[tokio::test]
async fn the_agent_does_pid_1s_duties_and_a_poweroff_or_halt_inside_stops_the_sandbox() {
    use std::os::unix::fs::PermissionsExt;
    let env = env();
    let mut sb = env.boot(VmConfig { vm_id: Some("pid1".into()), ..Default::default() }).await;
    // The control socket is its owner's only.
    assert_eq!(std::fs::metadata(&sb.paths().ctl).unwrap().permissions().mode() & 0o777, 0o600);
    let r = sb.run("awk '{print $2, $3}' /proc/mounts", &opts(10)).await.unwrap();
    // (/tmp and /run are the initramfs's own directories, and /dev/shm one of them: one pool
    // of memory for them all.)
    for m in ["/ rootfs", "/dev devtmpfs", "/dev/pts devpts", "/dev/shm rootfs", "/proc proc", "/sys sysfs"] {
        assert!(r.stdout.lines().any(|l| l == m), "{m} is not mounted:\n{}", r.stdout);
    }
    assert_eq!(sb.run("stat -c %a /tmp /dev/shm", &opts(10)).await.unwrap().stdout, "1777\n1777\n");
    // Orphans whose parents are gone at once are PID 1's: it reaps them, none stays a zombie.
    // (An exit is reaped a moment after it happens: a loaded host gets a few looks.)
    let zombies = "for i in 1 2 3 4 5 6; do (sleep 0.2 &); done; sleep 1; for t in 1 2 3 4 5 6 7 8 9 10; do \
                   n=$(grep -l '^State:.Z' /proc/[0-9]*/status | wc -l); [ $n = 0 ] && break; sleep 0.3; done; echo $n";
    assert_eq!(sb.run(zombies, &opts(10)).await.unwrap().stdout, "0\n");
    // `poweroff` inside: the guest goes down cleanly and the sandbox is stopped, not failed.
    let _ = sb.run("poweroff", &opts(10)).await;
    assert!(wait_until(Duration::from_secs(30), || sb.state().unwrap() == State::Stopped), "state {:?}", sb.state());
    assert!(sb.info().await.unwrap()["error"].is_null());
    assert!(wait_until(Duration::from_secs(5), || env.qemu_processes().is_empty()), "QEMU still runs");
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    assert_eq!(sb.run("echo back", &opts(10)).await.unwrap().output(), "back");
    // A command that says nothing for a while is asked after, not taken for a halted guest.
    assert_eq!(sb.run("sleep 6; echo still", &opts(30)).await.unwrap().output(), "still");
    // `halt -f` and `poweroff -f` (a halt, without ACPI) stop the CPUs and leave QEMU running:
    // the sandbox is found stopped, and the command ends long before its bound. `reboot -f`
    // resets the VM, which is a stop too. The error comes once the state says so.
    for halt in ["halt -f", "poweroff -f", "reboot -f"] {
        let r = sb.run(halt, &opts(300)).await;
        assert!(
            matches!(&r, Err(e @ smolvm::Error::Guest(_)) if e.to_string().ends_with("the sandbox stopped while the command ran")),
            "{halt}: {r:?}"
        );
        assert_eq!(sb.state().unwrap(), State::Stopped, "{halt}");
        assert!(sb.info().await.unwrap()["error"].is_null(), "{halt}");
        assert!(wait_until(Duration::from_secs(5), || env.qemu_processes().is_empty()), "{halt}: QEMU still runs");
        sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    }
    // Halted while idle, it is found stopped without a command to wait on.
    sb.run("(sleep 1; halt -f) >/dev/null 2>&1 &", &opts(10)).await.unwrap();
    assert!(wait_until(Duration::from_secs(30), || sb.state().unwrap() == State::Stopped), "an idle halt: state {:?}", sb.state());
    // Nor can it be paused or saved in between (a saved halted guest would restore halted):
    // refused (as halted, or as stopped if found so just before), and stopped.
    let refused = |e: smolvm::Error| {
        let e = e.to_string();
        assert!(e.contains("stopped its CPUs for good") || e.contains("is stopped"), "{e}");
    };
    // (Once the kernel has said so on the console, however long the guest took to get there.)
    let halt_in_background = async |sb: &Sandbox| {
        let halts = || std::fs::read_to_string(&sb.paths().console).unwrap_or_default().matches("reboot: System halted").count();
        let before = halts();
        sb.run("(sleep 1; halt -f) >/dev/null 2>&1 &", &opts(10)).await.unwrap();
        assert!(wait_until(Duration::from_secs(30), || halts() > before), "the guest never halted");
    };
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    halt_in_background(&sb).await;
    refused(sb.snapshot(Some("halted"), "full").await.unwrap_err());
    assert_eq!(sb.state().unwrap(), State::Stopped);
    assert!(smolvm::sandbox::list_snapshots(&env.dirs).unwrap().is_empty());
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    halt_in_background(&sb).await;
    refused(sb.pause().await.unwrap_err());
    assert_eq!(sb.state().unwrap(), State::Stopped);
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    assert_eq!(sb.run("echo back again", &opts(10)).await.unwrap().output(), "back again");
    sb.delete().await.unwrap();
}

#[tokio::test]
async fn stdin_reaches_the_command_from_the_library_and_the_cli() {
    use std::io::Write;
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let with = |input: &[u8], timeout| RunOptions { stdin: Some(input.to_vec()), ..opts(timeout) };
    assert_eq!(sb.run("tr a-z A-Z", &with(b"one\ntwo\n", 20)).await.unwrap().stdout, "ONE\nTWO\n");
    // Several windows' worth, echoed while it is still being fed.
    let big: Vec<u8> = (0..5 << 20).map(|i| if i % 64 == 63 { b'\n' } else { b'a' + (i % 26) as u8 }).collect();
    let r = sb.run("cat", &with(&big, 120)).await.unwrap();
    assert!(r.stdout.as_bytes() == big.as_slice(), "{} bytes came back of {}", r.stdout.len(), big.len());
    // Without it a command reads nothing: its stdin ends at once.
    assert_eq!(sb.run("wc -c", &opts(20)).await.unwrap().output(), "0");
    // Input sent only as fast as the command takes it: 300 MB into a 256 MiB guest whose command
    // reads nothing for three seconds. Had the agent taken it all in, the guest would be out of
    // memory.
    let small = env.boot(VmConfig { memory: 256, ..Default::default() }).await;
    let flood = Box::new(tokio::io::AsyncReadExt::take(tokio::io::repeat(b'x'), 300 << 20)) as smolvm::sandbox::Input;
    let r = small.run_with_input("sleep 3; wc -c", &opts(120), Some(flood), |_| {}).await.unwrap();
    assert_eq!(r.output(), (300u64 << 20).to_string());
    assert_eq!(small.run("echo alive", &opts(10)).await.unwrap().output(), "alive");
    small.delete().await.unwrap();
    // `-i` hands the CLI's own stdin over as it comes: the command answers a line before the
    // next one is written.
    let mut child = env
        .cli()
        .args(["sandbox", "exec", "-i", sb.id(), "--", "while read l; do echo \"got $l\"; done"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let mut output = std::io::BufReader::new(child.stdout.take().unwrap());
    input.write_all(b"a\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut output, &mut line).unwrap();
    assert_eq!(line, "got a\n");
    input.write_all(b"b\n").unwrap();
    drop(input);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut output, &mut rest).unwrap();
    assert_eq!(rest, "got b\n");
    assert!(child.wait().unwrap().success());
    // A command that ends while a process it left behind holds its input unread: the agent
    // lets go of the pipe (that process reads its end) instead of waiting on it for good.
    let holder = "exec 3<&0; sleep 1000 <&3 3<&- & echo $!";
    let pid = sb.run(holder, &with(&vec![b'x'; 1 << 20], 20)).await.unwrap().output().to_string();
    let held = format!("p=$(readlink /proc/{pid}/fd/0); ls -l /proc/1/fd | grep -cF \"$p\"; kill {pid}");
    let mut count = String::new();
    for _ in 0..50 {
        count = sb.run(&held.replace("; kill", "; true"), &opts(10)).await.unwrap().output().to_string();
        if count == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count, "0", "the agent still holds the input pipe of a command that ended");
    sb.run(&held, &opts(10)).await.unwrap();
    sb.delete().await.unwrap();
}

/// The supervisor queues a client's input for the agent (a paused VM takes none), so it holds
/// each client to its window: one that sends past its grants is cut off, and others go on.
#[tokio::test]
async fn a_client_that_sends_input_past_its_grants_is_cut_off() {
    use smolvm_proto::{ExecRequest, Request};
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let raw = smolvm::conn::Conn::connect(&sb.paths().ctl, sb.id()).await.unwrap();
    let exec = ExecRequest {
        command: "sleep 30".into(),
        shell: Shell::Raw,
        env: Default::default(),
        timeout_ms: 30_000,
        stdin: true,
        cwd: None,
        tty: None,
    };
    let mut stream = raw.open(&Request::Exec(exec)).await.unwrap();
    // A command that reads nothing grants back little more than its pipe holds.
    for _ in 0..(4 * smolvm_proto::WINDOW / smolvm_proto::CHUNK) {
        if raw.send_on(stream.id, &Request::Stdin(vec![b'x'; smolvm_proto::CHUNK])).await.is_err() {
            break;
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.recv().await {
                None => break,
                // Its command is cancelled with it.
                Some(smolvm_proto::Reply::Credit(_) | smolvm_proto::Reply::Exit { code: 137, .. }) => continue,
                Some(other) => panic!("{other:?}"),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the client was not cut off");
    assert!(raw.is_closed());
    assert_eq!(sb.run("echo still here", &opts(10)).await.unwrap().output(), "still here");
    sb.delete().await.unwrap();
}

#[tokio::test]
async fn sixteen_concurrent_execs_each_get_their_own_output() {
    let env = env();
    let sb = Arc::new(env.boot(VmConfig::default()).await);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let sb = sb.clone();
        tasks.push(tokio::spawn(async move {
            // All at once: each first waits until all 16 have started (run one after another,
            // the first would wait out its timeout), then they interleave their output.
            let cmd = format!(
                "mkdir -p /tmp/started; touch /tmp/started/{i}; \
                 while [ $(ls /tmp/started | wc -l) -lt 16 ]; do sleep 0.05; done; \
                 for j in 1 2 3; do echo {i}-$j; sleep 0.2; done; echo err{i} >&2; exit {}",
                i % 7
            );
            (i, sb.run(&cmd, &opts(60)).await.unwrap())
        }));
    }
    for t in tasks {
        let (i, r) = t.await.unwrap();
        assert_eq!(r.stdout, format!("{i}-1\n{i}-2\n{i}-3\n"));
        assert_eq!(r.stderr, format!("err{i}\n"));
        assert_eq!(r.exit_code, i % 7);
    }
    Arc::try_unwrap(sb).ok().unwrap().delete().await.unwrap();
}

#[tokio::test]
async fn login_and_raw_shells_and_lifecycle_states() {
    let env = env();
    let mut sb = env.boot(VmConfig { vm_id: Some("life".into()), vcpu_count: 1, memory: 256, ..Default::default() }).await;
    assert_eq!(sb.state().unwrap(), State::Running);
    assert!(sb.can_run_commands().await);
    // A login shell sources /etc/profile and with it /etc/profile.d; a raw one does not.
    sb.run("echo 'export FROM_PROFILE=yes' > /etc/profile.d/t.sh", &opts(10)).await.unwrap();
    let login = sb.run("echo \"[$FROM_PROFILE]\"", &opts(10)).await.unwrap();
    assert_eq!(login.output(), "[yes]");
    let raw = sb.run("echo \"[$FROM_PROFILE]\"", &RunOptions { shell: Shell::Raw, ..opts(10) }).await.unwrap();
    assert_eq!(raw.output(), "[]");
    // A command that starts with '-' or '+' is a command, not the shell's options, in either
    // shell.
    for shell in [Shell::Login, Shell::Raw] {
        for cmd in ["-n", "+x a"] {
            let r = sb.run(cmd, &RunOptions { shell, ..opts(10) }).await.unwrap();
            let word = cmd.split(' ').next().unwrap();
            assert_eq!((r.exit_code, r.stderr.as_str()), (127, format!("/bin/sh: {word}: not found\n").as_str()), "{cmd}");
        }
    }
    // A working directory, and one that does not exist.
    let r = sb.run("pwd", &RunOptions { cwd: Some("/tmp".into()), ..opts(10) }).await.unwrap();
    assert_eq!(r.output(), "/tmp");
    let err = sb.run("pwd", &RunOptions { cwd: Some("/nope".into()), ..opts(10) }).await.unwrap_err();
    assert_eq!(err.to_string(), "guest agent: exec: working directory /nope does not exist");
    assert_eq!(err.code(), "cannot_start");
    let err = sb.run("pwd", &RunOptions { cwd: Some("tmp".into()), ..opts(10) }).await.unwrap_err();
    assert_eq!(err.to_string(), "invalid cwd: \"tmp\" is not an absolute guest path");
    // The CLI's -w/--cwd (also --workdir), for `exec` and `run`, on a terminal too.
    for args in
        [&["sandbox", "exec", "-w", "/etc", "life", "--", "pwd"][..], &["sandbox", "exec", "-t", "--workdir", "/etc", "life", "--", "pwd"]]
    {
        let out = env.smolvm(args);
        assert_eq!((out.status.code(), stdout(&out).trim()), (Some(0), "/etc"), "{args:?}: {}", stderr(&out));
    }
    // A working directory the guest cannot enter: the command never ran, which exits 126 (as
    // a shell's "cannot execute"), apart from any code of the command's own.
    let out = env.smolvm(&["sandbox", "exec", "-w", "/etc/passwd", "life", "--", "exit 1"]);
    assert_eq!(
        (out.status.code(), stderr(&out).as_str()),
        (Some(126), "error: guest agent: exec: working directory /etc/passwd is not a directory\n")
    );
    let out = env.smolvm(&["sandbox", "exec", "--cwd", "etc", "life", "--", "pwd"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "error: invalid cwd: \"etc\" is not an absolute guest path\n");
    let r = sb.run("hostname; nproc; grep MemTotal /proc/meminfo; stat -c %a / /tmp", &opts(10)).await.unwrap();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "life");
    assert_eq!(lines[1], "1");
    // Only /tmp is everyone's to write in (/ was: the kernel's tmpfs root keeps 1777 unless
    // the initramfs says otherwise).
    assert_eq!(lines[3..], ["755", "1777"], "{}", r.stdout);
    // Another process (the CLI) reaches the same sandbox through its supervisor.
    let out = env.smolvm(&["sandbox", "exec", "life", "--", "echo", "via", "cli"]);
    assert_eq!(stdout(&out), "via cli\n");
    // A hangup (the terminal it was started from closed) does not end the supervisor. (QEMU,
    // in its process group, takes SIGHUP as a request to quit, as SIGTERM.)
    let supervisor = sb.info().await.unwrap()["supervisor_pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(supervisor), nix::sys::signal::Signal::SIGHUP).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sb.run("echo still here", &opts(10)).await.unwrap().stdout, "still here\n");
    sb.stop(Duration::from_secs(5)).await.unwrap();
    assert_eq!(sb.state().unwrap(), State::Stopped);
    assert!(env.qemu_processes().is_empty());
    let err = sb.run("true", &opts(10)).await.unwrap_err();
    assert_eq!(err.to_string(), "VM 'life' is stopped; start it first (smolvm sandbox start life)");
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    assert_eq!(sb.run("echo again", &opts(10)).await.unwrap().output(), "again");
    sb.delete().await.unwrap();
    assert!(matches!(Sandbox::open_in(env.dirs.clone(), "life").await, Err(Error::NotFound(_))));
    assert!(env.leftover_files().is_empty());
}

#[test]
fn bad_input_names_the_field_and_leaves_nothing() {
    let env = env();
    let cases: Vec<(VmConfig, &str)> = vec![
        (VmConfig { memory: 64, ..Default::default() }, "invalid memory: 64 MiB is out of range (allowed 128..=16384 MiB)"),
        (
            VmConfig { vm_id: Some("Bad_ID!".into()), ..Default::default() },
            "invalid vm_id: \"Bad_ID!\" is not allowed: use 1-64 characters of a-z, 0-9, '_' and '-', starting and ending with a letter or digit",
        ),
        (
            VmConfig { kernel_path: Some("/nonexistent/vmlinux".into()), ..Default::default() },
            "invalid kernel_path: /nonexistent/vmlinux is not a readable file",
        ),
        (
            VmConfig { backend: Some("xen".into()), ..Default::default() },
            "invalid backend: \"xen\" is not a backend (allowed: firecracker, qemu, auto)",
        ),
        (VmConfig { vcpu_count: 64, ..Default::default() }, "invalid vcpu_count: 64 is out of range (allowed 1..=32)"),
        (
            VmConfig { image: Some("no-such-image".into()), ..Default::default() },
            "invalid image: no image named \"no-such-image\" (built in: default, alpine-ssh, debian-ssh;",
        ),
    ];
    for (config, message) in cases {
        let err = Sandbox::create_in(env.dirs.clone(), config, false).err().expect("must fail");
        assert!(err.to_string().starts_with(message), "{err}");
        assert_eq!(err.code(), "validation");
    }
    for (args, field) in [
        (vec!["run", "--memory", "64", "true"], "memory: 64 MiB is out of range (allowed 128..=16384 MiB)"),
        // Past 32 bits, and below zero: the field's own range, not the type's.
        (vec!["run", "--memory", "99999999999", "true"], "memory: 99999999999 MiB is out of range (allowed 128..=16384 MiB)"),
        (vec!["sandbox", "create", "--cpus", "-1"], "vcpu_count: -1 is out of range (allowed 1..=32)"),
        (vec!["run", "--backend", "xen", "true"], "backend: \"xen\" is not a backend (allowed: firecracker, qemu, auto)"),
        (
            vec!["sandbox", "create", "--name", "Bad_ID!"],
            "vm_id: \"Bad_ID!\" is not allowed: use 1-64 characters of a-z, 0-9, '_' and '-', starting and ending with a letter or digit",
        ),
        (vec!["run", "--kernel", "/nonexistent/vmlinux", "true"], "kernel_path: /nonexistent/vmlinux is not a readable file"),
        (vec!["sandbox", "create", "--mount", "/nonexistent/dir"], "mounts"),
        (vec!["sandbox", "create", "--mount", "/tmp:/etc/tmp"], "mounts"),
        (vec!["sandbox", "create", "--mount", "/tmp:relative"], "mounts"),
        (vec!["sandbox", "create", "--writable-mounts"], "writable_mounts"),
        (vec!["run", "--timeout", "1e19", "true"], "timeout"),
        (vec!["run", "--timeout", "0.5", "true"], "timeout"),
        (vec!["sandbox", "create", "--boot-timeout", "inf"], "boot_timeout"),
        // Documented commands that are not built yet say so, instead of being unknown.
        (vec!["image", "pull", "debian-ssh"], "image"),
    ] {
        let out = env.smolvm(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(&format!("invalid {field}")), "{args:?}: {}", stderr(&out));
    }
    // What the argument parser refuses (exit code 2) names the argument and what is allowed.
    for (args, says) in [
        (
            vec!["sandbox", "logs", "x", "--tail", "-1"],
            "invalid value '-1' for '--tail <TAIL>': must be a whole number of lines, 0 or more",
        ),
        (vec!["sandbox", "port", "close", "x", "70000"], "invalid value '70000' for '<GUEST>': is not a port (allowed: 1..=65535)"),
        (vec!["sandbox", "port", "close", "x", "0"], "invalid value '0' for '<GUEST>': is not a port (allowed: 1..=65535)"),
        (vec!["sandbox", "create", "--cpus", "1.5"], "invalid value '1.5' for '--cpus <CPUS>': must be a whole number"),
        // A mistyped option is not taken for the command (it ran, and failed in the guest).
        (vec!["run", "--nosuchflag", "true"], "unexpected argument '--nosuchflag' found"),
    ] {
        let out = env.smolvm(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    let out = env.cli().args(["run", "true"]).env("SMOLVM_BACKEND", "firecracker").output().unwrap();
    assert!(stderr(&out).contains("firecracker is not supported by this build yet"), "{}", stderr(&out));
    // A bad accelerator is bad input, named as such (it was a host error).
    let out = env.cli().args(["run", "true"]).env("SMOLVM_ACCEL", "bogus").output().unwrap();
    assert_eq!(stderr(&out), "error: invalid SMOLVM_ACCEL: \"bogus\" is not allowed (allowed: kvm, tcg, auto)\n");
    // `doctor` says it alike.
    let out = env.cli().args(["doctor"]).env("SMOLVM_ACCEL", "bogus").output().unwrap();
    assert!(
        stdout(&out).contains("[fail] accelerator     invalid SMOLVM_ACCEL: \"bogus\" is not allowed (allowed: kvm, tcg, auto)"),
        "{}",
        stdout(&out)
    );
    assert!(env.qemu_processes().is_empty());
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
    let store = smolvm::store::Store::open(&env.dirs.data).unwrap();
    assert!(store.all().unwrap().is_empty());
}

/// `delete A missing B`: A and B go, each named; the missing one is an error; exit code 1.
#[test]
fn a_delete_of_several_goes_on_past_one_that_fails() {
    let env = env();
    for name in ["del-a", "del-b"] {
        let out = env.smolvm(&["sandbox", "create", "--no-start", "--name", name]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let out = env.smolvm(&["sandbox", "delete", "del-a", "del-missing", "del-b"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out), "del-a\ndel-b\n");
    assert!(stderr(&out).starts_with("error: VM 'del-missing' not found\n"), "{}", stderr(&out));
    let list = env.smolvm(&["sandbox", "list", "--all", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v["data"], serde_json::json!([]));
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
    // A live one is refused without --force, as a state to change, not a host failure.
    assert!(env.smolvm(&["sandbox", "create", "--name", "del-live"]).status.success());
    let out = env.smolvm(&["sandbox", "delete", "del-live"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "error: VM 'del-live' is running; stop it first or pass --force\nhint: smolvm sandbox stop del-live\n");
    assert!(env.smolvm(&["sandbox", "delete", "--force", "del-live"]).status.success());
    // `--all` with nothing there deletes nothing, and that is no error.
    let out = env.smolvm(&["sandbox", "delete", "--all", "--force"]);
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), String::new()), "{}", stderr(&out));
}

/// A `create` killed while its supervisor boots the sandbox: a `start` then waits for that
/// boot and connects to it, instead of booting it a second time beside the first (which found
/// the TAP taken, and left the first supervisor and its VM untracked for good).
#[test]
fn a_start_after_a_killed_starter_waits_for_its_boot() {
    let env = env();
    // (A boot held open: the starter dies during it.)
    let initrd = env.slow_initrd(3);
    let mut create =
        env.spawn_booting(env.cli().args(["sandbox", "create", "--name", "killedstarter", "--initrd"]).arg(&initrd), "no boot under way");
    let supervisors = || processes_mentioning("__supervise", "killedstarter");
    assert_eq!(supervisors().len(), 1, "no boot under way");
    create.kill().unwrap();
    create.wait().unwrap();
    let out = env.cli().args(["sandbox", "start", "killedstarter"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&env.smolvm(&["sandbox", "exec", "killedstarter", "--", "echo ok"])), "ok\n");
    assert_eq!(supervisors().len(), 1);
    assert!(env.smolvm(&["sandbox", "delete", "--force", "killedstarter"]).status.success());
    assert!(wait_until(Duration::from_secs(3), || supervisors().is_empty() && env.qemu_processes().is_empty()));
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

#[test]
fn kill_9_of_smolvm_run_is_cleaned_up_by_the_next_command() {
    let env = env();
    let errors = env.tmp.path().join("run-stderr");
    let mut child = env.cli().args(["run", "sleep 300"]).stderr(std::fs::File::create(&errors).unwrap()).spawn().unwrap();
    // Wait until its VM runs the command; a run that failed instead says why. The bound is
    // generous: under the full suite the VM tests share two cores, and the first run of an
    // image may wait for its warm snapshot to be made.
    let running = wait_until(Duration::from_secs(120), || {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("smolvm run ended early ({status}): {}", std::fs::read_to_string(&errors).unwrap_or_default());
        }
        let out = env.smolvm(&["sandbox", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["data"].as_array().is_some_and(|a| a.iter().any(|s| s["state"] == "running"))
    });
    assert!(running, "no sandbox reached running within 120 s; smolvm run said: {}", std::fs::read_to_string(&errors).unwrap_or_default());
    assert!(!env.qemu_processes().is_empty());
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let out = env.smolvm(&["sandbox", "prune"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(wait_until(Duration::from_secs(2), || env.qemu_processes().is_empty()), "QEMU left running");
    // Strictly after prune: its supervisor, which saw its owner die, may have removed the
    // sandbox in the meantime, and the lock prune takes must not bring its directory back.
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
    // Its supervisor finishes on its own (it lets go of the TAP last, off anyone's path).
    let no_supervisor = || {
        processes_mentioning("__supervise", "").iter().all(|p| {
            let environ = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
            !String::from_utf8_lossy(&environ).contains(&*env.dirs.data.to_string_lossy())
        })
    };
    assert!(wait_until(Duration::from_secs(3), no_supervisor), "a supervisor is left");
}

#[test]
fn prune_removes_what_an_interrupted_snapshot_left_and_nothing_being_made() {
    let env = env();
    // `snapshot create` killed after the supervisor wrote the files, before the record: the
    // directory says who was making it.
    let leftover = smolvm::sandbox::snapshot_dir(&env.dirs, "interrupted");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("state"), vec![0u8; 4096]).unwrap();
    std::fs::write(leftover.join("making"), "2147483646 1").unwrap();
    // One this test is making right now.
    let in_progress = smolvm::sandbox::snapshot_dir(&env.dirs, "in-progress");
    smolvm::snapshot_files::claim(&in_progress, "in-progress").unwrap();
    let out = env.smolvm(&["sandbox", "prune", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!leftover.exists(), "the leftover of an interrupted snapshot stays");
    assert!(in_progress.exists(), "prune removed a snapshot being made");
    // It says what it removed.
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["data"]["leftovers"], serde_json::json!([leftover.to_string_lossy()]), "{v}");
    assert_eq!(v["data"]["removed"], serde_json::json!([]), "{v}");
    // Without --json, on stderr: stdout keeps to the ids of removed sandboxes.
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("making"), "2147483646 1").unwrap();
    let out = env.smolvm(&["sandbox", "prune"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("removed leftover files: {}", leftover.display())), "{}", stderr(&out));
}

/// `start` of a paused sandbox is refused (it said "running" of a frozen VM), and `stop
/// --timeout 0` stops at once, as Python's `stop(timeout=0)` does.
#[test]
fn start_refuses_a_paused_sandbox_and_stop_takes_no_grace() {
    let env = env();
    assert!(env.smolvm(&["sandbox", "create", "--name", "pz"]).status.success());
    assert!(env.smolvm(&["sandbox", "pause", "pz"]).status.success());
    let out = env.smolvm(&["sandbox", "start", "pz"]);
    assert_eq!(stderr(&out).lines().next(), Some("error: VM 'pz' is paused; resume it first (smolvm sandbox resume pz)"));
    assert_eq!(out.status.code(), Some(1));
    assert!(env.smolvm(&["sandbox", "resume", "pz"]).status.success());
    let out = env.smolvm(&["sandbox", "stop", "pz", "--timeout", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.smolvm(&["sandbox", "stop", "pz", "--timeout", "-1"]);
    assert_eq!(stderr(&out).lines().next(), Some("error: invalid timeout: must be 0 or a positive number of seconds"));
    assert!(env.smolvm(&["sandbox", "delete", "pz"]).status.success());
    assert!(env.qemu_processes().is_empty());
}

/// A start whose supervisor is killed during the boot fails, and leaves the sandbox in `error`
/// saying why (it stayed `created`, with the dead supervisor's pid).
#[tokio::test]
async fn a_start_whose_supervisor_is_killed_leaves_the_sandbox_in_error() {
    let env = env();
    // (Boot arguments of its own: a cold boot, long enough to be caught in.)
    let mut sb = Sandbox::create_in(env.dirs.clone(), VmConfig { boot_args: Some("y=1".into()), ..Default::default() }, false).unwrap();
    let id = sb.id().to_string();
    let kill = async {
        loop {
            if let Some(pid) = processes_mentioning("__supervise", &id).first() {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL).unwrap();
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (started, ()) = tokio::join!(sb.start(Duration::from_secs(60), &|_| {}), kill);
    let err = started.unwrap_err().to_string();
    assert!(err.contains("the supervisor exited without a status"), "{err}");
    let rec = smolvm::sandbox::list(&env.dirs).unwrap().into_iter().find(|r| r.id == id).unwrap();
    assert_eq!(rec.state, State::Error);
    assert!(rec.error.as_deref().unwrap_or_default().contains("the supervisor exited without a status"), "{:?}", rec.error);
    assert!(rec.supervisor.is_none());
    assert!(wait_until(Duration::from_secs(5), || env.qemu_processes().is_empty()), "its QEMU is left");
    sb.delete().await.unwrap();
}

/// A handle whose sandbox another caller stopped: its next command is refused as for any
/// stopped sandbox ("start it first"), not said to have been cut off ("stopped while the
/// command ran"), though the supervisor's clean-up still runs after the stop has returned.
#[tokio::test]
async fn the_next_command_on_a_sandbox_stopped_elsewhere_says_to_start_it() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    assert!(sb.run("true", &opts(10)).await.unwrap().ok());
    let mut other = Sandbox::open_in(env.dirs.clone(), sb.id()).await.unwrap();
    other.stop(Duration::from_secs(10)).await.unwrap();
    let err = sb.run("true", &opts(10)).await.unwrap_err();
    assert_eq!(err.to_string(), format!("VM '{}' is stopped; start it first (smolvm sandbox start {})", sb.id(), sb.id()));
    sb.delete().await.unwrap();
}

/// A sandbox deleted (or stopped) under a running command: the command's caller hears why.
#[tokio::test]
async fn a_command_whose_sandbox_is_deleted_ends_with_why() {
    let env = env();
    let sb = Arc::new(env.boot(VmConfig::default()).await);
    let running = {
        let sb = sb.clone();
        tokio::spawn(async move { sb.run("sleep 30", &opts(60)).await })
    };
    let other = Sandbox::open_in(env.dirs.clone(), sb.id()).await.unwrap();
    // (Once the command runs.)
    for _ in 0..100 {
        if other.run("pgrep -x sleep", &opts(10)).await.unwrap().exit_code == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    other.delete().await.unwrap();
    let err = running.await.unwrap().unwrap_err();
    // (A delete stops the sandbox first: the command used to hear of the stop.)
    assert_eq!(err.to_string(), "guest agent: the sandbox was deleted while the command ran");
    assert!(env.qemu_processes().is_empty());
}

#[tokio::test]
async fn a_killed_supervisor_shows_as_error_and_prune_removes_it() {
    let env = env();
    // A command running then hears why it ended, in a named sandbox and in an ephemeral one
    // (whose record goes at once: it used to read as deleted).
    for ephemeral in [true, false] {
        let config = VmConfig { vm_id: Some(if ephemeral { "gone" } else { "crash" }.into()), ..Default::default() };
        let mut sb = Sandbox::create_in(env.dirs.clone(), config, ephemeral).unwrap();
        sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
        let sb = Arc::new(sb);
        let running = {
            let sb = sb.clone();
            tokio::spawn(async move { sb.run("sleep 30", &opts(60)).await })
        };
        let mut in_flight = false;
        for _ in 0..200 {
            in_flight = sb.run("pgrep -x sleep", &opts(10)).await.unwrap().exit_code == 0;
            if in_flight {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(in_flight, "the command never ran");
        let sup = sb.record().unwrap().supervisor.unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(sup.pid), nix::sys::signal::Signal::SIGKILL).unwrap();
        let err = running.await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "guest agent: the sandbox failed: its supervisor exited unexpectedly while the command ran");
        if ephemeral {
            assert!(matches!(sb.record(), Err(Error::NotFound(_))));
        }
    }
    // QEMU follows its supervisor (PDEATHSIG).
    assert!(wait_until(Duration::from_secs(5), || env.qemu_processes().is_empty()));
    let out = env.smolvm(&["sandbox", "list", "--all", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["data"][0]["state"], "error");
    // Without `--all` it is not listed, and the list says so.
    let out = env.smolvm(&["sandbox", "list"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1, "only the header");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "(1 stopped or failed sandbox not shown: `smolvm sandbox list --all` lists it)"
    );
    let out = env.smolvm(&["sandbox", "prune", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["data"]["removed"], serde_json::json!(["crash"]));
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// A sandbox outlives an upgrade of smolvm, and its supervisor keeps the build that started
/// it. A client of another build (here: a socket that answers with another protocol's
/// preamble, in the supervisor's place) sends it nothing: exec says why and what to do, and
/// stop asks the real supervisor by SIGTERM, which powers the guest off cleanly: a file the
/// guest had not synced is on its disk at the next start (a killed VM loses it).
#[tokio::test]
async fn a_supervisor_of_another_build_is_sent_no_request_and_stops_by_signal() {
    let env = env();
    let ok = |args: &[&str]| {
        let out = env.smolvm(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&["sandbox", "create", "--name", "older", "--image", "alpine-ssh"]);
    ok(&["sandbox", "exec", "older", "--", "sh", "-c", "echo kept > /root/unsynced"]);
    let ctl = Sandbox::open_in(env.dirs.clone(), "older").await.unwrap().paths().ctl.clone();
    let real = ctl.with_extension("real");
    std::fs::rename(&ctl, &real).unwrap();
    let other = smolvm_proto::PROTOCOL_VERSION + 1;
    let listener = std::os::unix::net::UnixListener::bind(&ctl).unwrap();
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    std::thread::spawn({
        let sent = sent.clone();
        move || {
            for mut client in listener.incoming().flatten() {
                let mut preamble = smolvm_proto::SUPERVISOR_MAGIC.to_vec();
                preamble.extend_from_slice(&other.to_le_bytes());
                let _ = std::io::Write::write_all(&mut client, &preamble);
                let _ = client.set_read_timeout(Some(Duration::from_millis(300)));
                let mut got = vec![];
                let _ = std::io::Read::read_to_end(&mut client, &mut got);
                sent.lock().unwrap().extend(got);
            }
        }
    });
    let out = env.smolvm(&["sandbox", "exec", "older", "--", "rm", "/root/unsynced"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "VM 'older' runs under a supervisor of another smolvm build (protocol {other}; this smolvm speaks {})",
            smolvm_proto::PROTOCOL_VERSION
        )) && err.contains("smolvm sandbox stop older"),
        "{err}"
    );
    assert!(sent.lock().unwrap().is_empty(), "a request went to the other build's supervisor");
    let sup = smolvm::store::Store::open(&env.dirs.data).unwrap().get("older").unwrap().unwrap().supervisor.unwrap();
    ok(&["sandbox", "stop", "older"]);
    assert!(!sup.alive() && env.qemu_processes().is_empty());
    let rec = smolvm::store::Store::open(&env.dirs.data).unwrap().get("older").unwrap().unwrap();
    assert_eq!((rec.state, rec.error), (State::Stopped, None));
    let _ = std::fs::remove_file(&real);
    ok(&["sandbox", "start", "older"]);
    assert_eq!(ok(&["sandbox", "exec", "older", "--", "cat", "/root/unsynced"]), "kept\n");
    ok(&["sandbox", "delete", "--force", "older"]);
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// A record whose settings no longer parse (a damaged state.db; made here directly, with no
/// VM) lists as damaged; nothing uses its default settings in place of its own (env list and
/// unset, start) or says its values; `delete --force` removes it, and every copy of its values.
#[test]
fn a_damaged_record_lists_is_not_used_and_deletes() {
    let env = env();
    let config = VmConfig { env_vars: [("TOKEN".to_string(), "s3cret-damaged".to_string())].into(), ..Default::default() };
    smolvm::store::Store::open(&env.dirs.data).unwrap().insert("dmg", &config, None).unwrap();
    let db = rusqlite::Connection::open(env.dirs.data.join("state.db")).unwrap();
    db.execute("UPDATE sandboxes SET config = replace(config, '\"memory\"', '\"memoryX\"')", []).unwrap();
    drop(db);
    let out = env.smolvm(&["sandbox", "list", "--all", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&v["data"][0]["id"], &v["data"][0]["damaged"]), (&json!("dmg"), &json!(true)), "{v}");
    for args in [
        &["sandbox", "env", "list", "dmg", "--show-values"][..],
        &["sandbox", "env", "unset", "dmg", "TOKEN"],
        &["sandbox", "start", "dmg"],
    ] {
        let out = env.smolvm(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("the settings recorded for sandbox 'dmg' in the state database do not parse"), "{args:?}: {err}");
        assert!(!err.contains("s3cret") && !String::from_utf8_lossy(&out.stdout).contains("s3cret"), "{args:?}");
    }
    assert!(env.qemu_processes().is_empty());
    assert!(env.smolvm(&["sandbox", "delete", "--force", "dmg"]).status.success());
    for f in ["state.db", "state.db-wal"] {
        let bytes = std::fs::read(env.dirs.data.join(f)).unwrap_or_default();
        assert!(!bytes.windows(6).any(|w| w == b"s3cret"), "{f} kept the damaged record's value");
    }
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// A sandbox whose record went while it ran (its state database lost or replaced): prune ends
/// its supervisor, which takes its VM and network down, and then removes its files. (It removed
/// the files alone: the VM, its TAP and its firewall table ran on, with nothing to reach them.)
#[tokio::test]
async fn prune_ends_a_running_sandbox_that_no_record_names() {
    let env = env();
    let config = VmConfig { vm_id: Some("unnamed".into()), ..Default::default() };
    let mut sb = Sandbox::create_in(env.dirs.clone(), config, false).unwrap();
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    let dir = sb.paths().dir.clone();
    drop(sb);
    let table = smolvm::net::table_name(&env.dirs.data, "unnamed");
    let _drop_table = DropTable(table.clone());
    let has_table = || nft_has_table(&table);
    let tap = smolvm::net::tap_name(&env.dirs.data, "unnamed");
    let has_tap = || link_exists(&tap);
    assert!(has_table() && has_tap(), "a NAT sandbox has its firewall table {table} and TAP {tap}");
    assert!(smolvm::store::Store::open(&env.dirs.data).unwrap().remove("unnamed").unwrap());
    // Made in the last minute, it may be a sandbox being created: left alone.
    let out = env.smolvm(&["sandbox", "prune", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["data"]["leftovers"], json!([]), "{v}");
    assert_eq!(env.qemu_processes().len(), 1);
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(120);
    std::fs::File::open(&dir).unwrap().set_modified(long_ago).unwrap();
    let out = env.smolvm(&["sandbox", "prune", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["data"]["leftovers"], json!([dir.to_string_lossy()]), "{v}");
    assert!(wait_until(Duration::from_secs(5), || env.qemu_processes().is_empty()), "its VM runs on");
    assert!(!dir.exists() && !has_table());
    assert!(wait_until(Duration::from_secs(5), || !has_tap()), "its TAP {tap} stayed");
}

/// The host's disk under the data directory fills while the guest writes to its own disk:
/// QEMU pauses the VM (losing nothing), and the sandbox says why and how on, instead of every
/// command timing out with the sandbox read as running. Its supervisor lives on (its first log
/// line on the full disk killed it, and its VM with it); freed space and a resume let the
/// write finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_host_disk_pauses_the_sandbox_and_says_so() {
    let env = env();
    // The data directory on a small disk of its own, unmounted however the test ends.
    struct Mounted(std::path::PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            for pid in processes_mentioning("qemu-system", &self.0.to_string_lossy()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(300));
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    std::fs::create_dir_all(&env.dirs.data).unwrap();
    let mount =
        std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=700M,mode=0700", "tmpfs"]).arg(&env.dirs.data).status();
    assert!(mount.unwrap().success());
    let _mounted = Mounted(env.dirs.data.clone());
    let sb = Arc::new(env.boot(VmConfig { image: Some("alpine-ssh".into()), ..Default::default() }).await);
    // (A TCG guest of a root disk takes no transparent huge pages: see `qemu::spawn`.)
    if smolvm::vmm::choose_accel() == Ok(smolvm::vmm::Accel::Tcg) {
        assert_ne!(takes_huge_pages(env.qemu_processes()[0]), Some(true));
    }
    // All but 10 MiB of it taken.
    let filler = env.dirs.data.join("filler");
    let free_mib = nix::sys::statvfs::statvfs(&env.dirs.data).map(|v| (v.blocks_available() * v.fragment_size()) >> 20).unwrap();
    let filled = std::process::Command::new("fallocate").arg("-l").arg(format!("{}M", free_mib - 10)).arg(&filler).status();
    assert!(filled.unwrap().success());
    let writer = {
        let sb = sb.clone();
        tokio::spawn(async move {
            sb.run("dd if=/dev/urandom of=/root/big bs=1M count=30 2>/dev/null && sync && echo synced", &opts(300)).await
        })
    };
    // (A probe caught by the pause waits it out: it is given up and another sent.)
    let mut said = None;
    for _ in 0..60 {
        match tokio::time::timeout(Duration::from_secs(5), sb.run("true", &opts(10))).await {
            Ok(Err(e)) => {
                said = Some(e);
                break;
            }
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    let said = said.expect("the sandbox never said it was paused").to_string();
    let dir = sb.paths().dir.display().to_string();
    assert_eq!(
        said,
        format!("host: the host's disk is full: a write to this sandbox's disk (under {dir}) found no space left, so QEMU paused the VM, losing nothing; free space there, then resume it (smolvm sandbox resume {})", sb.id())
    );
    // With the disk still full, a resume is no resume (QEMU pauses the VM again at once), and
    // a snapshot of a guest stopped wherever it was is refused.
    let err = sb.resume().await.unwrap_err().to_string();
    assert!(err.contains("still no space: the host's disk is full"), "{err}");
    // (Room for the snapshot's own bookkeeping, so that the supervisor is asked.)
    std::fs::remove_file(&filler).unwrap();
    let free_mib = nix::sys::statvfs::statvfs(&env.dirs.data).map(|v| (v.blocks_available() * v.fragment_size()) >> 20).unwrap();
    let filled = std::process::Command::new("fallocate").arg("-l").arg(format!("{}M", free_mib - 2)).arg(&filler).status();
    assert!(filled.unwrap().success());
    let err = sb.snapshot(None, "full").await.unwrap_err().to_string();
    assert!(err.contains("not while QEMU holds the VM paused"), "{err}");
    std::fs::remove_file(&filler).unwrap();
    sb.resume().await.unwrap();
    let wrote = tokio::time::timeout(Duration::from_secs(120), writer).await.expect("the write finished").unwrap().unwrap();
    assert_eq!((wrote.exit_code, wrote.stdout.as_str()), (0, "synced\n"), "{}", wrote.stderr);
    let size = sb.run("wc -c < /root/big", &opts(30)).await.unwrap();
    assert_eq!(size.stdout.trim(), "31457280");
    // A delete on a disk full to the last block: the sandbox's files go first, and free what
    // the database needs to forget it (it failed on the record, and left them all).
    fill_up(&filler);
    let dir = sb.paths().dir.clone();
    Arc::into_inner(sb).unwrap().delete().await.unwrap();
    assert!(!dir.exists());
    let out = env.smolvm(&["sandbox", "list", "--all", "--json"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["data"], json!([]), "{}", stderr(&out));
}

/// Fill the filesystem `filler` is on to its last block with one file there or beside it (its
/// path returned). Tried again where a running sandbox took a block between the reading of the
/// free space and the filling of it.
fn fill_up(filler: &std::path::Path) -> std::path::PathBuf {
    let dir = filler.parent().unwrap();
    for i in 0..5 {
        let free_kib = nix::sys::statvfs::statvfs(dir).map(|v| (v.blocks_available() * v.fragment_size()) >> 10).unwrap();
        let file = filler.with_extension(i.to_string());
        if free_kib == 0 {
            std::fs::File::create(&file).unwrap_or_else(|_| panic!("{} cannot be made", file.display()));
            return file;
        }
        let made = std::process::Command::new("fallocate").arg("-l").arg(format!("{free_kib}K")).arg(&file).status();
        if made.unwrap().success() {
            return file;
        }
        let _ = std::fs::remove_file(&file);
    }
    panic!("{} could not be filled", dir.display());
}

/// A stop whose record cannot be written (the database's disk full) fails and says why; it
/// exited 0 and left the sandbox recorded as running. Its VM is gone either way, and once there
/// is room the sandbox reads as down.
#[test]
fn a_stop_that_cannot_be_recorded_fails() {
    let env = env();
    std::fs::create_dir_all(&env.dirs.data).unwrap();
    let mount = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=32M,mode=0700", "tmpfs"]).arg(&env.dirs.data).status();
    assert!(mount.unwrap().success());
    let _unmount = Unmount(env.dirs.data.clone());
    assert!(env.smolvm(&["sandbox", "create", "--name", "full"]).status.success());
    // A variable set and unset empties the database's write-ahead log (see `Store::scrub_if`),
    // so that the stop's record needs new blocks.
    assert!(env.smolvm(&["sandbox", "env", "set", "full", "A=1"]).status.success());
    assert!(env.smolvm(&["sandbox", "env", "unset", "full", "A"]).status.success());
    let wal = env.dirs.data.join("state.db-wal");
    assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0, "the log was not emptied");
    let filler = fill_up(&env.dirs.data.join("filler"));
    let out = env.smolvm(&["sandbox", "stop", "full"]);
    assert!(!out.status.success(), "a stop that was not recorded exited 0");
    let err = stderr(&out);
    assert!(err.contains("database or disk is full"), "{err}");
    assert!(wait_until(Duration::from_secs(10), || env.qemu_processes().is_empty()), "its VM runs on");
    std::fs::remove_file(&filler).unwrap();
    let out = env.smolvm(&["sandbox", "list", "--all", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["data"][0]["state"], "error", "{v}");
    // Started again, it stops as any other.
    assert!(env.smolvm(&["sandbox", "start", "full"]).status.success());
    let out = env.smolvm(&["sandbox", "stop", "full"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(env.qemu_processes().is_empty());
}

/// Log lines to a pipe or a file (a supervisor's log) carry no terminal colour codes.
#[test]
fn logs_off_a_terminal_are_plain_text() {
    let env = env();
    let out = env.cli().args(["run", "true"]).env("SMOLVM_LOG", "debug").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains("phase: created") && !text.contains('\x1b'), "{text:?}");
}

/// `logs` gives the guest's bytes as written, with or without `--tail` (not made UTF-8, no
/// line end dropped), and `-f` misses nothing written while the log so far was printed.
#[test]
fn logs_keep_the_guests_bytes_and_follow_misses_nothing() {
    let env = env();
    assert!(env.smolvm(&["sandbox", "create", "--name", "lg"]).status.success());
    assert!(env.smolvm(&["sandbox", "exec", "lg", "--", r"printf 'BIN\377\376END\n' > /dev/console"]).status.success());
    let whole = env.smolvm(&["sandbox", "logs", "lg"]).stdout;
    assert!(whole.windows(10).any(|w| w == b"BIN\xff\xfeEND\r\n"), "{}", String::from_utf8_lossy(&whole));
    assert_eq!(env.smolvm(&["sandbox", "logs", "lg", "--tail", "1"]).stdout, b"BIN\xff\xfeEND\r\n");
    // Lines written while a slow reader takes the log so far (more than a pipe holds), up to
    // the stop: every one arrives.
    let big = "head -c 100000 /dev/zero | tr '\\0' x | fold -w 99 > /dev/console";
    assert!(env.smolvm(&["sandbox", "exec", "lg", "--", big]).status.success());
    let info: serde_json::Value = serde_json::from_slice(&env.smolvm(&["sandbox", "info", "lg", "--json"]).stdout).unwrap();
    let console = std::path::PathBuf::from(info["data"]["console_log"].as_str().unwrap());
    let log = || String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
    assert!(wait_until(Duration::from_secs(20), || log().matches(&"x".repeat(99)).count() >= 1000));
    // (Nothing reads its output until the end: it is stuck in printing the log so far.)
    let follow = env.cli().args(["sandbox", "logs", "-f", "lg"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let blocked_writing = || {
        std::fs::read_dir(format!("/proc/{}/task", follow.id()))
            .into_iter()
            .flatten()
            .flatten()
            .any(|t| std::fs::read_to_string(t.path().join("wchan")).is_ok_and(|w| w.ends_with("pipe_write")))
    };
    assert!(wait_until(Duration::from_secs(20), blocked_writing), "logs -f never filled its pipe");
    let writer = "nohup sh -c 'i=0; while [ $i -lt 3000 ]; do echo UQ$i; i=$((i+1)); done > /dev/console' >/dev/null 2>&1 &";
    assert!(env.smolvm(&["sandbox", "exec", "lg", "--", writer]).status.success());
    assert!(wait_until(Duration::from_secs(60), || log().contains("UQ2999")), "the guest's lines never all came");
    let logged = log();
    assert!(env.smolvm(&["sandbox", "stop", "lg"]).status.success());
    let out = follow.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines =
        |t: &str| t.lines().filter(|l| l.contains("UQ")).map(|l| l.trim_end().to_string()).collect::<std::collections::BTreeSet<_>>();
    let (followed, there) = (lines(&text), lines(&logged));
    let missed: Vec<_> = there.difference(&followed).take(5).collect();
    assert!(missed.is_empty(), "logs -f missed lines the console has ({} of {}): {missed:?}", there.len() - followed.len(), there.len());
    assert!(env.smolvm(&["sandbox", "delete", "lg"]).status.success());
}

/// A root disk the guest cannot mount fails the start, with the agent's reason in the console
/// (commands must not run in the initramfs instead).
#[tokio::test]
async fn a_root_disk_that_cannot_be_mounted_fails_the_boot_with_why() {
    let env = env();
    let junk = env.tmp.path().join("junk.img");
    std::fs::write(&junk, vec![0u8; 4 << 20]).unwrap();
    // And an initramfs that is not one: the kernel finds no init and panics, which resets the
    // VM as a power-off does; the console tells them apart (it was named a power-off).
    let not_cpio = env.tmp.path().join("junk.cpio");
    std::fs::write(&not_cpio, vec![b'x'; 4096]).unwrap();
    for (config, why, console_says) in [
        (
            VmConfig { rootfs_path: Some(junk), ..Default::default() },
            "host: the guest powered off during boot",
            "smolvm-agent: init failed",
        ),
        (VmConfig { initrd_path: Some(not_cpio), ..Default::default() }, "host: the guest kernel panicked during boot", "Kernel panic"),
    ] {
        let mut sb = Sandbox::create_in(env.dirs.clone(), config, false).unwrap();
        match sb.start(Duration::from_secs(30), &|_| {}).await.unwrap_err() {
            Error::Boot { reason, console, .. } => {
                assert_eq!(reason, why);
                assert!(console.contains(console_says), "{console}");
            }
            other => panic!("expected a boot error, got {other}"),
        }
        sb.delete().await.unwrap();
        assert!(env.qemu_processes().is_empty() && env.leftover_files().is_empty());
    }
}

/// However far the boot had got (the agent's channel and QMP close with QEMU, and used to be
/// named instead), a VMM killed under a boot is the error, with the console. The boot is held
/// open (`slow_initrd`), so that each kill lands inside it however fast the host boots; the
/// last kill waits for the kernel's boot to be done.
#[tokio::test]
async fn a_vmm_killed_during_boot_is_named_as_the_cause() {
    let env = env();
    let initrd = env.slow_initrd(8);
    for delay in [Some(0), Some(100), Some(250), None] {
        let config = VmConfig { initrd_path: Some(initrd.clone()), ..Default::default() };
        let mut sb = Sandbox::create_in(env.dirs.clone(), config, false).unwrap();
        let data = env.dirs.data.to_string_lossy().into_owned();
        let console = sb.paths().console.clone();
        let killer = std::thread::spawn(move || {
            let mut vmm = Vec::new();
            assert!(wait_until(Duration::from_secs(20), || {
                vmm = processes_mentioning("qemu-system", &data);
                !vmm.is_empty()
            }));
            match delay {
                Some(ms) => std::thread::sleep(Duration::from_millis(ms)),
                None => assert!(wait_until(Duration::from_secs(20), || {
                    std::fs::read_to_string(&console).is_ok_and(|c| c.contains(INIT_WAITS))
                })),
            }
            let _ = std::process::Command::new("kill").args(["-9", &vmm[0].to_string()]).status();
        });
        let err = sb.start(Duration::from_secs(30), &|_| {}).await.unwrap_err();
        killer.join().unwrap();
        // Said as a kill from outside the boot (a host error, not the boot's or the image's):
        // a warm start's template is not blamed for it. The console stays in the sandbox's log.
        assert_eq!(err.code(), "host", "{err}");
        assert!(err.to_string().starts_with("host: the VMM was killed (SIGKILL) during boot: not by this start"), "{err}");
        if delay.is_none() {
            let log = std::fs::read_to_string(&sb.paths().console).unwrap();
            assert!(log.contains(INIT_WAITS), "{log}");
        }
        assert_eq!(sb.state().unwrap(), State::Error);
        sb.delete().await.unwrap();
    }
    assert!(env.qemu_processes().is_empty() && env.leftover_files().is_empty());
}

#[tokio::test]
async fn a_kernel_that_never_reaches_the_agent_fails_within_the_bound() {
    let env = env();
    // An initramfs whose /init prints a line and hangs, never starting an agent.
    let mut c = smolvm::cpio::Cpio::default();
    for d in ["bin", "dev", "proc"] {
        c.dir(d, 0o755);
    }
    c.char_dev("dev/console", 0o600, 5, 1);
    c.file("bin/busybox", 0o755, &std::fs::read(smolvm::busybox::prebuilt().unwrap()).unwrap());
    c.symlink("bin/sh", "busybox");
    c.file("init", 0o755, b"#!/bin/sh\necho broken-init-was-here\nexec /bin/busybox sleep 1000\n");
    let initrd = env.tmp.path().join("broken.cpio");
    std::fs::write(&initrd, c.finish()).unwrap();
    let mut sb = Sandbox::create_in(env.dirs.clone(), VmConfig { initrd_path: Some(initrd), ..Default::default() }, false).unwrap();
    let started = Instant::now();
    let err = sb.start(Duration::from_secs(5), &|_| {}).await.unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "{took:?}");
    match &err {
        Error::Boot { reason, console, .. } => {
            assert!(reason.contains("timed out after 5s"), "{reason}");
            assert!(console.contains("broken-init-was-here"), "{console}");
        }
        other => panic!("expected a boot error, got {other}"),
    }
    assert!(env.qemu_processes().is_empty(), "the VMM must be killed");
    assert_eq!(sb.state().unwrap(), State::Error);
    assert!(console_tail(&sb.paths().console, 5).contains("broken-init-was-here"));
    sb.delete().await.unwrap();
    assert!(env.leftover_files().is_empty());
}

/// A 32 MB ext4 root filesystem holding busybox and /etc/marker.
fn small_root_disk(env: &TestEnv) -> std::path::PathBuf {
    let root = env.tmp.path().join("rootfs");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(smolvm::busybox::prebuilt().unwrap(), root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::write(root.join("etc/marker"), "from-the-disk\n").unwrap();
    let image = env.tmp.path().join("root.ext4");
    let st = std::process::Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&root).arg(&image).arg("32M").status().unwrap();
    assert!(st.success());
    image
}

#[tokio::test]
async fn an_ext4_rootfs_becomes_the_root_filesystem() {
    let env = env();
    let image = small_root_disk(&env);
    let sb = env.boot(VmConfig { rootfs_path: Some(image.clone()), ..Default::default() }).await;
    let r = sb
        .run("/bin/busybox cat /etc/marker; /bin/busybox mount | /bin/busybox grep ' / '", &RunOptions { shell: Shell::Raw, ..opts(10) })
        .await
        .unwrap();
    assert!(r.stdout.starts_with("from-the-disk\n"), "{r:?}");
    assert!(r.stdout.contains("/dev/vda on / type ext4"), "{r:?}");
    sb.delete().await.unwrap();
    // The same disk as qcow2, grown by disk_size as a raw one is (its size was ignored).
    let qcow = env.tmp.path().join("root.qcow2");
    let converted = std::process::Command::new("qemu-img").args(["convert", "-O", "qcow2"]).arg(&image).arg(&qcow).status();
    assert!(converted.unwrap().success());
    let sb = env.boot(VmConfig { rootfs_path: Some(qcow.clone()), disk_size_mib: Some(128), ..Default::default() }).await;
    let r = sb.run("/bin/busybox df -m / | /bin/busybox tail -1", &RunOptions { shell: Shell::Raw, ..opts(10) }).await.unwrap();
    let total: u64 = r.stdout.split_whitespace().nth(1).and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("{r:?}"));
    assert!(total > 100, "{r:?}");
    sb.delete().await.unwrap();
    // A disk_size below the image's disk is refused before anything starts (it was ignored).
    let grown = std::process::Command::new("qemu-img").args(["resize", "-q"]).arg(&qcow).arg("200M").status();
    assert!(grown.unwrap().success());
    let mut sb =
        Sandbox::create_in(env.dirs.clone(), VmConfig { rootfs_path: Some(qcow), disk_size_mib: Some(128), ..Default::default() }, false)
            .unwrap();
    let err = sb.start(Duration::from_secs(30), &|_| {}).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid disk_size_mib: 128 MiB is smaller than the disk it would boot (200 MiB): a disk can be grown, never shrunk (allowed: 200 MiB or more, or none to keep its size)"
    );
    assert!(env.qemu_processes().is_empty());
    sb.delete().await.unwrap();
    assert!(env.leftover_files().is_empty());
}

#[test]
fn debian_cloud_kernel_is_the_fallback_and_its_modules_load() {
    let env = env();
    // Forced here; it is also what happens where our kernel cannot be built.
    let out = env
        .cli()
        .args(["run", "uname -r; ls /sys/class/virtio-ports; cat /proc/modules | cut -d' ' -f1 | sort | tr '\\n' ' '"])
        .env("SMOLVM_KERNEL", "debian")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.lines().next().unwrap_or("").ends_with("-cloud-amd64"), "{text}");
    assert!(text.contains("vport"), "{text}");
    for m in ["virtio_console", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_balloon"] {
        assert!(text.contains(m), "module {m} not loaded: {text}");
    }
    assert!(stderr(&out).contains("using Debian's prebuilt cloud kernel (SMOLVM_KERNEL=debian)"), "{}", stderr(&out));
    // The same kernel named as kernel_path (what `build_image` returns on such a host, and the
    // documentation's examples pass on) boots with its modules too.
    let (vmlinuz, _) = smolvm::image::debian_kernel(&env.dirs, &|_| {}).unwrap();
    let out = env.cli().args(["run", "--kernel", vmlinuz.to_str().unwrap(), "ls /sys/class/virtio-ports"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("vport"), "{}", stdout(&out));
}

#[test]
fn a_kernel_build_that_fails_falls_back_to_debians_and_is_not_retried() {
    let env = env();
    // A "source" with no kernel tree in it: our build fails at once. Its own name gives it its
    // own cache entry.
    let src = env.tmp.path().join(format!("linux-source-broken-{}.tar.xz", std::process::id()));
    let tree = env.tmp.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("README"), "not a kernel\n").unwrap();
    let tar = std::process::Command::new("tar").arg("-cJf").arg(&src).arg("-C").arg(&tree).arg(".").status().unwrap();
    assert!(tar.success());
    let mark = shared_images().join(format!("kernel-{}.failed", smolvm::image::kernel_fingerprint(&src).unwrap()));
    let run = || env.cli().env("SMOLVM_KERNEL_SOURCE", &src).args(["run", "uname -r"]).output().unwrap();
    let first = run();
    let recorded = mark.exists();
    let _ = std::fs::remove_file(&mark);
    assert!(recorded, "the failed build was not recorded");
    // Recorded: the next start goes straight to Debian's kernel, and says how to try again.
    std::fs::write(&mark, "unpacking failed\n").unwrap();
    let second = run();
    let _ = std::fs::remove_file(&mark);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stdout(&first).trim_end().ends_with("-cloud-amd64"), "{}", stdout(&first));
    assert!(stderr(&first).contains("using Debian's prebuilt cloud kernel (building ours failed: "), "{}", stderr(&first));
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(stdout(&second).trim_end().ends_with("-cloud-amd64"));
    let said = stderr(&second);
    assert!(said.contains("building ours from this source failed: unpacking failed; remove ") && said.contains("to try again"), "{said}");
}

#[test]
fn q35_serves_where_microvm_cannot() {
    let env = env();
    let q35 = |args: &[&str]| env.cli().env("SMOLVM_MACHINE", "q35").args(args).output().unwrap();
    // The devices are on PCI, bound to virtio-pci: the agent's port, the NIC. The guest has
    // every CPU it was given (it had one).
    let out = q35(&[
        "run",
        "--cpus",
        "3",
        "--shell",
        "raw",
        "echo out; echo err >&2; ls /sys/bus/pci/drivers/virtio-pci | grep -c '^0000:'; nproc; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stderr(&out), "err\n");
    let lines: Vec<String> = stdout(&out).lines().map(String::from).collect();
    assert_eq!(lines[0], "out");
    assert!(lines[1].parse::<u32>().unwrap() >= 2, "{lines:?}");
    assert_eq!(lines[2], "3");
    // Debian's kernel too: its virtio-pci driver is a module the initramfs carries.
    let out =
        env.cli().env("SMOLVM_MACHINE", "q35").env("SMOLVM_KERNEL", "debian").args(["run", "ls /sys/class/virtio-ports"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "vport0p1\n");
    // A sandbox on q35 runs commands; a snapshot, which restores on microvm, is refused.
    assert!(q35(&["sandbox", "create", "--name", "pc"]).status.success());
    assert_eq!(stdout(&env.smolvm(&["sandbox", "exec", "pc", "--", "echo hi"])), "hi\n");
    let out = env.smolvm(&["sandbox", "snapshot", "create", "pc"]);
    // (The supervisor's refusal, not the guest's: it was reported as `guest agent: snapshot: …`.)
    assert!(stderr(&out).starts_with("error: host: a sandbox on the q35 machine cannot be snapshotted"), "{}", stderr(&out));
    // `poweroff -f` there is a halt too (our kernel has no ACPI): the sandbox is found stopped
    // (it stayed running, and every command waited out its bound).
    let out = env.smolvm(&["sandbox", "exec", "pc", "--timeout", "120", "--", "poweroff -f"]);
    assert_eq!(stderr(&out), "error: guest agent: the sandbox stopped while the command ran\n");
    let info = env.smolvm(&["sandbox", "info", "pc", "--json"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&info.stdout).unwrap()["data"]["state"], "stopped");
    assert!(env.smolvm(&["sandbox", "delete", "--force", "pc"]).status.success());
    let out = env.cli().env("SMOLVM_MACHINE", "pc").args(["run", "true"]).output().unwrap();
    assert_eq!(
        stderr(&out).lines().next().unwrap_or(""),
        "error: invalid SMOLVM_MACHINE: \"pc\" is not a machine (allowed: microvm, q35, auto)"
    );
    assert!(env.qemu_processes().is_empty() && env.leftover_files().is_empty());
}

#[test]
fn concurrent_cli_processes_share_the_state_safely() {
    let env = env();
    let env = &env;
    // Sixteen processes at once, two of them asking for the same name: exactly one of those wins.
    let names: Vec<String> = (0..15).map(|i| format!("c{i}")).chain(["c0".to_string()]).collect();
    let outs: Vec<std::process::Output> = std::thread::scope(|s| {
        let runs: Vec<_> =
            names.iter().map(|n| s.spawn(move || env.smolvm(&["sandbox", "create", "--no-start", "--json", "--name", n]))).collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let json: Vec<serde_json::Value> = outs.iter().map(|o| serde_json::from_slice(&o.stdout).expect("json")).collect();
    let taken = json.iter().filter(|v| v["error"]["code"] == "already_exists").count();
    assert_eq!(taken, 1, "{json:?}");
    assert!(json.iter().filter(|v| v["ok"] == true).all(|v| v["data"]["state"] == "created"));
    let list: serde_json::Value = serde_json::from_slice(&env.smolvm(&["sandbox", "list", "--json"]).stdout).unwrap();
    let mut listed: Vec<String> = list["data"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    listed.sort();
    let mut want: Vec<String> = (0..15).map(|i| format!("c{i}")).collect();
    want.sort();
    assert_eq!(listed, want);
    // Three deletes of one sandbox at once: one deleted it, the others did not find it.
    let outs: Vec<std::process::Output> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..3).map(|_| s.spawn(move || env.smolvm(&["sandbox", "delete", "--force", "c0"]))).collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(outs.iter().filter(|o| o.status.success() && stdout(o).trim() == "c0").count(), 1, "{outs:?}");
    assert!(outs.iter().filter(|o| !o.status.success()).all(|o| stderr(o).contains("VM 'c0' not found")), "{outs:?}");
    // Three `delete --all` at once: each sandbox is reported once, and none is an error.
    let outs: Vec<std::process::Output> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..3).map(|_| s.spawn(move || env.smolvm(&["sandbox", "delete", "--all"]))).collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert!(outs.iter().all(|o| o.status.success()), "{outs:?}");
    let mut deleted: Vec<String> = outs.iter().flat_map(|o| stdout(o).lines().map(str::to_string).collect::<Vec<_>>()).collect();
    deleted.sort();
    want.retain(|n| n != "c0");
    assert_eq!(deleted, want);
    assert_eq!(stdout(&env.smolvm(&["sandbox", "list"])).lines().count(), 1, "only the header is left");
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// `smolvm run` whose QEMU is killed (the OOM killer, say) says so, not that its sandbox
/// "stopped" as a guest's power-off would (its record, which said why, went with it).
#[test]
fn a_run_whose_vmm_is_killed_says_the_vm_failed() {
    let env = env();
    let mut run = env
        .cli()
        .args(["run", "echo up; sleep 30"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the command runs (it said so), its VM goes.
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(run.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line, "up\n");
    let vmm = env.qemu_processes();
    assert_eq!(vmm.len(), 1);
    assert!(std::process::Command::new("kill").args(["-9", &vmm[0].to_string()]).status().unwrap().success());
    let out = run.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = "error: guest agent: the sandbox failed while the command ran: the VM exited unexpectedly (QEMU: signal: 9 (SIGKILL))";
    assert!(stderr(&out).starts_with(said), "{}", stderr(&out));
    assert!(wait_until(Duration::from_secs(5), || env.leftover_files().is_empty()), "{:?}", env.leftover_files());
    assert!(stdout(&env.smolvm(&["sandbox", "list", "--all"])).lines().count() <= 1);
}

#[tokio::test]
async fn a_vmm_that_dies_under_a_live_supervisor_leaves_an_error_with_the_console() {
    let env = env();
    let mut sb = env.boot(VmConfig { vm_id: Some("crash".into()), ..Default::default() }).await;
    // The guest writes the console: what it wrote last is kept, escape sequences shown and not
    // sent, and a line of any length cut short (it went whole into the state and the terminal).
    let r = sb.run("printf 'set \\033]0;PWNED\\007 title\\n' > /dev/console; head -c 3000 /dev/zero | tr '\\0' A > /dev/console; echo > /dev/console", &opts(30)).await.unwrap();
    assert!(r.ok(), "{r:?}");
    let vmm = sb.info().await.unwrap()["vmm_pid"].as_i64().expect("a VMM pid");
    assert!(std::process::Command::new("kill").args(["-9", &vmm.to_string()]).status().unwrap().success());
    assert!(wait_until(Duration::from_secs(10), || sb.state().unwrap() == State::Error), "state {:?}", sb.state());
    let error = sb.info().await.unwrap()["error"].as_str().unwrap_or_default().to_string();
    // The console's last lines.
    // (And how QEMU ended: killed, which the console cannot tell.)
    let lines = error
        .strip_prefix("the VM exited unexpectedly (QEMU: signal: 9 (SIGKILL)); last console lines:\n")
        .unwrap_or_else(|| panic!("{error}"));
    assert!(lines.contains("set \\u{1b}]0;PWNED\\u{7} title") && !lines.contains('\u{1b}'), "{lines}");
    assert!(lines.lines().any(|l| l == format!("{}…", "A".repeat(512))), "{lines}");
    // Its console log is still there to read (a warm start's is short: the restored guest did
    // not boot).
    let logs = env.smolvm(&["sandbox", "logs", "crash", "--tail", "3"]);
    assert!(logs.status.success(), "{}", stderr(&logs));
    let console = std::fs::read_to_string(&sb.paths().console).unwrap();
    let tail: Vec<String> = console.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().map(|l| l.trim_end().to_string()).collect();
    let shown: Vec<String> = stdout(&logs).lines().map(|l| l.trim_end().to_string()).collect();
    assert!(!tail.is_empty() && shown == tail, "logs --tail 3 showed {shown:?}, the console ends with {tail:?}");
    // It starts again from there.
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    assert_eq!(sb.run("echo again", &opts(10)).await.unwrap().output(), "again");
    sb.delete().await.unwrap();
}

#[test]
fn a_user_kernel_and_initrd_boot_and_the_cli_timeout_holds() {
    let env = env();
    // The default image's kernel and initramfs, copied: to smolvm they are the user's files.
    let img = smolvm::image::resolve(&VmConfig::default(), &env.dirs, &|_| {}).unwrap();
    let (kernel, initrd) = (env.tmp.path().join("my-vmlinux"), env.tmp.path().join("my-initrd.cpio"));
    std::fs::copy(&img.kernel, &kernel).unwrap();
    std::fs::copy(img.initrd.as_ref().unwrap(), &initrd).unwrap();
    let out = env.smolvm(&["run", "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap(), "echo custom"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "custom\n");
    // Given relative to where the sandbox is made, and started again from elsewhere: its record
    // holds them absolute.
    let create = env
        .cli()
        .current_dir(env.tmp.path())
        .args(["sandbox", "create", "--name", "rel", "--no-start", "--kernel", "my-vmlinux", "--initrd", "./my-initrd.cpio"])
        .output()
        .unwrap();
    assert!(create.status.success(), "{}", stderr(&create));
    let info: serde_json::Value = serde_json::from_slice(&env.smolvm(&["sandbox", "info", "rel", "--json"]).stdout).unwrap();
    assert_eq!((&info["data"]["kernel_path"], &info["data"]["initrd_path"]), (&json!(kernel), &json!(initrd)), "{info}");
    let start = env.cli().current_dir("/").args(["sandbox", "start", "rel"]).output().unwrap();
    assert!(start.status.success(), "{}", stderr(&start));
    assert_eq!(stdout(&env.smolvm(&["sandbox", "exec", "rel", "--", "echo", "relative"])), "relative\n");
    // A timeout names the operation as the user typed it.
    let out = env.smolvm(&["sandbox", "exec", "rel", "--timeout", "1", "--", "sleep 30"]);
    assert_eq!(out.status.code(), Some(124));
    assert!(stderr(&out).contains("Operation 'exec' timed out after 1s"), "{}", stderr(&out));
    assert!(env.smolvm(&["sandbox", "delete", "--force", "rel"]).status.success());
    let out = env.smolvm(&["run", "--timeout", "2", "sleep 30"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Operation 'run' timed out after 2s"), "{}", stderr(&out));
    assert!(env.qemu_processes().is_empty() && env.leftover_files().is_empty());
}

/// A start that comes while another process stops the sandbox waits for that stop, then starts
/// it again: before, it connected to the supervisor on its way out and reported success, and
/// the sandbox ended stopped.
#[tokio::test]
async fn a_start_during_a_stop_waits_for_it_and_starts_again() {
    let env = env();
    // A root disk: the stop is graceful (the guest syncs), so it takes a while.
    let sb = env.boot(VmConfig { rootfs_path: Some(small_root_disk(&env)), ..Default::default() }).await;
    let id = sb.id().to_string();
    let mut starter = Sandbox::open_in(env.dirs.clone(), &id).await.unwrap();
    let mut stopper = Sandbox::open_in(env.dirs.clone(), &id).await.unwrap();
    let mut second_stopper = Sandbox::open_in(env.dirs.clone(), &id).await.unwrap();
    let ctl = sb.paths().ctl.clone();
    let stop = tokio::spawn(async move { stopper.stop(Duration::from_secs(10)).await });
    let since = Instant::now();
    while ctl.exists() {
        assert!(since.elapsed() < Duration::from_secs(10), "the stop never began");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // A handle opened meanwhile is no error; its commands say the sandbox is going down.
    let fresh = Sandbox::open_in(env.dirs.clone(), &id).await.unwrap();
    let e = fresh.run("true", &opts(5)).await.unwrap_err();
    assert!(matches!(&e, Error::NotRunning { state, .. } if state == "stopping" || state == "stopped"), "{e}");
    // A second stop meanwhile waits for the first and succeeds; it never stops the new boot.
    let (second, started) = tokio::join!(second_stopper.stop(Duration::from_secs(10)), starter.start(Duration::from_secs(60), &|_| {}));
    second.unwrap();
    started.unwrap();
    stop.await.unwrap().unwrap();
    assert_eq!(starter.state().unwrap(), State::Running);
    assert_eq!(starter.run("echo again", &opts(10)).await.unwrap().stdout, "again\n");
    starter.delete().await.unwrap();
    assert!(env.qemu_processes().is_empty());
    // A stop through a handle of a sandbox deleted since leaves nothing behind (it probes the
    // start lock, which makes the lock's directory).
    assert!(matches!(second_stopper.stop(Duration::from_secs(1)).await, Err(Error::NotFound(_))));
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// A stop issued while another process starts the sandbox stops what that start brings up (it
/// used to return at once, and the VM booted on).
#[test]
fn a_stop_during_another_processs_start_stops_what_it_starts() {
    let env = env();
    let smolvm = |args: &[&str]| env.cli().args(args).output().unwrap();
    let state = || {
        let v: serde_json::Value = serde_json::from_slice(&smolvm(&["sandbox", "info", "racer", "--json"]).stdout).unwrap_or_default();
        v["data"]["state"].as_str().unwrap_or_default().to_string()
    };
    // A boot held open: caught half way however fast this host boots.
    let initrd = env.slow_initrd(3);
    let out = smolvm(&["sandbox", "create", "--name", "racer", "--no-start", "--initrd", &initrd.to_string_lossy()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut start = env.spawn_booting(env.cli().args(["sandbox", "start", "racer"]), "the start never got its kernel booted");
    assert_ne!(state(), "running", "the boot was done before the stop could be issued");
    let out = smolvm(&["sandbox", "stop", "racer"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(start.wait().unwrap().success());
    assert_eq!(state(), "stopped");
    assert!(wait_until(Duration::from_secs(5), || env.qemu_processes().is_empty()), "the VM booted on");
    let out = smolvm(&["sandbox", "delete", "racer"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = smolvm(&["sandbox", "stop", "racer"]);
    assert_eq!((out.status.code(), stderr(&out).lines().next()), (Some(1), Some("error: VM 'racer' not found")));
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// A command sent while another process starts the sandbox waits for that start and runs: it
/// was refused with "is stopped; start it first" while the sandbox was starting.
#[test]
fn a_command_during_anothers_start_waits_for_it() {
    let env = env();
    let smolvm = |args: &[&str]| env.cli().args(args).output().unwrap();
    let initrd = env.slow_initrd(2);
    let out = smolvm(&["sandbox", "create", "--name", "later", "--no-start", "--initrd", &initrd.to_string_lossy()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut start =
        env.spawn_booting(env.cli().args(["sandbox", "start", "later"]).stdout(Stdio::null()), "the start never got its kernel booted");
    let out = smolvm(&["sandbox", "exec", "later", "--", "echo", "ran"]);
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "ran\n"), "{}", stderr(&out));
    assert!(start.wait().unwrap().success());
    let out = smolvm(&["sandbox", "delete", "--force", "later"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// The boot's cgroup2 mount waits for an RCU grace period: guests boot with expedited ones, and
/// the kernel's default comes back once the first command has been answered, unless the user's
/// boot arguments asked for them too.
#[test]
fn expedited_rcu_lasts_until_the_first_command_is_answered() {
    let env = env();
    // Cold boots: the setting comes from this boot's command line, not a snapshot's.
    let smolvm = |args: &[&str]| env.cli().env("SMOLVM_WARM", "0").args(args).output().unwrap();
    let first = smolvm(&["run", "cat /sys/kernel/rcu_expedited /proc/self/cgroup"]);
    assert_eq!(stdout(&first), "1\n0::/smolvm/0\n", "{}", stderr(&first));
    for (name, boot_args, after) in [("rcu-default", None, "0\n"), ("rcu-user", Some("rcupdate.rcu_expedited=1"), "1\n")] {
        let mut create = vec!["sandbox", "create", "--name", name];
        create.extend(boot_args.map(|a| ["--boot-args", a]).into_iter().flatten());
        let out = smolvm(&create);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(smolvm(&["sandbox", "exec", name, "--", "true"]).status.success());
        // (The agent sets it after the answer: the next command may come first.)
        let restored = wait_until(Duration::from_secs(5), || {
            stdout(&smolvm(&["sandbox", "exec", name, "--", "cat /sys/kernel/rcu_expedited"])) == after
        });
        assert!(restored, "{name}: rcu_expedited is not {after:?}");
        assert!(smolvm(&["sandbox", "delete", "--force", name]).status.success());
    }
    assert!(env.qemu_processes().is_empty());
}

/// A shell killed by a signal answers 128 + the signal, real-time signals included (the agent
/// once lost those: the exec never ended).
#[tokio::test]
async fn a_command_killed_by_a_signal_exits_with_128_plus_it() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    for (sig, code) in [(9, 137), (15, 143), (34, 162), (64, 192)] {
        let r = sb.run(&format!("kill -{sig} $$"), &opts(10)).await.unwrap();
        assert_eq!(r.exit_code, code, "signal {sig}");
    }
    sb.delete().await.unwrap();
}

/// A boot whose starter and supervisor are both killed (the agent never answers, so it is
/// caught mid-boot) leaves a NAT lease and a firewall table: `prune` removes them.
#[test]
fn prune_removes_the_network_of_a_boot_killed_half_way() {
    smolvm::net::nat_available().expect("NAT networking, which this test is about");
    let env = env();
    // An initramfs whose /init hangs, never starting an agent.
    let mut c = smolvm::cpio::Cpio::default();
    for d in ["bin", "dev"] {
        c.dir(d, 0o755);
    }
    c.char_dev("dev/console", 0o600, 5, 1);
    c.file("bin/busybox", 0o755, &std::fs::read(smolvm::busybox::prebuilt().unwrap()).unwrap());
    c.file("init", 0o755, b"#!/bin/busybox sh\nexec /bin/busybox sleep 1000\n");
    let initrd = env.tmp.path().join("hang.cpio");
    std::fs::write(&initrd, c.finish()).unwrap();
    let mut starter = env
        .cli()
        .args(["sandbox", "create", "--name", "halfway", "--network", "nat", "--boot-timeout", "60", "--initrd"])
        .arg(&initrd)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let store = smolvm::store::Store::open(&env.dirs.data).unwrap();
    let leased = || store.get("halfway").unwrap().is_some_and(|r| r.lease.is_some() && r.supervisor.is_some());
    assert!(wait_until(Duration::from_secs(20), leased), "the boot never took a lease");
    let table = smolvm::net::table_name(&env.dirs.data, "halfway");
    let _drop_table = DropTable(table.clone());
    let has_table = || nft_has_table(&table);
    assert!(wait_until(Duration::from_secs(20), has_table), "no firewall table {table}");
    // Both die (QEMU goes with its supervisor).
    let supervisor = store.get("halfway").unwrap().unwrap().supervisor.unwrap();
    starter.kill().unwrap();
    let _ = starter.wait();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(supervisor.pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(wait_until(Duration::from_secs(5), || !supervisor.alive() && env.qemu_processes().is_empty()));
    // A killed process's other threads may still be on their way out (holding its copy of the
    // start lock) when its main thread already reads as a zombie; prune rightly passes over a
    // sandbox whose lock is held. Seen once under the full suite.
    assert!(wait_until(Duration::from_secs(10), || env.start_lock_free("halfway")), "the dead boot's start lock stayed held");
    assert!(has_table() && leased());
    let out = env.cli().args(["sandbox", "prune"]).env("SMOLVM_LOG", "debug").output().unwrap();
    assert!(!has_table(), "prune left the firewall table {table}:\n{}", stderr(&out));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(store.get("halfway").unwrap().is_some_and(|r| r.lease.is_none()), "prune left the lease");
    // Nor its dead supervisor's pid and sockets.
    assert!(store.get("halfway").unwrap().is_some_and(|r| r.supervisor.is_none() && r.state == State::Created));
    let dir = smolvm::sandbox::SandboxPaths::new(&env.dirs, "halfway").dir;
    let socks: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".sock")).collect();
    assert!(socks.is_empty(), "{socks:?}");
    assert!(env.smolvm(&["sandbox", "delete", "halfway"]).status.success());
}

#[tokio::test]
async fn waiting_for_ports_sees_a_server_that_starts_in_the_background() {
    let env = env();
    let sb = env.boot(VmConfig { network: Some("none".into()), ..Default::default() }).await;
    // Nothing listens on 8080 yet.
    let err = sb.wait_for_ports(&[8080], Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(err.to_string(), "Operation 'wait_for_ports' timed out after 1s");
    // Servers that listen a while after the command that started them has returned.
    let r = sb
        .run("(sleep 3; httpd -p 8080 -h /tmp) >/dev/null 2>&1 & (sleep 4; httpd -p 8081 -h /tmp) >/dev/null 2>&1 &", &opts(10))
        .await
        .unwrap();
    assert!(r.ok(), "{}", r.stderr);
    // (Seconds of room: a guest's clock runs on while a busy host gives its vCPU no time.)
    assert!(!sb.listening_ports().await.unwrap().contains(&8080));
    sb.wait_for_ports(&[8080, 8081], Duration::from_secs(30)).await.unwrap();
    let listening = sb.listening_ports().await.unwrap();
    assert!(listening.contains(&8080) && listening.contains(&8081), "{listening:?}");
    let err = sb.wait_for_ports(&[], Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(err.to_string(), "invalid ports: give at least one port, each 1..=65535");
    // The CLI's form.
    let out = env.smolvm(&["sandbox", "port", "wait", sb.id(), "8080", "8081", "--timeout", "5"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A timeout exits 124, as a command's does.
    let out = env.smolvm(&["sandbox", "port", "wait", sb.id(), "9", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(124));
    assert!(stderr(&out).contains("Operation 'wait_for_ports' timed out after 1s"), "{}", stderr(&out));
    // Exposing answers in JSON as listing does (here its refusal: this sandbox has no network).
    let out = env.smolvm(&["sandbox", "port", "expose", sb.id(), "8080", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(
        (v["ok"].as_bool(), v["command"].as_str(), v["error"]["code"].as_str()),
        (Some(false), Some("sandbox port expose"), Some("validation")),
        "{v}"
    );
    assert_eq!(v["error"]["message"], "invalid port: this sandbox has no network (network 'none')");
    sb.delete().await.unwrap();
}

/// Arguments that do not parse, with `--json`: the envelope still, exit code 2.
#[test]
fn unparsable_arguments_answer_in_json_when_asked() {
    let env = env();
    let out = env.smolvm(&["sandbox", "create", "--json", "--memory", "abc"]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["exit_code"], 2);
    assert_eq!(v["error"]["code"], "validation");
    assert_eq!(v["error"]["message"], "invalid value 'abc' for '--memory <MEMORY>': must be a whole number");
    // Seconds that are not a number are the parser's (exit 2); negative ones are ours (exit 1).
    let out = env.smolvm(&["run", "--timeout", "abc", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("error: invalid value 'abc' for '--timeout <TIMEOUT>': must be a number of seconds"));
    let out = env.smolvm(&["sandbox", "create", "--boot-timeout", "-1"]);
    assert_eq!((out.status.code(), stderr(&out)), (Some(1), "error: invalid boot_timeout: must be a positive number of seconds\n".into()));
    // A missing argument is named (clap puts it on a line of its own).
    let out = env.smolvm(&["sandbox", "info", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["message"], "the following required arguments were not provided: <NAME>");
    // Without it, clap's own words on stderr.
    let out = env.smolvm(&["sandbox", "create", "--memory", "abc"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).is_empty() && stderr(&out).starts_with("error: invalid value 'abc'"), "{}", stderr(&out));
    // A `--json` that belongs to the guest's command, or to a command without the option, asks
    // for no envelope (it answered one to `run --bogus echo --json`).
    for args in [&["run", "--bogus", "echo", "--json"][..], &["sandbox", "exec", "x", "--bogus", "--", "echo", "--json"]] {
        let out = env.smolvm(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stdout(&out).is_empty() && stderr(&out).starts_with("error: unexpected argument '--bogus'"), "{args:?}: {}", stderr(&out));
    }
    // `--all` beside names is refused: a stray one must not delete every sandbox.
    let out = env.smolvm(&["sandbox", "delete", "--all", "some-name"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("error: the argument '--all' cannot be used with '[NAMES]...'"), "{}", stderr(&out));
    // Completion offers what `--help` shows, not the hidden internal commands.
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout(&env.smolvm(&["completion", shell]));
        assert!(script.contains("sandbox") && !script.contains("__supervise") && !script.contains("__host-side"), "{shell}");
    }
    assert!(env.leftover_files().is_empty());
}

/// Ctrl-C during `sandbox create` (or `start`) used to kill the CLI and leave the VM it was
/// starting running on its own. Now the start is undone: a created sandbox is removed, an
/// existing one is stopped again, and the CLI exits 130 with its error (as an envelope with
/// `--json`).
#[test]
fn an_interrupted_create_or_start_leaves_nothing_running() {
    let env = env();
    // Boots held open, so that an interrupt lands in one however fast this host boots.
    let initrd = env.slow_initrd(8);
    let initrd = initrd.to_str().unwrap();
    // Interrupts `args` once its VM's kernel has booted (the boot is under way), and `again`,
    // again every 5 ms until it ends (the first is being handled by then): its output and
    // status.
    let interrupt_n = |args: &[&str], again: bool| {
        let mut child =
            env.spawn_booting(env.cli().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()), &format!("{args:?}: no boot under way"));
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        // (Unreaped, an ended child keeps its pid: no other process gets these signals.)
        while again && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        }
        child.wait_with_output().unwrap()
    };
    let interrupt = |args: &[&str]| interrupt_n(args, false);
    let out = interrupt(&["sandbox", "create", "--name", "intr", "--json", "--initrd", initrd]);
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&v["ok"], &v["exit_code"], &v["error"]["code"]), (&json!(false), &json!(130), &json!("interrupted")), "{v}");
    assert!(env.qemu_processes().is_empty(), "the interrupted create's VM runs on");
    let list = env.smolvm(&["sandbox", "list", "--all", "--json"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&list.stdout).unwrap()["data"], json!([]));
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());

    assert!(env.smolvm(&["sandbox", "create", "--name", "intr", "--no-start", "--initrd", initrd]).status.success());
    let out = interrupt(&["sandbox", "start", "intr"]);
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("interrupted: the sandbox 'intr' was not started"), "{}", stderr(&out));
    assert!(env.qemu_processes().is_empty(), "the interrupted start's VM runs on");
    let info = env.smolvm(&["sandbox", "info", "intr", "--json"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&info.stdout).unwrap()["data"]["state"], "stopped");
    assert!(env.smolvm(&["sandbox", "delete", "intr"]).status.success());

    // Twice: the command ends at once, and says what it leaves (it used to exit silently).
    let out = interrupt_n(&["sandbox", "create", "--name", "twice", "--json", "--initrd", initrd], true);
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let said = v["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(said.starts_with("interrupted: twice, so the sandbox 'twice' is left as it is"), "{v}");
    let out = env.smolvm(&["sandbox", "delete", "--force", "twice"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(env.qemu_processes().is_empty());

    // `run`: SIGTERM during its boot, Ctrl-C during its command. Each ends with its error and
    // 128 + the signal (143, 130: as a shell reports one the signal ended), and leaves nothing.
    let out = {
        let child = env.spawn_booting(
            env.cli().args(["run", "--initrd", initrd, "true"]).stdout(Stdio::piped()).stderr(Stdio::piped()),
            "no boot under way",
        );
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        child.wait_with_output().unwrap()
    };
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert_eq!(stderr(&out), "error: interrupted: the command was ended, and its sandbox removed\n");
    // SIGHUP (its terminal closed) as Ctrl-C, even twice (a shell passes one on, and the kernel
    // sends another as the session ends): the second does not cut the undoing short.
    let out = {
        let child = env.spawn_booting(
            env.cli().args(["sandbox", "create", "--name", "hup", "--initrd", initrd]).stdout(Stdio::piped()).stderr(Stdio::piped()),
            "no boot under way",
        );
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP);
        child.wait_with_output().unwrap()
    };
    assert_eq!(out.status.code(), Some(129), "{}", stderr(&out));
    assert!(stderr(&out).contains("interrupted: the sandbox 'hup' was not started, and is removed"), "{}", stderr(&out));
    assert!(env.qemu_processes().is_empty() && env.leftover_files().is_empty());
    // Under `nohup` (SIGHUP ignored), a hangup is no interrupt: the command runs to its end.
    // Nor is Ctrl-C where SIGINT was ignored from the start, as in a shell script's `&` job
    // (the interrupt ended it).
    use nix::sys::signal::Signal;
    for signal in [Signal::SIGHUP, Signal::SIGINT] {
        let mut cmd = env.cli();
        cmd.args(["run", "--initrd", initrd, "echo ran"]).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: only sets this child's own disposition of the signal between fork and exec,
        // as `nohup` does; signal() is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigIgn).map(|_| ()).map_err(std::io::Error::from)
            });
        }
        let child = env.spawn_booting(&mut cmd, "no boot under way");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "ran\n"), "{signal}: {}", stderr(&out));
    }
    let mut child = env.cli().args(["run", "echo started; sleep 60"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line, "started\n");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert_eq!(stderr(&out), "error: interrupted: the command was ended, and its sandbox removed\n");
    assert!(env.qemu_processes().is_empty());
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// The CLI prints a command's output as it comes and keeps no copy: its memory stays flat
/// however much a command prints. (It kept all of it, so a guest printing without end filled
/// the host's memory.)
#[test]
fn the_cli_keeps_no_copy_of_the_output_it_streams() {
    let env = env();
    let mut child = env.cli().args(["run", "head -c 64000000 /dev/zero"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let counted = std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()).unwrap());
    let mut peak_kib = 0u64;
    while child.try_wait().unwrap().is_none() {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        let hwm = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
        peak_kib = peak_kib.max(hwm.unwrap_or(0));
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(counted.join().unwrap(), 64_000_000);
    assert!(peak_kib > 0 && peak_kib < 48 * 1024, "the CLI's peak RSS was {peak_kib} KiB for 64 MB of output");
}

/// Takes PID 1's descriptor of the agent's port (`pidfd_getfd`, as root in the guest may) and
/// writes a frame header no agent would send.
const CHANNEL_BREAKER: &str = r#"
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    int pidfd = syscall(434 /* pidfd_open */, 1, 0), hit = 0;
    DIR *d = opendir("/proc/1/fd");
    struct dirent *e;
    char link[256], path[300];
    while (pidfd >= 0 && d && (e = readdir(d))) {
        snprintf(path, sizeof path, "/proc/1/fd/%s", e->d_name);
        ssize_t n = readlink(path, link, sizeof link - 1);
        if (n < 0) continue;
        link[n] = 0;
        if (!strstr(link, "vport")) continue;
        int fd = syscall(438 /* pidfd_getfd */, pidfd, atoi(e->d_name), 0);
        if (fd >= 0 && write(fd, "\xff\xff\xff\x7f", 4) == 4) hit = 1;
    }
    return hit ? 0 : 2;
}
"#;

/// A guest that breaks its agent's channel (it is root there) leaves a failed sandbox that
/// says why, with its VM stopped, and starts again. (It stayed `running`, every command
/// failing after 3 s.)
#[tokio::test]
async fn a_guest_that_breaks_the_agents_channel_fails_the_sandbox_with_why() {
    let env = env();
    let bin = env.guest_program("breaker", CHANNEL_BREAKER);
    let mut sb = env.boot(VmConfig::default()).await;
    sb.upload(&bin, "/tmp/breaker").await.unwrap();
    let err = sb.run("chmod +x /tmp/breaker && /tmp/breaker; sleep 10", &opts(30)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "guest agent: the sandbox failed while the command ran: the guest agent's channel broke while the VM ran (a process in the guest wrote to the agent's port, or the agent died); the VM was stopped: start the sandbox again"
    );
    let rec = sb.record().unwrap();
    assert_eq!(rec.state, State::Error);
    assert!(rec.error.as_deref().unwrap_or("").starts_with("the guest agent's channel broke while the VM ran"), "{rec:?}");
    assert!(env.qemu_processes().is_empty(), "the VM runs on");
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    assert_eq!(sb.run("echo again", &opts(10)).await.unwrap().stdout, "again\n");
    sb.delete().await.unwrap();
    assert!(env.qemu_processes().is_empty() && env.leftover_files().is_empty());
}

/// `list` keeps its columns in line whatever the names' lengths (up to 64 characters).
#[test]
fn list_columns_stay_in_line_with_long_names() {
    let env = env();
    let long = "l".repeat(64);
    for name in [long.as_str(), "s"] {
        let out = env.smolvm(&["sandbox", "create", "--no-start", "--name", name]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = env.smolvm(&["sandbox", "list", "--all"]);
    let text = stdout(&out);
    let starts: Vec<usize> = text.lines().map(|l| l.find(" STATE").or_else(|| l.find(" created")).expect("a state column")).collect();
    assert_eq!(starts, vec![64, 64, 64], "{text}");
    // So do snapshots' (ids run to 64 characters too).
    assert!(env.smolvm(&["sandbox", "start", "s"]).status.success());
    for id in [long.as_str(), "short"] {
        let out = env.smolvm(&["sandbox", "snapshot", "create", "s", "--snapshot-id", id]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let text = stdout(&env.smolvm(&["sandbox", "snapshot", "list"]));
    let starts: Vec<usize> = text.lines().map(|l| l.find(" TYPE").or_else(|| l.find(" full")).expect("a type column")).collect();
    assert_eq!(starts, vec![64, 64, 64], "{text}");
    for id in [long.as_str(), "short"] {
        assert!(env.smolvm(&["sandbox", "snapshot", "delete", id]).status.success());
    }
    assert!(env.smolvm(&["sandbox", "delete", "--all", "--force"]).status.success());
    assert!(env.qemu_processes().is_empty());
}

/// What the CLI prints goes out, or it says so: a reader that went away ends it as `cat` ends
/// (141; `completion` panicked), a full disk is an error (it exited 0).
#[test]
fn output_that_cannot_be_written_ends_the_cli_as_it_should() {
    let env = env();
    let mut child = env.cli().args(["completion", "bash"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(141), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    let full = std::fs::File::create("/dev/full").unwrap();
    let out = env.cli().args(["sandbox", "list"]).stdout(full).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "error: writing the output: No space left on device (os error 28)\n");
    // A reader of stderr that goes away ends a command as one of stdout does (it ran on to its
    // timeout, and the CLI then panicked telling of it on the closed stderr).
    let mut child = env.cli().args(["run", "--timeout", "600", "yes >&2"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut err = child.stderr.take().unwrap();
    std::io::Read::read_exact(&mut err, &mut [0u8; 2]).unwrap();
    drop(err);
    assert_eq!(child.wait().unwrap().code(), Some(141));
    // An error with nowhere to be told ends the CLI as the error would (1), not by a panic.
    let mut child = env.cli().args(["sandbox", "info", "nosuch"]).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stderr.take());
    assert_eq!(child.wait().unwrap().code(), Some(1));
    assert!(env.qemu_processes().is_empty());
}

/// A data directory whose path has a comma works (QEMU read the rest of the path as options of
/// its own, and every start failed), and a relative one is made absolute: its VM's processes
/// name it in full, and the absolute path finds the sandbox from anywhere.
#[test]
fn a_data_directory_with_a_comma_or_given_relative_works() {
    let env = env();
    let comma = env.tmp.path().join("a,b");
    let out = env.cli().env("SMOLVM_DATA_DIR", &comma).args(["run", "echo comma"]).output().unwrap();
    assert_eq!(stdout(&out), "comma\n", "{}", stderr(&out));
    let out = env.cli().env("SMOLVM_DATA_DIR", &comma).args(["sandbox", "create", "--name", "c1"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(processes_mentioning("qemu-system", &comma.to_string_lossy().replace(',', ",,")).len(), 1);
    let out = env.cli().env("SMOLVM_DATA_DIR", &comma).args(["sandbox", "delete", "--force", "c1"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let full = env.tmp.path().join("rel");
    let out =
        env.cli().current_dir(env.tmp.path()).env("SMOLVM_DATA_DIR", "rel").args(["sandbox", "create", "--name", "r1"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(processes_mentioning("qemu-system", &full.to_string_lossy()).len(), 1);
    let out = env.cli().env("SMOLVM_DATA_DIR", &full).args(["sandbox", "delete", "--force", "r1"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // (QEMU's options show the comma written twice.)
    for dir in [comma.to_string_lossy().replace(',', ",,"), full.to_string_lossy().into_owned()] {
        assert!(wait_until(Duration::from_secs(5), || processes_mentioning("qemu-system", &dir).is_empty()));
    }
}

/// Settings that cannot boot are refused before anything starts, naming the field: boot
/// arguments that smolvm sets itself or that would overflow the kernel's command line (cut
/// silently, it lost the guest's NIC), and a boot bound under a second.
#[test]
fn boot_settings_that_cannot_work_are_refused_up_front() {
    let env = env();
    let long = "x".repeat(400);
    for (args, says) in [
        (
            vec!["run", "--boot-args", "smolvm_net=10.9.9.2/30,10.9.9.1,10.9.9.1", "true"],
            "invalid boot_args: smolvm_net is smolvm's own setting",
        ),
        (vec!["run", "--boot-args", &long, "true"], "invalid boot_args: 400 bytes is too long (allowed: up to 384;"),
        (vec!["run", "--boot-timeout", "0.5", "true"], "invalid boot_timeout: must be at least 1 second"),
        (vec!["sandbox", "create", "--name", "b1", "--boot-timeout", "1e-9"], "invalid boot_timeout: must be at least 1 second"),
        // Asked for, it is checked without a start too.
        (
            vec!["sandbox", "create", "--name", "b2", "--no-start", "--boot-timeout", "0.5"],
            "invalid boot_timeout: must be at least 1 second",
        ),
    ] {
        let out = env.smolvm(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).starts_with(&format!("error: {says}")), "{args:?}: {}", stderr(&out));
    }
    let out = env.smolvm(&["sandbox", "list", "--all", "--json"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["data"], serde_json::json!([]));
    assert!(env.qemu_processes().is_empty() && env.leftover_files().is_empty());
    // A qcow2 root disk that names another host file is refused at create, and one whose
    // header is changed to name one after `create` is refused at its start.
    let disk = env.tmp.path().join("disk.qcow2");
    let qemu_img = |args: &[&str]| assert!(std::process::Command::new("qemu-img").args(args).status().unwrap().success());
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname", &disk.to_string_lossy()]);
    let out = env.smolvm(&["sandbox", "create", "--name", "q1", "--rootfs", &disk.to_string_lossy()]);
    assert!(
        stderr(&out)
            .starts_with(&format!("error: invalid rootfs_path: {} is a qcow2 image with a backing file (/etc/hostname)", disk.display())),
        "{}",
        stderr(&out)
    );
    qemu_img(&["rebase", "-q", "-u", "-b", "", &disk.to_string_lossy()]);
    let out = env.smolvm(&["sandbox", "create", "--name", "q1", "--no-start", "--rootfs", &disk.to_string_lossy()]);
    assert!(out.status.success(), "{}", stderr(&out));
    qemu_img(&["rebase", "-q", "-u", "-F", "raw", "-b", "/etc/hostname", &disk.to_string_lossy()]);
    let out = env.smolvm(&["sandbox", "start", "q1"]);
    assert!(stderr(&out).contains("is a qcow2 image with a backing file (/etc/hostname)"), "{}", stderr(&out));
    assert!(env.smolvm(&["sandbox", "delete", "--force", "q1"]).status.success());
    assert!(env.qemu_processes().is_empty() && env.leftover_files().is_empty());
    // A log filter that does not parse is said, not dropped without a word; the command runs.
    let out = env.cli().env("SMOLVM_LOG", "smolvm=loud").args(["sandbox", "list"]).output().unwrap();
    assert!(out.status.success());
    assert!(stderr(&out).starts_with("smolvm: SMOLVM_LOG is not a log filter ("), "{}", stderr(&out));
}

/// Under a umask of 000, what smolvm writes is still not writable by other users: its image
/// cache holds kernels and figures that later starts trust.
#[test]
fn files_smolvm_makes_are_not_writable_by_others_whatever_the_umask() {
    let env = env();
    let images = env.tmp.path().join("fresh-images");
    let out = std::process::Command::new("sh")
        .args(["-c", "umask 000; \"$0\" sandbox list >/dev/null && exec \"$0\" doctor"])
        .arg(env!("CARGO_BIN_EXE_smolvm"))
        .env("SMOLVM_DATA_DIR", &env.dirs.data)
        .env("SMOLVM_IMAGE_DIR", &images)
        .output()
        .unwrap();
    assert!(stdout(&out).contains("data_dir"), "{}", stderr(&out));
    let mut seen = 0;
    for dir in [&images, &env.dirs.data] {
        for e in walk(dir) {
            let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::symlink_metadata(&e).unwrap().permissions());
            assert_eq!(mode & 0o022, 0, "{} is {:o}", e.display(), mode & 0o777);
            seen += 1;
        }
    }
    assert!(seen >= 5, "smolvm wrote less than it should have: {seen} files");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    if !dir.exists() {
        return Vec::new();
    }
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// A caller's descriptors stay the caller's: the supervisor, which outlives the command that
/// started it, keeps none that the caller left open without close-on-exec (a shell's `9>&1`,
/// make's jobserver). It kept them, and `smolvm sandbox create … 9>&1 | cat` waited for the
/// sandbox's end.
#[test]
fn a_sandbox_keeps_no_descriptor_its_caller_left_open() {
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::process::CommandExt;
    let env = env();
    // Close-on-exec here, so that no other test's processes get it; the CLI alone gets a copy
    // at descriptor 9, without.
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let raw = write.as_raw_fd();
    let mut cmd = env.cli();
    cmd.args(["sandbox", "create", "--name", "fds", "--network", "none"]);
    // SAFETY: dup2 is async-signal-safe and touches only the child's descriptor table.
    unsafe {
        cmd.pre_exec(move || match libc::dup2(raw, 9) {
            -1 => Err(std::io::Error::last_os_error()),
            _ => Ok(()),
        });
    }
    let out = cmd.output().unwrap();
    drop(write);
    assert!(out.status.success(), "{}", stderr(&out));
    // Every writer is gone once the CLI has exited: the pipe reads as ended at once.
    let mut poll = [nix::poll::PollFd::new(read.as_fd(), nix::poll::PollFlags::POLLIN)];
    let ready = nix::poll::poll(&mut poll, nix::poll::PollTimeout::from(5000u16)).unwrap();
    let mut byte = [0u8; 1];
    let ended = ready == 1 && nix::unistd::read(read.as_raw_fd(), &mut byte).unwrap() == 0;
    let supervisor = processes_mentioning("__supervise", "fds");
    let held: Vec<String> = supervisor
        .iter()
        .flat_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).into_iter().flatten().flatten())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.display().to_string())
        .collect();
    assert!(env.smolvm(&["sandbox", "delete", "fds", "--force"]).status.success());
    assert!(ended, "the caller's pipe is still held: supervisor descriptors {held:?}");
}

/// A supervisor that dies between a command's look at the record and its connection to the
/// supervisor (the socket then refuses, or is gone) is found as such: `stop` and
/// `delete --force` clean up after it instead of failing with the socket's error. A live
/// stand-in on record as the supervisor, with a socket that refuses, holds that moment open.
#[test]
fn a_supervisor_gone_before_the_connection_is_cleaned_up_after() {
    let env = env();
    for (name, verb) in [("gone1", "stop"), ("gone2", "delete")] {
        let out = env.smolvm(&["sandbox", "create", "--name", name, "--network", "none"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let store = smolvm::store::Store::open(&env.dirs.data).unwrap();
        let real = store.get(name).unwrap().unwrap().supervisor.unwrap();
        let _ = std::process::Command::new("kill").args(["-9", &real.pid.to_string()]).status();
        assert!(wait_until(Duration::from_secs(5), || !real.alive() && env.qemu_processes().is_empty()));
        let mut stand_in = KillOnDrop(std::process::Command::new("sleep").arg("300").spawn().unwrap());
        let stand = smolvm::store::ProcId::of(stand_in.0.id() as i32).unwrap();
        store.set_supervisor(name, stand).unwrap();
        // Its socket as a dead supervisor leaves it: there, refusing. (Without it, the
        // supervisor would read as one on its way down, which commands wait for.)
        let ctl = smolvm::sandbox::SandboxPaths::new(&env.dirs, name).ctl;
        let _ = std::fs::remove_file(&ctl);
        drop(std::os::unix::net::UnixListener::bind(&ctl).unwrap());
        let out = match verb {
            "stop" => env.smolvm(&["sandbox", "stop", name]),
            _ => env.smolvm(&["sandbox", "delete", "--force", name]),
        };
        assert!(out.status.success(), "{verb}: {}", stderr(&out));
        assert!(
            wait_until(Duration::from_secs(5), || stand_in.0.try_wait().unwrap().is_some()),
            "{verb} left the supervisor on record running"
        );
        match verb {
            "stop" => {
                let rec = store.get(name).unwrap().unwrap();
                assert!(!rec.state.is_live() && rec.supervisor.is_none(), "{:?} {:?}", rec.state, rec.supervisor);
                assert!(env.smolvm(&["sandbox", "delete", name]).status.success());
            }
            _ => assert!(store.get(name).unwrap().is_none(), "delete --force left the record"),
        }
    }
    assert!(env.qemu_processes().is_empty() && env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// A start given up while it makes a warm template (Python's Ctrl-C drops the start and the
/// process goes on): the template's throwaway sandbox goes too, and its half-made template.
#[tokio::test]
async fn a_start_given_up_while_its_warm_template_is_made_leaves_nothing_running() {
    let env = env();
    // A shape of its own, so that this start makes its template (and, given up, never does).
    let config = VmConfig { memory: 136, ..Default::default() };
    let mut sb = Sandbox::create_in(env.dirs.clone(), config, false).unwrap();
    {
        let start = sb.start(Duration::from_secs(60), &|_| {});
        tokio::pin!(start);
        let template_boots = async {
            while env.qemu_processes().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::select! {
            r = &mut start => panic!("the start ended before its template's VM was seen: {r:?}"),
            () = template_boots => {}
        }
    }
    let half_made = || {
        let suffix = format!(".tmp-{}", std::process::id());
        std::fs::read_dir(&env.dirs.images).unwrap().flatten().any(|e| e.file_name().to_string_lossy().ends_with(&suffix))
    };
    let gone = wait_until(Duration::from_secs(60), || env.qemu_processes().is_empty() && !half_made());
    assert!(gone, "left running: {:?}; half-made template: {}", env.qemu_processes(), half_made());
    sb.delete().await.unwrap();
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// Terminal sizes sent while the sandbox is paused wait in the supervisor for the agent: a
/// client that floods them is cut off at a bound, as one that sends input past its window is,
/// where the queue grew for as long as it sent. The sandbox goes on.
#[test]
fn a_client_flooding_terminal_sizes_while_paused_is_cut_off() {
    use smolvm_proto::{self as proto, ExecRequest, Request, Shell, TtySize};
    use std::io::{Read, Write};
    let env = env();
    assert!(env.smolvm(&["sandbox", "create", "--name", "rz", "--network", "none"]).status.success());
    let ctl = smolvm::sandbox::SandboxPaths::new(&env.dirs, "rz").ctl;
    let mut s = std::os::unix::net::UnixStream::connect(&ctl).unwrap();
    let mut preamble = [0u8; 8];
    s.read_exact(&mut preamble).unwrap();
    let tty = Some(TtySize { rows: 24, cols: 80 });
    let exec = ExecRequest {
        command: "echo started; sleep 60".into(),
        shell: Shell::Raw,
        env: Default::default(),
        timeout_ms: 0,
        stdin: true,
        cwd: None,
        tty,
    };
    s.write_all(&proto::encode(1, &Request::Exec(exec)).unwrap()).unwrap();
    // Started (its output comes) before the pause: a pause first would refuse it.
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; proto::frame_len(len).unwrap()];
        s.read_exact(&mut body).unwrap();
        if matches!(proto::decode::<proto::Reply>(&body).unwrap().1, proto::Reply::Stdout(_)) {
            break;
        }
    }
    assert!(env.smolvm(&["sandbox", "pause", "rz"]).status.success());
    let resize = proto::encode(1, &Request::Resize(TtySize { rows: 30, cols: 100 })).unwrap();
    // (Refused part way once the supervisor has hung up.)
    let _ = s.write_all(&resize.repeat(70_000));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let cut = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    assert!(cut, "the supervisor kept a client queueing terminal sizes without end");
    assert!(env.smolvm(&["sandbox", "resume", "rz"]).status.success());
    assert_eq!(stdout(&env.smolvm(&["sandbox", "exec", "rz", "--", "echo", "on"])), "on\n");
    assert!(env.smolvm(&["sandbox", "delete", "--force", "rz"]).status.success());
    assert!(env.qemu_processes().is_empty());
}

/// A SIGTERM to a supervisor while its VM boots (how prune ends a supervisor no record names,
/// and a stop one that does not answer): the VM and its network go down at once (the starter,
/// told the boot failed, takes up what the supervisor left), and the failed create leaves no
/// sandbox.
#[test]
fn a_supervisor_told_to_stop_during_its_boot_leaves_nothing() {
    let env = env();
    let initrd = env.slow_initrd(20);
    let create =
        env.spawn_booting(env.cli().args(["sandbox", "create", "--name", "termboot", "--initrd"]).arg(&initrd), "no boot under way");
    let table = smolvm::net::table_name(&env.dirs.data, "termboot");
    let _drop_table = DropTable(table.clone());
    let tap = smolvm::net::tap_name(&env.dirs.data, "termboot");
    assert!(nft_has_table(&table) && link_exists(&tap), "a NAT sandbox has its firewall table {table} and TAP {tap}");
    let supervisor = processes_mentioning("__supervise", "termboot");
    assert_eq!(supervisor.len(), 1, "{supervisor:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(supervisor[0]), nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = create.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    // Without another command's help.
    let down = wait_until(Duration::from_secs(5), || !nft_has_table(&table) && !link_exists(&tap) && env.qemu_processes().is_empty());
    assert!(down, "table {}, TAP {}, QEMU {:?}", nft_has_table(&table), link_exists(&tap), env.qemu_processes());
    assert!(smolvm::store::Store::open(&env.dirs.data).unwrap().get("termboot").unwrap().is_none());
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}
