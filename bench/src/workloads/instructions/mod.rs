//! Instructions (issue 13): durable work for agents, measured per storage backend
//! (SQLite, PostgreSQL). For each backend a fresh Tether is started on a fresh
//! database, `--agents` agents that take instructions (`"instructions"` among their
//! capabilities) register and acknowledge every instruction `done` the moment it
//! arrives, and two phases run:
//!
//! - **throughput**: `--concurrency` HTTP requests in flight create instructions
//!   (`POST /agents/{id}/instructions`, agents taken round-robin) for `--duration`
//!   seconds; created/s = `201` answers received in the window, completed/s =
//!   acknowledgements the agents sent in the window. After the backlog drains, a
//!   random sample of the acknowledged ids is read back with `GET /instructions/{id}`
//!   to check that they reached `done`;
//! - **latency**: open loop at half the completed/s just measured (or `--rate`),
//!   `--warmup` seconds, then `--duration` seconds recorded: latency = the agent's
//!   ack send time − the time just before the `POST` was sent (written into the
//!   payload; one clock, one process); lost = created in the recorded window but not
//!   received by an agent within 5 s after it.
//!
//! The agents live in this process (tokio-tungstenite, one task each), on the same
//! runtime as the HTTP load.
//!
//! [`storage`] creates and drops the database per backend; [`fleet`] holds the agents;
//! [`phases`] runs the throughput and latency phases.

mod fleet;
mod phases;
mod storage;

use super::{finish, num, text, Ctx};
use crate::stats::{merge_repeats, Cell, Row, Table};
use crate::systems::{start_tether_logging_to, Server, TetherVars};
use fleet::{Fleet, Seen};
use phases::{latency, throughput, LOST_AFTER_S};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use storage::Storage;

/// Options of `instructions`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Storage backends measured: any of sqlite, postgres.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    pub backends: Vec<String>,
    /// Online agents taking instructions.
    #[arg(long, default_value_t = 1000)]
    pub agents: u64,
    /// Seconds recorded per phase.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// HTTP create requests in flight in the throughput phase.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Instructions created per second in the latency phase (default: half the
    /// completed/s the throughput phase of the same run measured).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds of the latency phase before recording starts.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Acknowledged instructions read back with `GET /instructions/{id}`.
    #[arg(long, default_value_t = 100)]
    pub sample: usize,
    /// The PostgreSQL server; a database of its own is created per run (psql) and
    /// dropped after it.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pub postgres: String,
}

/// A storage backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn parse(name: &str) -> Result<Self, String> {
        match name.trim() {
            "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            other => Err(format!(
                "unknown backend `{other}` (expected sqlite or postgres)"
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Sqlite => "Tether, SQLite",
            Self::Postgres => "Tether, PostgreSQL",
        }
    }

    /// The throughput target, instructions per second.
    fn target(self) -> f64 {
        match self {
            Self::Sqlite => 2000.0,
            Self::Postgres => 5000.0,
        }
    }
}

/// Per backend: the throughput rows, the latency rows, the errors of its runs.
type BackendRuns = (Backend, Vec<Row>, Vec<Row>, Vec<String>);

/// The p99 target at half the rate, milliseconds.
const P99_TARGET_MS: f64 = 20.0;

