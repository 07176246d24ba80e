//! The embedded backend: one SQLite file holds the queue, the decision log and (as they arrive)
//! audit records, grants and the webhook outbox.
//!
//! Writes go through one writer thread that owns the only write connection. It takes every write
//! that arrived while the previous commit was in flight and commits them together (group commit):
//! many concurrent `Authorize` calls share one transaction and one fsync. After a commit it
//! publishes the decisions it recorded, in log order, to the fan-out hub, then answers each caller.
//! Reads use a small pool of read connections; in WAL mode they never block the writer.
//!
//! Durability: WAL with `synchronous=FULL`, so a commit that returned survives `kill -9` and power
//! loss. `secure_delete=ON` overwrites a queue row's token when the row is deleted. The file is
//! locked (`<db>.lock`) so two processes cannot share it.
//!
//! Tables:
//! - `requests`: every request_id that went through the queue, with its station, token fingerprint
//!   and acceptance time: the idempotency keys. `seq` orders them. A request decided at intake has
//!   no row here: its decision keeps its request_id (the log's `request_id` is unique too), so
//!   each path looks up the other's keys before adding its own.
//! - `queue`: the pending requests (`seq` = `requests.seq`) with the plain token, deleted when decided.
//! - `deliveries`: the webhook outbox with each delivery's attempts (see `webhook::sqlite`); a delivery is
//!   inserted in the transaction that records its decision.
//! - `calls`: the record of every RPC (see `audit::sqlite`).
//! - `decisions`: the decision log; `seq` is the position in cursors, `request_id` is unique.
//!   It is indexed by time and by status and time (both grow at their ends). It deliberately has
//!   no index by station in the commit: with stations spread over the log, such an index dirties
//!   a page per station in every commit (measured: about a fifth of intake throughput). Replays
//!   by station scan the log from the cursor in `seq` order; the audit queries by station use
//!   `decisions_by_station`, kept a second behind in a file of its own (see `station_index`).

use std::{
    collections::VecDeque,
    fs::File,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::{
    DecisionLog, GrantStore, LogBounds, RequestState, StationFilter, StoreError, StoredGrant,
    checkpoint::{self, Checkpointer},
    station_index::{self, StationIndex},
};
use crate::{
    audit::chain::{self, ChainKey, Link},
    cursor::Cursor,
    decision::{DecidedBy, Micros, NewDecision, Reason, RecordedDecision, Verdict},
    fanout::Hub,
    intake::NewRequest,
    queue::{EnqueueOutcome, QueuedRequest, Settled},
    token::{DriverToken, Fingerprint},
    webhook::Callback,
};

/// The size the WAL file is cut back to when the WAL starts over, in bytes. Under steady load the
/// WAL stays well below it (checkpoints every 4,000 pages, see `checkpoint`); under overload the
/// checkpoints fall behind and the file grew to 210–280 MB (g8), and kept that size until
/// shutdown. With the limit it gives the space back once the WAL has been copied.
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 2048;
/// Writes waiting for the writer thread before callers wait for room (backpressure).
const WRITE_QUEUE: usize = 16 * 1024;
/// Committed queue entries kept in memory for the dispatcher.
const HOT_MAX: usize = 8192;
/// Read connections kept open.
const READERS: usize = 4;
const SCHEMA_VERSION: i64 = 4;
const WRITE_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1000);
/// Page cache per connection, in KiB (as a negative `cache_size`).
const WRITE_CACHE_KIB: i64 = -4096;
const READ_CACHE_KIB: i64 = -1024;
const READ_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id     TEXT NOT NULL UNIQUE,
    station_id     TEXT NOT NULL,
    token_fp       TEXT NOT NULL,
    callback_url   TEXT,
    accepted_at_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS queue (
    seq          INTEGER PRIMARY KEY,
    driver_token TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id     TEXT NOT NULL UNIQUE,
    station_id     TEXT NOT NULL,
    token_fp       TEXT NOT NULL,
    status         TEXT NOT NULL,
    reason         TEXT NOT NULL,
    authorizer     TEXT NOT NULL,
    accepted_at_us INTEGER NOT NULL,
    decided_at_us  INTEGER NOT NULL,
    processing_ms  INTEGER NOT NULL,
    chain          BLOB
);
CREATE TABLE IF NOT EXISTS deliveries (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id      TEXT NOT NULL UNIQUE,
    station_id      TEXT NOT NULL,
    callback_url    TEXT NOT NULL,
    host            TEXT NOT NULL,
    driver_token    TEXT,
    status          TEXT NOT NULL,
    reason          TEXT NOT NULL,
    decided_at_us   INTEGER NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_us INTEGER,
    age_from_us     INTEGER NOT NULL,
    finished_at_us  INTEGER,
    last_error      TEXT NOT NULL DEFAULT '',
    history         TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_attempt_us) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries (seq) WHERE state = 'dead';
