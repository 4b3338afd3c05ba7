//! Event histories from plain commands, and snapshots of views to compare.
//!
//! [`History`] plays the command side's decisions (the same `DmState`
//! transitions) without a log, producing the envelopes a real log would
//! hold. [`History::expected_unseen`] computes unseen counts from their
//! *definition* (the peer's messages above my watermark), independently of
//! the arithmetic the projections use. [`snapshot`] reads every view back
//! through the store ports so two stores can be compared for equality.

use std::collections::{BTreeMap, HashMap};

use natter_events::{
    BlockChanged, DmState, Envelope, Event, MemberJoined, MemberLeft, MessageRevised, MessageSent, MessagesSeen, ReactionChanged, RoomCreated, RoomMessageRevised, RoomMessageSent,
    RoomRead, UserRegistered,
    subjects,
};

use crate::views::{CountStore, MessageView, RoomMessageView, RoomView, StoreError, UserView, ViewStore};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    seq: u64,
    sender: String,
    receiver: String,
    sender_count: u64,
    /// The send's event (for its edits and deletion).
    event: MessageSent,
    at: chrono::DateTime<chrono::Utc>,
    command_id: String,
    deleted: bool,
}

pub struct History {
    prefix: String,
    pub users: Vec<String>,
    pub envelopes: Vec<Envelope>,
    states: HashMap<String, DmState>,
    positions: HashMap<String, u64>,
    sent: HashMap<String, Vec<Sent>>,
    pub rooms: Vec<String>,
    room_last: HashMap<String, u64>,
    members: HashMap<(String, String), bool>,
    room_wm: HashMap<(String, String), u64>,
    /// room → its messages: (send event, its time, its command id, deleted)
    room_sent: HashMap<String, Vec<(RoomMessageSent, chrono::DateTime<chrono::Utc>, String, bool)>>,
    /// (message, user, emoji) → set, as the newest change left it
    reactions: BTreeMap<(String, String, String), bool>,
}

impl History {
    /// A history that starts with `users` registrations.
    pub fn new(prefix: &str, users: usize) -> History {
        let mut h = History {
            prefix: prefix.to_owned(),
            users: Vec::new(),
            envelopes: Vec::new(),
            states: HashMap::new(),
            positions: HashMap::new(),
            sent: HashMap::new(),
            rooms: Vec::new(),
            room_last: HashMap::new(),
            members: HashMap::new(),
            room_wm: HashMap::new(),
            room_sent: HashMap::new(),
            reactions: BTreeMap::new(),
        };
        for i in 0..users {
            let user_id = format!("u{i}-{}", uuid::Uuid::now_v7().simple());
            let event = UserRegistered {
                user_id: user_id.clone(),
                name: format!("User {i}"),
                email: format!("{user_id}@example.com"),
                password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
            };
            let subject = subjects::account(prefix, &user_id);
            h.push(format!("register:{user_id}"), subject, Event::UserRegistered(event));
            h.users.push(user_id);
        }
        h
    }

    fn push(&mut self, command_id: String, subject: String, event: Event) {
        let position = self.positions.entry(subject.clone()).or_insert(0);
        *position += 1;
        let env = Envelope::new(command_id, subject, *position, event);
        self.envelopes.push(env);
    }

    fn state(&self, a: &str, b: &str) -> DmState {
        self.states.get(&subjects::dm_conversation(a, b)).cloned().unwrap_or_else(|| DmState::new(a, b))
    }

