//! The guest's busybox: built once from Debian's source package with musl, static, cached by
//! fingerprint like the kernel. Debian's own `busybox-static` is linked with glibc, whose
//! static start-up (IRELATIVE relocations, CPU feature probing, tunables) runs before every
//! command; under TCG a cold guest translates all of that on the way to its first command.
//! The musl build starts with a fraction of the code and is 40 % smaller in every guest's RAM.
//! Measured here, interleaved: cold `smolvm run true` 8-13 ms faster. Where the source, the
//! toolchain or the network is missing, or the build fails, Debian's binary serves instead.

use crate::config::Dirs;
use crate::error::{Error, IoContext, Result};
use crate::image::{fingerprint, install_file, lock_images, missing_options, on_path, run_checked, unpack_source, Progress, TempDir};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Options changed from busybox's `defconfig`, in the kernel fragment format (`=n` to disable).
pub const FRAGMENT: &str = include_str!("../../../images/busybox.fragment");
/// Bump when the way busybox is built changes without its inputs changing.
const RECIPE: &str = "busybox-recipe-2";
/// A failed fetch or build leaves this file (holding the error) in its cache entry: retrying
/// on every start would cost each `smolvm run` the failure again (an offline host waits for
/// the network each time). `smolvm image prune` removes the record.
pub(crate) const FAILED: &str = "build-failed";
/// The cache entry that records a failed fetch (a build's record sits in its own entry).
const FETCH_FAILED: &str = "busybox-fetch-failed";
const BUILD_TOOLS: [&str; 6] = ["musl-gcc", "make", "tar", "patch", "bzip2", "xz"];

/// Debian's source package: the upstream tarball and Debian's patches to it.
pub struct Source {
    pub orig: PathBuf,
    pub debian: Option<PathBuf>,
}

/// Our fetch keeps the package in the image cache; `SMOLVM_BUSYBOX_SOURCE` points at one the
/// user keeps (for hosts without the network; it is never written to).
fn source_dir(dirs: &Dirs) -> (PathBuf, bool) {
    match std::env::var_os("SMOLVM_BUSYBOX_SOURCE") {
        Some(d) => (PathBuf::from(d), false),
        None => (dirs.images.join("sources"), true),
    }
}

pub fn source(dirs: &Dirs) -> Option<Source> {
    source_in(&source_dir(dirs).0)
}

/// The newest upstream tarball in `dir`, and the newest patch tarball of its version (by
/// modification time: version strings such as `4+deb12u1` and `4.1` do not sort as text).
fn source_in(dir: &Path) -> Option<Source> {
    let mut files: Vec<(String, std::time::SystemTime, PathBuf)> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    files.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    let (name, _, orig) = files.iter().rev().find(|(n, _, _)| n.starts_with("busybox_") && n.contains(".orig.tar."))?;
    let version = name.strip_prefix("busybox_")?.split(".orig.tar.").next()?;
    let debian = files
        .iter()
        .rev()
        .find(|(n, _, _)| n.starts_with(&format!("busybox_{version}-")) && n.contains(".debian.tar."))
        .map(|f| f.2.clone());
    Some(Source { orig: orig.clone(), debian })
}

