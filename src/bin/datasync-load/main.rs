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
//! A scenario in `chaos` mode runs the chaos soak instead (see [`chaos`]).
//!
//! Output: a console summary plus `report.json`, `throughput.svg`,
//! `latency.svg` and a self-contained `report.html` under `--out`.

mod baseline;
mod ceilings;
mod chaos;
mod cleanup;
mod phases;
mod report;
mod scenario;
mod servers;
mod sweep;
mod target;

/// mimalloc, as the service uses (see `src/main.rs`), so the embedded
/// engines are measured on the allocator the service runs on.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, bail};
use clap::Parser;
use datasync::{
    Config, Engine, ProfileWrite,
    clients::{mongo::MongoStore, redis::RedisStore},
    telemetry::Latency,
};
use fred::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use mongodb::bson::doc;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use report::{ImmediateRun, Marking, PublishOnly, Report, Run, Sample};
use scenario::Scenario;
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};
use target::{Target, wait_ready};

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
    /// Remove the run's keys, topics, consumer groups and collections at the
    /// end (`--cleanup false` keeps them to look at).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    cleanup: bool,
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
    if sc.mode == "external" {
        // The running services own the names; the scenario's [engine] table says them.
        return Config::from_layers(&layers[1..], std::env::vars())
            .map_err(|e| anyhow::anyhow!("{e}"));
    }
    let mode = if sc.instances > 1 { "fixed" } else { "all" };
    layers.push((
        "namespace".to_string(),
        format!(
            "[instance]\nid = \"{ns}-{index}\"\nmode = \"{mode}\"\nindex = {index}\ntotal = {total}\n{names}",
            total = sc.instances,
            names = namespace_names(ns),
        ),
    ));
    let mut c =
        Config::from_layers(&layers, std::env::vars()).map_err(|e| anyhow::anyhow!("{e}"))?;
    // A PostgreSQL sink without a table of its own writes one named after
    // the run, which the cleanup drops.
    for s in &mut c.sinks {
        if s.kind == datasync::config::SinkKind::Postgres && s.table.is_empty() {
            s.table = pg_table(ns, &s.name);
        }
    }
    Ok(c)
}

/// Rows of a PostgreSQL sink whose user id matches `pattern`, and those of
/// them at `round`.
async fn pg_verify(
    sink: &datasync::config::SinkConfig,
    pattern: &str,
    round: i64,
) -> anyhow::Result<(u64, u64)> {
    let (client, conn) = tokio_postgres::connect(sink.url.expose(), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), count(*) FILTER (WHERE (dynamic_profile->>'round')::bigint = $2) \
                 FROM \"{}\" WHERE user_id ~ $1",
                sink.table()
            ),
            &[&pattern, &round],
        )
        .await?;
    Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
}

/// The table a run's PostgreSQL sink writes: the namespace as an identifier.
pub fn pg_table(ns: &str, sink: &str) -> String {
    format!("{ns}_{sink}").replace(['-', '.'], "_")
}

/// The keys, topics, consumer group and collection of a run's namespace, as
/// config TOML: everything the cleanup finds by the `ns` prefix.
pub fn namespace_names(ns: &str) -> String {
    format!(
        "[redis]\nkey_prefix = \"{ns}\"\nprofile_key = \"{ns}:user:{{id}}:profile\"\nlegacy_dirty_set = \"{ns}:legacy\"\n\
         [kafka]\nstatic_topic = \"{ns}-static\"\ndynamic_topic = \"{ns}-dynamic\"\ndlq_topic = \"{ns}-dlq\"\n\
         consumer_group = \"{ns}-applier\"\n[mongo]\ndatabase = \"datasync_load\"\ncollection = \"{ns}\"\n"
    )
}

/// Writes `users` profiles of about `profile_bytes` (ids `<prefix><i>`) and
/// flags them, a pipeline of 1,000 at a time.
pub async fn write_and_flag(
    redis: &RedisStore,
    prefix: &str,
    users: usize,
    profile_bytes: usize,
) -> anyhow::Result<()> {
    for (n, from) in (0..users).step_by(1000).enumerate() {
        let ids: Vec<String> = (from..users.min(from + 1000))
            .map(|i| format!("{prefix}{i}"))
            .collect();
        let profile = serde_json::json!({ "pad": padding(profile_bytes, n as u64) }).to_string();
        let writes: Vec<(String, String)> =
            ids.iter().map(|u| (u.clone(), profile.clone())).collect();
        redis.write_profiles(&writes).await?;
        redis.mark(&ids).await?;
    }
    Ok(())
}

