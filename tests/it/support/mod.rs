//! Test support: a real chargegate server on an ephemeral port, and small gRPC helpers.

#![allow(dead_code)]

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use chargegate::{
    authorizer::Authorizer,
    config::{Config, Secret},
    proto::{
        AuthorizeRequest, AuthorizeResponse, Decision, GetDecisionRequest,
        SubscribeDecisionsRequest, charging_authorization_client::ChargingAuthorizationClient,
        subscribe_decisions_response::Event,
    },
    server::{ServeError, Server},
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Streaming, transport::Channel};

pub mod backend;
pub mod binary;
pub mod fake_authorizer;
pub mod h2raw;
pub mod pki;
pub mod receiver;
pub mod redis_server;
pub mod s3_server;

/// How long a test waits for something that should happen at once before failing.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub const STATION_A: &str = "6f1c2d3e-4a5b-4c6d-8e7f-0123456789ab";
pub const STATION_B: &str = "7a2b3c4d-5e6f-4a1b-9c2d-3e4f5a6b7c8d";
/// Tokens are long and distinctive so a scan for them cannot match by accident.
pub const TOKEN_GRANTED: &str = "TOKEN-granted-0001-f3a9c2";
pub const TOKEN_WILDCARD: &str = "TOKEN-wildcard-0002-b81d4e";
pub const TOKEN_EXPIRED: &str = "TOKEN-expired-0003-9e07aa";
pub const TOKEN_BLOCKED: &str = "TOKEN-blocked-0004-c45f10";
pub const TOKEN_UNKNOWN: &str = "TOKEN-nogrant-0005-77ab3d";

/// The access list most tests use.
pub fn standard_acl() -> String {
    format!(
        "# test grants\n\
         station_id,driver_token,expires_at,blocked\n\
         {STATION_A},{TOKEN_GRANTED},,\n\
         *,{TOKEN_WILDCARD},2999-12-31T23:59:59Z,false\n\
         {STATION_A},{TOKEN_EXPIRED},2001-01-01T00:00:00Z,\n\
         *,{TOKEN_BLOCKED},,true\n\
         {STATION_A},{TOKEN_BLOCKED},,false\n"
    )
}

/// A fresh data dir with the standard access list, ready to configure further.
pub struct TestDir {
    pub dir: tempfile::TempDir,
    /// The test's own database, when the suite runs on PostgreSQL.
    pub database: Option<backend::TestDatabase>,
    /// A database shared with other instances, in place of the test's own.
    pub shared: Option<String>,
    /// A Redis queue of the test's own, in place of the suite's.
    pub queue_url: Option<String>,
}

impl TestDir {
    pub fn new() -> Self {
        let database = backend::on_postgres().then(|| {
            let url = backend::postgres_url()
                .expect("CHARGEGATE_TEST_BACKEND=postgres needs CHARGEGATE_TEST_POSTGRES_URL");
            backend::TestDatabase::create(&url)
        });
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            database,
            shared: None,
            queue_url: None,
        }
    }

    /// One instance's dir on a database several instances share.
    pub fn sharing(db: &backend::TestDatabase) -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            database: None,
            shared: Some(db.url.clone()),
            queue_url: None,
        }
    }

    /// The Redis URL of this test's queue, when it is on Redis.
    pub fn redis_url(&self) -> Option<String> {
        self.queue_url.clone().or_else(backend::redis_url)
    }

    /// The PostgreSQL URL of this test's store, when it is on PostgreSQL.
    pub fn store_url(&self) -> Option<String> {
        self.shared
            .clone()
            .or_else(|| self.database.as_ref().map(|d| d.url.clone()))
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn acl_path(&self) -> PathBuf {
        self.dir.path().join("acl.csv")
    }

    pub fn write_acl(&self, csv: &str) -> PathBuf {
        let path = self.acl_path();
        std::fs::write(&path, csv).expect("write acl");
        path
    }

    /// The configuration tests start from: embedded store in this dir, the standard access list,
    /// no metrics listener, a fixed token key.
    pub fn config(&self) -> Config {
        let mut config = Config::for_data_dir(self.data_dir());
        config.metrics_listen = None;
        config.token_hash_key = Some(Secret::new("test-token-hash-key"));
        config.authorizer = chargegate::config::AuthorizerConfig::Acl {
            file: Some(self.write_acl(&standard_acl())),
        };
        config.shutdown_grace = Duration::from_secs(5);
        // Revisions would add decisions to the streams of tests about other things; the tests
        // of revisions turn them on.
        config.revise_unknown_within = Duration::ZERO;
        // Instances of one test process: a name of their own each, as processes have.
        config.instance_id = format!(
            "test-{}-{}",
            std::process::id(),
            self.path().file_name().unwrap().to_string_lossy()
        );
        if let Some(url) = self.store_url() {
            config.store = chargegate::config::StoreBackend::Postgres { url };
            config.queue = match self.redis_url() {
                Some(url) => chargegate::config::QueueBackend::Redis { url },
                None => chargegate::config::QueueBackend::Postgres,
            };
        }
        config
    }
}

