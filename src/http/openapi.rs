//! The OpenAPI 3.1 description of the REST API, served at
//! `/api/openapi.json`. The paths come from each handler's
//! `#[utoipa::path]` (collected as the routes are registered, with
//! `routes!`); the bodies from the types in `wire.rs` the handlers return.
//! What every route has in common is added here once: the bearer scheme,
//! and the error answers any route can give (bad input, a missing token,
//! rate limits, a dependency down).

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::routing::get;
use utoipa::OpenApi;
use utoipa::openapi::path::OperationBuilder;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HttpMethod, Ref, ResponseBuilder, Tag};

use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "natter",
        description = "An event-sourced, horizontally scaled chat backend: direct messages with seen ticks and \
                       exact unread counts, study rooms with presence. Real-time events travel over Socket.IO \
                       (namespaces `/` and `/chat`), described in docs/socketio.json. Errors are \
                       `{success: false, message, code}`; every 429 and 503 carries `Retry-After`.",
    ),
    components(schemas(crate::wire::ErrorBody))
)]
struct Base;

/// The document the routes are added to.
pub(super) fn base() -> utoipa::openapi::OpenApi {
    Base::openapi()
}

fn error(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
        .build()
}

/// Adds what every operation has in common: the errors any route may
/// answer, 401 where a token is needed, and the bearer scheme.
fn conventions(doc: &mut utoipa::openapi::OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme("bearer", SecurityScheme::Http(Http::builder().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()));
    for (path, item) in doc.paths.paths.iter_mut() {
        // Health and metrics answer whatever the node's state.
        let always_answers = matches!(path.as_str(), "/healthz" | "/metrics");
        let operations = [&mut item.get, &mut item.post, &mut item.put, &mut item.patch, &mut item.delete];
        for op in operations.into_iter().flatten() {
            let mut add = |status: &str, description: &str| {
                op.responses.responses.entry(status.to_owned()).or_insert_with(|| error(description).into());
            };
            if op.security.is_some() {
                add("401", "no token, or an expired or invalid one");
            }
            if op.request_body.is_some() {
                add("400", "bad input (the message says what)");
                add("413", "the body is larger than NATTER_MAX_BODY_BYTES");
                add("415", "the body is not JSON");
                add("422", "JSON of the wrong shape");
            } else if op.parameters.is_some() {
                add("400", "a bad parameter (the message says what)");
            }
            if op.security.is_some() || op.request_body.is_some() {
                add("429", "over a rate limit: retry after Retry-After seconds");
            }
            if !always_answers {
                add("503", "starting, overloaded, too slow, or a dependency is down: retry after Retry-After seconds (sends: with the same clientMsgId)");
                add("500", "a defect in natter (details in the node's log, not in the answer)");
            }
            // A response object needs a description; successes say their status.
            for (status, response) in op.responses.responses.iter_mut() {
                if let utoipa::openapi::RefOr::T(response) = response
                    && response.description.is_empty()
                {
                    response.description = match status.as_str() {
                        "201" => "created",
                        "202" => "accepted",
                        _ => "success",
                    }
                    .into();
                }
            }
        }
    }
    let this = OperationBuilder::new()
        .summary(Some("This document"))
        .tag("operations")
        .response("200", ResponseBuilder::new().description("the OpenAPI 3.1 description of the REST API").content("application/json", ContentBuilder::new().build()).build())
        .build();
    doc.paths.add_path_operation("/api/openapi.json", vec![HttpMethod::Get], this);
    let tags = [
        ("accounts", "register and log in"),
        ("direct messages", "one-to-one messages, seen marks and unread counts"),
        ("study rooms", "group chat with membership and presence"),
        ("operations", "health, readiness, metrics"),
    ];
    doc.tags = Some(tags.iter().map(|(name, description)| { let mut t = Tag::new(*name); t.description = Some((*description).into()); t }).collect());
}

/// Serves the finished description.
pub(super) fn router(mut doc: utoipa::openapi::OpenApi) -> Router<Arc<AppState>> {
    conventions(&mut doc);
    let json = axum::body::Bytes::from(doc.to_json().expect("the OpenAPI document serializes"));
    Router::new().route("/api/openapi.json", get(move || async move { ([(header::CONTENT_TYPE, "application/json")], json) }))
}

#[cfg(test)]
mod tests {
    /// Every route is registered with `routes!` (and so described), but
    /// for the web client's files and this document itself: no other file
    /// of `src/http/` adds routes any other way.
    #[test]
    fn no_route_is_registered_without_its_description() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http");
        let mut read = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            if matches!(file.as_str(), "web.rs" | "openapi.rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            read += 1;
            for plain in [".route(", ".route_service(", ".nest(", ".nest_service(", ".fallback_service("] {
                assert!(!source.contains(plain), "src/http/{file} adds routes with {plain}: use routes!(handler) with #[utoipa::path]");
            }
        }
        assert!(read >= 6, "read only {read} files of {dir}");
    }

    #[test]
    fn every_operation_says_its_errors() {
        let mut doc = super::base();
        doc.paths.add_path_operation("/x", vec![utoipa::openapi::HttpMethod::Post], utoipa::openapi::path::Operation::new());
        super::conventions(&mut doc);
        let op = doc.paths.paths["/x"].post.as_ref().unwrap();
        assert!(op.responses.responses.contains_key("503"));
        assert!(doc.paths.paths.contains_key("/api/openapi.json"));
    }
}
