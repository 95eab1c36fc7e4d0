//! The `smolvm` command: argument parsing and printing only; behaviour lives in the library.

use clap::{Args, CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};
use smolvm::config::seconds;
use smolvm::sandbox::{self, Output, DEFAULT_BOOT_TIMEOUT, DEFAULT_STOP_TIMEOUT};
use smolvm::{Dirs, Error, RunOptions, Sandbox, Shell, State, VmConfig};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "smolvm", version, about = "Sandboxes for AI agents: real microVMs with their own kernel")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a throwaway sandbox, run CMD in it, print its output, exit with its code.
    Run {
        #[command(flatten)]
        vm: VmArgs,
        #[command(flatten)]
        exec: ExecArgs,
        // (Its first word may not look like an option, so that a mistyped option is an error
        // rather than the command; `run -- -x` runs `-x`. Later words may: `run ls -la`.)
        /// The command: one word is a shell command line ('echo hi; ls'), several are words of one.
        #[arg(required = true, num_args = 1.., trailing_var_arg = true)]
        command: Vec<String>,
    },
    /// Long-lived sandboxes.
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// Guest images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// What works on this host, and what to do about what does not.
    Doctor {
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
    /// Install missing host packages with apt (Debian 12; elsewhere see docs/host-setup.md).
    Setup {
        /// Do not ask before installing.
        #[arg(long, short)]
        yes: bool,
    },
    /// Measure cold boot, round trips and idle cost against references taken in the same run.
    Bench {
        /// Rounds of each start-up measurement. The host's timings drift by ±15 % between
        /// batches; interleaved rounds cancel the drift, and more of them steady the medians.
        #[arg(long, default_value_t = 25)]
        rounds: usize,
        /// Only the start-up comparison (cold, warm, bare QEMU), printed; nothing is written.
        #[arg(long)]
        startup_only: bool,
        /// With --startup-only: this kernel instead of the default image's.
        #[arg(long, requires = "startup_only")]
        kernel: Option<PathBuf>,
        /// With --startup-only: this initramfs instead of the default image's.
        #[arg(long, requires = "startup_only")]
        initrd: Option<PathBuf>,
        /// Only `run("true")` through the Rust API, ROUNDS times on this running sandbox; prints
        /// the samples in ms as JSON (the Python comparison interleaves with it).
        #[arg(long, value_name = "NAME")]
        run_on: Option<String>,
        /// Directory for latest.json and latest.md.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Shell completion script.
    Completion {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    #[command(name = "__supervise", hide = true)]
    Supervise { id: String },
    /// A sandbox supervisor's helper in the host's namespaces (NAT without root).
    #[command(name = "__host-side", hide = true)]
    HostSide,
    /// Whether this user can have NAT networking here, tried (for `doctor`).
    #[command(name = "__nat-trial", hide = true)]
    NatTrial,
}

#[derive(Args, Clone)]
struct VmArgs {
    /// Memory in MiB (128..=16384).
    #[arg(long, default_value_t = smolvm::config::DEFAULT_MEMORY_MIB.into(), value_parser = whole_arg, allow_negative_numbers = true)]
    memory: i128,
    /// Virtual CPUs (1..=32).
    #[arg(long, default_value_t = smolvm::config::DEFAULT_VCPUS.into(), value_parser = whole_arg, allow_negative_numbers = true)]
    cpus: i128,
    /// qemu | auto (default: SMOLVM_BACKEND, else auto; firecracker is not in this build yet).
    #[arg(long)]
    backend: Option<String>,
    /// A kernel to boot instead of the default image's (an ELF vmlinux or a bzImage).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// An initramfs to boot with instead of the default image's.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// An ext4 image to use as the root filesystem.
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// A named image: default, alpine-ssh, debian-ssh, or a custom recipe (built on first use).
    #[arg(long)]
    image: Option<String>,
    /// Root disk size in MiB (images with a root disk; grows this sandbox's own copy).
    #[arg(long = "disk-size", value_parser = whole_arg, allow_negative_numbers = true)]
    disk_size: Option<i128>,
    /// agent (default) | ssh: the channel commands and file transfers take.
    #[arg(long = "comm-channel")]
    comm_channel: Option<String>,
    /// An OpenSSH public key (a line, or a file holding one) allowed to log in as root.
    #[arg(long = "ssh-key")]
    ssh_key: Option<String>,
    /// Extra kernel command-line arguments.
    #[arg(long)]
    boot_args: Option<String>,
    /// KEY=VALUE, or KEY to take the host's value (keeps it off command lines); repeatable.
    #[arg(long = "env", short = 'e')]
    env: Vec<std::ffi::OsString>,
    /// Seconds to wait for the VM to boot.
    #[arg(long, default_value_t = DEFAULT_BOOT_TIMEOUT.as_secs_f64(), value_parser = seconds_arg, allow_negative_numbers = true)]
    boot_timeout: f64,
    /// HOST[:GUEST]: a host directory seen in the sandbox at GUEST (default
    /// /workspace/<its name>), read-only unless --writable-mounts; repeatable.
    #[arg(long = "mount")]
    mounts: Vec<String>,
    /// Let the sandbox write to its mounts (the host's files change).
    #[arg(long = "writable-mounts")]
    writable_mounts: bool,
    /// nat | user | none (default: nat where root and /dev/net/tun allow, else user).
    #[arg(long)]
    network: Option<String>,
    /// open | off | restricted (default open; --allow-* imply restricted).
    #[arg(long)]
    internet: Option<String>,
    /// Domain (and its subdomains) a restricted sandbox may reach; repeatable.
    #[arg(long = "allow-domain")]
    allow_domains: Vec<String>,
    /// IPv4 network a restricted sandbox may reach (a.b.c.d/n); repeatable.
    #[arg(long = "allow-cidr")]
    allow_cidrs: Vec<String>,
    /// Expose a guest port on 127.0.0.1: [HOST:]GUEST; repeatable.
    #[arg(short = 'p', long = "publish")]
    publish: Vec<String>,
}

#[derive(Args, Clone)]
struct ExecArgs {
    /// Seconds before the command's whole process group is killed (default 30; with -t, none).
    #[arg(long, value_parser = seconds_arg, allow_negative_numbers = true)]
    timeout: Option<f64>,
    /// login ($SHELL -lc, sources /etc/profile.d) or raw (/bin/sh -c).
    #[arg(long, default_value = "login", value_parser = ["login", "raw"])]
    shell: String,
    /// Pass this program's stdin to the command as it comes; else the command reads nothing.
    #[arg(short = 'i', long)]
    stdin: bool,
    /// Run the command on a terminal (for interactive programs); implies -i. Its output comes
    /// on stdout alone, as a terminal shows it.
    #[arg(short = 't', long)]
    tty: bool,
    /// The command's working directory in the guest, an absolute path (default: the home
    /// directory, /root).
    #[arg(short = 'w', long = "cwd", visible_alias = "workdir", value_name = "DIR")]
    workdir: Option<String>,
}

/// `--channel agent|ssh`: overrides the sandbox's comm_channel for one command.
fn apply_channel(sb: &mut Sandbox, channel: Option<&str>) -> Result<(), Error> {
    if let Some(c) = channel {
        sb.set_channel(smolvm::config::Channel::parse(Some(c))?);
    }
    Ok(())
}

/// The positional NAME of every `sandbox` subcommand that acts on one.
const SANDBOX_NAME: &str = "The sandbox's name";

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum SandboxCmd {
    /// Create a sandbox and start it.
    Create {
        /// Its name: lowercase letters, digits, '-' and '_', 1-64 characters, starting and
        /// ending with a letter or digit (default: a generated one).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        vm: VmArgs,
        /// Only record it; start later with `smolvm sandbox start`.
        #[arg(long)]
        no_start: bool,
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
    /// Sandboxes and their state (created, running and paused ones; --all for every one).
    List {
        /// Include stopped and failed sandboxes.
        #[arg(long)]
        all: bool,
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
    /// A sandbox's state, settings, network address and the names of its variables.
    Info {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
    /// Boot a created, stopped or failed sandbox (waits for a stop in progress); nothing if it
    /// runs; a paused one is refused (resume it).
    Start {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// Seconds to wait for the VM to boot.
        #[arg(long, default_value_t = DEFAULT_BOOT_TIMEOUT.as_secs_f64(), value_parser = seconds_arg, allow_negative_numbers = true)]
        boot_timeout: f64,
    },
    /// Power the VM off; its record, config and variables remain for the next start.
    Stop {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// Seconds to wait for a clean shutdown before the VM is killed.
        #[arg(long, default_value_t = DEFAULT_STOP_TIMEOUT.as_secs_f64(), value_parser = seconds_arg, allow_negative_numbers = true)]
        timeout: f64,
    },
    /// Remove stopped sandboxes and all their files (a running one with --force: it is stopped first).
    Delete {
        /// The sandboxes' names.
        names: Vec<String>,
        /// Every sandbox (not with names: a stray `--all` beside one must not delete them all).
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// Delete running sandboxes too.
        #[arg(long, short)]
        force: bool,
    },
    /// Remove stopped and failed sandboxes and anything crashed processes left behind.
    Prune {
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a running sandbox; exits with the command's code.
    Exec {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        #[command(flatten)]
        exec: ExecArgs,
        /// KEY=VALUE, or KEY to take the host's value (keeps it off command lines); repeatable.
        #[arg(long = "env", short = 'e')]
        env: Vec<std::ffi::OsString>,
        /// agent | ssh (vsock: the agent): this command's channel (default: the sandbox's comm_channel).
        #[arg(long)]
        channel: Option<String>,
        /// The command, after `--`: one word is a shell command line, several are words of one.
        #[arg(required = true, num_args = 1.., last = true)]
        command: Vec<String>,
    },
    /// An interactive shell in the sandbox (or CMD on a terminal there), over the agent; over
    /// SSH for a sandbox whose comm_channel is ssh. Exits with the shell's code.
    Shell {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// KEY=VALUE, or KEY to take the host's value (keeps it off command lines); repeatable.
        #[arg(long = "env", short = 'e')]
        env: Vec<std::ffi::OsString>,
        /// A command to run on a terminal, after `--`, instead of an interactive shell.
        #[arg(num_args = 0.., last = true)]
        command: Vec<String>,
    },
    /// Log in over SSH (images with an SSH server), or run CMD there; the host key is pinned.
    Ssh {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// A command to run over SSH, after `--`, instead of logging in.
        #[arg(num_args = 0.., last = true)]
        command: Vec<String>,
    },
    /// Wait until an SSH login into the sandbox works.
    WaitSsh {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// Seconds to wait.
        #[arg(long, default_value_t = 60.0, value_parser = seconds_arg, allow_negative_numbers = true)]
        timeout: f64,
    },
    /// The sandbox's console log.
    Logs {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// Only the last N lines.
        #[arg(long, value_parser = lines_arg, allow_negative_numbers = true)]
        tail: Option<usize>,
        /// Then print what the guest writes, until the sandbox stops.
        #[arg(long, short)]
        follow: bool,
    },
    /// Environment variables for login shells in the sandbox.
    #[command(subcommand)]
    Env(EnvCmd),
    /// Freeze the sandbox's CPUs; its processes keep their state.
    Pause {
        #[arg(help = SANDBOX_NAME)]
        name: String,
    },
    /// Thaw a paused sandbox.
    Resume {
        #[arg(help = SANDBOX_NAME)]
        name: String,
    },
    /// Guest ports reachable on 127.0.0.1.
    #[command(subcommand)]
    Port(PortCmd),
    /// Copy files and directories in and out.
    #[command(subcommand)]
    File(FileCmd),
    /// Save sandboxes and start new ones from what was saved.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
}

#[derive(Subcommand)]
enum PortCmd {
    /// Expose [HOST:]GUEST; prints the host port.
    Expose {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// [HOST:]GUEST: the guest port, and the port on 127.0.0.1 (default: a free one).
        #[arg(allow_negative_numbers = true)]
        spec: String,
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
    /// Stop exposing a guest port.
    Close {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// The guest port.
        #[arg(value_parser = port_arg, allow_negative_numbers = true)]
        guest: u16,
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
    /// Wait until something in the sandbox listens on each PORT (TCP).
    Wait {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// Guest TCP ports.
        #[arg(required = true, value_parser = port_arg, allow_negative_numbers = true)]
        ports: Vec<u16>,
        /// Seconds to wait.
        #[arg(long, default_value_t = 30.0, value_parser = seconds_arg, allow_negative_numbers = true)]
        timeout: f64,
    },
    /// Exposed ports: guest port and the host port on 127.0.0.1 it is reachable on.
    List {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum FileCmd {
    /// Host SRC (file or directory) to guest DST (absolute; trailing / = into that directory).
    Upload {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// A host file or directory.
        src: PathBuf,
        /// An absolute guest path; ending in / for into that directory.
        dst: String,
        /// agent | ssh (SFTP; vsock: the agent): default the sandbox's comm_channel.
        #[arg(long)]
        channel: Option<String>,
    },
    /// Guest SRC (absolute) to host DST.
    Download {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// An absolute guest path, a file or a directory.
        src: String,
        /// A host path; ending in / (or an existing directory) for into that directory.
        dst: PathBuf,
        /// agent | ssh (SFTP; vsock: the agent): default the sandbox's comm_channel.
        #[arg(long)]
        channel: Option<String>,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Save a running sandbox.
    Create {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// Its id: the same rules as sandbox names (default: snap- and 8 hex digits).
        #[arg(long)]
        snapshot_id: Option<String>,
        /// full (memory, devices, disk) | disk (root disk only) | diff (not offered by QEMU).
        #[arg(long, default_value = "full")]
        snapshot_type: String,
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
    /// Start a new sandbox from a snapshot.
    Restore {
        /// The snapshot's id.
        snapshot_id: String,
        /// The new sandbox's name (default: a generated one).
        #[arg(long)]
        name: Option<String>,
        /// Leave the new sandbox paused.
        #[arg(long)]
        no_resume: bool,
        /// KEY=VALUE, or KEY to take the host's value; repeatable: replaces the snapshot's variables.
        #[arg(long = "env", short = 'e')]
        env: Vec<std::ffi::OsString>,
        /// HOST[:GUEST]; repeatable: replaces the snapshot's mounts (a 'disk' snapshot's, whose
        /// host directories may be gone).
        #[arg(long = "mount", conflicts_with = "no_mounts")]
        mounts: Vec<String>,
        /// Restore without the snapshot's mounts.
        #[arg(long)]
        no_mounts: bool,
        /// Let the sandbox write to its mounts.
        #[arg(long, conflicts_with = "no_mounts")]
        writable_mounts: bool,
        /// [HOST:]GUEST; repeatable: replaces the snapshot's port forwards (whose fixed host
        /// ports a running source sandbox holds).
        #[arg(short = 'p', long = "publish", conflicts_with = "no_publish")]
        publish: Vec<String>,
        /// Restore without the snapshot's port forwards.
        #[arg(long)]
        no_publish: bool,
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
    /// Saved snapshots: id, type (full or disk) and the sandbox each was taken from.
    List {
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
    /// Remove a snapshot and its files; refused while a sandbox restored from it exists.
    Delete {
        /// The snapshot's id.
        snapshot_id: String,
    },
}

#[derive(Subcommand)]
enum EnvCmd {
    /// Set variables (merged with those there, or --replace); prints the names present after.
    Set {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// KEY=VALUE, or KEY to take the host's value (keeps it off command lines).
        #[arg(required = true)]
        pairs: Vec<std::ffi::OsString>,
        /// Replace all managed variables instead of merging.
        #[arg(long)]
        replace: bool,
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
    /// Remove variables; prints the removed names (missing ones are ignored).
    Unset {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// The variables' names.
        #[arg(required = true)]
        keys: Vec<String>,
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
    /// The managed variables, values shown as **** unless --show-values.
    List {
        #[arg(help = SANDBOX_NAME)]
        name: String,
        /// Print values instead of ****.
        #[arg(long)]
        show_values: bool,
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build (or find in the cache) the default kernel and initramfs, or the named image
    /// (alpine-ssh, debian-ssh, or a custom recipe given with --base/--package/--file/--size).
    Build {
        /// alpine-ssh, debian-ssh, or a custom recipe's name (none: the default image).
        name: Option<String>,
        /// Also build the default ext4 root disk (for `--rootfs` and the Python ImageBuilder).
        #[arg(long)]
        rootfs: bool,
        /// Custom recipe: debian (apt installs the packages) or busybox (packages unpacked).
        #[arg(long)]
        base: Option<String>,
        /// Custom recipe: a Debian package to add; repeatable.
        #[arg(long = "package")]
        packages: Vec<String>,
        /// Custom recipe: HOST_FILE:/GUEST/PATH to copy in; repeatable.
        #[arg(long = "file")]
        files: Vec<String>,
        /// Custom recipe: root filesystem size in MiB (default 2048).
        #[arg(long)]
        size: Option<u32>,
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
    /// Cached image artifacts.
    List {
        /// Print one JSON envelope: {ok, command, exit_code, data, error}.
        #[arg(long)]
        json: bool,
    },
    /// Remove a cache entry by name (see `image list`).
    Rm {
        /// The entry's name, as `image list` shows it.
        name: String,
    },
    /// Download a published image (not supported by this build yet: images are built locally).
    Pull {
        /// The image's name.
        name: String,
    },
    /// Remove warm snapshots, build leftovers, failed-build records, cached answers about kernel and
    /// QEMU files, and all but the two newest initramfs and the newest disk of each image and busybox build.
    Prune,
}

/// A command's outcome: printed as text, or as the `--json` envelope.
#[derive(Default)]
struct Done {
    exit_code: i32,
    data: Value,
    text: Option<String>,
    /// What failed of a command that did some of its work (a delete of several sandboxes):
    /// printed on stderr as errors are; `--json` has them in `data`.
    errors: Vec<Error>,
    /// Lines for a person, on stderr and only without `--json` (whose `data` has the same).
    notes: Vec<String>,
}

impl Done {
    fn text(s: impl Into<String>, data: Value) -> Done {
        Done { data, text: Some(s.into()), ..Default::default() }
    }

    /// A command's exit code, and nothing to print.
    fn exit(code: i32) -> Done {
        Done { exit_code: code, data: json!({ "exit_code": code }), ..Default::default() }
    }
}

/// A line on stdout, where a reader that went away (`| head`) is no reason to panic.
fn out_line(line: impl std::fmt::Display) {
    write_out(format!("{line}\n").as_bytes());
}

/// Our stdout taking what we print, or the process ends as a command's would: quietly with
/// 141 for a reader that went away (`| head`), else with the error and 1 (`> /dev/full` said
/// nothing and exited 0).
fn write_out(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        let _ = writeln!(std::io::stderr(), "error: writing the output: {e}");
        std::process::exit(1);
    }
}

/// A whole number as written, however large: the library's range check names the field and
/// its range (clap's own check would say `0..=4294967295` of a `--memory` past 32 bits).
fn whole_arg(s: &str) -> Result<i128, String> {
    s.trim().parse::<i128>().map_err(|_| "must be a whole number".to_string())
}

fn whole(field: &str, v: i128) -> Result<u32, Error> {
    smolvm::config::check_whole(field, v)?;
    Ok(v as u32)
}

/// A TCP port: 1..=65535 (clap's own check for a u16 allows 0 and names no range of ports).
fn port_arg(s: &str) -> Result<u16, String> {
    plain_port(s).ok_or_else(|| "is not a port (allowed: 1..=65535)".to_string())
}

/// A port written as plain digits: `+80` and `080` are no ports (nor are they in networking's
/// prefix lengths), though Rust's parser takes both.
fn plain_port(s: &str) -> Option<u16> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0');
    s.parse::<u16>().ok().filter(|_| digits)
}

/// A count of lines: 0 or more.
fn lines_arg(s: &str) -> Result<usize, String> {
    s.trim().parse::<usize>().map_err(|_| "must be a whole number of lines, 0 or more".to_string())
}

/// A number of seconds as clap reads it; the bounds are `seconds`'s, which name the field
/// (`stop --timeout` takes 0 too, so this says only that it is no number).
fn seconds_arg(s: &str) -> Result<f64, String> {
    s.trim().parse::<f64>().map_err(|_| "must be a number of seconds".to_string())
}

/// One argument is a shell command as written; several are words, quoted so that each stays
/// one word (`smolvm sandbox exec box -- echo "a b"`).
fn command_line(words: &[String]) -> String {
    if words.len() == 1 {
        words[0].clone()
    } else {
        words.iter().map(|w| smolvm::env::quote(w)).collect::<Vec<_>>().join(" ")
    }
}

/// Bytes a cache entry occupies on disk (sparse files count what they use).
fn disk_usage(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path).map(|d| d.flatten().map(|e| disk_usage(&e.path())).sum()).unwrap_or(0),
        Ok(m) => m.blocks() * 512,
        Err(_) => 0,
    }
}

/// A custom image recipe from `image build NAME --base/--package/--file/--size`.
fn recipe_from_flags(
    name: &str,
    base: Option<String>,
    packages: Vec<String>,
    files: &[String],
    size: Option<u32>,
) -> Result<smolvm::recipe::Recipe, Error> {
    let files = files
        .iter()
        .map(|f| match f.split_once(':') {
            Some((src, dest)) if !src.is_empty() => {
                let source = std::fs::canonicalize(src).map_err(|_| Error::validation("files", format!("{src} is not a readable file")))?;
                Ok(smolvm::recipe::RecipeFile { source, dest: dest.to_string() })
            }
            _ => Err(Error::validation("files", format!("{f:?}: expected HOST_FILE:/GUEST/PATH"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(smolvm::recipe::Recipe {
        name: name.to_string(),
        base: base.unwrap_or_else(|| "debian".into()),
        packages,
        files,
        size_mib: size.unwrap_or(2048),
    })
}

fn progress(line: &str) {
    say(&format!("smolvm: {line}\n"));
}

/// To stderr, where a failed write has nowhere to be told (`eprint!` panicked on a closed
/// stderr: `smolvm run 'cmd' 2>&1 | head -1` ended with SIGABRT).
fn say(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes()).and_then(|_| err.flush());
}

/// `--mount` values. A relative host directory is taken from here, as a shell user means it,
/// and resolved whole (`..` and links), so the sandbox gets the directory named now.
fn host_mounts(specs: &[String]) -> Result<Vec<smolvm::config::Mount>, Error> {
    specs
        .iter()
        .map(|spec| {
            // "/data/a:/b" names a directory and also reads as /data/a at /b: not guessed.
            if spec.contains(":/") && std::path::Path::new(spec).is_dir() {
                return Err(Error::validation(
                    "mounts",
                    format!("{spec:?} is a directory and also reads as HOST:GUEST; give its guest path ({spec}:/GUEST)"),
                ));
            }
            let mut m = smolvm::config::Mount::parse(spec)?;
            m.host = std::fs::canonicalize(&m.host)
                .map_err(|_| Error::validation("mounts", format!("{} is not an existing directory{}", m.host.display(), m.colon_hint())))?;
            Ok(m)
        })
        .collect()
}

fn vm_config(vm: &VmArgs, name: Option<String>) -> Result<VmConfig, Error> {
    let mounts = host_mounts(&vm.mounts)?;
    Ok(VmConfig {
        workspace_mounts: mounts,
        writable_mounts: vm.writable_mounts,
        vm_id: name,
        vcpu_count: whole("vcpu_count", vm.cpus)?,
        memory: whole("memory", vm.memory)?,
        kernel_path: vm.kernel.clone(),
        initrd_path: vm.initrd.clone(),
        rootfs_path: vm.rootfs.clone(),
        boot_args: vm.boot_args.clone(),
        env_vars: env_flags(&vm.env)?,
        backend: vm.backend.clone(),
        network: vm.network.clone(),
        internet_settings: internet_settings(vm),
        port_forwards: vm.publish.iter().map(|p| parse_publish(p)).collect::<Result<_, _>>()?,
        image: vm.image.clone(),
        disk_size_mib: vm.disk_size.map(|v| whole("disk_size_mib", v)).transpose()?,
        comm_channel: vm.comm_channel.clone(),
        ssh_public_key: match &vm.ssh_key {
            // A key is one line of words ("ssh-ed25519 AAAA… [comment]"); one word is the file
            // that holds it, whose errors are its own (an unreadable file is no key text).
            Some(k) if !k.trim().contains(char::is_whitespace) => Some(
                std::fs::read_to_string(k)
                    .map_err(|e| Error::Io { context: format!("reading the --ssh-key file {k}"), source: e })?
                    .trim()
                    .to_string(),
            ),
            other => other.clone(),
        },
    })
}

/// `--env KEY=VALUE`, or `--env KEY` to pass the host's value of KEY without putting it on
/// any command line.
fn env_flags(flags: &[std::ffi::OsString]) -> Result<std::collections::BTreeMap<String, String>, Error> {
    use std::os::unix::ffi::OsStrExt;
    let not_text = |key: &str| Error::validation("env", format!("the value of {key} is not UTF-8 text (variables hold text)"));
    // (What was given is not shown: a value passed without its key would be a secret. Where
    // there are several, which one is said by its place.)
    let neither = |i: usize| {
        let which = if flags.len() > 1 { format!(": pair number {} of {}", i + 1, flags.len()) } else { String::new() };
        Error::validation("env", format!("malformed pair (expected KEY=VALUE){which}; a KEY alone must name a variable set on this host"))
    };
    flags
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let Some(f) = f.to_str() else {
                // The key is what comes before the first '='; the value is never shown.
                let bytes = f.as_bytes();
                let key = bytes.iter().position(|&b| b == b'=').and_then(|i| std::str::from_utf8(&bytes[..i]).ok());
                return Err(match key.filter(|k| smolvm::env::validate_key(k).is_ok()) {
                    Some(key) => not_text(key),
                    None => neither(i),
                });
            };
            match (f.contains('='), std::env::var(f)) {
                (false, Ok(value)) => {
                    smolvm::env::validate_key(f)?;
                    Ok((f.to_string(), value))
                }
                // (A variable of this host: its name is no secret.)
                (false, Err(std::env::VarError::NotUnicode(_))) if smolvm::env::validate_key(f).is_ok() => Err(not_text(f)),
                (false, Err(_)) => Err(neither(i)),
                _ => smolvm::env::parse_pair(f),
            }
        })
        .collect()
}

fn internet_settings(vm: &VmArgs) -> Option<smolvm::config::InternetSettings> {
    let restricted = !vm.allow_domains.is_empty() || !vm.allow_cidrs.is_empty();
    if vm.internet.is_none() && !restricted {
        return None;
    }
    Some(smolvm::config::InternetSettings {
        mode: vm.internet.clone().unwrap_or_else(|| "restricted".into()),
        allowed_domains: vm.allow_domains.clone(),
        allowed_cidrs: vm.allow_cidrs.clone(),
    })
}

/// `[HOST:]GUEST`.
fn parse_publish(spec: &str) -> Result<smolvm::config::PortForward, Error> {
    let bad = || Error::validation("publish", format!("{spec:?} is not [HOST:]GUEST with ports 1..=65535"));
    let port = |s: &str| plain_port(s).ok_or_else(bad);
    match spec.split_once(':') {
        Some((h, g)) => Ok(smolvm::config::PortForward { guest: port(g)?, host: Some(port(h)?) }),
        None => Ok(smolvm::config::PortForward { guest: port(spec)?, host: None }),
    }
}

fn run_options(exec: &ExecArgs, env: &[std::ffi::OsString]) -> Result<RunOptions, Error> {
    Ok(RunOptions {
        // A terminal's program waits for its user (an editor, a shell): no default limit.
        timeout: match exec.timeout {
            // (Here 0 is refused as not positive: the library's "or 0 for none" is not offered.)
            Some(t) if t > 0.0 && t < 1.0 => return Err(Error::validation("timeout", "must be at least 1 second")),
            Some(t) => seconds(t, "timeout")?,
            None if exec.tty => Duration::ZERO,
            None => Duration::from_secs(30),
        },
        shell: if exec.shell == "raw" { Shell::Raw } else { Shell::Login },
        env: env_flags(env)?,
        cwd: exec.workdir.clone(),
        // `-i` streams (`run_streamed`), not `stdin`.
        ..Default::default()
    })
}

/// stderr for log lines, whose failed writes are dropped. tracing reports a failed write with
/// `eprintln!`, which panics where stderr fails too: a supervisor, whose stderr is its log
/// file, died at its first log line once the data directory's disk was full, and its VM with it.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// What an interrupted `run` says: its command and its sandbox are gone.
const RUN_INTERRUPTED: &str = "the command was ended, and its sandbox removed";

/// Runs a command on a terminal in the guest, ours in raw mode meanwhile (where stdin is one):
/// keys go to the guest as typed, output comes back as the guest's terminal shows it, and each
/// change of our window's size follows. Ended by a signal meanwhile (SIGTERM, SIGHUP, SIGINT or SIGQUIT), it says
/// `interrupted: <ended>` as it goes (the supervisor then ends the command, and an ephemeral
/// sandbox with it).
async fn run_on_terminal(sb: &Sandbox, command: &str, opts: &RunOptions, ended: &'static str) -> Result<Done, Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, resizes) = tokio::sync::mpsc::unbounded_channel();
    // SIGWINCH: the window's new size. Watched before the first size is read, so that no change
    // falls between the two. (Without a signal handler, sizes stay as they began.)
    let watch = signal(SignalKind::window_change()).ok().map(|mut sig| {
        tokio::spawn(async move {
            while sig.recv().await.is_some() {
                if tx.send(terminal::size()).is_err() {
                    break;
                }
            }
        })
    });
    let size = terminal::size();
    // The guest's programs draw for the terminal this one is (as ssh passes it on).
    let mut opts = opts.clone();
    if let Ok(term) = std::env::var("TERM") {
        opts.env.entry("TERM".into()).or_insert(term);
    }
    // Killed or hung up while raw, the terminal is given back first: a signal's default action
    // would leave it raw, without echo. (Ending this process ends the command: the supervisor
    // cancels what a departed client started.) Keys typed raw raise no signal here; these come
    // from `kill`. One ignored when this process started stays ignored.
    let ends = [(libc::SIGTERM, 143), (libc::SIGHUP, 129), (libc::SIGINT, 130), (libc::SIGQUIT, 131)];
    let mut handlers = Vec::new();
    for (number, code) in ends.into_iter().filter(|(n, _)| !ignored_at_start(*n)) {
        if let Ok(mut sig) = signal(SignalKind::from_raw(number)) {
            handlers.push(tokio::spawn(async move {
                if sig.recv().await.is_some() {
                    terminal::restore();
                    eprintln!("error: interrupted: {ended}");
                    std::process::exit(code);
                }
            }));
        }
    }
    // (Raw only once the handlers are there: a signal between the two left it raw.)
    let _raw = terminal::Raw::enter();
    let opts = RunOptions { discard_output: true, ..opts };
    let sink = Sink::default();
    let result = sink
        .until_failed(sb.run_interactive(command, &opts, Box::new(tokio::io::stdin()), smolvm::Terminal { size, resizes }, |o| {
            let (Output::Stdout(d) | Output::Stderr(d)) = o;
            sink.stdout(d);
        }))
        .await;
    if let Some(w) = watch {
        w.abort();
    }
    // The command has ended: a signal during what follows (`run` removing its sandbox) neither
    // says it ended the command nor replaces its exit code. (It stays caught, as `run`'s are
    // without a terminal, and the bounded teardown finishes.)
    for h in handlers {
        h.abort();
    }
    sink.done(result)
}

/// Where a command's output goes: ours. Once our stdout takes no more (its reader went away,
/// as in `smolvm run yes | head -1`, or its disk is full), the command is ended: nothing
/// would show what it writes, and it would otherwise run on until its timeout.
#[derive(Default)]
struct Sink {
    /// The first write to stdout that failed; what comes after it is dropped.
    failed: std::cell::RefCell<Option<std::io::Error>>,
    gone: tokio::sync::Notify,
}

impl Sink {
    fn stdout(&self, data: &[u8]) {
        if self.failed.borrow().is_some() {
            return;
        }
        let mut out = std::io::stdout();
        if let Err(e) = out.write_all(data).and_then(|_| out.flush()) {
            *self.failed.borrow_mut() = Some(e);
            self.gone.notify_one();
        }
    }

    /// A reader of stderr that went away ends the command as one of stdout does (a program in
    /// a pipeline gets SIGPIPE either way: `cmd 2>&1 | head -1`); the command ran on to its
    /// timeout. Other failures there have nowhere to be told, and stdout may still be read.
    fn stderr(&self, data: &[u8]) {
        let mut err = std::io::stderr();
        if let Err(e) = err.write_all(data).and_then(|_| err.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe && self.failed.borrow().is_none() {
                *self.failed.borrow_mut() = Some(e);
                self.gone.notify_one();
            }
        }
    }

    /// The run, unless stdout fails first: then it is dropped, which cancels the command.
    async fn until_failed<T>(&self, run: impl std::future::Future<Output = Result<T, Error>>) -> Option<Result<T, Error>> {
        tokio::select! {
            r = run => Some(r),
            _ = self.gone.notified() => None,
        }
    }

    /// A command's result as this CLI ends with it. A reader that went away ends it as it ends
    /// a program in a pipeline, by SIGPIPE (exit code 141, no message); any other failed write
    /// is an error, also where the command finished.
    fn done(self, result: Option<Result<smolvm::CommandResult, Error>>) -> Result<Done, Error> {
        match self.failed.into_inner() {
            Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Done::exit(141)),
            Some(e) => Err(Error::Io { context: "writing the command's output".into(), source: e }),
            None => {
                let result = result.expect("a run ends unless stdout failed")?;
                Ok(Done::exit(result.exit_code))
            }
        }
    }
}

/// Hands this process over to ssh into the sandbox: its exit code is ours.
fn ssh_session(sb: &Sandbox, remote: Option<&str>, tty: bool) -> Result<Done, Error> {
    let ep = sb.ssh_endpoint()?;
    let err = std::os::unix::process::CommandExt::exec(&mut ep.ssh(remote, tty));
    Err(Error::Host(format!("running ssh (openssh-client): {err}")))
}

/// Our own terminal, for `run_on_terminal`.
mod terminal {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};
    use std::io::IsTerminal;

    /// The size of the window stdout (else stdin) shows in; 24x80 where neither is a terminal.
    pub fn size() -> smolvm::TtySize {
        for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO] {
            // SAFETY: winsize is plain old data; TIOCGWINSZ writes one through the pointer.
            let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: as above; the descriptor is only asked, not changed.
            if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
                return smolvm::TtySize { rows: ws.ws_row, cols: ws.ws_col };
            }
        }
        smolvm::TtySize { rows: 24, cols: 80 }
    }

    /// The settings to give back, while the terminal is raw.
    static SAVED: std::sync::Mutex<Option<Termios>> = std::sync::Mutex::new(None);

    /// stdin in raw mode (keys pass as typed, Ctrl-C included, to the guest's terminal, which
    /// does the echo and the line editing) until dropped, or until `restore` (signals) or a
    /// panic (release builds abort, and an abort runs no destructor). Nothing where stdin is
    /// no terminal.
    pub struct Raw(());

    impl Raw {
        pub fn enter() -> Raw {
            let stdin = std::io::stdin();
            if !stdin.is_terminal() {
                return Raw(());
            }
            let Ok(saved) = tcgetattr(&stdin) else { return Raw(()) };
            let mut raw = saved.clone();
            cfmakeraw(&mut raw);
            *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                hook(info);
            }));
            if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
                restore();
            }
            Raw(())
        }
    }

    /// The terminal as it was before `Raw::enter`, if it is raw now.
    pub fn restore() {
        if let Some(saved) = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &saved);
        }
    }

    impl Drop for Raw {
        fn drop(&mut self) {
            restore();
        }
    }
}

/// Runs a command with its output going straight to ours, as it arrives.
async fn run_streamed(sb: &Sandbox, command: &str, opts: &RunOptions, stdin: bool) -> Result<Done, Error> {
    let input = stdin.then(|| Box::new(tokio::io::stdin()) as smolvm::sandbox::Input);
    // (Printed as it comes, and only the exit code is used after.)
    let opts = RunOptions { discard_output: true, ..opts.clone() };
    let sink = Sink::default();
    let result = sink
        .until_failed(sb.run_with_input(command, &opts, input, |o| match o {
            Output::Stdout(d) => sink.stdout(d),
            Output::Stderr(d) => sink.stderr(d),
        }))
        .await;
    sink.done(result)
}

fn state_rank(s: State) -> bool {
    s.is_live() || s == State::Created
}

async fn dispatch(cmd: Cmd, dirs: Dirs) -> Result<Done, Error> {
    match cmd {
        Cmd::Run { vm, exec, command } => {
            // The variables are the sandbox's (login shells read them) and the command's own
            // too, so that a raw shell sees them as well: `run --shell raw -e MODE=ci 'echo $MODE'`.
            tracing::debug!("phase: run");
            let mut opts = run_options(&exec, &vm.env)?;
            smolvm::sandbox::check_run(&command_line(&command), &opts)?;
            let boot_timeout = seconds(vm.boot_timeout, "boot_timeout")?;
            let config = vm_config(&vm, None)?;
            // Over SSH there are no per-command variables: the sandbox's own carry them to a
            // login shell. Said before anything boots.
            if !opts.env.is_empty() && smolvm::config::Channel::parse(config.comm_channel.as_deref())? == smolvm::config::Channel::Ssh {
                if opts.shell == Shell::Raw {
                    return Err(Error::validation(
                        "env",
                        "over SSH (comm_channel=ssh) a raw shell does not read the sandbox's variables: use the login shell (the default) or the agent channel",
                    ));
                }
                opts.env.clear();
            }
            let mut sb = Sandbox::create_in(dirs, config, true)?;
            tracing::debug!("phase: created");
            let work = async {
                sb.start(boot_timeout, &progress).await?;
                if smolvm::config::env_flag("SMOLVM_VERBOSE_BOOT", false) {
                    say(&std::fs::read_to_string(&sb.paths().console).unwrap_or_default());
                }
                match exec.tty {
                    true => run_on_terminal(&sb, &command_line(&command), &opts, RUN_INTERRUPTED).await,
                    false => run_streamed(&sb, &command_line(&command), &opts, exec.stdin).await,
                }
            };
            // Ctrl-C or SIGTERM: the command and its sandbox go, and the exit says so. (On a
            // terminal, Ctrl-C is the guest's key, and SIGTERM ends this at once; either way
            // the supervisor removes a sandbox whose owner is gone.)
            let result = match exec.tty {
                true => Some(work.await),
                false => unless_interrupted(work).await,
            };
            tracing::debug!("phase: command done");
            let Some(result) = result else {
                if unless_interrupted(sb.delete()).await.is_none() {
                    return Err(Error::Interrupted("twice: the command's sandbox is being removed by its supervisor".into()));
                }
                return Err(Error::Interrupted(RUN_INTERRUPTED.into()));
            };
            let _ = sb.delete().await;
            result
        }
        Cmd::Sandbox(s) => sandbox_cmd(s, dirs).await,
        Cmd::Image(ImageCmd::Build { name, rootfs, base, packages, files, size, .. }) => {
            let custom = base.is_some() || !packages.is_empty() || !files.is_empty() || size.is_some();
            let dirs2 = dirs.clone();
            let (img, built) = tokio::task::spawn_blocking(move || -> Result<_, Error> {
                // The recipe first: a bad one (or a name with none) is said before minutes of
                // building the kernel.
                let recipe = match name.as_deref() {
                    None | Some("default") if !custom => None,
                    None => return Err(Error::validation("name", "a custom recipe needs a name (smolvm image build NAME --base ...)")),
                    Some(n) if custom => {
                        let recipe = recipe_from_flags(n, base, packages, &files, size)?;
                        recipe.validate()?;
                        Some((n.to_string(), Some(recipe)))
                    }
                    Some(n) => {
                        smolvm::recipe::load(&dirs2, n)?;
                        Some((n.to_string(), None))
                    }
                };
                let mut img = smolvm::image::resolve(&VmConfig::default(), &dirs2, &progress)?;
                if rootfs {
                    img.rootfs = Some(smolvm::image::default_rootfs(&dirs2)?);
                }
                let built = match recipe {
                    None => None,
                    Some((_, Some(recipe))) => Some(smolvm::recipe::build(&dirs2, &recipe, &progress)?),
                    Some((n, None)) => Some(smolvm::recipe::build_named(&dirs2, &n, &progress)?),
                };
                Ok((img, built))
            })
            .await
            .map_err(|e| Error::Host(e.to_string()))??;
            let mut data = serde_json::to_value(&img).unwrap_or_default();
            let mut text = format!(
                "kernel  {}\ninitrd  {}",
                img.kernel.display(),
                img.initrd.as_deref().unwrap_or(std::path::Path::new("-")).display()
            );
            if let Some(r) = &img.rootfs {
                text.push_str(&format!("\nrootfs  {}", r.display()));
            }
            if let Some(b) = &built {
                data["image"] = json!(b.name);
                data["rootfs"] = json!(b.rootfs);
                data["cached"] = json!(b.cached);
                text.push_str(&format!(
                    "\nimage   {} ({})\nrootfs  {}",
                    b.name,
                    if b.cached { "cached" } else { "built" },
                    b.rootfs.display()
                ));
            }
            Ok(Done::text(text, data))
        }
        Cmd::Image(ImageCmd::Rm { name }) => {
            smolvm::image::remove_entry(&dirs, &name)?;
            Ok(Done::text(name.clone(), json!({ "removed": [name] })))
        }
        Cmd::Image(ImageCmd::Pull { .. }) => Err(Error::validation(
            "image",
            "`image pull` is not supported by this build yet: images are built on this host (smolvm image build NAME)",
        )),
        Cmd::Image(ImageCmd::Prune) => {
            let removed = smolvm::image::prune(&dirs)?;
            Ok(Done::text(removed.join("\n"), json!({ "removed": removed })))
        }
        Cmd::Image(ImageCmd::List { .. }) => {
            let mut rows = Vec::new();
            if let Ok(entries) = std::fs::read_dir(&dirs.images) {
                let mut entries: Vec<_> = entries.flatten().collect();
                entries.sort_by_key(|e| e.file_name());
                for e in entries {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if !smolvm::image::listed_entry(&name) {
                        continue;
                    }
                    let size = disk_usage(&e.path());
                    rows.push(json!({ "name": name, "bytes": size, "path": e.path() }));
                }
            }
            let text =
                rows.iter().map(|r| format!("{:<40} {:>10}", r["name"].as_str().unwrap_or(""), r["bytes"])).collect::<Vec<_>>().join("\n");
            Ok(Done::text(text, Value::Array(rows)))
        }
        Cmd::Doctor { .. } => {
            let checks = smolvm::doctor::run(&dirs);
            let failed: Vec<&str> = checks.iter().filter(|c| c.status == "fail").map(|c| c.name).collect();
            let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
            let text = checks
                .iter()
                .map(|c| {
                    let fix = c.fix.as_deref().map(|f| format!("\n      fix: {f}")).unwrap_or_default();
                    format!("[{:^4}] {:<width$} {}{fix}", c.status, c.name, c.detail)
                })
                .collect::<Vec<_>>()
                .join("\n");
            // A failed check fails the command, and `--json`'s error says which (each check's
            // own fix is in `data`).
            let errors = match failed.is_empty() {
                true => vec![],
                false => {
                    vec![Error::Reported { code: "host", message: format!("failed checks: {} (each says what to do)", failed.join(", ")) }]
                }
            };
            Ok(Done {
                exit_code: i32::from(!failed.is_empty()),
                data: serde_json::to_value(&checks).unwrap_or_default(),
                text: Some(text),
                errors,
                ..Default::default()
            })
        }
        Cmd::Setup { yes } => setup(yes),
        Cmd::Bench { rounds, run_on: Some(name), .. } => {
            let samples = smolvm::bench::run_true_on(&dirs, &name, rounds.max(1)).await?;
            Ok(Done::text(serde_json::to_string(&samples).unwrap_or_default(), json!({ "samples_ms": samples })))
        }
        Cmd::Bench { rounds, startup_only: true, kernel, initrd, .. } => {
            let boot = smolvm::bench::BootFiles { kernel, initrd };
            let s = smolvm::bench::startup(&dirs, &boot, rounds.max(1), &progress).await?;
            let text = format!(
                "{:?}: bare QEMU {:.3} s, cold smolvm run {:.3} s (ratio {:.2}; median of the rounds' own ratios {:.2}), warm {:.3} s (ratio to cold {:.2}); bare QEMU with lab.md's command line {:.3} s (cold ratio to it {:.2})",
                s.accel,
                s.bare,
                s.cold,
                s.cold / s.bare,
                s.paired_ratio,
                s.warm,
                s.warm / s.cold,
                s.bare_lab,
                s.cold / s.bare_lab
            );
            Ok(Done::text(
                text,
                json!({ "accel": s.accel, "bare_s": s.bare, "bare_lab_cmdline_s": s.bare_lab, "cold_s": s.cold, "warm_s": s.warm, "ratio": s.cold / s.bare, "paired_ratio": s.paired_ratio, "ratio_to_lab_cmdline": s.cold / s.bare_lab }),
            ))
        }
        Cmd::Bench { rounds, out, .. } => {
            let (data, md) = smolvm::bench::run(&dirs, rounds.max(1), &progress).await?;
            std::fs::create_dir_all(&out).map_err(|e| Error::Io { context: format!("creating {}", out.display()), source: e })?;
            let stamp = std::process::Command::new("date")
                .arg("-u")
                .arg("+%Y-%m-%d %H:%M UTC")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            let md = format!("Measured {stamp} on this host.\n\n{md}");
            let write = |name: &str, text: String| {
                std::fs::write(out.join(name), text).map_err(|e| Error::Io { context: format!("writing {name}"), source: e })
            };
            write("latest.json", serde_json::to_string_pretty(&data).unwrap_or_default() + "\n")?;
            write("latest.md", md.clone())?;
            Ok(Done::text(md, data))
        }
        Cmd::Completion { shell } => {
            // (Made whole first: clap_complete panics on a write that fails.)
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut completed_command(), "smolvm", &mut script);
            write_out(&script);
            Ok(Done::default())
        }
        Cmd::Supervise { .. } | Cmd::HostSide | Cmd::NatTrial => unreachable!("handled before the runtime starts"),
    }
}

/// The command tree that completion offers: without the hidden internal subcommands
/// (`__supervise` and the like), which clap_complete would list.
fn completed_command() -> clap::Command {
    let full = Cli::command();
    let shown = full.get_subcommands().filter(|s| !s.is_hide_set()).cloned();
    let mut cmd = clap::Command::new("smolvm").version(env!("CARGO_PKG_VERSION")).subcommands(shown);
    for arg in full.get_arguments() {
        cmd = cmd.arg(arg.clone());
    }
    cmd
}

fn setup(yes: bool) -> Result<Done, Error> {
    let missing = smolvm::doctor::missing_packages();
    if missing.is_empty() {
        return Ok(Done::text("all host packages are installed", json!({ "installed": [] })));
    }
    say(&format!("smolvm: missing host packages: {}\n", missing.join(" ")));
    if !yes {
        say("install them with apt-get? [y/N] ");
        let mut answer = String::new();
        let _ = std::io::stdin().read_line(&mut answer);
        if !answer.trim().eq_ignore_ascii_case("y") {
            return Err(Error::Host("setup cancelled".into()));
        }
    }
    // (Through `env`: sudo's default `env_reset` drops the variable set on its own process.)
    let sudo: &[&str] = if nix::unistd::Uid::effective().is_root() { &[] } else { &["sudo", "env", "DEBIAN_FRONTEND=noninteractive"] };
    let run = |args: &[&str]| -> Result<(), Error> {
        let mut all: Vec<&str> = sudo.to_vec();
        all.extend_from_slice(args);
        let status = std::process::Command::new(all[0])
            .args(&all[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| Error::Host(format!("running {}: {e}", all[0])))?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::Host(format!("{} failed ({status})", all.join(" "))))
        }
    };
    run(&["apt-get", "update", "-qq"])?;
    let mut args = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    run(&args)?;
    Ok(Done::text(format!("installed: {}", missing.join(" ")), json!({ "installed": missing })))
}

async fn sandbox_cmd(cmd: SandboxCmd, dirs: Dirs) -> Result<Done, Error> {
    match cmd {
        SandboxCmd::Ssh { name, command } => {
            let sb = Sandbox::open_in(dirs, &name).await?;
            // A command runs in a login shell of its own, as `exec` runs one (the sandbox's
            // variables are in its profile), whose server-side shell exits with its code (128+N
            // for a signal, as over the agent; the server would report the signal, and ssh exit
            // 255, which reads as ssh's own failure).
            let remote = (!command.is_empty()).then(|| smolvm::ssh::remote_command(&command_line(&command), true, 0, None));
            let tty = remote.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdin());
            ssh_session(&sb, remote.as_deref(), tty)
        }
        SandboxCmd::WaitSsh { name, timeout } => {
            let sb = Sandbox::open_in(dirs, &name).await?;
            sb.wait_for_ssh(seconds(timeout, "timeout")?).await?;
            Ok(Done::text("ready", json!({ "ssh": true })))
        }
        SandboxCmd::Create { name, vm, no_start, .. } => {
            let boot_timeout = seconds(vm.boot_timeout, "boot_timeout")?;
            // Refused as a start would refuse it, `--no-start` or not: it was asked for.
            smolvm::config::check_boot_timeout(boot_timeout)?;
            let mut sb = Sandbox::create_in(dirs, vm_config(&vm, name)?, false)?;
            if !no_start {
                let started = unless_interrupted(sb.start(boot_timeout, &progress)).await;
                if !matches!(started, Some(Ok(()))) {
                    // A sandbox that never started is not worth keeping around, nor one whose
                    // start its maker gave up on.
                    let id = sb.id().to_string();
                    if unless_interrupted(sb.delete()).await.is_none() {
                        return Err(match started {
                            // Interrupted once, while removing what a failed start left: the
                            // failure is what to say, and how to finish the removal.
                            Some(Err(e)) => Error::Interrupted(format!(
                                "while the sandbox '{id}' that failed to start was removed ({}); `smolvm sandbox delete --force {id}` removes it",
                                e.full_message()
                            )),
                            _ => interrupted_twice(&id),
                        });
                    }
                    return Err(match started {
                        Some(Err(e)) => e,
                        _ => Error::Interrupted(format!("the sandbox '{id}' was not started, and is removed")),
                    });
                }
            }
            let info = sb.info().await?;
            Ok(Done::text(sb.id().to_string(), info))
        }
        SandboxCmd::List { all, .. } => {
            let recs = sandbox::list(&dirs)?;
            let listed = recs.len();
            let recs: Vec<_> = recs.into_iter().filter(|r| all || state_rank(r.state)).collect();
            // A sandbox found dead (its VMM or supervisor killed) is `error` from then on: said,
            // so that it does not just vanish from the list. (`--json` keeps its array: `--all`
            // has them.)
            let hidden = listed - recs.len();
            let notes = match hidden {
                0 => Vec::new(),
                1 => vec!["(1 stopped or failed sandbox not shown: `smolvm sandbox list --all` lists it)".to_string()],
                n => vec![format!("({n} stopped or failed sandboxes not shown: `smolvm sandbox list --all` lists them)")],
            };
            let data = sandbox::records_json(&dirs, &recs)?;
            // (Names run to 64 characters: the column is as wide as the longest.)
            let w = recs.iter().map(|r| r.id.len()).max().unwrap_or(0).max(24);
            let mut text = format!("{:<w$} {:<8} {:>5} {:>7}", "NAME", "STATE", "CPUS", "MEMORY");
            for r in &recs {
                // (A state is padded as text: `{:<8}` on it directly pads nothing.)
                let state = r.state.to_string();
                text.push_str(&format!("\n{:<w$} {:<8} {:>5} {:>6}M", r.id, state, r.config.vcpu_count, r.config.memory));
            }
            Ok(Done { notes, ..Done::text(text, Value::Array(data)) })
        }
        SandboxCmd::Info { name, .. } => {
            let sb = Sandbox::open_in(dirs, &name).await?;
            let info = sb.info().await?;
            Ok(Done::text(info_text(&info), info))
        }
        SandboxCmd::Start { name, boot_timeout } => {
            let mut sb = Sandbox::open_in(dirs, &name).await?;
            let boot_timeout = seconds(boot_timeout, "boot_timeout")?;
            if unless_interrupted(sb.start(boot_timeout, &progress)).await.transpose()?.is_none() {
                // Left as it was found (a start that went on booting would leave it running).
                if unless_interrupted(sb.stop_after_start(sandbox::DEFAULT_STOP_TIMEOUT)).await.is_none() {
                    return Err(interrupted_twice(&name));
                }
                return Err(Error::Interrupted(format!("the sandbox '{name}' was not started")));
            }
            Ok(Done::text(name.clone(), json!({ "id": name, "state": "running" })))
        }
        SandboxCmd::Stop { name, timeout } => {
            let mut sb = Sandbox::open_in(dirs, &name).await?;
            // (0: no grace for the guest, as Python's `stop(timeout=0)`.)
            sb.stop(smolvm::config::seconds_or_zero(timeout, "timeout")?).await?;
            Ok(Done::text(name.clone(), json!({ "id": name, "state": "stopped" })))
        }
        SandboxCmd::Delete { names, all, force } => {
            if names.is_empty() && !all {
                return Err(Error::validation("names", "name at least one sandbox, or pass --all"));
            }
            // (`--all` with none there deletes none, and that is no error.)
            let names = if all { sandbox::list(&dirs)?.into_iter().map(|r| r.id).collect() } else { names };
            // Each name on its own: one that fails stops neither the others nor the report of
            // what went.
            let (mut deleted, mut errors) = (Vec::new(), Vec::new());
            let one = names.len() == 1;
            for name in names {
                let gone = async {
                    let sb = Sandbox::open_in(dirs.clone(), &name).await?;
                    let state = sb.state()?;
                    if state.is_live() && !force {
                        return Err(Error::StillLive { id: name.clone(), state: state.to_string() });
                    }
                    sb.delete().await
                };
                match gone.await {
                    Ok(()) => deleted.push(name),
                    // Listed, then deleted by another process (a delete, a prune) before us:
                    // not ours to report, either way.
                    Err(Error::NotFound(_)) if all => {}
                    Err(e) if one => return Err(e),
                    Err(e) => errors.push((name, e)),
                }
            }
            let failed: Vec<Value> =
                errors.iter().map(|(name, e)| json!({ "name": name, "code": e.code(), "message": e.full_message() })).collect();
            let mut done = Done::text(deleted.join("\n"), json!({ "deleted": deleted, "failed": failed }));
            if !errors.is_empty() {
                done.exit_code = 1;
                done.errors = errors.into_iter().map(|(_, e)| e).collect();
            }
            Ok(done)
        }
        SandboxCmd::Prune { .. } => {
            let pruned = sandbox::prune(&dirs)?;
            let mut done = Done::text(pruned.removed.join("\n"), json!({ "removed": pruned.removed, "leftovers": pruned.leftovers }));
            done.notes = pruned.leftovers.iter().map(|p| format!("removed leftover files: {p}")).collect();
            Ok(done)
        }
        SandboxCmd::Exec { name, exec, env, channel, command } => {
            let opts = run_options(&exec, &env)?;
            let mut sb = Sandbox::open_in(dirs, &name).await?;
            apply_channel(&mut sb, channel.as_deref())?;
            let ran = match exec.tty {
                true => run_on_terminal(&sb, &command_line(&command), &opts, "the command was ended").await,
                false => run_streamed(&sb, &command_line(&command), &opts, exec.stdin).await,
            };
            // The library's operation is `run`; here the user typed `exec`.
            ran.map_err(|e| match e {
                Error::Timeout { operation, seconds } if operation == "run" => Error::Timeout { operation: "exec".into(), seconds },
                e => e,
            })
        }
        SandboxCmd::Shell { name, env, command } => {
            let sb = Sandbox::open_in(dirs.clone(), &name).await?;
            if sb.channel() == smolvm::config::Channel::Ssh {
                if !env.is_empty() {
                    return Err(Error::validation(
                        "env",
                        "variables given with -e are not passed over SSH (this sandbox's comm_channel); set them with `smolvm sandbox env set`",
                    ));
                }
                // A terminal over SSH too, where we have one. A command runs in a login shell,
                // as over the agent (the sandbox's variables are in its profile).
                let remote = (!command.is_empty()).then(|| smolvm::ssh::remote_command(&command_line(&command), true, 0, None));
                return ssh_session(&sb, remote.as_deref(), std::io::IsTerminal::is_terminal(&std::io::stdin()));
            }
            // A login shell, as `ssh` would give: the profile's PATH, prompt and variables. No
            // timeout: it waits for its user.
            let (shell, command) = match command.is_empty() {
                true => (Shell::Raw, "exec \"${SHELL:-/bin/sh}\" -l".to_string()),
                false => (Shell::Login, command_line(&command)),
            };
            let opts = RunOptions { timeout: Duration::ZERO, shell, env: env_flags(&env)?, ..Default::default() };
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                run_on_terminal(&sb, &command, &opts, "the shell was ended").await
            } else {
                // As `ssh` does without a terminal of ours: the input is a script, whose end ends
                // the shell, and stdout and stderr stay apart. (`exec -t` forces a terminal.)
                run_streamed(&sb, &command, &opts, true).await
            }
        }
        SandboxCmd::Logs { name, tail, follow } => {
            let sb = Sandbox::open_in(dirs, &name).await?;
            let path = sb.paths().console.clone();
            let log = sandbox::console_log(&path)?;
            // The guest's bytes as it wrote them, whatever the flags (not made UTF-8, nor its
            // line ends changed). (A reader that went away, `| head`, ends this as it would
            // `cat`: quietly, 141; any other failure to write is said.)
            let text = match tail {
                Some(n) => sandbox::last_lines_of(&log, n),
                None => &log[..],
            };
            write_out(text);
            // (A line the guest is still writing ends the output on a line of its own; when
            // following, its rest follows.)
            if !follow && !text.ends_with(b"\n") && !text.is_empty() {
                write_out(b"\n");
            }
            if follow {
                // From what was read: what the guest wrote while it was printed follows.
                let mut pos = log.len() as u64;
                // Following ends when the sandbox stops, or is deleted meanwhile (its console
                // went with it): either way the log has ended, which is no error.
                // What it wrote before it stopped is read once more, not left behind.
                loop {
                    let live = match sb.state() {
                        Ok(state) => state.is_live(),
                        Err(Error::NotFound(_)) => false,
                        Err(e) => return Err(e),
                    };
                    if live {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let (data, next) = sandbox::console_since(&path, pos);
                    if !data.is_empty() {
                        write_out(&data);
                    }
                    pos = next;
                    if !live {
                        break;
                    }
                }
            }
            Ok(Done::default())
        }
        SandboxCmd::Env(e) => env_cmd(e, dirs).await,
        SandboxCmd::Pause { name } => {
            Sandbox::open_in(dirs, &name).await?.pause().await?;
            Ok(Done::text(name.clone(), json!({ "id": name, "state": "paused" })))
        }
        SandboxCmd::Resume { name } => {
            Sandbox::open_in(dirs, &name).await?.resume().await?;
            Ok(Done::text(name.clone(), json!({ "id": name, "state": "running" })))
        }
        SandboxCmd::Snapshot(s) => snapshot_cmd(s, dirs).await,
        SandboxCmd::Port(PortCmd::Expose { name, spec, .. }) => {
            let p = parse_publish(&spec)?;
            let host = Sandbox::open_in(dirs, &name).await?.expose_local(p.guest, p.host).await?;
            Ok(Done::text(host.to_string(), json!({ "guest": p.guest, "host": host })))
        }
        SandboxCmd::Port(PortCmd::Close { name, guest, .. }) => {
            Sandbox::open_in(dirs, &name).await?.unexpose_local(guest).await?;
            Ok(Done::text(String::new(), json!({ "closed": guest })))
        }
        SandboxCmd::Port(PortCmd::Wait { name, ports, timeout }) => {
            let timeout = seconds(timeout, "timeout")?;
            Sandbox::open_in(dirs, &name).await?.wait_for_ports(&ports, timeout).await?;
            Ok(Done::text(String::new(), json!({ "listening": ports })))
        }
        SandboxCmd::Port(PortCmd::List { name, .. }) => {
            let ports = Sandbox::open_in(dirs, &name).await?.ports()?;
            let text = ports.iter().map(|(g, h)| format!("127.0.0.1:{h} -> {g}")).collect::<Vec<_>>().join("\n");
            let data: Vec<_> = ports.iter().map(|(g, h)| json!({ "guest": g, "host": h })).collect();
            Ok(Done::text(text, Value::Array(data)))
        }
        SandboxCmd::File(FileCmd::Upload { name, src, dst, channel }) => {
            let mut sb = Sandbox::open_in(dirs, &name).await?;
            apply_channel(&mut sb, channel.as_deref())?;
            // Interrupted, the transfer is given up as a caller that drops it: what it had
            // written goes again (a signal's default end left the temporary files).
            if unless_interrupted(sb.upload(&src, &dst)).await.transpose()?.is_none() {
                return Err(Error::Interrupted(format!("the upload to {dst} was given up, and nothing of it is left")));
            }
            Ok(Done { data: json!({ "uploaded": src, "to": dst }), ..Default::default() })
        }
        SandboxCmd::File(FileCmd::Download { name, src, dst, channel }) => {
            let mut sb = Sandbox::open_in(dirs, &name).await?;
            apply_channel(&mut sb, channel.as_deref())?;
            if unless_interrupted(sb.download(&src, &dst)).await.transpose()?.is_none() {
                return Err(Error::Interrupted(format!("the download of {src} was given up, and nothing of it is left")));
            }
            Ok(Done { data: json!({ "downloaded": src, "to": dst }), ..Default::default() })
        }
    }
}

async fn snapshot_cmd(cmd: SnapshotCmd, dirs: Dirs) -> Result<Done, Error> {
    match cmd {
        SnapshotCmd::Create { name, snapshot_id, snapshot_type, .. } => {
            let sb = Sandbox::open_in(dirs, &name).await?;
            // Interrupted, the command ends and with it its connection: the supervisor then
            // cancels the save and lets the VM run on (it stayed stopped for the whole save).
            let Some(info) = unless_interrupted(sb.snapshot(snapshot_id.as_deref(), &snapshot_type)).await.transpose()? else {
                return Err(Error::Interrupted(format!(
                    "the snapshot of '{name}' was given up: nothing was saved, and the sandbox goes on as before"
                )));
            };
            Ok(Done::text(info.snapshot_id.clone(), serde_json::to_value(&info).unwrap_or_default()))
        }
        SnapshotCmd::Restore { snapshot_id, name, no_resume, env, mounts, no_mounts, writable_mounts, publish, no_publish, .. } => {
            let env_vars = if env.is_empty() { None } else { Some(env_flags(&env)?) };
            let replaced = no_mounts || !mounts.is_empty();
            let ports = no_publish || !publish.is_empty();
            let opts = sandbox::RestoreOptions {
                name,
                env_vars,
                resume: !no_resume,
                mounts: if replaced { Some(host_mounts(&mounts)?) } else { None },
                // New mounts are read-only unless asked; the snapshot's keep their setting.
                writable_mounts: if writable_mounts || replaced { Some(writable_mounts) } else { None },
                port_forwards: if ports { Some(publish.iter().map(|p| parse_publish(p)).collect::<Result<_, _>>()?) } else { None },
                ..Default::default()
            };
            // Interrupted, the sandbox it made (if it got that far) goes, as for `create`.
            let made = std::sync::Mutex::new(None::<String>);
            let report = |id: &str| *made.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.to_string());
            let restored = unless_interrupted(Sandbox::from_snapshot_reporting(dirs.clone(), &snapshot_id, opts, &report)).await;
            let Some(restored) = restored else {
                let Some(id) = made.lock().unwrap_or_else(|e| e.into_inner()).take() else {
                    return Err(Error::Interrupted(format!("the restore of '{snapshot_id}' was given up before it made a sandbox")));
                };
                let gone = async { Sandbox::open_in(dirs.clone(), &id).await?.delete().await };
                return Err(match unless_interrupted(gone).await {
                    None => interrupted_twice(&id),
                    Some(Ok(()) | Err(Error::NotFound(_))) => {
                        Error::Interrupted(format!("the sandbox '{id}' was not started, and is removed"))
                    }
                    Some(Err(e)) => Error::Interrupted(format!(
                        "the sandbox '{id}' was not started, and removing it failed: {} (smolvm sandbox delete --force {id} removes it)",
                        e.full_message()
                    )),
                });
            };
            let sb = restored?;
            let info = sb.info().await?;
            Ok(Done::text(sb.id().to_string(), info))
        }
        SnapshotCmd::List { .. } => {
            let snaps = sandbox::list_snapshots(&dirs)?;
            // (Ids run to 64 characters: the column is as wide as the longest, as in `list`.)
            let w = snaps.iter().map(|s| s.id.len()).max().unwrap_or(0).max(24);
            let mut text = format!("{:<w$} {:<6} {}", "SNAPSHOT", "TYPE", "FROM");
            for s in &snaps {
                text.push_str(&format!("\n{:<w$} {:<6} {}", s.id, s.kind, s.vm_id));
            }
            Ok(Done::text(text, serde_json::to_value(&snaps).unwrap_or_default()))
        }
        SnapshotCmd::Delete { snapshot_id } => {
            sandbox::delete_snapshot(&dirs, &snapshot_id)?;
            Ok(Done::text(snapshot_id.clone(), json!({ "deleted": snapshot_id })))
        }
    }
}

async fn env_cmd(cmd: EnvCmd, dirs: Dirs) -> Result<Done, Error> {
    match cmd {
        EnvCmd::Set { name, pairs, replace, .. } => {
            let vars = env_flags(&pairs)?;
            let sb = Sandbox::open_in(dirs, &name).await?;
            let names = sb.set_env_vars(&vars, !replace).await?;
            Ok(Done::text(names.join("\n"), json!({ "names": names })))
        }
        EnvCmd::Unset { name, keys, .. } => {
            // Keys first, as `env set` checks its pairs: a bad key is the error, wherever it goes.
            for k in &keys {
                smolvm::env::validate_key(k)?;
            }
            let sb = Sandbox::open_in(dirs, &name).await?;
            let removed = sb.unset_env_vars(&keys).await?;
            // Values are secrets: report which keys went, not what they held.
            let keys: Vec<&String> = removed.keys().collect();
            Ok(Done::text(keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join("\n"), json!({ "removed": keys })))
        }
        EnvCmd::List { name, show_values, .. } => {
            let sb = Sandbox::open_in(dirs, &name).await?;
            let vars = sb.list_env_vars().await?;
            let shown: serde_json::Map<String, Value> =
                vars.iter().map(|(k, v)| (k.clone(), Value::String(if show_values { v.clone() } else { "****".into() }))).collect();
            let text = shown.iter().map(|(k, v)| format!("{k}={}", one_line(v.as_str().unwrap_or("")))).collect::<Vec<_>>().join("\n");
            Ok(Done::text(text, Value::Object(shown)))
        }
    }
}

/// A value as one line of `env list`: as it is, unless it holds a newline or another character
/// that would break the one-variable-a-line layout or act on the terminal (a control character,
/// a bidirectional override): then in bash's `$'...'` quoting, which says exactly what it holds.
fn one_line(value: &str) -> String {
    use smolvm::error::acts_on_terminal;
    if !value.chars().any(acts_on_terminal) {
        return value.to_string();
    }
    let mut out = String::from("$'");
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() && (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if acts_on_terminal(c) => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `work`, unless Ctrl-C, SIGTERM or SIGHUP comes first: then None, `work` dropped (a start's
/// supervisor boots on; the caller undoes it). A second signal during that undoing ends the
/// process (the caller passes the undoing here too): whoever presses Ctrl-C twice means it.
async fn unless_interrupted<T>(work: impl std::future::Future<Output = T>) -> Option<T> {
    use tokio::signal::unix::{signal, SignalKind};
    let signalled = |kind| async move {
        match signal(kind) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    // The terminal or SSH session that ran it closed: as a Ctrl-C, once. Not under `nohup`
    // (whose ignoring of it a handler would undo), and a second hangup (a shell passes one on,
    // and the kernel sends another as the session ends) must not cut short the undoing of the
    // first: a handler, once there, keeps it from killing this process.
    static HUNG_UP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let hangup = async {
        if ignored_at_start(libc::SIGHUP) || HUNG_UP.load(std::sync::atomic::Ordering::SeqCst) {
            return std::future::pending().await;
        }
        signalled(SignalKind::hangup()).await;
        HUNG_UP.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let by = |signal: i32| {
        INTERRUPTED_BY.store(signal, std::sync::atomic::Ordering::SeqCst);
        None
    };
    // Ignored from the start, as a shell script's `&` jobs have it (so that a Ctrl-C at the
    // terminal reaches only the script), Ctrl-C stays ignored.
    let interrupt = async {
        if ignored_at_start(libc::SIGINT) {
            return std::future::pending().await;
        }
        signalled(SignalKind::interrupt()).await;
    };
    tokio::select! {
        r = work => Some(r),
        () = interrupt => by(libc::SIGINT),
        _ = signalled(SignalKind::terminate()) => by(libc::SIGTERM),
        () = hangup => by(libc::SIGHUP),
    }
}

/// The signal that interrupted this command (`unless_interrupted`): it exits with 128 and its
/// number, as a shell reports a command that the signal ended (130 for Ctrl-C, 143 for
/// SIGTERM, 129 for SIGHUP).
static INTERRUPTED_BY: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(libc::SIGINT);

/// The signals this process may take a handler for and whose being ignored it honours.
const HONOURED_IGNORES: [libc::c_int; 3] = [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT];

/// Whether `signal` (one of `HONOURED_IGNORES`) was ignored when this process started
/// (`nohup` ignores SIGHUP; a shell script starts its `&` jobs with SIGINT and SIGQUIT
/// ignored), read before any handler of ours replaced that. Such a signal stays ignored.
fn ignored_at_start(signal: libc::c_int) -> bool {
    static IGNORED: std::sync::OnceLock<Vec<libc::c_int>> = std::sync::OnceLock::new();
    IGNORED
        .get_or_init(|| {
            HONOURED_IGNORES
                .into_iter()
                .filter(|&s| {
                    // SAFETY: sigaction with a null new action only reads the signal's
                    // disposition into `old`, a zeroed sigaction owned here.
                    unsafe {
                        let mut old: libc::sigaction = std::mem::zeroed();
                        libc::sigaction(s, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
                    }
                })
                .collect()
        })
        .contains(&signal)
}

/// A second signal while an interrupted start was being undone: the command ends now, and says
/// what it leaves (its boot goes on).
fn interrupted_twice(id: &str) -> Error {
    Error::Interrupted(format!(
        "twice, so the sandbox '{id}' is left as it is, its boot going on (smolvm sandbox delete --force {id} removes it)"
    ))
}

fn wants_json(cmd: &Cmd) -> bool {
    match cmd {
        Cmd::Doctor { json } => *json,
        Cmd::Image(ImageCmd::Build { json, .. } | ImageCmd::List { json }) => *json,
        Cmd::Sandbox(s) => match s {
            SandboxCmd::Create { json, .. }
            | SandboxCmd::List { json, .. }
            | SandboxCmd::Info { json, .. }
            | SandboxCmd::Prune { json } => *json,
            SandboxCmd::Env(EnvCmd::Set { json, .. } | EnvCmd::Unset { json, .. } | EnvCmd::List { json, .. }) => *json,
            SandboxCmd::Snapshot(SnapshotCmd::Create { json, .. } | SnapshotCmd::Restore { json, .. } | SnapshotCmd::List { json }) => {
                *json
            }
            SandboxCmd::Port(PortCmd::List { json, .. } | PortCmd::Expose { json, .. } | PortCmd::Close { json, .. }) => *json,
            _ => false,
        },
        _ => false,
    }
}

/// Arguments clap cannot parse. Asked for `--json`, the answer is the usual envelope (code
/// `validation`, exit code 2, clap's message without its hints), so that a program reading it
/// never gets plain text; else clap's own output. Help and version go out as usual.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    let informational =
        matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand);
    if informational || !asked_for_json() {
        e.exit();
    }
    let text = e.render().to_string();
    let message = usage_message(&text);
    let err = json!({ "code": "validation", "message": message });
    out_line(json!({ "ok": false, "command": command_name(), "exit_code": 2, "data": null, "error": err }));
    std::process::exit(2);
}

/// clap's message for `--json`: its first paragraph on one line (a missing argument's name is
/// on a line of its own), without the usage and hints that follow.
fn usage_message(text: &str) -> String {
    let first = text.split("\n\n").next().unwrap_or_default();
    let words: Vec<&str> = first.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    words.join(" ").trim_start_matches("error: ").to_string()
}

/// Whether arguments that do not parse asked for the envelope: `--json` among the options of a
/// subcommand that has it. Not a `--json` of the guest's command (`exec NAME -- cmd --json`) or
/// one typed to a command without the option (`run CMD --json`): those get clap's text.
fn asked_for_json() -> bool {
    let (cmd, _) = typed_command();
    let has_option = cmd.get_arguments().any(|a| a.get_long() == Some("json"));
    has_option && std::env::args_os().skip(1).take_while(|a| a != "--").any(|a| a == "--json")
}

/// The subcommand path as typed (`sandbox env list`), without its arguments.
fn command_name() -> String {
    typed_command().1
}

/// The deepest subcommand the arguments name, and its path as typed.
fn typed_command() -> (clap::Command, String) {
    let mut cmd = Cli::command();
    let mut words = Vec::new();
    // (Arguments as given: a path need not be UTF-8.)
    for arg in std::env::args_os().skip(1) {
        let arg = arg.to_string_lossy().into_owned();
        match cmd.find_subcommand(&arg).cloned() {
            Some(sub) => {
                words.push(arg);
                cmd = sub;
            }
            None => break,
        }
    }
    (cmd, words.join(" "))
}

fn print_error(e: &Error) {
    let message = e.full_message();
    say(&format!("error: {message}\n"));
    // (Not where the message says it already: `start it first (smolvm sandbox start x)`.)
    if let Some(r) = e.recovery().filter(|r| !message.contains(r.as_str())) {
        say(&format!("hint: {r}\n"));
    }
}

fn main() {
    smolvm::config::restrict_umask();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => usage_error(e),
    };
    // A filter that does not parse is said once and replaced by the default, rather than
    // dropped without a word (or failing a command over its logging).
    let filter = match tracing_subscriber::EnvFilter::try_from_env("SMOLVM_LOG") {
        Ok(f) => f,
        Err(e) => {
            if std::env::var_os("SMOLVM_LOG").is_some_and(|v| !v.is_empty()) {
                say(&format!("smolvm: SMOLVM_LOG is not a log filter ({e}); logging warnings only\n"));
            }
            "warn".into()
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        // Colours only for a person: a file (a supervisor's log) or a pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let json = wants_json(&cli.command);
    // (Out of file descriptors, say, under a tiny `ulimit -n`: said, not a panic.)
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting smolvm: {e}");
            std::process::exit(1);
        }
    };
    let dirs = Dirs::from_env();
    if let Cmd::HostSide = &cli.command {
        drop(rt);
        std::process::exit(smolvm::rootless::host_side_main());
    }
    if let Cmd::NatTrial = &cli.command {
        drop(rt);
        std::process::exit(smolvm::rootless::trial_main());
    }
    if let Cmd::Supervise { id } = &cli.command {
        // The supervisor builds its own runtime on this (main) thread.
        drop(rt);
        std::process::exit(smolvm::supervisor::main(id));
    }
    // (Read before a handler of ours can be installed.)
    ignored_at_start(libc::SIGHUP);
    let outcome = rt.block_on(dispatch(cli.command, dirs));
    let code = match outcome {
        Ok(done) => {
            if json {
                // Part of the work failed: the envelope's error says what (each is in `data`).
                let error = done.errors.first().map(|first| {
                    let messages: Vec<String> = done.errors.iter().map(Error::full_message).collect();
                    let mut e = json!({ "code": first.code(), "message": messages.join("; ") });
                    if let Some(r) = first.recovery() {
                        e["recovery"] = json!(r);
                    }
                    e
                });
                out_line(
                    json!({ "ok": done.exit_code == 0, "command": command_name(), "exit_code": done.exit_code, "data": done.data, "error": error }),
                );
            } else {
                if let Some(text) = done.text.filter(|t| !t.is_empty()) {
                    out_line(text);
                }
                for note in &done.notes {
                    eprintln!("{note}");
                }
                for e in &done.errors {
                    print_error(e);
                }
            }
            done.exit_code
        }
        Err(e) => {
            let code = match e {
                // (A start that ran past its bound is smolvm's failure, not the command's time.)
                Error::Timeout { ref operation, .. } if operation != "start" => 124,
                // As a shell reports a command that the signal ended.
                Error::Interrupted(_) => 128 + INTERRUPTED_BY.load(std::sync::atomic::Ordering::SeqCst),
                // As shells and `env` say of a command they found but could not run.
                Error::CannotStart(_) => 126,
                _ => 1,
            };
            if json {
                let mut err = json!({ "code": e.code(), "message": e.full_message() });
                if let Some(r) = e.recovery() {
                    err["recovery"] = Value::String(r);
                }
                out_line(json!({ "ok": false, "command": command_name(), "exit_code": code, "data": null, "error": err }));
            } else {
                print_error(&e);
            }
            code
        }
    };
    // A snapshot given up while its files were being put in place finishes removing them.
    smolvm::snapshot_files::wait_for_given_up(Duration::from_secs(30));
    std::process::exit(code);
}

/// `info` for a person: one `key  value` line per field that has a value (`--json` gives all).
fn info_text(info: &serde_json::Value) -> String {
    let Some(fields) = info.as_object() else { return info.to_string() };
    let width = fields.keys().map(|k| k.len()).max().unwrap_or(0);
    let mut lines = Vec::new();
    for (key, value) in fields {
        let shown = match value {
            serde_json::Value::Null => continue,
            serde_json::Value::String(s) => s.clone(),
            // As `port list` shows them.
            serde_json::Value::Array(items) if key == "ports" && !items.is_empty() => {
                items.iter().map(|p| format!("127.0.0.1:{} -> {}", p["host"], p["guest"])).collect::<Vec<_>>().join(", ")
            }
            serde_json::Value::Array(items) if key == "mounts" && !items.is_empty() => items
                .iter()
                .map(|m| {
                    let mode = if m["writable"] == true { "rw" } else { "ro" };
                    // (A directory's name may hold what would act on the terminal.)
                    let shown = |v: &serde_json::Value| smolvm::error::printable(v.as_str().unwrap_or_default(), usize::MAX);
                    format!("{} -> {} ({mode})", shown(&m["host"]), shown(&m["guest"]))
                })
                .collect::<Vec<_>>()
                .join(", "),
            serde_json::Value::Array(items) if items.iter().all(|i| i.is_string()) => {
                if items.is_empty() {
                    continue;
                }
                items.iter().filter_map(|i| i.as_str()).collect::<Vec<_>>().join(", ")
            }
            other => other.to_string(),
        };
        lines.push(format!("{key:<width$}  {shown}"));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_listed_value_stays_on_its_line_and_says_what_it_holds() {
        assert_eq!(super::one_line("plain value, 'quoted' $HOME"), "plain value, 'quoted' $HOME");
        assert_eq!(super::one_line("line one\nit's\t\\ \u{1b}[31m\u{85}é"), "$'line one\\nit\\'s\\t\\\\ \\x1b[31m\\u0085é'");
        // Invisible, but they reorder what follows (a value could seem to say another thing).
        assert_eq!(super::one_line("pay\u{202e}1 01\u{2028}x"), "$'pay\\u202e1 01\\u2028x'");
    }

    #[test]
    fn ports_are_plain_digits_in_range() {
        for ok in ["1", "80", "65535"] {
            assert_eq!(super::port_arg(ok), Ok(ok.parse().unwrap()));
        }
        for bad in ["0", "65536", "+80", "080", " 80", "-1", "", "8o"] {
            assert!(super::port_arg(bad).is_err(), "{bad:?}");
            assert!(super::parse_publish(bad).is_err(), "{bad:?}");
            assert!(super::parse_publish(&format!("{bad}:80")).is_err(), "{bad:?}");
        }
        let p = super::parse_publish("8080:80").unwrap();
        assert_eq!((p.host, p.guest), (Some(8080), 80));
    }

    #[test]
    fn info_text_shows_fields_with_values_one_per_line() {
        let info = serde_json::json!({"id": "dev", "state": "running", "error": null, "env_keys": ["A", "B"], "vcpu_count": 2,
            "internet_settings": {"mode": "off"}, "ports": []});
        assert_eq!(
            super::info_text(&info),
            "env_keys           A, B\nid                 dev\ninternet_settings  {\"mode\":\"off\"}\nstate              running\nvcpu_count         2"
        );
        let info = serde_json::json!({"id": "web", "ports": [{"guest": 8000, "host": 41549}, {"guest": 22, "host": 2222}]});
        assert_eq!(super::info_text(&info), "id     web\nports  127.0.0.1:41549 -> 8000, 127.0.0.1:2222 -> 22");
        let info = serde_json::json!({"id": "m", "mounts": [{"host": "/src", "guest": "/workspace/src", "writable": false}]});
        assert_eq!(super::info_text(&info), "id      m\nmounts  /src -> /workspace/src (ro)");
    }
}

#[cfg(test)]
mod help_tests {
    use clap::CommandFactory;

    /// Every option and positional a user can see says what it is for: `--help` is where a
    /// user of the CLI looks first, and a bare `--kernel <KERNEL>` says nothing.
    #[test]
    fn every_visible_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "smolvm", &mut missing);
        assert!(missing.is_empty(), "arguments without help:\n{}", missing.join("\n"));
    }
}
