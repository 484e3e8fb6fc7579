//! The offset-range index: per topic partition, the ranges of offsets the
//! applier applied, with their first and last record times, in a sorted set
//! scored by start offset (`scripts/offsets_add.lua`), and the bounded
//! cleanup of old ranges (`scripts/offsets_trim.lua`).

use super::{RedisError, RedisStore, lua_script};
use crate::offsets::OffsetRange;
use fred::{prelude::*, types::scripts::Script};
use std::{collections::BTreeMap, sync::LazyLock};

static OFFSETS_ADD: LazyLock<Script> = lua_script!("offsets_add.lua");
static OFFSETS_TRIM: LazyLock<Script> = lua_script!("offsets_trim.lua");

/// Ranges sent per script call.
const RANGES_PER_CALL: usize = 500;

impl RedisStore {
    /// Stores ranges, merging any that overlap stored ones.
    pub async fn offsets_add(&self, ranges: &[OffsetRange]) -> Result<(), RedisError> {
        let mut by_partition: BTreeMap<(&str, i32), Vec<&OffsetRange>> = BTreeMap::new();
        for r in ranges {
            by_partition
                .entry((r.topic.as_str(), r.partition))
                .or_default()
                .push(r);
        }
        for ((topic, partition), ranges) in by_partition {
            for chunk in ranges.chunks(RANGES_PER_CALL) {
                let mut args = Vec::with_capacity(1 + chunk.len() * 4);
                args.push(format!("{topic}:{partition}"));
                for r in chunk {
                    args.extend([r.start, r.end, r.first_ms, r.last_ms].map(|n| n.to_string()));
                }
                let _: i64 = OFFSETS_ADD
                    .evalsha_with_reload(
                        self.client(),
                        vec![
                            self.keys.offsets(topic, partition),
                            self.keys.offsets_index(),
                        ],
                        args,
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// The topic partitions that have ranges, sorted.
    pub async fn offset_partitions(&self) -> Result<Vec<(String, i32)>, RedisError> {
        let members: Vec<String> = self.client().smembers(self.keys.offsets_index()).await?;
        let mut out: Vec<(String, i32)> = members
            .iter()
            .filter_map(|m| {
                let (t, p) = m.rsplit_once(':')?;
                Some((t.to_string(), p.parse().ok()?))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// A partition's ranges, in offset order.
    pub async fn offset_ranges(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<Vec<OffsetRange>, RedisError> {
        let members: Vec<String> = self
            .client()
            .zrange(
                self.keys.offsets(topic, partition),
                0,
                -1,
                None,
                false,
                None,
                false,
            )
            .await?;
        members
            .iter()
            .map(|m| {
                OffsetRange::parse(topic, partition, m).ok_or_else(|| RedisError::Reply {
                    what: "an offset range",
                    reply: m.clone(),
                })
            })
            .collect()
    }

    /// Deletes at most `batch` of a partition's oldest ranges whose last
    /// record is older than `cutoff_ms`; answers how many went and whether
    /// the batch was full (call again).
    pub async fn offsets_trim(
        &self,
        topic: &str,
        partition: i32,
        cutoff_ms: i64,
        batch: usize,
    ) -> Result<(u64, bool), RedisError> {
        let (deleted, more): (u64, i64) = OFFSETS_TRIM
            .evalsha_with_reload(
                self.client(),
                vec![
                    self.keys.offsets(topic, partition),
                    self.keys.offsets_index(),
                ],
                vec![
                    cutoff_ms.to_string(),
                    batch.to_string(),
                    format!("{topic}:{partition}"),
                ],
            )
            .await?;
        Ok((deleted, more == 1))
    }
}
