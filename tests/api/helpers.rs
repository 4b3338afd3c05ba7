//! Spawns natter nodes in-process on port 0 against the shared services,
//! each test with its own stream / subject prefix / database / key prefix,
//! or an embedded node on its own data directory ([`Cluster::embedded`]).
//!
//! [`contract!`](crate::contract) runs one scenario on both backends.

use std::time::Duration;

use natter::config::{Config, Distributed};
use natter::log::EventLog;
use natter::log::nats::NatsLog;
use natter::startup::RunningNode;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

pub const SECRET: &str = "test-secret-do-not-use-anywhere-else";

fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the suite with scripts/test.sh, which starts NATS, Redis and MongoDB and exports their URLs")
    })
}

/// Several nodes sharing one log, one database and one Redis namespace; or
/// one embedded node.
pub struct Cluster {
    pub cfg: Config,
    pub nodes: Vec<RunningNode>,
    pub http: reqwest::Client,
    /// The JetStream log (distributed clusters only).
    nats: Option<NatsLog>,
}

/// Runs a scenario `async fn(&Cluster)` against a distributed cluster of
/// `nodes` nodes and against an embedded node: one behaviour, two backends.
/// Scenarios address nodes by index as usual: on the embedded node every
/// index is that node ([`Cluster::node`]), so they cross nodes where there
/// are several.
#[macro_export]
macro_rules! contract {
    ($name:ident, $nodes:expr, $scenario:ident) => {
        $crate::contract!($name, $nodes, |_cfg| {}, $scenario);
    };
    ($name:ident, $nodes:expr, $tweak:expr, $scenario:ident) => {
        mod $name {
            #[tokio::test]
            async fn distributed() {
                let c = $crate::helpers::Cluster::start_with($nodes, $tweak).await;
                super::$scenario(&c).await;
                c.stop().await;
            }

            #[tokio::test]
            async fn embedded() {
                let c = $crate::helpers::Cluster::embedded_with($tweak).await;
                super::$scenario(&c).await;
                c.stop().await;
            }
        }
    };
}

/// Polls `check` until it holds, failing the test after 20 s.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(what, 20, check).await;
}

/// Polls `check` until it holds, failing the test after `secs` seconds.
pub async fn eventually_within<F, Fut>(what: &str, secs: u64, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    value_within(what, secs, || {
        let held = check();
        async move { held.await.then_some(()) }
    })
    .await
}

/// Polls `check` until it gives a value, failing the test after 20 s.
pub async fn eventually_value<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    value_within(what, 20, check).await
}

async fn value_within<T, F, Fut>(what: &str, secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        // A check that hangs fails at the deadline too.
        let found = tokio::time::timeout_at(deadline, check()).await.unwrap_or_else(|_| panic!("timed out after {secs} s waiting for {what} (a check hung)"));
        if let Some(v) = found {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A token natter accepts for `user_id` (signed with the test secret).
pub fn token_for(user_id: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({"sub": user_id, "exp": now + 3600, "iat": now, "iss": "natter", "aud": "natter"});
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()))
        .unwrap()
}

/// The `natter` binary, without the `NATTER_*` settings of the test run
/// (the suite's service URLs must not turn an embedded node distributed).
pub fn natter_command() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_natter"));
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("NATTER_")) {
        cmd.env_remove(name);
    }
    cmd
}

/// A node running as its own process.
pub struct ProcessNode {
    child: tokio::process::Child,
    pub url: String,
}

impl ProcessNode {
    /// `kill -9`: no shutdown, no drain.
    pub async fn kill9(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }
}

pub struct User {
    pub id: String,
    pub token: String,
    pub email: String,
}

pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Reply {
    #[track_caller]
    pub fn ok(self) -> Value {
        assert!(self.status.is_success(), "expected success, got {}: {}", self.status, self.body);
        self.body
    }
}

impl Cluster {
    pub async fn start(nodes: usize) -> Cluster {
        Self::start_with(nodes, |_| {}).await
    }

