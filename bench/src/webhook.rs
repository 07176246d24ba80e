//! The webhook scenario `w1`: a local receiver in the bench process, and the bare HTTP client it
//! is compared with (`chargegate-bench post-client`, a process on the server's core that posts
//! the same bodies with the same client settings chargegate uses).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use chargegate::{
    decision::{Micros, Reason, Status},
    token::DriverToken,
    webhook::{
        DueDelivery,
        deliver::{self, Settings},
        guard::Guard,
        policy::RetryPolicy,
    },
};
use hdrhistogram::Histogram;

/// What the receiver saw.
pub struct Arrivals {
    pub count: AtomicU64,
    /// First and last arrival.
    pub window: Mutex<Option<(Instant, Instant)>>,
    /// Decision (the body's `decided_at`) → arrival, in µs, when `measure_latency` is on.
    pub latency: Mutex<Histogram<u64>>,
    pub measure_latency: std::sync::atomic::AtomicBool,
}

impl Arrivals {
    /// Arrivals per second between the first and the last.
    pub fn rate(&self) -> f64 {
        let n = self.count.load(Ordering::Relaxed);
        match *self.window.lock().unwrap() {
            Some((first, last)) if n > 1 => (n - 1) as f64 / (last - first).as_secs_f64(),
            _ => 0.0,
        }
    }

    pub fn reset(&self) {
        self.count.store(0, Ordering::Relaxed);
        *self.window.lock().unwrap() = None;
        self.latency.lock().unwrap().reset();
    }
}

/// Starts the receiver on 127.0.0.1 (answers 204 at once).
pub async fn receiver() -> anyhow::Result<(SocketAddr, Arc<Arrivals>)> {
    let arrivals = Arc::new(Arrivals {
        count: AtomicU64::new(0),
        window: Mutex::new(None),
        latency: Mutex::new(crate::load::histogram()),
        measure_latency: false.into(),
    });
    let app = Router::new()
        .route("/hook", post(arrive))
        .with_state(arrivals.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, arrivals))
}

async fn arrive(State(arrivals): State<Arc<Arrivals>>, body: Bytes) -> StatusCode {
    let now = Instant::now();
    if arrivals.measure_latency.load(Ordering::Relaxed)
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
        && let Some(decided) = v["decided_at"].as_str().and_then(|s| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
        })
    {
        let decided_us = (decided.unix_timestamp_nanos() / 1000) as i64;
        let us = (Micros::now().0 - decided_us).max(1) as u64;
        let _ = arrivals.latency.lock().unwrap().record(us);
    }
    arrivals.count.fetch_add(1, Ordering::Relaxed);
    let mut window = arrivals.window.lock().unwrap();
    *window = Some(match *window {
        Some((first, _)) => (first, now),
        None => (now, now),
    });
    StatusCode::NO_CONTENT
}

/// The client settings chargegate delivers with (defaults, private destinations allowed).
pub fn settings(concurrency: usize, host_concurrency: usize) -> Settings {
    Settings {
        policy: RetryPolicy {
            base: Duration::from_secs(1),
            max: Duration::from_secs(600),
            max_attempts: 10,
            max_age: Duration::from_secs(3600),
        },
        guard: Guard {
            allow_private: true,
        },
        timeout: Duration::from_secs(10),
        signer: None,
        concurrency,
        host_concurrency,
    }
}

/// `chargegate-bench post-client`: posts `count` delivery bodies to `url`, `concurrency` at a
/// time, with chargegate's own HTTP client settings and headers, then exits.
pub fn post_client(url: String, count: u64, concurrency: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = deliver::client(&settings(concurrency, concurrency))?;
        let cpu_before = crate::procs::cpu_time(std::process::id());
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (client, next, url) = (client.clone(), next.clone(), url.clone());
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let d = body_of(i);
                    let timestamp = Micros::now().0 / 1_000_000;
                    let response = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("webhook-id", &d.request_id)
                        .header("webhook-timestamp", timestamp.to_string())
                        .body(d.body())
                        .send()
                        .await?;
                    let _ = response.bytes().await;
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        // What posting cost this process, for the bench to compare with chargegate's.
        println!(
            "cpu_ms={}",
            (crate::procs::cpu_time(std::process::id()) - cpu_before).as_millis()
        );
        Ok(())
    })
}

/// A delivery like the ones chargegate sends in `w1`.
pub fn body_of(i: u64) -> DueDelivery {
    DueDelivery {
        request_id: format!("bench-{i}"),
        station_id: crate::scenarios::station(i as usize % 100),
        callback_url: String::new(),
        host: String::new(),
        token: DriverToken::new(crate::scenarios::TOKEN),
        status: Status::Allowed,
        reason: Reason::Granted,
        decided_at: Micros::now(),
        attempts: 0,
        next_attempt_at: Micros::now(),
        age_from: Micros::now(),
        seq: i as i64,
        revision: 0,
    }
}
