//! The queue on PostgreSQL: the `queue` table, shared by every instance. A claim takes the
//! oldest rows nobody holds with `FOR UPDATE SKIP LOCKED` and leases them (`claimed_until_us`),
//! as River and pgmq do: instances never wait on each other's claims, and a row whose lease ran
//! out (its instance died, or its authorizer was slower than the lease) is claimed again.
//! Settling is idempotent by request_id (the decision log's key), so two instances that decide
//! one request record one decision. A row leased [`MAX_DELIVERIES`] times is decided `UNKNOWN` /
//! `authorizer_error` instead of asked again. Waiting workers are woken by `LISTEN` on enqueue,
//! and poll.

use std::time::Duration;

use async_trait::async_trait;

use super::{Claim, ClaimHandle, EnqueueOutcome, MAX_DELIVERIES, Queue, QueuedRequest, Settled};
use crate::{
    decision::{Micros, NewDecision, RecordedDecision, Verdict},
    intake::NewRequest,
    store::{StoreError, postgres::Postgres},
};

/// The longest a worker waits before it looks for work again (a notification lost, a lease
/// that ran out).
const POLL: Duration = Duration::from_millis(250);

pub struct PostgresQueue {
    db: Postgres,
    lease: Duration,
}

impl PostgresQueue {
    /// `lease` must outlast a decision: the authorizer deadline plus the time to record it.
    pub fn new(db: Postgres, lease: Duration) -> Self {
        Self { db, lease }
    }
}

fn db(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::backend(e)
}

#[async_trait]
impl Queue for PostgresQueue {
    async fn enqueue(&self, request: NewRequest) -> Result<EnqueueOutcome, StoreError> {
        self.db.enqueue(request).await
    }

    async fn enqueue_decided(
        &self,
        request: NewRequest,
        verdict: Verdict,
    ) -> Result<(EnqueueOutcome, Option<RecordedDecision>), StoreError> {
        let request = QueuedRequest::from(request);
        let decision = request.decision(verdict, Micros::now());
        self.db.enqueue_decided(decision, request.callback()).await
    }

    async fn claim(&self, max: usize) -> Result<Vec<Claim>, StoreError> {
        let leased = self.db.lease_queued(max, self.lease).await?;
        Ok(leased
            .into_iter()
            .map(|l| {
                let handle = LeasedRow {
                    db: self.db.clone(),
                    id: l.id,
                    until: l.until,
                };
                match l.claims >= MAX_DELIVERIES {
                    true => Claim::exhausted(l.request, handle),
                    false => Claim::new(l.request, handle),
                }
            })
            .collect())
    }

    async fn work_available(&self) {
        tokio::select! {
            _ = self.db.wakes().queue.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }

    /// Counted at most once a second (see `QueueCount`): approximate across instances.
    async fn depth(&self) -> Result<u64, StoreError> {
        let n = self.db.queue_depth().await?;
        metrics::gauge!("chargegate_queue_depth").set(n as f64);
        Ok(n)
    }
}

/// A queue row under this instance's lease.
struct LeasedRow {
    db: Postgres,
    id: i64,
    until: i64,
}

#[async_trait]
impl ClaimHandle for LeasedRow {
    async fn ack(
        &self,
        request: &QueuedRequest,
        decision: NewDecision,
        keep: bool,
    ) -> Result<Settled, StoreError> {
        let kept = super::Revisable::of(request, &decision, keep);
        self.db.settle(decision, request.callback(), kept).await
    }

    /// Ends the lease, if it is still this instance's.
    async fn nack(self: Box<Self>, _request: QueuedRequest) {
        let released = async {
            let client = self.db.client().await?;
            client
                .execute(
                    "UPDATE queue SET claimed_until_us = NULL, claimed_by = NULL
                     WHERE id = $1 AND claimed_until_us = $2",
                    &[&self.id, &self.until],
                )
                .await
                .map_err(db)?;
            client
                .execute("SELECT pg_notify('chargegate_queue', '')", &[])
                .await
                .map_err(db)
        };
        if let Err(e) = released.await {
            tracing::warn!(error = %e, "handing a claim back failed; it returns when its lease ends");
        }
    }
}
