//! Healing against the real local stack: deletes that stay deleted, the full
//! resync, and the consistency check that reports and repairs drift.

mod common;

use actix_web::{App, http::StatusCode, test};
use common::*;
use datasync::{
    actors::publisher::{Outgoing, build_event},
    jobs::{JobState, resync::Target},
    model::Section,
    proto::SyncType,
};
use fred::interfaces::KeysInterface;
use mongodb::bson::{Document, doc};
use prost::Message;
use rdkafka::producer::FutureRecord;
use serde_json::{Value, json};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(180);

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Produces an event straight to the dynamic topic, as a late or replayed
/// record would arrive.
async fn produce(ns: &str, t: SyncType, user: &str, version: i64, generation: i64) {
    let config = test_config(ns);
    let producer = datasync::clients::kafka::producer(&config.kafka, "test").unwrap();
    let item = Outgoing {
        user_id: user.into(),
        version,
        profile: serde_json::json!({ "gen": generation })
            .as_object()
            .cloned()
            .unwrap(),
        base_version: 0,
        lease_epoch: 0,
    };
    let payload = build_event(t, &item, "test").encode_to_vec();
    producer
        .send(
            FutureRecord::to(&config.kafka.dynamic_topic)
                .key(user)
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

async fn doc_of(m: &datasync::clients::mongo::MongoStore, user: &str) -> Document {
    m.find_user(user).await.unwrap().expect("a document")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_users_become_tombstones_that_older_events_cannot_undo() {
    let ns = Namespace::new("delete");
    let engine = start(&ns).await;
    let mongo = mongo(&ns).await;
    let users = ids("d", 2000);
    let writes: Vec<_> = users.iter().map(|u| profile(u, 1)).collect();
    engine.write_and_mark(&writes).await.unwrap();
    wait_until("2,000 users synced", LONG, || async {
        count_docs(&mongo, doc! { "dynamicProfile.gen": 1 }).await == 2000
    })
    .await;
    let old_version = version_of(&mongo, "d0", Section::Dynamic).await;

    let gone: Vec<String> = users[..1000].to_vec();
    let deleted = engine.delete(&gone).await.unwrap();
    assert_eq!(deleted.len(), 1000);
    assert!(deleted.iter().all(|m| m.version > old_version));
    wait_until("1,000 tombstones", LONG, || async {
        count_docs(&mongo, doc! { "deleted": true }).await == 1000
    })
    .await;

    // The tombstone: both sections gone, the delete's version, the counter.
    let d0 = doc_of(&mongo, "d0").await;
    assert!(d0.get("dynamicProfile").is_none() && d0.get("staticProfile").is_none());
    assert_eq!(d0.get_i64("deletedVersion").unwrap(), deleted[0].version);
    assert!(d0.get_datetime("deletedAt").is_ok());
    assert_eq!(d0.get_i64("dataVersion").unwrap(), 2);
    // The untouched half is as it was.
    assert_eq!(
        count_docs(&mongo, doc! { "dynamicProfile.gen": 1 }).await,
        1000
    );
    // Redis profiles gone, reads answer none.
    let r = redis(&ns).await;
    assert!(
        !r.profiles_exist(&gone[..10])
            .await
            .unwrap()
            .into_iter()
            .any(|e| e)
    );
    assert!(engine.profile("d0").await.unwrap().is_none());
    assert!(engine.profile("d1999").await.unwrap().is_some());
    let app =
        test::init_service(App::new().configure(datasync::http::configure(engine.clone()))).await;
    let resp = test::call_service(
        &app,
        test::TestRequest::get().uri("/v1/profiles/d0").to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // A late older change, and the delete itself replayed: both stale.
    let stale_before = engine.stats().stale_skipped;
    produce(&ns, SyncType::DynamicBatch, "d0", old_version, 7).await;
    produce(&ns, SyncType::DynamicBatch, "d1", deleted[1].version - 1, 7).await;
    produce(&ns, SyncType::UserDelete, "d2", deleted[2].version, 0).await;
    wait_until("three stale events skipped", LONG, || async {
        engine.stats().stale_skipped >= stale_before + 3
    })
    .await;
    for u in ["d0", "d1", "d2"] {
        let d = doc_of(&mongo, u).await;
        assert!(d.get_bool("deleted").unwrap(), "{u}: {d}");
        assert!(d.get("dynamicProfile").is_none(), "{u}: {d}");
        assert_eq!(d.get_i64("dataVersion").unwrap(), 2, "{u}: {d}");
    }

    // A newer write brings the user back, counting on.
    engine.write_and_mark(&[profile("d0", 3)]).await.unwrap();
    wait_until("d0 back at generation 3", LONG, || async {
        let d = doc_of(&mongo, "d0").await;
        d.get_document("dynamicProfile")
            .is_ok_and(|p| p.get_i64("gen") == Ok(3))
    })
    .await;
    let d0 = doc_of(&mongo, "d0").await;
    assert!(
        d0.get("deleted").is_none() && d0.get("deletedAt").is_none(),
        "{d0}"
    );
    assert_eq!(d0.get_i64("dataVersion").unwrap(), 3);
    assert_eq!(
        engine.profile("d0").await.unwrap().unwrap().dynamic_profile["gen"],
        3
    );
    finish(engine, &ns).await;
}

/// A delete keeps a section changed after it, and a user deleted and then
/// flagged again before the scan gets both events: the older static section
/// goes, the newer dynamic one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_removes_only_what_is_older_than_it() {
    let ns = Namespace::new("delorder");
    let engine = start(&ns).await;
    let mongo = mongo(&ns).await;
    engine
        .sync_immediate("s1", json!({ "vip": true }))
        .await
        .unwrap();
    engine.write_and_mark(&[profile("s1", 1)]).await.unwrap();
    wait_until("s1 has both sections", LONG, || async {
        mongo
            .find_user("s1")
            .await
            .unwrap()
            .is_some_and(|d| d.get("staticProfile").is_some() && d.get("dynamicProfile").is_some())
    })
    .await;
    // Delete and re-create in one breath: both are published.
    let hold = engine.hold_publishing().await;
    engine.delete(&["s1".to_string()]).await.unwrap();
    engine.write_and_mark(&[profile("s1", 5)]).await.unwrap();
    drop(hold);
    wait_until(
        "s1 at generation 5 without its static section",
        LONG,
        || async {
            let d = doc_of(&mongo, "s1").await;
            d.get_document("dynamicProfile")
                .is_ok_and(|p| p.get_i64("gen") == Ok(5))
                && d.get("staticProfile").is_none()
        },
    )
    .await;
    let d = doc_of(&mongo, "s1").await;
    assert!(d.get("deleted").is_none(), "{d}");
    assert!(d.get_i64("deletedVersion").is_ok(), "{d}");
    finish(engine, &ns).await;
}

/// With `sync.missing_profile = "delete"`, a flagged user whose profile key
/// is gone is deleted instead of dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_profile_can_mean_a_delete() {
    let ns = Namespace::new("missdel");
    let engine = start_with(config_with(&ns, "[sync]\nmissing_profile = \"delete\"\n")).await;
    let mongo = mongo(&ns).await;
    engine.write_and_mark(&[profile("m1", 1)]).await.unwrap();
    wait_until("m1 synced", LONG, || async {
        count_docs(&mongo, doc! { "userId": "m1" }).await == 1
    })
    .await;
    let r = raw_redis().await;
    let _: i64 = r.del(redis(&ns).await.keys().profile("m1")).await.unwrap();
    engine.mark_dirty(&["m1".to_string()]).await.unwrap();
    wait_until("m1 a tombstone", LONG, || async {
        count_docs(&mongo, doc! { "userId": "m1", "deleted": true }).await == 1
    })
    .await;
    assert_eq!(engine.stats().dlq_records, 0);
    finish(engine, &ns).await;
}

async fn wait_job(
    engine: &datasync::Engine,
    id: &str,
) -> datasync::jobs::Job<datasync::jobs::resync::Resync> {
    wait_until("the resync job done", LONG, || async {
        engine.resync_job(id).await.unwrap().state.finished()
    })
    .await;
    engine.resync_job(id).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_of_all_profiles_fills_an_empty_collection() {
    let ns = Namespace::new("resync");
    let engine = start(&ns).await;
    let mongo = mongo(&ns).await;
    let r = redis(&ns).await;
    let users = ids("r", 6_000);
    for chunk in users.chunks(5000) {
        r.write_profiles(&generation_profiles(chunk, 1))
            .await
            .unwrap();
    }
    assert_eq!(pending_flags(&r).await, 0);
    let job = engine
        .start_resync(Target::All, None, false, "test")
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Running);
    // One job at a time.
    let busy = engine
        .start_resync(Target::All, None, false, "test")
        .await
        .unwrap_err();
    assert!(busy.to_string().contains(&job.id), "{busy}");
    let done = wait_job(&engine, &job.id).await;
    assert_eq!(done.state, JobState::Done, "{done:?}");
    assert_eq!(done.body.scanned, 6_000);
    assert_eq!(done.body.flagged, 6_000);
    wait_until("6,000 documents", LONG, || async {
        holds_at_least(&mongo, 6_000).await
            && count_docs(&mongo, doc! { "dynamicProfile.gen": 1 }).await == 6_000
    })
    .await;
    finish(engine, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consistency_check_reports_drift_by_kind_and_repairs_it() {
    let ns = Namespace::new("drift");
    let engine = start_with(config_with(
        &ns,
        "[consistency]\ninterval = \"0s\"\nstuck_flag_after = \"2s\"\n",
    ))
    .await;
    let mongo = mongo(&ns).await;
    let r = redis(&ns).await;
    let users = ids("c", 300);
    let writes: Vec<_> = users
        .iter()
        .map(|u| datasync::ProfileWrite {
            user_id: u.clone(),
            profile: json!({ "gen": 1, "stats": { "n": 3, "avg": 2.5, "list": [1, 2] }, "z": "last", "a": "first" }),
        })
        .collect();
    engine.write_and_mark(&writes).await.unwrap();
    wait_until("300 users synced", LONG, || async {
        count_docs(&mongo, doc! { "dynamicProfile.gen": 1 }).await == 300
    })
    .await;
    wait_until("every shard owned", LONG, || async {
        engine.shards().await.is_ok_and(|s| s.held.len() == 8)
    })
    .await;

    // A check of a clean state finds nothing: key order and number types
    // do not count.
    let clean = run_check(&engine, json!({})).await;
    assert_eq!(findings(&clean), [0, 0, 0, 0, 0], "{clean}");

    // Drift by hand: 50 documents edited, 30 deleted, 20 Redis profiles
    // changed without a flag, 10 orphan documents, 1 stuck flag.
    let col = mongo.collection();
    for u in &users[..50] {
        col.update_one(
            doc! { "userId": u },
            doc! { "$set": { "dynamicProfile.gen": 99 } },
        )
        .await
        .unwrap();
    }
    col.delete_many(doc! { "userId": { "$in": &users[50..80] } })
        .await
        .unwrap();
    r.write_profiles(&generation_profiles(&users[80..100], 2))
        .await
        .unwrap();
    // Not drift: 40 documents rewritten with the same data in another key
    // order, with numbers as other types (int32, double).
    for u in &users[100..140] {
        let same = doc! { "z": "last", "stats": { "list": [1.0, 2i32], "n": 3.0, "avg": 2.5 }, "gen": 1i32, "a": "first" };
        col.update_one(
            doc! { "userId": u },
            doc! { "$set": { "dynamicProfile": same } },
        )
        .await
        .unwrap();
    }
    for i in 0..10 {
        col.insert_one(doc! { "userId": format!("orphan{i}"), "dynamicProfile": { "gen": 1 }, "dynamicVersion": 1i64 })
            .await
            .unwrap();
    }
    let raw = raw_redis().await;
    let _: () = raw
        .set(r.keys().profile("stuck"), "{not json", None, None, false)
        .await
        .unwrap();
    let stuck = engine.mark_dirty(&["stuck".to_string()]).await.unwrap();
    wait_until("the stuck flag older than 2s", LONG, || async {
        datasync::model::now_us() - stuck[0].version > 2_500_000
    })
    .await;

    let first = run_check(&engine, json!({})).await;
    assert_eq!(findings(&first), [30, 70, 10, 1, 0], "{first}");
    assert_eq!(first["repaired"], 100, "{first}");
    assert_eq!(first["samples"]["orphan"].as_array().unwrap().len(), 10);

    // Repaired: every document equals Redis again; orphans stay.
    wait_until("repairs applied", LONG, || async {
        count_docs(&mongo, doc! { "dynamicProfile.gen": 1 }).await == 280 + 10
            && count_docs(&mongo, doc! { "dynamicProfile.gen": 2 }).await == 20
    })
    .await;
    let second = run_check(&engine, json!({})).await;
    assert_eq!(findings(&second)[..3], [0, 0, 10], "{second}");

    // Orphans go only when asked (a versioned delete: tombstones).
    let third = run_check(&engine, json!({ "repair_orphans": true })).await;
    assert_eq!(third["orphans_deleted"], 10, "{third}");
    wait_until("orphans are tombstones", LONG, || async {
        count_docs(
            &mongo,
            doc! { "userId": { "$regex": "^orphan" }, "deleted": true },
        )
        .await
            == 10
    })
    .await;
    let last = run_check(&engine, json!({})).await;
    assert_eq!(findings(&last)[..3], [0, 0, 0], "{last}");

    // The report sums the window's checks.
    let report = engine.consistency_report(1.0).await.unwrap();
    assert_eq!(report.runs_done, 5);
    assert_eq!(report.findings["missing"], 30);
    assert_eq!(report.findings["orphan"], 30);
    finish(engine, &ns).await;
}

/// `[missing, different, orphan, stuck_flag, static_pending]` of a check.
fn findings(check: &Value) -> [u64; 5] {
    [
        "missing",
        "different",
        "orphan",
        "stuck_flag",
        "static_pending",
    ]
    .map(|k| check["findings"][k].as_u64().unwrap())
}

/// Runs a check through the API and answers its finished record.
async fn run_check(engine: &datasync::Engine, body: Value) -> Value {
    let repair_orphans = body["repair_orphans"].as_bool();
    let job = engine
        .start_consistency_check(false, None, repair_orphans, "test")
        .await
        .unwrap();
    wait_until("the check done", LONG, || async {
        engine
            .consistency_check(&job.id)
            .await
            .unwrap()
            .state
            .finished()
    })
    .await;
    let last = serde_json::to_value(engine.consistency_check(&job.id).await.unwrap()).unwrap();
    assert_eq!(last["state"], "done", "{last}");
    last
}

#[actix_web::test]
async fn the_healing_endpoints_name_bad_input() {
    let ns = Namespace::new("healbad");
    let engine = start_with(config_with(
        &ns,
        "[http]\nadmin_token = \"t0ken\"\n[consistency]\ninterval = \"0s\"\n",
    ))
    .await;
    let app =
        test::init_service(App::new().configure(datasync::http::configure(engine.clone()))).await;
    let admin = ("Authorization", "Bearer t0ken");
    let cases = [
        (
            "/v1/resync",
            json!({ "all": true, "user_ids": ["a"] }),
            400,
            "not both",
        ),
        ("/v1/resync", json!({}), 400, "exactly one of"),
        (
            "/v1/resync",
            json!({ "all": true, "rate": 0 }),
            400,
            "rate: must be",
        ),
        (
            "/v1/resync",
            json!({ "all": true, "rate": -5 }),
            400,
            "rate: must be",
        ),
        (
            "/v1/resync",
            json!({ "all": true, "rate": 1.5 }),
            400,
            "rate: must be",
        ),
        (
            "/v1/resync",
            json!({ "all": true, "speed": 1 }),
            400,
            "unknown field `speed`",
        ),
        (
            "/v1/resync",
            json!({ "user_ids": [""] }),
            400,
            "user_ids[0]: must not be empty",
        ),
        (
            "/v1/sync/delete",
            json!({ "user_ids": [] }),
            400,
            "user_ids: must not be empty",
        ),
        (
            "/v1/sync/delete",
            json!({ "users": ["a"] }),
            400,
            "unknown field `users`",
        ),
        (
            "/v1/consistency/check",
            json!({ "repair": "yes" }),
            400,
            "invalid type",
        ),
        (
            "/v1/consistency/check",
            json!({ "deep": true }),
            400,
            "unknown field `deep`",
        ),
    ];
    for (path, body, status, needle) in cases {
        let req = test::TestRequest::post()
            .uri(path)
            .insert_header(admin)
            .set_json(&body)
            .to_request();
        let resp = test::call_service(&app, req).await;
        assert_eq!(resp.status().as_u16(), status, "{path} {body}");
        let v: Value = test::read_body_json(resp).await;
        assert!(
            v["error"].as_str().unwrap().contains(needle),
            "{path} {body}: {v}"
        );
    }
    for (uri, status, needle) in [
        ("/v1/resync/resync-nope", 404, "no resync job `resync-nope`"),
        ("/v1/consistency/check/x", 404, "no consistency job `x`"),
        ("/v1/consistency/report?hours=abc", 400, "hours: `abc`"),
        ("/v1/consistency/report?hours=0", 400, "hours: `0`"),
        ("/v1/consistency/report?days=1", 400, "unknown field `days`"),
    ] {
        let req = test::TestRequest::get()
            .uri(uri)
            .insert_header(admin)
            .to_request();
        let resp = test::call_service(&app, req).await;
        assert_eq!(resp.status().as_u16(), status, "{uri}");
        let v: Value = test::read_body_json(resp).await;
        assert!(v["error"].as_str().unwrap().contains(needle), "{uri}: {v}");
    }
    // Without the token, the jobs are refused.
    let req = test::TestRequest::post()
        .uri("/v1/resync")
        .set_json(json!({ "all": true }))
        .to_request();
    assert_eq!(
        test::call_service(&app, req).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // A good request: 202 with the job's id and state, then polled.
    let req = test::TestRequest::post()
        .uri("/v1/consistency/check")
        .insert_header(admin)
        .to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let v: Value = test::read_body_json(resp).await;
    assert_eq!(v["state"], "running");
    let id = v["id"].as_str().unwrap().to_string();
    let req = test::TestRequest::get()
        .uri(&format!("/v1/consistency/check/{id}"))
        .insert_header(admin)
        .to_request();
    let v: Value = test::call_and_read_body_json(&app, req).await;
    assert_eq!(v["id"], id.as_str());
    finish(engine, &ns).await;
}
