//! The cluster under test: K Tether nodes started from the release binary with the
//! cluster settings (one shared Redis, a key prefix unique to the run, one identity
//! secret, each node on a port of its own with a log of its own), plus what the
//! workload reads around them: the sum of Redis `INFO commandstats` calls, each node's
//! `GET /cluster/nodes` view and `GET /stats`.

use crate::systems::{start_tether_logging_to, Env, Server, TetherVars};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Running nodes of one cluster.
pub struct Nodes {
    /// The nodes, in start order.
    pub servers: Vec<Server>,
}

impl Nodes {
    /// Starts `count` nodes sharing `redis` (host:port, or several, comma-separated: the
    /// masters of a Redis Cluster) with a fresh prefix, a node
    /// lease of `lease` seconds and the extra `vars`; `tag` names the log files.
    pub async fn start(
        env: &Env,
        count: usize,
        redis: &str,
        lease: f64,
        vars: &TetherVars,
        tag: &str,
    ) -> Result<Nodes, String> {
        let prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let mut all = vars
            .clone()
            .set("CLUSTER__ENABLED", "true")
            .set("CLUSTER__REDIS_URL", redis_url(redis))
            .set("CLUSTER__PREFIX", &prefix)
            .set("CLUSTER__NODE_LEASE", lease)
            .set("IDENTITY__SECRET", "tether-bench-cluster-secret");
        // The Tether default is 10 000 agents per node; the harness raises it for every
        // system (systems.rs), repeated here so the cluster totals say the same.
        all = all.set("NETWORK__MAX_CONNECTIONS", 1_000_000);
        let mut servers = Vec::new();
        for i in 0..count {
            match start_tether_logging_to(env, &all, &format!("tether-{tag}-node{i}.log")).await {
                Ok(server) => servers.push(server),
                Err(e) => {
                    for server in servers {
                        server.stop().await;
                    }
                    return Err(format!("node {i}: {e}"));
                }
            }
        }
        eprintln!("tether-bench cluster: {count} nodes ({tag}), Redis prefix {prefix}");
        let nodes = Nodes { servers };
        nodes.wait_for_members(count).await?;
        Ok(nodes)
    }

    /// Waits (≤ 20 s) until node 0 lists `count` live nodes.
    async fn wait_for_members(&self, count: usize) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let seen = self.agents_per_node().await.map(|a| a.len()).unwrap_or(0);
            if seen >= count {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "GET /cluster/nodes lists {seen} of {count} nodes after 20 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// WebSocket URLs of the nodes, in order.
    pub fn ws_urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.ws_url.clone()).collect()
    }

    /// Agent counts of the live nodes as node 0 sees them (`GET /cluster/nodes`).
    pub async fn agents_per_node(&self) -> Option<Vec<u64>> {
        let base = self.servers.first()?.http_url.as_ref()?;
        let doc: serde_json::Value = reqwest::Client::new()
            .get(format!("{base}/cluster/nodes"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Some(
            doc["nodes"]
                .as_array()?
                .iter()
                .map(|n| n["agents"].as_u64().unwrap_or(0))
                .collect(),
        )
    }

    /// Sum over the nodes of `heartbeat.stale_declared` in `GET /stats` (`None` if a
    /// node did not answer).
    pub async fn stale_declared(&self) -> Option<u64> {
        let mut sum = 0;
        for server in &self.servers {
            sum += server.stats().await?["heartbeat"]["stale_declared"].as_u64()?;
        }
        Some(sum)
    }

    /// Resident memory of every node, summed, KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.servers.iter().map(Server::rss_kib).sum()
    }

    /// CPU seconds of every node, summed.
    pub fn cpu_secs(&self) -> Option<f64> {
        self.servers.iter().map(Server::cpu_secs).sum()
    }

    /// Stops every node (SIGTERM, then SIGKILL) and removes nothing from Redis: the
    /// keys carry the run's prefix and expire with the leases.
    pub async fn stop(self) {
        for server in self.servers {
            server.stop().await;
        }
    }
}

/// `cluster.redis_url` for `redis`: one server, or a Redis Cluster's seeds.
pub fn redis_url(redis: &str) -> String {
    if redis.contains(',') {
        format!("redis+cluster://{redis}")
    } else {
        format!("redis://{redis}")
    }
}

/// [`redis_calls_at`] summed over every address of `redis` (comma-separated: every
/// master of a Redis Cluster).
pub async fn redis_calls(redis: &str) -> Result<u64, String> {
    let mut total = 0;
    for addr in redis.split(',') {
        total += redis_calls_at(addr.trim()).await?;
    }
    Ok(total)
}

/// Sum of `calls` over every command in Redis `INFO commandstats` at `addr`, minus the
/// `INFO` that reads it. Redis counts commands server-wide: deltas include whatever
/// else used that Redis meanwhile.
pub async fn redis_calls_at(addr: &str) -> Result<u64, String> {
    let read = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("redis {addr}: {e}"))?;
        stream
            .write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
            .await
            .map_err(|e| format!("redis {addr}: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("redis {addr}: {e}"))?;
            if n == 0 {
                return Err(format!("redis {addr}: connection closed"));
            }
            buf.extend_from_slice(&chunk[..n]);
            let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
                continue;
            };
            let header = std::str::from_utf8(&buf[..eol]).map_err(|e| e.to_string())?;
            let len: usize = header
                .strip_prefix('$')
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| format!("redis {addr}: unexpected answer {header:?}"))?;
            if buf.len() >= eol + 2 + len {
                let body = String::from_utf8_lossy(&buf[eol + 2..eol + 2 + len]).into_owned();
                return Ok(body);
            }
        }
    };
    let body = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| format!("redis {addr}: no INFO answer within 10 s"))??;
    let calls: u64 = body
        .lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .filter_map(|l| {
            l.split(':')
                .nth(1)?
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse::<u64>()
                .ok()
        })
        .sum();
    Ok(calls.saturating_sub(1))
}
