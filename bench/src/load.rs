//! Load generation: closed loop (C calls in flight over K connections) and open loop (a fixed
//! rate, latency measured from each call's *intended* send time so queueing is not hidden by
//! coordinated omission). Warm-up calls are sent but not counted.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chargegate::cli::{Bearer, Connection};
use chargegate::proto::{
    AuthorizeRequest, charging_authorization_client::ChargingAuthorizationClient,
};
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tonic::{
    Code,
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig},
};

/// A connection: a channel that may send a bearer token with every call.
pub type Conn = Connection;
pub type Client = ChargingAuthorizationClient<Conn>;

/// Builds the i-th request.
pub type MakeRequest = Arc<dyn Fn(u64) -> AuthorizeRequest + Send + Sync>;

/// `k` separate HTTP/2 connections to `url`.
pub async fn connect(url: &str, k: usize) -> anyhow::Result<Vec<Conn>> {
    connect_as(url, k, &Caller::default()).await
}

/// Who the load generator is: a bearer token, and the CA of a TLS server.
#[derive(Clone, Default)]
pub struct Caller {
    pub token: Option<String>,
    /// PEM; with it the connections use TLS (server name `localhost`).
    pub ca: Option<String>,
}

/// `k` separate HTTP/2 connections to `url` as `caller`.
pub async fn connect_as(url: &str, k: usize, caller: &Caller) -> anyhow::Result<Vec<Conn>> {
    let mut channels = Vec::with_capacity(k);
    for _ in 0..k {
        let mut endpoint = Channel::from_shared(url.to_owned())?.tcp_nodelay(true);
        if let Some(ca) = &caller.ca {
            endpoint = endpoint.tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("localhost"),
            )?;
        }
        let bearer = Bearer::new(caller.token.as_deref())?;
        channels.push(InterceptedService::new(endpoint.connect().await?, bearer));
    }
    Ok(channels)
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds")
}

pub struct Closed {
    pub rps: f64,
    /// Microseconds.
    pub hist: Histogram<u64>,
    pub errors: u64,
}

