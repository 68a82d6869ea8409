//! Shared test support: start a real `tether` server process on a free port with
//! configuration from environment variables, and talk to it with real WebSocket,
//! HTTP and server-sent-events clients.
//!
//! Nothing here sleeps to synchronise: clients wait for the frame or event they
//! expect, with a deadline that only bounds a broken run.

#![allow(dead_code)]

pub mod brokers;
pub mod clients;
pub mod cluster;
pub mod instructions;
pub mod lifecycle;
pub mod redis_cluster;
pub mod takeover;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tether_testkit::sse::{SseBlock, SseDecoder};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Longest any single wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A running server process, killed when dropped.
pub struct TestServer {
    child: Option<Child>,
    /// The SQLite file made for this server (removed with it), unless the test gave
    /// `TETHER__STORAGE__URL`.
    database: Option<std::path::PathBuf>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Lines the server wrote to stderr (logs), collected in the background.
    pub stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl TestServer {
    /// Starts `tether` with the given `TETHER__...` variables (port 0 unless given).
    pub fn start(env: &[(&str, &str)]) -> Self {
        Self::start_with_args(env, &[])
    }

    /// Starts `tether` with environment variables and command-line arguments.
    pub fn start_with_args(env: &[(&str, &str)], args: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
        command
            .args(args)
            .env("TETHER__NETWORK__PORT", "0")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Each server its own instructions database: servers of concurrent tests must
        // not share one file.
        let database = (!env.iter().any(|(key, _)| *key == "TETHER__STORAGE__URL")).then(|| {
            let path = fresh_database_path();
            command.env(
                "TETHER__STORAGE__URL",
                format!("sqlite://{}", path.display()),
            );
            path
        });
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("cannot start the tether binary");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        {
            let lines = stderr.clone();
            let pipe = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let stdout = child.stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .expect("cannot read the server's stdout");
        let addr = line
            .trim()
            .strip_prefix("tether listening on http://")
            .unwrap_or_else(|| {
                let logs = stderr.lock().unwrap().join("\n");
                panic!("the server did not start: first stdout line {line:?}; logs:\n{logs}")
            })
            .to_owned();
        std::thread::spawn(move || for _ in reader.lines() {});
        Self {
            child: Some(child),
            database,
            addr,
            stderr,
        }
    }

    /// `ws://ADDR/`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// `http://ADDR{path}`.
    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `GET path` (admin routes open: no token set), as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        http()
            .get(self.http(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal to the server (`"INT"`, `"TERM"`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the server process to exit and returns its exit code.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        status.code()
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(path) = self.database.take() {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
    }
}

/// A path for a new SQLite database in the temporary directory.
pub fn fresh_database_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tether-test-{}.db", uuid_like()))
}

/// A unique enough name: the process id, the time and a counter.
fn uuid_like() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}-{n}", std::process::id())
}

/// A WebSocket client speaking the agent protocol.
pub struct Agent {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames read while waiting for another one, in order.
    pending: std::collections::VecDeque<Value>,
}

/// How a connection ended, seen from the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Closed {
    /// A close frame with this code.
    Code(u16),
    /// The TCP connection ended without a close frame.
    NoCloseFrame,
}

impl Agent {
    /// Connects to `url` without registering. Nagle's algorithm is off on the client's
    /// side, as in both client libraries and in Python's asyncio, so a test's frames
    /// leave when sent.
    pub async fn connect(url: &str) -> Self {
        let connecting = tokio_tungstenite::connect_async_with_config(url, None, true);
        let (ws, _) = tokio::time::timeout(DEADLINE, connecting)
            .await
            .expect("connect timed out")
            .expect("cannot connect");
        Self {
            ws,
            pending: Default::default(),
        }
    }

