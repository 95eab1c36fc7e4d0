//! Directories cross the host/guest boundary as tar streams. Each side extracts what the other
//! made, and the guest is untrusted, so extraction checks every entry first
//! ([`smolvm_proto::paths::check_entry`]) and writes nothing if any entry is refused; the tar
//! crate's `unpack_in` then also refuses to write through links that leave the target.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Pack `dir`'s contents (not `dir` itself) into `out`. Links are stored as links.
pub fn pack<W: io::Write>(dir: &Path, out: W) -> io::Result<W> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    b.append_dir_all(".", dir)?;
    b.into_inner()
}

/// Pack `dir` as [`pack`] does, handing the archive to `sink` in pieces of `chunk` bytes (the
/// last may be shorter) as it is made: a tree never has to fit in memory. Returns the size.
pub fn pack_chunked(dir: &Path, chunk: usize, sink: impl FnMut(Vec<u8>) -> io::Result<()>) -> io::Result<u64> {
    let mut out = pack(dir, Chunked { buf: Vec::with_capacity(chunk), chunk, sink, total: 0 })?;
    io::Write::flush(&mut out)?;
    Ok(out.total)
}

struct Chunked<F> {
    buf: Vec<u8>,
    chunk: usize,
    sink: F,
    total: u64,
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> io::Write for Chunked<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.chunk - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
            self.total += full.len() as u64;
            (self.sink)(full)?;
        }
        Ok(())
    }
}

/// Check a local tree before it is packed for the guest, by the rule the guest's extraction
/// applies to every link (it must stay inside the tree): a refused tree is its owner's to fix,
/// and is said so before anything is sent, rather than as the guest's refusal of its target.
pub fn check_tree(dir: &Path) -> io::Result<()> {
    fn visit(root: &Path, dir: &Path, count: &mut u64) -> io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            *count += 1;
            if *count > MAX_ENTRIES {
                return Err(invalid(format!("refused archive: more than {MAX_ENTRIES} entries")));
            }
            let path = entry.path();
            let kind = entry.file_type()?;
            utf8_name(path.strip_prefix(root).unwrap_or(&path).as_os_str().as_encoded_bytes(), "name")?;
            if kind.is_symlink() {
                let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
                let target = fs::read_link(&path)?;
                let target = utf8_name(target.as_os_str().as_encoded_bytes(), "link target")?;
                smolvm_proto::paths::check_entry(&rel, Some(&target), None).map_err(|e| invalid(format!("refused tar entry: {e}")))?;
            } else if kind.is_dir() {
                visit(root, &path, count)?;
            } else if !kind.is_file() {
                // (The tar crate cannot pack a socket, and the guest refuses FIFOs and devices.)
                let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
                return Err(invalid(format!("refused tar entry {rel:?}: only files, directories and links are transferred")));
            }
        }
        Ok(())
    }
    visit(dir, dir, &mut 0)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A refusal for what the target already holds (a symlink on an entry's way), not for what the
/// archive holds: the extracting side's own doing, which it reports as such.
#[derive(Debug)]
pub struct InTarget(String);

impl std::fmt::Display for InTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InTarget {}

impl InTarget {
    /// Whether `e` is such a refusal.
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<InTarget>())
    }
}

fn in_target(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, InTarget(msg))
}

/// Check every entry of the archive in `file`, then extract it into `dest` (created if
/// missing). Setuid, setgid and sticky bits are dropped when `strip_special` is set.
pub fn unpack_checked(file: &mut fs::File, dest: &Path, strip_special: bool) -> io::Result<()> {
    unpack_checked_until(file, dest, strip_special, &AtomicBool::new(false))
}

/// The most an archive may hold: entries, and bytes of one long name or extended header. The
/// checks keep every entry's path in memory, and the tar crate reads an extension whole, by the
/// size its header says: an untrusted archive must not make the extracting side allocate
/// without bound.
pub const MAX_ENTRIES: u64 = 1_000_000;
pub const MAX_EXTENSION: u64 = 64 * 1024;

