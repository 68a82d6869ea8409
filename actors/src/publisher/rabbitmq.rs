//! The RabbitMQ broker (PROTOCOL.md §8): a durable topic exchange declared at
//! connection, one persistent message per event with routing key = event type,
//! `message_id` = event id and `content_type` `application/cloudevents+json`, on a
//! channel in confirm mode. An event counts as delivered when its publisher confirm
//! (`basic.ack`) arrives.

use super::broker::{redact_url, Broker, BrokerError, LossReporter, SendError, Timeouts};
use crate::event::SharedEvent;
use crate::settings::{secs, RabbitMqSettings};
use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use std::sync::Arc;
use std::time::Duration;

/// Content type of every message.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// A connection and its confirm-mode channel.
#[derive(Clone)]
pub struct RabbitClient {
    connection: Arc<Connection>,
    channel: Channel,
}

/// Delivers events to a RabbitMQ topic exchange.
pub struct RabbitMqBroker {
    settings: Arc<RabbitMqSettings>,
}

impl RabbitMqBroker {
    /// A broker for `[events.rabbitmq]`.
    pub fn new(settings: RabbitMqSettings) -> Self {
        Self {
            settings: Arc::new(settings),
        }
    }
}

/// The AMQP URL with `heartbeat` and `connection_timeout` (milliseconds) from the
/// settings, unless the URL sets them itself.
pub fn amqp_url(settings: &RabbitMqSettings) -> String {
    let mut url = settings.url.clone();
    let mut add = |key: &str, value: String| {
        let present = url
            .split_once('?')
            .is_some_and(|(_, query)| query.split('&').any(|p| p.split('=').next() == Some(key)));
        if !present {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&format!("{key}={value}"));
        }
    };
    add("heartbeat", settings.heartbeat.to_string());
    add(
        "connection_timeout",
        ((settings.connection_timeout * 1000.0) as u64).to_string(),
    );
    url
}

async fn connect(
    settings: Arc<RabbitMqSettings>,
    lost: LossReporter,
) -> Result<RabbitClient, BrokerError> {
    let where_ = redact_url(&settings.url);
    let properties = ConnectionProperties::default().with_connection_name("tether".into());
    let connection = Connection::connect(&amqp_url(&settings), properties)
        .await
        .map_err(|e| BrokerError(format!("cannot connect to RabbitMQ at {where_}: {e}")))?;
    connection.on_error(move |error| lost.report(format!("RabbitMQ connection error: {error}")));
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| BrokerError::new("cannot open a RabbitMQ channel", e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| BrokerError::new("cannot put the RabbitMQ channel in confirm mode", e))?;
    declare_exchange(&channel, &settings.exchange)
        .await
        .map_err(|e| {
            BrokerError(format!(
                "cannot declare the durable topic exchange `{}` (events.rabbitmq.exchange); if it exists with another type or durability, delete it or choose another name: {e}",
                settings.exchange
            ))
        })?;
    Ok(RabbitClient {
        connection: Arc::new(connection),
        channel,
    })
}

fn properties(event: &SharedEvent) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(event.id.as_str().into())
        .with_content_type(CONTENT_TYPE.into())
        .with_type(event.kind.as_str().into())
        .with_app_id("tether".into())
        // 2 = persistent.
        .with_delivery_mode(2)
}

async fn send(
    client: RabbitClient,
    exchange: String,
    batch: Vec<SharedEvent>,
) -> Result<(), SendError> {
    let mut confirms = Vec::with_capacity(batch.len());
    let mut publish_error = None;
    for event in &batch {
        match client
            .channel
            .basic_publish(
                &exchange,
                event.kind.as_str(),
                BasicPublishOptions::default(),
                event.json.as_bytes(),
                properties(event),
            )
            .await
        {
            Ok(confirm) => confirms.push(confirm),
            Err(e) => {
                publish_error = Some(BrokerError::new("basic.publish failed", e));
                break;
            }
        }
    }
    // Confirms are awaited in publication order; the acknowledged prefix counts.
    let published = confirms.len();
    for (acked, confirm) in confirms.into_iter().enumerate() {
        let error = match confirm.await {
            Ok(Confirmation::Ack(_)) | Ok(Confirmation::NotRequested) => continue,
            Ok(Confirmation::Nack(_)) => {
                BrokerError("RabbitMQ refused an event (basic.nack)".into())
            }
            Err(e) => BrokerError::new("the publisher confirm did not arrive", e),
        };
        return Err(SendError { acked, error });
    }
    match publish_error {
        // Everything published before the failure was confirmed.
        Some(error) => Err(SendError {
            acked: published,
            error,
        }),
        None => Ok(()),
    }
}

impl Broker for RabbitMqBroker {
    type Client = RabbitClient;

    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    fn describe(&self) -> String {
        format!(
            "RabbitMQ {} (exchange {})",
            redact_url(&self.settings.url),
            self.settings.exchange
        )
    }

    fn timeouts(&self) -> Timeouts {
        let connect = secs(self.settings.connection_timeout);
        Timeouts {
            connect: connect * 2 + Duration::from_secs(1),
            send: secs(self.settings.confirm_timeout),
            check: Duration::from_secs(1),
        }
    }

    fn health_check_interval(&self) -> Duration {
        secs(self.settings.health_check_interval)
    }

    fn connect(
        &self,
        lost: LossReporter,
    ) -> LocalBoxFuture<'static, Result<Self::Client, BrokerError>> {
        connect(self.settings.clone(), lost).boxed_local()
    }

    fn send(
        &self,
        client: &Self::Client,
        batch: Vec<SharedEvent>,
    ) -> LocalBoxFuture<'static, Result<(), SendError>> {
        send(client.clone(), self.settings.exchange.clone(), batch).boxed_local()
    }

    fn check(&self, client: &Self::Client) -> LocalBoxFuture<'static, Result<(), BrokerError>> {
        let ok = client.connection.status().connected() && client.channel.status().connected();
        async move {
            if ok {
                Ok(())
            } else {
                Err(BrokerError(
                    "the RabbitMQ connection or channel is closed".into(),
                ))
            }
        }
        .boxed_local()
    }

    fn close(&self, client: Self::Client) -> LocalBoxFuture<'static, ()> {
        async move {
            if client.connection.status().connected() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.connection.close(200, "tether publisher closing"),
                )
                .await;
            }
        }
        .boxed_local()
    }
}

/// Declares Tether's event exchange: a durable topic exchange named `exchange` (the
/// publisher, `tether events --from rabbitmq` and the tests declare it the same way,
/// so whichever comes first creates it as the others expect).
pub async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            exchange,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}
