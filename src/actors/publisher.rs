//! KafkaPublisher: turns loaded profiles into protobuf events and publishes them
//! with the idempotent producer, answering only once every delivery report is in.

use super::{Shared, StageError, guard, restart_pause};
use crate::{
    clients::kafka::{self, Delivered},
    faults::Stage,
    health::Backend,
    proto::{self, SyncType, UserProfileSyncEvent},
    retry::Retryable,
};
use actix::prelude::*;
use prost::Message as _;
use rdkafka::{
    error::KafkaError,
    producer::{FutureProducer, Producer},
};
use std::{sync::Arc, time::Duration};
use tokio::sync::RwLock;

/// One change to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub user_id: String,
    pub version: i64,
    /// The profile as the upstream wrote it (empty for a delete).
    pub profile: proto::JsonProfile,
    pub base_version: i64,
    pub lease_epoch: i64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The broker did not take the event.
    #[error("kafka delivery failed: {reason}")]
    Delivery { reason: String, retryable: bool },
}

impl Retryable for PublishError {
    fn is_retryable(&self) -> bool {
        matches!(
            self,
            PublishError::Delivery {
                retryable: true,
                ..
            }
        )
    }
}

impl PublishError {
    fn delivery(e: &KafkaError) -> Self {
        use rdkafka::types::RDKafkaErrorCode as C;
        let permanent = matches!(
            e.rdkafka_error_code(),
            Some(
                C::MessageSizeTooLarge
                    | C::InvalidMessage
                    | C::InvalidRecord
                    | C::InvalidMessageSize
            )
        );
        PublishError::Delivery {
            reason: e.to_string(),
            retryable: !permanent,
        }
    }
}

/// An item that could not be published, with what the dead-letter record needs.
#[derive(Debug)]
pub struct PublishFailure {
    pub error: PublishError,
    pub retries: u32,
    /// The encoded event (empty when encoding itself failed).
    pub event: Vec<u8>,
}

pub struct KafkaPublisher {
    producer: FutureProducer,
    static_topic: String,
    dynamic_topic: String,
    shared: Shared,
    hold: Arc<RwLock<()>>,
    restarts: u32,
}

impl KafkaPublisher {
    pub const NAME: &'static str = "KafkaPublisher";

    pub fn new(
        producer: FutureProducer,
        kafka: &crate::config::KafkaConfig,
        shared: Shared,
        hold: Arc<RwLock<()>>,
    ) -> Self {
        Self {
            producer,
            static_topic: kafka.static_topic.clone(),
            dynamic_topic: kafka.dynamic_topic.clone(),
            shared,
            hold,
            restarts: 0,
        }
    }
}

impl Actor for KafkaPublisher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        restart_pause(self.restarts, ctx);
    }
}

impl Supervised for KafkaPublisher {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.restarts += 1;
    }
}

/// One result per published item, in order.
pub type PublishResults = Vec<Result<Delivered, PublishFailure>>;

/// Publishes a batch; one result per item, in order. Items whose delivery
/// fails are re-sent per the retry policy; the rest are not held up by them.
#[derive(Message)]
#[rtype(result = "Result<PublishResults, StageError>")]
pub struct Publish {
    pub sync_type: SyncType,
    pub items: Vec<Outgoing>,
}

/// Builds the event for one change.
pub fn build_event(
    sync_type: SyncType,
    item: &Outgoing,
    instance_id: &str,
) -> UserProfileSyncEvent {
    UserProfileSyncEvent {
        user_id: item.user_id.clone(),
        sync_type: sync_type as i32,
        profile_data: proto::pack_json_profile(&item.profile),
        version: item.version,
        timestamp: crate::model::now_ms(),
        // The version is the flag's hybrid clock in microseconds.
        marked_at_ms: item.version / 1000,
        event_id: uuid::Uuid::new_v4().to_string(),
        source_instance: instance_id.to_string(),
        lease_epoch: item.lease_epoch,
        base_version: item.base_version,
    }
}

fn type_label(t: SyncType) -> &'static str {
    match t {
        SyncType::StaticImmediate => "static",
        SyncType::DynamicBatch => "dynamic",
        SyncType::UserDelete => "delete",
    }
}

