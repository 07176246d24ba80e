//! The command line: `chargegate` (= `chargegate serve`) and the client subcommands that talk to a
//! running server. Flags and `CHARGEGATE_*` variables are gathered here; [`crate::config`] parses them.

/// Prints a line on stdout, like `println!`, but a failed write ends the command with a
/// [`StdoutError`] instead of a panic (a reader that went away: `chargegate audit query | head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::cli::StdoutError)?
    }};
}

mod audit;

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_stream::StreamExt;

use crate::proto::{
    self, AuthorizeRequest, DecisionStatus, GetDecisionRequest, SubscribeDecisionsRequest,
    charging_authorization_client::ChargingAuthorizationClient,
    subscribe_decisions_response::Event,
};

#[derive(Debug, Parser)]
#[command(
    name = "chargegate",
    version = crate::VERSION,
    about = "Asynchronous authorization of EV-charging sessions over gRPC"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// With no subcommand, chargegate serves.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve(Box<ServeArgs>),
    /// Ask a running server to authorize a driver token at a station.
    Authorize(AuthorizeArgs),
    /// Subscribe to decisions and print them, one JSON object per line.
    Watch(WatchArgs),
    /// Print the state of one request.
    Get(GetArgs),
    /// Manage the grants kept in the store (when no acl_file is set).
    Grants(GrantsArgs),
    /// Inspect webhook deliveries and redrive dead ones.
    Webhooks(WebhooksArgs),
    /// Query the audit trail, check its hash chain, look for anomalies.
    Audit(AuditArgs),
    /// Print the defaults file, or check a configuration without starting the server.
    Config(ConfigArgs),
    /// Apply the PostgreSQL schema of `store_url` and exit (the server also does at start-up).
    Migrate(Box<ServeArgs>),
    /// Make bearer tokens for `clients_file`.
    Clients(ClientsArgs),
    /// The decision the server would make now for a driver token at a station, and why
    /// (records nothing; needs the admin role).
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Bearer token of an admin client (here `--token` is the driver token, as CONTRACT §8 names it).
    #[arg(
        long = "client-token",
        env = "CHARGEGATE_CLIENT_TOKEN",
        hide_env_values = true
    )]
    pub client_token: Option<String>,
    /// Station UUID.
    #[arg(long)]
    pub station: String,
    /// Driver token (prefer CHARGEGATE_DRIVER_TOKEN).
    #[arg(
        long = "token",
        env = "CHARGEGATE_DRIVER_TOKEN",
        hide_env_values = true
    )]
    pub token: String,
}

#[derive(Debug, Args)]
pub struct ClientsArgs {
    #[command(subcommand)]
    pub command: ClientsCommand,
}

