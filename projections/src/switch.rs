//! A projection's live version, and the one being rebuilt beside it.
//!
//! Readers always read the *active* version; every write (the projector's
//! and the writing node's own) goes to the active version and, during a
//! rebuild, to the *building* one too. A rebuild ends by making the building
//! version active: readers switch in one step and never see a half-built
//! view. Right after the switch the old version takes the second slot for
//! a moment, so nodes that switched keep writing it while nodes that have
//! not yet noticed still read it.
//!
//! A switch may bound its store's calls ([`Switch::bounded_by`]): a read
//! that takes longer fails as unavailable (503 to a client) and a write
//! fails (a node's read-your-writes apply is left to the projector; a
//! projector retries), so a store that stalls instead of refusing holds
//! nobody forever.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use natter_events::Envelope;

use crate::projection::{ApplyError, Projection};
use crate::views::{CountStore, MessageView, RoomMessageView, RoomView, StoreError, UserView, ViewStore};

type Versioned<T> = (u32, Arc<T>);

pub struct Switch<T> {
    name: &'static str,
    active: RwLock<Versioned<T>>,
    building: RwLock<Option<Versioned<T>>>,
    /// How long a read or a one-event write may take (a batch:
    /// [`BATCH_LIMIT_FACTOR`] times as long).
    limit: Option<Duration>,
}

/// A projector's batch (up to a few hundred events) may take this many
/// times a read's limit.
pub const BATCH_LIMIT_FACTOR: u32 = 12;

impl<T> Switch<T> {
    pub fn new(name: &'static str, version: u32, store: Arc<T>) -> Self {
        Switch { name, active: RwLock::new((version, store)), building: RwLock::new(None), limit: None }
    }

    /// Bounds every call to the store: reads and one-event writes (a
    /// node's read-your-writes apply) by `limit`, a projector's batches by
    /// [`BATCH_LIMIT_FACTOR`] × `limit` (every version written within it).
    pub fn bounded_by(mut self, limit: Duration) -> Self {
        self.limit = Some(limit);
        self
    }

    async fn read<R>(&self, op: impl Future<Output = Result<R, StoreError>>) -> Result<R, StoreError> {
        let Some(limit) = self.limit else { return op.await };
        match tokio::time::timeout(limit, op).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!("{} did not answer within {} ms (NATTER_STORE_TIMEOUT_MS)", self.name, limit.as_millis()))),
        }
    }

    async fn write(&self, factor: u32, op: impl Future<Output = Result<(), ApplyError>>) -> Result<(), ApplyError> {
        let Some(limit) = self.limit.map(|l| l * factor) else { return op.await };
        match tokio::time::timeout(limit, op).await {
            Ok(r) => r,
            Err(_) => Err(ApplyError::Unavailable(format!("{} took longer than {} ms to apply", self.name, limit.as_millis()))),
        }
    }

    pub fn active(&self) -> Arc<T> {
        self.active.read().expect("switch lock").1.clone()
    }

    pub fn active_version(&self) -> u32 {
        self.active.read().expect("switch lock").0
    }

    pub fn building_version(&self) -> Option<u32> {
        self.building.read().expect("switch lock").as_ref().map(|(v, _)| *v)
    }

    pub fn set_active(&self, version: u32, store: Arc<T>) {
        *self.active.write().expect("switch lock") = (version, store);
    }

    pub fn set_building(&self, building: Option<(u32, Arc<T>)>) {
        *self.building.write().expect("switch lock") = building;
    }

    /// Sets both slots in one step (no writer sees one changed and not the
    /// other).
    pub fn set_both(&self, active: Versioned<T>, building: Option<Versioned<T>>) {
        let mut a = self.active.write().expect("switch lock");
        let mut b = self.building.write().expect("switch lock");
        *a = active;
        *b = building;
    }

    fn targets(&self) -> Vec<Arc<T>> {
        let active = self.active.read().expect("switch lock");
        let building = self.building.read().expect("switch lock");
        let mut out = vec![active.1.clone()];
        if let Some((_, b)) = building.as_ref() {
            out.push(b.clone());
        }
        out
    }
}

