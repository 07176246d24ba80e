//! Several instances on one PostgreSQL database (CONTRACT §10, §11.5). These need
//! `CHARGEGATE_TEST_POSTGRES_URL`; without it they say so and pass, except under CI (`CI=true`),
//! where a missing backend fails.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use chargegate::{
    config::Config,
    cursor::Cursor,
    decision::{DecidedBy, Micros, Reason, Verdict},
    fanout::Hub,
    intake::NewRequest,
    token::{DriverToken, Fingerprinter},
};

use crate::support::{
    PATIENCE, STATION_A, STATION_B, TOKEN_GRANTED, TOKEN_WILDCARD, TestDir, TestServer, authorize,
    backend, get_decision, next_decisions, subscribe,
};

/// The PostgreSQL server the tests create databases on; `None` (said) when there is none.
pub(crate) fn postgres() -> Option<String> {
    match backend::postgres_url() {
        Some(url) => Some(url),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI runs every backend: set CHARGEGATE_TEST_POSTGRES_URL")
        }
        None => {
            eprintln!("PostgreSQL skipped: CHARGEGATE_TEST_POSTGRES_URL is not set");
            None
        }
    }
}

#[test]
fn the_backends_under_test_are_named() {
    let postgres = match backend::postgres_url() {
        Some(_) if backend::on_postgres() => "the whole suite",
        Some(_) => "the scale-out tests (CHARGEGATE_TEST_BACKEND=postgres runs the whole suite)",
        None => "skipped (CHARGEGATE_TEST_POSTGRES_URL is not set)",
    };
    let redis = match backend::redis_url() {
        Some(_) => "the whole suite, with PostgreSQL",
        None => {
            "skipped (CHARGEGATE_TEST_BACKEND=redis with CHARGEGATE_TEST_REDIS_URL runs the whole suite)"
        }
    };
    eprintln!(
        "backends under test: SQLite: the whole suite; PostgreSQL: {postgres}; Redis Streams: {redis}"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        assert!(
            backend::postgres_url().is_some(),
            "CI runs every backend: set CHARGEGATE_TEST_POSTGRES_URL"
        );
        assert!(
            std::env::var("CHARGEGATE_TEST_REDIS_URL").is_ok_and(|u| !u.is_empty()),
            "CI runs every backend: set CHARGEGATE_TEST_REDIS_URL"
        );
    }
}

/// One instance's configuration on the shared database: a data dir of its own.
fn instance(db: &backend::TestDatabase) -> (TestDir, Config) {
    let dir = TestDir::sharing(db);
    let config = dir.config();
    (dir, config)
}

fn position(cursor: &str) -> u64 {
    Cursor::decode(cursor).expect("a cursor").position
}

/// Dense and increasing by one: no gap, no duplicate, log order.
fn assert_dense(positions: &[u64]) {
    for pair in positions.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "positions {positions:?}");
    }
}

#[tokio::test]
async fn three_instances_share_one_log_in_order() {
    let Some(url) = postgres() else { return };
    let db = backend::TestDatabase::create(&url);
    let (mut dirs, mut servers) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (dir, config) = instance(&db);
        servers.push(TestServer::start(config).await);
        dirs.push(dir);
    }
    let mut watcher = servers[0].client().await;
    let mut stream = subscribe(&mut watcher, &[], "").await;
    let mut clients = Vec::new();
    for s in &servers {
        clients.push(s.client().await);
    }
    let mut ids = BTreeSet::new();
    for i in 0..60 {
        let (station, token) = if i % 2 == 0 {
            (STATION_A, TOKEN_GRANTED)
        } else {
            (STATION_B, TOKEN_WILDCARD)
        };
        ids.insert(
            authorize(&mut clients[i % 3], station, token)
                .await
                .request_id,
        );
    }
    let seen = next_decisions(&mut stream, 60).await;
    let positions: Vec<u64> = seen.iter().map(|d| position(&d.cursor)).collect();
    assert_dense(&positions);
    let seen_ids: BTreeSet<String> = seen.iter().map(|d| d.request_id.clone()).collect();
    assert_eq!(seen_ids, ids, "every decision of every instance, once");
    // Any instance answers for any request, with the cursor the stream gave.
    for (i, d) in seen.iter().enumerate() {
        let got = get_decision(&mut clients[(i + 1) % 3], &d.request_id).await;
        assert_eq!(got.cursor, d.cursor);
    }
    // A cursor taken on one instance resumes on another with exactly the remainder.
    let middle = &seen[29].cursor;
    let mut other = servers[2].client().await;
    let mut resumed = subscribe(&mut other, &[], middle).await;
    let rest = next_decisions(&mut resumed, 30).await;
    assert_eq!(
        rest.iter()
            .map(|d| d.request_id.clone())
            .collect::<Vec<_>>(),
        seen[30..]
            .iter()
            .map(|d| d.request_id.clone())
            .collect::<Vec<_>>()
    );
    drop((stream, resumed));
    for s in servers {
        s.stop().await.expect("clean stop");
    }
}

