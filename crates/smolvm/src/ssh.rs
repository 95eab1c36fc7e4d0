//! The SSH path into sandboxes whose image has an SSH server (sshd or dropbear).
//!
//! The agent stays the trusted channel: at every boot the host asks it to install the
//! authorized keys, make the sandbox's own host key on first boot, start the server and hand
//! back the host key's public half. That key is pinned in the sandbox's own known_hosts under an
//! alias, so a connection to anything else (another sandbox on a reused port, a rogue listener)
//! fails host key verification instead of being trusted. The guest's port 22 is exposed on a
//! host loopback port the same way `expose_local` does it, which works in every network mode.
//!
//! Clients are OpenSSH's own `ssh` and `sftp`: what users already run, with their full
//! interactive behaviour, and no SSH implementation of ours to get wrong.

use crate::config::Dirs;
use crate::error::{Error, IoContext, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs in the guest (over the agent, `/bin/sh -c`) at every boot of an image with a root disk.
/// Exit 3 means the image has no SSH server. Idempotent: a restored snapshot already runs one.
/// The keys are made under umask 077; the server starts under the agent's 022, which its
/// sessions inherit (commands and SFTP over SSH made private files where the agent does not).
///
/// A sandbox makes its host key at its first boot. A clone restored from a snapshot is another
/// sandbox with its source's disk, key and (from a full snapshot) running server: told apart by
/// `SMOLVM_SSH_OWNER` against the owner the disk records, it gets a key of its own and the
/// server restarts with it, so no two sandboxes can pass for each other.
///
/// Shell builtins stand in for small programs (`cat`, `cut`, `grep`, `chmod`, `rm` where
/// there is nothing to remove): each program started costs a TCG guest tens of milliseconds,
/// the first time most of all, and this runs on every start (8 programs took a debian-ssh
/// warm start's set-up to 0.59 s, most of the start).
pub(crate) const SETUP_SCRIPT: &str = r#"set -e
umask 077
[ -d /root/.ssh ] || mkdir -p /root/.ssh
printf '%s\n' "$SMOLVM_SSH_KEYS" > /root/.ssh/authorized_keys
# (A file written without a newline still reads, with read's status 1.)
first_line() { v=; [ ! -f "$1" ] || read -r v < "$1" || true; }
running() { first_line "$1"; [ -n "$v" ] && kill -0 "$v" 2>/dev/null; }
owner=/etc/smolvm-ssh-owner
# (pid file, host key): another sandbox's key and server go.
adopt() {
  first_line $owner
  [ "$v" = "$SMOLVM_SSH_OWNER" ] && return 0
  if running "$1"; then
    p=$v; kill "$p" 2>/dev/null || true
    n=0; while kill -0 "$p" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.05; n=$((n+1)); done
  fi
  for f in "$2" "$2.pub"; do [ ! -e "$f" ] && [ ! -L "$f" ] || rm -f "$f"; done
}
if [ -x /usr/sbin/sshd ]; then
  k=/etc/ssh/ssh_host_ed25519_key
  adopt /run/sshd.pid $k
  [ -s $k ] || ssh-keygen -q -t ed25519 -N '' -f $k >/dev/null
  [ -d /run/sshd ] || mkdir -m 0755 /run/sshd
  running /run/sshd.pid || (umask 022; exec /usr/sbin/sshd)
  printf '%s' "$SMOLVM_SSH_OWNER" > $owner
  { read -r t b rest || [ -n "$b" ]; } < $k.pub
  printf '%s %s\n' "$t" "$b"
elif [ -x /usr/sbin/dropbear ]; then
  k=/etc/dropbear/dropbear_ed25519_host_key
  [ -d /etc/dropbear ] || mkdir -p /etc/dropbear
  adopt /var/run/dropbear.pid $k
  # (A key half made (a disk saved mid-keygen) leaves dropbearkey's temporary file, which a
  # later keygen of the same pid would not replace. Its stderr says why it failed.)
  if [ ! -s $k ]; then
    for f in $k.tmp*; do [ ! -e "$f" ] && [ ! -L "$f" ] || rm -f "$f"; done
    dropbearkey -t ed25519 -f $k >/dev/null
  fi
  running /var/run/dropbear.pid || (umask 022; exec dropbear -s -r $k -P /var/run/dropbear.pid)
  printf '%s' "$SMOLVM_SSH_OWNER" > $owner
  dropbearkey -y -f $k | while read -r t b rest; do case $t in ssh-*) printf '%s %s\n' "$t" "$b" ;; esac; done
