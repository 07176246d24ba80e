//! Idempotency by request_id for both intake paths: a request queued for the remote authorizer
//! keeps its key in `requests`; one decided at intake keeps it in the decision log. Each path
//! looks up the other's keys before adding its own, and [`RequestKey::outcome_after`] is the one
//! rule for what a request_id seen before gets.

use rusqlite::{OptionalExtension, Transaction, params};

use super::decisions::record_decision;
use crate::{
    audit::chain::{ChainKey, Link},
    decision::{Micros, NewDecision, RecordedDecision},
    intake::{EarlierRequest, NewRequest, RequestKey},
    queue::EnqueueOutcome,
};

pub(super) fn enqueue(
    tx: &Transaction<'_>,
    r: &NewRequest,
    pending: u64,
    queue_max: u64,
) -> rusqlite::Result<(EnqueueOutcome, Option<u64>)> {
    // A request decided at intake left its request_id in the decision log only.
    if let Some(outcome) = seen(tx, SEEN_DECIDED, r.into())? {
        return Ok((outcome, None));
    }
    // The common case, a new request_id, costs one insert; a seen one is looked up afterwards.
    // (No RETURNING: SQLite gathers returned rows in a temporary table, a B-tree opened and
    // dropped for every insert.)
    if pending < queue_max {
        let inserted = tx
            .prepare_cached(
                "INSERT INTO requests (request_id, station_id, token_fp, callback_url, accepted_at_us)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (request_id) DO NOTHING",
            )?
            .execute(params![
                r.request_id,
                r.station_id,
                r.fingerprint.as_str(),
                r.callback_url,
                r.accepted_at.0
            ])?;
        if inserted == 1 {
            let seq = tx.last_insert_rowid();
            tx.prepare_cached("INSERT INTO queue (seq, driver_token) VALUES (?1, ?2)")?
                .execute(params![seq, r.token.expose()])?;
            return Ok((
                EnqueueOutcome::Accepted {
                    accepted_at: r.accepted_at,
                },
                Some(seq as u64),
            ));
        }
    }
    Ok((
        seen(tx, SEEN_QUEUED, r.into())?.unwrap_or(EnqueueOutcome::Full),
        None,
    ))
}

/// Records a request decided at intake: its decision alone, which also keeps its request_id (no
/// `requests` row, no queue entry). Returns the outcome, and the decision when it was recorded.
pub(super) fn enqueue_decided(
    tx: &Transaction<'_>,
    d: &NewDecision,
    queued_keys: bool,
    log_id: u32,
    chain: (&ChainKey, &mut Link),
) -> rusqlite::Result<(EnqueueOutcome, Option<RecordedDecision>)> {
    // The request_id of a request that went through the queue (decided or not) is kept there.
    if queued_keys && let Some(outcome) = seen(tx, SEEN_QUEUED, d.into())? {
        return Ok((outcome, None));
    }
    let settled = record_decision(tx, d, log_id, chain)?;
    if settled.first {
        let accepted_at = d.accepted_at;
        return Ok((
            EnqueueOutcome::Accepted { accepted_at },
            Some(settled.decision),
        ));
    }
    let earlier = &settled.decision.decision;
    let outcome = RequestKey::from(d).outcome_after(EarlierRequest {
        station_id: &earlier.station_id,
        fingerprint: earlier.fingerprint.as_str(),
        accepted_at: earlier.accepted_at,
    });
    Ok((outcome, None))
}

/// Where a request_id was seen: among the queue's request keys, or in the decision log.
const SEEN_QUEUED: &str =
    "SELECT station_id, token_fp, accepted_at_us FROM requests WHERE request_id = ?1";
const SEEN_DECIDED: &str = "SELECT station_id, token_fp, accepted_at_us FROM decisions WHERE request_id = ?1 AND revision = 0";

/// The outcome for a request_id seen before (`query`: [`SEEN_QUEUED`] or [`SEEN_DECIDED`]), as
/// [`RequestKey::outcome_after`] gives it; `None` when it was not seen there.
fn seen(
    tx: &Transaction<'_>,
    query: &str,
    key: RequestKey<'_>,
) -> rusqlite::Result<Option<EnqueueOutcome>> {
    let seen: Option<(String, String, i64)> = tx
        .prepare_cached(query)?
        .query_row([key.request_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    Ok(seen.map(|(station_id, fingerprint, accepted_at)| {
        key.outcome_after(EarlierRequest {
            station_id: &station_id,
            fingerprint: &fingerprint,
            accepted_at: Micros(accepted_at),
        })
    }))
}
