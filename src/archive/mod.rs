//! The archive of the decision log (CONTRACT §6a): chunks of zstd-compressed JSON lines, one
//! decision per line with its chain link, and a `manifest.json` of their digests and links, on a
//! local directory or an S3 bucket through one [`ObjectStore`] code path.
//!
//! An export appends: it reads the manifest, continues after its last chunk, writes each new chunk
//! under a name no earlier chunk has (`decisions-<first cursor>-<last cursor>.jsonl.zst`) and
//! rewrites the manifest after each one, so an export that stops half-way leaves an archive that
//! verifies. Verification walks the hash chain of `audit::chain` through every chunk and on into
//! the live log, so a record edited, dropped or brought in from another log is named.

pub mod source;

use std::sync::Arc;

use bytes::Bytes;
use object_store::{ObjectStore, PutPayload, path::Path as ObjectPath};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use source::Source;

use crate::{
    audit::chain::{Link, Walker},
    cursor::Cursor,
    decision::Micros,
    store::StoreError,
};

/// The most decisions one chunk holds (CONTRACT §6a).
pub const CHUNK_MAX: usize = 100_000;
/// Records read from the store at a time.
const PAGE: usize = 10_000;
/// zstd's default level: about 8× smaller than the JSON at a few hundred MB/s a core.
pub const ZSTD_LEVEL: i32 = 3;
const MANIFEST: &str = "manifest.json";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("the archive store failed: {0}")]
    Object(#[from] object_store::Error),
    #[error("reading the decision log failed: {0}")]
    Store(#[from] StoreError),
    #[error("the archive's manifest.json is unreadable: {0}")]
    Manifest(String),
    #[error(
        "the archive holds log {archive}, the store is log {store:08x}: archive each log to a place of its own"
    )]
    OtherLog { archive: String, store: u32 },
    #[error(
        "the log was purged through position {floor}, past the archive's last decision ({archived}): \
         the decisions between were never archived here; archive to a new location"
    )]
    Gap { archived: u64, floor: u64 },
    #[error("encoding a chunk failed: {0}")]
    Encode(#[from] std::io::Error),
}

/// `manifest.json`: the chunks in log order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The log's id as 8 hex digits (cursors carry it too).
    pub log_id: String,
    /// The link before the first chunk's first decision (hex): the chain's floor when the archive
    /// began (zeros when nothing had been purged).
    pub chain_start: String,
    pub chunks: Vec<Chunk>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub file: String,
    pub first_cursor: String,
    pub last_cursor: String,
    pub count: u64,
    /// SHA-256 of the compressed file, hex.
    pub sha256: String,
    pub first_link: String,
    pub last_link: String,
    pub bytes: u64,
    pub first_decided_at: String,
    pub last_decided_at: String,
}

impl Manifest {
    fn new(log_id: u32, chain_start: &Link) -> Self {
        Self {
            format: FORMAT,
            log_id: format!("{log_id:08x}"),
            chain_start: hex::encode(chain_start),
            chunks: Vec::new(),
        }
    }

    /// The position of the last archived decision.
    pub fn archived_through(&self) -> Option<u64> {
        let last = self.chunks.last()?;
        Cursor::decode(&last.last_cursor).ok().map(|c| c.position)
    }

    /// Decisions archived.
    pub fn count(&self) -> u64 {
        self.chunks.iter().map(|c| c.count).sum()
    }

    fn last_link(&self) -> Option<Link> {
        let hex = match self.chunks.last() {
            Some(c) => &c.last_link,
            None => &self.chain_start,
        };
        link_from_hex(hex)
    }
}

fn link_from_hex(h: &str) -> Option<Link> {
    hex::decode(h).ok()?.try_into().ok()
}

/// One line of a chunk: the fields of `Decision`, who decided, and the chain link.
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    cursor: String,
    request_id: String,
    station_id: String,
    status: String,
    reason: String,
    driver_token_fingerprint: String,
    authorizer: String,
    accepted_at: String,
    decided_at: String,
    processing_time_ms: i64,
    /// 1 for a revision of a request first decided UNKNOWN (CONTRACT §2a).
    #[serde(default)]
    revision: u32,
    /// Hex; absent for a record written before the chain began.
    link: Option<String>,
}

impl Line {
    fn of(r: &source::Record, log_id: u32) -> Self {
        Self {
            cursor: Cursor::new(log_id, r.position).encode(),
            request_id: r.request_id.clone(),
            station_id: r.station_id.clone(),
            status: r.status.clone(),
            reason: r.reason.clone(),
            driver_token_fingerprint: r.token_fp.clone(),
            authorizer: r.authorizer.clone(),
            accepted_at: Micros(r.accepted_at_us).to_rfc3339(),
            decided_at: Micros(r.decided_at_us).to_rfc3339(),
            processing_time_ms: r.processing_ms,
            revision: r.revision,
            link: r.link.as_ref().map(hex::encode),
        }
    }

