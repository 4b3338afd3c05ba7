//! What one registered user must not get out of natter about others: their
//! email addresses, who is in rooms they are not in.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Driver;
use crate::helpers::{Cluster, User};

async fn create_room(c: &Cluster, owner: &User, name: &str) -> String {
    let r = c.request(0, Method::POST, "/api/rooms", Some(&owner.token), Some(json!({ "name": name }))).await;
    assert_eq!(r.status.as_u16(), 201, "{}", r.body);
    r.body["room"]["_id"].as_str().unwrap().to_owned()
}

crate::contract!(the_directory_serves_nobody_elses_email, 2, the_directory_serves_nobody_elses_email);

async fn the_directory_serves_nobody_elses_email(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let listed = c.request(1, Method::GET, "/api/users?limit=500", Some(&bob.token), None).await.ok();
    let users = listed["users"].as_array().unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0]["_id"], json!(amy.id));
    assert_eq!(users[0]["name"], json!("Amy"));
    assert!(users[0].get("email").is_none(), "another user's email is never served: {}", users[0]);
    // Amy's own answers do carry her address.
    let login = c.request(0, Method::POST, "/api/auth/login", None, Some(json!({ "email": amy.email, "password": "password123" }))).await.ok();
    assert_eq!(login["user"]["email"], json!(amy.email));
}

crate::contract!(who_is_in_a_room_is_for_its_members_only, 2, who_is_in_a_room_is_for_its_members_only);

async fn who_is_in_a_room_is_for_its_members_only(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let room = create_room(c, &amy, "Private talk").await;
    let mut d = Driver::start().await;
    d.connected("amy", &c.chat_url(0), json!({ "token": amy.token })).await;
    assert_eq!(d.emit_ack("amy", "join-room", json!(room)).await["success"], json!(true));

    let room_in = |listing: &Value| listing["rooms"].as_array().unwrap().iter().find(|r| r["_id"] == json!(room)).cloned().unwrap();
    let amy_sees = room_in(&c.request(0, Method::GET, "/api/rooms", Some(&amy.token), None).await.ok());
    assert_eq!(amy_sees["activeUsers"], json!(1), "{amy_sees}");
    let bob_sees = room_in(&c.request(1, Method::GET, "/api/rooms", Some(&bob.token), None).await.ok());
    assert_eq!(bob_sees["isMember"], json!(false));
    assert!(bob_sees.get("activeUsers").is_none(), "a non-member does not see who is present: {bob_sees}");
    let users = c.request(1, Method::GET, &format!("/api/rooms/{room}/users"), Some(&bob.token), None).await;
    assert_eq!(users.status.as_u16(), 403, "{}", users.body);
}

crate::contract!(leaving_a_room_over_rest_ends_the_sockets_presence_there, 2, leaving_a_room_over_rest_ends_the_sockets_presence_there);

/// Bob's socket entered the room; Bob then leaves its membership over REST
/// (through another node): the others see him go, and his socket gets the
/// room's presence no more.
async fn leaving_a_room_over_rest_ends_the_sockets_presence_there(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let carol = c.register(0, "Carol").await;
    let room = create_room(c, &amy, "Chem").await;
    let mut d = Driver::start().await;
    for (s, node, u) in [("amy", 0, &amy), ("bob", 1, &bob)] {
        d.connected(s, &c.chat_url(node), json!({ "token": u.token })).await;
        d.next(s, |e| e["event"] == "synced", "synced").await;
        assert_eq!(d.emit_ack(s, "join-room", json!(room)).await["success"], json!(true));
        d.next(s, |e| e["event"] == "room-users", "the list on entering").await;
    }
    d.next("amy", |e| e["event"] == "user-joined" && e["data"]["user"]["_id"] == json!(bob.id), "bob's user-joined").await;

    c.request(0, Method::POST, &format!("/api/rooms/{room}/leave"), Some(&bob.token), None).await.ok();
    let left = d.next("amy", |e| e["event"] == "user-left", "bob's user-left").await;
    assert_eq!(left["data"]["user"]["_id"], json!(bob.id));
    let users = c.request(0, Method::GET, &format!("/api/rooms/{room}/users"), Some(&amy.token), None).await.ok();
    assert_eq!(users["count"], json!(1), "{users}");

    // Carol enters: Amy hears it, Bob's socket does not.
    d.connected("carol", &c.chat_url(0), json!({ "token": carol.token })).await;
    assert_eq!(d.emit_ack("carol", "join-room", json!(room)).await["success"], json!(true));
    d.next("amy", |e| e["event"] == "user-joined" && e["data"]["user"]["_id"] == json!(carol.id), "carol's user-joined").await;
    let bob_got = d.quiet("bob", Duration::from_millis(500)).await;
    let presence: Vec<&Value> = bob_got.iter().filter(|e| ["room-users", "user-joined", "user-left"].contains(&e["event"].as_str().unwrap_or(""))).collect();
    assert!(presence.is_empty(), "bob left the room: no presence of it for him: {presence:?}");
}

