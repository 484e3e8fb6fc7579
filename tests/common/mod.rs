//! Shared helpers of the integration tests. They talk to the real local stack
//! (`scripts/stack.sh up`); endpoints come from the environment with loopback
//! defaults. Every test gets its own key prefix, topics, consumer group and
//! collection, so tests run in parallel.
#![allow(dead_code)]

use datasync::{
    Config, Engine, ProfileWrite,
    clients::{mongo::MongoStore, redis::RedisStore},
};
use mongodb::bson::Document;
use std::{future::Future, time::Duration};

mod postgres;
mod processes;
// Each test binary uses some of them.
#[allow(unused_imports)]
pub use postgres::*;
#[allow(unused_imports)]
pub use processes::*;

pub fn redis_url() -> String {
    std::env::var("DATASYNC_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn mongo_url() -> String {
    std::env::var("DATASYNC_TEST_MONGO_URL")
        .unwrap_or_else(|_| "mongodb://127.0.0.1:27017/?retryWrites=false".into())
}

pub fn kafka_brokers() -> String {
    std::env::var("DATASYNC_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A unique name for one test's resources.
pub fn unique(name: &str) -> String {
    format!(
        "t-{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// The TOML of a test config: its own namespace everywhere, continuous scanning.
pub fn config_toml(ns: &str) -> String {
    format!(
        r#"
[instance]
id = "{ns}"
[lease]
ttl = "3s"
[redis]
url = "{redis}"
key_prefix = "{ns}"
profile_key = "{ns}:user:{{id}}:profile"
legacy_dirty_set = "{ns}:legacy"
[kafka]
brokers = "{kafka}"
static_topic = "{ns}-static"
dynamic_topic = "{ns}-dynamic"
dlq_topic = "{ns}-dlq"
consumer_group = "{ns}-applier"
partitions = 2
session_timeout = "6s"
[mongo]
url = "{mongo}"
database = "datasync_test"
collection = "{ns}"
[sync]
interval = "0s"
shards = 8
page_size = 500
idle_backoff = "20ms"
[applier]
window_max_wait = "100ms"
[http]
enabled = false
bind = "127.0.0.1:0"
[shutdown]
timeout = "20s"
"#,
        redis = redis_url(),
        kafka = kafka_brokers(),
        mongo = mongo_url(),
    )
}

/// The test config of `ns` with `extra` TOML layered over it.
pub fn config_with(ns: &str, extra: &str) -> Config {
    Config::from_layers(
        &[
            ("test".into(), config_toml(ns)),
            ("extra".into(), extra.to_string()),
        ],
        std::iter::empty(),
    )
    .expect("test config is valid")
}

/// A test's namespace: its key prefix, topics, consumer groups and
/// collection, all named after it. Dropping it deletes its keys and its
/// collection, also when the test panics, so a failed test leaves nothing
/// behind to slow the servers down.
pub struct Namespace(String);

impl Namespace {
    pub fn new(name: &str) -> Self {
        Self(unique(name))
    }
}

impl std::ops::Deref for Namespace {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let ns = self.0.clone();
        // A runtime of its own on a thread of its own: drop may run inside the
        // test's runtime, or while it unwinds.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(30), cleanup(&ns)).await;
            });
        })
        .join();
    }
}

pub fn test_config(ns: &str) -> Config {
    Config::from_layers(&[("test".into(), config_toml(ns))], std::iter::empty())
        .expect("test config is valid")
}

/// Polls `cond` until it holds or `timeout` passes; panics naming `what`.
/// The pause between polls grows from 50 ms to 1 s: many conditions count
/// documents, and a MongoDB-wire server scanning a large collection every
/// 50 ms for the length of a long wait slows the very writes being waited
/// for (and every other test's).
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(50);
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep_until(tokio::time::Instant::now() + pause).await;
        pause = (pause * 3 / 2).min(Duration::from_secs(1));
    }
}

/// [`wait_until`], naming the engine's counters, readiness and sinks when
/// it times out, so a stall says where the pipeline stopped.
pub async fn wait_for_engine<F, Fut>(engine: &Engine, what: &str, timeout: Duration, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let waited = tokio::time::timeout(
        timeout + Duration::from_secs(1),
        wait_until(what, Duration::from_secs(3600), cond),
    )
    .await;
    if waited.is_err() {
        panic!(
            "timed out after {timeout:?} waiting for: {what}\nstats: {:?}\nreadiness: {:?}\nsinks: {:?}\nbacklog: {:?}",
            engine.stats(),
            engine.readiness().await,
            engine.sinks(),
            engine.backlog()
        );
    }
}

