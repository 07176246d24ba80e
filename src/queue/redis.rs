//! The queue on Redis Streams, beside PostgreSQL (CONTRACT §10): Redis carries, PostgreSQL is
//! the truth.
//!
//! **Layout.** One stream per cluster, `chargegate:<log_id>:requests` (`log_id` is the shared
//! log's id, so two clusters on one Redis never meet), read by the consumer group `workers`; each
//! instance is one consumer, named by `instance_id`. An entry carries one field, `r`: the
//! request_id. Nothing else — no token: a worker reads the request (station, fingerprint,
//! callback URL, token) from its PostgreSQL `queue` row, so a Redis snapshot or AOF file never
//! holds a driver token.
//!
//! **A request's way.** Its key and its `queue` row commit in PostgreSQL (the row leased to this
//! instance for [`DISPATCH_LEASES`] leases), then `XADD`, then the acknowledgement. A worker reads
//! it with `XREADGROUP`, decides, commits the decision and deletes the row in one PostgreSQL
//! transaction, then `XACK`s and `XDEL`s the entry. The stream is never trimmed by length: that
//! would drop work not done yet.
//!
//! **Reclaim.** An entry pending longer than the lease (`authorize_timeout_ms` plus
//! `reclaim_margin_ms`: its consumer died, or hangs) is taken over with `XCLAIM` by whichever
//! instance looks first (every second). An entry delivered [`MAX_DELIVERIES`] times is decided
//! `UNKNOWN` / `authorizer_error` once instead of being retried forever. A consumer idle for
//! [`STALE_CONSUMER_LEASES`] leases with nothing pending (an instance name that is not coming
//! back) is removed from the group.
//!
//! **The sweeper** closes the seams between the two systems: a `queue` row whose dispatch lease
//! ran out (its `XADD` never happened because the instance died in between, or Redis lost the
//! entry: a flush, a restart without AOF, a failover) is leased again with `SKIP LOCKED` (one
//! instance takes each) and put on the stream again. When the group itself is gone (Redis lost
//! its data), every waiting row is put back at once. A late duplicate entry finds its row gone,
//! or its decision recorded, and records nothing.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use redis::{
    AsyncConnectionConfig, Client, Value,
    aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    streams::{
        StreamClaimReply, StreamInfoConsumersReply, StreamPendingCountReply, StreamReadReply,
    },
};
use tokio_util::sync::CancellationToken;

use super::{
    Claim, ClaimHandle, EnqueueOutcome, MAX_DELIVERIES, Queue, QueuedRequest, Settled,
    postgres::PostgresQueue,
};
use crate::{
    decision::{NewDecision, RecordedDecision, Verdict},
    health::Probe,
    intake::NewRequest,
    store::{DecisionLog, StoreError, postgres::Postgres},
};

/// The consumer group every instance reads in.
const GROUP: &str = "workers";
/// A `queue` row stays with the instance that dispatched it for this many leases before the
/// sweeper dispatches it again: longer than a reclaim takes, so a live entry is rarely doubled.
const DISPATCH_LEASES: u32 = 3;
/// How often pending entries are looked at for reclaim, and the sweeper runs.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// A consumer idle this many leases with nothing pending is an instance name that is not coming
/// back (its pending entries were reclaimed by now): housekeeping removes it from the group.
const STALE_CONSUMER_LEASES: u32 = 10;
/// The longest a blocking read waits before the worker looks again.
const BLOCK: Duration = Duration::from_millis(250);
/// The longest a command waits for Redis' answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

fn redis_error(e: redis::RedisError) -> StoreError {
    StoreError::backend(e)
}

/// A connection for commands, with a response timeout, that reconnects on its own.
pub(crate) async fn command_connection(client: &Client) -> Result<ConnectionManager, StoreError> {
    ConnectionManager::new_with_config(
        client.clone(),
        ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1)),
    )
    .await
    .map_err(redis_error)
}

pub struct RedisQueue {
    shared: Arc<Shared>,
}

