//! The seed's algorithm as written in its design notes (seed 000), for
//! comparison: one dirty set; per cycle SMEMBERS, filter by hash; per user GET,
//! send and wait for the ack, SREM, then read the document's dataVersion and
//! `updateOne` with the optimistic lock on it.

use crate::{padding, rate};
use datasync::{
    Config,
    clients::{kafka, mongo::MongoStore, redis::RedisStore},
    shard::shard_of,
};
use fred::prelude::*;
use mongodb::bson::{DateTime, doc};
use rdkafka::producer::FutureRecord;
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone, Serialize)]
pub struct Baseline {
    /// Users per second, Redis → Kafka → MongoDB, one at a time.
    pub end_to_end_users_per_s: f64,
    /// Users per second of the producer side alone (no MongoDB write).
    pub producer_side_users_per_s: f64,
}

pub async fn run(config: &Config, users: usize, profile_bytes: usize) -> anyhow::Result<Baseline> {
    Ok(Baseline {
        end_to_end_users_per_s: seed_loop(config, users, profile_bytes, true).await?,
        producer_side_users_per_s: seed_loop(config, users, profile_bytes, false).await?,
    })
}

async fn seed_loop(
    config: &Config,
    users: usize,
    profile_bytes: usize,
    with_mongo: bool,
) -> anyhow::Result<f64> {
    let redis = RedisStore::connect(&config.redis, config.sync.shards).await?;
    let set = format!("{}:seed-dirty-{with_mongo}", config.redis.key_prefix);
    let ids: Vec<String> = (0..users)
        .map(|i| format!("seed-{with_mongo}-{i}"))
        .collect();
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
    k.dynamic_topic = format!("{}-seed", config.kafka.dynamic_topic);
    k.static_topic = format!("{}-seed-s", config.kafka.dynamic_topic);
    // The seed sends one record and waits for its ack: no batching delay.
    k.linger = Duration::ZERO;
    kafka::ensure_topics(&k).await?;
    let producer = kafka::producer(&k, "datasync-load-seed")?;
    let mut m = config.mongo.clone();
    m.collection = format!("{}-seed", m.collection);
    let mongo = MongoStore::connect(&m, "datasync-load-seed").await?;
    let coll = mongo.collection();
    let (instance_id, total) = (0u32, 1u32);

    let started = Instant::now();
    let mut done = 0;
    loop {
        let members: Vec<String> = raw.smembers(&set).await?;
        if members.is_empty() {
            break;
        }
        for user in members.iter().filter(|u| shard_of(u, total) == instance_id) {
            let data: Option<String> = raw.get(redis.keys().profile(user)).await?;
            let Some(data) = data else { continue };
            producer
                .send(
                    FutureRecord::to(&k.dynamic_topic)
                        .key(user.as_str())
                        .payload(&data),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)?;
            let _: i64 = raw.srem(&set, user.as_str()).await?;
            if with_mongo {
                let current = coll.find_one(doc! { "userId": user.as_str() }).await?;
                match current.and_then(|d| d.get_i64("dataVersion").ok()) {
                    Some(v) => {
                        coll.update_one(
                            doc! { "userId": user.as_str(), "dataVersion": v },
                            doc! { "$set": { "dynamicProfile": &data, "updatedAt": DateTime::now() },
                                   "$inc": { "dataVersion": 1i64 } },
                        )
                        .await?;
                    }
                    None => {
                        coll.insert_one(doc! { "userId": user.as_str(), "dynamicProfile": &data,
                        "dataVersion": 1i64, "updatedAt": DateTime::now() })
                            .await?;
                    }
                }
            }
            done += 1;
        }
    }
    let r = rate(done, started.elapsed());
    coll.drop().await?;
    Ok(r)
}
