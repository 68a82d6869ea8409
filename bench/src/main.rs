//! `tether-bench`: the benchmark harness of issue 4. Each subcommand is one workload;
//! it starts every system it measures itself (Tether from the release binary, the
//! OpenAgents 0.5.1 network server from a virtualenv, the floor server from this
//! binary), drives them with client worker processes over loopback, and prints a
//! Markdown table of medians. `smoke` runs every workload in a tiny configuration.

#![warn(missing_docs)]
#![warn(clippy::all)]

mod client;
mod floor;
mod pool;
mod procfs;
mod smoke;
mod sse;
mod stats;
mod systems;
mod wire;
mod worker;
mod workloads;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use systems::{Env, System};
use workloads::Ctx;

/// Benchmarks Tether against the OpenAgents network server and a bare WebSocket floor.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by every workload.
#[derive(Args, Debug, Clone)]
pub(crate) struct Common {
    /// Systems measured side by side: any of tether, openagents, floor.
    #[arg(long, default_value = "tether,openagents,floor")]
    systems: String,
    /// Runs per configuration and system; tables show medians.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Also append the tables to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The Tether binary (default: `tether` next to this binary, else
    /// `../release/tether`).
    #[arg(long)]
    tether_bin: Option<PathBuf>,
    /// Virtualenv for openagents 0.5.1 (default: `.venv-bench` at the workspace root;
    /// created when missing).
    #[arg(long)]
    venv: Option<PathBuf>,
    /// Most sockets one client worker process holds.
    #[arg(long, default_value_t = 5000)]
    per_worker: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Idle fleet memory: server RSS per registered idle agent.
    IdleMemory {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: workloads::idle_memory::Args,
    },
    /// Bystanders under attack: direct-message latency while a hostile client attacks.
    Hostile {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: workloads::hostile::Args,
    },
    /// Close latency: time from a client's close frame to the server's FIN.
    CloseLatency {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: workloads::close_latency::Args,
    },
    /// Registration rate and connect-to-registered latency.
    RegistrationRate {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: workloads::registration::Args,
    },
    /// Heartbeat at scale: CPU, ping lag, false stale evictions.
    Heartbeat {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: workloads::heartbeat::Args,
    },
    /// Dead-agent detection time against the protocol bound.
    DeadDetection {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: workloads::dead_detection::Args,
    },
    /// Direct-message and broadcast routing.
    Routing {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: workloads::routing::Args,
    },
    /// Continuous connect/leave: registry accuracy, memory, lifecycle events.
    Churn {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: workloads::churn::Args,
    },
    /// Lifecycle events into Redis, Kafka and RabbitMQ.
    EventPublishing {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: workloads::event_publishing::Args,
    },
    /// Tether's broker publisher alone (no WebSockets): acknowledged events/s and
    /// drain after an outage, per broker.
    PublisherThroughput {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: workloads::publisher_throughput::Args,
    },
    /// Cluster (issue 12): agents held over several nodes sharing one Redis,
    /// cross-node direct messages, node loss, Redis commands per operation.
    Cluster {
        /// Runs; tables show medians (default 1: the workload is large).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Also append the tables to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The Tether binary (default: `tether` next to this binary).
        #[arg(long)]
        tether_bin: Option<PathBuf>,
        /// Most sockets one client worker process holds.
        #[arg(long, default_value_t = 5000)]
        per_worker: u64,
        #[command(flatten)]
        args: workloads::cluster::Args,
    },
    /// Instructions (issue 13): created/s and completed/s per storage backend (SQLite,
    /// PostgreSQL) with agents acknowledging at once, then create→ack latency at half that.
    Instructions {
        /// Runs per backend; tables show medians.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Also append the tables to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The Tether binary (default: `tether` next to this binary).
        #[arg(long)]
        tether_bin: Option<PathBuf>,
        #[command(flatten)]
        args: workloads::instructions::Args,
    },
    /// Every workload in a tiny configuration (Tether and floor), for CI. Exits
    /// non-zero if a workload could not run at all; never asserts speed.
    Smoke {
        /// Also append the tables to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The Tether binary.
        #[arg(long)]
        tether_bin: Option<PathBuf>,
    },
    /// The floor server: tokio-tungstenite accept, read, echo, hold.
    FloorServer {
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port (0 = any; the bound address is printed).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Runtime threads (default: one per core, like Tether's workers).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Ping each connection after this many seconds without a frame from it
        /// (0 = never; the heartbeat workload sets it to Tether's interval).
        #[arg(long, default_value_t = 0.0)]
        ping_interval: f64,
        /// Close a connection whose ping is unanswered this many seconds, with 4002.
        #[arg(long, default_value_t = 5.0)]
        ping_timeout: f64,
    },
    /// Internal: a load-generating process driven by the harness over stdin/stdout.
    #[command(hide = true)]
    ClientWorker {
        /// Worker index (selects its loopback source addresses).
        #[arg(long, default_value_t = 0)]
        index: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::FloorServer {
            host,
            port,
            threads,
            ping_interval,
            ping_timeout,
        } => {
            let threads = if threads == 0 {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
            } else {
                threads
            };
            let heartbeat = (ping_interval > 0.0).then(|| floor::Heartbeat {
                interval: Duration::from_secs_f64(ping_interval),
                ping_timeout: Duration::from_secs_f64(ping_timeout.max(0.001)),
            });
            floor::run(&host, port, threads, heartbeat)
        }
        Command::ClientWorker { index } => worker::run(index),
        other => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(harness(other))
        }
    }
}

