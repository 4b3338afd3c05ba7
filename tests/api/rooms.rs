//! Study rooms over REST and `/chat`, with presence across nodes.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Driver;
use crate::helpers::{Cluster, PrivateRedis, User, eventually};

/// Folds a presence event into a socket's view of who is present.
fn apply_presence(present: &mut BTreeSet<String>, e: &Value) {
    let id = |u: &Value| u["_id"].as_str().unwrap().to_owned();
    match e["event"].as_str().unwrap() {
        "room-users" => *present = e["data"]["users"].as_array().unwrap().iter().map(id).collect(),
        "user-joined" => {
            present.insert(id(&e["data"]["user"]));
        }
        "user-left" => {
            present.remove(&id(&e["data"]["user"]));
        }
        other => panic!("not a presence event: {other}"),
    }
}

async fn create_room(c: &Cluster, node: usize, owner: &User, name: &str) -> String {
    let r = c.request(node, Method::POST, "/api/rooms", Some(&owner.token), Some(json!({ "name": name }))).await;
    assert_eq!(r.status.as_u16(), 201, "{}", r.body);
    r.body["room"]["_id"].as_str().unwrap().to_owned()
}

async fn room_send(c: &Cluster, node: usize, u: &User, room: &str, text: &str) -> Value {
    c.request(node, Method::POST, &format!("/api/rooms/{room}/messages"), Some(&u.token), Some(json!({ "message": text })))
        .await
        .ok()["data"]
        .clone()
}

async fn unread(c: &Cluster, node: usize, u: &User) -> HashMap<String, u64> {
    let r = c.request(node, Method::GET, "/api/rooms", Some(&u.token), None).await.ok();
    r["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["isMember"] == json!(true))
        .map(|r| (r["_id"].as_str().unwrap().to_owned(), r["unread"].as_u64().unwrap()))
        .collect()
}

crate::contract!(rooms_over_rest_with_exact_unread_counts, 2, rooms_over_rest_with_exact_unread_counts);

async fn rooms_over_rest_with_exact_unread_counts(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let carol = c.register(0, "Carol").await;
    let algebra = create_room(&c, 0, &amy, "Algebra").await;
    let physics = create_room(&c, 1, &bob, "Physics").await;
    c.request(1, Method::POST, &format!("/api/rooms/{algebra}/join"), Some(&bob.token), None).await.ok();
    c.request(0, Method::POST, &format!("/api/rooms/{algebra}/join"), Some(&carol.token), None).await.ok();
    c.request(0, Method::POST, &format!("/api/rooms/{physics}/join"), Some(&carol.token), None).await.ok();

    // Interleaved messages and reads.
    for (i, (u, room)) in [(&amy, &algebra), (&bob, &algebra), (&amy, &algebra), (&bob, &physics), (&carol, &algebra), (&bob, &physics)]
        .into_iter()
        .enumerate()
    {
        let m = room_send(&c, i % 2, u, room, &format!("m{i}")).await;
        assert_eq!(m["roomId"], json!(room));
    }
    // algebra: amy(1) bob(2) amy(3) carol(4); physics: bob(1) bob(2)
    assert_eq!(unread(&c, 0, &amy).await, HashMap::from([(algebra.clone(), 1)]));
    assert_eq!(unread(&c, 1, &bob).await, HashMap::from([(algebra.clone(), 2), (physics.clone(), 0)]));
    assert_eq!(unread(&c, 0, &carol).await, HashMap::from([(algebra.clone(), 0), (physics.clone(), 2)]));

    // Reading the history marks the room read; history is oldest first.
    let h = c.request(1, Method::GET, &format!("/api/rooms/{algebra}/messages"), Some(&bob.token), None).await.ok();
    let seqs: Vec<u64> = h.as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert_eq!(unread(&c, 0, &bob).await[&algebra], 0);
    let page = c.request(0, Method::GET, &format!("/api/rooms/{algebra}/messages?limit=2&before=4"), Some(&bob.token), None).await.ok();
    assert_eq!(page.as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 3]);

    // A new member does not inherit unread history.
    let dave = c.register(1, "Dave").await;
    c.request(1, Method::POST, &format!("/api/rooms/{algebra}/join"), Some(&dave.token), None).await.ok();
    assert_eq!(unread(&c, 1, &dave).await[&algebra], 0);
    room_send(&c, 0, &amy, &algebra, "welcome").await;
    assert_eq!(unread(&c, 1, &dave).await[&algebra], 1);

    // Leaving: no longer a member, no unread.
    c.request(1, Method::POST, &format!("/api/rooms/{algebra}/leave"), Some(&dave.token), None).await.ok();
    assert!(!unread(&c, 1, &dave).await.contains_key(&algebra));
    let one = c.request(0, Method::GET, &format!("/api/rooms/{algebra}"), Some(&dave.token), None).await.ok();
    assert_eq!(one["room"]["isMember"], json!(false));
    assert_eq!(one["room"]["name"], json!("Algebra"));
}

