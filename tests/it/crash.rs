//! Exactly-once decisions across `kill -9`, and nothing lost across SIGTERM under load: the real
//! binary as a child process, many concurrent clients, a signal at a random moment, a restart on
//! the same data dir, then a replay of the decision log from a cursor taken before the load.
//! With the access list every request is decided in the commit that acknowledges it; with a remote
//! authorizer requests wait in the queue, so a kill also leaves queued and half-decided work.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use chargegate::proto::{
    DecisionStatus, GetDecisionRequest, charging_authorization_client::ChargingAuthorizationClient,
    subscribe_decisions_response::Event,
};
use rand::Rng;
use tonic::transport::Channel;

use crate::support::{
    binary::ChildServer,
    fake_authorizer::{Behaviour, FakeAuthorizer},
    *,
};

const CLIENTS: usize = 16;

/// Sends Authorize from `CLIENTS` tasks until `stop`; returns the request_ids acknowledged OK.
async fn drive_load(url: String, round: usize, stop: Arc<AtomicBool>) -> Vec<String> {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let counter = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (url, acked, counter, stop) =
            (url.clone(), acked.clone(), counter.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(mut client) = ChargingAuthorizationClient::connect(url).await else {
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let mut req = request(
                    STATION_A,
                    if n % 3 == 0 {
                        TOKEN_UNKNOWN
                    } else {
                        TOKEN_GRANTED
                    },
                );
                req.request_id = format!("crash-r{round}-c{c}-{n}");
                match client.authorize(req).await {
                    Ok(ack) => acked.lock().unwrap().push(ack.into_inner().request_id),
                    Err(_) => break,
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Arc::try_unwrap(acked).unwrap().into_inner().unwrap()
}

/// A remote authorizer that allows every token after a few milliseconds: requests stay queued
/// and decisions in flight long enough for a crash to catch some.
fn allowing_authorizer(runtime: &tokio::runtime::Runtime) -> FakeAuthorizer {
    runtime.block_on(FakeAuthorizer::start(Behaviour::Slow(
        Duration::from_millis(5),
        r#"{"allowed": "ALLOWED"}"#.into(),
    )))
}

async fn connect(url: &str) -> ChargingAuthorizationClient<Channel> {
    ChargingAuthorizationClient::connect(url.to_owned())
        .await
        .expect("connect")
}

/// Waits until `id` is decided and returns its cursor.
async fn decided_cursor(client: &mut ChargingAuthorizationClient<Channel>, id: &str) -> String {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let d = client
            .get_decision(GetDecisionRequest {
                request_id: id.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("{id} is known: {s}"))
            .into_inner()
            .decision
            .unwrap();
        if d.status() != DecisionStatus::Pending {
            return d.cursor;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} was never decided"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every decision after `cursor`, read until the stream goes idle (its first heartbeat).
async fn replay_all(
    client: &mut ChargingAuthorizationClient<Channel>,
    cursor: &str,
) -> Vec<String> {
    let mut stream = subscribe(client, &[], cursor).await;
    let mut ids = Vec::new();
    loop {
        let item = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("replay")
            .unwrap()
            .unwrap();
        match item.event {
            Some(Event::Decision(d)) => ids.push(entry_id(&d)),
            Some(Event::Heartbeat(_)) => return ids,
            None => {}
        }
    }
}

/// Reads `watched` (a live subscription opened before the load) until every acknowledged
/// request has been seen, in log order; asserts each was seen exactly once.
async fn assert_watched_exactly_once(
    mut watched: tonic::Streaming<chargegate::proto::SubscribeDecisionsResponse>,
    acked: &[String],
) {
    let wanted: HashSet<&str> = acked.iter().map(|s| s.as_str()).collect();
    let (mut ids, mut last, mut left) = (Vec::new(), 0, wanted.len());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while left > 0 {
        let item = tokio::time::timeout_at(deadline, watched.message())
            .await
            .expect("every decision reaches the subscriber")
            .unwrap()
            .unwrap();
        if let Some(Event::Decision(d)) = item.event {
            let position = chargegate::cursor::Cursor::decode(&d.cursor)
                .unwrap()
                .position;
            assert!(position > last, "in log order");
            last = position;
            left -= usize::from(d.revision == 0 && wanted.contains(d.request_id.as_str()));
            ids.push(entry_id(&d));
        }
    }
    assert_exactly_once(acked, &ids);
}

/// A log entry's identity: the request_id, and for a revision (an UNKNOWN decision asked again
/// after a restart) `<request_id>.r<n>`, so that a request and its one revision each count once.
fn entry_id(d: &chargegate::proto::Decision) -> String {
    chargegate::webhook::webhook_id(&d.request_id, d.revision)
}

/// Asserts that every acknowledged request appears exactly once in the replayed log.
fn assert_exactly_once(acked: &[String], replayed: &[String]) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in replayed {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "decided more than once: {twice:?}");
    let missing: Vec<_> = acked
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged but never decided, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    assert_eq!(acked.iter().collect::<HashSet<_>>().len(), acked.len());
}

/// Starts the binary and records one decision; returns the server and that decision's cursor,
/// from which the log is replayed at the end.
fn start_with_cursor(
    dir: &TestDir,
    extra: &[&str],
    runtime: &tokio::runtime::Runtime,
) -> (ChildServer, String) {
    let child = start(dir, extra);
    let cursor = runtime.block_on(async {
        let mut client = connect(&child.url()).await;
        let ack = authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
        decided_cursor(&mut client, &ack.request_id).await
    });
    (child, cursor)
}

/// Waits for every acknowledged request's decision, then replays the log from `before`.
async fn verify_exactly_once(url: &str, acked: &[String], before: &str) {
    let mut client = connect(url).await;
    for id in acked {
        decided_cursor(&mut client, id).await;
    }
    let replayed = replay_all(&mut client, before).await;
    assert_exactly_once(acked, &replayed);
}

fn start(dir: &TestDir, extra: &[&str]) -> ChildServer {
    let acl = dir.write_acl(&standard_acl());
    let mut args = vec!["--heartbeat-interval-ms", "300"];
    args.extend_from_slice(extra);
    ChildServer::start(dir, &acl, &args)
}

#[test]
fn kill_9_at_random_moments_never_loses_or_repeats_a_decision() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    kill_9_rounds(&runtime, &[]);
}

#[test]
fn kill_9_with_requests_queued_for_a_remote_authorizer_never_loses_or_repeats_a_decision() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // A few milliseconds per answer keeps requests queued and decisions in flight at every kill.
    let authorizer = allowing_authorizer(&runtime);
    let url = authorizer.url().to_string();
    kill_9_rounds(
        &runtime,
        &["--authorizer", "http", "--authorizer-url", &url],
    );
    assert!(authorizer.calls() > 0, "the remote authorizer decided");
}

/// Load, `kill -9` at a random moment and a restart, four times; then every acknowledged request
/// must be in the decision log exactly once.
fn kill_9_rounds(runtime: &tokio::runtime::Runtime, extra: &[&str]) {
    const ROUNDS: usize = 4;
    let dir = TestDir::new();
    let (mut child, before) = start_with_cursor(&dir, extra, runtime);

    let mut acked = Vec::new();
    let mut rng = rand::rng();
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let load = runtime.spawn(drive_load(child.url(), round, stop.clone()));
        std::thread::sleep(Duration::from_millis(rng.random_range(150..900)));
        child.signal("KILL");
        child.wait(PATIENCE);
        stop.store(true, Ordering::Relaxed);
        let round_acked = runtime.block_on(load).unwrap();
        assert!(
            !round_acked.is_empty(),
            "round {round} acknowledged nothing before the kill"
        );
        acked.extend(round_acked);
        drop(child);
        child = start(&dir, extra);
    }

    runtime.block_on(verify_exactly_once(&child.url(), &acked, &before));
}

#[test]
fn sigterm_under_load_exits_zero_and_loses_nothing_acknowledged() {
    let dir = TestDir::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (mut child, before) = start_with_cursor(&dir, &[], &runtime);
    let stop = Arc::new(AtomicBool::new(false));
    let load = runtime.spawn(drive_load(child.url(), 0, stop.clone()));
    std::thread::sleep(Duration::from_millis(500));
    child.signal("TERM");
    assert_eq!(child.wait(PATIENCE), Some(0), "SIGTERM under load exits 0");
    stop.store(true, Ordering::Relaxed);
    let acked = runtime.block_on(load).unwrap();
    assert!(!acked.is_empty());
    let log = child.drain_log().join("\n");
    assert!(log.contains("shutdown complete"), "{log}");
    for token in [TOKEN_GRANTED, TOKEN_UNKNOWN] {
        assert!(
            !log.contains(token),
            "the driver token never reaches a log line"
        );
    }
    drop(child);

    let child = start(&dir, &[]);
    runtime.block_on(verify_exactly_once(&child.url(), &acked, &before));
}

/// Three instances on one PostgreSQL database, requests queued for a remote authorizer, load
/// through all three, `kill -9` of one mid-load and its restart, twice: every acknowledged
/// request is decided exactly once, as a replay on a surviving instance shows, and a subscriber
/// on a surviving instance saw each once, in log order.
#[test]
fn kill_9_of_one_of_three_instances_never_loses_or_repeats_a_decision() {
    let Some(url) = crate::scaleout::postgres() else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let authorizer = allowing_authorizer(&runtime);
    let remote = authorizer.url().to_string();
    let extra = ["--authorizer", "http", "--authorizer-url", &remote];
    let db = backend::TestDatabase::create(&url);
    let dirs: Vec<TestDir> = (0..3).map(|_| TestDir::sharing(&db)).collect();
    let (first, before) = start_with_cursor(&dirs[0], &extra, &runtime);
    let mut children = [first, start(&dirs[1], &extra), start(&dirs[2], &extra)];
    // A subscriber on an instance that survives, open from before the load.
    let watched = runtime.block_on(async {
        let mut client = connect(&children[2].url()).await;
        subscribe(&mut client, &[STATION_A], &before).await
    });
    let mut acked = Vec::new();
    let mut rng = rand::rng();
    for round in 0..2 {
        let stop = Arc::new(AtomicBool::new(false));
        let loads: Vec<_> = children
            .iter()
            .enumerate()
            .map(|(i, c)| runtime.spawn(drive_load(c.url(), round * 10 + i, stop.clone())))
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(300..900)));
        children[1].signal("KILL");
        children[1].wait(PATIENCE);
        stop.store(true, Ordering::Relaxed);
        for load in loads {
            acked.extend(runtime.block_on(load).unwrap());
        }
        children[1] = start(&dirs[1], &extra);
    }
    assert!(authorizer.calls() > 0, "the remote authorizer decided");
    runtime.block_on(verify_exactly_once(&children[2].url(), &acked, &before));
    runtime.block_on(assert_watched_exactly_once(watched, &acked));
}

