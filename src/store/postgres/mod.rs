//! The PostgreSQL backend: any number of identical instances share one database.
//!
//! Each job has its file:
//! - [`schema`]: the migrations, applied under an advisory lock;
//! - [`writer`]: group commit of the hot path (enqueues, decisions at intake, settles), one
//!   transaction per batch of concurrent calls, one statement per kind of row;
//! - [`log`]: the decision log's reads, and retention (one instance at a time);
//! - [`tailer`]: cross-instance fan-out: the shared log, read in position order, feeds the hub;
//! - [`listen`]: the `LISTEN` connection that wakes the tailer, the queue, the outbox and the
//!   grants on commits of any instance;
//! - [`grants`]: the grants, and their version that other instances poll.
//!
//! Positions are dense and in commit order: every transaction that records decisions locks the
//! one `log_head` row last, takes the next positions and the chain link from it, and writes it
//! back. A transaction that took position 41 has committed before another can take 42, so a
//! reader past 42 never skips 41 (CONTRACT §10). The chain is linear for the same reason.
//!
//! Tokens: the plain token lives in the pending `queue` row and the pending delivery only, and
//! is deleted (queue) or set NULL (delivery) when they finish.

mod carrier;
mod grants;
pub(crate) mod listen;
pub mod log;
mod revisions;
pub mod schema;
mod tailer;
mod writer;

use std::{
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use self::{listen::Wakes, writer::WriteOp};
use super::StoreError;
use crate::{
    audit::chain::ChainKey,
    cursor::Cursor,
    decision::{DecidedBy, Micros, NewDecision, Reason, RecordedDecision, Verdict},
    fanout::Hub,
    intake::NewRequest,
    queue::{EnqueueOutcome, QueuedRequest, Revisable, Settled},
    token::{DriverToken, Fingerprint},
    webhook::Callback,
};

/// Connections each instance keeps to PostgreSQL (the writer and the listener have their own).
const POOL_SIZE: usize = 16;
/// How long a call waits for a pooled connection, or for a new one, before it fails.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// Writes waiting for the writer before callers wait for room (backpressure).
const WRITE_QUEUE: usize = 16 * 1024;

/// A handle on the shared database. Cheap to clone.
#[derive(Clone)]
pub struct Postgres {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    writer: mpsc::Sender<WriteOp>,
    log_id: u32,
    /// This instance's name on its claims.
    instance: String,
    /// Rung by commits of any instance (through `LISTEN`, and at once for this instance's own).
    wakes: Arc<Wakes>,
    /// The newest position seen in `log_head`, and its floor (kept by the tailer).
    head: AtomicU64,
    floor: AtomicU64,
    /// Stops the writer, the tailer and the listener.
    stop: CancellationToken,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The queue's length for `queue_max` and the depth, shared with the writer.
    queue_count: Arc<writer::QueueCount>,
}

/// The columns of a queued request, in the order [`queued_request`] reads them.
const QUEUED_COLUMNS: &str =
    "request_id, station_id, token_fp, callback_url, accepted_at_us, driver_token";

/// The queued request in the [`QUEUED_COLUMNS`] of `row`, from column `at` on.
fn queued_request(row: &tokio_postgres::Row, at: usize) -> QueuedRequest {
    QueuedRequest {
        request_id: row.get(at),
        station_id: row.get(at + 1),
        fingerprint: Fingerprint::from_stored(row.get(at + 2)),
        callback_url: row.get(at + 3),
        accepted_at: Micros(row.get(at + 4)),
        token: DriverToken::new(row.get::<_, String>(at + 5)),
    }
}

/// A queue row leased to this instance.
pub(crate) struct LeasedRequest {
    pub id: i64,
    /// How often it has been leased, this time included.
    pub claims: usize,
    /// The lease's end, µs.
    pub until: i64,
    pub request: QueuedRequest,
}

/// A database that cannot be reached or refused a statement.
fn db(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::backend(e)
}

/// A PostgreSQL connection configuration from a `postgres://` URL.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(db)?;
    config.application_name("chargegate");
    // Plans for the values at hand: a generic plan chosen while a table was empty (at the first
    // start, before autovacuum has analyzed it) scans the whole table for every batch once it
    // has grown (measured: 37 ms a commit at 16,000 rows).
    config.options("-c plan_cache_mode=force_custom_plan");
    config.connect_timeout(POOL_WAIT);
    Ok(config)
}

