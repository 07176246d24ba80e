//! The audit trail on the embedded store: the `calls` table (one row per call or stream event,
//! indexed by time only) and the decision queries of the `Audit` service.
//!
//! Decisions are indexed by time and by status and time in the transaction that records them
//! (both indexes grow at their ends). The index by station, `decisions_by_station`, is kept a
//! second behind instead, in large batches and in a file of its own (see `store::station_index`).
//! A query by station brings it up to date first.
//!
//! Call records are written in batches that do not wait for fsync: a crash of the process loses
//! none; a power loss may lose the last few milliseconds of them (decisions are never among them:
//! they are written with full durability in the transaction that records them).

use async_trait::async_trait;
use rusqlite::params;

use super::{AuditTrail, CallQuery, CallRecord, DecisionQuery, Position, StreamEvent};
use crate::{
    decision::{Micros, RecordedDecision},
    store::{
        StoreError,
        sqlite::{Database, Durability},
    },
};

const DECISION_AUDIT_COLUMNS: &str = "d.seq, d.request_id, d.station_id, d.token_fp, d.reason, \
     d.authorizer, d.accepted_at_us, d.decided_at_us, d.revision";

#[async_trait]
impl AuditTrail for Database {
    async fn record_calls(&self, records: Vec<CallRecord>) -> Result<(), StoreError> {
        self.write_with_durability(Durability::Process, move |tx| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO calls (at_us, method, peer, client, station_id, request_id, code,
                                    latency_us, stream_event, messages_sent)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for r in &records {
                insert.execute(params![
                    r.at.0,
                    r.method,
                    r.peer,
                    r.client,
                    r.station_id,
                    r.request_id,
                    r.code,
                    r.latency_us as i64,
                    r.event.as_str(),
                    r.messages_sent as i64,
                ])?;
            }
            Ok(())
        })
        .await
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
        self.read(move |conn| {
            // Calls have one index, by time: each index is another entry the writer adds for every
            // call. A method filter (a full path, or a bare method name in any service) is applied
            // while walking it.
            let sql = if method.is_empty() {
                "SELECT seq, at_us, method, peer, client, station_id, request_id, code,
                        latency_us, stream_event, messages_sent
                 FROM calls INDEXED BY calls_by_time
                 WHERE at_us >= ?1 AND at_us < ?2 AND (at_us, seq) > (?3, ?4) AND ?5 = ''
                 ORDER BY at_us, seq LIMIT ?6"
            } else if method.starts_with('/') {
                "SELECT seq, at_us, method, peer, client, station_id, request_id, code,
                        latency_us, stream_event, messages_sent
                 FROM calls INDEXED BY calls_by_time
                 WHERE method = ?5 AND at_us >= ?1 AND at_us < ?2 AND (at_us, seq) > (?3, ?4)
                 ORDER BY at_us, seq LIMIT ?6"
            } else {
                "SELECT seq, at_us, method, peer, client, station_id, request_id, code,
                        latency_us, stream_event, messages_sent
                 FROM calls INDEXED BY calls_by_time
                 WHERE at_us >= ?1 AND at_us < ?2 AND (at_us, seq) > (?3, ?4)
                   AND (method = ?5 OR substr(method, -length(?5) - 1) = '/' || ?5)
                 ORDER BY at_us, seq LIMIT ?6"
            };
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt.query_map(
                params![from, to, after_at, after_seq, method, limit as i64],
                |r| {
                    let event: String = r.get(9)?;
                    let at: i64 = r.get(1)?;
                    Ok((
                        (at, r.get::<_, i64>(0)?),
                        CallRecord {
                            at: Micros(at),
                            method: r.get(2)?,
                            peer: r.get(3)?,
                            client: r.get(4)?,
                            station_id: r.get(5)?,
                            request_id: r.get(6)?,
                            code: r.get(7)?,
                            latency_us: r.get::<_, i64>(8)? as u64,
                            event: StreamEvent::parse(&event).unwrap_or(StreamEvent::None),
                            messages_sent: r.get::<_, i64>(10)? as u64,
                        },
                    ))
                },
            )?;
            rows.collect()
        })
        .await
    }

    async fn query_decisions(
        &self,
        query: DecisionQuery,
        after: Option<Position>,
        limit: usize,
    ) -> Result<Vec<(Position, RecordedDecision)>, StoreError> {
        if query.station_id.is_some() {
            // Decisions recorded since the last indexing run are indexed first.
            self.index_stations().await?;
        }
        let log_id = crate::store::DecisionLog::log_id(self);
        let from = query.from.map_or(i64::MIN, |m| m.0);
        let to = query.to.map_or(i64::MAX, |m| m.0);
        let (after_at, after_seq) = after.unwrap_or((i64::MIN, i64::MIN));
        let statuses: Vec<&str> = query.statuses.iter().map(|s| s.as_str()).collect();
        let one_status = (statuses.len() == 1).then(|| statuses[0].to_owned());
        let any_status = statuses.is_empty();
        let statuses = serde_json::to_string(&statuses).expect("strings serialize");
        let station = query.station_id;
        self.read(move |conn| {
            // Each shape walks an index in (decided_at, seq) order, so pages stream in order
            // without sorting: the station index, the status index, or the time index.
            let columns = DECISION_AUDIT_COLUMNS;
            let sql = match (&station, &one_status) {
                (Some(_), _) => format!(
                    "SELECT {columns} FROM stations.decisions_by_station s JOIN decisions d ON d.seq = s.seq
                     WHERE s.station_key = (SELECT key FROM stations.station_keys WHERE station_id = ?1)
                       AND s.decided_at_us >= ?2 AND s.decided_at_us < ?3
                       AND (s.decided_at_us, s.seq) > (?4, ?5)
                       AND (?6 OR d.status IN (SELECT value FROM json_each(?7)))
                     ORDER BY s.station_key, s.decided_at_us, s.seq LIMIT ?8"
                ),
                (None, Some(_)) => format!(
                    "SELECT {columns} FROM decisions d INDEXED BY decisions_by_status
                     WHERE d.status = ?1 AND d.decided_at_us >= ?2 AND d.decided_at_us < ?3
                       AND (d.decided_at_us, d.seq) > (?4, ?5) AND (?6 OR ?7 IS NOT NULL)
                     ORDER BY d.status, d.decided_at_us, d.seq LIMIT ?8"
                ),
                (None, None) => format!(
                    "SELECT {columns} FROM decisions d INDEXED BY decisions_by_time
                     WHERE ?1 = '' AND d.decided_at_us >= ?2 AND d.decided_at_us < ?3
                       AND (d.decided_at_us, d.seq) > (?4, ?5)
                       AND (?6 OR d.status IN (SELECT value FROM json_each(?7)))
                     ORDER BY d.decided_at_us, d.seq LIMIT ?8"
                ),
            };
            let first = station.or(one_status).unwrap_or_default();
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(
                params![
                    first,
                    from,
                    to,
                    after_at,
                    after_seq,
                    any_status,
                    statuses,
                    limit as i64
                ],
                |r| {
                    let d = crate::store::sqlite::decision_row(r, log_id)?;
                    Ok(((d.decision.decided_at.0, d.cursor.position as i64), d))
                },
            )?;
            rows.collect()
        })
        .await
    }

    async fn index_stations(&self) -> Result<u64, StoreError> {
        Database::index_stations(self).await
    }

    async fn purge_calls_before(&self, cutoff: Micros, max: usize) -> Result<u64, StoreError> {
        self.write_with(move |tx| {
            let n = tx
                .prepare_cached(
                    "DELETE FROM calls WHERE seq IN (
                         SELECT seq FROM calls INDEXED BY calls_by_time
                         WHERE at_us < ?1 ORDER BY at_us LIMIT ?2)",
                )?
                .execute(params![cutoff.0, max as i64])?;
            Ok(n as u64)
        })
        .await
    }
}
