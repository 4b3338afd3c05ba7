//! Push under faults: a node killed with `kill -9` mid-stream, and a client
//! that never reads.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::client::Driver;
use crate::helpers::{Cluster, eventually_within};
use crate::push::assert_only_own;

/// Every `newMessage` a socket saw, as (cursor, _id).
fn received(d: &Driver, socket: &str) -> Vec<(u64, Value)> {
    d.all
        .iter()
        .filter(|e| e["id"] == socket && e["type"] == "event" && e["event"] == "newMessage")
        .map(|e| (e["data"]["cursor"].as_u64().unwrap(), e["data"]["_id"].clone()))
        .collect()
}

#[tokio::test]
async fn clients_of_a_killed_node_resume_elsewhere_with_every_message_once() {
    let c = Cluster::start(1).await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    let carol = c.register(0, "Carol").await;
    let mut doomed = c.spawn_process().await;
    let survivor = c.spawn_process().await;

    let mut d = Driver::start().await;
    for (s, u) in [("bob", &bob), ("carol", &carol)] {
        d.connected(s, &format!("{}/", doomed.url), json!({ "token": u.token })).await;
        d.next(s, |e| e["event"] == "synced", "synced").await;
    }

    // A stream of 200 messages, alternating receivers, through node 0.
    const TOTAL: usize = 200;
    let url = c.url(0, "");
    let (token, ids) = (amy.token.clone(), [bob.id.clone(), carol.id.clone()]);
    let http = c.http.clone();
    let sender = tokio::spawn(async move {
        let mut sent: HashMap<String, Vec<Value>> = HashMap::new();
        for i in 0..TOTAL {
            let to = &ids[i % 2];
            let body = json!({ "message": format!("stream {i}"), "clientMsgId": format!("s{i}") });
            let r: Value = http
                .post(format!("{url}/api/messages/{to}"))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            sent.entry(to.clone()).or_default().push(r["data"]["_id"].clone());
        }
        sent
    });

    // Kill the node once the stream is flowing.
    d.events("bob", "newMessage", 20).await;
    doomed.kill9().await;
    for s in ["bob", "carol"] {
        d.next(s, |e| e["type"] == "disconnect", "disconnect after kill -9").await;
    }
    // Reconnect to the survivor with the last cursor each client saw.
    for (s, u) in [("bob", &bob), ("carol", &carol)] {
        let cursor = received(&d, s).iter().map(|(c, _)| *c).max().unwrap_or(0);
        d.connected(&format!("{s}-again"), &format!("{}/", survivor.url), json!({ "token": u.token, "cursor": cursor })).await;
    }
    let sent = sender.await.unwrap();
    for (s, u) in [("bob", &bob), ("carol", &carol)] {
        let want = &sent[&u.id];
        let before = received(&d, s).len();
        d.events(&format!("{s}-again"), "newMessage", want.len() - before).await;
        d.quiet(&format!("{s}-again"), Duration::from_millis(500)).await;
        let mut all = received(&d, s);
        all.extend(received(&d, &format!("{s}-again")));
        let ids: Vec<Value> = all.iter().map(|(_, id)| id.clone()).collect();
        assert_eq!(ids.len(), want.len(), "{s}: every message exactly once (no duplicates)");
        assert_eq!(&ids, want, "{s}: in order");
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), want.len());
    }
    let owners = HashMap::from([
        ("bob", bob.id.as_str()),
        ("bob-again", bob.id.as_str()),
        ("carol", carol.id.as_str()),
        ("carol-again", carol.id.as_str()),
    ]);
    assert_only_own(&d, &owners);
    c.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_and_the_others_keep_receiving() {
    let c = Cluster::start_with(1, |cfg| {
        cfg.limits.socket_queue = 64;
        cfg.limits.max_message_chars = 64_000;
        cfg.limits.max_body_bytes = 256 * 1024;
    })
    .await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;

    // A well-behaved socket of the same user.
    let mut d = Driver::start().await;
    d.connected("reader", &c.socket_url(0), json!({ "token": bob.token })).await;
    d.next("reader", |e| e["event"] == "synced", "synced").await;
    // A raw Socket.IO client with a tiny receive buffer that, once
    // connected, never reads again (connected last: it must be dropped as
    // slow before the engine.io heartbeat, 45 s, would close it anyway).
    let addr = c.nodes[0].addr;
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4096).unwrap();
    let stream = tcp.connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/socket.io/?EIO=4&transport=websocket"), stream)
        .await
        .unwrap();
    let open = ws.next().await.unwrap().unwrap();
    assert!(open.to_text().unwrap().starts_with('0'), "engine.io open: {open:?}");
    ws.send(Message::text(format!("40{}", json!({ "token": bob.token })))).await.unwrap();
    loop {
        let m = ws.next().await.unwrap().unwrap();
        if m.to_text().unwrap_or("").starts_with("40") {
            break;
        }
    }
    // Deadlines are generous: on a loaded 2-core machine this test competes
    // with the whole suite for the CPU.
    eventually_within("both sockets registered", 60, || async { c.nodes[0].sockets_of(&bob.id) == 2 }).await;

    // Send ~64 KB messages until the stalled socket is dropped: how many it
    // takes depends on the kernel's socket buffers, so the loop is bounded
    // by count (1000 messages, ~64 MB) rather than fixed. Big messages make
    // it quick, well before the engine.io heartbeat (45 s) would close the
    // stalled connection some other way.
    const MAX: usize = 1000;
    let big = "x".repeat(63_900);
    let path = format!("/api/messages/{}", bob.id);
    let mut sent = 0;
    let mut seqs: Vec<u64> = Vec::new();
    while sent < MAX && c.nodes[0].sockets_of(&bob.id) == 2 {
        let sends = (sent..sent + 20).map(|i| c.request(0, Method::POST, &path, Some(&amy.token), Some(json!({ "message": format!("{i:04}{big}") }))));
        for r in futures::future::join_all(sends).await {
            r.ok();
        }
        sent += 20;
        // Pace the sender to the deliveries: the reading socket keeps up.
        let got = d.events("reader", "newMessage", 20).await;
        seqs.extend(got.iter().map(|m| m["seq"].as_u64().unwrap()));
    }
    assert!(sent < MAX, "the stalled socket was never dropped");
    eprintln!("the stalled socket was dropped after {sent} messages");
    // The hub stops queueing for it at once; its task disconnects it (and
    // counts it) as soon as its pending emit gives up.
    eventually_within("the stalled socket to be counted as a slow consumer", 60, || async {
        c.metric(0, "natter_slow_consumer_disconnects_total").await >= 1.0
    })
    .await;
    assert_eq!(seqs, (1..=sent as u64).collect::<Vec<_>>(), "the reading socket got everything, in order");
    assert_eq!(c.nodes[0].sockets_of(&bob.id), 1, "the hub no longer queues for the stalled socket");
    drop(ws);
    c.stop().await;
}

