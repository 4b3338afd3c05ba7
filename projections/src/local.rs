//! Views and unseen counts in a local database: the embedded node's view
//! stores (`projections.redb` in its data directory) and the pure tests' (the
//! same code over memory).
//!
//! The semantics are the MongoDB and Redis adapters' (insert-once by id,
//! unique keys, `$max` watermarks, position-guarded counts). The store is
//! [redb](https://docs.rs/redb): pure Rust (no C toolchain to build it),
//! one file, transactions over checksummed copy-on-write B-trees that a
//! crash leaves at the last durable commit, and a page cache of a size we
//! choose, so a node's memory does not grow with its history.
//!
//! **Kept through a log position.** A projector applies each event in one
//! write transaction that also records the log sequence it came from
//! ([`LocalStore::kept_through`]): what is on disk is always exactly the
//! effect of a prefix of the log, so a restart replays only the events
//! after it. Commits are made durable (fsync) at most about once a second
//! ([`LocalStore::flush`]); a crash may lose that last second of view
//! progress, never consistency: the log replays it.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use natter_events::{Envelope, Event, subjects};
pub use redb;
use redb::{Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::projection::{ApplyError, Projection};
use crate::views::{CountStore, MessageView, RoomMessageView, RoomView, StoreError, UserView, ViewStore};

type Bytes = &'static [u8];
type Str = &'static str;

const USERS: TableDefinition<Str, Bytes> = TableDefinition::new("users");
const EMAILS: TableDefinition<Str, Str> = TableDefinition::new("emails");
const ROOMS: TableDefinition<Str, Bytes> = TableDefinition::new("rooms");
/// (room, user) → position × 2 + member, of the newest membership event.
const MEMBERS: TableDefinition<(Str, Str), u64> = TableDefinition::new("members");
/// (conversation, reader) → read watermark.
const WATERMARKS: TableDefinition<(Str, Str), u64> = TableDefinition::new("watermarks");
/// (user, other) → position × 2 + blocked, of the newest block change.
const BLOCKS: TableDefinition<(Str, Str), u64> = TableDefinition::new("blocks");
/// (message, user, emoji) → position × 2 + on, of the newest change.
const REACTIONS: TableDefinition<(Str, Str, Str), u64> = TableDefinition::new("reactions");
/// (user, peer) → (position of the event the count came from, count).
const DM_UNSEEN: TableDefinition<(Str, Str), (u64, u64)> = TableDefinition::new("dm-unseen");
/// room → newest seq.
const ROOM_LAST: TableDefinition<Str, u64> = TableDefinition::new("room-last");
/// (user, room) → read watermark.
const ROOM_READ: TableDefinition<(Str, Str), u64> = TableDefinition::new("room-read");
/// (room, seq) of each deleted room message.
const ROOM_DELETED: TableDefinition<(Str, u64), ()> = TableDefinition::new("room-deleted");
/// projection → (log sequence it is kept through, id of that event).
const KEPT: TableDefinition<Str, (u64, Str)> = TableDefinition::new("kept");
/// "layout" → [`LAYOUT`].
const META: TableDefinition<Str, u64> = TableDefinition::new("meta");

/// The tables' shape *and what an event writes there*: bump it with any
/// change to either (as a projection's `version()` would be bumped), and
/// every node's file, of another layout, is set aside at its next start
/// and rebuilt from the log.
pub const LAYOUT: u64 = 1;
/// How long a commit may stay in memory only (see [`LocalStore::flush`]).
const DURABLE_EVERY: Duration = Duration::from_secs(1);

/// A message collection with its unique indexes (direct or room).
struct Messages {
    items: TableDefinition<'static, Str, Bytes>,
    by_command: TableDefinition<'static, Str, Str>,
    by_seq: TableDefinition<'static, (Str, u64), Str>,
}

const DIRECT: Messages =
    Messages { items: TableDefinition::new("messages"), by_command: TableDefinition::new("by-command"), by_seq: TableDefinition::new("by-seq") };
const ROOM: Messages = Messages {
    items: TableDefinition::new("room-messages"),
    by_command: TableDefinition::new("room-by-command"),
    by_seq: TableDefinition::new("room-by-seq"),
};

macro_rules! store_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Unavailable(format!("local view store: {e}"))
            }
        }
        impl From<$t> for ApplyError {
            fn from(e: $t) -> Self {
                ApplyError::Unavailable(format!("local view store: {e}"))
            }
        }
    )*};
}
store_errors!(redb::Error, redb::StorageError, redb::TableError, redb::TransactionError, redb::CommitError, redb::DatabaseError, serde_json::Error);

/// Runs store work that may block for long (an fsync, or waiting for one)
/// without stalling a multi-threaded runtime's other tasks. Everything else
/// (reads, in-memory commits: tens of µs) runs on the caller's thread:
/// handing each call to another thread cost more than the call (a DM's CPU
/// went from 1.42 to 1.04 ms without those hand-offs).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(value)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Unavailable(format!("local view store: an unreadable record ({e})")))
}

