//! The distributed mode's adapters: the log in NATS JetStream, views in
//! MongoDB, unread counts and presence in Redis, push through NATS. Any
//! number of nodes share them.
//!
//! - [`connect`]: connects the services and returns the [`Adapters`].
//! - [`live_versions`]: which version of each rebuildable projection
//!   (MongoDB views, Redis counts) is live, followed by every node.
//! - [`counts_recovery`]: rebuilds the Redis unread counts when Redis loses
//!   them.

pub mod counts_recovery;
pub mod live_versions;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use async_trait::async_trait;
use mongodb::bson::doc;
use natter_projections::Projection;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::adapters::Adapters;
use crate::config::{Config, Mode};
use crate::log::{EventLog, LogError, ViewsProgress};
use crate::log::nats::{NatsLog, parked_stream, place};
use crate::push::erase::{Eraser, erase_stream};
use crate::push::inbox_stream;
use crate::metrics::Metrics;
use crate::presence::redis::RedisPresence;
use crate::projector::jetstream::{Feed, Projector};
use crate::projector::partitions::{PARTITIONS, Pins, ensure_feed, fanout_stream};
use crate::projector::{Runner, consumer_name};
use crate::push::nats::NatsPush;
use crate::telemetry::redact;
use counts_recovery::Healer;
use live_versions::Versions;

pub async fn connect_mongo(url: &str, db: &str) -> anyhow::Result<mongodb::Database> {
    let mut options = mongodb::options::ClientOptions::parse(url)
        .await
        .with_context(|| format!("NATTER_MONGO_URL {:?} is not a valid MongoDB URL", redact(url)))?;
    options.app_name = Some("natter".into());
    options.server_selection_timeout = Some(Duration::from_secs(5));
    options.connect_timeout = Some(Duration::from_secs(5));
    let client = mongodb::Client::with_options(options)?;
    let db = client.database(db);
    db.run_command(doc! {"ping": 1})
        .await
        .with_context(|| format!("cannot reach MongoDB at {} (is it running?)", redact(url)))?;
    Ok(db)
}

/// Connects to Redis; every command fails after `timeout` without an answer.
pub async fn connect_redis(url: &str, timeout: Duration) -> anyhow::Result<redis::aio::ConnectionManager> {
    let client = redis::Client::open(url).with_context(|| format!("NATTER_REDIS_URL {:?} is not a valid Redis URL", redact(url)))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(timeout));
    let mut conn = tokio::time::timeout(Duration::from_secs(10), redis::aio::ConnectionManager::new_with_config(client, config))
        .await
        .map_err(|_| anyhow::anyhow!("cannot reach Redis at {} within 10 s", redact(url)))?
        .with_context(|| format!("cannot reach Redis at {} (is it running?)", redact(url)))?;
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .with_context(|| format!("Redis at {} does not answer PING", redact(url)))?;
    Ok(conn)
}

/// The URL of a service the distributed mode needs.
fn url<'a>(url: &'a Option<String>, var: &str) -> anyhow::Result<&'a str> {
    url.as_deref().with_context(|| format!("{var} is not set (the distributed mode needs NATTER_NATS_URL, NATTER_MONGO_URL and NATTER_REDIS_URL)"))
}

