//! Abuse signals (CONTRACT §6b), from the decisions this instance records, kept in memory:
//!
//! - **enumeration**: a station that refused (`no_grant`) more than `abuse_enumeration_threshold`
//!   distinct fingerprints within a minute: someone trying card numbers at it;
//! - **velocity**: one fingerprint decided at more than `abuse_velocity_stations` distinct
//!   stations within `abuse_velocity_window_ms`: one card in several places at once.
//!
//! Each is a gauge of how many stations or fingerprints are flagged now
//! (`chargegate_abuse_enumeration_stations`, `chargegate_abuse_velocity_fingerprints`) and a
//! [`Flag`] when one is newly flagged, naming the station or the fingerprint, never a token (the
//! pipeline logs it at WARN). A flag
//! lifts when its window no longer holds the evidence. Memory is bounded: at most
//! [`MAX_TRACKED`] stations and fingerprints are followed, each with at most a few times its
//! threshold of entries. `chargegate audit anomalies` applies the same rules to the decision log.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::Duration,
};

use crate::decision::{Micros, NewDecision, Reason};

/// The enumeration window.
pub const ENUMERATION_WINDOW: Duration = Duration::from_secs(60);
/// Stations, and fingerprints, followed at once at most.
pub const MAX_TRACKED: usize = 100_000;

/// The thresholds (settings `abuse_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbuseSettings {
    pub enumeration_threshold: usize,
    pub velocity_stations: usize,
    pub velocity_window: Duration,
}

impl Default for AbuseSettings {
    fn default() -> Self {
        Self {
            enumeration_threshold: 20,
            velocity_stations: 5,
            velocity_window: Duration::from_millis(600_000),
        }
    }
}

/// A station or a fingerprint newly flagged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Flag {
    Enumeration {
        station_id: String,
        refused_fingerprints: usize,
        at: Micros,
    },
    Velocity {
        fingerprint: String,
        stations: usize,
        at: Micros,
    },
}

impl std::fmt::Display for Flag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Flag::Enumeration {
                station_id,
                refused_fingerprints,
                at,
            } => write!(
                f,
                "enumeration: station {station_id}: {refused_fingerprints} distinct tokens refused (no_grant) within a minute, at {}",
                at.to_rfc3339()
            ),
            Flag::Velocity {
                fingerprint,
                stations,
                at,
            } => write!(
                f,
                "velocity: fingerprint {fingerprint}: decided at {stations} stations within the window, at {}",
                at.to_rfc3339()
            ),
        }
    }
}

/// What is flagged now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flagged {
    pub enumeration_stations: usize,
    pub velocity_fingerprints: usize,
}

#[derive(Default)]
struct State {
    /// Station → refused fingerprint → its last refusal (µs).
    refused: HashMap<String, HashMap<String, i64>>,
    /// Fingerprint → station → its last decision there (µs).
    seen_at: HashMap<String, HashMap<String, i64>>,
    enumerating: HashSet<String>,
    travelling: HashSet<String>,
}

pub struct AbuseSignals {
    settings: AbuseSettings,
    state: Mutex<State>,
}

impl Default for AbuseSignals {
    fn default() -> Self {
        Self::new(AbuseSettings::default())
    }
}

/// The entries followed for `key`, made when there is room for one more key.
fn tracked<'a>(
    map: &'a mut HashMap<String, HashMap<String, i64>>,
    key: &str,
) -> Option<&'a mut HashMap<String, i64>> {
    if !map.contains_key(key) {
        if map.len() >= MAX_TRACKED {
            return None;
        }
        map.insert(key.to_owned(), HashMap::new());
    }
    map.get_mut(key)
}

/// Notes `key` at `at` (allocating only for a key not seen yet) and returns how many keys are
/// within the window (since `since`) when that can raise a flag: with no more than `threshold`
/// keys at all, or with the owner flagged already, it returns the count without the window's
/// trim, which the sweep does. Over `cap` keys, the oldest half goes at once, so the trim costs
/// little per call even for a token seen at a new station on every call (g1's pattern).
fn note(
    entries: &mut HashMap<String, i64>,
    key: &str,
    at: i64,
    since: i64,
    (threshold, cap): (usize, usize),
    flagged: bool,
) -> usize {
    match entries.get_mut(key) {
        Some(seen) => *seen = at,
        None => {
            entries.insert(key.to_owned(), at);
        }
    }
    if entries.len() > cap {
        trim(entries, since, cap / 2);
    }
    if flagged || entries.len() <= threshold {
        return entries.len();
    }
    entries.retain(|_, at| *at >= since);
    entries.len()
}

