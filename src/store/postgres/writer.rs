//! Group commit on PostgreSQL: one task per instance takes every hot-path write that arrived
//! while its previous transaction was in flight and commits them together, with one statement
//! per kind of row (`UNNEST` of arrays), pipelined, so a batch costs four round trips whatever
//! its size.
//!
//! A batch, in lock order (every instance takes the same order, so none waits on another in a
//! cycle):
//! 1. request keys: new ones are inserted (`ON CONFLICT DO NOTHING`), queued ones within
//!    `queue_max`; a key that was there already (a retry, another instance's commit) is read
//!    back and answers `Duplicate`/`Conflict`;
//! 2. deletes of settled queue rows;
//! 3. `log_head` locked: decisions not recorded yet get the next positions and chain links;
//! 4. the inserts (queue rows, decisions, their webhook deliveries), the head written back and
//!    the commit notified.
//!
//! When a batch fails for one write's sake, each write is committed again on its own, so it
//! fails alone; a connection failure fails the batch, and the writer connects again.

use std::collections::{HashMap, HashSet};

use deadpool_postgres::{Object, Pool, Transaction};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Row, Statement, types::ToSql};

use super::{DECISION_COLUMNS, carrier, db, decision_row, listen};
use crate::{
    audit::chain::{self, ChainKey, Link},
    cursor::Cursor,
    decision::{Micros, NewDecision, RecordedDecision},
    intake::{EarlierRequest, NewRequest, RequestKey},
    queue::{EnqueueOutcome, Revisable, Settled},
    store::StoreError,
    webhook::Callback,
};

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;

pub(super) enum WriteOp {
    Enqueue(
        NewRequest,
        oneshot::Sender<Result<EnqueueOutcome, StoreError>>,
    ),
    EnqueueDecided(
        NewDecision,
        Option<Callback>,
        oneshot::Sender<Result<(EnqueueOutcome, Option<RecordedDecision>), StoreError>>,
    ),
    /// Record the decision of a queued request, and delete its queue row; keep the request
    /// when the decision is UNKNOWN and `.2` says so.
    Settle(
        NewDecision,
        Option<Callback>,
        Option<Revisable>,
        oneshot::Sender<Result<Settled, StoreError>>,
    ),
    /// Record the revision `.1` of the kept request `.0` and erase what was kept: a transaction
    /// of its own (see [`Writer::revise`]).
    Revise(
        Revisable,
        NewDecision,
        oneshot::Sender<Result<Option<RecordedDecision>, StoreError>>,
    ),
    Close(oneshot::Sender<()>),
}

/// What one write did.
enum Answer {
    Enqueue(EnqueueOutcome),
    EnqueueDecided(EnqueueOutcome, Option<RecordedDecision>),
    Settle(Settled),
    Close,
}

/// How old the queue count that `queue_max` and the depth go by may be.
const QUEUE_COUNT_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// The `queue` table's length as last counted, kept up to date with this instance's own inserts
/// and deletes in between. Counting is a scan of the table (40 ms at 340,000 rows), so a batch
/// counts at most every [`QUEUE_COUNT_TTL`], not on every commit; other instances' changes show
/// at the next count, so across instances `queue_max` and the depth are approximate by what the
/// others enqueued and decided within that second.
#[derive(Default)]
pub(super) struct QueueCount(std::sync::Mutex<Option<(std::time::Instant, i64)>>);

impl QueueCount {
    /// The length, when counted within [`QUEUE_COUNT_TTL`].
    pub(super) fn fresh(&self) -> Option<u64> {
        let counted = *self.0.lock().expect("queue count lock");
        counted
            .filter(|(at, _)| at.elapsed() < QUEUE_COUNT_TTL)
            .map(|(_, n)| n.max(0) as u64)
    }

    pub(super) fn counted(&self, n: i64) {
        *self.0.lock().expect("queue count lock") = Some((std::time::Instant::now(), n));
    }

    /// This instance committed `delta` rows more (or fewer).
    pub(super) fn changed(&self, delta: i64) {
        if let Some((_, n)) = self.0.lock().expect("queue count lock").as_mut() {
            *n += delta;
        }
    }
}

