//! The two phases on a running server: [`throughput`] (`--concurrency` creates in
//! flight for `--duration` seconds, the backlog drained, a sample read back) and
//! [`latency`] (open loop at a fixed rate, create→ack latency and lost instructions),
//! plus the create request they share.

use super::fleet::{agent_id, Seen};
use super::Args;
use crate::stats::{latency_ms, now_us, Row};
use crate::systems::Server;
use crate::workloads::{num, opt, text};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Seconds the latency phase waits after its window for instructions still on their
/// way; one not received by then is lost.
pub(super) const LOST_AFTER_S: f64 = 5.0;
/// Longest wait for the throughput phase's backlog to drain.
const DRAIN_TIMEOUT_S: f64 = 120.0;

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
pub(super) async fn throughput(
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
pub(super) async fn latency(
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