    /// User `from` sends a message to user `to` (indexes into `users`).
    pub fn send(&mut self, from: usize, to: usize) {
        let (from, to) = (self.users[from].clone(), self.users[to].clone());
        assert_ne!(from, to, "no conversation with oneself");
        if self.state(&from, &to).any_block() {
            return; // refused, as the command side refuses it
        }
        let (state, seq, sender_count) = self.state(&from, &to).after_send(&from);
        let conversation = subjects::dm_conversation(&from, &to);
        self.states.insert(conversation.clone(), state.clone());
        let message_id = uuid::Uuid::now_v7().to_string();
        let event = MessageSent {
            message_id: message_id.clone(),
            client_msg_id: None,
            sender_id: from.clone(),
            receiver_id: to.clone(),
            message: Some(format!("message {seq}")),
            attachments: if seq % 3 == 0 { vec![format!("https://files.example/{seq}.png")] } else { vec![] },
            seq,
            sender_count,
            state,
            reply_to: None,
        };
        let subject = subjects::dm(&self.prefix, &from, &to);
        let command_id = format!("{from}:{message_id}");
        self.push(command_id.clone(), subject, Event::MessageSent(event.clone()));
        let at = self.envelopes.last().expect("just pushed").at;
        self.sent.entry(conversation).or_default().push(Sent { seq, sender: from, receiver: to, sender_count, event, at, command_id, deleted: false });
    }

    /// The `nth` (modulo) message `sender` sent `to` that is not deleted.
    fn own_message(&self, sender: &str, to: &str, nth: usize) -> Option<usize> {
        let all = self.sent.get(&subjects::dm_conversation(sender, to))?;
        let mine: Vec<usize> = (0..all.len()).filter(|i| all[*i].sender == sender && !all[*i].deleted).collect();
        (!mine.is_empty()).then(|| mine[nth % mine.len()])
    }

    /// The event that revises message `i` of the conversation of `a` and `b`.
    fn revision(&self, a: &str, b: &str, i: usize, text: Option<String>, state: DmState) -> MessageRevised {
        let sent = &self.sent[&subjects::dm_conversation(a, b)][i];
        let mut message = sent.event.clone();
        if text.is_none() {
            (message.attachments, message.reply_to) = (Vec::new(), None);
        }
        message.message = text;
        message.state = state;
        MessageRevised { message, sent_at: sent.at, sent_command_id: sent.command_id.clone() }
    }

    /// `sender` edits the `nth` (modulo) of their live messages to `to`.
    pub fn edit(&mut self, sender: usize, to: usize, nth: usize) {
        let (sender, to) = (self.users[sender].clone(), self.users[to].clone());
        let Some(i) = self.own_message(&sender, &to, nth) else { return };
        let state = self.state(&sender, &to);
        let text = format!("edited at {}", self.envelopes.len());
        let event = self.revision(&sender, &to, i, Some(text), state);
        let subject = subjects::dm(&self.prefix, &sender, &to);
        self.push(format!("{sender}:edit:{}", uuid::Uuid::now_v7()), subject, Event::MessageEdited(event));
    }

    /// `sender` deletes the `nth` (modulo) of their live messages to `to`
    /// (nothing when the command side would refuse it).
    pub fn delete(&mut self, sender: usize, to: usize, nth: usize) {
        let (sender, to) = (self.users[sender].clone(), self.users[to].clone());
        let Some(i) = self.own_message(&sender, &to, nth) else { return };
        let conversation = subjects::dm_conversation(&sender, &to);
        let seq = self.sent[&conversation][i].seq;
        let Ok(state) = self.state(&sender, &to).after_delete(&sender, seq) else { return };
        self.states.insert(conversation.clone(), state.clone());
        let event = self.revision(&sender, &to, i, None, state);
        self.sent.get_mut(&conversation).expect("a conversation")[i].deleted = true;
        let subject = subjects::dm(&self.prefix, &sender, &to);
        self.push(format!("{sender}:delete:{}", uuid::Uuid::now_v7()), subject, Event::MessageDeleted(event));
    }

    /// `user` sets (`on`) or takes back reaction `emoji` on the `nth`
    /// (modulo) message of their conversation with `peer`; nothing when it
    /// is already so (as the command side decides).
    pub fn react(&mut self, user: usize, peer: usize, nth: usize, emoji: &str, on: bool) {
        let (user, peer) = (self.users[user].clone(), self.users[peer].clone());
        let conversation = subjects::dm_conversation(&user, &peer);
        let Some(all) = self.sent.get(&conversation).filter(|a| !a.is_empty()) else { return };
        let m = &all[nth % all.len()];
        let key = (m.event.message_id.clone(), user.clone(), emoji.to_owned());
        if m.deleted || self.reactions.get(&key).copied().unwrap_or(false) == on {
            return;
        }
        let state = Some(self.state(&user, &peer));
        let event = ReactionChanged { message_id: key.0.clone(), user_id: user.clone(), emoji: emoji.to_owned(), on, state, last_seq: None };
        self.reactions.insert(key, on);
        let subject = subjects::dm(&self.prefix, &user, &peer);
        self.push(format!("{user}:react:{}", uuid::Uuid::now_v7()), subject, Event::ReactionChanged(event));
    }

