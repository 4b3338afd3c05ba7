//! MongoDB view store: collections `users`, `messages`, `conversations` in
//! one database.
//!
//! - `users`: `_id` = user id, unique `email`.
//! - `messages`: `_id` = message id, unique `commandId` (the idempotency key)
//!   and unique `(conversation, seq)`.
//! - `conversations`: `_id` = `<lo>.<hi>`, `wm_<userId>` = that reader's
//!   watermark. Top-level fields rather than a nested `watermarks.<userId>`
//!   path: nx-27017 (the test suite's MongoDB-protocol server) stores a dotted
//!   `$max` path of an upsert-insert as a literal field name, and top-level
//!   fields behave the same on it and on MongoDB.
//!
//! - `rooms`: `_id` = room id.
//! - `room_members`: `_id` = `<roomId>:<userId>`, `member` (bool) and `mpos`,
//!   the position of the membership event it came from (newer wins).
//! - `room_messages`: `_id` = message id, unique `commandId` and unique
//!   `(roomId, seq)`.
//! - `blocks`: `_id` = `<userId>:<otherId>`, `user`, `other`, and `b` =
//!   position × 2 + blocked of the newest block change (`$max`), indexed by
//!   `user`.
//!
//! Writes are `$setOnInsert` upserts keyed by ids from the event, or `$max`
//! on watermarks: applying any event twice, or events out of order, leaves
//! the same documents. Ids are validated subject-safe tokens, so they are
//! also safe as field names.

