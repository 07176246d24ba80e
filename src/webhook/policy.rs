//! When to try a delivery again: a pure function of what the last attempt got, how many attempts
//! were made, the clock and a random draw, so every branch is unit-tested without a network.
//!
//! Exponential backoff with full jitter (`webhook_backoff_base_ms`, doubling, capped at
//! `webhook_backoff_max_ms`); a 429 or a timeout waits at least the base; `Retry-After` (seconds or
//! an HTTP date) is honoured, clamped to the cap. Bounded by `webhook_max_attempts` and by
//! `webhook_max_age_ms` counted from the decision (or from a redrive).

use std::time::{Duration, SystemTime};

use crate::decision::Micros;

/// The limits of [`crate::config::WebhookConfig`] that the policy needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
    pub max_attempts: u32,
    pub max_age: Duration,
}

/// What one attempt got from the receiver (or the network).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptResult {
    /// A response with this status; `retry_after` when it carried a readable `Retry-After`.
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    /// No response within `webhook_timeout_ms`.
    Timeout,
    /// Connecting or sending failed (refused, reset, TLS).
    Network,
    /// The destination is not allowed (SSRF guard) or the URL cannot be used: never retried.
    Refused,
}

/// What happens to the delivery after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Delivered,
    RetryAt(Micros),
    Dead(DeadReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadReason {
    /// A status that retrying cannot change (a 3xx, or a 4xx other than 408/425/429).
    Permanent,
    Refused,
    MaxAttempts,
    MaxAge,
}

impl DeadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permanent => "permanent_status",
            Self::Refused => "refused_destination",
            Self::MaxAttempts => "max_attempts",
            Self::MaxAge => "max_age",
        }
    }
}

impl AttemptResult {
    fn retryable(self) -> bool {
        match self {
            Self::Status { code, .. } => matches!(code, 408 | 425 | 429 | 500..=599),
            Self::Timeout | Self::Network => true,
            Self::Refused => false,
        }
    }
}

impl RetryPolicy {
    /// The fate of a delivery whose attempt number `attempt` (1 for the first) got `result` at
    /// `now`. `age_from` is when its clock started; `jitter` is a uniform draw from [0, 1).
    pub fn next(
        &self,
        result: AttemptResult,
        attempt: u32,
        now: Micros,
        age_from: Micros,
        jitter: f64,
    ) -> Next {
        if let AttemptResult::Status {
            code: 200..=299, ..
        } = result
        {
            return Next::Delivered;
        }
        if result == AttemptResult::Refused {
            return Next::Dead(DeadReason::Refused);
        }
        if !result.retryable() {
            return Next::Dead(DeadReason::Permanent);
        }
        if attempt >= self.max_attempts {
            return Next::Dead(DeadReason::MaxAttempts);
        }
        let delay = self.delay(result, attempt, jitter);
        let at = Micros(now.0.saturating_add(delay.as_micros() as i64));
        let deadline = Micros(age_from.0.saturating_add(self.max_age.as_micros() as i64));
        if at.0 > deadline.0 {
            return Next::Dead(DeadReason::MaxAge);
        }
        Next::RetryAt(at)
    }

    /// The pause before attempt `attempt + 1`.
    fn delay(&self, result: AttemptResult, attempt: u32, jitter: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(32);
        let ceiling = self
            .base
            .saturating_mul(1u32 << exponent.min(31))
            .min(self.max);
        let jittered = ceiling.mul_f64(jitter.clamp(0.0, 1.0));
        let floor = match result {
            // The receiver asked for room, or could not answer in time: do not come back at once.
            AttemptResult::Status { code: 429, .. } | AttemptResult::Timeout => {
                self.base.min(self.max)
            }
            _ => Duration::ZERO,
        };
        let asked = match result {
            AttemptResult::Status {
                retry_after: Some(d),
                ..
            } => d.min(self.max),
            _ => Duration::ZERO,
        };
        jittered.max(floor).max(asked)
    }
}

