//! The store port: the decision log (and, as they arrive, audit records, grants and the webhook
//! outbox). [`sqlite`] is the embedded backend; a PostgreSQL backend implements the same trait.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::{
    decision::{Micros, RecordedDecision},
    token::Fingerprint,
};

/// How much lower than the runtime and the writer the store's background threads run (as a
/// nice increment): they index and checkpoint in the idle moments of a busy core instead of
/// holding acknowledgements behind them.
#[cfg(target_os = "linux")]
const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority, where threads have their own (Linux).
pub(crate) fn background_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::nice(BACKGROUND_NICE) {
        tracing::debug!(error = %e, "could not lower a background thread's priority");
    }
}

/// A failure of a queue or store backend. Never carries a driver token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the store failed")]
    Backend(#[source] Arc<dyn std::error::Error + Send + Sync>),
    #[error("the store is shutting down")]
    Closed,
}

impl StoreError {
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Backend(Arc::new(e))
    }
}

/// Which stations a read covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StationFilter {
    All,
    /// Canonical (lower-case) station ids.
    Only(Vec<String>),
}

/// The positions a decision log can be read between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogBounds {
    /// Decisions at or before this position were purged; a cursor before it is out of range.
    pub floor: u64,
    /// The position of the newest recorded decision (0 when there is none).
    pub head: u64,
}

/// A request the log knows about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestState {
    Pending {
        station_id: String,
        fingerprint: Fingerprint,
        accepted_at: Micros,
    },
    Decided(RecordedDecision),
}

impl RequestState {
    /// The station the request was made at.
    pub fn station_id(&self) -> &str {
        match self {
            RequestState::Pending { station_id, .. } => station_id,
            RequestState::Decided(d) => d.station_id(),
        }
    }
}

/// The decision log: append-only, one record per request_id, each at a position that orders it.
#[async_trait]
pub trait DecisionLog: Send + Sync + 'static {
    /// Identifies this log inside its cursors.
    fn log_id(&self) -> u32;

    /// Up to `limit` decisions after `position`, in log order, for the stations in `filter`.
    async fn read_after(
        &self,
        position: u64,
        filter: &StationFilter,
        limit: usize,
    ) -> Result<Vec<RecordedDecision>, StoreError>;

    async fn bounds(&self) -> Result<LogBounds, StoreError>;

    /// Pending or decided (the newest entry: its revision, when it has one); `None` for a
    /// request_id never accepted (or no longer retained).
    async fn request_state(&self, request_id: &str) -> Result<Option<RequestState>, StoreError>;

    /// Deletes up to `max` of the oldest decisions decided before `cutoff` and at positions up to
    /// `through` (the archive's last, when retention archives), with their request keys, raising
    /// [`LogBounds::floor`]. Returns how many were deleted.
    async fn purge_before(
        &self,
        cutoff: Micros,
        through: u64,
        max: usize,
    ) -> Result<u64, StoreError>;
}

/// One grant of the access list as the store keeps it: never the token, only its fingerprint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredGrant {
    /// A canonical station id, or `*` for every station.
    pub station_id: String,
    pub fingerprint: Fingerprint,
    pub expires_at: Option<Micros>,
    pub blocked: bool,
}

/// The grants of the embedded authorizer when no `acl_file` is set (the `Grants` service).
#[async_trait]
pub trait GrantStore: Send + Sync + 'static {
    /// Creates or replaces the grant for its station and token.
    async fn put_grant(&self, grant: StoredGrant) -> Result<(), StoreError>;
    /// True when a grant was deleted.
    async fn delete_grant(
        &self,
        station_id: &str,
        fingerprint: &Fingerprint,
    ) -> Result<bool, StoreError>;
    async fn list_grants(&self) -> Result<Vec<StoredGrant>, StoreError>;
}

