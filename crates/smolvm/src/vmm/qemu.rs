//! The QEMU backend: `-M microvm` with the agent on virtio-serial and QMP for control.

use super::Accel;
use crate::error::{Error, IoContext, Result};
use crate::image::BootImage;
use smolvm_proto::AGENT_PORT_NAME;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub image: BootImage,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    pub hostname: String,
    /// The guest's network on the kernel command line (`smolvm_net=`), so that the agent brings
    /// the NIC up while it boots. A restored guest learns it from the greeting instead.
    pub guest_net: Option<smolvm_proto::NetConfig>,
    pub extra_boot_args: Option<String>,
    pub verbose_boot: bool,
    /// QEMU connects here (the supervisor listens first, so the guest never waits for a host).
    pub agent_socket: PathBuf,
    pub qmp_socket: PathBuf,
    pub console_log: PathBuf,
    /// A saved state to load (written by [`Qmp::save_to`]): QEMU waits for it (`-incoming
    /// defer`, CPUs stopped, `-S`), and gets the file open on a descriptor of its own, which
    /// [`Qmp::restore_from_launch`] then names.
    pub incoming: Option<PathBuf>,
    /// Guest RAM in a file instead of anonymous memory (see [`RamFile`]).
    pub ram: Option<RamFile>,
    pub net: NetBackend,
    /// The agent over vsock instead of virtio-serial: the vhost-user socket of the vsock device
    /// (its server, `vhost-device-vsock`, is already listening there). Guest RAM is then shared
    /// memory, which a vhost-user device needs.
    pub vsock: Option<PathBuf>,
    pub machine: Machine,
    /// The host's TSC rate (`vmm::host_tsc_khz`), which a TCG guest is told.
    pub tsc_khz: Option<u64>,
    /// Host directories shared into the guest over 9p, in order: the n-th is tag `smolvm<n>`.
    pub mounts: Vec<SharedDir>,
    /// Whether the kernel command line tells the agent to mount them as it boots. A warm
    /// template's boot has the devices but mounts nothing (a mounted share cannot be saved);
    /// its clones are told after their restore (`Request::Hello`'s `mounts`).
    pub mount_at_boot: bool,
    /// A virtio-balloon device, never inflated: it is there for free page reporting, by which
    /// the guest hands the memory it frees back to the host. Off only to load a state saved by
    /// an earlier build, which had none (a saved VM loads only into the same devices).
    pub balloon: bool,
}

/// A host directory the guest mounts at `guest` (the agent, from the kernel command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDir {
    pub host: PathBuf,
    pub guest: String,
    pub readonly: bool,
}

impl SharedDir {
    /// `smolvm_mounts=`: `tag:guest path in hex:ro|rw`, comma-separated (hex: a guest path may
    /// hold any character but NUL, and the command line splits at spaces).
    pub fn boot_arg(mounts: &[SharedDir]) -> Option<String> {
        let each = SharedDir::shares(mounts).into_iter().map(|s| {
            let hex: String = s.path.bytes().map(|b| format!("{b:02x}")).collect();
            format!("{}:{hex}:{}", s.tag, if s.readonly { "ro" } else { "rw" })
        });
        (!mounts.is_empty()).then(|| format!("smolvm_mounts={}", each.collect::<Vec<_>>().join(",")))
    }

    /// What the guest mounts: a booted one from `boot_arg`, a restored one from its greeting.
    pub fn shares(mounts: &[SharedDir]) -> Vec<smolvm_proto::Share> {
        let each = mounts.iter().enumerate();
        each.map(|(i, m)| smolvm_proto::Share { tag: format!("smolvm{i}"), path: m.guest.clone(), readonly: m.readonly }).collect()
    }
}

/// `info registers -a` (x86): each CPU's instruction pointer if it shows CPUs and every one is
/// stopped for good, else `None`. Stopped: halted (`HLT=1`) with its interrupt flag (bit 9 of
/// the flags) clear, or never started at all, still at the reset vector (`fff0`) with
/// interrupts off: KVM shows a CPU the guest never brought up (`nosmp`, `maxcpus=`) that way,
/// not halted. A CPU outside 64-bit mode shows its flags as `EFL` and its pointer as `EIP`:
/// one the guest never brought up (q35's firmware parks the CPUs our kernel is not told of in
/// 32-bit mode), which stays halted, as it would after `halt -f`.
fn stopped_for_good(info: &str) -> Option<Vec<u64>> {
    let hex = |v: Option<&str>| v.and_then(|v| u64::from_str_radix(v, 16).ok());
    let mut ips = Vec::new();
    for l in info.lines().filter(|l| l.contains("HLT=")) {
        let field = |name: &str| l.split_whitespace().find_map(|w| w.strip_prefix(name));
        let flags = hex(field("RFL=").or_else(|| field("EFL=")))?;
        let ip = hex(field("RIP=").or_else(|| field("EIP=")))?;
        let halted = field("HLT=") == Some("1");
        if flags & 0x200 != 0 || !(halted || ip == 0xfff0) {
            return None;
        }
        ips.push(ip);
    }
    (!ips.is_empty()).then_some(ips)
}

/// The QEMU machine. `microvm` is the default: no firmware, no PCI, devices on virtio-mmio,
/// the fastest boot. `q35` (a PC with PCIe, SeaBIOS, ACPI) serves where microvm cannot: a QEMU
/// built without it, or a guest kernel without virtio-mmio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    Microvm,
    Q35,
}

impl Machine {
    /// The suffix of the virtio devices' names on this machine's bus.
    fn bus(self) -> &'static str {
        match self {
            Machine::Microvm => "device",
            Machine::Q35 => "pci",
        }
    }
}

/// `SMOLVM_MACHINE`: `microvm`, `q35`, or `auto` (default): microvm where this QEMU has it and
/// the guest kernel (`kernel`, when known) can find its devices there.
pub fn choose_machine(dirs: &crate::config::Dirs, kernel: Option<&Path>) -> Result<Machine> {
    match std::env::var("SMOLVM_MACHINE").map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        Ok("microvm") => Ok(Machine::Microvm),
        Ok("q35") => Ok(Machine::Q35),
        Err(_) | Ok("") | Ok("auto") => {
            let mmio = kernel.is_none_or(|k| kernel_has_mmio(dirs, k));
            Ok(if mmio && has_microvm(dirs) { Machine::Microvm } else { Machine::Q35 })
        }
        Ok(other) => Err(Error::validation("SMOLVM_MACHINE", format!("{other:?} is not a machine (allowed: microvm, q35, auto)"))),
    }
}

