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
