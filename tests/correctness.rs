//! Ways a change could be lost or hidden, each forced against the real local
//! stack: MongoDB write-concern errors, rejected changes and their redrive,
//! dead letters closed only when earned, fencing epochs after a failover,
//! oversized documents and bulk writes, and job leases. The legacy drain is in
//! `legacy_drain.rs`.

mod common;

use common::*;
use datasync::{
    actors::dlq::RedriveTarget,
    clients::mongo::{Change, Op},
    model::Section,
};
use fred::interfaces::{KeysInterface, SortedSetsInterface};
use mongodb::bson::{Document, doc};
use serde_json::json;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(120);

/// A reply with `ok: 1` and a `writeConcernError` (here: more nodes asked for
/// than exist) means the writes may be rolled back: nothing of it counts as
/// applied, and the applier retries the window instead of committing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_concern_error_is_a_failed_write_not_an_applied_one() {
    let ns = Namespace::new("wconcern");
    let mut c = test_config(&ns).mongo;
    c.url = datasync::config::Secret::new(format!("{}&w=5&wtimeoutMS=10", mongo_url()));
    let store = datasync::clients::mongo::MongoStore::connect_without_index(&c, "tests")
        .await
        .unwrap();
    let change = Change {
        user_id: "w".into(),
        section: Section::Dynamic,
        version: 7,
        op: Op::Set(doc! { "gen": 1 }),
        event_id: "e".into(),
        marked_at_ms: 0,
    };
    let err = store.apply(&[change]).await.unwrap_err();
    assert!(
        matches!(
            err,
            datasync::clients::mongo::MongoError::WriteConcern { .. }
        ),
        "{err}"
    );
    assert!(
        datasync::retry::Retryable::is_retryable(&err),
        "the window is retried"
    );
    let _ = mongo(&ns).await.collection().drop().await;
}

/// A collection validator that refuses `level >= 10` in the given section, and
/// lets documents without that section through.
fn level_validator(section: &str) -> Document {
    let field = format!("{section}.level");
    doc! { "$or": [
        { field.clone(): { "$exists": false } },
        { field: { "$lt": 10 } },
    ] }
}

async fn create_with_validator(ns: &str, validator: Document) -> mongodb::Database {
    let client = mongodb::Client::with_uri_str(mongo_url()).await.unwrap();
    let db = client.database("datasync_test");
    db.create_collection(ns).validator(validator).await.unwrap();
    db
}

async fn drop_validator(db: &mongodb::Database, ns: &str) {
    db.run_command(doc! { "collMod": ns, "validator": {} })
        .await
        .unwrap();
}

/// MongoDB rejects an acknowledged immediate change: it is dead-lettered, and
/// its pending copy stays in Redis (not settled) so that a redrive, once the
/// cause is fixed, publishes it again with a new version and it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_immediate_change_stays_pending_and_a_redrive_applies_it() {
    let ns = Namespace::new("rejectstatic");
    let db = create_with_validator(&ns, level_validator("staticProfile")).await;
    let engine = start(&ns).await;
    let r = redis(&ns).await;
    let receipt = engine
        .sync_immediate("vip", json!({ "vip": true, "level": 20 }))
        .await
        .unwrap();
    wait_until("the rejected change dead-lettered", LONG, || async {
        engine.dlq_list(10).await.unwrap().open == 1
    })
    .await;
    let e = engine.dlq_list(10).await.unwrap().entries.remove(0);
    assert_eq!(
        (e.user_id.as_str(), e.stage.as_str(), e.sync_type.as_str()),
        ("vip", "apply", "static")
    );
    assert_eq!(e.version, receipt.version);
    assert_eq!(
        r.static_pending_of("vip").await.unwrap().map(|p| p.0),
        Some(receipt.version),
        "the rejected change is kept pending"
    );
    let mongo = mongo(&ns).await;
    assert!(mongo.find_user("vip").await.unwrap().is_none());

    drop_validator(&db, &ns).await;
    let out = engine
        .dlq_redrive(RedriveTarget::Users(vec!["vip".into()]), "test")
        .await
        .unwrap();
    assert_eq!(out.redriven.len(), 1, "{out:?}");
    let (_, again) = out.redriven[0];
    assert!(again > receipt.version);
    wait_until("the redriven change applied", LONG, || async {
        version_of(&mongo, "vip", datasync::model::Section::Static).await == again
    })
    .await;
    wait_until("pending copy and dead letter gone", LONG, || async {
        r.static_pending_of("vip").await.unwrap().is_none()
            && engine.dlq_list(10).await.unwrap().open == 0
    })
    .await;
    finish(engine, &ns).await;
}

