//! Private rooms and roles: a private room is listed to and readable by its
//! members only, joined by invitation only; the owner names admins; the
//! owner and admins invite and remove; a removed member receives nothing
//! of the room from then on.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Driver;
use crate::helpers::{Cluster, User};

crate::contract!(a_private_room_is_for_members_and_roles_decide_who_moderates, 2, a_private_room_is_for_members_and_roles_decide_who_moderates);

async fn listed(c: &Cluster, node: usize, who: &User, room: &str) -> Option<Value> {
    let page = c.request(node, Method::GET, "/api/rooms", Some(&who.token), None).await.ok();
    page["rooms"].as_array().unwrap().iter().find(|r| r["_id"] == json!(room)).cloned()
}

async fn a_private_room_is_for_members_and_roles_decide_who_moderates(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let carol = c.register(0, "Carol").await;
    let mut d = Driver::start().await;
    d.connected("bob", &c.chat_url(1), json!({ "token": bob.token })).await;
    d.connected("carol", &c.chat_url(0), json!({ "token": carol.token })).await;
    let created = c.request(0, Method::POST, "/api/rooms", Some(&amy.token), Some(json!({ "name": "Team", "private": true }))).await;
    assert_eq!(created.status.as_u16(), 201, "{}", created.body);
    let room = created.body["room"]["_id"].as_str().unwrap().to_owned();
    assert_eq!(created.body["room"]["private"], json!(true));
    let path = |tail: &str| format!("/api/rooms/{room}{tail}");
    let post = |who: &User, tail: &str, body: Option<Value>| {
        let (token, path) = (who.token.clone(), path(tail));
        async move { c.request(1, Method::POST, &path, Some(&token), body).await }
    };
    let r = c.request(1, Method::GET, &path(""), Some(&amy.token), None).await.ok();
    assert_eq!((&r["room"]["role"], &r["room"]["isMember"]), (&json!("owner"), &json!(true)), "{r}");

    // Not invited: not listed, not found, not joinable (REST or /chat).
    let head = c.log_head().await;
    assert!(listed(c, 1, &bob, &room).await.is_none());
    assert_eq!(c.request(1, Method::GET, &path(""), Some(&bob.token), None).await.status.as_u16(), 404);
    assert_eq!(post(&bob, "/join", None).await.status.as_u16(), 404, "nobody learns a private room exists");
    let ack = d.emit_ack("bob", "join-room", json!({ "roomId": room })).await;
    assert_eq!(ack["success"], json!(false), "{ack}");
    for tail in ["/messages", "/users"] {
        assert_eq!(c.request(0, Method::GET, &path(tail), Some(&bob.token), None).await.status.as_u16(), 404, "{tail}");
    }
    for tail in ["/messages", "/leave", "/invite"] {
        assert_eq!(post(&bob, tail, Some(json!({ "message": "hi", "userId": carol.id }))).await.status.as_u16(), 404, "{tail}");
    }
    assert_eq!(c.log_head().await, head, "refusals append nothing");

    // Invited (through the other node): told on /chat, may see and join it.
    post(&amy, "/invite", Some(json!({ "userId": bob.id }))).await.ok();
    let invited = d.events("bob", "room-invited", 1).await.remove(0);
    assert_eq!((&invited["roomId"], &invited["by"]), (&json!(room), &json!(amy.id)));
    let r = c.request(0, Method::GET, &path(""), Some(&bob.token), None).await.ok();
    assert_eq!((&r["room"]["invited"], &r["room"]["isMember"]), (&json!(true), &json!(false)), "{r}");
    let ack = d.emit_ack("bob", "join-room", json!({ "roomId": room })).await;
    assert_eq!(ack["success"], json!(true), "{ack}");
    assert_eq!(listed(c, 0, &bob, &room).await.unwrap()["isMember"], json!(true));

    // A plain member moderates nothing; the owner names an admin.
    let head = c.log_head().await;
    assert_eq!(post(&bob, "/invite", Some(json!({ "userId": carol.id }))).await.status.as_u16(), 403);
    assert_eq!(post(&bob, "/role", Some(json!({ "userId": bob.id, "role": "admin" }))).await.status.as_u16(), 400, "not to yourself");
    assert_eq!(post(&amy, "/role", Some(json!({ "userId": bob.id, "role": "owner" }))).await.status.as_u16(), 400);
    assert_eq!(post(&amy, "/role", Some(json!({ "userId": carol.id, "role": "admin" }))).await.status.as_u16(), 404, "carol is no member");
    assert_eq!(post(&amy, "/invite", Some(json!({ "userId": "01a21c30-0000-7000-8000-000000000000" }))).await.status.as_u16(), 404);
    assert_eq!(post(&amy, "/invite", Some(json!({}))).await.status.as_u16(), 400);
    assert_eq!(c.log_head().await, head, "refusals append nothing");
    post(&amy, "/role", Some(json!({ "userId": bob.id, "role": "admin" }))).await.ok();
    assert_eq!(d.events("bob", "member-role", 1).await.remove(0)["role"], json!("admin"));
    let r = c.request(0, Method::GET, &path(""), Some(&bob.token), None).await.ok();
    assert_eq!(r["room"]["role"], json!("admin"));
    // Reading keeps the role (the member subject's newest event says it).
    c.request(0, Method::GET, &path("/messages"), Some(&bob.token), None).await.ok();
    c.request(1, Method::POST, &path("/messages"), Some(&amy.token), Some(json!({ "message": "welcome" }))).await.ok();
    d.events("bob", "message", 1).await;
    c.request(0, Method::GET, &path("/messages"), Some(&bob.token), None).await.ok();
    assert_eq!(c.request(0, Method::GET, &path(""), Some(&bob.token), None).await.ok()["room"]["role"], json!("admin"));

    // The admin invites carol; carol joins; the admin may not remove the owner.
    post(&bob, "/invite", Some(json!({ "userId": carol.id }))).await.ok();
    d.events("carol", "room-invited", 1).await;
    post(&carol, "/join", None).await.ok();
    assert_eq!(post(&bob, "/kick", Some(json!({ "userId": amy.id }))).await.status.as_u16(), 403);
    c.request(0, Method::POST, &path("/messages"), Some(&amy.token), Some(json!({ "message": "hi carol" }))).await.ok();
    d.events("carol", "message", 1).await;

    // Removed: told why, and nothing of the room from then on.
    post(&bob, "/kick", Some(json!({ "userId": carol.id }))).await.ok();
    let left = d.next("carol", |e| e["event"] == "member-left" && e["data"]["userId"] == json!(carol.id), "member-left").await;
    assert_eq!(left["data"]["by"], json!(bob.id));
    c.request(0, Method::POST, &path("/messages"), Some(&amy.token), Some(json!({ "message": "after carol" }))).await.ok();
    let got = d.events("bob", "message", 2).await;
    assert_eq!(got[1]["message"], json!("after carol"));
    let quiet = d.quiet("carol", Duration::from_millis(500)).await;
    assert!(!quiet.iter().any(|e| e["event"] == "message"), "a removed member receives nothing: {quiet:?}");
    assert_eq!(c.request(1, Method::GET, &path("/messages"), Some(&carol.token), None).await.status.as_u16(), 404);
    assert_eq!(post(&carol, "/join", None).await.status.as_u16(), 404, "joining again needs a new invitation");
    assert!(listed(c, 0, &carol, &room).await.is_none());
    assert_eq!(c.request(1, Method::GET, &path(""), Some(&carol.token), None).await.status.as_u16(), 404);

    // The owner leaves and comes back as owner, without an invitation.
    post(&amy, "/leave", None).await.ok();
    post(&amy, "/join", None).await.ok();
    assert_eq!(c.request(0, Method::GET, &path(""), Some(&amy.token), None).await.ok()["room"]["role"], json!("owner"));
    assert_eq!(post(&bob, "/kick", Some(json!({ "userId": amy.id }))).await.status.as_u16(), 403, "nobody removes the owner");

    // A sender who left may still delete their message, and learns nothing
    // else of the private room.
    let note = c.request(0, Method::POST, &path("/messages"), Some(&bob.token), Some(json!({ "message": "bob's note" }))).await.ok()["data"]["_id"]
        .as_str()
        .unwrap()
        .to_owned();
    post(&bob, "/leave", None).await.ok();
    let edit = c.request(1, Method::PATCH, &path(&format!("/messages/{note}")), Some(&bob.token), Some(json!({ "message": "changed" }))).await;
    assert_eq!(edit.status.as_u16(), 404, "{}", edit.body);
    let deleted = c.request(1, Method::DELETE, &path(&format!("/messages/{note}")), Some(&bob.token), None).await;
    assert_eq!(deleted.ok()["data"]["deleted"], json!(true));

    // A public room: anyone joins; a removal sticks until an invitation.
    let public = c.request(0, Method::POST, "/api/rooms", Some(&amy.token), Some(json!({ "name": "Lobby" }))).await.body["room"].clone();
    assert!(public.get("private").is_none(), "{public}");
    let lobby = |tail: &str| format!("/api/rooms/{}{tail}", public["_id"].as_str().unwrap());
    c.request(1, Method::POST, &lobby("/join"), Some(&carol.token), None).await.ok();
    c.request(0, Method::POST, &lobby("/kick"), Some(&amy.token), Some(json!({ "userId": carol.id }))).await.ok();
    let r = c.request(1, Method::POST, &lobby("/join"), Some(&carol.token), None).await;
    assert_eq!(r.status.as_u16(), 403, "{}", r.body);
    c.request(0, Method::POST, &lobby("/invite"), Some(&amy.token), Some(json!({ "userId": carol.id }))).await.ok();
    c.request(1, Method::POST, &lobby("/join"), Some(&carol.token), None).await.ok();
}