#[derive(Debug, Subcommand)]
pub enum ClientsCommand {
    /// Print a new random bearer token once, and the `[[client]]` lines holding its SHA-256
    /// (the server keeps only the digest: the token cannot be printed again).
    NewToken {
        /// The client's name (its subject CN too, when it uses a client certificate).
        name: String,
        /// Stations it may speak for (UUIDs), or * for every station.
        #[arg(long = "station", default_value = "*")]
        stations: Vec<String>,
        /// Its roles: station, admin.
        #[arg(long = "role", default_value = "station", value_parser = ["station", "admin"])]
        roles: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print every key with its default and meaning, as a TOML file to start from.
    Defaults,
    /// Resolve flags, environment and `--config` as `serve` would; exit 64 naming the key at
    /// fault, or print the configuration (secrets redacted) and exit 0.
    Check(Box<ServeArgs>),
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// How query results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Args)]
pub struct Window {
    /// Start of the window: a duration back from now (90s, 15m, 1h, 7d) or an RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// End of the window (exclusive), in the same forms [default: now].
    #[arg(long)]
    pub until: Option<String>,
}

/// Where a listing comes from, over which window, how much of it and how it is printed.
#[derive(Debug, Args)]
pub struct Listing {
    #[command(flatten)]
    pub server: ServerArg,
    #[command(flatten)]
    pub window: Window,
    /// Most rows printed (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: u32,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// The store a command reads directly, as the server's configuration names it.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The data dir of the embedded store (and of its generated token hash key).
    #[arg(long, env = "CHARGEGATE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// `postgres://…` (needs the token hash key to verify), or `sqlite://<file>`; unset: the data dir's.
    #[arg(long, env = "CHARGEGATE_STORE_URL", hide_env_values = true)]
    pub store_url: Option<String>,
}

impl StoreArgs {
    pub fn backend(&self) -> anyhow::Result<crate::config::StoreBackend> {
        use crate::config::StoreBackend;
        Ok(match self.store_url.as_deref().filter(|u| !u.is_empty()) {
            None => StoreBackend::Sqlite {
                path: self.data_dir.join("chargegate.db"),
            },
            Some(url) => match url.strip_prefix("sqlite://") {
                Some(path) => StoreBackend::Sqlite { path: path.into() },
                None if url.starts_with("postgres") => StoreBackend::Postgres {
                    url: url.to_owned(),
                },
                None => anyhow::bail!("--store-url: expected sqlite:// or postgres://"),
            },
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Decisions, oldest first.
    Query {
        /// Station UUID.
        #[arg(long)]
        station: Option<String>,
        /// allowed, not_allowed, unknown or invalid; repeat or separate with commas.
        #[arg(long = "status", value_delimiter = ',')]
        statuses: Vec<String>,
        #[command(flatten)]
        listing: Listing,
    },
    /// Call records, oldest first.
    Calls {
        /// A method (`Authorize`) or its full path (`/chargegate.v1.ChargingAuthorization/Authorize`).
        #[arg(long)]
        method: Option<String>,
        #[command(flatten)]
        listing: Listing,
    },
    /// Walk the decision log's hash chain (in a data dir, or in PostgreSQL) and report the first
    /// broken link; with `--archive`, every chunk of an archive first, then on into the live log.
    /// Exits 0 when intact, 1 when broken.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// The token hash key, when it is configured rather than kept in the data dir.
        #[arg(long, env = "CHARGEGATE_TOKEN_HASH_KEY", hide_env_values = true)]
        token_hash_key: Option<String>,
        /// An archive to verify with the log: `file:///dir` or `s3://bucket/prefix`.
        #[arg(long)]
        archive: Option<String>,
    },
    /// Append the decision log up to a time to an archive: zstd JSON lines in chunks, and a
    /// manifest of their digests and chain links. Reads the store directly, server running or not.
    Export {
        /// RFC 3339, or a duration ago (`90d`, `12h`).
        #[arg(long)]
        until: String,
        /// `file:///dir` or `s3://bucket/prefix` (credentials and endpoint from `AWS_*`).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Most decisions one chunk holds.
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        max_chunk_decisions: u64,
    },
    /// The anomaly rules over a window: many timeouts, and stations with most decisions failing.
    Anomalies {
        #[command(flatten)]
        server: ServerArg,
        /// The window [default: the last hour].
        #[command(flatten)]
        window: Window,
        /// Timeouts in the window that make an anomaly.
        #[arg(long, default_value_t = 10)]
        timeouts: u64,
        /// Share of a station's decisions UNKNOWN or INVALID that makes an anomaly.
        #[arg(long, default_value_t = 0.5)]
        failing_share: f64,
        /// Decisions a station needs in the window before its share counts.
        #[arg(long, default_value_t = 10)]
        min_decisions: u64,
        /// Enumeration: distinct refused tokens at one station within a minute, past which it is flagged.
        #[arg(
            long,
            env = "CHARGEGATE_ABUSE_ENUMERATION_THRESHOLD",
            default_value_t = 20
        )]
        enumeration_threshold: usize,
        /// Velocity: distinct stations of one token within the window, past which it is flagged.
        #[arg(long, env = "CHARGEGATE_ABUSE_VELOCITY_STATIONS", default_value_t = 5)]
        velocity_stations: usize,
        /// Velocity's window (ms).
        #[arg(
            long,
            env = "CHARGEGATE_ABUSE_VELOCITY_WINDOW_MS",
            default_value_t = 600_000
        )]
        velocity_window_ms: u64,
    },
}

