//! The Rust client library (`tether-client`, clients/rust) against the real server:
//! registration, messages (also with an agent of the Python library), heartbeats, a
//! half-open connection taken back with the certificate, a server restart, an
//! instruction acknowledgement lost with its connection, and refusals.
//!
//! The Python peer runs `clients/python/examples/echo.py` with the interpreter in
//! `TETHER_TEST_CLIENT_PYTHON`, which `scripts/test.sh` exports after installing
//! `tether-agent` into `.venv-clients`.

mod common;

use common::clients::{tls_proxy, PythonEcho};
use common::instructions::{create_id, event_of};
use common::takeover::assert_takeover_events;
use common::{EventStream, TestServer, DEADLINE};
use futures_util::FutureExt;
use serde_json::{json, Value};
use std::time::Duration;
use tether_client::{
    AckStatus, Agent, AgentConfig, ErrorCode, Event, Keepalive, MessageKind, ReconnectPolicy,
    INSTRUCTIONS_CAPABILITY,
};
use tether_testkit::proxy::Proxy;

/// Reconnects quickly: the tests wait for reconnections.
fn quick(config: AgentConfig) -> AgentConfig {
    config.reconnect(ReconnectPolicy {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(300),
        ..ReconnectPolicy::default()
    })
}

/// Notices a dead connection within about a second.
fn watchful(config: AgentConfig) -> AgentConfig {
    quick(config).keepalive(Keepalive {
        idle: Duration::from_millis(300),
        timeout: Duration::from_millis(500),
    })
}

async fn connect(config: AgentConfig) -> Agent {
    let agent_id = config.agent_id().to_owned();
    Agent::connect(config)
        .await
        .unwrap_or_else(|error| panic!("{agent_id} could not connect: {error}"))
}

/// The next message the agent receives (other events skipped), within the deadline.
async fn next_message(agent: &mut Agent) -> tether_client::Message {
    next_matching(agent, |e| match e {
        Event::Message(m) => Some(m),
        _ => None,
    })
    .await
}

/// The next `Disconnected` event, within the deadline.
async fn next_disconnect(agent: &mut Agent) -> tether_client::Disconnect {
    next_matching(agent, |e| match e {
        Event::Disconnected(d) => Some(d),
        _ => None,
    })
    .await
}

/// The next `Reconnected` event, within the deadline.
async fn next_reconnect(agent: &mut Agent) -> tether_client::Registration {
    next_matching(agent, |e| match e {
        Event::Reconnected(r) => Some(r),
        _ => None,
    })
    .await
}

/// The next event that `pick` accepts (others are skipped), within the deadline.
async fn next_matching<T>(agent: &mut Agent, mut pick: impl FnMut(Event) -> Option<T>) -> T {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let event = agent.next_event().await.expect("the agent stopped");
            if let Some(found) = pick(event) {
                return found;
            }
        }
    })
    .await
    .expect("the expected event did not come in time")
}

#[tokio::test]
async fn agents_register_and_exchange_direct_and_broadcast_messages() {
    let server = TestServer::start(&[]);
    let mut alice = connect(AgentConfig::new(server.ws_url(), "alice").name("Alice")).await;
    let mut bob = connect(AgentConfig::new(server.ws_url(), "bob")).await;
    let registration = alice.registration();
    assert_eq!(registration.agent_id, "alice");
    assert_eq!(registration.incarnation, 1);
    assert!(!registration.session_id.is_empty());
    assert!(
        alice.certificate().is_some(),
        "a certificate is claimed after registering"
    );

    let sent = alice
        .send_direct("bob", json!({"text": "hi"}))
        .await
        .unwrap();
    let message = next_message(&mut bob).await;
    assert_eq!(message.sender_id, "alice");
    assert_eq!(message.kind, MessageKind::Direct);
    assert_eq!(message.message_id, sent);
    assert_eq!(message.content, json!({"text": "hi"}));

    bob.broadcast(json!({"text": "all"}), &[]).await.unwrap();
    let message = next_message(&mut alice).await;
    assert_eq!(
        (message.kind, message.sender_id.as_str()),
        (MessageKind::Broadcast, "bob")
    );

    let names: Vec<String> = alice
        .list_agents()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, ["Alice", "bob"]);

    alice.send_direct("nobody", json!(1)).await.unwrap();
    let error = next_matching(&mut alice, |e| match e {
        Event::Error(error) => Some(error),
        _ => None,
    })
    .await;
    assert_eq!(error.code, ErrorCode::UnknownAgent);
    alice.close().await.unwrap();
    bob.close().await.unwrap();
}

