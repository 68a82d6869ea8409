//! Churn: agents connecting and leaving continuously at a fixed rate. Checks that the
//! registry size tracks the true number of open sockets, that RSS returns to its
//! baseline afterwards, and that every incarnation has its `agent.disconnected` and
//! `agent.cleaned_up` events.

use super::{finish, na, num, opt, repeat_matrix, text, Ctx};
use crate::pool::Pool;
use crate::sse::EventTap;
use crate::stats::{latency_ms, Row, Table};
use crate::systems::{Server, System, TetherVars};
use crate::wire::{Cmd, Reply};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Options of `churn`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// New connections per second (all workers together).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Seconds of churn.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Lifetime of each connection, milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub lifetime_ms: u64,
    /// Client worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
}

/// Runs the workload and returns its table; `Err` when no run could run at all.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<Vec<Table>, String> {
    let (rows, any_ok) = repeat_matrix(ctx, &[args.rate], "churn", |system, rate| {
        once(ctx, args, system, rate)
    })
    .await;
    let mut table = Table::new(format!(
        "Churn: {} connections/s for {} s, each living {} ms",
        args.rate, args.duration, args.lifetime_ms
    ));
    table.rows = rows;
    table.notes.push(
        "Every connection registers a fresh agent id, answers pings while it lives, then closes (1000). Registry drift = |registered agents in `GET /stats` − sockets the clients hold open|, sampled every second (the two reads are a few ms apart, so a drift of rate × a few ms is sampling noise). Registry after = agents the server lists (`list_agents` from a fresh agent, minus that agent) once every client has left. RSS delta = RSS 5 s (and 30 s) after the churn − RSS before it. Events: every `agent.registered` incarnation must have exactly one `agent.disconnected` and one `agent.cleaned_up`, read from `GET /events`.".into(),
    );
    finish(ctx, &mut table);
    if any_ok {
        Ok(vec![table])
    } else {
        Err("churn: no run succeeded".into())
    }
}

async fn once(ctx: &Ctx, args: &Args, system: System, rate: f64) -> Result<Row, String> {
    let server = Server::start(system, &ctx.env, &TetherVars::default()).await?;
    let tap = match &server.http_url {
        Some(http) => Some(EventTap::start(http).await?),
        None => None,
    };
    let pool = Pool::spawn(args.workers.max(1), 0).await?;
    let result = measure(args, system, rate, &server, &pool, tap.as_ref()).await;
    pool.shutdown().await;
    if let Some(tap) = tap {
        tap.stop();
    }
    server.stop().await;
    result
}

