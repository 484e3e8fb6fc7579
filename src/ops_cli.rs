//! `datasync replay` (a replay run by this process, with a progress bar) and
//! `datasync operations` (the operation log). Both talk to the backends
//! directly, with the service's configuration.

use crate::cli_jobs;
use datasync::{
    Config,
    clients::{mongo::MongoStore, redis::RedisStore},
    error::EngineError,
    jobs::{
        self, Runner,
        replay::{self, ReplayRequest},
    },
    operations::{self, OperationLog, Requested, cli_caller, ids_param},
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
    let instance = config.instance_id();
    let retention = config.consistency.report_retention;
    let log = OperationLog::new(redis.clone(), config.operations.max_entries, &instance);
    let runner = match &args.resume {
        Some(id) => match cli_jobs::resume(&redis, replay::KIND, id, &instance, retention).await? {
            Ok(runner) => runner,
            Err(finished) => return Ok(serde_json::to_string_pretty(&finished)?),
        },
        None => {
            let mut request = args.request.clone();
            if let Some(ids) = &request.user_ids {
                datasync::model::validate_user_ids(ids.iter().map(String::as_str))
                    .map_err(EngineError::Invalid)?;
            }
            request.rate = config.replay.rate(request.rate);
            let body = replay::plan(&config.kafka, &redis, &config.mongo.collection, &request)
                .await
                .map_err(EngineError::Invalid)?;
            let r = &request;
            let requested = Requested {
                by: cli_caller(),
                params: serde_json::json!({
                    "topic": r.topic, "from_time": r.from_time, "to_time": r.to_time,
                    "from_offset": r.from_offset, "to_offset": r.to_offset,
                    "partition": r.partition,
                    "user_ids": r.user_ids.as_deref().map(ids_param),
                    "dry_run": r.dry_run, "target_collection": r.target_collection,
                    "rate": r.rate, "force": args.force,
                }),
            };
            Runner::start(
                redis.clone(),
                replay::KIND,
                jobs::new_id(replay::KIND),
                &instance,
                body,
                args.force,
                retention,
                Some(requested),
            )
            .await?
        }
    };
    let runner = runner.logged_in(log);
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
        instance_id: instance,
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
