//! The engine: connects the clients, starts the actors on their own arbiters
//! under supervisors, and hands back a `Send + Sync` handle to mark users, run a
//! scan, read counters and stop.
//!
//! The actors run in an actix `System` on a dedicated thread, so a host
//! application can embed the engine from any tokio runtime.

use crate::{
    actors::{
        Shared,
        applier::{ConsumerLoop, MongoApplier, PriorityGate, Role},
        dlq::{self, DlqActor, DlqListing, RedriveTarget, Redriven},
        loader::ProfileLoader,
        publisher::{Flush, KafkaPublisher},
        resolver::VersionResolver,
        scanner::{CycleReport, Pipeline, ScanNow, ShardScanner},
    },
    cache::{AppliedCache, CacheStats},
    clients::{
        kafka,
        mongo::{MongoError, MongoStore},
        redis::{RedisError, RedisStore},
    },
    config::Config,
    faults::Faults,
    health::Health,
    lease::{LeaseKeeper, Ownership, ShardInfo, ShardsReport, parse_lease},
    profiles::{ComposedProfile, ProfileCacheStats, ProfileReader},
    strategy::{ImmediateSync, Receipt, SyncStrategy},
    telemetry::{Stats, StatsSnapshot},
};
use actix::{Arbiter, Supervisor};
use std::{
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};
use tokio::sync::{OwnedRwLockWriteGuard, RwLock, oneshot};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot connect to redis: {0}")]
    Redis(#[from] RedisError),
    #[error("cannot connect to mongodb: {0}")]
    Mongo(#[from] MongoError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot start the actor thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the actor system stopped while starting")]
    Aborted,
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error(transparent)]
    Stage(#[from] crate::actors::StageError),
    #[error(transparent)]
    ProfileRead(#[from] crate::profiles::ProfileReadError),
    /// An immediate change was accepted (and is kept) but Kafka did not take it.
    #[error(
        "{reason}; the change (version {version}) is kept and will be published when Kafka answers"
    )]
    NotPublished { version: i64, reason: String },
}

/// A user to write and flag.
#[derive(Debug, Clone)]
pub struct ProfileWrite {
    pub user_id: String,
    /// A JSON object.
    pub profile: serde_json::Value,
}

/// The version allocated for a flagged user.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Marked {
    pub user_id: String,
    pub version: i64,
}

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
        Ok(Engine {
            inner: Arc::new(Inner {
                config,
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
        })
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
        validate_user_ids(user_ids.iter().map(String::as_str))?;
        self.mark_valid(user_ids).await
    }

    /// Flags users whose ids were already validated.
    async fn mark_valid(&self, user_ids: &[String]) -> Result<Vec<Marked>, EngineError> {
        let marked = self.inner.redis.mark(user_ids).await?;
        // The mark script dropped the shared L2 entries; drop ours too.
        for u in user_ids {
            self.inner.profiles.invalidate_local(u).await;
        }
        self.inner.stats.flags_marked(marked.len() as u64);
        Ok(marked
            .into_iter()
            .map(|(user_id, version)| Marked { user_id, version })
            .collect())
    }

    /// Writes each profile to Redis, then flags it. Nothing is written unless
    /// every entry is valid; if flagging fails the call fails, so the caller
    /// retries (the profiles written are simply written again).
    pub async fn write_and_mark(&self, users: &[ProfileWrite]) -> Result<Vec<Marked>, EngineError> {
        validate_writes(users)?;
        let writes: Vec<(String, String)> = users
            .iter()
            .map(|u| (u.user_id.clone(), u.profile.to_string()))
            .collect();
        self.inner.redis.write_profiles(&writes).await?;
        let ids: Vec<String> = users.iter().map(|u| u.user_id.clone()).collect();
        self.mark_valid(&ids).await
    }

    /// Syncs changes with the given strategy (see [`crate::strategy`]).
    pub async fn sync(
        &self,
        strategy: &dyn SyncStrategy,
        users: &[ProfileWrite],
    ) -> Result<Vec<Receipt>, EngineError> {
        strategy.submit(self, users).await
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
        validate_user_ids(std::iter::once(user_id))?;
        Ok(self.inner.profiles.get(user_id).await?)
    }

    pub fn profile_cache_stats(&self) -> ProfileCacheStats {
        self.inner.profiles.stats()
    }

    /// What the sync strategies need of the engine.
    pub(crate) fn parts(&self) -> Parts<'_> {
        Parts {
            redis: &self.inner.redis,
            publisher: &self.inner.publisher,
            dlq: &self.inner.pipeline.dlq,
            static_topic: &self.inner.config.kafka.static_topic,
            profiles: &self.inner.profiles,
            stats: &self.inner.stats,
        }
    }

    /// Runs one scan cycle now and reports what it did.
    pub async fn scan_now(&self) -> Result<CycleReport, EngineError> {
        self.inner
            .scanner
            .send(ScanNow)
            .await
            .map_err(|_| EngineError::Aborted)
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
            validate_user_ids(ids.iter().map(String::as_str))?;
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
        inner.cancel.cancel();
        inner.faults.release_all();
        let graceful = async {
            // Waits for the cycle in progress, if any.
            drop(inner.pipeline.cycle_lock.lock().await);
            let _ = inner.publisher.send(Flush(timeout)).await;
            let done = std::mem::take(&mut *inner.applier_done.lock().expect("not poisoned"));
            futures::future::join_all(done).await;
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

/// Checks ids and that every profile is a JSON object, naming the first problem.
pub(crate) fn validate_writes(users: &[ProfileWrite]) -> Result<(), EngineError> {
    validate_user_ids(users.iter().map(|u| u.user_id.as_str()))?;
    for (i, u) in users.iter().enumerate() {
        if !u.profile.is_object() {
            return Err(EngineError::Invalid(format!(
                "users[{i}].profile: must be a JSON object"
            )));
        }
    }
    Ok(())
}

/// Borrowed pieces of a running engine, for [`crate::strategy`].
pub(crate) struct Parts<'a> {
    pub redis: &'a RedisStore,
    pub publisher: &'a actix::Addr<KafkaPublisher>,
    pub dlq: &'a actix::Addr<DlqActor>,
    pub static_topic: &'a String,
    pub profiles: &'a ProfileReader,
    pub stats: &'a Stats,
}

fn validate_user_ids<'a>(ids: impl Iterator<Item = &'a str>) -> Result<(), EngineError> {
    let mut n = 0;
    for (i, id) in ids.enumerate() {
        n += 1;
        if id.is_empty() {
            return Err(EngineError::Invalid(format!(
                "user_ids[{i}]: must not be empty"
            )));
        }
        if id.len() > 256 {
            return Err(EngineError::Invalid(format!(
                "user_ids[{i}]: longer than 256 bytes"
            )));
        }
        if id.chars().any(char::is_control) {
            return Err(EngineError::Invalid(format!(
                "user_ids[{i}]: contains control characters"
            )));
        }
    }
    if n == 0 {
        return Err(EngineError::Invalid("user_ids: must not be empty".into()));
    }
    Ok(())
}

