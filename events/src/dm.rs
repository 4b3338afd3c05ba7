//! Direct-message events and the conversation state they carry.
//!
//! Every direct-message event carries the conversation's [`DmState`] *after*
//! the event. That makes the command side O(1) (read the last event of the
//! conversation's subject, decide, append with optimistic concurrency) and
//! the unseen-count projection pure arithmetic:
//!
//! ```text
//! unseen(reader, from peer) = peer.sent - reader.seen_count
//! ```
//!
//! where `sent` is the number of messages a side has sent in the
//! conversation and `seen_count` the number of the *other* side's messages at
//! or below the side's read watermark.

use serde::{Deserialize, Serialize};

/// One participant's running figures in a direct conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Side {
    pub user_id: String,
    /// Messages this participant has sent in the conversation.
    pub sent: u64,
    /// Read watermark: every message with `seq <= seen_seq` is seen by them.
    pub seen_seq: u64,
    /// How many of the *other* participant's messages are at or below
    /// `seen_seq`.
    pub seen_count: u64,
    /// This participant has blocked the other: no direct messages either
    /// way until they unblock (absent in events written before blocking
    /// existed, and while false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub blocked: bool,
    /// Seqs of the *other* participant's messages deleted while above this
    /// side's watermark: they no longer count as unseen. Ascending, at most
    /// [`MAX_UNSEEN_DELETED`] (absent while empty, as in every event
    /// written before deletion existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unseen_deleted: Vec<u64>,
}

/// Most of one participant's messages that may stand deleted above the
/// other's watermark: every event of the conversation carries their seqs
/// until they are read past, so the list is bounded. A delete beyond it
/// is refused until the receiver reads on.
pub const MAX_UNSEEN_DELETED: usize = 100;

/// State of a direct conversation after an event. `lo`/`hi` are the two
/// participants in sorted id order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DmState {
    /// Sequence of the newest message (0: no message yet).
    pub last_seq: u64,
    pub lo: Side,
    pub hi: Side,
}

impl DmState {
    /// The empty conversation between `a` and `b`.
    pub fn new(a: &str, b: &str) -> Self {
        let (lo, hi) = crate::subjects::dm_pair(a, b);
        let side = |u: &str| Side { user_id: u.to_owned(), ..Side::default() };
        DmState { last_seq: 0, lo: side(lo), hi: side(hi) }
    }

    /// The side of `user`, if they take part in this conversation.
    pub fn side(&self, user: &str) -> Option<&Side> {
        if self.lo.user_id == user {
            Some(&self.lo)
        } else if self.hi.user_id == user {
            Some(&self.hi)
        } else {
            None
        }
    }

    fn sides_mut(&mut self, me: &str) -> (&mut Side, &mut Side) {
        if self.lo.user_id == me {
            (&mut self.lo, &mut self.hi)
        } else {
            (&mut self.hi, &mut self.lo)
        }
    }

    /// Messages from `peer` that `reader` has not seen (deleted ones do
    /// not count).
    pub fn unseen(&self, reader: &str, peer: &str) -> u64 {
        match (self.side(reader), self.side(peer)) {
            (Some(r), Some(p)) => p.sent.saturating_sub(r.seen_count).saturating_sub(r.unseen_deleted.len() as u64),
            _ => 0,
        }
    }

    /// Whether the state is only the seven running numbers (no block, no
    /// deleted unseen message): what the compact event forms can hold.
    pub fn plain(&self) -> bool {
        !self.any_block() && self.lo.unseen_deleted.is_empty() && self.hi.unseen_deleted.is_empty()
    }

    /// State after `sender` deletes their message `seq`: if its receiver
    /// had not read it, it stops counting as unseen. `Err(())` when that
    /// would hold more than [`MAX_UNSEEN_DELETED`] of them.
    pub fn after_delete(&self, sender: &str, seq: u64) -> Result<DmState, ()> {
        let mut next = self.clone();
        let (_, receiver) = next.sides_mut(sender);
        if seq > receiver.seen_seq && !receiver.unseen_deleted.contains(&seq) {
            if receiver.unseen_deleted.len() >= MAX_UNSEEN_DELETED {
                return Err(());
            }
            receiver.unseen_deleted.push(seq);
            receiver.unseen_deleted.sort_unstable();
        }
        Ok(next)
    }