/// Runs `sql` on the test database.
async fn sql(url: &str, statement: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let driven = tokio::spawn(connection);
    client.batch_execute(statement).await.expect("statement");
    drop(client);
    let _ = driven.await;
}

/// The station whose decisions stall inside their transaction.
const STALLED: &str = "5e9f1a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b";

#[tokio::test]
async fn a_decision_that_commits_late_is_never_skipped_nor_overtaken() {
    let Some(url) = postgres() else { return };
    let db = backend::TestDatabase::create(&url);
    // Decisions at STALLED sleep inside the transaction that records them.
    sql(
        &db.url,
        &format!(
            "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.station_id = '{STALLED}' THEN PERFORM pg_sleep(1.5); END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER stall BEFORE INSERT ON decisions FOR EACH ROW EXECUTE FUNCTION stall();"
        ),
    )
    .await;
    let (mut dirs, mut servers) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (dir, config) = instance(&db);
        servers.push(TestServer::start(config).await);
        dirs.push(dir);
    }
    let mut watchers = Vec::new();
    for s in &servers {
        let mut c = s.client().await;
        watchers.push(subscribe(&mut c, &[], "").await);
    }
    let mut stalled_client = servers[0].client().await;
    let stalled = tokio::spawn(async move {
        authorize(&mut stalled_client, STALLED, TOKEN_WILDCARD)
            .await
            .request_id
    });
    // Wait until the stalled transaction sleeps, then commit others on the other instances.
    let (probe, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let deadline = std::time::Instant::now() + PATIENCE;
    while probe
        .query_opt(
            "SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
            &[],
        )
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the stall never began"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut later = Vec::new();
    for i in 0..6 {
        let mut c = servers[1 + i % 2].client().await;
        later.push(tokio::spawn(async move {
            authorize(&mut c, STATION_A, TOKEN_GRANTED).await.request_id
        }));
    }
    let stalled = stalled.await.unwrap();
    for w in &mut watchers {
        let seen = next_decisions(w, 7).await;
        let positions: Vec<u64> = seen.iter().map(|d| position(&d.cursor)).collect();
        assert_dense(&positions);
        assert_eq!(
            seen[0].request_id, stalled,
            "the stalled decision took the first position and no subscriber saw a later one before it"
        );
    }
    for l in later {
        l.await.unwrap();
    }
    drop(watchers);
    for s in servers {
        s.stop().await.expect("clean stop");
    }
}

/// The control: a plain sequence, read "after the last position seen", skips a row whose
/// transaction took its number first and committed last. This is what `log_head` prevents.
#[tokio::test]
async fn control_a_plain_sequence_skips_a_late_commit() {
    let Some(url) = postgres() else { return };
    let db = backend::TestDatabase::create(&url);
    sql(&db.url, "CREATE TABLE plain (id bigserial PRIMARY KEY)").await;
    let connect = || async {
        let (c, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        c
    };
    let (mut early, late, reader) = (connect().await, connect().await, connect().await);
    let slow = early.transaction().await.unwrap();
    slow.execute("INSERT INTO plain DEFAULT VALUES", &[])
        .await
        .unwrap();
    late.execute("INSERT INTO plain DEFAULT VALUES", &[])
        .await
        .unwrap();
    let read_after = |last: i64| {
        let reader = &reader;
        async move {
            reader
                .query("SELECT id FROM plain WHERE id > $1 ORDER BY id", &[&last])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, i64>(0))
                .collect::<Vec<_>>()
        }
    };
    let first_read = read_after(0).await;
    assert_eq!(first_read, [2], "the later number is visible first");
    slow.commit().await.unwrap();
    assert!(
        read_after(2).await.is_empty(),
        "a reader past 2 never sees 1: a plain sequence would lose it"
    );
}

