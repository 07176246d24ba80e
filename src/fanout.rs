//! Fan-out: every recorded decision to every live subscriber of its station, with no silent loss.
//!
//! Design (after etcd's synced and unsynced watchers):
//! - The store publishes each commit's new decisions to the [`Hub`] in log order, from its writer.
//!   Publishing never waits: each matching subscriber has a fixed buffer of [`BUFFER`] decisions
//!   and the hub only `try_send`s into it.
//! - A subscriber whose buffer is full is *lagging*: the hub drops its sender and forgets it. The
//!   subscriber drains what is buffered, sees its channel close, registers again and catches up
//!   from the decision log after the last position it sent, page by page at its own pace, then
//!   reads live again. It registers *before* reading the log, so a decision committed meanwhile is
//!   either in the log read or in the new buffer; positions it has already sent are skipped. Hence
//!   no gap and no duplicate, and the pipeline and other subscribers never wait for a slow one.
//! - Memory per subscriber is bounded by its buffer plus one catch-up page, however far behind it is.
//! - Heartbeats carry the newest position that is safe to resume from: the hub's head when the
//!   subscriber's buffer is empty and it is not lagging, else the last position it sent.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    cursor::Cursor,
    decision::{Micros, RecordedDecision},
    proto::{self, subscribe_decisions_response::Event},
    store::{DecisionLog, StationFilter},
};

/// Decisions buffered per subscriber before it is treated as lagging.
pub const BUFFER: usize = 256;
/// Decisions read from the log at a time while catching up.
const CATCH_UP_PAGE: usize = 256;
/// How long a closing status may wait for room in a slow client's buffer.
const END_TIMEOUT: Duration = Duration::from_secs(1);

/// The live registry of subscribers. Shared by the store (publisher) and the stream tasks.
pub struct Hub {
    registry: Mutex<Registry>,
    /// Position of the newest published decision. Stored under the registry lock, after the
    /// decisions up to it were offered to every subscriber.
    head: AtomicU64,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    by_station: HashMap<String, Vec<Arc<Slot>>>,
    all: Vec<Arc<Slot>>,
}

/// One subscriber's end of the hub.
struct Slot {
    id: u64,
    /// The only sender of the subscriber's buffer. Taken (dropped) when the subscriber lags, which
    /// closes its channel once drained: that is how it learns to catch up from the log.
    tx: Mutex<Option<mpsc::Sender<Arc<RecordedDecision>>>>,
}

impl Slot {
    /// Offers a decision; false when the slot is gone (lagging or unsubscribed).
    fn offer(&self, decision: &Arc<RecordedDecision>) -> bool {
        let mut tx = self.tx.lock().expect("slot lock");
        let Some(sender) = tx.as_ref() else {
            return false;
        };
        match sender.try_send(decision.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                *tx = None;
                metrics::counter!("chargegate_subscriber_catchups_total").increment(1);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                *tx = None;
                false
            }
        }
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        Self {
            registry: Mutex::new(Registry::default()),
            head: AtomicU64::new(0),
        }
    }

    /// Sets the head when the log is opened.
    pub fn set_head(&self, position: u64) {
        let _registry = self.registry.lock().expect("hub lock");
        self.head.store(position, Ordering::Release);
    }

    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Offers decisions (in log order) to their subscribers. Never blocks on a subscriber.
    pub fn publish(&self, decisions: &[RecordedDecision]) {
        let mut registry = self.registry.lock().expect("hub lock");
        let mut last = None;
        for decision in decisions {
            let decision = Arc::new(decision.clone());
            if let Some(slots) = registry.by_station.get_mut(decision.station_id()) {
                slots.retain(|slot| slot.offer(&decision));
                if slots.is_empty() {
                    registry.by_station.remove(decision.station_id());
                }
            }
            registry.all.retain(|slot| slot.offer(&decision));
            last = Some(decision.cursor.position);
        }
        if let Some(last) = last {
            self.head.fetch_max(last, Ordering::AcqRel);
        }
    }

    /// Registers a subscriber; returns it with the head at the moment it was registered. Every
    /// decision published after that moment reaches its buffer (or makes it lag).
    pub fn subscribe(self: &Arc<Self>, filter: &StationFilter) -> (Subscription, u64) {
        let (tx, rx) = mpsc::channel(BUFFER);
        let mut registry = self.registry.lock().expect("hub lock");
        registry.next_id += 1;
        let slot = Arc::new(Slot {
            id: registry.next_id,
            tx: Mutex::new(Some(tx)),
        });
        match filter {
            StationFilter::All => registry.all.push(slot.clone()),
            StationFilter::Only(ids) => {
                for id in ids {
                    registry
                        .by_station
                        .entry(id.clone())
                        .or_default()
                        .push(slot.clone());
                }
            }
        }
        let head = self.head.load(Ordering::Acquire);
        drop(registry);
        let subscription = Subscription {
            hub: self.clone(),
            id: slot.id,
            filter: filter.clone(),
            rx,
        };
        (subscription, head)
    }

    fn unsubscribe(&self, id: u64, filter: &StationFilter) {
        let mut registry = self.registry.lock().expect("hub lock");
        match filter {
            StationFilter::All => registry.all.retain(|s| s.id != id),
            StationFilter::Only(ids) => {
                for station in ids {
                    if let Some(slots) = registry.by_station.get_mut(station) {
                        slots.retain(|s| s.id != id);
                        if slots.is_empty() {
                            registry.by_station.remove(station);
                        }
                    }
                }
            }
        }
    }
}

