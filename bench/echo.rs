//! The bare-metal reference: a tonic server with chargegate's message shapes that does nothing.
//! `Authorize` answers at once (no validation, no durability); `SubscribeDecisions` holds an idle
//! stream open. It runs as its own process (`chargegate-bench echo-server`) so its RSS and CPU are
//! measured exactly like chargegate's.

use std::pin::Pin;

use chargegate::proto::{
    AcceptStatus, AuthorizeRequest, AuthorizeResponse, GetDecisionRequest, GetDecisionResponse,
    SubscribeDecisionsRequest, SubscribeDecisionsResponse,
    charging_authorization_server::{ChargingAuthorization, ChargingAuthorizationServer},
};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

struct Echo;

#[tonic::async_trait]
impl ChargingAuthorization for Echo {
    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<Response<AuthorizeResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(AuthorizeResponse {
            request_id: request.request_id,
            status: AcceptStatus::Accepted as i32,
            message: chargegate::api::authorization::MESSAGE_SUBSCRIBERS.to_owned(),
            duplicate: false,
            accepted_at: Some(chargegate::decision::Micros::now().to_proto()),
        }))
    }

    type SubscribeDecisionsStream =
        Pin<Box<dyn Stream<Item = Result<SubscribeDecisionsResponse, Status>> + Send + 'static>>;

    async fn subscribe_decisions(
        &self,
        _: Request<SubscribeDecisionsRequest>,
    ) -> Result<Response<Self::SubscribeDecisionsStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move { tx.closed().await });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_decision(
        &self,
        _: Request<GetDecisionRequest>,
    ) -> Result<Response<GetDecisionResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

/// Serves the echo service on an ephemeral port; prints `listen=<addr>` for the parent.
pub fn serve() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listen={}", listener.local_addr()?);
        tonic::transport::Server::builder()
            .add_service(ChargingAuthorizationServer::new(Echo))
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
            .await?;
        Ok(())
    })
}
