//! Routing: direct messages between agent pairs — throughput at saturation (closed
//! loop), latency at half of it and at a fixed 10 000 messages per second (open
//! loop) — and broadcast to a fleet.

use super::{finish, na, num, opt, repeat_matrix, text, Ctx};
use crate::pool::Pool;
use crate::stats::{latency_ms, Row, Table};
use crate::systems::{Server, System, TetherVars};
use crate::wire::{Cmd, Reply};
use std::collections::BTreeMap;

/// Options of `routing`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Agent pairs.
    #[arg(long, default_value_t = 1000)]
    pub pairs: u64,
    /// Messages in flight per pair in the closed loop.
    #[arg(long, default_value_t = 4)]
    pub window: u64,
    /// Seconds recorded per phase.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of warm-up before each phase is recorded.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// The fixed open-loop rate of the latency target, messages per second.
    #[arg(long, default_value_t = 10_000.0)]
    pub fixed_rate: f64,
    /// Agents receiving the broadcasts (sender included).
    #[arg(long, default_value_t = 1000)]
    pub broadcast_agents: u64,
    /// Broadcasts per second.
    #[arg(long, default_value_t = 10.0)]
    pub broadcast_rate: f64,
}

/// Runs the workload and returns its tables; `Err` when no run could run at all.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<Vec<Table>, String> {
    let (rows, any_ok) = repeat_matrix(ctx, &[args.pairs], "routing", |system, pairs| {
        direct(ctx, args, system, pairs)
    })
    .await;
    let mut direct_table = Table::new(format!("Routing: direct messages, {} pairs", args.pairs));
    direct_table.rows = rows;
    direct_table.notes.push(format!(
        "Saturation: closed loop, {} messages in flight per pair, every receipt answered with a new message to the peer; rate = messages received per second. Half and fixed: open loop, the `ra-*` agents send at a fixed total rate, latency = receipt − send time written in the message (one clock). The floor does not route: it echoes each message to its sender, so its numbers are one hop through a bare WebSocket server. A fixed rate above a system's saturation is not run (its queue would only grow). Lost = messages sent in the half-rate and fixed-rate windows that had not arrived one second after the last send (messages still in flight when a window closes are not counted as lost).",
        args.window
    ));
    finish(ctx, &mut direct_table);
    let (rows, any_ok_b) =
        repeat_matrix(ctx, &[args.broadcast_agents], "broadcast", |system, n| {
            broadcast(ctx, args, system, n)
        })
        .await;
    let mut broadcast_table = Table::new(format!(
        "Routing: broadcast to {} agents, {} broadcasts/s",
        args.broadcast_agents, args.broadcast_rate
    ));
    broadcast_table.rows = rows;
    broadcast_table.notes.push(
        "One agent broadcasts; every other agent records the latency of each copy. Completion = time until the last recipient had a broadcast (only broadcasts every recipient got). The floor hands each broadcast frame, unchanged, to every other connection it holds (one `tokio::sync::broadcast` channel; each connection's task writes the copies), with no registry, exclusions or `sender_id` stamping: the least a WebSocket server does per copy.".into(),
    );
    finish(ctx, &mut broadcast_table);
    if any_ok || any_ok_b {
        Ok(vec![direct_table, broadcast_table])
    } else {
        Err("routing: no run succeeded".into())
    }
}

struct Phase {
    received: u64,
    seconds: f64,
    lat_us: Vec<u32>,
    closes: BTreeMap<String, u64>,
    /// Open loop: sent in the window and never arrived.
    lost: Option<u64>,
}

