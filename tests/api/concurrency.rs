//! Concurrent senders in one conversation get a gapless sequence.

use futures::future::join_all;

use crate::helpers::Cluster;

crate::contract!(fifty_concurrent_sends_get_sequences_one_to_fifty, 2, fifty_concurrent_sends_get_sequences_one_to_fifty);

async fn fifty_concurrent_sends_get_sequences_one_to_fifty(c: &Cluster) {
    let amy = c.register(0, "Amy").await;
    let bob = c.register(1, "Bob").await;
    let texts: Vec<String> = (0..50).map(|i| format!("msg {i}")).collect();
    let replies = join_all(texts.iter().enumerate().map(|(i, text)| {
        let (from, to) = if i % 2 == 0 { (&amy, &bob) } else { (&bob, &amy) };
        c.send(i % 2, from, to, text, None)
    }))
    .await;
    let mut seqs: Vec<u64> = replies.into_iter().map(|r| r.ok()["data"]["seq"].as_u64().unwrap()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());

    let for_amy = c.history(0, &amy, &bob).await;
    let for_bob = c.history(1, &bob, &amy).await;
    let order = |h: &Vec<serde_json::Value>| h.iter().map(|m| (m["seq"].as_u64().unwrap(), m["_id"].clone())).collect::<Vec<_>>();
    assert_eq!(order(&for_amy).len(), 50);
    assert_eq!(order(&for_amy), order(&for_bob), "the same order for both participants");
    assert_eq!(order(&for_amy).iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=50).collect::<Vec<_>>());
}