struct Shared {
    db: Postgres,
    /// The `queue` rows, as the PostgreSQL queue keeps them: what Redis dispatches.
    rows: PostgresQueue,
    client: Client,
    /// Commands with a response timeout; reconnects on its own.
    commands: ConnectionManager,
    /// The blocking `XREADGROUP`, on a connection of its own without a response timeout.
    blocking: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    key: String,
    consumer: String,
    lease: Duration,
    /// Entries the blocking read brought, not handed out yet.
    buffer: Mutex<VecDeque<Entry>>,
    last_reclaim: Mutex<Instant>,
    stop: CancellationToken,
}

/// A stream entry: its id, and the request it carries.
struct Entry {
    id: String,
    request_id: String,
    deliveries: usize,
}

impl RedisQueue {
    /// Connects to Redis at `url` for the cluster whose store is `db`; this instance reads as
    /// `consumer`, and takes over at once what `previous` (its name before it restarted) left
    /// pending. `lease` must outlast a decision: the authorizer deadline plus the time to record
    /// it. Starts the sweeper.
    pub async fn open(
        url: &str,
        db: Postgres,
        consumer: String,
        previous: Option<String>,
        lease: Duration,
    ) -> Result<Self, StoreError> {
        let client = Client::open(url).map_err(redis_error)?;
        let commands = command_connection(&client).await?;
        let shared = Arc::new(Shared {
            key: format!("chargegate:{}:requests", db.log_id()),
            rows: PostgresQueue::new(db.clone(), lease),
            db,
            client,
            commands,
            blocking: tokio::sync::Mutex::new(None),
            consumer,
            lease,
            buffer: Mutex::new(VecDeque::new()),
            last_reclaim: Mutex::new(Instant::now() - HOUSEKEEPING),
            stop: CancellationToken::new(),
        });
        shared.ensure_group().await?;
        if let Some(previous) = previous.filter(|p| *p != shared.consumer) {
            shared.take_over(&previous).await?;
        }
        tokio::spawn(sweep(shared.clone()));
        Ok(Self { shared })
    }

    /// How long a new `queue` row stays with the instance that dispatched it, for a claim lease
    /// of `lease`.
    pub fn dispatch_lease(lease: Duration) -> Duration {
        lease * DISPATCH_LEASES
    }

    /// Stops the sweeper.
    pub fn close(&self) {
        self.shared.stop.cancel();
    }
}

impl Shared {
    fn commands(&self) -> ConnectionManager {
        self.commands.clone()
    }

