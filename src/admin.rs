//! The admin HTTP API (PROTOCOL.md §9): `/health`, `/stats`, `/agents`,
//! `/agents/{id}`, `DELETE /agents/{id}`. When `admin.token` is set every route but
//! `/health` requires `Authorization: Bearer <token>`: the server wraps them (and
//! `/events`) in the [`require_token`] middleware.

use crate::state::AppState;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use tether_actors::bus::{BusStatus, GetBusStatus};
use tether_actors::cluster::GetClusterStatus;
use tether_actors::heartbeat::GetHeartbeatStats;
use tether_actors::registry::{GetAgent, GetStats, ListAgents, RemoveAgent};
use tether_actors::stats::StatsSnapshot;

/// Seed thresholds (OpenAgents connection management).
const MAX_STALE_PER_MINUTE: u64 = 10;
const MIN_SUCCESS_RATE: f64 = 95.0;
const MIN_ATTEMPTS_FOR_RATE: u64 = 20;
const MAX_CLEANUPS_PER_MINUTE_SHARE: f64 = 0.5;

/// Middleware: answers 401 unless the request carries the admin token (if one is set).
pub async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let denial = req
        .app_data::<web::Data<AppState>>()
        .and_then(|state| denied(req.request(), state));
    match denial {
        Some(response) => Ok(req.into_response(response).map_into_right_body()),
        None => next
            .call(req)
            .await
            .map(ServiceResponse::map_into_left_body),
    }
}

/// A 401 response unless the request carries the admin token (if one is set).
pub(crate) fn denied(req: &HttpRequest, state: &AppState) -> Option<HttpResponse> {
    let token = state.settings.admin.token.as_ref()?;
    let given = req
        .headers()
        .get("Authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    (given != Some(token.as_str())).then(|| {
        HttpResponse::Unauthorized()
            .insert_header(("WWW-Authenticate", "Bearer"))
            .json(json!({"error": "this route requires Authorization: Bearer <admin.token>"}))
    })
}

pub(crate) fn unavailable(error: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .json(json!({"error": format!("the server is stopping: {error}")}))
}

/// `GET /stats`
pub async fn stats(state: web::Data<AppState>) -> HttpResponse {
    let (connections, heartbeat, events) = match tokio::try_join!(
        state.registry.send(GetStats),
        state.heartbeat.send(GetHeartbeatStats),
        state.bus.send(GetBusStatus)
    ) {
        Ok(all) => all,
        Err(e) => return unavailable(e),
    };
    HttpResponse::Ok().json(json!({
        "connections": connections,
        "heartbeat": heartbeat,
        "events": events,
        "cluster": crate::cluster_api::totals(&state).await,
    }))
}

/// `GET /agents`
pub async fn list_agents(state: web::Data<AppState>) -> HttpResponse {
    if let Some(cluster) = &state.cluster {
        return crate::cluster_api::list_agents(&state, cluster).await;
    }
    match state.registry.send(ListAgents).await {
        Ok(agents) => HttpResponse::Ok().json(json!({"count": agents.len(), "agents": agents})),
        Err(e) => unavailable(e),
    }
}

/// `GET /agents/{id}`
pub async fn get_agent(state: web::Data<AppState>, id: web::Path<String>) -> HttpResponse {
    if let Some(cluster) = &state.cluster {
        return crate::cluster_api::get_agent(&state, cluster, id.into_inner()).await;
    }
    match state.registry.send(GetAgent(id.into_inner())).await {
        Ok(Some(agent)) => HttpResponse::Ok().json(agent),
        Ok(None) => {
            HttpResponse::NotFound().json(json!({"error": "no agent with this id is registered"}))
        }
        Err(e) => unavailable(e),
    }
}

/// `DELETE /agents/{id}`
pub async fn remove_agent(state: web::Data<AppState>, id: web::Path<String>) -> HttpResponse {
    if let Some(cluster) = &state.cluster {
        return crate::cluster_api::remove_agent(&state, cluster, id.into_inner()).await;
    }
    match state.registry.send(RemoveAgent(id.into_inner())).await {
        Ok(true) => HttpResponse::NoContent().finish(),
        Ok(false) => {
            HttpResponse::NotFound().json(json!({"error": "no agent with this id is registered"}))
        }
        Err(e) => unavailable(e),
    }
}

/// `GET /livez` (never requires the token): the process serves HTTP.
pub async fn livez() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// `GET /readyz` (never requires the token): 200 while the server accepts agents;
/// 503 with the reason while shutting down or at `network.max_connections`.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let not_ready = |reason: String| {
        HttpResponse::ServiceUnavailable().json(json!({"status": "not_ready", "reason": reason}))
    };
    if !state.accepting.load(std::sync::atomic::Ordering::Acquire) {
        return not_ready("the server is shutting down".into());
    }
    let stats = match state.registry.send(GetStats).await {
        Ok(stats) => stats,
        Err(e) => return unavailable(e),
    };
    if stats.shutting_down {
        return not_ready("the server is shutting down".into());
    }
    let max = state.settings.network.max_connections;
    if stats.registered_agents >= max {
        return not_ready(format!(
            "{max} agents registered: network.max_connections reached"
        ));
    }
    let limit = state.socket_limit();
    if state.open_sockets() >= limit {
        return not_ready(format!("{limit} sockets open: the socket limit is reached"));
    }
    if let Some(cluster) = &state.cluster {
        match cluster.send(GetClusterStatus).await {
            Ok(status) if status.ready() => {}
            Ok(status) => {
                return not_ready(format!(
                    "not a live member of its cluster yet (member {}, lease confirmed: {}, \
                     subscribed: {}): Redis unreachable, or the node is joining",
                    status.member, status.joined, status.subscribed
                ))
            }
            Err(e) => return unavailable(e),
        }
    }
    HttpResponse::Ok().json(json!({
        "status": "ready",
        "registered_agents": stats.registered_agents,
        "max_connections": max,
    }))
}

