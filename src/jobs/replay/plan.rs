//! Planning a replay: the request checked field by field, its topic
//! resolved, and where its window starts and ends in each partition.

use super::{PartitionPlan, Replay};
use crate::{
    clients::{
        kafka::{self, PartitionBounds},
        redis::RedisStore,
    },
    config::KafkaConfig,
    model::{parse_time, rfc3339_ms, validate_user_ids},
    operations::ids_param,
};
use std::collections::BTreeMap;

/// A replay request, checked by [`plan`].
#[derive(Debug, Clone, Default)]
pub struct ReplayRequest {
    /// `dynamic`, `static` or a topic name.
    pub topic: String,
    pub from_time: Option<String>,
    pub to_time: Option<String>,
    pub from_offset: Option<i64>,
    pub to_offset: Option<i64>,
    pub partition: Option<i32>,
    pub user_ids: Option<Vec<String>>,
    pub dry_run: bool,
    pub target_collection: Option<String>,
    pub rate: Option<u64>,
}

impl ReplayRequest {
    /// The request as the operation log's parameters.
    pub fn params(&self, force: bool) -> serde_json::Value {
        serde_json::json!({
            "topic": self.topic,
            "from_time": self.from_time,
            "to_time": self.to_time,
            "from_offset": self.from_offset,
            "to_offset": self.to_offset,
            "partition": self.partition,
            "user_ids": self.user_ids.as_deref().map(ids_param),
            "dry_run": self.dry_run,
            "target_collection": self.target_collection,
            "rate": self.rate,
            "force": force,
        })
    }
}

/// Checks a request, resolves its topic and window per partition; an
/// error names the field.
pub async fn plan(
    kafka: &KafkaConfig,
    redis: &RedisStore,
    live_collection: &str,
    r: &ReplayRequest,
) -> Result<Replay, String> {
    if let Some(ids) = &r.user_ids {
        if ids.is_empty() {
            return Err(
                "user_ids: empty; leave it out to replay every user (or the whitelist's)".into(),
            );
        }
        validate_user_ids(ids.iter().map(String::as_str))?;
    }
    if r.rate == Some(0) {
        return Err("rate: must be at least 1".into());
    }
    let topic = match r.topic.as_str() {
        "dynamic" => kafka.dynamic_topic.clone(),
        "static" => kafka.static_topic.clone(),
        "" => return Err("topic: give `dynamic`, `static` or a topic name".into()),
        t => t.to_string(),
    };
    let time = |field: &str, v: &Option<String>| -> Result<Option<i64>, String> {
        v.as_deref()
            .map(|s| parse_time(s).map_err(|e| format!("{field}: {e}")))
            .transpose()
    };
    let (from_ms, to_ms) = (
        time("from_time", &r.from_time)?,
        time("to_time", &r.to_time)?,
    );
    if from_ms.is_some() && r.from_offset.is_some() {
        return Err("give either from_time or from_offset, not both".into());
    }
    if to_ms.is_some() && r.to_offset.is_some() {
        return Err("give either to_time or to_offset, not both".into());
    }
    if let (Some(f), Some(t)) = (from_ms, to_ms)
        && f > t
    {
        return Err("from_time: after to_time".into());
    }
    for (field, v) in [("from_offset", r.from_offset), ("to_offset", r.to_offset)] {
        if v.is_some_and(|o| o < 0) {
            return Err(format!("{field}: must be 0 or more"));
        }
    }
    if let (Some(f), Some(t)) = (r.from_offset, r.to_offset)
        && f > t
    {
        return Err("from_offset: after to_offset".into());
    }
    if (r.from_offset.is_some() || r.to_offset.is_some()) && r.partition.is_none() {
        return Err("partition: offsets belong to one partition; give it".into());
    }
    let collection = match &r.target_collection {
        None => live_collection.to_string(),
        Some(c) => {
            check_collection_name(c)?;
            c.clone()
        }
    };
    let bounds = kafka::partition_bounds(kafka, &topic, r.partition, from_ms).await?;
    let mut partitions = BTreeMap::new();
    for b in bounds {
        let (from, from_by) = start_of(redis, &topic, &b, r.from_offset, from_ms).await;
        let to = match (from, r.to_offset) {
            // No record is as new as from_time: nothing to read.
            (None, _) => Some(b.low),
            (Some(_), Some(o)) => Some(o + 1),
            (Some(_), None) => None,
        };
        let from = from.unwrap_or(b.low);
        partitions.insert(
            b.partition.to_string(),
            PartitionPlan {
                partition: b.partition,
                from,
                to,
                from_by: from_by.into(),
                position: from,
                done: to.is_some_and(|t| from >= t),
            },
        );
    }
    let mut replay = Replay {
        topic,
        from_time: from_ms.map(rfc3339_ms),
        to_time: to_ms.map(rfc3339_ms),
        from_offset: r.from_offset,
        to_offset: r.to_offset,
        partition: r.partition,
        filter: if r.user_ids.is_some() {
            "user_ids"
        } else {
            "whitelist"
        }
        .into(),
        user_ids: r.user_ids.clone(),
        dry_run: r.dry_run,
        collection,
        rate: r.rate,
        position: partitions
            .iter()
            .map(|(p, x)| (p.clone(), x.from))
            .collect(),
        partitions,
        read: 0,
        applied: 0,
        stale: 0,
        filtered: 0,
        outside_window: 0,
        errors: 0,
        last_error: None,
        events_per_s: 0.0,
    };
    replay.note_positions();
    Ok(replay)
}

/// Where a partition's window starts (`None`: no record is new enough),
/// and how that was found.
async fn start_of(
    redis: &RedisStore,
    topic: &str,
    b: &PartitionBounds,
    from_offset: Option<i64>,
    from_ms: Option<i64>,
) -> (Option<i64>, &'static str) {
    if let Some(o) = from_offset {
        return (Some(o.max(b.low)), "offset");
    }
    let Some(ms) = from_ms else {
        return (Some(b.low), "beginning");
    };
    match &b.at_time {
        Some(Ok(o)) => (*o, "time"),
        _ => match redis.offset_ranges(topic, b.partition).await {
            // The first range with a record at or after the time; the
            // records before the time in it are skipped while reading. An
            // index without such a range may have lost it (a crash before a
            // flush): read from the beginning rather than skip records.
            Ok(ranges) => match ranges.iter().find(|r| r.last_ms >= ms) {
                Some(r) => (Some(r.start.max(b.low)), "index"),
                None => (Some(b.low), "beginning"),
            },
            Err(_) => (Some(b.low), "beginning"),
        },
    }
}

/// MongoDB's rules for collection names, and ours: not a system
/// collection.
fn check_collection_name(c: &str) -> Result<(), String> {
    let bad = c.is_empty()
        || c.len() > 120
        || c.starts_with("system.")
        || c.contains('$')
        || c.contains('\0');
    if bad {
        return Err(format!(
            "target_collection: `{c}` is not a usable collection name (1–120 characters, no `$`, not `system.*`)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_names_are_checked() {
        assert!(check_collection_name("rebuild_1").is_ok());
        for bad in ["", "system.users", "a$b"] {
            assert!(
                check_collection_name(bad)
                    .unwrap_err()
                    .contains("target_collection"),
                "{bad}"
            );
        }
    }
}
