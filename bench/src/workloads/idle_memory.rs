//! Idle fleet memory: N registered idle agents; server RSS growth per agent (KiB) and
//! the projection to 100 000 agents from that per-agent cost.

use super::{finish, hold, num, opt, release, repeat_matrix, text, workers_for, Ctx};
use crate::pool::Pool;
use crate::procfs;
use crate::stats::{Cell, Table};
use crate::systems::{Server, System, TetherVars};
use std::time::Duration;

/// Options of `idle-memory`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Fleet sizes (the largest a single process can hold here is just under the
    /// 20 000 open-file limit).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,19900")]
    pub agents: Vec<u64>,
    /// Seconds to wait after the last registration before reading RSS.
    #[arg(long, default_value_t = 3.0)]
    pub settle: f64,
    /// Concurrent dialers (all workers together).
    #[arg(long, default_value_t = 64)]
    pub dialers: usize,
}

/// Runs the workload and returns its table; `Err` when no run could run at all.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<Vec<Table>, String> {
    let (rows, any_ok) = repeat_matrix(ctx, &args.agents, "idle-memory", |system, n| {
        once(ctx, args, system, n)
    })
    .await;
    let mut table = Table::new("Idle fleet memory");
    table.rows = rows;
    // Ratios per fleet size against Tether.
    let tether: Vec<(u64, f64)> = table
        .rows
        .iter()
        .filter(|r| super::system_of(r) == Some(System::Tether.label()))
        .filter_map(|r| {
            Some((
                super::value_of(r, "agents")? as u64,
                super::value_of(r, "KiB/agent")?,
            ))
        })
        .collect();
    for row in &mut table.rows {
        let n = super::value_of(row, "agents").map(|v| v as u64);
        let kib = super::value_of(row, "KiB/agent");
        let base = tether.iter().find(|(t, _)| Some(*t) == n).map(|(_, k)| *k);
        let ratio = match (kib, base) {
            (Some(k), Some(b)) if b > 0.0 => Cell::Num(k / b, 2),
            _ => Cell::Na(String::new()),
        };
        row.push(("× Tether KiB/agent".into(), ratio));
    }
    table.notes.push(
        "RSS is VmRSS of the server process (and its children) from /proc; KiB/agent = (RSS with the fleet − RSS before any agent) / registered agents; the 100k projection is baseline + 100 000 × KiB/agent. Tether runs its default configuration (heartbeat 30 s, log publisher to a file) with max_connections raised; agents are idle (no pings are due within the measurement). /metrics = 50 scrapes with the fleet registered (after a warm-up), request to last byte over loopback, Tether only (target < 1 ms at 19 900 agents).".into(),
    );
    finish(ctx, &mut table);
    if any_ok {
        Ok(vec![table])
    } else {
        Err("idle-memory: no run succeeded".into())
    }
}

async fn once(ctx: &Ctx, args: &Args, system: System, n: u64) -> Result<crate::stats::Row, String> {
    let server = Server::start(system, &ctx.env, &TetherVars::default()).await?;
    let base = server
        .settled_rss(Duration::from_secs(1))
        .await
        .ok_or("cannot read the server's RSS")?;
    let pool = Pool::spawn(workers_for(n, ctx.per_worker), 0).await?;
    let result = hold(&pool, &server.ws_url, "idle-", n, args.dialers, 120.0).await;
    let rss = server
        .settled_rss(Duration::from_secs_f64(args.settle))
        .await;
    let fds = procfs::open_fds(server.pid);
    let scrape = match &server.http_url {
        Some(http) if held_ok(&result) => scrape_times(http).await,
        _ => None,
    };
    release(&pool).await;
    pool.shutdown().await;
    server.stop().await;
    let held = result?;
    let rss = rss.ok_or("cannot read the server's RSS")?;
    let per_agent = (rss.saturating_sub(base)) as f64 / held.ok.max(1) as f64;
    let mut row = vec![
        text("system", system.label()),
        num("agents", n as f64, 0),
        num("registered", held.ok as f64, 0),
        num("baseline MiB", base as f64 / 1024.0, 1),
        num("RSS MiB", rss as f64 / 1024.0, 1),
        num("KiB/agent", per_agent, 2),
        num(
            "projected 100k MiB",
            (base as f64 + per_agent * 100_000.0) / 1024.0,
            0,
        ),
        opt("server fds", fds.map(|f| f as f64), 0, "unreadable"),
    ];
    match scrape {
        Some((p50, max)) => {
            row.push(num("/metrics p50 ms", p50, 3));
            row.push(num("/metrics max ms", max, 3));
        }
        None => {
            row.push(super::na("/metrics p50 ms", "no /metrics"));
            row.push(super::na("/metrics max ms", "no /metrics"));
        }
    }
    held.note_failures(&mut row);
    Ok(row)
}

fn held_ok(result: &Result<super::Held, String>) -> bool {
    result.as_ref().is_ok_and(|held| held.ok > 0)
}

/// Times 50 scrapes of `/metrics` with the fleet registered (after one warm-up):
/// median and slowest, in milliseconds, request to last byte over loopback.
async fn scrape_times(http: &str) -> Option<(f64, f64)> {
    let client = reqwest::Client::new();
    let url = format!("{http}/metrics");
    client.get(&url).send().await.ok()?.bytes().await.ok()?;
    let mut ms = Vec::new();
    for _ in 0..50 {
        let started = std::time::Instant::now();
        let response = client.get(&url).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.bytes().await.ok()?;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    Some((ms[ms.len() / 2], ms[ms.len() - 1]))
}
