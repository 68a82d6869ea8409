//! The listener: HTTP/1 for the admin API and `/events`, and WebSocket upgrades on `/`
//! and `/ws` handed straight to a connection actor.
//!
//! It is what `actix_web::HttpServer` builds inside (actix-server running actix-http's
//! `HttpService` around the actix-web `App`), plus actix-http's upgrade hook: a request
//! carrying `Upgrade: websocket` (on any path) or `CONNECT` comes to [`upgrade`] with
//! the connection's framed stream instead of going to the `App`. There the handshake is
//! answered (101), the stream is taken out of the HTTP dispatcher with its read and
//! write buffers dropped, and an [`AgentConnection`] actor owns it from then on. Not
//! serving the WebSocket through actix-web-actors (deprecated by its maintainers) or
//! inside actix-ws's streaming body is what keeps an idle agent at a few hundred bytes
//! (README, "Connection path").

use crate::state::AppState;
use actix::Actor;
use actix_codec::Framed;
use actix_http::body::{BodySize, BoxBody, MessageBody};
use actix_http::h1::{self, Codec};
use actix_http::ws::handshake;
use actix_http::{ConnectionType, HttpService, Request, Response, StatusCode};
use actix_server::Server;
use actix_service::{fn_service, map_config, IntoServiceFactory, ServiceFactoryExt};
use actix_web::dev::AppConfig;
use actix_web::{App, HttpRequest, HttpResponse};
use futures_util::SinkExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tether_actors::connection::AgentConnection;
use tokio::net::TcpStream;

/// Starts serving `listener` with `app` for plain HTTP requests.
pub fn serve<F, A>(
    state: AppState,
    listener: std::net::TcpListener,
    workers: usize,
    app: F,
) -> std::io::Result<Server>
where
    F: Fn() -> App<A> + Send + Clone + 'static,
    A: actix_service::ServiceFactory<
            actix_web::dev::ServiceRequest,
            Config = (),
            Response = actix_web::dev::ServiceResponse<BoxBody>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
{
    let mut builder = Server::build()
        .listen("tether", listener, move || {
            let state = state.clone();
            let app = app().into_factory().map_err(|error| error.error_response());
            HttpService::build()
                .client_request_timeout(Duration::from_secs(5))
                .upgrade(fn_service(move |(req, framed)| {
                    upgrade(state.clone(), req, framed)
                }))
                .h1(map_config(app, |_| AppConfig::default()))
                .tcp()
        })?
        .disable_signals()
        .shutdown_timeout(5)
        .backlog(4096);
    if workers > 0 {
        builder = builder.workers(workers);
    }
    Ok(builder.run())
}

/// Answers an upgrade request: 101 and a connection actor for `/` and `/ws`, an HTTP
/// error (and the end of the connection) for anything else.
async fn upgrade(
    state: AppState,
    req: Request,
    mut framed: Framed<TcpStream, Codec>,
) -> Result<(), actix_web::Error> {
    let path = req.path();
    if path != "/" && path != "/ws" {
        let error = "no WebSocket here: agents connect to / or /ws";
        crate::metrics::upgrade("not_found");
        return refuse(&mut framed, StatusCode::NOT_FOUND, error).await;
    }
    if let Some(origin) = req.head().headers().get(actix_http::header::ORIGIN) {
        let origin = String::from_utf8_lossy(origin.as_bytes());
        if !state.settings.network.origin_allowed(&origin) {
            let error = format!(
                "origin {origin} may not open an agent WebSocket: list it in network.allowed_origins"
            );
            crate::metrics::upgrade("forbidden_origin");
            return refuse(&mut framed, StatusCode::FORBIDDEN, &error).await;
        }
    }
    if !state.accepting.load(Ordering::Acquire) {
        let error = "the server is shutting down";
        crate::metrics::upgrade("shutting_down");
        return refuse(&mut framed, StatusCode::SERVICE_UNAVAILABLE, error).await;
    }
    let limit = state.socket_limit();
    if state.open_sockets() >= limit {
        let error = format!("the server holds its limit of {limit} sockets; try again later");
        crate::metrics::upgrade("too_many_sockets");
        return refuse(&mut framed, StatusCode::SERVICE_UNAVAILABLE, &error).await;
    }
    let response = match handshake(req.head()) {
        Ok(mut response) => response.finish().drop_body(),
        Err(error) => {
            crate::metrics::upgrade("bad_handshake");
            let response = Response::from(&error);
            return respond(&mut framed, response).await;
        }
    };
    framed
        .send(h1::Message::Item((response, BodySize::None)))
        .await?;
    crate::metrics::upgrade("accepted");
    let parts = framed.into_parts();
    // Each frame goes out when it is written. With Nagle's algorithm on, a frame
    // written while the previous one is unacknowledged waits for the agent's delayed
    // ACK (about 40 ms) whenever the agent also sends. A socket that refuses the
    // option still works, only slower, so that is not a reason to refuse the agent.
    if let Err(error) = parts.io.set_nodelay(true) {
        log::debug!("TCP_NODELAY not set on an agent socket: {error}");
    }
    let session_id = state.next_session.fetch_add(1, Ordering::Relaxed);
    let remote_addr: Arc<str> = req
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
        .into();
    AgentConnection::new(
        session_id,
        remote_addr,
        parts.io,
        parts.read_buf,
        &state.connections,
    )
    .start();
    Ok(())
}

/// Answers `status` with a JSON error, and closes the connection.
async fn refuse(
    framed: &mut Framed<TcpStream, Codec>,
    status: StatusCode,
    error: &str,
) -> Result<(), actix_web::Error> {
    let body = serde_json::json!({ "error": error }).to_string();
    let mut response = Response::with_body(status, body).map_into_boxed_body();
    response.headers_mut().insert(
        actix_http::header::CONTENT_TYPE,
        actix_http::header::HeaderValue::from_static("application/json"),
    );
    respond(framed, response).await
}

/// Writes `response` and ends the connection.
async fn respond(
    framed: &mut Framed<TcpStream, Codec>,
    response: Response<BoxBody>,
) -> Result<(), actix_web::Error> {
    let (mut response, body) = response.into_parts();
    response
        .head_mut()
        .set_connection_type(ConnectionType::Close);
    let body = body.try_into_bytes().unwrap_or_default();
    let size = BodySize::Sized(body.len() as u64);
    framed.send(h1::Message::Item((response, size))).await?;
    if !body.is_empty() {
        framed.send(h1::Message::Chunk(Some(body))).await?;
    }
    framed.send(h1::Message::Chunk(None)).await?;
    Ok(())
}

/// `GET /` or `/ws` without `Upgrade: websocket`: the handshake's own error (400).
pub async fn not_an_upgrade(req: HttpRequest) -> HttpResponse {
    match handshake(req.head()) {
        Ok(_) => HttpResponse::BadRequest().finish(),
        Err(error) => Response::from(&error).into(),
    }
}
