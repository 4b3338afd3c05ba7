//! Operator commands: `natter projections`, `natter parked list|retry`,
//! `natter rebuild`.
//!
//! They use the same settings as a node (flags, `NATTER_*`, TOML), connect
//! to the same services, and print for a person at a terminal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use natter_events::{Envelope, Event};
use natter_projections::mongo::MongoViews;
use natter_projections::switch::Switch;
use natter_projections::{ApplyError, Projection};

use crate::config::Config;
use crate::distributed::live_versions::{COUNTS, Pointer, VIEWS, Versions, read_pointer, write_pointer};
use crate::distributed::{connect_mongo, connect_redis};
use crate::log::EventLog;
use crate::log::nats::{NatsLog, parked_stream, parked_subject};
use crate::metrics::Metrics;
use crate::projector::consumer_name;
use crate::projector::jetstream::{Feed, Projector};
use crate::projector::partitions::{PARTITIONS, ensure_feed, fanout_stream, origin_seq, partition_consumer};
use crate::push::fanout::{self, FanOut};
use crate::push::nats::NatsPush;

/// Every projection a node runs, by name.
pub const PROJECTIONS: [&str; 3] = [VIEWS, COUNTS, fanout::NAME];

async fn connect_log(cfg: &Config) -> anyhow::Result<NatsLog> {
    let url = cfg.distributed.nats_url.as_deref().context(
        "NATTER_NATS_URL is not set. This command works on a distributed deployment; an embedded node keeps its \
         views in <data dir>/projections.redb (delete it while the node is stopped to rebuild them from the log at \
         the next start) and records events a projection refused in <data dir>/parked.jsonl",
    )?;
    NatsLog::connect(url, &cfg.distributed.stream, &cfg.log.subject_prefix, cfg.log.dedup_window).await
}

/// `natter projections`: each projection's checkpoint, lag and parked events.
pub async fn projections(cfg: &Config) -> anyhow::Result<()> {
    let log = connect_log(cfg).await?;
    let head = log.head().await?;
    let stream = log.jetstream().get_stream(&cfg.distributed.stream).await?;
    let parked = parked_counts(&log, cfg).await?;
    println!("log {}: {head} events", cfg.distributed.stream);
    println!("{:<16} {:>7} {:>12} {:>10} {:>10} {:>8}", "projection", "version", "checkpoint", "lag", "in flight", "parked");
    let db = match &cfg.distributed.mongo_url {
        Some(url) => Some(connect_mongo(url, &cfg.distributed.mongo_db).await?),
        None => None,
    };
    for name in PROJECTIONS {
        let pointer = match (&db, name) {
            (Some(db), VIEWS | COUNTS) => read_pointer(db, name).await?,
            _ => Pointer { active: 1, building: None },
        };
        let version = pointer.active;
        if let Some(b) = pointer.building {
            println!("{name}: v{b} is being built beside v{version}");
        }
        let (checkpoint, lag, in_flight) = if name == fanout::NAME {
            partitions_state(&log, cfg, version).await
        } else {
            match stream.consumer_info(&consumer_name(name, version)).await {
                Ok(info) => (info.ack_floor.stream_sequence.to_string(), info.num_pending.to_string(), info.num_ack_pending.to_string()),
                Err(_) => ("-".into(), format!("{head} (not started)"), "-".into()),
            }
        };
        let parked = parked.iter().find(|(p, _)| p == name).map_or(0, |(_, n)| *n);
        println!("{name:<16} {version:>7} {checkpoint:>12} {lag:>10} {in_flight:>10} {parked:>8}");
    }
    if let (Some(url), Some(db)) = (&cfg.distributed.redis_url, &db) {
        let redis = connect_redis(url, cfg.distributed.store_timeout).await?;
        let counts = Versions::counts_at(&redis, &cfg.distributed.redis_prefix, read_pointer(db, COUNTS).await?.active);
        let state = if counts.is_ready().await? { "complete" } else { "REBUILDING (reads answer 503 until done)" };
        println!("redis unread counts: {state}");
    }
    Ok(())
}

