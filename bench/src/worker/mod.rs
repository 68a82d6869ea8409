//! The `client-worker` subcommand: a load-generating process the harness spawns so
//! that the agents of one run are spread over several processes (each has its own
//! 20 000 open-file limit) and several loopback source addresses (each has its own
//! ephemeral-port range). It reads [`crate::wire`] commands on stdin and answers on
//! stdout; it exits when stdin closes.
//!
//! This file holds the command loop, the dispatch and what every command shares;
//! each workload's commands are in a file of their own:
//!
//! - [`fleet`]: `hold`, `silence`, `report`, `close_all` and `probe` (the idle
//!   fleet of idle-memory, registration, heartbeat and dead-detection);
//! - [`churn`]: `churn` and `list_count` (churn and event-publishing);
//! - [`routing`]: `route_setup`, `route_closed`, `route_open`, `route_teardown`
//!   (routing's direct messages);
//! - [`broadcast`]: `broadcast` (routing's broadcasts).

mod broadcast;
mod churn;
mod fleet;
mod routing;

use crate::wire::{Cmd, Reply, Request, Response};
use fleet::Fleet;
use routing::RouteState;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// How many errors a reply carries at most.
const MAX_ERRORS: usize = 5;

/// Loopback source addresses of worker `index`: 127.(10+index).0.1 ..= .16.
pub fn source_ips(index: u32) -> Vec<IpAddr> {
    let second = 10 + (index % 240) as u8;
    (1..=16)
        .map(|last| IpAddr::V4(Ipv4Addr::new(127, second, 0, last)))
        .collect()
}

/// Round-robin over the worker's source addresses.
struct Sources {
    ips: Vec<IpAddr>,
    next: AtomicUsize,
}

impl Sources {
    fn pick(&self) -> IpAddr {
        self.ips[self.next.fetch_add(1, Ordering::Relaxed) % self.ips.len()]
    }
}

/// Everything a worker process holds.
struct Worker {
    sources: Sources,
    fleet: Arc<Fleet>,
    route: tokio::sync::Mutex<Option<RouteState>>,
    /// Sockets opened by `churn` and not yet closed.
    churn_open: Arc<AtomicU64>,
}

/// Runs the worker until stdin closes or `exit` arrives.
pub fn run(index: u32) -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(serve(index));
    std::process::ExitCode::SUCCESS
}

async fn serve(index: u32) {
    let worker = Arc::new(Worker {
        sources: Sources {
            ips: source_ips(index),
            next: AtomicUsize::new(0),
        },
        fleet: Arc::new(Fleet::default()),
        route: tokio::sync::Mutex::new(None),
        churn_open: Arc::new(AtomicU64::new(0)),
    });
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Response>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(response) = out_rx.recv().await {
            let mut line = serde_json::to_string(&response).unwrap_or_default();
            line.push('\n');
            if stdout.write_all(line.as_bytes()).await.is_err() {
                break;
            }
            let _ = stdout.flush().await;
        }
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let request: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("client-worker {index}: bad command {line:?}: {e}");
                continue;
            }
        };
        if matches!(request.cmd, Cmd::Exit) {
            let _ = out_tx.send(Response {
                id: request.id,
                reply: Reply::Done,
            });
            break;
        }
        let (worker, out_tx) = (worker.clone(), out_tx.clone());
        tokio::spawn(async move {
            let reply = worker.handle(request.cmd).await;
            let _ = out_tx.send(Response {
                id: request.id,
                reply,
            });
        });
    }
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

fn push_error(errors: &Mutex<Vec<String>>, error: String) {
    let mut errors = errors.lock().unwrap();
    if errors.len() < MAX_ERRORS {
        errors.push(error);
    }
}

fn close_code(close: Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> String {
    close
        .map(|c| u16::from(c.code).to_string())
        .unwrap_or_else(|| "none".into())
}

impl Worker {
    async fn handle(self: &Arc<Self>, cmd: Cmd) -> Reply {
        match cmd {
            Cmd::Hold {
                url,
                prefix,
                start,
                count,
                dialers,
                timeout_s,
            } => {
                self.hold(&url, &prefix, start, count, dialers, timeout_s)
                    .await
            }
            Cmd::Silence => self.silence().await,
            Cmd::Report => self.report(),
            Cmd::CloseAll => self.close_all().await,
            Cmd::Count => Reply::Count {
                open: self.fleet.open.load(Ordering::Relaxed)
                    + self.churn_open.load(Ordering::Relaxed),
            },
            Cmd::Probe {
                url,
                prefix,
                count,
                interval_ms,
            } => self.probe(&url, &prefix, count, interval_ms).await,
            Cmd::ListCount { url, agent_id } => self.list_count(&url, &agent_id).await,
            Cmd::Churn {
                url,
                prefix,
                rate,
                duration_s,
                lifetime_ms,
            } => {
                self.churn(&url, &prefix, rate, duration_s, lifetime_ms)
                    .await
            }
            Cmd::RouteSetup {
                url,
                pairs,
                echo,
                urls,
            } => self.route_setup(&url, &urls, pairs, echo).await,
            Cmd::RouteClosed {
                window,
                warmup_s,
                duration_s,
            } => self.route_closed(window, warmup_s, duration_s).await,
            Cmd::RouteOpen {
                rate,
                warmup_s,
                duration_s,
            } => self.route_open(rate, warmup_s, duration_s).await,
            Cmd::RouteTeardown => self.route_teardown().await,
            Cmd::Broadcast {
                url,
                agents,
                rate,
                warmup_s,
                duration_s,
            } => {
                self.broadcast(&url, agents, rate, warmup_s, duration_s)
                    .await
            }
            Cmd::Exit => Reply::Done,
        }
    }
}