/// Refuse an archive past [`MAX_ENTRIES`] or with an extension header past [`MAX_EXTENSION`],
/// reading headers only (no file's data). The checks and the extraction then read the same
/// headers: a PAX `size` record (which moves where the next header is, as the extraction reads
/// it but this walk would not) and sparse files are refused. smolvm's packer makes neither.
fn check_sizes(file: &mut fs::File) -> io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let mut archive = tar::Archive::new(&mut *file);
    let mut count = 0u64;
    for entry in archive.entries_with_seek()?.raw(true) {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        let size = entry.header().entry_size()?;
        let pax = kind.is_pax_local_extensions() || kind.is_pax_global_extensions();
        let extension = pax || kind.is_gnu_longname() || kind.is_gnu_longlink();
        if extension && size > MAX_EXTENSION {
            return Err(invalid(format!("refused archive: an extended header of {size} bytes (at most {MAX_EXTENSION})")));
        }
        if kind.is_gnu_sparse() {
            return Err(invalid("refused archive: a sparse file entry (not transferred)".into()));
        }
        if pax {
            for record in entry.pax_extensions()?.into_iter().flatten() {
                let key = record?.key_bytes().to_vec();
                if key == b"size" || key.starts_with(b"GNU.sparse") {
                    let key = String::from_utf8_lossy(&key);
                    return Err(invalid(format!("refused archive: an extended header sets {key:?} (not transferred)")));
                }
            }
        }
        if !extension {
            count += 1;
            if count > MAX_ENTRIES {
                return Err(invalid(format!("refused archive: more than {MAX_ENTRIES} entries")));
            }
        }
    }
    Ok(())
}

/// Entry names are checked and compared as text; a name that is not UTF-8 would be checked as
/// one text (with U+FFFD) and written as other bytes, passing the checks of what is on disk.
fn utf8_name(bytes: &[u8], what: &str) -> io::Result<String> {
    std::str::from_utf8(bytes).map(str::to_string).map_err(|_| {
        invalid(format!(
            "refused tar entry {:?}: its {what} is not UTF-8 (only UTF-8 names are transferred)",
            String::from_utf8_lossy(bytes)
        ))
    })
}

/// Remove `path` from a directory its owner cannot write, giving the owner write permission for
/// that and taking it back after.
fn remove_in_read_only_dir(path: &Path) {
    let Some(dir) = path.parent() else { return };
    let Ok(mode) = fs::metadata(dir).map(|m| m.permissions().mode()) else { return };
    if fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o200)).is_ok() {
        let _ = fs::remove_file(path);
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(mode));
    }
}

/// Names for what an extraction moves aside, unique across this process's extractions.
static KEPT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One entry as the check pass saw it: its path (normalized), whether it is a symlink, and the archive path
/// a link leads to (a symlink's target resolved from its directory, or a hard link's target).
struct Seen {
    path: String,
    symlink: bool,
    leads_to: Option<String>,
}

/// `rel` resolved from `dir` by its text (`.` and `..` applied), as the components passed on
/// the way: each prefix that is walked through as a directory, then the end.
fn walk(dir: &str, rel: &str) -> (Vec<String>, String) {
    let mut parts: Vec<&str> = dir.split('/').filter(|c| !c.is_empty()).collect();
    let mut through = Vec::new();
    let comps: Vec<&str> = rel.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    for (i, c) in comps.iter().enumerate() {
        if *c == ".." {
            parts.pop();
        } else {
            parts.push(c);
            if i + 1 < comps.len() {
                through.push(parts.join("/"));
            }
        }
    }
    (through, parts.join("/"))
}

