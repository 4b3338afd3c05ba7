//! In-memory view store and unseen counts, with exactly the semantics of the
//! MongoDB and Redis adapters (insert-once by id, unique keys, `$max`
//! watermarks, position-guarded counts). Used by the pure projection tests
//! and, later, the embedded single-node mode.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use natter_events::{Envelope, Event, subjects};

use crate::projection::{ApplyError, Projection};
use crate::views::{CountStore, MessageView, RoomMessageView, RoomView, StoreError, UserView, ViewStore};

#[derive(Default)]
struct Views {
    users: BTreeMap<String, UserView>,
    emails: HashMap<String, String>,
    messages: HashMap<String, MessageView>,
    by_command: HashMap<String, String>,
    by_seq: BTreeMap<(String, u64), String>,
    watermarks: HashMap<String, HashMap<String, u64>>,
    rooms: BTreeMap<String, RoomView>,
    /// (room, user) → (member, position of the membership event)
    members: BTreeMap<(String, String), (bool, u64)>,
    room_messages: HashMap<String, RoomMessageView>,
    room_by_command: HashMap<String, String>,
    room_by_seq: BTreeMap<(String, u64), String>,
    /// (user, other) → position × 2 + blocked, of the newest block change.
    blocks: BTreeMap<(String, String), u64>,
    /// (message, user, emoji) → position × 2 + on, of the newest change.
    reactions: BTreeMap<(String, String, String), u64>,
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

fn set_membership(v: &mut Views, room: &str, user: &str, member: bool, position: u64) {
    let slot = v.members.entry((room.to_owned(), user.to_owned())).or_insert((member, 0));
    if position > slot.1 {
        *slot = (member, position);
    }
}

/// A message collection with its unique indexes.
struct Indexed<'a, T> {
    items: &'a mut HashMap<String, T>,
    by_command: &'a mut HashMap<String, String>,
    by_seq: &'a mut BTreeMap<(String, u64), String>,
}

/// Puts a message view (id, command id, (conversation, seq), content
/// position) unless one from a newer event is there: a send inserts once,
/// the newest change wins, a tombstone over everything.
fn put<T>(ix: Indexed<'_, T>, (id, command, seq_key, cpos): (String, String, (String, u64), u64), view: T, cpos_of: fn(&T) -> u64) -> Result<(), ApplyError> {
    match ix.items.get_mut(&id) {
        Some(current) if cpos_of(current) >= cpos => {}
        Some(current) => *current = view,
        None => {
            if ix.by_command.contains_key(&command) || ix.by_seq.contains_key(&seq_key) {
                return Err(ApplyError::Poison(format!("{id}: unique key already held by another message")));
            }
            ix.by_command.insert(command, id.clone());
            ix.by_seq.insert(seq_key, id.clone());
            ix.items.insert(id, view);
        }
    }
    Ok(())
}

