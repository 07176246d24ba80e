//! Health, reflection, shutdown and what is left on disk and in logs.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_then_not_serving_through_shutdown() {
    let dir = TestDir::new();
    let mut server = TestServer::start(dir.config()).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "chargegate.v1.ChargingAuthorization"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("check")
            .into_inner();
        assert_eq!(status.status(), ServingStatus::Serving, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest { service: "".into() })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    server.begin_shutdown();
    let next = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("a status change")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    let ended = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("the watch ends");
    assert!(
        ended.is_none_or(|r| r.is_err()),
        "the watch stream ends so the server can drain"
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;

    let mut v1_client =
        v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = v1_client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("a service list")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "chargegate.v1.ChargingAuthorization",
        "chargegate.v1.Grants",
        "chargegate.v1.Webhooks",
        "chargegate.v1.Audit",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }

    let mut alpha =
        v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "chargegate.v1.ChargingAuthorization".into(),
            ),
        ),
    };
    let mut responses = alpha
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("a file descriptor response")
    };
    assert!(!files.file_descriptor_proto.is_empty());
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plain_token_is_left_in_the_data_dir_after_a_clean_shutdown() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[], "").await;
    let tokens = [
        TOKEN_GRANTED,
        TOKEN_WILDCARD,
        TOKEN_EXPIRED,
        TOKEN_BLOCKED,
        TOKEN_UNKNOWN,
        "TOKEN-malformed!",
    ];
    for _ in 0..50 {
        for token in tokens {
            authorize(&mut client, STATION_A, token).await;
        }
    }
    next_decisions(&mut stream, 50 * tokens.len()).await;
    drop(stream);
    server.stop().await.expect("clean stop");
    for token in tokens {
        let hits = files_containing(&dir.data_dir(), token.as_bytes());
        assert!(hits.is_empty(), "{token} found in {hits:?}");
        // On PostgreSQL the rows are what is left (dead tuples wait for vacuum, see the README).
        if dir.database.is_some() {
            let kept = dir.sql_bool(
                "SELECT EXISTS (SELECT 1 FROM queue WHERE driver_token = $1)
                     OR EXISTS (SELECT 1 FROM deliveries WHERE driver_token = $1)
                     OR EXISTS (SELECT 1 FROM decisions d WHERE strpos(d::text, $1) > 0)
                     OR EXISTS (SELECT 1 FROM calls c WHERE strpos(c::text, $1) > 0)",
                &[crate::support::backend::Value::Text(token.to_owned())],
            );
            assert!(!kept, "{token} is in a row of the database");
        }
    }
    // The scan itself works: the access list (outside the data dir) does hold a token.
    assert!(!files_containing(&dir.path(), TOKEN_GRANTED.as_bytes()).is_empty());
}

/// The WAL's checkpoint sequence number (its header, bytes 12–15): SQLite adds one each time
/// the WAL starts over from its beginning.
fn wal_restarts(wal: &std::path::Path) -> Option<u32> {
    let header = std::fs::read(wal).ok()?;
    Some(u32::from_be_bytes(header.get(12..16)?.try_into().ok()?))
}

