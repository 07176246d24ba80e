//! Group commit on PostgreSQL: one task per instance takes every hot-path write that arrived
//! while its previous transaction was in flight and commits them together, with one statement
//! per kind of row (`UNNEST` of arrays), so a batch costs a handful of round trips whatever its
//! size.
//!
//! A batch, in lock order (every instance takes the same order, so none waits on another in a
//! cycle):
//! 1. request keys: the keys already there answer `Duplicate`/`Conflict`; new ones are inserted
//!    (`ON CONFLICT DO NOTHING`: a key another instance inserted meanwhile is read back and
//!    answers as a seen one), queued ones within `queue_max`;
//! 2. queue rows for new queued requests; deletes of settled ones;
//! 3. last, `log_head` locked: decisions not recorded yet get the next positions and chain links,
//!    with their webhook deliveries; the head is written back and the commit notified.
//!
//! When a batch fails for one write's sake, each write is committed again on its own, so it
//! fails alone; a connection failure fails the batch, and the writer connects again.

use std::collections::{HashMap, hash_map::Entry};

use deadpool_postgres::{Object, Pool, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::{DECISION_COLUMNS, db, decision_row, listen};
use crate::{
    audit::chain::{self, ChainKey, Link},
    cursor::Cursor,
    decision::{Micros, NewDecision, RecordedDecision},
    intake::{EarlierRequest, NewRequest, RequestKey},
    queue::{EnqueueOutcome, Settled},
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
    /// Record the decision of queue row `.0`, and delete the row.
    Settle(
        i64,
        NewDecision,
        Option<Callback>,
        oneshot::Sender<Result<Settled, StoreError>>,
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

pub(super) struct Writer {
    /// The writer's own connection, taken from the pool for as long as it works.
    pub(super) client: Option<Object>,
    pub(super) pool: Pool,
    pub(super) log_id: u32,
    pub(super) queue_max: u64,
    pub(super) chain_key: ChainKey,
    pub(super) wakes: std::sync::Arc<listen::Wakes>,
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

    /// Applies `ops` in one transaction; the answers follow their order.
    async fn commit(&mut self, ops: &[&WriteOp]) -> Result<Vec<Answer>, tokio_postgres::Error> {
        let (log_id, queue_max) = (self.log_id, self.queue_max);
        let chain_key = self.chain_key.clone();
        let client = self.client.as_mut().expect("connected before the commit");
        let tx = client.transaction().await?;
        let mut answers: Vec<Option<Answer>> = ops
            .iter()
            .map(|op| matches!(op, WriteOp::Close(_)).then_some(Answer::Close))
            .collect();

        // 1. Request keys.
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
        // Writes whose request_id is new and got its key: queued ones, and ones decided at once.
        let mut new_keys: Vec<usize> = Vec::new();
        if !keyed.is_empty() {
            let ids: Vec<&str> = keyed.iter().map(|k| k.1.request_id).collect();
            let mut seen = known_keys(&tx, &ids).await?;
            let mut pending = if keyed.iter().any(|k| k.3) {
                let n: i64 = tx
                    .query_one("SELECT count(*) FROM queue", &[])
                    .await?
                    .get(0);
                n as u64
            } else {
                0
            };
            for (i, key, accepted_at, queued) in &keyed {
                let outcome = match seen.entry(key.request_id.to_owned()) {
                    Entry::Occupied(e) => Some(key.outcome_after(e.get().as_earlier())),
                    Entry::Vacant(_) if *queued && pending >= queue_max => {
                        Some(EnqueueOutcome::Full)
                    }
                    Entry::Vacant(e) => {
                        e.insert(Kept {
                            station_id: key.station_id.to_owned(),
                            fingerprint: key.fingerprint.as_str().to_owned(),
                            accepted_at: *accepted_at,
                        });
                        pending += u64::from(*queued);
                        new_keys.push(*i);
                        None
                    }
                };
                if let Some(outcome) = outcome {
                    answers[*i] = Some(match ops[*i] {
                        WriteOp::Enqueue(..) => Answer::Enqueue(outcome),
                        _ => Answer::EnqueueDecided(outcome, None),
                    });
                }
            }
            if !new_keys.is_empty() {
                let lost = insert_keys(&tx, ops, &new_keys).await?;
                if !lost.is_empty() {
                    // Another instance committed these request_ids first.
                    let lost_ids: Vec<&str> = lost.iter().map(|(_, id)| id.as_str()).collect();
                    let theirs = known_keys(&tx, &lost_ids).await?;
                    for (i, id) in &lost {
                        let key = keyed.iter().find(|k| k.0 == *i).expect("a keyed write").1;
                        let outcome = match theirs.get(id) {
                            Some(kept) => key.outcome_after(kept.as_earlier()),
                            None => EnqueueOutcome::Conflict,
                        };
                        answers[*i] = Some(match ops[*i] {
                            WriteOp::Enqueue(..) => Answer::Enqueue(outcome),
                            _ => Answer::EnqueueDecided(outcome, None),
                        });
                    }
                    new_keys.retain(|i| !lost.iter().any(|(l, _)| l == i));
                }
            }
        }

        // 2. Queue rows.
        let queued: Vec<&NewRequest> = new_keys
            .iter()
            .filter_map(|i| match ops[*i] {
                WriteOp::Enqueue(r, _) => Some(r),
                _ => None,
            })
            .collect();
        if !queued.is_empty() {
            insert_queue_rows(&tx, &queued).await?;
            for i in &new_keys {
                if let WriteOp::Enqueue(r, _) = ops[*i] {
                    answers[*i] = Some(Answer::Enqueue(EnqueueOutcome::Accepted {
                        accepted_at: r.accepted_at,
                    }));
                }
            }
            tx.execute("SELECT pg_notify($1, '')", &[&listen::QUEUE])
                .await?;
        }
        let settled_rows: Vec<i64> = ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::Settle(id, ..) => Some(*id),
                _ => None,
            })
            .collect();
        if !settled_rows.is_empty() {
            tx.execute("DELETE FROM queue WHERE id = ANY($1)", &[&settled_rows])
                .await?;
        }

        // 3. Decisions, under the log_head lock.
        // Each with whether it settles a queued request.
        let to_record: Vec<(usize, &NewDecision, Option<&Callback>, bool)> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| match op {
                WriteOp::EnqueueDecided(d, c, _) if new_keys.contains(&i) => {
                    Some((i, d, c.as_ref(), false))
                }
                WriteOp::Settle(_, d, c, _) => Some((i, d, c.as_ref(), true)),
                _ => None,
            })
            .collect();
        let mut new_head = None;
        if !to_record.is_empty() {
            let recorded = record(&tx, log_id, &chain_key, &to_record).await?;
            new_head = recorded.head;
            for (i, settled) in recorded.settled {
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
            if recorded.delivering {
                tx.execute("SELECT pg_notify($1, '')", &[&listen::OUTBOX])
                    .await?;
            }
        }
        tx.commit().await?;
        if new_head.is_some() {
            self.wakes.decisions.notify_one();
        }
        Ok(answers
            .into_iter()
            .map(|a| a.expect("every write is answered"))
            .collect())
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

/// The request keys kept for `ids`.
async fn known_keys(
    tx: &Transaction<'_>,
    ids: &[&str],
) -> Result<HashMap<String, Kept>, tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached(
            "SELECT request_id, station_id, token_fp, accepted_at_us FROM request_keys
             WHERE request_id = ANY($1)",
        )
        .await?;
    let rows = tx.query(&stmt, &[&ids]).await?;
    Ok(rows
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
        .collect())
}

/// Inserts the keys of `ops[i]` for each `i` in `which`; returns those another instance had
/// inserted first.
async fn insert_keys(
    tx: &Transaction<'_>,
    ops: &[&WriteOp],
    which: &[usize],
) -> Result<Vec<(usize, String)>, tokio_postgres::Error> {
    let (mut ids, mut stations, mut fps, mut at) = (vec![], vec![], vec![], vec![]);
    for i in which {
        let (key, accepted_at) = match ops[*i] {
            WriteOp::Enqueue(r, _) => (RequestKey::from(r), r.accepted_at),
            WriteOp::EnqueueDecided(d, _, _) => (RequestKey::from(d), d.accepted_at),
            _ => unreachable!("only intake writes have keys"),
        };
        ids.push(key.request_id);
        stations.push(key.station_id);
        fps.push(key.fingerprint.as_str());
        at.push(accepted_at.0);
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO request_keys (request_id, station_id, token_fp, accepted_at_us)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[])
             ON CONFLICT (request_id) DO NOTHING
             RETURNING request_id",
        )
        .await?;
    let inserted: Vec<String> = tx
        .query(&stmt, &[&ids, &stations, &fps, &at])
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    Ok(which
        .iter()
        .zip(ids)
        .filter(|(_, id)| !inserted.iter().any(|x| x == id))
        .map(|(i, id)| (*i, id.to_owned()))
        .collect())
}

async fn insert_queue_rows(
    tx: &Transaction<'_>,
    requests: &[&NewRequest],
) -> Result<(), tokio_postgres::Error> {
    let ids: Vec<&str> = requests.iter().map(|r| r.request_id.as_str()).collect();
    let stations: Vec<&str> = requests.iter().map(|r| r.station_id.as_str()).collect();
    let fps: Vec<&str> = requests.iter().map(|r| r.fingerprint.as_str()).collect();
    let urls: Vec<Option<&str>> = requests.iter().map(|r| r.callback_url.as_deref()).collect();
    let at: Vec<i64> = requests.iter().map(|r| r.accepted_at.0).collect();
    let tokens: Vec<&str> = requests.iter().map(|r| r.token.expose()).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO queue (request_id, station_id, token_fp, callback_url, accepted_at_us,
                                driver_token)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                                  $6::text[])",
        )
        .await?;
    tx.execute(&stmt, &[&ids, &stations, &fps, &urls, &at, &tokens])
        .await?;
    Ok(())
}

