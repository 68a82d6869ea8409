//! Takeover of a live agent id (PROTOCOL.md §2 "Takeover") and identity certificates
//! (§3): force_reconnect, certificates, and the certificates that must be refused.

mod common;

use common::takeover::{
    assert_replaced, assert_takeover_events, certificate, claim, register_with,
};
use common::{Agent, EventStream, TestServer};
use serde_json::{json, Value};
use std::time::Duration;

async fn validate(agent: &mut Agent, certificate: &Value) -> Value {
    agent
        .request(
            json!({"type":"system_request","command":"validate_certificate",
                        "certificate": certificate}),
        )
        .await
}

#[tokio::test]
async fn force_reconnect_takes_over_a_live_id_and_ends_the_old_incarnation_first() {
    let server = TestServer::start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let (mut old, first) = Agent::register(&server.ws_url(), "alice").await;
    assert_eq!(first["incarnation"], 1);

    let mut new = Agent::connect(&server.ws_url()).await;
    let response = register_with(&mut new, "alice", json!({"force_reconnect": true})).await;
    assert_eq!(response["success"], true, "{response}");
    assert_eq!(response["incarnation"], 2);
    assert_ne!(response["session_id"], first["session_id"]);

    assert_replaced(&mut old, "alice").await;
    let all = events
        .collect_until(|e| e["type"] == "agent.registered" && e["data"]["incarnation"] == 2)
        .await;
    assert_takeover_events(
        &all,
        "alice",
        "force_reconnect",
        response["session_id"].as_str().unwrap(),
    );

    // The new connection is the agent now.
    let listed = new
        .request(json!({"type":"system_request","command":"list_agents"}))
        .await;
    assert_eq!(listed["agents"].as_array().unwrap().len(), 1, "{listed}");
}

#[tokio::test]
async fn a_valid_certificate_takes_over_a_live_id() {
    let server = TestServer::start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let mut old = Agent::connect(&server.ws_url()).await;
    let cert = certificate(&mut old, "alice", false).await;
    let first = register_with(&mut old, "alice", json!({"certificate": cert})).await;
    assert_eq!(first["success"], true, "{first}");

    // A second connection presenting the same certificate (as a restarted agent would).
    let mut new = Agent::connect(&server.ws_url()).await;
    let response = register_with(&mut new, "alice", json!({"certificate": cert})).await;
    assert_eq!(response["success"], true, "{response}");
    assert_eq!(response["incarnation"], 2);

    assert_replaced(&mut old, "alice").await;
    let all = events
        .collect_until(|e| e["type"] == "agent.registered" && e["data"]["incarnation"] == 2)
        .await;
    assert_takeover_events(
        &all,
        "alice",
        "certificate",
        response["session_id"].as_str().unwrap(),
    );
}

#[tokio::test]
async fn validate_certificate_accepts_an_issued_certificate() {
    let server = TestServer::start(&[]);
    let mut agent = Agent::connect(&server.ws_url()).await;
    let cert = certificate(&mut agent, "alice", false).await;
    for field in ["issued_at", "expires_at"] {
        assert!(cert[field].is_number(), "{field} in {cert}");
    }
    assert!(cert["expires_at"].as_f64() > cert["issued_at"].as_f64());
    for field in ["certificate_hash", "signature"] {
        let hex = cert[field].as_str().unwrap_or_default();
        assert!(
            !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()),
            "{field} in {cert}"
        );
    }
    let answer = validate(&mut agent, &cert).await;
    assert_eq!(answer["success"], true, "{answer}");
    assert_eq!(answer["valid"], true, "{answer}");
    assert_eq!(answer["agent_id"], "alice", "{answer}");
}

/// Copies of a genuine certificate with one part tampered with.
fn forgeries(cert: &Value) -> Vec<(&'static str, Value)> {
    let mut flipped_signature = cert.clone();
    let signature = cert["signature"].as_str().unwrap();
    let first = if signature.starts_with('0') { "1" } else { "0" };
    flipped_signature["signature"] = json!(format!("{first}{}", &signature[1..]));
    let mut extended = cert.clone();
    extended["expires_at"] = json!(cert["expires_at"].as_f64().unwrap() + 86400.0 * 365.0);
    let mut renamed = cert.clone();
    renamed["agent_id"] = json!("mallory");
    let mut rehashed = cert.clone();
    rehashed["certificate_hash"] = json!("0".repeat(64));
    vec![
        ("signature flipped", flipped_signature),
        ("expiry extended", extended),
        ("agent id changed", renamed),
        ("hash replaced", rehashed),
        (
            "made up",
            json!({"agent_id":"alice","issued_at":1.0,"expires_at":9999999999.0,
                   "certificate_hash":"ab".repeat(32),"signature":"cd".repeat(32)}),
        ),
        ("not an object", json!("alice")),
    ]
}