/// Two instances on PostgreSQL with the queue on a Redis of the test's own, requests queued for
/// a remote authorizer, load through both; mid-load Redis shuts down without saving and comes
/// back empty (its stream, its group and every pending entry gone): every acknowledged request
/// is still decided exactly once, and a subscriber on the other instance, open from before the
/// load, gets every decision once, in log order.
#[test]
fn redis_losing_its_data_mid_load_loses_and_repeats_no_decision() {
    let Some(url) = crate::scaleout::postgres() else {
        return;
    };
    if !redis_server::available() {
        return;
    }
    let mut redis = redis_server::RedisServer::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let authorizer = allowing_authorizer(&runtime);
    let remote = authorizer.url().to_string();
    let extra = ["--authorizer", "http", "--authorizer-url", &remote];
    let db = backend::TestDatabase::create(&url);
    let dirs: Vec<TestDir> = (0..2)
        .map(|_| {
            let mut dir = TestDir::sharing(&db);
            dir.queue_url = Some(redis.url());
            dir
        })
        .collect();
    let (a, before) = start_with_cursor(&dirs[0], &extra, &runtime);
    let b = start(&dirs[1], &extra);
    let watched = runtime.block_on(async {
        let mut client = connect(&b.url()).await;
        subscribe(&mut client, &[], &before).await
    });
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = [&a, &b]
        .iter()
        .enumerate()
        .map(|(i, c)| runtime.spawn(drive_load(c.url(), 40 + i, stop.clone())))
        .collect();
    std::thread::sleep(Duration::from_millis(600));
    redis.lose_everything();
    std::thread::sleep(Duration::from_millis(600));
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for load in loads {
        acked.extend(runtime.block_on(load).unwrap());
    }
    assert!(
        acked.len() > 20,
        "load went through: {} acknowledged",
        acked.len()
    );
    runtime.block_on(verify_exactly_once(&a.url(), &acked, &before));
    // The subscriber on b saw the same, live.
    runtime.block_on(assert_watched_exactly_once(watched, &acked));
}

