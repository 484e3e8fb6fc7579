//! `datasync replay` (a replay run by this process, with a progress bar),
//! `datasync operations` (the operation log) and `datasync sinks` (each
//! sink's lag and reported state). All talk to the backends directly, with
//! the service's configuration.

use crate::cli_jobs;
use datasync::{
    Config,
    clients::{mongo::MongoStore, redis::RedisStore},
    error::EngineError,
    jobs::replay::{self, ReplayRequest},
    operations,
    whitelist::Whitelist,
};
use indicatif::{ProgressBar, ProgressStyle};

pub struct ReplayArgs {
    pub request: ReplayRequest,
    pub resume: Option<String>,
    pub force: bool,
}

/// Runs a replay to its end (or until Ctrl-C: it then stays `running`, and
/// `--resume ID` continues it once its lease expired). Answers the finished
/// record as JSON.
pub async fn replay(config: Config, args: ReplayArgs) -> anyhow::Result<String> {
    let redis = RedisStore::connect(&config.redis, config.sync.shards).await?;
    let mongo = MongoStore::connect_without_index(&config.mongo, "datasync-replay").await?;
    let runner = match &args.resume {
        Some(id) => match cli_jobs::resume(&config, &redis, replay::KIND, id).await? {
            Ok(runner) => runner,
            Err(finished) => return Ok(serde_json::to_string_pretty(&finished)?),
        },
        None => {
            let mut request = args.request.clone();
            request.rate = config.replay.rate(request.rate);
            let body = replay::plan(&config.kafka, &redis, &config.mongo.collection, &request)
                .await
                .map_err(EngineError::Invalid)?;
            let params = request.params(args.force);
            cli_jobs::start(&config, &redis, replay::KIND, body, args.force, params).await?
        }
    };
    let runner = runner.logged_in(cli_jobs::log(&config, &redis));
    let id = runner.job.id.clone();
    eprintln!("replay {id} (resume with: datasync replay --resume {id})");
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {pos} records read ({per_sec}) {msg}",
        )
        .expect("a valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let cancel = cli_jobs::interrupt();
    let whitelist = Whitelist::load(redis.clone()).await;
    let cx = replay::Context {
        redis,
        mongo,
        kafka: config.kafka.clone(),
        group: format!("{}-replay", config.kafka.consumer_group),
        instance_id: config.instance_id(),
        filter: replay::filter_of(&runner.job.body, Some(whitelist)),
        profiles: None,
        stats: None,
        retry: config.retry.clone(),
        cancel,
        window_events: config.replay.window_events,
    };
    let done = replay::run(runner, cx, |r| {
        bar.set_position(r.read);
        bar.set_message(format!(
            "{} applied, {} stale, {} filtered",
            r.applied, r.stale, r.filtered
        ));
    })
    .await;
    bar.finish();
    cli_jobs::outcome(replay::KIND, &id, done)
}

/// The newest `limit` operations: one JSON object per line, or a table.
pub async fn operations(config: Config, limit: u64, json: bool) -> anyhow::Result<String> {
    let redis = RedisStore::connect(&config.redis, config.sync.shards).await?;
    let ops = operations::recent(&redis, limit).await?;
    if json {
        let lines: Vec<String> = ops
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()?;
        return Ok(lines.join("\n"));
    }
    let mut out = format!(
        "{:<24} {:<18} {:<14} {:<10} {}\n",
        "started_at", "kind", "token", "status", "id"
    );
    for op in &ops {
        let status = op.result["status"].as_str().unwrap_or("?");
        out.push_str(&format!(
            "{:<24} {:<18} {:<14} {:<10} {}\n",
            op.started_at, op.kind, op.token, status, op.id
        ));
    }
    out.push_str(&format!("{} operation(s)", ops.len()));
    Ok(out)
}

/// `datasync sinks`: every configured sink with its consumer groups' lag,
/// read from the broker, and what each running instance last reported of
/// it (state, counters, last error), read from Redis.
pub async fn sinks(config: Config, json: bool) -> anyhow::Result<String> {
    use datasync::{clients::kafka, sinks};
    let redis = RedisStore::connect(&config.redis, config.sync.shards).await?;
    let reports: Vec<(String, Vec<sinks::SinkReport>)> = redis
        .sink_reports()
        .await?
        .into_iter()
        .filter_map(|(instance, json)| Some((instance, serde_json::from_str(&json).ok()?)))
        .collect();
    let k = config.kafka.clone();
    let mut rows = Vec::new();
    for c in sinks::configured(&config) {
        let group = sinks::configured_group(&c, &k.consumer_group);
        let (k, g) = (k.clone(), group.clone());
        let lag = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            for (group, topic) in [
                (sinks::static_group(&g), &k.static_topic),
                (g.clone(), &k.dynamic_topic),
            ] {
                let reader = kafka::lag_reader(&k, &group)?;
                all.extend(kafka::consumer_lag(&reader, std::slice::from_ref(topic))?);
            }
            anyhow::Ok(all)
        })
        .await?;
        let instances: Vec<sinks::SinkReport> = reports
            .iter()
            .filter_map(|(instance, r)| {
                let mut r = r.iter().find(|r| r.name == c.name)?.clone();
                r.instance = Some(instance.clone());
                Some(r)
            })
            .collect();
        rows.push(serde_json::json!({
            "name": c.name,
            "kind": c.kind.label(),
            "primary": c.primary,
            "consumer_group": group,
            "target": c.target(&config.mongo),
            "lag": lag.as_ref().ok().map(|l| l.iter().map(|p| p.lag).sum::<i64>()),
            "lag_error": lag.as_ref().err().map(|e| e.to_string()),
            "instances": instances,
        }));
    }
    if json {
        return Ok(serde_json::to_string_pretty(&rows)?);
    }
    let mut out = format!(
        "{:<16} {:<9} {:<8} {:<10} {:<28} {}\n",
        "sink", "kind", "primary", "lag", "consumer group", "target"
    );
    for r in &rows {
        let lag = r["lag"].as_i64().map_or("?".to_string(), |l| l.to_string());
        out.push_str(&format!(
            "{:<16} {:<9} {:<8} {:<10} {:<28} {}\n",
            r["name"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or(""),
            r["primary"],
            lag,
            r["consumer_group"].as_str().unwrap_or(""),
            r["target"].as_str().unwrap_or(""),
        ));
        for i in r["instances"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "    {:<28} {:<9} applied {} stale {} dead-lettered {} retried {}{}\n",
                i["instance"].as_str().unwrap_or(""),
                i["state"].as_str().unwrap_or(""),
                i["applied"],
                i["stale"],
                i["dead_lettered"],
                i["retried"],
                i["last_error"]
                    .as_str()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default(),
            ));
        }
        if let Some(e) = r["lag_error"].as_str() {
            out.push_str(&format!("    lag not read: {e}\n"));
        }
    }
    out.push_str(&format!(
        "{} sink(s); instances report every telemetry.backlog_interval",
        rows.len()
    ));
    Ok(out)
}
