//! The fuzzing campaign: every REST body and query, and every Socket.IO
//! event payload, gets thousands of generated inputs — random JSON of the
//! wrong types, huge numbers, deep nesting, long and strange strings,
//! invalid JSON and UTF-8, bad percent-encodings in paths, oversized
//! bodies — and must be answered without a panic, a 5xx (503 aside) or a
//! wedged node, and without changing the log unless the answer says it
//! did.
//!
//! Inputs come from a seeded generator: a failure prints the seed, and
//! `NATTER_FUZZ_SEED=<seed>` replays it; `NATTER_FUZZ_INPUTS` sets the
//! inputs per target (default 3,000; a new seed every run, so CI runs add up).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Driver;
use crate::helpers::{Cluster, User};

/// Panics raised by natter's own code (not by a test's assertions).
static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_server_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.location().is_some_and(|l| l.file().starts_with("src/") || l.file().contains("/natter/src/")) {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// xorshift64*: small, seeded, reproducible; `deep` is the deepest
/// nesting it generates.
struct Gen(u64, u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }

    fn string(&mut self) -> String {
        let pieces = [
            "", " ", "a", "hello", "é", "😀", "\u{0}", "\n", "\u{202e}", "\u{feff}", ".", "*", ">", "$where", "{\"$gt\":\"\"}",
            "../../etc/passwd", "%00", "<script>", "http://x", "https://x.io/a.png", "ftp://x", "a.b", "a b", "null", "true",
        ];
        let n = match self.below(10) {
            0 => 1000 + self.below(9000) as usize, // long
            1 => 0,
            _ => 1 + self.below(6) as usize,
        };
        let mut s = String::new();
        for _ in 0..n {
            let piece: &str = *self.pick(&pieces[..]);
            s.push_str(piece);
            if s.len() > 20_000 {
                break;
            }
        }
        s
    }

    fn number(&mut self) -> Value {
        match self.below(8) {
            0 => json!(u64::MAX),
            1 => json!(i64::MIN),
            2 => json!(-1),
            3 => json!(0),
            4 => json!(1e308),
            5 => json!(9_007_199_254_740_993u64),
            6 => json!(0.5),
            _ => json!(self.below(1000)),
        }
    }

    /// Random JSON: mostly objects with the keys natter reads, of any type.
    fn json(&mut self, depth: u32) -> Value {
        const KEYS: &[&str] = &[
            "message", "clientMsgId", "roomId", "name", "email", "password", "otherId", "attachmentSent", "attachment",
            "description", "cursor", "to", "typing", "token", "__proto__", "", "limit",
        ];
        if depth > 4 {
            return json!(self.string());
        }
        match self.below(10) {
            0 => Value::Null,
            1 => json!(self.below(2) == 0),
            2 => self.number(),
            3 => json!(self.string()),
            4 => Value::Array((0..self.below(4)).map(|_| self.json(depth + 1)).collect()),
            5 => {
                // Deep nesting.
                let mut v = json!("deep");
                for _ in 0..(self.1 / 4 + self.below(self.1 * 3 / 4)) {
                    v = json!({ "message": v });
                }
                v
            }
            _ => {
                let mut o = serde_json::Map::new();
                for _ in 0..self.below(5) {
                    let key = if self.below(4) == 0 { self.string() } else { (*self.pick(KEYS)).to_owned() };
                    let value = match self.below(3) {
                        0 => json!(self.string()),
                        _ => self.json(depth + 1),
                    };
                    o.insert(key, value);
                }
                Value::Object(o)
            }
        }
    }

    /// A request body: mostly JSON, sometimes bytes that are not.
    fn body(&mut self) -> Vec<u8> {
        match self.below(12) {
            0 => b"{\"message\": ".to_vec(),
            1 => vec![0xff, 0xfe, b'{', 0x80],
            2 => b"{\"message\":\"\\ud800\"}".to_vec(),
            3 => vec![b'['; 10_000],
            4 => Vec::new(),
            5 => format!("{{\"message\":\"{}\"}}", "x".repeat(9000)).into_bytes(), // over the body limit
            _ => serde_json::to_vec(&self.json(0)).unwrap(),
        }
    }

    /// A path segment: an id, garbage, or bytes that are not UTF-8.
    fn segment(&mut self, known: &[&str]) -> String {
        match self.below(8) {
            0 => "%FF%FE".into(),
            1 => "%00".into(),
            2 => "a.b".into(),
            3 => "..".into(),
            4 => "%2F".into(),
            5 => "x".repeat(300),
            _ => (*self.pick(known)).to_owned(),
        }
    }

    fn query(&mut self) -> String {
        let keys = ["limit", "after", "before", "cursor"];
        let values = ["0", "-1", "18446744073709551616", "abc", "%FF", "1", "500", "501", "", "1e3", "a.b"];
        (0..self.below(3)).map(|_| format!("{}={}", self.pick(&keys), self.pick(&values))).collect::<Vec<_>>().join("&")
    }
}