/// One instance on PostgreSQL with the queue on a Redis of the test's own, deciding through a
/// remote authorizer, aborted at `failpoint` while it handles one request; started again: the
/// request is decided exactly once and its stream entry is gone.
fn aborted_between_the_two_systems(failpoint: &str) {
    let Some(url) = crate::scaleout::postgres() else {
        return;
    };
    if !redis_server::available() {
        return;
    }
    let redis = redis_server::RedisServer::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let authorizer = allowing_authorizer(&runtime);
    let remote = authorizer.url().to_string();
    let extra = [
        "--heartbeat-interval-ms",
        "300",
        "--authorizer",
        "http",
        "--authorizer-url",
        &remote,
    ];
    let db = backend::TestDatabase::create(&url);
    let mut dir = TestDir::sharing(&db);
    dir.queue_url = Some(redis.url());
    let acl = dir.write_acl(&standard_acl());
    // A decision before, for a cursor to replay from.
    let (first, before) = start_with_cursor(&dir, &extra[2..], &runtime);
    drop(first);
    let mut child = ChildServer::start_with_failpoint(&dir, &acl, &extra, failpoint);
    let mut req = request(STATION_A, TOKEN_GRANTED);
    req.request_id = format!("aborted-at-{failpoint}");
    let answer = runtime.block_on(async {
        let mut client = connect(&child.url()).await;
        client.authorize(req.clone()).await
    });
    assert_eq!(
        child.wait(PATIENCE),
        None,
        "the process aborted (a signal, no exit code) at {failpoint}"
    );
    let child = ChildServer::start(&dir, &acl, &extra);
    runtime.block_on(async {
        let mut client = connect(&child.url()).await;
        if answer.is_err() {
            // Never acknowledged: the gateway retries, and learns it was accepted before.
            let retry = client.authorize(req.clone()).await.expect("the retry");
            assert!(
                retry.into_inner().duplicate,
                "the first attempt was committed"
            );
        }
        verify_exactly_once(&child.url(), std::slice::from_ref(&req.request_id), &before).await;
    });
    let mut entries = u64::MAX;
    let deadline = std::time::Instant::now() + PATIENCE;
    while entries > 0 && std::time::Instant::now() < deadline {
        let mut c = redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("chargegate:*:requests")
            .query(&mut c)
            .unwrap();
        entries = keys
            .iter()
            .map(|k| redis::cmd("XLEN").arg(k).query::<u64>(&mut c).unwrap())
            .sum();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(entries, 0, "every stream entry was completed");
}

#[test]
fn an_abort_between_the_request_commit_and_its_stream_entry_decides_it_once() {
    aborted_between_the_two_systems(chargegate::failpoint::AFTER_REQUEST_COMMIT);
}

#[test]
fn an_abort_between_the_decision_commit_and_its_acknowledgement_decides_it_once() {
    aborted_between_the_two_systems(chargegate::failpoint::AFTER_DECISION_COMMIT);
}

/// Two instances with the live carrier on a Redis of the test's own; while decisions flow from
/// one to a subscriber on the other, the carrier loses entries (`XTRIM … MAXLEN 0`) and its
/// connections (`CLIENT KILL`) again and again: the subscriber misses nothing and gets nothing
/// twice, in log order, and the other instance counts the decisions it read from the log.
#[test]
fn the_carrier_losing_entries_and_connections_loses_and_repeats_nothing() {
    let Some(url) = crate::scaleout::postgres() else {
        return;
    };
    if !redis_server::available() {
        return;
    }
    let redis = redis_server::RedisServer::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = backend::TestDatabase::create(&url);
    let dirs: Vec<TestDir> = (0..2)
        .map(|_| {
            let mut dir = TestDir::sharing(&db);
            dir.queue_url = Some(redis.url());
            dir
        })
        .collect();
    let (a, before) = start_with_cursor(&dirs[0], &[], &runtime);
    let acl = dirs[1].write_acl(&standard_acl());
    let b = ChildServer::start_with_metrics(&dirs[1], &acl, &["--heartbeat-interval-ms", "300"]);
    let watched = runtime.block_on(async {
        let mut client = connect(&b.url()).await;
        subscribe(&mut client, &[], &before).await
    });
    let stop = Arc::new(AtomicBool::new(false));
    let load = runtime.spawn(drive_load(a.url(), 50, stop.clone()));
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    for round in 0..12 {
        std::thread::sleep(Duration::from_millis(100));
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("chargegate:*:decisions")
            .query(&mut c)
            .unwrap();
        for k in keys {
            let _: i64 = redis::cmd("XTRIM")
                .arg(k)
                .arg("MAXLEN")
                .arg(0)
                .query(&mut c)
                .unwrap();
        }
        if round % 3 == 2 {
            let _: i64 = redis::cmd("CLIENT")
                .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
                .query(&mut c)
                .unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let acked = runtime.block_on(load).unwrap();
    assert!(
        acked.len() > 20,
        "load went through: {} acknowledged",
        acked.len()
    );
    runtime.block_on(assert_watched_exactly_once(watched, &acked));
    let text = b.scrape_metrics();
    let backfilled: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("chargegate_fanout_backfills_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        backfilled > 0.0,
        "the lost entries were read from the log: {text}"
    );
}

/// On a shared queue a `reclaim_margin_ms` too short to record a decision in is said at start;
/// the default is not.
#[test]
fn a_short_reclaim_margin_on_a_shared_queue_is_warned_about() {
    let Some(url) = crate::scaleout::postgres() else {
        return;
    };
    let db = backend::TestDatabase::create(&url);
    let warned = |extra: &[&str]| {
        let dir = TestDir::sharing(&db);
        let acl = dir.write_acl(&standard_acl());
        let child = ChildServer::start(&dir, &acl, extra);
        let log = child.start_log.join("\n");
        assert!(log.contains("chargegate starting"), "{log}");
        log.contains("reclaim_margin_ms is short")
    };
    assert!(warned(&["--reclaim-margin-ms", "1000"]));
    assert!(!warned(&[]));
}
