//! Files the server re-reads while it runs (the access list, the clients file, the TLS
//! certificate and key): looked at every second, and read again when one changed (its
//! modification time, length or inode: a rename into place counts) or on SIGHUP.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tokio_util::sync::CancellationToken;

/// How often the files are looked at.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Calls `reload(forced)` whenever one of `paths` changed (`forced = false`) or the process got
/// SIGHUP (`forced = true`), until `shutdown`. `what` names the files in log lines.
pub fn watch(
    what: &'static str,
    paths: Vec<PathBuf>,
    shutdown: CancellationToken,
    mut reload: impl FnMut(bool) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, what, "cannot listen for SIGHUP; reloading on change only");
                None
            }
        };
        let stamps = |paths: &[PathBuf]| paths.iter().map(|p| stamp(p)).collect::<Vec<_>>();
        let mut seen = stamps(&paths);
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = poll.tick() => false,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
            };
            let now = stamps(&paths);
            if !forced && now == seen {
                continue;
            }
            seen = now;
            reload(forced);
        }
    })
}

/// Re-reads a file set with `load` whenever [`watch`] says to, and hands what loaded to `apply`
/// (which returns how many entries it holds, for the log line); a set that does not load keeps
/// what is in force and says why. Each outcome is counted in the counter `metric{outcome}`.
pub fn watch_and_apply<T, E: std::fmt::Display>(
    what: &'static str,
    metric: &'static str,
    paths: Vec<PathBuf>,
    shutdown: CancellationToken,
    load: impl Fn() -> Result<T, E> + Send + 'static,
    apply: impl Fn(T) -> usize + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    watch(what, paths, shutdown, move |forced| match load() {
        Ok(loaded) => {
            let entries = apply(loaded);
            metrics::counter!(metric, "outcome" => "ok").increment(1);
            tracing::info!(what, entries, forced, "reloaded");
        }
        Err(e) => {
            metrics::counter!(metric, "outcome" => "error").increment(1);
            tracing::error!(what, error = %e, "not reloaded; what was in force stays");
        }
    })
}

/// What identifies a version of a file: modification time, length and inode.
fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// Refuses a secret file that others may write (`writable`) or read (`readable`) — group or
/// world bits — naming the file and its mode.
pub fn check_private(path: &Path, readable: bool) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .permissions()
        .mode();
    let (mask, what) = match readable {
        true => (0o077, "readable or writable"),
        false => (0o022, "writable"),
    };
    if mode & mask != 0 {
        return Err(format!(
            "{} is {what} by group or others (mode {:o}); chmod go-rwx it",
            path.display(),
            mode & 0o777
        ));
    }
    Ok(())
}
