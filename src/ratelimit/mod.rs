//! Rate limits: no client may flood natter or guess passwords.
//!
//! - **Shared across nodes** where abuse spans them — login attempts per
//!   IP, failed logins per account and per IP, registrations per IP —
//!   counted in fixed windows in a [`Counter`] every node shares (Redis,
//!   [`redis::RedisCounter`]; in-process when embedded,
//!   [`MemoryCounter`]). A client that spreads its guesses over the nodes
//!   behind a load balancer gets no more of them.
//! - **Per node, per account** — sends, room changes — with token buckets
//!   (`governor`): a burst, then a steady rate. A user's requests land on
//!   a few nodes at most, so the cluster-wide rate is a small multiple.
//!
//! Over a limit a client gets 429 `rate_limited` with `Retry-After`.
//! Nothing here grows without bound: windows expire, and idle buckets are
//! dropped by [`RateLimits::housekeeping`].

pub mod connections;
pub mod redis;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::Limits;

/// The client's IP: the peer address, or behind a proxy the header it sets
/// (`header`, e.g. `x-real-ip`; its last value, the one the nearest proxy
/// added).
pub fn client_ip(parts: &axum::http::request::Parts, header: &str) -> String {
    if !header.is_empty() {
        let values = parts.headers.get_all(header).iter().filter_map(|v| v.to_str().ok());
        if let Some(ip) = values.flat_map(|v| v.split(',')).map(str::trim).rfind(|v| !v.is_empty()) {
            return ip.chars().take(64).collect();
        }
    }
    let peer = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip().to_string());
    peer.unwrap_or_else(|| "unknown".into())
}

/// Fixed-window counters shared by the nodes.
#[async_trait]
pub trait Counter: Send + Sync {
    /// Counts one hit on `key` in its current window (a new window of
    /// `window` starts with the first hit); returns the hits in the window,
    /// this one included, and the time left in it.
    async fn hit(&self, key: &str, window: Duration) -> anyhow::Result<(u64, Duration)>;
    /// Takes back one hit on `key` (an attempt counted up front that
    /// turned out not to count).
    async fn forgive(&self, key: &str) -> anyhow::Result<()>;
}

/// Windows held in memory before expired ones are swept (at most once a
/// second).
const MEMORY_SWEEP_AT: usize = 10_000;
/// Windows held in memory at most: past it (after a sweep) the counters
/// start again from nothing, logged, rather than grow.
const MEMORY_MAX: usize = 1_000_000;

/// Windows by key: (end, hits).
type Windows = HashMap<String, (Instant, u64)>;

/// The embedded node's counters.
#[derive(Default)]
pub struct MemoryCounter {
    /// The windows, and when they were last swept.
    windows: Mutex<(Windows, Option<Instant>)>,
}

#[async_trait]
impl Counter for MemoryCounter {
    async fn hit(&self, key: &str, window: Duration) -> anyhow::Result<(u64, Duration)> {
        let now = Instant::now();
        let mut guard = self.windows.lock().expect("rate windows lock");
        let (windows, swept) = &mut *guard;
        if windows.len() >= MEMORY_SWEEP_AT && swept.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
            windows.retain(|_, (end, n)| *end > now && *n > 0);
            *swept = Some(now);
            if windows.len() >= MEMORY_MAX {
                // Account lock-outs are kept: a flood of made-up keys must
                // not be a way to lift one.
                tracing::warn!(windows = windows.len(), "rate-limit windows over their bound; keeping only failed-login counts");
                windows.retain(|key, _| key.starts_with("fail:acct:"));
            }
        }
        let entry = windows.entry(key.to_owned()).or_insert((now + window, 0));
        if entry.0 <= now {
            *entry = (now + window, 0);
        }
        entry.1 += 1;
        Ok((entry.1, entry.0 - now))
    }

    async fn forgive(&self, key: &str) -> anyhow::Result<()> {
        if let Some((_, n)) = self.windows.lock().expect("rate windows lock").0.get_mut(key) {
            *n = n.saturating_sub(1);
        }
        Ok(())
    }
}

/// A request over a limit: answered 429 with `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub what: &'static str,
    pub retry_after: Duration,
}

/// What a counter outage does: the limit is not applied (logged), rather
/// than every login failing while Redis is away.
fn open_on_error<T>(what: &str, r: anyhow::Result<T>) -> Option<T> {
    r.map_err(|e| tracing::warn!(limit = what, error = %format!("{e:#}"), "rate-limit counter unavailable; not limiting")).ok()
}

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
/// The window failed logins are counted in.
const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);