    /// The record back, or why it cannot be read.
    fn record(self) -> Result<(u32, source::Record), String> {
        let cursor = Cursor::decode(&self.cursor).map_err(|_| "a malformed cursor".to_owned())?;
        let micros = |t: &str| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map(|t| (t.unix_timestamp_nanos() / 1000) as i64)
                .map_err(|_| format!("a malformed time {t:?}"))
        };
        let link = match self.link {
            Some(h) => Some(hex::decode(&h).map_err(|_| "a malformed link".to_owned())?),
            None => None,
        };
        Ok((
            cursor.log_id,
            source::Record {
                position: cursor.position,
                accepted_at_us: micros(&self.accepted_at)?,
                decided_at_us: micros(&self.decided_at)?,
                request_id: self.request_id,
                station_id: self.station_id,
                token_fp: self.driver_token_fingerprint,
                status: self.status,
                reason: self.reason,
                authorizer: self.authorizer,
                processing_ms: self.processing_time_ms,
                revision: self.revision,
                link,
            },
        ))
    }
}

/// An archive location: a directory (`file:///dir`) or a bucket and prefix (`s3://bucket/prefix`,
/// credentials and endpoint from the `AWS_*` environment variables).
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive").field("url", &self.url).finish()
    }
}

impl Archive {
    /// Checks a URL as the configuration does, without touching the location.
    pub fn check_url(raw: &str) -> Result<(), String> {
        let url = url::Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
        match url.scheme() {
            "file" => url
                .to_file_path()
                .map(drop)
                .map_err(|()| "a file URL needs an absolute path: file:///dir".into()),
            "s3" if url.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
            "s3" => Err("an S3 URL names its bucket: s3://bucket/prefix".into()),
            other => Err(format!("unsupported scheme {other:?}; expected file or s3")),
        }
    }

