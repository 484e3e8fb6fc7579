//! The `datasync` binary as a process: config errors, SIGKILL mid-batch and a
//! graceful SIGTERM.

mod common;

use common::*;
use futures::TryStreamExt;
use mongodb::bson::doc;
use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    time::Duration,
};

const BIN: &str = env!("CARGO_BIN_EXE_datasync");

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
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_then_restart_loses_nothing_and_regresses_nothing() {
    let ns = unique("crash");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("datasync.toml");
    let log = dir.path().join("datasync.log");
    std::fs::write(&config, config_toml(&ns)).unwrap();
    let r = redis(&ns).await;
    let mongo = mongo(&ns).await;

    let mut child = spawn(&config, &log);
    let mut latest: HashMap<String, (i64, i64)> = HashMap::new();
    let users: Vec<String> = (0..6000).map(|i| format!("c{i}")).collect();
    for chunk in users.chunks(1000) {
        let writes: Vec<(String, String)> = chunk
            .iter()
            .map(|u| (u.clone(), serde_json::json!({ "gen": 1 }).to_string()))
            .collect();
        r.write_profiles(&writes).await.unwrap();
        for (u, v) in r.mark(chunk).await.unwrap() {
            latest.insert(u, (v, 1));
        }
    }
    wait_until(
        "some documents applied",
        Duration::from_secs(90),
        || async { count_docs(&mongo, doc! {}).await >= 300 },
    )
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = count_docs(&mongo, doc! {}).await;
    assert!(at_kill < 6000, "the kill must land mid-run");

    // While it is down, a third of the users change again.
    let again: Vec<String> = users.iter().step_by(3).cloned().collect();
    let writes: Vec<(String, String)> = again
        .iter()
        .map(|u| (u.clone(), serde_json::json!({ "gen": 2 }).to_string()))
        .collect();
    r.write_profiles(&writes).await.unwrap();
    for (u, v) in r.mark(&again).await.unwrap() {
        latest.insert(u, (v, 2));
    }

    let mut child = spawn(&config, &log);
    wait_until(
        "every user at its latest version",
        Duration::from_secs(120),
        || async {
            count_docs(&mongo, doc! {}).await == 6000
                && count_docs(&mongo, doc! { "dynamicProfile.gen": 2i64 }).await
                    == again.len() as u64
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
            "{u} (killed at {at_kill} docs)"
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