pub(super) struct Writer {
    /// The writer's own connection, taken from the pool for as long as it works.
    pub(super) client: Option<Object>,
    pub(super) pool: Pool,
    pub(super) log_id: u32,
    pub(super) queue_max: u64,
    pub(super) chain_key: ChainKey,
    pub(super) wakes: std::sync::Arc<listen::Wakes>,
    /// With a dispatcher beside the store (Redis), how long a new queue row stays with this
    /// instance (microseconds) before the sweeper dispatches it again; `None`: claimable at once.
    pub(super) dispatch_lease: Option<i64>,
    pub(super) instance: String,
    pub(super) queue_count: std::sync::Arc<QueueCount>,
    /// With the live carrier: where new decisions go after their commit, for the other
    /// instances and for this instance's tailer.
    pub(super) carrier: Option<(carrier::Outgoing, mpsc::Sender<carrier::Carried>)>,
}

impl Writer {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut closing = None;
        while closing.is_none() {
            if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
                break;
            }
            self.commit_and_answer(&mut batch, &mut closing).await;
        }
        if let Some(reply) = closing {
            let _ = reply.send(());
        }
    }

    async fn commit_and_answer(
        &mut self,
        batch: &mut Vec<WriteOp>,
        closing: &mut Option<oneshot::Sender<()>>,
    ) {
        let started = std::time::Instant::now();
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            match self.pool.get().await {
                Ok(client) => self.client = Some(client),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach PostgreSQL");
                    let e = db(e);
                    for op in batch.drain(..) {
                        answer(op, Err(e.clone()), closing);
                    }
                    return;
                }
            }
        }
        // Revisions commit one by one, each in a transaction of its own, before the batch.
        let mut i = 0;
        while i < batch.len() {
            if !matches!(batch[i], WriteOp::Revise(..)) {
                i += 1;
                continue;
            }
            let WriteOp::Revise(kept, revision, reply) = batch.swap_remove(i) else {
                unreachable!("matched above")
            };
            let _ = reply.send(self.revise(&kept, &revision).await.map_err(db));
        }
        if batch.is_empty() {
            return;
        }
        let ops: Vec<&WriteOp> = batch.iter().collect();
        let answers = match self.commit(&ops).await {
            Ok(answers) => answers.into_iter().map(Ok).collect(),
            Err(e) if batch.len() > 1 && !e.is_closed() && e.code().is_some() => {
                tracing::warn!(error = %e, writes = batch.len(), "a write failed its batch; committing each write on its own");
                let mut answers = Vec::with_capacity(batch.len());
                for op in batch.iter() {
                    answers.push(match self.commit(&[op]).await {
                        Ok(mut one) => Ok(one.pop().expect("one answer per write")),
                        Err(e) => Err(db(e)),
                    });
                }
                answers
            }
            Err(e) => {
                tracing::error!(error = %e, writes = batch.len(), "PostgreSQL commit failed; the batch was rolled back");
                let e = db(e);
                batch.iter().map(|_| Err(e.clone())).collect()
            }
        };
        metrics::histogram!("chargegate_store_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("chargegate_store_commit_writes").record(batch.len() as f64);
        for (op, result) in batch.drain(..).zip(answers) {
            answer(op, result, closing);
        }
    }

    /// Records the revision of a kept request in a transaction of its own. The kept row is
    /// deleted first: of two instances revising one request, the second waits on the row and then
    /// finds it gone, and records nothing. The revision is recorded under the `log_head` lock with
    /// its delivery, then notified and carried as a batch's decisions are.
    async fn revise(
        &mut self,
        kept: &Revisable,
        revision: &NewDecision,
    ) -> Result<Option<RecordedDecision>, tokio_postgres::Error> {
        let (log_id, chain_key) = (self.log_id, self.chain_key.clone());
        let client = self.client.as_mut().expect("connected before the commit");
        let tx = client.transaction().await?;
        let st = Statements::prepare(&tx).await?;
        let erased = tx
            .execute(
                "DELETE FROM revisable WHERE request_id = $1",
                &[&kept.request.request_id],
            )
            .await?;
        if erased == 0 {
            return Ok(None);
        }
        let head = tx.query_one(&st.lock_head, &[]).await?;
        let known = tx
            .query_opt(
                "SELECT 1 FROM decisions WHERE request_id = $1 AND revision = $2",
                &[&revision.request_id, &(revision.revision as i32)],
            )
            .await?;
        if known.is_some() {
            tx.commit().await?;
            return Ok(None);
        }
        let position = head.get::<_, i64>(0) + 1;
        let previous: Link = head.get::<_, Vec<u8>>(1).try_into().unwrap_or([0; 32]);
        let link = chain::link(&chain_key, &previous, revision);
        let mut rows = DecisionRows::default();
        rows.push(position, revision, &link);
        tx.execute(&st.insert_decisions, &rows.params()).await?;
        if let Some(callback) = kept.request.callback() {
            let mut deliveries = DeliveryRows::default();
            deliveries.push(revision, &callback);
            tx.execute(&st.insert_deliveries, &deliveries.params())
                .await?;
            tx.execute(&st.notify, &[&listen::OUTBOX, &""]).await?;
        }
        tx.execute(&st.update_head, &[&position, &link.as_slice()])
            .await?;
        tx.execute(&st.notify, &[&listen::DECISIONS, &position.to_string()])
            .await?;
        tx.commit().await?;
        self.wakes.decisions.notify_one();
        let recorded = RecordedDecision {
            cursor: Cursor::new(log_id, position as u64),
            decision: revision.clone(),
        };
        if let Some((outgoing, local)) = &self.carrier {
            let _ = local.try_send(carrier::Carried::Decisions(vec![recorded.clone()]));
            outgoing.carry(vec![recorded.clone()]);
        }
        Ok(Some(recorded))
    }

    /// Applies `ops` in one transaction; the answers follow their order.
    ///
    /// Four round trips whatever the batch holds: `BEGIN`; the request keys, the deletes of
    /// settled queue rows, the `log_head` lock and the settles' earlier decisions, pipelined in
    /// that order (the lock order); every insert, the new head and the notifications, pipelined;
    /// `COMMIT`. A batch with queued requests counts the queue first, for `queue_max`.
    async fn commit(&mut self, ops: &[&WriteOp]) -> Result<Vec<Answer>, tokio_postgres::Error> {
        let (log_id, queue_max, dispatch_lease) =
            (self.log_id, self.queue_max, self.dispatch_lease);
        let chain_key = self.chain_key.clone();
        let instance = self.instance.clone();
        let client = self.client.as_mut().expect("connected before the commit");
        let tx = client.transaction().await?;
        let st = Statements::prepare(&tx).await?;
        let mut answers: Vec<Option<Answer>> = ops
            .iter()
            .map(|op| matches!(op, WriteOp::Close(_)).then_some(Answer::Close))
            .collect();

        // Request keys: the first write of a request_id in the batch inserts its key, a later
        // one answers as a repeat of it; a queued request past `queue_max` inserts nothing.
        // Keys that were there already (a retry, another instance's commit) are read back.
        let keyed: Vec<(usize, RequestKey<'_>, Micros, bool)> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| match op {
                WriteOp::Enqueue(r, _) => Some((i, RequestKey::from(r), r.accepted_at, true)),
                WriteOp::EnqueueDecided(d, _, _) => {
                    Some((i, RequestKey::from(d), d.accepted_at, false))
                }
                _ => None,
            })
            .collect();
        let mut pending = match keyed.iter().any(|k| k.3) {
            true => match self.queue_count.fresh() {
                Some(n) => n,
                None => {
                    let n: i64 = tx.query_one(&st.count_queue, &[]).await?.get(0);
                    self.queue_count.counted(n);
                    n.max(0) as u64
                }
            },
            false => 0,
        };
        let mut first_of: HashMap<&str, usize> = HashMap::new();
        let (mut candidates, mut over, mut later) = (Vec::new(), Vec::new(), Vec::new());
        for (k, (_, key, _, queued)) in keyed.iter().enumerate() {
            if let Some(&first) = first_of.get(key.request_id) {
                later.push((k, first));
                continue;
            }
            first_of.insert(key.request_id, k);
            if *queued && pending >= queue_max {
                over.push(k);
            } else {
                pending += u64::from(*queued);
                candidates.push(k);
            }
        }
        let keys = KeyRows::new(candidates.iter().map(|k| &keyed[*k]));
        // Only lock holders insert decisions, so what is not there under the lock is not
        // recorded by anyone. A request decided at intake gets its key in this transaction: only
        // settles of queued requests (a lease that ran out, a redelivery) can find theirs.
        let settled_ids: Vec<&str> = ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::Settle(d, ..) => Some(d.request_id.as_str()),
                _ => None,
            })
            .collect();
        // The requests of UNKNOWN decisions to keep, once they are recorded.
        let keeping: HashMap<&str, &Revisable> = ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::Settle(d, _, Some(kept), _) => Some((d.request_id.as_str(), kept)),
                _ => None,
            })
            .collect();
        let recording = ops
            .iter()
            .any(|op| matches!(op, WriteOp::EnqueueDecided(..) | WriteOp::Settle(..)));

        let (inserted, deleted, head, earlier) = tokio::try_join!(
            biased;
            async {
                match keys.ids.is_empty() {
                    true => Ok(Vec::new()),
                    false => tx.query(&st.insert_keys, &keys.params()).await,
                }
            },
            async {
                match settled_ids.is_empty() {
                    true => Ok(0),
                    false => tx.execute(&st.delete_queue, &[&settled_ids]).await,
                }
            },
            async {
                match recording {
                    true => tx.query_one(&st.lock_head, &[]).await.map(Some),
                    false => Ok(None),
                }
            },
            async {
                match settled_ids.is_empty() {
                    true => Ok(Vec::new()),
                    false => tx.query(&st.earlier, &[&settled_ids]).await,
                }
            },
        )?;

        let inserted: HashSet<String> = inserted.into_iter().map(|r| r.get(0)).collect();
        // Writes whose request_id is new and got its key: queued ones, and ones decided at once.
        let (mut new_keys, mut lost) = (Vec::new(), Vec::new());
        for &k in &candidates {
            match inserted.contains(keyed[k].1.request_id) {
                true => new_keys.push(keyed[k].0),
                false => lost.push(k),
            }
        }
        let unsure: Vec<&str> = lost
            .iter()
            .chain(&over)
            .map(|k| keyed[*k].1.request_id)
            .collect();

        let queued = QueueRows::new(new_keys.iter().filter_map(|i| match ops[*i] {
            WriteOp::Enqueue(r, _) => Some(r),
            _ => None,
        }));
        for i in &new_keys {
            if let WriteOp::Enqueue(r, _) = ops[*i] {
                answers[*i] = Some(Answer::Enqueue(EnqueueOutcome::Accepted {
                    accepted_at: r.accepted_at,
                }));
            }
        }

        // Each decision with whether it settles a queued request.
        let to_record: Vec<(usize, &NewDecision, Option<&Callback>)> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| match op {
                WriteOp::EnqueueDecided(d, c, _) if new_keys.contains(&i) => {
                    Some((i, d, c.as_ref()))
                }
                WriteOp::Settle(d, c, ..) => Some((i, d, c.as_ref())),
                _ => None,
            })
            .collect();
        let mut earlier_decisions = HashMap::new();
        for row in &earlier {
            if let Ok(d) = decision_row(row, log_id) {
                earlier_decisions.insert(d.decision.request_id.clone(), d);
            }
        }
        let recorded = head
            .map(|head| Recorded::plan(&head, log_id, &chain_key, &to_record, earlier_decisions));
        let new_head = recorded.as_ref().and_then(|r| r.head);
        let (rows, deliveries) = match &recorded {
            Some(r) => (Some(&r.rows), Some(&r.deliveries)),
            None => (None, None),
        };
        let kept = RevisableRows::new(
            recorded
                .iter()
                .flat_map(|r| &r.settled)
                .filter(|(_, s)| s.first)
                .filter_map(|(_, s)| keeping.get(s.decision.decision.request_id.as_str()))
                .copied(),
        );
        let head_position = new_head.map(|h| h.0 as i64);
        let head_text = head_position.map(|h| h.to_string());

        let (known, queue_inserted, ..) = tokio::try_join!(
            biased;
            async {
                match unsure.is_empty() {
                    true => Ok(Vec::new()),
                    false => tx.query(&st.known_keys, &[&unsure]).await,
                }
            },
            async {
                match queued.ids.is_empty() {
                    true => Ok(0),
                    false => {
                        let (until, by) = match dispatch_lease {
                            Some(lease) => (Some(Micros::now().0 + lease), Some(instance.as_str())),
                            None => (None, None),
                        };
                        let [a, b, c, d, e, f] = queued.params();
                        tx.execute(&st.insert_queue, &[a, b, c, d, e, f, &until, &by])
                            .await
                    }
                }
            },
            async {
                match queued.ids.is_empty() {
                    true => Ok(0),
                    false => tx.execute(&st.notify, &[&listen::QUEUE, &""]).await,
                }
            },
            async {
                match rows.filter(|r| !r.positions.is_empty()) {
                    Some(r) => tx.execute(&st.insert_decisions, &r.params()).await,
                    None => Ok(0),
                }
            },
            async {
                match deliveries.filter(|d| !d.ids.is_empty()) {
                    Some(d) => tx.execute(&st.insert_deliveries, &d.params()).await,
                    None => Ok(0),
                }
            },
            async {
                match kept.ids.is_empty() {
                    true => Ok(0),
                    false => tx.execute(&st.insert_revisable, &kept.params()).await,
                }
            },
            async {
                match (head_position, new_head) {
                    (Some(p), Some((_, link))) => {
                        tx.execute(&st.update_head, &[&p, &link.as_slice()]).await
                    }
                    _ => Ok(0),
                }
            },
            async {
                match &head_text {
                    Some(h) => tx.execute(&st.notify, &[&listen::DECISIONS, h]).await,
                    None => Ok(0),
                }
            },
            async {
                match deliveries.is_some_and(|d| !d.ids.is_empty()) {
                    true => tx.execute(&st.notify, &[&listen::OUTBOX, &""]).await,
                    false => Ok(0),
                }
            },
        )?;

        let kept: HashMap<String, Kept> = known
            .into_iter()
            .map(|r| {
                (
                    r.get(0),
                    Kept {
                        station_id: r.get(1),
                        fingerprint: r.get(2),
                        accepted_at: Micros(r.get(3)),
                    },
                )
            })
            .collect();
        let mut outcomes: Vec<Option<EnqueueOutcome>> = vec![None; keyed.len()];
        for &k in &lost {
            let key = &keyed[k].1;
            outcomes[k] = Some(match kept.get(key.request_id) {
                Some(e) => key.outcome_after(e.as_earlier()),
                None => EnqueueOutcome::Conflict,
            });
        }
        for &k in &over {
            let key = &keyed[k].1;
            outcomes[k] = Some(match kept.get(key.request_id) {
                Some(e) => key.outcome_after(e.as_earlier()),
                None => EnqueueOutcome::Full,
            });
        }
        for &(k, first) in &later {
            let key = &keyed[k].1;
            let earlier = &keyed[first];
            outcomes[k] = Some(match (kept.get(key.request_id), outcomes[first]) {
                (Some(e), _) => key.outcome_after(e.as_earlier()),
                (None, Some(EnqueueOutcome::Full)) => EnqueueOutcome::Full,
                (None, _) => key.outcome_after(EarlierRequest {
                    station_id: earlier.1.station_id,
                    fingerprint: earlier.1.fingerprint.as_str(),
                    accepted_at: earlier.2,
                }),
            });
        }
        for (k, outcome) in outcomes.into_iter().enumerate() {
            let Some(outcome) = outcome else { continue };
            let i = keyed[k].0;
            answers[i] = Some(match ops[i] {
                WriteOp::Enqueue(..) => Answer::Enqueue(outcome),
                _ => Answer::EnqueueDecided(outcome, None),
            });
        }
        let mut carried = Vec::new();
        for (i, settled) in recorded.into_iter().flat_map(|r| r.settled) {
            if settled.first && self.carrier.is_some() {
                carried.push(settled.decision.clone());
            }
            answers[i] = Some(match ops[i] {
                WriteOp::EnqueueDecided(d, ..) => Answer::EnqueueDecided(
                    EnqueueOutcome::Accepted {
                        accepted_at: d.accepted_at,
                    },
                    Some(settled.decision),
                ),
                _ => Answer::Settle(settled),
            });
        }

        tx.commit().await?;
        self.queue_count
            .changed(queue_inserted as i64 - deleted as i64);
        if new_head.is_some() {
            self.wakes.decisions.notify_one();
        }
        if let Some((outgoing, local)) = &self.carrier {
            carried.sort_by_key(|d| d.cursor.position);
            let _ = local.try_send(carrier::Carried::Decisions(carried.clone()));
            outgoing.carry(carried);
        }
        Ok(answers
            .into_iter()
            .map(|a| a.expect("every write is answered"))
            .collect())
    }
}

