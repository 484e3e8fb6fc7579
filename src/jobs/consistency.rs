//! The consistency check: compares Redis (the source) with MongoDB (the
//! sink) for the shards this instance owns, reports drift by kind, and
//! repairs it through the pipeline (seeds 001 §5 and 002).
//!
//! Three passes, each in pages and paced at `consistency.rate` users/s:
//!
//! 1. Redis → MongoDB: the profile keys by SCAN; per page one pipeline of
//!    GETs and flag lookups, and one `$in` query. A user with a flag is in
//!    flight and skipped. No document (or a tombstone, or no dynamic
//!    section) is `missing`; a dynamic section that differs is `different`.
//!    Profiles are compared canonically: key order, and how a number is
//!    written (1, 1.0, int32 or int64), do not count.
//! 2. MongoDB → Redis: the documents with a dynamic section, by keyset
//!    pagination on `userId`; one whose user has no profile key and no flag
//!    is an `orphan`. Static-only documents are not orphans (their source is
//!    the immediate API, not a Redis profile).
//! 3. Flags older than `stuck_flag_after` (`stuck_flag`) and immediate
//!    changes pending longer than `static_pending_after` (`static_pending`),
//!    per shard.
//!
//! Repair (`repair = true`) flags `missing` and `different` users again, so
//! they get new versions and the current Redis profile is published; orphans
//! are deleted (a versioned delete, so a change racing with it wins) only
//! with `repair_orphans = true`. Stuck flags and pending changes are
//! reported only: the DLQ holds why they are stuck.

use super::{JobState, Pacer, Runner, pause, seconds_since};
use crate::{
    clients::{
        mongo::{MongoError, MongoStore},
        redis::{Checkpoint, RedisError, RedisStore, ScanCursor},
    },
    config::ConsistencyConfig,
    error::EngineError,
    model::now_us,
    shard::shard_of,
    telemetry::Stats,
};
use mongodb::bson::{Bson, Document};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};
use tokio_util::sync::CancellationToken;

pub const KIND: &str = "consistency";

/// The finding kinds, as reports and metrics name them.
pub const KINDS: [&str; 5] = [
    "missing",
    "different",
    "orphan",
    "stuck_flag",
    "static_pending",
];

/// A check's parameters and results (the job record's body).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Check {
    /// `schedule` or `api`.
    pub trigger: String,
    pub repair: bool,
    pub repair_orphans: bool,
    /// Shards compared (those this instance owned when the check started).
    pub shards: u32,
    /// Redis profiles compared with MongoDB.
    pub compared: u64,
    /// MongoDB documents looked up in Redis.
    pub documents: u64,
    /// Findings per kind.
    pub findings: BTreeMap<String, u64>,
    /// Up to `consistency.samples` user ids per kind.
    pub samples: BTreeMap<String, Vec<String>>,
    /// Users flagged again (missing, different).
    pub repaired: u64,
    /// Orphan documents deleted (with `repair_orphans`).
    pub orphans_deleted: u64,
    pub duration_s: f64,
}

impl Check {
    pub fn new(trigger: &str, c: &ConsistencyConfig) -> Self {
        Self {
            trigger: trigger.into(),
            repair: c.repair,
            repair_orphans: c.repair_orphans,
            findings: KINDS.iter().map(|k| (k.to_string(), 0)).collect(),
            samples: KINDS.iter().map(|k| (k.to_string(), Vec::new())).collect(),
            ..Default::default()
        }
    }

    fn found(&mut self, kind: &str, users: &[String], samples: usize) {
        self.counted(kind, users.len() as u64, users, samples);
    }

    /// `n` findings of `kind`, of which `users` are samples.
    fn counted(&mut self, kind: &str, n: u64, users: &[String], samples: usize) {
        *self.findings.entry(kind.into()).or_default() += n;
        let s = self.samples.entry(kind.into()).or_default();
        let room = samples.saturating_sub(s.len());
        s.extend(users.iter().take(room).cloned());
    }
}

/// What a check needs.
pub struct Context {
    pub redis: RedisStore,
    pub mongo: MongoStore,
    pub stats: Arc<Stats>,
    pub cancel: CancellationToken,
    pub config: ConsistencyConfig,
    /// The shards to check.
    pub owned: Vec<u32>,
}

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("stopped")]
    Stopped,
    #[error("cancelled")]
    Cancelled,
    #[error("taken over by another instance")]
    Lost,
}

impl From<RedisError> for CheckError {
    fn from(e: RedisError) -> Self {
        Self::Engine(e.into())
    }
}

impl From<MongoError> for CheckError {
    fn from(e: MongoError) -> Self {
        Self::Engine(e.into())
    }
}