    /// Creates the group (and the stream) unless it exists. Returns whether it was created.
    async fn ensure_group(&self) -> Result<bool, StoreError> {
        let created: Result<(), _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.key)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.commands())
            .await;
        match created {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
            Err(e) => Err(redis_error(e)),
        }
    }

    /// After Redis lost the group (a flush, a restart without its data): the group again, and
    /// every waiting request dispatched again at once.
    async fn recover_group(&self) {
        match self.ensure_group().await {
            Ok(true) => {
                tracing::warn!(
                    "the Redis stream's consumer group was gone (Redis lost its data); dispatching every waiting request again"
                );
                if let Err(e) = self.db.release_dispatch_leases().await {
                    tracing::warn!(error = %e, "releasing the dispatch leases failed; the sweeper takes them when they end");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "creating the Redis consumer group failed"),
        }
    }

    async fn dispatch(&self, request_ids: &[String]) -> Result<(), StoreError> {
        if request_ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for id in request_ids {
            pipe.cmd("XADD")
                .arg(&self.key)
                .arg("*")
                .arg("r")
                .arg(id)
                .ignore();
        }
        pipe.query_async::<()>(&mut self.commands())
            .await
            .map_err(redis_error)
    }

    async fn complete(&self, entry_ids: &[String]) -> Result<(), StoreError> {
        if entry_ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("XACK")
            .arg(&self.key)
            .arg(GROUP)
            .arg(entry_ids)
            .ignore()
            .cmd("XDEL")
            .arg(&self.key)
            .arg(entry_ids)
            .ignore();
        pipe.query_async::<()>(&mut self.commands())
            .await
            .map_err(redis_error)
    }

    /// New entries for this consumer, waiting up to `block` for one.
    async fn read(&self, count: usize, block: Option<Duration>) -> Result<Vec<Entry>, StoreError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&self.key).arg(">");
        let reply: Result<Option<StreamReadReply>, _> = match block {
            None => cmd.query_async(&mut self.commands()).await,
            Some(_) => {
                let mut guard = self.blocking.lock().await;
                if guard.is_none() {
                    let config = AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(RESPONSE_TIMEOUT))
                        .set_response_timeout(None);
                    *guard = Some(
                        self.client
                            .get_multiplexed_async_connection_with_config(&config)
                            .await
                            .map_err(redis_error)?,
                    );
                }
                let connection = guard.as_mut().expect("connected above");
                let reply = cmd.query_async(connection).await;
                if reply.is_err() {
                    *guard = None;
                }
                reply
            }
        };
        match reply {
            Ok(reply) => Ok(reply
                .into_iter()
                .flat_map(|r| r.keys)
                .flat_map(|k| k.ids)
                .map(|e| Entry {
                    request_id: e.get("r").unwrap_or_default(),
                    id: e.id,
                    deliveries: 1,
                })
                .collect()),
            Err(e) if e.code() == Some("NOGROUP") => {
                self.recover_group().await;
                Ok(Vec::new())
            }
            Err(e) => Err(redis_error(e)),
        }
    }

    /// Takes over every entry `previous` (this instance before it restarted) left pending, and
    /// removes that consumer from the group.
    async fn take_over(&self, previous: &str) -> Result<(), StoreError> {
        let mut taken = 0;
        loop {
            let pending: StreamPendingCountReply = redis::cmd("XPENDING")
                .arg(&self.key)
                .arg(GROUP)
                .arg("-")
                .arg("+")
                .arg(512)
                .arg(previous)
                .query_async(&mut self.commands())
                .await
                .map_err(redis_error)?;
            if pending.ids.is_empty() {
                break;
            }
            let entries = self.claim_pending(&pending, 0).await?;
            taken += entries.len();
            let claimed_none = entries.is_empty();
            self.buffer.lock().expect("buffer lock").extend(entries);
            if claimed_none {
                break;
            }
        }
        let _: Result<i64, _> = redis::cmd("XGROUP")
            .arg("DELCONSUMER")
            .arg(&self.key)
            .arg(GROUP)
            .arg(previous)
            .query_async(&mut self.commands())
            .await;
        if taken > 0 {
            tracing::info!(
                entries = taken,
                "took back the queued requests this instance held before it restarted"
            );
        }
        Ok(())
    }

    /// Removes from the group the consumers other than this one that have been idle for
    /// [`STALE_CONSUMER_LEASES`] leases with nothing pending. A live instance reads every
    /// [`BLOCK`], so it is never that idle; one removed by mistake is recreated by its next read.
    async fn forget_stale_consumers(&self) -> Result<(), StoreError> {
        let stale = (self.lease * STALE_CONSUMER_LEASES).as_millis() as usize;
        let reply: StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.key)
            .arg(GROUP)
            .query_async(&mut self.commands())
            .await
            .map_err(redis_error)?;
        for gone in reply
            .consumers
            .iter()
            .filter(|c| c.name != self.consumer && c.pending == 0 && c.idle > stale)
        {
            let _: i64 = redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(&self.key)
                .arg(GROUP)
                .arg(&gone.name)
                .query_async(&mut self.commands())
                .await
                .map_err(redis_error)?;
            tracing::info!(consumer = %gone.name, idle_ms = gone.idle, "removed a Redis consumer that is not coming back");
        }
        Ok(())
    }

    /// `XCLAIM`s the `pending` entries idle at least `idle_ms` for this consumer.
    async fn claim_pending(
        &self,
        pending: &StreamPendingCountReply,
        idle_ms: u64,
    ) -> Result<Vec<Entry>, StoreError> {
        let ids: Vec<&str> = pending.ids.iter().map(|p| p.id.as_str()).collect();
        let claimed: StreamClaimReply = redis::cmd("XCLAIM")
            .arg(&self.key)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(idle_ms)
            .arg(&ids)
            .query_async(&mut self.commands())
            .await
            .map_err(redis_error)?;
        Ok(claimed
            .ids
            .into_iter()
            .map(|e| {
                let before = pending
                    .ids
                    .iter()
                    .find(|p| p.id == e.id)
                    .map_or(0, |p| p.times_delivered);
                Entry {
                    request_id: e.get("r").unwrap_or_default(),
                    id: e.id,
                    deliveries: before + 1,
                }
            })
            .collect())
    }

    /// Entries pending longer than the lease, taken over by this consumer (looked for every
    /// [`HOUSEKEEPING`], or half a lease when that is shorter; `XCLAIM` with the idle time gives
    /// each to one instance).
    async fn reclaim(&self, count: usize) -> Result<Vec<Entry>, StoreError> {
        {
            let mut last = self.last_reclaim.lock().expect("reclaim lock");
            if last.elapsed() < HOUSEKEEPING.min(self.lease / 2) {
                return Ok(Vec::new());
            }
            *last = Instant::now();
        }
        let idle = self.lease.as_millis() as u64;
        let pending: StreamPendingCountReply = match redis::cmd("XPENDING")
            .arg(&self.key)
            .arg(GROUP)
            .arg("IDLE")
            .arg(idle)
            .arg("-")
            .arg("+")
            .arg(count)
            .query_async(&mut self.commands())
            .await
        {
            Ok(p) => p,
            Err(e) if e.code() == Some("NOGROUP") => {
                self.recover_group().await;
                return Ok(Vec::new());
            }
            Err(e) => return Err(redis_error(e)),
        };
        if pending.ids.is_empty() {
            return Ok(Vec::new());
        }
        let taken = self.claim_pending(&pending, idle).await?;
        if !taken.is_empty() {
            tracing::info!(
                entries = taken.len(),
                "reclaimed queued requests whose consumer did not finish them"
            );
        }
        Ok(taken)
    }
}

