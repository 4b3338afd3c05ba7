//! JetStream adapter of the event log.
//!
//! One stream (default `NATTER`) holds `<prefix>.ev.>`. Appends carry
//! `Nats-Msg-Id` = command id (the stream dedups within its duplicate
//! window) and `Nats-Expected-Last-Subject-Sequence` (optimistic
//! concurrency per conversation). A second stream, `<stream>_PARKED`, holds
//! `<prefix>.parked.>`: events a projector could not apply.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_trait::async_trait;
use natter_events::{Envelope, subjects};

use super::{Appended, EventLog, LogError, Logged};

#[derive(Clone)]
pub struct NatsLog {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    /// The log stream's handle: reads through it cost no stream-info
    /// request (one per call through `get_stream`).
    handle: stream::Stream<()>,
    /// Whether appends write the compact form of direct-conversation events.
    compact: bool,
    dedup_window: Duration,
}

fn unavailable(e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("nats: {e}"))
}

/// Whether a server version (`2.15.1`, `2.16.0-beta.2`) is at least major.minor.
fn version_at_least(version: &str, major: u64, minor: u64) -> bool {
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u64>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// Makes JetStream keep `replicas` copies of `stream` (and so of its
/// consumers, which follow their stream): scales an existing stream up or
/// down, and fails with what to do when the servers cannot place them.
pub async fn place(js: &jetstream::Context, client: &async_nats::Client, stream: &str, replicas: usize) -> anyhow::Result<()> {
    // A server outside a cluster cannot replicate (and some versions
    // accept the setting all the same): refuse here.
    if replicas > 1 && client.server_info().cluster.as_deref().is_none_or(str::is_empty) {
        anyhow::bail!(
            "JetStream cannot keep {replicas} replicas of stream {stream}: the NATS server natter is connected to is not              part of a cluster. NATTER_STREAM_REPLICAS must not exceed the JetStream-enabled servers of the NATS              cluster (1 on a single server, 3 on a three-server cluster)"
        );
    }
    let mut handle = js.get_stream(stream).await.map_err(|e| anyhow::anyhow!("reading JetStream stream {stream}: {e}"))?;
    let config = handle.info().await.map_err(|e| anyhow::anyhow!("reading JetStream stream {stream}: {e}"))?.config.clone();
    if config.num_replicas == replicas {
        return Ok(());
    }
    let from = config.num_replicas;
    js.update_stream(stream::Config { num_replicas: replicas, ..config }).await.map_err(|e| {
        anyhow::anyhow!(
            "JetStream cannot keep {replicas} replicas of stream {stream} (it has {from}): {e}. NATTER_STREAM_REPLICAS              must not exceed the JetStream-enabled servers of the NATS cluster (1 on a single server, 3 on a three-server cluster)"
        )
    })?;
    tracing::info!(stream, from, to = replicas, "JetStream stream replicas changed (NATTER_STREAM_REPLICAS)");
    Ok(())
}

/// The stream of events projectors parked, beside the log `stream`.
pub fn parked_stream(stream: &str) -> String {
    format!("{stream}_PARKED")
}

/// Where events `projection` refused are parked (`>`: all of them).
pub fn parked_subject(prefix: &str, projection: &str) -> String {
    format!("{prefix}.parked.{projection}")
}

impl NatsLog {
    /// Connects and makes sure the streams exist. Fails fast (no silent retry
    /// loop) when the server cannot be reached, so a wrong URL is a clear
    /// start-up error.
    pub async fn connect(url: &str, stream: &str, prefix: &str, dedup_window: Duration) -> anyhow::Result<NatsLog> {
        // A cluster's servers, comma-separated: the client fails over between them.
        let servers = url
            .split(',')
            .map(|one| one.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("NATTER_NATS_URL {} is not a NATS URL or a comma-separated list of them: {e}", crate::telemetry::redact(url)))?;
        let client = async_nats::ConnectOptions::new()
            .name("natter")
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(servers)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to NATS at {}: {e}", crate::telemetry::redact(url)))?;
        // retry_on_initial_connect returns at once; wait for the first connection.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("cannot connect to NATS at {} within 10 s: is nats-server running with JetStream?", crate::telemetry::redact(url));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let version = client.server_info().version;
        if !version_at_least(&version, 2, 15) {
            anyhow::bail!(
                "NATS at {} is version {version}; natter needs nats-server 2.15 or newer (its push fan-out feed relies on \
                 sourced streams keeping their position across server restarts)",
                crate::telemetry::redact(url)
            );
        }
        let js = jetstream::new(client.clone());
        js.get_or_create_stream(stream::Config {
            name: stream.to_owned(),
            subjects: vec![subjects::all_events(prefix)],
            storage: stream::StorageType::File,
            duplicate_window: dedup_window,
            allow_direct: true,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating JetStream stream {stream} on {}: {e} (is JetStream enabled?)", crate::telemetry::redact(url)))?;
        js.get_or_create_stream(stream::Config {
            name: parked_stream(stream),
            subjects: vec![parked_subject(prefix, ">")],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating JetStream stream {}: {e}", parked_stream(stream)))?;
        let handle = js.get_stream_no_info(stream).await?;
        Ok(NatsLog { client, js, stream: stream.to_owned(), handle, compact: true, dedup_window })
    }

    /// Appends write direct-conversation events in their compact form
    /// (`true`, the default) or in the full one, for builds without the
    /// compact forms still reading the log.
    pub fn compact_events(mut self, compact: bool) -> Self {
        self.compact = compact;
        self
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    fn stream(&self) -> &stream::Stream<()> {
        &self.handle
    }

    /// The first event at log sequence `from` or later on a subject `filter` matches.
    async fn next_matching(&self, filter: String, from: u64) -> Result<Option<Logged>, LogError> {
        match self.stream().direct_get_next_for_subject(filter, Some(from.max(1))).await {
            Ok(msg) => Self::decode(msg.sequence, &msg.payload).map(Some),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    fn decode(seq: u64, payload: &[u8]) -> Result<Logged, LogError> {
        let envelope = Envelope::decode(payload).map_err(|source| LogError::Corrupt { seq, source })?;
        Ok(Logged { log_seq: seq, envelope })
    }
}

#[async_trait]
impl EventLog for NatsLog {
    async fn last(&self, subject: &str) -> Result<Option<Logged>, LogError> {
        let stream = self.stream();
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(msg) => Self::decode(msg.sequence, &msg.payload).map(Some),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn append(&self, env: &Envelope, expected_last: u64) -> Result<Appended, LogError> {
        let publish = jetstream::message::PublishMessage::build()
            .payload(env.encode_as(self.compact).into())
            .message_id(&env.command_id)
            .expected_last_subject_sequence(expected_last);
        let ack = self
            .js
            .send_publish(env.subject.clone(), publish)
            .await
            .map_err(unavailable)?
            .await;
        match ack {
            Ok(ack) => Ok(Appended { log_seq: ack.sequence, duplicate: ack.duplicate }),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(LogError::Conflict),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn get(&self, seq: u64) -> Result<Logged, LogError> {
        let stream = self.stream();
        let msg = stream.get_raw_message(seq).await.map_err(unavailable)?;
        Self::decode(msg.sequence, &msg.payload)
    }

    async fn head(&self) -> Result<u64, LogError> {
        let info = self.stream().get_info().await.map_err(unavailable)?;
        Ok(info.state.last_sequence)
    }

    async fn last_before(&self, subject: &str, before: u64) -> Result<Option<Logged>, LogError> {
        // Usually the newest event is older than `before`: one read.
        let last = self.last(subject).await?;
        if last.as_ref().is_none_or(|l| l.log_seq < before) {
            return Ok(last);
        }
        // The subject moved on since: walk it from its first event (member
        // subjects hold a handful of joins, leaves and reads).
        Ok(self.history(subject, before).await?.pop())
    }

    async fn history(&self, subject: &str, before: u64) -> Result<Vec<Logged>, LogError> {
        let stream = self.stream();
        let (mut found, mut from) = (Vec::new(), 1);
        loop {
            match stream.direct_get_next_for_subject(subject, Some(from)).await {
                Ok(msg) if msg.sequence < before => {
                    from = msg.sequence + 1;
                    found.push(Self::decode(msg.sequence, &msg.payload)?);
                }
                Ok(_) => return Ok(found),
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => return Ok(found),
                Err(e) => return Err(unavailable(e)),
            }
        }
    }

    async fn subjects_matching(&self, filter: &str) -> Result<Vec<String>, LogError> {
        use futures::TryStreamExt;
        let stream = self.stream();
        let found = stream.info_with_subjects(filter).await.map_err(unavailable)?;
        found.map_ok(|(subject, _)| subject).try_collect().await.map_err(unavailable)
    }

    async fn subjects(&self, prefix: &str) -> Result<Vec<String>, LogError> {
        use futures::TryStreamExt;
        let stream = self.stream();
        let found = stream.info_with_subjects(format!("{prefix}*")).await.map_err(unavailable)?;
        let mut subjects: Vec<String> = found.map_ok(|(subject, _)| subject).try_collect().await.map_err(unavailable)?;
        subjects.sort();
        Ok(subjects)
    }

    async fn next_on(&self, subject: &str, from: u64) -> Result<Option<Logged>, LogError> {
        self.next_matching(subject.to_owned(), from).await
    }

    async fn next_under(&self, prefix: &str, from: u64) -> Result<Option<Logged>, LogError> {
        self.next_matching(format!("{prefix}*"), from).await
    }

    fn dedup_window(&self) -> Duration {
        self.dedup_window
    }

    async fn check(&self) -> Result<(), LogError> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(LogError::Unavailable("nats: not connected".into()));
        }
        self.head().await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_versions_compare_by_major_and_minor() {
        assert!(super::version_at_least("2.15.1", 2, 15));
        assert!(super::version_at_least("2.16.0-beta.2", 2, 15));
        assert!(super::version_at_least("3.0.0", 2, 15));
        assert!(!super::version_at_least("2.14.9", 2, 15));
        assert!(!super::version_at_least("2.10.22", 2, 15));
    }
}
