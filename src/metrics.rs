//! `GET /metrics`: Prometheus text exposition (format 0.0.4) rendered by
//! `metrics-exporter-prometheus` from the global `metrics` recorder.
//!
//! Two sources: what the actors record where it happens (`tether_actors::metrics`:
//! ping round trips, messages routed, frames rejected, connections closed, refused
//! registrations, connection durations) plus the upgrades counted here; and, read at
//! each scrape, the snapshots `/stats` shows (agents by state, registrations,
//! disconnections, publishers, SSE), so both always agree. Process metrics (RSS, CPU,
//! open fds) come from `metrics-process`. Labels never carry an agent id.
//!
//! The route follows the admin token rule unless `admin.metrics_public` opens it to
//! scrapers.

use crate::state::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use tether_actors::bus::GetBusStatus;
use tether_actors::heartbeat::GetHeartbeatStats;
use tether_actors::metrics as names;
use tether_actors::registry::GetStats;

/// The installed recorder's handle and the process collector.
struct Exposition {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static EXPOSITION: OnceLock<Exposition> = OnceLock::new();

/// Installs the global recorder (once per process; later calls do nothing). Call it
/// before any actor starts: what is recorded before it is lost.
pub fn install() {
    EXPOSITION.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(names::PING_ROUND_TRIP.into()),
                &names::PING_ROUND_TRIP_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(names::CONNECTION_DURATION.into()),
                    &names::CONNECTION_DURATION_BUCKETS,
                )
            })
            .expect("bucket lists are not empty")
            .install_recorder()
            .expect("the metrics recorder is installed once, at start-up");
        let process = metrics_process::Collector::default();
        process.describe();
        describe();
        gauge!("tether_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        Exposition { handle, process }
    });
}

/// An upgrade request answered with `result` (`accepted` or why it was refused).
pub fn upgrade(result: &'static str) {
    counter!("tether_upgrades_total", "result" => result).increment(1);
}

/// The classic Prometheus text format (what `promtool check metrics` reads).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`
pub async fn metrics(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if !state.settings.admin.metrics_public {
        if let Some(denied) = crate::admin::denied(&req, &state) {
            return denied;
        }
    }
    let Some(exposition) = EXPOSITION.get() else {
        return HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"error": "metrics are not installed"}));
    };
    let (connections, heartbeat, events) = match tokio::try_join!(
        state.registry.send(GetStats),
        state.heartbeat.send(GetHeartbeatStats),
        state.bus.send(GetBusStatus)
    ) {
        Ok(all) => all,
        Err(e) => return crate::admin::unavailable(e),
    };
    let c = &connections;
    gauge!("tether_agents", "state" => "active").set(c.active_agents as f64);
    gauge!("tether_agents", "state" => "inactive").set(c.inactive_agents as f64);
    gauge!("tether_open_sockets").set(state.open_sockets() as f64);
    gauge!("tether_peak_concurrent_agents").set(c.peak_concurrent as f64);
    gauge!("tether_metadata_bytes").set(c.metadata_bytes as f64);
    gauge!("tether_remembered_agent_ids").set(c.remembered_agent_ids as f64);
    gauge!("tether_shutting_down").set(f64::from(u8::from(c.shutting_down)));
    counter!("tether_connections_total").absolute(c.total_connections);
    counter!("tether_registrations_total", "result" => "success")
        .absolute(c.successful_registrations);
    counter!("tether_registrations_total", "result" => "refused").absolute(c.failed_registrations);
    counter!("tether_takeovers_total").absolute(c.takeovers);
    counter!("tether_stale_declared_total").absolute(c.stale_declared);
    counter!("tether_cleanups_total").absolute(c.cleanups);
    for (reason, count) in &c.disconnections_by_reason {
        counter!("tether_disconnections_total", "reason" => *reason).absolute(*count);
    }
    counter!("tether_pings_sent_total").absolute(heartbeat.pings_sent);
    gauge!("tether_heartbeat_tracked_agents").set(heartbeat.tracked as f64);
    counter!("tether_events_published_total").absolute(events.published);
    gauge!("tether_sse_subscribers").set(events.sse_subscribers as f64);
    counter!("tether_sse_subscribers_cut_off_total").absolute(events.sse_subscribers_cut_off);
    for p in &events.publishers {
        let name = p.name.clone();
        counter!("tether_publisher_delivered_total", "publisher" => name.clone())
            .absolute(p.delivered);
        counter!("tether_publisher_retried_total", "publisher" => name.clone()).absolute(p.retried);
        counter!("tether_publisher_dropped_total", "publisher" => name.clone()).absolute(p.dropped);
        counter!("tether_publisher_restarts_total", "publisher" => name.clone())
            .absolute(u64::from(p.restarts));
        gauge!("tether_publisher_buffered_events", "publisher" => name.clone())
            .set(p.buffered as f64);
        gauge!("tether_publisher_up", "publisher" => name.clone())
            .set(f64::from(u8::from(p.connected && !p.failed)));
        gauge!("tether_publisher_failed", "publisher" => name).set(f64::from(u8::from(p.failed)));
    }
    exposition.process.collect();
    exposition.handle.run_upkeep();
    HttpResponse::Ok()
        .content_type(CONTENT_TYPE)
        .body(exposition.handle.render())
}

