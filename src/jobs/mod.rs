//! Background jobs that heal: a full resync ([`resync`]), a replay of a
//! sync topic's window ([`replay`]) and the consistency check
//! ([`consistency`]); and the tombstone purge ([`purge`]).
//!
//! A job is a record in Redis (`<prefix>:{jobs}:<kind>:<id>`, JSON) that
//! its runner checkpoints as it goes. Long jobs answer `202 {"id"}` and are
//! polled at `GET <path>/{id}`: `{"id", "state", …progress}` with `state` one
//! of `queued`, `running`, `done`, `failed`, `cancelled`. One job of a kind
//! runs at a time per key prefix unless forced. The runner holds a lease,
//! renewed at each checkpoint; a running job whose lease expired (its
//! instance died) is taken over by the job keeper of any instance, this one
//! after a restart included, and resumed from its last checkpoint.
//!
//! Every job re-enters the pipeline through the marking and delete scripts,
//! so it gets new versions and cannot regress a live change.

pub mod consistency;
pub mod keeper;
pub mod purge;
pub mod replay;
pub mod resync;

use crate::{
    clients::redis::{Checkpoint, RedisError, RedisStore},
    error::EngineError,
    operations::{Operation, OperationLog, Requested},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::time::{Duration, SystemTime};

/// How long a runner's lease lasts without a checkpoint.
pub const JOB_LEASE: Duration = Duration::from_secs(30);

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn finished(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }
}

/// A job's record: what every kind shares, and the kind's own parameters
/// and progress (`body`, flattened into the same JSON object).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job<B> {
    pub id: String,
    pub kind: String,
    pub state: JobState,
    /// The instance running it (or that ran it last).
    pub instance_id: String,
    /// RFC 3339.
    pub created_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Who asked for it and with what: an admin action, logged in the
    /// operation log when the job ends. `None` for scheduled jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<Requested>,
    #[serde(flatten)]
    pub body: B,
}

/// A new job id: `<kind>-<uuid>`.
pub fn new_id(kind: &str) -> String {
    format!("{kind}-{}", uuid::Uuid::new_v4().simple())
}

/// An RFC 3339 time with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Seconds since an RFC 3339 time written by [`rfc3339`] (0 if unreadable).
pub fn seconds_since(t: &str) -> f64 {
    humantime::parse_rfc3339_weak(t)
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What a runner does after a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    GoOn,
    /// Asked to stop: finish as `cancelled`.
    Cancel,
    /// Another instance holds the job: stop without writing.
    Stop,
}

/// A job being run by this instance: its record and where it is stored.
pub struct Runner<B> {
    redis: RedisStore,
    kind: &'static str,
    retention: Duration,
    /// Where the job is logged when it ends, if it was asked for.
    log: Option<OperationLog>,
    pub job: Job<B>,
}

