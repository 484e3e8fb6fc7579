//! The legacy drain, forced against the real local stack: a pop larger than
//! Lua can unpack, two drainers racing on one member, and the members a
//! drainer that died left behind.

mod common;

use common::*;
use datasync::faults::HoldPoint;
use fred::interfaces::{KeysInterface, SetsInterface, SortedSetsInterface};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);

/// Adds to a plain set, as an earlier release left its draining set.
async fn sadd(key: &str, members: &[&str]) {
    let _: i64 = raw_redis()
        .await
        .sadd(
            key,
            members.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
        )
        .await
        .unwrap();
}

async fn popped_members(r: &datasync::clients::redis::RedisStore) -> u64 {
    raw_redis()
        .await
        .zcard(r.keys().legacy_popped())
        .await
        .unwrap()
}

async fn dynamic_of(m: &datasync::clients::mongo::MongoStore, user: &str) -> (i64, i64) {
    match m.find_user(user).await.unwrap() {
        Some(d) => (
            d.get_i64("dynamicVersion").unwrap_or(0),
            d.get_document("dynamicProfile")
                .ok()
                .and_then(|p| p.get_i64("gen").ok())
                .unwrap_or(0),
        ),
        None => (0, 0),
    }
}

/// Lua's `unpack` fails past about 8,000 values, and Redis keeps a script's
/// earlier writes: a pop of 10,000 members must move every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_pop_larger_than_lua_can_unpack_moves_every_member() {
    let ns = Namespace::new("bigpop");
    let r = redis(&ns).await;
    let legacy = r.keys().legacy().to_string();
    let users: Vec<String> = (0..10_000).map(|i| format!("m{i}")).collect();
    for chunk in users.chunks(2000) {
        r.legacy_add(chunk).await.unwrap();
    }
    let popped = r.legacy_pop(10_000).await.unwrap();
    assert_eq!(popped.len(), 10_000);
    assert_eq!(
        popped_members(&r).await,
        10_000,
        "every member is in the popped set"
    );
    let left: u64 = raw_redis().await.scard(&legacy).await.unwrap();
    assert_eq!(left, 0);
    assert_eq!(r.legacy_ack(&popped).await.unwrap(), 10_000);
    assert_eq!(popped_members(&r).await, 0);
    cleanup(&ns).await;
}

/// Drainer A pops and flags u; the upstream writes u again and re-adds it;
/// drainer B pops it and dies before flagging it; then A acknowledges its own
/// pop. A's ack must not remove B's: u is flagged again once B's pop is seen
/// unacknowledged, and the second write reaches MongoDB with a newer version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_ack_never_drops_a_member_another_drainer_popped() {
    let ns = Namespace::new("legacyrace");
    let engine = start_with(config_with(&ns, "[sync]\nlegacy_recovery_after = \"1s\"\n")).await;
    let r = redis(&ns).await;
    let hold = engine.faults().hold(HoldPoint::LegacyMarked).await;
    r.write_profiles(&generation_profiles(&["racer".into()], 1))
        .await
        .unwrap();
    r.legacy_add(&["racer"].map(String::from)).await.unwrap();
    wait_until("drainer A held between flag and ack", LONG, || async {
        engine.faults().reached(HoldPoint::LegacyMarked) >= 1
    })
    .await;
    let first = r.flag_of("racer").await.unwrap().expect("A flagged racer");

    // The upstream changes racer again; drainer B pops it, then dies.
    r.write_profiles(&generation_profiles(&["racer".into()], 2))
        .await
        .unwrap();
    r.legacy_add(&["racer"].map(String::from)).await.unwrap();
    let b = r.legacy_pop(100).await.unwrap();
    assert_eq!(b.len(), 1, "B popped racer");
    drop(hold);

    let mongo = mongo(&ns).await;
    wait_until(
        "B's pop recovered, flagged anew and applied",
        LONG,
        || async {
            let (v, generation) = dynamic_of(&mongo, "racer").await;
            engine.stats().legacy_recovered >= 1 && v > first && generation == 2
        },
    )
    .await;
    wait_until("nothing left in the popped set", LONG, || async {
        popped_members(&r).await == 0
    })
    .await;
    finish(engine, &ns).await;
}

/// A drainer that died between pop and ack left its members in the popped set
/// (and a release before this one left them in a plain set): the next engine
/// flags them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_left_by_a_drainer_that_died_are_flagged_by_the_next() {
    let ns = Namespace::new("legacycrash");
    let r = redis(&ns).await;
    r.write_profiles(&generation_profiles(&["orphan".into(), "older".into()], 1))
        .await
        .unwrap();
    r.legacy_add(&["orphan"].map(String::from)).await.unwrap();
    let died = r.legacy_pop(100).await.unwrap();
    assert_eq!(died.len(), 1);
    sadd(&r.keys().legacy_draining(), &["older"]).await;

    let engine = start_with(config_with(&ns, "[sync]\nlegacy_recovery_after = \"1s\"\n")).await;
    let mongo = mongo(&ns).await;
    wait_until("both left-over members applied", LONG, || async {
        dynamic_of(&mongo, "orphan").await.1 == 1 && dynamic_of(&mongo, "older").await.1 == 1
    })
    .await;
    assert!(engine.stats().legacy_recovered >= 2, "{:?}", engine.stats());
    assert_eq!(popped_members(&r).await, 0);
    let old: i64 = raw_redis()
        .await
        .exists(r.keys().legacy_draining())
        .await
        .unwrap();
    assert_eq!(old, 0, "the earlier release's draining set is emptied");
    finish(engine, &ns).await;
}