/// HELP texts and units, shown in the exposition.
fn describe() {
    describe_gauge!(
        "tether_build_info",
        "Always 1; the labels say which build runs"
    );
    describe_gauge!(
        "tether_agents",
        "Registered agents by state (active, inactive)"
    );
    describe_gauge!(
        "tether_open_sockets",
        "WebSocket connections open, registered or not"
    );
    describe_gauge!(
        "tether_peak_concurrent_agents",
        "Most agents registered at once since start"
    );
    describe_gauge!(
        "tether_metadata_bytes",
        Unit::Bytes,
        "Registration metadata held (limits.max_metadata_bytes_total)"
    );
    describe_gauge!(
        "tether_remembered_agent_ids",
        "Ids that left whose last incarnation is remembered (limits.remembered_agent_ids)"
    );
    describe_gauge!("tether_shutting_down", "1 once shutdown began");
    describe_counter!(
        "tether_upgrades_total",
        "WebSocket upgrade requests by result"
    );
    describe_counter!("tether_connections_total", "WebSocket connections accepted");
    describe_counter!(
        "tether_registrations_total",
        "register_agent answers by result"
    );
    describe_counter!(
        names::REGISTRATIONS_REFUSED,
        "Refused registrations by error_code"
    );
    describe_counter!(
        "tether_takeovers_total",
        "Registrations that took over a live agent id"
    );
    describe_counter!(
        "tether_stale_declared_total",
        "Agents declared stale by the heartbeat"
    );
    describe_counter!(
        "tether_cleanups_total",
        "Incarnations cleaned up (agent.cleaned_up)"
    );
    describe_counter!(
        "tether_disconnections_total",
        "Incarnations ended, by reason"
    );
    describe_counter!(
        names::CONNECTIONS_CLOSED,
        "Connections the server closed, by reason and close code"
    );
    describe_counter!(
        names::SLOW_CONSUMER_CUTOFFS,
        "Connections closed 4003 for not reading what they were sent"
    );
    describe_counter!(names::FRAMES_REJECTED, "Frames refused, by reason");
    describe_counter!(
        names::MESSAGES_ROUTED,
        "Message copies routed, by kind and result (delivered, unknown_target, ...)"
    );
    describe_histogram!(
        names::PING_ROUND_TRIP,
        Unit::Seconds,
        "Round trip of answered ping_agent requests"
    );
    describe_histogram!(
        names::CONNECTION_DURATION,
        Unit::Seconds,
        "How long ended incarnations stayed registered"
    );
    describe_counter!(
        "tether_pings_sent_total",
        "ping_agent requests sent by the heartbeat"
    );
    describe_gauge!(
        "tether_heartbeat_tracked_agents",
        "Agents the heartbeat watches"
    );
    describe_counter!(
        "tether_events_published_total",
        "Lifecycle events published to the bus"
    );
    describe_gauge!(
        "tether_sse_subscribers",
        "GET /events subscribers connected"
    );
    describe_counter!(
        "tether_sse_subscribers_cut_off_total",
        "SSE subscribers cut off for falling behind"
    );
    describe_counter!(
        "tether_publisher_delivered_total",
        "Events a broker acknowledged"
    );
    describe_counter!("tether_publisher_retried_total", "Event deliveries retried");
    describe_counter!(
        "tether_publisher_dropped_total",
        "Events dropped (buffer full)"
    );
    describe_counter!(
        "tether_publisher_restarts_total",
        "Publisher actor restarts"
    );
    describe_gauge!(
        "tether_publisher_buffered_events",
        "Events waiting for their broker"
    );
    describe_gauge!(
        "tether_publisher_up",
        "1 while the publisher is connected and not failed"
    );
    describe_gauge!(
        "tether_publisher_failed",
        "1 once the publisher gave up restarting"
    );
}
