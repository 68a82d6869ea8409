//! The `client-worker` subcommand: a load-generating process the harness spawns so
//! that the agents of one run are spread over several processes (each has its own
//! 20 000 open-file limit) and several loopback source addresses (each has its own
//! ephemeral-port range). It reads [`crate::wire`] commands on stdin and answers on
//! stdout; it exits when stdin closes.

use crate::client::{self, Frame, Target, Ws};
use crate::stats::now_us;
use crate::wire::{Cmd, Reply, Request, Response};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

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

/// The sockets held by `hold` commands.
#[derive(Default)]
struct Fleet {
    /// Whether held sockets answer pings (cleared by `silence`).
    silent: AtomicBool,
    open: AtomicU64,
    pings: AtomicU64,
    lags: Mutex<Vec<u32>>,
    closes: Mutex<BTreeMap<String, u64>>,
    /// Each held agent's last frame sent (epoch µs).
    last_sent: Mutex<Vec<(Arc<str>, Arc<AtomicU64>)>>,
    stops: Mutex<Vec<watch::Sender<bool>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Fleet {
    fn closed(&self, code: String) {
        *self.closes.lock().unwrap().entry(code).or_default() += 1;
    }
}

/// The routing agents of `route_setup`.
struct RouteState {
    agents: Vec<RouteAgent>,
    shared: Arc<RouteShared>,
    tasks: Vec<JoinHandle<()>>,
    echo: bool,
}

struct RouteAgent {
    id: Arc<str>,
    peer: Arc<str>,
    tx: mpsc::UnboundedSender<Message>,
}

#[derive(Default)]
struct RouteShared {
    /// Receivers answer every bench message (closed loop).
    closed_loop: AtomicBool,
    /// Receipts are counted and their latencies kept.
    recording: AtomicBool,
    received: AtomicU64,
    sent: AtomicU64,
    lats: Mutex<Vec<u32>>,
    closes: Mutex<BTreeMap<String, u64>>,
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
            Cmd::RouteSetup { url, pairs, echo } => self.route_setup(&url, pairs, echo).await,
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