crate::contract!(non_members_cannot_read_send_or_see_presence, 1, non_members_cannot_read_send_or_see_presence);

async fn non_members_cannot_read_send_or_see_presence(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let eve = c.register(0, "Eve").await;
    let room = create_room(&c, 0, &amy, "Private-ish").await;
    room_send(&c, 0, &amy, &room, "members only").await;
    let head = c.log_head().await;
    for (method, path, body) in [
        (Method::GET, format!("/api/rooms/{room}/messages"), None),
        (Method::POST, format!("/api/rooms/{room}/messages"), Some(json!({ "message": "let me in" }))),
        (Method::GET, format!("/api/rooms/{room}/users"), None),
        (Method::POST, format!("/api/rooms/{room}/leave"), None),
    ] {
        let r = c.request(0, method, &path, Some(&eve.token), body).await;
        assert_eq!(r.status.as_u16(), 403, "{path}: {}", r.body);
        assert_eq!(r.body["success"], json!(false));
    }
    for (method, path, status) in [
        (Method::GET, "/api/rooms/no-such-room/messages".to_owned(), 404),
        (Method::POST, "/api/rooms/no-such-room/join".to_owned(), 404),
        (Method::GET, "/api/rooms/a.b".to_owned(), 404),
    ] {
        let r = c.request(0, method, &path, Some(&eve.token), None).await;
        assert_eq!(r.status.as_u16(), status, "{path}: {}", r.body);
    }
    let bad = c.request(0, Method::POST, "/api/rooms", Some(&eve.token), Some(json!({ "name": "" }))).await;
    assert_eq!(bad.status.as_u16(), 400);
    let bad = c.request(0, Method::POST, "/api/rooms", Some(&eve.token), Some(json!({ "name": 5 }))).await;
    assert_eq!(bad.status.as_u16(), 422);

    // Over /chat: send-message is refused with an error ack.
    let mut d = Driver::start().await;
    d.connected("eve", &c.chat_url(0), json!({ "token": eve.token })).await;
    let ack = d.emit_ack("eve", "send-message", json!({ "roomId": room, "message": "hi" })).await;
    assert_eq!(ack["success"], json!(false));
    assert_eq!(ack["code"], json!("forbidden"));
    assert_eq!(c.log_head().await, head, "nothing appended by any refused request");
    // and she sees none of the room's traffic
    room_send(&c, 0, &amy, &room, "still members only").await;
    let seen = d.quiet("eve", Duration::from_millis(500)).await;
    assert!(!seen.iter().any(|e| e["event"] == "message"), "{seen:?}");
}

crate::contract!(three_nodes_agree_on_presence_and_on_the_order_of_joins_leaves_and_messages, 3, three_nodes_agree_on_presence_and_on_the_order_of_joins_leaves_and_messages);

