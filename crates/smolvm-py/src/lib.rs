//! `smolvm._native`: the host library for Python. Thin by design: every behaviour is the Rust
//! library's; this maps types, releases the GIL while blocking, and turns errors into one
//! exception (`NativeError(code, message, details_json)`) that `smolvm.exceptions` maps onto the
//! documented classes.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use smolvm::sandbox::RunOptions;
use smolvm::{Dirs, Error, Sandbox, Shell, VmConfig};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::RwLock;

create_exception!(_native, NativeError, PyException);

/// One current-thread runtime, driven by whichever Python thread is inside a call (others wait
/// on their own futures meanwhile). Replies are then routed on the caller's own thread: with a
/// worker thread, every reply crossed threads on its way back, a tenth of a millisecond a call.
///
/// A forked child gets a runtime of its own: the parent's, copied, has blocking-pool threads on
/// its books that the child does not have (a transfer's file work waited on them for ever) and
/// an epoll set it shares with the parent. The parent's is left alone there, never dropped.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::Mutex<Option<(u32, &'static tokio::runtime::Runtime)>> = std::sync::Mutex::new(None);
    let pid = std::process::id();
    let mut rt = RT.lock().unwrap_or_else(|e| e.into_inner());
    match *rt {
        Some((made_in, r)) if made_in == pid => r,
        _ => {
            let r: &'static _ =
                Box::leak(Box::new(tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")));
            *rt = Some((pid, r));
            r
        }
    }
}

fn to_py(e: Error) -> PyErr {
    to_py_with(e, "env_vars")
}

/// As [`to_py`], naming `env_field` as the field of a bad variable name: the parameter the
/// caller gave it in (a config's or `set_env_vars`' `env_vars`, `run`'s `env`, `unset_env_vars`'
/// `keys`).
fn to_py_with(e: Error, env_field: &str) -> PyErr {
    let details = match &e {
        Error::Timeout { operation, seconds } => serde_json::json!({ "operation": operation, "timeout_seconds": seconds }),
        Error::Validation { field, .. } => serde_json::json!({ "field": field }),
        Error::Env(_) => serde_json::json!({ "field": env_field }),
        Error::Boot { console, .. } => serde_json::json!({ "console": console }),
        Error::Reported { .. } => serde_json::json!({}),
        Error::NotRunning { state, .. } => serde_json::json!({ "state": state }),
        Error::OutputLimit { stream, limit } => {
            serde_json::json!({ "code": e.code(), "stream": stream, "max_output": limit, "recovery": e.recovery() })
        }
        _ => serde_json::json!({}),
    };
    // A boot that ran out of time is a timeout to Python users (OperationTimeoutError).
    if let Error::Boot { reason, console, .. } = &e {
        if let Some(secs) =
            reason.strip_prefix("Operation 'boot' timed out after ").and_then(|r| r.trim_end_matches('s').parse::<f64>().ok())
        {
            let details = serde_json::json!({ "operation": "boot", "timeout_seconds": secs, "console": console });
            return NativeError::new_err(("timeout", e.to_string(), details.to_string()));
        }
    }
    let message = match &e {
        // Said with the method that helps, not the CLI's command.
        Error::NotRunning { id, state } => smolvm::error::not_running(id, state, |verb| format!("vm.{verb}()")),
        // The documented messages stand alone; others carry their chain of causes.
        Error::Env(_) | Error::Timeout { .. } | Error::NotFound(_) => e.to_string(),
        _ => e.full_message(),
    };
    NativeError::new_err((e.code(), message, details.to_string()))
}

/// Run a future on the shared runtime with the GIL released, checking for Ctrl-C between
/// short waits so that KeyboardInterrupt arrives promptly. An interrupted future is dropped,
/// which cancels its request in the guest.
fn block<T: Send + 'static>(py: Python<'_>, fut: impl Future<Output = Result<T, Error>> + Send + 'static) -> PyResult<T> {
    block_with(py, "env_vars", fut)
}

