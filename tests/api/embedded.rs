//! The embedded node (no services): durability across stops, `kill -9` and
//! torn writes; one node per data directory; `natter migrate` into
//! JetStream. The behaviour shared with the distributed mode is in the
//! contract scenarios (`contract!`) of the other test files.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natter_projections::history::{Snapshot, snapshot};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::Driver;
use crate::helpers::{Cluster, ProcessNode, SECRET, User, eventually, natter_command};

async fn call(http: &reqwest::Client, method: Method, url: String, token: Option<&str>, body: Option<Value>) -> reqwest::Result<(u16, Value)> {
    let mut req = http.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let text = res.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

async fn register_at(http: &reqwest::Client, url: &str, name: &str) -> User {
    let email = format!("{}-{}@example.com", name.to_lowercase(), uuid::Uuid::new_v4().simple());
    let body = json!({ "name": name, "email": email, "password": "password123" });
    let (status, r) = call(http, Method::POST, format!("{url}/api/auth/register"), None, Some(body)).await.unwrap();
    assert_eq!(status, 202, "{r}");
    let login = json!({ "email": email, "password": "password123" });
    let (status, r) = call(http, Method::POST, format!("{url}/api/auth/login"), None, Some(login)).await.unwrap();
    assert_eq!(status, 200, "{r}");
    User { id: r["user"]["_id"].as_str().unwrap().into(), token: r["token"].as_str().unwrap().into(), email }
}

/// Everything the views hold for these users, conversations and rooms.
async fn views_of(c: &Cluster, node: usize, users: &[&User], rooms: &[String]) -> Snapshot {
    let ids: Vec<String> = users.iter().map(|u| u.id.clone()).collect();
    let mut convs = Vec::new();
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            convs.push(natter_events::subjects::dm_conversation(a, b));
        }
    }
    let n = c.node(node);
    snapshot(n.views(), n.counts(), &ids, &convs, rooms).await.unwrap()
}

/// A little of everything through the API: direct messages, a read mark,
/// an opened conversation, rooms with messages, a join and a leave.
async fn some_history(c: &Cluster, amy: &User, bob: &User, carol: &User) -> Vec<String> {
    for i in 0..5 {
        c.send(0, amy, bob, &format!("a→b {i}"), None).await.ok();
        c.send(0, carol, bob, &format!("c→b {i}"), None).await.ok();
    }
    let third = c.send(0, bob, amy, "b→a", None).await.ok()["data"]["_id"].as_str().unwrap().to_owned();
    c.send(0, bob, amy, "b→a again", None).await.ok();
    c.request(0, Method::PATCH, &format!("/api/messages/{third}/seen"), Some(&amy.token), None).await.ok();
    c.history(0, bob, carol).await;
    let mut rooms = Vec::new();
    for name in ["Algebra", "Biology"] {
        let r = c.request(0, Method::POST, "/api/rooms", Some(&amy.token), Some(json!({ "name": name }))).await.ok();
        rooms.push(r["room"]["_id"].as_str().unwrap().to_owned());
    }
    for u in [bob, carol] {
        c.request(0, Method::POST, &format!("/api/rooms/{}/join", rooms[0]), Some(&u.token), None).await.ok();
    }
    for (i, u) in [amy, bob, carol, amy].into_iter().enumerate() {
        let path = format!("/api/rooms/{}/messages", rooms[0]);
        c.request(0, Method::POST, &path, Some(&u.token), Some(json!({ "message": format!("room {i}") }))).await.ok();
    }
    c.request(0, Method::POST, &format!("/api/rooms/{}/leave", rooms[0]), Some(&carol.token), None).await.ok();
    c.request(0, Method::POST, &format!("/api/rooms/{}/messages", rooms[1]), Some(&amy.token), Some(json!({ "message": "solo" })))
        .await
        .ok();
    rooms
}

