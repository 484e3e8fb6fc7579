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

use super::{JobState, Next, Pacer, Runner, pause, seconds_since};
use crate::{
    actors::applier::{Record, collapse},
    clients::{
        kafka,
        mongo::{MongoStore, Outcome},
        redis::RedisStore,
    },
    config::KafkaConfig,
    model::{now_ms, parse_time},
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
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};
use tokio_util::sync::CancellationToken;

mod dry_run;
mod plan;

pub use plan::{ReplayRequest, plan};

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
    /// Next offset to read per partition (the plans' positions, copied
    /// at each checkpoint for those who poll).
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

impl Replay {
    /// The plan of partition `p` (a scan of a handful: no key to build).
    fn plan_mut(&mut self, p: i32) -> Option<&mut PartitionPlan> {
        self.partitions.values_mut().find(|x| x.partition == p)
    }

    /// Copies the plans' positions into `position`.
    fn note_positions(&mut self) {
        self.position = self
            .partitions
            .iter()
            .map(|(k, x)| (k.clone(), x.position))
            .collect();
    }
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
    let mut overlay: HashMap<String, (i64, i64)> = HashMap::new();
    loop {
        if runner.job.body.partitions.values().all(|p| p.done) {
            return finish(runner, &cx, &group, JobState::Done, None).await;
        }
        let r = &runner.job.body;
        let before = (r.applied, r.stale, r.filtered, r.errors);
        let Some(window) = gather(&consumer, &cx, &mut runner.job.body, from_ms, to_ms).await
        else {
            return None; // stopping: resumed from the last checkpoint
        };
        if !window.is_empty() {
            let w = Window {
                target: &target,
                live,
                overlay: &mut overlay,
            };
            if !w.write(&window, &cx, &mut runner.job.body).await {
                return None;
            }
        }
        if let Some(s) = &cx.stats {
            let r = &runner.job.body;
            s.replayed(
                r.applied - before.0,
                r.stale - before.1,
                r.filtered - before.2,
                r.errors - before.3,
            );
        }
        let elapsed = seconds_since(&runner.job.created_at).max(0.001);
        runner.job.body.events_per_s = runner.job.body.read as f64 / elapsed;
        runner.job.body.note_positions();
        progress(&runner.job.body);
        match runner.checkpoint().await {
            Next::GoOn => {}
            Next::Cancel => return finish(runner, &cx, &group, JobState::Cancelled, None).await,
            Next::Stop => return None,
        }
        let wait = pacer.wait_for(runner.job.body.read - read_at_start);
        if !pause(&cx.cancel, wait).await {
            return None;
        }
    }
}

/// Where a replay writes its windows.
struct Window<'a> {
    target: &'a MongoStore,
    /// The live collection: cached profiles of applied users are dropped.
    live: bool,
    /// A dry run's view of the versions its earlier windows would have
    /// written, so its counts match a real run's.
    overlay: &'a mut HashMap<String, (i64, i64)>,
}

impl Window<'_> {
    /// Collapses `window` and writes it (a dry run predicts), retrying until
    /// MongoDB answers, and adds its counts to `r`. False when the engine
    /// stopped first.
    async fn write(self, window: &[Record], cx: &Context, r: &mut Replay) -> bool {
        let c = collapse(window);
        r.stale += c.superseded.iter().map(|(_, n)| n).sum::<u64>();
        r.errors += c.poison.len() as u64;
        if let Some((_, _, e)) = c.poison.last() {
            r.last_error = Some(e.clone());
        }
        let mut attempt = 0;
        let outcomes = loop {
            let written = if r.dry_run {
                dry_run::predict(self.target, &c.changes, self.overlay).await
            } else {
                self.target.apply(&c.changes).await
            };
            match written {
                Ok(o) => break o,
                Err(e) => {
                    let wait = cx.retry.delay(attempt);
                    tracing::warn!(error = %e, retry_in = ?wait, "replay window not written; retrying");
                    if !pause(&cx.cancel, wait).await {
                        return false;
                    }
                    attempt += 1;
                }
            }
        };
        let mut touched = Vec::new();
        for (change, o) in c.changes.iter().zip(&outcomes) {
            match o {
                Outcome::Applied => {
                    r.applied += 1;
                    touched.push(change.user_id.as_str());
                }
                Outcome::Stale => r.stale += 1,
                Outcome::Rejected(e) => {
                    r.errors += 1;
                    r.last_error = Some(format!("user `{}`: {e}", change.user_id));
                }
            }
        }
        if self.live
            && !r.dry_run
            && let Some(p) = &cx.profiles
            && let Err(e) = p.invalidate(&touched).await
        {
            tracing::debug!(error = %e, "cannot invalidate cached profiles after a replay window");
        }
        true
    }
}

/// A consumer assigned to every unfinished partition at its position.
fn assign(
    cx: &Context,
    group: &str,
    r: &Replay,
) -> Result<kafka::Detached<StreamConsumer>, KafkaError> {
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
                if let Some(plan) = r.plan_mut(p) {
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
        let Some(plan) = r.plan_mut(p) else {
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

async fn finish(
    mut runner: Runner<Replay>,
    cx: &Context,
    group: &str,
    state: JobState,
    error: Option<String>,
) -> Option<super::Job<Replay>> {
    if let Err(e) = kafka::delete_group(&cx.kafka, group).await {
        tracing::debug!(error = %e, %group, "cannot remove the replay's consumer group");
    }
    runner.job.body.note_positions();
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
}
