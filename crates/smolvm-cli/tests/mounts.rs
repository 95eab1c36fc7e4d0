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
    // As many as a sandbox may have: each is a device of its own.
    let (third, fourth) = (env.tmp.path().join("c"), env.tmp.path().join("d"));
    std::fs::create_dir_all(&third).unwrap();
    std::fs::create_dir_all(&fourth).unwrap();
    let config = VmConfig {
        workspace_mounts: vec![
            Mount { host: share.clone(), guest: None },
            Mount { host: elsewhere.clone(), guest: Some("/mnt/my data".into()) },
            Mount { host: third, guest: Some("/srv/c".into()) },
            Mount { host: fourth, guest: Some("/root/d".into()) },
        ],
        ..Default::default()
    };
    let sb = env.boot(config).await;
    // The default guest path is /workspace/<the directory's name>; the first command sees it.
    let script =
        "cat /workspace/project/src/main.txt; cat '/mnt/my data/a.csv'; mountpoint -q /srv/c && mountpoint -q /root/d && echo four";
    let r = sb.run(script, &opts()).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "fn main() {}\nx,y\nfour\n"), "{}", r.stderr);
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
    let script = "echo from-guest > /mnt/out/result.txt && mkdir -p /mnt/out/d/e && cp /bin/busybox /mnt/out/sh && chmod 4755 /mnt/out/sh \
                  && mknod /mnt/out/disk b 8 0 && ls /mnt/out && stat -c '%a %F' /mnt/out/sh /mnt/out/disk";
    let out = env.smolvm(&["run", "--mount", &spec, "--writable-mounts", script]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The guest sees what it made: a setuid program, a block device.
    assert_eq!(stdout(&out), "d\ndisk\nresult.txt\nsh\n4755 regular file\n644 block special file\n");
    assert_eq!(std::fs::read_to_string(share.join("result.txt")).unwrap(), "from-guest\n");
    assert!(share.join("d/e").is_dir());
    // The host has plain files of its own user: no setuid bit, no device node.
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let sh = std::fs::metadata(share.join("sh")).unwrap();
    assert_eq!(sh.permissions().mode() & 0o7777, 0o600, "{:o}", sh.permissions().mode());
    let disk = std::fs::metadata(share.join("disk")).unwrap();
    assert!(disk.file_type().is_file() && !disk.file_type().is_block_device());
    // A relative host path is taken from the current directory; a host path may hold colons.
    std::fs::create_dir_all(env.tmp.path().join("run:1")).unwrap();
    std::fs::write(env.tmp.path().join("run:1/f"), "colon\n").unwrap();
    let out = env
        .cli()
        .current_dir(env.tmp.path())
        .args(["run", "--mount", "out", "--mount", "run:1", "cat /workspace/out/result.txt /workspace/run:1/f"])
        .output()
        .unwrap();
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "from-guest\ncolon\n"), "{}", stderr(&out));
    assert!(env.qemu_processes().is_empty());
}
