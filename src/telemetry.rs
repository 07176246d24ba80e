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

/// What kind of series a metric is.
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The series a metric starts with, before anything has happened.
enum Series {
    /// One series, no labels.
    One,
    /// One series per value of the label.
    Label(&'static str, &'static [&'static str]),
    /// `chargegate_grpc_requests_total`: each served method with code `OK`.
    Methods,
    /// Series set by their owner once it knows them (the backends in use).
    Later,
}

/// One exported metric: its `# HELP` line says what it counts and in which unit.
struct Metric {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    series: Series,
}

/// Every metric the service exports (CONTRACT §9 and this service's own). Each is described and
/// registered when the recorder is installed, so a fresh server's first scrape already has every
/// series an alert names, at 0; a test scrapes one.
const METRICS: &[Metric] = &[
    Metric {
        name: "chargegate_requests_total",
        kind: Kind::Counter,
        help: "Authorize calls answered, by outcome (calls).",
        series: Series::Label(
            "outcome",
            &[
                "accepted",
                "duplicate",
                "invalid_argument",
                "conflict",
                "queue_full",
                "unavailable",
                "permission_denied",
                "rate_limited",
            ],
        ),
    },
    Metric {
        name: "chargegate_decisions_total",
        kind: Kind::Counter,
        help: "Decisions recorded, by status (decisions).",
        series: Series::Label("status", &["allowed", "not_allowed", "unknown", "invalid"]),
    },
    Metric {
        name: "chargegate_authorization_duration_seconds",
        kind: Kind::Histogram,
        help: "Time the authorizer took to answer, per decision (seconds).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_decision_latency_seconds",
        kind: Kind::Histogram,
        help: "Time from a request's acceptance to its recorded decision (seconds).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_fanout_backfills_total",
        kind: Kind::Counter,
        help: "Decisions a tailer read from the shared log because the live carrier did not bring them in time (decisions).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_backend_up",
        kind: Kind::Gauge,
        help: "Whether the system a backend lives on answered its last health probe (1 or 0, per backend in use).",
        series: Series::Later,
    },
    Metric {
        name: "chargegate_queue_depth",
        kind: Kind::Gauge,
        help: "Requests queued or being decided (requests).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_subscribers",
        kind: Kind::Gauge,
        help: "Open SubscribeDecisions streams (streams).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_subscriber_catchups_total",
        kind: Kind::Counter,
        help: "Times a lagging subscriber left the live path to catch up from the decision log (catch-ups).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_webhook_deliveries_total",
        kind: Kind::Counter,
        help: "Webhook attempts, by outcome: delivered, retry (failed, tried again later), dead (attempts).",
        series: Series::Label("outcome", &["delivered", "retry", "dead"]),
    },
    Metric {
        name: "chargegate_webhook_delivery_duration_seconds",
        kind: Kind::Histogram,
        help: "Time one webhook attempt took, connecting included (seconds).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_audit_records_total",
        kind: Kind::Counter,
        help: "Call records written to the audit trail (records).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_audit_records_dropped_total",
        kind: Kind::Counter,
        help: "Call records dropped because the recorder's buffer was full or its write failed (records).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_authorizer_circuit_state",
        kind: Kind::Gauge,
        help: "The remote authorizer's circuit: 0 closed, 1 open, 2 half-open (state).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_grpc_requests_total",
        kind: Kind::Counter,
        help: "RPCs ended, by method and gRPC code; streams count when they close (calls).",
        series: Series::Methods,
    },
    Metric {
        name: "chargegate_acl_reloads_total",
        kind: Kind::Counter,
        help: "Reloads of the access-list file, by outcome: ok, or error (the previous list stays) (reloads).",
        series: Series::Label("outcome", &["ok", "error"]),
    },
    Metric {
        name: "chargegate_clients_reloads_total",
        kind: Kind::Counter,
        help: "Reloads of the clients file, by outcome: ok, or error (the clients in force stay) (reloads).",
        series: Series::Label("outcome", &["ok", "error"]),
    },
    Metric {
        name: "chargegate_revisions_total",
        kind: Kind::Counter,
        help: "UNKNOWN decisions asked again, by the answer: allowed and not_allowed (a revision recorded), unknown (still no answer; the request is asked again later) (requests).",
        series: Series::Label("status", &["allowed", "not_allowed", "unknown"]),
    },
    Metric {
        name: "chargegate_rate_limited_total",
        kind: Kind::Counter,
        help: "Calls refused by a rate limit, by the bucket that refused: client or station (calls).",
        series: Series::Label("scope", &["client", "station"]),
    },
    Metric {
        name: "chargegate_calls_shed_total",
        kind: Kind::Counter,
        help: "Calls refused at once for overload, by reason: in_flight (max_calls_in_flight), subscriptions (subscriptions_per_client), handshakes (TLS handshakes in progress past 1,024) (calls).",
        series: Series::Label("reason", &["in_flight", "subscriptions", "handshakes"]),
    },
    Metric {
        name: "chargegate_tls_reloads_total",
        kind: Kind::Counter,
        help: "Reloads of the TLS certificate, key and client CA, by outcome: ok, or error (the certificate in force stays) (reloads).",
        series: Series::Label("outcome", &["ok", "error"]),
    },
    Metric {
        name: "chargegate_store_commit_seconds",
        kind: Kind::Histogram,
        help: "Time one group commit of the embedded store took, fsync included (seconds).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_store_commit_writes",
        kind: Kind::Histogram,
        help: "Writes in one group commit of the embedded store (writes).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_store_checkpoint_seconds",
        kind: Kind::Histogram,
        help: "Time one WAL checkpoint took, by who copied: the checkpoint thread or the writer (seconds).",
        series: Series::Label("on", &["thread", "writer"]),
    },
    Metric {
        name: "chargegate_decisions_unknown_share",
        kind: Kind::Gauge,
        help: "Share of the last 15 minutes' decisions that were UNKNOWN (0 to 1).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_decision_timeouts_last_hour",
        kind: Kind::Gauge,
        help: "Decisions UNKNOWN/timeout in the last hour (decisions).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_abuse_enumeration_stations",
        kind: Kind::Gauge,
        help: "Stations flagged now for enumeration: more distinct refused tokens within a minute than abuse_enumeration_threshold (stations).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_abuse_velocity_fingerprints",
        kind: Kind::Gauge,
        help: "Token fingerprints flagged now for velocity: decided at more stations within abuse_velocity_window_ms than abuse_velocity_stations (fingerprints).",
        series: Series::One,
    },
    Metric {
        name: "chargegate_failing_stations",
        kind: Kind::Gauge,
        help: "Stations with at least 10 decisions in the last 15 minutes, more than half UNKNOWN or INVALID (stations).",
        series: Series::One,
    },
];

/// Describes every metric and registers its first series at 0.
fn describe() {
    for m in METRICS {
        let labels: Vec<Vec<(&'static str, &'static str)>> = match m.series {
            Series::One => vec![vec![]],
            Series::Label(label, values) => values.iter().map(|v| vec![(label, *v)]).collect(),
            Series::Methods => crate::audit::layer::METHODS
                .iter()
                .filter(|method| method.starts_with('/'))
                .map(|method| vec![("method", *method), ("code", "OK")])
                .collect(),
            Series::Later => vec![],
        };
        match m.kind {
            Kind::Counter => {
                metrics::describe_counter!(m.name, m.help);
                for l in &labels {
                    metrics::counter!(m.name, l).increment(0);
                }
            }
            Kind::Gauge => {
                metrics::describe_gauge!(m.name, m.help);
                for l in &labels {
                    metrics::gauge!(m.name, l).increment(0.0);
                }
            }
            Kind::Histogram => {
                metrics::describe_histogram!(m.name, m.help);
                for l in &labels {
                    let _ = metrics::histogram!(m.name, l);
                }
            }
        }
    }
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
