//! DlqActor: the dead-letter queue. A user whose change could not be synced —
//! its profile is unreadable, or Kafka refused the event after every retry, or
//! MongoDB rejected it — gets a `DlqMessage` on the DLQ topic with its full error
//! context, and an open entry in Redis (`<prefix>:dlq:{shard}`) that operators
//! list and redrive through the API or the CLI.
//!
//! The user's dirty flag is never touched here: it stays, so a later cycle tries
//! again, and the entry closes by itself once the user syncs. One record is
//! written per (user, version): a change that keeps failing every cycle is not
//! recorded again. While Kafka is unreachable, records are parked in a Redis
//! stream and forwarded when it is back, so none is lost.

use super::{Shared, StageError, guard, restart_pause};
use crate::{
    clients::{kafka, redis::RedisStore},
    health::Backend,
    model::{DeadLetter, Section, now_ms},
    proto::{DlqMessage, ErrorContext},
};
use actix::prelude::*;
use prost::Message as _;
use rdkafka::producer::FutureProducer;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Records forwarded from the outbox per round.
const FORWARD_BATCH: u64 = 500;

/// An open dead letter, as stored in Redis and shown by `GET /v1/dlq`. Each
/// user has at most one open entry per section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlqEntry {
    pub user_id: String,
    pub version: i64,
    pub stage: String,
    /// `static`, `dynamic` or `delete`: the section the change was for, or a
    /// delete (carried on the dynamic path, so its entry is the user's
    /// dynamic one). Entries written before this field existed are dynamic.
    #[serde(default = "dynamic_label")]
    pub sync_type: String,
    pub error: String,
    pub detail: String,
    pub retry_count: u32,
    pub failed_at_ms: i64,
    pub instance_id: String,
    pub topic: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub offset: Option<i64>,
    /// The sink that refused the change, for a dead letter of the apply
    /// stage.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sink: Option<String>,
}

fn dynamic_label() -> String {
    "dynamic".into()
}

/// What one [`Record`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// New records written (to Kafka or parked).
    pub recorded: u64,
    /// Already recorded for the same version.
    pub duplicates: u64,
    /// Parked in Redis because Kafka was unreachable.
    pub parked: u64,
}

pub struct DlqActor {
    redis: RedisStore,
    producer: FutureProducer,
    topic: String,
    shared: Shared,
    restarts: u32,
}

impl DlqActor {
    pub const NAME: &'static str = "DlqActor";

    pub fn new(redis: RedisStore, producer: FutureProducer, topic: String, shared: Shared) -> Self {
        Self {
            redis,
            producer,
            topic,
            shared,
            restarts: 0,
        }
    }
}

impl Actor for DlqActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        restart_pause(self.restarts, ctx);
    }
}

impl Supervised for DlqActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.restarts += 1;
    }
}

/// Records dead letters.
#[derive(Message)]
#[rtype(result = "Result<Recorded, StageError>")]
pub struct Record(pub Vec<DeadLetter>);

impl Handler<Record> for DlqActor {
    type Result = ResponseActFuture<Self, Result<Recorded, StageError>>;

    fn handle(&mut self, Record(letters): Record, _: &mut Context<Self>) -> Self::Result {
        let (redis, producer, topic, shared) = (
            self.redis.clone(),
            self.producer.clone(),
            self.topic.clone(),
            self.shared.clone(),
        );
        guard(Self::NAME, shared.stats.clone(), async move {
            record(&redis, &producer, &topic, &shared, letters).await
        })
    }
}

