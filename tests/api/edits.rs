//! Edit and delete for everyone: only a message's sender may change it; the
//! message keeps its `_id` and `seq`; both sides get `messageUpdated` /
//! `messageDeleted` in order with the other deliveries; a deleted message
//! is a tombstone in every history and replay, and stops counting as unseen.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Driver;
use crate::helpers::{Cluster, eventually};

crate::contract!(a_sender_edits_and_deletes_their_messages_and_nobody_else_can, 2, a_sender_edits_and_deletes_their_messages_and_nobody_else_can);

/// Whether any delivery kept in the distributed inbox stream holds `text`
/// (false for an embedded node, whose kept deliveries the replay shows).
async fn inbox_holds(c: &Cluster, text: &str) -> bool {
    if c.is_embedded() {
        return false;
    }
    let stream = c.nats().jetstream().get_stream(format!("{}_INBOX", c.cfg.distributed.stream)).await.unwrap();
    let mut info = stream.clone();
    let state = info.info().await.unwrap().state.clone();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            if String::from_utf8_lossy(&m.payload).contains(text) {
                return true;
            }
        }
    }
    false
}

/// Whether any document of the MongoDB views holds `text` (false for an
/// embedded node, whose views the REST answers show).
async fn views_hold(c: &Cluster, text: &str) -> bool {
    if c.is_embedded() {
        return false;
    }
    use futures::TryStreamExt;
    let db = natter::distributed::connect_mongo(c.cfg.distributed.mongo_url.as_deref().unwrap(), &c.cfg.distributed.mongo_db).await.unwrap();
    for name in db.list_collection_names().await.unwrap() {
        let docs: Vec<mongodb::bson::Document> = db.collection(&name).find(mongodb::bson::doc! {}).await.unwrap().try_collect().await.unwrap();
        if docs.iter().any(|d| d.to_string().contains(text)) {
            return true;
        }
    }
    false
}

fn without_cursor(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("cursor");
    v
}

