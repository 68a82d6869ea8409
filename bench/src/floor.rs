//! The floor server (`tether-bench floor-server`): tokio-tungstenite accept, read,
//! echo, hold. It keeps no registry, publishes nothing and, unless told to, sends no
//! heartbeat, so it shows what a WebSocket connection costs on this machine with
//! nothing on top.
//!
//! To let the same load generators drive it, it answers `register_agent` and client
//! `ping_agent` requests with a fixed success frame (no bookkeeping), answers
//! `list_agents` with an empty list, and echoes every other text frame back to its
//! sender (a "routed" message comes back to the socket that sent it).
//!
//! A broadcast (`"message_type":"broadcast_message"`) goes, unchanged, to every other
//! connection the floor holds, the way a bare tokio server would do it: one
//! `tokio::sync::broadcast` channel, whose receiver in each connection's task writes
//! every copy not sent by that connection. It ignores `exclude_agent_ids` and keeps no ids.
//!
//! With `--ping-interval` (the heartbeat workload only) it also pings, the way a bare
//! tokio server would: each connection's task holds one timer, sends the protocol's
//! `ping_agent` request after `interval` seconds without a frame from its agent, takes
//! any frame as a sign of life (a `ping_agent` answer, found by substring and not
//! parsed, gets no reply), and closes a connection whose ping stays unanswered for
//! `ping_timeout` with 4002. No registry, no round-trip figures, no events: the least a
//! server that checks liveness must do.

use crate::client::ws_config;
use crate::stats::now_us;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Broadcasts not yet written that a connection may fall behind by (the workloads send
/// at most tens per second).
const BROADCAST_BACKLOG: usize = 1024;

/// A broadcast frame and the connection (its peer address) that sent it.
type Broadcast = (SocketAddr, Message);

/// The floor's optional heartbeat (`--ping-interval`, `--ping-timeout`).
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    /// Silence after which a connection is pinged.
    pub interval: Duration,
    /// How long a ping may stay unanswered before the connection is closed 4002.
    pub ping_timeout: Duration,
}

