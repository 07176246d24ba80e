//! Configuration: every key of CONTRACT §7, parsed once into types.
//!
//! Sources, strongest first: command-line flags, `CHARGEGATE_<KEY>` environment variables (both
//! gathered by clap in [`crate::cli`]), the TOML file named by `--config`, then the defaults. Every
//! key, its range or choices, its default and its meaning are listed once, in [`crate::settings`];
//! a test holds [`Config::for_data_dir`] and [`Config::from_values`] to that list. A bad value is a
//! [`ConfigError`] naming the key; the binary exits 64 with it.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use url::Url;

use crate::settings;

/// A value that must never be printed (keys, secrets).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where the queue lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueBackend {
    /// The embedded default: a table in the SQLite file.
    Sqlite { path: PathBuf },
    /// Redis Streams (scale-out).
    Redis { url: String },
    /// The `queue` table of the PostgreSQL store (`store_url = postgres://…`, `queue_url` unset).
    Postgres,
}

/// Where the decision log, audit records, grants and webhook outbox live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreBackend {
    Sqlite { path: PathBuf },
    Postgres { url: String },
}

/// Which authorizer decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthorizerConfig {
    /// The access list: from `acl_file` when set, else the grants kept in the store.
    Acl { file: Option<PathBuf> },
    /// The remote authorizer of CONTRACT §4.
    Http { url: Url },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failures: u32,
    pub cooldown: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookConfig {
    pub secret: Option<Secret>,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub max_age: Duration,
    pub allow_private: bool,
    /// Attempts in flight at once (an extension of CONTRACT §7).
    pub concurrency: usize,
    /// Attempts in flight at once to one `host:port` (an extension of CONTRACT §7).
    pub host_concurrency: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The whole configuration. Tests build it from values with [`Config::for_data_dir`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    /// `None` when set to `off`: no metrics/health HTTP listener.
    pub metrics_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub queue: QueueBackend,
    pub store: StoreBackend,
    pub workers: usize,
    pub queue_max: u64,
    pub authorizer: AuthorizerConfig,
    pub authorize_timeout: Duration,
    /// A claimed request's lease is `authorize_timeout + reclaim_margin`.
    pub reclaim_margin: Duration,
    pub breaker: BreakerConfig,
    /// `None`: the decision cache is off.
    pub authorizer_cache_ttl: Option<Duration>,
    pub webhook: WebhookConfig,
    pub heartbeat_interval: Duration,
    pub audit_retention_days: u32,
    /// How long an UNKNOWN decision may be revised (CONTRACT §2a); zero: revisions are off.
    pub revise_unknown_within: Duration,
    /// Kept requests asked again a second, at most; 0: revisions are off.
    pub revise_rate_per_s: u32,
    /// Where retention archives decisions before it purges them (CONTRACT §6a).
    pub audit_archive_url: Option<String>,
    /// Record every RPC (an extension of CONTRACT §7, for measuring its cost; on by default).
    pub audit_calls: bool,
    /// The thresholds of the abuse signals.
    pub abuse: crate::audit::abuse::AbuseSettings,
    /// `None`: generated on first start and kept in the data dir.
    pub token_hash_key: Option<Secret>,
    /// This instance's name among instances sharing a store.
    pub instance_id: String,
    pub tls: Option<TlsConfig>,
    pub clients_file: Option<PathBuf>,
    /// The largest request message accepted.
    pub max_message_bytes: usize,
    /// Calls a second per client; 0: off.
    pub rate_per_client_per_s: u32,
    /// `Authorize` calls a second per station; 0: off.
    pub rate_per_station_per_s: u32,
    /// Unary calls served at once before the excess is shed.
    pub max_calls_in_flight: usize,
    /// Decision streams one client may hold open.
    pub subscriptions_per_client: usize,
    /// The longest a new connection may take to finish its handshake.
    pub handshake_timeout: Duration,
    /// `None`: connections may live for ever.
    pub max_connection_age: Option<Duration>,
    pub max_connection_age_grace: Duration,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
}

/// A configuration that cannot be used, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("configuration file {path}: {message}")]
    File { path: PathBuf, message: String },
}

impl ConfigError {
    fn invalid(key: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            key,
            message: message.into(),
        }
    }
}