/// Removes the keys of `ns` from the local three-master Redis Cluster
/// (`scripts/stack.sh cluster`), node by node: each master holds some.
pub async fn cleanup_cluster(ns: &str) {
    for port in 7001..=7003 {
        let c = fred::prelude::Builder::from_config(
            fred::prelude::Config::from_url(&format!("redis://127.0.0.1:{port}")).unwrap(),
        )
        .build()
        .unwrap();
        if fred::prelude::ClientLike::init(&c).await.is_ok() {
            let keys: Vec<String> = fred::prelude::KeysInterface::scan_page(
                &c,
                "0",
                format!("*{ns}*"),
                Some(100_000),
                None,
            )
            .await
            .map(|(_, k): (String, Vec<String>)| k)
            .unwrap_or_default();
            for k in keys {
                let _: Result<i64, _> = fred::prelude::KeysInterface::del(&c, k).await;
            }
        }
    }
}

/// Starts an engine on the test config of `ns`, and waits for Kafka and
/// MongoDB to answer (topics and index in place).
pub async fn start(ns: &str) -> Engine {
    start_with(test_config(ns)).await
}

pub async fn redis(ns: &str) -> RedisStore {
    let c = test_config(ns);
    RedisStore::connect(&c.redis, c.sync.shards)
        .await
        .expect("redis")
}

/// A store over one shard, so every user of a test lands in the same
/// scripts' calls.
pub async fn one_shard_redis(ns: &str) -> RedisStore {
    RedisStore::connect(&test_config(ns).redis, 1)
        .await
        .expect("redis")
}

pub async fn mongo(ns: &str) -> MongoStore {
    MongoStore::connect(&test_config(ns).mongo, "tests")
        .await
        .expect("mongo")
}

/// A user's stored version of one section (`staticVersion` or
/// `dynamicVersion`); 0 when the user or the section is not there.
pub async fn version_of(m: &MongoStore, user: &str, section: datasync::model::Section) -> i64 {
    let (_, field) = section.mongo_fields();
    m.find_user(user)
        .await
        .unwrap()
        .and_then(|d| d.get_i64(field).ok())
        .unwrap_or(0)
}

/// The collection holds at least `n` documents, from its estimated size:
/// a check to make before counting or reading by field, which reads every
/// document and costs the local MongoDB-wire server as much as the writes
/// being waited for.
pub async fn holds_at_least(mongo: &MongoStore, n: u64) -> bool {
    let size = mongo.collection().estimated_document_count().await;
    size.is_ok_and(|size| size >= n)
}

/// Every expected user is in MongoDB at its expected dynamic version; the
/// collection's size first ([`holds_at_least`]), then only two fields read.
pub async fn all_at_dynamic(
    mongo: &MongoStore,
    expected: &std::collections::HashMap<String, i64>,
) -> bool {
    use futures::TryStreamExt;
    if !holds_at_least(mongo, expected.len() as u64).await {
        return false;
    }
    let Ok(mut cursor) = mongo
        .collection()
        .find(mongodb::bson::doc! {})
        .projection(mongodb::bson::doc! { "_id": 0, "userId": 1, "dynamicVersion": 1 })
        .await
    else {
        return false;
    };
    let mut ok = 0;
    while let Ok(Some(d)) = cursor.try_next().await {
        let user = d.get_str("userId").unwrap_or_default();
        if expected.get(user) == d.get_i64("dynamicVersion").ok().as_ref() {
            ok += 1;
        }
    }
    ok == expected.len()
}

pub async fn count_docs(m: &MongoStore, filter: Document) -> u64 {
    m.collection().count_documents(filter).await.expect("count")
}

/// Sum of every shard's pending flags.
pub async fn pending_flags(r: &RedisStore) -> u64 {
    r.count_flags(0..r.shards()).await.expect("zcard")
}

pub fn profile(user: &str, generation: i64) -> ProfileWrite {
    ProfileWrite {
        user_id: user.to_string(),
        profile: serde_json::json!({ "name": format!("user {user}"), "gen": generation, "tags": ["a", "b"] }),
    }
}

/// `(user, profile JSON)` pairs carrying `generation`, for `write_profiles`.
pub fn generation_profiles(users: &[String], generation: i64) -> Vec<(String, String)> {
    users
        .iter()
        .map(|u| {
            (
                u.clone(),
                serde_json::json!({ "gen": generation }).to_string(),
            )
        })
        .collect()
}

/// An HTTP client for the tests. It runs on the ring provider the service
/// installs, so it is installed first.
pub fn http_client() -> reqwest::Client {
    datasync::tls::ensure_provider();
    reqwest::Client::new()
}