/// The writer's statements, prepared once per connection.
struct Statements {
    count_queue: Statement,
    insert_keys: Statement,
    known_keys: Statement,
    delete_queue: Statement,
    lock_head: Statement,
    earlier: Statement,
    insert_queue: Statement,
    insert_decisions: Statement,
    insert_deliveries: Statement,
    insert_revisable: Statement,
    update_head: Statement,
    notify: Statement,
}

impl Statements {
    /// Every statement is prepared before a pipeline starts, so that the pipeline's statements
    /// reach PostgreSQL in the order they are written (a statement still to be prepared would
    /// let the ones after it overtake it, and break the lock order).
    async fn prepare(tx: &Transaction<'_>) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            count_queue: tx.prepare_cached("SELECT count(*) FROM queue").await?,
            insert_keys: tx
                .prepare_cached(
                    "INSERT INTO request_keys (request_id, station_id, token_fp, accepted_at_us)
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[])
                     ON CONFLICT (request_id) DO NOTHING
                     RETURNING request_id",
                )
                .await?,
            known_keys: tx
                .prepare_cached(
                    "SELECT request_id, station_id, token_fp, accepted_at_us FROM request_keys
                     WHERE request_id = ANY($1)",
                )
                .await?,
            delete_queue: tx
                .prepare_cached("DELETE FROM queue WHERE request_id = ANY($1)")
                .await?,
            lock_head: tx
                .prepare_cached("SELECT position, chain FROM log_head FOR UPDATE")
                .await?,
            earlier: tx
                .prepare_cached(&format!(
                    "SELECT {DECISION_COLUMNS} FROM decisions
                     WHERE request_id = ANY($1) AND revision = 0"
                ))
                .await?,
            insert_queue: tx
                .prepare_cached(
                    "INSERT INTO queue (request_id, station_id, token_fp, callback_url,
                                        accepted_at_us, driver_token, claimed_until_us, claimed_by)
                     SELECT t.*, $7::bigint, $8::text
                     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                                 $6::text[]) AS t",
                )
                .await?,
            insert_decisions: tx
                .prepare_cached(
                    "INSERT INTO decisions (position, request_id, station_id, token_fp, status,
                                            reason, authorizer, accepted_at_us, decided_at_us,
                                            processing_ms, chain, revision)
                     SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[],
                                          $5::text[], $6::text[], $7::text[], $8::bigint[],
                                          $9::bigint[], $10::bigint[], $11::bytea[], $12::int[])",
                )
                .await?,
            insert_deliveries: tx
                .prepare_cached(
                    "INSERT INTO deliveries (request_id, station_id, callback_url, host,
                                             driver_token, status, reason, decided_at_us, state,
                                             attempts, next_attempt_us, age_from_us, revision)
                     SELECT id, station, url, host, token, status, reason, decided, 'pending', 0,
                            due, decided, revision
                     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                 $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::int[])
                          AS t (id, station, url, host, token, status, reason, decided, due,
                                revision)
                     ON CONFLICT (request_id) DO NOTHING",
                )
                .await?,
            insert_revisable: tx
                .prepare_cached(
                    "INSERT INTO revisable (request_id, station_id, token_fp, driver_token,
                                            callback_url, accepted_at_us, decided_at_us)
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[],
                                          $5::text[], $6::bigint[], $7::bigint[])
                     ON CONFLICT (request_id) DO NOTHING",
                )
                .await?,
            update_head: tx
                .prepare_cached("UPDATE log_head SET position = $1, chain = $2")
                .await?,
            notify: tx.prepare_cached("SELECT pg_notify($1, $2)").await?,
        })
    }
}

