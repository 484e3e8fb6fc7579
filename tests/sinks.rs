//! Several sinks at once (DESIGN §9): MongoDB and PostgreSQL applying the
//! same changes, each in its own consumer group; PostgreSQL away for 30 s
//! while MongoDB goes on; the HTTP adapter against a real HTTP server that
//! refuses, throttles and fails items; and a sink written outside the crate
//! through the public trait.

mod common;

use common::*;
use datasync::{
    model::{Change, Op},
    proto::SyncType,
    sinks::{Outcome, Sink, SinkError, SinkSpec, SinkState},
};
use futures::{TryStreamExt, future::BoxFuture};
use mongodb::bson::doc;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

const LONG: Duration = Duration::from_secs(180);

/// `[[sinks]]`: MongoDB (primary) and PostgreSQL at `pg_url`.
fn two_sinks(ns: &str, pg_url: &str) -> String {
    format!(
        r#"
[[sinks]]
name = "mongodb"
kind = "mongodb"
[[sinks]]
name = "pg"
kind = "postgres"
url = "{pg_url}"
table = "{table}"
timeout = "5s"
"#,
        table = pg_table(ns)
    )
}

/// The applied and stale counts of the sink `name`.
fn counts(engine: &datasync::Engine, name: &str) -> (u64, u64) {
    engine
        .sinks()
        .into_iter()
        .find(|s| s.name == name)
        .map(|s| (s.applied, s.stale))
        .unwrap_or_default()
}

