//! Typed settings the actors run with.
//!
//! The server binary loads these from `config/default.toml`, an optional file and the
//! environment, validates them, and hands them to the actors. Every duration is in
//! seconds (fractions allowed), as in the configuration files.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// All of the server's settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Listener, identity of the network and registration limits.
    pub network: NetworkSettings,
    /// Liveness detection.
    pub heartbeat: HeartbeatSettings,
    /// Per-connection resource limits.
    pub limits: LimitsSettings,
    /// Certificates and takeover rules.
    pub identity: IdentitySettings,
    /// Admin API protection.
    pub admin: AdminSettings,
    /// Graceful shutdown.
    pub shutdown: ShutdownSettings,
    /// Lifecycle event publishing.
    pub events: EventsSettings,
    /// Several nodes as one network, coordinated through Redis.
    pub cluster: ClusterSettings,
    /// Where instructions and sessions are kept.
    pub storage: StorageSettings,
    /// Instructions: durable work for agents.
    pub instructions: InstructionsSettings,
    /// Sessions instructions belong to.
    pub sessions: SessionsSettings,
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// `sqlite://path` (created on first start) or `postgres://user@host/database`.
    pub url: String,
    /// Most connections to the database.
    pub max_connections: u32,
}

/// `[instructions]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InstructionsSettings {
    /// Seconds an instruction lives when it does not say (`ttl`).
    pub default_ttl: f64,
    /// Deliveries when it does not say (`max_attempts`).
    pub default_max_attempts: u32,
    /// Seconds an agent has to acknowledge a delivery when it does not say.
    pub default_ack_timeout: f64,
    /// Longest `ttl` accepted, in seconds.
    pub max_ttl: f64,
    /// Largest `payload` accepted, in bytes of JSON.
    pub max_payload_bytes: usize,
    /// Seconds between checks of acknowledgement deadlines and expiries.
    pub sweep_interval: f64,
    /// Seconds between looks in the storage for expiries and acknowledgement deadlines
    /// that this long overdue (a lost node's, in a cluster: nobody else holds them).
    pub overdue_check: f64,
}

/// `[sessions]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsSettings {
    /// Seconds without activity after which an open session is closed.
    pub idle_timeout: f64,
}

/// `[cluster]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// False (the default): one node, exactly as without a cluster.
    pub enabled: bool,
    /// The Redis every node of the cluster shares.
    pub redis_url: String,
    /// Prefix of every key and channel of this cluster in that Redis.
    pub prefix: String,
    /// Seconds a node's lease lasts; refreshed at a third of it. A node whose lease
    /// runs out is lost: its agents end (`node_lost`).
    pub node_lease: f64,
    /// The `ws://` URL agents use to reach this node; empty: from `network.host` and
    /// the port listened on.
    pub advertise_url: String,
    /// Seconds a takeover waits for the node holding the id.
    pub takeover_timeout: f64,
}

/// `[network]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSettings {
    /// Address the HTTP/WebSocket listener binds to.
    pub host: String,
    /// Port of the listener.
    pub port: u16,
    /// Human-readable network name, sent to agents on registration.
    pub name: String,
    /// Network id, used in event sources and registration responses.
    pub id: String,
    /// Maximum number of registered agents at once.
    pub max_connections: usize,
    /// Seconds a socket may stay unregistered before it is closed with 4008.
    pub registration_timeout: f64,
    /// Number of actix-web worker threads (0 = one per core).
    pub workers: usize,
    /// Origins (`scheme://host[:port]`, or `*` for any) whose pages may open an agent
    /// WebSocket. An upgrade that carries an `Origin` header not listed is refused 403;
    /// native agents send none. Empty (the default): no browser page may connect.
    pub allowed_origins: Vec<String>,
}

impl NetworkSettings {
    /// Whether an upgrade carrying `Origin: origin` may proceed.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.allowed_origins
            .iter()
            .any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(origin))
    }
}

