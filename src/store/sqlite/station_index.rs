//! The decision log's index by station, in a SQLite file of its own (`<log>.stations.db`) with a
//! thread of its own.
//!
//! An index by station written with every decision dirties a page per station in every commit
//! (about a fifth of intake). Written a second behind in large batches it is cheap, but a batch
//! of a second's decisions on the log's writer held every acknowledgement behind it for tens of
//! milliseconds (g3's p99). In its own file the batch takes its own write lock: the log's writer
//! never waits for it. The index is derived data: it is rebuilt from the log where it stops (its newest
//! `seq`), after a crash too, and entries of purged decisions are dropped as it catches up.
//!
//! Read connections of the log attach the file as `stations`; a query by station asks the
//! thread to catch up first (see `audit::sqlite`).

use std::{
    path::{Path, PathBuf},
    sync::mpsc as std_mpsc,
    thread,
};

use rusqlite::{Connection, params};
use tokio::sync::oneshot;

use super::checkpoint::LogReads;
use crate::store::StoreError;

/// Decisions indexed in one transaction.
const INDEX_BATCH: i64 = 20_000;

/// The layout of the index file (its `user_version`). A file of another layout is emptied and
/// built again from the log.
const LAYOUT: i64 = 1;

/// Stations are numbered in the index: an entry is three integers, and its key compares as
/// integers. Keyed by the station id's text, the file was three times the size and its catch-up
/// took about 1.6 times the CPU.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS station_keys (
    key        INTEGER PRIMARY KEY,
    station_id TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS decisions_by_station (
    seq           INTEGER PRIMARY KEY,
    station_key   INTEGER NOT NULL,
    decided_at_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_by_station_time
    ON decisions_by_station (station_key, decided_at_us);
";

/// The index file next to the log at `log`.
pub fn path_for(log: &Path) -> PathBuf {
    log.with_extension("stations.db")
}

/// What the index thread is asked to do.
enum Request {
    /// Catch up with the log and answer how many decisions were added.
    CatchUp(oneshot::Sender<Result<u64, StoreError>>),
    /// Close the connection, then answer.
    Stop(oneshot::Sender<()>),
}

/// A handle on the index thread; the thread also stops when the handle is dropped.
pub(crate) struct StationIndex {
    requests: std_mpsc::Sender<Request>,
}

impl StationIndex {
    /// Creates the index file if needed and starts its thread. `log` is the decision log's file.
    pub(crate) fn open(log: &Path, log_reads: LogReads) -> Result<Self, StoreError> {
        let conn = Connection::open(path_for(log)).map_err(StoreError::backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(StoreError::backend)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(StoreError::backend)?;
        // Lost on a power loss, the tail of the index is rebuilt from the log.
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA cache_size = -2048;")
            .map_err(StoreError::backend)?;
        migrate(&conn).map_err(StoreError::backend)?;
        conn.execute("ATTACH DATABASE ?1 AS log", [log.to_string_lossy()])
            .map_err(StoreError::backend)?;
        let (tx, rx) = std_mpsc::channel();
        thread::Builder::new()
            .name("sqlite-stations".into())
            .spawn(move || run(conn, rx, &log_reads))
            .map_err(StoreError::backend)?;
        Ok(Self { requests: tx })
    }

    /// Indexes every decision recorded so far; returns how many were added.
    pub(crate) async fn catch_up(&self) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::CatchUp(tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stops the thread and closes its connection (which reads the log: the log's final
    /// checkpoint should not find it in a read).
    pub(crate) async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(Request::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

fn run(mut conn: Connection, requests: std_mpsc::Receiver<Request>, log_reads: &LogReads) {
    crate::store::background_priority();
    while let Ok(first) = requests.recv() {
        // Everyone who asked while the last run was going is answered by this one.
        let mut waiting = Vec::new();
        let mut stop = None;
        for request in std::iter::once(first).chain(requests.try_iter()) {
            match request {
                Request::CatchUp(caller) => waiting.push(caller),
                Request::Stop(done) => stop = Some(done),
            }
        }
        if stop.is_none() || !waiting.is_empty() {
            let result = index(&mut conn, log_reads).map_err(StoreError::backend);
            for caller in waiting {
                let _ = caller.send(result.clone());
            }
        }
        if let Some(done) = stop {
            drop(conn);
            let _ = done.send(());
            return;
        }
    }
}

/// Creates the index's tables; a file of an earlier layout is emptied first (its entries are
/// derived from the log, and the first catch-up adds them again).
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let layout: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if layout == LAYOUT {
        return conn.execute_batch(SCHEMA);
    }
    conn.execute_batch(&format!(
        "BEGIN;
         DROP TABLE IF EXISTS decisions_by_station;
         DROP TABLE IF EXISTS station_keys;
         {SCHEMA}
         PRAGMA user_version = {LAYOUT};
         COMMIT;"
    ))
}

/// Adds what the log recorded since the newest indexed decision and drops entries of decisions
/// that retention purged. Each read of the log waits for a checkpoint that is running, and holds
/// the next one back until it is done (see [`LogReads`]).
fn index(conn: &mut Connection, log_reads: &LogReads) -> rusqlite::Result<u64> {
    let mut total = 0;
    loop {
        let _turn = log_reads.hold();
        let tx = conn.transaction()?;
        let through: i64 = tx
            .prepare_cached("SELECT coalesce(max(seq), 0) FROM decisions_by_station")?
            .query_row([], |r| r.get(0))?;
        // Both statements take the log's next INDEX_BATCH decisions: the same rows, as the
        // transaction reads the log at one snapshot.
        tx.prepare_cached(
            "INSERT OR IGNORE INTO station_keys (station_id)
             SELECT DISTINCT station_id FROM
               (SELECT station_id FROM log.decisions WHERE seq > ?1 ORDER BY seq LIMIT ?2)",
        )?
        .execute(params![through, INDEX_BATCH])?;
        let n = tx
            .prepare_cached(
                "INSERT INTO decisions_by_station (seq, station_key, decided_at_us)
                 SELECT d.seq, k.key, d.decided_at_us
                 FROM log.decisions d CROSS JOIN station_keys k ON k.station_id = d.station_id
                 WHERE d.seq > ?1 ORDER BY d.seq LIMIT ?2",
            )?
            .execute(params![through, INDEX_BATCH])? as i64;
        tx.commit()?;
        total += n as u64;
        if n < INDEX_BATCH {
            break;
        }
    }
    let _turn = log_reads.hold();
    conn.prepare_cached(
        "DELETE FROM decisions_by_station
         WHERE seq <= (SELECT CAST(value AS INTEGER) FROM log.meta WHERE key = 'purged_through')",
    )?
    .execute([])?;
    Ok(total)
}
