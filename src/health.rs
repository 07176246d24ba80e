//! Health: `grpc.health.v1` for `""` and `chargegate.v1.ChargingAuthorization`, and the readiness
//! behind `/readyz`. SERVING while the queue and the store answer; NOT_SERVING when one does not
//! (checked every second) and from the first moment of shutdown.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{proto::AUTHORIZATION_SERVICE, store::DecisionLog};

const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Serving state shared by the gRPC health service and the HTTP readiness endpoint.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    ready: Arc<AtomicBool>,
    /// The status last reported (`None` before the first), behind the lock every report takes:
    /// a probe's SERVING cannot land after shutdown's NOT_SERVING, and an unchanged status is
    /// not sent again (each send wakes every `Watch` stream with a repeat).
    reported: Arc<tokio::sync::Mutex<Reported>>,
}

#[derive(Default)]
struct Reported {
    serving: Option<bool>,
    /// Set once shutdown starts; nothing turns the server SERVING again after that.
    stopping: bool,
}

impl Health {
    pub fn new(reporter: HealthReporter) -> Self {
        Self {
            reporter,
            ready: Arc::new(AtomicBool::new(false)),
            reported: Arc::default(),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Reports the store's state when it changed; ignored once shutdown has started.
    pub async fn set(&self, serving: bool) {
        let mut reported = self.reported.lock().await;
        if reported.stopping || reported.serving == Some(serving) {
            return;
        }
        self.report(serving).await;
        reported.serving = Some(serving);
    }

    async fn report(&self, serving: bool) {
        let was = self.ready.swap(serving, Ordering::AcqRel);
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        self.reporter
            .set_service_status(AUTHORIZATION_SERVICE, status)
            .await;
        if was != serving {
            tracing::info!(serving, "health changed");
        }
    }

    /// NOT_SERVING for good.
    pub async fn stop(&self) {
        let mut reported = self.reported.lock().await;
        reported.stopping = true;
        self.report(false).await;
        reported.serving = Some(false);
    }

    /// Ends every `Watch` stream (each first delivers the NOT_SERVING it has not seen yet), so
    /// health watchers do not hold connections open through a graceful shutdown. Call after
    /// [`Health::stop`] and after new calls are refused: `Check` then finds no service.
    pub async fn close_watches(&self) {
        let mut reporter = self.reporter.clone();
        reporter.clear_service_status("").await;
        reporter.clear_service_status(AUTHORIZATION_SERVICE).await;
    }

    /// Probes the store (which also holds the embedded queue) until `shutdown`.
    pub fn monitor(
        self,
        store: Arc<dyn DecisionLog>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROBE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let ok = matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, store.ping()).await,
                    Ok(Ok(()))
                );
                if !ok {
                    tracing::warn!("the store did not answer its health probe");
                }
                self.set(ok).await;
            }
        })
    }
}
