//! The whitelist: a set of user ids and a version counter raised by every
//! change (`scripts/whitelist_change.lua`), which every instance polls.

use super::{RedisError, RedisStore, lua_script};
use fred::{prelude::*, types::scripts::Script};
use std::sync::LazyLock;

static WHITELIST_CHANGE: LazyLock<Script> = lua_script!("whitelist_change.lua");

/// What a whitelist change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhitelistChange {
    /// Ids added or removed, and the size after.
    Changed { changed: u64, size: u64 },
    /// Adding would pass the limit; nothing changed.
    Full { size: u64 },
}

impl RedisStore {
    /// Adds (`add`) or removes user ids; at most `max` entries in all.
    pub async fn whitelist_change(
        &self,
        add: bool,
        ids: &[String],
        max: usize,
    ) -> Result<WhitelistChange, RedisError> {
        let mut args = vec![
            if add { "add" } else { "remove" }.to_string(),
            max.to_string(),
        ];
        args.extend(ids.iter().cloned());
        let (changed, size): (i64, u64) = WHITELIST_CHANGE
            .evalsha_with_reload(
                self.client(),
                vec![self.keys.whitelist(), self.keys.whitelist_version()],
                args,
            )
            .await?;
        Ok(if changed < 0 {
            WhitelistChange::Full { size }
        } else {
            WhitelistChange::Changed {
                changed: changed as u64,
                size,
            }
        })
    }

    /// The whitelist's version (0 before any change).
    pub async fn whitelist_version(&self) -> Result<i64, RedisError> {
        let v: Option<i64> = self.client().get(self.keys.whitelist_version()).await?;
        Ok(v.unwrap_or(0))
    }

    /// The whitelisted ids.
    pub async fn whitelist_ids(&self) -> Result<Vec<String>, RedisError> {
        Ok(self.client().smembers(self.keys.whitelist()).await?)
    }
}
