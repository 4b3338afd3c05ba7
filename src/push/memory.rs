//! The embedded push bus: an in-process inbox.
//!
//! A delivery's cursor is the log sequence of the event that made it (an
//! event makes at most one delivery per user), so cursors survive a restart:
//! the embedded projector replays the log at start-up and rebuilds the same
//! deliveries with the same cursors before the node serves. Deliveries are
//! kept for the push retention (by the event's time) and at most
//! [`MAX_RETAINED`] in all; a cursor older than that gets `resync`. A
//! message deleted for everyone is rewritten out of the deliveries kept
//! (see [`MemoryPush::forget_content`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::mpsc;

use super::{Delivery, Payload, PushBus, Pushed, Replay, To};

/// Most deliveries kept for resume, whatever the retention.
pub const MAX_RETAINED: usize = 250_000;
/// Live items a user's subscription may hold before new ones are dropped
/// (the socket then fills the gap from the inbox, as with core NATS).
const LIVE_BUFFER: usize = 4096;

#[derive(Default)]
struct State {
    /// The newest event fanned out (the head cursor).
    head: u64,
    /// Every delivery at or below this cursor may be gone.
    floor: u64,
    /// Retained deliveries in cursor order: (cursor, user, event time ms).
    order: VecDeque<(u64, String, i64)>,
    by_user: HashMap<String, BTreeMap<u64, Payload>>,
    /// Message id → the retained deliveries showing its content (user,
    /// cursor): a deletion rewrites exactly those, whoever holds them
    /// (members who left since included).
    shown: HashMap<String, VecDeque<(String, u64)>>,
    /// Each user's newest cursor (kept after pruning: a live delivery names it).
    last: HashMap<String, u64>,
    subscribers: HashMap<String, Vec<mpsc::Sender<Arc<Pushed>>>>,
}

pub struct MemoryPush {
    retention: Duration,
    state: Mutex<State>,
}

