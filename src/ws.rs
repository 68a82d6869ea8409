//! The WebSocket upgrade on `/` and `/ws`: each accepted socket becomes an
//! [`AgentConnection`] actor on the worker that accepted it.

use crate::state::AppState;
use actix::Actor;
use actix_web::{web, HttpRequest, HttpResponse};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tether_actors::connection::AgentConnection;

/// Upgrades the request and starts its connection actor.
pub async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> actix_web::Result<HttpResponse> {
    if !state.accepting.load(Ordering::Acquire) {
        return Ok(HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"error": "the server is shutting down"})));
    }
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let session_id = state.next_session.fetch_add(1, Ordering::Relaxed);
    let remote_addr: Arc<str> = req
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
        .into();
    AgentConnection::new(
        session_id,
        remote_addr,
        session,
        stream,
        state.registry.clone(),
        state.connection_settings.clone(),
    )
    .start();
    Ok(response)
}