/// As [`block`], with a bad variable name's field named as [`to_py_with`] says.
fn block_with<T: Send + 'static>(
    py: Python<'_>,
    env_field: &'static str,
    fut: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> PyResult<T> {
    let rt = runtime();
    // Polled on this thread (not handed to a worker and waited for: that hop cost a tenth of a
    // millisecond per call), in slices, so that Ctrl-C is noticed between them.
    let mut fut = Box::pin(fut);
    loop {
        let waited = py.allow_threads(|| rt.block_on(async { tokio::time::timeout(Duration::from_millis(50), &mut fut).await }));
        match waited {
            Ok(result) => return result.map_err(|e| to_py_with(e, env_field)),
            Err(_) => {
                if let Err(interrupt) = py.check_signals() {
                    // Dropped inside the runtime, the future's open requests send their cancel
                    // (a command is killed in the guest); a moment of driving lets it go out.
                    // Without the GIL: what it leaves to undo may take a while (a half-made
                    // snapshot's files, an SFTP upload's temporary file).
                    py.allow_threads(|| {
                        let _inside = rt.enter();
                        drop(fut);
                    });
                    py.allow_threads(|| rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await }));
                    return Err(interrupt);
                }
            }
        }
    }
}

/// A VMConfig from the Python side's JSON. A value of the wrong type or size that the Python
/// side let through is named by its field (``invalid disk_size_mib: invalid type: …``), as
/// other bad input is.
fn parse_config(json: &str) -> PyResult<VmConfig> {
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(json)).map_err(|e| {
        let path = e.path().to_string();
        // The field is the path's first step (`port_forwards[0].guest`: port_forwards).
        let field = path.split(['.', '[']).next().filter(|f| !f.is_empty() && *f != "?").unwrap_or("VMConfig").to_string();
        let inner = e.into_inner().to_string();
        // (The JSON's position means nothing to the caller, who wrote no JSON.)
        let why = inner.rfind(" at line ").map_or(inner.as_str(), |i| &inner[..i]);
        let details = serde_json::json!({ "field": field }).to_string();
        NativeError::new_err(("validation", format!("invalid {field}: {why}"), details))
    })
}

/// Registered with `atexit`: a snapshot given up by Ctrl-C while its files were being put in
/// place finishes removing them before the interpreter ends (which would kill it half way).
#[pyfunction]
fn wait_for_given_up(py: Python<'_>) {
    py.allow_threads(|| smolvm::snapshot_files::wait_for_given_up(Duration::from_secs(30)));
}

#[pyfunction]
fn validate_env_key(key: &str) -> PyResult<()> {
    smolvm::validate_env_key(key).map_err(|e| to_py_with(e.into(), "key"))
}

/// A whole-number field's range check before the value meets the config's 32-bit fields. The
/// value comes as Python wrote it: its ints have no bound.
#[pyfunction]
fn check_whole(field: &str, value: &str) -> PyResult<()> {
    match value.parse::<i128>() {
        Ok(v) => smolvm::config::check_whole(field, v),
        Err(_) => Err(smolvm::config::out_of_range(field, &value)),
    }
    .map_err(to_py)
}

#[pyfunction]
fn validate_config(config_json: &str) -> PyResult<()> {
    parse_config(config_json)?.validate().map_err(to_py)
}

/// Build (or find cached) the default kernel and initramfs, and the ext4 root disk if asked.
#[pyfunction]
#[pyo3(signature = (rootfs=false))]
fn build_image(py: Python<'_>, rootfs: bool) -> PyResult<(String, Option<String>, Option<String>)> {
    block(py, async move {
        tokio::task::spawn_blocking(move || {
            let dirs = Dirs::from_env();
            let img = smolvm::image::resolve(&VmConfig::default(), &dirs, &|line: &str| eprintln!("smolvm: {line}"))?;
            let disk = if rootfs { Some(smolvm::image::default_rootfs(&dirs)?) } else { None };
            let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
            Ok((s(&img.kernel), img.initrd.as_deref().map(s), disk.as_deref().map(s)))
        })
        .await
        .map_err(|e| Error::Host(e.to_string()))?
    })
}

