//! Fault tests on natter's production topology: `scripts/cluster.sh` (three
//! NATS servers with the log at three replicas, Redis, the MongoDB-protocol
//! server, three natter nodes, nginx in front), real processes on loopback.
//! Each test starts its own cluster, runs traffic through nginx, injects
//! one fault and checks what was acknowledged:
//!
//! - kill -9 of the NATS server leading the log, under sends;
//! - kill -9 of a natter node holding sockets;
//! - a rolling restart (SIGTERM one node at a time, start it again);
//! - MongoDB and Redis stalled (SIGSTOP) for 10 s each.
//!
//! Every test prints its figures (acknowledged, lost, duplicated, recovery
//! time): `cargo test --test faults -- --nocapture`. The tests run one at a
//! time (each cluster is nine processes on a 2-core machine).

#[path = "../api/client.rs"]
#[allow(dead_code)]
mod client;
mod cluster;
mod traffic;

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Mutex;

use client::Driver;
use cluster::{LocalCluster, all_ready};
use traffic::{Receiver, User, check_histories, connect_all, deliveries, follow, register, retried, send_stream, slowest};

/// One cluster at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// Polls `check` every 100 ms until it holds; panics after `secs`.
pub async fn eventually<F, Fut>(what: &str, secs: u64, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(1)).build().unwrap()
}

async fn users(http: &reqwest::Client, url: &str, prefix: &str, n: usize) -> Vec<User> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(register(http, url, &format!("{prefix}{i}")).await);
    }
    out
}

/// Starts `senders` streams of `n` messages each (round robin over
/// `receivers`), through the load balancer.
fn start_senders(http: &reqwest::Client, url: &str, senders: &[User], receivers: &[User], n: usize) -> Vec<tokio::task::JoinHandle<(User, traffic::Sent)>> {
    senders
        .iter()
        .map(|s| {
            let (http, url, s, to) = (http.clone(), url.to_owned(), s.clone(), receivers.to_vec());
            tokio::spawn(async move {
                let sent = send_stream(http, url, s.clone(), to, n, Duration::from_millis(40)).await;
                (s, sent)
            })
        })
        .collect()
}

