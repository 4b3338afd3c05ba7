//! `MessageSent` v3: the compact stored form of a direct message.
//!
//! A direct message's event used to repeat what its envelope already says
//! (v2 stored about 900 bytes for "hi" between two UUID accounts): the two
//! participants are the last two tokens of the subject
//! (`<prefix>.ev.dm.<lo>.<hi>`), the message id is the envelope's id, the
//! command id starts with the sender, and `seq` and `senderCount` are in
//! the conversation state. v3 stores only the rest:
//!
//! ```json
//! "commandId": ":c-1",
//! "data": {"f": 1, "m": "hi", "k": true, "s": [3, 2, 1, 1, 1, 2, 1]}
//! ```
//!
//! - `commandId` `":<rest>"` stands for `"<sender>:<rest>"`;
//! - `f`: who sent it, 0 for the subject's `lo`, 1 for its `hi`;
//! - `m`: the text, `a`: the attachment URLs (each left out when empty);
//! - `k`: the client sent `<rest>` as its `clientMsgId`;
//! - `i`: the message id, only when it is not the envelope's id;
//! - `s`: the state after the message, `[lastSeq, lo.sent, lo.seenSeq,
//!   lo.seenCount, hi.sent, hi.seenSeq, hi.seenCount]`.
//!
//! An event that does not fit this shape (a command id of another form)
//! is written as v2, which every reader still understands.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{DmState, MessageSent, Side};

pub(crate) const VERSION: u32 = 3;

#[derive(Serialize, Deserialize)]
struct Compact {
    f: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    a: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    k: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    i: Option<String>,
    s: [u64; 7],
}

/// The two participants a direct-message subject names, `(lo, hi)`.
fn participants(subject: &str) -> Option<(&str, &str)> {
    let mut tokens = subject.rsplit('.');
    let (hi, lo) = (tokens.next()?, tokens.next()?);
    (tokens.next()? == "dm").then_some((lo, hi))
}

/// The compact form of `e` in an envelope with this id, subject and command
/// id: the command id to store and the payload. `None` when it does not fit
/// (write v2 then).
pub(crate) fn encode(e: &MessageSent, id: &Uuid, subject: &str, command_id: &str) -> Option<(String, Value)> {
    let (lo, hi) = participants(subject)?;
    let state = &e.state;
    if state.lo.user_id != lo || state.hi.user_id != hi || e.seq != state.last_seq {
        return None;
    }
    let f = match (e.sender_id.as_str(), e.receiver_id.as_str()) {
        (s, r) if s == lo && r == hi => 0,
        (s, r) if s == hi && r == lo => 1,
        _ => return None,
    };
    let sender = if f == 0 { &state.lo } else { &state.hi };
    if e.sender_count != sender.sent {
        return None;
    }
    let rest = command_id.strip_prefix(e.sender_id.as_str())?.strip_prefix(':')?;
    let k = match &e.client_msg_id {
        None => false,
        Some(c) if c == rest => true,
        Some(_) => return None,
    };
    let i = (e.message_id != id.to_string()).then(|| e.message_id.clone());
    let (l, h) = (&state.lo, &state.hi);
    let s = [state.last_seq, l.sent, l.seen_seq, l.seen_count, h.sent, h.seen_seq, h.seen_count];
    let data = Compact { f, m: e.message.clone(), a: e.attachments.clone(), k, i, s };
    Some((format!(":{rest}"), serde_json::to_value(data).expect("compact payloads always serialize")))
}

/// The command id and the event a compact payload stands for, in an
/// envelope with this id, subject and stored command id.
pub(crate) fn decode(data: Value, id: &Uuid, subject: &str, command_id: &str) -> Result<(String, MessageSent), String> {
    let c: Compact = serde_json::from_value(data).map_err(|e| e.to_string())?;
    let (lo, hi) = participants(subject).ok_or_else(|| format!("subject {subject:?} is not a direct conversation's"))?;
    let (sender, receiver) = match c.f {
        0 => (lo, hi),
        1 => (hi, lo),
        other => return Err(format!("sender flag f is {other}, not 0 or 1")),
    };
    let rest = command_id.strip_prefix(':').ok_or_else(|| format!("command id {command_id:?} is not sender-relative"))?;
    let side = |user_id: &str, sent, seen_seq, seen_count| Side { user_id: user_id.to_owned(), sent, seen_seq, seen_count };
    let [last_seq, lo_sent, lo_seen, lo_count, hi_sent, hi_seen, hi_count] = c.s;
    let state = DmState { last_seq, lo: side(lo, lo_sent, lo_seen, lo_count), hi: side(hi, hi_sent, hi_seen, hi_count) };
    let sender_count = if c.f == 0 { lo_sent } else { hi_sent };
    let event = MessageSent {
        message_id: c.i.unwrap_or_else(|| id.to_string()),
        client_msg_id: c.k.then(|| rest.to_owned()),
        sender_id: sender.to_owned(),
        receiver_id: receiver.to_owned(),
        message: c.m,
        attachments: c.a,
        seq: last_seq,
        sender_count,
        state,
    };
    Ok((format!("{sender}:{rest}"), event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(sender: &str, receiver: &str, client: Option<&str>) -> MessageSent {
        let (state, seq, count) = DmState::new(sender, receiver).after_send(sender);
        MessageSent {
            message_id: "m1".into(),
            client_msg_id: client.map(Into::into),
            sender_id: sender.into(),
            receiver_id: receiver.into(),
            message: Some("hi".into()),
            attachments: vec![],
            seq,
            sender_count: count,
            state,
        }
    }

    #[test]
    fn round_trips_from_either_side_keyed_or_not() {
        let id = Uuid::now_v7();
        for (sender, receiver, client, command) in
            [("amy", "bob", None, "amy:0193"), ("bob", "amy", Some("c-1"), "bob:c-1"), ("amy", "bob", Some("x:y"), "amy:x:y")]
        {
            let e = sent(sender, receiver, client);
            let (stored, data) = encode(&e, &id, "natter.ev.dm.amy.bob", command).expect("fits");
            assert!(stored.starts_with(':'), "{stored}");
            assert_eq!(decode(data, &id, "natter.ev.dm.amy.bob", &stored).unwrap(), (command.to_owned(), e));
        }
    }

    #[test]
    fn what_does_not_fit_is_left_to_v2() {
        let id = Uuid::now_v7();
        let e = sent("amy", "bob", None);
        assert!(encode(&e, &id, "natter.ev.dm.amy.bob", "register:amy").is_none(), "command id of another scope");
        assert!(encode(&e, &id, "natter.ev.dm.amy.cat", "amy:1").is_none(), "participants not the subject's");
        assert!(encode(&sent("amy", "bob", Some("c-2")), &id, "natter.ev.dm.amy.bob", "amy:c-1").is_none(), "key not the command's");
        assert!(encode(&e, &id, "natter.ev.room.r1", "amy:1").is_none());
    }

    #[test]
    fn refuses_what_it_cannot_stand_for() {
        let id = Uuid::now_v7();
        let data = serde_json::json!({"f": 2, "s": [1, 1, 0, 0, 0, 0, 0]});
        assert!(decode(data, &id, "natter.ev.dm.amy.bob", ":1").is_err());
        let data = serde_json::json!({"f": 0, "s": [1, 1, 0, 0, 0, 0, 0]});
        assert!(decode(data.clone(), &id, "natter.ev.room.r", ":1").is_err());
        assert!(decode(data, &id, "natter.ev.dm.amy.bob", "amy:1").is_err());
    }
}
