//! Bystanders under attack (issue 10): while one hostile client attacks, how long does a
//! direct message between two other agents take? Tether only (the attacks are of its
//! own limits). A fleet of idle agents is registered (the broadcast recipients, each
//! read by a drain task); bystander `by-a` sends `by-b` a stamped direct message every
//! 10 ms; each phase runs one attack for `--seconds`, reconnecting the attacker
//! whenever the server closes it. Target: bystander p99 < 50 ms in every phase.

use super::{finish, num, opt, text, Ctx};
use crate::client::{dial_and_register, direct_frame, Frame, Target, Ws};
use crate::stats::{latency_ms, median, now_us, Row, Table};
use crate::systems::{Server, System, TetherVars};
use futures_util::{SinkExt, StreamExt};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::Message;

/// Options of `hostile`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Idle agents registered besides the bystanders (broadcast recipients).
    #[arg(long, default_value_t = 1000)]
    pub fleet: u64,
    /// Seconds each attack runs.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
}

/// The attacks, one per phase.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Attack {
    None,
    BroadcastExclusions,
    ListAgentsUnread,
    RequestFlood,
    ControlPingFlood,
    FragmentFlood,
    DeepNesting,
    ClaimFlood,
    BroadcastFlood,
    BroadcastFloodMany,
}

const ATTACKS: [Attack; 10] = [
    Attack::None,
    Attack::BroadcastExclusions,
    Attack::ListAgentsUnread,
    Attack::RequestFlood,
    Attack::ControlPingFlood,
    Attack::FragmentFlood,
    Attack::DeepNesting,
    Attack::ClaimFlood,
    Attack::BroadcastFlood,
    Attack::BroadcastFloodMany,
];

/// Connections of the many-connection broadcast flood.
const MANY: usize = 20;

impl Attack {
    fn label(self) -> &'static str {
        match self {
            Self::None => "none (baseline)",
            Self::BroadcastExclusions => "30 broadcasts/s, 1000 exclusions each",
            Self::ListAgentsUnread => "list_agents 100/s, never read",
            Self::RequestFlood => "ping_agent requests, as fast as written",
            Self::ControlPingFlood => "control pings, never read",
            Self::FragmentFlood => "empty continuation fragments",
            Self::DeepNesting => "frames of 100 000 nested arrays",
            Self::ClaimFlood => "claim_agent_id of fresh ids, unregistered",
            Self::BroadcastFlood => "1 KiB broadcasts, as fast as written",
            Self::BroadcastFloodMany => "the same from 20 connections at once",
        }
    }

    /// How many connections attack at once.
    fn connections(self) -> usize {
        match self {
            Self::None => 0,
            Self::BroadcastFloodMany => MANY,
            _ => 1,
        }
    }
}

/// What the attacker did in a phase.
#[derive(Default)]
struct Attacked {
    frames: AtomicU64,
    connections: AtomicU64,
}

/// Runs the workload and returns its table; `Err` when no run could run at all.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<Vec<Table>, String> {
    let mut per_attack: Vec<Vec<PhaseResult>> = vec![Vec::new(); ATTACKS.len()];
    let mut any_ok = false;
    for _ in 0..ctx.repeat {
        match once(ctx, args).await {
            Ok(results) => {
                any_ok = true;
                for (i, r) in results.into_iter().enumerate() {
                    per_attack[i].push(r);
                }
            }
            Err(e) => {
                eprintln!("tether-bench: hostile: tether: {e}");
                ctx.failures
                    .lock()
                    .unwrap()
                    .push(format!("hostile: tether: {e}"));
            }
        }
    }
    let mut table = Table::new(format!(
        "Bystanders under attack ({} idle agents, {} s per attack)",
        args.fleet, args.seconds
    ));
    for (attack, runs) in ATTACKS.iter().zip(per_attack) {
        let pick = |f: &dyn Fn(&PhaseResult) -> Option<f64>| {
            median(&runs.iter().filter_map(f).collect::<Vec<_>>())
        };
        let row: Row = vec![
            text("attack", attack.label()),
            num(
                "bystander messages",
                pick(&|r| Some(r.3 as f64)).unwrap_or(0.0),
                0,
            ),
            opt("p50 ms", pick(&|r| r.0), 2, "none"),
            opt("p99 ms", pick(&|r| r.1), 2, "none"),
            opt("max ms", pick(&|r| r.2), 1, "none"),
            num(
                "attacker frames",
                pick(&|r| Some(r.4 as f64)).unwrap_or(0.0),
                0,
            ),
            num(
                "attacker connections",
                pick(&|r| Some(r.5 as f64)).unwrap_or(0.0),
                0,
            ),
        ];
        table.rows.push(row);
    }
    table.notes.push(
        "Tether only, default limits (heartbeat interval 3600 s: no client here answers pings). Bystander latency = by-b's receive time − the stamp by-a put in the message (one clock), one message every 10 ms; attacker connections = how many sockets the attacker needed (the server closed the others: 4003 slow consumer, 1008 rate or invalid frames). Target p99 < 50 ms in every row.".into(),
    );
    finish(ctx, &mut table);
    if any_ok {
        Ok(vec![table])
    } else {
        Err("hostile: no run succeeded".into())
    }
}

