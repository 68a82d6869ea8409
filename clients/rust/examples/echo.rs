//! An agent that answers every direct message with `{"echo": <content>}` and
//! acknowledges every instruction `done` with `{"echoed": <payload>}`.
//!
//! It prints one line, `registered <agent_id> <incarnation>`, once connected (and one
//! per reconnection), and stops on SIGTERM or Ctrl-C. The tests use it as the Rust
//! peer of the Python library.
//!
//! ```sh
//! cargo run -p tether-client --example echo -- --url ws://127.0.0.1:8570/ --agent-id echo
//! ```

use clap::Parser;
use serde_json::json;
use std::io::Write;
use tether_client::{AckStatus, Agent, AgentConfig, Event, INSTRUCTIONS_CAPABILITY};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
struct Args {
    /// Server WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8570/")]
    url: String,
    /// Agent id to register.
    #[arg(long, default_value = "echo")]
    agent_id: String,
    /// Keep the certificate in this file.
    #[arg(long)]
    certificate_file: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let args = Args::parse();
    let mut config = AgentConfig::new(&args.url, &args.agent_id)
        .capability("echo")
        .capability(INSTRUCTIONS_CAPABILITY);
    if let Some(path) = args.certificate_file {
        config = config.certificate_file(path);
    }
    let mut agent = Agent::connect(config).await?;
    announce(
        &agent.registration().agent_id,
        agent.registration().incarnation,
    );

    let mut terminate = signal(SignalKind::terminate())?;
    loop {
        let event = tokio::select! {
            event = agent.next_event() => event,
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        match event {
            Some(Event::Message(message)) if !message.sender_id.is_empty() => {
                let reply = json!({"echo": message.content});
                agent.send_direct(&message.sender_id, reply).await?;
            }
            Some(Event::Instruction(instruction)) => {
                let result = json!({"echoed": instruction.payload});
                agent
                    .ack(&instruction.instruction_id, AckStatus::Done, Some(result))
                    .await?;
            }
            Some(Event::Reconnected(registration)) => {
                announce(&registration.agent_id, registration.incarnation)
            }
            Some(_) => {}
            None => break,
        }
    }
    agent.close().await?;
    Ok(())
}

fn announce(agent_id: &str, incarnation: u64) {
    println!("registered {agent_id} {incarnation}");
    let _ = std::io::stdout().flush();
}
