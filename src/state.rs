//! What every HTTP handler can reach: the actors' addresses and the settings.

use actix::Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;
use tether_actors::bus::EventBus;
use tether_actors::connection::ConnectionSettings;
use tether_actors::event::EventSource;
use tether_actors::heartbeat::Heartbeat;
use tether_actors::registry::Registry;
use tether_actors::settings::Settings;

/// Shared server state, cloned into every actix-web worker.
#[derive(Clone)]
pub struct AppState {
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// Settings of connection actors.
    pub connection_settings: Arc<ConnectionSettings>,
    /// The registry actor.
    pub registry: Addr<Registry>,
    /// The heartbeat actor.
    pub heartbeat: Addr<Heartbeat>,
    /// The event bus actor.
    pub bus: Addr<EventBus>,
    /// Where events come from.
    pub source: EventSource,
    /// Next connection's session id.
    pub next_session: Arc<AtomicU64>,
    /// False once shutdown began: new WebSocket upgrades are refused.
    pub accepting: Arc<AtomicBool>,
    /// WebSocket connections open now (registered or not).
    pub open_sockets: Arc<AtomicUsize>,
}

impl AppState {
    /// Most WebSocket connections open at once: `network.max_connections` plus room
    /// for sockets that are registering, taking over or being refused (a tenth more,
    /// at least 1 024). Past it, upgrades are answered 503.
    pub fn socket_limit(&self) -> usize {
        let agents = self.settings.network.max_connections;
        agents + (agents / 10).max(1024)
    }
}
