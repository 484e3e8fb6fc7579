//! Replay, the offset-range index, the whitelist and the operation log,
//! against the real local stack.

mod common;

use actix_web::{App, http::StatusCode, test};
use common::*;
use datasync::{
    Engine,
    clients::{kafka::Detached, redis::RedisStore},
    engine::OffsetsQuery,
    jobs::{Job, JobState, replay::Replay, replay::ReplayRequest},
    offsets::{self, OffsetRange},
};
use mongodb::bson::doc;
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};
use serde_json::{Value, json};
use std::{collections::BTreeMap, time::Duration};

const LONG: Duration = Duration::from_secs(240);

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Writes and flags a generation of profiles, and waits until MongoDB holds
/// it for every user.
async fn sync_generation(engine: &Engine, ns: &str, users: &[String], generation: i64) {
    let writes: Vec<_> = users.iter().map(|u| profile(u, generation)).collect();
    for chunk in writes.chunks(1000) {
        engine.write_and_mark(chunk).await.unwrap();
    }
    let m = mongo(ns).await;
    let n = users.len() as u64;
    wait_until(&format!("generation {generation} applied"), LONG, || {
        let m = m.clone();
        async move { count_docs(&m, doc! { "dynamicProfile.gen": generation }).await == n }
    })
    .await;
}

/// Drops the collection and waits until it reads empty (the Python
/// server's drop can lag behind its answer under load).
async fn drop_collection(m: &datasync::clients::mongo::MongoStore) {
    m.collection().drop().await.unwrap();
    wait_until("the collection is gone", LONG, || {
        let m = m.clone();
        async move { count_docs(&m, doc! {}).await == 0 }
    })
    .await;
}

async fn wait_replay(engine: &Engine, id: &str) -> Job<Replay> {
    wait_until("the replay finishes", LONG, || {
        let (engine, id) = (engine.clone(), id.to_string());
        async move { engine.replay_job(&id).await.unwrap().state.finished() }
    })
    .await;
    let job = engine.replay_job(id).await.unwrap();
    assert_eq!(job.state, JobState::Done, "{:?}", job.error);
    job
}

/// The live group's committed offsets of the dynamic topic.
fn committed(ns: &str) -> Vec<(i32, Offset)> {
    let c = test_config(ns);
    let consumer = Detached::new(
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &c.kafka.brokers)
            .set("group.id", &c.kafka.consumer_group)
            .create::<BaseConsumer>()
            .unwrap(),
    );
    let mut tpl = TopicPartitionList::new();
    for p in 0..c.kafka.partitions {
        tpl.add_partition(&c.kafka.dynamic_topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    got.elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect()
}

/// A consumer without a group id (nothing to close when dropped), for
/// metadata lookups, and the test config of `ns`.
fn lookup_consumer(ns: &str) -> (datasync::Config, BaseConsumer) {
    let c = test_config(ns);
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &c.kafka.brokers)
        .create()
        .unwrap();
    (c, consumer)
}

/// The end offset of one partition of the dynamic topic.
fn high_watermark(ns: &str, partition: i32) -> i64 {
    let (c, consumer) = lookup_consumer(ns);
    consumer
        .fetch_watermarks(&c.kafka.dynamic_topic, partition, Duration::from_secs(10))
        .unwrap()
        .1
}

fn group_names(ns: &str) -> Vec<String> {
    let (_, consumer) = lookup_consumer(ns);
    consumer
        .fetch_group_list(None, Duration::from_secs(10))
        .unwrap()
        .groups()
        .iter()
        .map(|g| g.name().to_string())
        .collect()
}

