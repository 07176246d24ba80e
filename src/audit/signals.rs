//! Anomaly signals as metrics, from counts kept in memory per minute (the store is not scanned):
//!
//! - `chargegate_decisions_unknown_share`: the share of UNKNOWN decisions over the last
//!   [`SHARE_WINDOW_MINUTES`] minutes;
//! - `chargegate_decision_timeouts_last_hour`: decisions that timed out in the last hour (the
//!   seed's rule: many timeouts in an hour);
//! - `chargegate_failing_stations`: stations with at least [`MIN_DECISIONS`] decisions in the
//!   share window of which more than half failed (UNKNOWN or INVALID).
//!
//! - the abuse signals, enumeration and velocity ([`super::abuse`]).
//!
//! `chargegate audit anomalies` applies the same rules to the decision log over any window.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use crate::decision::{Micros, Reason, Status};

pub const SHARE_WINDOW_MINUTES: i64 = 15;
pub const MIN_DECISIONS: u64 = 10;
/// Stations counted per minute; past it a minute's station counts are incomplete (the totals
/// stay exact), so memory stays bounded whatever callers send.
const MAX_STATIONS_PER_MINUTE: usize = 50_000;

#[derive(Default)]
struct Minute {
    minute: i64,
    total: u64,
    unknown: u64,
    timeouts: u64,
    /// Station → (decisions, failing).
    stations: HashMap<String, (u64, u64)>,
}

/// Per-minute decision counts for the last hour, and the abuse signals.
#[derive(Default)]
pub struct Signals {
    minutes: Mutex<VecDeque<Minute>>,
    /// Enumeration and velocity (see [`super::abuse`]).
    pub abuse: super::abuse::AbuseSignals,
}

/// The signals at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Snapshot {
    pub unknown_share: f64,
    pub timeouts_last_hour: u64,
    pub failing_stations: u64,
}

impl Signals {
    /// The signals with these abuse thresholds.
    pub fn new(abuse: super::abuse::AbuseSettings) -> Self {
        Self {
            minutes: Mutex::default(),
            abuse: super::abuse::AbuseSignals::new(abuse),
        }
    }

    pub fn record(&self, at: Micros, station_id: &str, status: Status, reason: Reason) {
        let minute = at.0.div_euclid(60_000_000);
        let mut minutes = self.minutes.lock().expect("signals lock");
        if minutes.back().is_none_or(|m| m.minute < minute) {
            minutes.push_back(Minute {
                minute,
                ..Default::default()
            });
            while minutes.front().is_some_and(|m| m.minute <= minute - 60) {
                minutes.pop_front();
            }
        }
        let Some(bucket) = minutes.iter_mut().rev().find(|m| m.minute <= minute) else {
            return;
        };
        let failing = matches!(status, Status::Unknown | Status::Invalid);
        bucket.total += 1;
        bucket.unknown += u64::from(status == Status::Unknown);
        bucket.timeouts += u64::from(reason == Reason::Timeout);
        // The station's key is allocated once a minute, not once a decision.
        if let Some(entry) = bucket.stations.get_mut(station_id) {
            entry.0 += 1;
            entry.1 += u64::from(failing);
        } else if bucket.stations.len() < MAX_STATIONS_PER_MINUTE {
            bucket
                .stations
                .insert(station_id.to_owned(), (1, u64::from(failing)));
        }
    }

    pub fn snapshot(&self, now: Micros) -> Snapshot {
        let minute = now.0.div_euclid(60_000_000);
        let minutes = self.minutes.lock().expect("signals lock");
        let (mut total, mut unknown, mut timeouts) = (0, 0, 0);
        let mut stations: HashMap<&str, (u64, u64)> = HashMap::new();
        for m in minutes.iter().filter(|m| m.minute > minute - 60) {
            timeouts += m.timeouts;
            if m.minute > minute - SHARE_WINDOW_MINUTES {
                total += m.total;
                unknown += m.unknown;
                for (station, (n, failing)) in &m.stations {
                    let entry = stations.entry(station).or_default();
                    entry.0 += n;
                    entry.1 += failing;
                }
            }
        }
        Snapshot {
            unknown_share: if total == 0 {
                0.0
            } else {
                unknown as f64 / total as f64
            },
            timeouts_last_hour: timeouts,
            failing_stations: stations
                .values()
                .filter(|(n, failing)| *n >= MIN_DECISIONS && 2 * failing > *n)
                .count() as u64,
        }
    }

    /// Publishes the snapshot as gauges every 15 seconds until `shutdown`.
    pub async fn publish(
        self: std::sync::Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(15));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let s = self.snapshot(Micros::now());
            self.abuse.sweep(Micros::now());
            metrics::gauge!("chargegate_decisions_unknown_share").set(s.unknown_share);
            metrics::gauge!("chargegate_decision_timeouts_last_hour")
                .set(s.timeouts_last_hour as f64);
            metrics::gauge!("chargegate_failing_stations").set(s.failing_stations as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000_000;

    #[test]
    fn windows_and_rules() {
        let signals = Signals::default();
        let now = Micros(1_000 * MINUTE);
        // An hour and a half ago: outside every window.
        signals.record(
            Micros(now.0 - 90 * MINUTE),
            "a",
            Status::Unknown,
            Reason::Timeout,
        );
        // Forty minutes ago: counts for the hour of timeouts, not for the share.
        for _ in 0..5 {
            signals.record(
                Micros(now.0 - 40 * MINUTE),
                "a",
                Status::Unknown,
                Reason::Timeout,
            );
        }
        // This minute: station a fails 6 of 10, station b 5 of 10, station c 3 of 3.
        for i in 0..10 {
            let (status, reason) = if i < 6 {
                (Status::Unknown, Reason::Timeout)
            } else {
                (Status::Allowed, Reason::Granted)
            };
            signals.record(now, "a", status, reason);
            let status = if i < 5 {
                Status::Invalid
            } else {
                Status::Allowed
            };
            signals.record(now, "b", status, Reason::TokenFormat);
        }
        for _ in 0..3 {
            signals.record(now, "c", Status::Unknown, Reason::AuthorizerError);
        }
        let s = signals.snapshot(now);
        assert_eq!(s.timeouts_last_hour, 11);
        assert_eq!(s.failing_stations, 1, "only station a");
        assert!(
            (s.unknown_share - 9.0 / 23.0).abs() < 1e-9,
            "{}",
            s.unknown_share
        );
        // An hour later everything has aged out.
        let later = signals.snapshot(Micros(now.0 + 61 * MINUTE));
        assert_eq!((later.timeouts_last_hour, later.failing_stations), (0, 0));
        assert_eq!(later.unknown_share, 0.0);
    }
}
