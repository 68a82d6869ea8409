//! The three phases of the cluster workload, each returning one table row:
//! [`hold`] (N agents spread over the nodes, heartbeat on, for a window),
//! [`route`] (paced cross-node direct messages) and [`loss`] (SIGKILL of a node and
//! the survivors' `node_lost` ends on their `GET /events` streams).

use super::nodes::{redis_calls, Nodes};
use super::Args;
use crate::pool::Pool;
use crate::sse::EventTap;
use crate::stats::{latency_ms, now_us, Row};
use crate::wire::{Cmd, Reply};
use crate::workloads::{num, opt, text, workers_for, FleetReport, Held};
use std::time::{Duration, Instant};

/// Worker index of the routing pool (its own loopback source addresses).
const ROUTE_WORKER_INDEX: u32 = 200;

/// Registers `agents` agents `{prefix}N` over `urls`: node k gets an even share
/// (agents k, k+K, … in count), split over its own workers of ≤ `per_worker`
/// sockets each. Returns the pool (holding the sockets) and the merged result.
pub async fn spread(
    urls: &[String],
    agents: u64,
    per_worker: u64,
    dialers: usize,
    prefix: &str,
    first_index: u32,
) -> Result<(Pool, Held), String> {
    let k = urls.len() as u64;
    // (url, start, count) per worker; ids are numbered node by node.
    let mut jobs = Vec::new();
    let mut start = 0;
    for (node, url) in urls.iter().enumerate() {
        let share = agents / k + u64::from((node as u64) < agents % k);
        let workers = workers_for(share, per_worker) as u64;
        for w in 0..workers {
            let count = share / workers + u64::from(w < share % workers);
            jobs.push((url.clone(), start, count));
            start += count;
        }
    }
    let pool = Pool::spawn(jobs.len(), first_index).await?;
    let per_dialers = (dialers / jobs.len()).max(2);
    let replies = pool
        .all(|i| {
            let (url, start, count) = jobs[i].clone();
            Cmd::Hold {
                url,
                prefix: prefix.to_owned(),
                start,
                count,
                dialers: per_dialers,
                timeout_s: 120.0,
            }
        })
        .await;
    let replies = match replies {
        Ok(r) => r,
        Err(e) => {
            pool.shutdown().await;
            return Err(e);
        }
    };
    let held = Held::from_replies(replies);
    Ok((pool, held))
}

/// Hold: registers the fleet, waits a ping interval, then watches it for the window.
/// The pool is left holding the fleet.
pub async fn hold(args: &Args, nodes: &Nodes, per_worker: u64) -> Result<(Pool, Row), String> {
    let calls0 = redis_calls(&args.redis).await?;
    let (pool, mut held) = spread(
        &nodes.ws_urls(),
        args.agents,
        per_worker,
        args.dialers,
        "cl-",
        0,
    )
    .await?;
    let calls1 = redis_calls(&args.redis).await?;
    let workers = pool.len();
    let mut row = vec![
        num("nodes", nodes.servers.len() as f64, 0),
        num("agents", args.agents as f64, 0),
        num("client processes", workers as f64, 0),
        num("registered", held.ok as f64, 0),
        num("registrations/s", held.ok as f64 / held.wall_s.max(1e-9), 0),
    ];
    let (p50, p99, _) = latency_ms(&mut held.lat_us);
    row.push(opt("reg p50 ms", p50, 2, "none"));
    row.push(opt("reg p99 ms", p99, 2, "none"));
    row.push(opt(
        "Redis cmds/registration",
        (held.ok > 0).then(|| calls1.saturating_sub(calls0) as f64 / held.ok as f64),
        2,
        "none registered",
    ));
    held.note_failures(&mut row);
    if let Some(per_node) = nodes.agents_per_node().await {
        let (min, max) = (
            per_node.iter().min().copied().unwrap_or(0),
            per_node.iter().max().copied().unwrap_or(0),
        );
        row.push(text("agents per node (min–max)", format!("{min}–{max}")));
    }
    // Every agent reaches its first ping before the window opens.
    tokio::time::sleep(Duration::from_secs_f64(args.interval + 2.0)).await;
    let _ = pool.all(|_| Cmd::Report).await?;
    let stale0 = nodes.stale_declared().await;
    let calls2 = redis_calls(&args.redis).await?;
    let cpu0 = nodes.cpu_secs();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.window)).await;
    let seconds = t0.elapsed().as_secs_f64();
    let cpu1 = nodes.cpu_secs();
    let calls3 = redis_calls(&args.redis).await?;
    let reports = pool.all(|_| Cmd::Report).await?;
    let stale1 = nodes.stale_declared().await;
    let FleetReport {
        open,
        pings,
        mut lags,
        stale_closes,
        other_closes,
    } = FleetReport::from_replies(reports);
    row.push(num("open at end", open as f64, 0));
    row.push(num("lost", held.ok.saturating_sub(open) as f64, 0));
    row.push(num("false stale (4002)", stale_closes as f64, 0));
    if let (Some(a), Some(b)) = (stale0, stale1) {
        row.push(num("stale_declared (nodes)", b.saturating_sub(a) as f64, 0));
    }
    if other_closes > 0 {
        row.push(num("other closes", other_closes as f64, 0));
    }
    row.push(num("pings/s", pings as f64 / seconds, 0));
    let (lag50, lag99, _) = latency_ms(&mut lags);
    row.push(opt("ping lag p99 ms", lag99, 1, "no pings"));
    let _ = lag50;
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        row.push(num("nodes CPU share", (b - a) / seconds, 2));
    }
    row.push(opt(
        "nodes RSS MiB (sum)",
        nodes.rss_kib().map(|k| k as f64 / 1024.0),
        0,
        "unreadable",
    ));
    row.push(num(
        "Redis cmds/s held",
        calls3.saturating_sub(calls2) as f64 / seconds,
        0,
    ));
    Ok((pool, row))
}