/// What a request key keeps of the request that first used its request_id.
struct Kept {
    station_id: String,
    fingerprint: String,
    accepted_at: Micros,
}

impl Kept {
    fn as_earlier(&self) -> EarlierRequest<'_> {
        EarlierRequest {
            station_id: &self.station_id,
            fingerprint: &self.fingerprint,
            accepted_at: self.accepted_at,
        }
    }
}

/// The columns of new request keys, as arrays for one `UNNEST` insert.
struct KeyRows<'a> {
    ids: Vec<&'a str>,
    stations: Vec<&'a str>,
    fps: Vec<&'a str>,
    at: Vec<i64>,
}

impl<'a> KeyRows<'a> {
    fn new<'k: 'a>(keys: impl Iterator<Item = &'a (usize, RequestKey<'k>, Micros, bool)>) -> Self {
        let mut rows = Self {
            ids: vec![],
            stations: vec![],
            fps: vec![],
            at: vec![],
        };
        for (_, key, accepted_at, _) in keys {
            rows.ids.push(key.request_id);
            rows.stations.push(key.station_id);
            rows.fps.push(key.fingerprint.as_str());
            rows.at.push(accepted_at.0);
        }
        rows
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 4] {
        [&self.ids, &self.stations, &self.fps, &self.at]
    }
}