/// The fan-out's partitions together: (checkpoint, lag, in flight). Its
/// checkpoint is the log sequence before the oldest event still in its
/// feed (every event up to it is fanned out: the feed is a work queue), or
/// what the feed has sourced from the log when it is empty; the lag counts
/// the events of every partition not applied yet.
async fn partitions_state(log: &NatsLog, cfg: &Config, version: u32) -> (String, String, String) {
    let not_started = || ("-".into(), "(not started)".into(), "-".into());
    let Ok(mut feed) = log.jetstream().get_stream(fanout_stream(&cfg.distributed.stream)).await else { return not_started() };
    let Ok(info) = feed.info().await.cloned() else { return not_started() };
    let checkpoint = if info.state.messages > 0 {
        match feed.get_raw_message(info.state.first_sequence).await {
            Ok(oldest) => origin_seq(Some(&oldest.headers)).map_or("?".into(), |seq| (seq - 1).to_string()),
            Err(_) => "?".into(),
        }
    } else {
        let lag = info.sources.first().map_or(0, |s| s.lag);
        log.head().await.map_or("?".into(), |head| head.saturating_sub(lag).to_string())
    };
    let (mut lag, mut in_flight) = (0u64, 0u64);
    for index in 0..PARTITIONS {
        if let Ok(info) = feed.consumer_info(partition_consumer(fanout::NAME, version, index)).await {
            lag += info.num_pending;
            in_flight += info.num_ack_pending as u64;
        }
    }
    (checkpoint, lag.to_string(), in_flight.to_string())
}

async fn parked_counts(log: &NatsLog, cfg: &Config) -> anyhow::Result<Vec<(String, usize)>> {
    use futures::StreamExt;
    let stream = log.jetstream().get_stream(parked_stream(&cfg.distributed.stream)).await?;
    let mut subjects = stream.info_with_subjects(parked_subject(&cfg.log.subject_prefix, ">")).await?;
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
    let mut stream = log.jetstream().get_stream(parked_stream(&cfg.distributed.stream)).await?;
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
    if cfg.mode()? == crate::config::Mode::Embedded {
        return embedded_parked_list(cfg);
    }
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

/// `natter parked list` for an embedded node: the lines of
/// `<data dir>/parked.jsonl` (readable while the node runs). There is no
/// retry: an embedded node applies every event again at each start.
fn embedded_parked_list(cfg: &Config) -> anyhow::Result<()> {
    let path = cfg.embedded.data_dir.join("parked.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut any = false;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        any = true;
        let p: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|_| serde_json::json!({ "reason": line }));
        println!("{:<14} log seq {:<8} at {}\n        reason: {}", p["projection"].as_str().unwrap_or("?"), p["seq"], p["at"].as_str().unwrap_or("?"), p["reason"].as_str().unwrap_or("?"));
    }
    if !any {
        println!("no parked events ({})", path.display());
    } else {
        println!("(embedded node: fix the cause, then restart natter; it applies every event again at start)");
    }
    Ok(())
}

