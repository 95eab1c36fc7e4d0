//! File transfer: uploads arrive as input frames into a temp file that is renamed into place
//! when complete; downloads stream out in chunks. Directories travel as tar.

use crate::flow::Window;
use crate::server::Writer;
use smolvm_proto::{ErrorKind, Reply, CHUNK};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

struct Upload {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    mode: u32,
    tar: bool,
    /// Stored and not yet granted back: grants go in steps, one small frame each.
    ungranted: usize,
    /// The parent directories this upload made, deepest first: an upload that fails or is
    /// given up takes them out again (those still empty), as its temporary file.
    made: Vec<PathBuf>,
}

impl Upload {
    /// Nothing of it stays: its temporary file, and the directories it made for it.
    fn discard(self) {
        let _ = fs::remove_file(&self.tmp);
        remove_made(&self.made);
    }
}

/// `dir` and its missing ancestors, made one by one: those this call made, deepest first (one
/// another process made meanwhile is not counted, so a failed upload never takes it out).
fn make_parents(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut made = Vec::new();
    let mut ancestors: Vec<&Path> = dir.ancestors().filter(|d| !d.as_os_str().is_empty()).collect();
    ancestors.reverse();
    for d in ancestors {
        let made_here = match fs::create_dir(d) {
            Ok(()) => Ok(true),
            // (One there already; a file in the way is an error, said below.)
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => Ok(false),
            Err(e) => Err(e),
        };
        match made_here {
            Ok(true) => made.push(d.to_path_buf()),
            Ok(false) => {}
            Err(e) => {
                made.reverse();
                remove_made(&made);
                // (Says which part of the path is in the way.)
                return Err(smolvm_proto::paths::make_dirs(dir).err().unwrap_or(e));
            }
        }
    }
    made.reverse();
    Ok(made)
}

/// Those of `made` still empty (deepest first), as a failed upload leaves them.
fn remove_made(made: &[PathBuf]) {
    for dir in made {
        let _ = fs::remove_dir(dir);
    }
}

fn uploads() -> MutexGuard<'static, HashMap<u32, Upload>> {
    static U: OnceLock<Mutex<HashMap<u32, Upload>>> = OnceLock::new();
    U.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

/// Directory uploads being extracted, by stream: set to stop one.
fn extracting() -> MutexGuard<'static, HashMap<u32, Arc<AtomicBool>>> {
    static E: OnceLock<Mutex<HashMap<u32, Arc<AtomicBool>>>> = OnceLock::new();
    E.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

/// How often an extraction under way says so (the host gives up after 60 s of silence).
const GOING_ON: Duration = Duration::from_secs(5);

fn io_error(what: &str, e: io::Error) -> Reply {
    let kind = match e.kind() {
        // (`/a/file/x`: no such path, as for a missing one.)
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => ErrorKind::NotFound,
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => ErrorKind::Invalid,
        _ => ErrorKind::Failed,
    };
    // With its causes: an archive's "failed to unpack …" says why only in its source (a full
    // disk, say).
    let mut message = format!("{what}: {e}");
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.ends_with(&text) {
            message = format!("{message}: {text}");
        }
        cause = c.source();
    }
    Reply::error(kind, message)
}

/// Waits for the set-up, and says why it failed (a host directory that could not be mounted):
/// a transfer then fails with that, as a command does, instead of using the bare mount point.
fn set_up_failed() -> Option<String> {
    crate::pending::wait();
    crate::pending::failure()
}

