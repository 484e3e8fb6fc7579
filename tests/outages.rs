//! Backend outages with real processes: Kafka brokers taken down (librdkafka's
//! mock cluster, a real Kafka-protocol peer), and MongoDB and Redis server
//! processes of the test's own stopped and restarted. Each reports how long
//! recovery took on stderr (`cargo test -- --nocapture` shows it).

mod common;

use common::*;
use datasync::{
    clients::{mongo::MongoStore, redis::RedisStore},
    proto::DlqMessage,
};
use mongodb::bson::doc;
use prost::Message;
use rdkafka::mocking::MockCluster;
use std::{
    collections::{HashMap, HashSet},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const LONG: Duration = Duration::from_secs(240);
const OUTAGE: Duration = Duration::from_secs(30);

const FAST_RETRIES: &str = r#"
[retry]
max_retries = 3
initial_delay = "200ms"
multiplier = 2.0
max_delay = "1s"
jitter = 0.0
[dlq]
forward_interval = "200ms"
"#;

/// Keeps the backend away until `OUTAGE` has passed since `down_at`, checking
/// all along that the engine reports itself degraded because of it (it never
/// claims to be ready while the backend is gone).
async fn ride_out(engine: &datasync::Engine, down_at: Instant, backend: &str) {
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    while down_at.elapsed() < OUTAGE {
        poll.tick().await;
        let r = engine.readiness().await;
        assert_eq!(r.status, "degraded", "{r:?}");
        assert!(r.reasons.iter().any(|x| x.contains(backend)), "{r:?}");
    }
}

async fn mark_all(engine: &datasync::Engine, n: usize, generation: i64) -> HashMap<String, i64> {
    mark_range(engine, 0..n, generation).await
}

async fn mark_range(
    engine: &datasync::Engine,
    range: std::ops::Range<usize>,
    generation: i64,
) -> HashMap<String, i64> {
    let mut expected = HashMap::new();
    let ids: Vec<usize> = range.collect();
    for chunk in ids.chunks(1000) {
        let users: Vec<_> = chunk
            .iter()
            .map(|i| profile(&format!("u{i}"), generation))
            .collect();
        for m in engine.write_and_mark(&users).await.unwrap() {
            expected.insert(m.user_id, m.version);
        }
    }
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_down_30s_dead_letters_run_out_users_and_everything_syncs_after() {
    let ns = Namespace::new("kafkadown");
    let cluster = MockCluster::new(3).unwrap();
    for t in ["static", "dynamic", "dlq"] {
        cluster.create_topic(&format!("{ns}-{t}"), 2, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    let config = config_with(
        &ns,
        &format!(
            "{FAST_RETRIES}\n[kafka]\nbrokers = \"{brokers}\"\ncreate_topics = false\nmessage_timeout = \"1s\"\n"
        ),
    );
    let engine = start_with(config).await;
    // Half the users before the outage, half while the brokers are down.
    let mut expected = mark_range(&engine, 0..10_000, 1).await;
    let mongo = mongo(&ns).await;
    wait_until("some users applied before the outage", LONG, || async {
        count_docs(&mongo, doc! {}).await >= 1000
    })
    .await;

    for b in 1..=3 {
        cluster.broker_down(b).unwrap();
    }
    let down_at = Instant::now();
    expected.extend(mark_range(&engine, 10_000..20_000, 1).await);
    wait_until(
        "users whose retries ran out are dead-lettered",
        LONG,
        || async { engine.stats().dlq_records > 0 },
    )
    .await;
    let r = engine.readiness().await;
    assert_eq!(r.status, "degraded", "{r:?}");
    assert!(
        r.reasons.iter().any(|x| x.starts_with("kafka down")),
        "{r:?}"
    );
    // The DLQ records could not reach Kafka: they are parked in Redis.
    assert!(engine.stats().dlq_parked > 0);
    ride_out(&engine, down_at, "kafka").await;
    for b in 1..=3 {
        cluster.broker_up(b).unwrap();
    }
    let up_at = Instant::now();

    wait_until("all 20,000 users at their version in MongoDB", LONG, || {
        all_at_dynamic(&mongo, &expected)
    })
    .await;
    let recovered = up_at.elapsed();
    let redis = redis(&ns).await;
    wait_until("every flag cleared", LONG, || async {
        pending_flags(&redis).await == 0
    })
    .await;
    wait_until("parked dead letters forwarded", LONG, || async {
        redis.outbox_len().await.unwrap() == 0
    })
    .await;
    // The users dead-lettered synced later, so their entries closed.
    wait_until("no open dead letter", LONG, || async {
        engine.dlq_list(10).await.unwrap().open == 0
    })
    .await;

    let recorded = engine.stats().dlq_records as usize;
    let records = read_topic(
        &brokers,
        &format!("{ns}-dlq"),
        2,
        "every dead letter",
        LONG,
        |got| got.len() >= recorded,
    )
    .await;
    let mut users = HashSet::new();
    for bytes in &records {
        let m = DlqMessage::decode(bytes.as_slice()).unwrap();
        let ctx = m.error_context.as_ref().unwrap();
        assert!(expected.contains_key(&m.user_id), "{}", m.user_id);
        assert_eq!(ctx.retry_count, 3, "{ctx:?}");
        assert!(ctx.stack_trace.contains("stage publish"), "{ctx:?}");
        assert_eq!(ctx.kafka_topic, format!("{ns}-dynamic"));
        users.insert(m.user_id);
    }
    assert_eq!(
        records.len(),
        recorded,
        "one record per user whose retries ran out"
    );
    assert_eq!(users.len(), recorded);
    eprintln!(
        "kafka outage: {OUTAGE:?} down, {recorded} users dead-lettered, all 20,000 applied {recovered:?} after the brokers returned; outages seen: {:?}",
        engine.outages()
    );
    finish(engine, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_down_30s_pauses_the_applier_and_loses_nothing() {
    let ns = Namespace::new("mongodown");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!(
        "mongodb://127.0.0.1:{port}/?retryWrites=false&serverSelectionTimeoutMS=2000&connectTimeoutMS=2000"
    );
    let mut server = start_mongo(port, dir.path());
    wait_until("the test's MongoDB answers", LONG, || mongo_answers(&url)).await;
    let config = config_with(&ns, &format!("{FAST_RETRIES}\n[mongo]\nurl = \"{url}\"\n"));
    let mongo = MongoStore::connect(&config.mongo, "tests").await.unwrap();
    let engine = start_with(config).await;

    let first = mark_all(&engine, 5000, 1).await;
    wait_until("some users applied before the outage", LONG, || async {
        count_docs(&mongo, doc! {}).await >= 500
    })
    .await;
    stop(&mut server);
    let down_at = Instant::now();
    // Every user changes again while MongoDB is down.
    let expected = mark_all(&engine, 5000, 2).await;
    assert!(expected.iter().all(|(u, v)| *v > first[u]));
    wait_until("readiness degraded by mongodb", LONG, || async {
        let r = engine.readiness().await;
        r.status == "degraded" && r.reasons.iter().any(|x| x.contains("mongodb"))
    })
    .await;
    ride_out(&engine, down_at, "mongodb").await;
    let mut server = start_mongo(port, dir.path());
    let up_at = Instant::now();

    wait_until("all 5,000 users at generation 2", LONG, || {
        all_at_dynamic(&mongo, &expected)
    })
    .await;
    let recovered = up_at.elapsed();
    // No change applied twice in effect: dataVersion counts applied changes, at
    // most one per generation.
    let over = count_docs(&mongo, doc! { "dataVersion": { "$gt": 2 } }).await;
    assert_eq!(over, 0, "documents with a change applied twice");
    let r = engine.readiness().await;
    assert_eq!(r.status, "ready", "{r:?}");
    eprintln!(
        "mongodb outage: {OUTAGE:?} down, all 5,000 users at generation 2 {recovered:?} after it returned; outages seen: {:?}",
        engine.outages()
    );
    engine.shutdown(Duration::from_secs(20)).await;
    stop(&mut server);
    cleanup(&ns).await;
}

fn start_redis(port: u16, dir: &std::path::Path) -> Child {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--appendonly",
            "yes",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (run scripts/stack.sh up first)")
}

/// A Redis server of the test's own (AOF on, so a restart keeps the data),
/// and the test config of `ns` pointed at it, once it answers.
async fn own_redis(ns: &str) -> (Child, tempfile::TempDir, u16, datasync::Config) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let server = start_redis(port, dir.path());
    let config = config_with(ns, &format!("{FAST_RETRIES}\n[redis]\nurl = \"{url}\"\n"));
    wait_until("the test's Redis answers", LONG, || async {
        RedisStore::connect(&config.redis, config.sync.shards)
            .await
            .is_ok()
    })
    .await;
    (server, dir, port, config)
}

/// Seed 002: profile reads fall back to MongoDB while Redis is away (marked
/// possibly stale, not cached), and compose from both again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_reads_fall_back_to_mongodb_while_redis_is_away() {
    let ns = Namespace::new("readfallback");
    let (mut server, dir, port, config) = own_redis(&ns).await;
    let engine = start_with(config.clone()).await;
    let mongo = mongo(&ns).await;
    engine
        .write_and_mark(&[profile("reader", 1)])
        .await
        .unwrap();
    wait_until("the profile applied", LONG, || async {
        count_docs(&mongo, doc! { "dynamicProfile.gen": 1i64 }).await == 1
    })
    .await;
    let p = engine.profile("reader").await.unwrap().unwrap();
    assert!(!p.possibly_stale);

    stop(&mut server);
    wait_until("the read served from MongoDB", LONG, || async {
        match engine.profile("reader").await {
            Ok(Some(p)) => p.possibly_stale && p.dynamic_profile["gen"] == 1,
            _ => false,
        }
    })
    .await;
    assert!(engine.profile_cache_stats().stale_reads >= 1);

    let mut server = start_redis(port, dir.path());
    wait_until("reads compose from both again", LONG, || async {
        matches!(engine.profile("reader").await, Ok(Some(p)) if !p.possibly_stale)
    })
    .await;
    finish(engine, &ns).await;
    stop(&mut server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_run_the_engine_reconnects_and_finishes() {
    let ns = Namespace::new("redisrestart");
    let (mut server, dir, port, config) = own_redis(&ns).await;
    let connect = || RedisStore::connect(&config.redis, config.sync.shards);
    let engine = start_with(config.clone()).await;
    let mongo = mongo(&ns).await;

    let expected = mark_all(&engine, 5000, 1).await;
    wait_until("some users applied before the restart", LONG, || async {
        count_docs(&mongo, doc! {}).await >= 500
    })
    .await;
    stop(&mut server);
    let down_at = Instant::now();
    let mut server = start_redis(port, dir.path());
    wait_until("the test's Redis is back", LONG, || async {
        connect().await.is_ok()
    })
    .await;
    let up_at = Instant::now();
    wait_until("all 5,000 users applied", LONG, || {
        all_at_dynamic(&mongo, &expected)
    })
    .await;
    let redis = connect().await.unwrap();
    wait_until("every flag cleared", LONG, || async {
        pending_flags(&redis).await == 0
    })
    .await;
    eprintln!(
        "redis restart: down {:?}, all 5,000 users applied {:?} after it returned",
        up_at - down_at,
        up_at.elapsed()
    );
    engine.shutdown(Duration::from_secs(20)).await;
    stop(&mut server);
    let _ = mongo.collection().drop().await;
}

/// A write that carries a profile (a write, a delete, an immediate change)
/// and failed while Redis was away is never sent after Redis returns. Queued
/// through the restart, it would land seconds after its caller gave up, over
/// whatever newer change of the user was written meanwhile (through another
/// service, or a retry), and take a newer version than it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_failed_while_redis_was_away_are_not_sent_after_it_returns() {
    let ns = Namespace::new("nowornever");
    let (mut server, dir, port, config) = own_redis(&ns).await;
    let engine = start_with(config.clone()).await;
    let users: Vec<String> = ["written", "deleted", "vip"].map(String::from).into();
    engine
        .write_and_mark(&[profile("written", 1), profile("deleted", 1)])
        .await
        .unwrap();

    stop(&mut server);
    // Each call fails within the client's deadline for such writes (2 s),
    // and nothing of it is written once Redis is back. (The callers give
    // up after 20 s: a write waiting for the reconnection would still be
    // queued then.)
    let give_up = Duration::from_secs(20);
    let newer = [profile("written", 2)];
    let write = tokio::time::timeout(give_up, engine.write_and_mark(&newer)).await;
    assert!(
        matches!(write, Ok(Err(_))),
        "a write fails while Redis is away: {write:?}"
    );
    let delete = tokio::time::timeout(give_up, engine.delete(&users[1..2])).await;
    assert!(
        matches!(delete, Ok(Err(_))),
        "a delete fails while Redis is away: {delete:?}"
    );
    let vip = serde_json::json!({ "vip": true });
    let immediate = tokio::time::timeout(give_up, engine.sync_immediate("vip", vip)).await;
    assert!(
        matches!(immediate, Ok(Err(_))),
        "an immediate change fails while Redis is away: {immediate:?}"
    );

    let mut server = start_redis(port, dir.path());
    wait_until("the engine writes to Redis again", LONG, || async {
        engine.write_and_mark(&[profile("probe", 1)]).await.is_ok()
    })
    .await;
    let redis = RedisStore::connect(&config.redis, config.sync.shards)
        .await
        .unwrap();
    let profiles = redis.load_profiles(&users[..2]).await.unwrap();
    let generation = |p: &Result<datasync::model::RawProfile, _>| match p {
        Ok(datasync::model::RawProfile::Json(b)) => {
            serde_json::from_slice::<serde_json::Value>(b).unwrap()["gen"].as_i64()
        }
        _ => None,
    };
    assert_eq!(
        generation(&profiles[0]),
        Some(1),
        "the failed write was not sent later"
    );
    assert_eq!(
        generation(&profiles[1]),
        Some(1),
        "the failed delete was not sent later"
    );
    assert_eq!(
        redis.static_pending_of("vip").await.unwrap(),
        None,
        "the failed immediate change was not staged later"
    );
    // Redis restarted with an empty script cache: the delete's script is
    // loaded again on its first call, within the call's deadline.
    engine
        .delete(&users[1..2])
        .await
        .expect("a delete once Redis is back");
    assert!(
        redis.load_profiles(&users[1..2]).await.unwrap()[0].is_err(),
        "the deleted profile is gone"
    );
    finish(engine, &ns).await;
    stop(&mut server);
}

/// Produce requests fail with transient broker errors (injected into the mock
/// cluster). With a 1 s message timeout, librdkafka's own retries run out on
/// some deliveries, so datasync's retry policy must re-send them: the counter
/// of our re-sends proves the errors were hit and that our retry, not only
/// librdkafka's, handled them; every user syncs, and any user whose retries all
/// ran out is synced by a later cycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_produce_errors_are_retried_without_loss() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let ns = Namespace::new("reqerrors");
    let cluster = MockCluster::new(3).unwrap();
    for t in ["static", "dynamic", "dlq"] {
        cluster.create_topic(&format!("{ns}-{t}"), 2, 1).unwrap();
    }
    let config = config_with(
        &ns,
        &format!(
            "{FAST_RETRIES}\n[kafka]\nbrokers = \"{}\"\ncreate_topics = false\nmessage_timeout = \"1s\"\n",
            cluster.bootstrap_servers()
        ),
    );
    let engine = start_with(config).await;
    let mut errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 20];
    errors.extend([RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 10]);
    cluster.request_errors(RDKafkaApiKey::Produce, &errors);
    let expected = mark_all(&engine, 2000, 1).await;
    let mongo = mongo(&ns).await;
    wait_for_engine(&engine, "all 2,000 users at their version", LONG, || {
        all_at_dynamic(&mongo, &expected)
    })
    .await;
    let s = engine.stats();
    eprintln!(
        "injected produce errors: {} events re-sent by datasync's retry, {} dead letters",
        s.publish_retries, s.dlq_records
    );
    assert!(s.publish_retries > 0, "our retry never ran: {s:?}");
    // A delivery whose retries all ran out is dead-lettered with its flag kept;
    // it syncs at a later cycle, which closes its entry.
    wait_until("every dead letter closed by a later sync", LONG, || async {
        engine.dlq_list(1).await.unwrap().open == 0
    })
    .await;
    finish(engine, &ns).await;
}