pub struct RateLimits {
    /// Sockets per user and per IP on this node.
    pub connections: connections::Connections,
    syncs: Option<DefaultKeyedRateLimiter<String>>,
    enters: Option<DefaultKeyedRateLimiter<String>>,
    counter: std::sync::Arc<dyn Counter>,
    login_per_min: u64,
    login_failures: u64,
    register_per_hour: u64,
    sends: Option<DefaultKeyedRateLimiter<String>>,
    room_changes: Option<DefaultKeyedRateLimiter<String>>,
}

/// A bucket of `per_sec` a second with a burst of twice that (`None`: no limit).
fn bucket(per_sec: u32) -> Option<DefaultKeyedRateLimiter<String>> {
    let rate = NonZeroU32::new(per_sec)?;
    let burst = NonZeroU32::new(per_sec.saturating_mul(2)).unwrap_or(rate);
    Some(governor::RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)))
}

fn per_minute(per_min: u32) -> Option<DefaultKeyedRateLimiter<String>> {
    let rate = NonZeroU32::new(per_min)?;
    Some(governor::RateLimiter::keyed(Quota::per_minute(rate)))
}

impl RateLimits {
    pub fn new(counter: std::sync::Arc<dyn Counter>, limits: &Limits) -> RateLimits {
        RateLimits {
            connections: connections::Connections::new(limits.sockets_per_user, limits.sockets_per_ip),
            syncs: per_minute(limits.syncs_per_min),
            // A reconnecting socket re-enters all its rooms at once.
            enters: per_minute(u32::try_from(limits.rooms_per_socket.max(60)).unwrap_or(u32::MAX)),
            counter,
            login_per_min: u64::from(limits.login_per_min),
            login_failures: u64::from(limits.login_failures),
            register_per_hour: u64::from(limits.register_per_hour),
            sends: bucket(limits.sends_per_sec),
            room_changes: per_minute(limits.room_changes_per_min),
        }
    }

    /// A fixed-window limit of `max` hits (0: none) on `key`.
    async fn window(&self, what: &'static str, key: String, max: u64, window: Duration) -> Result<(), Limited> {
        if max == 0 {
            return Ok(());
        }
        match open_on_error(what, self.counter.hit(&key, window).await) {
            Some((n, left)) if n > max => Err(Limited { what, retry_after: left.max(Duration::from_secs(1)) }),
            _ => Ok(()),
        }
    }

    /// A login attempt from `ip` for the account `account` (a digest of
    /// the address): refused while the IP is over its attempts, or the
    /// account or the IP over their failures. Every attempt counts as a
    /// failure until [`RateLimits::login_counted_out`] takes it back (a
    /// success, or a check that never ran), so attempts made in parallel
    /// cannot all slip under the limit before the first one fails.
    pub async fn login(&self, ip: &str, account: &str) -> Result<(), Limited> {
        self.window("login attempts from this address", format!("login:ip:{ip}"), self.login_per_min, MINUTE).await?;
        if self.login_failures == 0 {
            return Ok(());
        }
        let checks = [
            ("failed logins for this account", format!("fail:acct:{account}"), self.login_failures),
            ("failed logins from this address", format!("fail:ip:{ip}"), self.login_failures * 3),
        ];
        let mut over = None;
        for (what, key, max) in &checks {
            let hit = open_on_error(what, self.counter.hit(key, FAILURE_WINDOW).await);
            if let Some((_, left)) = hit.filter(|(n, _)| n > max && over.is_none()) {
                over = Some(Limited { what, retry_after: left.max(Duration::from_secs(1)) });
            }
        }
        match over {
            Some(limited) => {
                // A refused attempt is no guess: it does not extend the lock.
                self.login_counted_out(ip, account).await;
                Err(limited)
            }
            None => Ok(()),
        }
    }

    /// Takes back what [`RateLimits::login`] counted as a failure: the
    /// login succeeded, or the password was never checked.
    pub async fn login_counted_out(&self, ip: &str, account: &str) {
        if self.login_failures == 0 {
            return;
        }
        for key in [format!("fail:acct:{account}"), format!("fail:ip:{ip}")] {
            open_on_error("failed logins", self.counter.forgive(&key).await);
        }
    }

    /// A registration from `ip`.
    pub async fn register(&self, ip: &str) -> Result<(), Limited> {
        self.window("registrations from this address", format!("register:ip:{ip}"), self.register_per_hour, HOUR).await
    }

