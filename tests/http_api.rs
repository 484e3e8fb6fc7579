//! The HTTP API, in process, against the real local stack.

mod common;

use actix_web::{App, http::StatusCode, test};
use common::*;
use mongodb::bson::doc;
use serde_json::{Value, json};
use std::time::Duration;

#[actix_web::test]
async fn the_api_marks_users_validates_input_and_reports() {
    let ns = Namespace::new("http");
    let engine = start(&ns).await;
    let app =
        test::init_service(App::new().configure(datasync::http::configure(engine.clone()))).await;

    // Users with profiles: written, flagged, synced.
    let body = json!({ "users": [
        { "user_id": "h1", "profile": { "name": "Ann", "vip": true } },
        { "user_id": "h2", "profile": { "name": "Bo" } },
    ]});
    let req = test::TestRequest::post()
        .uri("/v1/sync/dirty")
        .set_json(&body)
        .to_request();
    let resp: Value = test::call_and_read_body_json(&app, req).await;
    assert_eq!(resp["marked"], 2);
    assert!(resp["versions"][0]["version"].as_i64().unwrap() > 0);
    let mongo = mongo(&ns).await;
    wait_until("both users in MongoDB", Duration::from_secs(60), || async {
        count_docs(&mongo, doc! {}).await == 2
    })
    .await;

    // Ids only (profile already in Redis).
    let req = test::TestRequest::post()
        .uri("/v1/sync/dirty")
        .set_json(json!({ "user_ids": ["h1"] }))
        .to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), StatusCode::OK);

    for (body, status, needle) in [
        (
            json!({ "user_ids": ["ok", ""] }),
            400,
            "user_ids[1]: must not be empty",
        ),
        (
            json!({ "user_ids": [] }),
            400,
            "user_ids: must not be empty",
        ),
        (
            json!({ "user_ids": ["a"], "users": [] }),
            400,
            "exactly one of",
        ),
        (json!({ "userids": ["a"] }), 400, "unknown field `userids`"),
        (
            json!({ "users": [{ "user_id": "x", "profile": 3 }] }),
            400,
            "users[0].profile: must be a JSON object",
        ),
    ] {
        let req = test::TestRequest::post()
            .uri("/v1/sync/dirty")
            .set_json(&body)
            .to_request();
        let resp = test::call_service(&app, req).await;
        assert_eq!(resp.status().as_u16(), status, "{body}");
        let err: Value = test::read_body_json(resp).await;
        assert!(
            err["error"].as_str().unwrap().contains(needle),
            "{err} should name {needle}"
        );
    }

    // A 10 MB body is refused before it is parsed.
    let big = format!("{{\"user_ids\": [\"{}\"]}}", "x".repeat(10 * 1024 * 1024));
    let req = test::TestRequest::post()
        .uri("/v1/sync/dirty")
        .insert_header(("content-type", "application/json"))
        .set_payload(big)
        .to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let err: Value = test::read_body_json(resp).await;
    assert!(err["error"].as_str().unwrap().contains("limit"), "{err}");

    // Malformed JSON names the problem.
    let req = test::TestRequest::post()
        .uri("/v1/sync/dirty")
        .insert_header(("content-type", "application/json"))
        .set_payload("{\"user_ids\": [")
        .to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    let req = test::TestRequest::get().uri("/health/live").to_request();
    assert_eq!(test::call_service(&app, req).await.status(), StatusCode::OK);
    let req = test::TestRequest::get().uri("/health/ready").to_request();
    assert_eq!(test::call_service(&app, req).await.status(), StatusCode::OK);
    let req = test::TestRequest::get().uri("/nope").to_request();
    assert_eq!(
        test::call_service(&app, req).await.status(),
        StatusCode::NOT_FOUND
    );

    let req = test::TestRequest::get().uri("/metrics").to_request();
    let text = String::from_utf8(test::call_and_read_body(&app, req).await.to_vec()).unwrap();
    for name in [
        "datasync_flags_scanned_total",
        "datasync_events_published_total",
        "datasync_events_applied_total",
        "datasync_stale_events_skipped_total",
        "datasync_publish_failures_total",
        "datasync_flag_to_applied_seconds_bucket",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
    // Counters registered at zero must also have moved with the work above.
    for (name, labels) in [
        ("datasync_flags_marked_total", &[][..]),
        ("datasync_flags_scanned_total", &[]),
        ("datasync_events_published_total", &["type=\"dynamic\""]),
        ("datasync_events_applied_total", &["section=\"dynamic\""]),
        ("datasync_flags_cleared_total", &[]),
        (
            "datasync_flag_to_applied_seconds_count",
            &["type=\"dynamic\""],
        ),
    ] {
        assert!(
            metric_sum(&text, name, labels) > 0.0,
            "{name}{labels:?} did not move:\n{text}"
        );
    }

    finish(engine, &ns).await;
}

