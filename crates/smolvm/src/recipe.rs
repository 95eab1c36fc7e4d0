//! Named images with a root disk, built from Debian packages without Docker and without
//! mounting anything: mmdebstrap unpacks into a directory (in its own user namespace), smolvm
//! adds its few files, and `mkfs.ext4 -d` turns the tree into a disk image. A built disk is
//! cached under the fingerprint of its recipe, so the same recipe is built once and any change
//! (a package, a file's bytes, the size) builds a new one.

use crate::config::{valid_name, Dirs};
use crate::error::{Error, IoContext, Result};
use crate::image::{self, fingerprint, lock_images, Progress, TempDir};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Bump when the way a disk is assembled changes without its recipe changing.
const DISK_RECIPE: &str = "disk-recipe-2";
pub(crate) const SUITE: &str = "bookworm";
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// How sshd is set up in Debian images: keys only, one host key made per sandbox at its first
/// boot (the image carries none, so no two sandboxes share one).
const SSHD_CONFIG: &str = "\
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
HostKey /etc/ssh/ssh_host_ed25519_key
UseDNS no
";

/// What goes into a named image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    /// `debian`: Debian bookworm (minbase) with `packages` installed by apt, maintainer scripts
    /// and all. `busybox`: smolvm's busybox userland with `packages` unpacked beside it (their
    /// maintainer scripts do not run): small, for packages that need no setup.
    pub base: String,
    #[serde(default)]
    pub packages: Vec<String>,
    #[serde(default)]
    pub files: Vec<RecipeFile>,
    /// Size of the root filesystem in MiB (a sparse file: only what is used takes space).
    pub size_mib: u32,
}

/// A host file copied into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    pub source: PathBuf,
    /// Absolute path in the image.
    pub dest: String,
}

/// The image names smolvm defines itself (custom recipes may not take them).
pub const BUILTIN: &[&str] = &["default", "alpine-ssh", "debian-ssh"];

/// The built-in recipes with a root disk (`default` has none: it is the initramfs alone).
pub fn builtin(name: &str) -> Option<Recipe> {
    let r = |base: &str, packages: &[&str], size_mib| Recipe {
        name: name.to_string(),
        base: base.into(),
        packages: packages.iter().map(|p| p.to_string()).collect(),
        files: vec![],
        size_mib,
    };
    match name {
        // Alpine's mirror cannot be reached from every host; the same contract (a small
        // SSH-capable image) is met from Debian packages: busybox, dropbear and sftp-server.
        "alpine-ssh" => Some(r("busybox", &["dropbear-bin", "openssh-sftp-server"], 512)),
        "debian-ssh" => Some(r("debian", &["openssh-server", "python3", "ca-certificates"], 2048)),
        _ => None,
    }
}

pub fn validate_name(name: &str) -> Result<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(Error::validation(
            "image",
            format!(
                "{name:?} is not an image name: use 1-64 characters of a-z, 0-9, '_' and '-', starting and ending with a letter or digit"
            ),
        ))
    }
}

fn valid_package(p: &str) -> bool {
    // Debian package names, optionally with an architecture or version suffix apt accepts.
    !p.is_empty()
        && p.len() <= 128
        && p.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.:=~".contains(c))
}

