//! Socket.IO (socketioxide) on the same port as REST.
//!
//! - [`authenticate`]: the handshake middleware of every namespace: the JWT
//!   in `auth.token` (validated like REST's bearer token); a refusal reaches
//!   the client as `connect_error` with the reason as `err.message`.
//! - [`dm`]: namespace `/`: `newMessage`, `messagesSeen`, `typing`, resume.
//! - [`chat`]: namespace `/chat`: study rooms and presence.
//! - [`session`]: the per-socket delivery loop both namespaces run.
//!
//! Sockets are closed with the node: [`SocketIo::close`] runs on shutdown
//! so the HTTP server can drain.

pub mod chat;
pub mod dm;
pub mod session;

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use socketioxide::extract::{SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::{SendError, SocketError, SocketIo};

use crate::node::Node;

/// The authenticated user of a socket (its extensions).
#[derive(Clone, Debug)]
pub struct SocketUser(pub String);

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
pub async fn authenticate(s: SocketRef, State(node): State<Arc<Node>>, TryData(auth): TryData<HandshakeAuth>) -> Result<(), String> {
    let auth = auth.map_err(|_| "authentication required: connect with auth: { token: \"<jwt>\" }".to_owned())?;
    let token = auth
        .token
        .filter(|t| !t.is_empty())
        .ok_or("authentication required: connect with auth: { token: \"<jwt>\" }")?;
    let user = node.auth.verify(&token).map_err(|e| e.to_string())?;
    let cursor = match &auth.cursor {
        None | Some(Value::Null) => query_cursor(&s),
        Some(v) => Some(parse_cursor(v).ok_or("cursor must be a non-negative integer")?),
    };
    s.extensions.insert(SocketUser(user));
    s.extensions.insert(StartCursor(cursor));
    Ok(())
}

/// Why an emit did not go out.
#[derive(Debug, PartialEq, Eq)]
pub enum EmitError {
    /// The client did not drain its buffer in time.
    TooSlow,
    /// The socket is gone.
    Closed,
}

/// Emits, waiting (briefly) for room in the socket's buffer when a burst
/// filled it; a client that stays full for `patience` is too slow.
pub async fn emit_patiently(s: &SocketRef, event: &str, data: &Value, patience: std::time::Duration) -> Result<(), EmitError> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match s.emit(event, data) {
            Ok(()) => return Ok(()),
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(EmitError::TooSlow);
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            Err(SendError::Socket(SocketError::Closed)) => return Err(EmitError::Closed),
            Err(SendError::Serialize(e)) => {
                tracing::error!(event, error = %e, "cannot serialize a socket event; skipped");
                return Ok(());
            }
        }
    }
}

/// At shutdown: ends every socket's session and presence (announcing the
/// users who leave rooms), then closes the connections. Clients see a
/// transport close and reconnect by themselves (to another node, behind a
/// load balancer), resuming with their cursor.
pub async fn close_all(io: &SocketIo, node: &Node) {
    for s in io.of("/").map(|ns| ns.sockets()).unwrap_or_default() {
        session::release(node, &s, socketioxide::socket::DisconnectReason::ClosingServer);
    }
    for s in io.of("/chat").map(|ns| ns.sockets()).unwrap_or_default() {
        chat::release_chat(node, &s, socketioxide::socket::DisconnectReason::ClosingServer).await;
    }
    io.close().await;
}

/// Builds the Socket.IO layer and registers the namespaces.
pub fn layer(node: Arc<Node>) -> (SocketIoLayer, SocketIo) {
    let (layer, io) = SocketIo::builder().with_state(node).build_layer();
    io.ns("/", dm::on_connect.with(authenticate));
    io.ns("/chat", chat::on_connect.with(authenticate));
    (layer, io)
}
