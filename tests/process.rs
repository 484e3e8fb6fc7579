//! The `datasync` binary as a process: config errors, SIGKILL mid-batch and a
//! graceful SIGTERM.

mod common;

use common::*;
use futures::TryStreamExt;
use mongodb::bson::doc;
use std::{
    collections::HashMap,
    process::{Child, Command},
    time::Duration,
};

const BIN: &str = env!("CARGO_BIN_EXE_datasync");
const LONG: Duration = Duration::from_secs(180);

#[test]
fn config_check_lists_every_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[sync]\nshards = 0\npage_sise = 10\n[kafka]\nbrokerz = \"x\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown key `sync.page_sise`"), "{err}");
    assert!(err.contains("unknown key `kafka.brokerz`"), "{err}");
    assert!(
        err.contains("sync.shards: must be between 1 and 16384"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["config", "check"])
        .env("DATASYNC__SYNC__INTERVAL", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("interval"));

    let out = Command::new(BIN)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn spawn(config: &std::path::Path, log: &std::path::Path) -> Child {
    spawn_service(config, log, &[])
}

async fn write_generation(
    r: &datasync::clients::redis::RedisStore,
    users: &[String],
    generation: i64,
    latest: &mut HashMap<String, (i64, i64)>,
) {
    for chunk in users.chunks(1000) {
        let writes = generation_profiles(chunk, generation);
        r.write_profiles(&writes).await.unwrap();
        for (u, v) in r.mark(chunk).await.unwrap() {
            latest.insert(u, (v, generation));
        }
    }
}

/// SIGKILL while the publish stage is running (flags being cleared), then
/// while the applier is writing (documents appearing); users change while the
/// service is down. After each restart nothing is lost and nothing regresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_each_stage_then_restart_loses_nothing_and_regresses_nothing() {
    let ns = Namespace::new("crash");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("datasync.toml");
    let log = dir.path().join("datasync.log");
    // Small pages, one at a time, so the publish stage lasts long enough to be hit.
    let text = config_toml(&ns).replace(
        "page_size = 500",
        "page_size = 100\nmax_in_flight_pages = 1",
    );
    std::fs::write(&config, text).unwrap();
    let r = redis(&ns).await;
    let mongo = mongo(&ns).await;
    let users: Vec<String> = (0..6000).map(|i| format!("c{i}")).collect();
    let mut latest: HashMap<String, (i64, i64)> = HashMap::new();

    // Stage 1: publishing.
    write_generation(&r, &users, 1, &mut latest).await;
    let mut child = spawn(&config, &log);
    wait_until(
        "the publish stage under way",
        Duration::from_secs(90),
        || async { pending_flags(&r).await < 6000 },
    )
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let pending_at_kill = pending_flags(&r).await;
    eprintln!("killed while publishing: {pending_at_kill} of 6000 flags pending");
    assert!(
        pending_at_kill > 0 && pending_at_kill < 6000,
        "the kill must land mid-publish: {pending_at_kill} of 6000 flags pending"
    );
    let again: Vec<String> = users.iter().step_by(3).cloned().collect();
    write_generation(&r, &again, 2, &mut latest).await;

    // Stage 2: applying.
    let mut child = spawn(&config, &log);
    wait_until("the applier under way", Duration::from_secs(90), || async {
        count_docs(&mongo, doc! {}).await >= 300
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = count_docs(&mongo, doc! {}).await;
    eprintln!("killed while applying: {at_kill} of 6000 documents written");
    assert!(
        (300..6000).contains(&at_kill),
        "the kill must land mid-apply: {at_kill} of 6000 documents written"
    );
    let third: Vec<String> = users.iter().skip(1).step_by(3).cloned().collect();
    write_generation(&r, &third, 3, &mut latest).await;

    let mut child = spawn(&config, &log);
    wait_until(
        "every user at its latest version",
        Duration::from_secs(120),
        || async {
            count_docs(&mongo, doc! {}).await == 6000
                && count_docs(&mongo, doc! { "dynamicProfile.gen": 2i64 }).await
                    == again.len() as u64
                && count_docs(&mongo, doc! { "dynamicProfile.gen": 3i64 }).await
                    == third.len() as u64
        },
    )
    .await;
    let mut cursor = mongo.collection().find(doc! {}).await.unwrap();
    while let Some(d) = cursor.try_next().await.unwrap() {
        let u = d.get_str("userId").unwrap();
        let (v, generation) = latest[u];
        assert_eq!(
            d.get_i64("dynamicVersion").unwrap(),
            v,
            "{u} (killed at {pending_at_kill} pending, then at {at_kill} docs)"
        );
        assert_eq!(
            d.get_document("dynamicProfile")
                .unwrap()
                .get_i64("gen")
                .unwrap(),
            generation,
            "{u}"
        );
    }
    wait_until("every flag cleared", Duration::from_secs(60), || async {
        pending_flags(&r).await == 0
    })
    .await;

    // SIGTERM: a graceful stop within the configured limit, exit code 0.
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_until(
        "the process exits after SIGTERM",
        Duration::from_secs(40),
        || {
            let exited = child.try_wait().unwrap().is_some();
            async move { exited }
        },
    )
    .await;
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "exit {status:?}; log:\n{text}");
    assert!(text.contains("engine stopped"), "{text}");
    cleanup(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dlq_command_lists_and_redrives() {
    let ns = Namespace::new("dlqcli");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("datasync.toml");
    std::fs::write(&config, config_toml(&ns)).unwrap();
    let engine = start(&ns).await;
    // No profile in Redis: a permanent load failure, dead-lettered.
    engine
        .mark_dirty(&["nobody-home".to_string()])
        .await
        .unwrap();
    wait_until("one open dead letter", Duration::from_secs(60), || async {
        engine.dlq_list(10).await.unwrap().open == 1
    })
    .await;
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let list = run(&["dlq", "list"]);
    assert_eq!(list["open"], 1, "{list}");
    assert_eq!(list["entries"][0]["user_id"], "nobody-home");
    let done = run(&["dlq", "redrive", "nobody-home", "someone-else"]);
    assert_eq!(done["redriven"][0][0], "nobody-home", "{done}");
    assert_eq!(done["not_open"][0], "someone-else");
    let out = Command::new(BIN).args(["dlq", "redrive"]).output().unwrap();
    assert!(!out.status.success(), "redrive needs ids or --all");
    finish(engine, &ns).await;
}

/// A resync started through the API, SIGKILLed halfway while a live writer
/// keeps changing 1,000 of its users: the restarted instance resumes it from
/// its checkpoint, every user ends in MongoDB, and the writer's users end at
/// the writer's last value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_killed_halfway_resumes_after_a_restart() {
    let ns = Namespace::new("resynckill");
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = (dir.path().join("c.toml"), dir.path().join("log"));
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "{}\n[http]\nenabled = true\nbind = \"127.0.0.1:{port}\"\nadmin_token = \"t0ken\"\n[consistency]\ninterval = \"0s\"\n",
            config_toml(&ns).replace("[http]\nenabled = false\nbind = \"127.0.0.1:0\"\n", "")
        ),
    )
    .unwrap();
    let r = redis(&ns).await;
    let users: Vec<String> = (0..8_000).map(|i| format!("k{i}")).collect();
    for chunk in users.chunks(5000) {
        r.write_profiles(&generation_profiles(chunk, 0))
            .await
            .unwrap();
    }
    let http = http_client();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn(&config, &log);
    wait_until("the api answers", LONG, || async {
        http.get(format!("{base}/health/live")).send().await.is_ok()
    })
    .await;
    let job: serde_json::Value = http
        .post(format!("{base}/v1/resync"))
        .bearer_auth("t0ken")
        .json(&serde_json::json!({ "all": true, "rate": 1000 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().expect("a job id").to_string();

    // The live writer: 1,000 of the users, a new generation each round.
    let halt = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (halt, hot, ns) = (halt.clone(), users[..1000].to_vec(), ns.to_string());
        tokio::spawn(async move {
            let r = redis(&ns).await;
            let mut latest = HashMap::new();
            let mut generation = 0;
            // A round every 500 ms: a paced writer, not a wait for anything.
            let mut rounds = tokio::time::interval(Duration::from_millis(500));
            while !halt.is_cancelled() {
                rounds.tick().await;
                generation += 1;
                write_generation(&r, &hot, generation, &mut latest).await;
            }
            generation
        })
    };
    let progress = |base: String, id: String| {
        let http = http.clone();
        async move {
            http.get(format!("{base}/v1/resync/{id}"))
                .bearer_auth("t0ken")
                .send()
                .await
                .ok()?
                .json::<serde_json::Value>()
                .await
                .ok()
        }
    };
    wait_until("the resync halfway", LONG, || async {
        progress(base.clone(), id.clone())
            .await
            .is_some_and(|j| j["scanned"].as_u64().unwrap_or(0) >= 2500)
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = progress_of(&r, &id).await;
    assert!(at_kill < 8_000, "the job was not halfway: {at_kill}");

    let mut child = spawn(&config, &log);
    wait_until("the resumed resync done", LONG, || async {
        progress(base.clone(), id.clone())
            .await
            .is_some_and(|j| j["state"] == "done")
    })
    .await;
    halt.cancel();
    let last_generation = writer.await.unwrap();
    let done = progress(base.clone(), id.clone()).await.unwrap();
    // Resumed from its checkpoint, not from the start (SCAN may return a
    // key twice, never 2,500 of them).
    let scanned = done["scanned"].as_u64().unwrap();
    assert!((8_000..10_500).contains(&scanned), "{done}");

    let mongo = mongo(&ns).await;
    wait_until("every user in MongoDB at its Redis value", LONG, || async {
        holds_at_least(&mongo, 8_000).await
            && count_docs(&mongo, doc! { "dynamicProfile.gen": 0 }).await == 7_000
            && count_docs(&mongo, doc! { "dynamicProfile.gen": last_generation }).await == 1000
    })
    .await;
    stop(&mut child);
}

/// Users scanned so far by a resync, from its record in Redis.
async fn progress_of(r: &datasync::clients::redis::RedisStore, id: &str) -> u64 {
    let job: datasync::jobs::Job<datasync::jobs::resync::Resync> =
        datasync::jobs::get(r, datasync::jobs::resync::KIND, id)
            .await
            .unwrap();
    job.body.scanned
}
