//! The seed's legacy flag set (`SADD profile:dirty_flags <id>`), drained into
//! the sharded flags: popped into a sorted set under a pop id, flagged, then
//! acknowledged by compare-and-delete on that id.

use super::{RedisError, RedisStore, lua_script};
use fred::{
    prelude::*,
    types::{Value as RValue, scripts::Script},
};
use std::{sync::LazyLock, time::Duration};

static LEGACY_POP: LazyLock<Script> = lua_script!("legacy_pop.lua", "clock.lua");
static LEGACY_ACK: LazyLock<Script> = lua_script!("legacy_ack.lua");
static LEGACY_STALE: LazyLock<Script> = lua_script!("legacy_stale.lua", "clock.lua");

/// Members moved out of the legacy set by one pop, each with its pop id.
pub type LegacyPop = Vec<(String, i64)>;

impl RedisStore {
    /// Moves up to `n` members of the legacy set into the popped set; the pop
    /// id and the members. Acknowledge them with [`legacy_ack`](Self::legacy_ack)
    /// once they are flagged.
    pub async fn legacy_pop(&self, n: usize) -> Result<LegacyPop, RedisError> {
        let keys = vec![
            self.keys.legacy().to_string(),
            self.keys.legacy_popped(),
            self.keys.legacy_pop_clock(),
        ];
        let (id, members): (String, Vec<String>) = LEGACY_POP
            .evalsha_with_reload(self.client(), keys, vec![n as i64])
            .await?;
        let id = id.parse().map_err(|_| RedisError::Reply {
            what: "legacy pop",
            reply: id.clone(),
        })?;
        Ok(members.into_iter().map(|m| (m, id)).collect())
    }

    /// Up to `n` popped members left unacknowledged for longer than `after` (by
    /// a drainer that died between pop and ack), with their pop ids.
    pub async fn legacy_unacked(&self, n: usize, after: Duration) -> Result<LegacyPop, RedisError> {
        let keys = vec![self.keys.legacy_popped(), self.keys.legacy_draining()];
        let flat: Vec<String> = LEGACY_STALE
            .evalsha_with_reload(
                self.client(),
                keys,
                vec![after.as_micros().to_string(), n.to_string()],
            )
            .await?;
        flat.chunks(2)
            .map(|p| match p {
                [m, s] => s
                    .parse::<f64>()
                    .map(|s| (m.clone(), s as i64))
                    .map_err(|_| RedisError::Reply {
                        what: "popped legacy members",
                        reply: s.clone(),
                    }),
                _ => Err(RedisError::Reply {
                    what: "popped legacy members",
                    reply: format!("{p:?}"),
                }),
            })
            .collect()
    }

    /// Acknowledges flagged members: removes each one only if it still carries
    /// the pop id it was taken with. Returns how many were removed.
    pub async fn legacy_ack(&self, popped: &[(String, i64)]) -> Result<u64, RedisError> {
        if popped.is_empty() {
            return Ok(0);
        }
        let mut args = Vec::with_capacity(popped.len() * 2);
        for (m, id) in popped {
            args.push(m.clone());
            args.push(id.to_string());
        }
        let n: i64 = LEGACY_ACK
            .evalsha_with_reload(self.client(), vec![self.keys.legacy_popped()], args)
            .await?;
        Ok(n as u64)
    }

    /// Adds users to the legacy set, as the seed's upstream does.
    pub async fn legacy_add(&self, users: &[String]) -> Result<(), RedisError> {
        if users.is_empty() {
            return Ok(());
        }
        let _: i64 = self
            .client()
            .sadd(self.keys.legacy(), users.to_vec())
            .await?;
        Ok(())
    }

    /// Members waiting in the legacy set plus those popped and not yet
    /// acknowledged, in one pipeline.
    pub async fn legacy_pending(&self) -> Result<u64, RedisError> {
        let pipe = self.client().pipeline();
        let _: () = pipe.scard(self.keys.legacy()).await?;
        let _: () = pipe.zcard(self.keys.legacy_popped()).await?;
        let _: () = pipe.scard(self.keys.legacy_draining()).await?;
        let counts: Vec<RValue> = pipe.all().await?;
        Ok(counts.iter().filter_map(RValue::as_u64).sum())
    }
}
