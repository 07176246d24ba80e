//! Client identities (`clients_file`): the status matrix of credentials, roles and station
//! scopes, call records that name the client, and reloads that keep the old file when the new
//! one is bad. Rate limits: buckets per station and per client, capped subscriptions.

use std::{os::unix::fs::PermissionsExt, path::PathBuf, time::Duration};

use chargegate::{
    proto::{
        GetDecisionRequest, ListDeliveriesRequest, ListGrantsRequest, QueryCallsRequest,
        SubscribeDecisionsRequest, audit_client::AuditClient,
        charging_authorization_client::ChargingAuthorizationClient, grants_client::GrantsClient,
        webhooks_client::WebhooksClient,
    },
    security::clients::new_token,
};
use tokio_stream::StreamExt;
use tonic::{Code, Request, metadata::MetadataValue, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt;

use crate::support::*;

/// A client of the test's clients file: its token and the `[[client]]` table holding its digest.
struct TestClient {
    token: String,
    table: String,
}

fn client(name: &str, stations: &[&str], roles: &[&str]) -> TestClient {
    let (token, digest) = new_token();
    let list = |xs: &[&str]| {
        xs.iter()
            .map(|x| format!("{x:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let table = format!(
        "[[client]]\nname = \"{name}\"\ntoken_sha256 = \"{digest}\"\nstations = [{}]\nroles = [{}]\n\n",
        list(stations),
        list(roles)
    );
    TestClient { token, table }
}

fn write_clients(dir: &TestDir, clients: &[&TestClient]) -> PathBuf {
    let path = dir.path().join("clients.toml");
    let text: String = clients.iter().map(|c| c.table.as_str()).collect();
    // Written beside and renamed into place, as an operator's tooling would.
    let next = dir.path().join("clients.toml.next");
    std::fs::write(&next, text).expect("write clients");
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::rename(&next, &path).expect("rename");
    path
}

/// `message` with `authorization` header values `values` (none, one, or several).
fn with_auth<T>(message: T, values: &[&str]) -> Request<T> {
    let mut request = Request::new(message);
    for v in values {
        request
            .metadata_mut()
            .append("authorization", MetadataValue::try_from(*v).expect("ascii"));
    }
    request
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn authorize_with(
    channel: &Channel,
    values: &[&str],
    station: &str,
) -> Result<String, tonic::Status> {
    ChargingAuthorizationClient::new(channel.clone())
        .authorize(with_auth(request(station, TOKEN_GRANTED), values))
        .await
        .map(|r| r.into_inner().request_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_roles_and_station_scopes_answer_as_the_contract_says() {
    let dir = TestDir::new();
    let gateway = client("gw-a", &[STATION_A], &["station"]);
    let everywhere = client("gw-all", &["*"], &["station"]);
    let ops = client("ops", &[], &["admin"]);
    let mut config = dir.config();
    config.clients_file = Some(write_clients(&dir, &[&gateway, &everywhere, &ops]));
    let server = TestServer::start(config).await;
    let channel = server.channel().await;
    let (gw, all, admin) = (
        bearer(&gateway.token),
        bearer(&everywhere.token),
        bearer(&ops.token),
    );

    // Credentials: each malformed or unknown one is UNAUTHENTICATED, and says nothing of it.
    let unknown = format!("Bearer {}", new_token().0);
    let basic = format!("Basic {}", gateway.token);
    let two: [&str; 2] = [&gw, &gw];
    for values in [
        &[][..],
        &["Bearer"][..],
        &["Bearer "][..],
        &[basic.as_str()][..],
        &[unknown.as_str()][..],
        &two[..],
    ] {
        let status = authorize_with(&channel, values, STATION_A)
            .await
            .expect_err("refused");
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "{values:?}: {status:?}"
        );
        assert!(
            !status.message().contains(&gateway.token),
            "the credential is never echoed"
        );
    }

    // Roles: a station client on the admin services, an admin on the station service.
    let denied = |r: Result<(), tonic::Status>, what: &str| {
        let status = r.expect_err(what);
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    };
    denied(
        GrantsClient::new(channel.clone())
            .list_grants(with_auth(ListGrantsRequest::default(), &[&gw]))
            .await
            .map(drop),
        "grants",
    );
    denied(
        AuditClient::new(channel.clone())
            .query_calls(with_auth(QueryCallsRequest::default(), &[&gw]))
            .await
            .map(drop),
        "audit",
    );
    denied(
        WebhooksClient::new(channel.clone())
            .list_deliveries(with_auth(ListDeliveriesRequest::default(), &[&gw]))
            .await
            .map(drop),
        "webhooks",
    );
    denied(
        authorize_with(&channel, &[&admin], STATION_A)
            .await
            .map(drop),
        "admin authorizing",
    );
    GrantsClient::new(channel.clone())
        .list_grants(with_auth(ListGrantsRequest::default(), &[&admin]))
        .await
        .expect("an admin lists grants");

    // Stations: validation first, then scope.
    let invalid = authorize_with(&channel, &[&gw], "station-7")
        .await
        .expect_err("invalid");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    denied(
        authorize_with(&channel, &[&gw], STATION_B).await.map(drop),
        "another station",
    );
    let mut calls = ChargingAuthorizationClient::new(channel.clone());
    denied(
        calls
            .subscribe_decisions(with_auth(
                SubscribeDecisionsRequest {
                    station_ids: vec![STATION_A.into(), STATION_B.into()],
                    after_cursor: String::new(),
                },
                &[&gw],
            ))
            .await
            .map(drop),
        "a subscription naming another station",
    );
    // A subscription naming no station covers the client's own.
    let mut own = calls
        .subscribe_decisions(with_auth(SubscribeDecisionsRequest::default(), &[&gw]))
        .await
        .expect("subscribed")
        .into_inner();
    let at_b = authorize_with(&channel, &[&all], STATION_B)
        .await
        .expect("gw-all at B");
    let at_a = authorize_with(&channel, &[&gw], STATION_A.to_uppercase().as_str())
        .await
        .expect("gw-a at its own station, in capitals");
    let first = next_decision(&mut own).await;
    assert_eq!(
        first.request_id, at_a,
        "the decision at B never reaches gw-a"
    );
    let get = |id: String, values: &[&str]| {
        let mut calls = calls.clone();
        let request = with_auth(GetDecisionRequest { request_id: id }, values);
        async move { calls.get_decision(request).await.map(drop) }
    };
    get(at_a.clone(), &[&gw]).await.expect("its own request");
    denied(get(at_b.clone(), &[&gw]).await, "another station's request");
    get(at_b, &[&all]).await.expect("a client of every station");

    // The CLI sends its bearer token from the environment.
    let cli = |token: Option<&str>| {
        let mut command = tokio::process::Command::from(crate::support::binary::chargegate());
        command.args(["grants", "--server", &server.url(), "list"]);
        command.env_remove("CHARGEGATE_CLIENT_TOKEN");
        if let Some(token) = token {
            command.env("CHARGEGATE_CLIENT_TOKEN", token);
        }
        command.output()
    };
    let with = cli(Some(&ops.token)).await.expect("grants list");
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    let without = cli(None).await.expect("grants list");
    assert!(!without.status.success());
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");

    // Health and reflection need no credential.
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("health is open");
    assert_eq!(health.into_inner().status, 1);

    // Call records name the client, never its credential.
    let records = poll_until(
        "gw-a's call records",
        || {
            let mut audit = AuditClient::new(channel.clone());
            let admin = admin.clone();
            async move {
                let mut stream = audit
                    .query_calls(with_auth(
                        QueryCallsRequest {
                            method: "Authorize".into(),
                            ..Default::default()
                        },
                        &[&admin],
                    ))
                    .await
                    .expect("query calls")
                    .into_inner();
                let mut out = Vec::new();
                while let Some(c) = stream.next().await {
                    out.push(c.expect("record"));
                }
                out
            }
        },
        |records: &Vec<_>| records.iter().any(|r| r.request_id == at_a),
    )
    .await;
    let record = records.iter().find(|r| r.request_id == at_a).unwrap();
    assert_eq!(record.client, "gw-a");
    assert!(
        records
            .iter()
            .any(|r| r.code == "PERMISSION_DENIED" && r.client == "gw-a")
    );
    assert!(
        records
            .iter()
            .any(|r| r.code == "UNAUTHENTICATED" && r.client.is_empty())
    );
    for r in &records {
        assert!(!format!("{r:?}").contains(&gateway.token));
    }
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_file_reloads_and_a_bad_one_keeps_the_clients_in_force() {
    let dir = TestDir::new();
    let first = client("gw-a", &[STATION_A], &["station"]);
    let mut config = dir.config();
    let path = write_clients(&dir, &[&first]);
    config.clients_file = Some(path.clone());
    let server = TestServer::start(config.clone()).await;
    let channel = server.channel().await;
    authorize_with(&channel, &[&bearer(&first.token)], STATION_A)
        .await
        .expect("the first token");

    // A file with a mistake: the clients in force stay.
    let next = dir.path().join("bad.toml");
    std::fs::write(
        &next,
        "[[client]]\nname = \"gw-a\"\nroles = [\"station\"]\ncolour = 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&next, &path).unwrap();
    tokio::time::sleep(chargegate::reload::POLL_INTERVAL * 3).await;
    authorize_with(&channel, &[&bearer(&first.token)], STATION_A)
        .await
        .expect("still the first token after a bad file");

    // A rotated token: the new one works within a few seconds, the old one stops.
    let second = client("gw-a", &[STATION_A], &["station"]);
    write_clients(&dir, &[&second]);
    let new = bearer(&second.token);
    poll_until(
        "the new token",
        || {
            let (channel, new) = (channel.clone(), new.clone());
            async move { authorize_with(&channel, &[&new], STATION_A).await }
        },
        Result::is_ok,
    )
    .await
    .expect("the new token");
    let old = authorize_with(&channel, &[&bearer(&first.token)], STATION_A)
        .await
        .expect_err("the old token is gone");
    assert_eq!(old.code(), Code::Unauthenticated);
    server.stop().await.expect("clean stop");

    // A file others may write is refused at start, naming it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o622)).unwrap();
    let refused = TestServer::start(config).await.stop().await;
    let message = format!("{:#}", anyhow::Error::from(refused.expect_err("refused")));
    assert!(message.contains("writable by group or others"), "{message}");
}

/// The retry delay and the quota subject of a `RESOURCE_EXHAUSTED`.
fn limited(status: &tonic::Status) -> (Duration, String) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let details = status.get_error_details();
    let delay = details
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("a RetryInfo with a delay");
    let subject = details
        .quota_failure()
        .and_then(|q| q.violations.first().map(|v| v.subject.clone()))
        .expect("a QuotaFailure naming the scope");
    (delay, subject)
}

/// Calls `call` until it is refused; the calls that passed, and the refusal.
async fn until_refused<F, Fut>(mut call: F) -> (usize, tonic::Status)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    for i in 0..200 {
        if let Err(status) = call(i).await {
            return (i, status);
        }
    }
    panic!("200 calls passed a limit of a few a second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_over_its_rate_waits_as_told_and_its_sibling_does_not() {
    let dir = TestDir::new();
    let mut config = dir.config();
    config.rate_per_station_per_s = 5;
    let server = TestServer::start(config).await;
    let mut calls = server.client().await;
    let (passed, refusal) = until_refused(|i| {
        let mut calls = calls.clone();
        async move {
            authorize_as(&mut calls, STATION_A, TOKEN_GRANTED, &format!("a-{i}"))
                .await
                .map(drop)
        }
    })
    .await;
    assert!(passed >= 10, "a burst of twice the rate passes: {passed}");
    let (delay, subject) = limited(&refusal);
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_millis(200),
        "0 < {delay:?} <= 1/rate"
    );
    assert_eq!(subject, format!("station:{STATION_A}"));
    // Nothing was enqueued for the refused call: its request_id is unknown.
    let unknown = calls
        .get_decision(GetDecisionRequest {
            request_id: format!("a-{passed}"),
        })
        .await
        .expect_err("never enqueued");
    assert_eq!(unknown.code(), Code::NotFound);
    // The sibling station has a bucket of its own.
    authorize_as(&mut calls, STATION_B, TOKEN_WILDCARD, "b-0")
        .await
        .expect("another station passes");
    // After the delay, the same station passes (the refused request_id, retried, is accepted).
    tokio::time::sleep(delay).await;
    let ack = authorize_as(&mut calls, STATION_A, TOKEN_GRANTED, &format!("a-{passed}"))
        .await
        .expect("passes after the delay");
    assert!(!ack.duplicate);
    assert!(metric("chargegate_rate_limited_total{scope=\"station\"}") >= 1.0);
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_s_own_rate_overrides_the_default_and_subscriptions_are_capped() {
    let dir = TestDir::new();
    let slow = client("gw-slow", &["*"], &["station"]);
    let slow = TestClient {
        table: slow
            .table
            .replace("roles = ", "rate = { per_second = 2 }\nroles = "),
        ..slow
    };
    let other = client("gw-other", &["*"], &["station"]);
    let mut config = dir.config();
    config.clients_file = Some(write_clients(&dir, &[&slow, &other]));
    config.rate_per_client_per_s = 1000;
    config.subscriptions_per_client = 2;
    let server = TestServer::start(config).await;
    let channel = server.channel().await;
    let (slow_auth, other_auth) = (bearer(&slow.token), bearer(&other.token));
    let (passed, refusal) = until_refused(|_| {
        let (channel, auth) = (channel.clone(), slow_auth.clone());
        async move {
            authorize_with(&channel, &[&auth], STATION_A)
                .await
                .map(drop)
        }
    })
    .await;
    assert!(
        (4..20).contains(&passed),
        "a bucket of 4, not 2,000: {passed}"
    );
    let (delay, subject) = limited(&refusal);
    assert!(delay <= Duration::from_millis(500), "{delay:?}");
    assert_eq!(subject, "client:gw-slow");
    authorize_with(&channel, &[&other_auth], STATION_A)
        .await
        .expect("another client has its own bucket");

    // Two subscriptions open; a third is refused; closing one makes room.
    let subscribe = || {
        let mut calls = ChargingAuthorizationClient::new(channel.clone());
        let auth = other_auth.clone();
        async move {
            calls
                .subscribe_decisions(with_auth(SubscribeDecisionsRequest::default(), &[&auth]))
                .await
                .map(|r| r.into_inner())
        }
    };
    let first = subscribe().await.expect("first");
    let _second = subscribe().await.expect("second");
    let (_, subject) = limited(&subscribe().await.expect_err("a third"));
    assert_eq!(subject, "subscriptions:gw-other");
    drop(first);
    poll_until("room for a subscription", subscribe, Result::is_ok)
        .await
        .expect("room again");
    server.stop().await.expect("clean stop");
}

/// Every path a credential or a driver token travels, good and bad, through the real binary
/// at debug level; then its log, its call records, its metrics and its data dir hold neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_bearer_or_driver_token_reaches_a_log_a_record_a_metric_or_the_data_dir() {
    use crate::support::binary::ChildServer;
    let dir = TestDir::new();
    let gateway = client("gw-a", &[STATION_A], &["station"]);
    let ops = client("ops", &[], &["admin"]);
    let clients = write_clients(&dir, &[&gateway, &ops]);
    let acl = dir.write_acl(&standard_acl());
    let mut server = ChildServer::start_with_metrics(
        &dir,
        &acl,
        &[
            "--clients-file",
            &clients.display().to_string(),
            "--rate-per-station-per-s",
            "2",
        ],
    );
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let unknown = new_token().0;
    let (gw, admin) = (bearer(&gateway.token), bearer(&ops.token));
    let secret_driver = "DRIVER-secret-token-0042-zz";
    let basic = format!("Basic {}", gateway.token);
    let as_bearer = format!("Bearer {secret_driver}");
    let unknown_bearer = bearer(&unknown);
    let mut calls = ChargingAuthorizationClient::new(channel.clone());
    let mut stream = calls
        .subscribe_decisions(with_auth(SubscribeDecisionsRequest::default(), &[&gw]))
        .await
        .expect("subscribed")
        .into_inner();
    for token in [TOKEN_GRANTED, secret_driver, "DRIVER-malformed!"] {
        for values in [
            vec![gw.as_str()],
            vec![],
            vec![basic.as_str()],
            vec![as_bearer.as_str()],
            vec![unknown_bearer.as_str()],
            vec![gw.as_str(), gw.as_str()],
            vec![admin.as_str()],
        ] {
            for station in [STATION_A, STATION_B, secret_driver] {
                let _ = calls
                    .authorize(with_auth(request(station, token), &values))
                    .await;
            }
        }
    }
    // Some of those were decided; one reached the stream.
    next_decision(&mut stream).await;
    let mut records = AuditClient::new(channel.clone())
        .query_calls(with_auth(QueryCallsRequest::default(), &[&admin]))
        .await
        .expect("call records")
        .into_inner();
    let mut seen = String::new();
    while let Some(r) = records.next().await {
        seen.push_str(&format!("{:?}\n", r.expect("record")));
    }
    seen.push_str(&server.scrape_metrics());
    server.signal("TERM");
    assert_eq!(server.wait(PATIENCE), Some(0));
    seen.push_str(&server.start_log.join("\n"));
    seen.push_str(&server.drain_log().join("\n"));
    assert!(seen.contains("gw-a"), "the scan reads what it should");
    for secret in [
        gateway.token.as_str(),
        ops.token.as_str(),
        unknown.as_str(),
        secret_driver,
        TOKEN_GRANTED,
    ] {
        assert!(
            !seen.contains(secret),
            "a secret reached a log line, call record or metric"
        );
        let hits = files_containing(&dir.data_dir(), secret.as_bytes());
        assert!(hits.is_empty(), "a secret is in {hits:?}");
    }
}