impl Recipe {
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        if !["debian", "busybox"].contains(&self.base.as_str()) {
            return Err(Error::validation("base", format!("{:?} is not a base (allowed: debian, busybox)", self.base)));
        }
        if let Some(bad) = self.packages.iter().find(|p| !valid_package(p)) {
            return Err(Error::validation("packages", format!("{bad:?} is not a Debian package name")));
        }
        let mut dests = std::collections::HashSet::new();
        for f in &self.files {
            if !dests.insert(f.dest.as_str()) {
                return Err(Error::validation("files", format!("two files for {} (give each image path once)", f.dest)));
            }
            if !f.source.is_file() {
                return Err(Error::validation("files", format!("{} is not a readable file", f.source.display())));
            }
            // (No '.' or empty parts either: one path has one spelling, for the check of
            // duplicates above and the fingerprint's order.)
            let ok = f.dest.starts_with('/') && f.dest.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..");
            if !ok {
                return Err(Error::validation(
                    "files",
                    format!("{:?}: the image path must be absolute, name a file and hold no '.', '..' or '//'", f.dest),
                ));
            }
        }
        if !(64..=1024 * 1024).contains(&self.size_mib) {
            return Err(Error::validation("size_mib", format!("{} MiB is out of range (allowed 64..=1048576 MiB)", self.size_mib)));
        }
        Ok(())
    }

    /// Everything the disk is made from: the recipe, the bytes and modes of its files, the
    /// mirror, and the busybox binary a busybox image is built with (`busybox`, given for those).
    fn fingerprint(&self, busybox: Option<&std::path::Path>) -> Result<String> {
        use std::os::unix::fs::PermissionsExt;
        let mut parts: Vec<Vec<u8>> = vec![DISK_RECIPE.into(), SUITE.into(), mirror().into(), self.base.clone().into()];
        let mut packages = self.packages.clone();
        packages.sort();
        parts.push(packages.join(",").into());
        // By image path: files go to paths of their own (`validate`), so their order is no part
        // of the image.
        let mut files: Vec<&RecipeFile> = self.files.iter().collect();
        files.sort_by(|a, b| a.dest.cmp(&b.dest));
        for f in files {
            let meta = fs::metadata(&f.source).ctx(|| format!("reading {}", f.source.display()))?;
            parts.push(f.dest.clone().into());
            parts.push(meta.permissions().mode().to_le_bytes().to_vec());
            parts.push(fs::read(&f.source).ctx(|| format!("reading {}", f.source.display()))?);
        }
        parts.push(self.size_mib.to_le_bytes().to_vec());
        if let Some(busybox) = busybox {
            parts.push(fs::read(busybox).ctx(|| "reading busybox".into())?);
            parts.push(format!("{:?}", image::FILES).into());
            parts.push(format!("{:?}", image::DIR_MODES).into());
        } else {
            parts.push(SSHD_CONFIG.into());
        }
        Ok(fingerprint(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>()))
    }
}

pub(crate) fn mirror() -> String {
    std::env::var("SMOLVM_DEBIAN_MIRROR").ok().filter(|m| !m.is_empty()).unwrap_or_else(|| DEFAULT_MIRROR.into())
}

/// What mmdebstrap installs from (and writes into the image's sources.list): Debian's
/// archive with its updates and security suites. Given a mirror, mmdebstrap adds neither: an
/// image would get point-release packages only, and `apt upgrade` in it no security fixes. A
/// mirror of one's own (`SMOLVM_DEBIAN_MIRROR`) is used alone, as given.
fn apt_sources() -> Vec<String> {
    match std::env::var("SMOLVM_DEBIAN_MIRROR").ok().filter(|m| !m.is_empty()) {
        Some(own) => vec![own],
        None => vec![
            format!("deb {DEFAULT_MIRROR} {SUITE} main"),
            format!("deb {DEFAULT_MIRROR} {SUITE}-updates main"),
            format!("deb {DEFAULT_SECURITY_MIRROR} {SUITE}-security main"),
        ],
    }
}

/// Where Debian publishes its security updates.
const DEFAULT_SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";

fn recipes_dir(dirs: &Dirs) -> PathBuf {
    dirs.images.join("recipes")
}

/// A built-in recipe or a saved custom one.
pub fn load(dirs: &Dirs, name: &str) -> Result<Recipe> {
    load_with_disk(dirs, name).map(|(recipe, _)| recipe)
}

/// A recipe, and for a saved one the disk it was last built into (see `build_named`).
fn load_with_disk(dirs: &Dirs, name: &str) -> Result<(Recipe, Option<PathBuf>)> {
    validate_name(name)?;
    if let Some(r) = builtin(name) {
        return Ok((r, None));
    }
    if name == "default" {
        return Err(Error::validation(
            "image",
            "the default image has no root disk to build: it is a kernel and an initramfs (`smolvm image build` makes them)",
        ));
    }
    let path = recipes_dir(dirs).join(format!("{name}.json"));
    let text = fs::read_to_string(&path).map_err(|_| {
        Error::validation(
            "image",
            format!("no image named {name:?} (built in: {}; or build a recipe with `smolvm image build {name} ...`)", BUILTIN.join(", ")),
        )
    })?;
    let (recipe, built) =
        parse_saved(&text).map_err(|e| Error::Image(format!("the saved recipe {} is unreadable: {e}", path.display())))?;
    // A name, not a path: nothing outside the image cache.
    let disk = built.filter(|b| !b.contains('/') && b.starts_with("disk-")).map(|b| dirs.images.join(b).join("rootfs.ext4"));
    Ok((recipe, disk))
}

