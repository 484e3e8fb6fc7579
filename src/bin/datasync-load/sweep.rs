//! The scale sweep (`mode = "sweep"`, `config/load/sweep.toml`): does the
//! service's memory stay flat, and its cost per change stay the same, from
//! ten thousand users to a million?
//!
//! For each step, that many profiles are written and flagged on the shared
//! stack first (so every flag is pending when the service starts), then one
//! `datasync run` process of the harness's own drains them, end to end or
//! through the publish stage alone (`[sweep] applier`). Its resident memory
//! and CPU time are read from `/proc/<pid>` every 100 ms, so nothing of the
//! harness's own memory (the setup's buffers) is counted.

use crate::{
    chaos::processes::{Proc, datasync_bin, free_port},
    namespace_names,
    report::{draw_legend, draw_lines, html_page},
    scenario::Scenario,
    target::wait_ready,
    write_and_flag,
};
use anyhow::{Context, bail};
use datasync::{Config, clients::redis::RedisStore, telemetry::ProcessUsage};
use plotters::prelude::*;
use serde::Serialize;
use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

/// One step of the sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub users: usize,
    pub seconds: f64,
    pub changes_per_s: f64,
    /// The service's RSS once ready, every flag pending.
    pub rss_pending_mb: f64,
    /// Its peak RSS while draining.
    pub peak_rss_mb: f64,
    /// Its RSS once drained.
    pub rss_drained_mb: f64,
    /// The service's CPU time (all its threads) per change, from ready to drained.
    pub cpu_us_per_change: f64,
    /// The service's CPU use once drained and idle (its polls, timers and
    /// samplers), in percent of one core.
    pub idle_cpu_percent: f64,
    /// `cpu_us_per_change` less the idle use over the drain: what the
    /// changes themselves cost, without the fixed cost of running, which
    /// weighs most on the smallest step.
    pub net_cpu_us_per_change: f64,
}

#[derive(Debug, Clone, Serialize)]
struct SweepReport {
    scenario: Scenario,
    namespace: String,
    applier: bool,
    steps: Vec<Step>,
    /// (max − min) / mean over the steps, in percent.
    peak_rss_spread_pct: f64,
    cpu_us_spread_pct: f64,
    net_cpu_us_spread_pct: f64,
}

fn spread_pct(v: impl Iterator<Item = f64> + Clone) -> f64 {
    let n = v.clone().count().max(1) as f64;
    let mean = v.clone().sum::<f64>() / n;
    let (lo, hi) = v.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    if mean > 0.0 {
        (hi - lo) / mean * 100.0
    } else {
        0.0
    }
}

/// The service's configuration file for one step: the harness's names for
/// the step, the endpoints of the harness's own configuration, then the
/// scenario's `[engine]` table over them.
fn service_config(
    sc: &Scenario,
    config: &Config,
    ns: &str,
    applier: bool,
    port: u16,
) -> anyhow::Result<String> {
    let settings = format!(
        "[instance]\nid = \"{ns}\"\nmode = \"all\"\n\
         [redis]\nurl = {redis}\n[kafka]\nbrokers = {brokers}\nsession_timeout = \"6s\"\n\
         [mongo]\nurl = {mongo}\n[sync]\ninterval = \"0s\"\n[applier]\nenabled = {applier}\n\
         [http]\nbind = \"127.0.0.1:{port}\"\n[consistency]\ninterval = \"0s\"\n\
         [telemetry]\nlog_filter = \"warn\"\n",
        redis = toml::Value::String(config.redis.url.expose().to_string()),
        brokers = toml::Value::String(config.kafka.brokers.clone()),
        mongo = toml::Value::String(config.mongo.url.expose().to_string()),
    );
    let mut table: toml::Table = namespace_names(ns).parse()?;
    datasync::config::merge(&mut table, settings.parse()?);
    datasync::config::merge(&mut table, sc.engine.clone());
    Ok(toml::to_string(&table)?)
}

