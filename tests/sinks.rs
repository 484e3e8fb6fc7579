//! Several sinks at once (DESIGN §9): MongoDB and PostgreSQL applying the
//! same changes, each in its own consumer group; PostgreSQL away for 30 s
//! while MongoDB goes on; sink settings checked before anything starts. The
//! HTTP adapter and a sink of the host's own are in `sink_adapters.rs`.

mod common;

use common::*;
use datasync::{
    proto::SyncType,
    sinks::{Sink, SinkState},
};
use futures::TryStreamExt;
use mongodb::bson::doc;
use std::{
    collections::HashMap,
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