/// Why [`LocalStore::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file cannot be used (damaged, another layout): set it aside and
    /// rebuild.
    #[error("{0}")]
    Unusable(String),
    /// The file could not be read or written (permissions, a full disk):
    /// nothing says it is bad; keep it and report.
    #[error("{0}")]
    Io(String),
}

impl<E: Into<redb::Error>> From<E> for OpenError {
    fn from(e: E) -> Self {
        match e.into() {
            e @ (redb::Error::Io(_) | redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch) => OpenError::Io(e.to_string()),
            e => OpenError::Unusable(e.to_string()),
        }
    }
}

/// The database every local projection writes: one file (or memory).
pub struct LocalStore {
    /// `None` once closed.
    db: std::sync::RwLock<Option<Database>>,
    /// Called before a commit is made durable: the file log is synced
    /// first, so the store never holds on disk what the log does not.
    before_durable: std::sync::OnceLock<Box<dyn Fn() -> Result<(), String> + Send + Sync>>,
    /// A commit failed: redb takes no more writes until reopened, so the
    /// store refuses them (and `check` fails) until natter restarts.
    broken: Mutex<Option<String>>,
    /// When a commit was last made durable.
    durable_at: Mutex<Instant>,
    /// Commits made since that are in memory only.
    dirty: AtomicBool,
    /// Held by the write transaction under way (redb runs one at a time):
    /// a writer that finds it taken waits off the runtime's workers (the
    /// holder may be fsyncing).
    writing: Mutex<()>,
}

impl LocalStore {
    /// A store in memory (tests, benchmarks).
    pub fn in_memory() -> Arc<LocalStore> {
        let db = redb::Builder::new().create_with_backend(redb::backends::InMemoryBackend::new()).expect("an in-memory database");
        Arc::new(LocalStore::with(db).expect("an in-memory database's tables"))
    }

