//! The seed's algorithm as written in its design notes (seed 000), for
//! comparison. The producer side (DocSyncProducer): one dirty set; per cycle
//! SMEMBERS, filter by hash; per user GET, send and wait for the ack, SREM.
//! The consumer side: per record, read the document's dataVersion and
//! `updateOne` with the optimistic lock on it.
//!
//! The seed runs the two sides as separate services that overlap, so the
//! end-to-end figure runs them concurrently (the consumer reads the topic while
//! the producer fills it). The figure of both sides in one sequential loop is
//! kept beside it: it is what earlier reports compared against.

use crate::{padding, rate};
use datasync::{
    Config,
    clients::{kafka, mongo::MongoStore, redis::RedisStore},
    shard::shard_of,
};
use fred::prelude::*;
use mongodb::{
    Collection,
    bson::{DateTime, Document, doc},
};
use rdkafka::{
    Message as _, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone, Serialize)]
pub struct Baseline {
    /// Users per second, Redis → Kafka → MongoDB, with the producer and the
    /// consumer running as two overlapping services, as the seed runs them.
    pub end_to_end_users_per_s: f64,
    /// The same with both sides in one sequential loop (one user at a time
    /// through both), as earlier reports measured it.
    pub end_to_end_sequential_users_per_s: f64,
    /// Users per second of the producer side alone (no MongoDB write).
    pub producer_side_users_per_s: f64,
}

/// How the seed's two sides are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    ProducerOnly,
    Sequential,
    TwoServices,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::ProducerOnly => "producer",
            Mode::Sequential => "sequential",
            Mode::TwoServices => "two-services",
        }
    }
}

pub async fn run(config: &Config, users: usize, profile_bytes: usize) -> anyhow::Result<Baseline> {
    Ok(Baseline {
        end_to_end_users_per_s: seed(config, users, profile_bytes, Mode::TwoServices).await?,
        end_to_end_sequential_users_per_s: seed(config, users, profile_bytes, Mode::Sequential)
            .await?,
        producer_side_users_per_s: seed(config, users, profile_bytes, Mode::ProducerOnly).await?,
    })
}

/// The seed's consumer side for one record: read `dataVersion`, then update
/// under the optimistic lock on it (or insert the first version).
async fn seed_apply(coll: &Collection<Document>, user: &str, data: &str) -> anyhow::Result<()> {
    let current = coll.find_one(doc! { "userId": user }).await?;
    match current.and_then(|d| d.get_i64("dataVersion").ok()) {
        Some(v) => {
            coll.update_one(
                doc! { "userId": user, "dataVersion": v },
                doc! { "$set": { "dynamicProfile": data, "updatedAt": DateTime::now() },
                "$inc": { "dataVersion": 1i64 } },
            )
            .await?;
        }
        None => {
            coll.insert_one(doc! { "userId": user, "dynamicProfile": data,
            "dataVersion": 1i64, "updatedAt": DateTime::now() })
                .await?;
        }
    }
    Ok(())
}

/// The seed's consumer service: reads the topic from the beginning of every
/// partition (assigned, so no group join is timed) and applies each record,
/// until `users` are applied.
async fn seed_consumer(
    brokers: &str,
    topic: &str,
    partitions: i32,
    coll: &Collection<Document>,
    users: usize,
) -> anyhow::Result<()> {
    let consumer = datasync::clients::kafka::Detached::new(
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("{topic}-reader"))
            .set("enable.auto.commit", "false")
            .create::<StreamConsumer>()?,
    );
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut done = 0;
    while done < users {
        let m = tokio::time::timeout(Duration::from_secs(120), consumer.recv())
            .await
            .map_err(|_| anyhow::anyhow!("the seed consumer read nothing for 120s"))??;
        let user = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        let data = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
        seed_apply(coll, &user, &data).await?;
        done += 1;
    }
    Ok(())
}

/// The seed's producer service: drains the dirty set one user at a time; in
/// sequential mode it also applies each user itself before the next.
async fn seed_producer(
    raw: &Client,
    redis: &RedisStore,
    set: &str,
    producer: &FutureProducer,
    topic: &str,
    apply_inline: Option<&Collection<Document>>,
) -> anyhow::Result<usize> {
    let (instance_id, total) = (0u32, 1u32);
    let mut done = 0;
    loop {
        let members: Vec<String> = raw.smembers(set).await?;
        if members.is_empty() {
            return Ok(done);
        }
        for user in members.iter().filter(|u| shard_of(u, total) == instance_id) {
            let data: Option<String> = raw.get(redis.keys().profile(user)).await?;
            let Some(data) = data else { continue };
            producer
                .send(
                    FutureRecord::to(topic).key(user.as_str()).payload(&data),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)?;
            let _: i64 = raw.srem(set, user.as_str()).await?;
            if let Some(coll) = apply_inline {
                seed_apply(coll, user, &data).await?;
            }
            done += 1;
        }
    }
}

async fn seed(
    config: &Config,
    users: usize,
    profile_bytes: usize,
    mode: Mode,
) -> anyhow::Result<f64> {
    let redis = RedisStore::connect(&config.redis, config.sync.shards).await?;
    let tag = mode.name();
    let set = format!("{}:seed-dirty-{tag}", config.redis.key_prefix);
    let ids: Vec<String> = (0..users).map(|i| format!("seed-{tag}-{i}")).collect();
    let writes: Vec<(String, String)> = ids
        .iter()
        .enumerate()
        .map(|(i, u)| {
            (
                u.clone(),
                serde_json::json!({ "pad": padding(profile_bytes, i as u64) }).to_string(),
            )
        })
        .collect();
    for chunk in writes.chunks(1000) {
        redis.write_profiles(chunk).await?;
    }
    let raw = crate::raw_redis(&config.redis).await?;
    for chunk in ids.chunks(1000) {
        let _: i64 = raw.sadd(&set, chunk.to_vec()).await?;
    }
    let mut k = config.kafka.clone();
    k.dynamic_topic = format!("{}-seed-{tag}", config.kafka.dynamic_topic);
    k.static_topic = format!("{}-seed-{tag}-s", config.kafka.dynamic_topic);
    // The seed sends one record and waits for its ack: no batching delay.
    k.linger = Duration::ZERO;
    kafka::ensure_topics(&k).await?;
    let producer = kafka::producer(&k, "datasync-load-seed")?;
    let mut m = config.mongo.clone();
    m.collection = format!("{}-seed-{tag}", m.collection);
    let mongo = MongoStore::connect(&m, "datasync-load-seed").await?;
    let coll = mongo.collection();

    let started = Instant::now();
    let done = match mode {
        Mode::ProducerOnly => {
            seed_producer(&raw, &redis, &set, &producer, &k.dynamic_topic, None).await?
        }
        Mode::Sequential => {
            seed_producer(&raw, &redis, &set, &producer, &k.dynamic_topic, Some(&coll)).await?
        }
        Mode::TwoServices => {
            let (produced, consumed) = tokio::join!(
                seed_producer(&raw, &redis, &set, &producer, &k.dynamic_topic, None),
                seed_consumer(&k.brokers, &k.dynamic_topic, k.partitions, &coll, users),
            );
            consumed?;
            produced?
        }
    };
    let r = rate(done, started.elapsed());
    coll.drop().await?;
    Ok(r)
}
