//! Takeover helpers shared by the single-node and the cluster takeover tests: claiming
//! a certificate, registering with extra fields, and the replaced connection's end.

use super::{agent_events, Agent, Closed};
use serde_json::{json, Value};

/// Claims `agent_id` on `agent`'s socket and returns the whole response.
pub async fn claim(agent: &mut Agent, agent_id: &str, force: bool) -> Value {
    agent
        .request(json!({"type":"system_request","command":"claim_agent_id",
                        "agent_id": agent_id, "force": force}))
        .await
}

/// Claims `agent_id` and returns its certificate; panics unless the claim succeeds.
pub async fn certificate(agent: &mut Agent, agent_id: &str, force: bool) -> Value {
    let response = claim(agent, agent_id, force).await;
    assert_eq!(
        response["success"], true,
        "claim of {agent_id} failed: {response}"
    );
    assert_eq!(response["agent_id"], agent_id);
    let certificate = response["certificate"].clone();
    assert_eq!(certificate["agent_id"], agent_id, "{certificate}");
    certificate
}

/// Sends `register_agent` for `agent_id` with extra fields and returns the response.
pub async fn register_with(agent: &mut Agent, agent_id: &str, extra: Value) -> Value {
    let mut frame = json!({"type":"system_request","command":"register_agent",
                           "agent_id": agent_id, "metadata": {"name": agent_id}});
    frame
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    agent.request(frame).await
}

/// The old socket gets `connection_replaced` for its id, then close 4001.
pub async fn assert_replaced(old: &mut Agent, agent_id: &str) {
    let notice = old.wait_for(|f| f["type"] == "system_notification").await;
    assert_eq!(notice["event"], "connection_replaced", "{notice}");
    assert_eq!(notice["agent_id"], agent_id, "{notice}");
    assert!(notice["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(old.closed().await, Closed::Code(4001));
}

/// The old incarnation's end and the new one's start, exactly, in order.
pub fn assert_takeover_events(events: &[Value], agent_id: &str, proof: &str, new_session: &str) {
    assert_eq!(
        agent_events(events, agent_id),
        vec![
            ("agent.registered".into(), 1, 1),
            ("agent.replaced".into(), 1, 2),
            ("agent.disconnected".into(), 1, 3),
            ("agent.cleaned_up".into(), 1, 4),
            ("agent.registered".into(), 2, 1),
        ],
        "lifecycle events of {agent_id}"
    );
    let find = |kind: &str| {
        events
            .iter()
            .find(|e| e["type"] == kind && e["subject"] == agent_id)
            .unwrap()
    };
    let replaced = find("agent.replaced");
    assert_eq!(replaced["data"]["by_incarnation"], 2, "{replaced}");
    assert_eq!(replaced["data"]["by_session_id"], new_session, "{replaced}");
    assert_eq!(replaced["data"]["proof"], proof, "{replaced}");
    let disconnected = find("agent.disconnected");
    assert_eq!(disconnected["data"]["reason"], "replaced", "{disconnected}");
    assert_eq!(disconnected["data"]["close_code"], 4001, "{disconnected}");
    let registered = events
        .iter()
        .find(|e| {
            e["type"] == "agent.registered"
                && e["subject"] == agent_id
                && e["data"]["incarnation"] == 2
        })
        .unwrap();
    assert_eq!(registered["data"]["takeover"], proof, "{registered}");
    assert_eq!(
        registered["data"]["session_id"], new_session,
        "{registered}"
    );
}
