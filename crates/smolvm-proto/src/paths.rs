//! Rules for paths that cross the host/guest boundary. Both sides extract tar streams that the
//! other side made, and the guest is not trusted: an entry must not reach outside the
//! directory it is extracted into, by its own path or through a link.

/// A file uploaded onto a directory, which it would not replace: said alike over the agent and
/// over SFTP (whose own word for it is "Failure").
pub fn upload_onto_directory(path: &str) -> String {
    // (The path said, not "end it with /": one that already ends so, "/" itself, named the
    // directory's own name as the target.)
    format!("{path} is a directory; to upload into it, give {}/", path.trim_end_matches('/'))
}

/// Guest paths are absolute; a trailing `/` means "into this directory, same file name".
pub fn guest_target(guest: &str, file_name: &str) -> Result<String, String> {
    if !guest.starts_with('/') {
        return Err(format!("guest path must be absolute: {guest:?}"));
    }
    if guest.contains('\0') {
        return Err("guest path contains a NUL byte".into());
    }
    Ok(if guest.ends_with('/') { format!("{guest}{file_name}") } else { guest.to_string() })
}

/// `create_dir_all`, saying which part of the path is in the way when one is not a directory
/// (the call's own error, "File exists", names nothing). Used by both sides for the parents of
/// a transfer's destination.
pub fn make_dirs(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        let ancestors: Vec<&std::path::Path> = dir.ancestors().collect();
        match ancestors.into_iter().rev().find(|a| !a.as_os_str().is_empty() && a.exists() && !a.is_dir()) {
            Some(file) => std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} is not a directory", file.display())),
            None => e,
        }
    })
}

/// Depth of a relative path after `.` and `..`, or `None` if it climbs above its start.
fn depth_after(start: usize, rel: &str) -> Option<usize> {
    let mut depth = start;
    for part in rel.split('/') {
        match part {
            "" | "." => {}
            ".." => depth = depth.checked_sub(1)?,
            _ => depth += 1,
        }
    }
    Some(depth)
}

/// Check one tar entry: its path must be relative without `..`; a symlink's target must be
/// relative and stay inside the root when resolved from the entry's directory; a hard link's
/// target is a path in the archive and follows the path rules.
pub fn check_entry(path: &str, symlink: Option<&str>, hardlink: Option<&str>) -> Result<(), String> {
    let plain = |p: &str| -> Result<(), String> {
        if p.is_empty() || p.starts_with('/') {
            return Err(format!("absolute or empty path {p:?}"));
        }
        if p.split('/').any(|c| c == "..") {
            return Err(format!("path {p:?} contains '..'"));
        }
        Ok(())
    };
    plain(path)?;
    if let Some(target) = hardlink {
        plain(target).map_err(|e| format!("hard link {path:?}: {e}"))?;
    }
    if let Some(target) = symlink {
        if target.starts_with('/') {
            return Err(format!("symlink {path:?} points to the absolute path {target:?}"));
        }
        let parent_depth = depth_after(0, path).unwrap_or(0).saturating_sub(1);
        if depth_after(parent_depth, target).is_none() {
            return Err(format!("symlink {path:?} points outside the directory ({target:?})"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_in_the_way_of_a_directory_is_named() {
        let root = std::env::temp_dir().join(format!("smolvm-make-dirs-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("file"), "").unwrap();
        let e = make_dirs(&root.join("file/sub/deeper")).unwrap_err();
        assert_eq!(e.to_string(), format!("{} is not a directory", root.join("file").display()));
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        make_dirs(&root.join("dir/sub")).unwrap();
        assert!(root.join("dir/sub").is_dir());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn guest_paths() {
        assert_eq!(guest_target("/tmp/x", "f").unwrap(), "/tmp/x");
        assert_eq!(guest_target("/tmp/dir/", "f.txt").unwrap(), "/tmp/dir/f.txt");
        assert_eq!(guest_target("tmp/x", "f").unwrap_err(), "guest path must be absolute: \"tmp/x\"");
    }

    #[test]
    fn entries_that_escape_are_refused() {
        assert!(check_entry("a/b.txt", None, None).is_ok());
        assert!(check_entry("a/link", Some("../c"), None).is_ok());
        assert!(check_entry("a/link", Some("b/../../c"), None).is_ok());
        assert!(check_entry("../x", None, None).is_err());
        assert!(check_entry("a/../../x", None, None).is_err());
        assert!(check_entry("/etc/passwd", None, None).is_err());
        assert!(check_entry("link", Some("/etc"), None).is_err());
        assert!(check_entry("link", Some(".."), None).is_err());
        assert!(check_entry("a/link", Some("../../x"), None).is_err());
        assert!(check_entry("h", None, Some("../x")).is_err());
        assert!(check_entry("h", None, Some("a/b")).is_ok());
    }
}
