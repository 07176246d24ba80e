//! The audit trail (CONTRACT §6): a record of every RPC, and the decision log made
//! tamper-evident.
//!
//! - [`layer`]: the tower layer that records every call, in one place for every service.
//! - [`AuditTrail`] is the port: call records kept, calls and decisions queried; [`sqlite`]
//!   implements it on the embedded store.
//! - [`chain`]: the keyed hash chain over decisions, and its verification.
//! - [`signals`]: anomaly signals (UNKNOWN share, timeouts, failing stations) as metrics.
//!
//! Recording never blocks a call: the layer hands each record to a [`CallSink`], a bounded
//! buffer drained in batches by [`run_recorder`]. When the buffer is full the record is dropped,
//! counted in `chargegate_audit_records_dropped_total` and logged — never silently.

pub mod abuse;
pub mod chain;
pub mod layer;
pub mod postgres;
pub mod signals;
pub mod sqlite;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::{
    decision::{Micros, RecordedDecision, Status},
    store::StoreError,
};

/// Records waiting to be written before new ones are dropped.
const BUFFER: usize = 16 * 1024;
/// Most records written at once.
const BATCH: usize = 1024;
/// How long the recorder gathers records before writing a batch that is not full.
const GATHER: Duration = Duration::from_millis(20);
/// Longest text kept of a caller-given station or request id.
const MAX_NOTED: usize = 128;

/// A server stream's two records; unary calls have one, with `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    None,
    Open,
    Close,
}

impl StreamEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "",
            Self::Open => "open",
            Self::Close => "close",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::None, Self::Open, Self::Close]
            .into_iter()
            .find(|e| e.as_str() == s)
    }
}

/// One recorded call (or stream event). Never holds a driver token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRecord {
    pub at: Micros,
    /// `/package.Service/Method`.
    pub method: String,
    pub peer: String,
    /// The client identity, when client identities are configured.
    pub client: String,
    pub station_id: String,
    pub request_id: String,
    /// Canonical gRPC code name, e.g. `INVALID_ARGUMENT`.
    pub code: String,
    pub latency_us: u64,
    pub event: StreamEvent,
    pub messages_sent: u64,
}

/// Where a handler notes the station and request of its call for the audit layer. The layer puts
/// one in each request's extensions and reads it when the call ends.
#[derive(Debug, Default)]
pub struct AuditSlot {
    noted: Mutex<(String, String)>,
    /// The client's name, set by the authentication layer.
    client: std::sync::OnceLock<String>,
}

impl AuditSlot {
    /// Notes the name of the client making the call (never its credential).
    pub fn note_client(&self, name: &str) {
        let _ = self.client.set(name.to_owned());
    }

    fn client(&self) -> String {
        self.client.get().cloned().unwrap_or_default()
    }

    fn take(&self) -> (String, String) {
        std::mem::take(&mut *self.noted.lock().expect("audit slot lock"))
    }

    /// What was noted, kept for a later record (a stream's close after its open).
    fn peek(&self) -> (String, String) {
        self.noted.lock().expect("audit slot lock").clone()
    }

    /// Notes a station already in canonical form and a valid request id (an accepted call).
    pub fn note_canonical(&self, station_id: &str, request_id: &str) {
        let mut noted = self.noted.lock().expect("audit slot lock");
        noted.0 = station_id.to_owned();
        noted.1 = request_id.to_owned();
    }

    /// Notes the station and request the call is about (empty: unchanged). Caller-given text is
    /// cut to a bounded length. Station ids (several separated by commas) are kept canonical;
    /// one that is not a station id but has the shape of a driver token (a caller who swapped
    /// the fields) is recorded as `(redacted)`, so no token reaches a call record.
    pub fn note(&self, station_id: &str, request_id: &str) {
        let cut = |s: &str| s.chars().take(MAX_NOTED).collect::<String>();
        let mut noted = self.noted.lock().expect("audit slot lock");
        if !station_id.is_empty() {
            let stations: Vec<String> = station_id
                .split(',')
                .map(|part| match crate::intake::parse_station_id(part) {
                    Ok(canonical) => canonical,
                    Err(_) if crate::token::is_well_formed(part) => "(redacted)".to_owned(),
                    Err(_) => part.to_owned(),
                })
                .collect();
            noted.0 = cut(&stations.join(","));
        }
        if !request_id.is_empty() {
            noted.1 = cut(request_id);
        }
    }
}

/// The audit slot of a call, when the audit layer is on.
pub fn slot<T>(request: &tonic::Request<T>) -> Option<Arc<AuditSlot>> {
    request.extensions().get::<Arc<AuditSlot>>().cloned()
}