    /// Opens (or creates) the store in the file `path`, caching at most
    /// `cache_bytes` of its pages in memory. Blocks (file I/O).
    ///
    /// A file that was not closed cleanly (the node crashed, or the power
    /// went, mid-write) has every page's checksum verified first, a read of
    /// the whole file, so a torn write is refused rather than served; after
    /// a clean stop the open reads only what it needs (redb's own commit
    /// checksums guard the rest). An error (or, for damage redb cannot
    /// report, a panic) means the file cannot be used: the caller sets it
    /// aside and rebuilds.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Arc<LocalStore>, OpenError> {
        let existed = path.exists();
        let db = redb::Builder::new().set_cache_size(cache_bytes).create(path)?;
        let clean = !existed || closed_cleanly(&db);
        let db = if clean {
            db
        } else {
            drop(db);
            redb::Builder::new().set_cache_size(cache_bytes).set_check_integrity_on_open(true).create(path)?
        };
        Ok(Arc::new(LocalStore::with(db)?))
    }

    fn with(db: Database) -> Result<LocalStore, OpenError> {
        let tx = db.begin_write()?;
        {
            let layout = tx.open_table(META)?.get("layout")?.map(|v| v.value());
            let empty = tx.open_table(KEPT)?.is_empty()? && tx.open_table(USERS)?.is_empty()?;
            match layout {
                Some(LAYOUT) => {}
                None if empty => {
                    tx.open_table(META)?.insert("layout", LAYOUT)?;
                }
                other => return Err(OpenError::Unusable(format!("layout {other:?}, this build reads {LAYOUT}"))),
            }
            // Until [`LocalStore::close`] says otherwise (this commit is
            // durable): a crash from now on is found at the next open.
            tx.open_table(META)?.insert("closed-cleanly", 0)?;
            for t in [USERS, ROOMS, DIRECT.items, ROOM.items] {
                tx.open_table(t)?;
            }
            for t in [EMAILS, DIRECT.by_command, ROOM.by_command] {
                tx.open_table(t)?;
            }
            for t in [MEMBERS, WATERMARKS, BLOCKS, ROOM_READ] {
                tx.open_table(t)?;
            }
            tx.open_table(DIRECT.by_seq)?;
            tx.open_table(ROOM.by_seq)?;
            tx.open_table(REACTIONS)?;
            tx.open_table(DM_UNSEEN)?;
            tx.open_table(ROOM_LAST)?;
            tx.open_table(ROOM_DELETED)?;
        }
        tx.commit()?;
        Ok(LocalStore {
            db: std::sync::RwLock::new(Some(db)),
            before_durable: std::sync::OnceLock::new(),
            broken: Mutex::new(None),
            durable_at: Mutex::new(Instant::now()),
            dirty: AtomicBool::new(false),
            writing: Mutex::new(()),
        })
    }

    /// Runs `sync` before every durable commit from now on (once).
    pub fn sync_first(&self, sync: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
        let _ = self.before_durable.set(Box::new(sync));
    }

    /// Makes what was committed so far durable's precondition hold: the
    /// log synced first.
    fn before_durable(&self) -> Result<(), StoreError> {
        match self.before_durable.get() {
            Some(sync) => sync().map_err(|e| StoreError::Unavailable(format!("local view store: syncing the event log first: {e}"))),
            None => Ok(()),
        }
    }

    /// Whether the store answers and takes writes (for readiness).
    pub fn check(&self) -> Result<(), StoreError> {
        self.read(|tx| Ok(tx.open_table(META)?.get("layout").map(|_| ())?))
    }

    /// Whether a commit failed (then no more are taken).
    pub fn failure(&self) -> Option<String> {
        self.broken.lock().expect("store state").clone()
    }

    /// Commits `tx`; a failure is remembered (redb takes no more writes).
    fn commit(&self, tx: WriteTransaction) -> Result<(), StoreError> {
        tx.commit().map_err(|e| {
            let why = format!("local view store: a commit failed ({e}); it takes no more writes until natter restarts");
            tracing::error!(error = %e, "projections.redb refused a commit (disk full? failing disk?): the views stop here; free space and restart natter");
            *self.broken.lock().expect("store state") = Some(why.clone());
            StoreError::Unavailable(why)
        })
    }

    /// The database, unless closed.
    fn db(&self) -> Result<std::sync::RwLockReadGuard<'_, Option<Database>>, StoreError> {
        if let Some(why) = self.failure() {
            return Err(StoreError::Unavailable(why));
        }
        let db = self.db.read().expect("local store lock");
        match *db {
            Some(_) => Ok(db),
            None => Err(StoreError::Unavailable("local view store: closed (the node is stopping)".into())),
        }
    }

    /// Makes everything durable and closes the file (refusing every call
    /// from now on), so that a node started next in this process can open
    /// it at once.
    pub fn close(&self) -> Result<(), StoreError> {
        let Some(db) = self.db.write().expect("local store lock").take() else { return Ok(()) };
        if self.failure().is_some() {
            return Ok(()); // not clean: the next start checks it
        }
        blocking(|| {
            let mut tx = db.begin_write()?;
            self.before_durable()?;
            tx.set_quick_repair(true);
            tx.open_table(META)?.insert("closed-cleanly", 1)?;
            self.commit(tx)
        })
    }

    /// The log sequence `projection` is kept through, and the id of the
    /// event there (to tell whether the store belongs to this log).
    pub fn kept_through(&self, projection: &str) -> Result<Option<(u64, String)>, StoreError> {
        self.read(|tx| Ok(tx.open_table(KEPT)?.get(projection)?.map(|v| (v.value().0, v.value().1.to_owned()))))
    }

    /// Every projection's (name, log sequence kept through, event id there).
    pub fn kept(&self) -> Result<Vec<(String, u64, String)>, StoreError> {
        self.read(|tx| {
            let mut out = Vec::new();
            for entry in tx.open_table(KEPT)?.range::<&str>(..)? {
                let (k, v) = entry?;
                out.push((k.value().to_owned(), v.value().0, v.value().1.to_owned()));
            }
            Ok(out)
        })
    }

    /// Makes every commit so far durable (an empty durable commit), if any
    /// was not. Called about once a second and before the node stops.
    pub fn flush(&self) -> Result<(), StoreError> {
        if !self.dirty.load(Ordering::Acquire) {
            return Ok(());
        }
        blocking(|| {
            let _writing = gate(&self.writing);
            let db = self.db()?;
            let mut tx = db.as_ref().expect("open").begin_write()?;
            // Inside the write transaction: every commit before it reflects
            // events appended before this sync.
            self.before_durable()?;
            tx.set_quick_repair(true);
            // Cleared before the commit: a commit racing this one marks
            // the store dirty again.
            self.dirty.store(false, Ordering::Release);
            if let Err(e) = self.commit(tx) {
                self.dirty.store(true, Ordering::Release);
                return Err(e);
            }
            *self.durable_at.lock().expect("durable clock") = Instant::now();
            Ok(())
        })
    }

    /// One write transaction: durable if the last durable one is a second
    /// old, else in memory only until the next [`LocalStore::flush`]. An
    /// error from `f` aborts it (nothing it wrote is kept).
    pub fn write(&self, f: impl FnOnce(&WriteTransaction) -> Result<(), ApplyError>) -> Result<(), ApplyError> {
        let free = match self.writing.try_lock() {
            Ok(held) => Some(held),
            // A panic while it was held left nothing to undo (see `gate`).
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        match free {
            Some(_writing) if !self.durable_due() => self.write_now(false, f),
            Some(_writing) => blocking(|| self.write_now(true, f)),
            None => blocking(|| {
                let _writing = gate(&self.writing);
                self.write_now(self.durable_due(), f)
            }),
        }
    }

    /// Whether the last durable commit is [`DURABLE_EVERY`] old. Asked
    /// holding the write gate, so a durable commit just made counts.
    fn durable_due(&self) -> bool {
        self.durable_at.lock().expect("durable clock").elapsed() >= DURABLE_EVERY
    }

    /// [`LocalStore::write`] holding the write gate, durable if `due` (and
    /// the log could be synced).
    fn write_now(&self, due: bool, f: impl FnOnce(&WriteTransaction) -> Result<(), ApplyError>) -> Result<(), ApplyError> {
        let db = self.db()?;
        let mut tx = db.as_ref().expect("open").begin_write()?;
        // A durable commit also makes every earlier one durable: the
        // log must be on disk as far as they reflect it (synced inside
        // the transaction: no commit can slip in after the sync).
        let due = due && self.before_durable().is_ok();
        if due {
            tx.set_quick_repair(true);
            self.dirty.store(false, Ordering::Release);
        } else {
            tx.set_durability(Durability::None).map_err(|e| ApplyError::Unavailable(format!("local view store: {e}")))?;
        }
        if let Err(e) = f(&tx).map_err(ApplyError::from).and_then(|()| self.commit(tx).map_err(ApplyError::from)) {
            if due {
                self.dirty.store(true, Ordering::Release);
            }
            return Err(e);
        }
        if due {
            *self.durable_at.lock().expect("durable clock") = Instant::now();
        } else {
            self.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// One read transaction: a snapshot of everything committed before.
    pub fn read<T>(&self, f: impl FnOnce(&ReadTransaction) -> Result<T, StoreError>) -> Result<T, StoreError> {
        // A read never waits for a writer (redb keeps snapshots); a page
        // outside the cache is read from the file (the OS's page cache,
        // mostly) on the caller's thread.
        f(&self.db()?.as_ref().expect("open").begin_read()?)
    }
}

/// Takes the write gate (a panic while it was held left nothing to undo:
/// redb aborts the transaction it dropped).
fn gate(writing: &Mutex<()>) -> std::sync::MutexGuard<'_, ()> {
    writing.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether the store was closed by [`LocalStore::close`] last time.
fn closed_cleanly(db: &Database) -> bool {
    let marked = || -> Result<bool, redb::Error> { Ok(db.begin_read()?.open_table(META)?.get("closed-cleanly")?.is_some_and(|v| v.value() == 1)) };
    marked().unwrap_or(false)
}

/// Records, in `tx`, that `projection` is kept through `log_seq`, the
/// event `event_id` (never backwards).
pub fn keep(tx: &WriteTransaction, projection: &str, log_seq: u64, event_id: &str) -> Result<(), ApplyError> {
    let mut kept = tx.open_table(KEPT)?;
    if kept.get(projection)?.is_none_or(|v| v.value().0 < log_seq) {
        kept.insert(projection, (log_seq, event_id))?;
    }
    Ok(())
}

/// `slot = max(slot, value)` in a table of marks.
fn raise<K: redb::Key + 'static>(tx: &WriteTransaction, table: TableDefinition<K, u64>, key: K::SelfType<'_>, value: u64) -> Result<(), ApplyError> {
    let mut t = tx.open_table(table)?;
    let current = t.get(&key)?.map(|v| v.value()).unwrap_or(0);
    if value > current {
        t.insert(key, value)?;
    }
    Ok(())
}

/// Puts a message view unless one from a newer event is there: a send
/// inserts once (its command id and (conversation, seq) unique), the
/// newest change wins, a tombstone over everything.
fn put<T: Serialize + DeserializeOwned>(
    tx: &WriteTransaction,
    kind: &Messages,
    (id, command, seq_key, cpos): (&str, &str, (&str, u64), u64),
    view: &T,
    cpos_of: fn(&T) -> u64,
) -> Result<(), ApplyError> {
    let mut items = tx.open_table(kind.items)?;
    let current = items.get(id)?.map(|v| decode::<T>(v.value())).transpose()?;
    match current {
        Some(current) if cpos_of(&current) >= cpos => return Ok(()),
        Some(_) => {}
        None => {
            let (mut by_command, mut by_seq) = (tx.open_table(kind.by_command)?, tx.open_table(kind.by_seq)?);
            if by_command.get(command)?.is_some() || by_seq.get(seq_key)?.is_some() {
                return Err(ApplyError::Poison(format!("{id}: unique key already held by another message")));
            }
            by_command.insert(command, id)?;
            by_seq.insert(seq_key, id)?;
        }
    }
    items.insert(id, encode(view)?.as_slice())?;
    Ok(())
}

fn apply_views(tx: &WriteTransaction, env: &Envelope) -> Result<(), ApplyError> {
    let position = env.position;
    match &env.event {
        Event::UserRegistered(e) => {
            let mut users = tx.open_table(USERS)?;
            if users.get(e.user_id.as_str())?.is_some() {
                return Ok(());
            }
            let mut emails = tx.open_table(EMAILS)?;
            if emails.get(e.email.as_str())?.is_some() {
                return Err(ApplyError::Poison(format!("{}: email already held by another user", e.user_id)));
            }
            emails.insert(e.email.as_str(), e.user_id.as_str())?;
            users.insert(e.user_id.as_str(), encode(&UserView::from_event(env, e))?.as_slice())?;
        }
        Event::MessageSent(_) | Event::MessageEdited(_) | Event::MessageDeleted(_) => {
            let v = MessageView::of(env).expect("a direct message event");
            put(tx, &DIRECT, (&v.id, &v.command_id, (&v.conversation, v.seq), v.cpos), &v, |m| m.cpos)?;
        }
        Event::RoomCreated(e) => {
            let mut rooms = tx.open_table(ROOMS)?;
            if rooms.get(e.room_id.as_str())?.is_none() {
                rooms.insert(e.room_id.as_str(), encode(&RoomView::from_event(env, e))?.as_slice())?;
            }
        }
        Event::MemberJoined(e) => raise(tx, MEMBERS, (e.room_id.as_str(), e.user_id.as_str()), position * 2 + 1)?,
        Event::MemberLeft(e) => raise(tx, MEMBERS, (e.room_id.as_str(), e.user_id.as_str()), position * 2)?,
        Event::RoomRead(_) | Event::MemberInvited(_) | Event::RoleChanged(_) => {}
        Event::RoomMessageSent(_) | Event::RoomMessageEdited(_) | Event::RoomMessageDeleted(_) => {
            let v = RoomMessageView::of(env).expect("a room message event");
            put(tx, &ROOM, (&v.id, &v.command_id, (&v.room_id, v.seq), v.cpos), &v, |m| m.cpos)?;
        }
        Event::MessagesSeen(e) => {
            let conversation = subjects::dm_conversation(&e.reader_id, &e.peer_id);
            raise(tx, WATERMARKS, (conversation.as_str(), e.reader_id.as_str()), e.up_to_seq)?;
        }
        Event::BlockChanged(e) => raise(tx, BLOCKS, (e.user_id.as_str(), e.other_id.as_str()), crate::views::block_mark(position, e.blocked))?,
        Event::ReactionChanged(e) => {
            let key = (e.message_id.as_str(), e.user_id.as_str(), e.emoji.as_str());
            raise(tx, REACTIONS, key, crate::views::reaction_mark(position, e.on))?;
        }
    }
    Ok(())
}

fn apply_counts(tx: &WriteTransaction, env: &Envelope) -> Result<(), ApplyError> {
    let state = match &env.event {
        e if e.dm_state().is_some() => e.dm_state().expect("checked"),
        Event::RoomMessageSent(e) => {
            raise(tx, ROOM_LAST, e.room_id.as_str(), e.seq)?;
            return raise(tx, ROOM_READ, (e.sender_id.as_str(), e.room_id.as_str()), e.seq);
        }
        Event::MemberJoined(e) => return raise(tx, ROOM_READ, (e.user_id.as_str(), e.room_id.as_str()), e.seen_up_to),
        Event::RoomRead(e) => return raise(tx, ROOM_READ, (e.user_id.as_str(), e.room_id.as_str()), e.up_to_seq),
        Event::RoomMessageDeleted(e) => {
            tx.open_table(ROOM_DELETED)?.insert((e.message.room_id.as_str(), e.message.seq), ())?;
            return Ok(());
        }
        _ => return Ok(()),
    };
    let mut unseen = tx.open_table(DM_UNSEEN)?;
    for (reader, peer) in [(&state.lo, &state.hi), (&state.hi, &state.lo)] {
        let key = (reader.user_id.as_str(), peer.user_id.as_str());
        if unseen.get(key)?.is_none_or(|v| env.position > v.value().0) {
            unseen.insert(key, (env.position, state.unseen(&reader.user_id, &peer.user_id)))?;
        }
    }
    Ok(())
}

/// Applies a batch in one transaction, kept through its newest sequence.
fn apply_batch_with(
    store: &LocalStore,
    projection: &str,
    batch: &[(&Envelope, u64)],
    apply: fn(&WriteTransaction, &Envelope) -> Result<(), ApplyError>,
) -> Result<(), ApplyError> {
    store.write(|tx| {
        for (env, _) in batch {
            apply(tx, env)?;
        }
        match batch.iter().max_by_key(|(_, seq)| *seq) {
            Some((env, seq)) => keep(tx, projection, *seq, &env.id.to_string()),
            None => Ok(()),
        }
    })
}

/// The message views of `ids` (missing ones left out), in one read.
fn messages_of<T: DeserializeOwned>(tx: &ReadTransaction, kind: &Messages, ids: impl IntoIterator<Item = String>) -> Result<Vec<T>, StoreError> {
    let items = tx.open_table(kind.items)?;
    let mut out = Vec::new();
    for id in ids {
        if let Some(v) = items.get(id.as_str())? {
            out.push(decode(v.value())?);
        }
    }
    Ok(out)
}

/// The newest page of `limit` messages of `key` before seq `before`,
/// oldest first.
fn page<T: DeserializeOwned>(tx: &ReadTransaction, kind: &Messages, key: &str, before: Option<u64>, limit: u32) -> Result<Vec<T>, StoreError> {
    let by_seq = tx.open_table(kind.by_seq)?;
    let mut ids = Vec::new();
    for entry in by_seq.range((key, 0)..(key, before.unwrap_or(u64::MAX)))?.rev().take(limit as usize) {
        ids.push(entry?.1.value().to_owned());
    }
    ids.reverse();
    messages_of(tx, kind, ids)
}

/// Keys of `table` starting with `first`, with their values.
fn under<V: redb::Value + 'static>(tx: &ReadTransaction, table: TableDefinition<(Str, Str), V>, first: &str) -> Result<Vec<(String, V::SelfType<'static>)>, StoreError>
where
    for<'a> V::SelfType<'a>: ToOwned<Owned = V::SelfType<'static>>,
{
    let t = tx.open_table(table)?;
    let mut out = Vec::new();
    for entry in t.range((first, "")..)? {
        let (k, v) = entry?;
        if k.value().0 != first {
            break;
        }
        out.push((k.value().1.to_owned(), v.value().to_owned()));
    }
    Ok(out)
}

