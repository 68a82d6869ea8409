//! One connection's start: the WebSocket upgrade, `register_agent`, and keeping a
//! certificate for the id (claimed, or renewed when half its life is gone).

use crate::certificate::CertificateStore;
use crate::config::AgentConfig;
use crate::error::{Error, ErrorCode};
use crate::event::Registration;
use crate::protocol::{self, Incoming};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::collections::VecDeque;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The client WebSocket.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What one read from the server brought.
pub(crate) enum Read {
    /// A text frame.
    Text(Utf8Bytes),
    /// A frame with nothing for the agent (binary, ping, pong).
    Nothing,
    /// The server's close frame: its code (if it gave one) and reason.
    Closed(Option<u16>, String),
    /// The connection failed, or ended without a close frame.
    Lost(String),
}

impl From<Option<Result<WsMessage, WsError>>> for Read {
    fn from(frame: Option<Result<WsMessage, WsError>>) -> Self {
        match frame {
            Some(Ok(WsMessage::Text(text))) => Self::Text(text),
            Some(Ok(WsMessage::Close(close))) => match close {
                Some(close) => Self::Closed(Some(u16::from(close.code)), close.reason.to_string()),
                None => Self::Closed(None, String::new()),
            },
            Some(Ok(_)) => Self::Nothing,
            Some(Err(error)) => Self::Lost(error.to_string()),
            None => Self::Lost("the server ended the connection".into()),
        }
    }
}

/// A registered connection.
pub(crate) struct Connection {
    pub(crate) ws: Ws,
    pub(crate) registration: Registration,
    /// Frames that came while the agent waited for an answer of its own.
    pub(crate) early: VecDeque<Incoming>,
}

/// Connects to `url` and registers, presenting the certificate if there is one; a
/// rejected certificate is forgotten and the registration tried again without it.
pub(crate) async fn establish(
    url: &str,
    config: &AgentConfig,
    certificates: &mut CertificateStore,
) -> Result<Connection, Error> {
    let outcome = tokio::time::timeout(config.connect_timeout, async {
        let with_certificate = certificates.get().is_some();
        match attempt(url, config, certificates.get()).await {
            Err(Error::Refused {
                code: ErrorCode::InvalidCertificate,
                message,
            }) if with_certificate => {
                log::info!("certificate rejected ({message}): registering without it");
                certificates.clear();
                attempt(url, config, None).await
            }
            other => other,
        }
    })
    .await;
    let mut connection = outcome.map_err(|_| {
        Error::Timeout(format!(
            "no registration answer from {url} within {:?}",
            config.connect_timeout
        ))
    })??;
    keep_certificate(&mut connection, config, certificates).await;
    Ok(connection)
}

/// One upgrade and registration.
async fn attempt(
    url: &str,
    config: &AgentConfig,
    certificate: Option<&Value>,
) -> Result<Connection, Error> {
    #[cfg(feature = "tls")]
    if url.starts_with("wss://") {
        // rustls needs a process-wide crypto provider; keep one that is already set.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    // TCP_NODELAY on ws:// and wss:// alike: frames are small and latency matters.
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .map_err(|error| Error::Connect {
            url: url.to_owned(),
            reason: error.to_string(),
        })?;
    let frame = protocol::register(
        &config.agent_id,
        &config.registration_metadata(),
        certificate,
        config.force_reconnect,
        Some("register"),
    );
    let mut early = VecDeque::new();
    let answer = exchange(&mut ws, frame, ("register_agent", "register"), &mut early).await?;
    if answer["success"] != true {
        let _ = ws.close(None).await;
        return Err(Error::Refused {
            code: ErrorCode::parse(answer["error_code"].as_str().unwrap_or_default()),
            message: answer["error"].as_str().unwrap_or_default().to_owned(),
        });
    }
    Ok(Connection {
        ws,
        registration: Registration::from_answer(&answer, certificate.is_some()),
        early,
    })
}

/// Claims a certificate after a registration without one, renews one past half its
/// life; a claim that fails leaves the agent without one (logged, not fatal: the
/// session tries again).
async fn keep_certificate(
    connection: &mut Connection,
    config: &AgentConfig,
    certificates: &mut CertificateStore,
) {
    if connection.registration.with_certificate && certificates.is_fresh() {
        return;
    }
    let result = tokio::time::timeout(config.connect_timeout, claim(connection, &config.agent_id))
        .await
        .unwrap_or_else(|_| {
            Err(Error::Timeout(format!(
                "no claim_agent_id answer within {:?}",
                config.connect_timeout
            )))
        });
    let agent_id = &config.agent_id;
    match result.map(|certificate| certificates.set(certificate)) {
        Ok(Ok(())) => log::debug!("certificate for {agent_id} kept"),
        Ok(Err(error)) => log::warn!("certificate for {agent_id} kept in memory only: {error}"),
        Err(error) => log::warn!(
            "no certificate for {agent_id} yet ({error}): until one is claimed, after a \
             half-open connection it waits for the server to let the id go"
        ),
    }
}

/// Claims the agent's own id on its registered connection (a holder's claim needs
/// no `force`: it renews the holder's certificate).
async fn claim(connection: &mut Connection, agent_id: &str) -> Result<Value, Error> {
    let frame = protocol::claim(agent_id, "claim");
    let answer = exchange(
        &mut connection.ws,
        frame,
        ("claim_agent_id", "claim"),
        &mut connection.early,
    )
    .await?;
    Error::answered("claim_agent_id", answer).map(|answer| answer["certificate"].clone())
}

/// Sends `frame` and reads until its answer (the `command`'s response carrying
/// `request_id`, or none), answering pings and keeping every other frame in `early`.
async fn exchange(
    ws: &mut Ws,
    frame: String,
    (command, request_id): (&str, &str),
    early: &mut VecDeque<Incoming>,
) -> Result<Value, Error> {
    let lost = |why: String| Error::ConnectionLost(why);
    ws.send(WsMessage::text(frame))
        .await
        .map_err(|e| lost(e.to_string()))?;
    loop {
        let text = match Read::from(ws.next().await) {
            Read::Text(text) => text,
            Read::Nothing => continue,
            Read::Closed(code, reason) => {
                return Err(lost(format!(
                    "closed by the server ({}: {reason})",
                    code.map_or("no code".into(), |code| code.to_string())
                )))
            }
            Read::Lost(why) => return Err(lost(why)),
        };
        match protocol::parse(text.as_str()) {
            Ok(Incoming::Response {
                command: answered,
                request_id: id,
                frame,
            }) if answered == command && id.as_deref().is_none_or(|id| id == request_id) => {
                return Ok(frame)
            }
            Ok(Incoming::Ping { timestamp }) => ws
                .send(WsMessage::text(protocol::pong(timestamp)))
                .await
                .map_err(|e| lost(e.to_string()))?,
            Ok(incoming) => early.push_back(incoming),
            Err(error) => log::warn!("unreadable frame from the server ({error}): {text}"),
        }
    }
}
