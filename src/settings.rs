//! The one list of settings: every configuration key with its type, default and meaning, written
//! once, here.
//!
//! Everything else is derived from it or checked against it: the `serve` flags and their
//! `CHARGEGATE_<KEY>` environment names ([`crate::cli`] builds them from [`SETTINGS`]), the
//! ranges and choices [`crate::config`] accepts, `config.default.toml` ([`default_toml`], also
//! printed by `chargegate config defaults`) and the README's table ([`markdown_table`]). Tests fail
//! when a key is parsed but not listed, listed but not parsed, or when a file is out of step
//! (`UPDATE_EXPECT=1 cargo test settings` rewrites the files).

use std::fmt::Write as _;

/// One configuration key.
#[derive(Debug)]
pub struct Setting {
    pub key: &'static str,
    pub kind: Kind,
    pub default: Default,
    /// What it does, in one sentence (Markdown code spans allowed): the flag's help, the README's
    /// meaning column and the comment above the key in `config.default.toml`.
    pub meaning: &'static str,
    /// The part of the defaults file it is listed under.
    pub group: &'static str,
    /// Not a key of the contract (CONTRACT §7) but this service's own.
    pub extension: bool,
}

/// What values a key takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `ip:port`.
    Address,
    /// `ip:port`, or `off`.
    AddressOrOff,
    /// A file or directory.
    Path,
    /// A URL with one of these schemes.
    Url(&'static [&'static str]),
    /// A whole number in a range.
    Count {
        min: u64,
        max: u64,
    },
    /// Milliseconds in a range.
    Millis {
        min: u64,
        max: u64,
    },
    /// Days in a range.
    Days {
        min: u64,
        max: u64,
    },
    Bool,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A value never printed (keys, signing secrets).
    Secret,
    /// A name: 1 to 64 letters, digits, `.`, `_` or `-`.
    Name,
}

/// A key's default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Default {
    /// This value, as written in the TOML file.
    Value(&'static str),
    /// Follows from other keys or is made at start; the words say how. The defaults file shows
    /// the example commented out.
    Derived {
        words: &'static str,
        example: &'static str,
    },
    /// Off until set; the defaults file shows the example commented out.
    Unset { example: &'static str },
}

impl Setting {
    /// The command-line flag, without its dashes.
    pub fn flag(&self) -> String {
        self.key.replace('_', "-")
    }

    /// The environment variable.
    pub fn env(&self) -> String {
        format!("CHARGEGATE_{}", self.key.to_ascii_uppercase())
    }

    /// The range of a number-valued key.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self.kind {
            Kind::Count { min, max } | Kind::Millis { min, max } | Kind::Days { min, max } => {
                Some((min, max))
            }
            _ => None,
        }
    }

    /// The words a choice-valued key accepts.
    pub fn choices(&self) -> &'static [&'static str] {
        match self.kind {
            Kind::Choice(words) => words,
            _ => &[],
        }
    }

    /// The flag's help line: the meaning and the default, without Markdown.
    pub fn help(&self) -> String {
        let meaning = self.meaning.replace('`', "");
        match self.default {
            Default::Value(v) => format!("{meaning} [default: {v}]"),
            Default::Derived { words, .. } => format!("{meaning} [default: {words}]"),
            Default::Unset { .. } => meaning,
        }
    }

    fn type_words(&self) -> String {
        match self.kind {
            Kind::Address => "address".into(),
            Kind::AddressOrOff => "address or `off`".into(),
            Kind::Path => "path".into(),
            Kind::Url(schemes) => format!("URL ({})", schemes.join(", ")),
            Kind::Count { min, max } => format!("{min}–{max}"),
            Kind::Millis { min, max } => format!("ms, {min}–{max}"),
            Kind::Days { min, max } => format!("days, {min}–{max}"),
            Kind::Bool => "`true`, `false`".into(),
            Kind::Choice(words) => words
                .iter()
                .map(|w| format!("`{w}`"))
                .collect::<Vec<_>>()
                .join(", "),
            Kind::Secret => "secret".into(),
            Kind::Name => "name (1–64 of A–Z a–z 0–9 . _ -)".into(),
        }
    }

    /// The value as a TOML literal: numbers and booleans bare, everything else quoted.
    fn toml_value(&self, value: &str) -> String {
        match self.kind {
            Kind::Count { .. } | Kind::Millis { .. } | Kind::Days { .. } | Kind::Bool => {
                value.to_owned()
            }
            _ => format!("{value:?}"),
        }
    }
}