/// An archive's own links must not be walked through: `a/up -> ..` then `a/up/x -> ../..`
/// each look inside by their text, but the second lands two levels above the target. So no
/// entry's directory, and no link's way to its target, may pass through a symlink of the
/// archive (pointing at one is fine), nor through one already in `dest`: an earlier
/// extraction's `b -> .` would otherwise let `root -> b/b/../..` of a later one lead out.
fn check_links(seen: &[Seen], dest: &Path) -> io::Result<()> {
    let links: std::collections::HashSet<&str> = seen.iter().filter(|e| e.symlink).map(|e| e.path.as_str()).collect();
    let mut on_disk: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    let mut is_link_on_disk = |p: &str| {
        *on_disk.entry(p.to_string()).or_insert_with(|| dest.join(p).symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()))
    };
    for e in seen {
        let (mut through, _) = walk("", &e.path);
        if let Some(target) = &e.leads_to {
            let dir = if e.symlink { e.path.rsplit_once('/').map_or("", |(d, _)| d) } else { "" };
            let (passed, end) = walk(dir, target);
            through.extend(passed);
            // A hard link to one of them would be that link itself, elsewhere: `..` seen from
            // another directory.
            if !e.symlink && links.contains(end.as_str()) {
                return Err(invalid(format!("refused tar entry {:?}: a hard link to the archive's own symlink {end:?}", e.path)));
            }
            if !e.symlink && is_link_on_disk(&end) {
                return Err(in_target(format!("refused tar entry {:?}: a hard link to {end:?}, a symlink already in the target", e.path)));
            }
        }
        if let Some(l) = through.iter().find(|p| links.contains(p.as_str())) {
            return Err(invalid(format!("refused tar entry {:?}: it leads through the archive's own symlink {l:?}", e.path)));
        }
        if let Some(l) = through.iter().find(|p| !p.is_empty() && is_link_on_disk(p)) {
            return Err(in_target(format!("refused tar entry {:?}: it leads through {l:?}, a symlink already in the target", e.path)));
        }
    }
    Ok(())
}

/// As [`unpack_checked`], stopping (as a failure) once `stop` is set, as when whoever waits for
/// it has gone. A failure, that one included, takes out again what this extraction made:
/// nothing half-written stays. Directories get their modes at the end, so that one without
/// write permission for its owner still takes its contents.
pub fn unpack_checked_until(file: &mut fs::File, dest: &Path, strip_special: bool, stop: &AtomicBool) -> io::Result<()> {
    unpack_checked_watched(file, dest, strip_special, stop, &mut || {})
}