/// `[heartbeat]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatSettings {
    /// Seconds of silence after which an agent is pinged.
    pub interval: f64,
    /// Seconds a ping may stay unanswered before the agent is stale.
    pub ping_timeout: f64,
    /// Seconds of silence after which an agent is stale whatever else happened.
    pub agent_timeout: f64,
    /// Seconds without application traffic after which an agent is inactive.
    pub activity_timeout: f64,
    /// Resolution of the heartbeat timer wheel, in seconds.
    pub tick: f64,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSettings {
    /// Largest accepted frame (and reassembled continuation), in bytes.
    pub max_frame_bytes: usize,
    /// Largest accepted registration metadata, serialized, in bytes.
    pub max_metadata_bytes: usize,
    /// Outbound frames the kernel has not accepted that an agent may have queued;
    /// one more closes it 4003.
    pub max_message_queue_size: usize,
    /// Outbound bytes the kernel has not accepted that an agent may have queued for
    /// longer than `slow_consumer_grace` before it is closed 4003.
    pub max_pending_bytes: usize,
    /// Seconds an agent's queued bytes may stay over `max_pending_bytes`.
    pub slow_consumer_grace: f64,
    /// Seconds a closing connection has to take the frames before its close frame
    /// (and the close frame); then its socket is dropped without it.
    pub close_grace: f64,
    /// Invalid frames in a row that close a connection with 1008.
    pub max_invalid_frames: u32,
    /// Most ids a broadcast's `exclude_agent_ids` may list (refused beyond with
    /// `too_many_exclusions`).
    pub max_broadcast_exclusions: usize,
    /// Copies a connection's broadcasts may make on this node per second, sustained,
    /// one per recipient. Past it: `rate_limited`, nothing sent.
    pub max_broadcast_copies_per_second: u32,
    /// Copies a connection's broadcasts may make at once above the sustained rate (a
    /// broadcast to more agents goes when this many are there, and the connection's
    /// next one waits the time its copies take at the rate).
    pub broadcast_copy_burst: u32,
    /// System requests a connection may make per second, sustained (excess:
    /// `rate_limited`).
    pub max_requests_per_second: u32,
    /// Requests a connection may make at once above the sustained rate; this many
    /// refused in a row close it 1008, and so many broadcasts refused in a row past
    /// `max_broadcast_copies_per_second` (counted apart).
    pub request_burst: u32,
    /// `claim_agent_id` requests one connection may make (excess: `too_many_claims`).
    pub max_claims_per_connection: u32,
    /// Claims not yet bound to a registration the server holds at once (excess:
    /// `too_many_claims`).
    pub max_outstanding_claims: usize,
    /// Registration metadata the server holds for all registered agents, in bytes
    /// (excess: `server_full`).
    pub max_metadata_bytes_total: usize,
    /// Ids that left whose last incarnation number is remembered; beyond, the oldest
    /// are forgotten and later first numbers start above theirs.
    pub remembered_agent_ids: usize,
}

/// `[identity]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// Secret that signs certificates; generated at start-up when unset.
    pub secret: Option<String>,
    /// File holding the secret (used when `secret` is unset).
    pub secret_file: Option<String>,
    /// Lifetime of issued certificates, in seconds.
    pub certificate_ttl: f64,
    /// Whether `force_reconnect: true` may take over a live agent id.
    pub allow_force_reconnect: bool,
    /// Seconds a claim holds its id without a registration.
    pub claim_ttl: f64,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Bearer token that protects every admin route but `/health`.
    pub token: Option<String>,
    /// Allow a non-loopback listener without a token.
    pub allow_unauthenticated: bool,
    /// Serve `/metrics` without the token (for scrapers on a trusted network).
    pub metrics_public: bool,
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// Seconds agents get to leave after `network_shutdown` before they are closed.
    pub timeout: f64,
}

/// `[events]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSettings {
    /// Publishers to start: any of `log`, `redis`, `kafka`, `rabbitmq`.
    pub publishers: Vec<String>,
    /// Events each server-sent-events subscriber may fall behind before it is cut off.
    pub sse_buffer: usize,
    /// Restart intensity for publishers: at most this many restarts ...
    pub max_restarts: u32,
    /// ... within this many seconds; past it the publisher is marked failed.
    pub restart_window: f64,
    /// `[events.redis]`
    pub redis: RedisSettings,
    /// `[events.kafka]`
    pub kafka: KafkaSettings,
    /// `[events.rabbitmq]`
    pub rabbitmq: RabbitMqSettings,
}

/// Retry and buffering settings shared by every broker publisher, taken from the
/// broker's own section.
#[derive(Debug, Clone, Copy)]
pub struct BufferSettings {
    /// Events kept while the broker is unreachable; older ones are dropped past it.
    pub buffer_capacity: usize,
    /// Largest batch sent to the broker at once.
    pub batch_size: usize,
    /// First retry delay, in seconds (doubles up to `retry_max`, with jitter).
    pub retry_initial: f64,
    /// Longest retry delay, in seconds.
    pub retry_max: f64,
}

