//! The schema of the embedded store, its migration, and how its connections are opened.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::station_index;

/// The size the WAL file is cut back to when the WAL starts over, in bytes. Under steady load the
/// WAL stays well below it (checkpoints every 4,000 pages, see `checkpoint`); under overload the
/// checkpoints fall behind and the file grew to 210–280 MB (g8), and kept that size until
/// shutdown. With the limit it gives the space back once the WAL has been copied.
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

const SCHEMA_VERSION: i64 = 5;
const WRITE_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1000);
/// Page cache per connection, in KiB (as a negative `cache_size`).
const WRITE_CACHE_KIB: i64 = -4096;
const READ_CACHE_KIB: i64 = -1024;
const READ_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The decision log's columns: the schema's table, and the table a version-4 log is rebuilt into.
macro_rules! decisions_table {
    () => {
        "(
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id     TEXT NOT NULL,
    station_id     TEXT NOT NULL,
    token_fp       TEXT NOT NULL,
    status         TEXT NOT NULL,
    reason         TEXT NOT NULL,
    authorizer     TEXT NOT NULL,
    accepted_at_us INTEGER NOT NULL,
    decided_at_us  INTEGER NOT NULL,
    processing_ms  INTEGER NOT NULL,
    chain          BLOB,
    revision       INTEGER NOT NULL DEFAULT 0,
    UNIQUE (request_id, revision)
)"
    };
}

const SCHEMA: &str = concat!(
    "
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
CREATE TABLE IF NOT EXISTS decisions ",
    decisions_table!(),
    ";
-- UNKNOWN decisions that may be revised (CONTRACT §2a), with the plain token to ask again:
-- deleted (securely) when revised or when revise_unknown_within_ms has passed.
CREATE TABLE IF NOT EXISTS revisable (
    request_id     TEXT PRIMARY KEY,
    station_id     TEXT NOT NULL,
    token_fp       TEXT NOT NULL,
    driver_token   TEXT NOT NULL,
    callback_url   TEXT,
    accepted_at_us INTEGER NOT NULL,
    decided_at_us  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS revisable_by_time ON revisable (decided_at_us);
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
    history         TEXT NOT NULL DEFAULT '',
    revision        INTEGER NOT NULL DEFAULT 0
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
"
);

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
pub(super) fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = open_connection(path, true)?;
    conn.execute(
        "ATTACH DATABASE ?1 AS stations",
        [station_index::path_for(path).to_string_lossy()],
    )?;
    Ok(conn)
}

/// Creates or checks the schema; returns the log id.
pub(super) fn migrate(conn: &mut Connection) -> rusqlite::Result<u32> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the database schema is version {version}; this chargegate knows up to {SCHEMA_VERSION}"
        )));
    }
    let tx = conn.transaction()?;
    tx.execute_batch(SCHEMA)?;
    // Logs created before the hash chain get the column; their records stay unchained.
    if !has_column(&tx, "decisions", "chain")? {
        tx.execute_batch("ALTER TABLE decisions ADD COLUMN chain BLOB;")?;
    }
    // Before version 5 a request had one decision: the log is rebuilt with revisions, keeping
    // every position and the sequence (positions are never reused, even after a purge to empty).
    if !has_column(&tx, "decisions", "revision")? {
        tx.execute_batch(
            concat!(
                "CREATE TABLE decisions_v5 ",
                decisions_table!(),
                ";
             INSERT INTO decisions_v5 (seq, request_id, station_id, token_fp, status, reason,
                                       authorizer, accepted_at_us, decided_at_us, processing_ms, chain)
                 SELECT seq, request_id, station_id, token_fp, status, reason, authorizer,
                        accepted_at_us, decided_at_us, processing_ms, chain
                 FROM decisions ORDER BY seq;
             DELETE FROM sqlite_sequence WHERE name = 'decisions_v5';
             INSERT INTO sqlite_sequence (name, seq)
                 SELECT 'decisions_v5', seq FROM sqlite_sequence WHERE name = 'decisions';
             DROP TABLE decisions;
             ALTER TABLE decisions_v5 RENAME TO decisions;
             CREATE INDEX decisions_by_time ON decisions (decided_at_us);
             CREATE INDEX decisions_by_status ON decisions (status, decided_at_us);"
            ),
        )?;
    }
    if !has_column(&tx, "deliveries", "revision")? {
        tx.execute_batch("ALTER TABLE deliveries ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;")?;
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

fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    conn.prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
        .exists([table, column])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log of version 4 (one decision per request_id) is rebuilt for revisions with every
    /// position, link and the sequence kept: a position purged before is never handed out again.
    #[test]
    fn a_version_4_log_is_rebuilt_for_revisions_keeping_positions_and_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chargegate.db");
        let mut conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO meta VALUES ('log_id', '42');
             CREATE TABLE decisions (
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
             CREATE TABLE deliveries (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE,
                 station_id TEXT NOT NULL, callback_url TEXT NOT NULL, host TEXT NOT NULL,
                 driver_token TEXT, status TEXT NOT NULL, reason TEXT NOT NULL,
                 decided_at_us INTEGER NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
                 next_attempt_us INTEGER, age_from_us INTEGER NOT NULL, finished_at_us INTEGER,
                 last_error TEXT NOT NULL DEFAULT '', history TEXT NOT NULL DEFAULT ''
             );
             INSERT INTO decisions VALUES
                 (7, 'a', 's', 'f', 'unknown', 'timeout', 'http', 1, 2, 1, x'01'),
                 (9, 'b', 's', 'f', 'allowed', 'granted', 'acl', 3, 4, 1, x'02');
             UPDATE sqlite_sequence SET seq = 12 WHERE name = 'decisions';
             PRAGMA user_version = 4;",
        )
        .unwrap();

        assert_eq!(migrate(&mut conn).unwrap(), 42);
        let kept: Vec<(i64, String, i64, Vec<u8>)> = conn
            .prepare("SELECT seq, request_id, revision, chain FROM decisions ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            kept,
            [
                (7, "a".to_owned(), 0, vec![1]),
                (9, "b".to_owned(), 0, vec![2])
            ]
        );
        // A revision of `a` is a new entry after the highest position ever handed out.
        conn.execute(
            "INSERT INTO decisions (request_id, station_id, token_fp, status, reason, authorizer,
                                    accepted_at_us, decided_at_us, processing_ms, revision)
             VALUES ('a', 's', 'f', 'allowed', 'granted', 'http', 1, 5, 1, 1)",
            [],
        )
        .unwrap();
        assert_eq!(conn.last_insert_rowid(), 13);
        // Still one decision per request and revision.
        assert!(
            conn.execute(
                "INSERT INTO decisions (request_id, station_id, token_fp, status, reason, authorizer,
                                        accepted_at_us, decided_at_us, processing_ms, revision)
                 VALUES ('b', 's', 'f', 'allowed', 'granted', 'acl', 1, 5, 1, 0)",
                [],
            )
            .is_err()
        );
        assert!(has_column(&conn, "deliveries", "revision").unwrap());
        let indexes: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'decisions'
                   AND name IN ('decisions_by_time', 'decisions_by_status')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 2);
        // Applying it again changes nothing.
        assert_eq!(migrate(&mut conn).unwrap(), 42);
    }
}
