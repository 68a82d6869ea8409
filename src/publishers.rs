//! Starts the configured publishers, each on a long-lived arbiter of its own (so a
//! slow or unreachable broker never holds up another publisher, the registry or the
//! agents), and attaches them to the event bus.

use actix::prelude::*;
use tether_actors::bus::{AddPublisher, EventBus};
use tether_actors::publisher::backoff::RestartPolicy;
use tether_actors::publisher::broker::Broker;
use tether_actors::publisher::kafka::KafkaBroker;
use tether_actors::publisher::log::LogPublisher;
use tether_actors::publisher::rabbitmq::RabbitMqBroker;
use tether_actors::publisher::redis::RedisBroker;
use tether_actors::publisher::supervisor::BrokerPublisher;
use tether_actors::publisher::PublisherHandle;
use tether_actors::settings::{BufferSettings, EventsSettings, Settings};

/// Starts every publisher named in `events.publishers`. The arbiters are returned so
/// they live as long as the server.
pub fn start(settings: &Settings, bus: &Addr<EventBus>) -> Result<Vec<Arbiter>, String> {
    let mut arbiters = Vec::new();
    let events = &settings.events;
    for name in &events.publishers {
        let arbiter = Arbiter::new();
        let handle = match name.as_str() {
            "log" => {
                let addr =
                    LogPublisher::start_in_arbiter(&arbiter.handle(), |_| LogPublisher::default());
                PublisherHandle::of("log", addr)
            }
            "redis" => start_broker(
                &arbiter,
                RedisBroker::new(events.redis.clone()),
                events.redis.buffer(),
                events,
            ),
            "kafka" => start_broker(
                &arbiter,
                KafkaBroker::new(events.kafka.clone()),
                events.kafka.buffer(),
                events,
            ),
            "rabbitmq" => start_broker(
                &arbiter,
                RabbitMqBroker::new(events.rabbitmq.clone()),
                events.rabbitmq.buffer(),
                events,
            ),
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

fn start_broker<B: Broker + Send>(
    arbiter: &Arbiter,
    broker: B,
    buffer: BufferSettings,
    events: &EventsSettings,
) -> PublisherHandle {
    let name = broker.name();
    let restarts = RestartPolicy::from(events);
    let addr = BrokerPublisher::start_in_arbiter(&arbiter.handle(), move |_| {
        BrokerPublisher::new(broker, buffer, restarts)
    });
    PublisherHandle::of(name, addr)
}
