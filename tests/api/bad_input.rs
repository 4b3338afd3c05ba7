//! Bad input gets a clear 4xx, and nothing reaches the log.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::Cluster;

crate::contract!(every_bad_request_is_a_clear_4xx_and_appends_nothing, 1, every_bad_request_is_a_clear_4xx_and_appends_nothing);

async fn every_bad_request_is_a_clear_4xx_and_appends_nothing(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    let sent = c.send(0, &bob, &amy, "hi", None).await.ok();
    let bobs_msg = sent["data"]["_id"].as_str().unwrap().to_owned();
    let to_bob = format!("/api/messages/{}", bob.id);
    let json_ct = Some("application/json");
    let head = c.log_head().await;

    // (what, method, path, content type, body, expected status)
    let cases: Vec<(&str, Method, String, Option<&str>, Vec<u8>, u16)> = vec![
        ("malformed JSON", Method::POST, to_bob.clone(), json_ct, b"{\"message\": ".to_vec(), 400),
        ("not JSON at all", Method::POST, to_bob.clone(), json_ct, b"hello".to_vec(), 400),
        ("wrong type", Method::POST, to_bob.clone(), json_ct, br#"{"message": 42}"#.to_vec(), 422),
        ("array body", Method::POST, to_bob.clone(), json_ct, b"[1,2]".to_vec(), 422),
        ("no content type", Method::POST, to_bob.clone(), None, br#"{"message":"x"}"#.to_vec(), 415),
        ("missing message", Method::POST, to_bob.clone(), json_ct, b"{}".to_vec(), 400),
        ("empty message", Method::POST, to_bob.clone(), json_ct, br#"{"message": ""}"#.to_vec(), 400),
        ("blank message", Method::POST, to_bob.clone(), json_ct, br#"{"message": "  \n "}"#.to_vec(), 400),
        ("oversize message", Method::POST, to_bob.clone(), json_ct, json!({"message": "x".repeat(201)}).to_string().into_bytes(), 400),
        ("oversize body", Method::POST, to_bob.clone(), json_ct, json!({"message": "x".repeat(20_000)}).to_string().into_bytes(), 413),
        ("bad clientMsgId", Method::POST, to_bob.clone(), json_ct, br#"{"message": "x", "clientMsgId": "a b"}"#.to_vec(), 400),
        ("unknown receiver", Method::POST, "/api/messages/no-such-user".into(), json_ct, br#"{"message": "x"}"#.to_vec(), 404),
        ("malformed receiver", Method::POST, "/api/messages/a.b".into(), json_ct, br#"{"message": "x"}"#.to_vec(), 400),
        ("wildcard receiver", Method::POST, "/api/messages/%3E".into(), json_ct, br#"{"message": "x"}"#.to_vec(), 400),
        ("myself", Method::POST, format!("/api/messages/{}", amy.id), json_ct, br#"{"message": "x"}"#.to_vec(), 400),
        ("attachment not a URL", Method::POST, "/api/attachments".into(), json_ct, json!({"otherId": bob.id, "attachmentSent": "javascript:alert(1)"}).to_string().into_bytes(), 400),
        ("attachment without otherId", Method::POST, "/api/attachments".into(), json_ct, br#"{"attachmentSent": "https://x.io/a"}"#.to_vec(), 400),
        ("attachment wrong type", Method::POST, "/api/attachments".into(), json_ct, json!({"otherId": bob.id, "attachmentSent": true}).to_string().into_bytes(), 422),
        ("attachment to unknown user", Method::POST, "/api/attachments".into(), json_ct, json!({"otherId": "nobody", "attachmentSent": "https://x.io/a"}).to_string().into_bytes(), 404),
        ("seen: unknown message", Method::PATCH, "/api/messages/0193a2b4-0000-7000-8000-000000000000/seen".into(), None, vec![], 404),
        ("seen: malformed id", Method::PATCH, "/api/messages/a*b/seen".into(), None, vec![], 404),
        ("history: unknown user", Method::GET, "/api/messages/nobody".into(), None, vec![], 404),
        ("history: myself", Method::GET, format!("/api/messages/{}", amy.id), None, vec![], 400),
        ("history: bad limit", Method::GET, format!("{to_bob}?limit=0"), None, vec![], 400),
        ("history: huge limit", Method::GET, format!("{to_bob}?limit=100000"), None, vec![], 400),
        ("history: bad before", Method::GET, format!("{to_bob}?before=abc"), None, vec![], 400),
        ("history: negative before", Method::GET, format!("{to_bob}?before=-1"), None, vec![], 400),
        ("users: bad limit", Method::GET, "/api/users?limit=x".into(), None, vec![], 400),
        ("users: bad cursor", Method::GET, "/api/users?after=a.b".into(), None, vec![], 400),
        ("register: bad email", Method::POST, "/api/auth/register".into(), json_ct, br#"{"name":"x","email":"nope","password":"password123"}"#.to_vec(), 400),
        ("register: short password", Method::POST, "/api/auth/register".into(), json_ct, br#"{"name":"x","email":"x@y.io","password":"short"}"#.to_vec(), 400),
        ("register: missing fields", Method::POST, "/api/auth/register".into(), json_ct, br#"{"name":"x"}"#.to_vec(), 422),
        ("unknown route", Method::GET, "/api/nope".into(), None, vec![], 404),
    ];
    for (what, method, path, ct, body, status) in cases {
        let r = c.raw(0, method, &path, &amy.token, ct, body).await;
        assert_eq!(r.status.as_u16(), status, "{what}: {}", r.body);
        assert_eq!(r.body["success"], json!(false), "{what}: {}", r.body);
        let message = r.body["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty() && r.body["code"].is_string(), "{what}: a clear message and code: {}", r.body);
    }
    assert_eq!(c.log_head().await, head, "no bad request appended anything");

    // The node still serves after all that, and bob's message is still unseen.
    assert_eq!(c.unseen_from(0, &amy, &bob).await, 1);
    let r = c.request(0, Method::PATCH, &format!("/api/messages/{bobs_msg}/seen"), Some(&amy.token), None).await.ok();
    assert_eq!(r["upToSeq"], Value::from(1));
}
