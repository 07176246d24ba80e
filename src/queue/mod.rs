//! The queue port: where an acknowledged request waits, durable, until it is decided.
//!
//! A request decided as it arrived skips the queue ([`Queue::enqueue_decided`]). Delivery
//! semantics show in the types: [`Queue::claim`] hands out [`Claim`]s, each holding its backend's
//! handle on the entry (a SQLite row, a PostgreSQL row under a lease, a Redis stream entry). A
//! claim is consumed by [`Claim::ack`] (record the decision, then complete the entry) or by
//! [`Claim::nack`] (back to the queue). A claim that is neither (the process died) returns to the
//! queue when its lease ends — at the next start for the embedded queue.

pub mod postgres;
pub mod redis;
pub mod sqlite;

use std::fmt;

use async_trait::async_trait;

use crate::{
    decision::{Micros, NewDecision, RecordedDecision, Verdict},
    intake::NewRequest,
    store::StoreError,
    token::{DriverToken, Fingerprint},
    webhook::Callback,
};

/// Deliveries of one queued request (to workers that died or hung each time) after which it is
/// decided `UNKNOWN` / `authorizer_error` instead of handed out again.
pub const MAX_DELIVERIES: usize = 5;

/// What enqueueing a request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Durable in the queue.
    Accepted { accepted_at: Micros },
    /// The request_id was seen before with the same station and token: nothing enqueued.
    Duplicate { accepted_at: Micros },
    /// The request_id was seen before with another station or token: nothing enqueued.
    Conflict,
    /// `queue_max` requests are pending: nothing enqueued.
    Full,
}

/// A queued request as a worker sees it. The only place besides the queue row with a plain token.
#[derive(Clone, Debug)]
pub struct QueuedRequest {
    pub request_id: String,
    pub station_id: String,
    pub token: DriverToken,
    pub fingerprint: Fingerprint,
    pub callback_url: Option<String>,
    pub accepted_at: Micros,
}

impl QueuedRequest {
    /// Its decision with `verdict`, made at `decided_at` (never before it was accepted).
    pub fn decision(&self, verdict: Verdict, decided_at: Micros) -> NewDecision {
        NewDecision {
            request_id: self.request_id.clone(),
            station_id: self.station_id.clone(),
            fingerprint: self.fingerprint.clone(),
            verdict,
            accepted_at: self.accepted_at,
            decided_at: decided_at.max(self.accepted_at),
            revision: 0,
        }
    }

    /// The delivery of its decision, when it named a callback URL.
    pub fn callback(&self) -> Option<Callback> {
        let url = self.callback_url.as_deref()?;
        Callback::new(url, self.token.clone())
    }
}

impl From<NewRequest> for QueuedRequest {
    fn from(r: NewRequest) -> Self {
        Self {
            request_id: r.request_id,
            station_id: r.station_id,
            token: r.token,
            fingerprint: r.fingerprint,
            callback_url: r.callback_url,
            accepted_at: r.accepted_at,
        }
    }
}

/// The request of an UNKNOWN decision, kept so that it can be asked again (CONTRACT §2a): besides
/// a queue entry and a pending delivery, the only place a plain token is stored. Deleted (erased)
/// when its revision is recorded or when `revise_unknown_within_ms` has passed.
#[derive(Clone, Debug)]
pub struct Revisable {
    pub request: QueuedRequest,
    /// When the UNKNOWN decision was made: the window counts from it.
    pub decided_at: Micros,
}

impl Revisable {
    /// Whether `decision`, settled now for `request`, is kept.
    pub fn of(request: &QueuedRequest, decision: &NewDecision, keep: bool) -> Option<Self> {
        (keep && decision.verdict.status() == crate::decision::Status::Unknown).then(|| Self {
            request: request.clone(),
            decided_at: decision.decided_at,
        })
    }
}

/// A request handed to one worker. Consume it with [`Claim::ack`] or [`Claim::nack`].
pub struct Claim {
    pub request: QueuedRequest,
    /// Handed out too often already (its workers died or hung each time): decide it
    /// `UNKNOWN` / `authorizer_error` without asking again.
    pub exhausted: bool,
    handle: Box<dyn ClaimHandle>,
}

/// A backend's hold on one claimed entry: its position type is the backend's own.
#[async_trait]
pub trait ClaimHandle: Send + Sync + 'static {
    /// Records `decision` in the decision log idempotently by request_id, then completes the
    /// entry and erases its token. A single-system backend does both in one transaction; a
    /// two-system backend records first and acknowledges second, so a crash between the two
    /// re-delivers a request whose decision already exists, and settling it again records nothing
    /// new. With `keep`, an UNKNOWN decision recorded now keeps the request (with its token) in
    /// the same transaction, to be asked again (CONTRACT §2a).
    async fn ack(
        &self,
        request: &QueuedRequest,
        decision: NewDecision,
        keep: bool,
    ) -> Result<Settled, StoreError>;

    /// Returns the entry to the queue for another worker.
    async fn nack(self: Box<Self>, request: QueuedRequest);
}

impl Claim {
    pub fn new(request: QueuedRequest, handle: impl ClaimHandle) -> Self {
        Self {
            request,
            exhausted: false,
            handle: Box::new(handle),
        }
    }

    /// A claim handed out too often: see [`Claim::exhausted`].
    pub fn exhausted(request: QueuedRequest, handle: impl ClaimHandle) -> Self {
        Self {
            exhausted: true,
            ..Self::new(request, handle)
        }
    }

    /// Records the decision and completes the entry; on failure the claim comes back, to retry
    /// or to hand back. `keep`: see [`ClaimHandle::ack`].
    pub async fn ack(
        self,
        decision: NewDecision,
        keep: bool,
    ) -> Result<Settled, (Claim, StoreError)> {
        match self.handle.ack(&self.request, decision, keep).await {
            Ok(settled) => Ok(settled),
            Err(e) => Err((self, e)),
        }
    }

    /// Hands the request back to the queue.
    pub async fn nack(self) {
        self.handle.nack(self.request).await
    }
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("request_id", &self.request.request_id)
            .finish_non_exhaustive()
    }
}

/// The outcome of settling a claim.
#[derive(Clone, Debug)]
pub struct Settled {
    pub decision: RecordedDecision,
    /// False when the request had been decided before (a retried or re-delivered claim): the
    /// recorded decision is the earlier one and nothing new was written.
    pub first: bool,
}

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Makes the request durable, once per request_id. Returns only after it is committed.
    async fn enqueue(&self, request: NewRequest) -> Result<EnqueueOutcome, StoreError>;

    /// Makes a request the intake decided at once (see `decide::at_once`) durable together with
    /// its decision, in one commit: it is never queued, so its token is stored nowhere but in its
    /// pending webhook delivery, if any. Idempotent by request_id as `enqueue` is; `queue_max` does
    /// not apply. Returns the decision when this call recorded it (never for a seen request_id).
    async fn enqueue_decided(
        &self,
        request: NewRequest,
        verdict: Verdict,
    ) -> Result<(EnqueueOutcome, Option<RecordedDecision>), StoreError>;

    /// Up to `max` requests, oldest first; empty when none is waiting.
    async fn claim(&self, max: usize) -> Result<Vec<Claim>, StoreError>;

    /// Resolves when `claim` may find something.
    async fn work_available(&self);

    /// Requests waiting or being decided (approximate where instances share the queue).
    async fn depth(&self) -> Result<u64, StoreError>;
}