impl MemoryPush {
    pub fn new(retention: Duration) -> MemoryPush {
        MemoryPush { retention, state: Mutex::new(State::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("memory push lock")
    }

    /// Sends to `user`'s live subscribers, forgetting closed ones.
    fn publish(state: &mut State, user: &str, pushed: &Arc<Pushed>) {
        if let Some(subs) = state.subscribers.get_mut(user) {
            subs.retain(|tx| !matches!(tx.try_send(pushed.clone()), Err(mpsc::error::TrySendError::Closed(_))));
            if subs.is_empty() {
                state.subscribers.remove(user);
            }
        }
    }

    fn prune(&self, state: &mut State) {
        let oldest = Utc::now().timestamp_millis() - self.retention.as_millis() as i64;
        while let Some((cursor, user, at)) = state.order.front().cloned() {
            if at >= oldest && state.order.len() <= MAX_RETAINED {
                break;
            }
            state.order.pop_front();
            if let Some(mine) = state.by_user.get_mut(&user) {
                let gone = mine.remove(&cursor);
                if mine.is_empty() {
                    state.by_user.remove(&user);
                }
                if let Some(id) = gone.as_ref().and_then(|p| crate::wire::content_of(&p.event, &p.data))
                    && let Some(copies) = state.shown.get_mut(id)
                {
                    // Pruned in the order they were stored: the oldest.
                    if copies.front().is_some_and(|(u, c)| *c == cursor && *u == user) {
                        copies.pop_front();
                    } else {
                        copies.retain(|(u, c)| !(*c == cursor && *u == user));
                    }
                    if copies.is_empty() {
                        state.shown.remove(id);
                    }
                }
            }
            state.floor = state.floor.max(cursor);
        }
    }

    /// A message deleted for everyone leaves every retained delivery that
    /// showed it (whoever holds it): those become its tombstone. Replies
    /// hold no preview of it (sessions read previews when they emit).
    fn forget_content(state: &mut State, deleted: &Payload) {
        let Some(id) = deleted.data.get("_id").and_then(|v| v.as_str()) else { return };
        let Some(copies) = state.shown.remove(id) else { return };
        for (user, cursor) in copies {
            if let Some(p) = state.by_user.get_mut(&user).and_then(|mine| mine.get_mut(&cursor)) {
                crate::wire::tombstone(&mut p.data);
            }
        }
    }

    /// Records the deliveries of the event at `log_seq`, which happened at
    /// `at_ms` (events older than the retention deliver nothing).
    pub fn deliver_at(&self, log_seq: u64, at_ms: i64, deliveries: Vec<(String, Payload)>) {
        let mut state = self.lock();
        if log_seq <= state.head {
            return; // already fanned out
        }
        state.head = log_seq;
        if at_ms < Utc::now().timestamp_millis() - self.retention.as_millis() as i64 {
            state.floor = log_seq;
            return;
        }
        for (user, payload) in deliveries {
            if payload.event == "messageDeleted" {
                Self::forget_content(&mut state, &payload);
            }
            if let Some(id) = crate::wire::content_of(&payload.event, &payload.data) {
                state.shown.entry(id.to_owned()).or_default().push_back((user.clone(), log_seq));
            }
            let previous = state.last.insert(user.clone(), log_seq).unwrap_or(0);
            state.order.push_back((log_seq, user.clone(), at_ms));
            state.by_user.entry(user.clone()).or_default().insert(log_seq, payload.clone());
            let pushed = Arc::new(Pushed::Delivery(Delivery { cursor: log_seq, previous, payload, check: None }));
            Self::publish(&mut state, &user, &pushed);
        }
        self.prune(&mut state);
    }
}

#[async_trait]
impl PushBus for MemoryPush {
    async fn deliver(&self, event: &natter_events::Envelope, log_seq: u64, deliveries: Vec<(To, Payload)>) -> Result<(), String> {
        if log_seq == 0 {
            return Err("the embedded push bus needs the event's log sequence".into());
        }
        let deliveries = deliveries
            .into_iter()
            .map(|(to, payload)| match to {
                To::User(user) => Ok((user, payload)),
                To::Room(room) => Err(format!("the embedded push bus addresses users only (a delivery for room {room})")),
            })
            .collect::<Result<Vec<_>, String>>()?;
        self.deliver_at(log_seq, event.at.timestamp_millis(), deliveries);
        Ok(())
    }

    async fn head(&self) -> anyhow::Result<u64> {
        Ok(self.lock().head)
    }

    async fn replay(&self, user: &str, cursor: u64, limit: usize) -> anyhow::Result<Replay> {
        let state = self.lock();
        if cursor > state.head || cursor < state.floor {
            return Ok(Replay::TooOld { head: state.head });
        }
        let mut previous = cursor;
        let page = match state.by_user.get(user) {
            None => Vec::new(),
            Some(mine) => mine
                .range(cursor + 1..)
                .take(limit)
                .map(|(&c, payload)| {
                    let d = Delivery { cursor: c, previous, payload: payload.clone(), check: None };
                    previous = c;
                    d
                })
                .collect(),
        };
        Ok(Replay::Page(page))
    }

    async fn subscribe(&self, user: &str) -> anyhow::Result<BoxStream<'static, Arc<Pushed>>> {
        let (tx, mut rx) = mpsc::channel(LIVE_BUFFER);
        let mut state = self.lock();
        let subs = state.subscribers.entry(user.to_owned()).or_default();
        // Forget subscriptions already dropped, so a client reconnecting in
        // a loop to a quiet user cannot pile them up.
        subs.retain(|tx| !tx.is_closed());
        subs.push(tx);
        Ok(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed())
    }

    async fn signal(&self, to: &str, payload: &Payload) -> anyhow::Result<()> {
        let mut state = self.lock();
        Self::publish(&mut state, to, &Arc::new(Pushed::Signal(payload.clone())));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn p(n: u64) -> Payload {
        Payload { event: "newMessage".into(), data: json!({ "n": n }) }
    }

    fn cursors(r: Replay) -> Vec<(u64, u64)> {
        match r {
            Replay::Page(page) => page.iter().map(|d| (d.cursor, d.previous)).collect(),
            Replay::TooOld { head } => panic!("too old, head {head}"),
        }
    }

    #[tokio::test]
    async fn cursors_are_log_sequences_and_replay_is_per_user() {
        let bus = MemoryPush::new(Duration::from_secs(3600));
        let mut live = bus.subscribe("bob").await.unwrap();
        let now = Utc::now().timestamp_millis();
        bus.deliver_at(1, now, vec![("bob".into(), p(1)), ("amy".into(), p(1))]);
        bus.deliver_at(2, now, vec![]);
        bus.deliver_at(3, now, vec![("amy".into(), p(3))]);
        bus.deliver_at(4, now, vec![("bob".into(), p(4))]);
        // Delivering an event again does nothing.
        bus.deliver_at(4, now, vec![("bob".into(), p(4))]);
        assert_eq!(bus.head().await.unwrap(), 4);
        assert_eq!(cursors(bus.replay("bob", 0, 10).await.unwrap()), [(1, 0), (4, 1)]);
        assert_eq!(cursors(bus.replay("amy", 1, 10).await.unwrap()), [(3, 1)]);
        assert_eq!(cursors(bus.replay("bob", 4, 10).await.unwrap()), []);
        for want in [(1, 0), (4, 1)] {
            let Some(Pushed::Delivery(d)) = live.next().await.as_deref().cloned() else { panic!("no live delivery") };
            assert_eq!((d.cursor, d.previous), want);
        }
        assert!(matches!(bus.replay("bob", 5, 10).await.unwrap(), Replay::TooOld { head: 4 }));
    }

    #[tokio::test]
    async fn a_deleted_message_leaves_the_deliveries_kept() {
        let bus = MemoryPush::new(Duration::from_secs(3600));
        let now = Utc::now().timestamp_millis();
        let sent = |id: &str, text: &str| Payload { event: "newMessage".into(), data: json!({ "_id": id, "message": text, "seq": 1 }) };
        // Amy got the message too, then left: the tombstone goes to Bob only.
        bus.deliver_at(1, now, vec![("bob".into(), sent("m1", "a secret")), ("amy".into(), sent("m1", "a secret"))]);
        bus.deliver_at(2, now, vec![("bob".into(), Payload { event: "messageUpdated".into(), data: json!({ "_id": "m1", "message": "a secret, edited" }) })]);
        bus.deliver_at(3, now, vec![("bob".into(), sent("m2", "hm?"))]);
        let deleted = Payload { event: "messageDeleted".into(), data: json!({ "_id": "m1", "seq": 1, "deleted": true }) };
        bus.deliver_at(4, now, vec![("bob".into(), deleted)]);
        for user in ["bob", "amy"] {
            let Replay::Page(page) = bus.replay(user, 0, 10).await.unwrap() else { panic!("a page") };
            assert_eq!(page[0].payload.data, json!({ "_id": "m1", "seq": 1, "deleted": true }), "{user}");
            let all = serde_json::to_string(&page.iter().map(|d| &d.payload.data).collect::<Vec<_>>()).unwrap();
            assert!(!all.contains("a secret"), "{user}: {all}");
        }
        // The deleted message left the index (its copies are tombstones).
        assert_eq!(bus.lock().shown.keys().collect::<Vec<_>>(), [&"m2".to_owned()]);
    }

    #[tokio::test]
    async fn expired_deliveries_make_older_cursors_resync() {
        let bus = MemoryPush::new(Duration::from_secs(60));
        let old = Utc::now().timestamp_millis() - 120_000;
        bus.deliver_at(1, old, vec![("bob".into(), p(1))]);
        bus.deliver_at(2, Utc::now().timestamp_millis(), vec![("bob".into(), p(2))]);
        assert!(matches!(bus.replay("bob", 0, 10).await.unwrap(), Replay::TooOld { head: 2 }));
        assert_eq!(cursors(bus.replay("bob", 1, 10).await.unwrap()), [(2, 1)]);
    }
}
