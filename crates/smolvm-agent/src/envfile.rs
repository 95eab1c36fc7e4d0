//! The managed environment file, written atomically.

use smolvm_proto::env::{self, ENV_FILE};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

/// Env requests may arrive on several streams at once; read-modify-write must not interleave.
static LOCK: Mutex<()> = Mutex::new(());

/// The most the file can hold as we write it: every value quoted at its worst (`'` becomes
/// four bytes), with room to spare.
const FILE_MAX: u64 = 8 * env::MAX_ENV_BYTES as u64;

/// The file as we wrote it, or an error: root in the guest can put anything at its path, and
/// this runs in PID 1. A FIFO there held the agent's reading for good (open waits for a
/// writer), and `/dev/zero` or a file of 100 MB ran the guest out of memory.
fn read() -> io::Result<BTreeMap<String, String>> {
    let file = match fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(ENV_FILE) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{ENV_FILE}: {e} (it is not the file smolvm wrote)"))),
    };
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() > FILE_MAX {
        return Err(io::Error::other(format!("{ENV_FILE} is not the file smolvm wrote (not a regular file of at most {FILE_MAX} bytes)")));
    }
    let mut text = String::new();
    io::Read::read_to_string(&mut io::Read::take(file, FILE_MAX), &mut text)?;
    env::parse(&text).map_err(io::Error::other)
}

/// Temp file in the same directory (so rename is atomic), not ending in `.sh` (so a login shell
/// that starts meanwhile does not source it), removed on every failure.
fn write(vars: &BTreeMap<String, String>) -> io::Result<()> {
    let path = Path::new(ENV_FILE);
    let dir = path.parent().expect("env file has a parent");
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".smolvm_env.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(&tmp)?;
        f.write_all(env::render(vars).as_bytes())?;
        // The umask may have narrowed the mode given at creation.
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

pub fn list() -> io::Result<BTreeMap<String, String>> {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    read()
}

pub fn set(vars: BTreeMap<String, String>, merge: bool) -> io::Result<Vec<String>> {
    env::validate_vars(&vars).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut current = if merge { read()? } else { BTreeMap::new() };
    current.extend(vars);
    env::check_total(&current).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    write(&current)?;
    Ok(current.into_keys().collect())
}

pub fn unset(keys: Vec<String>) -> io::Result<BTreeMap<String, String>> {
    for k in &keys {
        env::validate_key(k).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    }
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut current = read()?;
    let removed: BTreeMap<_, _> = keys.iter().filter_map(|k| current.remove_entry(k)).collect();
    if !removed.is_empty() {
        write(&current)?;
    }
    Ok(removed)
}
