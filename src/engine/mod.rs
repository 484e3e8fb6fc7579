//! The engine: connects the clients, starts the actors on their own arbiters
//! under supervisors, and hands back a `Send + Sync` handle to mark users, run a
//! scan, read counters and stop.
//!
//! The actors run in an actix `System` on a dedicated thread, so a host
//! application can embed the engine from any tokio runtime.

use crate::{
    actors::{
        Shared,
        applier::{ConsumerLoop, MongoApplier, PriorityGate},
        dlq::{self, DlqActor, DlqListing, RedriveTarget, Redriven},
        loader::ProfileLoader,
        publisher::{Flush, KafkaPublisher},
        resolver::VersionResolver,
        scanner::{CycleReport, Pipeline, ScanNow, ShardScanner, run_loop},
        static_path::StaticPath,
    },
    backends::BringUp,
    backlog::{Backlog, BacklogMonitor},
    cache::{AppliedCache, CacheStats},
    clients::{kafka, mongo::MongoStore, redis::RedisStore},
    config::Config,
    config::mask_url,
    faults::Faults,
    health::Backend,
    health::Health,
    jobs::keeper::Jobs,
    lease::{LeaseKeeper, Ownership, ShardInfo, ShardsReport, parse_lease},
    model::{Section, validate_user_ids},
    offsets::{ApplierContext, RangeRecorder},
    operations::OperationLog,
    profiles::{ComposedProfile, ProfileCacheStats, ProfileReader},
    sinks::{SinkReport, SinkSpec, SinkStatus},
    strategy::{ImmediateSync, Receipt, SyncContext, SyncStrategy},
    tasks::{Supervision, supervise},
    telemetry::{Stats, StatsSnapshot},
    whitelist::Whitelist,
};
use actix::{Arbiter, Supervisor};
use std::convert::Infallible;
use std::{
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};
use tokio::sync::{OwnedRwLockWriteGuard, RwLock, oneshot};
use tokio_util::sync::CancellationToken;

pub use crate::{
    error::EngineError,
    model::{Marked, ProfileWrite},
};

mod healing;
mod operations;
mod sink_loops;
mod wiring;
pub use operations::{OffsetsAnswer, OffsetsQuery, WhitelistChanged, WhitelistView};
use wiring::start_actors;

/// See [`Engine::readiness`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    /// `ready`, `degraded` or `unavailable`.
    pub status: &'static str,
    pub reasons: Vec<String>,
    /// What weakens a promise without stopping the instance: today, a Redis
    /// that loses acknowledged flags on restart (see [`crate::durability`]).
    pub warnings: Vec<String>,
}

/// A handle to a running engine. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    jobs: Jobs,
    ready: crate::backends::Ready,
    intake: Arc<SyncContext>,
    instance_id: String,
    redis: RedisStore,
    mongo: MongoStore,
    cache: AppliedCache,
    stats: Arc<Stats>,
    health: Arc<Health>,
    faults: Arc<Faults>,
    cancel: CancellationToken,
    profiles: Arc<ProfileReader>,
    ownership: Arc<Ownership>,
    members: Arc<Mutex<Vec<String>>>,
    leases_done: Mutex<Option<oneshot::Receiver<()>>>,
    pipeline: Arc<Pipeline>,
    scanner: actix::Addr<ShardScanner>,
    publisher: actix::Addr<KafkaPublisher>,
    hold: Arc<RwLock<()>>,
    applier_done: Mutex<Vec<oneshot::Receiver<()>>>,
    sinks: Vec<Arc<SinkStatus>>,
    ranges: Arc<RangeRecorder>,
    whitelist: Arc<Whitelist>,
    oplog: OperationLog,
    backlog: Arc<BacklogMonitor>,
    system: actix::System,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Publishing stays paused while this guard lives (see [`Engine::hold_publishing`]).
