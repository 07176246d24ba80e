//! `chargegate.v1.Audit`: the decision log and the call records, queried. Both answers are
//! server streams fed page by page from the store, so a large export never sits in memory.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt, stream};
use tonic::{Request, Response, Status};

use super::{invalid_argument, store_unavailable};
use crate::{
    audit::{self, AuditTrail, CallQuery, DecisionQuery, Position},
    decision::{Micros, Status as DecisionStatusValue},
    intake::{self, FieldViolation},
    proto::{self, CallRecord, QueryCallsRequest, QueryDecisionsRequest, audit_server},
};

/// Rows read from the store per page of a stream.
const PAGE: usize = 500;
/// Longest method filter accepted.
const MAX_METHOD: usize = 256;

pub struct AuditService {
    pub trail: Arc<dyn AuditTrail>,
}

type Items<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl audit_server::Audit for AuditService {
    type QueryDecisionsStream = Items<proto::Decision>;

    async fn query_decisions(
        &self,
        request: Request<QueryDecisionsRequest>,
    ) -> Result<Response<Self::QueryDecisionsStream>, Status> {
        audit::note(&request, &request.get_ref().station_id, "");
        let request = request.into_inner();
        let mut violations = Vec::new();
        let station_id = match request.station_id.as_str() {
            "" => None,
            raw => match intake::parse_station_id(raw) {
                Ok(id) => Some(id),
                Err(v) => {
                    violations.push(v);
                    None
                }
            },
        };
        let mut statuses = Vec::new();
        for raw in &request.statuses {
            match proto::DecisionStatus::try_from(*raw)
                .ok()
                .and_then(DecisionStatusValue::from_proto)
            {
                Some(s) if !statuses.contains(&s) => statuses.push(s),
                Some(_) => {}
                None => {
                    violations.push(FieldViolation::new(
                        "statuses",
                        "must be ALLOWED, NOT_ALLOWED, UNKNOWN or INVALID",
                    ));
                    break;
                }
            }
        }
        let (from, to) = time_range(&request.from, &request.to, &mut violations);
        if !violations.is_empty() {
            return Err(invalid_argument(violations));
        }
        let query = DecisionQuery {
            station_id,
            statuses,
            from,
            to,
        };
        let trail = self.trail.clone();
        Ok(Response::new(paged(
            request.limit,
            move |after, n| {
                let (trail, query) = (trail.clone(), query.clone());
                async move { trail.query_decisions(query, after, n).await }
            },
            |d| d.to_proto(),
        )))
    }

    type QueryCallsStream = Items<CallRecord>;

    async fn query_calls(
        &self,
        request: Request<QueryCallsRequest>,
    ) -> Result<Response<Self::QueryCallsStream>, Status> {
        let request = request.into_inner();
        let mut violations = Vec::new();
        if request.method.len() > MAX_METHOD {
            violations.push(FieldViolation::new(
                "method",
                format!("must be at most {MAX_METHOD} characters"),
            ));
        }
        let (from, to) = time_range(&request.from, &request.to, &mut violations);
        if !violations.is_empty() {
            return Err(invalid_argument(violations));
        }
        let query = CallQuery {
            method: request.method,
            from,
            to,
        };
        let trail = self.trail.clone();
        Ok(Response::new(paged(
            request.limit,
            move |after, n| {
                let (trail, query) = (trail.clone(), query.clone());
                async move { trail.query_calls(query, after, n).await }
            },
            |c| CallRecord {
                at: Some(c.at.to_proto()),
                method: c.method,
                peer: c.peer,
                client: c.client,
                station_id: c.station_id,
                request_id: c.request_id,
                code: c.code,
                latency_ms: (c.latency_us / 1000).min(u64::from(u32::MAX)) as u32,
                stream_event: c.event.as_str().to_owned(),
                messages_sent: c.messages_sent,
            },
        )))
    }
}

/// `from` (inclusive) and `to` (exclusive), checked.
fn time_range(
    from: &Option<prost_types::Timestamp>,
    to: &Option<prost_types::Timestamp>,
    violations: &mut Vec<FieldViolation>,
) -> (Option<Micros>, Option<Micros>) {
    let from = from.as_ref().map(Micros::from_proto);
    let to = to.as_ref().map(Micros::from_proto);
    if let (Some(f), Some(t)) = (from, to)
        && t <= f
    {
        violations.push(FieldViolation::new("to", "must be after from"));
    }
    (from, to)
}

/// A stream of every row `fetch` returns, page after page, at most `limit` (0: no limit). A
/// store failure ends the stream with UNAVAILABLE.
fn paged<T, P, F, Fut>(limit: u32, fetch: F, to_proto: fn(T) -> P) -> Items<P>
where
    T: Send + 'static,
    P: Send + 'static,
    F: Fn(Option<Position>, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Vec<(Position, T)>, crate::store::StoreError>>
        + Send
        + 'static,
{
    let remaining = if limit == 0 {
        u64::MAX
    } else {
        u64::from(limit)
    };
    let pages = stream::unfold(
        (fetch, None, remaining, false),
        move |(fetch, after, remaining, done)| async move {
            if done || remaining == 0 {
                return None;
            }
            let n = (PAGE as u64).min(remaining) as usize;
            match fetch(after, n).await {
                Ok(rows) => {
                    let last = rows.last().map(|(p, _)| *p);
                    let full = rows.len() == n;
                    let sent = rows.len() as u64;
                    let items: Vec<Result<P, Status>> =
                        rows.into_iter().map(|(_, row)| Ok(to_proto(row))).collect();
                    Some((
                        stream::iter(items),
                        (fetch, last.or(after), remaining - sent, !full),
                    ))
                }
                Err(e) => Some((
                    stream::iter(vec![Err(store_unavailable(&e))]),
                    (fetch, after, remaining, true),
                )),
            }
        },
    );
    Box::pin(pages.flatten())
}
