//! Golden fixtures: one stored JSON per event type and schema version. They
//! must keep decoding, to the values written here, for as long as the log
//! may hold them.

use natter_events::{Envelope, Event};

fn fixture(name: &str) -> Envelope {
    let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    Envelope::decode(&bytes).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn user_registered_v1() {
    let env = fixture("v1/UserRegistered.json");
    let Event::UserRegistered(e) = env.event else { panic!("wrong type") };
    assert_eq!(e.email, "amy@example.com");
    assert_eq!(e.name, "Amy");
    assert!(e.password_hash.starts_with("$argon2id$"));
    assert_eq!(env.position, 1);
}

#[test]
fn message_sent_v1() {
    let env = fixture("v1/MessageSent.json");
    assert_eq!(env.command_id, "amy:c-1");
    let Event::MessageSent(e) = env.event else { panic!("wrong type") };
    assert_eq!((e.seq, e.sender_count), (1, 1));
    assert_eq!(e.message.as_deref(), Some("hello"));
    // v1's single attachment, upcast to v2's list
    assert_eq!(e.attachments, vec!["https://example.com/cat.png".to_owned()]);
    assert_eq!(e.client_msg_id.as_deref(), Some("c-1"));
    assert_eq!(e.state.unseen("bob", "amy"), 1);
}

#[test]
fn message_sent_v2() {
    let env = fixture("v2/MessageSent.json");
    let Event::MessageSent(e) = env.event else { panic!("wrong type") };
    assert_eq!(e.attachments, vec!["https://example.com/cat.png".to_owned(), "https://example.com/dog.png".to_owned()]);
    assert_eq!(e.message.as_deref(), Some("hello"));
}

#[test]
fn message_sent_v3() {
    let env = fixture("v3/MessageSent.json");
    let (amy, bob) = ("0193a2b4-0000-7000-8000-00000000a001", "0193a2b4-0000-7000-8000-00000000b002");
    assert_eq!(env.command_id, format!("{bob}:c-7"), "the sender-relative command id");
    let Event::MessageSent(e) = env.event else { panic!("wrong type") };
    assert_eq!(e.message_id, env.id.to_string(), "the message id is the envelope's");
    assert_eq!((e.sender_id.as_str(), e.receiver_id.as_str()), (bob, amy));
    assert_eq!((e.message.as_deref(), e.client_msg_id.as_deref()), (Some("hi"), Some("c-7")));
    assert!(e.attachments.is_empty());
    assert_eq!((e.seq, e.sender_count), (3, 1));
    assert_eq!(e.state.unseen(amy, bob), 1, "amy has not seen bob's message");
    assert_eq!(e.state.unseen(bob, amy), 0, "bob has seen amy's two");
}

/// A short direct message between two UUID accounts, sent the way the
/// command side sends it, stores in at most 350 bytes.
#[test]
fn a_short_direct_message_stores_in_350_bytes_or_fewer() {
    let (amy, bob) = (uuid::Uuid::now_v7().to_string(), uuid::Uuid::now_v7().to_string());
    let (lo, hi) = natter_events::subjects::dm_pair(&amy, &bob);
    let mut state = natter_events::DmState::new(&amy, &bob);
    for (n, sender) in [&amy, &bob, &amy, &amy].into_iter().enumerate() {
        let receiver = if sender == &amy { &bob } else { &amy };
        let (next, seq, count) = state.after_send(sender);
        let message_id = uuid::Uuid::now_v7().to_string();
        let e = natter_events::MessageSent {
            message_id,
            client_msg_id: None,
            sender_id: sender.clone(),
            receiver_id: receiver.clone(),
            message: Some("hi".into()),
            attachments: vec![],
            seq,
            sender_count: count,
            state: next.clone(),
            reply_to: None,
        };
        state = next;
        let command_id = format!("{sender}:{}", uuid::Uuid::now_v7());
        let env = Envelope::new(command_id, natter_events::subjects::dm("natter", lo, hi), n as u64 + 1, Event::MessageSent(e));
        let bytes = env.encode();
        println!("{} bytes", bytes.len());
        assert!(bytes.len() <= 350, "{} bytes: {}", bytes.len(), String::from_utf8_lossy(&bytes));
        assert_eq!(Envelope::decode(&bytes).unwrap(), env);
    }
}

#[test]
fn messages_seen_v2() {
    let env = fixture("v2/MessagesSeen.json");
    let (amy, bob) = ("0193a2b4-0000-7000-8000-00000000a001", "0193a2b4-0000-7000-8000-00000000b002");
    assert_eq!(env.command_id, format!("{amy}:seen:0193a2b4-0000-7000-8000-000000000033"), "the reader-relative command id");
    let Event::MessagesSeen(e) = env.event else { panic!("wrong type") };
    assert_eq!((e.reader_id.as_str(), e.peer_id.as_str()), (amy, bob));
    assert_eq!((e.up_to_seq, e.seen_count), (3, 1), "from the reader's side of the state");
    assert_eq!(e.state.unseen(amy, bob), 0);
    assert_eq!(e.state.unseen(bob, amy), 0);
}

#[test]
fn messages_seen_v1() {
    let env = fixture("v1/MessagesSeen.json");
    let Event::MessagesSeen(e) = env.event else { panic!("wrong type") };
    assert_eq!((e.reader_id.as_str(), e.up_to_seq, e.seen_count), ("bob", 1, 1));
    assert_eq!(e.state.unseen("bob", "amy"), 0);
}

#[test]
fn block_changed_v1() {
    let env = fixture("v1/BlockChanged.json");
    let Event::BlockChanged(e) = env.event else { panic!("wrong type") };
    assert_eq!((e.user_id.as_str(), e.other_id.as_str(), e.blocked), ("bob", "amy", true));
    assert!(e.state.side("bob").unwrap().blocked && !e.state.side("amy").unwrap().blocked);
    assert_eq!(e.state.unseen("bob", "amy"), 0, "the counts are the conversation's, unchanged by a block");
}

#[test]
fn message_edited_v1() {
    let env = fixture("v1/MessageEdited.json");
    let Event::MessageEdited(e) = env.event else { panic!("wrong type") };
    assert_eq!((e.message.seq, e.message.message.as_deref()), (2, Some("see you at 6, not 5")));
    assert_eq!((e.sent_command_id.as_str(), e.sent_at.to_rfc3339()), ("amy:c-2", "2026-11-28T08:59:00+00:00".to_owned()));
    assert_eq!(e.message.state.unseen("bob", "amy"), 2, "an edit changes no count");
}

#[test]
fn message_deleted_v1() {
    let env = fixture("v1/MessageDeleted.json");
    let Event::MessageDeleted(e) = env.event else { panic!("wrong type") };
    assert_eq!((e.message.seq, e.message.message.as_deref()), (3, None));
    assert!(e.message.attachments.is_empty());
    assert_eq!(e.message.state.side("bob").unwrap().unseen_deleted, vec![3]);
    assert_eq!(e.message.state.unseen("bob", "amy"), 1, "bob's unseen: amy's message 2 (3 is deleted)");
}

#[test]
fn private_room_events_v1() {
    let env = fixture("v1/MemberInvited.json");
    let state = natter_events::MemberState::after(Some(&env.event));
    assert!(state.invited && !state.member);
    let Event::MemberInvited(e) = env.event else { panic!("wrong type") };
    assert_eq!((e.user_id.as_str(), e.by.as_str()), ("carol", "amy"));
    let env = fixture("v1/RoleChanged.json");
    let state = natter_events::MemberState::after(Some(&env.event));
    assert_eq!((state.member, state.role, state.read_up_to), (true, natter_events::Role::Admin, 5));
}

#[test]
fn reaction_changed_v1() {
    let env = fixture("v1/ReactionChanged.json");
    let Event::ReactionChanged(e) = env.event else { panic!("wrong type") };
    assert_eq!((e.user_id.as_str(), e.emoji.as_str(), e.on, e.last_seq), ("bob", "👍", true, None));
    assert_eq!(e.state.expect("a direct conversation's state").unseen("bob", "amy"), 1);
}

#[test]
fn room_events_v1() {
    let Event::RoomCreated(e) = fixture("v1/RoomCreated.json").event else { panic!("wrong type") };
    assert_eq!((e.name.as_str(), e.created_by.as_str()), ("Algebra study group", "amy"));
    assert_eq!(e.description.as_deref(), Some("Chapter 4 tonight"));
    assert!(!e.private, "rooms written before private rooms are public");
    let Event::MemberJoined(e) = fixture("v1/MemberJoined.json").event else { panic!("wrong type") };
    assert_eq!((e.user_id.as_str(), e.seen_up_to, e.role), ("bob", 3, natter_events::Role::Member));
    let Event::MemberLeft(e) = fixture("v1/MemberLeft.json").event else { panic!("wrong type") };
    assert_eq!(e.user_id, "bob");
    let Event::RoomRead(e) = fixture("v1/RoomRead.json").event else { panic!("wrong type") };
    assert_eq!(e.up_to_seq, 5);
    let Event::RoomMessageSent(e) = fixture("v1/RoomMessageSent.json").event else { panic!("wrong type") };
    assert_eq!((e.seq, e.message.as_deref(), e.attachment.as_deref()), (5, Some("page 42?"), None));
    let Event::RoomMessageEdited(e) = fixture("v1/RoomMessageEdited.json").event else { panic!("wrong type") };
    assert_eq!((e.message.seq, e.message.message.as_deref(), e.last_seq), (5, Some("page 43?"), 6));
    assert_eq!(e.sent_command_id, "amy:room:c-9");
    let Event::RoomMessageDeleted(e) = fixture("v1/RoomMessageDeleted.json").event else { panic!("wrong type") };
    assert_eq!((e.message.seq, e.message.message.as_deref(), e.last_seq), (5, None, 6));
}

fn fixtures() -> Vec<String> {
    let mut out = Vec::new();
    for version in ["v1", "v2", "v3"] {
        let dir = format!("{}/fixtures/{version}", env!("CARGO_MANIFEST_DIR"));
        for f in std::fs::read_dir(&dir).unwrap() {
            out.push(format!("{version}/{}", f.unwrap().file_name().to_string_lossy()));
        }
    }
    out.sort();
    out
}

fn stored(name: &str) -> serde_json::Value {
    let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn there_is_a_fixture_for_every_event_type_and_version() {
    let mut have: Vec<(String, u64)> =
        fixtures().iter().map(|f| (stored(f)["type"].as_str().unwrap().to_owned(), stored(f)["v"].as_u64().unwrap())).collect();
    have.sort();
    let mut want = Vec::new();
    for kind in ["BlockChanged", "MemberInvited", "MemberJoined", "MemberLeft", "MessageDeleted", "MessageEdited", "MessageSent", "MessagesSeen", "ReactionChanged", "RoleChanged", "RoomCreated", "RoomMessageDeleted", "RoomMessageEdited", "RoomMessageSent", "RoomRead", "UserRegistered"] {
        for v in 1..=natter_events::current_version(kind) {
            want.push((kind.to_owned(), u64::from(v)));
        }
    }
    want.sort();
    assert_eq!(have, want);
}

#[test]
fn current_fixtures_re_encode_to_the_same_json_and_old_ones_to_the_current_version() {
    for name in fixtures() {
        let raw = stored(&name);
        let again: serde_json::Value = serde_json::from_slice(&fixture(&name).encode()).unwrap();
        let current = natter_events::current_version(raw["type"].as_str().unwrap());
        if raw["v"] == u64::from(current) {
            assert_eq!(raw, again, "{name}");
        } else {
            // Written back at the current version, or at the full one when
            // it does not fit the compact form (an old command id), and
            // reading back the same event either way.
            let (v, current) = (again["v"].as_u64().unwrap(), u64::from(current));
            let full = current - 1; // the version before a compact form
            assert!(v == current || (v == full && v >= raw["v"].as_u64().unwrap()), "{name} is written back at v{v}");
            let reread = natter_events::Envelope::decode(&serde_json::to_vec(&again).unwrap()).unwrap();
            assert_eq!(reread, fixture(&name), "{name} reads back the same");
        }
    }
}
