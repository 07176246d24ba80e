//! The audit trail: call records from the RPC layer, decision queries in every shape and format,
//! the hash chain against an edited row, retention of call records, and no token anywhere.

use std::collections::BTreeSet;

use chargegate::{
    decision::Micros,
    proto::{
        AuthorizeRequest, CallRecord, Decision, DecisionStatus, GetDecisionRequest,
        QueryCallsRequest, QueryDecisionsRequest, audit_client::AuditClient,
    },
};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::backend::Value;
use crate::support::{
    STATION_A, STATION_B, TOKEN_GRANTED, TOKEN_UNKNOWN, TOKEN_WILDCARD, TestDir, TestServer,
    authorize, files_containing, next_decisions, poll_until, subscribe,
};

async fn audit(server: &TestServer) -> AuditClient<tonic::transport::Channel> {
    AuditClient::new(server.channel().await)
}

async fn calls(server: &TestServer, method: &str) -> Vec<CallRecord> {
    let mut stream = audit(server)
        .await
        .query_calls(QueryCallsRequest {
            method: method.into(),
            ..Default::default()
        })
        .await
        .expect("query calls")
        .into_inner();
    let mut out = Vec::new();
    while let Some(c) = stream.next().await {
        out.push(c.expect("call record"));
    }
    out
}

/// Call records are written in batches: polls until `done` holds.
async fn calls_until(
    server: &TestServer,
    method: &str,
    done: impl Fn(&[CallRecord]) -> bool,
) -> Vec<CallRecord> {
    poll_until(
        "call records",
        || calls(server, method),
        |c: &Vec<CallRecord>| done(c),
    )
    .await
}

async fn decisions(server: &TestServer, q: QueryDecisionsRequest) -> Vec<Decision> {
    let mut stream = audit(server)
        .await
        .query_decisions(q)
        .await
        .expect("query decisions")
        .into_inner();
    let mut out = Vec::new();
    while let Some(d) = stream.next().await {
        out.push(d.expect("decision"));
    }
    out
}

fn authorize_request(station: &str, token: &str, request_id: &str) -> AuthorizeRequest {
    AuthorizeRequest {
        station_id: station.into(),
        driver_token: token.into(),
        callback_url: String::new(),
        request_id: request_id.into(),
    }
}

