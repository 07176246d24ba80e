//! The decision log's hash chain: each decision record carries
//! `link = HMAC-SHA256(chain_key, previous link ‖ the record's fields)`, written in the
//! transaction that records it. Editing, deleting or inserting a record breaks the link of that
//! record or of the next one; rewriting the rest of the chain needs the key, which is derived
//! from `token_hash_key` and never stored in the database. Retention keeps the link of the last
//! purged record (`meta.chain_floor`) so the retained log still verifies from its first record.

use hmac::{Hmac, Mac};
use rusqlite::{Connection, OptionalExtension};
use sha2::Sha256;

use crate::decision::NewDecision;

/// What the chain key is derived for (see [`crate::token::Fingerprinter::derive_key`]).
pub const KEY_PURPOSE: &str = "decision chain v1";

pub type Link = [u8; 32];

/// The chain key, keyed once: each link clones the prepared HMAC state instead of hashing the
/// key again (this runs for every decision, in the writer's transaction).
#[derive(Clone)]
pub struct ChainKey(Hmac<Sha256>);

impl ChainKey {
    pub fn new(key: &[u8; 32]) -> Self {
        Self(Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length"))
    }
}

/// The fields of a record as they are chained: fixed order, separated by 0x1f.
#[allow(clippy::too_many_arguments)]
fn link_of(
    key: &ChainKey,
    previous: &Link,
    request_id: &str,
    station_id: &str,
    token_fp: &str,
    status: &str,
    reason: &str,
    authorizer: &str,
    accepted_at_us: i64,
    decided_at_us: i64,
    processing_ms: i64,
    revision: u32,
) -> Link {
    let mut mac = key.0.clone();
    mac.update(previous);
    for field in [request_id, station_id, token_fp, status, reason, authorizer] {
        mac.update(field.as_bytes());
        mac.update(&[0x1f]);
    }
    for n in [accepted_at_us, decided_at_us, processing_ms] {
        mac.update(&n.to_be_bytes());
    }
    // Chained only when set, so the links of every decision written before revisions hold.
    if revision != 0 {
        mac.update(&revision.to_be_bytes());
    }
    mac.finalize().into_bytes().into()
}

/// The link of a decision about to be recorded after `previous`.
pub fn link(key: &ChainKey, previous: &Link, d: &NewDecision) -> Link {
    link_of(
        key,
        previous,
        &d.request_id,
        &d.station_id,
        d.fingerprint.as_str(),
        d.verdict.status().as_str(),
        d.verdict.reason.as_str(),
        d.verdict.decided_by.as_str(),
        d.accepted_at.0,
        d.decided_at.0,
        i64::from(d.processing_time_ms()),
        d.revision,
    )
}

/// Where the chain starts: the link of the last purged record, or zeros.
pub fn floor(conn: &Connection) -> rusqlite::Result<Link> {
    let stored: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'chain_floor'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(stored
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0; 32]))
}

/// The first record whose link does not follow from the chain before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broken {
    pub seq: i64,
    pub request_id: String,
}

/// What a verification found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    /// Records checked (up to the first broken one).
    pub checked: u64,
    /// Records before the chain began (written by a version without it), not checked.
    pub unchained: u64,
    pub broken: Option<Broken>,
}

/// One record as the chain covers it, in log order.
pub struct ChainedRecord<'a> {
    pub position: i64,
    pub request_id: &'a str,
    pub station_id: &'a str,
    pub token_fp: &'a str,
    pub status: &'a str,
    pub reason: &'a str,
    pub authorizer: &'a str,
    pub accepted_at_us: i64,
    pub decided_at_us: i64,
    pub processing_ms: i64,
    pub revision: u32,
    /// `None` for a record written before the chain began.
    pub chain: Option<&'a [u8]>,
}

/// Checks records one by one, in log order, from the chain's floor; any backend feeds it.
pub struct Walker {
    key: ChainKey,
    previous: Link,
    found: Verification,
    started: bool,
}

impl Walker {
    pub fn new(key: &[u8; 32], floor: Link) -> Self {
        Self {
            key: ChainKey::new(key),
            previous: floor,
            found: Verification {
                checked: 0,
                unchained: 0,
                broken: None,
            },
            started: false,
        }
    }

    /// Checks the next record; false once a broken one was found (feed no more).
    pub fn check(&mut self, r: ChainedRecord<'_>) -> bool {
        if self.found.broken.is_some() {
            return false;
        }
        let broken = || Broken {
            seq: r.position,
            request_id: r.request_id.to_owned(),
        };
        let Some(stored) = r.chain else {
            if self.started {
                self.found.broken = Some(broken());
                return false;
            }
            self.found.unchained += 1;
            return true;
        };
        self.started = true;
        let expected = link_of(
            &self.key,
            &self.previous,
            r.request_id,
            r.station_id,
            r.token_fp,
            r.status,
            r.reason,
            r.authorizer,
            r.accepted_at_us,
            r.decided_at_us,
            r.processing_ms,
            r.revision,
        );
        if stored != expected.as_slice() {
            self.found.broken = Some(broken());
            return false;
        }
        self.found.checked += 1;
        self.previous = expected;
        true
    }

    /// The broken record found, if any.
    pub fn broken(&self) -> Option<&Broken> {
        self.found.broken.as_ref()
    }

    pub fn finish(self) -> Verification {
        self.found
    }
}

/// Walks the embedded decision log in order and checks every link.
pub fn verify(conn: &Connection, key: &[u8; 32]) -> rusqlite::Result<Verification> {
    let mut walker = Walker::new(key, floor(conn)?);
    let mut stmt = conn.prepare(
        "SELECT seq, request_id, station_id, token_fp, status, reason, authorizer,
                accepted_at_us, decided_at_us, processing_ms, chain, revision
         FROM decisions ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (request_id, station_id, token_fp): (String, String, String) =
            (r.get(1)?, r.get(2)?, r.get(3)?);
        let (status, reason, authorizer): (String, String, String) =
            (r.get(4)?, r.get(5)?, r.get(6)?);
        let chain: Option<Vec<u8>> = r.get(10)?;
        let more = walker.check(ChainedRecord {
            position: r.get(0)?,
            request_id: &request_id,
            station_id: &station_id,
            token_fp: &token_fp,
            status: &status,
            reason: &reason,
            authorizer: &authorizer,
            accepted_at_us: r.get(7)?,
            decided_at_us: r.get(8)?,
            processing_ms: r.get(9)?,
            revision: r.get(11)?,
            chain: chain.as_deref(),
        });
        if !more {
            break;
        }
    }
    Ok(walker.finish())
}