    /// A cluster whose config `tweak` adjusts first.
    pub async fn start_with(nodes: usize, tweak: impl FnOnce(&mut Config)) -> Cluster {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let mut cfg = Self::test_config();
        cfg.distributed = Distributed {
            nats_url: Some(service("NATTER_NATS_URL")),
            mongo_url: Some(service("NATTER_MONGO_URL")),
            redis_url: Some(service("NATTER_REDIS_URL")),
            mongo_db: format!("natter_t{id}"),
            redis_prefix: format!("t{id}:"),
            stream: format!("T{id}"),
            stream_replicas: 1,
            store_timeout: cfg.distributed.store_timeout,
        };
        cfg.log.subject_prefix = format!("t{id}");
        tweak(&mut cfg);
        let mut cluster = Cluster {
            nats: Some(
                NatsLog::connect(cfg.distributed.nats_url.as_deref().unwrap(), &cfg.distributed.stream, &cfg.log.subject_prefix, cfg.log.dedup_window)
                    .await
                    .expect("connect to NATS"),
            ),
            cfg,
            nodes: Vec::new(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
        };
        for _ in 0..nodes {
            cluster.add_node().await;
        }
        cluster
    }

    /// What every test node shares: loopback, the test secret, small limits.
    fn test_config() -> Config {
        let mut cfg = Config::default();
        cfg.server.host = "127.0.0.1".into();
        cfg.server.port = 0;
        cfg.auth.jwt_secret = Some(SECRET.to_string().into());
        cfg.limits.max_message_chars = 200;
        cfg.limits.max_body_bytes = 8 * 1024;
        // JetStream reserves an inbox's whole bound: many test clusters share
        // one NATS store.
        cfg.push.max_bytes = 16 * 1024 * 1024;
        // Tests register, send and join from one address as fast as they
        // can: the rate limits are tested on their own (abuse.rs).
        cfg.limits.register_per_hour = 0;
        cfg.limits.login_per_min = 0;
        cfg.limits.sends_per_sec = 0;
        cfg.limits.room_changes_per_min = 0;
        cfg.limits.sockets_per_ip = 0;
        // Debug builds on a busy CI machine take longer than the latency
        // target: the adaptive bound is tested on its own (overload.rs).
        cfg.limits.overload_latency = Duration::ZERO;
        cfg
    }

    /// One embedded node (no services) on a fresh data directory.
    pub async fn embedded() -> Cluster {
        Self::embedded_with(|_| {}).await
    }

    pub async fn embedded_with(tweak: impl FnOnce(&mut Config)) -> Cluster {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let mut cfg = Self::test_config();
        cfg.embedded.data_dir = Self::data_dir(&id);
        tweak(&mut cfg);
        let mut cluster =
            Cluster { cfg, nats: None, nodes: Vec::new(), http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap() };
        cluster.add_node().await;
        cluster
    }

    /// A fresh data directory under the target directory.
    pub fn data_dir(id: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("natter-{id}"))
    }

    pub fn is_embedded(&self) -> bool {
        self.nats.is_none()
    }

    /// The JetStream log of a distributed cluster.
    #[track_caller]
    pub fn nats(&self) -> &NatsLog {
        self.nats.as_ref().expect("a distributed cluster (this one is embedded)")
    }

    /// Stops an embedded node and starts it again on the same data directory.
    pub async fn restart(&mut self) {
        assert!(self.is_embedded(), "restart is for an embedded node");
        self.nodes.pop().expect("a node").stop().await;
        self.add_node().await;
    }

    pub async fn add_node(&mut self) {
        assert!(!self.is_embedded() || self.nodes.is_empty(), "an embedded cluster has one node");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = natter::startup::start(self.cfg.clone(), listener).await.expect("start node");
        self.nodes.push(node);
    }

    /// Node `i` (modulo the node count: on one embedded node, every index
    /// is that node).
    pub fn node(&self, i: usize) -> &RunningNode {
        &self.nodes[i % self.nodes.len()]
    }

    pub fn url(&self, node: usize, path: &str) -> String {
        format!("http://{}{path}", self.node(node).addr)
    }

    /// Number of events in the log.
    pub async fn log_head(&self) -> u64 {
        match &self.nats {
            Some(log) => log.head().await.expect("log head"),
            None => self.nodes[0].log().head().await.expect("log head"),
        }
    }