/// A dynamic change MongoDB rejected was published, so its flag is gone: only
/// the redrive can bring it back. After the cause is fixed, the redrive
/// re-flags the user and the profile in Redis is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_reflags_a_user_whose_flag_is_gone() {
    let ns = Namespace::new("rejectdynamic");
    let db = create_with_validator(&ns, level_validator("dynamicProfile")).await;
    let engine = start(&ns).await;
    let r = redis(&ns).await;
    engine
        .write_and_mark(&[datasync::ProfileWrite {
            user_id: "big".into(),
            profile: json!({ "level": 42 }),
        }])
        .await
        .unwrap();
    wait_until("the rejected change dead-lettered", LONG, || async {
        engine.dlq_list(10).await.unwrap().open == 1
    })
    .await;
    let e = engine.dlq_list(10).await.unwrap().entries.remove(0);
    assert_eq!(
        (e.stage.as_str(), e.sync_type.as_str()),
        ("apply", "dynamic")
    );
    assert_eq!(
        pending_flags(&r).await,
        0,
        "the flag was cleared at publish"
    );

    drop_validator(&db, &ns).await;
    let out = engine
        .dlq_redrive(RedriveTarget::Users(vec!["big".into()]), "test")
        .await
        .unwrap();
    assert_eq!(out.redriven.len(), 1, "{out:?}");
    let mongo = mongo(&ns).await;
    wait_until("the redriven user applied", LONG, || async {
        version_of(&mongo, "big", datasync::model::Section::Dynamic).await == out.redriven[0].1
    })
    .await;
    wait_until("the dead letter closed", LONG, || async {
        engine.dlq_list(10).await.unwrap().open == 0
    })
    .await;
    finish(engine, &ns).await;
}

/// The clear script closes a dynamic dead letter only for a flag it really
/// removed, and only up to that version; static dead letters are not its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_clear_closes_only_the_dead_letters_it_earned() {
    let ns = Namespace::new("dlqclose");
    let r = redis(&ns).await;
    // x: flagged at its new version, dead letter for that version.
    // y: flagged; a static dead letter is open.
    // z: flagged at 11, dead letter for a newer version 12.
    let users = ["x", "y", "z"];
    let versions: Vec<i64> = r
        .mark(&users.map(String::from))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.1)
        .collect();
    let entry = |u: &str, v: i64, t: &str| {
        json!({
            "user_id": u, "version": v, "stage": "load", "sync_type": t,
            "error": "e", "detail": "d", "retry_count": 0, "failed_at_ms": 1,
            "instance_id": "i", "topic": "t",
        })
        .to_string()
    };
    r.dlq_put(&[
        ("x", Section::Dynamic, entry("x", versions[0], "dynamic")),
        ("y", Section::Static, entry("y", versions[1], "static")),
        (
            "z",
            Section::Dynamic,
            entry("z", versions[2] + 1, "dynamic"),
        ),
    ])
    .await
    .unwrap();
    let shard_of = |u: &str| datasync::shard::shard_of(u, r.shards());
    let open = |u: &'static str, s: Section| {
        let r = r.clone();
        async move { r.dlq_entries(&[(u, s)]).await.unwrap()[0].is_some() }
    };

    // A clear at an older version removes nothing, closes nothing.
    let n = r
        .clear_flags(shard_of("x"), &[("x".into(), versions[0] - 1)], None)
        .await
        .unwrap();
    assert_eq!(n, 0);
    assert!(
        open("x", Section::Dynamic).await,
        "no flag removed, no entry closed"
    );
    // The clear at the published version closes it.
    r.clear_flags(shard_of("x"), &[("x".into(), versions[0])], None)
        .await
        .unwrap();
    assert!(!open("x", Section::Dynamic).await);
    // A dynamic clear never closes a static dead letter.
    r.clear_flags(shard_of("y"), &[("y".into(), versions[1])], None)
        .await
        .unwrap();
    assert!(open("y", Section::Static).await);
    // A flag re-marked since the page was read is not removed, so the dead
    // letter of the version the page carried stays open until the newer flag
    // is cleared.
    let w1 = r.mark(&["w".to_string()]).await.unwrap()[0].1;
    r.dlq_put(&[("w", Section::Dynamic, entry("w", w1, "dynamic"))])
        .await
        .unwrap();
    let w2 = r.mark(&["w".to_string()]).await.unwrap()[0].1;
    let n = r
        .clear_flags(shard_of("w"), &[("w".into(), w1)], None)
        .await
        .unwrap();
    assert_eq!(n, 0);
    assert!(
        open("w", Section::Dynamic).await,
        "closed by a clear that removed nothing"
    );
    r.clear_flags(shard_of("w"), &[("w".into(), w2)], None)
        .await
        .unwrap();
    assert!(!open("w", Section::Dynamic).await);
    // A MongoDB rejection at the version just published stays open: the
    // publish that cleared the flag does not prove the change applied.
    let q = r.mark(&["q".to_string()]).await.unwrap()[0].1;
    let rejected = json!({
        "user_id": "q", "version": q, "stage": "apply", "sync_type": "dynamic",
        "error": "e", "detail": "d", "retry_count": 0, "failed_at_ms": 1,
        "instance_id": "i", "topic": "t",
    })
    .to_string();
    r.dlq_put(&[("q", Section::Dynamic, rejected)])
        .await
        .unwrap();
    r.clear_flags(shard_of("q"), &[("q".into(), q)], None)
        .await
        .unwrap();
    assert!(
        open("q", Section::Dynamic).await,
        "an apply-stage dead letter closed by a publish"
    );
    // A dead letter newer than the cleared flag stays.
    r.clear_flags(shard_of("z"), &[("z".into(), versions[2])], None)
        .await
        .unwrap();
    assert!(open("z", Section::Dynamic).await);
    cleanup(&ns).await;
}