/// Whether a kernel can find virtio-mmio devices (microvm's only kind). An ELF kernel without
/// the driver's name in it has no such driver built in; a compressed one (a bzImage) cannot be
/// looked into and is taken to have it, as Debian's does (as a module). Our own kernel has it.
fn kernel_has_mmio(dirs: &crate::config::Dirs, kernel: &Path) -> bool {
    if is_our_kernel(kernel) || !kernel_is_elf(kernel) {
        return true;
    }
    // A kernel that cannot be read fails later, with its own message.
    remembered(dirs, "kernel-mmio", kernel, || std::fs::read(kernel).ok().map(|elf| elf_has_mmio(&elf))).unwrap_or(true)
}

/// A yes/no answer about a file (a QEMU binary, a kernel) that takes time to get, kept in the
/// image cache as `<name>-<key>` for that file's path, size and time: a changed file is asked
/// again. `None` when the file or the answer cannot be had; nothing is kept then.
/// The names `remembered` keeps answers under (`image prune` removes them: they are asked again).
pub(crate) const REMEMBERED: [&str; 2] = ["kernel-mmio", "qemu-microvm"];

fn remembered(dirs: &crate::config::Dirs, name: &str, file: &Path, ask: impl FnOnce() -> Option<bool>) -> Option<bool> {
    let meta = std::fs::metadata(file).ok()?;
    let changed = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let key = crate::image::fingerprint(&[file.to_string_lossy().as_bytes(), &meta.len().to_le_bytes(), &changed.to_le_bytes()]);
    let mark = dirs.images.join(format!("{name}-{key}"));
    match std::fs::read_to_string(&mark).as_deref().map(str::trim) {
        Ok("yes") => return Some(true),
        Ok("no") => return Some(false),
        // Anything else (a file another process is writing): ask again.
        _ => {}
    }
    let answer = ask()?;
    let _ = crate::image::write_whole(&mark, if answer { b"yes\n" } else { b"no\n" });
    Some(answer)
}

/// The virtio-mmio driver registers under this name, so a kernel with it built in carries it.
fn elf_has_mmio(elf: &[u8]) -> bool {
    elf.windows(b"virtio-mmio".len()).any(|w| w == b"virtio-mmio")
}

/// On PCI the NIC would bring its network boot ROM (iPXE), which the firmware then runs: seconds
/// under TCG, for nothing.
fn nic_rom(machine: Machine) -> &'static str {
    match machine {
        Machine::Microvm => "",
        Machine::Q35 => ",romfile=",
    }
}

/// Whether this QEMU offers `-M microvm`. Asking it (`-M help`) starts a QEMU, some 20 ms: the
/// answer is remembered for this binary, off every later start. No QEMU at all, or one that
/// fails to answer (killed, out of memory), fails later with its own message.
fn has_microvm(dirs: &crate::config::Dirs) -> bool {
    let Some(bin) = crate::image::find_on_path(QEMU_BINARY) else {
        return true;
    };
    let ask = || {
        let out = std::process::Command::new(&bin).args(["-M", "help"]).output().ok().filter(|o| o.status.success())?;
        Some(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("microvm ")))
    };
    remembered(dirs, "qemu-microvm", &bin, ask).unwrap_or(true)
}

/// What the guest's one NIC is plugged into. Every VM has the same NIC so that any saved
/// state loads into any VM; only the backend differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// A TAP the supervisor created and holds: QEMU gets this descriptor as its fd 3.
    Tap { fd: i32 },
    /// QEMU user networking; `restrict` cuts it off from everything but exposed ports.
    User { restrict: bool, forwards: Vec<(u16, u16)> },
}

/// Guest RAM backed by a file. A warm template runs with `share: true`, so its memory lands
/// in the file and the saved state can leave RAM out; clones map the same file with
/// `share: false` (private copy-on-write), so the pages they only read are shared among them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RamFile {
    pub path: PathBuf,
    pub share: bool,
}

/// Whether the kernel is an ELF vmlinux (PVH entry) rather than a bzImage; unreadable counts as
/// ELF (the VMM will say what is wrong with it).
fn kernel_is_elf(path: &Path) -> bool {
    std::fs::File::open(path)
        .and_then(|mut f| {
            let mut m = [0u8; 4];
            std::io::Read::read_exact(&mut f, &mut m).map(|_| m)
        })
        .map_or(true, |m| &m == b"\x7fELF")
}

/// A kernel smolvm built (`images/kernel-<fingerprint>/vmlinux`): its tick rate is known and it
/// takes `lapic_timer_period=`.
fn is_our_kernel(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "vmlinux")
        && path.parent().and_then(|d| d.file_name()).is_some_and(|d| d.to_string_lossy().starts_with("kernel-"))
}

/// CONFIG_HZ of the kernel built from images/kernel.fragment (a test holds them together).
const OUR_KERNEL_HZ: u64 = 100;

