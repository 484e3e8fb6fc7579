//! ShardScanner: on every tick, drains the legacy flag set, then walks each owned
//! shard's flags oldest-first in pages and drives each page through
//! ProfileLoader → VersionResolver → KafkaPublisher, then clears the flags it
//! published with compare-and-delete ([`page`]).

mod page;

pub use page::process_page;

use super::{
    Flag, Shared, StageError, dlq::DlqActor, guard, loader::ProfileLoader,
    publisher::KafkaPublisher, resolver::VersionResolver, restart_pause, static_path::StaticPath,
};
use crate::{
    clients::{
        kafka,
        mongo::MongoStore,
        redis::{RedisError, RedisStore},
    },
    config::SyncConfig,
    faults::HoldPoint,
    health::Backend,
    model::now_us,
};
use actix::prelude::*;
use futures::StreamExt;
use rdkafka::producer::FutureProducer;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

/// Most legacy pages drained in one cycle, so a flood cannot starve the scan.
const MAX_LEGACY_PAGES_PER_CYCLE: usize = 100;

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
    /// Users recorded in the dead-letter queue (their flags stay).
    pub dead_lettered: u64,
    /// Pages not started because Kafka or MongoDB was down.
    pub paused: u64,
    /// The oldest flag version seen (µs), 0 if none.
    pub oldest_version: i64,
    /// Pending immediate changes published again.
    pub static_redriven: u64,
    /// Delete events published (also counted in `published`).
    pub deleted: u64,
}

impl CycleReport {
    fn add(&mut self, o: &CycleReport) {
        self.dead_lettered += o.dead_lettered;
        self.static_redriven += o.static_redriven;
        self.deleted += o.deleted;
        self.paused += o.paused;
        if o.oldest_version > 0
            && (self.oldest_version == 0 || o.oldest_version < self.oldest_version)
        {
            self.oldest_version = o.oldest_version;
        }
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
    /// Republishes pending immediate changes.
    pub static_path: StaticPath,
    pub loader: Addr<ProfileLoader>,
    pub resolver: Addr<VersionResolver>,
    pub publisher: Addr<KafkaPublisher>,
    pub dlq: Addr<DlqActor>,
    /// For probing a broker marked down.
    pub producer: FutureProducer,
    /// For probing a MongoDB marked down.
    pub mongo: MongoStore,
    pub dynamic_topic: String,
    /// Pending immediate changes older than this are republished by the scan
    /// (their request failed, or its process died before the broker's ack).
    pub static_grace: Duration,
    pub shared: Shared,
    pub sync: SyncConfig,
    /// Which shards this instance may scan (leases, fixed split or all).
    pub ownership: Arc<crate::lease::Ownership>,
    /// Held for the length of a cycle; shutdown takes it to wait for in-flight work.
    pub cycle_lock: tokio::sync::Mutex<()>,
}

/// Serves on-demand cycles ([`ScanNow`]); the scheduled cycles run in the
/// scan loop ([`run_loop`]), a supervised task of its own.
pub struct ShardScanner {
    pipeline: Arc<Pipeline>,
    restarts: u32,
}

impl ShardScanner {
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        Self {
            pipeline,
            restarts: 0,
        }
    }
}

impl ShardScanner {
    pub const NAME: &'static str = "ShardScanner";
}

impl Actor for ShardScanner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        restart_pause(self.restarts, ctx);
    }
}

impl Supervised for ShardScanner {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.restarts += 1;
    }
}

/// Runs one cycle now (besides the scheduled ones) and reports what it did.
#[derive(Message)]
#[rtype(result = "Result<CycleReport, StageError>")]
pub struct ScanNow;

impl Handler<ScanNow> for ShardScanner {
    type Result = ResponseActFuture<Self, Result<CycleReport, StageError>>;

    fn handle(&mut self, _: ScanNow, _: &mut Context<Self>) -> Self::Result {
        let p = self.pipeline.clone();
        guard(Self::NAME, p.shared.stats.clone(), async move {
            Ok(run_cycle(p).await)
        })
    }
}

