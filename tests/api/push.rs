//! Real-time push over Socket.IO across nodes, with the official
//! socket.io-client as the client.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::client::Driver;
use crate::helpers::{Cluster, SECRET, User, eventually};

/// Checks, over everything every socket saw, that no user received a
/// delivery for a conversation they are not in.
pub fn assert_only_own(driver: &Driver, owners: &HashMap<&str, &str>) {
    for e in &driver.all {
        if e["type"] != "event" {
            continue;
        }
        let socket = e["id"].as_str().unwrap();
        let Some(user) = owners.get(socket) else { continue };
        let d = &e["data"];
        let party = |a: &str, b: &str| d[a] == json!(user) || d[b] == json!(user);
        match e["event"].as_str().unwrap() {
            "newMessage" => assert!(party("senderId", "receiverId"), "{socket} ({user}) got someone else's message: {e}"),
            "messagesSeen" => assert!(party("readerId", "senderId"), "{socket} ({user}) got someone else's receipt: {e}"),
            _ => {}
        }
    }
}

fn auth(u: &User) -> Value {
    json!({ "token": u.token })
}

crate::contract!(a_send_reaches_every_socket_of_both_users_on_every_node, 3, a_send_reaches_every_socket_of_both_users_on_every_node);

async fn a_send_reaches_every_socket_of_both_users_on_every_node(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let mut d = Driver::start().await;
    d.connected("bob2", &c.socket_url(1), auth(&bob)).await;
    d.connected("bob3", &c.socket_url(2), auth(&bob)).await;
    d.connected("amy3", &c.socket_url(2), auth(&amy)).await;
    for s in ["bob2", "bob3", "amy3"] {
        d.next(s, |e| e["event"] == "synced", "synced").await;
    }

    let sent = c.send(0, &amy, &bob, "over the wire", None).await.ok()["data"].clone();
    for s in ["bob2", "bob3", "amy3"] {
        let got = d.events(s, "newMessage", 1).await.remove(0);
        let mut without_cursor = got.clone();
        without_cursor.as_object_mut().unwrap().remove("cursor");
        assert_eq!(without_cursor, sent, "{s}: the pushed message is the message REST returned");
        assert!(got["cursor"].as_u64().unwrap() > 0);
    }

    // Read receipt: bob opens the conversation; amy's socket hears of it,
    // and bob's other tabs too.
    c.history(1, &bob, &amy).await;
    let receipt = d.events("amy3", "messagesSeen", 1).await.remove(0);
    assert_eq!(receipt["readerId"], json!(bob.id));
    assert_eq!(receipt["senderId"], json!(amy.id));
    assert_eq!(receipt["upToSeq"], json!(1));
    d.events("bob2", "messagesSeen", 1).await;

    // Typing is relayed to the peer's sockets only, never stored.
    let head = c.log_head().await;
    d.emit("amy3", "typing", json!({ "to": bob.id, "typing": true })).await;
    for s in ["bob2", "bob3"] {
        let t = d.events(s, "typing", 1).await.remove(0);
        assert_eq!(t, json!({ "from": amy.id, "typing": true }));
    }
    assert_eq!(c.log_head().await, head, "typing never reaches the log");
    let amy_extra = d.quiet("amy3", Duration::from_millis(300)).await;
    assert!(!amy_extra.iter().any(|e| e["event"] == "typing"), "the typist does not hear herself: {amy_extra:?}");

    // Bad typing input is an error event, not a crash.
    d.emit("bob2", "typing", json!({ "to": "no.such" })).await;
    let err = d.next("bob2", |e| e["event"] == "error", "error").await;
    assert_eq!(err["data"]["code"], "bad_request");

    let owners = HashMap::from([("bob2", bob.id.as_str()), ("bob3", bob.id.as_str()), ("amy3", amy.id.as_str())]);
    assert_only_own(&d, &owners);

    // A node holds a user's subscription only while it holds their sockets
    // (on one embedded node, both of bob's sockets are on it).
    let (here, there) = (c.node(2), c.node(1));
    let bob_here = if c.is_embedded() { 2 } else { 1 };
    assert_eq!(here.sockets_of(&bob.id), bob_here);
    d.disconnect("bob3").await;
    eventually("bob's third-node socket to leave the hub", || async { here.sockets_of(&bob.id) == bob_here - 1 }).await;
    assert_eq!(here.subscribed_users(), if c.is_embedded() { 2 } else { 1 }, "amy's socket is still there");
    assert_eq!(there.sockets_of(&bob.id), 1, "bob's socket on node 2 is untouched");
    for s in ["bob2", "amy3"] {
        d.disconnect(s).await;
    }
    eventually("every subscription to go with the last socket", || async {
        c.nodes.iter().all(|n| n.subscribed_users() == 0)
    })
    .await;
}

