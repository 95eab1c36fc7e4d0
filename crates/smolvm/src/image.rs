//! Guest images: our own kernel (built once from Debian's linux-source, cached by fingerprint)
//! and an initramfs with the agent as /init and busybox for the usual tools. Built without
//! Docker, root or mounts. A cache entry is a directory or file named by the fingerprint of its
//! inputs, so changing any input builds a new one and nothing is rebuilt needlessly.

use crate::config::{env_flag, Dirs, VmConfig};
use crate::cpio::Cpio;
use crate::error::{Error, IoContext, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The kernel config fragment (applied on top of `allnoconfig`).
pub const KERNEL_FRAGMENT: &str = include_str!("../../../images/kernel.fragment");
/// Code added to the kernel source, after `KERNEL_EDIT_ANCHOR` in `KERNEL_EDIT_FILE`.
pub const KERNEL_EDIT: &str = include_str!("../../../images/lapic_timer_period.c");
const KERNEL_EDIT_FILE: &str = "arch/x86/kernel/apic/apic.c";
const KERNEL_EDIT_ANCHOR: &str = "\nunsigned int lapic_timer_period = 0;\n";
/// Fixes to the kernel source (unified diffs, applied with `patch -p1`), each with its reason,
/// and what a source must have for it to apply: a file and a word in it. (Kernels from 6.5 on
/// read into pipes without the code this fixes, and lack `iov_iter_is_pipe`.)
pub const KERNEL_PATCHES: [(&str, &str, (&str, &str)); 1] =
    [("9p-pipe-read.patch", include_str!("../../../images/9p-pipe-read.patch"), ("include/linux/uio.h", "iov_iter_is_pipe"))];
/// What building our kernel runs (checked before it starts, and by doctor).
const KERNEL_TOOLS: [&str; 8] = ["make", "gcc", "flex", "bison", "bc", "tar", "xz", "patch"];
/// Bump when the way an artifact is built changes without its inputs changing.
const KERNEL_RECIPE: &str = "kernel-recipe-1";
const INITRAMFS_RECIPE: &str = "initramfs-recipe-2";
/// Marks a cache entry that came from a published source rather than a local build.
const PUBLISHED_MARK: &str = ".published";

/// Reports progress of long builds (one line at a time, for a human).
pub type Progress<'a> = &'a (dyn Fn(&str) + Sync);

/// What a VM boots.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BootImage {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
}

pub fn fingerprint(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The image a config boots: its own kernel/initrd/rootfs where given, ours otherwise.
pub fn resolve(config: &VmConfig, dirs: &Dirs, progress: Progress) -> Result<BootImage> {
    debian_kernel_asked()?;
    // An image that does not exist (its recipe removed since the sandbox was made) is said
    // before minutes of building a kernel it would never boot.
    if let Some(name) = config.image.as_deref().filter(|n| *n != "default") {
        crate::recipe::load(dirs, name)?;
    }
    // Our own kernel where it can be built; else (or with SMOLVM_KERNEL=debian) Debian's
    // prebuilt cloud kernel, whose virtio drivers are modules the initramfs must carry.
    let (kernel, modules) = match &config.kernel_path {
        // Debian's kernel from our cache (what `build_image` hands out where ours cannot be
        // built) needs its modules as much as when we chose it.
        Some(k) => match cached_debian_modules(dirs, k) {
            Some(modroot) => (k.clone(), module_set(&modroot, DEBIAN_MODULES)?),
            None => (k.clone(), Vec::new()),
        },
        None => match own_kernel_unavailable(dirs) {
            None => match default_kernel(dirs, progress) {
                Ok(k) => (k, Vec::new()),
                // A build that fails (a compiler error) falls back too; `default_kernel` has
                // recorded it, so the next start does not spend minutes failing again.
                Err(e) => {
                    let why = format!("building ours failed: {}", e.full_message().replace('\n', " "));
                    progress(&format!("using Debian's prebuilt cloud kernel ({why})"));
                    let (vmlinuz, modroot) = debian_kernel(dirs, progress)?;
                    (vmlinuz, module_set(&modroot, DEBIAN_MODULES)?)
                }
            },
            Some(why) => {
                progress(&format!("using Debian's prebuilt cloud kernel ({why})"));
                let (vmlinuz, modroot) = debian_kernel(dirs, progress)?;
                (vmlinuz, module_set(&modroot, DEBIAN_MODULES)?)
            }
        },
    };
    let initrd = match &config.initrd_path {
        Some(i) => i.clone(),
        None => default_initramfs(dirs, &modules, progress)?,
    };
    let rootfs = match config.image.as_deref() {
        None | Some("default") => config.rootfs_path.clone(),
        Some(name) => Some(crate::recipe::build_named(dirs, name, progress)?.rootfs),
    };
    Ok(BootImage { kernel, initrd: Some(initrd), rootfs })
}

/// For a kernel that is Debian's, unpacked in our cache (`debian-<package>/boot/vmlinuz-*`),
/// the directory of its modules.
fn cached_debian_modules(dirs: &Dirs, kernel: &Path) -> Option<PathBuf> {
    let package_dir = kernel.parent().filter(|b| b.file_name().is_some_and(|n| n == "boot"))?.parent()?;
    let in_cache = package_dir.parent().and_then(|d| fs::canonicalize(d).ok()) == fs::canonicalize(&dirs.images).ok();
    let debian = package_dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("debian-"));
    if !(in_cache && debian) {
        return None;
    }
    fs::read_dir(package_dir.join("lib/modules")).ok()?.flatten().map(|e| e.path()).next()
}

/// `SMOLVM_KERNEL`: whether Debian's prebuilt kernel is asked for instead of ours.
pub fn debian_kernel_asked() -> Result<bool> {
    match std::env::var("SMOLVM_KERNEL").unwrap_or_default().trim().to_ascii_lowercase().as_str() {
        "" | "auto" => Ok(false),
        "debian" => Ok(true),
        other => Err(Error::validation("SMOLVM_KERNEL", format!("{other:?} is not a kernel choice (allowed: debian, auto)"))),
    }
}

/// Why our own kernel cannot be used here, if it cannot.
fn own_kernel_unavailable(dirs: &Dirs) -> Option<String> {
    if debian_kernel_asked().unwrap_or(false) {
        return Some("SMOLVM_KERNEL=debian".into());
    }
    let Some(source) = kernel_source() else {
        return Some("no linux-source tarball to build ours from".into());
    };
    if let Some(failed) = kernel_failure_mark(dirs, &source) {
        if let Ok(text) = fs::read_to_string(&failed) {
            let first = text.lines().next().unwrap_or("").to_string();
            return Some(format!("building ours from this source failed: {first}; remove {} to try again", failed.display()));
        }
    }
    KERNEL_TOOLS.iter().find(|t| !on_path(t)).map(|t| format!("`{t}` is missing, so ours cannot be built"))
}

/// Where a failed build of our kernel from `source` is recorded (beside the cache entry it
/// would have made).
fn kernel_failure_mark(dirs: &Dirs, source: &Path) -> Option<PathBuf> {
    kernel_fingerprint(source).ok().map(|fp| dirs.images.join(format!("kernel-{fp}.failed")))
}

/// Record why building our kernel from `source` failed. Only the build's own failures: a
/// passing one (the cache's lock, a full disk while installing) must not pin the fallback.
fn record_kernel_failure(dirs: &Dirs, source: &Path, e: &Error) {
    if let Some(mark) = kernel_failure_mark(dirs, source) {
        let _ = make_images_dir(dirs);
        let _ = write_file(&mark, format!("{}\n", e.full_message().replace('\n', " ")).as_bytes());
    }
}

/// The Debian cloud kernel's drivers the sandbox needs (their dependencies come along):
/// virtio on mmio (microvm) or PCI (q35), vsock for the agent's vsock transport, and the
/// balloon, whose free page reporting hands freed guest memory back.
const DEBIAN_MODULES: &[&str] =
    &["virtio_mmio", "virtio_pci", "virtio_console", "virtio_blk", "virtio_net", "vmw_vsock_virtio_transport", "virtio_balloon"];

/// Debian's cloud kernel package, unpacked into the cache (never installed on the host):
/// returns the kernel image and the directory holding its modules.
pub fn debian_kernel(dirs: &Dirs, progress: Progress) -> Result<(PathBuf, PathBuf)> {
    let package = match std::env::var("SMOLVM_DEBIAN_KERNEL_PACKAGE") {
        Ok(p) => p,
        Err(_) => {
            let out = Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]).output().ctx(|| "running apt-cache".into())?;
            String::from_utf8_lossy(&out.stdout).lines().find_map(|l| l.trim().strip_prefix("Depends: ").map(str::to_string)).ok_or_else(
                || Error::Image("cannot find Debian's cloud kernel package (apt-cache depends linux-image-cloud-amd64)".into()),
            )?
        }
    };
    // Not empty, and not an option to apt (a leading '-').
    if !package.starts_with(|c: char| c.is_ascii_alphanumeric()) || !package.chars().all(|c| c.is_ascii_alphanumeric() || "-.+".contains(c))
    {
        return Err(Error::Image(format!("{package:?} is not a Debian package name")));
    }
    let dir = dirs.images.join(format!("debian-{package}"));
    let find = |dir: &Path| -> Option<(PathBuf, PathBuf)> {
        let boot = fs::read_dir(dir.join("boot"))
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))?;
        let modroot = fs::read_dir(dir.join("lib/modules")).ok()?.flatten().map(|e| e.path()).next()?;
        Some((boot, modroot))
    };
    if let Some(found) = find(&dir) {
        return Ok(found);
    }
    let _lock = lock_images(dirs)?;
    if let Some(found) = find(&dir) {
        return Ok(found);
    }
    progress(&format!("fetching {package} from Debian's archive (once)"));
    // (`.build-`: the next command that takes the image lock removes it if this process dies.)
    let tmp = TempDir(dirs.images.join(format!(".build-debian-kernel-{}", std::process::id())));
    fs::create_dir_all(&tmp.0).ctx(|| format!("creating {}", tmp.0.display()))?;
    run_checked(Command::new("apt-get").args(["download", "-q", &package]).current_dir(&tmp.0), "downloading the Debian kernel package")?;
    let deb = fs::read_dir(&tmp.0)
        .ctx(|| "reading the download".into())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| Error::Image("apt-get download left no .deb".into()))?;
    let unpacked = tmp.0.join("x");
    run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked), "unpacking the Debian kernel package")?;
    let _ = fs::remove_dir_all(&dir);
    seal(&unpacked).ctx(|| format!("setting the modes of {}", unpacked.display()))?;
    fs::rename(&unpacked, &dir).ctx(|| format!("installing {}", dir.display()))?;
    find(&dir).ok_or_else(|| Error::Image(format!("{package} holds no kernel image and modules")))
}

