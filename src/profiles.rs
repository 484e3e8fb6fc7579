//! Profile reads (`GET /v1/profiles/{id}`): the freshest composed profile of a
//! user, served through a Moka L1 (this process) and a Redis L2 (shared).
//!
//! A composed profile is the MongoDB document, overlaid with what is newer and
//! not yet applied: the Redis dynamic profile of a user still flagged with a
//! newer version, and an accepted immediate (static) change still pending.
//!
//! Invalidation: marking a user, accepting an immediate change and applying a
//! write all delete the user's L2 entry (the mark and the immediate change in the
//! same Lua script that versions them). A miss fills L2 with a placeholder-guarded
//! write (the memcache "lease" pattern): if anything invalidated the entry while
//! the profile was being composed, the fill is dropped, so a stale composition is
//! never cached. The L1 of this process is invalidated by its own writes; other
//! processes' L1 entries live at most `cache.profile_l1_ttl` (default 1 s).
//!
//! A deleted user (a tombstone in MongoDB, or a delete recorded in Redis and
//! not yet applied) has no profile: reads answer none, unless a change newer
//! than the delete brought the user back.
//!
//! While Redis is unreachable (seed 002's fallback), reads are served from
//! MongoDB alone and marked `possibly_stale`: changes accepted but not yet
//! applied are missing. Such answers are not cached; once Redis is back, the
//! next read composes and caches as usual.

use crate::{
    clients::{
        mongo::{MongoError, MongoStore},
        redis::{CACHE_PLACEHOLDER, RedisError, RedisStore},
    },
    model::fields,
    proto::bson_to_json,
    retry::Retryable,
};
use moka::future::Cache;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum ProfileReadError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Mongo(#[from] MongoError),
}

/// A user's profile as the freshest sources have it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComposedProfile {
    pub user_id: String,
    pub static_profile: Value,
    pub static_version: i64,
    pub dynamic_profile: Value,
    pub dynamic_version: i64,
    /// Changes applied to MongoDB so far (the seed's `dataVersion`).
    pub data_version: i64,
    /// Sections taken from Redis because MongoDB does not have them yet.
    pub pending: Vec<String>,
    /// Redis was unreachable: this is MongoDB's document alone, and changes
    /// not yet applied are missing from it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub possibly_stale: bool,
}

impl ComposedProfile {
    /// No section: an unknown user, or a deleted one (a tombstone).
    fn is_empty(&self) -> bool {
        self.static_profile.is_null() && self.dynamic_profile.is_null()
    }
}

/// Hit counters of the profile caches.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct ProfileCacheStats {
    pub l1_hits: u64,
    pub l2_hits: u64,
    pub misses: u64,
    /// (L1 + L2 hits) / reads; 0 before the first read.
    pub hit_rate: f64,
    pub l1_entries: u64,
    /// Reads served from MongoDB alone while Redis was unreachable.
    #[serde(default)]
    pub stale_reads: u64,
}

pub struct ProfileReader {
    l1: Cache<String, Arc<ComposedProfile>>,
    redis: RedisStore,
    mongo: MongoStore,
    l2_ttl: Duration,
    /// L1 hits, L2 hits, misses, reads served from MongoDB alone.
    counts: [AtomicU64; 4],
}

impl ProfileReader {
    pub fn new(c: &crate::config::CacheConfig, redis: RedisStore, mongo: MongoStore) -> Self {
        Self {
            l1: Cache::builder()
                .max_capacity(c.profile_l1_capacity)
                .time_to_live(c.profile_l1_ttl)
                .build(),
            redis,
            mongo,
            l2_ttl: c.profile_l2_ttl,
            counts: Default::default(),
        }
    }

    pub fn stats(&self) -> ProfileCacheStats {
        let [l1, l2, miss, stale] = [0, 1, 2, 3].map(|i| self.counts[i].load(Relaxed));
        let reads = l1 + l2 + miss;
        ProfileCacheStats {
            l1_hits: l1,
            l2_hits: l2,
            misses: miss,
            hit_rate: if reads == 0 {
                0.0
            } else {
                (l1 + l2) as f64 / reads as f64
            },
            l1_entries: self.l1.entry_count(),
            stale_reads: stale,
        }
    }

    /// The composed profile of `user`, `None` if no source knows the user.
    /// While Redis is unreachable, MongoDB's document alone, marked
    /// `possibly_stale`.
    pub async fn get(&self, user: &str) -> Result<Option<Arc<ComposedProfile>>, ProfileReadError> {
        match self.get_composed(user).await {
            Err(ProfileReadError::Redis(e)) if e.is_retryable() => {
                tracing::debug!(error = %e, "redis unreachable; profile read served from mongodb");
                self.counts[3].fetch_add(1, Relaxed);
                Ok(self
                    .from_mongo(user)
                    .await?
                    .filter(|p| !p.is_empty())
                    .map(|mut p| {
                        p.possibly_stale = true;
                        Arc::new(p)
                    }))
            }
            other => other,
        }
    }