/// As [`unpack_checked_until`], calling `on_entry` for each entry of each pass: a big tree
/// takes a while, and whoever waits for it can be told that it goes on.
pub fn unpack_checked_watched(
    file: &mut fs::File,
    dest: &Path,
    strip_special: bool,
    stop: &AtomicBool,
    on_entry: &mut dyn FnMut(),
) -> io::Result<()> {
    check_sizes(file)?;
    file.seek(SeekFrom::Start(0))?;
    {
        let mut seen = Vec::new();
        let mut archive = tar::Archive::new(&mut *file);
        for entry in archive.entries()? {
            let entry = entry?;
            on_entry();
            if stop.load(Ordering::Relaxed) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "the extraction was stopped"));
            }
            let path = utf8_name(&entry.path_bytes(), "name")?;
            let path = path.trim_start_matches("./");
            if path.is_empty() || path == "." {
                continue;
            }
            let link = entry.link_name_bytes().map(|l| utf8_name(&l, "link target")).transpose()?;
            let kind = entry.header().entry_type();
            let (sym, hard) = match kind {
                tar::EntryType::Symlink => (link.as_deref(), None),
                tar::EntryType::Link => (None, link.as_deref().map(|l| l.trim_start_matches("./"))),
                _ => (None, None),
            };
            smolvm_proto::paths::check_entry(path, sym, hard).map_err(|e| invalid(format!("refused tar entry: {e}")))?;
            if !matches!(kind, tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Symlink | tar::EntryType::Link) {
                return Err(invalid(format!("refused tar entry {path:?}: only files, directories and links are transferred")));
            }
            // As the tar crate takes it: `a/./up/` and `a//up` are `a/up`.
            let path = walk("", path).1;
            seen.push(Seen { path, symlink: sym.is_some(), leads_to: sym.or(hard).map(str::to_string) });
        }
        check_links(&seen, dest)?;
    }
    file.seek(SeekFrom::Start(0))?;
    let made_dest = !dest.exists();
    fs::create_dir_all(dest)?;
    // What this extraction made (to take out again on a failure, deepest last in the list),
    // and the directories whose modes it sets at the end: (path, mode, mode before, if it was
    // there already).
    let mut made: Vec<std::path::PathBuf> = Vec::new();
    let mut dir_modes: Vec<(std::path::PathBuf, u32, Option<u32>)> = Vec::new();
    // Files (and links) the archive replaces, moved aside until it is all in: (where, aside).
    let mut kept: Vec<(std::path::PathBuf, std::path::PathBuf)> = Vec::new();
    let result = (|| {
        let mut archive = tar::Archive::new(&mut *file);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        for entry in archive.entries()? {
            on_entry();
            if stop.load(Ordering::Relaxed) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "the extraction was stopped"));
            }
            let mut entry = entry?;
            if strip_special {
                entry.set_mask(0o7000);
            }
            let rel = walk("", &entry.path()?.to_string_lossy()).1;
            // The target itself (`./`): a target that was there keeps its own mode (a sticky
            // /tmp stays sticky); one this extraction made takes the source's, as its contents
            // do. Set last of all (the list is walked backwards), once it has taken them.
            if rel.is_empty() {
                if made_dest && entry.header().entry_type() == tar::EntryType::Directory {
                    let mode = entry.header().mode().unwrap_or(0o755) & if strip_special { 0o777 } else { 0o7777 };
                    dir_modes.insert(0, (dest.to_path_buf(), mode, None));
                }
                continue;
            }
            let full = dest.join(&rel);
            let dir = entry.header().entry_type() == tar::EntryType::Directory;
            if !dir && full.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
                // (Unique in this process: extractions into the same directory may run at once.)
                let n = KEPT.fetch_add(1, Ordering::Relaxed);
                let aside = full.with_file_name(format!(".smolvm-kept-{}-{n}", std::process::id()));
                fs::rename(&full, &aside)?;
                kept.push((full.clone(), aside));
            }
            // Everything on the way that is not there yet is this extraction's, whether the
            // entry lands whole or fails half written.
            let mut missing = Vec::new();
            let mut at = dest.to_path_buf();
            for part in rel.split('/') {
                at.push(part);
                if at.symlink_metadata().is_err() {
                    missing.push(at.clone());
                }
            }
            let before = full.symlink_metadata().ok().filter(|m| m.is_dir()).map(|m| m.permissions().mode() & 0o7777);
            let mode = entry.header().mode().unwrap_or(0o755) & if strip_special { 0o777 } else { 0o7777 };
            let unpacked = entry.unpack_in(dest);
            made.extend(missing.into_iter().filter(|p| p.symlink_metadata().is_ok()));
            if !unpacked? {
                return Err(invalid(format!("refused tar entry {rel:?}: it would land outside the target")));
            }
            if dir {
                // Writable by its owner until everything is in.
                fs::set_permissions(&full, fs::Permissions::from_mode(mode | 0o700))?;
                dir_modes.push((full, mode, before));
            }
        }
        for (dir, mode, _) in dir_modes.iter().rev() {
            fs::set_permissions(dir, fs::Permissions::from_mode(*mode))?;
        }
        Ok(())
    })();
    if result.is_ok() {
        // (Last, so that a failure before still has them to put back. A directory just made
        // read-only keeps what was moved aside in it from one not root: opened for this.)
        for (_, aside) in &kept {
            if fs::remove_file(aside).is_err() {
                remove_in_read_only_dir(aside);
            }
        }
    } else {
        // What was made goes, what it replaced comes back; then directories that were there
        // get their modes back.
        for p in made.iter().rev() {
            let _ = fs::remove_file(p).or_else(|_| fs::remove_dir(p));
        }
        for (at, aside) in kept.iter().rev() {
            let _ = fs::rename(aside, at);
        }
        for (dir, _, before) in &dir_modes {
            if let Some(mode) = before {
                let _ = fs::set_permissions(dir, fs::Permissions::from_mode(*mode));
            }
        }
        if made_dest {
            let _ = fs::remove_dir(dest);
        }
    }
    result
}

