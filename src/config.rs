//! Settings, layered: command-line flags > environment (`NATTER_*`) >
//! optional TOML file (`--config` / `NATTER_CONFIG`) > defaults.
//!
//! Flags and environment are read by clap ([`ServeArgs`]); the file is
//! [`FileConfig`]; [`Config::resolve`] merges them into the one [`Config`]
//! the node runs with.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use secrecy::SecretString;

pub use crate::log::file::SyncPolicy;
use serde::Deserialize;

/// Every setting, as a flag with its environment variable.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "NATTER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "NATTER_HOST")]
    pub host: Option<String>,
    /// Port for REST and Socket.IO. Default 5000, as the original server.
    #[arg(long, env = "NATTER_PORT")]
    pub port: Option<u16>,
    /// NATS server URL, e.g. nats://127.0.0.1:4222.
    #[arg(long, env = "NATTER_NATS_URL")]
    pub nats_url: Option<String>,
    /// MongoDB URL, e.g. mongodb://127.0.0.1:27017.
    #[arg(long, env = "NATTER_MONGO_URL")]
    pub mongo_url: Option<String>,
    /// Redis URL, e.g. redis://127.0.0.1:6379.
    #[arg(long, env = "NATTER_REDIS_URL")]
    pub redis_url: Option<String>,
    /// MongoDB database holding the views.
    #[arg(long, env = "NATTER_MONGO_DB")]
    pub mongo_db: Option<String>,
    /// Prefix of every Redis key natter writes.
    #[arg(long, env = "NATTER_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// JetStream stream holding the event log.
    #[arg(long, env = "NATTER_STREAM")]
    pub stream: Option<String>,
    /// First token of every NATS subject natter uses.
    #[arg(long, env = "NATTER_SUBJECT_PREFIX")]
    pub subject_prefix: Option<String>,
    /// JetStream duplicate window for command ids, in seconds.
    #[arg(long, env = "NATTER_DEDUP_WINDOW_SECS")]
    pub dedup_window_secs: Option<u64>,
    /// HS256 secret for natter's own tokens (and external ones signed with it).
    #[arg(long, env = "NATTER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key (RSA or EC) of an external token issuer.
    #[arg(long, env = "NATTER_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "NATTER_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "NATTER_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Lifetime of tokens natter issues, in seconds.
    #[arg(long, env = "NATTER_TOKEN_TTL_SECS")]
    pub token_ttl_secs: Option<u64>,
    /// Longest text message, in characters.
    #[arg(long, env = "NATTER_MAX_MESSAGE_CHARS")]
    pub max_message_chars: Option<usize>,
    /// Longest attachment URL, in characters.
    #[arg(long, env = "NATTER_MAX_ATTACHMENT_CHARS")]
    pub max_attachment_chars: Option<usize>,
    /// Largest request body, in bytes.
    #[arg(long, env = "NATTER_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Log format: text or json.
    #[arg(long, env = "NATTER_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// How long per-user push deliveries are kept for resume, in seconds.
    #[arg(long, env = "NATTER_PUSH_RETENTION_SECS")]
    pub push_retention_secs: Option<u64>,
    /// Deliveries a socket may have queued before it is disconnected as too slow.
    #[arg(long, env = "NATTER_SOCKET_QUEUE")]
    pub socket_queue: Option<usize>,
    /// Typing notices a socket may send per second (excess is dropped).
    #[arg(long, env = "NATTER_TYPING_PER_SEC")]
    pub typing_per_sec: Option<u32>,
    /// Presence time-to-live in milliseconds: a crashed node's users leave
    /// their rooms within 1.5 × this.
    #[arg(long, env = "NATTER_PRESENCE_TTL_MS")]
    pub presence_ttl_ms: Option<u64>,
    /// Embedded mode: directory of the event log (and the generated token
    /// secret). Default ./natter-data.
    #[arg(long, env = "NATTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Embedded mode: `always` (fsync every append before acknowledging:
    /// survives power loss) or `os` (leave flushing to the OS: survives a
    /// crash of natter, not of the machine; faster).
    #[arg(long, env = "NATTER_SYNC")]
    pub sync: Option<String>,
}

