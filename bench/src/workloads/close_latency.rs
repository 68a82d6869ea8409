//! Close latency: how long after a client's close frame the server ends the TCP
//! connection (its FIN), as a client waiting for it — OpenAgents' client does, per
//! RFC 6455 §7.1.1 — sees it. One agent at a time connects, registers, sends a close
//! frame and reads until the end of the stream.

use super::{finish, num, repeat_matrix, text, Ctx};
use crate::stats::{latency_ms, Row, Table};
use crate::systems::{Server, System, TetherVars};
use std::time::{Duration, Instant};
use tether_testkit::ws::client_frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Options of `close-latency`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Connections closed per run, one after the other.
    #[arg(long, default_value_t = 300)]
    pub closes: u64,
}

/// Runs the workload and returns its table; `Err` when no run could run at all.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<Vec<Table>, String> {
    let (rows, any_ok) = repeat_matrix(ctx, &[args.closes], "close-latency", |system, n| {
        once(ctx, system, n)
    })
    .await;
    let mut table = Table::new("Close latency");
    table.rows = rows;
    table.notes.push(
        "Each connection registers, then the client sends a close frame (1000) and reads until the server ends the stream; latency = end of stream − close frame sent. A client that waits for the server's FIN before returning from its close (OpenAgents' does) waits this long on every disconnect.".into(),
    );
    finish(ctx, &mut table);
    if any_ok {
        Ok(vec![table])
    } else {
        Err("close-latency: no run succeeded".into())
    }
}

async fn once(_ctx: &Ctx, system: System, n: u64) -> Result<Row, String> {
    let server = Server::start(system, &_ctx.env, &TetherVars::default()).await?;
    let addr = server
        .ws_url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_owned();
    let mut lat_us = Vec::new();
    let mut failed = 0u64;
    for i in 0..n {
        match close_one(&addr, &format!("close-{i}")).await {
            Ok(took) => lat_us.push(took.as_micros().min(u128::from(u32::MAX)) as u32),
            Err(_) => failed += 1,
        }
    }
    server.stop().await;
    let (p50, p99, max) = latency_ms(&mut lat_us);
    Ok(vec![
        text("system", system.label()),
        num("closes", lat_us.len() as f64, 0),
        num("failed", failed as f64, 0),
        super::opt("FIN after close p50 ms", p50, 2, "none"),
        super::opt("FIN after close p99 ms", p99, 2, "none"),
        super::opt("max ms", max, 1, "none"),
    ])
}

/// Connects, registers `agent_id`, closes; returns the time from the close frame to
/// the end of the stream.
async fn close_one(addr: &str, agent_id: &str) -> Result<Duration, String> {
    let deadline = Duration::from_secs(10);
    let work = async {
        let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        tcp.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        // The 101 and the register answer (a text frame after the head).
        let register = crate::client::protocol::register(
            agent_id,
            &serde_json::json!({"name": agent_id}),
            None,
            false,
            None,
        );
        let mut registered = false;
        loop {
            let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before registering".into());
            }
            seen.extend_from_slice(&chunk[..n]);
            if !registered {
                if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                    seen.drain(..end + 4);
                    let frame = client_frame(1, register.as_bytes());
                    tcp.write_all(&frame).await.map_err(|e| e.to_string())?;
                    registered = true;
                }
            }
            if registered && seen.len() >= 2 && seen[0] & 0x0F == 1 {
                break; // The register answer has begun to arrive: the agent is in.
            }
        }
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        let sent = Instant::now();
        tcp.write_all(&client_frame(8, &close))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return Ok(sent.elapsed()),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| "no end of stream within 10 s".to_string())?
}
