//! Raw ceilings of each backend, measured on the same machine and data as the run:
//! Redis pipelined reads, broker produce with rdkafka, MongoDB bulk upserts
//! written the way the applier writes them, and the same for each PostgreSQL
//! sink the run configures (its own multi-row upserts, straight to the
//! server).

use crate::{padding, rate};
use datasync::{
    Config,
    clients::{
        kafka,
        mongo::{Change, MongoStore, Op},
        redis::RedisStore,
    },
    model::Section,
};
use fred::prelude::*;
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::doc;
use rdkafka::producer::FutureRecord;
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone, Serialize)]
pub struct Ceilings {
    pub redis_get_per_s: f64,
    pub kafka_produce_per_s: f64,
    /// The run's own writes: its users over its rounds (inserts, then
    /// updates), in windows of `applier.window_max_events`, two written at
    /// once.
    pub mongo_bulk_upserts_per_s: f64,
    /// Per PostgreSQL sink of the run: the same windows through the sink's
    /// own statements, two at once.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub postgres_upserts_per_s: Vec<(String, f64)>,
}

/// How many windows the applier writes at once: its consumer loop submits a
/// window while the one before is still being written, then waits for that
/// one (`actors::applier::consumer`). A ceiling written as one sequential
/// stream would understate MongoDB, and ratios above 1 would follow.
const APPLIER_WINDOWS_IN_FLIGHT: usize = 2;

/// The MongoDB ceiling writes at most this many changes (about 45 s on the
/// local server), however large the run.
const MONGO_CEILING_MAX_WRITES: usize = 400_000;

pub async fn measure(
    config: &Config,
    ops: usize,
    users: usize,
    rounds: usize,
    profile_bytes: usize,
) -> anyhow::Result<Ceilings> {
    let payload = serde_json::json!({ "pad": padding(profile_bytes, 7) }).to_string();
    let mut postgres = Vec::new();
    for s in config
        .sinks
        .iter()
        .filter(|s| s.kind == datasync::config::SinkKind::Postgres)
    {
        postgres.push((
            s.name.clone(),
            postgres_upserts(config, s, ops.min(50_000), profile_bytes).await?,
        ));
    }
    Ok(Ceilings {
        redis_get_per_s: redis_gets(config, ops, &payload).await?,
        kafka_produce_per_s: kafka_produce(config, ops, &payload).await?,
        mongo_bulk_upserts_per_s: mongo_upserts(config, users, rounds, profile_bytes).await?,
        postgres_upserts_per_s: postgres,
    })
}

/// Upserts of new users into a table of the ceiling's own, with the sink's
/// statements, in windows of the sink's size, two at once.
async fn postgres_upserts(
    config: &Config,
    sink: &datasync::config::SinkConfig,
    ops: usize,
    profile_bytes: usize,
) -> anyhow::Result<f64> {
    use datasync::sinks::{Sink, postgres::PostgresSink};
    let mut c = sink.clone();
    c.table = format!("{}_ceiling", sink.table());
    let pg = PostgresSink::new(&c)?;
    pg.prepare().await?;
    let changes = upserts(ops, profile_bytes, 1);
    let window = sink
        .window_max_events
        .unwrap_or(config.applier.window_max_events)
        .max(1);
    let started = Instant::now();
    futures::stream::iter(changes.chunks(window))
        .map(|chunk| pg.apply(chunk))
        .buffer_unordered(APPLIER_WINDOWS_IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    let r = rate(ops, started.elapsed());
    let (client, conn) = tokio_postgres::connect(c.url.expose(), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS \"{}\"", c.table))
        .await?;
    Ok(r)
}

/// Version `version` of `ops` users' dynamic sections (version 1 inserts
/// them).
fn upserts(ops: usize, profile_bytes: usize, version: i64) -> Vec<Change> {
    (0..ops)
        .map(|i| Change {
            user_id: format!("user-{i:08}"),
            section: Section::Dynamic,
            version,
            op: Op::Set(doc! { "pad": padding(profile_bytes, i as u64 ^ version as u64) }),
            event_id: String::new(),
            marked_at_ms: 0,
        })
        .collect()
}