#[tokio::test]
async fn a_lease_that_runs_out_lets_two_instances_decide_one_request_once() {
    let Some(url) = postgres() else { return };
    let db = backend::TestDatabase::create(&url);
    let fingerprinter = Fingerprinter::new(b"test-token-hash-key").unwrap();
    let lease = Duration::from_millis(200);
    let (dir_a, config_a) = instance(&db);
    let (dir_b, config_b) = instance(&db);
    let a = chargegate::backends::Backends::open(
        &config_a,
        Arc::new(Hub::new()),
        &fingerprinter,
        lease,
    )
    .await
    .unwrap();
    let b = chargegate::backends::Backends::open(
        &config_b,
        Arc::new(Hub::new()),
        &fingerprinter,
        lease,
    )
    .await
    .unwrap();
    let token = DriverToken::new(TOKEN_GRANTED);
    let request = NewRequest {
        request_id: "raced".into(),
        station_id: STATION_A.into(),
        fingerprint: fingerprinter.fingerprint(&token),
        token,
        callback_url: Some("http://127.0.0.1:9/hook".into()),
        accepted_at: Micros::now(),
    };
    a.queue.enqueue(request).await.unwrap();
    let first = a.queue.claim(10).await.unwrap();
    assert_eq!(first.len(), 1);
    assert!(b.queue.claim(10).await.unwrap().is_empty(), "leased to a");
    tokio::time::sleep(lease * 2).await;
    let second = b.queue.claim(10).await.unwrap();
    assert_eq!(second.len(), 1, "the lease ran out: b claims it too");
    let decide = |claim: chargegate::queue::Claim, reason| {
        let d = claim
            .request
            .decision(Verdict::new(reason, DecidedBy::Http), Micros::now());
        async move { claim.ack(d, false).await.map_err(|(_, e)| e).unwrap() }
    };
    let (by_b, by_a) = (
        decide(second.into_iter().next().unwrap(), Reason::Granted).await,
        decide(first.into_iter().next().unwrap(), Reason::NoGrant).await,
    );
    assert!(
        by_b.first && !by_a.first,
        "one decision, the first recorded"
    );
    assert_eq!(
        by_a.decision, by_b.decision,
        "the second settle returns the first decision"
    );
    let count = |table: &'static str| {
        let url = db.url.clone();
        async move {
            let (c, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(count("decisions").await, 1);
    assert_eq!(count("deliveries").await, 1);
    assert_eq!(count("queue").await, 0);
    a.close().await;
    b.close().await;
    drop((dir_a, dir_b));
}

#[tokio::test]
async fn migrate_applies_the_schema_once_and_serve_needs_the_token_key() {
    let Some(url) = postgres() else { return };
    let name = format!("chargegate_test_empty_{}", uuid::Uuid::now_v7().simple());
    sql(&url, &format!("CREATE DATABASE {name}")).await;
    let empty = backend::with_database(&url, &name);
    let migrate = || {
        crate::support::binary::chargegate()
            .args(["migrate", "--store-url", &empty])
            .env("CHARGEGATE_TOKEN_HASH_KEY", "test-token-hash-key")
            .output()
            .expect("run chargegate migrate")
    };
    let first = migrate();
    assert!(first.status.success(), "{first:?}");
    assert!(String::from_utf8_lossy(&first.stdout).contains("applied migrations [1, 2]"));
    let again = migrate();
    assert!(again.status.success(), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stdout).contains("the schema is current"));

    let refused = crate::support::binary::chargegate()
        .args(["serve", "--store-url", &empty, "--listen", "127.0.0.1:0"])
        .output()
        .expect("run chargegate serve");
    assert_eq!(refused.status.code(), Some(64), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("token_hash_key"));
    sql(&url, &format!("DROP DATABASE {name} WITH (FORCE)")).await;
}

/// The health of the whole server, as a readiness probe asks it.
async fn serving(server: &TestServer) -> bool {
    serving_as(server, "").await
}

/// The health of `service`, as a probe asks it.
async fn serving_as(server: &TestServer, service: &str) -> bool {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let mut health = HealthClient::new(server.channel().await);
    health
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map(|r| r.into_inner().status() == ServingStatus::Serving)
        .unwrap_or(false)
}

#[tokio::test]
async fn while_postgresql_refuses_connections_calls_are_unavailable_and_health_not_serving() {
    let Some(url) = postgres() else { return };
    let db = backend::TestDatabase::create(&url);
    let (_dir, config) = instance(&db);
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let before = authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    assert!(serving(&server).await);

    // The database goes away: no new connections, and the open ones are cut.
    let name = url::Url::parse(&db.url).unwrap().path()[1..].to_owned();
    sql(
        &url,
        &format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}';"
        ),
    )
    .await;
    let refused = client
        .authorize(crate::support::request(STATION_A, TOKEN_GRANTED))
        .await
        .expect_err("no acknowledgement without the database");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    crate::support::poll_until("NOT_SERVING", || serving(&server), |s| !*s).await;
    // A liveness probe does not restart an instance for its database's sake.
    assert!(
        serving_as(&server, "liveness").await,
        "liveness stays SERVING"
    );

    // Back: service resumes on its own, and nothing acknowledged was lost.
    sql(
        &url,
        &format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"),
    )
    .await;
    crate::support::poll_until("SERVING again", || serving(&server), |s| *s).await;
    let after = authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    for id in [&before.request_id, &after.request_id] {
        let d = get_decision(&mut client, id).await;
        assert_eq!(
            d.status(),
            chargegate::proto::DecisionStatus::Allowed,
            "{id} decided"
        );
    }
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn audit_verify_walks_the_shared_chain_and_names_an_edited_or_deleted_record() {
    let Some(url) = postgres() else { return };
    let db = backend::TestDatabase::create(&url);
    let (_a, config_a) = instance(&db);
    let (_b, config_b) = instance(&db);
    let (a, b) = (
        TestServer::start(config_a).await,
        TestServer::start(config_b).await,
    );
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut last = String::new();
    for i in 0..10 {
        let client = if i % 2 == 0 { &mut ca } else { &mut cb };
        last = authorize(client, STATION_A, TOKEN_GRANTED).await.request_id;
    }
    crate::support::poll_until(
        "the last decision",
        || {
            let mut c = ca.clone();
            let id = last.clone();
            async move { get_decision(&mut c, &id).await.status() }
        },
        |s| *s != chargegate::proto::DecisionStatus::Pending,
    )
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    let verify = || {
        crate::support::binary::chargegate()
            .args(["audit", "verify", "--store-url", &db.url])
            .args(["--token-hash-key", "test-token-hash-key"])
            .output()
            .expect("run audit verify")
    };
    let intact = verify();
    assert!(intact.status.success(), "{intact:?}");
    assert!(
        String::from_utf8_lossy(&intact.stdout).contains("intact: 10 decisions verified"),
        "{intact:?}"
    );
    sql(
        &db.url,
        "UPDATE decisions SET status = 'not_allowed' WHERE position = 4",
    )
    .await;
    let edited = verify();
    assert_eq!(edited.status.code(), Some(1), "{edited:?}");
    assert!(String::from_utf8_lossy(&edited.stdout).contains("BROKEN at decision 4"));
    sql(
        &db.url,
        "UPDATE decisions SET status = 'allowed' WHERE position = 4;
         DELETE FROM decisions WHERE position = 7;",
    )
    .await;
    let deleted = verify();
    assert_eq!(deleted.status.code(), Some(1), "{deleted:?}");
    assert!(
        String::from_utf8_lossy(&deleted.stdout).contains("BROKEN at decision 8"),
        "{deleted:?}"
    );
}

