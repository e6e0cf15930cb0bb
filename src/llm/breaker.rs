//! A circuit breaker on the LLM endpoint.

use std::sync::Mutex;
use std::time::Instant;

use super::config::BreakerConfig;

/// Counts failed calls in a row; opens after too many, lets one call through after a while.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: Mutex::default(),
        }
    }

    /// Whether a call may go out at `now`. While open, no; once `open_for` has passed, exactly one
    /// probe call until its result is known.
    pub fn admit(&self, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.open_until {
            None => true,
            Some(until) if now >= until && !s.probing => {
                s.probing = true;
                true
            }
            Some(_) => false,
        }
    }

    /// Records a call's result at `now`.
    pub fn record(&self, ok: bool, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.probing = false;
        if ok {
            s.failures = 0;
            s.open_until = None;
            return;
        }
        s.failures += 1;
        if s.failures >= self.config.failures {
            s.open_until = Some(now + self.config.open_for);
        }
    }

    /// Whether the breaker is open at `now`.
    pub fn is_open(&self, now: Instant) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.open_until.is_some_and(|u| now < u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn opens_after_failures_in_a_row_and_probes_once() {
        let b = Breaker::new(BreakerConfig {
            failures: 2,
            open_for: Duration::from_secs(10),
        });
        let t0 = Instant::now();
        assert!(b.admit(t0));
        b.record(false, t0);
        b.record(true, t0);
        b.record(false, t0);
        assert!(b.admit(t0), "one failure after a success does not open it");
        b.record(false, t0);
        assert!(!b.admit(t0 + Duration::from_secs(9)));
        let later = t0 + Duration::from_secs(10);
        assert!(b.admit(later), "the probe goes through");
        assert!(!b.admit(later), "only one probe at a time");
        b.record(false, later);
        assert!(
            !b.admit(later + Duration::from_secs(1)),
            "a failed probe opens it again"
        );
        let again = later + Duration::from_secs(10);
        assert!(b.admit(again));
        b.record(true, again);
        assert!(b.admit(again) && b.admit(again), "a good probe closes it");
    }
}