else
  exit 3
fi
"#;

/// One line `TYPE BASE64 [COMMENT]`, as in an authorized_keys file.
pub fn validate_public_key(key: &str) -> Result<()> {
    let mut words = key.split_whitespace();
    let ok = matches!((words.next(), words.next()), (Some(t), Some(b))
        if (t.starts_with("ssh-") || t.starts_with("ecdsa-") || t.starts_with("sk-"))
            && b.len() >= 16 && b.chars().all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c)))
        && !key.contains('\n');
    if ok {
        Ok(())
    } else {
        Err(Error::validation("ssh_public_key", "expected one OpenSSH public key line (\"ssh-ed25519 AAAA... [comment]\")"))
    }
}

/// smolvm's per-user key pair (ed25519, made on first use, 0600 in the data directory):
/// returns the private key's path and the public key line.
pub fn user_key(dirs: &Dirs) -> Result<(PathBuf, String)> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = dirs.data.join("ssh");
    let key = dir.join("id_ed25519");
    let public = dir.join("id_ed25519.pub");
    if !key.exists() || !public.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).ctx(|| format!("creating {}", dir.display()))?;
        // One maker at a time: two first uses renaming their own pairs into place could leave
        // one's private key beside the other's public key.
        let lock = std::fs::File::create(dir.join(".lock")).ctx(|| format!("creating {}", dir.join(".lock").display()))?;
        let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::Host(format!("locking {}: {e}", dir.display())))?;
        // Another process may have made it while this one waited.
        if !key.exists() || !public.exists() {
            make_key(&dir, &key, &public)?;
        }
    }
    let line = std::fs::read_to_string(&public).ctx(|| format!("reading {}", public.display()))?;
    Ok((key, line.trim().to_string()))
}

/// Made under a temporary name and renamed: a crash half way leaves no half key.
fn make_key(dir: &Path, key: &Path, public: &Path) -> Result<()> {
    let tmp = dir.join(format!(".id_ed25519.{}", std::process::id()));
    let tmp_public = PathBuf::from(format!("{}.pub", tmp.display()));
    let clear = || {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&tmp_public);
    };
    // (Also what another process, since gone, left: this runs under the key's lock.)
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".id_ed25519.") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "smolvm", "-f"])
        .arg(&tmp)
        .output()
        .ctx(|| "running ssh-keygen (openssh-client)".into())
        .and_then(|out| match out.status.success() {
            true => Ok(()),
            false => Err(Error::Host(format!("ssh-keygen failed: {}", String::from_utf8_lossy(&out.stderr).trim()))),
        })
        .and_then(|()| std::fs::rename(&tmp_public, public).ctx(|| "storing the SSH key".into()))
        .and_then(|()| std::fs::rename(&tmp, key).ctx(|| "storing the SSH key".into()));
    if made.is_err() {
        clear();
    }
    made
}

/// How to reach one sandbox's SSH server.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub port: u16,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    pub alias: String,
}

/// A path as an ssh option value: quoted (a space would split it into two files) and with
/// `%` doubled (ssh expands `%` tokens in these paths). `Endpoint::check` refuses a path with a
/// double quote or a control character, which no quoting carries.
fn config_path(p: &Path) -> String {
    format!("\"{}\"", p.display().to_string().replace('%', "%%"))
}

impl Endpoint {
    /// Refuse paths that cannot be handed to ssh (see `config_path`).
    pub fn check(self) -> Result<Endpoint> {
        for p in [&self.key, &self.known_hosts] {
            let text = p.to_string_lossy();
            if text.contains('"') || text.chars().any(char::is_control) {
                return Err(Error::Ssh(format!(
                    "{} holds a double quote or a control character, which ssh cannot be given; use a data directory without them",
                    p.display()
                )));
            }
        }
        Ok(self)
    }

    /// Options shared by `ssh` and `sftp`: our key only, the pinned host key only, no config
    /// files of the user's that could change either.
    fn options(&self) -> Vec<String> {
        // The key as an option, not `-i`: ssh expands `%` tokens in either, but checks `-i`'s
        // file under its literal name first, so a `%` in it could not be written both ways.
        let mut args = vec!["-F".into(), "/dev/null".into()];
        for o in [
            format!("IdentityFile={}", config_path(&self.key)),
            "IdentitiesOnly=yes".to_string(),
            format!("UserKnownHostsFile={}", config_path(&self.known_hosts)),
            "GlobalKnownHostsFile=/dev/null".into(),
            "StrictHostKeyChecking=yes".into(),
            format!("HostKeyAlias={}", self.alias),
            "LogLevel=ERROR".into(),
            "ConnectTimeout=10".into(),
            "ServerAliveInterval=15".into(),
        ] {
            args.push("-o".into());
            args.push(o);
        }
        args
    }

