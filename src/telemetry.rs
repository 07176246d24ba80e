//! Logs and metrics: `tracing` output (text or JSON, levels via `RUST_LOG`) and the Prometheus
//! endpoint with `/healthz` and `/readyz` on `metrics_listen`.

use std::{net::SocketAddr, sync::OnceLock};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::{config::LogFormat, health::Health};

/// Installs the global `tracing` subscriber (once; later calls do nothing).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry.with(fmt::layer().with_target(false)).try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true))
            .try_init(),
    };
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let latency = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
            .expect("bucket list is not empty")
            .set_buckets_for_metric(
                Matcher::Full("chargegate_store_commit_writes".into()),
                &[
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
                ],
            )
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::debug!("a metrics recorder was already installed");
        }
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!("chargegate_requests_total", "Authorize calls by outcome.");
    describe_counter!(
        "chargegate_decisions_total",
        "Decisions recorded, by status."
    );
    describe_histogram!(
        "chargegate_authorization_duration_seconds",
        "Time the authorizer took per decision."
    );
    describe_histogram!(
        "chargegate_decision_latency_seconds",
        "Time from acceptance to recorded decision."
    );
    describe_gauge!(
        "chargegate_queue_depth",
        "Requests queued or being decided."
    );
    describe_gauge!("chargegate_subscribers", "Open SubscribeDecisions streams.");
    describe_counter!(
        "chargegate_subscriber_catchups_total",
        "Times a lagging subscriber left the live path to catch up from the decision log."
    );
    describe_counter!(
        "chargegate_acl_reloads_total",
        "Access-list reloads by outcome."
    );
}

/// Serves `/metrics`, `/healthz` (the process is up) and `/readyz` (SERVING) until `shutdown`.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    health: Health,
    shutdown: CancellationToken,
) {
    let handle = prometheus();
    let app = Router::new()
        .route("/metrics", get(move || async move { handle.render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(health): State<Health>| async move {
                if health.is_ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .with_state(health);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "metrics listener failed");
    }
}

/// Binds the metrics listener.
pub async fn bind_http(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
