//! Projections against the real stores and the real projector runtime.

use std::collections::BTreeMap;

use natter::log::EventLog;
use natter_events::Envelope;
use natter_projections::history::{History, snapshot};
use natter_projections::local::{LocalCounts, LocalViews};
use natter_projections::mongo::MongoViews;
use natter_projections::redis_counts::RedisCounts;
use natter_projections::{CountStore, ViewStore};
use reqwest::Method;

use crate::helpers::{Cluster, eventually, eventually_within, token_for};

/// A deterministic pseudo-random history over `users` users.
fn random_history(prefix: &str, users: usize, ops: usize, mut seed: u64) -> History {
    let mut next = move |n: usize| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 33) as usize) % n
    };
    let mut h = History::new(prefix, users);
    for _ in 0..ops {
        let (a, b) = (next(users), next(users));
        if a == b {
            continue;
        }
        match next(15) {
            0..=4 => h.send(a, b),
            14 => h.block(a, b, next(3) > 0),
            5 | 6 => h.mark(a, b, next(10)),
            7 => h.open(a, b),
            8 => h.create_room(a),
            9 => h.join(a, next(4)),
            10 => h.leave(a, next(4)),
            11 | 12 => h.room_send(a, next(4)),
            _ => h.room_read(a, next(4)),
        }
    }
    h
}

async fn memory_snapshot(h: &History) -> natter_projections::history::Snapshot {
    let (views, counts) = (LocalViews::default(), LocalCounts::default());
    for env in &h.envelopes {
        ViewStore::apply(&views, env).await.unwrap();
        CountStore::apply(&counts, env).await.unwrap();
    }
    snapshot(&views, &counts, &h.users, &h.conversations(), &h.rooms).await.unwrap()
}

#[tokio::test]
async fn mongo_and_redis_adapters_converge_like_the_in_memory_store() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let db = natter::distributed::connect_mongo(&std::env::var("NATTER_MONGO_URL").unwrap(), &format!("natter_p{}", &id[..12]))
        .await
        .unwrap();
    let redis = natter::distributed::connect_redis(&std::env::var("NATTER_REDIS_URL").unwrap(), std::time::Duration::from_secs(5)).await.unwrap();
    let views = MongoViews::open(&db).await.unwrap();
    let counts = RedisCounts::new(redis, format!("p{}:", &id[..12]));
    counts.mark_ready().await.unwrap(); // a fresh key space: complete by definition

    let h = random_history("p", 4, 120, 7);
    // Messy delivery: everything backwards, then everything again in order,
    // then every third event once more.
    let n = h.envelopes.len();
    let order = (0..n).rev().chain(0..n).chain((0..n).step_by(3));
    for i in order {
        ViewStore::apply(&views, &h.envelopes[i]).await.unwrap();
        CountStore::apply(&counts, &h.envelopes[i]).await.unwrap();
    }
    let real = snapshot(&views, &counts, &h.users, &h.conversations(), &h.rooms).await.unwrap();
    assert_eq!(real, memory_snapshot(&h).await);
    assert!(!h.rooms.is_empty(), "the history exercises rooms too");
    for u in &h.users {
        assert_eq!(real.unseen[u], h.expected_unseen(u));
        assert_eq!(real.room_unread[u], h.expected_room_unread(u));
    }
    db.drop().await.unwrap();
}

