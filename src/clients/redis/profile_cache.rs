//! The L2 cache of composed profiles (`GET /v1/profiles/{id}`), filled under a
//! placeholder so an invalidation during the composition drops the fill.

use super::{RedisError, RedisStore, lua_script};
use crate::shard::shard_of;
use fred::{prelude::*, types::scripts::Script};
use std::{sync::LazyLock, time::Duration};

static CACHE_FILL: LazyLock<Script> = lua_script!("cache_fill.lua");
static CACHE_LEASE: LazyLock<Script> = lua_script!("cache_lease.lua");

/// Values of profile-cache keys that mark a fill in progress start with this.
pub const CACHE_PLACEHOLDER: &str = "\u{1}fill:";

impl RedisStore {
    /// The cached composed profile of `user`, or a fill placeholder: `Ok(Some)`
    /// is a hit; `Ok(None)` means the caller placed `placeholder` and should
    /// fill with [`cache_fill`](Self::cache_fill).
    pub async fn cache_get_or_lease(
        &self,
        user: &str,
        placeholder: &str,
    ) -> Result<Option<String>, RedisError> {
        let key = self.keys.profile_cache(shard_of(user, self.shards), user);
        // A read has somewhere else to go (MongoDB): fail at once while the
        // connection is down instead of waiting for the reconnection.
        let current: Option<String> = super::eval(
            &CACHE_LEASE,
            self.fail_fast(Duration::from_secs(1)),
            vec![key],
            vec![placeholder.to_string(), "5000".into()],
        )
        .await?;
        Ok(current.filter(|c| c != placeholder && !c.starts_with(CACHE_PLACEHOLDER)))
    }

    /// Stores a composed profile if no invalidation happened since the lease.
    pub async fn cache_fill(
        &self,
        user: &str,
        placeholder: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, RedisError> {
        let key = self.keys.profile_cache(shard_of(user, self.shards), user);
        let n: i64 = CACHE_FILL
            .evalsha_with_reload(
                self.client(),
                vec![key],
                vec![
                    placeholder.to_string(),
                    value.to_string(),
                    ttl.as_millis().to_string(),
                ],
            )
            .await?;
        Ok(n == 1)
    }

    /// Drops cached composed profiles (after MongoDB changed).
    pub async fn cache_invalidate(&self, users: &[&str]) -> Result<(), RedisError> {
        // One DEL for all the keys (a shard's on a cluster): a pipeline of
        // one DEL a user cost a socket write a user, as fred flushes every
        // pipelined command, and thousands a window.
        let groups = self.slot_groups(self.by_shard(users.iter().copied()).into_iter().map(
            |(shard, idx)| {
                idx.iter()
                    .map(|&i| self.keys.profile_cache(shard, users[i]))
                    .collect()
            },
        ));
        let dels = groups.into_iter().map(|keys| async move {
            let _: i64 = self.client().del(keys).await?;
            Ok::<_, RedisError>(())
        });
        futures::future::try_join_all(dels).await?;
        Ok(())
    }
}
