//! The web client (`web/` in the repository), served at `/` from files
//! compiled into the binary: no build step, no CDN, nothing fetched at run
//! time. The Socket.IO client is the official one, vendored in
//! `web/vendor/` with its licence.

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::state::AppState;

const INDEX: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const APP_CSS: &str = include_str!("../../web/app.css");
const SOCKET_IO: &str = include_str!("../../web/vendor/socket.io.min.js");

/// Only natter's own scripts and styles, and connections to natter itself
/// (Socket.IO included); attachments are links, never loaded.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Not fingerprinted: check with the server on every load (cheap, and a new binary's client is used at once).
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_SECURITY_POLICY, CSP), (header::REFERRER_POLICY, "no-referrer"), (header::X_FRAME_OPTIONS, "DENY")],
        asset("text/html; charset=utf-8", INDEX),
    )
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/assets/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
        .route("/assets/socket.io.min.js", get(|| async { asset("text/javascript; charset=utf-8", SOCKET_IO) }))
}