/// After a failover that lost the last acquisition (replication is
/// asynchronous), the epoch counter and the lease are back to their state
/// before it. The next owner must still get an epoch never issued before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_lost_in_a_failover_is_never_issued_again() {
    let ns = Namespace::new("epoch");
    let r = redis(&ns).await;
    let ttl = Duration::from_secs(30);
    let e0 = r.lease_acquire(0, "a#1", ttl).await.unwrap().unwrap();
    assert!(r.lease_release(0, &format!("a#1|{e0}")).await.unwrap());
    let e1 = r.lease_acquire(0, "b#1", ttl).await.unwrap().unwrap();
    assert!(e1 > e0);
    // The failover: the replica had seen e0 but not the acquisition of e1.
    let raw = raw_redis().await;
    let _: () = raw
        .set(r.keys().epoch(0), e0.to_string(), None, None, false)
        .await
        .unwrap();
    let _: i64 = raw.del(r.keys().lease(0)).await.unwrap();
    let e2 = r.lease_acquire(0, "c#1", ttl).await.unwrap().unwrap();
    assert!(e2 > e1, "epoch {e2} was already issued (last issued {e1})");
    cleanup(&ns).await;
}

/// One change too large for any command (50 MB, over the 48 MB message
/// limit, so the whole bulk is refused) is rejected alone, to be
/// dead-lettered, once the window is written statement by statement; so is
/// a profile with a field name BSON cannot encode (a NUL byte). The others
/// in its window apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_too_large_is_rejected_alone_and_the_rest_apply() {
    let ns = Namespace::new("toolarge");
    let store = mongo(&ns).await;
    let change = |user: &str, profile: mongodb::bson::Document| Change {
        user_id: user.into(),
        section: Section::Dynamic,
        version: 5,
        op: Op::Set(profile),
        event_id: "e".into(),
        marked_at_ms: 0,
    };
    let huge = "x".repeat(50 * 1024 * 1024);
    let outcomes = store
        .apply(&[
            change("a", doc! { "gen": 1 }),
            change("b", doc! { "pad": huge }),
            change("c", doc! { "gen": 1 }),
            change("d", doc! { "bad\0name": 1 }),
        ])
        .await
        .unwrap();
    assert_eq!(outcomes[0], datasync::clients::mongo::Outcome::Applied);
    assert!(
        matches!(&outcomes[1], datasync::clients::mongo::Outcome::Rejected(_)),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[2], datasync::clients::mongo::Outcome::Applied);
    assert!(
        matches!(&outcomes[3], datasync::clients::mongo::Outcome::Rejected(e) if e.contains("user `d`")),
        "{outcomes:?}"
    );
    assert_eq!(count_docs(&store, doc! {}).await, 2);
}