/// The kernel command line. Only settings, never anything from the user's env values.
pub fn kernel_cmdline(spec: &LaunchSpec) -> String {
    // Expedited RCU grace periods, until the agent has answered the first command (it then
    // sets the kernel's default back): one is a round of IPIs instead of ticks of waiting (tens
    // of ms at 100 Hz), and the agent's cgroup mount waits for one on the way there. A user's
    // `boot_args` come later and win (and the agent then leaves the setting alone).
    let mut args =
        vec!["console=ttyS0", "reboot=t", "panic=-1", "noreplace-smp", "cryptomgr.notests", "rcupdate.rcu_expedited=1", "init=/init"];
    // microvm has no PCI bus: probing for one only costs time.
    if spec.machine == Machine::Microvm {
        args.push("pci=off");
    }
    if !spec.verbose_boot {
        args.push("quiet");
    }
    let mut args: Vec<String> = args.into_iter().map(String::from).collect();
    if spec.accel == Accel::Tcg {
        // TCG has no TSC-deadline timer, so a kernel calibrates its APIC timer (~0.2 s). Ours
        // is told the rate instead (QEMU's APIC runs at 1 GHz; images/lapic_timer_period.c)
        // and so keeps a one-shot timer and idles tickless. Another ELF kernel goes without
        // the APIC timer (periodic ticks); Debian's then hangs bringing up a second CPU, so it
        // keeps its timer unless it has one CPU.
        let ours = is_our_kernel(&spec.image.kernel);
        if ours {
            args.push(format!("lapic_timer_period={}", 1_000_000_000 / OUR_KERNEL_HZ));
        } else if spec.vcpus == 1 || kernel_is_elf(&spec.image.kernel) {
            args.push("nolapic_timer".into());
        }
        // TCG's guest TSC is the host's (invariant, in sync across CPUs on current hosts),
        // whichever vCPU reads it: the kernel's sync check only sees emulation jitter and falls
        // back to jiffies. The IO-APIC timer always works here, so its check (~50 ms of waiting
        // for ticks) is skipped too.
        args.push("tsc=reliable".into());
        args.push("no_timer_check".into());
        if let Some(khz) = spec.tsc_khz {
            args.push(format!("tsc_early_khz={khz}"));
            // The delay loop from the known TSC rate: else each secondary CPU measures it,
            // ~150 ms under TCG. Only for our kernel, whose tick rate is known.
            if ours {
                args.push(format!("lpj={}", khz * 1000 / OUR_KERNEL_HZ));
            }
        }
    }
    // smolvm's own settings have no dot in their names: the kernel then hands them to init as
    // its environment.
    args.push(format!("smolvm_hostname={}", spec.hostname));
    if spec.image.rootfs.is_some() {
        args.push("smolvm_root=/dev/vda".into());
    }
    if let Some(net) = &spec.guest_net {
        args.push(format!("smolvm_net={}", net.to_boot_arg()));
    }
    if spec.vsock.is_some() {
        args.push("smolvm_channel=vsock".into());
    }
    if let Some(mounts) = SharedDir::boot_arg(&spec.mounts).filter(|_| spec.mount_at_boot) {
        args.push(mounts);
    }
    if let Some(extra) = &spec.extra_boot_args {
        args.push(extra.clone());
    }
    args.join(" ")
}

pub fn command_line(spec: &LaunchSpec) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |s: &[&str]| a.extend(s.iter().map(|x| x.to_string()));
    // RAM is always an explicit backend named `ram`, file-backed or not, so that the saved
    // state of any sandbox loads into any other of the same shape.
    // An ELF vmlinux (ours) boots through its PVH entry and finds its devices on the command
    // line, without ACPI; a bzImage (Debian's kernel, whose virtio-mmio driver is a module that
    // only learns of devices from ACPI) needs the option ROM that loads it, and ACPI.
    let elf = kernel_is_elf(&spec.image.kernel);
    let (acpi, roms) = if elf { ("off", "off") } else { ("on", "on") };
    match spec.machine {
        Machine::Microvm => push(&["-M", &format!("microvm,acpi={acpi},x-option-roms={roms},memory-backend=ram")]),
        // Firmware (SeaBIOS) loads the kernel, and the devices sit on PCI.
        Machine::Q35 => push(&["-M", "q35,memory-backend=ram"]),
    }
    let bus = spec.machine.bus();
    match &spec.ram {
        Some(ram) => {
            let path = opt_path(&ram.path);
            let share = if ram.share { "on" } else { "off" };
            push(&["-object", &format!("memory-backend-file,id=ram,size={}M,mem-path={path},share={share}", spec.memory_mib)]);
        }
        None if spec.vsock.is_some() => push(&["-object", &format!("memory-backend-memfd,id=ram,size={}M,share=on", spec.memory_mib)]),
        None => push(&["-object", &format!("memory-backend-ram,id=ram,size={}M", spec.memory_mib)]),
    }
    match spec.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        // x86-64-v2 features so common binaries run; +arat avoids APIC timer stalls in idle.
        Accel::Tcg => push(&["-accel", "tcg,thread=multi", "-cpu", "qemu64,+arat,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16"]),
    }
    let mem = spec.memory_mib.to_string();
    // On q35 the CPUs are one per socket: the firmware's MP table, all that our kernel (without
    // ACPI) learns its CPUs from, lists a socket's first CPU alone, and QEMU's default puts
    // them all in one socket, so the guest saw one CPU however many it was given.
    let smp = match spec.machine {
        Machine::Q35 => format!("{0},sockets={0},cores=1,threads=1", spec.vcpus),
        Machine::Microvm => spec.vcpus.to_string(),
    };
    push(&["-m", &mem, "-smp", &smp, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    push(&["-kernel", &spec.image.kernel.to_string_lossy()]);
    if let Some(initrd) = &spec.image.initrd {
        push(&["-initrd", &initrd.to_string_lossy()]);
    }
    push(&["-append", &kernel_cmdline(spec)]);
    // Appended to (not written at an offset of QEMU's own): the supervisor cuts a console that
    // outgrows its bound, and QEMU's next line then goes after the cut.
    push(&["-chardev", &format!("file,id=con,path={},append=on", opt_path(&spec.console_log)), "-serial", "chardev:con"]);
    match &spec.vsock {
        Some(vhost) => push(&[
            "-chardev",
            &format!("socket,id=vsock,path={}", opt_path(vhost)),
            "-device",
            &format!("vhost-user-vsock-{bus},chardev=vsock"),
        ]),
        None => {
            push(&["-chardev", &format!("socket,id=agent,path={}", opt_path(&spec.agent_socket))]);
            // The port's id makes QEMU report the guest opening it (VSERPORT_CHANGE; see
            // supervisor).
            push(&[
                "-device",
                &format!("virtio-serial-{bus}"),
                "-device",
                &format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME},id=agentport"),
            ]);
        }
    }
    push(&["-qmp", &format!("unix:{},server=on,wait=off", opt_path(&spec.qmp_socket))]);
    let netdev = match &spec.net {
        NetBackend::Tap { .. } => format!("tap,id=net0,fd={TAP_FD},vhost=off"),
        NetBackend::User { restrict, forwards } => {
            let mut n = String::from("user,id=net0,net=10.0.2.0/24");
            if *restrict {
                n.push_str(",restrict=on");
            }
            for (host, guest) in forwards {
                n.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
            }
            n
        }
    };
    push(&["-netdev", &netdev, "-device", &format!("virtio-net-{bus},netdev=net0,mac=02:00:00:00:00:02{}", nic_rom(spec.machine))]);
    if spec.incoming.is_some() {
        push(&["-incoming", "defer", "-S"]);
    }
    // QEMU serves each directory with its own credentials. On a writable one, what the guest
    // creates is a plain file or directory of QEMU's user (0600, 0700), and the owner, mode and
    // kind the guest gave it are kept in `user.virtfs.*` attributes (`mapped-xattr`): a guest's
    // setuid file or device node never becomes one on the host, even where QEMU runs as root.
    // A read-only one refuses writes itself, whatever the guest does, so it shows the host's
    // files as they are (`none`): mapped-xattr would read a host symlink as a file holding its
    // target, and fail on it (ELOOP).
    for (i, m) in spec.mounts.iter().enumerate() {
        let path = opt_path(&m.host);
        let (model, ro) = if m.readonly { ("none", ",readonly=on") } else { ("mapped-xattr", "") };
        push(&[
            "-fsdev",
            &format!("local,id=fs{i},path={path},security_model={model}{ro}"),
            "-device",
            &format!("virtio-9p-{bus},fsdev=fs{i},mount_tag=smolvm{i}"),
        ]);
    }
    if let Some(rootfs) = &spec.image.rootfs {
        let file = opt_path(rootfs);
        let format = if rootfs.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" };
        push(&[
            "-drive",
            &format!("if=none,id=root,file={file},format={format},cache=unsafe"),
            "-device",
            &format!("virtio-blk-{bus},drive=root"),
        ]);
    }
    // Last, so that the devices before it keep their places. Reporting only over anonymous
    // memory (or vsock's memfd): QEMU 7.2 discards a file-backed page by punching a hole in the
    // file, which for a warm clone (a private map of its template's RAM) is the template that
    // every clone shares. A template and its clones get the device alike, without reporting.
    if spec.balloon {
        let reporting = if spec.ram.is_none() { ",free-page-reporting=on" } else { "" };
        push(&["-device", &format!("virtio-balloon-{bus}{reporting}")]);
    }
    a
}

