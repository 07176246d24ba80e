//! The audit trail on PostgreSQL: the `calls` table, and the decision queries of the `Audit`
//! service on the indexes by time, by status and by station that the schema keeps in the
//! transaction recording each decision (PostgreSQL's B-trees take the extra index without the
//! cost it had on the embedded store).

use async_trait::async_trait;

use super::{AuditTrail, CallQuery, CallRecord, DecisionQuery, Position, StreamEvent};
use crate::{
    decision::{Micros, RecordedDecision},
    store::{
        DecisionLog, StoreError,
        postgres::{Postgres, decision_row},
    },
};

fn db(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::backend(e)
}

const DECISION_AUDIT_COLUMNS: &str = "position, request_id, station_id, token_fp, reason, \
     authorizer, accepted_at_us, decided_at_us, revision";

#[async_trait]
impl AuditTrail for Postgres {
    async fn record_calls(&self, records: Vec<CallRecord>) -> Result<(), StoreError> {
        let client = self.client().await?;
        let mut cols: (Vec<i64>, Vec<&str>, Vec<&str>, Vec<&str>, Vec<&str>) = Default::default();
        let mut more: (Vec<&str>, Vec<&str>, Vec<i64>, Vec<&str>, Vec<i64>) = Default::default();
        for r in &records {
            cols.0.push(r.at.0);
            cols.1.push(&r.method);
            cols.2.push(&r.peer);
            cols.3.push(&r.client);
            cols.4.push(&r.station_id);
            more.0.push(&r.request_id);
            more.1.push(&r.code);
            more.2.push(r.latency_us as i64);
            more.3.push(r.event.as_str());
            more.4.push(r.messages_sent as i64);
        }
        let stmt = client
            .prepare_cached(
                "INSERT INTO calls (at_us, method, peer, client, station_id, request_id, code,
                                    latency_us, stream_event, messages_sent)
                 SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[],
                                      $5::text[], $6::text[], $7::text[], $8::bigint[],
                                      $9::text[], $10::bigint[])",
            )
            .await
            .map_err(db)?;
        client
            .execute(
                &stmt,
                &[
                    &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &more.0, &more.1, &more.2,
                    &more.3, &more.4,
                ],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn query_calls(
        &self,
        query: CallQuery,
        after: Option<Position>,
        limit: usize,
    ) -> Result<Vec<(Position, CallRecord)>, StoreError> {
        let from = query.from.map_or(i64::MIN, |m| m.0);
        let to = query.to.map_or(i64::MAX, |m| m.0);
        let (after_at, after_seq) = after.unwrap_or((i64::MIN, i64::MIN));
        let method = query.method;
        // A method filter is a full path, or a bare method name in any service.
        let suffix = format!(
            "%/{}",
            method
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT seq, at_us, method, peer, client, station_id, request_id, code,
                        latency_us, stream_event, messages_sent
                 FROM calls
                 WHERE at_us >= $1 AND at_us < $2 AND (at_us, seq) > ($3, $4)
                   AND ($5 = '' OR method = $5 OR (left($5, 1) <> '/' AND method LIKE $6))
                 ORDER BY at_us, seq LIMIT $7",
            )
            .await
            .map_err(db)?;
        let rows = client
            .query(
                &stmt,
                &[
                    &from,
                    &to,
                    &after_at,
                    &after_seq,
                    &method,
                    &suffix,
                    &(limit as i64),
                ],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| {
                let at: i64 = r.get(1);
                (
                    (at, r.get::<_, i64>(0)),
                    CallRecord {
                        at: Micros(at),
                        method: r.get(2),
                        peer: r.get(3),
                        client: r.get(4),
                        station_id: r.get(5),
                        request_id: r.get(6),
                        code: r.get(7),
                        latency_us: r.get::<_, i64>(8) as u64,
                        event: StreamEvent::parse(r.get(9)).unwrap_or(StreamEvent::None),
                        messages_sent: r.get::<_, i64>(10) as u64,
                    },
                )
            })
            .collect())
    }

    async fn query_decisions(
        &self,
        query: DecisionQuery,
        after: Option<Position>,
        limit: usize,
    ) -> Result<Vec<(Position, RecordedDecision)>, StoreError> {
        let log_id = self.log_id();
        let from = query.from.map_or(i64::MIN, |m| m.0);
        let to = query.to.map_or(i64::MAX, |m| m.0);
        let (after_at, after_seq) = after.unwrap_or((i64::MIN, i64::MIN));
        let statuses: Vec<&str> = query.statuses.iter().map(|s| s.as_str()).collect();
        let client = self.client().await?;
        let columns = DECISION_AUDIT_COLUMNS;
        let rows = match &query.station_id {
            Some(station) => {
                let stmt = client
                    .prepare_cached(&format!(
                        "SELECT {columns} FROM decisions
                         WHERE station_id = $1 AND decided_at_us >= $2 AND decided_at_us < $3
                           AND (decided_at_us, position) > ($4, $5)
                           AND (cardinality($6::text[]) = 0 OR status = ANY($6))
                         ORDER BY decided_at_us, position LIMIT $7"
                    ))
                    .await
                    .map_err(db)?;
                client
                    .query(
                        &stmt,
                        &[
                            station,
                            &from,
                            &to,
                            &after_at,
                            &after_seq,
                            &statuses,
                            &(limit as i64),
                        ],
                    )
                    .await
            }
            None => {
                let stmt = client
                    .prepare_cached(&format!(
                        "SELECT {columns} FROM decisions
                         WHERE decided_at_us >= $1 AND decided_at_us < $2
                           AND (decided_at_us, position) > ($3, $4)
                           AND (cardinality($5::text[]) = 0 OR status = ANY($5))
                         ORDER BY decided_at_us, position LIMIT $6"
                    ))
                    .await
                    .map_err(db)?;
                client
                    .query(
                        &stmt,
                        &[
                            &from,
                            &to,
                            &after_at,
                            &after_seq,
                            &statuses,
                            &(limit as i64),
                        ],
                    )
                    .await
            }
        }
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                let d = decision_row(r, log_id)?;
                Ok(((d.decision.decided_at.0, d.cursor.position as i64), d))
            })
            .collect()
    }

    /// The index by station is kept in the transaction that records each decision.
    async fn index_stations(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    async fn purge_calls_before(&self, cutoff: Micros, max: usize) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM calls WHERE seq IN (
                     SELECT seq FROM calls WHERE at_us < $1 ORDER BY at_us LIMIT $2)",
                &[&cutoff.0, &(max as i64)],
            )
            .await
            .map_err(db)
    }
}
