//! Kafka: the idempotent producer, the applier's consumer, topic creation,
//! and what a replay needs (its own assign-only consumer, partitions,
//! watermarks and time lookups, removing its group).

use crate::config::KafkaConfig;
use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer},
    error::KafkaError,
    producer::FutureProducer,
    types::RDKafkaErrorCode,
};
use std::time::Duration;

/// The brokers and the `[kafka.client]` pass-through (SASL, SSL…); the
/// properties datasync relies on are set after it, and config validation
/// refuses them in `[kafka.client]`.
fn base(c: &KafkaConfig) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    c.client.apply_to(&mut cfg);
    cfg.set("bootstrap.servers", &c.brokers);
    cfg
}

/// Idempotent producer, acks=all; librdkafka retries internally within
/// `message.timeout.ms` (idempotence needs them).
pub fn producer(c: &KafkaConfig, client_id: &str) -> Result<FutureProducer, KafkaError> {
    base(c)
        .set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            c.message_timeout.as_millis().to_string(),
        )
        .set("linger.ms", c.linger.as_millis().to_string())
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
}

/// A consumer whose drop never blocks its owner. rust-rdkafka closes a
/// consumer that has a group id when it is dropped, polling until librdkafka
/// reports it closed, with no bound: a close the broker never completes holds
/// the dropping thread forever (a tokio worker, or a runtime being shut down
/// that waits for its blocking tasks). Dropped, this hands the consumer to a
/// thread of its own that closes it and ends. Used for the short-lived and
/// side consumers (lag readers, replays); the appliers' consumers close on
/// the actor system's thread, whose join at shutdown is bounded.
pub struct Detached<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> Detached<T> {
    pub fn new(consumer: T) -> Self {
        Self(Some(consumer))
    }
}

impl<T: Send + 'static> std::ops::Deref for Detached<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_ref().expect("present until dropped")
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            // If no thread can be started, the closure and the consumer in it
            // are dropped here, as an undetached consumer would be.
            let _ = std::thread::Builder::new()
                .name("kafka-close".into())
                .spawn(move || drop(consumer));
        }
    }
}

/// What every consumer here shares: manual offsets only, from the earliest
/// offset when none is known, and fetches that wait at most
/// `kafka.fetch_max_wait` at the broker.
fn consumer_base(c: &KafkaConfig, group: &str, client_id: &str) -> ClientConfig {
    let mut cfg = base(c);
    cfg.set("client.id", client_id)
        .set("group.id", group)
        .set(
            "fetch.wait.max.ms",
            c.fetch_max_wait.as_millis().max(1).to_string(),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    cfg
}

/// How much a consumer fetches ahead of its loop, unless `[kafka.client]`
/// says otherwise: librdkafka's defaults (100,000 records a partition, up to
/// 64 MB) filled with a backlog, and the engine's memory grew with it.
/// Eight windows of records, at most 16 MB, keep a window's gathering from
/// ever waiting on the broker.
const PREFETCH_WINDOWS: usize = 8;
const PREFETCH_MAX_KBYTES: &str = "16384";
/// How much one fetch brings, compressed: a partition's share and the whole
/// response. The queue bounds above are checked before a fetch is sent, not
/// against what it brings back, and with librdkafka's defaults (1 MB a
/// partition, 50 MB a response) one fetch from a backlog overshot them by
/// tens of thousands of records: a profile's JSON compresses well, and each
/// record's decompressed batch and queue entry stayed in memory until the
/// loop took it (24 MB of decompressed batches and 13 MB of queue entries
/// at 100,000 users, by a heap profile). A batch larger than these is
/// still fetched whole.
const FETCH_PARTITION_BYTES: &str = "262144";
const FETCH_MAX_BYTES: usize = 1 << 20;

/// The applier's consumer: manual commits only, from the earliest offset,
/// fetching about [`PREFETCH_WINDOWS`] windows of `window_max_events` ahead,
/// [`FETCH_PARTITION_BYTES`] a partition at a time;
/// `context` sees its rebalances.
pub fn consumer<C: ConsumerContext + 'static>(
    c: &KafkaConfig,
    group: &str,
    client_id: &str,
    window_max_events: usize,
    context: C,
) -> Result<StreamConsumer<C>, KafkaError> {
    let mut cfg = consumer_base(c, group, client_id);
    let per_partition = (window_max_events * PREFETCH_WINDOWS / c.partitions.max(1) as usize)
        .clamp(1_000, 100_000)
        .to_string();
    // librdkafka refuses a fetch.max.bytes below message.max.bytes.
    let fetch_max = c
        .client
        .0
        .get("message.max.bytes")
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(FETCH_MAX_BYTES, |m| m.max(FETCH_MAX_BYTES))
        .to_string();
    for (key, value) in [
        ("queued.min.messages", per_partition.as_str()),
        ("queued.max.messages.kbytes", PREFETCH_MAX_KBYTES),
        ("max.partition.fetch.bytes", FETCH_PARTITION_BYTES),
        ("fetch.max.bytes", fetch_max.as_str()),
    ] {
        if !c.client.0.contains_key(key) {
            cfg.set(key, value);
        }
    }
    cfg.set(
        "session.timeout.ms",
        c.session_timeout.as_millis().to_string(),
    )
    .set(
        "heartbeat.interval.ms",
        (c.session_timeout.as_millis() / 3).max(100).to_string(),
    )
    .set("enable.partition.eof", "false")
    .create_with_context(context)
}

