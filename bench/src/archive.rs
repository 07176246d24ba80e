//! x1: what `chargegate audit export` achieves against zstd compressing the same bytes alone.
//!
//! The store is filled through chargegate's own write path (the intake's decided-at-once commit,
//! chained), then exported to a fresh directory a few times; each time, the chunks it wrote are
//! decompressed and the same bytes compressed again at the same level with nothing else: the
//! floor the export cannot beat. Both run on the bench's core, one after the other.

use std::{process::Command, sync::Arc, time::Instant};

use chargegate::{
    backends::Backends,
    config::{Config, Secret},
    decision::{DecidedBy, Micros, Reason, Verdict},
    fanout::Hub,
    intake::NewRequest,
    token::{DriverToken, Fingerprinter},
};
use serde_json::json;

use crate::{
    procs,
    scenarios::{Bench, median, round3},
};

const STATIONS: usize = 500;
const KEY: &str = "bench-token-hash-key";

impl Bench {
    pub async fn x1(&mut self) -> anyhow::Result<()> {
        if self.target.is_some() {
            self.record("x1", json!({"skipped": "reads a store of its own"}));
            return Ok(());
        }
        let n = if self.quick { 20_000 } else { 250_000 };
        let rounds = if self.quick { 1 } else { 3 };
        let dir = self.fresh_dir("x1-store");
        fill(&dir, n).await?;

        let (mut export_rates, mut zstd_rates, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let archive = self.fresh_dir(&format!("x1-archive-{round}"));
            let mut export = Command::new(&self.server_bin);
            export
                .args(["audit", "export", "--until", "0s", "--to"])
                .arg(format!("file://{}", archive.display()))
                .arg("--data-dir")
                .arg(&dir);
            let started = Instant::now();
            procs::run_pinned(export, Some(0))?;
            let export_s = started.elapsed().as_secs_f64();

            let mut plain = Vec::new();
            let mut compressed_bytes = 0;
            for entry in std::fs::read_dir(&archive)? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "zst") {
                    let bytes = std::fs::read(&path)?;
                    compressed_bytes += bytes.len();
                    plain.push(zstd::stream::decode_all(&bytes[..])?);
                }
            }
            let plain_bytes: usize = plain.iter().map(Vec::len).sum();
            let started = Instant::now();
            for chunk in &plain {
                std::hint::black_box(zstd::stream::encode_all(
                    &chunk[..],
                    chargegate::archive::ZSTD_LEVEL,
                )?);
            }
            let zstd_s = started.elapsed().as_secs_f64();

            let (export_rate, zstd_rate) = (n as f64 / export_s, n as f64 / zstd_s);
            export_rates.push(export_rate);
            zstd_rates.push(zstd_rate);
            rows.push(json!({
                "round": round,
                "export_decisions_per_s": export_rate.round(),
                "zstd_alone_decisions_per_s": zstd_rate.round(),
                "ratio": round3(export_rate / zstd_rate),
                "json_bytes": plain_bytes,
                "compressed_bytes": compressed_bytes,
                "compression": round3(plain_bytes as f64 / compressed_bytes as f64),
            }));
        }
        let (export_rate, zstd_rate) = (median(&export_rates), median(&zstd_rates));
        let ratios: Vec<f64> = export_rates
            .iter()
            .zip(&zstd_rates)
            .map(|(e, z)| e / z)
            .collect();
        self.record(
            "x1",
            json!({
                "decisions": n,
                "rounds": rows,
                "export_decisions_per_s": export_rate.round(),
                "zstd_alone_decisions_per_s": zstd_rate.round(),
                "median_ratio": round3(median(&ratios)),
            }),
        );
        Ok(())
    }
}

/// Records `n` decisions in a new embedded store in `dir`.
async fn fill(dir: &std::path::Path, n: usize) -> anyhow::Result<()> {
    let mut config = Config::for_data_dir(dir);
    config.token_hash_key = Some(Secret::new(KEY));
    let fingerprinter = Fingerprinter::new(KEY.as_bytes())?;
    // The key the export's verify would need, where the CLI looks for it.
    std::fs::write(dir.join("token_hash.key"), KEY)?;
    let backends = Backends::open(
        &config,
        Arc::new(Hub::new()),
        &fingerprinter,
        std::time::Duration::from_secs(30),
    )
    .await?;
    let queue = backends.queue.clone();
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < n || !tasks.is_empty() {
        while next < n && tasks.len() < 512 {
            let queue = queue.clone();
            let token = DriverToken::new(format!("BENCH-token-{:012}", next % 50_000));
            let fingerprint = fingerprinter.fingerprint(&token);
            let request = NewRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                station_id: uuid::Uuid::from_u128((next % STATIONS) as u128).to_string(),
                token,
                fingerprint,
                callback_url: None,
                accepted_at: Micros::now(),
            };
            let reason = if next % 3 == 0 {
                Reason::NoGrant
            } else {
                Reason::Granted
            };
            tasks.spawn(async move {
                queue
                    .enqueue_decided(request, Verdict::new(reason, DecidedBy::Acl))
                    .await
            });
            next += 1;
        }
        if let Some(done) = tasks.join_next().await {
            done??;
        }
    }
    backends.close().await;
    Ok(())
}