async fn record(
    redis: &RedisStore,
    producer: &FutureProducer,
    topic: &str,
    shared: &Shared,
    letters: Vec<DeadLetter>,
) -> Result<Recorded, StageError> {
    let mut out = Recorded::default();
    // One record per (user, section, version): skip what is already open for
    // that version.
    let known: Vec<(String, Section)> = letters
        .iter()
        .filter(|l| !l.user_id.is_empty())
        .map(|l| (l.user_id.clone(), l.section))
        .collect();
    let keys: Vec<(&str, Section)> = known.iter().map(|(u, s)| (u.as_str(), *s)).collect();
    let open = shared
        .retry
        .run("read dead letters", &shared.cancel, || {
            redis.dlq_entries(&keys)
        })
        .await?;
    let open: std::collections::HashMap<(&str, Section), (i64, Option<String>)> = keys
        .iter()
        .zip(open)
        .filter_map(|(k, e)| {
            let e: DlqEntry = serde_json::from_str(e.as_deref()?).ok()?;
            Some((*k, (e.version, e.sink)))
        })
        .collect();
    let now = now_ms();
    let mut fresh = Vec::new();
    for l in letters {
        let same = |(v, sink): &(i64, Option<String>)| *v == l.version && *sink == l.sink;
        if !l.user_id.is_empty() && open.get(&(l.user_id.as_str(), l.section)).is_some_and(same) {
            out.duplicates += 1;
        } else {
            fresh.push(l);
        }
    }
    if fresh.is_empty() {
        return Ok(out);
    }

    let encoded: Vec<Vec<u8>> = fresh
        .iter()
        .map(|l| {
            DlqMessage {
                user_id: l.user_id.clone(),
                original_event: l.original_event.clone(),
                error_context: Some(ErrorContext {
                    error_message: l.error.clone(),
                    stack_trace: l.detail.clone(),
                    retry_count: l.retry_count as i32,
                    failure_timestamp: now,
                    instance_id: shared.instance_id.clone(),
                    kafka_topic: l.topic.clone(),
                    sink: l.sink.clone().unwrap_or_default(),
                }),
            }
            .encode_to_vec()
        })
        .collect();

    let mut parked = Vec::new();
    if shared.health.is_down(Backend::Kafka) {
        parked = encoded;
    } else {
        let keys: Vec<String> = fresh.iter().map(record_key).collect();
        let records = keys
            .iter()
            .zip(&encoded)
            .map(|(key, bytes)| (key.as_str(), bytes.as_slice()));
        let results = kafka::send_all(producer, topic, records).await;
        for (r, bytes) in results.into_iter().zip(encoded) {
            if let Err(e) = r {
                shared.health.set_down(Backend::Kafka, &e);
                parked.push(bytes);
            }
        }
    }
    if !parked.is_empty() {
        shared
            .retry
            .run("park dead letters", &shared.cancel, || {
                redis.outbox_push(&parked)
            })
            .await?;
        out.parked = parked.len() as u64;
        shared.stats.dlq_parked(out.parked);
    }

    let entries: Vec<(&str, Section, String)> = fresh
        .iter()
        .filter(|l| !l.user_id.is_empty())
        .map(|l| {
            let e = DlqEntry {
                user_id: l.user_id.clone(),
                version: l.version,
                stage: l.stage.label().to_string(),
                sync_type: if l.delete {
                    "delete"
                } else {
                    l.section.label()
                }
                .to_string(),
                error: l.error.clone(),
                detail: l.detail.clone(),
                retry_count: l.retry_count,
                failed_at_ms: now,
                instance_id: shared.instance_id.clone(),
                topic: l.topic.clone(),
                partition: l.partition,
                offset: l.offset,
                sink: l.sink.clone(),
            };
            (
                l.user_id.as_str(),
                l.section,
                serde_json::to_string(&e).expect("entries serialize"),
            )
        })
        .collect();
    shared
        .retry
        .run("open dead letters", &shared.cancel, || {
            redis.dlq_put(&entries)
        })
        .await?;
    let mut by_stage: std::collections::BTreeMap<_, u64> = Default::default();
    for l in &fresh {
        *by_stage.entry((l.stage, l.section)).or_default() += 1;
    }
    for ((stage, section), n) in by_stage {
        shared.stats.dlq_recorded(stage, section, n);
    }
    out.recorded = fresh.len() as u64;
    tracing::warn!(
        recorded = out.recorded,
        parked = out.parked,
        first_user = %fresh[0].user_id,
        first_error = %fresh[0].error,
        "dead letters recorded; their flags stay"
    );
    Ok(out)
}

