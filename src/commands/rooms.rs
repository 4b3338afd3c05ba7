//! Study rooms: create, join, leave, send, read.
//!
//! A room's subject holds `RoomCreated` then its messages, so each message
//! is appended with the expected last subject sequence and gets a gapless
//! `seq`. Each member has a subject of their own in the room; its newest
//! event says whether they are a member and how far they have read
//! ([`MemberState`]), so the membership check of every command is one read
//! of the log itself.

use natter_events::{Envelope, Event, MemberJoined, MemberLeft, MemberState, ReactionChanged, Role, RoomCreated, RoomMessageSent, RoomRead, subjects};
use natter_projections::{RoomMessageView, RoomView};

use super::append::command_id;
use super::send::{not_here, validate_content};
use super::{CommandError, Commands, Failure, Refusal, RoomFacts};
use crate::log::Logged;

pub const MAX_ROOM_NAME: usize = 100;
pub const MAX_ROOM_DESCRIPTION: usize = 1000;

#[derive(Debug, Clone)]
pub struct CreateRoom {
    pub creator: String,
    pub name: String,
    pub description: Option<String>,
    /// Listed to members only, joined by invitation only.
    pub private: bool,
}

#[derive(Debug, Clone)]
pub struct SendRoomMessage {
    pub sender: String,
    pub room: String,
    pub message: Option<String>,
    pub attachment: Option<String>,
    pub client_msg_id: Option<String>,
    /// The `_id` of an earlier message of the same room this one answers.
    pub reply_to: Option<String>,
}

/// Checks a room's name and description. Pure.
pub fn validate_room(cmd: &CreateRoom) -> Result<(), Refusal> {
    let name = cmd.name.trim();
    if name.is_empty() || name.chars().count() > MAX_ROOM_NAME {
        return Err(Refusal::BadInput(format!("room name must be 1 to {MAX_ROOM_NAME} characters")));
    }
    if cmd.description.as_ref().is_some_and(|d| d.chars().count() > MAX_ROOM_DESCRIPTION) {
        return Err(Refusal::BadInput(format!("room description is longer than {MAX_ROOM_DESCRIPTION} characters")));
    }
    Ok(())
}

/// The newest message seq of a room, from the newest event of its subject
/// (every event appended there says it). Pure.
pub(crate) fn room_last_seq(logged: &Logged) -> Result<u64, Failure> {
    match &logged.envelope.event {
        Event::RoomCreated(_) => Ok(0),
        Event::RoomMessageSent(e) => Ok(e.seq),
        Event::RoomMessageEdited(e) | Event::RoomMessageDeleted(e) => Ok(e.last_seq),
        Event::ReactionChanged(ReactionChanged { last_seq: Some(seq), .. }) => Ok(*seq),
        other => Err(Failure::Internal(format!(
            "event {} at log sequence {} on room subject {} does not say the room's newest seq",
            other.type_name(),
            logged.log_seq,
            logged.envelope.subject
        ))),
    }
}

/// Rooms whose facts [`Commands`] remembers before it starts afresh.
const KNOWN_ROOMS: usize = 100_000;

pub(crate) fn not_member() -> Refusal {
    Refusal::Forbidden("you are not a member of this room; join it first".into())
}

fn room_not_found() -> Refusal {
    Refusal::NotFound("Room not found".into())
}

/// A room id fit for a subject; anything else names no room.
pub(crate) fn room_id(room: &str) -> Result<(), Refusal> {
    natter_events::validate_id(room).map_err(|_| room_not_found())
}

impl Commands {
    /// The room's newest event (its existence and last seq).
    async fn room_head(&self, room: &str) -> Result<Logged, CommandError> {
        room_id(room)?;
        Ok(self.log.last(&subjects::room(&self.prefix, room)).await?.ok_or_else(room_not_found)?)
    }

    /// Whether `room` is private and who owns it, from the log (the views
    /// may lag or have lost it), read once per room and node.
    pub(crate) async fn room_facts(&self, room: &str) -> Result<RoomFacts, CommandError> {
        room_id(room)?;
        if let Some(f) = self.room_facts.lock().expect("room facts lock").get(room) {
            return Ok(f.clone());
        }
        let first = self.log.next_on(&subjects::room(&self.prefix, room), 0).await?;
        let facts = match first.map(|l| l.envelope.event) {
            Some(Event::RoomCreated(e)) => RoomFacts { private: e.private, owner: e.created_by },
            _ => return Err(room_not_found().into()),
        };
        let mut known = self.room_facts.lock().expect("room facts lock");
        if known.len() >= KNOWN_ROOMS {
            known.clear();
        }
        known.insert(room.to_owned(), facts.clone());
        Ok(facts)
    }