/// Read everything into a temp file first, so the whole archive can be checked before any of it
/// is written.
pub fn unpack_stream<R: Read>(mut input: R, scratch: &Path, dest: &Path, strip_special: bool) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(scratch)?;
    let r = io::copy(&mut input, &mut f).and_then(|_| unpack_checked(&mut f, dest, strip_special));
    let _ = fs::remove_file(scratch);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn archive_with(dir: &Path, build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> fs::File {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let bytes = b.into_inner().unwrap();
        let p = dir.join("a.tar");
        fs::write(&p, bytes).unwrap();
        fs::OpenOptions::new().read(true).open(p).unwrap()
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    #[test]
    fn chunked_packing_hands_out_the_same_archive_in_bounded_pieces() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("a")).unwrap();
        fs::write(t.path().join("a/big"), vec![7u8; 100_000]).unwrap();
        fs::write(t.path().join("small"), "x").unwrap();
        let whole = pack(t.path(), Vec::new()).unwrap();
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        let total = pack_chunked(t.path(), 4096, |c| {
            pieces.push(c);
            Ok(())
        })
        .unwrap();
        assert_eq!(total, whole.len() as u64);
        assert!(pieces.iter().all(|p| !p.is_empty() && p.len() <= 4096));
        assert_eq!(pieces.concat(), whole);
        // A sink that fails stops the packing with its error.
        let err = pack_chunked(t.path(), 4096, |_| Err(io::Error::from(io::ErrorKind::BrokenPipe))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn round_trip_keeps_files_links_and_modes() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/f.txt"), "hello").unwrap();
        fs::set_permissions(src.join("sub/f.txt"), fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("sub/f.txt", src.join("link")).unwrap();
        let bytes = pack(&src, Vec::new()).unwrap();
        let dest = t.path().join("dest");
        unpack_stream(&bytes[..], &t.path().join("scratch"), &dest, true).unwrap();
        assert_eq!(fs::read_to_string(dest.join("sub/f.txt")).unwrap(), "hello");
        assert_eq!(fs::read_link(dest.join("link")).unwrap(), Path::new("sub/f.txt"));
        assert_eq!(fs::metadata(dest.join("sub/f.txt")).unwrap().permissions().mode() & 0o7777, 0o755);
    }

    type AddEntry = Box<dyn FnOnce(&mut tar::Builder<Vec<u8>>)>;

    #[test]
    fn escaping_entries_are_refused_and_nothing_is_written() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("dest");
        let cases: Vec<AddEntry> = vec![
            Box::new(|b| {
                let mut h = header(tar::EntryType::Regular, 3);
                h.as_gnu_mut().unwrap().name[..4].copy_from_slice(b"../x");
                h.set_cksum();
                b.append(&h, &b"bad"[..]).unwrap();
            }),
            Box::new(|b| {
                let mut h = header(tar::EntryType::Symlink, 0);
                b.append_link(&mut h, "esc", "../../outside").unwrap();
            }),
            Box::new(|b| {
                let mut h = header(tar::EntryType::Symlink, 0);
                b.append_link(&mut h, "abs", "/etc").unwrap();
            }),
        ];
        for build in cases {
            let mut f = archive_with(t.path(), |b| {
                let mut ok = header(tar::EntryType::Regular, 2);
                b.append_data(&mut ok, "fine.txt", &b"ok"[..]).unwrap();
                build(b);
            });
            let err = unpack_checked(&mut f, &dest, false).unwrap_err();
            assert!(err.to_string().starts_with("refused tar entry"), "{err}");
            assert!(!dest.exists(), "something was written");
            assert!(!t.path().join("x").exists());
        }
    }

    fn symlink(b: &mut tar::Builder<Vec<u8>>, path: impl AsRef<Path>, target: impl AsRef<Path>) {
        let mut h = header(tar::EntryType::Symlink, 0);
        b.append_link(&mut h, path, target).unwrap();
    }

    #[test]
    fn a_tree_with_what_cannot_travel_is_refused_before_packing() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("d")).unwrap();
        fs::write(t.path().join("d/f"), "x").unwrap();
        check_tree(t.path()).unwrap();
        let fifo = t.path().join("d/p");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let err = check_tree(t.path()).unwrap_err();
        assert_eq!(err.to_string(), "refused tar entry \"d/p\": only files, directories and links are transferred");
        assert!(!InTarget::is(&err));
        fs::remove_file(&fifo).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(t.path().join("s")).unwrap();
        assert!(check_tree(t.path()).unwrap_err().to_string().contains("\"s\": only files"));
    }

    #[test]
    fn a_path_through_a_link_already_in_the_target_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("out");
        // A first extraction leaves `b -> .`, inside by itself.
        let mut f = archive_with(t.path(), |b| symlink(b, "b", "."));
        unpack_checked(&mut f, &dest, false).unwrap();
        // Through it, a second one's `root` would point at the host's `/`; its files would be
        // written through it; a hard link would copy it elsewhere.
        let escape = "b/b/b/b/b/b/../../../../../..";
        for (entry, kind, what) in
            [("root", tar::EntryType::Symlink, escape), ("b/x", tar::EntryType::Regular, ""), ("h", tar::EntryType::Link, "b")]
        {
            let mut f = archive_with(t.path(), |b| match kind {
                tar::EntryType::Regular => b.append_data(&mut header(kind, 1), entry, &b"x"[..]).unwrap(),
                _ => b.append_link(&mut header(kind, 0), entry, what).unwrap(),
            });
            let err = unpack_checked(&mut f, &dest, false).unwrap_err();
            // The target's doing, not the archive's: the extracting side says it as its own.
            assert!(InTarget::is(&err), "{entry}: {err}");
            assert!(err.to_string().contains("a symlink already in the target"), "{entry}: {err}");
            assert_eq!(fs::read_dir(&dest).unwrap().count(), 1, "{entry}: something was written");
        }
        // Pointing at it is fine.
        let mut f = archive_with(t.path(), |b| symlink(b, "c", "b"));
        unpack_checked(&mut f, &dest, false).unwrap();
        assert_eq!(fs::read_link(dest.join("c")).unwrap(), Path::new("b"));
    }

    #[test]
    fn a_path_through_the_archives_own_link_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("a/b/dest");
        // Each looks inside by its text; through `a/up` (the target itself) the second would
        // point two levels above it, and the third at its parent.
        for second in [("a/up/x", "../.."), ("c", "a/up/.."), ("a/up/f", "")] {
            let mut f = archive_with(t.path(), |b| {
                symlink(b, "a/up", "..");
                if second.1.is_empty() {
                    let mut h = header(tar::EntryType::Regular, 1);
                    b.append_data(&mut h, second.0, &b"x"[..]).unwrap();
                } else {
                    symlink(b, second.0, second.1);
                }
            });
            let err = unpack_checked(&mut f, &dest, false).unwrap_err().to_string();
            assert!(err.contains("leads through the archive's own symlink \"a/up\""), "{second:?}: {err}");
            assert!(!dest.exists(), "something was written");
        }
        // However the path is spelled, and by a hard link to the link itself.
        for (first, second) in [(("a/./up", ".."), ("a/up/x", "../..")), (("a//up", ".."), ("a/up/x", "../.."))] {
            let mut f = archive_with(t.path(), |b| {
                symlink(b, first.0, first.1);
                symlink(b, second.0, second.1);
            });
            let err = unpack_checked(&mut f, &dest, false).unwrap_err().to_string();
            assert!(err.contains("leads through the archive's own symlink \"a/up\""), "{first:?}: {err}");
        }
        let mut f = archive_with(t.path(), |b| {
            symlink(b, "a/up", "..");
            let mut h = header(tar::EntryType::Link, 0);
            b.append_link(&mut h, "h", "a/up").unwrap();
        });
        let err = unpack_checked(&mut f, &dest, false).unwrap_err().to_string();
        assert!(err.contains("a hard link to the archive's own symlink \"a/up\""), "{err}");
        assert!(!dest.exists(), "something was written");
        // Pointing at a link of the archive is fine.
        let mut f = archive_with(t.path(), |b| {
            symlink(b, "a/up", "..");
            symlink(b, "b", "a/up");
        });
        unpack_checked(&mut f, &dest, false).unwrap();
        assert_eq!(fs::read_link(dest.join("b")).unwrap(), Path::new("a/up"));
    }

    #[test]
    fn names_that_are_not_utf8_are_refused_and_nothing_is_written() {
        use std::os::unix::ffi::OsStrExt;
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("out");
        let odd = std::ffi::OsStr::from_bytes(b"b\xff");
        // Checked as text with U+FFFD, written as these bytes: a link `b\xff -> .` already in
        // the target would not be seen on the way of `root -> b\xff/b\xff/../..`.
        for archive in [
            archive_with(t.path(), |b| symlink(b, odd, ".")),
            archive_with(t.path(), |b| symlink(b, "root", std::ffi::OsStr::from_bytes(b"b\xff/b\xff/../.."))),
            archive_with(t.path(), |b| b.append_data(&mut header(tar::EntryType::Regular, 1), odd, &b"x"[..]).unwrap()),
        ] {
            let mut f = archive;
            let err = unpack_checked(&mut f, &dest, false).unwrap_err().to_string();
            assert!(err.contains("is not UTF-8 (only UTF-8 names are transferred)"), "{err}");
            assert!(!dest.exists(), "something was written");
        }
        // And a local tree with one is refused before it is packed.
        let src = t.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join(odd), "x").unwrap();
        assert!(check_tree(&src).unwrap_err().to_string().contains("its name is not UTF-8"));
    }

    #[test]
    fn an_oversized_extended_header_is_refused_before_it_is_read() {
        use std::io::Write;
        let t = tempfile::tempdir().unwrap();
        // A GNU long name of 1 GiB: the tar crate would read it whole into memory. (A sparse
        // file: it takes no disk.)
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_path("././@LongLink").unwrap();
        h.set_size(1 << 30);
        h.set_cksum();
        let p = t.path().join("long.tar");
        let mut f = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        f.write_all(h.as_bytes()).unwrap();
        f.set_len(512 + (1 << 30) + 1024).unwrap();
        let err = unpack_checked(&mut f, &t.path().join("out"), false).unwrap_err().to_string();
        assert_eq!(err, format!("refused archive: an extended header of {} bytes (at most {MAX_EXTENSION})", 1u64 << 30));
        assert!(!t.path().join("out").exists());
    }

    #[test]
    fn a_pax_size_record_or_a_sparse_entry_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("out");
        // A PAX `size` moves where the next header is as the extraction reads it, not as the
        // walk that bounds the archive does.
        let mut f = archive_with(t.path(), |b| {
            let record = b"12 size=100\n";
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_path("pax").unwrap();
            h.set_size(record.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, &record[..]).unwrap();
            b.append_data(&mut header(tar::EntryType::Regular, 1), "f", &b"x"[..]).unwrap();
        });
        let err = unpack_checked(&mut f, &dest, false).unwrap_err().to_string();
        assert_eq!(err, "refused archive: an extended header sets \"size\" (not transferred)");
        let mut f = archive_with(t.path(), |b| b.append_data(&mut header(tar::EntryType::GNUSparse, 0), "s", &b""[..]).unwrap());
        let err = unpack_checked(&mut f, &dest, false).unwrap_err().to_string();
        assert_eq!(err, "refused archive: a sparse file entry (not transferred)");
        assert!(!dest.exists());
    }

    #[test]
    fn a_read_only_directory_takes_its_contents_and_keeps_its_mode() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("dest");
        let mut f = archive_with(t.path(), |b| {
            let mut d = header(tar::EntryType::Directory, 0);
            d.set_mode(0o555);
            b.append_data(&mut d, "ro/", &b""[..]).unwrap();
            let mut h = header(tar::EntryType::Regular, 2);
            b.append_data(&mut h, "ro/f", &b"in"[..]).unwrap();
        });
        unpack_checked(&mut f, &dest, false).unwrap();
        assert_eq!(fs::read(dest.join("ro/f")).unwrap(), b"in");
        assert_eq!(fs::metadata(dest.join("ro")).unwrap().permissions().mode() & 0o7777, 0o555);
        // The target keeps its own mode (a sticky /tmp stays sticky), whatever the archive's
        // `./` says.
        let shared = t.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("f"), "x").unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o700)).unwrap();
        let bytes = pack(&src, Vec::new()).unwrap();
        fs::write(t.path().join("p.tar"), bytes).unwrap();
        let mut f = fs::File::open(t.path().join("p.tar")).unwrap();
        unpack_checked(&mut f, &shared, true).unwrap();
        assert_eq!(fs::metadata(&shared).unwrap().permissions().mode() & 0o7777, 0o1777);
        assert_eq!(fs::read_to_string(shared.join("f")).unwrap(), "x");
        // A target the extraction makes takes the source's mode, read-only ones included.
        let mut f = fs::File::open(t.path().join("p.tar")).unwrap();
        unpack_checked(&mut f, &t.path().join("new/deep"), true).unwrap();
        assert_eq!(fs::metadata(t.path().join("new/deep")).unwrap().permissions().mode() & 0o7777, 0o700);
        fs::set_permissions(&src, fs::Permissions::from_mode(0o555)).unwrap();
        let bytes = pack(&src, Vec::new()).unwrap();
        fs::write(t.path().join("ro.tar"), bytes).unwrap();
        let mut f = fs::File::open(t.path().join("ro.tar")).unwrap();
        unpack_checked(&mut f, &t.path().join("ro-copy"), true).unwrap();
        assert_eq!(fs::metadata(t.path().join("ro-copy")).unwrap().permissions().mode() & 0o7777, 0o555);
        assert_eq!(fs::read_to_string(t.path().join("ro-copy/f")).unwrap(), "x");
    }

    #[test]
    fn a_failed_or_stopped_extraction_takes_out_what_it_made() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("dest");
        // Already there: a directory where the archive has a file, which cannot replace it.
        fs::create_dir_all(dest.join("blocker")).unwrap();
        fs::write(dest.join("blocker/kept"), "mine").unwrap();
        // Already there too: a file and a link the archive replaces before it fails.
        fs::write(dest.join("old.txt"), "before").unwrap();
        std::os::unix::fs::symlink("old.txt", dest.join("link")).unwrap();
        let build = |b: &mut tar::Builder<Vec<u8>>| {
            let mut h = header(tar::EntryType::Regular, 3);
            b.append_data(&mut h, "new.txt", &b"new"[..]).unwrap();
            let mut h = header(tar::EntryType::Regular, 5);
            b.append_data(&mut h, "old.txt", &b"after"[..]).unwrap();
            let mut h = header(tar::EntryType::Regular, 1);
            b.append_data(&mut h, "link", &b"y"[..]).unwrap();
            let mut d = header(tar::EntryType::Directory, 0);
            d.set_mode(0o555);
            b.append_data(&mut d, "newdir/", &b""[..]).unwrap();
            let mut h = header(tar::EntryType::Regular, 1);
            b.append_data(&mut h, "newdir/f", &b"x"[..]).unwrap();
            let mut h = header(tar::EntryType::Regular, 1);
            b.append_data(&mut h, "blocker", &b"x"[..]).unwrap();
        };
        let mut f = archive_with(t.path(), build);
        assert!(unpack_checked(&mut f, &dest, false).is_err());
        let mut left: Vec<String> = fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["blocker", "link", "old.txt"]);
        assert_eq!(fs::read_to_string(dest.join("blocker/kept")).unwrap(), "mine");
        // What it had replaced is back as it was.
        assert_eq!(fs::read_to_string(dest.join("old.txt")).unwrap(), "before");
        assert_eq!(fs::read_link(dest.join("link")).unwrap(), Path::new("old.txt"));
        // Replacing without a failure leaves nothing aside.
        fs::remove_dir_all(dest.join("blocker")).unwrap();
        let mut f = archive_with(t.path(), build);
        unpack_checked(&mut f, &dest, false).unwrap();
        assert_eq!(fs::read_to_string(dest.join("old.txt")).unwrap(), "after");
        let mut left: Vec<String> = fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["blocker", "link", "new.txt", "newdir", "old.txt"]);
        // Stopped before it began: a target it made is gone too.
        let fresh = t.path().join("fresh");
        let mut f = archive_with(t.path(), |b| {
            let mut h = header(tar::EntryType::Regular, 3);
            b.append_data(&mut h, "new.txt", &b"new"[..]).unwrap();
        });
        let err = unpack_checked_until(&mut f, &fresh, false, &AtomicBool::new(true)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
        assert!(!fresh.exists());
    }
}
