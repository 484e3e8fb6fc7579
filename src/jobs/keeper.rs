//! [`Jobs`]: starts and resumes this instance's jobs. Its keeper task, every
//! few seconds, takes over running jobs whose instance stopped, or that an
//! earlier life of this instance (same instance id) was running (a resync
//! resumes from its checkpoint; a consistency check, which is cheap to
//! repeat, is closed as failed) and runs the scheduled consistency check of
//! the shards this instance owns.

use super::{
    Job, JobState, Runner,
    consistency::{self, Check},
    replay::{self, Replay, ReplayRequest},
    resync::{self, Resync, Target},
};
use crate::{
    clients::{mongo::MongoStore, redis::RedisStore},
    config::Config,
    error::EngineError,
    lease::Ownership,
    operations::{OperationLog, Requested},
    profiles::ProfileReader,
    telemetry::Stats,
    whitelist::Whitelist,
};
use actix::ArbiterHandle;
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio_util::sync::CancellationToken;

/// How often the keeper looks for orphaned jobs and for a due check.
const KEEPER_TICK: Duration = Duration::from_secs(5);
/// A scheduled check that found the lock taken tries again this soon.
const BUSY_RETRY: Duration = Duration::from_secs(10);

/// Starts, resumes and schedules this instance's jobs.
#[derive(Clone)]
pub struct Jobs {
    pub redis: RedisStore,
    pub mongo: MongoStore,
    pub stats: Arc<Stats>,
    pub cancel: CancellationToken,
    pub config: Config,
    pub ownership: Arc<Ownership>,
    pub instance_id: String,
    /// Where job tasks run: the engine's actor system.
    pub arbiter: ArbiterHandle,
    /// Ids of the jobs this process runs.
    pub running: Arc<Mutex<HashSet<String>>>,
    pub whitelist: Arc<Whitelist>,
    pub profiles: Arc<ProfileReader>,
    pub oplog: OperationLog,
}

impl Jobs {
    fn retention(&self) -> Duration {
        self.config.consistency.report_retention
    }

