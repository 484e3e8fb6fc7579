//! Replay (seed 004 §3): re-applies a window of a sync topic, chosen by
//! time or by offset, to MongoDB (or to another collection, to rebuild it),
//! for every user, the ones named, or the whitelist's.
//!
//! A replay reads with a consumer of its own: partitions assigned with
//! explicit offsets, nothing committed, no group joined (so the live
//! applier's offsets never move and no group is left on the broker; the
//! group id librdkafka needs is removed at the end anyway). Windows go
//! through the applier's own collapse and MongoDB's newer-wins statements,
//! so a replay can never regress newer data: older events come back stale.
//!
//! The window: `from_offset` / `to_offset` (inclusive), or `from_time` /
//! `to_time` (record times, inclusive). A start time is found with the
//! broker's time index (`offsets_for_times`), falling back to the
//! offset-range index; records before it are skipped as outside the window,
//! so the answer is exact even where the broker's lookup is coarse. A
//! partition ends at its first record after `to_time`, after `to_offset`, or
//! where its records end when the replay reaches it (the consumer's
//! end-of-partition event; the broker's high watermark is not trusted). Positions are checkpointed
//! after every window, so a replay whose instance died is resumed.

use super::{JobState, Pacer, Runner, pause, seconds_since};
use crate::{
    actors::applier::{Record, collapse},
    clients::{
        kafka::{self, PartitionBounds},
        mongo::{Change, MongoError, MongoStore, Op, Outcome},
        redis::{Checkpoint, RedisStore},
    },
    config::KafkaConfig,
    model::{Section, now_ms, parse_time},
    profiles::ProfileReader,
    retry::RetryConfig,
    telemetry::Stats,
    whitelist::UserFilter,
};
use rdkafka::{
    Message as _, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    error::KafkaError,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};
use tokio_util::sync::CancellationToken;

pub const KIND: &str = "replay";

/// A window closes when no record came for this long (or when it is full,
/// or every partition is done).
const WINDOW_IDLE: Duration = Duration::from_secs(1);

/// One partition's part of a replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionPlan {
    pub partition: i32,
    /// First offset to read.
    pub from: i64,
    /// First offset not to read (the window's end, exclusive); `None` =
    /// the partition's end as it is when the replay reaches it.
    pub to: Option<i64>,
    /// How `from` was found: `offset`, `time` (the broker's time index),
    /// `index` (the offset-range index) or `beginning`.
    pub from_by: String,
    /// Next offset to read.
    pub position: i64,
    pub done: bool,
}

/// A replay's parameters and progress (the job record's body).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replay {
    /// The topic read (its name).
    pub topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_offset: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_offset: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    /// The users a request named (else the whitelist applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_ids: Option<Vec<String>>,
    /// `user_ids`, or `whitelist` (an empty whitelist lets every user by).
    pub filter: String,
    pub dry_run: bool,
    /// The collection written; the live one unless a rebuild asked for
    /// another.
    pub collection: String,
    /// Events read per second at most; `None` = no limit.
    #[serde(default)]
    pub rate: Option<u64>,
    /// The plan per partition, keyed by partition number (JSON object keys
    /// are strings).
    pub partitions: BTreeMap<String, PartitionPlan>,
    /// Next offset to read per partition.
    pub position: BTreeMap<String, i64>,
    /// Records read from the broker.
    pub read: u64,
    /// Changes written (in a dry run: that would be written).
    pub applied: u64,
    /// Changes older than what MongoDB holds, or superseded in their window.
    pub stale: u64,
    /// Records of users the filter left out.
    pub filtered: u64,
    /// Records before `from_time`.
    pub outside_window: u64,
    /// Records that do not decode and changes MongoDB refused.
    pub errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Records read per second since the replay started.
    #[serde(default)]
    pub events_per_s: f64,
}

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

