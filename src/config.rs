//! Settings, layered: command-line flags > environment (`NATTER_*`) >
//! optional TOML file (`--config` / `NATTER_CONFIG`) > defaults.
//!
//! Every setting is declared once, in one of the [`section!`] blocks below:
//! its doc line (which becomes the flag's `--help`), its type, its default,
//! its flag and its environment variable. The macro derives the rest: the
//! clap arguments (flags and environment), the TOML key (the flag with `_`
//! for `-`, keys are flat as in the README), and the merge. Adding a setting
//! is one line here plus its row in the README's configuration table.
//!
//! [`Config`] nests the sections: `server`, `auth`, `limits`, `log` (both
//! modes), `distributed` (NATS, MongoDB, Redis), `embedded` (the data
//! directory) and `push`.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use secrecy::SecretString;

/// How a setting is read from its text (a flag, a variable, a TOML value).
trait FromSetting: Sized {
    fn from_setting(raw: &str) -> Result<Self, String>;
}

macro_rules! from_str_setting {
    ($($ty:ty),*) => {$(
        impl FromSetting for $ty {
            fn from_setting(raw: &str) -> Result<Self, String> {
                <$ty as FromStr>::from_str(raw).map_err(|e| e.to_string())
            }
        }
    )*};
}
from_str_setting!(String, bool, u16, u32, u64, usize, PathBuf, SyncPolicy, LogFormat);

/// An empty value means "not set" (e.g. `NATTER_NATS_URL=`).
impl<T: FromSetting> FromSetting for Option<T> {
    fn from_setting(raw: &str) -> Result<Self, String> {
        if raw.is_empty() { Ok(None) } else { T::from_setting(raw).map(Some) }
    }
}

impl FromSetting for SecretString {
    fn from_setting(raw: &str) -> Result<Self, String> {
        Ok(SecretString::from(raw.to_owned()))
    }
}

/// A duration given in whole seconds.
fn secs(raw: &str) -> Result<Duration, String> {
    raw.parse().map(Duration::from_secs).map_err(|e| format!("{e} (whole seconds)"))
}

/// A duration given in milliseconds.
fn millis(raw: &str) -> Result<Duration, String> {
    raw.parse().map(Duration::from_millis).map_err(|e| format!("{e} (milliseconds)"))
}

/// The TOML file's keys, consumed section by section; what is left over is
/// a misspelt or unknown key.
#[derive(Default)]
struct FileValues(toml::Table);

impl FileValues {
    fn take(&mut self, key: &str) -> Option<String> {
        self.0.remove(key).map(|v| match v {
            toml::Value::String(s) => s,
            other => other.to_string(),
        })
    }
}

macro_rules! parse_with {
    ($raw:expr, ) => {
        FromSetting::from_setting($raw)
    };
    ($raw:expr, $parse:path) => {
        $parse($raw)
    };
}