/// Connects to NATS, MongoDB and Redis (failing clearly when one cannot be
/// reached). `node_id` names this node's locks and presence.
pub async fn connect(cfg: &Config, node_id: &str) -> anyhow::Result<Adapters> {
    let d = &cfg.distributed;
    let (nats_url, mongo_url, redis_url) = (url(&d.nats_url, "NATTER_NATS_URL")?, url(&d.mongo_url, "NATTER_MONGO_URL")?, url(&d.redis_url, "NATTER_REDIS_URL")?);
    // Two Redis connections: requests' (rate limits, presence, healing)
    // fail after the store timeout; the counts' own may take as long as a
    // projector's batch (their reads are bounded by the switch).
    let (log, db, redis, counts_redis) = tokio::try_join!(
        NatsLog::connect(nats_url, &d.stream, &cfg.log.subject_prefix, cfg.log.dedup_window),
        connect_mongo(mongo_url, &d.mongo_db),
        connect_redis(redis_url, d.store_timeout),
        connect_redis(redis_url, d.store_timeout * natter_projections::switch::BATCH_LIMIT_FACTOR),
    )?;
    let log = log.compact_events(cfg.log.compact_events);
    let versions = Arc::new(
        Versions::open(db, counts_redis.clone(), &d.redis_prefix, Some(d.store_timeout))
            .await
            .with_context(|| format!("opening the views in MongoDB database {}", d.mongo_db))?,
    );
    let log_port: Arc<dyn EventLog> = Arc::new(log.clone());
    let progress = ViewsConsumer { stream: log.jetstream().get_stream_no_info(&d.stream).await?, versions: versions.clone() };
    let bus = NatsPush::connect(log.client().clone(), log.jetstream().clone(), log_port.clone(), &d.stream, &cfg.log.subject_prefix, (&cfg.push).into(), None).await?;
    for stream in [d.stream.clone(), parked_stream(&d.stream), inbox_stream(&d.stream), erase_stream(&d.stream)] {
        place(log.jetstream(), log.client(), &stream, d.stream_replicas).await?;
    }
    let healer = Healer {
        counts: versions.counts.clone(),
        js: log.jetstream().clone(),
        stream: d.stream.clone(),
        log: log_port.clone(),
        owner: node_id.to_owned(),
        // It rebuilds the counts in batches: the counts' connection.
        redis: counts_redis,
        redis_base: d.redis_prefix.clone(),
    };
    let runner = JetStreamRunner {
        js: log.jetstream().clone(),
        client: log.client().clone(),
        replicas: d.stream_replicas,
        stream: d.stream.clone(),
        prefix: cfg.log.subject_prefix.clone(),
        versions: versions.clone(),
        healer,
        eraser: Eraser { js: log.jetstream().clone(), stream: d.stream.clone() },
    };
    Ok(Adapters {
        mode: Mode::Distributed,
        log: log_port,
        views: versions.views.clone(),
        counts: versions.counts.clone(),
        projections: vec![versions.views.clone(), versions.counts.clone()],
        progress: Arc::new(progress),
        bus: Arc::new(bus),
        counter: Arc::new(crate::ratelimit::redis::RedisCounter::new(redis.clone(), &d.redis_prefix)),
        presence: Arc::new(RedisPresence::new(redis, &d.redis_prefix, cfg.push.presence_ttl)),
        runner: Box::new(runner),
        stored_secret: None,
        after_drain: Box::new(|| {}),
        describe: format!(
            "distributed mode: NATS {} stream {}, MongoDB {} database {}, Redis {}",
            redact(nats_url),
            d.stream,
            redact(mongo_url),
            d.mongo_db,
            redact(redis_url)
        ),
        collectors: vec![Box::new(NatsConnection(log.client().clone()))],
    })
}

/// The node's NATS connection, as `/metrics` series: how often it
/// connected (the first time and every reconnect after a server was lost)
/// and whether it is connected now.
struct NatsConnection(async_nats::Client);

impl std::fmt::Debug for NatsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsConnection")
    }
}

impl prometheus_client::collector::Collector for NatsConnection {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::{counter::ConstCounter, gauge::ConstGauge};
        let connects = ConstCounter::new(self.0.statistics().connects.load(std::sync::atomic::Ordering::Relaxed));
        let help = "Connections this node made to NATS (1 + reconnects after losing a server)";
        connects.encode(encoder.encode_descriptor("natter_nats_connects", help, None, connects.metric_type())?)?;
        let up = ConstGauge::new(i64::from(self.0.connection_state() == async_nats::connection::State::Connected));
        up.encode(encoder.encode_descriptor("natter_nats_connected", "1 while this node is connected to a NATS server", None, up.metric_type())?)?;
        Ok(())
    }
}

/// How far the live views have applied the log: the acknowledgement floor
/// of their durable consumer (every event at or below it is applied, or
/// parked).
struct ViewsConsumer {
    stream: jetstream::stream::Stream<()>,
    versions: Arc<Versions>,
}

