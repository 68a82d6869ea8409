//! Configuration loading: the embedded `config/default.toml`, then an optional file
//! (`--config PATH` or `TETHER_CONFIG`), then `TETHER__SECTION__KEY` environment
//! variables, validated into [`Settings`]. Every error names the key at fault.

use config::{Config, Environment, File, FileFormat};
use std::net::IpAddr;
use std::path::Path;
use tether_actors::settings::Settings;

/// The embedded default configuration.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");

/// Publishers the server knows.
pub const KNOWN_PUBLISHERS: [&str; 4] = ["log", "redis", "kafka", "rabbitmq"];

/// A configuration that cannot be used, with the key at fault and what to do.
#[derive(Debug)]
pub struct ConfigError {
    /// The key (or file) at fault.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration: `{}`: {}", self.key, self.problem)
    }
}

impl std::error::Error for ConfigError {}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

/// Loads and validates the configuration.
pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
    if let Some(path) = path {
        if !path.is_file() {
            return Err(invalid(
                &path.display().to_string(),
                "configuration file not found (given with --config or TETHER_CONFIG)",
            ));
        }
    }
    let user = user_sources(Config::builder(), path)
        .build()
        .map_err(|e| from_config_error(e, path))?;
    let defaults = Config::builder().add_source(File::from_str(DEFAULT_CONFIG, FileFormat::Toml));
    let loaded = user_sources(defaults, path)
        .build()
        .map_err(|e| from_config_error(e, path))?;
    let mut settings: Settings = loaded
        .try_deserialize()
        .map_err(|e| from_config_error(e, path))?;
    let user_set = |key: &str| user.get::<config::Value>(key).is_ok();
    derive_heartbeat_defaults(&mut settings, user_set);
    validate(&settings)?;
    Ok(settings)
}

/// The optional file and the environment, layered over `builder`.
fn user_sources(
    mut builder: config::ConfigBuilder<config::builder::DefaultState>,
    path: Option<&Path>,
) -> config::ConfigBuilder<config::builder::DefaultState> {
    if let Some(path) = path {
        builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
    }
    builder.add_source(
        Environment::with_prefix("TETHER")
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .with_list_parse_key("events.publishers")
            .with_list_parse_key("network.allowed_origins")
            .try_parsing(true),
    )
}

/// Keeps the heartbeat's defaults consistent with an interval the user chose: when
/// only `heartbeat.interval` is set (say `TETHER__HEARTBEAT__INTERVAL=2`), a default
/// `ping_timeout` at or above it becomes half the interval, and a default
/// `agent_timeout` below `interval + ping_timeout` becomes three intervals (the
/// defaults' own ratio, 90 s for 30 s). Values the user set are never changed: if
/// they conflict, [`validate`] names them.
pub fn derive_heartbeat_defaults(settings: &mut Settings, user_set: impl Fn(&str) -> bool) {
    let hb = &mut settings.heartbeat;
    if !user_set("heartbeat.ping_timeout") && hb.ping_timeout >= hb.interval {
        hb.ping_timeout = hb.interval / 2.0;
        log::info!(
            "heartbeat.ping_timeout not set: using {} s (half of heartbeat.interval)",
            hb.ping_timeout
        );
    }
    if !user_set("heartbeat.agent_timeout") && hb.agent_timeout < hb.interval + hb.ping_timeout {
        hb.agent_timeout = (hb.interval * 3.0).max(hb.interval + hb.ping_timeout);
        log::info!(
            "heartbeat.agent_timeout not set: using {} s (three heartbeat intervals)",
            hb.agent_timeout
        );
    }
}

fn from_config_error(error: config::ConfigError, path: Option<&Path>) -> ConfigError {
    let text = error.to_string();
    // The config crate names the key as `for key "x.y"` or `missing field`.
    let key = text
        .split("key `")
        .nth(1)
        .or_else(|| text.split("key \"").nth(1))
        .and_then(|rest| rest.split(['`', '"']).next())
        .map(str::to_owned)
        .or_else(|| path.map(|p| p.display().to_string()))
        .unwrap_or_else(|| "configuration".to_owned());
    invalid(&key, text)
}