/// A window larger than one command may carry (four 13 MB documents, 52 MB
/// against the 48 MB message limit) is written as several commands, cut by
/// size, and every change applies: a window of large profiles does not block
/// the applier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_update_over_the_message_limit_is_split_and_applies() {
    let ns = Namespace::new("bigbulk");
    let store = mongo(&ns).await;
    let pad = "y".repeat(13 * 1024 * 1024);
    let changes: Vec<Change> = (0..4)
        .map(|i| Change {
            user_id: format!("big{i}"),
            section: Section::Dynamic,
            version: 5,
            op: Op::Set(doc! { "pad": &pad }),
            event_id: "e".into(),
            marked_at_ms: 0,
        })
        .collect();
    let outcomes = store.apply(&changes).await.unwrap();
    assert!(
        outcomes
            .iter()
            .all(|o| *o == datasync::clients::mongo::Outcome::Applied),
        "{outcomes:?}"
    );
    assert_eq!(count_docs(&store, doc! {}).await, 4);
}

/// A job's lease that expired while its runner was busy between two
/// checkpoints (a replay window slower than the lease) is taken back at the
/// next checkpoint, so the runner does not stop and hand its own job to a
/// second run that would count everything again; a job another runner took
/// over, or that ended, is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_takes_back_an_expired_lease_only_when_nobody_else_took_the_job() {
    use datasync::clients::redis::Checkpoint;
    let ns = Namespace::new("joblease");
    let r = redis(&ns).await;
    let raw = raw_redis().await;
    let (kind, id) = ("replay", "replay-lease-test");
    let (record, lease) = (r.keys().job(kind, id), r.keys().job_lease(kind, id));
    let job = |state: &str, instance: &str| {
        json!({ "id": id, "kind": kind, "state": state, "instance_id": instance }).to_string()
    };
    let lease_ttl = Duration::from_secs(30);
    let holder = || async { raw.get::<Option<String>, _>(&lease).await.unwrap() };

    // Expired (no lease key), the record still this runner's: taken back.
    let _: () = raw
        .set(&record, job("running", "me"), None, None, false)
        .await
        .unwrap();
    let saved = r
        .job_save(kind, id, &job("running", "me"), "me", lease_ttl)
        .await
        .unwrap();
    assert_eq!(saved, Checkpoint::Saved);
    assert_eq!(holder().await.as_deref(), Some("me"));

    // Another runner holds it: lost, nothing written.
    let _: () = raw.set(&lease, "other", None, None, false).await.unwrap();
    let lost = r
        .job_save(kind, id, &job("running", "me"), "me", lease_ttl)
        .await
        .unwrap();
    assert_eq!(lost, Checkpoint::Lost);
    assert_eq!(holder().await.as_deref(), Some("other"));

    // Expired after another runner took it over (the record names it), or
    // after the job ended: lost, and the lease stays free.
    for (state, instance) in [("running", "other"), ("done", "me")] {
        let _: i64 = raw.del(&lease).await.unwrap();
        let _: () = raw
            .set(&record, job(state, instance), None, None, false)
            .await
            .unwrap();
        let lost = r
            .job_save(kind, id, &job("running", "me"), "me", lease_ttl)
            .await
            .unwrap();
        assert_eq!(lost, Checkpoint::Lost, "{state} by {instance}");
        assert_eq!(holder().await, None, "{state} by {instance}");
        let stored: String = raw.get(&record).await.unwrap();
        assert!(
            stored.contains(instance) && stored.contains(state),
            "{stored}"
        );
    }
    cleanup(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clear_of_thousands_of_flags_removes_only_those_still_at_their_version() {
    // One shard, so one call covers more users than the script reads per
    // chunk.
    let ns = Namespace::new("clear-many");
    let r = one_shard_redis(&ns).await;
    let users: Vec<String> = (0..2500).map(|i| format!("u{i}")).collect();
    let first = r.mark(&users).await.unwrap();
    // Every third user is flagged again: its flag moved on to a newer version.
    let moved: Vec<String> = users.iter().step_by(3).cloned().collect();
    r.mark(&moved).await.unwrap();

    let cleared = r.clear_flags(0, &first, None).await.unwrap();
    assert_eq!(cleared as usize, users.len() - moved.len());
    let mut left: Vec<String> = r
        .read_flags(0, None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    left.sort();
    let mut want = moved.clone();
    want.sort();
    assert_eq!(left, want, "only the flags that moved on are left");
}

/// Marking thousands of users of one shard in one call (more than the mark
/// script flags per chunk): each gets its own strictly increasing version,
/// a user named twice keeps the later one, and every cached composed
/// profile of theirs is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_of_thousands_of_users_versions_each_and_drops_their_cached_profiles() {
    let ns = Namespace::new("mark-many");
    let r = one_shard_redis(&ns).await;
    let raw = raw_redis().await;
    let mut users: Vec<String> = (0..2500).map(|i| format!("u{i}")).collect();
    for u in users.iter().step_by(100) {
        let _: () = raw
            .set(r.keys().profile_cache(0, u), "{}", None, None, false)
            .await
            .unwrap();
    }
    // u7 again, in the second chunk.
    users.push("u7".to_string());
    let marked = r.mark(&users).await.unwrap();
    assert_eq!(marked.len(), users.len());
    assert!(
        marked.windows(2).all(|w| w[0].1 < w[1].1),
        "versions strictly increase in the order the users were given"
    );
    let flags: std::collections::HashMap<String, i64> = r
        .read_flags(0, None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(flags.len(), 2500);
    for (u, v) in &marked[..2500] {
        if u != "u7" {
            assert_eq!(flags[u], *v, "{u}'s flag is at its version");
        }
    }
    assert_eq!(flags["u7"], marked[2500].1, "u7 keeps its later version");
    for u in users.iter().step_by(100) {
        let cached: Option<String> = raw.get(r.keys().profile_cache(0, u)).await.unwrap();
        assert_eq!(cached, None, "{u}'s cached profile is dropped");
    }
}

/// The applied-version L2 only rises, over calls of thousands of fields
/// (more than the script reads per chunk): a lower version leaves the
/// stored one, and a field named twice in one call keeps the higher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_applied_versions_l2_only_rises_over_thousands_of_fields() {
    let ns = Namespace::new("applied-l2");
    let r = one_shard_redis(&ns).await;
    let users: Vec<String> = (0..1500).map(|i| format!("u{i}")).collect();
    let first: Vec<(&str, Section, i64)> = users
        .iter()
        .map(|u| (u.as_str(), Section::Dynamic, 100))
        .collect();
    r.raise_applied(0, &first).await.unwrap();
    // Even users rise to 200, odd ones are offered 50. Named twice: u3 in
    // the first chunk (400, then 300 in u5's place, which keeps 100), u1
    // (60, then 300) and u2 (250, then 150) across chunks.
    let mut second: Vec<(&str, Section, i64)> = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            (
                u.as_str(),
                Section::Dynamic,
                if i % 2 == 0 { 200 } else { 50 },
            )
        })
        .collect();
    second[1].2 = 60;
    second[2].2 = 250;
    second[3].2 = 400;
    second[5] = ("u3", Section::Dynamic, 300);
    second.push(("u1", Section::Dynamic, 300));
    second.push(("u2", Section::Dynamic, 150));
    second.push(("u0", Section::Static, 7));
    r.raise_applied(0, &second).await.unwrap();

    let ids: Vec<&str> = users.iter().map(String::as_str).collect();
    let got = r.applied_versions(0, &ids).await.unwrap();
    for (i, (s, d)) in got.iter().enumerate() {
        let want = match i {
            0 => 200,
            1 => 300,
            2 => 250,
            3 => 400,
            i if i % 2 == 0 => 200,
            _ => 100,
        };
        assert_eq!(*d, Some(want), "u{i}'s dynamic version");
        assert_eq!(*s, (i == 0).then_some(7), "u{i}'s static version");
    }
}