use std::collections::HashMap;

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{self, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::IndexOptions;
use mongodb::{Collection, Database, IndexModel};
use natter_events::{Envelope, Event, subjects};

use crate::projection::{ApplyError, Projection};
use crate::views::{MessageView, RoomMessageView, RoomView, StoreError, UserView, ViewStore};

const DUPLICATE_KEY: i32 = 11000;
/// Prefix of a reader's watermark field in a `conversations` document.
const WATERMARK: &str = "wm_";

#[derive(Clone)]
pub struct MongoViews {
    db: Database,
    users: Collection<UserView>,
    messages: Collection<MessageView>,
    conversations: Collection<Document>,
    rooms: Collection<RoomView>,
    members: Collection<Document>,
    room_messages: Collection<RoomMessageView>,
    blocks: Collection<Document>,
    reactions: Collection<Document>,
    /// Whether the last batch found none of its documents there (a
    /// rebuild, or a catch-up after the stores were down): the next one is
    /// inserted without looking first.
    expect_new: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Up to `limit` documents matching `filter`, in `_id` order (cursor paging).
async fn first_by_id<T>(collection: &Collection<T>, filter: Document, limit: u32) -> Result<Vec<T>, StoreError>
where
    T: serde::de::DeserializeOwned + Send + Sync,
{
    collection
        .find(filter)
        .sort(doc! {"_id": 1})
        .limit(i64::from(limit))
        .await
        .map_err(unavailable)?
        .try_collect()
        .await
        .map_err(unavailable)
}

fn unavailable(e: mongodb::error::Error) -> StoreError {
    StoreError::Unavailable(format!("mongodb: {e}"))
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => e.to_string().contains("E11000"),
    }
}

impl MongoViews {
    /// Opens the (version 1) views in `db` and makes sure their indexes exist.
    pub async fn open(db: &Database) -> Result<Self, StoreError> {
        Self::open_version(db, 1).await
    }

    /// Collection names of a version: plain for version 1, `<name>_v<N>` after.
    fn collection_name(base: &str, version: u32) -> String {
        if version <= 1 { base.to_owned() } else { format!("{base}_v{version}") }
    }

    pub const COLLECTIONS: [&'static str; 8] = ["users", "messages", "conversations", "rooms", "room_members", "room_messages", "blocks", "reactions"];

    /// Opens version `version` of the views in `db` (creating its indexes).
    pub async fn open_version(db: &Database, version: u32) -> Result<Self, StoreError> {
        let name = |base: &str| Self::collection_name(base, version);
        let views = MongoViews {
            db: db.clone(),
            users: db.collection(&name("users")),
            messages: db.collection(&name("messages")),
            conversations: db.collection(&name("conversations")),
            rooms: db.collection(&name("rooms")),
            members: db.collection(&name("room_members")),
            room_messages: db.collection(&name("room_messages")),
            blocks: db.collection(&name("blocks")),
            reactions: db.collection(&name("reactions")),
            expect_new: Default::default(),
        };
        let unique = || Some(IndexOptions::builder().unique(true).build());
        let indexes: [(&Collection<Document>, Document, Option<IndexOptions>); 8] = [
            (&views.users.clone_with_type(), doc! {"email": 1}, unique()),
            (&views.messages.clone_with_type(), doc! {"commandId": 1}, unique()),
            (&views.messages.clone_with_type(), doc! {"conversation": 1, "seq": 1}, unique()),
            (&views.room_messages.clone_with_type(), doc! {"commandId": 1}, unique()),
            (&views.room_messages.clone_with_type(), doc! {"roomId": 1, "seq": 1}, unique()),
            (&views.members, doc! {"roomId": 1}, None),
            (&views.blocks, doc! {"user": 1}, None),
            (&views.reactions, doc! {"m": 1}, None),
        ];
        for (collection, keys, options) in indexes {
            collection
                .create_index(IndexModel::builder().keys(keys).options(options).build())
                .await
                .map_err(unavailable)?;
        }
        Ok(views)
    }

    /// Empties the reply previews still held by messages of version
    /// `version` written before previews were read when shown (events and
    /// views now hold only the answered id); returns how many it emptied.
    pub async fn clear_reply_previews(db: &Database, version: u32) -> Result<u64, StoreError> {
        let mut cleared = 0;
        for base in ["messages", "room_messages"] {
            let collection = db.collection::<Document>(&Self::collection_name(base, version));
            let done = collection
                .update_many(doc! {"replyTo.preview": {"$gt": ""}}, doc! {"$set": {"replyTo.preview": ""}})
                .await
                .map_err(unavailable)?;
            cleared += done.modified_count;
        }
        Ok(cleared)
    }

    /// Drops every collection of version `version` (a replaced or abandoned build).
    pub async fn drop_version(db: &Database, version: u32) -> Result<(), StoreError> {
        for base in Self::COLLECTIONS {
            db.collection::<Document>(&Self::collection_name(base, version)).drop().await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// Sets a membership from the event at `position` of the member's
    /// subject, unless a newer one is already applied. Written without `$or`
    /// in the filter: nx-27017 0.8.1 drops the `_id` condition of a filter
    /// that also has `$or` and updates other documents.
    async fn set_membership(&self, room: &str, user: &str, member: bool, position: u64) -> Result<(), ApplyError> {
        let id = format!("{room}:{user}");
        let pos = position as i64;
        let fields = doc! {"roomId": room, "userId": user, "member": member, "mpos": pos};
        loop {
            // Newer than what is there: update in place.
            let updated = self
                .members
                .update_one(doc! {"_id": &id, "mpos": {"$lt": pos}}, doc! {"$set": fields.clone()})
                .await
                .map_err(unavailable)?;
            if updated.matched_count > 0 {
                return Ok(());
            }
            // Not there at all: insert.
            match self.members.update_one(doc! {"_id": &id}, doc! {"$setOnInsert": fields.clone()}).upsert(true).await {
                Ok(r) if r.upserted_id.is_some() => return Ok(()),
                Ok(_) => {}
                Err(e) if is_duplicate_key(&e) => {}
                Err(e) => return Err(unavailable(e).into()),
            }
            // There, but was it newer? (Another writer may have inserted an
            // older one between the two steps: then go round again.)
            let current = self.members.find_one(doc! {"_id": &id}).await.map_err(unavailable)?;
            let current_pos = current.as_ref().and_then(|d| d.get_i64("mpos").ok().or_else(|| d.get_i32("mpos").ok().map(i64::from)));
            if current_pos.is_some_and(|p| p >= pos) {
                return Ok(());
            }
        }
    }

    /// Records a block change; a newer one already there wins (`$max`).
    async fn set_block(&self, user: &str, other: &str, blocked: bool, position: u64) -> Result<(), ApplyError> {
        let mark = crate::views::block_mark(position, blocked) as i64;
        Self::raise_mark(&self.blocks, &format!("{user}:{other}"), "b", mark, doc! {"user": user, "other": other}).await
    }

    /// Records a reaction change of (message, user, emoji); a newer one
    /// already there wins (`$max`).
    async fn set_reaction(&self, e: &natter_events::ReactionChanged, position: u64) -> Result<(), ApplyError> {
        let mark = crate::views::reaction_mark(position, e.on) as i64;
        let id = format!("{}:{}:{}", e.message_id, e.user_id, e.emoji);
        Self::raise_mark(&self.reactions, &id, "r", mark, doc! {"m": &e.message_id, "u": &e.user_id, "e": &e.emoji}).await
    }

    /// Raises field `field` of document `id` to `mark` (`$max`), creating
    /// it with `fields` if it is not there.
    async fn raise_mark(coll: &Collection<Document>, id: &str, field: &str, mark: i64, fields: Document) -> Result<(), ApplyError> {
        let update = doc! {"$max": {field: mark}, "$setOnInsert": fields};
        match coll.update_one(doc! {"_id": id}, update).upsert(true).await {
            Ok(_) => Ok(()),
            // Two writers inserting at once: the document is there now.
            Err(e) if is_duplicate_key(&e) => {
                coll.update_one(doc! {"_id": id}, doc! {"$max": {field: mark}}).await.map_err(unavailable)?;
                Ok(())
            }
            Err(e) => Err(unavailable(e).into()),
        }
    }

    /// Writes a message (`doc`, direct or in a room) as an edit or a
    /// deletion left it, unless the view already holds content from a
    /// newer event (`cpos`; a tombstone's is above all): the same result
    /// whatever order the send and its changes arrive in. Written without
    /// `$or` (see `set_membership`).
    async fn put_revision<T: Send + Sync>(&self, coll: &Collection<T>, id: &str, cpos: u64, doc: Document) -> Result<(), ApplyError> {
        let coll = coll.clone_with_type::<Document>();
        let pos = cpos as i64;
        for _ in 0..3 {
            for guard in [doc! {"$lt": pos}, doc! {"$exists": false}] {
                let replaced = coll.replace_one(doc! {"_id": id, "cpos": guard}, doc.clone()).await.map_err(unavailable)?;
                if replaced.matched_count > 0 {
                    return Ok(());
                }
            }
            match coll.insert_one(doc.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) if is_duplicate_key(&e) => {
                    let current = coll.find_one(doc! {"_id": id}).await.map_err(unavailable)?;
                    match current.map(|d| d.get_i64("cpos").ok().or_else(|| d.get_i32("cpos").ok().map(i64::from))) {
                        None => return Err(ApplyError::Poison(format!("{id}: unique key already held by another message: {e}"))),
                        Some(Some(p)) if p >= pos => return Ok(()),
                        // Older content inserted meanwhile: replace it.
                        Some(_) => {}
                    }
                }
                Err(e) => return Err(unavailable(e).into()),
            }
        }
        Err(ApplyError::Unavailable(format!("{id}: the message changed under three attempts to write it")))
    }

    /// [`MongoViews::put_revision`] of the message an edit or deletion event leaves.
    async fn revise(&self, env: &Envelope) -> Result<(), ApplyError> {
        if let Some(v) = MessageView::of(env) {
            return self.put_revision(&self.messages, &v.id, v.cpos, to_doc(&v)?).await;
        }
        if let Some(v) = RoomMessageView::of(env) {
            return self.put_revision(&self.room_messages, &v.id, v.cpos, to_doc(&v)?).await;
        }
        Ok(())
    }

    async fn insert_once<T>(&self, coll: &Collection<T>, id: &str, doc: Document) -> Result<(), ApplyError>
    where
        T: Send + Sync,
    {
        let res = coll
            .update_one(doc! {"_id": id}, doc! {"$setOnInsert": doc})
            .upsert(true)
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => {
                // Either a concurrent upsert of the same _id (applied: fine) or
                // another document already holds a unique key of this one.
                let exists = coll
                    .clone_with_type::<Document>()
                    .find_one(doc! {"_id": id})
                    .await
                    .map_err(unavailable)?
                    .is_some();
                if exists {
                    Ok(())
                } else {
                    Err(ApplyError::Poison(format!("{id}: unique key already held by another document: {e}")))
                }
            }
            Err(e) => Err(unavailable(e).into()),
        }
    }
}

#[async_trait]
impl ViewStore for MongoViews {
    async fn check(&self) -> Result<(), StoreError> {
        self.db.run_command(doc! {"ping": 1}).await.map(|_| ()).map_err(unavailable)
    }

    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        match &env.event {
            Event::UserRegistered(e) => {
                let view = UserView::from_event(env, e);
                let doc = bson::to_document(&view).map_err(|e| ApplyError::Poison(e.to_string()))?;
                self.insert_once(&self.users, &view.id, doc).await
            }
            Event::MessageSent(e) => {
                let view = MessageView::from_event(env, e);
                let doc = bson::to_document(&view).map_err(|e| ApplyError::Poison(e.to_string()))?;
                self.insert_once(&self.messages, &view.id, doc).await
            }
            Event::MessageEdited(_) | Event::MessageDeleted(_) | Event::RoomMessageEdited(_) | Event::RoomMessageDeleted(_) => self.revise(env).await,
            Event::RoomCreated(e) => {
                let view = RoomView::from_event(env, e);
                let doc = bson::to_document(&view).map_err(|e| ApplyError::Poison(e.to_string()))?;
                self.insert_once(&self.rooms, &view.id, doc).await
            }
            Event::MemberJoined(e) => self.set_membership(&e.room_id, &e.user_id, true, env.position).await,
            Event::MemberLeft(e) => self.set_membership(&e.room_id, &e.user_id, false, env.position).await,
            Event::RoomRead(_) | Event::MemberInvited(_) | Event::RoleChanged(_) => Ok(()),
            Event::RoomMessageSent(e) => {
                let view = RoomMessageView::from_event(env, e);
                let doc = bson::to_document(&view).map_err(|e| ApplyError::Poison(e.to_string()))?;
                self.insert_once(&self.room_messages, &view.id, doc).await
            }
            Event::MessagesSeen(e) => {
                let conversation = subjects::dm_conversation(&e.reader_id, &e.peer_id);
                let field = format!("{WATERMARK}{}", e.reader_id);
                self.conversations
                    .update_one(doc! {"_id": conversation}, doc! {"$max": {field: e.up_to_seq as i64}})
                    .upsert(true)
                    .await
                    .map_err(unavailable)?;
                Ok(())
            }
            Event::BlockChanged(e) => self.set_block(&e.user_id, &e.other_id, e.blocked, env.position).await,
            Event::ReactionChanged(e) => self.set_reaction(e, env.position).await,
        }
    }

    async fn user(&self, id: &str) -> Result<Option<UserView>, StoreError> {
        self.users.find_one(doc! {"_id": id}).await.map_err(unavailable)
    }

    async fn users_by_ids(&self, ids: &[String]) -> Result<Vec<UserView>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cursor = self.users.find(doc! {"_id": {"$in": ids}}).await.map_err(unavailable)?;
        cursor.try_collect().await.map_err(unavailable)
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<UserView>, StoreError> {
        self.users.find_one(doc! {"email": email}).await.map_err(unavailable)
    }

    async fn users(&self, except: &str, after: Option<&str>, limit: u32) -> Result<Vec<UserView>, StoreError> {
        let filter = match after {
            Some(after) => doc! {"$and": [{"_id": {"$ne": except}}, {"_id": {"$gt": after}}]},
            None => doc! {"_id": {"$ne": except}},
        };
        first_by_id(&self.users, filter, limit).await
    }

    async fn message(&self, id: &str) -> Result<Option<MessageView>, StoreError> {
        self.messages.find_one(doc! {"_id": id}).await.map_err(unavailable)
    }

    async fn message_by_command(&self, command_id: &str) -> Result<Option<MessageView>, StoreError> {
        self.messages.find_one(doc! {"commandId": command_id}).await.map_err(unavailable)
    }

    async fn messages(&self, conversation: &str, before: Option<u64>, limit: u32) -> Result<Vec<MessageView>, StoreError> {
        Self::page(&self.messages, doc! {"conversation": conversation}, before, limit).await
    }

    async fn watermarks(&self, conversation: &str) -> Result<HashMap<String, u64>, StoreError> {
        let doc = self
            .conversations
            .find_one(doc! {"_id": conversation})
            .await
            .map_err(unavailable)?;
        let mut out = HashMap::new();
        for (field, seq) in doc.iter().flatten() {
            if let Some(user) = field.strip_prefix(WATERMARK) {
                let seq = seq.as_i64().or_else(|| seq.as_i32().map(i64::from)).unwrap_or(0);
                out.insert(user.to_owned(), u64::try_from(seq).unwrap_or(0));
            }
        }
        Ok(out)
    }

    async fn contents(&self, ids: &[String]) -> Result<HashMap<String, crate::Content>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let read = |coll: Collection<Document>| async move {
            let docs: Vec<Document> = coll
                .find(doc! {"_id": {"$in": ids}})
                .projection(doc! {"_id": 1, "message": 1, "attachment": 1, "deleted": 1})
                .await
                .map_err(unavailable)?
                .try_collect()
                .await
                .map_err(unavailable)?;
            Ok::<_, StoreError>(docs)
        };
        let (direct, room) = futures::join!(read(self.messages.clone_with_type::<Document>()), read(self.room_messages.clone_with_type::<Document>()));
        let text = |d: &Document, field: &str| d.get_str(field).ok().map(str::to_owned);
        Ok([direct?, room?]
            .iter()
            .flatten()
            .filter_map(|d| {
                let id = d.get_str("_id").ok()?.to_owned();
                Some((id, crate::Content { message: text(d, "message"), attachment: text(d, "attachment"), deleted: d.get_bool("deleted").unwrap_or(false) }))
            })
            .collect())
    }

    async fn reactions(&self, ids: &[String]) -> Result<HashMap<String, crate::Reactions>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let docs: Vec<Document> = self.reactions.find(doc! {"m": {"$in": ids}}).await.map_err(unavailable)?.try_collect().await.map_err(unavailable)?;
        let mut out: HashMap<String, crate::Reactions> = HashMap::new();
        for d in &docs {
            let mark = d.get_i64("r").ok().or_else(|| d.get_i32("r").ok().map(i64::from)).unwrap_or(0);
            if let (1, Ok(m), Ok(u), Ok(e)) = (mark % 2, d.get_str("m"), d.get_str("u"), d.get_str("e")) {
                out.entry(m.to_owned()).or_default().entry(e.to_owned()).or_default().push(u.to_owned());
            }
        }
        for r in out.values_mut() {
            r.values_mut().for_each(|users| users.sort());
        }
        Ok(out)
    }

    async fn reaction_mark(&self, message: &str, user: &str, emoji: &str) -> Result<u64, StoreError> {
        let d = self.reactions.find_one(doc! {"_id": format!("{message}:{user}:{emoji}")}).await.map_err(unavailable)?;
        Ok(d.and_then(|d| d.get_i64("r").ok().or_else(|| d.get_i32("r").ok().map(i64::from))).unwrap_or(0).max(0) as u64)
    }

    async fn blocked_among(&self, user: &str, others: &[String]) -> Result<Vec<String>, StoreError> {
        if others.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = others.iter().map(|o| format!("{user}:{o}")).collect();
        let docs: Vec<Document> = self.blocks.find(doc! {"_id": {"$in": ids}}).await.map_err(unavailable)?.try_collect().await.map_err(unavailable)?;
        let mark = |d: &Document| d.get_i64("b").ok().or_else(|| d.get_i32("b").ok().map(i64::from)).unwrap_or(0);
        let mut out: Vec<String> = docs.iter().filter(|d| mark(d) % 2 == 1).filter_map(|d| d.get_str("other").ok().map(str::to_owned)).collect();
        out.sort();
        Ok(out)
    }

    async fn room(&self, id: &str) -> Result<Option<RoomView>, StoreError> {
        self.rooms.find_one(doc! {"_id": id}).await.map_err(unavailable)
    }

    async fn rooms(&self, after: Option<&str>, limit: u32) -> Result<Vec<RoomView>, StoreError> {
        let filter = match after {
            Some(after) => doc! {"_id": {"$gt": after}},
            None => doc! {},
        };
        first_by_id(&self.rooms, filter, limit).await
    }

    async fn room_members(&self, room: &str) -> Result<Vec<String>, StoreError> {
        let docs: Vec<Document> = self
            .members
            .find(doc! {"roomId": room, "member": true})
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)?;
        let mut ids: Vec<String> = docs.iter().filter_map(|d| d.get_str("userId").ok().map(str::to_owned)).collect();
        ids.sort();
        Ok(ids)
    }

    async fn is_member(&self, room: &str, user: &str) -> Result<bool, StoreError> {
        let doc = self
            .members
            .find_one(doc! {"_id": format!("{room}:{user}"), "member": true})
            .await
            .map_err(unavailable)?;
        Ok(doc.is_some())
    }

    async fn room_message(&self, id: &str) -> Result<Option<RoomMessageView>, StoreError> {
        self.room_messages.find_one(doc! {"_id": id}).await.map_err(unavailable)
    }

    async fn room_message_by_command(&self, command_id: &str) -> Result<Option<RoomMessageView>, StoreError> {
        self.room_messages.find_one(doc! {"commandId": command_id}).await.map_err(unavailable)
    }

    async fn room_messages(&self, room: &str, before: Option<u64>, limit: u32) -> Result<Vec<RoomMessageView>, StoreError> {
        Self::page(&self.room_messages, doc! {"roomId": room}, before, limit).await
    }
}

