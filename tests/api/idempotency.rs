//! The same `clientMsgId` gives one message, whatever the retries.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use natter::commands::send::{SendMessage, decide};
use natter::log::EventLog;
use natter_events::{DmState, Envelope, Event, RoomMessageSent, UserRegistered, subjects};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Cluster, eventually_within};

crate::contract!(the_same_client_msg_id_five_times_is_one_message, 2, the_same_client_msg_id_five_times_is_one_message);

async fn the_same_client_msg_id_five_times_is_one_message(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let head = c.log_head().await;

    // Sequential retries, alternating nodes.
    let mut ids = HashSet::new();
    for i in 0..5 {
        let r = c.send(i % 2, &amy, &bob, "only once", Some("retry-1")).await.ok();
        assert_eq!(r["data"]["clientMsgId"], json!("retry-1"));
        ids.insert(r["data"]["_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "every response carries the same _id");

    // Concurrent retries through both nodes.
    let replies = join_all((0..10).map(|i| c.send(i % 2, &amy, &bob, "also once", Some("retry-2")))).await;
    let ids: HashSet<_> = replies.into_iter().map(|r| r.ok()["data"]["_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 1, "concurrent retries all return the original");

    let history = c.history(1, &bob, &amy).await;
    let texts: Vec<_> = history.iter().map(|m| m["message"].as_str().unwrap()).collect();
    assert_eq!(texts, vec!["only once", "also once"]);
    // Two messages and one seen mark: nothing else reached the log.
    assert_eq!(c.log_head().await, head + 3);
}

crate::contract!(a_client_msg_id_reused_for_other_content_is_refused, 1, a_client_msg_id_reused_for_other_content_is_refused);

async fn a_client_msg_id_reused_for_other_content_is_refused(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    c.send(0, &amy, &bob, "first", Some("k1")).await.ok();
    let head = c.log_head().await;
    let r = c.send(0, &amy, &bob, "different", Some("k1")).await;
    assert_eq!(r.status.as_u16(), 409, "{}", r.body);
    assert_eq!(r.body["code"], json!("conflict"));
    // Another sender may use the same key: keys are per sender.
    let r = c.send(0, &bob, &amy, "bob's own", Some("k1")).await.ok();
    assert_eq!(r["data"]["senderId"], json!(bob.id));
    assert_eq!(c.log_head().await, head + 1);
}

crate::contract!(concurrent_registrations_of_one_email_make_one_account, 2, concurrent_registrations_of_one_email_make_one_account);

async fn concurrent_registrations_of_one_email_make_one_account(c: &Cluster) {
    let email = format!("race-{}@example.com", uuid::Uuid::new_v4().simple());
    let head = c.log_head().await;
    let password = |i: usize| format!("password-{i}");
    let replies = join_all((0..6).map(|i| {
        c.request(
            i % 2,
            Method::POST,
            "/api/auth/register",
            None,
            Some(json!({"name": format!("R{i}"), "email": email, "password": password(i)})),
        )
    }))
    .await;
    // Every answer is the same: none tells which one made the account.
    for r in &replies {
        assert_eq!((r.status.as_u16(), &r.body), (replies[0].status.as_u16(), &replies[0].body));
    }
    assert_eq!(replies[0].status.as_u16(), 202, "{}", replies[0].body);
    assert_eq!(c.log_head().await, head + 1, "one account was registered");
    let mut logged_in = Vec::new();
    for i in 0..6 {
        let r = c.request(0, Method::POST, "/api/auth/login", None, Some(json!({"email": email, "password": password(i)}))).await;
        if r.status.is_success() {
            logged_in.push(r.body["user"]["name"].clone());
        }
    }
    assert_eq!(logged_in.len(), 1, "exactly one of the six passwords is the account's: {logged_in:?}");
}

/// Pauses (`Some(until)`) or resumes (`None`) a durable consumer of the
/// cluster's log: the projection it feeds stops applying events.
async fn pause_consumer(c: &Cluster, durable: &str, until: Option<chrono::DateTime<chrono::Utc>>) {
    let subject = format!("$JS.API.CONSUMER.PAUSE.{}.{durable}", c.cfg.distributed.stream);
    let body = match until {
        Some(t) => json!({ "pause_until": t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true) }),
        None => json!({}),
    };
    let reply = c.nats().client().request(subject, serde_json::to_vec(&body).unwrap().into()).await.expect("pause request");
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(reply.get("error").is_none(), "pausing {durable}: {reply}");
    assert_eq!(reply["paused"], json!(until.is_some()), "{reply}");
}

/// Appends `env` as a node would have before dying (the views never saw
/// it), then waits until the log's deduplication window has passed for
/// it: a probe appended just after it, published again with its own
/// message id, is no longer answered "duplicate" (the probe, a
/// registration of a user nobody uses, is then in the log twice).
async fn append_and_outlive_the_dedup_window(c: &Cluster, env: &Envelope, expected_last: u64) {
    let log = c.nats();
    let appended = log.append(env, expected_last).await.expect("append the original");
    assert!(!appended.duplicate);
    let probe_id = format!("probe{}", uuid::Uuid::new_v4().simple());
    let probe = Envelope::new(
        probe_id.clone(),
        subjects::user(&c.cfg.log.subject_prefix, &probe_id),
        1,
        Event::UserRegistered(UserRegistered { user_id: probe_id.clone(), name: "Probe".into(), email: format!("{probe_id}@example.com"), password_hash: "x".into() }),
    );
    let publish = || async {
        let msg = async_nats::jetstream::message::PublishMessage::build().payload(probe.encode().into()).message_id(&probe_id);
        log.jetstream().send_publish(probe.subject.clone(), msg).await.unwrap().await.unwrap()
    };
    assert!(!publish().await.duplicate);
    eventually_within("the dedup window passes", 30, || async { !publish().await.duplicate }).await;
}

/// Item 6 of the abuse issue: a retry is recognised from the log itself,
/// at any age. A node appended Amy's messages (a DM and a room message) and
/// died before applying them; the views' projector is stopped; the log's
/// dedup window has passed. Amy's retries get the originals back, and
/// nothing is appended.
#[tokio::test]
async fn a_retry_after_the_dedup_window_with_the_views_stopped_returns_the_original() {
    let c = Cluster::start_with(1, |cfg| cfg.log.dedup_window = Duration::from_secs(1)).await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    let r = c.request(0, Method::POST, "/api/rooms", Some(&amy.token), Some(json!({ "name": "Retries" }))).await;
    assert_eq!(r.status.as_u16(), 201, "{}", r.body);
    let room = r.body["room"]["_id"].as_str().unwrap().to_owned();
    c.request(0, Method::POST, &format!("/api/rooms/{room}/join"), Some(&amy.token), None).await.ok();

    // The views stop applying the log.
    // (the live views' durable consumer, as `natter projections` shows it)
    let views = "mongo-views-v1";
    pause_consumer(&c, views, Some(chrono::Utc::now() + chrono::Duration::minutes(5))).await;

    // The DM, appended by a node that then died.
    let prefix = &c.cfg.log.subject_prefix;
    let cmd = SendMessage {
        sender: amy.id.clone(),
        receiver: bob.id.clone(),
        message: Some("sent once".into()),
        attachment: None,
        client_msg_id: Some("k-dm".into()),
        reply_to: None,
    };
    let dm_id = uuid::Uuid::now_v7().to_string();
    let sent = decide(&cmd, &DmState::new(&amy.id, &bob.id), &dm_id, None);
    let dm = Envelope::new(format!("{}:k-dm", amy.id), subjects::dm(prefix, &amy.id, &bob.id), 1, Event::MessageSent(sent));
    append_and_outlive_the_dedup_window(&c, &dm, 0).await;

    // The room message likewise.
    let room_subject = subjects::room(prefix, &room);
    let room_head = c.nats().last(&room_subject).await.unwrap().expect("the room's subject");
    let room_msg_id = uuid::Uuid::now_v7().to_string();
    let said = Event::RoomMessageSent(RoomMessageSent {
        message_id: room_msg_id.clone(),
        room_id: room.clone(),
        sender_id: amy.id.clone(),
        client_msg_id: Some("k-room".into()),
        message: Some("said once".into()),
        attachment: None,
        seq: 1,
        reply_to: None,
    });
    let said = Envelope::new(format!("{}:room:k-room", amy.id), room_subject, room_head.envelope.position + 1, said);
    append_and_outlive_the_dedup_window(&c, &said, room_head.log_seq).await;
    let head = c.log_head().await;

    // Amy's client retries both, long after.
    let r = c.send(0, &amy, &bob, "sent once", Some("k-dm")).await.ok();
    assert_eq!((r["data"]["_id"].as_str(), r["data"]["seq"].as_u64()), (Some(dm_id.as_str()), Some(1)), "{r}");
    let r = c
        .request(0, Method::POST, &format!("/api/rooms/{room}/messages"), Some(&amy.token), Some(json!({ "message": "said once", "clientMsgId": "k-room" })))
        .await
        .ok();
    assert_eq!(r["data"]["_id"].as_str(), Some(room_msg_id.as_str()), "{r}");
    assert_eq!(c.log_head().await, head, "no second copy was appended");
    // The same key for other content is still a reuse.
    let r = c.send(0, &amy, &bob, "something else", Some("k-dm")).await;
    assert_eq!(r.status.as_u16(), 409, "{}", r.body);

    // The views resume and catch up with the log: each message is there once.
    pause_consumer(&c, views, None).await;
    let log_stream = c.nats().jetstream().get_stream(&c.cfg.distributed.stream).await.unwrap();
    eventually_within("the views' projector catches up", 30, || async {
        let info = log_stream.consumer_info(views).await.unwrap();
        info.num_pending == 0 && info.num_ack_pending == 0 && info.ack_floor.stream_sequence >= head
    })
    .await;
    let texts: Vec<Value> = c.history(0, &bob, &amy).await.iter().map(|m| m["message"].clone()).collect();
    assert_eq!(texts, [json!("sent once")]);
    let r = c.request(0, Method::GET, &format!("/api/rooms/{room}/messages"), Some(&amy.token), None).await.ok();
    let said: Vec<&Value> = r.as_array().unwrap().iter().map(|m| &m["message"]).collect();
    assert_eq!(said, [&json!("said once")], "{r}");
    c.stop().await;
}

/// A send whose original reached the log but not the views (its node died)
/// is retried after the conversation changed so that a new send would be
/// refused (the receiver blocked the sender since): the retry still gets
/// the original, once, not the refusal.
#[tokio::test]
async fn a_retry_refused_by_a_change_since_its_original_returns_the_original() {
    let c = Cluster::start(1).await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    pause_consumer(&c, "mongo-views-v1", Some(chrono::Utc::now() + chrono::Duration::minutes(5))).await;

    // The DM, appended by a node that then died (the views never saw it).
    let cmd = SendMessage {
        sender: amy.id.clone(),
        receiver: bob.id.clone(),
        message: Some("sent before the block".into()),
        attachment: None,
        client_msg_id: Some("k-blocked".into()),
        reply_to: None,
    };
    let dm_id = uuid::Uuid::now_v7().to_string();
    let sent = decide(&cmd, &DmState::new(&amy.id, &bob.id), &dm_id, None);
    let state = sent.state.clone();
    let subject = subjects::dm(&c.cfg.log.subject_prefix, &amy.id, &bob.id);
    let dm = Envelope::new(format!("{}:k-blocked", amy.id), subject.clone(), 1, Event::MessageSent(sent));
    let appended = c.nats().append(&dm, 0).await.expect("append the original");
    // Bob blocks Amy on top of it.
    let block = natter::commands::block::decide(&state, &bob.id, &amy.id, true).expect("a block");
    let blocked = Envelope::new(format!("{}:block:1", bob.id), subject, 2, Event::BlockChanged(block));
    c.nats().append(&blocked, appended.log_seq).await.expect("append the block");
    let head = c.log_head().await;

    // Amy's retry: the original, not 403.
    let r = c.send(0, &amy, &bob, "sent before the block", Some("k-blocked")).await.ok();
    assert_eq!(r["data"]["_id"].as_str(), Some(dm_id.as_str()), "{r}");
    // A new message is refused, and nothing was appended by either.
    let r = c.send(0, &amy, &bob, "and now?", Some("k-new")).await;
    assert_eq!((r.status.as_u16(), r.body["code"].clone()), (403, json!("blocked")), "{}", r.body);
    assert_eq!(c.log_head().await, head, "no second copy, nothing refused stored");
    pause_consumer(&c, "mongo-views-v1", None).await;
    c.stop().await;
}