/// The optional TOML file: the same settings, snake_case keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    host: Option<String>,
    port: Option<u16>,
    nats_url: Option<String>,
    mongo_url: Option<String>,
    redis_url: Option<String>,
    mongo_db: Option<String>,
    redis_prefix: Option<String>,
    stream: Option<String>,
    subject_prefix: Option<String>,
    dedup_window_secs: Option<u64>,
    jwt_secret: Option<String>,
    jwt_public_key_file: Option<PathBuf>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    token_ttl_secs: Option<u64>,
    max_message_chars: Option<usize>,
    max_attachment_chars: Option<usize>,
    max_body_bytes: Option<usize>,
    log_format: Option<String>,
    push_retention_secs: Option<u64>,
    socket_queue: Option<usize>,
    typing_per_sec: Option<u32>,
    presence_ttl_ms: Option<u64>,
    data_dir: Option<PathBuf>,
    sync: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub nats_url: Option<String>,
    pub mongo_url: Option<String>,
    pub redis_url: Option<String>,
    pub mongo_db: String,
    pub redis_prefix: String,
    pub stream: String,
    pub subject_prefix: String,
    pub dedup_window: Duration,
    /// `None`: natter generates a random secret at start (single node only).
    pub jwt_secret: Option<SecretString>,
    pub jwt_public_key_file: Option<PathBuf>,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub token_ttl: Duration,
    pub max_message_chars: usize,
    pub max_attachment_chars: usize,
    pub max_body_bytes: usize,
    pub log_json: bool,
    pub push_retention: Duration,
    pub socket_queue: usize,
    pub typing_per_sec: u32,
    pub presence_ttl: Duration,
    pub data_dir: PathBuf,
    pub sync: SyncPolicy,
}

/// Which adapters a node runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No services configured: one node, a local event log, in-process
    /// views, counts, push and presence.
    Embedded,
    /// NATS JetStream, MongoDB and Redis: any number of nodes.
    Distributed,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "0.0.0.0".into(),
            port: 5000,
            nats_url: None,
            mongo_url: None,
            redis_url: None,
            mongo_db: "natter".into(),
            redis_prefix: "natter:".into(),
            stream: "NATTER".into(),
            subject_prefix: "natter".into(),
            dedup_window: Duration::from_secs(600),
            jwt_secret: None,
            jwt_public_key_file: None,
            jwt_issuer: "natter".into(),
            jwt_audience: "natter".into(),
            token_ttl: Duration::from_secs(7 * 24 * 3600),
            max_message_chars: 4000,
            max_attachment_chars: 2048,
            max_body_bytes: 64 * 1024,
            log_json: false,
            push_retention: Duration::from_secs(7 * 24 * 3600),
            socket_queue: 1024,
            typing_per_sec: 5,
            presence_ttl: Duration::from_secs(30),
            data_dir: PathBuf::from("natter-data"),
            sync: SyncPolicy::Always,
        }
    }
}