/// A room event with more recipients than a JetStream context allows
/// pending acks (5,000) reaches every member, and the node goes on
/// appending and delivering (the fan-out used to wait forever on the
/// 5,001st publish, and with it every append of the node); while that room
/// is fanned out, a direct conversation's messages arrive, in seq order.
#[tokio::test]
async fn a_room_of_more_than_5000_members_is_delivered_and_nothing_wedges() {
    use natter::config::SyncPolicy;
    use natter::log::EventLog;
    use natter::log::file::FileLog;
    use natter_events::{Envelope, Event, MemberJoined, RoomCreated, subjects};

    const FANS: usize = 5_000;
    // The room and its members are history migrated from an embedded
    // node's log: the fan-out starts after it, so the test measures one
    // 5,002-recipient event, not a join storm.
    let mut c = Cluster::start(0).await;
    let prefix = c.cfg.log.subject_prefix.clone();
    let (room, amy) = ("stadium".to_owned(), "amy-5k".to_owned());
    let dir = Cluster::data_dir(&format!("5k-{}", &prefix));
    {
        let log = FileLog::open(&dir, SyncPolicy::Os, Duration::from_secs(60)).unwrap();
        let created = RoomCreated { room_id: room.clone(), name: "Stadium".into(), description: None, created_by: amy.clone(), ..Default::default() };
        let env = Envelope::new("create".into(), subjects::room(&prefix, &room), 1, Event::RoomCreated(created));
        log.append(&env, 0).await.unwrap();
        for user in std::iter::once(amy.clone()).chain((0..FANS).map(|i| format!("fan{i:04}"))) {
            let joined = MemberJoined { room_id: room.clone(), user_id: user.clone(), seen_up_to: 0, ..Default::default() };
            let env = Envelope::new(format!("{user}:join"), subjects::member(&prefix, &room, &user), 1, Event::MemberJoined(joined));
            log.append(&env, 0).await.unwrap();
        }
        log.close();
    }
    let nats = c.cfg.distributed.nats_url.clone().unwrap();
    c.natter(&["migrate", "--from", dir.to_str().unwrap(), "--to", &nats]).await;
    c.add_node().await;
    let (bob, carol) = (c.register(0, "Bob").await, c.register(0, "Carol").await);

    let token = crate::helpers::token_for(&amy);
    let path = format!("/api/rooms/{room}/messages");
    let r = c.request(0, Method::POST, &path, Some(&token), Some(json!({ "message": "to all 5,001" }))).await;
    assert!(r.status.is_success(), "{}", r.body);
    for i in 1..=20 {
        c.send(0, &carol, &bob, &format!("dm {i}"), None).await.ok();
    }
    let r = c.request(0, Method::POST, &path, Some(&token), Some(json!({ "message": "and then the next" }))).await;
    assert!(r.status.is_success(), "the node still appends: {}", r.body);

    // Every member gets both room messages, in order: the first member and
    // the last, resuming from the start of the inbox (which numbers its
    // deliveries after the migrated history).
    let js = c.nats().jetstream().clone();
    let mut inbox = js.get_stream(format!("{}_INBOX", c.cfg.distributed.stream)).await.unwrap();
    let start = inbox.info().await.unwrap().state.first_sequence - 1;
    let mut d = Driver::start().await;
    for (id, user) in [("amy", amy.clone()), ("last-fan", format!("fan{:04}", FANS - 1))] {
        d.connected(id, &c.chat_url(0), json!({ "token": crate::helpers::token_for(&user), "cursor": start })).await;
        let got: Vec<Value> = d.events(id, "message", 2).await.iter().map(|m| m["message"].clone()).collect();
        assert_eq!(got, [json!("to all 5,001"), json!("and then the next")], "{id}");
    }
    // Bob's deliveries, in cursor order: the conversation's seqs 1..20, each once.
    d.connected("bob", &c.socket_url(0), json!({ "token": bob.token, "cursor": start })).await;
    let seqs: Vec<u64> = d.events("bob", "newMessage", 20).await.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<u64>>(), "one conversation's deliveries in seq order, each once");
    let extra = d.quiet("bob", Duration::from_millis(300)).await;
    assert!(!extra.iter().any(|e| e["event"] == "newMessage"), "nothing twice: {extra:?}");
    // Stored once per room message, whatever the room's size.
    let state = inbox.info().await.unwrap().state.clone();
    assert_eq!(state.messages, 2 + 2 * 20, "each room message once, bob and carol every DM");
    let _ = std::fs::remove_dir_all(&dir);
    c.stop().await;
}