/// Runs the workload and returns its two tables; `Err` when no run succeeded.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<Vec<Table>, String> {
    let backends: Vec<Backend> = args
        .backends
        .iter()
        .filter(|b| !b.trim().is_empty())
        .map(|b| Backend::parse(b))
        .collect::<Result<_, _>>()?;
    if backends.is_empty() {
        return Err("--backends names no backend".into());
    }
    if args.agents == 0 {
        return Err("--agents must be at least 1".into());
    }
    let mut runs: Vec<BackendRuns> = backends
        .iter()
        .map(|b| (*b, Vec::new(), Vec::new(), Vec::new()))
        .collect();
    for rep in 0..ctx.repeat {
        for (backend, tput, lat, errors) in runs.iter_mut() {
            eprintln!(
                "tether-bench instructions: {} run {}/{}",
                backend.name(),
                rep + 1,
                ctx.repeat
            );
            match once(ctx, args, *backend).await {
                Ok((t, l)) => {
                    tput.push(t);
                    lat.push(l);
                }
                Err(e) => {
                    eprintln!("tether-bench instructions: {} failed: {e}", backend.name());
                    errors.push(e);
                }
            }
        }
    }
    let mut tput_table = Table::new(format!(
        "Instructions: throughput, {} agents, {} creates in flight, {} s",
        args.agents, args.concurrency, args.duration
    ));
    let rate_words = match args.rate {
        Some(rate) => format!("{rate} instructions/s"),
        None => "half the completed/s of the same run".to_owned(),
    };
    let mut lat_table = Table::new(format!(
        "Instructions: create→ack latency, open loop at {rate_words}"
    ));
    let mut any_ok = false;
    for (backend, tput, lat, errors) in runs {
        if tput.is_empty() {
            let first = errors.first().cloned().unwrap_or_else(|| "?".into());
            ctx.failures
                .lock()
                .unwrap()
                .push(format!("instructions: {}: {first}", backend.name()));
            for table in [&mut tput_table, &mut lat_table] {
                table.rows.push(vec![
                    text("system", backend.label()),
                    ("result".into(), Cell::Na(format!("could not run: {first}"))),
                ]);
            }
            continue;
        }
        any_ok = true;
        let failed = (!errors.is_empty()).then(|| format!("{} ({})", errors.len(), errors[0]));
        let runs = tput.len();

        let mut row = vec![text("system", backend.label())];
        row.extend(merge_repeats(&tput));
        let completed = super::value_of(&row, "completed/s").unwrap_or(0.0);
        row.push(num("target /s", backend.target(), 0));
        row.push(text(
            "met",
            if completed >= backend.target() {
                "met".to_owned()
            } else {
                format!("missed ({:.2}×)", completed / backend.target())
            },
        ));
        if let Some(failed) = &failed {
            row.push(text("failed runs", failed.clone()));
        }
        row.push(num("runs", runs as f64, 0));
        tput_table.rows.push(row);

        let mut row = vec![text("system", backend.label())];
        row.extend(merge_repeats(&lat));
        let p99 = super::value_of(&row, "p99 ms");
        let lost = super::value_of(&row, "lost").unwrap_or(0.0);
        row.push(num("target p99 ms", P99_TARGET_MS, 0));
        row.push(text(
            "met",
            match p99 {
                Some(p99) if p99 < P99_TARGET_MS && lost == 0.0 => "met".to_owned(),
                Some(p99) if p99 < P99_TARGET_MS => format!("met, but {lost:.0} lost"),
                Some(p99) => format!("missed ({:.1}×)", p99 / P99_TARGET_MS),
                None => "missed (no sample)".to_owned(),
            },
        ));
        if let Some(failed) = failed {
            row.push(text("failed runs", failed));
        }
        row.push(num("runs", runs as f64, 0));
        lat_table.rows.push(row);
    }
    tput_table.notes.push(format!(
        "Per backend a fresh Tether (release binary, default configuration: storage.max_connections 8, heartbeat 30 s, the `log` event publisher on) on a fresh database: SQLite, a new file in the bench work directory; PostgreSQL, a new database on {} created with psql and dropped after the run (same machine, same 2 cores). {} agents registered with `\"capabilities\":[\"instructions\"]` in this process (one tokio-tungstenite task each), each acknowledging every instruction `done` as soon as it arrives (and answering pings). Throughput: {} tasks each send `POST /agents/bi-N/instructions` (agent N = request number mod {}; ttl 300, max_attempts 3, ack_timeout 30) one after another for {} s; created/s = `201` answers in the window / window; completed/s = acknowledgements the agents sent in the window / window (the target is read against completed/s); backlog = created in the window − acknowledged in it; drain s = from the window's end until every created instruction was acknowledged. Sample done = of {} acknowledged ids picked at random, those `GET /instructions/{{id}}` showed `done` 2 s after the drain. Server CPU share = the Tether process's CPU seconds over the window / window (PostgreSQL's own processes not counted).",
        args.postgres, args.agents, args.concurrency, args.agents, args.duration, args.sample
    ));
    lat_table.notes.push(format!(
        "Open loop on a schedule ({rate_words}): one task per request, started at its scheduled time, on the server of the throughput phase once its backlog drained. Latency = the agent's clock when it sends the `instruction_ack` − the clock just before the `POST` was sent (written into the payload as `sent_at_us`), so it includes the HTTP create, the store, the delivery and the agent's parse. {} s warm-up, then {} s recorded; POST p99 = send to `201` answer. Lost = created (`201`) in the recorded window but not received by any agent {LOST_AFTER_S} s after the window (anything slower than that counts as lost, not as latency). Target from the issue: p99 < {P99_TARGET_MS} ms at half the throughput.",
        args.warmup, args.duration
    ));
    for table in [&mut tput_table, &mut lat_table] {
        table.notes.push(format!(
            "{} run(s) per backend, backends interleaved within each repeat; medians.",
            ctx.repeat
        ));
        finish(ctx, table);
    }
    if any_ok {
        Ok(vec![tput_table, lat_table])
    } else {
        Err("instructions: no run succeeded".into())
    }
}

