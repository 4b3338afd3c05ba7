//! The embedded log's deduplication window: the command ids appended
//! within it, oldest first, each as a 64-bit keyed hash with its event's
//! log sequence.
//!
//! A key found is only a candidate: the log reads the command id of the
//! event it names and compares (a hit is a retry, rare), so two ids whose
//! keys collide are never taken for one another. Such a collision (about
//! one chance in 10^7 per window of a million ids) leaves the later id
//! without deduplication for that window, never a message lost. About 34
//! bytes per id in memory (the table's 16 and its slack, the order's 16),
//! where the id itself would cost about 100.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

pub struct Recent {
    window: Duration,
    /// What `order`'s times count from.
    base: Instant,
    /// Key → the log sequence of the event that had it.
    seqs: HashMap<u64, u64>,
    /// (when appended, ms from `base`; key), oldest first.
    order: VecDeque<(i64, u64)>,
}

impl Recent {
    /// An id whose key `events.idx` records, to tell keys made otherwise.
    pub const PROBE: &'static str = "natter-id-key-probe";

    pub fn new(window: Duration) -> Recent {
        Recent { window, base: Instant::now(), seqs: HashMap::new(), order: VecDeque::new() }
    }

    /// The key of a command id.
    pub fn key(id: &str) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        1u8.hash(&mut h);
        id.hash(&mut h);
        h.finish()
    }

    fn ms(&self, at: Instant) -> i64 {
        match at.checked_duration_since(self.base) {
            Some(after) => after.as_millis() as i64,
            None => -(self.base.duration_since(at).as_millis() as i64),
        }
    }

    /// Forgets the ids older than the window.
    pub fn expire(&mut self) {
        let oldest = self.ms(Instant::now()) - self.window.as_millis() as i64;
        while self.order.front().is_some_and(|&(at, _)| at <= oldest) {
            if let Some((_, key)) = self.order.pop_front() {
                self.seqs.remove(&key);
            }
        }
    }

    /// The log sequence of the event whose command id may be `id` (to be
    /// checked against the event).
    pub fn candidate(&self, id: &str) -> Option<u64> {
        self.seqs.get(&Self::key(id)).copied()
    }

    /// Remembers the newest id (appended at `at`, at log sequence `seq`);
    /// an id whose key is taken keeps the older one's (see above).
    pub fn push_newest(&mut self, key: u64, seq: u64, at: Instant) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.seqs.entry(key) {
            e.insert(seq);
            let at = self.ms(at);
            self.order.push_back((at, key));
        }
    }

    /// Remembers an id older than every one remembered (the window read
    /// back from the log's end).
    pub fn push_oldest(&mut self, key: u64, seq: u64, at: Instant) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.seqs.entry(key) {
            e.insert(seq);
            let at = self.ms(at);
            self.order.push_front((at, key));
        }
    }

    /// Every id remembered, oldest first: (key, log sequence, how long ago).
    pub fn entries(&self) -> impl Iterator<Item = (u64, u64, Duration)> + '_ {
        let now = self.ms(Instant::now());
        self.order.iter().filter_map(move |&(at, key)| Some((key, *self.seqs.get(&key)?, Duration::from_millis((now - at).max(0) as u64))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_leave_with_the_window_and_a_taken_key_keeps_the_older_id() {
        let mut r = Recent::new(Duration::from_secs(60));
        let now = Instant::now();
        r.push_newest(Recent::key("a"), 1, now - Duration::from_secs(61));
        r.push_newest(Recent::key("b"), 2, now);
        r.push_newest(Recent::key("b"), 3, now); // the same key again: kept as 2
        r.push_oldest(Recent::key("z"), 0, now - Duration::from_secs(120));
        assert_eq!((r.candidate("a"), r.candidate("b"), r.candidate("z")), (Some(1), Some(2), Some(0)));
        r.expire();
        assert_eq!((r.candidate("a"), r.candidate("b"), r.candidate("z")), (None, Some(2), None));
        assert_eq!(r.entries().map(|(k, s, _)| (k, s)).collect::<Vec<_>>(), [(Recent::key("b"), 2)]);
    }
}