crate::contract!(typing_is_rate_limited, 1, |cfg| cfg.limits.typing_per_sec = 2, typing_is_rate_limited);

async fn typing_is_rate_limited(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    let mut d = Driver::start().await;
    d.connected("amy", &c.socket_url(0), auth(&amy)).await;
    d.connected("bob", &c.socket_url(0), auth(&bob)).await;
    d.next("bob", |e| e["event"] == "synced", "synced").await;
    for _ in 0..40 {
        d.emit("amy", "typing", json!({ "to": bob.id })).await;
    }
    d.events("bob", "typing", 1).await;
    let rest = d.quiet("bob", Duration::from_millis(800)).await;
    let relayed = 1 + rest.iter().filter(|e| e["event"] == "typing").count();
    assert!(relayed <= 8, "a burst of 40 was cut to the bucket's size, got {relayed}");
}

crate::contract!(handshakes_without_a_valid_token_are_refused, 1, handshakes_without_a_valid_token_are_refused);

async fn handshakes_without_a_valid_token_are_refused(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let now = chrono::Utc::now().timestamp();
    let sign = |claims: Value, secret: &str| {
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())).unwrap()
    };
    let expired = sign(json!({"sub": amy.id, "exp": now - 60, "iss": "natter", "aud": "natter"}), SECRET);
    let forged = sign(json!({"sub": amy.id, "exp": now + 600, "iss": "natter", "aud": "natter"}), "not-the-secret");
    let cases = [
        ("missing", json!({})),
        ("empty", json!({ "token": "" })),
        ("expired", json!({ "token": expired })),
        ("forged", json!({ "token": forged })),
        ("garbage", json!({ "token": "abc" })),
        ("bad cursor", json!({ "token": amy.token, "cursor": "soon" })),
    ];
    let mut d = Driver::start().await;
    for (what, a) in cases {
        d.connect(what, &c.socket_url(0), a).await;
        let e = d.next(what, |e| e["type"] == "connect" || e["type"] == "connect_error", "handshake").await;
        assert_eq!(e["type"], "connect_error", "{what}: {e}");
        let message = e["message"].as_str().unwrap();
        assert!(!message.is_empty(), "{what}: a reason the client can read");
        if what == "expired" {
            assert_eq!(message, "token expired");
        }
    }
}

crate::contract!(a_client_resumes_on_another_node_with_exactly_what_it_missed, 2, a_client_resumes_on_another_node_with_exactly_what_it_missed);

async fn a_client_resumes_on_another_node_with_exactly_what_it_missed(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    let mut d = Driver::start().await;
    d.connected("bob-a", &c.socket_url(0), auth(&bob)).await;
    d.next("bob-a", |e| e["event"] == "synced", "synced").await;
    c.send(1, &amy, &bob, "before", None).await.ok();
    let cursor = d.events("bob-a", "newMessage", 1).await[0]["cursor"].as_u64().unwrap();
    d.disconnect("bob-a").await;
    d.next("bob-a", |e| e["type"] == "disconnect", "disconnect").await;

    let mut sent = Vec::new();
    for i in 0..100 {
        sent.push(c.send(i % 2, &amy, &bob, &format!("missed {i}"), Some(&format!("m{i}"))).await.ok()["data"]["_id"].clone());
    }
    d.connected("bob-b", &c.socket_url(1), json!({ "token": bob.token, "cursor": cursor })).await;
    let got = d.events("bob-b", "newMessage", 100).await;
    let ids: Vec<Value> = got.iter().map(|m| m["_id"].clone()).collect();
    assert_eq!(ids, sent, "exactly the 100 missed messages, in order");
    let cursors: Vec<u64> = got.iter().map(|m| m["cursor"].as_u64().unwrap()).collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "cursors increase");
    let synced = d.next("bob-b", |e| e["event"] == "synced", "synced").await;
    assert_eq!(synced["data"]["cursor"], json!(cursors[99]));

    // then live, with no duplicate at the switch
    let live = c.send(0, &amy, &bob, "live", None).await.ok()["data"]["_id"].clone();
    assert_eq!(d.events("bob-b", "newMessage", 1).await[0]["_id"], live);
    let extra = d.quiet("bob-b", Duration::from_millis(500)).await;
    assert!(!extra.iter().any(|e| e["event"] == "newMessage"), "nothing twice: {extra:?}");

    // `sync` with an old cursor replays from there without reconnecting.
    d.emit("bob-b", "sync", json!({ "cursor": cursors[97] })).await;
    let again = d.events("bob-b", "newMessage", 3).await;
    assert_eq!(again.iter().map(|m| m["_id"].clone()).collect::<Vec<_>>(), vec![sent[98].clone(), sent[99].clone(), live]);
}

