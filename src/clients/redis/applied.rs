//! The L2 cache of applied versions: one hash per shard, `<user>|<s or d>` →
//! the last version MongoDB applied. Only ever raised.

use super::{RedisError, RedisStore, lua_script, section_field};
use crate::model::Section;
use fred::{prelude::*, types::scripts::Script};
use std::sync::LazyLock;

static APPLIED_MAX: LazyLock<Script> = lua_script!("applied_max.lua");

impl RedisStore {
    /// L2: the applied `(static, dynamic)` versions of users of one shard, in one
    /// HMGET (`None` = unknown).
    pub async fn applied_versions(
        &self,
        shard: u32,
        users: &[&str],
    ) -> Result<Vec<(Option<i64>, Option<i64>)>, RedisError> {
        if users.is_empty() {
            return Ok(vec![]);
        }
        let fields: Vec<String> = users
            .iter()
            .flat_map(|u| {
                [
                    section_field(u, Section::Static),
                    section_field(u, Section::Dynamic),
                ]
            })
            .collect();
        let raw: Vec<Option<i64>> = self
            .client()
            .hmget(self.keys.applied(shard), fields)
            .await?;
        Ok(raw.chunks(2).map(|p| (p[0], p[1])).collect())
    }

    /// L2: raises the applied versions of one shard.
    pub async fn raise_applied(
        &self,
        shard: u32,
        entries: &[(&str, Section, i64)],
    ) -> Result<(), RedisError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut args = Vec::with_capacity(entries.len() * 2);
        for (u, s, v) in entries {
            args.push(section_field(u, *s));
            args.push(v.to_string());
        }
        let _: i64 = APPLIED_MAX
            .evalsha_with_reload(self.client(), vec![self.keys.applied(shard)], args)
            .await?;
        Ok(())
    }
}
