//! `chargegate-bench`: holds chargegate against the bare-metal limits of this machine, side by
//! side in one run. See bench/README.md for the method and what each scenario measures.

mod archive;
mod authorizer;
mod echo;
mod load;
mod plot;
mod procs;
mod revisions;
mod scenarios;
mod security;
mod webhook;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "chargegate-bench",
    about = "Benchmark chargegate against a bare tonic server and raw SQLite"
)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Every scenario for a few seconds with smaller sizes (smoke runs, CI).
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (g1, g1b, g2 … g8, g8c, a1, w1, u1, p1, p2, p4, r1, r2, r3; and p1d when named); repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    scenario: Vec<String>,
    /// Where to write the JSON results; the PNG plot goes next to it.
    #[arg(long, default_value = "bench/results.json")]
    json: PathBuf,
    /// Benchmark a running deployment instead of starting chargegate (memory figures are skipped).
    #[arg(long)]
    target: Option<String>,
    /// The chargegate binary to start [default: the `chargegate` next to this binary].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// An extra argument for every chargegate the bench starts, to compare a setting side by
    /// side (`--server-arg=--audit-calls=false`); repeat for more.
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// A PostgreSQL server whose user may create databases, for p1, p2, p4 and r2.
    #[arg(
        long,
        env = "CHARGEGATE_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    /// A Redis server for r1, r2 and r3 (each run's keys are its fresh database's).
    #[arg(
        long,
        env = "CHARGEGATE_BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/0"
    )]
    redis_url: String,
}

#[derive(Subcommand)]
enum Mode {
    /// (internal) Serve the bare echo reference.
    EchoServer {
        /// Commit each call to a SQLite file in this directory before answering (the durable floor).
        #[arg(long)]
        durable: Option<std::path::PathBuf>,
        /// Commit each call to this PostgreSQL database before answering (its durable floor).
        #[arg(long)]
        durable_postgres: Option<String>,
        /// The driver the PostgreSQL floor commits through.
        #[arg(long, value_enum, default_value = "tokio-postgres")]
        driver: echo::Driver,
        /// How the PostgreSQL floor commits a group of calls.
        #[arg(long, value_enum, default_value = "row")]
        shape: echo::Shape,
    },
    /// (internal) Serve a fast remote authorizer with an optional slow tail.
    AuthorizerServer {
        #[arg(long, default_value_t = 0)]
        slow_percent: u64,
        #[arg(long, default_value_t = 50)]
        slow_ms: u64,
        /// Hold every answer while this file exists (r3 builds its backlog so).
        #[arg(long)]
        hold_while: Option<std::path::PathBuf>,
        /// Answer 503 while this file exists (v1's outage).
        #[arg(long)]
        fail_while: Option<std::path::PathBuf>,
    },
    /// (internal) Post webhook bodies with chargegate's HTTP client settings, then exit.
    PostClient {
        #[arg(long)]
        url: String,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        concurrency: usize,
    },
}

const ALL: [&str; 23] = [
    "g1", "g1b", "g2", "g3", "g4", "g5", "g6", "g7", "g8", "g8c", "a1", "w1", "u1", "p1", "p2",
    "p4", "r1", "r2", "r3", "t1", "t2", "x1", "v1",
];
/// Scenarios run only when named.
const BY_NAME: [&str; 1] = ["p1d"];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.mode {
        Some(Mode::EchoServer {
            durable,
            durable_postgres,
            driver,
            shape,
        }) => {
            return echo::serve(
                durable.as_deref(),
                durable_postgres.as_deref(),
                driver,
                shape,
            );
        }
        Some(Mode::AuthorizerServer {
            slow_percent,
            slow_ms,
            hold_while,
            fail_while,
        }) => return authorizer::serve(slow_percent, slow_ms, hold_while, fail_while),
        Some(Mode::PostClient {
            url,
            count,
            concurrency,
        }) => return webhook::post_client(url, count, concurrency),
        None => {}
    }
    let server_bin = args
        .server_bin
        .clone()
        .unwrap_or_else(procs::default_server_bin);
    if args.target.is_none() && !server_bin.exists() {
        anyhow::bail!(
            "{} not found: build it with `cargo build --release` or pass --server-bin",
            server_bin.display()
        );
    }
    let selected: Vec<String> = if args.scenario.is_empty() {
        ALL.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenario.clone()
    };
    for s in &selected {
        anyhow::ensure!(
            ALL.contains(&s.as_str()) || BY_NAME.contains(&s.as_str()),
            "unknown scenario {s}; expected one of {}, {}",
            ALL.join(", "),
            BY_NAME.join(", ")
        );
    }
    let machine = procs::machine(&std::env::temp_dir());
    // The load generator on core 0, each server on core 1 (where there are two).
    let server_core = (procs::cores() >= 2).then_some(1);
    if server_core.is_some() {
        procs::pin_self(0);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut bench = scenarios::Bench::new(
            args.quick,
            server_bin,
            args.target.clone(),
            server_core,
            args.server_arg.clone(),
            args.postgres_url.clone(),
            args.redis_url.clone(),
        )?;
        println!("machine: {machine}");
        for s in &selected {
            let started = std::time::Instant::now();
            let result = match s.as_str() {
                "g1" => bench.g1("g1", 200).await,
                "g1b" => bench.g1("g1b", 50).await,
                "g2" => bench.g2().await,
                "g3" => bench.g3().await,
                "g4" => bench.g4().await,
                "g5" => bench.g5().await,
                "g6" => bench.g6().await,
                "g7" => bench.g7().await,
                "g8" => bench.g8().await,
                "g8c" => bench.g1("g8c", scenarios::G8_IN_FLIGHT).await,
                "a1" => bench.a1().await,
                "w1" => bench.w1().await,
                "u1" => bench.u1().await,
                "p1" | "p2" | "p4" | "p1d" if !bench.postgres_answers().await => {
                    println!("{s}: skipped: PostgreSQL does not answer at --postgres-url");
                    Ok(())
                }
                "p1" => bench.p1().await,
                "p2" => bench.p2().await,
                "p4" => bench.p4().await,
                "p1d" => bench.p1d().await,
                "r1" => bench.r1().await,
                "r2" | "r3" if !bench.postgres_answers().await || !bench.redis_answers().await => {
                    println!("{s}: skipped: PostgreSQL or Redis does not answer");
                    Ok(())
                }
                "r2" => bench.r2().await,
                "r3" => bench.r3().await,
                "t1" => bench.t1().await,
                "t2" => bench.t2().await,
                "x1" => bench.x1().await,
                "v1" => bench.v1().await,
                _ => unreachable!("checked above"),
            };
            if let Err(e) = result {
                anyhow::bail!("scenario {s} failed: {e:#}");
            }
            eprintln!("({s} took {:.0}s)", started.elapsed().as_secs_f64());
        }
        bench.results.insert("machine".into(), machine);
        bench.results.insert("quick".into(), args.quick.into());
        if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&args.json, serde_json::to_string_pretty(&bench.results)?)?;
        println!("results: {}", args.json.display());
        if !bench.plots.series.is_empty() {
            let png = args.json.with_extension("png");
            plot::latency_png(
                &png,
                "chargegate latency vs bare tonic echo",
                &bench.plots.series,
            )?;
            println!("plot: {}", png.display());
        }
        Ok(())
    })
}
