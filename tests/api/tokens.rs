//! Tokens: expired, forged, `alg: none`, without `sub`, for another issuer
//! or audience: all 401.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Cluster, SECRET};

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn sign(claims: &Value, secret: &str) -> String {
    encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn b64(v: &Value) -> String {
    // base64url without padding, by hand: the test should not trust the library it tests.
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = v.to_string().into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

crate::contract!(bad_tokens_are_refused_with_401, 1, bad_tokens_are_refused_with_401);

async fn bad_tokens_are_refused_with_401(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let claims = |sub: Option<&str>, exp: i64, iss: &str, aud: &str| {
        let mut v = json!({"exp": exp, "iat": now() - 10, "iss": iss, "aud": aud});
        if let Some(s) = sub {
            v["sub"] = json!(s);
        }
        v
    };
    let good = sign(&claims(Some(&amy.id), now() + 600, "natter", "natter"), SECRET);
    let cases = vec![
        ("valid control", good.clone(), 200),
        ("expired", sign(&claims(Some(&amy.id), now() - 600, "natter", "natter"), SECRET), 401),
        ("wrong signature", sign(&claims(Some(&amy.id), now() + 600, "natter", "natter"), "another-secret"), 401),
        (
            "alg none",
            format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&claims(Some(&amy.id), now() + 600, "natter", "natter"))),
            401,
        ),
        ("missing sub", sign(&claims(None, now() + 600, "natter", "natter"), SECRET), 401),
        ("sub not an id", sign(&claims(Some("a.>"), now() + 600, "natter", "natter"), SECRET), 401),
        ("other issuer", sign(&claims(Some(&amy.id), now() + 600, "evil", "natter"), SECRET), 401),
        ("other audience", sign(&claims(Some(&amy.id), now() + 600, "natter", "evil"), SECRET), 401),
        ("tampered payload", {
            let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
            parts[1] = b64(&claims(Some("someone-else"), now() + 600, "natter", "natter"));
            parts.join(".")
        }, 401),
        ("garbage", "not-a-jwt".into(), 401),
    ];
    for (what, token, status) in cases {
        let r = c.request(0, Method::GET, "/api/users", Some(&token), None).await;
        assert_eq!(r.status.as_u16(), status, "{what}: {}", r.body);
        if status == 401 {
            assert_eq!(r.body["success"], json!(false), "{what}");
        }
    }
    let expired = c
        .request(0, Method::GET, "/api/users", Some(&sign(&claims(Some(&amy.id), now() - 600, "natter", "natter"), SECRET)), None)
        .await;
    assert_eq!(expired.body["code"], json!("token_expired"));
    let none = c.request(0, Method::GET, "/api/users", None, None).await;
    assert_eq!(none.status.as_u16(), 401);
    let head = c.log_head().await;
    let r = c
        .request(0, Method::POST, &format!("/api/messages/{}", amy.id), Some("forged"), Some(json!({"message": "x"})))
        .await;
    assert_eq!(r.status.as_u16(), 401);
    assert_eq!(c.log_head().await, head);
}

crate::contract!(a_live_socket_ends_when_its_token_expires, 1, a_live_socket_ends_when_its_token_expires);

/// A socket connected with a token that expires in a few seconds gets
/// `error {code: token_expired}` then is disconnected by the server; one
/// with a fresh token stays.
async fn a_live_socket_ends_when_its_token_expires(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let short = sign(&json!({"sub": amy.id, "exp": now() + 3, "iat": now(), "iss": "natter", "aud": "natter"}), SECRET);
    let mut d = crate::client::Driver::start().await;
    d.connected("short", &c.socket_url(0), json!({ "token": short })).await;
    d.connected("fresh", &c.chat_url(0), json!({ "token": amy.token })).await;
    let e = d.next("short", |e| e["event"] == "error", "token_expired").await;
    assert_eq!(e["data"]["code"], json!("token_expired"), "{e}");
    let gone = d.next("short", |e| e["type"] == "disconnect", "disconnect").await;
    assert_eq!(gone["reason"], json!("io server disconnect"), "the server ended it: {gone}");
    let fresh = d.quiet("fresh", std::time::Duration::from_millis(300)).await;
    assert!(!fresh.iter().any(|e| e["type"] == "disconnect"), "{fresh:?}");
}

/// A distributed node without a token secret, or with a short one, does
/// not start (it would issue tokens no other node accepts, or guessable
/// ones): it exits with a message naming the setting.
#[tokio::test]
async fn a_distributed_node_refuses_to_start_without_a_strong_secret() {
    let c = Cluster::start(1).await;
    for (secret, says) in [(None, "no token secret"), (Some("too-short"), "at least 32")] {
        let mut cmd = crate::helpers::natter_command();
        cmd.envs(c.env().into_iter().filter(|(k, _)| *k != "NATTER_JWT_SECRET"))
            .env("NATTER_HOST", "127.0.0.1")
            .env("NATTER_PORT", "0")
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        if let Some(s) = secret {
            cmd.env("NATTER_JWT_SECRET", s);
        }
        let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output()).await.expect("natter exits").expect("run natter");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{secret:?}: started anyway");
        assert!(stderr.contains(says) && stderr.contains("NATTER_JWT_SECRET"), "{secret:?}: {stderr}");
    }
    c.stop().await;
}
