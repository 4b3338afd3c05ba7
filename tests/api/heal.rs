//! Redis losing its data (FLUSHDB/FLUSHALL, restart without persistence)
//! never shows a wrong unread count, and the counts heal by themselves.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use reqwest::Method;
use serde_json::json;

use crate::helpers::{Cluster, PrivateRedis, eventually};

/// A Redis database of its own, so flushing it touches no other test.
const DB: u32 = 7;

#[tokio::test]
async fn a_redis_wipe_during_traffic_never_shows_a_wrong_count_and_heals() {
    let base = std::env::var("NATTER_REDIS_URL").unwrap();
    let url = format!("{}/{DB}", base.trim_end_matches('/'));
    let c = Cluster::start_with(2, |cfg| cfg.distributed.redis_url = Some(url.clone())).await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;

    const TOTAL: u64 = 120;
    let (started, acked) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sender = {
        let (http, url, token, to) = (c.http.clone(), c.url(0, ""), amy.token.clone(), bob.id.clone());
        let (started, acked) = (started.clone(), acked.clone());
        tokio::spawn(async move {
            for i in 0..TOTAL {
                started.fetch_add(1, Ordering::SeqCst);
                let r = http
                    .post(format!("{url}/api/messages/{to}"))
                    .bearer_auth(&token)
                    .json(&json!({ "message": format!("m{i}"), "clientMsgId": format!("h{i}") }))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "send {i}: {}", r.status());
                acked.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    // Wipe Redis once a third of the messages are in.
    let wiper = {
        let (acked, url) = (acked.clone(), url.clone());
        tokio::spawn(async move {
            while acked.load(Ordering::SeqCst) < TOTAL / 3 {
                tokio::task::yield_now().await;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
            redis::cmd("FLUSHDB").query_async::<()>(&mut conn).await.unwrap();
        })
    };

    // Bob reads his counts throughout, on both nodes: every answer is either
    // "rebuilding" or a count between what was acknowledged before the read
    // and what had been sent by its end.
    let (mut answers, mut rebuilding, mut wrong) = (0, 0, Vec::new());
    let path = "/api/users";
    while !sender.is_finished() || answers < 5 {
        let low = acked.load(Ordering::SeqCst);
        let r = c.request(answers % 2, Method::GET, path, Some(&bob.token), None).await;
        let high = started.load(Ordering::SeqCst);
        answers += 1;
        match r.status.as_u16() {
            200 => {
                let n = r.body["unseenMessages"].get(&amy.id).and_then(|v| v.as_u64()).unwrap_or(0);
                if n < low || n > high {
                    wrong.push((low, n, high));
                }
            }
            503 => {
                assert_eq!(r.body["code"], json!("rebuilding"), "{}", r.body);
                rebuilding += 1;
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    sender.await.unwrap();
    wiper.await.unwrap();
    assert!(wrong.is_empty(), "counts outside [acked before, sent by the end] of their read: {wrong:?}");
    eventually("the counts to heal to the exact value", || async {
        let r = c.request(1, Method::GET, path, Some(&bob.token), None).await;
        r.status.is_success() && r.body["unseenMessages"][&amy.id] == json!(TOTAL)
    })
    .await;
    assert_eq!(c.unseen_from(0, &bob, &amy).await, TOTAL);
    println!("{answers} reads during the run, {rebuilding} answered 'rebuilding'");
    c.stop().await;
}

/// Redis restarting from a snapshot older than its last writes (what its
/// default RDB persistence does after a crash) must not leave stale counts
/// behind: the ready marker names the Redis run that completed the counts,
/// so after the restart it is withdrawn and the counts are rebuilt, exactly.
#[tokio::test]
async fn a_redis_restart_from_an_older_snapshot_rebuilds_exact_counts() {
    let mut redis = PrivateRedis::start().await;
    let (url, client) = (redis.url.clone(), redis.client());
    let c = Cluster::start_with(1, |cfg| cfg.distributed.redis_url = Some(url.clone())).await;
    let (amy, bob) = (c.register(0, "Amy").await, c.register(0, "Bob").await);
    for i in 0..5 {
        c.send(0, &amy, &bob, &format!("saved {i}"), None).await.ok();
    }
    eventually("5 unseen", || async { c.unseen_from(0, &bob, &amy).await == 5 }).await;
    // The snapshot Redis will come back with.
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("SAVE").query_async::<()>(&mut conn).await.unwrap();
    for i in 0..5 {
        c.send(0, &amy, &bob, &format!("lost by redis {i}"), None).await.ok();
    }
    eventually("10 unseen", || async { c.unseen_from(0, &bob, &amy).await == 10 }).await;

    redis.restart().await;
    eventually("the counts to be rebuilt to the exact value", || async {
        let r = c.request(0, Method::GET, "/api/users", Some(&bob.token), None).await;
        r.status.is_success() && r.body["unseenMessages"][&amy.id] == json!(10)
    })
    .await;
    c.stop().await;
    redis.stop().await;
}
