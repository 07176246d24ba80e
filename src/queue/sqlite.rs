//! The embedded queue: the `queue` table of the SQLite file (see [`crate::store::sqlite`]).
//!
//! One process owns the file (it is locked), so claims need no row updates: the queue keeps a scan
//! position in memory and hands out entries in `seq` order, each with a lease. Entries the writer
//! has just committed are handed over in memory (a bounded list); the table is read only for what
//! that list does not hold (a backlog at start-up, a burst larger than the list). A released claim, or
//! one whose lease ran out, is handed out again; settling is idempotent by request_id, so a second
//! hand-out never yields a second decision. At start-up the scan position is zero: whatever the
//! previous process claimed but did not settle is pending again.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use tokio::sync::{Notify, watch};

use super::{Claim, ClaimHandle, EnqueueOutcome, Queue, QueuedRequest, Revisable, Settled};
use crate::{
    decision::{Micros, NewDecision, RecordedDecision, Verdict},
    intake::NewRequest,
    store::StoreError,
    store::sqlite::Database,
};

pub struct SqliteQueue {
    inner: Arc<Inner>,
}

/// What the queue and its claims share.
struct Inner {
    db: Database,
    lease: Duration,
    state: Mutex<ClaimState>,
    /// Rung by `release` so the dispatcher sees re-queued work at once.
    released: Notify,
    /// The newest committed queue position, sent by the writer thread.
    enqueue_head: watch::Receiver<u64>,
}

#[derive(Default)]
struct ClaimState {
    /// Every entry at or before this position has been handed out at least once.
    scanned_through: u64,
    /// Entries to hand out again, before new ones.
    redeliver: VecDeque<(u64, QueuedRequest)>,
    /// Handed-out entries and the end of their lease.
    leased: HashMap<u64, Instant>,
}

impl SqliteQueue {
    /// `lease` must outlast a decision: the authorizer deadline plus the time to record it.
    pub fn new(db: Database, lease: Duration) -> Self {
        let enqueue_head = db.enqueue_head();
        Self {
            inner: Arc::new(Inner {
                db,
                lease,
                state: Mutex::new(ClaimState::default()),
                released: Notify::new(),
                enqueue_head,
            }),
        }
    }
}