/// The Kafka key of a record: the user, or where an undecodable record was.
fn record_key(l: &DeadLetter) -> String {
    if l.user_id.is_empty() {
        format!(
            "{}/{}/{}",
            l.topic,
            l.partition.unwrap_or(-1),
            l.offset.unwrap_or(-1)
        )
    } else {
        l.user_id.clone()
    }
}

/// The dead-letter forwarder, a task of its own (see [`crate::tasks`]): every
/// `every`, refreshes the DLQ gauges and forwards parked records once Kafka
/// answers. Runs until the engine stops.
pub async fn run_forwarder(
    redis: RedisStore,
    producer: FutureProducer,
    topic: String,
    shared: Shared,
    every: Duration,
) {
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        forward_parked(&redis, &producer, &topic, &shared).await;
    }
}

/// Refreshes the DLQ gauges and forwards parked records once Kafka answers.
async fn forward_parked(
    redis: &RedisStore,
    producer: &FutureProducer,
    topic: &str,
    shared: &Shared,
) {
    if let Ok(counts) = redis.dlq_counts().await {
        shared.stats.dlq_open(counts.iter().sum());
    }
    let Ok(waiting) = redis.outbox_len().await else {
        return;
    };
    shared.stats.dlq_outbox(waiting);
    if waiting == 0 {
        return;
    }
    if shared.health.is_down(Backend::Kafka) {
        match kafka::probe(producer, topic).await {
            Ok(()) => {
                shared.health.set_up(Backend::Kafka);
            }
            Err(_) => return,
        }
    }
    let Ok(batch) = redis.outbox_read(FORWARD_BATCH).await else {
        return;
    };
    let sends = batch.iter().map(|(_, bytes)| async move {
        let key = DlqMessage::decode(bytes.as_slice())
            .map(|m| m.user_id)
            .unwrap_or_default();
        kafka::send(producer, topic, &key, bytes).await
    });
    let results = futures::future::join_all(sends).await;
    let mut done = Vec::new();
    for ((id, _), r) in batch.iter().zip(results) {
        match r {
            Ok(_) => done.push(id.clone()),
            Err(e) => {
                shared.health.set_down(Backend::Kafka, &e);
            }
        }
    }
    if let Err(e) = redis.outbox_ack(&done).await {
        // The records stay parked and are forwarded again: at least once.
        tracing::warn!(error = %e, "cannot drop forwarded dead letters from the outbox");
    } else if !done.is_empty() {
        tracing::info!(
            forwarded = done.len(),
            "parked dead letters forwarded to kafka"
        );
    }
}

/// Open dead letters, for `GET /v1/dlq` and `datasync dlq list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DlqListing {
    /// Open entries in all shards.
    pub open: u64,
    /// Records parked in Redis, waiting for Kafka.
    pub parked: u64,
    /// Up to the requested number of entries, oldest failure first.
    pub entries: Vec<DlqEntry>,
}

/// Lists up to `limit` open dead letters.
pub async fn list(redis: &RedisStore, limit: usize) -> Result<DlqListing, StageError> {
    let counts = redis.dlq_counts().await?;
    let mut entries = Vec::new();
    for (shard, &n) in counts.iter().enumerate() {
        if entries.len() >= limit {
            break;
        }
        if n == 0 {
            continue;
        }
        for (user, _, json) in redis.dlq_shard(shard as u32).await? {
            match serde_json::from_str::<DlqEntry>(&json) {
                Ok(e) => entries.push(e),
                Err(e) => tracing::warn!(user, error = %e, "unreadable dead-letter entry"),
            }
        }
    }
    entries.sort_by(|a, b| (a.failed_at_ms, &a.user_id).cmp(&(b.failed_at_ms, &b.user_id)));
    entries.truncate(limit);
    Ok(DlqListing {
        open: counts.iter().sum(),
        parked: redis.outbox_len().await?,
        entries,
    })
}

/// Which dead letters to redrive.
#[derive(Debug, Clone)]
pub enum RedriveTarget {
    Users(Vec<String>),
    All,
}

