//! `natter rebuild` while clients read and write.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use natter::log::EventLog;
use natter::distributed::live_versions::{COUNTS, VIEWS, Versions, read_pointer};
use natter_projections::history::snapshot;
use natter_projections::local::{LocalCounts, LocalViews};
use natter_projections::{CountStore, ViewStore};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::Cluster;

#[tokio::test]
async fn a_rebuild_during_traffic_serves_consistent_reads_and_ends_equal_to_a_fresh_replay() {
    let c = Cluster::start(2).await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let carol = c.register(0, "Carol").await;
    let r = c.request(0, Method::POST, "/api/rooms", Some(&amy.token), Some(json!({ "name": "Rebuilt" }))).await.ok();
    let room = r["room"]["_id"].as_str().unwrap().to_owned();
    c.request(0, Method::POST, &format!("/api/rooms/{room}/join"), Some(&carol.token), None).await.ok();

    // Writers: amy → bob (DM) and amy → room, acknowledged counts kept,
    // until the rebuild is over (bounded: at most 3000 writes).
    let (dm_acked, room_started, room_acked) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let rebuilt = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (http, base, token, bob_id, room) = (c.http.clone(), c.url(0, ""), amy.token.clone(), bob.id.clone(), room.clone());
        let (dm_acked, room_started, room_acked, rebuilt) = (dm_acked.clone(), room_started.clone(), room_acked.clone(), rebuilt.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !rebuilt.load(Ordering::SeqCst) && i < 3000 {
                i += 1;
                let (path, counter) = if i % 2 == 0 {
                    (format!("{base}/api/messages/{bob_id}"), &dm_acked)
                } else {
                    room_started.fetch_add(1, Ordering::SeqCst);
                    (format!("{base}/api/rooms/{room}/messages"), &room_acked)
                };
                let r = http.post(path).bearer_auth(&token).json(&json!({ "message": format!("w{i}") })).send().await.unwrap();
                assert!(r.status().is_success(), "write {i}: {}", r.status());
                counter.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // Readers check every answer while the rebuild runs.
    let reader = {
        let (http, urls) = (c.http.clone(), [c.url(0, ""), c.url(1, "")]);
        let (bob_token, carol_token, amy_id, room) = (bob.token.clone(), carol.token.clone(), amy.id.clone(), room.clone());
        let (dm_acked, room_started, room_acked, writer_done) = (dm_acked.clone(), room_started.clone(), room_acked.clone(), writer.abort_handle());
        tokio::spawn(async move {
            let mut reads = 0u64;
            while !writer_done.is_finished() {
                let base = &urls[(reads % 2) as usize];
                reads += 1;
                // bob's conversation: gapless from 1, holding every acknowledged message
                let low = dm_acked.load(Ordering::SeqCst);
                let history: Value = http.get(format!("{base}/api/messages/{amy_id}?limit=500")).bearer_auth(&bob_token).send().await.unwrap().json().await.unwrap();
                let seqs: Vec<u64> = history.as_array().expect("history").iter().map(|m| m["seq"].as_u64().unwrap()).collect();
                // (the newest 500: a slow rebuild lets the writer go past a page)
                let first = seqs.first().copied().unwrap_or(1);
                assert!(first == 1 || seqs.len() == 500, "a page of the newest 500 starts at 1 unless full: {seqs:?}");
                assert_eq!(seqs, (first..first + seqs.len() as u64).collect::<Vec<_>>(), "a gapless conversation");
                assert!(seqs.last().copied().unwrap_or(0) >= low, "read up to {:?} of {low} acknowledged messages", seqs.last());
                // carol never reads the room: her unread is every room message
                let low = room_acked.load(Ordering::SeqCst);
                let r = http.get(format!("{base}/api/rooms")).bearer_auth(&carol_token).send().await.unwrap();
                let high = room_started.load(Ordering::SeqCst);
                if r.status().is_success() {
                    let body: Value = r.json().await.unwrap();
                    let unread = body["rooms"].as_array().unwrap().iter().find(|x| x["_id"] == json!(room)).unwrap()["unread"].as_u64().unwrap();
                    assert!(low <= unread && unread <= high, "room unread {unread} outside [{low}, {high}]");
                } else {
                    assert_eq!(r.status().as_u16(), 503, "only 'rebuilding' may replace an answer");
                }
            }
            reads
        })
    };

    let out = c.natter(&["rebuild", "all"]).await;
    rebuilt.store(true, Ordering::SeqCst);
    assert!(out.contains("mongo-views rebuilt: v2 is live") && out.contains("redis-unseen rebuilt: v2 is live"), "{out}");
    writer.await.unwrap();
    let reads = reader.await.unwrap();
    assert!(reads > 10, "reads ran throughout the rebuild ({reads})");
    assert!(dm_acked.load(Ordering::SeqCst) < 1500, "writes went on until the switch, not past the bound");

    // The live versions are 2, and equal a fresh replay of the whole log.
    let db = natter::distributed::connect_mongo(c.cfg.distributed.mongo_url.as_deref().unwrap(), &c.cfg.distributed.mongo_db).await.unwrap();
    let redis = natter::distributed::connect_redis(c.cfg.distributed.redis_url.as_deref().unwrap(), std::time::Duration::from_secs(5)).await.unwrap();
    assert_eq!(read_pointer(&db, VIEWS).await.unwrap().active, 2);
    assert_eq!(read_pointer(&db, COUNTS).await.unwrap().active, 2);
    let old = db.collection::<mongodb::bson::Document>("messages").count_documents(mongodb::bson::doc! {}).await.unwrap();
    assert_eq!(old, 0, "the old version is dropped");
    // wait for the nodes' projectors to have applied everything to v2
    let head = c.nats().head().await.unwrap();
    let stream = c.nats().jetstream().get_stream(&c.cfg.distributed.stream).await.unwrap();
    crate::helpers::eventually("v2 projectors at the head", || async {
        let mut ok = true;
        for d in ["mongo-views-v2", "redis-unseen-v2"] {
            ok &= stream.consumer_info(d).await.is_ok_and(|i| i.ack_floor.stream_sequence >= head);
        }
        ok
    })
    .await;
    let (fresh_views, fresh_counts) = (LocalViews::default(), LocalCounts::default());
    for seq in 1..=head {
        let env = c.nats().get(seq).await.unwrap().envelope;
        ViewStore::apply(&fresh_views, &env).await.unwrap();
        CountStore::apply(&fresh_counts, &env).await.unwrap();
    }
    let versions = Versions::open(db, redis, &c.cfg.distributed.redis_prefix, None).await.unwrap();
    let users = [amy.id.clone(), bob.id.clone(), carol.id.clone()];
    let convs = [natter_events::subjects::dm_conversation(&amy.id, &bob.id)];
    let rooms = [room.clone()];
    let live = snapshot(versions.views.as_ref(), versions.counts.as_ref(), &users, &convs, &rooms).await.unwrap();
    let fresh = snapshot(&fresh_views, &fresh_counts, &users, &convs, &rooms).await.unwrap();
    assert_eq!(live, fresh, "the rebuilt views equal a fresh replay");
    c.stop().await;
}