#[tokio::test]
async fn a_cursor_older_than_retention_gets_a_resync() {
    let c = Cluster::start(1).await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    c.send(0, &amy, &bob, "one", None).await.ok();
    // Purge the inbox as retention would, once the fan-out has made both
    // deliveries (it runs after the send is acknowledged).
    let mut inbox = c.nats().jetstream().get_stream(format!("{}_INBOX", c.cfg.distributed.stream)).await.unwrap();
    eventually("both deliveries of the send made", || async { inbox.get_info().await.unwrap().state.last_sequence == 2 }).await;
    inbox.purge().await.unwrap();
    let head = inbox.info().await.unwrap().state.last_sequence;
    let mut d = Driver::start().await;
    d.connected("bob", &c.socket_url(0), json!({ "token": bob.token, "cursor": 0 })).await;
    let resync = d.next("bob", |e| e["event"] == "resync", "resync").await;
    assert_eq!(resync["data"]["cursor"], json!(head));
    // A cursor from the future is refused the same way.
    d.connected("bob2", &c.socket_url(0), json!({ "token": bob.token, "cursor": head + 1000 })).await;
    d.next("bob2", |e| e["event"] == "resync", "resync").await;
    // After a resync the socket is live.
    c.send(0, &amy, &bob, "two", None).await.ok();
    assert_eq!(d.events("bob", "newMessage", 1).await[0]["message"], "two");
    // An inbox written by an older natter (no layout mark: its replies may
    // hold previews of messages deleted since) is emptied once at start-up,
    // and its cursors get `resync`; a marked one is kept.
    eventually("two's deliveries made", || async { inbox.get_info().await.unwrap().state.last_sequence == head + 2 }).await;
    let mut c = c;
    c.add_node().await;
    assert_eq!(inbox.info().await.unwrap().state.messages, 2, "a current inbox is kept when a node starts");
    let mut config = inbox.info().await.unwrap().config.clone();
    config.metadata.remove("natter_inbox_layout");
    c.nats().jetstream().update_stream(config).await.unwrap();
    // Views written by such a build held reply previews: emptied once too.
    use mongodb::bson::{Document, doc};
    let db = natter::distributed::connect_mongo(c.cfg.distributed.mongo_url.as_deref().unwrap(), &c.cfg.distributed.mongo_db).await.unwrap();
    let old_reply = doc! {"_id": "old-reply", "replyTo": {"messageId": "m0", "preview": "an old preview"}};
    db.collection::<Document>("messages").insert_one(old_reply).await.unwrap();
    db.collection::<Document>("meta").delete_one(doc! {"_id": "reply-previews-cleared"}).await.unwrap();
    c.add_node().await;
    let reply = db.collection::<Document>("messages").find_one(doc! {"_id": "old-reply"}).await.unwrap().unwrap();
    assert_eq!(reply.get_document("replyTo").unwrap().get_str("preview").unwrap(), "", "{reply}");
    let state = inbox.info().await.unwrap().state.clone();
    assert_eq!((state.messages, state.first_sequence), (0, head + 3), "an older layout's deliveries are gone");
    assert!(inbox.info().await.unwrap().config.metadata.contains_key("natter_inbox_layout"));
    d.connected("bob3", &c.socket_url(0), json!({ "token": bob.token, "cursor": head })).await;
    d.next("bob3", |e| e["event"] == "resync", "resync after the older inbox was emptied").await;
    c.stop().await;
}

