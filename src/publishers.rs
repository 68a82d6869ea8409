//! Starts the configured publishers, each on a long-lived arbiter of its own, and
//! attaches them to the event bus.

use actix::prelude::*;
use tether_actors::bus::{AddPublisher, EventBus};
use tether_actors::publisher::log::LogPublisher;
use tether_actors::publisher::PublisherHandle;
use tether_actors::settings::Settings;

/// Starts every publisher named in `events.publishers`. The arbiters are returned so
/// they live as long as the server.
pub fn start(settings: &Settings, bus: &Addr<EventBus>) -> Result<Vec<Arbiter>, String> {
    let mut arbiters = Vec::new();
    for name in &settings.events.publishers {
        let arbiter = Arbiter::new();
        let handle = match name.as_str() {
            "log" => {
                let addr =
                    LogPublisher::start_in_arbiter(&arbiter.handle(), |_| LogPublisher::default());
                PublisherHandle::of("log", addr)
            }
            other => {
                return Err(format!(
                    "publisher `{other}` is not available in this build (events.publishers)"
                ))
            }
        };
        bus.do_send(AddPublisher(handle));
        arbiters.push(arbiter);
    }
    Ok(arbiters)
}