impl<B: Serialize + DeserializeOwned> Runner<B> {
    /// Creates a job, taking the kind's lock unless `force`. A lock whose
    /// holder finished (or whose record is gone) is released first.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        redis: RedisStore,
        kind: &'static str,
        id: String,
        instance_id: &str,
        body: B,
        force: bool,
        retention: Duration,
        requested: Option<Requested>,
    ) -> Result<Self, EngineError> {
        let now = rfc3339(SystemTime::now());
        let job = Job {
            id: id.clone(),
            kind: kind.to_string(),
            state: JobState::Running,
            instance_id: instance_id.to_string(),
            created_at: now.clone(),
            updated_at: now,
            finished_at: None,
            error: None,
            requested,
            body,
        };
        let json = serde_json::to_string(&job).expect("jobs serialize");
        for _ in 0..2 {
            let holder = redis
                .job_start(kind, &id, &json, instance_id, JOB_LEASE, retention, force)
                .await?;
            let Some(holder) = holder else {
                return Ok(Self {
                    redis,
                    kind,
                    retention,
                    log: None,
                    job,
                });
            };
            let alive = match redis.job_get(kind, &holder).await? {
                Some(r) => serde_json::from_str::<Job<serde_json::Value>>(&r)
                    .map(|j| !j.state.finished())
                    .unwrap_or(false),
                None => false,
            };
            if alive {
                return Err(EngineError::JobBusy { kind, id: holder });
            }
            redis.job_unlock(kind, &holder).await?;
        }
        Err(EngineError::JobBusy {
            kind,
            id: "unknown".into(),
        })
    }

    /// Resumes a job whose runner's lease expired, or that an earlier life
    /// of this instance (the same instance id) was running; `None` if
    /// another instance holds it.
    pub async fn take_over(
        redis: RedisStore,
        kind: &'static str,
        instance_id: &str,
        mut job: Job<B>,
        retention: Duration,
    ) -> Result<Option<Self>, RedisError> {
        if !redis
            .job_take(kind, &job.id, instance_id, JOB_LEASE)
            .await?
            && redis.job_lease_holder(kind, &job.id).await?.as_deref() != Some(instance_id)
        {
            return Ok(None);
        }
        tracing::info!(kind, id = %job.id, previous = %job.instance_id, "resuming a job whose instance stopped");
        job.instance_id = instance_id.to_string();
        Ok(Some(Self {
            redis,
            kind,
            retention,
            log: None,
            job,
        }))
    }

    /// Logs the job in `log` when it ends, if it was asked for.
    pub fn logged_in(mut self, log: OperationLog) -> Self {
        self.log = Some(log);
        self
    }

    /// Saves the record (a checkpoint) and renews the lease.
    pub async fn save(&mut self) -> Result<Checkpoint, RedisError> {
        self.job.updated_at = rfc3339(SystemTime::now());
        let json = serde_json::to_string(&self.job).expect("jobs serialize");
        self.redis
            .job_save(
                self.kind,
                &self.job.id,
                &json,
                &self.job.instance_id,
                JOB_LEASE,
            )
            .await
    }

    /// A checkpoint between pages or windows: saves the record and says
    /// what the runner does next. A failed save is logged and the job goes
    /// on (its lease is renewed at the next one).
    pub async fn checkpoint(&mut self) -> Next {
        match self.save().await {
            Ok(Checkpoint::Saved) => Next::GoOn,
            Ok(Checkpoint::CancelRequested) => Next::Cancel,
            Ok(Checkpoint::Lost) => {
                tracing::warn!(kind = self.kind, id = %self.job.id, "job taken over by another instance; stopping here");
                Next::Stop
            }
            Err(e) => {
                tracing::warn!(kind = self.kind, id = %self.job.id, error = %e, "job checkpoint failed");
                Next::GoOn
            }
        }
    }

    /// Writes the last record, kept for the retention, and releases the
    /// lease and the lock.
    pub async fn finish(
        mut self,
        state: JobState,
        error: Option<String>,
    ) -> Result<Job<B>, RedisError> {
        let now = rfc3339(SystemTime::now());
        self.job.state = state;
        self.job.error = error;
        self.job.updated_at = now.clone();
        self.job.finished_at = Some(now);
        let json = serde_json::to_string(&self.job).expect("jobs serialize");
        let written = self
            .redis
            .job_finish(
                self.kind,
                &self.job.id,
                &json,
                &self.job.instance_id,
                self.retention,
            )
            .await?;
        // A job another instance took over is logged by that instance.
        if written && let (Some(log), Some(requested)) = (&self.log, &self.job.requested) {
            let status = serde_json::to_value(state).expect("states serialize");
            let result = crate::operations::result(
                status.as_str().unwrap_or_default(),
                self.job.error.as_deref(),
                &self.job.body,
            );
            log.write(Operation {
                id: self.job.id.clone(),
                kind: self.kind.to_string(),
                params: requested.params.clone(),
                token: requested.by.clone(),
                instance_id: self.job.instance_id.clone(),
                started_at: self.job.created_at.clone(),
                ended_at: self.job.updated_at.clone(),
                result,
            })
            .await;
        }
        Ok(self.job)
    }
}

