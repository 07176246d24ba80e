//! The kept requests of UNKNOWN decisions on the embedded store (see `crate::revise`).

use std::time::Duration;

use async_trait::async_trait;
use rusqlite::params;
use tokio::sync::oneshot;

use super::{Database, writer::WriteOp};
use crate::{
    decision::{Micros, NewDecision, RecordedDecision},
    queue::{QueuedRequest, Revisable},
    revise::RevisionStore,
    store::StoreError,
    token::{DriverToken, Fingerprint},
};

#[async_trait]
impl RevisionStore for Database {
    /// One process per data dir: nothing to claim.
    async fn due_revisions(
        &self,
        since: Micros,
        max: usize,
        _lease: Duration,
    ) -> Result<Vec<Revisable>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT request_id, station_id, token_fp, driver_token, callback_url,
                        accepted_at_us, decided_at_us
                 FROM revisable WHERE decided_at_us >= ?1 ORDER BY decided_at_us LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![since.0, max as i64], |r| {
                Ok(Revisable {
                    request: QueuedRequest {
                        request_id: r.get(0)?,
                        station_id: r.get(1)?,
                        fingerprint: Fingerprint::from_stored(r.get(2)?),
                        token: DriverToken::new(r.get::<_, String>(3)?),
                        callback_url: r.get(4)?,
                        accepted_at: Micros(r.get(5)?),
                    },
                    decided_at: Micros(r.get(6)?),
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn record_revision(
        &self,
        kept: Revisable,
        revision: NewDecision,
    ) -> Result<Option<RecordedDecision>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::Revise(kept, revision, tx), rx).await
    }

    async fn expire_revisions(&self, before: Micros) -> Result<u64, StoreError> {
        self.write_with_durability(super::writer::Durability::Full, move |tx| {
            tx.prepare_cached("DELETE FROM revisable WHERE decided_at_us < ?1")?
                .execute([before.0])
                .map(|n| n as u64)
        })
        .await
    }
}
