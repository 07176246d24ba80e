//! `chargegate.v1.ChargingAuthorization`: intake, decision streams and decision lookups.

use std::{collections::BTreeSet, pin::Pin, sync::Arc, time::Duration};

use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{invalid_argument, store_unavailable};
use crate::{
    audit::{self, AuditSlot, signals::Signals},
    authorizer::{AuthorizationRequest, Authorizer},
    cursor::Cursor,
    decide,
    fanout::{self, Hub, Start, StreamContext, StreamItem},
    intake::{self, FieldViolation},
    proto::{
        self, AcceptStatus, AuthorizeRequest, AuthorizeResponse, DecisionStatus,
        GetDecisionRequest, GetDecisionResponse, SubscribeDecisionsRequest,
        charging_authorization_server::ChargingAuthorization,
    },
    queue::{EnqueueOutcome, Queue},
    security::{
        auth::Caller,
        rate::{RateLimits, SubscriptionSlots},
    },
    store::{DecisionLog, RequestState, StationFilter},
    token::Fingerprinter,
};

pub const MESSAGE_CALLBACK: &str = "Request is being processed asynchronously. The result will be sent to the provided callback URL.";
pub const MESSAGE_SUBSCRIBERS: &str =
    "Request is being processed asynchronously. The result will be pushed to decision subscribers.";

/// Most stations one subscription may name.
pub const MAX_SUBSCRIBED_STATIONS: usize = 10_000;

pub struct AuthorizationService {
    pub queue: Arc<dyn Queue>,
    /// Asked at intake for a verdict it can give at once (see `decide::at_once`).
    pub authorizer: Arc<dyn Authorizer>,
    /// Counts the decisions made at intake, as the pipeline counts its own.
    pub signals: Arc<Signals>,
    pub log: Arc<dyn DecisionLog>,
    pub hub: Arc<Hub>,
    pub fingerprinter: Fingerprinter,
    pub heartbeat_interval: Duration,
    /// Cancelled at shutdown; every decision stream then ends with UNAVAILABLE.
    pub streams_shutdown: CancellationToken,
    /// Station buckets for `Authorize`.
    pub limits: Arc<RateLimits>,
    /// Open decision streams per client.
    pub subscriptions: SubscriptionSlots,
}

#[tonic::async_trait]
impl ChargingAuthorization for AuthorizationService {
    #[tracing::instrument(level = "debug", skip_all, fields(request_id, station_id))]
    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<Response<AuthorizeResponse>, Status> {
        let slot = audit::slot(&request);
        let caller = Caller::of(&request);
        let result = self.accept(request.into_inner(), slot, &caller).await;
        let outcome = match &result {
            Ok(ack) if ack.duplicate => "duplicate",
            Ok(_) => "accepted",
            Err((outcome, _)) => outcome,
        };
        metrics::counter!("chargegate_requests_total", "outcome" => outcome).increment(1);
        result.map(Response::new).map_err(|(_, status)| status)
    }

    type SubscribeDecisionsStream = Pin<Box<dyn Stream<Item = StreamItem> + Send + 'static>>;