async fn three_nodes_agree_on_presence_and_on_the_order_of_joins_leaves_and_messages(c: &Cluster) {
    let users = [c.register(0, "Amy").await, c.register(1, "Bob").await, c.register(2, "Carol").await];
    let room = create_room(&c, 0, &users[0], "Chem").await;
    let mut d = Driver::start().await;
    for (i, u) in users.iter().enumerate() {
        let s = format!("s{i}");
        d.connected(&s, &c.chat_url(i), json!({ "token": u.token })).await;
        d.next(&s, |e| e["event"] == "synced", "synced").await;
        let ack = d.emit_ack(&s, "join-room", json!(room)).await;
        assert_eq!(ack["success"], json!(true), "{ack}");
    }
    // On every node, each socket's presence (the list it got on entering,
    // then the deltas) comes to all three.
    let everyone: BTreeSet<String> = users.iter().map(|u| u.id.clone()).collect();
    for i in 0..3 {
        let s = format!("s{i}");
        let mut present = BTreeSet::new();
        while present != everyone {
            let e = d.next(&s, |e| ["room-users", "user-joined", "user-left"].contains(&e["event"].as_str().unwrap_or("")), "presence").await;
            apply_presence(&mut present, &e);
        }
    }
    // Joins (membership over REST), leaves and messages from all nodes.
    let dave = c.register(1, "Dave").await;
    let texts: Vec<String> = (0..12).map(|i| format!("t{i}")).collect();
    let sends = texts.iter().enumerate().map(|(i, t)| room_send(&c, i % 3, &users[i % 3], &room, t));
    let join_path = format!("/api/rooms/{room}/join");
    let join = c.request(1, Method::POST, &join_path, Some(&dave.token), None);
    let (_, joined) = tokio::join!(futures::future::join_all(sends), join);
    joined.ok();
    c.request(2, Method::POST, &format!("/api/rooms/{room}/leave"), Some(&dave.token), None).await.ok();
    // 12 messages, dave's join and leave: the same 14 events in the same order everywhere.
    let mut orders = Vec::new();
    for i in 0..3 {
        let s = format!("s{i}");
        let mut seen = Vec::new();
        while seen.len() < 14 {
            let e = d
                .next(&s, |e| e["type"] == "event" && matches!(e["event"].as_str(), Some("message" | "member-joined" | "member-left")), "room event")
                .await;
            if e["event"] == "member-joined" && e["data"]["userId"] != json!(dave.id) {
                continue; // the original members' own joins, before the test traffic
            }
            // Cursors are per user; the order of the events is what must agree.
            seen.push((e["event"].clone(), e["data"]["_id"].clone(), e["data"]["userId"].clone()));
        }
        orders.push(seen);
    }
    assert_eq!(orders[0], orders[1]);
    assert_eq!(orders[1], orders[2]);
    assert_eq!(orders[0].iter().filter(|(e, _, _)| e == "message").count(), 12);
}

crate::contract!(a_user_with_two_tabs_leaves_when_the_last_closes, 2, a_user_with_two_tabs_leaves_when_the_last_closes);

async fn a_user_with_two_tabs_leaves_when_the_last_closes(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let room = create_room(&c, 0, &amy, "Bio").await;
    let mut d = Driver::start().await;
    d.connected("amy", &c.chat_url(0), json!({ "token": amy.token })).await;
    d.emit_ack("amy", "join-room", json!({ "roomId": room })).await;
    d.connected("bob-1", &c.chat_url(0), json!({ "token": bob.token })).await;
    d.emit_ack("bob-1", "join-room", json!(room)).await;
    let bob_id = json!(bob.id);
    let joined = d.next("amy", |e| e["event"] == "user-joined" && e["data"]["user"]["_id"] == bob_id, "bob's user-joined").await;
    assert_eq!(joined["data"]["user"]["name"], json!("Bob"));
    d.connected("bob-2", &c.chat_url(1), json!({ "token": bob.token })).await;
    d.emit_ack("bob-2", "join-room", json!(room)).await;

    let users_path = format!("/api/rooms/{room}/users");
    let count = || async { c.request(1, Method::GET, &users_path, Some(&amy.token), None).await.ok()["count"].as_u64().unwrap() };
    assert_eq!(count().await, 2, "two tabs count once");

    d.disconnect("bob-1").await;
    let after_one = d.quiet("amy", Duration::from_millis(600)).await;
    assert!(!after_one.iter().any(|e| e["event"] == "user-left"), "one tab closed, bob is still here: {after_one:?}");
    assert_eq!(count().await, 2);

    d.disconnect("bob-2").await;
    let left = d.next("amy", |e| e["event"] == "user-left", "user-left").await;
    assert_eq!(left["data"]["user"]["_id"], json!(bob.id));
    assert_eq!(count().await, 1);
}