/// `natter parked retry`: applies parked events again (all, or the given
/// parked sequence numbers); those that now apply are removed from the
/// parked stream, the others stay with their new reason printed.
pub async fn parked_retry(cfg: &Config, only: &[u64]) -> anyhow::Result<()> {
    let log = connect_log(cfg).await?;
    let mongo_url = cfg.distributed.mongo_url.as_deref().context("NATTER_MONGO_URL is not set")?;
    let redis_url = cfg.distributed.redis_url.as_deref().context("NATTER_REDIS_URL is not set")?;
    let db = connect_mongo(mongo_url, &cfg.distributed.mongo_db).await?;
    let versions = Versions::open(db, connect_redis(redis_url, cfg.distributed.store_timeout).await?, &cfg.distributed.redis_prefix, None).await?;
    let (views, counts) = (versions.views.clone(), versions.counts.clone());
    let bus = NatsPush::connect(log.client().clone(), log.jetstream().clone(), Arc::new(log.clone()), &cfg.distributed.stream, &cfg.log.subject_prefix, (&cfg.push).into(), None).await?;
    let fanout = Arc::new(FanOut::new(Arc::new(bus), cfg.log.subject_prefix.clone(), Arc::new(log.clone()), views.clone(), cfg.push.announce_max));
    let projections: [Arc<dyn Projection>; 3] = [views, counts, fanout];
    let stream = log.jetstream().get_stream(parked_stream(&cfg.distributed.stream)).await?;
    let (mut fixed, mut still) = (0, 0);
    for p in parked(&log, cfg).await? {
        if !only.is_empty() && !only.contains(&p.seq) {
            continue;
        }
        let projection = projections.iter().find(|x| x.name() == p.projection);
        let decoded = Envelope::decode(&p.payload);
        // Pushing a message deleted since would store its content again
        // after the tombstone, where no erase looks: it is not pushed.
        if p.projection == crate::push::fanout::NAME
            && let Ok(env) = &decoded
            && let Some(id) = shown_message(env)
            && natter_projections::ViewStore::contents(&*versions.views, &[id.to_owned()]).await?.get(id).is_some_and(|c| c.deleted)
        {
            stream.delete_message(p.seq).await?;
            fixed += 1;
            println!("#{} {}: its message was deleted since: not pushed again, removed from the parked stream", p.seq, p.projection);
            continue;
        }
        let outcome = match (projection, decoded) {
            (None, _) => Err(format!("no projection named {:?}", p.projection)),
            (_, Err(e)) => Err(format!("still undecodable: {e}")),
            (Some(x), Ok(env)) => tokio::time::timeout(Duration::from_secs(30), x.apply_at(&env, p.log_seq.parse().unwrap_or(0)))
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

/// The message whose content an event's deliveries show (a send, an edit,
/// a reaction; not a deletion, whose tombstone holds none).
fn shown_message(env: &Envelope) -> Option<&str> {
    match &env.event {
        Event::MessageSent(e) => Some(&e.message_id),
        Event::MessageEdited(e) => Some(&e.message.message_id),
        Event::RoomMessageSent(e) => Some(&e.message_id),
        Event::RoomMessageEdited(e) => Some(&e.message.message_id),
        Event::ReactionChanged(e) => Some(&e.message_id),
        _ => None,
    }
}

/// `natter rebuild <mongo-views|redis-unseen|all>`: builds a new version of
/// a projection beside the live one from the first event of the log, shows
/// progress, keeps up with new events (nodes write to both versions while it
/// builds), switches readers atomically once caught up, then drops the old
/// version.
pub async fn rebuild(cfg: &Config, which: &str) -> anyhow::Result<()> {
    let targets = match which {
        "all" => vec![VIEWS, COUNTS],
        VIEWS => vec![VIEWS],
        COUNTS => vec![COUNTS],
        other => anyhow::bail!("cannot rebuild {other:?}: choose {VIEWS}, {COUNTS} or all"),
    };
    let log = connect_log(cfg).await?;
    let db = connect_mongo(cfg.distributed.mongo_url.as_deref().context("NATTER_MONGO_URL is not set")?, &cfg.distributed.mongo_db).await?;
    let redis = connect_redis(cfg.distributed.redis_url.as_deref().context("NATTER_REDIS_URL is not set")?, cfg.distributed.store_timeout).await?;
    for name in targets {
        rebuild_one(cfg, &log, &db, &redis, name).await.with_context(|| format!("rebuilding {name}"))?;
    }
    Ok(())
}

/// How long nodes may take to notice a pointer change (they re-read every second).
const POINTER_PROPAGATION: Duration = Duration::from_millis(2500);

async fn rebuild_one(cfg: &Config, log: &NatsLog, db: &mongodb::Database, redis: &redis::aio::ConnectionManager, name: &'static str) -> anyhow::Result<()> {
    let pointer = read_pointer(db, name).await?;
    let old = pointer.active;
    // An interrupted earlier build left `building` set: its storage and
    // consumer are those of `old + 1`, which are cleared below and reused.
    let new = old + 1;
    let durable = |v: u32| consumer_name(name, v);
    let stream = log.jetstream().get_stream(&cfg.distributed.stream).await?;
    let _ = stream.delete_consumer(&durable(new)).await; // leftovers of an abandoned build
    let projection: Arc<dyn Projection> = if name == VIEWS {
        MongoViews::drop_version(db, new).await?;
        Arc::new(Switch::new(VIEWS, new, Arc::new(MongoViews::open_version(db, new).await?)))
    } else {
        let counts = Versions::counts_at(redis, &cfg.distributed.redis_prefix, new);
        counts.clear().await?;
        Arc::new(Switch::new(COUNTS, new, Arc::new(counts)))
    };
    write_pointer(db, name, Pointer { active: old, building: Some(new) }).await?;
    eprintln!("{name}: building v{new} beside live v{old}; nodes write new events to both");
    tokio::time::sleep(POINTER_PROPAGATION).await;

    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let projector = Projector {
        js: log.jetstream().clone(),
        feed: Feed::Log { stream: cfg.distributed.stream.clone() },
        prefix: cfg.log.subject_prefix.clone(),
        projection,
        metrics: Arc::new(Metrics::default()),
    };
    let task = tokio::spawn(projector.run(stop_rx));
    let started = Instant::now();
    loop {
        let head = log.head().await?;
        let info = stream.consumer_info(&durable(new)).await.ok();
        let done = info.as_ref().map_or(0, |i| i.ack_floor.stream_sequence);
        let pending = info.as_ref().map_or(u64::MAX, |i| i.num_pending + i.num_ack_pending as u64);
        let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
        let eta = if rate > 0.0 { head.saturating_sub(done) as f64 / rate } else { 0.0 };
        eprint!("\r{name} v{new}: {done}/{head} events, {rate:.0} events/s, ETA {eta:.0} s    ");
        if done >= head && pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!();
    let caught_up = started.elapsed().as_secs_f64();
    let events = log.head().await?;
    println!("{name} v{new}: caught up with {events} events in {caught_up:.1} s ({:.0} events/s)", events as f64 / caught_up.max(0.001));
    if name == COUNTS {
        Versions::counts_at(redis, &cfg.distributed.redis_prefix, new).mark_ready().await?;
    }
    // Readers switch to v{new}, but every node keeps writing v{old} too
    // while others may still read it: a node that has switched must not
    // leave holes in the version an unswitched node reads.
    write_pointer(db, name, Pointer { active: new, building: Some(old) }).await?;
    eprintln!("{name}: readers switched to v{new}");
    tokio::time::sleep(POINTER_PROPAGATION).await;
    // Every node reads v{new} now: stop writing v{old}, and let every node
    // follow (and move its projector to v{new}) before this process stops
    // projecting and the old version goes.
    write_pointer(db, name, Pointer { active: new, building: None }).await?;
    tokio::time::sleep(POINTER_PROPAGATION).await;
    let _ = stop.send(true);
    let _ = task.await;
    if name == VIEWS {
        MongoViews::drop_version(db, old).await?;
    } else {
        Versions::counts_at(redis, &cfg.distributed.redis_prefix, old).clear().await?;
    }
    let _ = stream.delete_consumer(&durable(old)).await;
    eprintln!("{name}: dropped v{old}");
    println!("{name} rebuilt: v{new} is live ({:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}

/// `natter migrate --from <data dir> --to <nats url>`: copies an embedded
/// node's event log into a JetStream deployment, event by event, keeping
/// every envelope (ids, positions, times, command ids) as it is. Appends use
/// the same optimistic concurrency and deduplication as live commands, so a
/// migration that is interrupted can simply be run again. Distributed nodes
/// started on the target build their views from the migrated log.
pub async fn migrate(cfg: &Config, from: &std::path::Path, to: &str) -> anyhow::Result<()> {
    use crate::config::SyncPolicy;
    use crate::log::file::FileLog;
    if !from.join("events.log").exists() {
        anyhow::bail!("{} holds no event log (events.log): pass the embedded node's data directory with --from", from.display());
    }
    // Opening takes the directory's lock: the node must be stopped (opening
    // cuts a torn tail, which would be a live node's half-written record).
    let source = FileLog::open(from, SyncPolicy::Always, cfg.log.dedup_window)
        .with_context(|| format!("opening {} (stop the embedded node before migrating its data)", from.display()))?;
    let target = NatsLog::connect(to, &cfg.distributed.stream, &cfg.log.subject_prefix, cfg.log.dedup_window).await?.compact_events(cfg.log.compact_events);
    let total = source.head().await?;
    let started = Instant::now();
    let (mut copied, mut skipped, mut after) = (0u64, 0u64, 0u64);
    loop {
        let batch = source.read_after(after, 512)?;
        let Some(last) = batch.last() else { break };
        after = last.log_seq;
        for logged in batch {
            let env = logged.envelope;
            if !env.subject.starts_with(&format!("{}.", cfg.log.subject_prefix)) {
                anyhow::bail!(
                    "event {} is on subject {:?}, outside the subject prefix {:?} of the target: run migrate with the \
                     NATTER_SUBJECT_PREFIX the embedded node used (nodes of the target must use it too)",
                    logged.log_seq,
                    env.subject,
                    cfg.log.subject_prefix
                );
            }
            let current = target.last(&env.subject).await?;
            // Already there (an earlier, interrupted run): skip it.
            if current.as_ref().is_some_and(|c| c.envelope.position >= env.position) {
                skipped += 1;
                continue;
            }
            let expected = current.map_or(0, |c| c.log_seq);
            let appended = target.append(&env, expected).await.with_context(|| format!("copying event {} ({})", logged.log_seq, env.id))?;
            if appended.duplicate {
                skipped += 1;
            } else {
                copied += 1;
            }
        }
        eprint!("\rmigrated {after}/{total} events ({:.0}/s)    ", after as f64 / started.elapsed().as_secs_f64().max(0.001));
    }
    eprintln!();
    // Real-time delivery starts after the migrated history: the push
    // fan-out does not re-push it, and the inbox numbers deliveries after the
    // embedded cursors (which were log sequences), so a client resuming with
    // one gets `resync` rather than someone else's deliveries.
    let head = target.head().await?;
    ensure_feed(target.jetstream(), &cfg.distributed.stream, &cfg.log.subject_prefix, Some(head + 1), 1)
        .await
        .context("creating the push fan-out feed after the migrated history")?;
    NatsPush::connect(
        target.client().clone(),
        target.jetstream().clone(),
        Arc::new(target.clone()),
        &cfg.distributed.stream,
        &cfg.log.subject_prefix,
        (&cfg.push).into(),
        Some(head + 1),
    )
    .await?;
    println!("migrated {copied} events to {to} (stream {}), {skipped} already there", cfg.distributed.stream);
    Ok(())
}
