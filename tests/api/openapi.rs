//! The OpenAPI 3.1 description at `/api/openapi.json`: valid (checked by
//! `openapi-spec-validator`, which `scripts/services.sh browser` installs),
//! describing every route the node serves, and only those.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::Cluster;

/// Every REST route clients use (the README's tables).
const ROUTES: &[(&str, &str)] = &[
    ("post", "/api/auth/register"),
    ("post", "/api/auth/login"),
    ("get", "/api/users"),
    ("put", "/api/users/{id}/block"),
    ("delete", "/api/users/{id}/block"),
    ("get", "/api/messages/{id}"),
    ("post", "/api/messages/{id}"),
    ("patch", "/api/messages/{id}"),
    ("delete", "/api/messages/{id}"),
    ("patch", "/api/messages/{id}/seen"),
    ("put", "/api/messages/{id}/reactions/{emoji}"),
    ("delete", "/api/messages/{id}/reactions/{emoji}"),
    ("post", "/api/attachments"),
    ("post", "/api/rooms"),
    ("get", "/api/rooms"),
    ("get", "/api/rooms/{id}"),
    ("post", "/api/rooms/{id}/join"),
    ("post", "/api/rooms/{id}/leave"),
    ("post", "/api/rooms/{id}/invite"),
    ("post", "/api/rooms/{id}/kick"),
    ("post", "/api/rooms/{id}/role"),
    ("get", "/api/rooms/{id}/messages"),
    ("post", "/api/rooms/{id}/messages"),
    ("patch", "/api/rooms/{id}/messages/{messageId}"),
    ("delete", "/api/rooms/{id}/messages/{messageId}"),
    ("put", "/api/rooms/{id}/messages/{messageId}/reactions/{emoji}"),
    ("delete", "/api/rooms/{id}/messages/{messageId}/reactions/{emoji}"),
    ("get", "/api/rooms/{id}/users"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/api/openapi.json"),
];

fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_some() {
                ops.push((method.to_owned(), path.clone()));
            }
        }
    }
    ops.sort();
    ops
}

#[tokio::test]
async fn the_api_description_is_valid_and_describes_every_route_served() {
    let c = Cluster::embedded().await;
    let doc = c.request(0, Method::GET, "/api/openapi.json", None, None).await.ok();
    assert_eq!(doc["openapi"], json!("3.1.0"));

    // Valid OpenAPI 3.1.
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/target/services/venv/bin/python");
    assert!(std::path::Path::new(python).exists(), "no services venv: run the suite with scripts/test.sh");
    let file = std::env::temp_dir().join(format!("natter-openapi-{}.json", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, doc.to_string()).unwrap();
    let check = tokio::process::Command::new(python).args(["-m", "openapi_spec_validator"]).arg(&file).output().await.unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        check.status.success(),
        "openapi-spec-validator refused the document (is it installed? scripts/services.sh browser):\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // Exactly the routes clients use are described...
    let mut expected: Vec<(String, String)> = ROUTES.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
    expected.sort();
    assert_eq!(operations(&doc), expected);
    // ...and each is served: no "no such route" 404, no 405.
    for (method, path) in operations(&doc) {
        let url_path = path.replace("{id}", "01a21c30-0000-7000-8000-000000000000").replace("{messageId}", "01a21c30-0000-7000-8000-000000000001").replace("{emoji}", "%F0%9F%91%8D");
        let r = c.request(0, method.to_uppercase().parse().unwrap(), &url_path, None, None).await;
        assert_ne!(r.status.as_u16(), 405, "{method} {path} is described but not served");
        assert!(!(r.status.as_u16() == 404 && r.body["message"] == json!("no such route")), "{method} {path} is described but not served");
    }

    // Bodies, errors and auth are described from the types the handlers return.
    let schemas = &doc["components"]["schemas"];
    for (schema, field) in [("Message", "seq"), ("Message", "clientMsgId"), ("RoomMessage", "roomId"), ("ErrorBody", "code"), ("UsersPage", "unseenMessages")] {
        assert!(schemas[schema]["properties"].get(field).is_some(), "{schema}.{field} is not described: {}", schemas[schema]);
    }
    assert!(schemas["PublicUser"]["properties"].get("email").is_none(), "another user's email is never served");
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], json!("bearer"));
    let send = &doc["paths"]["/api/messages/{id}"]["post"];
    assert_eq!(send["security"], json!([{ "bearer": [] }]));
    for status in ["200", "400", "401", "404", "409", "413", "422", "429", "503"] {
        assert!(send["responses"].get(status).is_some(), "POST /api/messages/{{id}} does not describe {status}");
    }
    c.stop().await;
}

/// The Socket.IO events are described too (docs/socketio.json): every
/// event a client may send and every event natter emits.
#[test]
fn the_socket_io_description_names_every_event() {
    let doc: Value = serde_json::from_str(include_str!("../../docs/socketio.json")).expect("docs/socketio.json is JSON");
    let described = |ns: &str, dir: &str| -> Vec<String> {
        doc["namespaces"][ns][dir].as_object().unwrap_or_else(|| panic!("namespaces.{ns}.{dir}")).keys().cloned().collect()
    };
    let sources = [include_str!("../../src/socket/direct.rs"), include_str!("../../src/socket/rooms.rs")];
    // Events the handlers listen for: `s.on("<event>"`.
    for (ns, source) in ["/", "/chat"].iter().zip(sources) {
        for event in source.split("s.on(\"").skip(1).map(|rest| rest.split('"').next().unwrap()) {
            assert!(described(ns, "clientToServer").contains(&event.to_owned()), "{ns} handles \"{event}\" but docs/socketio.json does not describe it");
        }
    }
    // Events natter emits, on either namespace.
    let emitted: Vec<String> = ["/", "/chat"].iter().flat_map(|ns| described(ns, "serverToClient")).collect();
    for event in ["newMessage", "messagesSeen", "typing", "synced", "resync", "error", "message", "member-joined", "member-left", "room-users", "user-joined", "user-left"] {
        assert!(emitted.contains(&event.to_owned()), "\"{event}\" is emitted but not described");
    }
}
