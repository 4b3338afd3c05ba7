//! Admission: how many REST requests a node works on at once.
//!
//! A fixed bound (`NATTER_MAX_IN_FLIGHT`) keeps memory bounded but not
//! latency: at twice the rate the stores can take, every request waits
//! behind a queue of hundreds and nothing is refused. So the bound adapts
//! to the latency requests see (the idea of CoDel and of Netflix's
//! concurrency limits): every [`SAMPLE`] completed requests, the fastest
//! of them says whether a standing queue has formed. If even the fastest
//! took longer than `NATTER_OVERLOAD_LATENCY_MS`, the node admits fewer at
//! once, in proportion (target ÷ fastest, between a tenth and a half fewer;
//! never below [`FLOOR`]); otherwise, and after a second of light load, it
//! admits a quarter more again, up to `NATTER_MAX_IN_FLIGHT`. Requests
//! beyond the bound are answered
//! 503 `overloaded` with `Retry-After` at once, counted in
//! `natter_http_shed_total`, and the bound is the gauge
//! `natter_http_admission_limit`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Completed requests per decision.
pub const SAMPLE: usize = 16;
/// The bound never goes below this (or the configured maximum, if lower).
pub const FLOOR: usize = 8;
/// A window older than this without [`SAMPLE`] completions is light load:
/// it raises the bound.
const IDLE: Duration = Duration::from_secs(1);

pub struct Admission {
    /// `NATTER_MAX_IN_FLIGHT` (0: no bound at all).
    max: usize,
    /// `NATTER_OVERLOAD_LATENCY_MS` (zero: the bound stays at `max`).
    target: Duration,
    state: Mutex<State>,
}

struct State {
    limit: usize,
    in_flight: usize,
    window: Window,
}

struct Window {
    started: Instant,
    samples: usize,
    fastest: Duration,
}

impl Window {
    fn new(now: Instant) -> Window {
        Window { started: now, samples: 0, fastest: Duration::MAX }
    }
}

/// A request admitted: dropping it reports it done (taking `latency` from
/// the time it was admitted).
pub struct Ticket<'a> {
    admission: &'a Admission,
    admitted: Instant,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.admission.done(self.admitted, Instant::now());
    }
}

impl Admission {
    pub fn new(max: usize, target: Duration) -> Admission {
        let now = Instant::now();
        Admission { max, target, state: Mutex::new(State { limit: max, in_flight: 0, window: Window::new(now) }) }
    }

    /// The bound now (0: none).
    pub fn limit(&self) -> usize {
        self.state.lock().expect("admission lock").limit
    }

    /// Admits a request, or refuses it (`None`) when the node is at its bound.
    pub fn admit(&self) -> Option<Ticket<'_>> {
        let mut s = self.state.lock().expect("admission lock");
        if self.max > 0 && s.in_flight >= s.limit {
            return None;
        }
        s.in_flight += 1;
        Some(Ticket { admission: self, admitted: Instant::now() })
    }

    fn done(&self, admitted: Instant, now: Instant) {
        let mut s = self.state.lock().expect("admission lock");
        s.in_flight = s.in_flight.saturating_sub(1);
        if self.max == 0 || self.target.is_zero() {
            return;
        }
        let latency = now.saturating_duration_since(admitted);
        if now.saturating_duration_since(s.window.started) > IDLE && s.window.samples < SAMPLE {
            // Light load: fewer than SAMPLE requests in a second.
            s.limit = self.raised(s.limit);
            s.window = Window::new(now);
        }
        s.window.samples += 1;
        s.window.fastest = s.window.fastest.min(latency);
        if s.window.samples >= SAMPLE {
            let fastest = s.window.fastest;
            s.limit = if fastest > self.target { self.lowered(s.limit, fastest) } else { self.raised(s.limit) };
            s.window = Window::new(now);
        }
    }

    /// In proportion to how far over the target the fastest request was
    /// (a tenth to a half fewer at once).
    fn lowered(&self, limit: usize, fastest: Duration) -> usize {
        let factor = (self.target.as_secs_f64() / fastest.as_secs_f64()).clamp(0.5, 0.9);
        let lowered = ((limit as f64 * factor) as usize).min(limit.saturating_sub(1));
        let next = lowered.max(FLOOR.min(self.max));
        if next < limit {
            tracing::debug!(from = limit, to = next, fastest_ms = fastest.as_millis() as u64, "requests queue longer than NATTER_OVERLOAD_LATENCY_MS: admitting fewer at once");
        }
        next
    }

    fn raised(&self, limit: usize) -> usize {
        (limit + limit / 4 + 1).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Completes `n` requests that each took `latency`.
    fn complete(a: &Admission, n: usize, latency: Duration) {
        for _ in 0..n {
            let t = a.admit().expect("admitted");
            let admitted = t.admitted;
            std::mem::forget(t);
            a.done(admitted, admitted + latency);
        }
    }

    #[test]
    fn a_standing_queue_lowers_the_bound_and_a_fast_one_raises_it_again() {
        let a = Admission::new(512, Duration::from_millis(100));
        assert_eq!(a.limit(), 512);
        // Fewer than SAMPLE slow requests decide nothing.
        complete(&a, SAMPLE - 1, Duration::from_millis(300));
        assert_eq!(a.limit(), 512);
        complete(&a, 1, Duration::from_millis(300));
        assert_eq!(a.limit(), 256, "at three times the target: half as many (at most)");
        complete(&a, SAMPLE, Duration::from_millis(110));
        assert_eq!(a.limit(), 230, "just over it: a tenth fewer (at least)");
        // One fast request in the window means no standing queue.
        complete(&a, SAMPLE - 1, Duration::from_millis(300));
        complete(&a, 1, Duration::from_millis(5));
        assert_eq!(a.limit(), 288, "a quarter more");
        // Sustained: down to the floor, never below.
        complete(&a, SAMPLE * 100, Duration::from_millis(300));
        assert_eq!(a.limit(), FLOOR);
        // Recovery up to the configured maximum, never above.
        complete(&a, SAMPLE * 100, Duration::from_millis(5));
        assert_eq!(a.limit(), 512);
    }

    #[test]
    fn requests_beyond_the_bound_are_refused_and_come_back_when_done() {
        let a = Admission::new(2, Duration::ZERO);
        let (one, two) = (a.admit(), a.admit());
        assert!(one.is_some() && two.is_some());
        assert!(a.admit().is_none(), "at the bound");
        drop(one);
        assert!(a.admit().is_some(), "a place came back");
        drop(two);
        // No bound at all.
        let none = Admission::new(0, Duration::from_millis(1));
        let held: Vec<_> = (0..10_000).map(|_| none.admit().expect("no bound")).collect();
        drop(held);
        assert_eq!(none.limit(), 0);
    }

    #[test]
    fn a_small_configured_maximum_is_its_own_floor() {
        let a = Admission::new(2, Duration::from_millis(1));
        complete(&a, SAMPLE * 10, Duration::from_millis(50));
        assert_eq!(a.limit(), 2);
    }
}
