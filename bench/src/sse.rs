//! A subscriber to Tether's `GET /events` server-sent-event stream that keeps, for
//! every lifecycle event, when it arrived and the few fields the workloads check.

use crate::stats::now_us;
use futures_util::StreamExt;
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tether_testkit::sse::SseDecoder;

/// One received event.
#[derive(Debug, Clone)]
pub struct Seen {
    /// When the harness read it, epoch µs.
    pub at_us: u64,
    /// `type`, e.g. `agent.stale`.
    pub kind: String,
    /// `subject` (the agent id).
    pub subject: String,
    /// `data.incarnation`.
    pub incarnation: u64,
    /// `data.reason`, when there is one (e.g. `node_lost`).
    pub reason: Option<String>,
}

#[derive(Deserialize)]
struct Doc {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    data: Option<DocData>,
}

#[derive(Deserialize)]
struct DocData {
    #[serde(default)]
    incarnation: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

/// A running subscription.
pub struct EventTap {
    events: Arc<Mutex<Vec<Seen>>>,
    ended: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl EventTap {
    /// Subscribes to `{http}/events` and returns once subscribed.
    pub async fn start(http: &str) -> Result<EventTap, String> {
        let url = format!("{http}/events");
        let response = reqwest::Client::new()
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url} answered {}", response.status()));
        }
        let events: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let ended = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = {
            let (events, ended) = (events.clone(), ended.clone());
            tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                let mut body = response.bytes_stream();
                let mut decoder = SseDecoder::new();
                while let Some(Ok(chunk)) = body.next().await {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                    let at_us = now_us();
                    decoder.push(&chunk);
                    while let Some(block) = decoder.next_block() {
                        let Some(data) = block.data() else {
                            continue;
                        };
                        let Ok(doc) = serde_json::from_str::<Doc>(data) else {
                            continue;
                        };
                        let d = doc.data.unwrap_or(DocData {
                            incarnation: None,
                            reason: None,
                        });
                        events.lock().unwrap().push(Seen {
                            at_us,
                            kind: doc.kind,
                            subject: doc.subject.unwrap_or_default(),
                            incarnation: d.incarnation.unwrap_or(0),
                            reason: d.reason,
                        });
                    }
                }
                ended.store(true, Ordering::SeqCst);
            })
        };
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .map_err(|_| format!("{url}: no data within 10 s"))?
            .map_err(|_| format!("{url}: the stream ended at once"))?;
        Ok(EventTap {
            events,
            ended,
            task,
        })
    }

    /// A copy of the events seen so far.
    pub fn snapshot(&self) -> Vec<Seen> {
        self.events.lock().unwrap().clone()
    }

    /// Events seen so far of `kind`.
    pub fn count(&self, kind: &str) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.kind == kind)
            .count()
    }

    /// Whether the server ended the stream (e.g. cut this subscriber off).
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Stops the subscription.
    pub fn stop(self) {
        self.task.abort();
    }
}