#[tokio::test]
async fn a_rust_agent_and_a_python_agent_exchange_messages() {
    let server = TestServer::start(&[]);
    let mut echo = PythonEcho::start(&server.ws_url(), "py-echo").await;
    let mut agent = connect(AgentConfig::new(server.ws_url(), "rust-agent")).await;
    let peers = agent.list_agents().await.unwrap();
    let python = peers.iter().find(|a| a.agent_id == "py-echo").unwrap();
    assert_eq!(
        python.metadata["capabilities"],
        json!(["echo", "instructions"])
    );

    for n in 0..3 {
        agent.send_direct("py-echo", json!({"n": n})).await.unwrap();
        let reply = next_message(&mut agent).await;
        assert_eq!(reply.sender_id, "py-echo");
        assert_eq!(reply.content, json!({"echo": {"n": n}}));
    }
    agent.close().await.unwrap();
    echo.child.kill().await.unwrap();
}

#[tokio::test]
async fn an_agent_answers_pings_for_three_intervals_without_going_stale() {
    let server = TestServer::start(&[
        ("TETHER__HEARTBEAT__INTERVAL", "1"),
        ("TETHER__HEARTBEAT__PING_TIMEOUT", "0.5"),
    ]);
    let mut events = EventStream::subscribe(&server, None).await;
    let mut agent = connect(AgentConfig::new(server.ws_url(), "steady")).await;
    assert_eq!(
        agent.registration().heartbeat_interval,
        Duration::from_secs(1)
    );
    // Silent on its own: only the server's pings keep it alive.
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    tokio::time::timeout(DEADLINE, async {
        while agent.stats().pings_answered < 3 {
            poll.tick().await;
        }
    })
    .await
    .expect("fewer than 3 pings answered in time");
    assert_eq!(agent.registration().incarnation, 1);
    assert_eq!(agent.stats().reconnects, 0);
    assert!(
        agent.next_event().now_or_never().is_none(),
        "no event: the connection was never lost"
    );
    let shown = server.get_json("/agents/steady").await;
    assert_eq!(shown["incarnation"], 1, "{shown}");
    // Every event up to a marker agent registered after the 3 pings: none is stale.
    let (_marker, _) = common::Agent::register(&server.ws_url(), "marker").await;
    let seen: Vec<String> = events
        .collect_until(|e| e["type"] == "agent.registered" && e["subject"] == "marker")
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert!(!seen.iter().any(|t| t == "agent.stale"), "{seen:?}");
    agent.close().await.unwrap();
}

#[tokio::test]
async fn a_half_open_connection_is_taken_back_with_the_certificate() {
    let server = TestServer::start(&[]);
    let proxy = Proxy::start(&server.addr);
    let mut events = EventStream::subscribe(&server, None).await;
    let url = format!("ws://{}/", proxy.addr());
    let mut agent = connect(watchful(AgentConfig::new(url, "roamer"))).await;
    assert!(agent.certificate().is_some());

    proxy.freeze();
    let lost = next_disconnect(&mut agent).await;
    assert!(lost.reconnecting, "{lost:?}");
    let back = next_reconnect(&mut agent).await;
    assert_eq!(back.incarnation, 2);
    assert!(back.with_certificate);

    let all = events
        .collect_until(|e| e["type"] == "agent.registered" && e["data"]["incarnation"] == 2)
        .await;
    // One takeover by certificate, no refused registration in between.
    assert_takeover_events(&all, "roamer", "certificate", &back.session_id);
    assert_eq!(agent.stats().reconnects, 1);
    agent.close().await.unwrap();
}