#[tokio::test]
async fn a_restart_restores_every_message_watermark_count_room_and_cursor() {
    let mut c = Cluster::embedded().await;
    let (amy, bob, carol) = (c.register(0, "Amy").await, c.register(0, "Bob").await, c.register(0, "Carol").await);
    let mut d = Driver::start().await;
    d.connected("bob", &c.socket_url(0), json!({ "token": bob.token })).await;
    d.next("bob", |e| e["event"] == "synced", "synced").await;
    let rooms = some_history(&c, &amy, &bob, &carol).await;
    let pushed = d.events("bob", "newMessage", 12).await;
    let cursor = pushed.last().unwrap()["cursor"].as_u64().unwrap();
    d.disconnect("bob").await;
    let users = [&amy, &bob, &carol];
    let before = views_of(&c, 0, &users, &rooms).await;
    let unseen_before = c.unseen(0, &bob).await;
    assert_eq!(unseen_before, json!({ amy.id.clone(): 5 }), "carol's were opened");
    let head = c.log_head().await;

    c.restart().await;
    assert_eq!(c.log_head().await, head);
    assert_eq!(views_of(&c, 0, &users, &rooms).await, before, "the views rebuilt from the log equal the ones before");
    assert_eq!(c.unseen(0, &bob).await, unseen_before);
    let listed = c.request(0, Method::GET, "/api/rooms", Some(&bob.token), None).await.ok();
    let algebra = listed["rooms"].as_array().unwrap().iter().find(|r| r["_id"] == json!(rooms[0])).unwrap().clone();
    assert_eq!(algebra["isMember"], json!(true));

    // A cursor from before the restart resumes with exactly what came after.
    let after = c.send(0, &amy, &bob, "after the restart", None).await.ok()["data"]["_id"].clone();
    d.connected("bob2", &c.socket_url(0), json!({ "token": bob.token, "cursor": cursor })).await;
    let got = d.events("bob2", "newMessage", 1).await;
    assert_eq!(got[0]["_id"], after);
    assert!(got[0]["cursor"].as_u64().unwrap() > cursor);
    d.next("bob2", |e| e["event"] == "synced", "synced").await;
    let extra = d.quiet("bob2", Duration::from_millis(300)).await;
    assert!(!extra.iter().any(|e| e["event"] == "newMessage"), "nothing from before the cursor again: {extra:?}");
    c.stop().await;
}

#[tokio::test]
async fn a_torn_last_record_is_cut_off_and_everything_before_it_kept() {
    let mut c = Cluster::embedded().await;
    let (amy, bob) = (c.register(0, "Amy").await, c.register(0, "Bob").await);
    for i in 0..10 {
        c.send(0, &amy, &bob, &format!("kept {i}"), None).await.ok();
    }
    let log_file = c.cfg.embedded.data_dir.join("events.log");
    let whole = std::fs::metadata(&log_file).unwrap().len();
    c.send(0, &amy, &bob, "torn", None).await.ok();
    let head = c.log_head().await;
    c.nodes.pop().unwrap().stop().await;

    // A crash in the middle of writing the last record: its tail is missing.
    let torn = std::fs::metadata(&log_file).unwrap().len() - 7;
    std::fs::OpenOptions::new().write(true).open(&log_file).unwrap().set_len(torn).unwrap();
    assert!(torn > whole);
    c.add_node().await;
    assert_eq!(c.log_head().await, head - 1, "the torn record is cut off");
    assert_eq!(std::fs::metadata(&log_file).unwrap().len(), whole, "the file ends after the last whole record");
    assert_eq!(c.unseen_from(0, &bob, &amy).await, 10);
    let texts: Vec<Value> = c.history(0, &bob, &amy).await.iter().map(|m| m["message"].clone()).collect();
    assert_eq!(texts, (0..10).map(|i| json!(format!("kept {i}"))).collect::<Vec<_>>());

    // The log goes on from there, and reopens cleanly.
    let next = c.send(0, &amy, &bob, "after", None).await.ok();
    assert_eq!(next["data"]["seq"], json!(11));
    c.restart().await;
    assert_eq!(c.history(0, &bob, &amy).await.len(), 11);

    // Garbage after the last record (a header promising more than is there)
    // is a torn write too.
    c.nodes.pop().unwrap().stop().await;
    let mut bytes = std::fs::read(&log_file).unwrap();
    let len = bytes.len();
    bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, b'{']);
    std::fs::write(&log_file, &bytes).unwrap();
    c.add_node().await;
    assert_eq!(std::fs::metadata(&log_file).unwrap().len(), len as u64);
    assert_eq!(c.history(0, &bob, &amy).await.len(), 11);
    c.stop().await;
}

