//! v1: how fast UNKNOWN decisions are revised after an outage, against the rate chargegate decides
//! through the same remote authorizer (a1's queued path), in one run.
//!
//! The bench's authorizer answers 503 while a file exists: with it there, `n` requests are
//! decided UNKNOWN (the breaker opens after five failures and decides the rest `circuit_open`
//! at once). The file is removed and the clock starts; it stops when a subscription has seen all
//! `n` revisions. The rate limit is lifted (`revise_rate_per_s` at its maximum) to measure the
//! pass itself. Then a1's closed loop runs against the same authorizer, now answering.

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chargegate::proto::{
    DecisionStatus, SubscribeDecisionsRequest, subscribe_decisions_response::Event,
};
use serde_json::json;
use tokio_stream::StreamExt;

use crate::{
    load::{self, Client},
    procs::ServerProcess,
    scenarios::{Bench, round_robin_request, round3},
};

/// How long v1 waits for the decisions of the outage, and then for their revisions.
const PATIENCE: Duration = Duration::from_secs(600);

impl Bench {
    pub async fn v1(&mut self) -> anyhow::Result<()> {
        if self.target.is_some() {
            self.record("v1", json!({"skipped": "starts its own servers"}));
            return Ok(());
        }
        let n: u64 = if self.quick { 2_000 } else { 100_000 };
        let dir = self.fresh_dir("v1");
        let down = dir.join("authorizer-down");
        std::fs::write(&down, "")?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("authorizer-server")
            .arg("--fail-while")
            .arg(&down);
        // The authorizer shares the load generator's core: the server keeps its own.
        let authorizer = ServerProcess::spawn(command, self.server_core.map(|_| 0))?;
        let url = format!("{}/authorize", authorizer.url);
        let remote = ["--authorizer", "http", "--authorizer-url", &url];
        let mut extra = remote.to_vec();
        extra.extend([
            "--authorizer-breaker-cooldown-ms",
            "200",
            "--revise-rate-per-s",
            "100000",
            "--revise-unknown-within-ms",
            "3600000",
        ]);
        let server_dir = self.fresh_dir("v1-server");
        let server = self.chargegate_on(&server_dir, &extra)?;
        let mut sub = Client::new(load::connect(&server.url, 1).await?.remove(0));
        let mut stream = sub
            .subscribe_decisions(SubscribeDecisionsRequest::default())
            .await?
            .into_inner();

        // The outage: n requests, every one decided UNKNOWN.
        let started = Instant::now();
        send(&load::connect(&server.url, 8).await?, n, 200).await?;
        let mut unknown = 0;
        while unknown < n {
            let d = next_decision(&mut stream).await?;
            anyhow::ensure!(
                d.revision == 0 && d.status() == DecisionStatus::Unknown,
                "during the outage every decision is UNKNOWN: {d:?}"
            );
            unknown += 1;
        }
        let outage_s = started.elapsed().as_secs_f64();

        // The authorizer answers again.
        let cpu = server.cpu_time();
        std::fs::remove_file(&down)?;
        let started = Instant::now();
        let mut revised = 0;
        let mut first_after = None;
        while revised < n {
            let d = next_decision(&mut stream).await?;
            anyhow::ensure!(d.revision == 1, "after the outage only revisions: {d:?}");
            first_after.get_or_insert_with(|| started.elapsed());
            revised += 1;
        }
        let pass_s = started.elapsed().as_secs_f64();
        let cpu_us = (server.cpu_time() - cpu).as_secs_f64() * 1e6 / n as f64;
        server.stop();

        // a1's queued path against the same authorizer, now answering.
        let (warmup, measure) = (self.warmup(), self.measure(10));
        let decided = self
            .queued_throughput("v1-a1", &remote, Some(&authorizer), (warmup, measure))
            .await?["decisions_per_s"]
            .as_f64()
            .unwrap_or(0.0);
        authorizer.stop();

        let revisions_per_s = n as f64 / pass_s;
        self.record(
            "v1",
            json!({
                "unknown_decisions": n,
                "outage_decided_in_s": round3(outage_s),
                "first_revision_after_s": round3(first_after.unwrap_or_default().as_secs_f64()),
                "revision_pass_s": round3(pass_s),
                "revisions_per_s": revisions_per_s.round(),
                "chargegate_cpu_us_per_revision": cpu_us.round(),
                "a1_http_decisions_per_s": decided.round(),
                "ratio": round3(revisions_per_s / decided),
            }),
        );
        Ok(())
    }
}

/// Sends exactly `n` `Authorize` calls, `concurrency` at a time, over `channels`.
async fn send(channels: &[load::Conn], n: u64, concurrency: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let make = round_robin_request();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..concurrency {
        let mut client = Client::new(channels[i % channels.len()].clone());
        let (next, make) = (next.clone(), make.clone());
        tasks.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n {
                    return anyhow::Ok(());
                }
                client.authorize(make(k)).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

async fn next_decision(
    stream: &mut tonic::Streaming<chargegate::proto::SubscribeDecisionsResponse>,
) -> anyhow::Result<chargegate::proto::Decision> {
    loop {
        let item = tokio::time::timeout(PATIENCE, stream.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the stream ended"))??;
        if let Some(Event::Decision(d)) = item.event {
            return Ok(d);
        }
    }
}
