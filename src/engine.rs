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
    cache::{AppliedCache, CacheStats},
    clients::{kafka, mongo::MongoStore, redis::RedisStore},
    config::Config,
    faults::Faults,
    health::Health,
    lease::{LeaseKeeper, Ownership, ShardInfo, ShardsReport, parse_lease},
    model::{Section, validate_user_ids},
    profiles::{ComposedProfile, ProfileCacheStats, ProfileReader},
    strategy::{ImmediateSync, Receipt, SyncContext, SyncStrategy},
    telemetry::{Stats, StatsSnapshot},
};
use crate::{
    backends::BringUp,
    config::mask_url,
    health::Backend,
    tasks::{Supervision, supervise},
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

/// See [`Engine::readiness`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    /// `ready`, `degraded` or `unavailable`.
    pub status: &'static str,
    pub reasons: Vec<String>,
}

/// A handle to a running engine. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
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
    system: actix::System,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Publishing stays paused while this guard lives (see [`Engine::hold_publishing`]).
pub struct PublishHold(#[allow(dead_code)] OwnedRwLockWriteGuard<()>);

struct Started {
    ready: crate::backends::Ready,
    intake: Arc<SyncContext>,
    profiles: Arc<ProfileReader>,
    redis: RedisStore,
    mongo: MongoStore,
    cache: AppliedCache,
    ownership: Arc<Ownership>,
    members: Arc<Mutex<Vec<String>>>,
    leases_done: oneshot::Receiver<()>,
    pipeline: Arc<Pipeline>,
    scanner: actix::Addr<ShardScanner>,
    publisher: actix::Addr<KafkaPublisher>,
    applier_done: Vec<oneshot::Receiver<()>>,
    system: actix::System,
}

impl Engine {
    /// Connects to Redis, MongoDB and Kafka, creates the topics and the unique
    /// index, and starts the actors. Scanning begins at once.
    pub async fn start(config: Config) -> Result<Engine, EngineError> {
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
                        let started = start_actors(config, shared, hold).await;
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
        }
    }

    /// Backend outages seen and over since start, oldest first.
    pub fn outages(&self) -> Vec<crate::health::Outage> {
        self.inner.health.outages()
    }

    /// Open dead letters (up to `limit`) and the number parked for Kafka.
    pub async fn dlq_list(&self, limit: usize) -> Result<DlqListing, EngineError> {
        Ok(dlq::list(&self.inner.redis, limit).await?)
    }

    /// Re-flags the users of open dead letters and closes their entries.
    pub async fn dlq_redrive(&self, target: RedriveTarget) -> Result<Redriven, EngineError> {
        if let RedriveTarget::Users(ids) = &target {
            validate_user_ids(ids.iter().map(String::as_str)).map_err(EngineError::Invalid)?;
        }
        let r = dlq::redrive(&self.inner.redis, target).await?;
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
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        tracing::info!("engine stopped");
    }
}

