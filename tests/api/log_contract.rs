//! One contract for the event-log port, run against every adapter: the
//! JetStream log and the embedded file log must behave the same.

use std::time::Duration;

use natter::config::SyncPolicy;
use natter::log::file::FileLog;
use natter::log::nats::NatsLog;
use natter::log::{EventLog, LogError};
use natter_events::{Envelope, Event, UserRegistered};

fn env(cmd: &str, subject: &str, position: u64) -> Envelope {
    Envelope::new(cmd.into(), subject.into(), position, Event::UserRegistered(UserRegistered {
        user_id: cmd.into(),
        name: "contract".into(),
        email: format!("{cmd}@example.com"),
        password_hash: "h".into(),
    }))
}

async fn contract(log: &dyn EventLog, prefix: &str) {
    let (a, b, c) = (format!("{prefix}.ev.user.a"), format!("{prefix}.ev.user.b"), format!("{prefix}.ev.user.c"));
    assert_eq!(log.head().await.unwrap(), 0);
    let e1 = env("cmd-1", &a, 1);
    let first = log.append(&e1, 0).await.unwrap();
    assert!(!first.duplicate);
    let e2 = env("cmd-2", &a, 2);
    assert!(matches!(log.append(&e2, 0).await, Err(LogError::Conflict)), "a stale expectation conflicts");
    let second = log.append(&e2, first.log_seq).await.unwrap();
    assert!(second.log_seq > first.log_seq);
    let e3 = env("cmd-3", &b, 1);
    let third = log.append(&e3, 0).await.unwrap();
    // The same command id again: the original, nothing new.
    let again = log.append(&env("cmd-1", &c, 1), 0).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.log_seq, first.log_seq);
    assert!(log.last(&c).await.unwrap().is_none(), "a duplicate appends nothing");

    assert_eq!(log.subjects(&format!("{prefix}.ev.user.")).await.unwrap(), [a.clone(), b.clone()], "subjects holding events");
    let as_of = |before: u64| log.last_before(&a, before);
    assert!(as_of(first.log_seq).await.unwrap().is_none(), "nothing before the first event");
    assert_eq!(as_of(second.log_seq).await.unwrap().unwrap().envelope, e1, "the subject as of its second event");
    assert_eq!(as_of(second.log_seq + 1).await.unwrap().unwrap().envelope, e2);
    assert_eq!(log.last_before(&b, u64::MAX).await.unwrap().unwrap().log_seq, third.log_seq);
    assert!(log.subjects(&format!("{prefix}.ev.")).await.unwrap().is_empty(), "one token deeper only");
    let next = |under: String, from: u64| async move { log.next_under(&under, from).await.unwrap().map(|l| l.log_seq) };
    let users = format!("{prefix}.ev.user.");
    assert_eq!(next(users.clone(), 0).await, Some(first.log_seq), "the first event under the prefix");
    assert_eq!(next(users.clone(), first.log_seq + 1).await, Some(second.log_seq), "on any subject under it");
    assert_eq!(next(users.clone(), second.log_seq + 1).await, Some(third.log_seq));
    assert_eq!(next(users.clone(), third.log_seq + 1).await, None, "nothing after the last");
    assert_eq!(next(format!("{prefix}.ev."), 0).await, None, "one token deeper only");
    let on = |subject: String, from: u64| async move { log.next_on(&subject, from).await.unwrap().map(|l| l.log_seq) };
    assert_eq!(on(a.clone(), 0).await, Some(first.log_seq), "the first event of one subject");
    assert_eq!(on(a.clone(), first.log_seq + 1).await, Some(second.log_seq), "skipping other subjects' events");
    assert_eq!(on(a.clone(), second.log_seq + 1).await, None, "nothing after its last");
    assert_eq!(on(c.clone(), 0).await, None, "nothing on an empty subject");
    assert_eq!(log.last(&a).await.unwrap().unwrap().envelope, e2);
    assert_eq!(log.last(&b).await.unwrap().unwrap().log_seq, third.log_seq);
    assert_eq!(log.get(first.log_seq).await.unwrap().envelope, e1);
    assert_eq!(log.head().await.unwrap(), 3);
    log.check().await.unwrap();
}