/// CORS: a page on an allowed origin may call the API and open a
/// Socket.IO long-polling session; another origin gets no CORS headers
/// (the browser then refuses it); with nothing configured, none at all.
#[tokio::test]
async fn browsers_on_the_configured_origins_only_may_call_natter() {
    let c = Cluster::start_with(1, |cfg| cfg.server.cors_origins = "http://app.example:3000, https://chat.example".into()).await;
    let http = reqwest::Client::new();
    let allowed = |r: &reqwest::Response| r.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_owned());
    let preflight = |origin: &str, path: &str| {
        http.request(Method::OPTIONS, c.url(0, path))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "authorization, content-type")
            .send()
    };
    let ok = preflight("http://app.example:3000", "/api/auth/login").await.unwrap();
    assert!(ok.status().is_success(), "{}", ok.status());
    assert_eq!(allowed(&ok).as_deref(), Some("http://app.example:3000"));
    let methods = ok.headers().get("access-control-allow-methods").unwrap().to_str().unwrap().to_owned();
    assert!(methods.contains("POST") && methods.contains("PATCH"), "{methods}");
    let headers = ok.headers().get("access-control-allow-headers").unwrap().to_str().unwrap().to_lowercase();
    assert!(headers.contains("authorization") && headers.contains("content-type"), "{headers}");
    assert_eq!(allowed(&preflight("http://evil.example", "/api/auth/login").await.unwrap()), None, "another origin");

    // A real request and an error answer carry the header too.
    let amy = c.register(0, "Amy").await;
    let listed = http.get(c.url(0, "/api/users")).header("Origin", "https://chat.example").bearer_auth(&amy.token).send().await.unwrap();
    assert_eq!(allowed(&listed).as_deref(), Some("https://chat.example"));
    let refused = http.get(c.url(0, "/api/users")).header("Origin", "https://chat.example").send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    assert_eq!(allowed(&refused).as_deref(), Some("https://chat.example"), "the browser can read the refusal");
    // Socket.IO's long-polling handshake.
    let polling = http.get(c.url(0, "/socket.io/?EIO=4&transport=polling")).header("Origin", "http://app.example:3000").send().await.unwrap();
    assert!(polling.status().is_success(), "{}", polling.status());
    assert_eq!(allowed(&polling).as_deref(), Some("http://app.example:3000"));
    c.stop().await;

    let plain = Cluster::embedded().await;
    let r = http.get(plain.url(0, "/api/users")).header("Origin", "http://app.example:3000").send().await.unwrap();
    assert_eq!(allowed(&r), None, "same origin only unless configured");
    plain.stop().await;
}

fn limited(r: &crate::helpers::Reply) -> bool {
    r.status.as_u16() == 429 && r.body["code"] == json!("rate_limited")
}

crate::contract!(
    failed_logins_lock_the_account_and_attempts_are_limited_per_address_across_nodes,
    2,
    |cfg| {
        cfg.limits.login_failures = 3;
        cfg.limits.login_per_min = 8;
    },
    failed_logins_lock_the_account_and_attempts_are_limited_per_address_across_nodes
);

/// Three failed logins for Amy, through both nodes: the next attempt, even
/// with her password, is refused (429 with Retry-After) on every node,
/// while Bob still logs in; then the address runs out of attempts.
async fn failed_logins_lock_the_account_and_attempts_are_limited_per_address_across_nodes(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let login = |node: usize, email: &str, password: &str| {
        c.request(node, Method::POST, "/api/auth/login", None, Some(json!({ "email": email, "password": password })))
    };
    for node in [0, 1, 0] {
        assert_eq!(login(node, &amy.email, "wrong-password").await.status.as_u16(), 401);
    }
    for node in [1, 0] {
        let r = login(node, &amy.email, "password123").await;
        assert!(limited(&r), "node {node}: {} {}", r.status, r.body);
    }
    assert_eq!(login(1, &bob.email, "password123").await.status.as_u16(), 200, "other accounts log in");
    // Eight attempts from this address so far (the two logins after
    // registering, and refused ones count): the ninth is over the minute's limit.
    let r = login(0, &bob.email, "password123").await;
    assert!(limited(&r), "{} {}", r.status, r.body);
}

