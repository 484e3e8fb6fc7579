//! The one flow of an immediate (static) change, from acceptance to the
//! broker's ack: stage (a version from the shard clock, kept pending in
//! Redis) → publish to the static topic → mark acknowledged → dead-letter
//! what Kafka would not take. The immediate API runs all of it; the scanner
//! runs the publishing half for changes still pending (unacknowledged, or put
//! back in line by a redrive).

use super::{
    StageError, ask,
    dlq::{DlqActor, Record},
    publisher::{KafkaPublisher, Outgoing, Publish, PublishResults},
};
use crate::{
    clients::redis::{PendingStatic, RedisStore},
    model::{DeadLetter, DlqStage, ProfileWrite, Section},
};
use actix::Addr;

/// What the static flow needs; cheap to clone.
#[derive(Clone)]
pub struct StaticPath {
    pub redis: RedisStore,
    pub publisher: Addr<KafkaPublisher>,
    pub dlq: Addr<DlqActor>,
    pub topic: String,
}

impl StaticPath {
    /// Accepts changes (validated JSON objects): versions from the shard
    /// clocks, kept pending in Redis. One item per change, in order.
    pub async fn stage(&self, changes: &[ProfileWrite]) -> Result<Vec<Outgoing>, StageError> {
        let staged: Vec<(&str, String)> = changes
            .iter()
            .map(|c| (c.user_id.as_str(), c.profile.to_string()))
            .collect();
        let versions = self.redis.stage_static(&staged).await?;
        Ok(changes
            .iter()
            .zip(versions)
            .filter_map(|(c, version)| match &c.profile {
                serde_json::Value::Object(profile) => Some(Outgoing {
                    user_id: c.user_id.clone(),
                    version,
                    profile: profile.clone(),
                    base_version: 0,
                    lease_epoch: 0,
                }),
                _ => None,
            })
            .collect())
    }

    /// The pending changes of a shard as items to publish, with the lease
    /// epoch of the scanner that republishes them. Entries whose JSON no
    /// longer parses as an object are skipped (they were validated on entry).
    pub fn items(pending: Vec<PendingStatic>, lease_epoch: i64) -> Vec<Outgoing> {
        pending
            .into_iter()
            .filter_map(|c| {
                let serde_json::Value::Object(profile) = serde_json::from_str(&c.json).ok()? else {
                    return None;
                };
                Some(Outgoing {
                    user_id: c.user_id,
                    version: c.version,
                    profile,
                    base_version: 0,
                    lease_epoch,
                })
            })
            .collect()
    }

    /// Publishes staged changes to the static topic, marks the delivered ones
    /// acknowledged, and records a dead letter for each one Kafka would not
    /// take (it stays pending, so the scanner publishes it again later). One
    /// result per item, in order.
    pub async fn publish(&self, items: Vec<Outgoing>) -> Result<PublishResults, StageError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<(String, i64)> = items
            .iter()
            .map(|i| (i.user_id.clone(), i.version))
            .collect();
        let publish = Publish {
            sync_type: Section::Static.sync_type(),
            items,
        };
        let results = ask(KafkaPublisher::NAME, &self.publisher, publish).await?;
        let mut acked = Vec::new();
        let mut dead = Vec::new();
        for ((user_id, version), r) in keys.iter().zip(&results) {
            match r {
                Ok(_) => acked.push((user_id.as_str(), *version)),
                Err(f) => dead.push(DeadLetter {
                    user_id: user_id.clone(),
                    version: *version,
                    stage: DlqStage::Immediate,
                    section: Section::Static,
                    delete: false,
                    original_event: f.event.clone(),
                    error: f.error.to_string(),
                    detail: format!(
                        "stage immediate: {:?}; version {version}; {} retries; kept pending in Redis and published by the scanner once Kafka answers",
                        f.error, f.retries
                    ),
                    retry_count: f.retries,
                    topic: self.topic.clone(),
                    partition: None,
                    offset: None,
                    sink: None,
                }),
            }
        }
        self.redis.static_acked(&acked).await?;
        if !dead.is_empty() {
            // The changes stay pending whatever happens here; a failure to
            // record only loses the dead-letter record, which the next
            // republishing attempt writes again.
            if let Err(e) = ask(DlqActor::NAME, &self.dlq, Record(dead)).await {
                tracing::warn!(error = %e, "cannot record the dead letters of immediate changes");
            }
        }
        Ok(results)
    }
}