impl Config {
    /// Whether UNKNOWN decisions are kept and revised (CONTRACT §2a).
    pub fn revisions_on(&self) -> bool {
        !self.revise_unknown_within.is_zero() && self.revise_rate_per_s > 0
    }

    /// The defaults of CONTRACT §7 with every embedded store inside `data_dir`.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        let db = data_dir.join("chargegate.db");
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            queue: QueueBackend::Sqlite { path: db.clone() },
            store: StoreBackend::Sqlite { path: db },
            data_dir,
            workers: 64,
            queue_max: 1_000_000,
            authorizer: AuthorizerConfig::Acl { file: None },
            authorize_timeout: Duration::from_millis(3000),
            reclaim_margin: Duration::from_millis(30_000),
            breaker: BreakerConfig {
                failures: 5,
                cooldown: Duration::from_millis(30_000),
            },
            authorizer_cache_ttl: None,
            webhook: WebhookConfig {
                secret: None,
                timeout: Duration::from_millis(10_000),
                max_attempts: 10,
                backoff_base: Duration::from_millis(1000),
                backoff_max: Duration::from_millis(600_000),
                max_age: Duration::from_millis(3_600_000),
                allow_private: false,
                concurrency: 256,
                host_concurrency: 16,
            },
            heartbeat_interval: Duration::from_millis(15_000),
            audit_retention_days: 730,
            audit_archive_url: None,
            revise_unknown_within: Duration::from_millis(600_000),
            revise_rate_per_s: 50,
            audit_calls: true,
            abuse: crate::audit::abuse::AbuseSettings::default(),
            token_hash_key: None,
            instance_id: default_instance_id(),
            tls: None,
            clients_file: None,
            max_message_bytes: 65_536,
            rate_per_client_per_s: 0,
            rate_per_station_per_s: 0,
            max_calls_in_flight: 4096,
            subscriptions_per_client: 1000,
            handshake_timeout: Duration::from_millis(10_000),
            max_connection_age: Some(Duration::from_millis(3_600_000)),
            max_connection_age_grace: Duration::from_millis(60_000),
            log_format: LogFormat::Text,
            shutdown_grace: Duration::from_millis(10_000),
        }
    }

    /// Resolves the configuration from flags and environment (`overrides`, already merged by clap)
    /// over an optional TOML file over the defaults.
    pub fn resolve(
        overrides: &BTreeMap<&'static str, String>,
        file: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let from_file = match file {
            Some(path) => read_toml(path)?,
            None => BTreeMap::new(),
        };
        let get = |key: &'static str| -> Option<String> {
            overrides
                .get(key)
                .cloned()
                .or_else(|| from_file.get(key).cloned())
        };
        Self::from_values(get)
    }

    /// Builds a configuration from raw string values, one key at a time.
    pub fn from_values(
        values: impl Fn(&'static str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        // Every key read here is one of the settings list (a test checks the converse).
        let get = |key: &'static str| values(settings::get(key).key);
        let data_dir = get("data_dir")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("./data"));
        if data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("data_dir", "must not be empty"));
        }
        let mut c = Self::for_data_dir(data_dir);
        let default_db = c.data_dir.join("chargegate.db");

        if let Some(v) = get("listen") {
            c.listen = parse_addr("listen", &v)?;
        }
        if let Some(v) = get("metrics_listen") {
            c.metrics_listen = match v.trim() {
                "" | "off" => None,
                other => Some(parse_addr("metrics_listen", other)?),
            };
        }
        if let Some(v) = get("queue_url") {
            c.queue = match parse_backend_url("queue_url", &v, &["sqlite", "redis", "rediss"])? {
                BackendUrl::Sqlite(path) => QueueBackend::Sqlite { path },
                BackendUrl::Other(url) => QueueBackend::Redis { url },
            };
        }
        if let Some(v) = get("store_url") {
            c.store =
                match parse_backend_url("store_url", &v, &["sqlite", "postgres", "postgresql"])? {
                    BackendUrl::Sqlite(path) => StoreBackend::Sqlite { path },
                    BackendUrl::Other(url) => StoreBackend::Postgres { url },
                };
        }
        if let Some(v) = get("workers") {
            c.workers = parse_num("workers", &v)? as usize;
        }
        if let Some(v) = get("rate_per_client_per_s") {
            c.rate_per_client_per_s = parse_num("rate_per_client_per_s", &v)? as u32;
        }
        if let Some(v) = get("rate_per_station_per_s") {
            c.rate_per_station_per_s = parse_num("rate_per_station_per_s", &v)? as u32;
        }
        if let Some(v) = get("max_calls_in_flight") {
            c.max_calls_in_flight = parse_num("max_calls_in_flight", &v)? as usize;
        }
        if let Some(v) = get("subscriptions_per_client") {
            c.subscriptions_per_client = parse_num("subscriptions_per_client", &v)? as usize;
        }
        if let Some(v) = get("max_message_bytes") {
            c.max_message_bytes = parse_num("max_message_bytes", &v)? as usize;
        }
        if let Some(v) = get("queue_max") {
            c.queue_max = parse_num("queue_max", &v)?;
        }
        let acl_file = get("acl_file").filter(|v| !v.is_empty()).map(PathBuf::from);
        let authorizer_url = get("authorizer_url").filter(|v| !v.is_empty());
        c.authorizer = match get("authorizer").as_deref().unwrap_or("acl") {
            "acl" => AuthorizerConfig::Acl { file: acl_file },
            "http" => {
                let raw = authorizer_url.ok_or_else(|| {
                    ConfigError::invalid("authorizer_url", "is required when authorizer = \"http\"")
                })?;
                let url = Url::parse(&raw)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                    .ok_or_else(|| {
                        ConfigError::invalid("authorizer_url", "must be an absolute http(s) URL")
                    })?;
                AuthorizerConfig::Http { url }
            }
            other => return Err(not_a_choice("authorizer", other)),
        };
        let ms = |key: &'static str| -> Result<Option<Duration>, ConfigError> {
            get(key)
                .map(|v| parse_num(key, &v).map(Duration::from_millis))
                .transpose()
        };
        if let Some(d) = ms("authorize_timeout_ms")? {
            c.authorize_timeout = d;
        }
        if let Some(d) = ms("reclaim_margin_ms")? {
            c.reclaim_margin = d;
        }
        if let Some(v) = get("authorizer_breaker_failures") {
            c.breaker.failures = parse_num("authorizer_breaker_failures", &v)? as u32;
        }
        if let Some(d) = ms("authorizer_breaker_cooldown_ms")? {
            c.breaker.cooldown = d;
        }
        if let Some(d) = ms("authorizer_cache_ttl_ms")? {
            c.authorizer_cache_ttl = (!d.is_zero()).then_some(d);
        }
        if let Some(v) = get("webhook_secret").filter(|v| !v.is_empty()) {
            if let Err(e) = crate::webhook::signer::Signer::parse(&v) {
                return Err(ConfigError::invalid("webhook_secret", e.to_string()));
            }
            c.webhook.secret = Some(Secret::new(v));
        }
        if let Some(d) = ms("webhook_timeout_ms")? {
            c.webhook.timeout = d;
        }
        if let Some(v) = get("webhook_max_attempts") {
            c.webhook.max_attempts = parse_num("webhook_max_attempts", &v)? as u32;
        }
        if let Some(d) = ms("webhook_backoff_base_ms")? {
            c.webhook.backoff_base = d;
        }
        if let Some(d) = ms("webhook_backoff_max_ms")? {
            c.webhook.backoff_max = d;
        }
        if let Some(d) = ms("webhook_max_age_ms")? {
            c.webhook.max_age = d;
        }
        if let Some(v) = get("webhook_allow_private") {
            c.webhook.allow_private = parse_bool("webhook_allow_private", &v)?;
        }
        if let Some(v) = get("webhook_concurrency") {
            c.webhook.concurrency = parse_num("webhook_concurrency", &v)? as usize;
        }
        if let Some(v) = get("webhook_host_concurrency") {
            c.webhook.host_concurrency = parse_num("webhook_host_concurrency", &v)? as usize;
        }
        if c.webhook.backoff_max < c.webhook.backoff_base {
            return Err(ConfigError::invalid(
                "webhook_backoff_max_ms",
                "must not be less than webhook_backoff_base_ms",
            ));
        }
        if let Some(v) = get("abuse_enumeration_threshold") {
            c.abuse.enumeration_threshold = parse_num("abuse_enumeration_threshold", &v)? as usize;
        }
        if let Some(v) = get("abuse_velocity_stations") {
            c.abuse.velocity_stations = parse_num("abuse_velocity_stations", &v)? as usize;
        }
        if let Some(d) = ms("abuse_velocity_window_ms")? {
            c.abuse.velocity_window = d;
        }
        if let Some(d) = ms("max_connection_age_ms")? {
            c.max_connection_age = (!d.is_zero()).then_some(d);
        }
        if let Some(d) = ms("max_connection_age_grace_ms")? {
            c.max_connection_age_grace = d;
        }
        if let Some(d) = ms("handshake_timeout_ms")? {
            c.handshake_timeout = d;
        }
        if let Some(d) = ms("heartbeat_interval_ms")? {
            c.heartbeat_interval = d;
        }
        if let Some(v) = get("audit_retention_days") {
            c.audit_retention_days = parse_num("audit_retention_days", &v)? as u32;
        }
        if let Some(d) = ms("revise_unknown_within_ms")? {
            c.revise_unknown_within = d;
        }
        if let Some(v) = get("revise_rate_per_s") {
            c.revise_rate_per_s = parse_num("revise_rate_per_s", &v)? as u32;
        }
        if let Some(v) = get("audit_archive_url").filter(|v| !v.is_empty()) {
            crate::archive::Archive::check_url(&v)
                .map_err(|message| ConfigError::invalid("audit_archive_url", message))?;
            c.audit_archive_url = Some(v);
        }
        if let Some(v) = get("token_hash_key") {
            if v.is_empty() {
                return Err(ConfigError::invalid(
                    "token_hash_key",
                    "must not be empty when set",
                ));
            }
            c.token_hash_key = Some(Secret::new(v));
        }
        if let Some(v) = get("instance_id") {
            c.instance_id = parse_name("instance_id", &v)?;
        }
        let path = |key: &'static str| get(key).filter(|v| !v.is_empty()).map(PathBuf::from);
        c.tls = match (path("tls_cert"), path("tls_key")) {
            (Some(cert), Some(key)) => Some(TlsConfig {
                cert,
                key,
                client_ca: path("tls_client_ca"),
            }),
            (None, None) if path("tls_client_ca").is_some() => {
                return Err(ConfigError::invalid(
                    "tls_client_ca",
                    "needs tls_cert and tls_key",
                ));
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::invalid("tls_key", "is required with tls_cert"));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid("tls_cert", "is required with tls_key"));
            }
        };
        c.clients_file = path("clients_file");
        if let Some(v) = get("audit_calls") {
            c.audit_calls = parse_bool("audit_calls", &v)?;
        }
        if let Some(v) = get("log_format") {
            c.log_format = match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => return Err(not_a_choice("log_format", other)),
            };
        }
        if let Some(d) = ms("shutdown_grace_ms")? {
            c.shutdown_grace = d;
        }
        // Defaults that depend on data_dir follow it unless set explicitly.
        if get("store_url").is_none() {
            c.store = StoreBackend::Sqlite {
                path: default_db.clone(),
            };
        }
        if get("queue_url").is_none() {
            c.queue = match c.store {
                StoreBackend::Sqlite { .. } => QueueBackend::Sqlite { path: default_db },
                StoreBackend::Postgres { .. } => QueueBackend::Postgres,
            };
        }
        c.check_supported()?;
        Ok(c)
    }

    /// Refuses combinations this build cannot serve, instead of silently ignoring a key.
    pub fn check_supported(&self) -> Result<(), ConfigError> {
        match (&self.queue, &self.store) {
            (QueueBackend::Sqlite { path: q }, StoreBackend::Sqlite { path: s }) if q == s => {}
            (QueueBackend::Sqlite { .. }, StoreBackend::Sqlite { .. }) => {
                return Err(ConfigError::invalid(
                    "queue_url",
                    "the embedded queue must live in the same SQLite file as store_url",
                ));
            }
            (QueueBackend::Sqlite { .. }, StoreBackend::Postgres { .. }) => {
                return Err(ConfigError::invalid(
                    "queue_url",
                    "the embedded queue needs store_url on SQLite; leave queue_url unset to queue in PostgreSQL",
                ));
            }
            (QueueBackend::Redis { .. }, StoreBackend::Postgres { .. }) => {}
            (QueueBackend::Redis { .. }, StoreBackend::Sqlite { .. }) => {
                return Err(ConfigError::invalid(
                    "queue_url",
                    "the Redis Streams queue needs store_url on PostgreSQL (PostgreSQL keeps what Redis carries)",
                ));
            }
            (QueueBackend::Postgres, StoreBackend::Postgres { .. }) => {}
            (QueueBackend::Postgres, StoreBackend::Sqlite { .. }) => {
                return Err(ConfigError::invalid(
                    "queue_url",
                    "the PostgreSQL queue needs store_url on PostgreSQL",
                ));
            }
        }
        if matches!(self.store, StoreBackend::Postgres { .. }) && self.token_hash_key.is_none() {
            return Err(ConfigError::invalid(
                "token_hash_key",
                "must be set when store_url is PostgreSQL: every instance must fingerprint tokens alike",
            ));
        }
        Ok(())
    }

    /// The SQLite file of the embedded backend.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match &self.store {
            StoreBackend::Sqlite { path } => Some(path),
            StoreBackend::Postgres { .. } => None,
        }
    }
}