/// Runs a check to its end and records it; answers the finished record
/// (`None` when the engine stopped first or the record could not be
/// written).
pub async fn run(mut runner: Runner<Check>, cx: Context) -> Option<super::Job<Check>> {
    let started = std::time::Instant::now();
    runner.job.body.shards = cx.owned.len() as u32;
    let outcome = passes(&mut runner, &cx).await;
    let body = &mut runner.job.body;
    body.duration_s = started.elapsed().as_secs_f64();
    let (state, error) = match outcome {
        Ok(()) => (JobState::Done, None),
        Err(e) => match e {
            CheckError::Stopped | CheckError::Lost => return None,
            CheckError::Cancelled => (JobState::Cancelled, None),
            CheckError::Engine(e) => (JobState::Failed, Some(crate::error::report(&e))),
        },
    };
    if state == JobState::Done {
        let findings: Vec<(&'static str, u64)> = KINDS
            .iter()
            .map(|k| (*k, body.findings.get(*k).copied().unwrap_or(0)))
            .collect();
        cx.stats.consistency_checked(
            &findings,
            body.repaired + body.orphans_deleted,
            now_us() as f64 / 1e6,
            body.duration_s,
        );
    }
    let id = runner.job.id.clone();
    match runner.finish(state, error).await {
        Ok(job) => {
            tracing::info!(%id, state = ?job.state, findings = ?job.body.findings, repaired = job.body.repaired, seconds = job.body.duration_s, "consistency check finished");
            Some(job)
        }
        Err(e) => {
            tracing::warn!(%id, error = %e, "cannot record the end of a consistency check");
            None
        }
    }
}

async fn passes(runner: &mut Runner<Check>, cx: &Context) -> Result<(), CheckError> {
    let owned: HashSet<u32> = cx.owned.iter().copied().collect();
    let shards = cx.redis.shards();
    let mine = |u: &String| owned.contains(&shard_of(u, shards));
    let page = cx.config.page_size;
    let pacer = Pacer::new(cx.config.rate);
    let mut seen = 0u64;

    // 1. Redis → MongoDB.
    let mut at = Some(ScanCursor::start());
    while let Some(cursor) = at {
        let (mut users, next) = cx.redis.scan_profiles(&cursor, page as u32).await?;
        users.retain(mine);
        if !users.is_empty() {
            compare_page(runner, cx, users).await?;
        }
        at = next;
        seen = runner.job.body.compared;
        checkpoint(runner, cx, &pacer, seen).await?;
    }

    // 2. MongoDB → Redis.
    let mut after: Option<String> = None;
    loop {
        let ids = cx.mongo.users_after(after.as_deref(), page).await?;
        let Some(last) = ids.last().cloned() else {
            break;
        };
        after = Some(last);
        let users: Vec<String> = ids.into_iter().filter(mine).collect();
        if !users.is_empty() {
            orphan_page(runner, cx, users).await?;
        }
        let walked = seen + runner.job.body.documents;
        checkpoint(runner, cx, &pacer, walked).await?;
    }

    // 3. Stuck flags and pending immediate changes.
    let samples = cx.config.samples;
    let flag_cutoff = now_us() - cx.config.stuck_flag_after.as_micros() as i64;
    let static_cutoff = now_us() - cx.config.static_pending_after.as_micros() as i64;
    for &shard in &cx.owned {
        let (n, users) = cx.redis.flags_before(shard, flag_cutoff, samples).await?;
        let body = &mut runner.job.body;
        body.counted("stuck_flag", n, &users, samples);
        let old: Vec<String> = cx
            .redis
            .static_pending(shard)
            .await?
            .into_iter()
            .filter(|c| c.version < static_cutoff)
            .map(|c| c.user_id)
            .collect();
        body.found("static_pending", &old, samples);
    }
    Ok(())
}

/// Saves progress, paces, and stops when asked.
async fn checkpoint(
    runner: &mut Runner<Check>,
    cx: &Context,
    pacer: &Pacer,
    walked: u64,
) -> Result<(), CheckError> {
    runner.job.body.duration_s = seconds_since(&runner.job.created_at);
    match runner.save().await? {
        Checkpoint::Saved => {}
        Checkpoint::CancelRequested => return Err(CheckError::Cancelled),
        Checkpoint::Lost => return Err(CheckError::Lost),
    }
    if !pause(&cx.cancel, pacer.wait_for(walked)).await {
        return Err(CheckError::Stopped);
    }
    Ok(())
}

/// Compares one page of Redis profiles with MongoDB; repairs what differs.
async fn compare_page(
    runner: &mut Runner<Check>,
    cx: &Context,
    users: Vec<String>,
) -> Result<(), CheckError> {
    let (raws, flags, docs) = tokio::join!(
        cx.redis.load_profiles(&users),
        cx.redis.flags_of(&users),
        cx.mongo.dynamic_profiles(&users),
    );
    let (raws, flags, docs) = (raws?, flags?, docs?);
    let (mut missing, mut different) = (Vec::new(), Vec::new());
    for ((user, raw), flag) in users.iter().zip(raws).zip(flags) {
        if flag.is_some() {
            continue;
        }
        // A profile deleted since the SCAN, or unreadable (the DLQ has it).
        let Ok(profile) = raw.and_then(|r| r.to_document(&cx.redis.keys().profile(user))) else {
            continue;
        };
        match docs.get(user) {
            None | Some(None) => missing.push(user.clone()),
            Some(Some(stored)) if !same_document(&profile, stored) => different.push(user.clone()),
            Some(Some(_)) => {}
        }
    }
    let samples = cx.config.samples;
    let body = &mut runner.job.body;
    body.compared += users.len() as u64;
    body.found("missing", &missing, samples);
    body.found("different", &different, samples);
    if body.repair {
        let fix: Vec<String> = missing.into_iter().chain(different).collect();
        if !fix.is_empty() {
            let marked = cx.redis.mark(&fix).await?;
            cx.stats.flags_marked(marked.len() as u64);
            body.repaired += marked.len() as u64;
        }
    }
    Ok(())
}

/// Looks one page of MongoDB users up in Redis; deletes orphans if asked.
async fn orphan_page(
    runner: &mut Runner<Check>,
    cx: &Context,
    users: Vec<String>,
) -> Result<(), CheckError> {
    let (exists, flags) = tokio::join!(cx.redis.profiles_exist(&users), cx.redis.flags_of(&users));
    let (exists, flags) = (exists?, flags?);
    let orphans: Vec<String> = users
        .iter()
        .zip(exists)
        .zip(flags)
        .filter(|((_, e), f)| !e && f.is_none())
        .map(|((u, _), _)| u.clone())
        .collect();
    let samples = cx.config.samples;
    let body = &mut runner.job.body;
    body.documents += users.len() as u64;
    body.found("orphan", &orphans, samples);
    if body.repair_orphans && !orphans.is_empty() {
        let deleted = cx.redis.delete(&orphans).await?;
        cx.stats.users_deleted(deleted.len() as u64);
        body.orphans_deleted += deleted.len() as u64;
    }
    Ok(())
}

/// Whether two profiles hold the same data: key order, and the type a
/// number is stored as (int32, int64, double), do not count.
pub fn same_document(a: &Document, b: &Document) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|(k, v)| b.get(k).is_some_and(|w| same_value(v, w)))
}

