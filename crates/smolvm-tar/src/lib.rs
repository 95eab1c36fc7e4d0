//! Directories cross the host/guest boundary as tar streams. Each side extracts what the other
//! made, and the guest is untrusted, so extraction checks every entry first
//! ([`smolvm_proto::paths::check_entry`]) and writes nothing if any entry is refused; the tar
//! crate's `unpack_in` then also refuses to write through links that leave the target.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

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

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Check every entry of the archive in `file`, then extract it into `dest` (created if
/// missing). Setuid, setgid and sticky bits are dropped when `strip_special` is set.
pub fn unpack_checked(file: &mut fs::File, dest: &Path, strip_special: bool) -> io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    {
        let mut archive = tar::Archive::new(&mut *file);
        for entry in archive.entries()? {
            let entry = entry?;
            let path = entry.path()?.to_string_lossy().into_owned();
            let path = path.trim_start_matches("./");
            if path.is_empty() || path == "." {
                continue;
            }
            let link = entry.link_name()?.map(|l| l.to_string_lossy().into_owned());
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
        }
    }
    file.seek(SeekFrom::Start(0))?;
    fs::create_dir_all(dest)?;
    let mut archive = tar::Archive::new(&mut *file);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        if strip_special {
            entry.set_mask(0o7000);
        }
        if !entry.unpack_in(dest)? {
            return Err(invalid(format!("refused tar entry {:?}: it would land outside the target", entry.path()?)));
        }
    }
    Ok(())
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
}