/// The newest page of `limit` entries before `before`, oldest first.
fn page<T: Clone>(index: &BTreeMap<(String, u64), String>, items: &HashMap<String, T>, key: &str, before: Option<u64>, limit: u32) -> Vec<T> {
    let end = before.unwrap_or(u64::MAX);
    let mut page: Vec<T> = index
        .range((key.to_owned(), 0)..(key.to_owned(), end))
        .rev()
        .take(limit as usize)
        .filter_map(|(_, id)| items.get(id).cloned())
        .collect();
    page.reverse();
    page
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
            Event::MessageSent(_) | Event::MessageEdited(_) | Event::MessageDeleted(_) => {
                let view = MessageView::of(env).expect("a direct message event");
                let (id, command, seq_key, cpos) = (view.id.clone(), view.command_id.clone(), (view.conversation.clone(), view.seq), view.cpos);
                let Views { messages, by_command, by_seq, .. } = &mut *v;
                put(Indexed { items: messages, by_command, by_seq }, (id, command, seq_key, cpos), view, |m| m.cpos)?;
            }
            Event::RoomCreated(e) => {
                v.rooms.entry(e.room_id.clone()).or_insert_with(|| RoomView::from_event(env, e));
            }
            Event::MemberJoined(e) => set_membership(&mut v, &e.room_id, &e.user_id, true, env.position),
            Event::MemberLeft(e) => set_membership(&mut v, &e.room_id, &e.user_id, false, env.position),
            Event::RoomRead(_) | Event::MemberInvited(_) | Event::RoleChanged(_) => {}
            Event::RoomMessageSent(_) | Event::RoomMessageEdited(_) | Event::RoomMessageDeleted(_) => {
                let view = RoomMessageView::of(env).expect("a room message event");
                let (id, command, seq_key, cpos) = (view.id.clone(), view.command_id.clone(), (view.room_id.clone(), view.seq), view.cpos);
                let Views { room_messages, room_by_command, room_by_seq, .. } = &mut *v;
                put(Indexed { items: room_messages, by_command: room_by_command, by_seq: room_by_seq }, (id, command, seq_key, cpos), view, |m| m.cpos)?;
            }
            Event::MessagesSeen(e) => {
                let conversation = subjects::dm_conversation(&e.reader_id, &e.peer_id);
                let mark = v.watermarks.entry(conversation).or_default().entry(e.reader_id.clone()).or_insert(0);
                *mark = (*mark).max(e.up_to_seq);
            }
            Event::BlockChanged(e) => {
                let slot = v.blocks.entry((e.user_id.clone(), e.other_id.clone())).or_insert(0);
                *slot = (*slot).max(crate::views::block_mark(env.position, e.blocked));
            }
            Event::ReactionChanged(e) => {
                let slot = v.reactions.entry((e.message_id.clone(), e.user_id.clone(), e.emoji.clone())).or_insert(0);
                *slot = (*slot).max(crate::views::reaction_mark(env.position, e.on));
            }
        }
        Ok(())
    }

    async fn user(&self, id: &str) -> Result<Option<UserView>, StoreError> {
        Ok(self.lock().users.get(id).cloned())
    }

    async fn users_by_ids(&self, ids: &[String]) -> Result<Vec<UserView>, StoreError> {
        let v = self.lock();
        Ok(ids.iter().filter_map(|id| v.users.get(id).cloned()).collect())
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
        Ok(page(&v.by_seq, &v.messages, conversation, before, limit))
    }

    async fn watermarks(&self, conversation: &str) -> Result<HashMap<String, u64>, StoreError> {
        Ok(self.lock().watermarks.get(conversation).cloned().unwrap_or_default())
    }

    async fn contents(&self, ids: &[String]) -> Result<HashMap<String, crate::Content>, StoreError> {
        let v = self.lock();
        let of = |message: &Option<String>, attachment: &Option<String>, deleted: bool| crate::Content { message: message.clone(), attachment: attachment.clone(), deleted };
        Ok(ids
            .iter()
            .filter_map(|id| {
                let content = match (v.messages.get(id), v.room_messages.get(id)) {
                    (Some(m), _) => of(&m.message, &m.attachment, m.deleted),
                    (None, Some(m)) => of(&m.message, &m.attachment, m.deleted),
                    (None, None) => return None,
                };
                Some((id.clone(), content))
            })
            .collect())
    }

    async fn reactions(&self, ids: &[String]) -> Result<HashMap<String, crate::Reactions>, StoreError> {
        let v = self.lock();
        let mut out: HashMap<String, crate::Reactions> = HashMap::new();
        for id in ids {
            let of_id = v.reactions.range((id.clone(), String::new(), String::new())..).take_while(|((m, _, _), _)| m == id);
            for ((_, user, emoji), mark) in of_id {
                if mark % 2 == 1 {
                    out.entry(id.clone()).or_default().entry(emoji.clone()).or_default().push(user.clone());
                }
            }
        }
        for r in out.values_mut() {
            r.values_mut().for_each(|users| users.sort());
        }
        Ok(out)
    }

    async fn reaction_mark(&self, message: &str, user: &str, emoji: &str) -> Result<u64, StoreError> {
        Ok(self.lock().reactions.get(&(message.to_owned(), user.to_owned(), emoji.to_owned())).copied().unwrap_or(0))
    }

    async fn blocked_among(&self, user: &str, others: &[String]) -> Result<Vec<String>, StoreError> {
        let v = self.lock();
        Ok(others.iter().filter(|o| v.blocks.get(&(user.to_owned(), (*o).clone())).is_some_and(|mark| mark % 2 == 1)).cloned().collect())
    }

    async fn room(&self, id: &str) -> Result<Option<RoomView>, StoreError> {
        Ok(self.lock().rooms.get(id).cloned())
    }

    async fn rooms(&self, after: Option<&str>, limit: u32) -> Result<Vec<RoomView>, StoreError> {
        let v = self.lock();
        Ok(v.rooms
            .values()
            .filter(|r| after.is_none_or(|a| r.id.as_str() > a))
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn room_members(&self, room: &str) -> Result<Vec<String>, StoreError> {
        let v = self.lock();
        Ok(v.members
            .iter()
            .filter(|((r, _), (member, _))| r == room && *member)
            .map(|((_, u), _)| u.clone())
            .collect())
    }

    async fn is_member(&self, room: &str, user: &str) -> Result<bool, StoreError> {
        Ok(self.lock().members.get(&(room.to_owned(), user.to_owned())).is_some_and(|(m, _)| *m))
    }

    async fn room_message(&self, id: &str) -> Result<Option<RoomMessageView>, StoreError> {
        Ok(self.lock().room_messages.get(id).cloned())
    }

    async fn room_message_by_command(&self, command_id: &str) -> Result<Option<RoomMessageView>, StoreError> {
        let v = self.lock();
        Ok(v.room_by_command.get(command_id).and_then(|id| v.room_messages.get(id)).cloned())
    }

    async fn room_messages(&self, room: &str, before: Option<u64>, limit: u32) -> Result<Vec<RoomMessageView>, StoreError> {
        let v = self.lock();
        Ok(page(&v.room_by_seq, &v.room_messages, room, before, limit))
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

#[derive(Default)]
struct Counts {
    /// user → peer → (position of the event the count came from, count)
    dm: HashMap<String, HashMap<String, (u64, u64)>>,
    /// room → newest seq
    room_last: HashMap<String, u64>,
    /// (user, room) → read watermark
    room_wm: HashMap<(String, String), u64>,
    /// room → seqs of its deleted messages
    room_deleted: HashMap<String, std::collections::BTreeSet<u64>>,
}

#[derive(Default)]
pub struct MemoryCounts {
    inner: Mutex<Counts>,
}

fn raise(slot: &mut u64, value: u64) {
    *slot = (*slot).max(value);
}

#[async_trait]
impl CountStore for MemoryCounts {
    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn apply(&self, env: &Envelope) -> Result<(), ApplyError> {
        let mut counts = self.inner.lock().expect("memory counts lock");
        let state = match &env.event {
            e if e.dm_state().is_some() => e.dm_state().expect("checked"),
            Event::RoomMessageSent(e) => {
                raise(counts.room_last.entry(e.room_id.clone()).or_default(), e.seq);
                raise(counts.room_wm.entry((e.sender_id.clone(), e.room_id.clone())).or_default(), e.seq);
                return Ok(());
            }
            Event::MemberJoined(e) => {
                raise(counts.room_wm.entry((e.user_id.clone(), e.room_id.clone())).or_default(), e.seen_up_to);
                return Ok(());
            }
            Event::RoomRead(e) => {
                raise(counts.room_wm.entry((e.user_id.clone(), e.room_id.clone())).or_default(), e.up_to_seq);
                return Ok(());
            }
            Event::RoomMessageDeleted(e) => {
                counts.room_deleted.entry(e.message.room_id.clone()).or_default().insert(e.message.seq);
                return Ok(());
            }
            _ => return Ok(()),
        };
        for (reader, peer) in [(&state.lo, &state.hi), (&state.hi, &state.lo)] {
            let slot = counts.dm.entry(reader.user_id.clone()).or_default().entry(peer.user_id.clone()).or_insert((0, 0));
            if env.position > slot.0 {
                *slot = (env.position, state.unseen(&reader.user_id, &peer.user_id));
            }
        }
        Ok(())
    }

    async fn unseen(&self, user: &str) -> Result<HashMap<String, u64>, StoreError> {
        let counts = self.inner.lock().expect("memory counts lock");
        Ok(counts
            .dm
            .get(user)
            .map(|peers| peers.iter().filter(|(_, (_, n))| *n > 0).map(|(p, (_, n))| (p.clone(), *n)).collect())
            .unwrap_or_default())
    }

    async fn room_unread(&self, user: &str, rooms: &[String]) -> Result<HashMap<String, u64>, StoreError> {
        let counts = self.inner.lock().expect("memory counts lock");
        Ok(rooms
            .iter()
            .map(|r| {
                let last = counts.room_last.get(r).copied().unwrap_or(0);
                let wm = counts.room_wm.get(&(user.to_owned(), r.clone())).copied().unwrap_or(0);
                let deleted = counts.room_deleted.get(r).map_or(0, |d| d.range(wm + 1..).count() as u64);
                (r.clone(), last.saturating_sub(wm).saturating_sub(deleted))
            })
            .collect())
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