/// A plain Redis client of the test's own, for setting up what the upstream
/// or a crash would leave (raw keys, sets), and for cleaning up.
pub async fn raw_redis() -> fred::clients::Client {
    use fred::prelude::*;
    let client = Builder::from_config(Config::from_url(&redis_url()).unwrap())
        .build()
        .unwrap();
    client.init().await.expect("redis");
    client
}

/// Drops the test's collection and every key of its namespace.
pub async fn cleanup(ns: &str) {
    let _ = mongo(ns).await.collection().drop().await;
    let r = raw_redis().await;
    for pattern in [format!("{ns}*"), format!("{{{ns}*")] {
        let _: Result<i64, _> = fred::interfaces::LuaInterface::eval(
            &r,
            "local n=0 local c='0' repeat local r=redis.call('SCAN',c,'MATCH',ARGV[1],'COUNT',1000) \
             c=r[1] for _,k in ipairs(r[2]) do redis.call('DEL',k) n=n+1 end until c=='0' return n",
            Vec::<String>::new(),
            vec![pattern],
        )
        .await;
    }
}

/// Stops the engine gracefully and drops the test's data.
pub async fn finish(engine: Engine, ns: &str) {
    engine.shutdown(Duration::from_secs(20)).await;
    cleanup(ns).await;
}

/// Starts an engine and waits for Kafka and MongoDB to answer.
pub async fn start_with(config: Config) -> Engine {
    let engine = start_degraded(config).await;
    assert!(
        engine.wait_for_backends(Duration::from_secs(120)).await,
        "kafka and mongodb answer: {:?}",
        engine.readiness().await
    );
    engine
}

/// Starts an engine without waiting for Kafka or MongoDB.
pub async fn start_degraded(config: Config) -> Engine {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,datasync=info")
        .with_test_writer()
        .try_init();
    Engine::start(config)
        .await
        .expect("engine starts against the local stack")
}

/// Reads `topic` from the beginning of each of its `partitions` until `done`
/// holds for what was read, or `timeout` passes (then panics naming `what`).
pub async fn read_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[Vec<u8>]) -> bool,
) -> Vec<Vec<u8>> {
    use rdkafka::{
        ClientConfig, Message, Offset, TopicPartitionList,
        consumer::{Consumer, StreamConsumer},
    };
    // Closed on a thread of its own when dropped (see `Detached`).
    let consumer = datasync::clients::kafka::Detached::new(
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .create::<StreamConsumer>()
            .expect("consumer"),
    );
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = tokio::time::Instant::now() + timeout;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            panic!(
                "timed out after {timeout:?} reading {topic}: {what} ({} records read)",
                got.len()
            );
        }
        if let Ok(Ok(m)) =
            tokio::time::timeout(left.min(Duration::from_millis(500)), consumer.recv()).await
        {
            got.push(m.payload().unwrap_or_default().to_vec());
        }
    }
    got
}

/// An encoded sync event of `user` at `version` carrying `{"v": version}`.
pub fn event(user: &str, version: i64, sync_type: datasync::proto::SyncType) -> Vec<u8> {
    let item = datasync::actors::publisher::Outgoing {
        user_id: user.into(),
        version,
        profile: serde_json::json!({ "v": version })
            .as_object()
            .cloned()
            .unwrap(),
        base_version: 0,
        lease_epoch: 0,
    };
    prost::Message::encode_to_vec(&datasync::actors::publisher::build_event(
        sync_type, &item, "test",
    ))
}

/// Produces `events` keyed by `user` to the topic `<ns>-<topic_suffix>`.
pub async fn produce(ns: &str, topic_suffix: &str, events: Vec<Vec<u8>>, user: &str) {
    let c = test_config(ns);
    let producer = datasync::clients::kafka::producer(&c.kafka, "test-producer").unwrap();
    let topic = format!("{ns}-{topic_suffix}");
    for e in events {
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&topic)
                    .key(user)
                    .payload(&e),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// The sum of every sample of metric `name` in a Prometheus text rendering
/// whose labels contain each of `labels` (e.g. `type="dynamic"`).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether an error message shown to a person repeats one of its causes.
pub fn repeats_a_cause(message: &str) -> Option<String> {
    let parts: Vec<&str> = message.split(": ").map(str::trim).collect();
    for (i, p) in parts.iter().enumerate() {
        if p.len() > 8 && parts[i + 1..].iter().any(|q| q == p) {
            return Some(p.to_string());
        }
    }
    None
}

/// The metric names a PromQL expression uses.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("datasync_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        names.push(name);
    }
    names
}

/// The metric names this process's `/metrics` exports now.
pub fn exported_metrics() -> std::collections::HashSet<String> {
    datasync::telemetry::prometheus()
        .render()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}