/// The setting named `key`.
pub fn find(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// The setting named `key`, which the code names and so must exist.
pub(crate) fn get(key: &'static str) -> &'static Setting {
    find(key).unwrap_or_else(|| panic!("`{key}` is not in settings::SETTINGS"))
}

const DAY_MS: u64 = 86_400_000;

/// Every key, in the order the defaults file and the README list them.
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "listen",
        kind: Kind::Address,
        default: Default::Value("127.0.0.1:50051"),
        meaning: "the gRPC address",
        group: "Listeners",
        extension: false,
    },
    Setting {
        key: "metrics_listen",
        kind: Kind::AddressOrOff,
        default: Default::Value("127.0.0.1:9464"),
        meaning: "HTTP address of `/metrics` (Prometheus), `/healthz` and `/readyz`; `off` turns it off",
        group: "Listeners",
        extension: false,
    },
    Setting {
        key: "data_dir",
        kind: Kind::Path,
        default: Default::Value("./data"),
        meaning: "directory of the embedded store, the generated key and the lock file",
        group: "Storage",
        extension: false,
    },
    Setting {
        key: "queue_url",
        kind: Kind::Url(&["sqlite", "redis", "rediss"]),
        default: Default::Derived {
            words: "sqlite://<data_dir>/chargegate.db",
            example: "sqlite://./data/chargegate.db",
        },
        meaning: "where acknowledged requests wait: unset, in the store (the SQLite file, or PostgreSQL's `queue` table); `redis://host:port/db`: a Redis stream dispatches them to every instance (needs `store_url` on PostgreSQL)",
        group: "Storage",
        extension: false,
    },
    Setting {
        key: "store_url",
        kind: Kind::Url(&["sqlite", "postgres", "postgresql"]),
        default: Default::Derived {
            words: "sqlite://<data_dir>/chargegate.db",
            example: "sqlite://./data/chargegate.db",
        },
        meaning: "the decision log, audit trail, grants and webhook outbox: one SQLite file, or `postgres://user@host:port/db` shared by any number of instances",
        group: "Storage",
        extension: false,
    },
    Setting {
        key: "workers",
        kind: Kind::Count {
            min: 1,
            max: 100_000,
        },
        default: Default::Value("64"),
        meaning: "queued requests decided at once (calls to the remote authorizer in flight)",
        group: "Decisions",
        extension: false,
    },
    Setting {
        key: "queue_max",
        kind: Kind::Count {
            min: 1,
            max: 1_000_000_000,
        },
        default: Default::Value("1000000"),
        meaning: "pending requests before `Authorize` answers `RESOURCE_EXHAUSTED`",
        group: "Decisions",
        extension: false,
    },
    Setting {
        key: "authorizer",
        kind: Kind::Choice(&["acl", "http"]),
        default: Default::Value("acl"),
        meaning: "`acl`: the access list (`acl_file`, or the grants kept in the store); `http`: the remote authorizer",
        group: "Decisions",
        extension: false,
    },
    Setting {
        key: "acl_file",
        kind: Kind::Path,
        default: Default::Unset {
            example: "/etc/chargegate/acl.csv",
        },
        meaning: "access-list CSV (`station_id,driver_token[,expires_at][,blocked]`), re-read on change and on SIGHUP; unset: the grants kept in the store (`chargegate.v1.Grants`)",
        group: "Decisions",
        extension: false,
    },
    Setting {
        key: "authorizer_url",
        kind: Kind::Url(&["http", "https"]),
        default: Default::Unset {
            example: "http://127.0.0.1:8080/authorize",
        },
        meaning: "the remote authorizer, required with `authorizer = \"http\"`",
        group: "Decisions",
        extension: false,
    },
    Setting {
        key: "authorize_timeout_ms",
        kind: Kind::Millis {
            min: 1,
            max: 600_000,
        },
        default: Default::Value("3000"),
        meaning: "deadline of one decision; past it the decision is `UNKNOWN`/`timeout`",
        group: "Decisions",
        extension: false,
    },
    Setting {
        key: "reclaim_margin_ms",
        kind: Kind::Millis {
            min: 100,
            max: 600_000,
        },
        default: Default::Value("30000"),
        meaning: "how long a queued request stays with its worker beyond `authorize_timeout_ms` (time to record its decision) before another worker may take it over",
        group: "Decisions",
        extension: true,
    },
    Setting {
        key: "authorizer_breaker_failures",
        kind: Kind::Count {
            min: 1,
            max: 1_000_000,
        },
        default: Default::Value("5"),
        meaning: "consecutive failures of the remote authorizer that open its circuit",
        group: "Decisions",
        extension: false,
    },
    Setting {
        key: "authorizer_breaker_cooldown_ms",
        kind: Kind::Millis {
            min: 1,
            max: DAY_MS,
        },
        default: Default::Value("30000"),
        meaning: "how long the circuit stays open before one probe goes through",
        group: "Decisions",
        extension: false,
    },
    Setting {
        key: "authorizer_cache_ttl_ms",
        kind: Kind::Millis {
            min: 0,
            max: DAY_MS,
        },
        default: Default::Value("0"),
        meaning: "how long the remote authorizer's definite answers are cached; 0 turns the cache off",
        group: "Decisions",
        extension: false,
    },
    Setting {
        key: "webhook_secret",
        kind: Kind::Secret,
        default: Default::Unset {
            example: "whsec_...",
        },
        meaning: "`whsec_<base64 key>` signing webhooks; two, separated by a space, while a key is rotated (both sign); unset: webhooks are not signed",
        group: "Webhooks",
        extension: false,
    },
    Setting {
        key: "webhook_timeout_ms",
        kind: Kind::Millis {
            min: 1,
            max: 600_000,
        },
        default: Default::Value("10000"),
        meaning: "one webhook attempt, connecting included",
        group: "Webhooks",
        extension: false,
    },
    Setting {
        key: "webhook_max_attempts",
        kind: Kind::Count { min: 1, max: 1000 },
        default: Default::Value("10"),
        meaning: "attempts before a delivery is dead",
        group: "Webhooks",
        extension: false,
    },
    Setting {
        key: "webhook_backoff_base_ms",
        kind: Kind::Millis {
            min: 1,
            max: DAY_MS,
        },
        default: Default::Value("1000"),
        meaning: "first retry delay; retries back off with full jitter, doubling",
        group: "Webhooks",
        extension: false,
    },
    Setting {
        key: "webhook_backoff_max_ms",
        kind: Kind::Millis {
            min: 1,
            max: 7 * DAY_MS,
        },
        default: Default::Value("600000"),
        meaning: "longest retry delay (at least `webhook_backoff_base_ms`)",
        group: "Webhooks",
        extension: false,
    },
    Setting {
        key: "webhook_max_age_ms",
        kind: Kind::Millis {
            min: 1,
            max: 30 * DAY_MS,
        },
        default: Default::Value("3600000"),
        meaning: "no attempt later than this after the decision (or a redrive); also how long a dead delivery keeps its token",
        group: "Webhooks",
        extension: false,
    },
    Setting {
        key: "webhook_allow_private",
        kind: Kind::Bool,
        default: Default::Value("false"),
        meaning: "deliver to loopback and private addresses (the link-local metadata range stays refused)",
        group: "Webhooks",
        extension: false,
    },
    Setting {
        key: "webhook_concurrency",
        kind: Kind::Count {
            min: 1,
            max: 100_000,
        },
        default: Default::Value("256"),
        meaning: "webhook attempts in flight at once",
        group: "Webhooks",
        extension: true,
    },
    Setting {
        key: "webhook_host_concurrency",
        kind: Kind::Count {
            min: 1,
            max: 100_000,
        },
        default: Default::Value("16"),
        meaning: "webhook attempts in flight to one `host:port`",
        group: "Webhooks",
        extension: true,
    },
    Setting {
        key: "heartbeat_interval_ms",
        kind: Kind::Millis {
            min: 10,
            max: DAY_MS,
        },
        default: Default::Value("15000"),
        meaning: "heartbeat on `SubscribeDecisions` streams that sent nothing for this long",
        group: "Streams",
        extension: false,
    },
    Setting {
        key: "audit_retention_days",
        kind: Kind::Days {
            min: 1,
            max: 36_500,
        },
        default: Default::Value("730"),
        meaning: "decisions (with their request ids and deliveries) and call records older than this are purged, at start-up and hourly",
        group: "Audit",
        extension: false,
    },
    Setting {
        key: "revise_unknown_within_ms",
        kind: Kind::Millis {
            min: 0,
            max: 7 * DAY_MS,
        },
        default: Default::Value("600000"),
        meaning: "UNKNOWN decisions younger than this are asked again once the authorizer answers again, and an ALLOWED or NOT_ALLOWED answer is recorded as the request's revision; their tokens are kept this long, then erased; 0: off",
        group: "Decisions",
        extension: false,
    },
    Setting {
        key: "revise_rate_per_s",
        kind: Kind::Count {
            min: 0,
            max: 100_000,
        },
        default: Default::Value("50"),
        meaning: "revisions asked a second, at most, so a recovering authorizer is not flooded; 0: off",
        group: "Decisions",
        extension: false,
    },
    Setting {
        key: "audit_archive_url",
        kind: Kind::Url(&["file", "s3"]),
        default: Default::Unset {
            example: "s3://audit-archive/chargegate",
        },
        meaning: "`file:///dir` or `s3://bucket/prefix` (credentials and endpoint from `AWS_*`): retention archives decisions there before it purges them, and never purges one the archive does not hold",
        group: "Audit",
        extension: false,
    },
    Setting {
        key: "audit_calls",
        kind: Kind::Bool,
        default: Default::Value("true"),
        meaning: "record every RPC in the audit trail (turn off only to measure what it costs)",
        group: "Audit",
        extension: true,
    },
    Setting {
        key: "abuse_enumeration_threshold",
        kind: Kind::Count {
            min: 1,
            max: 1_000_000,
        },
        default: Default::Value("20"),
        meaning: "abuse signal: a station that refuses (`no_grant`) more distinct tokens than this within a minute is flagged (gauge, WARN, `audit anomalies`)",
        group: "Audit",
        extension: false,
    },
    Setting {
        key: "abuse_velocity_stations",
        kind: Kind::Count {
            min: 1,
            max: 1_000_000,
        },
        default: Default::Value("5"),
        meaning: "abuse signal: a token decided at more distinct stations than this within `abuse_velocity_window_ms` is flagged",
        group: "Audit",
        extension: false,
    },
    Setting {
        key: "abuse_velocity_window_ms",
        kind: Kind::Millis {
            min: 1_000,
            max: 86_400_000,
        },
        default: Default::Value("600000"),
        meaning: "the window of the velocity signal",
        group: "Audit",
        extension: false,
    },
    Setting {
        key: "token_hash_key",
        kind: Kind::Secret,
        default: Default::Derived {
            words: "generated",
            example: "...",
        },
        meaning: "key of driver-token fingerprints and of the decision log's hash chain; unset: generated on first start into `<data_dir>/token_hash.key` (mode 0600)",
        group: "Audit",
        extension: false,
    },
    Setting {
        key: "tls_cert",
        kind: Kind::Path,
        default: Default::Unset {
            example: "/etc/chargegate/tls.crt",
        },
        meaning: "PEM certificate chain of the gRPC listener; with `tls_key`, TLS 1.2/1.3 with ALPN `h2` (plaintext is refused); re-read on change and SIGHUP, a bad new file keeps the old one",
        group: "Security",
        extension: false,
    },
    Setting {
        key: "tls_key",
        kind: Kind::Path,
        default: Default::Unset {
            example: "/etc/chargegate/tls.key",
        },
        meaning: "PEM private key of `tls_cert`; refused when group or others may read it",
        group: "Security",
        extension: false,
    },
    Setting {
        key: "tls_client_ca",
        kind: Kind::Path,
        default: Default::Unset {
            example: "/etc/chargegate/clients-ca.crt",
        },
        meaning: "PEM CA certificates for mutual TLS: a client certificate chaining to it whose subject CN is a client's `name` identifies that client; health works without one",
        group: "Security",
        extension: false,
    },
    Setting {
        key: "handshake_timeout_ms",
        kind: Kind::Millis {
            min: 100,
            max: 600_000,
        },
        default: Default::Value("10000"),
        meaning: "the longest a new connection may take to finish its TLS handshake, or on plaintext to send the HTTP/2 preface, before it is closed (at most 1,024 are in progress at once)",
        group: "Security",
        extension: true,
    },
    Setting {
        key: "max_connection_age_ms",
        kind: Kind::Millis {
            min: 0,
            max: 604_800_000,
        },
        default: Default::Value("3600000"),
        meaning: "a connection older than this is sent GOAWAY (clients reconnect, so load spreads over new instances); its calls and streams get `max_connection_age_grace_ms` to finish, streams then end and resume from their cursor; 0: off",
        group: "Security",
        extension: true,
    },
    Setting {
        key: "max_connection_age_grace_ms",
        kind: Kind::Millis {
            min: 0,
            max: 3_600_000,
        },
        default: Default::Value("60000"),
        meaning: "after `max_connection_age_ms`, how long open calls and streams may go on before the connection is closed",
        group: "Security",
        extension: true,
    },
    Setting {
        key: "clients_file",
        kind: Kind::Path,
        default: Default::Unset {
            example: "/etc/chargegate/clients.toml",
        },
        meaning: "TOML file of the clients that may call (CONTRACT §7): bearer tokens as SHA-256 digests, roles `station` and `admin`, stations, an optional `rate`; re-read on change and SIGHUP; unset: every RPC is open, and the server warns at start",
        group: "Security",
        extension: false,
    },
    Setting {
        key: "rate_per_client_per_s",
        kind: Kind::Count {
            min: 0,
            max: 1_000_000,
        },
        default: Default::Value("0"),
        meaning: "calls a second per client (its peer's IP address without `clients_file`), in a bucket of twice that; past it `RESOURCE_EXHAUSTED` with `RetryInfo`; a client's own `rate` overrides it; 0: off",
        group: "Security",
        extension: false,
    },
    Setting {
        key: "rate_per_station_per_s",
        kind: Kind::Count {
            min: 0,
            max: 1_000_000,
        },
        default: Default::Value("0"),
        meaning: "`Authorize` calls a second per station, in a bucket of twice that; past it `RESOURCE_EXHAUSTED` with `RetryInfo`, nothing enqueued; 0: off",
        group: "Security",
        extension: false,
    },
    Setting {
        key: "max_calls_in_flight",
        kind: Kind::Count {
            min: 1,
            max: 1_000_000,
        },
        default: Default::Value("4096"),
        meaning: "unary calls being served at once; the excess is shed at once with `RESOURCE_EXHAUSTED`, never queued (health and reflection are never shed)",
        group: "Security",
        extension: true,
    },
    Setting {
        key: "subscriptions_per_client",
        kind: Kind::Count {
            min: 1,
            max: 1_000_000,
        },
        default: Default::Value("1000"),
        meaning: "decision streams one client (its peer's IP address without `clients_file`) may hold open; past it `RESOURCE_EXHAUSTED`",
        group: "Security",
        extension: true,
    },
    Setting {
        key: "max_message_bytes",
        kind: Kind::Count {
            min: 1024,
            max: 4_194_304,
        },
        default: Default::Value("65536"),
        meaning: "the largest request message; a larger one is answered `RESOURCE_EXHAUSTED` and the connection stays open",
        group: "Security",
        extension: false,
    },
    Setting {
        key: "instance_id",
        kind: Kind::Name,
        default: Default::Derived {
            words: "hostname-pid",
            example: "chargegate-a",
        },
        meaning: "this instance's name among instances that share a store: its Redis consumer name, and in the first log line",
        group: "Process",
        extension: false,
    },
    Setting {
        key: "log_format",
        kind: Kind::Choice(&["text", "json"]),
        default: Default::Value("text"),
        meaning: "log lines as text or JSON; levels via `RUST_LOG` (default `info`)",
        group: "Process",
        extension: false,
    },
    Setting {
        key: "shutdown_grace_ms",
        kind: Kind::Millis {
            min: 0,
            max: 3_600_000,
        },
        default: Default::Value("10000"),
        meaning: "at SIGTERM or SIGINT: time to finish in-flight work before exiting",
        group: "Process",
        extension: false,
    },
];

