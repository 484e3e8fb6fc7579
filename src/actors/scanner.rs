//! ShardScanner: on every tick, drains the legacy flag set, then walks each owned
//! shard's flags oldest-first in pages and drives each page through
//! ProfileLoader → VersionResolver → KafkaPublisher, then clears the flags it
//! published with compare-and-delete.

use super::{
    Flag, MailboxError,
    loader::{Load, ProfileLoader},
    publisher::{KafkaPublisher, Outgoing, Publish},
    resolver::{Resolve, VersionResolver},
};
use crate::{
    cache::CacheError,
    clients::redis::{ProfileError, RedisError, RedisStore, Section},
    config::SyncConfig,
    proto::SyncType,
    telemetry::Stats,
};
use actix::prelude::*;
use futures::StreamExt;
use std::{sync::Arc, time::Instant};
use tokio_util::sync::CancellationToken;

/// Most legacy pages drained in one cycle, so a flood cannot starve the scan.
const MAX_LEGACY_PAGES_PER_CYCLE: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Mailbox(#[from] MailboxError),
}

/// What one cycle did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CycleReport {
    pub scanned: u64,
    pub published: u64,
    pub already_applied: u64,
    pub failed: u64,
    pub cleared: u64,
    pub legacy_drained: u64,
    pub page_errors: u64,
}

impl CycleReport {
    fn add(&mut self, o: &CycleReport) {
        self.scanned += o.scanned;
        self.published += o.published;
        self.already_applied += o.already_applied;
        self.failed += o.failed;
        self.cleared += o.cleared;
        self.legacy_drained += o.legacy_drained;
        self.page_errors += o.page_errors;
    }
}

/// Everything a cycle needs; shared by the scan loop and on-demand scans.
pub struct Pipeline {
    pub redis: RedisStore,
    pub loader: Addr<ProfileLoader>,
    pub resolver: Addr<VersionResolver>,
    pub publisher: Addr<KafkaPublisher>,
    pub stats: Arc<Stats>,
    pub sync: SyncConfig,
    pub shards: Vec<u32>,
    pub cancel: CancellationToken,
    /// Held for the length of a cycle; shutdown takes it to wait for in-flight work.
    pub cycle_lock: tokio::sync::Mutex<()>,
}

pub struct ShardScanner {
    pipeline: Arc<Pipeline>,
}

impl ShardScanner {
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        Self { pipeline }
    }
}

impl Actor for ShardScanner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.spawn(run_loop(self.pipeline.clone()).into_actor(self));
    }
}

impl Supervised for ShardScanner {}

/// Runs one cycle now (besides the scheduled ones) and reports what it did.
#[derive(Message)]
#[rtype(result = "CycleReport")]
pub struct ScanNow;

impl Handler<ScanNow> for ShardScanner {
    type Result = ResponseFuture<CycleReport>;

    fn handle(&mut self, _: ScanNow, _: &mut Context<Self>) -> Self::Result {
        Box::pin(run_cycle(self.pipeline.clone()))
    }
}

