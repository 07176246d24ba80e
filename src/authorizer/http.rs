//! The remote authorizer (`authorizer = "http"`, CONTRACT §4).
//!
//! `POST authorizer_url` with `{"station_id", "driver_token", "request_id"}`. A 200 whose body is
//! `{"allowed": "ALLOWED" | "BLOCKED" | "EXPIRED" | "NO_CREDIT" | "NOT_ALLOWED"}` (OCPI AllowedType)
//! or `{"allowed": true | false}` decides; any other answer, a connection error, or no answer within
//! `authorize_timeout_ms` (connection included) is UNKNOWN (`authorizer_error` or `timeout`).
//! In front of the call: the decision cache (when `authorizer_cache_ttl_ms` is set), the circuit
//! breaker, and a cap on calls in flight, so a slow authorizer holds requests in the durable queue
//! rather than in memory. Redirects are never followed.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::Semaphore;
use url::Url;

use super::{
    AuthorizationRequest, Authorizer,
    breaker::{Admission, Breaker},
    cache::{self, DecisionCache},
};
use crate::{
    config::BreakerConfig,
    decision::{DecidedBy, Reason, Verdict},
};

/// Largest answer body read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

pub struct HttpAuthorizer {
    client: reqwest::Client,
    url: Url,
    timeout: Duration,
    breaker: Breaker,
    cache: Option<DecisionCache>,
    /// Calls in flight; a worker waits here (its request stays in the queue) when all are taken.
    in_flight: Arc<Semaphore>,
}

/// Why a call did not decide. Never carries the token.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("unreadable answer")]
    Answer,
    #[error("request failed: {0}")]
    Transport(String),
}

#[derive(Deserialize)]
struct Answer {
    allowed: Allowed,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Allowed {
    Flag(bool),
    Ocpi(String),
}

impl HttpAuthorizer {
    pub fn new(
        url: Url,
        timeout: Duration,
        breaker: &BreakerConfig,
        cache_ttl: Option<Duration>,
        max_in_flight: usize,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .pool_max_idle_per_host(max_in_flight)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()?;
        Ok(Self {
            client,
            url,
            timeout,
            breaker: Breaker::new(breaker.failures, breaker.cooldown),
            cache: cache_ttl.map(|ttl| DecisionCache::new(ttl, cache::CAPACITY)),
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
        })
    }

    async fn call(&self, request: &AuthorizationRequest<'_>) -> Result<Reason, CallError> {
        let body = serde_json::json!({
            "station_id": request.station_id,
            "driver_token": request.token.expose(),
            "request_id": request.request_id,
        });
        let mut response = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| CallError::Transport(transport_class(&e)))?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(CallError::Status(response.status().as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|n| n as usize > MAX_ANSWER_BYTES)
        {
            return Err(CallError::Answer);
        }
        // Read chunk by chunk: an answer of no announced length stops at the limit.
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| CallError::Transport(transport_class(&e)))?
        {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(CallError::Answer);
            }
            bytes.extend_from_slice(&chunk);
        }
        let answer: Answer = serde_json::from_slice(&bytes).map_err(|_| CallError::Answer)?;
        map_answer(answer.allowed).ok_or(CallError::Answer)
    }
}

/// The reason for an answer, or `None` for one outside the protocol.
fn map_answer(allowed: Allowed) -> Option<Reason> {
    Some(match allowed {
        Allowed::Flag(true) => Reason::Granted,
        Allowed::Flag(false) => Reason::NotAllowed,
        Allowed::Ocpi(s) => match s.as_str() {
            "ALLOWED" => Reason::Granted,
            "BLOCKED" => Reason::Blocked,
            "EXPIRED" => Reason::Expired,
            "NO_CREDIT" => Reason::NoCredit,
            "NOT_ALLOWED" => Reason::NotAllowed,
            _ => return None,
        },
    })
}

/// A short class for logs: what kind of failure, without the URL's query or any body.
fn transport_class(e: &reqwest::Error) -> String {
    let class = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_redirect() {
        "redirect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    };
    class.to_owned()
}

/// Reports a call's outcome to the breaker; a call dropped before it reported (the pipeline's
/// deadline cancelled it) counts as a failure.
struct Outcome<'a> {
    breaker: &'a Breaker,
    reported: bool,
}

impl Outcome<'_> {
    fn success(mut self) {
        self.reported = true;
        self.breaker.on_success();
    }

    fn failure(mut self) {
        self.reported = true;
        self.breaker.on_failure(Instant::now());
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.breaker.on_failure(Instant::now());
        }
    }
}