async fn start_actors(
    config: Config,
    shared: Shared,
    hold: Arc<RwLock<()>>,
) -> Result<Started, EngineError> {
    // Redis first, and required; Kafka and MongoDB come up in the background.
    let redis = crate::backends::connect_redis(&config).await?;
    let mongo = MongoStore::connect_without_index(&config.mongo, &shared.instance_id).await?;
    let producer = kafka::producer(&config.kafka, &shared.instance_id)?;
    let ready = BringUp {
        kafka: config.kafka.clone(),
        producer: producer.clone(),
        mongo: mongo.clone(),
        mongo_url: mask_url(config.mongo.url.expose()),
        health: shared.health.clone(),
        retry: config.retry.clone(),
        cancel: shared.cancel.clone(),
    }
    .start();
    let cache = AppliedCache::new(
        config.cache.l1_capacity,
        config.cache.l1_ttl,
        redis.clone(),
        mongo.clone(),
    );
    let mb = config.mailbox.clone();
    let profiles = Arc::new(ProfileReader::new(
        &config.cache,
        redis.clone(),
        mongo.clone(),
    ));

    let supervision = Supervision {
        health: shared.health.clone(),
        stats: shared.stats.clone(),
        cancel: shared.cancel.clone(),
    };
    let ownership = Arc::new(Ownership::new(&config));
    let members = Arc::new(Mutex::new(Vec::new()));
    let leases_done = start_lease_keeper(&config, &shared, &ownership, &members, &supervision)?;

    let loader = {
        let (redis, shared) = (redis.clone(), shared.clone());
        Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |ctx| {
            ctx.set_mailbox_capacity(mb.loader);
            ProfileLoader::new(redis, shared)
        })
    };
    let resolver = {
        let (cache, shared) = (cache.clone(), shared.clone());
        Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |ctx| {
            ctx.set_mailbox_capacity(mb.resolver);
            VersionResolver::new(cache, shared)
        })
    };
    let publisher = {
        let (kafka, producer, shared) = (config.kafka.clone(), producer.clone(), shared.clone());
        Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |ctx| {
            ctx.set_mailbox_capacity(mb.publisher);
            KafkaPublisher::new(producer, &kafka, shared, hold)
        })
    };
    let dlq = {
        let (redis, producer, topic, shared) = (
            redis.clone(),
            producer.clone(),
            config.kafka.dlq_topic.clone(),
            shared.clone(),
        );
        Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |ctx| {
            ctx.set_mailbox_capacity(mb.dlq);
            DlqActor::new(redis, producer, topic, shared)
        })
    };
    {
        let (redis, producer, topic, every, shared) = (
            redis.clone(),
            producer.clone(),
            config.kafka.dlq_topic.clone(),
            config.dlq.forward_interval,
            shared.clone(),
        );
        actix::spawn(supervise("dlq forwarder", supervision.clone(), move || {
            Ok::<_, Infallible>(dlq::run_forwarder(
                redis.clone(),
                producer.clone(),
                topic.clone(),
                shared.clone(),
                every,
            ))
        }));
    }
    let static_path = StaticPath {
        redis: redis.clone(),
        publisher: publisher.clone(),
        dlq: dlq.clone(),
        topic: config.kafka.static_topic.clone(),
    };
    let intake = Arc::new(SyncContext {
        redis: redis.clone(),
        profiles: profiles.clone(),
        stats: shared.stats.clone(),
        static_path: static_path.clone(),
    });
    let pipeline = Arc::new(Pipeline {
        redis: redis.clone(),
        static_path,
        loader,
        resolver,
        publisher: publisher.clone(),
        dlq: dlq.clone(),
        producer,
        mongo: mongo.clone(),
        dynamic_topic: config.kafka.dynamic_topic.clone(),
        static_grace: config.kafka.message_timeout,
        shared: shared.clone(),
        sync: config.sync.clone(),
        ownership: ownership.clone(),
        cycle_lock: tokio::sync::Mutex::new(()),
    });
    let scanner = {
        let pipeline = pipeline.clone();
        Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |ctx| {
            ctx.set_mailbox_capacity(mb.scanner);
            ShardScanner::new(pipeline)
        })
    };
    {
        let pipeline = pipeline.clone();
        actix::spawn(supervise("scan loop", supervision.clone(), move || {
            Ok::<_, Infallible>(run_loop(pipeline.clone()))
        }));
    }

    // Two consumer loops, each with its own MongoApplier: static changes (their
    // own consumer group, small windows) go first; the dynamic loop waits while
    // a static window is being written.
    let mut applier_done = Vec::new();
    if config.applier.enabled {
        let gate = Arc::new(PriorityGate::default());
        let static_group = format!("{}-static", config.kafka.consumer_group);
        for (role, topic, group) in [
            (Section::Static, &config.kafka.static_topic, &static_group),
            (
                Section::Dynamic,
                &config.kafka.dynamic_topic,
                &config.kafka.consumer_group,
            ),
        ] {
            let applier = {
                let (mongo, shared) = (mongo.clone(), shared.clone());
                Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |ctx| {
                    ctx.set_mailbox_capacity(mb.applier);
                    MongoApplier::new(mongo, shared)
                })
            };
            let mut window = config.applier.clone();
            if role == Section::Static {
                window.window_max_events = window.window_max_events.min(500);
                window.window_max_wait = config.applier.static_window_wait;
            }
            let (done_tx, done_rx) = oneshot::channel();
            // A fresh consumer at every (re)start, once its topic exists and
            // the unique index is there: it resumes from the group's committed
            // offsets, so a window in flight when the loop died is read again,
            // never skipped.
            let make = {
                let (kafka, group, topic) = (config.kafka.clone(), group.clone(), topic.clone());
                let (dlq, cache, profiles, redis, shared, gate, ready) = (
                    dlq.clone(),
                    cache.clone(),
                    profiles.clone(),
                    redis.clone(),
                    shared.clone(),
                    gate.clone(),
                    ready.clone(),
                );
                move || {
                    let (kafka, group, topic) = (kafka.clone(), group.clone(), topic.clone());
                    let (applier, dlq, cache, profiles, redis, config, shared, gate, ready) = (
                        applier.clone(),
                        dlq.clone(),
                        cache.clone(),
                        profiles.clone(),
                        redis.clone(),
                        window.clone(),
                        shared.clone(),
                        gate.clone(),
                        ready.clone(),
                    );
                    Ok::<_, Infallible>(async move {
                        if !ready.wait(Backend::Kafka, &shared.cancel).await
                            || !ready.wait(Backend::Mongo, &shared.cancel).await
                        {
                            return;
                        }
                        let consumer = match kafka::consumer(&kafka, &group, &shared.instance_id)
                            .and_then(|c| {
                                rdkafka::consumer::Consumer::subscribe(&c, &[topic.as_str()])
                                    .map(|()| c)
                            }) {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::error!(error = %e, %topic, "cannot create the consumer");
                                return;
                            }
                        };
                        ConsumerLoop {
                            consumer,
                            applier,
                            dlq,
                            cache,
                            profiles,
                            redis,
                            config,
                            shared,
                            role,
                            gate,
                            last_commit: Default::default(),
                        }
                        .run()
                        .await
                    })
                }
            };
            let name = match role {
                Section::Static => "static consumer loop",
                Section::Dynamic => "dynamic consumer loop",
            };
            let supervision = supervision.clone();
            actix::spawn(async move {
                supervise(name, supervision, make).await;
                let _ = done_tx.send(());
            });
            applier_done.push(done_rx);
        }
    }

    Ok(Started {
        ready,
        intake,
        profiles,
        redis,
        mongo,
        cache,
        ownership,
        members,
        leases_done,
        pipeline,
        scanner,
        publisher,
        applier_done,
        system: actix::System::current(),
    })
}

