//! Shared by the VM tests: each test gets its own short data directory (socket paths must stay
//! short) and shares the image cache, so the kernel is built once per machine.
#![allow(dead_code)]

use smolvm::{Dirs, Sandbox, VmConfig};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::Duration;

pub struct TestEnv {
    pub tmp: tempfile::TempDir,
    pub dirs: Dirs,
}

/// What a [`TestEnv::slow_initrd`]'s `/init` says on the console before it waits.
pub const INIT_WAITS: &str = "smolvm-test: init waits";

pub fn shared_images() -> PathBuf {
    std::env::var_os("SMOLVM_IMAGE_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/root".into());
        home.join(".local/state/smolvm/images")
    })
}

/// `n` random bytes (file transfer tests).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut v).unwrap();
    v
}

pub fn env() -> TestEnv {
    let tmp = tempfile::Builder::new().prefix("svt").tempdir_in("/tmp").unwrap();
    let dirs = Dirs { data: tmp.path().join("d"), images: shared_images() };
    TestEnv { tmp, dirs }
}

impl TestEnv {
    /// A static program for the guest, built from C with musl-gcc (musl-tools, which the
    /// prerequisites install): what busybox cannot do, a guest out to misbehave can.
    pub fn guest_program(&self, name: &str, source: &str) -> PathBuf {
        let (src, bin) = (self.tmp.path().join(format!("{name}.c")), self.tmp.path().join(name));
        std::fs::write(&src, source).unwrap();
        let built = Command::new("musl-gcc").args(["-static", "-O1", "-o"]).arg(&bin).arg(&src).status().unwrap();
        assert!(built.success(), "musl-gcc (musl-tools) could not build {name}");
        bin
    }

    /// Our initramfs with an `/init` that says [`INIT_WAITS`] and waits `secs` before it hands
    /// over to the agent (appended: a later archive's file replaces an earlier one's): a boot
    /// held open, for tests that act during one however fast this host boots.
    pub fn slow_initrd(&self, secs: u32) -> PathBuf {
        let ours = smolvm::image::resolve(&VmConfig::default(), &self.dirs, &|_| {}).unwrap().initrd.unwrap();
        let mut wrapper = smolvm::cpio::Cpio::default();
        let init = format!("#!/bin/sh\necho {INIT_WAITS}\nsleep {secs}\nexec /smolvm-agent\n");
        wrapper.file("init", 0o755, init.as_bytes());
        wrapper.file("smolvm-agent", 0o755, &std::fs::read(smolvm::image::agent_binary().unwrap()).unwrap());
        let initrd = self.tmp.path().join(format!("slow-{secs}.cpio"));
        std::fs::write(&initrd, [std::fs::read(ours).unwrap(), wrapper.finish()].concat()).unwrap();
        initrd
    }

    /// Spawns `cmd`, which boots a [`TestEnv::slow_initrd`], and returns once that boot has got
    /// as far as its waiting `/init` (its kernel's boot done); panics with `what` if it has not
    /// within 60 s. Only a boot since the spawn counts: the consoles' waits are counted before
    /// it, so that another sandbox's boot (or this one's earlier) is not taken for it.
    pub fn spawn_booting(&self, cmd: &mut Command, what: &str) -> Child {
        let waits = || -> HashMap<PathBuf, usize> {
            std::fs::read_dir(self.dirs.data.join("vms"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|vm| {
                    let console = std::fs::read_to_string(vm.path().join("console.log")).unwrap_or_default();
                    (vm.path(), console.matches(INIT_WAITS).count())
                })
                .collect()
        };
        let before = waits();
        let mut child = cmd.spawn().unwrap();
        let booted = wait_until(Duration::from_secs(60), || waits().into_iter().any(|(vm, n)| n > before.get(&vm).copied().unwrap_or(0)));
        if !booted {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}");
        }
        child
    }