    /// Starts a job under a new id, registered as this process's before its
    /// record exists (so the keeper never takes it for an orphan).
    async fn start_job<B: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        kind: &'static str,
        body: B,
        force: bool,
        requested: Option<Requested>,
    ) -> Result<Runner<B>, EngineError> {
        let id = super::new_id(kind);
        self.running
            .lock()
            .expect("not poisoned")
            .insert(id.clone());
        let started = Runner::start(
            self.redis.clone(),
            kind,
            id.clone(),
            &self.instance_id,
            body,
            force,
            self.retention(),
            requested,
        )
        .await
        .map(|r| r.logged_in(self.oplog.clone()));
        if started.is_err() {
            self.running.lock().expect("not poisoned").remove(&id);
        }
        started
    }

    /// Starts a resync; answers its first record.
    pub async fn start_resync(
        &self,
        target: Target,
        rate: Option<u64>,
        force: bool,
        requested: Requested,
    ) -> Result<Job<Resync>, EngineError> {
        let rate = self.config.resync.rate(rate);
        let mut body = Resync::new(target, rate, force);
        resync::estimate(&self.redis, &mut body)
            .await
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        let runner = self
            .start_job(resync::KIND, body, force, Some(requested))
            .await?;
        let job = runner.job.clone();
        self.spawn_resync(runner);
        Ok(job)
    }

    fn spawn_resync(&self, runner: Runner<Resync>) {
        let cx = resync::Context {
            redis: self.redis.clone(),
            stats: Some(self.stats.clone()),
            cancel: self.cancel.clone(),
            page_size: self.config.resync.page_size,
            whitelist: Some(self.whitelist.clone()),
        };
        let running = self.running.clone();
        let id = runner.job.id.clone();
        running.lock().expect("not poisoned").insert(id.clone());
        self.arbiter.spawn(async move {
            resync::run(runner, cx, |_| {}).await;
            running.lock().expect("not poisoned").remove(&id);
        });
    }

    /// Plans and starts a replay; answers its first record.
    pub async fn start_replay(
        &self,
        request: &ReplayRequest,
        force: bool,
        requested: Requested,
    ) -> Result<Job<Replay>, EngineError> {
        let mut request = request.clone();
        request.rate = self.config.replay.rate(request.rate);
        let body = replay::plan(
            &self.config.kafka,
            &self.redis,
            self.mongo.collection_name(),
            &request,
        )
        .await
        .map_err(EngineError::Invalid)?;
        let runner = self
            .start_job(replay::KIND, body, force, Some(requested))
            .await?;
        let job = runner.job.clone();
        self.spawn_replay(runner);
        Ok(job)
    }

    /// What a replay run needs (the CLI builds its own).
    pub fn replay_context(&self, body: &Replay) -> replay::Context {
        replay::Context {
            redis: self.redis.clone(),
            mongo: self.mongo.clone(),
            kafka: self.config.kafka.clone(),
            group: format!("{}-replay", self.config.kafka.consumer_group),
            instance_id: self.instance_id.clone(),
            filter: replay::filter_of(body, Some(self.whitelist.clone())),
            profiles: Some(self.profiles.clone()),
            stats: Some(self.stats.clone()),
            retry: self.config.retry.clone(),
            cancel: self.cancel.clone(),
            window_events: self.config.replay.window_events,
        }
    }

    fn spawn_replay(&self, runner: Runner<Replay>) {
        let cx = self.replay_context(&runner.job.body);
        let running = self.running.clone();
        let id = runner.job.id.clone();
        running.lock().expect("not poisoned").insert(id.clone());
        self.arbiter.spawn(async move {
            replay::run(runner, cx, |_| {}).await;
            running.lock().expect("not poisoned").remove(&id);
        });
    }

    /// Starts a consistency check of the shards this instance owns; answers
    /// its first record. `requested` when an operator asked for it.
    pub async fn start_check(
        &self,
        check: Check,
        force: bool,
        requested: Option<Requested>,
    ) -> Result<Job<Check>, EngineError> {
        let runner = self
            .start_job(consistency::KIND, check, force, requested)
            .await?;
        let job = runner.job.clone();
        let cx = self.check_context();
        let running = self.running.clone();
        let id = job.id.clone();
        self.arbiter.spawn(async move {
            consistency::run(runner, cx).await;
            running.lock().expect("not poisoned").remove(&id);
        });
        Ok(job)
    }

    fn check_context(&self) -> consistency::Context {
        consistency::Context {
            redis: self.redis.clone(),
            mongo: self.mongo.clone(),
            stats: self.stats.clone(),
            cancel: self.cancel.clone(),
            config: self.config.consistency.clone(),
            owned: self.ownership.scannable(),
        }
    }

    /// The keeper: resumes orphaned jobs and runs the scheduled checks
    /// until the engine stops.
    pub async fn run_keeper(self) {
        let every = self.config.consistency.interval;
        let mut next_check = (!every.is_zero()).then(|| tokio::time::Instant::now() + every);
        while super::pause(&self.cancel, KEEPER_TICK).await {
            if let Err(e) = self.adopt_orphans().await {
                tracing::warn!(error = %e, "cannot look for jobs to resume");
            }
            let Some(due) = next_check else { continue };
            if tokio::time::Instant::now() < due || self.ownership.scannable().is_empty() {
                continue;
            }
            next_check = Some(match self.run_scheduled_check().await {
                Ok(()) => tokio::time::Instant::now() + every,
                Err(e) => {
                    tracing::debug!(error = %e, "scheduled consistency check not started");
                    tokio::time::Instant::now() + BUSY_RETRY
                }
            });
        }
    }

    async fn run_scheduled_check(&self) -> Result<(), EngineError> {
        let check = Check::new("schedule", &self.config.consistency);
        let runner = self
            .start_job(consistency::KIND, check, false, None)
            .await?;
        let id = runner.job.id.clone();
        consistency::run(runner, self.check_context()).await;
        self.running.lock().expect("not poisoned").remove(&id);
        Ok(())
    }

    async fn adopt_orphans(&self) -> Result<(), crate::clients::redis::RedisError> {
        let retention = self.retention();
        let (me, mine) = (self.instance_id.as_str(), &*self.running);
        for job in super::orphans::<Resync>(&self.redis, resync::KIND, me, mine).await? {
            if let Some(runner) = Runner::take_over(
                self.redis.clone(),
                resync::KIND,
                &self.instance_id,
                job,
                retention,
            )
            .await?
            {
                self.spawn_resync(runner.logged_in(self.oplog.clone()));
            }
        }
        for job in super::orphans::<Replay>(&self.redis, replay::KIND, me, mine).await? {
            if let Some(runner) = Runner::take_over(
                self.redis.clone(),
                replay::KIND,
                &self.instance_id,
                job,
                retention,
            )
            .await?
            {
                self.spawn_replay(runner.logged_in(self.oplog.clone()));
            }
        }
        for job in super::orphans::<Check>(&self.redis, consistency::KIND, me, mine).await? {
            if let Some(runner) = Runner::take_over(
                self.redis.clone(),
                consistency::KIND,
                &self.instance_id,
                job,
                retention,
            )
            .await?
            {
                runner
                    .logged_in(self.oplog.clone())
                    .finish(
                        JobState::Failed,
                        Some(
                            "the instance running it stopped; the next check starts afresh".into(),
                        ),
                    )
                    .await?;
            }
        }
        Ok(())
    }
}
