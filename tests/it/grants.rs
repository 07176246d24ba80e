//! `chargegate.v1.Grants`: grants kept in the store take effect for the next decision, survive a
//! restart, are listed only as fingerprints, and are read-only when an access-list file rules.

use chargegate::{
    config::AuthorizerConfig,
    proto::{DeleteGrantRequest, ListGrantsRequest, PutGrantRequest, grants_client::GrantsClient},
};
use tonic::Code;

use crate::support::*;

fn put(station: &str, token: &str) -> PutGrantRequest {
    PutGrantRequest {
        station_id: station.into(),
        driver_token: token.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_round_trip_take_effect_at_once_and_never_show_a_token() {
    let dir = TestDir::new();
    let mut config = dir.config();
    config.authorizer = AuthorizerConfig::Acl { file: None };
    let server = TestServer::start(config.clone()).await;
    let mut client = server.client().await;
    let mut grants = GrantsClient::new(server.channel().await);
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;

    authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    assert_eq!(next_decision(&mut stream).await.reason, "no_grant");

    let grant = grants
        .put_grant(put(&STATION_A.to_uppercase(), TOKEN_GRANTED))
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    assert_eq!(grant.station_id, STATION_A);
    assert_eq!(grant.driver_token_fingerprint.len(), 32);
    authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    assert_eq!(
        next_decision(&mut stream).await.reason,
        "granted",
        "a put takes effect for the next decision"
    );

    grants
        .put_grant(PutGrantRequest {
            blocked: true,
            ..put("*", TOKEN_WILDCARD)
        })
        .await
        .unwrap();
    authorize(&mut client, STATION_A, TOKEN_WILDCARD).await;
    assert_eq!(next_decision(&mut stream).await.reason, "blocked");

    let listed = grants
        .list_grants(ListGrantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(listed.len(), 2);
    assert!(
        !format!("{listed:?}").contains("TOKEN-"),
        "listed only as fingerprints"
    );
    let only_a = grants
        .list_grants(ListGrantsRequest {
            station_id: STATION_A.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(only_a, vec![grant.clone()]);

    // Bad input names its fields and changes nothing.
    let status = grants.put_grant(put("nope", "short")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields = bad_fields(&status);
    assert_eq!(fields, ["station_id", "driver_token"]);
    assert!(!status.message().contains("short"));
    assert_eq!(
        grants
            .list_grants(ListGrantsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .grants
            .len(),
        2
    );

    // Grants live in the store: they survive a restart.
    server.stop().await.expect("clean stop");
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let mut grants = GrantsClient::new(server.channel().await);
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;
    authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    assert_eq!(next_decision(&mut stream).await.reason, "granted");

    let deleted = grants
        .delete_grant(DeleteGrantRequest {
            station_id: STATION_A.into(),
            driver_token: TOKEN_GRANTED.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .deleted;
    assert!(deleted);
    authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    assert_eq!(
        next_decision(&mut stream).await.reason,
        "no_grant",
        "a delete takes effect for the next decision"
    );
    server.stop().await.expect("clean stop");
    let hits = files_containing(&dir.data_dir(), TOKEN_GRANTED.as_bytes());
    assert!(hits.is_empty(), "no plain token in the store: {hits:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_acl_file_grants_are_read_only_and_listed_from_the_file() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut grants = GrantsClient::new(server.channel().await);
    let status = grants
        .put_grant(put(STATION_A, TOKEN_UNKNOWN))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let listed = grants
        .list_grants(ListGrantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(listed.len(), 5, "the five grants of the standard list");
    server.stop().await.expect("clean stop");
}

/// `chargegate grants import` puts every row of an access-list CSV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_imports_an_access_list() {
    let dir = TestDir::new();
    let mut config = dir.config();
    config.authorizer = AuthorizerConfig::Acl { file: None };
    let csv = dir.path().join("import.csv");
    std::fs::write(&csv, standard_acl()).unwrap();
    let server = TestServer::start(config).await;
    let out = tokio::process::Command::from(crate::support::binary::chargegate())
        .args(["grants", "--server", &server.url(), "import"])
        .arg(&csv)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"imported\":5"));
    let out = tokio::process::Command::from(crate::support::binary::chargegate())
        .args(["grants", "--server", &server.url(), "list"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 5);
    assert!(!stdout.contains("TOKEN-"));
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[STATION_B], "").await;
    authorize(&mut client, STATION_B, TOKEN_WILDCARD).await;
    assert_eq!(next_decision(&mut stream).await.reason, "granted");
    server.stop().await.expect("clean stop");
}

async fn explain(
    grants: &mut GrantsClient<tonic::transport::Channel>,
    station: &str,
    token: &str,
) -> chargegate::proto::ExplainDecisionResponse {
    grants
        .explain_decision(chargegate::proto::ExplainDecisionRequest {
            station_id: station.into(),
            driver_token: token.into(),
        })
        .await
        .expect("explain")
        .into_inner()
}

/// `ExplainDecision` names the grants that decide, for an expired, a blocked, a wildcard and a
/// missing grant, and a malformed token; it records no decision and enqueues nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_names_the_grants_that_decide_and_records_nothing() {
    use chargegate::proto::DecisionStatus;
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut stream = subscribe(&mut client, &[], "").await;
    let mut grants = GrantsClient::new(server.channel().await);
    let stations = |r: &chargegate::proto::ExplainDecisionResponse| {
        let mut s: Vec<String> = r.matched.iter().map(|g| g.station_id.clone()).collect();
        s.sort();
        s
    };

    let expired = explain(&mut grants, STATION_A, TOKEN_EXPIRED).await;
    assert_eq!(
        (
            expired.status(),
            expired.reason.as_str(),
            expired.authorizer.as_str()
        ),
        (DecisionStatus::NotAllowed, "expired", "acl")
    );
    assert_eq!(stations(&expired), [STATION_A]);
    assert!(expired.matched[0].expires_at.is_some());
    assert!(
        expired.detail.contains("expired at 2001-01-01"),
        "{}",
        expired.detail
    );

    let blocked = explain(&mut grants, STATION_A, TOKEN_BLOCKED).await;
    assert_eq!(
        (blocked.status(), blocked.reason.as_str()),
        (DecisionStatus::NotAllowed, "blocked")
    );
    assert_eq!(
        stations(&blocked),
        ["*", STATION_A],
        "the station's grant and the blocking *"
    );
    assert!(
        blocked
            .matched
            .iter()
            .any(|g| g.station_id == "*" && g.blocked)
    );
    assert!(
        blocked.detail.contains("every station (*) blocks"),
        "{}",
        blocked.detail
    );

    let wildcard = explain(&mut grants, STATION_B, TOKEN_WILDCARD).await;
    assert_eq!(
        (wildcard.status(), wildcard.reason.as_str()),
        (DecisionStatus::Allowed, "granted")
    );
    assert_eq!(stations(&wildcard), ["*"]);
    assert!(
        wildcard.detail.contains("until 2999-12-31"),
        "{}",
        wildcard.detail
    );

    let missing = explain(&mut grants, STATION_B, TOKEN_GRANTED).await;
    assert_eq!(
        (missing.status(), missing.reason.as_str()),
        (DecisionStatus::NotAllowed, "no_grant")
    );
    assert!(missing.matched.is_empty());
    assert!(missing.detail.contains("no grant"), "{}", missing.detail);

    let malformed = explain(&mut grants, STATION_A, "short").await;
    assert_eq!(
        (
            malformed.status(),
            malformed.reason.as_str(),
            malformed.authorizer.as_str()
        ),
        (DecisionStatus::Invalid, "token_format", "format")
    );
    for r in [&expired, &blocked, &wildcard, &missing] {
        for g in &r.matched {
            assert_eq!(
                g.driver_token_fingerprint.len(),
                32,
                "a fingerprint, never the token"
            );
        }
    }

    // Validation as Authorize's.
    let status = grants
        .explain_decision(chargegate::proto::ExplainDecisionRequest {
            station_id: "station-7".into(),
            driver_token: String::new(),
        })
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields = bad_fields(&status);
    assert_eq!(fields, ["station_id", "driver_token"]);

    // Nothing recorded, nothing queued: the next decision on the stream is the next Authorize.
    let ack = authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    assert_eq!(next_decision(&mut stream).await.request_id, ack.request_id);
    server.stop().await.expect("clean stop");
}

/// The CLI's `explain --station … --token …`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_explains_a_decision() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let out = tokio::process::Command::from(crate::support::binary::chargegate())
        .args(["explain", "--server", &server.url(), "--station", STATION_A])
        .env("CHARGEGATE_DRIVER_TOKEN", TOKEN_EXPIRED)
        .output()
        .await
        .expect("chargegate explain");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(answer["status"], "not_allowed");
    assert_eq!(answer["reason"], "expired");
    assert_eq!(answer["matched"][0]["station_id"], STATION_A);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(TOKEN_EXPIRED));
    server.stop().await.expect("clean stop");
}