#[tokio::test]
async fn a_long_connected_agent_renews_its_certificate_and_still_takes_its_id_back() {
    // Certificates live 2 s: the one claimed at registration has long expired when
    // the connection goes half-open.
    let server = TestServer::start(&[("TETHER__IDENTITY__CERTIFICATE_TTL", "2")]);
    let proxy = Proxy::start(&server.addr);
    let mut events = EventStream::subscribe(&server, None).await;
    let url = format!("ws://{}/", proxy.addr());
    let mut agent = connect(watchful(AgentConfig::new(url, "veteran"))).await;
    let first = agent
        .certificate()
        .expect("a certificate after registering");
    let first_expiry = first["expires_at"].as_f64().unwrap();
    // Renewed, again and again, until one was issued after the first expired.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut seen = std::collections::HashSet::new();
    loop {
        let current = agent.certificate().unwrap();
        seen.insert(current["certificate_hash"].to_string());
        if current["issued_at"].as_f64().unwrap() > first_expiry {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no renewal past the first certificate's expiry; certificates seen: {}",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
    assert!(seen.len() >= 3, "renewed at each half-life: {seen:?}");
    assert!(
        agent.is_connected(),
        "renewing does not cost the connection"
    );

    proxy.freeze();
    let back = next_reconnect(&mut agent).await;
    assert_eq!(back.incarnation, 2);
    assert!(
        back.with_certificate,
        "the renewed certificate took the id back"
    );
    let all = events
        .collect_until(|e| e["type"] == "agent.registered" && e["data"]["incarnation"] == 2)
        .await;
    assert_takeover_events(&all, "veteran", "certificate", &back.session_id);
    agent.close().await.unwrap();
}

#[tokio::test]
async fn a_write_the_server_never_takes_counts_as_a_lost_connection() {
    let server = TestServer::start(&[]);
    let proxy = Proxy::start(&server.addr);
    let url = format!("ws://{}/", proxy.addr());
    let mut agent = connect(watchful(AgentConfig::new(url, "writer"))).await;
    // Nothing is read from the agent's socket any more: 20 MB of messages fill the
    // kernel's buffers and the agent's write waits for room that never comes.
    proxy.freeze();
    let bulk = json!("x".repeat(200_000));
    for _ in 0..100 {
        agent.send_direct("nobody", bulk.clone()).await.unwrap();
    }
    let lost = next_disconnect(&mut agent).await;
    assert!(lost.reconnecting, "{lost:?}");
    assert!(lost.reason.contains("stuck"), "{lost:?}");
    let back = next_reconnect(&mut agent).await;
    assert_eq!(back.incarnation, 2);
    agent.close().await.unwrap();
}

#[tokio::test]
async fn reconnect_delays_carry_on_across_connections_that_do_not_last() {
    let server = TestServer::start(&[]);
    let proxy = Proxy::start(&server.addr);
    let url = format!("ws://{}/", proxy.addr());
    let policy = ReconnectPolicy {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(30),
        factor: 2.0,
        jitter: false,
        max_attempts: None,
    };
    let mut agent = connect(AgentConfig::new(url, "flapping").reconnect(policy)).await;
    let mut gaps = Vec::new();
    for _ in 0..4 {
        proxy.cut(); // each connection ends right after it was made
        let lost = next_disconnect(&mut agent).await;
        assert!(lost.reconnecting, "{lost:?}");
        let lost_at = tokio::time::Instant::now();
        proxy.restore();
        next_reconnect(&mut agent).await;
        gaps.push(lost_at.elapsed());
    }
    // Attempt n waits 100 ms × 2ⁿ⁻¹. The count carries on across connections that did
    // not last, so the fourth reconnection is attempt 4 (800 ms); counted afresh it
    // would wait 100 ms.
    assert!(gaps[3] >= Duration::from_millis(750), "{gaps:?}");
    assert_eq!(agent.stats().reconnects, 4);
    agent.close().await.unwrap();
}

#[tokio::test]
async fn list_agents_lists_a_large_network_within_the_request_budget() {
    // A budget of 30 requests (100 a second) and 1 050 agents: pages cost 1 + 1 per ten
    // entries asked for, so the pages run past the budget and some are refused
    // `rate_limited` until it refills.
    let server = TestServer::start(&[("TETHER__LIMITS__REQUEST_BURST", "30")]);
    let mut others = Vec::new();
    for n in 0..1049 {
        others.push(
            common::Agent::register(&server.ws_url(), &format!("member-{n}"))
                .await
                .0,
        );
    }
    let lister = connect(AgentConfig::new(server.ws_url(), "lister")).await;
    let listed = lister.list_agents().await.expect("every page");
    let mut ids: Vec<String> = listed.into_iter().map(|a| a.agent_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1050, "each agent once");
    assert!(
        lister.is_connected(),
        "the refusals did not cost the connection"
    );
    lister.close().await.unwrap();
}

#[tokio::test]
async fn what_was_sent_before_close_goes_out_before_the_close() {
    let server = TestServer::start(&[]);
    let mut reader = connect(AgentConfig::new(server.ws_url(), "reader")).await;
    for round in 0..5 {
        let writer = connect(AgentConfig::new(server.ws_url(), "writer")).await;
        for n in 0..50 {
            writer
                .send_direct("reader", json!([round, n]))
                .await
                .unwrap();
        }
        writer.close().await.unwrap();
        for n in 0..50 {
            let message = next_message(&mut reader).await;
            assert_eq!(message.content, json!([round, n]), "in order, none lost");
        }
    }
    reader.close().await.unwrap();
}

#[tokio::test]
async fn an_agent_comes_back_after_a_server_restart() {
    let database = common::fresh_database_path();
    let storage = format!("sqlite://{}", database.display());
    let secret = [
        ("TETHER__IDENTITY__SECRET", "restart-test-secret"),
        ("TETHER__STORAGE__URL", storage.as_str()),
    ];
    let mut server = TestServer::start(&secret);
    let port = server.addr.rsplit_once(':').unwrap().1.to_owned();
    let mut agent = connect(quick(AgentConfig::new(server.ws_url(), "survivor"))).await;

    server.signal("TERM");
    let notice = next_matching(&mut agent, |e| match e {
        Event::Notification(n) => Some(n),
        _ => None,
    })
    .await;
    assert_eq!(notice.event, "network_shutdown");
    let lost = next_disconnect(&mut agent).await;
    assert!(lost.reconnecting, "{lost:?}");
    assert_eq!(server.wait_exit().await, Some(0));

    let env = [
        secret[0],
        secret[1],
        ("TETHER__NETWORK__PORT", port.as_str()),
    ];
    let server = TestServer::start(&env);
    next_reconnect(&mut agent).await;
    assert!(agent.is_connected());
    let other = connect(AgentConfig::new(server.ws_url(), "witness")).await;
    other.send_direct("survivor", json!("after")).await.unwrap();
    let message = next_message(&mut agent).await;
    assert_eq!(message.content, json!("after"));
    agent.close().await.unwrap();
    let _ = std::fs::remove_file(database);
}

#[tokio::test]
async fn an_acknowledgement_lost_with_its_connection_finishes_the_instruction_once() {
    let server = TestServer::start(&[]);
    let proxy = Proxy::start(&server.addr);
    let mut events = EventStream::subscribe(&server, None).await;
    let url = format!("ws://{}/", proxy.addr());
    let config = AgentConfig::new(url, "worker").capability(INSTRUCTIONS_CAPABILITY);
    let mut agent = connect(watchful(config)).await;

    let id = create_id(&server, "worker", json!({"payload": {"task": 1}})).await;
    let instruction = next_matching(&mut agent, |e| match e {
        Event::Instruction(i) => Some(i),
        _ => None,
    })
    .await;
    assert_eq!(
        (instruction.instruction_id.as_str(), instruction.attempt),
        (id.as_str(), 1)
    );

    // The acknowledgement goes into a connection that no longer reaches the server.
    proxy.freeze();
    agent
        .ack(&id, AckStatus::Done, Some(json!({"ok": true})))
        .await
        .unwrap();
    let mut redelivered_to_app = 0;
    next_matching(&mut agent, |e| match e {
        Event::Instruction(_) => {
            redelivered_to_app += 1;
            None
        }
        Event::Reconnected(r) => Some(r),
        _ => None,
    })
    .await;
    let done = event_of(&mut events, "instruction.done", &id).await;
    assert_eq!(
        done["data"]["attempt"], 2,
        "finished by the automatic re-ack: {done}"
    );
    let shown = server.get_json(&format!("/instructions/{id}")).await;
    assert_eq!(shown["state"], "done", "{shown}");
    assert_eq!(shown["result"], json!({"ok": true}), "{shown}");
    // Once the server has closed the instruction, nothing reaches the application and
    // no second `instruction.done` is published: read both up to a probe's marker.
    let (mut probe, _) = common::Agent::register(&server.ws_url(), "probe").await;
    probe
        .send(common::direct("worker", json!({"marker": true})))
        .await;
    let mut skipped = Vec::new();
    next_matching(&mut agent, |e| match e {
        Event::Message(m) if m.sender_id == "probe" => Some(()),
        other => {
            skipped.push(other);
            None
        }
    })
    .await;
    assert!(
        !skipped
            .iter()
            .any(|e| matches!(e, Event::Instruction(_) | Event::Error(_))),
        "{skipped:?}"
    );
    assert_eq!(redelivered_to_app, 0);
    assert_eq!(agent.stats().instructions_received, 1);
    let dones = events
        .collect_until(|e| e["type"] == "agent.registered" && e["subject"] == "probe")
        .await
        .iter()
        .filter(|e| e["type"] == "instruction.done")
        .count();
    assert_eq!(dones, 0, "a second instruction.done");
    agent.close().await.unwrap();
}

#[tokio::test]
async fn a_refused_registration_reports_its_error_code() {
    let server = TestServer::start(&[]);
    let holder = connect(AgentConfig::new(server.ws_url(), "taken")).await;
    let refused = Agent::connect(AgentConfig::new(server.ws_url(), "taken"))
        .await
        .err()
        .expect("a second registration of a live id without proof is refused");
    assert_eq!(
        refused.error_code(),
        Some(&ErrorCode::AgentIdInUse),
        "{refused}"
    );
    let invalid = Agent::connect(AgentConfig::new(server.ws_url(), "not valid!"))
        .await
        .err()
        .expect("an invalid id is refused");
    assert_eq!(
        invalid.error_code(),
        Some(&ErrorCode::InvalidAgentId),
        "{invalid}"
    );
    holder.close().await.unwrap();
}

#[tokio::test]
async fn an_agent_replaced_by_another_connection_stops_and_says_why() {
    let server = TestServer::start(&[]);
    let mut first = connect(quick(AgentConfig::new(server.ws_url(), "contested"))).await;
    let second =
        connect(AgentConfig::new(server.ws_url(), "contested").force_reconnect(true)).await;
    assert_eq!(second.registration().incarnation, 2);
    let end = next_disconnect(&mut first).await;
    assert_eq!(end.close_code, Some(4001), "{end:?}");
    assert!(
        !end.reconnecting,
        "an agent does not fight for its id: {end:?}"
    );
    assert_eq!(
        tokio::time::timeout(DEADLINE, first.next_event())
            .await
            .unwrap(),
        None
    );
    let error = first.send_direct("x", Value::Null).await.unwrap_err();
    assert!(matches!(error, tether_client::Error::Stopped(_)), "{error}");
    second.close().await.unwrap();
}

#[tokio::test]
async fn a_clustered_agent_follows_reconnect_url_when_its_node_shuts_down() {
    let (_prefix, mut nodes) = common::cluster::cluster(2, "10").await;
    let mut agent = connect(quick(AgentConfig::new(nodes[0].ws_url(), "mover"))).await;
    nodes[0].signal("TERM");
    let notice = next_matching(&mut agent, |e| match e {
        Event::Notification(n) => Some(n),
        _ => None,
    })
    .await;
    let other_port = nodes[1].addr.rsplit_once(':').unwrap().1.to_owned();
    let reconnect_url = notice.reconnect_url.clone().expect("a reconnect_url");
    assert!(reconnect_url.contains(&other_port), "{notice:?}");
    next_reconnect(&mut agent).await;
    assert_eq!(nodes[0].wait_exit().await, Some(0));
    // The configured URL is gone: the agent is on the other node.
    let witness = connect(AgentConfig::new(nodes[1].ws_url(), "witness")).await;
    witness.send_direct("mover", json!("here")).await.unwrap();
    let message = next_message(&mut agent).await;
    assert_eq!(message.content, json!("here"));
    let mover = nodes[1].get_json("/agents/mover").await;
    let witness_seen = nodes[1].get_json("/agents/witness").await;
    assert!(mover["node_id"].is_string(), "{mover}");
    assert_eq!(
        mover["node_id"], witness_seen["node_id"],
        "on the other node"
    );
    assert_eq!(agent.stats().reconnects, 1, "straight to reconnect_url");
    agent.close().await.unwrap();
    witness.close().await.unwrap();
}

#[tokio::test]
async fn an_agent_connects_over_wss() {
    let server = TestServer::start(&[]);
    let ca_file = std::env::temp_dir().join(format!("tether-ca-{}.pem", std::process::id()));
    let port = tls_proxy(server.addr.clone(), &ca_file).await;
    // The agent trusts the system store; here that store is this one certificate.
    std::env::set_var("SSL_CERT_FILE", &ca_file);
    let url = format!("wss://localhost:{port}/");
    let mut secure = connect(AgentConfig::new(url, "secure")).await;
    assert_eq!(secure.registration().incarnation, 1);
    let plain = connect(AgentConfig::new(server.ws_url(), "plain")).await;
    plain
        .send_direct("secure", json!("over tls"))
        .await
        .unwrap();
    let message = next_message(&mut secure).await;
    assert_eq!(
        (message.sender_id.as_str(), message.content),
        ("plain", json!("over tls"))
    );
    // A server certificate the store does not vouch for is refused: the store now holds
    // an unrelated certificate only (a store that loads, not an empty one).
    let other_file = ca_file.with_extension("other.pem");
    let unrelated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(&other_file, unrelated.cert.pem()).unwrap();
    std::env::set_var("SSL_CERT_FILE", &other_file);
    let untrusted = Agent::connect(AgentConfig::new(format!("wss://localhost:{port}/"), "x")).await;
    match untrusted {
        // rustls names the unrelated certificate's failure (same subject: BadSignature).
        Err(tether_client::Error::Connect { reason, .. }) => assert!(
            reason.contains("invalid peer certificate"),
            "refused for another reason than the server's certificate: {reason}"
        ),
        other => panic!("an untrusted server was accepted: {:?}", other.err()),
    }
    secure.close().await.unwrap();
    plain.close().await.unwrap();
    let _ = std::fs::remove_file(ca_file);
    let _ = std::fs::remove_file(other_file);
}
