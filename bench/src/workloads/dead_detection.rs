//! Dead-agent detection: agents that stop answering at once; time from each agent's
//! last frame to its `agent.stale` event (read from `GET /events`), against the
//! PROTOCOL.md bound `interval + ping_timeout + 1`.

use super::{finish, hold, na, num, opt, release, repeat_matrix, text, workers_for, Ctx};
use crate::pool::Pool;
use crate::sse::EventTap;
use crate::stats::{latency_ms, Row, Table};
use crate::systems::{Server, System, TetherVars};
use crate::wire::{Cmd, Reply};
use std::collections::HashMap;
use std::time::Duration;

/// Options of `dead-detection`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Agents that go silent together.
    #[arg(long, default_value_t = 1000)]
    pub agents: u64,
    /// `heartbeat.interval`, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub interval: f64,
    /// `heartbeat.ping_timeout`, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub ping_timeout: f64,
}

/// Runs the workload and returns its table; `Err` when no run could run at all.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<Vec<Table>, String> {
    let (rows, any_ok) = repeat_matrix(ctx, &[args.agents], "dead-detection", |system, n| {
        once(ctx, args, system, n)
    })
    .await;
    let mut table = Table::new(format!(
        "Dead-agent detection (interval {} s, ping_timeout {} s)",
        args.interval, args.ping_timeout
    ));
    table.rows = rows;
    table.notes.push(format!(
        "The agents register, answer their first ping, then all stop answering at the same moment (the sockets stay open). Detection = time the harness read the agent's `agent.stale` event from `GET /events` − the agent's last frame sent. Bound = interval + ping_timeout + 1 = {} s.",
        args.interval + args.ping_timeout + 1.0
    ));
    finish(ctx, &mut table);
    if any_ok {
        Ok(vec![table])
    } else {
        Err("dead-detection: no run succeeded".into())
    }
}

async fn once(ctx: &Ctx, args: &Args, system: System, n: u64) -> Result<Row, String> {
    if system != System::Tether {
        return Ok(vec![
            text("system", system.label()),
            num("agents", n as f64, 0),
            na(
                "stale events",
                "no heartbeat: a silent agent is never detected",
            ),
        ]);
    }
    let vars = TetherVars::default()
        .set("HEARTBEAT__INTERVAL", args.interval)
        .set("HEARTBEAT__PING_TIMEOUT", args.ping_timeout);
    let server = Server::start(system, &ctx.env, &vars).await?;
    let http = server.http_url.clone().ok_or("no HTTP URL")?;
    let tap = match EventTap::start(&http).await {
        Ok(tap) => tap,
        Err(e) => {
            server.stop().await;
            return Err(e);
        }
    };
    let pool = Pool::spawn(workers_for(n, ctx.per_worker), 0).await?;
    let result = measure(args, n, &server, &pool, &tap).await;
    release(&pool).await;
    pool.shutdown().await;
    tap.stop();
    server.stop().await;
    result
}

async fn measure(
    args: &Args,
    n: u64,
    server: &Server,
    pool: &Pool,
    tap: &EventTap,
) -> Result<Row, String> {
    let held = hold(pool, &server.ws_url, "dead-", n, 32, 60.0).await?;
    tokio::time::sleep(Duration::from_secs_f64(args.interval + 2.0)).await;
    let mut last_sent: HashMap<String, u64> = HashMap::new();
    for reply in pool.all(|_| Cmd::Silence).await? {
        if let Reply::Silenced { last_sent: l } = reply {
            last_sent.extend(l);
        }
    }
    let bound = args.interval + args.ping_timeout + 1.0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(bound + 10.0);
    while tokio::time::Instant::now() < deadline {
        if tap.count("agent.stale") >= last_sent.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut stale_closes = 0;
    for reply in pool.all(|_| Cmd::Report).await? {
        if let Reply::Report { closes, .. } = reply {
            stale_closes += closes.get("4002").copied().unwrap_or(0);
        }
    }
    let mut detection_us = Vec::new();
    let mut seen = 0u64;
    for event in tap.snapshot().iter().filter(|e| e.kind == "agent.stale") {
        if let Some(at) = last_sent.get(&event.subject) {
            seen += 1;
            detection_us.push(event.at_us.saturating_sub(*at).min(u32::MAX as u64) as u32);
        }
    }
    let bound_us = (bound * 1e6) as u32;
    let within = detection_us.iter().filter(|d| **d <= bound_us).count();
    let (p50, p99, max) = latency_ms(&mut detection_us);
    Ok(vec![
        text("system", "Tether"),
        num("agents", n as f64, 0),
        num("registered", held.ok as f64, 0),
        num("stale events", seen as f64, 0),
        opt("p50 s", p50.map(|v| v / 1000.0), 2, "none"),
        opt("p99 s", p99.map(|v| v / 1000.0), 2, "none"),
        opt("max s", max.map(|v| v / 1000.0), 2, "none"),
        num("bound s", bound, 1),
        num("within bound", within as f64, 0),
        num("missed or late", (held.ok as usize - within) as f64, 0),
        num("closed 4002", stale_closes as f64, 0),
        text(
            "event stream",
            if tap.ended() { "cut off" } else { "intact" },
        ),
    ])
}