/// Checks the relations between settings that types alone cannot express.
pub fn validate(s: &Settings) -> Result<(), ConfigError> {
    for (i, name) in s.events.publishers.iter().enumerate() {
        if !KNOWN_PUBLISHERS.contains(&name.as_str()) {
            return Err(invalid(
                "events.publishers",
                format!("unknown publisher `{name}`; known publishers are {KNOWN_PUBLISHERS:?}"),
            ));
        }
        if s.events.publishers[..i].contains(name) {
            return Err(invalid(
                "events.publishers",
                format!("publisher `{name}` is listed twice"),
            ));
        }
    }
    let hb = &s.heartbeat;
    positive("identity.claim_ttl", s.identity.claim_ttl)?;
    positive("heartbeat.interval", hb.interval)?;
    positive("heartbeat.ping_timeout", hb.ping_timeout)?;
    positive("heartbeat.agent_timeout", hb.agent_timeout)?;
    positive("heartbeat.activity_timeout", hb.activity_timeout)?;
    if hb.ping_timeout >= hb.interval {
        return Err(invalid(
            "heartbeat.ping_timeout",
            format!(
                "must be less than heartbeat.interval ({} >= {}); lower ping_timeout or raise interval",
                hb.ping_timeout, hb.interval
            ),
        ));
    }
    if hb.agent_timeout < hb.interval + hb.ping_timeout {
        return Err(invalid(
            "heartbeat.agent_timeout",
            format!(
                "must be at least heartbeat.interval + heartbeat.ping_timeout ({}), or agents are cut off before they can answer a ping",
                hb.interval + hb.ping_timeout
            ),
        ));
    }
    if !(hb.tick > 0.0 && hb.tick <= 0.5) {
        return Err(invalid(
            "heartbeat.tick",
            "must be greater than 0 and at most 0.5 seconds (the stale bound allows 1 s of slack)",
        ));
    }
    let net = &s.network;
    let host: IpAddr = net.host.parse().map_err(|_| {
        invalid(
            "network.host",
            format!("`{}` is not an IP address", net.host),
        )
    })?;
    if net.max_connections == 0 {
        return Err(invalid("network.max_connections", "must be at least 1"));
    }
    positive("network.registration_timeout", net.registration_timeout)?;
    if net.id.is_empty() {
        return Err(invalid("network.id", "must not be empty"));
    }
    if !host.is_loopback() && s.admin.token.is_none() && !s.admin.allow_unauthenticated {
        return Err(invalid(
            "admin.token",
            format!(
                "the server binds to the non-loopback address {host} but no admin token is set, so anyone on the network could use the admin API; set admin.token (TETHER__ADMIN__TOKEN), or set admin.allow_unauthenticated = true to accept the risk"
            ),
        ));
    }
    if s.admin.token.as_deref() == Some("") {
        return Err(invalid("admin.token", "must not be empty when set"));
    }
    let limits = &s.limits;
    if limits.max_frame_bytes < 1024 {
        return Err(invalid("limits.max_frame_bytes", "must be at least 1024"));
    }
    // A metadata limit above the frame limit is harmless (the frame limit applies
    // first), so lowering only max_frame_bytes keeps working.
    if limits.max_metadata_bytes == 0 {
        return Err(invalid("limits.max_metadata_bytes", "must be at least 1"));
    }
    if limits.max_message_queue_size == 0 {
        return Err(invalid(
            "limits.max_message_queue_size",
            "must be at least 1",
        ));
    }
    if limits.max_invalid_frames == 0 {
        return Err(invalid("limits.max_invalid_frames", "must be at least 1"));
    }
    if limits.max_pending_bytes < 65536 {
        return Err(invalid(
            "limits.max_pending_bytes",
            "must be at least 65536 (a kernel socket buffer's worth)",
        ));
    }
    positive("limits.slow_consumer_grace", limits.slow_consumer_grace)?;
    positive("limits.close_grace", limits.close_grace)?;
    positive("identity.certificate_ttl", s.identity.certificate_ttl)?;
    if s.identity.secret.as_deref() == Some("") {
        return Err(invalid("identity.secret", "must not be empty when set"));
    }
    validate_cluster(s)?;
    validate_instructions(s)?;
    if s.shutdown.timeout.is_nan() || s.shutdown.timeout < 0.0 {
        return Err(invalid("shutdown.timeout", "must be zero or more seconds"));
    }
    if s.events.sse_buffer == 0 {
        return Err(invalid("events.sse_buffer", "must be at least 1"));
    }
    positive("events.restart_window", s.events.restart_window)?;
    for (section, buffer) in [
        ("events.redis", s.events.redis.buffer()),
        ("events.kafka", s.events.kafka.buffer()),
        ("events.rabbitmq", s.events.rabbitmq.buffer()),
    ] {
        if buffer.buffer_capacity == 0 {
            return Err(invalid(
                &format!("{section}.buffer_capacity"),
                "must be at least 1",
            ));
        }
        if buffer.batch_size == 0 {
            return Err(invalid(
                &format!("{section}.batch_size"),
                "must be at least 1",
            ));
        }
        positive(&format!("{section}.retry_initial"), buffer.retry_initial)?;
        if buffer.retry_max < buffer.retry_initial {
            return Err(invalid(
                &format!("{section}.retry_max"),
                "must be at least retry_initial",
            ));
        }
    }
    let kafka = &s.events.kafka;
    if !["none", "gzip", "lz4", "zstd", "snappy"].contains(&kafka.compression.as_str()) {
        return Err(invalid(
            "events.kafka.compression",
            format!(
                "`{}` is not one of none, gzip, lz4, zstd, snappy",
                kafka.compression
            ),
        ));
    }
    if !["all", "-1", "0", "1"].contains(&kafka.acks.as_str()) {
        return Err(invalid(
            "events.kafka.acks",
            format!("`{}` is not one of all, 1, 0", kafka.acks),
        ));
    }
    if kafka.partitions < 1 {
        return Err(invalid("events.kafka.partitions", "must be at least 1"));
    }
    if kafka.idempotence && !["all", "-1"].contains(&kafka.acks.as_str()) {
        return Err(invalid(
            "events.kafka.acks",
            format!(
                "`{}` cannot be used with the idempotent producer; set acks = \"all\", or events.kafka.idempotence = false",
                kafka.acks
            ),
        ));
    }
    if kafka.replication_factor == 0 || kafka.replication_factor < -1 {
        return Err(invalid(
            "events.kafka.replication_factor",
            "must be -1 (the broker's default) or at least 1",
        ));
    }
    positive("events.kafka.request_timeout", kafka.request_timeout)?;
    if kafka.delivery_timeout < kafka.request_timeout {
        return Err(invalid(
            "events.kafka.delivery_timeout",
            "must be at least events.kafka.request_timeout",
        ));
    }
    let redis = &s.events.redis;
    positive("events.redis.connection_timeout", redis.connection_timeout)?;
    positive("events.redis.response_timeout", redis.response_timeout)?;
    if redis.stream.is_empty() {
        return Err(invalid("events.redis.stream", "must not be empty"));
    }
    let rabbit = &s.events.rabbitmq;
    positive(
        "events.rabbitmq.connection_timeout",
        rabbit.connection_timeout,
    )?;
    positive("events.rabbitmq.confirm_timeout", rabbit.confirm_timeout)?;
    for (key, value) in [
        (
            "events.redis.health_check_interval",
            redis.health_check_interval,
        ),
        (
            "events.kafka.health_check_interval",
            kafka.health_check_interval,
        ),
        (
            "events.rabbitmq.health_check_interval",
            rabbit.health_check_interval,
        ),
    ] {
        positive(key, value)?;
    }
    Ok(())
}

