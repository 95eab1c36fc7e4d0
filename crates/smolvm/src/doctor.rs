//! What works on this host and, where something does not, what to do about it.

use crate::config::Dirs;
use serde::Serialize;
use std::path::Path;
use std::process::Command;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    /// ok | warn | fail: `fail` means sandboxes cannot start; `warn` means they start, slower or
    /// with less (no KVM, user networking instead of NAT, no root disks).
    pub status: &'static str,
    pub detail: String,
    pub fix: Option<String>,
}

fn check(name: &'static str, status: &'static str, detail: impl Into<String>, fix: Option<&str>) -> Check {
    Check { name, status, detail: detail.into(), fix: fix.map(String::from) }
}

fn version_of(bin: &str, arg: &str) -> Option<String> {
    let out = Command::new(bin).arg(arg).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_string)
}

/// The tables (`family name`) of `nft list ruleset` other than smolvm's whose forward hook
/// drops by default.
fn forward_droppers(ruleset: &str) -> Vec<String> {
    let mut table = String::new();
    let mut found = Vec::new();
    for line in ruleset.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("table ") {
            table = rest.trim_end_matches('{').trim().to_string();
        } else if line.contains("hook forward") && line.contains("policy drop") && !table.contains(" smolvm_") && !found.contains(&table) {
            found.push(table.clone());
        }
    }
    found
}

/// What would let KVM run here, for the reason `kvm_usable` gave that it cannot.
fn way_to_kvm(why: &str) -> String {
    // (The udev rule's first, as it ends with joining the group; the group's before the
    // container's, as it may name a container too.)
    if why.contains("udev rule") {
        "give /dev/kvm to group kvm with mode 0660 (a udev rule), join group kvm (sudo usermod -aG kvm $USER), then log in again".into()
    } else if let Some(group) = why.split("add yourself to group ").nth(1) {
        let group: String = group.chars().take_while(|c| !matches!(c, ',' | ')')).collect();
        let container = if why.contains("--group-add") { format!(" (in a container, --group-add {group})") } else { String::new() };
        format!("sudo usermod -aG {group} $USER, then log in again{container}")
    } else if why.contains("container") {
        "run the container with the host's /dev/kvm (docker run --device /dev/kvm, podman run --device /dev/kvm)".into()
    } else if why.contains("another hypervisor") {
        "quit VirtualBox or VMware (or unload their kernel modules) to free the CPU's virtualisation for KVM".into()
    } else {
        "on bare metal, turn on virtualisation (VT-x or AMD-V) in the firmware and load kvm_intel or kvm_amd".into()
    }
}