CREATE INDEX IF NOT EXISTS decisions_by_time ON decisions (decided_at_us);
CREATE INDEX IF NOT EXISTS decisions_by_status ON decisions (status, decided_at_us);
CREATE TABLE IF NOT EXISTS calls (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    at_us         INTEGER NOT NULL,
    method        TEXT NOT NULL,
    peer          TEXT NOT NULL,
    client        TEXT NOT NULL,
    station_id    TEXT NOT NULL,
    request_id    TEXT NOT NULL,
    code          TEXT NOT NULL,
    latency_us    INTEGER NOT NULL,
    stream_event  TEXT NOT NULL,
    messages_sent INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_by_time ON calls (at_us);
DROP INDEX IF EXISTS calls_by_method;
CREATE TABLE IF NOT EXISTS grants (
    station_id    TEXT NOT NULL,
    token_fp      TEXT NOT NULL,
    expires_at_us INTEGER,
    blocked       INTEGER NOT NULL,
    PRIMARY KEY (station_id, token_fp)
) WITHOUT ROWID;
";

/// A write run inside a batch; it keeps its own result (the caller reads it after the commit).
type WriteFn = Box<dyn Fn(&Transaction<'_>) -> rusqlite::Result<()> + Send>;

/// A write for the writer thread, with the channel its result goes back on.
enum WriteOp {
    /// Delete up to `.1` of the oldest decisions decided before `.0`, with their request keys.
    Purge(Micros, usize, oneshot::Sender<Result<u64, StoreError>>),
    Enqueue(
        NewRequest,
        oneshot::Sender<Result<EnqueueOutcome, StoreError>>,
    ),
    /// Record a request decided at intake: its decision (which keeps its request_id), with the
    /// delivery of its callback if any; no queue entry.
    EnqueueDecided(
        NewDecision,
        Option<Callback>,
        oneshot::Sender<Result<(EnqueueOutcome, Option<RecordedDecision>), StoreError>>,
    ),
    /// Record the decision for queue position `.0`, with the delivery of its callback if any.
    Settle(
        u64,
        NewDecision,
        Option<Callback>,
        oneshot::Sender<Result<Settled, StoreError>>,
    ),
    Ping(oneshot::Sender<Result<(), StoreError>>),
    /// Any other write (grants, webhook attempts): runs in the batch's transaction.
    Run(WriteFn, Durability, oneshot::Sender<Result<(), StoreError>>),
    /// Finish what is queued, checkpoint the WAL into the main file and stop.
    Close(oneshot::Sender<()>),
    /// A read on the write connection, after the batch it arrived with is committed. The
    /// writer's page cache is always current, where a read connection's is dropped whenever
    /// the database changed: for small reads repeated under a steady stream of writes.
    Read(ReadFn),
}

/// A read run by the writer thread; it sends its own result.
type ReadFn = Box<dyn FnOnce(&Connection) + Send>;

/// What a committed write survives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Power loss: the commit waits for fsync (`synchronous = FULL`).
    Full,
    /// A crash of the process, not of the machine: a batch made only of such writes commits
    /// without fsync; the next full commit makes it durable too (WAL order). For records whose loss
    /// repeats work instead of losing it, such as a webhook attempt that is then sent again.
    Process,
}

/// What one write did inside a transaction that has not committed yet.
enum Applied {
    Purge(u64),
    /// The outcome, and the queue position when the request was added.
    Enqueue(EnqueueOutcome, Option<u64>),
    /// The outcome, and the decision when it was recorded.
    EnqueueDecided(EnqueueOutcome, Option<RecordedDecision>),
    Settle(Settled),
    Ping,
    Run,
    Close,
}

/// A handle on the embedded database. Cheap to clone; the writer thread runs until [`close`].
///
/// [`close`]: Database::close
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    /// To the writer thread, which owns the write connection. When every handle is dropped, the
    /// thread finishes its batch and exits.
    writer: mpsc::Sender<WriteOp>,
    readers: Mutex<Vec<Connection>>,
    /// The decision log's index by station, which read connections attach as `stations`.
    stations: StationIndex,
    path: PathBuf,
    log_id: u32,
    shared: Arc<Shared>,
    /// Held for the life of the process: the SQLite file belongs to this process alone.
    _lock: File,
}

/// State the writer thread publishes for everyone else.
struct Shared {
    /// Requests in the queue table (pending or being decided).
    pending: AtomicU64,
    /// Position of the newest recorded decision.
    decision_head: AtomicU64,
    /// Decisions at or before this position were purged (retention).
    floor: AtomicU64,
    /// `seq` of the newest committed queue entry; the queue's dispatcher waits on it.
    enqueue_head: watch::Sender<u64>,
    /// Entries just committed, handed to the queue's dispatcher without reading them back. Bounded
    /// by [`HOT_MAX`]: what does not fit is read from the table instead (see `queue::sqlite`).
    hot: Mutex<VecDeque<(u64, QueuedRequest)>>,
    /// Notified after a commit that added webhook deliveries; the delivery engine waits on it.
    outbox: Arc<Notify>,
}

