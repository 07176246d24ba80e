//! Client identities (`clients_file`, CONTRACT §7 and §12): who is calling, which RPCs its roles
//! allow, and which stations it may speak for.
//!
//! The file is TOML, one `[[client]]` table per client:
//! ```toml
//! [[client]]
//! name = "gateway-eu-1"
//! token_sha256 = ["<hex>", "<hex>"]   # one digest, or several while a token is rotated
//! stations = ["6f1c2d3e-4a5b-4c6d-8e7f-0123456789ab"]   # or ["*"]
//! roles = ["station"]                  # and/or "admin"
//! rate = { per_second = 50 }           # optional: this client's own rate limit
//! ```
//! Bearer tokens are kept only as SHA-256 digests. A presented token is hashed and looked up by
//! its digest, and the digests are compared in constant time: how long a lookup takes says
//! something at most about the digest of the caller's own guess, never about a stored token.
//! Unknown keys, a duplicate name or digest, a bad station or role are errors naming the line;
//! a file that group or others may write is refused.

use std::{
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::intake;

/// The station scope that covers every station.
pub const ANY_STATION: &str = "*";

/// A client of `clients_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub name: String,
    pub stations: Stations,
    /// May call `Authorize`, `SubscribeDecisions` and `GetDecision` for its stations.
    pub station_role: bool,
    /// May call the Grants, Audit and Webhooks services.
    pub admin: bool,
    /// Its own calls per second, overriding `rate_per_client_per_s`.
    pub rate_per_s: Option<u32>,
}

/// The stations a client may speak for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stations {
    All,
    /// Canonical (lower-case, hyphenated) station ids.
    Only(HashSet<String>),
}

impl Client {
    /// Whether the client may speak for `station` (canonical).
    pub fn covers(&self, station: &str) -> bool {
        match &self.stations {
            Stations::All => true,
            Stations::Only(set) => set.contains(station),
        }
    }
}

/// What a client file says wrong, with the line at fault (0: the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("clients file {path}, line {line}: {message}")]
pub struct ClientsError {
    pub path: String,
    pub line: usize,
    pub message: String,
}

/// A SHA-256 digest whose equality takes the same time wherever the digests differ.
#[derive(Clone, Copy, Debug, Eq)]
struct TokenDigest([u8; 32]);

impl PartialEq for TokenDigest {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Hash for TokenDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

/// The clients of one version of the file.
#[derive(Debug, Default)]
pub struct ClientTable {
    by_digest: HashMap<TokenDigest, Arc<Client>>,
    by_name: HashMap<String, Arc<Client>>,
}

impl ClientTable {
    /// The client whose token this is.
    pub fn by_token(&self, token: &str) -> Option<Arc<Client>> {
        let digest = TokenDigest(Sha256::digest(token.as_bytes()).into());
        self.by_digest.get(&digest).cloned()
    }

