//! The handshake middleware of every namespace: the JWT in `auth.token`
//! (validated like REST's bearer token) and the resume cursor. A refusal
//! reaches the client as `connect_error` with the reason as `err.message`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use socketioxide::extract::{SocketRef, State, TryData};

use crate::state::AppState;

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
    let cursor = match &auth.cursor {
        None | Some(Value::Null) => query_cursor(&s),
        Some(v) => Some(parse_cursor(v).ok_or("cursor must be a non-negative integer")?),
    };
    s.extensions.insert(SocketUser(identity.user));
    s.extensions.insert(TokenExpiry(identity.expires));
    s.extensions.insert(StartCursor(cursor));
    Ok(())
}
