//! The web client natter serves at `/`, used by two people in headless
//! Chromium (`tests/client/web_client.js`): register, a live message and
//! its unread count, seen ticks, typing, a dropped connection resumed with
//! nothing lost or repeated, a study room's presence. Screenshots go to
//! `target/screenshots/`.

use std::process::Stdio;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::helpers::Cluster;

/// Runs the browser scenario, Amy on node `a` of `c` and Bob on node `b`;
/// returns the steps passed.
async fn browse(c: &Cluster, a: usize, b: usize) -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/client");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists() && std::path::Path::new(dir).join("node_modules/playwright-core").exists(),
        "Chromium ({chromium}) or playwright-core is missing: run the suite with scripts/test.sh, which installs both"
    );
    let shots = concat!(env!("CARGO_MANIFEST_DIR"), "/target/screenshots");
    std::fs::create_dir_all(shots).unwrap();
    let mut script = Command::new("node")
        .arg("web_client.js")
        .current_dir(dir)
        .env("CHROMIUM", &chromium)
        .env("NATTER_URL_A", c.url(a, ""))
        .env("NATTER_URL_B", c.url(b, ""))
        .env("SHOTS", shots)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node is installed");
    let mut lines = BufReader::new(script.stdout.take().unwrap()).lines();
    let mut steps = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the browser made no progress for 120 s after {steps:?}"))
            .expect("read the browser script's output")
            .unwrap_or_else(|| panic!("the browser script ended after {steps:?} without saying done"));
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        if let Some(e) = v.get("error") {
            panic!("in the browser, at step \"{}\": {e} (passed before: {steps:?})", v["step"].as_str().unwrap_or("?"));
        }
        if v.get("done").is_some() {
            break;
        }
        steps.push(v["step"].as_str().unwrap_or_default().to_owned());
    }
    let status = tokio::time::timeout(Duration::from_secs(30), script.wait()).await.expect("the browser script ends").unwrap();
    assert!(status.success(), "the browser script exited with {status}");
    steps
}

#[tokio::test]
async fn two_people_chat_in_the_web_client() {
    let c = Cluster::embedded().await;
    let page = c.http.get(c.url(0, "/")).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(page.text().await.unwrap().contains("/assets/socket.io.min.js"), "the page uses the Socket.IO client natter serves");
    let asset = c.request(0, Method::GET, "/assets/socket.io.min.js", None, None).await;
    assert_eq!(asset.status.as_u16(), 200);

    let steps = browse(&c, 0, 0).await;
    assert_eq!(steps.len(), 6, "{steps:?}");
    c.stop().await;
}

/// The same, Amy and Bob on different nodes of a distributed cluster.
#[tokio::test]
async fn the_web_client_works_across_distributed_nodes() {
    let c = Cluster::start(2).await;
    let steps = browse(&c, 0, 1).await;
    assert_eq!(steps.len(), 6, "{steps:?}");
    c.stop().await;
}
