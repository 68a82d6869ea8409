//! The churn workload's commands: `churn` opens connections at a steady rate, each
//! living `lifetime_ms` before it closes (also the event-publishing workload's
//! event generator), and `list_count` asks the server how many agents it lists
//! (registry accuracy after the churn).

use super::{close_code, push_error, Worker};
use crate::client::{self, Frame, Target};
use crate::wire::Reply;
use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

impl Worker {
    pub(super) async fn list_count(&self, url: &str, agent_id: &str) -> Reply {
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

    pub(super) async fn churn(
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
                                    let _ = ws.send(Message::text(client::protocol::pong(ts))).await;
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
}
