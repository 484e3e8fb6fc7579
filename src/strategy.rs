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
//! A strategy sees only a [`SyncContext`], the two doors into the pipeline
//! that the engine builds: a new data class or target is a new strategy, and
//! one can be written outside this crate.

use crate::{
    actors::static_path::StaticPath,
    clients::redis::RedisStore,
    error::EngineError,
    model::{Marked, ProfileWrite, validate_user_ids, validate_writes},
    profiles::ProfileReader,
    proto::SyncType,
    telemetry::Stats,
};
use futures::future::BoxFuture;
use std::sync::Arc;

pub use crate::model::Receipt;

/// The doors into the pipeline a strategy may use. Built by the engine.
pub struct SyncContext {
    pub(crate) redis: RedisStore,
    pub(crate) profiles: Arc<ProfileReader>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) static_path: StaticPath,
}

impl SyncContext {
    /// Flags users whose profiles are already in Redis: one version each from
    /// their shard clocks.
    pub async fn mark(&self, user_ids: &[String]) -> Result<Vec<Marked>, EngineError> {
        validate_user_ids(user_ids.iter().map(String::as_str)).map_err(EngineError::Invalid)?;
        self.mark_valid(user_ids).await
    }

    async fn mark_valid(&self, user_ids: &[String]) -> Result<Vec<Marked>, EngineError> {
        let marked = self.redis.mark(user_ids).await?;
        // The mark script dropped the shared L2 entries; drop ours too.
        for u in user_ids {
            self.profiles.invalidate_local(u).await;
        }
        self.stats.flags_marked(marked.len() as u64);
        Ok(marked
            .into_iter()
            .map(|(user_id, version)| Marked { user_id, version })
            .collect())
    }

    /// Deletes users: their Redis profiles go, and a delete is flagged with
    /// a version from each user's shard clock; the applier turns their
    /// documents into tombstones. A change newer than the delete brings a
    /// user back.
    pub async fn delete(&self, user_ids: &[String]) -> Result<Vec<Marked>, EngineError> {
        validate_user_ids(user_ids.iter().map(String::as_str)).map_err(EngineError::Invalid)?;
        let deleted = self.redis.delete(user_ids).await?;
        for u in user_ids {
            self.profiles.invalidate_local(u).await;
        }
        self.stats.users_deleted(deleted.len() as u64);
        Ok(deleted
            .into_iter()
            .map(|(user_id, version)| Marked { user_id, version })
            .collect())
    }

    /// Writes each profile to Redis, then flags it. Nothing is written unless
    /// every entry is valid; if flagging fails the call fails, so the caller
    /// retries (the profiles written are simply written again).
    pub async fn write_and_mark(&self, users: &[ProfileWrite]) -> Result<Vec<Marked>, EngineError> {
        validate_writes(users).map_err(EngineError::Invalid)?;
        let writes: Vec<(String, String)> = users
            .iter()
            .map(|u| (u.user_id.clone(), u.profile.to_string()))
            .collect();
        self.redis.write_profiles(&writes).await?;
        let ids: Vec<String> = users.iter().map(|u| u.user_id.clone()).collect();
        self.mark_valid(&ids).await
    }

    /// Accepts static changes (durable and versioned first, one script per
    /// shard), publishes them to the static topic and waits for the broker.
    /// Answers a receipt per change, or [`EngineError::NotPublished`] naming
    /// the first change Kafka did not take (all of them stay pending and are
    /// published once Kafka answers).
    pub async fn publish_static(
        &self,
        users: &[ProfileWrite],
    ) -> Result<Vec<Receipt>, EngineError> {
        validate_writes(users).map_err(EngineError::Invalid)?;
        let started = std::time::Instant::now();
        let items = self.static_path.stage(users).await?;
        for u in users {
            self.profiles.invalidate_local(&u.user_id).await;
        }
        let versions: Vec<(String, i64)> = items
            .iter()
            .map(|i| (i.user_id.clone(), i.version))
            .collect();
        let results = self.static_path.publish(items).await?;
        let mut receipts = Vec::with_capacity(users.len());
        let mut failed = None;
        for ((user_id, version), r) in versions.into_iter().zip(results) {
            match r {
                Ok(d) => receipts.push(Receipt {
                    user_id,
                    version,
                    topic: Some(self.static_path.topic.clone()),
                    partition: Some(d.partition),
                    offset: Some(d.offset),
                }),
                Err(f) => {
                    failed.get_or_insert((version, f.error.to_string()));
                }
            }
        }
        if !receipts.is_empty() {
            self.stats.immediate_acked(started.elapsed().as_secs_f64());
        }
        match failed {
            Some((version, reason)) => Err(EngineError::NotPublished { version, reason }),
            None => Ok(receipts),
        }
    }
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
        ctx: &'a SyncContext,
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
        ctx: &'a SyncContext,
        users: &'a [ProfileWrite],
    ) -> BoxFuture<'a, Result<Vec<Receipt>, EngineError>> {
        Box::pin(async move {
            Ok(ctx
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
        ctx: &'a SyncContext,
        users: &'a [ProfileWrite],
    ) -> BoxFuture<'a, Result<Vec<Receipt>, EngineError>> {
        Box::pin(ctx.publish_static(users))
    }
}