pub struct PublishHold(#[allow(dead_code)] OwnedRwLockWriteGuard<()>);

impl Engine {
    /// Connects to Redis, MongoDB and Kafka, creates the topics and the unique
    /// index, and starts the actors. Scanning begins at once.
    pub async fn start(config: Config) -> Result<Engine, EngineError> {
        Self::start_with_sinks(config, Vec::new()).await
    }

    /// [`Engine::start`], applying also to `sinks` of the host application's
    /// own (see [`crate::sinks::Sink`]), besides the configured ones: each
    /// gets its own consumer group, counters and dead letters.
    pub async fn start_with_sinks(
        config: Config,
        sinks: Vec<SinkSpec>,
    ) -> Result<Engine, EngineError> {
        let problems = config.validate();
        if !problems.is_empty() {
            return Err(EngineError::Invalid(problems.join("; ")));
        }
        crate::telemetry::prometheus();
        let instance_id = config.instance_id();
        let shared = Shared {
            stats: Arc::new(Stats::default()),
            health: Arc::new(Health::new()),
            retry: config.retry.clone(),
            cancel: CancellationToken::new(),
            faults: Arc::new(Faults::default()),
            instance_id: instance_id.clone(),
        };
        let hold = Arc::new(RwLock::new(()));

        let (tx, rx) = oneshot::channel();
        let thread = {
            let (config, shared, hold) = (config.clone(), shared.clone(), hold.clone());
            std::thread::Builder::new()
                .name("datasync-actors".into())
                .spawn(move || {
                    let system = actix::System::new();
                    let ok = system.block_on(async move {
                        let started = start_actors(config, shared, hold, sinks).await;
                        let ok = started.is_ok();
                        let _ = tx.send(started);
                        ok
                    });
                    if ok {
                        let _ = system.run();
                    }
                })?
        };
        let started = match rx.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => return Err(EngineError::Aborted),
        };
        tracing::info!(instance = %instance_id, mode = ?config.instance.mode, "engine started");
        let engine = Engine {
            inner: Arc::new(Inner {
                config,
                jobs: started.jobs,
                ready: started.ready,
                intake: started.intake,
                instance_id,
                redis: started.redis,
                mongo: started.mongo,
                cache: started.cache,
                stats: shared.stats,
                health: shared.health,
                faults: shared.faults,
                cancel: shared.cancel,
                profiles: started.profiles,
                ownership: started.ownership,
                members: started.members,
                leases_done: Mutex::new(Some(started.leases_done)),
                pipeline: started.pipeline,
                scanner: started.scanner,
                publisher: started.publisher,
                hold,
                applier_done: Mutex::new(started.applier_done),
                sinks: started.sinks,
                ranges: started.ranges,
                whitelist: started.whitelist,
                oplog: started.oplog,
                backlog: started.backlog,
                system: started.system,
                thread: Mutex::new(Some(thread)),
            }),
        };
        if engine.inner.config.startup.require_backends
            && let Err(e) = crate::backends::require(
                &engine.inner.ready,
                &engine.inner.health,
                &engine.inner.config,
            )
            .await
        {
            engine.shutdown(Duration::from_secs(5)).await;
            return Err(e);
        }
        Ok(engine)
    }

    /// Waits until Kafka and MongoDB have answered (topics and index in
    /// place), at most `timeout`; false if they did not in time. The engine
    /// starts without waiting for them (see [`crate::backends`]).
    pub async fn wait_for_backends(&self, timeout: Duration) -> bool {
        let ready = &self.inner.ready;
        let cancel = &self.inner.cancel;
        tokio::time::timeout(timeout, async {
            ready.wait(Backend::Kafka, cancel).await && ready.wait(Backend::Mongo, cancel).await
        })
        .await
        .unwrap_or(false)
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    pub fn redis(&self) -> &RedisStore {
        &self.inner.redis
    }

    pub fn mongo(&self) -> &MongoStore {
        &self.inner.mongo
    }

    /// This engine's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// The latest backlog sample: pending flags, pending immediate changes
    /// and the applier group's lag.
    pub fn backlog(&self) -> Backlog {
        self.inner.backlog.latest()
    }

    /// Samples the backlog now (the sampler also does every
    /// `telemetry.backlog_interval`).
    pub async fn sample_backlog(&self) -> Backlog {
        self.inner.backlog.sample().await
    }

    /// This engine's flag → applied latencies of dynamic changes (milliseconds).
    pub fn latency_histogram(&self) -> hdrhistogram::Histogram<u64> {
        self.inner.stats.latency.histogram()
    }

    /// This engine's immediate changes: request → broker ack, and request →
    /// applied in MongoDB (milliseconds).
    pub fn immediate_latency_histograms(
        &self,
    ) -> (hdrhistogram::Histogram<u64>, hdrhistogram::Histogram<u64>) {
        (
            self.inner.stats.latency_ack.histogram(),
            self.inner.stats.latency_static.histogram(),
        )
    }

    /// Flags still pending in the shards this engine owns.
    pub async fn pending_flags(&self) -> Result<u64, EngineError> {
        Ok(self
            .inner
            .redis
            .count_flags(self.inner.pipeline.ownership.candidates().iter().copied())
            .await?)
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }

    /// Flags users whose profiles are already in Redis.
    pub async fn mark_dirty(&self, user_ids: &[String]) -> Result<Vec<Marked>, EngineError> {
        self.inner.intake.mark(user_ids).await
    }

    /// Deletes users (see [`SyncContext::delete`]): answers the delete
    /// versions.
    pub async fn delete(&self, user_ids: &[String]) -> Result<Vec<Marked>, EngineError> {
        self.inner.intake.delete(user_ids).await
    }

    /// Writes each profile to Redis, then flags it. Nothing is written unless
    /// every entry is valid; if flagging fails the call fails, so the caller
    /// retries (the profiles written are simply written again).
    pub async fn write_and_mark(&self, users: &[ProfileWrite]) -> Result<Vec<Marked>, EngineError> {
        self.inner.intake.write_and_mark(users).await
    }

    /// Syncs changes with the given strategy (see [`crate::strategy`]).
    pub async fn sync(
        &self,
        strategy: &dyn SyncStrategy,
        users: &[ProfileWrite],
    ) -> Result<Vec<Receipt>, EngineError> {
        strategy.submit(&self.inner.intake, users).await
    }

    /// Syncs a critical static change at once: answers after the broker's ack
    /// with the version, partition and offset.
    pub async fn sync_immediate(
        &self,
        user_id: &str,
        profile: serde_json::Value,
    ) -> Result<Receipt, EngineError> {
        let users = [ProfileWrite {
            user_id: user_id.to_string(),
            profile,
        }];
        let mut r = self.sync(&ImmediateSync, &users).await?;
        Ok(r.remove(0))
    }

    /// The freshest composed profile of a user (see [`crate::profiles`]).
    pub async fn profile(
        &self,
        user_id: &str,
    ) -> Result<Option<Arc<ComposedProfile>>, EngineError> {
        validate_user_ids(std::iter::once(user_id)).map_err(EngineError::Invalid)?;
        Ok(self.inner.profiles.get(user_id).await?)
    }

    pub fn profile_cache_stats(&self) -> ProfileCacheStats {
        self.inner.profiles.stats()
    }

    /// Runs one scan cycle now and reports what it did.
    pub async fn scan_now(&self) -> Result<CycleReport, EngineError> {
        Ok(self
            .inner
            .scanner
            .send(ScanNow)
            .await
            .map_err(|_| EngineError::Aborted)??)
    }

    /// Pauses publishing until the returned guard is dropped: pages that reach
    /// the publisher wait (their flags stay). For maintenance and for tests that
    /// must hold a batch in flight.
    pub async fn hold_publishing(&self) -> PublishHold {
        PublishHold(self.inner.hold.clone().write_owned().await)
    }

    /// Whether this instance can take requests. Redis is what the mark API
    /// needs, so without it (or while stopping) the instance is unavailable.
    /// Kafka or MongoDB down only degrades it: flags are still accepted and wait
    /// in Redis while the scanner is paused.
    pub async fn readiness(&self) -> Readiness {
        let mut unavailable = Vec::new();
        if let Err(e) = self.inner.redis.ping().await {
            unavailable.push(format!("redis: {e}"));
        }
        unavailable.extend(self.inner.health.tasks_down());
        if self.inner.cancel.is_cancelled() {
            unavailable.push("shutting down".into());
        }
        let mut degraded = self.inner.health.problems();
        degraded.extend(self.inner.sinks.iter().filter_map(|s| s.problem()));
        if !self.inner.health.is_down(crate::health::Backend::Mongo)
            && let Err(e) = self.inner.mongo.ping().await
        {
            degraded.push(format!("mongodb: {e}"));
        }
        let status = if !unavailable.is_empty() {
            "unavailable"
        } else if !degraded.is_empty() {
            "degraded"
        } else {
            "ready"
        };
        unavailable.extend(degraded);
        Readiness {
            status,
            reasons: unavailable,
            warnings: (self.backlog().redis_durability.as_ref())
                .and_then(crate::durability::Durability::warning)
                .into_iter()
                .collect(),
        }
    }

    /// Each sink's state, counters, last error and consumer lag (the lag as
    /// of the last backlog sample).
    pub fn sinks(&self) -> Vec<SinkReport> {
        self.inner.sinks.iter().map(|s| s.report()).collect()
    }

    /// Backend outages seen and over since start, oldest first.
    pub fn outages(&self) -> Vec<crate::health::Outage> {
        self.inner.health.outages()
    }

    /// Open dead letters (up to `limit`) and the number parked for Kafka.
    pub async fn dlq_list(&self, limit: usize) -> Result<DlqListing, EngineError> {
        Ok(dlq::list(&self.inner.redis, limit).await?)
    }

    /// Re-flags the users of open dead letters and closes their entries;
    /// logged in the operation log as asked for by `by`.
    pub async fn dlq_redrive(
        &self,
        target: RedriveTarget,
        by: &str,
    ) -> Result<Redriven, EngineError> {
        if let RedriveTarget::Users(ids) = &target {
            validate_user_ids(ids.iter().map(String::as_str)).map_err(EngineError::Invalid)?;
        }
        let action = crate::operations::Action::begin("dlq_redrive", by, target.params());
        let r = dlq::redrive(&self.inner.redis, target)
            .await
            .map_err(EngineError::from);
        action.end(&self.inner.oplog, &r).await;
        let r = r?;
        self.inner.stats.flags_marked(r.redriven.len() as u64);
        Ok(r)
    }

    /// Shard ownership across the cluster, read from Redis.
    pub async fn shards(&self) -> Result<ShardsReport, EngineError> {
        let leases = self.inner.redis.leases().await?;
        let shards = leases
            .into_iter()
            .enumerate()
            .map(|(i, (value, pttl))| {
                let parsed = value.as_deref().and_then(parse_lease);
                ShardInfo {
                    shard: i as u32,
                    owner: parsed.as_ref().map(|p| p.0.clone()),
                    epoch: parsed.map(|p| p.1),
                    expires_in_ms: (pttl >= 0).then_some(pttl),
                }
            })
            .collect();
        Ok(ShardsReport {
            instance: self.inner.instance_id.clone(),
            mode: format!("{:?}", self.inner.config.instance.mode).to_lowercase(),
            members: self.inner.members.lock().expect("not poisoned").clone(),
            held: self.inner.ownership.held(),
            shards,
        })
    }

    /// Fault switches for tests and drills (see [`crate::faults`]).
    #[doc(hidden)]
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// Stops gracefully: no new scans, in-flight pages finish, the producer
    /// flushes, the applier finishes its window and commits. Gives up waiting
    /// after `timeout`; whatever was not finished is redone on the next start.
    pub async fn shutdown(&self, timeout: Duration) {
        let inner = &self.inner;
        let started = tokio::time::Instant::now();
        inner.cancel.cancel();
        inner.faults.release_all();
        let graceful = async {
            // Waits for the cycle in progress, if any.
            drop(inner.pipeline.cycle_lock.lock().await);
            // The budget is shared out so that each step gets its turn: the
            // producer's flush may take at most half, and the appliers' last
            // windows and commits have until a tenth of it is left.
            let _ = inner.publisher.send(Flush(timeout / 2)).await;
            let done = std::mem::take(&mut *inner.applier_done.lock().expect("not poisoned"));
            let appliers_by = started + timeout.mul_f64(0.9);
            let _ = tokio::time::timeout_at(appliers_by, futures::future::join_all(done)).await;
            // The offset ranges of the last windows.
            match inner.ranges.flush(&inner.redis).await {
                Ok(n) => inner.stats.offset_ranges_flushed(n as u64),
                Err(e) => tracing::warn!(error = %e, "cannot write the last offset ranges"),
            }
            // Hand the leases back so other instances take over at once.
            let leases = inner.leases_done.lock().expect("not poisoned").take();
            if let Some(leases) = leases {
                let _ = leases.await;
            }
        };
        if tokio::time::timeout(timeout, graceful).await.is_err() {
            tracing::warn!(?timeout, "graceful shutdown timed out");
        }
        inner.system.stop();
        let thread = inner.thread.lock().expect("not poisoned").take();
        if let Some(t) = thread {
            // The actor system's thread ends once its actors are dropped. A
            // consumer whose close waits on the broker (leaving its group)
            // can hold it, so the wait is bounded too: what is left of the
            // budget, and at least a few seconds for the stop itself. The
            // join runs on a thread of its own, not the blocking pool: a
            // runtime being dropped waits for its blocking tasks, so a join
            // left behind there would hang the caller's runtime forever.
            let by = (started + timeout).max(tokio::time::Instant::now() + Duration::from_secs(5));
            let (joined_tx, joined_rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let _ = joined_tx.send(t.join());
            });
            if tokio::time::timeout_at(by, joined_rx).await.is_err() {
                tracing::warn!("the actor system did not stop in time; leaving it behind");
                return;
            }
        }
        tracing::info!("engine stopped");
    }
}