impl Handler<Publish> for KafkaPublisher {
    type Result = ResponseActFuture<Self, Result<PublishResults, StageError>>;

    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) -> Self::Result {
        let producer = self.producer.clone();
        let topic = match msg.sync_type {
            SyncType::StaticImmediate => self.static_topic.clone(),
            // A delete shares the dynamic topic (and, keyed by user, its
            // partition) with the user's dynamic changes.
            SyncType::DynamicBatch | SyncType::UserDelete => self.dynamic_topic.clone(),
        };
        let shared = self.shared.clone();
        let hold = self.hold.clone();
        guard(Self::NAME, shared.stats.clone(), async move {
            shared.faults.check(Stage::Publisher);
            // Held only while an operator (or a test) pauses publishing.
            let _open = match hold.try_read() {
                Ok(g) => g,
                Err(_) => {
                    shared.stats.publish_held();
                    hold.read().await
                }
            };
            Ok(publish_all(&producer, &topic, msg, &shared).await)
        })
    }
}

/// Sends every item, then re-sends the ones that failed with a transient error,
/// per the retry policy. Marks Kafka down when retries run out on delivery
/// errors, up on any success.
async fn publish_all(
    producer: &FutureProducer,
    topic: &str,
    msg: Publish,
    shared: &Shared,
) -> PublishResults {
    let Publish { sync_type, items } = msg;
    let label = type_label(sync_type);
    // Each profile is dropped once encoded: only the key and the event wait
    // for the broker's reports (and a retry, or a dead letter).
    let (keys, events): (Vec<String>, Vec<Vec<u8>>) = items
        .into_iter()
        .map(|item| {
            let event = build_event(sync_type, &item, &shared.instance_id).encode_to_vec();
            (item.user_id, event)
        })
        .unzip();
    let mut results: Vec<Option<Result<Delivered, PublishError>>> =
        (0..keys.len()).map(|_| None).collect();
    let mut pending: Vec<usize> = (0..keys.len()).collect();
    let mut retries = 0;
    loop {
        let records = pending
            .iter()
            .map(|&i| (keys[i].as_str(), events[i].as_slice()));
        let outcomes = kafka::send_all(producer, topic, records).await;
        let mut again = Vec::new();
        let mut any_ok = false;
        for (&i, r) in pending.iter().zip(outcomes) {
            match r.map_err(|e| PublishError::delivery(&e)) {
                Ok(d) => {
                    any_ok = true;
                    results[i] = Some(Ok(d));
                }
                Err(e) if e.is_retryable() && retries < shared.retry.max_retries => {
                    results[i] = Some(Err(e));
                    again.push(i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if any_ok {
            shared.health.set_up(Backend::Kafka);
        }
        if again.is_empty() || shared.cancel.is_cancelled() {
            break;
        }
        let wait = shared.retry.delay(retries);
        tracing::warn!(
            failed = again.len(),
            retry = retries + 1,
            ?wait,
            "kafka delivery failed; retrying"
        );
        tokio::select! {
            _ = shared.cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        retries += 1;
        shared.stats.publish_retried(label, again.len() as u64);
        pending = again;
    }

    let ok = results.iter().filter(|r| matches!(r, Some(Ok(_)))).count() as u64;
    shared.stats.events_published(label, ok);
    let mut out = Vec::with_capacity(results.len());
    let mut gave_up = None;
    let mut failed = 0;
    let mut first_error = None;
    for (r, event) in results.into_iter().zip(events) {
        out.push(match r.expect("every item has a result") {
            Ok(d) => Ok(d),
            Err(error) => {
                failed += 1;
                first_error.get_or_insert_with(|| error.to_string());
                let retries = if error.is_retryable() { retries } else { 0 };
                if error.is_retryable() {
                    gave_up.get_or_insert_with(|| error.to_string());
                }
                Err(PublishFailure {
                    error,
                    retries,
                    event,
                })
            }
        });
    }
    if let Some(first) = first_error {
        shared.stats.publish_failed(label, failed, &first);
    }
    if let Some(reason) = gave_up {
        shared.health.set_down(Backend::Kafka, reason);
    }
    out
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
