//! Replies: a message (direct or in a room, over REST or `/chat`) may answer
//! an earlier message of the same conversation; it carries `replyTo` (the
//! answered `_id` and a short preview) in its answer, pushes and history.
//! Answering a message of any other conversation is a 400 and appends
//! nothing.

use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Driver;
use crate::helpers::Cluster;

crate::contract!(a_reply_carries_what_it_answers_and_only_within_its_conversation, 2, a_reply_carries_what_it_answers_and_only_within_its_conversation);

fn reply_body(text: &str, reply_to: &Value, key: Option<&str>) -> Value {
    let mut body = json!({ "message": text, "replyTo": reply_to });
    if let Some(k) = key {
        body["clientMsgId"] = json!(k);
    }
    body
}

async fn a_reply_carries_what_it_answers_and_only_within_its_conversation(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let carol = c.register(0, "Carol").await;
    let question = c.send(0, &amy, &bob, "are you coming tonight?", None).await.ok()["data"].clone();
    let long = "x".repeat(200);
    let long_one = c.send(0, &amy, &bob, &long, None).await.ok()["data"].clone();
    let elsewhere = c.send(0, &amy, &carol, "for carol", None).await.ok()["data"].clone();

    let mut d = Driver::start().await;
    d.connected("amy", &c.socket_url(0), json!({ "token": amy.token })).await;

    // A direct reply, through the other node.
    let r = c.request(1, Method::POST, &format!("/api/messages/{}", amy.id), Some(&bob.token), Some(reply_body("yes!", &question["_id"], Some("r1")))).await;
    let reply = r.ok()["data"].clone();
    assert_eq!(reply["replyTo"], json!({ "_id": question["_id"], "preview": "are you coming tonight?" }), "{reply}");
    assert_eq!(reply["seq"], json!(3));
    let pushed = d.events("amy", "newMessage", 1).await.remove(0);
    assert_eq!(pushed["replyTo"], reply["replyTo"], "the push carries it");
    let history = c.history(0, &amy, &bob).await;
    assert_eq!(history.last().unwrap()["replyTo"], reply["replyTo"], "and the history");
    // A long message's preview is its start.
    let r = c.request(0, Method::POST, &format!("/api/messages/{}", amy.id), Some(&bob.token), Some(reply_body("long indeed", &long_one["_id"], None))).await;
    let preview = r.ok()["data"]["replyTo"]["preview"].as_str().unwrap().to_owned();
    assert_eq!(preview.chars().count(), 81, "{preview}");
    assert!(preview.starts_with("xxxx") && preview.ends_with('…'));
    // A retry is the original; the same key answering something else is a conflict.
    let again = c.request(0, Method::POST, &format!("/api/messages/{}", amy.id), Some(&bob.token), Some(reply_body("yes!", &question["_id"], Some("r1")))).await;
    assert_eq!(again.ok()["data"]["_id"], reply["_id"]);
    let other = c.request(0, Method::POST, &format!("/api/messages/{}", amy.id), Some(&bob.token), Some(reply_body("yes!", &long_one["_id"], Some("r1")))).await;
    assert_eq!(other.status.as_u16(), 409, "{}", other.body);

    // Answering another conversation's message, an unknown one or a bad id: 400, nothing stored.
    let head = c.log_head().await;
    for (node, target) in [(0, elsewhere["_id"].clone()), (1, json!("01a21c30-0000-7000-8000-000000000000")), (0, json!("bad.id")), (1, json!(5))] {
        let r = c.request(node, Method::POST, &format!("/api/messages/{}", amy.id), Some(&bob.token), Some(reply_body("hm", &target, None))).await;
        assert!(r.status.as_u16() == 400 || r.status.as_u16() == 422, "{target}: {} {}", r.status, r.body);
    }
    assert_eq!(c.log_head().await, head, "refused replies append nothing");

    // Rooms: over REST and over /chat.
    let room = c.request(0, Method::POST, "/api/rooms", Some(&amy.token), Some(json!({ "name": "Algebra" }))).await.body["room"]["_id"].clone();
    let other_room = c.request(0, Method::POST, "/api/rooms", Some(&carol.token), Some(json!({ "name": "Poetry" }))).await.body["room"]["_id"].clone();
    let room = room.as_str().unwrap().to_owned();
    c.request(1, Method::POST, &format!("/api/rooms/{room}/join"), Some(&bob.token), None).await.ok();
    let posted = c.request(0, Method::POST, &format!("/api/rooms/{room}/messages"), Some(&amy.token), Some(json!({ "message": "page 42?" }))).await.ok()["data"].clone();
    let poem = c.request(0, Method::POST, &format!("/api/rooms/{}/messages", other_room.as_str().unwrap()), Some(&carol.token), Some(json!({ "message": "a poem" }))).await.ok()["data"].clone();
    let r = c.request(1, Method::POST, &format!("/api/rooms/{room}/messages"), Some(&bob.token), Some(reply_body("the proof?", &posted["_id"], None))).await;
    assert_eq!(r.ok()["data"]["replyTo"], json!({ "_id": posted["_id"], "preview": "page 42?" }));
    d.connected("bob-chat", &c.chat_url(1), json!({ "token": bob.token })).await;
    let ack = d.emit_ack("bob-chat", "send-message", json!({ "roomId": room, "message": "over the socket", "replyTo": posted["_id"] })).await;
    assert_eq!(ack["success"], json!(true), "{ack}");
    let history = c.request(0, Method::GET, &format!("/api/rooms/{room}/messages"), Some(&amy.token), None).await.ok();
    let last = history["messages"].as_array().or(history.as_array()).unwrap().last().unwrap().clone();
    assert_eq!(last["replyTo"]["_id"], posted["_id"], "{last}");
    let head = c.log_head().await;
    for target in [poem["_id"].clone(), question["_id"].clone()] {
        let r = c.request(1, Method::POST, &format!("/api/rooms/{room}/messages"), Some(&bob.token), Some(reply_body("nope", &target, None))).await;
        assert_eq!(r.status.as_u16(), 400, "{target}: {}", r.body);
        let ack = d.emit_ack("bob-chat", "send-message", json!({ "roomId": room, "message": "nope", "replyTo": target })).await;
        assert_eq!(ack["success"], json!(false), "{ack}");
    }
    assert_eq!(c.log_head().await, head, "refused room replies append nothing");
}