/// Download Debian's busybox source package into the image cache. apt checks it against the
/// archive key; its state is private to this fetch, so the host's apt configuration is neither
/// needed (no deb-src lines) nor changed. The package appears in the cache in one rename, never
/// half-written.
fn fetch_source(dirs: &Dirs, progress: Progress) -> Result<Source> {
    let (dir, ours) = source_dir(dirs);
    let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
    if !ours {
        return Err(Error::Image(format!("SMOLVM_BUSYBOX_SOURCE={} holds no busybox_*.orig.tar.*", dir.display())));
    }
    progress(&format!("fetching Debian's busybox source package into {}", dir.display()));
    // (`.build-`: the next command that takes the image lock removes it if this process dies.)
    let tmp = TempDir(dirs.images.join(format!(".build-fetch-busybox-{}", std::process::id())));
    let _ = fs::remove_dir_all(&tmp.0);
    for d in ["lists/partial", "cache/archives/partial", "out"] {
        fs::create_dir_all(tmp.0.join(d)).ctx(|| format!("creating {}", tmp.0.display()))?;
    }
    // apt downloads as its own unprivileged user, which must be able to reach the directories.
    for d in [tmp.0.clone(), tmp.0.join("out")] {
        let _ = fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    }
    let list = tmp.0.join("sources.list");
    let line = format!("deb-src [signed-by={}] {} {} main\n", keyring.display(), crate::recipe::mirror(), crate::recipe::SUITE);
    fs::write(&list, line).ctx(|| "writing the apt source list".into())?;
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.arg("-qq");
        for (key, value) in [
            ("Dir::Etc::SourceList", list.display().to_string()),
            ("Dir::Etc::SourceParts", "/dev/null".into()),
            ("Dir::State::Lists", tmp.0.join("lists").display().to_string()),
            ("Dir::Cache", tmp.0.join("cache").display().to_string()),
            // Offline, fail fast: this runs on the way to a first sandbox.
            ("Acquire::Retries", "0".into()),
            ("Acquire::http::Timeout", "20".into()),
        ] {
            cmd.arg("-o").arg(format!("{key}={value}"));
        }
        cmd.args(args).current_dir(tmp.0.join("out"));
        cmd
    };
    run_checked(&mut apt(&["update"]), "apt-get update (busybox source)")?;
    // apt-get update succeeds even when nothing could be downloaded; say what went wrong.
    let indexed = fs::read_dir(tmp.0.join("lists"))
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().contains("_Sources")))
        .unwrap_or(false);
    if !indexed {
        return Err(Error::Image(format!("could not download the source index from {} (offline?)", crate::recipe::mirror())));
    }
    run_checked(&mut apt(&["source", "--download-only", "busybox"]), "apt-get source busybox")?;
    let got = source_in(&tmp.0.join("out"));
    if got.as_ref().is_none_or(|s| s.debian.is_none()) {
        return Err(Error::Image("apt-get source busybox left no upstream and Debian tarball".into()));
    }
    let _ = fs::remove_dir_all(&dir);
    fs::rename(tmp.0.join("out"), &dir).ctx(|| format!("saving the source in {}", dir.display()))?;
    source_in(&dir).ok_or_else(|| Error::Image(format!("{} lost the busybox source", dir.display())))
}

/// The busybox that goes into guests: `SMOLVM_BUSYBOX` if set, else our musl build (built
/// here on first use, about half a minute), else Debian's `busybox-static`.
pub fn guest(dirs: &Dirs, progress: Progress) -> Result<PathBuf> {
    if std::env::var_os("SMOLVM_BUSYBOX").is_some() {
        return prebuilt();
    }
    match own(dirs, progress) {
        Ok(Some(path)) => Ok(path),
        Ok(None) => prebuilt(),
        Err(e) => {
            let why =
                format!("using Debian's busybox-static: {} (after fixing that, `smolvm image prune` lets it try again)", e.full_message());
            tracing::info!("{why}");
            progress(&why);
            prebuilt()
        }
    }
}

/// `SMOLVM_BUSYBOX`, else Debian's `busybox-static`.
pub fn prebuilt() -> Result<PathBuf> {
    let candidates =
        std::env::var_os("SMOLVM_BUSYBOX").map(PathBuf::from).into_iter().chain(["/bin/busybox", "/usr/bin/busybox"].map(PathBuf::from));
    for p in candidates {
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::Image("busybox was not found: install busybox-static (`smolvm setup`)".into()))
}

/// Why our build cannot be had now without trying (a missing tool or key is not recorded as a
/// failure: installing it is enough), or the recorded error of an earlier try.
pub fn unavailable(dirs: &Dirs) -> Option<String> {
    if let Some(tool) = BUILD_TOOLS.iter().find(|t| !on_path(t)) {
        return Some(format!("`{tool}` is not installed"));
    }
    let recorded = |entry: PathBuf| fs::read_to_string(entry.join(FAILED)).ok();
    match source(dirs) {
        Some(src) => recorded(build_dir(dirs, &src).ok()?),
        None if !on_path("apt-get") => Some("no busybox source, and no apt-get to fetch it".into()),
        None if !Path::new("/usr/share/keyrings/debian-archive-keyring.gpg").is_file() => {
            Some("no busybox source, and no debian-archive-keyring to check a fetched one".into())
        }
        None => recorded(dirs.images.join(FETCH_FAILED)),
    }
}

