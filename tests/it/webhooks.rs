//! The webhook bridge against real HTTP receivers: payload, headers and signatures; retries and
//! dead letters; the SSRF guard; isolation of a hung receiver; delivery across a receiver outage
//! and a kill -9.

use std::{collections::BTreeSet, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use chargegate::{
    config::{Config, Secret},
    proto::{
        AuthorizeRequest, Delivery, DeliveryState, ListDeliveriesRequest, RedriveDeliveriesRequest,
        webhooks_client::WebhooksClient,
    },
};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::Code;

use crate::support::backend::Value;
use crate::support::{
    PATIENCE, STATION_A, STATION_B, TOKEN_GRANTED, TOKEN_UNKNOWN, TestDir, TestServer,
    binary::ChildServer,
    files_containing, metric, poll_until,
    receiver::{Received, Reply, WebhookReceiver},
    standard_acl,
};

/// Private destinations allowed (the receivers are on loopback) and quick retries.
fn webhook_config(dir: &TestDir) -> Config {
    let mut config = dir.config();
    config.webhook.allow_private = true;
    config.webhook.backoff_base = Duration::from_millis(10);
    config.webhook.backoff_max = Duration::from_millis(40);
    config
}

fn with_callback(station: &str, token: &str, url: &str) -> AuthorizeRequest {
    AuthorizeRequest {
        station_id: station.into(),
        driver_token: token.into(),
        callback_url: url.into(),
        request_id: String::new(),
    }
}

async fn webhooks(url: &str) -> WebhooksClient<tonic::transport::Channel> {
    WebhooksClient::connect(url.to_owned())
        .await
        .expect("connect")
}

async fn list(url: &str, state: DeliveryState) -> Vec<Delivery> {
    webhooks(url)
        .await
        .list_deliveries(ListDeliveriesRequest {
            state: state as i32,
            limit: 1000,
        })
        .await
        .expect("list deliveries")
        .into_inner()
        .deliveries
}

/// Polls the outbox until `done` holds for the deliveries in `state`.
async fn wait_deliveries(
    url: &str,
    state: DeliveryState,
    done: impl Fn(&[Delivery]) -> bool,
) -> Vec<Delivery> {
    poll_until(
        &format!("deliveries in {state:?}"),
        || list(url, state),
        |d: &Vec<Delivery>| done(d),
    )
    .await
}

fn find<'a>(deliveries: &'a [Delivery], request_id: &str) -> &'a Delivery {
    deliveries
        .iter()
        .find(|d| d.request_id == request_id)
        .unwrap_or_else(|| panic!("no delivery for {request_id}"))
}

/// Checks a Standard Webhooks signature with nothing from chargegate's own signer.
fn signed_with(r: &Received, key: &[u8]) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(
        format!(
            "{}.{}.",
            r.header("webhook-id"),
            r.header("webhook-timestamp")
        )
        .as_bytes(),
    );
    mac.update(&r.body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    r.header("webhook-signature")
        .split(' ')
        .any(|s| s == expected)
}

