//! Cluster (issue 12): Tether nodes coordinating through one Redis. Three tables:
//!
//! - **hold**: N agents registered over K nodes (an even share each) with the
//!   heartbeat on, watched for a window: lost sockets, false stale evictions,
//!   cluster-wide registrations/s, the nodes' summed RSS, Redis commands per
//!   registration;
//! - **cross-node direct**: paced direct messages between pairs whose ends sit on
//!   different nodes (same cluster, after the fleet is released): p50/p99, Redis
//!   commands per message;
//! - **node loss**: a separate, smaller cluster with a short lease; the node holding
//!   the agents is killed with SIGKILL and the survivors' `GET /events` streams are
//!   read until the last `agent.cleaned_up` of its agents.
//!
//! [`nodes`] starts the cluster and reads Redis; [`phases`] runs each phase.

mod nodes;
mod phases;

use super::{finish, text, Ctx};
use crate::stats::{merge_repeats, Cell, Row, Table};
use crate::systems::TetherVars;
use nodes::Nodes;
use std::time::Duration;

/// Options of `cluster`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Agents held over the cluster (a node holds at most ~19 900: its open-file limit).
    #[arg(long, default_value_t = 100_000)]
    pub agents: u64,
    /// Nodes of the hold and routing cluster.
    #[arg(long, default_value_t = 6)]
    pub nodes: usize,
    /// Seconds the held fleet is watched (after one ping interval).
    #[arg(long, default_value_t = 30.0)]
    pub window: f64,
    /// `heartbeat.interval`, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub interval: f64,
    /// `heartbeat.ping_timeout`, seconds.
    #[arg(long, default_value_t = 2.5)]
    pub ping_timeout: f64,
    /// `cluster.node_lease` of the hold and routing cluster, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub lease: f64,
    /// Concurrent dialers, all client processes together (at least 2 per process).
    #[arg(long, default_value_t = 96)]
    pub dialers: usize,
    /// Cross-node pairs.
    #[arg(long, default_value_t = 1000)]
    pub pairs: u64,
    /// Cross-node direct messages per second, all pairs together.
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// Seconds recorded at that rate.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of warm-up before recording.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Agents on the node that is killed.
    #[arg(long, default_value_t = 16_000)]
    pub loss_agents: u64,
    /// Nodes of the node-loss cluster (the last one is killed).
    #[arg(long, default_value_t = 2)]
    pub loss_nodes: usize,
    /// `cluster.node_lease` of the node-loss cluster, seconds.
    #[arg(long, default_value_t = 4.0)]
    pub loss_lease: f64,
    /// Phases run: any of hold, route, loss.
    #[arg(long, value_delimiter = ',', default_value = "hold,route,loss")]
    pub phases: Vec<String>,
    /// The Redis every node shares (host:port), or the masters of a Redis Cluster
    /// (host:port,host:port,...: its seeds, and where commands are counted).
    #[arg(long, default_value = "127.0.0.1:6379")]
    pub redis: String,
}

impl Args {
    fn runs(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }
}

/// Rows of one phase over the repeats.
#[derive(Default)]
struct Runs {
    rows: Vec<Row>,
    errors: Vec<String>,
}

impl Runs {
    fn push(&mut self, result: Result<Row, String>, phase: &str) {
        match result {
            Ok(row) => self.rows.push(row),
            Err(e) => {
                eprintln!("tether-bench cluster: {phase} failed: {e}");
                self.errors.push(e);
            }
        }
    }

    /// The merged row, or an n/a row; records a failure when no run succeeded.
    fn table(self, ctx: &Ctx, title: String, notes: Vec<String>) -> (Table, bool) {
        let mut table = Table::new(title);
        let ok = !self.rows.is_empty();
        let mut row = if ok {
            let mut row = vec![text("system", "Tether cluster")];
            row.extend(merge_repeats(&self.rows));
            row.push(("runs".into(), Cell::Num(self.rows.len() as f64, 0)));
            row
        } else {
            let first = self.errors.first().cloned().unwrap_or_default();
            ctx.failures
                .lock()
                .unwrap()
                .push(format!("cluster: {first}"));
            vec![
                text("system", "Tether cluster"),
                ("result".into(), Cell::Na(format!("could not run: {first}"))),
            ]
        };
        if ok && !self.errors.is_empty() {
            row.push(text(
                "failed runs",
                format!("{} ({})", self.errors.len(), self.errors[0]),
            ));
        }
        table.rows.push(row);
        table.notes = notes;
        finish(ctx, &mut table);
        (table, ok)
    }
}

