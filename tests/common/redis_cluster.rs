//! A Redis Cluster a test owns: masters (and replicas) started on free ports, joined
//! with `redis-cli --cluster create`, killed when dropped.

use super::brokers::TempDir;
use super::DEADLINE;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tether_testkit::wait_listening;

/// A Redis Cluster the test owns: three masters, each with `replicas` replicas, on free
/// ports, each a `redis-server` with `cluster-enabled` (node timeout 1 s, so a dead
/// master fails over within seconds), joined with `redis-cli --cluster create`.
pub struct RedisClusterProcesses {
    /// Every node's port, masters first (as `redis-cli --cluster create` assigns them).
    pub ports: Vec<u16>,
    /// Each node's cluster bus port.
    buses: Vec<u16>,
    dirs: Vec<TempDir>,
    children: Vec<Option<Child>>,
}

/// Starts one cluster-enabled `redis-server` keeping its state (`nodes.conf`) in `dir`.
fn spawn(port: u16, bus: u16, dir: &TempDir) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
        // The bus port too (by default port + 10 000, which may be taken).
        .args(["--cluster-port", &bus.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        // Replicas in sync at once (a replica never synced does not fail over).
        .args(["--repl-diskless-sync-delay", "0"])
        .arg("--cluster-config-file")
        .arg(dir.0.join("nodes.conf"))
        .arg("--dir")
        .arg(&dir.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start redis-server: is Redis installed? (scripts/test.sh installs it)")
}

impl RedisClusterProcesses {
    /// Starts the nodes, creates the cluster, and waits until every node says
    /// `cluster_state:ok`.
    pub fn start(replicas: usize) -> Self {
        let nodes = 3 * (1 + replicas);
        // Client and bus ports, all distinct.
        let all = tether_testkit::free_ports(2 * nodes);
        let (ports, buses) = (all[..nodes].to_vec(), all[nodes..].to_vec());
        let mut dirs = Vec::new();
        let mut children = Vec::new();
        for (port, bus) in ports.iter().zip(&buses) {
            let dir = TempDir::new("tether-redis-cluster");
            children.push(Some(spawn(*port, *bus, &dir)));
            dirs.push(dir);
        }
        for port in &ports {
            wait_listening(*port, "redis-server", DEADLINE).unwrap_or_else(|e| panic!("{e}"));
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("cannot run redis-cli (it comes with redis-server)");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Self {
            ports,
            buses,
            dirs,
            children,
        };
        let all = cluster.ports.clone();
        cluster.wait_ok(&all);
        cluster
    }

    /// Waits until every node of `ports` says `cluster_state:ok`, and every replica
    /// among them is in sync with its master.
    pub fn wait_ok(&self, ports: &[u16]) {
        self.wait_until(ports, "became ok", |port| {
            let replication = self.cli(port, &["info", "replication"]);
            !replication.contains("role:slave") || replication.contains("master_link_status:up")
        });
    }

    /// `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// What `redis-cli -p <port> <args>` prints.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("cannot run redis-cli");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits until the survivors agree that node `index` failed and the cluster is ok
    /// again (its replica took over its slots).
    pub fn wait_failed_over(&self, index: usize) {
        let dead = format!(":{}@", self.ports[index]);
        let survivors: Vec<u16> = (0..self.ports.len())
            .filter(|i| *i != index)
            .map(|i| self.ports[i])
            .collect();
        self.wait_until(&survivors, "failed over", |port| {
            let nodes = self.cli(port, &["cluster", "nodes"]);
            nodes
                .lines()
                .any(|line| line.contains(&dead) && line.contains(",fail "))
        });
    }

    /// Starts a manual failover to replica `index` (`CLUSTER FAILOVER`): it becomes
    /// its master's master. Call [`ManualFailover::nudge`] while waiting for its effect.
    pub fn start_failover(&self, index: usize) -> ManualFailover<'_> {
        let failover = ManualFailover {
            cluster: self,
            port: self.ports[index],
            sent: Instant::now(),
        };
        failover.send();
        failover
    }

    /// Waits until each node of `ports` says `cluster_state:ok` and `also` holds for it
    /// (a condition of other processes, polled: nothing announces it).
    fn wait_until(&self, ports: &[u16], what: &str, also: impl Fn(u16) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !ports.iter().all(|port| {
            also(*port)
                && self
                    .cli(*port, &["cluster", "info"])
                    .contains("cluster_state:ok")
        }) {
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster never {what}: {}\n{}",
                self.cli(ports[0], &["cluster", "nodes"]),
                self.cli(ports[0], &["cluster", "info"])
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts node `index` again after [`kill`](Self::kill), with the cluster state it
    /// had (a failed-over master comes back as a replica), and waits until the cluster
    /// is ok with it in sync.
    pub fn restart(&mut self, index: usize) {
        assert!(self.children[index].is_none(), "node {index} is running");
        let port = self.ports[index];
        self.children[index] = Some(spawn(port, self.buses[index], &self.dirs[index]));
        wait_listening(port, "redis-server", DEADLINE).unwrap_or_else(|e| panic!("{e}"));
        let rejoined = format!(":{port}@");
        let all = self.ports.clone();
        self.wait_until(&all, "took the node back", |at| {
            let nodes = self.cli(at, &["cluster", "nodes"]);
            let replication = self.cli(at, &["info", "replication"]);
            let in_sync = !replication.contains("role:slave")
                || replication.contains("master_link_status:up");
            in_sync
                && nodes
                    .lines()
                    .any(|line| line.contains(&rejoined) && !line.contains("fail"))
        });
    }

    /// Kills node `index` (SIGKILL).
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.children[index].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisClusterProcesses {
    fn drop(&mut self) {
        for index in 0..self.children.len() {
            self.kill(index);
        }
    }
}

/// A manual failover in progress. Redis aborts one that does not complete within its
/// timeout (5 s), and says so only in its log, so [`nudge`](Self::nudge) sends the
/// command again while the node is still a replica after that long.
pub struct ManualFailover<'a> {
    cluster: &'a RedisClusterProcesses,
    port: u16,
    sent: Instant,
}

impl ManualFailover<'_> {
    /// Longer than Redis's manual failover timeout (`CLUSTER_MF_TIMEOUT`, 5 s).
    const ATTEMPT: Duration = Duration::from_secs(6);

    fn send(&self) {
        let answer = self.cluster.cli(self.port, &["cluster", "failover"]);
        assert!(
            answer.starts_with("OK"),
            "CLUSTER FAILOVER refused: {answer}"
        );
    }

    /// Sends `CLUSTER FAILOVER` again if the last one had time to complete and the node
    /// is still a replica.
    pub fn nudge(&mut self) {
        if self.sent.elapsed() >= Self::ATTEMPT
            && !self.cluster.cli(self.port, &["role"]).starts_with("master")
        {
            self.send();
            self.sent = Instant::now();
        }
    }
}
