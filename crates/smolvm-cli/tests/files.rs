//! Moving files and directories in and out, on real VMs.

mod common;

use common::*;
use nix::sys::signal::Signal;
use smolvm::{RunOptions, Sandbox, VmConfig};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

fn opts() -> RunOptions {
    RunOptions { timeout: Duration::from_secs(60), ..Default::default() }
}

#[tokio::test]
async fn twenty_megabytes_up_and_down_byte_for_byte() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let data = random_bytes(20 * 1024 * 1024);
    let local = env.tmp.path().join("big.bin");
    std::fs::write(&local, &data).unwrap();
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o640)).unwrap();
    sb.upload(&local, "/data/in/").await.unwrap();
    let r = sb.run("stat -c '%s %a' /data/in/big.bin; ls -a /data/in", &opts()).await.unwrap();
    assert_eq!(r.stdout, format!("{} 640\n.\n..\nbig.bin\n", data.len()));
    let back = env.tmp.path().join("out/back.bin");
    sb.download("/data/in/big.bin", &back).await.unwrap();
    assert!(std::fs::read(&back).unwrap() == data, "downloaded bytes differ");
    assert_eq!(std::fs::metadata(&back).unwrap().permissions().mode() & 0o7777, 0o640);
    // Into an existing directory, same name.
    sb.download("/data/in/big.bin", &env.tmp.path().join("out")).await.unwrap();
    assert!(env.tmp.path().join("out/big.bin").exists());
    assert!(std::fs::read_dir(env.tmp.path().join("out"))
        .unwrap()
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().starts_with(".smolvm")));
    sb.delete().await.unwrap();
}

