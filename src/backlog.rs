//! How much work is waiting: dirty flags (on every shard and on the shards
//! this instance owns), immediate changes not yet in MongoDB, and the
//! applier group's lag per partition. Sampled every `telemetry.backlog_interval`
//! into gauges and into `GET /v1/stats`.

use crate::durability::{self, Durability};
use crate::{
    clients::{
        kafka::{self, PartitionLag},
        redis::RedisStore,
    },
    config::Config,
    lease::Ownership,
    model::now_ms,
    telemetry::names,
};
use metrics::gauge;
use rdkafka::consumer::BaseConsumer;
use serde::Serialize;
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio_util::sync::CancellationToken;

/// One sample; a part that could not be read is `None` (its backend is down).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Backlog {
    pub pending_flags_total: Option<u64>,
    pub pending_flags_owned: Option<u64>,
    pub pending_static: Option<u64>,
    /// The applier group's lag on each partition of the static and dynamic
    /// topics.
    pub consumer_lag: Option<Vec<PartitionLag>>,
    /// Whether Redis keeps acknowledged flags across its restart (see
    /// [`crate::durability`]).
    pub redis_durability: Option<Durability>,
    pub sampled_at_ms: i64,
}

/// Samples the backlog and keeps the latest sample.
pub struct BacklogMonitor {
    redis: RedisStore,
    ownership: Arc<Ownership>,
    topics: Vec<String>,
    reader: Option<Arc<BaseConsumer>>,
    latest: Mutex<Backlog>,
}

impl BacklogMonitor {
    pub fn new(config: &Config, redis: RedisStore, ownership: Arc<Ownership>) -> Self {
        let k = &config.kafka;
        let reader = kafka::lag_reader(k, &k.consumer_group)
            .inspect_err(|e| tracing::warn!(%e, "consumer lag will not be reported"))
            .ok()
            .map(Arc::new);
        Self {
            redis,
            ownership,
            topics: vec![k.static_topic.clone(), k.dynamic_topic.clone()],
            reader,
            latest: Mutex::new(Backlog::default()),
        }
    }

    pub fn latest(&self) -> Backlog {
        self.latest.lock().expect("backlog lock").clone()
    }

    /// Reads every part once, exports the gauges and keeps the sample.
    pub async fn sample(&self) -> Backlog {
        let (flags, statics, lag, durability) = tokio::join!(
            self.redis.flag_counts(0..self.redis.shards()),
            self.redis.count_static_pending(),
            self.lag(),
            durability::check(&self.redis),
        );
        // One read of every shard gives both the total and this instance's part.
        let flags = flags.ok();
        let owned = flags.as_ref().map(|per_shard| {
            self.ownership
                .scannable()
                .into_iter()
                .filter_map(|s| per_shard.get(s as usize))
                .sum()
        });
        let b = Backlog {
            pending_flags_total: flags.as_ref().map(|per_shard| per_shard.iter().sum()),
            pending_flags_owned: owned,
            pending_static: statics.ok(),
            consumer_lag: lag,
            redis_durability: Some(durability),
            sampled_at_ms: now_ms(),
        };
        export(&b);
        let previous =
            std::mem::replace(&mut *self.latest.lock().expect("backlog lock"), b.clone());
        // Said once at start and again whenever it changes, not every sample.
        if previous.redis_durability != b.redis_durability
            && let Some(warning) = b.redis_durability.as_ref().and_then(Durability::warning)
        {
            tracing::warn!("{warning}");
        }
        b
    }

    async fn lag(&self) -> Option<Vec<PartitionLag>> {
        let reader = self.reader.clone()?;
        let topics = self.topics.clone();
        tokio::task::spawn_blocking(move || kafka::consumer_lag(&reader, &topics))
            .await
            .ok()?
            .inspect_err(|e| tracing::debug!(%e, "consumer lag not read"))
            .ok()
    }

    pub async fn run(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        loop {
            self.sample().await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

fn export(b: &Backlog) {
    let set = |name: &'static str, v: Option<u64>| {
        if let Some(v) = v {
            gauge!(name).set(v as f64);
        }
    };
    set(names::PENDING_FLAGS_TOTAL, b.pending_flags_total);
    set(names::PENDING_FLAGS_OWNED, b.pending_flags_owned);
    set(names::PENDING_STATIC, b.pending_static);
    for p in b.consumer_lag.iter().flatten() {
        gauge!(
            names::CONSUMER_LAG,
            "topic" => p.topic.clone(),
            "partition" => p.partition.to_string()
        )
        .set(p.lag as f64);
    }
}
