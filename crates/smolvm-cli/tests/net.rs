#![allow(clippy::await_holding_lock)] // the lock serializes whole tests, each on its own runtime
//! Networking on real VMs. Every "internet" host is a network namespace this test makes itself
//! (198.18.0.0/15, the benchmarking range); nothing leaves this machine.

mod common;

use common::*;
use smolvm::config::{InternetSettings, PortForward};
use smolvm::{RunOptions, Sandbox, VmConfig};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// These tests look at the host's whole network state (links, nftables): one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn sh(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(cmd).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().success()
}

/// Two test hosts, each in its own namespace behind a veth, each serving HTTP on port 8080, and
/// a DNS server (in the first) that knows `allowed.test` and `blocked.test`.
struct Lab {
    tag: String,
    hosts: [String; 2],
    servers: Vec<Child>,
}

/// http.server's own server looks its address up in DNS at start (getfqdn), which hangs in a
/// namespace without DNS: serve through a plain TCPServer instead.
const HTTP_SERVER: &str = r#"
import http.server, os, socketserver, sys
os.chdir(sys.argv[3])
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
Server((sys.argv[1], int(sys.argv[2])), http.server.SimpleHTTPRequestHandler).serve_forever()
"#;

const DNS_SERVER: &str = r#"
import socket, sys
names = {b"allowed.test": sys.argv[2], b"blocked.test": sys.argv[3]}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    q, addr = s.recvfrom(512)
    i, labels = 12, []
    while q[i]:
        labels.append(q[i+1:i+1+q[i]]); i += 1 + q[i]
    qtype = q[i+1:i+3]
    name = b".".join(labels).lower()
    ip = names.get(name)
    known = ip is not None
    ans = b""
    if ip and qtype == b"\x00\x01":
        ans = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(ip)
    # A known name without a record of the asked type is NOERROR with no answer (NODATA).
    flags = b"\x81\x80" if known else b"\x81\x83"
    s.sendto(q[:2] + flags + q[4:6] + (b"\x00\x01" if ans else b"\x00\x00") + b"\x00\x00\x00\x00" + q[12:i+5] + ans, addr)
"#;

impl Lab {
    fn new(env: &TestEnv) -> Lab {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = (std::process::id() + 7 * NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)) % 200 + 20;
        let tag = format!("svn{n}");
        let hosts = [format!("198.18.{n}.2"), format!("198.18.{n}.6")];
        let www = env.tmp.path().join("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("index.html"), "hello from the test internet\n").unwrap();
        let mut servers = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let (ns, veth) = (format!("{tag}-{i}"), format!("{tag}h{i}"));
            let gw = format!("198.18.{n}.{}", 1 + 4 * i);
            let _ = sh(&format!("ip netns del {ns}"));
            assert!(sh(&format!(
                "ip netns add {ns} && ip link add {veth} type veth peer name eth0 netns {ns} && \
                 ip addr add {gw}/30 dev {veth} && ip link set {veth} up && \
                 ip -n {ns} addr add {host}/30 dev eth0 && ip -n {ns} link set eth0 up && ip -n {ns} link set lo up && \
                 ip -n {ns} route add default via {gw}"
            )));
            servers.push(
                Command::new("ip")
                    .args(["netns", "exec", &ns, "python3", "-c", HTTP_SERVER, host, "8080"])
                    .arg(&www)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
        }
        servers.push(
            Command::new("ip")
                .args(["netns", "exec", &format!("{tag}-0"), "python3", "-c", DNS_SERVER, &hosts[0], &hosts[0], &hosts[1]])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let lab = Lab { tag, hosts, servers };
        for h in &lab.hosts {
            assert!(wait_until(Duration::from_secs(10), || http_ok(&format!("http://{h}:8080/"))), "test host {h} did not come up");
        }
        lab
    }

    fn dns(&self) -> String {
        format!("{}:53", self.hosts[0])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for i in 0..2 {
            let _ = sh(&format!("ip netns del {}-{i}", self.tag));
        }
    }
}

/// Whether the host can fetch `url` (python3 is on every machine this runs on).
fn http_ok(url: &str) -> bool {
    sh(&format!("python3 -c \"import urllib.request as u; u.urlopen('{url}', timeout=2)\""))
}

/// An HTTP GET from inside the guest, printing the body or FAILED. Busybox's nc and nslookup
/// are used because Debian's static busybox wget crashes (its static glibc resolver).
fn fetch(url: &str) -> String {
    let rest = url.trim_start_matches("http://");
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "80"));
    let resolve = if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        format!("ip={host}")
    } else {
        format!("ip=$(nslookup {host} 2>/dev/null | sed -n 's/^Address:[[:space:]]*\\([0-9.]*\\)$/\\1/p' | tail -1)")
    };
    format!(
        "{resolve}; out=$(printf 'GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n' | nc -w 3 \"$ip\" {port} 2>/dev/null); \
         case \"$out\" in *'200 OK'*) printf '%s\n' \"$out\" | sed '1,/^\r$/d';; *) echo FAILED;; esac"
    )
}

fn opts() -> RunOptions {
    RunOptions { timeout: Duration::from_secs(30), ..Default::default() }
}

/// Rules go before a stop or delete returns; a TAP goes a moment later, when the exiting
/// supervisor lets go of it (the kernel takes tens of milliseconds to unregister a device).
fn no_smolvm_network_left() {
    assert_eq!(smolvm_tables(), Vec::<String>::new(), "left behind");
    let taps = || {
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        assert!(links.status.success(), "ip -o link: {}", stderr(&links));
        String::from_utf8_lossy(&links.stdout).lines().filter(|l| l.contains(": smv")).map(str::to_string).collect::<Vec<_>>()
    };
    assert!(wait_until(Duration::from_secs(3), || taps().is_empty()), "left behind: {:?}", taps());
}