/// What recording a batch's decisions did.
struct Recorded {
    /// For each write (by its index in the batch), its decision: new, or recorded before.
    settled: Vec<(usize, Settled)>,
    /// The new head, when decisions were recorded.
    head: Option<u64>,
    delivering: bool,
}

/// Records the decisions not recorded yet, at the next positions after `log_head` (locked here,
/// last, until the commit), each chained after the one before, with their deliveries.
async fn record(
    tx: &Transaction<'_>,
    log_id: u32,
    chain_key: &ChainKey,
    decisions: &[(usize, &NewDecision, Option<&Callback>, bool)],
) -> Result<Recorded, tokio_postgres::Error> {
    let head = tx
        .query_one("SELECT position, chain FROM log_head FOR UPDATE", &[])
        .await?;
    let mut position = head.get::<_, i64>(0) as u64;
    let mut link: Link = head.get::<_, Vec<u8>>(1).try_into().unwrap_or([0; 32]);
    // Only lock holders insert decisions, so what is not here now is not recorded by anyone.
    // A request decided at intake got its key in this transaction: only settles of queued
    // requests (a lease that ran out, a redelivery) can find their decision recorded.
    let ids: Vec<&str> = decisions
        .iter()
        .filter(|d| d.3)
        .map(|d| d.1.request_id.as_str())
        .collect();
    let mut earlier: HashMap<String, RecordedDecision> = HashMap::new();
    if !ids.is_empty() {
        let stmt = tx
            .prepare_cached(&format!(
                "SELECT {DECISION_COLUMNS} FROM decisions WHERE request_id = ANY($1)"
            ))
            .await?;
        for row in tx.query(&stmt, &[&ids]).await? {
            if let Ok(d) = decision_row(&row, log_id) {
                earlier.insert(d.decision.request_id.clone(), d);
            }
        }
    }
    let mut settled = Vec::with_capacity(decisions.len());
    let mut rows = DecisionRows::default();
    let mut deliveries = DeliveryRows::default();
    for (i, d, callback, _) in decisions {
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
    if rows.positions.is_empty() {
        return Ok(Recorded {
            settled,
            head: None,
            delivering: false,
        });
    }
    rows.insert(tx).await?;
    let delivering = !deliveries.ids.is_empty();
    if delivering {
        deliveries.insert(tx).await?;
    }
    let head = position as i64;
    tx.execute(
        "UPDATE log_head SET position = $1, chain = $2",
        &[&head, &link.as_slice()],
    )
    .await?;
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&listen::DECISIONS, &head.to_string()],
    )
    .await?;
    Ok(Recorded {
        settled,
        head: Some(position),
        delivering,
    })
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
    }

    async fn insert(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO decisions (position, request_id, station_id, token_fp, status, reason,
                                        authorizer, accepted_at_us, decided_at_us, processing_ms,
                                        chain)
                 SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[],
                                      $5::text[], $6::text[], $7::text[], $8::bigint[],
                                      $9::bigint[], $10::bigint[], $11::bytea[])",
            )
            .await?;
        tx.execute(
            &stmt,
            &[
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
            ],
        )
        .await?;
        Ok(())
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
}