/// A chargegate server running in this process on 127.0.0.1:<ephemeral>.
pub struct TestServer {
    pub addr: SocketAddr,
    pub config: Config,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        Self::start_with(config, None).await
    }

    pub async fn start_with(config: Config, authorizer: Option<Arc<dyn Authorizer>>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel();
        let mut server = Server::new(config.clone());
        if let Some(a) = authorizer {
            server = server.with_authorizer(a);
        }
        let task = tokio::spawn(server.serve(listener, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            config,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn client(&self) -> ChargingAuthorizationClient<Channel> {
        ChargingAuthorizationClient::new(self.channel().await)
    }

    /// Begins a graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down gracefully and waits for the server to return.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        self.begin_shutdown();
        let task = self.task.take().expect("running");
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("server stops within patience")
            .expect("server task")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub fn request(station: &str, token: &str) -> AuthorizeRequest {
    AuthorizeRequest {
        station_id: station.into(),
        driver_token: token.into(),
        ..Default::default()
    }
}

pub async fn authorize(
    client: &mut ChargingAuthorizationClient<Channel>,
    station: &str,
    token: &str,
) -> AuthorizeResponse {
    client
        .authorize(request(station, token))
        .await
        .expect("authorize")
        .into_inner()
}

/// `Authorize` at `station` under the caller's `request_id`: the acknowledgement, or the refusal.
pub async fn authorize_as(
    client: &mut ChargingAuthorizationClient<Channel>,
    station: &str,
    token: &str,
    request_id: &str,
) -> Result<AuthorizeResponse, tonic::Status> {
    let request = AuthorizeRequest {
        request_id: request_id.into(),
        ..request(station, token)
    };
    client.authorize(request).await.map(|r| r.into_inner())
}

/// `GetDecision`: the request's decision, or its pending state.
pub async fn get_decision(
    client: &mut ChargingAuthorizationClient<Channel>,
    request_id: &str,
) -> Decision {
    client
        .get_decision(GetDecisionRequest {
            request_id: request_id.into(),
        })
        .await
        .expect("get_decision")
        .into_inner()
        .decision
        .expect("a decision")
}

pub async fn subscribe(
    client: &mut ChargingAuthorizationClient<Channel>,
    stations: &[&str],
    after_cursor: &str,
) -> Streaming<chargegate::proto::SubscribeDecisionsResponse> {
    client
        .subscribe_decisions(SubscribeDecisionsRequest {
            station_ids: stations.iter().map(|s| s.to_string()).collect(),
            after_cursor: after_cursor.into(),
        })
        .await
        .expect("subscribe")
        .into_inner()
}

/// The next decision on a stream, skipping heartbeats; fails the test after [`PATIENCE`].
pub async fn next_decision(
    stream: &mut Streaming<chargegate::proto::SubscribeDecisionsResponse>,
) -> Decision {
    loop {
        let item = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("a decision within patience")
            .expect("stream ok")
            .expect("stream open");
        if let Some(Event::Decision(d)) = item.event {
            return d;
        }
    }
}

/// The next `n` decisions.
pub async fn next_decisions(
    stream: &mut Streaming<chargegate::proto::SubscribeDecisionsResponse>,
    n: usize,
) -> Vec<Decision> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next_decision(stream).await);
    }
    out
}

/// Every file under `dir` that contains `needle`, for token scans.
pub fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read file");
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(path);
                }
            }
        }
    }
    hits
}

/// The value of a metric (the first line of this process's Prometheus output that starts with
/// `prefix`); 0 when it has not been recorded yet.
pub fn metric(prefix: &str) -> f64 {
    chargegate::telemetry::prometheus()
        .render()
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Authorizes `token` at `station` and returns its decision from `stream` (which must watch it).
pub async fn decide_at(
    client: &mut ChargingAuthorizationClient<Channel>,
    stream: &mut Streaming<chargegate::proto::SubscribeDecisionsResponse>,
    station: &str,
    token: &str,
) -> Decision {
    let ack = authorize(client, station, token).await;
    let d = next_decision(stream).await;
    assert_eq!(d.request_id, ack.request_id);
    d
}

/// Decides `token` at `station` again and again until the reason is `target`; every reason
/// before it must be `meanwhile`. Fails with `never` after [`PATIENCE`].
pub async fn decide_until(
    client: &mut ChargingAuthorizationClient<Channel>,
    stream: &mut Streaming<chargegate::proto::SubscribeDecisionsResponse>,
    (station, token): (&str, &str),
    target: &str,
    meanwhile: &str,
    never: &str,
) {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let reason = decide_at(client, stream, station, token).await.reason;
        if reason == target {
            return;
        }
        assert_eq!(reason, meanwhile);
        assert!(std::time::Instant::now() < deadline, "{never}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Calls `fetch` until `done` holds for what it returns (state written in the background: call
/// records, webhook deliveries); fails the test, showing the last answer, after [`PATIENCE`].
pub async fn poll_until<T, F, Fut>(what: &str, mut fetch: F, done: impl Fn(&T) -> bool) -> T
where
    T: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let got = fetch().await;
        if done(&got) {
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never came: {got:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fields a `google.rpc.BadRequest` detail names, in order.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .expect("a google.rpc.BadRequest detail")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// `found`, saying `skipped` when not; under `CI=true` a missing program fails with `in_ci`.
pub fn present_or_skipped(found: bool, in_ci: &str, skipped: &str) -> bool {
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{in_ci}");
        eprintln!("{skipped}");
    }
    found
}