#[tokio::test]
async fn every_call_is_recorded_with_its_code_and_stream_events() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut watch = subscribe(&mut client, &[STATION_A], "").await;
    client
        .authorize(authorize_request(
            &STATION_A.to_uppercase(),
            TOKEN_GRANTED,
            "audit-ok-1",
        ))
        .await
        .expect("authorize");
    let refused = client
        .authorize(authorize_request(
            "not-a-station",
            TOKEN_GRANTED,
            "audit-bad-1",
        ))
        .await
        .expect_err("a bad station");
    assert_eq!(refused.code(), Code::InvalidArgument);
    // A caller who swaps the fields: the token is refused as a station and never recorded.
    let swapped = client
        .authorize(authorize_request(
            TOKEN_GRANTED,
            STATION_A,
            "audit-swapped-1",
        ))
        .await
        .expect_err("a token where the station goes");
    assert_eq!(swapped.code(), Code::InvalidArgument);
    let missing = client
        .get_decision(GetDecisionRequest {
            request_id: "audit-missing".into(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(missing.code(), Code::NotFound);
    next_decisions(&mut watch, 1).await;
    drop(watch);
    // A method the server does not have: recorded, under a fixed name.
    let mut raw = tonic::client::Grpc::new(server.channel().await);
    raw.ready().await.unwrap();
    let nope: Result<tonic::Response<chargegate::proto::GetDecisionResponse>, tonic::Status> = raw
        .unary(
            tonic::Request::new(GetDecisionRequest::default()),
            http::uri::PathAndQuery::from_static("/chargegate.v1.ChargingAuthorization/Nope"),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_eq!(
        nope.expect_err("no such method").code(),
        Code::Unimplemented
    );

    let authorize = calls_until(&server, "Authorize", |c| c.len() == 3).await;
    let ok = authorize
        .iter()
        .find(|c| c.code == "OK")
        .expect("the accepted call");
    assert_eq!(ok.method, "/chargegate.v1.ChargingAuthorization/Authorize");
    assert_eq!(
        (ok.station_id.as_str(), ok.request_id.as_str()),
        (STATION_A, "audit-ok-1")
    );
    assert!(ok.peer.starts_with("127.0.0.1:"), "{}", ok.peer);
    assert_eq!(ok.stream_event, "");
    let bad = authorize
        .iter()
        .find(|c| c.code == "INVALID_ARGUMENT" && c.request_id == "audit-bad-1")
        .expect("the refused call");
    assert_eq!(
        (bad.station_id.as_str(), bad.request_id.as_str()),
        ("not-a-station", "audit-bad-1")
    );
    let swapped = authorize
        .iter()
        .find(|c| c.request_id == "audit-swapped-1")
        .expect("the swapped call");
    assert_eq!(
        (swapped.station_id.as_str(), swapped.code.as_str()),
        ("(redacted)", "INVALID_ARGUMENT")
    );

    let unknown = calls_until(&server, "unknown", |c| c.len() == 1).await;
    assert_eq!(
        (unknown[0].method.as_str(), unknown[0].code.as_str()),
        ("unknown", "UNIMPLEMENTED")
    );

    let get = calls_until(&server, "GetDecision", |c| c.len() == 1).await;
    assert_eq!(
        (get[0].code.as_str(), get[0].request_id.as_str()),
        ("NOT_FOUND", "audit-missing")
    );

    let stream = calls_until(
        &server,
        "/chargegate.v1.ChargingAuthorization/SubscribeDecisions",
        |c| c.len() == 2,
    )
    .await;
    assert_eq!(
        (stream[0].stream_event.as_str(), stream[0].code.as_str()),
        ("open", "OK")
    );
    assert_eq!(stream[0].station_id, STATION_A);
    assert_eq!(
        (stream[1].stream_event.as_str(), stream[1].code.as_str()),
        ("close", "CANCELLED")
    );
    assert_eq!(
        stream[1].station_id, STATION_A,
        "the close keeps its station"
    );
    assert!(
        stream[1].messages_sent >= 1,
        "the decision was sent: {:?}",
        stream[1]
    );

    // Every call so far (and the queries themselves) is in the unfiltered listing, none with a token.
    let all = calls(&server, "").await;
    assert!(all.len() >= 7);
    assert!(!format!("{all:?}").contains(TOKEN_GRANTED));
    assert!(crate::support::metric("chargegate_audit_records_total") >= 6.0);
    server.stop().await.expect("clean stop");
    assert!(files_containing(&dir.data_dir(), TOKEN_GRANTED.as_bytes()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_queries_return_exactly_the_matching_records() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut watch = subscribe(&mut client, &[], "").await;
    let plan = [
        (STATION_A, TOKEN_GRANTED),  // allowed
        (STATION_B, TOKEN_GRANTED),  // not_allowed (no grant at B)
        (STATION_A, "short"),        // invalid
        (STATION_B, TOKEN_WILDCARD), // allowed
        (STATION_A, TOKEN_UNKNOWN),  // not_allowed
        (STATION_B, "x"),            // invalid
    ];
    for (station, token) in plan {
        authorize(&mut client, station, token).await;
    }
    let streamed = next_decisions(&mut watch, plan.len()).await;

    // Everything: the same records the stream carried, field for field.
    let all = decisions(&server, QueryDecisionsRequest::default()).await;
    let key = |d: &Decision| {
        (
            d.request_id.clone(),
            d.status,
            d.reason.clone(),
            d.cursor.clone(),
        )
    };
    let streamed_keys: BTreeSet<_> = streamed.iter().map(key).collect();
    assert_eq!(all.iter().map(key).collect::<BTreeSet<_>>(), streamed_keys);
    for d in &all {
        let same = streamed.iter().find(|s| s.request_id == d.request_id);
        assert_eq!(Some(d), same, "the record is the decision as streamed");
    }
    let times: Vec<Micros> = all
        .iter()
        .map(|d| Micros::from_proto(&d.decided_at.unwrap()))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first");

    let expect = |pred: &dyn Fn(&Decision) -> bool| -> BTreeSet<String> {
        streamed
            .iter()
            .filter(|d| pred(d))
            .map(|d| d.request_id.clone())
            .collect()
    };
    let ids = |ds: Vec<Decision>| {
        ds.into_iter()
            .map(|d| d.request_id)
            .collect::<BTreeSet<_>>()
    };

    let at_a = decisions(
        &server,
        QueryDecisionsRequest {
            station_id: STATION_A.to_uppercase(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(at_a), expect(&|d| d.station_id == STATION_A));

    let invalid = decisions(
        &server,
        QueryDecisionsRequest {
            statuses: vec![DecisionStatus::Invalid as i32],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        ids(invalid),
        expect(&|d| d.status == DecisionStatus::Invalid as i32)
    );

    let refused_at_b = decisions(
        &server,
        QueryDecisionsRequest {
            station_id: STATION_B.into(),
            statuses: vec![
                DecisionStatus::NotAllowed as i32,
                DecisionStatus::Invalid as i32,
            ],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        ids(refused_at_b),
        expect(&|d| d.station_id == STATION_B && d.status != DecisionStatus::Allowed as i32)
    );

    // A time window: from the fourth decision's time on, exclusive of a `to` after the last.
    let window = decisions(
        &server,
        QueryDecisionsRequest {
            from: Some(times[3].to_proto()),
            to: Some(Micros(times[5].0 + 1).to_proto()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        ids(window),
        expect(&|d| Micros::from_proto(&d.decided_at.unwrap()) >= times[3])
    );
    let limited = decisions(
        &server,
        QueryDecisionsRequest {
            limit: 4,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(limited.len(), 4);

    // Bad filters name their fields and return nothing.
    let refused = audit(&server)
        .await
        .query_decisions(QueryDecisionsRequest {
            station_id: "nope".into(),
            statuses: vec![DecisionStatus::Pending as i32],
            from: Some(times[3].to_proto()),
            to: Some(times[0].to_proto()),
            limit: 0,
        })
        .await
        .expect_err("bad filters");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let mut fields: Vec<String> = refused
        .get_details_bad_request()
        .expect("BadRequest")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    fields.sort();
    assert_eq!(fields, ["station_id", "statuses", "to"]);

    // The command line prints the same records as a table, as JSON lines and as CSV.
    let cli = |format: &str| {
        let out = crate::support::binary::chargegate()
            .args([
                "audit",
                "query",
                "--server",
                &server.url(),
                "--station",
                STATION_A,
            ])
            .args([
                "--status",
                "allowed,not_allowed",
                "--since",
                "1h",
                "--format",
                format,
            ])
            .output()
            .expect("run the cli");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let wanted =
        expect(&|d| d.station_id == STATION_A && d.status != DecisionStatus::Invalid as i32);
    assert_eq!(wanted.len(), 2);
    let json: BTreeSet<String> = cli("json")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(json, wanted);
    let csv = cli("csv");
    let mut lines = csv.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("decided_at,request_id,station_id,status,reason")
    );
    let csv_ids: BTreeSet<String> = lines
        .map(|l| l.split(',').nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(csv_ids, wanted);
    let table = cli("table");
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(wanted.iter().all(|id| table.contains(id.as_str())));

    // A reader that went away (`| head`) ends the listing quietly, in every format.
    for format in ["json", "csv", "table"] {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        let out = crate::support::binary::chargegate()
            .args(["audit", "query", "--server", &server.url(), "--since", "1h"])
            .args(["--format", format])
            .stdout(writer)
            .output()
            .expect("run the cli");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{format}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn verify_passes_on_an_intact_log_and_names_an_edited_record() {
    if crate::support::backend::sqlite_only(
        "it edits the SQLite file that `audit verify --data-dir` reads; the PostgreSQL verify has its own test in scaleout",
    ) {
        return;
    }
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut watch = subscribe(&mut client, &[], "").await;
    for i in 0..5 {
        client
            .authorize(authorize_request(
                STATION_A,
                TOKEN_UNKNOWN,
                &format!("chain-{i}"),
            ))
            .await
            .expect("authorize");
    }
    next_decisions(&mut watch, 5).await;
    server.stop().await.expect("clean stop");

    let verify = || {
        crate::support::binary::chargegate()
            .args([
                "audit",
                "verify",
                "--token-hash-key",
                "test-token-hash-key",
                "--data-dir",
            ])
            .arg(dir.data_dir())
            .output()
            .expect("run verify")
    };
    let intact = verify();
    let said = String::from_utf8_lossy(&intact.stdout);
    assert!(
        intact.status.success() && said.contains("intact: 5 decisions"),
        "{said}"
    );

    // Someone turns a refusal into a grant.
    let conn = rusqlite::Connection::open(dir.data_dir().join("chargegate.db")).unwrap();
    let edited = conn
        .execute(
            "UPDATE decisions SET status = 'allowed', reason = 'granted' WHERE request_id = 'chain-2'",
            [],
        )
        .unwrap();
    assert_eq!(edited, 1);
    drop(conn);
    let broken = verify();
    let said = String::from_utf8_lossy(&broken.stdout);
    assert_eq!(broken.status.code(), Some(1), "{said}");
    assert!(
        said.contains("BROKEN") && said.contains("chain-2"),
        "{said}"
    );

    // A wrong key cannot vouch for anything.
    let wrong = crate::support::binary::chargegate()
        .args([
            "audit",
            "verify",
            "--token-hash-key",
            "another-key",
            "--data-dir",
        ])
        .arg(dir.data_dir())
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stdout).contains("chain-0"));
}

#[tokio::test]
async fn retention_purges_only_old_call_records() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    client
        .authorize(authorize_request(STATION_A, TOKEN_GRANTED, "kept-1"))
        .await
        .expect("authorize");
    calls_until(&server, "Authorize", |c| c.len() == 1).await;
    server.stop().await.expect("clean stop");

    // Three records from three days ago, as an older server would have left them.
    let old = Micros::now().0 - 3 * 86_400_000_000;
    for i in 0..3 {
        dir.sql_execute(
            "INSERT INTO calls (at_us, method, peer, client, station_id, request_id, code,
                                latency_us, stream_event, messages_sent)
             VALUES ($1, '/chargegate.v1.ChargingAuthorization/Authorize', '127.0.0.1:1', '', '', $2, 'OK', 1, '', 0)",
            &[Value::Int(old + i), Value::Text(format!("old-{i}"))],
        );
    }

    let mut config = dir.config();
    config.audit_retention_days = 1;
    let server = TestServer::start(config).await;
    let left = calls_until(&server, "Authorize", |c| {
        c.iter().all(|c| !c.request_id.starts_with("old-"))
    })
    .await;
    assert_eq!(
        left.iter()
            .map(|c| c.request_id.as_str())
            .collect::<Vec<_>>(),
        ["kept-1"]
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn the_station_index_is_rebuilt_from_the_log_when_its_file_is_gone() {
    if crate::support::backend::sqlite_only(
        "the index by station is a file of the embedded store; PostgreSQL indexes by station in the commit",
    ) {
        return;
    }
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut watch = subscribe(&mut client, &[], "").await;
    let plan = [
        (STATION_A, TOKEN_GRANTED),
        (STATION_B, TOKEN_GRANTED),
        (STATION_A, TOKEN_UNKNOWN),
    ];
    for (station, token) in plan {
        authorize(&mut client, station, token).await;
    }
    let at_a: BTreeSet<String> = next_decisions(&mut watch, plan.len())
        .await
        .into_iter()
        .filter(|d| d.station_id == STATION_A)
        .map(|d| d.request_id)
        .collect();
    assert_eq!(at_a.len(), 2);
    let query = || QueryDecisionsRequest {
        station_id: STATION_A.into(),
        ..Default::default()
    };
    let ids = |ds: Vec<Decision>| {
        ds.into_iter()
            .map(|d| d.request_id)
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(ids(decisions(&server, query()).await), at_a);
    server.stop().await.expect("clean stop");

    // The index is a file of its own, derived from the log: without it, it is built again.
    let index = dir.data_dir().join("chargegate.stations.db");
    assert!(index.exists(), "the index by station has its own file");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", index.display()));
    }
    let server = TestServer::start(dir.config()).await;
    assert_eq!(ids(decisions(&server, query()).await), at_a);
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_station_index_of_the_earlier_layout_is_built_again() {
    if crate::support::backend::sqlite_only("the index by station is a file of the embedded store")
    {
        return;
    }
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let granted = authorize(&mut client, STATION_A, TOKEN_GRANTED)
        .await
        .request_id;
    authorize(&mut client, STATION_B, TOKEN_GRANTED).await;
    let query = || QueryDecisionsRequest {
        station_id: STATION_A.into(),
        ..Default::default()
    };
    let ids = |ds: Vec<Decision>| ds.into_iter().map(|d| d.request_id).collect::<Vec<_>>();
    poll_until(
        "the decision at A",
        || async { ids(decisions(&server, query()).await) },
        |got| *got == [granted.clone()],
    )
    .await;
    server.stop().await.expect("clean stop");

    // The first layout keyed entries by the station id's text, with no layout number.
    let index = dir.data_dir().join("chargegate.stations.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", index.display()));
    }
    let old = rusqlite::Connection::open(&index).expect("index file");
    old.execute_batch(
        "CREATE TABLE decisions_by_station (
             seq INTEGER PRIMARY KEY, station_id TEXT NOT NULL, decided_at_us INTEGER NOT NULL);
         CREATE INDEX decisions_by_station_time ON decisions_by_station (station_id, decided_at_us);
         INSERT INTO decisions_by_station VALUES (1, 'stale', 0);",
    )
    .expect("the first layout");
    drop(old);

    let server = TestServer::start(dir.config()).await;
    assert_eq!(ids(decisions(&server, query()).await), [granted]);
    server.stop().await.expect("clean stop");
}

/// Enumeration (many distinct refused tokens at one station) and velocity (one token at many
/// stations) fire on synthetic traffic and stay quiet on ordinary traffic: gauges, one WARN line
/// each naming station or fingerprint, never a token, and rows of `audit anomalies`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_signals_fire_on_enumeration_and_velocity_and_stay_quiet_otherwise() {
    use crate::support::binary::ChildServer;
    const STATION_C: &str = "8b3c4d5e-6f70-4a1b-8c2d-3e4f5a6b7c8d";
    let dir = TestDir::new();
    let acl = dir.write_acl(&crate::support::standard_acl());
    let thresholds = [
        "--abuse-enumeration-threshold",
        "5",
        "--abuse-velocity-stations",
        "2",
        "--abuse-velocity-window-ms",
        "60000",
    ];
    let server = ChildServer::start_with_metrics(&dir, &acl, &thresholds);
    let mut client =
        chargegate::proto::charging_authorization_client::ChargingAuthorizationClient::connect(
            server.url(),
        )
        .await
        .unwrap();
    let gauges = |server: &ChildServer| {
        let text = server.scrape_metrics();
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(-1.0)
        };
        (
            value("chargegate_abuse_enumeration_stations"),
            value("chargegate_abuse_velocity_fingerprints"),
        )
    };
    // Ordinary traffic: a few known tokens, one unknown token retried, two stations.
    for _ in 0..5 {
        authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
        authorize(&mut client, STATION_B, TOKEN_UNKNOWN).await;
        authorize(&mut client, STATION_A, TOKEN_WILDCARD).await;
    }
    assert_eq!(gauges(&server), (0.0, 0.0), "quiet on ordinary traffic");
    // Enumeration at B: six distinct unknown tokens within the minute.
    let tried: Vec<String> = (0..6)
        .map(|i| format!("TOKEN-enumerated-{i:04}-zzzz"))
        .collect();
    for token in &tried {
        authorize(&mut client, STATION_B, token).await;
    }
    // Velocity: the wildcard card at three stations.
    for station in [STATION_B, STATION_C] {
        authorize(&mut client, station, TOKEN_WILDCARD).await;
    }
    assert_eq!(gauges(&server), (1.0, 1.0));
    let log = poll_until(
        "the WARN lines",
        || async { server.drain_log() },
        |lines: &Vec<String>| lines.iter().filter(|l| l.contains("abuse signal")).count() >= 2,
    )
    .await;
    let warned: Vec<&String> = log.iter().filter(|l| l.contains("abuse signal")).collect();
    assert!(
        warned
            .iter()
            .any(|l| l.contains("enumeration") && l.contains(STATION_B))
    );
    assert!(warned.iter().any(|l| l.contains("velocity: fingerprint")));
    for line in &warned {
        assert!(!line.contains("TOKEN-"), "no token in {line}");
    }
    // The same rules over the decision log.
    let out = tokio::process::Command::from(crate::support::binary::chargegate())
        .args([
            "audit",
            "anomalies",
            "--server",
            &server.url(),
            "--since",
            "1h",
        ])
        .args(
            thresholds
                .iter()
                .map(|t| t.replace("abuse-", ""))
                .collect::<Vec<_>>(),
        )
        .output()
        .await
        .expect("audit anomalies");
    let rows = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        rows.contains(&format!("enumeration: station {STATION_B}")),
        "{rows}"
    );
    assert!(rows.contains("velocity: fingerprint"), "{rows}");
    assert_eq!(rows.matches("enumeration:").count(), 1, "{rows}");
    assert!(!rows.contains("TOKEN-"), "{rows}");
}
