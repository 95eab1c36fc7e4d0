//! Pause, resume, snapshots and warm starts, on real VMs.

mod common;

use common::*;
use smolvm::sandbox::{delete_snapshot, snapshot_dir, RestoreOptions};
use smolvm::{Error, RunOptions, Sandbox, State, VmConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn opts() -> RunOptions {
    RunOptions { timeout: Duration::from_secs(20), ..Default::default() }
}

async fn out(sb: &Sandbox, cmd: &str) -> String {
    sb.run(cmd, &opts()).await.unwrap().stdout
}

/// `cmd` running on its own task while the test goes on with the same sandbox.
fn in_background(
    sb: &Arc<Sandbox>,
    cmd: &'static str,
    timeout: Duration,
) -> tokio::task::JoinHandle<smolvm::Result<smolvm::CommandResult>> {
    let sb = sb.clone();
    tokio::spawn(async move { sb.run(cmd, &RunOptions { timeout, ..Default::default() }).await })
}

async fn delete_shared(sb: Arc<Sandbox>) {
    Arc::try_unwrap(sb).ok().expect("one owner left").delete().await.unwrap();
}

#[tokio::test]
async fn a_paused_sandbox_keeps_its_processes_and_refuses_commands() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    sb.run("(i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done) >/dev/null 2>&1 &", &opts()).await.unwrap();
    let mut before = 0u32;
    for _ in 0..100 {
        before = out(&sb, "cat /tmp/counter 2>/dev/null").await.trim().parse().unwrap_or(0);
        if before > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let since = Instant::now();
    sb.pause().await.unwrap();
    assert_eq!(sb.state().unwrap(), State::Paused);
    let paused = format!("VM '{}' is paused; resume it first (smolvm sandbox resume {})", sb.id(), sb.id());
    let err = sb.run("true", &opts()).await.unwrap_err();
    assert_eq!(err.to_string(), paused);
    // So are environment changes and file transfers, in the same words.
    let vars: BTreeMap<String, String> = std::iter::once(("K".to_string(), "v".to_string())).collect();
    assert_eq!(sb.set_env_vars(&vars, true).await.unwrap_err().to_string(), paused);
    assert_eq!(sb.list_env_vars().await.unwrap_err().to_string(), paused);
    let local = env.tmp.path().join("paused.txt");
    std::fs::write(&local, "x").unwrap();
    assert_eq!(sb.upload(&local, "/tmp/paused.txt").await.unwrap_err().to_string(), paused);
    tokio::time::sleep(Duration::from_secs(2)).await;
    sb.resume().await.unwrap();
    assert_eq!(sb.state().unwrap(), State::Running);
    // Frozen for two seconds (about 20 ticks had it run): the counter moved by only the few
    // ticks around the two reads, and it still runs.
    let a: u32 = out(&sb, "cat /tmp/counter").await.trim().parse().unwrap();
    let unpaused = since.elapsed().saturating_sub(Duration::from_secs(2));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let b: u32 = out(&sb, "cat /tmp/counter").await.trim().parse().unwrap();
    let bound = (unpaused.as_millis() / 100) as u32 + 3;
    assert!(before >= 1 && a >= before && a - before <= bound, "counter {before} before the pause, {a} after ({unpaused:?} unpaused)");
    assert!(b > a, "the process did not keep running: {a} then {b}");
    // The guest's clock, which stood still for the pause's seconds, is the host's again.
    // (Bracketed by the host's clock read before and after, a second either side for the
    // whole seconds: a slow exec does not fail it; a clock 2 s behind, as it stood, does.)
    let host_now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (host_before, guest) = (host_now(), out(&sb, "date +%s").await.trim().parse::<i64>().unwrap());
    let host_after = host_now();
    assert!(host_before - 1 <= guest && guest <= host_after + 1, "guest clock {guest}, host {host_before}..{host_after}");
    sb.delete().await.unwrap();
}

#[tokio::test]
async fn an_upload_waits_out_a_pause_on_the_connection_that_resumes() {
    let env = env();
    let sb = Arc::new(env.boot(VmConfig::default()).await);
    let data = random_bytes(120 << 20);
    let local = env.tmp.path().join("big");
    std::fs::write(&local, &data).unwrap();
    // The guest held still (QEMU stopped) while the upload sets out and the pause is asked:
    // once QEMU goes on, the pause lands before the upload can end, however fast this host is.
    env.signal_vmm(nix::sys::signal::Signal::SIGSTOP);
    let upload = {
        let (sb, local) = (sb.clone(), local.clone());
        tokio::spawn(async move { sb.upload(&local, "/tmp/big").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pause = {
        let sb = sb.clone();
        tokio::spawn(async move { sb.pause().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.signal_vmm(nix::sys::signal::Signal::SIGCONT);
    pause.await.unwrap().unwrap();
    assert!(!upload.is_finished(), "the upload ended before the pause: nothing was tested");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The same client (one connection) resumes while its upload waits.
    tokio::time::timeout(Duration::from_secs(20), sb.resume()).await.expect("the resume was stuck behind the upload").unwrap();
    upload.await.unwrap().unwrap();
    assert_eq!(out(&sb, "wc -c < /tmp/big").await.trim(), (120u32 << 20).to_string());
    delete_shared(sb).await;
}

#[tokio::test]
async fn a_pause_does_not_count_against_a_commands_timeout() {
    let env = env();
    let sb = Arc::new(env.boot(VmConfig::default()).await);
    let task = in_background(&sb, "sleep 1; echo done", Duration::from_secs(2));
    // Paused once the command runs (else it would be refused as paused).
    while out(&sb, "pgrep -x sleep || true").await.is_empty() {
        assert!(!task.is_finished(), "the command ended before it was seen running");
    }
    sb.pause().await.unwrap();
    // Longer than the timeout and the host's own bound on it (timeout + 5 s), on the host.
    tokio::time::sleep(Duration::from_secs(8)).await;
    sb.resume().await.unwrap();
    let r = task.await.unwrap().unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "done\n"));
    // A pause that has ended before the host's bound runs out does not count either (only one
    // under way at that moment did): 1 s in, paused for 7 s, then 3 s more of a 5 s timeout,
    // ending a second after the host's bound (10 s), which it passed running.
    let task = in_background(&sb, "sleep 4; echo done again", Duration::from_secs(5));
    tokio::time::sleep(Duration::from_secs(1)).await;
    sb.pause().await.unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    sb.resume().await.unwrap();
    let r = task.await.unwrap().unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "done again\n"));
    delete_shared(sb).await;
}

#[tokio::test]
async fn clones_start_where_the_snapshot_was_and_stay_apart() {
    let env = env();
    let rootfs = smolvm::image::default_rootfs(&env.dirs).unwrap();
    let vars = |k: &str, v: &str| -> BTreeMap<String, String> { [(k.to_string(), v.to_string())].into() };
    let config = VmConfig { rootfs_path: Some(rootfs), env_vars: vars("FROM_SNAPSHOT", "yes"), ..Default::default() };
    let src = env.boot(config).await;
    src.run("echo before > /root/on-disk; echo before > /tmp/in-ram", &opts()).await.unwrap();
    let snap = src.snapshot(Some("snap1"), "full").await.unwrap();
    assert_eq!(snap.snapshot_id, "snap1");
    // The source runs on after the snapshot, and its later writes are not in the snapshot.
    src.run("echo after > /root/on-disk; echo after > /tmp/in-ram", &opts()).await.unwrap();

    let dirs = env.dirs.clone();
    let a = Sandbox::from_snapshot_in(dirs.clone(), "snap1", RestoreOptions { name: Some("clone-a".into()), ..Default::default() })
        .await
        .unwrap();
    let b = Sandbox::from_snapshot_in(
        dirs.clone(),
        "snap1",
        RestoreOptions { name: Some("clone-b".into()), env_vars: Some(vars("OWN", "b")), ..Default::default() },
    )
    .await
    .unwrap();
    for c in [&a, &b] {
        assert_eq!(out(c, "cat /root/on-disk /tmp/in-ram").await, "before\nbefore\n");
    }
    assert_eq!(out(&a, "hostname").await.trim(), "clone-a");
    // Env: a clone keeps the snapshot's variables unless given its own, which replace them.
    assert_eq!(out(&a, "echo [$FROM_SNAPSHOT] [$OWN]").await, "[yes] []\n");
    assert_eq!(out(&b, "echo [$FROM_SNAPSHOT] [$OWN]").await, "[] [b]\n");
    // Writes in one clone are invisible to the other and to the snapshot.
    a.run("echo from-a > /root/on-disk; echo from-a > /tmp/in-ram", &opts()).await.unwrap();
    assert_eq!(out(&b, "cat /root/on-disk /tmp/in-ram").await, "before\nbefore\n");
    let c = Sandbox::from_snapshot_in(dirs.clone(), "snap1", RestoreOptions::default()).await.unwrap();
    assert_eq!(out(&c, "cat /root/on-disk /tmp/in-ram").await, "before\nbefore\n");
    // Clones do not share random state, and their clocks are the host's.
    let ra = out(&a, "head -c 16 /dev/urandom | od -An -tx1").await;
    let rb = out(&b, "head -c 16 /dev/urandom | od -An -tx1").await;
    assert_ne!(ra, rb);
    for s in [&a, &b] {
        let guest: i64 = out(s, "date +%s").await.trim().parse().unwrap();
        let host = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((guest - host).abs() <= 2, "guest clock {guest}, host {host}");
    }
    // A snapshot in use by clones cannot go; once they are gone it can, and leaves nothing.
    let err = delete_snapshot(&dirs, "snap1").unwrap_err().to_string();
    assert!(err.contains("snapshot 'snap1' is in use by sandbox(es)") && err.contains("clone-a"), "{err}");
    for s in [a, b, c, src] {
        s.delete().await.unwrap();
    }
    delete_snapshot(&dirs, "snap1").unwrap();
    assert!(!snapshot_dir(&dirs, "snap1").exists());
    assert!(matches!(delete_snapshot(&dirs, "snap1"), Err(Error::SnapshotNotFound(_))));
    assert!(env.qemu_processes().is_empty());
    assert!(env.leftover_files().is_empty());
}

#[tokio::test]
async fn snapshot_types_and_a_restore_that_stays_paused() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let err = sb.snapshot(None, "diff").await.unwrap_err().to_string();
    assert_eq!(err, "invalid snapshot_type: 'diff' snapshots are not supported by the QEMU backend (allowed: full, disk)");
    let err = sb.snapshot(None, "disk").await.unwrap_err().to_string();
    assert!(err.contains("a 'disk' snapshot needs a root disk"), "{err}");
    let err = sb.snapshot(Some("Bad ID"), "full").await.unwrap_err().to_string();
    assert!(err.starts_with("invalid snapshot_id:"), "{err}");
    sb.run("echo kept > /tmp/x", &opts()).await.unwrap();
    let snap = sb.snapshot(None, "full").await.unwrap();
    assert!(snap.snapshot_id.starts_with("snap-"));
    let err = sb.snapshot(Some(&snap.snapshot_id), "full").await.unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    // Under TCG the guest keeps time by the host's TSC: a snapshot taken where it ran at another
    // rate is refused, not restored with a clock running fast or slow (and leaves nothing).
    // (Only a measured rate, of an invariant TSC, is recorded.)
    if smolvm::vmm::choose_accel() == Ok(smolvm::vmm::Accel::Tcg) && smolvm::vmm::host_tsc_is_invariant() {
        let rate = snapshot_dir(&env.dirs, &snap.snapshot_id).join("tsc-khz");
        let khz: u64 = std::fs::read_to_string(&rate).unwrap().trim().parse().unwrap();
        std::fs::write(&rate, (khz * 2).to_string()).unwrap();
        let restored = Sandbox::from_snapshot_in(env.dirs.clone(), &snap.snapshot_id, RestoreOptions::default()).await;
        std::fs::write(&rate, khz.to_string()).unwrap();
        let Err(err) = restored else { panic!("restored where the TSC runs at half the rate") };
        let err = err.to_string();
        assert!(err.contains("cannot be resumed on this host: it was saved under TCG on a host whose TSC runs at"), "{err}");
        assert!(err.ends_with("its clock would run at 50 % of real time"), "{err}");
        assert_eq!(smolvm::sandbox::list(&env.dirs).unwrap().len(), 1, "the refused restore left a sandbox");
    }
    let clone = Sandbox::from_snapshot_in(env.dirs.clone(), &snap.snapshot_id, RestoreOptions { resume: false, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(clone.state().unwrap(), State::Paused);
    assert!(clone.run("true", &opts()).await.is_err());
    // A paused sandbox is saved as often as asked (QEMU refused a second save after the first).
    for again in ["paused-1", "paused-2"] {
        clone.snapshot(Some(again), "full").await.unwrap();
        assert_eq!(clone.state().unwrap(), State::Paused);
    }
    clone.resume().await.unwrap();
    assert_eq!(out(&clone, "cat /tmp/x; hostname").await, format!("kept\n{}\n", clone.id()));
    clone.delete().await.unwrap();
    sb.delete().await.unwrap();
    // The second save restores and runs as the first.
    let again = Sandbox::from_snapshot_in(env.dirs.clone(), "paused-2", RestoreOptions::default()).await.unwrap();
    assert_eq!(out(&again, "cat /tmp/x").await, "kept\n");
    again.delete().await.unwrap();
    for id in ["paused-1", "paused-2"] {
        delete_snapshot(&env.dirs, id).unwrap();
    }
    assert!(matches!(
        Sandbox::from_snapshot_in(env.dirs.clone(), "no-such-snap", RestoreOptions::default()).await,
        Err(Error::SnapshotNotFound(_))
    ));
}

#[tokio::test]
async fn a_clone_does_not_inherit_the_commands_its_snapshot_caught_running() {
    let env = env();
    let sb = Arc::new(env.boot(VmConfig::default()).await);
    let busy = in_background(&sb, "sleep 1234; echo OLD", Duration::from_secs(120));
    let mut running = false;
    for _ in 0..100 {
        if out(&sb, "ps -o args | grep -c '^sleep 1234' || true").await == "1\n" {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running, "the command never started");
    sb.snapshot(Some("caught"), "full").await.unwrap();
    let clone = Sandbox::from_snapshot_in(env.dirs.clone(), "caught", RestoreOptions::default()).await.unwrap();
    // Its host never asked for that command: it is gone, and nothing of it reaches the new
    // host's streams (whose ids start again at 1).
    assert_eq!(out(&clone, "ps -o args | grep -c '^sleep 1234' || true").await, "0\n");
    for i in 0..8 {
        assert_eq!(out(&clone, &format!("echo {i}")).await, format!("{i}\n"));
    }
    clone.delete().await.unwrap();
    busy.abort();
    let _ = busy.await;
    delete_shared(sb).await;
    delete_snapshot(&env.dirs, "caught").unwrap();
}

/// `src` copied to `dir/<its directory's name>/<its name>` (sparse): a private stand-in for a
/// cache entry that a test may remove (the shared cache's must stay).
fn private_copy(src: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    let at = dir.join(src.parent().unwrap().file_name().unwrap());
    std::fs::create_dir_all(&at).unwrap();
    let dst = at.join(src.file_name().unwrap());
    assert!(std::process::Command::new("cp").arg("--sparse=always").arg(src).arg(&dst).status().unwrap().success());
    dst
}

#[tokio::test]
async fn snapshots_outlive_the_files_they_booted_from() {
    let env = env();
    let img = smolvm::image::resolve(&VmConfig::default(), &env.dirs, &|_| {}).unwrap();
    let boot = env.tmp.path().join("boot");
    let kernel = private_copy(&img.kernel, &boot);
    let initrd = private_copy(img.initrd.as_deref().unwrap(), &boot);
    let rootfs = private_copy(&smolvm::image::default_rootfs(&env.dirs).unwrap(), &boot);
    let config = VmConfig { kernel_path: Some(kernel), initrd_path: Some(initrd), rootfs_path: Some(rootfs), ..Default::default() };
    let sb = env.boot(config).await;
    sb.run("echo one > /root/one; echo ram > /tmp/ram", &opts()).await.unwrap();
    sb.snapshot(Some("full1"), "full").await.unwrap();
    sb.snapshot(Some("disk1"), "disk").await.unwrap();
    sb.delete().await.unwrap();
    // What `image prune` or `image rm` does to a cache entry.
    std::fs::remove_dir_all(&boot).unwrap();

    let restore = |name: &str| RestoreOptions { name: Some(name.into()), ..Default::default() };
    let full = Sandbox::from_snapshot_in(env.dirs.clone(), "full1", restore("from-full")).await.unwrap();
    assert_eq!(out(&full, "cat /root/one /tmp/ram").await, "one\nram\n");
    full.delete().await.unwrap();
    let disk = Sandbox::from_snapshot_in(env.dirs.clone(), "disk1", restore("from-disk")).await.unwrap();
    assert_eq!(out(&disk, "cat /root/one; ls /tmp").await, "one\n");
    // A snapshot of a sandbox started from a snapshot does not lean on the first one.
    disk.run("echo two > /root/two", &opts()).await.unwrap();
    disk.snapshot(Some("disk2"), "disk").await.unwrap();
    disk.delete().await.unwrap();
    delete_snapshot(&env.dirs, "disk1").unwrap();
    let again = Sandbox::from_snapshot_in(env.dirs.clone(), "disk2", restore("from-disk2")).await.unwrap();
    assert_eq!(out(&again, "cat /root/one /root/two").await, "one\ntwo\n");
    again.delete().await.unwrap();
    for id in ["full1", "disk2"] {
        delete_snapshot(&env.dirs, id).unwrap();
    }
    assert!(env.qemu_processes().is_empty());
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

#[tokio::test]
async fn a_sandbox_keeps_its_disk_when_the_image_goes() {
    let env = env();
    let boot = env.tmp.path().join("cache");
    let rootfs = private_copy(&smolvm::image::default_rootfs(&env.dirs).unwrap(), &boot);
    let mut sb = env.boot(VmConfig { vm_id: Some("keeps".into()), rootfs_path: Some(rootfs.clone()), ..Default::default() }).await;
    sb.run("echo mine > /root/mine", &opts()).await.unwrap();
    sb.stop(Duration::from_secs(10)).await.unwrap();
    // `image rm` and a rebuild at the same path with other bytes: the sandbox's disk stands on
    // the image it was made from, not on whatever now has that name.
    std::fs::remove_file(&rootfs).unwrap();
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    assert_eq!(out(&sb, "cat /root/mine").await, "mine\n");
    sb.delete().await.unwrap();
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// A clone of a named image's sandbox stops and starts again on its own disk (its second
/// start refused the disk: its link to the snapshot's disk, a layer, was not taken for ours).
#[tokio::test]
async fn a_clone_of_a_named_image_starts_again_after_a_stop() {
    let env = env();
    let sb = env.boot(VmConfig { image: Some("alpine-ssh".into()), ..Default::default() }).await;
    sb.run("echo kept > /root/f", &opts()).await.unwrap();
    sb.snapshot(Some("named"), "disk").await.unwrap();
    sb.delete().await.unwrap();
    let mut clone = Sandbox::from_snapshot_in(env.dirs.clone(), "named", RestoreOptions::default()).await.unwrap();
    clone.run("echo more >> /root/f", &opts()).await.unwrap();
    clone.stop(Duration::from_secs(10)).await.unwrap();
    clone.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    assert_eq!(out(&clone, "cat /root/f").await, "kept\nmore\n");
    clone.delete().await.unwrap();
    delete_snapshot(&env.dirs, "named").unwrap();
    assert!(env.qemu_processes().is_empty());
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// Ctrl-C at any point of a `snapshot create` of a sandbox with a root disk leaves no files.
/// (The CLI used to exit while its thread was still putting the snapshot's files in place or
/// removing them, and the half-made snapshot stayed, hundreds of MB: a narrow window, which
/// `snapshot_files`' own test holds open.)
#[test]
fn a_snapshot_given_up_at_any_point_leaves_no_files() {
    let env = env();
    let ok = |args: &[&str]| {
        let out = env.smolvm(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    };
    // A clone's disk is a layer over its snapshot's, itself over the image's: a snapshot of
    // the clone has its copy flattened onto the base, 40 MB here, which takes a while after the
    // save (the window this is about).
    ok(&["sandbox", "create", "--name", "src", "--memory", "256", "--image", "alpine-ssh"]);
    ok(&["sandbox", "exec", "src", "--", "dd if=/dev/urandom of=/root/big bs=1M count=40 2>/dev/null && sync"]);
    ok(&["sandbox", "snapshot", "create", "src", "--snapshot-type", "disk", "--snapshot-id", "layer"]);
    ok(&["sandbox", "delete", "--force", "src"]);
    ok(&["sandbox", "snapshot", "restore", "layer", "--name", "disk"]);
    let snapshots = env.dirs.data.join("snapshots");
    // Interrupts spread over the length of a whole create (the second: the first reads the
    // disk's layers from the host's disk).
    let mut whole = Duration::ZERO;
    for _ in 0..2 {
        let started = Instant::now();
        ok(&["sandbox", "snapshot", "create", "disk", "--snapshot-type", "disk", "--snapshot-id", "whole"]);
        whole = started.elapsed();
        delete_snapshot(&env.dirs, "whole").unwrap();
    }
    let mut given_up = 0;
    for i in 0..12u32 {
        let delay_ms = (whole * (20 + i * 8) / 100).as_millis() as u64;
        let id = format!("s{i}");
        let child = env
            .cli()
            .args(["sandbox", "snapshot", "create", "disk", "--snapshot-type", "disk", "--snapshot-id", &id])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT);
        let child = child.wait_with_output().unwrap();
        match child.status.code() {
            Some(130) => {
                given_up += 1;
                let left: Vec<_> = std::fs::read_dir(snapshots.join(&id)).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
                assert!(left.is_empty() && !snapshots.join(&id).exists(), "interrupted after {delay_ms} ms, it left {left:?}");
            }
            Some(0) => delete_snapshot(&env.dirs, &id).unwrap(),
            other => panic!("{other:?}: {}", stderr(&child)),
        }
    }
    assert!(given_up > 0, "no snapshot was interrupted");
    ok(&["sandbox", "delete", "--force", "disk"]);
    delete_snapshot(&env.dirs, "layer").unwrap();
    assert!(env.qemu_processes().is_empty());
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// Ctrl-C during `snapshot restore`: the restore's sandbox goes, as an interrupted create's
/// does, and the command says so (it died of the signal, silent, and the sandbox ran on).
#[test]
fn an_interrupted_restore_leaves_no_sandbox() {
    let env = env();
    // A disk snapshot of a sandbox whose boots are held open: its restore boots the same way.
    let initrd = env.slow_initrd(3);
    let rootfs = smolvm::image::default_rootfs(&env.dirs).unwrap();
    let (initrd, rootfs) = (initrd.to_str().unwrap(), rootfs.to_str().unwrap());
    let ok = |args: &[&str]| {
        let out = env.smolvm(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    };
    ok(&["sandbox", "create", "--name", "held", "--rootfs", rootfs, "--initrd", initrd]);
    ok(&["sandbox", "snapshot", "create", "held", "--snapshot-type", "disk", "--snapshot-id", "held-disk"]);
    ok(&["sandbox", "delete", "--force", "held"]);
    let child = env.spawn_booting(
        env.cli()
            .args(["sandbox", "snapshot", "restore", "held-disk", "--name", "again", "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
        "no boot under way",
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "interrupted", "{v}");
    assert_eq!(v["error"]["message"], "interrupted: the sandbox 'again' was not started, and is removed", "{v}");
    assert!(env.qemu_processes().is_empty(), "the interrupted restore's VM runs on");
    assert!(smolvm::sandbox::list(&env.dirs).unwrap().is_empty());
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
    delete_snapshot(&env.dirs, "held-disk").unwrap();
}

#[test]
fn smolvm_run_starts_warm_and_cold_on_request() {
    let env = env();
    // Warm is the default: each run is its own machine (own hostname) restored from the
    // image's warm snapshot; SMOLVM_WARM=0 boots. Looked at while the run's command sleeps.
    let run = |warm: Option<&str>| {
        let mut cli = env.cli();
        match warm {
            Some(w) => cli.env("SMOLVM_WARM", w),
            None => cli.env_remove("SMOLVM_WARM"),
        };
        let mut child = cli
            .args(["run", "--shell", "raw", "hostname; sleep 2"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut name = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut name).unwrap();
        let restored = started_warm(name.trim());
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        (name, restored)
    };
    let (first, second) = (run(None), run(None));
    assert!(first.1 && second.1, "the default run booted cold");
    assert_ne!(first.0, second.0);
    let cold = run(Some("0"));
    assert!(!cold.1, "SMOLVM_WARM=0 restored the warm snapshot");
    // Raw shell, env, exit code: the same contract whether warm or cold.
    let out = env.smolvm(&["run", "--env", "K=v", "echo $K; exit 4"]);
    assert_eq!((stdout(&out).as_str(), out.status.code()), ("v\n", Some(4)));
    assert!(env.qemu_processes().is_empty());
    // A warm start's QEMU takes no huge pages (its guest RAM, in a file, gets none, and TCG's
    // code buffer would hold whole ones it half uses); a cold boot's keeps them for its RAM.
    assert!(env.smolvm(&["sandbox", "create", "--name", "warmth"]).status.success());
    let cold = env.cli().args(["sandbox", "create", "--name", "coldness"]).env("SMOLVM_WARM", "0").output().unwrap();
    assert!(cold.status.success(), "{}", stderr(&cold));
    let huge_pages = |name: &str| {
        let qemu = processes_mentioning("qemu-system", &format!("smolvm_hostname={name} "));
        assert_eq!(qemu.len(), 1, "{name}");
        takes_huge_pages(qemu[0])
    };
    // (A host kernel without them says nothing of them.)
    if let (Some(warm), Some(cold)) = (huge_pages("warmth"), huge_pages("coldness")) {
        assert_eq!((warm, cold), (false, true));
    }
    assert!(env.smolvm(&["sandbox", "delete", "--force", "warmth", "coldness"]).status.success());
}

/// A warm start whose supervisor, or whose QEMU, is killed under it falls back to a cold boot,
/// and the template, which did nothing wrong, stays for the next start.
#[test]
fn a_warm_start_killed_under_it_keeps_the_template() {
    let env = env();
    // A shape of its own (no other test boots 352 MiB), whose template is told by its RAM file.
    let shape = ["--memory", "352"];
    // (Its saved state's inode: a use touches the file's time, a remake makes a new file.)
    let template = || -> Vec<(std::path::PathBuf, u64)> {
        use std::os::unix::fs::MetadataExt;
        let dirs = std::fs::read_dir(&env.dirs.images).unwrap().flatten().map(|e| e.path());
        let ours = dirs.filter(|d| std::fs::metadata(d.join("ram")).is_ok_and(|m| m.len() == 352 << 20) && d.join("state").exists());
        ours.map(|d| {
            let made = std::fs::metadata(d.join("state")).unwrap().ino();
            (d, made)
        })
        .collect()
    };
    assert!(env.cli().args(["run"]).args(shape).arg("true").status().unwrap().success());
    // (Templates of earlier builds' images may be in the shared cache too, which another
    // test's new template may evict: the one this run used, the most recently used, must stay.)
    let used = || {
        let mtime = |d: &std::path::Path| std::fs::metadata(d.join("state")).and_then(|m| m.modified()).ok();
        template().into_iter().max_by_key(|(d, _)| mtime(d))
    };
    let before = used().expect("the warm run made no template");
    let victims: [(&str, &str); 2] = [("__supervise", "warmkill"), ("qemu-system", "smolvm_hostname=warmkill ")];
    for (program, mention) in victims {
        let victim = || processes_mentioning(program, mention);
        // A warm start takes a tenth of a second: on a busy host the kill can come after it
        // has finished, which tests nothing. Such a try is thrown away (the create then says
        // nothing of a cold boot) and the kill tried again.
        let mut killed_under_it = false;
        for _ in 0..8 {
            let create = env
                .cli()
                .args(["sandbox", "create", "--name", "warmkill"])
                .args(shape)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let started = std::time::Instant::now();
            while victim().is_empty() && started.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(2));
            }
            for pid in victim() {
                let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            let out = create.wait_with_output().unwrap();
            if stderr(&out).contains("booting cold") {
                assert!(out.status.success(), "{program}: the cold boot after the warm one failed: {}", stderr(&out));
                killed_under_it = true;
                break;
            }
            assert!(env.smolvm(&["sandbox", "delete", "--force", "warmkill"]).status.success());
        }
        assert!(killed_under_it, "{program}: the kill never came during the warm start");
        assert_eq!(stdout(&env.smolvm(&["sandbox", "exec", "warmkill", "--", "echo ok"])), "ok\n");
        assert!(template().contains(&before), "{program} killed: the template {before:?} was discarded or remade");
        assert!(env.smolvm(&["sandbox", "delete", "--force", "warmkill"]).status.success());
    }
}

/// A snapshot stops the guest wherever it is, here with frames streaming both ways (output and
/// a download on their way out, an upload on its way in). Each clone must talk to its new host
/// from the first byte, and the transfers on the source go on.
#[tokio::test]
async fn clones_of_snapshots_taken_mid_transfer_talk_to_their_host() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = env();
    let sb = Arc::new(env.boot(VmConfig::default()).await);
    sb.run("head -c 8388608 /dev/urandom > /tmp/big", &opts()).await.unwrap();
    let local = env.tmp.path().join("big");
    std::fs::write(&local, random_bytes(8 << 20)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let busy = |what: u8| {
        let (sb, stop, local) = (sb.clone(), stop.clone(), local.clone());
        let back = local.with_extension(format!("back{what}"));
        tokio::spawn(async move {
            let mut rounds = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let done = match what {
                    0 => sb.download("/tmp/big", &back).await,
                    1 => sb.upload(&local, "/tmp/up").await,
                    _ => sb.run("head -c 8388608 /dev/zero", &opts()).await.map(|r| assert_eq!(r.stdout.len(), 8 << 20)),
                };
                match done {
                    Ok(()) => rounds += 1,
                    // A transfer that starts while the VM is paused is refused; one under way waits.
                    Err(e) if e.to_string().contains("paused") => tokio::time::sleep(Duration::from_millis(50)).await,
                    Err(e) => return Err(e),
                }
            }
            Ok::<u32, Error>(rounds)
        })
    };
    let traffic = [busy(0), busy(1), busy(2)];
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let name = format!("midway{i}");
        sb.snapshot(Some(&name), "full").await.unwrap();
        let restore = RestoreOptions { boot_timeout: Duration::from_secs(20), ..Default::default() };
        let clone = Sandbox::from_snapshot_in(env.dirs.clone(), &name, restore).await.unwrap();
        for j in 0..3 {
            assert_eq!(out(&clone, &format!("echo {i}.{j}")).await, format!("{i}.{j}\n"), "clone of snapshot {i}");
        }
        clone.delete().await.unwrap();
        delete_snapshot(&env.dirs, &name).unwrap();
    }
    // Paused mid-transfer, on the same connection that carries the transfers: input sent
    // meanwhile waits, the snapshot of the paused VM restores cleanly, and all goes on after.
    sb.pause().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sb.snapshot(Some("midway-paused"), "full").await.unwrap();
    let restore = RestoreOptions { boot_timeout: Duration::from_secs(20), ..Default::default() };
    let clone = Sandbox::from_snapshot_in(env.dirs.clone(), "midway-paused", restore).await.unwrap();
    assert_eq!(out(&clone, "echo paused").await, "paused\n");
    clone.delete().await.unwrap();
    delete_snapshot(&env.dirs, "midway-paused").unwrap();
    sb.resume().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for t in traffic {
        assert!(t.await.unwrap().unwrap() > 0, "no transfer finished during the snapshots");
    }
    delete_shared(sb).await;
}

#[test]
fn a_pause_its_client_gave_up_on_is_not_done_later() {
    let env = env();
    // Clients give control requests 1 s here (SMOLVM_CONTROL_TIMEOUT; they wait 5 s more for
    // what is before them), and the supervisor its default, 30 s: a client gives up first. (A
    // pause it gave up on was done once the supervisor's loop got to it.) Snapshots are
    // written at 30 MiB/s (unlimited, 500 MB take about half a second).
    let cli = || {
        let mut c = env.cli();
        c.env("SMOLVM_CONTROL_TIMEOUT", "1").env("SMOLVM_SNAPSHOT_BANDWIDTH", "30");
        c
    };
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let create =
        env.cli().env("SMOLVM_SNAPSHOT_BANDWIDTH", "30").args(["sandbox", "create", "--name", "busy", "--memory", "2048"]).output();
    ok(create.unwrap());
    // RAM full of data (500 MB) makes the snapshot take seconds (about 17 at 30 MiB/s: the
    // pause and the expose below, 6 s each, both wait behind it),
    // during which the control loop serves nothing else.
    let fill = "i=0; while [ $i -lt 420 ]; do cat /bin/busybox; i=$((i+1)); done > /dev/shm/fill";
    ok(cli().args(["sandbox", "exec", "busy", "--", fill]).output().unwrap());
    let snapshot = cli().args(["sandbox", "snapshot", "create", "busy", "--snapshot-id", "slow"]).spawn().unwrap();
    // Once QEMU writes the state, the save holds the control loop for seconds.
    let writing = || {
        std::fs::read_dir(env.dirs.data.join("snapshots"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| d.path().join("state").metadata().is_ok_and(|m| m.len() > 0))
    };
    let since = std::time::Instant::now();
    while !writing() {
        assert!(since.elapsed() < Duration::from_secs(30), "the snapshot never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A command sent meanwhile waits for the save, however short its own timeout: the VM's
    // stopped time is not the command's (it timed out once the save ended).
    let command = cli()
        .args(["sandbox", "exec", "busy", "--timeout", "1", "--", "echo after the save"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = cli().args(["sandbox", "pause", "busy"]).output().unwrap();
    assert!(!out.status.success());
    // (The bound said is the one set, not the one plus the client's margin.)
    assert!(stderr(&out).contains("'pause' timed out after 1s"), "{}", stderr(&out));
    // A port's expose times out the same way: a timeout (exit 124), not the guest's error.
    let out = cli().args(["sandbox", "port", "expose", "busy", "9998", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!((out.status.code(), v["error"]["code"].as_str()), (Some(124), Some("timeout")), "{v}");
    assert!(snapshot.wait_with_output().unwrap().status.success());
    let out = command.wait_with_output().unwrap();
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "after the save\n"), "{}", stderr(&out));
    let ports: serde_json::Value =
        serde_json::from_str(&ok(cli().args(["sandbox", "port", "list", "busy", "--json"]).output().unwrap())).unwrap();
    assert_eq!(ports["data"], serde_json::json!([]), "the expose was done later: {ports}");
    // The pause was dropped, not done once the snapshot let it through.
    assert_eq!(ok(cli().args(["sandbox", "exec", "busy", "--", "echo still running"]).output().unwrap()), "still running\n");
    let info: serde_json::Value = serde_json::from_str(&ok(cli().args(["sandbox", "info", "busy", "--json"]).output().unwrap())).unwrap();
    assert_eq!(info["data"]["state"], "running", "{info}");
    // Ctrl-C during a save gives it up: it is cancelled, its files go, and the VM, stopped for
    // the save, runs on (the save went on writing, and the VM stayed stopped, until done).
    let given_up = cli()
        .args(["sandbox", "snapshot", "create", "busy", "--snapshot-id", "given-up"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let state = snapshot_dir(&env.dirs, "given-up").join("state");
    let started = wait_until(Duration::from_secs(30), || state.metadata().is_ok_and(|m| m.len() > 0));
    assert!(started, "the second snapshot never started");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(given_up.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = given_up.wait_with_output().unwrap();
    assert_eq!(
        (out.status.code(), stderr(&out).trim()),
        (Some(130), "error: interrupted: the snapshot of 'busy' was given up: nothing was saved, and the sandbox goes on as before")
    );
    assert!(wait_until(Duration::from_secs(5), || !snapshot_dir(&env.dirs, "given-up").exists()), "the given-up save left its files");
    assert_eq!(ok(cli().args(["sandbox", "exec", "busy", "--", "echo running on"]).output().unwrap()), "running on\n");
    // A stop during a save gives the save up and stops the sandbox as always (it waited
    // behind the save until its client killed the VM, and the sandbox could end in `error`).
    // A save under way, and then its end, given up for the stop.
    let saving = |id: &str| {
        let save = cli()
            .args(["sandbox", "snapshot", "create", "busy", "--snapshot-id", id])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let state = snapshot_dir(&env.dirs, id).join("state");
        if !wait_until(Duration::from_secs(30), || state.metadata().is_ok_and(|m| m.len() > 0)) {
            panic!("snapshot {id} never started: {}", stderr(&save.wait_with_output().unwrap()));
        }
        save
    };
    let given_up_for_a_stop = |save: std::process::Child, id: &str| {
        let out = save.wait_with_output().unwrap();
        assert_eq!(
            (out.status.code(), stderr(&out).trim()),
            (Some(1), "error: snapshot failed: the sandbox was stopped before the snapshot was done")
        );
        assert!(!snapshot_dir(&env.dirs, id).exists(), "the given-up save {id} left its files");
    };
    let cut = saving("cut");
    ok(cli().args(["sandbox", "stop", "busy"]).output().unwrap());
    given_up_for_a_stop(cut, "cut");
    let info: serde_json::Value = serde_json::from_str(&ok(cli().args(["sandbox", "info", "busy", "--json"]).output().unwrap())).unwrap();
    assert_eq!(info["data"]["state"], "stopped", "{info}");
    // So does a SIGTERM to its supervisor (another command ending it: a stop that got no
    // answer, prune): it waited for the save to end before it stopped the sandbox.
    ok(cli().args(["sandbox", "start", "busy"]).output().unwrap());
    ok(cli().args(["sandbox", "exec", "busy", "--", fill]).output().unwrap());
    let termed = saving("termed");
    let supervisor = processes_mentioning("__supervise", "busy");
    assert_eq!(supervisor.len(), 1, "{supervisor:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(supervisor[0]), nix::sys::signal::Signal::SIGTERM).unwrap();
    given_up_for_a_stop(termed, "termed");
    // (The save alone takes about 17 s.)
    let gone = wait_until(Duration::from_secs(8), || !std::path::Path::new(&format!("/proc/{}", supervisor[0])).exists());
    assert!(gone, "the supervisor finished the save before it stopped");
    let info: serde_json::Value = serde_json::from_str(&ok(cli().args(["sandbox", "info", "busy", "--json"]).output().unwrap())).unwrap();
    assert_eq!(info["data"]["state"], "stopped", "{info}");
    ok(cli().args(["sandbox", "delete", "--force", "busy"]).output().unwrap());
    // The saved VM loads only under the accelerator it ran under: recorded, and kept to.
    let accel = smolvm::vmm::choose_accel().unwrap();
    assert_eq!(std::fs::read_to_string(snapshot_dir(&env.dirs, "slow").join("accel")).unwrap(), accel.name());
    let other = if accel == smolvm::vmm::Accel::Tcg { "kvm" } else { "tcg" };
    let out = cli().env("SMOLVM_ACCEL", other).args(["sandbox", "snapshot", "restore", "slow", "--name", "elsewhere"]).output().unwrap();
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "error: invalid SMOLVM_ACCEL: snapshot 'slow' was saved under {0} and loads only under it (unset SMOLVM_ACCEL or set it to {0})",
            accel.name()
        )
    );
    ok(cli().args(["sandbox", "snapshot", "delete", "slow"]).output().unwrap());
    // A value that is not a number of seconds stops a start before anything runs.
    let out = env.cli().env("SMOLVM_CONTROL_TIMEOUT", "soon").args(["run", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid SMOLVM_CONTROL_TIMEOUT: \"soon\" is not a number of seconds (allowed: 1 to 3600)"),
        "{}",
        stderr(&out)
    );
    let out = env.cli().env("SMOLVM_SNAPSHOT_BANDWIDTH", "fast").args(["run", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "invalid SMOLVM_SNAPSHOT_BANDWIDTH: \"fast\" is not a whole number of MiB per second (allowed: 1 to 1048576, or unlimited)"
        ),
        "{}",
        stderr(&out)
    );
    assert!(env.qemu_processes().is_empty());
    assert!(smolvm::sandbox::list(&env.dirs).unwrap().is_empty());
}

/// A save that cannot be written (here, a full disk) is an error that says why, from QEMU;
/// the sandbox runs on, and neither the snapshot's files nor its record are left.
#[tokio::test]
async fn a_snapshot_that_cannot_be_written_says_why_and_leaves_nothing() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root to mount a small filesystem (as `make test` and CI run it)");
    }
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    // About 150 MB of data in the guest's RAM, and 32 MiB of room for snapshots.
    let fill = sb.run("for i in $(seq 130); do cat /bin/busybox; done > /dev/shm/fill", &opts()).await.unwrap();
    assert!(fill.ok(), "{}", fill.stderr);
    let snapshots = env.dirs.data.join("snapshots");
    std::fs::create_dir_all(&snapshots).unwrap();
    let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"]).arg(&snapshots).status().unwrap();
    assert!(mounted.success(), "mounting a small tmpfs for the snapshots (the test needs root)");
    let _unmount = Unmount(snapshots.clone());
    let err = sb.snapshot(Some("cramped"), "full").await.unwrap_err();
    assert_eq!(err.code(), "host");
    assert_eq!(err.to_string(), "snapshot failed: saving the VM state failed: Unable to write to file: No space left on device");
    assert_eq!(std::fs::read_dir(&snapshots).unwrap().count(), 0, "the snapshot's directory was left");
    assert!(smolvm::sandbox::list_snapshots(&env.dirs).unwrap().is_empty());
    // Running, not left stopped by the failed save.
    assert_eq!(sb.state().unwrap(), State::Running);
    assert_eq!(out(&sb, "echo still running").await, "still running\n");
    sb.delete().await.unwrap();
    assert!(env.qemu_processes().is_empty());
}

/// A restored guest whose agent does not answer the greeting when it is resumed runs no
/// commands: the resume fails within its bound, and the sandbox stays paused and refuses
/// commands. A later resume greets it again, and once the agent answers it runs. (The agent
/// is frozen by the guest's own cgroup freezer, from a command, for 14 s of the guest's time;
/// the snapshot is taken early in that.)
#[test]
fn a_restored_guest_that_does_not_answer_stays_paused_until_it_does() {
    let env = env();
    let cli = || {
        let mut c = env.cli();
        c.env("SMOLVM_CONTROL_TIMEOUT", "2");
        c
    };
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let state = |name: &str| -> String {
        let info: serde_json::Value = serde_json::from_str(&ok(cli().args(["sandbox", "info", name, "--json"]).output().unwrap())).unwrap();
        info["data"]["state"].as_str().unwrap_or_default().to_string()
    };
    ok(cli().args(["sandbox", "create", "--name", "held"]).output().unwrap());
    let freeze = "G=/sys/fs/cgroup/held; mkdir $G; echo 1 > $G/cgroup.procs; \
                  (sleep 14; echo 0 > $G/cgroup.freeze) >/dev/null 2>&1 & echo smolvm-test: freezing > /dev/console; \
                  echo 1 > $G/cgroup.freeze; echo thawed";
    // Answered only once the agent thaws.
    let frozen = cli().args(["sandbox", "exec", "held", "--", freeze]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    // The freeze follows its mark on the console at once.
    let console = smolvm::sandbox::SandboxPaths::new(&env.dirs, "held").console;
    let marked = || std::fs::read_to_string(&console).is_ok_and(|c| c.contains("smolvm-test: freezing"));
    assert!(wait_until(Duration::from_secs(30), marked), "the guest never got to its freeze");
    std::thread::sleep(Duration::from_millis(200));
    // The save waits 5 s for the agent to answer a ping, then goes ahead; the variables are
    // the record's (the guest's would be asked for 2 s more).
    let started = std::time::Instant::now();
    ok(cli().args(["sandbox", "snapshot", "create", "held", "--snapshot-id", "frozen"]).output().unwrap());
    assert!(started.elapsed() < Duration::from_secs(11), "the snapshot waited for the frozen agent: {:?}", started.elapsed());
    assert_eq!(ok(frozen.wait_with_output().unwrap()), "thawed\n");
    ok(cli().args(["sandbox", "snapshot", "restore", "frozen", "--name", "clone", "--no-resume"]).output().unwrap());
    assert_eq!(state("clone"), "paused");
    let out = cli().args(["sandbox", "resume", "clone"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Operation 'resume' timed out after 2s"), "{}", stderr(&out));
    assert_eq!(state("clone"), "paused");
    let out = cli().args(["sandbox", "exec", "clone", "--", "echo ran"]).output().unwrap();
    assert!(stderr(&out).contains("VM 'clone' is paused; resume it first"), "{}", stderr(&out));
    // Each resume lets the guest run for up to the bound; the rest of its 14 s runs out.
    let mut tries = 1;
    while !cli().args(["sandbox", "resume", "clone"]).output().unwrap().status.success() {
        tries += 1;
        assert!(tries < 14, "the guest never answered");
        assert_eq!(state("clone"), "paused");
    }
    assert_eq!(state("clone"), "running");
    // Greeted: it has its own name now.
    assert_eq!(ok(cli().args(["sandbox", "exec", "clone", "--", "hostname"]).output().unwrap()), "clone\n");
    for name in ["clone", "held"] {
        ok(cli().args(["sandbox", "delete", "--force", name]).output().unwrap());
    }
    ok(cli().args(["sandbox", "snapshot", "delete", "frozen"]).output().unwrap());
    assert!(env.qemu_processes().is_empty());
    assert!(env.leftover_files().is_empty());
}

/// A restore can take other port forwards than its snapshot's (`-p`, `--no-publish`): a fixed
/// host port that the running source holds is otherwise taken, and the restore fails. A full
/// snapshot's server, restored running, answers on the new port.
#[test]
fn a_restore_takes_new_port_forwards_beside_its_running_source() {
    let env = env();
    // Both held while the second is picked, so that they differ.
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = (free(), free());
    let (port, other) = (a.local_addr().unwrap().port(), b.local_addr().unwrap().port());
    drop((a, b));
    let ok = |args: &[&str]| {
        let out = env.smolvm(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    let ports =
        |name: &str| serde_json::from_str::<serde_json::Value>(&ok(&["sandbox", "port", "list", name, "--json"])).unwrap()["data"].clone();
    ok(&["sandbox", "create", "--name", "web", "-p", &format!("{port}:8000")]);
    ok(&["sandbox", "exec", "web", "--", "mkdir -p /srv && echo from-web > /srv/index.html && (httpd -p 8000 -h /srv &)"]);
    ok(&["sandbox", "snapshot", "create", "web", "--snapshot-id", "webs"]);
    let out = env.smolvm(&["sandbox", "snapshot", "restore", "webs", "--name", "clash"]);
    assert_eq!(
        stderr(&out).lines().last().unwrap_or_default(),
        format!("error: invalid port_forwards: cannot listen on 127.0.0.1:{port}: Address already in use (os error 98)")
    );
    ok(&["sandbox", "snapshot", "restore", "webs", "--name", "moved", "-p", &format!("{other}:8000")]);
    assert_eq!(ports("moved"), serde_json::json!([{ "guest": 8000, "host": other }]));
    let fetch = |port: u16| http_get(port, "/");
    assert!(wait_until(Duration::from_secs(20), || fetch(other).is_some_and(|b| b.ends_with("from-web\n"))), "{:?}", fetch(other));
    ok(&["sandbox", "snapshot", "restore", "webs", "--name", "bare", "--no-publish"]);
    assert_eq!(ports("bare"), serde_json::json!([]));
    let out = env.smolvm(&["sandbox", "snapshot", "restore", "webs", "--no-publish", "-p", "8000"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = env.smolvm(&["sandbox", "snapshot", "restore", "webs", "--name", "badport", "-p", "0"]);
    assert!(stderr(&out).contains("invalid publish: \"0\" is not [HOST:]GUEST"), "{}", stderr(&out));
    for name in ["web", "moved", "bare"] {
        ok(&["sandbox", "delete", "--force", name]);
    }
    ok(&["sandbox", "snapshot", "delete", "webs"]);
    assert!(env.qemu_processes().is_empty());
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}