impl Postgres {
    /// Connects, applies the migrations the database lacks and starts the writer, the listener
    /// and the tailer. `hub` receives every instance's decisions in log order.
    pub async fn open(
        url: &str,
        queue_max: u64,
        hub: Arc<Hub>,
        chain_key: [u8; 32],
        instance: String,
        dispatch_lease: Option<Duration>,
        carrier_url: Option<&str>,
    ) -> Result<Self, StoreError> {
        let config = parse_url(url)?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .recycle_timeout(Some(POOL_WAIT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(db)?;
        let mut client = connect(&config).await?;
        let (_, log_id) = schema::migrate(&mut client).await?;
        let (head, floor): (i64, i64) = {
            let row = client
                .query_one("SELECT position, floor FROM log_head", &[])
                .await
                .map_err(db)?;
            (row.get(0), row.get(1))
        };
        hub.set_head(head as u64);
        // What this instance held when it last stopped (or died) is free at once; what other
        // instances hold waits for their leases.
        let queued = client
            .execute(
                "UPDATE queue SET claimed_until_us = NULL, claimed_by = NULL WHERE claimed_by = $1",
                &[&instance],
            )
            .await
            .map_err(db)?;
        let delivering = client
            .execute(
                "UPDATE deliveries SET next_attempt_us = $2, claimed_by = NULL
                 WHERE claimed_by = $1 AND state = 'pending'",
                &[&instance, &Micros::now().0],
            )
            .await
            .map_err(db)?;
        if queued + delivering > 0 {
            tracing::info!(
                requests = queued,
                deliveries = delivering,
                "took back the claims this instance held before it restarted"
            );
        }

        let stop = CancellationToken::new();
        let wakes = Arc::new(Wakes::default());
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let inner = Arc::new(Inner {
            pool,
            writer: tx,
            log_id,
            instance,
            wakes: wakes.clone(),
            head: AtomicU64::new(head as u64),
            floor: AtomicU64::new(floor as u64),
            stop: stop.clone(),
            tasks: Default::default(),
            queue_count: Default::default(),
        });
        drop(client);
        let (carrier, carried) = match carrier_url {
            Some(url) => {
                let c = carrier::start(url, log_id, stop.clone()).await?;
                (Some((c.outgoing, c.local)), Some(c.incoming))
            }
            None => (None, None),
        };
        let writer = writer::Writer {
            client: None,
            pool: inner.pool.clone(),
            log_id,
            queue_max,
            chain_key: ChainKey::new(&chain_key),
            wakes: wakes.clone(),
            dispatch_lease: dispatch_lease.map(|l| l.as_micros() as i64),
            instance: inner.instance.clone(),
            queue_count: inner.queue_count.clone(),
            carrier,
        };
        let tasks = vec![
            tokio::spawn(writer.run(rx)),
            tokio::spawn(listen::run(config, wakes, stop.clone())),
            tokio::spawn(tailer::run(
                Self {
                    inner: inner.clone(),
                },
                hub,
                stop,
                carried,
            )),
        ];
        *inner.tasks.lock().expect("tasks lock") = tasks;
        Ok(Self { inner })
    }

    /// Finishes the writes queued, then stops the background tasks.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.writer.send(WriteOp::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
        self.inner.stop.cancel();
        let tasks = std::mem::take(&mut *self.inner.tasks.lock().expect("tasks lock"));
        for task in tasks {
            let _ = task.await;
        }
    }

    /// The name this instance puts on its claims.
    pub(crate) fn instance(&self) -> &str {
        &self.inner.instance
    }

    pub(crate) fn wakes(&self) -> &Arc<Wakes> {
        &self.inner.wakes
    }

    /// A pooled connection.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.inner.pool.get().await.map_err(db)
    }