    pub(crate) async fn membership(&self, room: &str, user: &str) -> Result<MemberState, CommandError> {
        let last = self.log.last(&subjects::member(&self.prefix, room, user)).await?;
        Ok(MemberState::after(last.as_ref().map(|l| &l.envelope.event)))
    }

    /// Fails unless `user` is a member of the existing room `room`.
    pub async fn require_member(&self, room: &str, user: &str) -> Result<MemberState, CommandError> {
        self.room_head(room).await?;
        let m = self.membership(room, user).await?;
        if m.member { Ok(m) } else { Err(not_member().into()) }
    }

    #[tracing::instrument(skip_all, fields(creator = %cmd.creator))]
    pub async fn create_room(&self, cmd: CreateRoom) -> Result<RoomView, CommandError> {
        validate_room(&cmd)?;
        let room_id = uuid::Uuid::now_v7().to_string();
        let event = RoomCreated {
            room_id: room_id.clone(),
            name: cmd.name.trim().to_owned(),
            description: cmd.description.map(|d| d.trim().to_owned()).filter(|d| !d.is_empty()),
            created_by: cmd.creator.clone(),
            private: cmd.private,
        };
        let subject = subjects::room(&self.prefix, &room_id);
        let command_id = format!("{}:create:{room_id}", cmd.creator);
        let env = self
            .append(&subject, &command_id, |last: Option<Logged>| {
                std::future::ready(Ok(last.is_none().then(|| Event::RoomCreated(event.clone()))))
            })
            .await?
            .ok_or_else(|| Failure::Internal(format!("{subject}: a new room's subject already holds events")))?;
        // What the room is, known here at once (a log replica a read may
        // go to could be a moment behind the append).
        self.room_facts.lock().expect("room facts lock").insert(room_id.clone(), RoomFacts { private: event.private, owner: event.created_by.clone() });
        self.join_room(&cmd.creator, &room_id).await?;
        Ok(RoomView::from_event(&env, &event))
    }

    /// Appends an event on `user`'s member subject of `room`, deciding from
    /// the current membership and the room's last message seq.
    pub(crate) async fn append_member<F>(&self, room: &str, user: &str, decide: F) -> Result<Option<Envelope>, CommandError>
    where
        F: Fn(&MemberState, u64) -> Result<Option<Event>, Refusal>,
    {
        room_id(room)?;
        let subject = subjects::member(&self.prefix, room, user);
        let command_id = format!("{user}:member:{}", uuid::Uuid::now_v7());
        let decide = &decide;
        self.append(&subject, &command_id, |last: Option<Logged>| async move {
            let head = self.room_head(room).await?;
            Ok(decide(&MemberState::after(last.as_ref().map(|l| &l.envelope.event)), room_last_seq(&head)?)?)
        })
        .await
    }

    /// Joins `room` as `user` (nothing happens if already a member). A
    /// private room needs an invitation (anyone else is told there is no
    /// such room), and so does a room one was removed from; its owner
    /// always comes back as owner.
    #[tracing::instrument(skip_all, fields(user = %user, room = %room))]
    pub async fn join_room(&self, user: &str, room: &str) -> Result<(), CommandError> {
        let facts = self.room_facts(room).await?;
        let owner = facts.owner == user;
        self.append_member(room, user, |m, last_seq| {
            if m.member {
                return Ok(None);
            }
            if !owner && !m.invited {
                if facts.private {
                    return Err(room_not_found());
                }
                if m.removed {
                    return Err(Refusal::Forbidden("you were removed from this room: its owner or an admin must invite you back".into()));
                }
            }
            let role = if owner { Role::Owner } else { Role::Member };
            Ok(Some(Event::MemberJoined(MemberJoined { room_id: room.to_owned(), user_id: user.to_owned(), seen_up_to: last_seq, role })))
        })
        .await?;
        Ok(())
    }

    /// Leaves `room` as `user`.
    #[tracing::instrument(skip_all, fields(user = %user, room = %room))]
    pub async fn leave_room(&self, user: &str, room: &str) -> Result<(), CommandError> {
        self.append_member(room, user, |m, _| {
            if !m.member {
                return Err(not_member());
            }
            Ok(Some(Event::MemberLeft(MemberLeft { room_id: room.to_owned(), user_id: user.to_owned(), ..Default::default() })))
        })
        .await?;
        Ok(())
    }

