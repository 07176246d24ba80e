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
//!   A stream has no task of its own: it is polled as its client reads.
//! - Heartbeats carry the newest position that is safe to resume from: the hub's head when the
//!   subscriber's buffer is empty and it is not lagging, else the last position it sent.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::Stream;
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
    pub fn publish(&self, decisions: Vec<RecordedDecision>) {
        let mut registry = self.registry.lock().expect("hub lock");
        let mut last = None;
        for decision in decisions {
            last = Some(decision.cursor.position);
            let station_listened = registry.by_station.contains_key(decision.station_id());
            if !station_listened && registry.all.is_empty() {
                continue;
            }
            let decision = Arc::new(decision);
            if let Some(slots) = registry.by_station.get_mut(decision.station_id()) {
                slots.retain(|slot| slot.offer(&decision));
                if slots.is_empty() {
                    registry.by_station.remove(decision.station_id());
                }
            }
            registry.all.retain(|slot| slot.offer(&decision));
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

/// A subscriber's stream. It is produced on demand as the client reads — HTTP/2 flow control is
/// the backpressure — so an open subscription costs no task and no buffer beyond its hub slot.
/// It ends with UNAVAILABLE at shutdown or when the log cannot be read; dropping it unregisters.
pub fn decision_stream(
    ctx: StreamContext,
    filter: StationFilter,
    start: Start,
) -> impl Stream<Item = StreamItem> + Send + 'static {
    let stream = DecisionStream::new(ctx, filter, start);
    futures::stream::unfold(stream, |mut stream| async move {
        stream.next().await.map(|item| (item, stream))
    })
}

struct DecisionStream {
    ctx: StreamContext,
    filter: StationFilter,
    subscription: Subscription,
    /// Decisions read from the log and not yet sent (one catch-up page at most).
    backlog: VecDeque<RecordedDecision>,
    /// True while the log may hold decisions after `last` that the live path will not deliver.
    catching_up: bool,
    /// The newest position this subscriber has been sent (or, via heartbeats, is safe at).
    last: u64,
    sent: u64,
    heartbeat: tokio::time::Interval,
    done: bool,
}

impl DecisionStream {
    fn new(ctx: StreamContext, filter: StationFilter, start: Start) -> Self {
        let (subscription, head) = ctx.hub.subscribe(&filter);
        let (last, catching_up) = match start {
            Start::Live => (head, false),
            Start::After(position) => (position, true),
        };
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + ctx.heartbeat_interval,
            ctx.heartbeat_interval,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        metrics::gauge!("chargegate_subscribers").increment(1.0);
        Self {
            ctx,
            filter,
            subscription,
            backlog: VecDeque::new(),
            catching_up,
            last,
            sent: 0,
            heartbeat,
            done: false,
        }
    }

    async fn next(&mut self) -> Option<StreamItem> {
        if self.done {
            return None;
        }
        loop {
            if self.ctx.shutdown.is_cancelled() {
                return self.finish("the server is shutting down; resume from your last cursor");
            }
            if let Some(decision) = self.backlog.pop_front() {
                if decision.cursor.position > self.last {
                    return Some(self.decision(&decision));
                }
                continue;
            }
            if self.catching_up {
                match self
                    .ctx
                    .log
                    .read_after(self.last, &self.filter, CATCH_UP_PAGE)
                    .await
                {
                    Ok(page) => {
                        self.catching_up = page.len() == CATCH_UP_PAGE;
                        self.backlog.extend(page);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the decision log for a subscriber failed");
                        return self.finish(
                            "the decision log is unavailable; resume from your last cursor",
                        );
                    }
                }
            }
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => {}
                received = self.subscription.rx.recv() => match received {
                    Some(decision) if decision.cursor.position > self.last => return Some(self.decision(&decision)),
                    Some(_) => {}
                    None => {
                        // The hub dropped us for lagging: register again, then catch up from the log.
                        tracing::debug!(last = self.last, "subscriber lagged; catching up from the decision log");
                        self.subscription = self.ctx.hub.subscribe(&self.filter).0;
                        self.catching_up = true;
                    }
                },
                _ = self.heartbeat.tick() => {
                    let head = self.ctx.hub.head();
                    if !self.subscription.rx.is_closed() && self.subscription.rx.is_empty() {
                        self.last = self.last.max(head);
                    }
                    let beat = proto::Heartbeat {
                        cursor: Cursor::new(self.ctx.log.log_id(), self.last).encode(),
                        at: Some(Micros::now().to_proto()),
                    };
                    return Some(Ok(proto::SubscribeDecisionsResponse { event: Some(Event::Heartbeat(beat)) }));
                }
            }
        }
    }

    fn decision(&mut self, decision: &RecordedDecision) -> StreamItem {
        self.last = decision.cursor.position;
        self.sent += 1;
        self.heartbeat.reset();
        Ok(proto::SubscribeDecisionsResponse {
            event: Some(Event::Decision(decision.to_proto())),
        })
    }

    fn finish(&mut self, message: &str) -> Option<StreamItem> {
        self.done = true;
        Some(Err(Status::unavailable(message)))
    }
}

impl Drop for DecisionStream {
    fn drop(&mut self) {
        metrics::gauge!("chargegate_subscribers").decrement(1.0);
        tracing::debug!(sent = self.sent, "decision stream closed");
    }
}
