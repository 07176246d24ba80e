//! The webhook outbox on the embedded store. The `deliveries` table is created with the rest of
//! the schema in `store::sqlite`, whose writer inserts a delivery in the transaction that records
//! its decision.
//!
//! - `deliveries`: one row per request with a callback: `state` is `pending`, `delivered` or
//!   `dead`; `(next_attempt_us, seq)` orders the pending ones (partial index `deliveries_due`,
//!   named in the query: without statistics the planner would pick another index and sort every
//!   pending row on each read); dead ones have their own partial index for listing.
//!   `driver_token` is the plain token, NULL once no longer needed.
//!   `history` is every attempt, one JSON array per line (`[at_us, outcome, http_status,
//!   latency_ms, error_class]`), appended to by the update that records it.
//! - The hot read, [`WebhookOutbox::claim_due`], runs on the writer's connection (see
//!   `Database::read_on_writer`).
//!
//! One row per delivery and few indexes on purpose: each table or index is another page written
//! by every attempt's commit.

use std::time::Duration;

use async_trait::async_trait;
use rusqlite::params;

use super::{DeliveryState, DeliveryView, DueDelivery, Next, Outcome, WebhookOutbox};
use crate::{
    decision::{Micros, Reason, Status},
    store::{
        StoreError,
        sqlite::{Database, Durability},
    },
    token::DriverToken,
};

#[async_trait]
impl WebhookOutbox for Database {
    /// The file belongs to this process (it is locked), so a claim needs no row update: the
    /// delivery engine, the only one, keeps what it took in memory until the attempt is recorded,
    /// and a restart is the end of every lease.
    async fn claim_due(
        &self,
        skip_hosts: Vec<String>,
        after: Option<(Micros, i64)>,
        limit: usize,
        _lease: Duration,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        let (after_at, after_seq) = after.map_or((i64::MIN, i64::MIN), |(at, seq)| (at.0, seq));
        let hosts = serde_json::to_string(&skip_hosts).expect("strings serialize");
        self.read_on_writer(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT request_id, station_id, callback_url, host, driver_token, status, reason,
                        decided_at_us, attempts, next_attempt_us, age_from_us, seq, revision
                 FROM deliveries INDEXED BY deliveries_due
                 WHERE state = 'pending'
                   AND (next_attempt_us, seq) > (?3, ?4)
                   AND host NOT IN (SELECT value FROM json_each(?1))
                 ORDER BY next_attempt_us, seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![hosts, limit as i64, after_at, after_seq], |r| {
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
                    seq: r.get(11)?,
                    revision: r.get(12)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn record(&self, outcomes: Vec<Outcome>) -> Result<(), StoreError> {
        // A lost attempt record means the attempt is made again: at-least-once holds without
        // waiting for fsync (a kill -9 loses nothing; a power loss may repeat the last attempts).
        self.write_with_durability(Durability::Process, move |tx| {
            let mut update = tx.prepare_cached(
                "UPDATE deliveries
                 SET attempts = attempts + 1, state = ?2, next_attempt_us = ?3,
                     finished_at_us = ?4, last_error = ?5,
                     history = history || ?6,
                     driver_token = CASE WHEN ?2 = 'delivered' THEN NULL ELSE driver_token END
                 WHERE seq = ?1 AND state = 'pending'",
            )?;
            for o in &outcomes {
                let a = &o.attempt;
                let (state, next_at, finished_at) = match o.next {
                    Next::Delivered => (DeliveryState::Delivered, None, Some(a.at.0)),
                    Next::RetryAt(at) => (DeliveryState::Pending, Some(at.0), None),
                    Next::Dead(_) => (DeliveryState::Dead, None, Some(a.at.0)),
                };
                update.execute(params![
                    o.seq,
                    state.as_str(),
                    next_at,
                    finished_at,
                    o.last_error,
                    super::history_line(a),
                ])?;
            }
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
            // Dead deliveries have their own index; pending ones are in `deliveries_due`;
            // delivered ones are most of the table, found newest first without an index.
            let mut stmt = match state {
                Some(DeliveryState::Dead) => conn.prepare_cached(
                    "SELECT request_id, station_id, callback_url, state, next_attempt_us, last_error, history
                     FROM deliveries INDEXED BY deliveries_dead
                     WHERE state = 'dead' AND ?1 = 'dead' ORDER BY seq DESC LIMIT ?2",
                )?,
                Some(_) => conn.prepare_cached(
                    "SELECT request_id, station_id, callback_url, state, next_attempt_us, last_error, history
                     FROM deliveries WHERE state = ?1 ORDER BY seq DESC LIMIT ?2",
                )?,
                None => conn.prepare_cached(
                    "SELECT request_id, station_id, callback_url, state, next_attempt_us, last_error, history
                     FROM deliveries WHERE ?1 IS NULL ORDER BY seq DESC LIMIT ?2",
                )?,
            };
            let rows = stmt.query_map(params![state.map(|s| s.as_str()), limit as i64], |r| {
                let state: String = r.get(3)?;
                let history: String = r.get(6)?;
                Ok(DeliveryView {
                    request_id: r.get(0)?,
                    station_id: r.get(1)?,
                    callback_url: r.get(2)?,
                    state: DeliveryState::parse(&state).ok_or_else(|| bad(3, "state"))?,
                    next_attempt_at: r.get::<_, Option<i64>>(4)?.map(Micros),
                    last_error: r.get(5)?,
                    history: super::parse_history(&history).ok_or_else(|| bad(6, "history"))?,
                })
            })?;
            rows.collect()
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
