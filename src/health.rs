//! Health: `grpc.health.v1` for `""` and `chargegate.v1.ChargingAuthorization`, and the readiness
//! behind `/readyz`. SERVING while every system the ports live on answers its [`Probe`];
//! NOT_SERVING while one does not (each is checked every second) and from the first moment of
//! shutdown. Beside them, `liveness` is SERVING for as long as the process serves, for liveness
//! probes.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{proto::AUTHORIZATION_SERVICE, store::StoreError};

/// The health service name for liveness probes.
pub const LIVENESS: &str = "liveness";

/// A system a port lives on (a database file, a PostgreSQL server, a Redis server), as health
/// checks it.
#[async_trait]
pub trait Probe: Send + Sync + 'static {
    /// Succeeds while the system accepts writes.
    async fn ping(&self) -> Result<(), StoreError>;
}

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

    /// The `liveness` service: SERVING from now until the server exits, whatever its backends
    /// do, for liveness probes (a restart does not bring a database back).
    pub async fn alive(&self) {
        self.reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
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
        reporter.clear_service_status(LIVENESS).await;
    }

    /// Probes each system every second until `shutdown`: SERVING while all answer in time.
    pub fn monitor(
        self,
        probes: Vec<(&'static str, Arc<dyn Probe>)>,
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
                let answers = futures::future::join_all(
                    probes
                        .iter()
                        .map(|(_, probe)| tokio::time::timeout(PROBE_TIMEOUT, probe.ping())),
                )
                .await;
                let mut ok = true;
                for ((name, _), answer) in probes.iter().zip(answers) {
                    let up = match answer {
                        Ok(Ok(())) => true,
                        Ok(Err(e)) => {
                            tracing::warn!(backend = name, error = %e, "a backend failed its health probe");
                            false
                        }
                        Err(_) => {
                            tracing::warn!(
                                backend = name,
                                "a backend did not answer its health probe in time"
                            );
                            false
                        }
                    };
                    metrics::gauge!("chargegate_backend_up", "backend" => *name)
                        .set(f64::from(u8::from(up)));
                    ok &= up;
                }
                self.set(ok).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// A system that answers while `up` is set.
    struct Switch(AtomicBool);

    #[async_trait]
    impl Probe for Switch {
        async fn ping(&self) -> Result<(), StoreError> {
            if self.0.load(Ordering::Acquire) {
                Ok(())
            } else {
                Err(StoreError::Closed)
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn any_system_that_stops_answering_turns_health_not_serving() {
        let (reporter, _service) = tonic_health::server::health_reporter();
        let health = Health::new(reporter);
        let (store, queue) = (
            Arc::new(Switch(AtomicBool::new(true))),
            Arc::new(Switch(AtomicBool::new(true))),
        );
        let stop = CancellationToken::new();
        let task = health.clone().monitor(
            vec![("store", store.clone()), ("queue", queue.clone())],
            stop.clone(),
        );
        let after_a_probe = || tokio::time::sleep(PROBE_INTERVAL * 2);
        after_a_probe().await;
        assert!(health.is_ready(), "both answer");
        queue.0.store(false, Ordering::Release);
        after_a_probe().await;
        assert!(!health.is_ready(), "the queue's system does not answer");
        queue.0.store(true, Ordering::Release);
        after_a_probe().await;
        assert!(health.is_ready(), "it answers again");
        store.0.store(false, Ordering::Release);
        after_a_probe().await;
        assert!(!health.is_ready(), "the store's system does not answer");
        stop.cancel();
        task.await.unwrap();
    }
}