/// Forgets entries older than `since`, then, over `keep`, all but the newest `keep`; how many
/// are left.
fn trim(entries: &mut HashMap<String, i64>, since: i64, keep: usize) -> usize {
    entries.retain(|_, at| *at >= since);
    if entries.len() > keep {
        // Drop exactly the oldest `cut`, ties at the pivot included as far as needed.
        let mut times: Vec<i64> = entries.values().copied().collect();
        let cut = times.len() - keep;
        let pivot = *times.select_nth_unstable(cut - 1).1;
        let mut ties = cut - times.iter().filter(|t| **t < pivot).count();
        entries.retain(|_, at| match (*at).cmp(&pivot) {
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal if ties > 0 => {
                ties -= 1;
                false
            }
            _ => true,
        });
    }
    entries.len()
}

impl AbuseSignals {
    pub fn new(settings: AbuseSettings) -> Self {
        Self {
            settings,
            state: Mutex::new(State::default()),
        }
    }

    fn windows(&self, now: i64) -> (i64, i64) {
        (
            now - ENUMERATION_WINDOW.as_micros() as i64,
            now - self.settings.velocity_window.as_micros() as i64,
        )
    }

    /// Counts one recorded decision; returns what it newly flags (and updates the gauges).
    pub fn record(&self, d: &NewDecision) -> Vec<Flag> {
        let now = d.decided_at.0;
        let (enumeration_since, velocity_since) = self.windows(now);
        let s = &self.settings;
        let fingerprint = d.fingerprint.as_str();
        let mut state = self.state.lock().expect("abuse lock");
        let State {
            refused,
            seen_at,
            enumerating,
            travelling,
        } = &mut *state;
        let mut flags = Vec::new();
        if d.verdict.reason == Reason::NoGrant
            && let Some(fps) = tracked(refused, &d.station_id)
        {
            let bounds = (s.enumeration_threshold, 4 * s.enumeration_threshold + 4);
            let flagged = enumerating.contains(&d.station_id);
            let distinct = note(fps, fingerprint, now, enumeration_since, bounds, flagged);
            if distinct > s.enumeration_threshold && enumerating.insert(d.station_id.clone()) {
                flags.push(Flag::Enumeration {
                    station_id: d.station_id.clone(),
                    refused_fingerprints: distinct,
                    at: d.decided_at,
                });
            }
        }
        if let Some(stations) = tracked(seen_at, fingerprint) {
            let bounds = (s.velocity_stations, 4 * s.velocity_stations + 4);
            let flagged = travelling.contains(fingerprint);
            let distinct = note(
                stations,
                &d.station_id,
                now,
                velocity_since,
                bounds,
                flagged,
            );
            if distinct > s.velocity_stations && travelling.insert(fingerprint.to_owned()) {
                flags.push(Flag::Velocity {
                    fingerprint: fingerprint.to_owned(),
                    stations: distinct,
                    at: d.decided_at,
                });
            }
        }
        if !flags.is_empty() {
            publish(flagged(&state));
        }
        flags
    }

    /// Forgets what left its window, lifts the flags it held up, and publishes the gauges.
    pub fn sweep(&self, now: Micros) -> Flagged {
        let (enumeration_since, velocity_since) = self.windows(now.0);
        let s = self.settings;
        let mut state = self.state.lock().expect("abuse lock");
        let State {
            refused,
            seen_at,
            enumerating,
            travelling,
        } = &mut *state;
        refused.retain(|station, fps| {
            let n = trim(fps, enumeration_since, 4 * s.enumeration_threshold + 4);
            if n <= s.enumeration_threshold {
                enumerating.remove(station);
            }
            n > 0
        });
        seen_at.retain(|fp, stations| {
            let n = trim(stations, velocity_since, 4 * s.velocity_stations + 4);
            if n <= s.velocity_stations {
                travelling.remove(fp);
            }
            n > 0
        });
        let now_flagged = flagged(&state);
        publish(now_flagged);
        now_flagged
    }
}

fn flagged(state: &State) -> Flagged {
    Flagged {
        enumeration_stations: state.enumerating.len(),
        velocity_fingerprints: state.travelling.len(),
    }
}

