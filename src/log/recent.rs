//! The embedded log's deduplication window: the command ids appended
//! within it, oldest first, each as a 64-bit keyed hash with its event's
//! log sequence.
//!
//! The hash is SipHash over a secret of 128 random bits, then the id: a
//! client cannot choose ids whose keys collide. The secret is kept in
//! `events.idx` with the keys (and a probe id's key, to tell a build
//! whose hash differs), so a clean restart reads them back. A key
//! found only names candidates: the log reads the command id of each event
//! it names and compares (a hit is a retry, rare), so two ids are never
//! taken for one another, and ids whose keys collide are each kept. About
//! 24 bytes per id in the order and 17 in the table, with their slack.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::time::{Duration, Instant};

pub struct Recent {
    /// The window in ms.
    window_ms: i64,
    /// What `order`'s times count from.
    base: Instant,
    secret: (u64, u64),
    /// Key → the log sequence of an event with it in the window.
    seqs: HashMap<u64, u64>,
    /// Key → the others, for the (rare) keys several ids share.
    more: HashMap<u64, Vec<u64>>,
    /// (when appended, ms from `base`; key; log sequence), oldest first.
    order: VecDeque<(i64, u64, u64)>,
}

impl Recent {
    /// A window keyed by `secret` (as an earlier process kept it), or by a
    /// new random one.
    /// An id whose key `events.idx` records, to tell keys made otherwise
    /// (`DefaultHasher` may change between Rust releases).
    pub const PROBE: &'static str = "natter-id-key-probe";

    pub fn new(window: Duration, secret: Option<(u64, u64)>) -> Recent {
        let random = || std::collections::hash_map::RandomState::new().hash_one(0u8);
        Recent {
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
            base: Instant::now(),
            secret: secret.unwrap_or_else(|| (random(), random())),
            seqs: HashMap::new(),
            more: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The secret the keys are made with.
    pub fn secret(&self) -> (u64, u64) {
        self.secret
    }

    /// The key of a command id.
    pub fn key(&self, id: &str) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.secret.hash(&mut h);
        id.hash(&mut h);
        h.finish()
    }

    fn ms(&self, at: Instant) -> i64 {
        match at.checked_duration_since(self.base) {
            Some(after) => after.as_millis() as i64,
            None => -(self.base.duration_since(at).as_millis() as i64),
        }
    }

    /// Forgets the ids appended a window ago or longer.
    pub fn expire(&mut self) {
        let oldest = self.ms(Instant::now()).saturating_sub(self.window_ms);
        while self.order.front().is_some_and(|&(at, _, _)| at <= oldest) {
            let Some((_, key, seq)) = self.order.pop_front() else { break };
            self.forget(key, seq);
        }
    }

    fn forget(&mut self, key: u64, seq: u64) {
        let later = self.more.get_mut(&key);
        if self.seqs.get(&key) == Some(&seq) {
            match later {
                Some(later) => {
                    self.seqs.insert(key, later.remove(0));
                    if later.is_empty() {
                        self.more.remove(&key);
                    }
                }
                None => {
                    self.seqs.remove(&key);
                }
            }
        } else if let Some(later) = later {
            later.retain(|&s| s != seq);
            if later.is_empty() {
                self.more.remove(&key);
            }
        }
    }

    /// The log sequences of the events whose command id may be `id` (each
    /// to be checked against its event).
    pub fn candidates(&self, id: &str) -> Vec<u64> {
        let key = self.key(id);
        self.seqs.get(&key).into_iter().chain(self.more.get(&key).into_iter().flatten()).copied().collect()
    }

    fn add(&mut self, key: u64, seq: u64) {
        if let Some(first) = self.seqs.get(&key) {
            if *first != seq {
                self.more.entry(key).or_default().push(seq);
            }
        } else {
            self.seqs.insert(key, seq);
        }
    }

    /// Remembers the newest id (appended at `at`, at log sequence `seq`).
    pub fn push_newest(&mut self, key: u64, seq: u64, at: Instant) {
        self.add(key, seq);
        let at = self.ms(at);
        self.order.push_back((at, key, seq));
    }

    /// Remembers an id older than every one remembered (the window read
    /// back from the log's end).
    pub fn push_oldest(&mut self, key: u64, seq: u64, at: Instant) {
        self.add(key, seq);
        let at = self.ms(at);
        self.order.push_front((at, key, seq));
    }

    /// Every id remembered, oldest first: (key, log sequence, how long ago).
    pub fn entries(&self) -> impl Iterator<Item = (u64, u64, Duration)> + '_ {
        let now = self.ms(Instant::now());
        self.order.iter().map(move |&(at, key, seq)| (key, seq, Duration::from_millis((now - at).max(0) as u64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_leave_with_the_window_and_a_shared_key_keeps_every_id() {
        let mut r = Recent::new(Duration::from_secs(60), None);
        let now = Instant::now();
        let (a, b, z) = (r.key("a"), r.key("b"), r.key("z"));
        r.push_newest(a, 1, now - Duration::from_secs(61));
        r.push_newest(b, 2, now - Duration::from_secs(30));
        // Another id with b's key (a collision): both kept, in order.
        r.push_newest(b, 3, now);
        r.push_oldest(z, 0, now - Duration::from_secs(120));
        assert_eq!((r.candidates("a"), r.candidates("b"), r.candidates("z")), (vec![1], vec![2, 3], vec![0]));
        r.expire();
        assert_eq!((r.candidates("a"), r.candidates("b"), r.candidates("z")), (vec![], vec![2, 3], vec![]));
        assert_eq!(r.entries().map(|(k, s, _)| (k, s)).collect::<Vec<_>>(), [(b, 2), (b, 3)]);
        // Keys depend on the secret: another window's differ, the same
        // secret's agree.
        assert_ne!(Recent::new(Duration::from_secs(60), None).key("a"), a);
        assert_eq!(Recent::new(Duration::from_secs(60), Some(r.secret())).key("a"), a);
        // A window too long to count in ms still keeps what is in it.
        let mut long = Recent::new(Duration::from_secs(u64::MAX), None);
        long.push_newest(long.key("a"), 1, now);
        long.expire();
        assert_eq!(long.candidates("a"), [1]);
    }

    #[test]
    fn the_oldest_of_a_shared_key_leaves_first() {
        let mut r = Recent::new(Duration::from_secs(60), None);
        let (now, key) = (Instant::now(), r.key("b"));
        r.push_newest(key, 2, now - Duration::from_secs(90));
        r.push_newest(key, 3, now - Duration::from_secs(10));
        r.push_newest(key, 4, now);
        r.expire();
        assert_eq!(r.candidates("b"), [3, 4]);
    }
}
