//! `chargegate audit query|calls|verify|anomalies`.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::Context;
use tokio_stream::StreamExt;

use super::{AuditCommand, Format, StdoutError, Window, status_error};
use crate::{
    archive::{self, Archive},
    audit::{
        abuse::{AbuseSettings, AbuseSignals},
        chain,
    },
    config::StoreBackend,
    decision::{DecidedBy, Micros, NewDecision, Reason, Verdict},
    proto::{
        self, DecisionStatus, QueryCallsRequest, QueryDecisionsRequest, audit_client::AuditClient,
    },
    token::{Fingerprint, Fingerprinter},
};

pub async fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Query {
            station,
            statuses,
            listing,
        } => {
            let (from, to) = listing.window.resolve(None)?;
            let request = QueryDecisionsRequest {
                station_id: station.unwrap_or_default(),
                statuses: statuses
                    .iter()
                    .map(|s| parse_status(s).map(|s| s as i32))
                    .collect::<anyhow::Result<_>>()?,
                from,
                to,
                limit: listing.limit,
            };
            let decisions = query_decisions(&listing.server, request).await?;
            print_rows(
                listing.format,
                &DECISION_COLUMNS,
                decisions.iter().map(decision_row),
            )?;
            Ok(())
        }
        AuditCommand::Calls { method, listing } => {
            let (from, to) = listing.window.resolve(None)?;
            let mut client = connect(&listing.server).await?;
            let mut stream = client
                .query_calls(QueryCallsRequest {
                    method: method.unwrap_or_default(),
                    from,
                    to,
                    limit: listing.limit,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let mut calls = Vec::new();
            while let Some(call) = stream.next().await {
                calls.push(call.map_err(status_error)?);
            }
            print_rows(listing.format, &CALL_COLUMNS, calls.iter().map(call_row))?;
            Ok(())
        }
        AuditCommand::Verify {
            store,
            token_hash_key,
            archive,
        } => {
            let backend = store.backend()?;
            let key = chain_key(&store.data_dir, &backend, token_hash_key.as_deref())?;
            match (archive, backend) {
                (Some(url), backend) => verify_archive(&url, &key, &backend).await,
                (None, StoreBackend::Postgres { url }) => {
                    report(crate::store::postgres::log::verify(&url, &key).await?)
                }
                (None, StoreBackend::Sqlite { path }) => verify(&path, &key),
            }
        }
        AuditCommand::Export {
            until,
            to,
            store,
            max_chunk_decisions,
        } => {
            let until = Micros::from_proto(&at(&until, SystemTime::now())?);
            let source = archive::source::open(&store.backend()?).await?;
            anyhow::ensure!(
                source.exclusive().await?,
                "another chargegate is exporting this log now; try again when it is done"
            );
            let archive = Archive::open(&to)?;
            let done =
                archive::export(&*source, &archive, until, max_chunk_decisions as usize).await?;
            if done.chunks.is_empty() {
                out!(
                    "nothing to export: {} holds every decision decided up to {}",
                    archive.url(),
                    until.to_rfc3339()
                );
            } else {
                out!(
                    "exported {} decisions in {} chunks ({} bytes) to {}",
                    done.decisions,
                    done.chunks.len(),
                    done.bytes,
                    archive.url()
                );
            }
            for chunk in &done.chunks {
                out!(
                    "{}  {} decisions  sha256 {}",
                    chunk.file,
                    chunk.count,
                    chunk.sha256
                );
            }
            Ok(())
        }
        AuditCommand::Anomalies {
            server,
            window,
            timeouts,
            failing_share,
            min_decisions,
            enumeration_threshold,
            velocity_stations,
            velocity_window_ms,
        } => {
            let (from, to) = window.resolve(Some(Duration::from_secs(3600)))?;
            let request = QueryDecisionsRequest {
                from,
                to,
                ..Default::default()
            };
            let decisions = query_decisions(&server, request).await?;
            let mut found = anomalies(&decisions, timeouts, failing_share, min_decisions);
            found.extend(abuse(
                &decisions,
                AbuseSettings {
                    enumeration_threshold,
                    velocity_stations,
                    velocity_window: Duration::from_millis(velocity_window_ms),
                },
            ));
            if found.is_empty() {
                out!("no anomalies in {} decisions", decisions.len());
            }
            for line in found {
                out!("{line}");
            }
            Ok(())
        }
    }
}