/// `[storage]`, `[instructions]` and `[sessions]`.
fn validate_instructions(s: &Settings) -> Result<(), ConfigError> {
    let url = &s.storage.url;
    let known = ["sqlite://", "postgres://", "postgresql://"];
    if !known.iter().any(|scheme| url.starts_with(scheme)) {
        return Err(invalid(
            "storage.url",
            format!("must start with sqlite:// (a file, created on first start) or postgres://, not {url:?}"),
        ));
    }
    if s.storage.max_connections == 0 {
        return Err(invalid("storage.max_connections", "must be at least 1"));
    }
    let i = &s.instructions;
    positive("instructions.default_ttl", i.default_ttl)?;
    positive("instructions.default_ack_timeout", i.default_ack_timeout)?;
    positive("instructions.max_ttl", i.max_ttl)?;
    positive("instructions.sweep_interval", i.sweep_interval)?;
    positive("instructions.overdue_check", i.overdue_check)?;
    positive("sessions.idle_timeout", s.sessions.idle_timeout)?;
    if i.default_ttl > i.max_ttl {
        return Err(invalid(
            "instructions.default_ttl",
            "must not exceed instructions.max_ttl",
        ));
    }
    if i.default_max_attempts == 0 {
        return Err(invalid(
            "instructions.default_max_attempts",
            "must be at least 1",
        ));
    }
    if i.max_payload_bytes == 0 {
        return Err(invalid(
            "instructions.max_payload_bytes",
            "must be at least 1",
        ));
    }
    Ok(())
}