    pub async fn request(&self, node: usize, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Reply {
        let mut req = self.http.request(method, self.url(node, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("request");
        let status = res.status();
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, body }
    }

    /// A raw request: any body bytes and headers.
    pub async fn raw(&self, node: usize, method: Method, path: &str, token: &str, content_type: Option<&str>, body: Vec<u8>) -> Reply {
        let mut req = self.http.request(method, self.url(node, path)).bearer_auth(token).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let res = req.send().await.expect("request");
        let status = res.status();
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, body }
    }

    pub async fn register(&self, node: usize, name: &str) -> User {
        let email = format!("{}-{}@example.com", name.to_lowercase(), uuid::Uuid::new_v4().simple());
        let r = self
            .request(node, Method::POST, "/api/auth/register", None, Some(json!({"name": name, "email": email, "password": "password123"})))
            .await;
        assert_eq!(r.status.as_u16(), 202, "{}", r.body);
        let body = self.request(node, Method::POST, "/api/auth/login", None, Some(json!({"email": email, "password": "password123"}))).await.ok();
        User {
            id: body["user"]["_id"].as_str().unwrap().to_owned(),
            token: body["token"].as_str().unwrap().to_owned(),
            email,
        }
    }

    pub async fn send(&self, node: usize, from: &User, to: &User, text: &str, client_msg_id: Option<&str>) -> Reply {
        let mut body = json!({"message": text});
        if let Some(c) = client_msg_id {
            body["clientMsgId"] = json!(c);
        }
        self.request(node, Method::POST, &format!("/api/messages/{}", to.id), Some(&from.token), Some(body)).await
    }

    /// `GET /api/messages/:peer` (marks the conversation seen).
    pub async fn history(&self, node: usize, me: &User, peer: &User) -> Vec<Value> {
        let body = self
            .request(node, Method::GET, &format!("/api/messages/{}?limit=500", peer.id), Some(&me.token), None)
            .await
            .ok();
        body.as_array().expect("history is an array").clone()
    }

    /// `unseenMessages` of `GET /api/users`.
    pub async fn unseen(&self, node: usize, me: &User) -> Value {
        self.request(node, Method::GET, "/api/users", Some(&me.token), None).await.ok()["unseenMessages"].clone()
    }

    pub async fn unseen_from(&self, node: usize, me: &User, peer: &User) -> u64 {
        self.unseen(node, me).await.get(&peer.id).and_then(Value::as_u64).unwrap_or(0)
    }

    /// A counter or gauge of one node's `/metrics` (0 when absent).
    pub async fn metric(&self, node: usize, series: &str) -> f64 {
        let text = self.http.get(self.url(node, "/metrics")).send().await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .map(|v| v.parse().unwrap())
            .unwrap_or(0.0)
    }

    /// The environment a `natter` process needs to join this cluster (or,
    /// embedded, to use its data directory).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let cfg = &self.cfg;
        if self.is_embedded() {
            return vec![
                ("NATTER_DATA_DIR", cfg.embedded.data_dir.display().to_string()),
                ("NATTER_JWT_SECRET", SECRET.to_owned()),
            ("NATTER_REGISTER_PER_HOUR", "0".to_owned()),
            ("NATTER_SENDS_PER_SEC", "0".to_owned()),
            ("NATTER_ROOM_CHANGES_PER_MIN", "0".to_owned()),
            ("NATTER_SOCKETS_PER_IP", "0".to_owned()),
            ("NATTER_OVERLOAD_LATENCY_MS", "0".to_owned()),
                ("NATTER_MAX_MESSAGE_CHARS", cfg.limits.max_message_chars.to_string()),
            ];
        }
        vec![
            ("NATTER_NATS_URL", cfg.distributed.nats_url.clone().unwrap()),
            ("NATTER_MONGO_URL", cfg.distributed.mongo_url.clone().unwrap()),
            ("NATTER_REDIS_URL", cfg.distributed.redis_url.clone().unwrap()),
            ("NATTER_MONGO_DB", cfg.distributed.mongo_db.clone()),
            ("NATTER_REDIS_PREFIX", cfg.distributed.redis_prefix.clone()),
            ("NATTER_STREAM", cfg.distributed.stream.clone()),
            ("NATTER_SUBJECT_PREFIX", cfg.log.subject_prefix.clone()),
            ("NATTER_JWT_SECRET", SECRET.to_owned()),
            ("NATTER_REGISTER_PER_HOUR", "0".to_owned()),
            ("NATTER_SENDS_PER_SEC", "0".to_owned()),
            ("NATTER_ROOM_CHANGES_PER_MIN", "0".to_owned()),
            ("NATTER_OVERLOAD_LATENCY_MS", "0".to_owned()),
            ("NATTER_MAX_MESSAGE_CHARS", cfg.limits.max_message_chars.to_string()),
            ("NATTER_PRESENCE_TTL_MS", cfg.push.presence_ttl.as_millis().to_string()),
        ]
    }

