//! A RabbitMQ queue bound to the exchange Tether publishes to, declared the way the
//! server declares the exchange (a durable topic exchange), to read what the
//! publisher delivered: the tests' consumers, the benchmark's event-publishing
//! latency consumer and publisher-throughput read-back.

use lapin::options::{
    BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;

/// The AMQP URL of RabbitMQ at `addr` (`host:port`): user guest/guest, vhost `/`.
pub fn amqp_url(addr: &str) -> String {
    format!("amqp://guest:guest@{addr}/%2f")
}

/// What kind of queue to bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    /// Server-named, exclusive to this connection, deleted with it (a live consumer).
    Exclusive,
    /// Named `<exchange>.queue`, not durable.
    Transient,
    /// Named `<exchange>.queue`, durable: persistent messages reach the disk before
    /// RabbitMQ confirms them.
    Durable,
}

/// A queue bound to an exchange, with the connection and channel that declared it.
pub struct BoundQueue {
    /// The connection (kept open: an exclusive queue lives as long as it does).
    pub connection: lapin::Connection,
    /// The channel that declared the queue, for consuming from it.
    pub channel: lapin::Channel,
    /// The queue's name.
    pub queue: String,
    /// The exchange it is bound to.
    pub exchange: String,
}

impl BoundQueue {
    /// Connects to `url` (see [`amqp_url`]), declares `exchange` (durable topic, as
    /// Tether does), a queue of `kind`, and binds it with `binding`.
    pub async fn bind(
        url: &str,
        exchange: &str,
        kind: QueueKind,
        binding: &str,
    ) -> Result<Self, String> {
        let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .map_err(|e| format!("cannot connect to RabbitMQ at {url}: {e}; is it running?"))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("cannot open a RabbitMQ channel: {e}"))?;
        tether_actors::publisher::rabbitmq::declare_exchange(&channel, exchange)
            .await
            .map_err(|e| format!("cannot declare exchange {exchange}: {e}"))?;
        let (name, options) = match kind {
            QueueKind::Exclusive => (
                String::new(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
            ),
            QueueKind::Transient | QueueKind::Durable => (
                format!("{exchange}.queue"),
                QueueDeclareOptions {
                    durable: kind == QueueKind::Durable,
                    ..Default::default()
                },
            ),
        };
        let declared = channel
            .queue_declare(&name, options, FieldTable::default())
            .await
            .map_err(|e| format!("cannot declare a queue for exchange {exchange}: {e}"))?;
        let queue = declared.name().as_str().to_owned();
        channel
            .queue_bind(
                &queue,
                exchange,
                binding,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("cannot bind queue {queue} to exchange {exchange}: {e}"))?;
        Ok(Self {
            connection,
            channel,
            queue,
            exchange: exchange.to_owned(),
        })
    }

    /// Consumes the queue as `tag`; with `no_ack` RabbitMQ counts a message delivered
    /// once sent, else each must be acknowledged.
    pub async fn consume(&self, tag: &str, no_ack: bool) -> Result<lapin::Consumer, String> {
        self.channel
            .basic_consume(
                &self.queue,
                tag,
                BasicConsumeOptions {
                    no_ack,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("cannot consume from queue {}: {e}", self.queue))
    }

    /// Messages waiting in the queue; then the queue and the exchange are deleted.
    pub async fn count_and_delete(self) -> Result<u64, String> {
        let declared = self
            .channel
            .queue_declare(
                &self.queue,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("cannot count the messages in queue {}: {e}", self.queue))?;
        let count = u64::from(declared.message_count());
        let _ = self
            .channel
            .queue_delete(&self.queue, QueueDeleteOptions::default())
            .await;
        let _ = self
            .channel
            .exchange_delete(&self.exchange, ExchangeDeleteOptions::default())
            .await;
        let _ = self.connection.close(200, "bye").await;
        Ok(count)
    }
}