/// The scheduled cycles, every `sync.interval` (or back to back in continuous
/// mode), until the engine stops. A panic in a cycle ends the loop; its
/// supervisor restarts it, and the flags of the interrupted pages stay.
pub async fn run_loop(p: Arc<Pipeline>) {
    loop {
        if p.shared.cancel.is_cancelled() {
            break;
        }
        let started = Instant::now();
        let report = run_cycle(p.clone()).await;
        let wait = if report.paused > 0 {
            // A backend is down: probe again soon rather than a full interval later.
            let soon = p.shared.retry.initial_delay;
            if p.sync.interval.is_zero() {
                soon
            } else {
                soon.min(p.sync.interval)
            }
        } else if p.sync.interval.is_zero() {
            if report.scanned == 0 && report.legacy_drained == 0 {
                p.sync.idle_backoff
            } else {
                Default::default()
            }
        } else {
            p.sync.interval.saturating_sub(started.elapsed())
        };
        tokio::select! {
            _ = p.shared.cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    tracing::info!("shard scanner stopped");
}

/// Probes each backend marked down; the first one still down pauses the cycle.
async fn backends_ready(p: &Pipeline) -> Result<(), Backend> {
    let h = &p.shared.health;
    if h.is_down(Backend::Kafka) {
        match kafka::probe(&p.producer, &p.dynamic_topic).await {
            Ok(()) => {
                h.set_up(Backend::Kafka);
            }
            Err(_) => return Err(Backend::Kafka),
        }
    }
    if h.is_down(Backend::Mongo) {
        // Only the applier's next successful write marks MongoDB up: a ping can
        // succeed while writes still fail.
        if p.mongo.ping().await.is_err() {
            return Err(Backend::Mongo);
        }
    }
    Ok(())
}

/// A backend the pipeline needs is marked down.
fn paused(p: &Pipeline) -> Option<Backend> {
    let h = &p.shared.health;
    [Backend::Kafka, Backend::Mongo]
        .into_iter()
        .find(|&b| h.is_down(b))
}

/// One pass over the legacy set and every owned shard.
pub async fn run_cycle(p: Arc<Pipeline>) -> CycleReport {
    let _cycle = p.cycle_lock.lock().await;
    let mut report = CycleReport::default();
    if p.shared.cancel.is_cancelled() {
        return report;
    }
    if let Err(b) = backends_ready(&p).await {
        // Stop pulling new work while the backend is down; the flags wait in Redis.
        report.paused = 1;
        p.shared.stats.scan_paused(b.name());
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
    let per_shard: Vec<CycleReport> = futures::stream::iter(shards_to_scan(&p).await)
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
    let age = if report.oldest_version > 0 {
        (now_us() - report.oldest_version).max(0) as f64 / 1e6
    } else {
        0.0
    };
    p.shared.stats.cycle_done(age, report.paused == 0);
    report
}

/// The owned shards that hold a flag or a pending immediate change, asked of
/// Redis all at once; the others count as scanned. In continuous mode an idle
/// service cycles every `sync.idle_backoff`, and reading each shard's flags
/// and pending changes in turn cost two round trips a shard a cycle (about 5 %
/// of a core for 64 shards). If the question fails, every owned shard is
/// scanned, and its reads report the error.
async fn shards_to_scan(p: &Pipeline) -> Vec<u32> {
    let owned = p.ownership.scannable();
    let with_work = match p.redis.shards_with_work(&owned).await {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!(error = %e, "cannot count the shards' flags; scanning every shard");
            return owned;
        }
    };
    let now = now_us() as f64 / 1e6;
    let mut scan = Vec::new();
    for (shard, work) in owned.into_iter().zip(with_work) {
        if work {
            scan.push(shard);
        } else {
            p.shared.stats.shard_scanned(shard, p.sync.shards, now);
        }
    }
    scan
}

/// Moves the legacy set's members into the sharded flags. Each batch is first
/// moved atomically into the popped set under a pop id of its own, then
/// flagged, then acknowledged by compare-and-delete on that pop id. A crash in
/// between loses nothing: members left unacknowledged for longer than
/// `sync.legacy_recovery_after` are flagged again by whichever instance sees
/// them. A member re-added and popped by another drainer meanwhile carries the
/// newer pop id, so this drainer's ack leaves it for the drainer that owns it.
async fn drain_legacy(p: &Pipeline) -> Result<u64, RedisError> {
    let page = p.sync.page_size;
    let mut drained = 0;
    let leftovers = p
        .redis
        .legacy_unacked(page, p.sync.legacy_recovery_after)
        .await?;
    if !leftovers.is_empty() {
        tracing::info!(
            members = leftovers.len(),
            "flagging legacy members a drainer popped and never acknowledged"
        );
        drained += flag_popped(p, &leftovers).await?;
        p.shared.stats.legacy_recovered(leftovers.len() as u64);
    }
    for _ in 0..MAX_LEGACY_PAGES_PER_CYCLE {
        let popped = p.redis.legacy_pop(page).await?;
        if popped.is_empty() {
            break;
        }
        if !p.shared.faults.pass(HoldPoint::LegacyPopped).await {
            break;
        }
        drained += flag_popped(p, &popped).await?;
    }
    if drained > 0 {
        p.shared.stats.legacy_drained(drained);
    }
    Ok(drained)
}

/// Flags popped legacy members, then acknowledges them.
async fn flag_popped(p: &Pipeline, popped: &[(String, i64)]) -> Result<u64, RedisError> {
    let users: Vec<String> = popped.iter().map(|(u, _)| u.clone()).collect();
    p.redis.mark(&users).await?;
    if p.shared.faults.pass(HoldPoint::LegacyMarked).await {
        p.redis.legacy_ack(popped).await?;
    }
    Ok(users.len() as u64)
}

async fn scan_shard(p: &Pipeline, shard: u32) -> CycleReport {
    let mut report = CycleReport::default();
    let mut cursor = None;
    let shared = &p.shared;
    let _busy = p.ownership.enter(shard);
    while !shared.cancel.is_cancelled() {
        if let Some(b) = paused(p) {
            report.paused += 1;
            shared.stats.scan_paused(b.name());
            return report;
        }
        // Start a page only while the lease has time left.
        let Some(ticket) = p.ownership.ticket(shard) else {
            return report;
        };
        if cursor.is_none() {
            match redrive_static(p, &ticket).await {
                Ok(n) => report.static_redriven += n,
                Err(e) => {
                    tracing::warn!(shard, error = %e, "cannot republish pending immediate changes")
                }
            }
        }
        let flags = match shared
            .retry
            .run("read flags", &shared.cancel, || {
                p.redis.read_flags(shard, cursor, p.sync.page_size)
            })
            .await
        {
            Ok(f) => f,
            Err(e) => {
                report.page_errors += 1;
                tracing::warn!(shard, error = %e, "cannot read flags; shard retried next cycle");
                return report;
            }
        };
        let Some(last) = flags.last() else { break };
        if cursor.is_none() {
            report.oldest_version = flags[0].1;
        }
        cursor = Some(last.1);
        let full = flags.len() == p.sync.page_size;
        let flags = flags
            .into_iter()
            .map(|(user_id, version)| Flag { user_id, version })
            .collect();
        match process_page(p, &ticket, flags).await {
            Ok(r) => report.add(&r),
            Err(StageError::Redis(RedisError::Fenced { .. })) => {
                shared.stats.fenced(shard);
                return report;
            }
            Err(e) => {
                report.page_errors += 1;
                tracing::warn!(shard, error = %e, "page failed; its flags stay for the next cycle");
            }
        }
        if !full {
            break;
        }
    }
    shared
        .stats
        .shard_scanned(shard, p.sync.shards, now_us() as f64 / 1e6);
    report
}

/// Publishes the shard's accepted immediate changes that the broker never
/// confirmed (Kafka was down, or the accepting process died), once they are
/// older than the grace period, and those a DLQ redrive put back in line, at
/// once, through the same static path as the immediate API.
async fn redrive_static(p: &Pipeline, ticket: &crate::lease::Ticket) -> Result<u64, StageError> {
    let shared = &p.shared;
    let pending = shared
        .retry
        .run("read pending immediate changes", &shared.cancel, || {
            p.redis.static_pending(ticket.shard)
        })
        .await?;
    let cutoff = now_us() - p.static_grace.as_micros() as i64;
    let due = pending
        .into_iter()
        .filter(|c| c.redriven || c.version < cutoff)
        .collect();
    let results = p
        .static_path
        .publish(StaticPath::items(due, ticket.epoch))
        .await?;
    let done = results.iter().filter(|r| r.is_ok()).count() as u64;
    if done > 0 {
        tracing::info!(
            shard = ticket.shard,
            published = done,
            "pending immediate changes published"
        );
    }
    Ok(done)
}
