//! The decision log's reads, and its writes through the writer.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};
use tokio::sync::oneshot;

use super::{
    Database,
    decisions::{DECISION_COLUMNS, decision_row},
    writer::WriteOp,
};
use crate::{
    decision::{Micros, RecordedDecision},
    health::Probe,
    store::{DecisionLog, LogBounds, RequestState, StationFilter, StoreError},
    token::Fingerprint,
};

#[async_trait]
impl DecisionLog for Database {
    fn log_id(&self) -> u32 {
        self.inner.log_id
    }

    async fn read_after(
        &self,
        position: u64,
        filter: &StationFilter,
        limit: usize,
    ) -> Result<Vec<RecordedDecision>, StoreError> {
        let log_id = self.inner.log_id;
        let stations = match filter {
            StationFilter::All => None,
            StationFilter::Only(ids) => {
                Some(serde_json::to_string(ids).expect("strings serialize"))
            }
        };
        self.read(move |conn| {
            let mut out = Vec::new();
            match stations {
                None => {
                    let mut stmt = conn.prepare_cached(&format!(
                        "SELECT {DECISION_COLUMNS} FROM decisions WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                    ))?;
                    let rows = stmt.query_map(params![position as i64, limit as i64], |r| decision_row(r, log_id))?;
                    for row in rows {
                        out.push(row?);
                    }
                }
                Some(json) => {
                    let mut stmt = conn.prepare_cached(&format!(
                        "SELECT {DECISION_COLUMNS} FROM decisions
                         WHERE seq > ?1 AND station_id IN (SELECT value FROM json_each(?3))
                         ORDER BY seq LIMIT ?2"
                    ))?;
                    let rows =
                        stmt.query_map(params![position as i64, limit as i64, json], |r| decision_row(r, log_id))?;
                    for row in rows {
                        out.push(row?);
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn bounds(&self) -> Result<LogBounds, StoreError> {
        Ok(LogBounds {
            floor: self.inner.shared.floor.load(Ordering::Acquire),
            head: self.inner.shared.decision_head.load(Ordering::Acquire),
        })
    }

    async fn request_state(&self, request_id: &str) -> Result<Option<RequestState>, StoreError> {
        let log_id = self.inner.log_id;
        let request_id = request_id.to_owned();
        self.read(move |conn| {
            let decided = conn
                .prepare_cached(&format!(
                    "SELECT {DECISION_COLUMNS} FROM decisions WHERE request_id = ?1
                     ORDER BY revision DESC LIMIT 1"
                ))?
                .query_row([&request_id], |r| decision_row(r, log_id))
                .optional()?;
            if let Some(d) = decided {
                return Ok(Some(RequestState::Decided(d)));
            }
            conn.prepare_cached(
                "SELECT station_id, token_fp, accepted_at_us FROM requests WHERE request_id = ?1",
            )?
            .query_row([&request_id], |r| {
                Ok(RequestState::Pending {
                    station_id: r.get(0)?,
                    fingerprint: Fingerprint::from_stored(r.get(1)?),
                    accepted_at: Micros(r.get(2)?),
                })
            })
            .optional()
        })
        .await
    }

    async fn purge_before(
        &self,
        cutoff: Micros,
        through: u64,
        max: usize,
    ) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::Purge(cutoff, through, max, tx), rx)
            .await
    }
}

#[async_trait]
impl Probe for Database {
    /// A real write: it needs the write lock and the disk, as enqueueing does.
    async fn ping(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::Ping(tx), rx).await
    }
}
