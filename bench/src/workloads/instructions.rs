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

use super::{finish, num, opt, text, Ctx};
use crate::client::{self, Target, Ws};
use crate::stats::{latency_ms, merge_repeats, now_us, Cell, Row, Table};
use crate::systems::{start_tether_logging_to, Server, TetherVars};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::Message;

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

/// Seconds the latency phase waits after its window for instructions still on their
/// way; one not received by then is lost.
const LOST_AFTER_S: f64 = 5.0;
/// Longest wait for the throughput phase's backlog to drain.
const DRAIN_TIMEOUT_S: f64 = 120.0;

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

    /// The issue's throughput target, instructions per second.
    fn target(self) -> f64 {
        match self {
            Self::Sqlite => 2000.0,
            Self::Postgres => 5000.0,
        }
    }
}

/// Per backend: the throughput rows, the latency rows, the errors of its runs.
type BackendRuns = (Backend, Vec<Row>, Vec<Row>, Vec<String>);

/// The issue's p99 target at half the rate, milliseconds.
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

/// A fresh database for one run.
struct Storage {
    backend: Backend,
    /// `TETHER__STORAGE__URL`.
    url: String,
    /// The SQLite file, or the PostgreSQL database's name.
    name: String,
}

impl Storage {
    async fn create(ctx: &Ctx, args: &Args, backend: Backend) -> Result<Self, String> {
        let unique = format!(
            "{}_{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        match backend {
            Backend::Sqlite => {
                let path = ctx
                    .env
                    .work_dir
                    .join(format!("instructions-bench-{unique}.db"));
                let name = path.display().to_string();
                Ok(Self {
                    backend,
                    url: format!("sqlite://{name}"),
                    name,
                })
            }
            Backend::Postgres => {
                let name = format!("tether_bench_{unique}");
                psql(&args.postgres, &format!("CREATE DATABASE {name}")).await?;
                Ok(Self {
                    backend,
                    url: format!("{}/{name}", args.postgres.trim_end_matches('/')),
                    name,
                })
            }
        }
    }

    /// Removes the database (after the server stopped).
    async fn drop_it(self, args: &Args) {
        match self.backend {
            Backend::Sqlite => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", self.name));
                }
            }
            Backend::Postgres => {
                let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
                if let Err(e) = psql(&args.postgres, &sql).await {
                    eprintln!("tether-bench instructions: {e}");
                }
            }
        }
    }
}

