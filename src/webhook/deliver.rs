//! The delivery engine: takes due deliveries from the outbox and POSTs them, each attempt in its
//! own task, never blocking the decision pipeline.
//!
//! Limits are permits, not polling: at most `webhook_concurrency` attempts in flight, and at most
//! `webhook_host_concurrency` per destination (`host:port`), so a receiver that hangs holds its own
//! permits and nobody else's — its deliveries are not even read while its permits are taken. The
//! dispatcher wakes when the store commits new deliveries, when an attempt finishes, and when the
//! earliest retry falls due. A retry is a time in the outbox, never a sleeping task.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use reqwest::{
    Client,
    header::{CONTENT_TYPE, RETRY_AFTER},
};
use tokio::{
    sync::{Notify, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::{
    Attempt, DueDelivery, Next, WebhookOutbox,
    guard::{Guard, GuardedResolver, is_refused},
    policy::{AttemptResult, RetryPolicy, parse_retry_after},
    signer::Signer,
};
use crate::decision::Micros;

/// Longest sleep between looks at the outbox when nothing wakes the dispatcher.
const IDLE_LOOK: Duration = Duration::from_secs(5);
/// Pause after the outbox could not be read.
const READ_BACKOFF: Duration = Duration::from_secs(1);
/// How often tokens of dead deliveries past their redrive window are erased.
const ERASE_INTERVAL: Duration = Duration::from_secs(60);
/// Bytes of a response body read (and discarded) so the connection can be reused.
const RESPONSE_READ_MAX: usize = 64 * 1024;

/// The engine's settings, from [`crate::config::WebhookConfig`].
#[derive(Clone, Debug)]
pub struct Settings {
    pub policy: RetryPolicy,
    pub guard: Guard,
    pub timeout: Duration,
    pub signer: Option<Signer>,
    /// Attempts in flight at once.
    pub concurrency: usize,
    /// Attempts in flight at once to one `host:port`.
    pub host_concurrency: usize,
}

/// Builds the HTTP client deliveries use: pooled keep-alive connections (HTTP/1.1, or HTTP/2 over
/// TLS when the receiver offers it), names resolved through the SSRF guard, no redirects followed,
/// no proxy from the environment, the attempt deadline covering connect and response.
pub fn client(settings: &Settings) -> reqwest::Result<Client> {
    Client::builder()
        .dns_resolver(GuardedResolver::shared(settings.guard))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        .pool_max_idle_per_host(settings.host_concurrency)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("chargegate/", env!("CARGO_PKG_VERSION")))
        .build()
}

pub struct Deliverer {
    outbox: Arc<dyn WebhookOutbox>,
    client: Client,
    settings: Settings,
    /// Rung by the store when it commits new deliveries (or redrives dead ones).
    wake: Arc<Notify>,
}

/// What one attempt task reports back to the dispatcher: its request_id and host, whose permits
/// are then free.
type Finished = (String, String);

impl Deliverer {
    pub fn new(
        outbox: Arc<dyn WebhookOutbox>,
        client: Client,
        settings: Settings,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            outbox,
            client,
            settings,
            wake,
        }
    }

    /// Delivers until `stop` is cancelled, then waits for the attempts in flight. Dropping the
    /// returned future aborts them; their deliveries stay pending and are sent after a restart.
    pub async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let (finished_tx, mut finished_rx) = mpsc::unbounded_channel::<Finished>();
        let mut in_flight: HashMap<String, String> = HashMap::new();
        let mut per_host: HashMap<String, usize> = HashMap::new();
        let mut tasks = JoinSet::new();
        let mut erase = tokio::time::interval(ERASE_INTERVAL);
        let release = |(id, host): Finished,
                       in_flight: &mut HashMap<String, String>,
                       per_host: &mut HashMap<String, usize>| {
            in_flight.remove(&id);
            if let Some(n) = per_host.get_mut(&host) {
                *n -= 1;
                if *n == 0 {
                    per_host.remove(&host);
                }
            }
        };
        loop {
            while let Ok(done) = finished_rx.try_recv() {
                release(done, &mut in_flight, &mut per_host);
            }
            while tasks.try_join_next().is_some() {}
            let free = this.settings.concurrency.saturating_sub(in_flight.len());
            let mut look_again = IDLE_LOOK;
            if free > 0 {
                let full: Vec<String> = per_host
                    .iter()
                    .filter(|(_, n)| **n >= this.settings.host_concurrency)
                    .map(|(h, _)| h.clone())
                    .collect();
                let busy: Vec<String> = in_flight.keys().cloned().collect();
                match this.outbox.pending(full, busy, free).await {
                    Ok(deliveries) => {
                        let now = Micros::now();
                        let mut started = 0;
                        for d in deliveries {
                            if d.next_attempt_at > now {
                                let wait = (d.next_attempt_at.0 - now.0) as u64;
                                look_again = look_again.min(Duration::from_micros(wait));
                                break;
                            }
                            let load = per_host.entry(d.host.clone()).or_default();
                            if *load >= this.settings.host_concurrency {
                                continue;
                            }
                            *load += 1;
                            in_flight.insert(d.request_id.clone(), d.host.clone());
                            started += 1;
                            let this = this.clone();
                            let finished = finished_tx.clone();
                            tasks.spawn(async move {
                                let key = (d.request_id.clone(), d.host.clone());
                                this.attempt(d).await;
                                let _ = finished.send(key);
                            });
                        }
                        if started > 0 {
                            continue;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the webhook outbox failed");
                        look_again = READ_BACKOFF;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(done) = finished_rx.recv() => release(done, &mut in_flight, &mut per_host),
                _ = this.wake.notified() => {}
                _ = tokio::time::sleep(look_again) => {}
                _ = erase.tick() => this.erase_expired_tokens().await,
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn erase_expired_tokens(&self) {
        let window = self.settings.policy.max_age.as_micros() as i64;
        let before = Micros(Micros::now().0.saturating_sub(window));
        match self.outbox.erase_dead_tokens(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                erased = n,
                "erased the tokens of dead deliveries past webhook_max_age_ms"
            ),
            Err(e) => tracing::warn!(error = %e, "erasing tokens of dead deliveries failed"),
        }
    }

    /// One attempt: send, classify, record what follows. Never returns an error: a delivery whose
    /// record could not be written stays pending and is attempted again (at-least-once).
    #[tracing::instrument(level = "debug", skip_all, fields(request_id = %d.request_id, host = %d.host))]
    async fn attempt(&self, d: DueDelivery) {
        let at = Micros::now();
        let started = Instant::now();
        let (result, error_class, detail) = self.send(&d).await;
        let latency = started.elapsed();
        let number = d.attempts + 1;
        let next =
            self.settings
                .policy
                .next(result, number, Micros::now(), d.age_from, rand::random());
        let http_status = match result {
            AttemptResult::Status { code, .. } => Some(code),
            _ => None,
        };
        let outcome = match next {
            Next::Delivered => "delivered",
            Next::RetryAt(_) => "retry",
            Next::Dead(_) => "dead",
        };
        metrics::counter!("chargegate_webhook_deliveries_total", "outcome" => outcome).increment(1);
        metrics::histogram!("chargegate_webhook_delivery_duration_seconds")
            .record(latency.as_secs_f64());
        let last_error = match next {
            Next::Delivered => String::new(),
            Next::RetryAt(_) => detail,
            Next::Dead(reason) => format!("{}: {detail}", reason.as_str()),
        };
        match next {
            Next::Delivered => tracing::debug!(attempt = number, "webhook delivered"),
            Next::RetryAt(when) => tracing::debug!(
                attempt = number,
                error = %last_error,
                retry_in_ms = at.millis_until(when),
                "webhook attempt failed; will retry"
            ),
            Next::Dead(_) => tracing::warn!(
                request_id = %d.request_id,
                host = %d.host,
                attempt = number,
                error = %last_error,
                "webhook delivery is dead"
            ),
        }
        let attempt = Attempt {
            at,
            outcome: outcome.to_owned(),
            http_status,
            latency_ms: latency.as_millis().min(u128::from(u32::MAX)) as u32,
            error_class: error_class.to_owned(),
        };
        if let Err(e) = self
            .outbox
            .record(&d.request_id, attempt, next, last_error)
            .await
        {
            tracing::warn!(error = %e, "recording a webhook attempt failed; the delivery stays pending");
        }
    }

    /// Sends one attempt. Returns what happened, its error class (empty on a response) and a
    /// description for `last_error` that never holds the URL or the token.
    async fn send(&self, d: &DueDelivery) -> (AttemptResult, &'static str, String) {
        let Ok(url) = url::Url::parse(&d.callback_url) else {
            return (
                AttemptResult::Refused,
                "invalid_url",
                "the callback URL cannot be parsed".into(),
            );
        };
        let literal = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
            _ => None,
        };
        if literal.is_some_and(|ip| !self.settings.guard.permits(ip)) {
            return (
                AttemptResult::Refused,
                "refused_destination",
                "the destination address is not allowed (webhook_allow_private)".into(),
            );
        }
        let body = d.body();
        let timestamp = Micros::now().0.div_euclid(1_000_000);
        let mut request = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", &d.request_id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(signer) = &self.settings.signer {
            request = request.header(
                "webhook-signature",
                signer.sign(&d.request_id, timestamp, &body),
            );
        }
        match request.body(body).send().await {
            Ok(mut response) => {
                let code = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                // Read a little of the body so a keep-alive connection can be reused.
                let mut read = 0;
                while read < RESPONSE_READ_MAX {
                    match response.chunk().await {
                        Ok(Some(chunk)) => read += chunk.len(),
                        _ => break,
                    }
                }
                let class = if (200..300).contains(&code) { "" } else { "http_status" };
                (
                    AttemptResult::Status { code, retry_after },
                    class,
                    format!("HTTP {code}"),
                )
            }
            Err(e) if is_refused(&e) => (
                AttemptResult::Refused,
                "refused_destination",
                "the destination resolves only to addresses that are not allowed (webhook_allow_private)"
                    .into(),
            ),
            Err(e) if e.is_timeout() => (
                AttemptResult::Timeout,
                "timeout",
                "no response within webhook_timeout_ms".into(),
            ),
            Err(e) if e.is_connect() => (AttemptResult::Network, "connect", root_cause(&e)),
            Err(e) => (AttemptResult::Network, "request", root_cause(&e)),
        }
    }
}

/// The innermost cause of an error (an I/O error, a TLS alert): says what failed without the URL
/// that reqwest's own message carries.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let Some(mut current) = e.source() else {
        return "the request failed".into();
    };
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}
