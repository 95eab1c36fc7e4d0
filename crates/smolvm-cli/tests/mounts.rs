//! Host directories shared into sandboxes (9p), on real VMs.

mod common;

use common::*;
use smolvm::config::Mount;
use smolvm::{RunOptions, VmConfig};
use std::time::Duration;

fn opts() -> RunOptions {
    RunOptions { timeout: Duration::from_secs(30), ..Default::default() }
}

#[tokio::test]
async fn a_read_only_mount_shows_the_hosts_files_live_and_refuses_writes() {
    let env = env();
    let share = env.tmp.path().join("project");
    std::fs::create_dir_all(share.join("src")).unwrap();
    std::fs::write(share.join("src/main.txt"), "fn main() {}\n").unwrap();
    let elsewhere = env.tmp.path().join("data");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("a.csv"), "x,y\n").unwrap();
    let config = VmConfig {
        workspace_mounts: vec![
            Mount { host: share.clone(), guest: None },
            Mount { host: elsewhere.clone(), guest: Some("/mnt/my data".into()) },
        ],
        ..Default::default()
    };
    let sb = env.boot(config).await;
    // The default guest path is /workspace/<the directory's name>; the first command sees it.
    let r = sb.run("cat /workspace/project/src/main.txt; cat '/mnt/my data/a.csv'", &opts()).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "fn main() {}\nx,y\n"), "{}", r.stderr);
    // Read-only, in the guest and (whatever the guest does) in QEMU.
    let r = sb
        .run(
            "touch /workspace/project/new 2>&1; mount -o remount,rw /workspace/project 2>/dev/null; echo x > /workspace/project/new",
            &opts(),
        )
        .await
        .unwrap();
    assert_ne!(r.exit_code, 0);
    assert!(r.stdout.contains("Read-only file system"), "{}", r.stdout);
    assert!(!share.join("new").exists(), "the guest wrote into a read-only mount");
    // The host's changes show at once (no cache in the guest).
    std::fs::write(share.join("src/main.txt"), "changed\n").unwrap();
    std::fs::write(share.join("added.txt"), "added\n").unwrap();
    let r = sb.run("cat /workspace/project/src/main.txt /workspace/project/added.txt", &opts()).await.unwrap();
    assert_eq!(r.stdout, "changed\nadded\n");
    // Mounted shares cannot be saved whole; a disk snapshot is allowed.
    let err = sb.snapshot(None, "full").await.unwrap_err();
    assert!(err.to_string().starts_with("invalid snapshot_type: a sandbox with mounts can only be saved as 'disk'"), "{err}");
    sb.delete().await.unwrap();
    assert!(env.qemu_processes().is_empty());
}

#[test]
fn a_writable_mount_takes_the_guests_writes_to_the_host() {
    let env = env();
    let share = env.tmp.path().join("out");
    std::fs::create_dir_all(&share).unwrap();
    let spec = format!("{}:/mnt/out", share.display());
    let out = env.smolvm(&[
        "run",
        "--mount",
        &spec,
        "--writable-mounts",
        "echo from-guest > /mnt/out/result.txt && mkdir -p /mnt/out/d/e && ls /mnt/out",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "d\nresult.txt\n");
    assert_eq!(std::fs::read_to_string(share.join("result.txt")).unwrap(), "from-guest\n");
    assert!(share.join("d/e").is_dir());
    // A relative host path is taken from the current directory.
    let out = env.cli().current_dir(env.tmp.path()).args(["run", "--mount", "out", "cat /workspace/out/result.txt"]).output().unwrap();
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "from-guest\n"), "{}", stderr(&out));
    assert!(env.qemu_processes().is_empty());
}