macro_rules! buffer_settings {
    ($($section:ty),*) => {$(
        impl $section {
            /// The buffering and retry settings of this broker's section.
            pub fn buffer(&self) -> BufferSettings {
                BufferSettings {
                    buffer_capacity: self.buffer_capacity,
                    batch_size: self.batch_size,
                    retry_initial: self.retry_initial,
                    retry_max: self.retry_max,
                }
            }
        }
    )*};
}
buffer_settings!(RedisSettings, KafkaSettings, RabbitMqSettings);

/// `[events.redis]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// Connection URL.
    pub url: String,
    /// Stream key events are appended to with `XADD`.
    pub stream: String,
    /// Approximate `MAXLEN` of the stream.
    pub maxlen: u64,
    /// Also `PUBLISH` every event on this channel (unset: no pub/sub).
    pub publish_channel: Option<String>,
    /// Seconds to wait for a connection.
    pub connection_timeout: f64,
    /// Seconds to wait for a response.
    pub response_timeout: f64,
    /// Seconds between health checks (`PING`) while idle.
    pub health_check_interval: f64,
    /// Events kept while the broker is unreachable; the oldest are dropped past it.
    pub buffer_capacity: usize,
    /// Largest batch sent to the broker at once.
    pub batch_size: usize,
    /// First retry delay, in seconds (doubles up to `retry_max`, with jitter).
    pub retry_initial: f64,
    /// Longest retry delay, in seconds.
    pub retry_max: f64,
}

/// `[events.kafka]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Comma-separated bootstrap servers.
    pub bootstrap_servers: String,
    /// Topic events are produced to.
    pub topic: String,
    /// Create the topic at start-up if it is absent.
    pub create_topic: bool,
    /// Partitions of a topic created at start-up.
    pub partitions: i32,
    /// `linger.ms` of the producer.
    pub linger_ms: u64,
    /// `compression.type`: none, gzip, lz4 or zstd.
    pub compression: String,
    /// `acks`: all, 1 or 0.
    pub acks: String,
    /// Seconds a produce request may take.
    pub request_timeout: f64,
    /// Seconds the producer keeps retrying one event on its own (`message.timeout.ms`)
    /// before the publisher counts the batch as failed and reconnects.
    pub delivery_timeout: f64,
    /// Idempotent producer (`enable.idempotence`): no duplicates or reordering from
    /// the producer's own retries. Requires `acks = "all"`.
    pub idempotence: bool,
    /// Replication factor of a topic created at start-up (-1: the broker's default).
    pub replication_factor: i32,
    /// Seconds between metadata checks of an idle connection.
    pub health_check_interval: f64,
    /// Events kept while the broker is unreachable; the oldest are dropped past it.
    pub buffer_capacity: usize,
    /// Largest batch sent to the broker at once.
    pub batch_size: usize,
    /// First retry delay, in seconds (doubles up to `retry_max`, with jitter).
    pub retry_initial: f64,
    /// Longest retry delay, in seconds.
    pub retry_max: f64,
}

/// `[events.rabbitmq]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitMqSettings {
    /// AMQP URL.
    pub url: String,
    /// Durable topic exchange events are published to.
    pub exchange: String,
    /// Seconds to wait for a connection.
    pub connection_timeout: f64,
    /// AMQP heartbeat, in seconds.
    pub heartbeat: u16,
    /// Seconds to wait for the publisher confirms of a batch before the connection
    /// counts as broken.
    pub confirm_timeout: f64,
    /// Seconds between checks of an idle connection's state.
    pub health_check_interval: f64,
    /// Events kept while the broker is unreachable; the oldest are dropped past it.
    pub buffer_capacity: usize,
    /// Largest batch sent to the broker at once.
    pub batch_size: usize,
    /// First retry delay, in seconds (doubles up to `retry_max`, with jitter).
    pub retry_initial: f64,
    /// Longest retry delay, in seconds.
    pub retry_max: f64,
}

/// Converts fractional seconds from the configuration to a [`Duration`].
pub fn secs(value: f64) -> Duration {
    Duration::from_secs_f64(value.max(0.0))
}