/// Runs the workload and returns its tables; `Err` when no phase could run at all.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<Vec<Table>, String> {
    let (mut held, mut routed, mut lost) = (Runs::default(), Runs::default(), Runs::default());
    for rep in 0..ctx.repeat {
        eprintln!("tether-bench cluster: run {}/{}", rep + 1, ctx.repeat);
        if args.runs("hold") || args.runs("route") {
            match big_cluster(ctx, args).await {
                Ok((h, r)) => {
                    if let Some(h) = h {
                        held.push(h, "hold");
                    }
                    if let Some(r) = r {
                        routed.push(r, "route");
                    }
                }
                Err(e) => {
                    held.push(Err(e.clone()), "hold");
                    routed.push(Err(e), "route");
                }
            }
        }
        if args.runs("loss") {
            lost.push(loss_cluster(ctx, args).await, "loss");
        }
    }
    let shared_redis = format!(
        "Redis commands: sum of `calls` in `INFO commandstats` of the Redis at {} before and after the phase; that Redis is shared with other users of the machine and counts server-wide, so the deltas were taken only across this workload's own phase and include whatever else ran meanwhile.",
        args.redis
    );
    let repeats = format!(
        "{} run(s), medians; the default is 1 run (`--repeat`) given the size of the workload.",
        ctx.repeat
    );
    let mut tables = Vec::new();
    let mut any_ok = false;
    if args.runs("hold") {
        let (t, ok) = held.table(
            ctx,
            format!(
                "Cluster: {} agents held over {} nodes (heartbeat {} s / {} s, {} s window)",
                args.agents, args.nodes, args.interval, args.ping_timeout, args.window
            ),
            vec![
                format!(
                    "Each node gets an even share of the agents (ids numbered node by node), dialed by client processes of at most {} sockets each, {} dialers in all; every node on its own port, one Redis, a fresh key prefix per run, lease {} s. Registrations/s = registered / (last answer − first dial), cluster-wide. Redis cmds/registration = Redis commands during the registration phase / agents registered (lease renewals included). Lost = held sockets closed during the whole hold; false stale = 4002 closes seen by the clients; stale_declared = the nodes' own /stats counter over the window. The window opens one ping interval after the last registration. RSS: the nodes' VmRSS summed at the end of the window.",
                    ctx.per_worker, args.dialers, args.lease
                ),
                shared_redis.clone(),
                repeats.clone(),
            ],
        );
        any_ok |= ok;
        tables.push(t);
    }
    if args.runs("route") {
        let (t, ok) = routed.table(
            ctx,
            format!(
                "Cluster: cross-node direct messages at {:.0} msg/s over {} nodes",
                args.rate, args.nodes
            ),
            vec![
                format!(
                    "{} pairs in one client process; `ra-i` sits on node i mod {n}, `rb-i` on node (i+1) mod {n}: every message crosses nodes (Redis pub/sub). Open loop: the `ra-*` agents send at a fixed total rate, latency = receipt − send time written in the message (one clock), {} s warm-up, {} s recorded. Run on the hold cluster after its fleet was closed. Redis cmds/msg = Redis commands across the paced phase (warm-up, window and the 1 s tail) / messages sent (rate × (warm-up + window)); the second column first subtracts the command rate measured for 5 s with the pairs idle just before.",
                    args.pairs, args.warmup, args.duration, n = args.nodes
                ),
                shared_redis,
                repeats.clone(),
            ],
        );
        any_ok |= ok;
        tables.push(t);
    }
    if args.runs("loss") {
        let (t, ok) = lost.table(
            ctx,
            format!(
                "Cluster: node loss ({} agents on the killed node, lease {} s)",
                args.loss_agents, args.loss_lease
            ),
            vec![
                format!(
                    "A separate {}-node cluster (lease {} s, default heartbeat); every agent is on the last node, which is killed with SIGKILL one second after the last registration. The survivors' `GET /events` streams are read; times are from the kill to the first `agent.disconnected` with `data.reason` `node_lost` and to the last `agent.cleaned_up` of the killed node's agents, as the harness read them. Target: lease + 2 s.",
                    args.loss_nodes, args.loss_lease
                ),
                repeats,
            ],
        );
        any_ok |= ok;
        tables.push(t);
    }
    if any_ok {
        Ok(tables)
    } else {
        Err("cluster: no phase succeeded".into())
    }
}

type PhaseRow = Option<Result<Row, String>>;

/// The hold and routing cluster: hold, release, route.
async fn big_cluster(ctx: &Ctx, args: &Args) -> Result<(PhaseRow, PhaseRow), String> {
    let vars = TetherVars::default()
        .set("HEARTBEAT__INTERVAL", args.interval)
        .set("HEARTBEAT__PING_TIMEOUT", args.ping_timeout);
    let nodes = Nodes::start(&ctx.env, args.nodes, &args.redis, args.lease, &vars, "hold").await?;
    let mut held = None;
    if args.runs("hold") {
        match phases::hold(args, &nodes, ctx.per_worker).await {
            Ok((pool, row)) => {
                held = Some(Ok(row));
                super::release(&pool).await;
                pool.shutdown().await;
                // Let the nodes finish the fleet's ends before routing.
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Err(e) => held = Some(Err(e)),
        }
    }
    let routed = if args.runs("route") {
        Some(phases::route(args, &nodes).await)
    } else {
        None
    };
    nodes.stop().await;
    Ok((held, routed))
}

/// The node-loss cluster.
async fn loss_cluster(ctx: &Ctx, args: &Args) -> Result<Row, String> {
    if args.loss_nodes < 2 {
        return Err("--loss-nodes must be at least 2".into());
    }
    let nodes = Nodes::start(
        &ctx.env,
        args.loss_nodes,
        &args.redis,
        args.loss_lease,
        &TetherVars::default(),
        "loss",
    )
    .await?;
    let result = phases::loss(args, &nodes, ctx.per_worker).await;
    nodes.stop().await;
    result
}
