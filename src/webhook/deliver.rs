//! The delivery engine: takes due deliveries from the outbox and POSTs them, each attempt in its
//! own task, never blocking the decision pipeline.
//!
//! Limits are permits, not polling: at most `webhook_concurrency` attempts in flight, and at most
//! `webhook_host_concurrency` per destination (`host:port`), so a receiver that hangs holds its own
//! permits and nobody else's — its deliveries are not even read while its permits are taken. A
//! slot is held while the receiver answers, not while the attempt is being recorded. The
//! dispatcher wakes when the store commits new deliveries, when an attempt finishes, and when the
//! earliest retry falls due. A retry is a time in the outbox, never a sleeping task.

use std::{
    collections::{HashMap, HashSet, VecDeque},
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
    Attempt, DueDelivery, Next, Outcome, WebhookOutbox,
    guard::{Guard, GuardedResolver, is_refused},
    policy::{AttemptResult, RetryPolicy, parse_retry_after},
    signer::Signer,
};
use crate::decision::Micros;

/// Longest sleep between looks at the outbox when nothing wakes the dispatcher.
const IDLE_LOOK: Duration = Duration::from_secs(5);
/// Pause after the outbox could not be read.
const READ_BACKOFF: Duration = Duration::from_secs(1);
/// How often tokens of dead deliveries past their redrive window are erased (more often when
/// the window itself is shorter).
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
    meters: Meters,
    urls: UrlCache,
}

/// Callback URLs parsed before: most deliveries go to a few URLs, and parsing one (with its
/// IDNA host processing) costs more than the rest of preparing a request.
#[derive(Default)]
struct UrlCache(std::sync::Mutex<HashMap<String, Option<url::Url>>>);

/// URLs kept parsed; the cache starts over when it is full.
const URL_CACHE_MAX: usize = 4096;

impl UrlCache {
    fn parse(&self, raw: &str) -> Option<url::Url> {
        let mut cache = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(parsed) = cache.get(raw) {
            return parsed.clone();
        }
        if cache.len() >= URL_CACHE_MAX {
            cache.clear();
        }
        let parsed = url::Url::parse(raw).ok();
        cache.insert(raw.to_owned(), parsed.clone());
        parsed
    }
}

/// Metric handles, registered once rather than looked up on every attempt.
struct Meters {
    delivered: metrics::Counter,
    retry: metrics::Counter,
    dead: metrics::Counter,
    duration: metrics::Histogram,
}

impl Meters {
    fn new() -> Self {
        let outcome = |o: &'static str| metrics::counter!("chargegate_webhook_deliveries_total", "outcome" => o);
        Self {
            delivered: outcome("delivered"),
            retry: outcome("retry"),
            dead: outcome("dead"),
            duration: metrics::histogram!("chargegate_webhook_delivery_duration_seconds"),
        }
    }
}

/// What an attempt task reports to the dispatcher.
enum Progress {
    /// The HTTP exchange is over: the host's (and the global) slot is free.
    Sent { host: String },
    /// The attempt is recorded: the delivery may be read from the outbox again (`retry` when
    /// it is pending again, due later).
    Recorded { seq: i64, retry: bool },
    /// Recording failed: those deliveries are pending again where they were, behind the cursor.
    Rewind,
}

/// Time beyond the attempts for recording them, in a claim's lease.
const RECORD_MARGIN: Duration = Duration::from_secs(30);
/// Pending deliveries read at once from the outbox.
const READ_BATCH: usize = 128;
/// Deliveries held per host (ready in memory or being sent), as a multiple of its concurrency.
/// A host is read again only once it is down to half of this, so the outbox is read once per
/// many deliveries rather than once per freed slot.
const HOST_BUFFER_FACTOR: usize = 16;

/// The dispatcher's view of the deliveries it took from the outbox.
#[derive(Default)]
struct Dispatch {
    /// Read and due, waiting for a slot of their host.
    ready: HashMap<String, VecDeque<DueDelivery>>,
    /// Being sent, per host.
    sending: HashMap<String, usize>,
    total_sending: usize,
    /// Taken and not yet recorded (ready, sending or being recorded): passed over when a read
    /// returns them again, so no delivery is taken twice.
    taken: HashSet<i64>,
    /// Something may be due that was not read yet.
    stale: bool,
    /// Where the next read starts: every pending delivery before it was taken, or belongs to a
    /// host in `passed_over`. New deliveries, retries and redrives are due after it, so reads
    /// do not scan what is in flight again and again.
    cursor: Option<(Micros, i64)>,
    /// Hosts whose deliveries a read left out (they were full): when one has room again, reads
    /// start from the beginning.
    passed_over: HashSet<String>,
    last_rewind: Option<Instant>,
}

impl Dispatch {
    fn load(&self, host: &str) -> usize {
        self.ready.get(host).map_or(0, VecDeque::len) + self.sending.get(host).copied().unwrap_or(0)
    }

