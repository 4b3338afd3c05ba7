//! The partitioned feed of ordered projections (the push fan-out) in the
//! distributed mode.
//!
//! An ordered projection needs each conversation's and each room's events
//! in log order; it does not need the whole log in one line.
//! So it does not consume the log directly: `<STREAM>_FANOUT`, a work-queue
//! stream, sources the log's direct-conversation, room and membership
//! subjects, and NATS's subject transforms put each into one of
//! [`PARTITIONS`] partitions by the conversation's user pair or the room id:
//!
//! ```text
//! <prefix>.ev.dm.<lo>.<hi>          → <prefix>.fan.<p(lo,hi)>.dm.<lo>.<hi>
//! <prefix>.ev.room.<room>           → <prefix>.fan.<p(room)>.room.<room>
//! <prefix>.ev.member.<room>.<user>  → <prefix>.fan.<p(room)>.member.<room>.<user>
//! ```
//!
//! A room's messages and its membership changes land in the same partition,
//! in log order. Each partition has its own durable consumer, and every node
//! pulls from every partition: a busy room holds up only its own partition,
//! the partitions are fanned out at once, and capacity grows with nodes.
//!
//! One node at a time works a partition, in batches, under a NATS pin
//! (see [`super::pinned`]).
//! Sourcing keeps the log's order and says each event's log sequence in the
//! `Nats-Stream-Source` header ([`origin_seq`]); an event leaves the stream
//! once its partition acknowledged it. Account events make no deliveries
//! and are not sourced. NATS 2.15 or newer keeps a source's position across
//! server restarts even when the feed is empty (older servers would source
//! again from the feed's start): [`crate::log::nats::NatsLog::connect`]
//! refuses older servers.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use anyhow::Context;
use async_nats::jetstream::{self, stream};

use super::consumer_name;
use crate::metrics::Metrics;

/// Partitions of the fan-out. Fixed: the transforms of an existing stream
/// decide where events go, so changing it needs a new stream.
pub const PARTITIONS: u32 = 16;

/// What a node knows of the fan-out partitions' pins, shared by its
/// partition projectors: which pins it holds, and how many pulls each
/// partition had waiting when last looked at (about one per node: the
/// pinned node's, and each standby node's).
#[derive(Debug, Default)]
pub struct Pins {
    held: AtomicU32,
    pullers: [AtomicUsize; PARTITIONS as usize],
}

impl Pins {
    /// Records whether this node holds partition `index`'s pin; returns
    /// how many it holds.
    pub(super) fn set(&self, index: u32, ours: bool, metrics: &Metrics) -> u32 {
        let bit = 1 << index;
        let held = if ours { self.held.fetch_or(bit, Ordering::Relaxed) | bit } else { self.held.fetch_and(!bit, Ordering::Relaxed) & !bit };
        metrics.fanout_pinned(held.count_ones());
        held.count_ones()
    }

    /// This node's share of the partitions, from the pulls each partition
    /// had waiting: the fewest of them is a lower bound on the nodes (a
    /// node between two pulls is missed), so the share errs large.
    pub(super) fn share(&self, index: u32, pullers: usize) -> u32 {
        self.pullers[index as usize].store(pullers, Ordering::Relaxed);
        let nodes = self.pullers.iter().map(|p| p.load(Ordering::Relaxed)).filter(|&n| n > 0).min().unwrap_or(1).max(1) as u32;
        PARTITIONS.div_ceil(nodes)
    }
}

/// The partitioned feed beside the log `stream`.
pub fn fanout_stream(stream: &str) -> String {
    format!("{stream}_FANOUT")
}

/// The subjects of partition `index`.
pub fn partition_subject(prefix: &str, index: u32) -> String {
    format!("{prefix}.fan.{index}.>")
}

/// The durable consumer of partition `index` of a projection.
pub fn partition_consumer(projection: &str, version: u32, index: u32) -> String {
    format!("{}-p{index}", consumer_name(projection, version))
}

/// The log sequence of a sourced event, from its `Nats-Stream-Source`
/// header (`<stream> <seq> …`).
pub fn origin_seq(headers: Option<&async_nats::HeaderMap>) -> Option<u64> {
    headers?.get("Nats-Stream-Source")?.as_str().split(' ').nth(1)?.parse().ok()
}

/// Makes sure the partitioned feed of the log `stream` exists, with
/// `replicas` copies. A feed created now starts at log sequence `start`
/// (default: the first event).
/// Two nodes creating it at once with different starts both succeed: the
/// first one's feed stands.
pub async fn ensure_feed(js: &jetstream::Context, stream: &str, prefix: &str, start: Option<u64>, replicas: usize) -> anyhow::Result<()> {
    let name = fanout_stream(stream);
    if js.get_stream(&name).await.is_ok() {
        return Ok(());
    }
    let n = PARTITIONS;
    let transform = |source: String, destination: String| stream::SubjectTransform { source, destination };
    let transforms = vec![
        transform(format!("{prefix}.ev.dm.*.*"), format!("{prefix}.fan.{{{{partition({n},1,2)}}}}.dm.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}")),
        transform(format!("{prefix}.ev.room.*"), format!("{prefix}.fan.{{{{partition({n},1)}}}}.room.{{{{wildcard(1)}}}}")),
        transform(
            format!("{prefix}.ev.member.*.*"),
            format!("{prefix}.fan.{{{{partition({n},1)}}}}.member.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"),
        ),
    ];
    let created = js
        .get_or_create_stream(stream::Config {
        name: name.clone(),
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        // Made with its final replicas: a sourcing stream is not moved to
        // another group right after it starts sourcing.
        num_replicas: replicas.max(1),
        sources: Some(vec![stream::Source {
            name: stream.to_owned(),
            start_sequence: start,
            subject_transforms: transforms,
            ..Default::default()
        }]),
        ..Default::default()
    })
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(_) if js.get_stream(&name).await.is_ok() => Ok(()), // another node made it meanwhile
        Err(e) => Err(e).with_context(|| format!("creating the fan-out feed {name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_sequence_comes_from_the_source_header() {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Stream-Source", "NATTER 1234 t.ev.dm.*.*\u{c}t.ev.room.* t.fan.x t.ev.dm.a.b OURchBd0");
        assert_eq!(origin_seq(Some(&h)), Some(1234));
        assert_eq!(origin_seq(None), None);
        assert_eq!(partition_consumer("push-fanout", 1, 7), "push-fanout-v1-p7");
        assert_eq!(partition_subject("t", 3), "t.fan.3.>");
    }
}
