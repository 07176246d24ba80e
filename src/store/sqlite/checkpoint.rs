//! Checkpoints of the log's WAL, on a thread and a connection of their own.
//!
//! SQLite checkpoints on the connection that commits, by default: once the WAL passes its
//! threshold, the commit that crossed it copies every page back into the main file and fsyncs it
//! before it returns. On the log's writer that is a stall of every acknowledgement waiting for
//! the next group commit (g3's tail). Here the writer only notes how large the WAL has grown
//! (SQLite's WAL hook, on the writer's thread) and, every [`PAGES`] pages, wakes this thread,
//! which runs a passive checkpoint: it copies what no reader still needs and never blocks the
//! writer.
//!
//! The WAL starts over (is written again from its beginning) only when everything in it has
//! been copied, and the writer keeps appending while this thread copies. So the thread copies
//! again what was committed during its copy (a few rounds, each shorter), and then the writer
//! copies the pages it committed during the last round itself, after its next commit: a short
//! stop (a few pages and the main file's fsync) instead of the whole copy, and the WAL starts
//! over with the writer's next transaction. Without that, under steady load, it would
//! never start over and only grow.
//!
//! The thread takes turns with the station index's catch-up, the log's one regular reader (see
//! [`LogReads`]): a checkpoint during its read would stop short of the WAL's end.
//!
//! The thread runs at a lower priority than the runtime and the writer (see
//! [`crate::store::background_priority`]): on a busy core it copies in their idle moments.
//!
//! At shutdown the writer stops this thread, then checkpoints and truncates the WAL itself.

use std::{
    cell::Cell,
    ffi::c_int,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
        mpsc as std_mpsc,
    },
    thread::{self, JoinHandle},
    time::Instant,
};

use rusqlite::{Connection, hooks::Wal};

/// WAL pages written between two checkpoints (SQLite's own default threshold is 1,000).
const PAGES: c_int = 4000;
/// Most checkpoints the thread runs in a row, each copying what was committed during the last.
const ROUNDS: usize = 4;
/// Pages committed during a round few enough for the writer to copy.
const CAUGHT_UP: c_int = 64;

thread_local! {
    /// Pages in the WAL after the last commit on this thread's connection.
    static WAL_PAGES: Cell<c_int> = const { Cell::new(0) };
}

/// The WAL hook of the log's write connection: notes the WAL's size for [`Checkpointer::committed`].
/// Registering it replaces SQLite's automatic checkpoint on that connection.
pub(super) fn note_wal_pages(_: &Wal, pages: c_int) -> rusqlite::Result<()> {
    WAL_PAGES.set(pages);
    Ok(())
}

/// Taken by the checkpoint thread for each checkpoint and by the station index for each of its
/// catch-up's transactions (the one regular read of the log), so that the two take turns. A
/// checkpoint that ran during a catch-up could copy only what the catch-up's snapshot did not
/// need, and the WAL, not copied to its end, could not start over: it grew on to twice its
/// threshold, and the next checkpoint copied twice as much. The writer's own copies do not take
/// it: the writer never waits for a background thread.
#[derive(Clone, Default)]
pub(crate) struct LogReads(Arc<std::sync::Mutex<()>>);

impl LogReads {
    pub(crate) fn hold(&self) -> std::sync::MutexGuard<'_, ()> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The writer's handle on the checkpoint thread.
pub(super) struct Checkpointer {
    /// Holds at most one wake-up: one asked for while a checkpoint runs is not repeated.
    wake: Option<std_mpsc::SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    /// The WAL's size when the last checkpoint was asked for.
    asked_at: c_int,
    /// Set by the thread to the pages its last checkpoint copied (the WAL's size when it began);
    /// -1 once the writer has looked.
    copied: Arc<AtomicI64>,
}

impl Checkpointer {
    /// Starts the thread; `conn` is its own write connection to the log.
    pub(super) fn start(conn: Connection, log_reads: LogReads) -> std::io::Result<Self> {
        let (wake, woken) = std_mpsc::sync_channel(1);
        let copied = Arc::new(AtomicI64::new(-1));
        let thread = {
            let copied = copied.clone();
            thread::Builder::new()
                .name("sqlite-checkpoint".into())
                .spawn(move || run(conn, woken, &copied, &log_reads))?
        };
        Ok(Self {
            wake: Some(wake),
            thread: Some(thread),
            asked_at: 0,
            copied,
        })
    }

    /// Called by the writer after each commit on `conn`: wakes the thread every [`PAGES`] pages
    /// of WAL, and copies what the thread's last checkpoint left behind. A WAL that could not
    /// start over (a reader still needed its pages) is not checkpointed again until it has grown
    /// by as much again.
    pub(super) fn committed(&mut self, conn: &Connection) {
        let pages = WAL_PAGES.get();
        let copied = self.copied.swap(-1, Ordering::Relaxed);
        if copied >= 0 && i64::from(pages) > copied {
            checkpoint(conn, "writer");
        }
        if pages < self.asked_at {
            // The WAL started over.
            self.asked_at = 0;
        }
        if pages - self.asked_at >= PAGES
            && let Some(wake) = &self.wake
        {
            self.asked_at = pages;
            let _ = wake.try_send(());
        }
    }

    /// Stops the thread after the checkpoint it is running, and closes its connection.
    pub(super) fn stop(&mut self) {
        self.wake = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(conn: Connection, woken: std_mpsc::Receiver<()>, copied: &AtomicI64, log_reads: &LogReads) {
    crate::store::background_priority();
    while woken.recv().is_ok() {
        // Each round copies what the writer committed during the round before; the writer
        // copies what it committed during the last one.
        let mut last = None;
        for _ in 0..ROUNDS {
            let checkpointed = {
                let _turn = log_reads.hold();
                checkpoint(&conn, "thread")
            };
            let Some((in_wal, through)) = checkpointed else {
                break;
            };
            copied.store(through, Ordering::Relaxed);
            let grew = last.map_or(i64::MAX, |before| in_wal - before);
            last = Some(in_wal);
            if grew <= i64::from(CAUGHT_UP) || through < in_wal {
                break;
            }
        }
    }
}

/// A passive checkpoint on `conn`; returns the pages in the WAL when it began and the pages
/// copied (fewer when a reader still needed some).
fn checkpoint(conn: &Connection, on: &'static str) -> Option<(i64, i64)> {
    let started = Instant::now();
    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    }) {
        Ok((in_wal, copied)) => {
            metrics::histogram!("chargegate_store_checkpoint_seconds", "on" => on)
                .record(started.elapsed().as_secs_f64());
            tracing::debug!(in_wal, copied, on, "WAL checkpoint");
            Some((in_wal, copied))
        }
        Err(e) => {
            tracing::warn!(error = %e, on, "WAL checkpoint failed");
            None
        }
    }
}
