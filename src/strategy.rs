//! How a change enters the pipeline (seed 000's `ProfileSyncStrategy`).
//!
//! - [`BatchSync`] (dynamic data: behaviour, counters, tags): the profile is
//!   written to Redis and the user flagged; the ShardScanner publishes it on its
//!   next pass.
//! - [`ImmediateSync`] (critical static data: VIP status, permission level,
//!   bans, important preferences): the change is accepted in Redis with a version
//!   from the user's shard clock, published to the static topic at once, and the
//!   call returns when the broker acknowledged it. If the broker cannot be
//!   reached after the retry policy, the call fails with the reason, a dead
//!   letter is recorded, and the accepted change stays pending in Redis; the
//!   scanner publishes it once Kafka is back, so it is never lost.
//!
//! A new data class or target is a new strategy; the actors do not change.

use crate::{
    actors::{
        ask,
        dlq::{DeadLetter, Record},
        publisher::{KafkaPublisher, Outgoing, Publish},
    },
    engine::{Engine, EngineError, ProfileWrite},
    proto::SyncType,
};
use futures::future::BoxFuture;
use serde::Serialize;

/// What became of one accepted change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Receipt {
    pub user_id: String,
    pub version: i64,
    /// Where the broker stored it (immediate strategy only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
}

/// One way of syncing a class of profile data.
pub trait SyncStrategy: Send + Sync {
    /// The strategy's name in logs and metrics.
    fn name(&self) -> &'static str;

    /// The kind of event it produces.
    fn sync_type(&self) -> SyncType;

    /// Accepts `users`' changes; one receipt per user, in order. Input is
    /// validated before anything is written.
    fn submit<'a>(
        &'a self,
        engine: &'a Engine,
        users: &'a [ProfileWrite],
    ) -> BoxFuture<'a, Result<Vec<Receipt>, EngineError>>;
}

/// Dynamic data: write to Redis, flag, let the scanner batch it.
pub struct BatchSync;

impl SyncStrategy for BatchSync {
    fn name(&self) -> &'static str {
        "batch"
    }

    fn sync_type(&self) -> SyncType {
        SyncType::DynamicBatch
    }

    fn submit<'a>(
        &'a self,
        engine: &'a Engine,
        users: &'a [ProfileWrite],
    ) -> BoxFuture<'a, Result<Vec<Receipt>, EngineError>> {
        Box::pin(async move {
            Ok(engine
                .write_and_mark(users)
                .await?
                .into_iter()
                .map(|m| Receipt {
                    user_id: m.user_id,
                    version: m.version,
                    topic: None,
                    partition: None,
                    offset: None,
                })
                .collect())
        })
    }
}

/// Critical static data: publish now, answer after the broker's ack.
pub struct ImmediateSync;

impl SyncStrategy for ImmediateSync {
    fn name(&self) -> &'static str {
        "immediate"
    }

    fn sync_type(&self) -> SyncType {
        SyncType::StaticImmediate
    }

    fn submit<'a>(
        &'a self,
        engine: &'a Engine,
        users: &'a [ProfileWrite],
    ) -> BoxFuture<'a, Result<Vec<Receipt>, EngineError>> {
        Box::pin(async move {
            crate::engine::validate_writes(users)?;
            let started = std::time::Instant::now();
            let parts = engine.parts();
            // Accept every change first (durable, versioned; one script per
            // shard), then publish.
            let changes: Vec<(&str, String)> = users
                .iter()
                .map(|u| (u.user_id.as_str(), u.profile.to_string()))
                .collect();
            let versions = parts.redis.stage_static(&changes).await?;
            let mut items = Vec::with_capacity(users.len());
            for (u, version) in users.iter().zip(&versions) {
                parts.profiles.invalidate_local(&u.user_id).await;
                let profile = match crate::proto::json_to_bson(&u.profile) {
                    mongodb::bson::Bson::Document(d) => d,
                    _ => unreachable!("validated as an object"),
                };
                items.push(Outgoing {
                    user_id: u.user_id.clone(),
                    version: *version,
                    profile,
                    base_version: 0,
                    lease_epoch: 0,
                });
            }
            let publish = Publish {
                sync_type: SyncType::StaticImmediate,
                items,
            };
            let results = ask(KafkaPublisher::NAME, &parts.publisher, publish).await?;
            let mut receipts = Vec::with_capacity(users.len());
            let mut done = Vec::new();
            let mut dead = Vec::new();
            for ((u, version), r) in users.iter().zip(versions).zip(results) {
                match r {
                    Ok(d) => {
                        done.push((u.user_id.as_str(), version));
                        receipts.push(Receipt {
                            user_id: u.user_id.clone(),
                            version,
                            topic: Some(parts.static_topic.clone()),
                            partition: Some(d.partition),
                            offset: Some(d.offset),
                        });
                    }
                    Err(f) => dead.push((
                        version,
                        DeadLetter {
                            user_id: u.user_id.clone(),
                            version,
                            stage: "immediate",
                            sync_type: "static",
                            original_event: f.event,
                            error: f.error.to_string(),
                            detail: format!(
                                "stage immediate: {:?}; version {version}; {} retries; kept pending in Redis and published by the scanner once Kafka answers",
                                f.error, f.retries
                            ),
                            retry_count: f.retries,
                            topic: parts.static_topic.clone(),
                            partition: None,
                            offset: None,
                        },
                    )),
                }
            }
            if !done.is_empty() {
                parts.stats.immediate_acked(started.elapsed().as_secs_f64());
            }
            parts.redis.static_acked(&done).await?;
            if let Some((version, first)) = dead.first().cloned() {
                let reason = first.error.clone();
                let letters = dead.into_iter().map(|(_, l)| l).collect();
                if let Err(e) = ask(
                    crate::actors::dlq::DlqActor::NAME,
                    &parts.dlq,
                    Record(letters),
                )
                .await
                {
                    tracing::warn!(error = %e, "cannot record the dead letters of immediate changes");
                }
                return Err(EngineError::NotPublished { version, reason });
            }
            Ok(receipts)
        })
    }
}