/// `config.default.toml`: every key with its default (or its example, commented out) and a
/// comment saying what it does.
pub fn default_toml() -> String {
    let mut out = String::from(
        "# chargegate configuration: every key with its default.\n\
         # Generated from src/settings.rs (`chargegate config defaults` prints it); a test keeps the\n\
         # two in step. Pass a file with `chargegate --config FILE`. Flags (--key-name) and\n\
         # CHARGEGATE_<KEY> environment variables override the file; the file overrides the\n\
         # defaults. Unknown keys are refused.\n",
    );
    let mut group = "";
    for s in SETTINGS {
        if s.group != group {
            group = s.group;
            let _ = write!(out, "\n## {group}\n");
        }
        let note = if s.extension {
            " (an extension of the contract)"
        } else {
            ""
        };
        out.push('\n');
        for line in wrap(&format!("{}{note}.", capitalize(s.meaning)), 98) {
            let _ = writeln!(out, "# {line}");
        }
        match s.default {
            Default::Value(v) => {
                let _ = writeln!(out, "{} = {}", s.key, s.toml_value(v));
            }
            Default::Derived { words, example } => {
                let _ = writeln!(out, "# Default: {words}.");
                let _ = writeln!(out, "# {} = {}", s.key, s.toml_value(example));
            }
            Default::Unset { example } => {
                let _ = writeln!(out, "# {} = {}", s.key, s.toml_value(example));
            }
        }
    }
    out
}