/// Declares one section: its resolved struct (`$Section`), its clap
/// arguments (`$Args`) and the merge of the two with the file.
macro_rules! section {
    (
        $(#[doc = $sdoc:literal])*
        $Section:ident, $Args:ident, $heading:literal {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $ty:ty = $default:expr, $flag:literal, $env:literal $(, $parse:path)? ;
            )*
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone)]
        pub struct $Section {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl Default for $Section {
            fn default() -> Self {
                $Section { $( $field: $default, )* }
            }
        }

        #[doc = concat!("The flags and environment variables of [`", stringify!($Section), "`].")]
        #[derive(Debug, Clone, Default, Args)]
        #[command(next_help_heading = $heading)]
        pub struct $Args {
            $( $(#[doc = $doc])* #[arg(long = $flag, env = $env, hide_env_values = true)] pub $field: Option<String>, )*
        }

        impl $Section {
            fn resolve(args: &$Args, file: &mut FileValues) -> anyhow::Result<$Section> {
                let defaults = $Section::default();
                Ok($Section {
                    $( $field: {
                        // Always taken, so that what is left in the file is unknown.
                        let from_file = file.take(&$flag.replace('-', "_"));
                        match args.$field.clone().or(from_file) {
                            Some(raw) => parse_with!(&raw, $($parse)?)
                                .map_err(|e| anyhow::anyhow!("--{} / {} / {} in the config file: {e}", $flag, $env, $flag.replace('-', "_")))?,
                            None => defaults.$field,
                        }
                    }, )*
                })
            }
        }
    };
}

section! {
    /// The HTTP and Socket.IO listener.
    Server, ServerArgs, "Server" {
        /// Address to listen on.
        host: String = "0.0.0.0".into(), "host", "NATTER_HOST";
        /// Port for REST and Socket.IO. Default 5000, as the original server.
        port: u16 = 5000, "port", "NATTER_PORT";
        /// Log format: text or json.
        log_format: LogFormat = LogFormat::Text, "log-format", "NATTER_LOG_FORMAT";
        /// Origins whose browser pages may call the API and open sockets
        /// (CORS), comma-separated, e.g. `http://localhost:3000`; `*` for
        /// any (development). Empty: same origin only.
        cors_origins: String = String::new(), "cors-origins", "NATTER_CORS_ORIGINS";
        /// On SIGTERM, how long the node answers 503 `draining` (readiness
        /// included) before it closes its sockets and stops listening: give
        /// a load balancer that polls `/readyz` time to take it out
        /// (e.g. twice its health-check interval). 0 for nginx, which
        /// moves on from the 503 itself.
        drain_delay: Duration = Duration::ZERO, "drain-delay-ms", "NATTER_DRAIN_DELAY_MS", millis;
        /// Worker threads of the node's runtime; 0: one per CPU the
        /// process may use (or `TOKIO_WORKER_THREADS`). Several nodes
        /// sharing a machine's cores spend less CPU with 1 each: threads of
        /// one node stop waking each other (see the README's Performance
        /// section).
        threads: usize = 0, "threads", "NATTER_THREADS";
    }
}

/// Which browser origins may call natter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// Same origin only: no CORS headers.
    None,
    Any,
    List(Vec<String>),
}

impl Server {
    /// The parsed `cors_origins`; each origin is `scheme://host[:port]`.
    pub fn cors(&self) -> anyhow::Result<CorsOrigins> {
        let origins: Vec<&str> = self.cors_origins.split(',').map(str::trim).filter(|o| !o.is_empty()).collect();
        if origins.is_empty() {
            return Ok(CorsOrigins::None);
        }
        if origins.contains(&"*") {
            return Ok(CorsOrigins::Any);
        }
        for o in &origins {
            let rest = o.strip_prefix("https://").or_else(|| o.strip_prefix("http://"));
            if rest.is_none_or(|r| r.is_empty() || r.contains(['/', ' ', '?', '#'])) {
                bail!("NATTER_CORS_ORIGINS: {o:?} is not an origin (scheme://host[:port], no path), e.g. http://localhost:3000");
            }
        }
        Ok(CorsOrigins::List(origins.into_iter().map(str::to_owned).collect()))
    }
}

section! {
    /// Tokens: natter's own and an external issuer's.
    AuthSettings, AuthArgs, "Tokens" {
        /// HS256 secret for natter's own tokens (and external ones signed
        /// with it). Embedded: generated into the data directory if unset.
        jwt_secret: Option<SecretString> = None, "jwt-secret", "NATTER_JWT_SECRET";
        /// PEM public key (RSA or EC) of an external token issuer.
        jwt_public_key_file: Option<PathBuf> = None, "jwt-public-key-file", "NATTER_JWT_PUBLIC_KEY_FILE";
        /// Required `iss` claim.
        jwt_issuer: String = "natter".into(), "jwt-issuer", "NATTER_JWT_ISSUER";
        /// Required `aud` claim.
        jwt_audience: String = "natter".into(), "jwt-audience", "NATTER_JWT_AUDIENCE";
        /// Lifetime of tokens natter issues, in seconds.
        token_ttl: Duration = Duration::from_secs(7 * 24 * 3600), "token-ttl-secs", "NATTER_TOKEN_TTL_SECS", secs;
    }
}

section! {
    /// What one request or socket may ask for.
    Limits, LimitArgs, "Limits" {
        /// Longest text message, in characters.
        max_message_chars: usize = 4000, "max-message-chars", "NATTER_MAX_MESSAGE_CHARS";
        /// Longest attachment URL, in characters.
        max_attachment_chars: usize = 2048, "max-attachment-chars", "NATTER_MAX_ATTACHMENT_CHARS";
        /// Largest request body, in bytes.
        max_body_bytes: usize = 64 * 1024, "max-body-bytes", "NATTER_MAX_BODY_BYTES";
        /// REST requests a node works on at once; more are answered 503
        /// `overloaded` with `Retry-After` at once rather than queued (0: no bound).
        max_in_flight: usize = 512, "max-in-flight", "NATTER_MAX_IN_FLIGHT";
        /// When even the fastest of 16 REST requests' work took longer than
        /// this, requests are queueing: the node admits fewer at once (down
        /// to 8) and answers the rest 503 `overloaded`, a quarter more again
        /// after a window with a fast one (0: the bound stays
        /// NATTER_MAX_IN_FLIGHT). See `http::admission`.
        overload_latency: Duration = Duration::from_millis(200), "overload-latency-ms", "NATTER_OVERLOAD_LATENCY_MS", millis;
        /// The longest a decision window of that bound lasts (at least
        /// 100): then it is decided on what it holds, and every further
        /// window without a request raises the bound a quarter.
        overload_window: Duration = Duration::from_secs(1), "overload-window-ms", "NATTER_OVERLOAD_WINDOW_MS", millis;
        /// Longest a REST request may take; then 503 `timeout` (0: no limit).
        /// A send that timed out may still have been stored: retry it with
        /// the same `clientMsgId`.
        request_timeout: Duration = Duration::from_secs(15), "request-timeout-ms", "NATTER_REQUEST_TIMEOUT_MS", millis;
        /// Deliveries a socket may have queued before it is disconnected as too slow.
        socket_queue: usize = 1024, "socket-queue", "NATTER_SOCKET_QUEUE";
        /// Typing notices a socket may send per second (excess is dropped).
        typing_per_sec: u32 = 5, "typing-per-sec", "NATTER_TYPING_PER_SEC";
        /// Login attempts per client IP per minute, across the nodes (0: no limit).
        login_per_min: u32 = 30, "login-per-min", "NATTER_LOGIN_PER_MIN";
        /// Failed logins per account per 15 minutes (three times this per
        /// client IP), across the nodes; then 429 until the window ends (0: no limit).
        login_failures: u32 = 10, "login-failures", "NATTER_LOGIN_FAILURES";
        /// Registrations per client IP per hour, across the nodes (0: no limit).
        register_per_hour: u32 = 20, "register-per-hour", "NATTER_REGISTER_PER_HOUR";
        /// Messages (direct and room) per account per second on a node,
        /// with bursts of twice that (0: no limit).
        sends_per_sec: u32 = 20, "sends-per-sec", "NATTER_SENDS_PER_SEC";
        /// Rooms created, joined or left per account per minute on a node (0: no limit).
        room_changes_per_min: u32 = 60, "room-changes-per-min", "NATTER_ROOM_CHANGES_PER_MIN";
        /// Sockets one user may have open on a node (0: no cap).
        sockets_per_user: usize = 20, "sockets-per-user", "NATTER_SOCKETS_PER_USER";
        /// Sockets one client IP may have open on a node (0: no cap).
        sockets_per_ip: usize = 500, "sockets-per-ip", "NATTER_SOCKETS_PER_IP";
        /// Rooms one `/chat` socket may have entered at once (0: no cap).
        rooms_per_socket: usize = 100, "rooms-per-socket", "NATTER_ROOMS_PER_SOCKET";
        /// Socket.IO events one socket may have in flight; more are refused
        /// at once, and a socket that keeps sending them is disconnected.
        socket_events_in_flight: usize = 16, "socket-events-in-flight", "NATTER_SOCKET_EVENTS_IN_FLIGHT";
        /// `sync` replays one socket may ask for per minute (0: no limit).
        syncs_per_min: u32 = 10, "syncs-per-min", "NATTER_SYNCS_PER_MIN";
        /// Behind a proxy: the request header that carries the client's IP
        /// (e.g. `x-real-ip`, which the proxy must set, overwriting what the
        /// client sent). Empty: the peer address.
        client_ip_header: String = String::new(), "client-ip-header", "NATTER_CLIENT_IP_HEADER";
    }
}

section! {
    /// The event log, in either mode.
    LogSettings, LogArgs, "Event log" {
        /// First token of every subject natter uses.
        subject_prefix: String = "natter".into(), "subject-prefix", "NATTER_SUBJECT_PREFIX";
        /// Duplicate window for command ids, in seconds.
        dedup_window: Duration = Duration::from_secs(600), "dedup-window-secs", "NATTER_DEDUP_WINDOW_SECS", secs;
        /// Store direct-conversation events in their compact form
        /// (`MessageSent` v3, `MessagesSeen` v2). Set `false` on every node
        /// while a build without them still runs beside the new ones (it
        /// cannot read them), then back to `true`.
        compact_events: bool = true, "compact-events", "NATTER_COMPACT_EVENTS";
    }
}

section! {
    /// The services of the distributed mode: all three URLs set, or none.
    Distributed, DistributedArgs, "Distributed mode" {
        /// NATS server URL, e.g. nats://127.0.0.1:4222.
        nats_url: Option<String> = None, "nats-url", "NATTER_NATS_URL";
        /// MongoDB URL, e.g. mongodb://127.0.0.1:27017.
        mongo_url: Option<String> = None, "mongo-url", "NATTER_MONGO_URL";
        /// Redis URL, e.g. redis://127.0.0.1:6379.
        redis_url: Option<String> = None, "redis-url", "NATTER_REDIS_URL";
        /// MongoDB database holding the views.
        mongo_db: String = "natter".into(), "mongo-db", "NATTER_MONGO_DB";
        /// Prefix of every Redis key natter writes.
        redis_prefix: String = "natter:".into(), "redis-prefix", "NATTER_REDIS_PREFIX";
        /// JetStream stream holding the event log.
        stream: String = "NATTER".into(), "stream", "NATTER_STREAM";
        /// Copies JetStream keeps of each of natter's streams (the log, the
        /// parked events, the push inbox, the fan-out feed, the inbox erase jobs) and their
        /// consumers: 1 on a single server, 3 on a three-server cluster (an
        /// append is acknowledged once a majority holds it). A node refuses
        /// to start if the servers cannot place that many.
        stream_replicas: usize = 1, "stream-replicas", "NATTER_STREAM_REPLICAS";
        /// How long a MongoDB or Redis call may take before it fails as
        /// unavailable (503 with Retry-After to a client; a projector
        /// retries; a projector's batch gets 12 times as long): a store that
        /// stalls instead of refusing holds no request or socket for long.
        store_timeout: Duration = Duration::from_secs(5), "store-timeout-ms", "NATTER_STORE_TIMEOUT_MS", millis;
    }
}

section! {
    /// The embedded mode's data directory.
    Embedded, EmbeddedArgs, "Embedded mode" {
        /// Directory of the event log (and the generated token secret).
        data_dir: PathBuf = PathBuf::from("natter-data"), "data-dir", "NATTER_DATA_DIR";
        /// `always` (fsync every append before acknowledging: survives power
        /// loss) or `os` (leave flushing to the OS: survives a crash of
        /// natter, not of the machine; faster).
        sync: SyncPolicy = SyncPolicy::Always, "sync", "NATTER_SYNC";
        /// Most bytes of the local store's pages (`projections.redb`) kept in
        /// memory; the rest is read from disk when asked for.
        store_cache: u64 = 64 << 20, "store-cache-bytes", "NATTER_STORE_CACHE_BYTES";
    }
}

section! {
    /// Real-time delivery and presence.
    Push, PushArgs, "Real time" {
        /// How long per-user push deliveries are kept for resume, in seconds.
        retention: Duration = Duration::from_secs(7 * 24 * 3600), "push-retention-secs", "NATTER_PUSH_RETENTION_SECS", secs;
        /// Distributed: most bytes the inbox of deliveries kept for resume may
        /// hold; the oldest go first (their cursors get `resync`). JetStream
        /// reserves it from the server's store.
        max_bytes: u64 = 1 << 30, "push-max-bytes", "NATTER_PUSH_MAX_BYTES";
        /// Presence time-to-live in milliseconds: a crashed node's users leave
        /// their rooms within 1.5 × this.
        presence_ttl: Duration = Duration::from_secs(30), "presence-ttl-ms", "NATTER_PRESENCE_TTL_MS", millis;
        /// Rooms of at most this many members tell every member of a join
        /// or a leave (`member-joined` / `member-left`); larger rooms tell
        /// the user concerned only (a burst of joins would otherwise cost
        /// the square of the room's size).
        announce_max: usize = 100, "room-announce-max", "NATTER_ROOM_ANNOUNCE_MAX";
    }
}

/// Every setting, as flags with their environment variables.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "NATTER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub distributed: DistributedArgs,
    #[command(flatten)]
    pub embedded: EmbeddedArgs,
    #[command(flatten)]
    pub push: PushArgs,
}

