//! Cross-instance fan-out: each instance reads the shared log from the last position it
//! published, in position order, and feeds its hub. It is woken by its own commits and by
//! `LISTEN` (commits of other instances), and polls every [`POLL`] as a fallback. Positions are
//! dense (see the module above), so it publishes only the next position: a later one is never
//! offered before an earlier one, and the hub's head (what heartbeats carry) never jumps a gap.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::Postgres;
use crate::{fanout::Hub, store::DecisionLog};

/// The longest a decision of another instance waits when a notification was lost.
const POLL: Duration = Duration::from_millis(250);
/// Decisions read at a time.
const PAGE: usize = 512;

pub(super) async fn run(db: Postgres, hub: Arc<Hub>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = db.wakes().decisions.notified() => {}
            _ = tick.tick() => {}
        }
        loop {
            let last = hub.head();
            let page = match db.decisions_after(last, PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the shared decision log failed");
                    break;
                }
            };
            let Some(first) = page.first() else { break };
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
                        break;
                    }
                }
            }
            let full = page.len() == PAGE;
            hub.publish(page);
            if !full {
                break;
            }
        }
    }
}
