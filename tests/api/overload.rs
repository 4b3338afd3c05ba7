//! Overload: a node works on at most `NATTER_MAX_IN_FLIGHT` REST requests
//! at once and answers the rest 503 `overloaded` at once (with
//! `Retry-After`, counted), each request within `NATTER_REQUEST_TIMEOUT_MS`
//! (then 503 `timeout`); health still answers; and clients that retry their
//! sends with the same `clientMsgId` lose nothing and double nothing.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use reqwest::Method;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::helpers::{Cluster, User};

/// A send whose body never finishes arriving: it holds its place among the
/// node's requests in flight until the connection is dropped.
async fn stalled_send(c: &Cluster, from: &User, to: &User) -> TcpStream {
    let mut tcp = TcpStream::connect(c.node(0).addr).await.unwrap();
    let head = format!(
        "POST /api/messages/{} HTTP/1.1\r\nhost: natter\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"message\":",
        to.id, from.token
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.flush().await.unwrap();
    tcp
}

/// Sends `text` with key `key` until it is stored (503s and 429s are
/// retried, as a client would); returns the stored message's id.
async fn send_until_stored(c: &Cluster, from: &User, to: &User, text: &str, key: &str) -> String {
    for _ in 0..400 {
        let r = c.send(0, from, to, text, Some(key)).await;
        match r.status.as_u16() {
            200 => return r.body["data"]["_id"].as_str().unwrap().to_owned(),
            429 | 503 => tokio::time::sleep(Duration::from_millis(20)).await,
            _ => panic!("{}: {}", r.status, r.body),
        }
    }
    panic!("{key} was never stored");
}

crate::contract!(
    a_node_over_capacity_sheds_requests_and_loses_no_acknowledged_message,
    1,
    |cfg| {
        cfg.limits.max_in_flight = 2;
        cfg.limits.request_timeout = std::time::Duration::from_secs(10);
    },
    a_node_over_capacity_sheds_requests_and_loses_no_acknowledged_message
);

async fn a_node_over_capacity_sheds_requests_and_loses_no_acknowledged_message(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    let head = c.log_head().await;

    // Two stalled requests fill the node: the next is refused at once.
    let (first, second) = (stalled_send(c, &amy, &bob).await, stalled_send(c, &amy, &bob).await);
    let refused = crate::helpers::eventually_value("a request refused for capacity", || async {
        let r = c.request(0, Method::GET, "/api/users", Some(&amy.token), None).await;
        (r.status.as_u16() == 503).then_some(r)
    })
    .await;
    assert_eq!(refused.body["code"], json!("overloaded"), "{}", refused.body);
    let r = c.http.get(c.url(0, "/api/users")).bearer_auth(&amy.token).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"), "a refusal says when to retry");
    assert!(c.metric(0, "natter_http_shed_total").await >= 2.0);
    // Health, readiness and metrics still answer.
    assert_eq!(c.request(0, Method::GET, "/readyz", None, None).await.status.as_u16(), 200);

    // A request that cannot finish is answered 503 `timeout` (here: the
    // stalled ones, after 10 s), and their places come back.
    let mut first = first;
    let mut answer = String::new();
    let read = async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        let n = first.read(&mut buf).await.unwrap();
        answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.expect("the stalled request is answered");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"code\":\"timeout\""), "{answer}");
    drop(second);
    c.request(0, Method::GET, "/api/users", Some(&amy.token), None).await.ok();
    assert!(c.metric(0, "natter_http_timeouts_total").await >= 1.0);
    assert_eq!(c.log_head().await, head, "nothing was stored by refused or stalled requests");

    // A burst far over capacity: clients retry with the same key; every
    // message ends up stored exactly once.
    let (texts, keys): (Vec<String>, Vec<String>) = (0..40).map(|i| (format!("burst {i}"), format!("b{i}"))).unzip();
    let ids = join_all(texts.iter().zip(&keys).map(|(text, key)| send_until_stored(c, &amy, &bob, text, key))).await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 40);
    let history = c.history(0, &bob, &amy).await;
    let texts: HashSet<String> = history.iter().map(|m| m["message"].as_str().unwrap().to_owned()).collect();
    assert_eq!((history.len(), texts.len()), (40, 40), "each message once");
    let seqs: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>(), "gapless");
}

