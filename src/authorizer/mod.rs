//! The authorizer port: given a station and a driver token, allowed or not, and why.
//!
//! Implementations: [`acl::AccessList`] (the embedded access list) and [`http::HttpAuthorizer`]
//! (a remote authorizer, with its [`breaker`] and [`cache`]). Another (gRPC, OCPI) is a new file
//! implementing [`Authorizer`]. The deadline (`authorize_timeout_ms`) and the
//! token format check are applied by the pipeline around every implementation, not inside them.

pub mod acl;
pub mod breaker;
pub mod cache;
pub mod http;

use async_trait::async_trait;

use crate::{
    decision::{DecidedBy, Verdict},
    token::{DriverToken, Fingerprint},
};

/// What an authorizer is asked. Borrowed from the queued request; the token is only exposed to it.
#[derive(Debug, Clone, Copy)]
pub struct AuthorizationRequest<'a> {
    pub request_id: &'a str,
    /// Canonical (lower-case) station id.
    pub station_id: &'a str,
    pub token: &'a DriverToken,
    pub fingerprint: &'a Fingerprint,
}

#[async_trait]
pub trait Authorizer: Send + Sync + 'static {
    /// Who this authorizer is in audit records, including when it misses its deadline.
    fn kind(&self) -> DecidedBy;

    /// Decides one request. Failures are verdicts (`UNKNOWN`/`authorizer_error`), not errors.
    async fn authorize(&self, request: AuthorizationRequest<'_>) -> Verdict;

    /// The verdict, when this authorizer can give it at once from memory, without waiting for
    /// anything. The intake then records the request together with its decision, and the request
    /// never waits in the queue (see `decide::at_once`). `None` (the default) sends it through the
    /// queue to [`authorize`](Authorizer::authorize).
    fn authorize_at_once(&self, _request: AuthorizationRequest<'_>) -> Option<Verdict> {
        None
    }

    /// The verdict this authorizer would give now, and why, changing nothing: no cache entry,
    /// no breaker count. The default asks [`authorize`](Authorizer::authorize).
    async fn explain(&self, request: AuthorizationRequest<'_>) -> Explanation {
        let verdict = self.authorize(request).await;
        Explanation {
            detail: format!("the authorizer answered {}", verdict.reason.as_str()),
            verdict,
            matched: Vec::new(),
        }
    }
}

/// A verdict with its reasons (`ExplainDecision`).
#[derive(Debug, Clone)]
pub struct Explanation {
    pub verdict: Verdict,
    /// Grants of the access list for the token: the station's and the `*` one.
    pub matched: Vec<(String, acl::Grant)>,
    /// Why, in words.
    pub detail: String,
}
