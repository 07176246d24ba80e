//! The access-list authorizer (`authorizer = "acl"`).
//!
//! Grants come from `acl_file` (CSV, CONTRACT §5) when it is set. The file is re-read when it
//! changes (polled once a second, which also sees atomic renames and ConfigMap symlink swaps) and
//! on SIGHUP; a file with a bad row is refused as a whole, naming the row's line: at start-up the
//! server does not start, on reload the previous list stays in force and the error is logged.
//! Tokens are held only as fingerprints.
//!
//! Rules, for a station S and a token T, over the grants for (S, T) and (`*`, T):
//! any blocked → NOT_ALLOWED/`blocked`; else any unexpired → ALLOWED/`granted`;
//! else any (all expired) → NOT_ALLOWED/`expired`; else NOT_ALLOWED/`no_grant`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use async_trait::async_trait;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio_util::sync::CancellationToken;

use super::{AuthorizationRequest, Authorizer};
use crate::{
    decision::{DecidedBy, Micros, Reason, Verdict},
    intake::{self, FieldViolation},
    token::{self, DriverToken, Fingerprint, Fingerprinter},
};

/// The station of a grant that covers every station.
pub const ANY_STATION: &str = "*";

/// One grant of the list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub expires_at: Option<Micros>,
    pub blocked: bool,
}

/// Grants keyed by (station id or `*`, token fingerprint).
pub type GrantTable = HashMap<(String, Fingerprint), Grant>;

/// A row of the access-list file that cannot be used. Never quotes a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: line {line}: {message}")]
pub struct AclError {
    pub path: String,
    pub line: u64,
    pub message: String,
}

/// How often grants shared with other instances are checked for changes.
const GRANTS_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// The grant table of grants as the store keeps them.
fn table_of_stored(grants: Vec<crate::store::StoredGrant>) -> GrantTable {
    grants
        .into_iter()
        .map(|g| {
            (
                (g.station_id, g.fingerprint),
                Grant {
                    expires_at: g.expires_at,
                    blocked: g.blocked,
                },
            )
        })
        .collect()
}

/// The access list in force. Lookups take a read lock for a moment; a reload swaps the table.
pub struct AccessList {
    table: RwLock<Arc<GrantTable>>,
}

impl AccessList {
    pub fn new(table: GrantTable) -> Self {
        Self {
            table: RwLock::new(Arc::new(table)),
        }
    }

    pub fn empty() -> Self {
        Self::new(GrantTable::new())
    }

    /// Loads `path`; an error names the bad line.
    pub fn from_file(path: &Path, fingerprinter: &Fingerprinter) -> Result<Self, AclError> {
        Ok(Self::new(load_file(path, fingerprinter)?))
    }

    /// An access list of the grants kept in the store.
    pub fn from_stored(grants: Vec<crate::store::StoredGrant>) -> Self {
        Self::new(table_of_stored(grants))
    }

    /// Follows the grants of a store that other instances write too: reloads them when
    /// `written` says so or, at the latest, when `version` has changed at the next poll
    /// (every second), until `stop`.
    pub async fn follow_store<V, W>(
        self: Arc<Self>,
        store: Arc<dyn crate::store::GrantStore>,
        version: impl Fn() -> V,
        written: impl Fn() -> W,
        stop: CancellationToken,
    ) where
        V: std::future::Future<Output = Result<i64, crate::store::StoreError>>,
        W: std::future::Future<Output = ()>,
    {
        let mut seen = None;
        loop {
            // The version is read before the grants: a write committed after the read changes
            // it, and the next round reloads.
            match version().await {
                Ok(v) if seen != Some(v) => match store.list_grants().await {
                    Ok(grants) => {
                        self.replace(table_of_stored(grants));
                        seen = Some(v);
                    }
                    Err(e) => tracing::warn!(error = %e, "reloading the grants failed"),
                },
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reading the grants version failed"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = written() => {}
                _ = tokio::time::sleep(GRANTS_POLL) => {}
            }
        }
    }

    /// Adds or replaces one grant (copy-on-write: grants change rarely, decisions read often).
    pub fn upsert(&self, station_id: &str, fingerprint: &Fingerprint, grant: Grant) {
        let mut table = self.table.write().expect("access list lock");
        let mut next = GrantTable::clone(&table);
        next.insert((station_id.to_owned(), fingerprint.clone()), grant);
        *table = Arc::new(next);
    }

    pub fn remove(&self, station_id: &str, fingerprint: &Fingerprint) {
        let mut table = self.table.write().expect("access list lock");
        let mut next = GrantTable::clone(&table);
        next.remove(&(station_id.to_owned(), fingerprint.clone()));
        *table = Arc::new(next);
    }