/// `[cluster]`: checked only when enabled (a single node ignores it).
fn validate_cluster(s: &Settings) -> Result<(), ConfigError> {
    let cluster = &s.cluster;
    if !cluster.enabled {
        return Ok(());
    }
    if s.identity.secret.is_none() && s.identity.secret_file.is_none() {
        return Err(invalid(
            "identity.secret",
            "is required when cluster.enabled is true: every node must sign and check \
             certificates with the same secret (set identity.secret or identity.secret_file)",
        ));
    }
    positive("cluster.node_lease", cluster.node_lease)?;
    if cluster.node_lease < 1.0 {
        return Err(invalid("cluster.node_lease", "must be at least 1 second"));
    }
    positive("cluster.takeover_timeout", cluster.takeover_timeout)?;
    if cluster.prefix.is_empty() || cluster.prefix.contains(['{', '}', ' ']) {
        return Err(invalid(
            "cluster.prefix",
            "must be non-empty, without braces or spaces",
        ));
    }
    // The same reading the cluster makes at start (it connects to nothing).
    if let Err(error) = tether_actors::cluster::RedisTarget::open(&cluster.redis_url) {
        return Err(invalid(
            "cluster.redis_url",
            format!(
                "{error}: must be a redis:// or rediss:// URL (one Redis), or \
                 redis+cluster://host:port,host:port (the seed nodes of a Redis Cluster)"
            ),
        ));
    }
    if !cluster.advertise_url.is_empty()
        && !cluster.advertise_url.starts_with("ws://")
        && !cluster.advertise_url.starts_with("wss://")
    {
        return Err(invalid(
            "cluster.advertise_url",
            "must be a ws:// or wss:// URL (or empty)",
        ));
    }
    Ok(())
}

fn positive(key: &str, value: f64) -> Result<(), ConfigError> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be a positive number of seconds, not {value}"),
        ))
    }
}