    /// The client of this name (a client certificate's subject CN).
    pub fn by_name(&self, name: &str) -> Option<Arc<Client>> {
        self.by_name.get(name).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The clients in force, replaced whole when the file is read again.
#[derive(Debug)]
pub struct Clients {
    path: PathBuf,
    table: RwLock<Arc<ClientTable>>,
}

impl Clients {
    /// Reads `path`; refuses a file that group or others may write.
    pub fn load(path: &Path) -> Result<Self, ClientsError> {
        Ok(Self {
            table: RwLock::new(Arc::new(read_file(path)?)),
            path: path.to_owned(),
        })
    }

    /// The table in force.
    pub fn table(&self) -> Arc<ClientTable> {
        self.table.read().expect("clients lock").clone()
    }

    /// Re-reads the file when it changes and on SIGHUP, until `shutdown`; a bad file keeps the
    /// clients in force and says why.
    pub fn watch(
        self: Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let path = self.path.clone();
        crate::reload::watch_and_apply(
            "clients file",
            "chargegate_clients_reloads_total",
            vec![path.clone()],
            shutdown,
            move || read_file(&path),
            move |table| {
                let clients = table.len();
                *self.table.write().expect("clients lock") = Arc::new(table);
                clients
            },
        )
    }
}

fn read_file(path: &Path) -> Result<ClientTable, ClientsError> {
    let error = |line, message: String| ClientsError {
        path: path.display().to_string(),
        line,
        message,
    };
    crate::reload::check_private(path, false).map_err(|m| error(0, m))?;
    let text = std::fs::read_to_string(path).map_err(|e| error(0, format!("cannot read: {e}")))?;
    parse(&text).map_err(|(line, message)| error(line, message))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    client: Vec<toml::Spanned<Entry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    #[serde(default)]
    token_sha256: Digests,
    #[serde(default)]
    stations: Vec<String>,
    roles: Vec<String>,
    rate: Option<Rate>,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Digests {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rate {
    per_second: u32,
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parses a clients file; an error names its line.
pub fn parse(text: &str) -> Result<ClientTable, (usize, String)> {
    let file: File = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(0, |s| line_of(text, s.start));
        (line, e.message().to_owned())
    })?;
    let mut table = ClientTable::default();
    for spanned in file.client {
        let line = line_of(text, spanned.span().start);
        let entry = spanned.into_inner();
        let client = check(&entry).map_err(|m| (line, m))?;
        let name = client.name.clone();
        let client = Arc::new(client);
        if table.by_name.insert(name.clone(), client.clone()).is_some() {
            return Err((line, format!("a second client named {name:?}")));
        }
        let digests = match entry.token_sha256 {
            Digests::None => Vec::new(),
            Digests::One(d) => vec![d],
            Digests::Many(ds) => ds,
        };
        for hex_digest in digests {
            let bytes: [u8; 32] = hex::decode(hex_digest.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| {
                    (
                        line,
                        format!("token_sha256 of {name:?} is not 64 hex digits"),
                    )
                })?;
            if table
                .by_digest
                .insert(TokenDigest(bytes), client.clone())
                .is_some()
            {
                return Err((
                    line,
                    format!("token_sha256 of {name:?} is another client's digest too"),
                ));
            }
        }
    }
    Ok(table)
}

/// One entry's values, checked.
fn check(entry: &Entry) -> Result<Client, String> {
    let name = entry.name.trim();
    let name_ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:@-".contains(c));
    if !name_ok {
        return Err(format!(
            "name {:?} must be 1 to 128 of A-Z a-z 0-9 . _ : @ -",
            entry.name
        ));
    }
    let (mut station_role, mut admin) = (false, false);
    for role in &entry.roles {
        match role.as_str() {
            "station" => station_role = true,
            "admin" => admin = true,
            other => {
                return Err(format!(
                    "role {other:?} of {name:?} is neither \"station\" nor \"admin\""
                ));
            }
        }
    }
    if !station_role && !admin {
        return Err(format!("{name:?} has no role (\"station\", \"admin\")"));
    }
    let stations = if entry.stations.iter().any(|s| s == ANY_STATION) {
        if entry.stations.len() > 1 {
            return Err(format!(
                "stations of {name:?} name \"*\" beside other stations"
            ));
        }
        Stations::All
    } else {
        let mut set = HashSet::new();
        for raw in &entry.stations {
            let id = intake::parse_station_id(raw)
                .map_err(|_| format!("station {raw:?} of {name:?} is not a UUID nor \"*\""))?;
            set.insert(id);
        }
        Stations::Only(set)
    };
    if station_role && stations == Stations::Only(HashSet::new()) {
        return Err(format!(
            "{name:?} has the station role but no stations (name them, or \"*\")"
        ));
    }
    let rate_per_s = match &entry.rate {
        Some(Rate { per_second: 0 }) => {
            return Err(format!("rate.per_second of {name:?} must be at least 1"));
        }
        Some(r) => Some(r.per_second),
        None => None,
    };
    Ok(Client {
        name: name.to_owned(),
        stations,
        station_role,
        admin,
        rate_per_s,
    })
}

/// A new random bearer token (32 random bytes, URL-safe base64) and its SHA-256 digest in hex.
pub fn new_token() -> (String, String) {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let digest = hex::encode(Sha256::digest(token.as_bytes()));
    (token, digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "6f1c2d3e-4a5b-4c6d-8e7f-0123456789ab";

    fn digest(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    #[test]
    fn clients_are_found_by_each_of_their_tokens_and_by_name() {
        let text = format!(
            "[[client]]\nname = \"gw-1\"\ntoken_sha256 = [\"{}\", \"{}\"]\nstations = [\"{}\"]\nroles = [\"station\"]\nrate = {{ per_second = 5 }}\n\n\
             [[client]]\nname = \"ops\"\ntoken_sha256 = \"{}\"\nroles = [\"admin\"]\n",
            digest("old-token"),
            digest("new-token"),
            A.to_uppercase(),
            digest("ops-token"),
        );
        let table = parse(&text).expect("parses");
        let gw = table.by_token("old-token").expect("old token");
        assert_eq!(table.by_token("new-token"), Some(gw.clone()));
        assert!(gw.covers(A), "station ids are canonical");
        assert!(!gw.covers("7a2b3c4d-5e6f-4a1b-9c2d-3e4f5a6b7c8d"));
        assert_eq!(
            (gw.station_role, gw.admin, gw.rate_per_s),
            (true, false, Some(5))
        );
        let ops = table.by_name("ops").expect("by name");
        assert!(ops.admin && !ops.station_role);
        assert_eq!(table.by_token("ops-token"), Some(ops));
        assert_eq!(table.by_token("guess"), None);
        assert_eq!(
            table.by_token(&digest("ops-token")),
            None,
            "a digest is no token"
        );
    }

    #[test]
    fn mistakes_name_their_line() {
        let d1 = digest("one");
        let cases = [
            (
                "[[client]]\nname = \"a\"\nroles = [\"admin\"]\ncolour = \"red\"\n".into(),
                4,
                "unknown field",
            ),
            (
                "[[client]]\nname = \"a\"\nroles = [\"admin\"]\n\n[[client]]\nname = \"a\"\nroles = [\"admin\"]\n"
                    .into(),
                5,
                "second client",
            ),
            (
                format!(
                    "[[client]]\nname = \"a\"\ntoken_sha256 = \"{d1}\"\nroles = [\"admin\"]\n[[client]]\nname = \"b\"\ntoken_sha256 = \"{d1}\"\nroles = [\"admin\"]\n"
                ),
                5,
                "another client's digest",
            ),
            (
                "[[client]]\nname = \"a\"\ntoken_sha256 = \"abc\"\nroles = [\"admin\"]\n".into(),
                1,
                "64 hex digits",
            ),
            (
                "[[client]]\nname = \"a\"\nroles = [\"root\"]\n".into(),
                1,
                "neither",
            ),
            (
                "[[client]]\nname = \"a\"\nroles = []\n".into(),
                1,
                "no role",
            ),
            (
                "[[client]]\nname = \"a\"\nroles = [\"station\"]\n".into(),
                1,
                "no stations",
            ),
            (
                "[[client]]\nname = \"a\"\nroles = [\"station\"]\nstations = [\"station-7\"]\n"
                    .into(),
                1,
                "not a UUID",
            ),
            (
                "[[client]]\nname = \"a b\"\nroles = [\"admin\"]\n".into(),
                1,
                "must be 1 to 128",
            ),
            (
                "[[client]]\nname = \"a\"\nroles = [\"admin\"]\nrate = { per_second = 0 }\n".into(),
                1,
                "at least 1",
            ),
            ("[[client]\n".into(), 1, ""),
        ];
        for (text, line, words) in cases {
            let (got_line, message) = parse(&text).expect_err(&text);
            assert_eq!(got_line, line, "{text}: {message}");
            assert!(message.contains(words), "{text}: {message}");
        }
    }

    #[test]
    fn a_new_token_matches_its_digest() {
        let (token, hex_digest) = new_token();
        assert!(token.len() >= 43 && crate::token::is_well_formed(&token));
        assert_eq!(hex_digest, digest(&token));
        assert_ne!(new_token().0, token);
    }
}