/// The columns of new queue rows, as arrays for one `UNNEST` insert.
struct QueueRows<'a> {
    ids: Vec<&'a str>,
    stations: Vec<&'a str>,
    fps: Vec<&'a str>,
    urls: Vec<Option<&'a str>>,
    at: Vec<i64>,
    tokens: Vec<&'a str>,
}

impl<'a> QueueRows<'a> {
    fn new(requests: impl Iterator<Item = &'a NewRequest>) -> Self {
        let mut rows = Self {
            ids: vec![],
            stations: vec![],
            fps: vec![],
            urls: vec![],
            at: vec![],
            tokens: vec![],
        };
        for r in requests {
            rows.ids.push(r.request_id.as_str());
            rows.stations.push(r.station_id.as_str());
            rows.fps.push(r.fingerprint.as_str());
            rows.urls.push(r.callback_url.as_deref());
            rows.at.push(r.accepted_at.0);
            rows.tokens.push(r.token.expose());
        }
        rows
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.ids,
            &self.stations,
            &self.fps,
            &self.urls,
            &self.at,
            &self.tokens,
        ]
    }
}

/// The decisions of a batch, planned under the `log_head` lock.
struct Recorded {
    /// For each write (by its index in the batch), its decision: new, or recorded before.
    settled: Vec<(usize, Settled)>,
    /// The new head and its chain link, when decisions were recorded.
    head: Option<(u64, Link)>,
    rows: DecisionRows,
    deliveries: DeliveryRows,
}