impl Config {
    /// Merges flags/environment over the file over the defaults.
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let d = Config::default();
        macro_rules! pick {
            ($field:ident) => {
                args.$field.clone().or(file.$field.clone())
            };
        }
        let log_format = pick!(log_format).unwrap_or_else(|| "text".into());
        if log_format != "text" && log_format != "json" {
            bail!("log format must be `text` or `json`, not {log_format:?}");
        }
        let cfg = Config {
            host: pick!(host).unwrap_or(d.host),
            port: pick!(port).unwrap_or(d.port),
            nats_url: pick!(nats_url).filter(|s| !s.is_empty()),
            mongo_url: pick!(mongo_url).filter(|s| !s.is_empty()),
            redis_url: pick!(redis_url).filter(|s| !s.is_empty()),
            mongo_db: pick!(mongo_db).unwrap_or(d.mongo_db),
            redis_prefix: pick!(redis_prefix).unwrap_or(d.redis_prefix),
            stream: pick!(stream).unwrap_or(d.stream),
            subject_prefix: pick!(subject_prefix).unwrap_or(d.subject_prefix),
            dedup_window: pick!(dedup_window_secs).map(Duration::from_secs).unwrap_or(d.dedup_window),
            jwt_secret: pick!(jwt_secret).filter(|s| !s.is_empty()).map(SecretString::from),
            jwt_public_key_file: pick!(jwt_public_key_file),
            jwt_issuer: pick!(jwt_issuer).unwrap_or(d.jwt_issuer),
            jwt_audience: pick!(jwt_audience).unwrap_or(d.jwt_audience),
            token_ttl: pick!(token_ttl_secs).map(Duration::from_secs).unwrap_or(d.token_ttl),
            max_message_chars: pick!(max_message_chars).unwrap_or(d.max_message_chars),
            max_attachment_chars: pick!(max_attachment_chars).unwrap_or(d.max_attachment_chars),
            max_body_bytes: pick!(max_body_bytes).unwrap_or(d.max_body_bytes),
            log_json: log_format == "json",
            push_retention: pick!(push_retention_secs).map(Duration::from_secs).unwrap_or(d.push_retention),
            socket_queue: pick!(socket_queue).unwrap_or(d.socket_queue),
            typing_per_sec: pick!(typing_per_sec).unwrap_or(d.typing_per_sec),
            presence_ttl: pick!(presence_ttl_ms).map(Duration::from_millis).unwrap_or(d.presence_ttl),
            data_dir: pick!(data_dir).unwrap_or(d.data_dir),
            sync: match pick!(sync) {
                Some(s) => s.parse().map_err(|e: String| anyhow::anyhow!("sync (--sync / NATTER_SYNC / sync in the config file): {e}"))?,
                None => d.sync,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        natter_events::validate_id(&self.subject_prefix)
            .map_err(|e| anyhow::anyhow!("subject prefix {:?}: {e}", self.subject_prefix))?;
        natter_events::validate_id(&self.stream).map_err(|e| anyhow::anyhow!("stream name {:?}: {e}", self.stream))?;
        if self.presence_ttl < Duration::from_millis(300) {
            bail!("presence TTL must be at least 300 ms");
        }
        if self.socket_queue == 0 || self.push_retention.is_zero() {
            bail!("socket queue and push retention must be positive");
        }
        if self.max_message_chars == 0 || self.max_attachment_chars == 0 || self.max_body_bytes < 1024 {
            bail!("message/attachment limits must be positive and the body limit at least 1024 bytes");
        }
        Ok(())
    }

    /// Embedded when no service is configured, distributed when all three
    /// are; a partial set is refused (a typo must not silently start a
    /// lone embedded node beside a cluster).
    pub fn mode(&self) -> anyhow::Result<Mode> {
        let services = [("NATTER_NATS_URL", &self.nats_url), ("NATTER_MONGO_URL", &self.mongo_url), ("NATTER_REDIS_URL", &self.redis_url)];
        let missing: Vec<&str> = services.iter().filter(|(_, url)| url.is_none()).map(|(name, _)| *name).collect();
        match missing.len() {
            0 => Ok(Mode::Distributed),
            3 => Ok(Mode::Embedded),
            _ => bail!(
                "{} set but {} not: set all three service URLs for a distributed node, or none for an embedded one",
                services.iter().filter(|(_, url)| url.is_some()).map(|(name, _)| *name).collect::<Vec<_>>().join(", "),
                missing.join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_beat_defaults() {
        let dir = std::env::temp_dir().join(format!("natter-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("natter.toml");
        std::fs::write(&path, "port = 6000\nmongo_db = \"fromfile\"\n").unwrap();
        let args = ServeArgs { config: Some(path), port: Some(7000), ..ServeArgs::default() };
        let cfg = Config::resolve(&args).unwrap();
        assert_eq!(cfg.port, 7000);
        assert_eq!(cfg.mongo_db, "fromfile");
        assert_eq!(cfg.stream, "NATTER");
    }

    #[test]
    fn refuses_unknown_file_keys_and_bad_prefixes() {
        let dir = std::env::temp_dir().join(format!("natter-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("natter.toml");
        std::fs::write(&path, "prot = 6000\n").unwrap();
        let args = ServeArgs { config: Some(path), ..ServeArgs::default() };
        assert!(Config::resolve(&args).is_err());
        let args = ServeArgs { subject_prefix: Some("a.b".into()), ..ServeArgs::default() };
        assert!(Config::resolve(&args).is_err());
        let args = ServeArgs { sync: Some("sometimes".into()), ..ServeArgs::default() };
        assert!(Config::resolve(&args).is_err());
    }

    #[test]
    fn no_services_is_embedded_all_is_distributed_some_is_refused() {
        let cfg = Config::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(cfg.mode().unwrap(), Mode::Embedded);
        assert_eq!(cfg.data_dir, PathBuf::from("natter-data"));
        assert_eq!(cfg.sync, SyncPolicy::Always);
        let all = ServeArgs {
            nats_url: Some("nats://n".into()),
            mongo_url: Some("mongodb://m".into()),
            redis_url: Some("redis://r".into()),
            ..ServeArgs::default()
        };
        assert_eq!(Config::resolve(&all).unwrap().mode().unwrap(), Mode::Distributed);
        let some = ServeArgs { nats_url: Some("nats://n".into()), ..ServeArgs::default() };
        let err = Config::resolve(&some).unwrap().mode().unwrap_err().to_string();
        assert!(err.contains("NATTER_MONGO_URL") && err.contains("NATTER_REDIS_URL"), "{err}");
    }
}

/// A service URL fit for logs and errors: any `user:password@` removed.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod redact_tests {
    #[test]
    fn credentials_never_reach_the_logs() {
        assert_eq!(super::redact("mongodb://admin:s3cret@db:27017/x"), "mongodb://…@db:27017/x");
        assert_eq!(super::redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