async fn joined(tasks: Vec<tokio::task::JoinHandle<(User, traffic::Sent)>>) -> Vec<(User, traffic::Sent)> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Prints a test's figures, and keeps them in `target/faults/<file>.txt`
/// (scripts/test.sh shows them after the suite).
fn report(file: &str, name: &str, lines: &[String]) {
    let mut text = format!("== fault test: {name}\n");
    for l in lines {
        text.push_str(&format!("   {l}\n"));
    }
    println!("\n{text}");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/target/faults");
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(format!("{dir}/{file}.txt"), text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_nats_server_leading_the_log_loses_nothing() {
    let _one = SERIAL.lock().await;
    let c = LocalCluster::up("nats-kill", 15500, &[]).await;
    let http = http();
    let senders = users(&http, &c.url, "s", 4).await;
    let receivers = users(&http, &c.url, "r", 2).await;

    let tasks = start_senders(&http, &c.url, &senders, &receivers, 120);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = c.log_leader(&http).await;
    let killed_at = Instant::now();
    c.kill9(&leader).await;
    let sent = joined(tasks).await;

    // Sends started after the kill: how long until the first was acknowledged.
    let resumed = sent
        .iter()
        .flat_map(|(_, s)| s.acks.iter())
        .filter(|a| a.started >= killed_at)
        .map(|a| a.acked - killed_at)
        .min()
        .expect("sends were acknowledged after the kill");
    all_ready(&c, &http).await;
    let checked = check_histories(&http, &c.url, &sent, &receivers).await;
    let (retried_sends, statuses) = retried(&sent);
    let acked: usize = sent.iter().map(|(_, s)| s.acks.len()).sum();
    report(
        "nats-kill",
        "kill -9 of the NATS server leading the log (three servers, R3), 4 senders through nginx",
        &[
            format!("killed {leader}; acknowledged {acked}, failed 0, in history exactly once {checked}, lost 0, duplicated 0, sequences gapless, counts exact"),
            format!("first send started after the kill acknowledged {:.1} s after it; slowest send {:.1} s", resumed.as_secs_f64(), slowest(&sent).as_secs_f64()),
            format!("sends retried with their clientMsgId: {retried_sends} (answers retried: {statuses:?}); all three nodes ready again"),
        ],
    );
}

/// The two socket tests' setting: a cluster, 2 senders and 6 receivers
/// with a socket each through nginx, half long-polling (sticky), half
/// WebSocket.
struct Scene {
    c: LocalCluster,
    http: reqwest::Client,
    senders: Vec<User>,
    people: Vec<User>,
    receivers: Vec<Receiver>,
    d: Driver,
}

impl Scene {
    async fn start(name: &str, port: u16) -> Scene {
        let c = LocalCluster::up(name, port, &[]).await;
        let http = http();
        let senders = users(&http, &c.url, "s", 2).await;
        let people = users(&http, &c.url, "r", 6).await;
        let receivers: Vec<Receiver> = people.iter().enumerate().map(|(i, u)| Receiver::new(u.clone(), i % 2 == 0)).collect();
        let mut d = Driver::start().await;
        connect_all(&mut d, &c.url, &receivers).await;
        Scene { c, http, senders, people, receivers, d }
    }

    /// Follows the sockets for up to `secs` (reconnecting dropped ones)
    /// until `done`.
    async fn follow(&mut self, secs: u64, done: impl FnMut(&Driver, &[Receiver]) -> bool) -> bool {
        follow(&mut self.d, &self.c.url, &mut self.receivers, secs, done).await
    }

    /// Waits for the senders, lets late deliveries arrive (and a quiet
    /// second for any repeat), and counts: (sent, delivered, missing,
    /// duplicated, messages checked in the histories).
    async fn finish(&mut self, tasks: Vec<tokio::task::JoinHandle<(User, traffic::Sent)>>, after: &str) -> (Vec<(User, traffic::Sent)>, usize, usize, usize, usize) {
        let sent_done = self.follow(120, |_, _| tasks.iter().all(|t| t.is_finished())).await;
        assert!(sent_done, "the senders did not finish within 2 minutes of {after}");
        let sent = joined(tasks).await;
        self.follow(30, |d, rs| deliveries(d, rs, &sent).1 == 0).await;
        self.follow(1, |_, _| false).await;
        let (delivered, missing, duplicated) = deliveries(&self.d, &self.receivers, &sent);
        let checked = check_histories(&self.http, &self.c.url, &sent, &self.people).await;
        (sent, delivered, missing, duplicated, checked)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_with_sockets_loses_and_repeats_no_delivery() {
    let _one = SERIAL.lock().await;
    let mut s = Scene::start("node-kill", 15560).await;
    // The node holding the most of them.
    let mut victim = (0, 1);
    for i in 1..=3 {
        let n = s.c.sockets_on(&s.http, i).await;
        if n > victim.0 {
            victim = (n, i);
        }
    }
    assert!(victim.0 > 0, "nginx spread the sockets over the nodes");

    let tasks = start_senders(&s.http, &s.c.url, &s.senders, &s.people, 90);
    s.follow(30, |d, rs| rs.iter().map(|r| r.received(d).len()).sum::<usize>() >= 20).await;
    // Long-polling sessions hold through nginx (each poll reaches the node
    // that holds its session), or they would have dropped by now.
    assert!(s.receivers.iter().all(|r| r.current.ends_with("#0")), "a socket dropped before any fault");
    s.c.kill9(&format!("natter{}", victim.1)).await;
    let (sent, delivered, missing, duplicated, checked) = s.finish(tasks, "the kill").await;
    let moved: Vec<&Receiver> = s.receivers.iter().filter(|r| !r.reconnects.is_empty()).collect();
    let slowest_reconnect = moved.iter().flat_map(|r| r.reconnects.iter()).max().copied().unwrap_or_default();
    report(
        "node-kill",
        "kill -9 of a natter node holding sockets, 2 senders to 6 receivers (3 long-polling, 3 WebSocket) through nginx",
        &[
            format!("killed natter{} with {} of the 6 sockets; {} sockets reconnected through nginx with their cursor (slowest {:.1} s)", victim.1, victim.0, moved.len(), slowest_reconnect.as_secs_f64()),
            format!("acknowledged {}, delivered {delivered}, missing {missing}, duplicated {duplicated}; in history exactly once {checked}", sent.iter().map(|(_, s)| s.acks.len()).sum::<usize>()),
        ],
    );
    assert_eq!(moved.len() as u64, victim.0, "every socket of the killed node reconnected");
    assert_eq!((missing, duplicated), (0, 0), "every acknowledged message reached its receiver exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_traffic_fails_no_send_and_loses_no_delivery() {
    let _one = SERIAL.lock().await;
    let mut s = Scene::start("rolling", 15620).await;
    let tasks = start_senders(&s.http, &s.c.url, &s.senders, &s.people, 200);
    let started = Instant::now();
    let mut restarts = Vec::new();
    for i in 1..=3 {
        s.follow(5, |_, _| false).await;
        let t = Instant::now();
        let name = format!("natter{i}");
        // SIGTERM and the node's drain, while the receivers keep following.
        let stop = s.c.stop_in_background(&name);
        s.follow(60, |_, _| stop.is_finished()).await;
        let out = stop.await.unwrap();
        assert!(out.status.success(), "{name} did not drain and exit within 20 s of SIGTERM:\n{}", String::from_utf8_lossy(&out.stderr));
        let drained = t.elapsed();
        s.c.start(&name, &[]).await;
        restarts.push(format!("{name}: drained and exited in {:.1} s, ready again {:.1} s after SIGTERM", drained.as_secs_f64(), t.elapsed().as_secs_f64()));
    }
    let (sent, delivered, missing, duplicated, checked) = s.finish(tasks, "the restarts").await;
    let (retried_sends, statuses) = retried(&sent);
    let reconnects: usize = s.receivers.iter().map(|r| r.reconnects.len()).sum();
    let failed: usize = sent.iter().map(|(_, s)| s.failed.len()).sum();
    let mut lines = restarts;
    lines.push(format!(
        "over {:.0} s: acknowledged {}, failed {failed}, retried with the same clientMsgId {retried_sends} (answers retried: {statuses:?})",
        started.elapsed().as_secs_f64(),
        sent.iter().map(|(_, s)| s.acks.len()).sum::<usize>()
    ));
    lines.push(format!("deliveries: {delivered} exactly once, missing {missing}, duplicated {duplicated}; socket reconnects with cursor {reconnects}; in history exactly once {checked}"));
    report("rolling", "rolling restart of the three natter nodes (SIGTERM, start), 2 senders to 6 receivers (3 long-polling, 3 WebSocket) through nginx", &lines);
    assert_eq!((missing, duplicated), (0, 0), "every acknowledged message reached its receiver exactly once");
}

/// One request during a stall: its status and how long it took.
async fn timed(req: reqwest::RequestBuilder) -> (String, Duration, bool) {
    let t = Instant::now();
    match req.timeout(Duration::from_secs(40)).send().await {
        Ok(r) => {
            let retry_after = r.headers().contains_key("retry-after");
            (r.status().as_u16().to_string(), t.elapsed(), retry_after)
        }
        Err(e) => (format!("error: {e}"), t.elapsed(), false),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_stores_answer_503_in_time_and_lose_nothing() {
    let _one = SERIAL.lock().await;
    let c = LocalCluster::up("stores", 15680, &[]).await;
    let http = http();
    let senders = users(&http, &c.url, "s", 2).await;
    let receivers = users(&http, &c.url, "r", 2).await;
    // The nodes run with the default limits: a store call 5 s, a request 15 s.
    let (store_limit, request_limit) = (Duration::from_secs(5), Duration::from_secs(15));
    let mut lines = Vec::new();
    let mut all_sent = Vec::new();
    for store in ["mongo", "redis"] {
        let tasks = start_senders(&http, &c.url, &senders, &receivers, 40);
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.signal(store, "STOP");
        let stalled_at = Instant::now();
        // Requests made while the store is stalled: each must be answered.
        let (a, b) = (&senders[0], &receivers[0]);
        let probes = tokio::join!(
            timed(http.get(format!("{}/api/users", c.url)).bearer_auth(&a.token)),
            timed(http.get(format!("{}/api/messages/{}?limit=5", c.url, b.id)).bearer_auth(&a.token)),
            timed(http.post(format!("{}/api/messages/{}", c.url, b.id)).bearer_auth(&a.token).json(&json!({"message": "during the stall", "clientMsgId": format!("stall-{store}")}))),
        );
        let remaining = Duration::from_secs(10).saturating_sub(stalled_at.elapsed());
        tokio::time::sleep(remaining).await;
        c.signal(store, "CONT");
        let resumed_at = Instant::now();
        let sent = joined(tasks).await;
        // The stalled send, retried now with its clientMsgId, is acknowledged once.
        let retry = http
            .post(format!("{}/api/messages/{}", c.url, b.id))
            .bearer_auth(&a.token)
            .json(&json!({"message": "during the stall", "clientMsgId": format!("stall-{store}")}));
        let deadline = Instant::now() + Duration::from_secs(30);
        let stall_ack = loop {
            if let Ok(r) = retry.try_clone().unwrap().send().await {
                if r.status().is_success() {
                    let v: serde_json::Value = r.json().await.unwrap();
                    break v["data"]["_id"].as_str().unwrap().to_owned();
                }
            }
            assert!(Instant::now() < deadline, "the send made during the {store} stall was not acknowledged within 30 s of SIGCONT");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        all_ready(&c, &http).await;
        let recovered = resumed_at.elapsed();
        let mut probe_lines = Vec::new();
        for (what, (status, took, retry_after)) in [("GET /api/users", &probes.0), ("GET /api/messages", &probes.1), ("POST /api/messages", &probes.2)] {
            probe_lines.push(format!("{what} {status} in {:.1} s{}", took.as_secs_f64(), if *retry_after { " (Retry-After)" } else { "" }));
            assert!(*took < request_limit + Duration::from_secs(2), "{what} during the {store} stall took {took:?}: longer than the request timeout");
            assert!(status == "200" || status == "201" || (status == "503" && *retry_after), "{what} during the {store} stall answered {status} (want success or 503 with Retry-After)");
        }
        // What needs the stalled store fails fast, by the store timeout, not
        // by the request timeout: the directory (MongoDB users, Redis counts).
        let (status, took, _) = &probes.0;
        assert_eq!(status, "503", "GET /api/users during the {store} stall");
        assert!(*took < store_limit + Duration::from_secs(2), "GET /api/users during the {store} stall took {took:?}: the store timeout did not bound it");
        if store == "mongo" {
            let (status, took, _) = &probes.1;
            assert_eq!(status, "503", "a history read during the MongoDB stall");
            assert!(*took < store_limit + Duration::from_secs(2), "a history read during the MongoDB stall took {took:?}");
        }
        let (retried_sends, statuses) = retried(&sent);
        lines.push(format!(
            "{store} stopped 10 s: {}; every node ready again within {:.1} s of SIGCONT; {} sends acknowledged, {retried_sends} retried with their clientMsgId ({statuses:?}), failed {}",
            probe_lines.join(", "),
            recovered.as_secs_f64(),
            sent.iter().map(|(_, s)| s.acks.len()).sum::<usize>(),
            sent.iter().map(|(_, s)| s.failed.len()).sum::<usize>()
        ));
        // The probe send belongs to the history too.
        let mut probe = traffic::Sent::default();
        let now = Instant::now();
        probe.acks.push(traffic::Ack { id: stall_ack, to: b.id.clone(), started: now, acked: now, retries: 0 });
        all_sent.extend(sent);
        all_sent.push((a.clone(), probe));
    }
    // Merge each sender's streams (both stalls) before checking.
    let mut merged: Vec<(User, traffic::Sent)> = Vec::new();
    for (u, s) in all_sent {
        match merged.iter_mut().find(|(m, _)| m.id == u.id) {
            Some((_, m)) => {
                m.acks.extend(s.acks);
                m.failed.extend(s.failed);
            }
            None => merged.push((u, s)),
        }
    }
    let checked = check_histories(&http, &c.url, &merged, &receivers).await;
    lines.push(format!("after both stalls: in history exactly once {checked}, lost 0, duplicated 0, sequences gapless, counts exact"));
    report("stores", "MongoDB-protocol server and Redis stalled (SIGSTOP 10 s each) under sends through nginx", &lines);
}
