//! The kept requests of UNKNOWN decisions on PostgreSQL (see `crate::revise`): claimed with a
//! lease like the queue, so instances ask for different ones; recorded by the writer. An
//! instance takes its own claims back at once: its reviser asks one page at a time, so a claim of
//! its own is one a pass left unasked (the authorizer was down again) or a restart in place left.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::{Postgres, db, queued_request, writer::WriteOp};
use crate::{
    decision::{Micros, NewDecision, RecordedDecision},
    queue::Revisable,
    revise::RevisionStore,
    store::StoreError,
};

#[async_trait]
impl RevisionStore for Postgres {
    async fn due_revisions(
        &self,
        since: Micros,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Revisable>, StoreError> {
        let now = Micros::now().0;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "WITH due AS (
                     SELECT request_id FROM revisable
                     WHERE decided_at_us >= $1
                       AND (claimed_until_us IS NULL OR claimed_until_us < $2 OR claimed_by = $5)
                     ORDER BY decided_at_us LIMIT $3
                     FOR UPDATE SKIP LOCKED)
                 UPDATE revisable r SET claimed_until_us = $4, claimed_by = $5
                 FROM due WHERE r.request_id = due.request_id
                 RETURNING r.request_id, r.station_id, r.token_fp, r.callback_url,
                           r.accepted_at_us, r.driver_token, r.decided_at_us",
            )
            .await
            .map_err(db)?;
        let until = now + lease.as_micros() as i64;
        let rows = client
            .query(
                &stmt,
                &[&since.0, &now, &(max as i64), &until, &self.instance()],
            )
            .await
            .map_err(db)?;
        let mut due: Vec<Revisable> = rows
            .iter()
            .map(|r| Revisable {
                request: queued_request(r, 0),
                decided_at: Micros(r.get(6)),
            })
            .collect();
        due.sort_by_key(|r| r.decided_at);
        Ok(due)
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
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM revisable WHERE decided_at_us < $1",
                &[&before.0],
            )
            .await
            .map_err(db)
    }
}