fn read_toml(path: &Path) -> Result<BTreeMap<&'static str, String>, ConfigError> {
    let file_err = |message: String| ConfigError::File {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| file_err(e.message().to_owned()))?;
    let mut values = BTreeMap::new();
    for (key, value) in table {
        let Some(known) = settings::find(&key).map(|s| s.key) else {
            return Err(file_err(format!("unknown key `{key}`")));
        };
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(ConfigError::invalid(
                    known,
                    format!(
                        "expected a string, integer or boolean, found {}",
                        other.type_str()
                    ),
                ));
            }
        };
        values.insert(known, value);
    }
    Ok(values)
}

/// `hostname-pid`: unique among the instances of a cluster, new at every start.
fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                .take(40)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "chargegate".into());
    format!("{host}-{}", std::process::id())
}

fn parse_name(key: &'static str, value: &str) -> Result<String, ConfigError> {
    let ok = (1..=64).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    match ok {
        true => Ok(value.to_owned()),
        false => Err(ConfigError::invalid(
            key,
            "must be 1 to 64 letters, digits, '.', '_' or '-'",
        )),
    }
}

fn parse_addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| {
        ConfigError::invalid(
            key,
            format!("expected host:port with an IP address, got {value:?}"),
        )
    })
}

/// A whole number within the key's range in [`settings::SETTINGS`].
fn parse_num(key: &'static str, value: &str) -> Result<u64, ConfigError> {
    let (min, max) = settings::get(key)
        .range()
        .unwrap_or_else(|| panic!("`{key}` is not a number in settings::SETTINGS"));
    let n: u64 = value.trim().replace('_', "").parse().map_err(|_| {
        ConfigError::invalid(key, format!("expected a whole number, got {value:?}"))
    })?;
    if !(min..=max).contains(&n) {
        return Err(ConfigError::invalid(
            key,
            format!("must be between {min} and {max}, got {n}"),
        ));
    }
    Ok(n)
}