impl MongoViews {
    async fn page<T>(coll: &Collection<T>, filter: Document, before: Option<u64>, limit: u32) -> Result<Vec<T>, StoreError>
    where
        T: serde::de::DeserializeOwned + Send + Sync,
    {
        let mut filter = filter;
        if let Some(b) = before {
            filter.insert("seq", doc! {"$lt": b as i64});
        }
        let mut page: Vec<T> = coll
            .find(filter)
            .sort(doc! {"seq": -1})
            .limit(i64::from(limit))
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)?;
        page.reverse();
        Ok(page)
    }
}

/// The `_id` of a view document.
fn id_of(doc: &Document) -> Result<String, ApplyError> {
    doc.get_str("_id").map(str::to_owned).map_err(|e| ApplyError::Poison(format!("view document without a string _id: {e}")))
}

fn to_doc<T: serde::Serialize>(view: &T) -> Result<Document, ApplyError> {
    bson::to_document(view).map_err(|e| ApplyError::Poison(e.to_string()))
}

impl MongoViews {
    /// Inserts those of `docs` whose `_id` is not there yet. Live, the
    /// writing node applied nearly every event already: one read finds
    /// them, and only the rest is inserted. In a rebuild nearly none is
    /// there: once a batch found none, the next ones are inserted at once
    /// (one round trip) and only those refused are looked up. A document
    /// refused because its `_id` is there was applied; one refused for
    /// another unique key, held by a different document, is poison.
    async fn insert_missing<T: Send + Sync>(&self, coll: &Collection<T>, docs: Vec<Document>) -> Result<(), ApplyError> {
        use std::sync::atomic::Ordering::Relaxed;
        if docs.is_empty() {
            return Ok(());
        }
        let coll = coll.clone_with_type::<Document>();
        let present = |ids: Vec<String>| {
            let coll = coll.clone();
            async move {
                let found: Vec<Document> = coll.find(doc! {"_id": {"$in": ids}}).await.map_err(unavailable)?.try_collect().await.map_err(unavailable)?;
                found.iter().map(id_of).collect::<Result<std::collections::HashSet<String>, _>>()
            }
        };
        let ids = docs.iter().map(id_of).collect::<Result<Vec<String>, _>>()?;
        let there = if self.expect_new.load(Relaxed) { Default::default() } else { present(ids.clone()).await? };
        self.expect_new.store(there.is_empty(), Relaxed);
        let mut seen = std::collections::HashSet::new();
        let (missing, missing_ids): (Vec<Document>, Vec<String>) =
            docs.into_iter().zip(ids).filter(|(_, id)| !there.contains(id) && seen.insert(id.clone())).unzip();
        if missing.is_empty() {
            return Ok(());
        }
        let Err(e) = coll.insert_many(missing).ordered(false).await else { return Ok(()) };
        let refused: Vec<String> = match e.kind.as_ref() {
            // Only duplicates, all acknowledged: look the refused ones up.
            // A write-concern error (the writes may yet be rolled back) or
            // any other write error: retry the batch later.
            ErrorKind::InsertMany(failure) => {
                let errors = failure.write_errors.as_deref().unwrap_or_default();
                let only_duplicates = !errors.is_empty() && errors.iter().all(|w| w.code == DUPLICATE_KEY && w.index < missing_ids.len());
                if failure.write_concern_error.is_some() || !only_duplicates {
                    return Err(unavailable(e).into());
                }
                errors.iter().map(|w| missing_ids[w.index].clone()).collect()
            }
            _ if is_duplicate_key(&e) => missing_ids.clone(),
            _ => return Err(unavailable(e).into()),
        };
        if refused.len() * 2 > missing_ids.len() {
            self.expect_new.store(false, Relaxed); // most were there after all: look first again
        }
        let there_now = present(refused.clone()).await?;
        match refused.iter().find(|id| !there_now.contains(*id)) {
            None => Ok(()),
            Some(id) => Err(ApplyError::Poison(format!("{id}: unique key already held by another document: {e}"))),
        }
    }
}