    fn on(&mut self, progress: Progress, host_buffer: usize) {
        match progress {
            Progress::Sent { host } => {
                self.total_sending -= 1;
                if let Some(n) = self.sending.get_mut(&host) {
                    *n -= 1;
                    if *n == 0 {
                        self.sending.remove(&host);
                    }
                }
                // The host has room again: its next deliveries may be read.
                if self.load(&host) == host_buffer / 2 - 1 || self.load(&host) == 0 {
                    self.stale = true;
                    if self.passed_over.contains(&host) {
                        self.rewind();
                    }
                }
            }
            Progress::Recorded { seq, retry } => {
                self.taken.remove(&seq);
                // The next read learns when it is due.
                self.stale |= retry;
            }
            Progress::Rewind => self.rewind(),
        }
    }

    fn rewind(&mut self) {
        self.cursor = None;
        self.passed_over.clear();
        self.last_rewind = Some(Instant::now());
        self.stale = true;
    }

    /// Hosts that should not be read now: they hold at least half their buffer.
    fn full_hosts(&self, host_buffer: usize) -> Vec<String> {
        let mut hosts: HashSet<&String> = self.ready.keys().collect();
        hosts.extend(self.sending.keys());
        hosts
            .into_iter()
            .filter(|h| self.load(h) >= host_buffer / 2)
            .cloned()
            .collect()
    }
}

