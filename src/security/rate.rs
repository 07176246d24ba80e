//! Rate limits and shedding (CONTRACT §12): token buckets per client and per station, a cap on
//! each client's open subscriptions, and a cap on unary calls in flight that sheds the excess.
//! Every refusal is `RESOURCE_EXHAUSTED` with a `google.rpc.RetryInfo` saying when to try again
//! and a `google.rpc.QuotaFailure` naming the scope; a refused `Authorize` enqueues nothing.
//!
//! Buckets are governor's GCRA: a bucket of `2 × rate` refilled at `rate` a second. A client's
//! own `rate` in `clients_file` overrides `rate_per_client_per_s`; without `clients_file` a
//! client is its peer's IP address. Keyed state is bounded: keys whose bucket is full again
//! (idle two seconds) are swept every second, and a limiter past [`MAX_KEYS`] keys forgets them
//! all (a caller who can name that many stations within a second is stopped by its client
//! bucket instead).

use std::{
    collections::HashMap,
    net::SocketAddr,
    num::NonZeroU32,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::future::{BoxFuture, FutureExt};
use governor::{Quota, RateLimiter, clock::Clock, state::keyed::DefaultKeyedStateStore};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};

use super::auth::Caller;

/// Keys one limiter holds at most before it forgets them all.
pub const MAX_KEYS: usize = 100_000;
/// How often idle keys are swept.
const SWEEP: Duration = Duration::from_secs(1);
/// Checks between two looks at a limiter's size on the call path.
const SIZE_CHECK_EVERY: u64 = 1024;
/// When a caller shed for too many calls in flight may try again.
const SHED_RETRY: Duration = Duration::from_millis(100);

type Keyed = RateLimiter<
    String,
    DefaultKeyedStateStore<String>,
    governor::clock::DefaultClock,
    governor::middleware::NoOpMiddleware<<governor::clock::DefaultClock as Clock>::Instant>,
>;

/// A keyed token bucket of one rate, its memory bounded.
pub struct Limiter {
    quota: Quota,
    buckets: RwLock<Arc<Keyed>>,
    checks: AtomicU64,
    max_keys: usize,
}

impl Limiter {
    /// Buckets of `per_second` refilled a second, holding twice that.
    pub fn new(per_second: NonZeroU32, max_keys: usize) -> Self {
        let burst = per_second.saturating_mul(NonZeroU32::new(2).expect("2"));
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self {
            quota,
            buckets: RwLock::new(Arc::new(RateLimiter::keyed(quota))),
            checks: AtomicU64::new(0),
            max_keys,
        }
    }

    /// Takes one token from `key`'s bucket, or says how long until one is there.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SIZE_CHECK_EVERY == SIZE_CHECK_EVERY - 1 {
            self.sweep();
        }
        let buckets = self.buckets.read().expect("limiter lock").clone();
        buckets
            .check_key(&key.to_owned())
            .map_err(|not_until| not_until.wait_time_from(buckets.clock().now()))
    }

    /// Forgets the keys whose bucket is full again; forgets every key past the cap.
    pub fn sweep(&self) {
        let buckets = self.buckets.read().expect("limiter lock").clone();
        buckets.retain_recent();
        if buckets.len() > self.max_keys {
            *self.buckets.write().expect("limiter lock") = Arc::new(RateLimiter::keyed(self.quota));
        } else {
            buckets.shrink_to_fit();
        }
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.buckets.read().expect("limiter lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which bucket refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Client,
    Station,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::Client => "client",
            Scope::Station => "station",
        }
    }
}

/// `RESOURCE_EXHAUSTED` with when to try again, and the quota that refused.
pub fn exhausted(scope: &str, subject: &str, retry: Duration, why: &str) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(retry));
    details.add_quota_failure_violation(format!("{scope}:{subject}"), why);
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("{why}; retry in {} ms", retry.as_millis().max(1)),
        details,
    )
}

/// The rate limits in force.
pub struct RateLimits {
    client_rate: Option<NonZeroU32>,
    /// One limiter per distinct rate in use: `rate_per_client_per_s`, and each client's own.
    clients: RwLock<HashMap<NonZeroU32, Arc<Limiter>>>,
    stations: Option<Limiter>,
}

