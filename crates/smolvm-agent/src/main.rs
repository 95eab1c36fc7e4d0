//! The smolvm guest agent.
//!
//! As `/init` of a minimal image it is PID 1: it mounts the pseudo filesystems, optionally
//! switches into a root disk, reaps orphans and powers the VM off. In every image it serves the
//! host over the agent channel (see `smolvm-proto`). It is a plain blocking program with a few
//! threads: it must start in milliseconds and stay small, and a guest has no use for an async
//! runtime's machinery.

mod cgroup;
mod envfile;
mod exec;
mod files;
mod flow;
mod init;
mod net;
mod pending;
mod reaper;
mod server;
mod spawn;
mod workers;

use std::time::{Duration, Instant};

/// Each command in flight holds a few descriptors in this one process (its pipes, its pidfd):
/// the kernel's default of 1024 ran out at about 170 commands at once ("No file descriptors
/// available"). The agent and the commands it starts get 65536, as container runtimes give.
fn raise_fd_limit() {
    use nix::sys::resource::{setrlimit, Resource};
    if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, 65536, 65536) {
        log(&format!("raising the open-file limit: {e}"));
    }
}

fn main() {
    let started = Instant::now();
    let pid1 = std::process::id() == 1;
    // The benchmark's reference boot: this same image, with an init that powers off at once.
    // (The kernel hands unknown `key=value` boot parameters to init as its environment.)
    if pid1 && std::env::var_os("smolvm_poweroff").is_some() {
        init::power_off();
    }
    // Signals are taken synchronously by the reaper thread; block them before any thread
    // exists so that every thread inherits the mask.
    reaper::block_signals();
    if pid1 {
        raise_fd_limit();
    }
    // The host says on the kernel command line when it reaches the agent over vsock.
    let vsock = std::env::var_os("smolvm_channel").is_some_and(|c| c == "vsock");
    // PID 1 starts the set-up thread (the NIC, which commands wait for) before anything else.
    let cmdline = if pid1 { init::start() } else { init::Cmdline::read() };
    // The channel opens as early as its device node exists: the host's greeting then travels
    // while the rest of the set-up runs, and waits in the channel.
    let early = if pid1 && !vsock { init::mount_dev().ok().and_then(|_| server::try_open_channel()) } else { None };
    if pid1 {
        if let Err(e) = init::setup(&cmdline) {
            log(&format!("init failed: {e}"));
            // Serving from the initramfs instead of the asked-for root disk would run the
            // user's commands in the wrong filesystem: fail the boot (the host shows this log).
            if cmdline.get("smolvm_root").is_some() {
                init::power_off();
            }
        }
    }
    reaper::start(pid1);
    let vsock = vsock || cmdline.get("smolvm_channel").as_deref() == Some("vsock");
    let opened = if vsock {
        Ok(server::Channel::Vsock)
    } else {
        early.map(Ok).unwrap_or_else(|| server::open_channel(Duration::from_secs(10))).map(server::Channel::Serial)
    };
    let channel = match opened {
        Ok(c) => c,
        Err(e) => {
            log(&format!("no agent channel: {e}"));
            if pid1 {
                init::power_off();
            }
            std::process::exit(1);
        }
    };
    if cmdline.flag("smolvm_debug") {
        log(&format!("ready after {:?}", started.elapsed()));
    }
    server::serve(channel, pid1);
}

/// Messages go to the console (the host keeps it as the sandbox log). Never pass a value that
/// came from the host's env requests: those may be secrets.
pub fn log(msg: &str) {
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    // The console device only, opened without waiting: a FIFO that root in the guest put there
    // would hold the thread that logs. Written to blocking (a line cut short by a busy serial
    // port could be the power-off mark the host looks for).
    let console = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open("/dev/console")
        .ok()
        .filter(|f| f.metadata().is_ok_and(|m| m.file_type().is_char_device()))
        .filter(|f| {
            nix::fcntl::fcntl(std::os::fd::AsRawFd::as_raw_fd(f), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty())).is_ok()
        });
    if let Some(mut f) = console {
        let _ = writeln!(f, "smolvm-agent: {msg}");
    } else {
        eprintln!("smolvm-agent: {msg}");
    }
}