    /// `user` reacts (`on`) or takes it back on the `nth` message of the
    /// `room`th room.
    pub fn room_react(&mut self, user: usize, room: usize, nth: usize, emoji: &str, on: bool) {
        if self.rooms.is_empty() {
            return;
        }
        let (user, room) = (self.users[user].clone(), self.rooms[room % self.rooms.len()].clone());
        let Some(all) = self.room_sent.get(&room).filter(|a| !a.is_empty()) else { return };
        let m = &all[nth % all.len()];
        let key = (m.0.message_id.clone(), user.clone(), emoji.to_owned());
        if m.3 || self.reactions.get(&key).copied().unwrap_or(false) == on {
            return;
        }
        let last_seq = Some(self.room_last.get(&room).copied().unwrap_or(0));
        let event = ReactionChanged { message_id: key.0.clone(), user_id: user.clone(), emoji: emoji.to_owned(), on, state: None, last_seq };
        self.reactions.insert(key, on);
        self.push(format!("{user}:react:{}", uuid::Uuid::now_v7()), subjects::room(&self.prefix, &room), Event::ReactionChanged(event));
    }

    /// Reactions by definition: for each message with any, emoji → the
    /// users whose newest change set it.
    pub fn expected_reactions(&self) -> BTreeMap<String, crate::Reactions> {
        let mut out: BTreeMap<String, crate::Reactions> = BTreeMap::new();
        for ((m, u, e), on) in &self.reactions {
            if *on {
                out.entry(m.clone()).or_default().entry(e.clone()).or_default().push(u.clone());
            }
        }
        for r in out.values_mut() {
            r.values_mut().for_each(|users| users.sort());
        }
        out
    }

    /// The ids of every deleted message, direct or in a room.
    pub fn deleted(&self) -> Vec<String> {
        let direct = self.sent.values().flatten().filter(|m| m.deleted).map(|m| m.event.message_id.clone());
        direct.chain(self.room_sent.values().flatten().filter(|m| m.3).map(|m| m.0.message_id.clone())).collect()
    }

    /// `reader` marks the `nth` (modulo) message `peer` sent them as seen;
    /// nothing happens if the watermark would not move or there is none.
    pub fn mark(&mut self, reader: usize, peer: usize, nth: usize) {
        let (reader, peer) = (self.users[reader].clone(), self.users[peer].clone());
        let conversation = subjects::dm_conversation(&reader, &peer);
        let theirs: Vec<Sent> = self
            .sent
            .get(&conversation)
            .map(|all| all.iter().filter(|m| m.sender == peer).cloned().collect())
            .unwrap_or_default();
        if theirs.is_empty() {
            return;
        }
        let m = &theirs[nth % theirs.len()];
        self.seen(&reader, &peer, m.seq, m.sender_count);
    }

    /// `user` blocks (`on`) or unblocks `other`; nothing if already so.
    pub fn block(&mut self, user: usize, other: usize, on: bool) {
        let (user, other) = (self.users[user].clone(), self.users[other].clone());
        let Some(state) = self.state(&user, &other).after_block(&user, on) else { return };
        self.states.insert(subjects::dm_conversation(&user, &other), state.clone());
        let event = BlockChanged { user_id: user.clone(), other_id: other.clone(), blocked: on, state };
        let subject = subjects::dm(&self.prefix, &user, &other);
        self.push(format!("{user}:block:{}", uuid::Uuid::now_v7()), subject, Event::BlockChanged(event));
    }

