//! Starting while a backend is down: the service comes up degraded, accepts
//! flags, and connects when the backend returns; or, when asked to, fails
//! fast naming what did not answer. Errors shown to people name each cause
//! once.

mod common;

use actix_web::{App, http::StatusCode, test as web};
use common::*;
use mongodb::bson::doc;
use serde_json::{Value, json};
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const LONG: Duration = Duration::from_secs(180);

/// POSTs 1,000 users with profiles through the API (the marking path needs
/// only Redis), and checks readiness names the backend that is down.
async fn accept_1000_while_degraded(engine: &datasync::Engine, down: &str) {
    let app =
        web::init_service(App::new().configure(datasync::http::configure(engine.clone()))).await;
    let ready = web::call_service(
        &app,
        web::TestRequest::get().uri("/health/ready").to_request(),
    )
    .await;
    assert_eq!(
        ready.status(),
        StatusCode::OK,
        "degraded is still in rotation"
    );
    let body: Value = web::read_body_json(ready).await;
    assert_eq!(body["status"], "degraded", "{body}");
    assert!(
        body["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().starts_with(&format!("{down} down"))),
        "{body}"
    );
    for chunk in (0..1000).collect::<Vec<_>>().chunks(250) {
        let users: Vec<Value> = chunk
            .iter()
            .map(|i| json!({ "user_id": format!("s{i}"), "profile": { "gen": 1 } }))
            .collect();
        let req = web::TestRequest::post()
            .uri("/v1/sync/dirty")
            .set_json(json!({ "users": users }))
            .to_request();
        let resp = web::call_service(&app, req).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_down_at_start_comes_up_degraded_and_syncs_once_it_answers() {
    let ns = Namespace::new("startkafka");
    let port = free_port();
    let config = config_with(&ns, &format!("[kafka]\nbrokers = \"127.0.0.1:{port}\"\n"));
    let started = Instant::now();
    let engine = start_degraded(config).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "start took {took:?}");
    accept_1000_while_degraded(&engine, "kafka").await;
    assert_eq!(engine.stats().events_published, 0);

    let mut broker = start_kafka(port);
    let mongo = mongo(&ns).await;
    wait_until("all 1,000 in MongoDB once Kafka answers", LONG, || async {
        count_docs(&mongo, doc! {}).await == 1000
    })
    .await;
    wait_until("ready", LONG, || async {
        engine.readiness().await.status == "ready"
    })
    .await;
    finish(engine, &ns).await;
    let _ = broker.kill();
    let _ = broker.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_down_at_start_comes_up_degraded_and_syncs_once_it_answers() {
    let ns = Namespace::new("startmongo");
    let port = free_port();
    let url =
        format!("mongodb://127.0.0.1:{port}/?retryWrites=false&serverSelectionTimeoutMS=2000");
    let config = config_with(&ns, &format!("[mongo]\nurl = \"{url}\"\n"));
    let started = Instant::now();
    let engine = start_degraded(config).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "start took {took:?}");
    accept_1000_while_degraded(&engine, "mongodb").await;

    let dir = tempfile::tempdir().unwrap();
    let mut server = start_mongo(port, dir.path());
    let c = datasync::config::MongoConfig {
        url: datasync::config::Secret::new(url.clone()),
        database: "datasync_test".into(),
        collection: ns.to_string(),
    };
    wait_until("the test's MongoDB answers", LONG, || mongo_answers(&url)).await;
    let m = datasync::clients::mongo::MongoStore::connect(&c, "tests")
        .await
        .unwrap();
    wait_until("all 1,000 in MongoDB once it answers", LONG, || async {
        m.collection().count_documents(doc! {}).await.unwrap_or(0) == 1000
    })
    .await;
    engine.shutdown(Duration::from_secs(20)).await;
    let _ = server.kill();
    let _ = server.wait();
}

/// Runs `datasync run` on `config` (TOML) with `args` and `env`, expecting it
/// to fail on its own within `bound`; answers its stderr and its `error:` line.
fn run_expecting_failure(
    config: &str,
    args: &[&str],
    env: &[(&str, String)],
    bound: Duration,
) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("datasync.toml");
    std::fs::write(&path, config).unwrap();
    let started = Instant::now();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_datasync"));
    cmd.arg("run")
        .args(args)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stderr}");
    assert!(took < bound, "took {took:?}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in:\n{stderr}"))
        .to_string();
    assert_eq!(repeats_a_cause(&error), None, "{error}");
    (stderr, error)
}