impl Inner {
    /// Entries whose lease ran out go back to the front of the queue. Their rows are read again,
    /// since the claim (with its token) is still with the worker that let the lease lapse.
    async fn reclaim_expired(&self) -> Result<(), StoreError> {
        let now = Instant::now();
        let expired: Vec<u64> = {
            let mut state = self.state.lock().expect("claim state lock");
            let expired: Vec<u64> = state
                .leased
                .iter()
                .filter(|(_, end)| **end <= now)
                .map(|(p, _)| *p)
                .collect();
            for p in &expired {
                state.leased.remove(p);
            }
            expired
        };
        for position in expired {
            tracing::warn!(
                position,
                "a claim's lease ran out; handing the request out again"
            );
            if let Some(entry) = self
                .db
                .queued_after(position - 1, 1)
                .await?
                .into_iter()
                .find(|(p, _)| *p == position)
            {
                self.state
                    .lock()
                    .expect("claim state lock")
                    .redeliver
                    .push_back(entry);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Queue for SqliteQueue {
    async fn enqueue(&self, request: NewRequest) -> Result<EnqueueOutcome, StoreError> {
        self.inner.db.enqueue(request).await
    }

    async fn enqueue_decided(
        &self,
        request: NewRequest,
        verdict: Verdict,
    ) -> Result<(EnqueueOutcome, Option<RecordedDecision>), StoreError> {
        let request = QueuedRequest::from(request);
        let decision = request.decision(verdict, Micros::now());
        self.inner
            .db
            .enqueue_decided(decision, request.callback())
            .await
    }

    async fn claim(&self, max: usize) -> Result<Vec<Claim>, StoreError> {
        let taken = self.inner.claim(max).await?;
        Ok(taken
            .into_iter()
            .map(|(position, request)| {
                let handle = RowClaim {
                    queue: self.inner.clone(),
                    position,
                };
                Claim::new(request, handle)
            })
            .collect())
    }

    async fn work_available(&self) {
        self.inner.work_available().await
    }

    async fn depth(&self) -> Result<u64, StoreError> {
        Ok(self.inner.db.pending())
    }
}

/// A claimed row of the `queue` table, leased in memory.
struct RowClaim {
    queue: Arc<Inner>,
    position: u64,
}

#[async_trait]
impl ClaimHandle for RowClaim {
    async fn ack(
        &self,
        request: &QueuedRequest,
        decision: NewDecision,
        keep: bool,
    ) -> Result<Settled, StoreError> {
        let kept = Revisable::of(request, &decision, keep);
        let settled = self
            .queue
            .db
            .settle(self.position, decision, request.callback(), kept)
            .await?;
        self.queue
            .state
            .lock()
            .expect("claim state lock")
            .leased
            .remove(&self.position);
        Ok(settled)
    }

    async fn nack(self: Box<Self>, request: QueuedRequest) {
        let mut state = self.queue.state.lock().expect("claim state lock");
        state.leased.remove(&self.position);
        state.redeliver.push_back((self.position, request));
        drop(state);
        self.queue.released.notify_one();
    }
}

impl Inner {
    /// Up to `max` entries with their positions, each leased until settled or released.
    async fn claim(&self, max: usize) -> Result<Vec<(u64, QueuedRequest)>, StoreError> {
        self.reclaim_expired().await?;
        let mut claims = Vec::with_capacity(max);
        {
            let mut state = self.state.lock().expect("claim state lock");
            while claims.len() < max {
                let Some((position, request)) = state.redeliver.pop_front() else {
                    break;
                };
                claims.push((position, request));
            }
        }
        while claims.len() < max {
            // Entries the writer handed over in memory, as long as they continue the scan without a
            // gap; otherwise (a backlog at start-up, or more than the hand-over holds) read the table.
            let (scanned_through, gap_before) = {
                let mut state = self.state.lock().expect("claim state lock");
                let taken = self.db.with_hot(|hot| {
                    let mut gap_before = None;
                    while claims.len() < max {
                        match hot.front() {
                            Some((p, _)) if *p <= state.scanned_through => {
                                hot.pop_front();
                            }
                            Some((p, _)) if *p == state.scanned_through + 1 => {
                                let (position, request) = hot.pop_front().expect("front exists");
                                state.scanned_through = position;
                                claims.push((position, request));
                            }
                            Some((p, _)) => {
                                gap_before = Some(*p);
                                break;
                            }
                            None => break,
                        }
                    }
                    gap_before
                });
                (state.scanned_through, taken)
            };
            if claims.len() >= max {
                break;
            }
            if gap_before.is_none() && *self.enqueue_head.borrow() <= scanned_through {
                break;
            }
            let fresh = self
                .db
                .queued_after(scanned_through, max - claims.len())
                .await?;
            let mut state = self.state.lock().expect("claim state lock");
            if fresh.is_empty() {
                match gap_before {
                    // Nothing pending in the gap: continue with the hand-over.
                    Some(next) => state.scanned_through = state.scanned_through.max(next - 1),
                    None => break,
                }
            }
            for (position, request) in fresh {
                state.scanned_through = state.scanned_through.max(position);
                claims.push((position, request));
            }
        }
        let until = Instant::now() + self.lease;
        let mut state = self.state.lock().expect("claim state lock");
        for (position, _) in &claims {
            state.leased.insert(*position, until);
        }
        Ok(claims)
    }

    async fn work_available(&self) {
        let scanned_through = {
            let state = self.state.lock().expect("claim state lock");
            if !state.redeliver.is_empty() {
                return;
            }
            state.scanned_through
        };
        if self.db.with_hot(|hot| !hot.is_empty()) {
            return;
        }
        let mut head = self.enqueue_head.clone();
        let lease_check = tokio::time::sleep(self.lease);
        tokio::select! {
            _ = head.wait_for(|h| *h > scanned_through) => {}
            _ = self.released.notified() => {}
            _ = lease_check => {}
        }
    }
}