#[tokio::test]
async fn members_of_a_killed_node_are_announced_as_left_within_twice_the_ttl() {
    let ttl = Duration::from_millis(3000);
    let c = Cluster::start_with(1, |cfg| cfg.push.presence_ttl = ttl).await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    let room = create_room(&c, 0, &amy, "Geo").await;
    let mut doomed = c.spawn_process().await;
    let mut d = Driver::start().await;
    d.connected("amy", &c.chat_url(0), json!({ "token": amy.token })).await;
    d.emit_ack("amy", "join-room", json!(room)).await;
    d.connected("bob", &format!("{}/chat", doomed.url), json!({ "token": bob.token })).await;
    d.emit_ack("bob", "join-room", json!(room)).await;
    d.next("amy", |e| e["event"] == "user-joined", "user-joined").await;
    let users = format!("/api/rooms/{room}/users");
    assert_eq!(c.request(0, Method::GET, &users, Some(&amy.token), None).await.ok()["count"], json!(2));

    doomed.kill9().await;
    let killed = std::time::Instant::now();
    let left = d.next("amy", |e| e["event"] == "user-left", "user-left after kill -9").await;
    let took = killed.elapsed();
    assert_eq!(left["data"]["user"]["_id"], json!(bob.id));
    assert!(took <= ttl * 2, "announced after {took:?}, more than twice the TTL ({ttl:?})");
    eventually("the active count to drop", || async {
        c.request(0, Method::GET, &users, Some(&amy.token), None).await.ok()["count"] == json!(1)
    })
    .await;
    c.stop().await;
}

crate::contract!(a_member_who_was_away_resumes_with_the_room_messages_they_missed, 2, a_member_who_was_away_resumes_with_the_room_messages_they_missed);

async fn a_member_who_was_away_resumes_with_the_room_messages_they_missed(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let room = create_room(&c, 0, &amy, "Lit").await;
    c.request(1, Method::POST, &format!("/api/rooms/{room}/join"), Some(&bob.token), None).await.ok();
    let mut d = Driver::start().await;
    d.connected("bob", &c.chat_url(1), json!({ "token": bob.token })).await;
    d.next("bob", |e| e["event"] == "synced", "synced").await;
    room_send(&c, 0, &amy, &room, "first").await;
    let cursor = d.events("bob", "message", 1).await[0]["cursor"].as_u64().unwrap();
    d.disconnect("bob").await;
    let mut missed = Vec::new();
    for i in 0..30 {
        missed.push(room_send(&c, i % 2, &amy, &room, &format!("while away {i}")).await["_id"].clone());
    }
    d.connected("bob-back", &c.chat_url(0), json!({ "token": bob.token, "cursor": cursor })).await;
    let got: Vec<Value> = d.events("bob-back", "message", 30).await.iter().map(|m| m["_id"].clone()).collect();
    assert_eq!(got, missed);
    let extra = d.quiet("bob-back", Duration::from_millis(400)).await;
    assert!(!extra.iter().any(|e| e["event"] == "message"), "nothing twice: {extra:?}");
}

/// A node that stops (SIGTERM, a rolling deploy) ends its sockets' sessions
/// and presence at once: the others hear `user-left` without waiting for
/// the presence TTL, and its clients see a transport close, on which
/// socket.io clients reconnect by themselves.
#[tokio::test]
async fn a_stopping_node_ends_its_sockets_presence_and_clients_reconnect() {
    let mut c = Cluster::start_with(2, |cfg| cfg.push.presence_ttl = std::time::Duration::from_secs(120)).await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    let room = create_room(&c, 0, &amy, "Drain").await;
    let mut d = Driver::start().await;
    d.connected("amy", &c.chat_url(0), json!({ "token": amy.token })).await;
    d.emit_ack("amy", "join-room", json!(room)).await;
    d.connected("bob", &c.chat_url(1), json!({ "token": bob.token })).await;
    d.emit_ack("bob", "join-room", json!(room)).await;
    d.next("amy", |e| e["event"] == "user-joined", "user-joined").await;
    d.connected("bob-dm", &c.socket_url(1), json!({ "token": bob.token })).await;
    d.next("bob-dm", |e| e["event"] == "synced", "synced").await;

    let stopping = c.nodes.pop().unwrap();
    let hub = stopping.sockets();
    stopping.stop().await;
    assert_eq!(hub.subscribed_users(), 0, "every session ended with the node");
    // Long before the 120 s TTL could expire it.
    let left = d.next("amy", |e| e["event"] == "user-left", "user-left from the stopping node").await;
    assert_eq!(left["data"]["user"]["_id"], json!(bob.id));
    for s in ["bob", "bob-dm"] {
        let gone = d.next(s, |e| e["type"] == "disconnect", "disconnect").await;
        assert_eq!(gone["reason"], json!("transport close"), "{s}: a reason on which clients reconnect");
    }
    let users = format!("/api/rooms/{room}/users");
    assert_eq!(c.request(0, Method::GET, &users, Some(&amy.token), None).await.ok()["count"], json!(1));
    c.stop().await;
}

