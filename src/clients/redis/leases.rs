//! Shard leases (`token|epoch` with a TTL), their fencing epochs, and the
//! membership heartbeats the quotas are computed from.

use super::{RedisError, RedisStore, lua_script};
use fred::{
    prelude::*,
    types::{Value as RValue, scripts::Script},
};
use std::{sync::LazyLock, time::Duration};

static ACQUIRE: LazyLock<Script> = lua_script!("lease_acquire.lua", "clock.lua");
static RENEW: LazyLock<Script> = lua_script!("lease_renew.lua");
static RELEASE: LazyLock<Script> = lua_script!("lease_release.lua");

impl RedisStore {
    /// Tries to take a free lease; the new epoch, or `None` if it is held.
    pub async fn lease_acquire(
        &self,
        shard: u32,
        token: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, RedisError> {
        let e: i64 = ACQUIRE
            .evalsha_with_reload(
                self.client(),
                vec![self.keys.lease(shard), self.keys.epoch(shard)],
                vec![token.to_string(), ttl.as_millis().to_string()],
            )
            .await?;
        Ok((e > 0).then_some(e))
    }

    /// Extends a lease held as `value`; false if it is no longer held so.
    pub async fn lease_renew(
        &self,
        shard: u32,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, RedisError> {
        let n: i64 = RENEW
            .evalsha_with_reload(
                self.client(),
                vec![self.keys.lease(shard)],
                vec![value.to_string(), ttl.as_millis().to_string()],
            )
            .await?;
        Ok(n == 1)
    }

    /// Releases a lease held as `value`.
    pub async fn lease_release(&self, shard: u32, value: &str) -> Result<bool, RedisError> {
        let n: i64 = RELEASE
            .evalsha_with_reload(
                self.client(),
                vec![self.keys.lease(shard)],
                vec![value.to_string()],
            )
            .await?;
        Ok(n == 1)
    }

    /// Every shard's lease value and remaining TTL (ms), in one pipeline.
    pub async fn leases(&self) -> Result<Vec<(Option<String>, i64)>, RedisError> {
        let pipe = self.client().pipeline();
        for shard in 0..self.shards {
            let _: () = pipe.get(self.keys.lease(shard)).await?;
            let _: () = pipe.pttl(self.keys.lease(shard)).await?;
        }
        let replies: Vec<RValue> = pipe.all().await?;
        Ok(replies
            .chunks(2)
            .map(|p| (p[0].as_string(), p[1].as_i64().unwrap_or(-2)))
            .collect())
    }

    /// Records this instance's heartbeat, drops expired members, and returns
    /// the live members, sorted.
    pub async fn heartbeat(
        &self,
        instance: &str,
        ttl: Duration,
    ) -> Result<Vec<String>, RedisError> {
        let now = crate::model::now_ms();
        let key = self.keys.members();
        let pipe = self.client().pipeline();
        let _: () = pipe
            .zadd(
                &key,
                None,
                None,
                false,
                false,
                ((now + ttl.as_millis() as i64) as f64, instance),
            )
            .await?;
        let _: () = pipe
            .zremrangebyscore(&key, f64::NEG_INFINITY, now as f64)
            .await?;
        let _: () = pipe.zrange(&key, 0, -1, None, false, None, false).await?;
        let (_, _, mut members): (i64, i64, Vec<String>) = pipe.all().await?;
        members.sort();
        Ok(members)
    }

    /// Removes this instance from the members (graceful stop).
    pub async fn leave(&self, instance: &str) -> Result<(), RedisError> {
        let _: i64 = self.client().zrem(self.keys.members(), instance).await?;
        Ok(())
    }
}