fn one<T: DeserializeOwned>(tx: &ReadTransaction, table: TableDefinition<Str, Bytes>, id: &str) -> Result<Option<T>, StoreError> {
    tx.open_table(table)?.get(id)?.map(|v| decode(v.value())).transpose()
}

/// The first `limit` records of `table` after `after`, with `keep`.
fn listed<T: DeserializeOwned>(tx: &ReadTransaction, table: TableDefinition<Str, Bytes>, after: Option<&str>, limit: u32, keep: impl Fn(&T) -> bool) -> Result<Vec<T>, StoreError> {
    let t = tx.open_table(table)?;
    let range = match after {
        Some(a) => t.range::<&str>((Bound::Excluded(a), Bound::Unbounded))?,
        None => t.range::<&str>(..)?,
    };
    let mut out = Vec::new();
    for entry in range {
        let item: T = decode(entry?.1.value())?;
        if keep(&item) {
            out.push(item);
            if out.len() >= limit as usize {
                break;
            }
        }
    }
    Ok(out)
}

/// The views (users, messages, rooms, memberships, watermarks, blocks,
/// reactions) in a [`LocalStore`].
pub struct LocalViews {
    store: Arc<LocalStore>,
}

impl LocalViews {
    pub fn new(store: Arc<LocalStore>) -> LocalViews {
        LocalViews { store }
    }
}