/// The modules named and everything they depend on (from each module's `depends=` field),
/// in an order that loads dependencies first: (file name, contents).
pub fn module_set(modroot: &Path, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut index = std::collections::HashMap::new();
    let mut stack = vec![modroot.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).ctx(|| format!("reading {}", d.display()))?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
                index.insert(name.replace('-', "_"), p);
            }
        }
    }
    let mut order: Vec<(String, Vec<u8>)> = Vec::new();
    fn visit(
        name: &str,
        index: &std::collections::HashMap<String, PathBuf>,
        order: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> Result<()> {
        if order.iter().any(|(n, _)| n == &format!("{name}.ko")) || depth > 32 {
            return Ok(());
        }
        // Built into the kernel: nothing to load.
        let Some(path) = index.get(name) else { return Ok(()) };
        let data = fs::read(path).ctx(|| format!("reading {}", path.display()))?;
        let deps = data
            .windows(8)
            .position(|w| w == b"depends=")
            .map(|i| {
                let rest = &data[i + 8..];
                let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
                String::from_utf8_lossy(&rest[..end]).into_owned()
            })
            .unwrap_or_default();
        for dep in deps.split(',').filter(|d| !d.is_empty()) {
            visit(&dep.replace('-', "_"), index, order, depth + 1)?;
        }
        order.push((format!("{name}.ko"), data));
        Ok(())
    }
    for w in wanted {
        visit(w, &index, &mut order, 0)?;
    }
    Ok(order)
}

/// The image cache, made if missing. It lies in the data directory by default, which is then
/// made first as the state's store makes it (0700: it keeps env values), whichever of the two
/// a fresh machine's first command needs first (an image build, say).
fn make_images_dir(dirs: &Dirs) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dirs.images.starts_with(&dirs.data) {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dirs.data)?;
    }
    make_dir(&dirs.images)
}

/// Serialize builders across processes: two CLIs starting at once build once. Whoever takes
/// the lock first removes the build directories of builders that died (an interrupted kernel
/// build leaves 1.5 GB).
pub(crate) fn lock_images(dirs: &Dirs) -> Result<nix::fcntl::Flock<fs::File>> {
    make_images_dir(dirs).ctx(|| format!("creating {}", dirs.images.display()))?;
    let f = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o644).open(dirs.images.join(".lock"))
    }
    .ctx(|| "creating the image lock".into())?;
    let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::Host(format!("locking the image cache: {e}")))?;
    for entry in fs::read_dir(&dirs.images).into_iter().flatten().flatten() {
        if dead_builders_dir(&entry.file_name().to_string_lossy()) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    Ok(lock)
}

/// `.build-WHAT-PID` (WHAT may hold dashes) whose process is gone. A pid that now names
/// another process keeps its directory until `image prune`.
fn dead_builders_dir(name: &str) -> bool {
    let pid = name.strip_prefix(".build-").and_then(|rest| rest.rsplit_once('-')).and_then(|(_, pid)| pid.parse::<u32>().ok());
    pid.is_some_and(|pid| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists())
}

fn mark_published(dir: &Path) -> Result<()> {
    make_dir(dir).ctx(|| format!("creating {}", dir.display()))?;
    write_file(&dir.join(PUBLISHED_MARK), b"").ctx(|| "marking a published entry".into())
}

/// A cached entry is usable unless it came from a published source and the user asked for
/// local builds (`SMOLVM_USE_PUBLISHED=0`).
fn cached(entry: &Path, marker_dir: &Path) -> bool {
    entry.exists() && (env_flag("SMOLVM_USE_PUBLISHED", true) || !marker_dir.join(PUBLISHED_MARK).exists())
}

/// A ready artifact from `SMOLVM_IMAGE_SOURCE` (a directory laid out like the cache).
fn published(rel: &str) -> Option<PathBuf> {
    if !env_flag("SMOLVM_USE_PUBLISHED", true) {
        return None;
    }
    let p = PathBuf::from(std::env::var_os("SMOLVM_IMAGE_SOURCE")?).join(rel);
    p.is_file().then_some(p)
}

// ---------------------------------------------------------------------------------------------
// Kernel

pub fn kernel_source() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SMOLVM_KERNEL_SOURCE") {
        return Some(PathBuf::from(p));
    }
    let mut found: Vec<PathBuf> = fs::read_dir("/usr/src")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("linux-source-") && n.ends_with(".tar.xz")))
        .collect();
    found.sort();
    found.pop()
}

/// The fingerprint of our kernel: recipe, config fragment and the source tarball's identity.
pub fn kernel_fingerprint(source: &Path) -> Result<String> {
    let meta = fs::metadata(source).ctx(|| format!("reading {}", source.display()))?;
    let name = source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(fingerprint(&[
        KERNEL_RECIPE.as_bytes(),
        KERNEL_FRAGMENT.as_bytes(),
        KERNEL_EDIT.as_bytes(),
        KERNEL_PATCHES.iter().map(|(_, diff, _)| *diff).collect::<String>().as_bytes(),
        name.as_bytes(),
        &meta.len().to_le_bytes(),
    ]))
}

pub fn default_kernel(dirs: &Dirs, progress: Progress) -> Result<PathBuf> {
    let Some(source) = kernel_source() else {
        return Err(Error::Image(
            "cannot build the guest kernel: no /usr/src/linux-source-*.tar.xz (install linux-source-6.1 with `smolvm setup`, or set kernel_path)".into(),
        ));
    };
    let fp = kernel_fingerprint(&source)?;
    let rel = format!("kernel-{fp}");
    let dir = dirs.images.join(&rel);
    let vmlinux = dir.join("vmlinux");
    if cached(&vmlinux, &dir) {
        return Ok(vmlinux);
    }
    let _lock = lock_images(dirs)?;
    if cached(&vmlinux, &dir) {
        return Ok(vmlinux);
    }
    let _ = fs::remove_dir_all(&dir);
    if let Some(ready) = published(&format!("{rel}/vmlinux")) {
        progress(&format!("using the published kernel {}", ready.display()));
        // The mark first: an entry a crash cut short after it has no kernel and is not used;
        // one cut short before it would pass for a local build.
        mark_published(&dir)?;
        install_file(&ready, &vmlinux)?;
        return Ok(vmlinux);
    }
    match build_kernel(&source, &dir, dirs, progress) {
        Ok(()) => Ok(vmlinux),
        Err(BuildFailure::Source(e)) => {
            record_kernel_failure(dirs, &source, &e);
            Err(e)
        }
        Err(BuildFailure::Passing(e)) => Err(e),
    }
}

/// Unpack a source archive into a build directory of its own (removed when the returned guard
/// goes, on every path): the guard and the tree (the directory with a Makefile).
pub(crate) fn unpack_source(dirs: &Dirs, what: &str, archive: &Path) -> Result<(TempDir, PathBuf)> {
    let tmp = TempDir(dirs.images.join(format!(".build-{what}-{}", std::process::id())));
    let _ = fs::remove_dir_all(&tmp.0);
    fs::create_dir_all(&tmp.0).ctx(|| format!("creating {}", tmp.0.display()))?;
    run_checked(Command::new("tar").arg("-xf").arg(archive).arg("-C").arg(&tmp.0), &format!("unpacking the {what} source"))?;
    let tree = fs::read_dir(&tmp.0)
        .ctx(|| format!("reading the unpacked {what} source"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("Makefile").is_file())
        .ok_or_else(|| Error::Image(format!("the {what} source archive {} holds no source tree", archive.display())))?;
    Ok((tmp, tree))
}

/// Copy into place atomically: a crash leaves no half-written cache entry.
pub(crate) fn install_file(from: &Path, to: &Path) -> Result<()> {
    let parent = to.parent().expect("cache entries have a parent");
    make_dir(parent).ctx(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".tmp-{}", std::process::id()));
    // (A copy takes its source's mode: a build's output, made under the caller's umask.)
    let r = fs::copy(from, &tmp).and_then(|_| seal(&tmp)).and_then(|_| fs::rename(&tmp, to));
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r.ctx(|| format!("installing {}", to.display()))
}

/// Removes a build directory on every exit path.
pub(crate) struct TempDir(pub(crate) PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Run a build step to its end. It dies with the thread that waits for it, and so with this
/// process: killed (or a Python program that exits after a Ctrl-C), it left a kernel's
/// unpacking or compile running for minutes into a directory the next build removes.
pub(crate) fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    crate::net::die_with_this_thread(cmd);
    let out = cmd.stdin(Stdio::null()).output().ctx(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        let tail = String::from_utf8_lossy(&out.stderr)
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(Error::Image(format!("{what} failed ({}):\n{tail}", out.status)));
    }
    Ok(())
}

/// Our one addition to the kernel: see images/lapic_timer_period.c.
fn edit_kernel_source(src: &Path) -> Result<()> {
    let path = src.join(KERNEL_EDIT_FILE);
    let text = fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?;
    let Some(at) = text.find(KERNEL_EDIT_ANCHOR) else {
        return Err(Error::Image(format!(
            "{KERNEL_EDIT_FILE} has no `lapic_timer_period` definition to extend: an unexpected kernel version"
        )));
    };
    let end = at + KERNEL_EDIT_ANCHOR.len();
    fs::write(&path, format!("{}{KERNEL_EDIT}{}", &text[..end], &text[end..])).ctx(|| format!("writing {}", path.display()))?;
    for (name, diff, (needs_file, needs_word)) in KERNEL_PATCHES {
        if !fs::read_to_string(src.join(needs_file)).is_ok_and(|t| t.contains(needs_word)) {
            continue;
        }
        let file = src.join(format!(".smolvm-{name}"));
        fs::write(&file, diff).ctx(|| format!("writing {}", file.display()))?;
        let out = Command::new("patch")
            .args(["-p1", "--forward", "--batch", "-d"])
            .arg(src)
            .arg("-i")
            .arg(&file)
            .stdin(Stdio::null())
            .output()
            .ctx(|| "running patch".into())?;
        if !out.status.success() {
            // (patch tells why on stdout.)
            let said = String::from_utf8_lossy(&out.stdout).trim().to_string() + String::from_utf8_lossy(&out.stderr).trim();
            return Err(Error::Image(format!("{name} does not apply to this kernel source: {said}")));
        }
    }
    Ok(())
}

