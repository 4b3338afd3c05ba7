//! Study rooms: create, join, leave, send, read.
//!
//! A room's subject holds `RoomCreated` then its messages, so each message
//! is appended with the expected last subject sequence and gets a gapless
//! `seq`. Each member has a subject of their own in the room; its newest
//! event says whether they are a member and how far they have read, so the
//! membership check of every command is one read of the log itself.

use natter_events::{Envelope, Event, MemberJoined, MemberLeft, RoomCreated, RoomMessageSent, RoomRead, subjects};
use natter_projections::{RoomMessageView, RoomView};

use super::send::validate_content;
use super::{CommandError, Commands, Refusal};
use crate::log::{LogError, Logged};

pub const MAX_ROOM_NAME: usize = 100;
pub const MAX_ROOM_DESCRIPTION: usize = 1000;

#[derive(Debug, Clone)]
pub struct CreateRoom {
    pub creator: String,
    pub name: String,
    pub description: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SendRoomMessage {
    pub sender: String,
    pub room: String,
    pub message: Option<String>,
    pub attachment: Option<String>,
    pub client_msg_id: Option<String>,
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

/// Where a user stands in a room, from the newest event of their member subject.
#[derive(Debug, Clone, Default)]
pub struct Membership {
    pub last: Option<(u64, u64)>, // (log seq, position)
    pub member: bool,
    /// Read watermark as of the member subject (joins and reads).
    pub read_up_to: u64,
}

/// The membership an event on a member subject leaves. Pure.
pub fn membership_after(logged: Option<&Logged>) -> Membership {
    let Some(l) = logged else { return Membership::default() };
    let last = Some((l.log_seq, l.envelope.position));
    match &l.envelope.event {
        Event::MemberJoined(e) => Membership { last, member: true, read_up_to: e.seen_up_to },
        Event::RoomRead(e) => Membership { last, member: true, read_up_to: e.up_to_seq },
        _ => Membership { last, member: false, read_up_to: 0 },
    }
}

/// The newest message seq of a room, from the newest event of its subject.
fn room_last_seq(logged: &Logged) -> u64 {
    match &logged.envelope.event {
        Event::RoomMessageSent(e) => e.seq,
        _ => 0,
    }
}

fn not_member() -> Refusal {
    Refusal::Forbidden("you are not a member of this room; join it first".into())
}

impl Commands {
    fn room_not_found() -> Refusal {
        Refusal::NotFound("Room not found".into())
    }

    /// The room's newest event (its existence and last seq).
    async fn room_head(&self, room: &str) -> Result<Logged, CommandError> {
        natter_events::validate_id(room).map_err(|_| Self::room_not_found())?;
        Ok(self.log.last(&subjects::room(&self.prefix, room)).await?.ok_or_else(Self::room_not_found)?)
    }

    pub async fn membership(&self, room: &str, user: &str) -> Result<Membership, CommandError> {
        let last = self.log.last(&subjects::member(&self.prefix, room, user)).await?;
        Ok(membership_after(last.as_ref()))
    }

    /// Fails unless `user` is a member of the existing room `room`.
    pub async fn require_member(&self, room: &str, user: &str) -> Result<Membership, CommandError> {
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
        };
        let env = Envelope::new(
            format!("{}:create:{room_id}", cmd.creator),
            subjects::room(&self.prefix, &room_id),
            1,
            Event::RoomCreated(event.clone()),
        );
        self.log.append(&env, 0).await?;
        self.metrics.event_appended(env.event.type_name());
        self.apply_now(&env).await;
        self.join_room(&cmd.creator, &room_id).await?;
        Ok(RoomView::from_event(&env, &event))
    }

    /// Appends an event on `user`'s member subject of `room`, deciding from
    /// the current membership; retries when the subject moved meanwhile.
    async fn append_member<F>(&self, room: &str, user: &str, decide: F) -> Result<Option<Envelope>, CommandError>
    where
        F: Fn(&Membership, u64) -> Result<Option<Event>, Refusal>,
    {
        let subject = subjects::member(&self.prefix, room, user);
        for _ in 0..super::MAX_ATTEMPTS {
            let head = self.room_head(room).await?;
            let m = self.membership(room, user).await?;
            let Some(event) = decide(&m, room_last_seq(&head))? else { return Ok(None) };
            let (expected, position) = m.last.map_or((0, 1), |(seq, pos)| (seq, pos + 1));
            let env = Envelope::new(format!("{user}:member:{}", uuid::Uuid::now_v7()), subject.clone(), position, event);
            match self.log.append(&env, expected).await {
                Ok(_) => {
                    self.metrics.event_appended(env.event.type_name());
                    self.apply_now(&env).await;
                    return Ok(Some(env));
                }
                Err(LogError::Conflict) => self.metrics.append_conflict(),
                Err(e) => return Err(e.into()),
            }
        }
        Err(super::Failure::Internal(format!("{subject}: gave up after repeated conflicts")).into())
    }

    /// Joins `room` as `user` (nothing happens if already a member).
    #[tracing::instrument(skip_all, fields(user = %user, room = %room))]
    pub async fn join_room(&self, user: &str, room: &str) -> Result<(), CommandError> {
        self.append_member(room, user, |m, last_seq| {
            Ok((!m.member).then(|| {
                Event::MemberJoined(MemberJoined { room_id: room.to_owned(), user_id: user.to_owned(), seen_up_to: last_seq })
            }))
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
            Ok(Some(Event::MemberLeft(MemberLeft { room_id: room.to_owned(), user_id: user.to_owned() })))
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
            Ok((last_seq > m.read_up_to)
                .then(|| Event::RoomRead(RoomRead { room_id: room.to_owned(), user_id: user.to_owned(), up_to_seq: last_seq })))
        })
        .await?;
        Ok(())
    }

    /// Sends to a room (members only). A retry with the same `clientMsgId`
    /// returns the original message.
    #[tracing::instrument(skip_all, fields(sender = %cmd.sender, room = %cmd.room))]
    pub async fn send_room(&self, cmd: SendRoomMessage) -> Result<RoomMessageView, CommandError> {
        validate_content(cmd.message.as_deref(), cmd.attachment.as_deref(), cmd.client_msg_id.as_deref(), &self.limits)?;
        let command_id = match &cmd.client_msg_id {
            Some(c) => format!("{}:room:{c}", cmd.sender),
            None => format!("{}:room:{}", cmd.sender, uuid::Uuid::now_v7()),
        };
        let same = |m: &RoomMessageView| m.room_id == cmd.room && m.message == cmd.message && m.attachment == cmd.attachment;
        let reused = || Refusal::Conflict("clientMsgId was already used for a different message".into());
        if cmd.client_msg_id.is_some() {
            if let Some(existing) = self.views.room_message_by_command(&command_id).await? {
                return if same(&existing) { Ok(existing) } else { Err(reused().into()) };
            }
        }
        let subject = subjects::room(&self.prefix, &cmd.room);
        let message_id = uuid::Uuid::now_v7().to_string();
        for _ in 0..super::MAX_ATTEMPTS {
            let head = self.room_head(&cmd.room).await?;
            if !self.membership(&cmd.room, &cmd.sender).await?.member {
                return Err(not_member().into());
            }
            let seq = room_last_seq(&head) + 1;
            let event = RoomMessageSent {
                message_id: message_id.clone(),
                room_id: cmd.room.clone(),
                sender_id: cmd.sender.clone(),
                client_msg_id: cmd.client_msg_id.clone(),
                message: cmd.message.clone(),
                attachment: cmd.attachment.clone(),
                seq,
            };
            let env = Envelope::new(command_id.clone(), subject.clone(), head.envelope.position + 1, Event::RoomMessageSent(event));
            let env = match self.log.append(&env, head.log_seq).await {
                Ok(a) if !a.duplicate => {
                    self.metrics.event_appended(env.event.type_name());
                    env
                }
                Ok(a) => self.log.get(a.log_seq).await?.envelope,
                Err(LogError::Conflict) => {
                    self.metrics.append_conflict();
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            self.apply_now(&env).await;
            let Event::RoomMessageSent(sent) = &env.event else { return Err(reused().into()) };
            let view = RoomMessageView::from_event(&env, sent);
            return if same(&view) { Ok(view) } else { Err(reused().into()) };
        }
        Err(super::Failure::Internal(format!("{subject}: gave up after repeated conflicts")).into())
    }
}

#[cfg(test)]
mod tests {
    use natter_events::Envelope;

    use super::*;

    fn logged(event: Event) -> Logged {
        Logged { log_seq: 9, envelope: Envelope::new("c".into(), "s".into(), 3, event) }
    }

    #[test]
    fn membership_follows_the_newest_member_event() {
        assert!(!membership_after(None).member);
        let joined = logged(Event::MemberJoined(MemberJoined { room_id: "r".into(), user_id: "u".into(), seen_up_to: 4 }));
        let m = membership_after(Some(&joined));
        assert!(m.member);
        assert_eq!((m.read_up_to, m.last), (4, Some((9, 3))));
        let read = logged(Event::RoomRead(RoomRead { room_id: "r".into(), user_id: "u".into(), up_to_seq: 7 }));
        assert_eq!(membership_after(Some(&read)).read_up_to, 7);
        let left = logged(Event::MemberLeft(MemberLeft { room_id: "r".into(), user_id: "u".into() }));
        assert!(!membership_after(Some(&left)).member);
    }

    #[test]
    fn refuses_bad_rooms() {
        let room = |name: &str, d: Option<&str>| CreateRoom { creator: "u".into(), name: name.into(), description: d.map(Into::into) };
        assert!(validate_room(&room("Algebra", None)).is_ok());
        assert!(validate_room(&room("  ", None)).is_err());
        assert!(validate_room(&room(&"x".repeat(101), None)).is_err());
        assert!(validate_room(&room("ok", Some(&"d".repeat(1001)))).is_err());
    }
}