crate::contract!(
    a_node_whose_requests_queue_admits_fewer_and_loses_no_acknowledged_message,
    1,
    // Every request "queues" against a 1 ns target; windows never age out
    // (so the bound moves only on what completes).
    |cfg| {
        cfg.limits.overload_latency = std::time::Duration::from_nanos(1);
        cfg.limits.overload_window = std::time::Duration::from_secs(3600);
    },
    a_node_whose_requests_queue_admits_fewer_and_loses_no_acknowledged_message
);

/// The bound adapts to latency (`NATTER_OVERLOAD_LATENCY_MS`): once even
/// the fastest recent requests take longer, the node admits fewer at once
/// (down to 8) and sheds the rest of a burst with 503 `overloaded`, long
/// before `NATTER_MAX_IN_FLIGHT` (512 here); clients that retry with the
/// same `clientMsgId` lose nothing and double nothing.
async fn a_node_whose_requests_queue_admits_fewer_and_loses_no_acknowledged_message(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    assert_eq!(c.metric(0, "natter_http_shed_total").await, 0.0);
    for _ in 0..200 {
        c.request(0, Method::GET, "/api/users", Some(&amy.token), None).await.ok();
    }
    assert_eq!(c.metric(0, "natter_http_admission_limit").await, 8.0, "the bound fell to its floor");
    // Eight requests in progress fill it: the next is refused at once.
    let stalled = join_all((0..8).map(|_| stalled_send(c, &amy, &bob))).await;
    let refused = crate::helpers::eventually_value("a request refused at the lowered bound", || async {
        let r = c.request(0, Method::GET, "/api/users", Some(&amy.token), None).await;
        (r.status.as_u16() == 503).then_some(r)
    })
    .await;
    assert_eq!(refused.body["code"], json!("overloaded"), "{}", refused.body);
    assert!(c.metric(0, "natter_http_shed_total").await > 0.0);
    drop(stalled);
    let (texts, keys): (Vec<String>, Vec<String>) = (0..40).map(|i| (format!("queued {i}"), format!("q{i}"))).unzip();
    let ids = join_all(texts.iter().zip(&keys).map(|(text, key)| send_until_stored(c, &amy, &bob, text, key))).await;
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 40);
    let history = c.history(0, &bob, &amy).await;
    let seqs: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>(), "each message once, gapless");
}

crate::contract!(
    a_stopping_node_fails_readiness_and_refuses_new_requests_before_it_closes,
    1,
    |cfg| cfg.server.drain_delay = std::time::Duration::from_secs(3),
    a_stopping_node_fails_readiness_and_refuses_new_requests_before_it_closes
);

/// SIGTERM (the shutdown signal): for `NATTER_DRAIN_DELAY_MS` the node
/// still listens, but readiness says `draining` and new requests get 503
/// `draining` with `Retry-After`, so a load balancer moves them elsewhere.
async fn a_stopping_node_fails_readiness_and_refuses_new_requests_before_it_closes(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    assert_eq!(c.request(0, Method::GET, "/readyz", None, None).await.status.as_u16(), 200);
    let _ = c.node(0).shutdown_handle().send(true);
    crate::helpers::eventually("readiness to say draining", || async {
        let r = c.request(0, Method::GET, "/readyz", None, None).await;
        r.status.as_u16() == 503 && r.body["status"] == json!("draining")
    })
    .await;
    let r = c.http.get(c.url(0, "/api/users")).bearer_auth(&amy.token).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"), "a refusal says when to retry");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], json!("draining"), "{body}");
}
