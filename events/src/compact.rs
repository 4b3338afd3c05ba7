//! The compact stored forms of direct-conversation events: `MessageSent`
//! v3 and `MessagesSeen` v2.
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
//! `MessagesSeen` v2 likewise keeps only `{"r": 0|1, "s": [...]}`: who read
//! (the subject's `lo` or `hi`) and the state after, whose reader side holds
//! `upToSeq` and `seenCount`; its command id is reader-relative too.
//!
//! An event that does not fit (a command id of another form) is written in
//! its previous version's full JSON, which every reader still understands.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{DmState, Event, MessageSent, MessagesSeen, Side};

/// The version of `kind` that is its compact form, if it has one.
pub(crate) fn version(kind: &str) -> Option<u32> {
    match kind {
        "MessageSent" => Some(3),
        "MessagesSeen" => Some(2),
        _ => None,
    }
}

/// The compact form of `event` in an envelope with this id, subject and
/// command id: the command id to store and the payload. `None` when it has
/// no compact form or does not fit it.
pub(crate) fn encode(event: &Event, id: &Uuid, subject: &str, command_id: &str) -> Option<(String, Value)> {
    match event {
        Event::MessageSent(e) => encode_sent(e, id, subject, command_id),
        Event::MessagesSeen(e) => encode_seen(e, subject, command_id),
        _ => None,
    }
}

/// The command id and the event a compact payload of `kind` stands for.
pub(crate) fn decode(kind: &str, data: Value, id: &Uuid, subject: &str, command_id: &str) -> Result<(String, Event), String> {
    match kind {
        "MessageSent" => decode_sent(data, id, subject, command_id).map(|(c, e)| (c, Event::MessageSent(e))),
        "MessagesSeen" => decode_seen(data, subject, command_id).map(|(c, e)| (c, Event::MessagesSeen(e))),
        other => Err(format!("{other} has no compact form")),
    }
}

#[derive(Serialize, Deserialize)]
struct CompactSeen {
    r: u8,
    s: [u64; 7],
}

fn state_numbers(state: &DmState) -> [u64; 7] {
    let (l, h) = (&state.lo, &state.hi);
    [state.last_seq, l.sent, l.seen_seq, l.seen_count, h.sent, h.seen_seq, h.seen_count]
}

fn state_from(lo: &str, hi: &str, s: [u64; 7]) -> DmState {
    let side = |user_id: &str, sent, seen_seq, seen_count| Side { user_id: user_id.to_owned(), sent, seen_seq, seen_count, ..Side::default() };
    let [last_seq, lo_sent, lo_seen, lo_count, hi_sent, hi_seen, hi_count] = s;
    DmState { last_seq, lo: side(lo, lo_sent, lo_seen, lo_count), hi: side(hi, hi_sent, hi_seen, hi_count) }
}

/// Which side `(a, b)` is of the subject's `(lo, hi)`: 0 when `a` is `lo`.
fn side_flag(lo: &str, hi: &str, a: &str, b: &str) -> Option<u8> {
    match (a, b) {
        (a, b) if a == lo && b == hi => Some(0),
        (a, b) if a == hi && b == lo => Some(1),
        _ => None,
    }
}

fn encode_seen(e: &MessagesSeen, subject: &str, command_id: &str) -> Option<(String, Value)> {
    let (lo, hi) = participants(subject)?;
    let state = &e.state;
    if state.lo.user_id != lo || state.hi.user_id != hi || !state.plain() {
        return None;
    }
    let r = side_flag(lo, hi, &e.reader_id, &e.peer_id)?;
    let reader = if r == 0 { &state.lo } else { &state.hi };
    if (reader.seen_seq, reader.seen_count) != (e.up_to_seq, e.seen_count) {
        return None;
    }
    let rest = command_id.strip_prefix(e.reader_id.as_str())?.strip_prefix(':')?;
    let data = CompactSeen { r, s: state_numbers(state) };
    Some((format!(":{rest}"), serde_json::to_value(data).expect("compact payloads always serialize")))
}

