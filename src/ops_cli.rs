//! `datasync replay` (a replay run by this process, with a progress bar) and
//! `datasync operations` (the operation log). Both talk to the backends
//! directly, with the service's configuration.

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
