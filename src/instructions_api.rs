//! The instructions and sessions routes of the admin API (PROTOCOL.md §11), behind the
//! admin token like the other admin routes. Bodies are read and checked here, field
//! by field, so a bad one gets a 400 that names the field and nothing is stored.

use crate::state::AppState;
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use tether_actors::instructions::model::{SessionState, State, Strategy};
use tether_actors::instructions::{
    CancelInstruction, CloseSession, CreateInstruction, NewInstruction, NewSession, OpenSession,
    Refused,
};
use tether_actors::protocol::command::valid_agent_id;

/// Most entries a listing returns (`limit`).
const MAX_LIST: i64 = 1000;

/// A request refused before it reached the dispatcher: its status and what was wrong.
struct Rejection(StatusCode, String);

impl Rejection {
    fn response(self) -> HttpResponse {
        HttpResponse::build(self.0).json(json!({"error": self.1}))
    }
}

fn bad_request(error: impl Into<String>) -> Rejection {
    Rejection(StatusCode::BAD_REQUEST, error.into())
}

fn refused(refusal: Refused) -> HttpResponse {
    match refusal {
        Refused::NotFound(error) => HttpResponse::NotFound().json(json!({"error": error})),
        Refused::Conflict(error) => HttpResponse::Conflict().json(json!({"error": error})),
        Refused::Unavailable(error) => storage_unavailable(error),
    }
}

fn storage_unavailable(error: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::ServiceUnavailable().json(json!({
        "error": format!("instructions are unavailable: {error}; retry shortly")
    }))
}

/// The body as a JSON object with only `allowed` keys.
fn object(body: &[u8], allowed: &[&str]) -> Result<Map<String, Value>, Rejection> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(bad_request("the body must be a JSON object"));
    };
    if let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad_request(format!(
            "unknown field {unknown:?}; the fields are {allowed:?}"
        )));
    }
    Ok(fields)
}

fn seconds(
    fields: &Map<String, Value>,
    key: &str,
    default: f64,
    max: f64,
) -> Result<f64, Rejection> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => match value.as_f64() {
            Some(secs) if secs > 0.0 && secs <= max => Ok(secs),
            _ => Err(bad_request(format!(
                "`{key}` must be a number of seconds above 0 and at most {max}"
            ))),
        },
    }
}

fn text(
    fields: &Map<String, Value>,
    key: &str,
    max_len: usize,
) -> Result<Option<String>, Rejection> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if !text.is_empty() && text.len() <= max_len => {
            Ok(Some(text.clone()))
        }
        Some(_) => Err(bad_request(format!(
            "`{key}` must be a string of 1 to {max_len} bytes"
        ))),
    }
}

/// Reads a new instruction for `agent_id` (from the path) or from the body's
/// `agent_id` or `capability`.
fn new_instruction(
    state: &AppState,
    body: &[u8],
    agent_id: Option<String>,
) -> Result<NewInstruction, Rejection> {
    let settings = &state.settings.instructions;
    let mut allowed = vec![
        "payload",
        "ttl",
        "max_attempts",
        "ack_timeout",
        "session_id",
    ];
    if agent_id.is_none() {
        allowed.extend(["agent_id", "capability", "strategy"]);
    }
    let fields = object(body, &allowed)?;
    let payload = match fields.get("payload") {
        None => return Err(bad_request("`payload` is required (any JSON value)")),
        Some(payload) => payload.to_string(),
    };
    if payload.len() > settings.max_payload_bytes {
        return Err(Rejection(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "`payload` is {} bytes of JSON; instructions.max_payload_bytes is {}",
                payload.len(),
                settings.max_payload_bytes
            ),
        ));
    }
    let agent_id = match agent_id {
        Some(agent_id) => Some(agent_id),
        None => text(&fields, "agent_id", 128)?,
    };
    if let Some(agent_id) = &agent_id {
        if !valid_agent_id(agent_id) {
            return Err(bad_request(
                "the agent id must be 1-128 characters of A-Z a-z 0-9 . _ : @ -",
            ));
        }
    }
    let capability = text(&fields, "capability", 128)?;
    let strategy = match text(&fields, "strategy", 32)? {
        None => None,
        Some(name) => Some(Strategy::parse(&name).ok_or_else(|| {
            bad_request(format!(
                "`strategy` {name:?} is unknown: least_loaded (the default) or round_robin"
            ))
        })?),
    };
    match (&agent_id, &capability) {
        (Some(_), Some(_)) => return Err(bad_request("give `agent_id` or `capability`, not both")),
        (None, None) => return Err(bad_request("`agent_id` or `capability` is required")),
        (Some(_), None) if strategy.is_some() => {
            return Err(bad_request("`strategy` applies only with `capability`"))
        }
        (None, Some(_)) if fields.get("session_id").is_some_and(|s| !s.is_null()) => {
            return Err(bad_request(
                "`session_id` applies only to an instruction for one agent (a session is with \
                 one agent); give `agent_id`",
            ))
        }
        _ => {}
    }
    let ttl = seconds(&fields, "ttl", settings.default_ttl, settings.max_ttl)?;
    let ack_timeout = seconds(
        &fields,
        "ack_timeout",
        settings.default_ack_timeout,
        settings.max_ttl,
    )?;
    let max_attempts = match fields.get("max_attempts") {
        None | Some(Value::Null) => i64::from(settings.default_max_attempts),
        Some(value) => match value.as_i64() {
            Some(n @ 1..=1000) => n,
            _ => {
                return Err(bad_request(
                    "`max_attempts` must be an integer from 1 to 1000",
                ))
            }
        },
    };
    Ok(NewInstruction {
        agent_id,
        strategy: capability
            .as_ref()
            .map(|_| strategy.unwrap_or(Strategy::LeastLoaded)),
        capability,
        session_id: text(&fields, "session_id", 64)?,
        payload,
        max_attempts,
        ack_timeout_ms: (ack_timeout * 1000.0).ceil() as i64,
        ttl_ms: (ttl * 1000.0).ceil() as i64,
    })
}

