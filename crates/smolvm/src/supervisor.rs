//! The per-sandbox supervisor: a small process (the `smolvm` binary's hidden `__supervise`
//! command) that owns the VMM child and the agent channel for the sandbox's whole life and
//! serves any number of clients on a 0600 Unix socket. Clients speak the agent protocol to it;
//! it forwards each stream to the agent and handles `Stop`/`Info` itself.
//!
//! The process that starts it passes a [`BootSpec`] on stdin and reads one status line from
//! stdout: `{"ok":true}` once the agent answered and the env is injected, or an error.

use crate::config::Dirs;
use crate::conn::{read_frame, Conn};
use crate::error::{Error, IoContext, Result};
use crate::image::BootImage;
use crate::sandbox::{console_tail, SandboxPaths};
use crate::store::{ProcId, State, Store};
use crate::vmm::{qemu, Accel};
use serde::{Deserialize, Serialize};
use smolvm_proto::{self as proto, ErrorKind, Reply, Request};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootSpec {
    pub image: BootImage,
    pub accel: Accel,
    pub boot_timeout_ms: u64,
    pub verbose_boot: bool,
}

/// The supervisor's one status line.
#[derive(Debug, Serialize, Deserialize)]
pub struct StartStatus {
    pub ok: bool,
    pub code: Option<String>,
    pub message: Option<String>,
    pub console: Option<String>,
}

enum Control {
    Stop { timeout: Duration, done: oneshot::Sender<()> },
    ClientConnected,
    ClientGone,
}

/// Entry point of `smolvm __supervise ID`. Returns the process exit code.
pub fn main(id: &str) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("supervisor: cannot start a runtime: {e}");
            return 1;
        }
    };
    // A single-threaded runtime on the main thread: QEMU's PDEATHSIG follows the thread that
    // spawned it, and this thread lives exactly as long as the supervisor.
    rt.block_on(supervise(id))
}

fn report(status: &StartStatus) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(status).expect("status serializes"));
    let _ = out.flush();
}

/// Replace fd 1 with /dev/null so the starter's pipe closes and later prints go nowhere.
fn detach_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1);
    }
}