    /// `ssh` to the sandbox as root; `remote` is a shell command line (none: a login shell).
    pub fn ssh(&self, remote: Option<&str>, tty: bool) -> Command {
        self.ssh_logging(remote, tty, None)
    }

    /// `ssh`, its own messages (not the command's) going to `log` where given: a failure of
    /// ssh's own is then told apart from a command that wrote to stderr and exited 255.
    pub fn ssh_logging(&self, remote: Option<&str>, tty: bool, log: Option<&Path>) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(self.options()).arg("-p").arg(self.port.to_string());
        if let Some(log) = log {
            cmd.arg("-E").arg(log);
        }
        if tty {
            cmd.arg("-t");
        } else {
            cmd.args(["-o", "BatchMode=yes", "-T"]);
        }
        cmd.arg("root@127.0.0.1");
        if let Some(r) = remote {
            cmd.arg("--").arg(r);
        }
        cmd
    }

    /// `sftp` in batch mode, commands on its standard input.
    pub fn sftp(&self) -> Command {
        let mut cmd = Command::new("sftp");
        // (Not `-q`: it silences ssh's own errors, a changed host key's among them.)
        cmd.args(self.options()).args(["-o", "BatchMode=yes", "-b", "-", "-P"]).arg(self.port.to_string()).arg("root@127.0.0.1");
        cmd
    }
}

/// The known_hosts line that pins a sandbox's host key.
pub fn known_hosts_line(alias: &str, host_key: &str) -> Result<String> {
    let key = host_key.lines().find(|l| l.starts_with("ssh-")).unwrap_or("").trim();
    validate_public_key(key).map_err(|_| Error::Guest(format!("the SSH server gave no usable host key ({host_key:?})")))?;
    Ok(format!("{alias} {key}\n"))
}

