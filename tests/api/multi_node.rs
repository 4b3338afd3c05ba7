//! Two nodes sharing NATS, MongoDB and Redis: a write through one is read
//! through the other as soon as it is acknowledged.

use reqwest::Method;
use serde_json::json;

use crate::helpers::Cluster;

#[tokio::test]
async fn send_through_node_one_read_and_count_through_node_two() {
    let c = Cluster::start(2).await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;

    let sent = c.send(0, &amy, &bob, "hello from node 1", None).await.ok();
    assert_eq!(sent["success"], json!(true));
    assert_eq!(sent["message"], json!("Message Sent Successfully"));
    let m = &sent["data"];
    assert_eq!(m["senderId"], json!(amy.id));
    assert_eq!(m["receiverId"], json!(bob.id));
    assert_eq!(m["message"], json!("hello from node 1"));
    assert_eq!(m["seen"], json!(false));
    assert_eq!(m["seq"], json!(1));
    assert!(m["_id"].is_string() && m["createdAt"].is_string() && m["updatedAt"].is_string());

    // Read-your-writes on the other node, with no waiting: the count first
    // (reading the conversation marks it seen).
    assert_eq!(c.unseen_from(1, &bob, &amy).await, 1);
    let users = c.request(1, Method::GET, "/api/users", Some(&bob.token), None).await.ok();
    let listed: Vec<_> = users["users"].as_array().unwrap().iter().map(|u| u["_id"].clone()).collect();
    assert_eq!(listed, vec![json!(amy.id)], "everyone but me");
    assert!(users["users"][0].get("passwordHash").is_none(), "no password hashes leave the node");

    let history = c.history(1, &bob, &amy).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["_id"], m["_id"]);
    assert_eq!(history[0]["seen"], json!(true), "opening the conversation marked it seen");
    assert_eq!(c.unseen_from(0, &bob, &amy).await, 0);

    // The sender sees the same message, marked seen, through node 1.
    let mine = c.history(0, &amy, &bob).await;
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["seen"], json!(true));

    // Login through the other node works with the account made on node 1.
    let login = c
        .request(1, Method::POST, "/api/auth/login", None, Some(json!({"email": amy.email, "password": "password123"})))
        .await
        .ok();
    assert_eq!(login["user"]["_id"], json!(amy.id));
    c.stop().await;
}

#[tokio::test]
async fn attachments_and_paging() {
    let c = Cluster::start(1).await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    let sent = c
        .request(
            0,
            Method::POST,
            "/api/attachments",
            Some(&amy.token),
            Some(json!({"otherId": bob.id, "attachmentSent": "https://cdn.example.com/cat.png"})),
        )
        .await
        .ok();
    assert_eq!(sent["message"], json!("Attachment Sent Successfully"));
    assert_eq!(sent["data"]["attachment"], json!("https://cdn.example.com/cat.png"));
    assert!(sent["data"].get("message").is_none());
    for i in 2..=7 {
        c.send(0, &amy, &bob, &format!("m{i}"), None).await.ok();
    }
    // newest page of 3, oldest first
    let page = c.request(0, Method::GET, &format!("/api/messages/{}?limit=3", amy.id), Some(&bob.token), None).await.ok();
    let seqs: Vec<_> = page.as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![5, 6, 7]);
    let page = c
        .request(0, Method::GET, &format!("/api/messages/{}?limit=3&before=5", amy.id), Some(&bob.token), None)
        .await
        .ok();
    let seqs: Vec<_> = page.as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![2, 3, 4]);
    c.stop().await;
}

