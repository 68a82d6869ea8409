//! Hostile clients (issue 10, README "Security model"): each attack gets a clear error or
//! close code, and takes no identity, memory or time it was not given.

mod common;

use common::{broadcast, direct, Agent, Closed, TestServer, DEADLINE};
use futures_util::SinkExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Sends a WebSocket upgrade request with `extra` header lines; returns the response head.
async fn upgrade_head(server: &TestServer, extra: &str) -> String {
    let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n",
        server.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            if tcp.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            head.push(byte[0]);
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("no response head");
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn a_page_of_an_unlisted_origin_cannot_open_an_agent_socket() {
    let server = TestServer::start(&[]);
    let head = upgrade_head(&server, "Origin: https://evil.example\r\n").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    // Native agents send no Origin and are upgraded as before.
    let head = upgrade_head(&server, "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (mut agent, _) = Agent::register(&server.ws_url(), "native").await;
    agent.send(direct("native", json!("to myself"))).await;
    agent.wait_for(|f| f["type"] == "message").await;
}

#[tokio::test]
async fn listed_origins_are_upgraded_and_others_still_refused() {
    let env = [(
        "TETHER__NETWORK__ALLOWED_ORIGINS",
        "https://app.example,http://localhost:3000",
    )];
    let server = TestServer::start(&env);
    for origin in [
        "https://app.example",
        "HTTPS://APP.EXAMPLE",
        "http://localhost:3000",
    ] {
        let head = upgrade_head(&server, &format!("Origin: {origin}\r\n")).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{origin}: {head}");
    }
    for origin in ["https://app.example.evil", "http://localhost:3001", "null"] {
        let head = upgrade_head(&server, &format!("Origin: {origin}\r\n")).await;
        assert!(head.starts_with("HTTP/1.1 403"), "{origin}: {head}");
    }

    let any = TestServer::start(&[("TETHER__NETWORK__ALLOWED_ORIGINS", "*")]);
    let head = upgrade_head(&any, "Origin: https://anything.example\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

#[tokio::test]
async fn a_forged_sender_id_anywhere_in_a_message_is_replaced_by_the_real_one() {
    let server = TestServer::start(&[]);
    let (mut mallory, _) = Agent::register(&server.ws_url(), "mallory").await;
    let (mut bob, _) = Agent::register(&server.ws_url(), "bob").await;
    let mut frame = direct("bob", json!("from your boss"));
    frame["sender_id"] = json!("boss");
    frame["data"]["sender_id"] = json!("boss");
    mallory.send(frame).await;
    let got = bob.wait_for(|f| f["type"] == "message").await;
    assert_eq!(got["sender_id"], "mallory", "{got}");
    assert_eq!(got["data"]["sender_id"], "mallory", "{got}");
}

#[tokio::test]
async fn a_broadcast_excluding_more_than_the_limit_is_refused_and_sends_nothing() {
    let server = TestServer::start(&[("TETHER__LIMITS__MAX_BROADCAST_EXCLUSIONS", "3")]);
    let (mut sender, _) = Agent::register(&server.ws_url(), "sender").await;
    let (mut bystander, _) = Agent::register(&server.ws_url(), "bystander").await;
    sender
        .send(broadcast(&["a", "b", "c", "d"], json!("too picky")))
        .await;
    let refused = sender.wait_for(|f| f["type"] == "error").await;
    assert_eq!(refused["error_code"], "too_many_exclusions", "{refused}");
    assert!(refused["message_id"].is_string(), "{refused}");
    // Within the limit it goes out; the bystander's first message is this one.
    sender
        .send(broadcast(&["a", "b", "c"], json!("fine")))
        .await;
    let got = bystander.wait_for(|f| f["type"] == "message").await;
    assert_eq!(got["data"]["content"], "fine", "{got}");
}

#[tokio::test]
async fn broadcasts_past_the_copy_budget_are_refused_and_send_nothing_while_direct_messages_go() {
    // Three agents: each broadcast is two copies; the budget is two a second, two at once.
    let server = TestServer::start(&[
        ("TETHER__LIMITS__MAX_BROADCAST_COPIES_PER_SECOND", "2"),
        ("TETHER__LIMITS__BROADCAST_COPY_BURST", "2"),
    ]);
    let (mut sender, _) = Agent::register(&server.ws_url(), "sender").await;
    let (mut first_in, _) = Agent::register(&server.ws_url(), "first-in").await;
    let (mut second_in, _) = Agent::register(&server.ws_url(), "second-in").await;
    sender.send(broadcast(&[], json!("first"))).await;
    sender.send(broadcast(&[], json!("second"))).await;
    let refused = sender.wait_for(|f| f["type"] == "error").await;
    assert_eq!(refused["error_code"], "rate_limited", "{refused}");
    assert!(refused["message_id"].is_string(), "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("limits.max_broadcast_copies_per_second")),
        "{refused}"
    );
    // The budget is for broadcasts only: a direct message goes at once, and it is the
    // next thing its recipient gets after the first broadcast (the second never went).
    sender.send(direct("first-in", json!("direct"))).await;
    for expected in ["first", "direct"] {
        let got = first_in.wait_for(|f| f["type"] == "message").await;
        assert_eq!(got["data"]["content"], expected, "{got}");
    }
    let got = second_in.wait_for(|f| f["type"] == "message").await;
    assert_eq!(got["data"]["content"], "first", "{got}");
    // The budget refills: a later broadcast goes out within a few tries.
    let mut tries = 0;
    let later = loop {
        sender.send(broadcast(&[], json!("later"))).await;
        let next = second_in.wait_for(|f| f["type"] == "message");
        match tokio::time::timeout(std::time::Duration::from_millis(300), next).await {
            Ok(got) => break got,
            Err(_) => {
                tries += 1;
                assert!(tries < 20, "the broadcast budget never refilled");
            }
        }
    };
    assert_eq!(later["data"]["content"], "later", "{later}");
}

#[tokio::test]
async fn a_broadcast_to_more_agents_than_the_copy_burst_still_goes() {
    let server = TestServer::start(&[("TETHER__LIMITS__BROADCAST_COPY_BURST", "1")]);
    let (mut sender, _) = Agent::register(&server.ws_url(), "sender").await;
    let (mut first_in, _) = Agent::register(&server.ws_url(), "first-in").await;
    let (mut second_in, _) = Agent::register(&server.ws_url(), "second-in").await;
    sender.send(broadcast(&[], json!("to both"))).await;
    for recipient in [&mut first_in, &mut second_in] {
        let got = recipient.wait_for(|f| f["type"] == "message").await;
        assert_eq!(got["data"]["content"], "to both", "{got}");
    }
    let answer = tokio::time::timeout(std::time::Duration::from_millis(200), sender.next()).await;
    assert!(answer.is_err(), "the sender was answered: {answer:?}");
}

#[tokio::test]
async fn broadcasts_refused_request_burst_times_in_a_row_close_1008_and_an_accepted_one_resets_the_count(
) {
    // Two recipients: each broadcast is two copies; the budget holds two broadcasts
    // and refills one every half second. Three refused in a row close.
    let env = [
        ("TETHER__LIMITS__MAX_BROADCAST_COPIES_PER_SECOND", "4"),
        ("TETHER__LIMITS__BROADCAST_COPY_BURST", "4"),
        ("TETHER__LIMITS__REQUEST_BURST", "3"),
    ];
    let server = TestServer::start(&env);
    let (mut sender, _) = Agent::register(&server.ws_url(), "sender").await;
    let (mut recipient, _) = Agent::register(&server.ws_url(), "recipient").await;
    let (_other, _) = Agent::register(&server.ws_url(), "other").await;
    for n in 1..=4 {
        sender.send(broadcast(&[], json!(format!("b{n}")))).await;
    }
    for _ in 0..2 {
        let refused = sender.wait_for(|f| f["type"] == "error").await;
        assert_eq!(refused["error_code"], "rate_limited", "{refused}");
    }
    // Two refused in a row so far. The budget refills (a wait on the configured rate:
    // nothing to observe but the budget itself); an accepted broadcast resets the count.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    sender.send(broadcast(&[], json!("b5"))).await;
    for expected in ["b1", "b2", "b5"] {
        let got = recipient.wait_for(|f| f["type"] == "message").await;
        assert_eq!(got["data"]["content"], expected, "{got}");
    }
    // Now a flood: at most two of it fit the budget, then three refusals in a row
    // close the connection; the first two of them are answered, the third closes.
    for n in 6..=12 {
        sender.send(broadcast(&[], json!(format!("b{n}")))).await;
    }
    let (refusals, closed) = sender.frames_until_closed().await;
    assert_eq!(closed, Closed::Code(1008));
    for frame in &refusals {
        assert_eq!(frame["error_code"], "rate_limited", "{frame}");
    }
    let refused_after_reset = refusals.len();
    assert_eq!(
        refused_after_reset, 2,
        "the accepted b5 resets the count: two answered refusals, then the close"
    );
    assert_no_panic(&server);
}

#[test]
fn check_config_prints_reusable_toml_with_every_secret_redacted() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("check-config")
        .env("TETHER__IDENTITY__SECRET", "hunter2-secret")
        .env("TETHER__ADMIN__TOKEN", "hunter2-token")
        .env(
            "TETHER__EVENTS__RABBITMQ__URL",
            "amqp://guest:hunter2-amqp@127.0.0.1:5672/%2f",
        )
        .output()
        .expect("cannot run tether check-config");
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(
        !printed.contains("hunter2"),
        "a secret was printed:\n{printed}"
    );
    assert!(printed.contains("token = \"<redacted>\""), "{printed}");
    assert!(printed.contains("[network]"), "{printed}");
    // What it printed is a configuration file the server accepts.
    let file = std::env::temp_dir().join(format!("tether-check-{}.toml", std::process::id()));
    std::fs::write(&file, &printed).unwrap();
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["--config", file.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    std::fs::remove_file(&file).ok();
    assert!(again.status.success(), "{again:?}");
    assert_eq!(String::from_utf8(again.stdout).unwrap(), printed);
}

async fn claim(agent: &mut Agent, agent_id: &str) -> serde_json::Value {
    agent
        .request(json!({"type":"system_request","command":"claim_agent_id","agent_id": agent_id}))
        .await
}

#[tokio::test]
async fn claims_are_bounded_per_connection_and_server_wide() {
    let env = [
        ("TETHER__LIMITS__MAX_CLAIMS_PER_CONNECTION", "3"),
        ("TETHER__LIMITS__MAX_OUTSTANDING_CLAIMS", "5"),
    ];
    let server = TestServer::start(&env);
    let mut first = Agent::connect(&server.ws_url()).await;
    for i in 0..3 {
        let granted = claim(&mut first, &format!("id-{i}")).await;
        assert_eq!(granted["success"], true, "{granted}");
    }
    let refused = claim(&mut first, "id-3").await;
    assert_eq!(refused["error_code"], "too_many_claims", "{refused}");
    let mut second = Agent::connect(&server.ws_url()).await;
    for i in 3..5 {
        let granted = claim(&mut second, &format!("id-{i}")).await;
        assert_eq!(granted["success"], true, "{granted}");
    }
    let full = claim(&mut second, "id-5").await;
    assert_eq!(full["error_code"], "too_many_claims", "{full}");
    // A registration binds its claim, which frees a place for a new one.
    let mut third = Agent::connect(&server.ws_url()).await;
    let registered = third
        .request(
            json!({"type":"system_request","command":"register_agent","agent_id":"id-0",
                        "metadata":{}}),
        )
        .await;
    assert_eq!(registered["success"], true, "{registered}");
    let mut fourth = Agent::connect(&server.ws_url()).await;
    let granted = claim(&mut fourth, "id-5").await;
    assert_eq!(granted["success"], true, "{granted}");
}

#[tokio::test]
async fn a_pre_claimed_certificate_cannot_take_the_id_from_the_agent_that_registered_it() {
    let server = TestServer::start(&[]);
    let mut mallory = Agent::connect(&server.ws_url()).await;
    let preclaimed = claim(&mut mallory, "bob").await;
    let certificate = preclaimed["certificate"].clone();
    assert!(certificate.is_object(), "{preclaimed}");
    let (mut bob, _) = Agent::register(&server.ws_url(), "bob").await;
    let takeover = mallory
        .request(
            json!({"type":"system_request","command":"register_agent","agent_id":"bob",
                        "metadata":{}, "certificate": certificate}),
        )
        .await;
    assert_eq!(takeover["error_code"], "invalid_certificate", "{takeover}");
    let pong = bob
        .request(json!({"type":"system_request","command":"ping_agent"}))
        .await;
    assert_eq!(pong["success"], true, "bob still holds its id: {pong}");
}

/// Fails if the server logged a panic.
fn assert_no_panic(server: &TestServer) {
    let logs = server.logs();
    assert!(!logs.contains("panicked"), "the server panicked:\n{logs}");
}

/// A `/proc/PID/status` field of the server, in KiB.
fn status_kib(server: &TestServer, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc status"))
}

#[tokio::test]
async fn list_agents_requests_that_are_never_read_cannot_make_the_server_buffer_them() {
    // Finding 1 of issue 10: 300 agents with 16 KiB of metadata each, one agent sends
    // 130 list_agents and never reads: the server held 630 MiB.
    let server = TestServer::start(&[("TETHER__NETWORK__MAX_CONNECTIONS", "1000")]);
    let mut events = common::EventStream::subscribe(&server, None).await;
    let padding = "x".repeat(16 * 1024 - 100);
    let mut fleet = Vec::new();
    for i in 0..300 {
        let mut agent = Agent::connect(&server.ws_url()).await;
        let answer = agent
            .request(json!({"type":"system_request","command":"register_agent",
                            "agent_id": format!("big-{i}"), "metadata": {"pad": padding}}))
            .await;
        assert_eq!(answer["success"], true, "{answer}");
        fleet.push(agent);
    }
    // A page is bounded: the default page has 100 agents and says there is more.
    let page = fleet[0]
        .request(json!({"type":"system_request","command":"list_agents"}))
        .await;
    assert_eq!(
        page["agents"].as_array().map(Vec::len),
        Some(100),
        "page size"
    );
    assert_eq!(page["has_more"], true);
    let next = fleet[0]
        .request(
            json!({"type":"system_request","command":"list_agents","limit": 1000,
                        "cursor": page["next_cursor"]}),
        )
        .await;
    assert_eq!(next["agents"].as_array().map(Vec::len), Some(200));
    assert_eq!(next["has_more"], false);

    let before = status_kib(&server, "VmRSS:");
    let mut attacker = Agent::connect_with_receive_buffer(&server.ws_url(), 4096).await;
    let answer = attacker
        .request(json!({"type":"system_request","command":"register_agent",
                        "agent_id": "attacker", "metadata": {}}))
        .await;
    assert_eq!(answer["success"], true, "{answer}");
    // 40 default pages of 1.6 MB: 64 MB if the server kept them (fewer than the
    // finding's 130 pages of 4.8 MB, so that the debug build answers them quickly).
    for _ in 0..40 {
        attacker
            .send(json!({"type":"system_request","command":"list_agents"}))
            .await;
    }
    let end = events
        .wait_for(|e| e["type"] == "agent.disconnected" && e["data"]["agent_id"] == "attacker")
        .await;
    assert_eq!(end["data"]["reason"], "slow_consumer", "{end}");
    assert_eq!(end["data"]["close_code"], 4003, "{end}");
    let peak = status_kib(&server, "VmHWM:");
    let grown_mib = peak.saturating_sub(before) / 1024;
    assert!(grown_mib < 32, "the server's peak RSS grew {grown_mib} MiB");
    // A bystander still gets its direct messages.
    let (a, b) = fleet.split_at_mut(1);
    a[0].send(direct("big-1", json!("still here"))).await;
    let got = b[0].wait_for(|f| f["type"] == "message").await;
    assert_eq!(got["data"]["content"], "still here");
    assert_no_panic(&server);
}

#[tokio::test]
async fn a_request_flood_is_answered_rate_limited_then_closed_1008() {
    let env = [
        ("TETHER__LIMITS__MAX_REQUESTS_PER_SECOND", "1"),
        ("TETHER__LIMITS__REQUEST_BURST", "3"),
    ];
    let server = TestServer::start(&env);
    let (mut bystander, _) = Agent::register(&server.ws_url(), "bystander").await;
    let mut flooder = Agent::connect(&server.ws_url()).await;
    for i in 0..50 {
        flooder
            .send(json!({"type":"system_request","command":"ping_agent","request_id": i}))
            .await;
    }
    let (frames, closed) = flooder.frames_until_closed().await;
    assert_eq!(closed, Closed::Code(1008));
    let (mut answered, mut limited) = (0, 0);
    for frame in &frames {
        match frame["success"].as_bool() {
            Some(true) => answered += 1,
            _ => {
                assert_eq!(frame["error_code"], "rate_limited", "{frame}");
                limited += 1;
            }
        }
    }
    assert!((3..50).contains(&answered), "answered {answered}");
    assert!(limited >= 1, "limited {limited}");
    // The bystander's own requests are not limited by the flooder's.
    let pong = bystander
        .request(json!({"type":"system_request","command":"ping_agent"}))
        .await;
    assert_eq!(pong["success"], true, "{pong}");
    assert_no_panic(&server);
}

#[tokio::test]
async fn list_agents_pages_cost_the_request_budget_by_their_size() {
    let env = [
        ("TETHER__LIMITS__MAX_REQUESTS_PER_SECOND", "1"),
        ("TETHER__LIMITS__REQUEST_BURST", "30"),
    ];
    let server = TestServer::start(&env);
    // Registering costs 1 of the burst of 30; a page of 100 costs 11.
    let (mut lister, _) = Agent::register(&server.ws_url(), "lister").await;
    let page = json!({"type":"system_request","command":"list_agents","limit":100});
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(lister.request(page.clone()).await);
    }
    assert_eq!(answers[0]["success"], true, "{}", answers[0]);
    assert_eq!(answers[1]["success"], true, "{}", answers[1]);
    assert_eq!(answers[2]["error_code"], "rate_limited", "{}", answers[2]);
    // What is left of the budget still serves cheap requests.
    let pong = lister
        .request(json!({"type":"system_request","command":"ping_agent"}))
        .await;
    assert_eq!(pong["success"], true, "{pong}");
    // A page dearer than the whole burst is still possible once the budget refilled.
    let server = TestServer::start(&env);
    let (mut lister, _) = Agent::register(&server.ws_url(), "lister").await;
    let big = json!({"type":"system_request","command":"list_agents","limit":1000});
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let answer = lister.request(big.clone()).await;
        if answer["success"] == true {
            break;
        }
        assert_eq!(answer["error_code"], "rate_limited", "{answer}");
        assert!(
            std::time::Instant::now() < deadline,
            "never answered: {answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_no_panic(&server);
}

#[tokio::test]
async fn deeply_nested_json_and_megabyte_ids_get_clear_errors_and_hurt_nobody() {
    let server = TestServer::start(&[]);
    let (mut peer, _) = Agent::register(&server.ws_url(), "peer").await;
    let (mut good, _) = Agent::register(&server.ws_url(), "good").await;
    let mut hostile = Agent::connect(&server.ws_url()).await;
    let before = status_kib(&server, "VmRSS:");

    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let answer = hostile
        .request(json!({"type":"system_request","command":"ping_agent","timestamp": 1}))
        .await;
    assert_eq!(answer["success"], true);
    hostile.send_raw(Message::text(deep)).await;
    let error = hostile.wait_for(|f| f["type"] == "error").await;
    assert_eq!(error["error_code"], "invalid_frame", "{error}");
    let nested_data = format!(
        r#"{{"type":"message","data":{{"message_type":"broadcast_message","x":{}1{}}}}}"#,
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    hostile.send_raw(Message::text(nested_data)).await;
    let error = hostile.wait_for(|f| f["type"] == "error").await;
    assert_eq!(error["error_code"], "invalid_frame", "{error}");

    let huge_id = "a".repeat(1_000_000);
    let refused = hostile
        .request(json!({"type":"system_request","command":"register_agent","agent_id": huge_id}))
        .await;
    assert_eq!(refused["error_code"], "invalid_agent_id", "{refused}");

    peer.send(direct("good", json!("unaffected"))).await;
    let got = good.wait_for(|f| f["type"] == "message").await;
    assert_eq!(got["data"]["content"], "unaffected");
    let grown_mib = status_kib(&server, "VmHWM:").saturating_sub(before) / 1024;
    assert!(grown_mib < 16, "the server's peak RSS grew {grown_mib} MiB");
    assert_no_panic(&server);
}

#[tokio::test]
async fn a_handshake_without_a_key_is_refused_400_and_an_old_version_426() {
    let server = TestServer::start(&[]);
    for (request, status) in [
        ("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n", "400"),
        // RFC 6455 §4.4: an unsupported version is answered 426 Upgrade Required.
        ("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n", "426"),
    ] {
        let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 12];
        tokio::time::timeout(DEADLINE, tcp.read_exact(&mut head))
            .await
            .expect("no answer")
            .unwrap();
        let head = String::from_utf8_lossy(&head);
        assert_eq!(head, format!("HTTP/1.1 {status}"), "{request:?}");
    }
    // The server still upgrades a correct handshake.
    let (_agent, _) = Agent::register(&server.ws_url(), "after-bad-handshakes").await;
}

#[tokio::test]
async fn admin_routes_stay_closed_to_path_tricks_without_the_token() {
    let server = TestServer::start(&[("TETHER__ADMIN__TOKEN", "the-admin-token")]);
    let client = reqwest::Client::new();
    for path in [
        "/stats",
        "/stats/",
        "//stats",
        "/./stats",
        "/health/../stats",
        "/%73tats",
        "/agents/%2e%2e/stats",
        "/events",
        "/agents?x=/health",
    ] {
        let response = client.get(server.http(path)).send().await.unwrap();
        let status = response.status().as_u16();
        assert!(
            status == 401 || status == 404,
            "{path} answered {status} without the token"
        );
    }
    let open = client
        .get(server.http("/stats"))
        .bearer_auth("the-admin-token")
        .send()
        .await
        .unwrap();
    assert_eq!(open.status().as_u16(), 200);
}

#[tokio::test]
async fn a_request_head_dribbled_byte_by_byte_is_cut_off() {
    let server = TestServer::start(&[]);
    let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
    let started = std::time::Instant::now();
    let head =
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Slow: ";
    let mut cut_off = false;
    for byte in head.iter().chain(std::iter::repeat(&b'a')) {
        if tcp.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        // The attack itself: one byte every 100 ms, never finishing the head.
        let mut probe = [0u8; 64];
        match tokio::time::timeout(std::time::Duration::from_millis(100), tcp.read(&mut probe))
            .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut_off = true;
                break;
            }
            Ok(Ok(_)) => {} // An error response: the end of stream follows.
            Err(_) => {}
        }
        assert!(
            started.elapsed() < DEADLINE,
            "a dribbling client was never cut off"
        );
    }
    assert!(cut_off);
    // actix-http's client_request_timeout (5 s) ends it, not the deadline.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn control_pings_from_a_client_that_never_reads_end_it_with_memory_bounded() {
    // A short heartbeat: a client that never reads never answers its pings either.
    let server = TestServer::start(&[("TETHER__HEARTBEAT__INTERVAL", "1")]);
    let mut events = common::EventStream::subscribe(&server, None).await;
    let mut flooder = Agent::connect_with_receive_buffer(&server.ws_url(), 4096).await;
    let answer = flooder
        .request(json!({"type":"system_request","command":"register_agent",
                        "agent_id": "pinger", "metadata": {}}))
        .await;
    assert_eq!(answer["success"], true, "{answer}");
    let before = status_kib(&server, "VmRSS:");
    let payload = vec![b'p'; 125];
    for _ in 0..20_000 {
        if flooder
            .raw()
            .send(Message::Ping(payload.clone().into()))
            .await
            .is_err()
        {
            break; // Closed by the server.
        }
    }
    let end = events
        .wait_for(|e| e["type"] == "agent.disconnected" && e["data"]["agent_id"] == "pinger")
        .await;
    // Pongs go to the kernel's send buffer first (up to tcp_wmem, a few MiB on
    // loopback): past it the queue makes a slow consumer (4003); within it the
    // unanswered heartbeat makes the agent stale (4002). Either way it ends.
    let code = end["data"]["close_code"].as_u64();
    assert!(matches!(code, Some(4002 | 4003)), "{end}");
    let grown_mib = status_kib(&server, "VmHWM:").saturating_sub(before) / 1024;
    assert!(grown_mib < 16, "the server's peak RSS grew {grown_mib} MiB");
    assert_no_panic(&server);
}

#[tokio::test]
async fn incarnations_only_grow_though_the_ids_that_left_are_forgotten() {
    // Finding 6 of issue 10: a counter per id ever seen was kept forever.
    let server = TestServer::start(&[("TETHER__LIMITS__REMEMBERED_AGENT_IDS", "5")]);
    let mut events = common::EventStream::subscribe(&server, None).await;
    let mut last = 0;
    for _ in 0..2 {
        let (agent, welcome) = Agent::register(&server.ws_url(), "returning").await;
        let incarnation = welcome["incarnation"].as_u64().unwrap();
        assert!(incarnation > last, "{welcome}");
        last = incarnation;
        agent.close().await;
        events
            .wait_for(|e| e["type"] == "agent.cleaned_up" && e["subject"] == "returning")
            .await;
    }
    assert_eq!(
        last, 2,
        "incarnations count from 1 while nothing is forgotten"
    );
    for i in 0..40 {
        let id = format!("passer-{i}");
        let (agent, _) = Agent::register(&server.ws_url(), &id).await;
        agent.close().await;
        events
            .wait_for(|e| e["type"] == "agent.cleaned_up" && e["subject"] == id.as_str())
            .await;
    }
    let stats = server.get_json("/stats").await;
    assert_eq!(
        stats["connections"]["remembered_agent_ids"], 5,
        "memory for ids that left is bounded: {stats}"
    );
    // "returning" was forgotten; its next incarnation is still above its last.
    let (_agent, welcome) = Agent::register(&server.ws_url(), "returning").await;
    let incarnation = welcome["incarnation"].as_u64().unwrap();
    assert!(incarnation > last, "incarnation {incarnation} after {last}");
}

#[tokio::test]
async fn registration_metadata_is_bounded_server_wide() {
    let env = [
        ("TETHER__LIMITS__MAX_METADATA_BYTES", "4096"),
        ("TETHER__LIMITS__MAX_METADATA_BYTES_TOTAL", "10000"),
    ];
    let server = TestServer::start(&env);
    let padding = "m".repeat(3000);
    let mut fleet = Vec::new();
    for i in 0..3 {
        let mut agent = Agent::connect(&server.ws_url()).await;
        let answer = agent
            .request(json!({"type":"system_request","command":"register_agent",
                            "agent_id": format!("meta-{i}"), "metadata": {"pad": padding}}))
            .await;
        assert_eq!(answer["success"], true, "{answer}");
        fleet.push(agent);
    }
    let mut fourth = Agent::connect(&server.ws_url()).await;
    let refused = fourth
        .request(json!({"type":"system_request","command":"register_agent",
                        "agent_id": "meta-3", "metadata": {"pad": padding}}))
        .await;
    assert_eq!(refused["error_code"], "server_full", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("limits.max_metadata_bytes_total")),
        "{refused}"
    );
    let stats = server.get_json("/stats").await;
    let held = stats["connections"]["metadata_bytes"].as_u64().unwrap();
    assert!((9000..=10_000).contains(&held), "{stats}");
    // Small metadata still fits, and a departure frees its share.
    let (_small, _) = Agent::register(&server.ws_url(), "small").await;
    fleet.pop().unwrap().close().await;
    let mut again = Agent::connect(&server.ws_url()).await;
    let answer = again
        .request(json!({"type":"system_request","command":"register_agent",
                        "agent_id": "meta-3", "metadata": {"pad": padding}}))
        .await;
    assert_eq!(answer["success"], true, "{answer}");
}

#[tokio::test]
async fn a_flood_of_tiny_fragments_costs_only_the_message_it_spells() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let server = TestServer::start(&[]);
    let (mut good, _) = Agent::register(&server.ws_url(), "good").await;
    let (mut flooder, _) = Agent::register(&server.ws_url(), "flooder").await;
    let before = status_kib(&server, "VmRSS:");
    let text = direct("good", json!("f".repeat(20_000))).to_string();
    let bytes = text.as_bytes();
    let frames = bytes.len() * 6; // one byte, then five empty continuations
    let sink = flooder.raw();
    for (i, byte) in bytes.iter().enumerate() {
        let opcode = if i == 0 { Data::Text } else { Data::Continue };
        let fin = i == bytes.len() - 1;
        for _ in 0..5 {
            if i > 0 {
                let empty = Frame::message(Vec::new(), OpCode::Data(Data::Continue), false);
                sink.feed(Message::Frame(empty)).await.unwrap();
            }
        }
        let frame = Frame::message(vec![*byte], OpCode::Data(opcode), fin);
        sink.feed(Message::Frame(frame)).await.unwrap();
        if i % 1000 == 0 {
            sink.flush().await.unwrap();
        }
    }
    sink.flush().await.unwrap();
    let got = good.wait_for(|f| f["type"] == "message").await;
    assert_eq!(
        got["data"]["content"].as_str().map(str::len),
        Some(20_000),
        "the message of {frames} fragments arrived whole"
    );
    let grown_mib = status_kib(&server, "VmHWM:").saturating_sub(before) / 1024;
    assert!(grown_mib < 8, "the server's peak RSS grew {grown_mib} MiB");
    // The flooder is still connected and served.
    let pong = flooder
        .request(json!({"type":"system_request","command":"ping_agent"}))
        .await;
    assert_eq!(pong["success"], true, "{pong}");
    assert_no_panic(&server);
}