/// Waits for the next records on `rx` and gathers more for up to `gather` (or until `batch`
/// holds `max`), so writers that nobody waits on make a few large commits rather than many small
/// ones. Returns false once the channel is closed and drained.
pub async fn gather_batch<T>(
    rx: &mut tokio::sync::mpsc::Receiver<T>,
    batch: &mut Vec<T>,
    max: usize,
    gather: std::time::Duration,
) -> bool {
    if rx.recv_many(batch, max).await == 0 {
        return false;
    }
    let gathering = tokio::time::sleep(gather);
    tokio::pin!(gathering);
    while batch.len() < max {
        let room = max - batch.len();
        tokio::select! {
            _ = &mut gathering => break,
            n = rx.recv_many(batch, room) => if n == 0 { break },
        }
    }
    true
}

/// Rows purged per write, so retention never holds the writer for long.
const PURGE_BATCH: usize = 1000;
/// How often retention runs (and once at start-up).
const PURGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Where retention archives decisions before it purges them (`audit_archive_url`).
pub struct ArchiveTarget {
    pub archive: crate::archive::Archive,
    /// The store to read the log from, with a connection of the archive's own.
    pub store: crate::config::StoreBackend,
}

/// Purges decisions and call records older than `retention`, in small batches, at start-up and
/// every hour, until `shutdown`. With an archive, it first exports what is to be purged, and
/// purges no decision the archive's manifest does not hold.
pub async fn run_retention(
    log: Arc<dyn DecisionLog>,
    calls: Arc<dyn crate::audit::AuditTrail>,
    retention: std::time::Duration,
    archive: Option<ArchiveTarget>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(PURGE_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cutoff = Micros(Micros::now().0.saturating_sub(retention.as_micros() as i64));
        let through = match &archive {
            None => u64::MAX,
            Some(target) => tokio::select! {
                _ = shutdown.cancelled() => return,
                through = archive_before(target, cutoff) => through,
            },
        };
        let decisions =
            purge_in_batches(&shutdown, || log.purge_before(cutoff, through, PURGE_BATCH)).await;
        let records =
            purge_in_batches(&shutdown, || calls.purge_calls_before(cutoff, PURGE_BATCH)).await;
        if decisions + records > 0 {
            tracing::info!(
                decisions,
                call_records = records,
                "purged records past audit_retention_days"
            );
        }
    }
}

/// Exports the decisions decided before `cutoff` to the archive; returns the position through
/// which the archive holds the log (0 when it cannot be read: then nothing is purged).
async fn archive_before(target: &ArchiveTarget, cutoff: Micros) -> u64 {
    use crate::archive;
    let exported = async {
        let source = archive::source::open(&target.store).await?;
        if !source.exclusive().await? {
            tracing::debug!("another exporter holds the log; purging what the archive holds");
            return Ok::<_, archive::ArchiveError>(None);
        }
        archive::export(&*source, &target.archive, cutoff, archive::CHUNK_MAX)
            .await
            .map(Some)
    };
    match exported.await {
        Ok(Some(done)) => {
            if done.decisions > 0 {
                tracing::info!(
                    decisions = done.decisions,
                    chunks = done.chunks.len(),
                    bytes = done.bytes,
                    archive = %target.archive.url(),
                    "archived decisions before purging them"
                );
            }
            return done.archived_through.unwrap_or(0);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(
            error = %e,
            archive = %target.archive.url(),
            "archiving decisions failed; only what the archive already holds is purged"
        ),
    }
    match target.archive.manifest().await {
        Ok(manifest) => manifest.and_then(|m| m.archived_through()).unwrap_or(0),
        Err(e) => {
            tracing::warn!(error = %e, "the archive's manifest cannot be read; no decision is purged");
            0
        }
    }
}

/// Runs `purge` until it deletes less than a batch (or fails, or shutdown); returns the total.
async fn purge_in_batches<F, Fut>(shutdown: &tokio_util::sync::CancellationToken, purge: F) -> u64
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<u64, StoreError>>,
{
    let mut total = 0;
    loop {
        match purge().await {
            Ok(n) => {
                total += n;
                if (n as usize) < PURGE_BATCH || shutdown.is_cancelled() {
                    return total;
                }
                tokio::task::yield_now().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "purging old records failed; retrying at the next run");
                return total;
            }
        }
    }
}
