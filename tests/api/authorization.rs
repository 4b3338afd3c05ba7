//! Nobody reads, marks or sends as anyone else; refused requests leave the
//! log unchanged.

use reqwest::Method;
use serde_json::json;

use crate::helpers::Cluster;

crate::contract!(a_third_user_cannot_read_mark_or_send_as_a, 2, a_third_user_cannot_read_mark_or_send_as_a);

async fn a_third_user_cannot_read_mark_or_send_as_a(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let eve = c.register(0, "Eve").await;
    let secret = c.send(0, &amy, &bob, "for bob only", None).await.ok()["data"].clone();
    let secret_id = secret["_id"].as_str().unwrap();

    // Reading: eve's conversations with amy and with bob hold nothing of A–B.
    let with_amy = c.history(0, &eve, &amy).await;
    let with_bob = c.history(1, &eve, &bob).await;
    assert!(with_amy.is_empty() && with_bob.is_empty(), "{with_amy:?} {with_bob:?}");

    let head = c.log_head().await;
    // Marking: eve cannot mark amy's message to bob seen (it is not hers to see).
    let r = c.request(0, Method::PATCH, &format!("/api/messages/{secret_id}/seen"), Some(&eve.token), None).await;
    assert_eq!(r.status.as_u16(), 404, "{}", r.body);
    // Nor can the sender mark her own message seen for bob.
    let r = c.request(1, Method::PATCH, &format!("/api/messages/{secret_id}/seen"), Some(&amy.token), None).await;
    assert_eq!(r.status.as_u16(), 403, "{}", r.body);
    assert_eq!(r.body["success"], json!(false));
    assert_eq!(c.log_head().await, head, "refused requests append nothing");
    assert_eq!(c.unseen_from(1, &bob, &amy).await, 1);

    // Sending: a senderId in the body is ignored; the sender is the token's sub.
    let r = c
        .request(
            0,
            Method::POST,
            &format!("/api/messages/{}", bob.id),
            Some(&eve.token),
            Some(json!({"message": "I am amy", "senderId": amy.id})),
        )
        .await
        .ok();
    assert_eq!(r["data"]["senderId"], json!(eve.id));
    assert_eq!(c.unseen(1, &bob).await, json!({ amy.id.clone(): 1, eve.id.clone(): 1 }));
    let ab = c.history(1, &bob, &amy).await;
    assert_eq!(ab.len(), 1, "nothing was added to A–B");
}
