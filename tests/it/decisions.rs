//! Every row of CONTRACT §2, end to end: Authorize → queue → decision → stream and GetDecision.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use chargegate::{
    authorizer::{AuthorizationRequest, Authorizer},
    decision::{DecidedBy, Verdict},
    proto::{DecisionStatus, GetDecisionRequest},
};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_row_of_the_contract() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut all = subscribe(&mut client, &[], "").await;

    let long = "L".repeat(81);
    let cases: Vec<(&str, String, DecisionStatus, &str)> = vec![
        (
            STATION_A,
            TOKEN_GRANTED.into(),
            DecisionStatus::Allowed,
            "granted",
        ),
        (
            STATION_B,
            TOKEN_GRANTED.into(),
            DecisionStatus::NotAllowed,
            "no_grant",
        ),
        (
            STATION_B,
            TOKEN_WILDCARD.into(),
            DecisionStatus::Allowed,
            "granted",
        ),
        (
            STATION_A,
            TOKEN_EXPIRED.into(),
            DecisionStatus::NotAllowed,
            "expired",
        ),
        (
            STATION_A,
            TOKEN_BLOCKED.into(),
            DecisionStatus::NotAllowed,
            "blocked",
        ),
        (
            STATION_A,
            TOKEN_UNKNOWN.into(),
            DecisionStatus::NotAllowed,
            "no_grant",
        ),
        // Malformed tokens: accepted, then decided INVALID without asking the authorizer.
        (
            STATION_A,
            "TOKEN-short-19chars".into(),
            DecisionStatus::Invalid,
            "token_format",
        ),
        (
            STATION_A,
            long.clone(),
            DecisionStatus::Invalid,
            "token_format",
        ),
        (
            STATION_A,
            "TOKEN with spaces 0000000".into(),
            DecisionStatus::Invalid,
            "token_format",
        ),
        (
            STATION_A,
            "TOKEN+plus/slash=000000".into(),
            DecisionStatus::Invalid,
            "token_format",
        ),
        (
            STATION_A,
            "TOKEN-ünïcödé-000000000".into(),
            DecisionStatus::Invalid,
            "token_format",
        ),
    ];
    let mut expected = std::collections::HashMap::new();
    for (station, token, status, reason) in &cases {
        let ack = authorize(&mut client, &station.to_uppercase(), token).await;
        assert_eq!(ack.status, 1, "ACCEPT_STATUS_ACCEPTED");
        assert!(!ack.duplicate);
        assert_eq!(
            ack.message,
            "Request is being processed asynchronously. The result will be pushed to decision subscribers."
        );
        assert!(ack.accepted_at.is_some());
        expected.insert(ack.request_id, (*station, token.clone(), *status, *reason));
    }

    let decisions = next_decisions(&mut all, cases.len()).await;
    let mut last_cursor = String::new();
    for d in &decisions {
        let (station, token, status, reason) = expected
            .get(&d.request_id)
            .expect("a decision for each request");
        assert_eq!(
            d.station_id, *station,
            "station ids come back canonical (lower case)"
        );
        assert_eq!(
            (d.status(), d.reason.as_str()),
            (*status, *reason),
            "{token:?}"
        );
        assert_eq!(d.driver_token_fingerprint.len(), 32);
        assert!(
            !format!("{d:?}").contains(token.as_str()),
            "a decision never carries the token"
        );
        assert!(d.decided_at.is_some() && d.accepted_at.is_some());
        assert!(!d.cursor.is_empty() && d.cursor != last_cursor);
        last_cursor = d.cursor.clone();

        let polled = get_decision(&mut client, &d.request_id).await;
        assert_eq!(&polled, d, "GetDecision returns what was streamed");
    }
    // The same token gets the same fingerprint; different tokens get different ones.
    let fp = |token: &str| {
        decisions
            .iter()
            .filter(|d| expected[&d.request_id].1 == token)
            .map(|d| d.driver_token_fingerprint.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(fp(TOKEN_GRANTED).len(), 2);
    assert_eq!(fp(TOKEN_GRANTED)[0], fp(TOKEN_GRANTED)[1]);
    assert_ne!(fp(TOKEN_GRANTED)[0], fp(TOKEN_WILDCARD)[0]);

    let missing = client
        .get_decision(GetDecisionRequest {
            request_id: "never-seen".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    server.stop().await.expect("clean stop");
}

/// An authorizer that answers only after a long time.
struct SlowAuthorizer(Duration);

#[async_trait]
impl Authorizer for SlowAuthorizer {
    fn kind(&self) -> DecidedBy {
        DecidedBy::Http
    }

    async fn authorize(&self, _: AuthorizationRequest<'_>) -> Verdict {
        tokio::time::sleep(self.0).await;
        Verdict::new(chargegate::decision::Reason::Granted, DecidedBy::Http)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_authorizer_is_unknown_at_the_deadline() {
    let dir = TestDir::new();
    let mut config = dir.config();
    config.authorize_timeout = Duration::from_millis(300);
    let server = TestServer::start_with(
        config,
        Some(Arc::new(SlowAuthorizer(Duration::from_secs(60)))),
    )
    .await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;
    let ack = authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    let started = std::time::Instant::now();
    let d = next_decision(&mut stream).await;
    assert_eq!(d.request_id, ack.request_id);
    assert_eq!(
        (d.status(), d.reason.as_str()),
        (DecisionStatus::Unknown, "timeout")
    );
    assert!(
        d.processing_time_ms >= 300,
        "decided at the deadline, not before: {}",
        d.processing_time_ms
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the 60 s authorizer was not waited for"
    );

    // A malformed token is never sent to the (slow) authorizer.
    let ack = authorize(&mut client, STATION_A, "bad").await;
    let d = next_decision(&mut stream).await;
    assert_eq!(d.request_id, ack.request_id);
    assert_eq!(
        (d.status(), d.reason.as_str()),
        (DecisionStatus::Invalid, "token_format")
    );
    assert!(
        d.processing_time_ms < 300,
        "decided without waiting for the authorizer"
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_list_reloads_when_the_file_changes() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[STATION_B], "").await;

    authorize(&mut client, STATION_B, TOKEN_UNKNOWN).await;
    assert_eq!(next_decision(&mut stream).await.reason, "no_grant");

    // A bad file is refused as a whole (even its good rows) and the old list stays in force.
    let errors_before = acl_reload_errors();
    dir.write_acl(&format!(
        "{}{STATION_B},{TOKEN_UNKNOWN},,\nnot-a-station,{TOKEN_UNKNOWN},,\n",
        standard_acl()
    ));
    let deadline = std::time::Instant::now() + PATIENCE;
    while acl_reload_errors() == errors_before {
        assert!(
            std::time::Instant::now() < deadline,
            "the bad access list was never read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    authorize(&mut client, STATION_B, TOKEN_UNKNOWN).await;
    assert_eq!(
        next_decision(&mut stream).await.reason,
        "no_grant",
        "the previous list stayed in force"
    );

    // A good file is picked up; wait until the new grant shows (polled once a second).
    let mut updated = standard_acl();
    updated.push_str(&format!("{STATION_B},{TOKEN_UNKNOWN},,\n"));
    dir.write_acl(&updated);
    decide_until(
        &mut client,
        &mut stream,
        (STATION_B, TOKEN_UNKNOWN),
        "granted",
        "no_grant",
        "the new access list was never loaded",
    )
    .await;
    server.stop().await.expect("clean stop");
}

/// Failed access-list reloads so far in this process.
fn acl_reload_errors() -> u64 {
    metric("chargegate_acl_reloads_total{outcome=\"error\"}") as u64
}
