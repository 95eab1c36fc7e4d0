//! Named images built from Debian packages, and the SSH channel into them, on real VMs.

mod common;

use common::*;
use smolvm::config::Channel;
use smolvm::recipe::{Recipe, RecipeFile};
use smolvm::{Error, RunOptions, Sandbox, Shell, VmConfig};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

fn opts() -> RunOptions {
    RunOptions { timeout: Duration::from_secs(60), ..Default::default() }
}

fn image(name: &str) -> VmConfig {
    VmConfig { image: Some(name.into()), ..Default::default() }
}

/// A 64 MiB busybox image holding one host file.
fn busybox_with(name: &str, source: std::path::PathBuf, dest: &str) -> Recipe {
    Recipe {
        name: name.to_string(),
        base: "busybox".into(),
        packages: vec![],
        files: vec![RecipeFile { source, dest: dest.into() }],
        size_mib: 64,
    }
}

/// A test's image in the shared cache, removed however the test ends (each is 64 MiB or more).
struct ImageEntry<'a>(&'a TestEnv, String);

impl Drop for ImageEntry<'_> {
    fn drop(&mut self) {
        // (Gone already where the test got to its own removal: then this is an error, ignored.)
        let _ = smolvm::image::remove_entry(&self.0.dirs, &self.1);
    }
}

#[tokio::test]
async fn custom_recipe_is_cached_rebuilt_on_change_and_boots_with_a_grown_disk() {
    let env = env();
    let name = format!("t-{}", std::process::id());
    let _entry = ImageEntry(&env, name.clone());
    let marker = env.tmp.path().join("marker");
    std::fs::write(&marker, "first\n").unwrap();
    let recipe = busybox_with(&name, marker.clone(), "/etc/marker");
    let quiet = |_: &str| {};
    let first = smolvm::recipe::build(&env.dirs, &recipe, &quiet).unwrap();
    assert!(!first.cached, "a new recipe is built");
    let again = smolvm::recipe::build(&env.dirs, &recipe, &quiet).unwrap();
    assert!(again.cached, "the same recipe is a cache hit");
    assert_eq!(first.rootfs, again.rootfs);
    std::fs::write(&marker, "second\n").unwrap();
    let changed = smolvm::recipe::build(&env.dirs, &recipe, &quiet).unwrap();
    assert!(!changed.cached, "a changed file rebuilds");
    assert_ne!(changed.rootfs, first.rootfs);

    // By name, with the disk grown past the recipe's 64 MiB.
    let sb = env.boot(VmConfig { disk_size_mib: Some(512), ..image(&name) }).await;
    let info = sb.info().await.unwrap();
    assert_eq!((info["image"].as_str(), info["disk_size_mib"].as_u64()), (Some(name.as_str()), Some(512)), "{info}");
    let r = sb.run("cat /etc/marker; df -m / | tail -1 | awk '{print $2}'", &opts()).await.unwrap();
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("second"));
    let size: u64 = lines.next().unwrap().parse().unwrap();
    assert!(size > 400, "the root filesystem fills the 512 MiB disk, got {size} MiB");
    // No SSH server in this image: the error says so and names images that have one.
    let e = sb.ssh_endpoint().unwrap_err();
    assert!(matches!(e, Error::Ssh(_)) && e.to_string().contains("debian-ssh"), "{e}");
    sb.delete().await.unwrap();
    // By name it stays the disk last built, even once its source file is gone.
    std::fs::remove_file(&marker).unwrap();
    let named = smolvm::recipe::build_named(&env.dirs, &name, &quiet).unwrap();
    assert!(named.cached && named.rootfs == changed.rootfs, "{named:?}");
    let mut sb = env.boot(image(&name)).await;
    assert_eq!(sb.run("cat /etc/marker; echo kept > /root/mine", &opts()).await.unwrap().stdout, "second\n");
    // A command that a stop cuts off hears so. (With a disk the agent kills it on the way down,
    // and its exit, 137, was passed on as if the command had failed of itself.)
    let other = Sandbox::open_in(env.dirs.clone(), sb.id()).await.unwrap();
    let running = tokio::spawn(async move { other.run("sleep 30", &opts()).await });
    for _ in 0..100 {
        if sb.run("pgrep -x sleep", &opts()).await.unwrap().exit_code == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sb.stop(Duration::from_secs(10)).await.unwrap();
    let err = running.await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "guest agent: the sandbox stopped while the command ran");

    smolvm::image::remove_entry(&env.dirs, &name).unwrap();
    assert!(smolvm::recipe::load(&env.dirs, &name).is_err(), "the recipe is gone");
    assert!(!first.rootfs.exists() && !changed.rootfs.exists(), "its disks are gone");
    // A sandbox that has booted stands on its own link to its disk: it starts again with what
    // it wrote, and nothing is built for it.
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    assert_eq!(sb.run("cat /etc/marker /root/mine", &opts()).await.unwrap().stdout, "second\nkept\n");
    assert!(!changed.rootfs.exists(), "the image was built again");
    sb.delete().await.unwrap();
}