/// Why building our kernel failed. `Source`: the build's own failure (a config that does not
/// take, a compile error), which the same source will repeat, so the fallback is pinned until
/// the mark is removed. `Passing`: what need not happen next time (a tool missing, a full
/// disk, `make` killed for memory), so the next start tries again.
enum BuildFailure {
    Source(Error),
    Passing(Error),
}

/// Whether `make` failing with this exit status and stderr is the source's doing: it exited
/// with a code (not killed), and not for want of disk or memory.
fn make_failure_is_the_source(code: Option<i32>, stderr: &str) -> bool {
    code.is_some() && !["No space left on device", "Cannot allocate memory", "Killed", "out of memory"].iter().any(|m| stderr.contains(m))
}

/// The same for a step run by `run_checked` or `unpack_source` (an archive that `tar` cannot
/// read or that holds no tree, a config step that fails): their I/O errors pass.
fn step_failure_is_the_source(e: &Error) -> bool {
    match e {
        Error::Image(m) if m.contains("holds no source tree") => true,
        Error::Image(m) => m.split_once(" failed (exit status").is_some_and(|(_, rest)| make_failure_is_the_source(Some(1), rest)),
        _ => false,
    }
}

impl BuildFailure {
    fn of_step(e: Error) -> BuildFailure {
        if step_failure_is_the_source(&e) {
            BuildFailure::Source(e)
        } else {
            BuildFailure::Passing(e)
        }
    }
}

fn build_kernel(source: &Path, out_dir: &Path, dirs: &Dirs, progress: Progress) -> std::result::Result<(), BuildFailure> {
    use BuildFailure::Passing;
    for tool in KERNEL_TOOLS {
        if !on_path(tool) {
            return Err(Passing(Error::Image(format!("building the guest kernel needs `{tool}` (install it with `smolvm setup`)"))));
        }
    }
    progress(&format!("building the guest kernel from {} (once; a few minutes)", source.display()));
    progress("  unpacking the source");
    let (tmp, src) = unpack_source(dirs, "kernel", source).map_err(BuildFailure::of_step)?;
    // A source without the place to edit is the source's doing; reading or writing it is not.
    edit_kernel_source(&src).map_err(|e| if matches!(e, Error::Io { .. }) { Passing(e) } else { BuildFailure::Source(e) })?;
    let fragment = tmp.0.join("smolvm.fragment");
    fs::write(&fragment, KERNEL_FRAGMENT).ctx(|| "writing the config fragment".into()).map_err(Passing)?;
    run_checked(
        Command::new("make").arg("-C").arg(&src).arg("allnoconfig").arg(format!("KCONFIG_ALLCONFIG={}", fragment.display())),
        "configuring the kernel",
    )
    .map_err(BuildFailure::of_step)?;
    let config = fs::read_to_string(src.join(".config")).ctx(|| "reading .config".into()).map_err(Passing)?;
    let missing = missing_options(KERNEL_FRAGMENT, &config);
    if !missing.is_empty() {
        return Err(BuildFailure::Source(Error::Image(format!("the kernel config did not take: {}", missing.join(", ")))));
    }
    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut make = Command::new("make");
    // (As `run_checked`'s.)
    crate::net::die_with_this_thread(&mut make);
    let mut child = make
        .arg("-C")
        .arg(&src)
        .arg(format!("-j{jobs}"))
        .arg("vmlinux")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| "running make".into())
        .map_err(Passing)?;
    // About 860 compile steps with our config; report every tenth of the way.
    let estimate = 860;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let err_tail = std::thread::spawn(move || BufReader::new(stderr).lines().map_while(|l| l.ok()).collect::<Vec<_>>());
    let mut compiled = 0;
    let mut reported = 0;
    for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
        if line.trim_start().starts_with("CC ") {
            compiled += 1;
            let pct = (compiled * 100 / estimate).min(99);
            if pct >= reported + 10 {
                reported = pct;
                progress(&format!("  compiling: {pct}%"));
            }
        }
    }
    let status = child.wait().ctx(|| "waiting for make".into()).map_err(Passing)?;
    let errs = err_tail.join().unwrap_or_default();
    if !status.success() {
        let tail = errs.iter().rev().take(15).rev().cloned().collect::<Vec<_>>().join("\n");
        let e = Error::Image(format!("building the kernel failed ({status}):\n{tail}"));
        return Err(if make_failure_is_the_source(status.code(), &errs.join("\n")) { BuildFailure::Source(e) } else { Passing(e) });
    }
    install_file(&src.join("vmlinux"), &out_dir.join("vmlinux")).map_err(Passing)?;
    write_file(&out_dir.join("config"), config.as_bytes()).ctx(|| "saving the kernel config".into()).map_err(Passing)?;
    progress("  guest kernel ready");
    Ok(())
}

/// Options of the fragment that the resolved config does not have as asked.
pub fn missing_options(fragment: &str, config: &str) -> Vec<String> {
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_"))
        .filter(|l| {
            let (key, val) = l.split_once('=').unwrap_or((l, ""));
            if val == "n" {
                config.lines().any(|c| c.starts_with(&format!("{key}=")))
            } else {
                !config.lines().any(|c| c == *l)
            }
        })
        .map(str::to_string)
        .collect()
}

pub(crate) fn on_path(tool: &str) -> bool {
    find_on_path(tool).is_some()
}

/// Where `tool` is on PATH, if it is.
pub(crate) fn find_on_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(tool)).find(|p| p.is_file())
}

// ---------------------------------------------------------------------------------------------
// Initramfs

/// The agent binary to put in images: `SMOLVM_AGENT_BIN`, else beside the running executable,
/// else this workspace's static build (found from the executable's location): musl, or glibc
/// linked statically where the musl target could not be had (see the Makefile).
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SMOLVM_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ctx(|| "locating the running executable".into())?;
    let builds = ["x86_64-unknown-linux-musl", "x86_64-unknown-linux-gnu"].map(|t| format!("{t}/release/smolvm-agent"));
    for dir in exe.ancestors().skip(1).take(4) {
        let places = builds.iter().flat_map(|b| [b.clone(), format!("target/{b}")]).chain(["smolvm-agent".to_string()]);
        for rel in places {
            let p = dir.join(rel);
            // A dynamically linked build (the workspace's host build) cannot run as /init.
            if p.is_file() && elf_head(&p).is_some_and(|b| is_static(&b)) {
                return Ok(p);
            }
        }
    }
    Err(Error::Image("the static guest agent binary was not found: build it with `make agent` or set SMOLVM_AGENT_BIN".into()))
}

/// The first page of a file: enough to see an ELF interpreter path, which linkers place right
/// after the program headers.
fn elf_head(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(4096);
    fs::File::open(path).ok()?.take(4096).read_to_end(&mut head).ok()?;
    Some(head)
}

/// Whether an executable needs no dynamic loader (it has no ELF interpreter path).
pub(crate) fn is_static(elf: &[u8]) -> bool {
    !elf.windows(12).any(|w| w == b"/lib64/ld-li" || w == b"/lib/ld-musl")
}