impl RateLimits {
    /// `0` turns a limit off.
    pub fn new(per_client: u32, per_station: u32) -> Self {
        Self {
            client_rate: NonZeroU32::new(per_client),
            clients: RwLock::new(HashMap::new()),
            stations: NonZeroU32::new(per_station).map(|r| Limiter::new(r, MAX_KEYS)),
        }
    }

    /// The client limiter of `rate`, made at its first use.
    fn limiter_for(&self, rate: NonZeroU32) -> Arc<Limiter> {
        if let Some(l) = self.clients.read().expect("limits lock").get(&rate) {
            return l.clone();
        }
        self.clients
            .write()
            .expect("limits lock")
            .entry(rate)
            .or_insert_with(|| Arc::new(Limiter::new(rate, MAX_KEYS)))
            .clone()
    }

    /// A call of `caller` (from `peer`), against its client bucket.
    pub fn check_client(&self, caller: &Caller, peer: Option<SocketAddr>) -> Result<(), Status> {
        let own = match caller {
            Caller::Client(c) => c.rate_per_s.and_then(NonZeroU32::new),
            Caller::Open => None,
        };
        // Nothing to count, and nothing allocated, while no limit applies.
        let Some(rate) = own.or(self.client_rate) else {
            return Ok(());
        };
        let key = caller.limit_key(peer);
        self.limiter_for(rate)
            .check(&key)
            .map_err(|retry| refused(Scope::Client, &key, retry))
    }

    /// An `Authorize` at `station` (canonical), against its station bucket.
    pub fn check_station(&self, station: &str) -> Result<(), Status> {
        match &self.stations {
            Some(l) => l
                .check(station)
                .map_err(|retry| refused(Scope::Station, station, retry)),
            None => Ok(()),
        }
    }

    /// Sweeps idle keys every second until `stop`.
    pub async fn sweep(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let limiters: Vec<Arc<Limiter>> = self
                .clients
                .read()
                .expect("limits lock")
                .values()
                .cloned()
                .collect();
            for l in limiters.iter().map(|l| &**l).chain(self.stations.as_ref()) {
                l.sweep();
            }
        }
    }
}

fn refused(scope: Scope, subject: &str, retry: Duration) -> Status {
    metrics::counter!("chargegate_rate_limited_total", "scope" => scope.as_str()).increment(1);
    let why = match scope {
        Scope::Client => "this client's rate limit is reached",
        Scope::Station => "this station's rate limit is reached",
    };
    exhausted(scope.as_str(), subject, retry, why)
}