#[tokio::test]
async fn ssh_and_agent_give_the_same_results_and_transfer_the_same_bytes() {
    let env = env();
    let mut sb = env.boot(VmConfig { comm_channel: Some("ssh".into()), ..image("alpine-ssh") }).await;
    sb.wait_for_ssh(Duration::from_secs(60)).await.unwrap();
    for (cmd, shell) in [
        ("echo out; echo err >&2; exit 3", Shell::Login),
        ("printf 'a b\\n'; echo \"$0\"", Shell::Raw),
        ("cd /tmp && pwd && echo $HOME", Shell::Login),
    ] {
        let o = RunOptions { shell, ..opts() };
        sb.set_channel(Channel::Ssh);
        let via_ssh = sb.run(cmd, &o).await.unwrap();
        sb.set_channel(Channel::Agent);
        let via_agent = sb.run(cmd, &o).await.unwrap();
        assert_eq!(via_ssh, via_agent, "{cmd}");
    }
    assert_eq!(sb.run("echo out; echo err >&2; exit 3", &opts()).await.unwrap().exit_code, 3);

    sb.set_channel(Channel::Ssh);
    // `sandbox shell -- CMD` runs CMD in a login shell over SSH too, as over the agent: the
    // sandbox's variables are there (they were not).
    sb.set_env_vars(&std::collections::BTreeMap::from([("FOO".to_string(), "from smolvm".to_string())]), true).await.unwrap();
    let out = env.cli().args(["sandbox", "shell", sb.id(), "--", "echo [$FOO]"]).stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[from smolvm]\n", "{}", String::from_utf8_lossy(&out.stderr));
    // Transfers at once beyond what dropbear takes in their handshake each get through.
    let local = env.tmp.path().join("small");
    std::fs::write(&local, b"small\n").unwrap();
    let sb = std::sync::Arc::new(sb);
    let ups: Vec<_> = (0..8)
        .map(|i| {
            let (sb, local) = (sb.clone(), local.clone());
            tokio::spawn(async move { sb.upload(&local, &format!("/tmp/up/s{i}")).await })
        })
        .collect();
    for up in ups {
        up.await.unwrap().unwrap();
    }
    let sb = std::sync::Arc::try_unwrap(sb).ok().expect("no other handle");
    // A file in the way of the parents is said of the path asked for (it named our temporary
    // file), as over the agent.
    let e = sb.upload(&local, "/tmp/up/s0/child").await.unwrap_err().to_string();
    assert_eq!(e, "invalid guest_path: receiving /tmp/up/s0/child: /tmp/up/s0 is not a directory (a part of it is a file)");
    // Readiness follows the channel: over SSH, a login that works.
    sb.wait_for_ready(Duration::from_secs(60)).await.unwrap();
    assert!(sb.can_run_commands().await);
    // A signal's exit code is 128+N, as over the agent (the server would report the signal,
    // and ssh exit 255).
    assert_eq!(sb.run("kill -9 $$", &opts()).await.unwrap().exit_code, 137);
    // More commands at once than dropbear takes in their handshake (5 from one address): each
    // still runs once and gets its own output.
    let sb = std::sync::Arc::new(sb);
    let runs: Vec<_> = (0..12)
        .map(|i| {
            let sb = sb.clone();
            tokio::spawn(async move { sb.run(&format!("echo run{i}"), &opts()).await })
        })
        .collect();
    for (i, run) in runs.into_iter().enumerate() {
        let r = run.await.unwrap().unwrap();
        assert_eq!((r.exit_code, r.stdout.as_str()), (0, format!("run{i}\n").as_str()), "{}", r.stderr);
    }
    let mut sb = std::sync::Arc::try_unwrap(sb).ok().expect("no other handle");
    let o = RunOptions { timeout: Duration::from_secs(1), ..opts() };
    let e = sb.run("sleep 30", &o).await.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    // Nothing the command started is left either (busybox's `timeout` kills its shell alone).
    let e = sb.run("sleep 300 & sleep 30", &o).await.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert_eq!(sb.run("ps -o args | grep -c '^sleep 300$'", &opts()).await.unwrap().stdout, "0\n");
    // Standard input reaches the command there too, and a directory it cannot enter is its error.
    let fed = RunOptions { stdin: Some(b"one\ntwo\n".to_vec()), ..opts() };
    assert_eq!(sb.run("tr a-z A-Z", &fed).await.unwrap().stdout, "ONE\nTWO\n");
    let elsewhere = RunOptions { cwd: Some("/nonexistent".into()), ..opts() };
    let r = sb.run("echo ran", &elsewhere).await.unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (2, ""), "{}", r.stderr);
    // Output past the limit stops the command there too (it dies writing to the closed
    // session).
    let e = sb.run("yes", &RunOptions { max_output: 1000, ..opts() }).await.unwrap_err();
    assert_eq!(e.to_string(), "the command's stdout passed 1000 bytes, the most `run` keeps; the command was stopped");
    let gone = "for i in $(seq 50); do pgrep -x yes >/dev/null || { echo gone; exit; }; sleep 0.1; done";
    assert_eq!(sb.run(gone, &opts()).await.unwrap().stdout, "gone\n");

    // 20 MB over SFTP, both ways.
    let data = random_bytes(20 * 1024 * 1024);
    let local = env.tmp.path().join("big.bin");
    std::fs::write(&local, &data).unwrap();
    sb.upload(&local, "/data/in/").await.unwrap();
    sb.set_channel(Channel::Agent);
    let r = sb.run("sha256sum /data/in/big.bin | cut -d' ' -f1", &opts()).await.unwrap();
    sb.set_channel(Channel::Ssh);
    let back = env.tmp.path().join("out/back.bin");
    sb.download("/data/in/big.bin", &back).await.unwrap();
    assert!(std::fs::read(&back).unwrap() == data, "downloaded bytes differ");
    let host_sum = std::process::Command::new("sha256sum").arg(&local).output().unwrap();
    assert_eq!(r.stdout.trim(), String::from_utf8_lossy(&host_sum.stdout).split(' ').next().unwrap());
    // Setuid is dropped on the way out; relative guest paths are refused.
    sb.run("cp /bin/busybox /tmp/su && chmod 4755 /tmp/su", &opts()).await.unwrap();
    sb.download("/tmp/su", &env.tmp.path().join("su")).await.unwrap();
    assert_eq!(std::fs::metadata(env.tmp.path().join("su")).unwrap().permissions().mode() & 0o7777, 0o755);
    let e = sb.upload(&local, "relative/x").await.unwrap_err();
    assert!(e.to_string().contains("guest_path"), "{e}");
    // Over SSH as over the agent: the agent's umask (the server had the key's 077, so commands
    // and SFTP made private files), and an upload keeps setuid (`put -p` dropped it).
    assert_eq!(sb.run("umask", &opts()).await.unwrap().stdout, "0022\n");
    let suid = env.tmp.path().join("suid");
    std::fs::write(&suid, "x").unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    sb.upload(&suid, "/data/made/here/suid").await.unwrap();
    let r = sb.run("stat -c %a /data/made/here /data/made/here/suid", &opts()).await.unwrap();
    assert_eq!(r.stdout, "755\n4755\n", "{}", r.stderr);
    // Into place by rename, as over the agent: a directory in the way is an error, and no
    // temporary file stays either way.
    sb.set_channel(Channel::Agent);
    sb.run("mkdir -p /data/in/taken", &opts()).await.unwrap();
    sb.set_channel(Channel::Ssh);
    let e = sb.upload(&local, "/data/in/taken").await.unwrap_err();
    assert_eq!(e.to_string(), "invalid guest_path: /data/in/taken is a directory; to upload into it, give /data/in/taken/");
    sb.set_channel(Channel::Agent);
    let r = sb.run("ls -A /data/in /data/in/taken", &opts()).await.unwrap();
    assert_eq!(r.stdout, "/data/in:\nbig.bin\ntaken\n\n/data/in/taken:\n", "{}", r.stderr);
    sb.set_channel(Channel::Ssh);
    // Given up on mid-way (a dropped future), an upload's temporary name goes too. The guest's
    // sftp-server is stopped once the temporary file is there, so that the upload is caught
    // mid-way however fast this host moves data.
    let bigger = env.tmp.path().join("bigger.bin");
    std::fs::write(&bigger, random_bytes(80 * 1024 * 1024)).unwrap();
    let watcher = Sandbox::open_in(env.dirs.clone(), sb.id()).await.unwrap();
    let caught = "ls -A /data/gone 2>/dev/null | grep -q '^.smolvm-upload-' && pkill -STOP sftp-server";
    let held = async {
        while watcher.run(caught, &opts()).await.unwrap().exit_code != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        r = sb.upload(&bigger, "/data/gone/") => panic!("the upload finished before it could be held: {r:?}"),
        () = held => {}
    }
    // (The temporary file was there: `caught` saw it. The clean-up's own sftp, on a session of
    // its own, may have removed it by now.)
    assert_eq!(watcher.run("pkill -CONT sftp-server", &opts()).await.unwrap().exit_code, 0);
    sb.set_channel(Channel::Agent);
    let mut left = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = sb.run("ls -A /data/gone 2>/dev/null", &opts()).await.unwrap().stdout;
        if left.is_empty() {
            break;
        }
    }
    assert_eq!(left, "", "a temporary upload was left");
    sb.set_channel(Channel::Ssh);
    // Killed outright (SIGKILL), an upload removes nothing itself: its temporary file goes with
    // the next SFTP upload into this sandbox (it stayed for good).
    let mut killed = env
        .cli()
        .args(["sandbox", "file", "upload", "--channel", "ssh", sb.id()])
        .arg(&bigger)
        .arg("/data/killed/")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let caught = "ls -A /data/killed 2>/dev/null | grep -q '^.smolvm-upload-' && pkill -STOP sftp-server";
    let mut held = false;
    for _ in 0..3000 {
        if watcher.run(caught, &opts()).await.unwrap().exit_code == 0 {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(held, "the killed upload never began");
    killed.kill().unwrap();
    let _ = killed.wait();
    assert_eq!(watcher.run("pkill -CONT sftp-server", &opts()).await.unwrap().exit_code, 0);
    let temps = "ls -A /data/killed | grep -c '^.smolvm-upload-'";
    assert_eq!(watcher.run(temps, &opts()).await.unwrap().stdout, "1\n");
    sb.upload(&local, "/data/other").await.unwrap();
    assert_eq!(watcher.run(temps, &opts()).await.unwrap().stdout, "0\n", "the killed upload's file is still there");
    // A line break in a path would start an sftp batch line of its own, and `!cmd` lines run
    // on the host: refused, and nothing ran.
    let pwned = env.tmp.path().join("pwned");
    let evil = format!("/tmp/a\n!touch {} #/f", pwned.display());
    for e in [sb.upload(&local, &evil).await.unwrap_err(), sb.download(&evil, &env.tmp.path().join("x")).await.unwrap_err()] {
        assert!(e.to_string().contains("control character"), "{e}");
    }
    assert!(!pwned.exists(), "a command in a path ran on the host");
    // Directories take the agent's checked tar path on the SSH channel too.
    let tree = env.tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/f"), "in a tree").unwrap();
    sb.upload(&tree, "/data/").await.unwrap();
    sb.download("/data/tree", &env.tmp.path().join("tree.back")).await.unwrap();
    assert_eq!(std::fs::read_to_string(env.tmp.path().join("tree.back/sub/f")).unwrap(), "in a tree");

    // The host key is pinned: a different key under the sandbox's alias is refused.
    let ep = sb.ssh_endpoint().unwrap();
    let pinned = std::fs::read_to_string(&ep.known_hosts).unwrap();
    let other = env.tmp.path().join("other");
    assert!(std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&other).status().unwrap().success());
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let forged = format!("{} {}\n", ep.alias, other_pub.split_whitespace().take(2).collect::<Vec<_>>().join(" "));
    std::fs::write(&ep.known_hosts, forged).unwrap();
    let e = sb.run("true", &opts()).await.unwrap_err();
    let said = "ssh: Host key verification failed. The sandbox's SSH host key is not the one pinned for it";
    assert!(matches!(e, Error::Ssh(_)) && e.to_string().starts_with(said), "{e}");
    // The same from SFTP (it said only "Connection closed"), and at once from wait_for_ssh
    // (it waited out its timeout).
    let e = sb.upload(&local, "/tmp/refused").await.unwrap_err();
    assert!(e.to_string().starts_with(said), "{e}");
    let started = std::time::Instant::now();
    let e = sb.wait_for_ssh(Duration::from_secs(20)).await.unwrap_err();
    assert!(e.to_string().starts_with(said) && started.elapsed() < Duration::from_secs(10), "{e}");
    std::fs::write(&ep.known_hosts, pinned.clone()).unwrap();
    assert!(sb.run("true", &opts()).await.unwrap().ok());

    // Clones of a snapshot are sandboxes of their own, with host keys of their own: one resumed
    // at once, one restored paused and resumed later; SSH works in both.
    sb.snapshot(Some("keyed"), "full").await.unwrap();
    let key_of = |sb: &Sandbox| {
        let line = std::fs::read_to_string(sb.ssh_endpoint().unwrap().known_hosts).unwrap();
        line.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
    };
    let mut keys = vec![key_of(&sb)];
    use smolvm::sandbox::RestoreOptions;
    let restore = |resume| RestoreOptions { resume, ..Default::default() };
    let mut a = Sandbox::from_snapshot_in(env.dirs.clone(), "keyed", restore(true)).await.unwrap();
    let mut b = Sandbox::from_snapshot_in(env.dirs.clone(), "keyed", RestoreOptions { name: Some("keyed-b".into()), ..restore(false) })
        .await
        .unwrap();
    // Paused, SSH is refused as any command is, at once (not after ssh's own timeouts).
    let e = b.ssh_endpoint().unwrap_err();
    assert!(e.to_string().contains("VM 'keyed-b' is paused; resume it first"), "{e}");
    b.resume().await.unwrap();
    sb.pause().await.unwrap();
    sb.set_channel(Channel::Ssh);
    let e = sb.run("true", &opts()).await.unwrap_err();
    assert!(matches!(e, Error::NotRunning { .. }) && e.to_string().contains("is paused; resume it first"), "{e}");
    sb.resume().await.unwrap();
    for clone in [&mut a, &mut b] {
        clone.set_channel(Channel::Ssh);
        assert_eq!(clone.run("echo cloned", &opts()).await.unwrap().output(), "cloned");
        keys.push(key_of(clone));
    }
    assert!(keys[0] != keys[1] && keys[0] != keys[2] && keys[1] != keys[2], "shared host keys: {keys:?}");
    // The source keeps its key, and its SSH server.
    assert_eq!(key_of(&sb), keys[0]);
    assert!(sb.run("true", &opts()).await.unwrap().ok());
    for clone in [a, b] {
        clone.delete().await.unwrap();
    }
    smolvm::sandbox::delete_snapshot(&env.dirs, "keyed").unwrap();
    // A host key half made (a disk saved mid-keygen keeps dropbearkey's temporary file, which
    // a keygen of the same pid would not replace) does not keep the server down: the next
    // boot makes the key anew, and its temporary files go.
    sb.set_channel(Channel::Agent);
    let half = "k=/etc/dropbear/dropbear_ed25519_host_key; rm -f $k; for i in $(seq 1 500); do : > $k.tmp$i; done; sync";
    assert!(sb.run(half, &opts()).await.unwrap().ok());
    sb.stop(Duration::from_secs(3)).await.unwrap();
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    let left = sb.run("ls /etc/dropbear", &opts()).await.unwrap().stdout;
    assert!(left.contains("dropbear_ed25519_host_key") && !left.contains(".tmp"), "{left}");
    sb.set_channel(Channel::Ssh);
    sb.wait_for_ssh(Duration::from_secs(60)).await.unwrap();
    // The guest's SSH server killed under a command, with the sandbox running on: said so (it
    // was "the sandbox went away"), and so are the refusals after it (ssh's raw complaint).
    let e = sb.run("pkill dropbear; sleep 1", &opts()).await.unwrap_err().to_string();
    assert!(e.contains("the SSH session closed while the command ran, and the sandbox runs on"), "{e}");
    let e = sb.run("true", &opts()).await.unwrap_err().to_string();
    assert!(e.contains("the guest's SSH server does not answer ("), "{e}");
    let e = sb.upload(&env.tmp.path().join("big.bin"), "/tmp/again.bin").await.unwrap_err().to_string();
    assert!(e.contains("the guest's SSH server does not answer ("), "{e}");
    sb.stop(Duration::from_secs(3)).await.unwrap();
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    sb.wait_for_ssh(Duration::from_secs(60)).await.unwrap();
    // A guest that goes down under an SSH command is an error that says so, as over the agent,
    // not ssh's exit code 255.
    // ssh's own "Connection to … closed by remote host." is not passed on as the command's.
    let mut streamed = Vec::new();
    let e = sb
        // (`poweroff` only asks PID 1, and returns: the command waits for the power-off, else
        // its shell could end first, and its session with an answer.)
        .run_streaming("echo before >&2; poweroff; sleep 20", &opts(), |o| {
            if let smolvm::sandbox::Output::Stderr(b) = o {
                streamed.extend_from_slice(b)
            }
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("while the command ran"), "{e}");
    assert_eq!(String::from_utf8_lossy(&streamed), "before\n");
    sb.delete().await.unwrap();
    assert!(env.qemu_processes().is_empty());
}

#[test]
fn debian_ssh_image_over_the_cli() {
    let env = env();
    let out = env.smolvm(&["sandbox", "create", "--name", "deb", "--image", "debian-ssh"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = env.smolvm(&["sandbox", "wait-ssh", "deb", "--timeout", "60"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = env.cli().args(["sandbox", "ssh", "deb", "--", "echo", "via-ssh"]).stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "via-ssh\n", "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    // In a login shell, as `exec`: the sandbox's variables are there (they were not).
    assert!(env.smolvm(&["sandbox", "env", "set", "deb", "FOO=from smolvm"]).status.success());
    let out = env.cli().args(["sandbox", "ssh", "deb", "--", "echo [$FOO]"]).stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[from smolvm]\n", "{}", String::from_utf8_lossy(&out.stderr));
    // A command a signal ends exits 128+N, as over the agent (ssh's 255 read as its own failure).
    let out = env.cli().args(["sandbox", "ssh", "deb", "--", "kill -9 $$"]).stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(137), "{}", String::from_utf8_lossy(&out.stderr));
    let out = env.smolvm(&["sandbox", "exec", "deb", "--channel", "ssh", "--", "python3 -c 'print(6*7)'; exit 4"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");
    assert_eq!(out.status.code(), Some(4), "the guest's exit code over SSH");
    // The same command over both channels: the same stdout, stderr and exit code.
    let cmd = "echo out; echo err >&2; echo $0; exit 3";
    let via = |ch: &str| env.smolvm(&["sandbox", "exec", "deb", "--channel", ch, "--", cmd]);
    let (s, a) = (via("ssh"), via("agent"));
    assert_eq!((s.stdout.clone(), s.stderr.clone(), s.status.code()), (a.stdout.clone(), a.stderr.clone(), a.status.code()));
    assert_eq!(String::from_utf8_lossy(&s.stdout), "out\n/bin/bash\n");
    assert_eq!(s.status.code(), Some(3));
    // Key-only root login: the image's sshd refuses passwords.
    let out = env.smolvm(&["sandbox", "exec", "deb", "--", "sshd -T | grep -iE '^(passwordauthentication|permitrootlogin)'"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "permitrootlogin without-password\npasswordauthentication no\n");
    assert!(env.smolvm(&["sandbox", "delete", "--force", "deb"]).status.success());
    assert!(env.qemu_processes().is_empty());

    // `run -e` over SSH: the sandbox's variables carry it to the login shell (it booted, and
    // then refused the per-command copy). A raw shell, which reads none, is refused at once.
    let out = env.smolvm(&["run", "--image", "debian-ssh", "--comm-channel", "ssh", "-e", "X=1", "echo [$X]"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[1]\n", "{}", String::from_utf8_lossy(&out.stderr));
    let out = env.smolvm(&["run", "--image", "debian-ssh", "--comm-channel", "ssh", "--shell", "raw", "-e", "X=1", "true"]);
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: invalid env: over SSH"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(env.qemu_processes().is_empty());

    // The default image has no SSH server: a clear error, not a hang.
    let out = env.smolvm(&["sandbox", "create", "--name", "plain"]);
    assert!(out.status.success());
    let out = env.cli().args(["sandbox", "ssh", "plain", "--", "true"]).stdin(std::process::Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no SSH server"), "{}", String::from_utf8_lossy(&out.stderr));
    // A handle switched to SSH there cannot run commands, and waiting does not make it so.
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let mut plain = Sandbox::open_in(env.dirs.clone(), "plain").await.unwrap();
        plain.set_channel(Channel::Ssh);
        assert!(!plain.can_run_commands().await);
        assert!(plain.wait_for_ready(Duration::from_secs(30)).await.unwrap_err().to_string().contains("has no SSH server"));
    });
    assert!(env.smolvm(&["sandbox", "delete", "--force", "plain"]).status.success());

    // Asking for the SSH channel where no server can be: refused before the default image
    // boots, and once booted for a root disk without one; either way nothing is left running.
    let out = env.smolvm(&["run", "--comm-channel", "ssh", "true"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().next(),
        Some("error: invalid comm_channel: ssh needs an image with an SSH server, such as debian-ssh or alpine-ssh; this sandbox's image boots from an initramfs and has none")
    );
    let rootfs = smolvm::image::default_rootfs(&env.dirs).unwrap();
    let out = env.smolvm(&["sandbox", "create", "--name", "nosrv", "--rootfs", rootfs.to_str().unwrap(), "--comm-channel", "ssh"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("VM 'nosrv' has no SSH server"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success());
    assert!(env.qemu_processes().is_empty());
    let out = env.smolvm(&["sandbox", "list", "--all"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("nosrv"), "{}", String::from_utf8_lossy(&out.stdout));
}

/// Sandboxes of an image with a root disk start warm, as the default image's do: restored from
/// a template saved with the image's disk mounted, each on a copy of that disk of its own, with
/// its own name, SSH host key and server. A second start boots cold from the sandbox's own
/// disk. A grown disk has a template of its own, whose guest grew its filesystem.
#[tokio::test]
async fn root_disk_sandboxes_start_warm_each_on_a_disk_of_its_own() {
    let env = env();
    let mut a = env.boot(image("alpine-ssh")).await;
    let mut b = env.boot(image("alpine-ssh")).await;
    assert!(started_warm(a.id()) && started_warm(b.id()), "an alpine-ssh sandbox booted cold");
    let r = a.run("echo mine > /root/f && sync && hostname", &opts()).await.unwrap();
    assert_eq!(r.stdout, format!("{}\n", a.id()), "{}", r.stderr);
    let r = b.run("hostname; cat /root/f", &opts()).await.unwrap();
    assert_eq!(r.stdout, format!("{}\n", b.id()));
    assert!(r.stderr.contains("/root/f"), "the other clone's file: {}", r.stderr);
    // Each its own host key, pinned, and a server that answers with it.
    let key = |sb: &Sandbox| std::fs::read_to_string(&sb.paths().known_hosts).unwrap().split_whitespace().last().unwrap().to_string();
    assert_ne!(key(&a), key(&b));
    b.set_channel(Channel::Ssh);
    assert_eq!(b.run("echo over-ssh", &opts()).await.unwrap().stdout, "over-ssh\n");

    // Stopped and started again: from its own disk, cold, with what it wrote.
    a.stop(Duration::from_secs(10)).await.unwrap();
    a.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    assert!(!started_warm(a.id()), "a restart restored the template over the sandbox's own disk");
    assert_eq!(a.run("cat /root/f", &opts()).await.unwrap().stdout, "mine\n");
    a.set_channel(Channel::Ssh);
    assert_eq!(a.run("echo again", &opts()).await.unwrap().stdout, "again\n");
    a.set_channel(Channel::Agent);
    // A started sandbox's disk is its own: no mark of a warm start's copy is left on it.
    let overlay = a.paths().overlay.clone();
    assert!(!smolvm::image::warm_disk_marker(&overlay).exists() && !smolvm::image::warm_disk_marker(&b.paths().overlay).exists());
    // What a warm start whose starter and supervisor were both killed leaves (its copy of the
    // template's disk, still marked as such, and a half-made overlay): no disk to boot from.
    // The next start removes them and starts warm, on a fresh disk.
    a.stop(Duration::from_secs(10)).await.unwrap();
    std::fs::write(smolvm::image::warm_disk_marker(&overlay), b"").unwrap();
    let half_made = overlay.with_extension("tmp999999");
    std::fs::write(&half_made, b"half").unwrap();
    a.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    assert!(started_warm(a.id()), "the unfinished warm start's disk was booted");
    let r = a.run("cat /root/f", &opts()).await.unwrap();
    assert!(r.stdout.is_empty() && r.stderr.contains("/root/f"), "{r:?}");
    assert!(!half_made.exists() && !smolvm::image::warm_disk_marker(&overlay).exists());

    // A grown disk: warm from a template of that size (made by the first such start), and
    // grown; the image's own size is still the other template's.
    let grown = || VmConfig { disk_size_mib: Some(1024), ..image("alpine-ssh") };
    let c = env.boot(grown()).await;
    let d = env.boot(grown()).await;
    assert!(started_warm(c.id()) && started_warm(d.id()), "a sandbox with a grown disk booted cold");
    for sb in [&c, &d] {
        let r = sb.run("df -m / | tail -1 | awk '{print $2}'", &opts()).await.unwrap();
        assert!(r.stdout.trim().parse::<u32>().unwrap() > 900, "{}", r.stdout);
    }
    let e = env.boot(image("alpine-ssh")).await;
    let r = e.run("df -m / | tail -1 | awk '{print $2}'", &opts()).await.unwrap();
    assert!(r.stdout.trim().parse::<u32>().unwrap() < 900, "{}", r.stdout);
    for sb in [a, b, c, d, e] {
        sb.delete().await.unwrap();
    }
    assert!(env.qemu_processes().is_empty());
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// An image whose SSH server cannot be started (here an `sshd` that is no server, and no
/// `ssh-keygen`) still boots and serves commands over the agent; only a sandbox that asked for
/// the SSH channel fails its start, and says why.
#[tokio::test]
async fn an_image_whose_ssh_server_fails_still_serves_over_the_agent() {
    let env = env();
    let name = format!("t-nossh-{}", std::process::id());
    let _entry = ImageEntry(&env, name.clone());
    let fake = env.tmp.path().join("sshd");
    std::fs::write(&fake, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let recipe = busybox_with(&name, fake, "/usr/sbin/sshd");
    smolvm::recipe::build(&env.dirs, &recipe, &|_| {}).unwrap();

    let sb = env.boot(image(&name)).await;
    assert_eq!(sb.run("echo served", &opts()).await.unwrap().stdout, "served\n");
    sb.delete().await.unwrap();

    let config = VmConfig { comm_channel: Some("ssh".into()), ..image(&name) };
    let mut sb = smolvm::Sandbox::create_in(env.dirs.clone(), config, false).unwrap();
    let e = sb.start(Duration::from_secs(60), &|_| {}).await.unwrap_err();
    assert!(e.to_string().contains("starting the SSH server failed"), "{e}");
    sb.delete().await.unwrap();
    assert!(env.qemu_processes().is_empty());
    smolvm::image::remove_entry(&env.dirs, &name).unwrap();
}

/// Root in the guest may leave FIFOs where PID 1 writes at boot (/etc/hostname, and
/// /etc/resolv.conf on the set-up every command waits for): the next boot replaces them
/// instead of waiting on them for good.
#[tokio::test]
async fn fifos_left_where_the_agent_writes_do_not_hold_the_next_boot() {
    let env = env();
    let mut sb = env.boot(image("alpine-ssh")).await;
    let r = sb
        .run("rm -f /etc/hostname /etc/resolv.conf && mkfifo /etc/hostname /etc/resolv.conf && echo other > /proc/sys/kernel/hostname && sync", &opts())
        .await
        .unwrap();
    assert!(r.ok(), "{r:?}");
    sb.stop(Duration::from_secs(10)).await.unwrap();
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    let r = sb.run("cat /etc/hostname; grep -c nameserver /etc/resolv.conf; [ -f /etc/resolv.conf ] && echo file", &opts()).await.unwrap();
    assert_eq!(r.stdout, format!("{}\n1\nfile\n", sb.id()), "{r:?}");
    sb.delete().await.unwrap();
}

/// An SFTP transfer that falls silent (here its server is stopped mid-way, as a guest file on a
/// stuck mount would hold it) ends as a timeout after a minute without progress, as the
/// agent's transfers do: SSH's keepalives, which the guest's sshd still answers, never end it.
#[tokio::test]
async fn a_stalled_sftp_transfer_ends_as_a_timeout() {
    let env = env();
    let sb = env.boot(VmConfig { comm_channel: Some("ssh".into()), ..image("alpine-ssh") }).await;
    sb.wait_for_ssh(Duration::from_secs(60)).await.unwrap();
    let mut watcher = Sandbox::open_in(env.dirs.clone(), sb.id()).await.unwrap();
    watcher.set_channel(Channel::Agent);
    let big = env.tmp.path().join("big.bin");
    std::fs::write(&big, random_bytes(80 * 1024 * 1024)).unwrap();
    // Held as soon as its server runs, at whatever point of the transfer.
    let caught = "pkill -STOP sftp-server";
    let hold = async {
        while watcher.run(caught, &opts()).await.unwrap().exit_code != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    {
        let upload = sb.upload(&big, "/data/held/");
        tokio::pin!(upload);
        tokio::select! {
            r = &mut upload => panic!("the upload finished before it could be held: {r:?}"),
            () = hold => {}
        }
        let started = std::time::Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(300), upload).await.expect("the stalled upload never ended").unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        assert!(started.elapsed() >= Duration::from_secs(50), "ended after {:?}: {e}", started.elapsed());
    }
    assert_eq!(watcher.run("pkill -CONT sftp-server; echo ok", &opts()).await.unwrap().stdout, "ok\n");
    sb.delete().await.unwrap();
}