    /// State after `sender` sends one more message. Returns the new message's
    /// sequence and the sender's running count including it.
    pub fn after_send(&self, sender: &str) -> (DmState, u64, u64) {
        let mut next = self.clone();
        next.last_seq += 1;
        let seq = next.last_seq;
        let (me, _) = next.sides_mut(sender);
        me.sent += 1;
        let count = me.sent;
        (next, seq, count)
    }

    /// Whether either participant has blocked the other.
    pub fn any_block(&self) -> bool {
        self.lo.blocked || self.hi.blocked
    }

    /// State after `user` blocks (`on`) or unblocks the other participant;
    /// `None` when that changes nothing.
    pub fn after_block(&self, user: &str, on: bool) -> Option<DmState> {
        let mut next = self.clone();
        let (me, _) = next.sides_mut(user);
        if me.blocked == on {
            return None;
        }
        me.blocked = on;
        Some(next)
    }

    /// State after `reader` has seen everything up to `up_to_seq`, where
    /// `peer_count` of the peer's messages are at or below it. Watermarks
    /// only move forward: returns `None` when this would not move it.
    pub fn after_seen(&self, reader: &str, up_to_seq: u64, peer_count: u64) -> Option<DmState> {
        let mut next = self.clone();
        let (me, _) = next.sides_mut(reader);
        if up_to_seq <= me.seen_seq || peer_count < me.seen_count {
            return None;
        }
        me.seen_seq = up_to_seq;
        me.seen_count = peer_count;
        // Deleted messages now read past count among `seen_count` again.
        me.unseen_deleted.retain(|s| *s > up_to_seq);
        Some(next)
    }
}

/// A direct message was sent (text, attachment URLs, or both).
///
/// Schema history: v1 had one optional `attachment` URL; v2 has a list,
/// `attachments` (v1 events are upcast on read, see
/// [`crate::envelope::upcast`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageSent {
    /// UUIDv7, exposed to clients as `_id`.
    pub message_id: String,
    /// The client's idempotency key, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    pub sender_id: String,
    pub receiver_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Attachment URLs, in order (v2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<String>,
    /// Gapless per-conversation sequence, 1, 2, 3, ...
    pub seq: u64,
    /// The sender's running message count in this conversation, this one
    /// included.
    pub sender_count: u64,
    pub state: DmState,
    /// The earlier message of the same conversation this one answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyRef>,
}

/// A reply's reference to the message it answers (direct or room, always
/// of the same conversation). Events written now carry the id and an
/// empty preview: a preview is read from the answered message when shown, so its text is
/// stored nowhere but in its own events (and is gone from every view and
/// delivery once it is deleted). Older events carry a `preview`, which
/// readers ignore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplyRef {
    pub message_id: String,
    /// Empty in events written now (kept as a field so that builds which
    /// require it still read them).
    #[serde(default)]
    pub preview: String,
}

impl ReplyRef {
    /// A reference to `message_id`, without a preview.
    pub fn to(message_id: impl Into<String>) -> ReplyRef {
        ReplyRef { message_id: message_id.into(), preview: String::new() }
    }
}

/// A direct message as it reads after its sender changed it: edited
/// (`MessageEdited`: the new text) or deleted for everyone
/// (`MessageDeleted`: no text, attachment or reply, a tombstone that keeps
/// its `seq`). It carries the whole message, with the time and command id
/// of its send, so the views and the pushes need nothing else and the
/// views converge whatever order the send and its changes are applied in
/// (the newest change wins; a deletion is final). `message.state` is the
/// conversation's state after the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageRevised {
    #[serde(flatten)]
    pub message: MessageSent,
    /// When the message was sent (its `createdAt`).
    pub sent_at: chrono::DateTime<chrono::Utc>,
    /// The command id of the send (the views' unique key of the message).
    pub sent_command_id: String,
}

/// A direct message's sender changed its text.
pub type MessageEdited = MessageRevised;
/// A direct message's sender deleted it for everyone.
pub type MessageDeleted = MessageRevised;