/// A path as the value of a QEMU option (`path=…,` lists): a comma in it is written twice, or
/// QEMU would read the rest as options of its own (a data directory `/srv/a,b` failed every
/// start, and a path could add options).
fn opt_path(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// Start QEMU. It dies with the calling thread's process (PDEATHSIG), so a supervisor killed
/// with SIGKILL leaves no VMM behind. The caller must spawn from a thread that lives as long as
/// the VM (the supervisor's main thread): PDEATHSIG fires when the spawning *thread* exits.
/// Where QEMU finds the TAP descriptor it is given.
const TAP_FD: i32 = 3;
/// Where QEMU finds the saved state it restores: read from a descriptor it was given, not by
/// `exec:cat FILE`, for which QEMU forks a shell (copying its page tables, guest RAM mapped)
/// and the shell a `cat`: milliseconds of every warm start.
const STATE_FD: i32 = 4;

/// Whether QEMU process `pid` was started to load a saved state (`-incoming`): a warm start,
/// or a restore, rather than a boot.
pub fn loads_saved_state(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"-incoming"))
}

pub fn spawn(spec: &LaunchSpec, log: &Path) -> Result<tokio::process::Child> {
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(log).ctx(|| format!("opening {}", log.display()))?;
    let mut cmd = tokio::process::Command::new(QEMU_BINARY);
    cmd.args(command_line(spec))
        .stdin(std::process::Stdio::null())
        .stdout(stderr.try_clone().ctx(|| "dup log".into())?)
        .stderr(stderr)
        .kill_on_drop(true);
    let tap = match spec.net {
        NetBackend::Tap { fd } => Some(fd),
        NetBackend::User { .. } => None,
    };
    // Open here, at a number above the two QEMU is given (so that placing the TAP cannot
    // overwrite it); closed in this process once QEMU has its copy.
    let state = match &spec.incoming {
        Some(path) => {
            let file = std::fs::File::open(path).ctx(|| format!("opening the saved state {}", path.display()))?;
            let fd = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
                .map_err(|e| Error::Host(format!("duplicating the saved state's descriptor: {e}")))?;
            // SAFETY: fcntl just returned this descriptor, which nothing else owns.
            Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
        }
        None => None,
    };
    let state_fd = state.as_ref().map(|f| f.as_raw_fd());
    // QEMU asks for transparent huge pages for guest RAM and for TCG's buffer of translated
    // code. They are kept where they pay: a cold boot's anonymous RAM under KVM (the guest's
    // own page tables), and an initramfs guest's cold boot under TCG (1.6 % faster). Guest
    // RAM in a file (a warm start) gets none anyway, and TCG's code buffer holds whole 2 MB
    // pages of which it uses part: PSS of an idle warm sandbox 24.0 MB without, 27.4 with,
    // starting as fast. A TCG guest booting a root disk touches its RAM widely, and zeroing
    // whole 2 MB pages for it costs more than they save (alpine-ssh created in 0.52 s
    // without against 0.58 s with, RSS 137 against 147 MB).
    let no_huge_pages = spec.ram.is_some() || (spec.accel == Accel::Tcg && spec.image.rootfs.is_some());
    // SAFETY: prctl (PR_SET_PDEATHSIG, PR_SET_THP_DISABLE), dup2 and fcntl only change this
    // child's own attributes and descriptors and are async-signal-safe; no memory of the parent
    // is touched between fork and exec. The TAP descriptor stays valid: the caller holds it until QEMU is gone.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if no_huge_pages && libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = tap {
                // dup2 onto itself would keep close-on-exec set: clear it instead.
                let rc = if fd == TAP_FD { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, TAP_FD) };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // (Above 10, never one of the two.)
            if let Some(fd) = state_fd {
                if libc::dup2(fd, STATE_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    drop(state);
    child.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Host(format!("{QEMU_BINARY} is not installed (run `smolvm setup` or apt install qemu-system-x86)"))
        } else {
            Error::Io { context: format!("starting {QEMU_BINARY}"), source: e }
        }
    })
}

/// A minimal QMP client: greeting, capabilities negotiation, then one command at a time.
pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    /// The start of a line whose end has not arrived yet (kept across a cancelled read).
    partial: Vec<u8>,
    /// The id of the next command: a reply carries its command's id, so the answer to one
    /// that was given up on (a timeout) is never taken for the next one's.
    next_id: u64,
}

impl Qmp {
    pub async fn connect(path: &Path) -> Result<Qmp> {
        let s = UnixStream::connect(path).await.ctx(|| format!("connecting to QMP at {}", path.display()))?;
        let (r, w) = s.into_split();
        let mut q = Qmp { reader: BufReader::new(r), writer: w, partial: Vec::new(), next_id: 0 };
        q.read_json().await?; // greeting
        q.execute("qmp_capabilities").await?;
        Ok(q)
    }