/// Flags left plus, end to end, changes not yet applied.
async fn left(
    redis: &RedisStore,
    http: &reqwest::Client,
    api: &str,
    users: usize,
    applier: bool,
) -> anyhow::Result<u64> {
    let flags = crate::pending(redis).await?;
    if !applier {
        return Ok(flags);
    }
    let v: serde_json::Value = http
        .get(format!("{api}/v1/stats"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let applied = v["engine"]["events_applied"].as_u64().unwrap_or(0);
    Ok(flags + (users as u64).saturating_sub(applied))
}

async fn step(
    sc: &Scenario,
    config: &Config,
    run_ns: &str,
    users: usize,
    applier: bool,
    logs: &Path,
) -> anyhow::Result<Step> {
    let ns = format!("{run_ns}-{users}");
    let port = free_port()?;
    let text = service_config(sc, config, &ns, applier, port)?;
    // The service's own configuration says where its keys and documents are.
    let service_side = Config::from_layers(&[("sweep".into(), text.clone())], std::iter::empty())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let redis = RedisStore::connect(&service_side.redis, service_side.sync.shards).await?;
    eprintln!("sweep: writing and flagging {users} users…");
    write_and_flag(&redis, "w", users, sc.profile_bytes).await?;

    let path = logs.join(format!("datasync-{users}.toml"));
    std::fs::write(&path, text)?;
    let mut service = Proc::new(
        &format!("datasync-{users}"),
        datasync_bin()?,
        &[
            "run".into(),
            "--config".into(),
            path.to_string_lossy().into(),
        ],
        logs,
    );
    service.start()?;
    let pid = service.pid().context("the service has no pid")?;
    let api = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    wait_ready(&http, &api).await?;
    // Scanning began at start; the figures start at ready, with the pages
    // already in flight counted as drained work.
    let at_ready = usage_of(pid)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(sc.timeout_secs);
    let mut peak = at_ready.rss_mb;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        peak = peak.max(usage_of(pid)?.rss_mb);
        if left(&redis, &http, &api, users, applier).await? == 0 {
            break;
        }
        if Instant::now() > deadline {
            service.terminate(Duration::from_secs(10)).await;
            bail!("{users} users did not drain within {}s", sc.timeout_secs);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let end = usage_of(pid)?;
    tokio::time::sleep(IDLE_SAMPLE).await;
    let idle = usage_of(pid)?;
    let idle_cpu_per_s = (idle.cpu_seconds - end.cpu_seconds) / IDLE_SAMPLE.as_secs_f64();
    service.terminate(Duration::from_secs(30)).await;
    if applier {
        // The applied counter is the service's word; the documents are the proof.
        let docs =
            datasync::clients::mongo::MongoStore::connect(&service_side.mongo, "datasync-load")
                .await?
                .collection()
                .count_documents(mongodb::bson::doc! {})
                .await?;
        anyhow::ensure!(
            docs == users as u64,
            "{users} users drained but {docs} documents in {ns}"
        );
    }
    let s = Step {
        users,
        seconds,
        changes_per_s: users as f64 / seconds,
        rss_pending_mb: at_ready.rss_mb,
        peak_rss_mb: peak.max(end.rss_mb),
        rss_drained_mb: end.rss_mb,
        cpu_us_per_change: (end.cpu_seconds - at_ready.cpu_seconds) * 1e6 / users as f64,
        idle_cpu_percent: idle_cpu_per_s * 100.0,
        net_cpu_us_per_change: (end.cpu_seconds - at_ready.cpu_seconds - idle_cpu_per_s * seconds)
            .max(0.0)
            * 1e6
            / users as f64,
    };
    eprintln!("{}", line(&s));
    Ok(s)
}

fn usage_of(pid: u32) -> anyhow::Result<ProcessUsage> {
    datasync::telemetry::process_usage_of(&pid.to_string())
        .with_context(|| format!("reading /proc/{pid} (the service exited? see its log)"))
}

fn line(s: &Step) -> String {
    format!(
        "{:>9} users  {:>7.1}s  {:>8.0}/s  RSS pending {:>5.1} MB  peak {:>5.1} MB  drained {:>5.1} MB  {:>6.2} CPU-µs/change ({:.2} net of {:.1} % idle)",
        s.users,
        s.seconds,
        s.changes_per_s,
        s.rss_pending_mb,
        s.peak_rss_mb,
        s.rss_drained_mb,
        s.cpu_us_per_change,
        s.net_cpu_us_per_change,
        s.idle_cpu_percent
    )
}

pub async fn run(sc: &Scenario, config: &Config, ns: &str, out: &Path) -> anyhow::Result<()> {
    let sweep = sc.sweep.clone().context("a [sweep] table")?;
    let dir = out.join(ns);
    std::fs::create_dir_all(&dir)?;
    let mut steps = Vec::new();
    for &users in &sweep.steps {
        steps.push(step(sc, config, ns, users, sweep.applier, &dir).await?);
    }
    let report = SweepReport {
        scenario: sc.clone(),
        namespace: ns.to_string(),
        applier: sweep.applier,
        peak_rss_spread_pct: spread_pct(steps.iter().map(|s| s.peak_rss_mb)),
        cpu_us_spread_pct: spread_pct(steps.iter().map(|s| s.cpu_us_per_change)),
        net_cpu_us_spread_pct: spread_pct(steps.iter().map(|s| s.net_cpu_us_per_change)),
        steps,
    };
    let mut summary = format!(
        "== datasync-load: {} ({ns}), {}\n",
        sc.name,
        if sweep.applier {
            "end to end"
        } else {
            "publish stage only"
        }
    );
    for s in &report.steps {
        let _ = writeln!(summary, "{}", line(s));
    }
    let _ = writeln!(
        summary,
        "spread (max − min) / mean: peak RSS {:.1} %, CPU-µs per change {:.1} % ({:.1} % net of idle)",
        report.peak_rss_spread_pct, report.cpu_us_spread_pct, report.net_cpu_us_spread_pct
    );
    print!("{summary}");
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    chart(&report.steps, &dir.join("sweep.svg"))?;
    let svg = std::fs::read_to_string(dir.join("sweep.svg"))?;
    std::fs::write(
        dir.join("report.html"),
        html_page(
            &format!("datasync-load: {}", sc.name),
            &summary,
            &format!("<h2>Memory and cost per change by scale</h2>{svg}"),
            sc,
        ),
    )?;
    println!("report: {}", dir.join("report.html").display());
    Ok(())
}

/// How long a drained service is watched to measure its idle CPU use.
const IDLE_SAMPLE: Duration = Duration::from_secs(3);

/// Peak RSS (MB) and CPU-µs per change against users (log10 axis).
fn chart(steps: &[Step], path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let log = |n: usize| (n.max(1) as f64).log10();
    let lo = steps.iter().map(|s| log(s.users)).fold(f64::MAX, f64::min);
    let hi = steps.iter().map(|s| log(s.users)).fold(1.0, f64::max);
    let top = steps
        .iter()
        .flat_map(|s| [s.peak_rss_mb, s.rss_pending_mb, s.cpu_us_per_change])
        .fold(1.0, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "service RSS (MB) and CPU-µs per change, by users",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(lo.min(hi) - 0.2..hi + 0.2, 0.0..top)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{:.0}", 10f64.powf(*x)))
        .x_desc("users (flags pending at start)")
        .y_desc("MB / µs")
        .draw()?;
    let series = |f: fn(&Step) -> f64| -> Vec<(f64, f64)> {
        steps.iter().map(|s| (log(s.users), f(s))).collect()
    };
    draw_lines(
        &mut chart,
        [
            ("peak RSS (MB)", series(|s| s.peak_rss_mb), BLUE),
            ("RSS pending (MB)", series(|s| s.rss_pending_mb), GREEN),
            ("CPU-µs per change", series(|s| s.cpu_us_per_change), RED),
            (
                "CPU-µs per change, net of idle",
                series(|s| s.net_cpu_us_per_change),
                MAGENTA,
            ),
        ],
    )?;
    draw_legend(&mut chart)?;
    root.present()?;
    Ok(())
}
