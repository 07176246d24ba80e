//! Wiring and lifecycle: opens the stores, starts the pipeline, serves gRPC on an already-bound
//! listener and shuts down in order when the shutdown future resolves:
//! health NOT_SERVING → stop accepting and end decision streams (UNAVAILABLE) → let in-flight calls
//! and decisions finish within `shutdown_grace_ms` (what does not finish stays queued) → let webhook
//! attempts in flight finish in what is left of the grace (what does not stays pending) → commit
//! and checkpoint the store → return.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    api::{
        audit::AuditService, authorization::AuthorizationService, grants::GrantsService,
        webhooks::WebhooksService,
    },
    audit::{self, CallSink, layer::AuditLayer, signals::Signals},
    authorizer::{Authorizer, acl::AccessList, http::HttpAuthorizer},
    backends::Backends,
    config::{AuthorizerConfig, Config, ConfigError, StoreBackend},
    decide::Pipeline,
    fanout::Hub,
    health::Health,
    proto::{
        self, audit_server::AuditServer,
        charging_authorization_server::ChargingAuthorizationServer, grants_server::GrantsServer,
        webhooks_server::WebhooksServer,
    },
    security::{
        auth::AuthLayer,
        clients::Clients,
        listener::{self, Preface},
        message_size::MessageSizeLayer,
        rate::{RateLimitLayer, RateLimits, SubscriptionSlots},
        tls::{TlsFiles, TlsHandshake},
    },
    store::{self, GrantStore, StoreError},
    telemetry,
    token::{Fingerprinter, KeyError},
    webhook::{
        deliver::{self, Deliverer},
        guard::Guard,
        policy::RetryPolicy,
        signer::Signer,
    },
};