    /// Marks `room` read to its end for `user` (a member).
    pub async fn read_room(&self, user: &str, room: &str) -> Result<(), CommandError> {
        self.append_member(room, user, |m, last_seq| {
            if !m.member {
                return Err(not_member());
            }
            // The member subject's newest event says the role: keep it.
            Ok((last_seq > m.read_up_to)
                .then(|| Event::RoomRead(RoomRead { room_id: room.to_owned(), user_id: user.to_owned(), up_to_seq: last_seq, role: m.role })))
        })
        .await?;
        Ok(())
    }

    /// Sends to a room (members only). A retry with the same `clientMsgId`
    /// returns the original message.
    #[tracing::instrument(skip_all, fields(sender = %cmd.sender, room = %cmd.room))]
    pub async fn send_room(&self, cmd: SendRoomMessage) -> Result<RoomMessageView, CommandError> {
        validate_content(cmd.message.as_deref(), cmd.attachment.as_deref(), cmd.client_msg_id.as_deref(), &self.limits)?;
        let command_id = command_id(&format!("{}:room", cmd.sender), cmd.client_msg_id.as_deref());
        room_id(&cmd.room)?;
        let subject = subjects::room(&self.prefix, &cmd.room);
        let append = async {
            let message_id = uuid::Uuid::now_v7().to_string();
            let (cmd, message_id) = (&cmd, &message_id);
            let env = self
                .append(&subject, &command_id, |head: Option<Logged>| async move {
                    let head = head.ok_or_else(room_not_found)?;
                    if !self.membership(&cmd.room, &cmd.sender).await?.member {
                        return Err(not_member().into());
                    }
                    let reply_to = match &cmd.reply_to {
                        None => None,
                        Some(id) => {
                            natter_events::validate_id(id).map_err(|_| not_here())?;
                            let m = self.views.room_message(id).await?.filter(|m| m.room_id == cmd.room).ok_or_else(not_here)?;
                            if m.deleted {
                                return Err(super::send::answered_deleted().into());
                            }
                            Some(natter_events::ReplyRef::to(m.id))
                        }
                    };
                    Ok(Some(Event::RoomMessageSent(RoomMessageSent {
                        message_id: message_id.clone(),
                        room_id: cmd.room.clone(),
                        sender_id: cmd.sender.clone(),
                        client_msg_id: cmd.client_msg_id.clone(),
                        message: cmd.message.clone(),
                        attachment: cmd.attachment.clone(),
                        seq: room_last_seq(&head)? + 1,
                        reply_to,
                    })))
                })
                .await?;
            Ok(env.as_ref().and_then(room_message_of))
        };
        let same = |m: &RoomMessageView| {
            // Edited or deleted since: the retry gets the message as it now reads.
            if m.deleted || m.edited_at.is_some() {
                return m.room_id == cmd.room;
            }
            m.room_id == cmd.room && m.message == cmd.message && m.attachment == cmd.attachment && m.reply_to.as_ref().map(|r| &r.message_id) == cmd.reply_to.as_ref()
        };
        let key = cmd.client_msg_id.is_some().then_some((subject.as_str(), command_id.as_str()));
        self.once(key, self.views.room_message_by_command(&command_id), room_message_of, append, same).await
    }
}

/// The message a `RoomMessageSent` event records.
fn room_message_of(env: &Envelope) -> Option<RoomMessageView> {
    match &env.event {
        Event::RoomMessageSent(sent) => Some(RoomMessageView::from_event(env, sent)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_on_a_room_subject_says_the_rooms_newest_seq() {
        let at = |event| Logged { log_seq: 7, envelope: Envelope::new("c".into(), "p.ev.room.r".into(), 3, event) };
        let created = Event::RoomCreated(RoomCreated { room_id: "r".into(), name: "n".into(), description: None, created_by: "u".into(), ..Default::default() });
        assert_eq!(room_last_seq(&at(created)).unwrap(), 0);
        let reaction = |last_seq| {
            Event::ReactionChanged(ReactionChanged { message_id: "m".into(), user_id: "u".into(), emoji: "👍".into(), on: true, state: None, last_seq })
        };
        assert_eq!(room_last_seq(&at(reaction(Some(5)))).unwrap(), 5, "a reaction keeps the room's seq");
        assert!(room_last_seq(&at(reaction(None))).is_err(), "never a silent 0");
    }

    #[test]
    fn refuses_bad_rooms() {
        let room = |name: &str, d: Option<&str>| CreateRoom { creator: "u".into(), name: name.into(), description: d.map(Into::into), private: false };
        assert!(validate_room(&room("Algebra", None)).is_ok());
        assert!(validate_room(&room("  ", None)).is_err());
        assert!(validate_room(&room(&"x".repeat(101), None)).is_err());
        assert!(validate_room(&room("ok", Some(&"d".repeat(1001)))).is_err());
    }
}
