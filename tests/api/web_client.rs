//! The web client natter serves at `/`, used by two people in headless
//! Chromium (`tests/client/web_client.js`): register, a live message and
//! its unread count, seen ticks, typing, a dropped connection resumed with
//! nothing lost or repeated, a study room's presence. Screenshots go to
//! `target/screenshots/`.

use reqwest::Method;

use crate::browser::Browser;
use crate::helpers::Cluster;

/// Runs the browser scenario, Amy on node `a` of `c` and Bob on node `b`;
/// returns the steps passed.
async fn browse(c: &Cluster, a: usize, b: usize) -> Vec<String> {
    let env = [("NATTER_URL_A", c.url(a, "")), ("NATTER_URL_B", c.url(b, "")), ("SHOTS", Browser::screenshots())];
    let mut browser = Browser::start("web_client.js", &env);
    let mut steps = Vec::new();
    loop {
        let v = browser.next(&format!("the step after {steps:?}"), 120).await;
        if v.get("done").is_some() {
            break;
        }
        steps.push(v["step"].as_str().unwrap_or_default().to_owned());
    }
    browser.finish().await;
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
