//! Caps on what one client may hold open on a node: sockets per user and
//! per IP (counted at the handshake, released when the socket is gone),
//! and requests in flight per socket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A socket refused at the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooMany(pub String);

#[derive(Debug, Default)]
struct Counts {
    users: HashMap<String, usize>,
    ips: HashMap<String, usize>,
}

/// Open sockets per user and per IP on this node.
pub struct Connections {
    per_user: usize,
    per_ip: usize,
    counts: Arc<Mutex<Counts>>,
}

/// A socket's place in the counts; dropping it gives the place back.
#[derive(Debug)]
pub struct Slot {
    counts: Arc<Mutex<Counts>>,
    user: String,
    ip: String,
}

fn give_back(map: &mut HashMap<String, usize>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("connection counts lock");
        give_back(&mut counts.users, &self.user);
        give_back(&mut counts.ips, &self.ip);
    }
}

impl Connections {
    /// Caps of `per_user` and `per_ip` sockets (0: no cap).
    pub fn new(per_user: usize, per_ip: usize) -> Connections {
        Connections { per_user, per_ip, counts: Arc::default() }
    }

    /// Takes a place for a socket of `user` from `ip`, or says which cap it
    /// is over.
    pub fn open(&self, user: &str, ip: &str) -> Result<Slot, TooMany> {
        let mut counts = self.counts.lock().expect("connection counts lock");
        let of_user = counts.users.get(user).copied().unwrap_or(0);
        if self.per_user > 0 && of_user >= self.per_user {
            return Err(TooMany(format!("too many sockets for this user (at most {} per node); close some first", self.per_user)));
        }
        let of_ip = counts.ips.get(ip).copied().unwrap_or(0);
        if self.per_ip > 0 && of_ip >= self.per_ip {
            return Err(TooMany(format!("too many sockets from this address (at most {} per node)", self.per_ip)));
        }
        *counts.users.entry(user.to_owned()).or_default() += 1;
        *counts.ips.entry(ip.to_owned()).or_default() += 1;
        Ok(Slot { counts: self.counts.clone(), user: user.to_owned(), ip: ip.to_owned() })
    }
}

/// Refusals a socket may collect for requests over its in-flight cap within
/// [`STRIKE_WINDOW`] before it is disconnected.
pub const STRIKES: u32 = 50;
pub const STRIKE_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Requests a socket has in flight (socketioxide runs each event in a task
/// of its own): over the cap, an event is refused at once.
pub struct InFlight {
    slots: Arc<Semaphore>,
    /// Refusals since the window began.
    strikes: Mutex<(std::time::Instant, u32)>,
}

/// What became of a request over the cap.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Refuse this one.
    Once,
    /// Refused too often: disconnect the socket.
    Persisting,
}

impl InFlight {
    pub fn new(cap: usize) -> InFlight {
        InFlight { slots: Arc::new(Semaphore::new(cap.max(1))), strikes: Mutex::new((std::time::Instant::now(), 0)) }
    }

    /// A place for one request, held until the permit is dropped; a socket refused [`STRIKES`] times within
    /// [`STRIKE_WINDOW`] is to be disconnected (whatever got through between).
    pub fn enter(&self) -> Result<OwnedSemaphorePermit, Refused> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            let mut strikes = self.strikes.lock().expect("strikes lock");
            if strikes.0.elapsed() > STRIKE_WINDOW {
                *strikes = (std::time::Instant::now(), 0);
            }
            strikes.1 += 1;
            if strikes.1 >= STRIKES { Refused::Persisting } else { Refused::Once }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_capped_per_user_and_per_address_and_places_come_back() {
        let c = Connections::new(2, 3);
        let a1 = c.open("amy", "1.1.1.1").unwrap();
        let _a2 = c.open("amy", "1.1.1.1").unwrap();
        assert!(c.open("amy", "2.2.2.2").unwrap_err().0.contains("this user"));
        let _b1 = c.open("bob", "1.1.1.1").unwrap();
        assert!(c.open("carol", "1.1.1.1").unwrap_err().0.contains("this address"));
        c.open("carol", "2.2.2.2").expect("another address");
        drop(a1);
        let _a3 = c.open("amy", "3.3.3.3").expect("a closed socket gives its place back");
        assert_eq!(c.counts.lock().unwrap().ips.get("1.1.1.1"), Some(&2));
        let unlimited = Connections::new(0, 0);
        let _many: Vec<_> = (0..100).map(|_| unlimited.open("amy", "1.1.1.1").unwrap()).collect();
    }

    #[test]
    fn requests_over_the_in_flight_cap_are_refused_then_the_socket_is_dropped() {
        let f = InFlight::new(2);
        let (_p1, _p2) = (f.enter().unwrap(), f.enter().unwrap());
        for _ in 1..STRIKES {
            assert_eq!(f.enter().unwrap_err(), Refused::Once);
        }
        assert_eq!(f.enter().unwrap_err(), Refused::Persisting);
        drop(_p1);
        assert!(f.enter().is_ok(), "a finished request frees its place");
    }
}
