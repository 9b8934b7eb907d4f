// SPDX-License-Identifier: Apache-2.0
//! [`Store`]: the async, cloneable handle. Locked until [`Store::open`], locked again after
//! [`Store::close`]; every call on a locked handle returns [`Error::Locked`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::broadcast;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::journal::{self, JournalCheck, Revision};
use crate::repos::{self, AppRecord, AppWrite, RemoteConfigRecord, SessionRecord, SigningKey, SigningKeyRotation};
use crate::{Role, schema};

/// How many problems an integrity report keeps.
const MAX_PROBLEMS: usize = 8;

/// Something other components may want to know about the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// The store was opened (`path`, `role`).
    Opened {
        /// The database.
        path: PathBuf,
        /// Leader (read-write) or follower (read-only).
        role: Role,
    },
    /// The store was closed; the handle is locked.
    Closed,
    /// A periodic check passed.
    MaintenanceOk(MaintenanceReport),
    /// A periodic check failed; `error` is the failure's message.
    MaintenanceFailed {
        /// Which step: `quick_check` or `wal_checkpoint`.
        step: &'static str,
        /// The error's message (no stored values).
        error: String,
    },
}

/// Outcome of one maintenance round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Frames in the WAL before the checkpoint (0 on a follower: it does not checkpoint).
    pub wal_frames: i64,
    /// Frames copied into the database.
    pub checkpointed: i64,
}

struct Db {
    conn: Connection,
    role: Role,
    path: PathBuf,
}

impl Db {
    /// Runs `f` in an IMMEDIATE transaction and commits; refuses on a follower.
    fn write<R>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&rusqlite::Transaction<'_>, &str) -> Result<R>,
    ) -> Result<R> {
        if self.role == Role::Follower {
            return Err(Error::NotLeader);
        }
        let at = now();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(Error::query(op))?;
        let out = f(&tx, &at)?;
        tx.commit().map_err(Error::query(op))?;
        Ok(out)
    }
}

struct Shared {
    slot: Mutex<Option<Db>>,
    events: broadcast::Sender<StoreEvent>,
}

impl Shared {
    fn slot(&self) -> MutexGuard<'_, Option<Db>> {
        // A panic while holding the lock leaves SQLite consistent (an open transaction rolls
        // back when dropped), so a poisoned lock is safe to keep using.
        self.slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The control store handle. Cheap to clone; all clones share one connection and one lock
/// state. Calls run on tokio's blocking pool, one at a time (SQLite with `synchronous=FULL`
/// fsyncs on every commit, which must not stall the async workers).
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("open", &self.shared.slot().is_some()).finish()
    }
}

impl Default for Store {
    fn default() -> Store {
        Store::locked()
    }
}

