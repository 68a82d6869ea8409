//! # tether-client
//!
//! An agent for a Tether network (the `tether` server) that stays connected by itself.
//!
//! ```no_run
//! use tether_client::{Agent, AgentConfig, Event};
//! use serde_json::json;
//!
//! # async fn run() -> Result<(), tether_client::Error> {
//! let mut agent = Agent::connect(AgentConfig::new("ws://127.0.0.1:8570/", "alice")).await?;
//! agent.send_direct("bob", json!({"text": "hello"})).await?;
//! while let Some(event) = agent.next_event().await {
//!     if let Event::Message(message) = event {
//!         println!("{} says {}", message.sender_id, message.content);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! What the [`Agent`] does without being asked:
//! - answers the server's `ping_agent` heartbeats, and sends its own ping when it has
//!   heard nothing for a while ([`Keepalive`]), so a half-open connection is noticed;
//! - claims a certificate for its id after registering (kept in memory, or in the file
//!   [`AgentConfig::certificate_file`] names) and presents it when it registers again,
//!   so it takes its id back from a connection the server still believes alive;
//! - reconnects with exponential backoff and jitter ([`ReconnectPolicy`]), following
//!   `network_shutdown`'s `reconnect_url` in a cluster, and reports each new
//!   registration as [`Event::Reconnected`] (the server gives it the next incarnation);
//! - delivers each instruction to the application once per process: a redelivery of
//!   one it is working on is dropped, and a redelivery of one it acknowledged is
//!   acknowledged again with the same status, without the application seeing it.
//!
//! What it cannot promise: messages written to a connection that then dies are lost
//! (the protocol has no message acknowledgements), and an application that stops
//! reading events stops the agent reading its socket (the server then sees a slow
//! consumer, or a silent agent).
#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

mod agent;
mod backoff;
mod certificate;
mod config;
mod connection;
mod error;
mod event;
mod handle;
mod instructions;
pub mod protocol;
mod session;

pub use agent::Agent;
pub use config::{AgentConfig, Keepalive, ReconnectPolicy};
pub use error::{Error, ErrorCode};
pub use event::{
    AckStatus, AgentInfo, Disconnect, Event, Instruction, Message, MessageKind, Notification,
    Registration, ServerError,
};
pub use handle::{AgentHandle, AgentStats};

/// The capability an agent lists to receive instructions (`metadata.capabilities`).
pub const INSTRUCTIONS_CAPABILITY: &str = "instructions";
