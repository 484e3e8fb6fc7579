//! The load harness runs a (tiny) scenario end to end against the real stack and
//! writes its reports. Figures are not asserted: speed is measured, not tested.

mod common;

use std::process::Command;

/// Runs the harness on `scenario` against the test stack, writing under `out`;
/// the services it starts (sweep and chaos modes) are this build's binary.
fn run_harness(scenario: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_datasync-load"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATASYNC_BIN", env!("CARGO_BIN_EXE_datasync"))
        .arg(scenario)
        .arg("--out")
        .arg(out)
        .env("DATASYNC__REDIS__URL", common::redis_url())
        .env("DATASYNC__MONGO__URL", common::mongo_url())
        .env("DATASYNC__KAFKA__BROKERS", common::kafka_brokers())
        .output()
        .unwrap()
}

/// The report folder of the run named `name` under `dir`, as JSON.
fn report_of(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, serde_json::Value) {
    let run = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("load-{name}-"))
        })
        .expect("a report folder")
        .path();
    let json =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    (run, json)
}

/// A scenario run that must succeed: the scenario `text` (named `name`) is
/// written to a fresh folder and run; its output and its report come back
/// (bind `_dir`: the folder goes when it does).
struct Ran {
    _dir: tempfile::TempDir,
    stdout: String,
    stderr: String,
    run: std::path::PathBuf,
    json: serde_json::Value,
}

fn run_ok(name: &str, text: &str) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join(format!("{name}.toml"));
    std::fs::write(&scenario, text).unwrap();
    let out = run_harness(&scenario, dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let (run, json) = report_of(dir.path(), name);
    Ran {
        _dir: dir,
        stdout,
        stderr,
        run,
        json,
    }
}

