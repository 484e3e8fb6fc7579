//! The chaos soak (`mode = "chaos"`, e.g. `config/load/chaos.toml`).
//!
//! Starts servers of its own (Redis with the append-only file on, a
//! MongoDB-wire server, a broker) and `instances` `datasync run` services
//! sharing shards by lease; drives a steady workload at them
//! ([`workload`]); lets a nemesis inject faults on a schedule drawn from the
//! seed ([`nemesis`]); and checks, during the soak and at its end, that no
//! version went down and that every acknowledged change is in MongoDB
//! ([`checker`]). The report (console, `report.json`, `report.html` with the
//! faults shaded on the throughput chart) says what was injected, how long
//! each recovery took and what the invariants found; the run fails on any
//! violation.

mod checker;
mod nemesis;
pub mod processes;
mod report;
mod workload;

use crate::{scenario::Scenario, target::wait_ready};
use anyhow::Context;
use checker::{Checker, Violations};
use datasync::{
    Config,
    clients::{mongo::MongoStore, redis::RedisStore},
};
use processes::{Proc, Servers, datasync_bin, free_port};
use report::ChaosReport;
use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;
use workload::{Apis, History, Rates};

/// One service's configuration file: the soak's settings, then the
/// scenario's `[engine]` table over them.
fn service_config(
    sc: &Scenario,
    servers: &Servers,
    index: usize,
    http_port: u16,
) -> anyhow::Result<String> {
    let c = sc.chaos.as_ref().context("a [chaos] table")?;
    let base = format!(
        r#"
[instance]
id = "chaos-{index}"
mode = "lease"
[lease]
ttl = "{ttl}ms"
[redis]
url = "redis://127.0.0.1:{redis}"
key_prefix = "chaos"
[kafka]
brokers = "127.0.0.1:{broker}"
session_timeout = "6s"
[mongo]
url = "mongodb://127.0.0.1:{mongo}/?retryWrites=false&serverSelectionTimeoutMS=5000"
database = "datasync_chaos"
[sync]
interval = "500ms"
shards = 16
[applier]
window_max_wait = "50ms"
[http]
bind = "127.0.0.1:{http_port}"
[consistency]
interval = "0s"
[telemetry]
backlog_interval = "1s"
log_filter = "warn,datasync=info"
"#,
        ttl = (c.lease_ttl_secs * 1000.0) as u64,
        redis = servers.redis_port,
        broker = servers.broker_port,
        mongo = servers.mongo_port,
    );
    let mut table: toml::Table = base.parse()?;
    datasync::config::merge(&mut table, sc.engine.clone());
    Ok(toml::to_string(&table)?)
}

/// What is left in Redis: flags, legacy members and pending immediate
/// changes. A flag or pending change whose user has an open dead letter of
/// that section is left *with a reason* (the dead letter names its error: a
/// flag on a missing profile, for one); any other is left without one.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Leftovers {
    pub without_reason: Violations,
    pub with_dead_letter: Violations,
    pub legacy: u64,
    pub dead_letters: u64,
    pub dead_letters_without_reason: Violations,
}

impl Leftovers {
    pub fn clean(&self) -> bool {
        self.without_reason.count == 0
            && self.legacy == 0
            && self.dead_letters_without_reason.count == 0
    }
}

async fn left_in_redis(redis: &RedisStore) -> anyhow::Result<Leftovers> {
    let dlq = datasync::actors::dlq::list(redis, 100_000).await?;
    let mut left = Leftovers {
        legacy: redis.legacy_pending().await?,
        dead_letters: dlq.open,
        ..Default::default()
    };
    let mut explained = std::collections::HashSet::new();
    for e in &dlq.entries {
        if e.error.trim().is_empty() {
            left.dead_letters_without_reason
                .add(format!("{} v{} ({})", e.user_id, e.version, e.stage));
        } else {
            // A delete's dead letter is its user's dynamic one.
            let section = if e.sync_type == "static" {
                "static"
            } else {
                "dynamic"
            };
            explained.insert((e.user_id.clone(), section));
        }
    }
    let mut sort = |user: &str, section: &'static str, version: i64| {
        let what = format!("{section} {user} v{version}");
        if explained.contains(&(user.to_string(), section)) {
            left.with_dead_letter.add(what);
        } else {
            left.without_reason.add(what);
        }
    };
    for shard in 0..redis.shards() {
        for (user, version) in redis.read_flags(shard, None, 100_000).await? {
            sort(&user, "dynamic", version);
        }
        for p in redis.static_pending(shard).await? {
            sort(&p.user_id, "static", p.version);
        }
    }
    Ok(left)
}

