//! Revisions of UNKNOWN decisions (CONTRACT §2a): a remote authorizer that times out and then
//! answers; the revision on the stream, in `GetDecision` and at the callback; an answer that stays
//! UNKNOWN records nothing and the window erases the kept token; `kill -9` in a revision pass.

use std::{collections::HashMap, time::Duration};

use chargegate::{
    config::AuthorizerConfig,
    proto::{AuthorizeRequest, DecisionStatus, subscribe_decisions_response::Event},
};

use crate::support::{
    binary::ChildServer,
    fake_authorizer::{Behaviour, FakeAuthorizer},
    receiver::{Reply, WebhookReceiver},
    *,
};

const ALLOWED: &str = r#"{"allowed": "ALLOWED"}"#;

/// A server deciding through `fake` within 300 ms, with revisions on within `window`.
async fn server_with_revisions(fake: &FakeAuthorizer, window: Duration) -> (TestDir, TestServer) {
    let dir = TestDir::new();
    let mut config = dir.config();
    config.authorizer = AuthorizerConfig::Http { url: fake.url() };
    config.authorize_timeout = Duration::from_millis(300);
    config.breaker.failures = 1000;
    config.revise_unknown_within = window;
    config.revise_rate_per_s = 50;
    config.webhook.allow_private = true;
    config.webhook.backoff_base = Duration::from_millis(50);
    let server = TestServer::start(config).await;
    (dir, server)
}

