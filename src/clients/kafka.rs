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
pub fn consumer(
    c: &KafkaConfig,
    group: &str,
    client_id: &str,
) -> Result<StreamConsumer, KafkaError> {
    base(c)
        .set("client.id", client_id)
        .set("group.id", group)
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
    let opts = AdminOptions::new()
        .operation_timeout(Some(ADMIN_TIMEOUT))
        .request_timeout(Some(ADMIN_TIMEOUT));
    for result in admin.create_topics(&topics, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// A Kafka error in words for people: librdkafka's admin timeouts say how
/// long was waited.
pub fn describe(e: &KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::OperationTimedOut) => {
            format!("operation timed out after {ADMIN_TIMEOUT:?}")
        }
        _ => e.to_string(),
    }
}

/// How long a topic creation may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one record may wait for room in librdkafka's local queue.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the broker stored a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

/// Publishes one record keyed by `key` and waits for its delivery report.
pub async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> Result<Delivered, KafkaError> {
    let record = rdkafka::producer::FutureRecord::to(topic)
        .key(key)
        .payload(payload);
    producer
        .send(record, QUEUE_TIMEOUT)
        .await
        .map(|d| Delivered {
            partition: d.partition,
            offset: d.offset,
        })
        .map_err(|(e, _)| e)
}

/// Asks the cluster for `topic`'s metadata: the broker answers and knows the
/// topic. Used to probe a broker that was marked down.
pub async fn probe(producer: &FutureProducer, topic: &str) -> Result<(), KafkaError> {
    use rdkafka::producer::Producer;
    let producer = producer.clone();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let md = producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(2))?;
        let ok = md
            .topics()
            .iter()
            .any(|t| t.error().is_none() && t.partitions().iter().all(|p| p.leader() >= 0));
        if ok {
            Ok(())
        } else {
            Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::LeaderNotAvailable,
            ))
        }
    })
    .await
    .unwrap_or(Err(KafkaError::Canceled))
}
