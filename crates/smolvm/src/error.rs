//! The host library's one error type. Messages say what was wrong and what is allowed; a
//! source error is chained, not repeated. No message ever carries an environment value.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: names the field and what is allowed.
    #[error("invalid {field}: {message}")]
    Validation { field: &'static str, message: String },
    #[error(transparent)]
    Env(#[from] smolvm_proto::env::EnvError),
    #[error("VM '{0}' not found")]
    NotFound(String),
    #[error("snapshot '{0}' not found")]
    SnapshotNotFound(String),
    #[error("VM '{0}' already exists")]
    AlreadyExists(String),
    #[error("{}", not_running(id, state, |verb| format!("smolvm sandbox {verb} {id}")))]
    NotRunning { id: String, state: String },
    /// Refused because the sandbox still runs (a delete without force).
    #[error("VM '{id}' is {state}; stop it first or pass --force")]
    StillLive { id: String, state: String },
    #[error("Operation '{operation}' timed out after {seconds}s")]
    Timeout { operation: String, seconds: f64 },
    #[error("VM '{id}' did not boot: {reason}{}", console_block(console))]
    Boot { id: String, reason: String, console: String },
    #[error("image: {0}")]
    Image(String),
    #[error("host: {0}")]
    Host(String),
    /// The VMM was killed by a signal while it booted: something outside the boot ended it (a
    /// stop or delete, the OOM killer, a `kill`), so its console says nothing of why, and a
    /// warm snapshot it was restoring is not to blame.
    #[error("host: {0}")]
    VmmKilled(String),
    /// The sandbox's supervisor runs another smolvm build (smolvm was upgraded, or downgraded,
    /// while the sandbox ran): the two would misread each other's requests, so none are sent.
    #[error(
        "VM '{id}' runs under a supervisor of another smolvm build (protocol {theirs}; this smolvm speaks {})",
        smolvm_proto::PROTOCOL_VERSION
    )]
    OtherBuild { id: String, theirs: u32 },
    /// The `smolvm` binary that supervises sandboxes (`SMOLVM_BIN`, or the one found) is
    /// another build than this library: what it started is stopped again.
    #[error(
        "host: the smolvm binary that supervises sandboxes ({path}) is another build (protocol {theirs}; this smolvm speaks {})",
        smolvm_proto::PROTOCOL_VERSION
    )]
    OtherBinary { path: String, theirs: u32 },
    /// The host side of a sandbox's network: its TAP device, nftables rules, addresses.
    #[error("network: {0}")]
    Network(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("state database")]
    Store(#[from] rusqlite::Error),
    #[error("guest agent: {0}")]
    Guest(String),
    /// The caller was interrupted (Ctrl-C, SIGTERM) and undid what it had begun.
    #[error("interrupted: {0}")]
    Interrupted(String),
    #[error("ssh: {0}")]
    Ssh(String),
    #[error("cannot run commands in VM '{0}': its image has no smolvm agent")]
    CommandUnavailable(String),
    /// The guest could not start the command (its working directory, its shell).
    #[error("guest agent: exec: {0}")]
    CannotStart(String),
    /// A command printed more than `run` keeps (`RunOptions::max_output`); it was stopped.
    #[error("the command's {stream} passed {}, the most `run` keeps; the command was stopped", size(*limit))]
    OutputLimit { stream: &'static str, limit: usize },
    /// An error the supervisor process reported, with its own code and full message.
    #[error("{message}")]
    Reported { code: &'static str, message: String },
}

/// `NotRunning`'s text, with the way to start (or resume) the sandbox in the caller's own
/// terms: the CLI's command, or Python's method.
pub fn not_running(id: &str, state: &str, how: impl Fn(&str) -> String) -> String {
    let what = if state == "error" { "in the error state" } else { state };
    let verb = way_to_run(state);
    format!("VM '{id}' is {what}; {verb} it first ({})", how(verb))
}

/// What makes a sandbox in `state` run: resume a paused one, start any other.
fn way_to_run(state: &str) -> &'static str {
    if state == "paused" {
        "resume"
    } else {
        "start"
    }
}

impl Error {
    pub fn validation(field: &'static str, message: impl Into<String>) -> Error {
        Error::Validation { field, message: message.into() }
    }

    /// A short stable code for machine-readable output (`--json`) and the Python mapping.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Validation { .. } | Error::Env(_) => "validation",
            Error::NotFound(_) => "not_found",
            Error::SnapshotNotFound(_) => "snapshot_not_found",
            Error::AlreadyExists(_) => "already_exists",
            Error::NotRunning { .. } => "not_running",
            Error::StillLive { .. } => "running",
            Error::Timeout { .. } => "timeout",
            Error::Boot { .. } => "boot",
            Error::Image(_) => "image",
            Error::Host(_)
            | Error::VmmKilled(_)
            | Error::Io { .. }
            | Error::Store(_)
            | Error::OtherBuild { .. }
            | Error::OtherBinary { .. } => "host",
            Error::Network(_) => "network",
            Error::Guest(_) => "guest",
            Error::Interrupted(_) => "interrupted",
            Error::CommandUnavailable(_) => "command_unavailable",
            Error::Ssh(_) => "ssh",
            Error::OutputLimit { .. } => "output_limit",
            Error::CannotStart(_) => "cannot_start",
            Error::Reported { code, .. } => code,
        }
    }

    /// What the user can do about it, where there is something to say.
    pub fn recovery(&self) -> Option<String> {
        match self {
            Error::NotFound(_) => Some("list sandboxes with `smolvm sandbox list --all`".into()),
            Error::SnapshotNotFound(_) => Some("list snapshots with `smolvm sandbox snapshot list`".into()),
            Error::NotRunning { id, state } => Some(format!("smolvm sandbox {} {id}", way_to_run(state))),
            Error::StillLive { id, .. } => Some(format!("smolvm sandbox stop {id}")),
            Error::OtherBinary { .. } => {
                Some("set SMOLVM_BIN to this build's `smolvm` binary, or install one version of smolvm (CLI and Python package)".into())
            }
            Error::OtherBuild { id, .. } => Some(format!(
                "`smolvm sandbox stop {id}` stops it (its supervisor is asked by signal), and a start then runs it under this build"
            )),
            // The host failed it before any guest ran (QEMU missing, say): no kernel log to see.
            Error::Boot { reason, console, .. } if reason.starts_with("host: ") && console.trim().is_empty() => {
                Some("`smolvm doctor` checks the host".into())
            }
            Error::Boot { .. } => {
                Some("retry with SMOLVM_VERBOSE_BOOT=1 to see the guest kernel log; `smolvm doctor` checks the host".into())
            }
            Error::Image(_) => Some("`smolvm setup` installs what image building needs".into()),
            Error::OutputLimit { .. } => Some(
                "write the output to a file in the guest and download it, or raise `max_output`; the CLI streams output and keeps no copy"
                    .into(),
            ),
            Error::Store(e) => match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DiskFull) => {
                    Some("free space on the disk that holds the data directory (SMOLVM_DATA_DIR); deleting sandboxes frees theirs".into())
                }
                Some(rusqlite::ErrorCode::ReadOnly) => {
                    Some("the data directory cannot be written: set SMOLVM_DATA_DIR to a directory this user can write".into())
                }
                Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => Some(
                    "the state database (state.db in the data directory, SMOLVM_DATA_DIR) is damaged: moved aside, smolvm starts afresh, and knows none of the sandboxes it named (`smolvm sandbox prune` then ends those still running and removes all their files, disks included)".into(),
                ),
                _ => None,
            },
            Error::Network(_) | Error::Reported { code: "network", .. } => {
                Some("`smolvm doctor` checks TAP devices and nftables; `--network user` needs neither".into())
            }
            _ => None,
        }
    }

    /// Whether the state database found its disk full.
    pub fn disk_full(&self) -> bool {
        matches!(self, Error::Store(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull))
    }

    /// The message with its chain of causes, for printing.
    pub fn full_message(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            out.push_str(": ");
            out.push_str(&s.to_string());
            source = s.source();
        }
        out
    }
}