fn publish(f: Flagged) {
    metrics::gauge!("chargegate_abuse_enumeration_stations").set(f.enumeration_stations as f64);
    metrics::gauge!("chargegate_abuse_velocity_fingerprints").set(f.velocity_fingerprints as f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        decision::{DecidedBy, Verdict},
        token::Fingerprint,
    };

    const SECOND: i64 = 1_000_000;

    fn decision(at: i64, station: &str, fingerprint: &str, reason: Reason) -> NewDecision {
        NewDecision {
            request_id: format!("r-{at}-{station}-{fingerprint}"),
            station_id: station.to_owned(),
            fingerprint: Fingerprint::from_stored(fingerprint.to_owned()),
            verdict: Verdict::new(reason, DecidedBy::Acl),
            accepted_at: Micros(at),
            decided_at: Micros(at),
            revision: 0,
        }
    }

    #[test]
    fn enumeration_fires_past_the_threshold_within_a_minute_and_lifts_after_it() {
        let abuse = AbuseSignals::default();
        let t0 = 1_000_000 * SECOND;
        // Ordinary traffic: 20 distinct refused tokens a minute apart each, and many allowed.
        for i in 0..20 {
            let _ = abuse.record(&decision(
                t0 + i * 61 * SECOND,
                "s1",
                &format!("fp{i}"),
                Reason::NoGrant,
            ));
            let _ = abuse.record(&decision(t0 + i * SECOND, "s1", "regular", Reason::Granted));
        }
        assert_eq!(
            abuse
                .sweep(Micros(t0 + 20 * 61 * SECOND))
                .enumeration_stations,
            0
        );
        // 21 distinct refused tokens within 30 seconds at s2; repeats of one token do not count.
        let t1 = t0 + 2_000 * SECOND;
        for i in 0..21 {
            let _ = abuse.record(&decision(
                t1 + i * SECOND,
                "s2",
                &format!("try{i}"),
                Reason::NoGrant,
            ));
            let _ = abuse.record(&decision(
                t1 + i * SECOND,
                "s3",
                "same-card",
                Reason::NoGrant,
            ));
        }
        assert_eq!(
            abuse.sweep(Micros(t1 + 21 * SECOND)).enumeration_stations,
            1
        );
        assert_eq!(
            abuse.sweep(Micros(t1 + 120 * SECOND)).enumeration_stations,
            0
        );
    }

    #[test]
    fn velocity_fires_past_the_stations_within_the_window_and_lifts_after_it() {
        let abuse = AbuseSignals::default();
        let t0 = 1_000_000 * SECOND;
        // A commuter: the same five stations again and again, and a sixth eleven minutes later.
        for round in 0..3 {
            for s in 0..5 {
                let _ = abuse.record(&decision(
                    t0 + round * 60 * SECOND + s,
                    &format!("st{s}"),
                    "commuter",
                    Reason::Granted,
                ));
            }
        }
        abuse.record(&decision(
            t0 + 800 * SECOND,
            "st5",
            "commuter",
            Reason::Granted,
        ));
        assert_eq!(
            abuse.sweep(Micros(t0 + 800 * SECOND)).velocity_fingerprints,
            0
        );
        // A cloned card: six stations in five minutes.
        for s in 0..6 {
            let _ = abuse.record(&decision(
                t0 + 1_000 * SECOND + s * 60 * SECOND,
                &format!("far{s}"),
                "clone",
                Reason::Granted,
            ));
        }
        assert_eq!(
            abuse
                .sweep(Micros(t0 + 1_400 * SECOND))
                .velocity_fingerprints,
            1
        );
        assert_eq!(
            abuse
                .sweep(Micros(t0 + 2_100 * SECOND))
                .velocity_fingerprints,
            0
        );
    }

    #[test]
    fn memory_stays_bounded_whatever_is_sent() {
        let abuse = AbuseSignals::default();
        let t0 = 1_000_000 * SECOND;
        for i in 0..(MAX_TRACKED as i64 + 1_000) {
            let _ = abuse.record(&decision(
                t0,
                "one-station",
                &format!("fp{i}"),
                Reason::NoGrant,
            ));
        }
        let state = abuse.state.lock().unwrap();
        assert!(state.refused["one-station"].len() <= 4 * 20 + 4);
        assert!(state.seen_at.len() <= MAX_TRACKED);
    }
}
