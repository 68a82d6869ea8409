//! Support for the instructions tests: a database of the test's own (an SQLite file or
//! a fresh PostgreSQL database), servers on it, agents that take instructions, and
//! the admin routes.

use super::{http, Agent, TestServer, DEADLINE};
use serde_json::{json, Value};
use sqlx::Connection;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    /// An SQLite file in the temporary directory.
    Sqlite,
    /// A database of its own on the PostgreSQL at `TETHER_TEST_POSTGRES`
    /// (default `postgres://postgres@127.0.0.1:5432`).
    Postgres,
}

/// The PostgreSQL server the tests create their databases on.
fn postgres_server() -> String {
    std::env::var("TETHER_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// A database of one test; a PostgreSQL one is dropped with it.
pub struct TestDatabase {
    /// `storage.url` for the servers.
    pub url: String,
    postgres_name: Option<String>,
    sqlite_path: Option<std::path::PathBuf>,
}

impl TestDatabase {
    /// A new, empty database.
    pub async fn new(db: Db) -> Self {
        match db {
            Db::Sqlite => {
                let path = super::fresh_database_path();
                Self {
                    url: format!("sqlite://{}", path.display()),
                    postgres_name: None,
                    sqlite_path: Some(path),
                }
            }
            Db::Postgres => {
                let server = postgres_server();
                let name = format!("tether_test_{}", uuid::Uuid::new_v4().simple());
                let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
                    .await
                    .unwrap_or_else(|e| {
                        panic!(
                            "these tests need PostgreSQL at {server} (trust auth, user postgres; \
                             set TETHER_TEST_POSTGRES to use another): {e}"
                        )
                    });
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await
                    .expect("cannot create the test's database");
                Self {
                    url: format!("{server}/{name}"),
                    postgres_name: Some(name),
                    sqlite_path: None,
                }
            }
        }
    }

    /// The environment a server on this database needs, plus `extra`.
    pub fn env<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut env = vec![("TETHER__STORAGE__URL", self.url.as_str())];
        env.extend_from_slice(extra);
        env
    }

    /// Starts a server on this database.
    pub fn start(&self, extra: &[(&str, &str)]) -> TestServer {
        TestServer::start(&self.env(extra))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some(path) = self.sqlite_path.take() {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
        if let Some(name) = self.postgres_name.take() {
            // Drop runs inside the test's runtime: drop the database from a thread
            // with a runtime of its own.
            let server = postgres_server();
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                runtime.block_on(async {
                    if let Ok(mut admin) =
                        sqlx::PgConnection::connect(&format!("{server}/postgres")).await
                    {
                        let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                        let _ = sqlx::query(&drop).execute(&mut admin).await;
                    }
                });
            })
            .join();
        }
    }
}

/// Connects and registers `agent_id` as an agent that takes instructions, with the
/// extra `capabilities`.
pub async fn worker(server: &TestServer, agent_id: &str, capabilities: &[&str]) -> Agent {
    let mut listed = vec!["instructions"];
    listed.extend_from_slice(capabilities);
    let mut agent = Agent::connect(&server.ws_url()).await;
    let answer = agent
        .request(
            json!({"type": "system_request", "command": "register_agent",
                        "agent_id": agent_id,
                        "metadata": {"name": agent_id, "capabilities": listed}}),
        )
        .await;
    assert_eq!(answer["success"], true, "registration failed: {answer}");
    agent
}

/// The next instruction `agent` receives, answering the server's pings meanwhile.
pub async fn next_instruction(agent: &mut Agent) -> Value {
    loop {
        let frame = agent
            .wait_for(|f| {
                f["type"] == "instruction"
                    || (f["type"] == "system_request" && f["command"] == "ping_agent")
            })
            .await;
        if frame["type"] == "instruction" {
            return frame;
        }
        agent
            .send(json!({"type": "system_response", "command": "ping_agent",
                         "success": true, "timestamp": frame["timestamp"]}))
            .await;
    }
}

/// Sends an `instruction_ack`.
pub async fn ack(agent: &mut Agent, instruction_id: &str, status: &str, result: Value) {
    agent
        .send(
            json!({"type": "instruction_ack", "instruction_id": instruction_id,
                     "status": status, "result": result}),
        )
        .await;
}

/// Asserts that `agent` has no instruction waiting: a ping request's answer comes back
/// with no instruction before it (the server sends in order).
pub async fn assert_no_instruction(agent: &mut Agent, why: &str) {
    agent
        .request(json!({"type": "system_request", "command": "ping_agent"}))
        .await;
    let early: Vec<Value> = agent
        .pending()
        .into_iter()
        .filter(|f| f["type"] == "instruction")
        .collect();
    assert!(early.is_empty(), "{why}: received {early:?}");
}

/// `POST path` with a JSON body: the status and the JSON answer.
pub async fn post(server: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let response = http()
        .post(server.http(path))
        .json(&body)
        .send()
        .await
        .expect("the admin API did not answer");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `POST path` with a raw body.
pub async fn post_raw(server: &TestServer, path: &str, body: &str) -> (u16, Value) {
    let response = http()
        .post(server.http(path))
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("the admin API did not answer");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `GET path`: the status and the JSON answer.
pub async fn get(server: &TestServer, path: &str) -> (u16, Value) {
    let response = http()
        .get(server.http(path))
        .send()
        .await
        .expect("the admin API did not answer");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Creates an instruction for `agent_id`; panics unless it is created.
pub async fn create(server: &TestServer, agent_id: &str, body: Value) -> Value {
    let (status, created) = post(server, &format!("/agents/{agent_id}/instructions"), body).await;
    assert_eq!(status, 201, "instruction not created: {created}");
    assert_eq!(created["state"], "pending");
    created
}

/// Creates an instruction for `agent_id`; its id.
pub async fn create_id(server: &TestServer, agent_id: &str, body: Value) -> String {
    let created = create(server, agent_id, body).await;
    created["instruction_id"].as_str().unwrap().to_owned()
}

/// Waits (on the server's event stream) for the event `kind` of instruction `id`.
pub async fn event_of(events: &mut super::EventStream, kind: &str, id: &str) -> Value {
    let (kind, id) = (kind.to_owned(), id.to_owned());
    tokio::time::timeout(
        DEADLINE,
        events.wait_for(move |e| e["type"] == kind.as_str() && e["subject"] == id.as_str()),
    )
    .await
    .unwrap_or_else(|_| panic!("no event was published in time"))
}
