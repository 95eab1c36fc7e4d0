//! A writer for the `newc` cpio format, the one the kernel unpacks as an initramfs.
//! Written here because it is forty lines and lets the image be built without root, without
//! mounts and without an external tool; entries are emitted in the order given, byte for byte
//! reproducible (fixed mtime, inode numbers by position).

pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Default for Cpio {
    fn default() -> Self {
        Cpio { out: Vec::new(), ino: 1 }
    }
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let name = name.trim_start_matches('/');
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [self.ino, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn dir(&mut self, name: &str, perm: u32) {
        self.entry(name, S_IFDIR | perm, &[], (0, 0));
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, S_IFREG | perm, data, (0, 0));
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, S_IFLNK | 0o777, target.as_bytes(), (0, 0));
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | perm, &[], (major, minor));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's cpio tool must read back what we wrote, names, types and contents.
    #[test]
    fn cpio_reads_it_back() {
        let mut c = Cpio::default();
        c.dir("etc", 0o755);
        c.file("etc/hello", 0o644, b"hi there\n");
        c.symlink("etc/link", "hello");
        c.char_dev("dev-console", 0o600, 5, 1);
        let bytes = c.finish();
        assert_eq!(bytes.len() % 4, 0);
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, &bytes).unwrap();
        let Ok(out) = std::process::Command::new("cpio").args(["-itv", "-F"]).arg(&archive).output() else {
            panic!("the cpio tool is needed for this test (apt install cpio)");
        };
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("etc/hello"), "{listing}");
        assert!(listing.contains("etc/link -> hello"), "{listing}");
        assert!(listing.lines().any(|l| l.starts_with("crw-------") && l.contains("dev-console")), "{listing}");
        let ex = std::process::Command::new("cpio")
            .args(["-id", "--no-absolute-filenames", "-F"])
            .arg(&archive)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(ex.status.success() || dir.path().join("etc/hello").exists());
        assert_eq!(std::fs::read(dir.path().join("etc/hello")).unwrap(), b"hi there\n");
    }
}