async fn supervise(id: &str) -> i32 {
    let dirs = Dirs::from_env();
    let paths = SandboxPaths::new(&dirs, id);
    let spec: BootSpec = match serde_json::from_reader(std::io::stdin().lock()) {
        Ok(s) => s,
        Err(e) => {
            report(&StartStatus {
                ok: false,
                code: Some("host".into()),
                message: Some(format!("supervisor got no boot spec: {e}")),
                console: None,
            });
            return 1;
        }
    };
    let store = match Store::open(&dirs.data) {
        Ok(s) => s,
        Err(e) => {
            report(&StartStatus { ok: false, code: Some("host".into()), message: Some(e.full_message()), console: None });
            return 1;
        }
    };
    let record = match store.get(id) {
        Ok(Some(r)) => r,
        _ => {
            report(&StartStatus {
                ok: false,
                code: Some("not_found".into()),
                message: Some(format!("VM '{id}' not found")),
                console: None,
            });
            return 1;
        }
    };
    paths.remove_sockets();
    let _ = std::fs::write(&paths.console, b"");
    let mut image = spec.image.clone();
    if let Some(base) = &image.rootfs {
        // The sandbox writes to its own overlay: the base image is shared and never changes,
        // and the overlay keeps the sandbox's changes across stop and start.
        match crate::image::overlay(base, &paths.dir.join("rootfs.qcow2")) {
            Ok(overlay) => image.rootfs = Some(overlay),
            Err(e) => {
                let _ = store.set_state(id, State::Error, Some(&e.full_message()));
                report(&StartStatus { ok: false, code: Some(e.code().into()), message: Some(e.full_message()), console: None });
                return 1;
            }
        }
    }
    let launch = qemu::LaunchSpec {
        image,
        vcpus: record.config.vcpu_count,
        memory_mib: record.config.memory,
        accel: spec.accel,
        hostname: id.to_string(),
        extra_boot_args: record.config.boot_args.clone(),
        verbose_boot: spec.verbose_boot,
        agent_socket: paths.agent.clone(),
        qmp_socket: paths.qmp.clone(),
        console_log: paths.console.clone(),
    };
    let booted = boot(&launch, &record.config.env_vars, Duration::from_millis(spec.boot_timeout_ms), &paths).await;
    let (mut child, agent) = match booted {
        Ok(v) => v,
        Err(e) => {
            paths.remove_sockets();
            let console = console_tail(&paths.console, 30);
            let reason = e.full_message();
            let _ = store.set_state(id, State::Error, Some(&reason));
            report(&StartStatus { ok: false, code: Some(e.code().into()), message: Some(reason), console: Some(console) });
            return 1;
        }
    };
    let ctl = match UnixListener::bind(&paths.ctl) {
        Ok(l) => l,
        Err(e) => {
            let _ = child.kill().await;
            paths.remove_sockets();
            let _ = store.set_state(id, State::Error, Some("cannot bind the control socket"));
            report(&StartStatus {
                ok: false,
                code: Some("host".into()),
                message: Some(format!("binding {}: {e}", paths.ctl.display())),
                console: None,
            });
            return 1;
        }
    };
    let _ = std::fs::set_permissions(&paths.ctl, std::fs::Permissions::from_mode(0o600));
    let me = ProcId::of(std::process::id() as i32);
    let vmm = child.id().and_then(|p| ProcId::of(p as i32));
    if let (Some(me), Some(vmm)) = (me, vmm) {
        let _ = store.set_running(id, me, vmm);
    }
    report(&StartStatus { ok: true, code: None, message: None, console: None });
    detach_stdout();

    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Control>();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut clients = 0usize;
    let mut stop_waiter: Option<oneshot::Sender<()>> = None;
    let mut stop_timeout = Duration::from_secs(3);
    let exited_by_itself = loop {
        tokio::select! {
            accepted = ctl.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve_client(stream, agent.clone(), ctl_tx.clone(), id.to_string()));
                }
            }
            status = child.wait() => {
                tracing::warn!("VMM exited: {status:?}");
                break true;
            }
            msg = ctl_rx.recv() => match msg {
                Some(Control::Stop { timeout, done }) => {
                    stop_timeout = timeout;
                    stop_waiter = Some(done);
                    break false;
                }
                Some(Control::ClientConnected) => clients += 1,
                Some(Control::ClientGone) => {
                    clients = clients.saturating_sub(1);
                    // An ephemeral sandbox lives as long as its owner's connection.
                    if record.ephemeral && clients == 0 {
                        break false;
                    }
                }
                None => {}
            },
            _ = async { match sigterm.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => break false,
        }
    };
    if exited_by_itself {
        let tail = console_tail(&paths.console, 30);
        let msg = format!("the VM exited unexpectedly; last console lines:\n{tail}");
        paths.remove_sockets();
        if record.ephemeral {
            let _ = store.remove(id);
            paths.remove_all();
        } else {
            let _ = store.set_state(id, State::Error, Some(&msg));
        }
        return 1;
    }
    // Without a disk there is nothing to flush: the VM can go at once.
    let graceful = spec.image.rootfs.is_some();
    shutdown(&mut child, &agent, &paths, stop_timeout, graceful).await;
    paths.remove_sockets();
    if record.ephemeral {
        let _ = store.remove(id);
        paths.remove_all();
    } else {
        let _ = store.set_state(id, State::Stopped, None);
    }
    if let Some(done) = stop_waiter {
        let _ = done.send(());
        // Let the client task write its reply before the process ends.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    0
}

async fn boot(
    launch: &qemu::LaunchSpec,
    env: &std::collections::BTreeMap<String, String>,
    timeout: Duration,
    paths: &SandboxPaths,
) -> Result<(tokio::process::Child, Arc<Conn>)> {
    let listener = UnixListener::bind(&launch.agent_socket).ctx(|| format!("binding {}", launch.agent_socket.display()))?;
    let mut child = qemu::spawn(launch, &paths.log)?;
    let started = Instant::now();
    let handshake = async {
        let (stream, _) = listener.accept().await.ctx(|| "accepting the agent channel".into())?;
        let agent = Conn::new(stream);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        match agent.call(&Request::Hello { version: proto::PROTOCOL_VERSION, unix_time_ns: now }).await? {
            Reply::Hello { version, .. } if version == proto::PROTOCOL_VERSION => {}
            Reply::Hello { version, agent_version, .. } => {
                return Err(Error::Guest(format!(
                    "agent {agent_version} speaks protocol {version}, this host speaks {}",
                    proto::PROTOCOL_VERSION
                )))
            }
            other => return Err(Error::Guest(format!("unexpected reply to hello: {other:?}"))),
        }
        tracing::info!("agent answered after {:?}", started.elapsed());
        if !env.is_empty() {
            match agent.call(&Request::EnvSet { vars: env.clone(), merge: false }).await? {
                Reply::EnvNames(_) => {}
                Reply::Error { message, .. } => return Err(Error::Guest(format!("injecting environment variables: {message}"))),
                other => return Err(Error::Guest(format!("unexpected reply to env set: {other:?}"))),
            }
        }
        Ok::<_, Error>(agent)
    };
    let result = tokio::select! {
        r = tokio::time::timeout(timeout, handshake) => match r {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout { operation: "boot".into(), seconds: timeout.as_secs_f64() }),
        },
        status = child.wait() => Err(Error::Host(format!("the VMM exited during boot ({})", status.map(|s| s.to_string()).unwrap_or_default()))),
    };
    drop(listener);
    let _ = std::fs::remove_file(&launch.agent_socket);
    match result {
        Ok(agent) => Ok((child, agent)),
        Err(e) => {
            let _ = child.kill().await;
            Err(e)
        }
    }
}

