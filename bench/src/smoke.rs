//! `tether-bench smoke`: every workload in a tiny configuration, Tether and floor
//! only, for CI. Fails if a workload could not run at all; never asserts speed. The
//! cluster workload runs only when something listens on Redis's port.

use crate::{context, workloads, Common};
use std::path::PathBuf;

/// Every workload, tiny, Tether and floor only.
pub async fn run(out: Option<PathBuf>, tether_bin: Option<PathBuf>) -> Result<(), String> {
    let common = Common {
        systems: "tether,floor".into(),
        repeat: 1,
        out,
        tether_bin,
        venv: None,
        per_worker: 150,
    };
    let ctx = context(&common).await?;
    let mut failures = Vec::new();
    macro_rules! step {
        ($name:literal, $call:expr) => {
            eprintln!("tether-bench smoke: {}", $name);
            match $call.await {
                Ok(tables) => {
                    for table in &tables {
                        workloads::emit(&ctx, table);
                    }
                }
                Err(e) => {
                    eprintln!("tether-bench smoke: {} FAILED: {e}", $name);
                    failures.push(format!("{}: {e}", $name));
                }
            }
        };
    }
    step!(
        "idle-memory",
        workloads::idle_memory::run(
            &ctx,
            &workloads::idle_memory::Args {
                agents: vec![300],
                settle: 1.0,
                dialers: 16,
            }
        )
    );
    step!(
        "hostile",
        workloads::hostile::run(
            &ctx,
            &workloads::hostile::Args {
                fleet: 50,
                seconds: 0.5,
            }
        )
    );
    step!(
        "close-latency",
        workloads::close_latency::run(&ctx, &workloads::close_latency::Args { closes: 20 })
    );
    step!(
        "registration-rate",
        workloads::registration::run(
            &ctx,
            &workloads::registration::Args {
                agents: 300,
                dialers: 16,
                workers: 2,
            }
        )
    );
    step!(
        "heartbeat",
        workloads::heartbeat::run(
            &ctx,
            &workloads::heartbeat::Args {
                agents: vec![300],
                interval: 1.0,
                ping_timeout: 0.5,
                duration: 3.0,
                probe_rate: 5.0,
                dialers: 16,
            }
        )
    );
    step!(
        "dead-detection",
        workloads::dead_detection::run(
            &ctx,
            &workloads::dead_detection::Args {
                agents: 100,
                interval: 2.0,
                ping_timeout: 1.0,
            }
        )
    );
    step!(
        "routing",
        workloads::routing::run(
            &ctx,
            &workloads::routing::Args {
                pairs: 100,
                window: 2,
                duration: 2.0,
                warmup: 0.5,
                fixed_rate: 1000.0,
                broadcast_agents: 100,
                broadcast_rate: 10.0,
            }
        )
    );
    step!(
        "churn",
        workloads::churn::run(
            &ctx,
            &workloads::churn::Args {
                rate: 50.0,
                duration: 3.0,
                lifetime_ms: 500,
                workers: 2,
            }
        )
    );
    step!(
        "event-publishing",
        workloads::event_publishing::run(
            &ctx,
            &workloads::event_publishing::Args {
                brokers: vec!["redis".into(), "kafka".into(), "rabbitmq".into()],
                rate: 50.0,
                duration: 2.0,
                lifetime_ms: 100,
                workers: 1,
                at: Default::default(),
            }
        )
    );
    let mut brokers = Vec::new();
    let at = workloads::BrokerAddrs::default();
    for broker in ["redis", "kafka", "rabbitmq"] {
        let addr = at.addr(broker);
        if workloads::event_publishing::reachable(addr).await {
            brokers.push(broker.to_owned());
        } else {
            eprintln!("tether-bench smoke: publisher-throughput skips {broker}: nothing listens on {addr}");
        }
    }
    if !brokers.is_empty() {
        step!(
            "publisher-throughput",
            workloads::publisher_throughput::run(
                &ctx,
                &workloads::publisher_throughput::Args {
                    brokers,
                    events: 2000,
                    outage: 1.0,
                    rate: 200,
                    retry_max: 0.5,
                    at: Default::default(),
                    tansu: None,
                }
            )
        );
    }
    let redis = workloads::BrokerAddrs::default().redis;
    if workloads::event_publishing::reachable(&redis).await {
        step!(
            "cluster",
            workloads::cluster::run(
                &ctx,
                &workloads::cluster::Args {
                    agents: 300,
                    nodes: 2,
                    window: 2.0,
                    interval: 1.0,
                    ping_timeout: 0.5,
                    lease: 10.0,
                    dialers: 16,
                    pairs: 50,
                    rate: 500.0,
                    duration: 1.0,
                    warmup: 0.5,
                    loss_agents: 100,
                    loss_nodes: 2,
                    loss_lease: 2.0,
                    phases: vec!["hold".into(), "route".into(), "loss".into()],
                    redis,
                }
            )
        );
    } else {
        eprintln!("tether-bench smoke: cluster skipped: nothing listens on {redis}");
    }
    failures.extend(ctx.failures.lock().unwrap().drain(..));
    if failures.is_empty() {
        eprintln!("tether-bench smoke: every workload ran");
        Ok(())
    } else {
        Err(format!(
            "smoke: {} workload(s) could not run: {}",
            failures.len(),
            failures.join("; ")
        ))
    }
}