#[derive(Debug, Args)]
pub struct WebhooksArgs {
    #[command(flatten)]
    pub server: ServerArg,
    #[command(subcommand)]
    pub command: WebhooksCommand,
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// List deliveries, newest first, one JSON object per line with its attempts.
    List {
        /// pending, delivered or dead (default: every state).
        #[arg(long, value_parser = ["pending", "delivered", "dead"])]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Send dead deliveries again: the ones named, or every dead one.
    Redrive { request_ids: Vec<String> },
}

#[derive(Debug, Args)]
pub struct GrantsArgs {
    #[command(flatten)]
    pub server: ServerArg,
    #[command(subcommand)]
    pub command: GrantsCommand,
}

#[derive(Debug, Subcommand)]
pub enum GrantsCommand {
    /// Create or replace a grant.
    Put {
        /// Station UUID, or * for every station.
        #[arg(long)]
        station: String,
        /// Driver token (prefer CHARGEGATE_DRIVER_TOKEN).
        #[arg(
            long = "driver-token",
            env = "CHARGEGATE_DRIVER_TOKEN",
            hide_env_values = true
        )]
        token: String,
        /// RFC 3339 expiry.
        #[arg(long)]
        expires_at: Option<String>,
        #[arg(long)]
        blocked: bool,
    },
    /// Delete a grant.
    Delete {
        #[arg(long)]
        station: String,
        #[arg(
            long = "driver-token",
            env = "CHARGEGATE_DRIVER_TOKEN",
            hide_env_values = true
        )]
        token: String,
    },
    /// List grants (tokens appear only as fingerprints).
    List {
        #[arg(long)]
        station: Option<String>,
    },
    /// Put every grant of an access-list CSV (station_id,driver_token[,expires_at][,blocked]).
    Import { file: PathBuf },
}