#[tokio::test]
async fn paths_modes_and_directories() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let local = env.tmp.path().join("f.txt");
    std::fs::write(&local, "hi\n").unwrap();
    let err = sb.upload(&local, "tmp/relative").await.unwrap_err();
    assert_eq!(err.to_string(), "invalid guest_path: guest path must be absolute: \"tmp/relative\"");
    let err = sb.download("relative/x", &env.tmp.path().join("x")).await.unwrap_err();
    assert_eq!(err.to_string(), "invalid guest_path: guest path must be absolute: \"relative/x\"");
    for whole in ["/", "/tmp/.."] {
        let err = sb.download(whole, &env.tmp.path().join("root")).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("invalid guest_path: {whole:?} names no file or directory to download (name one, such as /root)")
        );
    }
    let err = sb.upload(&env.tmp.path().join("missing"), "/tmp/x").await.unwrap_err();
    assert!(err.to_string().starts_with("invalid local_path:"), "{err}");
    let err = sb.download("/no/such/file", &env.tmp.path().join("x")).await.unwrap_err();
    assert!(err.to_string().contains("/no/such/file"), "{err}");
    // The directories it would have gone into are not left behind.
    let err = sb.download("/no/such/file", &env.tmp.path().join("made/a/b/x")).await.unwrap_err();
    assert!(err.to_string().contains("/no/such/file"), "{err}");
    assert!(!env.tmp.path().join("made").exists(), "a failed download left the directories made for it");
    // A device has no end to read to.
    let err = sb.download("/dev/zero", &env.tmp.path().join("zero")).await.unwrap_err();
    assert_eq!(err.to_string(), "invalid guest_path: /dev/zero is not a regular file or a directory");
    assert!(!env.tmp.path().join("zero").exists());
    // Through a file, as for a missing path (it was the agent's "Not a directory").
    let err = sb.download("/etc/hostname/x", &env.tmp.path().join("x")).await.unwrap_err();
    assert!(err.to_string().starts_with("invalid guest_path: reading /etc/hostname/x: Not a directory"), "{err}");
    // On the host, a device or FIFO is not replaced by a regular file (`/dev/null` was), and a
    // link is written through, as `cp` does.
    let fifo = env.tmp.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let err = sb.download("/etc/hostname", &fifo).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("invalid local_path: {} is not a regular file or a directory (a download writes one)", fifo.display())
    );
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    let err = sb.download("/etc/hostname", std::path::Path::new("/dev/null")).await.unwrap_err();
    assert!(err.to_string().starts_with("invalid local_path: /dev/null is not a regular file"), "{err}");
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
    let (target, link) = (env.tmp.path().join("target.txt"), env.tmp.path().join("link"));
    std::fs::write(&target, "old\n").unwrap();
    std::os::unix::fs::symlink("target.txt", &link).unwrap();
    sb.download("/etc/hostname", &link).await.unwrap();
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), sb.run("cat /etc/hostname", &opts()).await.unwrap().stdout);
    // A tree holding what cannot travel is refused before anything is sent; a directory onto a
    // guest file is named as such (it was "File exists").
    let odd = env.tmp.path().join("odd");
    std::fs::create_dir(&odd).unwrap();
    nix::unistd::mkfifo(&odd.join("p"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let err = sb.upload(&odd, "/tmp/odd").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("invalid local_path: {}: refused tar entry \"p\": only files, directories and links are transferred", odd.display())
    );
    std::fs::remove_file(odd.join("p")).unwrap();
    sb.run("touch /tmp/afile", &opts()).await.unwrap();
    let err = sb.upload(&odd, "/tmp/afile").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid guest_path: /tmp/afile exists and is not a directory: a directory is uploaded into a directory or to a new path"
    );
    // A file where a parent directory would go is named, on either side (it was "File exists").
    sb.run("touch /tmp/plain", &opts()).await.unwrap();
    let err = sb.upload(&local, "/tmp/plain/child").await.unwrap_err();
    assert_eq!(err.to_string(), "invalid guest_path: receiving /tmp/plain/child: /tmp/plain is not a directory");
    // A file onto a directory: said before the bytes travel (it was the rename's "Is a directory").
    let err = sb.upload(&local, "/tmp").await.unwrap_err();
    assert_eq!(err.to_string(), "invalid guest_path: /tmp is a directory; to upload into it, give /tmp/");
    let err = sb.download("/etc/hostname", &local.join("sub/x")).await.unwrap_err();
    assert_eq!(err.to_string(), format!("invalid local_path: {} is not a directory", local.display()));
    // A directory that cannot be written to is named, not the download's temporary file.
    let err = sb.download("/etc/hostname", std::path::Path::new("/proc/1/x")).await.unwrap_err();
    assert_eq!(err.full_message(), "cannot write into /proc/1: No such file or directory (os error 2)");

    // A sparse file stays sparse on the host (a guest's `truncate -s 100G` filled this disk).
    sb.run("truncate -s 300M /tmp/sparse; echo end >> /tmp/sparse", &opts()).await.unwrap();
    let sparse = env.tmp.path().join("sparse");
    sb.download("/tmp/sparse", &sparse).await.unwrap();
    let meta = std::fs::metadata(&sparse).unwrap();
    assert_eq!(meta.len(), (300 << 20) + 4);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 1 << 20,
        "{} bytes allocated",
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512
    );
    let tail = std::fs::read(&sparse).unwrap();
    assert!(tail.ends_with(b"end\n") && tail[..300 << 20].iter().all(|&b| b == 0));

    // A setuid/setgid file comes back without those bits.
    sb.run("echo s > /tmp/suid; chmod 6755 /tmp/suid", &opts()).await.unwrap();
    let got = env.tmp.path().join("suid");
    sb.download("/tmp/suid", &got).await.unwrap();
    assert_eq!(std::fs::metadata(&got).unwrap().permissions().mode() & 0o7777, 0o755);

    // Directories both ways, with a link that stays inside.
    let tree = env.tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/b/c.txt"), "deep\n").unwrap();
    std::os::unix::fs::symlink("b/c.txt", tree.join("a/link")).unwrap();
    // The top directory keeps its mode where the transfer makes it, as the ones below do.
    std::fs::set_permissions(&tree, std::fs::Permissions::from_mode(0o750)).unwrap();
    sb.upload(&tree, "/srv/tree").await.unwrap();
    assert_eq!(sb.run("cat /srv/tree/a/b/c.txt /srv/tree/a/link", &opts()).await.unwrap().stdout, "deep\ndeep\n");
    assert_eq!(sb.run("stat -c %a /srv/tree", &opts()).await.unwrap().stdout, "750\n");
    sb.run("echo new > /srv/tree/a/new.txt; chmod 710 /srv/tree", &opts()).await.unwrap();
    sb.download("/srv/tree", &env.tmp.path().join("copy")).await.unwrap();
    assert_eq!(std::fs::metadata(env.tmp.path().join("copy")).unwrap().permissions().mode() & 0o7777, 0o710);
    assert_eq!(std::fs::read_to_string(env.tmp.path().join("copy/a/new.txt")).unwrap(), "new\n");
    assert_eq!(std::fs::read_link(env.tmp.path().join("copy/a/link")).unwrap(), std::path::Path::new("b/c.txt"));
    sb.delete().await.unwrap();
}