#[tokio::test]
async fn forged_certificates_are_rejected_and_the_holder_keeps_its_id() {
    let server = TestServer::start(&[]);
    let (mut holder, _) = Agent::register(&server.ws_url(), "alice").await;
    let genuine = certificate(&mut holder, "alice", false).await;
    let mut attacker = Agent::connect(&server.ws_url()).await;
    for (what, forged) in forgeries(&genuine) {
        let answer = validate(&mut attacker, &forged).await;
        assert_eq!(answer["valid"], false, "{what}: {answer}");
        let response = register_with(&mut attacker, "alice", json!({"certificate": forged})).await;
        assert_eq!(response["success"], false, "{what}: {response}");
        assert_eq!(
            response["error_code"], "invalid_certificate",
            "{what}: {response}"
        );
        // Even with force_reconnect, a rejected certificate is a rejected registration.
        let forced = register_with(
            &mut attacker,
            "alice",
            json!({"certificate": forged, "force_reconnect": true}),
        )
        .await;
        assert_eq!(
            forced["error_code"], "invalid_certificate",
            "{what}: {forced}"
        );
    }
    still_holds(&server, &mut holder, "alice", 1).await;
}

#[tokio::test]
async fn another_agents_certificate_is_rejected() {
    let server = TestServer::start(&[]);
    let (mut holder, _) = Agent::register(&server.ws_url(), "alice").await;
    let mut attacker = Agent::connect(&server.ws_url()).await;
    let bobs = certificate(&mut attacker, "bob", false).await;
    let answer = validate(&mut attacker, &bobs).await;
    assert_eq!(
        answer["valid"], true,
        "bob's certificate is genuine: {answer}"
    );
    assert_eq!(answer["agent_id"], "bob");
    let response = register_with(&mut attacker, "alice", json!({"certificate": bobs})).await;
    assert_eq!(response["success"], false, "{response}");
    assert_eq!(response["error_code"], "invalid_certificate", "{response}");
    still_holds(&server, &mut holder, "alice", 1).await;
    // The same socket may still register as the agent the certificate is for.
    let own = register_with(&mut attacker, "bob", json!({"certificate": bobs})).await;
    assert_eq!(own["success"], true, "{own}");
}