/// Build (or find cached) a named image's root disk: a built-in name, a saved recipe, or a new
/// recipe given as JSON. Returns (kernel, rootfs, cached).
#[pyfunction]
#[pyo3(signature = (name, recipe_json=None))]
fn build_named_image(py: Python<'_>, name: String, recipe_json: Option<String>) -> PyResult<(String, String, bool)> {
    block(py, async move {
        tokio::task::spawn_blocking(move || {
            let dirs = Dirs::from_env();
            let progress = |line: &str| eprintln!("smolvm: {line}");
            let img = smolvm::image::resolve(&VmConfig::default(), &dirs, &progress)?;
            let built = match recipe_json {
                Some(j) => {
                    let recipe = serde_json::from_str(&j).map_err(|e| Error::validation("recipe", e.to_string()))?;
                    smolvm::recipe::build(&dirs, &recipe, &progress)?
                }
                None => smolvm::recipe::build_named(&dirs, &name, &progress)?,
            };
            Ok((img.kernel.to_string_lossy().into_owned(), built.rootfs.to_string_lossy().into_owned(), built.cached))
        })
        .await
        .map_err(|e| Error::Host(e.to_string()))?
    })
}

/// Sandboxes as JSON (env keys only, never values).
/// (Without the GIL, as all that follows: listing reaps what dead processes left, disks
/// included, and the state database may make it wait.)
#[pyfunction]
fn list_sandboxes(py: Python<'_>) -> PyResult<String> {
    py.allow_threads(|| {
        let dirs = Dirs::from_env();
        let recs = smolvm::sandbox::list(&dirs)?;
        let v = smolvm::sandbox::records_json(&dirs, &recs)?;
        Ok(serde_json::Value::Array(v).to_string())
    })
    .map_err(to_py)
}

/// One sandbox. Commands share it (read lock); lifecycle changes take it alone.
#[pyclass(module = "smolvm._native")]
struct Vm {
    id: String,
    inner: Shared,
    /// The process that made the handle. A forked child shares its sockets and, with them,
    /// the parent's registrations in the runtime's epoll set: dropping the handle there would
    /// take the parent's connection with it. The child leaves it alone (see `Drop`) and opens
    /// the sandbox again for itself (`inner`), on its own runtime.
    pid: u32,
    /// A forked child's own handle to the sandbox, and the child it belongs to.
    forked: std::sync::Mutex<Option<(u32, Shared)>>,
}

type Shared = Arc<RwLock<Option<Sandbox>>>;

impl Drop for Vm {
    fn drop(&mut self) {
        let pid = std::process::id();
        if pid != self.pid {
            // A forked child's copy: forgotten, not closed (the parent's connection lives on).
            std::mem::forget(std::mem::replace(&mut self.inner, Arc::new(RwLock::new(None))));
        }
        // (Another process's own, made before a second fork, likewise.)
        let forked = self.forked.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if forked.as_ref().is_some_and(|(p, _)| *p != pid) {
            std::mem::forget(forked);
        }
    }
}

/// Stop the sandbox through a connection of its own. Commands in flight on a handle hold it
/// (shared) until they end, so stop and delete, which need it alone, would wait for the
/// longest of them; stopping the VM is what ends them.
async fn stop_beside(id: &str, timeout: Duration) {
    if let Ok(mut other) = Sandbox::open_in(Dirs::from_env(), id).await {
        let _ = other.stop(timeout).await;
    }
}

impl Vm {
    fn wrap(sb: Sandbox) -> Vm {
        Vm { id: sb.id().to_string(), inner: Arc::new(RwLock::new(Some(sb))), pid: std::process::id(), forked: Default::default() }
    }