/// A saved recipe: the recipe, and beside it the disk it was last built into (`built`).
fn parse_saved(text: &str) -> serde_json::Result<(Recipe, Option<String>)> {
    let mut value: serde_json::Value = serde_json::from_str(text)?;
    let built = value.as_object_mut().and_then(|fields| fields.remove("built")).and_then(|b| b.as_str().map(str::to_string));
    Ok((serde_json::from_value(value)?, built))
}

/// The disks saved recipes name (`disk-NAME-FP`), which `image prune` keeps.
pub(crate) fn named_disks(dirs: &Dirs) -> std::collections::HashSet<String> {
    fs::read_dir(recipes_dir(dirs))
        .map(|d| d.flatten().filter_map(|e| parse_saved(&fs::read_to_string(e.path()).ok()?).ok()?.1).collect())
        .unwrap_or_default()
}

/// Saved custom recipes (built-in ones are not listed here).
pub fn saved(dirs: &Dirs) -> Vec<Recipe> {
    let mut out: Vec<Recipe> = fs::read_dir(recipes_dir(dirs))
        .map(|d| d.flatten().filter_map(|e| Some(parse_saved(&fs::read_to_string(e.path()).ok()?).ok()?.0)).collect())
        .unwrap_or_default();
    out.sort_by(|a: &Recipe, b| a.name.cmp(&b.name));
    out
}

/// A named image's disk (a built-in or saved recipe), built if missing. A custom image by name
/// is the disk last built under that name: the recipe's `--file` sources may since have moved,
/// changed or gone (`smolvm image build NAME ...` builds it again from them).
pub fn build_named(dirs: &Dirs, name: &str, progress: Progress) -> Result<Built> {
    let (recipe, disk) = load_with_disk(dirs, name)?;
    if let Some(rootfs) = disk.filter(|p| p.exists()) {
        return Ok(Built { name: name.to_string(), rootfs, cached: true });
    }
    build(dirs, &recipe, progress)
}

/// A built disk image.
#[derive(Debug, Clone, Serialize)]
pub struct Built {
    pub name: String,
    pub rootfs: PathBuf,
    /// Found in the cache: nothing was built.
    pub cached: bool,
}

