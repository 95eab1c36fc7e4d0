//! State on disk: one SQLite database per data directory, shared safely by concurrent CLI
//! processes (WAL, busy timeout, immediate transactions for read-modify-write).

use crate::config::VmConfig;
use crate::error::{Error, IoContext, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Created,
    Running,
    Paused,
    Stopped,
    Error,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Running => "running",
            State::Paused => "paused",
            State::Stopped => "stopped",
            State::Error => "error",
        }
    }

    fn parse(s: &str) -> State {
        match s {
            "created" => State::Created,
            "running" => State::Running,
            "paused" => State::Paused,
            "stopped" => State::Stopped,
            _ => State::Error,
        }
    }

    /// States in which a supervisor process must be alive.
    pub fn is_live(self) -> bool {
        matches!(self, State::Running | State::Paused)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A process identified so that a recycled pid is not mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProcId {
    pub pid: i32,
    /// Start time in clock ticks since boot, field 22 of /proc/PID/stat.
    pub start: u64,
}

impl ProcId {
    pub fn of(pid: i32) -> Option<ProcId> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces and parentheses; fields start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is field 3 (state); start time is field 22.
        if fields.first() == Some(&"Z") {
            return None;
        }
        Some(ProcId { pid, start: fields.get(19)?.parse().ok()? })
    }

    pub fn alive(&self) -> bool {
        ProcId::of(self.pid) == Some(*self)
    }

    /// Whether every thread of the process has exited. Its main thread shows as a zombie as soon
    /// as it exits, while the others may still be exiting (and a child that dies with one of
    /// them, by PR_SET_PDEATHSIG, has not been told yet): `alive` is false by then.
    pub fn gone(&self) -> bool {
        let dir = format!("/proc/{}", self.pid);
        let Ok(tasks) = std::fs::read_dir(format!("{dir}/task")) else { return true };
        // (Another process by now, under a recycled pid: this one is gone.)
        let start = std::fs::read_to_string(format!("{dir}/stat"))
            .ok()
            .and_then(|stat| stat.get(stat.rfind(')')? + 2..)?.split_whitespace().nth(19)?.parse::<u64>().ok());
        if start != Some(self.start) {
            return true;
        }
        tasks.flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            stat.rfind(')').and_then(|i| stat.get(i + 2..i + 3)).is_none_or(|state| state == "Z" || state == "X")
        })
    }
}

#[derive(Debug, Clone)]
pub struct Record {
    pub id: String,
    pub state: State,
    pub config: VmConfig,
    pub ephemeral: bool,
    pub supervisor: Option<ProcId>,
    pub vmm: Option<ProcId>,
    pub created_at: i64,
    pub error: Option<String>,
    /// For an ephemeral sandbox, the process it belongs to: once that is gone, so is the sandbox.
    pub owner: Option<ProcId>,
    /// The snapshot this sandbox was started from (its disk stands on the snapshot's).
    pub snapshot: Option<String>,
    /// Its NAT network slot while it holds one (see `net::Lease`).
    pub lease: Option<u32>,
    /// Its recorded settings do not parse (see `parse_config`): `config` is the default, so
    /// nothing may start it, save it or write its settings back; it can be stopped and deleted.
    pub damaged: bool,
}

impl Record {
    /// An error for what would use a damaged record's settings.
    pub fn usable(&self) -> Result<()> {
        usable(self.damaged, "sandbox", &self.id)
    }
}

/// The error for a damaged record (see `Record::damaged`) of a `what` (sandbox or snapshot).
fn usable(damaged: bool, what: &str, id: &str) -> Result<()> {
    if !damaged {
        return Ok(());
    }
    let remedy = match what {
        "snapshot" => format!("smolvm sandbox snapshot delete {id}"),
        _ => format!("smolvm sandbox delete --force {id}"),
    };
    Err(Error::Host(format!(
        "the settings recorded for {what} '{id}' in the state database do not parse (the file was damaged; other records are unaffected): `{remedy}` removes it"
    )))
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub vm_id: String,
    pub kind: String,
    #[serde(skip)]
    pub config: VmConfig,
    pub created_at: i64,
    /// As `Record::damaged`: it cannot be restored, only deleted.
    #[serde(skip)]
    pub damaged: bool,
}

impl SnapshotRecord {
    pub fn usable(&self) -> Result<()> {
        usable(self.damaged, "snapshot", &self.id)
    }
}

