//! End-to-end behaviour of the core pipeline against the real local stack.

mod common;

use common::*;
use datasync::{
    proto::{SyncType, UserProfileSyncEvent},
    shard::shard_of,
};
use futures::TryStreamExt;
use mongodb::bson::{Bson, doc};
use prost::Message;
use std::{collections::HashMap, time::Duration};

const LONG: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_of_ten_thousand_users() {
    let ns = Namespace::new("roundtrip");
    let engine = start(&ns).await;
    round_trip(&engine, &ns, 10_000).await;
    let r = redis(&ns).await;
    wait_until("every flag cleared", LONG, || async {
        pending_flags(&r).await == 0
    })
    .await;
    finish(engine, &ns).await;
}

/// The same round trip with Redis Cluster routing against the local
/// three-master cluster (`scripts/stack.sh cluster`): every script touches
/// one slot, thanks to the `{shard}` hash tags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_on_a_redis_cluster() {
    let ns = Namespace::new("cluster");
    let url = std::env::var("DATASYNC_TEST_REDIS_CLUSTER_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:7001".into());
    let mut config = test_config(&ns);
    config.redis.url = datasync::config::Secret::new(url.clone());
    config.redis.cluster = true;
    let engine = start_with(config.clone()).await;
    let r = datasync::clients::redis::RedisStore::connect(&config.redis, config.sync.shards)
        .await
        .unwrap();
    round_trip(&engine, &ns, 3_000).await;
    wait_until("every flag cleared", LONG, || async {
        pending_flags(&r).await == 0
    })
    .await;
    let report = engine.shards().await.unwrap();
    assert_eq!(report.held.len(), 8, "every shard leased on the cluster");
    // Deletes on the cluster: the profile keys lie in other slots than the
    // shard's, so they go first, then each shard's script records the deletes.
    let gone: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
    engine.delete(&gone).await.unwrap();
    let docs = mongo(&ns).await;
    wait_until("the deleted users are tombstones", LONG, || async {
        count_docs(&docs, doc! { "deleted": true }).await == 20
    })
    .await;
    let profiles = r.load_profiles(&gone).await.unwrap();
    assert!(profiles.iter().all(Result::is_err), "profile keys removed");
    engine.shutdown(Duration::from_secs(20)).await;
    let _ = mongo(&ns).await.collection().drop().await;
    cleanup_cluster(&ns).await;
}