/// Runs the floor server on `host:port` until killed, pinging its connections when
/// `heartbeat` is set. Prints `floor listening on ADDR` once bound.
pub fn run(
    host: &str,
    port: u16,
    threads: usize,
    heartbeat: Option<Heartbeat>,
) -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let listener = match TcpListener::bind((host, port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("floor-server: cannot bind {host}:{port}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        match listener.local_addr() {
            Ok(addr) => println!("floor listening on {addr}"),
            Err(e) => {
                eprintln!("floor-server: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
        accept_forever(listener, heartbeat).await
    })
}

/// Serves every connection `listener` accepts, until the task is dropped.
async fn accept_forever(listener: TcpListener, heartbeat: Option<Heartbeat>) -> ! {
    let (broadcasts, _) = broadcast::channel::<Broadcast>(BROADCAST_BACKLOG);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(serve(stream, peer, broadcasts.clone(), heartbeat));
            }
            Err(e) => {
                // Out of file descriptors, typically: back off and retry.
                eprintln!("floor-server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One connection's ping timer and whether its last ping is still unanswered.
struct PingClock {
    timer: Interval,
    ping_timeout: Duration,
    awaiting_answer: bool,
}

impl PingClock {
    fn new(heartbeat: Heartbeat) -> Self {
        let mut timer =
            tokio::time::interval_at(Instant::now() + heartbeat.interval, heartbeat.interval);
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            timer,
            ping_timeout: heartbeat.ping_timeout,
            awaiting_answer: false,
        }
    }

    /// The agent sent a frame: it is alive, and its next ping is `interval` from now.
    fn heard(&mut self) {
        self.awaiting_answer = false;
        self.timer.reset();
    }

    /// The timer fired: the ping to send, or `None` when the last one has gone
    /// unanswered for `ping_timeout` (the connection is to be closed).
    fn tick(&mut self) -> Option<Message> {
        if self.awaiting_answer {
            return None;
        }
        self.awaiting_answer = true;
        self.timer.reset_at(Instant::now() + self.ping_timeout);
        Some(ping_frame())
    }
}

/// The protocol's `ping_agent` request, stamped now.
fn ping_frame() -> Message {
    let timestamp = now_us() as f64 / 1e6;
    Message::text(format!(
        r#"{{"type":"system_request","command":"ping_agent","timestamp":{timestamp},"agent_id":"floor"}}"#
    ))
}

/// Waits for `clock`'s next tick, or forever without a heartbeat.
async fn next_tick(clock: &mut Option<PingClock>) {
    match clock {
        Some(clock) => {
            clock.timer.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn serve(
    stream: TcpStream,
    me: SocketAddr,
    broadcasts: broadcast::Sender<Broadcast>,
    heartbeat: Option<Heartbeat>,
) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await
    else {
        return;
    };
    let mut copies = broadcasts.subscribe();
    let mut clock = heartbeat.map(PingClock::new);
    loop {
        let msg = tokio::select! {
            _ = next_tick(&mut clock) => {
                let ping = clock.as_mut().and_then(PingClock::tick);
                let Some(ping) = ping else {
                    let _ = ws
                        .close(Some(CloseFrame { code: CloseCode::from(4002), reason: "stale".into() }))
                        .await;
                    break;
                };
                if ws.send(ping).await.is_err() { break; }
                continue;
            }
            copy = copies.recv() => match copy {
                Ok((from, copy)) => {
                    if from != me && ws.send(copy).await.is_err() { break; }
                    continue;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            },
            msg = ws.next() => match msg {
                Some(Ok(msg)) => msg,
                _ => break,
            },
        };
        if let Some(clock) = clock.as_mut() {
            clock.heard();
        }
        let reply = match msg {
            Message::Text(text) => {
                let t = text.as_str();
                // Looked for only while pinging: the other workloads' floor does no
                // work per frame that it did not do before.
                if clock.is_some()
                    && t.contains("\"system_response\"")
                    && t.contains("\"ping_agent\"")
                {
                    continue;
                }
                if t.contains("\"system_request\"") {
                    if t.contains("\"register_agent\"") {
                        Message::text(
                            r#"{"type":"system_response","command":"register_agent","success":true,"network_name":"floor"}"#,
                        )
                    } else if t.contains("\"list_agents\"") {
                        Message::text(
                            r#"{"type":"system_response","command":"list_agents","success":true,"agents":[]}"#,
                        )
                    } else {
                        Message::Text(text)
                    }
                } else if t.contains("\"broadcast_message\"") {
                    let _ = broadcasts.send((me, Message::Text(text)));
                    continue;
                } else {
                    Message::Text(text)
                }
            }
            Message::Binary(bytes) => Message::Binary(bytes),
            // The reply to a close is queued by tungstenite and flushed by the next read,
            // which then ends the loop.
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{dial, protocol, Frame, Target, Ws};

    /// Serves `heartbeat`'s floor on a free port and dials it.
    async fn floor_and_client(heartbeat: Option<Heartbeat>) -> (tokio::task::JoinHandle<()>, Ws) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { accept_forever(listener, heartbeat).await });
        let target = Target::parse(&url).unwrap();
        let ws = dial(&target, "127.0.0.1".parse().unwrap()).await.unwrap();
        (server, ws)
    }

    /// The next text frame, or the close code, within `wait`.
    async fn next_event(ws: &mut Ws, wait: Duration) -> Result<String, Option<u16>> {
        loop {
            match tokio::time::timeout(wait, ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => return Ok(text.as_str().to_owned()),
                Ok(Some(Ok(Message::Close(frame)))) => return Err(frame.map(|f| u16::from(f.code))),
                Ok(Some(Ok(_))) => continue,
                other => panic!("no frame from the floor within {wait:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn the_pinging_floor_pings_after_silence_and_closes_4002_when_unanswered() {
        let heartbeat = Heartbeat {
            interval: Duration::from_millis(200),
            ping_timeout: Duration::from_millis(200),
        };
        let (server, mut ws) = floor_and_client(Some(heartbeat)).await;
        let wait = Duration::from_secs(5);

        // Two pings in a row, each answered: the connection stays open.
        for _ in 0..2 {
            let frame = next_event(&mut ws, wait)
                .await
                .expect("a ping, not a close");
            let timestamp = Frame::parse(&frame)
                .ping_timestamp()
                .unwrap_or_else(|| panic!("not a ping_agent request: {frame}"));
            ws.send(Message::text(protocol::pong(timestamp)))
                .await
                .unwrap();
        }
        // The third goes unanswered: the floor closes with 4002.
        let frame = next_event(&mut ws, wait)
            .await
            .expect("a ping, not a close");
        assert!(Frame::parse(&frame).ping_timestamp().is_some(), "{frame}");
        assert_eq!(next_event(&mut ws, wait).await, Err(Some(4002)));
        server.abort();
    }

    #[tokio::test]
    async fn the_floor_without_a_heartbeat_sends_nothing_unasked() {
        let (server, mut ws) = floor_and_client(None).await;
        let unasked = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
        assert!(unasked.is_err(), "the floor sent {unasked:?} unasked");
        server.abort();
    }
}
