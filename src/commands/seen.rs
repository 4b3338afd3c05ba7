//! Read watermarks: mark one message (and all before it) seen, or open a
//! conversation (mark everything seen).

use natter_events::{DmState, Event, MessagesSeen};

use super::{CommandError, Commands, Refusal};

/// The event that moves `reader`'s watermark to `up_to_seq`, where
/// `peer_count` of the peer's messages are at or below it; `None` when the
/// watermark would not move. Pure.
pub fn decide(state: &DmState, reader: &str, peer: &str, up_to_seq: u64, peer_count: u64) -> Option<MessagesSeen> {
    let next = state.after_seen(reader, up_to_seq, peer_count)?;
    Some(MessagesSeen {
        reader_id: reader.to_owned(),
        peer_id: peer.to_owned(),
        up_to_seq,
        seen_count: peer_count,
        state: next,
    })
}

/// Opening the conversation: everything the peer sent is seen. Nothing is
/// emitted when the reader has already seen all of the peer's messages.
pub fn decide_open(state: &DmState, reader: &str, peer: &str) -> Option<MessagesSeen> {
    let peer_sent = state.side(peer)?.sent;
    if peer_sent <= state.side(reader)?.seen_count {
        return None;
    }
    decide(state, reader, peer, state.last_seq, peer_sent)
}

fn seen_command_id(reader: &str) -> String {
    format!("{reader}:seen:{}", uuid::Uuid::now_v7())
}

impl Commands {
    /// `PATCH /messages/:id/seen`: only the receiver may mark a message.
    /// Returns the reader's watermark afterwards.
    #[tracing::instrument(skip_all, fields(reader = %reader, message = %message_id))]
    pub async fn mark_seen(&self, reader: &str, message_id: &str) -> Result<u64, CommandError> {
        let not_found = || Refusal::NotFound("Message not found".into());
        natter_events::validate_id(message_id).map_err(|_| not_found())?;
        let msg = self.views.message(message_id).await?.ok_or_else(not_found)?;
        if msg.receiver_id != reader {
            return Err(if msg.sender_id == reader {
                Refusal::Forbidden("only the receiver of a message can mark it seen".into()).into()
            } else {
                not_found().into()
            });
        }
        let peer = msg.sender_id.clone();
        let env = self
            .append_dm(reader, &peer, &seen_command_id(reader), |state| {
                Ok(decide(state, reader, &peer, msg.seq, msg.sender_count).map(Event::MessagesSeen))
            })
            .await?;
        Ok(match env.map(|e| e.event) {
            Some(Event::MessagesSeen(e)) => e.up_to_seq,
            _ => msg.seq,
        })
    }

    /// Opening a conversation marks all of the peer's messages seen.
    #[tracing::instrument(skip_all, fields(reader = %reader, peer = %peer))]
    pub async fn open_conversation(&self, reader: &str, peer: &str) -> Result<(), CommandError> {
        if reader == peer {
            return Err(Refusal::BadInput("there is no conversation with yourself".into()).into());
        }
        self.require_user(peer, "user").await?;
        self.append_dm(reader, peer, &seen_command_id(reader), |state| {
            Ok(decide_open(state, reader, peer).map(Event::MessagesSeen))
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three_from_amy_one_from_bob() -> DmState {
        let s = DmState::new("amy", "bob");
        let (s, _, _) = s.after_send("amy");
        let (s, _, _) = s.after_send("bob");
        let (s, _, _) = s.after_send("amy");
        let (s, _, _) = s.after_send("amy");
        s
    }

    #[test]
    fn given_unseen_messages_when_bob_opens_then_all_are_seen() {
        let s = three_from_amy_one_from_bob();
        let e = decide_open(&s, "bob", "amy").unwrap();
        assert_eq!((e.up_to_seq, e.seen_count), (4, 3));
        assert_eq!(e.state.unseen("bob", "amy"), 0);
        assert!(decide_open(&e.state, "bob", "amy").is_none(), "opening again emits nothing");
    }

    #[test]
    fn given_only_own_messages_unseen_when_amy_opens_then_nothing() {
        let s = three_from_amy_one_from_bob();
        let s = decide_open(&s, "amy", "bob").unwrap().state;
        let (s, _, _) = s.after_send("amy");
        assert!(decide_open(&s, "amy", "bob").is_none());
    }

    #[test]
    fn marking_a_middle_message_counts_what_is_below_it() {
        let s = three_from_amy_one_from_bob();
        // amy's second message is seq 3, her running count 2
        let e = decide(&s, "bob", "amy", 3, 2).unwrap();
        assert_eq!(e.state.unseen("bob", "amy"), 1);
        assert!(decide(&e.state, "bob", "amy", 1, 1).is_none(), "watermarks never move back");
    }
}
