//! The guest's busybox: built once from Debian's source package with musl, static, cached by
//! fingerprint like the kernel. Debian's own `busybox-static` is linked with glibc, whose
//! static start-up (IRELATIVE relocations, CPU feature probing, tunables) runs before every
//! command; under TCG a cold guest translates all of that on the way to its first command.
//! The musl build starts with a fraction of the code and is 40 % smaller in every guest's RAM.
//! Measured here, interleaved: cold `smolvm run true` 8-13 ms faster. Where the source or
//! musl-gcc is missing, or the build fails, Debian's binary serves instead.

use crate::config::Dirs;
use crate::error::{Error, IoContext, Result};
use crate::image::{fingerprint, lock_images, missing_options, on_path, run_checked, Progress, TempDir};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Options changed from busybox's `defconfig`, in the kernel fragment format (`=n` to disable).
pub const FRAGMENT: &str = include_str!("../../../images/busybox.fragment");
/// Bump when the way busybox is built changes without its inputs changing.
const RECIPE: &str = "busybox-recipe-1";
/// Records a failed build in its cache entry, so that it is not retried on every start.
pub(crate) const FAILED: &str = "build-failed";

/// Debian's source package as `apt-get source --download-only busybox` leaves it: the
/// upstream tarball and, if there, Debian's patches.
pub struct Source {
    pub orig: PathBuf,
    pub debian: Option<PathBuf>,
}

/// Where the source is looked for: `SMOLVM_BUSYBOX_SOURCE` if set, else where `fetch_source`
/// puts it.
fn source_dir(dirs: &Dirs) -> PathBuf {
    std::env::var_os("SMOLVM_BUSYBOX_SOURCE").map(PathBuf::from).unwrap_or_else(|| dirs.images.join("sources"))
}

pub fn source(dirs: &Dirs) -> Option<Source> {
    source_in(&source_dir(dirs))
}

/// Download Debian's busybox source package (signed by the archive key, checked by apt) into
/// the image cache, with a private apt state: nothing of the host's apt configuration changes.
fn fetch_source(dirs: &Dirs, progress: Progress) -> Result<Source> {
    let dir = source_dir(dirs);
    let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
    if !on_path("apt-get") || !keyring.is_file() {
        return Err(Error::Image("fetching the busybox source needs apt-get and debian-archive-keyring".into()));
    }
    progress(&format!("fetching Debian's busybox source package into {}", dir.display()));
    let tmp = TempDir(dirs.images.join(format!(".fetch-busybox-{}", std::process::id())));
    let _ = fs::remove_dir_all(&tmp.0);
    for d in ["lists/partial", "cache/archives/partial", "out"] {
        fs::create_dir_all(tmp.0.join(d)).ctx(|| format!("creating {}", tmp.0.display()))?;
    }
    // apt drops to its own user to download: let it into the work directory.
    let _ = fs::set_permissions(&tmp.0, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    let list = tmp.0.join("sources.list");
    let line = format!("deb-src [signed-by={}] {} {} main\n", keyring.display(), crate::recipe::mirror(), crate::recipe::SUITE);
    fs::write(&list, line).ctx(|| "writing the apt source list".into())?;
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.arg("-qq")
            .arg("-o")
            .arg(format!("Dir::Etc::SourceList={}", list.display()))
            .arg("-o")
            .arg("Dir::Etc::SourceParts=/dev/null")
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", tmp.0.join("lists").display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", tmp.0.join("cache").display()))
            .args(args)
            .current_dir(tmp.0.join("out"));
        cmd
    };
    run_checked(&mut apt(&["update"]), "apt-get update (busybox source)")?;
    run_checked(&mut apt(&["source", "--download-only", "busybox"]), "apt-get source busybox")?;
    fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    for entry in fs::read_dir(tmp.0.join("out")).ctx(|| "reading the downloaded source".into())?.flatten() {
        let to = dir.join(entry.file_name());
        fs::copy(entry.path(), &to).ctx(|| format!("saving {}", to.display()))?;
    }
    source_in(&dir).ok_or_else(|| Error::Image("apt-get source left no busybox tarball".into()))
}