    async fn subscribe_decisions(
        &self,
        request: Request<SubscribeDecisionsRequest>,
    ) -> Result<Response<Self::SubscribeDecisionsStream>, Status> {
        audit::note(&request, &request.get_ref().station_ids.join(","), "");
        let caller = Caller::of(&request);
        let peer = request.remote_addr();
        let request = request.into_inner();
        let filter = parse_station_filter(&request.station_ids).map_err(invalid_argument)?;
        let start = self.parse_start(&request.after_cursor).await?;
        let filter = caller.subscription(filter)?;
        // Held by the stream: dropping the stream frees it.
        let slot = self.subscriptions.open(&caller, peer)?;
        let ctx = StreamContext {
            hub: self.hub.clone(),
            log: self.log.clone(),
            heartbeat_interval: self.heartbeat_interval,
            shutdown: self.streams_shutdown.clone(),
        };
        let stream = fanout::decision_stream(ctx, filter, start).map(move |item| {
            let _held = &slot;
            item
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_decision(
        &self,
        request: Request<GetDecisionRequest>,
    ) -> Result<Response<GetDecisionResponse>, Status> {
        audit::note(&request, "", &request.get_ref().request_id);
        let caller = Caller::of(&request);
        let request_id = request.into_inner().request_id;
        if request_id.is_empty() || request_id.len() > intake::MAX_REQUEST_ID_LEN {
            return Err(invalid_argument(vec![FieldViolation::new(
                "request_id",
                format!(
                    "is required and at most {} characters",
                    intake::MAX_REQUEST_ID_LEN
                ),
            )]));
        }
        let state = self
            .log
            .request_state(&request_id)
            .await
            .map_err(|e| store_unavailable(&e))?;
        if let Some(station) = state.as_ref().map(RequestState::station_id) {
            caller.check_station(station)?;
        }
        let decision = match state {
            None => {
                return Err(Status::not_found(
                    "no request with this request_id is retained",
                ));
            }
            Some(RequestState::Decided(d)) => d.to_proto(),
            Some(RequestState::Pending {
                station_id,
                fingerprint,
                accepted_at,
            }) => proto::Decision {
                request_id,
                station_id,
                status: DecisionStatus::Pending as i32,
                driver_token_fingerprint: fingerprint.as_str().to_owned(),
                accepted_at: Some(accepted_at.to_proto()),
                ..Default::default()
            },
        };
        Ok(Response::new(GetDecisionResponse {
            decision: Some(decision),
        }))
    }
}

impl AuthorizationService {
    /// Validates and enqueues one request, or records it decided when its verdict needs no
    /// waiting. An error carries the `outcome` label it is counted as.
    async fn accept(
        &self,
        request: AuthorizeRequest,
        slot: Option<Arc<AuditSlot>>,
        caller: &Caller,
    ) -> Result<AuthorizeResponse, (&'static str, Status)> {
        // A refused call is noted with what the caller sent (see `AuditSlot::note`), an accepted
        // one with its canonical station, parsed once.
        let new = match intake::validate(request, &self.fingerprinter) {
            Ok(new) => new,
            Err(rejected) => {
                if let Some(slot) = &slot {
                    slot.note(&rejected.station_id, &rejected.request_id);
                }
                return Err(("invalid_argument", invalid_argument(rejected.violations)));
            }
        };
        if let Some(slot) = slot {
            slot.note_canonical(&new.station_id, &new.request_id);
        }
        caller
            .check_station(&new.station_id)
            .map_err(|status| ("permission_denied", status))?;
        self.limits
            .check_station(&new.station_id)
            .map_err(|status| ("rate_limited", status))?;
        let span = tracing::Span::current();
        span.record("request_id", new.request_id.as_str());
        span.record("station_id", new.station_id.as_str());
        let request_id = new.request_id.clone();
        let message = if new.callback_url.is_some() {
            MESSAGE_CALLBACK
        } else {
            MESSAGE_SUBSCRIBERS
        };
        let asked = AuthorizationRequest {
            request_id: &new.request_id,
            station_id: &new.station_id,
            token: &new.token,
            fingerprint: &new.fingerprint,
        };
        let enqueued = match decide::at_once(&*self.authorizer, asked) {
            Some(verdict) => self.queue.enqueue_decided(new, verdict).await,
            None => self.queue.enqueue(new).await.map(|o| (o, None)),
        };
        let (outcome, decided) = enqueued.map_err(|e| ("unavailable", store_unavailable(&e)))?;
        if let Some(d) = decided {
            decide::recorded(&d.decision, &self.signals);
        }
        let (accepted_at, duplicate) = match outcome {
            EnqueueOutcome::Accepted { accepted_at } => (accepted_at, false),
            EnqueueOutcome::Duplicate { accepted_at } => (accepted_at, true),
            EnqueueOutcome::Conflict => {
                return Err((
                    "conflict",
                    Status::already_exists(
                        "request_id was already used for another station or driver token",
                    ),
                ));
            }
            EnqueueOutcome::Full => {
                return Err((
                    "queue_full",
                    Status::resource_exhausted("the queue is full; retry later"),
                ));
            }
        };
        Ok(AuthorizeResponse {
            request_id,
            status: AcceptStatus::Accepted as i32,
            message: message.to_owned(),
            duplicate,
            accepted_at: Some(accepted_at.to_proto()),
        })
    }

    /// Where a subscription starts; checks the cursor against the log's bounds.
    async fn parse_start(&self, after_cursor: &str) -> Result<Start, Status> {
        if after_cursor.is_empty() {
            return Ok(Start::Live);
        }
        let malformed =
            |why: &str| invalid_argument(vec![FieldViolation::new("after_cursor", why)]);
        let cursor = Cursor::decode(after_cursor)
            .map_err(|_| malformed("is not a cursor issued by this service"))?;
        if cursor.log_id != self.log.log_id() {
            return Err(malformed("belongs to another decision log"));
        }
        let bounds = self.log.bounds().await.map_err(|e| store_unavailable(&e))?;
        if cursor.position < bounds.floor {
            return Err(Status::out_of_range(
                "after_cursor is older than the retained decision log; subscribe without a cursor",
            ));
        }
        if cursor.position > bounds.head {
            return Err(Status::out_of_range(
                "after_cursor is ahead of the decision log",
            ));
        }
        Ok(Start::After(cursor.position))
    }
}

/// Canonical, de-duplicated station ids; empty means every station.
fn parse_station_filter(ids: &[String]) -> Result<StationFilter, Vec<FieldViolation>> {
    if ids.is_empty() {
        return Ok(StationFilter::All);
    }
    if ids.len() > MAX_SUBSCRIBED_STATIONS {
        return Err(vec![FieldViolation::new(
            "station_ids",
            format!("names more than {MAX_SUBSCRIBED_STATIONS} stations"),
        )]);
    }
    let mut stations = BTreeSet::new();
    let mut violations = Vec::new();
    for raw in ids {
        match intake::parse_station_id_named("station_ids", raw) {
            Ok(id) => {
                stations.insert(id);
            }
            Err(v) if violations.is_empty() => violations.push(v),
            Err(_) => {}
        }
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    Ok(StationFilter::Only(stations.into_iter().collect()))
}
