//! Access to the API (roles, the loopback-only default, rate limits) and the
//! configuration of secured backends, against the local stack.

mod common;

use actix_web::{App, http::StatusCode, test};
use common::*;
use datasync::config::Config;
use serde_json::{Value, json};

const TOKENS: &str = r#"
[http.tokens.reader]
role = "read"
secret = "read-secret-0123456789"
[http.tokens.writer]
role = "write"
secret = "write-secret-0123456789"
[http.tokens.boss]
role = "admin"
secret = "admin-secret-0123456789"
[consistency]
interval = "0s"
"#;

/// Who calls: no header, an unknown secret, then each role's token.
const CALLERS: [(&str, Option<&str>); 5] = [
    ("no token", None),
    ("wrong token", Some("not-a-token")),
    ("read", Some("read-secret-0123456789")),
    ("write", Some("write-secret-0123456789")),
    ("admin", Some("admin-secret-0123456789")),
];

/// The role table as README documents it: each endpoint and the least role
/// that may call it (`None` = open to everyone).
const ENDPOINTS: &[(&str, &str, Option<&str>)] = &[
    ("GET", "/health/live", None),
    ("GET", "/health/ready", None),
    ("GET", "/metrics", None),
    ("GET", "/v1/profiles/nobody", Some("read")),
    ("GET", "/v1/cache/stats", Some("read")),
    ("GET", "/v1/stats", Some("read")),
    ("GET", "/v1/shards", Some("read")),
    ("GET", "/v1/sinks", Some("read")),
    ("POST", "/v1/sync/dirty", Some("write")),
    ("POST", "/v1/sync/immediate", Some("write")),
    ("POST", "/v1/sync/delete", Some("write")),
    ("GET", "/v1/dlq", Some("admin")),
    ("POST", "/v1/dlq/redrive", Some("admin")),
    ("POST", "/v1/resync", Some("admin")),
    ("GET", "/v1/resync/nope", Some("admin")),
    ("DELETE", "/v1/resync/nope", Some("admin")),
    ("POST", "/v1/consistency/check", Some("admin")),
    ("GET", "/v1/consistency/check/nope", Some("admin")),
    ("GET", "/v1/consistency/report", Some("admin")),
    ("POST", "/v1/replay", Some("admin")),
    ("GET", "/v1/replay/nope", Some("admin")),
    ("DELETE", "/v1/replay/nope", Some("admin")),
    ("GET", "/v1/offsets", Some("admin")),
    ("GET", "/v1/whitelist", Some("admin")),
    ("POST", "/v1/whitelist/add", Some("admin")),
    ("POST", "/v1/whitelist/remove", Some("admin")),
    ("GET", "/v1/operations", Some("admin")),
];

fn rank(role: &str) -> u8 {
    match role {
        "read" => 1,
        "write" => 2,
        "admin" => 3,
        other => panic!("no role {other}"),
    }
}

fn request(method: &str, path: &str, secret: Option<&str>) -> test::TestRequest {
    let mut r = match method {
        "GET" => test::TestRequest::get(),
        "DELETE" => test::TestRequest::delete(),
        _ => test::TestRequest::post(),
    }
    .uri(path)
    .peer_addr("10.0.0.7:50000".parse().unwrap());
    if let Some(s) = secret {
        r = r.insert_header(("Authorization", format!("Bearer {s}")));
    }
    if method == "POST" {
        // Not an object: every handler refuses it after the gate, so an
        // allowed call changes nothing either.
        r = r.set_json(json!([]));
    }
    r
}