/// A registered subscriber's buffer. Dropping it unregisters.
pub struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    filter: StationFilter,
    rx: mpsc::Receiver<Arc<RecordedDecision>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.id, &self.filter);
    }
}

/// Where a stream starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Live decisions from now on.
    Live,
    /// Every retained decision after this position, then live.
    After(u64),
}

/// Everything a decision stream needs.
pub struct StreamContext {
    pub hub: Arc<Hub>,
    pub log: Arc<dyn DecisionLog>,
    pub heartbeat_interval: Duration,
    /// Cancelled at shutdown: the stream ends with UNAVAILABLE so the client resumes elsewhere.
    pub shutdown: CancellationToken,
}

pub type StreamItem = Result<proto::SubscribeDecisionsResponse, Status>;

/// Why a stream stopped before its client went away.
enum Stop {
    ClientGone,
    Shutdown,
    Store,
}

/// Feeds one subscriber until its client goes away or the server shuts down. Returns the number
/// of messages sent.
pub async fn run_stream(
    ctx: StreamContext,
    filter: StationFilter,
    start: Start,
    out: mpsc::Sender<StreamItem>,
) -> u64 {
    let mut stream = DecisionStream {
        ctx,
        filter,
        out,
        last: 0,
        sent: 0,
    };
    metrics::gauge!("chargegate_subscribers").increment(1.0);
    let stop = stream.run(start).await;
    metrics::gauge!("chargegate_subscribers").decrement(1.0);
    match stop {
        Stop::ClientGone => tracing::debug!(sent = stream.sent, "subscriber went away"),
        Stop::Shutdown => {
            stream
                .end(Status::unavailable(
                    "the server is shutting down; resume from your last cursor",
                ))
                .await;
        }
        Stop::Store => {
            stream
                .end(Status::unavailable(
                    "the decision log is unavailable; resume from your last cursor",
                ))
                .await;
        }
    }
    stream.sent
}

struct DecisionStream {
    ctx: StreamContext,
    filter: StationFilter,
    out: mpsc::Sender<StreamItem>,
    /// The newest position this subscriber has been sent (or, via heartbeats, is safe at).
    last: u64,
    sent: u64,
}

impl DecisionStream {
    async fn run(&mut self, start: Start) -> Stop {
        let (mut subscription, head) = self.ctx.hub.subscribe(&self.filter);
        match start {
            Start::Live => self.last = head,
            Start::After(position) => {
                self.last = position;
                if let Err(stop) = self.catch_up().await {
                    return stop;
                }
            }
        }
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + self.ctx.heartbeat_interval,
            self.ctx.heartbeat_interval,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => return Stop::Shutdown,
                _ = self.out.closed() => return Stop::ClientGone,
                received = subscription.rx.recv() => match received {
                    Some(decision) => {
                        if decision.cursor.position > self.last {
                            if let Err(stop) = self.send_decision(&decision).await {
                                return stop;
                            }
                            heartbeat.reset();
                        }
                    }
                    None => {
                        // The hub dropped us for lagging: register again, then catch up from the log.
                        tracing::debug!(last = self.last, "subscriber lagged; catching up from the decision log");
                        subscription = self.ctx.hub.subscribe(&self.filter).0;
                        if let Err(stop) = self.catch_up().await {
                            return stop;
                        }
                        heartbeat.reset();
                    }
                },
                _ = heartbeat.tick() => {
                    let head = self.ctx.hub.head();
                    if !subscription.rx.is_closed() && subscription.rx.is_empty() {
                        self.last = self.last.max(head);
                    }
                    let beat = proto::Heartbeat {
                        cursor: Cursor::new(self.ctx.log.log_id(), self.last).encode(),
                        at: Some(Micros::now().to_proto()),
                    };
                    if let Err(stop) = self.send(Event::Heartbeat(beat)).await {
                        return stop;
                    }
                }
            }
        }
    }

    /// Ends the stream with `status`, waiting a little for room in a slow client's buffer.
    async fn end(&self, status: Status) {
        let _ = tokio::time::timeout(END_TIMEOUT, self.out.send(Err(status))).await;
    }

    /// Sends every logged decision after `self.last` for this subscriber's stations.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        loop {
            let page = match self
                .ctx
                .log
                .read_after(self.last, &self.filter, CATCH_UP_PAGE)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the decision log for a subscriber failed");
                    return Err(Stop::Store);
                }
            };
            let complete = page.len() < CATCH_UP_PAGE;
            for decision in &page {
                self.send_decision(decision).await?;
            }
            if complete {
                return Ok(());
            }
        }
    }

    async fn send_decision(&mut self, decision: &RecordedDecision) -> Result<(), Stop> {
        self.send(Event::Decision(decision.to_proto())).await?;
        self.last = decision.cursor.position;
        Ok(())
    }

    async fn send(&mut self, event: Event) -> Result<(), Stop> {
        let item = Ok(proto::SubscribeDecisionsResponse { event: Some(event) });
        tokio::select! {
            biased;
            _ = self.ctx.shutdown.cancelled() => Err(Stop::Shutdown),
            sent = self.out.send(item) => match sent {
                Ok(()) => {
                    self.sent += 1;
                    Ok(())
                }
                Err(_) => Err(Stop::ClientGone),
            },
        }
    }
}
