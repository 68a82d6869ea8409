//! Observability (issue 11, README "Metrics and health"): `/metrics` in the Prometheus
//! text format, checked by `promtool` and scraped by a real Prometheus server;
//! `/livez`, `/readyz` and `/health` that tell the truth.

mod common;

use common::{direct, Agent, TestServer, DEADLINE};
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Prometheus tool (`promtool`, `prometheus`): `$TETHER_TEST_<NAME>` or the PATH.
fn prometheus_tool(name: &str) -> String {
    let var = format!("TETHER_TEST_{}", name.to_uppercase());
    let path = std::env::var(&var).unwrap_or_else(|_| name.to_owned());
    let found = Command::new(&path)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{name} is needed: install Debian's `prometheus` package (scripts/test.sh does) or set {var}"
    );
    path
}

async fn get_metrics(server: &TestServer, token: Option<&str>) -> reqwest::Response {
    let mut request = common::http().get(server.http("/metrics"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Scrapes until `series` has `value`; returns the exposition.
async fn wait_for_sample(server: &TestServer, series: &str, value: f64) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = get_metrics(server, None).await.text().await.unwrap();
        if sample(&text, series) == Some(value) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never became {value}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_count_what_happened_and_pass_promtool() {
    let promtool = prometheus_tool("promtool");
    let server = TestServer::start(&[]);
    let (mut alice, _) = Agent::register(&server.ws_url(), "alice").await;
    let (mut bob, _) = Agent::register(&server.ws_url(), "bob").await;
    alice.send(direct("bob", json!("hi"))).await;
    bob.wait_for(|f| f["type"] == "message").await;
    alice.send(direct("nobody", json!("hi"))).await;
    alice.wait_for(|f| f["error_code"] == "unknown_agent").await;
    alice
        .send_raw(tokio_tungstenite::tungstenite::Message::text("{not json"))
        .await;
    alice.wait_for(|f| f["error_code"] == "invalid_frame").await;
    let mut refused = Agent::connect(&server.ws_url()).await;
    let answer = refused
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"alice"}))
        .await;
    assert_eq!(answer["error_code"], "agent_id_in_use", "{answer}");

    let response = get_metrics(&server, None).await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = wait_for_sample(
        &server,
        r#"tether_registrations_refused_total{error_code="agent_id_in_use"}"#,
        1.0,
    )
    .await;
    let expect = [
        (r#"tether_agents{state="active"}"#, 2.0),
        (r#"tether_agents{state="inactive"}"#, 0.0),
        ("tether_open_sockets", 3.0),
        (r#"tether_registrations_total{result="success"}"#, 2.0),
        (r#"tether_registrations_total{result="refused"}"#, 1.0),
        (
            r#"tether_messages_routed_total{kind="direct",result="delivered"}"#,
            1.0,
        ),
        (
            r#"tether_messages_routed_total{kind="direct",result="unknown_target"}"#,
            1.0,
        ),
        (
            r#"tether_frames_rejected_total{reason="invalid_frame"}"#,
            1.0,
        ),
        (r#"tether_upgrades_total{result="accepted"}"#, 3.0),
    ];
    for (series, value) in expect {
        assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
    }
    assert!(sample(&text, "process_resident_memory_bytes").unwrap_or(0.0) > 1e6);
    assert!(sample(&text, "process_open_fds").unwrap_or(0.0) > 3.0);
    assert!(text.contains("tether_build_info{version="), "{text}");
    assert!(
        !text.contains("alice"),
        "an agent id became a label:\n{text}"
    );

    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = check.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // An agent that leaves is counted as it ends.
    bob.close().await;
    let text = wait_for_sample(&server, r#"tether_agents{state="active"}"#, 1.0).await;
    assert_eq!(
        sample(
            &text,
            r#"tether_disconnections_total{reason="client_closed"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "tether_connection_duration_seconds_count"),
        Some(1.0)
    );
}

#[tokio::test]
async fn answered_pings_fill_the_round_trip_histogram() {
    let server = TestServer::start(&[("TETHER__HEARTBEAT__INTERVAL", "0.3")]);
    let (mut agent, _) = Agent::register(&server.ws_url(), "pinged").await;
    // A round trip is recorded when the heartbeat next visits the agent, before its
    // next ping: after three answers at least two are in.
    agent.answer_pings(3).await;
    let text = get_metrics(&server, None).await.text().await.unwrap();
    let count = sample(&text, "tether_ping_round_trip_seconds_count").unwrap_or(0.0);
    assert!(count >= 2.0, "round trips recorded: {count}\n{text}");
    let sent = sample(&text, "tether_pings_sent_total").unwrap_or(0.0);
    assert!(sent >= 3.0, "pings sent: {sent}");
    let slowest = sample(&text, r#"tether_ping_round_trip_seconds_bucket{le="10"}"#);
    assert_eq!(
        slowest,
        Some(count),
        "every round trip is under 10 s:\n{text}"
    );
}

#[tokio::test]
async fn a_scraper_asking_for_openmetrics_gets_the_classic_format_it_can_read() {
    let server = TestServer::start(&[]);
    let response = common::http()
        .get(server.http("/metrics"))
        .header(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("# TYPE tether_connections_total counter"),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_need_the_admin_token_unless_opened_to_scrapers() {
    let server = TestServer::start(&[("TETHER__ADMIN__TOKEN", "s3cret")]);
    assert_eq!(get_metrics(&server, None).await.status(), 401);
    assert_eq!(get_metrics(&server, Some("wrong")).await.status(), 401);
    assert_eq!(get_metrics(&server, Some("s3cret")).await.status(), 200);
    let open = TestServer::start(&[
        ("TETHER__ADMIN__TOKEN", "s3cret"),
        ("TETHER__ADMIN__METRICS_PUBLIC", "true"),
    ]);
    assert_eq!(get_metrics(&open, None).await.status(), 200);
    // Opening /metrics opens nothing else.
    let stats = common::http()
        .get(open.http("/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(stats.status(), 401);
}

/// A Prometheus server of the test's own, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`host:port`) every second.
    async fn scraping(target: &str) -> Self {
        let binary = prometheus_tool("prometheus");
        let dir = std::env::temp_dir().join(format!(
            "tether-prometheus-{}-{}",
            std::process::id(),
            target.replace([':', '.'], "-")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: tether\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start prometheus");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: TempDir(dir),
        }
    }

    /// Queries until `query` returns one sample equal to `value`.
    async fn wait_for(&self, query: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = Value::Null;
        while Instant::now() < deadline {
            let answer = common::http()
                .get(format!("{}/api/v1/query", self.url))
                .query(&[("query", query)])
                .send()
                .await;
            if let Ok(answer) = answer {
                if let Ok(body) = answer.json::<Value>().await {
                    let got = body["data"]["result"][0]["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok());
                    if got == Some(value) {
                        return;
                    }
                    last = body;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("Prometheus never answered {value} to {query}; last answer: {last}");
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_agent_counts() {
    let server = TestServer::start(&[]);
    let prometheus = Prometheus::scraping(&server.addr).await;
    let mut fleet = Vec::new();
    for i in 0..3 {
        fleet.push(Agent::register(&server.ws_url(), &format!("p-{i}")).await.0);
    }
    prometheus
        .wait_for(r#"tether_agents{state="active"}"#, 3.0)
        .await;
    prometheus.wait_for("up{job=\"tether\"}", 1.0).await;
    for agent in fleet.drain(..2) {
        agent.close().await;
    }
    prometheus
        .wait_for(r#"tether_agents{state="active"}"#, 1.0)
        .await;
    prometheus
        .wait_for("sum(tether_disconnections_total)", 2.0)
        .await;
}

async fn get(server: &TestServer, path: &str) -> (u16, Value) {
    let response = common::http().get(server.http(path)).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn health_stays_up_under_a_flood_of_bad_registrations() {
    // Issue 11: 8 refusals in 22 attempts made /health answer 503 critical.
    let server = TestServer::start(&[("TETHER__ADMIN__TOKEN", "s3cret")]);
    let (_holder, _) = Agent::register(&server.ws_url(), "holder").await;
    for i in 0..30 {
        let mut bad = Agent::connect(&server.ws_url()).await;
        let frame = if i % 2 == 0 {
            json!({"type":"system_request","command":"register_agent","agent_id":"holder"})
        } else {
            json!({"type":"system_request","command":"register_agent"})
        };
        let answer = bad.request(frame).await;
        assert_eq!(answer["success"], false, "{answer}");
    }
    let (status, health) = get(&server, "/health").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "warning", "{health}");
    assert_eq!(health["checks"]["success_rate"]["status"], "warning");
    let (status, _) = get(&server, "/readyz").await;
    assert_eq!(status, 200);
    // The three health routes need no token.
    let (status, live) = get(&server, "/livez").await;
    assert_eq!((status, live["status"].as_str()), (200, Some("ok")));
}

#[tokio::test]
async fn readyz_is_503_at_max_connections() {
    let server = TestServer::start(&[("TETHER__NETWORK__MAX_CONNECTIONS", "1")]);
    let (status, ready) = get(&server, "/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));
    let (agent, _) = Agent::register(&server.ws_url(), "only").await;
    let (status, ready) = get(&server, "/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert!(
        ready["reason"]
            .as_str()
            .unwrap()
            .contains("network.max_connections"),
        "{ready}"
    );
    // /health does not call a full server a fault.
    assert_eq!(get(&server, "/health").await.0, 200);
    agent.close().await;
    let deadline = Instant::now() + DEADLINE;
    while get(&server, "/readyz").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "/readyz stayed 503 after the agent left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn readyz_and_health_are_503_during_shutdown() {
    let server = TestServer::start(&[("TETHER__SHUTDOWN__TIMEOUT", "10")]);
    let (mut holder, _) = Agent::register(&server.ws_url(), "holder").await;
    server.signal("TERM");
    // The holder is told; shutdown then waits for it to leave.
    holder
        .wait_for(|f| f["type"] == "system_notification")
        .await;
    let (status, ready) = get(&server, "/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert!(ready["reason"].as_str().unwrap().contains("shutting down"));
    let (status, health) = get(&server, "/health").await;
    assert_eq!(status, 503, "{health}");
    assert_eq!(
        health["checks"]["shutdown"]["status"], "critical",
        "{health}"
    );
    assert_eq!(get(&server, "/livez").await.0, 200);
}
