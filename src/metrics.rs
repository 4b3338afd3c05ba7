//! Prometheus metrics, kept in-process and rendered as text at `/metrics`.
//!
//! Series (all prefixed `natter_`):
//! - `http_requests_total{route,status}`, `http_request_duration_seconds_{sum,count}{route}`
//! - `events_appended_total{type}`, `append_conflicts_total`
//! - `projection_applied_total{projection}`, `projection_parked_total{projection}`,
//!   `projection_lag_events{projection}` (events in the log not yet applied)
//! - `http_shed_total`, `http_timeouts_total` (overload: answered 503 at once, or after the timeout)

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<String, f64>>,
}

const HELP: &[(&str, &str, &str)] = &[
    ("natter_http_requests_total", "counter", "HTTP requests by route and status"),
    ("natter_http_request_duration_seconds_sum", "counter", "Total time spent answering HTTP requests"),
    ("natter_http_request_duration_seconds_count", "counter", "HTTP requests timed"),
    ("natter_events_appended_total", "counter", "Events appended to the log by this node"),
    ("natter_append_conflicts_total", "counter", "Appends retried because another writer moved the conversation on"),
    ("natter_projection_applied_total", "counter", "Events applied by this node's projectors"),
    ("natter_projection_parked_total", "counter", "Poison events parked on the dead-letter stream"),
    ("natter_projection_lag_events", "gauge", "Events in the log that a projection has not applied yet"),
    ("natter_sockets", "gauge", "Socket.IO connections open on this node"),
    ("natter_pushes_total", "counter", "Deliveries emitted to sockets by this node"),
    ("natter_replayed_total", "counter", "Deliveries emitted from the inbox stream on resume or gap"),
    ("natter_slow_consumer_disconnects_total", "counter", "Sockets disconnected because they could not keep up"),
    ("natter_http_shed_total", "counter", "REST requests answered 503 at once because the node had NATTER_MAX_IN_FLIGHT in progress"),
    ("natter_http_timeouts_total", "counter", "REST requests answered 503 after NATTER_REQUEST_TIMEOUT_MS"),
];

impl Metrics {
    fn add(&self, key: String, v: f64) {
        *self.series.lock().expect("metrics lock").entry(key).or_insert(0.0) += v;
    }

    fn set(&self, key: String, v: f64) {
        self.series.lock().expect("metrics lock").insert(key, v);
    }

    pub fn http_request(&self, route: &str, status: u16, seconds: f64) {
        self.add(format!("natter_http_requests_total{{route=\"{route}\",status=\"{status}\"}}"), 1.0);
        self.add(format!("natter_http_request_duration_seconds_sum{{route=\"{route}\"}}"), seconds);
        self.add(format!("natter_http_request_duration_seconds_count{{route=\"{route}\"}}"), 1.0);
    }

    pub fn event_appended(&self, kind: &str) {
        self.add(format!("natter_events_appended_total{{type=\"{kind}\"}}"), 1.0);
    }

    pub fn append_conflict(&self) {
        self.add("natter_append_conflicts_total".into(), 1.0);
    }

    pub fn projection_applied(&self, projection: &str) {
        self.projection_applied_n(projection, 1);
    }

    pub fn projection_applied_n(&self, projection: &str, n: usize) {
        self.add(format!("natter_projection_applied_total{{projection=\"{projection}\"}}"), n as f64);
    }

    pub fn projection_parked(&self, projection: &str) {
        self.add(format!("natter_projection_parked_total{{projection=\"{projection}\"}}"), 1.0);
    }

    pub fn projection_lag(&self, projection: &str, lag: u64) {
        self.set(format!("natter_projection_lag_events{{projection=\"{projection}\"}}"), lag as f64);
    }

    pub fn socket_opened(&self) {
        self.add("natter_sockets".into(), 1.0);
    }

    pub fn socket_closed(&self) {
        self.add("natter_sockets".into(), -1.0);
    }

    pub fn pushed(&self) {
        self.add("natter_pushes_total".into(), 1.0);
    }

    pub fn replayed(&self) {
        self.add("natter_replayed_total".into(), 1.0);
    }

    pub fn http_shed(&self) {
        self.add("natter_http_shed_total".into(), 1.0);
    }

    pub fn http_timeout(&self) {
        self.add("natter_http_timeouts_total".into(), 1.0);
    }

    pub fn slow_consumer(&self) {
        self.add("natter_slow_consumer_disconnects_total".into(), 1.0);
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let series = self.series.lock().expect("metrics lock");
        let mut out = String::new();
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (key, v) in series.range(name.to_string()..) {
                let base = key.split('{').next().unwrap_or(key);
                if base != *name {
                    if !key.starts_with(name) {
                        break;
                    }
                    continue;
                }
                let _ = writeln!(out, "{key} {v}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_series_under_their_help() {
        let m = Metrics::default();
        m.event_appended("MessageSent");
        m.event_appended("MessageSent");
        m.projection_lag("mongo-views", 7);
        m.http_request("/api/users", 200, 0.5);
        let text = m.render();
        assert!(text.contains("natter_events_appended_total{type=\"MessageSent\"} 2\n"), "{text}");
        assert!(text.contains("natter_projection_lag_events{projection=\"mongo-views\"} 7\n"));
        assert!(text.contains("natter_http_request_duration_seconds_count{route=\"/api/users\"} 1\n"));
        assert!(text.contains("# TYPE natter_projection_lag_events gauge"));
    }
}