crate::contract!(presence_costs_one_delta_per_present_user, 2, presence_costs_one_delta_per_present_user);

/// The socket that enters a room gets the whole list; everyone already
/// there gets one delta, never the list again (O(N) per change, not O(N²)).
async fn presence_costs_one_delta_per_present_user(c: &Cluster) {
    let users = [c.register(0, "Amy").await, c.register(1, "Bob").await, c.register(0, "Carol").await];
    let room = create_room(&c, 0, &users[0], "Delta").await;
    let mut d = Driver::start().await;
    for (i, u) in users.iter().enumerate() {
        let s = format!("s{i}");
        d.connected(&s, &c.chat_url(i), json!({ "token": u.token })).await;
        d.next(&s, |e| e["event"] == "synced", "synced").await;
        d.emit_ack(&s, "join-room", json!(room)).await;
        let list = d.next(&s, |e| e["event"] == "room-users", "room-users on entering").await;
        let ids: BTreeSet<&str> = list["data"]["users"].as_array().unwrap().iter().map(|u| u["_id"].as_str().unwrap()).collect();
        let expected: BTreeSet<&str> = users[..=i].iter().map(|u| u.id.as_str()).collect();
        assert_eq!(ids, expected, "{s} gets everyone present when it enters");
        assert!(list["data"]["users"].as_array().unwrap().iter().all(|u| u["name"].is_string()), "with names: {list}");
    }
    for (i, who) in [(0, &users[1]), (0, &users[2]), (1, &users[2])] {
        let s = format!("s{i}");
        let e = d.next(&s, |e| e["event"] == "user-joined", "user-joined").await;
        assert_eq!(e["data"]["user"]["_id"], json!(who.id), "{s}");
    }
    d.emit_ack("s2", "leave-room", json!(room)).await;
    for s in ["s0", "s1"] {
        let e = d.next(s, |e| e["event"] == "user-left", "user-left").await;
        assert_eq!(e["data"]["user"]["_id"], json!(users[2].id));
    }
    for s in ["s0", "s1", "s2"] {
        let rest = d.quiet(s, Duration::from_millis(500)).await;
        let presence: Vec<&Value> = rest.iter().filter(|e| ["room-users", "user-joined", "user-left"].contains(&e["event"].as_str().unwrap_or(""))).collect();
        assert!(presence.is_empty(), "{s}: one delta per change, no list: {presence:?}");
    }
}

/// Amy and Bob present over `/chat` in a room of Amy's, on `nodes` nodes
/// (Bob on the last) sharing a private Redis, presence TTL `ttl`.
async fn present_pair(redis: &PrivateRedis, nodes: usize, ttl: Duration) -> (Cluster, User, User, String, Driver) {
    let url = redis.url.clone();
    let c = Cluster::start_with(nodes, |cfg| {
        cfg.distributed.redis_url = Some(url.clone());
        cfg.push.presence_ttl = ttl;
    })
    .await;
    let (amy, bob) = (c.register(0, "Amy").await, c.register(nodes - 1, "Bob").await);
    let room = create_room(&c, 0, &amy, "Present").await;
    c.request(0, Method::POST, &format!("/api/rooms/{room}/join"), Some(&bob.token), None).await.ok();
    let mut d = Driver::start().await;
    for (s, u, node) in [("amy", &amy, 0), ("bob", &bob, nodes - 1)] {
        d.connected(s, &c.chat_url(node), json!({ "token": u.token })).await;
        d.emit_ack(s, "join-room", json!(room)).await;
    }
    d.next("amy", |e| e["event"] == "user-joined", "bob's user-joined").await;
    (c, amy, bob, room, d)
}

