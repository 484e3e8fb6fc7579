//! `datasync-load`: the load-test harness.
//!
//! Runs a scenario (`config/load/*.toml`) against a stack (the local one by
//! default; endpoints through `DATASYNC__…` variables as for the service) and
//! measures, in one run and on the same data:
//! 1. each backend's raw ceiling (Redis pipelined GETs, broker produce, MongoDB
//!    bulk upserts);
//! 2. the seed's per-user loop (seed 000), end to end and producer side alone;
//! 3. datasync's publish stage alone (flags → Kafka ack → flags cleared);
//! 4. datasync end to end (flag → applied in MongoDB), driven the way the
//!    upstream does it, with latency, per-stage rates, RSS and CPU.
//!
//! Output: a console summary plus `report.json`, `throughput.svg`,
//! `latency.svg` and a self-contained `report.html` under `--out`.

mod baseline;
mod ceilings;
mod report;
mod scenario;

use anyhow::{Context, bail};
use clap::Parser;
use datasync::{Config, Engine, ProfileWrite, clients::redis::RedisStore, telemetry::Latency};
use fred::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use mongodb::bson::doc;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use report::{PublishOnly, Report, Run, Sample};
use scenario::Scenario;
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

#[derive(Parser)]
#[command(name = "datasync-load", about = "Load-test harness for datasync")]
struct Cli {
    /// A scenario file, e.g. config/load/smoke.toml.
    scenario: PathBuf,
    /// Where the report files go (a folder per run is made inside).
    #[arg(long, default_value = "target/load")]
    out: PathBuf,
    /// Skip the raw backend ceilings.
    #[arg(long)]
    skip_ceilings: bool,
    /// Skip the seed baseline loop.
    #[arg(long)]
    skip_baseline: bool,
}

/// Per-second rate of `n` operations in `d`.
pub fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// Deterministic filler of about `bytes` characters.
pub fn padding(bytes: usize, seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..bytes)
        .map(|_| rng.random_range(b'a'..=b'z') as char)
        .collect()
}

fn engine_config(sc: &Scenario, ns: &str, index: u32) -> anyhow::Result<Config> {
    let mut layers = vec![
        (
            "load defaults".to_string(),
            "[sync]\ninterval = \"0s\"\n[http]\nenabled = false\n[kafka]\nsession_timeout = \"6s\"\n".to_string(),
        ),
        ("scenario [engine]".to_string(), toml::to_string(&sc.engine)?),
    ];
    let mode = if sc.instances > 1 { "fixed" } else { "all" };
    layers.push((
        "namespace".to_string(),
        format!(
            "[instance]\nid = \"{ns}-{index}\"\nmode = \"{mode}\"\nindex = {index}\ntotal = {total}\n\
             [redis]\nkey_prefix = \"{ns}\"\nprofile_key = \"{ns}:user:{{id}}:profile\"\nlegacy_dirty_set = \"{ns}:legacy\"\n\
             [kafka]\nstatic_topic = \"{ns}-static\"\ndynamic_topic = \"{ns}-dynamic\"\ndlq_topic = \"{ns}-dlq\"\n\
             consumer_group = \"{ns}-applier\"\n[mongo]\ndatabase = \"datasync_load\"\ncollection = \"{ns}\"\n",
            total = sc.instances
        ),
    ));
    Config::from_layers(&layers, std::env::vars()).map_err(|e| anyhow::anyhow!("{e}"))
}

fn proc_stats() -> (f64, f64) {
    let rss_kb = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0);
    let cpu_ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .unwrap_or(0.0);
    (rss_kb / 1024.0, cpu_ticks / 100.0)
}

async fn start_engines(sc: &Scenario, ns: &str, applier: bool) -> anyhow::Result<Vec<Engine>> {
    let mut engines = Vec::new();
    for i in 0..sc.instances {
        let mut c = engine_config(sc, ns, i)?;
        c.applier.enabled = applier;
        engines.push(Engine::start(c).await.context("starting an engine")?);
    }
    Ok(engines)
}

async fn pending(engines: &[Engine], redis: &RedisStore) -> anyhow::Result<u64> {
    let mut n = 0;
    for e in engines {
        n += e.pending_flags().await?;
    }
    let legacy: u64 = redis.client().scard(redis.keys().legacy()).await?;
    let draining: u64 = redis.client().scard(redis.keys().legacy_draining()).await?;
    Ok(n + legacy + draining)
}

