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
fn every_fixture_re_encodes_to_the_same_json() {
    for name in ["v1/UserRegistered.json", "v1/MessageSent.json", "v1/MessagesSeen.json"] {
        let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let again: serde_json::Value = serde_json::from_slice(&fixture(name).encode()).unwrap();
        assert_eq!(raw, again, "{name}");
    }
}