fn source_fingerprint(src: &Source) -> Result<String> {
    let mut parts: Vec<Vec<u8>> = vec![RECIPE.into(), FRAGMENT.into()];
    for p in std::iter::once(&src.orig).chain(src.debian.as_ref()) {
        let len = fs::metadata(p).ctx(|| format!("reading {}", p.display()))?.len();
        parts.push(p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().into());
        parts.push(len.to_le_bytes().to_vec());
    }
    Ok(fingerprint(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>()))
}

/// Where our busybox is built from `src`: keyed on the source and our recipe.
fn build_dir(dirs: &Dirs, src: &Source) -> Result<PathBuf> {
    Ok(dirs.images.join(format!("busybox-{}", source_fingerprint(src)?)))
}

/// Our musl busybox, where it has been built already (doctor says so).
pub fn built(dirs: &Dirs) -> Option<PathBuf> {
    let bin = build_dir(dirs, &source(dirs)?).ok()?.join("busybox");
    bin.is_file().then_some(bin)
}

/// Our build, or `None` where it cannot be had (see `unavailable`).
fn own(dirs: &Dirs, progress: Progress) -> Result<Option<PathBuf>> {
    // The fast path of every start: a finished build.
    if let Some(bin) = built(dirs) {
        return Ok(Some(bin));
    }
    if unavailable(dirs).is_some() {
        return Ok(None);
    }
    let _lock = lock_images(dirs)?;
    // Another process may have fetched, built or failed meanwhile.
    if unavailable(dirs).is_some() {
        return Ok(None);
    }
    let src = match source(dirs) {
        Some(src) => src,
        None => fetch_source(dirs, progress).inspect_err(|e| record(&dirs.images.join(FETCH_FAILED), e))?,
    };
    let dir = build_dir(dirs, &src)?;
    let bin = dir.join("busybox");
    if bin.is_file() {
        return Ok(Some(bin));
    }
    let _ = fs::remove_dir_all(&dir);
    build(&src, &bin, dirs, progress).inspect_err(|e| record(&dir, e))?;
    Ok(Some(bin))
}

fn record(entry: &Path, e: &Error) {
    let _ = crate::image::make_dir(entry).and_then(|_| crate::image::write_file(&entry.join(FAILED), e.full_message().as_bytes()));
}

/// Only the kernel's own headers may come from the host (musl has none of them): a glibc
/// header must not stand in for one that musl lacks.
fn kernel_headers(dir: &Path) -> Result<()> {
    for (name, target) in [
        ("linux", "/usr/include/linux"),
        ("asm", "/usr/include/x86_64-linux-gnu/asm"),
        ("asm-generic", "/usr/include/asm-generic"),
        ("mtd", "/usr/include/mtd"),
    ] {
        std::os::unix::fs::symlink(target, dir.join(name)).ctx(|| format!("linking {target}"))?;
    }
    Ok(())
}

fn build(src: &Source, bin: &Path, dirs: &Dirs, progress: Progress) -> Result<()> {
    progress(&format!("building busybox (musl, static) from {} (once; about half a minute)", src.orig.display()));
    let (tmp, tree) = unpack_source(dirs, "busybox", &src.orig)?;
    if let Some(debian) = &src.debian {
        // Debian's patches (its fixes, CVEs among them), in its order.
        run_checked(Command::new("tar").arg("-xf").arg(debian).arg("-C").arg(&tree), "unpacking Debian's busybox patches")?;
        let series = fs::read_to_string(tree.join("debian/patches/series")).unwrap_or_default();
        for patch in series.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            run_checked(
                Command::new("patch")
                    .arg("-p1")
                    .arg("-N")
                    .arg("-s")
                    .arg("-i")
                    .arg(tree.join("debian/patches").join(patch))
                    .current_dir(&tree),
                &format!("applying Debian's {patch}"),
            )?;
        }
    }
    let headers = tmp.0.join("kernel-headers");
    fs::create_dir_all(&headers).ctx(|| "creating the header directory".into())?;
    kernel_headers(&headers)?;
    // No build time in the binary: the same source and toolchain give the same busybox, and so
    // the same initramfs fingerprint, on every host (published images stay usable).
    run_checked(Command::new("make").arg("-C").arg(&tree).arg("defconfig").env("KCONFIG_NOTIMESTAMP", "1"), "configuring busybox")?;
    let config_path = tree.join(".config");
    let config = fs::read_to_string(&config_path).ctx(|| "reading busybox's .config".into())?;
    fs::write(&config_path, apply_fragment(&config, FRAGMENT)).ctx(|| "writing busybox's .config".into())?;
    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    progress("  compiling");
    run_checked(
        Command::new("make")
            .env("KCONFIG_NOTIMESTAMP", "1")
            .arg("-C")
            .arg(&tree)
            .arg(format!("-j{jobs}"))
            .arg("CC=musl-gcc")
            .arg(format!("EXTRA_CFLAGS=-idirafter {}", headers.display()))
            .arg("busybox"),
        "building busybox",
    )?;
    let config = fs::read_to_string(&config_path).ctx(|| "reading busybox's .config".into())?;
    let missing = missing_options(FRAGMENT, &config);
    if !missing.is_empty() {
        return Err(Error::Image(format!("the busybox config did not take: {}", missing.join(", "))));
    }
    let built = tree.join("busybox");
    if !crate::image::is_static(&fs::read(&built).ctx(|| "reading the built busybox".into())?) {
        return Err(Error::Image("the built busybox is not statically linked".into()));
    }
    install_file(&built, bin)?;
    progress("  busybox ready");
    Ok(())
}