/// Attach what was being done to an I/O error.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io { context: context(), source })
    }
}

/// `work`, or a timeout error naming `operation` once `bound` has passed (the work is then
/// dropped). Every wait on a peer that may be stuck (the agent, the supervisor, QEMU) is one.
pub(crate) async fn within<T>(operation: &str, bound: std::time::Duration, work: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(bound, work).await.map_err(|_| Error::Timeout { operation: operation.into(), seconds: bound.as_secs_f64() })
}

/// A boot error's console lines, under their heading; nothing where the guest printed nothing
/// (an empty heading read as if something had been lost).
fn console_block(console: &str) -> String {
    if console.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- last console lines ---\n{console}")
    }
}

/// A byte count as people read it: whole MiB where it is one.
fn size(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_error_shows_console_lines_only_where_there_are_some() {
        let boot = |console: &str| Error::Boot { id: "b".into(), reason: "host: x".into(), console: console.into() }.to_string();
        assert_eq!(boot("[ 0.1] hello"), "VM 'b' did not boot: host: x\n--- last console lines ---\n[ 0.1] hello");
        assert_eq!(boot(""), "VM 'b' did not boot: host: x");
        assert_eq!(boot("\n"), "VM 'b' did not boot: host: x");
        // The host's own failure has no kernel log to look at.
        let hint = |reason: &str, console: &str| {
            Error::Boot { id: "b".into(), reason: reason.into(), console: console.into() }.recovery().unwrap()
        };
        assert_eq!(hint("host: qemu-system-x86_64 is not installed", ""), "`smolvm doctor` checks the host");
        assert!(hint("host: x", "[ 0.1] hello").starts_with("retry with SMOLVM_VERBOSE_BOOT=1"));
        assert!(hint("the agent never answered", "").starts_with("retry with SMOLVM_VERBOSE_BOOT=1"));
    }

    #[test]
    fn host_network_failures_are_network_errors_with_a_way_out() {
        let e = Error::Network("creating the TAP device smv1: Operation not permitted".into());
        assert_eq!((e.code(), e.to_string().as_str()), ("network", "network: creating the TAP device smv1: Operation not permitted"));
        assert!(e.recovery().unwrap().contains("--network user"));
        // The same failure reported by a supervisor keeps its code.
        let r = Error::Reported { code: "network", message: e.to_string() };
        assert_eq!(r.code(), "network");
        assert!(r.recovery().is_some());
    }

    #[test]
    fn state_database_failures_say_what_to_do_by_their_cause() {
        let sqlite = |code: i32| Error::Store(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None));
        let full = sqlite(rusqlite::ffi::SQLITE_FULL);
        assert!(full.disk_full() && full.recovery().unwrap().starts_with("free space on the disk that holds the data directory"));
        assert!(sqlite(rusqlite::ffi::SQLITE_READONLY)
            .recovery()
            .unwrap()
            .contains("set SMOLVM_DATA_DIR to a directory this user can write"));
        assert!(sqlite(rusqlite::ffi::SQLITE_NOTADB).recovery().unwrap().contains("is damaged: moved aside, smolvm starts afresh"));
        let busy = sqlite(rusqlite::ffi::SQLITE_BUSY);
        assert!(!busy.disk_full() && busy.recovery().is_none());
    }

    #[test]
    fn not_running_names_the_state_and_what_to_do() {
        let says = |state: &str| Error::NotRunning { id: "x".into(), state: state.into() }.to_string();
        assert_eq!(says("stopped"), "VM 'x' is stopped; start it first (smolvm sandbox start x)");
        assert_eq!(says("paused"), "VM 'x' is paused; resume it first (smolvm sandbox resume x)");
        assert_eq!(says("error"), "VM 'x' is in the error state; start it first (smolvm sandbox start x)");
        let e = Error::Interrupted("the sandbox 'x' was not started".into());
        assert_eq!((e.code(), e.to_string().as_str()), ("interrupted", "interrupted: the sandbox 'x' was not started"));
    }
}