async fn round_trip(engine: &datasync::Engine, ns: &str, n: usize) {
    let engine = engine.clone();
    let mut expected = HashMap::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let users: Vec<_> = chunk.iter().map(|i| profile(&format!("u{i}"), 1)).collect();
        for m in engine.write_and_mark(&users).await.unwrap() {
            expected.insert(m.user_id, m.version);
        }
    }
    let mongo = mongo(ns).await;
    wait_until("every document in MongoDB", LONG, || async {
        count_docs(&mongo, doc! {}).await == n as u64
    })
    .await;

    let mut cursor = mongo.collection().find(doc! {}).await.unwrap();
    let mut seen = 0;
    while let Some(d) = cursor.try_next().await.unwrap() {
        let user = d.get_str("userId").unwrap();
        assert_eq!(
            d.get_i64("dynamicVersion").unwrap(),
            expected[user],
            "{user}"
        );
        let p = d.get_document("dynamicProfile").unwrap();
        assert_eq!(p.get_str("name").unwrap(), format!("user {user}"));
        assert_eq!(p.get_i64("gen").unwrap(), 1);
        assert_eq!(
            p.get_array("tags").unwrap(),
            &vec![Bson::from("a"), Bson::from("b")]
        );
        assert_eq!(d.get_i64("dataVersion").unwrap(), 1);
        seen += 1;
    }
    assert_eq!(seen, n);
    // The documents are visible before the applier reads MongoDB's reply
    // and counts them.
    wait_until("every change counted as applied", LONG, || async {
        engine.stats().events_applied >= n as u64
    })
    .await;
    let s = engine.stats();
    assert_eq!(s.events_applied, n as u64, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_the_first_is_in_flight_is_not_lost() {
    let ns = Namespace::new("race");
    let engine = start(&ns).await;
    let hold = engine.hold_publishing().await;
    let first = engine.write_and_mark(&[profile("racer", 1)]).await.unwrap()[0].version;
    // The scanner has loaded generation 1 and waits at the publisher.
    wait_until("a batch waiting at the held publisher", LONG, || async {
        engine.stats().publish_held >= 1
    })
    .await;
    let second = engine.write_and_mark(&[profile("racer", 2)]).await.unwrap()[0].version;
    assert!(second > first);
    drop(hold);

    let mongo = mongo(&ns).await;
    wait_until("generation 2 in MongoDB", LONG, || async {
        match mongo.find_user("racer").await.unwrap() {
            Some(d) => d.get_i64("dynamicVersion").unwrap() == second,
            None => false,
        }
    })
    .await;
    let d = mongo.find_user("racer").await.unwrap().unwrap();
    assert_eq!(
        d.get_document("dynamicProfile")
            .unwrap()
            .get_i64("gen")
            .unwrap(),
        2
    );
    let r = redis(&ns).await;
    wait_until("the second flag cleared", LONG, || async {
        pending_flags(&r).await == 0
    })
    .await;
    finish(engine, &ns).await;
}

/// Newer-wins in MongoDB itself, not in the window collapse: each event is
/// its own window, delivered after the newer one is applied, and the document
/// is checked after every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_and_duplicate_events_in_later_windows_never_regress_a_document() {
    let ns = Namespace::new("regress");
    let engine = start(&ns).await;
    let mongo = mongo(&ns).await;
    let d = SyncType::DynamicBatch;
    // (topic, event type, version, expected after: dynamicVersion,
    //  staticVersion, dataVersion)
    let steps: [(&str, SyncType, i64, (i64, i64, i64)); 8] = [
        ("dynamic", d, 3, (3, 0, 1)),
        ("dynamic", d, 1, (3, 0, 1)),
        ("dynamic", d, 2, (3, 0, 1)),
        ("dynamic", d, 3, (3, 0, 1)), // a duplicate of the stored version
        ("dynamic", d, 5, (5, 0, 2)),
        ("dynamic", d, 4, (5, 0, 2)),
        // A static change never touches the dynamic section, nor the reverse.
        ("static", SyncType::StaticImmediate, 2, (5, 2, 3)),
        ("static", SyncType::StaticImmediate, 1, (5, 2, 3)),
    ];
    for (i, (topic, t, version, (dv, sv, data))) in steps.into_iter().enumerate() {
        produce(&ns, topic, vec![event("x", version, t)], "x").await;
        wait_until(&format!("step {i} consumed"), LONG, || async {
            let s = engine.stats();
            s.events_applied + s.stale_skipped == i as u64 + 1
        })
        .await;
        let doc = mongo.find_user("x").await.unwrap().unwrap();
        let int = |f: &str| doc.get_i64(f).unwrap_or(0);
        assert_eq!(
            (
                int("dynamicVersion"),
                int("staticVersion"),
                int("dataVersion")
            ),
            (dv, sv, data),
            "after step {i} ({topic} v{version}): {doc}"
        );
        let data_of = |section: &str| {
            doc.get_document(section)
                .ok()
                .and_then(|p| p.get_i64("v").ok())
                .unwrap_or(0)
        };
        assert_eq!(data_of("dynamicProfile"), dv, "step {i}: {doc}");
        assert_eq!(data_of("staticProfile"), sv, "step {i}: {doc}");
    }
    let s = engine.stats();
    assert_eq!((s.events_applied, s.stale_skipped), (3, 5), "{s:?}");
    finish(engine, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_set_members_added_during_the_drain_are_not_lost() {
    let ns = Namespace::new("legacy");
    let engine = start(&ns).await;
    let r = redis(&ns).await;
    let legacy = format!("{ns}:legacy");
    let raw = raw_redis().await;
    let users: Vec<String> = (0..3000).map(|i| format!("l{i}")).collect();
    // Three generations, each written then SADDed while the engine drains.
    for generation in 1..=3 {
        for chunk in users.chunks(500) {
            let writes = generation_profiles(chunk, generation);
            r.write_profiles(&writes).await.unwrap();
            let _: i64 = fred::interfaces::SetsInterface::sadd(&raw, &legacy, chunk.to_vec())
                .await
                .unwrap();
        }
    }
    let mongo = mongo(&ns).await;
    wait_until("every user at generation 3", LONG, || async {
        count_docs(&mongo, doc! { "dynamicProfile.gen": 3i64 }).await == 3000
    })
    .await;
    let s = engine.stats();
    assert!(s.legacy_drained >= 3000, "{s:?}");
    finish(engine, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_profile_is_named_and_the_rest_of_the_batch_syncs() {
    let ns = Namespace::new("badprofile");
    let engine = start(&ns).await;
    let r = redis(&ns).await;
    let mut writes: Vec<(String, String)> = (0..50)
        .map(|i| (format!("ok{i}"), serde_json::json!({ "i": i }).to_string()))
        .collect();
    writes.push(("broken".into(), "{not json".into()));
    writes.push(("array".into(), "[1,2]".into()));
    r.write_profiles(&writes).await.unwrap();
    let ids: Vec<String> = writes.iter().map(|(u, _)| u.clone()).collect();
    engine.mark_dirty(&ids).await.unwrap();
    let mongo = mongo(&ns).await;
    wait_until("the 50 good profiles applied", LONG, || async {
        count_docs(&mongo, doc! {}).await == 50
    })
    .await;
    wait_until("both bad profiles reported", LONG, || async {
        engine.stats().load_failures >= 2
    })
    .await;
    assert!(mongo.find_user("broken").await.unwrap().is_none());
    // The bad users keep their flags, so a fixed profile syncs later.
    assert_eq!(pending_flags(&r).await, 2);
    r.write_profiles(&[("broken".into(), r#"{"fixed":true}"#.into())])
        .await
        .unwrap();
    wait_until("the fixed profile applied", LONG, || async {
        mongo.find_user("broken").await.unwrap().is_some()
    })
    .await;
    finish(engine, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_user_ids_are_refused_before_anything_is_written() {
    let ns = Namespace::new("badids");
    let engine = start(&ns).await;
    let err = engine
        .mark_dirty(&["a".into(), "".into()])
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid input: user_ids[1]: must not be empty"
    );
    let err = engine
        .write_and_mark(&[
            profile("a", 1),
            datasync::ProfileWrite {
                user_id: "b".into(),
                profile: serde_json::json!(5),
            },
        ])
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid input: users[1].profile: must be a JSON object"
    );
    let r = redis(&ns).await;
    assert_eq!(pending_flags(&r).await, 0);
    let exists: i64 =
        fred::interfaces::KeysInterface::exists(&raw_redis().await, format!("{ns}:user:a:profile"))
            .await
            .unwrap();
    assert_eq!(exists, 0, "nothing half-applied");
    finish(engine, &ns).await;
}

#[test]
fn event_wire_format_keeps_seed_field_numbers() {
    // Seed 000: user_id=1, sync_type=2, profile_data=3, version=4, timestamp=5.
    let e = UserProfileSyncEvent {
        user_id: "u".into(),
        sync_type: 1,
        version: 7,
        timestamp: 9,
        ..Default::default()
    };
    assert_eq!(
        e.encode_to_vec(),
        vec![0x0a, 1, b'u', 0x10, 1, 0x20, 7, 0x28, 9]
    );
}

/// A cycle first asks Redis which shards hold anything (one script call on a
/// single Redis, one a shard on a cluster) and scans only those. Exactly the
/// shards with a flag or a pending immediate change must say so, or a
/// change would wait in a shard that is never scanned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_shards_with_flags_or_pending_immediate_changes_are_scanned() {
    for cluster in [false, true] {
        let ns = Namespace::new(if cluster { "workc" } else { "work" });
        let mut config = test_config(&ns);
        if cluster {
            let url = std::env::var("DATASYNC_TEST_REDIS_CLUSTER_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:7001".into());
            config.redis.url = datasync::config::Secret::new(url);
            config.redis.cluster = true;
        }
        let r = datasync::clients::redis::RedisStore::connect(&config.redis, config.sync.shards)
            .await
            .unwrap();
        let n = r.shards();
        let all: Vec<u32> = (0..n).collect();
        let idle = r.shards_with_work(&all).await.unwrap();
        assert_eq!(
            idle,
            vec![false; n as usize],
            "cluster {cluster}: nothing yet"
        );

        let flagged = "flagged-user".to_string();
        let staged = (0..)
            .map(|i| format!("staged-user-{i}"))
            .find(|u| shard_of(u, n) != shard_of(&flagged, n))
            .unwrap();
        r.mark(std::slice::from_ref(&flagged)).await.unwrap();
        r.stage_static(&[(staged.as_str(), r#"{"vip":true}"#.to_string())])
            .await
            .unwrap();
        let busy = [shard_of(&flagged, n), shard_of(&staged, n)];
        let got = r.shards_with_work(&all).await.unwrap();
        for (shard, work) in all.iter().zip(&got) {
            assert_eq!(
                *work,
                busy.contains(shard),
                "cluster {cluster}: shard {shard}"
            );
        }
        // Any subset, in any order, answers in that order.
        let some = vec![busy[1], (busy[0] + 1) % n, busy[0]];
        let expected: Vec<bool> = some.iter().map(|s| busy.contains(s)).collect();
        assert_eq!(r.shards_with_work(&some).await.unwrap(), expected);
        assert!(r.shards_with_work(&[]).await.unwrap().is_empty());
        if cluster {
            // The namespace's cleanup reaches the single Redis only.
            cleanup_cluster(&ns).await;
        }
    }
}