/// The certificate secret: `identity.secret`, the contents of `identity.secret_file`,
/// or a fresh random one (certificates then do not survive a restart).
pub fn certificate_secret(s: &Settings) -> Result<Vec<u8>, ConfigError> {
    if let Some(secret) = &s.identity.secret {
        return Ok(secret.as_bytes().to_vec());
    }
    if let Some(path) = &s.identity.secret_file {
        let secret = std::fs::read(path)
            .map_err(|e| invalid("identity.secret_file", format!("cannot read {path}: {e}")))?;
        let trimmed = secret.trim_ascii();
        if trimmed.is_empty() {
            return Err(invalid("identity.secret_file", format!("{path} is empty")));
        }
        return Ok(trimmed.to_vec());
    }
    log::warn!("identity.secret is not set: certificates are signed with a random secret and will not survive a restart");
    Ok(tether_actors::identity::CertificateAuthority::generate_secret())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Settings {
        Config::builder()
            .add_source(File::from_str(DEFAULT_CONFIG, FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap()
    }

    #[test]
    fn the_embedded_default_is_valid() {
        validate(&defaults()).unwrap();
    }

    #[test]
    fn ping_timeout_not_below_interval_is_rejected_naming_the_key() {
        let mut s = defaults();
        s.heartbeat.ping_timeout = s.heartbeat.interval;
        let error = validate(&s).unwrap_err();
        assert_eq!(error.key, "heartbeat.ping_timeout");
    }

    #[test]
    fn an_interval_below_the_default_ping_timeout_derives_the_unset_timeouts() {
        let mut s = defaults();
        s.heartbeat.interval = 2.0;
        derive_heartbeat_defaults(&mut s, |key| key == "heartbeat.interval");
        assert_eq!(s.heartbeat.ping_timeout, 1.0);
        assert_eq!(s.heartbeat.agent_timeout, 90.0);
        validate(&s).unwrap();

        let mut s = defaults();
        s.heartbeat.interval = 60.0;
        derive_heartbeat_defaults(&mut s, |key| key == "heartbeat.interval");
        assert_eq!(s.heartbeat.ping_timeout, 5.0);
        assert_eq!(
            s.heartbeat.agent_timeout, 90.0,
            "90 >= 60 + 5 needs no change"
        );

        let mut s = defaults();
        s.heartbeat.interval = 100.0;
        derive_heartbeat_defaults(&mut s, |key| key == "heartbeat.interval");
        assert_eq!(s.heartbeat.agent_timeout, 300.0);
    }

    #[test]
    fn timeouts_the_user_set_are_never_derived() {
        let mut s = defaults();
        s.heartbeat.interval = 2.0;
        derive_heartbeat_defaults(&mut s, |_| true);
        assert_eq!(s.heartbeat.ping_timeout, 5.0);
        assert_eq!(validate(&s).unwrap_err().key, "heartbeat.ping_timeout");
    }

    #[test]
    fn non_loopback_bind_needs_a_token() {
        let mut s = defaults();
        s.network.host = "0.0.0.0".into();
        assert_eq!(validate(&s).unwrap_err().key, "admin.token");
        s.admin.token = Some("t".into());
        validate(&s).unwrap();
    }

    #[test]
    fn every_example_configuration_file_is_valid() {
        for name in ["redis", "kafka", "rabbitmq", "all-brokers"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .join(format!("{name}.toml"));
            let settings = load(Some(&path)).unwrap_or_else(|e| panic!("{name}.toml: {e}"));
            assert!(settings.events.publishers.len() >= 2, "{name}.toml");
        }
    }

    #[test]
    fn acks_other_than_all_need_the_idempotent_producer_off() {
        let mut s = defaults();
        s.events.kafka.acks = "1".into();
        assert_eq!(validate(&s).unwrap_err().key, "events.kafka.acks");
        s.events.kafka.idempotence = false;
        validate(&s).unwrap();
    }

    #[test]
    fn unknown_publisher_is_rejected() {
        let mut s = defaults();
        s.events.publishers = vec!["log".into(), "nats".into()];
        assert_eq!(validate(&s).unwrap_err().key, "events.publishers");
    }
}