    /// Whom each user has blocked, by definition (the newest change wins).
    pub fn expected_blocked(&self, user: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .states
            .values()
            .filter(|s| s.side(user).is_some_and(|me| me.blocked))
            .map(|s| if s.lo.user_id == user { s.hi.user_id.clone() } else { s.lo.user_id.clone() })
            .collect();
        out.sort();
        out
    }

    /// `reader` opens the conversation with `peer`.
    pub fn open(&mut self, reader: usize, peer: usize) {
        let (reader, peer) = (self.users[reader].clone(), self.users[peer].clone());
        let state = self.state(&reader, &peer);
        let peer_sent = state.side(&peer).map(|s| s.sent).unwrap_or(0);
        if peer_sent > state.side(&reader).map(|s| s.seen_count).unwrap_or(0) {
            self.seen(&reader, &peer, state.last_seq, peer_sent);
        }
    }

    fn seen(&mut self, reader: &str, peer: &str, up_to_seq: u64, seen_count: u64) {
        let Some(state) = self.state(reader, peer).after_seen(reader, up_to_seq, seen_count) else { return };
        self.states.insert(subjects::dm_conversation(reader, peer), state.clone());
        let event = MessagesSeen {
            reader_id: reader.to_owned(),
            peer_id: peer.to_owned(),
            up_to_seq,
            seen_count,
            state,
        };
        let subject = subjects::dm(&self.prefix, reader, peer);
        self.push(format!("{reader}:seen:{}", uuid::Uuid::now_v7()), subject, Event::MessagesSeen(event));
    }

    /// User `creator` creates a room (and joins it).
    pub fn create_room(&mut self, creator: usize) {
        let creator = self.users[creator].clone();
        let room_id = format!("r{}-{}", self.rooms.len(), uuid::Uuid::now_v7().simple());
        let event = RoomCreated { room_id: room_id.clone(), name: format!("Room {}", self.rooms.len()), description: None, created_by: creator.clone(), ..Default::default() };
        self.push(format!("{creator}:create:{room_id}"), subjects::room(&self.prefix, &room_id), Event::RoomCreated(event));
        self.rooms.push(room_id.clone());
        self.join_id(&creator, &room_id);
    }

    fn join_id(&mut self, user: &str, room: &str) {
        let key = (room.to_owned(), user.to_owned());
        if self.members.get(&key) == Some(&true) {
            return;
        }
        self.members.insert(key.clone(), true);
        let seen_up_to = self.room_last.get(room).copied().unwrap_or(0);
        let wm = self.room_wm.entry(key).or_default();
        *wm = (*wm).max(seen_up_to);
        let event = MemberJoined { room_id: room.to_owned(), user_id: user.to_owned(), seen_up_to, ..Default::default() };
        self.push(format!("{user}:join:{}", uuid::Uuid::now_v7()), subjects::member(&self.prefix, room, user), Event::MemberJoined(event));
    }

    /// User `user` joins the `nth` (modulo) room, if any.
    pub fn join(&mut self, user: usize, nth: usize) {
        if self.rooms.is_empty() {
            return;
        }
        let (user, room) = (self.users[user].clone(), self.rooms[nth % self.rooms.len()].clone());
        self.join_id(&user, &room);
    }

    /// User `user` leaves the `nth` room, if a member.
    pub fn leave(&mut self, user: usize, nth: usize) {
        if self.rooms.is_empty() {
            return;
        }
        let (user, room) = (self.users[user].clone(), self.rooms[nth % self.rooms.len()].clone());
        let key = (room.clone(), user.clone());
        if self.members.get(&key) != Some(&true) {
            return;
        }
        self.members.insert(key, false);
        let event = MemberLeft { room_id: room.clone(), user_id: user.clone(), ..Default::default() };
        self.push(format!("{user}:leave:{}", uuid::Uuid::now_v7()), subjects::member(&self.prefix, &room, &user), Event::MemberLeft(event));
    }

