//! Unseen counts equal "the peer's messages above my watermark".

use reqwest::Method;
use serde_json::json;

use crate::helpers::Cluster;

crate::contract!(counts_are_exact_through_sends_marks_and_opening, 2, counts_are_exact_through_sends_marks_and_opening);

async fn counts_are_exact_through_sends_marks_and_opening(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let carol = c.register(0, "Carol").await;

    let mut amy_msgs = Vec::new();
    for (i, (from, to)) in [(&amy, &bob), (&amy, &bob), (&bob, &amy), (&amy, &bob), (&carol, &bob), (&bob, &amy), (&amy, &bob), (&amy, &bob)]
        .into_iter()
        .enumerate()
    {
        let r = c.send(i % 2, from, to, &format!("m{i}"), None).await.ok();
        if from.id == amy.id {
            amy_msgs.push(r["data"].clone());
        }
    }
    // bob: 5 from amy, 1 from carol; amy: 2 from bob
    assert_eq!(c.unseen(1, &bob).await, json!({ amy.id.clone(): 5, carol.id.clone(): 1 }));
    assert_eq!(c.unseen(0, &amy).await, json!({ bob.id.clone(): 2 }));

    // bob marks amy's third message (a middle one, seq 4) seen: 2 of amy's remain.
    let third = amy_msgs[2]["_id"].as_str().unwrap();
    assert_eq!(amy_msgs[2]["seq"], json!(4));
    let r = c.request(0, Method::PATCH, &format!("/api/messages/{third}/seen"), Some(&bob.token), None).await.ok();
    assert_eq!(r["success"], json!(true));
    assert_eq!(c.unseen_from(1, &bob, &amy).await, 2);
    assert_eq!(c.unseen_from(0, &bob, &carol).await, 1, "other conversations untouched");
    assert_eq!(c.unseen_from(0, &amy, &bob).await, 2, "the sender's own count untouched");

    // Marking an earlier message changes nothing (watermarks never move back).
    let first = amy_msgs[0]["_id"].as_str().unwrap();
    let head = c.log_head().await;
    c.request(1, Method::PATCH, &format!("/api/messages/{first}/seen"), Some(&bob.token), None).await.ok();
    assert_eq!(c.unseen_from(1, &bob, &amy).await, 2);
    assert_eq!(c.log_head().await, head, "a watermark that would not move emits nothing");

    // The messages below the watermark read as seen, the ones above as not.
    let seen: Vec<_> = c
        .request(0, Method::GET, &format!("/api/messages/{}", bob.id), Some(&amy.token), None)
        .await
        .ok()
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["senderId"] == json!(amy.id))
        .map(|m| (m["seq"].as_u64().unwrap(), m["seen"].as_bool().unwrap()))
        .collect();
    assert_eq!(seen, vec![(1, true), (2, true), (4, true), (6, false), (7, false)]);

    // Opening the conversation clears it; opening it again emits nothing.
    c.history(1, &bob, &amy).await;
    assert_eq!(c.unseen(0, &bob).await, json!({ carol.id.clone(): 1 }));
    let head = c.log_head().await;
    c.history(0, &bob, &amy).await;
    assert_eq!(c.log_head().await, head);

    // amy opened hers above (the GET): bob's two are seen.
    assert_eq!(c.unseen(1, &amy).await, json!({}));

    // A new message counts again.
    c.send(1, &amy, &bob, "one more", None).await.ok();
    assert_eq!(c.unseen_from(0, &bob, &amy).await, 1);
}
