//! The writer thread: the only write connection, and its group commit.

use std::sync::{Arc, atomic::Ordering};

use rusqlite::{Connection, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::{
    Shared,
    checkpoint::Checkpointer,
    decisions::{add_delivery, keep_revisable, revise, settle},
    request_keys::{enqueue, enqueue_decided},
    retention::purge,
};
use crate::{
    audit::chain::{ChainKey, Link},
    decision::{Micros, NewDecision, RecordedDecision},
    fanout::Hub,
    intake::NewRequest,
    queue::{EnqueueOutcome, QueuedRequest, Revisable, Settled},
    store::StoreError,
    webhook::Callback,
};

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 2048;
/// Committed queue entries kept in memory for the dispatcher.
const HOT_MAX: usize = 8192;

/// A write run inside a batch; it keeps its own result (the caller reads it after the commit).
pub(super) type WriteFn = Box<dyn Fn(&Transaction<'_>) -> rusqlite::Result<()> + Send>;

/// A write for the writer thread, with the channel its result goes back on.
pub(super) enum WriteOp {
    /// Delete up to `.2` of the oldest decisions decided before `.0` and at positions up to `.1`,
    /// with their request keys.
    Purge(Micros, u64, usize, oneshot::Sender<Result<u64, StoreError>>),
    Enqueue(
        NewRequest,
        oneshot::Sender<Result<EnqueueOutcome, StoreError>>,
    ),
    /// Record a request decided at intake: its decision (which keeps its request_id), with the
    /// delivery of its callback if any; no queue entry.
    EnqueueDecided(
        NewDecision,
        Option<Callback>,
        oneshot::Sender<Result<(EnqueueOutcome, Option<RecordedDecision>), StoreError>>,
    ),
    /// Record the decision for queue position `.0`, with the delivery of its callback if any,
    /// and keep the request when the decision is UNKNOWN and `.3` says so.
    Settle(
        u64,
        NewDecision,
        Option<Callback>,
        Option<Revisable>,
        oneshot::Sender<Result<Settled, StoreError>>,
    ),
    /// Record the revision `.1` of the kept request `.0` and erase what was kept.
    Revise(
        Revisable,
        NewDecision,
        oneshot::Sender<Result<Option<RecordedDecision>, StoreError>>,
    ),
    Ping(oneshot::Sender<Result<(), StoreError>>),
    /// Any other write (grants, webhook attempts): runs in the batch's transaction.
    Run(WriteFn, Durability, oneshot::Sender<Result<(), StoreError>>),
    /// Finish what is queued, checkpoint the WAL into the main file and stop.
    Close(oneshot::Sender<()>),
    /// A read on the write connection, after the batch it arrived with is committed. The
    /// writer's page cache is always current, where a read connection's is dropped whenever
    /// the database changed: for small reads repeated under a steady stream of writes.
    Read(ReadFn),
}

/// A read run by the writer thread; it sends its own result.
pub(super) type ReadFn = Box<dyn FnOnce(&Connection) + Send>;

/// What a committed write survives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Power loss: the commit waits for fsync (`synchronous = FULL`).
    Full,
    /// A crash of the process, not of the machine: a batch made only of such writes commits
    /// without fsync; the next full commit makes it durable too (WAL order). For records whose loss
    /// repeats work instead of losing it, such as a webhook attempt that is then sent again.
    Process,
}

/// What one write did inside a transaction that has not committed yet.
enum Applied {
    Purge(u64),
    /// The outcome, and the queue position when the request was added.
    Enqueue(EnqueueOutcome, Option<u64>),
    /// The outcome, and the decision when it was recorded.
    EnqueueDecided(EnqueueOutcome, Option<RecordedDecision>),
    Settle(Settled),
    Revise(Option<RecordedDecision>),
    Ping,
    Run,
    Close,
}

/// The writer thread's state: the only write connection.
pub(super) struct Writer {
    pub(super) conn: Connection,
    /// Checkpoints the WAL when it has grown, off this thread.
    pub(super) checkpointer: Checkpointer,
    pub(super) log_id: u32,
    pub(super) queue_max: u64,
    pub(super) shared: Arc<Shared>,
    pub(super) hub: Arc<Hub>,
    /// The connection is at `synchronous = NORMAL` (a batch of [`Durability::Process`] writes).
    pub(super) relaxed: bool,
    pub(super) chain_key: ChainKey,
    /// The link of the newest committed decision.
    pub(super) chain_head: Link,
    /// `requests` may hold rows. While it cannot (only requests decided at intake so far, as with
    /// the access list), a request decided at intake skips looking its request_id up there.
    pub(super) queued_keys: bool,
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut closing = None;
        while closing.is_none() {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let reads: Vec<ReadFn> = batch
                .extract_if(.., |op| matches!(op, WriteOp::Read(_)))
                .map(|op| match op {
                    WriteOp::Read(read) => read,
                    _ => unreachable!("only reads are extracted"),
                })
                .collect();
            if !batch.is_empty() {
                self.commit_and_answer(&mut batch, &mut closing);
            }
            for read in reads {
                read(&self.conn);
            }
        }
        rx.close();
        self.checkpointer.stop();
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
            tracing::warn!(error = %e, "WAL checkpoint at shutdown failed");
        }
        drop(self.conn);
        if let Some(reply) = closing {
            let _ = reply.send(());
        }
    }

    /// Commits a batch of writes and answers each caller. When the batch fails for one write's
    /// sake (a constraint, a bad statement), it is applied again with a savepoint around each write,
    /// so that write fails alone and the others commit; a failure of the database itself (busy,
    /// disk full, I/O) fails the whole batch at once.
    fn commit_and_answer(
        &mut self,
        batch: &mut Vec<WriteOp>,
        closing: &mut Option<oneshot::Sender<()>>,
    ) {
        let started = std::time::Instant::now();
        let mut committed = self.commit(batch, false);
        if let Err(e) = &committed
            && batch.len() > 1
            && !fails_every_write(e)
        {
            tracing::warn!(error = %e, writes = batch.len(), "a write failed its batch; committing each write on its own savepoint");
            committed = self.commit(batch, true);
        }
        metrics::histogram!("chargegate_store_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("chargegate_store_commit_writes").record(batch.len() as f64);
        match committed {
            Ok(done) => self.answer(batch, done, closing),
            Err(e) => {
                tracing::error!(error = %e, writes = batch.len(), "SQLite commit failed; the batch was rolled back");
                let err = StoreError::backend(e);
                for op in batch.drain(..) {
                    answer_failed(op, err.clone(), closing);
                }
            }
        }
        // After the answers: the checkpoint's remainder, when there is one, waits for no caller.
        self.checkpointer.committed(&self.conn);
    }

    /// Publishes what a committed batch recorded and answers each write with its own result.
    fn answer(
        &mut self,
        batch: &mut Vec<WriteOp>,
        done: Committed,
        closing: &mut Option<oneshot::Sender<()>>,
    ) {
        if done.delivering {
            self.shared.outbox.notify_one();
        }
        if let Some(last) = done.published.last() {
            self.shared
                .decision_head
                .store(last.cursor.position, Ordering::Release);
            self.hub.publish(done.published);
        }
        {
            let mut hot = self.shared.hot.lock().expect("hot entries lock");
            for (op, result) in batch.drain(..).zip(done.applied) {
                let applied = match result {
                    Ok(applied) => applied,
                    Err(e) => {
                        answer_failed(op, StoreError::backend(e), closing);
                        continue;
                    }
                };
                match (op, applied) {
                    (WriteOp::Enqueue(request, reply), Applied::Enqueue(o, seq)) => {
                        drop(reply.send(Ok(o)));
                        // The request itself moves on to the dispatcher, unread.
                        if let Some(seq) = seq
                            && hot.len() < HOT_MAX
                        {
                            hot.push_back((seq, QueuedRequest::from(request)));
                        }
                    }
                    (
                        WriteOp::EnqueueDecided(_, _, reply),
                        Applied::EnqueueDecided(o, recorded),
                    ) => drop(reply.send(Ok((o, recorded)))),
                    (WriteOp::Revise(_, _, reply), Applied::Revise(d)) => drop(reply.send(Ok(d))),
                    (WriteOp::Settle(_, _, _, _, reply), Applied::Settle(s)) => {
                        drop(reply.send(Ok(s)))
                    }
                    (WriteOp::Ping(reply), Applied::Ping) => drop(reply.send(Ok(()))),
                    (WriteOp::Run(_, _, reply), Applied::Run) => drop(reply.send(Ok(()))),
                    (WriteOp::Purge(_, _, _, reply), Applied::Purge(n)) => drop(reply.send(Ok(n))),
                    (WriteOp::Close(reply), Applied::Close) => *closing = Some(reply),
                    _ => unreachable!("results follow the batch order"),
                }
            }
        }
        if let Some(head) = done.enqueue_head {
            self.shared.enqueue_head.send_replace(head);
        }
        metrics::gauge!("chargegate_queue_depth")
            .set(self.shared.pending.load(Ordering::Relaxed) as f64);
    }

    /// Applies a batch in one transaction. Without `isolated`, the first failing write fails
    /// the batch; with it, each write runs on a savepoint and a failing one is rolled back alone
    /// and keeps its error.
    fn commit(&mut self, batch: &[WriteOp], isolated: bool) -> rusqlite::Result<Committed> {
        let relaxed = batch
            .iter()
            .all(|op| matches!(op, WriteOp::Run(_, Durability::Process, _)));
        if relaxed != self.relaxed {
            self.conn.pragma_update(
                None,
                "synchronous",
                if relaxed { "NORMAL" } else { "FULL" },
            )?;
            self.relaxed = relaxed;
        }
        let cx = Context {
            log_id: self.log_id,
            queue_max: self.queue_max,
            chain_key: &self.chain_key,
        };
        let tx = self.conn.transaction()?;
        let mut state = BatchState {
            pending: self.shared.pending.load(Ordering::Relaxed),
            chain_head: self.chain_head,
            queued_keys: self.queued_keys,
            purged_through: None,
        };
        let mut done = Committed {
            applied: Vec::with_capacity(batch.len()),
            published: Vec::new(),
            enqueue_head: None,
            delivering: false,
        };
        for op in batch {
            if !isolated {
                let applied = apply(&tx, op, &mut state, &mut done, cx)?;
                done.applied.push(Ok(applied));
                continue;
            }
            let (before, published, enqueue_head, delivering) = (
                state.clone(),
                done.published.len(),
                done.enqueue_head,
                done.delivering,
            );
            tx.execute_batch("SAVEPOINT write")?;
            match apply(&tx, op, &mut state, &mut done, cx) {
                Ok(applied) => {
                    tx.execute_batch("RELEASE write")?;
                    done.applied.push(Ok(applied));
                }
                Err(e) if fails_every_write(&e) => return Err(e),
                Err(e) => {
                    tx.execute_batch("ROLLBACK TO write; RELEASE write")?;
                    state = before;
                    done.published.truncate(published);
                    done.enqueue_head = enqueue_head;
                    done.delivering = delivering;
                    done.applied.push(Err(e));
                }
            }
        }
        tx.commit()?;
        self.chain_head = state.chain_head;
        self.queued_keys = state.queued_keys;
        self.shared.pending.store(state.pending, Ordering::Relaxed);
        if let Some(through) = state.purged_through {
            self.shared.floor.fetch_max(through, Ordering::AcqRel);
        }
        Ok(done)
    }
}