/// Puts back on the stream the requests whose dispatch lease ran out, and removes consumers that
/// are not coming back, every second.
async fn sweep(shared: Arc<Shared>) {
    let lease = RedisQueue::dispatch_lease(shared.lease);
    let mut tick = tokio::time::interval(HOUSEKEEPING);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = shared.forget_stale_consumers().await {
            tracing::debug!(error = %e, "looking for stale Redis consumers failed");
        }
        loop {
            let ids = match shared.db.redispatch(512, lease).await {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(error = %e, "looking for requests to dispatch again failed");
                    break;
                }
            };
            if ids.is_empty() {
                break;
            }
            let n = ids.len();
            match shared.dispatch(&ids).await {
                Ok(()) => tracing::info!(
                    requests = n,
                    "dispatched again requests whose stream entry was lost or never written"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, requests = n, "dispatching requests again failed; they are tried again when their lease ends");
                    break;
                }
            }
            if n < 512 {
                break;
            }
        }
    }
}

#[async_trait]
impl Queue for RedisQueue {
    async fn enqueue(&self, request: NewRequest) -> Result<EnqueueOutcome, StoreError> {
        let id = request.request_id.clone();
        let outcome = self.shared.db.enqueue(request).await?;
        if let EnqueueOutcome::Accepted { .. } = outcome {
            crate::failpoint::reached(crate::failpoint::AFTER_REQUEST_COMMIT);
        }
        if let EnqueueOutcome::Accepted { .. } = outcome
            && let Err(e) = self.shared.dispatch(std::slice::from_ref(&id)).await
        {
            // Durable in PostgreSQL: its dispatch lease ends now, and the sweeper puts it on
            // the stream within a second of Redis answering again.
            tracing::warn!(error = %e, "putting a request on the Redis stream failed; the sweeper dispatches it");
            if let Err(e) = self.shared.db.release_dispatch_lease(&id).await {
                tracing::warn!(error = %e, "releasing a dispatch lease failed; the request is dispatched when its lease ends");
            }
        }
        Ok(outcome)
    }

