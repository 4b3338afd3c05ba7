//! Admission: how many REST requests a node works on at once.
//!
//! A fixed bound (`NATTER_MAX_IN_FLIGHT`) keeps memory bounded but not
//! latency: at twice the rate the stores can take, every request waits
//! behind a queue of hundreds and nothing is refused. So the bound adapts
//! to the latency requests see (the idea of CoDel and of Netflix's
//! concurrency limits). Latency is sampled from work only: `/api` requests
//! other than sign-up and login (argon2id is slow by design), answered 2xx
//! or 5xx, timed from when their body had arrived (a slow upload is the
//! client's time), not timed out or abandoned. Decisions are taken per
//! window of [`SAMPLE`] samples, or when a window has lasted
//! `NATTER_OVERLOAD_WINDOW_MS` (1 s) with fewer:
//!
//! - if even the fastest sample took longer than
//!   `NATTER_OVERLOAD_LATENCY_MS`, requests are queueing: the node admits
//!   fewer at once, in proportion (target ÷ fastest, between a tenth and a
//!   half fewer), never below 8 (or `NATTER_MAX_IN_FLIGHT` if lower);
//! - otherwise (a fast sample, none at all, or fewer than [`FEW`] slow
//!   ones in a window cut short while the node was less than half full)
//!   it admits a quarter more, and a quarter more per further window that
//!   passed, up to `NATTER_MAX_IN_FLIGHT`. An idle node is
//!   back at the maximum after a few seconds, and requests that hold their
//!   places without finishing (stalled clients) cannot keep the bound down.
//!
//! Requests beyond the bound are answered 503 `overloaded` with
//! `Retry-After` at once, counted in `natter_http_shed_total`; the bound is
//! the gauge `natter_http_admission_limit`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;

fn shown(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Samples per decision.
pub const SAMPLE: usize = 16;
/// Samples a window cut short by its time needs to lower the bound.
pub const FEW: usize = 4;
/// The bound never goes below this (or the configured maximum, if lower).
pub const FLOOR: usize = 8;

pub struct Admission {
    /// `NATTER_MAX_IN_FLIGHT` (0: no bound at all).
    max: usize,
    /// `NATTER_OVERLOAD_LATENCY_MS` (zero: the bound stays at `max`).
    target: Duration,
    /// `NATTER_OVERLOAD_WINDOW_MS`: the longest a window lasts.
    window: Duration,
    gauge: Gauge,
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

/// A request admitted. [`Ticket::sample`] reports how long its work took;
/// dropping it without (timed out, abandoned, not work) only gives its
/// place back.
pub struct Ticket<'a> {
    admission: &'a Admission,
    latency: Option<Duration>,
}

impl Ticket<'_> {
    pub fn sample(mut self, latency: Duration) {
        self.latency = Some(latency);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.admission.done(self.latency, Instant::now());
    }
}

impl Admission {
    /// `gauge` shows the bound.
    pub fn new(max: usize, target: Duration, window: Duration, gauge: Gauge) -> Admission {
        gauge.set(shown(max));
        let state = State { limit: max, in_flight: 0, window: Window::new(Instant::now()) };
        Admission { max, target, window, gauge, state: Mutex::new(state) }
    }

    fn adapts(&self) -> bool {
        self.max > 0 && !self.target.is_zero()
    }

    /// The bound now (0: none).
    #[cfg(test)]
    fn limit(&self) -> usize {
        self.state.lock().expect("admission lock").limit
    }