/// The inbox is bounded by size as well as age: past NATTER_PUSH_MAX_BYTES
/// the oldest deliveries go, a cursor among them gets `resync`, and a
/// recent cursor still resumes with exactly what it missed.
#[tokio::test]
async fn the_inbox_is_bounded_by_size_and_older_cursors_get_a_resync() {
    let c = Cluster::start_with(1, |cfg| {
        cfg.push.max_bytes = 64 * 1024;
        cfg.limits.max_message_chars = 2000;
    })
    .await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    let text = "x".repeat(1500);
    for i in 0..80 {
        c.send(0, &amy, &bob, &format!("{i:02}{text}"), None).await.ok();
    }
    let inbox = c.nats().jetstream().get_stream(format!("{}_INBOX", c.cfg.distributed.stream)).await.unwrap();
    eventually("all 160 deliveries made", || async { inbox.get_info().await.unwrap().state.last_sequence == 160 }).await;
    let state = inbox.get_info().await.unwrap().state;
    assert!(state.bytes <= 64 * 1024, "the inbox holds {} bytes", state.bytes);
    assert!(state.first_sequence > 1, "the oldest deliveries are gone");
    let mut d = Driver::start().await;
    d.connected("old", &c.socket_url(0), json!({ "token": bob.token, "cursor": 1 })).await;
    d.next("old", |e| e["event"] == "resync", "resync for a cursor the inbox no longer holds").await;
    // Bob's last three deliveries are still there: resuming before them gets them.
    let recent = state.last_sequence - 6;
    d.connected("recent", &c.socket_url(0), json!({ "token": bob.token, "cursor": recent })).await;
    let got = d.events("recent", "newMessage", 3).await;
    let texts: Vec<String> = got.iter().map(|m| m["message"].as_str().unwrap()[..2].to_owned()).collect();
    assert_eq!(texts, ["77", "78", "79"]);
    d.next("recent", |e| e["event"] == "synced", "synced").await;
    c.stop().await;
}

crate::contract!(deliveries_of_a_conversation_arrive_in_sequence_order, 3, deliveries_of_a_conversation_arrive_in_sequence_order);

/// While other conversations keep the fan-out busy (distributed: their
/// events share batches and partitions with this one's, on any node), each
/// conversation's deliveries reach every socket in sequence order.
async fn deliveries_of_a_conversation_arrive_in_sequence_order(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let names: Vec<String> = (0..6).map(|i| format!("Other{i}")).collect();
    let others: Vec<User> = futures::future::join_all(names.iter().enumerate().map(|(i, n)| c.register(i % 3, n))).await;
    let mut d = Driver::start().await;
    let mut sockets = vec![("amy".to_owned(), 0, &amy), ("bob1".to_owned(), 1, &bob), ("bob2".to_owned(), 2, &bob)];
    sockets.extend(others.iter().enumerate().map(|(i, u)| (format!("other{i}"), i % 3, u)));
    for (s, node, u) in &sockets {
        d.connected(s, &c.socket_url(*node), auth(u)).await;
        d.next(s, |e| e["event"] == "synced", "synced").await;
    }
    // amy and bob: 40 messages both ways; three other pairs: 20 each.
    let texts: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
    let mut sends = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let (from, to) = if i % 3 == 0 { (&bob, &amy) } else { (&amy, &bob) };
        sends.push(c.send(i % 3, from, to, text, None));
        if i < 20 {
            for pair in others.chunks(2) {
                let (from, to) = if i % 2 == 0 { (&pair[0], &pair[1]) } else { (&pair[1], &pair[0]) };
                sends.push(c.send((i + 1) % 3, from, to, text, None));
            }
        }
    }
    for r in futures::future::join_all(sends).await {
        r.ok();
    }
    for (s, _, _) in &sockets {
        let n = if s.starts_with("other") { 20 } else { 40 };
        let seqs: Vec<u64> = d.events(s, "newMessage", n).await.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>(), "{s} saw the conversation in order");
    }
    let owners = sockets.iter().map(|(s, _, u)| (s.as_str(), u.id.as_str())).collect();
    assert_only_own(&d, &owners);
}