async fn a_sender_edits_and_deletes_their_messages_and_nobody_else_can(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let carol = c.register(0, "Carol").await;
    let mut d = Driver::start().await;
    d.connected("bob", &c.socket_url(1), json!({ "token": bob.token })).await;
    d.connected("amy", &c.socket_url(0), json!({ "token": amy.token })).await;
    let first = c.send(0, &amy, &bob, "see you at 5", Some("k1")).await.ok()["data"].clone();
    let second = c.send(0, &amy, &bob, "a secret", None).await.ok()["data"].clone();
    let third = c.send(1, &amy, &bob, "third: at the pier", None).await.ok()["data"].clone();
    let pushed = d.events("bob", "newMessage", 3).await;
    let before_changes = pushed[0]["cursor"].as_u64().unwrap();
    assert_eq!(c.unseen_from(0, &bob, &amy).await, 3);
    let msg = |m: &Value| format!("/api/messages/{}", m["_id"].as_str().unwrap());

    // Edit, through the other node: same _id and seq, new text, editedAt.
    let r = c.request(1, Method::PATCH, &msg(&first), Some(&amy.token), Some(json!({ "message": "see you at 6" }))).await;
    let edited = r.ok()["data"].clone();
    assert_eq!((&edited["_id"], &edited["seq"], &edited["message"]), (&first["_id"], &json!(1), &json!("see you at 6")), "{edited}");
    assert!(edited["editedAt"].is_string() && edited["updatedAt"] == edited["editedAt"], "{edited}");
    assert_eq!(edited["createdAt"], first["createdAt"]);
    for who in ["bob", "amy"] {
        let update = d.events(who, "messageUpdated", 1).await.remove(0);
        assert_eq!(without_cursor(update), edited, "{who} gets the whole message as REST returned it");
    }
    // A retry of the original send answers the message as it now reads.
    let retry = c.send(1, &amy, &bob, "see you at 5", Some("k1")).await.ok()["data"].clone();
    assert_eq!((&retry["_id"], &retry["message"]), (&first["_id"], &json!("see you at 6")));

    // Nobody else edits or deletes; bad input changes nothing.
    let head = c.log_head().await;
    let unknown = "/api/messages/01a21c30-0000-7000-8000-000000000000";
    let cases: Vec<(Method, String, &str, Option<Value>, u16)> = vec![
        (Method::PATCH, msg(&first), bob.token.as_str(), Some(json!({ "message": "mine now" })), 403),
        (Method::DELETE, msg(&first), bob.token.as_str(), None, 403),
        (Method::PATCH, msg(&first), carol.token.as_str(), Some(json!({ "message": "hi" })), 404),
        (Method::DELETE, msg(&second), carol.token.as_str(), None, 404),
        (Method::PATCH, unknown.to_owned(), amy.token.as_str(), Some(json!({ "message": "x" })), 404),
        (Method::DELETE, "/api/messages/bad.id".to_owned(), amy.token.as_str(), None, 404),
        (Method::PATCH, msg(&first), amy.token.as_str(), Some(json!({ "message": "   " })), 400),
        (Method::PATCH, msg(&first), amy.token.as_str(), Some(json!({ "message": "x".repeat(4001) })), 400),
        (Method::PATCH, msg(&first), amy.token.as_str(), Some(json!({})), 400),
        (Method::PATCH, msg(&first), amy.token.as_str(), Some(json!({ "message": 5 })), 422),
    ];
    for (method, path, token, body, want) in cases {
        let r = c.request(0, method.clone(), &path, Some(token), body).await;
        assert_eq!(r.status.as_u16(), want, "{method} {path}: {}", r.body);
        assert_eq!(r.body["success"], json!(false));
    }
    // The same text again is no change.
    c.request(0, Method::PATCH, &msg(&first), Some(&amy.token), Some(json!({ "message": "see you at 6" }))).await.ok();
    assert_eq!(c.log_head().await, head, "refusals and no-ops append nothing");

    // Delete the unseen second message: a tombstone that keeps its seq, and
    // bob's unseen count drops at once.
    let r = c.request(1, Method::DELETE, &msg(&second), Some(&amy.token), None).await;
    let gone = r.ok()["data"].clone();
    assert_eq!((&gone["_id"], &gone["seq"], &gone["deleted"]), (&second["_id"], &json!(2), &json!(true)), "{gone}");
    assert!(gone.get("message").is_none() && gone.get("attachment").is_none(), "{gone}");
    for who in ["bob", "amy"] {
        let pushed = d.events(who, "messageDeleted", 1).await.remove(0);
        assert_eq!(without_cursor(pushed), gone, "{who}");
    }
    eventually("bob's unseen count drops to 2", || async { c.unseen_from(1, &bob, &amy).await == 2 }).await;
    let head = c.log_head().await;
    assert_eq!(c.request(0, Method::DELETE, &msg(&second), Some(&amy.token), None).await.ok()["data"], gone, "deleting again is the same");
    let r = c.request(0, Method::PATCH, &msg(&second), Some(&amy.token), Some(json!({ "message": "back" }))).await;
    assert_eq!(r.status.as_u16(), 409, "{}", r.body);
    assert_eq!(c.log_head().await, head);

    // Resume from before the changes: every delivery once, in order, and
    // the deleted message's content nowhere.
    d.connected("bob-later", &c.socket_url(0), json!({ "token": bob.token, "cursor": before_changes })).await;
    d.next("bob-later", |e| e["event"] == "synced", "synced").await;
    d.quiet("bob-later", Duration::from_millis(300)).await;
    let replayed: Vec<(String, Value)> = d
        .all
        .iter()
        .filter(|e| e["id"] == "bob-later" && e["type"] == "event" && e["event"] != "synced")
        .map(|e| (e["event"].as_str().unwrap().to_owned(), e["data"]["_id"].clone()))
        .collect();
    // The deleted message's own delivery is gone from the inbox
    // (distributed), or kept as its tombstone (embedded, in memory).
    let shown_deleted = replayed.first() == Some(&("newMessage".to_owned(), second["_id"].clone()));
    let replayed = if shown_deleted { replayed[1..].to_vec() } else { replayed };
    let want = vec![
        ("newMessage".to_owned(), third["_id"].clone()),
        ("messageUpdated".to_owned(), first["_id"].clone()),
        ("messageDeleted".to_owned(), second["_id"].clone()),
    ];
    assert_eq!(replayed, want);
    let all = serde_json::to_string(&d.all.iter().filter(|e| e["id"] == "bob-later").collect::<Vec<_>>()).unwrap();
    assert!(!all.contains("a secret"), "the deleted text is not replayed: {all}");
    eventually("the inbox stream keeps no deleted text", || async { !inbox_holds(c, "a secret").await }).await;
    if !c.is_embedded() {
        // Its erase job was done and acknowledged (a work queue keeps none).
        let jobs = c.nats().jetstream().get_stream(format!("{}_ERASE", c.cfg.distributed.stream)).await.unwrap();
        eventually("the erase job acknowledged", || async { jobs.get_info().await.unwrap().state.messages == 0 }).await;
    }

    // History (either node): the edit, the tombstone, no gap.
    for node in [0, 1] {
        let h = c.request(node, Method::GET, &format!("/api/messages/{}?limit=10", bob.id), Some(&amy.token), None).await.ok();
        let h = h.as_array().unwrap().clone();
        assert_eq!(h.iter().map(|m| m["seq"].clone()).collect::<Vec<_>>(), vec![json!(1), json!(2), json!(3)]);
        assert_eq!(h[0]["message"], json!("see you at 6"));
        assert_eq!(h[1], json!({ "_id": second["_id"], "senderId": amy.id, "receiverId": bob.id, "seen": false, "seq": 2,
            "createdAt": second["createdAt"], "updatedAt": second["createdAt"], "deleted": true }), "node {node}");
    }
    // Reading past the tombstone counts right: bob marks the third seen.
    c.request(0, Method::PATCH, &format!("{}/seen", msg(&third)), Some(&bob.token), None).await.ok();
    eventually("bob has nothing unseen", || async { c.unseen_from(0, &bob, &amy).await == 0 }).await;
    // Bob answers the third; replying to a deleted message is refused.
    let body = json!({ "message": "see you", "replyTo": third["_id"] });
    let reply = c.request(1, Method::POST, &format!("/api/messages/{}", amy.id), Some(&bob.token), Some(body)).await.ok()["data"].clone();
    let body = json!({ "message": "what?", "replyTo": second["_id"] });
    let r = c.request(0, Method::POST, &format!("/api/messages/{}", amy.id), Some(&bob.token), Some(body)).await;
    assert_eq!(r.status.as_u16(), 409, "{}", r.body);
    // Deleting a message bob has read changes no count; the sender deletes
    // from the other node; the reply no longer shows its text.
    c.request(1, Method::DELETE, &msg(&third), Some(&amy.token), None).await.ok();
    let later = c.send(1, &amy, &bob, "one more", None).await.ok()["data"].clone();
    assert_eq!(later["seq"], json!(5), "a deletion takes no seq");
    assert_eq!(reply["replyTo"], json!({ "_id": third["_id"], "preview": "third: at the pier" }), "{reply}");
    let h = c.history(0, &amy, &bob).await;
    let shown = h.iter().find(|m| m["_id"] == reply["_id"]).unwrap();
    assert_eq!(shown["replyTo"], json!({ "_id": third["_id"], "preview": "", "deleted": true }), "{shown}");
    // Its text is stored nowhere any more: not in the reply's view or its
    // deliveries (which never held a preview), not in its own.
    eventually("no view or delivery keeps the deleted text", || async {
        !inbox_holds(c, "at the pier").await && !views_hold(c, "at the pier").await
    })
    .await;
    eventually("bob has one unseen", || async { c.unseen_from(0, &bob, &amy).await == 1 }).await;
    if !c.is_embedded() {
        // A rebuild serves exactly the same: edited text, tombstones, counts.
        let history = c.history(1, &amy, &bob).await;
        let out = c.natter(&["rebuild", "all"]).await;
        assert!(out.contains("mongo-views rebuilt") && out.contains("redis-unseen rebuilt"), "{out}");
        assert_eq!(c.history(0, &amy, &bob).await, history);
        assert_eq!(c.unseen_from(0, &bob, &amy).await, 1);
        let all = serde_json::to_string(&history).unwrap();
        assert!(!all.contains("a secret") && !all.contains("at the pier"), "{all}");
    }
}

