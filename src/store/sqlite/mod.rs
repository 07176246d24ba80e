//! The embedded backend: one SQLite file holds the queue, the decision log, audit records,
//! grants and the webhook outbox.
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
//! Each job has its file:
//! - [`schema`]: the tables, their migration and how connections are opened;
//! - [`writer`]: the writer thread and its group commit;
//! - [`request_keys`]: idempotency by request_id for both intake paths;
//! - [`decisions`]: recording a decision with its outbox delivery and chain link;
//! - [`retention`]: purging the oldest decisions;
//! - [`log`] and [`grants`]: the reads and writes of the `DecisionLog` and `GrantStore` ports;
//! - [`checkpoint`] and [`station_index`]: the WAL checkpoints and the index by station, each on a
//!   thread of its own.
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

mod checkpoint;
mod decisions;
mod grants;
mod log;
mod request_keys;
mod retention;
mod revisions;
mod schema;
pub mod station_index;
mod writer;

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

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use self::{
    checkpoint::Checkpointer,
    schema::{migrate, open_connection, open_reader},
    station_index::StationIndex,
    writer::{ReadFn, WriteFn, WriteOp, Writer},
};
pub(crate) use self::{decisions::decision_row, writer::Durability};
use super::StoreError;
use crate::{
    audit::chain::{self, ChainKey, Link},
    decision::{Micros, NewDecision, RecordedDecision},
    fanout::Hub,
    intake::NewRequest,
    queue::{EnqueueOutcome, QueuedRequest, Revisable, Settled},
    token::{DriverToken, Fingerprint},
    webhook::Callback,
};

/// Writes waiting for the writer thread before callers wait for room (backpressure).
const WRITE_QUEUE: usize = 16 * 1024;
/// Read connections kept open.
const READERS: usize = 4;

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
        keep: Option<Revisable>,
    ) -> Result<Settled, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::Settle(position, decision, callback, keep, tx), rx)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str) -> NewRequest {
        NewRequest {
            request_id: id.into(),
            station_id: "station-1".into(),
            token: DriverToken::new("AB12CD34"),
            fingerprint: Fingerprint::from_stored("00".repeat(32)),
            callback_url: None,
            accepted_at: Micros::now(),
        }
    }

    /// Holds the writer thread until the returned sender is dropped, so the writes queued
    /// meanwhile are committed as one batch.
    async fn hold_writer(db: &Database) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, running) = oneshot::channel();
        let db = db.clone();
        tokio::spawn(async move {
            db.read_on_writer(move |_| {
                let _ = started.send(());
                let _ = held.recv();
                Ok(())
            })
            .await
        });
        running.await.expect("the writer runs the read");
        release
    }

    #[tokio::test]
    async fn a_write_that_fails_fails_alone_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let db =
            Database::open(&dir.path().join("db"), 100, Arc::new(Hub::new()), [7; 32]).unwrap();
        let release = hold_writer(&db).await;
        let failing = tokio::spawn({
            let db = db.clone();
            async move {
                db.write_with(|tx| tx.execute("INSERT INTO no_such_table VALUES (1)", []))
                    .await
            }
        });
        let enqueued = tokio::spawn({
            let db = db.clone();
            async move { db.enqueue(request("r-1")).await }
        });
        // Both are queued behind the held writer before it goes on.
        while db.inner.writer.capacity() > WRITE_QUEUE - 2 {
            tokio::task::yield_now().await;
        }
        drop(release);

        assert!(failing.await.unwrap().is_err(), "the bad write fails");
        let outcome = enqueued.await.unwrap().expect("the good write commits");
        assert!(matches!(outcome, EnqueueOutcome::Accepted { .. }));
        assert_eq!(db.pending(), 1);
        assert_eq!(db.queued_after(0, 10).await.unwrap().len(), 1);
        db.close().await;
    }
}