    /// Every grant, sorted by station then fingerprint.
    pub fn grants(&self) -> Vec<(String, Fingerprint, Grant)> {
        let table = self.table.read().expect("access list lock").clone();
        let mut all: Vec<_> = table
            .iter()
            .map(|((s, f), g)| (s.clone(), f.clone(), g.clone()))
            .collect();
        all.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        all
    }

    pub fn replace(&self, table: GrantTable) {
        *self.table.write().expect("access list lock") = Arc::new(table);
    }

    pub fn len(&self) -> usize {
        self.table.read().expect("access list lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The access list's verdict on a request, now.
    fn verdict(&self, request: AuthorizationRequest<'_>) -> Verdict {
        Verdict::new(
            self.decide(request.station_id, request.fingerprint, Micros::now()),
            DecidedBy::Acl,
        )
    }

    /// The verdict for a station and a token fingerprint at `now`, with the grants that decided
    /// it: the station's own and the `*` one.
    pub fn explain_at(
        &self,
        station_id: &str,
        fingerprint: &Fingerprint,
        now: Micros,
    ) -> super::Explanation {
        let table = self.table.read().expect("access list lock").clone();
        let matched: Vec<(String, Grant)> = [station_id, ANY_STATION]
            .into_iter()
            .filter_map(|s| {
                let g = table.get(&(s.to_owned(), fingerprint.clone()))?;
                Some((s.to_owned(), g.clone()))
            })
            .collect();
        let reason = self.decide(station_id, fingerprint, now);
        let which = |s: &str| match s {
            ANY_STATION => "the grant for every station (*)".to_owned(),
            _ => "the station's own grant".to_owned(),
        };
        let detail = match reason {
            Reason::Blocked => {
                let (s, _) = matched
                    .iter()
                    .find(|(_, g)| g.blocked)
                    .expect("a blocked grant");
                format!("{} blocks this token, whatever else is granted", which(s))
            }
            Reason::Granted => {
                let (s, g) = matched
                    .iter()
                    .find(|(_, g)| g.expires_at.is_none_or(|t| t > now))
                    .expect("an unexpired grant");
                match g.expires_at {
                    Some(t) => format!("{} allows it until {}", which(s), t.to_rfc3339()),
                    None => format!("{} allows it, with no expiry", which(s)),
                }
            }
            Reason::Expired => {
                let ends: Vec<String> = matched
                    .iter()
                    .filter_map(|(s, g)| {
                        Some(format!(
                            "{} expired at {}",
                            which(s),
                            g.expires_at?.to_rfc3339()
                        ))
                    })
                    .collect();
                ends.join("; ")
            }
            _ => "no grant for this token at this station, nor for every station (*)".to_owned(),
        };
        super::Explanation {
            verdict: Verdict::new(reason, DecidedBy::Acl),
            matched,
            detail,
        }
    }

    /// The verdict for a station and a token fingerprint at time `now`.
    pub fn decide(&self, station_id: &str, fingerprint: &Fingerprint, now: Micros) -> Reason {
        let table = self.table.read().expect("access list lock").clone();
        let grants = [station_id, ANY_STATION]
            .into_iter()
            .filter_map(|station| table.get(&(station.to_owned(), fingerprint.clone())));
        let mut any = false;
        let mut unexpired = false;
        for grant in grants {
            if grant.blocked {
                return Reason::Blocked;
            }
            any = true;
            unexpired |= grant.expires_at.is_none_or(|t| t > now);
        }
        match (any, unexpired) {
            (_, true) => Reason::Granted,
            (true, false) => Reason::Expired,
            (false, _) => Reason::NoGrant,
        }
    }

    /// Re-reads `path` when it changes and on SIGHUP, until `shutdown`. A bad file keeps the
    /// current list and logs why.
    pub fn watch(
        self: Arc<Self>,
        path: PathBuf,
        fingerprinter: Fingerprinter,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let paths = vec![path.clone()];
        let load = move || load_file(&path, &fingerprinter);
        crate::reload::watch_and_apply(
            "access list",
            "chargegate_acl_reloads_total",
            paths,
            shutdown,
            load,
            move |table| {
                let grants = table.len();
                self.replace(table);
                grants
            },
        )
    }
}

#[async_trait]
impl Authorizer for AccessList {
    fn kind(&self) -> DecidedBy {
        DecidedBy::Acl
    }

    async fn authorize(&self, request: AuthorizationRequest<'_>) -> Verdict {
        self.verdict(request)
    }

    /// The list is in memory: every request is decided as it arrives.
    fn authorize_at_once(&self, request: AuthorizationRequest<'_>) -> Option<Verdict> {
        Some(self.verdict(request))
    }

    async fn explain(&self, request: AuthorizationRequest<'_>) -> super::Explanation {
        self.explain_at(request.station_id, request.fingerprint, Micros::now())
    }
}

fn load_file(path: &Path, fingerprinter: &Fingerprinter) -> Result<GrantTable, AclError> {
    let text = std::fs::read_to_string(path).map_err(|e| AclError {
        path: path.display().to_string(),
        line: 0,
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, fingerprinter).map_err(|(line, message)| AclError {
        path: path.display().to_string(),
        line,
        message,
    })
}

/// A grant's station, as the file and the `Grants` service take it: a station UUID (returned in
/// canonical form) or `*`.
pub fn parse_grant_station(raw: &str) -> Result<String, FieldViolation> {
    if raw == ANY_STATION {
        return Ok(ANY_STATION.to_owned());
    }
    intake::parse_station_id(raw)
        .map_err(|v| FieldViolation::new("station_id", format!("{} or *", v.description)))
}

/// A grant's token: present and well-formed (a grant for a malformed token could never apply).
/// The violation never quotes it.
pub fn parse_grant_token(raw: &str) -> Result<DriverToken, FieldViolation> {
    if raw.is_empty() {
        return Err(FieldViolation::new("driver_token", "is required"));
    }
    if !token::is_well_formed(raw) {
        return Err(FieldViolation::new(
            "driver_token",
            "does not match ^[A-Za-z0-9._~-]{20,80}$",
        ));
    }
    Ok(DriverToken::new(raw))
}

/// One row of an access-list file, with its plain token (for `grants import`).
#[derive(Debug)]
pub struct AclRow {
    pub line: u64,
    pub station_id: String,
    pub token: DriverToken,
    pub expires_at: Option<Micros>,
    pub blocked: bool,
}

/// Parses the CSV of CONTRACT §5 into rows, checking each. Errors are (line, message).
pub fn parse_rows(text: &str) -> Result<Vec<AclRow>, (u64, String)> {
    let mut rows = Vec::new();
    parse_each(text, |row| {
        rows.push(row);
        Ok(())
    })?;
    Ok(rows)
}

/// Parses the CSV of CONTRACT §5 into a grant table. Errors are (line, message).
pub fn parse(text: &str, fingerprinter: &Fingerprinter) -> Result<GrantTable, (u64, String)> {
    let mut table = GrantTable::new();
    let mut first_line: HashMap<(String, Fingerprint), u64> = HashMap::new();
    parse_each(text, |row| {
        let key = (row.station_id, fingerprinter.fingerprint(&row.token));
        if let Some(first) = first_line.get(&key) {
            return Err((
                row.line,
                format!("a grant for this station and token already stands on line {first}"),
            ));
        }
        first_line.insert(key.clone(), row.line);
        table.insert(
            key,
            Grant {
                expires_at: row.expires_at,
                blocked: row.blocked,
            },
        );
        Ok(())
    })?;
    Ok(table)
}

fn parse_each(
    text: &str,
    mut each: impl FnMut(AclRow) -> Result<(), (u64, String)>,
) -> Result<(), (u64, String)> {
    // Comment lines become empty lines (which the reader skips), so byte offsets stay true.
    let text: String = text
        .split_inclusive('\n')
        .map(|line| {
            if line.trim_start().starts_with('#') {
                "\n"
            } else {
                line
            }
        })
        .collect();
    let text = text.as_str();
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(false)
        .from_reader(text.as_bytes());
    // The reader's positions skip neither comment nor blank lines before a record, so the line
    // is counted from the first byte of the record itself.
    let line_at = |byte: u64| {
        let bytes = text.as_bytes();
        let mut at = (byte as usize).min(bytes.len());
        while at < bytes.len() && matches!(bytes[at], b'\n' | b'\r') {
            at += 1;
        }
        1 + bytes[..at].iter().filter(|b| **b == b'\n').count() as u64
    };
    let csv_line = |e: &csv::Error| e.position().map_or(0, |p| line_at(p.byte()));
    let headers = reader
        .headers()
        .map_err(|e| (csv_line(&e), describe_csv_error(&e)))?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h == name);
    for h in headers.iter() {
        if !["station_id", "driver_token", "expires_at", "blocked"].contains(&h) {
            return Err((
                1,
                format!(
                    "unknown column {h:?}; expected station_id, driver_token, expires_at, blocked"
                ),
            ));
        }
    }
    let (Some(station_col), Some(token_col)) = (column("station_id"), column("driver_token"))
    else {
        return Err((
            1,
            "the header must name the columns station_id and driver_token".into(),
        ));
    };
    let (expires_col, blocked_col) = (column("expires_at"), column("blocked"));
    for record in reader.records() {
        let record = record.map_err(|e| (csv_line(&e), describe_csv_error(&e)))?;
        let line = record.position().map_or(0, |p| line_at(p.byte()));
        let field = |col: Option<usize>| col.and_then(|c| record.get(c)).unwrap_or("");
        let station = parse_grant_station(field(Some(station_col)))
            .map_err(|v| (line, format!("{} {}", v.field, v.description)))?;
        let token = parse_grant_token(field(Some(token_col)))
            .map_err(|v| (line, format!("{} {}", v.field, v.description)))?;
        let expires_at = match field(expires_col) {
            "" => None,
            raw => Some(
                OffsetDateTime::parse(raw, &Rfc3339)
                    .map(|t| Micros((t.unix_timestamp_nanos() / 1000) as i64))
                    .map_err(|_| {
                        (
                            line,
                            format!("expires_at {raw:?} is not an RFC 3339 timestamp"),
                        )
                    })?,
            ),
        };
        let blocked = match field(blocked_col) {
            "" | "false" => false,
            "true" => true,
            other => {
                return Err((
                    line,
                    format!("blocked must be true or false, not {other:?}"),
                ));
            }
        };
        each(AclRow {
            line,
            station_id: station,
            token,
            expires_at,
            blocked,
        })?;
    }
    Ok(())
}

/// A CSV error without the record's content (which may hold a token).
fn describe_csv_error(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => {
            format!("expected {expected_len} fields, found {len}")
        }
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".into(),
        _ => "malformed CSV".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S1: &str = "6f1c2d3e-4a5b-4c6d-8e7f-0123456789ab";
    const S2: &str = "7f1c2d3e-4a5b-4c6d-8e7f-0123456789ab";
    const T1: &str = "TOKEN-0001-abcdefghijkl";
    const T2: &str = "TOKEN-0002-abcdefghijkl";
    const T3: &str = "TOKEN-0003-abcdefghijkl";
    const T4: &str = "TOKEN-0004-abcdefghijkl";

    fn fp() -> Fingerprinter {
        Fingerprinter::new(b"test-key").unwrap()
    }

    fn decide(list: &AccessList, station: &str, token: &str) -> Reason {
        list.decide(
            station,
            &fp().fingerprint(&DriverToken::new(token)),
            Micros::now(),
        )
    }

    #[test]
    fn rules_follow_the_module_doc() {
        let csv = format!(
            "# grants\nstation_id,driver_token,expires_at,blocked\n\
             {S1},{T1},,\n\
             *,{T2},2999-01-01T00:00:00Z,false\n\
             {S1},{T3},2000-01-01T00:00:00+02:00,\n\
             *,{T4},,true\n\
             {S2},{T4},,false\n"
        );
        let list = AccessList::new(parse(&csv, &fp()).unwrap());
        assert_eq!(list.len(), 5);
        assert_eq!(decide(&list, S1, T1), Reason::Granted);
        assert_eq!(
            decide(&list, S2, T1),
            Reason::NoGrant,
            "grant is per station"
        );
        assert_eq!(decide(&list, S2, T2), Reason::Granted, "wildcard");
        assert_eq!(decide(&list, S1, T3), Reason::Expired);
        assert_eq!(
            decide(&list, S2, T4),
            Reason::Blocked,
            "a blocked wildcard wins over a station grant"
        );
    }

    #[test]
    fn bad_rows_name_their_line_and_never_the_token() {
        let cases = [
            (
                format!("station_id,driver_token\n{S1},{T1}\nnot-a-uuid,{T2}\n"),
                3,
            ),
            (format!("station_id,driver_token\n{S1},short-SECRET\n"), 2),
            (
                format!("station_id,driver_token,expires_at\n# c\n{S1},{T1},tomorrow\n"),
                3,
            ),
            (
                format!("station_id,driver_token,blocked\n{S1},{T1},maybe\n"),
                2,
            ),
            (
                format!("station_id,driver_token\n{S1},{T1}\n{S1},{T1}\n"),
                3,
            ),
            (
                format!("station_id,driver_token\n{S1},{T1},extra-SECRET\n"),
                2,
            ),
            ("station,token\n".to_string(), 1),
        ];
        for (csv, line) in cases {
            let (at, message) = parse(&csv, &fp()).unwrap_err();
            assert_eq!(at, line, "{csv:?}: {message}");
            assert!(
                !message.contains("SECRET") && !message.contains("TOKEN-"),
                "{message}"
            );
        }
    }
}