impl Database {
    /// Opens (creating if needed) the database at `path`, takes its lock and starts the writer.
    /// `chain_key` keys the decision log's hash chain (see `audit::chain`).
    pub fn open(
        path: &Path,
        queue_max: u64,
        hub: Arc<Hub>,
        chain_key: [u8; 32],
    ) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(StoreError::backend)?;
        }
        let lock_path = path.with_extension("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(StoreError::backend)?;
        lock.try_lock().map_err(|_| {
            StoreError::backend(std::io::Error::other(format!(
                "{} is in use by another chargegate process",
                path.display()
            )))
        })?;

        let mut conn = open_connection(path, false).map_err(StoreError::backend)?;
        let log_id = migrate(&mut conn).map_err(StoreError::backend)?;
        let pending: u64 = conn
            .query_row("SELECT count(*) FROM queue", [], |r| r.get::<_, i64>(0))
            .map_err(StoreError::backend)? as u64;
        let newest: u64 = conn
            .query_row("SELECT coalesce(max(seq), 0) FROM decisions", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(StoreError::backend)? as u64;
        let enqueue_head: u64 = conn
            .query_row("SELECT coalesce(max(seq), 0) FROM queue", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(StoreError::backend)? as u64;
        let floor: u64 = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'purged_through'",
                [],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(StoreError::backend)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let queued_keys: bool = conn
            .query_row("SELECT EXISTS (SELECT 1 FROM requests)", [], |r| r.get(0))
            .map_err(StoreError::backend)?;
        // A log purged to its end is empty; its head is still the newest position it recorded.
        let head = newest.max(floor);
        hub.set_head(head);
        let chain_head: Link = match conn
            .query_row(
                "SELECT chain FROM decisions WHERE chain IS NOT NULL ORDER BY seq DESC LIMIT 1",
                [],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()
            .map_err(StoreError::backend)?
        {
            Some(link) => link.try_into().map_err(|_| {
                StoreError::backend(std::io::Error::other(
                    "a decision's chain link is not 32 bytes",
                ))
            })?,
            None => chain::floor(&conn).map_err(StoreError::backend)?,
        };

        let shared = Arc::new(Shared {
            pending: AtomicU64::new(pending),
            decision_head: AtomicU64::new(head),
            floor: AtomicU64::new(floor),
            enqueue_head: watch::Sender::new(enqueue_head),
            hot: Mutex::new(VecDeque::new()),
            outbox: Arc::new(Notify::new()),
        });
        // The writer checkpoints no more (its WAL hook replaces SQLite's automatic checkpoint):
        // a thread of its own does, with its own connection.
        conn.wal_hook(Some(checkpoint::note_wal_pages));
        let checkpoint_conn = open_connection(path, false).map_err(StoreError::backend)?;
        let log_reads = checkpoint::LogReads::default();
        let checkpointer =
            Checkpointer::start(checkpoint_conn, log_reads.clone()).map_err(StoreError::backend)?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer = Writer {
            conn,
            checkpointer,
            log_id,
            queue_max,
            shared: shared.clone(),
            hub,
            relaxed: false,
            chain_key: ChainKey::new(&chain_key),
            chain_head,
            queued_keys,
        };
        let stations = StationIndex::open(path, log_reads)?;
        thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(StoreError::backend)?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer: tx,
                readers: Mutex::new(Vec::new()),
                stations,
                path: path.to_owned(),
                log_id,
                shared,
                _lock: lock,
            }),
        })
    }

    /// Commits what is queued, checkpoints the WAL into the main file and stops the writer.
    /// Later writes fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        self.inner.stations.close().await;
        let (tx, rx) = oneshot::channel();
        if self.inner.writer.send(WriteOp::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
        self.inner.readers.lock().expect("reader pool lock").clear();
    }

    pub(crate) fn pending(&self) -> u64 {
        self.inner.shared.pending.load(Ordering::Relaxed)
    }

    pub(crate) fn enqueue_head(&self) -> watch::Receiver<u64> {
        self.inner.shared.enqueue_head.subscribe()
    }

    /// Runs `f` on the in-memory list of freshly committed queue entries, in `seq` order.
    pub(crate) fn with_hot<T>(
        &self,
        f: impl FnOnce(&mut VecDeque<(u64, QueuedRequest)>) -> T,
    ) -> T {
        f(&mut self.inner.shared.hot.lock().expect("hot entries lock"))
    }

    pub(crate) async fn enqueue(&self, request: NewRequest) -> Result<EnqueueOutcome, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::Enqueue(request, tx), rx).await
    }

    pub(crate) async fn enqueue_decided(
        &self,
        decision: NewDecision,
        callback: Option<Callback>,
    ) -> Result<(EnqueueOutcome, Option<RecordedDecision>), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::EnqueueDecided(decision, callback, tx), rx)
            .await
    }

    pub(crate) async fn settle(
        &self,
        position: u64,
        decision: NewDecision,
        callback: Option<Callback>,
    ) -> Result<Settled, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::Settle(position, decision, callback, tx), rx)
            .await
    }

    /// Notified when deliveries were added or redriven.
    pub fn outbox_wake(&self) -> Arc<Notify> {
        self.inner.shared.outbox.clone()
    }

    async fn write<T>(
        &self,
        op: WriteOp,
        rx: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.inner
            .writer
            .send(op)
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` inside the writer's next transaction and returns its result once committed.
    pub(crate) async fn write_with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Transaction<'_>) -> rusqlite::Result<T> + Send + 'static,
    {
        self.write_with_durability(Durability::Full, f).await
    }

    /// [`Database::write_with`] with the durability the write needs.
    pub(crate) async fn write_with_durability<T, F>(
        &self,
        durability: Durability,
        f: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Transaction<'_>) -> rusqlite::Result<T> + Send + 'static,
    {
        let slot = Arc::new(Mutex::new(None));
        let out = slot.clone();
        let run: WriteFn = Box::new(move |tx| {
            *out.lock().expect("result slot") = Some(f(tx)?);
            Ok(())
        });
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::Run(run, durability, tx), rx).await?;
        let result = slot.lock().expect("result slot").take();
        result.ok_or(StoreError::Closed)
    }

    /// Runs `f` on the write connection between two commits (see [`WriteOp::Read`]).
    pub(crate) async fn read_on_writer<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let read: ReadFn = Box::new(move |conn| {
            let _ = tx.send(f(conn).map_err(StoreError::backend));
        });
        self.inner
            .writer
            .send(WriteOp::Read(read))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Brings the index by station up to date with the log (see [`station_index`]).
    pub(crate) async fn index_stations(&self) -> Result<u64, StoreError> {
        self.inner.stations.catch_up().await
    }

    /// Runs `f` on a pooled read connection on the blocking pool.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = inner.readers.lock().expect("reader pool lock").pop();
            let conn = match pooled {
                Some(conn) => conn,
                None => open_reader(&inner.path).map_err(StoreError::backend)?,
            };
            let result = f(&conn).map_err(StoreError::backend);
            let mut pool = inner.readers.lock().expect("reader pool lock");
            if pool.len() < READERS {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(StoreError::backend)?
    }

    /// Queue entries after `position`, oldest first.
    pub(crate) async fn queued_after(
        &self,
        position: u64,
        limit: usize,
    ) -> Result<Vec<(u64, QueuedRequest)>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT q.seq, q.driver_token, r.request_id, r.station_id, r.token_fp, r.callback_url,
                        r.accepted_at_us
                 FROM queue q JOIN requests r ON r.seq = q.seq
                 WHERE q.seq > ?1 ORDER BY q.seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![position as i64, limit as i64], |row| {
                Ok((
                    row.get::<_, i64>(0)? as u64,
                    QueuedRequest {
                        token: DriverToken::new(row.get::<_, String>(1)?),
                        request_id: row.get(2)?,
                        station_id: row.get(3)?,
                        fingerprint: Fingerprint::from_stored(row.get(4)?),
                        callback_url: row.get(5)?,
                        accepted_at: Micros(row.get(6)?),
                    },
                ))
            })?;
            rows.collect()
        })
        .await
    }
}

#[async_trait]
impl DecisionLog for Database {
    fn log_id(&self) -> u32 {
        self.inner.log_id
    }

    async fn read_after(
        &self,
        position: u64,
        filter: &StationFilter,
        limit: usize,
    ) -> Result<Vec<RecordedDecision>, StoreError> {
        let log_id = self.inner.log_id;
        let stations = match filter {
            StationFilter::All => None,
            StationFilter::Only(ids) => {
                Some(serde_json::to_string(ids).expect("strings serialize"))
            }
        };
        self.read(move |conn| {
            let mut out = Vec::new();
            match stations {
                None => {
                    let mut stmt = conn.prepare_cached(&format!(
                        "SELECT {DECISION_COLUMNS} FROM decisions WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                    ))?;
                    let rows = stmt.query_map(params![position as i64, limit as i64], |r| decision_row(r, log_id))?;
                    for row in rows {
                        out.push(row?);
                    }
                }
                Some(json) => {
                    let mut stmt = conn.prepare_cached(&format!(
                        "SELECT {DECISION_COLUMNS} FROM decisions
                         WHERE seq > ?1 AND station_id IN (SELECT value FROM json_each(?3))
                         ORDER BY seq LIMIT ?2"
                    ))?;
                    let rows =
                        stmt.query_map(params![position as i64, limit as i64, json], |r| decision_row(r, log_id))?;
                    for row in rows {
                        out.push(row?);
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn bounds(&self) -> Result<LogBounds, StoreError> {
        Ok(LogBounds {
            floor: self.inner.shared.floor.load(Ordering::Acquire),
            head: self.inner.shared.decision_head.load(Ordering::Acquire),
        })
    }

    async fn request_state(&self, request_id: &str) -> Result<Option<RequestState>, StoreError> {
        let log_id = self.inner.log_id;
        let request_id = request_id.to_owned();
        self.read(move |conn| {
            let decided = conn
                .prepare_cached(&format!(
                    "SELECT {DECISION_COLUMNS} FROM decisions WHERE request_id = ?1"
                ))?
                .query_row([&request_id], |r| decision_row(r, log_id))
                .optional()?;
            if let Some(d) = decided {
                return Ok(Some(RequestState::Decided(d)));
            }
            conn.prepare_cached(
                "SELECT station_id, token_fp, accepted_at_us FROM requests WHERE request_id = ?1",
            )?
            .query_row([&request_id], |r| {
                Ok(RequestState::Pending {
                    station_id: r.get(0)?,
                    fingerprint: Fingerprint::from_stored(r.get(1)?),
                    accepted_at: Micros(r.get(2)?),
                })
            })
            .optional()
        })
        .await
    }

    async fn purge_before(&self, cutoff: Micros, max: usize) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::Purge(cutoff, max, tx), rx).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::Ping(tx), rx).await
    }
}

#[async_trait]
impl GrantStore for Database {
    async fn put_grant(&self, grant: StoredGrant) -> Result<(), StoreError> {
        self.write_with(move |tx| {
            tx.prepare_cached(
                "INSERT INTO grants (station_id, token_fp, expires_at_us, blocked) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (station_id, token_fp) DO UPDATE SET expires_at_us = ?3, blocked = ?4",
            )?
            .execute(params![grant.station_id, grant.fingerprint.as_str(), grant.expires_at.map(|m| m.0), grant.blocked])?;
            Ok(())
        })
        .await
    }

    async fn delete_grant(
        &self,
        station_id: &str,
        fingerprint: &Fingerprint,
    ) -> Result<bool, StoreError> {
        let (station_id, fingerprint) = (station_id.to_owned(), fingerprint.clone());
        self.write_with(move |tx| {
            let n = tx
                .prepare_cached("DELETE FROM grants WHERE station_id = ?1 AND token_fp = ?2")?
                .execute(params![station_id, fingerprint.as_str()])?;
            Ok(n > 0)
        })
        .await
    }

    async fn list_grants(&self) -> Result<Vec<StoredGrant>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT station_id, token_fp, expires_at_us, blocked FROM grants ORDER BY station_id, token_fp",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(StoredGrant {
                    station_id: r.get(0)?,
                    fingerprint: Fingerprint::from_stored(r.get(1)?),
                    expires_at: r.get::<_, Option<i64>>(2)?.map(Micros),
                    blocked: r.get(3)?,
                })
            })?;
            rows.collect()
        })
        .await
    }
}

const DECISION_COLUMNS: &str =
    "seq, request_id, station_id, token_fp, reason, authorizer, accepted_at_us, decided_at_us";

pub(crate) fn decision_row(
    r: &rusqlite::Row<'_>,
    log_id: u32,
) -> rusqlite::Result<RecordedDecision> {
    let bad = |i: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("unknown {what}").into(),
        )
    };
    let reason: String = r.get(4)?;
    let authorizer: String = r.get(5)?;
    Ok(RecordedDecision {
        cursor: Cursor::new(log_id, r.get::<_, i64>(0)? as u64),
        decision: NewDecision {
            request_id: r.get(1)?,
            station_id: r.get(2)?,
            fingerprint: Fingerprint::from_stored(r.get(3)?),
            verdict: Verdict::new(
                Reason::parse(&reason).ok_or_else(|| bad(4, "reason"))?,
                DecidedBy::parse(&authorizer).ok_or_else(|| bad(5, "authorizer"))?,
            ),
            accepted_at: Micros(r.get(6)?),
            decided_at: Micros(r.get(7)?),
        },
    })
}

pub(super) fn open_connection(path: &Path, read_only: bool) -> rusqlite::Result<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)?;
    // The file belongs to this process, so only an outside tool (a backup, an operator's shell) can
    // hold its write lock. The writer gives up quickly so callers see UNAVAILABLE and health turns
    // NOT_SERVING instead of every call hanging; readers are never blocked in WAL mode.
    conn.busy_timeout(if read_only {
        READ_BUSY_TIMEOUT
    } else {
        WRITE_BUSY_TIMEOUT
    })?;
    if !read_only {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    }
    // The query planner stability guarantee: plans never depend on bound values. Without it, a
    // query on a table with partial indexes is prepared again each time its parameters change.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         PRAGMA secure_delete = ON;
         PRAGMA foreign_keys = OFF;",
    )?;
    // Page caches bound the memory the store may hold: the writer's covers the hot tail of every
    // table; readers mostly stream through the log once.
    conn.pragma_update(
        None,
        "cache_size",
        if read_only {
            READ_CACHE_KIB
        } else {
            WRITE_CACHE_KIB
        },
    )?;
    Ok(conn)
}

/// A read connection of the log, with the index by station attached as `stations`.
fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = open_connection(path, true)?;
    conn.execute(
        "ATTACH DATABASE ?1 AS stations",
        [station_index::path_for(path).to_string_lossy()],
    )?;
    Ok(conn)
}

/// Creates or checks the schema; returns the log id.
fn migrate(conn: &mut Connection) -> rusqlite::Result<u32> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the database schema is version {version}; this chargegate knows up to {SCHEMA_VERSION}"
        )));
    }
    let tx = conn.transaction()?;
    tx.execute_batch(SCHEMA)?;
    // Logs created before the hash chain get the column; their records stay unchained.
    let chained: bool = tx
        .prepare("SELECT 1 FROM pragma_table_info('decisions') WHERE name = 'chain'")?
        .exists([])?;
    if !chained {
        tx.execute_batch("ALTER TABLE decisions ADD COLUMN chain BLOB;")?;
    }
    // Version 3 kept the index by station in this file; it has a file of its own now.
    tx.execute_batch("DROP TABLE IF EXISTS decisions_by_station;")?;
    let existing: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = 'log_id'", [], |r| {
            r.get(0)
        })
        .optional()?;
    let log_id = match existing.and_then(|v| v.parse().ok()) {
        Some(id) => id,
        None => {
            let id: u32 = rand::random();
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('log_id', ?1)",
                [id.to_string()],
            )?;
            id
        }
    };
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(log_id)
}

/// The writer thread's state: the only write connection.
struct Writer {
    conn: Connection,
    /// Checkpoints the WAL when it has grown, off this thread.
    checkpointer: Checkpointer,
    log_id: u32,
    queue_max: u64,
    shared: Arc<Shared>,
    hub: Arc<Hub>,
    /// The connection is at `synchronous = NORMAL` (a batch of [`Durability::Process`] writes).
    relaxed: bool,
    chain_key: ChainKey,
    /// The link of the newest committed decision.
    chain_head: Link,
    /// `requests` may hold rows. While it cannot (only requests decided at intake so far, as with
    /// the access list), a request decided at intake skips looking its request_id up there.
    queued_keys: bool,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut closing = None;
        while closing.is_none() {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let reads: Vec<ReadFn> = batch
                .extract_if(.., |op| matches!(op, WriteOp::Read(_)))
                .map(|op| match op {
                    WriteOp::Read(read) => read,
                    _ => unreachable!("only reads are extracted"),
                })
                .collect();
            if !batch.is_empty() {
                self.commit_and_answer(&mut batch, &mut closing);
            }
            for read in reads {
                read(&self.conn);
            }
        }
        rx.close();
        self.checkpointer.stop();
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
            tracing::warn!(error = %e, "WAL checkpoint at shutdown failed");
        }
        drop(self.conn);
        if let Some(reply) = closing {
            let _ = reply.send(());
        }
    }

    /// Commits a batch of writes and answers each caller.
    fn commit_and_answer(
        &mut self,
        batch: &mut Vec<WriteOp>,
        closing: &mut Option<oneshot::Sender<()>>,
    ) {
        {
            let started = std::time::Instant::now();
            let committed = self.commit(batch);
            metrics::histogram!("chargegate_store_commit_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!("chargegate_store_commit_writes").record(batch.len() as f64);
            match committed {
                Ok((applied, published, enqueue_head, delivering)) => {
                    if delivering {
                        self.shared.outbox.notify_one();
                    }
                    if let Some(last) = published.last() {
                        self.shared
                            .decision_head
                            .store(last.cursor.position, Ordering::Release);
                        self.hub.publish(published);
                    }
                    {
                        let mut hot = self.shared.hot.lock().expect("hot entries lock");
                        for (op, result) in batch.drain(..).zip(applied) {
                            match (op, result) {
                                (WriteOp::Enqueue(request, reply), Applied::Enqueue(o, seq)) => {
                                    drop(reply.send(Ok(o)));
                                    // The request itself moves on to the dispatcher, unread.
                                    if let Some(seq) = seq
                                        && hot.len() < HOT_MAX
                                    {
                                        hot.push_back((seq, QueuedRequest::from(request)));
                                    }
                                }
                                (
                                    WriteOp::EnqueueDecided(_, _, reply),
                                    Applied::EnqueueDecided(o, recorded),
                                ) => drop(reply.send(Ok((o, recorded)))),
                                (WriteOp::Settle(_, _, _, reply), Applied::Settle(s)) => {
                                    drop(reply.send(Ok(s)))
                                }
                                (WriteOp::Ping(reply), Applied::Ping) => drop(reply.send(Ok(()))),
                                (WriteOp::Run(_, _, reply), Applied::Run) => {
                                    drop(reply.send(Ok(())))
                                }
                                (WriteOp::Purge(_, _, reply), Applied::Purge(n)) => {
                                    drop(reply.send(Ok(n)))
                                }
                                (WriteOp::Close(reply), Applied::Close) => *closing = Some(reply),
                                _ => unreachable!("results follow the batch order"),
                            }
                        }
                    }
                    if let Some(head) = enqueue_head {
                        self.shared.enqueue_head.send_replace(head);
                    }
                    metrics::gauge!("chargegate_queue_depth")
                        .set(self.shared.pending.load(Ordering::Relaxed) as f64);
                }
                Err(e) => {
                    tracing::error!(error = %e, writes = batch.len(), "SQLite commit failed; the batch was rolled back");
                    let err = StoreError::backend(e);
                    for op in batch.drain(..) {
                        match op {
                            WriteOp::Enqueue(_, reply) => drop(reply.send(Err(err.clone()))),
                            WriteOp::EnqueueDecided(_, _, reply) => {
                                drop(reply.send(Err(err.clone())))
                            }
                            WriteOp::Settle(_, _, _, reply) => drop(reply.send(Err(err.clone()))),
                            WriteOp::Ping(reply) => drop(reply.send(Err(err.clone()))),
                            WriteOp::Run(_, _, reply) => drop(reply.send(Err(err.clone()))),
                            WriteOp::Purge(_, _, reply) => drop(reply.send(Err(err.clone()))),
                            WriteOp::Close(reply) => *closing = Some(reply),
                            WriteOp::Read(_) => unreachable!("reads are not in the batch"),
                        }
                    }
                }
            }
        }
        // After the answers: the checkpoint's remainder, when there is one, waits for no caller.
        self.checkpointer.committed(&self.conn);
    }

    /// Applies a batch in one transaction. Returns each write's result, the decisions recorded
    /// for the first time (in log order) and the newest queue position, if any entry was added.
    #[allow(clippy::type_complexity)]
    fn commit(
        &mut self,
        batch: &[WriteOp],
    ) -> rusqlite::Result<(Vec<Applied>, Vec<RecordedDecision>, Option<u64>, bool)> {
        let mut pending = self.shared.pending.load(Ordering::Relaxed);
        let relaxed = batch
            .iter()
            .all(|op| matches!(op, WriteOp::Run(_, Durability::Process, _)));
        if relaxed != self.relaxed {
            self.conn.pragma_update(
                None,
                "synchronous",
                if relaxed { "NORMAL" } else { "FULL" },
            )?;
            self.relaxed = relaxed;
        }
        let tx = self.conn.transaction()?;
        let mut applied = Vec::with_capacity(batch.len());
        let mut published = Vec::new();
        let mut enqueue_head = None;
        let mut purged_through = None;
        let mut delivering = false;
        let mut chain_head = self.chain_head;
        for op in batch {
            applied.push(match op {
                WriteOp::Enqueue(request, _) => {
                    let (outcome, seq) = enqueue(&tx, request, pending, self.queue_max)?;
                    if let Some(seq) = seq {
                        self.queued_keys = true;
                        pending += 1;
                        enqueue_head = Some(seq);
                    }
                    Applied::Enqueue(outcome, seq)
                }
                WriteOp::EnqueueDecided(decision, callback, _) => {
                    let (outcome, recorded) = enqueue_decided(
                        &tx,
                        decision,
                        self.queued_keys,
                        self.log_id,
                        (&self.chain_key, &mut chain_head),
                    )?;
                    if let Some(d) = &recorded {
                        if let Some(callback) = callback {
                            add_delivery(&tx, decision, callback)?;
                            delivering = true;
                        }
                        published.push(d.clone());
                    }
                    Applied::EnqueueDecided(outcome, recorded)
                }
                WriteOp::Settle(position, decision, callback, _) => {
                    let (settled, completed) = settle(
                        &tx,
                        *position,
                        decision,
                        self.log_id,
                        (&self.chain_key, &mut chain_head),
                    )?;
                    if let Some(callback) = callback.as_ref().filter(|_| settled.first) {
                        add_delivery(&tx, decision, callback)?;
                        delivering = true;
                    }
                    if completed {
                        pending = pending.saturating_sub(1);
                    }
                    if settled.first {
                        published.push(settled.decision.clone());
                    }
                    Applied::Settle(settled)
                }
                WriteOp::Ping(_) => {
                    // A real write: it needs the write lock and the disk, as enqueueing does.
                    tx.prepare_cached("UPDATE meta SET value = value WHERE key = 'log_id'")?
                        .execute([])?;
                    Applied::Ping
                }
                WriteOp::Purge(cutoff, max, _) => {
                    let (purged, through) = purge(&tx, *cutoff, *max)?;
                    if let Some(through) = through {
                        purged_through = Some(through);
                    }
                    Applied::Purge(purged)
                }
                WriteOp::Run(f, _, _) => {
                    f(&tx)?;
                    Applied::Run
                }
                WriteOp::Close(_) => Applied::Close,
                WriteOp::Read(_) => unreachable!("reads are not in the batch"),
            });
        }
        tx.commit()?;
        self.chain_head = chain_head;
        self.shared.pending.store(pending, Ordering::Relaxed);
        if let Some(through) = purged_through {
            self.shared.floor.fetch_max(through, Ordering::AcqRel);
        }
        Ok((applied, published, enqueue_head, delivering))
    }
}

fn enqueue(
    tx: &Transaction<'_>,
    r: &NewRequest,
    pending: u64,
    queue_max: u64,
) -> rusqlite::Result<(EnqueueOutcome, Option<u64>)> {
    // A request decided at intake left its request_id in the decision log only.
    if let Some(outcome) = seen(tx, SEEN_DECIDED, r.into())? {
        return Ok((outcome, None));
    }
    // The common case, a new request_id, costs one insert; a seen one is looked up afterwards.
    // (No RETURNING: SQLite gathers returned rows in a temporary table, a B-tree opened and
    // dropped for every insert.)
    if pending < queue_max {
        let inserted = tx
            .prepare_cached(
                "INSERT INTO requests (request_id, station_id, token_fp, callback_url, accepted_at_us)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (request_id) DO NOTHING",
            )?
            .execute(params![
                r.request_id,
                r.station_id,
                r.fingerprint.as_str(),
                r.callback_url,
                r.accepted_at.0
            ])?;
        if inserted == 1 {
            let seq = tx.last_insert_rowid();
            tx.prepare_cached("INSERT INTO queue (seq, driver_token) VALUES (?1, ?2)")?
                .execute(params![seq, r.token.expose()])?;
            return Ok((
                EnqueueOutcome::Accepted {
                    accepted_at: r.accepted_at,
                },
                Some(seq as u64),
            ));
        }
    }
    Ok((
        seen(tx, SEEN_QUEUED, r.into())?.unwrap_or(EnqueueOutcome::Full),
        None,
    ))
}

/// Records a request decided at intake: its decision alone, which also keeps its request_id (no
/// `requests` row, no queue entry). Returns the outcome, and the decision when it was recorded.
fn enqueue_decided(
    tx: &Transaction<'_>,
    d: &NewDecision,
    queued_keys: bool,
    log_id: u32,
    chain: (&ChainKey, &mut Link),
) -> rusqlite::Result<(EnqueueOutcome, Option<RecordedDecision>)> {
    // The request_id of a request that went through the queue (decided or not) is kept there.
    if queued_keys && let Some(outcome) = seen(tx, SEEN_QUEUED, d.into())? {
        return Ok((outcome, None));
    }
    let settled = record_decision(tx, d, log_id, chain)?;
    if settled.first {
        let accepted_at = d.accepted_at;
        return Ok((
            EnqueueOutcome::Accepted { accepted_at },
            Some(settled.decision),
        ));
    }
    let earlier = &settled.decision.decision;
    let outcome = seen_before(
        d.into(),
        (
            &earlier.station_id,
            earlier.fingerprint.as_str(),
            earlier.accepted_at,
        ),
    );
    Ok((outcome, None))
}

/// Where a request_id was seen: among the queue's request keys, or in the decision log.
const SEEN_QUEUED: &str =
    "SELECT station_id, token_fp, accepted_at_us FROM requests WHERE request_id = ?1";
const SEEN_DECIDED: &str =
    "SELECT station_id, token_fp, accepted_at_us FROM decisions WHERE request_id = ?1";

/// What makes a request the same one again: its request_id, with the station and the token it
/// came with.
#[derive(Clone, Copy)]
struct RequestKey<'a> {
    request_id: &'a str,
    station_id: &'a str,
    fingerprint: &'a Fingerprint,
}

impl<'a> From<&'a NewRequest> for RequestKey<'a> {
    fn from(r: &'a NewRequest) -> Self {
        Self {
            request_id: &r.request_id,
            station_id: &r.station_id,
            fingerprint: &r.fingerprint,
        }
    }
}

impl<'a> From<&'a NewDecision> for RequestKey<'a> {
    fn from(d: &'a NewDecision) -> Self {
        Self {
            request_id: &d.request_id,
            station_id: &d.station_id,
            fingerprint: &d.fingerprint,
        }
    }
}

/// The outcome for a request_id seen before (`query`: [`SEEN_QUEUED`] or [`SEEN_DECIDED`]), as
/// [`seen_before`] gives it; `None` when it was not seen there.
fn seen(
    tx: &Transaction<'_>,
    query: &str,
    key: RequestKey<'_>,
) -> rusqlite::Result<Option<EnqueueOutcome>> {
    let seen: Option<(String, String, i64)> = tx
        .prepare_cached(query)?
        .query_row([key.request_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    Ok(seen.map(|(station_id, fingerprint, accepted_at)| {
        seen_before(key, (&station_id, &fingerprint, Micros(accepted_at)))
    }))
}

/// What a request gets when its request_id was recorded before with `earlier` (station, token
/// fingerprint, acceptance time): the original acknowledgement for the same station and token,
/// `Conflict` for another.
fn seen_before(key: RequestKey<'_>, earlier: (&str, &str, Micros)) -> EnqueueOutcome {
    if earlier.0 == key.station_id && earlier.1 == key.fingerprint.as_str() {
        EnqueueOutcome::Duplicate {
            accepted_at: earlier.2,
        }
    } else {
        EnqueueOutcome::Conflict
    }
}

/// Records the decision (see [`record_decision`]) and deletes the queue entry. Returns the
/// settled decision and whether a queue entry was deleted.
fn settle(
    tx: &Transaction<'_>,
    position: u64,
    d: &NewDecision,
    log_id: u32,
    chain: (&ChainKey, &mut Link),
) -> rusqlite::Result<(Settled, bool)> {
    let settled = record_decision(tx, d, log_id, chain)?;
    let deleted = tx
        .prepare_cached("DELETE FROM queue WHERE seq = ?1")?
        .execute([position as i64])?;
    Ok((settled, deleted == 1))
}

/// Records the decision unless one exists for the request_id (then returns that one, with
/// `first` false). The decision is chained after `chain.1`, which advances when it is recorded.
fn record_decision(
    tx: &Transaction<'_>,
    d: &NewDecision,
    log_id: u32,
    chain: (&ChainKey, &mut Link),
) -> rusqlite::Result<Settled> {
    let link = chain::link(chain.0, chain.1, d);
    let inserted = tx
        .prepare_cached(
            "INSERT INTO decisions (request_id, station_id, token_fp, status, reason, authorizer,
                                    accepted_at_us, decided_at_us, processing_ms, chain)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (request_id) DO NOTHING",
        )?
        .execute(params![
            d.request_id,
            d.station_id,
            d.fingerprint.as_str(),
            d.verdict.status().as_str(),
            d.verdict.reason.as_str(),
            d.verdict.decided_by.as_str(),
            d.accepted_at.0,
            d.decided_at.0,
            d.processing_time_ms(),
            link.as_slice(),
        ])?;
    let inserted = (inserted == 1).then(|| tx.last_insert_rowid());
    if inserted.is_some() {
        *chain.1 = link;
    }
    let settled = match inserted {
        Some(seq) => Settled {
            decision: RecordedDecision {
                cursor: Cursor::new(log_id, seq as u64),
                decision: d.clone(),
            },
            first: true,
        },
        None => {
            let earlier = tx
                .prepare_cached(&format!(
                    "SELECT {DECISION_COLUMNS} FROM decisions WHERE request_id = ?1"
                ))?
                .query_row([&d.request_id], |r| decision_row(r, log_id))?;
            Settled {
                decision: earlier,
                first: false,
            }
        }
    };
    Ok(settled)
}

/// Adds the pending delivery of a decision's callback, due at once. Due from now (the commit),
/// not from the decision: the delivery engine reads on from the last delivery it took, and a
/// delivery committed later must not land before it.
fn add_delivery(tx: &Transaction<'_>, d: &NewDecision, c: &Callback) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO deliveries (request_id, station_id, callback_url, host, driver_token, status,
                                 reason, decided_at_us, state, attempts, next_attempt_us, age_from_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', 0, ?9, ?8)
         ON CONFLICT (request_id) DO NOTHING",
    )?
    .execute(params![
        d.request_id,
        d.station_id,
        c.url,
        c.host,
        c.token.expose(),
        d.verdict.status().as_str(),
        d.verdict.reason.as_str(),
        d.decided_at.0,
        Micros::now().0.max(d.decided_at.0),
    ])?;
    Ok(())
}

/// Deletes the oldest decisions decided before `cutoff` (a prefix of the log, so what remains is
/// contiguous), at most `max`, with their request keys. Returns how many, and the new floor.
fn purge(tx: &Transaction<'_>, cutoff: Micros, max: usize) -> rusqlite::Result<(u64, Option<u64>)> {
    let through: Option<i64> = tx
        .prepare_cached(
            "SELECT max(seq) FROM (
                 SELECT seq, decided_at_us FROM decisions ORDER BY seq LIMIT ?1
             ) WHERE seq < coalesce(
                 (SELECT min(seq) FROM (SELECT seq, decided_at_us FROM decisions ORDER BY seq LIMIT ?1)
                  WHERE decided_at_us >= ?2),
                 9223372036854775807)",
        )?
        .query_row(params![max as i64, cutoff.0], |r| r.get(0))?;
    let Some(through) = through else {
        return Ok((0, None));
    };
    // The retained log verifies from the link of the last purged record.
    let floor: Option<Vec<u8>> = tx
        .prepare_cached("SELECT chain FROM decisions WHERE seq = ?1")?
        .query_row([through], |r| r.get(0))
        .optional()?
        .flatten();
    if let Some(floor) = floor {
        tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('chain_floor', ?1)")?
            .execute([hex::encode(floor)])?;
    }
    for table in ["requests", "deliveries"] {
        tx.prepare_cached(&format!(
            "DELETE FROM {table} WHERE request_id IN (SELECT request_id FROM decisions WHERE seq <= ?1)"
        ))?
        .execute([through])?;
    }
    let purged = tx
        .prepare_cached("DELETE FROM decisions WHERE seq <= ?1")?
        .execute([through])?;
    tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('purged_through', ?1)")?
        .execute([through.to_string()])?;
    Ok((purged as u64, Some(through as u64)))
}