/// Clients calling `Authorize` back to back, each on its own connection, until [`Load::stop`].
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(server: &TestServer, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::with_capacity(clients);
        for _ in 0..clients {
            let (mut client, stop) = (server.client().await, stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
                }
            }));
        }
        Self {
            stop,
            clients: tasks,
        }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.expect("load client");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_steady_load_the_wal_is_checkpointed_and_starts_over() {
    if crate::support::backend::sqlite_only("the SQLite WAL") {
        return;
    }
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let wal = dir.data_dir().join("chargegate.db-wal");
    let load = Load::start(&server, 16).await;
    // With writes never pausing, the checkpoint thread never copies the WAL to its very end on
    // its own; the writer copies the rest, or the WAL would only grow.
    let first = loop {
        if let Some(n) = wal_restarts(&wal) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let deadline = Instant::now() + 6 * PATIENCE;
    while wal_restarts(&wal).unwrap_or(first) < first + 3 {
        assert!(
            Instant::now() < deadline,
            "the WAL did not start over three times under load"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load.stop().await;
    // 4,000 pages between checkpoints, and what was committed while they ran.
    let size = std::fs::metadata(&wal).expect("WAL").len();
    assert!(size < 3 * 4000 * 4096, "the WAL grew to {size} bytes");
    server.stop().await.expect("clean stop");
    assert_eq!(
        std::fs::metadata(&wal).map_or(0, |m| m.len()),
        0,
        "truncated at shutdown"
    );
}

/// A WAL that grew past its size limit (an outside reader held it, so it could not start over) is
/// cut back to the limit once it starts over, instead of keeping its size until shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_that_grew_past_its_limit_is_cut_back_when_it_starts_over() {
    if crate::support::backend::sqlite_only("the SQLite WAL") {
        return;
    }
    const LIMIT: u64 = 64 * 1024 * 1024;
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let wal = dir.data_dir().join("chargegate.db-wal");
    let size = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    authorize(&mut server.client().await, STATION_A, TOKEN_GRANTED).await;
    // The reader's snapshot keeps every page committed after it in the WAL.
    let reader = rusqlite::Connection::open(dir.data_dir().join("chargegate.db")).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM decisions", [], |r| r.get(0))
        .unwrap();
    let load = Load::start(&server, 16).await;
    poll_until(
        "a WAL past its limit",
        || async { size() },
        |&bytes| bytes > LIMIT + LIMIT / 8,
    )
    .await;
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    poll_until(
        "the WAL cut back",
        || async { size() },
        |&bytes| bytes <= LIMIT,
    )
    .await;
    load.stop().await;
    server.stop().await.expect("clean stop");
}

/// The store's background threads (checkpoints, the station index) yield to the runtime and the
/// writer: a lower priority (nice) of their own, where threads have one.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stores_background_threads_run_at_a_lower_priority() {
    if crate::support::backend::sqlite_only("the SQLite store's background threads") {
        return;
    }
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    // Every server in this test process has these threads; each one is checked. The process
    // itself may run under `nice` (as `nice -n 10 cargo test` does): the background threads are
    // lowered by 10 from where the runtime's threads are, as far as the kernel's 19 allows.
    let nice_of = |stat: &str| -> i64 {
        // Fields after the command's closing parenthesis; nice is the 19th field in all.
        let (_, rest) = stat.rsplit_once(')').expect("a stat line");
        rest.split_whitespace().nth(16).unwrap().parse().unwrap()
    };
    let niceness = |name: &str| -> Vec<i64> {
        let mut found = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").expect("tasks") {
            let task = task.expect("task").path();
            let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            if comm.trim() == name {
                let stat = std::fs::read_to_string(task.join("stat")).unwrap_or_default();
                if !stat.is_empty() {
                    found.push(nice_of(&stat));
                }
            }
        }
        found
    };
    let runtime = nice_of(&std::fs::read_to_string("/proc/thread-self/stat").expect("own stat"));
    let background = (runtime + 10).min(19);
    // A thread of another test's server may have just started and not lowered itself yet.
    let lowered = |name: &str| {
        let found = niceness(name);
        !found.is_empty() && found.iter().all(|&n| n == background)
    };
    let deadline = Instant::now() + PATIENCE;
    while !lowered("sqlite-checkpoi") || !lowered("sqlite-stations") {
        assert!(
            Instant::now() < deadline,
            "runtime at {runtime}: checkpoints {:?}, station index {:?}",
            niceness("sqlite-checkpoi"),
            niceness("sqlite-stations")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let writers = niceness("sqlite-writer");
    assert!(
        !writers.is_empty() && writers.iter().all(|&n| n == runtime),
        "the writer runs beside the runtime (at {runtime}): {writers:?}"
    );
    server.stop().await.expect("clean stop");
}

#[test]
fn bad_configuration_exits_64_naming_the_key_or_line() {
    let dir = TestDir::new();
    let run = |args: &[&str]| {
        let out = crate::support::binary::chargegate()
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .expect("run chargegate");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--workers", "zero", "--metrics-listen", "off"]);
    assert_eq!(code, Some(64));
    assert!(err.contains("workers"), "{err}");

    let acl = dir.write_acl(&format!(
        "station_id,driver_token\n{STATION_A},{TOKEN_GRANTED}\n*,short-SECRET\n"
    ));
    let data = dir.data_dir();
    let (code, err) = run(&[
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
        "--data-dir",
        data.to_str().unwrap(),
        "--acl-file",
        acl.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(
        !err.contains("SECRET") && !err.contains(TOKEN_GRANTED),
        "{err}"
    );
}

/// `chargegate --version` names the version and the commit it was built from, and the server logs
/// both when it starts.
#[test]
fn the_version_and_commit_are_printed_and_logged_at_start() {
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success());
    let commit = git.map_or("unknown".to_owned(), |out| {
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    });
    let out = crate::support::binary::chargegate()
        .arg("--version")
        .output()
        .expect("run chargegate");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("chargegate {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );

    let dir = TestDir::new();
    let acl = dir.write_acl("station_id,driver_token\n");
    let child = crate::support::binary::ChildServer::start(&dir, &acl, &[]);
    let log = child.start_log.join("\n");
    let starting = log
        .lines()
        .find(|line| line.contains("chargegate starting"))
        .unwrap_or_else(|| panic!("no start line in:\n{log}"));
    assert!(
        starting.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            || starting.contains(&format!("version={}", env!("CARGO_PKG_VERSION"))),
        "{starting}"
    );
    assert!(starting.contains(&commit), "{starting}");
}

/// The first scrape of a fresh server has every metric of CONTRACT §9, each with a `# HELP` line
/// that names its unit, at 0: alerts on them work before anything has happened.
#[test]
fn a_fresh_server_exports_every_metric_at_zero_with_its_help() {
    let dir = TestDir::new();
    let acl = dir.write_acl("station_id,driver_token\n");
    let child = crate::support::binary::ChildServer::start_with_metrics(&dir, &acl, &[]);
    let text = child.scrape_metrics();
    // CONTRACT §9, and a series of each that an alert would name.
    let expected: &[(&str, &str)] = &[
        (
            "chargegate_requests_total",
            "chargegate_requests_total{outcome=\"accepted\"} 0",
        ),
        (
            "chargegate_requests_total",
            "chargegate_requests_total{outcome=\"queue_full\"} 0",
        ),
        (
            "chargegate_decisions_total",
            "chargegate_decisions_total{status=\"allowed\"} 0",
        ),
        (
            "chargegate_decisions_total",
            "chargegate_decisions_total{status=\"not_allowed\"} 0",
        ),
        (
            "chargegate_decisions_total",
            "chargegate_decisions_total{status=\"unknown\"} 0",
        ),
        (
            "chargegate_decisions_total",
            "chargegate_decisions_total{status=\"invalid\"} 0",
        ),
        (
            "chargegate_authorization_duration_seconds",
            "chargegate_authorization_duration_seconds_count 0",
        ),
        (
            "chargegate_decision_latency_seconds",
            "chargegate_decision_latency_seconds_count 0",
        ),
        ("chargegate_queue_depth", "chargegate_queue_depth 0"),
        ("chargegate_subscribers", "chargegate_subscribers 0"),
        (
            "chargegate_webhook_deliveries_total",
            "chargegate_webhook_deliveries_total{outcome=\"delivered\"} 0",
        ),
        (
            "chargegate_webhook_deliveries_total",
            "chargegate_webhook_deliveries_total{outcome=\"dead\"} 0",
        ),
        (
            "chargegate_audit_records_total",
            "chargegate_audit_records_total 0",
        ),
        (
            "chargegate_authorizer_circuit_state",
            "chargegate_authorizer_circuit_state 0",
        ),
        (
            "chargegate_grpc_requests_total",
            "chargegate_grpc_requests_total{method=\"/chargegate.v1.ChargingAuthorization/Authorize\",code=\"OK\"} 0",
        ),
    ];
    let lines: Vec<&str> = text.lines().collect();
    for (name, series) in expected {
        let help = lines
            .iter()
            .find(|l| l.starts_with(&format!("# HELP {name} ")))
            .unwrap_or_else(|| panic!("no HELP for {name} in:\n{text}"));
        assert!(
            help.trim_end_matches('.').ends_with(')') && help.contains(" ("),
            "the HELP line names its unit: {help}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("# TYPE {name} "))),
            "no TYPE for {name}"
        );
        assert!(lines.contains(series), "no `{series}` in:\n{text}");
    }
    // Every metric exported has its HELP line, not only those of the contract.
    for line in lines
        .iter()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| text.contains(&format!("# TYPE {base} histogram")))
            .unwrap_or(name);
        assert!(
            text.contains(&format!("# HELP {base} ")),
            "{base} has no HELP line"
        );
    }
}

/// `chargegate_backend_up{backend}` is 1 for the system the store lives on once the first probe
/// answered, and has no series for a backend not in use.
#[test]
fn metrics_say_which_backend_is_up() {
    let dir = TestDir::new();
    let acl = dir.write_acl("station_id,driver_token\n");
    let child = crate::support::binary::ChildServer::start_with_metrics(&dir, &acl, &[]);
    let (used, unused) = match crate::support::backend::on_postgres() {
        true => ("postgres", "sqlite"),
        false => ("sqlite", "postgres"),
    };
    let up = format!("chargegate_backend_up{{backend=\"{used}\"}} 1");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = child.scrape_metrics();
        if text.lines().any(|l| l == up) || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(text.lines().any(|l| l == up), "no `{up}` in:\n{text}");
    assert!(
        text.contains("# HELP chargegate_backend_up "),
        "no HELP line for chargegate_backend_up"
    );
    assert!(
        !text.contains(&format!("backend=\"{unused}\"")),
        "a series for {unused}, not in use:\n{text}"
    );
}

/// `chargegate config defaults` prints the defaults file as shipped, and `config check` resolves
/// flags, environment and file as `serve` does, exiting 64 on a bad value.
#[test]
fn config_defaults_and_check_speak_for_the_settings_list() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = crate::support::binary::chargegate()
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("run chargegate");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.default.toml"),
    )
    .unwrap();
    let (code, defaults, _) = run(&["config", "defaults"], &[]);
    assert_eq!(code, Some(0));
    assert_eq!(defaults, shipped);

    let dir = TestDir::new();
    let file = dir.path().join("defaults.toml");
    std::fs::write(&file, &defaults).unwrap();
    let file = file.to_str().unwrap();
    let (code, resolved, err) = run(&["config", "check", "--config", file], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(resolved.contains("workers: 64"), "{resolved}");
    // Each source in its place: a flag over the environment over the file.
    let (code, resolved, _) = run(
        &["config", "check", "--config", file, "--workers", "8"],
        &[("CHARGEGATE_WORKERS", "16")],
    );
    assert_eq!(code, Some(0));
    assert!(resolved.contains("workers: 8,"), "{resolved}");
    let (code, resolved, _) = run(
        &["config", "check", "--config", file],
        &[("CHARGEGATE_WORKERS", "16")],
    );
    assert_eq!(code, Some(0));
    assert!(resolved.contains("workers: 16,"), "{resolved}");
    let (code, _, err) = run(
        &["config", "check"],
        &[("CHARGEGATE_HEARTBEAT_INTERVAL_MS", "1")],
    );
    assert_eq!(code, Some(64));
    assert!(
        err.contains("heartbeat_interval_ms") && err.contains("between 10 and"),
        "{err}"
    );
}

/// While the store cannot commit (here: an outside connection holds SQLite's write lock, as a
/// backup tool or an operator's shell might), Authorize answers UNAVAILABLE — never OK for a request
/// that is not durable — and health is NOT_SERVING until the store answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_commit_is_unavailable_and_not_serving() {
    if crate::support::backend::sqlite_only(
        "an outside writer holding the SQLite write lock; scaleout restarts PostgreSQL instead",
    ) {
        return;
    }
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut health = HealthClient::new(server.channel().await);
    authorize(&mut client, STATION_A, TOKEN_GRANTED).await;

    let db = dir.data_dir().join("chargegate.db");
    let blocker = rusqlite::Connection::open(&db).expect("open the store from outside");
    blocker
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");

    let mut req = request(STATION_A, TOKEN_GRANTED);
    req.request_id = "while-blocked".into();
    let status = client.authorize(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(!status.message().contains(TOKEN_GRANTED));
    let mut watch = health
        .watch(HealthCheckRequest { service: "".into() })
        .await
        .unwrap()
        .into_inner();
    let mut saw = Vec::new();
    while saw.last() != Some(&ServingStatus::NotServing) {
        let next = tokio::time::timeout(PATIENCE, watch.next())
            .await
            .expect("health turns NOT_SERVING");
        saw.push(next.unwrap().unwrap().status());
    }

    blocker
        .execute_batch("ROLLBACK")
        .expect("release the write lock");
    while saw.last() != Some(&ServingStatus::Serving) {
        let next = tokio::time::timeout(PATIENCE, watch.next())
            .await
            .expect("health turns SERVING again");
        saw.push(next.unwrap().unwrap().status());
    }
    let missing = client
        .get_decision(chargegate::proto::GetDecisionRequest {
            request_id: "while-blocked".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        missing.code(),
        tonic::Code::NotFound,
        "the refused request was not enqueued"
    );
    authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    drop(blocker);
    server.stop().await.expect("clean stop");
}

/// The client subcommands against a running server: `authorize --wait` prints the decision,
/// `watch` prints decisions as they come, `get` prints one request's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_authorizes_watches_and_gets() {
    use std::io::BufRead;
    let dir = TestDir::new();
    let mut config = dir.config();
    config.heartbeat_interval = std::time::Duration::from_millis(100);
    let server = TestServer::start(config).await;
    let url = server.url();
    let mut watch = crate::support::binary::chargegate()
        .args([
            "watch",
            "--heartbeats",
            "--server",
            &url,
            "--station",
            STATION_A,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("watch");
    let watch_out = watch.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(watch_out)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    // The first heartbeat shows the watcher is subscribed.
    let first: serde_json::Value =
        serde_json::from_str(&lines_rx.recv_timeout(PATIENCE).expect("a heartbeat")).unwrap();
    assert!(first.get("heartbeat").is_some(), "{first}");

    let out = tokio::process::Command::from(crate::support::binary::chargegate())
        .args([
            "authorize",
            "--server",
            &url,
            "--station",
            STATION_A,
            "--wait",
        ])
        .env("CHARGEGATE_DRIVER_TOKEN", TOKEN_GRANTED)
        .output()
        .await
        .expect("authorize");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["status"], "accepted");
    assert_eq!(lines[1]["status"], "allowed");
    assert_eq!(lines[1]["reason"], "granted");
    assert!(
        !stdout.contains(TOKEN_GRANTED),
        "the CLI never prints the token"
    );
    let request_id = lines[0]["request_id"].as_str().unwrap().to_owned();

    let watched: serde_json::Value = loop {
        let line: serde_json::Value = serde_json::from_str(
            &lines_rx
                .recv_timeout(PATIENCE)
                .expect("watch prints the decision"),
        )
        .unwrap();
        if line.get("heartbeat").is_none() {
            break line;
        }
    };
    assert_eq!(watched["request_id"], request_id.as_str());
    let _ = watch.kill();
    let _ = watch.wait();

    let out = tokio::process::Command::from(crate::support::binary::chargegate())
        .args(["get", "--server", &url, &request_id])
        .output()
        .await
        .unwrap();
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["status"], "allowed");

    let out = tokio::process::Command::from(crate::support::binary::chargegate())
        .args([
            "authorize",
            "--server",
            &url,
            "--station",
            "not-a-uuid",
            "--driver-token",
            "x",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"));
    server.stop().await.expect("clean stop");
}

/// SIGHUP reloads the access list even when the file looks unchanged to the poller (same size,
/// inode and modification time).
#[test]
fn sighup_reloads_the_access_list() {
    let dir = TestDir::new();
    // Two lists of the same length: the second grants TOKEN_UNKNOWN instead of TOKEN_GRANTED.
    let first = format!("station_id,driver_token\n{STATION_A},{TOKEN_GRANTED}\n");
    let second = format!("station_id,driver_token\n{STATION_A},{TOKEN_UNKNOWN}\n");
    assert_eq!(first.len(), second.len());
    let acl = dir.write_acl(&first);
    let child = crate::support::binary::ChildServer::start(&dir, &acl, &[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let decide = |token: &'static str| {
        let url = child.url();
        runtime.block_on(async move {
            let mut client =
                chargegate::proto::charging_authorization_client::ChargingAuthorizationClient::connect(url).await.unwrap();
            let ack = authorize(&mut client, STATION_A, token).await;
            loop {
                let d = client
                    .get_decision(chargegate::proto::GetDecisionRequest { request_id: ack.request_id.clone() })
                    .await
                    .unwrap()
                    .into_inner()
                    .decision
                    .unwrap();
                if d.status() != chargegate::proto::DecisionStatus::Pending {
                    return d.reason;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
    };
    assert_eq!(decide(TOKEN_UNKNOWN), "no_grant");

    // Rewrite in place (same inode and size) and put the modification time back.
    let modified = std::fs::metadata(&acl).unwrap().modified().unwrap();
    std::fs::write(&acl, &second).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&acl)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    // A negative check, so it has to let time pass: the poller (every second) has run at least
    // twice and still sees no change.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(
        decide(TOKEN_UNKNOWN),
        "no_grant",
        "the poller cannot see this change"
    );

    child.signal("HUP");
    let deadline = std::time::Instant::now() + PATIENCE;
    while decide(TOKEN_UNKNOWN) != "granted" {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload the access list"
        );
    }
    assert_eq!(decide(TOKEN_GRANTED), "no_grant");
}

/// The backup the README describes — `VACUUM INTO` from an outside connection while the server
/// serves — holds every decision committed before it; restored alone into a fresh data dir (the
/// station index is rebuilt), it serves them again, knows nothing of what came after, and
/// verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_serving_restores_and_verifies() {
    if crate::support::backend::sqlite_only(
        "VACUUM INTO backs up the SQLite file; PostgreSQL is backed up with its own tools",
    ) {
        return;
    }
    use chargegate::proto::GetDecisionRequest;
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut before = Vec::new();
    for token in [TOKEN_GRANTED, TOKEN_UNKNOWN, TOKEN_BLOCKED] {
        before.push(authorize(&mut client, STATION_A, token).await.request_id);
    }
    let backup = dir.path().join("backup.db");
    rusqlite::Connection::open(dir.data_dir().join("chargegate.db"))
        .expect("open the store from outside")
        .execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
        .expect("VACUUM INTO");
    let after = authorize(&mut client, STATION_A, TOKEN_GRANTED)
        .await
        .request_id;
    server.stop().await.expect("clean stop");

    let restored = TestDir::new();
    std::fs::create_dir_all(restored.data_dir()).unwrap();
    std::fs::copy(&backup, restored.data_dir().join("chargegate.db")).unwrap();
    let server = TestServer::start(restored.config()).await;
    let mut client = server.client().await;
    let mut reasons = Vec::new();
    for request_id in &before {
        let d = client
            .get_decision(GetDecisionRequest {
                request_id: request_id.clone(),
            })
            .await
            .expect("a decision from before the backup")
            .into_inner()
            .decision
            .unwrap();
        reasons.push(d.reason);
    }
    assert_eq!(reasons, ["granted", "no_grant", "blocked"]);
    let missing = client
        .get_decision(GetDecisionRequest { request_id: after })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // The restored log takes new decisions, and a query by station sees old and new alike.
    let new = authorize(&mut client, STATION_A, TOKEN_GRANTED)
        .await
        .request_id;
    let mut audit = chargegate::proto::audit_client::AuditClient::new(server.channel().await);
    let mut listed = Vec::new();
    let mut stream = audit
        .query_decisions(chargegate::proto::QueryDecisionsRequest {
            station_id: STATION_A.into(),
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner();
    while let Some(d) = stream.next().await {
        listed.push(d.expect("a decision").request_id);
    }
    let mut expected = before.clone();
    expected.push(new);
    assert_eq!(listed, expected);
    server.stop().await.expect("clean stop");

    let verify = crate::support::binary::chargegate()
        .args(["audit", "verify", "--token-hash-key", "test-token-hash-key"])
        .arg("--data-dir")
        .arg(restored.data_dir())
        .output()
        .expect("run verify");
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success() && said.contains("intact: 4 decisions"),
        "{said}"
    );
}