    /// A member sends to the `nth` room (non-members are refused: no event).
    pub fn room_send(&mut self, user: usize, nth: usize) {
        if self.rooms.is_empty() {
            return;
        }
        let (user, room) = (self.users[user].clone(), self.rooms[nth % self.rooms.len()].clone());
        if self.members.get(&(room.clone(), user.clone())) != Some(&true) {
            return;
        }
        let seq = self.room_last.get(&room).copied().unwrap_or(0) + 1;
        self.room_last.insert(room.clone(), seq);
        let wm = self.room_wm.entry((room.clone(), user.clone())).or_default();
        *wm = (*wm).max(seq);
        let message_id = uuid::Uuid::now_v7().to_string();
        let event = RoomMessageSent {
            message_id: message_id.clone(),
            room_id: room.clone(),
            sender_id: user.clone(),
            client_msg_id: None,
            message: Some(format!("room message {seq}")),
            attachment: None,
            seq,
            reply_to: None,
        };
        let command_id = format!("{user}:{message_id}");
        self.push(command_id.clone(), subjects::room(&self.prefix, &room), Event::RoomMessageSent(event.clone()));
        let at = self.envelopes.last().expect("just pushed").at;
        self.room_sent.entry(room).or_default().push((event, at, command_id, false));
    }

    /// `user` edits (`text`) or deletes (`None`) the `nth` (modulo) of
    /// their live messages in the `room`th room.
    fn room_revise(&mut self, user: usize, room: usize, nth: usize, text: Option<String>) {
        if self.rooms.is_empty() {
            return;
        }
        let (user, room) = (self.users[user].clone(), self.rooms[room % self.rooms.len()].clone());
        let last_seq = self.room_last.get(&room).copied().unwrap_or(0);
        let Some(all) = self.room_sent.get_mut(&room) else { return };
        let mine: Vec<usize> = (0..all.len()).filter(|i| all[*i].0.sender_id == user && !all[*i].3).collect();
        let Some(i) = (!mine.is_empty()).then(|| mine[nth % mine.len()]) else { return };
        let (sent, at, command_id, _) = all[i].clone();
        let mut message = sent;
        let deleting = text.is_none();
        if deleting {
            (message.attachment, message.reply_to) = (None, None);
            all[i].3 = true;
        }
        message.message = text;
        let event = RoomMessageRevised { message, sent_at: at, sent_command_id: command_id, last_seq };
        let subject = subjects::room(&self.prefix, &room);
        let (kind, event) = if deleting { ("delete", Event::RoomMessageDeleted(event)) } else { ("edit", Event::RoomMessageEdited(event)) };
        self.push(format!("{user}:{kind}:{}", uuid::Uuid::now_v7()), subject, event);
    }

    /// `user` edits the `nth` of their live messages in the `room`th room.
    pub fn room_edit(&mut self, user: usize, room: usize, nth: usize) {
        let text = format!("room edit {}", self.envelopes.len());
        self.room_revise(user, room, nth, Some(text));
    }

    /// `user` deletes the `nth` of their live messages in the `room`th room.
    pub fn room_delete(&mut self, user: usize, room: usize, nth: usize) {
        self.room_revise(user, room, nth, None);
    }

    /// A member reads the `nth` room to its end.
    pub fn room_read(&mut self, user: usize, nth: usize) {
        if self.rooms.is_empty() {
            return;
        }
        let (user, room) = (self.users[user].clone(), self.rooms[nth % self.rooms.len()].clone());
        let key = (room.clone(), user.clone());
        let last = self.room_last.get(&room).copied().unwrap_or(0);
        if self.members.get(&key) != Some(&true) || self.room_wm.get(&key).copied().unwrap_or(0) >= last {
            return;
        }
        self.room_wm.insert(key, last);
        let event = RoomRead { room_id: room.clone(), user_id: user.clone(), up_to_seq: last, ..Default::default() };
        self.push(format!("{user}:read:{}", uuid::Uuid::now_v7()), subjects::member(&self.prefix, &room, &user), Event::RoomRead(event));
    }

    /// Unread room messages by definition: messages above the member's
    /// watermark and not deleted, for every room `user` is a member of.
    pub fn expected_room_unread(&self, user: &str) -> BTreeMap<String, u64> {
        self.rooms
            .iter()
            .filter(|r| self.members.get(&((*r).clone(), user.to_owned())) == Some(&true))
            .map(|r| {
                let last = self.room_last.get(r).copied().unwrap_or(0);
                let wm = self.room_wm.get(&(r.clone(), user.to_owned())).copied().unwrap_or(0);
                let deleted = self.room_sent.get(r).map_or(0, |all| all.iter().filter(|m| m.3 && m.0.seq > wm).count() as u64);
                (r.clone(), last.saturating_sub(wm) - deleted)
            })
            .collect()
    }

