//! What every HTTP handler can reach: the actors' addresses and the settings.

use actix::Addr;
use std::sync::atomic::{AtomicBool, AtomicU64};
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
}