/// Notes the station and request a call is about, for its call record.
pub fn note<T>(request: &tonic::Request<T>, station_id: &str, request_id: &str) {
    if let Some(slot) = request.extensions().get::<Arc<AuditSlot>>() {
        slot.note(station_id, request_id);
    }
}

/// A filter over call records (`QueryCalls`).
#[derive(Clone, Debug, Default)]
pub struct CallQuery {
    /// Exact method path or bare method name; empty matches every method.
    pub method: String,
    pub from: Option<Micros>,
    pub to: Option<Micros>,
}

/// A filter over decisions (`QueryDecisions`).
#[derive(Clone, Debug, Default)]
pub struct DecisionQuery {
    /// A canonical station id; `None` matches every station.
    pub station_id: Option<String>,
    /// Empty matches every status.
    pub statuses: Vec<Status>,
    pub from: Option<Micros>,
    pub to: Option<Micros>,
}

/// A position in a time-ordered listing: `(time, seq)`; pages continue after it.
pub type Position = (i64, i64);

/// The port of the audit trail: call records, and queries over calls and decisions.
#[async_trait]
pub trait AuditTrail: Send + Sync + 'static {
    async fn record_calls(&self, records: Vec<CallRecord>) -> Result<(), StoreError>;

    /// Up to `limit` records matching `query` after `after`, oldest first, each with its position.
    async fn query_calls(
        &self,
        query: CallQuery,
        after: Option<Position>,
        limit: usize,
    ) -> Result<Vec<(Position, CallRecord)>, StoreError>;

    /// Up to `limit` decisions matching `query` after `after`, by decision time.
    async fn query_decisions(
        &self,
        query: DecisionQuery,
        after: Option<Position>,
        limit: usize,
    ) -> Result<Vec<(Position, RecordedDecision)>, StoreError>;

    /// Brings the station index up to the decision log's head (it is kept asynchronously, see
    /// `audit::sqlite`). Returns how many decisions were indexed.
    async fn index_stations(&self) -> Result<u64, StoreError>;

    /// Deletes up to `max` call records older than `cutoff`; returns how many.
    async fn purge_calls_before(&self, cutoff: Micros, max: usize) -> Result<u64, StoreError>;
}

/// The layer's end of the record buffer. Cheap to clone.
#[derive(Clone)]
pub struct CallSink {
    tx: mpsc::Sender<CallRecord>,
    dropped: Arc<Dropped>,
}

/// Records lost to a full buffer, and when that was last logged.
struct Dropped {
    total: AtomicU64,
    since_log: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

impl CallSink {
    /// A sink and the receiver [`run_recorder`] drains.
    pub fn new() -> (Self, mpsc::Receiver<CallRecord>) {
        let (tx, rx) = mpsc::channel(BUFFER);
        (
            Self {
                tx,
                dropped: Arc::new(Dropped {
                    total: AtomicU64::new(0),
                    since_log: AtomicU64::new(0),
                    last_log: Mutex::new(None),
                }),
            },
            rx,
        )
    }

    /// Hands a record to the recorder without waiting; a full buffer drops it, counted and logged.
    pub fn submit(&self, record: CallRecord) {
        if self.tx.try_send(record).is_ok() {
            return;
        }
        metrics::counter!("chargegate_audit_records_dropped_total").increment(1);
        self.dropped.total.fetch_add(1, Ordering::Relaxed);
        let since = self.dropped.since_log.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.dropped.last_log.lock().expect("drop log lock");
        if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            self.dropped.since_log.fetch_sub(since, Ordering::Relaxed);
            tracing::warn!(
                dropped = since,
                total = self.dropped.total.load(Ordering::Relaxed),
                "call records dropped: the audit buffer is full (the store is not keeping up)"
            );
        }
    }
}

/// Writes call records in batches until every sink is dropped and the buffer is empty.
pub async fn run_recorder(log: Arc<dyn AuditTrail>, mut records: mpsc::Receiver<CallRecord>) {
    let mut batch = Vec::with_capacity(BATCH);
    while crate::store::gather_batch(&mut records, &mut batch, BATCH, GATHER).await {
        let n = batch.len() as u64;
        match log.record_calls(std::mem::take(&mut batch)).await {
            Ok(()) => metrics::counter!("chargegate_audit_records_total").increment(n),
            Err(e) => {
                metrics::counter!("chargegate_audit_records_dropped_total").increment(n);
                tracing::warn!(error = %e, records = n, "call records could not be written and are lost");
            }
        }
    }
}

/// Keeps the station index of the decision log current, every second, until `shutdown`.
pub async fn run_station_indexer(
    trail: Arc<dyn AuditTrail>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = trail.index_stations().await {
            tracing::warn!(error = %e, "indexing decisions by station failed; retrying");
        }
    }
}
