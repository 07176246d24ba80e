//! `chargegate.v1.Webhooks`: what the webhook bridge did with each callback, and the redrive of
//! dead deliveries. Callback URLs are shown as given; tokens never are.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{invalid_argument, store_unavailable};
use crate::{
    decision::Micros,
    intake::{FieldViolation, check_request_id},
    proto::{
        self, DeliveryAttempt, ListDeliveriesRequest, ListDeliveriesResponse,
        RedriveDeliveriesRequest, RedriveDeliveriesResponse, webhooks_server,
    },
    webhook::{DeliveryState, DeliveryView, WebhookOutbox},
};

/// Deliveries listed when the request sets no limit, and the most one call returns.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 10_000;
/// Request ids one redrive may name.
const MAX_REDRIVE_IDS: usize = 10_000;

pub struct WebhooksService {
    pub outbox: Arc<dyn WebhookOutbox>,
}

#[tonic::async_trait]
impl webhooks_server::Webhooks for WebhooksService {
    async fn list_deliveries(
        &self,
        request: Request<ListDeliveriesRequest>,
    ) -> Result<Response<ListDeliveriesResponse>, Status> {
        let request = request.into_inner();
        let state = match proto::DeliveryState::try_from(request.state) {
            Ok(proto::DeliveryState::Unspecified) => None,
            Ok(proto::DeliveryState::Pending) => Some(DeliveryState::Pending),
            Ok(proto::DeliveryState::Delivered) => Some(DeliveryState::Delivered),
            Ok(proto::DeliveryState::Dead) => Some(DeliveryState::Dead),
            Err(_) => {
                return Err(invalid_argument(vec![FieldViolation::new(
                    "state",
                    "is not a DeliveryState",
                )]));
            }
        };
        if request.limit > MAX_LIMIT {
            return Err(invalid_argument(vec![FieldViolation::new(
                "limit",
                format!("must be at most {MAX_LIMIT}"),
            )]));
        }
        let limit = match request.limit {
            0 => DEFAULT_LIMIT,
            n => n,
        };
        let deliveries = self
            .outbox
            .list(state, limit as usize)
            .await
            .map_err(|e| store_unavailable(&e))?;
        Ok(Response::new(ListDeliveriesResponse {
            deliveries: deliveries.into_iter().map(to_proto).collect(),
        }))
    }

    async fn redrive_deliveries(
        &self,
        request: Request<RedriveDeliveriesRequest>,
    ) -> Result<Response<RedriveDeliveriesResponse>, Status> {
        let ids = request.into_inner().request_ids;
        if ids.len() > MAX_REDRIVE_IDS {
            return Err(invalid_argument(vec![FieldViolation::new(
                "request_ids",
                format!("must name at most {MAX_REDRIVE_IDS} requests"),
            )]));
        }
        if let Some(Err(description)) = ids
            .iter()
            .map(|id| match id.is_empty() {
                true => Err("must not hold an empty id".to_owned()),
                false => check_request_id(id),
            })
            .find(Result::is_err)
        {
            return Err(invalid_argument(vec![FieldViolation::new(
                "request_ids",
                description,
            )]));
        }
        let redriven = self
            .outbox
            .redrive(ids, Micros::now())
            .await
            .map_err(|e| store_unavailable(&e))?;
        if redriven > 0 {
            tracing::info!(redriven, "dead webhook deliveries redriven");
        }
        Ok(Response::new(RedriveDeliveriesResponse { redriven }))
    }
}

fn to_proto(d: DeliveryView) -> proto::Delivery {
    proto::Delivery {
        request_id: d.request_id,
        station_id: d.station_id,
        callback_url: d.callback_url,
        state: match d.state {
            DeliveryState::Pending => proto::DeliveryState::Pending,
            DeliveryState::Delivered => proto::DeliveryState::Delivered,
            DeliveryState::Dead => proto::DeliveryState::Dead,
        } as i32,
        attempts: d.history.len() as u32,
        next_attempt_at: d.next_attempt_at.map(Micros::to_proto),
        last_error: d.last_error,
        history: d
            .history
            .into_iter()
            .map(|a| DeliveryAttempt {
                at: Some(a.at.to_proto()),
                outcome: a.outcome,
                http_status: a.http_status.map(u32::from).unwrap_or(0),
                latency_ms: a.latency_ms,
                error_class: a.error_class,
            })
            .collect(),
    }
}
