//! Decisions as values: the statuses and reasons of CONTRACT §2, who made them, and the record the
//! decision log keeps. A NOT_ALLOWED or UNKNOWN decision is a value here, never an error.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::{cursor::Cursor, proto, token::Fingerprint};

/// The outcome of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Allowed,
    NotAllowed,
    Unknown,
    Invalid,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Allowed,
        Status::NotAllowed,
        Status::Unknown,
        Status::Invalid,
    ];

    /// The lower-case name used in storage, metrics labels and webhook bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Allowed => "allowed",
            Status::NotAllowed => "not_allowed",
            Status::Unknown => "unknown",
            Status::Invalid => "invalid",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The recorded status a proto status names (`None` for UNSPECIFIED and PENDING).
    pub fn from_proto(status: proto::DecisionStatus) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.to_proto() == status)
    }

    pub fn to_proto(self) -> proto::DecisionStatus {
        match self {
            Status::Allowed => proto::DecisionStatus::Allowed,
            Status::NotAllowed => proto::DecisionStatus::NotAllowed,
            Status::Unknown => proto::DecisionStatus::Unknown,
            Status::Invalid => proto::DecisionStatus::Invalid,
        }
    }
}

/// Why a decision came out as it did. Each reason belongs to exactly one [`Status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Granted,
    Cached,
    NoGrant,
    Blocked,
    Expired,
    NoCredit,
    NotAllowed,
    Timeout,
    AuthorizerError,
    CircuitOpen,
    TokenFormat,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::Granted,
        Reason::Cached,
        Reason::NoGrant,
        Reason::Blocked,
        Reason::Expired,
        Reason::NoCredit,
        Reason::NotAllowed,
        Reason::Timeout,
        Reason::AuthorizerError,
        Reason::CircuitOpen,
        Reason::TokenFormat,
    ];

    pub fn status(self) -> Status {
        match self {
            Reason::Granted | Reason::Cached => Status::Allowed,
            Reason::NoGrant
            | Reason::Blocked
            | Reason::Expired
            | Reason::NoCredit
            | Reason::NotAllowed => Status::NotAllowed,
            Reason::Timeout | Reason::AuthorizerError | Reason::CircuitOpen => Status::Unknown,
            Reason::TokenFormat => Status::Invalid,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Granted => "granted",
            Reason::Cached => "cached",
            Reason::NoGrant => "no_grant",
            Reason::Blocked => "blocked",
            Reason::Expired => "expired",
            Reason::NoCredit => "no_credit",
            Reason::NotAllowed => "not_allowed",
            Reason::Timeout => "timeout",
            Reason::AuthorizerError => "authorizer_error",
            Reason::CircuitOpen => "circuit_open",
            Reason::TokenFormat => "token_format",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Which part of chargegate made the decision (the `authorizer` of an audit record).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecidedBy {
    Acl,
    Http,
    Cache,
    /// The token failed the format check; no authorizer was asked.
    Format,
}

impl DecidedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Acl => "acl",
            DecidedBy::Http => "http",
            DecidedBy::Cache => "cache",
            DecidedBy::Format => "format",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            DecidedBy::Acl,
            DecidedBy::Http,
            DecidedBy::Cache,
            DecidedBy::Format,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// What an authorizer answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub reason: Reason,
    pub decided_by: DecidedBy,
}

impl Verdict {
    pub fn new(reason: Reason, decided_by: DecidedBy) -> Self {
        Self { reason, decided_by }
    }

    pub fn status(&self) -> Status {
        self.reason.status()
    }
}

/// Microseconds since the Unix epoch: how every timestamp is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(pub i64);

impl Micros {
    pub fn now() -> Self {
        Self::from_system_time(SystemTime::now())
    }

    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(d.as_micros().min(i64::MAX as u128) as i64),
            Err(e) => Self(-(e.duration().as_micros().min(i64::MAX as u128) as i64)),
        }
    }

    pub fn to_proto(self) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: self.0.div_euclid(1_000_000),
            nanos: (self.0.rem_euclid(1_000_000) * 1000) as i32,
        }
    }

    pub fn from_proto(t: &prost_types::Timestamp) -> Self {
        Self(
            t.seconds
                .saturating_mul(1_000_000)
                .saturating_add(i64::from(t.nanos) / 1000),
        )
    }

    /// RFC 3339 in UTC with microseconds, e.g. `2026-11-26T14:03:07.123456Z`.
    pub fn to_rfc3339(self) -> String {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1000)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default()
    }

    /// Whole milliseconds from `self` to `later`, zero when `later` is earlier.
    pub fn millis_until(self, later: Micros) -> u32 {
        (later.0.saturating_sub(self.0).max(0) / 1000).min(i64::from(u32::MAX)) as u32
    }
}

/// A decision about to be recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDecision {
    pub request_id: String,
    pub station_id: String,
    pub fingerprint: Fingerprint,
    pub verdict: Verdict,
    pub accepted_at: Micros,
    pub decided_at: Micros,
    /// 0 for a request's decision, 1 for its revision (CONTRACT §2a).
    pub revision: u32,
}

impl NewDecision {
    pub fn processing_time_ms(&self) -> u32 {
        self.accepted_at.millis_until(self.decided_at)
    }
}

/// A decision as the decision log recorded it, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedDecision {
    pub cursor: Cursor,
    pub decision: NewDecision,
}

impl RecordedDecision {
    pub fn station_id(&self) -> &str {
        &self.decision.station_id
    }

    pub fn to_proto(&self) -> proto::Decision {
        let d = &self.decision;
        proto::Decision {
            request_id: d.request_id.clone(),
            station_id: d.station_id.clone(),
            status: d.verdict.status().to_proto() as i32,
            reason: d.verdict.reason.as_str().to_owned(),
            driver_token_fingerprint: d.fingerprint.as_str().to_owned(),
            accepted_at: Some(d.accepted_at.to_proto()),
            decided_at: Some(d.decided_at.to_proto()),
            processing_time_ms: d.processing_time_ms(),
            cursor: self.cursor.encode(),
            revision: d.revision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_map_to_the_contract_statuses() {
        use Reason::*;
        let table = [
            (Granted, Status::Allowed),
            (Cached, Status::Allowed),
            (NoGrant, Status::NotAllowed),
            (Blocked, Status::NotAllowed),
            (Expired, Status::NotAllowed),
            (NoCredit, Status::NotAllowed),
            (NotAllowed, Status::NotAllowed),
            (Timeout, Status::Unknown),
            (AuthorizerError, Status::Unknown),
            (CircuitOpen, Status::Unknown),
            (TokenFormat, Status::Invalid),
        ];
        for (reason, status) in table {
            assert_eq!(reason.status(), status, "{reason:?}");
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
        }
    }

    #[test]
    fn timestamps_round_trip_through_proto() {
        for us in [0, 1, 1_700_000_000_123_456, -1] {
            assert_eq!(Micros::from_proto(&Micros(us).to_proto()), Micros(us));
        }
    }
}
