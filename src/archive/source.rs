//! Where an export reads the decision log: the records with their chain links, in log order.
//! Both backends are read through a connection of the archive's own, so `chargegate audit export`
//! works whether a server runs or not (SQLite in WAL mode lets a reader beside the writer).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use rusqlite::{OpenFlags, OptionalExtension};

use crate::{
    audit::chain::{ChainedRecord, Link},
    config::StoreBackend,
    decision::Micros,
    store::StoreError,
};

/// One decision as the log keeps it, with its link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub position: u64,
    pub request_id: String,
    pub station_id: String,
    pub token_fp: String,
    pub status: String,
    pub reason: String,
    pub authorizer: String,
    pub accepted_at_us: i64,
    pub decided_at_us: i64,
    pub processing_ms: i64,
    /// 0 for a request's decision, 1 for its revision.
    pub revision: u32,
    /// `None` for a record written before the chain began.
    pub link: Option<Vec<u8>>,
}

impl Record {
    pub fn chained(&self) -> ChainedRecord<'_> {
        ChainedRecord {
            position: self.position as i64,
            request_id: &self.request_id,
            station_id: &self.station_id,
            token_fp: &self.token_fp,
            status: &self.status,
            reason: &self.reason,
            authorizer: &self.authorizer,
            accepted_at_us: self.accepted_at_us,
            decided_at_us: self.decided_at_us,
            processing_ms: self.processing_ms,
            revision: self.revision,
            chain: self.link.as_deref(),
        }
    }
}

/// The log's identity and its retained range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub log_id: u32,
    /// Positions at or below it were purged.
    pub floor: u64,
    /// The link of the last purged record (zeros when none was), where the retained chain starts.
    pub chain_floor: Link,
}

#[async_trait]
pub trait Source: Send + Sync {
    async fn head(&self) -> Result<Head, StoreError>;

    /// Up to `limit` records after `position`, in log order, stopping before the first one decided
    /// after `until`: what is returned is always a prefix of the log.
    async fn after(
        &self,
        position: u64,
        until: Option<Micros>,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError>;

    /// False when another exporter holds this log now; true (and held until the source is
    /// dropped) otherwise.
    async fn exclusive(&self) -> Result<bool, StoreError>;

    /// The record at `position`, if the log still holds it.
    async fn at(&self, position: u64) -> Result<Option<Record>, StoreError> {
        let records = self
            .after(position.saturating_sub(1), None, 1)
            .await?
            .into_iter()
            .find(|r| r.position == position);
        Ok(records)
    }
}

/// The source for the store a configuration names.
pub async fn open(store: &StoreBackend) -> Result<Arc<dyn Source>, StoreError> {
    match store {
        StoreBackend::Sqlite { path } => Ok(Arc::new(SqliteSource::open(path)?)),
        StoreBackend::Postgres { url } => Ok(Arc::new(PostgresSource::open(url).await?)),
    }
}

fn truncate_at(mut records: Vec<Record>, until: Option<Micros>) -> Vec<Record> {
    if let Some(until) = until
        && let Some(late) = records.iter().position(|r| r.decided_at_us > until.0)
    {
        records.truncate(late);
    }
    records
}

const COLUMNS: &str = "request_id, station_id, token_fp, status, reason, authorizer, \
                       accepted_at_us, decided_at_us, processing_ms, chain, revision";

/// A read-only connection to the embedded store's file.
pub struct SqliteSource {
    conn: Arc<Mutex<rusqlite::Connection>>,
    path: PathBuf,
    /// `archive.lock` beside the file, held while this source exports.
    lock: Mutex<Option<std::fs::File>>,
}

impl SqliteSource {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::backend(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no store at {}", path.display()),
            )));
        }
        let conn = rusqlite::Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(StoreError::backend)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(StoreError::backend)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_owned(),
            lock: Mutex::new(None),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&conn)
        })
        .await
        .map_err(StoreError::backend)?
        .map_err(StoreError::backend)
    }
}

impl std::fmt::Debug for SqliteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteSource")
            .field("path", &self.path)
            .finish()
    }
}

