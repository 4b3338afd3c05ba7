//! Traffic through the load balancer, and the checks on what it left: users,
//! senders that retry with the same `clientMsgId` until acknowledged,
//! receivers that reconnect with their cursor, and the history, counts and
//! deliveries every acknowledged send must show up in exactly once.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::Driver;

#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub id: String,
    pub token: String,
}

pub async fn register(http: &reqwest::Client, url: &str, name: &str) -> User {
    let email = format!("{}-{}@example.com", name.to_lowercase(), uuid::Uuid::new_v4().simple());
    let body = json!({"name": name, "email": email, "password": "password123"});
    let r = http.post(format!("{url}/api/auth/register")).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202, "register {name}: {}", r.text().await.unwrap_or_default());
    let r = http.post(format!("{url}/api/auth/login")).json(&json!({"email": email, "password": "password123"})).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    User { name: name.to_owned(), id: v["user"]["_id"].as_str().expect("login answers the user").to_owned(), token: v["token"].as_str().unwrap().to_owned() }
}

/// One acknowledged send.
#[derive(Clone, Debug)]
pub struct Ack {
    pub id: String,
    pub to: String,
    pub started: Instant,
    pub acked: Instant,
    /// Answers other than success before the acknowledgement (503s, 502s,
    /// refused connections): each was retried with the same clientMsgId.
    pub retries: u32,
}

/// What a sender saw.
#[derive(Debug, Default)]
pub struct Sent {
    pub acks: Vec<Ack>,
    /// Sends never acknowledged within a minute of retries.
    pub failed: Vec<String>,
    /// Statuses of the answers that were retried.
    pub refusals: HashMap<String, u32>,
}

/// Sends `n` messages from `from`, round robin to `to`, one at a time, each
/// retried with the same clientMsgId (after its Retry-After, at most 1 s)
/// until acknowledged or a minute has passed.
pub async fn send_stream(http: reqwest::Client, url: String, from: User, to: Vec<User>, n: usize, pause: Duration) -> Sent {
    let mut sent = Sent::default();
    let run = uuid::Uuid::new_v4().simple().to_string();
    for i in 0..n {
        let peer = &to[i % to.len()];
        let client_msg_id = format!("{}-{}-{i}", from.name, &run[..8]);
        let body = json!({"message": format!("{} #{i}", from.name), "clientMsgId": client_msg_id});
        let started = Instant::now();
        let mut retries = 0;
        loop {
            let r = http.post(format!("{url}/api/messages/{}", peer.id)).bearer_auth(&from.token).json(&body).timeout(Duration::from_secs(30)).send().await;
            let wait = match r {
                Ok(r) if r.status().is_success() => {
                    let v: Value = r.json().await.unwrap();
                    let id = v["data"]["_id"].as_str().expect("a send answers the message").to_owned();
                    sent.acks.push(Ack { id, to: peer.id.clone(), started, acked: Instant::now(), retries });
                    break;
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    assert!(status >= 500 || status == 429, "send {client_msg_id} refused: {status} {}", r.text().await.unwrap_or_default());
                    *sent.refusals.entry(status.to_string()).or_default() += 1;
                    let after = r.headers().get("retry-after").and_then(|h| h.to_str().ok()).and_then(|s| s.parse::<u64>().ok()).unwrap_or(1);
                    Duration::from_secs(after.min(1))
                }
                Err(e) => {
                    let kind = if e.is_timeout() { "timeout" } else { "connection" };
                    *sent.refusals.entry(kind.into()).or_default() += 1;
                    Duration::from_millis(200)
                }
            };
            retries += 1;
            if started.elapsed() > Duration::from_secs(60) {
                sent.failed.push(client_msg_id);
                break;
            }
            tokio::time::sleep(wait).await;
        }
        tokio::time::sleep(pause).await;
    }
    sent
}

