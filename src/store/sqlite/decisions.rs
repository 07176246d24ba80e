//! Recording a decision: the decision, its outbox delivery and its chain link, in one transaction.

use rusqlite::{Transaction, params};

use crate::{
    audit::chain::{self, ChainKey, Link},
    cursor::Cursor,
    decision::{DecidedBy, Micros, NewDecision, Reason, RecordedDecision, Verdict},
    queue::{Revisable, Settled},
    token::Fingerprint,
    webhook::Callback,
};

pub(super) const DECISION_COLUMNS: &str = "seq, request_id, station_id, token_fp, reason, authorizer, accepted_at_us, decided_at_us, revision";

pub(crate) fn decision_row(
    r: &rusqlite::Row<'_>,
    log_id: u32,
) -> rusqlite::Result<RecordedDecision> {
    let bad = |i: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("unknown {what}").into(),
        )
    };
    let reason: String = r.get(4)?;
    let authorizer: String = r.get(5)?;
    Ok(RecordedDecision {
        cursor: Cursor::new(log_id, r.get::<_, i64>(0)? as u64),
        decision: NewDecision {
            request_id: r.get(1)?,
            station_id: r.get(2)?,
            fingerprint: Fingerprint::from_stored(r.get(3)?),
            verdict: Verdict::new(
                Reason::parse(&reason).ok_or_else(|| bad(4, "reason"))?,
                DecidedBy::parse(&authorizer).ok_or_else(|| bad(5, "authorizer"))?,
            ),
            accepted_at: Micros(r.get(6)?),
            decided_at: Micros(r.get(7)?),
            revision: r.get(8)?,
        },
    })
}

/// Records the decision (see [`record_decision`]) and deletes the queue entry. Returns the
/// settled decision and whether a queue entry was deleted.
pub(super) fn settle(
    tx: &Transaction<'_>,
    position: u64,
    d: &NewDecision,
    log_id: u32,
    chain: (&ChainKey, &mut Link),
) -> rusqlite::Result<(Settled, bool)> {
    let settled = record_decision(tx, d, log_id, chain)?;
    let deleted = tx
        .prepare_cached("DELETE FROM queue WHERE seq = ?1")?
        .execute([position as i64])?;
    Ok((settled, deleted == 1))
}

/// Records the decision unless one exists for the request_id (then returns that one, with
/// `first` false). The decision is chained after `chain.1`, which advances when it is recorded.
pub(super) fn record_decision(
    tx: &Transaction<'_>,
    d: &NewDecision,
    log_id: u32,
    chain: (&ChainKey, &mut Link),
) -> rusqlite::Result<Settled> {
    let link = chain::link(chain.0, chain.1, d);
    let inserted = tx
        .prepare_cached(
            "INSERT INTO decisions (request_id, station_id, token_fp, status, reason, authorizer,
                                    accepted_at_us, decided_at_us, processing_ms, chain, revision)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (request_id, revision) DO NOTHING",
        )?
        .execute(params![
            d.request_id,
            d.station_id,
            d.fingerprint.as_str(),
            d.verdict.status().as_str(),
            d.verdict.reason.as_str(),
            d.verdict.decided_by.as_str(),
            d.accepted_at.0,
            d.decided_at.0,
            d.processing_time_ms(),
            link.as_slice(),
            d.revision,
        ])?;
    let inserted = (inserted == 1).then(|| tx.last_insert_rowid());
    if inserted.is_some() {
        *chain.1 = link;
    }
    let settled = match inserted {
        Some(seq) => Settled {
            decision: RecordedDecision {
                cursor: Cursor::new(log_id, seq as u64),
                decision: d.clone(),
            },
            first: true,
        },
        None => {
            let earlier = tx
                .prepare_cached(&format!(
                    "SELECT {DECISION_COLUMNS} FROM decisions WHERE request_id = ?1 AND revision = ?2"
                ))?
                .query_row(params![d.request_id, d.revision], |r| {
                    decision_row(r, log_id)
                })?;
            Settled {
                decision: earlier,
                first: false,
            }
        }
    };
    Ok(settled)
}

/// Adds the pending delivery of a decision's callback, due at once. Due from now (the commit),
/// not from the decision: the delivery engine reads on from the last delivery it took, and a
/// delivery committed later must not land before it.
pub(super) fn add_delivery(
    tx: &Transaction<'_>,
    d: &NewDecision,
    c: &Callback,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO deliveries (request_id, station_id, callback_url, host, driver_token, status,
                                 reason, decided_at_us, state, attempts, next_attempt_us, age_from_us,
                                 revision)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', 0, ?9, ?8, ?10)
         ON CONFLICT (request_id) DO NOTHING",
    )?
    .execute(params![
        crate::webhook::webhook_id(&d.request_id, d.revision),
        d.station_id,
        c.url,
        c.host,
        c.token.expose(),
        d.verdict.status().as_str(),
        d.verdict.reason.as_str(),
        d.decided_at.0,
        Micros::now().0.max(d.decided_at.0),
        d.revision,
    ])?;
    Ok(())
}

/// Keeps the request of an UNKNOWN decision, with its token, to be asked again.
pub(super) fn keep_revisable(tx: &Transaction<'_>, r: &Revisable) -> rusqlite::Result<()> {
    let q = &r.request;
    tx.prepare_cached(
        "INSERT INTO revisable (request_id, station_id, token_fp, driver_token, callback_url,
                                accepted_at_us, decided_at_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (request_id) DO NOTHING",
    )?
    .execute(params![
        q.request_id,
        q.station_id,
        q.fingerprint.as_str(),
        q.token.expose(),
        q.callback_url,
        q.accepted_at.0,
        r.decided_at.0,
    ])?;
    Ok(())
}

/// Records `revision` of a kept request and erases what was kept, in one transaction: `None`
/// when the request is no longer kept (revised already, or its window closed).
pub(super) fn revise(
    tx: &Transaction<'_>,
    kept: &Revisable,
    revision: &NewDecision,
    log_id: u32,
    chain: (&ChainKey, &mut Link),
) -> rusqlite::Result<Option<RecordedDecision>> {
    let erased = tx
        .prepare_cached("DELETE FROM revisable WHERE request_id = ?1")?
        .execute([&kept.request.request_id])?;
    if erased == 0 {
        return Ok(None);
    }
    let settled = record_decision(tx, revision, log_id, chain)?;
    if !settled.first {
        return Ok(None);
    }
    if let Some(callback) = kept.request.callback() {
        add_delivery(tx, revision, &callback)?;
    }
    Ok(Some(settled.decision))
}