    /// The sandbox as this process reaches it: in a forked child, through a handle of its own,
    /// opened on first use. One that cannot be opened says why, and the next use tries again.
    fn inner(&self, py: Python<'_>) -> PyResult<Shared> {
        let pid = std::process::id();
        if pid == self.pid {
            return Ok(self.inner.clone());
        }
        let mine = |forked: &Option<(u32, Shared)>| forked.as_ref().filter(|(p, _)| *p == pid).map(|(_, shared)| shared.clone());
        if let Some(shared) = mine(&self.forked.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(shared);
        }
        // (Not under the lock: the open lets go of the GIL, which another thread waiting for
        // the lock would hold.)
        let id = self.id.clone();
        let opened = block(py, async move { Sandbox::open_in(Dirs::from_env(), &id).await })?;
        let mut forked = self.forked.lock().unwrap_or_else(|e| e.into_inner());
        // Another thread of this process opened it meanwhile: theirs.
        if let Some(shared) = mine(&forked) {
            return Ok(shared);
        }
        let shared: Shared = Arc::new(RwLock::new(Some(opened)));
        // A grandchild's copy of its parent's own: forgotten, as the first parent's is.
        std::mem::forget(forked.replace((pid, shared.clone())));
        Ok(shared)
    }
}

/// A handle without its sandbox: closed by `close()`, after which the sandbox may well run on
/// (an operation on a closed object is a ValueError in Python, as for a closed file), or the
/// sandbox is deleted.
fn gone(id: &str) -> Error {
    let recorded = smolvm::store::Store::open(&Dirs::from_env().data).and_then(|s| s.get(id)).is_ok_and(|r| r.is_some());
    if recorded {
        return Error::validation(
            "handle",
            format!("this handle to VM '{id}' is closed; the sandbox runs on, and SmolVM.from_id('{id}') opens it again"),
        );
    }
    Error::NotFound(id.to_string())
}

#[pymethods]
impl Vm {
    /// Record a sandbox. `ephemeral`: it dies with this process.
    #[staticmethod]
    fn create(py: Python<'_>, config_json: &str, ephemeral: bool) -> PyResult<Vm> {
        let config = parse_config(config_json)?;
        py.allow_threads(|| Sandbox::create_in(Dirs::from_env(), config, ephemeral)).map(Vm::wrap).map_err(to_py)
    }

    #[staticmethod]
    fn open(py: Python<'_>, id: String) -> PyResult<Vm> {
        block(py, async move { Sandbox::open_in(Dirs::from_env(), &id).await }).map(Vm::wrap)
    }

