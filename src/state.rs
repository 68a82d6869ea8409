//! What every HTTP handler can reach: the actors' addresses and the settings.

use actix::Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;
use tether_actors::bus::EventBus;
use tether_actors::cluster::Cluster;
use tether_actors::connection::ConnectionContext;
use tether_actors::event::EventSource;
use tether_actors::heartbeat::Heartbeat;
use tether_actors::instructions::{Dispatcher, Store};
use tether_actors::registry::Registry;
use tether_actors::settings::Settings;

/// Shared server state, cloned into every actix-web worker.
#[derive(Clone)]
pub struct AppState {
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// What every connection actor is given (the registry, the routing table, their
    /// settings, the open-socket count).
    pub connections: ConnectionContext,
    /// The registry actor.
    pub registry: Addr<Registry>,
    /// The heartbeat actor.
    pub heartbeat: Addr<Heartbeat>,
    /// The event bus actor.
    pub bus: Addr<EventBus>,
    /// The instruction dispatcher.
    pub instructions: Addr<Dispatcher>,
    /// Where instructions and sessions are kept (read directly by the admin API).
    pub store: Store,
    /// Where events come from.
    pub source: EventSource,
    /// Next connection's session id.
    pub next_session: Arc<AtomicU64>,
    /// False once shutdown began: new WebSocket upgrades are refused.
    pub accepting: Arc<AtomicBool>,
    /// The cluster actor, when `cluster.enabled`.
    pub cluster: Option<Addr<Cluster>>,
    /// The `ws://` URL agents reach this node at (`cluster.advertise_url`, or the
    /// listener's address).
    pub advertise_url: String,
    /// `GET /connect` answers given (their turn, for round robin and ties).
    pub placements: Arc<AtomicUsize>,
}

impl AppState {
    /// WebSocket connections open now (registered or not).
    pub fn open_sockets(&self) -> usize {
        self.connections
            .open_sockets
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Most WebSocket connections open at once: `network.max_connections` plus room
    /// for sockets that are registering, taking over or being refused (a tenth more,
    /// at least 1 024). Past it, upgrades are answered 503.
    pub fn socket_limit(&self) -> usize {
        let agents = self.settings.network.max_connections;
        agents + (agents / 10).max(1024)
    }
}
