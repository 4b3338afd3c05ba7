//! Study-room events.
//!
//! Subjects (see [`crate::subjects`]):
//! - `<prefix>.ev.room.<roomId>`: `RoomCreated` (position 1) then every
//!   `RoomMessageSent`, so room messages get a gapless sequence from one
//!   optimistic-concurrency append per message; edits and deletions of its
//!   messages (`RoomMessageEdited`, `RoomMessageDeleted`) go there too.
//! - `<prefix>.ev.member.<roomId>.<userId>`: one member's `MemberJoined`,
//!   `MemberLeft`, `RoomRead`, `MemberInvited` and `RoleChanged` events: the
//!   newest event on it says whether the user is a member (or invited), how
//!   far they have read and their role, in one read.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomCreated {
    pub room_id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_by: String,
    /// Not listed to non-members, joined only by invitation (absent: public,
    /// as every room created before private rooms existed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private: bool,
}

/// What a member may do in a room: the owner (its creator) names admins;
/// admins and the owner invite and remove members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Member,
    Admin,
    Owner,
}

impl Role {
    fn is_member(&self) -> bool {
        *self == Role::Member
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }
}

/// A user became a member. Everything up to `seen_up_to` counts as read
/// for them (joining does not flood the newcomer with unread history).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberJoined {
    pub room_id: String,
    pub user_id: String,
    pub seen_up_to: u64,
    /// Their role from now on (absent: `member`).
    #[serde(default, skip_serializing_if = "Role::is_member")]
    pub role: Role,
}

/// A member left, or (`by`) was removed by an owner or admin; also what
/// withdraws an invitation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberLeft {
    pub room_id: String,
    pub user_id: String,
    /// Who removed them (absent: they left).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Not a member removed but an invitation withdrawn (with `by`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withdrawn: bool,
}

/// A member's read watermark in a room moved forward to `up_to_seq`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomRead {
    pub room_id: String,
    pub user_id: String,
    pub up_to_seq: u64,
    /// Their role, unchanged (the member subject's newest event says it).
    #[serde(default, skip_serializing_if = "Role::is_member")]
    pub role: Role,
}

/// An owner or admin invited a user (not a member) to a room: they may
/// join it now, private or not, until they join or the invitation is
/// withdrawn (`MemberLeft` with `by`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberInvited {
    pub room_id: String,
    pub user_id: String,
    pub by: String,
}

/// The owner gave a member another role. Carries the member's read
/// watermark, so the member subject's newest event still says everything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoleChanged {
    pub room_id: String,
    pub user_id: String,
    pub role: Role,
    pub by: String,
    pub read_up_to: u64,
}

/// A message in a room. Sending also moves the sender's read watermark to
/// it (you have read a room up to what you say in it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomMessageSent {
    pub message_id: String,
    pub room_id: String,
    pub sender_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<String>,
    /// Gapless per-room sequence, 1, 2, 3, ...
    pub seq: u64,
    /// The earlier message of the same room this one answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<crate::ReplyRef>,
}

/// A room message as it reads after its sender changed it: edited
/// (`RoomMessageEdited`) or deleted for everyone (`RoomMessageDeleted`: a
/// tombstone without text, attachment or reply that keeps its `seq`).
/// Like [`crate::MessageRevised`] it carries the whole message with its
/// send's time and command id, so views converge in any order. Appended on
/// the room's subject, so it also says the room's newest seq (`lastSeq`),
/// which the next message's seq follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomMessageRevised {
    #[serde(flatten)]
    pub message: RoomMessageSent,
    pub sent_at: chrono::DateTime<chrono::Utc>,
    pub sent_command_id: String,
    /// The room's newest message seq when the change was made.
    pub last_seq: u64,
}

/// A room message's sender changed its text.
pub type RoomMessageEdited = RoomMessageRevised;
/// A room message's sender deleted it for everyone.
pub type RoomMessageDeleted = RoomMessageRevised;

/// Where a user stands in a room, as the newest event of their member
/// subject says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemberState {
    pub member: bool,
    /// Read watermark as of the member subject (joins and reads).
    pub read_up_to: u64,
    /// Their role while a member.
    pub role: Role,
    /// Invited and not (yet) a member.
    pub invited: bool,
    /// Removed by a moderator (not left, not invited since): joining again,
    /// even a public room, needs a new invitation.
    pub removed: bool,
}

impl MemberState {
    /// The state `newest`, the newest event of a member subject, leaves
    /// (`None`: the user never joined). Pure.
    pub fn after(newest: Option<&crate::Event>) -> MemberState {
        let member = |read_up_to, role| MemberState { member: true, read_up_to, role, ..MemberState::default() };
        match newest {
            Some(crate::Event::MemberJoined(e)) => member(e.seen_up_to, e.role),
            Some(crate::Event::RoomRead(e)) => member(e.up_to_seq, e.role),
            Some(crate::Event::RoleChanged(e)) => member(e.read_up_to, e.role),
            Some(crate::Event::MemberInvited(_)) => MemberState { invited: true, ..MemberState::default() },
            Some(crate::Event::MemberLeft(e)) => MemberState { removed: e.by.is_some() && !e.withdrawn, ..MemberState::default() },
            _ => MemberState::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Event;

    #[test]
    fn membership_follows_the_newest_member_event() {
        assert!(!MemberState::after(None).member);
        let joined = Event::MemberJoined(MemberJoined { room_id: "r".into(), user_id: "u".into(), seen_up_to: 4, ..Default::default() });
        assert_eq!(MemberState::after(Some(&joined)), MemberState { member: true, read_up_to: 4, ..Default::default() });
        let read = Event::RoomRead(RoomRead { room_id: "r".into(), user_id: "u".into(), up_to_seq: 7, ..Default::default() });
        assert_eq!(MemberState::after(Some(&read)).read_up_to, 7);
        let left = Event::MemberLeft(MemberLeft { room_id: "r".into(), user_id: "u".into(), ..Default::default() });
        assert!(!MemberState::after(Some(&left)).member);
    }
}
