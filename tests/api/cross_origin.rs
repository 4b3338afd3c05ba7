//! CORS in a real browser: a page served from another origin than natter
//! (headless Chromium, `tests/client/cross_origin.js`) registers, logs in,
//! connects Socket.IO over long-polling, sends and receives; a page from an
//! origin natter does not allow can read nothing.

use std::process::Stdio;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

use crate::helpers::{Cluster, User};

/// The browser script's next line (it prints one per step), or its error.
async fn next(lines: &mut Lines<BufReader<ChildStdout>>, what: &str) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(90), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("no {what} from the browser within 90 s"))
        .expect("read the browser script's output")
        .unwrap_or_else(|| panic!("the browser script ended before {what}"));
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
    assert!(v.get("error").is_none(), "the browser script failed at {what}: {}", v["error"]);
    v
}

#[tokio::test]
async fn a_page_on_an_allowed_origin_logs_in_sends_and_receives_in_a_real_browser() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/client");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists() && std::path::Path::new(dir).join("node_modules/playwright-core").exists(),
        "Chromium ({chromium}) or playwright-core is missing: run the suite with scripts/test.sh, which installs both"
    );
    let mut script = Command::new("node")
        .arg("cross_origin.js")
        .current_dir(dir)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node is installed");
    let mut stdin = script.stdin.take().unwrap();
    let mut lines = BufReader::new(script.stdout.take().unwrap()).lines();
    let origins = next(&mut lines, "the page origins").await;
    let (allowed, foreign) = (origins["allowed"].as_str().unwrap(), origins["foreign"].as_str().unwrap());

    // natter allows the first origin (and another one, as a list).
    let c = Cluster::embedded_with(|cfg| cfg.server.cors_origins = format!("http://app.example.com, {allowed}")).await;
    let bob = c.register(0, "Bob").await;
    let email = format!("browser-{}@example.com", uuid::Uuid::new_v4().simple());
    let shots = concat!(env!("CARGO_MANIFEST_DIR"), "/target/screenshots");
    std::fs::create_dir_all(shots).unwrap();
    let cfg = json!({ "natter": c.url(0, ""), "peer": bob.id, "email": email, "screenshot": format!("{shots}/cross-origin.png") });
    stdin.write_all(format!("{cfg}\n").as_bytes()).await.unwrap();
    stdin.flush().await.unwrap();

    // The page registered, logged in, connected over long-polling and sent.
    let sent = next(&mut lines, "the page's send").await;
    let amy = sent["me"].as_str().unwrap().to_owned();
    assert_eq!(sent["data"]["receiverId"], json!(bob.id), "{sent}");
    assert_eq!(sent["data"]["message"], json!("hello from another origin"));

    // Bob answers; the page receives it live.
    c.request(0, Method::POST, &format!("/api/messages/{amy}"), Some(&bob.token), Some(json!({ "message": "hello back" }))).await.ok();
    let received = next(&mut lines, "the page's newMessage").await;
    assert_eq!((&received["data"]["message"], &received["data"]["senderId"]), (&json!("hello back"), &json!(bob.id)), "{received}");

    // From an origin natter does not allow, the browser lets the page read nothing.
    let stranger = next(&mut lines, "the foreign page's attempts").await;
    assert_eq!(stranger["reachable"], json!("opaque"), "natter answers the foreign page, unreadably: {stranger}");
    assert_eq!(stranger["fetch"], json!("refused: TypeError: Failed to fetch"), "a foreign origin read natter's answer: {stranger}");
    assert_eq!(stranger["socket"], json!("refused: xhr poll error"), "a foreign origin connected: {stranger}");
    assert_ne!(foreign, allowed);

    let page_user = User { id: amy, token: String::new(), email };
    let texts: Vec<Value> = c.history(0, &bob, &page_user).await.iter().map(|m| m["message"].clone()).collect();
    assert_eq!(texts, [json!("hello from another origin"), json!("hello back")]);
    let status = tokio::time::timeout(Duration::from_secs(30), script.wait()).await.expect("the browser script ends").unwrap();
    assert!(status.success(), "the browser script exited with {status}");
    c.stop().await;
}
