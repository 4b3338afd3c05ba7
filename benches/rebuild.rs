//! Rebuild throughput (distributed): writes a history of direct messages
//! and read marks into a fresh stream, then runs `natter rebuild` of each
//! projection and reports the events per second it caught up at. Reports,
//! never fails on a timing.
//!
//! Needs the services:
//!
//! ```text
//! scripts/services.sh start && . target/services/env
//! export NATTER_NATS_URL NATTER_MONGO_URL NATTER_REDIS_URL
//! cargo bench --bench rebuild          # NATTER_BENCH_EVENTS (default 20,000)
//! ```
//!
//! The history is published straight to the stream (as the command side
//! would have appended it: gapless positions, conversation state in every
//! event), so that filling it takes seconds; the stream, database and Redis
//! keys are the run's own and are removed at the end.

use std::time::Instant;

use natter::config::Config;
use natter_events::{DmState, Envelope, Event, UserRegistered, subjects};

const PAIRS: usize = 16;
/// Publishes awaited together.
const WINDOW: usize = 512;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: start the services (see the top of benches/rebuild.rs)"))
}

/// The history: per pair, messages in turn, and every tenth event a read
/// mark of everything so far by the next sender.
fn history(prefix: &str, total: usize) -> Vec<Envelope> {
    let users: Vec<String> = (0..PAIRS * 2).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let mut out: Vec<Envelope> = users
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let e = UserRegistered { user_id: id.clone(), name: format!("u{i}"), email: format!("u{i}@bench.io"), password_hash: "x".into() };
            Envelope::new(format!("register:{id}"), subjects::account(prefix, &format!("u{i}-bench")), 1, Event::UserRegistered(e))
        })
        .collect();
    let mut states: Vec<DmState> = (0..PAIRS).map(|p| DmState::new(&users[2 * p], &users[2 * p + 1])).collect();
    for i in 0..total {
        let p = i % PAIRS;
        let (a, b) = (&users[2 * p], &users[2 * p + 1]);
        let (sender, receiver) = if (i / PAIRS).is_multiple_of(2) { (a, b) } else { (b, a) };
        let state = &states[p];
        let event = if i % 10 == 9 {
            natter::commands::seen::decide_open(state, sender, receiver).map(Event::MessagesSeen)
        } else {
            None
        };
        let event = event.unwrap_or_else(|| {
            let cmd = natter::commands::send::SendMessage {
                sender: sender.clone(),
                receiver: receiver.clone(),
                message: Some(format!("message {i}")),
                attachment: None,
                client_msg_id: None,
                reply_to: None,
            };
            Event::MessageSent(natter::commands::send::decide(&cmd, state, &uuid::Uuid::now_v7().to_string(), None))
        });
        states[p] = match &event {
            Event::MessageSent(e) => e.state.clone(),
            Event::MessagesSeen(e) => e.state.clone(),
            _ => unreachable!(),
        };
        out.push(Envelope::new(format!("{sender}:{}", uuid::Uuid::now_v7()), subjects::dm(prefix, a, b), 0, event));
    }
    // Positions: 1, 2, 3, … per subject, in order.
    let mut next = std::collections::HashMap::<String, u64>::new();
    for e in &mut out {
        let n = next.entry(e.subject.clone()).or_insert(0);
        *n += 1;
        e.position = *n;
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total: usize = std::env::var("NATTER_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let run = uuid::Uuid::now_v7().simple().to_string();
    let tag = &run[run.len() - 8..];
    let mut cfg = Config::default();
    cfg.distributed.nats_url = Some(env("NATTER_NATS_URL"));
    cfg.distributed.mongo_url = Some(env("NATTER_MONGO_URL"));
    cfg.distributed.redis_url = Some(env("NATTER_REDIS_URL"));
    cfg.distributed.stream = format!("BENCH{tag}");
    cfg.distributed.mongo_db = format!("bench{tag}");
    cfg.distributed.redis_prefix = format!("bench{tag}:");
    cfg.log.subject_prefix = format!("bench{tag}");
    let prefix = cfg.log.subject_prefix.clone();

    let log = natter::log::nats::NatsLog::connect(cfg.distributed.nats_url.as_deref().unwrap(), &cfg.distributed.stream, &prefix, cfg.log.dedup_window).await?;
    let js = log.jetstream().clone();
    let events = history(&prefix, total);
    let started = Instant::now();
    for window in events.chunks(WINDOW) {
        let mut acks = Vec::with_capacity(window.len());
        for e in window {
            acks.push(js.publish(e.subject.clone(), e.encode().into()).await?);
        }
        for ack in acks {
            ack.await?;
        }
    }
    println!("wrote {} events in {:.1} s", events.len(), started.elapsed().as_secs_f64());
    let payload: usize = events.iter().map(|e| e.encode().len()).sum();
    let mut stream = js.get_stream(&cfg.distributed.stream).await?;
    let state = stream.info().await?.state.clone();
    println!(
        "stored events: {:.0} bytes of payload each on average; {:.0} bytes each in JetStream (subject and framing included)",
        payload as f64 / events.len() as f64,
        state.bytes as f64 / state.messages.max(1) as f64
    );

    let outcome = async {
        for which in std::env::var("NATTER_BENCH_REBUILD").map(|w| vec![w]).unwrap_or_else(|_| vec!["mongo-views".into(), "redis-unseen".into()]) {
            natter::cli::rebuild(&cfg, &which).await?;
        }
        anyhow::Ok(())
    }
    .await;

    // Clean up whatever happened.
    let _ = js.delete_stream(&cfg.distributed.stream).await;
    let _ = js.delete_stream(natter::log::nats::parked_stream(&cfg.distributed.stream)).await;
    if let Ok(client) = mongodb::Client::with_uri_str(cfg.distributed.mongo_url.as_deref().unwrap()).await {
        let _ = client.database(&cfg.distributed.mongo_db).drop().await;
    }
    if let Ok(client) = redis::Client::open(cfg.distributed.redis_url.as_deref().unwrap())
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}*", cfg.distributed.redis_prefix)).query_async(&mut conn).await.unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
        }
    }
    outcome
}