/// `GET /health` (never requires the token).
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let (stats, events) =
        match tokio::try_join!(state.registry.send(GetStats), state.bus.send(GetBusStatus)) {
            Ok(both) => both,
            Err(e) => return unavailable(e),
        };
    let report = health_report(&stats, &events);
    if report["status"] == "critical" {
        HttpResponse::ServiceUnavailable().json(report)
    } else {
        HttpResponse::Ok().json(report)
    }
}

/// Builds the health report: the connection-management checks of the OpenAgents seed
/// (stale connections, success rate, cleanup rate) plus one check per publisher.
pub fn health_report(stats: &StatsSnapshot, events: &BusStatus) -> Value {
    let mut checks = serde_json::Map::new();
    let mut recommendations = Vec::new();

    let stale_status = if stats.stale_per_minute > MAX_STALE_PER_MINUTE {
        recommendations.push("Many agents went stale in the last minute: check the network path to the agents, and that they answer ping_agent".to_owned());
        "warning"
    } else {
        "healthy"
    };
    checks.insert("stale_connections".into(), json!({
        "status": stale_status, "value": stats.stale_per_minute, "threshold": MAX_STALE_PER_MINUTE,
        "total": stats.stale_declared,
    }));

    let rate_status = if stats.registrations_attempted >= MIN_ATTEMPTS_FOR_RATE
        && stats.success_rate < MIN_SUCCESS_RATE
    {
        recommendations.push("Many registrations are refused: look at agent.registration_failed events (or tether_registrations_refused_total) for their error codes; clients cause this, so it is never critical".to_owned());
        "warning"
    } else {
        "healthy"
    };
    checks.insert(
        "success_rate".into(),
        json!({
            "status": rate_status, "value": stats.success_rate, "threshold": MIN_SUCCESS_RATE,
            "attempts": stats.registrations_attempted,
        }),
    );

    let cleanup_threshold =
        ((stats.registered_agents as f64) * MAX_CLEANUPS_PER_MINUTE_SHARE).max(60.0);
    let cleanup_status = if stats.cleanups_per_minute as f64 > cleanup_threshold {
        recommendations.push("Agents are churning: many connections end every minute; check agent stability and the heartbeat settings".to_owned());
        "warning"
    } else {
        "healthy"
    };
    checks.insert("cleanup_rate".into(), json!({
        "status": cleanup_status, "value": stats.cleanups_per_minute, "threshold": cleanup_threshold,
    }));

    let shutdown_status = if stats.shutting_down {
        recommendations.push("The server is shutting down: it accepts no agents".to_owned());
        "critical"
    } else {
        "healthy"
    };
    checks.insert(
        "shutdown".into(),
        json!({"status": shutdown_status, "shutting_down": stats.shutting_down}),
    );

    for publisher in &events.publishers {
        let status = if publisher.failed {
            recommendations.push(format!(
                "Publisher {} has failed and stopped restarting: fix the broker ({}) and restart the server",
                publisher.name,
                publisher.last_error.as_deref().unwrap_or("no error recorded")
            ));
            "critical"
        } else if !publisher.connected || publisher.dropped > 0 {
            recommendations.push(format!(
                "Publisher {} is {}: events are buffered ({} waiting, {} dropped)",
                publisher.name,
                if publisher.connected {
                    "dropping events"
                } else {
                    "disconnected"
                },
                publisher.buffered,
                publisher.dropped
            ));
            "warning"
        } else {
            "healthy"
        };
        checks.insert(
            format!("publisher_{}", publisher.name),
            json!({
                "status": status,
                "connected": publisher.connected,
                "failed": publisher.failed,
                "buffered": publisher.buffered,
                "delivered": publisher.delivered,
                "retried": publisher.retried,
                "dropped": publisher.dropped,
                "restarts": publisher.restarts,
                "last_error": publisher.last_error,
            }),
        );
    }

    let statuses: Vec<&str> = checks
        .values()
        .filter_map(|c| c["status"].as_str())
        .collect();
    let status = if statuses.contains(&"critical") {
        "critical"
    } else if statuses.contains(&"warning") {
        "warning"
    } else {
        "healthy"
    };
    json!({
        "status": status,
        "checks": checks,
        "recommendations": recommendations,
        "registered_agents": stats.registered_agents,
        "uptime_secs": stats.uptime_secs,
    })
}