/// A replay's consumer: partitions are assigned with explicit offsets, it
/// never commits and never joins `group` (librdkafka needs a group id to
/// assign), and it reports the end of each partition.
pub fn replay_consumer(
    c: &KafkaConfig,
    group: &str,
    client_id: &str,
) -> Result<Detached<StreamConsumer>, KafkaError> {
    consumer_base(c, group, client_id)
        .set("enable.partition.eof", "true")
        .create()
        .map(Detached::new)
}

/// Where a partition's window may start, as the broker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionBounds {
    pub partition: i32,
    /// The low watermark: the first offset held. (The high watermark is not
    /// used: some Kafka-protocol brokers report it wrong; a replay ends at
    /// the partition's end as the fetches report it.)
    pub low: i64,
    /// The first offset whose record time is at least the time asked for
    /// (`Some(Ok(None))` when no record is that new; `Some(Err)` when the
    /// broker could not say).
    pub at_time: Option<Result<Option<i64>, String>>,
}

/// The partitions of `topic` (only `only` when given) with their low
/// watermarks, and the offset at `time` (Unix ms) when given. Blocking
/// calls, run on the blocking pool.
pub async fn partition_bounds(
    c: &KafkaConfig,
    topic: &str,
    only: Option<i32>,
    time: Option<i64>,
) -> Result<Vec<PartitionBounds>, String> {
    let (c, topic) = (c.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        // No group id: metadata, watermarks and offsets by time need none,
        // and a consumer without one has no group to close when dropped.
        let consumer: rdkafka::consumer::BaseConsumer =
            base(&c).create().map_err(|e| e.to_string())?;
        let md = consumer
            .fetch_metadata(Some(&topic), LOOKUP_TIMEOUT)
            .map_err(|e| format!("cannot read the metadata of `{topic}`: {e}"))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .ok_or_else(|| format!("topic `{topic}` does not exist"))?;
        let mut parts: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        parts.sort();
        if let Some(p) = only {
            if !parts.contains(&p) {
                return Err(format!(
                    "partition {p}: topic `{topic}` has partitions 0..{}",
                    parts.len()
                ));
            }
            parts = vec![p];
        }
        let mut out = Vec::with_capacity(parts.len());
        for p in parts {
            let (low, _) = consumer
                .fetch_watermarks(&topic, p, LOOKUP_TIMEOUT)
                .map_err(|e| {
                    format!("cannot read the watermarks of `{topic}` partition {p}: {e}")
                })?;
            let at_time = time.map(|ms| {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&topic, p, Offset::Offset(ms))
                    .map_err(|e| e.to_string())?;
                let found = consumer
                    .offsets_for_times(tpl, LOOKUP_TIMEOUT)
                    .map_err(|e| e.to_string())?;
                let offset = found.elements().first().map(|e| e.offset());
                match offset {
                    Some(Offset::Offset(o)) => Ok(Some(o.max(low))),
                    Some(Offset::End) => Ok(None),
                    other => Err(format!("no offset for the time ({other:?})")),
                }
            });
            out.push(PartitionBounds {
                partition: p,
                low,
                at_time,
            });
        }
        Ok(out)
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// Removes a consumer group; one that does not exist is fine.
pub async fn delete_group(c: &KafkaConfig, group: &str) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base(c).create()?;
    let opts = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
    for r in admin.delete_groups(&[group], &opts).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// How long one metadata, watermark or time lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the sync and dead-letter topics; ones that exist are fine.
pub async fn ensure_topics(c: &KafkaConfig) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base(c).create()?;
    let topics: Vec<NewTopic> = [&c.static_topic, &c.dynamic_topic, &c.dlq_topic]
        .into_iter()
        .map(|t| NewTopic::new(t, c.partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(ADMIN_TIMEOUT))
        .request_timeout(Some(ADMIN_TIMEOUT));
    for result in admin.create_topics(&topics, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// A Kafka error in words for people: librdkafka's admin timeouts say how
/// long was waited.
pub fn describe(e: &KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::OperationTimedOut) => {
            format!("operation timed out after {ADMIN_TIMEOUT:?}")
        }
        _ => e.to_string(),
    }
}

/// How long a topic creation may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one record may wait for room in librdkafka's local queue.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the broker stored a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

/// Publishes one record keyed by `key` and waits for its delivery report.
pub async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> Result<Delivered, KafkaError> {
    let record = rdkafka::producer::FutureRecord::to(topic)
        .key(key)
        .payload(payload);
    producer
        .send(record, QUEUE_TIMEOUT)
        .await
        .map(|d| Delivered {
            partition: d.partition,
            offset: d.offset,
        })
        .map_err(|(e, _)| e)
}

/// Publishes records keyed by their first element and waits for every
/// delivery report; one result per record, in order. Every record is queued
/// before any report is awaited, and the reports are then awaited in order:
/// the caller's task wakes about once per batch rather than once per record,
/// and no task is spawned per record (a page of thousands of records through
/// `join_all` of [`send`] spent a tenth of its time in that bookkeeping). A
/// record that finds librdkafka's queue full waits for room, as [`send`]
/// does, before the next one is queued.
pub async fn send_all<'a>(
    producer: &FutureProducer,
    topic: &str,
    records: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Vec<Result<Delivered, KafkaError>> {
    use rdkafka::producer::{DeliveryFuture, FutureRecord};
    enum Queued {
        Report(DeliveryFuture),
        Done(Result<Delivered, KafkaError>),
    }
    let records = records.into_iter();
    let mut queued = Vec::with_capacity(records.size_hint().0);
    for (key, payload) in records {
        let record = FutureRecord::to(topic).key(key).payload(payload);
        queued.push(match producer.send_result(record) {
            Ok(report) => Queued::Report(report),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Queued::Done(send(producer, topic, key, payload).await)
            }
            Err((e, _)) => Queued::Done(Err(e)),
        });
    }
    let mut out = Vec::with_capacity(queued.len());
    for q in queued {
        out.push(match q {
            Queued::Done(r) => r,
            Queued::Report(report) => match report.await {
                Ok(Ok(d)) => Ok(Delivered {
                    partition: d.partition,
                    offset: d.offset,
                }),
                Ok(Err((e, _))) => Err(e),
                // The producer dropped the report without answering: it is
                // shutting down.
                Err(_) => Err(KafkaError::Canceled),
            },
        });
    }
    out
}

