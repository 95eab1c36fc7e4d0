//! Host directories shared into sandboxes (9p), on real VMs.

mod common;

use common::*;
use smolvm::config::Mount;
use smolvm::sandbox::{delete_snapshot, RestoreOptions};
use smolvm::{RunOptions, Sandbox, VmConfig};
use std::time::Duration;

fn opts() -> RunOptions {
    RunOptions { timeout: Duration::from_secs(30), ..Default::default() }
}

/// `splice-poll FILE ROUNDS`: a child sendfile()s FILE into a pipe ROUNDS times (each time
/// once with data, then once more at its end, as `cat` does), while the parent polls the pipe
/// and reads it without blocking. Prints what it read and how often a pipe said readable had
/// nothing (a 9p read into a pipe pushed its pages before the host answered: Dropbear took
/// that for the end of a command's output).
const SPLICE_POLL: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/sendfile.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int rounds = atoi(argv[2]), p[2];
    if (pipe(p)) return 2;
    if (fork() == 0) {
        close(p[0]);
        for (int r = 0; r < rounds; r++) {
            int f = open(argv[1], O_RDONLY);
            if (f < 0) return 3;
            while (sendfile(p[1], f, NULL, 65536) > 0) usleep(2000);
            close(f);
        }
        return 0;
    }
    close(p[1]);
    fcntl(p[0], F_SETFL, O_NONBLOCK);
    long bytes = 0, empty = 0;
    char buf[65536];
    for (;;) {
        struct pollfd pf = {p[0], POLLIN, 0};
        int r = poll(&pf, 1, 0);
        if (r < 0) break;
        if (r == 0) { if (waitpid(-1, NULL, WNOHANG) > 0) break; continue; }
        ssize_t n = read(p[0], buf, sizeof buf);
        if (n < 0 && errno == EAGAIN) { empty++; continue; }
        if (n <= 0) break;
        bytes += n;
    }
    printf("read %ld, readable but empty %ld\n", bytes, empty);
    return 0;
}
"#;

#[tokio::test]
async fn a_read_only_mount_shows_the_hosts_files_live_and_refuses_writes() {
    let env = env();
    let share = env.tmp.path().join("project");
    std::fs::create_dir_all(share.join("src")).unwrap();
    std::fs::write(share.join("src/main.txt"), "fn main() {}\n").unwrap();
    // The host's own symbolic links, relative and absolute.
    std::os::unix::fs::symlink("src/main.txt", share.join("link.txt")).unwrap();
    std::os::unix::fs::symlink("/etc/os-release", share.join("abs")).unwrap();
    let elsewhere = env.tmp.path().join("data");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("a.csv"), "x,y\n").unwrap();
    // As many as a sandbox may have: each is a device of its own.
    // (Not `d`: that is the test's data directory, which no mount may hold.)
    let (third, fourth) = (env.tmp.path().join("c"), env.tmp.path().join("e"));
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
    // Started warm, as a sandbox without mounts is: restored from a template with four shares
    // that were never mounted in it.
    assert!(started_warm(sb.id()), "a sandbox with mounts booted cold");
    // A file transfer before any command waits for the mounts, as commands do: it reads the
    // host's file, not an empty mount point.
    let got = env.tmp.path().join("got.txt");
    sb.download("/workspace/project/src/main.txt", &got).await.unwrap();
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "fn main() {}\n");
    // `info` says what is shared, and where.
    let info = sb.info().await.unwrap();
    assert_eq!(info["mounts"][0], serde_json::json!({"host": share, "guest": "/workspace/project", "writable": false}));
    assert_eq!(info["mounts"][1]["guest"], "/mnt/my data");
    // The default guest path is /workspace/<the directory's name>; the first command sees it.
    let script =
        "cat /workspace/project/src/main.txt; cat '/mnt/my data/a.csv'; mountpoint -q /srv/c && mountpoint -q /root/d && echo four";
    let r = sb.run(script, &opts()).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "fn main() {}\nx,y\nfour\n"), "{}", r.stderr);
    // A host symlink is a link in the guest, and resolves there.
    let r = sb
        .run("cat /workspace/project/link.txt; readlink /workspace/project/abs; grep -c smolvm /workspace/project/abs", &opts())
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "fn main() {}\n/etc/os-release\n3\n"), "{}", r.stderr);
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
    // A mounted file spliced into a pipe (`cat` does, through sendfile) never leaves the pipe
    // said readable with nothing in it (our kernel's 9p fix; Debian's stock 6.1 did it in 99
    // of 100 rounds here).
    let probe = env.guest_program("splice-poll", SPLICE_POLL);
    std::fs::copy(&probe, share.join("splice-poll")).unwrap();
    let r = sb.run("cp /workspace/project/splice-poll /tmp/ && /tmp/splice-poll /workspace/project/added.txt 100", &opts()).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "read 600, readable but empty 0\n"), "{}", r.stderr);
    // Mounted shares cannot be saved whole, and the default image has no disk to save: said as
    // such either way (each used to point at the other kind).
    for kind in ["full", "disk"] {
        let err = sb.snapshot(None, kind).await.unwrap_err().to_string();
        assert!(
            err.starts_with("invalid snapshot_type: this sandbox cannot be saved: with mounts only a 'disk' snapshot"),
            "{kind}: {err}"
        );
    }
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
    // (Booted cold: mounts work the same either way.)
    let out = env
        .cli()
        .current_dir(env.tmp.path())
        .env("SMOLVM_WARM", "0")
        .args([
            "run",
            "--mount",
            "out",
            "--mount",
            "run:1",
            "cat /workspace/out/result.txt /workspace/run:1/f; grep -c ' 9p ' /proc/mounts",
        ])
        .output()
        .unwrap();
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "from-guest\ncolon\n2\n"), "{}", stderr(&out));
    assert!(env.qemu_processes().is_empty());

    // A sandbox whose host directory went since it was made: its start says so before booting
    // (QEMU failed the boot, and the sandbox was left in `error`).
    let gone = env.tmp.path().join("gone");
    std::fs::create_dir_all(&gone).unwrap();
    let out = env.smolvm(&["sandbox", "create", "--no-start", "--name", "mnt", "--mount", &gone.to_string_lossy()]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_dir(&gone).unwrap();
    let out = env.smolvm(&["sandbox", "start", "mnt"]);
    assert_eq!(
        stderr(&out),
        format!(
            "error: invalid mounts: {} is not an existing directory given by its absolute path; this sandbox was made with it (delete it, or make the directory again)\n",
            gone.display()
        )
    );
    let out = env.smolvm(&["sandbox", "info", "mnt", "--json"]);
    assert!(stdout(&out).contains("\"state\":\"created\""), "{}", stdout(&out));
    assert!(env.qemu_processes().is_empty());

    // A directory that holds smolvm's data directory (here the test's, as `$HOME` holds the
    // default one) would hand the guest the SSH key of every sandbox: refused, before any boot.
    let holder = env.tmp.path();
    let out = env.smolvm(&["sandbox", "create", "--name", "home", "--mount", &format!("{}:/mnt/h", holder.display())]);
    let key_dir = std::fs::canonicalize(&env.dirs.data).unwrap().join("ssh");
    assert_eq!(
        stderr(&out),
        format!(
            "error: invalid mounts: {} holds smolvm's SSH key ({}), which logs in to every SSH sandbox: mount a directory that does not hold it (or set SMOLVM_DATA_DIR elsewhere)\n",
            holder.display(),
            key_dir.display()
        )
    );
    assert!(env.qemu_processes().is_empty());
}

