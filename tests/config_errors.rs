//! Configuration (issue #2 item 1): invalid configuration stops start-up quickly with
//! one clear message naming the key, never a panic; valid files and variables layer.

mod common;

use common::{Agent, TestServer};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How a refused start-up ended.
struct Refused {
    code: Option<i32>,
    stderr: String,
    stdout: String,
    took: Duration,
}

/// Runs `tether` with `env` and `args`, expecting it to exit by itself within 10 s.
fn run(env: &[(&str, &str)], args: &[&str]) -> Refused {
    let started = Instant::now();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
    command
        .args(args)
        .env("TETHER__NETWORK__PORT", "0")
        .env("RUST_LOG", "info")
        .env_remove("TETHER_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command.spawn().unwrap();
    let pid = child.id();
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    let Ok(output) = result.recv_timeout(Duration::from_secs(10)) else {
        let _ = Command::new("kill").arg(pid.to_string()).status();
        panic!("tether did not exit by itself with {env:?} {args:?}");
    };
    let output = output.unwrap();
    Refused {
        code: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        took: started.elapsed(),
    }
}

/// Start-up is refused quickly, non-zero, with one message that names `key`.
fn assert_refused(env: &[(&str, &str)], args: &[&str], key: &str) {
    let refused = run(env, args);
    let context = format!(
        "{env:?} {args:?}: exit {:?}\nstderr:\n{}",
        refused.code, refused.stderr
    );
    assert!(
        refused.code.is_some_and(|c| c != 0),
        "must exit non-zero: {context}"
    );
    assert!(refused.took < Duration::from_secs(5), "slow: {context}");
    assert!(
        !refused.stdout.contains("listening"),
        "it must not start listening: {context}"
    );
    assert!(
        refused.stderr.contains(key),
        "the message must name `{key}`: {context}"
    );
    let lower = refused.stderr.to_lowercase();
    assert!(
        !lower.contains("panicked") && !lower.contains("backtrace"),
        "no panic: {context}"
    );
    let messages = refused
        .stderr
        .lines()
        .filter(|l| l.starts_with("tether:"))
        .count();
    assert_eq!(messages, 1, "exactly one message: {context}");
}

#[test]
fn an_unknown_publisher_is_refused() {
    assert_refused(
        &[("TETHER__EVENTS__PUBLISHERS", "log,nats")],
        &[],
        "events.publishers",
    );
}

#[test]
fn a_ping_timeout_not_below_the_interval_is_refused() {
    assert_refused(
        &[
            ("TETHER__HEARTBEAT__INTERVAL", "5"),
            ("TETHER__HEARTBEAT__PING_TIMEOUT", "5"),
        ],
        &[],
        "heartbeat.ping_timeout",
    );
    assert_refused(
        &[("TETHER__HEARTBEAT__PING_TIMEOUT", "45")],
        &[],
        "heartbeat.ping_timeout",
    );
}

#[test]
fn slow_consumer_limits_out_of_range_are_refused() {
    assert_refused(
        &[("TETHER__LIMITS__MAX_PENDING_BYTES", "1000")],
        &[],
        "limits.max_pending_bytes",
    );
    assert_refused(
        &[("TETHER__LIMITS__SLOW_CONSUMER_GRACE", "0")],
        &[],
        "limits.slow_consumer_grace",
    );
}

#[test]
fn a_port_out_of_range_is_refused() {
    assert_refused(&[("TETHER__NETWORK__PORT", "70000")], &[], "network.port");
    assert_refused(&[("TETHER__NETWORK__PORT", "-1")], &[], "network.port");
}

#[test]
fn a_cluster_redis_url_that_names_no_redis_is_refused() {
    for url in [
        "http://127.0.0.1:6379",
        "redis+cluster://",
        "redis+cluster://,",
        "redis+cluster://127.0.0.1:notaport",
    ] {
        assert_refused(
            &[
                ("TETHER__CLUSTER__ENABLED", "true"),
                ("TETHER__CLUSTER__REDIS_URL", url),
                ("TETHER__IDENTITY__SECRET", "a-secret"),
            ],
            &[],
            "cluster.redis_url",
        );
    }
}

#[test]
fn a_non_loopback_bind_without_an_admin_token_is_refused() {
    assert_refused(&[("TETHER__NETWORK__HOST", "0.0.0.0")], &[], "admin.token");
}

#[test]
fn values_of_the_wrong_type_are_refused() {
    assert_refused(
        &[("TETHER__HEARTBEAT__INTERVAL", "soon")],
        &[],
        "heartbeat.interval",
    );
    assert_refused(
        &[("TETHER__NETWORK__HOST", "not-an-address")],
        &[],
        "network.host",
    );
}

#[test]
fn a_missing_config_file_is_refused() {
    let path = "/nonexistent/tether-test.toml";
    assert_refused(&[], &["--config", path], path);
    assert_refused(&[("TETHER_CONFIG", path)], &[], path);
}

#[test]
fn an_invalid_config_file_is_refused_naming_the_key() {
    let mut file = tempfile("[heartbeat]\ninterval = \"often\"\n");
    file.flush().unwrap();
    let path = file.path.clone();
    assert_refused(&[], &["--config", &path], "heartbeat.interval");
}

#[test]
fn an_unparsable_config_file_is_refused_naming_the_file() {
    let file = tempfile("[heartbeat\ninterval = 3\n");
    let path = file.path.clone();
    let refused = run(&[], &["--config", &path]);
    assert!(refused.code.is_some_and(|c| c != 0), "{}", refused.stderr);
    assert!(refused.stderr.contains(&path), "{}", refused.stderr);
    assert!(!refused.stderr.contains("panicked"), "{}", refused.stderr);
}

#[tokio::test]
async fn a_config_file_is_layered_under_environment_variables() {
    let file = tempfile(
        "[network]\nname = \"FromFile\"\nid = \"file-net\"\n[heartbeat]\ninterval = 12\nping_timeout = 3\n",
    );
    let server = TestServer::start_with_args(
        &[("TETHER__HEARTBEAT__INTERVAL", "20")],
        &["--config", &file.path],
    );
    let (_agent, registered) = Agent::register(&server.ws_url(), "alice").await;
    assert_eq!(registered["network_name"], "FromFile", "{registered}");
    assert_eq!(registered["network_id"], "file-net", "{registered}");
    assert_eq!(registered["ping_timeout"], 3.0, "{registered}");
    assert_eq!(
        registered["heartbeat_interval"], 20.0,
        "the environment wins over the file: {registered}"
    );
}

#[tokio::test]
async fn lowering_only_max_frame_bytes_is_accepted() {
    // Regression: the default metadata limit (16 KiB) above a lowered frame limit used
    // to stop start-up with an error about a key the user never set.
    let server = TestServer::start(&[("TETHER__LIMITS__MAX_FRAME_BYTES", "4096")]);
    let (_agent, registered) = Agent::register(&server.ws_url(), "alice").await;
    assert_eq!(registered["success"], true);
}

/// A file removed when dropped.
struct TempFile {
    path: String,
    file: std::fs::File,
}

impl Write for TempFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn tempfile(contents: &str) -> TempFile {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "tether-config-test-{}-{}.toml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(contents.as_bytes()).unwrap();
    file.flush().unwrap();
    TempFile {
        path: path.display().to_string(),
        file,
    }
}

#[tokio::test]
async fn setting_only_a_short_interval_starts_with_derived_timeouts() {
    // PROTOCOL.md §10's own example sets only the interval; the default ping timeout
    // (5 s) must not make that configuration invalid.
    let server = TestServer::start(&[("TETHER__HEARTBEAT__INTERVAL", "2")]);
    let (_agent, registered) = Agent::register(&server.ws_url(), "alice").await;
    assert_eq!(registered["heartbeat_interval"], 2.0, "{registered}");
    assert_eq!(registered["ping_timeout"], 1.0, "{registered}");
    assert_eq!(registered["agent_timeout"], 90.0, "{registered}");
}