#[async_trait]
impl<T: Projection + 'static> Projection for Switch<T> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn version(&self) -> u32 {
        self.active_version()
    }
    fn ordered(&self) -> bool {
        self.active().ordered()
    }
    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        self.write(1, async {
            for target in self.targets() {
                target.apply(env).await?;
            }
            Ok(())
        })
        .await
    }
    async fn apply_batch(&self, batch: &[(&Envelope, u64)]) -> Result<(), ApplyError> {
        self.write(BATCH_LIMIT_FACTOR, async {
            for target in self.targets() {
                target.apply_batch(batch).await?;
            }
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl<T: ViewStore + 'static> ViewStore for Switch<T> {
    async fn check(&self) -> Result<(), StoreError> {
        self.read(self.active().check()).await
    }
    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        self.write(1, async {
            for target in self.targets() {
                ViewStore::apply(target.as_ref(), env).await?;
            }
            Ok(())
        })
        .await
    }
    async fn user(&self, id: &str) -> Result<Option<UserView>, StoreError> {
        self.read(self.active().user(id)).await
    }
    async fn users_by_ids(&self, ids: &[String]) -> Result<Vec<UserView>, StoreError> {
        self.read(self.active().users_by_ids(ids)).await
    }
    async fn user_by_email(&self, email: &str) -> Result<Option<UserView>, StoreError> {
        self.read(self.active().user_by_email(email)).await
    }
    async fn users(&self, except: &str, after: Option<&str>, limit: u32) -> Result<Vec<UserView>, StoreError> {
        self.read(self.active().users(except, after, limit)).await
    }
    async fn message(&self, id: &str) -> Result<Option<MessageView>, StoreError> {
        self.read(self.active().message(id)).await
    }
    async fn message_by_command(&self, command_id: &str) -> Result<Option<MessageView>, StoreError> {
        self.read(self.active().message_by_command(command_id)).await
    }
    async fn messages(&self, conversation: &str, before: Option<u64>, limit: u32) -> Result<Vec<MessageView>, StoreError> {
        self.read(self.active().messages(conversation, before, limit)).await
    }
    async fn watermarks(&self, conversation: &str) -> Result<HashMap<String, u64>, StoreError> {
        self.read(self.active().watermarks(conversation)).await
    }
    async fn contents(&self, ids: &[String]) -> Result<HashMap<String, crate::Content>, StoreError> {
        self.read(self.active().contents(ids)).await
    }
    async fn reactions(&self, ids: &[String]) -> Result<HashMap<String, crate::Reactions>, StoreError> {
        self.read(self.active().reactions(ids)).await
    }
    async fn reaction_mark(&self, message: &str, user: &str, emoji: &str) -> Result<u64, StoreError> {
        self.read(self.active().reaction_mark(message, user, emoji)).await
    }
    async fn blocked_among(&self, user: &str, others: &[String]) -> Result<Vec<String>, StoreError> {
        self.read(self.active().blocked_among(user, others)).await
    }
    async fn room(&self, id: &str) -> Result<Option<RoomView>, StoreError> {
        self.read(self.active().room(id)).await
    }
    async fn rooms(&self, after: Option<&str>, limit: u32) -> Result<Vec<RoomView>, StoreError> {
        self.read(self.active().rooms(after, limit)).await
    }
    async fn room_members(&self, room: &str) -> Result<Vec<String>, StoreError> {
        self.read(self.active().room_members(room)).await
    }
    async fn is_member(&self, room: &str, user: &str) -> Result<bool, StoreError> {
        self.read(self.active().is_member(room, user)).await
    }
    async fn room_message(&self, id: &str) -> Result<Option<RoomMessageView>, StoreError> {
        self.read(self.active().room_message(id)).await
    }
    async fn room_message_by_command(&self, command_id: &str) -> Result<Option<RoomMessageView>, StoreError> {
        self.read(self.active().room_message_by_command(command_id)).await
    }
    async fn room_messages(&self, room: &str, before: Option<u64>, limit: u32) -> Result<Vec<RoomMessageView>, StoreError> {
        self.read(self.active().room_messages(room, before, limit)).await
    }
}

#[async_trait]
impl<T: CountStore + 'static> CountStore for Switch<T> {
    async fn check(&self) -> Result<(), StoreError> {
        self.read(self.active().check()).await
    }
    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        self.write(1, async {
            for target in self.targets() {
                CountStore::apply(target.as_ref(), env).await?;
            }
            Ok(())
        })
        .await
    }
    async fn unseen(&self, user: &str) -> Result<HashMap<String, u64>, StoreError> {
        self.read(self.active().unseen(user)).await
    }
    async fn room_unread(&self, user: &str, rooms: &[String]) -> Result<HashMap<String, u64>, StoreError> {
        self.read(self.active().room_unread(user, rooms)).await
    }
}