async fn spawn_on(c: &Cluster) -> ProcessNode {
    c.spawn_process().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_a_stream_of_sends_loses_no_acknowledged_send() {
    let mut c = Cluster::embedded().await;
    // A user the store holds from before the crash (stopped cleanly).
    let zed_name = format!("Zedekiah-{}", uuid::Uuid::new_v4().simple());
    c.register(0, &zed_name).await;
    // The node runs as its own process from here, so it can be killed.
    c.nodes.pop().unwrap().stop().await;
    let mut node = spawn_on(&c).await;
    let http = c.http.clone();
    let (amy, bob, carol) =
        (register_at(&http, &node.url, "Amy").await, register_at(&http, &node.url, "Bob").await, register_at(&http, &node.url, "Carol").await);
    let (amy, bob, carol) = (Arc::new(amy), Arc::new(bob), Arc::new(carol));

    // Three senders, each sending one message at a time until the node dies;
    // every acknowledged send and the one in flight are recorded.
    let acked: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
    let in_flight: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
    let mut senders = Vec::new();
    for (label, from, to) in [("amy", amy.clone(), bob.clone()), ("carol", carol.clone(), bob.clone()), ("bob", bob.clone(), amy.clone())] {
        let (http, url, acked, in_flight) = (http.clone(), node.url.clone(), acked.clone(), in_flight.clone());
        senders.push(tokio::spawn(async move {
            for i in 0.. {
                let cmd = format!("{label}-{i}");
                let attempt = (from.id.clone(), to.id.clone(), cmd.clone());
                let body = json!({ "message": format!("message {cmd}"), "clientMsgId": cmd });
                match call(&http, Method::POST, format!("{url}/api/messages/{}", to.id), Some(&from.token), Some(body)).await {
                    Ok((200, _)) => acked.lock().unwrap().push(attempt),
                    Ok((status, body)) => panic!("send refused with {status}: {body}"),
                    Err(_) => {
                        in_flight.lock().unwrap().push(attempt);
                        return;
                    }
                }
            }
        }));
    }
    eventually("60 acknowledged sends", || async { acked.lock().unwrap().len() >= 60 }).await;
    node.kill9().await;
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let in_flight = in_flight.lock().unwrap().clone();
    // The store was not closed: its checksums are verified at the next
    // start, so damage there (a write torn by the crash) is found, the file
    // set aside and rebuilt from the log. The damage here would read as a
    // plausible name if it were served.
    let store = c.cfg.embedded.data_dir.join("projections.redb");
    let mut bytes = std::fs::read(&store).unwrap();
    let found: Vec<usize> = bytes.windows(zed_name.len()).enumerate().filter(|(_, w)| *w == zed_name.as_bytes()).map(|(i, _)| i).collect();
    assert!(!found.is_empty(), "the store holds the name as written");
    for i in found {
        bytes[i] = b'z';
    }
    std::fs::write(&store, &bytes).unwrap();

    let node = spawn_on(&c).await;
    assert!(c.cfg.embedded.data_dir.join("projections.redb.discarded").exists(), "the damaged store was found and set aside");
    let (_, listed) = call(&http, Method::GET, format!("{}/api/users?limit=100", node.url), Some(&amy.token), None).await.unwrap();
    let names: Vec<&str> = listed["users"].as_array().unwrap().iter().filter_map(|u| u["name"].as_str()).collect();
    assert!(names.contains(&zed_name.as_str()), "served as written: {names:?}");
    let users: HashMap<String, Arc<User>> = [&amy, &bob, &carol].into_iter().map(|u| (u.id.clone(), u.clone())).collect();
    // The client retries what it never saw acknowledged, with the same id:
    // stored once, whether or not the dead node had written it.
    for (from, to, cmd) in &in_flight {
        let body = json!({ "message": format!("message {cmd}"), "clientMsgId": cmd });
        let (status, r) = call(&http, Method::POST, format!("{}/api/messages/{to}", node.url), Some(&users[from].token), Some(body)).await.unwrap();
        assert_eq!(status, 200, "{r}");
    }

    // Counts first (reading a conversation marks it seen): exact.
    let (_, r) = call(&http, Method::GET, format!("{}/api/users", node.url), Some(&bob.token), None).await.unwrap();
    let sent_by = |u: &User, to: &User| acked.iter().chain(&in_flight).filter(|(f, t, _)| *f == u.id && *t == to.id).count() as u64;
    assert_eq!(r["unseenMessages"], json!({ amy.id.clone(): sent_by(&amy, &bob), carol.id.clone(): sent_by(&carol, &bob) }));
    let (_, r) = call(&http, Method::GET, format!("{}/api/users", node.url), Some(&amy.token), None).await.unwrap();
    assert_eq!(r["unseenMessages"], json!({ bob.id.clone(): sent_by(&bob, &amy) }));

    for (me, peer) in [(&bob, &amy), (&bob, &carol)] {
        let (status, history) =
            call(&http, Method::GET, format!("{}/api/messages/{}?limit=500", node.url, peer.id), Some(&me.token), None).await.unwrap();
        assert_eq!(status, 200);
        let history = history.as_array().unwrap();
        let seqs: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=history.len() as u64).collect::<Vec<_>>(), "gapless");
        let ids: Vec<&str> = history.iter().map(|m| m["clientMsgId"].as_str().unwrap()).collect();
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len(), "nothing twice");
        let expected: HashSet<&str> = acked
            .iter()
            .chain(&in_flight)
            .filter(|(f, t, _)| (*f == me.id && *t == peer.id) || (*f == peer.id && *t == me.id))
            .map(|(_, _, cmd)| cmd.as_str())
            .collect();
        assert_eq!(ids.into_iter().collect::<HashSet<_>>(), expected, "every acknowledged send, once");
    }

    // A kill -9 that damages nothing: the store is kept and resumes from
    // its last durable commit, the log's tail replayed into it.
    std::fs::remove_file(c.cfg.embedded.data_dir.join("projections.redb.discarded")).unwrap();
    let (_, before) = call(&http, Method::GET, format!("{}/api/users", node.url), Some(&amy.token), None).await.unwrap();
    let mut node = node;
    node.kill9().await;
    let node = spawn_on(&c).await;
    let (_, after) = call(&http, Method::GET, format!("{}/api/users", node.url), Some(&amy.token), None).await.unwrap();
    assert_eq!(after["unseenMessages"], before["unseenMessages"]);
    assert!(!c.cfg.embedded.data_dir.join("projections.redb.discarded").exists(), "the store was kept");
    drop(node);
    c.stop().await;
}

