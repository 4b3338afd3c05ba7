//! A local production topology for one test: `scripts/cluster.sh` with its
//! own directory and ports, stopped (every process) when dropped, whether
//! the test passed or not.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

pub struct LocalCluster {
    dir: PathBuf,
    port: u16,
    /// nginx, in front of the three nodes.
    pub url: String,
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");

impl LocalCluster {
    /// Starts a fresh cluster under `target/faults/<name>` with nginx on
    /// `port` (the other processes take the ports above it; see
    /// scripts/cluster.sh), the nodes given `env` besides.
    pub async fn up(name: &str, port: u16, env: &[(&str, &str)]) -> LocalCluster {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/faults")).join(name);
        // Whatever an interrupted run left there is stopped first (its
        // processes run in their own sessions and hold the ports).
        if dir.exists() {
            down(&dir, port);
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cluster = LocalCluster { dir, port, url: format!("http://127.0.0.1:{port}") };
        let out = cluster.script(&["up"], env).await;
        assert!(out.status.success(), "scripts/cluster.sh up failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_owned();
        assert_eq!(last, cluster.url, "cluster.sh up prints the load balancer's URL last");
        cluster
    }

    async fn script(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        script(&self.dir, self.port, args, env).await
    }

    /// SIGTERM `name` in a task of its own (the caller goes on pumping
    /// sockets); the task's output says whether it stopped cleanly.
    pub fn stop_in_background(&self, name: &str) -> tokio::task::JoinHandle<std::process::Output> {
        let (dir, port, name) = (self.dir.clone(), self.port, name.to_owned());
        tokio::spawn(async move { script(&dir, port, &["stop", &name], &[]).await })
    }

    /// The pid of `name` (nats1..3, redis, mongo, natter1..3, nginx).
    pub fn pid(&self, name: &str) -> u32 {
        let text = std::fs::read_to_string(self.dir.join(format!("{name}.pid"))).unwrap_or_else(|e| panic!("no pid file for {name}: {e}"));
        text.trim().parse().unwrap()
    }

    /// Sends `signal` (KILL, STOP, CONT, TERM) to `name`.
    pub fn signal(&self, name: &str, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid(name).to_string()).status().unwrap();
        assert!(status.success(), "kill -{signal} {name}");
    }

    /// `kill -9`, and waits until the process is gone.
    pub async fn kill9(&self, name: &str) {
        let pid = self.pid(name);
        self.signal(name, "KILL");
        let gone = || std::fs::read_to_string(format!("/proc/{pid}/status")).map(|s| s.contains("State:\tZ")).unwrap_or(true);
        crate::eventually("the killed process to be gone", 10, || async { gone() }).await;
    }

    /// (Re)starts `name` and waits until it is ready.
    pub async fn start(&self, name: &str, env: &[(&str, &str)]) {
        let out = self.script(&["start", name], env).await;
        assert!(out.status.success(), "cluster.sh start {name}:\n{}", String::from_utf8_lossy(&out.stderr));
    }

    /// The port of natter node `i` (1..=3), to read its own /metrics.
    pub fn node_url(&self, i: u16) -> String {
        format!("http://127.0.0.1:{}", self.port + i)
    }

    /// NATS server `i`'s monitoring URL.
    pub fn nats_monitor(&self, i: u16) -> String {
        format!("http://127.0.0.1:{}", self.port + 30 + i)
    }

    /// The NATS server (nats1..3) leading the replicas of natter's log.
    pub async fn log_leader(&self, http: &reqwest::Client) -> String {
        for i in 1..=3 {
            let Ok(r) = http.get(format!("{}/jsz?streams=true", self.nats_monitor(i))).send().await else { continue };
            let Ok(v) = r.json::<Value>().await else { continue };
            for account in v["account_details"].as_array().into_iter().flatten() {
                for s in account["stream_detail"].as_array().into_iter().flatten() {
                    if s["name"] == "NATTER" {
                        if let Some(leader) = s["cluster"]["leader"].as_str() {
                            // server_name natter-nats-N runs as natsN.
                            return format!("nats{}", leader.trim_start_matches("natter-nats-"));
                        }
                    }
                }
            }
        }
        panic!("no NATS server reports a leader for the NATTER stream")
    }

    /// The number of sockets natter node `i` holds (its `natter_sockets` gauge).
    pub async fn sockets_on(&self, http: &reqwest::Client, i: u16) -> u64 {
        let Ok(r) = http.get(format!("{}/metrics", self.node_url(i))).send().await else { return 0 };
        let text = r.text().await.unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("natter_sockets "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    }
}

/// Runs `scripts/cluster.sh ARGS` on the cluster in `dir`.
async fn script(dir: &std::path::Path, port: u16, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg(SCRIPT).args(args);
    // The suite's own service URLs and settings are not the cluster's.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("NATTER_")) {
        cmd.env_remove(k);
    }
    cmd.env("NATTER_CLUSTER_DIR", dir)
        .env("NATTER_CLUSTER_PORT", port.to_string())
        .env("NATTER_BIN", env!("CARGO_BIN_EXE_natter"))
        // Every test client comes from 127.0.0.1.
        .env("NATTER_REGISTER_PER_HOUR", "10000")
        .env("NATTER_LOGIN_PER_MIN", "10000")
        .env("NATTER_SENDS_PER_SEC", "1000");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.kill_on_drop(true).output().await.expect("bash runs scripts/cluster.sh")
}

/// Stops every process of the cluster in `dir` (blocking).
fn down(dir: &std::path::Path, port: u16) {
    let _ = Command::new("bash").arg(SCRIPT).arg("down").env("NATTER_CLUSTER_DIR", dir).env("NATTER_CLUSTER_PORT", port.to_string()).output();
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        down(&self.dir, self.port);
        if std::thread::panicking() || std::env::var_os("NATTER_FAULTS_KEEP").is_some() {
            eprintln!("cluster logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Waits until every node reports ready.
pub async fn all_ready(c: &LocalCluster, http: &reqwest::Client) {
    for i in 1..=3 {
        let url = format!("{}/readyz", c.node_url(i));
        crate::eventually(&format!("node {i} ready"), 60, || async {
            matches!(http.get(&url).timeout(Duration::from_secs(3)).send().await, Ok(r) if r.status().is_success())
        })
        .await;
    }
}