#[tokio::test]
async fn users_are_paginated_by_cursor() {
    let c = Cluster::start(1).await;
    let me = c.register(0, "Me").await;
    let mut others = Vec::new();
    for i in 0..5 {
        others.push(c.register(0, &format!("U{i}")).await.id);
    }
    others.sort();
    let mut seen = Vec::new();
    let mut path = "/api/users?limit=2".to_owned();
    loop {
        let page = c.request(0, Method::GET, &path, Some(&me.token), None).await.ok();
        for u in page["users"].as_array().unwrap() {
            seen.push(u["_id"].as_str().unwrap().to_owned());
        }
        match page["nextCursor"].as_str() {
            Some(next) => path = format!("/api/users?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, others);
    c.stop().await;
}

#[tokio::test]
async fn one_account_per_email_and_login_checks_the_password() {
    let c = Cluster::start(2).await;
    let amy = c.register(0, "Amy").await;
    let again = c
        .request(1, Method::POST, "/api/auth/register", None, Some(json!({"name": "Amy2", "email": amy.email.to_uppercase(), "password": "another-password"})))
        .await;
    let fresh = c
        .request(1, Method::POST, "/api/auth/register", None, Some(json!({"name": "Fresh", "email": "fresh@example.com", "password": "password123"})))
        .await;
    // Answered exactly like a free address: nothing says it is taken.
    assert_eq!((again.status.as_u16(), &again.body), (fresh.status.as_u16(), &fresh.body));
    assert_eq!(again.status.as_u16(), 202, "{}", again.body);
    assert!(again.body.get("token").is_none() && again.body.get("user").is_none(), "{}", again.body);
    // And nothing changed: Amy's password still logs her in, the other does not.
    let amys = c.request(1, Method::POST, "/api/auth/login", None, Some(json!({"email": amy.email, "password": "password123"}))).await.ok();
    assert_eq!((&amys["user"]["_id"], &amys["user"]["name"]), (&json!(amy.id), &json!("Amy")));
    let other = c.request(1, Method::POST, "/api/auth/login", None, Some(json!({"email": amy.email, "password": "another-password"}))).await;
    assert_eq!(other.status.as_u16(), 401);
    let wrong = c
        .request(0, Method::POST, "/api/auth/login", None, Some(json!({"email": amy.email, "password": "nope-nope"})))
        .await;
    assert_eq!(wrong.status.as_u16(), 401);
    assert_eq!(wrong.body["success"], json!(false));
    let unknown = c
        .request(0, Method::POST, "/api/auth/login", None, Some(json!({"email": "nobody@example.com", "password": "password123"})))
        .await;
    assert_eq!(unknown.status.as_u16(), 401);
    assert_eq!(wrong.body["message"], unknown.body["message"], "no hint which part was wrong");
    c.stop().await;
}

/// `NATTER_STREAM_REPLICAS` asks JetStream for that many copies of every
/// stream natter keeps: on the suite's single server, 3 cannot be placed,
/// and a node refuses to start saying so (rather than run unreplicated);
/// 1 is what the streams already have, and the node serves.
#[tokio::test]
async fn a_node_refuses_to_start_when_its_streams_cannot_be_replicated_as_configured() {
    let c = Cluster::start(1).await;
    let mut cmd = crate::helpers::natter_command();
    // Streams of its own: the cluster's stay untouched whatever happens.
    let own = format!("{}R3", c.cfg.distributed.stream);
    cmd.envs(c.env())
        .env("NATTER_STREAM", &own)
        .env("NATTER_SUBJECT_PREFIX", own.to_lowercase())
        .env("NATTER_HOST", "127.0.0.1")
        .env("NATTER_PORT", "0")
        .env("RUST_LOG", "warn")
        .env("NATTER_STREAM_REPLICAS", "3")
        .kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output()).await.expect("natter exits").expect("run natter");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with 3 replicas on one server");
    assert!(stderr.contains("cannot keep 3 replicas") && stderr.contains("NATTER_STREAM_REPLICAS"), "{stderr}");
    for suffix in ["", "_PARKED", "_INBOX", "_FANOUT", "_ERASE"] {
        let _ = c.nats().jetstream().delete_stream(format!("{own}{suffix}")).await;
    }
    // The streams are as they were: the cluster's node still serves.
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    c.send(0, &amy, &bob, "still here", None).await.ok();
    c.stop().await;
}