fn now() -> String {
    // Formatting a current UTC time as RFC 3339 only fails for years outside 0..=9999.
    OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

impl Store {
    /// A handle with no database: every call returns [`Error::Locked`] until [`Store::open`].
    pub fn locked() -> Store {
        let (events, _) = broadcast::channel(64);
        Store { shared: Arc::new(Shared { slot: Mutex::new(None), events }) }
    }

    /// Subscribes to [`StoreEvent`]s (open, close, maintenance results).
    pub fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.shared.events.subscribe()
    }

    /// Whether a database is open (the handle is unlocked).
    pub fn is_open(&self) -> bool {
        self.shared.slot().is_some()
    }

    /// Opens the database at `path` (normally `mounts/control/control.db`). A leader creates
    /// and migrates it (WAL, `synchronous=FULL`); a follower opens it read-only.
    pub async fn open(&self, path: &Path, role: Role) -> Result<()> {
        let path = path.to_path_buf();
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let mut slot = shared.slot();
            if let Some(db) = slot.as_ref() {
                return Err(Error::AlreadyOpen { path: db.path.clone() });
            }
            let conn = schema::open(&path, role)?;
            *slot = Some(Db { conn, role, path: path.clone() });
            let _ = shared.events.send(StoreEvent::Opened { path, role });
            Ok(())
        })
        .await
    }

    /// Closes the database: checkpoints and truncates the WAL (leader), then closes the
    /// connection. The handle is locked afterwards even when this returns an error.
    pub async fn close(&self) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let Some(db) = shared.slot().take() else { return Ok(()) };
            let checkpoint = if db.role == Role::Leader { checkpoint(&db.conn).map(|_| ()) } else { Ok(()) };
            let closed = db.conn.close().map_err(|(_, source)| Error::Close { source });
            let _ = shared.events.send(StoreEvent::Closed);
            checkpoint.and(closed)
        })
        .await
    }

    async fn read<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let slot = shared.slot();
            let db = slot.as_ref().ok_or(Error::Locked)?;
            f(&db.conn)
        })
        .await
    }

    async fn write<R, F>(&self, op: &'static str, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>, &str) -> Result<R> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let mut slot = shared.slot();
            let db = slot.as_mut().ok_or(Error::Locked)?;
            db.write(op, f)
        })
        .await
    }

    /// The role the store was opened with.
    pub async fn read_role(&self) -> Result<Role> {
        let shared = Arc::clone(&self.shared);
        blocking(move || shared.slot().as_ref().map(|db| db.role).ok_or(Error::Locked)).await
    }

    /// `PRAGMA user_version` of the open database.
    pub async fn read_schema_version(&self) -> Result<u32> {
        self.read(schema::user_version).await
    }

    // ---- revision journal -----------------------------------------------------------

    /// Up to `limit` journal rows after `after` (0 = from the start), oldest first.
    pub async fn read_revisions(&self, after: u64, limit: u32) -> Result<Vec<Revision>> {
        self.read(move |c| journal::read_after(c, after, limit)).await
    }

    /// One journal row.
    pub async fn read_revision(&self, revision: u64) -> Result<Option<Revision>> {
        self.read(move |c| journal::read_one(c, revision)).await
    }

    /// The newest journal row (`None` for an empty store).
    pub async fn read_head_revision(&self) -> Result<Option<Revision>> {
        self.read(journal::read_head).await
    }

    /// Walks the whole journal and verifies its checksum chain.
    pub async fn read_journal_verification(&self) -> Result<JournalCheck> {
        self.read(journal::verify).await
    }

    // ---- auth state -----------------------------------------------------------------

    /// Adds a JWT signing key (`key_id` must be new).
    pub async fn write_signing_key(
        &self,
        actor: &str,
        key_id: &str,
        algorithm: &str,
        secret: Zeroizing<Vec<u8>>,
    ) -> Result<Revision> {
        let (actor, key_id, algorithm) = (actor.to_string(), key_id.to_string(), algorithm.to_string());
        self.write("write_signing_key", move |tx, at| {
            repos::write_signing_key(tx, at, &actor, &key_id, &algorithm, &secret)
        })
        .await
    }

    /// Marks a signing key retired: it still verifies old tokens, it signs no new ones.
    pub async fn write_signing_key_retired(&self, actor: &str, key_id: &str) -> Result<Revision> {
        let (actor, key_id) = (actor.to_string(), key_id.to_string());
        self.write("write_signing_key_retired", move |tx, at| repos::write_signing_key_retired(tx, at, &actor, &key_id))
            .await
    }

    /// Rotates the JWT signing key in one transaction (one journal row): deletes keys
    /// retired more than `keep_retired` ago (no token they signed can still be valid when
    /// `keep_retired` is the longest token lifetime), retires every active key, adds this
    /// one. A key retired by this call is kept until a later rotation.
    pub async fn write_signing_key_rotated(
        &self,
        actor: &str,
        key_id: &str,
        algorithm: &str,
        secret: Zeroizing<Vec<u8>>,
        keep_retired: Duration,
    ) -> Result<SigningKeyRotation> {
        let (actor, key_id, algorithm) = (actor.to_string(), key_id.to_string(), algorithm.to_string());
        let keep = time::Duration::try_from(keep_retired).unwrap_or(time::Duration::MAX);
        let cutoff = OffsetDateTime::now_utc().checked_sub(keep).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        // Same format as the stored times (now()): the strings compare in time order to the
        // second (sub-second digits vary in length), which is all a lifetime cutoff needs.
        let cutoff = cutoff.format(&Rfc3339).unwrap_or_else(|_| "1970-01-01T00:00:00Z".into());
        self.write("write_signing_key_rotated", move |tx, at| {
            repos::write_signing_key_rotated(tx, at, &actor, (&key_id, &algorithm, &secret), &cutoff)
        })
        .await
    }

    /// Every signing key, oldest first (active and retired).
    pub async fn read_signing_keys(&self) -> Result<Vec<SigningKey>> {
        self.read(repos::read_signing_keys).await
    }

    /// Records a new session (only the hash of `session_id` is stored).
    pub async fn write_session(
        &self,
        actor: &str,
        session_id: &str,
        subject: &str,
        expires: &str,
    ) -> Result<(Revision, SessionRecord)> {
        let (actor, id, subject, expires) =
            (actor.to_string(), Zeroizing::new(session_id.to_string()), subject.to_string(), expires.to_string());
        self.write("write_session", move |tx, at| repos::write_session(tx, at, &actor, &id, &subject, &expires)).await
    }

    /// Revokes a session.
    pub async fn write_session_revoked(&self, actor: &str, session_id: &str) -> Result<Revision> {
        let (actor, id) = (actor.to_string(), Zeroizing::new(session_id.to_string()));
        self.write("write_session_revoked", move |tx, at| repos::write_session_revoked(tx, at, &actor, &id)).await
    }

    /// Deletes sessions whose `expires` is not after `now` (RFC 3339 UTC, same format as
    /// stored). Returns the revision (none if nothing expired) and the count.
    pub async fn write_expired_sessions_purged(&self, actor: &str, now: &str) -> Result<(Option<Revision>, u64)> {
        let (actor, now) = (actor.to_string(), now.to_string());
        self.write("write_expired_sessions_purged", move |tx, at| {
            repos::write_expired_sessions_purged(tx, at, &actor, &now)
        })
        .await
    }

    /// Looks a session up by its id.
    pub async fn read_session(&self, session_id: &str) -> Result<Option<SessionRecord>> {
        let id = Zeroizing::new(session_id.to_string());
        self.read(move |c| repos::read_session(c, &id)).await
    }

    // ---- remote configuration -------------------------------------------------------

    /// Replaces the remote configuration document.
    pub async fn write_remote_config(&self, actor: &str, document: serde_json::Value) -> Result<Revision> {
        let actor = actor.to_string();
        self.write("write_remote_config", move |tx, at| repos::write_remote_config(tx, at, &actor, &document)).await
    }

    /// The remote configuration, if one was ever written.
    pub async fn read_remote_config(&self) -> Result<Option<RemoteConfigRecord>> {
        self.read(repos::read_remote_config).await
    }

    // ---- app inventory --------------------------------------------------------------

    /// Adds or replaces an app.
    pub async fn write_app(&self, actor: &str, app: AppWrite) -> Result<Revision> {
        let actor = actor.to_string();
        self.write("write_app", move |tx, at| repos::write_app(tx, at, &actor, &app)).await
    }

    /// Removes an app.
    pub async fn write_app_deletion(&self, actor: &str, name: &str) -> Result<Revision> {
        let (actor, name) = (actor.to_string(), name.to_string());
        self.write("write_app_deletion", move |tx, at| repos::write_app_deletion(tx, at, &actor, &name)).await
    }

    /// One app.
    pub async fn read_app(&self, name: &str) -> Result<Option<AppRecord>> {
        let name = name.to_string();
        self.read(move |c| repos::read_app(c, &name)).await
    }

    /// Every app, by name.
    pub async fn read_apps(&self) -> Result<Vec<AppRecord>> {
        self.read(repos::read_apps).await
    }

    // ---- maintenance ----------------------------------------------------------------

    /// `PRAGMA quick_check`; problems are [`Error::IntegrityCheck`].
    pub async fn read_quick_check(&self) -> Result<()> {
        self.read(|c| integrity(c, "PRAGMA quick_check")).await
    }

    /// `PRAGMA integrity_check` (slower, full); problems are [`Error::IntegrityCheck`].
    pub async fn read_integrity_check(&self) -> Result<()> {
        self.read(|c| integrity(c, "PRAGMA integrity_check")).await
    }

    /// `PRAGMA wal_checkpoint(TRUNCATE)`: copies the WAL into the database and truncates it.
    /// An incomplete checkpoint is [`Error::CheckpointIncomplete`]. Refused on a follower.
    pub async fn write_wal_checkpoint(&self) -> Result<MaintenanceReport> {
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            let slot = shared.slot();
            let db = slot.as_ref().ok_or(Error::Locked)?;
            if db.role == Role::Follower {
                return Err(Error::NotLeader);
            }
            checkpoint(&db.conn)
        })
        .await
    }

    /// One maintenance round: quick check, then (leader) a WAL checkpoint. The result is also
    /// sent as a [`StoreEvent`]. A locked store is [`Error::Locked`] and sends nothing.
    pub async fn write_maintenance(&self) -> Result<MaintenanceReport> {
        let step_failed = |step, e: &Error| StoreEvent::MaintenanceFailed { step, error: error_chain(e) };
        if let Err(e) = self.read_quick_check().await {
            if !matches!(e, Error::Locked) {
                let _ = self.shared.events.send(step_failed("quick_check", &e));
            }
            return Err(e);
        }
        let report = match self.write_wal_checkpoint().await {
            Ok(r) => r,
            Err(Error::NotLeader) => MaintenanceReport { wal_frames: 0, checkpointed: 0 },
            Err(e) => {
                if !matches!(e, Error::Locked) {
                    let _ = self.shared.events.send(step_failed("wal_checkpoint", &e));
                }
                return Err(e);
            }
        };
        let _ = self.shared.events.send(StoreEvent::MaintenanceOk(report));
        Ok(report)
    }

    /// Runs [`Store::write_maintenance`] every `interval` while the store is open (skips while
    /// locked). Failures go out as [`StoreEvent::MaintenanceFailed`] and to the log. Abort
    /// the returned task to stop it.
    pub fn spawn_maintenance(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match store.write_maintenance().await {
                    Ok(_) | Err(Error::Locked) => {}
                    Err(e) => tracing::error!(error = %error_chain(&e), "control store maintenance failed"),
                }
            }
        })
    }
}

/// `e` and its sources, joined by ": ".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn integrity(conn: &Connection, sql: &'static str) -> Result<()> {
    let op = if sql.contains("quick") { "read_quick_check" } else { "read_integrity_check" };
    let mut stmt = conn.prepare(sql).map_err(Error::query(op))?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(Error::query(op))?;
    let mut problems = Vec::new();
    for row in rows {
        let msg = row.map_err(Error::query(op))?;
        if msg != "ok" && problems.len() < MAX_PROBLEMS {
            problems.push(msg);
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(Error::IntegrityCheck { problems }) }
}

fn checkpoint(conn: &Connection) -> Result<MaintenanceReport> {
    let (busy, log, done): (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(Error::query("write_wal_checkpoint"))?;
    if busy != 0 || (log >= 0 && done < log) {
        return Err(Error::CheckpointIncomplete { busy: busy != 0, wal_frames: log, checkpointed: done });
    }
    Ok(MaintenanceReport { wal_frames: log, checkpointed: done })
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> Result<R> + Send + 'static) -> Result<R> {
    tokio::task::spawn_blocking(f).await.map_err(|source| Error::Task { source })?
}
