//! The routing workload's direct-message commands: `route_setup` registers pairs of
//! agents (`ra-N` ↔ `rb-N`), `route_closed` keeps a window of messages in flight
//! per pair (each receipt answered with a new message), `route_open` sends at a
//! fixed rate, and `route_teardown` closes them.

use super::{close_code, push_error, Worker};
use crate::client::{self, Frame, Target, Ws};
use crate::stats::now_us;
use crate::wire::Reply;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// The routing agents of `route_setup`.
pub(super) struct RouteState {
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
    /// The recorded window by send time (µs; 0..0 before the first): messages sent in
    /// it are counted when sent and when they arrive, whenever that is, so losses are
    /// told from messages still in flight when the window closed.
    window_start_us: AtomicU64,
    window_end_us: AtomicU64,
    window_sent: AtomicU64,
    window_arrived: AtomicU64,
    lats: Mutex<Vec<u32>>,
    closes: Mutex<BTreeMap<String, u64>>,
}

impl RouteShared {
    /// Whether a message stamped `t_us` was sent in the recorded window.
    fn in_window(&self, t_us: u64) -> bool {
        t_us >= self.window_start_us.load(Ordering::Relaxed)
            && t_us < self.window_end_us.load(Ordering::Relaxed)
    }
}

impl Worker {
    pub(super) async fn route_setup(
        self: &Arc<Self>,
        url: &str,
        urls: &[String],
        pairs: u64,
        echo: bool,
    ) -> Reply {
        let urls: Vec<&str> = if urls.is_empty() {
            vec![url]
        } else {
            urls.iter().map(String::as_str).collect()
        };
        let mut targets = Vec::new();
        for url in &urls {
            match Target::parse(url) {
                Ok(t) => targets.push(Arc::new(t)),
                Err(message) => return Reply::Error { message },
            }
        }
        let n = targets.len() as u64;
        let mut ids = Vec::new();
        for i in 0..pairs {
            let (a, b) = ((i % n) as usize, ((i + 1) % n) as usize);
            ids.push((format!("ra-{i}"), format!("rb-{i}"), targets[a].clone()));
            ids.push((format!("rb-{i}"), format!("ra-{i}"), targets[b].clone()));
        }
        // Dial in an order unrelated to the pairs, as a fleet's agents connect. Dialled
        // alternately (ra-0, rb-0, ra-1, …), every sender landed on the same worker of a
        // server that deals connections to its workers in turn (actix-server does), so the
        // open loop measured that one worker instead of the server.
        let order = BuildHasherDefault::<DefaultHasher>::default();
        ids.sort_by_cached_key(|(id, _, _)| order.hash_one(id));
        let shared = Arc::new(RouteShared::default());
        let errors = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicU64::new(0));
        let results = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicUsize::new(0));
        let ids = Arc::new(ids);
        let mut dialers = Vec::new();
        for _ in 0..32 {
            let (worker, ids, next, errors, failed, results) = (
                self.clone(),
                ids.clone(),
                next.clone(),
                errors.clone(),
                failed.clone(),
                results.clone(),
            );
            dialers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((id, peer, target)) = ids.get(i) else {
                        break;
                    };
                    match client::dial_and_register(
                        target,
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

    pub(super) async fn route_closed(&self, window: u64, warmup_s: f64, duration_s: f64) -> Reply {
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

    pub(super) async fn route_open(&self, rate: f64, warmup_s: f64, duration_s: f64) -> Reply {
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
                    let t = now_us();
                    if shared.in_window(t) {
                        shared.window_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    if tx
                        .send(Message::text(client::direct_frame_at(&id, &peer, t)))
                        .is_err()
                    {
                        break;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(warmup_s)).await;
        let mut reply = record(&state.shared, duration_s).await;
        for task in tasks {
            let _ = task.await;
        }
        // What was sent in the window and has not arrived a second after the last send
        // is lost.
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Reply::Routed { lost, .. } = &mut reply {
            let sent = state.shared.window_sent.load(Ordering::SeqCst);
            let arrived = state.shared.window_arrived.load(Ordering::SeqCst);
            *lost = Some(sent.saturating_sub(arrived));
        }
        reply
    }

    pub(super) async fn route_teardown(&self) -> Reply {
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
}

/// Records receipts on `shared` for `duration_s` and returns the phase's numbers.
async fn record(shared: &RouteShared, duration_s: f64) -> Reply {
    shared.received.store(0, Ordering::SeqCst);
    shared.lats.lock().unwrap().clear();
    shared.window_sent.store(0, Ordering::SeqCst);
    shared.window_arrived.store(0, Ordering::SeqCst);
    shared.window_end_us.store(u64::MAX, Ordering::SeqCst);
    shared.window_start_us.store(now_us(), Ordering::SeqCst);
    shared.recording.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(duration_s)).await;
    shared.window_end_us.store(now_us(), Ordering::SeqCst);
    shared.recording.store(false, Ordering::SeqCst);
    let seconds = started.elapsed().as_secs_f64();
    Reply::Routed {
        received: shared.received.load(Ordering::SeqCst),
        seconds,
        lat_us: std::mem::take(&mut *shared.lats.lock().unwrap()),
        closes: shared.closes.lock().unwrap().clone(),
        lost: None,
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
                    let _ = tx.send(Message::text(client::protocol::pong(ts)));
                    continue;
                }
                let Some(t) = frame.bench_content().and_then(|c| c.t) else {
                    continue;
                };
                if shared.in_window(t) {
                    shared.window_arrived.fetch_add(1, Ordering::Relaxed);
                }
                if shared.recording.load(Ordering::Relaxed) {
                    shared.received.fetch_add(1, Ordering::Relaxed);
                    let lat = now_us().saturating_sub(t).min(u32::MAX as u64) as u32;
                    shared.lats.lock().unwrap().push(lat);
                }
                if shared.closed_loop.load(Ordering::Relaxed) {
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
