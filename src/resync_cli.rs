//! `datasync resync`: a resync job run by this process, with a progress bar.
//! It talks to Redis only (flagging is all a resync does); a running service
//! publishes what it flags.

use crate::cli_jobs;
use datasync::{
    Config,
    clients::redis::RedisStore,
    error::EngineError,
    jobs::resync::{self, Resync, Target},
    whitelist::Whitelist,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

pub struct Args {
    pub all: bool,
    pub user_ids: Vec<String>,
    pub file: Option<PathBuf>,
    pub rate: Option<u64>,
    pub resume: Option<String>,
    pub force: bool,
}

/// Runs the job to its end (or until Ctrl-C: the job then stays `running`,
/// and `--resume ID` continues it once its lease expired). Answers the
/// finished record as JSON.
pub async fn run(config: Config, args: Args) -> anyhow::Result<String> {
    let redis = RedisStore::connect(&config.redis, config.sync.shards).await?;
    let runner = match &args.resume {
        Some(id) => match cli_jobs::resume(&config, &redis, resync::KIND, id).await? {
            Ok(runner) => runner,
            Err(finished) => return Ok(serde_json::to_string_pretty(&finished)?),
        },
        None => {
            let target = match (args.all, args.file, args.user_ids.is_empty()) {
                (true, None, true) => Target::All,
                (false, Some(f), true) => Target::File(
                    std::fs::canonicalize(&f)
                        .map_err(|e| anyhow::anyhow!("--file {}: {e}", f.display()))?,
                ),
                (false, None, false) => {
                    datasync::model::validate_user_ids(args.user_ids.iter().map(String::as_str))
                        .map_err(EngineError::Invalid)?;
                    Target::UserIds(args.user_ids)
                }
                _ => anyhow::bail!("give exactly one of --all, --file FILE or user ids"),
            };
            let rate = config.resync.rate(args.rate);
            let params =
                serde_json::json!({ "target": target.param(), "rate": rate, "force": args.force });
            let mut body = Resync::new(target, rate, args.force);
            resync::estimate(&redis, &mut body).await?;
            cli_jobs::start(&config, &redis, resync::KIND, body, args.force, params).await?
        }
    };
    let runner = runner.logged_in(cli_jobs::log(&config, &redis));
    let id = runner.job.id.clone();
    eprintln!("resync {id} (resume with: datasync resync --resume {id})");
    let bar = ProgressBar::new(runner.job.body.estimated_total.unwrap_or(0));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} users scanned ({per_sec}, eta {eta}) {msg}",
        )
        .expect("a valid template"),
    );
    bar.set_position(runner.job.body.scanned);
    let cancel = cli_jobs::interrupt();
    let cx = resync::Context {
        redis: redis.clone(),
        stats: None,
        cancel,
        page_size: config.resync.page_size,
        whitelist: Some(Whitelist::load(redis.clone()).await),
    };
    let done = resync::run(runner, cx, |r| {
        if r.scanned > bar.length().unwrap_or(0) {
            bar.set_length(r.scanned);
        }
        bar.set_position(r.scanned);
        bar.set_message(format!("{} flagged", r.flagged));
    })
    .await;
    bar.finish();
    cli_jobs::outcome(resync::KIND, &id, done)
}