/// Build `recipe` (or find it in the cache) and, for a custom one, save it under its name so
/// that sandboxes can ask for it by name later.
pub fn build(dirs: &Dirs, recipe: &Recipe, progress: Progress) -> Result<Built> {
    recipe.validate()?;
    let builtin_recipe = builtin(&recipe.name);
    if BUILTIN.contains(&recipe.name.as_str()) && builtin_recipe.as_ref() != Some(recipe) {
        return Err(Error::validation("image", format!("{:?} is a built-in image; give a custom recipe another name", recipe.name)));
    }
    let busybox = if recipe.base == "busybox" { Some(crate::busybox::guest(dirs, progress)?) } else { None };
    let fp = recipe.fingerprint(busybox.as_deref())?;
    let dir = dirs.images.join(format!("disk-{}-{fp}", recipe.name));
    let path = dir.join("rootfs.ext4");
    let save = || -> Result<()> {
        if builtin_recipe.is_none() {
            let mut saved = serde_json::to_value(recipe).unwrap_or_default();
            saved["built"] = serde_json::Value::String(format!("disk-{}-{fp}", recipe.name));
            // One at a time in this process: its threads would share one temporary name.
            static SAVING: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _one = SAVING.lock().unwrap_or_else(|e| e.into_inner());
            image::write_whole(
                &recipes_dir(dirs).join(format!("{}.json", recipe.name)),
                serde_json::to_string_pretty(&saved).unwrap_or_default().as_bytes(),
            )
            .ctx(|| "saving the recipe".into())?;
        }
        Ok(())
    };
    if path.exists() {
        save()?;
        return Ok(Built { name: recipe.name.clone(), rootfs: path, cached: true });
    }
    let _lock = lock_images(dirs)?;
    if path.exists() {
        save()?;
        return Ok(Built { name: recipe.name.clone(), rootfs: path, cached: true });
    }
    preflight(recipe)?;
    let from = match (recipe.base.as_str(), recipe.packages.is_empty()) {
        ("debian", _) => format!("Debian {SUITE} packages"),
        (_, true) => "busybox".to_string(),
        (_, false) => format!("busybox and Debian {SUITE} packages"),
    };
    progress(&format!("building image {:?} from {from} (once; cached by its recipe)", recipe.name));
    let work = TempDir(dirs.images.join(format!(".build-disk-{}-{}", recipe.name, std::process::id())));
    let _ = fs::remove_dir_all(&work.0);
    fs::create_dir_all(&work.0).ctx(|| format!("creating {}", work.0.display()))?;
    let tree = work.0.join("tree");
    match recipe.base.as_str() {
        "debian" => {
            mmdebstrap(&tree, "minbase", &recipe.packages, progress)?;
            debian_ssh_setup(&tree)?;
        }
        _ => {
            image::busybox_tree(&tree, busybox.as_deref().expect("resolved for busybox recipes"))?;
            if !recipe.packages.is_empty() {
                let unpacked = work.0.join("packages");
                mmdebstrap(&unpacked, "extract", &recipe.packages, progress)?;
                // --remove-destination: a busybox applet link at a path a package also ships
                // is replaced, never written through (which would overwrite busybox itself).
                image::run_checked(
                    Command::new("cp").arg("-a").arg("--remove-destination").arg(format!("{}/.", unpacked.display())).arg(&tree),
                    "merging the packages into the image",
                )?;
                image::busybox_etc(&tree)?;
            }
            for d in ["root/.ssh", "etc/dropbear", "var/run", "var/log"] {
                guest_dir(&tree, d).ctx(|| format!("creating /{d}"))?;
            }
        }
    }
    copy_files(&tree, &recipe.files)?;
    unchanged_since(recipe, busybox.as_deref(), &fp)?;
    progress("writing the ext4 root disk");
    image::make_ext4(&tree, &path, &format!("{}M", recipe.size_mib))?;
    let _ = image::write_file(&dir.join("recipe.json"), serde_json::to_string_pretty(recipe).unwrap_or_default().as_bytes());
    save()?;
    Ok(Built { name: recipe.name.clone(), rootfs: path, cached: false })
}

/// What mmdebstrap's user namespace needs of a user other than root, which has it all: the
/// helpers that map ids (uidmap) and ranges of ids of its own (/etc/subuid, /etc/subgid).
/// None when all is there, else what is missing, as a fix.
pub fn unprivileged_build_missing() -> Option<String> {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return None;
    }
    if !image::on_path("newuidmap") || !image::on_path("newgidmap") {
        return Some("newuidmap and newgidmap (apt-get install uidmap)".into());
    }
    let name = nix::unistd::User::from_uid(uid).ok().flatten().map(|u| u.name).unwrap_or_default();
    let ranged = |file: &str| {
        std::fs::read_to_string(file).unwrap_or_default().lines().any(|l| {
            let owner = l.split(':').next().unwrap_or_default();
            (!name.is_empty() && owner == name) || owner == uid.to_string()
        })
    };
    if !ranged("/etc/subuid") || !ranged("/etc/subgid") {
        return Some(format!("a range of ids for user {name:?} in /etc/subuid and /etc/subgid (usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name})"));
    }
    None
}