    /// Every conversation that has at least one event.
    pub fn conversations(&self) -> Vec<String> {
        let mut all: Vec<String> = self.states.keys().cloned().collect();
        all.sort();
        all
    }

    /// Unseen counts by definition: `peer`'s messages to `user` whose seq is
    /// above `user`'s watermark in that conversation, and not deleted.
    pub fn expected_unseen(&self, user: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (conversation, messages) in &self.sent {
            let watermark = self.states[conversation].side(user).map(|s| s.seen_seq).unwrap_or(0);
            let n = messages.iter().filter(|m| m.receiver == user && m.seq > watermark && !m.deleted).count() as u64;
            if n > 0 {
                let peer = &messages.iter().find(|m| m.receiver == user).expect("a message to user").sender;
                out.insert(peer.clone(), n);
            }
        }
        out
    }
}

/// Everything the views hold about a set of users and conversations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub users: Vec<UserView>,
    pub conversations: BTreeMap<String, (Vec<MessageView>, BTreeMap<String, u64>)>,
    pub unseen: BTreeMap<String, BTreeMap<String, u64>>,
    /// room → (view, members, messages)
    pub rooms: BTreeMap<String, (Option<RoomView>, Vec<String>, Vec<RoomMessageView>)>,
    /// user → room → unread, over the rooms the user is a member of
    pub room_unread: BTreeMap<String, BTreeMap<String, u64>>,
    /// user → the users they have blocked
    pub blocked: BTreeMap<String, Vec<String>>,
    /// message → its reactions (messages with any)
    pub reactions: BTreeMap<String, crate::Reactions>,
}

/// Reads the views of `users`, `conversations` and `rooms` back through the ports.
pub async fn snapshot(
    views: &dyn ViewStore,
    counts: &dyn CountStore,
    users: &[String],
    conversations: &[String],
    rooms: &[String],
) -> Result<Snapshot, StoreError> {
    let mut all_users = Vec::new();
    for u in users {
        if let Some(view) = views.user(u).await? {
            all_users.push(view);
        }
    }
    let mut convs = BTreeMap::new();
    for c in conversations {
        let messages = views.messages(c, None, 10_000).await?;
        let marks = views.watermarks(c).await?.into_iter().filter(|(_, w)| *w > 0).collect();
        convs.insert(c.clone(), (messages, marks));
    }
    let mut unseen = BTreeMap::new();
    for u in users {
        unseen.insert(u.clone(), counts.unseen(u).await?.into_iter().collect());
    }
    let mut room_views = BTreeMap::new();
    let mut membership: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in rooms {
        let members = views.room_members(r).await?;
        for m in &members {
            membership.entry(m.clone()).or_default().push(r.clone());
        }
        room_views.insert(r.clone(), (views.room(r).await?, members, views.room_messages(r, None, 10_000).await?));
    }
    let mut room_unread = BTreeMap::new();
    for u in users {
        let mine = membership.get(u).cloned().unwrap_or_default();
        room_unread.insert(u.clone(), counts.room_unread(u, &mine).await?.into_iter().collect());
    }
    let mut blocked = BTreeMap::new();
    for u in users {
        let mut theirs = views.blocked_among(u, users).await?;
        theirs.sort();
        blocked.insert(u.clone(), theirs);
    }
    let mut ids: Vec<String> = convs.values().flat_map(|(m, _)| m.iter().map(|m| m.id.clone())).collect();
    ids.extend(room_views.values().flat_map(|(_, _, m)| m.iter().map(|m| m.id.clone())));
    let reactions = views.reactions(&ids).await?.into_iter().collect();
    Ok(Snapshot { users: all_users, conversations: convs, unseen, rooms: room_views, room_unread, blocked, reactions })
}