async fn flushall(redis: &PrivateRedis) {
    let mut conn = redis.client().get_multiplexed_async_connection().await.unwrap();
    redis::cmd("FLUSHALL").query_async::<()>(&mut conn).await.unwrap();
}

/// Redis losing its data (FLUSHALL) loses presence with it; the nodes'
/// next heartbeats enter their live connections again.
#[tokio::test]
async fn presence_re_forms_after_redis_loses_its_data() {
    let redis = PrivateRedis::start().await;
    let (c, amy, _bob, room, mut d) = present_pair(&redis, 2, Duration::from_millis(1500)).await;
    let users = format!("/api/rooms/{room}/users");
    let count = || async { c.request(0, Method::GET, &users, Some(&amy.token), None).await.body["count"].clone() };
    eventually("both present", || async { count().await == json!(2) }).await;

    flushall(&redis).await;
    eventually("presence to re-form", || async { count().await == json!(2) }).await;
    // Re-forming is silent: nobody left, so nobody is announced as leaving.
    let seen = d.quiet("amy", Duration::from_millis(500)).await;
    assert!(!seen.iter().any(|e| e["event"] == "user-left"), "{seen:?}");
    c.stop().await;
    redis.stop().await;
}

/// A user who leaves while Redis has lost presence (FLUSHALL, before the
/// next heartbeat re-forms it) was announced to nobody: when presence
/// re-forms, everyone present gets the list again, without them.
#[tokio::test]
async fn leaving_after_redis_lost_presence_is_settled_when_it_re_forms() {
    let redis = PrivateRedis::start().await;
    // Heartbeats every 2 s: the leave below lands before the re-forming.
    let (c, amy, bob, room, mut d) = present_pair(&redis, 1, Duration::from_secs(6)).await;
    flushall(&redis).await;
    d.emit_ack("bob", "leave-room", json!(room)).await;
    let mut present = BTreeSet::from([amy.id.clone(), bob.id.clone()]);
    while present.contains(&bob.id) {
        let e = d.next("amy", |e| ["room-users", "user-joined", "user-left"].contains(&e["event"].as_str().unwrap_or("")), "presence").await;
        apply_presence(&mut present, &e);
    }
    assert_eq!(present, BTreeSet::from([amy.id.clone()]), "amy sees herself alone");
    c.stop().await;
    redis.stop().await;
}

crate::contract!(room_messages_reach_the_members_as_of_each_message_live_and_on_replay, 2, room_messages_reach_the_members_as_of_each_message_live_and_on_replay);