#[tokio::test]
async fn no_log_line_carries_a_secret_a_token_or_a_broker_password() {
    let env = [
        ("RUST_LOG", "debug"),
        ("TETHER__IDENTITY__SECRET", "hunter2-secret"),
        ("TETHER__ADMIN__TOKEN", "hunter2-token"),
        ("TETHER__EVENTS__PUBLISHERS", "log,redis"),
        // Nothing listens on port 1: the publisher logs its failed connections.
        (
            "TETHER__EVENTS__REDIS__URL",
            "redis://:hunter2-redis@127.0.0.1:1/",
        ),
        ("TETHER__EVENTS__REDIS__RETRY_INITIAL", "0.05"),
        ("TETHER__EVENTS__REDIS__RETRY_MAX", "0.2"),
    ];
    let server = TestServer::start(&env);
    let http = common::http();
    for token in ["hunter2-token", "hunter2-wrong"] {
        let status = http
            .get(server.http("/stats"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status.as_u16() == 200, token == "hunter2-token");
    }
    let (mut agent, _) = Agent::register(&server.ws_url(), "logged").await;
    let claimed = claim(&mut agent, "logged").await;
    assert_eq!(claimed["success"], true, "{claimed}");
    let hash = claimed["certificate"]["certificate_hash"]
        .as_str()
        .expect("a certificate hash")
        .to_owned();
    agent.close().await;
    // Wait until the publisher has failed to connect at least twice (it logs each).
    let deadline = std::time::Instant::now() + DEADLINE;
    while server.logs().matches("redis").count() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", server.logs());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let logs = server.logs();
    assert!(
        !logs.contains("hunter2"),
        "a secret reached the log:\n{logs}"
    );
    assert!(
        !logs.contains(&hash),
        "a certificate reached the log:\n{logs}"
    );
}
