//! The workloads of issue 4 and what they share: the run context, the repeat loop
//! (every system once per repeat, interleaved, then medians), fleet helpers and the
//! machine description printed under every table.

pub mod churn;
pub mod close_latency;
pub mod cluster;
pub mod dead_detection;
pub mod event_publishing;
pub mod heartbeat;
pub mod hostile;
pub mod idle_memory;
pub mod instructions;
pub mod publisher_throughput;
pub mod registration;
pub mod routing;

use crate::pool::Pool;
use crate::stats::{merge_repeats, Cell, Row, Table};
use crate::systems::{Env, System};
use crate::wire::{Cmd, Reply};
use std::future::Future;
use std::path::PathBuf;

/// What every workload needs.
pub struct Ctx {
    /// Where the systems come from.
    pub env: Env,
    /// Systems measured, in table order.
    pub systems: Vec<System>,
    /// Runs per configuration; tables show medians.
    pub repeat: usize,
    /// Most sockets one client worker holds.
    pub per_worker: u64,
    /// File the tables are appended to.
    pub out: Option<PathBuf>,
    /// Systems that could not run a workload at all (`workload: system: error`).
    pub failures: std::sync::Mutex<Vec<String>>,
}

/// Where the brokers of the event workloads listen.
#[derive(clap::Args, Debug, Clone)]
pub struct BrokerAddrs {
    /// Redis address.
    #[arg(long, default_value = "127.0.0.1:6379")]
    pub redis: String,
    /// Kafka bootstrap address.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub kafka: String,
    /// RabbitMQ address.
    #[arg(long, default_value = "127.0.0.1:5672")]
    pub rabbitmq: String,
}

impl Default for BrokerAddrs {
    fn default() -> Self {
        Self {
            redis: "127.0.0.1:6379".into(),
            kafka: "127.0.0.1:9092".into(),
            rabbitmq: "127.0.0.1:5672".into(),
        }
    }
}

impl BrokerAddrs {
    /// The address of `broker` (`redis`, `kafka` or `rabbitmq`).
    pub fn addr(&self, broker: &str) -> &str {
        match broker {
            "redis" => &self.redis,
            "kafka" => &self.kafka,
            _ => &self.rabbitmq,
        }
    }
}

/// Workers needed for `agents` sockets.
pub fn workers_for(agents: u64, per_worker: u64) -> usize {
    agents.div_ceil(per_worker.max(1)).max(1) as usize
}

/// A fleet registered by [`hold`].
#[derive(Debug, Default)]
pub struct Held {
    /// Agents registered.
    pub ok: u64,
    /// Agents that failed.
    pub failed: u64,
    /// First errors.
    pub errors: Vec<String>,
    /// Registration latencies, µs.
    pub lat_us: Vec<u32>,
    /// Seconds from the first dial to the last answer.
    pub wall_s: f64,
}

/// The workers' `Report` replies on a held fleet, added up.
#[derive(Debug, Default)]
pub struct FleetReport {
    /// Sockets still open.
    pub open: u64,
    /// Server pings answered.
    pub pings: u64,
    /// Ping lags (send stamp to receipt), µs.
    pub lags: Vec<u32>,
    /// Sockets the server closed 4002 (stale).
    pub stale_closes: u64,
    /// Sockets closed with any other code.
    pub other_closes: u64,
}

impl FleetReport {
    /// Adds up `replies` (other kinds of reply are ignored).
    pub fn from_replies(replies: Vec<Reply>) -> Self {
        let mut report = Self::default();
        for reply in replies {
            if let Reply::Report {
                open,
                pings,
                ping_lag_us,
                closes,
            } = reply
            {
                report.open += open;
                report.pings += pings;
                report.lags.extend(ping_lag_us);
                for (code, count) in closes {
                    if code == "4002" {
                        report.stale_closes += count;
                    } else {
                        report.other_closes += count;
                    }
                }
            }
        }
        report
    }
}

impl Held {
    /// Adds a `failed` column (count and first error) to `row` when agents failed.
    pub fn note_failures(&self, row: &mut Row) {
        if self.failed > 0 {
            row.push(text(
                "failed",
                format!(
                    "{} ({})",
                    self.failed,
                    self.errors.first().map(String::as_str).unwrap_or("")
                ),
            ));
        }
    }
}

/// Registers `agents` agents `{prefix}N` spread over the pool's workers with
/// `dialers` concurrent dialers in total, and leaves them held.
pub async fn hold(
    pool: &Pool,
    url: &str,
    prefix: &str,
    agents: u64,
    dialers: usize,
    timeout_s: f64,
) -> Result<Held, String> {
    let workers = pool.len() as u64;
    let per = agents / workers;
    let extra = agents % workers;
    let per_dialers = (dialers / pool.len()).max(1);
    let replies = pool
        .all(|i| {
            let i = i as u64;
            let start = i * per + i.min(extra);
            let count = per + u64::from(i < extra);
            Cmd::Hold {
                url: url.to_owned(),
                prefix: prefix.to_owned(),
                start,
                count,
                dialers: per_dialers,
                timeout_s,
            }
        })
        .await?;
    Ok(Held::from_replies(replies))
}