#[tokio::test]
async fn links_that_escape_are_refused_both_ways_and_write_nothing() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    // Guest to host: a guest directory holding links out of itself.
    for (link, target) in [("esc", "../../../etc"), ("abs", "/etc/passwd")] {
        sb.run(&format!("rm -rf /tmp/d; mkdir -p /tmp/d; echo x > /tmp/d/ok; ln -s {target} /tmp/d/{link}"), &opts()).await.unwrap();
        let dest = env.tmp.path().join(format!("dl-{link}"));
        let err = sb.download("/tmp/d", &dest).await.unwrap_err().to_string();
        assert!(err.contains("refused tar entry"), "{err}");
        assert!(!dest.exists(), "something was written for {link}");
    }
    // Host to guest: refused before anything is sent, as the local tree's fault (the agent
    // would refuse the same, before writing anything).
    let tree = env.tmp.path().join("up");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("ok"), "x").unwrap();
    std::os::unix::fs::symlink("../../../../etc/shadow", tree.join("esc")).unwrap();
    let err = sb.upload(&tree, "/srv/up").await.unwrap_err().to_string();
    assert!(err.starts_with(&format!("invalid local_path: {}: refused tar entry:", tree.display())), "{err}");
    let r = sb.run("ls /srv/up 2>&1; ls -a /srv", &opts()).await.unwrap();
    assert!(r.stdout.contains("No such file"), "{}", r.stdout);
    assert!(!r.stdout.contains("smolvm-upload"), "temp file left: {}", r.stdout);
    sb.delete().await.unwrap();
}

