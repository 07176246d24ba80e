//! A fast local remote authorizer for the `a1` scenario (`chargegate-bench authorizer-server`):
//! answers `{"allowed": "ALLOWED"}` at once, except for a fraction of calls that it answers late.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use axum::{Router, extract::State, routing::post};

struct Tail {
    every: u64,
    delay: std::time::Duration,
    calls: AtomicU64,
    /// True while answers are held.
    held: tokio::sync::watch::Receiver<bool>,
    /// True while every call is answered 503.
    failing: tokio::sync::watch::Receiver<bool>,
}

/// A flag that follows whether `path` exists (looked at every 10 ms); false without a path.
fn file_flag(path: Option<std::path::PathBuf>) -> tokio::sync::watch::Receiver<bool> {
    let (flag, seen) = tokio::sync::watch::channel(false);
    if let Some(path) = path {
        flag.send_replace(path.exists());
        tokio::spawn(async move {
            loop {
                flag.send_if_modified(|on| std::mem::replace(on, path.exists()) != *on);
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        });
    }
    seen
}

/// Serves on an ephemeral port and prints `listen=<addr>`. With `slow_percent` > 0, one call in
/// `100 / slow_percent` waits `slow_ms` before answering. With `hold_while`, every answer waits
/// while that file exists (looked at every 10 ms): calls are accepted and read, and answered
/// when it is removed. With `fail_while`, every call is answered 503 while that file exists (an
/// outage, for v1).
pub fn serve(
    slow_percent: u64,
    slow_ms: u64,
    hold_while: Option<std::path::PathBuf>,
    fail_while: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let held = file_flag(hold_while);
        let failing = file_flag(fail_while);
        let tail = Arc::new(Tail {
            every: 100u64.checked_div(slow_percent).map_or(0, |n| n.max(1)),
            delay: std::time::Duration::from_millis(slow_ms),
            calls: AtomicU64::new(0),
            held,
            failing,
        });
        let app = Router::new()
            .route("/authorize", post(answer))
            .with_state(tail);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listen={}", listener.local_addr()?);
        axum::serve(listener, app).await?;
        Ok(())
    })
}

async fn answer(State(tail): State<Arc<Tail>>) -> (axum::http::StatusCode, &'static str) {
    if *tail.failing.borrow() {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "");
    }
    if *tail.held.borrow() {
        let _ = tail.held.clone().wait_for(|held| !held).await;
    }
    let n = tail.calls.fetch_add(1, Ordering::Relaxed);
    if tail.every > 0 && n % tail.every == 0 {
        tokio::time::sleep(tail.delay).await;
    }
    (axum::http::StatusCode::OK, r#"{"allowed": "ALLOWED"}"#)
}