/// Checks a request, resolves its topic and window per partition; an
/// error names the field.
pub async fn plan(
    kafka: &KafkaConfig,
    redis: &RedisStore,
    live_collection: &str,
    r: &ReplayRequest,
) -> Result<Replay, String> {
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
    Ok(Replay {
        topic,
        from_time: from_ms.map(crate::model::rfc3339_ms),
        to_time: to_ms.map(crate::model::rfc3339_ms),
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
    })
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

/// What a replay run needs besides its record.
pub struct Context {
    pub redis: RedisStore,
    /// The live collection's store (`with_collection` for a rebuild).
    pub mongo: MongoStore,
    pub kafka: KafkaConfig,
    /// The consumer group's name, made unique per replay.
    pub group: String,
    pub instance_id: String,
    pub filter: UserFilter,
    /// Cached profiles to drop when the live collection changed.
    pub profiles: Option<Arc<ProfileReader>>,
    pub stats: Option<Arc<Stats>>,
    pub retry: RetryConfig,
    pub cancel: CancellationToken,
    pub window_events: usize,
}

/// The filter a replay record asks for.
pub fn filter_of(r: &Replay, whitelist: Option<Arc<crate::whitelist::Whitelist>>) -> UserFilter {
    match (&r.user_ids, whitelist) {
        (Some(ids), _) => UserFilter::Only(Arc::new(ids.iter().cloned().collect())),
        (None, Some(w)) => UserFilter::Whitelist(w),
        (None, None) => UserFilter::All,
    }
}

/// Runs (or resumes) a replay until it is done, cancelled, taken over, or
/// the engine stops (then it stays `running` and is resumed from its
/// positions). `progress` sees the record after every window.
pub async fn run(
    mut runner: Runner<Replay>,
    cx: Context,
    mut progress: impl FnMut(&Replay),
) -> Option<super::Job<Replay>> {
    let group = format!("{}-{}", cx.group, runner.job.id);
    let consumer = match assign(&cx, &group, &runner.job.body) {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("cannot start the replay consumer: {e}");
            return finish(runner, &cx, &group, JobState::Failed, Some(msg)).await;
        }
    };
    let target = if runner.job.body.collection == cx.mongo.collection_name() {
        cx.mongo.clone()
    } else {
        cx.mongo.with_collection(&runner.job.body.collection)
    };
    // The unique index the newer-wins upserts rely on (a lost collection
    // lost it too).
    if !runner.job.body.dry_run
        && let Err(e) = target.ensure_index().await
    {
        let msg = format!("cannot create the indexes of {}: {e}", target.namespace());
        return finish(runner, &cx, &group, JobState::Failed, Some(msg)).await;
    }
    let live = target.collection_name() == cx.mongo.collection_name();
    let from_ms = runner
        .job
        .body
        .from_time
        .as_deref()
        .and_then(|t| parse_time(t).ok());
    let to_ms = runner
        .job
        .body
        .to_time
        .as_deref()
        .and_then(|t| parse_time(t).ok());
    let pacer = Pacer::new(runner.job.body.rate.unwrap_or(0));
    let read_at_start = runner.job.body.read;
    // A dry run's view of the versions its earlier windows would have
    // written, so its counts match a real run's.
    let mut overlay: HashMap<String, (i64, i64)> = HashMap::new();
    loop {
        if runner.job.body.partitions.values().all(|p| p.done) {
            return finish(runner, &cx, &group, JobState::Done, None).await;
        }
        let Some(window) = gather(&consumer, &cx, &mut runner.job.body, from_ms, to_ms).await
        else {
            return None; // stopping: resumed from the last checkpoint
        };
        let r = &mut runner.job.body;
        if !window.is_empty() {
            let c = collapse(&window);
            let superseded: u64 = c.superseded.iter().map(|(_, n)| n).sum();
            let mut errors = c.poison.len() as u64;
            if let Some((_, _, e)) = c.poison.last() {
                r.last_error = Some(e.clone());
            }
            let mut attempt = 0;
            let outcomes = loop {
                let written = if r.dry_run {
                    predict(&target, &c.changes, &mut overlay).await
                } else {
                    target.apply(&c.changes).await
                };
                match written {
                    Ok(o) => break o,
                    Err(e) => {
                        let wait = cx.retry.delay(attempt);
                        tracing::warn!(error = %e, retry_in = ?wait, "replay window not written; retrying");
                        if !pause(&cx.cancel, wait).await {
                            return None;
                        }
                        attempt += 1;
                    }
                }
            };
            let (mut applied, mut stale) = (0, superseded);
            let mut touched = Vec::new();
            for (change, o) in c.changes.iter().zip(&outcomes) {
                match o {
                    Outcome::Applied => {
                        applied += 1;
                        touched.push(change.user_id.as_str());
                    }
                    Outcome::Stale => stale += 1,
                    Outcome::Rejected(e) => {
                        errors += 1;
                        r.last_error = Some(format!("user `{}`: {e}", change.user_id));
                    }
                }
            }
            if live
                && !r.dry_run
                && let Some(p) = &cx.profiles
                && let Err(e) = p.invalidate(&touched).await
            {
                tracing::debug!(error = %e, "cannot invalidate cached profiles after a replay window");
            }
            r.applied += applied;
            r.stale += stale;
            r.errors += errors;
            if let Some(s) = &cx.stats {
                s.replayed(applied, stale, 0, errors);
            }
        }
        let elapsed = seconds_since(&runner.job.created_at).max(0.001);
        runner.job.body.events_per_s = runner.job.body.read as f64 / elapsed;
        progress(&runner.job.body);
        match runner.save().await {
            Ok(Checkpoint::Saved) => {}
            Ok(Checkpoint::CancelRequested) => {
                return finish(runner, &cx, &group, JobState::Cancelled, None).await;
            }
            Ok(Checkpoint::Lost) => {
                tracing::warn!(id = %runner.job.id, "replay taken over by another instance; stopping here");
                return None;
            }
            Err(e) => tracing::warn!(id = %runner.job.id, error = %e, "replay checkpoint failed"),
        }
        let wait = pacer.wait_for(runner.job.body.read - read_at_start);
        if !pause(&cx.cancel, wait).await {
            return None;
        }
    }
}