impl Default for LocalViews {
    /// Views in a store of their own, in memory.
    fn default() -> Self {
        LocalViews::new(LocalStore::in_memory())
    }
}

#[async_trait]
impl ViewStore for LocalViews {
    async fn check(&self) -> Result<(), StoreError> {
        self.store.check()
    }

    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        self.store.write(|tx| apply_views(tx, env))
    }

    async fn user(&self, id: &str) -> Result<Option<UserView>, StoreError> {
        self.store.read(|tx| one(tx, USERS, id))
    }

    async fn users_by_ids(&self, ids: &[String]) -> Result<Vec<UserView>, StoreError> {
        self.store.read(|tx| ids.iter().filter_map(|id| one(tx, USERS, id).transpose()).collect())
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<UserView>, StoreError> {
        self.store.read(|tx| match tx.open_table(EMAILS)?.get(email)? {
            Some(id) => one(tx, USERS, id.value()),
            None => Ok(None),
        })
    }

    async fn users(&self, except: &str, after: Option<&str>, limit: u32) -> Result<Vec<UserView>, StoreError> {
        self.store.read(|tx| listed(tx, USERS, after, limit, |u: &UserView| u.id != except))
    }

    async fn message(&self, id: &str) -> Result<Option<MessageView>, StoreError> {
        self.store.read(|tx| one(tx, DIRECT.items, id))
    }

    async fn message_by_command(&self, command_id: &str) -> Result<Option<MessageView>, StoreError> {
        self.store.read(|tx| match tx.open_table(DIRECT.by_command)?.get(command_id)? {
            Some(id) => one(tx, DIRECT.items, id.value()),
            None => Ok(None),
        })
    }

    async fn messages(&self, conversation: &str, before: Option<u64>, limit: u32) -> Result<Vec<MessageView>, StoreError> {
        self.store.read(|tx| page(tx, &DIRECT, conversation, before, limit))
    }

    async fn watermarks(&self, conversation: &str) -> Result<HashMap<String, u64>, StoreError> {
        self.store.read(|tx| Ok(under(tx, WATERMARKS, conversation)?.into_iter().collect()))
    }

    async fn contents(&self, ids: &[String]) -> Result<HashMap<String, crate::Content>, StoreError> {
        self.store.read(|tx| {
            let mut out = HashMap::new();
            for m in messages_of::<MessageView>(tx, &DIRECT, ids.iter().cloned())? {
                out.insert(m.id, crate::Content { message: m.message, attachment: m.attachment, deleted: m.deleted });
            }
            let rest = ids.iter().filter(|id| !out.contains_key(*id)).cloned().collect::<Vec<_>>();
            for m in messages_of::<RoomMessageView>(tx, &ROOM, rest)? {
                out.insert(m.id, crate::Content { message: m.message, attachment: m.attachment, deleted: m.deleted });
            }
            Ok(out)
        })
    }

    async fn reactions(&self, ids: &[String]) -> Result<HashMap<String, crate::Reactions>, StoreError> {
        self.store.read(|tx| {
            let t = tx.open_table(REACTIONS)?;
            let mut out: HashMap<String, crate::Reactions> = HashMap::new();
            for id in ids {
                for entry in t.range((id.as_str(), "", "")..)? {
                    let (k, mark) = entry?;
                    let (m, user, emoji) = k.value();
                    if m != id {
                        break;
                    }
                    if mark.value() % 2 == 1 {
                        out.entry(id.clone()).or_default().entry(emoji.to_owned()).or_default().push(user.to_owned());
                    }
                }
            }
            for r in out.values_mut() {
                r.values_mut().for_each(|users| users.sort());
            }
            Ok(out)
        })
    }

    async fn reaction_mark(&self, message: &str, user: &str, emoji: &str) -> Result<u64, StoreError> {
        self.store.read(|tx| Ok(tx.open_table(REACTIONS)?.get((message, user, emoji))?.map_or(0, |v| v.value())))
    }

    async fn blocked_among(&self, user: &str, others: &[String]) -> Result<Vec<String>, StoreError> {
        self.store.read(|tx| {
            let t = tx.open_table(BLOCKS)?;
            let mut out = Vec::new();
            for other in others {
                if t.get((user, other.as_str()))?.is_some_and(|mark| mark.value() % 2 == 1) {
                    out.push(other.clone());
                }
            }
            Ok(out)
        })
    }

    async fn room(&self, id: &str) -> Result<Option<RoomView>, StoreError> {
        self.store.read(|tx| one(tx, ROOMS, id))
    }

    async fn rooms(&self, after: Option<&str>, limit: u32) -> Result<Vec<RoomView>, StoreError> {
        self.store.read(|tx| listed(tx, ROOMS, after, limit, |_: &RoomView| true))
    }

    async fn room_members(&self, room: &str) -> Result<Vec<String>, StoreError> {
        self.store.read(|tx| Ok(under(tx, MEMBERS, room)?.into_iter().filter(|(_, mark)| mark % 2 == 1).map(|(user, _)| user).collect()))
    }

    async fn is_member(&self, room: &str, user: &str) -> Result<bool, StoreError> {
        self.store.read(|tx| Ok(tx.open_table(MEMBERS)?.get((room, user))?.is_some_and(|mark| mark.value() % 2 == 1)))
    }

    async fn room_message(&self, id: &str) -> Result<Option<RoomMessageView>, StoreError> {
        self.store.read(|tx| one(tx, ROOM.items, id))
    }

    async fn room_message_by_command(&self, command_id: &str) -> Result<Option<RoomMessageView>, StoreError> {
        self.store.read(|tx| match tx.open_table(ROOM.by_command)?.get(command_id)? {
            Some(id) => one(tx, ROOM.items, id.value()),
            None => Ok(None),
        })
    }

    async fn room_messages(&self, room: &str, before: Option<u64>, limit: u32) -> Result<Vec<RoomMessageView>, StoreError> {
        self.store.read(|tx| page(tx, &ROOM, room, before, limit))
    }
}