/// The whole conversation of `me` with `peer`, oldest first (read by
/// `me`, which marks `peer`'s messages seen).
pub async fn history(http: &reqwest::Client, url: &str, me: &User, peer: &User) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let page_url = match before {
            Some(b) => format!("{url}/api/messages/{}?limit=500&before={b}", peer.id),
            None => format!("{url}/api/messages/{}?limit=500", peer.id),
        };
        let page: Vec<Value> = http.get(page_url).bearer_auth(&me.token).send().await.unwrap().json().await.unwrap();
        if page.is_empty() {
            break;
        }
        before = page[0]["seq"].as_u64();
        let mut page = page;
        page.append(&mut all);
        all = page;
        if before == Some(1) {
            break;
        }
    }
    all
}

/// The checks every fault test makes once its traffic has stopped: each
/// conversation's history holds every acknowledged send exactly once and
/// nothing else, its sequences are 1..n, and the receiver's unseen count
/// for the sender is exact. Returns the number of messages checked.
pub async fn check_histories(http: &reqwest::Client, url: &str, senders: &[(User, Sent)], receivers: &[User]) -> usize {
    let mut checked = 0;
    for (sender, sent) in senders {
        assert!(sent.failed.is_empty(), "{}'s sends never acknowledged: {:?}", sender.name, sent.failed);
        for receiver in receivers {
            let acked: Vec<&Ack> = sent.acks.iter().filter(|a| a.to == receiver.id).collect();
            if acked.is_empty() {
                continue;
            }
            // Counts first: reading the history as the receiver would mark it seen.
            let want = acked.len() as u64;
            let users_url = format!("{url}/api/users");
            crate::eventually(&format!("{}'s unseen count from {} to reach {want}", receiver.name, sender.name), 30, || async {
                let Ok(r) = http.get(&users_url).bearer_auth(&receiver.token).send().await else { return false };
                let v: Value = r.json().await.unwrap_or_default();
                v["unseenMessages"][&sender.id].as_u64() == Some(want)
            })
            .await;
            let messages = history(http, url, sender, receiver).await;
            let seqs: Vec<u64> = messages.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
            assert_eq!(seqs, (1..=messages.len() as u64).collect::<Vec<_>>(), "{} → {}: sequences are 1..n without gaps", sender.name, receiver.name);
            let ids: Vec<&str> = messages.iter().map(|m| m["_id"].as_str().unwrap()).collect();
            let unique: HashSet<&str> = ids.iter().copied().collect();
            assert_eq!(unique.len(), ids.len(), "{} → {}: a message appears twice in the history", sender.name, receiver.name);
            for a in &acked {
                assert!(unique.contains(a.id.as_str()), "{} → {}: acknowledged message {} is missing from the history", sender.name, receiver.name, a.id);
            }
            assert_eq!(ids.len(), acked.len(), "{} → {}: the history holds messages nobody acknowledged", sender.name, receiver.name);
            checked += ids.len();
        }
    }
    checked
}

/// A receiver's sockets through the load balancer: one at a time, each
/// reconnected with the last cursor seen when it drops.
pub struct Receiver {
    pub user: User,
    pub current: String,
    /// Long-polling only (no WebSocket): every request of a session must
    /// reach the node that holds it (nginx's stickiness).
    polling: bool,
    incarnations: u32,
    pub reconnects: Vec<Duration>,
    dropped_at: Option<Instant>,
}

impl Receiver {
    pub fn new(user: User, polling: bool) -> Receiver {
        Receiver { current: format!("{}#0", user.name), user, polling, incarnations: 0, reconnects: Vec::new(), dropped_at: None }
    }

