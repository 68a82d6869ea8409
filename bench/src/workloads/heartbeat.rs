//! Heartbeat at scale: N idle agents answering pings at a short interval; server CPU
//! share over the window, ping delivery lag p50/p99, false stale evictions, and the
//! registration latency of new agents while the fleet is being pinged.

use super::{
    finish, hold, na, num, opt, release, repeat_matrix, text, workers_for, Ctx, FleetReport,
};
use crate::pool::Pool;
use crate::stats::{latency_ms, Row, Table};
use crate::systems::{Server, System, TetherVars};
use crate::wire::{Cmd, Reply};
use std::time::{Duration, Instant};

/// Options of `heartbeat`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Fleet sizes.
    #[arg(long, value_delimiter = ',', default_value = "10000,19900")]
    pub agents: Vec<u64>,
    /// Heartbeat interval, seconds (Tether's `heartbeat.interval`).
    #[arg(long, default_value_t = 5.0)]
    pub interval: f64,
    /// `heartbeat.ping_timeout`, seconds (must be below the interval).
    #[arg(long, default_value_t = 2.5)]
    pub ping_timeout: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// New agents registered per second during the window (each closed at once).
    #[arg(long, default_value_t = 5.0)]
    pub probe_rate: f64,
    /// Concurrent dialers while building the fleet.
    #[arg(long, default_value_t = 64)]
    pub dialers: usize,
}

/// Default heartbeat interval Tether projects to.
const DEFAULT_INTERVAL: f64 = 30.0;

/// Runs the workload and returns its table; `Err` when no run could run at all.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<Vec<Table>, String> {
    let (rows, any_ok) = repeat_matrix(ctx, &args.agents, "heartbeat", |system, n| {
        once(ctx, args, system, n)
    })
    .await;
    let mut table = Table::new(format!(
        "Heartbeat at scale (interval {} s, ping_timeout {} s, {} s window)",
        args.interval, args.ping_timeout, args.duration
    ));
    table.rows = rows;
    table.notes.push(format!(
        "CPU share = server utime+stime over the window / window length (1.0 = one core), everything the server did included (pings, answers, the {} probe registrations per second). Ping lag = client receipt time − the ping's own `timestamp` (server clock = client clock, one machine). Ping RTT = the server's own round trip of answered pings (ping sent → answer read, from the echoed `timestamp`), p50/p99 from `GET /stats` at the end of the window, which covers the last 60–120 s (8 buckets per power of two). False stale = held agents that answered every ping but were closed with 4002. Projection: CPU per ping × the ping rate of 100 000 agents at the default {DEFAULT_INTERVAL} s interval. The floor pings the same way at the same interval, with a timer in each connection's task, and takes any frame as the answer (no registry, no round-trip figures, no events): its projection is what the pings alone cost a bare tokio-tungstenite server on this machine (ping RTT is Tether's own figure, so the floor has none). OpenAgents has no agent heartbeat (its websockets library sends protocol-level pings every 20 s, which are not agent liveness): its CPU column is the cost of holding the idle sockets.",
        args.probe_rate
    ));
    finish(ctx, &mut table);
    if any_ok {
        Ok(vec![table])
    } else {
        Err("heartbeat: no run succeeded".into())
    }
}

async fn once(ctx: &Ctx, args: &Args, system: System, n: u64) -> Result<Row, String> {
    let vars = TetherVars::default()
        .set("HEARTBEAT__INTERVAL", args.interval)
        .set("HEARTBEAT__PING_TIMEOUT", args.ping_timeout);
    // The floor pings too, at the same interval: what a bare server's heartbeat costs.
    let server = match system {
        System::Floor => {
            Server::start_floor_pinging(&ctx.env, args.interval, args.ping_timeout).await?
        }
        _ => Server::start(system, &ctx.env, &vars).await?,
    };
    let pool = Pool::spawn(workers_for(n, ctx.per_worker), 0).await?;
    let result = measure(args, system, n, &server, &pool).await;
    release(&pool).await;
    pool.shutdown().await;
    server.stop().await;
    result
}