/// `config` (a `.config`) with the fragment's options set, replacing the options' lines:
/// busybox's `make` then resolves the rest without asking (nothing new appears).
pub fn apply_fragment(config: &str, fragment: &str) -> String {
    let wanted: Vec<(&str, &str)> =
        fragment.lines().map(str::trim).filter(|l| l.starts_with("CONFIG_")).filter_map(|l| l.split_once('=')).collect();
    let key_of = |line: &str| -> Option<String> {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("# ") {
            rest.strip_suffix(" is not set").map(str::to_string)
        } else {
            l.split_once('=').map(|(k, _)| k.to_string())
        }
    };
    let mut out: Vec<String> =
        config.lines().filter(|l| !key_of(l).is_some_and(|k| wanted.iter().any(|(w, _)| *w == k))).map(str::to_string).collect();
    for (key, val) in wanted {
        out.push(if val == "n" { format!("# {key} is not set") } else { format!("{key}={val}") });
    }
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fragment_sets_enables_and_disables_options() {
        let config = "# comment\nCONFIG_A=y\n# CONFIG_STATIC is not set\nCONFIG_TC=y\nCONFIG_NAME=\"x\"\n";
        let out = apply_fragment(config, "CONFIG_STATIC=y\nCONFIG_TC=n\n# note\nCONFIG_NAME=\"y\"\n");
        assert!(out.contains("CONFIG_A=y\n") && out.contains("# comment\n"), "{out}");
        assert!(out.contains("CONFIG_STATIC=y\n") && !out.contains("# CONFIG_STATIC is not set"), "{out}");
        assert!(out.contains("# CONFIG_TC is not set\n") && !out.contains("CONFIG_TC=y"), "{out}");
        assert!(out.contains("CONFIG_NAME=\"y\"\n") && !out.contains("\"x\""), "{out}");
        assert!(missing_options("CONFIG_STATIC=y\nCONFIG_TC=n", &out).is_empty());
    }

    #[test]
    fn the_fragment_keeps_our_build_static_and_buildable_with_musl() {
        for line in ["CONFIG_STATIC=y", "CONFIG_TC=n", "CONFIG_FEATURE_HAVE_RPC=n"] {
            assert!(FRAGMENT.lines().any(|l| l.trim() == line), "{line} missing from images/busybox.fragment");
        }
    }

    #[test]
    fn the_source_is_found_with_the_newest_debian_patches_of_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str, secs: u64| {
            let f = fs::File::create(dir.path().join(name)).unwrap();
            f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + secs)).unwrap();
        };
        assert!(source_in(dir.path()).is_none());
        at("busybox_1.35.0.orig.tar.bz2", 1);
        at("busybox_1.35.0-4.1.debian.tar.xz", 2);
        at("busybox_1.35.0-4+deb12u1.debian.tar.xz", 3);
        at("busybox_1.36.0-1.debian.tar.xz", 4);
        at("other.tar", 5);
        let src = source_in(dir.path()).expect("found");
        assert!(src.orig.ends_with("busybox_1.35.0.orig.tar.bz2"));
        assert!(src.debian.as_deref().is_some_and(|d| d.ends_with("busybox_1.35.0-4+deb12u1.debian.tar.xz")), "{:?}", src.debian);
    }
}