fn same_value(a: &Bson, b: &Bson) -> bool {
    match (a, b) {
        (Bson::Document(x), Bson::Document(y)) => same_document(x, y),
        (Bson::Array(x), Bson::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_value(v, w))
        }
        _ => match (number(a), number(b)) {
            (Some(Number::Int(x)), Some(Number::Int(y))) => x == y,
            (Some(x), Some(y)) => x.as_f64() == y.as_f64(),
            (None, None) => a == b,
            _ => false,
        },
    }
}

#[derive(Clone, Copy)]
enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }
}

fn number(b: &Bson) -> Option<Number> {
    match b {
        Bson::Int32(i) => Some(Number::Int(i64::from(*i))),
        Bson::Int64(i) => Some(Number::Int(*i)),
        Bson::Double(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(Number::Int(*f as i64)),
        Bson::Double(f) => Some(Number::Float(*f)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    #[test]
    fn key_order_and_number_types_are_not_drift() {
        let redis = doc! { "a": 1i64, "b": { "x": 2.5, "y": [1i64, "s"] }, "c": null };
        let mongo = doc! { "c": null, "b": { "y": [1.0, "s"], "x": 2.5 }, "a": 1i32 };
        assert!(same_document(&redis, &mongo));
    }

    #[test]
    fn real_differences_are_drift() {
        let base = doc! { "a": 1i64, "b": { "x": "y" } };
        for other in [
            doc! { "a": 2i64, "b": { "x": "y" } },
            doc! { "a": 1i64, "b": { "x": "z" } },
            doc! { "a": 1i64 },
            doc! { "a": 1i64, "b": { "x": "y" }, "c": 1i64 },
            doc! { "a": "1", "b": { "x": "y" } },
            doc! { "a": 1.5, "b": { "x": "y" } },
        ] {
            assert!(!same_document(&base, &other), "{other}");
        }
        assert!(!same_document(
            &doc! { "l": [1i64, 2i64] },
            &doc! { "l": [2i64, 1i64] }
        ));
    }

    #[test]
    fn findings_keep_a_bounded_sample() {
        let mut c = Check::new("api", &crate::config::Config::default_config().consistency);
        let users: Vec<String> = (0..50).map(|i| format!("u{i}")).collect();
        c.found("missing", &users, 20);
        c.found("missing", &users, 20);
        assert_eq!(c.findings["missing"], 100);
        assert_eq!(c.samples["missing"].len(), 20);
        assert_eq!(c.findings["orphan"], 0);
    }
}