    pub(crate) async fn enqueue(&self, request: NewRequest) -> Result<EnqueueOutcome, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::Enqueue(request, tx), rx).await
    }

    pub(crate) async fn enqueue_decided(
        &self,
        decision: NewDecision,
        callback: Option<Callback>,
    ) -> Result<(EnqueueOutcome, Option<RecordedDecision>), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::EnqueueDecided(decision, callback, tx), rx)
            .await
    }

    /// Records the decision of a queued request (idempotently by request_id) and deletes its
    /// queue row.
    pub(crate) async fn settle(
        &self,
        decision: NewDecision,
        callback: Option<Callback>,
        keep: Option<Revisable>,
    ) -> Result<Settled, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.write(WriteOp::Settle(decision, callback, keep, tx), rx)
            .await
    }

    /// The queued requests of `ids` still waiting for their decision, oldest first.
    pub(crate) async fn queued(&self, ids: &[&str]) -> Result<Vec<QueuedRequest>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {QUEUED_COLUMNS} FROM queue WHERE request_id = ANY($1) ORDER BY id"
            ))
            .await
            .map_err(db)?;
        let rows = client.query(&stmt, &[&ids]).await.map_err(db)?;
        Ok(rows.iter().map(|r| queued_request(r, 0)).collect())
    }

    /// Leases to this instance, until `lease` from now, up to `max` queued requests nobody holds
    /// (never leased, or their lease ran out), skipping rows another instance is leasing at
    /// this moment, as River and pgmq do; oldest first.
    pub(crate) async fn lease_queued(
        &self,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<LeasedRequest>, StoreError> {
        let now = Micros::now().0;
        let until = now + lease.as_micros() as i64;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "UPDATE queue q SET claimed_until_us = $2, claimed_by = $4, claims = q.claims + 1
                 FROM (SELECT id FROM queue
                       WHERE claimed_until_us IS NULL OR claimed_until_us < $1
                       ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) c
                 WHERE q.id = c.id
                 RETURNING q.id, q.claims, {QUEUED_COLUMNS}"
            ))
            .await
            .map_err(db)?;
        let mut rows = client
            .query(&stmt, &[&now, &until, &(max as i64), &self.instance()])
            .await
            .map_err(db)?;
        rows.sort_by_key(|r| r.get::<_, i64>(0));
        Ok(rows
            .iter()
            .map(|r| LeasedRequest {
                id: r.get(0),
                claims: r.get::<_, i32>(1) as usize,
                until,
                request: queued_request(r, 2),
            })
            .collect())
    }

    /// Ends every dispatch lease, so the sweepers dispatch every waiting request again (after the
    /// dispatcher lost its data).
    pub(crate) async fn release_dispatch_leases(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE queue SET claimed_until_us = NULL WHERE claimed_until_us IS NOT NULL",
                &[],
            )
            .await
            .map_err(db)
    }

    /// Ends the dispatch lease of `request_id` (its dispatch failed): the next sweep takes it.
    pub(crate) async fn release_dispatch_lease(&self, request_id: &str) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE queue SET claimed_until_us = NULL WHERE request_id = $1",
                &[&request_id],
            )
            .await
            .map_err(db)
    }

    /// Leases again, for `lease`, up to `max` queued requests whose dispatch lease ran out
    /// (their dispatch was lost, or their instance died); returns their request_ids.
    /// The `queue` table's length, as the writer's `queue_max` check sees it.
    pub(crate) async fn queue_depth(&self) -> Result<u64, StoreError> {
        if let Some(n) = self.inner.queue_count.fresh() {
            return Ok(n);
        }
        let client = self.client().await?;
        let n: i64 = client
            .query_one("SELECT count(*) FROM queue", &[])
            .await
            .map_err(db)?
            .get(0);
        self.inner.queue_count.counted(n);
        Ok(n.max(0) as u64)
    }

    pub(crate) async fn redispatch(
        &self,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self
            .lease_queued(max, lease)
            .await?
            .into_iter()
            .map(|l| l.request.request_id)
            .collect())
    }

    async fn write<T>(
        &self,
        op: WriteOp,
        rx: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.inner
            .writer
            .send(op)
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn log_id(&self) -> u32 {
        self.inner.log_id
    }

    /// Notes the head and floor read from `log_head`.
    fn note_bounds(&self, head: u64, floor: u64) {
        self.inner.head.fetch_max(head, Ordering::AcqRel);
        self.inner.floor.fetch_max(floor, Ordering::AcqRel);
    }
}

/// Applies the migrations the database at `url` lacks; returns the versions applied.
pub async fn migrate_url(url: &str) -> Result<Vec<i64>, StoreError> {
    let mut client = connect(&parse_url(url)?).await?;
    Ok(schema::migrate(&mut client).await?.0)
}

/// A connection of its own (the writer's, the listener's), driven by a task until it closes.
pub(crate) async fn connect(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, StoreError> {
    let (client, connection) = config.connect(NoTls).await.map_err(db)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "a PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// The columns [`decision_row`] reads, in order.
pub(crate) const DECISION_COLUMNS: &str = "position, request_id, station_id, token_fp, reason, authorizer, accepted_at_us, decided_at_us, revision";

/// A decision from a row of [`DECISION_COLUMNS`].
pub(crate) fn decision_row(
    r: &tokio_postgres::Row,
    log_id: u32,
) -> Result<RecordedDecision, StoreError> {
    let bad = |what: &str| StoreError::backend(std::io::Error::other(format!("unknown {what}")));
    let reason: &str = r.try_get(4).map_err(db)?;
    let authorizer: &str = r.try_get(5).map_err(db)?;
    let position: i64 = r.try_get(0).map_err(db)?;
    Ok(RecordedDecision {
        cursor: Cursor::new(log_id, position as u64),
        decision: NewDecision {
            request_id: r.try_get(1).map_err(db)?,
            station_id: r.try_get(2).map_err(db)?,
            fingerprint: Fingerprint::from_stored(r.try_get(3).map_err(db)?),
            verdict: Verdict::new(
                Reason::parse(reason).ok_or_else(|| bad("reason"))?,
                DecidedBy::parse(authorizer).ok_or_else(|| bad("authorizer"))?,
            ),
            accepted_at: Micros(r.try_get(6).map_err(db)?),
            decided_at: Micros(r.try_get(7).map_err(db)?),
            revision: r.try_get::<_, i32>(8).map_err(db)? as u32,
        },
    })
}