#[tokio::test]
async fn delivers_signed_decisions_and_retries_until_a_2xx() {
    let dir = TestDir::new();
    let (new_key, old_key, other_key) = ([1u8; 32], [2u8; 32], [3u8; 32]);
    let mut config = webhook_config(&dir);
    config.webhook.secret = Some(Secret::new(format!(
        "whsec_{} whsec_{}",
        STANDARD.encode(new_key),
        STANDARD.encode(old_key)
    )));
    let receiver = WebhookReceiver::start(Reply::Status(200)).await;
    receiver.script([
        Reply::Status(503),
        Reply::Status(500),
        Reply::With(429, vec![("retry-after", "0".into())]),
    ]);
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let ack = client
        .authorize(with_callback(
            STATION_A,
            TOKEN_GRANTED,
            &receiver.url("/hooks/charging"),
        ))
        .await
        .expect("authorize")
        .into_inner();
    assert_eq!(
        ack.message,
        "Request is being processed asynchronously. The result will be sent to the provided callback URL."
    );

    let got = receiver.wait_for(4).await;
    // The backoff is at most 40 ms here: retries come on time, not at the next idle look.
    assert!(
        got[3].at - got[0].at < Duration::from_secs(4),
        "{:?}",
        got[3].at - got[0].at
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for r in &got {
        assert_eq!(
            r.header("webhook-id"),
            ack.request_id,
            "one id on every attempt"
        );
        assert_eq!(r.header("content-type"), "application/json");
        let ts: i64 = r.header("webhook-timestamp").parse().expect("unix seconds");
        assert!((ts - started).abs() < 60, "timestamp {ts} is now");
        assert!(
            signed_with(r, &new_key) && signed_with(r, &old_key),
            "both keys sign"
        );
        assert!(!signed_with(r, &other_key));
        let body = r.json();
        assert_eq!(body["station_id"], STATION_A);
        assert_eq!(body["driver_token"], TOKEN_GRANTED);
        assert_eq!(body["status"], "allowed");
        assert_eq!(body["request_id"], ack.request_id.as_str());
    }

    let delivered =
        wait_deliveries(&server.url(), DeliveryState::Delivered, |d| d.len() == 1).await;
    let d = find(&delivered, &ack.request_id);
    let statuses: Vec<u32> = d.history.iter().map(|a| a.http_status).collect();
    let outcomes: Vec<&str> = d.history.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(statuses, [503, 500, 429, 200]);
    assert_eq!(outcomes, ["retry", "retry", "retry", "delivered"]);
    assert_eq!((d.attempts, d.last_error.as_str()), (4, ""));
    assert_eq!(d.callback_url, receiver.url("/hooks/charging"));
    assert!(metric("chargegate_webhook_deliveries_total{outcome=\"retry\"}") >= 3.0);
    assert!(metric("chargegate_webhook_deliveries_total{outcome=\"delivered\"}") >= 1.0);

    // Nothing after the 2xx: the next delivery to the same receiver is the only other request.
    let second = client
        .authorize(with_callback(
            STATION_B,
            TOKEN_UNKNOWN,
            &receiver.url("/hooks/charging"),
        ))
        .await
        .expect("authorize")
        .into_inner();
    wait_deliveries(&server.url(), DeliveryState::Delivered, |d| d.len() == 2).await;
    let all = receiver.received();
    assert_eq!(all.len(), 5);
    assert_eq!(all[4].header("webhook-id"), second.request_id);
    assert_eq!(all[4].json()["status"], "not_allowed");

    server.stop().await.expect("clean stop");
    assert!(
        files_containing(&dir.data_dir(), TOKEN_GRANTED.as_bytes()).is_empty(),
        "a delivered webhook leaves no plain token in the store"
    );
}

#[tokio::test]
async fn permanent_failures_are_dead_at_once_and_can_be_redriven() {
    let dir = TestDir::new();
    let bad_request = WebhookReceiver::start(Reply::Status(400)).await;
    let elsewhere = WebhookReceiver::start(Reply::Status(200)).await;
    let redirect =
        WebhookReceiver::start(Reply::With(302, vec![("location", elsewhere.url("/"))])).await;
    let server = TestServer::start(webhook_config(&dir)).await;
    let mut client = server.client().await;
    let mut ids = Vec::new();
    for url in [
        bad_request.url("/"),
        redirect.url("/"),
        // The metadata range stays refused even with private destinations allowed.
        "http://169.254.169.254/latest/meta-data".to_owned(),
    ] {
        let ack = client
            .authorize(with_callback(STATION_A, TOKEN_GRANTED, &url))
            .await
            .expect("authorize")
            .into_inner();
        ids.push(ack.request_id);
    }

    let dead = wait_deliveries(&server.url(), DeliveryState::Dead, |d| d.len() == 3).await;
    let (d400, d302, metadata) = (
        find(&dead, &ids[0]),
        find(&dead, &ids[1]),
        find(&dead, &ids[2]),
    );
    for (d, status, class) in [
        (d400, 400, "http_status"),
        (d302, 302, "http_status"),
        (metadata, 0, "refused_destination"),
    ] {
        assert_eq!(d.history.len(), 1, "one attempt: {d:?}");
        assert_eq!(d.history[0].http_status, status);
        assert_eq!(d.history[0].error_class, class);
        assert_eq!(d.history[0].outcome, "dead");
    }
    assert!(
        d400.last_error.starts_with("permanent_status"),
        "{}",
        d400.last_error
    );
    assert!(metadata.last_error.starts_with("refused_destination"));
    assert_eq!(bad_request.received().len(), 1);
    assert_eq!(redirect.received().len(), 1);
    assert_eq!(
        elsewhere.received().len(),
        0,
        "redirects are never followed"
    );

    // The receiver is fixed; redriving the dead delivery sends it again, with the same id.
    bad_request.set_default(Reply::Status(204));
    let mut admin = webhooks(&server.url()).await;
    let redriven = admin
        .redrive_deliveries(RedriveDeliveriesRequest {
            request_ids: vec![ids[0].clone()],
        })
        .await
        .expect("redrive")
        .into_inner()
        .redriven;
    assert_eq!(redriven, 1);
    let got = bad_request.wait_for(2).await;
    assert_eq!(got[1].header("webhook-id"), ids[0]);
    let delivered =
        wait_deliveries(&server.url(), DeliveryState::Delivered, |d| d.len() == 1).await;
    assert_eq!(
        find(&delivered, &ids[0]).attempts,
        2,
        "history keeps the first attempt"
    );
    assert_eq!(list(&server.url(), DeliveryState::Dead).await.len(), 2);

    let refused = admin
        .redrive_deliveries(RedriveDeliveriesRequest {
            request_ids: vec!["not an id!".into()],
        })
        .await
        .expect_err("a malformed id");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let fields = crate::support::bad_fields(&refused);
    assert_eq!(fields, ["request_ids"]);
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_dead_delivery_keeps_its_token_only_for_its_redrive_window() {
    let dir = TestDir::new();
    let receiver = WebhookReceiver::start(Reply::Status(400)).await;
    let mut config = webhook_config(&dir);
    config.webhook.max_age = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let ack = client
        .authorize(with_callback(STATION_A, TOKEN_GRANTED, &receiver.url("/")))
        .await
        .expect("authorize")
        .into_inner();
    wait_deliveries(&server.url(), DeliveryState::Dead, |d| d.len() == 1).await;
    // Past the window the token is erased (read from the store itself, which the server shares
    // with readers), and a redrive can no longer send the delivery.
    let id = ack.request_id.clone();
    poll_until(
        "the token's erasure",
        || {
            let erased = dir.sql_bool(
                "SELECT driver_token IS NULL FROM deliveries WHERE request_id = $1",
                &[Value::Text(id.clone())],
            );
            async move { erased }
        },
        |erased| *erased,
    )
    .await;
    let mut admin = webhooks(&server.url()).await;
    let sent_before = receiver.received().len();
    let redriven = admin
        .redrive_deliveries(RedriveDeliveriesRequest {
            request_ids: vec![ack.request_id.clone()],
        })
        .await
        .expect("redrive")
        .into_inner()
        .redriven;
    assert_eq!(redriven, 0, "a delivery without its token stays dead");
    let dead = wait_deliveries(&server.url(), DeliveryState::Dead, |d| d.len() == 1).await;
    assert_eq!(dead[0].request_id, ack.request_id);
    assert_eq!(receiver.received().len(), sent_before);
    let again = admin
        .redrive_deliveries(RedriveDeliveriesRequest {
            request_ids: vec![],
        })
        .await
        .expect("redrive all")
        .into_inner()
        .redriven;
    assert_eq!(again, 0, "nothing left to redrive");
    server.stop().await.expect("clean stop");
    assert!(
        files_containing(&dir.data_dir(), TOKEN_GRANTED.as_bytes()).is_empty(),
        "the dead delivery's token is gone from the store"
    );
}

#[tokio::test]
async fn loopback_is_refused_unless_private_destinations_are_allowed() {
    let dir = TestDir::new();
    let receiver = WebhookReceiver::start(Reply::Status(200)).await;
    let mut config = webhook_config(&dir);
    config.webhook.allow_private = false;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    // An IP literal, and a name that resolves to loopback (checked on the resolved address).
    for url in [
        receiver.url("/"),
        format!("http://localhost:{}/", receiver.addr.port()),
    ] {
        client
            .authorize(with_callback(STATION_A, TOKEN_GRANTED, &url))
            .await
            .expect("authorize");
    }
    let dead = wait_deliveries(&server.url(), DeliveryState::Dead, |d| d.len() == 2).await;
    for d in &dead {
        assert_eq!(d.history.len(), 1);
        assert_eq!(d.history[0].error_class, "refused_destination");
        assert!(!d.last_error.contains(TOKEN_GRANTED));
    }
    assert!(
        receiver.received().is_empty(),
        "nothing reached the loopback receiver"
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_receiver_that_never_answers_does_not_delay_a_healthy_one() {
    let dir = TestDir::new();
    let hung = WebhookReceiver::start(Reply::Hang).await;
    let healthy = WebhookReceiver::start(Reply::Status(200)).await;
    let mut config = webhook_config(&dir);
    // Without a per-host limit the hung receiver would hold every slot for a minute.
    config.webhook.concurrency = 4;
    config.webhook.host_concurrency = 2;
    config.webhook.timeout = Duration::from_secs(60);
    config.shutdown_grace = Duration::from_millis(500);
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    for _ in 0..8 {
        client
            .authorize(with_callback(STATION_A, TOKEN_GRANTED, &hung.url("/")))
            .await
            .expect("authorize");
    }
    hung.wait_for(2).await;
    let ack = client
        .authorize(with_callback(STATION_A, TOKEN_GRANTED, &healthy.url("/")))
        .await
        .expect("authorize")
        .into_inner();
    let got = healthy.wait_for(1).await;
    assert_eq!(got[0].header("webhook-id"), ack.request_id);
    assert_eq!(
        hung.received().len(),
        2,
        "the hung receiver holds only its own two slots"
    );
    wait_deliveries(&server.url(), DeliveryState::Delivered, |d| d.len() == 1).await;
    assert_eq!(list(&server.url(), DeliveryState::Pending).await.len(), 8);
    server.stop().await.expect("stops within the grace period");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_survive_a_receiver_outage_and_kill_9() {
    let dir = TestDir::new();
    let acl = dir.write_acl(&standard_acl());
    // Take a port for the receiver, then take the receiver down: connections are refused.
    let receiver = WebhookReceiver::start(Reply::Status(200)).await;
    let addr = receiver.addr;
    receiver.stop();
    let flags = [
        "--webhook-allow-private",
        "true",
        "--webhook-backoff-base-ms",
        "20",
        "--webhook-backoff-max-ms",
        "200",
        // None may die while the others wait for their first attempt, however slow the store.
        "--webhook-max-attempts",
        "1000",
    ];
    let mut server = ChildServer::start(&dir, &acl, &flags);
    let mut client =
        chargegate::proto::charging_authorization_client::ChargingAuthorizationClient::connect(
            server.url(),
        )
        .await
        .expect("connect");
    let mut acked = BTreeSet::new();
    for i in 0..20 {
        let token = if i % 2 == 0 {
            TOKEN_GRANTED
        } else {
            TOKEN_UNKNOWN
        };
        let ack = client
            .authorize(with_callback(
                STATION_A,
                token,
                &format!("http://{addr}/hook"),
            ))
            .await
            .expect("authorize")
            .into_inner();
        acked.insert(ack.request_id);
    }
    // Every delivery has failed at least once against the absent receiver.
    let pending = wait_deliveries(&server.url(), DeliveryState::Pending, |d| {
        d.len() == 20 && d.iter().all(|d| !d.history.is_empty())
    })
    .await;
    assert!(
        pending
            .iter()
            .all(|d| d.history[0].error_class == "connect")
    );

    server.signal("KILL");
    server.wait(PATIENCE);
    let receiver = WebhookReceiver::start_at(addr, Reply::Status(200)).await;
    let server = ChildServer::start(&dir, &acl, &flags);

    let deadline = std::time::Instant::now() + PATIENCE;
    let mut n = 20;
    let arrived = loop {
        let got: BTreeSet<String> = receiver
            .wait_for(n)
            .await
            .iter()
            .map(|r| r.header("webhook-id").to_owned())
            .collect();
        if got.len() == acked.len() || std::time::Instant::now() > deadline {
            break got;
        }
        n += 1;
    };
    assert_eq!(
        arrived, acked,
        "every acknowledged callback arrives, once per webhook-id"
    );
    wait_deliveries(&server.url(), DeliveryState::Delivered, |d| d.len() == 20).await;
    let log = server.drain_log().join("\n");
    assert!(!log.contains(TOKEN_GRANTED) && !log.contains(TOKEN_UNKNOWN));
}