    pub fn open(raw: &str) -> Result<Self, ArchiveError> {
        let bad = |message: String| ArchiveError::Url {
            url: raw.to_owned(),
            message,
        };
        Self::check_url(raw).map_err(bad)?;
        let url = url::Url::parse(raw).map_err(|e| bad(e.to_string()))?;
        let (store, prefix): (Arc<dyn ObjectStore>, ObjectPath) = match url.scheme() {
            "file" => {
                let dir = url.to_file_path().map_err(|()| bad("no path".into()))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(e.to_string()))?;
                (Arc::new(store), ObjectPath::default())
            }
            _ => {
                let store = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(raw)
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                let prefix = ObjectPath::from_url_path(url.path().trim_matches('/'))
                    .map_err(|e| bad(e.to_string()))?;
                (Arc::new(store), prefix)
            }
        };
        Ok(Self {
            store,
            prefix,
            url: raw.to_owned(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, name: &str) -> ObjectPath {
        self.prefix.child(name)
    }

    async fn get(&self, name: &str) -> Result<Option<Bytes>, ArchiveError> {
        match self.store.get(&self.path(name)).await {
            Ok(got) => Ok(Some(got.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The manifest, or `None` for an archive nothing was exported to yet.
    pub async fn manifest(&self) -> Result<Option<Manifest>, ArchiveError> {
        let Some(raw) = self.get(MANIFEST).await? else {
            return Ok(None);
        };
        let manifest: Manifest =
            serde_json::from_slice(&raw).map_err(|e| ArchiveError::Manifest(e.to_string()))?;
        if manifest.format != FORMAT {
            return Err(ArchiveError::Manifest(format!(
                "format {} (this chargegate writes {FORMAT})",
                manifest.format
            )));
        }
        Ok(Some(manifest))
    }

    async fn put(&self, name: &str, bytes: Bytes) -> Result<(), ArchiveError> {
        self.store
            .put(&self.path(name), PutPayload::from(bytes))
            .await?;
        Ok(())
    }
}

/// What an export wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exported {
    pub chunks: Vec<Chunk>,
    pub decisions: u64,
    pub bytes: u64,
    /// The position of the last decision the archive holds, after the export.
    pub archived_through: Option<u64>,
}

/// Appends the decisions decided up to `until` (a prefix of the log) that the archive lacks, in
/// chunks of at most `chunk_max`.
pub async fn export(
    source: &dyn Source,
    archive: &Archive,
    until: Micros,
    chunk_max: usize,
) -> Result<Exported, ArchiveError> {
    let chunk_max = chunk_max.clamp(1, CHUNK_MAX);
    let head = source.head().await?;
    let mut manifest = match archive.manifest().await? {
        Some(m) if m.log_id != format!("{:08x}", head.log_id) => {
            return Err(ArchiveError::OtherLog {
                archive: m.log_id,
                store: head.log_id,
            });
        }
        Some(m) => m,
        None => Manifest::new(head.log_id, &head.chain_floor),
    };
    let mut after = match manifest.archived_through() {
        Some(archived) if head.floor > archived => {
            return Err(ArchiveError::Gap {
                archived,
                floor: head.floor,
            });
        }
        Some(archived) => archived,
        // A new archive starts where the retained log does.
        None => head.floor,
    };
    let mut exported = Exported {
        archived_through: manifest.archived_through(),
        ..Exported::default()
    };
    let mut previous = manifest
        .last_link()
        .ok_or_else(|| ArchiveError::Manifest("a malformed link".into()))?;
    let mut ended = false;
    while !ended {
        let mut records = Vec::new();
        while records.len() < chunk_max {
            let want = PAGE.min(chunk_max - records.len());
            let page = source.after(after, Some(until), want).await?;
            if page.len() < want {
                ended = true;
            }
            if let Some(last) = page.last() {
                after = last.position;
            }
            records.extend(page);
            if ended {
                break;
            }
        }
        if records.is_empty() {
            break;
        }
        let log_id = head.log_id;
        let (bytes, chunk) =
            tokio::task::spawn_blocking(move || encode(&records, log_id, previous))
                .await
                .map_err(|e| ArchiveError::Encode(std::io::Error::other(e)))??;
        archive.put(&chunk.file, bytes).await?;
        previous = link_from_hex(&chunk.last_link).unwrap_or(previous);
        exported.decisions += chunk.count;
        exported.bytes += chunk.bytes;
        manifest.chunks.push(chunk.clone());
        exported.chunks.push(chunk);
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
        archive.put(MANIFEST, Bytes::from(json)).await?;
        exported.archived_through = manifest.archived_through();
    }
    Ok(exported)
}

/// Compresses `records` into a chunk; `previous` is the link before the first (for records
/// written before the chain began, which have none).
fn encode(
    records: &[source::Record],
    log_id: u32,
    previous: Link,
) -> Result<(Bytes, Chunk), std::io::Error> {
    use std::io::Write;
    let (first, last) = (&records[0], &records[records.len() - 1]);
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
    let mut line = Vec::with_capacity(512);
    for r in records {
        line.clear();
        serde_json::to_writer(&mut line, &Line::of(r, log_id)).map_err(std::io::Error::other)?;
        line.push(b'\n');
        encoder.write_all(&line)?;
    }
    let compressed = encoder.finish()?;
    let link = |r: &source::Record| hex::encode(r.link.as_deref().unwrap_or(&previous));
    let first_cursor = Cursor::new(log_id, first.position).encode();
    let last_cursor = Cursor::new(log_id, last.position).encode();
    let chunk = Chunk {
        file: format!("decisions-{first_cursor}-{last_cursor}.jsonl.zst"),
        first_cursor,
        last_cursor,
        count: records.len() as u64,
        sha256: hex::encode(Sha256::digest(&compressed)),
        first_link: link(first),
        last_link: link(last),
        bytes: compressed.len() as u64,
        first_decided_at: Micros(first.decided_at_us).to_rfc3339(),
        last_decided_at: Micros(last.decided_at_us).to_rfc3339(),
    };
    Ok((Bytes::from(compressed), chunk))
}

/// What a verification of an archive found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveReport {
    pub chunks: usize,
    /// Decisions checked in the archive.
    pub archived: u64,
    /// Decisions checked in the live log after the archive.
    pub live: u64,
    /// The first thing wrong, naming the chunk (or the live log) it is in.
    pub problem: Option<String>,
}

/// Checks every chunk's digest, cursors and count, and the hash chain under `key` across the
/// chunks and on into the live log of `source`.
pub async fn verify(
    archive: &Archive,
    key: &[u8; 32],
    source: &dyn Source,
) -> Result<ArchiveReport, ArchiveError> {
    let manifest = archive
        .manifest()
        .await?
        .ok_or_else(|| ArchiveError::Manifest(format!("there is none at {}", archive.url())))?;
    let mut report = ArchiveReport {
        chunks: manifest.chunks.len(),
        archived: 0,
        live: 0,
        problem: None,
    };
    let start = link_from_hex(&manifest.chain_start)
        .ok_or_else(|| ArchiveError::Manifest("a malformed chain_start".into()))?;
    let mut walker = Walker::new(key, start);
    let mut position = 0u64;
    for chunk in &manifest.chunks {
        match verify_chunk(archive, &manifest, chunk, &mut walker, &mut position).await? {
            Ok(n) => report.archived += n,
            Err(problem) => {
                report.problem = Some(format!("chunk {}: {problem}", chunk.file));
                return Ok(report);
            }
        }
    }
    match verify_live(&manifest, &mut walker, source).await? {
        Ok(n) => report.live = n,
        Err(problem) => report.problem = Some(format!("the live log: {problem}")),
    }
    Ok(report)
}

async fn verify_chunk(
    archive: &Archive,
    manifest: &Manifest,
    chunk: &Chunk,
    walker: &mut Walker,
    position: &mut u64,
) -> Result<Result<u64, String>, ArchiveError> {
    let Some(bytes) = archive.get(&chunk.file).await? else {
        return Ok(Err("missing".into()));
    };
    if hex::encode(Sha256::digest(&bytes)) != chunk.sha256 {
        return Ok(Err(
            "its SHA-256 differs from the manifest's: it was changed after it was written".into(),
        ));
    }
    let lines = match zstd::stream::decode_all(&bytes[..]) {
        Ok(lines) => lines,
        Err(e) => return Ok(Err(format!("it does not decompress: {e}"))),
    };
    let mut count = 0u64;
    let mut first_link = None;
    let mut last = None;
    for (n, raw) in lines.split(|b| *b == b'\n').enumerate() {
        if raw.is_empty() {
            continue;
        }
        let line: Line = match serde_json::from_slice(raw) {
            Ok(line) => line,
            Err(e) => return Ok(Err(format!("line {} is not a decision: {e}", n + 1))),
        };
        let cursor = line.cursor.clone();
        let (log_id, record) = match line.record() {
            Ok(r) => r,
            Err(what) => return Ok(Err(format!("line {} has {what}", n + 1))),
        };
        if format!("{log_id:08x}") != manifest.log_id {
            return Ok(Err(format!(
                "decision {cursor} belongs to log {log_id:08x}, not to this archive's log {}",
                manifest.log_id
            )));
        }
        if record.position <= *position {
            return Ok(Err(format!(
                "decision {cursor} is out of log order (position {} after {})",
                record.position, *position
            )));
        }
        *position = record.position;
        if count == 0 && cursor != chunk.first_cursor {
            return Ok(Err(format!(
                "it starts at {cursor}, the manifest says {}",
                chunk.first_cursor
            )));
        }
        if !walker.check(record.chained()) {
            let broken = walker.broken().expect("a failed check names the record");
            return Ok(Err(format!(
                "the chain breaks at decision {cursor} (request_id {}): it, or the decision \
                 before it, was changed, inserted or deleted",
                broken.request_id
            )));
        }
        if count == 0 {
            first_link = record.link.clone();
        }
        last = Some((cursor, record.link));
        count += 1;
    }
    let Some((last_cursor, last_link)) = last else {
        return Ok(Err("it holds no decisions".into()));
    };
    if count != chunk.count || last_cursor != chunk.last_cursor {
        return Ok(Err(format!(
            "it holds {count} decisions ending at {last_cursor}; the manifest says {} ending at {}",
            chunk.count, chunk.last_cursor
        )));
    }
    let linked =
        |link: Option<Vec<u8>>, expected: &str| link.is_none_or(|l| hex::encode(l) == expected);
    if !linked(first_link, &chunk.first_link) || !linked(last_link, &chunk.last_link) {
        return Ok(Err("its links differ from the manifest's".into()));
    }
    Ok(Ok(count))
}

async fn verify_live(
    manifest: &Manifest,
    walker: &mut Walker,
    source: &dyn Source,
) -> Result<Result<u64, String>, ArchiveError> {
    let head = source.head().await?;
    if format!("{:08x}", head.log_id) != manifest.log_id {
        return Ok(Err(format!(
            "it is log {:08x}, the archive holds log {}",
            head.log_id, manifest.log_id
        )));
    }
    let archived = manifest.archived_through().unwrap_or(0);
    if head.floor > archived {
        return Ok(Err(format!(
            "it was purged through position {}, past the archive's last decision ({archived}): \
             the decisions between are in neither",
            head.floor
        )));
    }
    if let Some(chunk) = manifest.chunks.last()
        && let Some(kept) = source.at(archived).await?
        && kept.link.as_ref().map(hex::encode).as_deref() != Some(chunk.last_link.as_str())
    {
        return Ok(Err(format!(
            "its decision at {} differs from the archive's (chunk {})",
            chunk.last_cursor, chunk.file
        )));
    }
    let mut after = archived;
    let mut checked = 0;
    loop {
        let page = source.after(after, None, PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(Ok(checked));
        };
        after = last.position;
        for record in &page {
            if !walker.check(record.chained()) {
                return Ok(Err(format!(
                    "the chain breaks at position {} (request_id {}): it, or the decision before \
                     it, was changed, inserted or deleted",
                    record.position, record.request_id
                )));
            }
            checked += 1;
        }
    }
}