crate::contract!(
    sends_room_changes_and_registrations_are_limited_and_refusals_change_nothing,
    1,
    |cfg| {
        cfg.limits.sends_per_sec = 2;
        cfg.limits.room_changes_per_min = 2;
        cfg.limits.register_per_hour = 3;
    },
    sends_room_changes_and_registrations_are_limited_and_refusals_change_nothing
);

async fn sends_room_changes_and_registrations_are_limited_and_refusals_change_nothing(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    // Two a second with a burst of four: refused within a few sends (only
    // a machine taking over a quarter of a second per send could keep up).
    let mut refused = false;
    for i in 0..40 {
        let head = c.log_head().await;
        let r = c.send(0, &amy, &bob, &format!("m{i}"), None).await;
        if limited(&r) {
            assert_eq!(c.log_head().await, head, "a refused send appends nothing");
            refused = true;
            break;
        }
        assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    }
    assert!(refused, "sends over the limit are refused");
    assert_eq!(c.send(0, &bob, &amy, "bob has his own budget", None).await.status.as_u16(), 200);

    let room = create_room(c, &amy, "R").await;
    let join = c.request(0, Method::POST, &format!("/api/rooms/{room}/join"), Some(&bob.token), None).await;
    assert_eq!(join.status.as_u16(), 200);
    let second = c.request(0, Method::POST, &format!("/api/rooms/{room}/leave"), Some(&bob.token), None).await;
    assert_eq!(second.status.as_u16(), 200);
    let third = c.request(0, Method::POST, &format!("/api/rooms/{room}/join"), Some(&bob.token), None).await;
    assert!(limited(&third), "{} {}", third.status, third.body);

    c.register(0, "Carol").await; // the third registration from this address
    let r = c
        .request(0, Method::POST, "/api/auth/register", None, Some(json!({ "name": "Dan", "email": "dan@example.com", "password": "password123" })))
        .await;
    assert!(limited(&r), "{} {}", r.status, r.body);
}

