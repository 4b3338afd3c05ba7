//! In-memory view store and unseen counts, with exactly the semantics of the
//! MongoDB and Redis adapters (insert-once by id, unique keys, `$max`
//! watermarks, position-guarded counts). Used by the pure projection tests
//! and, later, the embedded single-node mode.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use natter_events::{Envelope, Event, subjects};

use crate::projection::{ApplyError, Projection};
use crate::views::{CountStore, MessageView, StoreError, UserView, ViewStore};

#[derive(Default)]
struct Views {
    users: BTreeMap<String, UserView>,
    emails: HashMap<String, String>,
    messages: HashMap<String, MessageView>,
    by_command: HashMap<String, String>,
    by_seq: BTreeMap<(String, u64), String>,
    watermarks: HashMap<String, HashMap<String, u64>>,
}

#[derive(Default)]
pub struct MemoryViews {
    inner: Mutex<Views>,
}

impl MemoryViews {
    fn lock(&self) -> std::sync::MutexGuard<'_, Views> {
        self.inner.lock().expect("memory views lock")
    }
}

#[async_trait]
impl ViewStore for MemoryViews {
    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        let mut v = self.lock();
        match &env.event {
            Event::UserRegistered(e) => {
                if v.users.contains_key(&e.user_id) {
                    return Ok(());
                }
                if v.emails.contains_key(&e.email) {
                    return Err(ApplyError::Poison(format!("{}: email already held by another user", e.user_id)));
                }
                v.emails.insert(e.email.clone(), e.user_id.clone());
                v.users.insert(e.user_id.clone(), UserView::from_event(env, e));
            }
            Event::MessageSent(e) => {
                if v.messages.contains_key(&e.message_id) {
                    return Ok(());
                }
                let view = MessageView::from_event(env, e);
                let seq_key = (view.conversation.clone(), view.seq);
                if v.by_command.contains_key(&view.command_id) || v.by_seq.contains_key(&seq_key) {
                    return Err(ApplyError::Poison(format!("{}: unique key already held by another message", view.id)));
                }
                v.by_command.insert(view.command_id.clone(), view.id.clone());
                v.by_seq.insert(seq_key, view.id.clone());
                v.messages.insert(view.id.clone(), view);
            }
            Event::MessagesSeen(e) => {
                let conversation = subjects::dm_conversation(&e.reader_id, &e.peer_id);
                let mark = v.watermarks.entry(conversation).or_default().entry(e.reader_id.clone()).or_insert(0);
                *mark = (*mark).max(e.up_to_seq);
            }
        }
        Ok(())
    }

    async fn user(&self, id: &str) -> Result<Option<UserView>, StoreError> {
        Ok(self.lock().users.get(id).cloned())
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<UserView>, StoreError> {
        let v = self.lock();
        Ok(v.emails.get(email).and_then(|id| v.users.get(id)).cloned())
    }

    async fn users(&self, except: &str, after: Option<&str>, limit: u32) -> Result<Vec<UserView>, StoreError> {
        let v = self.lock();
        Ok(v.users
            .values()
            .filter(|u| u.id != except && after.is_none_or(|a| u.id.as_str() > a))
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn message(&self, id: &str) -> Result<Option<MessageView>, StoreError> {
        Ok(self.lock().messages.get(id).cloned())
    }

    async fn message_by_command(&self, command_id: &str) -> Result<Option<MessageView>, StoreError> {
        let v = self.lock();
        Ok(v.by_command.get(command_id).and_then(|id| v.messages.get(id)).cloned())
    }

    async fn messages(&self, conversation: &str, before: Option<u64>, limit: u32) -> Result<Vec<MessageView>, StoreError> {
        let v = self.lock();
        let end = before.unwrap_or(u64::MAX);
        let mut page: Vec<MessageView> = v
            .by_seq
            .range((conversation.to_owned(), 0)..(conversation.to_owned(), end))
            .rev()
            .take(limit as usize)
            .filter_map(|(_, id)| v.messages.get(id).cloned())
            .collect();
        page.reverse();
        Ok(page)
    }

    async fn watermarks(&self, conversation: &str) -> Result<HashMap<String, u64>, StoreError> {
        Ok(self.lock().watermarks.get(conversation).cloned().unwrap_or_default())
    }
}

#[async_trait]
impl Projection for MemoryViews {
    fn name(&self) -> &'static str {
        "mongo-views"
    }
    fn version(&self) -> u32 {
        1
    }
    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        ViewStore::apply(self, env).await
    }
}

/// user → peer → (position of the event the count came from, count)
#[derive(Default)]
pub struct MemoryCounts {
    inner: Mutex<HashMap<String, HashMap<String, (u64, u64)>>>,
}

#[async_trait]
impl CountStore for MemoryCounts {
    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        let state = match &env.event {
            Event::MessageSent(e) => &e.state,
            Event::MessagesSeen(e) => &e.state,
            Event::UserRegistered(_) => return Ok(()),
        };
        let mut counts = self.inner.lock().expect("memory counts lock");
        for (reader, peer) in [(&state.lo, &state.hi), (&state.hi, &state.lo)] {
            let slot = counts.entry(reader.user_id.clone()).or_default().entry(peer.user_id.clone()).or_insert((0, 0));
            if env.position > slot.0 {
                *slot = (env.position, state.unseen(&reader.user_id, &peer.user_id));
            }
        }
        Ok(())
    }

    async fn unseen(&self, user: &str) -> Result<HashMap<String, u64>, StoreError> {
        let counts = self.inner.lock().expect("memory counts lock");
        Ok(counts
            .get(user)
            .map(|peers| peers.iter().filter(|(_, (_, n))| *n > 0).map(|(p, (_, n))| (p.clone(), *n)).collect())
            .unwrap_or_default())
    }
}

#[async_trait]
impl Projection for MemoryCounts {
    fn name(&self) -> &'static str {
        "redis-unseen"
    }
    fn version(&self) -> u32 {
        1
    }
    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        CountStore::apply(self, env).await
    }
}