/// Runs one SQL statement with psql against the `postgres` database of `server`.
async fn psql(server: &str, sql: &str) -> Result<(), String> {
    let out = tokio::process::Command::new("psql")
        .arg("-d")
        .arg(format!("{}/postgres", server.trim_end_matches('/')))
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .await
        .map_err(|e| format!("psql: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "psql `{sql}`: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
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
    let dropped = seen.dropped.load(Ordering::Relaxed);
    let errors = seen.errors.load(Ordering::Relaxed);
    for row in [&mut result.0, &mut result.1] {
        if dropped > 0 {
            row.push(text(
                "agent sockets ended",
                format!(
                    "{dropped} ({})",
                    seen.first_drop.lock().unwrap().clone().unwrap_or_default()
                ),
            ));
        }
        if errors > 0 {
            row.push(text(
                "error frames to agents",
                format!(
                    "{errors} ({})",
                    seen.first_error.lock().unwrap().clone().unwrap_or_default()
                ),
            ));
        }
    }
    Ok(result)
}

/// What the agents saw, shared by their tasks.
#[derive(Default)]
struct Seen {
    /// Throughput phase: (ack send time µs, instruction id).
    tput: Mutex<Vec<(u64, String)>>,
    /// Latency phase: (seq, sent_at_us from the payload, ack send time µs).
    lat: Mutex<Vec<(u64, u64, u64)>>,
    /// Instruction frames received with `attempt` above 1.
    redelivered: AtomicU64,
    /// Server pings answered.
    pings: AtomicU64,
    /// `error` frames received.
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Agent sockets that ended before the harness closed them.
    dropped: AtomicU64,
    first_drop: Mutex<Option<String>>,
}

/// The payload the harness writes into every instruction.
#[derive(Debug, Default, Deserialize)]
struct Payload {
    #[serde(default)]
    phase: Option<String>,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    sent_at_us: u64,
}

/// The fields of a frame an agent looks at.
#[derive(Debug, Default, Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    command: Option<Cow<'a, str>>,
    #[serde(default)]
    timestamp: Option<f64>,
    #[serde(borrow, default)]
    instruction_id: Option<Cow<'a, str>>,
    #[serde(default)]
    attempt: Option<i64>,
    #[serde(default)]
    payload: Option<Payload>,
}

/// The agents, one task each.
struct Fleet {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Registers `count` agents `bi-0` .. on `url` (64 at a time) and starts their tasks.
    async fn open(url: &str, count: u64, seen: Arc<Seen>) -> Result<Fleet, String> {
        let target = Arc::new(Target::parse(url)?);
        let (stop, stop_rx) = watch::channel(false);
        let opened: Vec<Result<Ws, String>> = futures_util::stream::iter(0..count)
            .map(|i| {
                let target = target.clone();
                async move { register(&target, &agent_id(i)).await }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        let mut tasks = Vec::new();
        let mut failed = Vec::new();
        for result in opened {
            match result {
                Ok(ws) => tasks.push(tokio::spawn(agent(ws, seen.clone(), stop_rx.clone()))),
                Err(e) => failed.push(e),
            }
        }
        let fleet = Fleet { stop, tasks };
        if !failed.is_empty() {
            let n = failed.len();
            fleet.close().await;
            return Err(format!(
                "{n} of {count} agents failed to register: {}",
                failed[0]
            ));
        }
        Ok(fleet)
    }

    /// Closes every agent's socket.
    async fn close(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

fn agent_id(n: u64) -> String {
    format!("bi-{n}")
}

/// Dials and registers `agent_id` as an agent taking instructions.
async fn register(target: &Target, agent_id: &str) -> Result<Ws, String> {
    let attempt = async {
        let mut ws = client::dial(target, IpAddr::V4(Ipv4Addr::LOCALHOST)).await?;
        let metadata = serde_json::json!({
            "name": agent_id, "capabilities": [tether_client::INSTRUCTIONS_CAPABILITY],
        });
        let frame = client::protocol::register(agent_id, &metadata, None, false, None);
        ws.send(Message::text(frame))
            .await
            .map_err(|e| format!("send register: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let frame = client::Frame::parse(t.as_str());
                    if frame.is_response_to("register_agent") {
                        return if frame.success == Some(true) {
                            Ok(ws)
                        } else {
                            Err(format!(
                                "{agent_id} refused: {}",
                                frame.error.as_deref().unwrap_or(t.as_str())
                            ))
                        };
                    }
                }
                Some(Ok(Message::Close(c))) => {
                    return Err(format!("{agent_id}: closed before the answer: {c:?}"))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("{agent_id}: read: {e}")),
                None => return Err(format!("{agent_id}: ended before the answer")),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), attempt)
        .await
        .map_err(|_| format!("{agent_id}: no register answer within 30 s"))?
}

/// One agent: acknowledges every instruction `done` at once, answers pings.
async fn agent(mut ws: Ws, seen: Arc<Seen>, mut stop: watch::Receiver<bool>) {
    loop {
        let message = tokio::select! {
            _ = stop.changed() => {
                client::close(ws).await;
                return;
            }
            message = ws.next() => message,
        };
        let ended = match message {
            Some(Ok(Message::Text(t))) => on_frame(&mut ws, t.as_str(), &seen).await.err(),
            Some(Ok(Message::Close(c))) => Some(format!("closed by the server: {c:?}")),
            Some(Ok(_)) => None,
            Some(Err(e)) => Some(format!("read: {e}")),
            None => Some("ended".into()),
        };
        if let Some(why) = ended {
            if !*stop.borrow() {
                seen.dropped.fetch_add(1, Ordering::Relaxed);
                seen.first_drop.lock().unwrap().get_or_insert(why);
            }
            return;
        }
    }
}

/// Answers one frame; `Err` when the socket failed.
async fn on_frame(ws: &mut Ws, text: &str, seen: &Seen) -> Result<(), String> {
    let frame: Incoming = serde_json::from_str(text).unwrap_or_default();
    match frame.kind.as_deref() {
        Some("instruction") => {
            let Some(id) = frame.instruction_id.as_deref() else {
                seen.errors.fetch_add(1, Ordering::Relaxed);
                seen.first_error
                    .lock()
                    .unwrap()
                    .get_or_insert_with(|| format!("instruction without an id: {text}"));
                return Ok(());
            };
            if frame.attempt.unwrap_or(1) > 1 {
                seen.redelivered.fetch_add(1, Ordering::Relaxed);
            }
            let ack = client::protocol::ack(
                id,
                tether_client::AckStatus::Done,
                Some(&serde_json::json!({"ok": true})),
            );
            let acked_at = now_us();
            ws.send(Message::text(ack))
                .await
                .map_err(|e| format!("send ack: {e}"))?;
            let payload = frame.payload.unwrap_or_default();
            match payload.phase.as_deref() {
                Some("throughput") => seen.tput.lock().unwrap().push((acked_at, id.to_owned())),
                Some("latency") => {
                    seen.lat
                        .lock()
                        .unwrap()
                        .push((payload.seq, payload.sent_at_us, acked_at))
                }
                _ => {}
            }
        }
        Some("system_request") if frame.command.as_deref() == Some("ping_agent") => {
            seen.pings.fetch_add(1, Ordering::Relaxed);
            ws.send(Message::text(client::protocol::pong(
                frame.timestamp.unwrap_or(0.0),
            )))
            .await
            .map_err(|e| format!("send pong: {e}"))?;
        }
        Some("error") => {
            seen.errors.fetch_add(1, Ordering::Relaxed);
            seen.first_error
                .lock()
                .unwrap()
                .get_or_insert_with(|| text.to_owned());
        }
        _ => {}
    }
    Ok(())
}

/// The create request's body for instruction `seq` of `phase`, stamped now.
fn create_body(phase: &str, seq: u64) -> String {
    format!(
        r#"{{"payload":{{"phase":"{phase}","seq":{seq},"sent_at_us":{}}},"ttl":300,"max_attempts":3,"ack_timeout":30}}"#,
        now_us()
    )
}

/// Sends one create; `Ok` on `201`, else the status and body.
async fn create(
    client: &reqwest::Client,
    http: &str,
    phase: &str,
    seq: u64,
    agents: u64,
) -> Result<(), String> {
    let url = format!("{http}/agents/{}/instructions", agent_id(seq % agents));
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(create_body(phase, seq))
        .send()
        .await
        .map_err(|e| format!("POST: {e}"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("POST body: {e}"))?;
    if status.as_u16() == 201 {
        Ok(())
    } else {
        Err(format!(
            "POST answered {status}: {}",
            String::from_utf8_lossy(&body)
        ))
    }
}

/// Counts of failed requests and the first error.
#[derive(Default)]
struct Failures {
    count: AtomicU64,
    first: Mutex<Option<String>>,
}

impl Failures {
    fn note(&self, error: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.first.lock().unwrap().get_or_insert(error);
    }

    fn push_to(&self, row: &mut Row) {
        let count = self.count.load(Ordering::Relaxed);
        row.push(num("HTTP errors", count as f64, 0));
        if count > 0 {
            row.push(text(
                "first HTTP error",
                self.first.lock().unwrap().clone().unwrap_or_default(),
            ));
        }
    }
}

/// The throughput phase; its row and the completed/s.
async fn throughput(
    args: &Args,
    server: &Server,
    http: &str,
    client: &reqwest::Client,
    seen: &Arc<Seen>,
) -> Result<(Row, f64), String> {
    let window = Duration::from_secs_f64(args.duration);
    let next = Arc::new(AtomicU64::new(0));
    let created_in_window = Arc::new(AtomicU64::new(0));
    let created = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Failures::default());
    let cpu0 = server.cpu_secs();
    let t0_us = now_us();
    let t0 = Instant::now();
    let deadline = t0 + window;
    let mut tasks = JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, http, next, created_in_window, created, failures) = (
            client.clone(),
            http.to_owned(),
            next.clone(),
            created_in_window.clone(),
            created.clone(),
            failures.clone(),
        );
        let agents = args.agents;
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                match create(&client, &http, "throughput", seq, agents).await {
                    Ok(()) => {
                        created.fetch_add(1, Ordering::Relaxed);
                        if Instant::now() <= deadline {
                            created_in_window.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => failures.note(e),
                }
            }
        });
    }
    tokio::time::sleep_until(deadline.into()).await;
    let t1_us = t0_us + window.as_micros() as u64;
    let cpu1 = server.cpu_secs();
    while tasks.join_next().await.is_some() {}
    let created = created.load(Ordering::Relaxed);
    let seconds = args.duration;
    // The backlog drains: every created instruction acknowledged.
    let drain_start = Instant::now();
    let drain_limit = drain_start + Duration::from_secs_f64(DRAIN_TIMEOUT_S);
    loop {
        let acked = seen.tput.lock().unwrap().len() as u64;
        if acked >= created || Instant::now() > drain_limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained_s = Instant::now().saturating_duration_since(deadline);
    let acked: Vec<(u64, String)> = seen.tput.lock().unwrap().clone();
    let completed_in_window = acked
        .iter()
        .filter(|(t, _)| *t >= t0_us && *t <= t1_us)
        .count() as u64;
    let created_in_window = created_in_window.load(Ordering::Relaxed);
    // Read a random sample back once the acknowledgements are stored.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (sampled, done, other_states) = check_sample(args, http, client, &acked).await;
    let completed_per_s = completed_in_window as f64 / seconds;
    let mut row = vec![
        num("agents", args.agents as f64, 0),
        num("created/s", created_in_window as f64 / seconds, 0),
        num("completed/s", completed_per_s, 0),
        num(
            "backlog at window end",
            created_in_window.saturating_sub(completed_in_window) as f64,
            0,
        ),
        opt(
            "drain s",
            (acked.len() as u64 >= created).then_some(drained_s.as_secs_f64()),
            2,
            &format!(
                "{} of {created} acknowledged after {DRAIN_TIMEOUT_S} s",
                acked.len()
            ),
        ),
        num("sampled", sampled as f64, 0),
        num("sample done", done as f64, 0),
    ];
    if !other_states.is_empty() {
        row.push(text("sample not done", other_states));
    }
    failures.push_to(&mut row);
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        row.push(num("server CPU share", (b - a) / seconds, 2));
    }
    let redelivered = seen.redelivered.load(Ordering::Relaxed);
    row.push(num("redeliveries", redelivered as f64, 0));
    Ok((row, completed_per_s))
}

/// Reads `args.sample` acknowledged ids (picked at random) back; (sampled, done, a
/// summary of the other answers).
async fn check_sample(
    args: &Args,
    http: &str,
    client: &reqwest::Client,
    acked: &[(u64, String)],
) -> (usize, usize, String) {
    let mut rng = now_us() | 1;
    let mut picked: Vec<&str> = Vec::new();
    if acked.len() <= args.sample {
        picked.extend(acked.iter().map(|(_, id)| id.as_str()));
    } else {
        let mut indices = std::collections::BTreeSet::new();
        while indices.len() < args.sample {
            // xorshift64
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            indices.insert((rng % acked.len() as u64) as usize);
        }
        picked.extend(indices.into_iter().map(|i| acked[i].1.as_str()));
    }
    let mut done = 0;
    let mut others: HashMap<String, u64> = HashMap::new();
    for id in &picked {
        let state = async {
            let response = client
                .get(format!("{http}/instructions/{id}"))
                .send()
                .await
                .map_err(|e| format!("GET: {e}"))?;
            let status = response.status();
            let doc: serde_json::Value = response
                .json()
                .await
                .map_err(|e| format!("GET {status}: {e}"))?;
            doc["state"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("GET {status}: {doc}"))
        }
        .await;
        match state {
            Ok(state) if state == "done" => done += 1,
            Ok(state) => *others.entry(state).or_default() += 1,
            Err(e) => *others.entry(e).or_default() += 1,
        }
    }
    let mut summary: Vec<String> = others
        .into_iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    summary.sort();
    (picked.len(), done, summary.join(", "))
}

/// The latency phase at `rate` instructions per second; its row.
async fn latency(
    args: &Args,
    rate: f64,
    http: &str,
    client: &reqwest::Client,
    seen: &Arc<Seen>,
) -> Result<Row, String> {
    let total_s = args.warmup + args.duration;
    let total = (total_s * rate).floor() as u64;
    let first_recorded = (args.warmup * rate).ceil() as u64;
    let created: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let failures = Arc::new(Failures::default());
    let start = Instant::now() + Duration::from_millis(50);
    let mut tasks = JoinSet::new();
    let mut late_us: Vec<u32> = Vec::new();
    for seq in 0..total {
        let at = start + Duration::from_secs_f64(seq as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
        if seq >= first_recorded {
            late_us.push(at.elapsed().as_micros().min(u32::MAX as u128) as u32);
        }
        let (client, http, created, failures) = (
            client.clone(),
            http.to_owned(),
            created.clone(),
            failures.clone(),
        );
        let agents = args.agents;
        tasks.spawn(async move {
            let sent = Instant::now();
            match create(&client, &http, "latency", seq, agents).await {
                Ok(()) => {
                    let us = sent.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    created.lock().unwrap().push((seq, us));
                }
                Err(e) => failures.note(e),
            }
        });
        // Reap finished requests now and then so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    let window_end = start + Duration::from_secs_f64(total_s);
    while tasks.join_next().await.is_some() {}
    tokio::time::sleep_until((window_end + Duration::from_secs_f64(LOST_AFTER_S)).into()).await;
    let received: HashMap<u64, (u64, u64)> = seen
        .lat
        .lock()
        .unwrap()
        .iter()
        .map(|(seq, sent, acked)| (*seq, (*sent, *acked)))
        .collect();
    let created = created.lock().unwrap().clone();
    let recorded: Vec<&(u64, u32)> = created
        .iter()
        .filter(|(seq, _)| *seq >= first_recorded)
        .collect();
    let mut lat_us: Vec<u32> = Vec::new();
    let mut lost = 0u64;
    for (seq, _) in &recorded {
        match received.get(seq) {
            Some((sent, acked)) => {
                lat_us.push(acked.saturating_sub(*sent).min(u32::MAX as u64) as u32)
            }
            None => lost += 1,
        }
    }
    let mut post_us: Vec<u32> = recorded.iter().map(|(_, us)| *us).collect();
    let (p50, p99, max) = latency_ms(&mut lat_us);
    let (_, post_p99, _) = latency_ms(&mut post_us);
    let (_, late_p99, _) = latency_ms(&mut late_us);
    let mut row = vec![
        num("agents", args.agents as f64, 0),
        num("rate /s", rate, 0),
        num(
            "created /s",
            recorded.len() as f64 / args.duration.max(1e-9),
            0,
        ),
        num("sampled", lat_us.len() as f64, 0),
        opt("p50 ms", p50, 2, "none"),
        opt("p99 ms", p99, 2, "none"),
        opt("max ms", max, 1, "none"),
        opt("POST p99 ms", post_p99, 2, "none"),
        num("lost", lost as f64, 0),
    ];
    failures.push_to(&mut row);
    row.push(opt("sender late p99 ms", late_p99, 2, "none"));
    Ok(row)
}