async fn boot_with(env: &TestEnv, internet: Option<InternetSettings>) -> Sandbox {
    env.boot(VmConfig { internet_settings: internet, ..Default::default() }).await
}

#[tokio::test]
async fn open_off_and_restricted_internet() {
    let _serial = serial();
    if smolvm::net::nat_available().is_err() {
        panic!("NAT networking is not available here: {:?}", smolvm::net::nat_available());
    }
    let env = env();
    let lab = Lab::new(&env);
    // (The supervisors this test's library calls start read it; taken away however it ends, so
    // that no later test resolves through a lab that is gone.)
    struct Upstream;
    impl Drop for Upstream {
        fn drop(&mut self) {
            std::env::remove_var("SMOLVM_DNS_UPSTREAM");
        }
    }
    std::env::set_var("SMOLVM_DNS_UPSTREAM", lab.dns());
    let _upstream = Upstream;
    let (a, b) = (&lab.hosts[0], &lab.hosts[1]);

    let open = boot_with(&env, None).await;
    assert_eq!(open.run(&fetch(&format!("http://{a}:8080/")), &opts()).await.unwrap().stdout, "hello from the test internet\n");
    assert_eq!(open.run(&fetch("http://allowed.test:8080/"), &opts()).await.unwrap().stdout, "hello from the test internet\n");

    let off = boot_with(&env, Some(InternetSettings { mode: "off".into(), ..Default::default() })).await;
    assert_eq!(off.run(&fetch(&format!("http://{a}:8080/")), &opts()).await.unwrap().stdout, "FAILED\n");

    let cidr = InternetSettings { mode: "restricted".into(), allowed_cidrs: vec![format!("{a}/32")], ..Default::default() };
    let by_cidr = boot_with(&env, Some(cidr)).await;
    assert_eq!(by_cidr.run(&fetch(&format!("http://{a}:8080/")), &opts()).await.unwrap().stdout, "hello from the test internet\n");
    assert_eq!(by_cidr.run(&fetch(&format!("http://{b}:8080/")), &opts()).await.unwrap().stdout, "FAILED\n");

    let names = InternetSettings { mode: "restricted".into(), allowed_domains: vec!["allowed.test".into()], ..Default::default() };
    let by_name = boot_with(&env, Some(names)).await;
    // Before resolving, the address is not allowed; resolving the allowed name opens it.
    assert_eq!(by_name.run(&fetch(&format!("http://{a}:8080/")), &opts()).await.unwrap().stdout, "FAILED\n");
    let got = by_name.run(&fetch("http://allowed.test:8080/"), &opts()).await.unwrap().stdout;
    if got != "hello from the test internet\n" {
        let dbg = by_name.run("nslookup allowed.test 2>&1; cat /etc/resolv.conf", &opts()).await.unwrap().stdout;
        let set = String::from_utf8_lossy(&Command::new("nft").args(["list", "ruleset"]).output().unwrap().stdout).into_owned();
        panic!("fetch by name failed: {got:?}\n{dbg}\n{set}");
    }
    let blocked = by_name.run("nslookup blocked.test 2>&1; true", &opts()).await.unwrap().stdout;
    assert!(!blocked.contains(b.as_str()), "{blocked}");
    assert_eq!(by_name.run(&fetch(&format!("http://{b}:8080/")), &opts()).await.unwrap().stdout, "FAILED\n");

    for s in [open, off, by_cidr, by_name] {
        s.delete().await.unwrap();
    }
    no_smolvm_network_left();
}