    /// Connects without registering, with a TCP receive buffer of about `bytes` (so
    /// that what the kernel holds for a client that stops reading stays small).
    pub async fn connect_with_receive_buffer(url: &str, bytes: u32) -> Self {
        let addr: std::net::SocketAddr = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .and_then(|addr| addr.parse().ok())
            .expect("a ws://IP:PORT/ URL");
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(bytes).unwrap();
        let stream = tokio::time::timeout(DEADLINE, socket.connect(addr))
            .await
            .expect("connect timed out")
            .expect("cannot connect");
        stream.set_nodelay(true).unwrap();
        let (ws, _) = tokio::time::timeout(
            DEADLINE,
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)),
        )
        .await
        .expect("WebSocket handshake timed out")
        .expect("WebSocket handshake failed");
        Self {
            ws,
            pending: Default::default(),
        }
    }

    /// Connects and registers as `agent_id`; panics unless it succeeds.
    pub async fn register(url: &str, agent_id: &str) -> (Self, Value) {
        let mut agent = Self::connect(url).await;
        let response = agent
            .request(json!({"type":"system_request","command":"register_agent",
                             "agent_id": agent_id, "metadata": {"name": agent_id}}))
            .await;
        assert_eq!(
            response["success"], true,
            "registration of {agent_id} failed: {response}"
        );
        (agent, response)
    }

    /// Sends a JSON frame.
    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .expect("send failed");
    }

    /// Sends a raw WebSocket message.
    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("send failed");
    }

    /// Sends a system request and returns the `system_response` to its command
    /// (frames arriving meanwhile are kept for [`Agent::next`]).
    pub async fn request(&mut self, frame: Value) -> Value {
        let command = frame["command"].as_str().unwrap().to_owned();
        self.send(frame).await;
        self.wait_for(|f| f["type"] == "system_response" && f["command"] == command.as_str())
            .await
    }

    /// The next JSON frame (pending ones first). Server pings are answered
    /// automatically unless `auto_pong` was disabled by reading them with `next_raw`.
    pub async fn next(&mut self) -> Value {
        if let Some(frame) = self.pending.pop_front() {
            return frame;
        }
        self.read().await
    }

    async fn read(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("connection ended while waiting for a frame")
                .expect("WebSocket error while waiting for a frame");
            match message {
                Message::Text(text) => {
                    return serde_json::from_str(&text).expect("server sent invalid JSON")
                }
                Message::Close(frame) => {
                    panic!("connection closed while waiting for a frame: {frame:?}")
                }
                _ => continue,
            }
        }
    }

    /// Waits for the first frame matching `predicate`, keeping the others pending.
    pub async fn wait_for(&mut self, predicate: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.pending.iter().position(&predicate) {
            return self.pending.remove(i).unwrap();
        }
        loop {
            let frame = self.read().await;
            if predicate(&frame) {
                return frame;
            }
            self.pending.push_back(frame);
        }
    }

    /// Frames already read but not yet taken (they arrived while waiting for another).
    pub fn pending(&self) -> Vec<Value> {
        self.pending.iter().cloned().collect()
    }

    /// Answers server pings (`ping_agent`) until the deadline or until `until`
    /// pings have been answered. Returns how many were answered.
    pub async fn answer_pings(&mut self, until: usize) -> usize {
        let mut answered = 0;
        while answered < until {
            let ping = self
                .wait_for(|f| f["type"] == "system_request" && f["command"] == "ping_agent")
                .await;
            self.send(
                json!({"type":"system_response","command":"ping_agent","success":true,
                              "timestamp": ping["timestamp"]}),
            )
            .await;
            answered += 1;
        }
        answered
    }

    /// Reads until the connection ends and returns how; frames read are discarded.
    pub async fn closed(&mut self) -> Closed {
        self.frames_until_closed().await.1
    }

    /// Reads until the connection ends: the text frames read from the socket on the way
    /// (not those `wait_for` kept pending), and how it ended.
    pub async fn frames_until_closed(&mut self) -> (Vec<Value>, Closed) {
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("timed out waiting for the connection to close")
            {
                Some(Ok(Message::Text(text))) => {
                    frames.push(serde_json::from_str(&text).expect("a text frame is JSON"))
                }
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (frames, Closed::Code(u16::from(frame.code)))
                }
                Some(Ok(Message::Close(None))) => return (frames, Closed::Code(1005)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return (frames, Closed::NoCloseFrame),
            }
        }
    }

    /// Closes the socket normally.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(DEADLINE, self.ws.next()).await {}
    }

    /// Drops the TCP connection without a close handshake.
    pub fn abort(self) {
        drop(self.ws);
    }

    /// Access to the raw stream (for tests that misbehave on purpose).
    pub fn raw(&mut self) -> &mut WebSocketStream<MaybeTlsStream<TcpStream>> {
        &mut self.ws
    }
}