impl Recorded {
    /// Gives the decisions not recorded yet the positions after `head` (the locked `log_head`
    /// row), each chained after the one before, with their deliveries.
    fn plan(
        head: &Row,
        log_id: u32,
        chain_key: &ChainKey,
        decisions: &[(usize, &NewDecision, Option<&Callback>)],
        mut earlier: HashMap<String, RecordedDecision>,
    ) -> Self {
        let mut position = head.get::<_, i64>(0) as u64;
        let mut link: Link = head.get::<_, Vec<u8>>(1).try_into().unwrap_or([0; 32]);
        let mut settled = Vec::with_capacity(decisions.len());
        let mut rows = DecisionRows::default();
        let mut deliveries = DeliveryRows::default();
        for (i, d, callback) in decisions {
            if let Some(e) = earlier.get(&d.request_id) {
                settled.push((
                    *i,
                    Settled {
                        decision: e.clone(),
                        first: false,
                    },
                ));
                continue;
            }
            position += 1;
            link = chain::link(chain_key, &link, d);
            rows.push(position as i64, d, &link);
            if let Some(c) = callback {
                deliveries.push(d, c);
            }
            let recorded = RecordedDecision {
                cursor: Cursor::new(log_id, position),
                decision: (*d).clone(),
            };
            earlier.insert(d.request_id.clone(), recorded.clone());
            settled.push((
                *i,
                Settled {
                    decision: recorded,
                    first: true,
                },
            ));
        }
        let head = (!rows.positions.is_empty()).then_some((position, link));
        Self {
            settled,
            head,
            rows,
            deliveries,
        }
    }
}

