//! The decision log's reads on PostgreSQL, and retention.

use async_trait::async_trait;

use super::{DECISION_COLUMNS, Postgres, db, decision_row};
use crate::{
    decision::{Micros, RecordedDecision},
    health::Probe,
    store::{DecisionLog, LogBounds, RequestState, StationFilter, StoreError},
    token::Fingerprint,
};

/// The advisory lock of retention: one instance purges at a time; the others skip the run.
const RETENTION_LOCK: i64 = 0x6367_7265_7465_6e74;

impl Postgres {
    /// Up to `limit` decisions after `position` for every station, in log order.
    pub(crate) async fn decisions_after(
        &self,
        position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedDecision>, StoreError> {
        self.read_after(position, &StationFilter::All, limit).await
    }
}

#[async_trait]
impl DecisionLog for Postgres {
    fn log_id(&self) -> u32 {
        Postgres::log_id(self)
    }

    async fn read_after(
        &self,
        position: u64,
        filter: &StationFilter,
        limit: usize,
    ) -> Result<Vec<RecordedDecision>, StoreError> {
        let client = self.client().await?;
        let (position, limit) = (position as i64, limit as i64);
        let rows = match filter {
            StationFilter::All => {
                let stmt = client
                    .prepare_cached(&format!(
                        "SELECT {DECISION_COLUMNS} FROM decisions WHERE position > $1
                         ORDER BY position LIMIT $2"
                    ))
                    .await
                    .map_err(db)?;
                client.query(&stmt, &[&position, &limit]).await
            }
            StationFilter::Only(ids) => {
                let stmt = client
                    .prepare_cached(&format!(
                        "SELECT {DECISION_COLUMNS} FROM decisions
                         WHERE position > $1 AND station_id = ANY($3)
                         ORDER BY position LIMIT $2"
                    ))
                    .await
                    .map_err(db)?;
                client.query(&stmt, &[&position, &limit, ids]).await
            }
        }
        .map_err(db)?;
        let log_id = Postgres::log_id(self);
        rows.iter().map(|r| decision_row(r, log_id)).collect()
    }

    async fn bounds(&self) -> Result<LogBounds, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT position, floor FROM log_head")
            .await
            .map_err(db)?;
        let row = client.query_one(&stmt, &[]).await.map_err(db)?;
        let (head, floor) = (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64);
        self.note_bounds(head, floor);
        Ok(LogBounds { floor, head })
    }

    async fn request_state(&self, request_id: &str) -> Result<Option<RequestState>, StoreError> {
        let client = self.client().await?;
        let decided = client
            .prepare_cached(&format!(
                "SELECT {DECISION_COLUMNS} FROM decisions WHERE request_id = $1
                 ORDER BY revision DESC LIMIT 1"
            ))
            .await
            .map_err(db)?;
        if let Some(row) = client
            .query_opt(&decided, &[&request_id])
            .await
            .map_err(db)?
        {
            return Ok(Some(RequestState::Decided(decision_row(
                &row,
                Postgres::log_id(self),
            )?)));
        }
        let pending = client
            .prepare_cached(
                "SELECT station_id, token_fp, accepted_at_us FROM request_keys WHERE request_id = $1",
            )
            .await
            .map_err(db)?;
        Ok(client
            .query_opt(&pending, &[&request_id])
            .await
            .map_err(db)?
            .map(|r| RequestState::Pending {
                station_id: r.get(0),
                fingerprint: Fingerprint::from_stored(r.get(1)),
                accepted_at: Micros(r.get(2)),
            }))
    }