#[actix_web::test]
async fn dead_letters_are_listed_and_redriven_with_the_admin_token() {
    let ns = Namespace::new("httpdlq");
    let mut config = test_config(&ns);
    config.http.admin_token = datasync::config::Secret::new("s3cret");
    // Cycles run only when the test asks, so the redrive is what syncs ghost.
    config.sync.interval = Duration::from_secs(3600);
    let engine = start_with(config).await;
    let app =
        test::init_service(App::new().configure(datasync::http::configure(engine.clone()))).await;
    let r = redis(&ns).await;
    // A user whose profile key does not exist: a permanent load failure.
    engine.mark_dirty(&["ghost".to_string()]).await.unwrap();
    wait_until(
        "the dead letter of ghost",
        Duration::from_secs(60),
        || async {
            engine.scan_now().await.unwrap();
            engine.dlq_list(10).await.unwrap().open == 1
        },
    )
    .await;

    let get = |auth: Option<&str>, uri: &str| {
        let mut req = test::TestRequest::get().uri(uri);
        if let Some(a) = auth {
            req = req.insert_header(("Authorization", a.to_string()));
        }
        req.to_request()
    };
    let resp = test::call_service(&app, get(None, "/v1/dlq")).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = test::call_service(&app, get(Some("Bearer nope"), "/v1/dlq")).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: Value = test::read_body_json(resp).await;
    assert!(body["error"].as_str().unwrap().contains("bearer token"));
    let resp = test::call_service(&app, get(Some("Bearer s3cret"), "/v1/dlq?limit=0")).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = test::call_service(&app, get(Some("Bearer s3cret"), "/v1/dlq?limit=x")).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = test::read_body_json(resp).await;
    assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");

    let list: Value =
        test::call_and_read_body_json(&app, get(Some("Bearer s3cret"), "/v1/dlq")).await;
    assert_eq!(list["open"], 1);
    let entry = &list["entries"][0];
    assert_eq!(entry["user_id"], "ghost");
    assert_eq!(entry["stage"], "load");
    assert!(
        entry["error"].as_str().unwrap().contains("does not exist"),
        "{entry}"
    );

    let post = |body: Value| {
        test::TestRequest::post()
            .uri("/v1/dlq/redrive")
            .insert_header(("Authorization", "Bearer s3cret"))
            .set_json(body)
            .to_request()
    };
    for bad in [
        json!({}),
        json!({ "all": true, "user_ids": ["a"] }),
        json!({ "users": ["a"] }),
    ] {
        let resp = test::call_service(&app, post(bad.clone())).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    // The upstream writes the profile (without flagging it again); the
    // redrive re-flags the user with a new version, and that version syncs.
    let dead_version = entry["version"].as_i64().unwrap();
    r.write_profiles(&generation_profiles(&["ghost".into()], 1))
        .await
        .unwrap();
    let resp: Value = test::call_and_read_body_json(&app, post(json!({ "all": true }))).await;
    assert_eq!(resp["redriven"].as_u64(), Some(1), "{resp}");
    let flagged = r.flag_of("ghost").await.unwrap().unwrap();
    assert!(flagged > dead_version, "the redrive re-flagged ghost");
    let mongo = mongo(&ns).await;
    wait_until("ghost synced", Duration::from_secs(60), || async {
        engine.scan_now().await.unwrap();
        version_of(&mongo, "ghost", datasync::model::Section::Dynamic).await == flagged
    })
    .await;
    wait_until("the entry closed", Duration::from_secs(60), || async {
        engine.dlq_list(10).await.unwrap().open == 0
    })
    .await;
    assert_eq!(pending_flags(&r).await, 0);

    // Readiness: everything up.
    let ready: Value = test::call_and_read_body_json(&app, get(None, "/health/ready")).await;
    assert_eq!(ready["status"], "ready");
    finish(engine, &ns).await;
}

#[actix_web::test]
async fn without_tokens_only_loopback_clients_may_call() {
    let ns = Namespace::new("httpnotoken");
    let engine = start(&ns).await;
    let app =
        test::init_service(App::new().configure(datasync::http::configure(engine.clone()))).await;
    let from = |ip: &str| {
        test::TestRequest::get()
            .uri("/v1/dlq")
            .peer_addr(format!("{ip}:40000").parse().unwrap())
            .to_request()
    };
    let resp = test::call_service(&app, from("10.1.2.3")).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body: Value = test::read_body_json(resp).await;
    assert!(
        body["error"].as_str().unwrap().contains("http.tokens"),
        "{body}"
    );
    let resp = test::call_service(&app, from("127.0.0.1")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Health and metrics stay open to everyone.
    let req = test::TestRequest::get()
        .uri("/health/live")
        .peer_addr("10.1.2.3:40000".parse().unwrap())
        .to_request();
    assert_eq!(test::call_service(&app, req).await.status(), StatusCode::OK);
    finish(engine, &ns).await;
}
