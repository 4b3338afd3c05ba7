//! Reactions: participants (direct) or members (rooms) set and take back
//! emoji on a message; counts are exact and idempotent per user and emoji;
//! both sides (or the members) get `messageUpdated` with the reactions;
//! history shows them, with `me` for the caller; nobody else can react.

use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Driver;
use crate::helpers::{Cluster, User};

crate::contract!(participants_react_and_counts_stay_exact, 2, participants_react_and_counts_stay_exact);

/// The URL path of `emoji` on a message (percent-encoded).
fn on(base: &str, m: &Value, emoji: &str) -> String {
    let encoded: String = emoji.bytes().map(|b| format!("%{b:02X}")).collect();
    format!("{base}/{}/reactions/{encoded}", m["_id"].as_str().unwrap())
}

async fn put(c: &Cluster, node: usize, who: &User, path: &str) -> crate::helpers::Reply {
    c.request(node, Method::PUT, path, Some(&who.token), None).await
}

async fn participants_react_and_counts_stay_exact(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let carol = c.register(0, "Carol").await;
    let mut d = Driver::start().await;
    d.connected("amy", &c.socket_url(0), json!({ "token": amy.token })).await;
    let m = c.send(0, &amy, &bob, "lunch?", None).await.ok()["data"].clone();
    d.events("amy", "newMessage", 1).await;
    let dm = "/api/messages";

    // Bob reacts (through the other node); again is no change.
    let r = put(c, 1, &bob, &on(dm, &m, "👍")).await.ok()["data"].clone();
    assert_eq!(r["reactions"], json!({ "👍": { "count": 1, "userIds": [bob.id], "me": true } }), "{r}");
    let pushed = d.events("amy", "messageUpdated", 1).await.remove(0);
    assert_eq!(pushed["reactions"], json!({ "👍": { "count": 1, "userIds": [bob.id] } }), "a push names who, not `me`: {pushed}");
    assert_eq!(pushed["message"], json!("lunch?"));
    let head = c.log_head().await;
    put(c, 0, &bob, &on(dm, &m, "👍")).await.ok();
    assert_eq!(c.log_head().await, head, "setting what is set appends nothing");
    // Amy adds two; history shows them with `me` for each caller.
    put(c, 0, &amy, &on(dm, &m, "👍")).await.ok();
    let r = put(c, 0, &amy, &on(dm, &m, "🎉")).await.ok()["data"].clone();
    assert_eq!(r["reactions"]["👍"]["count"], json!(2));
    let mut both = vec![amy.id.clone(), bob.id.clone()];
    both.sort();
    for (node, who, me_party) in [(0, &bob, false), (1, &amy, true)] {
        let peer = if who.id == amy.id { &bob } else { &amy };
        let h = c.history(node, who, peer).await;
        let rx = &h[0]["reactions"];
        assert_eq!(rx["👍"], json!({ "count": 2, "userIds": both, "me": true }), "{rx}");
        assert_eq!(rx["🎉"]["me"], json!(me_party), "{rx}");
    }
    // Taking back: the count drops; taking back again is no change.
    let r = c.request(1, Method::DELETE, &on(dm, &m, "👍"), Some(&bob.token), None).await.ok()["data"].clone();
    assert_eq!(r["reactions"]["👍"], json!({ "count": 1, "userIds": [amy.id], "me": false }), "{r}");
    let head = c.log_head().await;
    c.request(1, Method::DELETE, &on(dm, &m, "👍"), Some(&bob.token), None).await.ok();
    assert_eq!(c.log_head().await, head);

    // Nobody else reacts; bad emoji and ids are refused; nothing appended.
    let cases = [
        (on(dm, &m, "👍"), &carol, 404),
        (on(dm, &m, "a"), &bob, 400),
        (on(dm, &m, "👍 "), &bob, 400),
        (on(dm, &m, &"👍".repeat(11)), &bob, 400),
        (on(dm, &json!({ "_id": "01a21c30-0000-7000-8000-000000000000" }), "👍"), &bob, 404),
        (on(dm, &json!({ "_id": "bad.id" }), "👍"), &bob, 404),
    ];
    for (path, who, want) in cases {
        let r = put(c, 0, who, &path).await;
        assert_eq!(r.status.as_u16(), want, "{path}: {}", r.body);
    }
    assert_eq!(c.log_head().await, head, "refusals append nothing");
    // A block refuses new reactions (taking back stays possible).
    c.request(0, Method::PUT, &format!("/api/users/{}/block", amy.id), Some(&bob.token), None).await.ok();
    let r = put(c, 1, &bob, &on(dm, &m, "❤️")).await;
    assert_eq!((r.status.as_u16(), r.body["code"].as_str()), (403, Some("blocked")), "{}", r.body);
    c.request(0, Method::DELETE, &on(dm, &m, "🎉"), Some(&amy.token), None).await.ok();
    c.request(0, Method::DELETE, &format!("/api/users/{}/block", amy.id), Some(&bob.token), None).await.ok();
    // A deleted message takes none, and shows none.
    c.request(0, Method::DELETE, &format!("{dm}/{}", m["_id"].as_str().unwrap()), Some(&amy.token), None).await.ok();
    assert_eq!(put(c, 1, &bob, &on(dm, &m, "👍")).await.status.as_u16(), 409);
    assert!(c.history(1, &bob, &amy).await[0].get("reactions").is_none());

    // Rooms: members only; the members' sockets get messageUpdated.
    let room = c.request(0, Method::POST, "/api/rooms", Some(&amy.token), Some(json!({ "name": "Algebra" }))).await.body["room"]["_id"].as_str().unwrap().to_owned();
    c.request(1, Method::POST, &format!("/api/rooms/{room}/join"), Some(&bob.token), None).await.ok();
    d.connected("bob-chat", &c.chat_url(1), json!({ "token": bob.token })).await;
    let rm = c.request(0, Method::POST, &format!("/api/rooms/{room}/messages"), Some(&amy.token), Some(json!({ "message": "page 42?" }))).await.ok()["data"].clone();
    d.events("bob-chat", "message", 1).await;
    let base = format!("/api/rooms/{room}/messages");
    let r = put(c, 0, &amy, &on(&base, &rm, "👀")).await.ok()["data"].clone();
    assert_eq!(r["reactions"], json!({ "👀": { "count": 1, "userIds": [amy.id], "me": true } }));
    let pushed = d.events("bob-chat", "messageUpdated", 1).await.remove(0);
    assert_eq!(pushed["reactions"]["👀"]["count"], json!(1), "{pushed}");
    put(c, 1, &bob, &on(&base, &rm, "👀")).await.ok();
    assert_eq!(d.events("bob-chat", "messageUpdated", 1).await.remove(0)["reactions"]["👀"]["count"], json!(2));
    let r = put(c, 0, &carol, &on(&base, &rm, "👀")).await;
    assert_eq!(r.status.as_u16(), 403, "a non-member: {}", r.body);
    // The room's next message follows the room's seq (a reaction is the
    // room subject's newest event now), and a newcomer starts read.
    let next = c.request(1, Method::POST, &format!("/api/rooms/{room}/messages"), Some(&bob.token), Some(json!({ "message": "yes" }))).await.ok()["data"].clone();
    assert_eq!(next["seq"], json!(2), "{next}");
    d.events("bob-chat", "message", 1).await;
    c.request(0, Method::POST, &format!("/api/rooms/{room}/join"), Some(&carol.token), None).await.ok();
    put(c, 0, &carol, &on(&base, &rm, "✅")).await.ok();
    d.events("bob-chat", "messageUpdated", 1).await;
    let listed = c.request(0, Method::GET, "/api/rooms", Some(&carol.token), None).await.ok();
    let unread = listed["rooms"].as_array().unwrap().iter().find(|x| x["_id"] == json!(room)).unwrap()["unread"].clone();
    assert_eq!(unread, json!(0), "carol joined after both messages");
    // A room's changes never reach the `/` namespace (amy is a member).
    let on_slash = d.quiet("amy", std::time::Duration::from_millis(300)).await;
    assert!(!on_slash.iter().any(|e| e["type"] == "event" && e["data"].get("roomId").is_some()), "{on_slash:?}");
    let h = c.request(1, Method::GET, &format!("/api/rooms/{room}/messages"), Some(&bob.token), None).await.ok();
    let h = h["messages"].as_array().or(h.as_array()).unwrap().clone();
    assert_eq!(h[0]["reactions"]["👀"]["me"], json!(true));
    // An edit's push keeps the reactions.
    c.request(0, Method::PATCH, &format!("{base}/{}", rm["_id"].as_str().unwrap()), Some(&amy.token), Some(json!({ "message": "page 43?" }))).await.ok();
    let edited = d.events("bob-chat", "messageUpdated", 1).await.remove(0);
    assert_eq!((&edited["message"], &edited["reactions"]["👀"]["count"]), (&json!("page 43?"), &json!(2)), "{edited}");

    if !c.is_embedded() {
        // A rebuild gives the same reactions.
        let before = c.request(1, Method::GET, &format!("/api/rooms/{room}/messages"), Some(&bob.token), None).await.ok();
        let out = c.natter(&["rebuild", "all"]).await;
        assert!(out.contains("mongo-views rebuilt"), "{out}");
        assert_eq!(c.request(0, Method::GET, &format!("/api/rooms/{room}/messages"), Some(&bob.token), None).await.ok(), before);
    }
}
