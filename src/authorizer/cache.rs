//! The decision cache of the remote authorizer (`authorizer_cache_ttl_ms`, off by default): definite
//! answers (ALLOWED or NOT_ALLOWED) keyed by station and token fingerprint, for a time-to-live,
//! bounded in size (the oldest entries go first).

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{decision::Reason, token::Fingerprint};

/// Entries kept at most.
pub const CAPACITY: usize = 100_000;

pub struct DecisionCache {
    ttl: Duration,
    capacity: usize,
    inner: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<(String, Fingerprint), (Reason, Instant)>,
    /// Insertion order, for eviction; may name keys already replaced or removed.
    order: VecDeque<((String, Fingerprint), Instant)>,
}

impl DecisionCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            inner: Mutex::new(Entries::default()),
        }
    }

    /// A cached answer that has not expired at `now`.
    pub fn get(&self, station_id: &str, fingerprint: &Fingerprint, now: Instant) -> Option<Reason> {
        let inner = self.inner.lock().expect("cache lock");
        let (reason, expires) = inner
            .map
            .get(&(station_id.to_owned(), fingerprint.clone()))?;
        (now < *expires).then_some(*reason)
    }

    /// Caches a definite answer; other reasons are ignored.
    pub fn put(&self, station_id: &str, fingerprint: &Fingerprint, reason: Reason, now: Instant) {
        use crate::decision::Status;
        if !matches!(reason.status(), Status::Allowed | Status::NotAllowed) {
            return;
        }
        let key = (station_id.to_owned(), fingerprint.clone());
        let expires = now + self.ttl;
        let mut inner = self.inner.lock().expect("cache lock");
        while inner.map.len() >= self.capacity || inner.order.len() >= 2 * self.capacity {
            let Some((old, stamp)) = inner.order.pop_front() else {
                break;
            };
            if inner.map.get(&old).is_some_and(|(_, e)| *e == stamp) {
                inner.map.remove(&old);
            }
        }
        inner.map.insert(key.clone(), (reason, expires));
        inner.order.push_back((key, expires));
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("cache lock").map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(s: &str) -> Fingerprint {
        Fingerprint::from_stored(s.into())
    }

    #[test]
    fn caches_definite_answers_until_they_expire() {
        let t0 = Instant::now();
        let cache = DecisionCache::new(Duration::from_secs(10), 10);
        cache.put("s", &fp("a"), Reason::Granted, t0);
        cache.put("s", &fp("b"), Reason::Blocked, t0);
        cache.put("s", &fp("c"), Reason::Timeout, t0);
        cache.put("s", &fp("d"), Reason::AuthorizerError, t0);
        assert_eq!(cache.get("s", &fp("a"), t0), Some(Reason::Granted));
        assert_eq!(cache.get("s", &fp("b"), t0), Some(Reason::Blocked));
        assert_eq!(
            cache.get("s", &fp("c"), t0),
            None,
            "UNKNOWN is never cached"
        );
        assert_eq!(cache.get("s", &fp("d"), t0), None);
        assert_eq!(
            cache.get("other", &fp("a"), t0),
            None,
            "keyed by station too"
        );
        assert_eq!(
            cache.get("s", &fp("a"), t0 + Duration::from_secs(10)),
            None,
            "expired"
        );
    }

    #[test]
    fn stays_within_its_capacity() {
        let t0 = Instant::now();
        let cache = DecisionCache::new(Duration::from_secs(10), 3);
        for i in 0..10 {
            cache.put("s", &fp(&i.to_string()), Reason::Granted, t0);
        }
        assert_eq!(cache.len(), 3);
        assert_eq!(
            cache.get("s", &fp("9"), t0),
            Some(Reason::Granted),
            "the newest stay"
        );
        assert_eq!(cache.get("s", &fp("0"), t0), None, "the oldest went first");
    }
}