/// A word that is not one of the key's choices in [`settings::SETTINGS`].
fn not_a_choice(key: &'static str, value: &str) -> ConfigError {
    let words: Vec<String> = settings::get(key)
        .choices()
        .iter()
        .map(|w| format!("{w:?}"))
        .collect();
    ConfigError::invalid(
        key,
        format!("must be one of {}, not {value:?}", words.join(", ")),
    )
}

fn parse_bool(key: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(ConfigError::invalid(
            key,
            format!("expected true or false, got {other:?}"),
        )),
    }
}

enum BackendUrl {
    Sqlite(PathBuf),
    Other(String),
}

fn parse_backend_url(
    key: &'static str,
    value: &str,
    schemes: &[&str],
) -> Result<BackendUrl, ConfigError> {
    if let Some(path) = value.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(ConfigError::invalid(key, "sqlite:// needs a file path"));
        }
        return Ok(BackendUrl::Sqlite(PathBuf::from(path)));
    }
    let url =
        Url::parse(value).map_err(|e| ConfigError::invalid(key, format!("not a URL: {e}")))?;
    if !schemes.contains(&url.scheme()) {
        return Err(ConfigError::invalid(
            key,
            format!(
                "unsupported scheme {:?}; expected one of {}",
                url.scheme(),
                schemes.join(", ")
            ),
        ));
    }
    Ok(BackendUrl::Other(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(pairs: &[(&'static str, &str)]) -> Result<Config, ConfigError> {
        let map: BTreeMap<&'static str, String> =
            pairs.iter().map(|(k, v)| (*k, v.to_string())).collect();
        Config::resolve(&map, None)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = resolve(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(c.metrics_listen.unwrap().to_string(), "127.0.0.1:9464");
        assert_eq!(
            c.queue,
            QueueBackend::Sqlite {
                path: PathBuf::from("./data/chargegate.db")
            }
        );
        assert_eq!(c.workers, 64);
        assert_eq!(c.queue_max, 1_000_000);
        assert_eq!(c.authorize_timeout, Duration::from_secs(3));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(c.shutdown_grace, Duration::from_secs(10));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (key, value) in [
            ("listen", "nowhere"),
            ("workers", "0"),
            ("workers", "many"),
            ("authorize_timeout_ms", "-5"),
            ("log_format", "xml"),
            ("authorizer", "oracle"),
            ("webhook_secret", "plain"),
            ("webhook_allow_private", "perhaps"),
            ("queue_url", "ftp://x"),
        ] {
            match resolve(&[(key, value)]) {
                Err(ConfigError::Invalid { key: named, .. }) => {
                    assert_eq!(named, key, "{key}={value}")
                }
                other => panic!("{key}={value}: expected an error naming the key, got {other:?}"),
            }
        }
    }

    #[test]
    fn toml_file_is_weaker_than_flags_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "workers = 8\nqueue_max = 10\ndata_dir = \"/tmp/x\"\n",
        )
        .unwrap();
        let flags = BTreeMap::from([("workers", "16".to_owned())]);
        let c = Config::resolve(&flags, Some(&file)).unwrap();
        assert_eq!(c.workers, 16);
        assert_eq!(c.queue_max, 10);
        assert_eq!(c.sqlite_path().unwrap(), Path::new("/tmp/x/chargegate.db"));

        std::fs::write(&file, "wokers = 8\n").unwrap();
        let err = Config::resolve(&BTreeMap::new(), Some(&file)).unwrap_err();
        assert!(err.to_string().contains("wokers"), "{err}");
    }

    #[test]
    fn every_setting_is_read_and_the_listed_defaults_are_the_defaults() {
        let read = std::cell::RefCell::new(std::collections::BTreeSet::new());
        let defaults = Config::from_values(|key| {
            read.borrow_mut().insert(key);
            None
        })
        .unwrap();
        let listed: std::collections::BTreeSet<_> =
            settings::SETTINGS.iter().map(|s| s.key).collect();
        assert_eq!(*read.borrow(), listed, "keys read against keys listed");
        // Each default written out in the list means what the typed defaults say.
        let written = Config::from_values(|key| match settings::get(key).default {
            settings::Default::Value(v) => Some(v.to_owned()),
            _ => None,
        })
        .unwrap();
        assert_eq!(written, defaults);
        assert_eq!(defaults, Config::for_data_dir("./data"));
    }

    #[test]
    fn ranges_come_from_the_settings_list() {
        for s in settings::SETTINGS {
            let Some((min, max)) = s.range() else {
                continue;
            };
            // The backoff's cap may not be below its base: give the other one room.
            let room = match s.key {
                "webhook_backoff_base_ms" => ("webhook_backoff_max_ms", "604800000"),
                _ => ("webhook_backoff_base_ms", "1"),
            };
            let with = |n: u64| resolve(&[(s.key, &n.to_string()), room]);
            assert!(with(min).is_ok(), "{} at its least", s.key);
            assert!(with(max).is_ok(), "{} at its most", s.key);
            let over = with(max + 1).unwrap_err();
            assert!(over.to_string().contains(s.key), "{over}");
            if min > 0 {
                assert!(with(min - 1).is_err(), "{} below its least", s.key);
            }
        }
    }

    #[test]
    fn secrets_are_not_printed() {
        let c = resolve(&[("token_hash_key", "hunter2-hunter2")]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn metrics_listener_can_be_turned_off() {
        assert_eq!(
            resolve(&[("metrics_listen", "off")])
                .unwrap()
                .metrics_listen,
            None
        );
    }
}
