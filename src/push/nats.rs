//! The distributed push bus: the inbox stream `<STREAM>_INBOX`, republished
//! on core NATS, shared by every node.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;

use super::{Delivery, Payload, PushBus, Pushed, Replay, inbox_stream, inbox_subject, push_subject, signal_subject};

/// How much the inbox keeps for resume: deliveries older than `retention`
/// or beyond `max_bytes` (oldest first) go, and their cursors get `resync`.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub retention: Duration,
    pub max_bytes: u64,
}

impl From<&crate::config::Push> for Bounds {
    fn from(push: &crate::config::Push) -> Bounds {
        Bounds { retention: push.retention, max_bytes: push.max_bytes }
    }
}

/// Deliveries published before their acks are awaited. Every fan-out
/// partition of a node may be publishing a window at once, through this
/// context, whose pending acks are limited to 5,000: 16 × 256 stays under.
const PUBLISH_WINDOW: usize = 256;

pub struct NatsPush {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    inbox: String,
}

fn header_u64(headers: Option<&async_nats::HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}

impl NatsPush {
    /// Makes sure the inbox stream exists (with republish to the push
    /// subjects). Deliveries are published through a JetStream context of
    /// their own: a large fan-out never takes pending-ack slots from the
    /// log's appends.
    pub async fn connect(client: async_nats::Client, js: jetstream::Context, stream_name: &str, prefix: &str, bounds: Bounds) -> anyhow::Result<NatsPush> {
        Self::connect_from(client, js, stream_name, prefix, bounds, None).await
    }

    /// As [`NatsPush::connect`]; a stream created now numbers its first
    /// delivery `first` (so cursors from an earlier deployment fall before
    /// it and get `resync`).
    pub async fn connect_from(
        client: async_nats::Client,
        js: jetstream::Context,
        stream_name: &str,
        prefix: &str,
        bounds: Bounds,
        first: Option<u64>,
    ) -> anyhow::Result<NatsPush> {
        let Bounds { retention, max_bytes } = bounds;
        let inbox = inbox_stream(stream_name);
        let mut created = js
            .get_or_create_stream(stream::Config {
            name: inbox.clone(),
            subjects: vec![format!("{prefix}.inbox.user.*")],
            storage: stream::StorageType::File,
            max_age: retention,
            max_bytes: max_bytes as i64,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: Duration::from_secs(120).min(retention),
            allow_direct: true,
            first_sequence: first,
            republish: Some(stream::Republish {
                source: format!("{prefix}.inbox.user.*"),
                destination: format!("{prefix}.push.user.{{{{wildcard(1)}}}}"),
                headers_only: false,
            }),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the push inbox stream {inbox}"))?;
        // An inbox made with other bounds takes the configured ones.
        let config = created.info().await.with_context(|| format!("reading the push inbox stream {inbox}"))?.config.clone();
        if config.max_age != retention || config.max_bytes != max_bytes as i64 {
            let duplicate_window = Duration::from_secs(120).min(retention);
            js.update_stream(stream::Config { max_age: retention, max_bytes: max_bytes as i64, duplicate_window, ..config })
                .await
                .with_context(|| format!("setting the bounds of the push inbox stream {inbox}"))?;
        }
        let js = jetstream::new(client.clone());
        Ok(NatsPush { client, js, prefix: prefix.to_owned(), inbox })
    }

    async fn stream_state(&self) -> anyhow::Result<stream::State> {
        let mut s = self.js.get_stream(&self.inbox).await?;
        Ok(s.info().await?.state.clone())
    }
}

fn live_delivery(user: &str, msg: async_nats::Message) -> Option<Pushed> {
    let headers = msg.headers.as_ref();
    let (Some(cursor), Some(previous)) = (header_u64(headers, "Nats-Sequence"), header_u64(headers, "Nats-Last-Sequence")) else {
        tracing::warn!(%user, subject = %msg.subject, "push without stream sequence headers; dropped");
        return None;
    };
    match serde_json::from_slice::<Payload>(&msg.payload) {
        Ok(payload) => Some(Pushed::Delivery(Delivery { cursor, previous, payload })),
        Err(e) => {
            tracing::warn!(%user, cursor, error = %e, "undecodable push; the socket will fetch it on the next gap check");
            None
        }
    }
}

#[async_trait]
impl PushBus for NatsPush {
    async fn deliver(&self, event: &natter_events::Envelope, _log_seq: u64, deliveries: Vec<(String, Payload)>) -> Result<(), String> {
        // Send a window of deliveries, then wait for its acks: a round trip
        // per window rather than per member (publishes on one connection are
        // stored in the order sent), and never more acks pending than the
        // context allows, whatever the room's size (waiting on more than
        // that would wait forever).
        let mut deliveries = deliveries.into_iter().peekable();
        while deliveries.peek().is_some() {
            let mut acks = Vec::with_capacity(PUBLISH_WINDOW);
            for (user, payload) in deliveries.by_ref().take(PUBLISH_WINDOW) {
                let body = serde_json::to_vec(&payload).map_err(|e| e.to_string())?;
                let publish = jetstream::message::PublishMessage::build().payload(body.into()).message_id(format!("{}:{user}", event.id));
                acks.push(self.js.send_publish(inbox_subject(&self.prefix, &user), publish).await.map_err(|e| format!("nats: {e}"))?);
            }
            for ack in acks {
                ack.await.map_err(|e| format!("nats: {e}"))?;
            }
        }
        Ok(())
    }

    async fn head(&self) -> anyhow::Result<u64> {
        Ok(self.stream_state().await?.last_sequence)
    }

    async fn replay(&self, user: &str, cursor: u64, limit: usize) -> anyhow::Result<Replay> {
        let state = self.stream_state().await?;
        if cursor > state.last_sequence || cursor + 1 < state.first_sequence {
            return Ok(Replay::TooOld { head: state.last_sequence });
        }
        let stream = self.js.get_stream(&self.inbox).await?;
        let subject = inbox_subject(&self.prefix, user);
        let mut page = Vec::new();
        let mut previous = cursor;
        while page.len() < limit {
            match stream.direct_get_next_for_subject(&subject, Some(previous + 1)).await {
                Ok(msg) => {
                    let payload: Payload = serde_json::from_slice(&msg.payload)
                        .with_context(|| format!("inbox message {} is not a delivery", msg.sequence))?;
                    page.push(Delivery { cursor: msg.sequence, previous, payload });
                    previous = msg.sequence;
                }
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Replay::Page(page))
    }

    async fn subscribe(&self, user: &str) -> anyhow::Result<BoxStream<'static, Pushed>> {
        let live = self.client.subscribe(push_subject(&self.prefix, user)).await?;
        let signals = self.client.subscribe(signal_subject(&self.prefix, user)).await?;
        // The server has the subscriptions once it answers a flush.
        self.client.flush().await?;
        let owner = user.to_owned();
        let live = live.filter_map(move |msg| futures::future::ready(live_delivery(&owner, msg)));
        let signals = signals.filter_map(|msg| futures::future::ready(serde_json::from_slice::<Payload>(&msg.payload).ok().map(Pushed::Signal)));
        Ok(futures::stream::select(live, signals).boxed())
    }

    async fn signal(&self, to: &str, payload: &Payload) -> anyhow::Result<()> {
        let body = serde_json::to_vec(payload)?;
        self.client.publish(signal_subject(&self.prefix, to), body.into()).await?;
        Ok(())
    }
}
