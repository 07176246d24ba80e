//! The remote authorizer against a real HTTP server: answer shapes, deadline, failures, the
//! circuit breaker, the decision cache and a flapping authorizer under load.

use std::time::Duration;

use chargegate::{config::AuthorizerConfig, proto::DecisionStatus};
use tonic::Code;

use crate::support::{
    fake_authorizer::{Behaviour, FakeAuthorizer},
    *,
};

const ALLOWED: &str = r#"{"allowed": "ALLOWED"}"#;

async fn server_for(
    fake_url: url::Url,
    tweak: impl FnOnce(&mut chargegate::config::Config),
) -> (TestDir, TestServer) {
    let dir = TestDir::new();
    let mut config = dir.config();
    config.authorizer = AuthorizerConfig::Http { url: fake_url };
    config.breaker.failures = 1000;
    tweak(&mut config);
    let server = TestServer::start(config).await;
    (dir, server)
}

/// Authorizes at station A and waits for the decision on `stream`.
async fn decide(
    client: &mut chargegate::proto::charging_authorization_client::ChargingAuthorizationClient<
        tonic::transport::Channel,
    >,
    stream: &mut tonic::Streaming<chargegate::proto::SubscribeDecisionsResponse>,
    token: &str,
) -> chargegate::proto::Decision {
    decide_at(client, stream, STATION_A, token).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_shape_maps_to_its_status_and_reason() {
    let fake = FakeAuthorizer::start(Behaviour::Answer(200, ALLOWED.into())).await;
    let (_dir, server) = server_for(fake.url(), |_| {}).await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;
    let cases = [
        (
            200,
            r#"{"allowed": "ALLOWED"}"#,
            DecisionStatus::Allowed,
            "granted",
        ),
        (
            200,
            r#"{"allowed": true}"#,
            DecisionStatus::Allowed,
            "granted",
        ),
        (
            200,
            r#"{"allowed": "BLOCKED"}"#,
            DecisionStatus::NotAllowed,
            "blocked",
        ),
        (
            200,
            r#"{"allowed": "EXPIRED"}"#,
            DecisionStatus::NotAllowed,
            "expired",
        ),
        (
            200,
            r#"{"allowed": "NO_CREDIT"}"#,
            DecisionStatus::NotAllowed,
            "no_credit",
        ),
        (
            200,
            r#"{"allowed": "NOT_ALLOWED"}"#,
            DecisionStatus::NotAllowed,
            "not_allowed",
        ),
        (
            200,
            r#"{"allowed": false}"#,
            DecisionStatus::NotAllowed,
            "not_allowed",
        ),
        (
            200,
            r#"{"allowed": "PERHAPS"}"#,
            DecisionStatus::Unknown,
            "authorizer_error",
        ),
        (
            200,
            "<html>oops</html>",
            DecisionStatus::Unknown,
            "authorizer_error",
        ),
        (500, ALLOWED, DecisionStatus::Unknown, "authorizer_error"),
        (302, ALLOWED, DecisionStatus::Unknown, "authorizer_error"),
        (404, "", DecisionStatus::Unknown, "authorizer_error"),
    ];
    for (status, body, expected, reason) in cases {
        fake.set(Behaviour::Answer(status, body.into()));
        let d = decide(&mut client, &mut stream, TOKEN_GRANTED).await;
        assert_eq!(
            (d.status(), d.reason.as_str()),
            (expected, reason),
            "{status} {body}"
        );
    }
    // An answer of no announced length is read up to its limit, not until the deadline.
    fake.set(Behaviour::Endless);
    let d = decide(&mut client, &mut stream, TOKEN_GRANTED).await;
    assert_eq!(
        (d.status(), d.reason.as_str()),
        (DecisionStatus::Unknown, "authorizer_error"),
        "an endless answer"
    );
    // The authorizer was asked with the contract's body.
    let body = fake.last_body().expect("a JSON body");
    assert_eq!(body["station_id"], STATION_A);
    assert_eq!(body["driver_token"], TOKEN_GRANTED);
    assert!(body["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    // A malformed token never reaches it.
    let before = fake.calls();
    let d = decide(&mut client, &mut stream, "bad token").await;
    assert_eq!(d.reason, "token_format");
    assert_eq!(fake.calls(), before);
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_unreachable_authorizer_is_unknown_within_the_deadline() {
    let fake =
        FakeAuthorizer::start(Behaviour::Slow(Duration::from_secs(30), ALLOWED.into())).await;
    let (_dir, server) = server_for(fake.url(), |c| {
        c.authorize_timeout = Duration::from_millis(300)
    })
    .await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;
    let d = decide(&mut client, &mut stream, TOKEN_GRANTED).await;
    assert_eq!(
        (d.status(), d.reason.as_str()),
        (DecisionStatus::Unknown, "timeout")
    );
    assert!(
        (300..2000).contains(&d.processing_time_ms),
        "at the deadline plus a small margin: {}",
        d.processing_time_ms
    );
    server.stop().await.expect("clean stop");

    // Nothing listens on this port any more.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/authorize", l.local_addr().unwrap())
            .parse()
            .unwrap()
    };
    let (_dir, server) = server_for(closed, |_| {}).await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;
    let d = decide(&mut client, &mut stream, TOKEN_GRANTED).await;
    assert_eq!(
        (d.status(), d.reason.as_str()),
        (DecisionStatus::Unknown, "authorizer_error")
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_refuses_without_calling_and_recovers() {
    let fake = FakeAuthorizer::start(Behaviour::Answer(500, String::new())).await;
    let (_dir, server) = server_for(fake.url(), |c| {
        c.breaker.failures = 3;
        // Long enough that five decisions fit in it on a loaded machine.
        c.breaker.cooldown = Duration::from_millis(1500);
        c.workers = 1;
    })
    .await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;
    // Taken before the failure that opens the circuit, so that the probe's wait is measured
    // from no later than the opening.
    let mut opened = std::time::Instant::now();
    for _ in 0..3 {
        opened = std::time::Instant::now();
        assert_eq!(
            decide(&mut client, &mut stream, TOKEN_GRANTED).await.reason,
            "authorizer_error"
        );
    }
    assert_eq!(fake.calls(), 3);
    for _ in 0..5 {
        assert_eq!(
            decide(&mut client, &mut stream, TOKEN_GRANTED).await.reason,
            "circuit_open"
        );
    }
    assert!(
        opened.elapsed() < Duration::from_millis(1500),
        "the test outran the cooldown"
    );
    assert_eq!(fake.calls(), 3, "no call while the circuit is open");

    fake.set(Behaviour::Answer(200, ALLOWED.into()));
    decide_until(
        &mut client,
        &mut stream,
        (STATION_A, TOKEN_GRANTED),
        "granted",
        "circuit_open",
        "the breaker never let a probe through",
    )
    .await;
    assert!(
        opened.elapsed() >= Duration::from_millis(1500),
        "the probe waited for the cooldown"
    );
    assert_eq!(fake.calls(), 4, "exactly one probe");
    assert_eq!(
        decide(&mut client, &mut stream, TOKEN_GRANTED).await.reason,
        "granted",
        "closed again"
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_answers_until_its_ttl_then_asks_again() {
    let fake = FakeAuthorizer::start(Behaviour::Answer(200, ALLOWED.into())).await;
    let (_dir, server) = server_for(fake.url(), |c| {
        // Long enough that two decisions fit in it on a loaded machine.
        c.authorizer_cache_ttl = Some(Duration::from_millis(1500))
    })
    .await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;
    // Taken before the answer is cached, so that the expiry is measured from no later than that.
    let cached_at = std::time::Instant::now();
    assert_eq!(
        decide(&mut client, &mut stream, TOKEN_GRANTED).await.reason,
        "granted"
    );
    assert_eq!(
        decide(&mut client, &mut stream, TOKEN_GRANTED).await.reason,
        "cached"
    );
    assert!(
        cached_at.elapsed() < Duration::from_millis(1500),
        "the test outran the TTL"
    );
    assert_eq!(fake.calls(), 1, "a hit makes no call");
    // Failures and other tokens are not served from the cache.
    assert_eq!(
        decide(&mut client, &mut stream, TOKEN_WILDCARD)
            .await
            .reason,
        "granted"
    );
    assert_eq!(fake.calls(), 2);
    // After the TTL, the authorizer is asked again.
    decide_until(
        &mut client,
        &mut stream,
        (STATION_A, TOKEN_GRANTED),
        "granted",
        "cached",
        "the cache never expired",
    )
    .await;
    assert!(cached_at.elapsed() >= Duration::from_millis(1500));
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_authorizer_under_load_never_leaves_a_request_undecided() {
    let fake = FakeAuthorizer::start(Behaviour::Cycle(vec![
        Behaviour::Answer(200, ALLOWED.into()),
        Behaviour::Answer(503, String::new()),
        Behaviour::Slow(Duration::from_millis(400), ALLOWED.into()),
        Behaviour::Answer(200, "garbage".into()),
        Behaviour::Answer(200, r#"{"allowed": false}"#.into()),
    ]))
    .await;
    let (_dir, server) = server_for(fake.url(), |c| {
        c.authorize_timeout = Duration::from_millis(200);
        c.breaker.failures = 4;
        c.breaker.cooldown = Duration::from_millis(100);
    })
    .await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[], "").await;
    const N: usize = 400;
    let mut ids = std::collections::HashSet::new();
    let mut senders = Vec::new();
    for w in 0..8 {
        let mut c = server.client().await;
        senders.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..N / 8 {
                ids.push(
                    authorize(
                        &mut c,
                        STATION_B,
                        if w % 2 == 0 {
                            TOKEN_GRANTED
                        } else {
                            TOKEN_WILDCARD
                        },
                    )
                    .await
                    .request_id,
                );
            }
            ids
        }));
    }
    for s in senders {
        ids.extend(s.await.unwrap());
    }
    let decisions = next_decisions(&mut stream, N).await;
    let decided: std::collections::HashSet<_> =
        decisions.iter().map(|d| d.request_id.clone()).collect();
    assert_eq!(decided, ids, "every request decided, each once");
    let reasons: std::collections::HashSet<_> =
        decisions.iter().map(|d| d.reason.as_str()).collect();
    for r in &reasons {
        assert!(
            [
                "granted",
                "not_allowed",
                "authorizer_error",
                "timeout",
                "circuit_open"
            ]
            .contains(r),
            "{r}"
        );
    }
    assert!(reasons.len() >= 3, "the flapping showed: {reasons:?}");
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_stays_one_request_whether_decided_at_intake_or_queued() {
    // The access list decides at intake (no queue entry); the remote authorizer's requests go
    // through the queue. A retry finds the original either way, across restarts that switch.
    let fake = FakeAuthorizer::start(Behaviour::Answer(200, ALLOWED.into())).await;
    let dir = TestDir::new();
    let with_list = dir.config();
    let mut with_remote = dir.config();
    with_remote.authorizer = AuthorizerConfig::Http { url: fake.url() };
    let server = TestServer::start(with_list.clone()).await;
    let mut client = server.client().await;
    let at_intake = authorize_as(&mut client, STATION_A, TOKEN_GRANTED, "decided-at-intake")
        .await
        .expect("authorize");
    server.stop().await.expect("clean stop");

    let server = TestServer::start(with_remote).await;
    let mut client = server.client().await;
    let queued = authorize_as(&mut client, STATION_A, TOKEN_GRANTED, "queued")
        .await
        .expect("authorize");
    let retry = authorize_as(&mut client, STATION_A, TOKEN_GRANTED, "decided-at-intake")
        .await
        .expect("retry");
    assert!(
        retry.duplicate,
        "the retry is the request decided at intake"
    );
    assert_eq!(retry.accepted_at, at_intake.accepted_at);
    let other = authorize_as(&mut client, STATION_A, TOKEN_WILDCARD, "decided-at-intake")
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists);
    poll_until(
        "the queued request's decision",
        || {
            let mut client = client.clone();
            async move { get_decision(&mut client, "queued").await.status() }
        },
        |status| *status == DecisionStatus::Allowed,
    )
    .await;
    assert_eq!(fake.calls(), 1, "only the new request asked the authorizer");
    server.stop().await.expect("clean stop");

    let server = TestServer::start(with_list).await;
    let mut client = server.client().await;
    let retry = authorize_as(&mut client, STATION_A, TOKEN_GRANTED, "queued")
        .await
        .expect("retry");
    assert!(retry.duplicate, "the retry is the queued request");
    assert_eq!(retry.accepted_at, queued.accepted_at);
    let other = authorize_as(&mut client, STATION_A, TOKEN_WILDCARD, "queued")
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists);
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_answered_from_the_cache_while_its_request_is_queued_is_that_request() {
    let fake = FakeAuthorizer::start(Behaviour::Slow(Duration::from_secs(3), ALLOWED.into())).await;
    let (_dir, server) = server_for(fake.url(), |c| {
        c.authorizer_cache_ttl = Some(Duration::from_secs(60));
        c.authorize_timeout = Duration::from_secs(30);
    })
    .await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;
    let waiting = "waiting-for-the-authorizer";
    let first = authorize_as(&mut client, STATION_A, TOKEN_GRANTED, waiting)
        .await
        .expect("authorize");
    poll_until("the slow call", || async { fake.calls() }, |n| *n == 1).await;
    // Another request fills the cache for the same station and token while the first one waits.
    fake.set(Behaviour::Answer(200, ALLOWED.into()));
    let filler = authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    assert_eq!(
        next_decision(&mut stream).await.request_id,
        filler.request_id
    );
    // The retry would be answered from the cache, but its request_id is queued: a duplicate.
    let retry = authorize_as(&mut client, STATION_A, TOKEN_GRANTED, waiting)
        .await
        .expect("retry");
    assert!(retry.duplicate);
    assert_eq!(retry.accepted_at, first.accepted_at);
    let decided = next_decision(&mut stream).await;
    assert_eq!(
        (decided.request_id.as_str(), decided.reason.as_str()),
        (first.request_id.as_str(), "granted"),
        "decided once, by the authorizer it waited for"
    );
    server.stop().await.expect("clean stop");
}

/// `ExplainDecision` with the remote authorizer: a live answer (one call, nothing recorded),
/// then the breaker's state once it is open, without calling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_asks_the_remote_authorizer_live_and_reports_an_open_circuit() {
    use chargegate::proto::{ExplainDecisionRequest, grants_client::GrantsClient};
    let fake = FakeAuthorizer::start(Behaviour::Answer(200, ALLOWED.into())).await;
    let (_dir, server) = server_for(fake.url(), |c| {
        c.breaker.failures = 1;
        c.breaker.cooldown = Duration::from_secs(600);
    })
    .await;
    let grants = GrantsClient::new(server.channel().await);
    let ask = || {
        let mut grants = grants.clone();
        async move {
            grants
                .explain_decision(ExplainDecisionRequest {
                    station_id: STATION_A.into(),
                    driver_token: TOKEN_GRANTED.into(),
                })
                .await
                .expect("explain")
                .into_inner()
        }
    };
    let live = ask().await;
    assert_eq!(
        (
            live.status(),
            live.reason.as_str(),
            live.authorizer.as_str()
        ),
        (DecisionStatus::Allowed, "granted", "http")
    );
    assert!(live.detail.contains("answered granted"), "{}", live.detail);
    assert_eq!(fake.calls(), 1, "one live call");
    // The authorizer fails once through a real decision: the circuit opens.
    fake.set(Behaviour::Answer(500, String::new()));
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;
    assert_eq!(
        decide(&mut client, &mut stream, TOKEN_GRANTED).await.reason,
        "authorizer_error"
    );
    let calls = fake.calls();
    let open = ask().await;
    assert_eq!(
        (open.status(), open.reason.as_str()),
        (DecisionStatus::Unknown, "circuit_open")
    );
    assert_eq!(fake.calls(), calls, "no call while the circuit is open");
    drop(grants);
    server.stop().await.expect("clean stop");
}