fn seed() -> u64 {
    std::env::var("NATTER_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0 | 1)
}

fn inputs() -> usize {
    std::env::var("NATTER_FUZZ_INPUTS").ok().and_then(|s| s.parse().ok()).unwrap_or(3_000)
}

/// An embedded node with Amy, Bob and a room of Amy's.
async fn setup(tweak: impl FnOnce(&mut natter::config::Config)) -> (Cluster, User, User, String) {
    let c = Cluster::embedded_with(tweak).await;
    let amy = c.register(0, "Amy").await;
    let bob = c.register(0, "Bob").await;
    let room = c.request(0, Method::POST, "/api/rooms", Some(&amy.token), Some(json!({ "name": "Fuzz" }))).await.ok()["room"]["_id"]
        .as_str()
        .unwrap()
        .to_owned();
    (c, amy, bob, room)
}

/// One REST target: how to build a request from the generator.
struct Target {
    name: &'static str,
    make: Box<dyn Fn(&mut Gen) -> (Method, String, Vec<u8>) + Send + Sync>,
}

#[tokio::test]
async fn every_rest_route_survives_generated_input_and_refusals_change_nothing() {
    count_server_panics();
    let seed = seed();
    let n = inputs();
    eprintln!("[fuzz] REST seed {seed} ({n} inputs per target; NATTER_FUZZ_SEED={seed} replays)");
    let (c, amy, bob, room) = setup(|cfg| {
        cfg.limits.login_per_min = 0;
        cfg.limits.login_failures = 0;
    })
    .await;
    let sent = c.send(0, &bob, &amy, "for seen", None).await.ok();
    let message_id = sent["data"]["_id"].as_str().unwrap().to_owned();
    let ids: Vec<String> = vec![bob.id.clone(), room.clone(), message_id.clone(), amy.id.clone(), "nobody".into()];
    let ids: &'static [String] = Box::leak(ids.into_boxed_slice());
    let known: &'static [&'static str] = Box::leak(ids.iter().map(|s| s.as_str()).collect::<Vec<_>>().into_boxed_slice());
    let post = |name: &'static str, path: &'static str| Target {
        name,
        make: Box::new(move |g: &mut Gen| (Method::POST, path.to_owned(), g.body())),
    };
    let targets = vec![
        post("register", "/api/auth/register"),
        post("login", "/api/auth/login"),
        post("attachments", "/api/attachments"),
        post("create room", "/api/rooms"),
        Target { name: "send message", make: Box::new(|g: &mut Gen| (Method::POST, format!("/api/messages/{}", g.segment(known)), g.body())) },
        Target { name: "send room message", make: Box::new(|g: &mut Gen| (Method::POST, format!("/api/rooms/{}/messages", g.segment(known)), g.body())) },
        Target { name: "mark seen", make: Box::new(|g: &mut Gen| (Method::PATCH, format!("/api/messages/{}/seen", g.segment(known)), g.body())) },
        Target {
            name: "join / leave",
            make: Box::new(|g: &mut Gen| {
                let action = if g.below(2) == 0 { "join" } else { "leave" };
                (Method::POST, format!("/api/rooms/{}/{action}", g.segment(known)), g.body())
            }),
        },
        Target {
            name: "reads with queries",
            make: Box::new(|g: &mut Gen| {
                let path = match g.below(6) {
                    0 => "/api/users".to_owned(),
                    1 => format!("/api/messages/{}", g.segment(known)),
                    2 => "/api/rooms".to_owned(),
                    3 => format!("/api/rooms/{}", g.segment(known)),
                    4 => format!("/api/rooms/{}/messages", g.segment(known)),
                    _ => format!("/api/rooms/{}/users", g.segment(known)),
                };
                (Method::GET, format!("{path}?{}", g.query()), Vec::new())
            }),
        },
        Target {
            name: "block / unblock",
            make: Box::new(|g: &mut Gen| {
                let method = if g.below(2) == 0 { Method::PUT } else { Method::DELETE };
                (method, format!("/api/users/{}/block", g.segment(known)), g.body())
            }),
        },
    ];
    let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30)).build().unwrap();
    for (t, target) in targets.iter().enumerate() {
        let mut g = Gen(seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15), 250);
        let requests: Vec<_> = (0..n).map(|_| (target.make)(&mut g)).collect();
        let head = c.log_head().await;
        let answers: Vec<(u16, Value)> = futures::stream::iter(requests.into_iter().enumerate())
            .map(|(i, (method, path, body))| {
                let http = http.clone();
                let url = c.url(0, &path);
                let token = if i % 7 == 0 { "not-a-token".to_owned() } else { amy.token.clone() };
                async move {
                    let r = http
                        .request(method, &url)
                        .bearer_auth(token)
                        .header("content-type", if i % 11 == 0 { "text/plain" } else { "application/json" })
                        .body(body)
                        .send()
                        .await
                        .unwrap_or_else(|e| panic!("{}: the node dropped the request {url}: {e}", target.name));
                    let status = r.status().as_u16();
                    let body = r.json::<Value>().await.unwrap_or(Value::Null);
                    (status, body)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut appended = HashSet::new();
        for (status, body) in &answers {
            assert!(*status < 500 || *status == 503, "{}: {status} {body} (seed {seed})", target.name);
            if *status >= 400 {
                assert_eq!(body["success"], json!(false), "{}: error shape {body} (seed {seed})", target.name);
                assert!(body["code"].is_string(), "{}: error shape {body} (seed {seed})", target.name);
            } else if let Some(id) = body["data"]["_id"].as_str() {
                appended.insert(id.to_owned());
            }
        }
        let accepted = answers.iter().filter(|(s, _)| *s < 300).count();
        // What the log gained is what the 2xx answers say was done: each
        // new message once; registrations, rooms, joins, leaves and seen
        // marks one event each at most.
        let gained = c.log_head().await - head;
        match target.name {
            "send message" | "send room message" | "attachments" => {
                assert_eq!(gained as usize, appended.len(), "{}: the log gained {gained} events for {} messages (seed {seed})", target.name, appended.len())
            }
            "create room" => assert!(gained as usize <= 2 * accepted, "{}: {gained} events for {accepted} (seed {seed})", target.name),
            _ => assert!(gained as usize <= accepted, "{}: the log gained {gained} events for {accepted} accepted inputs (seed {seed})", target.name),
        }
        eprintln!("[fuzz] {}: {n} inputs, {accepted} accepted, {} refused, log +{gained}", target.name, n - accepted);
    }
    // Still serving, as before (once amy no longer blocks bob, whatever the
    // last target left).
    let r = c.request(0, Method::DELETE, &format!("/api/users/{}/block", bob.id), Some(&amy.token), None).await;
    assert!(r.status.is_success() || r.status.as_u16() == 429, "{}", r.body);
    crate::helpers::eventually("amy's block of bob to be lifted", || async {
        c.request(0, Method::DELETE, &format!("/api/users/{}/block", bob.id), Some(&amy.token), None).await.status.is_success()
    })
    .await;
    assert_eq!(c.send(0, &amy, &bob, "still here", None).await.status.as_u16(), 200);
    assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0, "natter panicked (seed {seed})");
    c.stop().await;
}

