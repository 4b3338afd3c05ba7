//! A node's push hub: one subscription per user with sockets on this node,
//! fanned out to each socket's bounded queue; replay from a cursor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::{Payload, PushBus, Pushed, Replay};

struct Slot {
    tx: mpsc::Sender<Arc<Pushed>>,
    kick: Arc<Notify>,
}

struct UserEntry {
    sockets: HashMap<u64, Slot>,
    task: JoinHandle<()>,
}

pub struct PushHub {
    bus: Arc<dyn PushBus>,
    queue: usize,
    users: Mutex<HashMap<String, UserEntry>>,
    next_key: AtomicU64,
}

/// A socket's place in the hub. Dropping it leaves (and unsubscribes from
/// the user's subjects when it was the user's last socket on this node).
pub struct Registration {
    hub: Arc<PushHub>,
    user: String,
    key: u64,
    pub rx: mpsc::Receiver<Arc<Pushed>>,
    /// Notified when the socket's queue overflowed: disconnect it.
    pub kicked: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.leave(&self.user, self.key);
    }
}

impl PushHub {
    pub fn new(bus: Arc<dyn PushBus>, queue: usize) -> Arc<PushHub> {
        Arc::new(PushHub { bus, queue, users: Mutex::new(HashMap::new()), next_key: AtomicU64::new(1) })
    }

    /// The newest cursor (0: nothing delivered yet).
    pub async fn head(&self) -> anyhow::Result<u64> {
        self.bus.head().await
    }

    /// Registers a socket of `user`; subscribes the node to the user's push
    /// and signal subjects first if this is their first socket here. When
    /// this returns, every delivery stored from now on reaches the queue.
    pub async fn join(self: &Arc<Self>, user: &str) -> anyhow::Result<Registration> {
        let (tx, rx) = mpsc::channel(self.queue);
        let kick = Arc::new(Notify::new());
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let slot = || Slot { tx: tx.clone(), kick: kick.clone() };
        let registration = |hub: &Arc<PushHub>| Registration {
            hub: hub.clone(),
            user: user.to_owned(),
            key,
            rx,
            kicked: kick.clone(),
        };
        {
            let mut users = self.users.lock().expect("push hub lock");
            if let Some(entry) = users.get_mut(user) {
                entry.sockets.insert(key, slot());
                return Ok(registration(self));
            }
        }
        let live = self.bus.subscribe(user).await?;
        let mut users = self.users.lock().expect("push hub lock");
        match users.get_mut(user) {
            // Another socket of the user subscribed meanwhile: use theirs.
            Some(entry) => {
                entry.sockets.insert(key, slot());
            }
            None => {
                let task = tokio::spawn(dispatch(Arc::downgrade(self), user.to_owned(), live));
                users.insert(user.to_owned(), UserEntry { sockets: HashMap::from([(key, slot())]), task });
            }
        }
        Ok(registration(self))
    }

    fn leave(&self, user: &str, key: u64) {
        let mut users = self.users.lock().expect("push hub lock");
        if let Some(entry) = users.get_mut(user) {
            entry.sockets.remove(&key);
            if entry.sockets.is_empty() {
                entry.task.abort();
                users.remove(user);
            }
        }
    }

    /// Sockets of `user` registered on this node.
    pub fn sockets_of(&self, user: &str) -> usize {
        self.users.lock().expect("push hub lock").get(user).map_or(0, |e| e.sockets.len())
    }

    /// Users with at least one socket on this node.
    pub fn subscribed_users(&self) -> usize {
        self.users.lock().expect("push hub lock").len()
    }

    fn fan(&self, user: &str, pushed: Arc<Pushed>) {
        let mut users = self.users.lock().expect("push hub lock");
        let Some(entry) = users.get_mut(user) else { return };
        let is_signal = matches!(*pushed, Pushed::Signal(_));
        entry.sockets.retain(|_, slot| match slot.tx.try_send(pushed.clone()) {
            Ok(()) => true,
            // Ephemeral signals (typing, presence) are best-effort: a full
            // queue drops them rather than costing the socket its
            // connection (so nobody can get a user kicked by flooding them
            // with typing). A delivery or a recheck it cannot take would be
            // lost: the socket is dropped, and resumes by its cursor.
            Err(mpsc::error::TrySendError::Full(_)) if is_signal => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                // The socket task counts and disconnects it.
                slot.kick.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    /// The deliveries of `user` after `cursor` (a page of at most `limit`).
    pub async fn replay(&self, user: &str, cursor: u64, limit: usize) -> anyhow::Result<Replay> {
        self.bus.replay(user, cursor, limit).await
    }

    /// Whether `user` was a member of `room` as of log sequence `log_seq`.
    pub async fn member_at(&self, user: &str, room: &str, log_seq: u64) -> anyhow::Result<bool> {
        self.bus.member_at(user, room, log_seq).await
    }

    /// Relays an ephemeral signal to `to`'s sockets on every node.
    pub async fn signal(&self, to: &str, payload: &Payload) -> anyhow::Result<()> {
        self.bus.signal(to, payload).await
    }
}

async fn dispatch(hub: Weak<PushHub>, user: String, mut live: BoxStream<'static, Arc<Pushed>>) {
    while let Some(pushed) = live.next().await {
        let Some(hub) = hub.upgrade() else { return };
        hub.fan(&user, pushed);
    }
    // The bus ended the user's live feed (it could not keep it exact):
    // their sockets here reconnect and resume by their cursors.
    let Some(hub) = hub.upgrade() else { return };
    tracing::warn!(%user, "live deliveries ended; disconnecting the user's sockets here so they resume by cursor");
    let mut users = hub.users.lock().expect("push hub lock");
    if let Some(entry) = users.remove(&user) {
        for slot in entry.sockets.values() {
            slot.kick.notify_one();
        }
    }
}