#[tokio::test]
async fn the_jetstream_log_keeps_the_contract() {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    // A cluster's servers are given as a comma-separated list (here, the
    // one test server twice).
    let url = std::env::var("NATTER_NATS_URL").unwrap();
    let log = NatsLog::connect(&format!("{url}, {url}"), &format!("C{id}"), &format!("c{id}"), Duration::from_secs(60)).await.unwrap();
    assert!(NatsLog::connect(&format!("{url},not a url"), "X", "x", Duration::from_secs(60)).await.is_err(), "a bad entry in the list is refused");
    contract(&log, &format!("c{id}")).await;
    let _ = log.jetstream().delete_stream(format!("C{id}")).await;
    let _ = log.jetstream().delete_stream(format!("C{id}_PARKED")).await;
}

/// The events of one conversation as the command side makes them: a
/// message from `amy` after `state`, then `bob` opening the conversation.
fn message_then_open(prefix: &str, amy: &str, bob: &str, state: &natter_events::DmState, position: u64) -> [Envelope; 2] {
    let subject = natter_events::subjects::dm(prefix, amy, bob);
    let cmd = natter::commands::send::SendMessage {
        sender: amy.to_owned(),
        receiver: bob.to_owned(),
        message: Some("hi".into()),
        attachment: None,
        client_msg_id: None,
        reply_to: None,
    };
    let sent = natter::commands::send::decide(&cmd, state, &uuid::Uuid::now_v7().to_string(), None);
    let seen = natter::commands::seen::decide_open(&sent.state, bob, amy).expect("bob has something to see");
    [
        Envelope::new(format!("{amy}:{}", uuid::Uuid::now_v7()), subject.clone(), position, Event::MessageSent(sent)),
        Envelope::new(format!("{bob}:seen:{}", uuid::Uuid::now_v7()), subject, position + 1, Event::MessagesSeen(seen)),
    ]
}

fn state_of(env: &Envelope) -> natter_events::DmState {
    match &env.event {
        Event::MessageSent(e) => e.state.clone(),
        Event::MessagesSeen(e) => e.state.clone(),
        _ => unreachable!(),
    }
}

