//! Takeover helpers shared by the single-node and the cluster takeover tests: claiming
//! a certificate, registering with extra fields, and the replaced connection's end.

use super::{Agent, Closed};
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