/// Begin an upload. Errors are answered at once; otherwise `Ok` comes after `StdinClose`.
pub fn put_start(stream: u32, path: String, mode: u32, tar: bool, w: &Writer) {
    // After the set-up, as commands: a file sent to a host directory's mount point before the
    // mount would land under it, out of sight. (On the reading thread, so other streams' frames
    // wait too: the set-up is the boot's or a greeting's, milliseconds, and none of it reads
    // the channel.)
    if let Some(why) = set_up_failed() {
        return w.send(stream, &Reply::error(ErrorKind::Failed, why));
    }
    if !path.starts_with('/') {
        return w.send(stream, &Reply::error(ErrorKind::Invalid, format!("guest path must be absolute: {path:?}")));
    }
    let dest = PathBuf::from(&path);
    // Said before the bytes travel, not by the rename at their end (or, for a directory onto a
    // file, as "File exists").
    if !tar && dest.is_dir() {
        return w.send(stream, &Reply::error(ErrorKind::Invalid, smolvm_proto::paths::upload_onto_directory(&path)));
    }
    // (Through a link to a directory is into it; a link to nothing, or a loop, is in the way.)
    if tar && fs::symlink_metadata(&dest).is_ok() && !fs::metadata(&dest).is_ok_and(|m| m.is_dir()) {
        return w.send(
            stream,
            &Reply::error(
                ErrorKind::Invalid,
                format!("{path} exists and is not a directory: a directory is uploaded into a directory or to a new path"),
            ),
        );
    }
    // Beside the destination, on its filesystem: a file is renamed into place, and an archive
    // (a directory) needs the destination's room, not RAM's (/run is a tmpfs).
    let parent = dest.parent().unwrap_or(Path::new("/")).to_path_buf();
    let opened = make_parents(&parent).and_then(|made| {
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = parent.join(format!(".{name}.smolvm-upload-{stream}"));
        // A new file, never through what is there: a guest user may have put a link to
        // /etc/shadow at this (predictable) name. What is there is an earlier upload's
        // leftover or such a link, and goes (a link itself, not its target).
        let create =
            || fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp);
        let created = create().or_else(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => fs::remove_file(&tmp).and_then(|()| create()),
            _ => Err(e),
        });
        match created {
            Ok(file) => Ok((file, tmp, made)),
            Err(e) => {
                remove_made(&made);
                Err(e)
            }
        }
    });
    match opened {
        Ok((file, tmp, made)) => {
            uploads().insert(stream, Upload { file, tmp, dest, mode, tar, ungranted: 0, made });
        }
        Err(e) => w.send(stream, &io_error(&format!("receiving {path}"), e)),
    }
}

/// Returns false when the stream is not an upload (its input belongs to a process).
pub fn put_data(stream: u32, data: &[u8], w: &Writer) -> bool {
    let mut ups = uploads();
    let Some(up) = ups.get_mut(&stream) else { return false };
    match up.file.write_all(data) {
        // Stored: the host may send as much more (it holds to its window until granted).
        Ok(()) => {
            up.ungranted += data.len();
            if up.ungranted >= smolvm_proto::CREDIT_STEP {
                w.send(stream, &Reply::Credit(up.ungranted as u32));
                up.ungranted = 0;
            }
        }
        Err(e) => {
            ups.remove(&stream).expect("present").discard();
            w.send(stream, &io_error("writing the upload", e));
        }
    }
    true
}

pub fn put_end(stream: u32, w: &Writer) -> bool {
    let Some(up) = uploads().remove(&stream) else { return false };
    if up.tar {
        // A big tree takes a while to extract: on a thread of its own, so that this reader
        // goes on serving every other stream meanwhile (else their frames, pings and credits
        // included, wait for it). Without a thread to be had, here.
        let w = w.for_session();
        let stop = Arc::new(AtomicBool::new(false));
        extracting().insert(stream, stop.clone());
        let extract = move || {
            let mut up = up;
            // The host waits for the answer only so long without a word: a big tree on a slow
            // disk takes longer, so it hears every few seconds that this goes on. A given-up
            // upload (`put_cancel`) stops, and takes out what it made.
            let mut said = Instant::now();
            let mut going_on = || {
                if said.elapsed() >= GOING_ON {
                    w.send(stream, &Reply::GoingOn);
                    said = Instant::now();
                }
            };
            let r = smolvm_tar::unpack_checked_watched(&mut up.file, &up.dest, false, &stop, &mut going_on);
            extracting().remove(&stream);
            let _ = fs::remove_file(&up.tmp);
            if r.is_err() {
                remove_made(&up.made);
            }
            w.send(stream, &stored(r, &up.dest));
        };
        crate::workers::on_thread_or_here(extract, crate::workers::run);
        return true;
    }
    let result = up.file.set_permissions(fs::Permissions::from_mode(up.mode & 0o7777)).and_then(|_| fs::rename(&up.tmp, &up.dest));
    let reply = stored(result, &up.dest);
    if !matches!(reply, Reply::Ok) {
        up.discard();
    }
    w.send(stream, &reply);
    true
}