#[tokio::test]
async fn a_disk_snapshot_restores_with_other_mounts_or_none() {
    let env = env();
    let (old, new) = (env.tmp.path().join("old"), env.tmp.path().join("new"));
    std::fs::create_dir_all(&old).unwrap();
    std::fs::create_dir_all(&new).unwrap();
    std::fs::write(new.join("f"), "new\n").unwrap();
    let rootfs = smolvm::image::default_rootfs(&env.dirs).unwrap();
    let at = |host: &std::path::Path| vec![Mount { host: host.to_path_buf(), guest: Some("/mnt/w".into()) }];
    let sb = env.boot(VmConfig { rootfs_path: Some(rootfs), workspace_mounts: at(&old), ..Default::default() }).await;
    sb.run("echo kept > /root/f", &opts()).await.unwrap();
    sb.snapshot(Some("with-mount"), "disk").await.unwrap();
    sb.delete().await.unwrap();
    std::fs::remove_dir_all(&old).unwrap();
    let restore = |name: &str, mounts: Option<Vec<Mount>>, writable: Option<bool>| RestoreOptions {
        name: Some(name.into()),
        mounts,
        writable_mounts: writable,
        ..Default::default()
    };
    let dirs = env.dirs.clone();
    // The snapshot's own host directory is gone: the restore says so.
    let err = Sandbox::from_snapshot_in(dirs.clone(), "with-mount", restore("r0", None, None)).await.err().expect("refused").to_string();
    assert!(err.starts_with("invalid mounts: ") && err.contains("is not an existing directory"), "{err}");
    assert!(err.ends_with("; the snapshot's mounts can be replaced when restoring (--mount, --no-mounts; Python mounts=)"), "{err}");
    // Nor, in its place, a directory that holds smolvm's SSH key (a restore is no start, and
    // is checked on its own).
    let err = Sandbox::from_snapshot_in(dirs.clone(), "with-mount", restore("rk", Some(at(env.tmp.path())), None))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.starts_with(&format!("invalid mounts: {} holds smolvm's SSH key", env.tmp.path().display())), "{err}");
    assert!(env.qemu_processes().is_empty());
    // Another directory in its place, writable when asked.
    let r1 = Sandbox::from_snapshot_in(dirs.clone(), "with-mount", restore("r1", Some(at(&new)), Some(true))).await.unwrap();
    let r = r1.run("cat /root/f /mnt/w/f && echo guest > /mnt/w/g", &opts()).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "kept\nnew\n"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(new.join("g")).unwrap(), "guest\n");
    r1.delete().await.unwrap();
    // Or none at all.
    let r2 = Sandbox::from_snapshot_in(dirs.clone(), "with-mount", restore("r2", Some(vec![]), None)).await.unwrap();
    let r = r2.run("cat /root/f; mountpoint -q /mnt/w || echo not mounted", &opts()).await.unwrap();
    assert_eq!(r.stdout, "kept\nnot mounted\n", "{}", r.stderr);
    // A full snapshot has no mounts and takes none: its devices are saved with it.
    r2.snapshot(Some("whole"), "full").await.unwrap();
    let err =
        Sandbox::from_snapshot_in(dirs.clone(), "whole", restore("r3", Some(at(&new)), None)).await.err().expect("refused").to_string();
    assert_eq!(
        err,
        "invalid mounts: snapshot 'whole' is a full snapshot, which restores without mounts (give them to a 'disk' snapshot's restore)"
    );
    r2.delete().await.unwrap();
    for id in ["whole", "with-mount"] {
        delete_snapshot(&dirs, id).unwrap();
    }
    assert!(env.qemu_processes().is_empty());
    assert!(smolvm::sandbox::list(&dirs).unwrap().is_empty());
}