async fn drop_table(url: &str, ns: &str) {
    let c = pg_client(url).await;
    let _ = c
        .batch_execute(&format!("DROP TABLE IF EXISTS \"{}\"", pg_table(ns)))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_and_postgres_end_identical_to_redis() {
    let ns = Namespace::new("twosinks");
    let url = postgres_url();
    let extra = format!(
        "{}\n[telemetry]\nbacklog_interval = \"200ms\"\n",
        two_sinks(&ns, &url)
    );
    let engine = start_with(config_with(&ns, &extra)).await;
    let pg = pg_client(&url).await;
    let n = 2000;
    let mut expected = HashMap::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let users: Vec<_> = chunk.iter().map(|i| profile(&format!("u{i}"), 1)).collect();
        for m in engine.write_and_mark(&users).await.unwrap() {
            expected.insert(m.user_id, m.version);
        }
    }
    // A tenth deleted, after their first version is everywhere.
    let mongo = mongo(&ns).await;
    let table = pg_table(&ns);
    wait_until("every user in both sinks", LONG, || async {
        count_docs(&mongo, doc! {}).await == n as u64 && pg_count(&pg, &table).await == n as i64
    })
    .await;
    let gone: Vec<String> = (0..n).step_by(10).map(|i| format!("u{i}")).collect();
    let mut deleted = HashMap::new();
    for m in engine.delete(&gone).await.unwrap() {
        deleted.insert(m.user_id, m.version);
    }
    wait_until("the deletes in both sinks", LONG, || async {
        count_docs(&mongo, doc! { "deleted": true }).await == gone.len() as u64
            && pg_rows(&pg, &table).await.values().filter(|r| r.3).count() == gone.len()
    })
    .await;

    let rows = pg_rows(&pg, &table).await;
    assert_eq!(rows.len(), n);
    let mut cursor = mongo.collection().find(doc! {}).await.unwrap();
    let mut seen = 0;
    while let Some(d) = cursor.try_next().await.unwrap() {
        let user = d.get_str("userId").unwrap().to_string();
        let (sv, dv, data, is_deleted, profile) = rows[&user].clone();
        let int = |f: &str| d.get_i64(f).unwrap_or(0);
        assert_eq!(
            int("dataVersion"),
            data,
            "{user}: dataVersion equal in both"
        );
        assert_eq!(int("staticVersion"), sv, "{user}");
        assert_eq!(int("dynamicVersion"), dv, "{user}");
        assert_eq!(d.get_bool("deleted").unwrap_or(false), is_deleted, "{user}");
        match deleted.get(&user) {
            Some(&v) => {
                assert!(is_deleted, "{user}");
                assert_eq!((dv, sv, data), (v, v, 2), "{user}");
                assert!(profile.is_none(), "{user}: {profile:?}");
            }
            None => {
                assert_eq!(dv, expected[&user], "{user}");
                assert_eq!(data, 1, "{user}");
                let p = profile.expect("a dynamic profile");
                assert_eq!(p["name"], format!("user {user}"));
                assert_eq!(p["gen"], 1);
                assert_eq!(p["tags"], serde_json::json!(["a", "b"]));
            }
        }
        seen += 1;
    }
    assert_eq!(seen, n);
    // Each sink in its own group, both running, both counted.
    let sinks = engine.sinks();
    assert_eq!(sinks.len(), 2, "{sinks:?}");
    for s in &sinks {
        assert_eq!(s.state, SinkState::Running, "{s:?}");
        assert_eq!(s.applied, (n + gone.len()) as u64, "{s:?}");
    }
    assert!(sinks[0].primary && !sinks[1].primary);
    assert_eq!(sinks[0].consumer_group, format!("{ns}-applier"));
    assert_eq!(sinks[1].consumer_group, format!("{ns}-applier-pg"));

    // `datasync sinks` reads the groups' lag from the broker and this
    // instance's reports from Redis.
    wait_until("both sinks' lag sampled", LONG, || async {
        engine.sinks().iter().all(|s| s.lag == Some(0))
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("datasync.toml");
    std::fs::write(&file, format!("{}\n{extra}", config_toml(&ns))).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_datasync"))
        .args(["sinks", "--json", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for (row, name) in listed.iter().zip(["mongodb", "pg"]) {
        assert_eq!(row["name"], name, "{row}");
        assert_eq!(row["lag"], 0, "{row}");
        let instances = row["instances"].as_array().unwrap();
        assert_eq!(instances.len(), 1, "{row}");
        assert_eq!(instances[0]["instance"], ns.to_string(), "{row}");
        assert_eq!(instances[0]["state"], "running", "{row}");
        assert_eq!(instances[0]["applied"], (n + gone.len()) as u64, "{row}");
    }
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("secret"),
        "no secret printed"
    );
    finish(engine, &ns).await;
    drop_table(&url, &ns).await;
}

/// The same newer-wins steps as the MongoDB-only test, each its own window
/// in both sinks, with both checked after every step: older and duplicate
/// events never regress either, the sections never clobber each other, and
/// the two agree on every version and on dataVersion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_and_duplicate_events_regress_neither_sink() {
    let ns = Namespace::new("sinkorder");
    let url = postgres_url();
    let engine = start_with(config_with(&ns, &two_sinks(&ns, &url))).await;
    let (mongo, pg, table) = (mongo(&ns).await, pg_client(&url).await, pg_table(&ns));
    let (d, s, del) = (
        SyncType::DynamicBatch,
        SyncType::StaticImmediate,
        SyncType::UserDelete,
    );
    // (topic, type, version, expected after: dynamic, static, data, deleted)
    let steps: [(&str, SyncType, i64, (i64, i64, i64, bool)); 11] = [
        ("dynamic", d, 3, (3, 0, 1, false)),
        ("dynamic", d, 1, (3, 0, 1, false)),
        ("dynamic", d, 2, (3, 0, 1, false)),
        ("dynamic", d, 3, (3, 0, 1, false)),
        ("dynamic", d, 5, (5, 0, 2, false)),
        ("dynamic", d, 4, (5, 0, 2, false)),
        ("static", s, 2, (5, 2, 3, false)),
        ("static", s, 1, (5, 2, 3, false)),
        // A delete older than the dynamic section removes only the static
        // one: the user stays.
        ("dynamic", del, 4, (5, 4, 4, false)),
        ("dynamic", del, 7, (7, 7, 5, true)),
        ("dynamic", d, 6, (7, 7, 5, true)),
    ];
    for (i, (topic, t, version, (dv, sv, data, gone))) in steps.into_iter().enumerate() {
        produce(&ns, topic, vec![event("x", version, t)], "x").await;
        wait_until(
            &format!("step {i} consumed by both sinks"),
            LONG,
            || async {
                let done = |(a, st): (u64, u64)| a + st == i as u64 + 1;
                done(counts(&engine, "mongodb")) && done(counts(&engine, "pg"))
            },
        )
        .await;
        let doc = mongo.find_user("x").await.unwrap().unwrap();
        let int = |f: &str| doc.get_i64(f).unwrap_or(0);
        let in_mongo = (
            int("dynamicVersion"),
            int("staticVersion"),
            int("dataVersion"),
            doc.get_bool("deleted").unwrap_or(false),
        );
        assert_eq!(
            in_mongo,
            (dv, sv, data, gone),
            "mongodb after step {i}: {doc}"
        );
        let row = pg_rows(&pg, &table).await.remove("x").unwrap();
        assert_eq!(
            (row.1, row.0, row.2, row.3),
            (dv, sv, data, gone),
            "postgres after step {i}: {row:?}"
        );
        let pg_v = row.4.as_ref().and_then(|p| p["v"].as_i64());
        let mongo_v = doc
            .get_document("dynamicProfile")
            .ok()
            .and_then(|p| p.get_i64("v").ok());
        assert_eq!(pg_v, mongo_v, "step {i}: the dynamic profiles agree");
    }
    for name in ["mongodb", "pg"] {
        assert_eq!(counts(&engine, name), (5, 6), "{name}");
    }
    finish(engine, &ns).await;
    drop_table(&url, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_away_for_30_seconds_holds_back_neither_mongodb_nor_anything_it_missed() {
    let ns = Namespace::new("pgaway");
    let server = PgServer::start();
    let engine = start_with(config_with(&ns, &two_sinks(&ns, &server.url()))).await;
    let (mongo, table) = (mongo(&ns).await, pg_table(&ns));
    // A first round reaches both, so the table exists and both run.
    let first: Vec<_> = (0..500).map(|i| profile(&format!("u{i}"), 1)).collect();
    engine.write_and_mark(&first).await.unwrap();
    {
        let pg = pg_client(&server.url()).await;
        wait_until("the first round in both sinks", LONG, || async {
            pg_count(&pg, &table).await == 500 && count_docs(&mongo, doc! {}).await == 500
        })
        .await;
    }

    server.stop();
    let stopped = Instant::now();
    // Generation 2 of everyone and 4,500 new users, while PostgreSQL is away.
    let n = 5000;
    let mut expected = HashMap::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let users: Vec<_> = chunk.iter().map(|i| profile(&format!("u{i}"), 2)).collect();
        for m in engine.write_and_mark(&users).await.unwrap() {
            expected.insert(m.user_id, m.version);
        }
    }
    wait_until(
        "all of generation 2 in MongoDB with PostgreSQL away",
        LONG,
        || async { count_docs(&mongo, doc! { "dynamicProfile.gen": 2 }).await == n as u64 },
    )
    .await;
    let pg_report = engine.sinks().into_iter().find(|s| s.name == "pg").unwrap();
    assert_eq!(pg_report.state, SinkState::Down, "{pg_report:?}");
    assert!(
        pg_report
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("postgres")),
        "{pg_report:?}"
    );
    let ready = engine.readiness().await;
    assert_eq!(ready.status, "degraded", "{ready:?}");
    assert!(
        ready
            .reasons
            .iter()
            .any(|r| r.starts_with("sink pg (postgres)")),
        "{ready:?}"
    );
    // MongoDB took everything while PostgreSQL was still away: nothing of
    // it waited for the other sink. The outage lasts its 30 s.
    wait_until("30 s of PostgreSQL away", LONG, || async {
        stopped.elapsed() >= Duration::from_secs(30)
    })
    .await;
    server.resume();

    let pg = pg_client(&server.url()).await;
    wait_until("PostgreSQL caught up", LONG, || async {
        let rows = pg_rows(&pg, &table).await;
        rows.len() == n && rows.iter().all(|(u, r)| r.1 == expected[u])
    })
    .await;
    let rows = pg_rows(&pg, &table).await;
    for (u, (_, dv, data, _, p)) in &rows {
        assert_eq!(*dv, expected[u], "{u}");
        assert_eq!(p.as_ref().unwrap()["gen"], 2, "{u}");
        let first_round = u[1..].parse::<usize>().unwrap() < 500;
        assert_eq!(
            *data,
            if first_round { 2 } else { 1 },
            "{u}: nothing applied twice"
        );
    }
    wait_until("the pg sink running again", LONG, || async {
        engine.sinks().iter().all(|s| s.state == SinkState::Running)
    })
    .await;
    assert_eq!(engine.readiness().await.status, "ready");
    finish(engine, &ns).await;
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sink_settings_are_named_before_anything_starts() {
    let ns = Namespace::new("badsinks");
    let bad = r#"
[[sinks]]
name = "pg"
kind = "postgres"
url = "mysql://nope"
collection = "x"
[[sinks]]
name = "pg"
kind = "http"
url = "ftp://crm"
table = "t"
[[sinks]]
name = "bad name!"
kind = "mongodb"
primary = true
[[sinks]]
name = "m2"
kind = "mongodb"
primary = true
"#;
    let err = datasync::Config::from_layers(
        &[
            ("test".into(), config_toml(&ns)),
            ("sinks".into(), bad.into()),
        ],
        std::iter::empty(),
    )
    .unwrap_err();
    let text = err.to_string();
    for want in [
        "sinks[0].url: a postgres sink needs postgres://",
        "sinks[0].collection: only for kind mongodb (this sink is postgres)",
        "sinks[1].url: an http sink needs an http:// or https:// URL",
        "sinks[1].table: only for kind postgres (this sink is http)",
        "sinks[1].name: `pg` is used twice",
        "sinks[2].name: `bad name!` must be 1 to 64 letters",
        "sinks: more than one sink says primary = true",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
    let unknown = datasync::Config::from_layers(
        &[
            ("test".into(), config_toml(&ns)),
            (
                "sinks".into(),
                "[[sinks]]\nname = \"x\"\nkind = \"http\"\nurl = \"http://a\"\ncolour = 1\n".into(),
            ),
        ],
        std::iter::empty(),
    )
    .unwrap_err()
    .to_string();
    assert!(unknown.contains("colour"), "{unknown}");
    let kind = datasync::Config::from_layers(
        &[
            ("test".into(), config_toml(&ns)),
            (
                "sinks".into(),
                "[[sinks]]\nname = \"x\"\nkind = \"oracle\"\n".into(),
            ),
        ],
        std::iter::empty(),
    )
    .unwrap_err()
    .to_string();
    assert!(kind.contains("oracle"), "{kind}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sinks_creating_one_table_at_once_all_come_up() {
    // Instances starting together each create the table if it is missing;
    // without a lock, PostgreSQL lets two of them try and fails one.
    let ns = Namespace::new("pgrace");
    let url = postgres_url();
    let c: datasync::config::SinkConfig = toml::from_str(&format!(
        "name = \"pg\"\nkind = \"postgres\"\nurl = \"{url}\"\ntable = \"{}\"\n",
        pg_table(&ns)
    ))
    .unwrap();
    for round in 0..3 {
        drop_table(&url, &ns).await;
        let sinks: Vec<_> = (0..6)
            .map(|_| datasync::sinks::postgres::PostgresSink::new(&c).unwrap())
            .collect();
        let results = futures::future::join_all(sinks.iter().map(|s| s.prepare())).await;
        for r in results {
            assert!(r.is_ok(), "round {round}: {:?}", r.err());
        }
    }
    drop_table(&url, &ns).await;
}
