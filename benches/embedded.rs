//! Embedded node figures: command throughput per sync policy, and how long
//! a restart takes to rebuild the views from the log. Reports, never fails
//! on a timing.
//!
//! `cargo bench --bench embedded` (NATTER_BENCH_MESSAGES to change the size,
//! NATTER_BENCH_SYNC=always|os for one sync policy only, NATTER_BENCH_KEEP=1
//! to keep the data directory, NATTER_STORE_CACHE_BYTES for the store's page
//! cache).

use std::sync::Arc;

/// The allocator the natter binary runs with (src/main.rs), so the RSS
/// figures are the node's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::Instant;

use natter::commands::register::Register;
use natter::commands::send::SendMessage;
use natter::config::{Config, SyncPolicy};
use natter::startup::RunningNode;

async fn start(dir: &std::path::Path, sync: SyncPolicy) -> RunningNode {
    let mut cfg = Config::default();
    cfg.server.host = "127.0.0.1".into();
    cfg.server.port = 0;
    cfg.embedded.data_dir = dir.to_owned();
    cfg.embedded.sync = sync;
    // The store's page cache, as the binary reads it.
    if let Some(bytes) = std::env::var("NATTER_STORE_CACHE_BYTES").ok().and_then(|v| v.parse().ok()) {
        cfg.embedded.store_cache = bytes;
    }
    cfg.auth.jwt_secret = Some("bench-secret-bench-secret-bench-secret".to_string().into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    natter::startup::start(cfg, listener).await.unwrap()
}

/// This process's resident memory (it runs the node), in MB.
fn rss_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).unwrap_or(0) / 1024
}

#[tokio::main]
async fn main() {
    let total: usize = std::env::var("NATTER_BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let pairs = 16;
    let syncs = match std::env::var("NATTER_BENCH_SYNC").as_deref() {
        Ok("always") => vec![SyncPolicy::Always],
        Ok("os") => vec![SyncPolicy::Os],
        _ => vec![SyncPolicy::Always, SyncPolicy::Os],
    };
    for sync in syncs {
        let dir = std::env::temp_dir().join(format!("natter-bench-{}", uuid::Uuid::new_v4().simple()));
        let node = Arc::new(start(&dir, sync).await);
        let mut users = Vec::new();
        for i in 0..pairs * 2 {
            let cmd = Register { name: format!("u{i}"), email: format!("u{i}@bench.io"), password: "password123".into() };
            users.push(node.commands().register(cmd).await.unwrap().expect("a new address").id);
        }
        let users = Arc::new(users);
        println!("sync={sync:?}: node started, {} users registered; RSS {} MB", users.len(), rss_mb());
        let started = Instant::now();
        let mut tasks = Vec::new();
        for p in 0..pairs {
            let (node, users) = (node.clone(), users.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..total / pairs {
                    let (a, b) = (users[2 * p].clone(), users[2 * p + 1].clone());
                    let (sender, receiver) = if i % 2 == 0 { (a, b) } else { (b, a) };
                    let cmd = SendMessage { sender, receiver, message: Some(format!("message {i}")), attachment: None, client_msg_id: None, reply_to: None };
                    node.commands().send(cmd).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "sync={sync:?}: {total} sends from {pairs} concurrent senders in {secs:.2} s = {:.0} sends/s; RSS {} MB",
            total as f64 / secs,
            rss_mb()
        );
        Arc::into_inner(node).expect("senders done").stop().await;
        let bytes = std::fs::metadata(dir.join("events.log")).unwrap().len();
        let started = Instant::now();
        let node = start(&dir, sync).await;
        let secs = started.elapsed().as_secs_f64();
        let events = total + pairs * 2;
        let store = std::fs::metadata(dir.join("projections.redb")).map(|m| m.len()).unwrap_or(0);
        println!(
            "sync={sync:?}: restart of {events} events ({:.1} MB of log, {:.1} MB of projections.redb) ready in {secs:.2} s; RSS {} MB",
            bytes as f64 / 1e6,
            store as f64 / 1e6,
            rss_mb()
        );
        node.stop().await;
        if std::env::var_os("NATTER_BENCH_KEEP").is_some() {
            println!("kept the data directory {}", dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