/// Asks the cluster for `topic`'s metadata: the broker answers and knows the
/// topic. Used to probe a broker that was marked down.
pub async fn probe(producer: &FutureProducer, topic: &str) -> Result<(), KafkaError> {
    use rdkafka::producer::Producer;
    let producer = producer.clone();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let md = producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(2))?;
        let ok = md
            .topics()
            .iter()
            .any(|t| t.error().is_none() && t.partitions().iter().all(|p| p.leader() >= 0));
        if ok {
            Ok(())
        } else {
            Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::LeaderNotAvailable,
            ))
        }
    })
    .await
    .unwrap_or(Err(KafkaError::Canceled))
}

/// How far a consumer group is behind on one partition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset; `None` when it has committed nothing.
    pub committed: Option<i64>,
    /// The partition's end offset (high watermark).
    pub end: i64,
    /// Records between the committed offset (or the partition's start when
    /// nothing is committed) and the end.
    pub lag: i64,
}

/// A client that reads `group`'s committed offsets without joining it.
pub fn lag_reader(c: &KafkaConfig, group: &str) -> Result<Detached<BaseConsumer>, KafkaError> {
    consumer_base(c, group, "datasync-lag")
        .create()
        .map(Detached::new)
}

/// `reader`'s group's lag on every partition of `topics`. Blocking: run it
/// on the blocking pool.
pub fn consumer_lag(
    reader: &BaseConsumer,
    topics: &[String],
) -> Result<Vec<PartitionLag>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let md = reader.fetch_metadata(Some(topic), LOOKUP_TIMEOUT)?;
        for t in md.topics().iter().filter(|t| t.error().is_none()) {
            for p in t.partitions() {
                tpl.add_partition(topic, p.id());
            }
        }
    }
    let committed = reader.committed_offsets(tpl, LOOKUP_TIMEOUT)?;
    let mut out = Vec::new();
    for e in committed.elements() {
        let (low, end) = reader.fetch_watermarks(e.topic(), e.partition(), LOOKUP_TIMEOUT)?;
        let committed = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        out.push(PartitionLag {
            topic: e.topic().to_string(),
            partition: e.partition(),
            committed,
            end,
            lag: (end - committed.unwrap_or(low)).max(0),
        });
    }
    out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use rdkafka::consumer::DefaultConsumerContext;

    fn kafka(toml: &str) -> KafkaConfig {
        Config::from_layers(&[("test.toml".into(), toml.into())], std::iter::empty())
            .expect("config")
            .kafka
    }

    /// librdkafka refuses a `fetch.max.bytes` below `message.max.bytes`:
    /// the consumer's bounded fetch size must rise with a larger record size.
    #[tokio::test]
    async fn a_consumer_takes_a_record_size_above_its_fetch_size() {
        let c = kafka("[kafka.client]\n\"message.max.bytes\" = \"4000000\"\n");
        let made = consumer(&c, "g", "c", 5000, DefaultConsumerContext);
        assert!(made.is_ok(), "{:?}", made.err());
        let made = consumer(&kafka(""), "g", "c", 5000, DefaultConsumerContext);
        assert!(made.is_ok(), "{:?}", made.err());
    }
}