#[async_trait]
impl Source for SqliteSource {
    /// `archive.lock` beside the store's file, locked until the source is dropped: the CLI's
    /// export and a server's retention never write one archive at once.
    async fn exclusive(&self) -> Result<bool, StoreError> {
        let mut held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_some() {
            return Ok(true);
        }
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path.with_file_name("archive.lock"))
            .map_err(StoreError::backend)?;
        match file.try_lock() {
            Ok(()) => {
                *held = Some(file);
                Ok(true)
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::backend(e)),
        }
    }

    async fn head(&self) -> Result<Head, StoreError> {
        self.with(|conn| {
            let meta = |key: &str| -> rusqlite::Result<Option<String>> {
                conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                    .optional()
            };
            let log_id = meta("log_id")?.and_then(|v| v.parse().ok()).unwrap_or(0);
            let floor = meta("purged_through")?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let chain_floor = crate::audit::chain::floor(conn)?;
            Ok(Head {
                log_id,
                floor,
                chain_floor,
            })
        })
        .await
    }

    async fn after(
        &self,
        position: u64,
        until: Option<Micros>,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let records = self
            .with(move |conn| {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT seq, {COLUMNS} FROM decisions WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                ))?;
                let rows = stmt.query_map([position as i64, limit as i64], |r| {
                    Ok(Record {
                        position: r.get::<_, i64>(0)? as u64,
                        request_id: r.get(1)?,
                        station_id: r.get(2)?,
                        token_fp: r.get(3)?,
                        status: r.get(4)?,
                        reason: r.get(5)?,
                        authorizer: r.get(6)?,
                        accepted_at_us: r.get(7)?,
                        decided_at_us: r.get(8)?,
                        processing_ms: r.get(9)?,
                        link: r.get(10)?,
                        revision: r.get(11)?,
                    })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        Ok(truncate_at(records, until))
    }
}

/// A connection of its own to the shared PostgreSQL store.
pub struct PostgresSource {
    client: tokio_postgres::Client,
}

impl PostgresSource {
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let client =
            crate::store::postgres::connect(&crate::store::postgres::parse_url(url)?).await?;
        Ok(Self { client })
    }
}

/// The advisory lock an exporting instance holds ("archive" folded into 63 bits).
const ARCHIVE_LOCK: i64 = 0x0061_7263_6869_7665;

#[async_trait]
impl Source for PostgresSource {
    /// The archive's session lock: one instance at a time exports.
    async fn exclusive(&self) -> Result<bool, StoreError> {
        Ok(self
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&ARCHIVE_LOCK])
            .await
            .map_err(StoreError::backend)?
            .get(0))
    }

    async fn head(&self) -> Result<Head, StoreError> {
        let log_id: Option<String> = self
            .client
            .query_opt(
                "SELECT value FROM chargegate_meta WHERE key = 'log_id'",
                &[],
            )
            .await
            .map_err(StoreError::backend)?
            .map(|r| r.get(0));
        let head = self
            .client
            .query_one("SELECT floor, chain_floor FROM log_head", &[])
            .await
            .map_err(StoreError::backend)?;
        let chain_floor: Vec<u8> = head.get(1);
        Ok(Head {
            log_id: log_id.and_then(|v| v.parse().ok()).unwrap_or(0),
            floor: head.get::<_, i64>(0) as u64,
            chain_floor: chain_floor.try_into().unwrap_or([0; 32]),
        })
    }

    async fn after(
        &self,
        position: u64,
        until: Option<Micros>,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT position, {COLUMNS} FROM decisions
                     WHERE position > $1 ORDER BY position LIMIT $2"
                ),
                &[&(position as i64), &(limit as i64)],
            )
            .await
            .map_err(StoreError::backend)?;
        let records = rows
            .iter()
            .map(|r| Record {
                position: r.get::<_, i64>(0) as u64,
                request_id: r.get(1),
                station_id: r.get(2),
                token_fp: r.get(3),
                status: r.get(4),
                reason: r.get(5),
                authorizer: r.get(6),
                accepted_at_us: r.get(7),
                decided_at_us: r.get(8),
                processing_ms: r.get::<_, i64>(9),
                link: Some(r.get(10)),
                revision: r.get::<_, i32>(11) as u32,
            })
            .collect();
        Ok(truncate_at(records, until))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_exporter_of_an_embedded_store_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chargegate.db");
        rusqlite::Connection::open(&path).unwrap();
        let first = SqliteSource::open(&path).unwrap();
        let second = SqliteSource::open(&path).unwrap();
        assert!(first.exclusive().await.unwrap());
        assert!(first.exclusive().await.unwrap(), "held already");
        assert!(
            !second.exclusive().await.unwrap(),
            "another exporter holds it"
        );
        drop(first);
        assert!(
            second.exclusive().await.unwrap(),
            "free once the first is gone"
        );
    }
}