/// Open subscriptions per client, capped.
pub struct SubscriptionSlots {
    max: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open subscription; dropping it frees the slot.
pub struct SubscriptionSlot {
    key: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl SubscriptionSlots {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A slot for a new subscription of `caller`, or `RESOURCE_EXHAUSTED` at the cap.
    pub fn open(
        &self,
        caller: &Caller,
        peer: Option<SocketAddr>,
    ) -> Result<SubscriptionSlot, Status> {
        let key = caller.limit_key(peer);
        let mut open = self.open.lock().expect("slots lock");
        let n = open.entry(key.clone()).or_default();
        if *n >= self.max {
            metrics::counter!("chargegate_calls_shed_total", "reason" => "subscriptions")
                .increment(1);
            return Err(exhausted(
                "subscriptions",
                &key,
                Duration::from_secs(1),
                &format!(
                    "this client has {} subscriptions open, the most it may",
                    self.max
                ),
            ));
        }
        *n += 1;
        Ok(SubscriptionSlot {
            key,
            open: self.open.clone(),
        })
    }
}

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("slots lock");
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The layer that applies client buckets and sheds unary calls past the cap in flight. Health
/// and reflection are never limited (mesh probes must see an overloaded server as alive).
#[derive(Clone)]
pub struct RateLimitLayer {
    limits: Arc<RateLimits>,
    in_flight: Arc<Semaphore>,
}

impl RateLimitLayer {
    pub fn new(limits: Arc<RateLimits>, max_in_flight: usize) -> Self {
        Self {
            limits,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimited {
            inner,
            limits: self.limits.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimited<S> {
    inner: S,
    limits: Arc<RateLimits>,
    in_flight: Arc<Semaphore>,
}

impl<S, B> Service<http::Request<B>> for RateLimited<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if super::auth::is_open(path) {
            return self.inner.call(request).boxed();
        }
        let refuse = |status: Status| futures::future::ready(Ok(status.into_http())).boxed();
        let caller = Caller::in_extensions(request.extensions());
        let peer = super::peer_addr(request.extensions());
        if let Err(status) = self.limits.check_client(&caller, peer) {
            return refuse(status);
        }
        let permit: Option<OwnedSemaphorePermit> = match crate::audit::layer::is_streaming(path) {
            true => None,
            false => match self.in_flight.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    metrics::counter!("chargegate_calls_shed_total", "reason" => "in_flight")
                        .increment(1);
                    return refuse(exhausted(
                        "server",
                        "calls_in_flight",
                        SHED_RETRY,
                        "the server has as many calls in flight as it takes",
                    ));
                }
            },
        };
        let response = self.inner.call(request);
        async move {
            let response = response.await;
            drop(permit);
            response
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_twice_the_rate_passes_then_the_wait_is_at_most_one_interval() {
        let limiter = Limiter::new(NonZeroU32::new(10).unwrap(), 100);
        for i in 0..20 {
            assert_eq!(limiter.check("gw"), Ok(()), "call {i} of the burst");
        }
        let wait = limiter.check("gw").expect_err("the 21st waits");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert_eq!(
            limiter.check("another"),
            Ok(()),
            "keys do not share a bucket"
        );
    }

    #[tokio::test]
    async fn unary_calls_past_the_cap_are_shed_at_once_and_streams_and_probes_are_not() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let inner = tower::service_fn({
            let gate = gate.clone();
            move |_: http::Request<()>| {
                let gate = gate.clone();
                async move {
                    gate.notified().await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        tonic::body::Body::empty(),
                    ))
                }
            }
        });
        let mut service = RateLimitLayer::new(Arc::new(RateLimits::new(0, 0)), 1).layer(inner);
        let call = |path: &str| http::Request::builder().uri(path).body(()).unwrap();
        let unary = "/chargegate.v1.ChargingAuthorization/GetDecision";
        let first = service.call(call(unary));
        let shed = service
            .call(call(unary))
            .now_or_never()
            .expect("shed at once, not queued")
            .unwrap();
        assert_eq!(shed.headers()["grpc-status"], "8", "RESOURCE_EXHAUSTED");
        let details = Status::from_header_map(shed.headers())
            .expect("a status")
            .get_error_details();
        assert_eq!(
            details.retry_info().and_then(|r| r.retry_delay),
            Some(SHED_RETRY)
        );
        for passing in [
            "/chargegate.v1.ChargingAuthorization/SubscribeDecisions",
            "/grpc.health.v1.Health/Check",
        ] {
            assert!(
                service.call(call(passing)).now_or_never().is_none(),
                "{passing} reaches the service"
            );
        }
        // The first call ends: its permit goes back.
        let first = tokio::spawn(first);
        tokio::task::yield_now().await;
        gate.notify_waiters();
        first.await.unwrap().unwrap();
        assert!(
            service.call(call(unary)).now_or_never().is_none(),
            "room again"
        );
    }

    #[test]
    fn a_million_distinct_keys_stay_under_the_cap() {
        let cap = 10_000;
        let limiter = Limiter::new(NonZeroU32::new(5).unwrap(), cap);
        let mut most = 0;
        for i in 0..1_000_000u32 {
            let _ = limiter.check(&format!("station-{i}"));
            if i % 97 == 0 {
                most = most.max(limiter.len());
            }
        }
        assert!(
            most <= cap + SIZE_CHECK_EVERY as usize,
            "{most} keys held at once"
        );
    }
}
