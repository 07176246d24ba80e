//! The queue on PostgreSQL: the `queue` table, shared by every instance. A claim takes the
//! oldest rows nobody holds with `FOR UPDATE SKIP LOCKED` and leases them (`claimed_until_us`),
//! as River and pgmq do: instances never wait on each other's claims, and a row whose lease ran
//! out (its instance died, or its authorizer was slower than the lease) is claimed again.
//! Settling is idempotent by request_id (the decision log's key), so two instances that decide
//! one request record one decision. Waiting workers are woken by `LISTEN` on enqueue, and poll.

use std::time::Duration;

use async_trait::async_trait;

use super::{Claim, ClaimHandle, EnqueueOutcome, Queue, QueuedRequest, Settled};
use crate::{
    decision::{Micros, NewDecision, RecordedDecision, Verdict},
    intake::NewRequest,
    store::{StoreError, postgres::Postgres},
    token::{DriverToken, Fingerprint},
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
        let now = Micros::now().0;
        let until = now + self.lease.as_micros() as i64;
        let client = self.db.client().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE queue q SET claimed_until_us = $2, claimed_by = $4, claims = q.claims + 1
                 FROM (SELECT id FROM queue
                       WHERE claimed_until_us IS NULL OR claimed_until_us < $1
                       ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) c
                 WHERE q.id = c.id
                 RETURNING q.id, q.request_id, q.station_id, q.token_fp, q.callback_url,
                           q.accepted_at_us, q.driver_token",
            )
            .await
            .map_err(db)?;
        let mut rows = client
            .query(&stmt, &[&now, &until, &(max as i64), &self.db.instance()])
            .await
            .map_err(db)?;
        rows.sort_by_key(|r| r.get::<_, i64>(0));
        Ok(rows
            .into_iter()
            .map(|r| {
                let handle = LeasedRow {
                    db: self.db.clone(),
                    id: r.get(0),
                    until,
                };
                let request = QueuedRequest {
                    request_id: r.get(1),
                    station_id: r.get(2),
                    fingerprint: Fingerprint::from_stored(r.get(3)),
                    callback_url: r.get(4),
                    accepted_at: Micros(r.get(5)),
                    token: DriverToken::new(r.get::<_, String>(6)),
                };
                Claim::new(request, handle)
            })
            .collect())
    }

    async fn work_available(&self) {
        tokio::select! {
            _ = self.db.wakes().queue.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }

    async fn depth(&self) -> Result<u64, StoreError> {
        let client = self.db.client().await?;
        let n: i64 = client
            .query_one("SELECT count(*) FROM queue", &[])
            .await
            .map_err(db)?
            .get(0);
        metrics::gauge!("chargegate_queue_depth").set(n as f64);
        Ok(n as u64)
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
    ) -> Result<Settled, StoreError> {
        self.db.settle(decision, request.callback()).await
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