async fn redis_gets(config: &Config, ops: usize, payload: &str) -> anyhow::Result<f64> {
    let redis = RedisStore::connect(&config.redis, config.sync.shards).await?;
    let users: Vec<String> = (0..ops).map(|i| format!("ceiling-{i}")).collect();
    for chunk in users.chunks(1000) {
        let w: Vec<(String, String)> = chunk
            .iter()
            .map(|u| (u.clone(), payload.to_string()))
            .collect();
        redis.write_profiles(&w).await?;
    }
    let raw = crate::raw_redis(&config.redis).await?;
    let started = Instant::now();
    for chunk in users.chunks(1000) {
        let pipe = raw.pipeline();
        for u in chunk {
            let _: () = pipe.get(redis.keys().profile(u)).await?;
        }
        let _: Vec<Value> = pipe.all().await?;
    }
    let r = rate(ops, started.elapsed());
    let keys: Vec<String> = users.iter().map(|u| redis.keys().profile(u)).collect();
    for chunk in keys.chunks(1000) {
        let _: i64 = raw.del(chunk.to_vec()).await?;
    }
    Ok(r)
}

async fn kafka_produce(config: &Config, ops: usize, payload: &str) -> anyhow::Result<f64> {
    let mut k = config.kafka.clone();
    let topic = format!("{}-ceiling", config.kafka.dynamic_topic);
    k.static_topic = format!("{topic}-s");
    k.dynamic_topic = topic.clone();
    kafka::ensure_topics(&k).await?;
    let producer = kafka::producer(&k, "datasync-load-ceiling")?;
    // The first delivery sets up metadata and the idempotent producer id; not timed.
    producer
        .send(
            FutureRecord::to(&topic).key("warm-up").payload(payload),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)?;
    // The same loop the publisher runs: every record of a batch queued, then
    // the delivery reports awaited in order.
    let started = Instant::now();
    for chunk in (0..ops).collect::<Vec<_>>().chunks(20_000) {
        let keys: Vec<String> = chunk.iter().map(|i| format!("user-{i}")).collect();
        let records = keys.iter().map(|k| (k.as_str(), payload.as_bytes()));
        for r in kafka::send_all(&producer, &topic, records).await {
            r?;
        }
    }
    Ok(rate(ops, started.elapsed()))
}

/// Writes the run's own workload through the applier's MongoDB writes, two
/// windows at once: `rounds` passes over `users`, the first inserting them
/// and each later one replacing their profile at the next version. The
/// collection grows to the run's size, so the server's indexes are as deep
/// as end to end finds them; a ceiling over a smaller collection measured a
/// lighter workload than the run's.
async fn mongo_upserts(
    config: &Config,
    users: usize,
    rounds: usize,
    profile_bytes: usize,
) -> anyhow::Result<f64> {
    let mut m = config.mongo.clone();
    m.collection = format!("{}-ceiling", m.collection);
    let mongo = MongoStore::connect(&m, "datasync-load").await?;
    let rounds = rounds.max(1);
    let users = users.clamp(1, MONGO_CEILING_MAX_WRITES / rounds);
    let window = config.applier.window_max_events.max(1);
    let mut elapsed = Duration::ZERO;
    for round in 0..rounds {
        let changes = upserts(users, profile_bytes, round as i64 + 1);
        let started = Instant::now();
        futures::stream::iter(changes.chunks(window))
            .map(|chunk| mongo.apply(chunk))
            .buffer_unordered(APPLIER_WINDOWS_IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await?;
        elapsed += started.elapsed();
    }
    mongo.collection().drop().await?;
    Ok(rate(users * rounds, elapsed))
}