/// What a committed batch did.
struct Committed {
    /// Each write's result, in batch order.
    applied: Vec<rusqlite::Result<Applied>>,
    /// The decisions recorded for the first time, in log order.
    published: Vec<RecordedDecision>,
    /// The newest queue position, if any entry was added.
    enqueue_head: Option<u64>,
    /// Webhook deliveries were added.
    delivering: bool,
}

/// The writer's state as a batch changes it before it commits.
#[derive(Clone)]
struct BatchState {
    pending: u64,
    chain_head: Link,
    queued_keys: bool,
    purged_through: Option<u64>,
}

/// What every write of a batch reads and none changes.
#[derive(Clone, Copy)]
struct Context<'a> {
    log_id: u32,
    queue_max: u64,
    chain_key: &'a ChainKey,
}

/// Applies one write inside the batch's transaction.
fn apply(
    tx: &Transaction<'_>,
    op: &WriteOp,
    state: &mut BatchState,
    done: &mut Committed,
    cx: Context<'_>,
) -> rusqlite::Result<Applied> {
    Ok(match op {
        WriteOp::Enqueue(request, _) => {
            let (outcome, seq) = enqueue(tx, request, state.pending, cx.queue_max)?;
            if let Some(seq) = seq {
                state.queued_keys = true;
                state.pending += 1;
                done.enqueue_head = Some(seq);
            }
            Applied::Enqueue(outcome, seq)
        }
        WriteOp::EnqueueDecided(decision, callback, _) => {
            let (outcome, recorded) = enqueue_decided(
                tx,
                decision,
                state.queued_keys,
                cx.log_id,
                (cx.chain_key, &mut state.chain_head),
            )?;
            if let Some(d) = &recorded {
                if let Some(callback) = callback {
                    add_delivery(tx, decision, callback)?;
                    done.delivering = true;
                }
                done.published.push(d.clone());
            }
            Applied::EnqueueDecided(outcome, recorded)
        }
        WriteOp::Settle(position, decision, callback, keep, _) => {
            let (settled, completed) = settle(
                tx,
                *position,
                decision,
                cx.log_id,
                (cx.chain_key, &mut state.chain_head),
            )?;
            if let Some(callback) = callback.as_ref().filter(|_| settled.first) {
                add_delivery(tx, decision, callback)?;
                done.delivering = true;
            }
            if let Some(kept) = keep.as_ref().filter(|_| settled.first) {
                keep_revisable(tx, kept)?;
            }
            if completed {
                state.pending = state.pending.saturating_sub(1);
            }
            if settled.first {
                done.published.push(settled.decision.clone());
            }
            Applied::Settle(settled)
        }
        WriteOp::Revise(kept, revision, _) => {
            let recorded = revise(
                tx,
                kept,
                revision,
                cx.log_id,
                (cx.chain_key, &mut state.chain_head),
            )?;
            if let Some(d) = &recorded {
                done.delivering |= kept.request.callback_url.is_some();
                done.published.push(d.clone());
            }
            Applied::Revise(recorded)
        }
        WriteOp::Ping(_) => {
            // A real write: it needs the write lock and the disk, as enqueueing does.
            tx.prepare_cached("UPDATE meta SET value = value WHERE key = 'log_id'")?
                .execute([])?;
            Applied::Ping
        }
        WriteOp::Purge(cutoff, up_to, max, _) => {
            let (purged, through) = purge(tx, *cutoff, *up_to, *max)?;
            if let Some(through) = through {
                state.purged_through = Some(through);
            }
            Applied::Purge(purged)
        }
        WriteOp::Run(f, _, _) => {
            f(tx)?;
            Applied::Run
        }
        WriteOp::Close(_) => Applied::Close,
        WriteOp::Read(_) => unreachable!("reads are not in the batch"),
    })
}