impl DeliveryRows {
    fn push(&mut self, d: &NewDecision, c: &Callback) {
        self.ids.push(d.request_id.clone());
        self.stations.push(d.station_id.clone());
        self.urls.push(c.url.clone());
        self.hosts.push(c.host.clone());
        self.tokens.push(c.token.expose().to_owned());
        self.statuses.push(d.verdict.status().as_str());
        self.reasons.push(d.verdict.reason.as_str());
        self.decided.push(d.decided_at.0);
        self.due.push(Micros::now().0.max(d.decided_at.0));
    }

    async fn insert(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO deliveries (request_id, station_id, callback_url, host, driver_token,
                                         status, reason, decided_at_us, state, attempts,
                                         next_attempt_us, age_from_us)
                 SELECT id, station, url, host, token, status, reason, decided, 'pending', 0, due,
                        decided
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::text[], $7::text[], $8::bigint[], $9::bigint[])
                      AS t (id, station, url, host, token, status, reason, decided, due)
                 ON CONFLICT (request_id) DO NOTHING",
            )
            .await?;
        tx.execute(
            &stmt,
            &[
                &self.ids,
                &self.stations,
                &self.urls,
                &self.hosts,
                &self.tokens,
                &self.statuses,
                &self.reasons,
                &self.decided,
                &self.due,
            ],
        )
        .await?;
        Ok(())
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
        _ => unreachable!("answers follow the batch order"),
    }
}