#[test]
fn require_backends_fails_fast_naming_the_broker() {
    let ns = Namespace::new("requirekafka");
    let port = free_port();
    let config = config_toml(&ns).replace(
        &format!("brokers = \"{}\"", kafka_brokers()),
        &format!("brokers = \"127.0.0.1:{port}\""),
    );
    let (stderr, error) = run_expecting_failure(
        &format!("{config}\n[startup]\nbackends_timeout = \"3s\"\n"),
        &["--require-backends"],
        &[],
        Duration::from_secs(30),
    );
    assert!(
        error.contains(&format!(
            "kafka at 127.0.0.1:{port} did not answer within 3s"
        )),
        "{error}"
    );
    assert!(
        error.contains("creating topics") || error.contains("cannot create topics"),
        "{error}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a piped log:\n{stderr}"
    );
}

#[test]
fn redis_down_at_start_fails_within_its_timeout_naming_it_once() {
    let ns = Namespace::new("noredis");
    let port = free_port();
    // The file names the real Redis; the environment layer, read last,
    // points at a closed port.
    let (_, error) = run_expecting_failure(
        &format!("{}\n[startup]\nredis_timeout = \"1s\"\n", config_toml(&ns)),
        &[],
        &[("DATASYNC__REDIS__URL", format!("redis://127.0.0.1:{port}"))],
        Duration::from_secs(20),
    );
    assert!(
        error.starts_with(&format!(
            "error: cannot reach redis at redis://127.0.0.1:{port} within 1s"
        )),
        "{error}"
    );
}

/// A Redis of the test's own, with or without the append-only file.
struct OwnRedis(std::process::Child, u16);

impl OwnRedis {
    async fn start(appendonly: &str, dir: &std::path::Path) -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", appendonly])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/stack.sh up installs it)");
        wait_until("the test's redis answers", LONG, || async {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
        OwnRedis(child, port)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.1)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Redis' durability is read from its settings: the append-only file on is
/// durable; off, the instance still serves (ready) but says what a restart
/// would lose, as a readiness warning and in the backlog sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_without_the_append_only_file_is_reported_and_the_instance_stays_ready() {
    use datasync::durability::{self, Durability};
    let dir = tempfile::tempdir().unwrap();
    let with = OwnRedis::start("yes", dir.path()).await;
    let ns = Namespace::new("durable");
    let config = config_with(&ns, &format!("[redis]\nurl = \"{}\"\n", with.url()));
    let redis = datasync::clients::redis::RedisStore::connect(&config.redis, 4)
        .await
        .unwrap();
    assert_eq!(
        durability::check(&redis).await,
        Durability::Aof {
            fsync: "everysec".into()
        }
    );

    let without_dir = tempfile::tempdir().unwrap();
    let without = OwnRedis::start("no", without_dir.path()).await;
    let config = config_with(&ns, &format!("[redis]\nurl = \"{}\"\n", without.url()));
    let engine = start_with(config).await;
    let sample = engine.sample_backlog().await;
    assert_eq!(sample.redis_durability, Some(Durability::Off));
    let r = engine.readiness().await;
    assert_eq!(r.status, "ready", "{r:?}");
    assert_eq!(r.warnings.len(), 1, "{r:?}");
    assert!(r.warnings[0].contains("appendonly is off"), "{r:?}");
    // The same through the API: /health/ready answers 200 with the warning.
    let app =
        web::init_service(App::new().configure(datasync::http::configure(engine.clone()))).await;
    let resp = web::call_service(
        &app,
        web::TestRequest::get().uri("/health/ready").to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = web::read_body_json(resp).await;
    assert!(
        body["warnings"][0]
            .as_str()
            .unwrap()
            .contains("appendonly is off"),
        "{body}"
    );
    finish(engine, &ns).await;
    drop(without);
    drop(with);
}
