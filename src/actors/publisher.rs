//! KafkaPublisher: turns loaded profiles into protobuf events and publishes them
//! with the idempotent producer, answering only once every delivery report is in.

use crate::{
    proto::{self, SyncType, UserProfileSyncEvent},
    telemetry::Stats,
};
use actix::prelude::*;
use mongodb::bson::Document;
use prost::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::{sync::Arc, time::Duration};
use tokio::sync::RwLock;

/// How long one record may wait for room in librdkafka's local queue.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// One change to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub user_id: String,
    pub version: i64,
    pub profile: Document,
    pub base_version: i64,
    pub lease_epoch: i64,
}

/// Where the broker stored an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The profile cannot be encoded; retrying will not help.
    #[error("cannot encode the profile: {0}")]
    Encode(String),
    /// The broker did not take the event.
    #[error("kafka delivery failed: {0}")]
    Delivery(String),
}

impl PublishError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, PublishError::Delivery(_))
    }
}

pub struct KafkaPublisher {
    producer: FutureProducer,
    static_topic: String,
    dynamic_topic: String,
    instance_id: String,
    stats: Arc<Stats>,
    hold: Arc<RwLock<()>>,
}

impl KafkaPublisher {
    pub fn new(
        producer: FutureProducer,
        kafka: &crate::config::KafkaConfig,
        instance_id: String,
        stats: Arc<Stats>,
        hold: Arc<RwLock<()>>,
    ) -> Self {
        Self {
            producer,
            static_topic: kafka.static_topic.clone(),
            dynamic_topic: kafka.dynamic_topic.clone(),
            instance_id,
            stats,
            hold,
        }
    }
}

impl Actor for KafkaPublisher {
    type Context = Context<Self>;
}

impl Supervised for KafkaPublisher {}

/// Publishes a batch; one result per item, in order.
#[derive(Message)]
#[rtype(result = "Vec<Result<Delivered, PublishError>>")]
pub struct Publish {
    pub sync_type: SyncType,
    pub items: Vec<Outgoing>,
}

/// Builds the event for one change.
pub fn build_event(
    sync_type: SyncType,
    item: &Outgoing,
    instance_id: &str,
) -> Result<UserProfileSyncEvent, PublishError> {
    Ok(UserProfileSyncEvent {
        user_id: item.user_id.clone(),
        sync_type: sync_type as i32,
        profile_data: proto::pack_profile(&item.profile)
            .map_err(|e| PublishError::Encode(e.to_string()))?,
        version: item.version,
        timestamp: now_ms(),
        // The version is the flag's hybrid clock in microseconds.
        marked_at_ms: item.version / 1000,
        event_id: uuid::Uuid::new_v4().to_string(),
        source_instance: instance_id.to_string(),
        lease_epoch: item.lease_epoch,
        base_version: item.base_version,
    })
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn type_label(t: SyncType) -> &'static str {
    match t {
        SyncType::StaticImmediate => "static",
        SyncType::DynamicBatch => "dynamic",
    }
}

impl Handler<Publish> for KafkaPublisher {
    type Result = ResponseFuture<Vec<Result<Delivered, PublishError>>>;

    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) -> Self::Result {
        let producer = self.producer.clone();
        let topic = match msg.sync_type {
            SyncType::StaticImmediate => self.static_topic.clone(),
            SyncType::DynamicBatch => self.dynamic_topic.clone(),
        };
        let instance = self.instance_id.clone();
        let stats = self.stats.clone();
        let hold = self.hold.clone();
        Box::pin(async move {
            // Held only while an operator (or a test) pauses publishing.
            let _open = match hold.try_read() {
                Ok(g) => g,
                Err(_) => {
                    stats.publish_held();
                    hold.read().await
                }
            };
            let label = type_label(msg.sync_type);
            let encoded: Vec<Result<Vec<u8>, PublishError>> = msg
                .items
                .iter()
                .map(|item| build_event(msg.sync_type, item, &instance).map(|e| e.encode_to_vec()))
                .collect();
            let sends = msg.items.iter().zip(&encoded).map(|(item, bytes)| {
                let producer = &producer;
                let topic = &topic;
                async move {
                    let bytes = bytes.as_ref().map_err(Clone::clone)?;
                    let record = FutureRecord::to(topic)
                        .key(item.user_id.as_str())
                        .payload(bytes.as_slice());
                    producer
                        .send(record, QUEUE_TIMEOUT)
                        .await
                        .map(|d| Delivered {
                            partition: d.partition,
                            offset: d.offset,
                        })
                        .map_err(|(e, _)| PublishError::Delivery(e.to_string()))
                }
            });
            let results = futures::future::join_all(sends).await;
            let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
            stats.events_published(label, ok);
            for e in results.iter().filter_map(|r| r.as_ref().err()) {
                stats.publish_failed(label, e);
            }
            results
        })
    }
}

/// Waits until every queued event is delivered (or the timeout passes).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Flush(pub Duration);

impl Handler<Flush> for KafkaPublisher {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, Flush(timeout): Flush, _: &mut Context<Self>) -> Self::Result {
        let producer = self.producer.clone();
        Box::pin(async move {
            let r = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
            if let Ok(Err(e)) = r {
                tracing::warn!(error = %e, "producer flush did not finish");
            }
        })
    }
}
