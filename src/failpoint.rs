//! Named points where the process aborts, for the tests of crash recovery: with
//! `CHARGEGATE_FAILPOINT=<name>` in its environment, the process aborts (as `kill -9` would stop
//! it: no destructor, no flush) the first time it reaches that point. Unset, a point costs one
//! comparison against a value read once.

use std::sync::OnceLock;

/// A request's key and row are committed in PostgreSQL; its Redis entry is not written yet.
pub const AFTER_REQUEST_COMMIT: &str = "redis-after-request-commit";
/// A decision is committed in PostgreSQL; its Redis entry is not acknowledged yet.
pub const AFTER_DECISION_COMMIT: &str = "redis-after-decision-commit";

/// Aborts the process when `name` is the failpoint its environment names.
pub fn reached(name: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("CHARGEGATE_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        eprintln!("failpoint {name} reached: aborting");
        std::process::abort();
    }
}
