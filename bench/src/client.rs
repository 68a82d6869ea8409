//! WebSocket client primitives of the load generators: dialing from a chosen loopback
//! source address, registering, and reading the few fields of a frame the workloads
//! care about (ping requests, register answers, benchmark message timestamps).

use crate::stats::now_us;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The client library builds the frames the agents send (one implementation of the
/// protocol on the client side); the load generators keep their own sockets.
pub use tether_client::protocol;

/// A client WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// Small buffers: the load generator holds tens of thousands of sockets.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
}

/// Where a server listens.
#[derive(Debug, Clone)]
pub struct Target {
    /// TCP address.
    pub addr: SocketAddr,
    /// WebSocket URL (path `/`).
    pub url: String,
}

impl Target {
    /// Parses `ws://host:port/...`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("not a ws:// URL: {url}"))?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let addr: SocketAddr = hostport
            .parse()
            .map_err(|e| format!("bad address in {url}: {e}"))?;
        Ok(Self {
            addr,
            url: url.to_owned(),
        })
    }
}

/// Opens a TCP connection from `source` (port chosen by the kernel) and upgrades it.
pub async fn dial(target: &Target, source: IpAddr) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket
        .set_reuseaddr(true)
        .map_err(|e| format!("reuseaddr: {e}"))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let tcp = socket
        .connect(target.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(target.url.as_str(), tcp, Some(ws_config()))
            .await
            .map_err(|e| format!("upgrade: {e}"))?;
    Ok(ws)
}

/// The `register_agent` request for `agent_id` (capability `bench`).
pub fn register_frame(agent_id: &str) -> String {
    let metadata = serde_json::json!({"name": agent_id, "capabilities": ["bench"]});
    protocol::register(agent_id, &metadata, None, false, None)
}

/// A registered connection.
pub struct Registered {
    /// The socket.
    pub ws: Ws,
    /// Microseconds from the start of the TCP connect to the register answer.
    pub latency_us: u32,
    /// When the register request was sent (epoch µs): the agent's last frame so far.
    pub sent_at_us: u64,
}

/// Dials, sends `register_agent` and waits for a successful answer, within `timeout`.
pub async fn dial_and_register(
    target: &Target,
    source: IpAddr,
    agent_id: &str,
    timeout: Duration,
) -> Result<Registered, String> {
    let started = Instant::now();
    let attempt = async {
        let mut ws = dial(target, source).await?;
        let sent_at_us = now_us();
        ws.send(Message::text(register_frame(agent_id)))
            .await
            .map_err(|e| format!("send register: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let frame = Frame::parse(text.as_str());
                    if frame.is_response_to("register_agent") {
                        if frame.success == Some(true) {
                            return Ok((ws, sent_at_us));
                        }
                        return Err(format!(
                            "refused: {}",
                            frame.error.as_deref().unwrap_or("no error given")
                        ));
                    }
                }
                Some(Ok(Message::Close(close))) => {
                    return Err(format!(
                        "closed before the register answer: {:?}",
                        close.map(|c| u16::from(c.code))
                    ))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("connection ended before the register answer".into()),
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok((ws, sent_at_us))) => Ok(Registered {
            ws,
            latency_us: started.elapsed().as_micros().min(u32::MAX as u128) as u32,
            sent_at_us,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no register answer within {timeout:?}")),
    }
}

/// Closes `ws` from the client side (1000) and waits, briefly, for the server's answer.
pub async fn close(mut ws: Ws) {
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// The fields of an incoming frame the workloads look at; everything else is skipped.
#[derive(Debug, Default, Deserialize)]
pub struct Frame<'a> {
    /// `type`.
    #[serde(rename = "type", borrow, default)]
    pub kind: Option<Cow<'a, str>>,
    /// `command` of requests and responses.
    #[serde(borrow, default)]
    pub command: Option<Cow<'a, str>>,
    /// `success` of responses.
    #[serde(default)]
    pub success: Option<bool>,
    /// `error` of failed responses.
    #[serde(borrow, default)]
    pub error: Option<Cow<'a, str>>,
    /// `timestamp` of pings (float epoch seconds).
    #[serde(default)]
    pub timestamp: Option<f64>,
    /// `data` of messages.
    #[serde(default)]
    pub data: Option<MessageData>,
    /// `agents` of a `list_agents` answer.
    #[serde(default)]
    pub agents: Option<Vec<serde::de::IgnoredAny>>,
}

/// `data` of a message envelope.
#[derive(Debug, Default, Deserialize)]
pub struct MessageData {
    /// `content` as the harness wrote it.
    #[serde(default)]
    pub content: Option<BenchContent>,
}

/// The content the harness puts into its messages.
#[derive(Debug, Default, Deserialize)]
pub struct BenchContent {
    /// Send time, epoch microseconds.
    #[serde(default)]
    pub t: Option<u64>,
    /// Broadcast sequence number.
    #[serde(default)]
    pub seq: Option<u64>,
}

impl<'a> Frame<'a> {
    /// Parses what it can; an unparsable frame yields an empty [`Frame`].
    pub fn parse(text: &'a str) -> Self {
        serde_json::from_str(text).unwrap_or_default()
    }

    /// Whether this is a `system_response` to `command`.
    pub fn is_response_to(&self, command: &str) -> bool {
        self.kind.as_deref() == Some("system_response") && self.command.as_deref() == Some(command)
    }

    /// The timestamp of a server `ping_agent` request, if this is one.
    pub fn ping_timestamp(&self) -> Option<f64> {
        (self.kind.as_deref() == Some("system_request")
            && self.command.as_deref() == Some("ping_agent"))
        .then(|| self.timestamp.unwrap_or(0.0))
    }

    /// The harness content of a message, if this is one.
    pub fn bench_content(&self) -> Option<&BenchContent> {
        if self.kind.as_deref() != Some("message") {
            return None;
        }
        self.data.as_ref()?.content.as_ref()
    }
}

/// A direct message from `sender` to `target`, stamped now.
pub fn direct_frame(sender: &str, target: &str) -> String {
    direct_frame_at(sender, target, now_us())
}

/// A direct message from `sender` to `target`, stamped `t_us`.
pub fn direct_frame_at(sender: &str, target: &str, t_us: u64) -> String {
    format!(
        r#"{{"type":"message","data":{{"message_type":"direct_message","sender_id":"{sender}","target_agent_id":"{target}","text_representation":"bench","content":{{"t":{t_us}}}}}}}"#
    )
}

/// A broadcast from `sender`, stamped now, numbered `seq`.
pub fn broadcast_frame(sender: &str, seq: u64) -> String {
    format!(
        r#"{{"type":"message","data":{{"message_type":"broadcast_message","sender_id":"{sender}","text_representation":"bench","exclude_agent_ids":[],"content":{{"t":{},"seq":{seq}}}}}}}"#,
        now_us()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_back() {
        let ping = r#"{"type":"system_request","command":"ping_agent","timestamp":1795393768.8075876,"agent_id":"a"}"#;
        assert_eq!(
            Frame::parse(ping).ping_timestamp(),
            Some(1795393768.8075876)
        );
        let direct = direct_frame("a", "b");
        assert!(Frame::parse(&direct).bench_content().unwrap().t.is_some());
        let pong = protocol::pong(1795393768.8075876);
        assert!(pong.contains("1795393768.8075876"));
        let reg = r#"{"type":"system_response","command":"register_agent","success":true}"#;
        assert!(Frame::parse(reg).is_response_to("register_agent"));
    }
}