#[async_trait]
impl Projection for LocalViews {
    fn name(&self) -> &'static str {
        "mongo-views"
    }
    fn version(&self) -> u32 {
        1
    }
    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        ViewStore::apply(self, env).await
    }
    async fn apply_at(&self, env: &Envelope, log_seq: u64) -> Result<(), ApplyError> {
        apply_batch_with(&self.store, self.name(), &[(env, log_seq)], apply_views)
    }
    async fn apply_batch(&self, batch: &[(&Envelope, u64)]) -> Result<(), ApplyError> {
        apply_batch_with(&self.store, self.name(), batch, apply_views)
    }
    async fn kept_through(&self) -> Result<u64, ApplyError> {
        Ok(self.store.kept_through(self.name())?.map_or(0, |(seq, _)| seq))
    }
}

/// Unseen counts (direct and room) in a [`LocalStore`].
pub struct LocalCounts {
    store: Arc<LocalStore>,
}

impl LocalCounts {
    pub fn new(store: Arc<LocalStore>) -> LocalCounts {
        LocalCounts { store }
    }
}

impl Default for LocalCounts {
    /// Counts in a store of their own, in memory.
    fn default() -> Self {
        LocalCounts::new(LocalStore::in_memory())
    }
}

#[async_trait]
impl CountStore for LocalCounts {
    async fn check(&self) -> Result<(), StoreError> {
        self.store.check()
    }

    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        self.store.write(|tx| apply_counts(tx, env))
    }

    async fn unseen(&self, user: &str) -> Result<HashMap<String, u64>, StoreError> {
        self.store.read(|tx| Ok(under(tx, DM_UNSEEN, user)?.into_iter().filter(|(_, (_, n))| *n > 0).map(|(peer, (_, n))| (peer, n)).collect()))
    }

    async fn room_unread(&self, user: &str, rooms: &[String]) -> Result<HashMap<String, u64>, StoreError> {
        self.store.read(|tx| {
            let (last, read, deleted) = (tx.open_table(ROOM_LAST)?, tx.open_table(ROOM_READ)?, tx.open_table(ROOM_DELETED)?);
            let mut out = HashMap::new();
            for r in rooms {
                let last = last.get(r.as_str())?.map_or(0, |v| v.value());
                let wm = read.get((user, r.as_str()))?.map_or(0, |v| v.value());
                let gone = if wm < last { deleted.range((r.as_str(), wm + 1)..=(r.as_str(), last))?.count() as u64 } else { 0 };
                out.insert(r.clone(), last.saturating_sub(wm).saturating_sub(gone));
            }
            Ok(out)
        })
    }
}

