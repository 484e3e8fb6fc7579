//! Immediate (static) changes accepted and not yet settled in MongoDB: one
//! hash per shard, user → `<version>|<state>|<JSON>`, state `p` (published,
//! not acknowledged), `r` (put back in line by a redrive) or `a`
//! (acknowledged by the broker).

use super::{Delivery, RedisError, RedisStore, lua_script};
use crate::shard::shard_of;
use fred::{prelude::*, types::scripts::Script};
use std::{collections::BTreeMap, sync::LazyLock};

static STAGE_STATIC: LazyLock<Script> = lua_script!("stage_static.lua", "clock.lua");
static RESTAGE_STATIC: LazyLock<Script> = lua_script!("restage_static.lua", "clock.lua");
static STATIC_ACKED: LazyLock<Script> = lua_script!("static_acked.lua");
static STATIC_SETTLED: LazyLock<Script> =
    lua_script!("static_settled.lua", "close_dead_letter.lua");

/// Where an accepted immediate change stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingState {
    /// `p`: not yet acknowledged by the broker.
    Published,
    /// `r`: put back in line by a DLQ redrive; published at the next scan.
    Redriven,
    /// `a`: acknowledged by the broker, waiting for MongoDB.
    Acked,
}

/// An immediate change the broker has not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingStatic {
    pub user_id: String,
    pub version: i64,
    /// The static profile, a JSON object.
    pub json: String,
    /// Put back in line by a redrive: publish it without waiting.
    pub redriven: bool,
}

impl RedisStore {
    /// Accepts immediate changes of users' static profiles (`(user, JSON
    /// object)`), one script per shard; returns their versions in order.
    /// Sent within 2 s of the call or not at all (see
    /// `RedisStore::now_or_never`).
    pub async fn stage_static(&self, changes: &[(&str, String)]) -> Result<Vec<i64>, RedisError> {
        let users: Vec<&str> = changes.iter().map(|c| c.0).collect();
        self.allocate_versions(
            Delivery::NowOrNever,
            &STAGE_STATIC,
            &users,
            |shard| vec![self.keys.static_pending(shard)],
            |i| vec![changes[i].0.to_string(), changes[i].1.clone()],
        )
        .await
    }

    /// Immediate changes accepted on every shard and not yet settled in
    /// MongoDB, acknowledged by the broker or not; one pipeline.
    pub async fn count_static_pending(&self) -> Result<u64, RedisError> {
        let pipe = self.client().pipeline();
        for shard in 0..self.shards {
            let _: () = pipe.hlen(self.keys.static_pending(shard)).await?;
        }
        let counts: Vec<u64> = pipe.all().await?;
        Ok(counts.into_iter().sum())
    }

    /// Immediate changes of one shard the broker has not acknowledged.
    pub async fn static_pending(&self, shard: u32) -> Result<Vec<PendingStatic>, RedisError> {
        let map: BTreeMap<String, String> = self
            .client()
            .hgetall(self.keys.static_pending(shard))
            .await?;
        Ok(map
            .into_iter()
            .filter_map(|(user_id, v)| {
                let (version, state, json) = parse_pending(&v)?;
                (state != PendingState::Acked).then(|| PendingStatic {
                    user_id,
                    version,
                    json: json.to_string(),
                    redriven: state == PendingState::Redriven,
                })
            })
            .collect())
    }

    /// The accepted immediate change of one user not yet settled in MongoDB,
    /// acknowledged or not: `(version, JSON)`.
    pub async fn static_pending_of(&self, user: &str) -> Result<Option<(i64, String)>, RedisError> {
        let shard = shard_of(user, self.shards);
        let v: Option<String> = self
            .client()
            .hget(self.keys.static_pending(shard), user)
            .await?;
        Ok(v.and_then(|v| {
            let (version, _, json) = parse_pending(&v)?;
            Some((version, json.to_string()))
        }))
    }

    /// Marks immediate changes acknowledged by the broker: `(user, version)`.
    pub async fn static_acked(&self, entries: &[(&str, i64)]) -> Result<(), RedisError> {
        self.static_script(&STATIC_ACKED, entries, |shard| {
            vec![self.keys.static_pending(shard)]
        })
        .await
    }

    /// Drops immediate changes MongoDB has settled, and closes their static
    /// dead letters: `(user, version)`.
    pub async fn static_settled(&self, entries: &[(&str, i64)]) -> Result<(), RedisError> {
        self.static_script(&STATIC_SETTLED, entries, |shard| {
            vec![self.keys.static_pending(shard), self.keys.dlq(shard)]
        })
        .await
    }

    async fn static_script(
        &self,
        script: &Script,
        entries: &[(&str, i64)],
        keys: impl Fn(u32) -> Vec<String>,
    ) -> Result<(), RedisError> {
        for (shard, idx) in self.by_shard(entries.iter().map(|e| e.0)) {
            let mut args = Vec::with_capacity(idx.len() * 2);
            for &i in &idx {
                args.push(entries[i].0.to_string());
                args.push(entries[i].1.to_string());
            }
            let _: i64 = script
                .evalsha_with_reload(self.client(), keys(shard), args)
                .await?;
        }
        Ok(())
    }

    /// Puts users' pending immediate changes back in line for publishing with
    /// new versions (a DLQ redrive). One version per user, in order; `None`
    /// where the user has no pending change (it was applied or superseded).
    pub async fn restage_static(&self, users: &[&str]) -> Result<Vec<Option<i64>>, RedisError> {
        let versions = self
            .allocate_versions(
                Delivery::Queued,
                &RESTAGE_STATIC,
                users,
                |shard| vec![self.keys.static_pending(shard)],
                |i| vec![users[i].to_string()],
            )
            .await?;
        Ok(versions.into_iter().map(|v| (v > 0).then_some(v)).collect())
    }
}

/// `"<version>|<p, r or a>|<JSON>"` → (version, state, JSON).
fn parse_pending(v: &str) -> Option<(i64, PendingState, &str)> {
    let (version, rest) = v.split_once('|')?;
    let (state, json) = rest.split_once('|')?;
    let state = match state {
        "p" => PendingState::Published,
        "r" => PendingState::Redriven,
        "a" => PendingState::Acked,
        _ => return None,
    };
    Some((version.parse().ok()?, state, json))
}
