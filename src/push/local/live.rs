//! The embedded inbox's live subscriptions: who is listening, their rooms
//! over the log, and the hand-out of committed deliveries.
//!
//! A room's delivery goes to the listening users who were members as of
//! its event (a user's own join or leave reaches them on their own chain).
//! Each subscription remembers the cursor of the last delivery offered to
//! it, taken or dropped (full): the next names it as its previous, so a
//! dropped one is a gap the socket fills from the inbox. A subscription
//! leaves when its stream is dropped, and the user with their last.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;

use crate::push::router::own_change;
use crate::push::user_rooms::Timeline;
use crate::push::{Delivery, Payload, Pushed};

/// Live items a user's subscription may hold before new ones are dropped
/// (the socket then fills the gap from the inbox, as with core NATS).
const LIVE_BUFFER: usize = 4096;

struct Sub {
    id: u64,
    tx: mpsc::Sender<Arc<Pushed>>,
    last: u64,
}

/// A user with live subscriptions, and their rooms over the log.
struct Listener {
    subs: Vec<Sub>,
    rooms: HashMap<String, Timeline>,
}

impl Listener {
    fn offer(&mut self, cursor: u64, payload: &Payload, hand: Hand) {
        for sub in &mut self.subs {
            if hand == Hand::Send {
                let d = Delivery::new(cursor, sub.last, payload.clone());
                // Full: dropped, and the next delivery names it (closed:
                // its stream's drop takes the subscription out).
                let _ = sub.tx.try_send(Arc::new(Pushed::Delivery(d)));
            }
            sub.last = cursor;
        }
    }
}

#[derive(Default)]
pub struct Live {
    users: HashMap<String, Listener>,
    /// The listening users each room has a timeline for.
    rooms: HashMap<String, HashSet<String>>,
    next_id: u64,
}

/// Whether a delivery is sent, or only marks the subscriptions past its
/// cursor (one the prune dropped as it was stored: a gap for the socket).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hand {
    Send,
    Skip,
}

impl Live {
    /// Offers a delivery to every subscription of `user`.
    pub fn offer(&mut self, user: &str, cursor: u64, payload: &Payload, hand: Hand) {
        if let Some(listener) = self.users.get_mut(user) {
            listener.offer(cursor, payload, hand);
        }
    }

    /// Offers a room's delivery to the listening users who were members as
    /// of its event.
    pub fn offer_room(&mut self, room: &str, cursor: u64, payload: &Payload, hand: Hand) {
        let Some(users) = self.rooms.get(room) else { return };
        for user in users.iter().filter(|u| own_change(payload, u).is_none()) {
            let Some(listener) = self.users.get_mut(user) else { continue };
            if listener.rooms.get(room).is_some_and(|t| t.at(cursor) == Some(true)) {
                listener.offer(cursor, payload, hand);
            }
        }
    }

    /// Takes in a listening user's join or leave. Deliveries are handed
    /// out in cursor order, so after a leave nothing earlier of the room
    /// comes: the room is forgotten for the user until they join again.
    pub fn record(&mut self, user: &str, room: &str, log_seq: u64, joined: bool) {
        let Some(listener) = self.users.get_mut(user) else { return };
        if joined {
            listener.rooms.entry(room.to_owned()).or_default().record(log_seq, joined);
            self.rooms.entry(room.to_owned()).or_default().insert(user.to_owned());
        } else {
            listener.rooms.remove(room);
            self.leave_room(room, user);
        }
    }

    fn leave_room(&mut self, room: &str, user: &str) {
        if let Some(users) = self.rooms.get_mut(room) {
            users.remove(user);
            if users.is_empty() {
                self.rooms.remove(room);
            }
        }
    }

    /// Relays an ephemeral signal to `user`'s subscriptions.
    pub fn signal(&self, user: &str, payload: &Payload) {
        let Some(listener) = self.users.get(user) else { return };
        let pushed = Arc::new(Pushed::Signal(payload.clone()));
        for sub in &listener.subs {
            let _ = sub.tx.try_send(pushed.clone());
        }
    }

    /// Whether `user` is listening (their rooms are held).
    pub fn listening(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Adds a subscription of `user`, whose rooms are `rooms` if they were
    /// not listening yet (read by the caller under the same lock).
    pub fn subscribe(live: &Arc<Mutex<Live>>, this: &mut Live, user: &str, rooms: Option<HashMap<String, Timeline>>) -> LiveStream {
        if let Some(mut rooms) = rooms {
            // Rooms left: what came before the leave was committed before
            // this read, so the socket's catch-up from the inbox, which
            // comes after `subscribe` returns (`PushHub::join`), finds it.
            rooms.retain(|_, t| t.now());
            for room in rooms.keys() {
                this.rooms.entry(room.clone()).or_default().insert(user.to_owned());
            }
            this.users.entry(user.to_owned()).or_insert(Listener { subs: Vec::new(), rooms });
        }
        let (tx, rx) = mpsc::channel(LIVE_BUFFER);
        this.next_id += 1;
        let id = this.next_id;
        this.users.get_mut(user).expect("a listener for the subscription").subs.push(Sub { id, tx, last: 0 });
        LiveStream { rx, live: Arc::downgrade(live), user: user.to_owned(), id }
    }

    fn unsubscribe(&mut self, user: &str, id: u64) {
        let Some(listener) = self.users.get_mut(user) else { return };
        listener.subs.retain(|sub| sub.id != id);
        if !listener.subs.is_empty() {
            return;
        }
        let listener = self.users.remove(user).expect("a listener");
        for room in listener.rooms.keys() {
            self.leave_room(room, user);
        }
    }

    #[cfg(test)]
    pub fn capacity_of(&self, user: &str) -> usize {
        self.users[user].subs[0].tx.capacity()
    }

    #[cfg(test)]
    pub fn held(&self) -> (usize, usize) {
        (self.users.len(), self.rooms.len())
    }
}

/// A live subscription's stream; dropping it unsubscribes.
pub struct LiveStream {
    rx: mpsc::Receiver<Arc<Pushed>>,
    live: Weak<Mutex<Live>>,
    user: String,
    id: u64,
}

impl Stream for LiveStream {
    type Item = Arc<Pushed>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Arc<Pushed>>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        if let Some(live) = self.live.upgrade() {
            live.lock().unwrap_or_else(std::sync::PoisonError::into_inner).unsubscribe(&self.user, self.id);
        }
    }
}
