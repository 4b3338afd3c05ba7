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
