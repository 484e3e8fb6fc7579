//! Dirty flags: marking (a version per user from the shard's clock), reading a
//! shard's flags oldest-first, and clearing them by compare-and-delete.

use super::{RedisError, RedisStore, lua_script};
use crate::shard::shard_of;
use fred::{prelude::*, types::scripts::Script};
use std::sync::LazyLock;

static MARK: LazyLock<Script> = lua_script!("mark.lua", "clock.lua");
static CLEAR: LazyLock<Script> = lua_script!("clear_flags.lua", "close_dead_letter.lua");

impl RedisStore {
    /// Flags users dirty, allocating a version for each; one script per shard,
    /// all shards at once. Returns `(user, version)` in input order.
    pub async fn mark(&self, users: &[String]) -> Result<Vec<(String, i64)>, RedisError> {
        let ids: Vec<&str> = users.iter().map(String::as_str).collect();
        let versions = self
            .allocate_versions(
                &MARK,
                &ids,
                |shard| vec![self.keys.dirty(shard)],
                |i| vec![users[i].clone()],
            )
            .await?;
        Ok(users.iter().cloned().zip(versions).collect())
    }

    /// The oldest flags of a shard with a version above `after`.
    pub async fn read_flags(
        &self,
        shard: u32,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, RedisError> {
        let min = match after {
            Some(v) => format!("({v}"),
            None => "-inf".to_string(),
        };
        let raw: Vec<(String, f64)> = self
            .client()
            .zrangebyscore(
                self.keys.dirty(shard),
                min.as_str(),
                "+inf",
                true,
                Some((0, limit as i64)),
            )
            .await?;
        Ok(raw.into_iter().map(|(u, s)| (u, s as i64)).collect())
    }

    /// How many flags the given shards hold, in one pipeline.
    pub async fn count_flags(
        &self,
        shards: impl IntoIterator<Item = u32>,
    ) -> Result<u64, RedisError> {
        Ok(self.flag_counts(shards).await?.into_iter().sum())
    }

    /// How many flags each of the given shards holds, in order; one pipeline.
    pub async fn flag_counts(
        &self,
        shards: impl IntoIterator<Item = u32>,
    ) -> Result<Vec<u64>, RedisError> {
        let pipe = self.client().pipeline();
        for shard in shards {
            let _: () = pipe.zcard(self.keys.dirty(shard)).await?;
        }
        Ok(pipe.all().await?)
    }

    /// Compare-and-delete of a shard's flags. Returns how many were removed.
    /// With a `fence` (the lease value the caller holds), nothing is removed
    /// unless the caller still holds the shard's lease.
    pub async fn clear_flags(
        &self,
        shard: u32,
        flags: &[(String, i64)],
        fence: Option<&str>,
    ) -> Result<u64, RedisError> {
        if flags.is_empty() {
            return Ok(0);
        }
        let mut args = Vec::with_capacity(flags.len() * 2 + 1);
        args.push(fence.unwrap_or_default().to_string());
        for (u, v) in flags {
            args.push(u.clone());
            args.push(v.to_string());
        }
        let n: i64 = CLEAR
            .evalsha_with_reload(
                self.client(),
                vec![
                    self.keys.dirty(shard),
                    self.keys.dlq(shard),
                    self.keys.lease(shard),
                ],
                args,
            )
            .await?;
        if n < 0 {
            return Err(RedisError::Fenced { shard });
        }
        Ok(n as u64)
    }

    /// The flag versions of users (any shards), pipelined; `None` where a
    /// user is not flagged.
    pub async fn flags_of(&self, users: &[String]) -> Result<Vec<Option<i64>>, RedisError> {
        if users.is_empty() {
            return Ok(vec![]);
        }
        let pipe = self.client().pipeline();
        for u in users {
            let _: () = pipe
                .zscore(self.keys.dirty(shard_of(u, self.shards)), u.as_str())
                .await?;
        }
        let v: Vec<Option<f64>> = pipe.all().await?;
        Ok(v.into_iter().map(|v| v.map(|v| v as i64)).collect())
    }

    /// Flags of one shard older than `before` (a version): how many, and the
    /// oldest `limit` users.
    pub async fn flags_before(
        &self,
        shard: u32,
        before: i64,
        limit: usize,
    ) -> Result<(u64, Vec<String>), RedisError> {
        let key = self.keys.dirty(shard);
        let max = format!("({before}");
        let n: u64 = self
            .client()
            .zcount(&key, f64::NEG_INFINITY, before as f64 - 1.0)
            .await?;
        let users: Vec<String> = self
            .client()
            .zrangebyscore(&key, "-inf", max.as_str(), false, Some((0, limit as i64)))
            .await?;
        Ok((n, users))
    }

    /// The flag version of a user, if it is flagged.
    pub async fn flag_of(&self, user: &str) -> Result<Option<i64>, RedisError> {
        let shard = shard_of(user, self.shards);
        let v: Option<f64> = self.client().zscore(self.keys.dirty(shard), user).await?;
        Ok(v.map(|v| v as i64))
    }
}