/// The smallest `reclaim_margin_ms` that covers recording a decision on a shared queue: a store
/// answer slow by its response timeout (2 s), the longest pause between attempts to record
/// (2 s), and the second between two looks for requests to reclaim. Below it a live worker's
/// request may be taken over and its authorizer asked twice (the decision is still recorded
/// once).
const SAFE_RECLAIM_MARGIN: Duration = Duration::from_secs(5);
/// Unary calls (and stream openings) in flight per connection before the excess is shed.
const CALLS_PER_CONNECTION: usize = 256;
/// Concurrent HTTP/2 streams per connection (decision streams included). Past it a client queues
/// calls on its side, so overload costs the server nothing (HTTP/2 backpressure) instead of CPU
/// spent refusing calls; a gateway with more stations names them in one subscription.
pub const STREAMS_PER_CONNECTION: u32 = 256;
/// Streams a connection may make the server reset for its errors (malformed requests, flow
/// control) before it is closed with GOAWAY `ENHANCE_YOUR_CALM` (RUSTSEC-2024-0003; hyper's
/// default, which tonic turns off unless it is set).
const LOCAL_ERROR_RESETS: usize = 1024;
/// Streams a peer may open and reset before the server accepted them (the rapid reset of
/// CVE-2023-44487), h2's default, written out.
const PENDING_ACCEPT_RESETS: usize = 20;
/// The largest header list (metadata) a request may carry; past it the stream is refused.
const HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the token hash key")]
    Key(#[from] KeyError),
    #[error(transparent)]
    AccessList(#[from] crate::authorizer::acl::AclError),
    #[error(transparent)]
    Clients(#[from] crate::security::clients::ClientsError),
    #[error(transparent)]
    Tls(#[from] crate::security::tls::TlsError),
    #[error("cannot open the store")]
    Store(#[from] StoreError),
    #[error("audit_archive_url: {0}")]
    Archive(String),
    #[error("cannot create the data dir {0}")]
    DataDir(String, #[source] std::io::Error),
    #[error("cannot bind the metrics listener on {0}")]
    MetricsBind(SocketAddr, #[source] std::io::Error),
    #[error("cannot build an HTTP client")]
    HttpClient(#[source] reqwest::Error),
    #[error("the gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
}

/// A chargegate server, ready to serve. Tests replace the authorizer with [`Server::with_authorizer`].
pub struct Server {
    config: Config,
    authorizer: Option<Arc<dyn Authorizer>>,
}

/// Serves `config` on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    Server::new(config).serve(listener, shutdown).await
}

impl Server {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            authorizer: None,
        }
    }

    /// Decides with `authorizer` instead of the one the configuration names.
    pub fn with_authorizer(mut self, authorizer: Arc<dyn Authorizer>) -> Self {
        self.authorizer = Some(authorizer);
        self
    }

    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let config = self.config;
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            commit = env!("CHARGEGATE_GIT_COMMIT"),
            instance = %config.instance_id,
            "chargegate starting"
        );
        config.check_supported()?;
        if !matches!(config.store, StoreBackend::Sqlite { .. })
            && config.reclaim_margin < SAFE_RECLAIM_MARGIN
        {
            tracing::warn!(
                reclaim_margin_ms = config.reclaim_margin.as_millis() as u64,
                safe_ms = SAFE_RECLAIM_MARGIN.as_millis() as u64,
                "reclaim_margin_ms is short for a shared queue: a request whose decision is slow to record may be taken over by another instance and its authorizer asked twice (it is still decided once)"
            );
        }
        let clients = match &config.clients_file {
            Some(path) => {
                let clients = Arc::new(Clients::load(path)?);
                tracing::info!(path = %path.display(), clients = clients.table().len(), "clients file loaded");
                Some(clients)
            }
            None => {
                tracing::warn!(
                    "no clients_file: every RPC is open to anyone who reaches the port (CONTRACT §12); set clients_file to require bearer tokens"
                );
                None
            }
        };
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(TlsFiles::load(files)?)),
            None => None,
        };
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| ServeError::DataDir(config.data_dir.display().to_string(), e))?;
        let fingerprinter = Fingerprinter::load(
            config.token_hash_key.as_ref().map(|k| k.expose()),
            &config.data_dir,
        )?;
        telemetry::prometheus();

        // Background tasks stop on `background`; decision streams end on `streams`.
        let background = CancellationToken::new();
        let streams = CancellationToken::new();

        if let Some(clients) = &clients {
            clients.clone().watch(background.clone());
        }
        if let Some(tls) = &tls {
            tls.clone().watch(background.clone());
        }

        let hub = Arc::new(Hub::new());
        let backends = Backends::open(
            &config,
            hub.clone(),
            &fingerprinter,
            config.authorize_timeout + config.reclaim_margin,
        )
        .await?;

        // The access list in force, and whether the Grants service may write to the store.
        let (access_list, grant_store, read_only_reason): (
            Arc<AccessList>,
            Option<Arc<dyn GrantStore>>,
            _,
        ) = match &config.authorizer {
            AuthorizerConfig::Acl { file: Some(path) } => {
                let list = Arc::new(AccessList::from_file(path, &fingerprinter)?);
                tracing::info!(path = %path.display(), grants = list.len(), "access list loaded");
                list.clone()
                    .watch(path.clone(), fingerprinter.clone(), background.clone());
                (
                    list,
                    None,
                    "acl_file is the source of truth for grants; edit the file instead",
                )
            }
            AuthorizerConfig::Acl { file: None } => {
                let list = Arc::new(AccessList::from_stored(
                    backends.grants.list_grants().await?,
                ));
                if list.is_empty() {
                    tracing::warn!(
                        "no grants yet: every well-formed token is NOT_ALLOWED/no_grant until one is put"
                    );
                }
                if let Some(pg) = backends.postgres() {
                    // Other instances write grants too.
                    let (version, written) = (pg.clone(), pg.clone());
                    tokio::spawn(list.clone().follow_store(
                        backends.grants.clone(),
                        move || {
                            let pg = version.clone();
                            async move { pg.grants_version().await }
                        },
                        move || {
                            let pg = written.clone();
                            async move { pg.grants_written().await }
                        },
                        background.clone(),
                    ));
                }
                (list, Some(backends.grants.clone()), "")
            }
            AuthorizerConfig::Http { .. } => (
                Arc::new(AccessList::empty()),
                None,
                "grants are not used with authorizer = \"http\"",
            ),
        };
        let authorizer: Arc<dyn Authorizer> = match (self.authorizer, &config.authorizer) {
            (Some(custom), _) => custom,
            (None, AuthorizerConfig::Acl { .. }) => access_list.clone(),
            (None, AuthorizerConfig::Http { url }) => {
                tracing::info!(
                    host = url.host_str().unwrap_or(""),
                    "deciding with the remote authorizer"
                );
                Arc::new(
                    HttpAuthorizer::new(
                        url.clone(),
                        config.authorize_timeout,
                        &config.breaker,
                        config.authorizer_cache_ttl,
                        config.workers,
                    )
                    .map_err(ServeError::HttpClient)?,
                )
            }
        };
        let (log, queue) = (backends.log.clone(), backends.queue.clone());
        let pending = queue.depth().await?;
        tracing::info!(store = %backends.location, pending, "store opened");

        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = Health::new(reporter);
        health.alive().await;
        health.set(true).await;
        let health_monitor = health
            .clone()
            .monitor(backends.probes.clone(), background.clone());
        let retention = Duration::from_secs(u64::from(config.audit_retention_days) * 86_400);
        let archive = match &config.audit_archive_url {
            Some(url) => Some(store::ArchiveTarget {
                archive: crate::archive::Archive::open(url)
                    .map_err(|e| ServeError::Archive(e.to_string()))?,
                store: config.store.clone(),
            }),
            None => None,
        };
        let retention_task = tokio::spawn(store::run_retention(
            log.clone(),
            backends.audit.clone(),
            retention,
            archive,
            background.clone(),
        ));

        let metrics_task = match config.metrics_listen {
            Some(addr) => {
                let listener = telemetry::bind_http(addr)
                    .await
                    .map_err(|e| ServeError::MetricsBind(addr, e))?;
                tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "metrics listening");
                Some(tokio::spawn(telemetry::serve_http(
                    listener,
                    health.clone(),
                    background.clone(),
                )))
            }
            None => None,
        };

        let pipeline_stop = CancellationToken::new();
        let signals = Arc::new(Signals::new(config.abuse));
        let signals_task = tokio::spawn(signals.clone().publish(background.clone()));
        let pipeline = Pipeline {
            queue: queue.clone(),
            authorizer: authorizer.clone(),
            workers: config.workers,
            timeout: config.authorize_timeout,
            signals: signals.clone(),
            keep_unknown: config.revisions_on(),
        };
        let mut pipeline_task = tokio::spawn(pipeline.run(pipeline_stop.clone()));
        let reviser_task = config.revisions_on().then(|| {
            tokio::spawn(
                crate::revise::Reviser {
                    store: backends.revisions.clone(),
                    authorizer: authorizer.clone(),
                    timeout: config.authorize_timeout,
                    window: config.revise_unknown_within,
                    rate_per_s: config.revise_rate_per_s,
                }
                .run(pipeline_stop.clone()),
            )
        });

        let outbox = backends.outbox.clone();
        let webhook = &config.webhook;
        let delivery_settings = deliver::Settings {
            policy: RetryPolicy {
                base: webhook.backoff_base,
                max: webhook.backoff_max,
                max_attempts: webhook.max_attempts,
                max_age: webhook.max_age,
            },
            guard: Guard {
                allow_private: webhook.allow_private,
            },
            timeout: webhook.timeout,
            signer: webhook
                .secret
                .as_ref()
                .map(|s| Signer::parse(s.expose()).expect("checked when the config was read")),
            concurrency: webhook.concurrency,
            host_concurrency: webhook.host_concurrency,
        };
        let deliverer = Deliverer::new(
            outbox.clone(),
            deliver::client(&delivery_settings).map_err(ServeError::HttpClient)?,
            delivery_settings,
            backends.outbox_wake.clone(),
        );
        let deliveries_stop = CancellationToken::new();
        let mut deliveries_task = tokio::spawn(deliverer.run(deliveries_stop.clone()));

        let reflection_v1 = reflection()
            .build_v1()
            .expect("the descriptor sets are compiled in");
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .expect("the descriptor sets are compiled in");
        let rate_limits = Arc::new(RateLimits::new(
            config.rate_per_client_per_s,
            config.rate_per_station_per_s,
        ));
        tokio::spawn(rate_limits.clone().sweep(background.clone()));
        let authorization = AuthorizationService {
            limits: rate_limits.clone(),
            subscriptions: SubscriptionSlots::new(config.subscriptions_per_client),
            queue: queue.clone(),
            authorizer: authorizer.clone(),
            signals,
            log: log.clone(),
            hub,
            fingerprinter: fingerprinter.clone(),
            heartbeat_interval: config.heartbeat_interval,
            streams_shutdown: streams.clone(),
        };

        let grants = GrantsService {
            authorizer: authorizer.clone(),
            store: grant_store,
            list: access_list,
            fingerprinter: fingerprinter.clone(),
            read_only_reason,
            writing: Default::default(),
        };

        let local = listener.local_addr().ok();
        let (stop_accepting, accepting_stopped) = tokio::sync::oneshot::channel::<()>();
        // Mutual TLS without clients_file: any certificate the CA signed is an identity.
        let require_certificate =
            clients.is_none() && config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        // Overload protection: a bounded number of concurrent HTTP/2 streams per connection, and of
        // calls in flight, the excess refused at once (RESOURCE_EXHAUSTED), never queued without bound.
        // Every call is recorded by one layer around every service (unless turned off).
        let (call_sink, call_records) = CallSink::new();
        let audit_trail = backends.audit.clone();
        let recorder = tokio::spawn(audit::run_recorder(audit_trail.clone(), call_records));
        let station_indexer = tokio::spawn(audit::run_station_indexer(
            audit_trail.clone(),
            background.clone(),
        ));
        let audit_layer = AuditLayer::new(config.audit_calls.then(|| call_sink.clone()));
        drop(call_sink);
        // tonic's own limit stays as a backstop; the layer answers first, with the right code.
        let max_message = config.max_message_bytes;
        let mut builder = tonic::transport::Server::builder();
        if let Some(age) = config.max_connection_age {
            // GOAWAY at the age; the listener closes the connection after the grace (tonic,
            // given a grace, sends no GOAWAY at all).
            builder = builder.max_connection_age(age);
        }
        let grpc = builder
            .concurrency_limit_per_connection(CALLS_PER_CONNECTION)
            .load_shed(true)
            .max_concurrent_streams(Some(STREAMS_PER_CONNECTION))
            .http2_max_local_error_reset_streams(Some(LOCAL_ERROR_RESETS))
            .http2_max_pending_accept_reset_streams(Some(PENDING_ACCEPT_RESETS))
            .http2_max_header_list_size(HEADER_LIST_BYTES)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(audit_layer)
            .layer(AuthLayer::new(clients, require_certificate))
            .layer(RateLimitLayer::new(
                rate_limits.clone(),
                config.max_calls_in_flight,
            ))
            .layer(MessageSizeLayer::new(config.max_message_bytes))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                ChargingAuthorizationServer::new(authorization)
                    .max_decoding_message_size(max_message),
            )
            .add_service(GrantsServer::new(grants).max_decoding_message_size(max_message))
            .add_service(
                WebhooksServer::new(WebhooksService { outbox })
                    .max_decoding_message_size(max_message),
            )
            .add_service(
                AuditServer::new(AuditService {
                    trail: audit_trail.clone(),
                })
                .max_decoding_message_size(max_message),
            );
        let accept_stop = CancellationToken::new();
        let limits = listener::Limits {
            handshake: config.handshake_timeout,
            lifetime: config
                .max_connection_age
                .map(|age| age + config.max_connection_age_grace),
        };
        let stopped = async move {
            let _ = accepting_stopped.await;
        };
        let grpc: std::pin::Pin<
            Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
        > = match &tls {
            Some(tls) => Box::pin(grpc.serve_with_incoming_shutdown(
                listener::incoming(
                    listener,
                    TlsHandshake(tls.clone()),
                    limits,
                    accept_stop.clone(),
                ),
                stopped,
            )),
            None => Box::pin(grpc.serve_with_incoming_shutdown(
                listener::incoming(listener, Preface, limits, accept_stop.clone()),
                stopped,
            )),
        };
        let tls_on = tls.is_some();
        match local {
            Some(addr) => tracing::info!(listen = %addr, tls = tls_on, "chargegate serving"),
            None => tracing::info!(tls = tls_on, "chargegate serving"),
        }

        let mut grpc = grpc;
        let mut result = Ok(());
        let mut grpc_done = false;
        tokio::select! {
            served = &mut grpc => {
                grpc_done = true;
                // The server stopped on its own: an error. Shut the rest down as for a signal.
                if let Err(e) = served {
                    tracing::error!(error = %e, "the gRPC server failed");
                    result = Err(ServeError::Transport(e));
                }
            }
            _ = shutdown => tracing::info!("shutting down"),
        }

        let deadline = tokio::time::Instant::now() + config.shutdown_grace;
        health.stop().await;
        streams.cancel();
        pipeline_stop.cancel();
        let _ = stop_accepting.send(());
        accept_stop.cancel();
        health.close_watches().await;
        if !grpc_done && tokio::time::timeout_at(deadline, &mut grpc).await.is_err() {
            tracing::warn!("calls still open at the end of the grace period were cut");
        }
        // The server's layer held the last call sinks: the recorder writes what is left and ends.
        drop(grpc);
        if tokio::time::timeout_at(deadline, &mut pipeline_task)
            .await
            .is_err()
        {
            tracing::warn!("decisions still in flight at the end of the grace period stay queued");
            pipeline_task.abort();
            let _ = pipeline_task.await;
        }
        // A revision cut short is asked again after the restart: it is recorded once or not yet.
        if let Some(mut task) = reviser_task
            && tokio::time::timeout_at(deadline, &mut task).await.is_err()
        {
            task.abort();
            let _ = task.await;
        }
        // Deliveries stop after the pipeline, whose last decisions may have added some.
        deliveries_stop.cancel();
        if tokio::time::timeout_at(deadline, &mut deliveries_task)
            .await
            .is_err()
        {
            tracing::warn!(
                "webhook attempts still in flight at the end of the grace period stay pending"
            );
            deliveries_task.abort();
            let _ = deliveries_task.await;
        }
        background.cancel();
        let _ = health_monitor.await;
        let _ = retention_task.await;
        let _ = station_indexer.await;
        let _ = signals_task.await;
        if let Some(task) = metrics_task {
            let _ = task.await;
        }
        if tokio::time::timeout(Duration::from_secs(5), recorder)
            .await
            .is_err()
        {
            tracing::warn!("call records still buffered at shutdown were not written");
        }
        backends.close().await;
        tracing::info!("shutdown complete");
        result
    }
}

/// Server reflection over the services this build serves, with the descriptors of everything
/// they mention (timestamps, `google.rpc.BadRequest` error details, health).
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(proto::AUTHORIZATION_SERVICE)
        .with_service_name("chargegate.v1.Grants")
        .with_service_name("chargegate.v1.Webhooks")
        .with_service_name("chargegate.v1.Audit")
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
}
