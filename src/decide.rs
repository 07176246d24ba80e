//! The decision pipeline: claim a queued request, decide it under the deadline, record it.
//!
//! What can be decided without waiting (see [`at_once`]) is decided by the intake instead, and
//! recorded in the commit that acknowledges it; the pipeline decides the rest: requests for a
//! remote authorizer, and whatever a previous process left queued.
//!
//! A dispatcher claims as many requests as it holds worker permits (`workers`); each decision runs
//! in its own task with its permit moved into it. A malformed token is decided INVALID without
//! asking the authorizer; anything else gets the authorizer's verdict, or UNKNOWN/`timeout` when it
//! misses `authorize_timeout_ms`. The decision is then settled: recorded idempotently in the decision
//! log and its queue entry completed (see [`Queue::settle`]). When the store fails, the task keeps
//! its verdict and retries with backoff; at shutdown it releases the claim instead, so the request
//! is decided after the restart — never dropped, never decided twice.

use std::{sync::Arc, time::Duration};

use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    audit::signals::Signals,
    authorizer::{AuthorizationRequest, Authorizer},
    decision::{DecidedBy, Micros, NewDecision, Reason, Verdict},
    queue::{Claim, Queue},
};

/// First and longest pause between attempts to record a decision while the store fails.
const SETTLE_BACKOFF: (Duration, Duration) = (Duration::from_millis(20), Duration::from_secs(2));
/// Pause after a failed claim.
const CLAIM_BACKOFF: Duration = Duration::from_millis(200);

pub struct Pipeline {
    pub queue: Arc<dyn Queue>,
    pub authorizer: Arc<dyn Authorizer>,
    pub workers: usize,
    pub timeout: Duration,
    /// Counts each recorded decision for the anomaly signals.
    pub signals: Arc<Signals>,
    /// Keep the requests of UNKNOWN decisions to be asked again (revisions are on).
    pub keep_unknown: bool,
}

impl Pipeline {
    /// Decides until `stop` is cancelled, then waits for the decisions in flight. Dropping the
    /// returned future aborts them; their requests stay queued and are decided after a restart.
    pub async fn run(self, stop: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.workers));
        let mut tasks = JoinSet::new();
        let max_claim = self.workers.min(256);
        loop {
            while tasks.try_join_next().is_some() {}
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            };
            let mut held = vec![first];
            while held.len() < max_claim {
                match permits.clone().try_acquire_owned() {
                    Ok(p) => held.push(p),
                    Err(_) => break,
                }
            }
            let claims = match self.queue.claim(held.len()).await {
                Ok(claims) => claims,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming queued requests failed");
                    drop(held);
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(CLAIM_BACKOFF) => continue,
                    }
                }
            };
            if claims.is_empty() {
                drop(held);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = self.queue.work_available() => continue,
                }
            }
            for (claim, permit) in claims.into_iter().zip(held) {
                let authorizer = self.authorizer.clone();
                let stop = stop.clone();
                let timeout = self.timeout;
                let signals = self.signals.clone();
                let keep = self.keep_unknown;
                tasks.spawn(async move {
                    decide_and_record(authorizer, timeout, claim, stop, &signals, keep).await;
                    drop(permit);
                });
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

#[tracing::instrument(level = "debug", skip_all, fields(request_id = %claim.request.request_id, station_id = %claim.request.station_id))]
async fn decide_and_record(
    authorizer: Arc<dyn Authorizer>,
    timeout: Duration,
    claim: Claim,
    stop: CancellationToken,
    signals: &Signals,
    keep: bool,
) {
    let verdict = decide(&*authorizer, timeout, &claim).await;
    let decision = claim.request.decision(verdict, Micros::now());
    let mut claim = claim;
    let mut backoff = SETTLE_BACKOFF.0;
    loop {
        match claim.ack(decision.clone(), keep).await {
            Ok(settled) => {
                if settled.first {
                    recorded(&settled.decision.decision, signals);
                }
                return;
            }
            Err((returned, e)) => {
                if stop.is_cancelled() {
                    tracing::warn!(error = %e, "could not record a decision before shutdown; the request stays queued");
                    returned.nack().await;
                    return;
                }
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "recording a decision failed");
                claim = returned;
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(SETTLE_BACKOFF.1);
            }
        }
    }
}

/// Counts a decision recorded for the first time: metrics, anomaly signals, a debug line.
pub(crate) fn recorded(d: &NewDecision, signals: &Signals) {
    metrics::counter!("chargegate_decisions_total", "status" => d.verdict.status().as_str())
        .increment(1);
    signals.record(
        d.decided_at,
        &d.station_id,
        d.verdict.status(),
        d.verdict.reason,
    );
    for flag in signals.abuse.record(d) {
        tracing::warn!(%flag, "abuse signal");
    }
    let latency = (d.decided_at.0 - d.accepted_at.0).max(0) as f64 / 1e6;
    metrics::histogram!("chargegate_decision_latency_seconds").record(latency);
    tracing::debug!(
        status = d.verdict.status().as_str(),
        reason = d.verdict.reason.as_str(),
        "decided"
    );
}

/// The verdict when it needs no waiting: a malformed token is INVALID without asking the
/// authorizer, and an authorizer that answers from memory (the access list, the remote
/// authorizer's cache) answers at once. The intake records such a request together with its
/// decision (see [`Queue::enqueue_decided`]); `None` sends it through the queue.
pub(crate) fn at_once(
    authorizer: &dyn Authorizer,
    asked: AuthorizationRequest<'_>,
) -> Option<Verdict> {
    if !asked.token.is_well_formed() {
        return Some(Verdict::new(Reason::TokenFormat, DecidedBy::Format));
    }
    let started = std::time::Instant::now();
    let verdict = authorizer.authorize_at_once(asked)?;
    metrics::histogram!("chargegate_authorization_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    Some(verdict)
}

/// The verdict for one claimed request.
async fn decide(authorizer: &dyn Authorizer, timeout: Duration, claim: &Claim) -> Verdict {
    let request = &claim.request;
    let asked = AuthorizationRequest {
        request_id: &request.request_id,
        station_id: &request.station_id,
        token: &request.token,
        fingerprint: &request.fingerprint,
    };
    if let Some(verdict) = at_once(authorizer, asked) {
        return verdict;
    }
    if claim.exhausted {
        tracing::warn!(
            "a queued request was handed out too often without a decision; deciding it UNKNOWN"
        );
        return Verdict::new(Reason::AuthorizerError, authorizer.kind());
    }
    let started = std::time::Instant::now();
    let verdict = match tokio::time::timeout(timeout, authorizer.authorize(asked)).await {
        Ok(verdict) => verdict,
        Err(_) => Verdict::new(Reason::Timeout, authorizer.kind()),
    };
    metrics::histogram!("chargegate_authorization_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    verdict
}
