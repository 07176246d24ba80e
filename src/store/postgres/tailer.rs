//! Cross-instance fan-out: each instance feeds its hub every instance's decisions in position
//! order, from the last position it published. Positions are dense (see the module above), so
//! it publishes only the next position: a later one is never offered before an earlier one, and
//! the hub's head (what heartbeats carry) never jumps a gap.
//!
//! On PostgreSQL alone it reads the shared log, woken by its own commits and by `LISTEN`
//! (commits of other instances), polling every [`POLL`] as a fallback. With the live carrier
//! (Redis, see `carrier`) decisions arrive without a read; they are held until every position
//! before them has arrived, and a position missing for [`GRACE`] (an entry trimmed or lost,
//! Redis down, an instance that died between its commit and its `XADD`) is read from the log
//! before anything after it is published, and counted (`chargegate_fanout_backfills_total`).
//! While Redis is down it tails the log as without a carrier.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Postgres, carrier::Carried};
use crate::{decision::RecordedDecision, fanout::Hub, store::DecisionLog};

/// The longest a decision of another instance waits when a notification was lost; how often
/// the carried tailer looks at the log's head.
const POLL: Duration = Duration::from_millis(250);
/// Decisions read at a time.
const PAGE: usize = 512;
/// How long a carried position may be missing (instances write to Redis in their own time, so
/// entries arrive a little out of order) before it is read from the log.
const GRACE: Duration = Duration::from_millis(50);

pub(super) async fn run(
    db: Postgres,
    hub: Arc<Hub>,
    stop: CancellationToken,
    carried: Option<mpsc::Receiver<Carried>>,
) {
    match carried {
        Some(incoming) => run_carried(db, hub, stop, incoming).await,
        None => run_tailing(db, hub, stop).await,
    }
}

/// PostgreSQL alone: read the log on every wake.
async fn run_tailing(db: Postgres, hub: Arc<Hub>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = db.wakes().decisions.notified() => {}
            _ = tick.tick() => {}
        }
        catch_up(&db, &hub).await;
    }
}

/// With the carrier: publish what it brings in order, read from the log only what it misses.
async fn run_carried(
    db: Postgres,
    hub: Arc<Hub>,
    stop: CancellationToken,
    mut incoming: mpsc::Receiver<Carried>,
) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut held: BTreeMap<u64, RecordedDecision> = BTreeMap::new();
    // The newest position known to be committed, and since when one before it is missing.
    let mut known = hub.head();
    let mut missing_since: Option<Instant> = None;
    let mut down = false;
    loop {
        let give_up = missing_since.map(|t| tokio::time::Instant::from_std(t + GRACE));
        tokio::select! {
            _ = stop.cancelled() => return,
            message = incoming.recv() => match message {
                Some(Carried::Decisions(decisions)) => {
                    let head = hub.head();
                    for d in decisions {
                        let position = d.cursor.position;
                        known = known.max(position);
                        if position > head {
                            held.insert(position, d);
                        }
                    }
                }
                Some(Carried::Down) => down = true,
                Some(Carried::Up) => down = false,
                None => return run_tailing(db, hub, stop).await,
            },
            _ = db.wakes().decisions.notified(), if down => known = u64::MAX,
            _ = tick.tick() => {
                if let Ok(bounds) = db.bounds().await {
                    known = known.max(bounds.head);
                }
            }
            _ = tokio::time::sleep_until(give_up.unwrap_or_else(tokio::time::Instant::now)),
                if give_up.is_some() => {}
        }
        publish_held(&hub, &mut held);
        if known <= hub.head() {
            missing_since = None;
            continue;
        }
        let since = *missing_since.get_or_insert_with(Instant::now);
        if down || since.elapsed() >= GRACE {
            let before = hub.head();
            catch_up(&db, &hub).await;
            let read = hub.head().saturating_sub(before);
            if read > 0 {
                metrics::counter!("chargegate_fanout_backfills_total").increment(read);
            }
            let head = hub.head();
            held.retain(|position, _| *position > head);
            publish_held(&hub, &mut held);
            if known == u64::MAX {
                known = hub.head();
            }
            missing_since = (known > hub.head()).then(Instant::now);
        }
    }
}

/// Publishes the held decisions that follow the hub's head without a gap.
fn publish_held(hub: &Hub, held: &mut BTreeMap<u64, RecordedDecision>) {
    let mut next = hub.head() + 1;
    let mut ready = Vec::new();
    while let Some(entry) = held.first_entry() {
        match entry.key().cmp(&next) {
            std::cmp::Ordering::Less => {
                entry.remove();
            }
            std::cmp::Ordering::Equal => {
                ready.push(entry.remove());
                next += 1;
            }
            std::cmp::Ordering::Greater => break,
        }
    }
    if !ready.is_empty() {
        hub.publish(ready);
    }
}

/// Reads the log after the hub's head until it has published everything committed.
async fn catch_up(db: &Postgres, hub: &Hub) {
    loop {
        let last = hub.head();
        let page = match db.decisions_after(last, PAGE).await {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %e, "reading the shared decision log failed");
                return;
            }
        };
        let Some(first) = page.first() else { return };
        if first.cursor.position != last + 1 {
            // Only retention makes a hole: what this instance had not published yet was
            // purged. Continue from the floor.
            match db.bounds().await {
                Ok(b) if b.floor >= first.cursor.position - 1 => {}
                _ => {
                    tracing::error!(
                        after = last,
                        next = first.cursor.position,
                        "the shared decision log has a gap; waiting for it to fill"
                    );
                    return;
                }
            }
        }
        let full = page.len() == PAGE;
        hub.publish(page);
        if !full {
            return;
        }
    }
}