async fn run_loop(p: Arc<Pipeline>) {
    loop {
        if p.cancel.is_cancelled() {
            break;
        }
        let started = Instant::now();
        let report = run_cycle(p.clone()).await;
        let wait = if p.sync.interval.is_zero() {
            if report.scanned == 0 && report.legacy_drained == 0 {
                p.sync.idle_backoff
            } else {
                Default::default()
            }
        } else {
            p.sync.interval.saturating_sub(started.elapsed())
        };
        tokio::select! {
            _ = p.cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    tracing::info!("shard scanner stopped");
}

/// One pass over the legacy set and every owned shard.
pub async fn run_cycle(p: Arc<Pipeline>) -> CycleReport {
    let _cycle = p.cycle_lock.lock().await;
    let mut report = CycleReport::default();
    if p.cancel.is_cancelled() {
        return report;
    }
    if p.sync.legacy_drain {
        match drain_legacy(&p).await {
            Ok(n) => report.legacy_drained = n,
            Err(e) => {
                report.page_errors += 1;
                tracing::warn!(error = %e, "legacy flag drain failed; retried next cycle");
            }
        }
    }
    let per_shard: Vec<CycleReport> = futures::stream::iter(p.shards.iter().copied())
        .map(|shard| scan_shard(&p, shard))
        .buffer_unordered(p.sync.max_in_flight_pages)
        .collect()
        .await;
    for r in &per_shard {
        report.add(r);
    }
    if report.scanned > 0 {
        tracing::debug!(?report, "cycle done");
    }
    report
}

/// Moves the legacy set's members into the sharded flags. Each batch is first
/// moved atomically into a draining set, then flagged, then removed from the
/// draining set, so a crash in between loses nothing (the next cycle re-flags
/// what is left there), and a member re-added meanwhile stays in the legacy set.
async fn drain_legacy(p: &Pipeline) -> Result<u64, RedisError> {
    let page = p.sync.page_size;
    let mut drained = 0;
    let leftovers = p.redis.legacy_unacked(page).await?;
    if !leftovers.is_empty() {
        p.redis.mark(&leftovers).await?;
        p.redis.legacy_ack(&leftovers).await?;
        drained += leftovers.len() as u64;
    }
    for _ in 0..MAX_LEGACY_PAGES_PER_CYCLE {
        let users = p.redis.legacy_pop(page).await?;
        if users.is_empty() {
            break;
        }
        p.redis.mark(&users).await?;
        p.redis.legacy_ack(&users).await?;
        drained += users.len() as u64;
    }
    if drained > 0 {
        p.stats.legacy_drained(drained);
    }
    Ok(drained)
}

async fn scan_shard(p: &Pipeline, shard: u32) -> CycleReport {
    let mut report = CycleReport::default();
    let mut cursor = None;
    while !p.cancel.is_cancelled() {
        let flags = match p.redis.read_flags(shard, cursor, p.sync.page_size).await {
            Ok(f) => f,
            Err(e) => {
                report.page_errors += 1;
                tracing::warn!(shard, error = %e, "cannot read flags; shard retried next cycle");
                break;
            }
        };
        let Some(last) = flags.last() else { break };
        cursor = Some(last.1);
        let full = flags.len() == p.sync.page_size;
        let flags = flags
            .into_iter()
            .map(|(user_id, version)| Flag { user_id, version })
            .collect();
        match process_page(p, shard, flags).await {
            Ok(r) => report.add(&r),
            Err(e) => {
                report.page_errors += 1;
                tracing::warn!(shard, error = %e, "page failed; its flags stay for the next cycle");
            }
        }
        if !full {
            break;
        }
    }
    report
}

fn load_reason(e: &ProfileError) -> &'static str {
    match e {
        ProfileError::Missing { .. } => "missing",
        ProfileError::BadJson { .. } => "bad_json",
        ProfileError::NotAnObject { .. } => "not_an_object",
        ProfileError::WrongType { .. } => "wrong_type",
    }
}

/// Load → resolve → publish → compare-and-clear, for one page of one shard.
pub async fn process_page(
    p: &Pipeline,
    shard: u32,
    flags: Vec<Flag>,
) -> Result<CycleReport, ScanError> {
    let mut report = CycleReport {
        scanned: flags.len() as u64,
        ..Default::default()
    };
    p.stats.flags_scanned(report.scanned);

    let loaded = p
        .loader
        .send(Load(flags))
        .await
        .map_err(|e| MailboxError("ProfileLoader", e))??;
    let mut ready = Vec::with_capacity(loaded.len());
    for (flag, profile) in loaded {
        match profile {
            Ok(doc) => ready.push((flag, doc)),
            Err(e) => {
                report.failed += 1;
                p.stats.load_failed(load_reason(&e), &e);
            }
        }
    }
    if ready.is_empty() {
        return Ok(report);
    }

    let users = ready.iter().map(|(f, _)| f.user_id.clone()).collect();
    let applied = p
        .resolver
        .send(Resolve {
            users,
            section: Section::Dynamic,
        })
        .await
        .map_err(|e| MailboxError("VersionResolver", e))??;

    let mut to_clear = Vec::with_capacity(ready.len());
    let mut items = Vec::with_capacity(ready.len());
    let mut flags = Vec::with_capacity(ready.len());
    for (flag, profile) in ready {
        let base = applied.get(&flag.user_id).copied().unwrap_or(0);
        if base >= flag.version {
            // Already in MongoDB (e.g. published before a crash, flag not cleared).
            to_clear.push((flag.user_id, flag.version));
            report.already_applied += 1;
        } else {
            items.push(Outgoing {
                user_id: flag.user_id.clone(),
                version: flag.version,
                profile,
                base_version: base,
                lease_epoch: 0,
            });
            flags.push(flag);
        }
    }
    p.stats.already_applied(report.already_applied);

    if !items.is_empty() {
        let results = p
            .publisher
            .send(Publish {
                sync_type: SyncType::DynamicBatch,
                items,
            })
            .await
            .map_err(|e| MailboxError("KafkaPublisher", e))?;
        for (flag, r) in flags.into_iter().zip(results) {
            match r {
                Ok(_) => {
                    report.published += 1;
                    to_clear.push((flag.user_id, flag.version));
                }
                Err(_) => report.failed += 1,
            }
        }
    }

    let cleared = p.redis.clear_flags(shard, &to_clear).await?;
    report.cleared = cleared;
    p.stats.flags_cleared(cleared);
    Ok(report)
}
