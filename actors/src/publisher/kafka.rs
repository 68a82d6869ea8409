//! The Kafka broker (PROTOCOL.md §8): one record per event on `events.kafka.topic`,
//! key = agent id (node id for `network.*`), value = the JSON, header
//! `content-type: application/cloudevents+json`, from an idempotent `rdkafka`
//! producer. An event counts as delivered when its delivery report says so.
//!
//! The topic is created at connection when `create_topic = true` (brokers such as
//! tansu do not auto-create topics); the connection is verified by fetching the
//! topic's metadata, which also catches a missing topic early with a clear error.

use super::broker::{Broker, BrokerError, LossReporter, SendError, Timeouts};
use crate::event::SharedEvent;
use crate::settings::{secs, KafkaSettings};
use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::sync::Arc;
use std::time::Duration;

/// Value of the `content-type` header of every record.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// Receives librdkafka's logs and errors: reports "all brokers down" to the
/// publisher and keeps librdkafka's per-retry connection noise at debug level (the
/// publisher logs outages once).
pub struct KafkaContext {
    lost: LossReporter,
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                log::error!(target: "librdkafka", "{fac} {message}")
            }
            _ => log::debug!(target: "librdkafka", "{fac} {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.lost
                .report(format!("all Kafka brokers are down: {reason}"));
        } else {
            log::debug!(target: "librdkafka", "{error}: {reason}");
        }
    }
}

/// The producer.
pub type KafkaProducer = FutureProducer<KafkaContext>;

/// Delivers events to a Kafka topic.
pub struct KafkaBroker {
    settings: Arc<KafkaSettings>,
}

impl KafkaBroker {
    /// A broker for `[events.kafka]`.
    pub fn new(settings: KafkaSettings) -> Self {
        Self {
            settings: Arc::new(settings),
        }
    }
}

fn ms(seconds: f64) -> String {
    ((seconds * 1000.0).round() as u64).max(1).to_string()
}

/// The producer configuration of `[events.kafka]`.
pub fn producer_config(s: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &s.bootstrap_servers)
        .set("client.id", "tether")
        .set("linger.ms", s.linger_ms.to_string())
        .set("batch.num.messages", s.batch_size.to_string())
        .set("compression.type", &s.compression)
        .set("acks", &s.acks)
        .set("request.timeout.ms", ms(s.request_timeout))
        .set("message.timeout.ms", ms(s.delivery_timeout))
        .set("socket.connection.setup.timeout.ms", ms(s.request_timeout))
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", ms(s.retry_max.max(0.1)));
    if s.idempotence {
        config.set("enable.idempotence", "true");
    } else {
        // Without idempotence, one request in flight is what keeps retries in order.
        config.set("max.in.flight.requests.per.connection", "1");
    }
    config
}

async fn create_topic(s: &KafkaSettings) -> Result<(), BrokerError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &s.bootstrap_servers)
        .set("client.id", "tether-admin")
        .set("socket.connection.setup.timeout.ms", ms(s.request_timeout))
        .create()
        .map_err(|e| BrokerError::new("cannot create a Kafka admin client", e))?;
    let topic = NewTopic::new(
        &s.topic,
        s.partitions,
        TopicReplication::Fixed(s.replication_factor),
    );
    let options = AdminOptions::new()
        .request_timeout(Some(secs(s.request_timeout)))
        .operation_timeout(Some(secs(s.request_timeout)));
    let results = admin.create_topics([&topic], &options).await.map_err(|e| {
        BrokerError(format!(
            "cannot create topic {} at {}: {e}",
            s.topic, s.bootstrap_servers
        ))
    })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(BrokerError(format!(
                    "cannot create topic {name} ({} partitions, replication factor {}): {code}; create it yourself and set events.kafka.create_topic = false, or fix partitions / replication_factor",
                    s.partitions, s.replication_factor
                )))
            }
        }
    }
    Ok(())
}