    fn transports(&self) -> &'static [&'static str] {
        if self.polling { &["polling"] } else { &["websocket"] }
    }

    fn sockets<'a>(&'a self, d: &'a Driver) -> impl Iterator<Item = &'a Value> + 'a {
        let prefix = format!("{}#", self.user.name);
        d.all.iter().filter(move |e| e["id"].as_str().is_some_and(|id| id.starts_with(&prefix)))
    }

    /// Every `newMessage` any of this receiver's sockets got: `_id` → times.
    pub fn received(&self, d: &Driver) -> HashMap<String, u32> {
        let mut out = HashMap::new();
        for e in self.sockets(d).filter(|e| e["type"] == "event" && e["event"] == "newMessage") {
            *out.entry(e["data"]["_id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
        }
        out
    }

    fn cursor(&self, d: &Driver) -> u64 {
        self.sockets(d).filter(|e| e["type"] == "event" && e["event"] == "newMessage").filter_map(|e| e["data"]["cursor"].as_u64()).max().unwrap_or(0)
    }
}

pub async fn connect_all(d: &mut Driver, url: &str, receivers: &[Receiver]) {
    for r in receivers {
        d.connect_over(&r.current, &format!("{url}/"), json!({"token": r.user.token}), r.transports()).await;
        let first = d.next(&r.current, |e| e["type"] == "connect" || e["type"] == "connect_error", "connect").await;
        assert_eq!(first["type"], "connect", "{} did not connect: {first}", r.current);
    }
}

/// Pumps the receivers' events until `done` holds or `secs` pass,
/// reconnecting (with the cursor) any socket that dropped or failed to
/// connect. Returns whether `done` held.
pub async fn follow(d: &mut Driver, url: &str, receivers: &mut [Receiver], secs: u64, mut done: impl FnMut(&Driver, &[Receiver]) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        d.pump_for(Duration::from_millis(100)).await;
        for r in receivers.iter_mut() {
            let current = r.current.clone();
            let mut events = d.all.iter().filter(|e| e["id"] == current.as_str());
            if events.any(|e| e["type"] == "connect") && r.dropped_at.is_some() {
                r.reconnects.push(r.dropped_at.take().unwrap().elapsed());
            }
            let down = d.all.iter().any(|e| e["id"] == current.as_str() && (e["type"] == "disconnect" || e["type"] == "connect_error"));
            if down {
                r.dropped_at.get_or_insert_with(Instant::now);
                r.incarnations += 1;
                r.current = format!("{}#{}", r.user.name, r.incarnations);
                let auth = json!({"token": r.user.token, "cursor": r.cursor(d)});
                d.connect_over(&r.current, &format!("{url}/"), auth, r.transports()).await;
            }
        }
        if done(d, receivers) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
    }
}

/// Every acknowledged send to each receiver arrived on its sockets exactly
/// once. Returns (delivered, missing, duplicated).
pub fn deliveries(d: &Driver, receivers: &[Receiver], senders: &[(User, Sent)]) -> (usize, usize, usize) {
    let (mut delivered, mut missing, mut duplicated) = (0, 0, 0);
    for r in receivers {
        let got = r.received(d);
        for (_, sent) in senders {
            for a in sent.acks.iter().filter(|a| a.to == r.user.id) {
                match got.get(&a.id).copied().unwrap_or(0) {
                    0 => missing += 1,
                    1 => delivered += 1,
                    _ => {
                        delivered += 1;
                        duplicated += 1
                    }
                }
            }
        }
    }
    (delivered, missing, duplicated)
}

/// The longest any acknowledged send took (first attempt to acknowledgement).
pub fn slowest(senders: &[(User, Sent)]) -> Duration {
    senders.iter().flat_map(|(_, s)| s.acks.iter()).map(|a| a.acked - a.started).max().unwrap_or_default()
}

pub fn retried(senders: &[(User, Sent)]) -> (u32, HashMap<String, u32>) {
    let mut by_status = HashMap::new();
    for (_, s) in senders {
        for (k, v) in &s.refusals {
            *by_status.entry(k.clone()).or_insert(0) += v;
        }
    }
    (senders.iter().flat_map(|(_, s)| s.acks.iter()).filter(|a| a.retries > 0).count() as u32, by_status)
}
