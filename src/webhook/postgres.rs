//! The webhook outbox on PostgreSQL. Deliveries are inserted by the writer in the transaction
//! that records their decision (see `store::postgres::writer`). A claim moves a due delivery's
//! `next_attempt_us` to the end of its lease (`FOR UPDATE SKIP LOCKED`): other instances skip it
//! until its attempt is recorded or the lease runs out, so two instances never send one delivery
//! at once.

use std::time::Duration;

use async_trait::async_trait;

use super::{DeliveryState, DeliveryView, DueDelivery, Next, Outcome, WebhookOutbox};
use crate::{
    decision::{Micros, Reason, Status},
    store::{StoreError, postgres::Postgres},
    token::DriverToken,
};

fn db(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::backend(e)
}

fn bad(what: &str) -> StoreError {
    StoreError::backend(std::io::Error::other(format!("unknown {what}")))
}

const DUE_COLUMNS: &str = "request_id, station_id, callback_url, host, driver_token, status, \
     reason, decided_at_us, attempts, next_attempt_us, age_from_us, seq, revision";

fn due_row(r: &tokio_postgres::Row, next_attempt_at: i64) -> Result<DueDelivery, StoreError> {
    let status: &str = r.get(5);
    let reason: &str = r.get(6);
    Ok(DueDelivery {
        request_id: r.get(0),
        station_id: r.get(1),
        callback_url: r.get(2),
        host: r.get(3),
        token: DriverToken::new(r.get::<_, Option<String>>(4).unwrap_or_default()),
        status: Status::parse(status).ok_or_else(|| bad("status"))?,
        reason: Reason::parse(reason).ok_or_else(|| bad("reason"))?,
        decided_at: Micros(r.get(7)),
        attempts: r.get::<_, i32>(8) as u32,
        next_attempt_at: Micros(next_attempt_at),
        age_from: Micros(r.get(10)),
        seq: r.get(11),
        revision: r.get::<_, i32>(12) as u32,
    })
}

#[async_trait]
impl WebhookOutbox for Postgres {
    async fn claim_due(
        &self,
        skip_hosts: Vec<String>,
        after: Option<(Micros, i64)>,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        let (after_at, after_seq) = after.map_or((i64::MIN, i64::MIN), |(at, seq)| (at.0, seq));
        let now = Micros::now().0;
        let until = now + lease.as_micros() as i64;
        let limit = limit as i64;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let claim = tx
            .prepare_cached(&format!(
                "WITH due AS (
                     SELECT seq, next_attempt_us AS was FROM deliveries
                     WHERE state = 'pending' AND next_attempt_us <= $1
                       AND (next_attempt_us, seq) > ($2, $3) AND NOT (host = ANY($4))
                     ORDER BY next_attempt_us, seq LIMIT $5
                     FOR UPDATE SKIP LOCKED)
                 UPDATE deliveries d SET next_attempt_us = $6, claimed_by = $7 FROM due WHERE d.seq = due.seq
                 RETURNING {}, due.was",
                DUE_COLUMNS
                    .split(", ")
                    .map(|c| format!("d.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .await
            .map_err(db)?;
        let mut rows = tx
            .query(
                &claim,
                &[
                    &now,
                    &after_at,
                    &after_seq,
                    &skip_hosts,
                    &limit,
                    &until,
                    &self.instance(),
                ],
            )
            .await
            .map_err(db)?;
        rows.sort_by_key(|r| (r.get::<_, i64>(13), r.get::<_, i64>(11)));
        let mut out = rows
            .iter()
            .map(|r| due_row(r, r.get(13)))
            .collect::<Result<Vec<_>, _>>()?;
        if (out.len() as i64) < limit {
            // The next one not due yet tells the engine when to look again.
            let next = tx
                .prepare_cached(&format!(
                    "SELECT {DUE_COLUMNS} FROM deliveries
                     WHERE state = 'pending' AND next_attempt_us > $1 AND NOT (host = ANY($2))
                     ORDER BY next_attempt_us, seq LIMIT 1"
                ))
                .await
                .map_err(db)?;
            if let Some(r) = tx
                .query_opt(&next, &[&now, &skip_hosts])
                .await
                .map_err(db)?
            {
                out.push(due_row(&r, r.get(9))?);
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(out)
    }

    async fn record(&self, outcomes: Vec<Outcome>) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let update = tx
            .prepare_cached(
                "UPDATE deliveries
                 SET attempts = attempts + 1, state = $2, next_attempt_us = $3,
                     finished_at_us = $4, last_error = $5, history = history || $6,
                     claimed_by = NULL,
                     driver_token = CASE WHEN $2 = 'delivered' THEN NULL ELSE driver_token END
                 WHERE seq = $1 AND state = 'pending'",
            )
            .await
            .map_err(db)?;
        for o in &outcomes {
            let a = &o.attempt;
            let (state, next_at, finished_at) = match o.next {
                Next::Delivered => (DeliveryState::Delivered, None, Some(a.at.0)),
                Next::RetryAt(at) => (DeliveryState::Pending, Some(at.0), None),
                Next::Dead(_) => (DeliveryState::Dead, None, Some(a.at.0)),
            };
            tx.execute(
                &update,
                &[
                    &o.seq,
                    &state.as_str(),
                    &next_at,
                    &finished_at,
                    &o.last_error,
                    &super::history_line(a),
                ],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    async fn list(
        &self,
        state: Option<DeliveryState>,
        limit: usize,
    ) -> Result<Vec<DeliveryView>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT request_id, station_id, callback_url, state, next_attempt_us, last_error,
                        history
                 FROM deliveries WHERE $1::text IS NULL OR state = $1
                 ORDER BY seq DESC LIMIT $2",
                &[&state.map(|s| s.as_str()), &(limit as i64)],
            )
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                let state: &str = r.get(3);
                let history: &str = r.get(6);
                Ok(DeliveryView {
                    request_id: r.get(0),
                    station_id: r.get(1),
                    callback_url: r.get(2),
                    state: DeliveryState::parse(state).ok_or_else(|| bad("state"))?,
                    next_attempt_at: r.get::<_, Option<i64>>(4).map(Micros),
                    last_error: r.get(5),
                    history: super::parse_history(history).ok_or_else(|| bad("history"))?,
                })
            })
            .collect()
    }

    async fn redrive(&self, request_ids: Vec<String>, now: Micros) -> Result<u32, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE deliveries
                 SET state = 'pending', attempts = 0, next_attempt_us = $1, age_from_us = $1,
                     finished_at_us = NULL, last_error = ''
                 WHERE state = 'dead' AND driver_token IS NOT NULL
                   AND (cardinality($2::text[]) = 0 OR request_id = ANY($2))",
                &[&now.0, &request_ids],
            )
            .await
            .map_err(db)?;
        if n > 0 {
            client
                .execute("SELECT pg_notify('chargegate_outbox', '')", &[])
                .await
                .map_err(db)?;
            self.wakes().outbox.notify_one();
        }
        Ok(n as u32)
    }

    async fn erase_dead_tokens(&self, before: Micros) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE deliveries SET driver_token = NULL
                 WHERE state = 'dead' AND driver_token IS NOT NULL AND finished_at_us < $1",
                &[&before.0],
            )
            .await
            .map_err(db)
    }
}
