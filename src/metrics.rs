//! Prometheus metrics, kept with the `prometheus-client` crate and rendered
//! at `/metrics` (OpenMetrics text).
//!
//! Series (all prefixed `natter_`):
//! - `http_requests_total{route,status}`, `http_request_duration_seconds{route}` (histogram)
//! - `events_appended_total{type}`, `append_conflicts_total`, `append_duration_seconds` (histogram:
//!   one command's append, from reading the conversation's head to the log's acknowledgement,
//!   conflict retries included)
//! - `projection_applied_total{projection}`, `projection_parked_total{projection}`,
//!   `projection_lag_events{projection}` (events in the log not yet applied),
//!   `projection_duration_seconds{projection}` (histogram: one event or batch applied)
//! - `sockets`, `pushes_total`, `replayed_total`, `slow_consumer_disconnects_total`,
//!   `delivery_latency_seconds` (histogram: a live message from its creation to its emit)
//! - `http_shed_total`, `http_timeouts_total` (overload: answered 503 at once, or after the timeout),
//!   `http_admission_limit` (requests admitted at once now, see `http::admission`)
//! - whatever the adapters add ([`Metrics::register_collector`]): in the distributed mode
//!   `nats_connects_total` and `nats_connected`

use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventType {
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectionLabel {
    projection: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 1 ms to ~16 s, doubling: requests, appends, deliveries.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

pub struct Metrics {
    registry: Mutex<Registry>,
    http_requests: Family<RouteStatus, Counter>,
    http_duration: Histograms<Route>,
    appended: Family<EventType, Counter>,
    append_conflicts: Counter,
    append_duration: Histogram,
    applied: Family<ProjectionLabel, Counter>,
    parked: Family<ProjectionLabel, Counter>,
    lag: Family<ProjectionLabel, Gauge>,
    projection_duration: Histograms<ProjectionLabel>,
    sockets: Gauge,
    pushes: Counter,
    replayed: Counter,
    slow_consumers: Counter,
    delivery_latency: Histogram,
    shed: Counter,
    timeouts: Counter,
    admission_limit: Gauge,
    fanout_pinned: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(latency),
            appended: Family::default(),
            append_conflicts: Counter::default(),
            append_duration: latency(),
            applied: Family::default(),
            parked: Family::default(),
            lag: Family::default(),
            projection_duration: Family::new_with_constructor(latency),
            sockets: Gauge::default(),
            pushes: Counter::default(),
            replayed: Counter::default(),
            slow_consumers: Counter::default(),
            delivery_latency: latency(),
            shed: Counter::default(),
            timeouts: Counter::default(),
            admission_limit: Gauge::default(),
            fanout_pinned: Gauge::default(),
        };
        {
            let mut r = m.registry.lock().expect("metrics lock");
            r.register("natter_http_requests", "HTTP requests by route and status", m.http_requests.clone());
            r.register("natter_http_request_duration_seconds", "Time to answer an HTTP request, by route", m.http_duration.clone());
            r.register("natter_events_appended", "Events appended to the log by this node", m.appended.clone());
            r.register("natter_append_conflicts", "Appends retried because another writer moved the conversation on", m.append_conflicts.clone());
            r.register("natter_append_duration_seconds", "Time to append one command's event to the log (read the head, decide, append, acknowledged; conflict retries included)", m.append_duration.clone());
            r.register("natter_projection_applied", "Events applied by this node's projectors", m.applied.clone());
            r.register("natter_projection_parked", "Poison events parked on the dead-letter stream", m.parked.clone());
            r.register("natter_projection_lag_events", "Events in the log that a projection has not applied yet", m.lag.clone());
            r.register("natter_projection_duration_seconds", "Time to apply one event or batch, by projection", m.projection_duration.clone());
            r.register("natter_sockets", "Socket.IO connections open on this node", m.sockets.clone());
            r.register("natter_pushes", "Deliveries emitted to sockets by this node", m.pushes.clone());
            r.register("natter_replayed", "Deliveries emitted from the inbox stream on resume or gap", m.replayed.clone());
            r.register("natter_slow_consumer_disconnects", "Sockets disconnected because they could not keep up", m.slow_consumers.clone());
            r.register("natter_delivery_latency_seconds", "Time from a message's creation to its emit on a socket of this node (live deliveries)", m.delivery_latency.clone());
            r.register("natter_http_shed", "REST requests answered 503 at once because the node was at its admission limit (see natter_http_admission_limit)", m.shed.clone());
            r.register("natter_http_admission_limit", "REST requests this node works on at once now: NATTER_MAX_IN_FLIGHT, lowered while requests queue longer than NATTER_OVERLOAD_LATENCY_MS (0: no bound)", m.admission_limit.clone());
            r.register("natter_http_timeouts", "REST requests answered 503 after NATTER_REQUEST_TIMEOUT_MS", m.timeouts.clone());
            r.register("natter_fanout_partitions_pinned", "Fan-out partitions this node holds the pin of (it alone fans out their events, in batches)", m.fanout_pinned.clone());
        }
        m
    }
}