async fn connect(server: &super::ServerArg) -> anyhow::Result<AuditClient<super::Connection>> {
    Ok(AuditClient::new(server.connect().await?))
}

async fn query_decisions(
    server: &super::ServerArg,
    request: QueryDecisionsRequest,
) -> anyhow::Result<Vec<proto::Decision>> {
    let mut client = connect(server).await?;
    let mut stream = client
        .query_decisions(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out = Vec::new();
    while let Some(d) = stream.next().await {
        out.push(d.map_err(status_error)?);
    }
    Ok(out)
}

/// The seed system's rules: many timeouts in the window; a station with more than a share of
/// its decisions failing (UNKNOWN or INVALID).
pub fn anomalies(
    decisions: &[proto::Decision],
    max_timeouts: u64,
    failing_share: f64,
    min_decisions: u64,
) -> Vec<String> {
    let mut found = Vec::new();
    let timeouts = decisions.iter().filter(|d| d.reason == "timeout").count() as u64;
    if timeouts >= max_timeouts {
        found.push(format!(
            "timeouts: {timeouts} decisions timed out (threshold {max_timeouts})"
        ));
    }
    let mut per_station: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for d in decisions {
        let entry = per_station.entry(&d.station_id).or_default();
        entry.0 += 1;
        if matches!(
            d.status(),
            DecisionStatus::Unknown | DecisionStatus::Invalid
        ) {
            entry.1 += 1;
        }
    }
    for (station, (total, failing)) in per_station {
        if total >= min_decisions && failing as f64 > failing_share * total as f64 {
            found.push(format!(
                "station {station}: {failing} of {total} decisions failed (UNKNOWN or INVALID)"
            ));
        }
    }
    found
}

/// The abuse signals (enumeration, velocity) over `decisions`: the server's own rules, replayed
/// in the order the decisions were made.
pub fn abuse(decisions: &[proto::Decision], settings: AbuseSettings) -> Vec<String> {
    let signals = AbuseSignals::new(settings);
    let mut ordered: Vec<&proto::Decision> = decisions.iter().collect();
    ordered.sort_by_key(|d| d.decided_at.as_ref().map(|t| (t.seconds, t.nanos)));
    let mut found = Vec::new();
    for d in ordered {
        let Some(reason) = Reason::parse(&d.reason) else {
            continue;
        };
        let at = d.decided_at.as_ref().map_or(Micros(0), Micros::from_proto);
        let decision = NewDecision {
            request_id: d.request_id.clone(),
            station_id: d.station_id.clone(),
            fingerprint: Fingerprint::from_stored(d.driver_token_fingerprint.clone()),
            verdict: Verdict::new(reason, DecidedBy::Acl),
            accepted_at: at,
            decided_at: at,
            revision: d.revision,
        };
        found.extend(signals.record(&decision).iter().map(ToString::to_string));
    }
    found
}

/// The chain key: from the configured token hash key, or the one generated in the data dir.
fn chain_key(
    data_dir: &Path,
    store: &StoreBackend,
    configured: Option<&str>,
) -> anyhow::Result<[u8; 32]> {
    let fingerprinter = match (configured, store) {
        (Some(key), _) => Fingerprinter::new(key.as_bytes())?,
        (None, StoreBackend::Postgres { .. }) => anyhow::bail!(
            "--token-hash-key (or CHARGEGATE_TOKEN_HASH_KEY) is needed to verify a PostgreSQL store"
        ),
        (None, StoreBackend::Sqlite { .. }) => {
            let key_file = data_dir.join("token_hash.key");
            let key = std::fs::read_to_string(&key_file).with_context(|| {
                format!(
                    "cannot read {}; pass --token-hash-key if the key is configured",
                    key_file.display()
                )
            })?;
            Fingerprinter::new(key.trim().as_bytes())?
        }
    };
    Ok(fingerprinter.derive_key(chain::KEY_PURPOSE))
}

/// Verifies an archive and the live log after it; exits 1 when something is wrong.
async fn verify_archive(url: &str, key: &[u8; 32], store: &StoreBackend) -> anyhow::Result<()> {
    let archive = Archive::open(url)?;
    let source = archive::source::open(store).await?;
    let found = archive::verify(&archive, key, &*source).await?;
    match found.problem {
        None => {
            out!(
                "intact: {} archived decisions in {} chunks, then {} in the live log",
                found.archived,
                found.chunks,
                found.live
            );
            Ok(())
        }
        Some(problem) => {
            out!(
                "BROKEN: {problem}; {} archived decisions before it verified",
                found.archived
            );
            std::process::exit(1);
        }
    }
}

fn verify(db: &Path, key: &[u8; 32]) -> anyhow::Result<()> {
    anyhow::ensure!(db.exists(), "no store at {}", db.display());
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let found = chain::verify(&conn, key)?;
    report(found)
}

/// Prints what a verification found; exits 1 when the chain is broken.
fn report(found: chain::Verification) -> anyhow::Result<()> {
    match found.broken {
        None => {
            out!(
                "intact: {} decisions verified{}",
                found.checked,
                match found.unchained {
                    0 => String::new(),
                    n => format!(" ({n} older ones were recorded before the chain began)"),
                }
            );
            Ok(())
        }
        Some(broken) => {
            out!(
                "BROKEN at decision {} (request_id {}): it, or the record before it, was changed, \
                 inserted or deleted after it was written; {} decisions before it verified",
                broken.seq,
                broken.request_id,
                found.checked
            );
            std::process::exit(1);
        }
    }
}

fn parse_status(raw: &str) -> anyhow::Result<DecisionStatus> {
    let name = format!("DECISION_STATUS_{}", raw.trim().to_ascii_uppercase());
    DecisionStatus::from_str_name(&name)
        .filter(|s| !matches!(s, DecisionStatus::Unspecified | DecisionStatus::Pending))
        .with_context(|| {
            format!("{raw:?} is not a status: allowed, not_allowed, unknown or invalid")
        })
}

impl Window {
    /// `(from, to)`; `default_since` applies when `--since` is not given.
    fn resolve(
        &self,
        default_since: Option<Duration>,
    ) -> anyhow::Result<(
        Option<prost_types::Timestamp>,
        Option<prost_types::Timestamp>,
    )> {
        let now = SystemTime::now();
        let at = |raw: &str| at(raw, now);
        let from = match (&self.since, default_since) {
            (Some(raw), _) => Some(at(raw)?),
            (None, Some(ago)) => Some(Micros::from_system_time(now - ago).to_proto()),
            (None, None) => None,
        };
        let to = self.until.as_deref().map(at).transpose()?;
        Ok((from, to))
    }
}

/// An RFC 3339 time, or a duration before `now`.
fn at(raw: &str, now: SystemTime) -> anyhow::Result<prost_types::Timestamp> {
    if let Some(ago) = parse_duration(raw) {
        let t = now.checked_sub(ago).context("too far back")?;
        return Ok(Micros::from_system_time(t).to_proto());
    }
    super::rfc3339(raw)
}

/// `90s`, `15m`, `1h`, `7d`.
fn parse_duration(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = raw.split_at(split);
    let n: u64 = n.parse().ok()?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(seconds)?))
}

