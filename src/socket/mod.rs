//! Socket.IO (socketioxide) on the same port as REST.
//!
//! - [`handshake`]: the handshake middleware of every namespace: the JWT
//!   in `auth.token` (validated like REST's bearer token); a refusal
//!   reaches the client as `connect_error` with the reason as `err.message`.
//! - [`direct`]: namespace `/`: `newMessage`, `messagesSeen`, `typing`, resume.
//! - [`rooms`]: namespace `/chat`: study rooms.
//! - [`presence`]: who is in a room: announcements, and the node-wide
//!   heartbeat and sweep loop.
//! - [`session`]: the per-socket delivery loop both namespaces run.
//! - [`emit`]: emitting with patience when a burst filled a socket's buffer.
//!
//! Sockets are closed with the node: [`close_all`] runs on shutdown so the
//! HTTP server can drain.

mod direct;
mod emit;
mod handshake;
pub mod presence;
mod rooms;
mod session;

use std::sync::Arc;

use socketioxide::SocketIo;
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;

use crate::state::AppState;

/// At shutdown: ends every socket's session and presence (announcing the
/// users who leave rooms), then closes the connections. Clients see a
/// transport close and reconnect by themselves (to another node, behind a
/// load balancer), resuming with their cursor.
pub async fn close_all(io: &SocketIo, node: &AppState) {
    for s in io.of("/").map(|ns| ns.sockets()).unwrap_or_default() {
        session::release(node, &s, socketioxide::socket::DisconnectReason::ClosingServer);
    }
    for s in io.of("/chat").map(|ns| ns.sockets()).unwrap_or_default() {
        rooms::release_chat(node, &s, socketioxide::socket::DisconnectReason::ClosingServer).await;
    }
    io.close().await;
}

/// Socket.IO keeps every connection's request head for the connection's
/// life. hyper parses the URI and header values as slices of its read
/// buffer (8–16 KiB), so keeping them would pin that whole buffer per
/// socket: this middleware, in front of the Socket.IO layer (and behind
/// axum's routing, which saved the URI as `OriginalUri`), copies them into
/// allocations of their own (about 16 KiB less per idle socket).
pub async fn own_request_head(mut req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::http::{HeaderMap, HeaderValue, Uri};
    if req.uri().path().starts_with("/socket.io") {
        let shared = std::mem::take(req.headers_mut());
        let mut owned = HeaderMap::with_capacity(shared.len());
        // Names are static or copied by hyper already; values are slices.
        for (name, value) in &shared {
            let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            copy.set_sensitive(value.is_sensitive());
            owned.append(name.clone(), copy);
        }
        *req.headers_mut() = owned;
        if let Ok(uri) = Uri::try_from(req.uri().to_string()) {
            // axum's router keeps a copy of the URI as it arrived too.
            if req.extensions().get::<axum::extract::OriginalUri>().is_some() {
                req.extensions_mut().insert(axum::extract::OriginalUri(uri.clone()));
            }
            *req.uri_mut() = uri;
        }
    }
    next.run(req).await
}

/// Builds the Socket.IO layer and registers the namespaces.
pub fn layer(node: Arc<AppState>) -> (SocketIoLayer, SocketIo) {
    // A packet may be as large as Node's default `maxHttpBufferSize` (1 MB,
    // or a REST body if that is allowed to be larger); a larger one closes
    // its connection, as Node does, instead of being buffered. A small read
    // buffer keeps idle sockets cheap (it grows while a large frame is read).
    let max_packet = (node.limits.max_body_bytes + 4096).max(1 << 20);
    let (layer, io) = SocketIo::builder()
        .max_payload(max_packet as u64)
        .ws_max_message_size(max_packet)
        .ws_max_frame_size(max_packet)
        .ws_read_buffer_size(1024)
        .with_state(node)
        .build_layer();
    io.ns("/", direct::on_connect.with(handshake::authenticate));
    io.ns("/chat", rooms::on_connect.with(handshake::authenticate));
    (layer, io)
}