/// Graceful first (the agent syncs disks and resets the VM), then QMP `quit`, then SIGKILL.
async fn shutdown(child: &mut tokio::process::Child, agent: &Arc<Conn>, paths: &SandboxPaths, timeout: Duration, graceful: bool) {
    if !graceful {
        let _ = child.kill().await;
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), agent.call(&Request::Shutdown)).await;
    if tokio::time::timeout(timeout, child.wait()).await.is_ok() {
        return;
    }
    if let Ok(Ok(mut qmp)) = tokio::time::timeout(Duration::from_secs(1), qemu::Qmp::connect(&paths.qmp)).await {
        let _ = tokio::time::timeout(Duration::from_secs(1), qmp.execute("quit")).await;
        if tokio::time::timeout(Duration::from_secs(1), child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

async fn serve_client(stream: UnixStream, agent: Arc<Conn>, ctl: mpsc::UnboundedSender<Control>, id: String) {
    let _ = ctl.send(Control::ClientConnected);
    let (read, write) = stream.into_split();
    let write = Arc::new(tokio::sync::Mutex::new(write));
    let open: Arc<Mutex<HashMap<u32, u32>>> = Default::default();
    let mut reader = tokio::io::BufReader::new(read);
    let mut body = Vec::new();
    let send = |w: Arc<tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>>, cid: u32, reply: Reply| async move {
        if let Ok(bytes) = proto::encode(cid, &reply) {
            let _ = w.lock().await.write_all(&bytes).await;
        }
    };
    while let Ok(Some(())) = read_frame(&mut reader, &mut body).await {
        let Ok((cid, req)) = proto::decode::<Request>(&body) else { break };
        match req {
            Request::Stop { timeout_ms } => {
                let (done, wait) = oneshot::channel();
                let _ = ctl.send(Control::Stop { timeout: Duration::from_millis(timeout_ms.max(100)), done });
                let _ = wait.await;
                send(write.clone(), cid, Reply::Ok).await;
            }
            Request::Info => {
                let info = serde_json::json!({ "id": id, "pid": std::process::id(), "protocol": proto::PROTOCOL_VERSION });
                send(write.clone(), cid, Reply::Info(info.to_string())).await;
            }
            Request::Stdin(_) | Request::StdinClose | Request::Cancel => {
                let aid = open.lock().unwrap_or_else(|e| e.into_inner()).get(&cid).copied();
                if let Some(aid) = aid {
                    let _ = agent.send_on(aid, &req).await;
                }
            }
            Request::Hello { .. } => {
                send(
                    write.clone(),
                    cid,
                    Reply::Hello {
                        version: proto::PROTOCOL_VERSION,
                        agent_version: env!("CARGO_PKG_VERSION").into(),
                        capabilities: vec![],
                    },
                )
                .await;
            }
            req => match agent.open(&req).await {
                Ok(mut s) => {
                    open.lock().unwrap_or_else(|e| e.into_inner()).insert(cid, s.id);
                    let (w, open) = (write.clone(), open.clone());
                    tokio::spawn(async move {
                        loop {
                            match s.recv().await {
                                Some(reply) => {
                                    let terminal = reply.is_terminal();
                                    send(w.clone(), cid, reply).await;
                                    if terminal {
                                        break;
                                    }
                                }
                                None => {
                                    send(w.clone(), cid, Reply::error(ErrorKind::Closed, "the sandbox's agent went away")).await;
                                    break;
                                }
                            }
                        }
                        open.lock().unwrap_or_else(|e| e.into_inner()).remove(&cid);
                    });
                }
                Err(e) => send(write.clone(), cid, Reply::error(ErrorKind::Closed, e.full_message())).await,
            },
        }
    }
    // The client is gone: nobody will read the output of what it started.
    let left: Vec<u32> = open.lock().unwrap_or_else(|e| e.into_inner()).values().copied().collect();
    for aid in left {
        let _ = agent.send_on(aid, &Request::Cancel).await;
    }
    let _ = ctl.send(Control::ClientGone);
}