/// Writing to stdout failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot write to stdout")]
pub struct StdoutError(#[source] pub std::io::Error);

impl StdoutError {
    /// The reader went away (`| head`): the output ends there, as with any Unix tool.
    pub fn reader_gone(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

/// Server flags: `--config` and one flag per key of [`crate::settings::SETTINGS`], each also read
/// from its `CHARGEGATE_<KEY>` variable. Built from the list, so a key cannot lack its flag.
#[derive(Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML file with the same keys as the flags (flags and environment win over it).
    pub config: Option<PathBuf>,
    /// The keys set by a flag or the environment.
    values: BTreeMap<&'static str, String>,
}

impl ServeArgs {
    /// The keys set by a flag or the environment.
    pub fn overrides(&self) -> BTreeMap<&'static str, String> {
        self.values.clone()
    }

    /// The configuration these flags, their environment and their file resolve to.
    pub fn resolve(&self) -> Result<crate::config::Config, crate::config::ConfigError> {
        crate::config::Config::resolve(&self.values, self.config.as_deref())
    }
}

impl clap::Args for ServeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        use clap::{Arg, value_parser};
        cmd.arg(
            Arg::new("config")
                .long("config")
                .env("CHARGEGATE_CONFIG")
                .value_name("FILE")
                .value_parser(value_parser!(PathBuf))
                .help(
                    "TOML file with the same keys as the flags (flags and environment win over it)",
                ),
        )
        .args(crate::settings::SETTINGS.iter().map(|s| {
            Arg::new(s.key)
                .long(s.flag())
                .env(s.env())
                .value_name("VALUE")
                .help(s.help())
                .hide_env_values(true)
        }))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for ServeArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut args = Self::default();
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        if let Some(file) = matches.get_one::<PathBuf>("config") {
            self.config = Some(file.clone());
        }
        for s in crate::settings::SETTINGS {
            if let Some(value) = matches.get_one::<String>(s.key) {
                self.values.insert(s.key, value.clone());
            }
        }
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct ServerArg {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Bearer token of a client of the server's clients_file (prefer the environment).
    #[arg(
        long = "token",
        env = "CHARGEGATE_CLIENT_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

/// Where the server is, and the TLS files to reach it with.
#[derive(Debug, Args, Clone)]
pub struct Endpoint {
    /// Address of the chargegate server (https://… for TLS).
    #[arg(
        long,
        env = "CHARGEGATE_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// PEM CA certificate to trust for the server's certificate (TLS); default: the public roots.
    #[arg(long, env = "CHARGEGATE_CLIENT_CA")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --key).
    #[arg(long, env = "CHARGEGATE_CLIENT_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "CHARGEGATE_CLIENT_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
}

/// A connection to the server that sends the bearer token, if any, with every call.
pub type Connection =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// Sends `token` with every call; `None` sends nothing.
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        match token {
            Some(token) => Ok(Self(Some(format!("Bearer {token}").parse().map_err(
                |_| anyhow::anyhow!("the token has characters a header cannot carry"),
            )?))),
            None => Ok(Self(None)),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl ServerArg {
    /// A connection to `--server` that sends `--token`.
    pub async fn connect(&self) -> anyhow::Result<Connection> {
        self.endpoint.connect(self.token.as_deref()).await
    }
}

impl Endpoint {
    /// A connection to `--server` sending `token` as a bearer token, over TLS when the server
    /// is `https://` or a CA or client certificate is given.
    pub async fn connect(&self, token: Option<&str>) -> anyhow::Result<Connection> {
        use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
        };
        let mut endpoint = Channel::from_shared(self.server.clone())
            .with_context(|| format!("--server {} is not a URL", self.server))?;
        if self.server.starts_with("https://") || self.ca.is_some() || self.cert.is_some() {
            let mut tls = ClientTlsConfig::new();
            tls = match &self.ca {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
                None => tls.with_webpki_roots(),
            };
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            endpoint = endpoint.tls_config(tls).context("TLS settings")?;
        }
        let bearer = Bearer::new(token).context("the bearer token")?;
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", self.server))?;
        Ok(tonic::service::interceptor::InterceptedService::new(
            channel, bearer,
        ))
    }
}

#[derive(Debug, Args)]
pub struct AuthorizeArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Station UUID.
    #[arg(long)]
    pub station: String,
    /// Driver token (prefer CHARGEGATE_DRIVER_TOKEN to keep it out of the shell history).
    #[arg(
        long = "driver-token",
        env = "CHARGEGATE_DRIVER_TOKEN",
        hide_env_values = true
    )]
    pub driver_token: String,
    /// Where the decision is POSTed.
    #[arg(long)]
    pub callback_url: Option<String>,
    /// Idempotency key (default: assigned by the server).
    #[arg(long)]
    pub request_id: Option<String>,
    /// Wait for the decision and print it.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Station UUID to watch; repeat for several. None: every station.
    #[arg(long = "station")]
    pub stations: Vec<String>,
    /// Resume after this cursor.
    #[arg(long)]
    pub after: Option<String>,
    /// Also print heartbeats.
    #[arg(long)]
    pub heartbeats: bool,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub server: ServerArg,
    pub request_id: String,
}

async fn connect(server: &ServerArg) -> anyhow::Result<ChargingAuthorizationClient<Connection>> {
    Ok(ChargingAuthorizationClient::new(server.connect().await?))
}