    /// Admits a request, or refuses it (`None`) when the node is at its bound.
    pub fn admit(&self) -> Option<Ticket<'_>> {
        let mut s = self.state.lock().expect("admission lock");
        if self.adapts() {
            self.age_out(&mut s, Instant::now());
        }
        if self.max > 0 && s.in_flight >= s.limit {
            return None;
        }
        s.in_flight += 1;
        Some(Ticket { admission: self, latency: None })
    }

    fn done(&self, latency: Option<Duration>, now: Instant) {
        let mut s = self.state.lock().expect("admission lock");
        s.in_flight = s.in_flight.saturating_sub(1);
        if !self.adapts() {
            return;
        }
        self.age_out(&mut s, now);
        let Some(latency) = latency else { return };
        s.window.samples += 1;
        s.window.fastest = s.window.fastest.min(latency);
        if s.window.samples >= SAMPLE {
            self.decide(&mut s, true, now);
        }
    }

    /// A window that has lasted its time is decided on what it holds;
    /// every further window that passed without a request raises the bound.
    fn age_out(&self, s: &mut State, now: Instant) {
        let age = now.saturating_duration_since(s.window.started);
        if age >= self.window {
            let windows = (age.as_nanos() / self.window.as_nanos().max(1)).min(32) as u32;
            self.decide(s, false, now);
            for _ in 1..windows {
                s.limit = self.raised(s.limit);
            }
            self.gauge.set(shown(s.limit));
        }
    }

    /// Lowers the bound if the window's fastest sample was over the target
    /// (a window cut short by its time only with [`FEW`] samples or more,
    /// or with the node half full: one slow request at light load is not a
    /// queue); else raises it.
    fn decide(&self, s: &mut State, full: bool, now: Instant) {
        let fastest = s.window.fastest;
        let evidence = full || s.window.samples >= FEW || s.in_flight >= s.limit / 2;
        let next = if s.window.samples > 0 && fastest > self.target && evidence { self.lowered(s.limit, fastest) } else { self.raised(s.limit) };
        s.limit = next;
        s.window = Window::new(now);
        self.gauge.set(shown(next));
    }

    fn raised(&self, limit: usize) -> usize {
        limit.saturating_add(limit / 4 + 1).min(self.max)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    /// Completes `n` requests whose work took `latency`.
    fn complete(a: &Admission, n: usize, latency: Duration) {
        for _ in 0..n {
            a.admit().expect("admitted").sample(latency);
        }
    }

    #[test]
    fn a_standing_queue_lowers_the_bound_and_a_fast_one_raises_it_again() {
        let gauge = Gauge::default();
        let a = Admission::new(512, Duration::from_millis(100), LONG, gauge.clone());
        assert_eq!((a.limit(), gauge.get()), (512, 512));
        // Fewer than SAMPLE slow requests decide nothing.
        complete(&a, SAMPLE - 1, Duration::from_millis(300));
        assert_eq!(a.limit(), 512);
        complete(&a, 1, Duration::from_millis(300));
        assert_eq!((a.limit(), gauge.get()), (256, 256), "at three times the target: half as many (at most)");
        complete(&a, SAMPLE, Duration::from_millis(110));
        assert_eq!(a.limit(), 230, "just over it: a tenth fewer (at least)");
        // One fast request in the window means no standing queue.
        complete(&a, SAMPLE - 1, Duration::from_millis(300));
        complete(&a, 1, Duration::from_millis(5));
        assert_eq!(a.limit(), 288, "a quarter more");
        // Requests that are not work (dropped without a sample) decide nothing.
        for _ in 0..100 {
            drop(a.admit());
        }
        assert_eq!(a.limit(), 288);
        // Sustained: down to the floor, never below.
        complete(&a, SAMPLE * 100, Duration::from_millis(300));
        assert_eq!((a.limit(), gauge.get()), (FLOOR, FLOOR as i64));
        // Recovery up to the configured maximum, never above.
        complete(&a, SAMPLE * 100, Duration::from_millis(5));
        assert_eq!(a.limit(), 512);
    }

    #[test]
    fn a_window_that_lasts_its_time_is_decided_on_what_it_holds() {
        let a = Admission::new(512, Duration::from_millis(100), Duration::from_millis(1), Gauge::default());
        // A slow sample alone, then the window's time passes: lowered.
        let now = Instant::now();
        {
            let mut s = a.state.lock().unwrap();
            // One slow sample at light load is not a queue: raised.
            s.limit = 256;
            s.window.samples = 1;
            s.window.fastest = Duration::from_millis(500);
            s.window.started = now - Duration::from_millis(1);
            a.age_out(&mut s, now);
            assert_eq!(s.limit, 321);
            // Four are: lowered, then a quarter more per idle window after it.
            s.window.samples = FEW;
            s.window.fastest = Duration::from_millis(500);
            s.window.started = now - Duration::from_millis(1);
            a.age_out(&mut s, now);
            assert_eq!(s.limit, 160);
            s.limit = 256;
            s.window.samples = FEW;
            s.window.fastest = Duration::from_millis(500);
            s.window.started = now - Duration::from_millis(2);
            a.age_out(&mut s, now);
            assert_eq!(s.limit, 161, "halved, then one idle window: 128 → 161");
            // Nothing completed for three windows (idle, or stalled
            // clients holding their places): a quarter more per window.
            s.limit = 8;
            s.window = Window::new(now - Duration::from_millis(3));
            a.age_out(&mut s, now);
            assert_eq!(s.limit, 18, "8 → 11 → 14 → 18");
            // Long idle: back to the maximum, never beyond.
            s.window = Window::new(now - Duration::from_secs(10));
            a.age_out(&mut s, now);
            assert_eq!(s.limit, 512);
        }
    }

    #[test]
    fn requests_beyond_the_bound_are_refused_and_come_back_when_done() {
        let a = Admission::new(2, Duration::ZERO, LONG, Gauge::default());
        let (one, two) = (a.admit(), a.admit());
        assert!(one.is_some() && two.is_some());
        assert!(a.admit().is_none(), "at the bound");
        drop(one);
        assert!(a.admit().is_some(), "a place came back");
        drop(two);
        // No bound at all.
        let none = Admission::new(0, Duration::from_millis(1), LONG, Gauge::default());
        let held: Vec<_> = (0..10_000).map(|_| none.admit().expect("no bound")).collect();
        drop(held);
        assert_eq!(none.limit(), 0);
        // A huge maximum does not overflow.
        let huge = Admission::new(usize::MAX, Duration::from_millis(100), LONG, Gauge::default());
        complete(&huge, SAMPLE, Duration::from_millis(1));
        assert_eq!(huge.limit(), usize::MAX);
    }

    #[test]
    fn a_small_configured_maximum_is_its_own_floor() {
        let a = Admission::new(2, Duration::from_millis(1), LONG, Gauge::default());
        complete(&a, SAMPLE * 10, Duration::from_millis(50));
        assert_eq!(a.limit(), 2);
    }
}
