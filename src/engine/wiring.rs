//! The wiring: connects the clients, starts the actors on their own arbiters
//! under supervisors, and spawns the supervised tasks (the scan loop, the
//! consumer loops, the lease keeper, the dead-letter forwarder, the job
//! keeper and the tombstone purge). Runs once,
//! on the engine's actor thread.

use super::sink_loops::SinkLoops;
use super::*;

/// What the actor thread hands back to [`Engine::start`].
pub(super) struct Started {
    pub(super) jobs: Jobs,
    pub(super) ready: crate::backends::Ready,
    pub(super) intake: Arc<SyncContext>,
    pub(super) profiles: Arc<ProfileReader>,
    pub(super) redis: RedisStore,
    pub(super) mongo: MongoStore,
    pub(super) cache: AppliedCache,
    pub(super) ownership: Arc<Ownership>,
    pub(super) members: Arc<Mutex<Vec<String>>>,
    pub(super) leases_done: oneshot::Receiver<()>,
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) scanner: actix::Addr<ShardScanner>,
    pub(super) publisher: actix::Addr<KafkaPublisher>,
    pub(super) applier_done: Vec<oneshot::Receiver<()>>,
    pub(super) sinks: Vec<Arc<SinkStatus>>,
    pub(super) ranges: Arc<RangeRecorder>,
    pub(super) whitelist: Arc<Whitelist>,
    pub(super) oplog: OperationLog,
    pub(super) backlog: Arc<BacklogMonitor>,
    pub(super) system: actix::System,
}

pub(super) async fn start_actors(
    config: Config,
    shared: Shared,
    hold: Arc<RwLock<()>>,
    extra_sinks: Vec<SinkSpec>,
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
        config.cache.mongo_fallback,
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
    let ranges = Arc::new(RangeRecorder::default());
    let whitelist = Whitelist::load(redis.clone()).await;
    let oplog = OperationLog::new(
        redis.clone(),
        config.operations.max_entries,
        &shared.instance_id,
    );
    start_operations_tasks(&config, &shared, &supervision, &redis, &ranges, &whitelist);
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

    // Per sink, two consumer loops, each with its own MongoApplier: static
    // changes (their own consumer group, small windows) go first; the
    // dynamic loop waits while a static window is being written.
    let mut applier_done = Vec::new();
    let mut sink_statuses = Vec::new();
    if config.applier.enabled {
        let specs = crate::sinks::build(&config, &mongo, extra_sinks)
            .await
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        for spec in specs {
            let group = crate::sinks::consumer_group(&spec, &config.kafka.consumer_group);
            let status = Arc::new(
                SinkStatus::new(
                    &spec.name,
                    spec.sink.kind(),
                    spec.primary,
                    &group,
                    &spec.target,
                )
                .writing_mongo(spec.writes_mongo),
            );
            sink_statuses.push(status.clone());
            let sink = SinkLoops {
                spec,
                status,
                group,
                config: &config,
                shared: &shared,
                supervision: &supervision,
                mailbox: mb.applier,
                dlq: &dlq,
                cache: &cache,
                profiles: &profiles,
                redis: &redis,
                ready: &ready,
                ranges: &ranges,
            };
            applier_done.extend(sink.start());
        }
    }

    let jobs = Jobs {
        redis: redis.clone(),
        mongo: mongo.clone(),
        stats: shared.stats.clone(),
        cancel: shared.cancel.clone(),
        config: config.clone(),
        ownership: ownership.clone(),
        instance_id: shared.instance_id.clone(),
        arbiter: Arbiter::current(),
        running: Default::default(),
        whitelist: whitelist.clone(),
        profiles: profiles.clone(),
        oplog: oplog.clone(),
    };
    {
        let jobs = jobs.clone();
        actix::spawn(supervise("job keeper", supervision.clone(), move || {
            Ok::<_, Infallible>(jobs.clone().run_keeper())
        }));
    }
    if !config.sync.tombstone_purge_interval.is_zero() {
        let (mongo, stats, cancel) = (mongo.clone(), shared.stats.clone(), shared.cancel.clone());
        let (retention, every) = (
            config.sync.tombstone_retention,
            config.sync.tombstone_purge_interval,
        );
        actix::spawn(supervise(
            "tombstone purge",
            supervision.clone(),
            move || {
                Ok::<_, Infallible>(crate::jobs::purge::run(
                    mongo.clone(),
                    stats.clone(),
                    cancel.clone(),
                    retention,
                    every,
                ))
            },
        ));
    }

    let backlog = Arc::new(BacklogMonitor::new(
        &config,
        redis.clone(),
        ownership.clone(),
        &sink_statuses,
        &shared.instance_id,
    ));
    {
        let (backlog, every, cancel) = (
            backlog.clone(),
            config.telemetry.backlog_interval,
            shared.cancel.clone(),
        );
        actix::spawn(supervise(
            "backlog sampler",
            supervision.clone(),
            move || Ok::<_, Infallible>(backlog.clone().run(every, cancel.clone())),
        ));
    }

    Ok(Started {
        backlog,
        jobs,
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
        sinks: sink_statuses,
        ranges,
        whitelist,
        oplog,
        system: actix::System::current(),
    })
}

/// The offset-range flusher and cleanup, and the whitelist's refresher.
fn start_operations_tasks(
    config: &Config,
    shared: &Shared,
    supervision: &Supervision,
    redis: &RedisStore,
    ranges: &Arc<RangeRecorder>,
    whitelist: &Arc<Whitelist>,
) {
    let (redis, stats, cancel) = (redis.clone(), shared.stats.clone(), shared.cancel.clone());
    {
        let (ranges, redis, stats, cancel) =
            (ranges.clone(), redis.clone(), stats.clone(), cancel.clone());
        let every = config.replay.flush_interval;
        actix::spawn(supervise(
            "offset range flusher",
            supervision.clone(),
            move || {
                Ok::<_, Infallible>(crate::offsets::run_flusher(
                    ranges.clone(),
                    redis.clone(),
                    stats.clone(),
                    every,
                    cancel.clone(),
                ))
            },
        ));
    }
    if !config.replay.cleanup_interval.is_zero() {
        let (redis, stats, cancel) = (redis.clone(), stats.clone(), cancel.clone());
        let replay = config.replay.clone();
        actix::spawn(supervise(
            "offset range cleanup",
            supervision.clone(),
            move || {
                Ok::<_, Infallible>(crate::offsets::run_cleanup(
                    redis.clone(),
                    stats.clone(),
                    replay.clone(),
                    cancel.clone(),
                ))
            },
        ));
    }
    let (whitelist, every) = (whitelist.clone(), config.whitelist.refresh_interval);
    actix::spawn(supervise(
        "whitelist refresher",
        supervision.clone(),
        move || Ok::<_, Infallible>(whitelist.clone().run(every, cancel.clone())),
    ));
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