/// One run on `backend`: storage, server, fleet, both phases; the throughput row and
/// the latency row.
async fn once(ctx: &Ctx, args: &Args, backend: Backend) -> Result<(Row, Row), String> {
    let storage = Storage::create(ctx, args, backend).await?;
    let vars = TetherVars::default().set("STORAGE__URL", &storage.url);
    let result = match start_tether_logging_to(
        &ctx.env,
        &vars,
        &format!("tether-instructions-{}.log", backend.name()),
    )
    .await
    {
        Ok(server) => {
            let result = on_server(args, &server).await;
            server.stop().await;
            result
        }
        Err(e) => Err(e),
    };
    storage.drop_it(args).await;
    result
}

/// Both phases on a running server.
async fn on_server(args: &Args, server: &Server) -> Result<(Row, Row), String> {
    let http = server.http_url.clone().ok_or("no HTTP URL")?;
    let seen = Arc::new(Seen::default());
    let fleet = Fleet::open(&server.ws_url, args.agents, seen.clone()).await?;
    let http_client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let result = async {
        let (tput, completed_per_s) = throughput(args, server, &http, &http_client, &seen).await?;
        let rate = args.rate.unwrap_or(completed_per_s / 2.0);
        if rate.is_nan() || rate < 1.0 {
            return Err(format!(
                "latency phase: rate {rate:.1}/s is too low (completed/s {completed_per_s:.1})"
            ));
        }
        let lat = latency(args, rate, &http, &http_client, &seen).await?;
        Ok((tput, lat))
    }
    .await;
    fleet.close().await;
    let mut result = result?;
    result.1.push(num(
        "pings answered",
        seen.pings.load(Ordering::Relaxed) as f64,
        0,
    ));
    // What went wrong on the agents' side, if anything: how often, and the first one.
    let troubles = [
        ("agent sockets ended", &seen.dropped, &seen.first_drop),
        ("error frames to agents", &seen.errors, &seen.first_error),
    ];
    for (what, count, first) in troubles {
        let count = count.load(Ordering::Relaxed);
        if count > 0 {
            let first = first.lock().unwrap().clone().unwrap_or_default();
            for row in [&mut result.0, &mut result.1] {
                row.push(text(what, format!("{count} ({first})")));
            }
        }
    }
    Ok(result)
}