/// Starts the lease keeper on a thread of its own, with its own runtime and
/// Redis connections, so that nothing else the engine runs (a slow commit, a
/// busy actor thread) can delay a renewal past half the TTL. Supervised like
/// the other tasks; its token stays the same across restarts, so the leases it
/// holds stay its own. The receiver fires once it has released its leases.
fn start_lease_keeper(
    config: &Config,
    shared: &Shared,
    ownership: &Arc<Ownership>,
    members: &Arc<Mutex<Vec<String>>>,
    supervision: &Supervision,
) -> Result<oneshot::Receiver<()>, EngineError> {
    let (tx, rx) = oneshot::channel();
    let (redis_config, shards) = (config.redis.clone(), config.sync.shards);
    let keeper = LeaseKeeper {
        redis: None,
        ownership: ownership.clone(),
        instance_id: shared.instance_id.clone(),
        token: LeaseKeeper::token_for(&shared.instance_id),
        ttl: config.lease.ttl,
        cancel: shared.cancel.clone(),
        faults: shared.faults.clone(),
        members: members.clone(),
    };
    let supervision = supervision.clone();
    std::thread::Builder::new()
        .name("datasync-leases".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds");
            rt.block_on(supervise("lease keeper", supervision, || {
                let (mut keeper, redis_config) = (keeper.clone(), redis_config.clone());
                Ok::<_, Infallible>(async move {
                    match RedisStore::connect(&redis_config, shards).await {
                        Ok(r) => {
                            keeper.redis = Some(r);
                            keeper.run().await;
                        }
                        Err(e) => tracing::warn!(error = %e, "lease keeper cannot reach redis"),
                    }
                })
            }));
            let _ = tx.send(());
        })?;
    Ok(rx)
}
