//! The agents of the workload, in this process: one tokio-tungstenite task each,
//! registered as taking instructions, acknowledging every instruction `done` the moment
//! it arrives and answering pings; [`Seen`] is what they saw, shared with the phases.

use crate::client::{self, Target, Ws};
use crate::stats::now_us;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// What the agents saw, shared by their tasks.
#[derive(Default)]
pub(super) struct Seen {
    /// Throughput phase: (ack send time µs, instruction id).
    pub(super) tput: Mutex<Vec<(u64, String)>>,
    /// Latency phase: (seq, sent_at_us from the payload, ack send time µs).
    pub(super) lat: Mutex<Vec<(u64, u64, u64)>>,
    /// Instruction frames received with `attempt` above 1.
    pub(super) redelivered: AtomicU64,
    /// Server pings answered.
    pub(super) pings: AtomicU64,
    /// `error` frames received.
    pub(super) errors: AtomicU64,
    pub(super) first_error: Mutex<Option<String>>,
    /// Agent sockets that ended before the harness closed them.
    pub(super) dropped: AtomicU64,
    pub(super) first_drop: Mutex<Option<String>>,
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
pub(super) struct Fleet {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Registers `count` agents `bi-0` .. on `url` (64 at a time) and starts their tasks.
    pub(super) async fn open(url: &str, count: u64, seen: Arc<Seen>) -> Result<Fleet, String> {
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
    pub(super) async fn close(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

pub(super) fn agent_id(n: u64) -> String {
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