impl RedriveTarget {
    /// The target as the operation log's parameters.
    pub fn params(&self) -> serde_json::Value {
        match self {
            Self::All => serde_json::json!({ "target": "all" }),
            Self::Users(ids) => {
                serde_json::json!({ "user_ids": crate::operations::ids_param(ids) })
            }
        }
    }
}

/// What a redrive did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Redriven {
    /// Users re-flagged or whose immediate change was put back in line, with
    /// the new versions (a user with both sections open appears twice).
    pub redriven: Vec<(String, i64)>,
    /// Requested users with no open dead letter (left alone).
    pub not_open: Vec<String>,
    /// Users whose open static dead letter had no pending change left (it was
    /// applied or superseded since): the entry is closed.
    #[serde(default)]
    pub superseded: Vec<String>,
}

/// Whether a stored entry is a delete's.
fn is_delete(json: &str) -> bool {
    serde_json::from_str::<DlqEntry>(json).is_ok_and(|e| e.sync_type == "delete")
}

/// Redrives open dead letters and closes their entries. A dynamic one re-flags
/// the user (a new version from the shard clock, so the normal path and its
/// version rules apply: the profile is loaded again from Redis); a delete's
/// deletes the user again, with a new version. A static one
/// puts the user's pending immediate change back in line with a new version;
/// the scanner publishes it at its next pass. Redriving first means a crash in
/// between leaves the entry open, never a user dropped.
pub async fn redrive(redis: &RedisStore, target: RedriveTarget) -> Result<Redriven, StageError> {
    let mut out = Redriven::default();
    let mut dynamic: Vec<String> = Vec::new();
    let mut deletes: Vec<String> = Vec::new();
    let mut static_: Vec<String> = Vec::new();
    match target {
        RedriveTarget::Users(ids) => {
            let keys: Vec<(&str, Section)> = ids
                .iter()
                .flat_map(|u| {
                    [
                        (u.as_str(), Section::Dynamic),
                        (u.as_str(), Section::Static),
                    ]
                })
                .collect();
            let open = redis.dlq_entries(&keys).await?;
            for (id, pair) in ids.iter().zip(open.chunks(2)) {
                let (d, st) = (pair[0].is_some(), pair[1].is_some());
                if let Some(json) = &pair[0] {
                    if is_delete(json) {
                        deletes.push(id.clone());
                    } else {
                        dynamic.push(id.clone());
                    }
                }
                if st {
                    static_.push(id.clone());
                }
                if !d && !st {
                    out.not_open.push(id.clone());
                }
            }
        }
        RedriveTarget::All => {
            for shard in 0..redis.shards() {
                for (user, section, json) in redis.dlq_shard(shard).await? {
                    match section {
                        Section::Dynamic if is_delete(&json) => deletes.push(user),
                        Section::Dynamic => dynamic.push(user),
                        Section::Static => static_.push(user),
                    }
                }
            }
        }
    }
    for (users, delete) in [(&dynamic, false), (&deletes, true)] {
        for chunk in users.chunks(1000) {
            let marked = if delete {
                redis.delete(chunk).await?
            } else {
                redis.mark(chunk).await?
            };
            let keys: Vec<(&str, Section)> = chunk
                .iter()
                .map(|u| (u.as_str(), Section::Dynamic))
                .collect();
            redis.dlq_remove(&keys).await?;
            out.redriven.extend(marked);
        }
    }
    for chunk in static_.chunks(1000) {
        let users: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let versions = redis.restage_static(&users).await?;
        let keys: Vec<(&str, Section)> = users.iter().map(|u| (*u, Section::Static)).collect();
        redis.dlq_remove(&keys).await?;
        for (u, v) in chunk.iter().zip(versions) {
            match v {
                Some(v) => out.redriven.push((u.clone(), v)),
                None => out.superseded.push(u.clone()),
            }
        }
    }
    if !out.redriven.is_empty() {
        tracing::info!(users = out.redriven.len(), "dead letters redriven");
    }
    Ok(out)
}
