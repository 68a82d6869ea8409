//! Nodes of a Tether network over the real Redis on 127.0.0.1:6379: each test starts
//! its own nodes (the real binary, on free ports) under a prefix of its own, so tests
//! never share keys.

use super::{http, Agent, TestServer, DEADLINE};
use futures_util::future::join_all;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The shared Redis, as the cluster URL.
pub const CLUSTER_REDIS: &str = "redis://127.0.0.1:6379";

/// Fails with a clear message when the shared Redis is not running.
pub fn require_redis() {
    if std::net::TcpStream::connect("127.0.0.1:6379").is_err() {
        panic!("the cluster tests need Redis on 127.0.0.1:6379 (scripts/test.sh starts it)");
    }
}

/// A prefix no other test (or run) uses.
pub fn fresh_prefix() -> String {
    format!("tether-test-{}", uuid::Uuid::new_v4().simple())
}

/// Starts one node of the cluster under `prefix`, with a `lease` in seconds, and waits
/// until it is a member (`/readyz` 200).
pub async fn node(prefix: &str, lease: &str, extra: &[(&str, &str)]) -> TestServer {
    require_redis();
    let mut env = vec![
        ("TETHER__CLUSTER__ENABLED", "true"),
        ("TETHER__CLUSTER__REDIS_URL", CLUSTER_REDIS),
        ("TETHER__CLUSTER__PREFIX", prefix),
        ("TETHER__CLUSTER__NODE_LEASE", lease),
        ("TETHER__IDENTITY__SECRET", "cluster-test-secret"),
    ];
    env.extend_from_slice(extra);
    let server = TestServer::start(&env);
    wait_readyz(&server, 200).await;
    server
}

/// Waits until `server` answers `/readyz` with `status` (200: a live member; 503: not).
pub async fn wait_readyz(server: &TestServer, status: u16) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let answered = http()
            .get(server.http("/readyz"))
            .send()
            .await
            .map(|r| r.status());
        if answered.is_ok_and(|s| s == status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {status}:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn cluster(n: usize, lease: &str) -> (String, Vec<TestServer>) {
    let prefix = fresh_prefix();
    let nodes = join_all((0..n).map(|_| node(&prefix, lease, &[]))).await;
    (prefix, nodes)
}

pub fn is_message(frame: &Value) -> bool {
    frame["message_type"].is_string() || frame["type"] == "message"
}

/// Registers ids `race-0`, `race-1`, … on two nodes at the same instant, `attempts`
/// times, and asserts that each time exactly one registration wins and the other is
/// refused `agent_id_in_use`.
pub async fn assert_one_winner_per_race(url1: &str, url2: &str, attempts: usize) {
    for attempt in 0..attempts {
        let id = format!("race-{attempt}");
        let (mut one, mut two) = tokio::join!(Agent::connect(url1), Agent::connect(url2));
        let register = json!({"type":"system_request","command":"register_agent","agent_id":id});
        let (r1, r2) = tokio::join!(one.request(register.clone()), two.request(register));
        let won = [&r1, &r2].iter().filter(|r| r["success"] == true).count();
        assert_eq!(won, 1, "attempt {attempt}: {r1} / {r2}");
        let lost = if r1["success"] == true { &r2 } else { &r1 };
        assert_eq!(lost["error_code"], "agent_id_in_use", "{lost}");
        tokio::join!(one.close(), two.close());
    }
}