/// The batched writes of the real adapters (what projectors and rebuilds
/// use) converge like single applies: the whole history in one batch, then
/// again backwards, then shuffled with duplicates, in batches of 1 to 40
/// events (a batch may hold one event twice, or several states of one
/// conversation).
#[tokio::test]
async fn batched_applies_converge_like_the_in_memory_store() {
    use natter_projections::Projection;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let db = natter::distributed::connect_mongo(&std::env::var("NATTER_MONGO_URL").unwrap(), &format!("natter_b{}", &id[..12]))
        .await
        .unwrap();
    let redis = natter::distributed::connect_redis(&std::env::var("NATTER_REDIS_URL").unwrap(), std::time::Duration::from_secs(5)).await.unwrap();
    for seed in [3u64, 11, 29] {
        let views = MongoViews::open_version(&db, seed as u32 + 1).await.unwrap();
        let counts = RedisCounts::new(redis.clone(), format!("b{}:{seed}:", &id[..12]));
        counts.mark_ready().await.unwrap();
        let h = random_history("p", 4, 150, seed);
        let n = h.envelopes.len();
        // The whole history in one batch: each conversation's newest state
        // must win over the older ones beside it.
        let all: Vec<(&Envelope, u64)> = h.envelopes.iter().zip(1..).collect();
        Projection::apply_batch(&views, &all).await.unwrap();
        Projection::apply_batch(&counts, &all).await.unwrap();
        let once = snapshot(&views, &counts, &h.users, &h.conversations(), &h.rooms).await.unwrap();
        assert_eq!(once, memory_snapshot(&h).await, "seed {seed}, one batch");
        let mut state = seed;
        let mut next = move |m: usize| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as usize) % m
        };
        let mut order: Vec<usize> = (0..n).rev().collect();
        let mut again: Vec<usize> = (0..n).chain((0..n).step_by(2)).collect();
        for i in (1..again.len()).rev() {
            again.swap(i, next(i + 1));
        }
        order.extend(again);
        let mut rest = &order[..];
        while !rest.is_empty() {
            let (batch, tail) = rest.split_at((1 + next(40)).min(rest.len()));
            rest = tail;
            let events: Vec<(&Envelope, u64)> = batch.iter().map(|&i| (&h.envelopes[i], i as u64 + 1)).collect();
            Projection::apply_batch(&views, &events).await.unwrap();
            Projection::apply_batch(&counts, &events).await.unwrap();
        }
        let real = snapshot(&views, &counts, &h.users, &h.conversations(), &h.rooms).await.unwrap();
        assert_eq!(real, memory_snapshot(&h).await, "seed {seed}");
        for u in &h.users {
            assert_eq!(real.unseen[u], h.expected_unseen(u), "seed {seed}");
        }
    }
    db.drop().await.unwrap();
}

/// The counts load their scripts into Redis once, not with every write,
/// and are still written exactly when Redis forgets them (a restart
/// without persistence, `SCRIPT FLUSH`): the write goes again with them.
#[tokio::test]
async fn counts_stay_exact_when_redis_forgets_their_scripts() {
    use natter_projections::Projection;
    let redis = crate::helpers::PrivateRedis::start().await;
    let conn = natter::distributed::connect_redis(&redis.url, std::time::Duration::from_secs(5)).await.unwrap();
    let counts = RedisCounts::new(conn, "s:");
    counts.mark_ready().await.unwrap();
    let h = random_history("p", 4, 150, 5);
    let events: Vec<(&Envelope, u64)> = h.envelopes.iter().zip(1..).collect();
    let (first, rest) = events.split_at(events.len() / 3);
    let (second, third) = rest.split_at(rest.len() / 2);
    let mut admin = redis.client().get_multiplexed_async_connection().await.unwrap();
    let loads = |info: String| {
        info.lines().find(|l| l.starts_with("cmdstat_script|load:")).and_then(|l| l.split(['=', ',']).nth(1)?.parse::<u64>().ok()).unwrap_or(0)
    };
    Projection::apply_batch(&counts, first).await.unwrap();
    let after_first = loads(redis::cmd("INFO").arg("commandstats").query_async(&mut admin).await.unwrap());
    assert!(after_first > 0, "the first write loads the scripts");
    for one in second {
        Projection::apply_batch(&counts, std::slice::from_ref(one)).await.unwrap();
    }
    let after_second = loads(redis::cmd("INFO").arg("commandstats").query_async(&mut admin).await.unwrap());
    assert_eq!(after_second, after_first, "no script is loaded again while Redis holds them");
    // What is written after the flush changes counts of both kinds.
    assert!(third.iter().any(|(e, _)| e.event.dm_state().is_some()), "direct conversations change after the flush");
    assert!(third.iter().any(|(e, _)| matches!(e.event, natter_events::Event::RoomMessageSent(_))), "rooms change after the flush");
    redis::cmd("SCRIPT").arg("FLUSH").query_async::<()>(&mut admin).await.unwrap();
    Projection::apply_batch(&counts, third).await.unwrap();
    let after_flush = loads(redis::cmd("INFO").arg("commandstats").query_async(&mut admin).await.unwrap());
    assert!(after_flush > after_second, "loaded again once Redis forgot them");
    let unseen = |u: String| {
        let counts = counts.clone();
        async move { CountStore::unseen(&counts, &u).await.unwrap() }
    };
    for u in &h.users {
        let real: BTreeMap<String, u64> = unseen(u.clone()).await.into_iter().collect();
        assert_eq!(real, h.expected_unseen(u), "{u}");
        let want_rooms = h.expected_room_unread(u);
        let rooms: Vec<String> = want_rooms.keys().cloned().collect();
        let real_rooms: BTreeMap<String, u64> = CountStore::room_unread(&counts, u, &rooms).await.unwrap().into_iter().collect();
        assert_eq!(real_rooms, want_rooms, "{u}'s rooms");
    }
    redis.stop().await;
}

