//! The HTTP API, in process, against the real local stack.

mod common;

use actix_web::{App, http::StatusCode, test};
use common::*;
use mongodb::bson::doc;
use serde_json::{Value, json};
use std::time::Duration;

#[actix_web::test]
async fn the_api_marks_users_validates_input_and_reports() {
    let ns = unique("http");
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

    finish(engine, &ns).await;
}