const DECISION_COLUMNS: [&str; 8] = [
    "decided_at",
    "request_id",
    "station_id",
    "status",
    "reason",
    "driver_token_fingerprint",
    "processing_time_ms",
    "cursor",
];

fn decision_row(d: &proto::Decision) -> Vec<String> {
    vec![
        time_text(&d.decided_at),
        d.request_id.clone(),
        d.station_id.clone(),
        d.status()
            .as_str_name()
            .trim_start_matches("DECISION_STATUS_")
            .to_ascii_lowercase(),
        d.reason.clone(),
        d.driver_token_fingerprint.clone(),
        d.processing_time_ms.to_string(),
        d.cursor.clone(),
    ]
}

const CALL_COLUMNS: [&str; 10] = [
    "at",
    "method",
    "code",
    "latency_ms",
    "peer",
    "client",
    "station_id",
    "request_id",
    "stream_event",
    "messages_sent",
];

fn call_row(c: &proto::CallRecord) -> Vec<String> {
    vec![
        time_text(&c.at),
        c.method.clone(),
        c.code.clone(),
        c.latency_ms.to_string(),
        c.peer.clone(),
        c.client.clone(),
        c.station_id.clone(),
        c.request_id.clone(),
        c.stream_event.clone(),
        c.messages_sent.to_string(),
    ]
}