async fn measure(
    args: &Args,
    system: System,
    rate: f64,
    server: &Server,
    pool: &Pool,
    tap: Option<&EventTap>,
) -> Result<Row, String> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = server.rss_kib().ok_or("cannot read RSS")?;
    let workers = pool.len();
    let churn = pool.all(|i| Cmd::Churn {
        url: server.ws_url.clone(),
        prefix: format!("churn-{i}-"),
        rate: rate / workers as f64,
        duration_s: args.duration,
        lifetime_ms: args.lifetime_ms,
    });
    tokio::pin!(churn);
    let mut drift_max = 0i64;
    let mut drift_sum = 0i64;
    let mut samples = 0i64;
    let mut peak_rss = base;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let replies = loop {
        tokio::select! {
            replies = &mut churn => break replies?,
            _ = tick.tick() => {
                peak_rss = peak_rss.max(server.rss_kib().unwrap_or(0));
                if server.http_url.is_none() { continue; }
                let counts = async {
                    let mut open = 0;
                    for i in 0..workers {
                        if let Ok(Reply::Count { open: o }) = pool.request(i, Cmd::Count).await {
                            open += o;
                        }
                    }
                    open
                };
                let (stats, open) = tokio::join!(server.stats(), counts);
                if let Some(registered) = stats.and_then(|s| s["connections"]["registered_agents"].as_i64()) {
                    let drift = (registered - open as i64).abs();
                    drift_max = drift_max.max(drift);
                    drift_sum += drift;
                    samples += 1;
                }
            }
        }
    };
    let (mut opened, mut failed, mut closed) = (0u64, 0u64, 0u64);
    let mut server_closed: BTreeMap<String, u64> = BTreeMap::new();
    let mut lats = Vec::new();
    let mut errors = Vec::new();
    for reply in replies {
        if let Reply::Churn {
            opened: o,
            failed: f,
            closed: c,
            server_closed: s,
            errors: e,
            lat_us,
        } = reply
        {
            opened += o;
            failed += f;
            closed += c;
            for (k, v) in s {
                *server_closed.entry(k).or_default() += v;
            }
            errors.extend(e);
            lats.extend(lat_us);
        }
    }
    // Let the server finish the last disconnections.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let listed = match pool
        .request(
            0,
            Cmd::ListCount {
                url: server.ws_url.clone(),
                agent_id: "churn-list-probe".into(),
            },
        )
        .await
    {
        Ok(Reply::ListCount { agents }) => Some(agents.saturating_sub(1) as f64),
        _ => None,
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = server.rss_kib().ok_or("cannot read RSS")?;
    // Allocators hand freed memory back after a while (jemalloc's decay): read again
    // 30 s after the churn ended (3 + 5 s above, 22 s here).
    tokio::time::sleep(Duration::from_secs(22)).await;
    let after_30s = server.rss_kib().ok_or("cannot read RSS")?;
    let stats = server.stats().await;
    let (p50, p99, _) = latency_ms(&mut lats);
    let mut row = vec![
        text("system", system.label()),
        num("rate/s", rate, 0),
        num("registered", opened as f64, 0),
        num("failed", failed as f64, 0),
        opt("reg p50 ms", p50, 2, "none"),
        opt("reg p99 ms", p99, 2, "none"),
    ];
    if samples > 0 {
        row.push(num("registry drift max", drift_max as f64, 0));
        row.push(num(
            "registry drift mean",
            drift_sum as f64 / samples as f64,
            1,
        ));
    } else {
        row.push(na("registry drift max", "no stats endpoint"));
    }
    row.push(opt(
        "registry after",
        if system == System::Floor {
            None
        } else {
            listed
        },
        0,
        if system == System::Floor {
            "no registry"
        } else {
            "list_agents failed"
        },
    ));
    if let Some(stats) = &stats {
        row.push(opt(
            "open sockets after",
            stats["connections"]["open_sockets"].as_f64(),
            0,
            "",
        ));
    }
    row.push(num("baseline MiB", base as f64 / 1024.0, 1));
    row.push(num("peak MiB", peak_rss as f64 / 1024.0, 1));
    row.push(num("RSS delta KiB", after as f64 - base as f64, 0));
    row.push(num("RSS delta 30 s KiB", after_30s as f64 - base as f64, 0));
    match tap {
        Some(tap) => {
            let (complete, incomplete, duplicated) = check_events(tap);
            row.push(num(
                "incarnations",
                (complete + incomplete + duplicated) as f64,
                0,
            ));
            row.push(num("missing end events", incomplete as f64, 0));
            row.push(num("duplicate end events", duplicated as f64, 0));
            row.push(text(
                "event stream",
                if tap.ended() { "cut off" } else { "intact" },
            ));
        }
        None => row.push(na("incarnations", "no lifecycle events")),
    }
    if !server_closed.is_empty() {
        row.push(text("closed by server", format!("{server_closed:?}")));
    }
    if closed + server_closed.values().sum::<u64>() != opened {
        row.push(num(
            "unaccounted sockets",
            opened.saturating_sub(closed + server_closed.values().sum::<u64>()) as f64,
            0,
        ));
    }
    if let Some(e) = errors.first() {
        row.push(text("first error", e.clone()));
    }
    Ok(row)
}

/// Counts incarnations with exactly one disconnected + cleaned_up, with some missing,
/// and with duplicates.
fn check_events(tap: &EventTap) -> (u64, u64, u64) {
    let mut per: HashMap<(String, u64), [u32; 3]> = HashMap::new();
    for e in tap.snapshot() {
        let slot = match e.kind.as_str() {
            "agent.registered" => 0,
            "agent.disconnected" => 1,
            "agent.cleaned_up" => 2,
            _ => continue,
        };
        if e.subject == "churn-list-probe" {
            continue;
        }
        per.entry((e.subject, e.incarnation)).or_default()[slot] += 1;
    }
    let (mut complete, mut incomplete, mut duplicated) = (0, 0, 0);
    for counts in per.values() {
        if counts[0] == 0 {
            continue;
        }
        if counts[1] == 1 && counts[2] == 1 {
            complete += 1;
        } else if counts[1] > 1 || counts[2] > 1 {
            duplicated += 1;
        } else {
            incomplete += 1;
        }
    }
    (complete, incomplete, duplicated)
}
