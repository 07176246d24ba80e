//! Retention: the oldest decisions go, a prefix of the log at a time, with their request keys.

use rusqlite::{OptionalExtension, Transaction, params};

use crate::decision::Micros;

/// Deletes the oldest decisions decided before `cutoff` and at positions up to `up_to` (a
/// prefix of the log, so what remains is contiguous), at most `max`, with their request keys.
/// Returns how many, and the new floor.
pub(super) fn purge(
    tx: &Transaction<'_>,
    cutoff: Micros,
    up_to: u64,
    max: usize,
) -> rusqlite::Result<(u64, Option<u64>)> {
    let through: Option<i64> = tx
        .prepare_cached(
            "SELECT max(seq) FROM (
                 SELECT seq, decided_at_us FROM decisions ORDER BY seq LIMIT ?1
             ) WHERE seq < coalesce(
                 (SELECT min(seq) FROM (SELECT seq, decided_at_us FROM decisions ORDER BY seq LIMIT ?1)
                  WHERE decided_at_us >= ?2),
                 9223372036854775807) AND seq <= ?3",
        )?
        .query_row(
            params![max as i64, cutoff.0, up_to.min(i64::MAX as u64) as i64],
            |r| r.get(0),
        )?;
    let Some(through) = through else {
        return Ok((0, None));
    };
    // The retained log verifies from the link of the last purged record.
    let floor: Option<Vec<u8>> = tx
        .prepare_cached("SELECT chain FROM decisions WHERE seq = ?1")?
        .query_row([through], |r| r.get(0))
        .optional()?
        .flatten();
    if let Some(floor) = floor {
        tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('chain_floor', ?1)")?
            .execute([hex::encode(floor)])?;
    }
    for table in ["requests", "deliveries"] {
        tx.prepare_cached(&format!(
            "DELETE FROM {table} WHERE request_id IN (SELECT request_id FROM decisions WHERE seq <= ?1)"
        ))?
        .execute([through])?;
    }
    // A revision's delivery is kept under its webhook id.
    tx.prepare_cached(
        "DELETE FROM deliveries WHERE request_id IN (
             SELECT request_id || '.r' || revision FROM decisions WHERE seq <= ?1 AND revision > 0)",
    )?
    .execute([through])?;
    let purged = tx
        .prepare_cached("DELETE FROM decisions WHERE seq <= ?1")?
        .execute([through])?;
    tx.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('purged_through', ?1)")?
        .execute([through.to_string()])?;
    Ok((purged as u64, Some(through as u64)))
}