/// Runs a client subcommand.
pub async fn run_client(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) | Command::Config(_) | Command::Migrate(_) => {
            unreachable!("serve, config and migrate are run by main")
        }
        Command::Authorize(args) => authorize(args).await,
        Command::Watch(args) => watch(args).await,
        Command::Grants(args) => grants(args).await,
        Command::Webhooks(args) => webhooks(args).await,
        Command::Audit(args) => audit::run(args.command).await,
        Command::Clients(ClientsArgs {
            command:
                ClientsCommand::NewToken {
                    name,
                    stations,
                    roles,
                },
        }) => {
            let (token, digest) = crate::security::clients::new_token();
            let list = |xs: &[String]| {
                xs.iter()
                    .map(|x| format!("{x:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            out!("{token}");
            out!();
            out!(
                "# The line above is {name:?}'s bearer token, shown this once: give it to the client."
            );
            out!("# Add these lines to clients_file, which keeps only its SHA-256 (to rotate a");
            out!(
                "# token, list the old and the new digest in token_sha256 until the client moved):"
            );
            out!("[[client]]");
            out!("name = {name:?}");
            out!("token_sha256 = {digest:?}");
            out!("stations = [{}]", list(&stations));
            out!("roles = [{}]", list(&roles));
            Ok(())
        }
        Command::Explain(args) => {
            let connection = args.endpoint.connect(args.client_token.as_deref()).await?;
            let answer = proto::grants_client::GrantsClient::new(connection)
                .explain_decision(proto::ExplainDecisionRequest {
                    station_id: args.station,
                    driver_token: args.token,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let matched: Vec<serde_json::Value> = answer.matched.iter().map(grant_json).collect();
            out!(
                "{}",
                serde_json::json!({
                    "status": answer
                        .status()
                        .as_str_name()
                        .trim_start_matches("DECISION_STATUS_")
                        .to_ascii_lowercase(),
                    "reason": answer.reason,
                    "authorizer": answer.authorizer,
                    "matched": matched,
                    "detail": answer.detail,
                })
            );
            Ok(())
        }
        Command::Get(args) => {
            let mut client = connect(&args.server).await?;
            let decision = client
                .get_decision(GetDecisionRequest {
                    request_id: args.request_id,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .decision
                .unwrap_or_default();
            out!("{}", decision_json(&decision));
            Ok(())
        }
    }
}

async fn authorize(args: AuthorizeArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let ack = client
        .authorize(AuthorizeRequest {
            station_id: args.station,
            driver_token: args.driver_token,
            callback_url: args.callback_url.unwrap_or_default(),
            request_id: args.request_id.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    out!(
        "{}",
        serde_json::json!({
            "request_id": ack.request_id,
            "status": "accepted",
            "duplicate": ack.duplicate,
            "message": ack.message,
        })
    );
    if args.wait {
        let mut delay = std::time::Duration::from_millis(20);
        loop {
            let decision = client
                .get_decision(GetDecisionRequest {
                    request_id: ack.request_id.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .decision
                .unwrap_or_default();
            if decision.status() != DecisionStatus::Pending {
                out!("{}", decision_json(&decision));
                return Ok(());
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(std::time::Duration::from_millis(500));
        }
    }
    Ok(())
}

async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.server).await?;
    let mut stream = client
        .subscribe_decisions(SubscribeDecisionsRequest {
            station_ids: args.stations,
            after_cursor: args.after.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(item) = stream.next().await {
        match item.map_err(status_error)?.event {
            Some(Event::Decision(d)) => out!("{}", decision_json(&d)),
            Some(Event::Heartbeat(h)) if args.heartbeats => {
                out!("{}", serde_json::json!({ "heartbeat": h.cursor }))
            }
            _ => {}
        }
    }
    Ok(())
}

pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

pub(crate) fn decision_json(d: &proto::Decision) -> serde_json::Value {
    let status = d
        .status()
        .as_str_name()
        .trim_start_matches("DECISION_STATUS_")
        .to_ascii_lowercase();
    serde_json::json!({
        "request_id": d.request_id,
        "station_id": d.station_id,
        "status": status,
        "reason": d.reason,
        "driver_token_fingerprint": d.driver_token_fingerprint,
        "processing_time_ms": d.processing_time_ms,
        "cursor": d.cursor,
        "revision": d.revision,
    })
}

fn rfc3339(raw: &str) -> anyhow::Result<prost_types::Timestamp> {
    let t = time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("{raw:?} is not an RFC 3339 timestamp"))?;
    Ok(prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    })
}

fn grant_json(g: &proto::Grant) -> serde_json::Value {
    serde_json::json!({
        "station_id": g.station_id,
        "driver_token_fingerprint": g.driver_token_fingerprint,
        "expires_at": g.expires_at.as_ref().map(|t| t.seconds),
        "blocked": g.blocked,
    })
}

async fn grants(args: GrantsArgs) -> anyhow::Result<()> {
    use proto::{
        DeleteGrantRequest, ListGrantsRequest, PutGrantRequest, grants_client::GrantsClient,
    };
    let mut client = GrantsClient::new(args.server.connect().await?);
    match args.command {
        GrantsCommand::Put {
            station,
            token,
            expires_at,
            blocked,
        } => {
            let expires_at = expires_at.as_deref().map(rfc3339).transpose()?;
            let grant = client
                .put_grant(PutGrantRequest {
                    station_id: station,
                    driver_token: token,
                    expires_at,
                    blocked,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .grant
                .unwrap_or_default();
            out!("{}", grant_json(&grant));
        }
        GrantsCommand::Delete { station, token } => {
            let deleted = client
                .delete_grant(DeleteGrantRequest {
                    station_id: station,
                    driver_token: token,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .deleted;
            out!("{}", serde_json::json!({ "deleted": deleted }));
        }
        GrantsCommand::List { station } => {
            let grants = client
                .list_grants(ListGrantsRequest {
                    station_id: station.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .grants;
            for g in &grants {
                out!("{}", grant_json(g));
            }
        }
        GrantsCommand::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let rows = crate::authorizer::acl::parse_rows(&text).map_err(|(line, message)| {
                anyhow::anyhow!("{}: line {line}: {message}", file.display())
            })?;
            let count = rows.len();
            for row in rows {
                client
                    .put_grant(PutGrantRequest {
                        station_id: row.station_id,
                        driver_token: row.token.expose().to_owned(),
                        expires_at: row.expires_at.map(crate::decision::Micros::to_proto),
                        blocked: row.blocked,
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("line {}: {}", row.line, s.message()))?;
            }
            out!("{}", serde_json::json!({ "imported": count }));
        }
    }
    Ok(())
}

async fn webhooks(args: WebhooksArgs) -> anyhow::Result<()> {
    use proto::{
        DeliveryState, ListDeliveriesRequest, RedriveDeliveriesRequest,
        webhooks_client::WebhooksClient,
    };
    let mut client = WebhooksClient::new(args.server.connect().await?);
    match args.command {
        WebhooksCommand::List { state, limit } => {
            let state = match state.as_deref() {
                Some("pending") => DeliveryState::Pending,
                Some("delivered") => DeliveryState::Delivered,
                Some("dead") => DeliveryState::Dead,
                _ => DeliveryState::Unspecified,
            };
            let deliveries = client
                .list_deliveries(ListDeliveriesRequest {
                    state: state as i32,
                    limit,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .deliveries;
            for d in &deliveries {
                out!("{}", delivery_json(d));
            }
        }
        WebhooksCommand::Redrive { request_ids } => {
            let redriven = client
                .redrive_deliveries(RedriveDeliveriesRequest { request_ids })
                .await
                .map_err(status_error)?
                .into_inner()
                .redriven;
            out!("{}", serde_json::json!({ "redriven": redriven }));
        }
    }
    Ok(())
}

fn delivery_json(d: &proto::Delivery) -> serde_json::Value {
    let rfc3339 = |t: &prost_types::Timestamp| crate::decision::Micros::from_proto(t).to_rfc3339();
    serde_json::json!({
        "request_id": d.request_id,
        "station_id": d.station_id,
        "callback_url": d.callback_url,
        "state": d.state().as_str_name().trim_start_matches("DELIVERY_STATE_").to_ascii_lowercase(),
        "attempts": d.attempts,
        "next_attempt_at": d.next_attempt_at.as_ref().map(rfc3339),
        "last_error": d.last_error,
        "history": d.history.iter().map(|a| serde_json::json!({
            "at": a.at.as_ref().map(rfc3339),
            "outcome": a.outcome,
            "http_status": a.http_status,
            "latency_ms": a.latency_ms,
            "error_class": a.error_class,
        })).collect::<Vec<_>>(),
    })
}