fn phase(reply: Reply) -> Result<Phase, String> {
    match reply {
        Reply::Routed {
            received,
            seconds,
            lat_us,
            closes,
            lost,
        } => Ok(Phase {
            received,
            seconds,
            lat_us,
            closes,
            lost,
        }),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

async fn direct(ctx: &Ctx, args: &Args, system: System, pairs: u64) -> Result<Row, String> {
    let server = Server::start(system, &ctx.env, &TetherVars::default()).await?;
    let pool = Pool::spawn(1, 0).await?;
    let result = direct_phases(args, system, pairs, &server, &pool).await;
    let _ = pool.request(0, Cmd::RouteTeardown).await;
    pool.shutdown().await;
    server.stop().await;
    result
}

async fn direct_phases(
    args: &Args,
    system: System,
    pairs: u64,
    server: &Server,
    pool: &Pool,
) -> Result<Row, String> {
    let ready = pool
        .request(
            0,
            Cmd::RouteSetup {
                url: server.ws_url.clone(),
                pairs,
                echo: system == System::Floor,
                urls: Vec::new(),
            },
        )
        .await?;
    if let Reply::RouteReady { ok, failed, errors } = &ready {
        if *failed > 0 {
            return Err(format!(
                "{failed} of {} agents failed to register: {}",
                ok + failed,
                errors.first().map(String::as_str).unwrap_or("")
            ));
        }
    }
    let mut row = vec![
        text("system", system.label()),
        num("pairs", pairs as f64, 0),
    ];
    let cpu0 = server.cpu_secs();
    let mut sat = phase(
        pool.request(
            0,
            Cmd::RouteClosed {
                window: args.window,
                warmup_s: args.warmup,
                duration_s: args.duration,
            },
        )
        .await?,
    )?;
    let cpu1 = server.cpu_secs();
    let saturation = sat.received as f64 / sat.seconds;
    let (p50, p99, _) = latency_ms(&mut sat.lat_us);
    row.push(num("saturation msg/s", saturation, 0));
    row.push(opt("sat. p50 ms", p50, 2, "none"));
    row.push(opt("sat. p99 ms", p99, 2, "none"));
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        row.push(num(
            "server CPU share at sat.",
            (b - a) / (args.warmup + args.duration),
            2,
        ));
    }
    if saturation < 1.0 {
        return Ok(row);
    }
    let half = saturation / 2.0;
    let mut h = phase(
        pool.request(
            0,
            Cmd::RouteOpen {
                rate: half,
                warmup_s: args.warmup,
                duration_s: args.duration,
            },
        )
        .await?,
    )?;
    let (p50, p99, _) = latency_ms(&mut h.lat_us);
    row.push(num("half rate msg/s", h.received as f64 / h.seconds, 0));
    row.push(opt("half p50 ms", p50, 3, "none"));
    row.push(opt("half p99 ms", p99, 3, "none"));
    if args.fixed_rate <= saturation * 0.9 {
        let mut f = phase(
            pool.request(
                0,
                Cmd::RouteOpen {
                    rate: args.fixed_rate,
                    warmup_s: args.warmup,
                    duration_s: args.duration,
                },
            )
            .await?,
        )?;
        let (p50, p99, _) = latency_ms(&mut f.lat_us);
        let label = format!("{:.0}/s", args.fixed_rate);
        row.push(num(
            &format!("{label} achieved"),
            f.received as f64 / f.seconds,
            0,
        ));
        row.push(opt(&format!("{label} p50 ms"), p50, 3, "none"));
        row.push(opt(&format!("{label} p99 ms"), p99, 3, "none"));
        row.push(num(
            "lost",
            (f.lost.unwrap_or(0) + h.lost.unwrap_or(0)) as f64,
            0,
        ));
        if !f.closes.is_empty() {
            row.push(text("server closes", format!("{:?}", f.closes)));
        }
    } else {
        let label = format!("{:.0}/s", args.fixed_rate);
        row.push(na(
            &format!("{label} p99 ms"),
            &format!("saturates at {saturation:.0}/s"),
        ));
    }
    if !sat.closes.is_empty() {
        row.push(text("closes at sat.", format!("{:?}", sat.closes)));
    }
    Ok(row)
}

async fn broadcast(ctx: &Ctx, args: &Args, system: System, n: u64) -> Result<Row, String> {
    let server = Server::start(system, &ctx.env, &TetherVars::default()).await?;
    let pool = Pool::spawn(1, 0).await?;
    let cpu0 = server.cpu_secs();
    let reply = pool
        .request(
            0,
            Cmd::Broadcast {
                url: server.ws_url.clone(),
                agents: n,
                rate: args.broadcast_rate,
                warmup_s: args.warmup,
                duration_s: args.duration,
            },
        )
        .await;
    let cpu1 = server.cpu_secs();
    pool.shutdown().await;
    server.stop().await;
    let Reply::Broadcasted {
        sent,
        delivered,
        recipients,
        seconds,
        mut lat_us,
        mut completion_us,
        failed,
    } = reply?
    else {
        return Err("unexpected reply".into());
    };
    let (p50, p99, _) = latency_ms(&mut lat_us);
    let (c50, c99, _) = latency_ms(&mut completion_us);
    let mut row = vec![
        text("system", system.label()),
        num("agents", n as f64, 0),
        num("broadcasts", sent as f64, 0),
        num("recipients", recipients as f64, 0),
        num(
            "delivered %",
            100.0 * delivered as f64 / (sent * recipients).max(1) as f64,
            1,
        ),
        num("deliveries/s", delivered as f64 / seconds, 0),
        opt("delivery p50 ms", p50, 2, "none"),
        opt("delivery p99 ms", p99, 2, "none"),
        opt("completion p50 ms", c50, 2, "none"),
        opt("completion p99 ms", c99, 2, "none"),
    ];
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        row.push(num("server CPU s", b - a, 2));
    }
    if failed > 0 {
        row.push(num("failed registrations", failed as f64, 0));
    }
    Ok(row)
}
