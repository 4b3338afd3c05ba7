//! Blocking: while either of two users has blocked the other, their direct
//! messages are refused (403 `blocked`, nothing appended) and typing is
//! not relayed; the blocked user learns nothing beyond that refusal;
//! `GET /api/users` marks whom the caller blocked; unblocking restores
//! everything; counts stay exact throughout.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::client::Driver;
use crate::helpers::{Cluster, User};

crate::contract!(a_block_refuses_direct_messages_both_ways_until_lifted, 2, a_block_refuses_direct_messages_both_ways_until_lifted);

async fn users_page(c: &Cluster, node: usize, me: &User) -> serde_json::Value {
    c.request(node, Method::GET, "/api/users", Some(&me.token), None).await.ok()
}

fn marked_blocked(page: &serde_json::Value, id: &str) -> Option<bool> {
    page["users"].as_array().unwrap().iter().find(|u| u["_id"] == id).map(|u| u["blocked"] == json!(true))
}

async fn a_block_refuses_direct_messages_both_ways_until_lifted(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let carol = c.register(0, "Carol").await;
    c.send(0, &amy, &bob, "before the block", None).await.ok();
    crate::helpers::eventually("bob's count from amy", || async { c.unseen_from(1, &bob, &amy).await == 1 }).await;

    let mut d = Driver::start().await;
    d.connected("bob", &c.socket_url(1), json!({ "token": bob.token })).await;
    d.connected("amy", &c.socket_url(0), json!({ "token": amy.token })).await;

    // Bob blocks Amy (twice: the second changes nothing).
    let head = c.log_head().await;
    let r = c.request(1, Method::PUT, &format!("/api/users/{}/block", amy.id), Some(&bob.token), None).await;
    assert_eq!((r.status.as_u16(), r.body.clone()), (200, json!({"success": true, "blocked": true})));
    assert_eq!(c.log_head().await, head + 1, "one event");
    let r = c.request(0, Method::PUT, &format!("/api/users/{}/block", amy.id), Some(&bob.token), None).await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(c.log_head().await, head + 1, "blocking again appends nothing");

    // Amy's messages are refused, on either node, and nothing is stored.
    let head = c.log_head().await;
    for node in [0, 1] {
        let r = c.send(node, &amy, &bob, "hello?", Some(&format!("blocked-{node}"))).await;
        assert_eq!((r.status.as_u16(), r.body["code"].clone()), (403, json!("blocked")), "{}", r.body);
        assert!(!r.body["message"].as_str().unwrap().contains("block"), "amy is not told she is blocked: {}", r.body);
        let r = c
            .request(node, Method::POST, "/api/attachments", Some(&amy.token), Some(json!({"otherId": bob.id, "attachmentSent": "https://x.io/a.png"})))
            .await;
        assert_eq!(r.status.as_u16(), 403, "{}", r.body);
    }
    // Bob cannot write to Amy either while he blocks her.
    let r = c.send(1, &bob, &amy, "one last word", None).await;
    assert_eq!((r.status.as_u16(), r.body["code"].clone()), (403, json!("blocked")));
    assert_eq!(c.log_head().await, head, "refused sends append nothing");
    // Others are unaffected.
    c.send(0, &carol, &bob, "hi bob", None).await.ok();

    // Amy's typing does not reach Bob; Carol's does.
    d.connected("carol", &c.socket_url(0), json!({ "token": carol.token })).await;
    d.emit("amy", "typing", json!({ "to": bob.id, "typing": true })).await;
    d.emit("carol", "typing", json!({ "to": bob.id, "typing": true })).await;
    let t = d.events("bob", "typing", 1).await.remove(0);
    assert_eq!(t["from"], json!(carol.id), "only carol's typing is relayed");
    let more = d.quiet("bob", Duration::from_millis(500)).await;
    assert!(!more.iter().any(|e| e["event"] == "typing"), "amy's typing was relayed: {more:?}");
    let amy_saw = d.quiet("amy", Duration::from_millis(200)).await;
    assert!(!amy_saw.iter().any(|e| e["event"] == "error"), "amy's typing gets no tell-tale error: {amy_saw:?}");

    // The directory: Bob sees whom he blocked; Amy sees nothing of it.
    crate::helpers::eventually("bob's directory to mark amy blocked", || async {
        marked_blocked(&users_page(c, 0, &bob).await, &amy.id) == Some(true)
    })
    .await;
    let amys = users_page(c, 1, &amy).await;
    assert_eq!(marked_blocked(&amys, &bob.id), Some(false), "{amys}");
    assert!(amys["users"].as_array().unwrap().iter().all(|u| u.get("blocked").is_none()), "{amys}");
    // Counts stay exact: the message from before the block is still unseen.
    assert_eq!(c.unseen_from(1, &bob, &amy).await, 1);

    // Bad input changes nothing.
    let head = c.log_head().await;
    for (path, status) in [
        (format!("/api/users/{}/block", bob.id), 400),
        ("/api/users/no-such-user/block".to_owned(), 404),
        ("/api/users/bad.id/block".to_owned(), 400),
    ] {
        let r = c.request(0, Method::PUT, &path, Some(&bob.token), None).await;
        assert_eq!(r.status.as_u16(), status, "{path}: {}", r.body);
    }
    let r = c.request(0, Method::PUT, &format!("/api/users/{}/block", amy.id), None, None).await;
    assert_eq!(r.status.as_u16(), 401);
    assert_eq!(c.log_head().await, head);

    // Unblocking restores messages both ways (and is idempotent too).
    let r = c.request(0, Method::DELETE, &format!("/api/users/{}/block", amy.id), Some(&bob.token), None).await;
    assert_eq!((r.status.as_u16(), r.body.clone()), (200, json!({"success": true, "blocked": false})));
    let head = c.log_head().await;
    let r = c.request(1, Method::DELETE, &format!("/api/users/{}/block", amy.id), Some(&bob.token), None).await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(c.log_head().await, head);
    let m = c.send(0, &amy, &bob, "friends again", None).await.ok();
    assert_eq!(m["data"]["seq"], json!(2), "the conversation goes on without a gap");
    let pushed = d.events("bob", "newMessage", 1).await.remove(0);
    assert_eq!(pushed["_id"], m["data"]["_id"]);
    crate::helpers::eventually("bob's count from amy to be 2", || async { c.unseen_from(1, &bob, &amy).await == 2 }).await;
    crate::helpers::eventually("bob's directory to drop the mark", || async {
        marked_blocked(&users_page(c, 1, &bob).await, &amy.id) == Some(false)
    })
    .await;
    c.send(1, &bob, &amy, "welcome back", None).await.ok();
}