/// The remote command line for `run` over SSH: the same shell as the agent would use, bounded by
/// `timeout` in the guest, and on a timeout the command's whole process group killed, as the
/// agent does.
///
/// Busybox's `timeout` (Alpine) kills the command's shell alone, and what it had started in
/// the background ran on (coreutils' kills its own process group). So the command runs in a
/// session of its own: `setsid` first (in place, as a background job is no group leader; where
/// an image has none, the command runs without), then `timeout`, which runs the shell in that
/// same process. Once it ended by the timeout, the group goes. A background job's standard
/// input would be /dev/null: it gets the session's through a duplicate.
pub fn remote_command(command: &str, login: bool, timeout_secs: u64, cwd: Option<&str>) -> String {
    let shell = if login { r#""${SHELL:-/bin/sh}" -lc"# } else { "/bin/sh -c" };
    let cd = cwd.map(|d| format!("cd {} || exit $?; ", crate::env::quote(d))).unwrap_or_default();
    // A command that starts with '-' or '+' would read as the shell's options: `--` ends them.
    let end = if command.starts_with(['-', '+']) { "-- " } else { "" };
    let run = format!("{shell} {end}{}", crate::env::quote(command));
    // Not `exec`, and not last (a shell runs its last command in its own place): the server's
    // shell waits and exits with the command's status, 128+N for a signal, where the server
    // would report the signal itself (and ssh exit 255).
    if timeout_secs == 0 {
        // (Zero: no timeout. Not passed on as such: busybox's `timeout 0` is no "none".)
        return format!("{cd}{run}; exit $?");
    }
    let n = timeout_secs;
    format!(
        "{cd}t=$(date +%s); exec 3<&0; $(command -v setsid) timeout -k 2 {n} {run} 0<&3 3<&- & p=$!; wait $p 2>/dev/null; s=$?; \
         if [ $s -ge 124 ] && [ $(($(date +%s) - t)) -ge {n} ]; then kill -KILL -$p; fi 2>/dev/null; exit $s"
    )
}

/// A path quoted for an sftp batch line. A line break (or any control character) would end the
/// line and start a command of its own, and sftp runs `!command` lines on the host: refused,
/// as the caller's `field` (the guest's or the local path).
pub fn sftp_quote(p: &str, field: &'static str) -> Result<String> {
    if p.chars().any(char::is_control) {
        return Err(Error::validation(field, format!("{p:?} contains a control character, which SFTP transfers cannot carry")));
    }
    Ok(format!("\"{}\"", p.replace('\\', "\\\\").replace('"', "\\\"")))
}

/// sftp batch lines that create `dir` and its parents (`-`: an existing one is no error).
pub fn sftp_mkdirs(dir: &Path) -> Result<String> {
    let mut out = String::new();
    let mut cur = PathBuf::from("/");
    for c in dir.components().skip(1) {
        cur.push(c);
        out.push_str(&format!("-mkdir {}\n", sftp_quote(&cur.to_string_lossy(), "guest_path")?));
    }
    Ok(out)
}

/// ssh's words when the sandbox's host key is not the pinned one (ssh's banner, several lines,
/// ends with the first). Said as one error, the same for every path in (a command, SFTP,
/// `wait_for_ssh`, which would otherwise wait out its timeout against a key that never fits).
pub fn host_key_failure(said: &str) -> Option<Error> {
    let failed = said.contains("Host key verification failed") || said.contains("HOST IDENTIFICATION HAS CHANGED");
    failed.then(|| {
        Error::Ssh(
            "Host key verification failed. The sandbox's SSH host key is not the one pinned for it (known_hosts in its directory); \
             nothing was sent to it"
                .into(),
        )
    })
}

/// What ssh itself writes on the session's stderr when the server goes away under a command
/// (not to its log: `-E` and `LogLevel` do not reach it).
const CLOSED_BY_SERVER: &[u8] = b"Connection to 127.0.0.1 closed by remote host.\r\n";

/// A command's stderr over SSH, with ssh's own closing line held back until it is known
/// whether the stream ends with it, so that it is never passed on as the command's.
#[derive(Default)]
pub struct SessionStderr {
    held: Vec<u8>,
    /// Whether what was passed on so far ends a line (ssh's line starts one).
    mid_line: bool,
}

impl SessionStderr {
    /// Take `new` bytes; returns those that are surely the command's.
    pub fn take(&mut self, new: &[u8]) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.held);
        data.extend_from_slice(new);
        let start = if data.ends_with(CLOSED_BY_SERVER) {
            Some(data.len() - CLOSED_BY_SERVER.len())
        } else {
            let line = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            (line < data.len() && CLOSED_BY_SERVER.starts_with(&data[line..])).then_some(line)
        };
        if let Some(start) = start.filter(|&i| if i == 0 { !self.mid_line } else { data[i - 1] == b'\n' }) {
            self.held = data.split_off(start);
        }
        if let Some(&last) = data.last() {
            self.mid_line = last != b'\n';
        }
        data
    }

    /// At the stream's end: whether ssh's closing line ended it (the server went away), and
    /// what else was still held (the command's).
    pub fn finish(self) -> (bool, Vec<u8>) {
        if self.held == CLOSED_BY_SERVER {
            (true, Vec::new())
        } else {
            (false, self.held)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_closing_line_is_held_back_and_only_it() {
        let feed = |chunks: &[&[u8]]| {
            let mut s = SessionStderr::default();
            let mut out: Vec<u8> = chunks.iter().flat_map(|c| s.take(c)).collect();
            let (closed, rest) = s.finish();
            out.extend(rest);
            (String::from_utf8(out).unwrap(), closed)
        };
        let line = "Connection to 127.0.0.1 closed by remote host.\r\n";
        assert_eq!(feed(&[b"err\n", line.as_bytes()]), ("err\n".into(), true));
        // In pieces, across reads.
        let pieces: Vec<&[u8]> = line.as_bytes().chunks(5).collect();
        assert_eq!(feed(&[&[b"a\n".as_slice()], pieces.as_slice()].concat()), ("a\n".into(), true));
        // The same words from the command, followed by more, or not at a line's start, are its.
        let more = format!("{line}x\n");
        assert_eq!(feed(&[more.as_bytes()]), (more.clone(), false));
        let inside = format!("no newline {line}");
        assert_eq!(feed(&[inside.as_bytes()]), (inside.clone(), false));
        assert_eq!(feed(&[b"Conn"]), ("Conn".into(), false));
        assert_eq!(feed(&[b"plain\n", b"Connection to 127"]), ("plain\nConnection to 127".into(), false));
    }

    #[test]
    fn paths_with_spaces_and_percent_reach_ssh_whole() {
        let ep = Endpoint {
            port: 2222,
            key: "/d a%c/ssh/id_ed25519".into(),
            known_hosts: "/d a%c/vms/x/known_hosts".into(),
            alias: "smolvm-x".into(),
        }
        .check()
        .unwrap();
        // ssh itself reads the options back: one file, the name as given.
        let out = Command::new("ssh").arg("-G").args(ep.options()).arg("root@127.0.0.1").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.lines().any(|l| l == "userknownhostsfile /d a%c/vms/x/known_hosts")
                // (Shown before its `%%` becomes `%`, which happens as the key is loaded.)
                && text.lines().any(|l| l.starts_with("identityfile /d a%%c/")),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bad = Endpoint { known_hosts: "/d\"q/known_hosts".into(), ..ep };
        assert!(bad.check().is_err());
    }

    #[test]
    fn concurrent_first_uses_agree_on_one_matching_key_pair() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = Dirs { data: tmp.path().join("data"), images: tmp.path().join("images") };
        let results: Vec<(PathBuf, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6).map(|_| s.spawn(|| user_key(&dirs).unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|r| r == &results[0]), "{results:?}");
        // The private key is the one the public key belongs to.
        let derived = Command::new("ssh-keygen").arg("-y").arg("-f").arg(&results[0].0).output().unwrap();
        let derived = String::from_utf8_lossy(&derived.stdout);
        assert_eq!(derived.split_whitespace().take(2).collect::<Vec<_>>(), results[0].1.split_whitespace().take(2).collect::<Vec<_>>());
        // No temporary files are left.
        let names: Vec<String> =
            std::fs::read_dir(dirs.data.join("ssh")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        assert!(names.iter().all(|n| n == "id_ed25519" || n == "id_ed25519.pub" || n == ".lock"), "{names:?}");
    }

    #[test]
    fn public_keys_are_checked() {
        validate_public_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx4 user@host").unwrap();
        for bad in [
            "",
            "AAAA",
            "ssh-ed25519",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx4\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAB",
            "rsa AAAAC3NzaC1lZDI1NTE5",
        ] {
            let e = validate_public_key(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid ssh_public_key:"), "{e}");
        }
    }

    #[test]
    fn known_hosts_pins_under_the_alias() {
        let l = known_hosts_line("smolvm-box", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx4\n").unwrap();
        assert_eq!(l, "smolvm-box ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx4\n");
        assert!(known_hosts_line("a", "garbage").is_err());
    }

    #[test]
    fn a_command_that_starts_with_a_dash_is_not_an_option() {
        assert_eq!(remote_command("-n", false, 0, None), "/bin/sh -c -- '-n'; exit $?");
        assert_eq!(remote_command("+x", false, 0, None), "/bin/sh -c -- '+x'; exit $?");
        assert_eq!(remote_command("n", false, 0, None), "/bin/sh -c 'n'; exit $?");
    }

    #[test]
    fn remote_commands_quote_and_bound() {
        let c = remote_command("echo 'hi' $HOME", true, 7, Some("/tmp/a b"));
        assert_eq!(
            c,
            r#"cd '/tmp/a b' || exit $?; t=$(date +%s); exec 3<&0; $(command -v setsid) timeout -k 2 7 "${SHELL:-/bin/sh}" -lc 'echo '"'"'hi'"'"' $HOME' 0<&3 3<&- & p=$!; wait $p 2>/dev/null; s=$?; if [ $s -ge 124 ] && [ $(($(date +%s) - t)) -ge 7 ]; then kill -KILL -$p; fi 2>/dev/null; exit $s"#
        );
        assert_eq!(remote_command("true", false, 0, Some("/x")), "cd '/x' || exit $?; /bin/sh -c 'true'; exit $?");
    }

    #[test]
    fn sftp_lines() {
        assert_eq!(sftp_quote(r#"/a "b"\c"#, "guest_path").unwrap(), r#""/a \"b\"\\c""#);
        assert_eq!(sftp_mkdirs(Path::new("/a/b")).unwrap(), "-mkdir \"/a\"\n-mkdir \"/a/b\"\n");
        // A line break would start a batch line of its own: `!cmd` runs on the host.
        for bad in ["/tmp/a\n!touch /tmp/pwned #/f", "/tmp/a\rb", "/tmp/\u{7f}"] {
            let err = sftp_quote(bad, "local_path").unwrap_err().to_string();
            assert!(err.starts_with("invalid local_path: ") && err.contains("control character"), "{err}");
        }
        assert!(sftp_mkdirs(Path::new("/a\n!x/b")).is_err());
    }
}
