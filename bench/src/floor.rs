//! The floor server (`tether-bench floor-server`): tokio-tungstenite accept, read,
//! echo, hold. It keeps no registry, sends no heartbeat and publishes nothing, so it
//! shows what a WebSocket connection costs on this machine with nothing on top.
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

use crate::client::ws_config;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;

/// Broadcasts not yet written that a connection may fall behind by (the workloads send
/// at most tens per second).
const BROADCAST_BACKLOG: usize = 1024;

/// A broadcast frame and the connection (its peer address) that sent it.
type Broadcast = (SocketAddr, Message);

/// Runs the floor server on `host:port` until killed. Prints
/// `floor listening on ADDR` once bound.
pub fn run(host: &str, port: u16, threads: usize) -> std::process::ExitCode {
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
        let (broadcasts, _) = broadcast::channel::<Broadcast>(BROADCAST_BACKLOG);
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    tokio::spawn(serve(stream, peer, broadcasts.clone()));
                }
                Err(e) => {
                    // Out of file descriptors, typically: back off and retry.
                    eprintln!("floor-server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

async fn serve(stream: TcpStream, me: SocketAddr, broadcasts: broadcast::Sender<Broadcast>) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await
    else {
        return;
    };
    let mut copies = broadcasts.subscribe();
    loop {
        let msg = tokio::select! {
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
        let reply = match msg {
            Message::Text(text) => {
                let t = text.as_str();
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