fn source_in(dir: &Path) -> Option<Source> {
    let mut names: Vec<String> = fs::read_dir(dir).ok()?.flatten().filter_map(|e| e.file_name().to_str().map(str::to_string)).collect();
    names.sort();
    let orig = names.iter().rev().find(|n| n.starts_with("busybox_") && n.contains(".orig.tar."))?;
    let version = orig.strip_prefix("busybox_")?.split(".orig.tar.").next()?;
    let debian = names.iter().rev().find(|n| n.starts_with(&format!("busybox_{version}-")) && n.contains(".debian.tar."));
    Some(Source { orig: dir.join(orig), debian: debian.map(|d| dir.join(d)) })
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
            progress(&format!("using Debian's busybox-static: {}", e.full_message()));
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

/// Our build, if it can be had: `None` without musl-gcc, or after a failed fetch or build of
/// the same inputs (the error is kept in the cache; `smolvm image prune` clears it).
fn own(dirs: &Dirs, progress: Progress) -> Result<Option<PathBuf>> {
    if !on_path("musl-gcc") {
        return Ok(None);
    }
    let src = match source(dirs) {
        Some(src) => src,
        None => {
            // A failed fetch is not retried on every start (offline hosts).
            let failed = dirs.images.join("busybox-fetch-failed");
            if failed.exists() {
                return Ok(None);
            }
            let _lock = lock_images(dirs)?;
            match source(dirs).map(Ok).unwrap_or_else(|| fetch_source(dirs, progress)) {
                Ok(src) => src,
                Err(e) => {
                    let _ = fs::create_dir_all(&failed).and_then(|_| fs::write(failed.join(FAILED), e.full_message()));
                    return Err(e);
                }
            }
        }
    };
    let dir = dirs.images.join(format!("busybox-{}", source_fingerprint(&src)?));
    let bin = dir.join("busybox");
    if bin.is_file() {
        return Ok(Some(bin));
    }
    if dir.join(FAILED).exists() {
        return Ok(None);
    }
    let _lock = lock_images(dirs)?;
    if bin.is_file() {
        return Ok(Some(bin));
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    match build(&src, &dir, dirs, progress) {
        Ok(()) => Ok(Some(bin)),
        Err(e) => {
            let _ = fs::write(dir.join(FAILED), e.full_message());
            Err(e)
        }
    }
}

fn build(src: &Source, out: &Path, dirs: &Dirs, progress: Progress) -> Result<()> {
    for tool in ["make", "tar", "patch", "bzip2", "xz"] {
        if !on_path(tool) {
            return Err(Error::Image(format!("building busybox needs `{tool}` (install it with `smolvm setup`)")));
        }
    }
    let tmp = TempDir(dirs.images.join(format!(".build-busybox-{}", std::process::id())));
    let _ = fs::remove_dir_all(&tmp.0);
    fs::create_dir_all(&tmp.0).ctx(|| format!("creating {}", tmp.0.display()))?;
    progress(&format!("building busybox (musl, static) from {} (once; about half a minute)", src.orig.display()));
    run_checked(Command::new("tar").arg("-xf").arg(&src.orig).arg("-C").arg(&tmp.0), "unpacking the busybox source")?;
    let tree = fs::read_dir(&tmp.0)
        .ctx(|| "reading the unpacked source".into())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("Makefile").is_file())
        .ok_or_else(|| Error::Image("the busybox source archive holds no source tree".into()))?;
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
    // No build time in the binary: the same inputs give the same busybox, and so the same
    // initramfs fingerprint, on every host (published images stay usable).
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
            // musl-gcc sees only musl's headers; some applets need the kernel's (linux/*.h).
            .arg("EXTRA_CFLAGS=-idirafter /usr/include -idirafter /usr/include/x86_64-linux-gnu")
            .arg("busybox"),
        "building busybox",
    )?;
    let config = fs::read_to_string(&config_path).ctx(|| "reading busybox's .config".into())?;
    let missing = missing_options(FRAGMENT, &config);
    if !missing.is_empty() {
        return Err(Error::Image(format!("the busybox config did not take: {}", missing.join(", "))));
    }
    let built = tree.join("busybox");
    let head = fs::read(&built).ctx(|| "reading the built busybox".into())?;
    if !crate::image::is_static(&head) {
        return Err(Error::Image("the built busybox is not statically linked".into()));
    }
    let tmp_bin = out.join(format!(".tmp-{}", std::process::id()));
    fs::copy(&built, &tmp_bin).and_then(|_| fs::rename(&tmp_bin, out.join("busybox"))).ctx(|| "installing busybox".into())?;
    progress("  busybox ready");
    Ok(())
}

/// `config` (a `.config`) with the fragment's options set: `CONFIG_X=n` becomes
/// `# CONFIG_X is not set`, anything else replaces the option's line or is appended.
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
    fn the_source_is_found_with_its_debian_patches() {
        let dir = std::env::temp_dir().join(format!("smolvm-bbsrc-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for name in ["busybox_1.35.0.orig.tar.bz2", "busybox_1.35.0-4+deb12u1.debian.tar.xz", "busybox_1.35.0-4+deb12u1.dsc", "other.tar"] {
            fs::write(dir.join(name), b"x").unwrap();
        }
        let src = source_in(&dir).expect("found");
        assert!(src.orig.ends_with("busybox_1.35.0.orig.tar.bz2"));
        assert!(src.debian.as_deref().is_some_and(|d| d.ends_with("busybox_1.35.0-4+deb12u1.debian.tar.xz")));
        let _ = fs::remove_dir_all(&dir);
    }
}
