//! The live carrier: decisions brought to every instance through a Redis stream, so subscribers
//! see another instance's decision without a read of the shared log (CONTRACT §10, PostgreSQL +
//! Redis Streams). PostgreSQL stays the truth: the tailer publishes only contiguous positions,
//! and fills from the log what the carrier did not bring (see the tailer).
//!
//! **Layout.** One stream per cluster, `chargegate:<log_id>:decisions`, capped with
//! `MAXLEN ~` [`MAXLEN`] (a reader that falls further behind reads the rest from PostgreSQL).
//! An entry is one decision: `p` its position and the fields of the decision (`r` request_id,
//! `s` station, `f` token fingerprint, `why` reason, `by` authorizer, `a`/`t` accepted and
//! decided, µs). Never a token. Each instance `XADD`s its own decisions after their commit (in
//! the background: a decision whose entry is lost is read from the log) and reads every
//! instance's with `XREAD BLOCK` on a connection of its own.

use std::time::Duration;

use redis::{
    AsyncConnectionConfig, Client, Value,
    aio::ConnectionManager,
    streams::{StreamId, StreamReadReply},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    cursor::Cursor,
    decision::{DecidedBy, Micros, NewDecision, Reason, RecordedDecision, Verdict},
    store::StoreError,
    token::Fingerprint,
};

/// Entries the stream keeps, about.
pub const MAXLEN: usize = 10_000;
/// The longest a blocking read waits before it reads again.
const BLOCK: Duration = Duration::from_millis(250);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Batches of this instance's decisions waiting to be carried; past it a batch is dropped (its
/// decisions are read from the log).
const OUTGOING: usize = 256;

/// What the reader tells the tailer.
pub(super) enum Carried {
    /// Decisions, in the order they reached the stream (not always log order: instances
    /// commit in turn but write to Redis on their own).
    Decisions(Vec<RecordedDecision>),
    /// Redis does not answer: tail the log until it does again.
    Down,
    /// Redis answers again.
    Up,
}

/// This instance's side of the carrier: where its writer hands its new decisions.
#[derive(Clone)]
pub(super) struct Outgoing(mpsc::Sender<Vec<RecordedDecision>>);

impl Outgoing {
    /// Hands decisions over without waiting; dropped when the carrier is behind.
    pub(super) fn carry(&self, decisions: Vec<RecordedDecision>) {
        if !decisions.is_empty() {
            let _ = self.0.try_send(decisions);
        }
    }
}

/// The carrier as the writer and the tailer see it.
pub(super) struct Carrier {
    /// Where the writer hands this instance's new decisions, for the other instances.
    pub outgoing: Outgoing,
    /// Where the writer hands them to this instance's own tailer, without the trip to Redis.
    pub local: mpsc::Sender<Carried>,
    /// What the tailer reads: the reader's decisions, and this instance's own.
    pub incoming: mpsc::Receiver<Carried>,
}

/// Connects to Redis at `url` and starts the writer and the reader of the cluster `log_id`'s
/// decision stream.
pub(super) async fn start(
    url: &str,
    log_id: u32,
    stop: CancellationToken,
) -> Result<Carrier, StoreError> {
    let client = Client::open(url).map_err(StoreError::backend)?;
    let commands = crate::queue::redis::command_connection(&client).await?;
    let key = format!("chargegate:{log_id}:decisions");
    let (out_tx, out_rx) = mpsc::channel(OUTGOING);
    let (in_tx, in_rx) = mpsc::channel(256);
    tokio::spawn(write(commands, key.clone(), out_rx, stop.clone()));
    tokio::spawn(read(client, key, log_id, in_tx.clone(), stop));
    Ok(Carrier {
        outgoing: Outgoing(out_tx),
        local: in_tx,
        incoming: in_rx,
    })
}

async fn write(
    mut commands: ConnectionManager,
    key: String,
    mut rx: mpsc::Receiver<Vec<RecordedDecision>>,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return,
            batch = rx.recv() => match batch { Some(b) => b, None => return },
        };
        let mut pipe = redis::pipe();
        for d in &batch {
            let n = &d.decision;
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(MAXLEN)
                .arg("*")
                .arg("p")
                .arg(d.cursor.position)
                .arg("r")
                .arg(&n.request_id)
                .arg("s")
                .arg(&n.station_id)
                .arg("f")
                .arg(n.fingerprint.as_str())
                .arg("why")
                .arg(n.verdict.reason.as_str())
                .arg("by")
                .arg(n.verdict.decided_by.as_str())
                .arg("a")
                .arg(n.accepted_at.0)
                .arg("t")
                .arg(n.decided_at.0)
                .arg("v")
                .arg(n.revision)
                .ignore();
        }
        match pipe.query_async::<()>(&mut commands).await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "carrying decisions through Redis failed; the other instances read them from PostgreSQL");
            }
            Err(_) => {}
        }
    }
}

async fn read(
    client: Client,
    key: String,
    log_id: u32,
    tx: mpsc::Sender<Carried>,
    stop: CancellationToken,
) {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(RESPONSE_TIMEOUT))
        .set_response_timeout(None);
    let mut connection = None;
    let mut last = "$".to_owned();
    let mut up = true;
    loop {
        if stop.is_cancelled() {
            return;
        }
        if connection.is_none() {
            connection = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .ok();
        }
        let reply: Result<Option<StreamReadReply>, _> = match connection.as_mut() {
            Some(c) => {
                let mut cmd = redis::cmd("XREAD");
                cmd.arg("COUNT")
                    .arg(512)
                    .arg("BLOCK")
                    .arg(BLOCK.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&last);
                let read = cmd.query_async(c);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    reply = read => reply,
                }
            }
            None => Err(redis::RedisError::from(std::io::Error::other(
                "no connection to Redis",
            ))),
        };
        match reply {
            Ok(reply) => {
                if !up {
                    up = true;
                    if tx.send(Carried::Up).await.is_err() {
                        return;
                    }
                }
                let entries: Vec<StreamId> = reply
                    .into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .collect();
                if let Some(e) = entries.last() {
                    last = e.id.clone();
                }
                let decisions: Vec<RecordedDecision> =
                    entries.iter().filter_map(|e| decoded(e, log_id)).collect();
                if !decisions.is_empty() && tx.send(Carried::Decisions(decisions)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                connection = None;
                if up {
                    up = false;
                    tracing::warn!(error = %e, "reading the Redis decision stream failed; tailing PostgreSQL until it answers");
                    if tx.send(Carried::Down).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(BLOCK) => {}
                }
            }
        }
    }
}

/// A decision from its stream entry; `None` for an entry that is not one (it is then read from
/// the log like any missing decision).
fn decoded(e: &StreamId, log_id: u32) -> Option<RecordedDecision> {
    let text = |k: &str| match e.map.get(k) {
        Some(Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
        _ => None,
    };
    let number = |k: &str| text(k)?.parse::<i64>().ok();
    Some(RecordedDecision {
        cursor: Cursor::new(log_id, u64::try_from(number("p")?).ok()?),
        decision: NewDecision {
            request_id: text("r")?,
            station_id: text("s")?,
            fingerprint: Fingerprint::from_stored(text("f")?),
            verdict: Verdict::new(
                Reason::parse(&text("why")?)?,
                DecidedBy::parse(&text("by")?)?,
            ),
            accepted_at: Micros(number("a")?),
            decided_at: Micros(number("t")?),
            // Entries written before revisions have none: a request's decision.
            revision: number("v").map_or(Some(0), |v| u32::try_from(v).ok())?,
        },
    })
}