#[test]
fn cli_file_upload_and_download() {
    let env = env();
    assert!(env.smolvm(&["sandbox", "create", "--name", "files"]).status.success());
    let local = env.tmp.path().join("hello.txt");
    std::fs::write(&local, "hello file\n").unwrap();
    let out = env.smolvm(&["sandbox", "file", "upload", "files", local.to_str().unwrap(), "/home/"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.smolvm(&["sandbox", "exec", "files", "--", "cat /home/hello.txt"]);
    assert_eq!(stdout(&out), "hello file\n");
    let back = env.tmp.path().join("back.txt");
    let out = env.smolvm(&["sandbox", "file", "download", "files", "/home/hello.txt", back.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "hello file\n");
    let out = env.smolvm(&["sandbox", "file", "upload", "files", local.to_str().unwrap(), "home/x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("guest path must be absolute"), "{}", stderr(&out));
    // Ctrl-C during a download (a file, then a directory) gives it up: nothing of it is left
    // on the host (a signal's default end left the temporary file).
    let made = env.smolvm(&["sandbox", "exec", "files", "--", "head -c 60000000 /dev/zero > /tmp/big; mkdir /tmp/d; cp /tmp/big /tmp/d/"]);
    assert!(made.status.success(), "{}", stderr(&made));
    for src in ["/tmp/big", "/tmp/d"] {
        let into = env.tmp.path().join(format!("into{}", src.replace('/', "-")));
        std::fs::create_dir_all(&into).unwrap();
        let download =
            env.cli().args(["sandbox", "file", "download", "files", src]).arg(&into).stderr(std::process::Stdio::piped()).spawn().unwrap();
        // Once under way (something of it on the host), the guest is held still at once: the
        // download cannot end before the interrupt.
        let since = std::time::Instant::now();
        while std::fs::read_dir(&into).unwrap().next().is_none() {
            assert!(since.elapsed() < Duration::from_secs(30), "{src}: the download never began");
            std::thread::sleep(Duration::from_millis(1));
        }
        env.signal_vmm(Signal::SIGSTOP);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(download.id() as i32), Signal::SIGINT).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        env.signal_vmm(Signal::SIGCONT);
        let out = download.wait_with_output().unwrap();
        assert_eq!(
            (out.status.code(), stderr(&out).trim()),
            (Some(130), format!("error: interrupted: the download of {src} was given up, and nothing of it is left").as_str())
        );
        let left: Vec<_> = std::fs::read_dir(&into).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{src}: {left:?}");
    }
    assert!(env.smolvm(&["sandbox", "delete", "-f", "files"]).status.success());
}

/// A directory download streams: one as large as half the guest's memory comes out whole.
/// (Packed in memory first, the archive of a tmpfs directory needs that memory a second time,
/// and the guest ran out.)
#[tokio::test]
async fn a_directory_larger_than_free_memory_downloads() {
    let env = env();
    // (88 MB: what fits in /tmp, which shares half the guest's memory with /.)
    let sb = env.boot(VmConfig { memory: 200, ..VmConfig::default() }).await;
    let r = sb
        .run("mkdir -p /tmp/big && for i in 1 2 3 4; do dd if=/dev/zero of=/tmp/big/f$i bs=1M count=22 2>/dev/null || exit 1; done; free -m | awk 'NR==2 {print $4}'", &opts())
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    let free: u64 = r.stdout.trim().parse().unwrap();
    assert!(free < 88, "the test needs the directory to be larger than the guest's free memory ({free} MiB free)");
    let local = env.tmp.path().join("big");
    sb.download("/tmp/big", &local).await.unwrap();
    for i in 1..=4 {
        assert_eq!(std::fs::metadata(local.join(format!("f{i}"))).unwrap().len(), 22 << 20);
    }
    assert_eq!(sb.run("echo alive", &opts()).await.unwrap().stdout, "alive\n");
    sb.delete().await.unwrap();
}

/// A download its caller gives up on (a dropped future, as Ctrl-C in Python drops it) leaves
/// no temporary file behind, nor half a tree.
#[tokio::test]
async fn an_abandoned_download_leaves_nothing() {
    let env = env();
    let sb = env.boot(VmConfig { memory: 1024, ..Default::default() }).await;
    let r = sb
        .run("head -c 150000000 /dev/zero > /tmp/big && mkdir -p /tmp/tree && for i in $(seq 150); do head -c 1000000 /dev/zero > /tmp/tree/f$i; done", &opts())
        .await
        .unwrap();
    assert!(r.ok(), "{}", r.stderr);
    let local = env.tmp.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    for guest in ["/tmp/big", "/tmp/tree"] {
        // Given up once under way (something of it on the host), the guest held still from
        // then on, so that it cannot have ended first however fast this host is.
        let under_way = async {
            while std::fs::read_dir(&local).unwrap().next().is_none() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            env.signal_vmm(Signal::SIGSTOP);
        };
        let into = local.join("x");
        tokio::select! {
            r = sb.download(guest, &into) => panic!("{guest}: the download ended before it was given up: {r:?}"),
            () = under_way => {}
        }
        // (An extraction still running on its thread notices within an entry.)
        let listed = || std::fs::read_dir(&local).unwrap().map(|e| e.unwrap().file_name()).collect::<Vec<_>>();
        eventually(Duration::from_secs(10), || async { listed().is_empty() }).await;
        let left = listed();
        env.signal_vmm(Signal::SIGCONT);
        assert!(left.is_empty(), "{guest} left {left:?}");
    }
    // What a killed download left (nothing of it ran to clean up) goes with the next one into
    // that directory; a live process's is left alone.
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let killed = local.join(format!(".smolvm-download-{dead_pid}-0"));
    let live = local.join(format!(".smolvm-download-{}-7", std::process::id()));
    let fresh = local.join(format!(".smolvm-download-{dead_pid}-1"));
    for d in [&killed, &live, &fresh] {
        std::fs::create_dir_all(d.join("partial")).unwrap();
    }
    // (Untouched for a while: one written to moments ago may be another host's, in a shared
    // directory, whose pid means nothing here.)
    for d in [&killed, &live] {
        std::fs::File::open(d).unwrap().set_modified(std::time::SystemTime::now() - Duration::from_secs(3600)).unwrap();
    }
    // The sandbox serves the next one whole.
    sb.download("/tmp/tree", &local.join("x")).await.unwrap();
    assert_eq!(std::fs::read_dir(local.join("x")).unwrap().count(), 150);
    assert!(!killed.exists() && live.exists() && fresh.exists());
    sb.delete().await.unwrap();
}

/// A file that changes size while it is uploaded is an error, and nothing of it lands in the
/// guest (it was put in place torn: neither its old nor its new self). The guest is held still
/// while the upload sets out, so that the change comes mid-way however fast this host is.
#[tokio::test]
async fn a_file_that_changes_while_it_is_uploaded_is_not_put_in_place() {
    let env = env();
    let sb = std::sync::Arc::new(env.boot(VmConfig::default()).await);
    let local = env.tmp.path().join("shrinks");
    std::fs::write(&local, random_bytes(32 << 20)).unwrap();
    env.signal_vmm(Signal::SIGSTOP);
    let upload = {
        let (sb, local) = (sb.clone(), local.clone());
        tokio::spawn(async move { sb.upload(&local, "/tmp/made/by/it/shrinks").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::File::create(&local).unwrap(); // truncated to nothing
    env.signal_vmm(Signal::SIGCONT);
    let e = upload.await.unwrap().unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "host: {} changed size while it was uploaded (it had 33554432 bytes when the upload began",
            local.display()
        )),
        "{e}"
    );
    // (The agent hears of the cancel on its own stream: its temporary file goes soon after,
    // and the directories it made for it, which stayed.)
    let mut left = String::new();
    for _ in 0..100 {
        left = sb.run("ls -AR /tmp", &opts()).await.unwrap().stdout;
        if !left.contains("made") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!left.contains("made") && !left.contains("shrinks") && !left.contains("smolvm-upload"), "{left}");
    std::sync::Arc::try_unwrap(sb).ok().expect("one owner").delete().await.unwrap();
}

/// A sandbox stopped under an upload: the caller hears that it stopped (it heard "is stopping;
/// start it first"), and its root disk keeps no half-written temporary file.
#[tokio::test]
async fn an_upload_cut_off_by_a_stop_says_so_and_leaves_no_temporary_file() {
    let env = env();
    let rootfs = smolvm::image::default_rootfs(&env.dirs).unwrap();
    let mut sb = env.boot(VmConfig { rootfs_path: Some(rootfs), ..Default::default() }).await;
    let local = env.tmp.path().join("big");
    std::fs::write(&local, vec![7u8; 300 << 20]).unwrap();
    let other = Sandbox::open_in(env.dirs.clone(), sb.id()).await.unwrap();
    let upload = sb.upload(&local, "/root/big");
    let stop_once_under_way = async {
        // (Once the temporary file is in the guest.)
        loop {
            let r = other.run("ls -a /root | grep -c smolvm-upload", &opts()).await.unwrap();
            if r.stdout.trim() != "0" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut o = Sandbox::open_in(env.dirs.clone(), other.id()).await.unwrap();
        o.stop(Duration::from_secs(30)).await.unwrap();
    };
    let (up, ()) = tokio::join!(upload, stop_once_under_way);
    let err = up.unwrap_err().to_string();
    assert_eq!(err, "guest agent: the sandbox stopped during the upload");
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    let r = sb.run("ls -a /root", &opts()).await.unwrap();
    assert!(!r.stdout.contains("smolvm-upload") && !r.stdout.contains("big"), "{}", r.stdout);
    sb.delete().await.unwrap();
}

/// Uploads whose client is killed half way leave nothing in the supervisor. The agent answers
/// a cancelled upload with nothing, and the supervisor's relay of it waited for a last reply
/// for the VM's lifetime, holding the client's socket (until `accept` ran out of descriptors).
#[tokio::test]
async fn uploads_whose_client_is_killed_leave_nothing_in_the_supervisor() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let supervisor = sb.record().unwrap().supervisor.unwrap().pid;
    let fds = || std::fs::read_dir(format!("/proc/{supervisor}/fd")).unwrap().count();
    let before = fds();
    let local = env.tmp.path().join("big");
    std::fs::File::create(&local).unwrap().set_len(200_000_000).unwrap();
    for _ in 0..3 {
        let mut cli = env.cli().args(["sandbox", "file", "upload", sb.id(), local.to_str().unwrap(), "/tmp/big"]).spawn().unwrap();
        assert!(wait_until(Duration::from_secs(10), || fds() > before), "the upload never connected");
        // Under way, then given up: held still meanwhile (the VM's QEMU stopped), so that it
        // cannot end first however fast this host moves 200 MB.
        env.signal_vmm(nix::sys::signal::Signal::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(150)).await;
        cli.kill().unwrap();
        let killed = cli.wait().unwrap().code().is_none();
        env.signal_vmm(nix::sys::signal::Signal::SIGCONT);
        assert!(killed, "the upload ended before it was killed");
    }
    assert!(wait_until(Duration::from_secs(10), || fds() == before), "the supervisor holds {} descriptors, {before} before", fds());
    let r = sb.run("ls /tmp; echo served", &opts()).await.unwrap();
    assert_eq!(r.stdout, "served\n", "{r:?}");
    sb.delete().await.unwrap();
}

/// An upload's temporary file has a name anyone in the guest can guess: a link a guest user put
/// there must not be written through (the agent writes as root).
#[tokio::test]
async fn an_upload_never_writes_through_a_link_at_its_temporary_name() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let plant = "echo original > /root/victim && chmod 600 /root/victim && \
                 for i in $(seq 0 400); do ln -s /root/victim /tmp/.x.smolvm-upload-$i; done";
    assert!(sb.run(plant, &opts()).await.unwrap().ok());
    let local = env.tmp.path().join("x");
    std::fs::write(&local, "uploaded\n").unwrap();
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o644)).unwrap();
    sb.upload(&local, "/tmp/x").await.unwrap();
    let r = sb.run("cat /root/victim; stat -c %a /root/victim; cat /tmp/x", &opts()).await.unwrap();
    assert_eq!(r.stdout, "original\n600\nuploaded\n");
    sb.delete().await.unwrap();
}
