//! `tether events --from kafka`: a consumer assigned every partition of the topic of
//! `[events.kafka]`, from the end or the beginning, without a consumer group (nothing
//! is committed). Events of one agent are in order; across agents (partitions) they
//! interleave as they arrive.

use super::{subscribed, EventsArgs, Printer, Since};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::Duration;
use tether_actors::settings::KafkaSettings;

/// Consumes the topic until `--count` events or an error.
pub async fn read(settings: &KafkaSettings, args: &EventsArgs) -> Result<(), String> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.bootstrap_servers)
        .set(
            "group.id",
            format!("tether-events-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()
        .map_err(|e| format!("cannot create a Kafka consumer: {e}"))?;
    let consumer = Arc::new(consumer);
    let topic = settings.topic.clone();
    let metadata = {
        let (consumer, topic) = (consumer.clone(), topic.clone());
        tokio::task::spawn_blocking(move || {
            consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map(|m| {
                    m.topics()
                        .iter()
                        .filter(|t| t.name() == topic && t.error().is_none())
                        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                        .collect::<Vec<i32>>()
                })
        })
        .await
        .map_err(|e| format!("the metadata request failed: {e}"))?
        .map_err(|e| {
            format!(
                "Kafka at {} does not answer: {e}; is it running?",
                settings.bootstrap_servers
            )
        })?
    };
    if metadata.is_empty() {
        return Err(format!(
            "topic {topic} does not exist at {} (the server creates it at start-up when events.kafka.create_topic = true)",
            settings.bootstrap_servers
        ));
    }
    let offset = match args.since {
        Since::Now => Offset::End,
        Since::Beginning => Offset::Beginning,
    };
    let mut assignment = TopicPartitionList::new();
    for partition in &metadata {
        assignment
            .add_partition_offset(&topic, *partition, offset)
            .map_err(|e| format!("cannot assign partition {partition}: {e}"))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| format!("cannot assign the partitions of {topic}: {e}"))?;
    subscribed(&format!(
        "Kafka topic {topic} ({} partitions)",
        metadata.len()
    ));
    let mut printer = Printer::new(args);
    if printer.done() {
        return Ok(());
    }
    loop {
        let message = consumer
            .recv()
            .await
            .map_err(|e| format!("the Kafka consumer failed: {e}"))?;
        let Some(payload) = message.payload() else {
            continue;
        };
        if !printer.print(&String::from_utf8_lossy(payload)) {
            return Ok(());
        }
    }
}
