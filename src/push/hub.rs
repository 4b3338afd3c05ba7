//! A node's push hub: one subscription per user with sockets on this node,
//! fanned out to each socket's bounded queue; replay from a cursor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::{Delivery, Payload, inbox_stream, inbox_subject, push_subject, signal_subject};

/// What a socket's queue carries.
#[derive(Debug, Clone)]
pub enum Pushed {
    /// A stored delivery, with its cursor.
    Delivery(Delivery),
    /// An ephemeral signal (typing): no cursor, never replayed.
    Signal(Payload),
}

struct Slot {
    tx: mpsc::Sender<Pushed>,
    kick: Arc<Notify>,
}

struct UserEntry {
    sockets: HashMap<u64, Slot>,
    task: JoinHandle<()>,
}

pub struct PushHub {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    inbox: String,
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
    pub rx: mpsc::Receiver<Pushed>,
    /// Notified when the socket's queue overflowed: disconnect it.
    pub kicked: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.leave(&self.user, self.key);
    }
}

/// Where a replay stands.
pub enum Replay {
    /// Up to a page of deliveries after the cursor, oldest first (empty: caught up).
    Page(Vec<Delivery>),
    /// Deliveries after the cursor are no longer retained: the client must
    /// refetch over REST and continue from `head`.
    TooOld { head: u64 },
}

fn header_u64(headers: Option<&async_nats::HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}

impl PushHub {
    /// Makes sure the inbox stream exists (with republish to the push
    /// subjects) and returns the hub.
    pub async fn connect(
        client: async_nats::Client,
        js: jetstream::Context,
        stream_name: &str,
        prefix: &str,
        retention: Duration,
        queue: usize,
    ) -> anyhow::Result<Arc<PushHub>> {
        let inbox = inbox_stream(stream_name);
        js.get_or_create_stream(stream::Config {
            name: inbox.clone(),
            subjects: vec![format!("{prefix}.inbox.user.*")],
            storage: stream::StorageType::File,
            max_age: retention,
            duplicate_window: Duration::from_secs(120).min(retention),
            allow_direct: true,
            republish: Some(stream::Republish {
                source: format!("{prefix}.inbox.user.*"),
                destination: format!("{prefix}.push.user.{{{{wildcard(1)}}}}"),
                headers_only: false,
            }),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the push inbox stream {inbox}"))?;
        Ok(Arc::new(PushHub {
            client,
            js,
            prefix: prefix.to_owned(),
            inbox,
            queue,
            users: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
        }))
    }

    async fn stream_state(&self) -> anyhow::Result<stream::State> {
        let mut s = self.js.get_stream(&self.inbox).await?;
        Ok(s.info().await?.state.clone())
    }

    /// The newest cursor in the inbox (0: empty).
    pub async fn head(&self) -> anyhow::Result<u64> {
        Ok(self.stream_state().await?.last_sequence)
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
        let live = self.client.subscribe(push_subject(&self.prefix, user)).await?;
        let signals = self.client.subscribe(signal_subject(&self.prefix, user)).await?;
        // The server has the subscriptions once it answers a flush.
        self.client.flush().await?;
        let mut users = self.users.lock().expect("push hub lock");
        match users.get_mut(user) {
            // Another socket of the user subscribed meanwhile: use theirs.
            Some(entry) => {
                entry.sockets.insert(key, slot());
            }
            None => {
                let task = tokio::spawn(dispatch(Arc::downgrade(self), user.to_owned(), live, signals));
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

    fn fan(&self, user: &str, pushed: Pushed) {
        let mut users = self.users.lock().expect("push hub lock");
        let Some(entry) = users.get_mut(user) else { return };
        let is_signal = matches!(pushed, Pushed::Signal(_));
        entry.sockets.retain(|_, slot| match slot.tx.try_send(pushed.clone()) {
            Ok(()) => true,
            // Ephemeral signals (typing, presence) are best-effort: a full
            // queue drops them rather than costing the socket its connection
            // (so nobody can get a user kicked by flooding them with typing).
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
        let state = self.stream_state().await?;
        if cursor > state.last_sequence || cursor + 1 < state.first_sequence {
            return Ok(Replay::TooOld { head: state.last_sequence });
        }
        let stream = self.js.get_stream(&self.inbox).await?;
        let subject = inbox_subject(&self.prefix, user);
        let mut page = Vec::new();
        let mut previous = cursor;
        while page.len() < limit {
            match stream.direct_get_next_for_subject(&subject, Some(previous + 1)).await {
                Ok(msg) => {
                    let payload: Payload = serde_json::from_slice(&msg.payload)
                        .with_context(|| format!("inbox message {} is not a delivery", msg.sequence))?;
                    page.push(Delivery { cursor: msg.sequence, previous, payload });
                    previous = msg.sequence;
                }
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Replay::Page(page))
    }

    /// Relays an ephemeral signal to `to`'s sockets on every node.
    pub async fn signal(&self, to: &str, payload: &Payload) -> anyhow::Result<()> {
        let body = serde_json::to_vec(payload)?;
        self.client.publish(signal_subject(&self.prefix, to), body.into()).await?;
        Ok(())
    }
}

async fn dispatch(hub: Weak<PushHub>, user: String, mut live: async_nats::Subscriber, mut signals: async_nats::Subscriber) {
    loop {
        let pushed = tokio::select! {
            msg = live.next() => {
                let Some(msg) = msg else { break };
                let headers = msg.headers.as_ref();
                let (Some(cursor), Some(previous)) = (header_u64(headers, "Nats-Sequence"), header_u64(headers, "Nats-Last-Sequence")) else {
                    tracing::warn!(%user, subject = %msg.subject, "push without stream sequence headers; dropped");
                    continue;
                };
                match serde_json::from_slice::<Payload>(&msg.payload) {
                    Ok(payload) => Pushed::Delivery(Delivery { cursor, previous, payload }),
                    Err(e) => {
                        tracing::warn!(%user, cursor, error = %e, "undecodable push; the socket will fetch it on the next gap check");
                        continue;
                    }
                }
            }
            msg = signals.next() => {
                let Some(msg) = msg else { break };
                match serde_json::from_slice::<Payload>(&msg.payload) {
                    Ok(payload) => Pushed::Signal(payload),
                    Err(_) => continue,
                }
            }
        };
        let Some(hub) = hub.upgrade() else { break };
        hub.fan(&user, pushed);
    }
}
