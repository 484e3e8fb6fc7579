//! The applied-version cache: Moka L1 (this process) → Redis L2 (shared) →
//! with `cache.mongo_fallback`, MongoDB (one `$in` query per batch of misses).
//!
//! Versions only grow, so a cached value can only be too low, never too high: a
//! stale entry causes at worst an extra publish that MongoDB drops as stale, never
//! a skipped change.
//!
//! L2 holds every version the primary sink applied (it is raised after each
//! window and never expires), so a user it does not know was never applied,
//! unless L2 itself was lost: Redis restarted without its append-only file
//! (which loses the flags too), or a raise failed. The MongoDB lookup covers
//! that case and costs a query per page of users L2 does not know, which is
//! every page of new users; without it such a user counts as never applied,
//! and a change already applied is at worst published again and found
//! stale. Off by default: on the local MongoDB-wire server the lookups of a
//! backlog of new users took half the machine's CPU during the publish
//! stage.

use crate::{
    clients::{
        mongo::{MongoError, MongoStore},
        redis::{RedisError, RedisStore},
    },
    model::Section,
    shard::shard_of,
};
use foldhash::{HashMap, HashMapExt, quality::RandomState};
use moka::future::Cache;
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Mongo(#[from] MongoError),
}

impl crate::retry::Retryable for CacheError {
    fn is_retryable(&self) -> bool {
        match self {
            CacheError::Redis(e) => e.is_retryable(),
            CacheError::Mongo(e) => e.is_retryable(),
        }
    }
}

/// Applied versions per user: `(static, dynamic)`.
#[derive(Clone)]
pub struct AppliedCache {
    l1: Cache<String, (i64, i64), RandomState>,
    redis: RedisStore,
    mongo: MongoStore,
    /// Users L2 does not know are looked up in MongoDB.
    mongo_fallback: bool,
    hits: Arc<[AtomicU64; 3]>,
}

/// Where lookups were answered.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, PartialEq, Eq)]
pub struct CacheStats {
    pub l1_hits: u64,
    pub l2_hits: u64,
    pub mongo_lookups: u64,
}

fn pick(v: (i64, i64), s: Section) -> i64 {
    match s {
        Section::Static => v.0,
        Section::Dynamic => v.1,
    }
}

fn raise(v: (i64, i64), s: Section, version: i64) -> (i64, i64) {
    match s {
        Section::Static => (v.0.max(version), v.1),
        Section::Dynamic => (v.0, v.1.max(version)),
    }
}

impl AppliedCache {
    pub fn new(
        capacity: u64,
        ttl: Duration,
        redis: RedisStore,
        mongo: MongoStore,
        mongo_fallback: bool,
    ) -> Self {
        Self {
            l1: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build_with_hasher(RandomState::default()),
            redis,
            mongo,
            mongo_fallback,
            hits: Arc::new(Default::default()),
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            l1_hits: self.hits[0].load(Relaxed),
            l2_hits: self.hits[1].load(Relaxed),
            mongo_lookups: self.hits[2].load(Relaxed),
        }
    }

    /// The last applied version of `section` for each user (0 = never applied).
    pub async fn resolve(
        &self,
        users: &[String],
        section: Section,
    ) -> Result<HashMap<String, i64>, CacheError> {
        let mut out = HashMap::with_capacity(users.len());
        let mut misses: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
        for u in users {
            match self.l1.get(u).await {
                Some(v) => {
                    out.insert(u.clone(), pick(v, section));
                }
                None => misses
                    .entry(shard_of(u, self.redis.shards()))
                    .or_default()
                    .push(u),
            }
        }
        self.hits[0].fetch_add(out.len() as u64, Relaxed);
        if misses.is_empty() {
            return Ok(out);
        }

        let l2 = futures::future::try_join_all(
            misses
                .iter()
                .map(|(&shard, users)| self.redis.applied_versions(shard, users)),
        )
        .await?;
        let mut from_mongo = Vec::new();
        for ((_, users), versions) in misses.iter().zip(l2) {
            for (u, known) in users.iter().zip(versions) {
                match known {
                    (None, None) if self.mongo_fallback => from_mongo.push(*u),
                    // Never applied (see the module's notes); not cached, so
                    // the L1 holds only users something is known of.
                    (None, None) => {
                        out.insert(u.to_string(), 0);
                    }
                    (s, d) => {
                        let v = (s.unwrap_or(0), d.unwrap_or(0));
                        self.hits[1].fetch_add(1, Relaxed);
                        self.l1.insert(u.to_string(), v).await;
                        out.insert(u.to_string(), pick(v, section));
                    }
                }
            }
        }
        if from_mongo.is_empty() {
            return Ok(out);
        }

        self.hits[2].fetch_add(from_mongo.len() as u64, Relaxed);
        let found = self.mongo.versions(&from_mongo).await?;
        let mut l2_fill: BTreeMap<u32, Vec<(&str, Section, i64)>> = BTreeMap::new();
        for u in from_mongo {
            let v = found.get(u).copied().unwrap_or((0, 0));
            self.l1.insert(u.to_string(), v).await;
            out.insert(u.to_string(), pick(v, section));
            if v != (0, 0) {
                let e = l2_fill.entry(shard_of(u, self.redis.shards())).or_default();
                e.push((u, Section::Static, v.0));
                e.push((u, Section::Dynamic, v.1));
            }
        }
        for (shard, entries) in l2_fill {
            self.redis.raise_applied(shard, &entries).await?;
        }
        Ok(out)
    }

    /// Records versions now known to be applied (L1 and L2; both only rise).
    pub async fn record_applied(&self, entries: &[(&str, Section, i64)]) -> Result<(), CacheError> {
        let mut by_shard: BTreeMap<u32, Vec<(&str, Section, i64)>> = BTreeMap::new();
        for &(u, s, v) in entries {
            let key = u.to_string();
            if let Some(cur) = self.l1.get(&key).await {
                self.l1.insert(key, raise(cur, s, v)).await;
            }
            by_shard
                .entry(shard_of(u, self.redis.shards()))
                .or_default()
                .push((u, s, v));
        }
        futures::future::try_join_all(
            by_shard
                .iter()
                .map(|(&shard, e)| self.redis.raise_applied(shard, e)),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_only_moves_its_section_up() {
        assert_eq!(raise((5, 7), Section::Static, 9), (9, 7));
        assert_eq!(raise((5, 7), Section::Static, 3), (5, 7));
        assert_eq!(raise((5, 7), Section::Dynamic, 8), (5, 8));
        assert_eq!(pick((5, 7), Section::Dynamic), 7);
    }
}
