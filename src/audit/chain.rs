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

/// Walks the decision log in order and checks every link.
pub fn verify(conn: &Connection, key: &[u8; 32]) -> rusqlite::Result<Verification> {
    let key = &ChainKey::new(key);
    let mut previous = floor(conn)?;
    let mut stmt = conn.prepare(
        "SELECT seq, request_id, station_id, token_fp, status, reason, authorizer,
                accepted_at_us, decided_at_us, processing_ms, chain
         FROM decisions ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    let (mut checked, mut unchained, mut started) = (0, 0, false);
    while let Some(r) = rows.next()? {
        let seq: i64 = r.get(0)?;
        let request_id: String = r.get(1)?;
        let stored: Option<Vec<u8>> = r.get(10)?;
        let Some(stored) = stored else {
            if started {
                return Ok(Verification {
                    checked,
                    unchained,
                    broken: Some(Broken { seq, request_id }),
                });
            }
            unchained += 1;
            continue;
        };
        started = true;
        let expected = link_of(
            key,
            &previous,
            &request_id,
            &r.get::<_, String>(2)?,
            &r.get::<_, String>(3)?,
            &r.get::<_, String>(4)?,
            &r.get::<_, String>(5)?,
            &r.get::<_, String>(6)?,
            r.get(7)?,
            r.get(8)?,
            r.get(9)?,
        );
        if stored.as_slice() != expected.as_slice() {
            return Ok(Verification {
                checked,
                unchained,
                broken: Some(Broken { seq, request_id }),
            });
        }
        checked += 1;
        previous = expected;
    }
    Ok(Verification {
        checked,
        unchained,
        broken: None,
    })
}