pub async fn closed_loop(
    channels: &[Conn],
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
    make: MakeRequest,
) -> Closed {
    let start = Instant::now();
    let from = start + warmup;
    let end = from + measure;
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for t in 0..concurrency {
        let mut client = Client::new(channels[t % channels.len()].clone());
        let (make, counter) = (make.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let (mut done, mut errors) = (0u64, 0u64);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let result = client.authorize(make(n)).await;
                let finished = Instant::now();
                if sent >= from && finished <= end {
                    match result {
                        Ok(_) => {
                            done += 1;
                            let _ = hist.record((finished - sent).as_micros().max(1) as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (done, hist, errors)
        }));
    }
    let mut hist = histogram();
    let (mut done, mut errors) = (0, 0);
    for task in tasks {
        let (d, h, e) = task.await.expect("load task");
        done += d;
        errors += e;
        hist.add(h).expect("same bounds");
    }
    Closed {
        rps: done as f64 / measure.as_secs_f64(),
        hist,
        errors,
    }
}

/// Outcomes of an open-loop run (counted over the measurement window).
#[derive(Default)]
pub struct Outcomes {
    pub ok: AtomicU64,
    /// RESOURCE_EXHAUSTED or UNAVAILABLE from the server: load shed, as designed.
    pub rejected: AtomicU64,
    /// Transport failures: broken or refused connections, resets.
    pub broken: AtomicU64,
    pub other: AtomicU64,
    /// Not sent because the client already had `max_in_flight` calls outstanding.
    pub client_dropped: AtomicU64,
    /// Acknowledged only after the measurement window ended: not goodput.
    pub late: AtomicU64,
}

pub struct Open {
    /// Microseconds from intended send to acknowledgement, successful calls in the window.
    pub hist: Histogram<u64>,
    pub outcomes: Arc<Outcomes>,
}

impl Open {
    pub fn ok(&self) -> u64 {
        self.outcomes.ok.load(Ordering::Relaxed)
    }
    pub fn rejected(&self) -> u64 {
        self.outcomes.rejected.load(Ordering::Relaxed)
    }
    pub fn broken(&self) -> u64 {
        self.outcomes.broken.load(Ordering::Relaxed)
    }
}

/// The intended send time of call `i` in an open loop started at `start` with `rate` calls/s.
pub fn intended(start: Instant, rate: f64, i: u64) -> Instant {
    start + Duration::from_secs_f64(i as f64 / rate)
}

/// The pacer's shortest sleep (see `open_loop`).
const PACER_TICK: Duration = Duration::from_micros(100);

/// Sends `rate` calls per second for `warmup + measure`, from `start`.
pub async fn open_loop(
    channels: &[Conn],
    rate: f64,
    start: Instant,
    warmup: Duration,
    measure: Duration,
    max_in_flight: usize,
    make: MakeRequest,
) -> Open {
    let from = start + warmup;
    let end = from + measure;
    let total = ((warmup + measure).as_secs_f64() * rate) as u64;
    let hist = Arc::new(Mutex::new(histogram()));
    let outcomes = Arc::new(Outcomes::default());
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let clients: Vec<Client> = channels.iter().map(|c| Client::new(c.clone())).collect();
    // A pacer thread sleeps precisely (nanosleep, not the runtime's 1 ms timer) and releases each
    // call at its intended time, never before; the runtime never busy-waits, so its I/O is polled
    // promptly. It sleeps at least a tick: at tens of thousands of calls a second, a wake-up per
    // call would take the load generator's core, so the calls due within a tick go out together
    // (at most a tick late, and their latency still counts from their intended time).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let pacer = std::thread::spawn(move || {
        for i in 0..total {
            let due = intended(start, rate, i);
            let now = Instant::now();
            if due > now {
                std::thread::sleep((due - now).max(PACER_TICK));
            }
            if tx.send((i, due)).is_err() {
                break;
            }
        }
    });
    let mut tasks = tokio::task::JoinSet::new();
    while let Some((i, due)) = rx.recv().await {
        let measured = due >= from;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if measured {
                outcomes.client_dropped.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        };
        let mut client = clients[(i as usize) % clients.len()].clone();
        let request = make(i);
        let (hist, outcomes) = (hist.clone(), outcomes.clone());
        tasks.spawn(async move {
            let result = client.authorize(request).await;
            let latency = due.elapsed();
            drop(permit);
            if !measured {
                return;
            }
            match result {
                Ok(_) => {
                    let counter = if Instant::now() <= end {
                        &outcomes.ok
                    } else {
                        &outcomes.late
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    let _ = hist
                        .lock()
                        .unwrap()
                        .record(latency.as_micros().max(1) as u64);
                }
                Err(status) => classify(&status, &outcomes),
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    let _ = pacer.join();
    while tasks.join_next().await.is_some() {}
    let hist = Arc::try_unwrap(hist)
        .unwrap_or_else(|_| panic!("all tasks joined"))
        .into_inner()
        .unwrap();
    Open { hist, outcomes }
}

fn classify(status: &tonic::Status, outcomes: &Outcomes) {
    let message = status.message();
    let transport =
        message.contains("transport") || message.contains("connect") || message.contains("h2");
    let counter = match status.code() {
        Code::Unknown | Code::Internal | Code::Cancelled => &outcomes.broken,
        Code::Unavailable if transport => &outcomes.broken,
        Code::ResourceExhausted | Code::Unavailable => &outcomes.rejected,
        _ => &outcomes.other,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// A closed loop on decisions: `concurrency` requests each in flight from its `Authorize` until
/// its decision arrives on `decisions` (a subscription to every station), for
/// `warmup + measure`. Counts the decisions of requests sent and decided in the window; latency
/// is from the send to the decision. A request whose decision does not come within 30 s, or
/// whose `Authorize` fails, is an error.
pub async fn decided_loop(
    channels: &[Conn],
    mut decisions: tonic::Streaming<chargegate::proto::SubscribeDecisionsResponse>,
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
    make: MakeRequest,
) -> Closed {
    use chargegate::proto::subscribe_decisions_response::Event;
    use std::collections::HashMap;
    use tokio::sync::oneshot;
    use tokio_stream::StreamExt;

    type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;
    let waiting: Waiting = Arc::default();
    let reader = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            while let Some(Ok(item)) = decisions.next().await {
                if let Some(Event::Decision(d)) = item.event
                    && let Some(tx) = waiting.lock().unwrap().remove(&d.request_id)
                {
                    let _ = tx.send(());
                }
            }
        })
    };
    let start = Instant::now();
    let (from, end) = (start + warmup, start + warmup + measure);
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for t in 0..concurrency {
        let mut client = Client::new(channels[t % channels.len()].clone());
        let (make, counter, waiting) = (make.clone(), counter.clone(), waiting.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let (mut done, mut errors) = (0u64, 0u64);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let mut request = make(n);
                request.request_id = format!("decided-loop-{n}");
                let (tx, rx) = oneshot::channel();
                waiting
                    .lock()
                    .unwrap()
                    .insert(request.request_id.clone(), tx);
                let decided = match client.authorize(request.clone()).await {
                    Ok(_) => tokio::time::timeout(Duration::from_secs(30), rx)
                        .await
                        .is_ok_and(|r| r.is_ok()),
                    Err(_) => {
                        waiting.lock().unwrap().remove(&request.request_id);
                        false
                    }
                };
                let finished = Instant::now();
                if sent >= from && finished <= end {
                    match decided {
                        true => {
                            done += 1;
                            let _ = hist.record((finished - sent).as_micros().max(1) as u64);
                        }
                        false => errors += 1,
                    }
                }
            }
            (done, hist, errors)
        }));
    }
    let mut hist = histogram();
    let (mut done, mut errors) = (0, 0);
    for task in tasks {
        let (d, h, e) = task.await.expect("load task");
        done += d;
        errors += e;
        hist.add(h).expect("same bounds");
    }
    reader.abort();
    Closed {
        rps: done as f64 / measure.as_secs_f64(),
        hist,
        errors,
    }
}