pub fn run(dirs: &Dirs) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(match crate::vmm::choose_accel() {
        Ok(crate::vmm::Accel::Kvm) => check("accelerator", "ok", "KVM", None),
        Ok(crate::vmm::Accel::Tcg) => {
            // Asked for, it is the reason, whatever KVM could do.
            let asked = crate::vmm::requested_accel() == Ok(Some(crate::vmm::Accel::Tcg));
            let why = match crate::vmm::kvm_usable() {
                Err(why) if !asked => why,
                _ => "SMOLVM_ACCEL=tcg".to_string(),
            };
            let fix = match asked {
                true => "sandboxes work, slower; unset SMOLVM_ACCEL to use KVM where it can run a guest".to_string(),
                false => format!("sandboxes work, slower; {}", way_to_kvm(&why)),
            };
            check("accelerator", "warn", format!("TCG software emulation: {why}"), Some(&fix))
        }
        Err(e) => {
            // A value that is none of the allowed ones, as a command would refuse it.
            let e = crate::config::accel_setting().err().map(|bad| bad.to_string()).unwrap_or(e);
            // KVM asked for and not usable: the way back to TCG, and to KVM for that reason.
            let for_kvm = crate::vmm::kvm_usable().err().map(|why| format!("; for KVM, {}", way_to_kvm(&why))).unwrap_or_default();
            check(
                "accelerator",
                "fail",
                e,
                Some(&format!("unset SMOLVM_ACCEL (or set it to tcg): auto uses KVM where it can run a guest, else TCG{for_kvm}")),
            )
        }
    });
    checks.push(match crate::config::Backend::resolve(None) {
        Ok(_) => check("backend", "ok", "qemu", None),
        Err(e) => check("backend", "fail", e.to_string(), Some("unset SMOLVM_BACKEND (or set it to qemu or auto)")),
    });
    checks.push(match version_of(crate::vmm::qemu::QEMU_BINARY, "--version") {
        Some(v) => check("qemu", "ok", v, None),
        None => check("qemu", "fail", "qemu-system-x86_64 not found", Some("smolvm setup (apt install qemu-system-x86)")),
    });
    checks.push(match (crate::image::debian_kernel_asked(), crate::image::kernel_source()) {
        (Err(e), _) => check("kernel", "fail", e.to_string(), Some("unset SMOLVM_KERNEL (or set it to debian or auto)")),
        (Ok(true), _) => check("kernel", "ok", "Debian's prebuilt cloud kernel (SMOLVM_KERNEL=debian), fetched once", None),
        (Ok(false), Some(src)) => {
            let cached = crate::image::kernel_fingerprint(&src)
                .ok()
                .map(|fp| dirs.images.join(format!("kernel-{fp}/vmlinux")))
                .filter(|p| p.exists());
            match cached {
                Some(p) => check("kernel", "ok", format!("built: {}", p.display()), None),
                None => check("kernel", "ok", format!("will be built once from {}", src.display()), None),
            }
        }
        (Ok(false), None) => check(
            "kernel",
            "fail",
            "no linux-source tarball to build the guest kernel from",
            Some("smolvm setup (apt install linux-source-6.1), or pass kernel_path"),
        ),
    });
    checks.push(match crate::busybox::prebuilt() {
        Ok(p) => check("busybox", "ok", p.display().to_string(), None),
        Err(e) => check("busybox", "fail", e.to_string(), Some("smolvm setup (apt install busybox-static)")),
    });
    checks.push(match (crate::busybox::built(dirs), crate::busybox::unavailable(dirs)) {
        (Some(bin), _) => check("busybox-musl", "ok", format!("built: {}", bin.display()), None),
        (None, None) => {
            check("busybox-musl", "ok", "guests get a musl busybox built from Debian's source (fetched and built on first use)", None)
        }
        (None, Some(why)) => check(
            "busybox-musl",
            "warn",
            format!("guests get Debian's glibc busybox-static, whose start-up makes a cold guest's first command slower: {why}"),
            Some("smolvm setup, then smolvm image prune"),
        ),
    });
    checks.push(match crate::image::agent_binary() {
        Ok(p) => check("agent", "ok", p.display().to_string(), None),
        Err(e) => check("agent", "fail", e.to_string(), Some("make agent")),
    });
    checks.push(match crate::vmm::qemu::choose_machine(dirs, None) {
        Ok(crate::vmm::qemu::Machine::Microvm) => check("machine", "ok", "microvm", None),
        Ok(crate::vmm::qemu::Machine::Q35) => check(
            "machine",
            "warn",
            "q35: slower to boot than microvm, and sandboxes cannot be snapshotted",
            Some("use a QEMU with the microvm machine (7.0 or later), and leave SMOLVM_MACHINE unset"),
        ),
        Err(e) => check("machine", "fail", e.to_string(), Some("set SMOLVM_MACHINE to microvm, q35 or auto")),
    });
    // Only SMOLVM_AGENT_TRANSPORT=vsock needs the vsock device server.
    let vsock_wanted = crate::config::agent_transport();
    checks.push(match (vsock_wanted, crate::vmm::vsock::daemon_binary()) {
        (Err(e), _) => check("agent-transport", "fail", e.to_string(), Some("set SMOLVM_AGENT_TRANSPORT to serial or vsock")),
        (Ok(crate::config::Transport::Serial), Ok(p)) => {
            check("agent-transport", "ok", format!("virtio-serial; vsock available ({})", p.display()), None)
        }
        (Ok(crate::config::Transport::Serial), Err(_)) => check("agent-transport", "ok", "virtio-serial", None),
        (Ok(crate::config::Transport::Vsock), Ok(p)) => check("agent-transport", "ok", format!("vsock through {}", p.display()), None),
        (Ok(crate::config::Transport::Vsock), Err(e)) => {
            check("agent-transport", "fail", e.to_string(), Some("make prereqs (cargo install vhost-device-vsock)"))
        }
    });
    checks.push(if Path::new("/dev/net/tun").exists() {
        check("tun", "ok", "/dev/net/tun present", None)
    } else {
        check("tun", "warn", "/dev/net/tun missing: no TAP networking", Some("modprobe tun"))
    });
    checks.push(match version_of("nft", "--version") {
        Some(v) => check("nftables", "ok", v, None),
        None => check("nftables", "warn", "nft not found: no NAT networking", Some("smolvm setup (apt install nftables)")),
    });
    // Without root, what only an attempt can tell too: the whole of it (see `rootless`).
    let nat =
        crate::net::nat_available()
            .and_then(|()| if nix::unistd::geteuid().is_root() { Ok(()) } else { crate::rootless::trial_elsewhere() });
    checks.push(match nat {
        Ok(()) if nix::unistd::geteuid().is_root() => check("network", "ok", "NAT networking (TAP + nftables)", None),
        Ok(()) => check("network", "ok", "NAT networking in a namespace of each sandbox's own (slirp4netns, TAP, nftables)", None),
        Err(why) => check(
            "network",
            "warn",
            // Said here, where the choice is made: in user mode the gateway is this host's
            // loopback, and so are its services and other sandboxes' exposed ports.
            format!("user-mode networking only: {why}; sandboxes with internet 'open' reach this host's 127.0.0.1 services as 10.0.2.2"),
            Some(
                "for NAT, isolation and allow-lists: root, or slirp4netns (smolvm setup) and a /dev/net/tun of mode 0666; \
                 or give untrusted code --internet off",
            ),
        ),
    });
    // Another firewall that drops forwarded packets (Docker's and ufw's defaults) drops a NAT
    // sandbox's too: in nftables a drop in any table is final, whatever smolvm's accepts.
    if nix::unistd::geteuid().is_root() && crate::image::on_path("nft") {
        let ruleset = Command::new("nft").args(["list", "ruleset"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        checks.push(match forward_droppers(&ruleset.unwrap_or_default()).as_slice() {
            [] => check("forwarding", "ok", "no other firewall drops forwarded packets", None),
            tables => check(
                "forwarding",
                "warn",
                format!(
                    "nftables table(s) {} drop forwarded packets by default: NAT sandboxes with internet 'open' or 'restricted' get no internet",
                    tables.join(", ")
                ),
                Some(
                    "let smolvm's devices through that firewall: for Docker, iptables -I DOCKER-USER -i smv+ -j ACCEPT and \
                     iptables -I DOCKER-USER -o smv+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT; for ufw, \
                     ufw route allow in on smv+ and ufw route allow out on smv+",
                ),
            ),
        });
    }
    checks.push(match version_of("qemu-img", "--version") {
        Some(v) => check("qemu-img", "ok", v, None),
        None => check("qemu-img", "warn", "qemu-img not found: no root disks (rootfs_path)", Some("smolvm setup (apt install qemu-utils)")),
    });
    checks.push(if std::path::Path::new("/usr/sbin/mkfs.ext4").exists() || std::path::Path::new("/sbin/mkfs.ext4").exists() {
        check("mkfs.ext4", "ok", "e2fsprogs present", None)
    } else {
        check(
            "mkfs.ext4",
            "warn",
            "mkfs.ext4 not found: the default root disk cannot be built",
            Some("smolvm setup (apt install e2fsprogs)"),
        )
    });
    let unprivileged = crate::recipe::unprivileged_build_missing();
    checks.push(if let (true, Some(missing)) = (crate::image::on_path("mmdebstrap"), &unprivileged) {
        check(
            "mmdebstrap",
            "warn",
            format!("as this user, images cannot be built from Debian packages: mmdebstrap needs {missing}"),
            Some("install and set up what it names, or build images as root"),
        )
    } else if crate::image::on_path("mmdebstrap") {
        check("mmdebstrap", "ok", "named images (alpine-ssh, debian-ssh, recipes) can be built", None)
    } else {
        check("mmdebstrap", "warn", "mmdebstrap not found: named images cannot be built", Some("smolvm setup (apt install mmdebstrap)"))
    });
    checks.push(if crate::image::on_path("ssh") && crate::image::on_path("sftp") && crate::image::on_path("ssh-keygen") {
        check("ssh", "ok", "OpenSSH client present (sandbox ssh, comm_channel=ssh)", None)
    } else {
        check("ssh", "warn", "ssh/sftp/ssh-keygen not found: no SSH into sandboxes", Some("smolvm setup (apt install openssh-client)"))
    });
    checks.push(match crate::sandbox::check_data_dir(dirs) {
        Err(e) => check("data_dir", "fail", e.to_string(), Some("set SMOLVM_DATA_DIR to a shorter path")),
        Ok(()) => match writable(&dirs.data) {
            Ok(()) => check("data_dir", "ok", dirs.data.display().to_string(), None),
            Err(e) => check(
                "data_dir",
                "fail",
                format!("{} cannot be written: {e}", dirs.data.display()),
                Some("set SMOLVM_DATA_DIR to a directory this user can write"),
            ),
        },
    });
    checks
}

/// Whether a file can be made in `dir`, or where it would be made if missing (a read-only
/// mount passed the path checks alone, and every command then failed). Nothing stays behind.
fn writable(dir: &std::path::Path) -> std::io::Result<()> {
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(dir);
    let probe = existing.join(format!(".smolvm-doctor-{}", std::process::id()));
    std::fs::OpenOptions::new().write(true).create_new(true).open(&probe)?;
    std::fs::remove_file(&probe)
}

/// Debian packages the host needs, by the command that shows each is there.
pub const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("musl-tools", "/usr/bin/musl-gcc"),
    ("debian-archive-keyring", "/usr/share/keyrings/debian-archive-keyring.gpg"),
    ("patch", "/usr/bin/patch"),
    ("bzip2", "/bin/bzip2"),
    ("linux-source-6.1", "/usr/src/linux-source-6.1.tar.xz"),
    ("make", "/usr/bin/make"),
    ("gcc", "/usr/bin/gcc"),
    ("flex", "/usr/bin/flex"),
    ("bison", "/usr/bin/bison"),
    ("bc", "/usr/bin/bc"),
    ("libelf-dev", "/usr/include/libelf.h"),
    ("libssl-dev", "/usr/include/openssl/ssl.h"),
    ("xz-utils", "/usr/bin/xz"),
    ("cpio", "/usr/bin/cpio"),
    ("nftables", "/usr/sbin/nft"),
    ("e2fsprogs", "/usr/sbin/mkfs.ext4"),
    ("qemu-utils", "/usr/bin/qemu-img"),
    ("mmdebstrap", "/usr/bin/mmdebstrap"),
    ("openssh-client", "/usr/bin/ssh"),
    ("slirp4netns", "/usr/bin/slirp4netns"),
];