/// p50, p99, max (ms), bystander messages, attacker frames, attacker connections.
type PhaseResult = (Option<f64>, Option<f64>, Option<f64>, u64, u64, u64);

async fn once(ctx: &Ctx, args: &Args) -> Result<Vec<PhaseResult>, String> {
    // The fleet and the bystanders do not answer pings: a heartbeat longer than the run.
    let vars = TetherVars::default()
        .set("HEARTBEAT__INTERVAL", 3600)
        .set("HEARTBEAT__AGENT_TIMEOUT", 7200)
        .set("HEARTBEAT__ACTIVITY_TIMEOUT", 7200);
    let server = Server::start(System::Tether, &ctx.env, &vars).await?;
    let target = Target::parse(&server.ws_url)?;
    let source = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let timeout = Duration::from_secs(10);
    let mut fleet_ids = Vec::new();
    for i in 0..args.fleet {
        let id = format!("idle-{i}");
        let agent = dial_and_register(&target, source, &id, timeout).await?;
        tokio::spawn(drain(agent.ws));
        fleet_ids.push(id);
    }
    let a = dial_and_register(&target, source, "by-a", timeout)
        .await?
        .ws;
    let mut b = dial_and_register(&target, source, "by-b", timeout)
        .await?
        .ws;
    let (mut a_tx, a_rx) = a.split();
    tokio::spawn(a_rx.for_each(|_| async {}));
    let mut results = Vec::new();
    for attack in ATTACKS {
        let stop = Arc::new(AtomicBool::new(false));
        let attacked = Arc::new(Attacked::default());
        let attackers: Vec<_> = (0..attack.connections())
            .map(|who| {
                tokio::spawn(attack_until(
                    attack,
                    who,
                    target.clone(),
                    stop.clone(),
                    attacked.clone(),
                ))
            })
            .collect();
        let phase = Duration::from_secs_f64(args.seconds);
        let started = Instant::now();
        let mut lat_us = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while started.elapsed() < phase {
            tokio::select! {
                _ = tick.tick() => {
                    a_tx.send(Message::text(direct_frame("by-a", "by-b")))
                        .await
                        .map_err(|e| format!("bystander send: {e}"))?;
                }
                next = b.next() => match next {
                    Some(Ok(Message::Text(t))) => {
                        if let Some(sent) = Frame::parse(t.as_str()).bench_content().and_then(|c| c.t) {
                            lat_us.push(now_us().saturating_sub(sent).min(u64::from(u32::MAX)) as u32);
                        }
                    }
                    Some(Ok(_)) => {}
                    other => return Err(format!("bystander by-b lost its connection: {other:?}")),
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::future::join_all(attackers),
        )
        .await;
        // Late messages of this phase count in it.
        let grace = Instant::now();
        while grace.elapsed() < Duration::from_millis(200) {
            match tokio::time::timeout(Duration::from_millis(200), b.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    if let Some(sent) = Frame::parse(t.as_str()).bench_content().and_then(|c| c.t) {
                        lat_us.push(now_us().saturating_sub(sent).min(u64::from(u32::MAX)) as u32);
                    }
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        let count = lat_us.len() as u64;
        let (p50, p99, max) = latency_ms(&mut lat_us);
        results.push((
            p50,
            p99,
            max,
            count,
            attacked.frames.load(Ordering::Relaxed),
            attacked.connections.load(Ordering::Relaxed),
        ));
    }
    server.stop().await;
    Ok(results)
}

/// Reads and discards everything `ws` receives.
async fn drain(mut ws: Ws) {
    while let Some(Ok(_)) = ws.next().await {}
}

/// A socket whose kernel receive buffer is small, so an attacker that never reads
/// makes the server hold what it sends.
async fn dial_small(target: &Target) -> Option<Ws> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.set_recv_buffer_size(4096).ok()?;
    let tcp = socket.connect(target.addr).await.ok()?;
    let (ws, _) = tokio_tungstenite::client_async(target.url.as_str(), tcp)
        .await
        .ok()?;
    Some(ws)
}

/// Runs `attack` as attacker number `who` until `stop`, reconnecting whenever the
/// server ends the socket.
async fn attack_until(
    attack: Attack,
    who: usize,
    target: Target,
    stop: Arc<AtomicBool>,
    attacked: Arc<Attacked>,
) {
    if attack == Attack::None {
        return;
    }
    let exclusions: Vec<String> = (0..1000).map(|i| format!("nobody-{i}")).collect();
    let broadcast =
        crate::client::protocol::broadcast(&serde_json::json!({"x": 1}), &exclusions, "attack");
    let flood = crate::client::protocol::broadcast(
        &serde_json::json!({"x": "x".repeat(1024)}),
        &[],
        "attack",
    );
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut generation = 0u64;
    while !stop.load(Ordering::Relaxed) {
        generation += 1;
        let Some(mut ws) = dial_small(&target).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        attacked.connections.fetch_add(1, Ordering::Relaxed);
        let id = format!("attacker-{who}-{generation}");
        let register = crate::client::register_frame(&id);
        let needs_registration = !matches!(attack, Attack::ClaimFlood | Attack::DeepNesting);
        if needs_registration && ws.send(Message::text(register)).await.is_err() {
            continue;
        }
        // Attacks that read their answers keep the socket drained in the background.
        let reads = matches!(
            attack,
            Attack::RequestFlood | Attack::ClaimFlood | Attack::DeepNesting | Attack::FragmentFlood
        );
        let (mut tx, rx) = ws.split();
        let reader = reads.then(|| tokio::spawn(rx.for_each(|_| async {})));
        let mut n = 0u64;
        let mut pace = tokio::time::interval(Duration::from_millis(match attack {
            Attack::BroadcastExclusions => 33,
            Attack::ListAgentsUnread => 10,
            _ => 1,
        }));
        let paced = matches!(
            attack,
            Attack::BroadcastExclusions | Attack::ListAgentsUnread
        );
        let mut fragmenting = false;
        let ended = loop {
            if stop.load(Ordering::Relaxed) {
                break false;
            }
            if paced {
                pace.tick().await;
            }
            let message = match attack {
                Attack::None => unreachable!(),
                Attack::BroadcastExclusions => Message::text(broadcast.clone()),
                Attack::ListAgentsUnread => {
                    Message::text(r#"{"type":"system_request","command":"list_agents"}"#)
                }
                Attack::RequestFlood => {
                    Message::text(r#"{"type":"system_request","command":"ping_agent"}"#)
                }
                Attack::ControlPingFlood => Message::Ping(vec![b'p'; 125].into()),
                Attack::FragmentFlood => {
                    let opcode = if fragmenting {
                        Data::Continue
                    } else {
                        Data::Text
                    };
                    fragmenting = true;
                    Message::Frame(WsFrame::message(Vec::new(), OpCode::Data(opcode), false))
                }
                Attack::DeepNesting => Message::text(deep.clone()),
                Attack::BroadcastFlood | Attack::BroadcastFloodMany => Message::text(flood.clone()),
                Attack::ClaimFlood => Message::text(format!(
                    r#"{{"type":"system_request","command":"claim_agent_id","agent_id":"claim-{generation}-{n}"}}"#
                )),
            };
            // Feed, flushing every 64 frames (or every frame when paced).
            let sent = if paced || n % 64 == 0 {
                tx.send(message).await
            } else {
                tx.feed(message).await
            };
            if sent.is_err() {
                break true;
            }
            n += 1;
            attacked.frames.fetch_add(1, Ordering::Relaxed);
            if n % 256 == 0 {
                tokio::task::yield_now().await;
            }
        };
        if let Some(reader) = reader {
            reader.abort();
        }
        if !ended {
            break;
        }
    }
}