    pub fn cli(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_smolvm"));
        c.env("SMOLVM_DATA_DIR", &self.dirs.data)
            .env("SMOLVM_IMAGE_DIR", &self.dirs.images)
            .env_remove("SMOLVM_BACKEND")
            .env_remove("SMOLVM_AGENT_TRANSPORT")
            .env_remove("SMOLVM_MACHINE")
            .env_remove("SMOLVM_VERBOSE_BOOT");
        // As from a terminal: the signals smolvm honours as ignored (HUP, INT, QUIT) at their
        // defaults, whatever this test run inherited (a background job starts with SIGINT and
        // SIGQUIT ignored, `nohup` with SIGHUP). A test that wants one ignored says so after.
        // SAFETY: between fork and exec, only signal(), which is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, || {
                for s in [nix::sys::signal::Signal::SIGHUP, nix::sys::signal::Signal::SIGINT, nix::sys::signal::Signal::SIGQUIT] {
                    nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigDfl).map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
        c
    }

    pub fn smolvm(&self, args: &[&str]) -> Output {
        self.cli().args(args).output().unwrap()
    }

    pub async fn boot(&self, config: VmConfig) -> Sandbox {
        let mut sb = Sandbox::create_in(self.dirs.clone(), config, false).unwrap();
        sb.start(Duration::from_secs(60), &|l| eprintln!("{l}")).await.unwrap();
        sb
    }

    /// QEMU processes of this test's sandboxes (their command lines name our data directory).
    pub fn qemu_processes(&self) -> Vec<i32> {
        processes_mentioning("qemu-system", &self.dirs.data.to_string_lossy())
    }

    /// Whether no process holds sandbox `id`'s start lock (a start, a stop, a delete, or a
    /// killed one's threads not yet gone).
    pub fn start_lock_free(&self, id: &str) -> bool {
        !smolvm::sandbox::SandboxPaths::new(&self.dirs, id).start_lock_held()
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) this test's one VM's QEMU: a guest held still
    /// from outside, so that a transfer can be caught mid-way however fast this host is.
    pub fn signal_vmm(&self, signal: nix::sys::signal::Signal) {
        let vmm = self.qemu_processes();
        assert_eq!(vmm.len(), 1, "one VM");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(vmm[0]), signal).unwrap();
    }

    /// The firewall tables of this test's sandboxes (their comments name its data directory), as
    /// [`smolvm_tables`] gives them.
    pub fn own_tables(&self) -> Vec<String> {
        let ours = format!(" in {}\"", self.dirs.data.display());
        smolvm_tables().into_iter().filter(|t| t.contains(&ours)).collect()
    }

    /// Entries left under the per-sandbox directory.
    pub fn leftover_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dirs.data.join("vms")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
    }
}

/// A test that fails half way must not leave VMs running: their QEMU processes name a path
/// under this test's temporary directory (its data directory, or another one it made there);
/// killing them makes their supervisors exit too.
impl Drop for TestEnv {
    fn drop(&mut self) {
        for pid in processes_mentioning("qemu-system", &self.tmp.path().to_string_lossy()) {
            let _ = std::process::Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        // Their supervisors, finding their VMs killed, clean up and go: waited for, so that
        // what they leave is theirs and is seen here (the data directory, which holds the
        // traces a later command would clean up after, goes with this).
        let data = self.dirs.data.clone();
        let supervisors = || supervisors_of(&data);
        if !wait_until(Duration::from_secs(20), || supervisors().is_empty()) {
            for pid in supervisors() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        // Nor firewall tables (each says whose it is): one left would fail a later test's check
        // that no sandbox's rules remain, far from its cause. (A test failing already says
        // what went wrong: a panic here would abort the run.)
        if std::thread::panicking() {
            return;
        }
        if wait_until(Duration::from_secs(2), || self.own_tables().is_empty()) {
            return;
        }
        let left = self.own_tables();
        for t in &left {
            let _ = smolvm::net::nft_remove(t.split_whitespace().next().unwrap_or_default());
        }
        panic!("left behind: {left:?}");
    }
}

/// Supervisors of sandboxes in data directory `data` (given them in their environment).
pub fn supervisors_of(data: &std::path::Path) -> Vec<i32> {
    let mut var = b"SMOLVM_DATA_DIR=".to_vec();
    var.extend_from_slice(data.as_os_str().as_encoded_bytes());
    processes_mentioning("__supervise", "")
        .into_iter()
        .filter(|pid| std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == var)))
        .collect()
}

