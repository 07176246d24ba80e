//! The webhook bridge: a decision whose request named a `callback_url` is POSTed there (CONTRACT §3).
//!
//! - [`WebhookOutbox`] is the port: the pending deliveries, written in the same transaction that
//!   records the decision (see `store::sqlite`), with every attempt recorded. [`sqlite`] implements
//!   it on the embedded store.
//! - [`deliver`] is the engine that takes due deliveries from the outbox and sends them.
//! - [`policy`] decides, as a pure function, whether and when an attempt is retried.
//! - [`signer`] writes Standard Webhooks signatures; [`guard`] keeps deliveries off private networks.
//!
//! The plain driver token is in the body the receiver asked for, so it lives in the pending
//! delivery. It is erased when the delivery is delivered, and a dead delivery keeps it only for
//! `webhook_max_age_ms` (so it can be redriven) before it is erased too.

pub mod deliver;
pub mod guard;
pub mod policy;
pub mod postgres;
pub mod signer;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::{
    decision::{Micros, Reason, Status},
    store::StoreError,
    token::DriverToken,
};

pub use self::policy::Next;

/// The callback of a decided request, handed to the store with the decision.
#[derive(Clone, Debug)]
pub struct Callback {
    pub url: String,
    /// `host:port`: deliveries are limited per destination.
    pub host: String,
    pub token: DriverToken,
}

impl Callback {
    /// `None` when the URL has no host (intake refuses those, so only a corrupted row has one).
    pub fn new(url: &str, token: DriverToken) -> Option<Self> {
        let parsed = url::Url::parse(url).ok()?;
        let host = format!(
            "{}:{}",
            parsed.host_str()?,
            parsed.port_or_known_default().unwrap_or(0)
        );
        Some(Self {
            url: url.to_owned(),
            host,
            token,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryState {
    Pending,
    Delivered,
    Dead,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Delivered, Self::Dead]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// The `webhook-id` of a decision's delivery: the request_id, and for a revision
/// `<request_id>.r<revision>` (CONTRACT §2a). Deliveries are stored under it.
pub fn webhook_id(request_id: &str, revision: u32) -> String {
    match revision {
        0 => request_id.to_owned(),
        n => format!("{request_id}.r{n}"),
    }
}

/// A pending delivery, as the engine sends it.
#[derive(Clone, Debug)]
pub struct DueDelivery {
    pub request_id: String,
    pub station_id: String,
    pub callback_url: String,
    pub host: String,
    pub token: DriverToken,
    pub status: Status,
    pub reason: Reason,
    pub decided_at: Micros,
    /// Attempts made since the delivery was created or last redriven.
    pub attempts: u32,
    pub next_attempt_at: Micros,
    /// Its place in the outbox: with `next_attempt_at`, the order deliveries are read in.
    pub seq: i64,
    /// Where `webhook_max_age_ms` counts from: the decision, or the last redrive.
    pub age_from: Micros,
    /// 1 for a revision's delivery: `request_id` is then its webhook id, `<request_id>.r1`.
    pub revision: u32,
}

/// The JSON body of CONTRACT §3, with the decision's reason and time added.
#[derive(Serialize)]
pub struct Body<'a> {
    pub station_id: &'a str,
    pub driver_token: &'a str,
    pub status: &'static str,
    pub request_id: &'a str,
    pub reason: &'static str,
    pub decided_at: String,
    /// Present (`1`) only on a revision (CONTRACT §2a).
    #[serde(skip_serializing_if = "is_zero")]
    pub revision: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl DueDelivery {
    /// The request the decision is about: the webhook id without a revision's `.r<n>`.
    pub fn decided_request_id(&self) -> &str {
        match self.revision {
            0 => &self.request_id,
            n => self
                .request_id
                .strip_suffix(&format!(".r{n}"))
                .unwrap_or(&self.request_id),
        }
    }

    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&Body {
            station_id: &self.station_id,
            driver_token: self.token.expose(),
            status: self.status.as_str(),
            request_id: self.decided_request_id(),
            reason: self.reason.as_str(),
            decided_at: self.decided_at.to_rfc3339(),
            revision: self.revision,
        })
        .expect("the body serializes")
    }
}

/// One recorded attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub at: Micros,
    /// `delivered`, `retry` or `dead`.
    pub outcome: String,
    pub http_status: Option<u16>,
    pub latency_ms: u32,
    /// Empty for a 2xx; `http_status`, `timeout`, `connect`, `request` or `refused_destination`.
    pub error_class: String,
}

/// An attempt and what follows it, ready to be recorded.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The delivery's row (`DueDelivery::seq`).
    pub seq: i64,
    pub attempt: Attempt,
    pub next: Next,
    /// Empty once delivered; otherwise what went wrong, without the URL or the token.
    pub last_error: String,
}

/// A delivery as operators see it (`ListDeliveries`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryView {
    pub request_id: String,
    pub station_id: String,
    pub callback_url: String,
    pub state: DeliveryState,
    pub next_attempt_at: Option<Micros>,
    pub last_error: String,
    pub history: Vec<Attempt>,
}

/// The outbox of pending webhook deliveries. Deliveries are added by the store in the transaction
/// that records their decision; this port is what the engine and the `Webhooks` service need.
#[async_trait]
pub trait WebhookOutbox: Send + Sync + 'static {
    /// Claims the deliveries due now, in the order they are due, after `after` (a
    /// `(next_attempt_at, seq)` position), leaving out the hosts named. A claimed delivery is this
    /// caller's until its attempt is recorded or `lease` ends, so two instances never send one
    /// delivery at once. The answer also holds pending deliveries not due yet, unclaimed, so the
    /// caller learns when to look again.
    async fn claim_due(
        &self,
        skip_hosts: Vec<String>,
        after: Option<(Micros, i64)>,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<DueDelivery>, StoreError>;

    /// Records attempts and what follows each, in one write. Delivered erases the token.
    async fn record(&self, outcomes: Vec<Outcome>) -> Result<(), StoreError>;

    /// Newest first; `None` lists every state.
    async fn list(
        &self,
        state: Option<DeliveryState>,
        limit: usize,
    ) -> Result<Vec<DeliveryView>, StoreError>;

    /// Dead deliveries (all of them when `request_ids` is empty) back to pending, due now, with
    /// their attempt count and age reset. Those whose token was already erased stay dead.
    async fn redrive(&self, request_ids: Vec<String>, now: Micros) -> Result<u32, StoreError>;

    /// Erases the tokens of deliveries that died before `before`. Returns how many.
    async fn erase_dead_tokens(&self, before: Micros) -> Result<u64, StoreError>;
}

/// The `history` column: one `[at_us, outcome, http_status, latency_ms, error_class]` per line.
pub(crate) fn parse_history(lines: &str) -> Option<Vec<Attempt>> {
    type Row = (i64, String, Option<u16>, u32, String);
    lines
        .lines()
        .map(|line| {
            let (at, outcome, http_status, latency_ms, error_class): Row =
                serde_json::from_str(line).ok()?;
            Some(Attempt {
                at: Micros(at),
                outcome,
                http_status,
                latency_ms,
                error_class,
            })
        })
        .collect()
}

/// A `history` line for `attempt`.
pub(crate) fn history_line(a: &Attempt) -> String {
    serde_json::to_string(&(
        a.at.0,
        &a.outcome,
        a.http_status,
        a.latency_ms,
        &a.error_class,
    ))
    .expect("a tuple serializes")
        + "\n"
}
