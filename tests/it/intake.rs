//! Intake: every INVALID_ARGUMENT with its field violation, nothing enqueued for a bad request,
//! idempotent request ids.

use chargegate::proto::{
    AuthorizeRequest, DecisionStatus, GetDecisionRequest, SubscribeDecisionsRequest,
};
use tonic::Code;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_each_field_and_change_nothing() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let secret = "SECRET-token-never-echoed-123";
    let long_url = format!("https://example.com/{}", "p".repeat(2040));
    let long_id = "r".repeat(129);
    let cases: Vec<(AuthorizeRequest, Vec<&str>)> = vec![
        (
            AuthorizeRequest {
                station_id: "".into(),
                driver_token: secret.into(),
                ..Default::default()
            },
            vec!["station_id"],
        ),
        (
            AuthorizeRequest {
                station_id: "station-7".into(),
                driver_token: secret.into(),
                ..Default::default()
            },
            vec!["station_id"],
        ),
        (
            AuthorizeRequest {
                station_id: STATION_A.replace('-', ""),
                driver_token: secret.into(),
                ..Default::default()
            },
            vec!["station_id"],
        ),
        (
            AuthorizeRequest {
                station_id: STATION_A.into(),
                driver_token: "".into(),
                ..Default::default()
            },
            vec!["driver_token"],
        ),
        (
            AuthorizeRequest {
                station_id: STATION_A.into(),
                driver_token: secret.into(),
                callback_url: "ftp://example.com/x".into(),
                ..Default::default()
            },
            vec!["callback_url"],
        ),
        (
            AuthorizeRequest {
                station_id: STATION_A.into(),
                driver_token: secret.into(),
                callback_url: "not a url".into(),
                ..Default::default()
            },
            vec!["callback_url"],
        ),
        (
            AuthorizeRequest {
                station_id: STATION_A.into(),
                driver_token: secret.into(),
                callback_url: long_url,
                ..Default::default()
            },
            vec!["callback_url"],
        ),
        (
            AuthorizeRequest {
                station_id: STATION_A.into(),
                driver_token: secret.into(),
                request_id: "has space".into(),
                ..Default::default()
            },
            vec!["request_id"],
        ),
        (
            AuthorizeRequest {
                station_id: STATION_A.into(),
                driver_token: secret.into(),
                request_id: long_id,
                ..Default::default()
            },
            vec!["request_id"],
        ),
        (
            AuthorizeRequest {
                station_id: "nope".into(),
                driver_token: "".into(),
                callback_url: "mailto:x@example.com".into(),
                request_id: "bad id!".into(),
            },
            vec!["station_id", "driver_token", "callback_url", "request_id"],
        ),
    ];
    for (i, (mut req, fields)) in cases.into_iter().enumerate() {
        let probe_id = format!("bad-{i}");
        if req.request_id.is_empty() {
            req.request_id = probe_id.clone();
        }
        let status = client.authorize(req.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{req:?}");
        assert_eq!(bad_fields(&status), fields, "{req:?}");
        assert!(
            !status.message().contains(secret),
            "errors never echo the token"
        );
        if !fields.contains(&"request_id") {
            let lookup = client
                .get_decision(GetDecisionRequest {
                    request_id: probe_id,
                })
                .await
                .unwrap_err();
            assert_eq!(
                lookup.code(),
                Code::NotFound,
                "nothing was enqueued for {req:?}"
            );
        }
    }

    // Subscriptions validate too.
    let status = client
        .subscribe_decisions(SubscribeDecisionsRequest {
            station_ids: vec![STATION_A.into(), "x".into()],
            after_cursor: "".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&status), ["station_ids"]);
    let status = client
        .get_decision(GetDecisionRequest {
            request_id: "".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&status), ["request_id"]);

    // A callback URL changes the acknowledgement's message.
    let ack = client
        .authorize(AuthorizeRequest {
            station_id: STATION_A.into(),
            driver_token: TOKEN_GRANTED.into(),
            callback_url: "https://example.com/hook".into(),
            request_id: "".into(),
        })
        .await
        .expect("authorize")
        .into_inner();
    assert_eq!(
        ack.message,
        "Request is being processed asynchronously. The result will be sent to the provided callback URL."
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_id_is_acknowledged_once_and_decided_once() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;

    let mut req = request(STATION_A, TOKEN_GRANTED);
    req.request_id = "gateway-42:retry-safe".into();
    let first = client
        .authorize(req.clone())
        .await
        .expect("first")
        .into_inner();
    assert!(!first.duplicate);
    // Concurrent retries on separate connections.
    let mut retries = Vec::new();
    for _ in 0..8 {
        let mut c = server.client().await;
        let req = req.clone();
        retries.push(tokio::spawn(async move {
            c.authorize(req).await.map(|r| r.into_inner())
        }));
    }
    for retry in retries {
        let ack = retry.await.expect("join").expect("retry acknowledged");
        assert!(ack.duplicate);
        assert_eq!(ack.request_id, first.request_id);
        assert_eq!(
            ack.accepted_at, first.accepted_at,
            "the original acknowledgement"
        );
    }
    // Same id, another token or station: ALREADY_EXISTS.
    let mut other = req.clone();
    other.driver_token = TOKEN_WILDCARD.into();
    assert_eq!(
        client.authorize(other).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    let mut other = req.clone();
    other.station_id = STATION_B.into();
    assert_eq!(
        client.authorize(other).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    let d = next_decision(&mut stream).await;
    assert_eq!(d.request_id, first.request_id);
    // A marker request proves nothing else for this station was decided in between.
    let marker = authorize(&mut client, STATION_A, TOKEN_UNKNOWN).await;
    assert_eq!(
        next_decision(&mut stream).await.request_id,
        marker.request_id,
        "decided exactly once"
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_list_decides_each_request_before_it_is_acknowledged() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;
    let cases = [
        (TOKEN_GRANTED, DecisionStatus::Allowed),
        (TOKEN_UNKNOWN, DecisionStatus::NotAllowed),
        (TOKEN_EXPIRED, DecisionStatus::NotAllowed),
        ("short", DecisionStatus::Invalid),
    ];
    for round in 0..10 {
        for (token, status) in cases {
            let ack = authorize(&mut client, STATION_A, token).await;
            // No wait: the decision was committed with the acknowledgement.
            let decision = get_decision(&mut client, &ack.request_id).await;
            assert_eq!(decision.status(), status, "round {round}, {status:?}");
            assert!(!decision.cursor.is_empty());
            let pushed = next_decision(&mut stream).await;
            assert_eq!(
                (pushed.request_id, pushed.cursor),
                (ack.request_id, decision.cursor)
            );
        }
    }
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_only_requests_that_must_wait_in_it() {
    let dir = TestDir::new();
    let mut config = dir.config();
    config.queue_max = 1;
    let slow: std::sync::Arc<dyn chargegate::authorizer::Authorizer> = std::sync::Arc::new(Stall);
    config.authorize_timeout = std::time::Duration::from_secs(60);
    let server = TestServer::start_with(config, Some(slow)).await;
    let mut client = server.client().await;
    let waiting = authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    let status = client
        .authorize(request(STATION_A, TOKEN_GRANTED))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    // A malformed token is decided without the authorizer: it never enters the queue.
    let malformed = authorize(&mut client, STATION_A, "not a token!").await;
    for (id, status) in [
        (waiting.request_id, DecisionStatus::Pending),
        (malformed.request_id, DecisionStatus::Invalid),
    ] {
        assert_eq!(get_decision(&mut client, &id).await.status(), status);
    }
    drop(server);
}

/// Never answers.
struct Stall;

#[async_trait::async_trait]
impl chargegate::authorizer::Authorizer for Stall {
    fn kind(&self) -> chargegate::decision::DecidedBy {
        chargegate::decision::DecidedBy::Http
    }
    async fn authorize(
        &self,
        _: chargegate::authorizer::AuthorizationRequest<'_>,
    ) -> chargegate::decision::Verdict {
        std::future::pending().await
    }
}