/// A refusal says when to retry; a flood of logins is answered at once
/// (503 `busy` once the password checks' queue is full) rather than queued
/// without bound. The flood runs against a node of its own process: the
/// password checks are per process, and this test must not starve the
/// others' registrations.
#[tokio::test]
async fn refusals_say_when_to_retry_and_a_login_flood_is_shed() {
    let c = Cluster::start_with(1, |cfg| cfg.limits.sends_per_sec = 1).await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    let http = reqwest::Client::new();
    // One a second with a burst of two: refused within a few sends (only a
    // machine taking over half a second per send could keep up).
    let mut over = None;
    for _ in 0..40 {
        let r = http.post(c.url(0, &format!("/api/messages/{}", bob.id))).bearer_auth(&amy.token).json(&json!({ "message": "hi" })).send().await.unwrap();
        if r.status().as_u16() == 429 {
            over = Some(r);
            break;
        }
        assert!(r.status().is_success(), "{}", r.status());
    }
    let over = over.expect("sends over the limit are refused");
    let retry: u64 = over.headers().get("retry-after").expect("Retry-After").to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");

    let node = c.spawn_process_with(&[("NATTER_LOGIN_PER_MIN", "0"), ("NATTER_LOGIN_FAILURES", "0")]).await;
    let flood = (0..300).map(|i| {
        http.post(format!("{}/api/auth/login", node.url)).json(&json!({ "email": format!("nobody{i}@example.com"), "password": "password123" })).send()
    });
    let answers = futures::future::join_all(flood).await;
    let mut busy = 0;
    for a in answers {
        let a = a.unwrap();
        match a.status().as_u16() {
            401 => {}
            503 => {
                assert!(a.headers().contains_key("retry-after"));
                assert_eq!(a.json::<Value>().await.unwrap()["code"], json!("busy"));
                busy += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(busy > 0, "300 logins at once: those beyond the slots and the queue of 64 are shed");
    // Shed, not wedged: a login goes through afterwards.
    let ok = http.post(format!("{}/api/auth/login", node.url)).json(&json!({ "email": amy.email, "password": "password123" })).send().await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    drop(node);
    c.stop().await;
}

crate::contract!(
    sockets_are_capped_per_user_and_per_address_and_rooms_and_syncs_per_socket,
    1,
    |cfg| {
        cfg.limits.sockets_per_user = 2;
        cfg.limits.sockets_per_ip = 4;
        cfg.limits.rooms_per_socket = 2;
        cfg.limits.syncs_per_min = 2;
    },
    sockets_are_capped_per_user_and_per_address_and_rooms_and_syncs_per_socket
);

async fn sockets_are_capped_per_user_and_per_address_and_rooms_and_syncs_per_socket(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    let carol = c.register(0, "Carol").await;
    let mut d = Driver::start().await;
    d.connected("amy-1", &c.chat_url(0), json!({ "token": amy.token })).await;
    d.connected("amy-2", &c.socket_url(0), json!({ "token": amy.token })).await;
    d.connect("amy-3", &c.chat_url(0), json!({ "token": amy.token })).await;
    let refused = d.next("amy-3", |e| e["type"] == "connect_error" || e["type"] == "connect", "amy's third socket").await;
    assert_eq!(refused["type"], json!("connect_error"), "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("too many sockets for this user"), "{refused}");
    d.connected("bob-1", &c.chat_url(0), json!({ "token": bob.token })).await;
    d.connected("bob-2", &c.chat_url(0), json!({ "token": bob.token })).await;
    d.connect("carol-1", &c.chat_url(0), json!({ "token": carol.token })).await;
    let refused = d.next("carol-1", |e| e["type"] == "connect_error" || e["type"] == "connect", "carol's socket").await;
    assert!(refused["message"].as_str().unwrap_or("").contains("from this address"), "four sockets from this address already: {refused}");

    // Rooms per socket.
    let rooms = [create_room(c, &amy, "R1").await, create_room(c, &amy, "R2").await, create_room(c, &amy, "R3").await];
    for room in &rooms[..2] {
        assert_eq!(d.emit_ack("amy-1", "join-room", json!(room)).await["success"], json!(true));
    }
    let third = d.emit_ack("amy-1", "join-room", json!(rooms[2])).await;
    assert_eq!(third["code"], json!("too_many_rooms"), "{third}");
    d.emit_ack("amy-1", "leave-room", json!(rooms[0])).await;
    assert_eq!(d.emit_ack("amy-1", "join-room", json!(rooms[2])).await["success"], json!(true), "after leaving one");

    // `sync` replays per minute.
    for _ in 0..2 {
        d.emit("amy-2", "sync", json!({ "cursor": 0 })).await;
        d.next("amy-2", |e| e["event"] == "synced", "synced").await;
    }
    d.emit("amy-2", "sync", json!({ "cursor": 0 })).await;
    let e = d.next("amy-2", |e| e["event"] == "error", "the third sync refused").await;
    assert_eq!(e["data"]["code"], json!("rate_limited"), "{e}");

    // A closed socket gives its place back.
    d.disconnect("amy-1").await;
    // Polled (a fresh socket each try; a refused one leaves nothing
    // behind) until the server has seen the close, with a deadline.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let id = format!("amy-again-{attempt}");
        d.connect(&id, &c.chat_url(0), json!({ "token": amy.token })).await;
        let e = d.next(&id, |e| e["type"] == "connect_error" || e["type"] == "connect", "amy again").await;
        if e["type"] == "connect" {
            break;
        }
        assert!(attempt < 100, "amy's closed socket never gave its place back: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

crate::contract!(an_old_leave_replayed_from_a_cursor_does_not_undo_a_later_join, 1, an_old_leave_replayed_from_a_cursor_does_not_undo_a_later_join);

/// Bob left the room and joined it again; his socket enters it, then asks
/// for a replay from the start (`sync {cursor: 0}`), which carries the old
/// `member-left`: he stays in the room's presence.
async fn an_old_leave_replayed_from_a_cursor_does_not_undo_a_later_join(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    let carol = c.register(0, "Carol").await;
    let room = create_room(c, &amy, "Again").await;
    for action in ["join", "leave", "join"] {
        c.request(0, Method::POST, &format!("/api/rooms/{room}/{action}"), Some(&bob.token), None).await.ok();
    }
    let mut d = Driver::start().await;
    d.connected("bob", &c.chat_url(0), json!({ "token": bob.token })).await;
    d.next("bob", |e| e["event"] == "synced", "synced").await;
    assert_eq!(d.emit_ack("bob", "join-room", json!(room)).await["success"], json!(true));
    d.emit("bob", "sync", json!({ "cursor": 0 })).await;
    let left = d.next("bob", |e| e["event"] == "member-left", "the old member-left, replayed").await;
    assert_eq!(left["data"]["userId"], json!(bob.id));
    d.next("bob", |e| e["event"] == "synced", "synced after the replay").await;
    // Still present: Carol's entry reaches Bob, and the room counts him.
    d.connected("carol", &c.chat_url(0), json!({ "token": carol.token })).await;
    assert_eq!(d.emit_ack("carol", "join-room", json!(room)).await["success"], json!(true));
    d.next("bob", |e| e["event"] == "user-joined" && e["data"]["user"]["_id"] == json!(carol.id), "carol's user-joined").await;
    let users = c.request(0, Method::GET, &format!("/api/rooms/{room}/users"), Some(&amy.token), None).await.ok();
    assert_eq!(users["count"], json!(2), "bob and carol: {users}");
}