    async fn hold(
        self: &Arc<Self>,
        url: &str,
        prefix: &str,
        start: u64,
        count: u64,
        dialers: usize,
        timeout_s: f64,
    ) -> Reply {
        let target = match Target::parse(url) {
            Ok(t) => Arc::new(t),
            Err(message) => return Reply::Error { message },
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        self.fleet.stops.lock().unwrap().push(stop_tx);
        let next = Arc::new(AtomicU64::new(start));
        let end = start + count;
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let lats = Arc::new(Mutex::new(Vec::with_capacity(count as usize)));
        let timeout = Duration::from_secs_f64(timeout_s);
        let start_us = now_us();
        let mut dialer_tasks = Vec::new();
        for _ in 0..dialers.max(1) {
            let (worker, target, next, ok, failed, errors, lats, stop_rx) = (
                self.clone(),
                target.clone(),
                next.clone(),
                ok.clone(),
                failed.clone(),
                errors.clone(),
                lats.clone(),
                stop_rx.clone(),
            );
            let prefix = prefix.to_owned();
            dialer_tasks.push(tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= end {
                        break;
                    }
                    let agent_id: Arc<str> = format!("{prefix}{n}").into();
                    let source = worker.sources.pick();
                    match client::dial_and_register(&target, source, &agent_id, timeout).await {
                        Ok(reg) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            lats.lock().unwrap().push(reg.latency_us);
                            let last = Arc::new(AtomicU64::new(reg.sent_at_us));
                            worker
                                .fleet
                                .last_sent
                                .lock()
                                .unwrap()
                                .push((agent_id.clone(), last.clone()));
                            let fleet = worker.fleet.clone();
                            fleet.open.fetch_add(1, Ordering::Relaxed);
                            let task = tokio::spawn(hold_socket(
                                reg.ws,
                                last,
                                fleet.clone(),
                                stop_rx.clone(),
                            ));
                            fleet.tasks.lock().unwrap().push(task);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            push_error(&errors, format!("{agent_id}: {e}"));
                        }
                    }
                }
            }));
        }
        for task in dialer_tasks {
            let _ = task.await;
        }
        let end_us = now_us();
        let lat_us = std::mem::take(&mut *lats.lock().unwrap());
        let errors = std::mem::take(&mut *errors.lock().unwrap());
        Reply::Held {
            ok: ok.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
            errors,
            lat_us,
            start_us,
            end_us,
        }
    }

    async fn silence(&self) -> Reply {
        self.fleet.silent.store(true, Ordering::SeqCst);
        // Let answers already being written finish, then read the final times.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let last_sent = self
            .fleet
            .last_sent
            .lock()
            .unwrap()
            .iter()
            .map(|(id, at)| (id.to_string(), at.load(Ordering::SeqCst)))
            .collect();
        Reply::Silenced { last_sent }
    }

    fn report(&self) -> Reply {
        Reply::Report {
            open: self.fleet.open.load(Ordering::Relaxed),
            pings: self.fleet.pings.swap(0, Ordering::Relaxed),
            ping_lag_us: std::mem::take(&mut *self.fleet.lags.lock().unwrap()),
            closes: self.fleet.closes.lock().unwrap().clone(),
        }
    }

    async fn close_all(&self) -> Reply {
        for stop in self.fleet.stops.lock().unwrap().drain(..) {
            let _ = stop.send(true);
        }
        let tasks: Vec<_> = self.fleet.tasks.lock().unwrap().drain(..).collect();
        let closed = tasks.len() as u64;
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        self.fleet.last_sent.lock().unwrap().clear();
        self.fleet.closes.lock().unwrap().clear();
        self.fleet.silent.store(false, Ordering::SeqCst);
        self.fleet.lags.lock().unwrap().clear();
        self.fleet.pings.store(0, Ordering::Relaxed);
        Reply::Closed { closed }
    }

    async fn probe(&self, url: &str, prefix: &str, count: u64, interval_ms: u64) -> Reply {
        let target = match Target::parse(url) {
            Ok(t) => t,
            Err(message) => return Reply::Error { message },
        };
        let mut lat_us = Vec::new();
        let mut failed = 0;
        let mut errors = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(interval_ms.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 0..count {
            tick.tick().await;
            let agent_id = format!("{prefix}{n}");
            match client::dial_and_register(
                &target,
                self.sources.pick(),
                &agent_id,
                Duration::from_secs(30),
            )
            .await
            {
                Ok(reg) => {
                    lat_us.push(reg.latency_us);
                    tokio::spawn(client::close(reg.ws));
                }
                Err(e) => {
                    failed += 1;
                    if errors.len() < MAX_ERRORS {
                        errors.push(format!("{agent_id}: {e}"));
                    }
                }
            }
        }
        Reply::Probe {
            lat_us,
            failed,
            errors,
        }
    }

    async fn list_count(&self, url: &str, agent_id: &str) -> Reply {
        let target = match Target::parse(url) {
            Ok(t) => t,
            Err(message) => return Reply::Error { message },
        };
        let reg = match client::dial_and_register(
            &target,
            self.sources.pick(),
            agent_id,
            Duration::from_secs(30),
        )
        .await
        {
            Ok(reg) => reg,
            Err(message) => return Reply::Error { message },
        };
        let mut ws = reg.ws;
        let request = format!(
            r#"{{"type":"system_request","command":"list_agents","agent_id":"{agent_id}"}}"#
        );
        if let Err(e) = ws.send(Message::text(request)).await {
            return Reply::Error {
                message: format!("send list_agents: {e}"),
            };
        }
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Text(text) = msg {
                    let frame = Frame::parse(text.as_str());
                    if frame.is_response_to("list_agents") {
                        return frame.agents.map(|a| a.len() as u64);
                    }
                }
            }
            None
        })
        .await;
        client::close(ws).await;
        match answer {
            Ok(Some(agents)) => Reply::ListCount { agents },
            _ => Reply::Error {
                message: "no list_agents answer with an agents list".into(),
            },
        }
    }

    async fn churn(
        self: &Arc<Self>,
        url: &str,
        prefix: &str,
        rate: f64,
        duration_s: f64,
        lifetime_ms: u64,
    ) -> Reply {
        let target = match Target::parse(url) {
            Ok(t) => Arc::new(t),
            Err(message) => return Reply::Error { message },
        };
        let opened = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(AtomicU64::new(0));
        let server_closed = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let lats = Arc::new(Mutex::new(Vec::new()));
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(duration_s);
        let mut tasks = Vec::new();
        let mut n = 0u64;
        loop {
            tick.tick().await;
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            let agent_id = format!("{prefix}{n}");
            n += 1;
            let source = self.sources.pick();
            let (target, opened, failed, closed, server_closed, errors, lats, open) = (
                target.clone(),
                opened.clone(),
                failed.clone(),
                closed.clone(),
                server_closed.clone(),
                errors.clone(),
                lats.clone(),
                self.churn_open.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let reg = match client::dial_and_register(
                    &target,
                    source,
                    &agent_id,
                    Duration::from_secs(30),
                )
                .await
                {
                    Ok(reg) => reg,
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        push_error(&errors, format!("{agent_id}: {e}"));
                        return;
                    }
                };
                opened.fetch_add(1, Ordering::Relaxed);
                open.fetch_add(1, Ordering::Relaxed);
                lats.lock().unwrap().push(reg.latency_us);
                let mut ws = reg.ws;
                let lifetime = tokio::time::sleep(Duration::from_millis(lifetime_ms));
                tokio::pin!(lifetime);
                let ended_by_server = loop {
                    tokio::select! {
                        _ = &mut lifetime => break None,
                        msg = ws.next() => match msg {
                            Some(Ok(Message::Text(text))) => {
                                let ts = Frame::parse(text.as_str()).ping_timestamp();
                                if let Some(ts) = ts {
                                    let _ = ws.send(Message::text(client::pong_frame(ts))).await;
                                }
                            }
                            Some(Ok(Message::Close(c))) => break Some(close_code(c)),
                            Some(Ok(_)) => {}
                            Some(Err(_)) => break Some("error".to_owned()),
                            None => break Some("eof".to_owned()),
                        }
                    }
                };
                open.fetch_sub(1, Ordering::Relaxed);
                match ended_by_server {
                    None => {
                        client::close(ws).await;
                        closed.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(code) => {
                        *server_closed.lock().unwrap().entry(code).or_default() += 1;
                    }
                }
            }));
        }
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
        }
        let lat_us = std::mem::take(&mut *lats.lock().unwrap());
        let errors = std::mem::take(&mut *errors.lock().unwrap());
        let server_closed = server_closed.lock().unwrap().clone();
        Reply::Churn {
            opened: opened.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
            closed: closed.load(Ordering::Relaxed),
            server_closed,
            errors,
            lat_us,
        }
    }

    async fn route_setup(self: &Arc<Self>, url: &str, pairs: u64, echo: bool) -> Reply {
        let target = match Target::parse(url) {
            Ok(t) => Arc::new(t),
            Err(message) => return Reply::Error { message },
        };
        let mut ids = Vec::new();
        for i in 0..pairs {
            ids.push((format!("ra-{i}"), format!("rb-{i}")));
            ids.push((format!("rb-{i}"), format!("ra-{i}")));
        }
        let shared = Arc::new(RouteShared::default());
        let errors = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicU64::new(0));
        let results = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicUsize::new(0));
        let ids = Arc::new(ids);
        let mut dialers = Vec::new();
        for _ in 0..32 {
            let (worker, target, ids, next, errors, failed, results) = (
                self.clone(),
                target.clone(),
                ids.clone(),
                next.clone(),
                errors.clone(),
                failed.clone(),
                results.clone(),
            );
            dialers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((id, peer)) = ids.get(i) else { break };
                    match client::dial_and_register(
                        &target,
                        worker.sources.pick(),
                        id,
                        Duration::from_secs(60),
                    )
                    .await
                    {
                        Ok(reg) => results
                            .lock()
                            .unwrap()
                            .push((id.clone(), peer.clone(), reg.ws)),
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            push_error(&errors, format!("{id}: {e}"));
                        }
                    }
                }
            }));
        }
        for d in dialers {
            let _ = d.await;
        }
        let mut agents = Vec::new();
        let mut tasks = Vec::new();
        let sockets = std::mem::take(&mut *results.lock().unwrap());
        let ok = sockets.len() as u64;
        for (id, peer, ws) in sockets {
            let (id, peer): (Arc<str>, Arc<str>) = (id.into(), peer.into());
            let (tx, rx) = mpsc::unbounded_channel();
            let (sink, stream) = ws.split();
            tasks.push(tokio::spawn(write_loop(sink, rx)));
            tasks.push(tokio::spawn(route_reader(
                stream,
                id.clone(),
                peer.clone(),
                tx.clone(),
                shared.clone(),
            )));
            agents.push(RouteAgent { id, peer, tx });
        }
        *self.route.lock().await = Some(RouteState {
            agents,
            shared,
            tasks,
            echo,
        });
        let errors = std::mem::take(&mut *errors.lock().unwrap());
        Reply::RouteReady {
            ok,
            failed: failed.load(Ordering::Relaxed),
            errors,
        }
    }

    async fn route_closed(&self, window: u64, warmup_s: f64, duration_s: f64) -> Reply {
        let guard = self.route.lock().await;
        let Some(state) = guard.as_ref() else {
            return Reply::Error {
                message: "route_setup first".into(),
            };
        };
        let shared = &state.shared;
        shared.closed_loop.store(true, Ordering::SeqCst);
        for agent in state.agents.iter().filter(|a| a.id.starts_with("ra-")) {
            for _ in 0..window {
                let _ = agent
                    .tx
                    .send(Message::text(client::direct_frame(&agent.id, &agent.peer)));
            }
        }
        tokio::time::sleep(Duration::from_secs_f64(warmup_s)).await;
        let reply = record(shared, duration_s).await;
        shared.closed_loop.store(false, Ordering::SeqCst);
        // Let the chains die out before the next phase.
        tokio::time::sleep(Duration::from_secs(2)).await;
        reply
    }

    async fn route_open(&self, rate: f64, warmup_s: f64, duration_s: f64) -> Reply {
        let guard = self.route.lock().await;
        let Some(state) = guard.as_ref() else {
            return Reply::Error {
                message: "route_setup first".into(),
            };
        };
        let _ = state.echo;
        let senders: Vec<&RouteAgent> = state
            .agents
            .iter()
            .filter(|a| a.id.starts_with("ra-"))
            .collect();
        let period = Duration::from_secs_f64(senders.len().max(1) as f64 / rate.max(0.001));
        let total = Duration::from_secs_f64(warmup_s + duration_s);
        let mut tasks = Vec::new();
        for (i, agent) in senders.iter().enumerate() {
            let (tx, id, peer, shared) = (
                agent.tx.clone(),
                agent.id.clone(),
                agent.peer.clone(),
                state.shared.clone(),
            );
            let offset = period.mul_f64(i as f64 / senders.len() as f64);
            tasks.push(tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let mut tick = tokio::time::interval_at(started + offset, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                loop {
                    tick.tick().await;
                    if started.elapsed() >= total {
                        break;
                    }
                    if shared.recording.load(Ordering::Relaxed) {
                        shared.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    if tx
                        .send(Message::text(client::direct_frame(&id, &peer)))
                        .is_err()
                    {
                        break;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(warmup_s)).await;
        let reply = record(&state.shared, duration_s).await;
        for task in tasks {
            let _ = task.await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        reply
    }

    async fn route_teardown(&self) -> Reply {
        let state = self.route.lock().await.take();
        if let Some(state) = state {
            for agent in &state.agents {
                let _ = agent.tx.send(Message::Close(None));
            }
            drop(state.agents);
            for task in state.tasks {
                let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
            }
        }
        Reply::Done
    }

    async fn broadcast(
        self: &Arc<Self>,
        url: &str,
        agents: u64,
        rate: f64,
        warmup_s: f64,
        duration_s: f64,
    ) -> Reply {
        let target = match Target::parse(url) {
            Ok(t) => Arc::new(t),
            Err(message) => return Reply::Error { message },
        };
        let next = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let mut dialers = Vec::new();
        for _ in 0..32 {
            let (worker, target, next, failed, sockets) = (
                self.clone(),
                target.clone(),
                next.clone(),
                failed.clone(),
                sockets.clone(),
            );
            dialers.push(tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= agents {
                        break;
                    }
                    let id = format!("bc-{n}");
                    match client::dial_and_register(
                        &target,
                        worker.sources.pick(),
                        &id,
                        Duration::from_secs(60),
                    )
                    .await
                    {
                        Ok(reg) => sockets.lock().unwrap().push((id, reg.ws)),
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for d in dialers {
            let _ = d.await;
        }
        let sockets = std::mem::take(&mut *sockets.lock().unwrap());
        let recipients = sockets.len().saturating_sub(1) as u64;
        let recording = Arc::new(AtomicBool::new(false));
        let first_seq = Arc::new(AtomicU64::new(u64::MAX));
        let per_seq: Arc<Mutex<HashMap<u64, (u64, u32)>>> = Arc::default();
        let lats = Arc::new(Mutex::new(Vec::new()));
        let delivered = Arc::new(AtomicU64::new(0));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut sender = None;
        let mut readers = Vec::new();
        for (id, ws) in sockets {
            if id == "bc-0" {
                sender = Some(ws);
                continue;
            }
            let (first_seq, per_seq, lats, delivered, mut stop_rx) = (
                first_seq.clone(),
                per_seq.clone(),
                lats.clone(),
                delivered.clone(),
                stop_rx.clone(),
            );
            readers.push(tokio::spawn(async move {
                let mut ws = ws;
                loop {
                    tokio::select! {
                        _ = stop_rx.changed() => break,
                        msg = ws.next() => match msg {
                            Some(Ok(Message::Text(text))) => {
                                let frame = Frame::parse(text.as_str());
                                if let Some(ts) = frame.ping_timestamp() {
                                    let _ = ws.send(Message::text(client::pong_frame(ts))).await;
                                    continue;
                                }
                                let Some(content) = frame.bench_content() else { continue };
                                let (Some(t), Some(seq)) = (content.t, content.seq) else { continue };
                                if seq < first_seq.load(Ordering::Relaxed) {
                                    continue; // Sent during the warm-up.
                                }
                                let lat = now_us().saturating_sub(t).min(u32::MAX as u64) as u32;
                                delivered.fetch_add(1, Ordering::Relaxed);
                                lats.lock().unwrap().push(lat);
                                let mut per_seq = per_seq.lock().unwrap();
                                let entry = per_seq.entry(seq).or_insert((0, 0));
                                entry.0 += 1;
                                entry.1 = entry.1.max(lat);
                            }
                            Some(Ok(_)) => {}
                            _ => break,
                        }
                    }
                }
                client::close(ws).await;
            }));
        }
        let Some(mut sender) = sender else {
            let _ = stop_tx.send(true);
            return Reply::Error {
                message: "the broadcasting agent bc-0 could not register".into(),
            };
        };
        let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let mut tick = tokio::time::interval(period);
        let started = tokio::time::Instant::now();
        let warmup = Duration::from_secs_f64(warmup_s);
        let total = Duration::from_secs_f64(warmup_s + duration_s);
        let mut seq = 0u64;
        let mut sent = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let elapsed = started.elapsed();
                    if elapsed >= total { break; }
                    if elapsed >= warmup && !recording.load(Ordering::Relaxed) {
                        first_seq.store(seq, Ordering::SeqCst);
                        recording.store(true, Ordering::SeqCst);
                    }
                    if recording.load(Ordering::Relaxed) { sent += 1; }
                    let frame = client::broadcast_frame("bc-0", seq);
                    seq += 1;
                    if sender.send(Message::text(frame)).await.is_err() { break; }
                }
                msg = sender.next() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        if let Some(ts) = Frame::parse(text.as_str()).ping_timestamp() {
                            let _ = sender.send(Message::text(client::pong_frame(ts))).await;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
        }
        // Wait for the last broadcasts to arrive.
        let expected = sent * recipients;
        let wait_until = tokio::time::Instant::now() + Duration::from_secs(5);
        while delivered.load(Ordering::Relaxed) < expected
            && tokio::time::Instant::now() < wait_until
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop_tx.send(true);
        client::close(sender).await;
        for r in readers {
            let _ = tokio::time::timeout(Duration::from_secs(10), r).await;
        }
        let first = first_seq.load(Ordering::SeqCst);
        let completion_us = per_seq
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, (count, _))| **s >= first && *count >= recipients)
            .map(|(_, (_, max))| *max)
            .collect();
        let lat_us = std::mem::take(&mut *lats.lock().unwrap());
        Reply::Broadcasted {
            sent,
            delivered: delivered.load(Ordering::Relaxed),
            recipients,
            seconds: duration_s,
            lat_us,
            completion_us,
            failed: failed.load(Ordering::Relaxed),
        }
    }
}

/// Records receipts on `shared` for `duration_s` and returns the phase's numbers.
async fn record(shared: &RouteShared, duration_s: f64) -> Reply {
    shared.received.store(0, Ordering::SeqCst);
    shared.sent.store(0, Ordering::SeqCst);
    shared.lats.lock().unwrap().clear();
    shared.recording.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(duration_s)).await;
    shared.recording.store(false, Ordering::SeqCst);
    let seconds = started.elapsed().as_secs_f64();
    Reply::Routed {
        sent: shared.sent.load(Ordering::SeqCst),
        received: shared.received.load(Ordering::SeqCst),
        seconds,
        lat_us: std::mem::take(&mut *shared.lats.lock().unwrap()),
        closes: shared.closes.lock().unwrap().clone(),
    }
}

/// Writes queued frames to a socket, flushing once per batch.
async fn write_loop(mut sink: SplitSink<Ws, Message>, mut rx: mpsc::UnboundedReceiver<Message>) {
    while let Some(msg) = rx.recv().await {
        let closing = matches!(msg, Message::Close(_));
        if sink.feed(msg).await.is_err() {
            return;
        }
        while let Ok(more) = rx.try_recv() {
            if sink.feed(more).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() || closing {
            let _ = sink.close().await;
            return;
        }
    }
}

/// Reads a routing agent's socket: records bench messages, answers pings, and in the
/// closed loop answers every message with a new one to the peer.
async fn route_reader(
    mut stream: futures_util::stream::SplitStream<Ws>,
    id: Arc<str>,
    peer: Arc<str>,
    tx: mpsc::UnboundedSender<Message>,
    shared: Arc<RouteShared>,
) {
    let code = loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => {
                let frame = Frame::parse(text.as_str());
                if let Some(ts) = frame.ping_timestamp() {
                    let _ = tx.send(Message::text(client::pong_frame(ts)));
                    continue;
                }
                let Some(t) = frame.bench_content().and_then(|c| c.t) else {
                    continue;
                };
                if shared.recording.load(Ordering::Relaxed) {
                    shared.received.fetch_add(1, Ordering::Relaxed);
                    let lat = now_us().saturating_sub(t).min(u32::MAX as u64) as u32;
                    shared.lats.lock().unwrap().push(lat);
                }
                if shared.closed_loop.load(Ordering::Relaxed) {
                    if shared.recording.load(Ordering::Relaxed) {
                        shared.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = tx.send(Message::text(client::direct_frame(&id, &peer)));
                }
            }
            Some(Ok(Message::Close(c))) => break close_code(c),
            Some(Ok(_)) => {}
            Some(Err(_)) => break "error".to_owned(),
            None => break "eof".to_owned(),
        }
    };
    *shared.closes.lock().unwrap().entry(code).or_default() += 1;
}

/// Holds one registered socket: answers pings (unless silenced) and ends on the
/// server's close or the harness's stop.
async fn hold_socket(
    mut ws: Ws,
    last_sent: Arc<AtomicU64>,
    fleet: Arc<Fleet>,
    mut stop: watch::Receiver<bool>,
) {
    let code = loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    client::close(ws).await;
                    fleet.open.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let Some(ts) = Frame::parse(text.as_str()).ping_timestamp() else { continue };
                    fleet.pings.fetch_add(1, Ordering::Relaxed);
                    let lag = (now_us() as f64 - ts * 1e6).max(0.0).min(u32::MAX as f64) as u32;
                    fleet.lags.lock().unwrap().push(lag);
                    if !fleet.silent.load(Ordering::SeqCst) {
                        let _ = ws.send(Message::text(client::pong_frame(ts))).await;
                        last_sent.store(now_us(), Ordering::SeqCst);
                    }
                }
                Some(Ok(Message::Close(c))) => break close_code(c),
                Some(Ok(_)) => {}
                Some(Err(_)) => break "error".to_owned(),
                None => break "eof".to_owned(),
            }
        }
    };
    fleet.open.fetch_sub(1, Ordering::Relaxed);
    fleet.closed(code);
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.next()).await;
}