fn routed(reply: Reply) -> Result<(u64, f64, Vec<u32>, Option<u64>), String> {
    match reply {
        Reply::Routed {
            received,
            seconds,
            lat_us,
            lost,
            ..
        } => Ok((received, seconds, lat_us, lost)),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

/// Cross-node direct messages: `pairs` pairs, `ra-i` on node i mod K and `rb-i` on
/// node i+1 mod K; the `ra-*` agents send `rate` messages per second in total.
pub async fn route(args: &Args, nodes: &Nodes) -> Result<Row, String> {
    let pool = Pool::spawn(1, ROUTE_WORKER_INDEX).await?;
    let result = route_in(args, nodes, &pool).await;
    let _ = pool.request(0, Cmd::RouteTeardown).await;
    pool.shutdown().await;
    result
}

async fn route_in(args: &Args, nodes: &Nodes, pool: &Pool) -> Result<Row, String> {
    let urls = nodes.ws_urls();
    let ready = pool
        .request(
            0,
            Cmd::RouteSetup {
                url: urls[0].clone(),
                pairs: args.pairs,
                echo: false,
                urls,
            },
        )
        .await?;
    if let Reply::RouteReady { ok, failed, errors } = &ready {
        if *failed > 0 {
            return Err(format!(
                "{failed} of {} routing agents failed to register: {}",
                ok + failed,
                errors.first().map(String::as_str).unwrap_or("")
            ));
        }
    }
    // Background Redis traffic (leases, other users of the Redis) with the pairs idle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_s = 5.0;
    let b0 = redis_calls(&args.redis).await?;
    tokio::time::sleep(Duration::from_secs_f64(idle_s)).await;
    let b1 = redis_calls(&args.redis).await?;
    let background = b1.saturating_sub(b0) as f64 / idle_s;
    let c0 = redis_calls(&args.redis).await?;
    let t0 = Instant::now();
    let reply = pool
        .request(
            0,
            Cmd::RouteOpen {
                rate: args.rate,
                warmup_s: args.warmup,
                duration_s: args.duration,
            },
        )
        .await?;
    let elapsed = t0.elapsed().as_secs_f64();
    let c1 = redis_calls(&args.redis).await?;
    let (received, seconds, mut lat_us, lost) = routed(reply)?;
    let (p50, p99, max) = latency_ms(&mut lat_us);
    // The senders are paced: rate × (warm-up + window) messages went out.
    let sent = args.rate * (args.warmup + args.duration);
    let delta = c1.saturating_sub(c0) as f64;
    Ok(vec![
        num("nodes", nodes.servers.len() as f64, 0),
        num("pairs", args.pairs as f64, 0),
        num("target msg/s", args.rate, 0),
        num("achieved msg/s", received as f64 / seconds, 0),
        opt("p50 ms", p50, 3, "none"),
        opt("p99 ms", p99, 3, "none"),
        opt("max ms", max, 1, "none"),
        num("lost", lost.unwrap_or(0) as f64, 0),
        num("Redis cmds/msg (raw)", delta / sent, 2),
        num(
            "Redis cmds/msg (− idle rate)",
            (delta - background * elapsed).max(0.0) / sent,
            2,
        ),
        num("Redis idle cmds/s", background, 0),
    ])
}

/// Node loss: `loss_agents` agents on the last node of a `loss_nodes` cluster with a
/// `loss_lease` s lease; SIGKILL; time until the survivors published the last
/// `agent.cleaned_up` of them.
pub async fn loss(args: &Args, nodes: &Nodes, per_worker: u64) -> Result<Row, String> {
    let victim = nodes.servers.last().ok_or("no nodes")?;
    let survivors = &nodes.servers[..nodes.servers.len() - 1];
    let mut taps = Vec::new();
    for server in survivors {
        let http = server.http_url.as_deref().ok_or("no HTTP URL")?;
        taps.push(EventTap::start(http).await?);
    }
    let (pool, held) = spread(
        std::slice::from_ref(&victim.ws_url),
        args.loss_agents,
        per_worker,
        args.dialers,
        "lost-",
        100,
    )
    .await?;
    let result = watch_loss(args, victim.pid, &taps, &held).await;
    crate::workloads::release(&pool).await;
    pool.shutdown().await;
    for tap in taps {
        tap.stop();
    }
    result
}

async fn watch_loss(
    args: &Args,
    victim_pid: u32,
    taps: &[EventTap],
    held: &Held,
) -> Result<Row, String> {
    if held.ok == 0 {
        return Err(format!(
            "no agent registered on the victim: {}",
            held.errors.first().cloned().unwrap_or_default()
        ));
    }
    // Let the victim renew its lease once with the fleet held.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_us = now_us();
    crate::procfs::signal(victim_pid, "KILL");
    let deadline = Instant::now() + Duration::from_secs_f64(args.loss_lease + 60.0);
    let lost_ends = |kind: &str| -> Vec<u64> {
        taps.iter()
            .flat_map(|t| t.snapshot())
            .filter(|e| e.kind == kind && e.subject.starts_with("lost-"))
            .filter(|e| kind != "agent.disconnected" || e.reason.as_deref() == Some("node_lost"))
            .map(|e| e.at_us)
            .collect()
    };
    loop {
        if lost_ends("agent.cleaned_up").len() as u64 >= held.ok || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Anything still on its way (more than one survivor, duplicates) gets a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let disconnected = lost_ends("agent.disconnected");
    let cleaned = lost_ends("agent.cleaned_up");
    let since = |at: Option<&u64>| at.map(|at| at.saturating_sub(killed_us) as f64 / 1e6);
    let last = since(cleaned.iter().max());
    let target = args.loss_lease + 2.0;
    let mut row = vec![
        num("nodes", (taps.len() + 1) as f64, 0),
        num("lease s", args.loss_lease, 1),
        num("agents on killed node", held.ok as f64, 0),
        num("disconnected node_lost", disconnected.len() as f64, 0),
        num("cleaned_up", cleaned.len() as f64, 0),
        opt(
            "first node_lost s",
            since(disconnected.iter().min()),
            2,
            "none",
        ),
        opt("last cleaned_up s", last, 2, "none seen"),
        num("target s", target, 1),
        text(
            "met",
            match last {
                Some(l) if cleaned.len() as u64 >= held.ok && l <= target => "yes".to_owned(),
                Some(l) if cleaned.len() as u64 >= held.ok => format!("no (+{:.2} s)", l - target),
                _ => format!("no ({} of {} cleaned up)", cleaned.len(), held.ok),
            },
        ),
    ];
    held.note_failures(&mut row);
    if taps.iter().any(EventTap::ended) {
        row.push(text("SSE", "a survivor ended the /events stream"));
    }
    Ok(row)
}
