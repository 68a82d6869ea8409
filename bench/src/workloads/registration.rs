//! Registration rate: agents connected and registered per second with 64 concurrent
//! dialers, and p50/p99 of the time from TCP connect to the register answer.

use super::{finish, hold, num, release, repeat_matrix, text, workers_for, Ctx};
use crate::pool::Pool;
use crate::stats::{latency_ms, Cell, Row, Table};
use crate::systems::{Server, System, TetherVars};

/// Options of `registration-rate`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Agents registered (and held) per run. 20 000 held sockets do not fit under the
    /// server's 20 000 open-file limit, hence 19 900.
    #[arg(long, default_value_t = 19_900)]
    pub agents: u64,
    /// Concurrent dialers, all workers together.
    #[arg(long, default_value_t = 64)]
    pub dialers: usize,
    /// Client worker processes (dialers are split evenly).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
}

/// Runs the workload and returns its table; `Err` when no run could run at all.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<Vec<Table>, String> {
    let (rows, any_ok) = repeat_matrix(ctx, &[args.agents], "registration-rate", |system, n| {
        once(ctx, args, system, n)
    })
    .await;
    let mut table = Table::new("Registration rate");
    table.rows = rows;
    let rate_of = |label: &str| {
        table
            .rows
            .iter()
            .find(|r| super::system_of(r) == Some(label))
            .and_then(|r| super::value_of(r, "registrations/s"))
    };
    let oa = rate_of(System::OpenAgents.label());
    let floor = rate_of(System::Floor.label());
    for row in &mut table.rows {
        let rate = super::value_of(row, "registrations/s");
        let vs = |other: Option<f64>| match (rate, other) {
            (Some(r), Some(o)) if o > 0.0 => Cell::Num(r / o, 1),
            _ => Cell::Na(String::new()),
        };
        row.push(("× OpenAgents".into(), vs(oa)));
        row.push(("× floor".into(), vs(floor)));
    }
    table.notes.push(format!(
        "{} dialers over {} client processes and 16 loopback source addresses each; every agent stays connected (the server ends up holding all of them). Latency is from the start of the TCP connect to the register answer. Rate = registered agents / (last answer − first dial).",
        args.dialers, args.workers
    ));
    finish(ctx, &mut table);
    if any_ok {
        Ok(vec![table])
    } else {
        Err("registration-rate: no run succeeded".into())
    }
}

async fn once(ctx: &Ctx, args: &Args, system: System, n: u64) -> Result<Row, String> {
    let server = Server::start(system, &ctx.env, &TetherVars::default()).await?;
    let workers = args.workers.max(workers_for(n, ctx.per_worker));
    let pool = Pool::spawn(workers, 0).await?;
    // Let the workers start before the clock runs.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let cpu0 = server.cpu_secs();
    let result = hold(&pool, &server.ws_url, "reg-", n, args.dialers, 60.0).await;
    let cpu1 = server.cpu_secs();
    release(&pool).await;
    pool.shutdown().await;
    server.stop().await;
    let mut held = result?;
    let (p50, p99, max) = latency_ms(&mut held.lat_us);
    let mut row = vec![
        text("system", system.label()),
        num("agents", n as f64, 0),
        num("registered", held.ok as f64, 0),
        num("seconds", held.wall_s, 2),
        num("registrations/s", held.ok as f64 / held.wall_s.max(1e-9), 0),
        super::opt("p50 ms", p50, 2, "none"),
        super::opt("p99 ms", p99, 2, "none"),
        super::opt("max ms", max, 1, "none"),
    ];
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        row.push(num("server CPU s", b - a, 2));
    }
    held.note_failures(&mut row);
    Ok(row)
}