/// A user set (`on: true`) or took back a reaction `emoji` on a message,
/// direct or in a room. Appended on the message's own conversation subject
/// (so it is fanned out in order with it), it carries what that subject's
/// newest event must say: a direct conversation's `state` (unchanged) or a
/// room's newest message seq (`lastSeq`). The views keep one mark per
/// (message, user, emoji), the newest change winning, so counts are exact
/// whatever the order or duplication of these events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReactionChanged {
    pub message_id: String,
    pub user_id: String,
    pub emoji: String,
    pub on: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<DmState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
}

/// A reader's watermark moved forward: every message with `seq <= up_to_seq`
/// is seen by them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessagesSeen {
    pub reader_id: String,
    pub peer_id: String,
    pub up_to_seq: u64,
    /// The peer's messages at or below `up_to_seq`.
    pub seen_count: u64,
    pub state: DmState,
}

/// A participant blocked (or, `blocked: false`, unblocked) the other:
/// direct messages between them are refused while either has. Kept on the
/// conversation's subject with its state, so a send's one read of the
/// conversation's newest event also says whether it is blocked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockChanged {
    pub user_id: String,
    pub other_id: String,
    pub blocked: bool,
    pub state: DmState,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_is_per_side_and_idempotent() {
        let s = DmState::new("amy", "bob");
        let s = s.after_block("bob", true).unwrap();
        assert!(s.any_block() && s.side("bob").unwrap().blocked && !s.side("amy").unwrap().blocked);
        assert!(s.after_block("bob", true).is_none());
        let s = s.after_block("bob", false).unwrap();
        assert!(!s.any_block());
        assert!(s.after_block("amy", false).is_none());
    }

    #[test]
    fn a_deleted_unseen_message_stops_counting_until_read_past() {
        let s = DmState::new("amy", "bob");
        let (s, _, _) = s.after_send("amy");
        let (s, seq2, c2) = s.after_send("amy");
        let (s, _, _) = s.after_send("amy");
        assert_eq!(s.unseen("bob", "amy"), 3);
        let s = s.after_delete("amy", seq2).unwrap();
        assert_eq!(s.unseen("bob", "amy"), 2);
        assert_eq!(s.after_delete("amy", seq2).unwrap(), s, "deleting twice changes nothing");
        assert!(!s.plain());
        // bob reads up to the deleted one: it is below his watermark now
        let s = s.after_seen("bob", seq2, c2).unwrap();
        assert_eq!(s.unseen("bob", "amy"), 1);
        assert!(s.plain());
        // a message already read does not change the count when deleted
        let s = s.after_delete("amy", 1).unwrap();
        assert_eq!(s.unseen("bob", "amy"), 1);
    }

    #[test]
    fn deleted_unseen_messages_are_bounded() {
        let mut s = DmState::new("amy", "bob");
        for _ in 0..=MAX_UNSEEN_DELETED {
            s = s.after_send("amy").0;
        }
        for seq in 1..=MAX_UNSEEN_DELETED as u64 {
            s = s.after_delete("amy", seq).unwrap();
        }
        assert_eq!(s.unseen("bob", "amy"), 1);
        assert!(s.after_delete("amy", MAX_UNSEEN_DELETED as u64 + 1).is_err());
    }

    #[test]
    fn counts_follow_sends_and_watermarks() {
        let s = DmState::new("bob", "amy");
        assert_eq!(s.lo.user_id, "amy");
        let (s, seq1, c1) = s.after_send("amy");
        let (s, seq2, _) = s.after_send("bob");
        let (s, seq3, c3) = s.after_send("amy");
        assert_eq!((seq1, seq2, seq3, c1, c3), (1, 2, 3, 1, 2));
        assert_eq!(s.unseen("bob", "amy"), 2);
        assert_eq!(s.unseen("amy", "bob"), 1);
        // bob sees up to message 1 (one of amy's messages)
        let s = s.after_seen("bob", seq1, c1).unwrap();
        assert_eq!(s.unseen("bob", "amy"), 1);
        // never backwards, never a no-op
        assert!(s.after_seen("bob", seq1, c1).is_none());
        let s = s.after_seen("bob", seq3, c3).unwrap();
        assert_eq!(s.unseen("bob", "amy"), 0);
        assert_eq!(s.unseen("carol", "amy"), 0);
    }
}
