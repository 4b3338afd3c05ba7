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

/// Builds the Socket.IO layer and registers the namespaces.
pub fn layer(node: Arc<AppState>) -> (SocketIoLayer, SocketIo) {
    let (layer, io) = SocketIo::builder().with_state(node).build_layer();
    io.ns("/", direct::on_connect.with(handshake::authenticate));
    io.ns("/chat", rooms::on_connect.with(handshake::authenticate));
    (layer, io)
}