/// The scanner's clear removes a page's published flags by score range. A
/// flag the page did not publish (its change went to the dead-letter queue)
/// and a flag marked again while the page was in flight must both stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_cleared_by_ranges_keeps_its_unpublished_and_re_marked_flags() {
    let ns = Namespace::new("clear-ranges");
    let r = one_shard_redis(&ns).await;
    let users: Vec<String> = (0..2500).map(|i| format!("u{i}")).collect();
    r.mark(&users).await.unwrap();
    let page = r.read_flags(0, None, 10_000).await.unwrap();
    let read: Vec<i64> = page.iter().map(|(_, v)| *v).collect();
    // Every seventh flag failed to publish; every fifth user is marked again
    // after the page was read.
    let failed: Vec<String> = page.iter().step_by(7).map(|(u, _)| u.clone()).collect();
    let cleared: Vec<(String, i64)> = page
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 7 != 0)
        .map(|(_, f)| f.clone())
        .collect();
    let moved: Vec<String> = page.iter().step_by(5).map(|(u, _)| u.clone()).collect();
    r.mark(&moved).await.unwrap();

    let n = r.clear_page(0, &read, &cleared, None).await.unwrap();
    let mut want: Vec<String> = failed.iter().chain(&moved).cloned().collect();
    want.sort();
    want.dedup();
    assert_eq!(n as usize, users.len() - want.len());
    let mut left: Vec<String> = r
        .read_flags(0, None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    left.sort();
    assert_eq!(left, want, "only unpublished and re-marked flags are left");
    cleanup(&ns).await;
}