/// The run context of `common`.
async fn context(common: &Common) -> Result<Ctx, String> {
    let systems = System::parse_list(&common.systems)?;
    let env = Env::prepare(
        common.tether_bin.as_deref(),
        common.venv.as_deref(),
        systems.contains(&System::OpenAgents),
        true,
    )
    .await?;
    Ok(Ctx {
        env,
        systems,
        repeat: common.repeat.max(1),
        per_worker: common.per_worker,
        out: common.out.clone(),
        failures: Default::default(),
    })
}

impl Common {
    /// The options of a workload that measures Tether alone (no OpenAgents venv).
    fn tether_only(
        repeat: usize,
        out: Option<PathBuf>,
        tether_bin: Option<PathBuf>,
        per_worker: u64,
    ) -> Self {
        Self {
            systems: "tether".into(),
            repeat,
            out,
            tether_bin,
            venv: None,
            per_worker,
        }
    }
}

/// Runs one workload's `run(&ctx, &args)` through [`one`].
macro_rules! workload {
    ($common:expr, $run:path, $args:expr) => {{
        let args = $args;
        one($common, |ctx| {
            Box::pin(async move { $run(&ctx, &args).await.map(|t| (ctx, t)) })
        })
        .await
    }};
}

async fn harness(command: Command) -> ExitCode {
    let result = match command {
        Command::IdleMemory { common, args } => {
            workload!(&common, workloads::idle_memory::run, args)
        }
        Command::Hostile { common, args } => workload!(&common, workloads::hostile::run, args),
        Command::CloseLatency { common, args } => {
            workload!(&common, workloads::close_latency::run, args)
        }
        Command::RegistrationRate { common, args } => {
            workload!(&common, workloads::registration::run, args)
        }
        Command::Heartbeat { common, args } => workload!(&common, workloads::heartbeat::run, args),
        Command::DeadDetection { common, args } => {
            workload!(&common, workloads::dead_detection::run, args)
        }
        Command::Routing { common, args } => workload!(&common, workloads::routing::run, args),
        Command::Churn { common, args } => workload!(&common, workloads::churn::run, args),
        Command::EventPublishing { common, args } => {
            workload!(&common, workloads::event_publishing::run, args)
        }
        Command::PublisherThroughput { common, args } => {
            workload!(&common, workloads::publisher_throughput::run, args)
        }
        Command::Cluster {
            repeat,
            out,
            tether_bin,
            per_worker,
            args,
        } => {
            let common = Common::tether_only(repeat, out, tether_bin, per_worker);
            workload!(&common, workloads::cluster::run, args)
        }
        Command::Instructions {
            repeat,
            out,
            tether_bin,
            args,
        } => {
            let common = Common::tether_only(repeat, out, tether_bin, 5000);
            workload!(&common, workloads::instructions::run, args)
        }
        Command::Smoke { out, tether_bin } => smoke::run(out, tether_bin).await,
        Command::FloorServer { .. } | Command::ClientWorker { .. } => unreachable!(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

type TablesFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(Ctx, Vec<stats::Table>), String>>>>;

/// Runs one workload and emits its tables.
async fn one(common: &Common, run: impl FnOnce(Ctx) -> TablesFuture) -> Result<(), String> {
    let ctx = context(common).await?;
    let (ctx, tables) = run(ctx).await?;
    for table in &tables {
        workloads::emit(&ctx, table);
    }
    let failures = ctx.failures.lock().unwrap();
    if !failures.is_empty() {
        eprintln!(
            "tether-bench: could not run at all: {}",
            failures.join("; ")
        );
    }
    Ok(())
}