/// The columns of new decisions, as arrays for one `UNNEST` insert.
#[derive(Default)]
struct DecisionRows {
    positions: Vec<i64>,
    ids: Vec<String>,
    stations: Vec<String>,
    fps: Vec<String>,
    statuses: Vec<&'static str>,
    reasons: Vec<&'static str>,
    authorizers: Vec<&'static str>,
    accepted: Vec<i64>,
    decided: Vec<i64>,
    processing: Vec<i64>,
    chains: Vec<Vec<u8>>,
    revisions: Vec<i32>,
}

impl DecisionRows {
    fn push(&mut self, position: i64, d: &NewDecision, link: &Link) {
        self.positions.push(position);
        self.ids.push(d.request_id.clone());
        self.stations.push(d.station_id.clone());
        self.fps.push(d.fingerprint.as_str().to_owned());
        self.statuses.push(d.verdict.status().as_str());
        self.reasons.push(d.verdict.reason.as_str());
        self.authorizers.push(d.verdict.decided_by.as_str());
        self.accepted.push(d.accepted_at.0);
        self.decided.push(d.decided_at.0);
        self.processing.push(i64::from(d.processing_time_ms()));
        self.chains.push(link.to_vec());
        self.revisions.push(d.revision as i32);
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 12] {
        [
            &self.positions,
            &self.ids,
            &self.stations,
            &self.fps,
            &self.statuses,
            &self.reasons,
            &self.authorizers,
            &self.accepted,
            &self.decided,
            &self.processing,
            &self.chains,
            &self.revisions,
        ]
    }
}