/// What a compact payload's envelope says.
struct Parties<'a> {
    lo: &'a str,
    hi: &'a str,
    /// Who sent or read (the side the payload's flag names), and the other.
    actor: &'a str,
    other: &'a str,
    /// The command id after `<actor>:`.
    rest: &'a str,
}

fn parties<'a>(subject: &'a str, flag: u8, command_id: &'a str) -> Result<Parties<'a>, String> {
    let (lo, hi) = participants(subject).ok_or_else(|| format!("subject {subject:?} is not a direct conversation's"))?;
    let (actor, other) = match flag {
        0 => (lo, hi),
        1 => (hi, lo),
        other => return Err(format!("side flag is {other}, not 0 or 1")),
    };
    let rest = command_id.strip_prefix(':').ok_or_else(|| format!("command id {command_id:?} is not relative to its author"))?;
    Ok(Parties { lo, hi, actor, other, rest })
}

fn decode_seen(data: Value, subject: &str, command_id: &str) -> Result<(String, MessagesSeen), String> {
    let c: CompactSeen = serde_json::from_value(data).map_err(|e| e.to_string())?;
    let Parties { lo, hi, actor: reader, other: peer, rest } = parties(subject, c.r, command_id)?;
    let state = state_from(lo, hi, c.s);
    let side = if c.r == 0 { &state.lo } else { &state.hi };
    let event = MessagesSeen { reader_id: reader.to_owned(), peer_id: peer.to_owned(), up_to_seq: side.seen_seq, seen_count: side.seen_count, state };
    Ok((format!("{reader}:{rest}"), event))
}

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

fn encode_sent(e: &MessageSent, id: &Uuid, subject: &str, command_id: &str) -> Option<(String, Value)> {
    let (lo, hi) = participants(subject)?;
    let state = &e.state;
    // Seven numbers hold no block flags or deleted seqs: such a
    // conversation's events are written in the full form.
    if state.lo.user_id != lo || state.hi.user_id != hi || e.seq != state.last_seq || !state.plain() || e.reply_to.is_some() {
        return None;
    }
    let f = side_flag(lo, hi, &e.sender_id, &e.receiver_id)?;
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
    let data = Compact { f, m: e.message.clone(), a: e.attachments.clone(), k, i, s: state_numbers(state) };
    Some((format!(":{rest}"), serde_json::to_value(data).expect("compact payloads always serialize")))
}