/// Where a range would take more than its run (a score written outside the
/// shard clock) or the shard has dead letters to close, the page is cleared
/// member by member: the stranger stays and the earned dead letter closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_clear_falls_back_to_members_for_strangers_and_dead_letters() {
    let ns = Namespace::new("clear-fallback");
    let r = one_shard_redis(&ns).await;
    let raw = raw_redis().await;
    let dirty = r.keys().dirty(0);

    // A stranger scored inside the page's range after it was read.
    let users: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let page = r.mark(&users).await.unwrap();
    let read: Vec<i64> = page.iter().map(|(_, v)| *v).collect();
    let _: i64 = raw
        .zadd(
            &dirty,
            None,
            None,
            false,
            false,
            ((read[0] + 1) as f64, "stranger"),
        )
        .await
        .unwrap();
    let n = r.clear_page(0, &read, &page, None).await.unwrap();
    assert_eq!(n, 3);
    let left: Vec<String> = r
        .read_flags(0, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    assert_eq!(left, vec!["stranger".to_string()]);

    // A load-stage dead letter of d at its flag's version: the publish that
    // clears the flag earns its close.
    let page = r.mark(&["d".to_string(), "e".to_string()]).await.unwrap();
    let read: Vec<i64> = page.iter().map(|(_, v)| *v).collect();
    let entry = json!({
        "user_id": "d", "version": read[0], "stage": "load", "sync_type": "dynamic",
        "error": "e", "detail": "d", "retry_count": 0, "failed_at_ms": 1,
        "instance_id": "i", "topic": "t",
    })
    .to_string();
    r.dlq_put(&[("d", Section::Dynamic, entry)]).await.unwrap();
    let n = r.clear_page(0, &read, &page, None).await.unwrap();
    assert_eq!(n, 2);
    assert!(
        r.dlq_entries(&[("d", Section::Dynamic)]).await.unwrap()[0].is_none(),
        "the dead letter the publish earned is closed"
    );
    cleanup(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_the_applied_l2_does_not_know_are_looked_up_in_mongodb_only_with_the_fallback() {
    use datasync::cache::AppliedCache;
    let ns = Namespace::new("fallback");
    let r = redis(&ns).await;
    let m = mongo(&ns).await;
    // u1 is applied in MongoDB but unknown to L2, as after Redis lost it.
    m.collection()
        .insert_one(doc! { "userId": "u1", "staticVersion": 3_i64, "dynamicVersion": 7_i64 })
        .await
        .unwrap();
    let users = vec!["u1".to_string(), "u2".to_string()];
    let cache =
        |fallback| AppliedCache::new(100, Duration::from_secs(60), r.clone(), m.clone(), fallback);

    let off = cache(false);
    let got = off.resolve(&users, Section::Dynamic).await.unwrap();
    assert_eq!(
        (got["u1"], got["u2"]),
        (0, 0),
        "never applied, as far as L2 knows"
    );
    assert_eq!(off.stats().mongo_lookups, 0);

    let on = cache(true);
    let got = on.resolve(&users, Section::Dynamic).await.unwrap();
    assert_eq!((got["u1"], got["u2"]), (7, 0));
    assert_eq!(on.stats().mongo_lookups, 2);

    // The lookup filled L2: a cache without the fallback now knows u1.
    let got = cache(false).resolve(&users, Section::Static).await.unwrap();
    assert_eq!((got["u1"], got["u2"]), (3, 0));
}