/// New pending deliveries, due at once (from the commit, as on the embedded store).
#[derive(Default)]
struct DeliveryRows {
    ids: Vec<String>,
    stations: Vec<String>,
    urls: Vec<String>,
    hosts: Vec<String>,
    tokens: Vec<String>,
    statuses: Vec<&'static str>,
    reasons: Vec<&'static str>,
    decided: Vec<i64>,
    due: Vec<i64>,
    revisions: Vec<i32>,
}

impl DeliveryRows {
    fn push(&mut self, d: &NewDecision, c: &Callback) {
        self.ids
            .push(crate::webhook::webhook_id(&d.request_id, d.revision));
        self.revisions.push(d.revision as i32);
        self.stations.push(d.station_id.clone());
        self.urls.push(c.url.clone());
        self.hosts.push(c.host.clone());
        self.tokens.push(c.token.expose().to_owned());
        self.statuses.push(d.verdict.status().as_str());
        self.reasons.push(d.verdict.reason.as_str());
        self.decided.push(d.decided_at.0);
        self.due.push(Micros::now().0.max(d.decided_at.0));
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 10] {
        [
            &self.ids,
            &self.stations,
            &self.urls,
            &self.hosts,
            &self.tokens,
            &self.statuses,
            &self.reasons,
            &self.decided,
            &self.due,
            &self.revisions,
        ]
    }
}

/// Requests of UNKNOWN decisions to keep, as arrays for one `UNNEST` insert.
#[derive(Default)]
struct RevisableRows<'a> {
    ids: Vec<&'a str>,
    stations: Vec<&'a str>,
    fps: Vec<&'a str>,
    tokens: Vec<&'a str>,
    urls: Vec<Option<&'a str>>,
    accepted: Vec<i64>,
    decided: Vec<i64>,
}

impl<'a> RevisableRows<'a> {
    fn new(kept: impl Iterator<Item = &'a Revisable>) -> Self {
        let mut rows = Self::default();
        for k in kept {
            let q = &k.request;
            rows.ids.push(&q.request_id);
            rows.stations.push(&q.station_id);
            rows.fps.push(q.fingerprint.as_str());
            rows.tokens.push(q.token.expose());
            rows.urls.push(q.callback_url.as_deref());
            rows.accepted.push(q.accepted_at.0);
            rows.decided.push(k.decided_at.0);
        }
        rows
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 7] {
        [
            &self.ids,
            &self.stations,
            &self.fps,
            &self.tokens,
            &self.urls,
            &self.accepted,
            &self.decided,
        ]
    }
}

fn answer(
    op: WriteOp,
    result: Result<Answer, StoreError>,
    closing: &mut Option<oneshot::Sender<()>>,
) {
    match (op, result) {
        (WriteOp::Enqueue(_, reply), Ok(Answer::Enqueue(o))) => drop(reply.send(Ok(o))),
        (WriteOp::EnqueueDecided(_, _, reply), Ok(Answer::EnqueueDecided(o, d))) => {
            drop(reply.send(Ok((o, d))))
        }
        (WriteOp::Settle(_, _, _, reply), Ok(Answer::Settle(s))) => drop(reply.send(Ok(s))),
        (WriteOp::Close(reply), _) => *closing = Some(reply),
        (WriteOp::Enqueue(_, reply), Err(e)) => drop(reply.send(Err(e))),
        (WriteOp::EnqueueDecided(_, _, reply), Err(e)) => drop(reply.send(Err(e))),
        (WriteOp::Settle(_, _, _, reply), Err(e)) => drop(reply.send(Err(e))),
        (WriteOp::Revise(_, _, reply), Err(e)) => drop(reply.send(Err(e))),
        _ => unreachable!("answers follow the batch order"),
    }
}
