//! The smallest agent: connect, say hello to everyone, print what comes back.
//!
//! ```sh
//! cargo run -p tether-client --example hello -- ws://127.0.0.1:8570/ alice
//! ```

use serde_json::json;
use tether_client::{Agent, AgentConfig, Event};

#[tokio::main]
async fn main() -> Result<(), tether_client::Error> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "ws://127.0.0.1:8570/".into());
    let agent_id = args.next().unwrap_or_else(|| "hello".into());

    let mut agent = Agent::connect(AgentConfig::new(url, agent_id)).await?;
    agent.broadcast(json!({"text": "hello"}), &[]).await?;
    while let Some(event) = agent.next_event().await {
        match event {
            Event::Message(message) => println!("{}: {}", message.sender_id, message.content),
            other => println!("{other:?}"),
        }
    }
    Ok(())
}