#[test]
fn a_tiny_scenario_runs_and_writes_every_report() {
    let Ran {
        _dir,
        stdout,
        stderr,
        run,
        json,
    } = run_ok(
        "tiny",
        "name = \"tiny\"\nseed = 1\nusers = 300\nrounds = 2\nlegacy_share = 0.2\nimmediate_rate = 20\nrate = 200\n\
         publish_only_users = 500\nbaseline_users = 30\nceiling_ops = 500\ntimeout_secs = 300\n\
         [engine.sync]\npage_size = 100\n",
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
    // The run removed what it made on the shared stack.
    let ns = json["namespace"].as_str().unwrap();
    assert!(stderr.contains("cleanup: removed"), "{stderr}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (keys, collections) = rt.block_on(async {
        let r = common::raw_redis().await;
        let keys: i64 = fred::interfaces::LuaInterface::eval(
            &r,
            "local n=0 local c='0' repeat local r=redis.call('SCAN',c,'MATCH',ARGV[1],'COUNT',1000) \
             c=r[1] n=n+#r[2] until c=='0' return n",
            Vec::<String>::new(),
            vec![format!("{ns}*")],
        )
        .await
        .unwrap();
        let m = mongodb::Client::with_uri_str(common::mongo_url())
            .await
            .unwrap();
        let names = m
            .database("datasync_load")
            .list_collection_names()
            .await
            .unwrap();
        (keys, names.into_iter().filter(|n| n.starts_with(ns)).count())
    });
    assert_eq!((keys, collections), (0, 0), "left behind by {ns}");
    for f in [
        "report.json",
        "report.html",
        "throughput.svg",
        "latency.svg",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    assert_eq!(json["run"]["changes"], 600);
    assert_eq!(json["run"]["documents"], 300);
    assert!(json["run"]["latency"]["count"].as_u64().unwrap() > 0);
    let baseline = &json["baseline"];
    for figure in [
        "end_to_end_users_per_s",
        "end_to_end_sequential_users_per_s",
        "producer_side_users_per_s",
    ] {
        assert!(
            baseline[figure].as_f64().unwrap() > 0.0,
            "{figure}: {baseline}"
        );
    }
    let immediate = &json["run"]["immediate"];
    assert!(immediate["requests"].as_u64().unwrap() > 0, "{immediate}");
    assert_eq!(immediate["failed"], 0);
    assert!(immediate["to_ack"]["count"].as_u64().unwrap() > 0);
}

/// `rate = "half_peak"` measures the peak first in the same run, then runs
/// at half of it, and reports both.
#[test]
fn a_half_peak_scenario_measures_the_peak_first() {
    let Ran {
        _dir, stdout, json, ..
    } = run_ok(
        "half",
        "name = \"half\"\nseed = 2\nusers = 300\nrate = \"half_peak\"\nduration_secs = 2\n\
         publish_only_users = 0\nbaseline_users = 0\nceiling_ops = 0\ntimeout_secs = 300\n",
    );
    let peak = json["peak"]["changes_per_s"].as_f64().expect("a peak run");
    assert!(peak > 0.0);
    assert!(
        stdout.contains("the run below is at half of it"),
        "{stdout}"
    );
    assert!(json["run"]["verified"].as_bool().unwrap(), "{stdout}");
}

#[test]
fn an_invalid_scenario_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("bad.toml");
    // The harness's error output for a scenario file holding `text`.
    let refused = |text: &str| {
        std::fs::write(&scenario, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_datasync-load"))
            .arg(&scenario)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err =
        refused("name = \"bad\"\nseed = 1\nusers = 0\nlegacy_share = 1.5\nmode = \"external\"\n");
    for reason in [
        "users: must be at least 1",
        "legacy_share: must be between 0 and 1",
        "external.apis: external mode needs at least one API URL",
    ] {
        assert!(err.contains(reason), "{err}");
    }
    let err = refused("name = \"bad\"\nseed = 1\nusers = 5\nrate = \"fast\"\n");
    assert!(err.contains("rate: `fast` is neither"), "{err}");
    let err = refused("name = \"bad\"\nseed = 1\nusers = 5\nmode = \"chaos\"\n");
    assert!(
        err.contains("chaos: chaos mode needs a [chaos] table"),
        "{err}"
    );
    let err =
        refused("name = \"bad\"\nseed = 1\nusers = 5\nmode = \"sweep\"\n[sweep]\nsteps = [0]\n");
    assert!(err.contains("sweep.steps: sweep mode needs"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_mode_drives_a_running_service_over_http() {
    let ns = common::unique("external");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = common::config_toml(&ns).replace(
        "enabled = false\nbind = \"127.0.0.1:0\"",
        &format!("enabled = true\nbind = \"127.0.0.1:{port}\""),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("service.toml"), &config).unwrap();
    let mut service = Command::new(env!("CARGO_BIN_EXE_datasync"))
        .args(["run", "--config"])
        .arg(dir.path().join("service.toml"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let scenario = format!(
        "name = \"external\"\nseed = 3\nusers = 400\nrounds = 2\nmode = \"external\"\n\
         baseline_users = 0\nceiling_ops = 0\ntimeout_secs = 300\n\
         [external]\napis = [\"http://127.0.0.1:{port}\"]\n{}",
        config.replace("\n[", "\n[engine.")
    );
    std::fs::write(dir.path().join("scenario.toml"), scenario).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_datasync-load"))
        .arg(dir.path().join("scenario.toml"))
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &service.id().to_string()])
        .status();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("800 changes"), "{stdout}");
    assert!(
        stdout.contains("every user at its last change: yes"),
        "{stdout}"
    );
    // The service's own histogram, merged: the run's distribution, warm-up
    // left out, with buckets for the chart.
    let (_, json) = report_of(dir.path(), "external");
    let latency = &json["run"]["latency"];
    let count = latency["count"].as_u64().unwrap();
    assert!(count > 0 && count <= 800, "{latency}");
    assert!(
        !json["run"]["latency_buckets"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let _ = service.wait();
    common::cleanup(&ns).await;
}

/// The short chaos soak: three services on servers of the harness's own, one
/// fault of each kind, and the checker's verdict. Any regression seen during
/// the soak, or any acknowledged change missing at its end, fails it.
#[test]
fn the_short_chaos_soak_recovers_from_every_fault_without_a_violation() {
    let dir = tempfile::tempdir().unwrap();
    let scenario =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/load/chaos-short.toml");
    let out = run_harness(&scenario, dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !stdout.contains("verdict       no violation") {
        // The servers' and services' logs of a failed soak stay to be read.
        let kept = dir.keep();
        panic!(
            "{stdout}\n{stderr}\nreport, servers and logs kept under {}",
            kept.display()
        );
    }
    let (run, json) = report_of(dir.path(), "chaos-short");
    assert!(run.join("report.html").exists());
    let faults = json["faults"].as_array().unwrap();
    let kinds: std::collections::BTreeSet<&str> =
        faults.iter().map(|f| f["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        [
            "broker_pause",
            "kill",
            "mongo_restart",
            "redis_restart",
            "zombie"
        ]
    );
    for f in faults {
        assert!(f["error"].is_null(), "{f}");
        assert!(f["end_s"].as_f64() >= f["start_s"].as_f64(), "{f}");
        assert!(f["recovery_s"].as_f64().is_some(), "never recovered: {f}");
        // Every fault was logged when it began and when it was over.
        let kind = f["kind"].as_str().unwrap();
        assert!(stderr.contains(&format!("healed: {kind}")), "{stderr}");
    }
    assert_eq!(json["regressions"]["count"], 0, "{stdout}");
    assert_eq!(json["end_state"]["lost"]["count"], 0, "{stdout}");
    assert_eq!(json["end_state"]["phantom"]["count"], 0, "{stdout}");
    assert!(json["counts"]["acked"].as_u64().unwrap() > 0);
    assert!(json["counts"]["deletes_acked"].as_u64().unwrap() > 0);
    // Nothing left in Redis but what an open dead letter explains.
    assert_eq!(json["left"]["without_reason"]["count"], 0, "{stdout}");
    assert_eq!(
        json["left"]["dead_letters_without_reason"]["count"], 0,
        "{stdout}"
    );
    assert_eq!(json["left"]["legacy"], 0, "{stdout}");
}

#[test]
fn a_tiny_sweep_drains_each_step_in_a_service_of_its_own() {
    let Ran {
        _dir,
        stdout,
        run,
        json,
        ..
    } = run_ok(
        "sweep-tiny",
        "name = \"sweep-tiny\"\nmode = \"sweep\"\nseed = 1\nusers = 1\nprofile_bytes = 64\n\
         timeout_secs = 300\n[sweep]\nsteps = [200, 1000]\n",
    );
    assert!(run.join("sweep.svg").exists() && run.join("report.html").exists());
    let steps = json["steps"].as_array().unwrap();
    assert_eq!(
        steps
            .iter()
            .map(|s| s["users"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [200, 1000]
    );
    for s in steps {
        // Read from the service's own /proc entry, not the harness's.
        assert!(s["rss_pending_mb"].as_f64().unwrap() > 1.0, "{s}");
        assert!(
            s["peak_rss_mb"].as_f64() >= s["rss_pending_mb"].as_f64(),
            "{s}"
        );
        assert!(s["cpu_us_per_change"].as_f64().unwrap() > 0.0, "{s}");
    }
    assert!(stdout.contains("spread (max − min) / mean"), "{stdout}");
}
