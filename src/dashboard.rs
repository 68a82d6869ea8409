//! `GET /dashboard`: a live page for people, embedded in the binary (no build step, no
//! CDN: it works offline). The page itself holds no data, so it is served without the
//! admin token; its script reads the token-protected routes (`/stats`, `/agents`,
//! `/events`, `DELETE /agents/{id}`) with `Authorization: Bearer <token>`, asking for
//! the token in a form when the server answers 401, or taking it from the URL fragment
//! `#token=…` (never from the query string). `/events` is read with `fetch()` and parsed
//! as server-sent events by the script, since `EventSource` cannot send the header.

use actix_web::http::header;
use actix_web::HttpResponse;

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// Only the page's own script and style, requests to this server only, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

fn embedded(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

/// `GET /dashboard`
pub async fn page() -> HttpResponse {
    embedded("text/html; charset=utf-8", PAGE)
}

/// `GET /dashboard/app.js`
pub async fn script() -> HttpResponse {
    embedded("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /dashboard/app.css`
pub async fn style() -> HttpResponse {
    embedded("text/css; charset=utf-8", STYLE)
}
