//! Kafka: the idempotent producer, the applier's consumer and topic creation.

use crate::config::KafkaConfig;
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::StreamConsumer,
    error::KafkaError,
    producer::FutureProducer,
    types::RDKafkaErrorCode,
};
use std::time::Duration;

fn base(c: &KafkaConfig) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &c.brokers);
    cfg
}

/// Idempotent producer, acks=all; librdkafka retries internally within
/// `message.timeout.ms` (idempotence needs them).
pub fn producer(c: &KafkaConfig, client_id: &str) -> Result<FutureProducer, KafkaError> {
    base(c)
        .set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            c.message_timeout.as_millis().to_string(),
        )
        .set("linger.ms", c.linger.as_millis().to_string())
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
}

/// The applier's consumer: manual commits only, from the earliest offset.
pub fn consumer(c: &KafkaConfig, client_id: &str) -> Result<StreamConsumer, KafkaError> {
    base(c)
        .set("client.id", client_id)
        .set("group.id", &c.consumer_group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            c.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (c.session_timeout.as_millis() / 3).max(100).to_string(),
        )
        .set("enable.partition.eof", "false")
        .create()
}

/// Creates the sync and dead-letter topics; ones that exist are fine.
pub async fn ensure_topics(c: &KafkaConfig) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base(c).create()?;
    let topics: Vec<NewTopic> = [&c.static_topic, &c.dynamic_topic, &c.dlq_topic]
        .into_iter()
        .map(|t| NewTopic::new(t, c.partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&topics, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(%topic, ?code, "cannot create topic");
                });
            }
        }
    }
    Ok(())
}
