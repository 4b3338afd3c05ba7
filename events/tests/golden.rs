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
    assert_eq!(e.attachment.as_deref(), Some("https://example.com/cat.png"));
    assert_eq!(e.client_msg_id.as_deref(), Some("c-1"));
    assert_eq!(e.state.unseen("bob", "amy"), 1);
}

#[test]
fn messages_seen_v1() {
    let env = fixture("v1/MessagesSeen.json");
    let Event::MessagesSeen(e) = env.event else { panic!("wrong type") };
    assert_eq!((e.reader_id.as_str(), e.up_to_seq, e.seen_count), ("bob", 1, 1));
    assert_eq!(e.state.unseen("bob", "amy"), 0);
}

#[test]
fn room_events_v1() {
    let Event::RoomCreated(e) = fixture("v1/RoomCreated.json").event else { panic!("wrong type") };
    assert_eq!((e.name.as_str(), e.created_by.as_str()), ("Algebra study group", "amy"));
    assert_eq!(e.description.as_deref(), Some("Chapter 4 tonight"));
    let Event::MemberJoined(e) = fixture("v1/MemberJoined.json").event else { panic!("wrong type") };
    assert_eq!((e.user_id.as_str(), e.seen_up_to), ("bob", 3));
    let Event::MemberLeft(e) = fixture("v1/MemberLeft.json").event else { panic!("wrong type") };
    assert_eq!(e.user_id, "bob");
    let Event::RoomRead(e) = fixture("v1/RoomRead.json").event else { panic!("wrong type") };
    assert_eq!(e.up_to_seq, 5);
    let Event::RoomMessageSent(e) = fixture("v1/RoomMessageSent.json").event else { panic!("wrong type") };
    assert_eq!((e.seq, e.message.as_deref(), e.attachment.as_deref()), (5, Some("page 42?"), None));
}

#[test]
fn there_is_a_fixture_for_every_event_type() {
    let dir = format!("{}/fixtures/v1", env!("CARGO_MANIFEST_DIR"));
    let mut kinds: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|f| fixture(&format!("v1/{}", f.unwrap().file_name().to_string_lossy())).event.type_name().to_owned())
        .collect();
    kinds.sort();
    let mut want = vec![
        "MemberJoined", "MemberLeft", "MessageSent", "MessagesSeen", "RoomCreated", "RoomMessageSent", "RoomRead", "UserRegistered",
    ];
    want.sort();
    assert_eq!(kinds, want);
}

#[test]
fn every_fixture_re_encodes_to_the_same_json() {
    let dir = format!("{}/fixtures/v1", env!("CARGO_MANIFEST_DIR"));
    for file in std::fs::read_dir(&dir).unwrap() {
        let name = format!("v1/{}", file.unwrap().file_name().to_string_lossy());
        let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let again: serde_json::Value = serde_json::from_slice(&fixture(&name).encode()).unwrap();
        assert_eq!(raw, again, "{name}");
    }
}