/// With `NATTER_COMPACT_EVENTS=false` (a rolling upgrade from a build
/// without the compact forms) direct-conversation events are stored in
/// their full forms, on JetStream and in the embedded file; either way they
/// read back the same.
#[tokio::test]
async fn direct_conversation_events_are_stored_compact_unless_told_otherwise() {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let url = std::env::var("NATTER_NATS_URL").unwrap();
    let prefix = format!("k{id}");
    let (amy, bob) = (uuid::Uuid::now_v7().to_string(), uuid::Uuid::now_v7().to_string());
    let (mut state, mut position, mut expected_last) = (natter_events::DmState::new(&amy, &bob), 1, 0);
    for (compact, versions) in [(true, [3, 2]), (false, [2, 1])] {
        let log = NatsLog::connect(&url, &format!("K{id}"), &prefix, Duration::from_secs(60)).await.unwrap().compact_events(compact);
        for (env, version) in message_then_open(&prefix, &amy, &bob, &state, position).into_iter().zip(versions) {
            let appended = log.append(&env, expected_last).await.unwrap();
            (expected_last, position, state) = (appended.log_seq, env.position + 1, state_of(&env));
            let raw = log.jetstream().get_stream(format!("K{id}")).await.unwrap().get_raw_message(appended.log_seq).await.unwrap();
            let stored: serde_json::Value = serde_json::from_slice(&raw.payload).unwrap();
            assert_eq!(stored["v"], version, "{stored}");
            assert_eq!(log.get(appended.log_seq).await.unwrap().envelope, env);
        }
    }
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let _ = js.delete_stream(format!("K{id}")).await;
    let _ = js.delete_stream(format!("K{id}_PARKED")).await;

    let dir = std::env::temp_dir().join(format!("natter-compact-{}", uuid::Uuid::new_v4().simple()));
    {
        let log = FileLog::open(&dir, SyncPolicy::Always, Duration::from_secs(60)).unwrap().compact_events(false);
        let events = message_then_open("natter", &amy, &bob, &natter_events::DmState::new(&amy, &bob), 1);
        log.append(&events[0], 0).await.unwrap();
        log.append(&events[1], 1).await.unwrap();
        assert_eq!(log.get(2).await.unwrap().envelope, events[1]);
    }
    let file = String::from_utf8_lossy(&std::fs::read(dir.join("events.log")).unwrap()).into_owned();
    assert!(file.contains("\"type\":\"MessageSent\",\"v\":2") && file.contains("\"type\":\"MessagesSeen\",\"v\":1"), "{file}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_file_log_keeps_the_contract_and_survives_reopening() {
    let dir = std::env::temp_dir().join(format!("natter-contract-{}", uuid::Uuid::new_v4().simple()));
    {
        let log = FileLog::open(&dir, SyncPolicy::Always, Duration::from_secs(60)).unwrap();
        contract(&log, "natter").await;
    }
    let log = FileLog::open(&dir, SyncPolicy::Always, Duration::from_secs(60)).unwrap();
    assert_eq!(log.head().await.unwrap(), 3, "everything acknowledged is there after reopening");
    assert_eq!(log.last("natter.ev.user.a").await.unwrap().unwrap().log_seq, 2);
    assert!(log.append(&env("cmd-1", "natter.ev.user.z", 1), 0).await.unwrap().duplicate, "dedup survives a restart");
    // A clean close writes events.idx: the next open reads it and only what
    // was appended after, and is the same log.
    log.close();
    drop(log);
    assert!(dir.join("events.idx").exists());
    let log = FileLog::open(&dir, SyncPolicy::Always, Duration::from_secs(60)).unwrap();
    assert_eq!(log.head().await.unwrap(), 3);
    assert_eq!(log.last("natter.ev.user.a").await.unwrap().unwrap().log_seq, 2);
    assert!(log.append(&env("cmd-1", "natter.ev.user.z", 1), 0).await.unwrap().duplicate, "dedup survives a restart from the index");
    assert_eq!(log.append(&env("cmd-4", "natter.ev.user.a", 2), 2).await.unwrap().log_seq, 4);
    log.close();
    drop(log);
    // A longer dedup window than the index was written with: the ids are
    // read back from the log instead.
    let log = FileLog::open(&dir, SyncPolicy::Always, Duration::from_secs(120)).unwrap();
    assert!(log.append(&env("cmd-4", "natter.ev.user.a", 2), 4).await.unwrap().duplicate, "dedup with a longer window");
    log.close();
    drop(log);
    // Appended after the index was written (a crash: no close).
    let log = FileLog::open(&dir, SyncPolicy::Always, Duration::from_secs(60)).unwrap();
    assert_eq!(log.append(&env("cmd-5", "natter.ev.user.a", 3), 4).await.unwrap().log_seq, 5);
    drop(log);
    let log = FileLog::open(&dir, SyncPolicy::Always, Duration::from_secs(60)).unwrap();
    assert_eq!(log.head().await.unwrap(), 5, "the index and the records after it");
    assert_eq!(log.last("natter.ev.user.a").await.unwrap().unwrap().log_seq, 5);
    assert!(log.append(&env("cmd-5", "natter.ev.user.a", 4), 5).await.unwrap().duplicate);
    drop(log);
    // Records the index covers are not read at open: damage there is found
    // when the record is read, and then the index is dropped, so the next
    // open scans the whole file and refuses it, naming the damage.
    let mut bytes = std::fs::read(dir.join("events.log")).unwrap();
    let second = 8 + u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
    bytes[second + 8 + 5] ^= 0x20;
    std::fs::write(dir.join("events.log"), &bytes).unwrap();
    let log = FileLog::open(&dir, SyncPolicy::Always, Duration::from_secs(60)).unwrap();
    assert_eq!(log.head().await.unwrap(), 5, "opened from the index, without reading record 2");
    assert!(log.get(2).await.is_err(), "record 2 fails its checksum when read");
    assert!(!dir.join("events.idx").exists(), "the index is dropped");
    drop(log);
    let refused = FileLog::open(&dir, SyncPolicy::Always, Duration::from_secs(60)).err().expect("damage in the middle is refused").to_string();
    assert!(refused.contains("corrupt"), "{refused}");
    bytes[second + 8 + 5] ^= 0x20;
    std::fs::write(dir.join("events.log"), &bytes).unwrap();
    // An index of another log is not used.
    std::fs::write(dir.join("events.log"), b"").unwrap();
    let log = FileLog::open(&dir, SyncPolicy::Always, Duration::from_secs(60)).unwrap();
    assert_eq!(log.head().await.unwrap(), 0, "the index does not describe this (empty) log");
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `natter migrate`: an embedded history moved into JetStream gives the
/// distributed views an in-order replay of that history gives.
#[tokio::test]
async fn an_embedded_history_migrates_into_jetstream() {
    use natter_projections::history::{History, snapshot};
    use natter_projections::local::{LocalCounts, LocalViews};
    use natter_projections::{CountStore, ViewStore};

    let mut c = crate::helpers::Cluster::start(0).await;
    let mut h = History::new(&c.cfg.log.subject_prefix, 4);
    h.create_room(0);
    for i in 0..60usize {
        let (a, b) = (i % 4, (i * 7 + 1) % 4);
        match i % 6 {
            _ if a == b => h.join(a, 0),
            0 | 1 | 2 => h.send(a, b),
            3 => h.mark(b, a, i),
            4 => h.room_send(a, 0),
            _ => h.join(b, 0),
        }
    }
    let dir = std::env::temp_dir().join(format!("natter-migrate-{}", uuid::Uuid::new_v4().simple()));
    {
        let log = FileLog::open(&dir, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
        for env in &h.envelopes {
            let expected = log.last(&env.subject).await.unwrap().map_or(0, |l| l.log_seq);
            log.append(env, expected).await.unwrap();
        }
    }
    let nats = c.cfg.distributed.nats_url.clone().unwrap();
    let out = c.natter(&["migrate", "--from", dir.to_str().unwrap(), "--to", &nats]).await;
    assert!(out.contains(&format!("migrated {} events", h.envelopes.len())), "{out}");
    let again = c.natter(&["migrate", "--from", dir.to_str().unwrap(), "--to", &nats]).await;
    assert!(again.contains("migrated 0 events") && again.contains(&format!("{} already there", h.envelopes.len())), "{again}");
    assert_eq!(c.nats().head().await.unwrap(), h.envelopes.len() as u64);

    c.add_node().await;
    let head = h.envelopes.len() as u64;
    let stream = c.nats().jetstream().get_stream(&c.cfg.distributed.stream).await.unwrap();
    crate::helpers::eventually("the distributed projectors to catch up", || async {
        let mut ok = true;
        for d in ["mongo-views-v1", "redis-unseen-v1"] {
            ok &= stream.consumer_info(d).await.is_ok_and(|i| i.ack_floor.stream_sequence >= head);
        }
        ok
    })
    .await;
    let (views, counts) = (LocalViews::default(), LocalCounts::default());
    for env in &h.envelopes {
        ViewStore::apply(&views, env).await.unwrap();
        CountStore::apply(&counts, env).await.unwrap();
    }
    let node = &c.nodes[0];
    let expected = snapshot(&views, &counts, &h.users, &h.conversations(), &h.rooms).await.unwrap();
    let migrated = snapshot(node.views(), node.counts(), &h.users, &h.conversations(), &h.rooms).await.unwrap();
    assert_eq!(migrated, expected);
    let _ = std::fs::remove_dir_all(&dir);
    c.stop().await;
}
