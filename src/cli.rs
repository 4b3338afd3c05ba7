//! Operator commands: `natter projections`, `natter parked list|retry`.
//!
//! They use the same settings as a node (flags, `NATTER_*`, TOML), connect
//! to the same services, and print for a person at a terminal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use natter_events::Envelope;
use natter_projections::mongo::MongoViews;
use natter_projections::redis_counts::RedisCounts;
use natter_projections::{ApplyError, Projection};

use crate::config::Config;
use crate::log::EventLog;
use crate::log::nats::NatsLog;
use crate::push::fanout::FanOut;

/// Every projection a node runs, by name.
pub const PROJECTIONS: [(&str, u32); 3] = [("mongo-views", 1), ("redis-unseen", 1), ("push-fanout", 1)];

async fn connect_log(cfg: &Config) -> anyhow::Result<NatsLog> {
    let url = cfg.nats_url.as_deref().context("NATTER_NATS_URL is not set")?;
    NatsLog::connect(url, &cfg.stream, &cfg.subject_prefix, cfg.dedup_window).await
}

/// `natter projections`: each projection's checkpoint, lag and parked events.
pub async fn projections(cfg: &Config) -> anyhow::Result<()> {
    let log = connect_log(cfg).await?;
    let head = log.head().await?;
    let stream = log.jetstream().get_stream(&cfg.stream).await?;
    let parked = parked_counts(&log, cfg).await?;
    println!("log {}: {head} events", cfg.stream);
    println!("{:<16} {:>7} {:>12} {:>10} {:>10} {:>8}", "projection", "version", "checkpoint", "lag", "in flight", "parked");
    for (name, version) in PROJECTIONS {
        let durable = format!("{name}-v{version}");
        let (checkpoint, lag, in_flight) = match stream.consumer_info(&durable).await {
            Ok(info) => (info.ack_floor.stream_sequence.to_string(), info.num_pending.to_string(), info.num_ack_pending.to_string()),
            Err(_) => ("-".into(), format!("{head} (not started)"), "-".into()),
        };
        let parked = parked.iter().find(|(p, _)| p == name).map_or(0, |(_, n)| *n);
        println!("{name:<16} {version:>7} {checkpoint:>12} {lag:>10} {in_flight:>10} {parked:>8}");
    }
    if let Some(url) = &cfg.redis_url {
        let redis = crate::node::connect_redis(url).await?;
        let counts = RedisCounts::new(redis, cfg.redis_prefix.clone());
        let state = if counts.is_ready().await? { "complete" } else { "REBUILDING (reads answer 503 until done)" };
        println!("redis unread counts: {state}");
    }
    Ok(())
}

async fn parked_counts(log: &NatsLog, cfg: &Config) -> anyhow::Result<Vec<(String, usize)>> {
    use futures::StreamExt;
    let stream = log.jetstream().get_stream(format!("{}_PARKED", cfg.stream)).await?;
    let mut subjects = stream.info_with_subjects(format!("{}.parked.>", cfg.subject_prefix)).await?;
    let mut out = Vec::new();
    while let Some(entry) = subjects.next().await {
        let (subject, n) = entry?;
        out.push((subject.rsplit('.').next().unwrap_or_default().to_owned(), n));
    }
    Ok(out)
}

/// A parked event as stored.
pub struct Parked {
    pub seq: u64,
    pub projection: String,
    pub log_seq: String,
    pub reason: String,
    pub payload: bytes::Bytes,
}

async fn parked(log: &NatsLog, cfg: &Config) -> anyhow::Result<Vec<Parked>> {
    let mut stream = log.jetstream().get_stream(format!("{}_PARKED", cfg.stream)).await?;
    let state = stream.info().await?.state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(msg) = stream.get_raw_message(seq).await else { continue }; // deleted
        let header = |name: &str| msg.headers.get(name).map(|v| v.to_string()).unwrap_or_default();
        out.push(Parked {
            seq,
            projection: msg.subject.rsplit('.').next().unwrap_or_default().to_owned(),
            log_seq: header("Natter-Stream-Seq"),
            reason: header("Natter-Reason"),
            payload: msg.payload,
        });
    }
    Ok(out)
}

/// `natter parked list`.
pub async fn parked_list(cfg: &Config) -> anyhow::Result<()> {
    let log = connect_log(cfg).await?;
    let all = parked(&log, cfg).await?;
    if all.is_empty() {
        println!("no parked events");
    }
    for p in all {
        let what = match Envelope::decode(&p.payload) {
            Ok(env) => format!("{} {} on {}", env.event.type_name(), env.id, env.subject),
            Err(_) => format!("{} undecodable bytes", p.payload.len()),
        };
        println!("#{:<6} {:<14} log seq {:<8} {what}\n        reason: {}", p.seq, p.projection, p.log_seq, p.reason);
    }
    Ok(())
}

/// `natter parked retry`: applies parked events again (all, or the given
/// parked sequence numbers); those that now apply are removed from the
/// parked stream, the others stay with their new reason printed.
pub async fn parked_retry(cfg: &Config, only: &[u64]) -> anyhow::Result<()> {
    let log = connect_log(cfg).await?;
    let mongo_url = cfg.mongo_url.as_deref().context("NATTER_MONGO_URL is not set")?;
    let redis_url = cfg.redis_url.as_deref().context("NATTER_REDIS_URL is not set")?;
    let db = crate::node::connect_mongo(mongo_url, &cfg.mongo_db).await?;
    let views: Arc<MongoViews> = Arc::new(MongoViews::open(&db).await?);
    let counts = Arc::new(RedisCounts::new(crate::node::connect_redis(redis_url).await?, cfg.redis_prefix.clone()));
    let fanout = Arc::new(FanOut { js: log.jetstream().clone(), prefix: cfg.subject_prefix.clone(), views: views.clone() });
    let projections: [Arc<dyn Projection>; 3] = [views, counts, fanout];
    let stream = log.jetstream().get_stream(format!("{}_PARKED", cfg.stream)).await?;
    let (mut fixed, mut still) = (0, 0);
    for p in parked(&log, cfg).await? {
        if !only.is_empty() && !only.contains(&p.seq) {
            continue;
        }
        let projection = projections.iter().find(|x| x.name() == p.projection);
        let outcome = match (projection, Envelope::decode(&p.payload)) {
            (None, _) => Err(format!("no projection named {:?}", p.projection)),
            (_, Err(e)) => Err(format!("still undecodable: {e}")),
            (Some(x), Ok(env)) => tokio::time::timeout(Duration::from_secs(30), x.apply(&env))
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r.map_err(|e: ApplyError| e.to_string())),
        };
        match outcome {
            Ok(()) => {
                stream.delete_message(p.seq).await?;
                fixed += 1;
                println!("#{} {}: applied, removed from the parked stream", p.seq, p.projection);
            }
            Err(reason) => {
                still += 1;
                println!("#{} {}: still failing: {reason}", p.seq, p.projection);
            }
        }
    }
    println!("{fixed} applied, {still} still parked");
    Ok(())
}