/// Regular files only: a FIFO put there (root in the guest can) would hold every login shell.
const PROFILE: &str = "\
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PS1='\\h:\\w\\$ '
for f in /etc/profile.d/*.sh; do
  [ -f \"$f\" ] && [ -r \"$f\" ] && . \"$f\"
done
unset f
";

/// Files of the image besides the agent and busybox, as (path, mode, content).
pub(crate) const FILES: &[(&str, u32, &str)] = &[
    ("etc/profile", 0o644, PROFILE),
    ("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
    ("etc/group", 0o644, "root:x:0:\nnogroup:x:65534:\n"),
    ("etc/hosts", 0o644, "127.0.0.1 localhost\n"),
    ("etc/shells", 0o644, "/bin/sh\n/bin/ash\n"),
    ("etc/os-release", 0o644, "NAME=smolvm\nID=smolvm\nPRETTY_NAME=\"smolvm minimal (busybox)\"\n"),
];
/// The directories of `DIRS` whose mode is not 0755: shared scratch space is everyone's (with
/// the sticky bit), root's home is root's alone. In every image made from them, initramfs or
/// disk, so that they agree.
pub(crate) const DIR_MODES: &[(&str, u32)] = &[("tmp", 0o1777), ("var/tmp", 0o1777), ("root", 0o700)];

fn dir_mode(dir: &str) -> u32 {
    DIR_MODES.iter().find(|(d, _)| *d == dir).map_or(0o755, |(_, m)| *m)
}

const DIRS: &[&str] = &[
    "bin",
    "sbin",
    "usr",
    "usr/bin",
    "usr/sbin",
    "usr/local",
    "usr/local/bin",
    "etc",
    "etc/profile.d",
    "proc",
    "sys",
    "dev",
    "run",
    "tmp",
    "root",
    "var",
    "var/tmp",
    "home",
    "newroot",
    "lib",
    "lib/modules",
    "mnt",
];

/// The identity of a file as the filesystem sees it: path, size, inode and change time (which
/// every write moves and no user call can set back). Same identity, same bytes.
fn file_identity(path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).ctx(|| format!("reading {}", path.display()))?;
    Ok(format!("{}:{}:{}:{}:{}.{}", path.display(), m.len(), m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Fingerprints already computed, by the identities of their inputs: `smolvm run` would
/// otherwise read and hash megabytes of agent and busybox on every start.
fn memo_path(dirs: &Dirs, key: &str) -> PathBuf {
    dirs.images.join("memo").join(key)
}

fn memo_put(dirs: &Dirs, key: &str, fp: &str) {
    let _ = make_images_dir(dirs);
    let _ = write_whole(&memo_path(dirs, key), fp.as_bytes());
}

/// A cache directory (and its parents), 0755 whatever the umask. The library runs in its
/// caller's process, whose umask may be 000 (Python's can be), and later starts trust what the
/// cache holds: kernels, disks, recipes, remembered answers.
pub(crate) fn make_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o755).create(path)
}

/// A new cache file, 0644 whatever the umask (see `make_dir`).
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(path)?.write_all(bytes)
}

/// Takes group and other write from everything under `path` (links aside): for what other
/// programs made under the caller's umask (`make`, `dpkg-deb`, `mkfs`, a supervisor's
/// snapshot) before it enters the cache. Symbolic links are not followed.
pub(crate) fn seal(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7755))?;
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            seal(&entry?.path())?;
        }
    }
    Ok(())
}

/// Writes a small cache file whole or not at all: into `.NAME.PID.tmp` beside it, then renamed
/// over it, so that processes writing the same answer at once each leave a complete file, and
/// a reader never sees half of one. (`prune` removes a temporary file whose writer is gone.)
pub(crate) fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::other(format!("{} names no file", path.display())));
    };
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let written = make_dir(dir).and_then(|_| write_file(&tmp, bytes)).and_then(|_| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

pub fn default_initramfs(dirs: &Dirs, modules: &[(String, Vec<u8>)], progress: Progress) -> Result<PathBuf> {
    let agent_path = agent_binary()?;
    let busybox_path = crate::busybox::guest(dirs, progress)?;
    let mut files: Vec<u8> = FILES.iter().flat_map(|(p, m, c)| format!("{p}:{m}:{c}").into_bytes()).collect();
    // The directories it lays out, and their modes.
    files.extend_from_slice(format!("{DIRS:?}{DIR_MODES:?}").as_bytes());
    for (name, data) in modules {
        files.extend_from_slice(name.as_bytes());
        files.extend_from_slice(fingerprint(&[data]).as_bytes());
    }
    let key = fingerprint(&[
        INITRAMFS_RECIPE.as_bytes(),
        &files,
        file_identity(&agent_path)?.as_bytes(),
        file_identity(&busybox_path)?.as_bytes(),
    ]);
    let location = |fp: &str| (dirs.images.join(format!("initramfs-{fp}")), dirs.images.join(format!("initramfs-{fp}/initramfs.cpio")));
    if let Ok(fp) = fs::read_to_string(memo_path(dirs, &key)) {
        let (dir, path) = location(fp.trim());
        if cached(&path, &dir) {
            return Ok(path);
        }
    }
    let agent = fs::read(&agent_path).ctx(|| format!("reading {}", agent_path.display()))?;
    let busybox = fs::read(&busybox_path).ctx(|| format!("reading {}", busybox_path.display()))?;
    if !is_static(&busybox) {
        return Err(Error::Image(format!("{} is dynamically linked; install busybox-static", busybox_path.display())));
    }
    let fp = fingerprint(&[INITRAMFS_RECIPE.as_bytes(), &agent, &busybox, &files]);
    let rel = format!("initramfs-{fp}/initramfs.cpio");
    let (dir, path) = location(&fp);
    memo_put(dirs, &key, &fp);
    if cached(&path, &dir) {
        return Ok(path);
    }
    let _lock = lock_images(dirs)?;
    if cached(&path, &dir) {
        return Ok(path);
    }
    let _ = fs::remove_dir_all(&dir);
    if let Some(ready) = published(&rel) {
        mark_published(&dir)?;
        install_file(&ready, &path)?;
        return Ok(path);
    }
    let applets = Command::new(&busybox_path).arg("--list-full").output().ctx(|| "listing busybox applets".into())?;
    let applets = String::from_utf8_lossy(&applets.stdout).into_owned();
    let cpio = initramfs_archive(&agent, &busybox, &applets, modules);
    make_dir(&dir).ctx(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".tmp-{}", std::process::id()));
    let r = write_file(&tmp, &cpio).and_then(|_| fs::rename(&tmp, &path));
    if r.is_err() {
        // No entry without its file: it would take a place `image prune` keeps.
        let _ = fs::remove_dir_all(&dir);
    }
    r.ctx(|| format!("writing {}", path.display()))?;
    Ok(path)
}

const ROOTFS_RECIPE: &str = "rootfs-recipe-1";
/// Size of the default ext4 root disk; the file is sparse and each sandbox writes to its own
/// copy-on-write overlay, so this costs only what is used.
const ROOTFS_SIZE: &str = "1G";

/// An ext4 root filesystem with the same busybox userland as the initramfs, for images that
/// want a disk (`rootfs_path`). The agent stays in the initramfs and switches into it.
pub fn default_rootfs(dirs: &Dirs) -> Result<PathBuf> {
    let busybox_path = crate::busybox::guest(dirs, &|_| {})?;
    let busybox = fs::read(&busybox_path).ctx(|| "reading busybox".into())?;
    let files: Vec<u8> = FILES.iter().flat_map(|(p, m, c)| format!("{p}:{m}:{c}").into_bytes()).collect();
    let modes = format!("{DIRS:?}{DIR_MODES:?}");
    let fp = fingerprint(&[ROOTFS_RECIPE.as_bytes(), &busybox, &files, ROOTFS_SIZE.as_bytes(), modes.as_bytes()]);
    let dir = dirs.images.join(format!("rootfs-{fp}"));
    let path = dir.join("rootfs.ext4");
    if path.exists() {
        return Ok(path);
    }
    let _lock = lock_images(dirs)?;
    if path.exists() {
        return Ok(path);
    }
    let work = TempDir(dirs.images.join(format!(".build-rootfs-{}", std::process::id())));
    let _ = fs::remove_dir_all(&work.0);
    // (An entry without its file: a build before this one's, cut off.)
    let _ = fs::remove_dir_all(&dir);
    let tree = work.0.join("tree");
    busybox_tree(&tree, &busybox_path)?;
    make_ext4(&tree, &path, ROOTFS_SIZE)?;
    Ok(path)
}

/// The busybox userland (a link per applet) and the minimal /etc, in `tree`.
pub(crate) fn busybox_tree(tree: &Path, busybox_path: &Path) -> Result<()> {
    let busybox = fs::read(busybox_path).ctx(|| format!("reading {}", busybox_path.display()))?;
    let applets = Command::new(busybox_path).arg("--list-full").output().ctx(|| "listing busybox applets".into())?;
    let io = (|| -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        // `/` too, whatever the umask: mkfs gives the disk's root the tree's mode.
        make_dir(tree)?;
        fs::set_permissions(tree, fs::Permissions::from_mode(0o755))?;
        for d in DIRS {
            fs::create_dir_all(tree.join(d))?;
            fs::set_permissions(tree.join(d), fs::Permissions::from_mode(dir_mode(d)))?;
        }
        fs::write(tree.join("bin/busybox"), &busybox)?;
        fs::set_permissions(tree.join("bin/busybox"), fs::Permissions::from_mode(0o755))?;
        for applet in String::from_utf8_lossy(&applets.stdout).lines().map(str::trim).filter(|a| !a.is_empty() && *a != "bin/busybox") {
            let depth = applet.matches('/').count();
            std::os::unix::fs::symlink(format!("{}bin/busybox", "../".repeat(depth)), tree.join(applet))?;
        }
        Ok(())
    })();
    io.ctx(|| "assembling the root filesystem tree".into())?;
    busybox_etc(tree)
}

/// (Re)write the minimal /etc of busybox images; it wins over files packages brought.
pub(crate) fn busybox_etc(tree: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (p, m, c) in FILES {
        let path = tree.join(p);
        let _ = fs::remove_file(&path);
        fs::write(&path, c).and_then(|_| fs::set_permissions(&path, fs::Permissions::from_mode(*m))).ctx(|| format!("writing /{p}"))?;
    }
    Ok(())
}

/// `tree` as an ext4 image of `size` (sparse) at `path`, written atomically: built beside it
/// and renamed, so a reader never sees half an image.
/// The file is made beside `tree`, in its build directory (which a later command removes if
/// this process dies), and the cache entry's directory only once it is whole: a cut-off or
/// failed mkfs leaves no entry that looks built, nor its half-made file inside one.
pub(crate) fn make_ext4(tree: &Path, path: &Path, size: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tree.with_extension("ext4");
    let made = run_checked(
        mkfs_ext4().args(["-q", "-F", "-L", "smolvm-root", "-E", "root_owner=0:0", "-d"]).arg(tree).arg(&tmp).arg(size),
        "making the ext4 root filesystem (mkfs.ext4 from e2fsprogs)",
    )
    .and_then(|_| seal(&tmp).and_then(|_| make_dir(dir)).ctx(|| format!("creating {}", dir.display())))
    .and_then(|_| fs::rename(&tmp, path).ctx(|| format!("installing {}", path.display())));
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    made
}

/// mkfs.ext4, so that the image's files belong to root. `-d` copies each file's owner, and a
/// tree built by another user is that user's: there it runs in a user namespace where that user
/// is root (and reads its files as root's). Where user namespaces are off, the files keep the
/// builder's owner.
fn mkfs_ext4() -> Command {
    if nix::unistd::geteuid().is_root() {
        return Command::new("mkfs.ext4");
    }
    let quiet = |c: &mut Command| c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if quiet(Command::new("unshare").args(["--map-root-user", "true"])).is_ok_and(|s| s.success()) {
        let mut c = Command::new("unshare");
        c.args(["--map-root-user", "mkfs.ext4"]);
        return c;
    }
    tracing::warn!("no user namespace for mkfs.ext4: the image's files keep their builder as owner");
    Command::new("mkfs.ext4")
}

/// Link `src` as `dst`, so that `dst` stays when `src`'s cache entry goes (`image rm`,
/// `image prune`, a rebuild at the same path). Across filesystems (a cache on another disk than
/// the data directory) it is copied instead, sparse: a disk base that stayed in the cache could
/// be rebuilt with other bytes under a disk that stands on it.
pub(crate) fn keep_file(src: &Path, dst: &Path) -> Result<PathBuf> {
    let _ = fs::remove_file(dst);
    match fs::hard_link(src, dst) {
        Ok(()) => Ok(dst.to_path_buf()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            run_checked(
                Command::new("cp").args(["--reflink=auto", "--sparse=always"]).arg(src).arg(dst),
                &format!("copying {} to {}", src.display(), dst.display()),
            )?;
            Ok(dst.to_path_buf())
        }
        Err(e) => Err(Error::Host(format!("linking {} to {}: {e}", src.display(), dst.display()))),
    }
}

/// Where `overlay` keeps its own link to its base: beside it.
pub fn overlay_base(overlay: &Path) -> PathBuf {
    overlay.with_file_name("base")
}

/// Refuse a `disk_size_mib` below the disk a sandbox would boot: its overlay's size once it has
/// one, else its base image's. A filesystem cannot be shrunk under a running guest, and a disk
/// smaller than the one asked for, handed over without a word, would surprise its user later
/// (a full disk).
pub fn check_disk_size(base: &Path, overlay: &Path, size_mib: Option<u32>) -> Result<()> {
    let Some(mib) = size_mib else { return Ok(()) };
    let have = if overlay.exists() { virtual_size(overlay)? } else { disk_size(base)? };
    if u64::from(mib) << 20 >= have {
        return Ok(());
    }
    let have_mib = have.div_ceil(1 << 20);
    Err(Error::validation(
        "disk_size_mib",
        format!("{mib} MiB is smaller than the disk it would boot ({have_mib} MiB): a disk can be grown, never shrunk (allowed: {have_mib} MiB or more, or none to keep its size)"),
    ))
}

/// Whether a file is a qcow2 image (by its magic, as smolvm tells QEMU each layer's format).
fn is_qcow2(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok() && &magic == b"QFI\xfb"
}

/// A root disk's layers, from `top` down, as QEMU (root, here) would open them. A qcow2
/// header may name other files, a backing file or an external data file, and QEMU opens
/// whatever it names: a disk of someone else's making could so hand the guest any host file
/// (`-b /etc/shadow`). So only the layers smolvm makes itself (a sandbox's overlay, a
/// snapshot's disk, both in the data directory, which is the host user's alone) may stand on
/// another; any other qcow2 must stand alone. Each header is read on its own (`qemu-img info`
/// without following the chain, bounded), never by opening what it names.
pub fn check_layers(top: &Path, data: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let data = fs::canonicalize(data).unwrap_or_else(|_| data.to_path_buf());
    // A sandbox's `base` is its overlay's link to what it booted from: a named image's sandbox
    // starts from it once booted, and a clone's is its snapshot's disk, a layer of smolvm's.
    // Only that: a `base` linked to a disk the user gave is the user's file, whose header the
    // user may have changed since.
    let a_snapshot_disk = |layer: &Path| {
        let Ok(meta) = fs::metadata(layer) else { return false };
        fs::read_dir(data.join("snapshots"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|snap| fs::metadata(snap.path().join("disk.qcow2")).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino()))
    };
    let ours = |layer: &Path| {
        let dir = layer.parent().and_then(|d| fs::canonicalize(d).ok());
        let place = dir.as_deref().and_then(Path::parent);
        let name = layer.file_name().and_then(|n| n.to_str());
        let in_vms = place == Some(&data.join("vms"));
        (name == Some("rootfs.qcow2") && in_vms)
            || (name == Some("base") && in_vms && a_snapshot_disk(layer))
            || (name == Some("disk.qcow2") && place == Some(&data.join("snapshots")))
    };
    let mut layer = top.to_path_buf();
    // (A snapshot of a sandbox restored from a snapshot is flattened: chains stay short.)
    for _ in 0..8 {
        if !is_qcow2(&layer) || !on_path("qemu-img") {
            return Ok(());
        }
        let out = Command::new("timeout")
            .args(["10", "qemu-img", "info", "-U", "--output=json"])
            .arg(&layer)
            .output()
            .ctx(|| "running qemu-img info".into())?;
        if !out.status.success() {
            return Err(Error::validation(
                "rootfs_path",
                format!("{} cannot be read as a qcow2 image: {}", layer.display(), String::from_utf8_lossy(&out.stderr).trim()),
            ));
        }
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let refuse = |what: &str, named: &str| {
            Error::validation(
                "rootfs_path",
                format!(
                    "{} is a qcow2 image with {what} ({named}), and a root disk may not reach other host files: give one that stands alone (`qemu-img convert -O qcow2 {} standalone.qcow2` makes one)",
                    layer.display(),
                    layer.display()
                ),
            )
        };
        if let Some(data_file) = info["format-specific"]["data"]["data-file"].as_str() {
            return Err(refuse("an external data file", data_file));
        }
        let Some(backing) = info["full-backing-filename"].as_str().or(info["backing-filename"].as_str()) else { return Ok(()) };
        if !ours(&layer) {
            return Err(refuse("a backing file", backing));
        }
        layer = PathBuf::from(backing);
    }
    Err(Error::validation("rootfs_path", format!("{}'s chain of backing files is deeper than smolvm makes", top.display())))
}

/// The size of the disk an image file holds: a qcow2 file's header says it; a raw file is its
/// own length.
fn disk_size(image: &Path) -> Result<u64> {
    fs::File::open(image).ctx(|| format!("opening {}", image.display()))?;
    if is_qcow2(image) {
        virtual_size(image)
    } else {
        Ok(fs::metadata(image).map(|m| m.len()).unwrap_or(0))
    }
}

/// A copy-on-write qcow2 overlay over `base` (created once; reused while it exists), of
/// `size_mib` when given and larger than the base: the agent grows the filesystem to fill it.
/// A warm clone's overlay starts as a copy of its template's (`from`, an overlay over the same
/// base), whose writes the saved guest's page cache and ext4 journal already hold: over an
/// empty one, the restored guest would read a disk older than it remembers. Only a new
/// overlay can so start.
pub fn overlay(base: &Path, overlay: &Path, size_mib: Option<u32>, from: Option<&Path>) -> Result<PathBuf> {
    check_disk_size(base, overlay, size_mib)?;
    if from.is_some() && overlay.exists() {
        // The template's guest would find another disk than the one it remembers.
        return Err(Error::Host(format!("a warm start needs a fresh disk, and {} exists", overlay.display())));
    }
    // Half-made overlays of a start whose process was killed (the start lock is held: no
    // other start is making one).
    if let (Some(dir), Some(name)) = (overlay.parent(), overlay.file_stem().and_then(|n| n.to_str())) {
        let prefix = format!("{name}.tmp");
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    if from.is_some() {
        fs::write(warm_disk_marker(overlay), b"").ctx(|| format!("marking {} as a warm start's", overlay.display()))?;
    }
    if overlay.exists() {
        if let Some(mib) = size_mib {
            // A sandbox's disk may be grown between starts, never shrunk.
            if u64::from(mib) << 20 > virtual_size(overlay)? {
                run_checked(Command::new("qemu-img").args(["resize", "-q"]).arg(overlay).arg(format!("{mib}M")), "growing the root disk")?;
            }
        }
        return Ok(overlay.to_path_buf());
    }
    let base = fs::canonicalize(base).ctx(|| format!("resolving {}", base.display()))?;
    // The overlay stands on its own link to the base: an image removed from the cache, or
    // rebuilt at the same path with other bytes, must not change the disk under a sandbox.
    let base = keep_file(&base, &overlay_base(overlay))?;
    fs::File::open(&base).ctx(|| format!("opening {}", base.display()))?;
    let format = if is_qcow2(&base) { "qcow2" } else { "raw" };
    let base_size = disk_size(&base)?;
    // Made beside and renamed over: an overlay left half made (the process killed) would
    // otherwise count as made, and every later start would fail on it.
    let tmp = overlay.with_extension(format!("tmp{}", std::process::id()));
    let made = match from {
        // The template's own base was a link like this one (since removed with the template's
        // sandbox): only the header's backing path changes, nothing is read through it.
        Some(from) => fs::copy(from, &tmp).ctx(|| format!("copying {}", from.display())).and_then(|_| {
            run_checked(
                Command::new("qemu-img").args(["rebase", "-u", "-F", format, "-b"]).arg(&base).arg(&tmp),
                "pointing the warm start's disk at its base (qemu-img from qemu-utils)",
            )
        }),
        None => {
            let mut cmd = Command::new("qemu-img");
            cmd.args(["create", "-q", "-f", "qcow2", "-F", format, "-b"]).arg(&base).arg(&tmp);
            if let Some(mib) = size_mib.filter(|m| u64::from(*m) << 20 > base_size) {
                cmd.arg(format!("{mib}M"));
            }
            run_checked(&mut cmd, "creating the root disk overlay (qemu-img from qemu-utils)")
        }
    };
    let made = made.and_then(|_| fs::rename(&tmp, overlay).ctx(|| format!("installing {}", overlay.display())));
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    made.map(|_| overlay.to_path_buf())
}

/// Beside a sandbox's overlay while it is still its warm start's copy of the template's disk:
/// removed once the sandbox runs (see `supervisor`). A start that finds it finds a disk of a
/// warm start that never finished (its starter and supervisor killed), holding the template's
/// writes of a boot that never ran here: no disk to boot from (`drop_unfinished_warm_disk`).
pub fn warm_disk_marker(overlay: &Path) -> PathBuf {
    overlay.with_extension("warm")
}

/// Remove a warm start's copy of the template's disk, and its marker.
pub fn remove_warm_disk(overlay: &Path) {
    let _ = fs::remove_file(overlay);
    let _ = fs::remove_file(warm_disk_marker(overlay));
}

/// Before a start: the disk of a warm start that never finished goes, so that this start is a
/// first one (and starts warm) again. Under the start lock.
pub fn drop_unfinished_warm_disk(overlay: &Path) {
    if warm_disk_marker(overlay).exists() {
        tracing::debug!("removing {}: a warm start's disk copy whose start never finished", overlay.display());
        remove_warm_disk(overlay);
    }
}

/// The size of the disk an image file holds (for qcow2, not the file's own size).
fn virtual_size(image: &Path) -> Result<u64> {
    let out = Command::new("qemu-img").args(["info", "--output=json"]).arg(image).output().ctx(|| "running qemu-img info".into())?;
    Ok(serde_json::from_slice::<serde_json::Value>(&out.stdout).ok().and_then(|v| v["virtual-size"].as_u64()).unwrap_or(0))
}

/// Whether a name in the image directory is an entry `image list` shows (and `image rm`
/// takes): an image artifact, not smolvm's own bookkeeping (remembered answers about kernel
/// and QEMU files, the host's TSC rate, memos, custom recipes, locks and work in progress).
pub fn listed_entry(name: &str) -> bool {
    !(name.starts_with('.')
        || ["host-tsc", "memo", "recipes"].contains(&name)
        || crate::vmm::qemu::REMEMBERED.iter().any(|r| name.starts_with(&format!("{r}-"))))
}

/// Remove a cache entry by name (as `image list` shows it). Running sandboxes keep what they
/// have open; later starts rebuild what they need.
pub fn remove_entry(dirs: &Dirs, name: &str) -> Result<()> {
    let not_entry = || {
        Error::validation("image", format!("{name:?} is neither an image name nor an entry of the image cache (see `smolvm image list`)"))
    };
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(not_entry());
    }
    let path = dirs.images.join(name);
    let _lock = lock_images(dirs)?;
    // An image name first: a custom image may bear the name of a cache entry (`sources`,
    // `debian-tools` beside Debian's kernel package `debian-…`), and the user means the image.
    let recipe = dirs.images.join("recipes").join(format!("{name}.json"));
    let disks: Vec<PathBuf> = fs::read_dir(&dirs.images)
        .map(|d| d.flatten().filter(|e| disk_image_name(&e.file_name().to_string_lossy()) == Some(name)).map(|e| e.path()).collect())
        .unwrap_or_default();
    if !disks.is_empty() || recipe.exists() {
        for d in disks {
            fs::remove_dir_all(&d).ctx(|| format!("removing {}", d.display()))?;
        }
        let _ = fs::remove_file(&recipe);
        crate::warm::collect(&dirs.images, None);
        return Ok(());
    }
    // (smolvm's bookkeeping is no entry.)
    // (A plain file listed is a failed kernel build's record: removed, the kernel is built
    // again instead of Debian's being used.)
    if path.is_file() && listed_entry(name) {
        fs::remove_file(&path).ctx(|| format!("removing {}", path.display()))?;
        return Ok(());
    }
    if path.is_dir() && listed_entry(name) {
        fs::remove_dir_all(&path).ctx(|| format!("removing {}", path.display()))?;
        // Warm templates booted from it too: nothing can start from them any more.
        crate::warm::collect(&dirs.images, None);
        return Ok(());
    }
    if crate::recipe::BUILTIN.contains(&name) {
        return Err(Error::validation("image", format!("{name:?} has nothing built in the image cache to remove")));
    }
    Err(not_entry())
}

/// `disk-NAME-FINGERPRINT` (a named image's root disk) -> NAME.
pub fn disk_image_name(entry: &str) -> Option<&str> {
    let rest = entry.strip_prefix("disk-")?;
    let (name, fp) = rest.rsplit_once('-')?;
    (fp.len() == 16 && fp.chars().all(|c| c.is_ascii_hexdigit())).then_some(name)
}

/// Remove what can be rebuilt cheaply or is stale: warm snapshots, leftovers of interrupted
/// builds, records of failed busybox builds (so the next start tries again), all but the two
/// newest initramfs (ours and the Debian kernel's may both be in use) and all but the newest
/// root disk (of each named image) and busybox build, and the remembered answers about kernel
/// and QEMU files. Kernels stay (they take minutes to build); remove one by name if needed. A
/// disk that a saved recipe names stays too.
pub fn prune(dirs: &Dirs) -> Result<Vec<String>> {
    let _lock = lock_images(dirs)?;
    let mut entries: Vec<(String, PathBuf, std::time::SystemTime)> = fs::read_dir(&dirs.images)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let m = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                    (e.file_name().to_string_lossy().into_owned(), e.path(), m)
                })
                .collect()
        })
        .unwrap_or_default();
    entries.sort_by_key(|e| std::cmp::Reverse(e.2));
    // The disk a saved recipe names is that image, newest or not: a recipe built again as it
    // was before finds its older disk and names it.
    let named = crate::recipe::named_disks(dirs);
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    let mut removed = Vec::new();
    for (name, path, _) in entries {
        // Each named image keeps its newest disk.
        let kind = match disk_image_name(&name) {
            Some(image) => format!("disk-{image}"),
            None => name.split('-').next().unwrap_or("").to_string(),
        };
        let keep = match kind.as_str() {
            "initramfs" => 2,
            "rootfs" | "busybox" => 1,
            k if k.starts_with("disk-") => 1,
            _ => usize::MAX,
        };
        // A record of a failed build, or a build a crash left unfinished, is stale and does not
        // take the place of a good build.
        let failed = path.join(crate::busybox::FAILED).exists()
            || (kind == "busybox" && !path.join("busybox").is_file())
            // A disk whose mkfs failed or was cut short holds no rootfs.ext4 (nor a root file
            // system or an initramfs their file).
            || ((kind.starts_with("disk-") || kind == "rootfs") && path.is_dir() && !path.join("rootfs.ext4").is_file())
            || (kind == "initramfs" && path.is_dir() && !path.join("initramfs.cpio").is_file());
        let count = seen.entry(kind).or_default();
        if !failed {
            *count += 1;
        }
        let stale = name.starts_with(".build-")
            || name.starts_with(".debian-kernel-")
            || name.starts_with(".fetch-")
            || name.contains(".tmp")
            || name.starts_with("warm-")
            || name == "memo"
            || failed
            || (*count > keep && !named.contains(&name));
        if stale && path.is_dir() && fs::remove_dir_all(&path).is_ok() {
            removed.push(name);
            continue;
        }
        // Remembered answers about files (one per kernel and QEMU binary ever looked at, which
        // tests make many of) are asked again on demand, and half-written files go.
        let mark = crate::vmm::qemu::REMEMBERED.iter().any(|r| name.starts_with(&format!("{r}-")));
        // A failed kernel build's record (`kernel-FP.failed`): the build is tried again.
        let failed_build = name.ends_with(".failed");
        if (mark || half_written(&name) || failed_build) && path.is_file() && fs::remove_file(&path).is_ok() {
            removed.push(name);
        }
    }
    // Custom recipes saved half way.
    for e in fs::read_dir(dirs.images.join("recipes")).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if half_written(&name) && fs::remove_file(e.path()).is_ok() {
            removed.push(format!("recipes/{name}"));
        }
    }
    Ok(removed)
}

/// A `write_whole` that never finished (`.NAME.PID.tmp`) whose writer is gone.
fn half_written(name: &str) -> bool {
    let writer = name.strip_suffix(".tmp").and_then(|n| n.rsplit('.').next()).and_then(|pid| pid.parse::<u32>().ok());
    name.starts_with('.') && writer.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// The initramfs: agent as /init, busybox with a link per applet, a tiny /etc.
pub fn initramfs_archive(agent: &[u8], busybox: &[u8], applets: &str, modules: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut c = Cpio::default();
    // `/` itself: else the kernel's tmpfs root keeps its default, 1777 (anyone may write there).
    c.dir(".", 0o755);
    for d in DIRS {
        c.dir(d, dir_mode(d));
    }
    c.char_dev("dev/console", 0o600, 5, 1);
    c.char_dev("dev/null", 0o666, 1, 3);
    c.file("init", 0o755, agent);
    c.file("bin/busybox", 0o755, busybox);
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty() && *a != "bin/busybox") {
        let depth = applet.matches('/').count();
        c.symlink(applet, &format!("{}bin/busybox", "../".repeat(depth)));
    }
    for (path, mode, content) in FILES {
        c.file(path, *mode, content.as_bytes());
    }
    // The agent loads these, in this order, before it looks for its channel.
    if !modules.is_empty() {
        for (name, data) in modules {
            c.file(&format!("lib/modules/{name}"), 0o644, data);
        }
        let order: String = modules.iter().map(|(n, _)| format!("{n}\n")).collect();
        c.file("lib/modules/smolvm.order", 0o644, order.as_bytes());
    }
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_smolvms_own_layers_of_a_root_disk_stand_on_other_files() {
        if !on_path("qemu-img") {
            panic!("this test needs qemu-img (`make prereqs` installs it)");
        }
        let tmp = tempfile::tempdir().unwrap();
        let (data, disks) = (tmp.path().join("data"), tmp.path().join("disks"));
        let sandbox = data.join("vms").join("0123");
        for d in [&disks, &sandbox] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(disks.join("base.raw"), vec![0u8; 1 << 20]).unwrap();
        let qcow2 = |at: &Path, extra: &[&str]| {
            run_checked(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).args(extra).arg(at).arg("1M"), "test").unwrap();
            at.to_path_buf()
        };
        let base = disks.join("base.raw").to_string_lossy().into_owned();
        // Made elsewhere: standing alone, fine; on a backing file (beside it or not) or with
        // an external data file, refused.
        assert!(check_layers(&qcow2(&disks.join("alone.qcow2"), &[]), &data).is_ok());
        assert!(check_layers(&disks.join("base.raw"), &data).is_ok());
        for (name, extra, what) in [
            ("backed.qcow2", vec!["-F", "raw", "-b", base.as_str()], "a backing file"),
            ("relative.qcow2", vec!["-F", "raw", "-b", "base.raw"], "a backing file"),
            ("datafile.qcow2", vec!["-o", &format!("data_file={base},data_file_raw=on")], "an external data file"),
        ] {
            let disk = qcow2(&disks.join(name), &extra);
            let e = check_layers(&disk, &data).unwrap_err().to_string();
            assert!(e.starts_with(&format!("invalid rootfs_path: {} is a qcow2 image with {what} (", disk.display())), "{e}");
        }
        // A sandbox's overlay stands on the disk given; that disk in turn is checked.
        let overlay = sandbox.join("rootfs.qcow2");
        qcow2(&overlay, &["-F", "qcow2", "-b", &disks.join("alone.qcow2").to_string_lossy()]);
        assert!(check_layers(&overlay, &data).is_ok());
        fs::remove_file(&overlay).unwrap();
        qcow2(&overlay, &["-F", "qcow2", "-b", &disks.join("backed.qcow2").to_string_lossy()]);
        assert!(check_layers(&overlay, &data).unwrap_err().to_string().contains("backed.qcow2 is a qcow2 image with a backing file"));
        // A clone's link to its snapshot's disk, a layer on the snapshot's base, is ours too (a
        // clone of a named image failed its second start on it).
        let snapshot = data.join("snapshots").join("s1");
        fs::create_dir_all(&snapshot).unwrap();
        let snap_disk = qcow2(&snapshot.join("disk.qcow2"), &["-F", "qcow2", "-b", &disks.join("alone.qcow2").to_string_lossy()]);
        fs::hard_link(&snap_disk, sandbox.join("base")).unwrap();
        assert!(check_layers(&sandbox.join("base"), &data).is_ok());
        // A `base` linked to a disk of someone else's making is checked as that disk.
        let other = data.join("vms").join("4567");
        fs::create_dir_all(&other).unwrap();
        fs::hard_link(disks.join("backed.qcow2"), other.join("base")).unwrap();
        assert!(check_layers(&other.join("base"), &data).unwrap_err().to_string().contains("is a qcow2 image with a backing file"));
    }

    #[test]
    fn image_list_shows_artifacts_not_bookkeeping() {
        for shown in ["kernel-19ff155fe082e117", "initramfs-02f41ec963cbd830", "disk-alpine-ssh-f155d54d3834cf33", "warm-35e64aadcc5ad934"]
        {
            assert!(listed_entry(shown), "{shown}");
        }
        for hidden in ["host-tsc", "memo", "recipes", "kernel-mmio-05a0543d585e16cc", "qemu-microvm-ff84b8b0f5f63089", ".lock"] {
            assert!(!listed_entry(hidden), "{hidden}");
        }
    }

    #[test]
    fn only_the_build_directories_of_gone_processes_are_dead() {
        let mine = format!(".build-kernel-{}", std::process::id());
        let init = ".build-disk-my-tools-1".to_string();
        let gone = {
            let mut c = std::process::Command::new("true").spawn().unwrap();
            let pid = c.id();
            c.wait().unwrap();
            format!(".build-disk-my-tools-{pid}")
        };
        assert!(dead_builders_dir(&gone));
        assert!(!dead_builders_dir(&mine) && !dead_builders_dir(&init));
        assert!(!dead_builders_dir("kernel-0123456789abcdef") && !dead_builders_dir(".build-kernel") && !dead_builders_dir(".build-x-y"));
    }

    #[test]
    fn an_image_cache_made_first_makes_the_data_directory_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("state/smolvm");
        let dirs = Dirs { data: data.clone(), images: data.join("images") };
        drop(lock_images(&dirs).unwrap());
        assert_eq!(fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
        // An image directory elsewhere leaves the data directory alone.
        let apart = Dirs { data: dir.path().join("d2"), images: dir.path().join("images2") };
        drop(lock_images(&apart).unwrap());
        assert!(!apart.data.exists());
    }

    #[test]
    fn removing_what_is_not_in_the_cache_says_which_it_is() {
        let dir = std::env::temp_dir().join(format!("smolvm-rm-{}", std::process::id()));
        let dirs = Dirs { data: dir.join("data"), images: dir.join("images") };
        std::fs::create_dir_all(&dirs.images).unwrap();
        let built_in = remove_entry(&dirs, "debian-ssh").unwrap_err().to_string();
        let unknown = remove_entry(&dirs, "nope").unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(built_in, "invalid image: \"debian-ssh\" has nothing built in the image cache to remove");
        assert!(unknown.starts_with("invalid image: \"nope\" is neither an image name nor an entry"), "{unknown}");
    }

    #[test]
    fn only_the_sources_own_build_failures_pin_the_fallback() {
        // A compile error: the same source fails again.
        assert!(make_failure_is_the_source(Some(2), "kernel/fork.c:12: error: expected ';'"));
        // Killed (for memory), or out of disk or memory: maybe not next time.
        assert!(!make_failure_is_the_source(None, ""));
        assert!(!make_failure_is_the_source(Some(2), "fatal error: cannot write: No space left on device"));
        assert!(!make_failure_is_the_source(Some(2), "gcc: fatal error: Killed signal terminated program cc1"));
        assert!(!make_failure_is_the_source(Some(2), "cc1: out of memory allocating 65536 bytes"));
        // Unpacking and configuring: an archive that is not a kernel's is the source's doing,
        // a full disk is not, nor any other I/O error.
        assert!(step_failure_is_the_source(&Error::Image("the kernel source archive /x holds no source tree".into())));
        assert!(step_failure_is_the_source(&Error::Image(
            "unpacking the kernel source failed (exit status: 2):\nxz: (stdin): File format not recognized".into()
        )));
        assert!(!step_failure_is_the_source(&Error::Image(
            "unpacking the kernel source failed (exit status: 2):\ntar: linux/x.c: Cannot write: No space left on device".into()
        )));
        assert!(!step_failure_is_the_source(&Error::Image("unpacking the kernel source failed (signal: 9 (SIGKILL))".into())));
        assert!(!step_failure_is_the_source(&Error::Io { context: "creating /x".into(), source: std::io::Error::other("no") }));
    }

    /// Run by `an_image_built_by_another_user_belongs_to_root` as that user.
    #[test]
    #[ignore = "a helper: runs as another user"]
    fn make_ext4_as_the_caller() {
        let dir = PathBuf::from(std::env::var_os("SMOLVM_EXT4_TEST_DIR").expect("run by the test below"));
        make_ext4(&dir.join("tree"), &dir.join("image.ext4"), "8M").unwrap();
    }

    #[test]
    fn an_image_built_by_another_user_belongs_to_root() {
        // Becoming another user needs root (CI and `make test` run as root).
        if !nix::unistd::geteuid().is_root() {
            panic!("this test needs root (as `make test` and CI run it)");
        }
        let dir = tempfile::Builder::new().prefix("smolvm-ext4").tempdir_in("/tmp").unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("bin")).unwrap();
        fs::write(tree.join("bin/tool"), "x").unwrap();
        // This test program, where that user can run it (a checkout under /root is not).
        let me = dir.path().join("tests");
        fs::copy(std::env::current_exe().unwrap(), &me).unwrap();
        run_checked(Command::new("chown").args(["-R", "65534:65534"]).arg(dir.path()), "chown").unwrap();
        // Where that user can neither run the copy (a noexec /tmp) nor have a user namespace
        // (some container runtimes forbid them), there is nothing to test here.
        let as_nobody = |args: &[&std::ffi::OsStr]| {
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !as_nobody(&[me.as_os_str(), "--list".as_ref()])
            || !as_nobody(&["unshare".as_ref(), "--map-root-user".as_ref(), "true".as_ref()])
        {
            panic!("this test needs another user able to run its copy, with user namespaces (as on the hosts `make test` runs on)");
        }
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&me)
            .args(["--exact", "image::tests::make_ext4_as_the_caller", "--ignored", "--test-threads=1"])
            .env("SMOLVM_EXT4_TEST_DIR", dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let stat = Command::new("debugfs").args(["-R", "stat /bin/tool"]).arg(dir.path().join("image.ext4")).output().unwrap();
        let text = String::from_utf8_lossy(&stat.stdout);
        let owner = text.lines().find(|l| l.contains("User:")).unwrap_or_default().split_whitespace().collect::<Vec<_>>();
        assert_eq!(owner[..4], ["User:", "0", "Group:", "0"], "{text}");
    }

    #[test]
    fn fragment_check_finds_options_that_did_not_take() {
        let frag = "# c\nCONFIG_A=y\nCONFIG_B=n\nCONFIG_C=32\n";
        assert!(missing_options(frag, "CONFIG_A=y\nCONFIG_C=32\n# CONFIG_B is not set\n").is_empty());
        assert_eq!(missing_options(frag, "CONFIG_B=y\nCONFIG_C=32\n"), vec!["CONFIG_A=y", "CONFIG_B=n"]);
    }

    #[test]
    fn disk_entries_name_their_image() {
        assert_eq!(disk_image_name("disk-alpine-ssh-9f71dc38da180dc8"), Some("alpine-ssh"));
        assert_eq!(disk_image_name("disk-alpine-9f71dc38da180dc8"), Some("alpine"));
        assert_eq!(disk_image_name("disk-alpine-ssh"), None);
        assert_eq!(disk_image_name("rootfs-9f71dc38da180dc8"), None);
    }

    #[test]
    fn prune_keeps_kernels_and_the_newest_images() {
        let t = tempfile::tempdir().unwrap();
        let dirs = Dirs { data: t.path().into(), images: t.path().join("images") };
        for (i, name) in [
            "initramfs-a",
            "initramfs-b",
            "initramfs-c",
            "rootfs-a",
            "rootfs-b",
            "kernel-a",
            "kernel-b",
            "warm-a",
            ".build-kernel-1",
            "busybox-a",
            "busybox-b",
            "busybox-fetch-failed",
            "sources",
        ]
        .iter()
        .enumerate()
        {
            let p = dirs.images.join(name);
            fs::create_dir_all(&p).unwrap();
            // An entry is a finished build when it holds its file.
            let file = match name.split('-').next() {
                Some("busybox") if *name != "busybox-fetch-failed" => "busybox",
                Some("initramfs") => "initramfs.cpio",
                Some("rootfs") => "rootfs.ext4",
                _ => "x",
            };
            let f = fs::File::create(p.join(file)).unwrap();
            let when = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + i as u64);
            f.set_modified(when).unwrap();
            fs::File::open(&p).unwrap().set_modified(when).unwrap();
        }
        // A record of a failed busybox fetch goes (so the next start tries again).
        fs::write(dirs.images.join("busybox-fetch-failed").join(crate::busybox::FAILED), "offline").unwrap();
        // Remembered answers go; the host's TSC figure stays.
        // (Pid 999999999 runs nothing; this test's own pid is alive, its file is being written.)
        let own = format!(".host-tsc.{}.tmp", std::process::id());
        for mark in [
            "kernel-mmio-0123",
            "qemu-microvm-4567",
            ".host-tsc.999999999.tmp",
            ".kernel-mmio-89ab.999999999.tmp",
            own.as_str(),
            "host-tsc",
        ] {
            fs::write(dirs.images.join(mark), "1").unwrap();
        }
        let mut removed = prune(&dirs).unwrap();
        removed.sort();
        assert_eq!(
            removed,
            [
                ".build-kernel-1",
                ".host-tsc.999999999.tmp",
                ".kernel-mmio-89ab.999999999.tmp",
                "busybox-a",
                "busybox-fetch-failed",
                "initramfs-a",
                "kernel-mmio-0123",
                "qemu-microvm-4567",
                "rootfs-a",
                "warm-a"
            ]
        );
        assert!(dirs.images.join("host-tsc").is_file() && dirs.images.join(&own).is_file());
        fs::remove_file(dirs.images.join(&own)).unwrap();
        assert!(dirs.images.join("busybox-b").exists() && dirs.images.join("sources").exists());
        // A busybox entry a crash left without its binary does not count as the newest build.
        fs::create_dir_all(dirs.images.join("busybox-c")).unwrap();
        assert_eq!(prune(&dirs).unwrap(), ["busybox-c"]);
        assert!(dirs.images.join("busybox-b").exists());
        // Likewise a disk whose mkfs failed: the good, older disk of that image stays.
        let good = dirs.images.join("disk-tools-aaaaaaaaaaaaaaaa");
        fs::create_dir_all(&good).unwrap();
        fs::write(good.join("rootfs.ext4"), b"ext4").unwrap();
        fs::File::open(&good).unwrap().set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(60)).unwrap();
        fs::create_dir_all(dirs.images.join("disk-tools-bbbbbbbbbbbbbbbb")).unwrap();
        fs::create_dir_all(dirs.images.join(".fetch-busybox-123")).unwrap();
        let mut removed = prune(&dirs).unwrap();
        removed.sort();
        assert_eq!(removed, [".fetch-busybox-123", "disk-tools-bbbbbbbbbbbbbbbb"]);
        assert!(good.join("rootfs.ext4").exists());
        // The disk a saved recipe names stays, however old: that recipe was built again as it
        // was, after another version of it.
        let newer = dirs.images.join("disk-tools-cccccccccccccccc");
        fs::create_dir_all(&newer).unwrap();
        fs::write(newer.join("rootfs.ext4"), b"ext4").unwrap();
        fs::create_dir_all(dirs.images.join("recipes")).unwrap();
        let saved = r#"{"name":"tools","base":"busybox","packages":[],"files":[],"size_mib":64,"built":"disk-tools-aaaaaaaaaaaaaaaa"}"#;
        fs::write(dirs.images.join("recipes/tools.json"), saved).unwrap();
        assert_eq!(prune(&dirs).unwrap(), Vec::<String>::new());
        assert!(good.join("rootfs.ext4").exists() && newer.exists());
        fs::remove_file(dirs.images.join("recipes/tools.json")).unwrap();
        assert_eq!(prune(&dirs).unwrap(), ["disk-tools-aaaaaaaaaaaaaaaa"]);
        assert!(dirs.images.join("kernel-a").exists() && dirs.images.join("initramfs-c").exists());
        assert!(remove_entry(&dirs, "../x").is_err());
        remove_entry(&dirs, "kernel-a").unwrap();
        assert!(!dirs.images.join("kernel-a").exists());
        // Entries without their file (a build cut off or failed) do not count as the newest;
        // a failed kernel build's record, a half-saved recipe of a dead process and a Debian
        // kernel's download cut off go.
        fs::create_dir_all(dirs.images.join("rootfs-d")).unwrap();
        fs::create_dir_all(dirs.images.join("initramfs-d")).unwrap();
        fs::write(dirs.images.join("kernel-b.failed"), b"").unwrap();
        fs::create_dir_all(dirs.images.join("recipes")).unwrap();
        fs::write(dirs.images.join("recipes/.mine.json.999999999.tmp"), b"{").unwrap();
        fs::write(dirs.images.join("recipes/mine.json"), b"{}").unwrap();
        fs::create_dir_all(dirs.images.join(".build-debian-kernel-999999999")).unwrap();
        let mut removed = prune(&dirs).unwrap();
        removed.sort();
        assert_eq!(removed, ["initramfs-d", "kernel-b.failed", "recipes/.mine.json.999999999.tmp", "rootfs-d"]);
        // (A dead process's build directory goes as soon as the image lock is taken.)
        assert!(!dirs.images.join(".build-debian-kernel-999999999").exists());
        assert!(dirs.images.join("initramfs-c").exists() && dirs.images.join("recipes/mine.json").exists());
        // `image list` shows such a record, and `image rm` takes it.
        fs::write(dirs.images.join("kernel-c.failed"), b"").unwrap();
        remove_entry(&dirs, "kernel-c.failed").unwrap();
        assert!(!dirs.images.join("kernel-c.failed").exists());
    }

    #[test]
    fn removing_an_image_named_like_a_cache_entry_removes_the_image() {
        let t = tempfile::tempdir().unwrap();
        let dirs = Dirs { data: t.path().join("data"), images: t.path().join("images") };
        // Busybox's source, and a custom image called `sources`.
        fs::create_dir_all(dirs.images.join("sources")).unwrap();
        fs::write(dirs.images.join("sources/busybox_1.35.0.orig.tar.bz2"), b"src").unwrap();
        let disk = dirs.images.join("disk-sources-aaaaaaaaaaaaaaaa");
        fs::create_dir_all(&disk).unwrap();
        fs::write(disk.join("rootfs.ext4"), b"ext4").unwrap();
        fs::create_dir_all(dirs.images.join("recipes")).unwrap();
        fs::write(dirs.images.join("recipes/sources.json"), b"{}").unwrap();
        remove_entry(&dirs, "sources").unwrap();
        assert!(!disk.exists() && !dirs.images.join("recipes/sources.json").exists());
        assert!(dirs.images.join("sources/busybox_1.35.0.orig.tar.bz2").exists(), "the cache entry went instead");
        // Once the image is gone, the name is the entry's.
        remove_entry(&dirs, "sources").unwrap();
        assert!(!dirs.images.join("sources").exists());
        let err = remove_entry(&dirs, "sources").unwrap_err().to_string();
        assert!(err.contains("is neither an image name nor an entry of the image cache"), "{err}");
        assert_eq!(
            remove_entry(&dirs, "debian-ssh").unwrap_err().to_string(),
            "invalid image: \"debian-ssh\" has nothing built in the image cache to remove"
        );
    }

    #[test]
    fn removing_an_image_removes_the_warm_templates_of_its_disks() {
        let t = tempfile::tempdir().unwrap();
        let dirs = Dirs { data: t.path().join("data"), images: t.path().join("images") };
        let disk = dirs.images.join("disk-tools-aaaaaaaaaaaaaaaa");
        fs::create_dir_all(&disk).unwrap();
        fs::write(disk.join("rootfs.ext4"), b"ext4").unwrap();
        let kernel = dirs.images.join("vmlinux");
        fs::write(&kernel, b"k").unwrap();
        let template = |name: &str, rootfs: Option<PathBuf>| {
            let dir = dirs.images.join(name);
            fs::create_dir_all(&dir).unwrap();
            let image = BootImage { kernel: kernel.clone(), initrd: None, rootfs };
            fs::write(dir.join("image.json"), serde_json::to_vec(&image).unwrap()).unwrap();
            fs::write(dir.join("state"), b"").unwrap();
            dir
        };
        let of_disk = template("warm-1111111111111111", Some(disk.join("rootfs.ext4")));
        let without = template("warm-2222222222222222", None);
        remove_entry(&dirs, "tools").unwrap();
        assert!(!disk.exists() && !of_disk.exists());
        assert!(without.exists(), "a template of no removed file went");
    }

    #[test]
    fn a_kept_file_is_a_link_or_across_filesystems_a_sparse_copy() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("base");
        fs::write(&src, b"same filesystem").unwrap();
        let linked = keep_file(&src, &t.path().join("link")).unwrap();
        assert_eq!(fs::metadata(&linked).unwrap().ino(), fs::metadata(&src).unwrap().ino());
        // /dev/shm is a tmpfs: another filesystem than the temp directory's here.
        let Ok(shm) = tempfile::tempdir_in("/dev/shm") else { return };
        if fs::metadata(shm.path()).unwrap().dev() == fs::metadata(t.path()).unwrap().dev() {
            return;
        }
        let disk = shm.path().join("disk");
        let f = fs::File::create(&disk).unwrap();
        f.set_len(64 << 20).unwrap();
        std::io::Write::write_all(&mut &f, b"data at the start").unwrap();
        let copy = keep_file(&disk, &t.path().join("copy")).unwrap();
        assert_eq!(copy, t.path().join("copy"));
        assert_ne!(fs::metadata(&copy).unwrap().dev(), fs::metadata(&disk).unwrap().dev());
        assert_eq!(fs::metadata(&copy).unwrap().len(), 64 << 20);
        assert!(fs::metadata(&copy).unwrap().blocks() * 512 < 1 << 20, "the copy is not sparse");
        assert!(fs::read(&copy).unwrap().starts_with(b"data at the start"));
    }

    #[test]
    fn fingerprints_change_with_any_input() {
        let a = fingerprint(&[b"ab", b"c"]);
        assert_eq!(a, fingerprint(&[b"ab", b"c"]));
        assert_ne!(a, fingerprint(&[b"a", b"bc"]));
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn archive_links_applets_relative_to_busybox() {
        let bytes = initramfs_archive(b"AGENT", b"BUSYBOX", "bin/sh\nusr/bin/awk\n", &[("virtio.ko".into(), b"MOD".to_vec())]);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("usr/bin/awk\0"));
        assert!(text.contains("../../bin/busybox"));
        assert!(text.contains("AGENT"));
        assert!(text.contains("TRAILER!!!"));
        assert!(text.contains("lib/modules/smolvm.order\0") && text.contains("virtio.ko\n"));
        // The root's own entry comes first, as a directory of mode 0755 (fields: magic, ino, mode).
        assert_eq!(&bytes[..22], b"07070100000001000041ed");
        assert_eq!(&bytes[110..112], b".\0");
    }
}