/// The MongoDB views as a named projection for the runtime.
#[async_trait]
impl Projection for MongoViews {
    fn name(&self) -> &'static str {
        "mongo-views"
    }
    fn version(&self) -> u32 {
        1
    }
    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        ViewStore::apply(self, env).await
    }

    /// A batch in a few round trips per collection, the collections at
    /// once: documents inserted once ([`MongoViews::insert_missing`]), one
    /// `$max` per conversation for its read marks, memberships one by one
    /// (rare, and each a guarded read-modify-write).
    async fn apply_batch(&self, batch: &[(&Envelope, u64)]) -> Result<(), ApplyError> {
        let (mut users, mut messages, mut rooms, mut room_messages) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut marks: HashMap<String, Document> = HashMap::new();
        let mut memberships = Vec::new();
        let mut blocks = Vec::new();
        let mut revisions = Vec::new();
        let mut reactions = Vec::new();
        for (env, _) in batch {
            match &env.event {
                Event::MessageEdited(_) | Event::MessageDeleted(_) | Event::RoomMessageEdited(_) | Event::RoomMessageDeleted(_) => revisions.push(*env),
                Event::UserRegistered(e) => users.push(to_doc(&UserView::from_event(env, e))?),
                Event::MessageSent(e) => messages.push(to_doc(&MessageView::from_event(env, e))?),
                Event::RoomCreated(e) => rooms.push(to_doc(&RoomView::from_event(env, e))?),
                Event::RoomMessageSent(e) => room_messages.push(to_doc(&RoomMessageView::from_event(env, e))?),
                Event::MemberJoined(e) => memberships.push((&e.room_id, &e.user_id, true, env.position)),
                Event::MemberLeft(e) => memberships.push((&e.room_id, &e.user_id, false, env.position)),
                Event::RoomRead(_) | Event::MemberInvited(_) | Event::RoleChanged(_) => {}
                Event::BlockChanged(e) => blocks.push((&e.user_id, &e.other_id, e.blocked, env.position)),
                Event::ReactionChanged(e) => reactions.push((e, env.position)),
                Event::MessagesSeen(e) => {
                    let fields = marks.entry(subjects::dm_conversation(&e.reader_id, &e.peer_id)).or_default();
                    let field = format!("{WATERMARK}{}", e.reader_id);
                    let up_to = e.up_to_seq as i64;
                    if fields.get_i64(&field).is_ok_and(|v| v >= up_to) {
                        continue;
                    }
                    fields.insert(field, up_to);
                }
            }
        }
        let marks = async {
            // Block changes are rare: one by one, beside the read marks.
            for (user, other, blocked, position) in blocks {
                self.set_block(user, other, blocked, position).await?;
            }
            for (e, position) in reactions {
                self.set_reaction(e, position).await?;
            }
            for (conversation, fields) in marks {
                self.conversations.update_one(doc! {"_id": conversation}, doc! {"$max": fields}).upsert(true).await.map_err(unavailable)?;
            }
            Ok::<_, ApplyError>(())
        };
        // Memberships the views already hold at that position or a newer
        // one (live, the writing node applied them) cost one read for the
        // whole batch; the rest are set one by one.
        let members = async {
            if memberships.is_empty() {
                return Ok(());
            }
            let ids: Vec<String> = memberships.iter().map(|(room, user, _, _)| format!("{room}:{user}")).collect();
            let found: Vec<Document> =
                self.members.find(doc! {"_id": {"$in": &ids}}).await.map_err(unavailable)?.try_collect().await.map_err(unavailable)?;
            let held: HashMap<String, i64> = found
                .iter()
                .filter_map(|d| Some((d.get_str("_id").ok()?.to_owned(), d.get_i64("mpos").ok().or_else(|| d.get_i32("mpos").ok().map(i64::from))?)))
                .collect();
            for ((room, user, member, position), id) in memberships.into_iter().zip(ids) {
                if held.get(&id).is_some_and(|p| *p >= position as i64) {
                    continue;
                }
                self.set_membership(room, user, member, position).await?;
            }
            Ok(())
        };
        let (u, m, r, rm, w, mb) = futures::join!(
            self.insert_missing(&self.users, users),
            self.insert_missing(&self.messages, messages),
            self.insert_missing(&self.rooms, rooms),
            self.insert_missing(&self.room_messages, room_messages),
            marks,
            members
        );
        // A poison event is reported before a store that is down: the
        // runtime then applies the batch one by one and parks it.
        // Edits and deletions (rare) one by one, after the sends: each is
        // guarded by its position, so the order does not matter, only the
        // round trips it saves.
        let mut changed = Ok(());
        for env in revisions {
            changed = self.revise(env).await;
            if changed.is_err() {
                break;
            }
        }
        let all = [u, m, r, rm, w, mb, changed];
        if let Some(poison) = all.iter().position(|r| matches!(r, Err(ApplyError::Poison(_)))) {
            return all.into_iter().nth(poison).expect("found above");
        }
        all.into_iter().collect()
    }
}
