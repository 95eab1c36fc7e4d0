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

fn read() -> io::Result<BTreeMap<String, String>> {
    match fs::read_to_string(ENV_FILE) {
        Ok(text) => env::parse(&text).map_err(io::Error::other),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e),
    }
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