    async fn get_composed(
        &self,
        user: &str,
    ) -> Result<Option<Arc<ComposedProfile>>, ProfileReadError> {
        if let Some(p) = self.l1.get(user).await {
            self.counts[0].fetch_add(1, Relaxed);
            return Ok(Some(p));
        }
        let placeholder = format!("{CACHE_PLACEHOLDER}{}", uuid::Uuid::new_v4().simple());
        if let Some(json) = self.redis.cache_get_or_lease(user, &placeholder).await?
            && let Ok(p) = serde_json::from_str::<ComposedProfile>(&json)
        {
            self.counts[1].fetch_add(1, Relaxed);
            let p = Arc::new(p);
            self.l1.insert(user.to_string(), p.clone()).await;
            return Ok(Some(p));
        }
        self.counts[2].fetch_add(1, Relaxed);
        let Some(p) = self.compose(user).await? else {
            return Ok(None);
        };
        let json = serde_json::to_string(&p).expect("profiles serialize");
        let p = Arc::new(p);
        if self
            .redis
            .cache_fill(user, &placeholder, &json, self.l2_ttl)
            .await?
        {
            self.l1.insert(user.to_string(), p.clone()).await;
        }
        Ok(Some(p))
    }

    /// MongoDB's document as a composed profile (no Redis overlay).
    async fn from_mongo(&self, user: &str) -> Result<Option<ComposedProfile>, ProfileReadError> {
        let Some(d) = self.mongo.find_user(user).await? else {
            return Ok(None);
        };
        let field = |k: &str| d.get(k).map(bson_to_json).unwrap_or(Value::Null);
        let num = |k: &str| d.get(k).and_then(|b| b.as_i64()).unwrap_or(0);
        Ok(Some(ComposedProfile {
            user_id: user.to_string(),
            static_profile: field(fields::STATIC_PROFILE),
            static_version: num(fields::STATIC_VERSION),
            dynamic_profile: field(fields::DYNAMIC_PROFILE),
            dynamic_version: num(fields::DYNAMIC_VERSION),
            data_version: num(fields::DATA_VERSION),
            pending: Vec::new(),
            possibly_stale: false,
        }))
    }

    async fn compose(&self, user: &str) -> Result<Option<ComposedProfile>, ProfileReadError> {
        let doc = self.from_mongo(user).await?;
        let mut p = doc.unwrap_or_else(|| ComposedProfile {
            user_id: user.to_string(),
            static_profile: Value::Null,
            static_version: 0,
            dynamic_profile: Value::Null,
            dynamic_version: 0,
            data_version: 0,
            pending: Vec::new(),
            possibly_stale: false,
        });
        let (delete, flag) = tokio::join!(
            self.redis.recorded_delete_of(user),
            self.redis.flag_of(user)
        );
        // A delete not yet applied hides every section older than it.
        if let Some(d) = delete? {
            if d > p.static_version {
                p.static_profile = Value::Null;
                p.static_version = d;
            }
            if d > p.dynamic_version {
                p.dynamic_profile = Value::Null;
                p.dynamic_version = d;
            }
        }
        if let Some(v) = flag?
            && v > p.dynamic_version
            && let Some(Ok(raw)) = self.redis.load_profiles(&[user.to_string()]).await?.pop()
            && let Ok(json) = raw.to_json(&self.redis.keys().profile(user))
        {
            p.dynamic_profile = json;
            p.dynamic_version = v;
            p.pending.push("dynamic".into());
        }
        if let Some((v, json)) = self.redis.static_pending_of(user).await?
            && v > p.static_version
            && let Ok(value) = serde_json::from_str::<Value>(&json)
        {
            p.static_profile = value;
            p.static_version = v;
            p.pending.push("static".into());
        }
        Ok((!p.is_empty()).then_some(p))
    }

    /// Drops this process's L1 entry of `user`.
    pub async fn invalidate_local(&self, user: &str) {
        self.l1.invalidate(user).await;
    }

    /// Drops the L1 and L2 entries of `users` (after MongoDB changed).
    pub async fn invalidate(&self, users: &[&str]) -> Result<(), RedisError> {
        for u in users {
            self.l1.invalidate(*u).await;
        }
        self.redis.cache_invalidate(users).await
    }
}