/// A consumer assigned to every unfinished partition at its position.
fn assign(cx: &Context, group: &str, r: &Replay) -> Result<StreamConsumer, KafkaError> {
    let consumer = kafka::replay_consumer(&cx.kafka, group, &cx.instance_id)?;
    let mut tpl = TopicPartitionList::new();
    for plan in r.partitions.values().filter(|x| !x.done) {
        tpl.add_partition_offset(&r.topic, plan.partition, Offset::Offset(plan.position))?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// Reads the next window: up to `window_events` records of the filter's
/// users inside the time window, until no record came for [`WINDOW_IDLE`].
/// Moves positions and marks partitions done. `None` when the engine stops.
async fn gather(
    consumer: &StreamConsumer,
    cx: &Context,
    r: &mut Replay,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
) -> Option<Vec<Record>> {
    let mut window = Vec::new();
    while window.len() < cx.window_events && !r.partitions.values().all(|p| p.done) {
        let m = tokio::select! {
            _ = cx.cancel.cancelled() => return None,
            _ = tokio::time::sleep(WINDOW_IDLE) => break,
            m = consumer.recv() => m,
        };
        let m = match m {
            Ok(m) => m,
            Err(KafkaError::PartitionEOF(p)) => {
                if let Some(plan) = r.partitions.get_mut(&p.to_string()) {
                    plan.done = true;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "replay consumer error");
                continue;
            }
        };
        let p = m.partition();
        let Some(plan) = r.partitions.get_mut(&p.to_string()) else {
            continue;
        };
        if plan.done || m.offset() < plan.position {
            continue;
        }
        if plan.to.is_some_and(|t| m.offset() >= t) {
            plan.done = true;
            continue;
        }
        let ms = m.timestamp().to_millis().unwrap_or_else(now_ms);
        if to_ms.is_some_and(|t| ms > t) {
            plan.done = true;
            continue;
        }
        plan.position = m.offset() + 1;
        plan.done = plan.to.is_some_and(|t| plan.position >= t);
        r.position.insert(p.to_string(), plan.position);
        r.read += 1;
        if from_ms.is_some_and(|f| ms < f) {
            r.outside_window += 1;
            continue;
        }
        let user = m
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or("");
        if !cx.filter.allows(user) {
            r.filtered += 1;
            if let Some(s) = &cx.stats {
                s.replayed(0, 0, 1, 0);
            }
            continue;
        }
        window.push(Record {
            topic: m.topic().to_string(),
            partition: p,
            offset: m.offset(),
            timestamp_ms: ms,
            payload: m.payload().unwrap_or_default().to_vec(),
        });
    }
    Some(window)
}

/// What a write of `changes` would do, by MongoDB's newer-wins rules, from
/// the stored versions and those earlier windows of the dry run would have
/// written (`overlay`, updated).
async fn predict(
    target: &MongoStore,
    changes: &[Change],
    overlay: &mut HashMap<String, (i64, i64)>,
) -> Result<Vec<Outcome>, MongoError> {
    let missing: Vec<&str> = changes
        .iter()
        .map(|c| c.user_id.as_str())
        .filter(|u| !overlay.contains_key(*u))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if !missing.is_empty() {
        let stored = target.versions(&missing).await?;
        for u in missing {
            overlay.insert(u.to_string(), stored.get(u).copied().unwrap_or((0, 0)));
        }
    }
    Ok(changes
        .iter()
        .map(|c| {
            let v = overlay.get_mut(&c.user_id).expect("filled above");
            if would_apply(v, c) {
                Outcome::Applied
            } else {
                Outcome::Stale
            }
        })
        .collect())
}

/// Whether `c` changes a document whose versions are `(static, dynamic)`,
/// and the versions after it: a section change applies over an older
/// section; a delete over any older section, raising both.
fn would_apply(v: &mut (i64, i64), c: &Change) -> bool {
    match (&c.op, c.section) {
        (Op::Set(_), Section::Static) if v.0 < c.version => v.0 = c.version,
        (Op::Set(_), Section::Dynamic) if v.1 < c.version => v.1 = c.version,
        (Op::Delete, _) if v.0 < c.version || v.1 < c.version => {
            *v = (v.0.max(c.version), v.1.max(c.version));
        }
        _ => return false,
    }
    true
}

async fn finish(
    runner: Runner<Replay>,
    cx: &Context,
    group: &str,
    state: JobState,
    error: Option<String>,
) -> Option<super::Job<Replay>> {
    if let Err(e) = kafka::delete_group(&cx.kafka, group).await {
        tracing::debug!(error = %e, %group, "cannot remove the replay's consumer group");
    }
    let id = runner.job.id.clone();
    match runner.finish(state, error).await {
        Ok(job) => {
            let r = &job.body;
            tracing::info!(%id, state = ?job.state, read = r.read, applied = r.applied, stale = r.stale, filtered = r.filtered, errors = r.errors, "replay finished");
            Some(job)
        }
        Err(e) => {
            tracing::warn!(%id, error = %e, "cannot record the end of a replay");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    fn change(section: Section, version: i64, op: Op) -> Change {
        Change {
            user_id: "u".into(),
            section,
            version,
            op,
            event_id: String::new(),
            marked_at_ms: 0,
        }
    }

    #[test]
    fn predictions_follow_the_newer_wins_rules() {
        let set = || Op::Set(doc! {});
        let mut v = (0, 0);
        assert!(would_apply(&mut v, &change(Section::Dynamic, 5, set())));
        assert!(!would_apply(&mut v, &change(Section::Dynamic, 5, set())));
        assert!(would_apply(&mut v, &change(Section::Static, 3, set())));
        assert_eq!(v, (3, 5));
        // A delete at 4 beats the static section only, and raises it.
        assert!(would_apply(
            &mut v,
            &change(Section::Dynamic, 4, Op::Delete)
        ));
        assert_eq!(v, (4, 5));
        assert!(!would_apply(&mut v, &change(Section::Static, 4, set())));
        assert!(!would_apply(
            &mut v,
            &change(Section::Dynamic, 4, Op::Delete)
        ));
        assert!(would_apply(
            &mut v,
            &change(Section::Dynamic, 5, Op::Delete)
        ));
        assert_eq!(v, (5, 5));
    }

    #[test]
    fn records_read_back_from_their_json() {
        let plan = PartitionPlan {
            partition: 3,
            from: 1,
            to: Some(9),
            from_by: "offset".into(),
            position: 4,
            done: false,
        };
        let body = Replay {
            topic: "t".into(),
            from_time: None,
            to_time: None,
            from_offset: Some(1),
            to_offset: Some(8),
            partition: Some(3),
            user_ids: None,
            filter: "whitelist".into(),
            dry_run: false,
            collection: "c".into(),
            rate: None,
            partitions: [("3".to_string(), plan)].into(),
            position: [("3".to_string(), 4)].into(),
            read: 3,
            applied: 1,
            stale: 1,
            filtered: 1,
            outside_window: 0,
            errors: 0,
            last_error: None,
            events_per_s: 0.0,
        };
        let job = super::super::Job {
            id: "replay-1".into(),
            kind: KIND.into(),
            state: JobState::Running,
            instance_id: "i".into(),
            created_at: String::new(),
            updated_at: String::new(),
            finished_at: None,
            error: None,
            requested: None,
            body,
        };
        let json = serde_json::to_string(&job).unwrap();
        let back: super::super::Job<Replay> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.body.partitions["3"].position, 4);
        assert_eq!(back.body.position["3"], 4);
    }

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