/// The README's table of settings.
pub fn markdown_table() -> String {
    let mut out = String::from("| key | default | values | meaning |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let default = match s.default {
            Default::Value(v) => format!("`{v}`"),
            Default::Derived { words, .. } => format!("`{words}`"),
            Default::Unset { .. } => "unset".into(),
        };
        let note = if s.extension { " (extension)" } else { "" };
        let _ = writeln!(
            out,
            "| `{}` | {default} | {} | {}{note} |",
            s.key,
            s.type_words(),
            s.meaning
        );
    }
    out
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) if first != '`' => first.to_uppercase().chain(chars).collect(),
        _ => text.to_owned(),
    }
}

/// Splits `text` into lines of at most `width` characters at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split(' ') {
        let line = lines.last_mut().expect("one line at least");
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(word.to_owned());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Compares a file with what the settings make of it; `UPDATE_EXPECT=1` rewrites it.
    fn check_file(relative: &str, expected: &str, actual: &str, whole: impl Fn(&str) -> String) {
        if actual == expected {
            return;
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
        if std::env::var_os("UPDATE_EXPECT").is_some() {
            let text = std::fs::read_to_string(&path).expect("read");
            std::fs::write(&path, whole(&text)).expect("write");
            return;
        }
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{relative} is out of step with src/settings.rs from its line {} on:\n  expected: {:?}\n  found:    {:?}\n\
             Edit src/settings.rs, then run `UPDATE_EXPECT=1 cargo test settings` to rewrite the file.",
            first + 1,
            expected.lines().nth(first),
            actual.lines().nth(first),
        );
    }

    #[test]
    fn config_default_toml_is_the_settings_list() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.default.toml");
        let actual = std::fs::read_to_string(path).expect("config.default.toml");
        let expected = default_toml();
        check_file("config.default.toml", &expected, &actual, |_| {
            expected.clone()
        });
        // And the file is a valid configuration that means the defaults.
        let parsed: toml::Table = actual.parse().expect("valid TOML");
        for key in parsed.keys() {
            assert!(find(key).is_some(), "{key} is not a setting");
        }
    }

    #[test]
    fn the_readme_table_is_the_settings_list() {
        const BEGIN: &str = "<!-- settings: begin -->\n";
        const END: &str = "<!-- settings: end -->";
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
        let readme = std::fs::read_to_string(path).expect("README.md");
        let start = readme
            .find(BEGIN)
            .expect("the README marks its settings table")
            + BEGIN.len();
        let end = start + readme[start..].find(END).expect("the table's end marker");
        let expected = markdown_table();
        check_file("README.md", &expected, &readme[start..end], |text| {
            format!("{}{expected}{}", &text[..start], &text[end..])
        });
    }

    #[test]
    fn every_setting_reads_well() {
        let mut seen = std::collections::BTreeSet::new();
        for s in SETTINGS {
            assert!(seen.insert(s.key), "{} is listed twice", s.key);
            assert!(
                s.key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}: keys are lower-case words joined by _",
                s.key
            );
            assert!(
                !s.meaning.is_empty() && !s.meaning.ends_with('.'),
                "{}",
                s.key
            );
            if let (Default::Value(v), Some((min, max))) = (s.default, s.range()) {
                let v: u64 = v.parse().expect("a number default");
                assert!(
                    (min..=max).contains(&v),
                    "{}: default outside its range",
                    s.key
                );
            }
            if let (Default::Value(v), Kind::Choice(words)) = (s.default, s.kind) {
                assert!(words.contains(&v), "{}: default is not a choice", s.key);
            }
        }
    }
}
