//! `GET /events`: lifecycle events as server-sent events (`event: <type>`,
//! `id: <id>`, `data: <json>`), with a comment line first so a client knows it is
//! subscribed, and a keep-alive comment every 15 seconds.

use crate::state::AppState;
use actix_web::{web, HttpResponse};
use bytes::Bytes;
use futures_util::stream;
use std::time::Duration;
use tether_actors::bus::Subscribe;
use tether_actors::event::SharedEvent;
use tokio::sync::mpsc;

const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Formats one event as a server-sent event.
pub fn format_event(event: &SharedEvent) -> Bytes {
    Bytes::from(format!(
        "event: {}\nid: {}\ndata: {}\n\n",
        event.kind.as_str(),
        event.id,
        event.json
    ))
}

/// Streams events to the client until it disconnects.
pub async fn events(state: web::Data<AppState>) -> actix_web::Result<HttpResponse> {
    let rx = state
        .bus
        .send(Subscribe)
        .await
        .map_err(actix_web::error::ErrorServiceUnavailable)?;
    let first = Bytes::from_static(b": subscribed to tether lifecycle events\n\n");
    let body = stream::unfold(
        (Some(first), rx),
        |(first, mut rx): (Option<Bytes>, mpsc::Receiver<SharedEvent>)| async move {
            if let Some(first) = first {
                return Some((Ok::<_, actix_web::Error>(first), (None, rx)));
            }
            match tokio::time::timeout(KEEP_ALIVE, rx.recv()).await {
                Ok(Some(event)) => Some((Ok(format_event(&event)), (None, rx))),
                Ok(None) => None,
                Err(_) => Some((Ok(Bytes::from_static(b": keep-alive\n\n")), (None, rx))),
            }
        },
    );
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}