crate::contract!(a_room_message_is_edited_and_deleted_by_its_sender_only, 2, a_room_message_is_edited_and_deleted_by_its_sender_only);

async fn a_room_message_is_edited_and_deleted_by_its_sender_only(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let carol = c.register(0, "Carol").await;
    let room = c.request(0, Method::POST, "/api/rooms", Some(&amy.token), Some(json!({ "name": "Algebra" }))).await.body["room"]["_id"].as_str().unwrap().to_owned();
    c.request(1, Method::POST, &format!("/api/rooms/{room}/join"), Some(&bob.token), None).await.ok();
    let dave = c.register(1, "Dave").await;
    c.request(1, Method::POST, &format!("/api/rooms/{room}/join"), Some(&dave.token), None).await.ok();
    let mut d = Driver::start().await;
    d.connected("bob", &c.chat_url(1), json!({ "token": bob.token })).await;
    d.connected("carol", &c.chat_url(0), json!({ "token": carol.token })).await;
    let post = |text: &str| json!({ "message": text });
    let path = |m: &Value| format!("/api/rooms/{room}/messages/{}", m["_id"].as_str().unwrap());
    let first = c.request(0, Method::POST, &format!("/api/rooms/{room}/messages"), Some(&amy.token), Some(post("page 42?"))).await.ok()["data"].clone();
    let second = c.request(0, Method::POST, &format!("/api/rooms/{room}/messages"), Some(&amy.token), Some(post("room secret"))).await.ok()["data"].clone();
    let bobs = c.request(1, Method::POST, &format!("/api/rooms/{room}/messages"), Some(&bob.token), Some(post("bob's"))).await.ok()["data"].clone();
    let pushed = d.events("bob", "message", 3).await;
    let before_changes = pushed[0]["cursor"].as_u64().unwrap();
    let unread = |who: &crate::helpers::User| {
        let token = who.token.clone();
        let room = room.clone();
        async move {
            let r = c.request(0, Method::GET, "/api/rooms", Some(&token), None).await.ok();
            r["rooms"].as_array().unwrap().iter().find(|x| x["_id"] == json!(room)).unwrap()["unread"].as_u64().unwrap()
        }
    };

    // Edit through the other node: same _id and seq; members get messageUpdated.
    let edited = c.request(1, Method::PATCH, &path(&first), Some(&amy.token), Some(post("page 43?"))).await.ok()["data"].clone();
    assert_eq!((&edited["_id"], &edited["seq"], &edited["message"]), (&first["_id"], &json!(1), &json!("page 43?")), "{edited}");
    assert!(edited["editedAt"].is_string(), "{edited}");
    assert_eq!(without_cursor(d.events("bob", "messageUpdated", 1).await.remove(0)), edited);

    // Authorization and bad input: nothing appended, and carol (not a member) gets nothing.
    let head = c.log_head().await;
    let other_room = format!("/api/rooms/01a21c30-0000-7000-8000-000000000000/messages/{}", first["_id"].as_str().unwrap());
    let cases: Vec<(Method, String, &str, Option<Value>, u16)> = vec![
        (Method::PATCH, path(&first), bob.token.as_str(), Some(post("mine")), 403),
        (Method::DELETE, path(&first), bob.token.as_str(), None, 403),
        (Method::PATCH, path(&first), carol.token.as_str(), Some(post("hi")), 403),
        (Method::DELETE, path(&first), carol.token.as_str(), None, 404),
        (Method::PATCH, path(&bobs).replace(&room, "nope.room"), bob.token.as_str(), Some(post("x")), 404),
        (Method::DELETE, other_room, amy.token.as_str(), None, 404),
        (Method::PATCH, format!("/api/rooms/{room}/messages/01a21c30-0000-7000-8000-000000000000"), amy.token.as_str(), Some(post("x")), 404),
        (Method::PATCH, path(&first), amy.token.as_str(), Some(post("")), 400),
        (Method::PATCH, path(&first), amy.token.as_str(), Some(post(&"x".repeat(4001))), 400),
    ];
    for (method, p, token, body, want) in cases {
        let r = c.request(0, method.clone(), &p, Some(token), body).await;
        assert_eq!(r.status.as_u16(), want, "{method} {p}: {}", r.body);
    }
    assert_eq!(c.log_head().await, head, "refusals append nothing");

    // Delete amy's second (unread by dave): tombstone, dave's unread drops.
    assert_eq!(unread(&dave).await, 3, "dave has read nothing");
    let gone = c.request(0, Method::DELETE, &path(&second), Some(&amy.token), None).await.ok()["data"].clone();
    assert_eq!((&gone["seq"], &gone["deleted"]), (&json!(2), &json!(true)), "{gone}");
    assert!(gone.get("message").is_none(), "{gone}");
    assert_eq!(without_cursor(d.events("bob", "messageDeleted", 1).await.remove(0)), gone);
    eventually("dave's unread drops to 2", || async { unread(&dave).await == 2 }).await;
    let r = c.request(1, Method::PATCH, &path(&second), Some(&amy.token), Some(post("back"))).await;
    assert_eq!(r.status.as_u16(), 409, "{}", r.body);
    // The next message's seq follows the room's, not the changed message's.
    let next = c.request(1, Method::POST, &format!("/api/rooms/{room}/messages"), Some(&bob.token), Some(post("after"))).await.ok()["data"].clone();
    assert_eq!(next["seq"], json!(4));
    let quiet = d.quiet("carol", Duration::from_millis(300)).await;
    assert!(quiet.iter().all(|e| e["type"] != "event" || e["event"] == "synced"), "a non-member gets nothing: {quiet:?}");

    // Resume from before the changes: in order, the deleted text nowhere.
    d.connected("bob-later", &c.chat_url(0), json!({ "token": bob.token, "cursor": before_changes })).await;
    d.next("bob-later", |e| e["event"] == "synced", "synced").await;
    d.quiet("bob-later", Duration::from_millis(300)).await;
    let replayed: Vec<(String, Value)> = d
        .all
        .iter()
        .filter(|e| e["id"] == "bob-later" && e["type"] == "event" && e["event"] != "synced")
        .map(|e| (e["event"].as_str().unwrap().to_owned(), e["data"]["_id"].clone()))
        .collect();
    // The deleted message's own delivery: gone (distributed) or its tombstone (embedded).
    let shown_deleted = replayed.first() == Some(&("message".to_owned(), second["_id"].clone()));
    let replayed = if shown_deleted { replayed[1..].to_vec() } else { replayed };
    let want: Vec<(String, Value)> = [("message", &bobs), ("messageUpdated", &first), ("messageDeleted", &second), ("message", &next)]
        .into_iter()
        .map(|(e, m)| (e.to_owned(), m["_id"].clone()))
        .collect();
    assert_eq!(replayed, want);
    let all = serde_json::to_string(&d.all.iter().filter(|e| e["id"] == "bob-later").collect::<Vec<_>>()).unwrap();
    assert!(!all.contains("room secret"), "{all}");
    eventually("the inbox stream keeps no deleted text", || async { !inbox_holds(c, "room secret").await }).await;

    // History: the edit and the tombstone, gapless.
    let h = c.request(1, Method::GET, &format!("/api/rooms/{room}/messages"), Some(&amy.token), None).await.ok();
    let h = h["messages"].as_array().or(h.as_array()).unwrap().clone();
    assert_eq!(h.iter().map(|m| m["seq"].clone()).collect::<Vec<_>>(), vec![json!(1), json!(2), json!(3), json!(4)]);
    assert_eq!((&h[0]["message"], &h[1]["deleted"], h[1].get("message")), (&json!("page 43?"), &json!(true), None));
    // After leaving, the sender may still delete (not edit) their message.
    c.request(0, Method::POST, &format!("/api/rooms/{room}/leave"), Some(&amy.token), None).await.ok();
    let r = c.request(0, Method::PATCH, &path(&first), Some(&amy.token), Some(post("x"))).await;
    assert_eq!(r.status.as_u16(), 403, "{}", r.body);
    c.request(0, Method::DELETE, &path(&first), Some(&amy.token), None).await.ok();
    if !c.is_embedded() {
        let history = c.request(1, Method::GET, &format!("/api/rooms/{room}/messages"), Some(&bob.token), None).await.ok();
        let out = c.natter(&["rebuild", "all"]).await;
        assert!(out.contains("mongo-views rebuilt"), "{out}");
        assert_eq!(c.request(0, Method::GET, &format!("/api/rooms/{room}/messages"), Some(&bob.token), None).await.ok(), history);
        assert_eq!(unread(&dave).await, 2, "bob's two; amy's both deleted");
    }
}