pub async fn run(sc: &Scenario, out: &Path) -> anyhow::Result<()> {
    let chaos = sc.chaos.clone().context("a [chaos] table")?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let ns = format!("load-{}-{stamp}", sc.name);
    let dir = std::path::absolute(out.join(&ns))?;
    let stack = dir.join("stack");
    std::fs::create_dir_all(&stack)?;
    eprintln!("chaos: servers and logs under {}", stack.display());
    let mut servers = Servers::start(&stack).await?;

    // The services.
    let bin = datasync_bin()?;
    let mut services = Vec::new();
    let mut apis = Vec::new();
    let mut first_config = String::new();
    for i in 0..sc.instances as usize {
        let port = free_port()?;
        let text = service_config(sc, &servers, i, port)?;
        let path = stack.join(format!("datasync-{i}.toml"));
        std::fs::write(&path, &text)?;
        if i == 0 {
            first_config = text;
        }
        let mut p = Proc::new(
            &format!("datasync-{i}"),
            &bin,
            &[
                "run".into(),
                "--config".into(),
                path.to_string_lossy().into(),
            ],
            &stack,
        );
        p.start()?;
        services.push(p);
        apis.push(format!("http://127.0.0.1:{port}"));
    }
    let config = Config::from_layers(&[("chaos".into(), first_config)], std::iter::empty())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let probe = reqwest::Client::new();
    for api in &apis {
        wait_ready(&probe, api).await?;
    }
    let redis = RedisStore::connect(&config.redis, config.sync.shards).await?;
    let mongo = MongoStore::connect(&config.mongo, "datasync-chaos").await?;

    // The soak: workload, sampler and nemesis together.
    let soak = Duration::from_secs(sc.duration_secs.unwrap_or(60));
    let mut faults = nemesis::schedule(&chaos, sc.seed, soak.as_secs_f64(), sc.instances as usize);
    eprintln!(
        "chaos: seed {}, {} faults over {}s, {} services",
        sc.seed,
        faults.len(),
        soak.as_secs(),
        sc.instances
    );
    let history = Arc::new(Mutex::new(History::new(sc.users)));
    let checker = Arc::new(tokio::sync::Mutex::new(Checker::new(mongo.collection())));
    let t0 = Instant::now();
    let stop_driving = CancellationToken::new();
    let driver = tokio::spawn(workload::drive(
        history.clone(),
        Apis::new(apis.clone())?,
        redis.clone(),
        Rates {
            changes: sc.rate.per_s() as f64,
            legacy_share: sc.legacy_share,
            immediate: sc.immediate_rate as f64,
            deletes: chaos.delete_rate,
        },
        sc.seed,
        stop_driving.clone(),
    ));
    let stop_sampling = CancellationToken::new();
    let sampler = {
        let (checker, history, stop) = (checker.clone(), history.clone(), stop_sampling.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !stop.is_cancelled() {
                tick.tick().await;
                let t = t0.elapsed().as_secs_f64();
                checker.lock().await.sample(t, &history).await;
            }
        })
    };
    for (i, f) in faults.iter_mut().enumerate() {
        tokio::time::sleep_until((t0 + Duration::from_secs_f64(f.planned_at_s)).into()).await;
        let target = f
            .instance
            .map(|n| format!(" datasync-{n}"))
            .unwrap_or_default();
        eprintln!(
            "chaos: {:>6.1}s fault {}/{}: {}{target} for {:.1}s",
            t0.elapsed().as_secs_f64(),
            i + 1,
            sc.chaos
                .as_ref()
                .map_or(0, |c| c.faults_per_kind * c.kinds.len()),
            f.kind.name(),
            f.planned_secs
        );
        match nemesis::inject(f, &mut servers, &mut services, t0).await {
            Ok(()) => {
                let end = f.end_s.unwrap_or_default();
                eprintln!("chaos: {end:>6.1}s healed: {}{target}", f.kind.name());
                let h = history.lock().expect("history").clone();
                checker.lock().await.await_recovery(i, end, &h);
            }
            Err(e) => {
                eprintln!("chaos: fault {} failed: {e:#}", f.kind.name());
                f.error = Some(format!("{e:#}"));
            }
        }
    }
    tokio::time::sleep_until((t0 + soak).into()).await;
    stop_driving.cancel();
    driver.await?;
    let soak_secs = t0.elapsed().as_secs_f64();
    eprintln!("chaos: {soak_secs:.1}s soak over; draining");

    // The drain: until nothing is left in Redis and every acknowledged
    // change is in MongoDB, or the timeout.
    let drain_started = Instant::now();
    let deadline = drain_started + Duration::from_secs(sc.timeout_secs);
    let drained = loop {
        let clean = left_in_redis(&redis).await.is_ok_and(|l| l.clean());
        let end = {
            let h = history.lock().expect("history").clone();
            checker.lock().await.end_state(&h).await.ok()
        };
        if clean && end.is_some_and(|e| e.ok()) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let drain_secs = drain_started.elapsed().as_secs_f64();
    // One more sample, so a recovery that finished with the drain counts.
    checker
        .lock()
        .await
        .sample(t0.elapsed().as_secs_f64(), &history)
        .await;
    stop_sampling.cancel();
    sampler.await?;

    let h = history.lock().expect("history").clone();
    let checker = checker.lock().await;
    for &(i, secs) in &checker.recovered {
        faults[i].recovery_s = Some(secs);
    }
    let end_state = checker.end_state(&h).await?;
    let left = left_in_redis(&redis).await?;
    let report = ChaosReport {
        scenario: sc.clone(),
        namespace: ns.clone(),
        soak_secs,
        drain_secs,
        drained,
        faults,
        counts: h.counts,
        regressions: checker.regressions.clone(),
        end_state,
        left,
        failed_samples: checker.failed_samples,
        points: checker.points.clone(),
    };
    report.write(&dir)?;
    print!("{}", report.console());
    println!("report: {}", dir.join("report.html").display());
    for s in &mut services {
        s.terminate(Duration::from_secs(10)).await;
    }
    anyhow::ensure!(
        report.ok(),
        "the chaos soak found violations (see the report)"
    );
    Ok(())
}