async fn start_engines(sc: &Scenario, ns: &str, applier: bool) -> anyhow::Result<Vec<Engine>> {
    let mut engines = Vec::new();
    for i in 0..sc.instances {
        let mut c = engine_config(sc, ns, i)?;
        c.applier.enabled = applier;
        let engine = Engine::start(c).await.context("starting an engine")?;
        // The engine starts before Kafka and MongoDB answer; the run must not.
        anyhow::ensure!(
            engine.wait_for_backends(Duration::from_secs(120)).await,
            "kafka or mongodb did not answer within 120s: {:?}",
            engine.readiness().await.reasons
        );
        engines.push(engine);
    }
    Ok(engines)
}

/// Flags not yet published: every shard's, plus the legacy set's members
/// waiting or popped and not yet acknowledged.
async fn pending(redis: &RedisStore) -> anyhow::Result<u64> {
    let n = redis.count_flags(0..redis.shards()).await?;
    Ok(n + redis.legacy_pending().await?)
}

/// A plain Redis client of the harness's own, for what the seed's code does
/// with Redis directly (the seed baseline) and for raw ceilings.
pub async fn raw_redis(c: &datasync::config::RedisConfig) -> anyhow::Result<fred::clients::Client> {
    let client = Builder::from_config(fred::prelude::Config::from_url(c.url.expose())?).build()?;
    client.init().await?;
    Ok(client)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The HTTP clients (external and chaos modes) run on the same rustls
    // provider as the service.
    datasync::tls::ensure_provider();
    // fred warns of every connection the chaos soak breaks; its errors stay.
    datasync::telemetry::init_logging("text", "warn,fred=error");
    let sc = Scenario::load(&cli.scenario)?;
    if sc.mode == "chaos" {
        return chaos::run(&sc, &cli.out).await;
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let ns = format!("load-{}-{stamp}", sc.name);
    let config = engine_config(&sc, &ns, 0)?;
    let external = sc.mode == "external";
    let outcome = if sc.mode == "sweep" {
        sweep::run(&sc, &config, &ns, &cli.out).await
    } else {
        measure(&cli, sc, &ns, &config).await
    };
    if cli.cleanup && !external {
        match cleanup::run(&config, &ns).await {
            Ok(r) => eprintln!(
                "cleanup: removed {} keys, {} topics, {} collections and {} tables of {ns}",
                r.keys, r.topics, r.collections, r.tables
            ),
            Err(e) => eprintln!("cleanup of {ns} failed (the run's data stays): {e:#}"),
        }
    }
    outcome
}

/// Every phase of a measured run, then its report.
async fn measure(cli: &Cli, mut sc: Scenario, ns: &str, config: &Config) -> anyhow::Result<()> {
    let ns = ns.to_string();
    let config = config.clone();
    let mut report = Report {
        scenario: sc.clone(),
        namespace: ns.clone(),
        ..Default::default()
    };

    if !cli.skip_ceilings && sc.ceiling_ops > 0 {
        eprintln!("measuring backend ceilings ({} ops each)…", sc.ceiling_ops);
        report.ceilings = Some(
            ceilings::measure(
                &config,
                sc.ceiling_ops,
                sc.users,
                sc.rounds,
                sc.profile_bytes,
            )
            .await?,
        );
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
        report.publish_only = Some(phases::publish_only(&sc, &ns).await?);
    }
    if sc.rate == scenario::Rate::HalfPeak {
        // The peak first, in this run, on this machine: one round as fast as
        // the engine takes it; then the measured run at half of it.
        let mut peak_sc = sc.clone();
        peak_sc.rate = scenario::Rate::Max;
        peak_sc.rounds = 1;
        peak_sc.immediate_rate = 0;
        let peak_ns = format!("{ns}-peak");
        eprintln!("peak: {} users, as fast as possible…", sc.users);
        let peak =
            phases::end_to_end(&peak_sc, &peak_ns, &engine_config(&peak_sc, &peak_ns, 0)?).await?;
        sc.rate = scenario::Rate::Fixed((peak.changes_per_s / 2.0).max(1.0) as u64);
        sc.resolve_rounds();
        eprintln!(
            "peak {:.0} changes/s; running at {} changes/s",
            peak.changes_per_s,
            sc.rate.per_s()
        );
        report.peak = Some(peak);
    }
    eprintln!("end to end: {} users × {} rounds…", sc.users, sc.rounds);
    report.run = phases::end_to_end(&sc, &ns, &config).await?;
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