    fn bucket(limiter: Option<&DefaultKeyedRateLimiter<String>>, what: &'static str, user: &str) -> Result<(), Limited> {
        let Some(limiter) = limiter else { return Ok(()) };
        limiter.check_key(&user.to_owned()).map_err(|not_until| Limited {
            what,
            retry_after: not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default())).max(Duration::from_secs(1)),
        })
    }

    /// A message (direct or room) sent by `user`.
    pub fn send(&self, user: &str) -> Result<(), Limited> {
        Self::bucket(self.sends.as_ref(), "messages from this account", user)
    }

    /// A room created, joined or left by `user`.
    pub fn room_change(&self, user: &str) -> Result<(), Limited> {
        Self::bucket(self.room_changes.as_ref(), "room changes from this account", user)
    }

    /// A block or unblock by `user` (counted with room changes: each appends
    /// an event).
    pub fn block_change(&self, user: &str) -> Result<(), Limited> {
        Self::bucket(self.room_changes.as_ref(), "room and block changes from this account", user)
    }

    /// `user` entering a room's presence (`join-room` of a room the socket
    /// is not in): each costs presence writes and a delta to everyone there.
    pub fn enter_room(&self, user: &str) -> Result<(), Limited> {
        Self::bucket(self.enters.as_ref(), "rooms entered by this account", user)
    }

    /// A `sync` replay asked for by socket `socket`.
    pub fn sync(&self, socket: &str) -> Result<(), Limited> {
        Self::bucket(self.syncs.as_ref(), "sync replays on this socket", socket)
    }

    /// Forgets the buckets of accounts idle long enough to be full again
    /// (run every minute or so).
    pub fn housekeeping(&self) {
        for limiter in [&self.sends, &self.room_changes, &self.syncs, &self.enters].into_iter().flatten() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn limits() -> Limits {
        Limits { login_per_min: 3, login_failures: 2, register_per_hour: 2, sends_per_sec: 1, room_changes_per_min: 1, ..Limits::default() }
    }

    #[tokio::test]
    async fn windows_count_per_key_and_say_when_to_retry() {
        let r = RateLimits::new(Arc::new(MemoryCounter::default()), &Limits { login_failures: 0, ..limits() });
        for _ in 0..3 {
            r.login("1.2.3.4", "acct").await.unwrap();
        }
        let over = r.login("1.2.3.4", "acct").await.unwrap_err();
        assert!(over.retry_after > Duration::from_secs(50) && over.retry_after <= MINUTE, "{over:?}");
        r.login("5.6.7.8", "acct").await.expect("another address has its own window");
        r.register("1.2.3.4").await.unwrap();
        r.register("1.2.3.4").await.unwrap();
        assert!(r.register("1.2.3.4").await.is_err());
    }

    #[tokio::test]
    async fn failed_logins_lock_the_account_from_every_address_even_in_parallel() {
        let r = RateLimits::new(Arc::new(MemoryCounter::default()), &Limits { login_per_min: 0, ..limits() });
        // Two attempts in flight at once (neither has failed yet): both count.
        r.login("1.1.1.1", "amy").await.unwrap();
        r.login("2.2.2.2", "amy").await.unwrap();
        let locked = r.login("3.3.3.3", "amy").await.unwrap_err();
        assert_eq!(locked.what, "failed logins for this account");
        assert!(locked.retry_after > Duration::from_secs(14 * 60));
        r.login("3.3.3.3", "bob").await.expect("other accounts are not locked");
        // A success takes its attempt back.
        let r = RateLimits::new(Arc::new(MemoryCounter::default()), &Limits { login_per_min: 0, ..limits() });
        for _ in 0..5 {
            r.login("1.1.1.1", "amy").await.unwrap();
            r.login_counted_out("1.1.1.1", "amy").await;
        }
    }

    #[test]
    fn buckets_allow_a_burst_then_refuse_and_zero_means_no_limit() {
        let r = RateLimits::new(Arc::new(MemoryCounter::default()), &limits());
        r.send("amy").unwrap();
        r.send("amy").unwrap();
        assert!(r.send("amy").is_err(), "a burst of twice the rate, then refused");
        r.send("bob").expect("per account");
        r.room_change("amy").unwrap();
        assert!(r.room_change("amy").is_err());
        let open = RateLimits::new(Arc::new(MemoryCounter::default()), &Limits { sends_per_sec: 0, ..limits() });
        for _ in 0..100 {
            open.send("amy").unwrap();
        }
        r.housekeeping();
    }
}