/// A batch holding a message whose idempotency key another message already
/// holds is refused as poison (the runtime then applies it event by event
/// and parks that one), while its own replays are not.
#[tokio::test]
async fn a_batch_with_a_contradicting_event_is_poison() {
    use natter_events::Event;
    use natter_projections::{ApplyError, Projection};
    let id = uuid::Uuid::new_v4().simple().to_string();
    let db = natter::distributed::connect_mongo(&std::env::var("NATTER_MONGO_URL").unwrap(), &format!("natter_q{}", &id[..12]))
        .await
        .unwrap();
    let views = MongoViews::open(&db).await.unwrap();
    let mut h = random_history("p", 2, 0, 1);
    h.send(0, 1);
    h.send(1, 0);
    let (first, second) = (h.envelopes[h.envelopes.len() - 2].clone(), h.envelopes[h.envelopes.len() - 1].clone());
    Projection::apply_batch(&views, &[(&first, 1)]).await.unwrap();
    Projection::apply_batch(&views, &[(&first, 1), (&first, 1)]).await.expect("a replay is not poison");
    let mut clash = second.clone();
    if let Event::MessageSent(e) = &mut clash.event {
        e.message_id = uuid::Uuid::now_v7().to_string();
    }
    clash.command_id = first.command_id.clone();
    let err = Projection::apply_batch(&views, &[(&second, 2), (&clash, 3)]).await.unwrap_err();
    assert!(matches!(err, ApplyError::Poison(_)), "{err:?}");
    Projection::apply_batch(&views, &[(&second, 2)]).await.expect("the other event of the batch applies alone");
    db.drop().await.unwrap();
}

/// Appends a history straight to the log, as another node would, without
/// applying it to the views.
async fn append_all(c: &Cluster, envelopes: &[Envelope]) {
    for env in envelopes {
        let expected = c.nats().last(&env.subject).await.unwrap().map(|l| l.log_seq).unwrap_or(0);
        c.nats().append(env, expected).await.unwrap();
    }
}

async fn unseen_via_api(c: &Cluster, node: usize, user: &str) -> BTreeMap<String, u64> {
    let r = c.request(node, Method::GET, "/api/users", Some(&token_for(user)), None).await.ok();
    serde_json::from_value::<BTreeMap<String, u64>>(r["unseenMessages"].clone()).unwrap()
}

#[tokio::test]
async fn projectors_on_two_nodes_apply_every_event_exactly_once() {
    let c = Cluster::start(2).await;
    let h = random_history(&c.cfg.log.subject_prefix, 4, 150, 11);
    append_all(&c, &h.envelopes).await;
    let total = h.envelopes.len() as f64;

    let applied = |projection: &'static str| {
        let c = &c;
        async move {
            c.metric(0, &format!("natter_projection_applied_total{{projection=\"{projection}\"}}")).await
                + c.metric(1, &format!("natter_projection_applied_total{{projection=\"{projection}\"}}")).await
        }
    };
    eventually("both projections to apply every event", || async {
        applied("mongo-views").await >= total && applied("redis-unseen").await >= total
    })
    .await;
    // The nodes share one durable consumer per projection: no event was
    // applied by both.
    assert_eq!(applied("mongo-views").await, total);
    assert_eq!(applied("redis-unseen").await, total);

    for (i, u) in h.users.iter().enumerate() {
        assert_eq!(unseen_via_api(&c, i % 2, u).await, h.expected_unseen(u), "unseen counts of {u}");
    }
    // The message views equal an in-order replay.
    let db = natter::distributed::connect_mongo(c.cfg.distributed.mongo_url.as_deref().unwrap(), &c.cfg.distributed.mongo_db).await.unwrap();
    let redis = natter::distributed::connect_redis(c.cfg.distributed.redis_url.as_deref().unwrap(), std::time::Duration::from_secs(5)).await.unwrap();
    let views = MongoViews::open(&db).await.unwrap();
    let counts = RedisCounts::new(redis, c.cfg.distributed.redis_prefix.clone());
    let real = snapshot(&views, &counts, &h.users, &h.conversations(), &h.rooms).await.unwrap();
    assert_eq!(real, memory_snapshot(&h).await);
    c.stop().await;
}