impl Held {
    /// The workers' `Held` replies added up (wall time from the first dial of any to
    /// the last answer of any).
    pub fn from_replies(replies: Vec<Reply>) -> Self {
        let mut held = Held::default();
        let (mut first, mut last) = (u64::MAX, 0u64);
        for reply in replies {
            if let Reply::Held {
                ok,
                failed,
                errors,
                lat_us,
                start_us,
                end_us,
            } = reply
            {
                held.ok += ok;
                held.failed += failed;
                held.errors.extend(errors);
                held.lat_us.extend(lat_us);
                first = first.min(start_us);
                last = last.max(end_us);
            }
        }
        held.wall_s = last.saturating_sub(first) as f64 / 1e6;
        held
    }
}

/// Closes every held socket of the pool.
pub async fn release(pool: &Pool) {
    let _ = pool.all(|_| Cmd::CloseAll).await;
}

/// One line describing the machine: cores, memory, kernel, date.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kib| kib.parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%MZ"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    format!("{cores} cores, {mem_gib:.1} GiB, Linux {kernel}, {date}")
}

/// The command line of this invocation, for "reproduce with".
pub fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("target/release/tether-bench {}", args.join(" "))
}

/// Adds the standard notes (machine, revision, command, repeats) to a table.
pub fn finish(ctx: &Ctx, table: &mut Table) {
    table.notes.push(format!(
        "Machine: {}. Tether revision {}. Medians of {} run(s) per row; systems interleaved within each repeat.",
        machine(),
        ctx.env.revision,
        ctx.repeat
    ));
    table.notes.push(format!("Reproduce: `{}`", command_line()));
}

/// Prints a table and appends it to `--out`.
pub fn emit(ctx: &Ctx, table: &Table) {
    let text = table.render();
    print!("{text}");
    if let Some(path) = &ctx.out {
        use std::io::Write;
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(mut file) => {
                let _ = file.write_all(text.as_bytes());
            }
            Err(e) => eprintln!("tether-bench: cannot append to {}: {e}", path.display()),
        }
    }
}

/// Runs `once(system, config)` `ctx.repeat` times per system and configuration
/// (systems interleaved within each repeat) and returns one merged row per
/// (configuration, system), plus whether at least one run succeeded.
pub async fn repeat_matrix<C, F, Fut>(
    ctx: &Ctx,
    configs: &[C],
    name: &str,
    mut once: F,
) -> (Vec<Row>, bool)
where
    C: Clone + std::fmt::Debug,
    F: FnMut(System, C) -> Fut,
    Fut: Future<Output = Result<Row, String>>,
{
    let mut rows = Vec::new();
    let mut any_ok = false;
    for config in configs {
        let mut runs: Vec<(System, Vec<Row>, Vec<String>)> = ctx
            .systems
            .iter()
            .map(|s| (*s, Vec::new(), Vec::new()))
            .collect();
        for rep in 0..ctx.repeat {
            for (system, ok_rows, errors) in runs.iter_mut() {
                eprintln!(
                    "tether-bench {name}: {} {config:?} run {}/{}",
                    system.label(),
                    rep + 1,
                    ctx.repeat
                );
                match once(*system, config.clone()).await {
                    Ok(row) => {
                        any_ok = true;
                        ok_rows.push(row);
                    }
                    Err(e) => {
                        eprintln!("tether-bench {name}: {} failed: {e}", system.label());
                        errors.push(e);
                    }
                }
            }
        }
        for (system, ok_rows, errors) in runs {
            if ok_rows.is_empty() {
                ctx.failures.lock().unwrap().push(format!(
                    "{name}: {}: {}",
                    system.label(),
                    errors.first().map(String::as_str).unwrap_or("?")
                ));
                rows.push(vec![
                    ("system".into(), Cell::Text(system.label().into())),
                    (
                        "result".into(),
                        Cell::Na(format!(
                            "could not run: {}",
                            errors.first().map(String::as_str).unwrap_or("?")
                        )),
                    ),
                ]);
            } else {
                let mut row = merge_repeats(&ok_rows);
                if !errors.is_empty() {
                    row.push((
                        "failed runs".into(),
                        Cell::Text(format!("{} ({})", errors.len(), errors[0])),
                    ));
                }
                row.push(("runs".into(), Cell::Num(ok_rows.len() as f64, 0)));
                rows.push(row);
            }
        }
    }
    (rows, any_ok)
}

/// `(name, cell)` shorthand.
pub fn col(name: &str, cell: Cell) -> (String, Cell) {
    (name.to_owned(), cell)
}

/// A number cell.
pub fn num(name: &str, value: f64, decimals: usize) -> (String, Cell) {
    col(name, Cell::Num(value, decimals))
}

/// A number cell, or n/a with `reason`.
pub fn opt(name: &str, value: Option<f64>, decimals: usize, reason: &str) -> (String, Cell) {
    col(name, Cell::num_or(value, decimals, reason))
}

/// A text cell.
pub fn text(name: &str, value: impl Into<String>) -> (String, Cell) {
    col(name, Cell::Text(value.into()))
}

/// A not-applicable cell.
pub fn na(name: &str, reason: &str) -> (String, Cell) {
    col(name, Cell::Na(reason.to_owned()))
}

/// The value of column `name` in `row`.
pub fn value_of(row: &Row, name: &str) -> Option<f64> {
    row.iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, c)| c.value())
}

/// The system label of a row.
pub fn system_of(row: &Row) -> Option<&str> {
    row.iter()
        .find(|(n, _)| n == "system")
        .and_then(|(_, c)| match c {
            Cell::Text(t) => Some(t.as_str()),
            _ => None,
        })
}