#[actix_web::test]
async fn each_role_can_do_exactly_what_it_may() {
    let ns = Namespace::new("roles");
    let engine = start_with(config_with(&ns, TOKENS)).await;
    let app =
        test::init_service(App::new().configure(datasync::http::configure(engine.clone()))).await;
    let mut wrong = Vec::new();
    for (method, path, needs) in ENDPOINTS {
        for (caller, secret) in CALLERS {
            let resp = test::call_service(&app, request(method, path, secret).to_request()).await;
            let got = resp.status();
            let expected = match (needs, caller) {
                (None, _) => "pass",
                (Some(_), "no token" | "wrong token") => "401",
                (Some(need), role) if rank(role) < rank(need) => "403",
                _ => "pass",
            };
            let ok = match expected {
                "401" => got == StatusCode::UNAUTHORIZED,
                "403" => got == StatusCode::FORBIDDEN,
                _ => ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&got),
            };
            if !ok {
                wrong.push(format!(
                    "{method} {path} as {caller}: {got}, expected {expected}"
                ));
            }
            if expected == "403" {
                let body: Value = test::read_body_json(resp).await;
                let msg = body["error"].as_str().unwrap_or_default().to_string();
                assert!(
                    msg.contains(needs.unwrap()) && !msg.contains("secret-"),
                    "{method} {path}: {msg}"
                );
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Nothing the refused or malformed calls carried reached Redis.
    assert_eq!(pending_flags(&redis(&ns).await).await, 0);
    finish(engine, &ns).await;
}

#[actix_web::test]
async fn a_burst_over_the_limit_gets_429_with_retry_after_and_applies_nothing() {
    let ns = Namespace::new("ratelimit");
    let extra = format!(
        "{TOKENS}\n[http.rate_limit.write]\nper_second = 1\nburst = 2\n\
         [http.rate_limit.read]\nper_second = 1000\nburst = 1000\n"
    );
    let engine = start_with(config_with(&ns, &extra)).await;
    let app =
        test::init_service(App::new().configure(datasync::http::configure(engine.clone()))).await;
    let writer = ("Authorization", "Bearer write-secret-0123456789");
    let mark = |user: &str| {
        test::TestRequest::post()
            .uri("/v1/sync/dirty")
            .insert_header(writer)
            .set_json(json!({"users": [{"user_id": user, "profile": {"gen": 1}}]}))
            .to_request()
    };
    let user = |i: usize| format!("{ns}-u{i}");
    let mut statuses = Vec::new();
    let mut refused = None;
    for i in 0..5 {
        let resp = test::call_service(&app, mark(&user(i))).await;
        statuses.push(resp.status().as_u16());
        if resp.status() == StatusCode::TOO_MANY_REQUESTS && refused.is_none() {
            let retry: u64 = resp
                .headers()
                .get("Retry-After")
                .unwrap()
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(retry >= 1, "Retry-After: {retry}");
            let body: Value = test::read_body_json(resp).await;
            assert!(
                body["error"].as_str().unwrap().contains("rate limit"),
                "{body}"
            );
            refused = Some(i);
        }
    }
    assert_eq!(&statuses[..2], &[200, 200], "{statuses:?}");
    let first_refused = refused.expect("a request was refused");
    // The refused request wrote no profile and no flag.
    let r = raw_redis().await;
    let key = format!("{ns}:user:{}:profile", user(first_refused));
    let exists: i64 = fred::interfaces::KeysInterface::exists(&r, key)
        .await
        .unwrap();
    assert_eq!(exists, 0);
    // Another role's quota is its own.
    let req = test::TestRequest::get()
        .uri("/v1/stats")
        .insert_header(("Authorization", "Bearer read-secret-0123456789"))
        .to_request();
    assert_eq!(test::call_service(&app, req).await.status(), StatusCode::OK);
    finish(engine, &ns).await;
}

fn with_http(ns: &str, extra: &str) -> String {
    format!(
        "{}\n{extra}",
        config_toml(ns).replace("[http]\nenabled = false\nbind = \"127.0.0.1:0\"", "")
    )
}

#[std::prelude::v1::test]
fn a_non_loopback_bind_without_a_write_token_refuses_to_start() {
    let ns = unique("exposed");
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("no token", String::new(), false),
        (
            "a read token only",
            "[http.tokens.ro]\nrole = \"read\"\nsecret = \"ro-secret-0123456789\"\n".into(),
            false,
        ),
    ];
    for (what, tokens, _) in cases {
        let path = dir.path().join("c.toml");
        let http = format!(
            "[http]\nenabled = true\nbind = \"0.0.0.0:{}\"\n{tokens}",
            free_port()
        );
        std::fs::write(&path, with_http(&ns, &http)).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_datasync"))
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: started");
        assert!(
            err.contains("http.tokens") && err.contains("http.bind") && !err.contains("panicked"),
            "{what}: {err}"
        );
        assert!(!err.contains("ro-secret"), "{what}: the secret printed");
    }
    // The check itself: loopback, or a token that may write, is enough.
    let mut c = Config::default_config();
    c.http.bind = "0.0.0.0:8080".into();
    assert!(c.http.check_exposure().is_err());
    c.http.admin_token = datasync::config::Secret::new("x");
    assert!(c.http.check_exposure().is_ok());
    c.http.admin_token = datasync::config::Secret::default();
    c.http.bind = "127.0.0.1:8080".into();
    assert!(c.http.check_exposure().is_ok());
}

fn check(toml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml).unwrap();
    let run = |action: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_datasync"))
            .args(["config", action, "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = run("check");
    let ok = out.status.success();
    let mut text = String::from_utf8_lossy(&out.stderr).to_string();
    if ok {
        text = String::from_utf8_lossy(&run("print").stdout).to_string();
    }
    (ok, text)
}

#[std::prelude::v1::test]
fn kafka_client_properties_are_checked_and_their_secrets_never_print() {
    let sasl = r#"
[kafka.client]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "PLAIN"
"sasl.username" = "svc-datasync"
"sasl.password" = "pa55-w0rd-xyz"
"#;
    let (ok, printed) = check(sasl);
    assert!(ok, "{printed}");
    assert!(
        printed.contains("svc-datasync") && printed.contains("SASL_SSL"),
        "{printed}"
    );
    assert!(!printed.contains("pa55-w0rd-xyz"), "{printed}");

    let bad = r#"
[kafka.client]
"no.such.property" = "1"
"enable.auto.commit" = "true"
"security.protocol" = "SASL_PLAINTEXT"
"sasl.mechanism" = "NOT-A-MECHANISM"
"sasl.password" = "pa55-w0rd-xyz"
"#;
    let (ok, err) = check(bad);
    assert!(!ok);
    for needle in [
        "kafka.client.\"no.such.property\"",
        "kafka.client.\"enable.auto.commit\"",
    ] {
        assert!(err.contains(needle), "{needle} not named: {err}");
    }
    assert!(!err.contains("pa55-w0rd-xyz"), "{err}");
    // Values librdkafka checks only when a client is made.
    let (ok, err) = check(&bad.replace(
        "\"no.such.property\" = \"1\"\n\"enable.auto.commit\" = \"true\"\n",
        "",
    ));
    assert!(!ok);
    assert!(
        err.contains("NOT-A-MECHANISM") && !err.contains("pa55-w0rd-xyz"),
        "{err}"
    );
}

#[std::prelude::v1::test]
fn tokens_are_checked_and_never_print() {
    let (ok, err) = check(
        "[http.tokens.a]\nrole = \"write\"\nsecret = \"same-0123456789\"\n\
         [http.tokens.b]\nrole = \"read\"\nsecret = \"same-0123456789\"\n",
    );
    assert!(!ok);
    assert!(
        err.contains("http.tokens.b.secret: the same secret as http.tokens.a"),
        "{err}"
    );
    assert!(!err.contains("same-0123456789"), "{err}");
    let (ok, err) = check("[http.tokens.c]\nrole = \"owner\"\nsecret = \"x\"\n");
    assert!(!ok);
    assert!(err.contains("owner"), "{err}");
    let (ok, printed) =
        check("[http.tokens.a]\nrole = \"write\"\nsecret = \"s3cr3t-0123456789\"\n");
    assert!(ok, "{printed}");
    assert!(
        printed.contains("Write") && !printed.contains("s3cr3t"),
        "{printed}"
    );
}

/// Every `expr` in the dashboard JSON, however deep.
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query", Value::String(s)) => out.push(s.clone()),
                    (_, v) => exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_shows_pending_work_and_consumer_lag_and_the_dashboard_names_exported_metrics()
{
    use datasync::{backlog::BacklogMonitor, lease::Ownership};
    use rdkafka::{
        mocking::MockCluster,
        producer::{FutureProducer, FutureRecord},
    };
    use std::{sync::Arc, time::Duration};

    let ns = Namespace::new("backlog");
    // librdkafka's mock cluster: its watermarks are exact.
    let cluster = MockCluster::new(1).unwrap();
    for t in ["static", "dynamic", "dlq"] {
        cluster.create_topic(&format!("{ns}-{t}"), 2, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    let config = config_with(
        &ns,
        &format!("[kafka]\nbrokers = \"{brokers}\"\ncreate_topics = false\n"),
    );
    let engine = start_with(config.clone()).await;
    let users: Vec<_> = (0..300)
        .map(|i| profile(&format!("{ns}-u{i}"), 1))
        .collect();
    engine.write_and_mark(&users).await.unwrap();
    let m = mongo(&ns).await;
    wait_until("300 users applied", Duration::from_secs(120), || {
        let m = m.clone();
        async move { count_docs(&m, mongodb::bson::doc! {}).await == 300 }
    })
    .await;
    let dynamic = format!("{ns}-dynamic");
    wait_until(
        "the applier committed everything",
        Duration::from_secs(60),
        || {
            let (engine, dynamic) = (engine.clone(), dynamic.clone());
            async move {
                let b = engine.sample_backlog().await;
                let lag = b.consumer_lag.unwrap_or_default();
                let on_dynamic: Vec<_> = lag.iter().filter(|p| p.topic == dynamic).collect();
                on_dynamic.len() == 2
                    && on_dynamic.iter().map(|p| p.end).sum::<i64>() == 300
                    && on_dynamic
                        .iter()
                        .all(|p| p.lag == 0 && p.committed == Some(p.end))
            }
        },
    )
    .await;
    let b = engine.backlog();
    assert_eq!(b.pending_flags_total, Some(0));
    // /v1/stats shows the sample.
    let app = actix_web::test::init_service(
        App::new().configure(datasync::http::configure(engine.clone())),
    )
    .await;
    let stats: Value =
        test::call_and_read_body_json(&app, test::TestRequest::get().uri("/v1/stats").to_request())
            .await;
    assert_eq!(stats["backlog"]["pending_flags_total"], 0, "{stats}");
    assert!(stats["backlog"]["consumer_lag"].as_array().unwrap().len() >= 4);
    engine.shutdown(Duration::from_secs(20)).await;

    // With the service stopped, work piles up: 50 records nobody applies,
    // 30 flags and 2 immediate changes.
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    for i in 0..50 {
        let key = format!("{ns}-late{i}");
        producer
            .send(
                FutureRecord::to(&dynamic).key(&key).payload("x"),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let store = redis(&ns).await;
    let flagged: Vec<String> = (0..30).map(|i| format!("{ns}-f{i}")).collect();
    store.mark(&flagged).await.unwrap();
    store
        .stage_static(&[
            (&format!("{ns}-s1"), "{}".into()),
            (&format!("{ns}-s2"), "{}".into()),
        ])
        .await
        .unwrap();
    let mut all_mode = config.clone();
    all_mode.instance.mode = datasync::config::ShardMode::All;
    let primary = Arc::new(datasync::sinks::SinkStatus::new(
        "mongodb",
        "mongodb",
        true,
        &config.kafka.consumer_group,
        "",
    ));
    let monitor = BacklogMonitor::new(
        &all_mode,
        store.clone(),
        Arc::new(Ownership::new(&all_mode)),
        std::slice::from_ref(&primary),
        "test",
    );
    let b = monitor.sample().await;
    assert_eq!(b.pending_flags_total, Some(30));
    assert_eq!(b.pending_flags_owned, Some(30));
    assert_eq!(b.pending_static, Some(2));
    let lag: i64 = b
        .consumer_lag
        .as_ref()
        .unwrap()
        .iter()
        .filter(|p| p.topic == dynamic)
        .map(|p| p.lag)
        .sum();
    assert_eq!(lag, 50);
    // The sink's own report carries the same lag.
    let all: i64 = b.consumer_lag.as_ref().unwrap().iter().map(|p| p.lag).sum();
    assert_eq!(primary.report().lag, Some(all));

    // The dashboard's and the rules' queries name only exported metrics.
    let exported = exported_metrics();
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/config/grafana/datasync.json")).unwrap(),
    )
    .unwrap();
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(queries.len() >= 10, "{queries:?}");
    let mut named = std::collections::BTreeSet::new();
    for q in &queries {
        named.extend(metric_names(q));
    }
    for needed in [
        "datasync_consumer_lag",
        "datasync_pending_flags_owned",
        "datasync_flag_to_applied_seconds_bucket",
        "datasync_backend_up",
        "datasync_dlq_open_entries",
    ] {
        assert!(
            named.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    for name in &named {
        assert!(
            exported.contains(name),
            "the dashboard queries `{name}`, which /metrics does not export"
        );
    }
    cleanup(&ns).await;
}

#[std::prelude::v1::test]
fn the_alert_rules_fire_as_their_unit_tests_say() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("promtool is installed (scripts/stack.sh tools)");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every rule has a unit test.
    let rules = std::fs::read_to_string(format!("{dir}/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(format!("{dir}/alerts.test.yml")).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no unit test"
        );
    }
}