/// Answers a write that did not commit.
fn answer_failed(op: WriteOp, err: StoreError, closing: &mut Option<oneshot::Sender<()>>) {
    match op {
        WriteOp::Enqueue(_, reply) => drop(reply.send(Err(err))),
        WriteOp::EnqueueDecided(_, _, reply) => drop(reply.send(Err(err))),
        WriteOp::Settle(_, _, _, _, reply) => drop(reply.send(Err(err))),
        WriteOp::Revise(_, _, reply) => drop(reply.send(Err(err))),
        WriteOp::Ping(reply) => drop(reply.send(Err(err))),
        WriteOp::Run(_, _, reply) => drop(reply.send(Err(err))),
        WriteOp::Purge(_, _, _, reply) => drop(reply.send(Err(err))),
        WriteOp::Close(reply) => *closing = Some(reply),
        WriteOp::Read(_) => unreachable!("reads are not in the batch"),
    }
}

/// A failure of the database rather than of one write: applying the writes one by one would fail
/// each of them the same way.
fn fails_every_write(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(
            DatabaseBusy
                | DatabaseLocked
                | DiskFull
                | SystemIoFailure
                | ReadOnly
                | OutOfMemory
                | CannotOpen
                | DatabaseCorrupt
                | NotADatabase
                | OperationInterrupted
        )
    )
}