/// The settings a node runs with.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub server: Server,
    pub auth: AuthSettings,
    pub limits: Limits,
    pub log: LogSettings,
    pub distributed: Distributed,
    pub embedded: Embedded,
    pub push: Push,
}

/// How the embedded log makes appends durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// fsync before acknowledging: survives power loss.
    Always,
    /// Leave flushing to the OS: survives a process crash (`kill -9`), not
    /// a power loss; much faster.
    Os,
}

impl FromStr for SyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(SyncPolicy::Always),
            "os" => Ok(SyncPolicy::Os),
            other => Err(format!("sync policy must be `always` or `os`, not {other:?}")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format must be `text` or `json`, not {other:?}")),
        }
    }
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

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Embedded => "embedded",
            Mode::Distributed => "distributed",
        }
    }
}

impl Config {
    /// Merges flags/environment over the file over the defaults.
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Config> {
        let mut file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
                FileValues(toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))?)
            }
            None => FileValues::default(),
        };
        let cfg = Config {
            server: Server::resolve(&args.server, &mut file)?,
            auth: AuthSettings::resolve(&args.auth, &mut file)?,
            limits: Limits::resolve(&args.limits, &mut file)?,
            log: LogSettings::resolve(&args.log, &mut file)?,
            distributed: Distributed::resolve(&args.distributed, &mut file)?,
            embedded: Embedded::resolve(&args.embedded, &mut file)?,
            push: Push::resolve(&args.push, &mut file)?,
        };
        if let Some(unknown) = file.0.keys().next() {
            bail!("unknown setting {unknown:?} in the config file (keys are the flags' names with `_`, e.g. max_body_bytes)");
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.server.cors()?;
        natter_events::validate_id(&self.log.subject_prefix)
            .map_err(|e| anyhow::anyhow!("subject prefix {:?}: {e}", self.log.subject_prefix))?;
        natter_events::validate_id(&self.distributed.stream)
            .map_err(|e| anyhow::anyhow!("stream name {:?}: {e}", self.distributed.stream))?;
        if self.distributed.store_timeout < Duration::from_millis(100) {
            bail!("NATTER_STORE_TIMEOUT_MS must be at least 100");
        }
        if self.limits.overload_window < Duration::from_millis(100) {
            bail!("NATTER_OVERLOAD_WINDOW_MS must be at least 100");
        }
        if self.push.presence_ttl < Duration::from_millis(300) {
            bail!("presence TTL must be at least 300 ms");
        }
        if self.limits.socket_queue == 0 || self.push.retention.is_zero() {
            bail!("socket queue and push retention must be positive");
        }
        if self.push.max_bytes < 64 * 1024 {
            bail!("the push inbox needs at least 65536 bytes (NATTER_PUSH_MAX_BYTES)");
        }
        let l = &self.limits;
        if l.max_message_chars == 0 || l.max_attachment_chars == 0 || l.max_body_bytes < 1024 {
            bail!("message/attachment limits must be positive and the body limit at least 1024 bytes");
        }
        Ok(())
    }

    /// Embedded when no service is configured, distributed when all three
    /// are; a partial set is refused (a typo must not silently start a
    /// lone embedded node beside a cluster).
    pub fn mode(&self) -> anyhow::Result<Mode> {
        let d = &self.distributed;
        let services = [("NATTER_NATS_URL", &d.nats_url), ("NATTER_MONGO_URL", &d.mongo_url), ("NATTER_REDIS_URL", &d.redis_url)];
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

    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("natter-cfg-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("natter.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn cors_origins_parse_and_refuse_what_is_not_an_origin() {
        let server = |o: &str| Server { cors_origins: o.into(), ..Server::default() };
        assert_eq!(server("").cors().unwrap(), CorsOrigins::None);
        assert_eq!(server(" * ").cors().unwrap(), CorsOrigins::Any);
        assert_eq!(
            server("http://localhost:3000, https://chat.example").cors().unwrap(),
            CorsOrigins::List(vec!["http://localhost:3000".into(), "https://chat.example".into()])
        );
        for bad in ["localhost:3000", "http://x.example/app", "ftp://x.example", "http://"] {
            assert!(server(bad).cors().is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_beat_file_beat_defaults() {
        let path = file("layers", "port = 6000\nmongo_db = \"fromfile\"\ndedup_window_secs = 30\n");
        let mut args = ServeArgs { config: Some(path), ..ServeArgs::default() };
        args.server.port = Some("7000".into());
        let cfg = Config::resolve(&args).unwrap();
        assert_eq!(cfg.server.port, 7000);
        assert_eq!(cfg.distributed.mongo_db, "fromfile");
        assert_eq!(cfg.log.dedup_window, Duration::from_secs(30));
        assert_eq!(cfg.distributed.stream, "NATTER");
    }

    #[test]
    fn refuses_unknown_file_keys_and_bad_values() {
        let args = ServeArgs { config: Some(file("unknown", "prot = 6000\n")), ..ServeArgs::default() };
        assert!(Config::resolve(&args).unwrap_err().to_string().contains("prot"));
        let mut args = ServeArgs::default();
        args.log.subject_prefix = Some("a.b".into());
        assert!(Config::resolve(&args).is_err());
        let mut args = ServeArgs::default();
        args.embedded.sync = Some("sometimes".into());
        let err = format!("{:#}", Config::resolve(&args).unwrap_err());
        assert!(err.contains("NATTER_SYNC") && err.contains("always"), "{err}");
        let mut args = ServeArgs::default();
        args.server.port = Some("http".into());
        assert!(Config::resolve(&args).is_err());
    }

    #[test]
    fn no_services_is_embedded_all_is_distributed_some_is_refused() {
        let cfg = Config::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(cfg.mode().unwrap(), Mode::Embedded);
        assert_eq!(cfg.embedded.data_dir, PathBuf::from("natter-data"));
        assert_eq!(cfg.embedded.sync, SyncPolicy::Always);
        let mut all = ServeArgs::default();
        all.distributed.nats_url = Some("nats://n".into());
        all.distributed.mongo_url = Some("mongodb://m".into());
        all.distributed.redis_url = Some("redis://r".into());
        assert_eq!(Config::resolve(&all).unwrap().mode().unwrap(), Mode::Distributed);
        let mut some = ServeArgs::default();
        some.distributed.nats_url = Some("nats://n".into());
        some.distributed.mongo_url = Some(String::new()); // empty = unset
        let err = Config::resolve(&some).unwrap().mode().unwrap_err().to_string();
        assert!(err.contains("NATTER_MONGO_URL") && err.contains("NATTER_REDIS_URL"), "{err}");
    }
}