async fn start_actors(
    config: Config,
    shared: Shared,
    hold: Arc<RwLock<()>>,
) -> Result<Started, EngineError> {
    let redis = RedisStore::connect(&config.redis, config.sync.shards).await?;
    let mongo = MongoStore::connect(&config.mongo, &shared.instance_id).await?;
    if config.kafka.create_topics {
        kafka::ensure_topics(&config.kafka).await?;
    }
    let producer = kafka::producer(&config.kafka, &shared.instance_id)?;
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

    let ownership = Arc::new(Ownership::new(&config));
    let members = Arc::new(Mutex::new(Vec::new()));
    let keeper = LeaseKeeper {
        redis: redis.clone(),
        ownership: ownership.clone(),
        instance_id: shared.instance_id.clone(),
        token: LeaseKeeper::token_for(&shared.instance_id),
        ttl: config.lease.ttl,
        cancel: shared.cancel.clone(),
        faults: shared.faults.clone(),
        members: members.clone(),
    };
    let (leases_tx, leases_done) = oneshot::channel();
    actix::spawn(async move {
        keeper.run().await;
        let _ = leases_tx.send(());
    });

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
        let (redis, producer, topic, every, shared) = (
            redis.clone(),
            producer.clone(),
            config.kafka.dlq_topic.clone(),
            config.dlq.forward_interval,
            shared.clone(),
        );
        Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |ctx| {
            ctx.set_mailbox_capacity(mb.dlq);
            DlqActor::new(redis, producer, topic, every, shared)
        })
    };
    let pipeline = Arc::new(Pipeline {
        redis: redis.clone(),
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

    // Two consumer loops, each with its own MongoApplier: static changes (their
    // own consumer group, small windows) go first; the dynamic loop waits while
    // a static window is being written.
    let mut applier_done = Vec::new();
    if config.applier.enabled {
        let gate = Arc::new(PriorityGate::default());
        let static_group = format!("{}-static", config.kafka.consumer_group);
        for (role, topic, group) in [
            (Role::Static, &config.kafka.static_topic, &static_group),
            (
                Role::Dynamic,
                &config.kafka.dynamic_topic,
                &config.kafka.consumer_group,
            ),
        ] {
            let consumer = kafka::consumer(&config.kafka, group, &shared.instance_id)?;
            rdkafka::consumer::Consumer::subscribe(&consumer, &[topic.as_str()])?;
            let applier = {
                let (mongo, shared) = (mongo.clone(), shared.clone());
                Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |ctx| {
                    ctx.set_mailbox_capacity(mb.applier);
                    MongoApplier::new(mongo, shared)
                })
            };
            let mut window = config.applier.clone();
            if role == Role::Static {
                window.window_max_events = window.window_max_events.min(500);
                window.window_max_wait = config.applier.static_window_wait;
            }
            let (done_tx, done_rx) = oneshot::channel();
            let consumer_loop = ConsumerLoop {
                consumer,
                applier,
                dlq: dlq.clone(),
                cache: cache.clone(),
                profiles: profiles.clone(),
                redis: redis.clone(),
                config: window,
                shared: shared.clone(),
                role,
                gate: gate.clone(),
            };
            actix::spawn(async move {
                consumer_loop.run().await;
                let _ = done_tx.send(());
            });
            applier_done.push(done_rx);
        }
    }

    Ok(Started {
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
