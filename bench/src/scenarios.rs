//! The scenarios g1–g8 of the benchmark. Each measures chargegate and, where there is one, its
//! bare-metal limit in the same run with the same client, and reports figures and ratios.

use std::{
    collections::HashMap,
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chargegate::proto::{
    AuthorizeRequest, GetDecisionRequest, SubscribeDecisionsRequest, SubscribeDecisionsResponse,
    subscribe_decisions_response::Event,
};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use crate::{
    load::{self, Client, MakeRequest, ms},
    procs::{self, ServerProcess},
    webhook,
};

pub const TOKEN: &str = "BENCH-TOKEN-0001-allowed";
pub const TOKEN_KEY: &str = "bench-token-hash-key";
const STATIONS: usize = 100;
/// Rounds of g3 in a full run, echo, the floor and chargegate taking turns.
const G3_ROUNDS: usize = 3;
/// The calls g8 keeps in the server at once: its 8 connections of as many streams each as the
/// server admits. g8c runs g1's closed loop at this concurrency, to show what it costs on its own.
pub const G8_IN_FLIGHT: usize = 8 * chargegate::server::STREAMS_PER_CONNECTION as usize;
/// g8's calls outstanding at the client: twice what the server admits at once ([`G8_IN_FLIGHT`]),
/// so the server always has the next call waiting. With 50,000 the load generator
/// spent its core on calls parked in its own HTTP/2 queues and fed the server only half its knee.
pub(crate) const OVERLOAD_IN_FLIGHT: usize = 2 * G8_IN_FLIGHT;

pub fn station(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

pub(crate) fn round_robin_request() -> MakeRequest {
    Arc::new(|n| AuthorizeRequest {
        station_id: station(n as usize % STATIONS),
        driver_token: TOKEN.into(),
        ..Default::default()
    })
}

/// Latency distributions kept for the plot.
#[derive(Default)]
pub struct Distributions {
    pub series: Vec<(String, Histogram<u64>)>,
}

pub struct Bench {
    pub quick: bool,
    pub server_bin: PathBuf,
    pub target: Option<String>,
    pub work: tempfile::TempDir,
    pub server_core: Option<usize>,
    /// Extra arguments for every chargegate the bench starts (`--server-arg`).
    pub server_args: Vec<String>,
    pub results: serde_json::Map<String, Value>,
    pub plots: Distributions,
    echo_rps: Option<f64>,
    knee_rps: Option<f64>,
    next_dir: u32,
    /// The PostgreSQL server p1 and p2 create their databases on.
    postgres_url: String,
    redis_url: String,
}

impl Bench {
    pub fn new(
        quick: bool,
        server_bin: PathBuf,
        target: Option<String>,
        server_core: Option<usize>,
        server_args: Vec<String>,
        postgres_url: String,
        redis_url: String,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            quick,
            server_bin,
            target,
            work: tempfile::Builder::new()
                .prefix("chargegate-bench")
                .tempdir_in(std::env::temp_dir())?,
            server_core,
            server_args,
            results: Default::default(),
            plots: Default::default(),
            echo_rps: None,
            knee_rps: None,
            next_dir: 0,
            postgres_url,
            redis_url,
        })
    }

    pub(crate) fn warmup(&self) -> Duration {
        if self.quick {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(2)
        }
    }

    pub(crate) fn measure(&self, full: u64) -> Duration {
        if self.quick {
            Duration::from_secs(full.min(2))
        } else {
            Duration::from_secs(full)
        }
    }

    pub(crate) fn fresh_dir(&mut self, name: &str) -> PathBuf {
        self.next_dir += 1;
        let dir = self.work.path().join(format!("{name}-{}", self.next_dir));
        std::fs::create_dir_all(&dir).expect("bench dir");
        dir
    }

    /// A fresh chargegate on its own core, or the `--target` deployment (then `None`).
    fn chargegate(
        &mut self,
        name: &str,
        extra: &[&str],
    ) -> anyhow::Result<(String, Option<ServerProcess>)> {
        if let Some(url) = &self.target {
            return Ok((url.clone(), None));
        }
        let dir = self.fresh_dir(name);
        self.chargegate_on(&dir, extra)
            .map(|p| (p.url.clone(), Some(p)))
    }

    pub(crate) fn chargegate_on(
        &self,
        dir: &std::path::Path,
        extra: &[&str],
    ) -> anyhow::Result<ServerProcess> {
        let acl = dir.join("acl.csv");
        std::fs::write(&acl, format!("station_id,driver_token\n*,{TOKEN}\n"))?;
        let mut command = Command::new(&self.server_bin);
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "off",
                "--token-hash-key",
                TOKEN_KEY,
            ])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--acl-file")
            .arg(&acl)
            .args(&self.server_args)
            .args(extra);
        ServerProcess::spawn(command, self.server_core)
    }

    fn echo(&self) -> anyhow::Result<ServerProcess> {
        let mut command = Command::new(std::env::current_exe()?);
        command.arg("echo-server");
        ServerProcess::spawn(command, self.server_core)
    }

    /// The echo server that commits each call to SQLite before answering (see `echo`).
    fn durable_echo(&mut self) -> anyhow::Result<ServerProcess> {
        let dir = self.fresh_dir("durable-echo");
        let mut command = Command::new(std::env::current_exe()?);
        command.arg("echo-server").arg("--durable").arg(dir);
        ServerProcess::spawn(command, self.server_core)
    }

    pub(crate) fn record(&mut self, key: &str, value: Value) {
        println!("{key}: {value}");
        self.results.insert(key.to_owned(), value);
    }

    /// Runs the same `load` against echo, the durable-ack floor and chargegate (started as `key`),
    /// one after the other, each server started for it and stopped after; results in that order.
    async fn against_references<T, F, Fut>(&mut self, key: &str, load: F) -> anyhow::Result<[T; 3]>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let echo = self.echo()?;
        let e = load(echo.url.clone()).await?;
        echo.stop();
        let floor = self.durable_echo()?;
        let f = load(floor.url.clone()).await?;
        floor.stop();
        let (url, server) = self.chargegate(key, &[])?;
        let a = load(url).await?;
        if let Some(s) = server {
            s.stop();
        }
        Ok([e, f, a])
    }

    /// g1 / g1b / g8c: closed loop at concurrency `c`, echo against chargegate; between them, the
    /// durable-ack floor (echo plus one SQLite row per call and group commit) for reference.
    pub async fn g1(&mut self, key: &str, c: usize) -> anyhow::Result<()> {
        let k = 8.min(c);
        let (warmup, measure) = (self.warmup(), self.measure(10));
        let [e, f, a] = self
            .against_references(key, |url| async move {
                let channels = load::connect(&url, k).await?;
                Ok(load::closed_loop(&channels, c, warmup, measure, round_robin_request()).await)
            })
            .await?;
        if c == 200 {
            self.echo_rps = Some(e.rps);
            self.knee_rps = Some(a.rps);
        }
        self.record(
            key,
            json!({
                "concurrency": c, "connections": k,
                "echo_rps": e.rps.round(), "authorize_rps": a.rps.round(), "ratio": round3(a.rps / e.rps),
                "echo_p50_ms": ms(e.hist.value_at_quantile(0.5)), "authorize_p50_ms": ms(a.hist.value_at_quantile(0.5)),
                "authorize_p99_ms": ms(a.hist.value_at_quantile(0.99)),
                "durable_echo_rps": f.rps.round(), "durable_echo_ratio": round3(f.rps / e.rps),
                "ratio_to_durable_echo": round3(a.rps / f.rps),
                "errors": e.errors + f.errors + a.errors,
            }),
        );
        Ok(())
    }

    /// True when the PostgreSQL server of p1 and p2 answers.
    pub async fn postgres_answers(&self) -> bool {
        postgres_admin(&self.postgres_url).await.is_ok()
    }

    pub async fn redis_answers(&self) -> bool {
        let Ok(client) = redis::Client::open(self.redis_url.as_str()) else {
            return false;
        };
        match client.get_multiplexed_async_connection().await {
            Ok(mut c) => redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok(),
            Err(_) => false,
        }
    }

    /// A fresh database on the PostgreSQL server; dropped by [`Bench::drop_database`].
    async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let admin = postgres_admin(&self.postgres_url).await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let mut url = url::Url::parse(&self.postgres_url)?;
        url.set_path(&format!("/{name}"));
        Ok(url.to_string())
    }

    async fn drop_database(&self, name: &str) -> anyhow::Result<()> {
        let admin = postgres_admin(&self.postgres_url).await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        Ok(())
    }

    /// p1: closed loop at C=200 on PostgreSQL, one instance, beside echo, the PostgreSQL
    /// durable-ack floor (echo plus one row per call committed in groups through the same driver)
    /// and the same instance on its embedded store.
    pub async fn p1(&mut self) -> anyhow::Result<()> {
        let (c, k) = (200, 8);
        let (warmup, measure) = (self.warmup(), self.measure(10));
        let run = |url: String| async move {
            let channels = load::connect(&url, k).await?;
            anyhow::Ok(
                load::closed_loop(&channels, c, warmup, measure, round_robin_request()).await,
            )
        };
        let echo = self.echo()?;
        let e = run(echo.url.clone()).await?;
        echo.stop();
        let floor_url = self.create_database("chargegate_bench_floor").await?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("echo-server")
            .arg("--durable-postgres")
            .arg(&floor_url);
        let floor = ServerProcess::spawn(command, self.server_core)?;
        let f = run(floor.url.clone()).await?;
        floor.stop();
        self.drop_database("chargegate_bench_floor").await?;
        // The same chargegate on its embedded store: what the instance itself costs, whatever
        // the backend (a PostgreSQL backend cannot be faster than this).
        let dir = self.fresh_dir("p1-sqlite");
        let server = self.chargegate_on(&dir, &[])?;
        let embedded = run(server.url.clone()).await?;
        server.stop();
        let store = self.create_database("chargegate_bench_p1").await?;
        let dir = self.fresh_dir("p1");
        let server = self.chargegate_on(&dir, &["--store-url", &store])?;
        let a = run(server.url.clone()).await?;
        server.stop();
        self.drop_database("chargegate_bench_p1").await?;
        self.record(
            "p1",
            json!({
                "concurrency": c, "connections": k,
                "echo_rps": e.rps.round(), "floor_rps": f.rps.round(), "authorize_rps": a.rps.round(),
                "ratio_to_floor": round3(a.rps / f.rps), "floor_ratio_to_echo": round3(f.rps / e.rps),
                "embedded_rps": embedded.rps.round(),
                "embedded_ratio_to_floor": round3(embedded.rps / f.rps),
                "ratio_to_embedded": round3(a.rps / embedded.rps),
                "authorize_p50_ms": ms(a.hist.value_at_quantile(0.5)),
                "authorize_p99_ms": ms(a.hist.value_at_quantile(0.99)),
                "floor_p99_ms": ms(f.hist.value_at_quantile(0.99)),
                "errors": e.errors + f.errors + embedded.errors + a.errors,
            }),
        );
        Ok(())
    }

    /// p1d: the PostgreSQL floor through tokio-postgres and through sqlx, each committing groups
    /// as one autocommitted row insert and as a transaction shaped like chargegate's writer; the
    /// same closed loop (C=200), two interleaved rounds.
    pub async fn p1d(&mut self) -> anyhow::Result<()> {
        let (c, k) = (200, 8);
        let (warmup, measure) = (self.warmup(), self.measure(10));
        let mut runs = Vec::new();
        for round in 1..=2 {
            for shape in ["row", "transaction"] {
                for driver in ["tokio-postgres", "sqlx"] {
                    let url = self.create_database("chargegate_bench_p1d").await?;
                    let mut command = Command::new(std::env::current_exe()?);
                    command.arg("echo-server").args([
                        "--durable-postgres",
                        &url,
                        "--driver",
                        driver,
                        "--shape",
                        shape,
                    ]);
                    let floor = ServerProcess::spawn(command, self.server_core)?;
                    let channels = load::connect(&floor.url, k).await?;
                    let r = load::closed_loop(&channels, c, warmup, measure, round_robin_request())
                        .await;
                    drop(channels);
                    floor.stop();
                    self.drop_database("chargegate_bench_p1d").await?;
                    runs.push(json!({
                        "round": round, "shape": shape, "driver": driver, "rps": r.rps.round(),
                        "p50_ms": ms(r.hist.value_at_quantile(0.5)),
                        "p99_ms": ms(r.hist.value_at_quantile(0.99)),
                        "errors": r.errors,
                    }));
                }
            }
        }
        let mut ratios = serde_json::Map::new();
        for shape in ["row", "transaction"] {
            let rate = |driver: &str| -> Vec<f64> {
                runs.iter()
                    .filter(|r| r["shape"] == shape && r["driver"] == driver)
                    .filter_map(|r| r["rps"].as_f64())
                    .collect()
            };
            let (t, x) = (rate("tokio-postgres"), rate("sqlx"));
            let pairs: Vec<f64> = t.iter().zip(&x).map(|(t, x)| round3(x / t)).collect();
            ratios.insert(format!("{shape}_sqlx_to_tokio_postgres"), json!(pairs));
        }
        self.record(
            "p1d",
            json!({ "concurrency": c, "runs": runs, "ratios": ratios }),
        );
        Ok(())
    }

    /// p2: one, two and three instances on one database, the same closed loop (C=200) spread over
    /// them; the aggregate rate, and the cores the instances and PostgreSQL used meanwhile.
    pub async fn p2(&mut self) -> anyhow::Result<()> {
        let (c, k) = (200, 9);
        let (warmup, measure) = (self.warmup(), self.measure(10));
        let mut rows = Vec::new();
        for n in 1..=3usize {
            let store = self.create_database("chargegate_bench_p2").await?;
            let mut servers = Vec::new();
            for i in 0..n {
                let dir = self.fresh_dir(&format!("p2-{n}-{i}"));
                servers.push(self.chargegate_on(&dir, &["--store-url", &store])?);
            }
            let mut channels = Vec::new();
            for s in &servers {
                channels.extend(load::connect(&s.url, k / n).await?);
            }
            let locks = LockWaits::sample(&store).await?;
            let (cpu_before, pg_before, bench_before, machine_before) = (
                servers.iter().map(|s| s.cpu_time()).sum::<Duration>(),
                procs::named_cpu_time("postgres"),
                procs::cpu_time(std::process::id()),
                procs::machine_cpu_time(),
            );
            let started = std::time::Instant::now();
            let a = load::closed_loop(&channels, c, warmup, measure, round_robin_request()).await;
            let elapsed = started.elapsed().as_secs_f64();
            let cores = |d: Duration| round3(d.as_secs_f64() / elapsed);
            let used = servers.iter().map(|s| s.cpu_time()).sum::<Duration>() - cpu_before;
            let pg = procs::named_cpu_time("postgres").saturating_sub(pg_before);
            let bench = procs::cpu_time(std::process::id()).saturating_sub(bench_before);
            let machine = procs::machine_cpu_time();
            let (busy, all) = (
                machine.0.saturating_sub(machine_before.0),
                machine.1.saturating_sub(machine_before.1),
            );
            let locks = locks.finish().await;
            rows.push(json!({
                "instances": n, "authorize_rps": a.rps.round(),
                "authorize_p99_ms": ms(a.hist.value_at_quantile(0.99)),
                "instances_cores": cores(used), "postgres_cores": cores(pg),
                "load_generator_cores": cores(bench),
                "machine_busy_share": round3(busy.as_secs_f64() / all.as_secs_f64().max(1e-9)),
                "lock_wait_share": locks.0, "mean_active_backends": locks.1,
                "errors": a.errors,
            }));
            drop(channels);
            for s in servers {
                s.stop();
            }
            self.drop_database("chargegate_bench_p2").await?;
        }
        let one = rows[0]["authorize_rps"].as_f64().unwrap_or(1.0).max(1.0);
        for row in &mut rows {
            let rps = row["authorize_rps"].as_f64().unwrap_or(0.0);
            row["ratio_to_one"] = json!(round3(rps / one));
        }
        self.record("p2", json!({ "concurrency": c, "runs": rows }));
        Ok(())
    }

    /// p4: two instances on one database; Authorize through the first at 2,000/s, decisions read
    /// by subscribers on both: the time from the intended send to the decision on the other
    /// instance's stream, beside the acknowledgement (the decision is durable: the floor) and
    /// the stream of the instance that decided (which on PostgreSQL publishes from the shared
    /// log too, so the two differ by the notification that crosses instances).
    pub async fn p4(&mut self) -> anyhow::Result<()> {
        let row = self.across_instances(&[]).await?;
        self.record("p4", row);
        Ok(())
    }

    /// r1: the queued path (every request waits for the remote authorizer) closed loop at C=200,
    /// on SQLite and on PostgreSQL with Redis, beside a bare HTTP client calling the same
    /// authorizer at the same concurrency (chargegate's `workers`, 64) in the same run; two
    /// alternating rounds, with the CPU each side used.
    pub async fn r1(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["authorizer-server", "--slow-percent", "0"]);
        let authorizer = ServerProcess::spawn(command, self.server_core.map(|_| 0))?;
        let endpoint = format!("{}/authorize", authorizer.url);
        let (warmup, measure) = (self.warmup(), self.measure(10));
        let workers = 64;
        let calls = if self.quick { 20_000 } else { 200_000 };
        let mut rounds = Vec::new();
        for _ in 0..2 {
            // The authorizer's own limit at this concurrency.
            let mut bare = Command::new(std::env::current_exe()?);
            bare.args([
                "post-client",
                "--url",
                &endpoint,
                "--count",
                &calls.to_string(),
                "--concurrency",
                &workers.to_string(),
            ]);
            let (authorizer_cpu, started) = (authorizer.cpu_time(), Instant::now());
            procs::run_pinned(bare, self.server_core)?;
            let elapsed = started.elapsed().as_secs_f64();
            let bare = json!({
                "calls_per_s": (calls as f64 / elapsed).round(),
                "authorizer_cores": round3((authorizer.cpu_time() - authorizer_cpu).as_secs_f64() / elapsed),
            });
            let mut row = json!({ "bare": bare });
            let flags = ["--authorizer", "http", "--authorizer-url", &endpoint];
            let sqlite = self
                .queued_throughput("r1-sqlite", &flags, Some(&authorizer), (warmup, measure))
                .await?;
            row["sqlite"] = sqlite;
            if self.postgres_answers().await && self.redis_answers().await {
                let store = self.create_database("chargegate_bench_r1").await?;
                let redis = self.redis_url.clone();
                let mut flags = flags.to_vec();
                flags.extend(["--store-url", &store, "--queue-url", &redis]);
                let pg = self
                    .queued_throughput("r1-redis", &flags, Some(&authorizer), (warmup, measure))
                    .await?;
                self.drop_database("chargegate_bench_r1").await?;
                row["postgres_redis"] = pg;
            }
            let base = row["bare"]["calls_per_s"].as_f64().unwrap_or(1.0).max(1.0);
            for k in ["sqlite", "postgres_redis"] {
                if let Some(rate) = row[k]["decisions_per_s"].as_f64() {
                    row[k]["ratio_to_bare"] = json!(round3(rate / base));
                }
            }
            rounds.push(row);
        }
        authorizer.stop();
        self.record(
            "r1",
            json!({ "concurrency": 200, "workers": workers, "rounds": rounds }),
        );
        Ok(())
    }

    /// r3: a backlog of 1,000,000 queued requests (10,000 with `--quick`) drained by three
    /// instances on PostgreSQL + Redis, beside `redis-benchmark`'s `XADD` and `XREADGROUP` rates
    /// on the same Redis. The backlog builds while the remote authorizer holds its answers
    /// (every worker waits on its call, nothing is decided); once every request is acknowledged
    /// the answers are released and the drain is timed to the last decision on a subscriber.
    pub async fn r3(&mut self) -> anyhow::Result<()> {
        let backlog: u64 = if self.quick { 10_000 } else { 1_000_000 };
        let hold = self.work.path().join("r3-hold");
        std::fs::write(&hold, b"")?;
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["authorizer-server", "--slow-percent", "0", "--hold-while"]);
        command.arg(&hold);
        let authorizer = ServerProcess::spawn(command, self.server_core.map(|_| 0))?;
        let endpoint = format!("{}/authorize", authorizer.url);
        let store = self.create_database("chargegate_bench_r3").await?;
        let redis = self.redis_url.clone();
        let queue_max = (backlog * 2).to_string();
        let mut servers = Vec::new();
        for i in 0..3 {
            let dir = self.fresh_dir(&format!("r3-{i}"));
            servers.push(self.chargegate_on(
                &dir,
                &[
                    "--authorizer",
                    "http",
                    "--authorizer-url",
                    &endpoint,
                    "--store-url",
                    &store,
                    "--queue-url",
                    &redis,
                    "--authorize-timeout-ms",
                    "600000",
                    "--queue-max",
                    &queue_max,
                ],
            )?);
        }
        let mut sub = Client::new(load::connect(&servers[2].url, 1).await?.remove(0));
        let mut stream = sub
            .subscribe_decisions(SubscribeDecisionsRequest::default())
            .await?
            .into_inner();
        let decided = Arc::new(AtomicU64::new(0));
        let (all_decided, all_decided_rx) = tokio::sync::oneshot::channel::<Instant>();
        let reader = {
            let decided = decided.clone();
            tokio::spawn(async move {
                let mut all_decided = Some(all_decided);
                while let Some(Ok(item)) = stream.next().await {
                    if matches!(item.event, Some(Event::Decision(_)))
                        && decided.fetch_add(1, Ordering::Relaxed) + 1 == backlog
                        && let Some(tx) = all_decided.take()
                    {
                        let _ = tx.send(Instant::now());
                    }
                }
            })
        };
        let mut channels = Vec::new();
        for s in &servers {
            channels.extend(load::connect(&s.url, 3).await?);
        }
        let (sent, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..200 {
            let mut client = Client::new(channels[t % channels.len()].clone());
            let (sent, refused, make) = (sent.clone(), refused.clone(), round_robin_request());
            tasks.push(tokio::spawn(async move {
                loop {
                    let n = sent.fetch_add(1, Ordering::Relaxed);
                    if n >= backlog {
                        return;
                    }
                    if client.authorize(make(n)).await.is_err() {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for task in tasks {
            task.await?;
        }
        let filled = started.elapsed().as_secs_f64();
        let refused = refused.load(Ordering::Relaxed);
        anyhow::ensure!(
            refused == 0,
            "{refused} requests of the backlog were refused"
        );
        anyhow::ensure!(
            decided.load(Ordering::Relaxed) == 0,
            "decisions came while the authorizer held its answers"
        );
        let before = (
            servers.iter().map(|s| s.cpu_time()).sum::<Duration>(),
            procs::named_cpu_time("postgres"),
            procs::named_cpu_time("redis-server"),
            authorizer.cpu_time(),
            procs::machine_cpu_time().0,
        );
        let resumed = Instant::now();
        std::fs::remove_file(&hold)?;
        let patience = Duration::from_secs(if self.quick { 120 } else { 1800 });
        let last = tokio::time::timeout(patience, all_decided_rx).await;
        let drained = match last {
            Ok(Ok(at)) => (at - resumed).as_secs_f64(),
            _ => anyhow::bail!(
                "{} of {backlog} decided within {patience:?}",
                decided.load(Ordering::Relaxed)
            ),
        };
        let cores = |after: Duration, before: Duration| {
            round3(after.saturating_sub(before).as_secs_f64() / drained)
        };
        let row = json!({
            "backlog": backlog,
            "fill_accepts_per_s": (backlog as f64 / filled).round(),
            "drain_s": round3(drained),
            "drain_decisions_per_s": (backlog as f64 / drained).round(),
            "instances_cores": cores(servers.iter().map(|s| s.cpu_time()).sum(), before.0),
            "postgres_cores": cores(procs::named_cpu_time("postgres"), before.1),
            "redis_cores": cores(procs::named_cpu_time("redis-server"), before.2),
            "authorizer_cores": cores(authorizer.cpu_time(), before.3),
            "machine_busy_cores": cores(procs::machine_cpu_time().0, before.4),
        });
        reader.abort();
        drop(channels);
        for s in servers {
            s.stop();
        }
        authorizer.stop();
        self.drop_database("chargegate_bench_r3").await?;
        let redis_benchmark = self.redis_benchmark(if self.quick { 20_000 } else { 500_000 })?;
        let mut row = row;
        let drain = row["drain_decisions_per_s"].as_f64().unwrap_or(0.0);
        let ratio = |key: &str| {
            let rate = redis_benchmark[key].as_f64().unwrap_or(0.0).max(1.0);
            json!(round3(drain / rate))
        };
        row["drain_to_xadd_p1"] = ratio("xadd_p1");
        row["drain_to_xreadgroup_p1"] = ratio("xreadgroup_p1");
        row["redis_benchmark"] = redis_benchmark;
        self.record("r3", row);
        Ok(())
    }

    /// `redis-benchmark`'s rates (50 clients, `n` commands) of `XADD` and then `XREADGROUP`
    /// (`COUNT 1`, new entries) on one stream, without pipelining and with 16 commands a
    /// round trip; the stream is removed afterwards.
    fn redis_benchmark(&self, n: u64) -> anyhow::Result<Value> {
        let url = url::Url::parse(&self.redis_url)?;
        let (host, port) = (
            url.host_str().unwrap_or("127.0.0.1").to_owned(),
            url.port().unwrap_or(6379).to_string(),
        );
        let db = url.path().trim_start_matches('/');
        let db = if db.is_empty() { "0" } else { db }.to_owned();
        let key = "chargegate-bench:r3";
        let cli = |args: &[&str]| -> anyhow::Result<String> {
            let mut c = Command::new("redis-cli");
            c.args(["-h", &host, "-p", &port, "-n", &db]).args(args);
            procs::run_pinned(c, None)
        };
        let bench = |pipeline: &str, command: &[&str]| -> anyhow::Result<f64> {
            let mut c = Command::new("redis-benchmark");
            c.args([
                "-h", &host, "-p", &port, "--dbnum", &db, "-c", "50", "-P", pipeline,
            ])
            .args(["-n", &n.to_string(), "--csv"])
            .args(command);
            let out = procs::run_pinned(c, self.server_core)?;
            let last = out.lines().last().unwrap_or_default();
            let rate = last.split(',').nth(1).unwrap_or_default().trim_matches('"');
            rate.parse()
                .map_err(|_| anyhow::anyhow!("redis-benchmark printed {out:?}"))
        };
        let mut row = json!({ "clients": 50, "commands": n });
        for pipeline in ["1", "16"] {
            cli(&["DEL", key])?;
            cli(&["XGROUP", "CREATE", key, "g", "0", "MKSTREAM"])?;
            row[format!("xadd_p{pipeline}")] = json!(
                bench(
                    pipeline,
                    &[
                        "XADD",
                        key,
                        "*",
                        "r",
                        "0190d0c8-7f3a-7c1e-9a2b-3c4d5e6f7a8b"
                    ]
                )?
                .round()
            );
            row[format!("xreadgroup_p{pipeline}")] = json!(
                bench(
                    pipeline,
                    &[
                        "XREADGROUP",
                        "GROUP",
                        "g",
                        "c",
                        "COUNT",
                        "1",
                        "STREAMS",
                        key,
                        ">"
                    ]
                )?
                .round()
            );
        }
        cli(&["DEL", key])?;
        Ok(row)
    }

    /// Decisions per second of a chargegate started with `extra`, under a closed loop on
    /// decisions at C=200 (each request in flight until its decision reaches a subscriber, so
    /// the intake never runs ahead of the deciding), with the cores it and `authorizer` used.
    pub(crate) async fn queued_throughput(
        &mut self,
        name: &str,
        extra: &[&str],
        authorizer: Option<&ServerProcess>,
        (warmup, measure): (Duration, Duration),
    ) -> anyhow::Result<Value> {
        let dir = self.fresh_dir(name);
        let server = self.chargegate_on(&dir, extra)?;
        let mut sub = Client::new(load::connect(&server.url, 1).await?.remove(0));
        let stream = sub
            .subscribe_decisions(SubscribeDecisionsRequest::default())
            .await?
            .into_inner();
        let channels = load::connect(&server.url, 8).await?;
        let cpu = Arc::new(Mutex::new(None));
        let window = {
            let (cpu, pid, authorizer_pid) = (cpu.clone(), server.pid, authorizer.map(|a| a.pid));
            tokio::spawn(async move {
                tokio::time::sleep(warmup).await;
                let authorizer_cpu = || authorizer_pid.map_or(Duration::ZERO, procs::cpu_time);
                let others = || {
                    [
                        procs::named_cpu_time("postgres"),
                        procs::named_cpu_time("redis-server"),
                        procs::machine_cpu_time().0,
                    ]
                };
                let before = (
                    procs::cpu_time(pid),
                    authorizer_cpu(),
                    others(),
                    Instant::now(),
                );
                tokio::time::sleep(measure).await;
                let elapsed = before.3.elapsed().as_secs_f64();
                let cores = |after: Duration, before: Duration| {
                    round3(after.saturating_sub(before).as_secs_f64() / elapsed)
                };
                let after = others();
                *cpu.lock().unwrap() = Some(json!({
                    "chargegate_cores": cores(procs::cpu_time(pid), before.0),
                    "authorizer_cores": cores(authorizer_cpu(), before.1),
                    "postgres_cores": cores(after[0], before.2[0]),
                    "redis_cores": cores(after[1], before.2[1]),
                    "machine_busy_cores": cores(after[2], before.2[2]),
                }));
            })
        };
        let decided = load::decided_loop(
            &channels,
            stream,
            200,
            warmup,
            measure,
            round_robin_request(),
        )
        .await;
        let _ = window.await;
        server.stop();
        let mut row = json!({
            "decisions_per_s": decided.rps.round(),
            "decision_p50_ms": ms(decided.hist.value_at_quantile(0.5)),
            "decision_p99_ms": ms(decided.hist.value_at_quantile(0.99)),
            "errors": decided.errors,
        });
        if let (Some(row), Some(Value::Object(cpu))) =
            (row.as_object_mut(), cpu.lock().unwrap().take())
        {
            row.extend(cpu);
        }
        Ok(row)
    }

    /// r2: p4 with the live carrier on Redis beside p4 on PostgreSQL alone, in alternating
    /// rounds: the other instance's p99 against the deciding instance's, each way.
    pub async fn r2(&mut self) -> anyhow::Result<()> {
        let redis = self.redis_url.clone();
        let mut rounds = Vec::new();
        for _ in 0..2 {
            let tailing = self.across_instances(&[]).await?;
            let carried = self.across_instances(&["--queue-url", &redis]).await?;
            rounds.push(json!({ "tailing": tailing, "carried": carried }));
        }
        self.record("r2", json!({ "rounds": rounds }));
        Ok(())
    }

    /// Two instances on one fresh database (with `extra` flags each), `Authorize` through the
    /// first at 2,000/s, subscribers on both.
    async fn across_instances(&mut self, extra: &[&str]) -> anyhow::Result<Value> {
        let rate = 2000.0;
        let (warmup, measure) = (self.warmup(), self.measure(10));
        let store = self.create_database("chargegate_bench_p4").await?;
        let (dir_a, dir_b) = (self.fresh_dir("p4-a"), self.fresh_dir("p4-b"));
        let mut flags = vec!["--store-url", &store];
        flags.extend_from_slice(extra);
        let a = self.chargegate_on(&dir_a, &flags)?;
        let b = self.chargegate_on(&dir_b, &flags)?;
        let (on_a, on_b) = (E2e::open(&a.url).await?, E2e::open(&b.url).await?);
        let start = Instant::now() + Duration::from_millis(500);
        let schedule = (start, start + warmup, rate);
        let stop = Arc::new(AtomicBool::new(false));
        let (same, other) = (
            E2e::read(on_a, "p4-", schedule, &stop),
            E2e::read(on_b, "p4-", schedule, &stop),
        );
        let channels = load::connect(&a.url, 8).await?;
        let make: MakeRequest = Arc::new(|n| AuthorizeRequest {
            station_id: station(n as usize % STATIONS),
            driver_token: TOKEN.into(),
            request_id: format!("p4-{n}"),
            ..Default::default()
        });
        let ack = load::open_loop(&channels, rate, start, warmup, measure, 20_000, make).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while (same.received.load(Ordering::Relaxed) < ack.ok()
            || other.received.load(Ordering::Relaxed) < ack.ok())
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for r in same.readers.iter().chain(&other.readers) {
            r.abort();
        }
        a.stop();
        b.stop();
        self.drop_database("chargegate_bench_p4").await?;
        let (same_hist, other_hist) = (
            same.hist.lock().unwrap().clone(),
            other.hist.lock().unwrap().clone(),
        );
        let q = |h: &Histogram<u64>, q: f64| ms(h.value_at_quantile(q));
        Ok(json!({
                "rate": rate,
                "other_p50_ms": q(&other_hist, 0.5), "other_p99_ms": q(&other_hist, 0.99),
                "same_p50_ms": q(&same_hist, 0.5), "same_p99_ms": q(&same_hist, 0.99),
                "ack_p50_ms": q(&ack.hist, 0.5), "ack_p99_ms": q(&ack.hist, 0.99),
                "p99_ratio_other_to_ack": round3(q(&other_hist, 0.99) / q(&ack.hist, 0.99).max(0.001)),
                "p99_ratio_other_to_same": round3(q(&other_hist, 0.99) / q(&same_hist, 0.99).max(0.001)),
                "acknowledged": ack.ok(),
                "received_same": same.received.load(Ordering::Relaxed),
                "received_other": other.received.load(Ordering::Relaxed),
        }))
    }

    /// g2: one call at a time; chargegate's extra latency in units of one fsync.
    pub async fn g2(&mut self) -> anyhow::Result<()> {
        let (warmup, measure) = (self.warmup(), self.measure(5));
        let probe_dir = self.fresh_dir("fsync");
        let fsync = procs::fsync_p50_us(&probe_dir, if self.quick { 50 } else { 300 })?;
        let [e, f, a] = self
            .against_references("g2", |url| async move {
                let channels = load::connect(&url, 1).await?;
                Ok(load::closed_loop(&channels, 1, warmup, measure, round_robin_request()).await)
            })
            .await?;
        let (echo_us, floor_us, auth_us) = (
            e.hist.value_at_quantile(0.5) as f64,
            f.hist.value_at_quantile(0.5) as f64,
            a.hist.value_at_quantile(0.5) as f64,
        );
        self.record(
            "g2",
            json!({
                "echo_p50_us": echo_us, "authorize_p50_us": auth_us, "fsync_p50_us": fsync,
                "overhead_fsyncs": round3((auth_us - echo_us) / fsync),
                "durable_echo_p50_us": floor_us,
                "durable_echo_overhead_fsyncs": round3((floor_us - echo_us) / fsync),
            }),
        );
        Ok(())
    }

    async fn echo_rps(&mut self) -> anyhow::Result<f64> {
        if let Some(rps) = self.echo_rps {
            return Ok(rps);
        }
        let echo = self.echo()?;
        let channels = load::connect(&echo.url, 8).await?;
        let e = load::closed_loop(
            &channels,
            200,
            self.warmup(),
            self.measure(5),
            round_robin_request(),
        )
        .await;
        echo.stop();
        self.echo_rps = Some(e.rps);
        Ok(e.rps)
    }

    pub(crate) async fn knee_rps(&mut self) -> anyhow::Result<f64> {
        if let Some(rps) = self.knee_rps {
            return Ok(rps);
        }
        let (url, server) = self.chargegate("knee", &[])?;
        let channels = load::connect(&url, 8).await?;
        let a = load::closed_loop(
            &channels,
            200,
            self.warmup(),
            self.measure(5),
            round_robin_request(),
        )
        .await;
        if let Some(s) = server {
            s.stop();
        }
        self.knee_rps = Some(a.rps);
        Ok(a.rps)
    }

    /// g3: open loop at 1/8 of echo's closed-loop maximum; chargegate's p99 against echo's.
    /// Tail latencies on a shared VM swing between minutes, so echo, the floor and chargegate take
    /// turns for [`G3_ROUNDS`] rounds; each figure is the median of the rounds, the gap the median
    /// of each round's gap.
    pub async fn g3(&mut self) -> anyhow::Result<()> {
        let rate = (self.echo_rps().await? / 8.0).round();
        let (warmup, measure) = (self.warmup(), self.measure(10));
        let rounds = if self.quick { 2 } else { G3_ROUNDS };
        let mut runs = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            runs.push(
                self.against_references("g3", |url| async move {
                    let channels = load::connect(&url, 8).await?;
                    let start = Instant::now();
                    let run = load::open_loop(
                        &channels,
                        rate,
                        start,
                        warmup,
                        measure,
                        20_000,
                        round_robin_request(),
                    )
                    .await;
                    Ok(run)
                })
                .await?,
            );
        }
        let quantile = |i: usize, q: f64| -> Vec<f64> {
            runs.iter()
                .map(|run| ms(run[i].hist.value_at_quantile(q)))
                .collect()
        };
        let (e99, f99, a99) = (quantile(0, 0.99), quantile(1, 0.99), quantile(2, 0.99));
        let gaps: Vec<f64> = a99.iter().zip(&e99).map(|(a, e)| round3(a - e)).collect();
        let floor_gaps: Vec<f64> = f99.iter().zip(&e99).map(|(f, e)| round3(f - e)).collect();
        let count = |i: usize, f: fn(&load::Open) -> u64| -> u64 {
            runs.iter().map(|run| f(&run[i])).sum()
        };
        self.record(
            "g3",
            json!({
                "rate": rate, "rounds": rounds,
                "echo_p99_ms": median(&e99), "authorize_p99_ms": median(&a99),
                "authorize_p999_ms": median(&quantile(2, 0.999)), "gap_ms": median(&gaps),
                "durable_echo_p99_ms": median(&f99), "durable_echo_gap_ms": median(&floor_gaps),
                "gap_ms_by_round": gaps, "durable_echo_gap_ms_by_round": floor_gaps,
                "echo_ok": count(0, load::Open::ok), "authorize_ok": count(2, load::Open::ok),
                "authorize_rejected": count(2, load::Open::rejected),
            }),
        );
        // The plot shows every round's calls together.
        let merged = runs.into_iter().reduce(|mut all, run| {
            for (into, from) in all.iter_mut().zip(&run) {
                into.hist.add(&from.hist).expect("histograms of one shape");
            }
            all
        });
        if let Some([e, _, a]) = merged {
            self.plots.series.push(("echo ack (g3)".into(), e.hist));
            self.plots
                .series
                .push(("chargegate ack (g3)".into(), a.hist));
        }
        Ok(())
    }

    /// g4: open loop at 5,000/s with a subscriber on every station; intended send → decision received.
    pub async fn g4(&mut self) -> anyhow::Result<()> {
        let rate = 5000.0;
        let (warmup, measure) = (self.warmup(), self.measure(10));
        let (url, server) = self.chargegate("g4", &[])?;
        let streams = E2e::open(&url).await?;
        let start = Instant::now() + Duration::from_millis(500);
        let from = start + warmup;
        let stop = Arc::new(AtomicBool::new(false));
        let e2e = E2e::read(streams, "g4-", (start, from, rate), &stop);
        let (received, readers) = (e2e.received.clone(), e2e.readers);
        let e2e = e2e.hist;
        let channels = load::connect(&url, 8).await?;
        let make: MakeRequest = Arc::new(|n| AuthorizeRequest {
            station_id: station(n as usize % STATIONS),
            driver_token: TOKEN.into(),
            request_id: format!("g4-{n}"),
            ..Default::default()
        });
        let ack = load::open_loop(&channels, rate, start, warmup, measure, 20_000, make).await;
        // Let the last decisions arrive.
        let deadline = Instant::now() + Duration::from_secs(10);
        while received.load(Ordering::Relaxed) < ack.ok() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.abort();
        }
        if let Some(s) = server {
            s.stop();
        }
        let e2e = std::mem::replace(&mut *e2e.lock().unwrap(), load::histogram());
        let (e99, a99) = (
            ms(e2e.value_at_quantile(0.99)),
            ms(ack.hist.value_at_quantile(0.99)),
        );
        self.record(
            "g4",
            json!({
                "rate": rate, "e2e_p50_ms": ms(e2e.value_at_quantile(0.5)), "e2e_p99_ms": e99,
                "ack_p50_ms": ms(ack.hist.value_at_quantile(0.5)), "ack_p99_ms": a99, "ratio": round3(e99 / a99),
                "acknowledged": ack.ok(), "decisions_received": received.load(Ordering::Relaxed),
            }),
        );
        self.plots
            .series
            .push(("chargegate ack (g4)".into(), ack.hist));
        self.plots
            .series
            .push(("chargegate end-to-end (g4)".into(), e2e));
        Ok(())
    }

    /// g5: memory per idle subscriber stream, against a bare tonic stream.
    pub async fn g5(&mut self) -> anyhow::Result<()> {
        if self.target.is_some() {
            self.record(
                "g5",
                json!({"skipped": "needs a local server to read its memory"}),
            );
            return Ok(());
        }
        let streams = if self.quick { 1000 } else { 10_000 };
        let echo = self.echo()?;
        let echo_bytes = idle_streams_cost(&echo, streams).await?;
        echo.stop();
        let (_, server) = self.chargegate("g5", &[])?;
        let server = server.expect("local");
        let cg_bytes = idle_streams_cost(&server, streams).await?;
        server.stop();
        self.record(
            "g5",
            json!({
                "streams": streams, "bytes_per_stream": cg_bytes.round(), "bare_bytes_per_stream": echo_bytes.round(),
                "ratio": round3(cg_bytes / echo_bytes),
            }),
        );
        Ok(())
    }

    /// g6: 1,000 subscribers, 100 of which stop reading, while decisions flow at 5,000/s.
    pub async fn g6(&mut self) -> anyhow::Result<()> {
        let (subscribers, stalled) = if self.quick { (200, 20) } else { (1000, 100) };
        let measure = self.measure(60);
        let baseline = self
            .flow_with_subscribers("g6-baseline", subscribers, 0, measure)
            .await?;
        let stalled_run = self
            .flow_with_subscribers("g6-stalled", subscribers, stalled, measure)
            .await?;
        self.record(
            "g6",
            json!({
                "subscribers": subscribers, "stalled": stalled, "rate": 5000, "seconds": measure.as_secs(),
                "rss_growth_mb": stalled_run.rss_growth_mb, "baseline_rss_growth_mb": baseline.rss_growth_mb,
                "p99_ms": stalled_run.readers_p99_ms, "baseline_p99_ms": baseline.readers_p99_ms,
                "p99_ratio": round3(stalled_run.readers_p99_ms / baseline.readers_p99_ms),
                "lost": stalled_run.lost + baseline.lost,
                "decisions": stalled_run.decisions,
                "rss_timeline": stalled_run.timeline,
            }),
        );
        Ok(())
    }

    async fn flow_with_subscribers(
        &mut self,
        name: &str,
        subscribers: usize,
        stalled: usize,
        measure: Duration,
    ) -> anyhow::Result<FlowResult> {
        let rate = 5000.0;
        let warmup = self.warmup();
        let (url, server) = self.chargegate(name, &[])?;
        let sub_channels = load::connect(&url, 16).await?;
        let start = Instant::now() + Duration::from_millis(1000);
        let from = start + warmup;
        let e2e = Arc::new(Mutex::new(load::histogram()));
        let counts: Arc<Vec<AtomicU64>> =
            Arc::new((0..subscribers).map(|_| AtomicU64::new(0)).collect());
        let mut readers = Vec::new();
        let mut parked = Vec::new();
        for s in 0..subscribers {
            let mut client = Client::new(sub_channels[s % sub_channels.len()].clone());
            let stream = client
                .subscribe_decisions(SubscribeDecisionsRequest {
                    station_ids: vec![station(s)],
                    after_cursor: String::new(),
                })
                .await?
                .into_inner();
            if s < stalled {
                parked.push((s, stream));
                continue;
            }
            let (e2e, counts) = (e2e.clone(), counts.clone());
            let mut stream = stream;
            readers.push(tokio::spawn(async move {
                while let Some(Ok(item)) = stream.next().await {
                    if let Some(Event::Decision(d)) = item.event {
                        let now = Instant::now();
                        let i: u64 = d
                            .request_id
                            .rsplit('-')
                            .next()
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                        counts[s].fetch_add(1, Ordering::Relaxed);
                        let due = load::intended(start, rate, i);
                        if due >= from {
                            let _ = e2e
                                .lock()
                                .unwrap()
                                .record((now - due).as_micros().max(1) as u64);
                        }
                    }
                }
            }));
        }
        let pid = server.as_ref().map(|s| s.pid);
        let rss_before = pid.map_or(0, procs::rss_bytes);
        let sampler = RssSampler::start(pid, start, (measure + warmup) / 6, rate);
        let channels = load::connect(&url, 8).await?;
        let tag = name.to_owned();
        let make: MakeRequest = Arc::new(move |n| AuthorizeRequest {
            station_id: station(n as usize % subscribers),
            driver_token: TOKEN.into(),
            request_id: format!("{tag}-{n}"),
            ..Default::default()
        });
        let ack = load::open_loop(&channels, rate, start, warmup, measure, 20_000, make).await;
        let sent = ((warmup + measure).as_secs_f64() * rate) as u64;
        // Every request was acknowledged (the loop counts failures in the window only; check all).
        let expected = |s: usize| {
            (0..sent)
                .filter(|n| (*n as usize) % subscribers == s)
                .count() as u64
        };
        let (peak, timeline) = sampler.finish();
        let rss_growth_mb = peak.saturating_sub(rss_before) as f64 / 1_048_576.0;
        // Wait for the readers, then read the stalled streams to the end.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut lost = 0u64;
        for s in stalled..subscribers {
            while counts[s].load(Ordering::Relaxed) < expected(s) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            lost += expected(s).saturating_sub(counts[s].load(Ordering::Relaxed));
        }
        for (s, mut stream) in parked {
            let mut got = 0u64;
            while got < expected(s) {
                match tokio::time::timeout_at(deadline.into(), stream.next()).await {
                    Ok(Some(Ok(item))) => {
                        if let Some(Event::Decision(_)) = item.event {
                            got += 1;
                        }
                    }
                    _ => break,
                }
            }
            lost += expected(s).saturating_sub(got);
        }
        for r in readers {
            r.abort();
        }
        if let Some(s) = server {
            s.stop();
        }
        let failed = (ack.outcomes.rejected.load(Ordering::Relaxed)
            + ack.outcomes.broken.load(Ordering::Relaxed)
            + ack.outcomes.other.load(Ordering::Relaxed)) as f64;
        if failed > 0.0 {
            println!("{name}: {failed} calls failed; 'lost' counts their decisions too");
        }
        let e2e = std::mem::replace(&mut *e2e.lock().unwrap(), load::histogram());
        Ok(FlowResult {
            timeline,
            rss_growth_mb: round3(rss_growth_mb),
            readers_p99_ms: ms(e2e.value_at_quantile(0.99)),
            lost,
            decisions: sent,
        })
    }

    /// g7: drain a backlog with no ingest, against the same SQLite work done directly.
    pub async fn g7(&mut self) -> anyhow::Result<()> {
        if self.target.is_some() {
            self.record("g7", json!({"skipped": "needs a local data dir"}));
            return Ok(());
        }
        let backlog: u64 = if self.quick { 20_000 } else { 1_000_000 };
        let dir = self.fresh_dir("g7");
        let data = dir.join("data");
        let seeded = Instant::now();
        seed_backlog(&data, backlog).await?;
        println!(
            "g7: seeded {backlog} queued requests in {:.1}s",
            seeded.elapsed().as_secs_f64()
        );
        let raw_dir = self.fresh_dir("g7-raw");
        std::fs::copy(data.join("chargegate.db"), raw_dir.join("raw.db"))?;

        let started = Instant::now();
        let server = self.chargegate_on(&dir, &[])?;
        let mut client = Client::new(load::connect(&server.url, 1).await?.remove(0));
        let last = format!("backlog-{}", backlog - 1);
        loop {
            let d = client
                .get_decision(GetDecisionRequest {
                    request_id: last.clone(),
                })
                .await?
                .into_inner();
            if d.decision
                .is_some_and(|d| d.status != chargegate::proto::DecisionStatus::Pending as i32)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let drain_secs = started.elapsed().as_secs_f64();
        server.stop();
        let raw_per_s =
            tokio::task::spawn_blocking(move || raw_drain(&raw_dir.join("raw.db"), 64)).await??;
        let drain_per_s = backlog as f64 / drain_secs;
        self.record(
            "g7",
            json!({
                "backlog": backlog, "drain_per_s": drain_per_s.round(), "raw_sqlite_per_s": raw_per_s.round(),
                "ratio": round3(drain_per_s / raw_per_s),
            }),
        );
        Ok(())
    }

    /// a1: the remote authorizer against a fast local one (and with a 5 % slow tail), compared with
    /// the access list: decisions per second (closed loop) and accept → decision p99 (open loop).
    pub async fn a1(&mut self) -> anyhow::Result<()> {
        if self.target.is_some() {
            self.record("a1", json!({"skipped": "starts its own servers"}));
            return Ok(());
        }
        let acl = self.authorizer_run("a1-acl", None).await?;
        let fast = self.authorizer_run("a1-http", Some(0)).await?;
        let tail = self.authorizer_run("a1-http-tail", Some(5)).await?;
        self.record(
            "a1",
            json!({
                "acl_decisions_per_s": acl.decisions_per_s.round(), "http_decisions_per_s": fast.decisions_per_s.round(),
                "http_ratio": round3(fast.decisions_per_s / acl.decisions_per_s),
                "acl_p50_ms": acl.p50_ms, "acl_p99_ms": acl.p99_ms,
                "http_p50_ms": fast.p50_ms, "http_p99_ms": fast.p99_ms,
                "http_slow_tail_p50_ms": tail.p50_ms, "http_slow_tail_p99_ms": tail.p99_ms,
                "slow_tail": "5 % of calls answered after 50 ms", "open_loop_rate": 2000,
            }),
        );
        Ok(())
    }

    async fn authorizer_run(
        &mut self,
        name: &str,
        slow_percent: Option<u64>,
    ) -> anyhow::Result<AuthorizerRun> {
        let authorizer = match slow_percent {
            Some(percent) => {
                let mut command = Command::new(std::env::current_exe()?);
                command.args([
                    "authorizer-server",
                    "--slow-percent",
                    &percent.to_string(),
                    "--slow-ms",
                    "50",
                ]);
                // The authorizer shares the load generator's core: the server keeps its own.
                Some(ServerProcess::spawn(command, self.server_core.map(|_| 0))?)
            }
            None => None,
        };
        let extra: Vec<String> = match &authorizer {
            Some(a) => vec![
                "--authorizer".into(),
                "http".into(),
                "--authorizer-url".into(),
                format!("{}/authorize", a.url),
            ],
            None => vec![],
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (warmup, measure) = (self.warmup(), self.measure(10));

        // Throughput: closed loop, decisions counted on a subscription over the window.
        let decisions_per_s = self
            .queued_throughput(name, &extra, authorizer.as_ref(), (warmup, measure))
            .await?["decisions_per_s"]
            .as_f64()
            .unwrap_or(0.0);

        // Latency: open loop at a rate every configuration sustains; accept → decision as recorded.
        let (url, server) = self.chargegate(&format!("{name}-latency"), &extra)?;
        let mut sub = Client::new(load::connect(&url, 1).await?.remove(0));
        let mut stream = sub
            .subscribe_decisions(SubscribeDecisionsRequest::default())
            .await?
            .into_inner();
        let latencies = Arc::new(Mutex::new(load::histogram()));
        let reader = {
            let latencies = latencies.clone();
            tokio::spawn(async move {
                while let Some(Ok(item)) = stream.next().await {
                    if let Some(Event::Decision(d)) = item.event {
                        let accepted = d.accepted_at.unwrap_or_default();
                        let decided = d.decided_at.unwrap_or_default();
                        let us = (decided.seconds - accepted.seconds) * 1_000_000
                            + i64::from(decided.nanos - accepted.nanos) / 1000;
                        let _ = latencies.lock().unwrap().record(us.max(1) as u64);
                    }
                }
            })
        };
        let channels = load::connect(&url, 8).await?;
        let r = load::open_loop(
            &channels,
            2000.0,
            Instant::now(),
            warmup,
            measure,
            20_000,
            round_robin_request(),
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while latencies.lock().unwrap().len() < r.ok() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        reader.abort();
        if let Some(s) = server {
            s.stop();
        }
        if let Some(a) = authorizer {
            a.stop();
        }
        let hist = std::mem::replace(&mut *latencies.lock().unwrap(), load::histogram());
        Ok(AuthorizerRun {
            decisions_per_s,
            p50_ms: ms(hist.value_at_quantile(0.5)),
            p99_ms: ms(hist.value_at_quantile(0.99)),
        })
    }

    /// g8: open loop at twice the knee; goodput, shedding, memory, connections.
    pub async fn g8(&mut self) -> anyhow::Result<()> {
        let knee = self.knee_rps().await?;
        let rate = (2.0 * knee).round();
        let measure = if self.quick {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(30)
        };
        let (url, server) = self.chargegate("g8", &[])?;
        let pid = server.as_ref().map(|s| s.pid);
        let sampler = RssSampler::start(pid, Instant::now(), measure, rate);
        let channels = load::connect(&url, 8).await?;
        let r = load::open_loop(
            &channels,
            rate,
            Instant::now(),
            self.warmup(),
            measure,
            OVERLOAD_IN_FLIGHT,
            round_robin_request(),
        )
        .await;
        let (peak, _) = sampler.finish();
        if let Some(s) = server {
            s.stop();
        }
        let goodput = r.ok() as f64 / measure.as_secs_f64();
        self.record(
            "g8",
            json!({
                "knee_rps": knee.round(), "offered_rps": rate, "goodput_rps": goodput.round(),
                "goodput_ratio": round3(goodput / knee), "rejected": r.rejected(),
                "client_dropped": r.outcomes.client_dropped.load(Ordering::Relaxed),
                "acknowledged_after_the_window": r.outcomes.late.load(Ordering::Relaxed),
                "ok_p99_ms": ms(r.hist.value_at_quantile(0.99)),
                "peak_rss_mb": round3(peak as f64 / 1_048_576.0),
                "broken_connections": r.broken(),
            }),
        );
        Ok(())
    }
}

/// Decision throughput and accept → decision latency for one authorizer configuration.
struct AuthorizerRun {
    decisions_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Samples a process's RSS every 100 ms on a thread of its own: the peak, and a point every
/// `every` (with the decisions sent so far at `rate` since `start`).
struct RssSampler {
    running: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    timeline: Arc<Mutex<Vec<Value>>>,
    thread: std::thread::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: Option<u32>, start: Instant, every: Duration, rate: f64) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let peak = Arc::new(AtomicU64::new(pid.map_or(0, procs::rss_bytes)));
        let timeline = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (running, peak, timeline) = (running.clone(), peak.clone(), timeline.clone());
            std::thread::spawn(move || {
                let mut next_mark = start + every;
                while running.load(Ordering::Relaxed) {
                    if let Some(pid) = pid {
                        let rss = procs::rss_bytes(pid);
                        peak.fetch_max(rss, Ordering::Relaxed);
                        let now = Instant::now();
                        if now >= next_mark {
                            let sent =
                                (now.saturating_duration_since(start).as_secs_f64() * rate) as u64;
                            let mb = round3(rss as f64 / 1_048_576.0);
                            timeline
                                .lock()
                                .unwrap()
                                .push(json!({"decisions": sent, "rss_mb": mb}));
                            next_mark += every;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Self {
            running,
            peak,
            timeline,
            thread,
        }
    }

    /// Stops sampling; returns the peak RSS in bytes and the timeline.
    fn finish(self) -> (u64, Vec<Value>) {
        self.running.store(false, Ordering::Relaxed);
        let _ = self.thread.join();
        let timeline = std::mem::take(&mut *self.timeline.lock().unwrap());
        (self.peak.load(Ordering::Relaxed), timeline)
    }
}

struct FlowResult {
    timeline: Vec<Value>,
    rss_growth_mb: f64,
    readers_p99_ms: f64,
    lost: u64,
    decisions: u64,
}

impl Bench {
    /// w1: webhook deliveries per second against a bare HTTP client posting the same bodies to the
    /// same receiver, and decision → first delivery attempt latency under an open loop.
    pub async fn w1(&mut self) -> anyhow::Result<()> {
        if self.target.is_some() {
            self.record("w1", json!({"skipped": "needs a local data dir"}));
            return Ok(());
        }
        let n: u64 = if self.quick { 2_000 } else { 50_000 };
        // chargegate's default per-host limit: both send at most this many at once.
        let concurrency = 16;
        let (addr, arrivals) = webhook::receiver().await?;
        let url = format!("http://{addr}/hook");

        // Rounds alternate the bare client and chargegate, so both see the same machine; the
        // figures are the medians, the ratio the median of the rounds' ratios.
        let rounds = if self.quick { 1 } else { 5 };
        let (mut bare_rates, mut chargegate_rates, mut ratios) = (vec![], vec![], vec![]);
        // CPU time per delivery, µs: steadier than rates on a shared machine.
        let (mut bare_cpu, mut chargegate_cpu) = (vec![], vec![]);
        for round in 0..rounds {
            let mut bare = Command::new(std::env::current_exe()?);
            bare.args([
                "post-client",
                "--url",
                &url,
                "--count",
                &n.to_string(),
                "--concurrency",
                &concurrency.to_string(),
            ]);
            let printed = procs::run_pinned(bare, self.server_core)?;
            let bare_cpu_ms: f64 = printed
                .lines()
                .find_map(|l| l.strip_prefix("cpu_ms="))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| anyhow::anyhow!("the bare client did not print its CPU time"))?;
            anyhow::ensure!(
                arrivals.count.load(Ordering::Relaxed) == n,
                "the bare client posted everything"
            );
            let bare_per_s = arrivals.rate();
            arrivals.reset();

            let dir = self.fresh_dir("w1");
            seed_deliveries(&dir.join("data"), n, &url).await?;
            let server = self.chargegate_on(&dir, &["--webhook-allow-private", "true"])?;
            // The server's CPU from its first delivery to its last (start-up left out).
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut cpu_at_first = None;
            while arrivals.count.load(Ordering::Relaxed) < n && Instant::now() < deadline {
                if cpu_at_first.is_none() && arrivals.count.load(Ordering::Relaxed) > 0 {
                    cpu_at_first = Some(server.cpu_time());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let cpu = server.cpu_time() - cpu_at_first.unwrap_or_default();
            server.stop();
            anyhow::ensure!(
                arrivals.count.load(Ordering::Relaxed) >= n,
                "chargegate delivered everything"
            );
            let chargegate_per_s = arrivals.rate();
            arrivals.reset();
            let (bare_us, chargegate_us) = (
                bare_cpu_ms * 1000.0 / n as f64,
                cpu.as_secs_f64() * 1e6 / n as f64,
            );
            println!(
                "w1: round {}: bare client {bare_per_s:.0}/s ({bare_us:.1} µs CPU each), chargegate {chargegate_per_s:.0}/s ({chargegate_us:.1} µs CPU each) ({n} pending deliveries)",
                round + 1,
            );
            bare_rates.push(bare_per_s);
            chargegate_rates.push(chargegate_per_s);
            bare_cpu.push(bare_us);
            chargegate_cpu.push(chargegate_us);
            ratios.push(chargegate_per_s / bare_per_s);
        }
        let ratio = median(&ratios);
        let (bare_per_s, chargegate_per_s) = (median(&bare_rates), median(&chargegate_rates));
        let (bare_cpu_us, chargegate_cpu_us) = (median(&bare_cpu), median(&chargegate_cpu));
        ratios.sort_by(f64::total_cmp);

        // Latency: decisions with callbacks at a fixed rate; decided_at (in the body) → arrival.
        let rate = if self.quick { 500.0 } else { 1000.0 };
        let (grpc, server) = self.chargegate("w1-latency", &["--webhook-allow-private", "true"])?;
        arrivals.measure_latency.store(true, Ordering::Relaxed);
        let channels = load::connect(&grpc, 4).await?;
        let callback = url.clone();
        let make: MakeRequest = Arc::new(move |i| AuthorizeRequest {
            station_id: station(i as usize % STATIONS),
            driver_token: TOKEN.into(),
            callback_url: callback.clone(),
            ..Default::default()
        });
        let (warmup, measure) = (self.warmup(), self.measure(10));
        let sent = load::open_loop(
            &channels,
            rate,
            Instant::now(),
            warmup,
            measure,
            20_000,
            make,
        )
        .await;
        let mut seen = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = arrivals.count.load(Ordering::Relaxed);
            if now == seen {
                break;
            }
            seen = now;
        }
        arrivals.measure_latency.store(false, Ordering::Relaxed);
        if let Some(s) = server {
            s.stop();
        }
        let hist = std::mem::replace(&mut *arrivals.latency.lock().unwrap(), load::histogram());
        self.plots
            .series
            .push(("webhook decided → arrived".into(), hist.clone()));
        self.record(
            "w1",
            json!({
                "deliveries": n, "rounds": rounds, "concurrency_per_host": concurrency,
                "bare_client_per_s": bare_per_s.round(), "chargegate_per_s": chargegate_per_s.round(),
                "ratio": round3(ratio),
                "ratio_range": [round3(ratios[0]), round3(ratios[ratios.len() - 1])],
                "bare_client_cpu_us_per_delivery": round3(bare_cpu_us),
                "chargegate_cpu_us_per_delivery": round3(chargegate_cpu_us),
                "cpu_ratio": round3(bare_cpu_us / chargegate_cpu_us),
                "latency_rate": rate, "latency_sent": sent.ok(), "latency_arrived": hist.len(),
                "decided_to_attempt_p50_ms": ms(hist.value_at_quantile(0.5)),
                "decided_to_attempt_p99_ms": ms(hist.value_at_quantile(0.99)),
            }),
        );
        Ok(())
    }
}

impl Bench {
    /// u1: the audit trail's costs. Authorize throughput (closed loop, C=200) with the RPC audit
    /// layer on against off, in alternating rounds; then QueryDecisions for one station's day
    /// among a large seeded decision log.
    pub async fn u1(&mut self) -> anyhow::Result<()> {
        if self.target.is_some() {
            self.record("u1", json!({"skipped": "starts its own servers"}));
            return Ok(());
        }
        let rounds = if self.quick { 1 } else { 3 };
        let (warmup, measure) = (self.warmup(), self.measure(10));
        let (mut on, mut off, mut ratios) = (vec![], vec![], vec![]);
        for round in 0..rounds {
            let mut rps = [0.0; 2];
            for (i, extra) in [&[][..], &["--audit-calls", "false"][..]]
                .into_iter()
                .enumerate()
            {
                let (url, server) = self.chargegate("u1", extra)?;
                let channels = load::connect(&url, 8).await?;
                rps[i] = load::closed_loop(&channels, 200, warmup, measure, round_robin_request())
                    .await
                    .rps;
                drop(channels);
                if let Some(s) = server {
                    s.stop();
                }
            }
            println!(
                "u1: round {}: audit on {:.0}/s, off {:.0}/s",
                round + 1,
                rps[0],
                rps[1]
            );
            on.push(rps[0]);
            off.push(rps[1]);
            ratios.push(rps[0] / rps[1]);
        }

        // QueryDecisions: one station's day among `n` decisions over 30 days and 1,000 stations.
        let n: u64 = if self.quick { 200_000 } else { 10_000_000 };
        let dir = self.fresh_dir("u1-query");
        let seeded = Instant::now();
        let day_start = seed_decisions(&dir.join("data"), n).await?;
        let seed_secs = seeded.elapsed().as_secs_f64();
        println!("u1: seeded {n} decisions in {seed_secs:.0}s");
        let server = self.chargegate_on(&dir, &[])?;
        let mut client = chargegate::proto::audit_client::AuditClient::new(
            load::connect(&server.url, 1).await?.remove(0),
        );
        let mut times = load::histogram();
        let mut rows = 0;
        for q in 0..21u64 {
            let from = day_start + (q % 30) as i64 * 86_400_000_000;
            let request = chargegate::proto::QueryDecisionsRequest {
                station_id: station((q * 37 % 1000) as usize),
                from: Some(chargegate::decision::Micros(from).to_proto()),
                to: Some(chargegate::decision::Micros(from + 86_400_000_000).to_proto()),
                ..Default::default()
            };
            let started = Instant::now();
            let mut stream = client.query_decisions(request).await?.into_inner();
            let mut got = 0;
            while let Some(d) = stream.next().await {
                d?;
                got += 1;
            }
            // The first query also brings the station index up to date; it is not counted.
            if q > 0 {
                times.record(started.elapsed().as_micros().max(1) as u64)?;
                rows += got;
            }
        }
        server.stop();
        let ratio = median(&ratios);
        self.record(
            "u1",
            json!({
                "rounds": rounds, "audit_on_rps": median(&on).round(), "audit_off_rps": median(&off).round(),
                "ratio": round3(ratio),
                "query_decisions_log": n, "query_rows_per_station_day": rows / 20,
                "query_p50_ms": ms(times.value_at_quantile(0.5)), "query_max_ms": ms(times.max()),
                "seed_seconds": seed_secs.round(),
            }),
        );
        Ok(())
    }
}

/// Writes `n` decisions spread over the 30 days before now and 1,000 stations straight into a
/// fresh store, indexes included; returns the first day's start (µs).
/// Samples `pg_stat_activity` of one database every 20 ms while a measurement runs: how often a
/// backend waits for a lock (on the hot path only the `log_head` row is contended: queue claims
/// skip locked rows) and how many backends are active on average.
struct LockWaits {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(f64, f64)>,
}

impl LockWaits {
    async fn sample(url: &str) -> anyhow::Result<Self> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            let (mut samples, mut waiting, mut active) = (0u64, 0u64, 0i64);
            while !stopping.load(Ordering::Relaxed) {
                let row = client
                    .query_one(
                        "SELECT count(*) FILTER (WHERE wait_event_type = 'Lock'),
                                count(*) FILTER (WHERE state = 'active')
                         FROM pg_stat_activity
                         WHERE datname = current_database() AND pid <> pg_backend_pid()",
                        &[],
                    )
                    .await;
                if let Ok(row) = row {
                    samples += 1;
                    waiting += u64::from(row.get::<_, i64>(0) > 0);
                    active += row.get::<_, i64>(1);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let n = samples.max(1) as f64;
            (round3(waiting as f64 / n), round3(active as f64 / n))
        });
        Ok(Self { stop, task })
    }

    /// The share of samples with a backend waiting for a lock, and the mean of active backends.
    async fn finish(self) -> (f64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or((0.0, 0.0))
    }
}

/// Subscribers to every bench station, one stream each, recording for each decision of a
/// request `<prefix><n>` sent in the measured window the time from its intended send.
struct E2e {
    /// Microseconds.
    hist: Arc<Mutex<Histogram<u64>>>,
    received: Arc<AtomicU64>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl E2e {
    /// One stream per bench station, opened before the load starts.
    async fn open(url: &str) -> anyhow::Result<Vec<tonic::Streaming<SubscribeDecisionsResponse>>> {
        let channels = load::connect(url, 4).await?;
        let mut streams = Vec::new();
        for s in 0..STATIONS {
            let mut client = Client::new(channels[s % channels.len()].clone());
            let stream = client
                .subscribe_decisions(SubscribeDecisionsRequest {
                    station_ids: vec![station(s)],
                    after_cursor: String::new(),
                })
                .await?
                .into_inner();
            streams.push(stream);
        }
        Ok(streams)
    }

    /// Reads `streams`; `schedule` is the open loop's start, the start of its measured window
    /// and its rate.
    fn read(
        streams: Vec<tonic::Streaming<SubscribeDecisionsResponse>>,
        prefix: &'static str,
        (start, from, rate): (Instant, Instant, f64),
        stop: &Arc<AtomicBool>,
    ) -> Self {
        let hist = Arc::new(Mutex::new(load::histogram()));
        let received = Arc::new(AtomicU64::new(0));
        let mut readers = Vec::new();
        for mut stream in streams {
            let (hist, received, stop) = (hist.clone(), received.clone(), stop.clone());
            readers.push(tokio::spawn(async move {
                while let Some(Ok(item)) = stream.next().await {
                    if let Some(Event::Decision(d)) = item.event {
                        let now = Instant::now();
                        let i: u64 = d.request_id.trim_start_matches(prefix).parse().unwrap_or(0);
                        let due = load::intended(start, rate, i);
                        if due >= from {
                            received.fetch_add(1, Ordering::Relaxed);
                            let _ = hist
                                .lock()
                                .unwrap()
                                .record((now - due).as_micros().max(1) as u64);
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            }));
        }
        Self {
            hist,
            received,
            readers,
        }
    }
}

async fn seed_decisions(data: &std::path::Path, n: u64) -> anyhow::Result<i64> {
    let path = data.join("chargegate.db");
    let (db, _, _) = open_seed_store(data)?;
    db.close().await;
    drop(db);
    let day = 86_400_000_000i64;
    let start = (chargegate::decision::Micros::now().0 / day - 30) * day;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut conn = rusqlite::Connection::open(&path)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF;")?;
        let tx = conn.transaction()?;
        // Stations as the bench names them; times evenly over 30 days, in seq order.
        tx.execute(
            "WITH RECURSIVE i(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM i WHERE x + 1 < ?1)
             INSERT INTO decisions (request_id, station_id, token_fp, status, reason, authorizer,
                                    accepted_at_us, decided_at_us, processing_ms)
             SELECT 'seed-' || x,
                    printf('00000000-0000-4000-8000-%012d', (x * 7919) % 1000),
                    'fp', CASE x % 10 WHEN 0 THEN 'unknown' WHEN 1 THEN 'invalid' ELSE 'allowed' END,
                    CASE x % 10 WHEN 0 THEN 'timeout' WHEN 1 THEN 'token_format' ELSE 'granted' END,
                    'acl', ?2 + x * (30 * ?3 / ?1), ?2 + x * (30 * ?3 / ?1) + 1000, 1
             FROM i",
            rusqlite::params![n as i64, start, day],
        )?;
        tx.commit()?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        Ok(())
    })
    .await??;
    // The index by station catches up as the server's own thread does.
    let (db, _, _) = open_seed_store(data)?;
    chargegate::audit::AuditTrail::index_stations(&db).await?;
    db.close().await;
    Ok(start)
}

/// A fresh store in `data` as the bench's servers open it (same token key), its queue, and the
/// fingerprint of the bench's token.
fn open_seed_store(
    data: &std::path::Path,
) -> anyhow::Result<(
    chargegate::store::sqlite::Database,
    Arc<chargegate::queue::sqlite::SqliteQueue>,
    chargegate::token::Fingerprint,
)> {
    use chargegate::{
        fanout::Hub,
        queue::sqlite::SqliteQueue,
        store::sqlite::Database,
        token::{DriverToken, Fingerprinter},
    };
    std::fs::create_dir_all(data)?;
    let fingerprinter = Fingerprinter::new(TOKEN_KEY.as_bytes())?;
    let db = Database::open(
        &data.join("chargegate.db"),
        u64::MAX,
        Arc::new(Hub::new()),
        fingerprinter.derive_key(chargegate::audit::chain::KEY_PURPOSE),
    )?;
    let queue = Arc::new(SqliteQueue::new(db.clone(), Duration::from_secs(60)));
    Ok((
        db,
        queue,
        fingerprinter.fingerprint(&DriverToken::new(TOKEN)),
    ))
}

/// Writes `n` decided requests with a callback to `url` into a fresh store through the library,
/// so the store holds `n` pending deliveries and an empty queue.
async fn seed_deliveries(data: &std::path::Path, n: u64, url: &str) -> anyhow::Result<()> {
    use chargegate::{
        decision::{DecidedBy, Micros, NewDecision, Reason, Verdict},
        intake::NewRequest,
        queue::Queue,
        token::DriverToken,
    };
    let (db, queue, fingerprint) = open_seed_store(data)?;
    let mut in_flight = tokio::task::JoinSet::new();
    let mut settled = 0;
    let mut i = 0;
    while settled < n {
        while i < n && in_flight.len() < 4096 {
            let queue = queue.clone();
            let request = NewRequest {
                request_id: format!("w1-{i}"),
                station_id: station(i as usize % STATIONS),
                token: DriverToken::new(TOKEN),
                fingerprint: fingerprint.clone(),
                callback_url: Some(url.to_owned()),
                accepted_at: Micros::now(),
            };
            in_flight.spawn(async move { queue.enqueue(request).await.map(|_| ()) });
            i += 1;
        }
        while let Some(r) = in_flight.join_next().await {
            r??;
        }
        for claim in queue.claim(4096).await? {
            let decision = NewDecision {
                request_id: claim.request.request_id.clone(),
                station_id: claim.request.station_id.clone(),
                fingerprint: claim.request.fingerprint.clone(),
                verdict: Verdict::new(Reason::Granted, DecidedBy::Acl),
                accepted_at: claim.request.accepted_at,
                decided_at: Micros::now(),
                revision: 0,
            };
            in_flight.spawn(async move {
                claim
                    .ack(decision, false)
                    .await
                    .map(|_| ())
                    .map_err(|(_, e)| e)
            });
            settled += 1;
        }
        while let Some(r) = in_flight.join_next().await {
            r??;
        }
    }
    // The decisions were recorded before the round, so their index by station is current when
    // the server starts, as it would be: the round measures delivering, not indexing.
    chargegate::audit::AuditTrail::index_stations(&db).await?;
    db.close().await;
    Ok(())
}

/// The median of `values` (the upper one of an even count).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Opens `n` idle decision streams (100 per connection) and returns the server's RSS growth per stream.
async fn idle_streams_cost(server: &ServerProcess, n: usize) -> anyhow::Result<f64> {
    let channels = load::connect(&server.url, n.div_ceil(100)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss_bytes();
    let mut streams = Vec::with_capacity(n);
    let mut stations: HashMap<usize, String> = HashMap::new();
    for i in 0..n {
        let mut client = Client::new(channels[i / 100].clone());
        let station = stations
            .entry(i % 1000)
            .or_insert_with(|| station(i % 1000))
            .clone();
        let stream = client
            .subscribe_decisions(SubscribeDecisionsRequest {
                station_ids: vec![station],
                after_cursor: String::new(),
            })
            .await?
            .into_inner();
        streams.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = server.rss_bytes();
    drop(streams);
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// Writes `n` queued requests into a fresh store through the library, as Authorize would.
async fn seed_backlog(data: &std::path::Path, n: u64) -> anyhow::Result<()> {
    use chargegate::{decision::Micros, intake::NewRequest, queue::Queue, token::DriverToken};
    let (db, queue, fingerprint) = open_seed_store(data)?;
    let mut in_flight = tokio::task::JoinSet::new();
    for i in 0..n {
        if in_flight.len() >= 4096 {
            in_flight.join_next().await.expect("task")??;
        }
        let queue = queue.clone();
        let request = NewRequest {
            request_id: format!("backlog-{i}"),
            station_id: station(i as usize % STATIONS),
            token: DriverToken::new(TOKEN),
            fingerprint: fingerprint.clone(),
            callback_url: None,
            accepted_at: Micros::now(),
        };
        in_flight.spawn(async move {
            queue
                .enqueue(request)
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        });
    }
    while let Some(r) = in_flight.join_next().await {
        r??;
    }
    db.close().await;
    Ok(())
}

/// The work of draining, done directly with SQLite: per batch, read queued rows, record their
/// decisions, delete the rows, commit (WAL, synchronous=FULL, secure_delete). Returns rows/s.
fn raw_drain(path: &std::path::Path, batch: usize) -> anyhow::Result<f64> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA secure_delete=ON;",
    )?;
    let started = Instant::now();
    let mut drained = 0u64;
    loop {
        let tx = conn.transaction()?;
        let rows: Vec<(i64, String, String, String, i64)> = {
            let mut stmt = tx.prepare_cached(
                "SELECT q.seq, r.request_id, r.station_id, r.token_fp, r.accepted_at_us
                 FROM queue q JOIN requests r ON r.seq = q.seq ORDER BY q.seq LIMIT ?1",
            )?;
            stmt.query_map([batch as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?
        };
        if rows.is_empty() {
            break;
        }
        for (seq, request_id, station_id, fp, accepted) in &rows {
            tx.prepare_cached(
                "INSERT INTO decisions (request_id, station_id, token_fp, status, reason, authorizer,
                                        accepted_at_us, decided_at_us, processing_ms)
                 VALUES (?1, ?2, ?3, 'allowed', 'granted', 'acl', ?4, ?4, 0)
                 ON CONFLICT (request_id, revision) DO NOTHING RETURNING seq",
            )?
            .query_row(rusqlite::params![request_id, station_id, fp, accepted], |_| Ok(()))?;
            tx.prepare_cached("DELETE FROM queue WHERE seq = ?1")?
                .execute([seq])?;
        }
        tx.commit()?;
        drained += rows.len() as u64;
    }
    Ok(drained as f64 / started.elapsed().as_secs_f64())
}

/// A connection to the PostgreSQL server's admin database, driven by a task of its own.
async fn postgres_admin(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(3),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await??;
    tokio::spawn(connection);
    Ok(client)
}