/// A job's record.
pub async fn get<B: DeserializeOwned>(
    redis: &RedisStore,
    kind: &'static str,
    id: &str,
) -> Result<Job<B>, EngineError> {
    let missing = || EngineError::NoSuchJob {
        kind,
        id: id.to_string(),
    };
    let json = redis.job_get(kind, id).await?.ok_or_else(missing)?;
    serde_json::from_str(&json).map_err(|_| missing())
}

/// A kind's jobs created in the last `window`, oldest first.
pub async fn list<B: DeserializeOwned>(
    redis: &RedisStore,
    kind: &'static str,
    window: Duration,
) -> Result<Vec<Job<B>>, RedisError> {
    let since = crate::model::now_ms() - window.as_millis() as i64;
    Ok(redis
        .job_list(kind, since)
        .await?
        .iter()
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect())
}

/// A kind's running jobs that nobody runs: their runner's lease expired
/// (its instance stopped), or it is held by `me` (this instance's id) for a
/// job this process does not run (an earlier life of this instance, killed
/// and restarted).
pub async fn orphans<B: DeserializeOwned>(
    redis: &RedisStore,
    kind: &'static str,
    me: &str,
    mine: &std::sync::Mutex<std::collections::HashSet<String>>,
) -> Result<Vec<Job<B>>, RedisError> {
    let mut out = Vec::new();
    let jobs: Vec<Job<B>> = redis
        .job_list_running(kind)
        .await?
        .iter()
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    // Read after the list: a job of this process is in `mine` before its
    // record exists.
    let mine = mine.lock().expect("not poisoned").clone();
    for job in jobs {
        if job.state.finished() || mine.contains(&job.id) {
            continue;
        }
        match redis.job_lease_holder(kind, &job.id).await? {
            None => out.push(job),
            Some(holder) if holder == me => out.push(job),
            Some(_) => {}
        }
    }
    Ok(out)
}

/// Asks a running job to stop at its next checkpoint; answers its record.
/// A job already finished is left as it is.
pub async fn cancel<B: DeserializeOwned>(
    redis: &RedisStore,
    kind: &'static str,
    id: &str,
    retention: Duration,
) -> Result<Job<B>, EngineError> {
    let job = get::<B>(redis, kind, id).await?;
    if !job.state.finished() {
        redis.job_cancel(kind, id, retention).await?;
    }
    Ok(job)
}

/// Waits `d` unless the engine stops first; false when it stopped.
pub async fn pause(cancel: &tokio_util::sync::CancellationToken, d: Duration) -> bool {
    if d.is_zero() {
        return !cancel.is_cancelled();
    }
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Paces a job at `rate` items per second (0 = no limit): call after each
/// batch with the running total.
pub struct Pacer {
    rate: u64,
    started: std::time::Instant,
}

impl Pacer {
    pub fn new(rate: u64) -> Self {
        Self {
            rate,
            started: std::time::Instant::now(),
        }
    }

    /// How long to wait so that `done` items took at least `done / rate`
    /// seconds since the start.
    pub fn wait_for(&self, done: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let due = Duration::from_secs_f64(done as f64 / self.rate as f64);
        due.saturating_sub(self.started.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_serialize_as_the_contract_names_them() {
        for (s, name) in [
            (JobState::Queued, "queued"),
            (JobState::Running, "running"),
            (JobState::Done, "done"),
            (JobState::Failed, "failed"),
            (JobState::Cancelled, "cancelled"),
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), name);
        }
        assert!(JobState::Cancelled.finished() && !JobState::Running.finished());
    }

    #[test]
    fn the_pacer_spreads_work_over_time() {
        let p = Pacer::new(1000);
        assert!(p.wait_for(2000) > Duration::from_millis(1900));
        assert_eq!(Pacer::new(0).wait_for(1_000_000), Duration::ZERO);
    }
}