#[async_trait]
impl ViewsProgress for ViewsConsumer {
    async fn applied_through(&self) -> Result<u64, LogError> {
        use jetstream::context::ConsumerInfoErrorKind;
        let durable = consumer_name(live_versions::VIEWS, self.versions.views.active_version());
        match self.stream.consumer_info(&durable).await {
            Ok(info) => Ok(info.ack_floor.stream_sequence),
            // Not created yet (a node starting on a fresh deployment): nothing is known to be applied.
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => Ok(0),
            Err(e) => Err(LogError::Unavailable(format!("nats: reading consumer {durable}: {e}"))),
        }
    }
}

/// Where a new partitioned feed of `projection` starts: after what the
/// projection's unpartitioned consumer (natter before partitions) had
/// acknowledged, so an upgraded deployment neither repeats nor skips
/// deliveries; after the log's current end when the log holds events
/// already (a lost feed, a log filled by other means: history is not pushed
/// again); from the first event of a new log.
async fn feed_start(js: &jetstream::Context, stream: &str, projection: &dyn Projection) -> anyhow::Result<Option<u64>> {
    let legacy = consumer_name(projection.name(), projection.version());
    let mut log = js.get_stream(stream).await?;
    if let Ok(info) = log.consumer_info(&legacy).await {
        return Ok(Some(info.ack_floor.stream_sequence + 1));
    }
    let head = log.info().await?.state.last_sequence;
    Ok((head > 0).then_some(head + 1))
}

/// Durable JetStream consumers shared by every node, the live-version
/// follower, and the unread counts' recovery.
struct JetStreamRunner {
    js: jetstream::Context,
    /// `NATTER_STREAM_REPLICAS`, for the fan-out feed made here.
    replicas: usize,
    client: async_nats::Client,
    stream: String,
    prefix: String,
    versions: Arc<Versions>,
    healer: Healer,
    /// Erases deleted messages' copies from the push inbox.
    eraser: Eraser,
}

#[async_trait]
impl Runner for JetStreamRunner {
    fn in_log_order(&self) -> bool {
        false
    }

    async fn start(
        self: Box<Self>,
        projections: Vec<Arc<dyn Projection>>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let JetStreamRunner { js, replicas, client, stream, prefix, versions, healer, eraser } = *self;
        // Before the counts projector starts: if Redis has lost the counts (or
        // this is a fresh deployment), restart it from the beginning of the log.
        let heal_to = healer.begin().await.context("checking the unread counts in Redis")?;
        let mut tasks = Vec::new();
        for projection in projections {
            let feeds = if projection.ordered() {
                ensure_feed(&js, &stream, &prefix, feed_start(&js, &stream, projection.as_ref()).await?, replicas).await?;
                place(&js, &client, &fanout_stream(&stream), replicas).await?;
                let pins = Arc::new(Pins::default());
                (0..PARTITIONS).map(|index| Feed::Partition { stream: fanout_stream(&stream), index, pins: pins.clone() }).collect()
            } else {
                vec![Feed::Log { stream: stream.clone() }]
            };
            for feed in feeds {
                let projector = Projector { js: js.clone(), feed, prefix: prefix.clone(), projection: projection.clone(), metrics: metrics.clone() };
                tasks.push(tokio::spawn(projector.run(shutdown.clone())));
            }
        }
        tasks.push(tokio::spawn(versions.run(shutdown.clone())));
        tasks.push(tokio::spawn(eraser.run(shutdown.clone())));
        if let Some(target) = heal_to {
            // Serve only once the counts are whole when that is quick; if it is
            // not, serve anyway (count reads answer 503 rebuilding until done).
            if let Err(e) = healer.finish(target).await {
                tracing::error!(error = %format!("{e:#}"), "unread counts not rebuilt at start-up; serving, and retrying in the background");
            }
        }
        tasks.push(tokio::spawn(healer.run(shutdown)));
        Ok(tasks)
    }
}