/// With the queue and the carrier on Redis: while Redis is down health is `NOT_SERVING`, a
/// decision made on one instance still reaches a subscriber on another (the tailers read the
/// log), and when Redis is back, empty, health is `SERVING` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_health_is_not_serving_and_decisions_still_travel() {
    let Some(url) = postgres() else { return };
    if !crate::support::redis_server::available() {
        return;
    }
    let mut redis = crate::support::redis_server::RedisServer::start();
    let db = backend::TestDatabase::create(&url);
    let on_redis = |mut dir: TestDir| {
        dir.queue_url = Some(redis.url());
        let config = dir.config();
        (dir, config)
    };
    let (_a, config_a) = on_redis(TestDir::sharing(&db));
    let (_b, config_b) = on_redis(TestDir::sharing(&db));
    let (a, b) = (
        TestServer::start(config_a).await,
        TestServer::start(config_b).await,
    );
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut stream = crate::support::subscribe(&mut cb, &[STATION_A], "").await;
    crate::support::poll_until("SERVING", || serving(&a), |s| *s).await;

    tokio::task::block_in_place(|| redis.stop());
    crate::support::poll_until("NOT_SERVING", || serving(&a), |s| !*s).await;
    let during = authorize(&mut ca, STATION_A, TOKEN_GRANTED).await;
    let seen = crate::support::next_decision(&mut stream).await;
    assert_eq!(seen.request_id, during.request_id, "carried by the log");

    tokio::task::block_in_place(|| redis.start_again());
    crate::support::poll_until("SERVING again", || serving(&a), |s| *s).await;
    let after = authorize(&mut ca, STATION_A, TOKEN_GRANTED).await;
    let seen = crate::support::next_decision(&mut stream).await;
    assert_eq!(seen.request_id, after.request_id, "carried again");
    a.stop().await.expect("clean stop");
    b.stop().await.expect("clean stop");
}

