//! The operator commands against a running cluster.

use natter::log::EventLog;

use crate::helpers::{Cluster, eventually};

#[tokio::test]
async fn projections_and_parked_events_from_the_command_line() {
    let c = Cluster::start(1).await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    c.send(0, &amy, &bob, "hello", None).await.ok();
    let js = c.nats().jetstream().clone();
    // A poison event, parked by all three projectors …
    js.publish(format!("{}.ev.dm.x.y", c.cfg.log.subject_prefix), "not an event".into()).await.unwrap().await.unwrap();
    eventually("the poison event to be parked three times", || async {
        c.metric(0, "natter_projection_parked_total{projection=\"push-fanout\"}").await == 1.0
            && c.metric(0, "natter_projection_parked_total{projection=\"mongo-views\"}").await == 1.0
            && c.metric(0, "natter_projection_parked_total{projection=\"redis-unseen\"}").await == 1.0
    })
    .await;
    // … and a good event parked by mongo-views (as a store fault might have).
    let head = c.nats().head().await.unwrap();
    let good = c.nats().get(head - 1).await.unwrap().envelope;
    js.publish(format!("{}.parked.mongo-views", c.cfg.log.subject_prefix), good.encode().into()).await.unwrap().await.unwrap();

    let table = c.natter(&["projections"]).await;
    for name in ["mongo-views", "redis-unseen", "push-fanout"] {
        let line = table.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} missing:\n{table}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[2], head.to_string(), "{name} checkpoint at the log head:\n{table}");
        assert_eq!(cols[3], "0", "{name} has no lag:\n{table}");
        assert_eq!(cols[5], if name == "mongo-views" { "2" } else { "1" }, "{name} parked:\n{table}");
    }
    assert!(table.contains("redis unread counts: complete"), "{table}");

    let list = c.natter(&["parked", "list"]).await;
    assert_eq!(list.matches("reason:").count(), 4, "{list}");
    assert!(list.contains("undecodable") && list.contains("MessageSent"), "{list}");

    let retry = c.natter(&["parked", "retry"]).await;
    assert!(retry.contains("1 applied, 3 still parked"), "{retry}");
    let list = c.natter(&["parked", "list"]).await;
    assert_eq!(list.matches("reason:").count(), 3, "{list}");
    assert!(!list.contains("MessageSent"), "{list}");
    c.stop().await;
}