/// Fetches the topic's metadata: proves the broker answers and the topic exists.
async fn topic_exists(
    producer: Arc<KafkaProducer>,
    s: Arc<KafkaSettings>,
) -> Result<(), BrokerError> {
    let timeout = secs(s.request_timeout);
    let topic = s.topic.clone();
    let metadata = tokio::task::spawn_blocking(move || {
        producer.client().fetch_metadata(Some(&topic), timeout)
    })
    .await
    .map_err(|e| BrokerError::new("the metadata request was cancelled", e))?
    .map_err(|e| {
        BrokerError(format!(
            "Kafka at {} does not answer a metadata request: {e}",
            s.bootstrap_servers
        ))
    })?;
    let missing = metadata
        .topics()
        .iter()
        .find(|t| t.name() == s.topic)
        .is_none_or(|t| t.error().is_some() || t.partitions().is_empty());
    if missing {
        return Err(BrokerError(format!(
            "topic {} does not exist at {}; create it, or set events.kafka.create_topic = true",
            s.topic, s.bootstrap_servers
        )));
    }
    Ok(())
}

async fn connect(
    s: Arc<KafkaSettings>,
    lost: LossReporter,
) -> Result<Arc<KafkaProducer>, BrokerError> {
    if s.create_topic {
        create_topic(&s).await?;
    }
    let producer: KafkaProducer = producer_config(&s)
        .create_with_context(KafkaContext { lost })
        .map_err(|e| {
            BrokerError::new("cannot create the Kafka producer (check [events.kafka])", e)
        })?;
    let producer = Arc::new(producer);
    topic_exists(producer.clone(), s).await?;
    Ok(producer)
}

async fn send(
    producer: Arc<KafkaProducer>,
    s: Arc<KafkaSettings>,
    batch: Vec<SharedEvent>,
) -> Result<(), SendError> {
    let mut deliveries = Vec::with_capacity(batch.len());
    let mut enqueue_error = None;
    for event in &batch {
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some(CONTENT_TYPE),
        });
        let record = FutureRecord::to(&s.topic)
            .key(&*event.key)
            .payload(&event.json)
            .headers(headers);
        match producer.send_result(record) {
            Ok(delivery) => deliveries.push(delivery),
            Err((e, _)) => {
                enqueue_error = Some(BrokerError::new("the producer refused a record", e));
                break;
            }
        }
    }
    // Delivery reports are awaited in order; the delivered prefix counts.
    let enqueued = deliveries.len();
    for (acked, delivery) in deliveries.into_iter().enumerate() {
        let error = match delivery.await {
            Ok(Ok(_)) => continue,
            Ok(Err((e, _))) => BrokerError::new("Kafka did not take an event", e),
            Err(_) => BrokerError("the producer was dropped before reporting delivery".into()),
        };
        return Err(SendError { acked, error });
    }
    match enqueue_error {
        Some(error) => Err(SendError {
            acked: enqueued,
            error,
        }),
        None => Ok(()),
    }
}

impl Broker for KafkaBroker {
    type Client = Arc<KafkaProducer>;

    fn name(&self) -> &'static str {
        "kafka"
    }

    fn describe(&self) -> String {
        format!(
            "Kafka {} (topic {})",
            self.settings.bootstrap_servers, self.settings.topic
        )
    }

    fn timeouts(&self) -> Timeouts {
        let request = secs(self.settings.request_timeout);
        Timeouts {
            connect: request * 3 + Duration::from_secs(1),
            // librdkafka retries within message.timeout.ms on its own.
            send: secs(self.settings.delivery_timeout) + Duration::from_secs(2),
            check: request + Duration::from_secs(1),
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
        send(client.clone(), self.settings.clone(), batch).boxed_local()
    }

    fn check(&self, client: &Self::Client) -> LocalBoxFuture<'static, Result<(), BrokerError>> {
        let producer = client.clone();
        let settings = self.settings.clone();
        async move {
            if let Some((code, reason)) = producer.client().fatal_error() {
                return Err(BrokerError(format!(
                    "the Kafka producer hit a fatal error ({code}): {reason}"
                )));
            }
            topic_exists(producer, settings).await
        }
        .boxed_local()
    }

    fn close(&self, client: Self::Client) -> LocalBoxFuture<'static, ()> {
        async move {
            // Dropping a producer purges what it still holds; nothing is left to
            // deliver here (the publisher re-sends unacknowledged events).
            let _ = tokio::task::spawn_blocking(move || drop(client)).await;
        }
        .boxed_local()
    }
}
