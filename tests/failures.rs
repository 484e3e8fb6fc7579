//! Failures against the real local stack: poison data, dead letters and their
//! redrive, panicking actors, graceful shutdown under a stuck stage, and the
//! alert rules' metrics.

mod common;

use common::*;
use datasync::{
    actors::dlq::RedriveTarget,
    faults::Stage,
    proto::{DlqMessage, UserProfileSyncEvent},
};
use mongodb::bson::doc;
use prost::Message;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_poison_profile_among_a_thousand_goes_to_the_dlq_and_redrives() {
    let ns = Namespace::new("poison");
    let engine = start(&ns).await;
    let r = redis(&ns).await;
    let users: Vec<_> = (0..1000)
        .filter(|&i| i != 500)
        .map(|i| profile(&format!("p{i}"), 1))
        .collect();
    engine.write_and_mark(&users).await.unwrap();
    // The upstream wrote garbage for one user, then flagged it (one version).
    let key = r.keys().profile("p500");
    let _: () = fred::interfaces::KeysInterface::set(
        &raw_redis().await,
        &key,
        "{not json",
        None,
        None,
        false,
    )
    .await
    .unwrap();
    engine.mark_dirty(&["p500".to_string()]).await.unwrap();

    let mongo = mongo(&ns).await;
    wait_until("999 documents in MongoDB", LONG, || async {
        count_docs(&mongo, doc! {}).await == 999
    })
    .await;
    wait_until("one open dead letter", LONG, || async {
        engine.dlq_list(10).await.unwrap().open == 1
    })
    .await;
    let listing = engine.dlq_list(10).await.unwrap();
    let e = &listing.entries[0];
    assert_eq!(e.user_id, "p500");
    assert_eq!(e.stage, "load");
    assert!(
        e.error.contains(&key) && e.error.contains("not valid JSON"),
        "{e:?}"
    );
    assert_eq!(e.instance_id, *ns);
    assert_eq!(e.topic, format!("{ns}-dynamic"));
    assert!(e.failed_at_ms > 0 && e.version > 0);
    // The flag stays; further cycles do not record the same version again.
    assert_eq!(pending_flags(&r).await, 1);
    let before = engine.stats().dlq_records;
    engine.scan_now().await.unwrap();
    engine.scan_now().await.unwrap();
    assert_eq!(engine.stats().dlq_records, before);
    assert_eq!(before, 1);

    // The record on the DLQ topic carries the full error context.
    let records = read_topic(
        &kafka_brokers(),
        &format!("{ns}-dlq"),
        2,
        "the dead letter of p500",
        LONG,
        |got| !got.is_empty(),
    )
    .await;
    let m = DlqMessage::decode(records[0].as_slice()).unwrap();
    assert_eq!(m.user_id, "p500");
    let ctx = m.error_context.unwrap();
    assert!(ctx.error_message.contains("not valid JSON"));
    assert!(
        ctx.stack_trace.contains("stage load"),
        "{}",
        ctx.stack_trace
    );
    assert_eq!(ctx.retry_count, 0);
    assert_eq!(ctx.instance_id, *ns);
    assert_eq!(ctx.kafka_topic, format!("{ns}-dynamic"));
    assert!(ctx.failure_timestamp > 0);
    let ev = UserProfileSyncEvent::decode(m.original_event.as_slice()).unwrap();
    assert_eq!((ev.user_id.as_str(), ev.version), ("p500", e.version));

    // Fixed upstream (its flag is still the dead-lettered version), then
    // redriven: the redrive's new version is the one that syncs.
    r.write_profiles(&[("p500".into(), profile("p500", 2).profile.to_string())])
        .await
        .unwrap();
    let r2 = engine
        .dlq_redrive(
            RedriveTarget::Users(vec!["p500".into(), "nobody".into()]),
            "test",
        )
        .await
        .unwrap();
    assert_eq!(r2.redriven.len(), 1);
    assert!(r2.redriven[0].1 > e.version, "{r2:?}");
    assert_eq!(r2.not_open, vec!["nobody".to_string()]);
    wait_until("p500 synced at the redriven version", LONG, || async {
        version_of(&mongo, "p500", datasync::model::Section::Dynamic).await == r2.redriven[0].1
    })
    .await;
    wait_until("no open dead letter", LONG, || async {
        engine.dlq_list(10).await.unwrap().open == 0
    })
    .await;
    let d = mongo.find_user("p500").await.unwrap().unwrap();
    assert_eq!(
        d.get_document("dynamicProfile")
            .unwrap()
            .get_i64("gen")
            .unwrap(),
        2
    );
    finish(engine, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_event_is_dead_lettered_and_consumption_continues() {
    let ns = Namespace::new("undecodable");
    let engine = start(&ns).await;
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .unwrap();
    let garbage = vec![0xff, 0x00, 0x13, 0x37];
    datasync::clients::kafka::send(&producer, &format!("{ns}-dynamic"), "x", &garbage)
        .await
        .unwrap();
    let users: Vec<_> = (0..200).map(|i| profile(&format!("d{i}"), 1)).collect();
    engine.write_and_mark(&users).await.unwrap();
    let mongo = mongo(&ns).await;
    wait_until("200 documents", LONG, || async {
        count_docs(&mongo, doc! {}).await == 200
    })
    .await;
    wait_until("the poison record counted", LONG, || async {
        engine.stats().dlq_records == 1
    })
    .await;
    assert_eq!(engine.stats().poison_events, 1);
    let records = read_topic(
        &kafka_brokers(),
        &format!("{ns}-dlq"),
        2,
        "the poison record",
        LONG,
        |got| !got.is_empty(),
    )
    .await;
    let m = DlqMessage::decode(records[0].as_slice()).unwrap();
    assert_eq!(m.original_event, garbage);
    let ctx = m.error_context.unwrap();
    assert!(
        ctx.stack_trace.contains("partition") && ctx.stack_trace.contains("offset 0"),
        "{}",
        ctx.stack_trace
    );
    assert_eq!(ctx.kafka_topic, format!("{ns}-dynamic"));
    finish(engine, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_actors_are_restarted_and_their_batches_are_not_lost() {
    let ns = Namespace::new("panic");
    let mut config = test_config(&ns);
    config.sync.interval = Duration::from_secs(3600);
    let engine = start_with(config).await;
    // The scheduled first cycle runs at start; one on-demand cycle waits for it
    // to end, so the faults below hit the cycle this test runs.
    engine.scan_now().await.unwrap();
    let users: Vec<_> = (0..300).map(|i| profile(&format!("k{i}"), 1)).collect();
    engine.write_and_mark(&users).await.unwrap();

    engine.faults().panic_next(Stage::Loader, 1);
    engine.faults().panic_next(Stage::Publisher, 1);
    engine.faults().panic_next(Stage::Applier, 1);
    // The first cycle loses pages to the panics; the flags stay.
    let first = engine.scan_now().await.unwrap();
    assert!(first.page_errors >= 1, "{first:?}");
    let r = redis(&ns).await;
    assert!(pending_flags(&r).await > 0);
    // Later cycles (the actors restarted after their pause) publish the rest.
    let mongo = mongo(&ns).await;
    wait_until("all 300 documents after the restarts", LONG, || async {
        let _ = engine.scan_now().await;
        count_docs(&mongo, doc! {}).await == 300
    })
    .await;
    assert_eq!(engine.stats().actor_restarts, 3, "{:?}", engine.stats());
    assert_eq!(pending_flags(&r).await, 0);
    let metrics = datasync::telemetry::prometheus().render();
    for actor in ["ProfileLoader", "KafkaPublisher", "MongoApplier"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("datasync_actor_restarts_total")
                    && l.contains(actor)
                    && !l.ends_with(" 0")),
            "no restart counted for {actor}"
        );
    }
    finish(engine, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_within_its_limit_even_with_a_stuck_stage() {
    let ns = Namespace::new("stuck");
    let engine = start(&ns).await;
    let hold = engine.hold_publishing().await;
    engine.write_and_mark(&[profile("s1", 1)]).await.unwrap();
    wait_until("a batch stuck at the publisher", LONG, || async {
        engine.stats().publish_held >= 1
    })
    .await;
    let limit = Duration::from_secs(2);
    let t = Instant::now();
    engine.shutdown(limit).await;
    let took = t.elapsed();
    // The limit plus the actor threads' own exit; far below the stuck batch.
    assert!(
        took < limit + Duration::from_secs(8),
        "shutdown took {took:?}"
    );
    drop(hold);
    // Nothing was lost: the flag is still there for the next start.
    let r = redis(&ns).await;
    assert_eq!(pending_flags(&r).await, 1);
    cleanup(&ns).await;
}

/// The scan loop and the consumer loops are supervised tasks: a panic in the
/// scan loop (a page loaded, not yet published) and one in the dynamic
/// consumer loop (a window gathered, not yet written) are each logged,
/// counted and the task restarted; the page and the window are not lost, and
/// readiness is back to ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_loop_or_consumer_loop_that_panics_is_restarted_and_loses_nothing() {
    let ns = Namespace::new("tasks");
    let engine = start(&ns).await;
    engine.faults().panic_next(Stage::Scanner, 1);
    engine.faults().panic_next(Stage::ConsumerLoop, 1);
    let users: Vec<_> = (0..100).map(|i| profile(&format!("t{i}"), 1)).collect();
    engine.write_and_mark(&users).await.unwrap();
    let mongo = mongo(&ns).await;
    wait_until("all 100 applied after the restarts", LONG, || async {
        count_docs(&mongo, doc! {}).await == 100
    })
    .await;
    let text = datasync::telemetry::prometheus().render();
    for task in ["scan loop", "dynamic consumer loop"] {
        assert!(
            metric_sum(
                &text,
                "datasync_actor_restarts_total",
                &[&format!("actor=\"{task}\"")]
            ) >= 1.0,
            "no restart counted for {task}"
        );
    }
    assert!(engine.stats().actor_restarts >= 2, "{:?}", engine.stats());
    wait_until("readiness back to ready", LONG, || async {
        engine.readiness().await.status == "ready"
    })
    .await;
    assert_eq!(pending_flags(&redis(&ns).await).await, 0);
    finish(engine, &ns).await;
}

/// Every metric the alert rules use exists in `/metrics` of a running engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_name_only_metrics_that_exist() {
    let ns = Namespace::new("alerts");
    let engine = start(&ns).await;
    let moving = [
        ("datasync_flags_marked_total", &[][..]),
        ("datasync_flags_scanned_total", &[]),
        ("datasync_events_published_total", &["type=\"dynamic\""]),
        ("datasync_events_applied_total", &["section=\"dynamic\""]),
        ("datasync_profile_sync_success_total", &["type=\"dynamic\""]),
        ("datasync_flags_cleared_total", &[]),
        ("datasync_scan_cycles_total", &[]),
        (
            "datasync_flag_to_applied_seconds_count",
            &["type=\"dynamic\""],
        ),
    ];
    let render = || datasync::telemetry::prometheus().render();
    let before: Vec<f64> = moving
        .iter()
        .map(|(n, l)| metric_sum(&render(), n, l))
        .collect();
    engine.write_and_mark(&[profile("a1", 1)]).await.unwrap();
    let mongo = mongo(&ns).await;
    wait_until("one document", LONG, || async {
        count_docs(&mongo, doc! {}).await == 1
    })
    .await;
    wait_until("the flag cleared", LONG, || async {
        pending_flags(&redis(&ns).await).await == 0
    })
    .await;
    // Pre-registered at zero, so a name check alone cannot fail: the values
    // must have moved with this one change.
    let text = render();
    for ((name, labels), before) in moving.iter().zip(before) {
        let now = metric_sum(&text, name, labels);
        assert!(now > before, "{name}{labels:?} stayed at {before}");
    }
    let rules =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/alerts.yml")).unwrap();
    let exported = exported_metrics();
    let mut named = std::collections::BTreeSet::new();
    for expr in rules.lines().filter_map(|l| l.trim().strip_prefix("expr:")) {
        named.extend(metric_names(expr));
    }
    assert!(named.len() >= 5, "{named:?}");
    // The lag gauge is exported once the backlog sampler has read the
    // broker's watermarks; security.rs checks it on librdkafka's mock cluster.
    named.remove("datasync_consumer_lag");
    for name in &named {
        assert!(
            exported.contains(name),
            "alert rule uses `{name}`, which /metrics does not export"
        );
    }
    finish(engine, &ns).await;
}
