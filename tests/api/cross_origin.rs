//! CORS in a real browser: a page served from another origin than natter
//! (headless Chromium, `tests/client/cross_origin.js`) registers, logs in,
//! connects Socket.IO over long-polling, sends and receives; a page from an
//! origin natter does not allow can read nothing.

use reqwest::Method;
use serde_json::{Value, json};

use crate::browser::Browser;
use crate::helpers::{Cluster, User};

#[tokio::test]
async fn a_page_on_an_allowed_origin_logs_in_sends_and_receives_in_a_real_browser() {
    let mut browser = Browser::start("cross_origin.js", &[]);
    let origins = browser.next("the page origins", 90).await;
    let (allowed, foreign) = (origins["allowed"].as_str().unwrap(), origins["foreign"].as_str().unwrap());

    // natter allows the first origin (and another one, as a list).
    let c = Cluster::embedded_with(|cfg| cfg.server.cors_origins = format!("http://app.example.com, {allowed}")).await;
    let bob = c.register(0, "Bob").await;
    let email = format!("browser-{}@example.com", uuid::Uuid::new_v4().simple());
    let shot = format!("{}/cross-origin.png", Browser::screenshots());
    browser.tell(&json!({ "natter": c.url(0, ""), "peer": bob.id, "email": email, "screenshot": shot })).await;

    // The page registered, logged in, connected over long-polling and sent.
    let sent = browser.next("the page's send", 90).await;
    let amy = sent["me"].as_str().unwrap().to_owned();
    assert_eq!(sent["data"]["receiverId"], json!(bob.id), "{sent}");
    assert_eq!(sent["data"]["message"], json!("hello from another origin"));

    // Bob answers; the page receives it live.
    c.request(0, Method::POST, &format!("/api/messages/{amy}"), Some(&bob.token), Some(json!({ "message": "hello back" }))).await.ok();
    let received = browser.next("the page's newMessage", 90).await;
    assert_eq!((&received["data"]["message"], &received["data"]["senderId"]), (&json!("hello back"), &json!(bob.id)), "{received}");

    // From an origin natter does not allow, the browser lets the page read nothing.
    let stranger = browser.next("the foreign page's attempts", 90).await;
    assert_eq!(stranger["reachable"], json!("opaque"), "natter answers the foreign page, unreadably: {stranger}");
    assert_eq!(stranger["fetch"], json!("refused: TypeError: Failed to fetch"), "a foreign origin read natter's answer: {stranger}");
    assert_eq!(stranger["socket"], json!("refused: xhr poll error"), "a foreign origin connected: {stranger}");
    assert_ne!(foreign, allowed);

    let page_user = User { id: amy, token: String::new(), email };
    let texts: Vec<Value> = c.history(0, &bob, &page_user).await.iter().map(|m| m["message"].clone()).collect();
    assert_eq!(texts, [json!("hello from another origin"), json!("hello back")]);
    browser.finish().await;
    c.stop().await;
}