/// Reads a `Retry-After` value: delay-seconds or an HTTP date (a date in the past is zero).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        base: Duration::from_millis(1000),
        max: Duration::from_millis(600_000),
        max_attempts: 10,
        max_age: Duration::from_millis(3_600_000),
    };
    const NOW: Micros = Micros(1_000_000_000_000);

    fn status(code: u16) -> AttemptResult {
        AttemptResult::Status {
            code,
            retry_after: None,
        }
    }

    fn delay_of(next: Next) -> Duration {
        match next {
            Next::RetryAt(at) => Duration::from_micros((at.0 - NOW.0) as u64),
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn classifies_statuses_and_failures() {
        for code in [200, 201, 204, 299] {
            assert_eq!(
                POLICY.next(status(code), 1, NOW, NOW, 0.5),
                Next::Delivered,
                "{code}"
            );
        }
        for code in [408, 425, 429, 500, 502, 503, 599] {
            assert!(
                matches!(
                    POLICY.next(status(code), 1, NOW, NOW, 0.5),
                    Next::RetryAt(_)
                ),
                "{code}"
            );
        }
        for code in [
            300, 301, 302, 304, 307, 308, 400, 401, 403, 404, 410, 422, 499, 100,
        ] {
            assert_eq!(
                POLICY.next(status(code), 1, NOW, NOW, 0.5),
                Next::Dead(DeadReason::Permanent),
                "{code}"
            );
        }
        assert!(matches!(
            POLICY.next(AttemptResult::Timeout, 1, NOW, NOW, 0.5),
            Next::RetryAt(_)
        ));
        assert!(matches!(
            POLICY.next(AttemptResult::Network, 1, NOW, NOW, 0.5),
            Next::RetryAt(_)
        ));
        assert_eq!(
            POLICY.next(AttemptResult::Refused, 1, NOW, NOW, 0.5),
            Next::Dead(DeadReason::Refused)
        );
    }

    #[test]
    fn backoff_doubles_with_full_jitter_up_to_the_cap() {
        // jitter 1.0 shows the ceiling: base, 2·base, 4·base, … capped.
        let ceilings: Vec<u64> = (1..=9)
            .map(|n| delay_of(POLICY.next(status(503), n, NOW, NOW, 1.0)).as_millis() as u64)
            .collect();
        assert_eq!(
            ceilings,
            [1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 256000]
        );
        let capped = RetryPolicy {
            max_attempts: 100,
            max_age: Duration::from_secs(1 << 20),
            ..POLICY
        };
        assert_eq!(
            delay_of(capped.next(status(503), 40, NOW, NOW, 1.0)),
            POLICY.max
        );
        // Full jitter: anywhere from zero to the ceiling.
        assert_eq!(
            delay_of(POLICY.next(status(503), 3, NOW, NOW, 0.0)),
            Duration::ZERO
        );
        assert_eq!(
            delay_of(POLICY.next(status(503), 3, NOW, NOW, 0.25)),
            Duration::from_millis(1000)
        );
    }

    #[test]
    fn rate_limits_and_timeouts_wait_at_least_the_base() {
        assert_eq!(
            delay_of(POLICY.next(status(429), 1, NOW, NOW, 0.0)),
            POLICY.base
        );
        assert_eq!(
            delay_of(POLICY.next(AttemptResult::Timeout, 1, NOW, NOW, 0.0)),
            POLICY.base
        );
        assert_eq!(
            delay_of(POLICY.next(status(500), 1, NOW, NOW, 0.0)),
            Duration::ZERO
        );
    }

    #[test]
    fn retry_after_is_honoured_and_clamped() {
        let asked = |secs| AttemptResult::Status {
            code: 503,
            retry_after: Some(Duration::from_secs(secs)),
        };
        assert_eq!(
            delay_of(POLICY.next(asked(30), 1, NOW, NOW, 0.0)),
            Duration::from_secs(30)
        );
        // Never more than the cap, whatever the receiver asks.
        assert_eq!(
            delay_of(POLICY.next(asked(86_400 * 365), 1, NOW, NOW, 0.0)),
            POLICY.max
        );
        // A shorter Retry-After does not shorten the backoff.
        assert_eq!(
            delay_of(POLICY.next(asked(0), 4, NOW, NOW, 1.0)),
            Duration::from_secs(8)
        );
    }

    #[test]
    fn attempts_and_age_are_bounded() {
        assert!(matches!(
            POLICY.next(status(503), 9, NOW, NOW, 0.0),
            Next::RetryAt(_)
        ));
        assert_eq!(
            POLICY.next(status(503), 10, NOW, NOW, 0.0),
            Next::Dead(DeadReason::MaxAttempts)
        );
        // Decided 59 minutes ago: a 2-minute pause would pass the hour.
        let decided = Micros(NOW.0 - 59 * 60 * 1_000_000);
        let asked = AttemptResult::Status {
            code: 503,
            retry_after: Some(Duration::from_secs(120)),
        };
        assert_eq!(
            POLICY.next(asked, 2, NOW, decided, 0.0),
            Next::Dead(DeadReason::MaxAge)
        );
        assert!(matches!(
            POLICY.next(status(503), 2, NOW, decided, 0.0),
            Next::RetryAt(_)
        ));
    }

    #[test]
    fn parses_retry_after_in_both_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        // Sun, 06 Nov 1994 08:49:37 GMT is 784111777.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