    /// Start a new sandbox from a snapshot.
    #[staticmethod]
    #[pyo3(signature = (snapshot_id, name=None, env_vars=None, resume=true, boot_timeout=30.0, mounts=None, writable_mounts=None, port_forwards=None))]
    #[allow(clippy::too_many_arguments)]
    fn from_snapshot(
        py: Python<'_>,
        snapshot_id: String,
        name: Option<String>,
        env_vars: Option<BTreeMap<String, String>>,
        resume: bool,
        boot_timeout: f64,
        mounts: Option<Vec<(std::path::PathBuf, Option<String>)>>,
        writable_mounts: Option<bool>,
        port_forwards: Option<Vec<(u16, Option<u16>)>>,
    ) -> PyResult<Vm> {
        let boot_timeout = smolvm::config::seconds(boot_timeout, "boot_timeout").map_err(to_py)?;
        let mounts = mounts.map(|m| m.into_iter().map(|(host, guest)| smolvm::config::Mount { host, guest }).collect());
        let port_forwards = port_forwards.map(|p| p.into_iter().map(|(guest, host)| smolvm::config::PortForward { guest, host }).collect());
        let opts = smolvm::sandbox::RestoreOptions { name, env_vars, resume, boot_timeout, mounts, writable_mounts, port_forwards };
        // Ctrl-C drops the restore, whose boot goes on in its supervisor: the sandbox it made
        // goes before the exception reaches the caller, as for an interrupted start.
        let made: Arc<std::sync::Mutex<Option<String>>> = Default::default();
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (m, f) = (made.clone(), finished.clone());
        let restored = block(py, async move {
            let report = move |id: &str| *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.to_string());
            let r = Sandbox::from_snapshot_reporting(Dirs::from_env(), &snapshot_id, opts, &report).await;
            f.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        });
        if restored.is_err() && !finished.load(std::sync::atomic::Ordering::SeqCst) {
            if let Some(id) = made.lock().unwrap_or_else(|e| e.into_inner()).take() {
                py.allow_threads(|| {
                    runtime().block_on(async {
                        if let Ok(sb) = Sandbox::open_in(Dirs::from_env(), &id).await {
                            let _ = sb.delete().await;
                        }
                    })
                });
            }
        }
        restored.map(Vm::wrap)
    }

    #[getter]
    fn id(&self) -> &str {
        &self.id
    }

    fn start(&self, py: Python<'_>, boot_timeout: f64) -> PyResult<()> {
        let inner = self.inner(py)?;
        let id = self.id.clone();
        block(py, async move {
            let timeout = smolvm::config::seconds(boot_timeout, "boot_timeout")?;
            // Up already: said beside the commands in flight, not after them (they hold the
            // handle shared; a start takes it alone). A bad setting is said either way, as
            // `start` says it.
            if inner.read().await.as_ref().is_some_and(|sb| sb.is_up()) {
                smolvm::config::check_boot_timeout(timeout)?;
                return smolvm::config::check_supervisor_settings();
            }
            let mut guard = inner.write().await;
            let sb = guard.as_mut().ok_or_else(|| gone(&id))?;
            sb.start(timeout, &|line: &str| eprintln!("smolvm: {line}")).await
        })
    }

    #[pyo3(signature = (command, timeout, shell, stdin=None, env=None, max_output=smolvm::sandbox::DEFAULT_MAX_OUTPUT, cwd=None))]
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        py: Python<'_>,
        command: String,
        timeout: f64,
        shell: &str,
        stdin: Option<Vec<u8>>,
        env: Option<BTreeMap<String, String>>,
        max_output: usize,
        cwd: Option<String>,
    ) -> PyResult<(i32, String, String)> {
        let shell = match shell {
            "login" => Shell::Login,
            "raw" => Shell::Raw,
            other => return Err(to_py(Error::validation("shell", format!("{other:?} is not a shell (allowed: login, raw)")))),
        };
        // (The Python layer has refused less than a second.)
        let timeout = smolvm::config::seconds(timeout, "timeout").map_err(to_py)?;
        let opts = RunOptions { timeout, shell, env: env.unwrap_or_default(), cwd, stdin, discard_output: false, max_output };
        let inner = self.inner(py)?;
        let id = self.id.clone();
        block_with(py, "env", async move {
            let guard = inner.read().await;
            let sb = guard.as_ref().ok_or_else(|| gone(&id))?;
            let r = sb.run(&command, &opts).await?;
            Ok((r.exit_code, r.stdout, r.stderr))
        })
    }

    fn upload(&self, py: Python<'_>, local: std::path::PathBuf, guest: String) -> PyResult<()> {
        let (inner, id) = (self.inner(py)?, self.id.clone());
        block(py, async move { inner.read().await.as_ref().ok_or_else(|| gone(&id))?.upload(&local, &guest).await })
    }

    fn download(&self, py: Python<'_>, guest: String, local: std::path::PathBuf) -> PyResult<()> {
        let (inner, id) = (self.inner(py)?, self.id.clone());
        block(py, async move { inner.read().await.as_ref().ok_or_else(|| gone(&id))?.download(&guest, &local).await })
    }

    #[pyo3(signature = (guest_port, host_port=None))]
    fn expose_local(&self, py: Python<'_>, guest_port: u16, host_port: Option<u16>) -> PyResult<u16> {
        let (inner, id) = (self.inner(py)?, self.id.clone());
        block(py, async move { inner.read().await.as_ref().ok_or_else(|| gone(&id))?.expose_local(guest_port, host_port).await })
    }

    fn unexpose_local(&self, py: Python<'_>, guest_port: u16) -> PyResult<()> {
        let (inner, id) = (self.inner(py)?, self.id.clone());
        block(py, async move { inner.read().await.as_ref().ok_or_else(|| gone(&id))?.unexpose_local(guest_port).await })
    }

    fn pause(&self, py: Python<'_>) -> PyResult<()> {
        let (inner, id) = (self.inner(py)?, self.id.clone());
        block(py, async move { inner.read().await.as_ref().ok_or_else(|| gone(&id))?.pause().await })
    }

    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        let (inner, id) = (self.inner(py)?, self.id.clone());
        block(py, async move { inner.read().await.as_ref().ok_or_else(|| gone(&id))?.resume().await })
    }

    /// Returns (snapshot_id, vm_id, snapshot_type, path).
    #[pyo3(signature = (snapshot_id=None, snapshot_type="full".to_string()))]
    fn snapshot(&self, py: Python<'_>, snapshot_id: Option<String>, snapshot_type: String) -> PyResult<(String, String, String, String)> {
        let (inner, id) = (self.inner(py)?, self.id.clone());
        block(py, async move {
            let guard = inner.read().await;
            let info = guard.as_ref().ok_or_else(|| gone(&id))?.snapshot(snapshot_id.as_deref(), &snapshot_type).await?;
            Ok((info.snapshot_id, info.vm_id, info.snapshot_type, info.path.to_string_lossy().into_owned()))
        })
    }

    fn stop(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let inner = self.inner(py)?;
        let id = self.id.clone();
        block(py, async move {
            let timeout = smolvm::config::seconds(timeout.max(0.1), "timeout")?;
            stop_beside(&id, timeout).await;
            let mut guard = inner.write().await;
            let sb = guard.as_mut().ok_or_else(|| gone(&id))?;
            sb.stop(timeout).await
        })
    }

    fn delete(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner(py)?;
        let own = self.id.clone();
        block(py, async move {
            // A closed handle deletes nothing (and stops nothing): as any call on it, an error.
            // One whose sandbox is gone already has nothing left to do.
            if inner.read().await.is_none() {
                return match gone(&own) {
                    Error::NotFound(_) => Ok(()),
                    closed => Err(closed),
                };
            }
            stop_beside(&own, smolvm::sandbox::DEFAULT_STOP_TIMEOUT).await;
            let sb = inner.write().await.take();
            let Some(sb) = sb else { return Ok(()) };
            let id = sb.id().to_string();
            match sb.delete().await {
                Ok(()) => Ok(()),
                Err(e) => {
                    // Still there: the handle keeps it, so that a second delete tries again
                    // instead of reporting a sandbox gone that still runs.
                    if let Ok(again) = Sandbox::open_in(Dirs::from_env(), &id).await {
                        *inner.write().await = Some(again);
                    }
                    Err(e)
                }
            }
        })
    }

    /// Forget the connection without stopping the sandbox. (In a forked child, the child's
    /// own: the parent's lives on.)
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        // (A forked child's handle to a sandbox it cannot open has nothing to close.)
        let Ok(inner) = self.inner(py) else { return Ok(()) };
        block(py, async move {
            inner.write().await.take();
            Ok(())
        })
    }

    fn state(&self, py: Python<'_>) -> PyResult<String> {
        let inner = self.inner(py)?;
        let id = self.id.clone();
        block(py, async move {
            let guard = inner.read().await;
            match guard.as_ref() {
                Some(sb) => Ok(sb.state()?.to_string()),
                None => Err(gone(&id)),
            }
        })
    }

    fn info(&self, py: Python<'_>) -> PyResult<String> {
        let inner = self.inner(py)?;
        let id = self.id.clone();
        block(py, async move {
            let guard = inner.read().await;
            Ok(guard.as_ref().ok_or_else(|| gone(&id))?.info().await?.to_string())
        })
    }

    fn wait_for_ssh(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let (inner, id) = (self.inner(py)?, self.id.clone());
        block(py, async move {
            let timeout = smolvm::config::seconds(timeout, "timeout")?;
            let guard = inner.read().await;
            guard.as_ref().ok_or_else(|| gone(&id))?.wait_for_ssh(timeout).await
        })
    }

    fn wait_for_ready(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let (inner, id) = (self.inner(py)?, self.id.clone());
        block(py, async move {
            let timeout = smolvm::config::seconds(timeout, "timeout")?;
            let guard = inner.read().await;
            guard.as_ref().ok_or_else(|| gone(&id))?.wait_for_ready(timeout).await
        })
    }

    fn wait_for_ports(&self, py: Python<'_>, ports: Vec<u16>, timeout: f64) -> PyResult<()> {
        let (inner, id) = (self.inner(py)?, self.id.clone());
        block(py, async move {
            let timeout = smolvm::config::seconds(timeout, "timeout")?;
            let guard = inner.read().await;
            guard.as_ref().ok_or_else(|| gone(&id))?.wait_for_ports(&ports, timeout).await
        })
    }

    fn can_run_commands(&self, py: Python<'_>) -> PyResult<bool> {
        let inner = self.inner(py)?;
        block(py, async move {
            let guard = inner.read().await;
            Ok(match guard.as_ref() {
                Some(sb) => sb.can_run_commands().await,
                None => false,
            })
        })
    }

    fn set_env_vars(&self, py: Python<'_>, vars: BTreeMap<String, String>, merge: bool) -> PyResult<Vec<String>> {
        let inner = self.inner(py)?;
        let id = self.id.clone();
        block(py, async move {
            let guard = inner.read().await;
            guard.as_ref().ok_or_else(|| gone(&id))?.set_env_vars(&vars, merge).await
        })
    }

    fn unset_env_vars(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<BTreeMap<String, String>> {
        let inner = self.inner(py)?;
        let id = self.id.clone();
        block_with(py, "keys", async move {
            let guard = inner.read().await;
            guard.as_ref().ok_or_else(|| gone(&id))?.unset_env_vars(&keys).await
        })
    }

    fn list_env_vars(&self, py: Python<'_>) -> PyResult<BTreeMap<String, String>> {
        let inner = self.inner(py)?;
        let id = self.id.clone();
        block(py, async move {
            let guard = inner.read().await;
            guard.as_ref().ok_or_else(|| gone(&id))?.list_env_vars().await
        })
    }
}