/// A room message is for the members as of that message: one who left
/// gets nothing until they join again, one who joined nothing from before,
/// and a replay from the start gives each of them exactly what they got
/// live (distributed: the room's messages are stored once and addressed
/// to its members when read).
async fn room_messages_reach_the_members_as_of_each_message_live_and_on_replay(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let carol = c.register(0, "Carol").await;
    let room = create_room(&c, 0, &amy, "Comings and goings").await;
    let join = format!("/api/rooms/{room}/join");
    let leave = format!("/api/rooms/{room}/leave");
    let dave = c.register(1, "Dave").await;
    c.request(1, Method::POST, &join, Some(&bob.token), None).await.ok();
    c.request(1, Method::POST, &join, Some(&dave.token), None).await.ok();
    let mut d = Driver::start().await;
    // Dave stays a member beside Bob: Bob's node keeps the room's
    // subscription while he is out.
    d.connected("dave", &c.chat_url(1), json!({ "token": dave.token })).await;
    d.connected("bob", &c.chat_url(1), json!({ "token": bob.token })).await;
    d.connected("carol", &c.chat_url(0), json!({ "token": carol.token })).await;
    for s in ["dave", "bob", "carol"] {
        d.next(s, |e| e["event"] == "synced", "synced").await;
    }
    let m1 = room_send(&c, 0, &amy, &room, "m1 (bob in)").await["_id"].clone();
    d.events("bob", "message", 1).await;
    c.request(0, Method::POST, &leave, Some(&bob.token), None).await.ok();
    d.next("bob", |e| e["event"] == "member-left", "bob's own leave").await;
    room_send(&c, 1, &amy, &room, "m2 (bob out)").await;
    c.request(0, Method::POST, &join, Some(&carol.token), None).await.ok();
    let m3 = room_send(&c, 0, &amy, &room, "m3 (carol in)").await["_id"].clone();
    c.request(1, Method::POST, &join, Some(&bob.token), None).await.ok();
    d.next("bob", |e| e["event"] == "member-joined" && e["data"]["userId"] == json!(bob.id), "bob's own join").await;
    let m4 = room_send(&c, 1, &amy, &room, "m4 (both in)").await["_id"].clone();

    let ids = |events: Vec<Value>| events.iter().map(|m| m["_id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(d.events("dave", "message", 4).await).len(), 4, "dave: every message");
    let bob_live = ids(d.events("bob", "message", 1).await);
    assert_eq!(bob_live, [m4.clone()], "bob: nothing while he was out");
    assert_eq!(ids(d.events("carol", "message", 2).await), [m3.clone(), m4.clone()], "carol: nothing from before she joined");
    for s in ["bob", "carol"] {
        let extra = d.quiet(s, Duration::from_millis(400)).await;
        assert!(!extra.iter().any(|e| e["event"] == "message"), "{s}: nothing more: {extra:?}");
    }
    // The same from a replay, on the other node.
    for (s, user, want) in [("bob-again", &bob, vec![m1, m4.clone()]), ("carol-again", &carol, vec![m3, m4])] {
        d.connected(s, &c.chat_url(0), json!({ "token": user.token, "cursor": 0 })).await;
        d.next(s, |e| e["event"] == "synced", "synced").await;
        let replayed: Vec<Value> = d.quiet(s, Duration::ZERO).await.iter().filter(|e| e["event"] == "message").map(|e| e["data"]["_id"].clone()).collect();
        assert_eq!(replayed, want, "{s}");
    }
}

crate::contract!(a_join_and_a_second_socket_racing_the_subscription_miss_nothing, 2, a_join_and_a_second_socket_racing_the_subscription_miss_nothing);

/// Joining a room nobody on the node is in, immediately followed by a
/// room message and a direct message (the node starts listening to the
/// room meanwhile), loses neither; a user's `/` and `/chat` sockets opened
/// at once with a cursor both replay what they missed.
async fn a_join_and_a_second_socket_racing_the_subscription_miss_nothing(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let mut d = Driver::start().await;
    d.connected("bob-chat", &c.chat_url(1), json!({ "token": bob.token })).await;
    d.connected("bob-dm", &c.socket_url(1), json!({ "token": bob.token })).await;
    for s in ["bob-chat", "bob-dm"] {
        d.next(s, |e| e["event"] == "synced", "synced").await;
    }
    let mut rooms = Vec::new();
    for i in 0..5 {
        let room = create_room(&c, 0, &amy, &format!("Race {i}")).await;
        c.request(1, Method::POST, &format!("/api/rooms/{room}/join"), Some(&bob.token), None).await.ok();
        let (text, dm_text) = (format!("right after the join {i}"), format!("dm {i}"));
        let (m, dm) = tokio::join!(room_send(&c, 0, &amy, &room, &text), c.send(0, &amy, &bob, &dm_text, None));
        rooms.push((m["_id"].clone(), dm.ok()["data"]["_id"].clone()));
    }
    let ids = |events: Vec<Value>| events.iter().map(|m| m["_id"].clone()).collect::<Vec<_>>();
    let got = ids(d.events("bob-chat", "message", 5).await);
    assert_eq!(got, rooms.iter().map(|(m, _)| m.clone()).collect::<Vec<_>>(), "every room message right after its join");
    let dms = ids(d.events("bob-dm", "newMessage", 5).await);
    assert_eq!(dms, rooms.iter().map(|(_, dm)| dm.clone()).collect::<Vec<_>>());
    // The other node: both namespaces at once, from the start.
    d.connect("chat-again", &c.chat_url(0), json!({ "token": bob.token, "cursor": 0 })).await;
    d.connect("dm-again", &c.socket_url(0), json!({ "token": bob.token, "cursor": 0 })).await;
    for s in ["chat-again", "dm-again"] {
        d.next(s, |e| e["event"] == "synced", "synced").await;
    }
    let replayed: Vec<Value> = d.quiet("chat-again", Duration::ZERO).await.iter().filter(|e| e["event"] == "message").map(|e| e["data"]["_id"].clone()).collect();
    assert_eq!(replayed, got, "the /chat socket opened beside / replays every room message");
}