#[tokio::test]
async fn every_socket_event_survives_generated_payloads() {
    count_server_panics();
    let seed = seed().wrapping_add(1);
    let n = inputs();
    eprintln!("[fuzz] Socket.IO seed {seed} ({n} payloads per event; NATTER_FUZZ_SEED={} replays)", seed.wrapping_sub(1));
    let (c, amy, bob, room) = setup(|cfg| cfg.limits.syncs_per_min = 0).await;
    let mut d = Driver::start().await;
    d.connected("direct", &c.socket_url(0), json!({ "token": amy.token })).await;
    d.connected("chat", &c.chat_url(0), json!({ "token": amy.token })).await;
    // Socket.IO payloads nest at most ~50 deep here: socketioxide cannot
    // decode a packet nested past serde_json's limit (128) and drops it
    // unanswered; that case is checked once, at the end.
    let mut g = Gen(seed, 40);
    let head = c.log_head().await;
    let mut sent = HashSet::new();
    for (socket, event, acked) in [
        ("chat", "send-message", true),
        ("chat", "join-room", true),
        ("chat", "leave-room", true),
        ("direct", "typing", false),
        ("direct", "sync", false),
        ("chat", "no-such-event", false),
    ] {
        // Sixteen at a time, as a client within its in-flight cap: a socket
        // whose answers outrun its send buffer (128 packets) loses them.
        let mut left = n;
        while left > 0 {
            let batch = left.min(16);
            left -= batch;
            let mut tags = Vec::with_capacity(batch);
            for _ in 0..batch {
                let mut payload = g.json(0);
                if g.below(3) == 0 {
                    if let Some(o) = payload.as_object_mut() {
                        o.insert("roomId".into(), json!(if g.below(2) == 0 { room.clone() } else { g.string() }));
                        o.insert("to".into(), json!(bob.id));
                    }
                }
                if acked {
                    tags.push((d.emit_tagged(socket, event, payload.clone()).await, payload));
                } else {
                    d.emit(socket, event, payload).await;
                }
            }
            for (tag, payload) in tags {
                let answer = d.next(socket, |e| e["type"] == "ack" && e["tag"] == tag, "ack").await;
                assert!(answer["error"].is_null(), "{event}: no answer to {} (seed {seed})", &payload.to_string()[..payload.to_string().len().min(300)]);
                let ack = answer["data"].clone();
                assert!(ack["success"].is_boolean(), "{event}: ack {ack} (seed {seed})");
                if ack["success"] == json!(false) {
                    assert!(ack["code"].is_string(), "{event}: {ack} (seed {seed})");
                } else if event == "send-message" {
                    sent.insert(ack["data"]["_id"].as_str().unwrap().to_owned());
                }
            }
            d.all.clear();
            d.quiet("chat", std::time::Duration::ZERO).await;
            d.quiet("direct", std::time::Duration::ZERO).await;
        }
        eprintln!("[fuzz] {event}: {n} payloads");
    }
    // Room joins and leaves (at most one event per acked change) and the
    // messages sent are all the log gained.
    let gained = c.log_head().await - head;
    assert!(gained as usize >= sent.len() && gained as usize <= sent.len() + 2 * n, "log +{gained} for {} messages (seed {seed})", sent.len());
    // A packet nested too deep to decode is dropped, and the socket and
    // the node go on.
    let mut deep = json!("deep");
    for _ in 0..300 {
        deep = json!({ "message": deep });
    }
    d.emit("chat", "send-message", deep).await;
    // Both sockets still work.
    let ack = d.emit_ack("chat", "send-message", json!({ "roomId": room, "message": "still here" })).await;
    assert_eq!(ack["success"], json!(true), "{ack}");
    let got = d.next("chat", |e| e["event"] == "message" && e["data"]["message"] == json!("still here"), "the room message").await;
    assert_eq!(got["data"]["roomId"], json!(room));
    // A packet over 1 MB is not buffered: it closes its connection (as
    // Node's `maxHttpBufferSize` does) and appends nothing; a new
    // connection works.
    let head = c.log_head().await;
    d.emit("chat", "send-message", json!({ "roomId": room, "message": "x".repeat(2_000_000) })).await;
    let closed = d.next("chat", |e| e["type"] == "disconnect", "the oversize packet's connection closing").await;
    assert_eq!(closed["reason"], json!("transport close"), "{closed}");
    d.connected("chat2", &c.chat_url(0), json!({ "token": amy.token })).await;
    let ack = d.emit_ack("chat2", "join-room", json!({ "roomId": room })).await;
    assert_eq!(ack["success"], json!(true), "{ack}");
    let ack = d.emit_ack("chat2", "send-message", json!({ "roomId": room, "message": "after the oversize packet" })).await;
    assert_eq!(ack["success"], json!(true), "{ack}");
    let history = c.request(0, Method::GET, &format!("/api/rooms/{room}/messages"), Some(&amy.token), None).await.ok();
    let texts: Vec<&str> = history.as_array().unwrap().iter().filter_map(|m| m["message"].as_str()).collect();
    assert_eq!(texts.last(), Some(&"after the oversize packet"), "{texts:?}");
    assert!(texts.iter().all(|t| t.len() < 2_000_000), "the oversize message was appended");
    assert!(c.log_head().await <= head + 2, "only the join and the message after it may be appended");
    assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0, "natter panicked (seed {seed})");
    c.stop().await;
}