async fn create(state: &AppState, new: NewInstruction) -> HttpResponse {
    match state.instructions.send(CreateInstruction(new)).await {
        Ok(Ok(instruction)) => HttpResponse::Created().json(instruction.to_json()),
        Ok(Err(refusal)) => refused(refusal),
        Err(e) => storage_unavailable(e),
    }
}

/// Reads a request body: at most the payload limit and 64 KiB for the other fields,
/// refused `413` (with what to change) past it, before the rest is read.
async fn read_body(state: &AppState, mut payload: web::Payload) -> Result<Vec<u8>, Rejection> {
    let limit = state.settings.instructions.max_payload_bytes + 64 * 1024;
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| bad_request(format!("the body could not be read: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(Rejection(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body is larger than {limit} bytes \
                     (instructions.max_payload_bytes + 64 KiB for the other fields)"
                ),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `POST /agents/{id}/instructions`
pub async fn create_for_agent(
    state: web::Data<AppState>,
    id: web::Path<String>,
    payload: web::Payload,
) -> HttpResponse {
    let new = match read_body(&state, payload).await {
        Ok(body) => new_instruction(&state, &body, Some(id.into_inner())),
        Err(rejection) => Err(rejection),
    };
    match new {
        Ok(new) => create(&state, new).await,
        Err(rejection) => rejection.response(),
    }
}

/// `POST /instructions`
pub async fn create_instruction(state: web::Data<AppState>, payload: web::Payload) -> HttpResponse {
    let new = match read_body(&state, payload).await {
        Ok(body) => new_instruction(&state, &body, None),
        Err(rejection) => Err(rejection),
    };
    match new {
        Ok(new) => create(&state, new).await,
        Err(rejection) => rejection.response(),
    }
}

/// Answers a query string that does not parse with a JSON 400 like the other refusals.
pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|error, _| {
        let response = bad_request(format!("the query string is not valid: {error}")).response();
        actix_web::error::InternalError::from_response(error, response).into()
    })
}

/// `GET /instructions/{id}`
pub async fn get_instruction(state: web::Data<AppState>, id: web::Path<String>) -> HttpResponse {
    match state.store.get(&id).await {
        Ok(Some(instruction)) => HttpResponse::Ok().json(instruction.to_json()),
        Ok(None) => HttpResponse::NotFound().json(json!({"error": "no instruction has this id"})),
        Err(error) => storage_unavailable(error),
    }
}

/// `DELETE /instructions/{id}`
pub async fn cancel_instruction(state: web::Data<AppState>, id: web::Path<String>) -> HttpResponse {
    match state
        .instructions
        .send(CancelInstruction(id.into_inner()))
        .await
    {
        Ok(Ok(instruction)) => HttpResponse::Ok().json(instruction.to_json()),
        Ok(Err(refusal)) => refused(refusal),
        Err(e) => storage_unavailable(e),
    }
}

/// `state` and `limit` of a listing's query string.
#[derive(serde::Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    agent_id: Option<String>,
    limit: Option<i64>,
}