pub struct Store {
    conn: Connection,
    data_dir: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    config TEXT NOT NULL,
    ephemeral INTEGER NOT NULL DEFAULT 0,
    supervisor_pid INTEGER, supervisor_start INTEGER,
    vmm_pid INTEGER, vmm_start INTEGER,
    created_at INTEGER NOT NULL,
    error TEXT,
    owner_pid INTEGER, owner_start INTEGER,
    snapshot TEXT
);
CREATE TABLE IF NOT EXISTS leases (
    slot INTEGER PRIMARY KEY,
    sandbox TEXT UNIQUE NOT NULL
);
CREATE TABLE IF NOT EXISTS last_slots (
    sandbox TEXT PRIMARY KEY,
    slot INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ports (
    sandbox TEXT NOT NULL,
    guest INTEGER NOT NULL,
    host INTEGER NOT NULL,
    PRIMARY KEY (sandbox, guest)
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at INTEGER NOT NULL
);";

/// The layout of state.db that this build reads and writes, kept in SQLite's `user_version`.
/// A later smolvm that changes the layout raises it and migrates older files on open. An older
/// smolvm refuses a newer file instead of misreading it: read with this build's types, a newer
/// sandbox record would fail to parse, and writing it back would lose its settings and env values.
/// The records' settings (`VmConfig` as JSON) are part of the layout: a field added to them
/// raises it too (the test `the_settings_json_is_part_of_the_layout` holds the two together).
/// (Files from before the version was kept have version 0 and this layout.)
const SCHEMA_VERSION: i64 = 1;

/// Tables made, or the database refused, by the layout version it records.
fn check_schema(conn: &mut Connection, path: &Path) -> Result<()> {
    let version = |conn: &Connection| conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0));
    let newer = |v: i64| {
        Error::Host(format!(
            "the state database {} was written by a newer smolvm (layout {v}; this smolvm reads layout {SCHEMA_VERSION} and older): run that smolvm, or set SMOLVM_DATA_DIR to another directory",
            path.display()
        ))
    };
    match version(conn)? {
        SCHEMA_VERSION => return Ok(()),
        v if v > SCHEMA_VERSION => return Err(newer(v)),
        _ => {}
    }
    // One write transaction, so that processes opening a new database at once each wait for the
    // first instead of finding its tables half made; the version is read again inside it, as
    // another smolvm may have moved it on meanwhile.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    match version(&tx)? {
        v if v > SCHEMA_VERSION => return Err(newer(v)),
        SCHEMA_VERSION => {}
        _ => tx.execute_batch(&format!("{SCHEMA} PRAGMA user_version = {SCHEMA_VERSION};"))?,
    }
    tx.commit()?;
    Ok(())
}