#[tokio::test]
async fn an_expired_certificate_is_rejected() {
    let server = TestServer::start(&[("TETHER__IDENTITY__CERTIFICATE_TTL", "0.3")]);
    let (mut holder, _) = Agent::register(&server.ws_url(), "alice").await;
    let mut attacker = Agent::connect(&server.ws_url()).await;
    // The holder's own certificate, which the attacker got hold of.
    let cert = certificate(&mut holder, "alice", false).await;
    // Poll the server until it considers the certificate expired.
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let answer = validate(&mut attacker, &cert).await;
        assert_eq!(answer["success"], true, "{answer}");
        if answer["valid"] == false {
            let error = answer["error"].as_str().unwrap_or_default().to_lowercase();
            assert!(error.contains("expired"), "{answer}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the certificate never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
    let response = register_with(&mut attacker, "alice", json!({"certificate": cert})).await;
    assert_eq!(response["success"], false, "{response}");
    assert_eq!(response["error_code"], "invalid_certificate", "{response}");
    still_holds(&server, &mut holder, "alice", 1).await;
    // An expired claim no longer blocks a new claim (by the holder: the id is live).
    let again = claim(&mut holder, "alice", false).await;
    assert_eq!(again["success"], true, "{again}");
}

#[tokio::test]
async fn a_certificate_revoked_by_a_forced_claim_is_rejected() {
    let server = TestServer::start(&[]);
    let mut first_claimer = Agent::connect(&server.ws_url()).await;
    let old_cert = certificate(&mut first_claimer, "alice", false).await;

    let mut second_claimer = Agent::connect(&server.ws_url()).await;
    let refused = claim(&mut second_claimer, "alice", false).await;
    assert_eq!(refused["success"], false, "{refused}");
    assert_eq!(refused["error_code"], "already_claimed", "{refused}");
    assert_eq!(
        refused["error"], "Agent ID alice is already claimed",
        "{refused}"
    );
    let new_cert = certificate(&mut second_claimer, "alice", true).await;
    assert_ne!(new_cert["certificate_hash"], old_cert["certificate_hash"]);

    let revoked = validate(&mut first_claimer, &old_cert).await;
    assert_eq!(revoked["valid"], false, "{revoked}");
    let (mut holder, _) = Agent::register(&server.ws_url(), "alice").await;
    let response = register_with(
        &mut first_claimer,
        "alice",
        json!({"certificate": old_cert}),
    )
    .await;
    assert_eq!(response["error_code"], "invalid_certificate", "{response}");
    still_holds(&server, &mut holder, "alice", 1).await;

    // Nor does the newer one: the holder registered the free id without it, which
    // voids certificates claimed by others while it holds the id (no pre-claiming).
    let takeover = register_with(
        &mut second_claimer,
        "alice",
        json!({"certificate": new_cert}),
    )
    .await;
    assert_eq!(takeover["error_code"], "invalid_certificate", "{takeover}");
    still_holds(&server, &mut holder, "alice", 1).await;
}

#[tokio::test]
async fn force_reconnect_is_refused_when_the_network_disallows_it() {
    let server = TestServer::start(&[("TETHER__IDENTITY__ALLOW_FORCE_RECONNECT", "false")]);
    let (mut holder, _) = Agent::register(&server.ws_url(), "alice").await;
    let mut other = Agent::connect(&server.ws_url()).await;
    let response = register_with(&mut other, "alice", json!({"force_reconnect": true})).await;
    assert_eq!(response["success"], false, "{response}");
    assert_eq!(response["error_code"], "agent_id_in_use", "{response}");
    still_holds(&server, &mut holder, "alice", 1).await;
    // Nor can another socket claim the live id to get a certificate (forced or not):
    // there is no path from a fresh socket to a live agent's id.
    for force in [false, true] {
        let claimed = claim(&mut other, "alice", force).await;
        assert_eq!(claimed["success"], false, "{claimed}");
        assert_eq!(claimed["error_code"], "agent_id_in_use", "{claimed}");
        let response = register_with(&mut other, "alice", json!({"force_reconnect": true})).await;
        assert_eq!(response["error_code"], "agent_id_in_use", "{response}");
    }
    still_holds(&server, &mut holder, "alice", 1).await;
}

#[tokio::test]
async fn only_the_holders_connection_may_claim_a_live_id_and_its_certificate_takes_it_back() {
    let server = TestServer::start(&[]);
    let (mut holder, _) = Agent::register(&server.ws_url(), "alice").await;
    let mut stranger = Agent::connect(&server.ws_url()).await;
    for force in [false, true] {
        let refused = claim(&mut stranger, "alice", force).await;
        assert_eq!(refused["error_code"], "agent_id_in_use", "{refused}");
    }
    // The holder asks for its own certificate, and a later connection of the same
    // agent (after a half-open connection, say) takes the id back with it.
    let cert = certificate(&mut holder, "alice", false).await;
    let mut again = Agent::connect(&server.ws_url()).await;
    let takeover = register_with(&mut again, "alice", json!({"certificate": cert})).await;
    assert_eq!(takeover["success"], true, "{takeover}");
    assert_eq!(takeover["incarnation"], 2);
    assert_replaced(&mut holder, "alice").await;
}

#[tokio::test]
async fn the_holder_renews_its_own_certificate_without_force_and_beyond_the_claim_limit() {
    let server = TestServer::start(&[
        ("TETHER__IDENTITY__ALLOW_FORCE_RECONNECT", "false"),
        ("TETHER__LIMITS__MAX_CLAIMS_PER_CONNECTION", "2"),
    ]);
    let mut holder = Agent::connect(&server.ws_url()).await;
    let first = certificate(&mut holder, "alice", false).await;
    let registered = register_with(&mut holder, "alice", json!({"certificate": first})).await;
    assert_eq!(registered["success"], true, "{registered}");
    // Five renewals on a connection allowed two claims, none of them forced.
    let mut previous = first.clone();
    for _ in 0..5 {
        let renewed = certificate(&mut holder, "alice", false).await;
        assert_ne!(renewed["certificate_hash"], previous["certificate_hash"]);
        let revoked = validate(&mut holder, &previous).await;
        assert_eq!(
            revoked["valid"], false,
            "a renewal revokes what it replaces: {revoked}"
        );
        previous = renewed;
    }
    // Claims of other ids still count (1 so far: the claim before registering).
    let other = claim(&mut holder, "bob", false).await;
    assert_eq!(other["success"], true, "{other}");
    let refused = claim(&mut holder, "carol", false).await;
    assert_eq!(refused["error_code"], "too_many_claims", "{refused}");
    // The last renewal takes the id back after a half-open connection.
    let mut again = Agent::connect(&server.ws_url()).await;
    let takeover = register_with(&mut again, "alice", json!({"certificate": previous})).await;
    assert_eq!(takeover["success"], true, "{takeover}");
    assert_eq!(takeover["incarnation"], 2);
    assert_replaced(&mut holder, "alice").await;
}

#[tokio::test]
async fn with_forcing_disallowed_a_forced_claim_does_not_revoke_an_outstanding_certificate() {
    let server = TestServer::start(&[("TETHER__IDENTITY__ALLOW_FORCE_RECONNECT", "false")]);
    let mut owner = Agent::connect(&server.ws_url()).await;
    let cert = certificate(&mut owner, "alice", false).await;
    let mut stranger = Agent::connect(&server.ws_url()).await;
    let refused = claim(&mut stranger, "alice", true).await;
    assert_eq!(refused["error_code"], "already_claimed", "{refused}");
    let still = validate(&mut owner, &cert).await;
    assert_eq!(still["valid"], true, "{still}");
}

#[tokio::test]
async fn certificates_survive_a_restart_when_the_secret_is_configured() {
    let secret = [("TETHER__IDENTITY__SECRET", "a-configured-test-secret")];
    let cert = {
        let server = TestServer::start(&secret);
        let mut agent = Agent::connect(&server.ws_url()).await;
        certificate(&mut agent, "alice", false).await
    }; // The first server process is killed here.

    let server = TestServer::start(&secret);
    let mut agent = Agent::connect(&server.ws_url()).await;
    let answer = validate(&mut agent, &cert).await;
    assert_eq!(answer["valid"], true, "{answer}");
    assert_eq!(answer["agent_id"], "alice");
    // The agent registers with it after the restart, and a later connection of the
    // same agent (half-open recovery) takes the id back with it.
    let first = register_with(&mut agent, "alice", json!({"certificate": cert})).await;
    assert_eq!(first["success"], true, "{first}");
    let mut again = Agent::connect(&server.ws_url()).await;
    let takeover = register_with(&mut again, "alice", json!({"certificate": cert})).await;
    assert_eq!(takeover["success"], true, "{takeover}");
    assert_replaced(&mut agent, "alice").await;

    // A server with another secret does not accept it.
    let other = TestServer::start(&[("TETHER__IDENTITY__SECRET", "another-secret")]);
    let mut agent = Agent::connect(&other.ws_url()).await;
    let answer = validate(&mut agent, &cert).await;
    assert_eq!(answer["valid"], false, "{answer}");
    let response = register_with(&mut agent, "alice", json!({"certificate": cert})).await;
    assert_eq!(response["error_code"], "invalid_certificate", "{response}");
}

/// Checks over the socket and the admin API that `holder` still holds `agent_id` in
/// incarnation `incarnation`, and that it was told nothing about a takeover.
async fn still_holds(server: &TestServer, holder: &mut Agent, agent_id: &str, incarnation: u64) {
    let listed = holder
        .request(json!({"type":"system_request","command":"list_agents"}))
        .await;
    assert_eq!(
        listed["success"], true,
        "the holder lost its registration: {listed}"
    );
    let info: Value = common::http()
        .get(server.http(&format!("/agents/{agent_id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["incarnation"], incarnation, "{info}");
    let ping = holder
        .request(json!({"type":"system_request","command":"ping_agent","timestamp":1.5}))
        .await;
    assert_eq!(ping["timestamp"], 1.5);
    // The request answers above came after anything sent before them: no notice.
    let notices: Vec<Value> = holder
        .pending()
        .into_iter()
        .filter(|f| f["type"] == "system_notification")
        .collect();
    assert!(notices.is_empty(), "the holder was notified: {notices:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_registration_can_be_retried_at_once() {
    // Regression: the connection learnt of the refusal only after the answer was
    // queued, so an immediate retry could get `already_registered`.
    let server = TestServer::start(&[]);
    let (_holder, _) = Agent::register(&server.ws_url(), "held").await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        let url = server.ws_url();
        clients.push(tokio::spawn(async move {
            let mut agent = Agent::connect(&url).await;
            for _ in 0..150 {
                let answer = register_with(&mut agent, "held", json!({})).await;
                assert_eq!(answer["error_code"], "agent_id_in_use", "{answer}");
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
}