#[tokio::test]
async fn sandboxes_cannot_reach_each_other_or_the_host_and_exposed_ports_work() {
    let _serial = serial();
    let env = env();
    let one = env.boot(VmConfig { port_forwards: vec![PortForward { guest: 8000, host: None }], ..Default::default() }).await;
    let two = env.boot(VmConfig::default()).await;
    // A web server in `one`, reachable from the host through its exposed port only.
    one.run("mkdir -p /srv && echo served-from-the-guest > /srv/index.html && (httpd -p 8000 -h /srv &)", &opts()).await.unwrap();
    let (guest, host) = one.ports().unwrap()[0];
    assert_eq!(guest, 8000);
    let body = wait_until(Duration::from_secs(10), || {
        sh(&format!(
            "python3 -c \"import urllib.request as u; assert b'served-from-the-guest' in u.urlopen('http://127.0.0.1:{host}/').read()\""
        ))
    });
    assert!(body, "the exposed port did not serve the guest's page");
    // Exposing at runtime, then closing.
    let extra = one.expose_local(8000, None).await.unwrap();
    assert_eq!(extra, host, "exposing an exposed port returns the same host port");
    assert_eq!(one.expose_local(8000, Some(host)).await.unwrap(), host);
    // Another host port for it is refused, not ignored with a success.
    let other = if host == 65535 { host - 1 } else { host + 1 };
    let e = one.expose_local(8000, Some(other)).await.unwrap_err().to_string();
    assert_eq!(e, format!("invalid port: guest port 8000 is already exposed on host port {host}; close it first to expose it on {other}"));
    // Its host port for another guest port: said as this sandbox's own, not as "in use".
    let e = one.expose_local(8001, Some(host)).await.unwrap_err().to_string();
    assert_eq!(
        e,
        format!("invalid port: host port {host} already carries this sandbox's guest port 8000; close that first, or pick another")
    );
    // A connection open when its port closes is cut with it: a closed port carries nothing.
    // (httpd waits for the rest of the request for a minute.)
    let mut open = std::net::TcpStream::connect(("127.0.0.1", host)).unwrap();
    std::io::Write::write_all(&mut open, b"GET / HTTP/1.0\r\n").unwrap();
    one.unexpose_local(8000).await.unwrap();
    open.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let cut = match std::io::Read::read(&mut open, &mut [0u8; 64]) {
        Ok(n) => n == 0,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    };
    assert!(cut, "a connection through the closed port went on");
    assert!(one.ports().unwrap().is_empty());
    assert!(!http_ok(&format!("http://127.0.0.1:{host}/")));
    let again = one.expose_local(8000, None).await.unwrap();
    assert!(http_ok(&format!("http://127.0.0.1:{again}/")));
    // The CLI's form, in JSON: the same port again.
    let out = env.smolvm(&["sandbox", "port", "expose", one.id(), "8000", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(
        (v["ok"].as_bool(), v["data"]["guest"].as_u64(), v["data"]["host"].as_u64()),
        (Some(true), Some(8000), Some(u64::from(again))),
        "{v}"
    );
    // Closed in JSON too, and again by the library.
    let out = env.smolvm(&["sandbox", "port", "close", one.id(), "8000", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!((v["ok"].as_bool(), v["data"]["closed"].as_u64()), (Some(true), Some(8000)), "{v}");
    let again = one.expose_local(8000, Some(again)).await.unwrap();
    // `list --json` shows it, as `info` does (it left the ports out).
    let out = env.smolvm(&["sandbox", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let listed = v["data"].as_array().and_then(|all| all.iter().find(|r| r["id"] == one.id())).cloned().unwrap_or_default();
    assert_eq!(listed["ports"], serde_json::json!([{"guest": 8000, "host": again}]), "{v}");

    // `two` cannot reach `one`, nor a service on the host's own addresses.
    let one_ip = one.run("ifconfig eth0 | sed -n 's/.*inet addr:\\([0-9.]*\\).*/\\1/p'", &opts()).await.unwrap().output().to_string();
    assert!(one_ip.starts_with("172.16."), "{one_ip}");
    let info = one.info().await.unwrap();
    assert_eq!((info["network_mode"].as_str(), info["guest_ip"].as_str()), (Some("nat"), Some(one_ip.as_str())));
    // The host's side is IPv4 only: no IPv6 address on the TAP, so nothing IPv6 into the guest.
    let tap = smolvm::net::tap_name(&env.dirs.data, one.id());
    assert!(link_exists(&tap), "no TAP {tap}");
    let ipv6 = std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6")).unwrap();
    assert_eq!(ipv6, "1\n", "IPv6 is on on {tap}");
    let addrs = Command::new("ip").args(["-6", "addr", "show", "dev", &tap]).output().unwrap();
    assert!(addrs.status.success(), "ip -6 addr show dev {tap}: {}", stderr(&addrs));
    assert!(!stdout(&addrs).contains("inet6"), "{tap} has IPv6 addresses: {}", stdout(&addrs));
    assert_eq!(two.run(&fetch(&format!("http://{one_ip}:8000/")), &opts()).await.unwrap().stdout, "FAILED\n");
    let port = free_port();
    let served = env.tmp.path().join("served");
    std::fs::create_dir(&served).unwrap();
    let mut host_server = KillOnDrop(
        Command::new("python3")
            .args(["-c", HTTP_SERVER, "0.0.0.0", &port.to_string()])
            .arg(&served)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Listening before the probes, so that their failure is the firewall's doing (and ours,
    // not some other process's that took the port first).
    let listening = wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() || host_server.0.try_wait().unwrap().is_some()
    });
    assert!(listening && host_server.0.try_wait().unwrap().is_none(), "the host's test server never listened on {port}");
    let gw = two.run("route -n | awk '$1==\"0.0.0.0\"{print $2}'", &opts()).await.unwrap().output().to_string();
    let mut targets = vec![gw];
    targets.extend(smolvm::net::host_addresses().into_iter().filter(|a| !a.is_loopback()).map(|a| a.to_string()));
    for t in targets {
        assert_eq!(two.run(&fetch(&format!("http://{t}:{port}/")), &opts()).await.unwrap().stdout, "FAILED\n", "reached the host at {t}");
    }
    drop(host_server);
    one.delete().await.unwrap();
    two.delete().await.unwrap();
    no_smolvm_network_left();
}

#[test]
fn nothing_is_left_after_kill_9_and_prune_or_a_failed_start() {
    let _serial = serial();
    let env = env();
    let mut child = env.cli().args(["run", "sleep 300"]).spawn().unwrap();
    assert!(wait_until(Duration::from_secs(60), || !env.own_tables().is_empty() && !env.qemu_processes().is_empty()));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(env.smolvm(&["sandbox", "prune"]).status.success());
    assert!(wait_until(Duration::from_secs(5), || env.qemu_processes().is_empty()));
    no_smolvm_network_left();
    // A named sandbox's supervisor killed leaves its firewall table, which a prune run with
    // cron's PATH (no /usr/sbin, so no `nft` to find) removes all the same.
    let name = format!("k9-{}", std::process::id());
    assert!(env.smolvm(&["sandbox", "create", "--name", &name]).status.success());
    let supervisor = processes_mentioning("__supervise", &name).into_iter().next().expect("its supervisor");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(supervisor), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(wait_until(Duration::from_secs(5), || env.qemu_processes().is_empty()));
    let out = env.cli().args(["sandbox", "prune"]).env("PATH", "/usr/bin:/bin").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    no_smolvm_network_left();
    // A start that fails after the network was set up (a guest that never answers).
    let mut c = smolvm::cpio::Cpio::default();
    c.dir("dev", 0o755);
    c.file("init", 0o755, b"#!/nonexistent\n");
    let initrd = env.tmp.path().join("broken.cpio");
    std::fs::write(&initrd, c.finish()).unwrap();
    let out = env.smolvm(&["run", "--boot-timeout", "4", "--initrd", initrd.to_str().unwrap(), "true"]);
    assert_eq!(out.status.code(), Some(1));
    no_smolvm_network_left();
    let bad = env.smolvm(&["run", "--allow-cidr", "169.254.169.254/32", "true"]);
    assert!(stderr(&bad).contains("link-local/metadata addresses (169.254.0.0/16), which can never be allowed"), "{}", stderr(&bad));
    let bad = env.smolvm(&["run", "--network", "bogus", "true"]);
    assert!(stderr(&bad).contains("invalid network: \"bogus\" is not a network mode (allowed: nat, user, none)"), "{}", stderr(&bad));
    // What a sandbox without a network cannot have is refused at once, by name.
    for (args, message) in [
        (vec!["--network", "none", "-p", "8080:80"], "invalid port_forwards: this sandbox has no network (network 'none')"),
        (
            vec!["--network", "none", "--allow-domain", "example.com"],
            "invalid internet_settings: 'restricted' needs network 'nat' (network 'none' has no network to restrict)",
        ),
    ] {
        let out = env.cli().args(["sandbox", "create", "--no-start"]).args(&args).output().unwrap();
        assert_eq!((out.status.code(), stderr(&out).lines().next().unwrap_or_default()), (Some(1), format!("error: {message}").as_str()));
    }
    let out = env.cli().args(["run", "true"]).env("SMOLVM_DNS_UPSTREAM", "198.51.100.2").output().unwrap();
    assert!(
        stderr(&out).starts_with("error: invalid SMOLVM_DNS_UPSTREAM: \"198.51.100.2\" is not an IPv4 address and port"),
        "{}",
        stderr(&out)
    );
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
}

/// A sandbox's exposed host port is free once its stop (or delete) returns: another sandbox
/// or program may take it next. In user mode QEMU holds the port itself, and a killed QEMU lets
/// go of it only once its memory is freed: longer the more the guest used.
#[test]
fn a_stopped_sandboxs_host_port_is_free_when_the_stop_returns() {
    let _serial = serial();
    let env = env();
    for network in ["nat", "user"] {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let publish = format!("{port}:80");
        let out = env.smolvm(&["sandbox", "create", "--name", "portfree", "--network", network, "--memory", "1024", "-p", &publish]);
        assert!(out.status.success(), "{network}: {}", stderr(&out));
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err(), "{network}: the sandbox does not hold its port");
        let guest_ip = || {
            let out = env.smolvm(&["sandbox", "info", "portfree", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            v["data"]["guest_ip"].as_str().map(String::from)
        };
        let first_ip = guest_ip();
        assert_eq!(first_ip.is_some(), network == "nat", "{first_ip:?}");
        let fill = ["sandbox", "exec", "portfree", "--", "sh", "-c", "dd if=/dev/zero of=/dev/shm/fill bs=1M count=400 2>/dev/null"];
        for step in [
            fill.to_vec(),
            vec!["sandbox", "stop", "portfree"],
            vec!["sandbox", "start", "portfree"],
            fill.to_vec(),
            vec!["sandbox", "delete", "--force", "portfree"],
        ] {
            let out = env.smolvm(&step);
            assert!(out.status.success(), "{network} {step:?}: {}", stderr(&out));
            if ["stop", "delete"].contains(&step[1]) {
                assert!(
                    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
                    "{network} {step:?} returned with port {port} still taken"
                );
            }
            // Restarted at once, while the old supervisor is still exiting, it keeps its address.
            if step[1] == "start" {
                assert_eq!(guest_ip(), first_ip, "{network}: the restart moved the sandbox");
            }
        }
    }
    // A host port that is taken is the field's error in both modes (in user mode QEMU's own
    // failure to listen was a boot error, after a warm and a cold try), and leaves nothing.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    for network in ["nat", "user"] {
        let publish = format!("{port}:80");
        let out = env.smolvm(&["sandbox", "create", "--name", "taken", "--network", network, "-p", &publish]);
        assert_eq!(
            (out.status.code(), stderr(&out).lines().last().unwrap_or_default()),
            (
                Some(1),
                format!("error: invalid port_forwards: cannot listen on 127.0.0.1:{port}: Address already in use (os error 98)").as_str()
            ),
            "{network}"
        );
        assert!(!stderr(&out).contains("booting cold"), "{network}: {}", stderr(&out));
    }
    assert!(env.leftover_files().is_empty(), "{:?}", env.leftover_files());
    assert!(env.qemu_processes().is_empty());
}

#[tokio::test]
async fn user_mode_networking_and_none() {
    let _serial = serial();
    let env = env();
    let lab = Lab::new(&env);
    let mut user = env
        .boot(VmConfig { network: Some("user".into()), port_forwards: vec![PortForward { guest: 8000, host: None }], ..Default::default() })
        .await;
    assert_eq!(
        user.run(&fetch(&format!("http://{}:8080/", lab.hosts[0])), &opts()).await.unwrap().stdout,
        "hello from the test internet\n"
    );
    user.run("mkdir -p /srv && echo user-mode > /srv/index.html && (httpd -p 8000 -h /srv &)", &opts()).await.unwrap();
    let (_, host) = user.ports().unwrap()[0];
    assert!(wait_until(Duration::from_secs(10), || sh(&format!(
        "python3 -c \"import urllib.request as u; assert b'user-mode' in u.urlopen('http://127.0.0.1:{host}/').read()\""
    ))));
    // Closed, QEMU forwards it no more; exposed again, it does.
    user.unexpose_local(8000).await.unwrap();
    assert!(user.ports().unwrap().is_empty());
    assert!(!http_ok(&format!("http://127.0.0.1:{host}/")));
    let again = user.expose_local(8000, None).await.unwrap();
    assert!(http_ok(&format!("http://127.0.0.1:{again}/")));
    assert_eq!(user.info().await.unwrap()["network_mode"], "user");
    // Fixed by its config, the mode is said while it is stopped too (it was "unset").
    user.stop(Duration::from_secs(3)).await.unwrap();
    assert_eq!(user.info().await.unwrap()["network_mode"], "user");
    let none = env.boot(VmConfig { network: Some("none".into()), ..Default::default() }).await;
    assert_eq!(none.run(&fetch(&format!("http://{}:8080/", lab.hosts[0])), &opts()).await.unwrap().stdout, "FAILED\n");
    assert!(none.expose_local(80, None).await.unwrap_err().to_string().contains("no network"));
    user.delete().await.unwrap();
    none.delete().await.unwrap();
}

#[test]
fn a_sandbox_table_is_deleted_over_netlink_and_a_missing_one_is_no_error() {
    let _serial = serial();
    let table = format!("smolvm_test{}", std::process::id());
    let _drop_table = DropTable(table.clone());
    assert!(sh(&format!("nft add table inet {table} && nft add chain inet {table} c")));
    let listed = || nft_has_table(&table);
    assert!(listed());
    smolvm::net::nft_remove(&table).unwrap();
    assert!(!listed(), "the table is still there once nft_remove returned");
    smolvm::net::nft_remove(&table).unwrap();
    // A name the kernel refuses is an error that names the table, not a silent success.
    let err = smolvm::net::nft_remove(&"x".repeat(300)).unwrap_err().full_message();
    assert!(err.contains("deleting table xxx"), "{err}");
}

/// A booted (not restored) sandbox brings eth0 up from `smolvm_net=` on the kernel command line
/// (its greeting carries no network settings).
#[tokio::test]
async fn a_cold_boot_configures_the_network_from_the_kernel_command_line() {
    let _serial = serial();
    let env = env();
    let lab = Lab::new(&env);
    // Extra boot arguments rule out the warm snapshot: this sandbox boots.
    let sb = env.boot(VmConfig { boot_args: Some("smolvm_test=cold".into()), ..Default::default() }).await;
    let cmdline = sb.run("cat /proc/cmdline", &opts()).await.unwrap().stdout;
    let net = cmdline.split_whitespace().find_map(|w| w.strip_prefix("smolvm_net=")).unwrap_or_else(|| panic!("no smolvm_net: {cmdline}"));
    let (addr, rest) = net.split_once(',').unwrap();
    let (gateway, dns) = rest.split_once(',').unwrap();
    let shown = sb.run("ip -o -4 addr show eth0; ip route; cat /etc/resolv.conf", &opts()).await.unwrap().stdout;
    assert!(shown.contains(&format!("inet {addr} ")), "{net}: {shown}");
    assert!(shown.contains(&format!("default via {gateway} dev eth0")), "{net}: {shown}");
    assert!(shown.contains(&format!("nameserver {dns}")), "{net}: {shown}");
    assert_eq!(sb.run(&fetch(&format!("http://{}:8080/", lab.hosts[0])), &opts()).await.unwrap().stdout, "hello from the test internet\n");
    sb.delete().await.unwrap();
    no_smolvm_network_left();
}

/// Sends one UDP datagram to each of `argv[2]` ports of `argv[1]`, from one socket: each is a
/// connection of its own to the host's connection tracking.
const UDP_SPRAY: &str = r#"
#include <arpa/inet.h>
#include <stdlib.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_DGRAM, 0), n = argc > 2 ? atoi(argv[2]) : 0, sent = 0;
    struct sockaddr_in a = { .sin_family = AF_INET };
    if (s < 0 || argc < 3 || inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) return 2;
    for (int i = 0; i < n; i++) {
        a.sin_port = htons(10000 + i);
        if (sendto(s, "x", 1, 0, (struct sockaddr *)&a, sizeof a) == 1) sent++;
    }
    return sent == n ? 0 : 1;
}
"#;

/// One sandbox holds at most `CONNECTION_LIMIT` entries of the host's connection tracking table,
/// which the whole host shares: a guest sending to many ports filled it at 17 000 a second.
#[tokio::test]
async fn a_sandbox_cannot_fill_the_hosts_connection_table() {
    let _serial = serial();
    let env = env();
    let lab = Lab::new(&env);
    let sb = boot_with(&env, None).await;
    let spray = env.guest_program("spray", UDP_SPRAY);
    sb.upload(&spray, "/tmp/spray").await.unwrap();
    let r = sb.run(&format!("chmod +x /tmp/spray && /tmp/spray {} 6000", lab.hosts[1]), &opts()).await.unwrap();
    assert!(r.ok(), "{r:?}");
    let guest = sb.info().await.unwrap()["guest_ip"].as_str().unwrap().to_string();
    let table = std::fs::read_to_string("/proc/net/nf_conntrack").unwrap();
    let (from, to) = (format!(" src={guest} "), format!(" dst={} ", lab.hosts[1]));
    let tracked = table.lines().filter(|l| l.contains(" udp ") && l.contains(&from) && l.contains(&to)).count();
    let limit = smolvm::net::CONNECTION_LIMIT as usize;
    assert!(tracked > limit - 100 && tracked <= limit, "{tracked} of the sandbox's 6000 datagrams are tracked (limit {limit})");
    // ARP on its link answers for its gateway only, not for the host's other addresses (the
    // lab's side of its veth here), which it used to reveal.
    let gateway = guest.rsplit_once('.').map(|(net, last)| format!("{net}.{}", last.parse::<u8>().unwrap() - 1)).unwrap();
    let lab_side = lab.hosts[1].rsplit_once('.').map(|(net, _)| format!("{net}.5")).unwrap();
    let arping = |ip: &str| format!("arping -f -c 2 -w 2 -I eth0 {ip} >/dev/null && echo answered || echo silent");
    let r = sb.run(&format!("{}; {}", arping(&gateway), arping(&lab_side)), &opts()).await.unwrap();
    assert_eq!(r.stdout, "answered\nsilent\n", "{r:?}");
    sb.delete().await.unwrap();
    no_smolvm_network_left();
}

/// Copies of the binary, kernel and initramfs that `nobody` can read, in a home of its own.
struct Nobody {
    home: tempfile::TempDir,
    bin: std::path::PathBuf,
    kernel: String,
    initrd: String,
}

impl Nobody {
    fn new(env: &TestEnv) -> Nobody {
        assert!(Command::new("setpriv").arg("--version").output().is_ok_and(|o| o.status.success()), "no setpriv (util-linux) here");
        let img = smolvm::image::resolve(&VmConfig::default(), &env.dirs, &|_| {}).unwrap();
        let home = tempfile::Builder::new().prefix("svt-user").tempdir_in("/tmp").unwrap();
        let (bin, kernel, initrd) = (home.path().join("smolvm"), home.path().join("vmlinux"), home.path().join("initrd.cpio"));
        std::fs::copy(env!("CARGO_BIN_EXE_smolvm"), &bin).unwrap();
        std::fs::copy(&img.kernel, &kernel).unwrap();
        std::fs::copy(img.initrd.as_ref().unwrap(), &initrd).unwrap();
        assert!(Command::new("chown").args(["-R", "65534:65534"]).arg(home.path()).status().unwrap().success());
        let (kernel, initrd) = (kernel.to_str().unwrap().to_string(), initrd.to_str().unwrap().to_string());
        Nobody { home, bin, kernel, initrd }
    }

    /// `smolvm` as nobody, with an empty environment but for PATH.
    fn command(&self) -> Command {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&self.bin)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin");
        c
    }

    fn boot(&self) -> [&str; 4] {
        ["--kernel", self.kernel.as_str(), "--initrd", self.initrd.as_str()]
    }

    /// Processes of this user's sandboxes: QEMU, the helper, slirp4netns.
    fn processes(&self) -> Vec<i32> {
        let mut all = processes_mentioning("qemu-system", &self.home.path().to_string_lossy());
        all.extend(processes_mentioning(&self.bin.to_string_lossy(), "__host-side"));
        all.extend(
            processes_mentioning("slirp4netns", "--disable-host-loopback")
                .into_iter()
                .filter(|p| std::fs::metadata(format!("/proc/{p}")).is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 65534)),
        );
        all
    }
}

/// A test that fails half way must not leave this user's VMs and helpers running.
impl Drop for Nobody {
    fn drop(&mut self) {
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// `/dev/net/tun` at a mode of the test's for as long as this lives: 0666 as Debian and Ubuntu
/// give it, or 0600 as this test host keeps it (which leaves a user without root on user-mode
/// networking), whichever host the suite runs on.
struct TunMode(u32);

impl TunMode {
    fn set(mode: u32) -> TunMode {
        use std::os::unix::fs::PermissionsExt;
        let was = std::fs::metadata("/dev/net/tun").unwrap().permissions().mode() & 0o7777;
        std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(mode)).unwrap();
        TunMode(was)
    }
}

impl Drop for TunMode {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(self.0));
    }
}

/// A user without root who cannot open /dev/net/tun (no TAP; and no /dev/kvm here) still gets
/// sandboxes: over user-mode networking, with its published ports, state in its own home, and
/// clear refusals of what needs more.
#[test]
fn a_user_without_root_gets_sandboxes_over_user_mode_networking() {
    let _serial = serial();
    let _tun = TunMode::set(0o600);
    let env = env();
    let user = Nobody::new(&env);
    let (home, boot) = (&user.home, user.boot());
    let nobody = || user.command();
    let as_nobody = |args: &[&str]| nobody().args(args).env("HOME", home.path()).output().unwrap();
    let out = as_nobody(&[&["run"][..], &boot, &["id -u; ip -4 addr show eth0 | grep -o 'inet [0-9./]*'"]].concat());
    assert_eq!((stdout(&out).as_str(), out.status.code()), ("0\ninet 10.0.2.15/24\n", Some(0)), "{}", stderr(&out));
    let out = as_nobody(&["doctor"]);
    let no_tun = "this user cannot open /dev/net/tun (Permission denied (os error 13); its usual mode is 0666)";
    assert!(stdout(&out).contains(&format!("user-mode networking only: {no_tun}")), "{}", stdout(&out));
    // A /dev/kvm this user may not open is named with why and whose it is.
    let kvm = std::fs::metadata("/dev/kvm").ok();
    if kvm.is_some_and(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o006 == 0)
        && !std::path::Path::new("/.dockerenv").exists()
    {
        let said = "/dev/kvm cannot be opened for reading and writing (Permission denied (os error 13); it belongs to group ";
        assert!(stdout(&out).contains(said), "{}", stdout(&out));
    }
    let out = as_nobody(&[&["sandbox", "create", "--name", "n", "--network", "nat"][..], &boot].concat());
    assert_eq!(stderr(&out), format!("error: invalid network: nat is not available here: {no_tun} (use 'user')\n"));
    // Without HOME the data directory is under the account's own home, not someone else's.
    // (Where the account has a passwd entry, as Debian's nobody does.)
    if let Some(passwd_home) = nix::unistd::User::from_uid(65534.into()).ok().flatten().map(|u| u.dir) {
        let out = nobody().args(["sandbox", "list"]).output().unwrap();
        let said = format!("{} {}", stdout(&out), stderr(&out));
        assert!(!said.contains("/root/"), "{said}");
        if !passwd_home.join(".local/state/smolvm").exists() {
            assert!(stderr(&out).contains(&format!("{}/.local/state/smolvm", passwd_home.display())), "{said}");
        }
    }
    // What this user cannot read is named up front, not left to QEMU.
    let private = home.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mount = format!("{}:/mnt/p", private.display());
    let out = as_nobody(&[&["run", "--mount", mount.as_str()][..], &boot, &["true"]].concat());
    assert_eq!(
        stderr(&out),
        format!("error: invalid mounts: {} cannot be read by this user: Permission denied (os error 13)\n", private.display())
    );
    let key = format!("{}/key.pub", private.display());
    let out = as_nobody(&[&["sandbox", "create", "--name", "k", "--ssh-key", key.as_str()][..], &boot].concat());
    assert!(stderr(&out).starts_with(&format!("error: reading the --ssh-key file {key}: Permission denied")), "{}", stderr(&out));
    // A long-lived one, with a published port.
    let out = as_nobody(&[&["sandbox", "create", "--name", "u", "-p", "8080"][..], &boot].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let out = as_nobody(&["sandbox", "exec", "u", "--", "mkdir -p /srv && echo from-nobody > /srv/i && (httpd -p 8080 -h /srv &)"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = as_nobody(&["sandbox", "port", "list", "u", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let port = v["data"][0]["host"].as_u64().unwrap_or_else(|| panic!("{v}"));
    let got = wait_until(Duration::from_secs(10), || http_get(port as u16, "/i").is_some_and(|b| b.contains("from-nobody")));
    assert!(got, "the published port did not answer");
    // A host port that is taken is named as such (QEMU's own words said only that the rule
    // could not be set up).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let spec = format!("{}:9000", taken.local_addr().unwrap().port());
    let out = as_nobody(&["sandbox", "port", "expose", "u", &spec]);
    assert_eq!(
        stderr(&out),
        format!(
            "error: invalid port: cannot listen on 127.0.0.1:{}: Address already in use (os error 98)\n",
            taken.local_addr().unwrap().port()
        )
    );
    drop(taken);
    let vmm = processes_mentioning("qemu-system", &home.path().to_string_lossy());
    assert_eq!(vmm.len(), 1);
    let owner = std::fs::metadata(format!("/proc/{}", vmm[0])).map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap();
    assert_eq!(owner, 65534, "QEMU runs as the user");
    assert!(as_nobody(&["sandbox", "delete", "u", "--force"]).status.success());
    assert!(wait_until(Duration::from_secs(5), || processes_mentioning("qemu-system", &home.path().to_string_lossy()).is_empty()));
    let vms = home.path().join(".local/state/smolvm/vms");
    assert_eq!(std::fs::read_dir(&vms).unwrap().count(), 0, "files left in {}", vms.display());
    // A data directory both could use is refused by both: every user may write to it (so may
    // put a state.db of their own there), and to the one who did not make it, it belongs to
    // another user. Neither writes env values into it.
    let shared = tempfile::Builder::new().prefix("svt-shared").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(shared.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let root_cli = |args: &[&str]| env.cli().env("SMOLVM_DATA_DIR", shared.path()).args(args).output().unwrap();
    let out = root_cli(&["sandbox", "create", "--name", "theirs", "--network", "none"]);
    assert!(!out.status.success());
    let said =
        format!("error: host: the data directory {} can be written by every user (mode 777): it keeps env values", shared.path().display());
    assert!(stderr(&out).starts_with(&said), "{}", stderr(&out));
    std::fs::set_permissions(shared.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = nobody().env("HOME", home.path()).env("SMOLVM_DATA_DIR", shared.path()).args(["sandbox", "list"]).output().unwrap();
    assert!(!out.status.success());
    let said = format!("error: host: the data directory {} belongs to another user (uid 0)", shared.path().display());
    assert!(stderr(&out).starts_with(&said), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(shared.path()).unwrap().count(), 0, "a refused data directory was written to");
}

/// A user without root who can open /dev/net/tun (its usual mode) gets NAT: in a user and
/// network namespace of the sandbox's own, with slirp4netns as its way out. It then has what
/// root's sandboxes have: no way to the host's loopback or addresses or to metadata services,
/// allow-lists, exposed ports on the host's 127.0.0.1; and nothing stays when it goes.
#[test]
fn a_user_without_root_gets_nat_in_a_namespace_of_its_own() {
    let _serial = serial();
    let env = env();
    // (The prerequisites install slirp4netns.)
    assert!(Command::new("slirp4netns").arg("--version").output().is_ok_and(|o| o.status.success()), "no slirp4netns here");
    let user = Nobody::new(&env);
    let _tun = TunMode::set(0o666);
    let lab = Lab::new(&env);
    let run_as =
        |args: &[&str]| user.command().env("HOME", user.home.path()).env("SMOLVM_DNS_UPSTREAM", lab.dns()).args(args).output().unwrap();
    let out = run_as(&["doctor"]);
    assert!(stdout(&out).contains("NAT networking in a namespace of each sandbox's own"), "{}", stdout(&out));
    // A slirp4netns that fails: a sandbox that did not ask for NAT gets user-mode networking
    // (the supervisor had not left the host's namespaces yet), one that asked fails and says why.
    let fake = user.home.path().join("fake");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(fake.join("slirp4netns"), "#!/bin/sh\necho 'cannot do it today' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(fake.join("slirp4netns"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", fake.display());
    let with_fake = |args: &[&str]| user.command().env("HOME", user.home.path()).env("PATH", &path).args(args).output().unwrap();
    let out = with_fake(&[&["run"][..], &user.boot(), &["ip -4 addr show eth0 | grep -o 'inet [0-9./]*'"]].concat());
    assert_eq!(stdout(&out), "inet 10.0.2.15/24\n", "{}", stderr(&out));
    let out = with_fake(&[&["run", "--network", "nat"][..], &user.boot(), &["true"]].concat());
    assert_eq!(
        stderr(&out).lines().next(),
        Some("error: network: NAT networking without root: slirp4netns: exit status: 1: cannot do it today"),
        "{}",
        stderr(&out)
    );
    assert!(wait_until(Duration::from_secs(5), || user.processes().is_empty()), "left: {:?}", user.processes());
    // What the host serves on its loopback and on all its addresses (the lab's gateways are
    // some of them): each says "reached" to whoever connects.
    let serve = || {
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let _ = std::io::Write::write_all(&mut &c, b"reached\n");
            }
        });
        port
    };
    let port = serve();
    assert_eq!(std::io::read_to_string(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).unwrap(), "reached\n");
    // The host's ends of the lab's two links.
    let net = lab.hosts[0].rsplit_once('.').unwrap().0;
    let (gw0, gw1) = (format!("{net}.1"), format!("{net}.5"));
    let reach = |ip: &str| format!("out=$(nc -w 2 {ip} {port} </dev/null 2>/dev/null); echo {ip}:${{out:-shut}}");
    let script = [
        "ip -4 addr show eth0 | grep -q 'inet 172\\.16\\.[0-9.]*/30' && echo nat".to_string(),
        fetch(&format!("http://{}:8080/", lab.hosts[0])),
        reach("10.0.2.2"),
        reach(&gw0),
        reach(&gw1),
    ]
    .join("; ");
    let out = run_as(&[&["run"][..], &user.boot(), &[script.as_str()]].concat());
    assert_eq!(stdout(&out), format!("nat\nhello from the test internet\n10.0.2.2:shut\n{gw0}:shut\n{gw1}:shut\n"), "{}", stderr(&out));
    // An allow-list, through the DNS proxy, whose upstream is reached from the host's side.
    let script = [fetch("http://allowed.test:8080/"), fetch("http://blocked.test:8080/")].join("; ");
    let out = run_as(&[&["run", "--allow-domain", "allowed.test"][..], &user.boot(), &[script.as_str()]].concat());
    assert_eq!(stdout(&out), "hello from the test internet\nFAILED\n", "{}", stderr(&out));
    // A long-lived one: its published and exposed ports are the host's.
    let out = run_as(&[&["sandbox", "create", "--name", "r", "-p", "8080"][..], &user.boot()].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_as(&[
        "sandbox",
        "exec",
        "r",
        "--",
        "mkdir -p /srv && echo from-a-namespace > /srv/i && (httpd -p 8080 -h /srv &) && (httpd -p 8081 -h /srv &)",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_as(&["sandbox", "port", "expose", "r", "8081"]);
    let exposed: u16 = stdout(&out).trim().parse().unwrap_or_else(|_| panic!("{}", stderr(&out)));
    let out = run_as(&["sandbox", "port", "list", "r", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let published = v["data"].as_array().unwrap().iter().find(|p| p["guest"] == 8080).unwrap()["host"].as_u64().unwrap() as u16;
    for port in [published, exposed] {
        let got = wait_until(Duration::from_secs(10), || http_get(port, "/i").is_some_and(|b| b.contains("from-a-namespace")));
        assert!(got, "host port {port} did not answer");
    }
    // What the host starts delivering to itself while the sandbox runs is out of its reach
    // too, soon after: here a whole range routed `local` (AnyIP), on no interface.
    let (range, late) = (format!("{net}.64/26"), format!("{net}.70"));
    struct LocalRoute(String);
    impl Drop for LocalRoute {
        fn drop(&mut self) {
            sh(&format!("ip route del local {} dev lo", self.0));
        }
    }
    assert!(sh(&format!("ip route add local {range} dev lo")));
    let _late = LocalRoute(range.clone());
    assert_eq!(std::io::read_to_string(std::net::TcpStream::connect((late.as_str(), port)).unwrap()).unwrap(), "reached\n");
    let shut = || stdout(&run_as(&["sandbox", "exec", "r", "--", &reach(&late)])) == format!("{late}:shut\n");
    assert!(wait_until(Duration::from_secs(20), shut), "the sandbox still reaches {late}");
    assert!(user.processes().len() >= 3, "{:?}", user.processes());
    // Its supervisor killed: QEMU, the helper and slirp4netns all go, and the next command
    // sees the sandbox as dead.
    let supervisor = processes_mentioning("__supervise", "r")
        .into_iter()
        .find(|p| std::fs::metadata(format!("/proc/{p}")).is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 65534));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(supervisor.expect("its supervisor")), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(wait_until(Duration::from_secs(10), || user.processes().is_empty()), "left: {:?}", user.processes());
    assert!(run_as(&["sandbox", "prune"]).status.success());
    let vms = user.home.path().join(".local/state/smolvm/vms");
    assert_eq!(std::fs::read_dir(&vms).unwrap().count(), 0, "files left in {}", vms.display());
    no_smolvm_network_left();
}
