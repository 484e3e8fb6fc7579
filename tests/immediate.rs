//! The immediate (static) path: priority over a dynamic backlog, sections that
//! never clobber each other, acceptance while Kafka is down, and profile reads.

mod common;

use actix_web::{App, http::StatusCode, test};
use common::*;
use datasync::{EngineError, ProfileWrite, faults::HoldPoint, strategy::ImmediateSync};
use futures::TryStreamExt;
use mongodb::bson::doc;
use rdkafka::mocking::MockCluster;
use serde_json::{Value, json};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(240);

async fn static_version(m: &datasync::clients::mongo::MongoStore, user: &str) -> i64 {
    version_of(m, user, datasync::model::Section::Static).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_change_lands_before_a_200k_dynamic_backlog_finishes() {
    let ns = Namespace::new("priority");
    let mut config = test_config(&ns);
    config.sync.page_size = 2000;
    let engine = start_with(config).await;
    for chunk in (0..200_000).collect::<Vec<_>>().chunks(2000) {
        let users: Vec<_> = chunk.iter().map(|i| profile(&format!("b{i}"), 1)).collect();
        engine.write_and_mark(&users).await.unwrap();
    }
    wait_until("the dynamic backlog being applied", LONG, || async {
        engine.stats().events_applied > 0
    })
    .await;
    let receipt = engine
        .sync_immediate("banned-user", json!({ "banned": true, "reason": "abuse" }))
        .await
        .unwrap();
    assert!(receipt.partition.is_some() && receipt.offset.is_some());
    let mongo = mongo(&ns).await;
    wait_until("the ban in MongoDB", LONG, || async {
        static_version(&mongo, "banned-user").await == receipt.version
    })
    .await;
    let dynamic_done = count_docs(&mongo, doc! { "dynamicVersion": { "$exists": true } }).await;
    let (_, applied) = engine.immediate_latency_histograms();
    eprintln!(
        "ban applied after {} ms with {dynamic_done} of 200,000 dynamic changes applied",
        applied.max()
    );
    assert!(
        dynamic_done < 200_000,
        "the ban waited for the whole backlog"
    );
    let d = mongo.find_user("banned-user").await.unwrap().unwrap();
    assert!(
        d.get_document("staticProfile")
            .unwrap()
            .get_bool("banned")
            .unwrap()
    );
    // No need to drain the backlog: stop at once and drop the data.
    engine.shutdown(Duration::from_secs(2)).await;
    cleanup(&ns).await;
}

/// The priority itself: while a static window is being written, the dynamic
/// consumer loop holds its next window back (the gate), instead of writing
/// beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dynamic_loop_waits_while_a_static_window_is_in_flight() {
    let ns = Namespace::new("gate");
    let engine = start(&ns).await;
    let hold = engine.faults().hold(HoldPoint::StaticWindow).await;
    let receipt = engine
        .sync_immediate("ban", json!({ "banned": true }))
        .await
        .unwrap();
    wait_until("the static window in flight", LONG, || async {
        engine.faults().reached(HoldPoint::StaticWindow) >= 1
    })
    .await;
    let before = engine.stats().priority_waits;
    let users: Vec<_> = (0..200).map(|i| profile(&format!("g{i}"), 1)).collect();
    engine.write_and_mark(&users).await.unwrap();
    wait_until("the dynamic loop held at the gate", LONG, || async {
        engine.stats().priority_waits > before
    })
    .await;
    drop(hold);
    let mongo = mongo(&ns).await;
    wait_until("both paths applied once the gate opens", LONG, || async {
        static_version(&mongo, "ban").await == receipt.version
            && count_docs(&mongo, doc! { "dynamicVersion": { "$exists": true } }).await == 200
    })
    .await;
    finish(engine, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_and_dynamic_changes_raced_on_the_same_users_both_end_newest() {
    let ns = Namespace::new("sections");
    let engine = start(&ns).await;
    let users: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
    let dynamic = {
        let (engine, users) = (engine.clone(), users.clone());
        tokio::spawn(async move {
            let mut last = std::collections::HashMap::new();
            for generation in 1..=3 {
                let writes: Vec<_> = users.iter().map(|u| profile(u, generation)).collect();
                for m in engine.write_and_mark(&writes).await.unwrap() {
                    last.insert(m.user_id, m.version);
                }
            }
            last
        })
    };
    let mut last_static = std::collections::HashMap::new();
    for generation in 1..=3 {
        let writes: Vec<ProfileWrite> = users
            .iter()
            .map(|u| ProfileWrite {
                user_id: u.clone(),
                profile: json!({ "vip": generation, "level": format!("l{generation}") }),
            })
            .collect();
        for r in engine.sync(&ImmediateSync, &writes).await.unwrap() {
            last_static.insert(r.user_id, r.version);
        }
    }
    let last_dynamic = dynamic.await.unwrap();
    let mongo = mongo(&ns).await;
    wait_until(
        "both sections at generation 3 for every user",
        LONG,
        || async {
            count_docs(
                &mongo,
                doc! { "staticProfile.vip": 3i64, "dynamicProfile.gen": 3i64 },
            )
            .await
                == 1000
        },
    )
    .await;
    let mut cursor = mongo.collection().find(doc! {}).await.unwrap();
    while let Some(d) = cursor.try_next().await.unwrap() {
        let u = d.get_str("userId").unwrap();
        assert_eq!(d.get_i64("staticVersion").unwrap(), last_static[u], "{u}");
        assert_eq!(d.get_i64("dynamicVersion").unwrap(), last_dynamic[u], "{u}");
        assert!(d.get_i64("dataVersion").unwrap() <= 6, "{u}");
    }
    let s = engine.stats();
    assert!(s.events_published >= 3000, "{s:?}");
    finish(engine, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_change_accepted_while_kafka_is_down_is_applied_after() {
    let ns = Namespace::new("immdown");
    let cluster = MockCluster::new(1).unwrap();
    for t in ["static", "dynamic", "dlq"] {
        cluster.create_topic(&format!("{ns}-{t}"), 2, 1).unwrap();
    }
    let config = datasync::Config::from_layers(
        &[
            ("test".into(), config_toml(&ns)),
            (
                "mock".into(),
                format!(
                    "[kafka]\nbrokers = \"{}\"\ncreate_topics = false\nmessage_timeout = \"1s\"\n[retry]\nmax_retries = 2\ninitial_delay = \"100ms\"\nmax_delay = \"200ms\"\njitter = 0.0\n[dlq]\nforward_interval = \"200ms\"\n",
                    cluster.bootstrap_servers()
                ),
            ),
        ],
        std::iter::empty(),
    )
    .unwrap();
    let engine = start_with(config).await;
    let before = engine
        .sync_immediate("warmup", json!({ "vip": false }))
        .await
        .unwrap();
    assert!(before.version > 0);

    cluster.broker_down(1).unwrap();
    let err = engine
        .sync_immediate("vip-user", json!({ "vip": true }))
        .await
        .unwrap_err();
    let EngineError::NotPublished { version, reason } = &err else {
        panic!("expected NotPublished, got {err}");
    };
    assert!(reason.contains("kafka delivery failed"), "{reason}");
    assert!(engine.stats().dlq_records >= 1);
    let r = redis(&ns).await;
    assert_eq!(
        r.static_pending_of("vip-user").await.unwrap().map(|p| p.0),
        Some(*version)
    );
    // Readers already see the accepted change.
    let p = engine.profile("vip-user").await.unwrap().unwrap();
    assert_eq!(p.static_profile["vip"], true);
    assert_eq!(p.pending, vec!["static".to_string()]);

    cluster.broker_up(1).unwrap();
    let mongo = mongo(&ns).await;
    wait_until(
        "the accepted change applied after Kafka returned",
        LONG,
        || async { static_version(&mongo, "vip-user").await == *version },
    )
    .await;
    wait_until("nothing left pending", LONG, || async {
        r.static_pending_of("vip-user").await.unwrap().is_none()
    })
    .await;
    finish(engine, &ns).await;
}

#[actix_web::test]
async fn profile_reads_return_the_newest_data_and_the_cache_stats_move() {
    let ns = Namespace::new("profiles");
    let engine = start(&ns).await;
    let app =
        test::init_service(App::new().configure(datasync::http::configure(engine.clone()))).await;
    let get = |uri: String| test::TestRequest::get().uri(&uri).to_request();

    engine.write_and_mark(&[profile("p1", 1)]).await.unwrap();
    let mongo = mongo(&ns).await;
    wait_until("p1 applied", LONG, || async {
        count_docs(&mongo, doc! { "userId": "p1" }).await == 1
    })
    .await;
    let first: Value = test::call_and_read_body_json(&app, get("/v1/profiles/p1".into())).await;
    assert_eq!(first["dynamic_profile"]["gen"], 1);
    // Reads fill the caches once the applier's own invalidation (right after
    // its write) has passed; from then on they hit.
    wait_until("a cached read", LONG, || async {
        let again: Value = test::call_and_read_body_json(&app, get("/v1/profiles/p1".into())).await;
        assert_eq!(again, first);
        let s = engine.profile_cache_stats();
        s.l1_hits + s.l2_hits >= 1
    })
    .await;
    let stats: Value = test::call_and_read_body_json(&app, get("/v1/cache/stats".into())).await;
    assert!(
        stats["profiles"]["misses"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    assert!(
        stats["profiles"]["hit_rate"].as_f64().unwrap() > 0.0,
        "{stats}"
    );
    assert!(
        stats["applied_versions"]["mongo_lookups"]
            .as_u64()
            .is_some(),
        "{stats}"
    );

    // An immediate change is visible at once.
    let req = test::TestRequest::post()
        .uri("/v1/sync/immediate")
        .set_json(json!({ "user_id": "p1", "profile": { "vip": true, "level": 3 } }))
        .to_request();
    let receipt: Value = test::call_and_read_body_json(&app, req).await;
    assert_eq!(receipt["topic"], format!("{ns}-static"));
    assert!(receipt["offset"].as_i64().unwrap() >= 0);
    let now: Value = test::call_and_read_body_json(&app, get("/v1/profiles/p1".into())).await;
    assert_eq!(now["static_profile"]["vip"], true, "{now}");
    assert_eq!(now["static_version"], receipt["version"]);
    assert_eq!(now["dynamic_profile"]["gen"], 1);

    // A dynamic change not yet published shows from Redis, marked pending.
    let hold = engine.hold_publishing().await;
    engine.write_and_mark(&[profile("p1", 2)]).await.unwrap();
    let pending: Value = test::call_and_read_body_json(&app, get("/v1/profiles/p1".into())).await;
    assert_eq!(pending["dynamic_profile"]["gen"], 2, "{pending}");
    assert!(
        pending["pending"]
            .as_array()
            .unwrap()
            .contains(&json!("dynamic"))
    );
    drop(hold);

    let resp = test::call_service(&app, get("/v1/profiles/nobody".into())).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: Value = test::read_body_json(resp).await;
    assert!(body["error"].as_str().unwrap().contains("nobody"));
    for (body, needle) in [
        (
            json!({ "user_id": "p1", "profile": [1] }),
            "profile: must be a JSON object",
        ),
        (
            json!({ "user_id": "", "profile": {} }),
            "user_id: must not be empty",
        ),
        (json!({ "user_id": "p1" }), "missing field `profile`"),
    ] {
        let req = test::TestRequest::post()
            .uri("/v1/sync/immediate")
            .set_json(&body)
            .to_request();
        let resp = test::call_service(&app, req).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
        let err: Value = test::read_body_json(resp).await;
        assert!(err["error"].as_str().unwrap().contains(needle), "{err}");
    }
    let metrics = datasync::telemetry::prometheus().render();
    assert!(metrics.contains("datasync_profile_sync_success_total{type=\"static\"}"));
    finish(engine, &ns).await;
}