    /// One instance at a time (the others find the advisory lock taken and purge nothing).
    async fn purge_before(
        &self,
        cutoff: Micros,
        through: u64,
        max: usize,
    ) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&RETENTION_LOCK])
            .await
            .map_err(db)?
            .get(0);
        if !locked {
            return Ok(0);
        }
        let through: Option<i64> = tx
            .query_one(
                "SELECT max(position) FROM (
                     SELECT position FROM decisions ORDER BY position LIMIT $1
                 ) t WHERE position < coalesce(
                     (SELECT min(position) FROM (
                          SELECT position, decided_at_us FROM decisions ORDER BY position LIMIT $1
                      ) u WHERE decided_at_us >= $2),
                     9223372036854775807) AND position <= $3",
                &[
                    &(max as i64),
                    &cutoff.0,
                    &(through.min(i64::MAX as u64) as i64),
                ],
            )
            .await
            .map_err(db)?
            .get(0);
        let Some(through) = through else {
            return Ok(0);
        };
        tx.execute(
            "DELETE FROM request_keys k USING decisions d
             WHERE d.position <= $1 AND k.request_id = d.request_id",
            &[&through],
        )
        .await
        .map_err(db)?;
        tx.execute(
            "DELETE FROM deliveries v USING decisions d
             WHERE d.position <= $1 AND v.request_id = d.request_id",
            &[&through],
        )
        .await
        .map_err(db)?;
        // A revision's delivery is kept under its webhook id.
        tx.execute(
            "DELETE FROM deliveries v USING decisions d
             WHERE d.position <= $1 AND d.revision > 0
               AND v.request_id = d.request_id || '.r' || d.revision",
            &[&through],
        )
        .await
        .map_err(db)?;
        // The retained log verifies from the link of the last purged record.
        let chain_floor: Vec<u8> = tx
            .query_one(
                "SELECT chain FROM decisions WHERE position = $1",
                &[&through],
            )
            .await
            .map_err(db)?
            .get(0);
        let purged = tx
            .execute("DELETE FROM decisions WHERE position <= $1", &[&through])
            .await
            .map_err(db)?;
        tx.execute(
            "UPDATE log_head SET floor = greatest(floor, $1), chain_floor = $2",
            &[&through, &chain_floor],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        self.note_bounds(0, through as u64);
        Ok(purged)
    }
}

#[async_trait]
impl Probe for Postgres {
    /// A statement on a pooled connection: PostgreSQL answers.
    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.map_err(db)?;
        Ok(())
    }
}

/// Records read at a time by [`verify`].
const VERIFY_PAGE: i64 = 10_000;

/// Walks the shared decision log in position order from the chain's floor and checks every
/// link (`chargegate audit verify --store-url postgres://…`).
pub async fn verify(
    url: &str,
    key: &[u8; 32],
) -> Result<crate::audit::chain::Verification, StoreError> {
    use crate::audit::chain::{ChainedRecord, Walker};
    let client = super::connect(&super::parse_url(url)?).await?;
    let head = client
        .query_one("SELECT floor, chain_floor FROM log_head", &[])
        .await
        .map_err(db)?;
    let floor: i64 = head.get(0);
    let chain_floor: Vec<u8> = head.get(1);
    let mut walker = Walker::new(key, chain_floor.try_into().unwrap_or([0; 32]));
    let mut after = floor;
    loop {
        let rows = client
            .query(
                "SELECT position, request_id, station_id, token_fp, status, reason, authorizer,
                        accepted_at_us, decided_at_us, processing_ms, chain, revision
                 FROM decisions WHERE position > $1 ORDER BY position LIMIT $2",
                &[&after, &VERIFY_PAGE],
            )
            .await
            .map_err(db)?;
        let Some(last) = rows.last() else { break };
        after = last.get(0);
        for r in &rows {
            let chain: Vec<u8> = r.get(10);
            let position: i64 = r.get(0);
            // A missing position is a deleted record: the next one's link cannot follow.
            let more = walker.check(ChainedRecord {
                position,
                request_id: r.get(1),
                station_id: r.get(2),
                token_fp: r.get(3),
                status: r.get(4),
                reason: r.get(5),
                authorizer: r.get(6),
                accepted_at_us: r.get(7),
                decided_at_us: r.get(8),
                processing_ms: r.get(9),
                revision: r.get::<_, i32>(11) as u32,
                chain: Some(&chain),
            });
            if !more {
                return Ok(walker.finish());
            }
        }
    }
    Ok(walker.finish())
}
