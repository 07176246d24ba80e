//! A circuit breaker for the remote authorizer, as a small state machine over explicit instants.
//!
//! Closed: calls go through; `failures` consecutive failures open it. Open: calls are refused
//! (UNKNOWN/`circuit_open`) until `cooldown` has passed; then one probe is let through (half-open).
//! The probe's success closes the circuit, its failure opens it for another cooldown.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; others are refused until it reports.
    HalfOpen,
}

impl State {
    /// The value of `chargegate_authorizer_circuit_state`: 0 closed, 1 open, 2 half-open.
    pub fn gauge(&self) -> f64 {
        match self {
            State::Closed { .. } => 0.0,
            State::Open { .. } => 1.0,
            State::HalfOpen => 2.0,
        }
    }
}

/// Whether a call may go ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Call,
    /// The half-open probe: its outcome decides the circuit.
    Probe,
    Refuse,
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    pub fn state(&self) -> State {
        *self.state.lock().expect("breaker lock")
    }

    pub fn admit(&self, now: Instant) -> Admission {
        let mut state = self.state.lock().expect("breaker lock");
        match *state {
            State::Closed { .. } => Admission::Call,
            State::Open { until } if now >= until => {
                self.transition(&mut state, State::HalfOpen);
                Admission::Probe
            }
            State::Open { .. } | State::HalfOpen => Admission::Refuse,
        }
    }

    pub fn on_success(&self) {
        let mut state = self.state.lock().expect("breaker lock");
        if *state != (State::Closed { failures: 0 }) {
            self.transition(&mut state, State::Closed { failures: 0 });
        }
    }

    pub fn on_failure(&self, now: Instant) {
        let mut state = self.state.lock().expect("breaker lock");
        let next = match *state {
            State::Closed { failures } if failures + 1 >= self.threshold => State::Open {
                until: now + self.cooldown,
            },
            State::Closed { failures } => State::Closed {
                failures: failures + 1,
            },
            State::HalfOpen => State::Open {
                until: now + self.cooldown,
            },
            open @ State::Open { .. } => open,
        };
        self.transition(&mut state, next);
    }

    fn transition(&self, state: &mut State, next: State) {
        let changed = std::mem::discriminant(state) != std::mem::discriminant(&next);
        *state = next;
        if changed {
            metrics::gauge!("chargegate_authorizer_circuit_state").set(next.gauge());
            match next {
                State::Open { .. } => tracing::warn!(
                    cooldown_ms = self.cooldown.as_millis() as u64,
                    "authorizer circuit opened"
                ),
                State::HalfOpen => {
                    tracing::info!("authorizer circuit half-open: letting one probe through")
                }
                State::Closed { .. } => tracing::info!("authorizer circuit closed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_probes_after_cooldown_and_closes_on_success() {
        let t0 = Instant::now();
        let b = Breaker::new(3, Duration::from_secs(30));
        b.on_failure(t0);
        b.on_failure(t0);
        b.on_success();
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.admit(t0), Admission::Call, "a success resets the count");
        b.on_failure(t0);
        assert_eq!(
            b.state(),
            State::Open {
                until: t0 + Duration::from_secs(30)
            }
        );
        assert_eq!(b.admit(t0 + Duration::from_secs(29)), Admission::Refuse);
        assert_eq!(b.admit(t0 + Duration::from_secs(30)), Admission::Probe);
        assert_eq!(
            b.admit(t0 + Duration::from_secs(30)),
            Admission::Refuse,
            "one probe at a time"
        );
        b.on_success();
        assert_eq!(b.state(), State::Closed { failures: 0 });
        assert_eq!(b.admit(t0 + Duration::from_secs(31)), Admission::Call);
    }

    #[test]
    fn a_failed_probe_opens_for_another_cooldown() {
        let t0 = Instant::now();
        let b = Breaker::new(1, Duration::from_secs(10));
        b.on_failure(t0);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.admit(t1), Admission::Probe);
        b.on_failure(t1);
        assert_eq!(
            b.state(),
            State::Open {
                until: t1 + Duration::from_secs(10)
            }
        );
        assert_eq!(b.admit(t1 + Duration::from_secs(5)), Admission::Refuse);
    }
}