    /// Runs a `natter` command (e.g. `["parked", "list"]`) for this cluster;
    /// returns its standard output.
    pub async fn natter(&self, args: &[&str]) -> String {
        let out = natter_command()
            .args(args)
            .envs(self.env())
            .env("RUST_LOG", "warn")
            .output()
            .await
            .expect("run natter");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "natter {args:?} failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        stdout
    }

    /// Starts a node as a separate `natter` process (so a test can
    /// `kill -9` it), sharing this cluster's services and names.
    pub async fn spawn_process(&self) -> ProcessNode {
        self.spawn_process_with(&[]).await
    }

    /// As [`Cluster::spawn_process`], with more environment.
    pub async fn spawn_process_with(&self, extra: &[(&str, &str)]) -> ProcessNode {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = natter_command()
            .envs(self.env())
            .envs(extra.iter().copied())
            .env("NATTER_HOST", "127.0.0.1")
            .env("NATTER_PORT", port.to_string())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn natter");
        let node = ProcessNode { child, url: format!("http://127.0.0.1:{port}") };
        let health = format!("{}/readyz", node.url);
        eventually("the natter process to serve", || async {
            self.http.get(&health).send().await.is_ok_and(|r| r.status().is_success())
        })
        .await;
        node
    }

    /// The `/chat` namespace URL of a node.
    pub fn chat_url(&self, node: usize) -> String {
        self.url(node, "/chat")
    }

    /// The Socket.IO URL of a node (namespace `/`).
    pub fn socket_url(&self, node: usize) -> String {
        self.url(node, "/")
    }

    pub async fn stop(mut self) {
        for (i, node) in std::mem::take(&mut self.nodes).into_iter().enumerate() {
            tokio::time::timeout(Duration::from_secs(60), node.stop())
                .await
                .unwrap_or_else(|_| panic!("node {i} did not stop within 60 s (a task ignores shutdown)"));
        }
        // An embedded node's data directory goes when the cluster is
        // dropped, here or in a test that failed before this.
        let Some(log) = &self.nats else { return };
        let _ = log.jetstream().delete_stream(&self.cfg.distributed.stream).await;
        let _ = log.jetstream().delete_stream(format!("{}_PARKED", self.cfg.distributed.stream)).await;
        let _ = log.jetstream().delete_stream(format!("{}_INBOX", self.cfg.distributed.stream)).await;
        let _ = log.jetstream().delete_stream(format!("{}_FANOUT", self.cfg.distributed.stream)).await;
        let _ = log.jetstream().delete_stream(format!("{}_ERASE", self.cfg.distributed.stream)).await;
    }
}

impl Drop for Cluster {
    /// An embedded cluster's data directory is removed even when its test
    /// fails before [`Cluster::stop`] (the 100,000-event test leaves
    /// hundreds of MB otherwise), unless `NATTER_TEST_KEEP` is set. Its
    /// node, if still running, goes with the test's runtime.
    fn drop(&mut self) {
        // NATTER_TEST_KEEP=1 keeps a failed test's directory to look into.
        let keep = std::thread::panicking() && std::env::var_os("NATTER_TEST_KEEP").is_some();
        if self.nats.is_none() && !keep {
            let _ = std::fs::remove_dir_all(&self.cfg.embedded.data_dir);
        }
    }
}

/// A `redis-server` of a test's own (one it may FLUSHALL or restart
/// without disturbing the tests sharing the suite's Redis), on a free port,
/// with its files under the target directory. Killed when dropped.
pub struct PrivateRedis {
    pub url: String,
    port: u16,
    dir: std::path::PathBuf,
    child: tokio::process::Child,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let dir = Cluster::data_dir(&format!("redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Self::spawn(port, &dir);
        let redis = PrivateRedis { url: format!("redis://127.0.0.1:{port}"), port, dir, child };
        redis.wait_until_up().await;
        redis
    }

    fn spawn(port: u16, dir: &std::path::Path) -> tokio::process::Child {
        tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server on PATH (scripts/services.sh installs it)")
    }

    async fn wait_until_up(&self) {
        let client = self.client();
        eventually("the private redis to answer", || async {
            match client.get_multiplexed_async_connection().await {
                Ok(mut conn) => redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok(),
                Err(_) => false,
            }
        })
        .await;
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url.clone()).unwrap()
    }

    /// Kills the server and starts it again on the same port and directory
    /// (it loads the snapshot saved there, if any).
    pub async fn restart(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
        self.child = Self::spawn(self.port, &self.dir);
        self.wait_until_up().await;
    }

    pub async fn stop(mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
