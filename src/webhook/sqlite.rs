//! The webhook outbox on the embedded store. The `deliveries` and `delivery_attempts` tables are
//! created with the rest of the schema in `store::sqlite`, whose writer inserts a delivery in the
//! transaction that records its decision.
//!
//! - `deliveries`: one row per request with a callback: `state` is `pending`, `delivered` or
//!   `dead`; `next_attempt_us` orders the pending ones (partial index `deliveries_due`);
//!   `driver_token` is the plain token, NULL once no longer needed.
//! - `delivery_attempts`: every attempt, by request_id.

use async_trait::async_trait;
use rusqlite::params;

use super::{Attempt, DeliveryState, DeliveryView, DueDelivery, Next, WebhookOutbox};
use crate::{
    decision::{Micros, Reason, Status},
    store::{StoreError, sqlite::Database},
    token::DriverToken,
};

#[async_trait]
impl WebhookOutbox for Database {
    async fn pending(
        &self,
        skip_hosts: Vec<String>,
        skip_ids: Vec<String>,
        limit: usize,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        let hosts = serde_json::to_string(&skip_hosts).expect("strings serialize");
        let ids = serde_json::to_string(&skip_ids).expect("strings serialize");
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT request_id, station_id, callback_url, host, driver_token, status, reason,
                        decided_at_us, attempts, next_attempt_us, age_from_us
                 FROM deliveries
                 WHERE state = 'pending'
                   AND host NOT IN (SELECT value FROM json_each(?1))
                   AND request_id NOT IN (SELECT value FROM json_each(?2))
                 ORDER BY next_attempt_us LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![hosts, ids, limit as i64], |r| {
                let status: String = r.get(5)?;
                let reason: String = r.get(6)?;
                Ok(DueDelivery {
                    request_id: r.get(0)?,
                    station_id: r.get(1)?,
                    callback_url: r.get(2)?,
                    host: r.get(3)?,
                    token: DriverToken::new(r.get::<_, Option<String>>(4)?.unwrap_or_default()),
                    status: Status::parse(&status).ok_or_else(|| bad(5, "status"))?,
                    reason: Reason::parse(&reason).ok_or_else(|| bad(6, "reason"))?,
                    decided_at: Micros(r.get(7)?),
                    attempts: r.get(8)?,
                    next_attempt_at: Micros(r.get(9)?),
                    age_from: Micros(r.get(10)?),
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn record(
        &self,
        request_id: &str,
        attempt: Attempt,
        next: Next,
        last_error: String,
    ) -> Result<(), StoreError> {
        let request_id = request_id.to_owned();
        self.write_with(move |tx| {
            tx.prepare_cached(
                "INSERT INTO delivery_attempts
                     (request_id, at_us, outcome, http_status, latency_ms, error_class)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                request_id,
                attempt.at.0,
                attempt.outcome,
                attempt.http_status,
                attempt.latency_ms,
                attempt.error_class
            ])?;
            let (state, next_at, finished_at) = match next {
                Next::Delivered => (DeliveryState::Delivered, None, Some(attempt.at.0)),
                Next::RetryAt(at) => (DeliveryState::Pending, Some(at.0), None),
                Next::Dead(_) => (DeliveryState::Dead, None, Some(attempt.at.0)),
            };
            tx.prepare_cached(
                "UPDATE deliveries
                 SET attempts = attempts + 1, state = ?2, next_attempt_us = ?3,
                     finished_at_us = ?4, last_error = ?5,
                     driver_token = CASE WHEN ?2 = 'delivered' THEN NULL ELSE driver_token END
                 WHERE request_id = ?1 AND state = 'pending'",
            )?
            .execute(params![
                request_id,
                state.as_str(),
                next_at,
                finished_at,
                last_error
            ])?;
            Ok(())
        })
        .await
    }

    async fn list(
        &self,
        state: Option<DeliveryState>,
        limit: usize,
    ) -> Result<Vec<DeliveryView>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT request_id, station_id, callback_url, state, next_attempt_us, last_error
                 FROM deliveries WHERE ?1 IS NULL OR state = ?1
                 ORDER BY seq DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![state.map(|s| s.as_str()), limit as i64], |r| {
                let state: String = r.get(3)?;
                Ok(DeliveryView {
                    request_id: r.get(0)?,
                    station_id: r.get(1)?,
                    callback_url: r.get(2)?,
                    state: DeliveryState::parse(&state).ok_or_else(|| bad(3, "state"))?,
                    next_attempt_at: r.get::<_, Option<i64>>(4)?.map(Micros),
                    last_error: r.get(5)?,
                    history: Vec::new(),
                })
            })?;
            let mut views = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            let mut attempts = conn.prepare_cached(
                "SELECT at_us, outcome, http_status, latency_ms, error_class
                 FROM delivery_attempts WHERE request_id = ?1 ORDER BY at_us",
            )?;
            for view in &mut views {
                view.history = attempts
                    .query_map([&view.request_id], |r| {
                        Ok(Attempt {
                            at: Micros(r.get(0)?),
                            outcome: r.get(1)?,
                            http_status: r.get(2)?,
                            latency_ms: r.get(3)?,
                            error_class: r.get(4)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
            }
            Ok(views)
        })
        .await
    }

    async fn redrive(&self, request_ids: Vec<String>, now: Micros) -> Result<u32, StoreError> {
        let ids = serde_json::to_string(&request_ids).expect("strings serialize");
        let every = request_ids.is_empty();
        let redriven = self
            .write_with(move |tx| {
                let n = tx
                    .prepare_cached(
                        "UPDATE deliveries
                         SET state = 'pending', attempts = 0, next_attempt_us = ?1, age_from_us = ?1,
                             finished_at_us = NULL, last_error = ''
                         WHERE state = 'dead' AND driver_token IS NOT NULL
                           AND (?2 OR request_id IN (SELECT value FROM json_each(?3)))",
                    )?
                    .execute(params![now.0, every, ids])?;
                Ok(n as u32)
            })
            .await?;
        if redriven > 0 {
            self.outbox_wake().notify_one();
        }
        Ok(redriven)
    }

    async fn erase_dead_tokens(&self, before: Micros) -> Result<u64, StoreError> {
        self.write_with(move |tx| {
            let n = tx
                .prepare_cached(
                    "UPDATE deliveries SET driver_token = NULL
                     WHERE state = 'dead' AND driver_token IS NOT NULL AND finished_at_us < ?1",
                )?
                .execute([before.0])?;
            Ok(n as u64)
        })
        .await
    }
}

fn bad(i: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        i,
        rusqlite::types::Type::Text,
        format!("unknown {what}").into(),
    )
}