impl Deliverer {
    /// How long a claimed delivery stays this engine's: it may wait behind a host's whole buffer
    /// (each in flight for at most the attempt deadline) and then for its record to commit.
    fn lease(&self) -> Duration {
        self.settings.timeout * HOST_BUFFER_FACTOR as u32 + RECORD_MARGIN
    }

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
            meters: Meters::new(),
            urls: UrlCache::default(),
        }
    }

    /// Delivers until `stop` is cancelled, then waits for the attempts in flight. Dropping the
    /// returned future aborts them; their deliveries stay pending and are sent after a restart.
    pub async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<Progress>();
        let mut tasks = JoinSet::new();
        let mut erase = tokio::time::interval(
            ERASE_INTERVAL
                .min(this.settings.policy.max_age)
                .max(Duration::from_millis(10)),
        );
        let (concurrency, per_host) = (this.settings.concurrency, this.settings.host_concurrency);
        let host_buffer = (per_host * HOST_BUFFER_FACTOR).max(2);
        // Deliveries taken and not yet recorded, at most: a slow store slows deliveries down
        // instead of piling up tasks.
        let max_taken = concurrency
            .saturating_mul(HOST_BUFFER_FACTOR)
            .max(READ_BATCH);
        let mut d = Dispatch {
            stale: true,
            ..Default::default()
        };
        let mut next_due: Option<tokio::time::Instant> = None;
        // Bounded: attempts wait for room when the store falls behind.
        let (record_tx, record_rx) = mpsc::channel::<Outcome>(max_taken);
        let recorder = tokio::spawn(record(this.outbox.clone(), record_rx, progress_tx.clone()));
        loop {
            while let Ok(progress) = progress_rx.try_recv() {
                d.on(progress, host_buffer);
            }
            while tasks.try_join_next().is_some() {}

            if d.stale && d.taken.len() < max_taken {
                // A safety net for clock steps: now and then, read from the beginning.
                if d.last_rewind.is_none_or(|at| at.elapsed() > IDLE_LOOK) {
                    d.rewind();
                }
                d.stale = false;
                let full = d.full_hosts(host_buffer);
                d.passed_over.extend(full.iter().cloned());
                match this
                    .outbox
                    .claim_due(full, d.cursor, READ_BATCH, this.lease())
                    .await
                {
                    Ok(rows) => {
                        let now = Micros::now();
                        let read = rows.len();
                        let mut skipped = false;
                        // The hosts of the deliveries taken.
                        let mut hosts: Vec<String> = Vec::new();
                        // Some were taken already: what follows them was not seen yet.
                        let mut passed = false;
                        next_due = None;
                        for row in rows {
                            if row.next_attempt_at > now {
                                let wait =
                                    Duration::from_micros((row.next_attempt_at.0 - now.0) as u64);
                                next_due = Some(tokio::time::Instant::now() + wait);
                                break;
                            }
                            if d.taken.contains(&row.seq) {
                                // In flight or being recorded (a read after a rewind, or behind
                                // a host that was full): passed over like a taken row.
                                passed = true;
                                if !skipped {
                                    d.cursor = Some((row.next_attempt_at, row.seq));
                                }
                                continue;
                            }
                            if d.load(&row.host) >= host_buffer {
                                // Read again once the host has room.
                                skipped = true;
                                continue;
                            }
                            if !skipped {
                                d.cursor = Some((row.next_attempt_at, row.seq));
                            }
                            if !hosts.contains(&row.host) {
                                hosts.push(row.host.clone());
                            }
                            d.taken.insert(row.seq);
                            d.ready.entry(row.host.clone()).or_default().push_back(row);
                        }
                        // A full batch of due rows, all taken: there may be more behind it, worth
                        // reading now if rows taken before were passed over or one of its hosts
                        // is still below half its buffer. (A host that filled up is read again
                        // once it is down to half.)
                        if read == READ_BATCH && next_due.is_none() && !skipped {
                            d.stale =
                                passed || hosts.iter().any(|host| d.load(host) < host_buffer / 2);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the webhook outbox failed");
                        next_due = Some(tokio::time::Instant::now() + READ_BACKOFF);
                    }
                }
            }

            // Hand ready deliveries to free slots.
            d.ready.retain(|host, queue| {
                let sending = d.sending.entry(host.clone()).or_default();
                while *sending < per_host && d.total_sending < concurrency {
                    let Some(delivery) = queue.pop_front() else {
                        break;
                    };
                    *sending += 1;
                    d.total_sending += 1;
                    tasks.spawn(this.clone().attempt(
                        delivery,
                        progress_tx.clone(),
                        record_tx.clone(),
                    ));
                }
                if *sending == 0 {
                    d.sending.remove(host);
                }
                !queue.is_empty()
            });

            if d.stale && d.taken.len() < max_taken {
                continue;
            }
            let wait = next_due.unwrap_or_else(|| tokio::time::Instant::now() + IDLE_LOOK);
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(progress) = progress_rx.recv() => d.on(progress, host_buffer),
                _ = this.wake.notified() => d.stale = true,
                _ = tokio::time::sleep_until(wait) => d.rewind(),
                _ = erase.tick() => this.erase_expired_tokens().await,
            }
        }
        while tasks.join_next().await.is_some() {}
        drop(record_tx);
        let _ = recorder.await;
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

    /// One attempt: send, classify, hand what follows to the recorder.
    #[tracing::instrument(level = "debug", skip_all, fields(request_id = %d.request_id, host = %d.host))]
    async fn attempt(
        self: Arc<Self>,
        d: DueDelivery,
        progress: mpsc::UnboundedSender<Progress>,
        recorder: mpsc::Sender<Outcome>,
    ) {
        let at = Micros::now();
        let started = Instant::now();
        let (result, error_class, detail) = self.send(&d).await;
        let latency = started.elapsed();
        // The receiver is done with us: its slot goes to the next delivery while this one is
        // recorded (a durable write that would otherwise hold the slot for a commit).
        let _ = progress.send(Progress::Sent {
            host: d.host.clone(),
        });
        let number = d.attempts + 1;
        let next =
            self.settings
                .policy
                .next(result, number, Micros::now(), d.age_from, rand::random());
        let http_status = match result {
            AttemptResult::Status { code, .. } => Some(code),
            _ => None,
        };
        let (outcome, counter) = match next {
            Next::Delivered => ("delivered", &self.meters.delivered),
            Next::RetryAt(_) => ("retry", &self.meters.retry),
            Next::Dead(_) => ("dead", &self.meters.dead),
        };
        counter.increment(1);
        self.meters.duration.record(latency.as_secs_f64());
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
        let _ = recorder
            .send(Outcome {
                seq: d.seq,
                attempt: Attempt {
                    at,
                    outcome: outcome.to_owned(),
                    http_status,
                    latency_ms: latency.as_millis().min(u128::from(u32::MAX)) as u32,
                    error_class: error_class.to_owned(),
                },
                next,
                last_error,
            })
            .await;
    }

    /// Sends one attempt. Returns what happened, its error class (empty on a response) and a
    /// description for `last_error` that never holds the URL or the token.
    async fn send(&self, d: &DueDelivery) -> (AttemptResult, &'static str, String) {
        let Some(url) = self.urls.parse(&d.callback_url) else {
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

/// Most outcomes recorded in one write.
const RECORD_BATCH: usize = 512;
/// How long the recorder gathers outcomes before writing a batch that is not full.
const RECORD_GATHER: Duration = Duration::from_millis(5);

/// Records attempt outcomes in batches, one write each, until every sender is dropped. A batch
/// that cannot be written leaves its deliveries pending; they are sent again (at-least-once)
/// after a pause, so a failing store is not hammered.
async fn record(
    outbox: Arc<dyn WebhookOutbox>,
    mut outcomes: mpsc::Receiver<Outcome>,
    progress: mpsc::UnboundedSender<Progress>,
) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while crate::store::gather_batch(&mut outcomes, &mut batch, RECORD_BATCH, RECORD_GATHER).await {
        let ids: Vec<(i64, bool)> = batch
            .iter()
            .map(|o| (o.seq, matches!(o.next, Next::RetryAt(_))))
            .collect();
        if let Err(e) = outbox.record(std::mem::take(&mut batch)).await {
            tracing::warn!(error = %e, attempts = ids.len(), "recording webhook attempts failed; those deliveries stay pending");
            tokio::time::sleep(READ_BACKOFF).await;
            let _ = progress.send(Progress::Rewind);
        }
        for (seq, retry) in ids {
            let _ = progress.send(Progress::Recorded { seq, retry });
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
