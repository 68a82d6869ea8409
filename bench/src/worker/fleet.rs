//! The fleet a worker holds for the idle-memory, registration, heartbeat and
//! dead-detection workloads: `hold` registers agents and keeps their sockets open
//! (answering pings), `silence` stops the answers, `report` and `close_all` read
//! and end the fleet, and `probe` times registrations while the fleet is held.

use super::{close_code, push_error, Worker, MAX_ERRORS};
use crate::client::{self, Frame, Target, Ws};
use crate::stats::now_us;
use crate::wire::Reply;
use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// The sockets held by `hold` commands.
#[derive(Default)]
pub(super) struct Fleet {
    /// Whether held sockets answer pings (cleared by `silence`).
    silent: AtomicBool,
    /// Sockets held now.
    pub(super) open: AtomicU64,
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

impl Worker {
    pub(super) async fn hold(
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

    pub(super) async fn silence(&self) -> Reply {
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

    pub(super) fn report(&self) -> Reply {
        Reply::Report {
            open: self.fleet.open.load(Ordering::Relaxed),
            pings: self.fleet.pings.swap(0, Ordering::Relaxed),
            ping_lag_us: std::mem::take(&mut *self.fleet.lags.lock().unwrap()),
            closes: self.fleet.closes.lock().unwrap().clone(),
        }
    }

    pub(super) async fn close_all(&self) -> Reply {
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

    pub(super) async fn probe(
        &self,
        url: &str,
        prefix: &str,
        count: u64,
        interval_ms: u64,
    ) -> Reply {
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
                        let _ = ws.send(Message::text(client::protocol::pong(ts))).await;
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