/// Whether `c` would act on a terminal or on how the text around it reads, rather than show:
/// control characters, and the invisible ones that reorder or break a line (bidirectional
/// overrides and isolates, direction marks, the line and paragraph separators). A value can
/// hide what follows it with one of those as well as with an escape sequence.
pub fn acts_on_terminal(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` made safe to store and to print: characters that act on a terminal
/// (`acts_on_terminal`) other than newlines and tabs shown escaped (`\u{1b}`), so that no escape sequence reaches a terminal; a carriage return
/// before a newline dropped (the serial console ends lines so); each line cut to `line_max`
/// characters. For what the guest wrote (its console, its agent's messages), which it controls.
pub fn printable(text: &str, line_max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(1 << 16));
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let line = line.strip_suffix('\r').unwrap_or(line);
        for (n, c) in line.chars().enumerate() {
            if n == line_max {
                out.push('…');
                break;
            }
            if acts_on_terminal(c) && c != '\t' {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
    }
    out
}

/// `text` cut to at most `max` bytes, on a character boundary, with `…` where it was cut.
pub fn cut(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

#[cfg(test)]
mod printable_tests {
    use super::printable;

    #[test]
    fn escapes_are_shown_not_sent_and_long_lines_are_cut() {
        assert_eq!(printable("a\u{1b}]0;PWNED\u{7}b\r\nok\tline", 80), "a\\u{1b}]0;PWNED\\u{7}b\nok\tline");
        assert_eq!(printable(&"A".repeat(10), 4), "AAAA…");
        assert_eq!(printable("héllo\n\nwörld", 5), "héllo\n\nwörld");
        assert_eq!(printable("ok\u{202e}kO\u{2066}", 80), "ok\\u{202e}kO\\u{2066}");
        assert_eq!(super::cut("héllo", 2), "h…");
        assert_eq!(super::cut("héllo", 3), "hé…");
        assert_eq!(super::cut("héllo", 6), "héllo");
    }
}
