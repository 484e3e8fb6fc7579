//! How much work is waiting: dirty flags (on every shard and on the shards
//! this instance owns), immediate changes not yet in MongoDB, and each
//! sink's consumer lag per partition. Sampled every
//! `telemetry.backlog_interval` into gauges, `GET /v1/stats` and the sinks'
//! reports (which are also written to Redis for `datasync sinks`).

use crate::durability::{self, Durability};
use crate::{
    clients::{
        kafka::{self, PartitionLag},
        redis::RedisStore,
    },
    config::Config,
    lease::Ownership,
    model::now_ms,
    sinks::SinkStatus,
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
    /// The primary sink's groups' lag on each partition of the static and
    /// dynamic topics.
    pub consumer_lag: Option<Vec<PartitionLag>>,
    /// Whether Redis keeps acknowledged flags across its restart (see
    /// [`crate::durability`]).
    pub redis_durability: Option<Durability>,
    pub sampled_at_ms: i64,
}

/// One sink and readers of its two groups' committed offsets.
struct SinkLag {
    /// Its live status; `None` when this instance runs no applier (the lag
    /// of the configured sinks is still reported).
    status: Option<Arc<SinkStatus>>,
    primary: bool,
    /// `(reader of a group, the topic it consumes)`: static, then dynamic.
    readers: Option<Vec<(Arc<kafka::Detached<BaseConsumer>>, String)>>,
}

/// Samples the backlog and keeps the latest sample.
pub struct BacklogMonitor {
    redis: RedisStore,
    ownership: Arc<Ownership>,
    sinks: Vec<SinkLag>,
    instance_id: String,
    latest: Mutex<Backlog>,
}

/// Reports older than this are dropped from Redis (their instance is gone).
const REPORT_KEPT_MS: i64 = 3_600_000;

impl BacklogMonitor {
    pub fn new(
        config: &Config,
        redis: RedisStore,
        ownership: Arc<Ownership>,
        sinks: &[Arc<SinkStatus>],
        instance_id: &str,
    ) -> Self {
        let k = &config.kafka;
        // The running sinks, or (no applier here) the configured ones.
        let targets: Vec<(String, String, bool, Option<Arc<SinkStatus>>)> = if sinks.is_empty() {
            crate::sinks::configured(config)
                .iter()
                .map(|c| {
                    let group = crate::sinks::configured_group(c, &k.consumer_group);
                    (c.name.clone(), group, c.primary, None)
                })
                .collect()
        } else {
            sinks
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        s.consumer_group.clone(),
                        s.primary,
                        Some(s.clone()),
                    )
                })
                .collect()
        };
        let sinks = targets
            .into_iter()
            .map(|(name, group, primary, status)| {
                let readers = [
                    (crate::sinks::static_group(&group), &k.static_topic),
                    (group.clone(), &k.dynamic_topic),
                ]
                .into_iter()
                .map(|(g, topic)| kafka::lag_reader(k, &g).map(|r| (Arc::new(r), topic.clone())))
                .collect::<Result<Vec<_>, _>>()
                .inspect_err(
                    |e| tracing::warn!(%e, sink = %name, "consumer lag will not be reported"),
                )
                .ok();
                SinkLag {
                    status,
                    primary,
                    readers,
                }
            })
            .collect();
        Self {
            redis,
            ownership,
            sinks,
            instance_id: instance_id.to_string(),
            latest: Mutex::new(Backlog::default()),
        }
    }

    pub fn latest(&self) -> Backlog {
        self.latest.lock().expect("backlog lock").clone()
    }

    /// Reads every part once, exports the gauges and keeps the sample.
    pub async fn sample(&self) -> Backlog {
        let (flags, statics, lags, durability) = tokio::join!(
            self.redis.flag_counts(0..self.redis.shards()),
            self.redis.count_static_pending(),
            futures::future::join_all(self.sinks.iter().map(lag)),
            durability::check(&self.redis),
        );
        let mut lag = None;
        for (s, l) in self.sinks.iter().zip(lags) {
            if s.primary {
                lag = l.clone();
            }
            if let Some(status) = &s.status {
                status.set_lag(l);
            }
        }
        self.publish_reports().await;
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

    /// Writes this instance's sink reports to Redis, and drops those of
    /// instances not heard from for an hour. Best effort.
    async fn publish_reports(&self) {
        let reports: Vec<_> = (self.sinks.iter())
            .filter_map(|s| s.status.as_ref().map(|s| s.report()))
            .collect();
        if reports.is_empty() {
            return;
        }
        let json = serde_json::to_string(&reports).expect("reports serialize");
        if let Err(e) = self.redis.put_sink_reports(&self.instance_id, &json).await {
            tracing::debug!(%e, "sink reports not written");
            return;
        }
        let Ok(all) = self.redis.sink_reports().await else {
            return;
        };
        let gone: Vec<String> = all
            .into_iter()
            .filter(|(_, json)| {
                let newest = serde_json::from_str::<Vec<crate::sinks::SinkReport>>(json)
                    .ok()
                    .and_then(|r| r.first().map(|r| r.reported_at.clone()))
                    .and_then(|t| humantime::parse_rfc3339_weak(&t).ok());
                newest.is_none_or(|t| {
                    let age = std::time::SystemTime::now()
                        .duration_since(t)
                        .unwrap_or_default();
                    age.as_millis() as i64 > REPORT_KEPT_MS
                })
            })
            .map(|(instance, _)| instance)
            .collect();
        if let Err(e) = self.redis.remove_sink_reports(&gone).await {
            tracing::debug!(%e, "old sink reports not removed");
        }
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

/// One sink's lag: each group on its topic; `None` when not readable.
async fn lag(s: &SinkLag) -> Option<Vec<PartitionLag>> {
    let readers = s.readers.clone()?;
    tokio::task::spawn_blocking(move || {
        let mut all = Vec::new();
        for (reader, topic) in &readers {
            all.extend(kafka::consumer_lag(reader, std::slice::from_ref(topic))?);
        }
        Ok::<_, rdkafka::error::KafkaError>(all)
    })
    .await
    .ok()?
    .inspect_err(|e| tracing::debug!(%e, "consumer lag not read"))
    .ok()
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