fn kept(dir: &TestDir, request_id: &str) -> bool {
    dir.sql_bool(
        "SELECT EXISTS (SELECT 1 FROM revisable WHERE request_id = $1)",
        &[backend::Value::Text(request_id.into())],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_decision_is_revised_once_the_authorizer_answers_again() {
    let fake =
        FakeAuthorizer::start(Behaviour::Slow(Duration::from_secs(30), ALLOWED.into())).await;
    let receiver = WebhookReceiver::start(Reply::Status(200)).await;
    let (dir, server) = server_with_revisions(&fake, Duration::from_secs(600)).await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;
    client
        .authorize(AuthorizeRequest {
            station_id: STATION_A.into(),
            driver_token: TOKEN_GRANTED.into(),
            callback_url: receiver.url("/hooks"),
            request_id: "rev-1".into(),
        })
        .await
        .expect("authorize");

    let first = next_decision(&mut stream).await;
    assert_eq!(
        (
            first.request_id.as_str(),
            first.status(),
            first.reason.as_str(),
            first.revision
        ),
        ("rev-1", DecisionStatus::Unknown, "timeout", 0)
    );
    assert!(
        kept(&dir, "rev-1"),
        "an UNKNOWN decision keeps its request to ask again"
    );

    // The authorizer answers again: the request is asked again and revised.
    fake.set(Behaviour::Answer(200, ALLOWED.into()));
    let revised = next_decision(&mut stream).await;
    assert_eq!(
        (
            revised.request_id.as_str(),
            revised.status(),
            revised.reason.as_str(),
            revised.revision
        ),
        ("rev-1", DecisionStatus::Allowed, "granted", 1)
    );
    let position = |c: &str| chargegate::cursor::Cursor::decode(c).unwrap().position;
    assert!(
        position(&revised.cursor) > position(&first.cursor),
        "a log entry of its own"
    );
    assert_eq!(revised.accepted_at, first.accepted_at);
    assert!(!kept(&dir, "rev-1"), "the revision erased what was kept");

    let now = get_decision(&mut client, "rev-1").await;
    assert_eq!((now.status(), now.revision), (DecisionStatus::Allowed, 1));

    // The callback receives both, each under its own webhook id.
    let mut hooks = receiver.wait_for(2).await;
    hooks.sort_by(|a, b| a.header("webhook-id").cmp(b.header("webhook-id")));
    assert_eq!(hooks[0].header("webhook-id"), "rev-1");
    assert_eq!(hooks[0].json()["status"], "unknown");
    assert!(hooks[0].json().get("revision").is_none());
    assert_eq!(hooks[1].header("webhook-id"), "rev-1.r1");
    let body = hooks[1].json();
    assert_eq!(
        (&body["request_id"], &body["status"], &body["revision"]),
        (&"rev-1".into(), &"allowed".into(), &1.into())
    );
    assert_eq!(body["driver_token"], TOKEN_GRANTED);

    // A replay from before it holds the decision and its one revision.
    let mut replay = subscribe(
        &mut client,
        &[STATION_A],
        &chargegate::cursor::Cursor::new(
            chargegate::cursor::Cursor::decode(&first.cursor)
                .unwrap()
                .log_id,
            position(&first.cursor) - 1,
        )
        .encode(),
    )
    .await;
    let replayed = next_decisions(&mut replay, 2).await;
    assert_eq!(
        replayed
            .iter()
            .map(|d| (d.request_id.as_str(), d.revision))
            .collect::<Vec<_>>(),
        [("rev-1", 0), ("rev-1", 1)]
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_stays_unknown_records_nothing_and_the_window_erases_the_token() {
    let fake =
        FakeAuthorizer::start(Behaviour::Slow(Duration::from_secs(30), ALLOWED.into())).await;
    let (dir, server) = server_with_revisions(&fake, Duration::from_millis(1500)).await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;
    let first = decide_at(&mut client, &mut stream, STATION_A, TOKEN_WILDCARD).await;
    assert_eq!(first.status(), DecisionStatus::Unknown);
    assert!(kept(&dir, &first.request_id));

    // Asked again (and again UNKNOWN) until the window closes; then the kept request is gone.
    poll_until(
        "the kept request erased when its window closed",
        || async { kept(&dir, &first.request_id) },
        |k| !k,
    )
    .await;
    assert!(fake.calls() >= 2, "asked again: {} calls", fake.calls());
    let now = get_decision(&mut client, &first.request_id).await;
    assert_eq!((now.status(), now.revision), (DecisionStatus::Unknown, 0));
    let log_id = chargegate::cursor::Cursor::decode(&first.cursor)
        .unwrap()
        .log_id;
    let mut replay = subscribe(
        &mut client,
        &[STATION_A],
        &chargegate::cursor::Cursor::new(log_id, 0).encode(),
    )
    .await;
    let mut entries = 0;
    loop {
        let item = tokio::time::timeout(PATIENCE, replay.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match item.event {
            Some(Event::Decision(d)) => {
                assert_eq!(d.revision, 0, "nothing revised: {d:?}");
                entries += 1;
            }
            Some(Event::Heartbeat(_)) => break,
            None => {}
        }
    }
    assert_eq!(entries, 1);
    drop(replay);
    drop(stream);
    server.stop().await.expect("clean stop");
    let hits = files_containing(&dir.data_dir(), TOKEN_WILDCARD.as_bytes());
    assert!(hits.is_empty(), "the token is erased: {hits:?}");
}

/// `kill -9` in the middle of a revision pass: after the restart every UNKNOWN decision has
/// exactly one revision, and every decision is in the log exactly once.
#[test]
fn kill_9_during_a_revision_pass_still_revises_each_request_exactly_once() {
    const N: usize = 120;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = runtime.block_on(FakeAuthorizer::start(Behaviour::Answer(503, String::new())));
    let url = fake.url().to_string();
    let dir = TestDir::new();
    let acl = dir.write_acl(&standard_acl());
    let args = [
        "--authorizer",
        "http",
        "--authorizer-url",
        &url,
        "--authorizer-breaker-failures",
        "100000",
        "--revise-rate-per-s",
        "40",
        "--heartbeat-interval-ms",
        "300",
    ];
    let mut child = ChildServer::start(&dir, &acl, &args);
    let first_cursor = runtime.block_on(async {
        let mut client = connect(&child.url()).await;
        let mut stream = subscribe(&mut client, &[], "").await;
        for i in 0..N {
            authorize_as(&mut client, STATION_A, TOKEN_GRANTED, &format!("k-{i}"))
                .await
                .unwrap();
        }
        let decided = next_decisions(&mut stream, N).await;
        assert!(
            decided
                .iter()
                .all(|d| d.status() == DecisionStatus::Unknown)
        );
        decided[0].cursor.clone()
    });

    // The authorizer answers again; a few revisions in, the process dies.
    fake.set(Behaviour::Answer(200, ALLOWED.into()));
    runtime.block_on(async {
        let mut client = connect(&child.url()).await;
        let mut stream = subscribe(&mut client, &[], "").await;
        let seen = next_decisions(&mut stream, 20).await;
        assert!(seen.iter().all(|d| d.revision == 1));
    });
    child.signal("KILL");
    child.wait(PATIENCE);
    drop(child);
    let child = ChildServer::start(&dir, &acl, &args);

    runtime.block_on(async {
        wait_revised(&child.url(), "k", N).await;
        let mut client = connect(&child.url()).await;
        // The whole log from the first decision on: each request once, each revision once.
        assert_each_revised_once(&mut client, &first_cursor, "k", N).await;
    });
    drop(child);
}

/// Replays the log from `first` (a cursor) on: each of `<prefix>-0..n` appears exactly once as a
/// decision and exactly once as an ALLOWED revision, and nothing else appears.
async fn assert_each_revised_once(
    client: &mut chargegate::proto::charging_authorization_client::ChargingAuthorizationClient<
        tonic::transport::Channel,
    >,
    first: &str,
    prefix: &str,
    n: usize,
) {
    let first = chargegate::cursor::Cursor::decode(first).unwrap();
    let from = chargegate::cursor::Cursor::new(first.log_id, first.position - 1).encode();
    let mut replay = subscribe(client, &[], &from).await;
    let mut counts: HashMap<(String, u32), usize> = HashMap::new();
    loop {
        let item = tokio::time::timeout(PATIENCE, replay.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match item.event {
            Some(Event::Decision(d)) => {
                if d.revision == 1 {
                    assert_eq!(d.status(), DecisionStatus::Allowed);
                }
                *counts.entry((d.request_id, d.revision)).or_default() += 1;
            }
            Some(Event::Heartbeat(_)) => break,
            None => {}
        }
    }
    for i in 0..n {
        for revision in [0, 1] {
            assert_eq!(
                counts.get(&(format!("{prefix}-{i}"), revision)),
                Some(&1),
                "{prefix}-{i} revision {revision}"
            );
        }
    }
    assert_eq!(counts.len(), 2 * n, "nothing else in the log");
}

/// Waits until `GetDecision` of each of `<prefix>-0..n` returns its revision.
async fn wait_revised(url: &str, prefix: &str, n: usize) {
    let client = connect(url).await;
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        poll_until(
            "every request revised",
            || {
                let mut client = client.clone();
                let id = id.clone();
                async move { get_decision(&mut client, &id).await.revision }
            },
            |r| *r == 1,
        )
        .await;
    }
}

/// Two instances on one PostgreSQL database revise the same kept requests: each is revised once.
#[test]
fn two_instances_revise_each_request_exactly_once() {
    const N: usize = 80;
    let Some(url) = crate::scaleout::postgres() else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = runtime.block_on(FakeAuthorizer::start(Behaviour::Answer(503, String::new())));
    let remote = fake.url().to_string();
    let args = [
        "--authorizer",
        "http",
        "--authorizer-url",
        &remote,
        "--authorizer-breaker-failures",
        "100000",
        "--revise-rate-per-s",
        "200",
        "--heartbeat-interval-ms",
        "300",
    ];
    let db = backend::TestDatabase::create(&url);
    let dirs: Vec<TestDir> = (0..2).map(|_| TestDir::sharing(&db)).collect();
    let children: Vec<ChildServer> = dirs
        .iter()
        .map(|d| ChildServer::start(d, &d.write_acl(&standard_acl()), &args))
        .collect();
    let first = runtime.block_on(async {
        let mut watch = subscribe(&mut connect(&children[0].url()).await, &[], "").await;
        for i in 0..N {
            let mut client = connect(&children[i % 2].url()).await;
            authorize_as(&mut client, STATION_A, TOKEN_GRANTED, &format!("two-{i}"))
                .await
                .unwrap();
        }
        let decided = next_decisions(&mut watch, N).await;
        assert!(
            decided
                .iter()
                .all(|d| d.status() == DecisionStatus::Unknown)
        );
        decided
            .iter()
            .min_by_key(|d| {
                chargegate::cursor::Cursor::decode(&d.cursor)
                    .unwrap()
                    .position
            })
            .unwrap()
            .cursor
            .clone()
    });
    fake.set(Behaviour::Answer(200, ALLOWED.into()));
    runtime.block_on(async {
        wait_revised(&children[1].url(), "two", N).await;
        let mut client = connect(&children[0].url()).await;
        assert_each_revised_once(&mut client, &first, "two", N).await;
    });
    drop(children);
}

async fn connect(
    url: &str,
) -> chargegate::proto::charging_authorization_client::ChargingAuthorizationClient<
    tonic::transport::Channel,
> {
    chargegate::proto::charging_authorization_client::ChargingAuthorizationClient::connect(
        url.to_owned(),
    )
    .await
    .expect("connect")
}