/// A queued request whose workers keep dying (its claims are never settled) is handed out at
/// most `MAX_DELIVERIES` times: the last claim is marked exhausted, to be decided `UNKNOWN`
/// without asking the authorizer again. On either shared queue.
#[tokio::test]
async fn a_request_handed_out_too_often_is_marked_exhausted() {
    let Some(url) = postgres() else { return };
    let db = backend::TestDatabase::create(&url);
    let fingerprinter = Fingerprinter::new(b"test-token-hash-key").unwrap();
    let lease = Duration::from_millis(200);
    let (_dir, config) = instance(&db);
    let backends =
        chargegate::backends::Backends::open(&config, Arc::new(Hub::new()), &fingerprinter, lease)
            .await
            .unwrap();
    let token = DriverToken::new(TOKEN_GRANTED);
    backends
        .queue
        .enqueue(NewRequest {
            request_id: "poisoned".into(),
            station_id: STATION_A.into(),
            fingerprint: fingerprinter.fingerprint(&token),
            token,
            callback_url: None,
            accepted_at: Micros::now(),
        })
        .await
        .unwrap();
    let mut exhausted = Vec::new();
    let deadline = std::time::Instant::now() + PATIENCE;
    while exhausted.len() < chargegate::queue::MAX_DELIVERIES {
        assert!(
            std::time::Instant::now() < deadline,
            "handed out {exhausted:?}"
        );
        let claims = backends.queue.claim(10).await.unwrap();
        if claims.is_empty() {
            tokio::time::sleep(lease / 4).await;
            continue;
        }
        assert_eq!(claims.len(), 1);
        // The worker "dies": the claim is dropped, neither acknowledged nor handed back.
        exhausted.push(claims[0].exhausted);
    }
    let mut expected = vec![false; chargegate::queue::MAX_DELIVERIES - 1];
    expected.push(true);
    assert_eq!(exhausted, expected, "only the last delivery is exhausted");
    backends.close().await;
}

/// A consumer of the Redis queue's group that stays idle with nothing pending (an instance
/// name that never came back: a pod replaced under a new name) is removed from the group by
/// the housekeeping of a live instance, which keeps its own name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_gone_for_good_is_removed_from_the_group() {
    let Some(url) = postgres() else { return };
    if !crate::support::redis_server::available() {
        return;
    }
    let redis = crate::support::redis_server::RedisServer::start();
    let db = backend::TestDatabase::create(&url);
    let mut dir = TestDir::sharing(&db);
    dir.queue_url = Some(redis.url());
    let config = dir.config();
    let fingerprinter = Fingerprinter::new(b"test-token-hash-key").unwrap();
    let lease = Duration::from_millis(100);
    let backends =
        chargegate::backends::Backends::open(&config, Arc::new(Hub::new()), &fingerprinter, lease)
            .await
            .unwrap();
    let token = DriverToken::new(TOKEN_GRANTED);
    backends
        .queue
        .enqueue(NewRequest {
            request_id: "held".into(),
            station_id: STATION_A.into(),
            fingerprint: fingerprinter.fingerprint(&token),
            token,
            callback_url: None,
            accepted_at: Micros::now(),
        })
        .await
        .unwrap();
    // This instance's consumer holds the request, and then idles as long as the ghost does.
    assert_eq!(backends.queue.claim(1).await.unwrap().len(), 1);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("chargegate:*:requests")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "one request stream: {keys:?}");
    let _: redis::Value = redis::cmd("XGROUP")
        .arg(&["CREATECONSUMER", &keys[0], "workers", "ghost"])
        .query_async(&mut c)
        .await
        .unwrap();
    let consumers = |mut c: redis::aio::MultiplexedConnection| {
        let key = keys[0].clone();
        async move {
            let reply: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&key)
                .arg("workers")
                .query_async(&mut c)
                .await
                .unwrap();
            reply
                .consumers
                .into_iter()
                .map(|c| c.name)
                .collect::<BTreeSet<_>>()
        }
    };
    let before = consumers(c.clone()).await;
    assert!(before.contains("ghost"), "{before:?}");
    assert!(before.contains(&config.instance_id), "{before:?}");
    let after = crate::support::poll_until(
        "the ghost consumer removed",
        || consumers(c.clone()),
        |names| !names.contains("ghost"),
    )
    .await;
    assert!(
        after.contains(&config.instance_id),
        "kept its own: {after:?}"
    );
    backends.close().await;
}