/// What building needs, checked before anything is downloaded.
fn preflight(recipe: &Recipe) -> Result<()> {
    if !image::on_path("mmdebstrap") {
        return Err(Error::Image("building images from Debian packages needs mmdebstrap (apt-get install mmdebstrap)".into()));
    }
    // (Only a busybox recipe's packages are unpacked by mmdebstrap as another user: a Debian
    // image needs root, said below.)
    if let Some(missing) = unprivileged_build_missing().filter(|_| recipe.base == "busybox" && !recipe.packages.is_empty()) {
        return Err(Error::Image(format!(
            "building images from Debian packages as a user other than root needs {missing}; or build as root"
        )));
    }
    if recipe.base == "debian" && !nix::unistd::geteuid().is_root() {
        // Unpacked as another user, the files would not belong to root in the image.
        return Err(Error::Image(format!(
            "building the Debian image {:?} needs root (its files must be owned by root in the image); run as root or pass a prebuilt rootfs_path",
            recipe.name
        )));
    }
    Ok(())
}

/// mmdebstrap into `target`, its progress lines passed on. `unshare` mode: it works in its own
/// user and mount namespace, so the host mounts nothing.
fn mmdebstrap(target: &Path, variant: &str, packages: &[String], progress: Progress) -> Result<()> {
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--mode=unshare", &format!("--variant={variant}")]);
    if !packages.is_empty() {
        cmd.arg(format!("--include={}", packages.join(",")));
    }
    for excluded in ["/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*"] {
        cmd.arg(format!("--dpkgopt=path-exclude={excluded}"));
    }
    cmd.arg(SUITE).arg(target).args(apt_sources());
    // (As `run_checked`'s.)
    crate::net::die_with_this_thread(&mut cmd);
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().ctx(|| "running mmdebstrap".into())?;
    let mut tail: std::collections::VecDeque<String> = Default::default();
    if let Some(err) = child.stderr.take() {
        for line in std::io::BufReader::new(err).lines().map_while(|l| l.ok()) {
            if let Some(step) = line.strip_prefix("I: ") {
                progress(step);
            }
            tail.push_back(line);
            if tail.len() > 15 {
                tail.pop_front();
            }
        }
    }
    let status = child.wait().ctx(|| "waiting for mmdebstrap".into())?;
    if !status.success() {
        let _ = fs::remove_dir_all(target);
        return Err(Error::Image(format!("mmdebstrap failed ({status}):\n{}", Vec::from(tail).join("\n"))));
    }
    Ok(())
}

/// A directory of the guest's tree, made with its parents whatever the builder's umask: root's
/// `.ssh` is root's alone, the rest 0755.
fn guest_dir(tree: &Path, dir: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    image::make_dir(&tree.join(dir))?;
    if dir == "root/.ssh" {
        fs::set_permissions(tree.join(dir), fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Debian images: no host keys in the image (each sandbox makes its own), keys-only root login.
fn debian_ssh_setup(tree: &Path) -> Result<()> {
    // sshd's, and dropbear's (its package makes them on install too, should a recipe take it).
    for (dir, prefix, suffix) in [("etc/ssh", "ssh_host_", ""), ("etc/dropbear", "dropbear_", "_host_key")] {
        for e in fs::read_dir(tree.join(dir)).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) && name.ends_with(suffix) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let io = (|| -> std::io::Result<()> {
        if tree.join("etc/ssh").is_dir() {
            image::make_dir(&tree.join("etc/ssh/sshd_config.d"))?;
            image::write_file(&tree.join("etc/ssh/sshd_config.d/smolvm.conf"), SSHD_CONFIG.as_bytes())?;
        }
        guest_dir(tree, "root/.ssh")?;
        // (A link there is replaced, not written through.)
        let _ = fs::remove_file(tree.join("etc/hostname"));
        image::write_file(&tree.join("etc/hostname"), b"smolvm\n")
    })();
    io.ctx(|| "configuring the image".into())
}

/// `dest` inside `tree`, refusing a way that leaves it: an image's tree holds symbolic links
/// to absolute paths (Debian's `var/run -> /run`), which the host would follow, as root.
fn inside_tree(tree: &Path, dest: &str) -> Result<PathBuf> {
    let rel = Path::new(dest.trim_start_matches('/'));
    let mut at = tree.to_path_buf();
    let parents: Vec<_> = rel.parent().map(|p| p.components().collect()).unwrap_or_default();
    for c in parents {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::validation(
                    "files",
                    format!(
                        "{dest}: /{} is a symbolic link in the image; give the path it points to",
                        at.strip_prefix(tree).unwrap_or(&at).display()
                    ),
                ))
            }
            Ok(m) if !m.is_dir() => {
                return Err(Error::validation(
                    "files",
                    format!("{dest}: /{} is not a directory in the image", at.strip_prefix(tree).unwrap_or(&at).display()),
                ))
            }
            Ok(_) => {}
            // Missing: made below, with everything after it.
            Err(_) => break,
        }
    }
    Ok(tree.join(rel))
}

