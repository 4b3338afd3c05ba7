//! Drives the official `socket.io-client` (tests/client/driver.js, run with
//! node) from Rust: commands as JSON lines in, socket events as JSON lines
//! out, buffered per socket so tests can wait on one while others fill.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// `node <script>` in `tests/client/` (which must have `package`
/// installed), its stdin and stdout piped, killed when dropped.
pub fn node_script(script: &str, package: &str) -> Command {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/client");
    assert!(
        std::path::Path::new(dir).join("node_modules").join(package).exists(),
        "{package} is not installed: run the suite with scripts/test.sh (it runs npm ci in tests/client)"
    );
    let mut command = Command::new("node");
    command.arg(script).current_dir(dir).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
    command
}

pub struct Driver {
    _child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<Value>,
    buffered: HashMap<String, VecDeque<Value>>,
    /// Every event any socket saw, in arrival order.
    pub all: Vec<Value>,
    tags: u64,
}

const DEADLINE: Duration = Duration::from_secs(30);

impl Driver {
    pub async fn start() -> Driver {
        let mut child = node_script("driver.js", "socket.io-client").spawn().expect("node is installed");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Driver { _child: child, stdin, lines, buffered: HashMap::new(), all: Vec::new(), tags: 0 }
    }

    async fn send(&mut self, cmd: Value) {
        let mut line = cmd.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Opens socket `id` to `url` (namespace included, e.g. `http://…/`).
    pub async fn connect(&mut self, id: &str, url: &str, auth: Value) {
        self.send(json!({"op": "connect", "id": id, "url": url, "auth": auth})).await;
    }

    /// Opens socket `id` over the given transports only (e.g. `["polling"]`:
    /// long-polling, every request of the session to the same node).
    #[allow(dead_code)] // used by tests/faults
    pub async fn connect_over(&mut self, id: &str, url: &str, auth: Value, transports: &[&str]) {
        self.send(json!({"op": "connect", "id": id, "url": url, "auth": auth, "transports": transports})).await;
    }

    /// Connects and waits for `connect` (panics on `connect_error`).
    pub async fn connected(&mut self, id: &str, url: &str, auth: Value) {
        self.connect(id, url, auth).await;
        let first = self.next(id, |e| e["type"] == "connect" || e["type"] == "connect_error", "connect").await;
        assert_eq!(first["type"], "connect", "socket {id} did not connect: {first}");
    }

    pub async fn emit(&mut self, id: &str, event: &str, data: Value) {
        self.send(json!({"op": "emit", "id": id, "event": event, "data": data})).await;
    }

    /// Emits with an acknowledgement and returns the ack's data.
    pub async fn emit_ack(&mut self, id: &str, event: &str, data: Value) -> Value {
        let tag = self.emit_tagged(id, event, data).await;
        self.ack(id, tag).await
    }

    /// Emits asking for an acknowledgement without waiting for it; returns
    /// the tag [`Driver::ack`] waits for (so many can be in flight).
    pub async fn emit_tagged(&mut self, id: &str, event: &str, data: Value) -> u64 {
        self.tags += 1;
        let tag = self.tags;
        self.send(json!({"op": "emit", "id": id, "event": event, "data": data, "ack": true, "tag": tag})).await;
        tag
    }

    /// The data of acknowledgement `tag` on socket `id`.
    pub async fn ack(&mut self, id: &str, tag: u64) -> Value {
        let ack = self.next(id, |e| e["type"] == "ack" && e["tag"] == tag, "ack").await;
        assert!(ack["error"].is_null(), "ack error: {ack}");
        ack["data"].clone()
    }

    pub async fn disconnect(&mut self, id: &str) {
        self.send(json!({"op": "disconnect", "id": id})).await;
    }

    fn pump(&mut self, v: Value) {
        self.all.push(v.clone());
        let id = v["id"].as_str().unwrap_or("").to_owned();
        self.buffered.entry(id).or_default().push_back(v);
    }

    /// The next event of socket `id` matching `pred` (earlier non-matching
    /// ones stay buffered), within 30 s.
    pub async fn next(&mut self, id: &str, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(q) = self.buffered.get_mut(id) {
                if let Some(pos) = q.iter().position(&pred) {
                    return q.remove(pos).unwrap();
                }
            }
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(v)) => self.pump(v),
                Ok(None) => panic!("the client driver exited while waiting for {what} on {id}"),
                Err(_) => panic!("timed out after 30 s waiting for {what} on socket {id}; buffered: {:?}", self.buffered.get(id)),
            }
        }
    }

    /// The next `n` events named `event` on socket `id`, in order.
    pub async fn events(&mut self, id: &str, event: &str, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let e = self.next(id, |e| e["type"] == "event" && e["event"] == event, event).await;
            out.push(e["data"].clone());
        }
        out
    }

    /// Reads whatever arrives for `window` into [`Driver::all`] (and the
    /// per-socket buffers), without waiting on anything in particular.
    #[allow(dead_code)] // used by tests/faults
    pub async fn pump_for(&mut self, window: Duration) {
        let until = tokio::time::Instant::now() + window;
        while let Ok(Some(v)) = tokio::time::timeout_at(until, self.lines.recv()).await {
            self.pump(v);
        }
    }

    /// Everything socket `id` receives for `window` (to prove absence).
    pub async fn quiet(&mut self, id: &str, window: Duration) -> Vec<Value> {
        let until = tokio::time::Instant::now() + window;
        while let Ok(Some(v)) = tokio::time::timeout_at(until, self.lines.recv()).await {
            self.pump(v);
        }
        self.buffered.remove(id).map(Vec::from).unwrap_or_default()
    }
}