fn stored(result: std::io::Result<()>, dest: &std::path::Path) -> Reply {
    match result {
        Ok(()) => Reply::Ok,
        Err(e) => io_error(&format!("storing {}", dest.display()), e),
    }
}

/// Drop every upload in progress, with its temp file.
pub fn cancel_all() {
    for (_, up) in uploads().drain() {
        up.discard();
    }
}

pub fn put_cancel(stream: u32) {
    if let Some(up) = uploads().remove(&stream) {
        up.discard();
    }
    if let Some(stop) = extracting().get(&stream) {
        stop.store(true, Ordering::Relaxed);
    }
}

/// Stream a file, or a directory as tar, on its own thread.
pub fn get(stream: u32, path: String, w: Writer) {
    let window = crate::flow::open(stream);
    let (w2, window2) = (w.clone(), window.clone());
    let started = crate::workers::thread(move || {
        get_on(stream, path, &w, &window);
        crate::flow::forget(stream, &window);
    });
    if let Err(e) = started {
        crate::flow::forget(stream, &window2);
        w2.send(stream, &Reply::error(ErrorKind::Failed, format!("cannot start the download: no thread for it ({e})")));
    }
}

fn get_on(stream: u32, path: String, w: &Writer, window: &Window) {
    if let Some(why) = set_up_failed() {
        return w.send(stream, &Reply::error(ErrorKind::Failed, why));
    }
    // One chunk once the host has room for it; an error once nobody reads (a cancel).
    let data = |chunk: Vec<u8>| match window.send(w, stream, &Reply::Data(chunk)) {
        true => Ok(()),
        false => Err(io::Error::other("the download was cancelled")),
    };
    if !path.starts_with('/') {
        return w.send(stream, &Reply::error(ErrorKind::Invalid, format!("guest path must be absolute: {path:?}")));
    }
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) => return w.send(stream, &io_error(&format!("reading {path}"), e)),
    };
    // A device, FIFO or socket has no end to read to (think of /dev/zero).
    if !meta.is_dir() && !meta.is_file() {
        return w.send(stream, &Reply::error(ErrorKind::Invalid, format!("{path} is not a regular file or a directory")));
    }
    let mode = meta.permissions().mode() & 0o7777;
    let sent = if meta.is_dir() {
        // Streamed as it is packed: the archive of a directory in the guest's RAM (tmpfs, an
        // initramfs) would need that memory a second time, and PID 1 out of memory ends the VM.
        smolvm_tar::pack_chunked(Path::new(&path), CHUNK, data)
    } else {
        File::open(&path).and_then(|f| send_from(f, data))
    };
    match sent {
        Ok(size) => w.send(stream, &Reply::FileDone { mode, size, tar: meta.is_dir() }),
        Err(e) => w.send(stream, &io_error(&format!("reading {path}"), e)),
    }
}

fn send_from(mut r: impl Read, data: impl Fn(Vec<u8>) -> io::Result<()>) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        data(buf[..n].to_vec())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_names_its_causes() {
        #[derive(Debug)]
        struct Unpack(io::Error);
        impl std::fmt::Display for Unpack {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "failed to unpack `/root/t/a`")
            }
        }
        impl std::error::Error for Unpack {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = io::Error::other(Unpack(io::Error::from_raw_os_error(libc::ENOSPC)));
        match io_error("storing /root/t", e) {
            Reply::Error { message, .. } => {
                assert_eq!(message, "storing /root/t: failed to unpack `/root/t/a`: No space left on device (os error 28)")
            }
            other => panic!("{}", other.kind()),
        }
    }
}