#[tokio::test]
async fn with_nothing_configured_natter_runs_embedded_in_natter_data_and_keeps_its_tokens() {
    let cwd = Cluster::data_dir(&uuid::Uuid::new_v4().simple().to_string());
    std::fs::create_dir_all(&cwd).unwrap();
    let free_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let port = free_port();
    let start = |port: u16| {
        natter_command()
            .current_dir(&cwd)
            .env("NATTER_HOST", "127.0.0.1")
            .env("NATTER_PORT", port.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let ready = || async { call(&http, Method::GET, format!("{url}/readyz"), None, None).await.is_ok_and(|(s, _)| s == 200) };
    let first = start(port);
    eventually("the embedded node to serve", ready).await;
    let (_, r) = call(&http, Method::GET, format!("{url}/readyz"), None, None).await.unwrap();
    assert_eq!(r["mode"], json!("embedded"));
    assert!(cwd.join("natter-data/events.log").exists() && cwd.join("natter-data/jwt-secret").exists());
    let amy = register_at(&http, &url, "Amy").await;
    let bob = register_at(&http, &url, "Bob").await;

    // A second node on the same directory is refused, and says why.
    let out = start(free_port()).wait_with_output().await.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another natter process is using the data directory"), "{stderr}");

    // A clean stop (SIGTERM), then a start: the same data, and the tokens
    // issued before still work (the secret is kept in the data directory).
    let pid = first.id().unwrap();
    std::process::Command::new("kill").arg(pid.to_string()).status().unwrap();
    let out = first.wait_with_output().await.unwrap();
    let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("embedded mode") && log.contains("natter-data"), "start-up says the mode and the data: {log}");
    let _second = start(port);
    eventually("the embedded node to serve again", ready).await;
    let body = json!({ "message": "still here" });
    let (status, r) = call(&http, Method::POST, format!("{url}/api/messages/{}", bob.id), Some(&amy.token), Some(body)).await.unwrap();
    assert_eq!(status, 200, "{r}");
    let (_, r) = call(&http, Method::GET, format!("{url}/api/users"), Some(&bob.token), None).await.unwrap();
    assert_eq!(r["unseenMessages"], json!({ amy.id.clone(): 1 }));
    drop(_second);
    let _ = std::fs::remove_dir_all(&cwd);
}

/// `natter migrate` from a real embedded node's data directory: the
/// distributed views built from the migrated log equal the embedded ones.
#[tokio::test]
async fn an_embedded_node_migrates_into_jetstream_with_equal_views() {
    let prefix = format!("m{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let embedded = Cluster::embedded_with(|cfg| cfg.log.subject_prefix = prefix.clone()).await;
    let (amy, bob, carol) = (embedded.register(0, "Amy").await, embedded.register(0, "Bob").await, embedded.register(0, "Carol").await);
    let mut d = Driver::start().await;
    d.connected("bob-embedded", &embedded.socket_url(0), json!({ "token": bob.token })).await;
    let rooms = some_history(&embedded, &amy, &bob, &carol).await;
    let pushed = d.events("bob-embedded", "newMessage", 12).await;
    let old_cursor = pushed.last().unwrap()["cursor"].as_u64().unwrap();
    d.disconnect("bob-embedded").await;
    let users = [&amy, &bob, &carol];
    let expected = views_of(&embedded, 0, &users, &rooms).await;
    let head = embedded.log_head().await;
    let dir = embedded.cfg.embedded.data_dir.clone();
    let mut embedded = embedded;
    embedded.nodes.pop().unwrap().stop().await;

    let mut c = Cluster::start_with(0, |cfg| cfg.log.subject_prefix = prefix.clone()).await;
    let nats = c.cfg.distributed.nats_url.clone().unwrap();
    let out = c.natter(&["migrate", "--from", dir.to_str().unwrap(), "--to", &nats]).await;
    assert!(out.contains(&format!("migrated {head} events")), "{out}");
    c.add_node().await;
    eventually("the distributed views to equal the embedded ones", || async { views_of(&c, 0, &users, &rooms).await == expected }).await;
    // The users go on where they were. A cursor from the embedded node
    // gets `resync` (deliveries are numbered anew), and history is not
    // pushed again: only what is sent now arrives.
    assert_eq!(c.unseen(0, &bob).await, json!({ amy.id.clone(): 5 }));
    d.connected("bob-cluster", &c.socket_url(0), json!({ "token": bob.token, "cursor": old_cursor })).await;
    d.next("bob-cluster", |e| e["event"] == "resync", "resync for an embedded cursor").await;
    let next = c.send(0, &amy, &bob, "on the cluster", None).await.ok();
    assert_eq!(next["data"]["seq"], json!(8), "amy and bob had 7 messages");
    let live = d.events("bob-cluster", "newMessage", 1).await;
    assert_eq!(live[0]["_id"], next["data"]["_id"], "the first push after the migration is the new message");
    let _ = SECRET;
    c.stop().await;
    embedded.stop().await;
}

/// While an embedded node rebuilds its views at start-up it listens, but
/// only `/healthz`, `/readyz` (503 starting) and `/metrics` answer: the API
/// and Socket.IO get 503 `starting`, never answers from half-built views.
#[tokio::test]
async fn while_the_views_are_rebuilt_only_health_answers() {
    let c = Cluster::embedded().await;
    let amy = c.register(0, "Amy").await;
    let node = c.node(0);
    node.set_serving(false);
    assert_eq!(c.request(0, Method::GET, "/healthz", None, None).await.status.as_u16(), 200);
    let r = c.request(0, Method::GET, "/readyz", None, None).await;
    assert_eq!((r.status.as_u16(), r.body["status"].clone()), (503, json!("starting")));
    let r = c.request(0, Method::GET, "/api/users", Some(&amy.token), None).await;
    assert_eq!((r.status.as_u16(), r.body["code"].clone()), (503, json!("starting")), "{}", r.body);
    let head = c.log_head().await;
    let body = json!({ "name": "Bob", "email": "bob@example.com", "password": "password123" });
    let r = c.request(0, Method::POST, "/api/auth/register", None, Some(body)).await;
    assert_eq!(r.status.as_u16(), 503);
    assert_eq!(c.log_head().await, head, "nothing appended while starting");
    let (status, _) = call(&c.http, Method::GET, c.url(0, "/socket.io/?EIO=4&transport=polling"), None, None).await.unwrap();
    assert_eq!(status, 503, "no Socket.IO handshake while starting");

    node.set_serving(true);
    assert!(c.request(0, Method::GET, "/api/users", Some(&amy.token), None).await.status.is_success());
    assert_eq!(c.request(0, Method::GET, "/readyz", None, None).await.status.as_u16(), 200);
    c.stop().await;
}

/// An event the embedded projector cannot apply (here: a schema version
/// newer than this build knows) is parked in `parked.jsonl`, listed by
/// `natter parked list`, and the node goes on serving and projecting.
#[tokio::test]
async fn a_poison_event_is_parked_and_the_node_goes_on() {
    let mut c = Cluster::embedded().await;
    let (amy, bob) = (c.register(0, "Amy").await, c.register(0, "Bob").await);
    c.send(0, &amy, &bob, "before", None).await.ok();
    let head = c.log_head().await;
    c.nodes.pop().unwrap().stop().await;

    // Append a copy of the last record as a v99 event on a subject of its own.
    let log_file = c.cfg.embedded.data_dir.join("events.log");
    let mut bytes = std::fs::read(&log_file).unwrap();
    let mut at = 0;
    let mut last = 0;
    while at < bytes.len() {
        last = at;
        at += 8 + u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    }
    let mut record: Value = serde_json::from_slice(&bytes[last + 8..]).unwrap();
    record["seq"] = json!(head + 1);
    record["msgId"] = json!("poison-1");
    record["subject"] = json!(format!("{}.ev.dm.poison.x", c.cfg.log.subject_prefix));
    record["event"]["subject"] = record["subject"].clone();
    record["event"]["commandId"] = json!("poison-1");
    record["event"]["v"] = json!(99);
    let body = serde_json::to_vec(&record).unwrap();
    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    std::fs::write(&log_file, &bytes).unwrap();

    c.add_node().await;
    assert_eq!(c.log_head().await, head + 1, "the poison event is kept in the log");
    let parked = std::fs::read_to_string(c.cfg.embedded.data_dir.join("parked.jsonl")).unwrap();
    assert_eq!(parked.lines().count(), 3, "one line per projection: {parked}");
    assert!(parked.lines().all(|l| l.contains(&format!("\"seq\":{}", head + 1))), "{parked}");
    let listed = c.natter(&["parked", "list"]).await;
    assert!(listed.contains("mongo-views") && listed.contains("push-fanout"), "{listed}");
    assert!(listed.contains(&format!("log seq {}", head + 1)), "{listed}");
    // The node goes on: everything before is there, new events project.
    assert_eq!(c.unseen_from(0, &bob, &amy).await, 1);
    c.send(0, &amy, &bob, "after", None).await.ok();
    assert_eq!(c.unseen_from(0, &bob, &amy).await, 2);
    // A restart applies the parked event again (a newer build may read
    // it); still poison, it is recorded once.
    c.restart().await;
    let again = std::fs::read_to_string(c.cfg.embedded.data_dir.join("parked.jsonl")).unwrap();
    assert_eq!(again, parked, "parked once, not at every start");
    assert_eq!(c.metric(0, "natter_projection_parked_total{projection=\"mongo-views\"}").await, 1.0, "tried again at the start");
    assert_eq!(c.unseen_from(0, &bob, &amy).await, 2);
    c.stop().await;
}

/// How many events a projection applied on node 0 since it started.
async fn applied(c: &Cluster, projection: &str) -> f64 {
    c.metric(0, &format!("natter_projection_applied_total{{projection=\"{projection}\"}}")).await
}

#[tokio::test]
async fn a_restart_resumes_the_projections_where_they_were_kept_and_rebuilds_a_damaged_or_foreign_store() {
    let mut c = Cluster::embedded().await;
    let (amy, bob, carol) = (c.register(0, "Amy").await, c.register(0, "Bob").await, c.register(0, "Carol").await);
    let rooms = some_history(&c, &amy, &bob, &carol).await;
    let users = [&amy, &bob, &carol];
    let before = views_of(&c, 0, &users, &rooms).await;
    let head = c.log_head().await;
    let store = c.cfg.embedded.data_dir.join("projections.redb");

    // A clean restart reads the views from disk: nothing is applied again.
    c.restart().await;
    assert_eq!(views_of(&c, 0, &users, &rooms).await, before);
    assert_eq!(applied(&c, "mongo-views").await, 0.0, "the views were kept through the log's head");
    assert_eq!(applied(&c, "redis-unseen").await, 0.0, "the counts were kept through the log's head");
    assert_eq!(applied(&c, "push-fanout").await, 0.0, "the inbox was kept through the log's head");

    // The events appended while the store was set aside (an older copy
    // restored) are replayed into it, and only those.
    c.nodes.pop().unwrap().stop().await;
    let older = std::fs::read(&store).unwrap();
    c.add_node().await;
    c.send(0, &amy, &bob, "after the copy", None).await.ok();
    c.send(0, &carol, &bob, "after the copy too", None).await.ok();
    let later = views_of(&c, 0, &users, &rooms).await;
    c.nodes.pop().unwrap().stop().await;
    std::fs::write(&store, &older).unwrap();
    c.add_node().await;
    assert_eq!(applied(&c, "mongo-views").await, 2.0, "only the two sends after the copy are replayed");
    assert_eq!(applied(&c, "push-fanout").await, 2.0, "only the two sends after the copy are fanned out again");
    assert_eq!(views_of(&c, 0, &users, &rooms).await, later);
    let head = head + 2;
    assert_eq!(c.log_head().await, head);

    // What bob's socket replays from cursor 0 (the inbox).
    let inbox = |events: Vec<Value>| events.iter().map(|e| (e["cursor"].as_u64().unwrap(), e["_id"].clone(), e["message"].clone())).collect::<Vec<_>>();
    let mut d = Driver::start().await;
    d.connected("kept", &c.socket_url(0), json!({ "token": bob.token, "cursor": 0 })).await;
    let kept = inbox(d.events("kept", "newMessage", 14).await);
    d.disconnect("kept").await;

    // A file cut short (a copy interrupted, a full disk) is refused, set
    // aside and rebuilt from the whole log. (Damage after an unclean stop
    // is found by the checksums: see the kill -9 test.)
    c.nodes.pop().unwrap().stop().await;
    let bytes = std::fs::read(&store).unwrap();
    std::fs::write(&store, &bytes[..bytes.len() / 3]).unwrap();
    c.add_node().await;
    assert_eq!(applied(&c, "mongo-views").await, head as f64, "rebuilt from the first event");
    assert_eq!(applied(&c, "push-fanout").await, head as f64, "the inbox too");
    assert!(c.cfg.embedded.data_dir.join("projections.redb.discarded").exists(), "the damaged file is kept aside");
    assert_eq!(views_of(&c, 0, &users, &rooms).await, later);
    assert_eq!(c.unseen_from(0, &bob, &amy).await, 6);
    d.connected("rebuilt", &c.socket_url(0), json!({ "token": bob.token, "cursor": 0 })).await;
    assert_eq!(inbox(d.events("rebuilt", "newMessage", 14).await), kept, "the rebuilt inbox replays the same deliveries with the same cursors");
    d.next("rebuilt", |e| e["event"] == "synced", "synced").await;
    let extra = d.quiet("rebuilt", Duration::from_millis(300)).await;
    assert!(!extra.iter().any(|e| e["event"] == "newMessage"), "nothing more: {extra:?}");
    d.disconnect("rebuilt").await;

    // A store built from another log is not served either.
    let mut other = Cluster::embedded().await;
    let (dan, eve) = (other.register(0, "Dan").await, other.register(0, "Eve").await);
    // A shorter log: the store's position exists in ours, but names
    // another event.
    other.send(0, &dan, &eve, "elsewhere", None).await.ok();
    assert!(other.log_head().await < head);
    other.nodes.pop().unwrap().stop().await;
    c.nodes.pop().unwrap().stop().await;
    std::fs::copy(other.cfg.embedded.data_dir.join("projections.redb"), &store).unwrap();
    other.add_node().await;
    other.stop().await;
    c.add_node().await;
    assert_eq!(applied(&c, "mongo-views").await, head as f64, "rebuilt from the first event");
    assert_eq!(views_of(&c, 0, &users, &rooms).await, later);
    assert_eq!(c.node(0).views().user(&dan.id).await.unwrap(), None, "nothing of the other log is served");
    c.stop().await;
}

/// What user `me`'s `i`-th turn of the 100,000-event history does.
#[derive(Clone, Copy, PartialEq)]
enum Turn {
    /// Opens the conversation with the `n`-th peer in turn (a read mark).
    Open(usize),
    /// Writes in room `n` (of two).
    Room(usize),
    /// Marks room `n` read.
    ReadRoom(usize),
    /// Reacts to, edits or deletes the last direct message it sent.
    React,
    Edit,
    Delete,
    /// Writes to the `n`-th peer in turn.
    Send(usize),
}

fn turn(i: usize) -> Turn {
    match i {
        i if i % 10 == 9 => Turn::Open(i / 10),
        i if i % 25 == 12 => Turn::Room(i / 25 % 2),
        i if i % 50 == 44 => Turn::ReadRoom(i / 50 % 2),
        i if i % 100 == 50 => Turn::React,
        i if i % 200 == 76 => Turn::Edit,
        i if i % 400 == 176 => Turn::Delete,
        i => Turn::Send(i),
    }
}

/// Which sections of two snapshots differ, and the first key that does:
/// a snapshot of 100,000 events is too large to print.
fn differences(a: &Snapshot, b: &Snapshot) -> Vec<String> {
    fn first<K: std::fmt::Debug + Ord, V: PartialEq>(name: &str, a: &std::collections::BTreeMap<K, V>, b: &std::collections::BTreeMap<K, V>) -> Option<String> {
        if a == b {
            return None;
        }
        let key = a.iter().find(|(k, v)| b.get(k) != Some(v)).map(|(k, _)| k).or_else(|| b.keys().find(|k| !a.contains_key(k)));
        Some(format!("{name}: first at {key:?}"))
    }
    let mut out: Vec<String> = [
        (a.users != b.users).then(|| "users".to_owned()),
        first("conversations", &a.conversations, &b.conversations),
        first("unseen", &a.unseen, &b.unseen),
        first("rooms", &a.rooms, &b.rooms),
        first("room_unread", &a.room_unread, &b.room_unread),
        first("blocked", &a.blocked, &b.blocked),
        first("reactions", &a.reactions, &b.reactions),
    ]
    .into_iter()
    .flatten()
    .collect();
    if out.is_empty() && a != b {
        out.push("a section this comparison does not name".into());
    }
    out
}

/// The restart test at its size: after 100,000 events (direct
/// messages, read marks, room messages and reads, reactions, edits and
/// deletions), a clean restart replays nothing and serves exactly what a
/// replay of the whole log into an empty store gives. (The inbox's
/// replay after a rebuild is compared on a small history above.)
#[tokio::test]
async fn after_100000_events_a_restart_replays_nothing_and_serves_the_views_of_a_fresh_replay() {
    use natter::commands::revise::Change;
    use natter::commands::rooms::{CreateRoom, SendRoomMessage};
    use natter::commands::send::SendMessage;
    const USERS: usize = 16;
    // Each user's turns: what always appends comes to just over 100,000
    // events, the read marks on top.
    const TURNS: usize = 7_100;
    // The log's fsync policy does not change what is replayed; `os` keeps
    // a debug build's 100,000 commands within a minute or so.
    let mut c = Cluster::embedded_with(|cfg| cfg.embedded.sync = natter::config::SyncPolicy::Os).await;
    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(c.register(0, &format!("U{i}")).await.id);
    }
    let mut rooms = Vec::new();
    for name in ["algebra", "poetry"] {
        let cmd = CreateRoom { creator: users[0].clone(), name: name.into(), description: None, private: false };
        let room = c.node(0).commands().create_room(cmd).await.unwrap().id;
        for u in &users[1..] {
            c.node(0).commands().join_room(u, &room).await.unwrap();
        }
        rooms.push(room);
    }
    let node = c.node(0);
    let work = users.iter().enumerate().map(|(t, me)| {
        let (users, rooms) = (&users, &rooms);
        let peer = move |n: usize| &users[(t + 1 + n % (USERS - 1)) % USERS];
        async move {
            let commands = node.commands();
            let mut last: Option<String> = None;
            for i in 0..TURNS {
                match turn(i) {
                    Turn::Open(n) => commands.open_conversation(me, peer(n)).await.unwrap(),
                    Turn::Room(n) => {
                        let cmd = SendRoomMessage { sender: me.clone(), room: rooms[n].clone(), message: Some(format!("r{i}")), attachment: None, client_msg_id: None, reply_to: None };
                        commands.send_room(cmd).await.unwrap();
                    }
                    Turn::ReadRoom(n) => commands.read_room(me, &rooms[n]).await.unwrap(),
                    Turn::React => drop(commands.react(me, last.as_deref().unwrap(), "👍", true).await.unwrap()),
                    Turn::Edit => drop(commands.revise(me, last.as_deref().unwrap(), Change::Edit(format!("e{i}"))).await.unwrap()),
                    Turn::Delete => drop(commands.revise(me, last.as_deref().unwrap(), Change::Delete).await.unwrap()),
                    Turn::Send(n) => {
                        let cmd = SendMessage { sender: me.clone(), receiver: peer(n).clone(), message: Some(format!("m{i}")), attachment: None, client_msg_id: None, reply_to: None };
                        last = Some(commands.send(cmd).await.unwrap().message.id);
                    }
                }
            }
        }
    });
    futures::future::join_all(work).await;
    let turns: Vec<Turn> = (0..TURNS).map(turn).collect();
    let count = |f: fn(&Turn) -> bool| (turns.iter().filter(|t| f(t)).count() * USERS) as u64;
    let sends = count(|t| matches!(t, Turn::Send(_)));
    let room_sends = count(|t| matches!(t, Turn::Room(_)));
    // Registrations, two rooms (created, then 16 joins each), and what
    // always appends; opens and room reads append only when there is
    // something new to mark.
    let always = USERS as u64 + 2 * 17 + sends + room_sends + count(|t| matches!(t, Turn::React | Turn::Edit | Turn::Delete));
    let marks = count(|t| matches!(t, Turn::Open(_) | Turn::ReadRoom(_)));
    let head = c.log_head().await;
    assert!(always >= 100_000);
    assert!((always..=always + marks).contains(&head), "{head} events: {always} and up to {marks} read marks");
    // A command that found the tail slow applied its event itself: the
    // tail has the whole log before the stop, so the restart has nothing
    // to replay.
    for projection in ["mongo-views", "redis-unseen", "push-fanout"] {
        eventually(&format!("{projection} has applied the whole log"), || async { applied(&c, projection).await == head as f64 }).await;
    }

    let convs: Vec<String> =
        (0..USERS).flat_map(|a| (a + 1..USERS).map(move |b| (a, b))).map(|(a, b)| natter_events::subjects::dm_conversation(&users[a], &users[b])).collect();
    async fn views(c: &Cluster, users: &[String], convs: &[String], rooms: &[String]) -> Snapshot {
        snapshot(c.node(0).views(), c.node(0).counts(), users, convs, rooms).await.unwrap()
    }
    let live = views(&c, &users, &convs, &rooms).await;
    let messages: usize = live.conversations.values().map(|(m, _)| m.len()).sum();
    assert_eq!(messages as u64, sends, "every direct message is in the snapshot");
    for (room, (_, members, messages)) in &live.rooms {
        assert_eq!((members.len(), messages.len() as u64), (USERS, room_sends / 2), "room {room}");
    }
    let deleted = live.conversations.values().flat_map(|(m, _)| m).filter(|m| m.deleted).count() as u64;
    assert_eq!(deleted, count(|t| matches!(t, Turn::Delete)));
    assert!(!live.reactions.is_empty(), "reactions");
    assert!(live.unseen.values().any(|u| !u.is_empty()), "unread direct messages");
    assert!(live.room_unread.values().any(|r| r.values().any(|&n| n > 0)), "unread room messages");

    // A clean restart reads the views, counts and inbox from
    // projections.redb and applies nothing.
    c.restart().await;
    assert_eq!(c.request(0, Method::GET, "/readyz", None, None).await.status.as_u16(), 200);
    for projection in ["mongo-views", "redis-unseen", "push-fanout"] {
        assert_eq!(applied(&c, projection).await, 0.0, "{projection}: nothing replayed after a clean stop");
    }
    let restarted = views(&c, &users, &convs, &rooms).await;

    // The same log replayed into an empty store.
    c.nodes.pop().unwrap().stop().await;
    std::fs::remove_file(c.cfg.embedded.data_dir.join("projections.redb")).unwrap();
    c.add_node().await;
    for projection in ["mongo-views", "redis-unseen", "push-fanout"] {
        assert_eq!(applied(&c, projection).await, head as f64, "{projection}: the fresh store replayed the whole log");
    }
    let replayed = views(&c, &users, &convs, &rooms).await;
    assert_eq!(differences(&restarted, &replayed), Vec::<String>::new(), "the restarted node serves exactly the views of a fresh replay");
    assert_eq!(differences(&restarted, &live), Vec::<String>::new(), "and the ones it served before the restart");
    c.stop().await;
}
