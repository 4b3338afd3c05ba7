//! The same `clientMsgId` gives one message, whatever the retries.

use std::collections::HashSet;

use futures::future::join_all;
use reqwest::Method;
use serde_json::json;

use crate::helpers::Cluster;

crate::contract!(the_same_client_msg_id_five_times_is_one_message, 2, the_same_client_msg_id_five_times_is_one_message);

async fn the_same_client_msg_id_five_times_is_one_message(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let head = c.log_head().await;

    // Sequential retries, alternating nodes.
    let mut ids = HashSet::new();
    for i in 0..5 {
        let r = c.send(i % 2, &amy, &bob, "only once", Some("retry-1")).await.ok();
        assert_eq!(r["data"]["clientMsgId"], json!("retry-1"));
        ids.insert(r["data"]["_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "every response carries the same _id");

    // Concurrent retries through both nodes.
    let replies = join_all((0..10).map(|i| c.send(i % 2, &amy, &bob, "also once", Some("retry-2")))).await;
    let ids: HashSet<_> = replies.into_iter().map(|r| r.ok()["data"]["_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 1, "concurrent retries all return the original");

    let history = c.history(1, &bob, &amy).await;
    let texts: Vec<_> = history.iter().map(|m| m["message"].as_str().unwrap()).collect();
    assert_eq!(texts, vec!["only once", "also once"]);
    // Two messages and one seen mark: nothing else reached the log.
    assert_eq!(c.log_head().await, head + 3);
}

crate::contract!(a_client_msg_id_reused_for_other_content_is_refused, 1, a_client_msg_id_reused_for_other_content_is_refused);

async fn a_client_msg_id_reused_for_other_content_is_refused(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    c.send(0, &amy, &bob, "first", Some("k1")).await.ok();
    let head = c.log_head().await;
    let r = c.send(0, &amy, &bob, "different", Some("k1")).await;
    assert_eq!(r.status.as_u16(), 409, "{}", r.body);
    assert_eq!(r.body["code"], json!("conflict"));
    // Another sender may use the same key: keys are per sender.
    let r = c.send(0, &bob, &amy, "bob's own", Some("k1")).await.ok();
    assert_eq!(r["data"]["senderId"], json!(bob.id));
    assert_eq!(c.log_head().await, head + 1);
}

crate::contract!(concurrent_registrations_of_one_email_make_one_account, 2, concurrent_registrations_of_one_email_make_one_account);

async fn concurrent_registrations_of_one_email_make_one_account(c: &Cluster) {
    let email = format!("race-{}@example.com", uuid::Uuid::new_v4().simple());
    let replies = join_all((0..6).map(|i| {
        c.request(
            i % 2,
            Method::POST,
            "/api/auth/register",
            None,
            Some(json!({"name": format!("R{i}"), "email": email, "password": "password123"})),
        )
    }))
    .await;
    let created = replies.iter().filter(|r| r.status.as_u16() == 201).count();
    let conflicts = replies.iter().filter(|r| r.status.as_u16() == 409).count();
    assert_eq!((created, conflicts), (1, 5));
}