impl HttpAuthorizer {
    /// One call answered by `deadline`: its reason, or the failure's (`authorizer_error`,
    /// `timeout`) with why, in words that never hold the token.
    async fn ask(
        &self,
        request: &AuthorizationRequest<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<Reason, (Reason, String)> {
        match tokio::time::timeout_at(deadline, self.call(request)).await {
            Ok(Ok(reason)) => Ok(reason),
            Ok(Err(e)) => Err((
                Reason::AuthorizerError,
                format!("the remote authorizer failed: {e}"),
            )),
            Err(_) => Err((
                Reason::Timeout,
                format!(
                    "the remote authorizer did not answer within authorize_timeout_ms ({} ms)",
                    self.timeout.as_millis()
                ),
            )),
        }
    }
}

#[async_trait]
impl Authorizer for HttpAuthorizer {
    fn kind(&self) -> DecidedBy {
        DecidedBy::Http
    }

    async fn authorize(&self, request: AuthorizationRequest<'_>) -> Verdict {
        if let Some(cached) = self.authorize_at_once(request) {
            return cached;
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let Ok(_permit) = tokio::time::timeout_at(deadline, self.in_flight.acquire()).await else {
            return Verdict::new(Reason::Timeout, DecidedBy::Http);
        };
        if self.breaker.admit(Instant::now()) == Admission::Refuse {
            return Verdict::new(Reason::CircuitOpen, DecidedBy::Http);
        }
        let outcome = Outcome {
            breaker: &self.breaker,
            reported: false,
        };
        let reason = match self.ask(&request, deadline).await {
            Ok(reason) => {
                outcome.success();
                reason
            }
            Err((reason, why)) => {
                outcome.failure();
                tracing::debug!(error = %why, "the authorizer failed");
                reason
            }
        };
        if let Some(cache) = &self.cache {
            cache.put(
                request.station_id,
                request.fingerprint,
                reason,
                Instant::now(),
            );
        }
        Verdict::new(reason, DecidedBy::Http)
    }

    /// The cache's answer when it holds one; else the breaker's, when it is open; else a live
    /// call within the deadline. Neither the cache nor the breaker learns from it.
    async fn explain(&self, request: AuthorizationRequest<'_>) -> super::Explanation {
        let explained = |reason: Reason, by: DecidedBy, detail: String| super::Explanation {
            verdict: Verdict::new(reason, by),
            matched: Vec::new(),
            detail,
        };
        if let Some(cached) = self.authorize_at_once(request) {
            return explained(
                cached.reason,
                DecidedBy::Cache,
                format!(
                    "the decision cache holds the remote authorizer's answer ({}) for this token at this station",
                    cached.reason.as_str()
                ),
            );
        }
        if let super::breaker::State::Open { until } = self.breaker.state()
            && until > Instant::now()
        {
            return explained(
                Reason::CircuitOpen,
                DecidedBy::Http,
                "the remote authorizer's circuit is open after consecutive failures; it is not asked until the cooldown ends".into(),
            );
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        match self.ask(&request, deadline).await {
            Ok(reason) => explained(
                reason,
                DecidedBy::Http,
                format!(
                    "the remote authorizer answered {} just now",
                    reason.as_str()
                ),
            ),
            Err((reason, why)) => explained(reason, DecidedBy::Http, why),
        }
    }

    /// A cached answer, when the cache is on and holds one.
    fn authorize_at_once(&self, request: AuthorizationRequest<'_>) -> Option<Verdict> {
        let reason =
            self.cache
                .as_ref()?
                .get(request.station_id, request.fingerprint, Instant::now())?;
        let reason = if reason == Reason::Granted {
            Reason::Cached
        } else {
            reason
        };
        Some(Verdict::new(reason, DecidedBy::Cache))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_the_contract_reasons() {
        let parse = |body: &str| {
            serde_json::from_str::<Answer>(body)
                .ok()
                .and_then(|a| map_answer(a.allowed))
        };
        assert_eq!(parse(r#"{"allowed": "ALLOWED"}"#), Some(Reason::Granted));
        assert_eq!(parse(r#"{"allowed": "BLOCKED"}"#), Some(Reason::Blocked));
        assert_eq!(parse(r#"{"allowed": "EXPIRED"}"#), Some(Reason::Expired));
        assert_eq!(parse(r#"{"allowed": "NO_CREDIT"}"#), Some(Reason::NoCredit));
        assert_eq!(
            parse(r#"{"allowed": "NOT_ALLOWED"}"#),
            Some(Reason::NotAllowed)
        );
        assert_eq!(parse(r#"{"allowed": true}"#), Some(Reason::Granted));
        assert_eq!(parse(r#"{"allowed": false}"#), Some(Reason::NotAllowed));
        assert_eq!(parse(r#"{"allowed": "MAYBE"}"#), None);
        assert_eq!(parse(r#"{"allowed": 1}"#), None);
        assert_eq!(parse(r#"{"ok": true}"#), None);
        assert_eq!(parse("not json"), None);
    }
}
