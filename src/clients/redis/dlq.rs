//! Open dead-letter entries: one hash per shard, `<user>|<s or d>` → the
//! entry's JSON. Closed by the flag clear and the static settle scripts, or by
//! a redrive.

use super::{RedisError, RedisStore, parse_section_field, section_field};
use crate::model::Section;
use fred::prelude::*;
use std::collections::BTreeMap;

impl RedisStore {
    /// The stored dead-letter entries (JSON) of `(user, section)` pairs, `None`
    /// where none is open.
    pub async fn dlq_entries(
        &self,
        keys: &[(&str, Section)],
    ) -> Result<Vec<Option<String>>, RedisError> {
        let mut out = vec![None; keys.len()];
        for (shard, idx) in self.by_shard(keys.iter().map(|k| k.0)) {
            let fields: Vec<String> = idx
                .iter()
                .map(|&i| section_field(keys[i].0, keys[i].1))
                .collect();
            let got: Vec<Option<String>> = if fields.len() == 1 {
                vec![self.client().hget(self.keys.dlq(shard), &fields[0]).await?]
            } else {
                self.client().hmget(self.keys.dlq(shard), fields).await?
            };
            for (i, v) in idx.into_iter().zip(got) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Opens (or replaces) dead-letter entries: `(user, section, JSON)`.
    pub async fn dlq_put(&self, entries: &[(&str, Section, String)]) -> Result<(), RedisError> {
        for (shard, idx) in self.by_shard(entries.iter().map(|e| e.0)) {
            let map: Vec<(String, &str)> = idx
                .iter()
                .map(|&i| {
                    let (u, s, json) = &entries[i];
                    (section_field(u, *s), json.as_str())
                })
                .collect();
            let _: i64 = self.client().hset(self.keys.dlq(shard), map).await?;
        }
        Ok(())
    }

    /// Closes dead-letter entries `(user, section)`; returns how many were open.
    /// Closing a dynamic entry also closes the user's entry in the one-field-
    /// per-user form of earlier releases.
    pub async fn dlq_remove(&self, keys: &[(&str, Section)]) -> Result<u64, RedisError> {
        let mut n = 0;
        for (shard, idx) in self.by_shard(keys.iter().map(|k| k.0)) {
            let mut fields = Vec::with_capacity(idx.len());
            for &i in &idx {
                let (u, s) = keys[i];
                fields.push(section_field(u, s));
                if s == Section::Dynamic {
                    fields.push(u.to_string());
                }
            }
            let removed: u64 = self.client().hdel(self.keys.dlq(shard), fields).await?;
            n += removed;
        }
        Ok(n)
    }

    /// Open dead letters per shard, in one pipeline.
    pub async fn dlq_counts(&self) -> Result<Vec<u64>, RedisError> {
        let pipe = self.client().pipeline();
        for shard in 0..self.shards {
            let _: () = pipe.hlen(self.keys.dlq(shard)).await?;
        }
        Ok(pipe.all().await?)
    }

    /// Every open dead letter of one shard: `(user, section, JSON)`.
    pub async fn dlq_shard(
        &self,
        shard: u32,
    ) -> Result<Vec<(String, Section, String)>, RedisError> {
        let map: BTreeMap<String, String> = self.client().hgetall(self.keys.dlq(shard)).await?;
        Ok(map
            .into_iter()
            .map(|(field, json)| {
                let (user, section) = parse_section_field(&field);
                (user.to_string(), section, json)
            })
            .collect())
    }
}