/// A sandbox's or snapshot's settings as recorded, and whether they failed to parse (a damaged
/// file: a newer layout is refused on open). Such a record still lists, stops and deletes; its
/// settings are the default, which `usable` and `update_config` keep from being booted or
/// stored over the real ones. The parser's message is not kept: it can quote the values it met,
/// env values among them.
fn parse_config(r: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<(VmConfig, bool)> {
    let json: String = r.get(column)?;
    Ok(match serde_json::from_str(&json) {
        Ok(config) => (config, false),
        Err(_) => (VmConfig::default(), true),
    })
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn proc_id(pid: Option<i32>, start: Option<i64>) -> Option<ProcId> {
    Some(ProcId { pid: pid?, start: start? as u64 })
}

/// How long a statement waits for another process's write to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// WAL mode is a property of the database file, set by whoever opens it first. Switching a new
/// database to it takes an exclusive lock and, unlike other locks, does not wait in the busy
/// handler: processes that open a new database at once (the first commands on a host) got
/// "database is locked". So the switch is retried while busy, and skipped when already done.
/// A file system that cannot do WAL (no shared memory) keeps the journal mode it has, as before.
fn set_wal(conn: &Connection) -> Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if mode.eq_ignore_ascii_case("wal") {
            return Ok(());
        }
        match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0)) {
            Ok(_) => return Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && std::time::Instant::now() < deadline => {}
            Err(e) => return Err(e.into()),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The database holds env values, maybe secrets: it is used only where no other user can read
/// or replace it. A data directory made first by another user (somewhere under /tmp, say), or
/// one that every user may write to (they could put their own `state.db` there), is refused rather
/// than written into. (Its mode is not changed: it may be a directory such as /tmp itself.)
fn check_private(dir: &Path, db: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let meta = std::fs::metadata(dir).ctx(|| format!("reading {}", dir.display()))?;
    let refuse = |why: String| {
        Err(Error::Host(format!(
            "the data directory {} {why}: it keeps env values, so smolvm uses only a directory of this user's that not every user can write to (set SMOLVM_DATA_DIR to another)",
            dir.display()
        )))
    };
    if meta.uid() != me {
        return refuse(format!("belongs to another user (uid {})", meta.uid()));
    }
    // (Group write is left alone: with a group of one's own, as many systems give, it is no
    // one else's.)
    if meta.mode() & 0o002 != 0 {
        return refuse(format!("can be written by every user (mode {:o})", meta.mode() & 0o777));
    }
    match std::fs::symlink_metadata(db) {
        Ok(m) if m.uid() != me || !m.is_file() => refuse(format!("holds a state.db that is not this user's own file (uid {})", m.uid())),
        _ => Ok(()),
    }
}

impl Store {
    pub fn open(data_dir: &Path) -> Result<Store> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(data_dir).ctx(|| format!("creating {}", data_dir.display()))?;
        let path = data_dir.join("state.db");
        check_private(data_dir, &path)?;
        let mut conn = Connection::open(&path)?;
        // The database holds env values: readable by the owner only.
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        conn.busy_timeout(BUSY_TIMEOUT)?;
        set_wal(&conn)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Every CLI command opens and closes the database, often as its only user. Closing the
        // last connection would checkpoint (two fsyncs) and delete the WAL, and the next open
        // create it again: 1-2 ms on the way to every boot. The WAL checkpoints itself as it
        // grows instead, kept short: an open that finds no other user reads all of it.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        conn.pragma_update(None, "wal_autocheckpoint", 64)?;
        // A WAL written from its start again (after a checkpoint) is cut to what that write
        // wrote: else the frames past it, old copies of env values among them, stay in the file.
        conn.pragma_update(None, "journal_size_limit", 0)?;
        // Deleted rows are overwritten, not left in free space: they held env values.
        conn.pragma_update(None, "secure_delete", true)?;
        check_schema(&mut conn, &path)?;
        Ok(Store { conn, data_dir: data_dir.to_path_buf() })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn insert(&self, id: &str, config: &VmConfig, owner: Option<ProcId>) -> Result<()> {
        self.insert_from(id, config, owner, None)
    }

    /// `insert`, of a sandbox that stands on `snapshot` (a restore's), if that snapshot is still
    /// recorded: one statement, so that no record stands on a snapshot's files without saying
    /// so (a restore killed in between left one, and `snapshot delete` then took its files), and
    /// a concurrent delete either sees this sandbox and refuses, or removed the snapshot first
    /// and this fails.
    pub fn insert_from(&self, id: &str, config: &VmConfig, owner: Option<ProcId>, snapshot: Option<&str>) -> Result<()> {
        let json = serde_json::to_string(config).expect("config serializes");
        match self.conn.execute(
            "INSERT INTO sandboxes (id, state, config, ephemeral, created_at, owner_pid, owner_start, snapshot) \
             SELECT ?1, 'created', ?2, ?3, ?4, ?5, ?6, ?7 WHERE ?7 IS NULL OR EXISTS (SELECT 1 FROM snapshots WHERE id=?7)",
            params![id, json, owner.is_some(), now(), owner.map(|o| o.pid), owner.map(|o| o.start as i64), snapshot],
        ) {
            Ok(0) => Err(Error::SnapshotNotFound(snapshot.unwrap_or_default().to_string())),
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(Error::AlreadyExists(id.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
        let (config, damaged) = parse_config(r, 2)?;
        Ok(Record {
            id: r.get(0)?,
            state: State::parse(&r.get::<_, String>(1)?),
            config,
            damaged,
            ephemeral: r.get(3)?,
            supervisor: proc_id(r.get(4)?, r.get(5)?),
            vmm: proc_id(r.get(6)?, r.get(7)?),
            created_at: r.get(8)?,
            error: r.get(9)?,
            owner: proc_id(r.get(10)?, r.get(11)?),
            snapshot: r.get(12)?,
            lease: r.get(13)?,
        })
    }

    const COLUMNS: &'static str =
        "id, state, config, ephemeral, supervisor_pid, supervisor_start, vmm_pid, vmm_start, created_at, error, owner_pid, owner_start, snapshot, (SELECT slot FROM leases WHERE leases.sandbox = sandboxes.id)";

    pub fn get(&self, id: &str) -> Result<Option<Record>> {
        let sql = format!("SELECT {} FROM sandboxes WHERE id = ?1", Self::COLUMNS);
        Ok(self.conn.query_row(&sql, [id], Self::row).optional()?)
    }

    pub fn all(&self) -> Result<Vec<Record>> {
        let sql = format!("SELECT {} FROM sandboxes ORDER BY created_at, id", Self::COLUMNS);
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([], Self::row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn set_running(&self, id: &str, supervisor: ProcId, vmm: ProcId) -> Result<()> {
        self.conn.execute(
            "UPDATE sandboxes SET state='running', supervisor_pid=?2, supervisor_start=?3, vmm_pid=?4, vmm_start=?5, error=NULL WHERE id=?1",
            params![id, supervisor.pid, supervisor.start as i64, vmm.pid, vmm.start as i64],
        )?;
        Ok(())
    }

    /// Record the supervisor as soon as it runs, so that a crash of the starter during boot
    /// still lets the next command find and stop it.
    pub fn set_supervisor(&self, id: &str, supervisor: ProcId) -> Result<()> {
        self.conn.execute(
            "UPDATE sandboxes SET supervisor_pid=?2, supervisor_start=?3 WHERE id=?1",
            params![id, supervisor.pid, supervisor.start as i64],
        )?;
        Ok(())
    }

    pub fn set_state(&self, id: &str, state: State, error: Option<&str>) -> Result<()> {
        let clear_pids = !state.is_live();
        self.conn.execute(
            "UPDATE sandboxes SET state=?2, error=?3,
               supervisor_pid = CASE WHEN ?4 THEN NULL ELSE supervisor_pid END,
               supervisor_start = CASE WHEN ?4 THEN NULL ELSE supervisor_start END,
               vmm_pid = CASE WHEN ?4 THEN NULL ELSE vmm_pid END,
               vmm_start = CASE WHEN ?4 THEN NULL ELSE vmm_start END
             WHERE id=?1",
            params![id, state.as_str(), error, clear_pids],
        )?;
        Ok(())
    }

    pub fn update_config(&self, id: &str, config: &VmConfig) -> Result<()> {
        // Never over settings that did not parse: they are the real ones, the caller's are not.
        let old = self.config_of("sandboxes", id)?;
        usable(matches!(old, Some(None)), "sandbox", id)?;
        let old = old.flatten();
        let json = serde_json::to_string(config).expect("config serializes");
        self.conn.execute("UPDATE sandboxes SET config=?2 WHERE id=?1", params![id, json])?;
        self.scrub_if(old.is_some_and(|old| old.env_vars.iter().any(|(k, v)| config.env_vars.get(k) != Some(v))));
        Ok(())
    }

    /// The config recorded in `table` (sandboxes or snapshots) for `id`: `None` without a
    /// record, `Some(None)` for settings that do not parse (a damaged record).
    fn config_of(&self, table: &str, id: &str) -> Result<Option<Option<VmConfig>>> {
        let json: Option<String> =
            self.conn.query_row(&format!("SELECT config FROM {table} WHERE id=?1"), [id], |r| r.get(0)).optional()?;
        Ok(json.map(|j| serde_json::from_str(&j).ok()))
    }

    /// Whether the record of `id` in `table` may hold env values: it has some, or its settings
    /// do not parse (a damaged record, whose values cannot be seen but may be there).
    fn may_hold_secrets(&self, table: &str, id: &str) -> Result<bool> {
        Ok(self.config_of(table, id)?.is_some_and(|c| c.is_none_or(|c| !c.env_vars.is_empty())))
    }

    /// Once env values have left the records (a sandbox or snapshot removed, a variable unset
    /// or changed), their old copies go from the disk too: secure_delete has zeroed them in the
    /// pages written since, and a checkpoint that empties the WAL takes the copies the WAL still
    /// holds. Best effort, and brief: a reader in the way (another process) leaves them to the
    /// WAL's next reset.
    fn scrub_if(&self, secrets_gone: bool) {
        if !secrets_gone {
            return;
        }
        let _ = self.conn.busy_timeout(Duration::from_millis(200));
        let _ = self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        let _ = self.conn.busy_timeout(BUSY_TIMEOUT);
    }

    /// Remove a snapshot's record unless a sandbox stands on it. Returns those sandboxes; none
    /// when the record was removed.
    pub fn remove_unused_snapshot(&self, id: &str) -> Result<Vec<String>> {
        loop {
            let secrets = self.may_hold_secrets("snapshots", id)?;
            let n =
                self.conn.execute("DELETE FROM snapshots WHERE id=?1 AND NOT EXISTS (SELECT 1 FROM sandboxes WHERE snapshot=?1)", [id])?;
            if n == 1 {
                self.scrub_if(secrets);
                return Ok(Vec::new());
            }
            if self.get_snapshot(id)?.is_none() {
                return Err(Error::SnapshotNotFound(id.to_string()));
            }
            let mut stmt = self.conn.prepare("SELECT id FROM sandboxes WHERE snapshot=?1 ORDER BY id")?;
            let users = stmt.query_map([id], |r| r.get(0))?.collect::<rusqlite::Result<Vec<String>>>()?;
            // Empty: its last user went between the two statements; try again.
            if !users.is_empty() {
                return Ok(users);
            }
        }
    }

    pub fn insert_snapshot(&self, id: &str, vm_id: &str, kind: &str, config: &VmConfig) -> Result<()> {
        let json = serde_json::to_string(config).expect("config serializes");
        match self.conn.execute(
            "INSERT INTO snapshots (id, vm_id, kind, config, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, vm_id, kind, json, now()],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(Error::validation("snapshot_id", format!("snapshot '{id}' already exists")))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn snapshot_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SnapshotRecord> {
        let (config, damaged) = parse_config(r, 3)?;
        Ok(SnapshotRecord { id: r.get(0)?, vm_id: r.get(1)?, kind: r.get(2)?, config, created_at: r.get(4)?, damaged })
    }

    pub fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        Ok(self
            .conn
            .query_row("SELECT id, vm_id, kind, config, created_at FROM snapshots WHERE id=?1", [id], Self::snapshot_row)
            .optional()?)
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let mut stmt = self.conn.prepare("SELECT id, vm_id, kind, config, created_at FROM snapshots ORDER BY created_at, id")?;
        let rows = stmt.query_map([], Self::snapshot_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Forget a sandbox; false if its record was already gone. One transaction. A lease still
    /// held stays: only a supervisor that died leaves one, and the caller has tried to remove
    /// the firewall table it stands for (`sandbox::host_network_leftovers`) and failed. It is
    /// that table's only trace, which `prune` tries again (`unrecorded_network`).
    pub fn remove(&self, id: &str) -> Result<bool> {
        let secrets = self.may_hold_secrets("sandboxes", id)?;
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute("DELETE FROM sandboxes WHERE id=?1", [id])?;
        tx.execute("DELETE FROM ports WHERE sandbox=?1", [id])?;
        tx.execute("DELETE FROM last_slots WHERE sandbox=?1", [id])?;
        tx.commit()?;
        self.scrub_if(secrets);
        Ok(n > 0)
    }

    /// Whether sandbox `id` holds a network slot, with or without a record (see `remove`).
    pub fn leased(&self, id: &str) -> Result<bool> {
        Ok(self.conn.query_row("SELECT 1 FROM leases WHERE sandbox=?1", [id], |_| Ok(())).optional()?.is_some())
    }

    /// Sandboxes that hold a lease or a port but have no record (see `remove`).
    pub fn unrecorded_network(&self) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare(
            "SELECT sandbox FROM leases WHERE sandbox NOT IN (SELECT id FROM sandboxes) UNION \
             SELECT sandbox FROM ports WHERE sandbox NOT IN (SELECT id FROM sandboxes)",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(rows)
    }

    /// Forget everything of a sandbox's network: its lease, ports and last slot.
    pub fn forget_network(&self, id: &str) -> Result<()> {
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate)?;
        Self::forget_network_in(&tx, id)?;
        tx.commit()?;
        Ok(())
    }

    fn forget_network_in(tx: &rusqlite::Transaction, id: &str) -> Result<()> {
        tx.execute("DELETE FROM leases WHERE sandbox=?1", [id])?;
        tx.execute("DELETE FROM ports WHERE sandbox=?1", [id])?;
        tx.execute("DELETE FROM last_slots WHERE sandbox=?1", [id])?;
        Ok(())
    }

    /// The sandbox's network slot (see `net::Lease`), with the host-wide claim on it that
    /// `claim` makes (`None`: another process holds that slot). Slots are per state database
    /// but addresses are per host, so a slot is taken only when it is free here, no interface
    /// of the host has its address, and its claim succeeds: that closes the window between one
    /// data directory's choice and its TAP getting the address, in which another data
    /// directory could choose the same.
    ///
    /// A sandbox keeps its address across restarts where it can: the slot of its last run is
    /// taken again unless another sandbox has it. A stop answers once QEMU is killed, and the
    /// old supervisor holds the claim (and its TAP the address) until it has reaped QEMU, so a
    /// start right after a stop waits for them, up to `handover`. Without that wait every
    /// other restart moved the sandbox to the next slot. (The TAP, named by the sandbox, had
    /// to be waited for anyway.)
    pub fn lease<C>(&mut self, id: &str, handover: Duration, mut claim: impl FnMut(u32) -> Option<C>) -> Result<(u32, C)> {
        let last: Option<u32> = self
            .conn
            .query_row(
                "SELECT slot FROM leases WHERE sandbox=?1 UNION ALL \
                 SELECT slot FROM last_slots WHERE sandbox=?1 AND slot NOT IN (SELECT slot FROM leases) LIMIT 1",
                [id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(slot) = last {
            let deadline = std::time::Instant::now() + handover;
            let mut held = None;
            // (The host's own networks, read once: what the wait is for is the old TAP's
            // address, which these leave out.)
            let clashes = crate::net::Lease(slot).clashes(&crate::net::host_networks());
            loop {
                held = held.or_else(|| claim(slot));
                let address_free = || !clashes && !crate::net::host_addresses().contains(&crate::net::Lease(slot).host());
                if held.is_some() && address_free() {
                    let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let taken = tx
                        .query_row("SELECT 1 FROM leases WHERE slot=?1 AND sandbox<>?2", params![slot, id], |_| Ok(()))
                        .optional()?
                        .is_some();
                    if taken {
                        break;
                    }
                    tx.execute("INSERT OR REPLACE INTO leases (slot, sandbox) VALUES (?1, ?2)", params![slot, id])?;
                    tx.commit()?;
                    return Ok((slot, held.take().expect("claimed above")));
                }
                // (A slot in one of the host's networks stays so: no use waiting for it.)
                if clashes || std::time::Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM leases WHERE sandbox=?1", [id])?;
        let used: std::collections::HashSet<u32> = {
            let mut stmt = tx.prepare("SELECT slot FROM leases")?;
            let rows = stmt.query_map([], |r| r.get::<_, u32>(0))?.collect::<rusqlite::Result<_>>()?;
            rows
        };
        let (on_host, nets) = (crate::net::host_addresses(), crate::net::host_networks());
        let (slot, c) = (1..=crate::net::MAX_SLOTS)
            .filter(|s| !used.contains(s) && !on_host.contains(&crate::net::Lease(*s).host()) && !crate::net::Lease(*s).clashes(&nets))
            .find_map(|s| claim(s).map(|c| (s, c)))
            .ok_or_else(|| Error::Host("no free sandbox network address left in 172.16.0.0/16".into()))?;
        tx.execute("INSERT INTO leases (slot, sandbox) VALUES (?1, ?2)", params![slot, id])?;
        tx.commit()?;
        Ok((slot, c))
    }

    /// Forget the sandbox's network slot and exposed ports.
    pub fn release_network(&self, id: &str) -> Result<()> {
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate)?;
        tx.execute("INSERT OR REPLACE INTO last_slots (sandbox, slot) SELECT sandbox, slot FROM leases WHERE sandbox=?1", [id])?;
        tx.execute("DELETE FROM leases WHERE sandbox=?1", [id])?;
        tx.execute("DELETE FROM ports WHERE sandbox=?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    /// Forget the sandbox's exposed ports alone (its lease kept, as the trace of a table).
    pub fn forget_ports(&self, id: &str) -> Result<()> {
        self.conn.execute("DELETE FROM ports WHERE sandbox=?1", [id])?;
        Ok(())
    }

    pub fn add_port(&self, id: &str, guest: u16, host: u16) -> Result<()> {
        self.conn.execute("INSERT OR REPLACE INTO ports (sandbox, guest, host) VALUES (?1, ?2, ?3)", params![id, guest, host])?;
        Ok(())
    }

    pub fn remove_port(&self, id: &str, guest: u16) -> Result<()> {
        self.conn.execute("DELETE FROM ports WHERE sandbox=?1 AND guest=?2", params![id, guest])?;
        Ok(())
    }

    /// Exposed ports as (guest, host).
    pub fn ports(&self, id: &str) -> Result<Vec<(u16, u16)>> {
        let mut stmt = self.conn.prepare("SELECT guest, host FROM ports WHERE sandbox=?1 ORDER BY guest")?;
        let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_database_opened_by_many_at_once_opens_for_all() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let opens: Vec<_> = (0..8)
                .map(|i| {
                    let (path, barrier) = (dir.path().to_path_buf(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let store = Store::open(&path)?;
                        store.insert(&format!("vm{i}"), &VmConfig::default(), None)
                    })
                })
                .collect();
            for open in opens {
                open.join().unwrap().unwrap();
            }
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.all().unwrap().len(), 8);
            let mode: String = store.conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
            assert_eq!(mode, "wal");
        }
    }

    /// A database from before the layout was versioned is this layout, and opens as it did; a
    /// layout from a newer smolvm is refused with what to do; a record whose settings no longer
    /// parse still lists, but nothing boots its default settings or stores them over the real ones.
    #[test]
    fn the_databases_layout_is_versioned() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        {
            let old = Connection::open(&db).unwrap();
            old.execute_batch(SCHEMA).unwrap();
            old.execute("INSERT INTO sandboxes (id, state, config, created_at) VALUES ('old', 'stopped', '{\"memory\":300}', 0)", [])
                .unwrap();
        }
        let version = |store: &Store| store.conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(version(&store), SCHEMA_VERSION);
        assert_eq!(store.get("old").unwrap().unwrap().config.memory, 300);

        store.conn.execute("UPDATE sandboxes SET config='{\"memory\":300,\"from_the_future\":\"s3cret\"}'", []).unwrap();
        let rec = store.get("old").unwrap().unwrap();
        assert!(rec.damaged && store.all().unwrap()[0].damaged);
        let e = rec.usable().unwrap_err().to_string();
        assert!(e.contains("the settings recorded for sandbox 'old' in the state database do not parse") && !e.contains("s3cret"), "{e}");
        assert!(e.contains("smolvm sandbox delete --force old"), "{e}");
        assert!(store.update_config("old", &VmConfig::default()).is_err());
        let json: String = store.conn.query_row("SELECT config FROM sandboxes", [], |r| r.get(0)).unwrap();
        assert!(json.contains("from_the_future"), "the damaged settings were written over");
        // Its values cannot be read, so its removal takes every copy of the record off the disk.
        assert!(store.remove("old").unwrap());
        for f in ["state.db", "state.db-wal"] {
            let bytes = std::fs::read(dir.path().join(f)).unwrap_or_default();
            assert!(!bytes.windows(6).any(|w| w == b"s3cret"), "{f} kept a damaged record's value");
        }
        store.insert("old", &VmConfig::default(), None).unwrap();

        store.conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        let e = Store::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains(&format!("written by a newer smolvm (layout {}", SCHEMA_VERSION + 1)) && e.contains("SMOLVM_DATA_DIR"), "{e}");
    }

    /// Every settings field, spelled out (no `..`): a field added to `VmConfig` or the types it
    /// holds stops this from compiling, and a renamed one fails it. Either changes what older
    /// builds can read: raise SCHEMA_VERSION, migrate the records, then update the list.
    #[test]
    fn the_settings_json_is_part_of_the_layout() {
        use crate::config::{InternetSettings, Mount, PortForward};
        let config = VmConfig {
            vm_id: Some("a".into()),
            vcpu_count: 1,
            memory: 256,
            kernel_path: Some("k".into()),
            initrd_path: Some("i".into()),
            rootfs_path: Some("r".into()),
            boot_args: Some("b".into()),
            env_vars: [("K".to_string(), "v".to_string())].into(),
            backend: Some("qemu".into()),
            network: Some("nat".into()),
            internet_settings: Some(InternetSettings { mode: "open".into(), allowed_domains: vec![], allowed_cidrs: vec![] }),
            port_forwards: vec![PortForward { guest: 80, host: Some(8080) }],
            image: Some("default".into()),
            disk_size_mib: Some(1024),
            comm_channel: Some("agent".into()),
            ssh_public_key: Some("ssh-ed25519 AAAA".into()),
            workspace_mounts: vec![Mount { host: "/h".into(), guest: Some("/g".into()) }],
            writable_mounts: false,
        };
        fn keys(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
            match v {
                // Variables' names are the user's, not the layout's.
                serde_json::Value::Object(_) if at == "env_vars" => {}
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                        keys(v, &path, out);
                        out.push(path);
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| keys(v, &format!("{at}[]"), out)),
                _ => {}
            }
        }
        let mut found = vec![];
        keys(&serde_json::to_value(&config).unwrap(), "", &mut found);
        found.sort();
        let layout_1 = "backend boot_args comm_channel disk_size_mib env_vars image initrd_path internet_settings \
            internet_settings.allowed_cidrs internet_settings.allowed_domains internet_settings.mode kernel_path memory network \
            port_forwards port_forwards[].guest port_forwards[].host rootfs_path ssh_public_key vcpu_count vm_id workspace_mounts \
            workspace_mounts[].guest workspace_mounts[].host writable_mounts";
        assert_eq!(SCHEMA_VERSION, 1, "the list below is layout 1's");
        assert_eq!(found.join(" "), layout_1.split_whitespace().collect::<Vec<_>>().join(" "));
    }

    #[test]
    fn insert_get_update_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cfg = VmConfig { memory: 256, ..Default::default() };
        store.insert("a", &cfg, None).unwrap();
        assert!(matches!(store.insert("a", &cfg, None), Err(Error::AlreadyExists(_))));
        let me = ProcId::of(std::process::id() as i32).unwrap();
        store.set_running("a", me, me).unwrap();
        let r = store.get("a").unwrap().unwrap();
        assert_eq!((r.state, r.config.memory, r.supervisor), (State::Running, 256, Some(me)));
        store.set_state("a", State::Error, Some("boom")).unwrap();
        let r = store.get("a").unwrap().unwrap();
        assert_eq!((r.state, r.supervisor, r.error.as_deref()), (State::Error, None, Some("boom")));
        // A second connection sees the same rows (as a second CLI process would).
        assert_eq!(Store::open(dir.path()).unwrap().all().unwrap().len(), 1);
        assert!(store.remove("a").unwrap());
        assert!(store.get("a").unwrap().is_none());
        // A second remove (another process's delete) finds nothing and says so.
        assert!(!store.remove("a").unwrap());
        let mode = std::fs::metadata(dir.path().join("state.db")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    /// Env values that leave the records leave the database's files too (the WAL kept every
    /// old copy, and freed pages kept theirs).
    #[test]
    fn env_values_that_are_removed_leave_no_copy_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let on_disk = |secret: &str| {
            ["state.db", "state.db-wal"].iter().any(|f| {
                let bytes = std::fs::read(dir.path().join(f)).unwrap_or_default();
                bytes.windows(secret.len()).any(|w| w == secret.as_bytes())
            })
        };
        let with = |pairs: &[(&str, &str)]| VmConfig {
            env_vars: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        // A value unset, then one changed; the one still set stays.
        store.insert("a", &with(&[("TOKEN", "s3cret-unset"), ("KEEP", "s3cret-kept")]), None).unwrap();
        assert!(on_disk("s3cret-unset"));
        store.update_config("a", &with(&[("KEEP", "s3cret-kept")])).unwrap();
        assert!(!on_disk("s3cret-unset"));
        store.update_config("a", &with(&[("KEEP", "s3cret-changed")])).unwrap();
        assert!(!on_disk("s3cret-kept") && on_disk("s3cret-changed"));
        // A snapshot's copy and the sandbox itself.
        store.insert_snapshot("s", "a", "disk", &with(&[("KEEP", "s3cret-snap")])).unwrap();
        assert!(on_disk("s3cret-snap"));
        assert!(store.remove_unused_snapshot("s").unwrap().is_empty());
        assert!(!on_disk("s3cret-snap"));
        assert!(store.remove("a").unwrap());
        assert!(!on_disk("s3cret-changed"));
        // A reader in the way (another process) keeps the WAL from being emptied then; its next
        // reset takes the old copies. The WAL is written from its start again then, and frames
        // past the new ones stayed in the file, which kept its size.
        for i in 0..12 {
            store.insert(&format!("filler{i}"), &VmConfig::default(), None).unwrap();
        }
        store.insert("r", &with(&[("TOKEN", "s3cret-read")]), None).unwrap();
        let reader = Connection::open(dir.path().join("state.db")).unwrap();
        reader.execute_batch("BEGIN; SELECT count(*) FROM sandboxes;").unwrap();
        store.update_config("r", &VmConfig::default()).unwrap();
        assert!(on_disk("s3cret-read"), "(the reader held the WAL: this case is not being tested)");
        reader.execute_batch("COMMIT").unwrap();
        // Any process's checkpoint, then any write: the WAL's reset.
        reader.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())).unwrap();
        store.set_state("filler0", State::Stopped, None).unwrap();
        assert!(!on_disk("s3cret-read"), "the WAL kept an unset value past its reset");
    }

    #[test]
    fn a_snapshot_in_use_stays_and_a_deleted_one_cannot_be_stood_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cfg = VmConfig::default();
        store.insert_snapshot("s", "src", "disk", &cfg).unwrap();
        store.insert_from("a", &cfg, None, Some("s")).unwrap();
        store.insert_from("b", &cfg, None, Some("s")).unwrap();
        assert_eq!(store.remove_unused_snapshot("s").unwrap(), ["a", "b"]);
        assert!(store.get_snapshot("s").unwrap().is_some());
        store.remove("a").unwrap();
        store.remove("b").unwrap();
        assert!(store.remove_unused_snapshot("s").unwrap().is_empty());
        assert!(store.get_snapshot("s").unwrap().is_none());
        // A restore that read the snapshot before the delete cannot then claim it.
        assert!(matches!(store.insert_from("c", &cfg, None, Some("s")), Err(Error::SnapshotNotFound(_))));
        assert!(store.get("c").unwrap().is_none());
        assert!(matches!(store.remove_unused_snapshot("s"), Err(Error::SnapshotNotFound(_))));
    }

    #[test]
    fn a_lease_takes_only_a_slot_whose_claim_succeeds_and_keeps_it_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let cfg = VmConfig::default();
        for id in ["a", "b", "c"] {
            store.insert(id, &cfg, None).unwrap();
        }
        let now = Duration::ZERO;
        // Slot 1 is held elsewhere on the host (another data directory's supervisor).
        let (slot, ()) = store.lease("a", now, |s| (s != 1).then_some(())).unwrap();
        assert!(slot > 1, "{slot}");
        let (again, ()) = store.lease("a", now, |_| Some(())).unwrap();
        assert_eq!(again, slot, "a claimable slot it holds is reused");
        // After a stop, its old supervisor still holds the claim for a moment: the next run
        // waits for it instead of moving.
        store.release_network("a").unwrap();
        let mut tries = 0;
        let (after, ()) = store
            .lease("a", Duration::from_secs(5), |s| {
                tries += 1;
                (s != 1 && tries > 3).then_some(())
            })
            .unwrap();
        assert_eq!(after, slot, "a restart keeps the address");
        // Its slot claimed elsewhere for longer than the hand-over: it moves.
        store.release_network("a").unwrap();
        let (moved, ()) = store.lease("a", Duration::from_millis(20), |s| (s != slot && s != 1).then_some(())).unwrap();
        assert_ne!(moved, slot);
        let (b, ()) = store.lease("b", now, |s| (s != 1).then_some(())).unwrap();
        assert_ne!(b, moved, "slots are unique within a database");
        assert!(store.lease("c", now, |_| None::<()>).is_err(), "no claim, no slot");
        // A stopped sandbox's last slot taken by another sandbox since: it gets a free one.
        store.release_network("b").unwrap();
        let (c, ()) = store.lease("c", now, |s| (s != 1).then_some(())).unwrap();
        assert_eq!(c, b, "the lowest free slot");
        let (b2, ()) = store.lease("b", Duration::from_secs(5), |s| (s != 1).then_some(())).unwrap();
        assert!(![1, moved, c].contains(&b2), "{b2}");
        // Deleting a sandbox (its supervisor released its lease) forgets its last slot.
        store.release_network("b").unwrap();
        store.remove("b").unwrap();
        let n: i64 = store.conn.query_row("SELECT COUNT(*) FROM last_slots WHERE sandbox='b'", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0);
        // And its ports, with its record. A lease still held stays, as the trace of a firewall
        // table not yet removed, for prune to try again.
        store.add_port("c", 80, 8080).unwrap();
        assert!(store.unrecorded_network().unwrap().is_empty());
        store.remove("c").unwrap();
        assert_eq!(store.unrecorded_network().unwrap(), ["c"]);
        // Known held without a record too: the leftovers of its dead supervisor are looked up so.
        assert!(store.leased("c").unwrap() && store.get("c").unwrap().is_none());
        store.forget_network("c").unwrap();
        assert!(!store.leased("c").unwrap());
        assert!(store.unrecorded_network().unwrap().is_empty());
        // Rows a delete cut off half way left (an older build's) are found, and forgotten.
        store.conn.execute("INSERT INTO leases (slot, sandbox) VALUES (77, 'gone')", []).unwrap();
        store.conn.execute("INSERT INTO ports (sandbox, guest, host) VALUES ('gone2', 22, 2222)", []).unwrap();
        let mut orphans = store.unrecorded_network().unwrap();
        orphans.sort();
        assert_eq!(orphans, ["gone", "gone2"]);
        for id in orphans {
            store.forget_network(&id).unwrap();
        }
        assert!(store.unrecorded_network().unwrap().is_empty());
        assert!(store.lease("a", now, |_| Some(())).is_ok());
    }

    #[test]
    fn proc_ids_detect_dead_processes() {
        let me = ProcId::of(std::process::id() as i32).unwrap();
        assert!(me.alive());
        assert!(!ProcId { pid: me.pid, start: me.start + 1 }.alive());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(ProcId::of(pid).is_none());
    }
}