/// The keys (user ids) of one partition of the dynamic topic, read to its
/// end, and the partition's end offset.
fn users_of_partition(ns: &str, partition: i32) -> (Vec<String>, i64) {
    let c = test_config(ns);
    let base = Detached::new(
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &c.kafka.brokers)
            .set("group.id", format!("{ns}-probe"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create::<BaseConsumer>()
            .unwrap(),
    );
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&c.kafka.dynamic_topic, partition, Offset::Beginning)
        .unwrap();
    base.assign(&tpl).unwrap();
    let (mut users, mut end) = (Vec::new(), 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        match base.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                users.push(String::from_utf8(m.key().unwrap().to_vec()).unwrap());
                end = m.offset() + 1;
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
            _ => {}
        }
    }
    (users, end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_collection_is_rebuilt_by_replay_at_the_newest_generation() {
    let ns = Namespace::new("replay-all");
    // One replay window, so each user's two generations meet in it.
    let engine = start_with(config_with(&ns, "[replay]\nwindow_events = 20000\n")).await;
    let users = ids("r", 5000);
    let before = datasync::model::now_ms() - 1000;
    sync_generation(&engine, &ns, &users, 1).await;
    sync_generation(&engine, &ns, &users, 2).await;
    // The live group commits after it applies: wait for the commit of the
    // last window (every record on the topic, retries included).
    wait_until("the live group committed every record", LONG, || async {
        committed(&ns)
            .iter()
            .all(|(p, o)| matches!(o, Offset::Offset(n) if *n >= high_watermark(&ns, *p)))
    })
    .await;
    let offsets_before = committed(&ns);
    assert!(
        offsets_before
            .iter()
            .all(|(_, o)| matches!(o, Offset::Offset(n) if *n > 0)),
        "the live group committed: {offsets_before:?}"
    );

    let m = mongo(&ns).await;
    drop_collection(&m).await;
    let request = ReplayRequest {
        topic: "dynamic".into(),
        from_time: Some(before.to_string()),
        ..Default::default()
    };
    let job = engine.start_replay(request, false, "test").await.unwrap();
    assert!(
        job.body
            .partitions
            .values()
            .all(|p| p.to.is_none() && !p.done)
    );
    let job = wait_replay(&engine, &job.id).await;

    assert_eq!(count_docs(&m, doc! {}).await, 5000);
    assert_eq!(count_docs(&m, doc! { "dynamicProfile.gen": 2 }).await, 5000);
    let r = &job.body;
    assert_eq!(r.read, 10_000, "{r:?}");
    // Every user was written back by the replay. Each user's two events
    // meet in the one window (generation 1 counted stale), or, if a stall
    // split the window, land in two (generation 1 applied, then generation 2
    // over it): either way generation 1 never wins (checked above).
    assert!(r.applied >= 5000, "{r:?}");
    assert_eq!(r.applied + r.stale, 10_000, "{r:?}");
    assert_eq!((r.filtered, r.errors), (0, 0), "{r:?}");
    assert_eq!(committed(&ns), offsets_before, "the live group's offsets");
    let groups = group_names(&ns);
    let live = test_config(&ns).kafka.consumer_group;
    assert!(
        groups.contains(&live),
        "the broker lists groups: {groups:?}"
    );
    let replay_groups = format!("{live}-replay");
    assert!(
        !groups.iter().any(|g| g.starts_with(&replay_groups)),
        "no replay group is left on the broker: {groups:?}"
    );
    finish(engine, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_by_offsets_touches_only_the_named_users_and_a_dry_run_writes_nothing() {
    let ns = Namespace::new("replay-offsets");
    let engine = start(&ns).await;
    let users = ids("o", 200);
    sync_generation(&engine, &ns, &users, 1).await;
    sync_generation(&engine, &ns, &users, 2).await;
    let (on_p0, end) = users_of_partition(&ns, 0);
    let mut distinct: Vec<String> = on_p0.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= 4, "partition 0 holds users: {distinct:?}");
    let (named, others) = (&distinct[..2], &distinct[2..4]);
    let m = mongo(&ns).await;
    for u in named.iter().chain(others) {
        m.collection()
            .delete_one(doc! { "userId": u })
            .await
            .unwrap();
    }
    let request = |dry_run| ReplayRequest {
        topic: "dynamic".into(),
        partition: Some(0),
        from_offset: Some(0),
        to_offset: Some(end - 1),
        user_ids: Some(named.to_vec()),
        dry_run,
        ..Default::default()
    };
    let dry = engine
        .start_replay(request(true), false, "test")
        .await
        .unwrap();
    let dry = wait_replay(&engine, &dry.id).await.body;
    for u in named.iter().chain(others) {
        assert!(
            m.find_user(u).await.unwrap().is_none(),
            "a dry run wrote {u}"
        );
    }
    let real = engine
        .start_replay(request(false), false, "test")
        .await
        .unwrap();
    let real = wait_replay(&engine, &real.id).await.body;
    let counts = |r: &Replay| (r.read, r.applied, r.stale, r.filtered, r.errors);
    assert_eq!(counts(&dry), counts(&real), "dry {dry:?} real {real:?}");
    assert_eq!(real.read, end as u64);
    assert_eq!(real.applied, 2, "{real:?}");
    assert_eq!(
        real.filtered,
        end as u64 - 4,
        "two events per named user: {real:?}"
    );
    for u in named {
        let d = m
            .find_user(u)
            .await
            .unwrap()
            .expect("the named user is back");
        assert_eq!(
            d.get_document("dynamicProfile")
                .unwrap()
                .get_i64("gen")
                .unwrap(),
            2
        );
    }
    for u in others {
        assert!(m.find_user(u).await.unwrap().is_none(), "{u} was not named");
    }
    finish(engine, &ns).await;
}

/// Checks that a partition's ranges run from 0 to `end` (exclusive) with no
/// gap and no overlap.
fn assert_cover(ranges: &[OffsetRange], end: i64) {
    let mut next = 0;
    for r in ranges {
        assert_eq!(
            r.start, next,
            "a gap or an overlap before {r:?}: {ranges:?}"
        );
        assert!(r.end >= r.start && r.first_ms <= r.last_ms, "{r:?}");
        next = r.end + 1;
    }
    assert_eq!(
        next, end,
        "the ranges end where the partition does: {ranges:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_ranges_cover_every_applied_offset_across_a_graceful_restart() {
    let ns = Namespace::new("ranges");
    // Only the shutdown flushes, so what survives the restart is its doing.
    let config = || config_with(&ns, "[replay]\nflush_interval = \"1h\"\n");
    let engine = start_with(config()).await;
    let redis = redis(&ns).await;
    let first = ids("a", 10_000);
    for chunk in first.chunks(2000) {
        let writes: Vec<_> = chunk.iter().map(|u| profile(u, 1)).collect();
        engine.write_and_mark(&writes).await.unwrap();
    }
    let m = mongo(&ns).await;
    wait_until("10,000 users applied", LONG, || {
        let m = m.clone();
        async move { count_docs(&m, doc! {}).await == 10_000 }
    })
    .await;
    let q = OffsetsQuery {
        limit: 10_000,
        ..Default::default()
    };
    // The documents are written before the window's offsets are recorded.
    wait_until("the applied windows' offsets are recorded", LONG, || {
        let (engine, q) = (engine.clone(), q.clone());
        async move { engine.offsets(q).await.unwrap().pending_flush > 0 }
    })
    .await;
    assert!(engine.offsets(q.clone()).await.unwrap().ranges.is_empty());
    engine.shutdown(Duration::from_secs(20)).await;

    let engine = start_with(config()).await;
    let second = ids("b", 2000);
    let writes: Vec<_> = second.iter().map(|u| profile(u, 1)).collect();
    engine.write_and_mark(&writes).await.unwrap();
    wait_until("12,000 users applied", LONG, || {
        let m = m.clone();
        async move { count_docs(&m, doc! {}).await == 12_000 }
    })
    .await;
    engine.shutdown(Duration::from_secs(20)).await;

    // Every offset the applier committed is covered, and the applier read
    // each partition to its end. (The test does not count records against
    // users: the local broker's offset accounting under concurrent produce
    // is its own; what is checked is that the index matches the applier.)
    let topic = test_config(&ns).kafka.dynamic_topic;
    for (p, offset) in committed(&ns) {
        let Offset::Offset(done) = offset else {
            panic!("partition {p} has no committed offset: {offset:?}");
        };
        assert!(done > 0, "partition {p} had nothing applied");
        let ranges = redis.offset_ranges(&topic, p).await.unwrap();
        assert_cover(&ranges, done);
        let (_, end) = users_of_partition(&ns, p);
        assert_eq!(end, done, "partition {p} was applied to its end");
    }
    // Times filter: nothing is older than the test.
    let (old, _) = offsets::list(&redis, Some(&topic), None, None, Some(1000), 100)
        .await
        .unwrap();
    assert!(old.is_empty());
    cleanup(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_offset_ranges_are_deleted_in_bounded_steps() {
    let ns = Namespace::new("ranges-cleanup");
    let redis: RedisStore = redis(&ns).await;
    let now = datasync::model::now_ms();
    let day = 86_400_000;
    let range = |i: i64, ms: i64| OffsetRange {
        topic: "t".into(),
        partition: 0,
        start: i * 10,
        end: i * 10 + 9,
        first_ms: ms,
        last_ms: ms,
    };
    let mut ranges: Vec<_> = (0..2500).map(|i| range(i, now - 7 * day + i)).collect();
    ranges.extend((2500..2510).map(|i| range(i, now)));
    redis.offsets_add(&ranges).await.unwrap();
    // A range that overlaps stored ones merges with them.
    redis.offsets_add(&[range(2509, now)]).await.unwrap();
    assert_eq!(redis.offset_ranges("t", 0).await.unwrap().len(), 2510);

    let cutoff = now - 6 * day;
    assert_eq!(
        redis.offsets_trim("t", 0, cutoff, 100).await.unwrap(),
        (100, true),
        "one call deletes at most its batch"
    );
    let deleted = offsets::cleanup(&redis, Duration::from_secs(6 * 86_400), 100)
        .await
        .unwrap();
    assert_eq!(deleted, 2400);
    let left = redis.offset_ranges("t", 0).await.unwrap();
    assert_eq!(left.len(), 10);
    assert!(left.iter().all(|r| r.last_ms == now));
    cleanup(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whitelist_changes_reach_every_instance_and_narrow_a_replay() {
    let ns = Namespace::new("whitelist");
    let engine = start(&ns).await;
    let mut other = test_config(&ns);
    other.instance.id = format!("{ns}-b");
    other.applier.enabled = false;
    let b = start_with(other).await;
    let users = ids("w", 100);
    sync_generation(&engine, &ns, &users, 1).await;

    let listed = vec!["w3".to_string(), "w42".to_string()];
    let changed = engine
        .whitelist_change(true, &listed, "test")
        .await
        .unwrap();
    assert_eq!((changed.changed, changed.size), (2, 2));
    let started = std::time::Instant::now();
    wait_until("the other instance sees the whitelist", LONG, || {
        let b = b.clone();
        async move { b.whitelist().user_ids == ["w3", "w42"] }
    })
    .await;
    eprintln!(
        "whitelist seen by the other instance after {:?}",
        started.elapsed()
    );

    let m = mongo(&ns).await;
    drop_collection(&m).await;
    let request = ReplayRequest {
        topic: "dynamic".into(),
        ..Default::default()
    };
    let job = b.start_replay(request, false, "test").await.unwrap();
    assert_eq!(job.body.filter, "whitelist");
    let r = wait_replay(&b, &job.id).await.body;
    assert_eq!((r.applied, r.filtered), (2, 98), "{r:?}");
    assert_eq!(count_docs(&m, doc! {}).await, 2);

    let removed = b.whitelist_change(false, &listed, "test").await.unwrap();
    assert_eq!(removed.size, 0);
    wait_until("the first instance sees the removal", LONG, || {
        let engine = engine.clone();
        async move { engine.whitelist().size == 0 }
    })
    .await;
    b.shutdown(Duration::from_secs(20)).await;
    finish(engine, &ns).await;
}

#[actix_web::test]
async fn every_admin_action_is_logged_once_and_needs_the_admin_token() {
    let ns = Namespace::new("oplog");
    let config = config_with(
        &ns,
        "[http]\nadmin_token = \"t0ken\"\n[consistency]\ninterval = \"0s\"\n",
    );
    let engine = start_with(config).await;
    let app =
        test::init_service(App::new().configure(datasync::http::configure(engine.clone()))).await;
    let call = |method: &str, path: &str, body: Option<Value>, token: Option<&str>| {
        let mut r = match method {
            "GET" => test::TestRequest::get(),
            "DELETE" => test::TestRequest::delete(),
            _ => test::TestRequest::post(),
        }
        .uri(path);
        if let Some(t) = token {
            r = r.insert_header(("Authorization", format!("Bearer {t}")));
        }
        if let Some(b) = body {
            r = r.set_json(b);
        }
        r.to_request()
    };
    let admin = Some("t0ken");
    let actions: Vec<(&str, &str, Option<Value>)> = vec![
        (
            "POST",
            "/v1/whitelist/add",
            Some(json!({"user_ids": ["u1"]})),
        ),
        (
            "POST",
            "/v1/whitelist/remove",
            Some(json!({"user_ids": ["u1"]})),
        ),
        ("POST", "/v1/dlq/redrive", Some(json!({"user_ids": ["u1"]}))),
        ("POST", "/v1/resync", Some(json!({"user_ids": ["u1"]}))),
        (
            "POST",
            "/v1/consistency/check",
            Some(json!({"repair": true})),
        ),
        (
            "POST",
            "/v1/replay",
            Some(json!({"topic": "dynamic", "dry_run": true})),
        ),
    ];
    for (method, path, body) in &actions {
        for (token, status) in [
            (None, StatusCode::UNAUTHORIZED),
            (Some("wrong"), StatusCode::UNAUTHORIZED),
        ] {
            let resp = test::call_service(&app, call(method, path, body.clone(), token)).await;
            assert_eq!(resp.status(), status, "{method} {path} with {token:?}");
        }
        let resp = test::call_service(&app, call(method, path, body.clone(), admin)).await;
        assert!(
            resp.status().is_success(),
            "{method} {path}: {}",
            resp.status()
        );
    }
    for path in ["/v1/operations", "/v1/whitelist", "/v1/offsets"] {
        let resp = test::call_service(&app, call("GET", path, None, None)).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let bad =
        test::call_service(&app, call("GET", "/v1/offsets?from=yesterday", None, admin)).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let body: Value = test::read_body_json(bad).await;
    assert!(
        body["error"].as_str().unwrap().starts_with("from:"),
        "{body}"
    );

    let kinds = [
        "whitelist_add",
        "whitelist_remove",
        "dlq_redrive",
        "resync",
        "consistency",
        "replay",
    ];
    let logged = || async {
        let resp =
            test::call_service(&app, call("GET", "/v1/operations?limit=50", None, admin)).await;
        let body: Value = test::read_body_json(resp).await;
        body["operations"].as_array().unwrap().clone()
    };
    wait_until("every action is in the operation log", LONG, || async {
        let ops = logged().await;
        kinds.iter().all(|k| ops.iter().any(|o| o["kind"] == *k))
    })
    .await;
    let ops = logged().await;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for o in &ops {
        *seen
            .entry(o["kind"].as_str().unwrap().to_string())
            .or_default() += 1;
        assert_eq!(o["token"], "admin", "{o}");
        assert_eq!(o["result"]["status"], "done", "{o}");
        assert!(
            !o["started_at"].as_str().unwrap().is_empty()
                && !o["ended_at"].as_str().unwrap().is_empty()
        );
    }
    assert!(
        kinds.iter().all(|k| seen[*k] == 1),
        "each action once: {seen:?}"
    );
    let redrive = ops.iter().find(|o| o["kind"] == "dlq_redrive").unwrap();
    assert_eq!(redrive["params"]["user_ids"][0], "u1");
    finish(engine, &ns).await;
}