#[pyfunction]
fn list_snapshots(py: Python<'_>) -> PyResult<String> {
    let dirs = Dirs::from_env();
    let snaps = py.allow_threads(|| smolvm::sandbox::list_snapshots(&dirs)).map_err(to_py)?;
    let v: Vec<_> = snaps
        .iter()
        .map(|s| {
            let path = smolvm::sandbox::snapshot_dir(&dirs, &s.id);
            serde_json::json!({ "id": s.id, "vm_id": s.vm_id, "kind": s.kind, "created_at": s.created_at, "path": path })
        })
        .collect();
    Ok(serde_json::Value::Array(v).to_string())
}

#[pyfunction]
fn delete_snapshot(py: Python<'_>, snapshot_id: &str) -> PyResult<()> {
    py.allow_threads(|| smolvm::sandbox::delete_snapshot(&Dirs::from_env(), snapshot_id)).map_err(to_py)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("NativeError", m.py().get_type::<NativeError>())?;
    m.add("MAX_OUTPUT", smolvm::sandbox::DEFAULT_MAX_OUTPUT)?;
    m.add_function(wrap_pyfunction!(wait_for_given_up, m)?)?;
    m.add_function(wrap_pyfunction!(validate_env_key, m)?)?;
    m.add_function(wrap_pyfunction!(validate_config, m)?)?;
    m.add_function(wrap_pyfunction!(check_whole, m)?)?;
    m.add_function(wrap_pyfunction!(build_image, m)?)?;
    m.add_function(wrap_pyfunction!(build_named_image, m)?)?;
    m.add_function(wrap_pyfunction!(list_sandboxes, m)?)?;
    m.add_function(wrap_pyfunction!(list_snapshots, m)?)?;
    m.add_function(wrap_pyfunction!(delete_snapshot, m)?)?;
    m.add_class::<Vm>()?;
    Ok(())
}