    async fn enqueue_decided(
        &self,
        request: NewRequest,
        verdict: Verdict,
    ) -> Result<(EnqueueOutcome, Option<RecordedDecision>), StoreError> {
        self.shared.rows.enqueue_decided(request, verdict).await
    }

    async fn claim(&self, max: usize) -> Result<Vec<Claim>, StoreError> {
        let mut entries: Vec<Entry> = {
            let mut buffer = self.shared.buffer.lock().expect("buffer lock");
            let n = buffer.len().min(max);
            buffer.drain(..n).collect()
        };
        if entries.len() < max {
            entries.extend(self.shared.reclaim(max - entries.len()).await?);
        }
        if entries.len() < max {
            entries.extend(self.shared.read(max - entries.len(), None).await?);
        }
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.request_id.as_str()).collect();
        let mut waiting: Vec<QueuedRequest> = self.shared.db.queued(&ids).await?;
        let mut claims = Vec::with_capacity(entries.len());
        let mut done = Vec::new();
        let mut seen = HashSet::new();
        for entry in entries {
            let request = match waiting
                .iter()
                .position(|r| r.request_id == entry.request_id)
            {
                Some(i) if seen.insert(entry.request_id.clone()) => waiting.swap_remove(i),
                // Decided already, or a second entry of one request in this batch.
                _ => {
                    done.push(entry.id);
                    continue;
                }
            };
            let exhausted = entry.deliveries >= MAX_DELIVERIES;
            let handle = StreamEntry {
                shared: self.shared.clone(),
                id: entry.id,
            };
            claims.push(match exhausted {
                true => Claim::exhausted(request, handle),
                false => Claim::new(request, handle),
            });
        }
        if let Err(e) = self.shared.complete(&done).await {
            tracing::warn!(error = %e, "acknowledging entries of decided requests failed; they come back and are acknowledged then");
        }
        Ok(claims)
    }

    async fn work_available(&self) {
        match self.shared.read(64, Some(BLOCK)).await {
            Ok(entries) => self
                .shared
                .buffer
                .lock()
                .expect("buffer lock")
                .extend(entries),
            Err(e) => {
                tracing::warn!(error = %e, "reading the Redis stream failed");
                tokio::time::sleep(BLOCK).await;
            }
        }
    }

    /// Exact: every waiting request has its PostgreSQL row, whatever Redis holds.
    async fn depth(&self) -> Result<u64, StoreError> {
        self.shared.rows.depth().await
    }
}

#[async_trait]
impl Probe for RedisQueue {
    async fn ping(&self) -> Result<(), StoreError> {
        redis::cmd("PING")
            .query_async::<Value>(&mut self.shared.commands())
            .await
            .map(drop)
            .map_err(redis_error)
    }
}

/// A stream entry pending with this consumer.
struct StreamEntry {
    shared: Arc<Shared>,
    id: String,
}

#[async_trait]
impl ClaimHandle for StreamEntry {
    /// Records the decision in PostgreSQL first; only then completes the entry. A crash between
    /// the two leaves the entry pending: reclaimed, it finds the row gone and records nothing.
    async fn ack(
        &self,
        request: &QueuedRequest,
        decision: NewDecision,
        keep: bool,
    ) -> Result<Settled, StoreError> {
        let kept = super::Revisable::of(request, &decision, keep);
        let settled = self
            .shared
            .db
            .settle(decision, request.callback(), kept)
            .await?;
        crate::failpoint::reached(crate::failpoint::AFTER_DECISION_COMMIT);
        if let Err(e) = self.shared.complete(std::slice::from_ref(&self.id)).await {
            tracing::warn!(error = %e, "acknowledging a decided request's entry failed; it comes back and is acknowledged then");
        }
        Ok(settled)
    }

    /// Leaves the entry pending: it is reclaimed when its lease ends.
    async fn nack(self: Box<Self>, _request: QueuedRequest) {}
}