fn decode_sent(data: Value, id: &Uuid, subject: &str, command_id: &str) -> Result<(String, MessageSent), String> {
    let c: Compact = serde_json::from_value(data).map_err(|e| e.to_string())?;
    let Parties { lo, hi, actor: sender, other: receiver, rest } = parties(subject, c.f, command_id)?;
    let state = state_from(lo, hi, c.s);
    let (last_seq, sender_count) = (state.last_seq, if c.f == 0 { state.lo.sent } else { state.hi.sent });
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
        reply_to: None,
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
            reply_to: None,
        }
    }

    #[test]
    fn round_trips_from_either_side_keyed_or_not() {
        let id = Uuid::now_v7();
        for (sender, receiver, client, command) in
            [("amy", "bob", None, "amy:0193"), ("bob", "amy", Some("c-1"), "bob:c-1"), ("amy", "bob", Some("x:y"), "amy:x:y")]
        {
            let e = sent(sender, receiver, client);
            let (stored, data) = encode_sent(&e, &id, "natter.ev.dm.amy.bob", command).expect("fits");
            assert!(stored.starts_with(':'), "{stored}");
            assert_eq!(decode_sent(data, &id, "natter.ev.dm.amy.bob", &stored).unwrap(), (command.to_owned(), e));
        }
    }

    #[test]
    fn what_does_not_fit_is_left_to_v2() {
        let id = Uuid::now_v7();
        let e = sent("amy", "bob", None);
        assert!(encode_sent(&e, &id, "natter.ev.dm.amy.bob", "register:amy").is_none(), "command id of another scope");
        assert!(encode_sent(&e, &id, "natter.ev.dm.amy.cat", "amy:1").is_none(), "participants not the subject's");
        assert!(encode_sent(&sent("amy", "bob", Some("c-2")), &id, "natter.ev.dm.amy.bob", "amy:c-1").is_none(), "key not the command's");
        assert!(encode_sent(&e, &id, "natter.ev.room.r1", "amy:1").is_none());
        let mut reply = sent("amy", "bob", None);
        reply.reply_to = Some(crate::ReplyRef { message_id: "m0".into(), preview: "hi".into() });
        assert!(encode_sent(&reply, &id, "natter.ev.dm.amy.bob", "amy:1").is_none(), "a reply");
        let mut blocked = sent("amy", "bob", None);
        blocked.state = blocked.state.after_block("bob", true).unwrap();
        assert!(encode_sent(&blocked, &id, "natter.ev.dm.amy.bob", "amy:1").is_none(), "a blocked conversation's state");
    }

    #[test]
    fn a_reply_and_a_blocked_state_round_trip_in_the_full_form() {
        let mut e = sent("amy", "bob", None);
        e.reply_to = Some(crate::ReplyRef { message_id: "m0".into(), preview: "are you coming?".into() });
        e.state = e.state.after_block("bob", true).unwrap();
        let env = crate::Envelope::new("amy:1".into(), "natter.ev.dm.amy.bob".into(), 2, crate::Event::MessageSent(e));
        let stored = env.encode();
        let v: Value = serde_json::from_slice(&stored).unwrap();
        assert_eq!(v["v"], 2, "the full form");
        assert_eq!(crate::Envelope::decode(&stored).unwrap(), env);
    }

    #[test]
    fn refuses_what_it_cannot_stand_for() {
        let id = Uuid::now_v7();
        let data = serde_json::json!({"f": 2, "s": [1, 1, 0, 0, 0, 0, 0]});
        assert!(decode_sent(data, &id, "natter.ev.dm.amy.bob", ":1").is_err());
        let data = serde_json::json!({"f": 0, "s": [1, 1, 0, 0, 0, 0, 0]});
        assert!(decode_sent(data.clone(), &id, "natter.ev.room.r", ":1").is_err());
        assert!(decode_sent(data, &id, "natter.ev.dm.amy.bob", "amy:1").is_err());
        assert!(decode_seen(serde_json::json!({"r": 1}), "natter.ev.dm.amy.bob", ":1").is_err());
    }

    #[test]
    fn a_read_mark_round_trips_from_either_side() {
        let (state, _, _) = DmState::new("amy", "bob").after_send("amy");
        for (reader, peer) in [("bob", "amy"), ("amy", "bob")] {
            let Some(next) = state.after_seen(reader, 1, 1).or_else(|| state.after_seen(reader, 1, 0)) else { panic!("moves") };
            let side = next.side(reader).unwrap().clone();
            let e = MessagesSeen { reader_id: reader.into(), peer_id: peer.into(), up_to_seq: side.seen_seq, seen_count: side.seen_count, state: next };
            let command = format!("{reader}:seen:0193");
            let (stored, data) = encode_seen(&e, "natter.ev.dm.amy.bob", &command).expect("fits");
            assert_eq!(stored, ":seen:0193");
            assert_eq!(decode_seen(data, "natter.ev.dm.amy.bob", &stored).unwrap(), (command, e.clone()));
            let mut odd = e.clone();
            odd.up_to_seq += 1;
            assert!(encode_seen(&odd, "natter.ev.dm.amy.bob", &format!("{reader}:x")).is_none(), "a mark its state does not hold");
        }
    }
}
