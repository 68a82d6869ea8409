//! `tether events --from rabbitmq`: an exclusive, auto-deleted queue bound to the
//! exchange of `[events.rabbitmq]` with `--binding` (default `#`), consumed until
//! `--count` events or an error.

use super::{subscribed, EventsArgs, Printer, Since};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tether_actors::publisher::rabbitmq::{amqp_url, declare_exchange};
use tether_actors::settings::RabbitMqSettings;

/// Consumes the exchange until `--count` events or an error.
pub async fn read(settings: &RabbitMqSettings, args: &EventsArgs) -> Result<(), String> {
    if args.since == Since::Beginning {
        return Err("RabbitMQ keeps no history for a new queue: use --since now (the default) with --from rabbitmq, or --from redis / kafka to read past events".into());
    }
    let connection = Connection::connect(&amqp_url(settings), ConnectionProperties::default())
        .await
        .map_err(|e| {
            format!("cannot connect to RabbitMQ (events.rabbitmq.url): {e}; is it running?")
        })?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a RabbitMQ channel: {e}"))?;
    // The same declaration as the publisher's, so binding works before the server ran.
    declare_exchange(&channel, &settings.exchange)
        .await
        .map_err(|e| format!("cannot declare exchange {}: {e}", settings.exchange))?;
    let queue = channel
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("cannot declare a queue: {e}"))?;
    channel
        .queue_bind(
            queue.name().as_str(),
            &settings.exchange,
            &args.binding,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("cannot bind the queue to {}: {e}", settings.exchange))?;
    let mut consumer = channel
        .basic_consume(
            queue.name().as_str(),
            "tether-events",
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("cannot consume from the queue: {e}"))?;
    subscribed(&format!(
        "RabbitMQ exchange {} with binding key {}",
        settings.exchange, args.binding
    ));
    let mut printer = Printer::new(args);
    if printer.done() {
        return Ok(());
    }
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.map_err(|e| format!("the RabbitMQ consumer failed: {e}"))?;
        if !printer.print(&String::from_utf8_lossy(&delivery.data)) {
            return Ok(());
        }
    }
    Err("RabbitMQ closed the consumer".into())
}