#[async_trait]
impl Projection for LocalCounts {
    fn name(&self) -> &'static str {
        "redis-unseen"
    }
    fn version(&self) -> u32 {
        1
    }
    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        CountStore::apply(self, env).await
    }
    async fn apply_at(&self, env: &Envelope, log_seq: u64) -> Result<(), ApplyError> {
        apply_batch_with(&self.store, self.name(), &[(env, log_seq)], apply_counts)
    }
    async fn apply_batch(&self, batch: &[(&Envelope, u64)]) -> Result<(), ApplyError> {
        apply_batch_with(&self.store, self.name(), batch, apply_counts)
    }
    async fn kept_through(&self) -> Result<u64, ApplyError> {
        Ok(self.store.kept_through(self.name())?.map_or(0, |(seq, _)| seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{History, snapshot};

    fn history() -> History {
        let mut h = History::new("p", 4);
        h.create_room(0);
        for i in 0..60 {
            h.send(i % 4, (i + 1) % 4);
            h.join(i % 4, 0);
            h.room_send(i % 4, 0);
            if i % 7 == 0 {
                h.mark((i + 1) % 4, i % 4, i / 4);
                h.delete(i % 4, (i + 1) % 4, 0);
                h.room_read((i + 2) % 4, 0);
                h.react(i % 4, (i + 1) % 4, 1, "👍", true);
                h.block(i % 4, (i + 3) % 4, i % 2 == 0);
            }
        }
        h
    }

    #[tokio::test]
    async fn a_store_reopened_from_its_file_answers_the_same_and_says_where_it_is_kept_through() {
        let dir = std::env::temp_dir().join(format!("natter-local-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("projections.redb");
        let h = history();
        let events: Vec<(&Envelope, u64)> = h.envelopes.iter().zip(1..).collect();
        let convs = h.conversations();
        let (memory_views, memory_counts) = (LocalViews::default(), LocalCounts::default());
        for (env, seq) in &events {
            memory_views.apply_at(env, *seq).await.unwrap();
            memory_counts.apply_at(env, *seq).await.unwrap();
        }
        let expected = snapshot(&memory_views, &memory_counts, &h.users, &convs, &h.rooms).await.unwrap();
        {
            let store = LocalStore::open(&path, 1 << 20).unwrap();
            let (views, counts) = (LocalViews::new(store.clone()), LocalCounts::new(store.clone()));
            for chunk in events.chunks(50) {
                views.apply_batch(chunk).await.unwrap();
                counts.apply_batch(chunk).await.unwrap();
            }
            store.flush().unwrap();
        }
        let store = LocalStore::open(&path, 1 << 20).unwrap();
        let (views, counts) = (LocalViews::new(store.clone()), LocalCounts::new(store.clone()));
        assert_eq!(views.kept_through().await.unwrap(), events.len() as u64);
        assert_eq!(counts.kept_through().await.unwrap(), events.len() as u64);
        assert_eq!(store.kept_through("redis-unseen").unwrap().unwrap().1, events.last().unwrap().0.id.to_string());
        let reopened = snapshot(&views, &counts, &h.users, &convs, &h.rooms).await.unwrap();
        assert_eq!(reopened, expected);
        assert!(expected.conversations.values().any(|(m, _)| m.iter().any(|m| m.deleted)) && expected.unseen.values().any(|u| !u.is_empty()));
        assert!(expected.rooms.values().any(|(_, members, messages)| members.len() == 4 && messages.len() == 60));
        drop((views, counts, store));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
