//! The agent over vsock, host side: a `vhost-device-vsock` process serves the guest's vsock
//! device to QEMU (vhost-user). A connection the guest makes to host port P reaches the Unix
//! socket `<uds>_P`, where the supervisor listens from before the VM starts; the agent connects
//! there. Firecracker follows the same convention on its own vsock socket. It needs nothing
//! from the host kernel (no /dev/vhost-vsock), which these machines lack.

use crate::error::{Error, IoContext, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `SMOLVM_VHOST_VSOCK`, else `vhost-device-vsock` on PATH or in cargo's bin directory (where
/// `make prereqs` installs it).
pub fn daemon_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SMOLVM_VHOST_VSOCK").map(PathBuf::from) {
        if !p.is_file() {
            return Err(Error::validation(
                "SMOLVM_VHOST_VSOCK",
                format!("{} is not a file (a vhost-device-vsock binary is expected)", p.display()),
            ));
        }
        return Ok(p);
    }
    let in_cargo_bin = || {
        std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .map(|d| d.join("bin/vhost-device-vsock"))
            .filter(|p| p.is_file())
    };
    crate::image::find_on_path("vhost-device-vsock")
        .or_else(in_cargo_bin)
        .ok_or_else(|| Error::Host("the vsock transport needs vhost-device-vsock (cargo install vhost-device-vsock)".into()))
}

/// Start the vsock device's server for one VM and wait (bounded) until QEMU can connect to it.
/// It dies with the calling thread's process (PDEATHSIG) and when its handle is dropped.
pub async fn spawn_daemon(vhost: &Path, uds: &Path, log: &Path) -> Result<tokio::process::Child> {
    let bin = daemon_binary()?;
    for p in [vhost, uds] {
        let _ = std::fs::remove_file(p);
    }
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).ctx(|| format!("opening {}", log.display()))?;
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("--guest-cid")
        .arg("3")
        .arg("--socket")
        .arg(vhost)
        .arg("--uds-path")
        .arg(uds)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().ctx(|| "dup log".into())?)
        .stderr(out)
        .kill_on_drop(true);
    // SAFETY: prctl(PR_SET_PDEATHSIG) only changes this child's own attributes and is
    // async-signal-safe; nothing of the parent's memory is touched between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| Error::Host(format!("running {}: {e}", bin.display())))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !vhost.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Host(format!("vhost-device-vsock exited at start ({status}); see {}", log.display())));
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill().await;
            return Err(Error::Host("vhost-device-vsock did not listen within 10 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(child)
}

/// Where the host listens for the guest's connections to `port`: `<uds>_<port>`.
pub fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_connections_to_a_port_go_to_the_socket_named_after_it() {
        assert_eq!(port_path(Path::new("/r/vsock.sock"), 1024), PathBuf::from("/r/vsock.sock_1024"));
    }
}