/// The publish stage alone: flags are set up first, then engines without an
/// applier drain them; timed from start to no flag left.
async fn publish_only(sc: &Scenario, ns: &str) -> anyhow::Result<PublishOnly> {
    let ns = format!("{ns}-pub");
    let config = engine_config(sc, &ns, 0)?;
    let redis = RedisStore::connect(&config.redis, config.sync.shards).await?;
    let users: Vec<String> = (0..sc.publish_only_users)
        .map(|i| format!("p{i}"))
        .collect();
    for (n, chunk) in users.chunks(1000).enumerate() {
        let w: Vec<(String, String)> = chunk
            .iter()
            .map(|u| {
                (
                    u.clone(),
                    serde_json::json!({ "pad": padding(sc.profile_bytes, n as u64) }).to_string(),
                )
            })
            .collect();
        redis.write_profiles(&w).await?;
        redis.mark(chunk).await?;
    }
    let started = Instant::now();
    let engines = start_engines(sc, &ns, false).await?;
    let deadline = started + Duration::from_secs(sc.timeout_secs);
    while pending(&engines, &redis).await? > 0 {
        if Instant::now() > deadline {
            bail!(
                "publish-only phase did not drain within {}s",
                sc.timeout_secs
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    for e in &engines {
        e.shutdown(Duration::from_secs(30)).await;
    }
    Ok(PublishOnly {
        users: users.len(),
        seconds,
        flags_per_s: users.len() as f64 / seconds,
    })
}

fn sum_stats(engines: &[Engine]) -> datasync::telemetry::StatsSnapshot {
    let mut total = datasync::telemetry::StatsSnapshot::default();
    for e in engines {
        total += e.stats();
    }
    total
}

/// The end-to-end run.
async fn end_to_end(sc: &Scenario, ns: &str) -> anyhow::Result<Run> {
    let engines = start_engines(sc, ns, true).await?;
    let redis = engines[0].redis().clone();
    let mongo = engines[0].mongo().clone();

    // Warm-up: the consumer group's first join is not part of the measurement.
    let warm: Vec<ProfileWrite> = (0..64)
        .map(|i| ProfileWrite {
            user_id: format!("warm{i}"),
            profile: serde_json::json!({}),
        })
        .collect();
    engines[0].write_and_mark(&warm).await?;
    let warm_deadline = Instant::now() + Duration::from_secs(120);
    while sum_stats(&engines).events_applied < 64 {
        if Instant::now() > warm_deadline {
            bail!("warm-up changes were not applied within 120s; is the stack up?");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = sum_stats(&engines);
    let mut hist_before = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)?;
    for e in &engines {
        hist_before.add(e.latency_histogram())?;
    }

    let total = (sc.users * sc.rounds) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} synced {msg}",
    )?);
    let started = Instant::now();
    let (_, cpu0) = proc_stats();
    let mut rng = StdRng::seed_from_u64(sc.seed);
    let pad = padding(sc.profile_bytes, sc.seed);

    let driver = {
        let engine = engines[0].clone();
        let redis = redis.clone();
        let (users, rounds, legacy_share, rate) = (sc.users, sc.rounds, sc.legacy_share, sc.rate);
        let mut order: Vec<usize> = (0..users).collect();
        let mut plan = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            order.shuffle(&mut rng);
            let legacy: Vec<bool> = order
                .iter()
                .map(|_| rng.random_bool(legacy_share))
                .collect();
            plan.push((order.clone(), legacy));
        }
        tokio::spawn(async move {
            let mut sent = 0u64;
            for (round, (order, legacy)) in plan.into_iter().enumerate() {
                for (chunk, flags) in order.chunks(500).zip(legacy.chunks(500)) {
                    if rate > 0 {
                        let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let mut api = Vec::new();
                    let mut old = Vec::new();
                    for (&u, &is_legacy) in chunk.iter().zip(flags) {
                        let p = serde_json::json!({ "round": round as i64 + 1, "user": u, "pad": &pad });
                        if is_legacy {
                            old.push((format!("u{u}"), p.to_string()));
                        } else {
                            api.push(ProfileWrite {
                                user_id: format!("u{u}"),
                                profile: p,
                            });
                        }
                    }
                    if !api.is_empty() {
                        engine.write_and_mark(&api).await?;
                    }
                    if !old.is_empty() {
                        redis.write_profiles(&old).await?;
                        let ids: Vec<String> = old.into_iter().map(|(u, _)| u).collect();
                        let _: i64 = redis.client().sadd(redis.keys().legacy(), ids).await?;
                    }
                    sent += chunk.len() as u64;
                }
            }
            anyhow::Ok(sent)
        })
    };

    let mut samples = Vec::new();
    let deadline = started + Duration::from_secs(sc.timeout_secs);
    let mut last_sample = Instant::now() - Duration::from_secs(1);
    let mut driver = Some(driver);
    let mut failures = Vec::new();
    loop {
        if let Some(d) = &driver
            && d.is_finished()
        {
            if let Err(e) = driver.take().expect("present").await? {
                failures.push(format!("driver: {e}"));
                break;
            }
        }
        let s = sum_stats(&engines);
        let consumed = s.events_applied + s.stale_skipped + s.poison_events + s.apply_failures;
        let done_applied = s.events_applied - before.events_applied;
        bar.set_position((done_applied).min(total));
        bar.set_message(format!(
            "published {} applied {}",
            s.events_published - before.events_published,
            done_applied
        ));
        if last_sample.elapsed() >= Duration::from_millis(500) {
            last_sample = Instant::now();
            let (rss, _) = proc_stats();
            samples.push(Sample {
                t_s: started.elapsed().as_secs_f64(),
                marked: s.flags_marked - before.flags_marked,
                scanned: s.flags_scanned - before.flags_scanned,
                published: s.events_published - before.events_published,
                applied: done_applied,
                rss_mb: rss,
                cpu_percent: 0.0,
            });
        }
        if driver.is_none()
            && consumed >= s.events_published
            && pending(&engines, &redis).await? == 0
        {
            // Everything flagged was published and everything published consumed.
            let again = sum_stats(&engines);
            if again.events_published == s.events_published {
                break;
            }
        }
        if Instant::now() > deadline {
            failures.push(format!("did not drain within {}s", sc.timeout_secs));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (rss, cpu1) = proc_stats();
    bar.finish_and_clear();
    samples.push(Sample {
        t_s: seconds,
        marked: sum_stats(&engines).flags_marked - before.flags_marked,
        applied: sum_stats(&engines).events_applied - before.events_applied,
        published: sum_stats(&engines).events_published - before.events_published,
        scanned: sum_stats(&engines).flags_scanned - before.flags_scanned,
        rss_mb: rss,
        cpu_percent: 0.0,
    });
    let after = sum_stats(&engines);

    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)?;
    for e in &engines {
        hist.add(e.latency_histogram())?;
    }
    hist.subtract(&hist_before)?;
    let step = (hist.max() / 50).max(1);
    let latency_buckets = hist
        .iter_linear(step)
        .map(|v| (v.value_iterated_to(), v.count_since_last_iteration()))
        .collect();

    let documents = mongo
        .collection()
        .count_documents(doc! { "userId": { "$regex": "^u" } })
        .await?;
    let last_round = mongo
        .collection()
        .count_documents(doc! { "dynamicProfile.round": sc.rounds as i64 })
        .await?;
    for (what, n) in [
        ("load failures", after.load_failures - before.load_failures),
        (
            "publish failures",
            after.publish_failures - before.publish_failures,
        ),
        ("poison events", after.poison_events - before.poison_events),
        (
            "apply failures",
            after.apply_failures - before.apply_failures,
        ),
    ] {
        if n > 0 {
            failures.push(format!("{n} {what}"));
        }
    }
    for e in &engines {
        e.shutdown(Duration::from_secs(30)).await;
    }
    Ok(Run {
        changes: total,
        seconds,
        changes_per_s: total as f64 / seconds,
        events_published: after.events_published - before.events_published,
        events_applied: after.events_applied - before.events_applied,
        stale_or_superseded: after.stale_skipped - before.stale_skipped,
        already_applied_skips: after.already_applied - before.already_applied,
        failures,
        latency: Latency::summarize(&hist),
        latency_buckets,
        peak_rss_mb: samples.iter().map(|s| s.rss_mb).fold(0.0, f64::max),
        mean_cpu_percent: (cpu1 - cpu0) / seconds * 100.0,
        documents,
        verified: documents == sc.users as u64 && last_round == sc.users as u64,
        samples,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    datasync::telemetry::init_logging("text", "warn");
    let sc = Scenario::load(&cli.scenario)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let ns = format!("load-{}-{stamp}", sc.name);
    let config = engine_config(&sc, &ns, 0)?;
    let mut report = Report {
        scenario: sc.clone(),
        namespace: ns.clone(),
        ..Default::default()
    };

    if !cli.skip_ceilings && sc.ceiling_ops > 0 {
        eprintln!("measuring backend ceilings ({} ops each)…", sc.ceiling_ops);
        report.ceilings = Some(ceilings::measure(&config, sc.ceiling_ops, sc.profile_bytes).await?);
    }
    if !cli.skip_baseline && sc.baseline_users > 0 {
        eprintln!(
            "running the seed baseline loop ({} users)…",
            sc.baseline_users
        );
        report.baseline = Some(baseline::run(&config, sc.baseline_users, sc.profile_bytes).await?);
    }
    if sc.publish_only_users > 0 {
        eprintln!("publish stage alone ({} flags)…", sc.publish_only_users);
        report.publish_only = Some(publish_only(&sc, &ns).await?);
    }
    eprintln!("end to end: {} users × {} rounds…", sc.users, sc.rounds);
    report.run = end_to_end(&sc, &ns).await?;
    report.compute_ratios();

    let dir = cli.out.join(&ns);
    report.write(&dir)?;
    print!("{}", report.console());
    println!("report: {}", dir.join("report.html").display());
    if !report.run.verified || !report.run.failures.is_empty() {
        bail!("the run did not end with every change applied");
    }
    Ok(())
}
