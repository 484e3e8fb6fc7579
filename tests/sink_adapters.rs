//! Sinks beside the built-in ones: the HTTP adapter against a real HTTP
//! server that refuses, throttles and fails items, and a sink written outside
//! the crate through the public trait.

mod common;

use common::*;
use datasync::{
    model::{Change, Op},
    sinks::{Outcome, Sink, SinkError, SinkSpec, SinkState},
};
use futures::future::BoxFuture;
use mongodb::bson::doc;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

const LONG: Duration = Duration::from_secs(180);

/// The target of the HTTP adapter: applies items newer-wins by user,
/// remembers every idempotency key it applied, and misbehaves on purpose by
/// user id: `flaky*` items fail once with 500, `slow*` items once with 429
/// and a retry_after, a batch holding `busy0` is refused whole with 429 and
/// `Retry-After: 1` the first time, and `bad` is refused with 400 forever.
#[derive(Default)]
struct Crm {
    /// user → version applied.
    users: HashMap<String, i64>,
    /// idempotency key → times it took effect.
    effects: HashMap<String, u32>,
    /// keys that already failed once on purpose.
    failed_once: std::collections::HashSet<String>,
    busy_refused: bool,
    requests: u32,
    tokens_seen: Vec<String>,
}

async fn crm(
    state: actix_web::web::Data<Mutex<Crm>>,
    req: actix_web::HttpRequest,
    body: actix_web::web::Json<serde_json::Value>,
) -> actix_web::HttpResponse {
    use actix_web::HttpResponse;
    let mut crm = state.lock().unwrap();
    crm.requests += 1;
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    crm.tokens_seen.push(token);
    let items = body["items"].as_array().cloned().unwrap_or_default();
    if !crm.busy_refused && items.iter().any(|i| i["user_id"] == "busy0") {
        crm.busy_refused = true;
        return HttpResponse::TooManyRequests()
            .insert_header(("Retry-After", "1"))
            .json(serde_json::json!({ "error": "slow down" }));
    }
    let mut results = Vec::new();
    for item in items {
        let user = item["user_id"].as_str().unwrap().to_string();
        let key = item["idempotency_key"].as_str().unwrap().to_string();
        let version = item["version"].as_i64().unwrap();
        let first_time = crm.failed_once.insert(key.clone());
        let answer = if user == "bad" {
            serde_json::json!({ "status": 400, "error": "phone number is not valid" })
        } else if user.starts_with("flaky") && first_time {
            serde_json::json!({ "status": 500, "error": "database hiccup" })
        } else if user.starts_with("slow") && first_time {
            serde_json::json!({ "status": 429, "error": "throttled", "retry_after": 0.5 })
        } else if crm.effects.contains_key(&key) {
            // Seen before: answered as done, without a second effect.
            serde_json::json!({ "status": 200 })
        } else if crm.users.get(&user).is_some_and(|&v| v >= version) {
            serde_json::json!({ "status": 409 })
        } else {
            crm.users.insert(user, version);
            *crm.effects.entry(key).or_default() += 1;
            serde_json::json!({ "status": 200 })
        };
        results.push(answer);
    }
    HttpResponse::Ok().json(serde_json::json!({ "results": results }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_adapter_retries_what_may_pass_and_dead_letters_what_never_will() {
    let ns = Namespace::new("httpsink");
    let state = actix_web::web::Data::new(Mutex::new(Crm::default()));
    let port = free_port();
    let server = {
        let state = state.clone();
        actix_web::HttpServer::new(move || {
            actix_web::App::new()
                .app_data(state.clone())
                .route("/sync", actix_web::web::post().to(crm))
        })
        .workers(1)
        .disable_signals()
        .bind(("127.0.0.1", port))
        .unwrap()
        .run()
    };
    let handle = server.handle();
    tokio::spawn(server);
    let extra = format!(
        r#"
[retry]
initial_delay = "100ms"
max_delay = "1s"
[[sinks]]
name = "mongodb"
kind = "mongodb"
[[sinks]]
name = "crm"
kind = "http"
url = "http://127.0.0.1:{port}/sync"
token = "crm-secret"
max_batch = 50
"#
    );
    let engine = start_with(config_with(&ns, &extra)).await;
    let mut users: Vec<String> = (0..200).map(|i| format!("ok{i}")).collect();
    users.extend((0..20).map(|i| format!("flaky{i}")));
    users.extend((0..20).map(|i| format!("slow{i}")));
    users.extend(["busy0".to_string(), "bad".to_string()]);
    let writes: Vec<_> = users.iter().map(|u| profile(u, 1)).collect();
    let mut expected = HashMap::new();
    for m in engine.write_and_mark(&writes).await.unwrap() {
        expected.insert(m.user_id, m.version);
    }
    wait_until("every good item applied by the CRM", LONG, || async {
        state.lock().unwrap().users.len() == users.len() - 1
    })
    .await;
    wait_until("the refused item dead-lettered", LONG, || async {
        engine
            .dlq_list(100)
            .await
            .is_ok_and(|l| l.entries.iter().any(|e| e.user_id == "bad"))
    })
    .await;
    {
        let crm = state.lock().unwrap();
        for u in users.iter().filter(|u| *u != "bad") {
            assert_eq!(crm.users.get(u), Some(&expected[u]), "{u}");
        }
        assert!(!crm.users.contains_key("bad"));
        // Exactly once in effect: every key applied once, whatever the
        // retries.
        assert_eq!(crm.effects.len(), users.len() - 1);
        assert!(crm.effects.values().all(|&n| n == 1), "{:?}", crm.effects);
        assert!(crm.busy_refused);
        assert!(
            crm.tokens_seen.iter().all(|t| t == "Bearer crm-secret"),
            "{:?}",
            crm.tokens_seen
        );
    }
    let letter = engine
        .dlq_list(100)
        .await
        .unwrap()
        .entries
        .into_iter()
        .find(|e| e.user_id == "bad")
        .unwrap();
    assert_eq!(letter.stage, "apply");
    assert_eq!(letter.sink.as_deref(), Some("crm"));
    assert_eq!(letter.version, expected["bad"]);
    assert!(letter.error.contains("400"), "{letter:?}");
    assert!(
        letter.error.contains("phone number is not valid"),
        "{letter:?}"
    );
    assert!(letter.detail.contains("sink crm"), "{letter:?}");
    assert!(
        letter.offset.is_some() && letter.partition.is_some(),
        "{letter:?}"
    );
    let crm_report = engine
        .sinks()
        .into_iter()
        .find(|s| s.name == "crm")
        .unwrap();
    assert_eq!(crm_report.dead_lettered, 1, "{crm_report:?}");
    assert!(crm_report.retried >= 40, "{crm_report:?}");
    assert_eq!(
        crm_report.applied,
        (users.len() - 1) as u64,
        "{crm_report:?}"
    );
    // MongoDB took every user, the one the CRM refused included.
    let mongo = mongo(&ns).await;
    assert_eq!(count_docs(&mongo, doc! {}).await, users.len() as u64);
    finish(engine, &ns).await;
    handle.stop(false).await;
}

/// A sink of the host application's own: a map behind a lock, newer-wins
/// per section, written only through the public trait.
#[derive(Default)]
struct MemorySink {
    /// user → (static version, dynamic version, deleted)
    rows: Mutex<HashMap<String, (i64, i64, bool)>>,
    windows: Mutex<u32>,
}

impl Sink for MemorySink {
    fn kind(&self) -> &str {
        "memory"
    }

    fn prepare(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    fn apply<'a>(&'a self, window: &'a [Change]) -> BoxFuture<'a, Result<Vec<Outcome>, SinkError>> {
        Box::pin(async move {
            *self.windows.lock().unwrap() += 1;
            let mut rows = self.rows.lock().unwrap();
            Ok(window
                .iter()
                .map(|c| {
                    let row = rows.entry(c.user_id.clone()).or_default();
                    match (&c.op, c.section) {
                        (Op::Set(_), datasync::model::Section::Dynamic) if row.1 < c.version => {
                            row.1 = c.version;
                            row.2 = false;
                            Outcome::Applied
                        }
                        (Op::Set(_), datasync::model::Section::Static) if row.0 < c.version => {
                            row.0 = c.version;
                            row.2 = false;
                            Outcome::Applied
                        }
                        (Op::Delete, _) if row.0 < c.version || row.1 < c.version => {
                            *row = (row.0.max(c.version), row.1.max(c.version), true);
                            Outcome::Applied
                        }
                        _ => Outcome::Stale,
                    }
                })
                .collect())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_written_outside_the_crate_works_end_to_end() {
    let ns = Namespace::new("ownsink");
    let sink = Arc::new(MemorySink::default());
    let spec = SinkSpec::new("memory", sink.clone());
    let mut config = test_config(&ns);
    config.startup.backends_timeout = Duration::from_secs(60);
    let engine = datasync::Engine::start_with_sinks(config, vec![spec])
        .await
        .unwrap();
    assert!(engine.wait_for_backends(Duration::from_secs(120)).await);
    let writes: Vec<_> = (0..500).map(|i| profile(&format!("m{i}"), 1)).collect();
    let marked = engine.write_and_mark(&writes).await.unwrap();
    let immediate = engine
        .sync_immediate("m0", serde_json::json!({ "vip": true }))
        .await
        .unwrap();
    wait_until("every change in the host's sink", LONG, || async {
        let rows = sink.rows.lock().unwrap();
        rows.len() == 500 && rows.get("m0").is_some_and(|r| r.0 > 0)
    })
    .await;
    {
        let rows = sink.rows.lock().unwrap();
        for m in &marked {
            assert_eq!(rows[&m.user_id].1, m.version, "{}", m.user_id);
        }
        assert_eq!(rows["m0"].0, immediate.version);
    }
    let report = engine.sinks();
    let own = report.iter().find(|s| s.name == "memory").unwrap();
    assert_eq!(own.kind, "memory");
    assert!(!own.primary, "the configured MongoDB sink stays primary");
    assert_eq!(own.consumer_group, format!("{ns}-applier-memory"));
    assert_eq!(own.applied, 501, "{own:?}");
    assert_eq!(own.state, SinkState::Running);
    // The primary (MongoDB) has them too.
    let mongo = mongo(&ns).await;
    wait_until("MongoDB has them too", LONG, || async {
        count_docs(&mongo, doc! {}).await == 500
    })
    .await;
    finish(engine, &ns).await;
}
