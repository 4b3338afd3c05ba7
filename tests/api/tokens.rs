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
