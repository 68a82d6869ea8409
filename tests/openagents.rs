//! Compatibility with an unmodified OpenAgents 0.5.1 agent (PROTOCOL.md preamble): the
//! package's own AgentClient/NetworkConnector connects, registers, lists protocols and
//! agents, and exchanges direct messages with an agent on the Rust side.
//!
//! The Python interpreter comes from `TETHER_TEST_PYTHON`, which `scripts/test.sh`
//! exports after creating `.venv` with `pip install openagents==0.5.1 requests packaging`.

mod common;

use common::{direct, Agent, EventStream, TestServer};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/openagents/client_0_5_1.py"
);

fn python() -> String {
    match std::env::var("TETHER_TEST_PYTHON") {
        Ok(python) if !python.is_empty() => python,
        _ => panic!(
            "TETHER_TEST_PYTHON is not set. The OpenAgents compatibility test needs a Python \
             with openagents==0.5.1: run the tests with scripts/test.sh (it creates .venv with \
             `pip install openagents==0.5.1 requests packaging` and exports TETHER_TEST_PYTHON), \
             or set TETHER_TEST_PYTHON to such an interpreter yourself."
        ),
    }
}

/// A running client script: its `RESULT` lines arrive on `results`.
struct Script {
    child: tokio::process::Child,
    results: tokio::sync::mpsc::UnboundedReceiver<Value>,
    stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Script {
    fn start(server: &TestServer, agent_id: &str, peer_id: &str) -> Self {
        let (host, port) = server.addr.rsplit_once(':').unwrap();
        let mut child = Command::new(python())
            .arg(SCRIPT)
            .args([host, port, agent_id, peer_id])
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot run TETHER_TEST_PYTHON");
        let (tx, results) = tokio::sync::mpsc::unbounded_channel();
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let all = stdout.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(json) = line.strip_prefix("RESULT ") {
                    let _ = tx.send(serde_json::from_str::<Value>(json).unwrap());
                }
                all.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            results,
            stdout,
        }
    }

    /// The next `RESULT`, which must be `step`.
    async fn result(&mut self, step: &str) -> Value {
        let result = tokio::time::timeout(common::DEADLINE, self.results.recv())
            .await
            .unwrap_or_else(|_| panic!("no result `{step}` from the script"))
            .unwrap_or_else(|| panic!("the script ended before `{step}`"));
        assert_eq!(result["step"], step, "{result}");
        result
    }

    /// Waits for the script to exit; returns its exit code and stderr.
    async fn finish(mut self) -> (Option<i32>, String, String) {
        let mut stderr = String::new();
        let mut pipe = self.child.stderr.take().unwrap();
        let status = tokio::time::timeout(common::DEADLINE, async {
            pipe.read_to_string(&mut stderr).await.unwrap();
            self.child.wait().await.unwrap()
        })
        .await
        .expect("the script did not exit");
        let stdout = self.stdout.lock().unwrap().join("\n");
        (status.code(), stdout, stderr)
    }
}

fn ids(agents: &Value) -> Vec<String> {
    let mut ids: Vec<String> = agents
        .as_array()
        .unwrap_or_else(|| panic!("not a list of agents: {agents}"))
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn an_openagents_0_5_1_client_registers_lists_and_exchanges_direct_messages() {
    python(); // fails at once, with what to do, when the interpreter is not configured
    let server = TestServer::start(&[]);
    let mut events = EventStream::subscribe(&server, None).await;
    let (mut rust, _) = Agent::register(&server.ws_url(), "rust-agent").await;
    let mut script = Script::start(&server, "py-agent", "rust-agent");

    let version = script.result("version").await;
    assert_eq!(
        version["version"], "0.5.1",
        "wrong openagents in TETHER_TEST_PYTHON"
    );
    assert_eq!(script.result("connected").await["ok"], true);

    let protocols = script.result("list_protocols").await;
    assert_eq!(protocols["protocols"], json!([]));
    let agents = script.result("list_agents").await;
    assert_eq!(ids(&agents["agents"]), ["py-agent", "rust-agent"]);
    let py = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent_id"] == "py-agent")
        .unwrap();
    assert_eq!(py["name"], "Python agent");
    assert_eq!(py["connected"], true);
    assert_eq!(
        py["metadata"],
        json!({"name":"Python agent","capabilities":["chat"]})
    );
    let raw = script.result("list_protocols_raw").await["response"].clone();
    assert_eq!(raw["type"], "system_response");
    assert_eq!(raw["success"], true, "{raw}");
    assert_eq!(raw["protocols"], json!([]));
    let raw = script.result("list_agents_raw").await["response"].clone();
    assert_eq!(raw["success"], true, "{raw}");
    assert_eq!(ids(&raw["agents"]), ["py-agent", "rust-agent"]);

    // The Python agent's message, as the Rust agent receives it.
    let sent = script.result("sent").await;
    let message = rust.wait_for(|f| f["type"] == "message").await;
    let data = &message["data"];
    assert_eq!(data["message_type"], "direct_message", "{message}");
    assert_eq!(data["sender_id"], "py-agent");
    assert_eq!(data["target_agent_id"], "rust-agent");
    assert_eq!(data["content"], json!({"text":"hello from python"}));
    assert_eq!(data["message_id"], sent["message_id"]);
    // OpenAgents' own fields are forwarded unchanged.
    assert_eq!(data["text_representation"], "hello from python");
    assert_eq!(data["requires_response"], false);
    assert_eq!(data["metadata"], json!({}));
    assert!(data["timestamp"].is_u64(), "{message}");

    // The Rust agent answers; the Python client parses it into a DirectMessage.
    let mut reply = direct(
        "py-agent",
        json!({"text":"hello from rust","reply_to": data["message_id"]}),
    );
    reply["data"]["sender_id"] = json!("someone-else"); // overwritten by the server
    rust.send(reply).await;
    let received = script.result("reply").await;
    assert_eq!(received["ok"], true, "{received}");
    assert_eq!(received["sender_id"], "rust-agent");
    assert_eq!(received["target_agent_id"], "py-agent");
    assert_eq!(received["content"]["text"], "hello from rust");
    assert_eq!(received["content"]["reply_to"], data["message_id"]);
    assert!(received["timestamp"].is_u64(), "{received}");
    assert_eq!(
        received["still_connected"], true,
        "the client's listener stopped"
    );
    assert_eq!(script.result("disconnected").await["ok"], true);

    let (code, stdout, stderr) = script.finish().await;
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");

    // And its lifecycle ends cleanly on the server.
    let (all, disconnected) = common::expect_short_life(&mut events, "py-agent").await;
    assert_eq!(disconnected["data"]["reason"], "client_closed");
    let by_id: HashMap<&str, usize> =
        all.iter()
            .filter_map(|e| e["subject"].as_str())
            .fold(HashMap::new(), |mut m, s| {
                *m.entry(s).or_default() += 1;
                m
            });
    assert_eq!(
        by_id.get("rust-agent"),
        Some(&1),
        "rust-agent only registered"
    );
}