#[tokio::test]
async fn a_poison_event_is_parked_and_the_projectors_go_on() {
    let c = Cluster::start(1).await;
    let js = c.nats().jetstream().clone();
    js.publish(format!("{}.ev.dm.x.y", c.cfg.log.subject_prefix), "{ not an event".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut h = History::new(&c.cfg.log.subject_prefix, 2);
    h.send(0, 1);
    append_all(&c, &h.envelopes).await;
    let bob = h.users[1].clone();
    eventually("the event after the poison one to be projected", || async {
        unseen_via_api(&c, 0, &bob).await.get(&h.users[0]) == Some(&1)
    })
    .await;
    eventually("every projection to count the parked event", || async {
        c.metric(0, "natter_projection_parked_total{projection=\"mongo-views\"}").await == 1.0
            && c.metric(0, "natter_projection_parked_total{projection=\"redis-unseen\"}").await == 1.0
            && c.metric(0, "natter_projection_parked_total{projection=\"push-fanout\"}").await == 1.0
    })
    .await;
    let mut parked = js.get_stream(format!("{}_PARKED", c.cfg.distributed.stream)).await.unwrap();
    let state = parked.info().await.unwrap().state.clone();
    assert_eq!(state.messages, 3, "one parked copy per projection");
    let first = parked.get_raw_message(state.first_sequence).await.unwrap();
    let reason = first.headers.get("Natter-Reason").map(|v| v.to_string()).unwrap_or_default();
    assert!(reason.contains("not valid JSON"), "the reason says why: {reason:?}");
    assert_eq!(first.payload.as_ref(), b"{ not an event");
    c.stop().await;
}

/// A backlog (here 603 events, found by the first node to start) is
/// caught up in batches bigger than a live one. One holding poison (an
/// undecodable event, and a message whose idempotency key an earlier one
/// holds: poison for the views only) is applied again in parts, and only
/// the part with the contradicting message one event at a time: each
/// poison event is parked once per projection and nothing else is lost.
#[tokio::test]
async fn a_backlog_holding_poison_is_caught_up_and_parks_each_poison_event_once() {
    use natter_events::Event;
    let mut c = Cluster::start(0).await;
    let mut h = History::new(&c.cfg.log.subject_prefix, 2);
    for i in 0..600 {
        h.send(i % 2, (i + 1) % 2);
    }
    // The 400th event is replaced by a contradicting copy of itself: the
    // idempotency key of the 100th, a message id of its own.
    let first_key = h.envelopes[100].command_id.clone();
    let mut clash = h.envelopes[400].clone();
    let Event::MessageSent(e) = &mut clash.event else { panic!("a message") };
    e.message_id = uuid::Uuid::now_v7().to_string();
    let clash_seq = e.seq;
    clash.command_id = first_key;
    append_all(&c, &h.envelopes[..300]).await;
    let js = c.nats().jetstream().clone();
    js.publish(format!("{}.ev.dm.x.y", c.cfg.log.subject_prefix), "{ not an event".into()).await.unwrap().await.unwrap();
    append_all(&c, &h.envelopes[300..400]).await;
    // Published as a faulty writer would: the log's deduplication (the
    // idempotency key is the message id) would drop it.
    js.publish(clash.subject.clone(), clash.encode().into()).await.unwrap().await.unwrap();
    append_all(&c, &h.envelopes[401..]).await;
    let head = c.nats().head().await.unwrap();
    c.add_node().await;

    let stream = js.get_stream(&c.cfg.distributed.stream).await.unwrap();
    eventually_within("both projectors to catch up with the log", 120, || async {
        let mut done = true;
        for durable in ["mongo-views-v1", "redis-unseen-v1"] {
            done &= stream.consumer_info(durable).await.is_ok_and(|i| i.ack_floor.stream_sequence >= head && i.num_ack_pending == 0);
        }
        done
    })
    .await;
    assert_eq!(c.metric(0, "natter_projection_parked_total{projection=\"mongo-views\"}").await, 2.0, "the undecodable event and the contradicting message");
    assert_eq!(c.metric(0, "natter_projection_parked_total{projection=\"redis-unseen\"}").await, 1.0, "the undecodable event");
    let parked = js.get_stream(format!("{}_PARKED", c.cfg.distributed.stream)).await.unwrap();
    let by_subject: std::collections::HashMap<String, usize> = {
        use futures::TryStreamExt;
        parked.info_with_subjects(format!("{}.parked.>", c.cfg.log.subject_prefix)).await.unwrap().try_collect().await.unwrap()
    };
    let parked_of = |p: &str| by_subject.get(&format!("{}.parked.{p}", c.cfg.log.subject_prefix)).copied().unwrap_or(0);
    assert_eq!((parked_of("mongo-views"), parked_of("redis-unseen")), (2, 1), "each parked once: {by_subject:?}");

    // Every other message is in the views, the contradicting one is not.
    let db = natter::distributed::connect_mongo(c.cfg.distributed.mongo_url.as_deref().unwrap(), &c.cfg.distributed.mongo_db).await.unwrap();
    let views = MongoViews::open(&db).await.unwrap();
    let conversation = natter_events::subjects::dm_conversation(&h.users[0], &h.users[1]);
    let stored = views.messages(&conversation, None, 1000).await.unwrap();
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
    let expected: Vec<u64> = (1..=600).filter(|s| *s != clash_seq).collect();
    assert_eq!(seqs, expected, "every message but the contradicting one (seq {clash_seq}), once");
    c.stop().await;
}

#[tokio::test]
async fn projectors_killed_five_times_during_5000_events_converge_to_a_fresh_rebuild() {
    let c = Cluster::start(0).await;
    let mut h = random_history(&c.cfg.log.subject_prefix, 6, 0, 3);
    let mut seed = 99u64;
    while h.envelopes.len() < 5000 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let pick = |n: usize, shift: u32| ((seed >> shift) as usize) % n;
        let (a, b) = (pick(6, 33), pick(6, 41));
        match pick(14, 17) {
            _ if a == b => {}
            0..=4 => h.send(a, b),
            5 | 6 => h.mark(a, b, pick(10, 7)),
            7 => h.open(a, b),
            8 => h.create_room(a),
            9 => h.join(a, pick(4, 9)),
            10 => h.leave(a, pick(4, 11)),
            11 | 12 => h.room_send(a, pick(4, 13)),
            _ => h.room_read(a, pick(4, 15)),
        }
    }
    let total = h.envelopes.len();
    let mut node = c.spawn_process().await;
    let mut kills = 0;
    for (i, chunk) in h.envelopes.chunks(total / 6 + 1).enumerate() {
        append_all(&c, chunk).await;
        if i < 5 {
            node.kill9().await;
            kills += 1;
            node = c.spawn_process().await;
        }
    }
    assert_eq!(kills, 5);
    let head = c.nats().head().await.unwrap();
    let stream = c.nats().jetstream().get_stream(&c.cfg.distributed.stream).await.unwrap();
    // A killed node's unacknowledged events come back after the ack wait;
    // the catch-up of 5000 events against the test MongoDB takes a while.
    // The fan-out's feed holds the conversation, room and membership events
    // (not the account ones) until a partition has fanned each out.
    let fanned: u64 = h.envelopes.iter().filter(|e| [".ev.dm.", ".ev.room.", ".ev.member."].iter().any(|k| e.subject.contains(k))).count() as u64;
    let feed = c.nats().jetstream().get_stream(format!("{}_FANOUT", c.cfg.distributed.stream)).await.unwrap();
    eventually_within("every projector to catch up with the log", 120, || async {
        let mut done = true;
        for durable in ["mongo-views-v1", "redis-unseen-v1"] {
            done &= stream.consumer_info(durable).await.is_ok_and(|i| i.ack_floor.stream_sequence >= head);
        }
        let feed = feed.get_info().await.unwrap().state;
        done && feed.last_sequence == fanned && feed.messages == 0
    })
    .await;
    let db = natter::distributed::connect_mongo(c.cfg.distributed.mongo_url.as_deref().unwrap(), &c.cfg.distributed.mongo_db).await.unwrap();
    let redis = natter::distributed::connect_redis(c.cfg.distributed.redis_url.as_deref().unwrap(), std::time::Duration::from_secs(5)).await.unwrap();
    let views = MongoViews::open(&db).await.unwrap();
    let counts = RedisCounts::new(redis, c.cfg.distributed.redis_prefix.clone());
    let real = snapshot(&views, &counts, &h.users, &h.conversations(), &h.rooms).await.unwrap();
    assert_eq!(real, memory_snapshot(&h).await, "the views equal a fresh in-order rebuild");
    for u in &h.users {
        assert_eq!(real.unseen[u], h.expected_unseen(u), "unseen counts of {u} equal their definition");
        assert_eq!(real.room_unread[u], h.expected_room_unread(u));
    }
    drop(node);
    c.stop().await;
}