fn time_text(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .map(|t| Micros::from_proto(t).to_rfc3339())
        .unwrap_or_default()
}

fn print_rows(
    format: Format,
    columns: &[&str],
    rows: impl Iterator<Item = Vec<String>>,
) -> Result<(), StdoutError> {
    match format {
        Format::Json => {
            for row in rows {
                let object: serde_json::Map<String, serde_json::Value> = columns
                    .iter()
                    .zip(row)
                    .map(|(c, v)| (c.to_string(), serde_json::Value::String(v)))
                    .collect();
                out!("{}", serde_json::Value::Object(object));
            }
        }
        Format::Csv => {
            let failed = |e: csv::Error| StdoutError(e.into());
            let mut out = csv::Writer::from_writer(std::io::stdout());
            out.write_record(columns).map_err(failed)?;
            for row in rows {
                out.write_record(&row).map_err(failed)?;
            }
            out.flush().map_err(StdoutError)?;
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = rows.collect();
            let mut widths: Vec<usize> = columns.iter().map(|c| c.len()).collect();
            for row in &rows {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            let line = |cells: Vec<&str>| {
                let padded: Vec<String> = cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect();
                out!("{}", padded.join("  ").trim_end());
                Ok(())
            };
            line(columns.to_vec())?;
            for row in &rows {
                line(row.iter().map(String::as_str).collect())?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_statuses_parse() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("1w"), None);
        assert_eq!(parse_duration("h"), None);
        assert_eq!(
            parse_status("not_allowed").unwrap(),
            DecisionStatus::NotAllowed
        );
        assert_eq!(parse_status("UNKNOWN").unwrap(), DecisionStatus::Unknown);
        assert!(parse_status("pending").is_err());
    }

    #[test]
    fn anomaly_rules() {
        let d = |station: &str, status: DecisionStatus, reason: &str| proto::Decision {
            station_id: station.into(),
            status: status as i32,
            reason: reason.into(),
            ..Default::default()
        };
        let mut decisions = vec![];
        // Station a: 6 of 10 failing; station b: 5 of 10 (not more than half); c: 3 of 3 (too few).
        for i in 0..10 {
            let failing = if i < 6 {
                DecisionStatus::Unknown
            } else {
                DecisionStatus::Allowed
            };
            decisions.push(d("a", failing, if i < 6 { "timeout" } else { "granted" }));
            let failing = if i < 5 {
                DecisionStatus::Invalid
            } else {
                DecisionStatus::Allowed
            };
            decisions.push(d("b", failing, "token_format"));
        }
        for _ in 0..3 {
            decisions.push(d("c", DecisionStatus::Unknown, "authorizer_error"));
        }
        let found = anomalies(&decisions, 6, 0.5, 10);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("timeouts: 6"));
        assert!(found[1].starts_with("station a: 6 of 10"));
        assert!(anomalies(&decisions, 7, 0.5, 10).len() == 1);
    }
}