async fn measure(
    args: &Args,
    system: System,
    n: u64,
    server: &Server,
    pool: &Pool,
) -> Result<Row, String> {
    let held = hold(pool, &server.ws_url, "hb-", n, args.dialers, 120.0).await?;
    if held.ok == 0 {
        return Err(format!(
            "no agent registered: {}",
            held.errors.first().cloned().unwrap_or_default()
        ));
    }
    // Let every agent reach its first ping, so the window sees the steady state.
    tokio::time::sleep(Duration::from_secs_f64(args.interval + 2.0)).await;
    let _ = pool.all(|_| Cmd::Report).await?;
    let stale_before = stale_declared(server).await;
    let cpu0 = server.cpu_secs().ok_or("cannot read CPU")?;
    let t0 = Instant::now();
    let probes = (args.duration * args.probe_rate).floor() as u64;
    let probe = pool.request(
        0,
        Cmd::Probe {
            url: server.ws_url.clone(),
            prefix: "hb-probe-".into(),
            count: probes,
            interval_ms: (1000.0 / args.probe_rate.max(0.001)) as u64,
        },
    );
    let (probe, _) = tokio::join!(
        probe,
        tokio::time::sleep(Duration::from_secs_f64(args.duration))
    );
    let cpu1 = server.cpu_secs().ok_or("cannot read CPU")?;
    let seconds = t0.elapsed().as_secs_f64();
    let reports = pool.all(|_| Cmd::Report).await?;
    let stale_after = stale_declared(server).await;
    let rtt = server.stats().await.map(|stats| {
        let heartbeat = &stats["heartbeat"];
        (
            heartbeat["ping_rtt_p50_ms"].as_f64(),
            heartbeat["ping_rtt_p99_ms"].as_f64(),
        )
    });
    let FleetReport {
        open,
        pings,
        mut lags,
        stale_closes,
        other_closes,
    } = FleetReport::from_replies(reports);
    let cpu_share = (cpu1 - cpu0) / seconds;
    let mut row = vec![
        text("system", system.label()),
        num("agents", n as f64, 0),
        num("registered", held.ok as f64, 0),
        num("CPU share", cpu_share, 3),
    ];
    let has_heartbeat = system != System::OpenAgents;
    if has_heartbeat {
        let (p50, p99, _) = latency_ms(&mut lags);
        let pings_per_s = pings as f64 / seconds;
        row.push(num("pings/s", pings_per_s, 0));
        row.push(num("expected pings/s", held.ok as f64 / args.interval, 0));
        row.push(opt("ping lag p50 ms", p50, 2, "no pings"));
        row.push(opt("ping lag p99 ms", p99, 2, "no pings"));
        let (rtt50, rtt99) = rtt.unwrap_or((None, None));
        row.push(opt("ping RTT p50 ms", rtt50, 2, "not in /stats"));
        row.push(opt("ping RTT p99 ms", rtt99, 2, "not in /stats"));
        row.push(num("false stale", stale_closes as f64, 0));
        if let (Some(a), Some(b)) = (stale_before, stale_after) {
            row.push(num("stale_declared (server)", (b - a) as f64, 0));
        }
        let projected = if pings_per_s > 0.0 {
            Some(cpu_share / pings_per_s * (100_000.0 / DEFAULT_INTERVAL) * 100.0)
        } else {
            None
        };
        row.push(opt("projected 100k @30s, % core", projected, 2, "no pings"));
    } else {
        for column in [
            "pings/s",
            "ping lag p50 ms",
            "ping lag p99 ms",
            "ping RTT p50 ms",
            "ping RTT p99 ms",
            "false stale",
        ] {
            row.push(na(column, "no heartbeat"));
        }
    }
    row.push(num(
        "sockets lost",
        (held.ok.saturating_sub(open)) as f64,
        0,
    ));
    if other_closes > 0 {
        row.push(num("other closes", other_closes as f64, 0));
    }
    match probe {
        Ok(Reply::Probe {
            mut lat_us,
            failed,
            errors,
        }) => {
            let (p50, p99, _) = latency_ms(&mut lat_us);
            row.push(opt("new-agent reg p50 ms", p50, 2, "none"));
            row.push(opt("new-agent reg p99 ms", p99, 2, "none"));
            if failed > 0 {
                row.push(text(
                    "probe failures",
                    format!(
                        "{failed} ({})",
                        errors.first().map(String::as_str).unwrap_or("")
                    ),
                ));
            }
        }
        Ok(_) => {}
        Err(e) => row.push(na("new-agent reg p50 ms", &e)),
    }
    Ok(row)
}

async fn stale_declared(server: &Server) -> Option<u64> {
    server.stats().await?["heartbeat"]["stale_declared"].as_u64()
}
