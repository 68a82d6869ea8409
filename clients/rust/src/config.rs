//! What an agent is and how it behaves: its id and metadata, where its certificate
//! lives, how it reconnects and how it notices a dead connection.

use backon::{BackoffBuilder, ExponentialBuilder};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::Duration;

/// Everything [`Agent::connect`](crate::Agent::connect) needs.
///
/// ```
/// use tether_client::{AgentConfig, INSTRUCTIONS_CAPABILITY};
/// let config = AgentConfig::new("ws://127.0.0.1:8570/", "worker-1")
///     .name("Worker 1")
///     .capability(INSTRUCTIONS_CAPABILITY)
///     .certificate_file("worker-1.certificate.json");
/// assert_eq!(config.agent_id(), "worker-1");
/// ```
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub(crate) url: String,
    pub(crate) agent_id: String,
    pub(crate) name: Option<String>,
    pub(crate) metadata: Map<String, Value>,
    pub(crate) capabilities: Vec<String>,
    pub(crate) certificate_file: Option<PathBuf>,
    pub(crate) force_reconnect: bool,
    pub(crate) reconnect: ReconnectPolicy,
    pub(crate) keepalive: Option<Keepalive>,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) event_buffer: usize,
}

impl AgentConfig {
    /// An agent `agent_id` of the server at `url` (`ws://host:port/`), with no
    /// capabilities, its certificate kept in memory, and the default policies.
    pub fn new(url: impl Into<String>, agent_id: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            agent_id: agent_id.into(),
            name: None,
            metadata: Map::new(),
            capabilities: Vec::new(),
            certificate_file: None,
            force_reconnect: false,
            reconnect: ReconnectPolicy::default(),
            keepalive: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            event_buffer: 1024,
        }
    }

    /// The agent id it registers.
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The server URL it connects to first.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `metadata.name` (default: the agent id).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// One more metadata field (`name` and `capabilities` have their own setters,
    /// which win over a field of the same key set here).
    pub fn metadata(mut self, key: impl Into<String>, value: Value) -> Self {
        self.metadata.insert(key.into(), value);
        self
    }

    /// Adds a capability (`metadata.capabilities`); list
    /// [`INSTRUCTIONS_CAPABILITY`](crate::INSTRUCTIONS_CAPABILITY) to receive instructions.
    pub fn capability(mut self, capability: impl Into<String>) -> Self {
        self.capabilities.push(capability.into());
        self
    }

    /// Keeps the certificate in this JSON file (written with mode 0600, replaced
    /// atomically), so a restarted process can take its id back too. Default: memory.
    pub fn certificate_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.certificate_file = Some(path.into());
        self
    }

    /// Sends `force_reconnect: true` with every registration: takes the id from any
    /// live connection, certificate or not, where the server allows it. Default false.
    pub fn force_reconnect(mut self, force: bool) -> Self {
        self.force_reconnect = force;
        self
    }

    /// How to reconnect after losing the connection.
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// How to notice a dead connection. Default: derived from the server's heartbeat
    /// settings in the registration answer (see [`Keepalive`]).
    pub fn keepalive(mut self, keepalive: Keepalive) -> Self {
        self.keepalive = Some(keepalive);
        self
    }

    /// Time allowed for the TCP connect, the WebSocket upgrade and the registration
    /// answer of one attempt, and as much again for the certificate claim after it.
    /// Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Time allowed for the answer to a request such as `list_agents`. Default 10 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Events held for the application before the agent stops reading its socket.
    /// Default 1024.
    pub fn event_buffer(mut self, events: usize) -> Self {
        self.event_buffer = events.max(1);
        self
    }

    /// The `metadata` object sent with `register_agent`.
    pub(crate) fn registration_metadata(&self) -> Value {
        let mut metadata = self.metadata.clone();
        let name = self.name.clone().unwrap_or_else(|| self.agent_id.clone());
        metadata.insert("name".into(), Value::String(name));
        if !self.capabilities.is_empty() {
            metadata.insert("capabilities".into(), self.capabilities.clone().into());
        }
        Value::Object(metadata)
    }
}

/// Reconnection: exponential backoff with jitter, bounded.
///
/// The n-th attempt waits `initial_delay × factorⁿ⁻¹`, at most `max_delay`, plus (with
/// `jitter`) a random part of up to as much again, so a fleet that lost one server does
/// not come back in one wave. The delays carry on across connections that end within
/// `max_delay` of being made; a connection that lasted longer starts them over (and
/// `max_attempts` counts from there).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReconnectPolicy {
    /// Delay before the first attempt. Default 100 ms.
    pub initial_delay: Duration,
    /// Longest delay between two attempts. Default 10 s.
    pub max_delay: Duration,
    /// Growth of the delay per attempt (at least 1). Default 2.
    pub factor: f32,
    /// Random extra delay. Default true.
    pub jitter: bool,
    /// Attempts before giving up (the agent then stops); `None`: never give up.
    pub max_attempts: Option<usize>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            factor: 2.0,
            jitter: true,
            max_attempts: None,
        }
    }
}

impl ReconnectPolicy {
    /// The delays of one reconnection, attempt after attempt.
    pub fn delays(&self) -> impl Iterator<Item = Duration> {
        let mut builder = ExponentialBuilder::new()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor.max(1.0));
        builder = match self.max_attempts {
            Some(attempts) => builder.with_max_times(attempts),
            None => builder.without_max_times(),
        };
        if self.jitter {
            builder = builder.with_jitter();
        }
        builder.build()
    }
}

/// When a connection counts as dead.
///
/// When nothing at all has come from the server for `idle`, the agent sends a
/// `ping_agent` of its own; when nothing comes within `timeout` after that, it drops
/// the connection and reconnects. By default `idle` is the server's
/// `heartbeat_interval + ping_timeout` (a server pings a silent agent every interval,
/// so a live connection is never idle that long) and `timeout` its `ping_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence from the server before the agent pings it.
    pub idle: Duration,
    /// Time the server has to answer that ping.
    pub timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_up_to_the_maximum_and_stop_after_max_attempts() {
        let policy = ReconnectPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(800),
            factor: 2.0,
            jitter: false,
            max_attempts: Some(6),
        };
        let delays: Vec<u64> = policy.delays().map(|d| d.as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 800, 800]);
    }

    #[test]
    fn jitter_adds_at_most_the_delay_again() {
        let policy = ReconnectPolicy {
            max_attempts: Some(200),
            max_delay: Duration::from_millis(400),
            ..ReconnectPolicy::default()
        };
        let delays: Vec<Duration> = policy.delays().collect();
        assert_eq!(delays.len(), 200);
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(100)));
        assert!(delays.iter().all(|d| *d < Duration::from_millis(800)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(
            distinct.len() > 10,
            "jitter makes delays differ: {delays:?}"
        );
    }

    #[test]
    fn metadata_carries_name_and_capabilities() {
        let config = AgentConfig::new("ws://x/", "a")
            .metadata("role", "tester".into())
            .capability("instructions");
        let metadata = config.registration_metadata();
        assert_eq!(metadata["name"], "a");
        assert_eq!(metadata["role"], "tester");
        assert_eq!(
            metadata["capabilities"],
            serde_json::json!(["instructions"])
        );
    }
}