pub fn missing_packages() -> Vec<&'static str> {
    PACKAGES.iter().filter(|(_, path)| !Path::new(path).exists()).map(|(p, _)| *p).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn firewalls_that_drop_forwarded_packets_are_named() {
        let ruleset = "table ip filter {
	chain FORWARD {
		type filter hook forward priority filter; policy drop;
		counter packets 0 bytes 0 jump DOCKER-USER
	}
}
table inet smolvm_0123456789 {
	chain forward {
		type filter hook forward priority filter; policy drop;
	}
}
table inet mine {
	chain fw {
		type filter hook forward priority filter; policy accept;
	}
}
";
        assert_eq!(forward_droppers(ruleset), ["ip filter"]);
        assert!(forward_droppers("").is_empty());
    }

    use super::*;

    /// Each reason `kvm_usable` gives gets the fix for it, not the container's for a group's.
    #[test]
    fn each_reason_kvm_is_not_used_gets_its_own_fix() {
        // The reasons as `kvm_access` words them, for a device of root's alone and one of a
        // group's.
        let denied =
            |advice: String| format!("/dev/kvm cannot be opened for reading and writing (Permission denied (os error 13); {advice})");
        let dir = tempfile::tempdir().unwrap();
        let (dev, _) = crate::vmm::fake_kvm_device(dir.path(), 0o600);
        assert!(way_to_kvm(&denied(crate::vmm::kvm_access(&dev))).starts_with("give /dev/kvm to group kvm with mode 0660 (a udev rule)"));
        let (dev, group) = crate::vmm::fake_kvm_device(dir.path(), 0o660);
        let fix = way_to_kvm(&denied(crate::vmm::kvm_access(&dev)));
        assert!(fix.starts_with(&format!("sudo usermod -aG {group} $USER, then log in again")), "{fix}");
        // In a container (as `kvm_access` says there), the group goes to the container too.
        assert_eq!(
            way_to_kvm(&denied(format!(
                "it belongs to group {group}: add yourself to group {group}, and in a container give it that group too (--group-add)"
            ))),
            format!("sudo usermod -aG {group} $USER, then log in again (in a container, --group-add {group})")
        );
        assert!(way_to_kvm("/dev/kvm does not exist in this container (pass the host's device in)").starts_with("run the container with"));
        assert!(way_to_kvm("/dev/kvm is nested PVM virtualisation (kvm_pvm), which cannot run a stock guest kernel")
            .contains("in the firmware and load kvm_intel or kvm_amd"));
    }
}
