//! The load harness runs a (tiny) scenario end to end against the real stack and
//! writes its reports. Figures are not asserted: speed is measured, not tested.

mod common;

use std::process::Command;

#[test]
fn a_tiny_scenario_runs_and_writes_every_report() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("tiny.toml");
    std::fs::write(
        &scenario,
        "name = \"tiny\"\nseed = 1\nusers = 300\nrounds = 2\nlegacy_share = 0.2\n\
         publish_only_users = 500\nbaseline_users = 30\nceiling_ops = 500\ntimeout_secs = 300\n\
         [engine.sync]\npage_size = 100\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_datasync-load"))
        .arg(&scenario)
        .arg("--out")
        .arg(dir.path())
        .env("DATASYNC__REDIS__URL", common::redis_url())
        .env("DATASYNC__MONGO__URL", common::mongo_url())
        .env("DATASYNC__KAFKA__BROKERS", common::kafka_brokers())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("every user at its last change: yes"),
        "{stdout}"
    );
    for ratio in [
        "end_to_end_vs_mongo_ceiling",
        "publish_only_vs_broker_ceiling",
        "end_to_end_vs_seed_loop",
    ] {
        assert!(stdout.contains(ratio), "missing {ratio}: {stdout}");
    }
    let run = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("load-tiny-"))
        .expect("a report folder");
    for f in [
        "report.json",
        "report.html",
        "throughput.svg",
        "latency.svg",
    ] {
        assert!(run.path().join(f).exists(), "{f} missing");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(json["run"]["changes"], 600);
    assert_eq!(json["run"]["documents"], 300);
    assert!(json["run"]["latency"]["count"].as_u64().unwrap() > 0);
}

#[test]
fn an_invalid_scenario_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("bad.toml");
    std::fs::write(
        &scenario,
        "name = \"bad\"\nseed = 1\nusers = 0\nstatic_share = 0.5\nmode = \"external\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_datasync-load"))
        .arg(&scenario)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("users: must be at least 1"), "{err}");
    assert!(err.contains("static_share"), "{err}");
    assert!(err.contains("\"external\" is not implemented yet"), "{err}");
}
