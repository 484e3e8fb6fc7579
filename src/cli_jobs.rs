//! What the job commands (`datasync resync`, `datasync replay`) share:
//! resuming a job, stopping on Ctrl-C, and the answer at the end.

use datasync::{
    Config,
    clients::redis::RedisStore,
    jobs::{self, Job, JobState, Runner},
    operations::{OperationLog, Requested, cli_caller},
};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::sync::CancellationToken;

/// The job `id` of `kind` to resume: its runner, or its record when it has
/// finished already. An error when another instance still holds it.
pub async fn resume<B: Serialize + DeserializeOwned>(
    config: &Config,
    redis: &RedisStore,
    kind: &'static str,
    id: &str,
) -> anyhow::Result<Result<Runner<B>, Job<B>>> {
    let job: Job<B> = jobs::get(redis, kind, id).await?;
    if job.state.finished() {
        return Ok(Err(job));
    }
    let holder = job.instance_id.clone();
    let (instance, retention) = (config.instance_id(), config.consistency.report_retention);
    let runner = Runner::take_over(redis.clone(), kind, &instance, job, retention)
        .await?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{kind} {id} is still running on {holder} (its lease is held); stop it or wait for the lease to expire ({}s)",
                jobs::JOB_LEASE.as_secs()
            )
        })?;
    Ok(Ok(runner))
}

/// Starts a job of `kind` asked for from the command line with `params`.
pub async fn start<B: Serialize + DeserializeOwned>(
    config: &Config,
    redis: &RedisStore,
    kind: &'static str,
    body: B,
    force: bool,
    params: serde_json::Value,
) -> anyhow::Result<Runner<B>> {
    let requested = Requested {
        by: cli_caller(),
        params,
    };
    Ok(Runner::start(
        redis.clone(),
        kind,
        jobs::new_id(kind),
        &config.instance_id(),
        body,
        force,
        config.consistency.report_retention,
        Some(requested),
    )
    .await?)
}

/// The operation log a command's jobs are written to when they end.
pub fn log(config: &Config, redis: &RedisStore) -> OperationLog {
    OperationLog::new(
        redis.clone(),
        config.operations.max_entries,
        &config.instance_id(),
    )
}

/// A token cancelled by Ctrl-C: the job stops at its next checkpoint and
/// stays `running`, to be resumed.
pub fn interrupt() -> CancellationToken {
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        c.cancel();
    });
    cancel
}

/// The command's answer: the record of a job that ended `done`, or an
/// error saying how it ended or how to resume it.
pub fn outcome<B: Serialize>(kind: &str, id: &str, done: Option<Job<B>>) -> anyhow::Result<String> {
    match done {
        Some(job) if job.state == JobState::Done => Ok(serde_json::to_string_pretty(&job)?),
        Some(job) => anyhow::bail!(
            "{kind} {id} ended {:?}: {}",
            job.state,
            job.error.unwrap_or_default()
        ),
        None => {
            anyhow::bail!("{kind} {id} interrupted; it resumes with: datasync {kind} --resume {id}")
        }
    }
}