impl Metrics {
    /// Adds series an adapter keeps itself (read at every scrape).
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.registry.lock().expect("metrics lock").register_collector(collector);
    }

    pub fn http_request(&self, route: &str, status: u16, seconds: f64) {
        self.http_requests.get_or_create(&RouteStatus { route: route.to_owned(), status }).inc();
        self.http_duration.get_or_create(&Route { route: route.to_owned() }).observe(seconds);
    }

    pub fn event_appended(&self, kind: &str) {
        self.appended.get_or_create(&EventType { r#type: kind.to_owned() }).inc();
    }

    pub fn append_conflict(&self) {
        self.append_conflicts.inc();
    }

    pub fn append_took(&self, seconds: f64) {
        self.append_duration.observe(seconds);
    }

    /// Starts `projection`'s counters at zero, so the first parked event is
    /// an increase Prometheus sees (a series born at 1 shows none).
    pub fn projection_known(&self, projection: &str) {
        let label = ProjectionLabel { projection: projection.to_owned() };
        let _ = self.applied.get_or_create(&label);
        let _ = self.parked.get_or_create(&label);
    }

    pub fn projection_applied(&self, projection: &str) {
        self.projection_applied_n(projection, 1);
    }

    pub fn projection_applied_n(&self, projection: &str, n: usize) {
        self.applied.get_or_create(&ProjectionLabel { projection: projection.to_owned() }).inc_by(n as u64);
    }

    pub fn projection_took(&self, projection: &str, seconds: f64) {
        self.projection_duration.get_or_create(&ProjectionLabel { projection: projection.to_owned() }).observe(seconds);
    }

    pub fn projection_parked(&self, projection: &str) {
        self.parked.get_or_create(&ProjectionLabel { projection: projection.to_owned() }).inc();
    }

    pub fn projection_lag(&self, projection: &str, lag: u64) {
        self.lag.get_or_create(&ProjectionLabel { projection: projection.to_owned() }).set(lag.min(i64::MAX as u64) as i64);
    }

    pub fn socket_opened(&self) {
        self.sockets.inc();
    }

    pub fn socket_closed(&self) {
        self.sockets.dec();
    }

    pub fn pushed(&self) {
        self.pushes.inc();
    }

    pub fn delivered_after(&self, seconds: f64) {
        self.delivery_latency.observe(seconds);
    }

    pub fn replayed(&self) {
        self.replayed.inc();
    }

    /// The gauge of the REST admission bound (kept by `http::admission`).
    pub fn admission_gauge(&self) -> Gauge {
        self.admission_limit.clone()
    }

    /// How many fan-out partitions this node holds the pin of.
    pub fn fanout_pinned(&self, partitions: u32) {
        self.fanout_pinned.set(i64::from(partitions));
    }

    pub fn http_shed(&self) {
        self.shed.inc();
    }

    pub fn http_timeout(&self) {
        self.timeouts.inc();
    }

    pub fn slow_consumer(&self) {
        self.slow_consumers.inc();
    }

    /// OpenMetrics text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("metrics lock");
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String cannot fail");
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
        assert!(text.contains("natter_http_request_duration_seconds_count{route=\"/api/users\"} 1\n"), "{text}");
        assert!(text.contains("natter_http_request_duration_seconds_bucket{le=\"0.512\",route=\"/api/users\"} 1\n") || text.contains("natter_http_request_duration_seconds_bucket{route=\"/api/users\",le=\"0.512\"} 1\n"), "{text}");
        assert!(text.contains("# TYPE natter_projection_lag_events gauge"));
    }
}