fn limit(query: &ListQuery) -> Result<i64, Rejection> {
    match query.limit {
        None => Ok(100),
        Some(limit @ 1..=MAX_LIST) => Ok(limit),
        Some(_) => Err(bad_request(format!("`limit` must be from 1 to {MAX_LIST}"))),
    }
}

/// `GET /agents/{id}/instructions?state=…&limit=…`
pub async fn agent_instructions(
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: web::Query<ListQuery>,
) -> HttpResponse {
    let wanted = match query.state.as_deref() {
        None => None,
        Some(name) => match State::parse(name) {
            Some(wanted) => Some(wanted),
            None => {
                let names: Vec<_> = State::ALL.iter().map(|s| s.as_str()).collect();
                return bad_request(format!("`state` {name:?} is unknown; states are {names:?}"))
                    .response();
            }
        },
    };
    let limit = match limit(&query) {
        Ok(limit) => limit,
        Err(rejection) => return rejection.response(),
    };
    match state.store.for_agent(&id, wanted, limit).await {
        Ok(found) => {
            let instructions: Vec<Value> = found.iter().map(|i| i.to_json()).collect();
            HttpResponse::Ok()
                .json(json!({"count": instructions.len(), "instructions": instructions}))
        }
        Err(error) => storage_unavailable(error),
    }
}

/// `POST /sessions`
pub async fn open_session(state: web::Data<AppState>, payload: web::Payload) -> HttpResponse {
    let body = match read_body(&state, payload).await {
        Ok(body) => body,
        Err(rejection) => return rejection.response(),
    };
    let read = || -> Result<NewSession, Rejection> {
        let fields = object(&body, &["agent_id", "name", "description", "parameters"])?;
        let agent_id =
            text(&fields, "agent_id", 128)?.ok_or_else(|| bad_request("`agent_id` is required"))?;
        if !valid_agent_id(&agent_id) {
            return Err(bad_request(
                "`agent_id` must be 1-128 characters of A-Z a-z 0-9 . _ : @ -",
            ));
        }
        let parameters = match fields.get("parameters") {
            None | Some(Value::Null) => "{}".to_owned(),
            Some(parameters @ Value::Object(_)) => parameters.to_string(),
            Some(_) => return Err(bad_request("`parameters` must be a JSON object")),
        };
        if parameters.len() > state.settings.instructions.max_payload_bytes {
            return Err(bad_request(
                "`parameters` is larger than instructions.max_payload_bytes",
            ));
        }
        Ok(NewSession {
            agent_id,
            name: text(&fields, "name", 256)?.unwrap_or_default(),
            description: text(&fields, "description", 4096)?.unwrap_or_default(),
            parameters,
        })
    };
    let new = match read() {
        Ok(new) => new,
        Err(rejection) => return rejection.response(),
    };
    match state.instructions.send(OpenSession(new)).await {
        Ok(Ok(session)) => HttpResponse::Created().json(session.to_json()),
        Ok(Err(refusal)) => refused(refusal),
        Err(e) => storage_unavailable(e),
    }
}

/// `GET /sessions?agent_id=…&state=…&limit=…`
pub async fn list_sessions(
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> HttpResponse {
    let wanted = match query.state.as_deref() {
        None => None,
        Some(name) => match SessionState::parse(name) {
            Some(wanted) => Some(wanted),
            None => {
                return bad_request(format!("`state` {name:?} is unknown: open or closed"))
                    .response()
            }
        },
    };
    let limit = match limit(&query) {
        Ok(limit) => limit,
        Err(rejection) => return rejection.response(),
    };
    match state
        .store
        .sessions(query.agent_id.as_deref(), wanted, limit)
        .await
    {
        Ok(found) => {
            let sessions: Vec<Value> = found.iter().map(|s| s.to_json()).collect();
            HttpResponse::Ok().json(json!({"count": sessions.len(), "sessions": sessions}))
        }
        Err(error) => storage_unavailable(error),
    }
}

/// `GET /sessions/{id}`
pub async fn get_session(state: web::Data<AppState>, id: web::Path<String>) -> HttpResponse {
    match state.store.session(&id).await {
        Ok(Some(session)) => HttpResponse::Ok().json(session.to_json()),
        Ok(None) => HttpResponse::NotFound().json(json!({"error": "no session has this id"})),
        Err(error) => storage_unavailable(error),
    }
}

/// `POST /sessions/{id}/close`
pub async fn close_session(state: web::Data<AppState>, id: web::Path<String>) -> HttpResponse {
    match state.instructions.send(CloseSession(id.into_inner())).await {
        Ok(Ok(session)) => HttpResponse::Ok().json(session.to_json()),
        Ok(Err(refusal)) => refused(refusal),
        Err(e) => storage_unavailable(e),
    }
}