    /// The next JSON line. Cancel-safe (for `select!`): nothing read is lost if the future is
    /// dropped; a line cut short waits in `partial` for the next call.
    async fn read_json(&mut self) -> Result<serde_json::Value> {
        loop {
            let buf = self.reader.fill_buf().await.ctx(|| "reading from QMP".into())?;
            if buf.is_empty() {
                return Err(Error::Host("QMP closed the connection".into()));
            }
            let (take, end) = match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            self.partial.extend_from_slice(&buf[..take]);
            self.reader.consume(take);
            if end {
                let line = std::mem::take(&mut self.partial);
                return serde_json::from_slice(&line).map_err(|e| Error::Host(format!("QMP sent invalid JSON: {e}")));
            }
        }
    }

    /// Wait for the event `name`, skipping others.
    pub async fn wait_event(&mut self, name: &str) -> Result<serde_json::Value> {
        loop {
            let v = self.read_json().await?;
            if v.get("event").and_then(|e| e.as_str()) == Some(name) {
                return Ok(v);
            }
        }
    }

    /// QEMU creates its QMP socket shortly after it starts: retry until it answers.
    pub async fn connect_when_ready(path: &Path) -> Result<Qmp> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Qmp::connect(path).await {
                Ok(q) => return Ok(q),
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(2)).await,
            }
        }
    }

    pub async fn execute(&mut self, command: &str) -> Result<serde_json::Value> {
        self.execute_args(command, serde_json::Value::Null).await
    }

    /// Poll `query` until `field` of its answer leaves the given states; returns the final one.
    async fn wait_while(&mut self, query: &str, field: &str, states: &[&str], bound: std::time::Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let v = self.execute(query).await?;
            let status = v.get(field).and_then(|s| s.as_str()).unwrap_or("").to_string();
            if !states.contains(&status.as_str()) {
                return Ok(status);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Timeout { operation: query.to_string(), seconds: bound.as_secs_f64() });
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// Write the VM's device and memory state to `file` (QEMU's migration stream). When this
    /// returns the CPUs are stopped and the disks flushed; `cont` resumes.
    /// `mib_per_s` caps the stream (None: as fast as the disk takes it). A save that fails or
    /// takes longer than `bound` is cancelled: it must not go on writing, nor stop the VM again
    /// when it completes after all.
    pub async fn save_to(&mut self, file: &Path, mib_per_s: Option<u64>, bound: std::time::Duration) -> Result<()> {
        // A VM saved while paused is left in QEMU's `postmigrate` state, from which QEMU
        // refuses another save ("Can't migrate the vm that was paused due to previous
        // migration"), and only `cont` leaves it: the CPUs run for the time of two commands.
        let status = self.execute("query-status").await?;
        if status.get("status").and_then(|s| s.as_str()) == Some("postmigrate") {
            self.execute("cont").await?;
            self.execute("stop").await?;
        }
        self.ignore_shared().await?;
        // QEMU's default cap (128 MiB/s) is meant for live migration over a network.
        let bytes_per_s = mib_per_s.map_or(UNLIMITED_SAVE, |mib| mib << 20);
        self.execute_args("migrate-set-parameters", serde_json::json!({ "max-bandwidth": bytes_per_s })).await?;
        // QEMU writes to a descriptor it is handed (no `exec:cat >`, which forked a shell from
        // QEMU and passed every byte through a pipe).
        let out = std::fs::OpenOptions::new().write(true).create_new(true).open(file).ctx(|| format!("creating {}", file.display()))?;
        self.execute_passing("getfd", serde_json::json!({ "fdname": "state" }), Some(std::os::fd::AsFd::as_fd(&out))).await?;
        drop(out);
        if let Err(e) = self.execute_args("migrate", serde_json::json!({ "uri": "fd:state" })).await {
            // Not taken: QEMU would hold the file open until its next `getfd` or its exit.
            let _ = self.execute_args("closefd", serde_json::json!({ "fdname": "state" })).await;
            return Err(e);
        }
        let ended = self.wait_while("query-migrate", "status", &["", "setup", "active", "device", "pre-switchover"], bound).await;
        let failed = match ended {
            Ok(status) if status == "completed" => {
                self.settle().await;
                return Ok(());
            }
            Ok(status) => {
                // QEMU says why (a full disk: "Unable to write to file: No space left on device").
                let why = self.execute("query-migrate").await.ok().and_then(|v| v.get("error-desc")?.as_str().map(str::to_string));
                Error::Host(match why {
                    Some(why) => format!("saving the VM state failed: {why}"),
                    None => format!("saving the VM state ended as {status:?}"),
                })
            }
            Err(e) => e,
        };
        self.cancel_save().await;
        Err(failed)
    }

    /// Stop a save under way, and wait (bounded) until QEMU has let go of it: a migration still
    /// `cancelling` refuses the next save's settings ("There's a migration process in
    /// progress"), so a snapshot right after a given-up one failed.
    pub(crate) async fn cancel_save(&mut self) {
        let bound = std::time::Duration::from_secs(5);
        let _ = tokio::time::timeout(bound, self.execute("migrate_cancel")).await;
        let active = ["setup", "active", "device", "pre-switchover", "cancelling"];
        let _ = tokio::time::timeout(bound * 2, self.wait_while("query-migrate", "status", &active, bound)).await;
        self.settle().await;
    }

    /// QEMU reports a migration's end a moment before it leaves the `finish-migrate` run state,
    /// in which `cont` is refused ("Migration is not finalized yet"): a resume after a save must
    /// wait for that (bounded; the resume's own error then says what is wrong).
    pub(crate) async fn settle(&mut self) {
        let _ = self.wait_while("query-status", "status", &["finish-migrate"], std::time::Duration::from_secs(5)).await;
    }

    /// Load the state a VM was started with (`incoming`), written by [`Qmp::save_to`].
    pub async fn restore_from_launch(&mut self) -> Result<()> {
        self.ignore_shared().await?;
        self.execute_args("migrate-incoming", serde_json::json!({ "uri": format!("fd:{STATE_FD}") })).await?;
        let status = self.wait_while("query-status", "status", &["inmigrate", "prelaunch"], std::time::Duration::from_secs(120)).await?;
        if status != "paused" {
            return Err(Error::Host(format!("restoring the VM state ended as {status:?}")));
        }
        Ok(())
    }

    /// Leave RAM that lives in a shared file out of the state stream. Both ends must agree, so
    /// it is always on: for anonymous or private RAM it changes nothing.
    async fn ignore_shared(&mut self) -> Result<()> {
        let caps = serde_json::json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] });
        self.execute_args("migrate-set-capabilities", caps).await?;
        Ok(())
    }

    /// Whether every vCPU has stopped for good: halted with interrupts off, which only a reset
    /// ends. Linux's `halt` (and its power-off, where it has no way to cut the power) leaves
    /// every CPU so; an idle guest halts with interrupts on, and a timer or a device wakes it.
    /// (QEMU's `HLT` here is KVM's halted state too, read with the registers.)
    /// Whether the guest has stopped its CPUs for good ([`stopped_for_good`]), seen twice,
    /// 150 ms apart, with every CPU where it was. One look could catch each CPU in a short halt
    /// with interrupts off that ends by itself (under KVM, a paravirtual spinlock's wait), and
    /// QEMU reads the CPUs one after another, not at one instant.
    pub async fn cpus_stopped_for_good(&mut self) -> Result<bool> {
        let mut seen = Vec::new();
        for look in 0..2 {
            if look > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            }
            let info = self.execute_args("human-monitor-command", serde_json::json!({ "command-line": "info registers -a" })).await?;
            match stopped_for_good(info.as_str().unwrap_or_default()) {
                Some(ips) => seen.push(ips),
                None => return Ok(false),
            }
        }
        Ok(seen[0] == seen[1])
    }

    pub async fn execute_args(&mut self, command: &str, args: serde_json::Value) -> Result<serde_json::Value> {
        self.execute_passing(command, args, None).await
    }

    /// `execute_args`, handing QEMU the descriptor `fd` with the command (as `getfd` wants).
    async fn execute_passing(
        &mut self,
        command: &str,
        args: serde_json::Value,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<serde_json::Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = serde_json::json!({ "execute": command, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let msg = msg.to_string() + "\n";
        match fd {
            None => self.writer.write_all(msg.as_bytes()).await.ctx(|| "writing to QMP".into())?,
            Some(fd) => {
                use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
                use std::os::fd::AsRawFd;
                let stream: &UnixStream = self.writer.as_ref();
                let fds = [fd.as_raw_fd()];
                let sent = stream
                    .async_io(tokio::io::Interest::WRITABLE, || {
                        let iov = [std::io::IoSlice::new(msg.as_bytes())];
                        sendmsg::<()>(stream.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)
                            .map_err(std::io::Error::from)
                    })
                    .await
                    .ctx(|| "writing to QMP".into())?;
                // A short command on an idle socket goes whole; if not, the descriptor went with
                // the first bytes, and the rest follows.
                self.writer.write_all(&msg.as_bytes()[sent..]).await.ctx(|| "writing to QMP".into())?;
            }
        }
        loop {
            let v = self.read_json().await?;
            // Events, and late answers to commands given up on.
            if v.get("event").is_some() || v.get("id").and_then(|i| i.as_u64()) != Some(id) {
                continue;
            }
            if let Some(err) = v.get("error") {
                return Err(Error::Host(format!("QMP {command}: {err}")));
            }
            return Ok(v.get("return").cloned().unwrap_or_default());
        }
    }
}

/// Bytes per second: no limit in practice (1 TiB/s, the largest cap one can ask for).
const UNLIMITED_SAVE: u64 = 1 << 40;

#[cfg(test)]
mod tests {
    use super::*;

    /// From QEMU 7.2 under TCG: the guest after `halt -f`, and one idling.
    #[test]
    fn only_cpus_halted_with_interrupts_off_are_stopped_for_good() {
        let cpu = |rfl: &str, hlt: u8| {
            format!("CPU#0\nRAX=0000000000000000 RBX=0000000000000000\nRIP=ffffffff8101b3ea RFL={rfl} [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT={hlt}\nES =0000 0000000000000000 00000000 00000000\n")
        };
        let both = |a: String, b: String| a + &b;
        let stopped = |info: &str| stopped_for_good(info).is_some();
        assert_eq!(stopped_for_good(&both(cpu("00000046", 1), cpu("00000046", 1))), Some(vec![0xffffffff8101b3ea; 2]));
        // Idle: halted, but a timer or device interrupt wakes it.
        assert!(!stopped(&both(cpu("00000246", 1), cpu("00000246", 1))));
        // One CPU still runs.
        assert!(!stopped(&both(cpu("00000046", 1), cpu("00000046", 0))));
        assert!(!stopped(&both(cpu("00000046", 1), cpu("00000246", 1))));
        // q35: the guest halted, and a CPU it never brought up parked by the firmware in
        // 32-bit mode (halted, interrupts off) or waiting in it with interrupts on.
        let parked =
            |efl: &str| format!("CPU#1\nEAX=00000000 EBX=00000000\nEIP=000f7a1c EFL={efl} [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1\n");
        assert_eq!(stopped_for_good(&both(cpu("00000046", 1), parked("00000002"))), Some(vec![0xffffffff8101b3ea, 0xf7a1c]));
        assert!(!stopped(&both(cpu("00000046", 1), parked("00000202"))));
        assert!(!stopped(&both(cpu("00000246", 1), parked("00000002"))));
        // KVM (microvm, `nosmp`): a CPU never started shows not halted, at the reset vector.
        let reset = |hlt: u8, eip: &str| {
            format!("CPU#1\nEAX=00000000 EBX=00000000\nEIP={eip} EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT={hlt}\nCS =f000 ffff0000 0000ffff 00009b00\n")
        };
        assert!(stopped(&both(cpu("00000046", 1), reset(0, "0000fff0"))));
        assert!(!stopped(&both(cpu("00000046", 1), reset(0, "0000fff4"))));
        // Nothing recognisable: not stopped.
        assert!(!stopped(""));
        assert!(!stopped("CPU#0\nRIP=0 RFL=zz HLT=1\n"));
    }

    #[tokio::test]
    async fn a_late_answer_is_not_taken_for_the_next_commands() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (r, w) = ours.into_split();
        let mut q = Qmp { reader: BufReader::new(r), writer: w, partial: Vec::new(), next_id: 0 };
        let (their_r, mut their_w) = theirs.into_split();
        let peer = tokio::spawn(async move {
            let mut lines = BufReader::new(their_r).lines();
            let first = lines.next_line().await.unwrap().unwrap();
            let second = lines.next_line().await.unwrap().unwrap();
            // The first command's answer comes only now, late, before the second's.
            their_w
                .write_all(b"{\"return\": {\"late\": true}, \"id\": 1}\r\n{\"return\": {\"status\": \"running\"}, \"id\": 2}\r\n")
                .await
                .unwrap();
            (first, second, their_w)
        });
        let given_up = tokio::time::timeout(std::time::Duration::from_millis(50), q.execute("stop")).await;
        assert!(given_up.is_err());
        let status = q.execute("query-status").await.unwrap();
        assert_eq!(status["status"], "running", "{status}");
        let (first, second, _w) = peer.await.unwrap();
        assert!(first.contains("\"stop\"") && second.contains("\"query-status\""), "{first} {second}");
    }

    #[tokio::test]
    async fn a_line_cut_short_by_a_cancelled_read_is_not_lost() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (r, w) = ours.into_split();
        let mut q = Qmp { reader: BufReader::new(r), writer: w, partial: Vec::new(), next_id: 0 };
        theirs.write_all(b"{\"event\": \"VSERPORT").await.unwrap();
        let cut = tokio::time::timeout(std::time::Duration::from_millis(50), q.wait_event("VSERPORT_CHANGE")).await;
        assert!(cut.is_err(), "nothing complete was sent yet");
        theirs.write_all(b"_CHANGE\"}\n{\"return\": {}}\n").await.unwrap();
        let v = q.wait_event("VSERPORT_CHANGE").await.unwrap();
        assert_eq!(v["event"], "VSERPORT_CHANGE");
        assert_eq!(q.read_json().await.unwrap()["return"], serde_json::json!({}));
    }

    fn spec(accel: Accel, rootfs: bool) -> LaunchSpec {
        LaunchSpec {
            image: BootImage {
                kernel: "/i/kernel-0123/vmlinux".into(),
                initrd: Some("/k/initrd".into()),
                rootfs: rootfs.then(|| "/d/root,1.ext4".into()),
            },
            vcpus: 2,
            memory_mib: 512,
            accel,
            hostname: "box".into(),
            guest_net: Some(smolvm_proto::NetConfig { address: [10, 0, 2, 15], prefix: 24, gateway: [10, 0, 2, 2], dns: [10, 0, 2, 3] }),
            extra_boot_args: Some("foo=bar".into()),
            verbose_boot: false,
            agent_socket: "/r/agent.sock".into(),
            qmp_socket: "/r/qmp.sock".into(),
            console_log: "/r/console.log".into(),
            incoming: None,
            ram: None,
            net: NetBackend::Tap { fd: 7 },
            vsock: None,
            machine: Machine::Microvm,
            tsc_khz: Some(2_596_122),
            mounts: vec![],
            mount_at_boot: true,
            balloon: true,
        }
    }

    #[test]
    fn free_page_reporting_only_over_memory_of_its_own() {
        let line = |s: &LaunchSpec| command_line(s).join(" ");
        let mut s = spec(Accel::Tcg, false);
        assert!(line(&s).ends_with(" -device virtio-balloon-device,free-page-reporting=on"), "{}", line(&s));
        s.vsock = Some("/r/v.sock".into());
        assert!(line(&s).ends_with(" -device virtio-balloon-device,free-page-reporting=on"), "memfd: holes free it");
        s.vsock = None;
        // A warm template and its clones: the same device, never reporting into the shared file.
        for share in [true, false] {
            s.ram = Some(RamFile { path: "/i/warm/ram".into(), share });
            let a = line(&s);
            assert!(a.ends_with(" -device virtio-balloon-device") && !a.contains("free-page-reporting"), "{a}");
        }
        s.ram = None;
        s.machine = Machine::Q35;
        assert!(line(&s).ends_with(" -device virtio-balloon-pci,free-page-reporting=on"), "{}", line(&s));
        s.balloon = false;
        assert!(!line(&s).contains("balloon"), "a state saved without one loads without one");
    }

    #[test]
    fn a_kernel_without_virtio_mmio_gets_q35() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = crate::config::Dirs { data: dir.path().join("d"), images: dir.path().join("i") };
        let without = dir.path().join("plain-vmlinux");
        std::fs::write(&without, b"\x7fELF.... virtio-pci only").unwrap();
        let with = dir.path().join("mmio-vmlinux");
        std::fs::write(&with, b"\x7fELF.... virtio-mmio: Registering device").unwrap();
        let bzimage = dir.path().join("bzImage");
        std::fs::write(&bzimage, b"MZ compressed").unwrap();
        assert!(!kernel_has_mmio(&dirs, &without));
        assert!(kernel_has_mmio(&dirs, &with) && kernel_has_mmio(&dirs, &bzimage));
        // Asked again: the kept answer.
        assert!(!kernel_has_mmio(&dirs, &without));
        assert_eq!(std::fs::read_dir(&dirs.images).unwrap().count(), 2, "one answer per ELF kernel");
    }

    #[test]
    fn q35_puts_the_devices_on_pci_and_lets_the_kernel_look_for_it() {
        let mut s = spec(Accel::Tcg, true);
        s.machine = Machine::Q35;
        s.vsock = Some("/r/v.sock".into());
        let a = command_line(&s).join(" ");
        assert!(a.contains("-M q35,memory-backend=ram "), "{a}");
        for d in ["vhost-user-vsock-pci,chardev=vsock", "virtio-net-pci,netdev=net0", "virtio-blk-pci,drive=root"] {
            assert!(a.contains(d), "{d} missing: {a}");
        }
        assert!(!a.contains("-device,") && !a.contains("microvm"), "{a}");
        assert!(!kernel_cmdline(&s).contains("pci=off"));
        assert!(kernel_cmdline(&spec(Accel::Tcg, true)).contains("pci=off"));
        s.vsock = None;
        assert!(command_line(&s).join(" ").contains("-device virtio-serial-pci -device virtserialport"));
    }

    #[test]
    fn the_vsock_transport_replaces_the_serial_port_and_shares_guest_ram() {
        let mut s = spec(Accel::Tcg, false);
        s.vsock = Some("/r/vhost-vsock.sock".into());
        let a = command_line(&s).join(" ");
        assert!(a.contains("-object memory-backend-memfd,id=ram,size=512M,share=on"), "{a}");
        assert!(a.contains("-chardev socket,id=vsock,path=/r/vhost-vsock.sock -device vhost-user-vsock-device,chardev=vsock"), "{a}");
        assert!(!a.contains("virtserialport") && !a.contains("agent.sock"), "{a}");
        assert!(kernel_cmdline(&s).contains(" smolvm_channel=vsock"));
        assert!(!kernel_cmdline(&spec(Accel::Tcg, false)).contains("smolvm_channel"));
    }

    #[test]
    fn tcg_command_line() {
        let a = command_line(&spec(Accel::Tcg, true)).join(" ");
        assert!(a.contains("-M microvm,acpi=off"), "{a}");
        assert!(a.contains("-accel tcg"), "{a}");
        assert!(a.contains("-m 512 -smp 2"), "{a}");
        assert!(a.contains("name=smolvm.agent"), "{a}");
        assert!(a.contains("file=/d/root,,1.ext4"), "{a}");
        let k = kernel_cmdline(&spec(Accel::Tcg, true));
        assert!(
            k.contains(" quiet")
                && k.contains(" init=/init ")
                && k.contains("lapic_timer_period=10000000")
                && k.contains("smolvm_root=/dev/vda"),
            "{k}"
        );
        assert!(k.contains("tsc=reliable") && k.contains("no_timer_check") && !k.contains("nolapic_timer"), "{k}");
        assert!(k.contains(" tsc_early_khz=2596122 lpj=25961220 "), "{k}");
        assert!(k.contains(" smolvm_net=10.0.2.15/24,10.0.2.2,10.0.2.3 "), "{k}");
        assert!(k.ends_with("foo=bar"), "{k}");
    }

    #[test]
    fn shared_directories_become_9p_devices_and_a_boot_argument() {
        let mut s = spec(Accel::Tcg, false);
        s.mounts = vec![
            SharedDir { host: "/h/a,b".into(), guest: "/workspace/a b".into(), readonly: true },
            SharedDir { host: "/h/c".into(), guest: "/mnt/c".into(), readonly: false },
        ];
        let a = command_line(&s).join(" ");
        assert!(
            a.contains(
                "-fsdev local,id=fs0,path=/h/a,,b,security_model=none,readonly=on -device virtio-9p-device,fsdev=fs0,mount_tag=smolvm0"
            ),
            "{a}"
        );
        assert!(
            a.contains("-fsdev local,id=fs1,path=/h/c,security_model=mapped-xattr -device virtio-9p-device,fsdev=fs1,mount_tag=smolvm1"),
            "{a}"
        );
        let k = kernel_cmdline(&s);
        assert!(k.contains(" smolvm_mounts=smolvm0:2f776f726b73706163652f612062:ro,smolvm1:2f6d6e742f63:rw"), "{k}");
        // A warm template's boot: the same devices, nothing mounted; its clones are told so.
        s.mount_at_boot = false;
        assert!(!kernel_cmdline(&s).contains("smolvm_mounts"));
        let devices = |line: &str| {
            line.split(" -").filter(|a| a.starts_with("fsdev") || a.starts_with("device virtio-9p")).collect::<Vec<_>>().join(" ")
        };
        assert_eq!(devices(&command_line(&s).join(" ")), devices(&a));
        assert_eq!(devices(&a).matches("virtio-9p").count(), 2);
        let told = SharedDir::shares(&s.mounts);
        assert_eq!(
            told,
            vec![
                smolvm_proto::Share { tag: "smolvm0".into(), path: "/workspace/a b".into(), readonly: true },
                smolvm_proto::Share { tag: "smolvm1".into(), path: "/mnt/c".into(), readonly: false },
            ]
        );
        s.mount_at_boot = true;
        s.mounts.clear();
        assert!(!kernel_cmdline(&s).contains("smolvm_mounts") && !command_line(&s).join(" ").contains("9p"));
    }

    /// The longest command line a config can make (every setting at its longest: the most
    /// mounts at the longest guest paths, the longest boot arguments, a root disk, vsock, a
    /// 64-character name) leaves room in the kernel's 2048 bytes for what microvm adds:
    /// one `virtio_mmio.device=…` of at most 40 bytes per device.
    #[test]
    fn the_longest_command_line_fits_the_kernels_with_room_for_the_devices() {
        let mut s = spec(Accel::Tcg, true);
        s.hostname = "h".repeat(64);
        s.guest_net = Some(smolvm_proto::NetConfig {
            address: [172, 16, 255, 254],
            prefix: 30,
            gateway: [172, 16, 255, 253],
            dns: [172, 16, 255, 253],
        });
        s.vsock = Some("/r/vhost-vsock.sock".into());
        s.extra_boot_args = Some("x".repeat(crate::config::BOOT_ARGS_MAX));
        s.mounts = (0..crate::config::MAX_MOUNTS)
            .map(|i| SharedDir {
                host: "/h".into(),
                guest: format!("/{i}{}", "g".repeat(crate::config::MAX_GUEST_PATH - 2)),
                readonly: false,
            })
            .collect();
        let devices = 1 + 1 + 1 + 1 + 1 + crate::config::MAX_MOUNTS; // serial, net, blk, vsock, balloon, 9p
        let total = kernel_cmdline(&s).len() + 1 + devices * 40;
        assert!(total < 2048, "{total} bytes");
        // And microvm has 8 virtio-mmio transports, one per device, whichever the agent's channel.
        for vsock in [true, false] {
            s.vsock = vsock.then(|| "/r/vhost-vsock.sock".into());
            let line = command_line(&s);
            let transports =
                line.iter().filter(|a| !a.starts_with('-') && a.split(',').next().is_some_and(|d| d.ends_with("-device"))).count();
            assert_eq!(transports, 8, "{line:?}");
        }
    }

    #[test]
    fn our_kernels_tick_rate_is_the_one_lpj_assumes() {
        assert!(crate::image::KERNEL_FRAGMENT.lines().any(|l| l.trim() == format!("CONFIG_HZ_{OUR_KERNEL_HZ}=y")));
    }

    #[test]
    fn kvm_and_verbose() {
        let mut s = spec(Accel::Kvm, false);
        s.verbose_boot = true;
        let a = command_line(&s).join(" ");
        assert!(a.contains("-accel kvm -cpu host"), "{a}");
        assert!(!a.contains("virtio-blk"), "{a}");
        let k = kernel_cmdline(&s);
        assert!(!k.contains("quiet") && !k.contains("lapic") && !k.contains("smolvm_root") && !k.contains("lpj="), "{k}");
    }

    #[test]
    fn other_kernels_under_tcg_go_without_the_apic_timer_and_keep_their_delay_loop() {
        let mut s = spec(Accel::Tcg, false);
        s.image.kernel = "/home/me/vmlinux".into();
        let k = kernel_cmdline(&s);
        assert!(k.contains("nolapic_timer") && !k.contains("lapic_timer_period") && !k.contains("lpj="), "{k}");
        assert!(is_our_kernel(Path::new("/x/images/kernel-51cf8e692962b6d4/vmlinux")));
        assert!(!is_our_kernel(Path::new("/x/kernel-1/bzImage")));
    }
}