/// smolvm's nftables tables on this host, each as its name and its comment (whose it is).
pub fn smolvm_tables() -> Vec<String> {
    let tables = Command::new("nft").args(["list", "tables"]).output().unwrap();
    assert!(tables.status.success(), "nft list tables: {}", stderr(&tables));
    String::from_utf8_lossy(&tables.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("table inet "))
        .filter(|t| t.starts_with("smolvm_"))
        .filter_map(|t| {
            // (One removed since the list is not there.)
            let rules = Command::new("nft").args(["list", "table", "inet", t]).output().unwrap();
            let rules = rules.status.success().then(|| String::from_utf8_lossy(&rules.stdout).into_owned())?;
            let comment = rules.lines().find_map(|l| l.trim().strip_prefix("comment ")).unwrap_or("(no comment)");
            Some(format!("{t} {comment}"))
        })
        .collect()
}

/// Pids whose command line contains both strings.
pub fn processes_mentioning(a: &str, b: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains(a) && cmd.contains(b) {
            out.push(pid);
        }
    }
    out
}

/// Whether sandbox `id`'s QEMU was started to load a saved state (a warm start).
pub fn started_warm(id: &str) -> bool {
    let qemu = processes_mentioning("qemu-system", &format!("smolvm_hostname={id} "));
    assert_eq!(qemu.len(), 1, "{id}");
    smolvm::vmm::qemu::loads_saved_state(qemu[0])
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// An HTTP/1.0 GET of `path` on 127.0.0.1:`port`: the whole response, or `None` if none came.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut body = String::new();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).ok()?;
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// Poll until `f` holds, within a bound.
pub fn wait_until(bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + bound;
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// A helper process of the test's own (a server it probes), killed however the test ends.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Unmounts the filesystem it was made for, however the test ends.
/// Process `pid`'s resident memory in KiB (`VmRSS` in its status).
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap()
}

/// Whether process `pid` may take transparent huge pages (`THP_enabled` in its status); `None`
/// where the host kernel has none, or is older than 5.0 and does not say.
pub fn takes_huge_pages(pid: i32) -> Option<bool> {
    if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("THP_enabled:")).map(|v| v.trim() == "1")
}

pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Deletes an nftables table (family inet) however the test ends: one left behind would fail
/// every later check that no sandbox's rules remain.
pub struct DropTable(pub String);

impl Drop for DropTable {
    fn drop(&mut self) {
        // (A table already gone is no error to it.)
        let _ = smolvm::net::nft_remove(&self.0);
    }
}

/// Whether nftables lists a table of this name (nft itself must work: a failing `nft` is no
/// proof that a table is gone).
pub fn nft_has_table(name: &str) -> bool {
    let out = Command::new("nft").args(["list", "tables"]).output().unwrap();
    assert!(out.status.success(), "nft list tables: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split_whitespace().last() == Some(name))
}

/// Whether the host has a network device of this name (a sandbox's TAP).
pub fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Poll until `f` holds, within a bound, for checks that ask a sandbox (async).
pub async fn eventually<F: std::future::Future<Output = bool>>(bound: Duration, mut f: impl FnMut() -> F) -> bool {
    let end = tokio::time::Instant::now() + bound;
    while tokio::time::Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f().await
}

/// A TCP port no one listens on now (the listener is dropped: a moment later it could be taken,
/// which a test's own server, started next, would find out).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap().local_addr().unwrap().port()
}
