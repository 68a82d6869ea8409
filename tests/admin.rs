//! The HTTP admin API (PROTOCOL.md §9): health, stats, agents, administrative cleanup,
//! and bearer-token protection.

mod common;

use common::{Agent, Closed, EventStream, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn get(server: &TestServer, path: &str) -> (StatusCode, Value) {
    let response = common::http().get(server.http(path)).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn health_reports_status_checks_and_recommendations() {
    let server = TestServer::start(&[]);
    let (status, health) = get(&server, "/health").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "healthy", "{health}");
    let checks = health["checks"].as_object().expect("checks object");
    for check in ["stale_connections", "success_rate", "cleanup_rate"] {
        assert!(
            checks[check]["status"].is_string(),
            "{check} missing: {health}"
        );
    }
    assert!(health["recommendations"].is_array(), "{health}");
}

#[tokio::test]
async fn stats_count_connections_registrations_and_cleanups() {
    let server = TestServer::start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let (_alice, _) = Agent::register(&server.ws_url(), "alice").await;
    let (bob, _) = Agent::register(&server.ws_url(), "bob").await;
    let mut refused = Agent::connect(&server.ws_url()).await;
    let answer = refused
        .request(json!({"type":"system_request","command":"register_agent","agent_id":"alice"}))
        .await;
    assert_eq!(answer["error_code"], "agent_id_in_use");
    bob.close().await;
    events
        .wait_for(|e| e["type"] == "agent.cleaned_up" && e["subject"] == "bob")
        .await;

    let (status, stats) = get(&server, "/stats").await;
    assert_eq!(status, 200, "{stats}");
    let c = &stats["connections"];
    assert_eq!(c["registered_agents"], 1, "{stats}");
    assert_eq!(c["active_agents"], 1, "{stats}");
    assert_eq!(c["inactive_agents"], 0, "{stats}");
    assert_eq!(c["total_connections"], 3, "{stats}");
    assert_eq!(c["registrations_attempted"], 3, "{stats}");
    assert_eq!(c["successful_registrations"], 2, "{stats}");
    assert_eq!(c["failed_registrations"], 1, "{stats}");
    assert_eq!(c["cleanups"], 1, "{stats}");
    assert_eq!(c["peak_concurrent"], 2, "{stats}");
    assert_eq!(c["disconnections_by_reason"]["client_closed"], 1, "{stats}");
    let rate = c["success_rate"].as_f64().unwrap();
    assert!(
        (rate - 200.0 / 3.0).abs() < 0.1,
        "success rate {rate}: {stats}"
    );
    assert!(c["uptime_secs"].as_f64().is_some(), "{stats}");
    assert!(c["registrations_per_minute"].as_u64() >= Some(2), "{stats}");
    assert!(c["cleanups_per_minute"].as_u64() >= Some(1), "{stats}");
    assert!(c["stale_declared"].is_u64(), "{stats}");
}

#[tokio::test]
async fn agents_are_listed_and_described() {
    let server = TestServer::start(&[]);
    let (_alice, registered) = Agent::register(&server.ws_url(), "alice").await;
    let mut bob = Agent::connect(&server.ws_url()).await;
    let answer = bob
        .request(
            json!({"type":"system_request","command":"register_agent","agent_id":"bob",
                        "metadata":{"name":"Bob","capabilities":["chat"]}}),
        )
        .await;
    assert_eq!(answer["success"], true);

    let (status, list) = get(&server, "/agents").await;
    assert_eq!(status, 200, "{list}");
    let agents = list["agents"].as_array().expect("agents array");
    let mut ids: Vec<&str> = agents
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["alice", "bob"], "{list}");

    let (status, alice) = get(&server, "/agents/alice").await;
    assert_eq!(status, 200, "{alice}");
    assert_eq!(alice["agent_id"], "alice");
    assert_eq!(alice["session_id"], registered["session_id"]);
    assert_eq!(alice["incarnation"], 1);
    assert_eq!(alice["state"], "active");
    assert!(alice["connected_at"].is_string(), "{alice}");
    for field in ["last_seen", "last_activity"] {
        assert!(
            alice[field].as_f64().is_some_and(|t| t > 1.7e9),
            "{field}: {alice}"
        );
    }
    assert!(
        alice["remote_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{alice}"
    );
    assert!(alice["queue_length"].is_u64(), "{alice}");

    let (_, bob_info) = get(&server, "/agents/bob").await;
    assert_eq!(
        bob_info["metadata"],
        json!({"name":"Bob","capabilities":["chat"]})
    );
    assert_eq!(bob_info["name"], "Bob");

    let (status, _) = get(&server, "/agents/nobody").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn delete_closes_the_agent_1000_with_reason_admin() {
    let server = TestServer::start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let (mut alice, _) = Agent::register(&server.ws_url(), "alice").await;
    let (mut bob, _) = Agent::register(&server.ws_url(), "bob").await;

    let response = common::http()
        .delete(server.http("/agents/alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(alice.closed().await, Closed::Code(1000));

    let (_, disconnected) = common::expect_short_life(&mut events, "alice").await;
    assert_eq!(disconnected["data"]["reason"], "admin", "{disconnected}");
    assert_eq!(disconnected["data"]["close_code"], 1000, "{disconnected}");

    let (status, _) = get(&server, "/agents/alice").await;
    assert_eq!(status, 404);
    let again = common::http()
        .delete(server.http("/agents/alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);

    // Bob is untouched; alice may come back.
    let listed = bob
        .request(json!({"type":"system_request","command":"list_agents"}))
        .await;
    assert_eq!(listed["agents"].as_array().unwrap().len(), 1, "{listed}");
    let (_alice, back) = Agent::register(&server.ws_url(), "alice").await;
    assert_eq!(back["incarnation"], 2);
}

#[tokio::test]
async fn with_a_token_every_route_but_health_requires_it() {
    let server = TestServer::start(&[("TETHER__ADMIN__TOKEN", "s3cret-token")]);
    let (_alice, _) = Agent::register(&server.ws_url(), "alice").await;
    let client = common::http();
    let routes = [
        ("GET", "/stats"),
        ("GET", "/agents"),
        ("GET", "/agents/alice"),
        ("GET", "/events"),
        ("DELETE", "/agents/nobody"),
    ];
    for (method, path) in routes {
        let request = |token: Option<&str>| {
            let mut request = match method {
                "GET" => client.get(server.http(path)),
                _ => client.delete(server.http(path)),
            };
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            request
        };
        let none = request(None).send().await.unwrap();
        assert_eq!(none.status(), 401, "{method} {path} without a token");
        let wrong = request(Some("wrong-token")).send().await.unwrap();
        assert_eq!(wrong.status(), 401, "{method} {path} with a wrong token");
        let basic = match method {
            "GET" => client.get(server.http(path)),
            _ => client.delete(server.http(path)),
        }
        .basic_auth("admin", Some("s3cret-token"))
        .send()
        .await
        .unwrap();
        assert_eq!(basic.status(), 401, "{method} {path} with basic auth");
        let right = request(Some("s3cret-token")).send().await.unwrap();
        let expected = if method == "DELETE" { 404 } else { 200 };
        assert_eq!(right.status(), expected, "{method} {path} with the token");
    }
    // The token lets the event stream through too.
    let _events = EventStream::subscribe(&server, Some("s3cret-token")).await;

    let health = client.get(server.http("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200, "/health is always open");
    let delete = client
        .delete(server.http("/agents/alice"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 204);
}

#[tokio::test]
async fn a_non_loopback_server_with_a_token_starts_and_guards_its_routes() {
    let server = TestServer::start(&[
        ("TETHER__NETWORK__HOST", "0.0.0.0"),
        ("TETHER__ADMIN__TOKEN", "t0ken"),
    ]);
    let port = server.addr.rsplit(':').next().unwrap();
    let local = format!("http://127.0.0.1:{port}");
    let denied = common::http()
        .get(format!("{local}/agents"))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    let allowed = common::http()
        .get(format!("{local}/agents"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
}