/// The recipe's files as the build found them (their bytes and modes are part of its
/// fingerprint): one edited while the image was built would be cached under the fingerprint of
/// what it was before, and found again for that older content.
fn unchanged_since(recipe: &Recipe, busybox: Option<&Path>, fp: &str) -> Result<()> {
    if recipe.fingerprint(busybox)? != fp {
        return Err(Error::Image(format!(
            "a file of image {:?} changed while it was being built; nothing was cached (build it again)",
            recipe.name
        )));
    }
    Ok(())
}

fn copy_files(tree: &Path, files: &[RecipeFile]) -> Result<()> {
    for f in files {
        let dest = inside_tree(tree, &f.dest)?;
        if let Some(parent) = dest.parent() {
            image::make_dir(parent).ctx(|| format!("creating {}", parent.display()))?;
        }
        // (A link there is replaced, not followed.)
        if fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
            return Err(Error::validation("files", format!("{}: is a directory in the image; name the file's own path in it", f.dest)));
        }
        let _ = fs::remove_file(&dest);
        fs::copy(&f.source, &dest).ctx(|| format!("copying {} to {}", f.source.display(), f.dest))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_debian_image_keeps_no_host_keys_of_either_server() {
        let tree = tempfile::tempdir().unwrap();
        let t = tree.path();
        for f in [
            "etc/ssh/ssh_host_ed25519_key",
            "etc/ssh/ssh_host_ed25519_key.pub",
            "etc/ssh/ssh_config",
            "etc/dropbear/dropbear_ed25519_host_key",
            "etc/dropbear/dropbear_rsa_host_key",
            "etc/dropbear/run",
        ] {
            fs::create_dir_all(t.join(f).parent().unwrap()).unwrap();
            fs::write(t.join(f), "x").unwrap();
        }
        debian_ssh_setup(t).unwrap();
        let left = |d: &str| {
            let mut v: Vec<String> =
                fs::read_dir(t.join(d)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            v.sort();
            v
        };
        assert_eq!(left("etc/ssh"), ["ssh_config", "sshd_config.d"]);
        assert_eq!(left("etc/dropbear"), ["run"]);
    }

    #[test]
    fn a_file_never_lands_outside_the_image_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        let outside = tmp.path().join("host-run");
        fs::create_dir_all(tree.join("var")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("var/run")).unwrap();
        fs::write(tree.join("etc"), b"a file").unwrap();
        let err = inside_tree(&tree, "/var/run/app.pid").unwrap_err().to_string();
        assert!(err.contains("/var/run is a symbolic link in the image"), "{err}");
        assert!(inside_tree(&tree, "/etc/motd").unwrap_err().to_string().contains("is not a directory"));
        assert_eq!(inside_tree(&tree, "/srv/new/f").unwrap(), tree.join("srv/new/f"));
        assert_eq!(inside_tree(&tree, "/var/f").unwrap(), tree.join("var/f"));
        let src = tmp.path().join("src");
        fs::write(&src, b"x").unwrap();
        let files = [RecipeFile { source: src, dest: "/var/run/app.pid".into() }];
        assert!(copy_files(&tree, &files).is_err());
        assert!(fs::read_dir(&outside).unwrap().next().is_none(), "a file was written outside the tree");
        // A directory of the image where the file would go is the recipe's mistake, named.
        let files = [RecipeFile { source: tmp.path().join("src"), dest: "/var".into() }];
        let err = copy_files(&tree, &files).unwrap_err();
        assert_eq!(err.to_string(), "invalid files: /var: is a directory in the image; name the file's own path in it");
    }

    #[test]
    fn builtins_validate_and_names_are_checked() {
        for name in ["alpine-ssh", "debian-ssh"] {
            builtin(name).unwrap().validate().unwrap();
        }
        assert!(builtin("default").is_none());
        // The default image is built as a kernel and initramfs, and not as a missing recipe.
        let dirs = Dirs { data: "/nonexistent".into(), images: "/nonexistent/images".into() };
        let err = load(&dirs, "default").unwrap_err().to_string();
        assert!(err.contains("the default image has no root disk to build"), "{err}");
        assert!(validate_name("My Image").unwrap_err().to_string().starts_with("invalid image:"));
    }

    #[test]
    fn bad_recipes_name_the_field() {
        let base = Recipe { name: "tools".into(), base: "debian".into(), packages: vec![], files: vec![], size_mib: 1024 };
        let bad = Recipe { base: "alpine".into(), ..base.clone() };
        assert!(bad.validate().unwrap_err().to_string().contains("allowed: debian, busybox"));
        let bad = Recipe { packages: vec!["curl; rm -rf /".into()], ..base.clone() };
        assert!(bad.validate().unwrap_err().to_string().starts_with("invalid packages:"));
        let bad = Recipe { size_mib: 10, ..base.clone() };
        assert!(bad.validate().unwrap_err().to_string().starts_with("invalid size_mib:"));
        let bad = Recipe { files: vec![RecipeFile { source: "/etc/hostname".into(), dest: "etc/x".into() }], ..base.clone() };
        assert!(bad.validate().unwrap_err().to_string().contains("must be absolute"));
        let bad = Recipe { files: vec![RecipeFile { source: "/etc/hostname".into(), dest: "/a/../../x".into() }], ..base.clone() };
        assert!(bad.validate().is_err());
        let twice = |dest: &str| RecipeFile { source: "/etc/hostname".into(), dest: dest.into() };
        for odd in ["/etc//motd", "/etc/./motd", "/etc/motd/"] {
            let bad = Recipe { files: vec![twice(odd)], ..base.clone() };
            assert!(bad.validate().unwrap_err().to_string().contains("hold no '.', '..' or '//'"), "{odd}");
        }
        let bad = Recipe { files: vec![twice("/etc/motd"), twice("/etc/motd")], ..base.clone() };
        assert_eq!(bad.validate().unwrap_err().to_string(), "invalid files: two files for /etc/motd (give each image path once)");
        base.validate().unwrap();
    }

    #[test]
    fn fingerprint_follows_the_recipe_and_file_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("motd");
        fs::write(&file, "one").unwrap();
        let r = Recipe {
            name: "t".into(),
            base: "debian".into(),
            packages: vec!["b".into(), "a".into()],
            files: vec![RecipeFile { source: file.clone(), dest: "/etc/motd".into() }],
            size_mib: 512,
        };
        let fp = r.fingerprint(None).unwrap();
        let reordered = Recipe { packages: vec!["a".into(), "b".into()], ..r.clone() };
        assert_eq!(fp, reordered.fingerprint(None).unwrap(), "package order does not matter");
        let other = dir.path().join("other");
        fs::write(&other, "x").unwrap();
        let two = |files: Vec<RecipeFile>| Recipe { files, ..r.clone() }.fingerprint(None).unwrap();
        let (motd, x) =
            (RecipeFile { source: file.clone(), dest: "/etc/motd".into() }, RecipeFile { source: other, dest: "/etc/x".into() });
        assert_eq!(two(vec![motd.clone(), x.clone()]), two(vec![x, motd]), "nor does the order of files");
        assert_ne!(fp, Recipe { size_mib: 1024, ..r.clone() }.fingerprint(None).unwrap());
        assert!(unchanged_since(&r, None, &fp).is_ok());
        fs::write(&file, "two").unwrap();
        assert_ne!(fp, r.fingerprint(None).unwrap(), "a file's bytes are part of the recipe");
        // Edited after the build took its fingerprint: nothing is cached under the old one.
        let err = unchanged_since(&r, None, &fp).unwrap_err().to_string();
        assert_eq!(err, "image: a file of image \"t\" changed while it was being built; nothing was cached (build it again)");
    }
}