/// A direct message frame from the client's side.
pub fn direct(target: &str, content: Value) -> Value {
    json!({"type":"message","data":{"message_type":"direct_message","target_agent_id":target,
                                    "content": content}})
}

/// A broadcast message frame.
pub fn broadcast(exclude: &[&str], content: Value) -> Value {
    json!({"type":"message","data":{"message_type":"broadcast_message","exclude_agent_ids":exclude,
                                    "content": content}})
}

/// A subscriber to `GET /events`.
pub struct EventStream {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    decoder: SseDecoder,
    /// Events read but not yet taken.
    pending: std::collections::VecDeque<Value>,
}

impl EventStream {
    /// Subscribes; returns once the server confirmed the subscription.
    pub async fn subscribe(server: &TestServer, token: Option<&str>) -> Self {
        let mut request = reqwest::Client::new().get(server.http("/events"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("cannot reach /events");
        assert_eq!(response.status(), 200, "GET /events refused");
        let mut stream = Self {
            body: Box::pin(response.bytes_stream()),
            decoder: SseDecoder::new(),
            pending: Default::default(),
        };
        // The first block is the subscription comment.
        stream.read_block().await;
        stream
    }

    async fn read_block(&mut self) -> SseBlock {
        loop {
            if let Some(block) = self.decoder.next_block() {
                return block;
            }
            let chunk = tokio::time::timeout(DEADLINE, self.body.next())
                .await
                .expect("timed out waiting for an event")
                .expect("event stream ended")
                .expect("event stream failed");
            self.decoder.push(&chunk);
        }
    }

    /// The next event (CloudEvents JSON).
    pub async fn next(&mut self) -> Value {
        if let Some(event) = self.pending.pop_front() {
            return event;
        }
        self.next_unbuffered().await
    }

    /// Waits for the first event matching `predicate`, keeping the others pending.
    pub async fn wait_for(&mut self, predicate: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.pending.iter().position(&predicate) {
            return self.pending.remove(i).unwrap();
        }
        loop {
            let event = self.next_unbuffered().await;
            if predicate(&event) {
                return event;
            }
            self.pending.push_back(event);
        }
    }

    async fn next_unbuffered(&mut self) -> Value {
        loop {
            let block = self.read_block().await;
            if let Some(data) = block.data() {
                return serde_json::from_str(data).expect("event is not JSON");
            }
        }
    }

    /// Events read but not yet taken.
    pub fn pending(&self) -> Vec<Value> {
        self.pending.iter().cloned().collect()
    }

    /// Collects events until one matches `last` (inclusive), returning them all in order.
    pub async fn collect_until(&mut self, last: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let event = self.next().await;
            let done = last(&event);
            events.push(event);
            if done {
                return events;
            }
        }
    }
}

/// Events of `agent_id` among `events`, as `(type, incarnation, seq)`.
pub fn agent_events(events: &[Value], agent_id: &str) -> Vec<(String, u64, u64)> {
    events
        .iter()
        .filter(|e| e["subject"] == agent_id && e["type"].as_str().unwrap().starts_with("agent."))
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["data"]["incarnation"].as_u64().unwrap_or(0),
                e["data"]["seq"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Reads events until `agent_id`'s `agent.cleaned_up`, asserts that its one incarnation
/// went `registered` → `disconnected` → `cleaned_up` (seq 1, 2, 3), and returns every
/// event read and the `agent.disconnected` event.
pub async fn expect_short_life(events: &mut EventStream, agent_id: &str) -> (Vec<Value>, Value) {
    let all = events
        .collect_until(|e| e["type"] == "agent.cleaned_up" && e["subject"] == agent_id)
        .await;
    assert_eq!(
        agent_events(&all, agent_id),
        vec![
            ("agent.registered".into(), 1, 1),
            ("agent.disconnected".into(), 1, 2),
            ("agent.cleaned_up".into(), 1, 3),
        ]
    );
    let disconnected = all
        .iter()
        .find(|e| e["type"] == "agent.disconnected" && e["subject"] == agent_id)
        .unwrap()
        .clone();
    (all, disconnected)
}

/// An HTTP client for the admin API.
pub fn http() -> reqwest::Client {
    reqwest::Client::new()
}
