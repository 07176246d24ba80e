//! Revisions of UNKNOWN decisions (CONTRACT §2a).
//!
//! A request decided UNKNOWN (the authorizer timed out, failed, or its breaker was open) is kept,
//! with its token, in the transaction that records the decision. The reviser asks the authorizer
//! again for each kept request younger than `revise_unknown_within_ms`, oldest first, at most
//! `revise_rate_per_s` a second and 32 at once. A pass starts every second; while the authorizer is still down,
//! the pass stops at the first request it cannot answer (with the breaker open that costs no
//! call), so the requests are asked again as soon as it answers again. An ALLOWED or NOT_ALLOWED
//! answer is recorded as the request's revision (`revision = 1`, a log entry of its own), with its
//! delivery, in the transaction that erases what was kept; the store records at most one revision
//! per request, so a pass cut short by `kill -9`, or two instances asking at once, revise it once.
//! What was kept is erased when the window closes.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::{
    authorizer::{AuthorizationRequest, Authorizer},
    decision::{Micros, NewDecision, Reason, RecordedDecision, Status},
    queue::Revisable,
    store::StoreError,
};

/// Kept requests read at a time.
const PAGE: usize = 64;
/// Between passes, and after a pass that found the authorizer still down.
const PAUSE: Duration = Duration::from_secs(1);
/// Kept requests asked at once: each revision is a call and a commit, and the store commits
/// the revisions in flight together.
const IN_FLIGHT: usize = 32;

/// Where kept requests live: the store that records their decisions.
#[async_trait]
pub trait RevisionStore: Send + Sync + 'static {
    /// Up to `max` kept requests decided UNKNOWN at or after `since`, oldest first. Where
    /// instances share them, each is claimed for `lease`, so another instance asks for others.
    async fn due_revisions(
        &self,
        since: Micros,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Revisable>, StoreError>;

    /// Records `revision` of `kept` and erases what was kept, in one transaction, with the
    /// delivery of its callback. `None` when the request is no longer kept (revised already,
    /// elsewhere or before a restart; or its window closed).
    async fn record_revision(
        &self,
        kept: Revisable,
        revision: NewDecision,
    ) -> Result<Option<RecordedDecision>, StoreError>;

    /// Erases the kept requests decided before `before`; returns how many.
    async fn expire_revisions(&self, before: Micros) -> Result<u64, StoreError>;
}

pub struct Reviser {
    pub store: Arc<dyn RevisionStore>,
    pub authorizer: Arc<dyn Authorizer>,
    pub timeout: Duration,
    pub window: Duration,
    pub rate_per_s: u32,
}

/// How a pass ended.
enum Pass {
    /// Nothing kept is left to ask.
    Done,
    /// The authorizer could not answer yet; the next pass starts with the same request.
    StillDown,
    /// The store failed.
    Failed,
    Stopped,
}

impl Reviser {
    /// Revises until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let mut pace = tokio::time::interval(Duration::from_secs_f64(
            1.0 / f64::from(self.rate_per_s.max(1)),
        ));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let since = Micros(Micros::now().0 - self.window.as_micros() as i64);
            match self.store.expire_revisions(since).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    requests = n,
                    "the revision window closed on UNKNOWN decisions; their kept tokens are erased"
                ),
                Err(e) => tracing::warn!(error = %e, "erasing expired revision tokens failed"),
            }
            if let Pass::Stopped = self.pass(since, &mut pace, &stop).await {
                return;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(PAUSE) => {}
            }
        }
    }

    async fn pass(
        &self,
        since: Micros,
        pace: &mut tokio::time::Interval,
        stop: &CancellationToken,
    ) -> Pass {
        let lease = self.timeout + Duration::from_secs(5);
        loop {
            let due = match self.store.due_revisions(since, PAGE, lease).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the UNKNOWN decisions to revise failed");
                    return Pass::Failed;
                }
            };
            if due.is_empty() {
                return Pass::Done;
            }
            // Asked in order, up to IN_FLIGHT at once; the first one still unanswered (or a
            // store failure) ends the pass once the ones in flight are done.
            let mut asking = tokio::task::JoinSet::new();
            let mut ended = None;
            for kept in due {
                while asking.len() >= IN_FLIGHT {
                    if let Some(Ok(Some(end))) = asking.join_next().await {
                        ended.get_or_insert(end);
                    }
                }
                if ended.is_some() {
                    break;
                }
                tokio::select! {
                    _ = stop.cancelled() => {
                        ended = Some(Pass::Stopped);
                        break;
                    }
                    _ = pace.tick() => {}
                }
                asking.spawn(revise_one(
                    self.store.clone(),
                    self.authorizer.clone(),
                    self.timeout,
                    kept,
                ));
            }
            while let Some(done) = asking.join_next().await {
                if let Ok(Some(end)) = done {
                    ended.get_or_insert(end);
                }
            }
            if let Some(end) = ended {
                return end;
            }
        }
    }
}

/// Asks the authorizer again about one kept request and records its revision; `Some` when the
/// pass should end: the authorizer is still down, or the store failed.
async fn revise_one(
    store: Arc<dyn RevisionStore>,
    authorizer: Arc<dyn Authorizer>,
    timeout: Duration,
    kept: Revisable,
) -> Option<Pass> {
    let verdict = ask(&*authorizer, timeout, &kept).await;
    if verdict.status() == Status::Unknown {
        // An open breaker answers without asking: that is not an answer to count.
        if verdict.reason != Reason::CircuitOpen {
            metrics::counter!("chargegate_revisions_total", "status" => "unknown").increment(1);
        }
        return Some(Pass::StillDown);
    }
    let mut revision = kept.request.decision(verdict, Micros::now());
    revision.revision = 1;
    let status = revision.verdict.status().as_str();
    let request_id = kept.request.request_id.clone();
    match store.record_revision(kept, revision).await {
        Ok(Some(_)) => {
            metrics::counter!("chargegate_revisions_total", "status" => status).increment(1);
            tracing::info!(%request_id, status, "revised an UNKNOWN decision");
            None
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, %request_id, "recording a revision failed; it is asked again");
            Some(Pass::Failed)
        }
    }
}

async fn ask(
    authorizer: &dyn Authorizer,
    timeout: Duration,
    kept: &Revisable,
) -> crate::decision::Verdict {
    let r = &kept.request;
    let asked = AuthorizationRequest {
        request_id: &r.request_id,
        station_id: &r.station_id,
        token: &r.token,
        fingerprint: &r.fingerprint,
    };
    match tokio::time::timeout(timeout, authorizer.authorize(asked)).await {
        Ok(verdict) => verdict,
        Err(_) => crate::decision::Verdict::new(Reason::Timeout, authorizer.kind()),
    }
}
