//! The handshake middleware of every namespace: the JWT in `auth.token`
//! (validated like REST's bearer token) and the resume cursor. A refusal
//! reaches the client as `connect_error` with the reason as `err.message`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};
use socketioxide::extract::{SocketRef, State, TryData};
use tokio::sync::OwnedSemaphorePermit;

use crate::ratelimit::connections::{InFlight, Refused, Slot, TooMany};
use crate::state::AppState;

/// The socket's place in the node's socket counts (per user, per IP),
/// given back when the socket is gone.
#[derive(Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] pub Arc<Slot>);

/// The socket's requests in flight.
#[derive(Clone)]
pub struct Requests(pub Arc<InFlight>);

/// What a refused request is told.
pub const TOO_MANY_IN_FLIGHT: &str = "too many requests in flight on this socket; wait for their answers";

/// A place for one of the socket's requests, held until the permit is
/// dropped; `None` when the socket is over its cap (it gets `error
/// {code: rate_limited}`, and is disconnected if it keeps at it).
pub fn admit(s: &SocketRef) -> Option<OwnedSemaphorePermit> {
    let Requests(requests) = s.extensions.get::<Requests>()?;
    match requests.enter() {
        Ok(permit) => Some(permit),
        Err(refused) => {
            let _ = s.emit("error", &json!({ "code": "rate_limited", "message": TOO_MANY_IN_FLIGHT }));
            if refused == Refused::Persisting {
                tracing::warn!(socket = %s.id, "disconnecting a socket that keeps sending past its requests-in-flight cap");
                let _ = s.clone().disconnect();
            }
            None
        }
    }
}

/// The authenticated user of a socket (its extensions).
#[derive(Clone, Debug)]
pub struct SocketUser(pub String);

/// When the socket's token expires (seconds since the Unix epoch): the
/// socket ends then, with `error {code: "token_expired"}`.
#[derive(Clone, Copy, Debug)]
pub struct TokenExpiry(pub u64);

/// The cursor a client resumes from, from `auth.cursor` or `?cursor=`.
#[derive(Clone, Debug)]
pub struct StartCursor(pub Option<u64>);

#[derive(Deserialize)]
pub struct HandshakeAuth {
    pub token: Option<String>,
    pub cursor: Option<Value>,
}

/// A cursor as a client may send it: a number or a numeric string.
pub fn parse_cursor(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn query_cursor(s: &SocketRef) -> Option<u64> {
    s.req_parts()
        .uri
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("cursor="))
        .and_then(|v| v.parse().ok())
}

/// The handshake middleware: refuses sockets without a valid token.
pub async fn authenticate(s: SocketRef, State(node): State<Arc<AppState>>, TryData(auth): TryData<HandshakeAuth>) -> Result<(), String> {
    let auth = auth.map_err(|_| "authentication required: connect with auth: { token: \"<jwt>\" }".to_owned())?;
    let token = auth
        .token
        .filter(|t| !t.is_empty())
        .ok_or("authentication required: connect with auth: { token: \"<jwt>\" }")?;
    let identity = node.auth.verify(&token).map_err(|e| e.to_string())?;
    let ip = crate::ratelimit::client_ip(s.req_parts(), &node.limits.client_ip_header);
    let slot = node.rate.connections.open(&identity.user, &ip).map_err(|TooMany(why)| why)?;
    s.extensions.insert(ConnectionSlot(Arc::new(slot)));
    s.extensions.insert(Requests(Arc::new(InFlight::new(node.limits.socket_events_in_flight))));
    let cursor = match &auth.cursor {
        None | Some(Value::Null) => query_cursor(&s),
        Some(v) => Some(parse_cursor(v).ok_or("cursor must be a non-negative integer")?),
    };
    s.extensions.insert(SocketUser(identity.user));
    s.extensions.insert(TokenExpiry(identity.expires));
    s.extensions.insert(StartCursor(cursor));
    Ok(())
}
