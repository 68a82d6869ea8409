//! The routing workload's broadcast command: `broadcast` registers `agents` agents,
//! one (`bc-0`) broadcasts at `rate` per second and every other one records when
//! each broadcast reached it, so the reply has per-recipient latency and the time
//! until a broadcast reached everyone.

use super::Worker;
use crate::client::{self, Frame, Target};
use crate::stats::now_us;
use crate::wire::Reply;
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

impl Worker {
    pub(super) async fn broadcast(
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
        let delivered = Arc::new(AtomicU64::new(0));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut sender = None;
        let mut readers = Vec::new();
        for (id, ws) in sockets {
            if id == "bc-0" {
                sender = Some(ws);
                continue;
            }
            let (first_seq, delivered, mut stop_rx) =
                (first_seq.clone(), delivered.clone(), stop_rx.clone());
            // Each recipient keeps what it saw to itself (no lock per copy, which would
            // add the harness's own contention to every latency); merged at the end.
            readers.push(tokio::spawn(async move {
                let mut ws = ws;
                let mut seen: Vec<(u64, u32)> = Vec::new();
                loop {
                    tokio::select! {
                        _ = stop_rx.changed() => break,
                        msg = ws.next() => match msg {
                            Some(Ok(Message::Text(text))) => {
                                let frame = Frame::parse(text.as_str());
                                if let Some(ts) = frame.ping_timestamp() {
                                    let _ = ws.send(Message::text(client::protocol::pong(ts))).await;
                                    continue;
                                }
                                let Some(content) = frame.bench_content() else { continue };
                                let (Some(t), Some(seq)) = (content.t, content.seq) else { continue };
                                if seq < first_seq.load(Ordering::Relaxed) {
                                    continue; // Sent during the warm-up.
                                }
                                let lat = now_us().saturating_sub(t).min(u32::MAX as u64) as u32;
                                seen.push((seq, lat));
                                delivered.fetch_add(1, Ordering::Relaxed);
                            }
                            Some(Ok(_)) => {}
                            _ => break,
                        }
                    }
                }
                client::close(ws).await;
                seen
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
                            let _ = sender.send(Message::text(client::protocol::pong(ts))).await;
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
        // Per broadcast: how many recipients had it, and the latest of them.
        let mut per_seq: HashMap<u64, (u64, u32)> = HashMap::new();
        let mut lat_us = Vec::new();
        for r in readers {
            if let Ok(Ok(seen)) = tokio::time::timeout(Duration::from_secs(10), r).await {
                for (seq, lat) in seen {
                    lat_us.push(lat);
                    let entry = per_seq.entry(seq).or_insert((0, 0));
                    entry.0 += 1;
                    entry.1 = entry.1.max(lat);
                }
            }
        }
        let first = first_seq.load(Ordering::SeqCst);
        let completion_us = per_seq
            .iter()
            .filter(|(s, (count, _))| **s >= first && *count >= recipients)
            .map(|(_, (_, max))| *max)
            .collect();
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
