//! The engine's healing calls: resync jobs and consistency checks (see
//! [`crate::jobs`]). Deletes are with the other intake calls.

use super::Engine;
use crate::{
    error::EngineError,
    jobs::{
        self, Job, JobState,
        consistency::{self, Check},
        resync::{self, Resync, Target},
    },
    model::validate_user_ids,
    operations::Requested,
};
use serde::Serialize;
use serde_json::json;
use std::{collections::BTreeMap, time::Duration};

/// `GET /v1/consistency/report`: the checks of a time window.
#[derive(Debug, Clone, Serialize)]
pub struct ConsistencyReport {
    pub hours: f64,
    /// Checks that finished with `done` in the window.
    pub runs_done: usize,
    /// Findings per kind over those checks.
    pub findings: BTreeMap<String, u64>,
    /// Users flagged again and orphans deleted over those checks.
    pub repaired: u64,
    /// Every check of the window, oldest first, with its own counts,
    /// duration and samples.
    pub runs: Vec<Job<Check>>,
}

impl Engine {
    /// Starts a resync job (one at a time per key prefix unless `force`);
    /// answers its first record. `rate` is users per second.
    pub async fn start_resync(
        &self,
        target: Target,
        rate: Option<u64>,
        force: bool,
        by: &str,
    ) -> Result<Job<Resync>, EngineError> {
        if let Target::UserIds(ids) = &target {
            validate_user_ids(ids.iter().map(String::as_str)).map_err(EngineError::Invalid)?;
        }
        if rate == Some(0) {
            return Err(EngineError::Invalid("rate: must be at least 1".into()));
        }
        let requested = Requested {
            by: by.to_string(),
            params: json!({ "target": target.param(), "rate": rate, "force": force }),
        };
        self.inner
            .jobs
            .start_resync(target, rate, force, requested)
            .await
    }

    /// A resync job's record: state and progress.
    pub async fn resync_job(&self, id: &str) -> Result<Job<Resync>, EngineError> {
        jobs::get(self.redis(), resync::KIND, id).await
    }

    /// Asks a resync job to stop at its next page; answers its record.
    pub async fn cancel_resync(&self, id: &str, by: &str) -> Result<Job<Resync>, EngineError> {
        self.cancel_job(resync::KIND, id, by).await
    }

    /// Starts a consistency check of the shards this instance owns (one at
    /// a time per key prefix unless `force`); answers its first record.
    /// `repair` and `repair_orphans` override `[consistency]` for this check.
    pub async fn start_consistency_check(
        &self,
        force: bool,
        repair: Option<bool>,
        repair_orphans: Option<bool>,
        by: &str,
    ) -> Result<Job<Check>, EngineError> {
        let mut check = Check::new("api", &self.config().consistency);
        check.repair = repair.unwrap_or(check.repair);
        check.repair_orphans = repair_orphans.unwrap_or(check.repair_orphans);
        let requested = Requested {
            by: by.to_string(),
            params: json!({
                "force": force,
                "repair": check.repair,
                "repair_orphans": check.repair_orphans,
            }),
        };
        self.inner
            .jobs
            .start_check(check, force, Some(requested))
            .await
    }

    /// A consistency check's record.
    pub async fn consistency_check(&self, id: &str) -> Result<Job<Check>, EngineError> {
        jobs::get(self.redis(), consistency::KIND, id).await
    }

    /// The checks of the last `hours` hours, with their findings summed.
    pub async fn consistency_report(&self, hours: f64) -> Result<ConsistencyReport, EngineError> {
        let window = Duration::from_secs_f64(hours * 3600.0);
        let runs: Vec<Job<Check>> = jobs::list(self.redis(), consistency::KIND, window).await?;
        let mut findings: BTreeMap<String, u64> = consistency::KINDS
            .iter()
            .map(|k| (k.to_string(), 0))
            .collect();
        let mut repaired = 0;
        let done: Vec<&Job<Check>> = runs.iter().filter(|r| r.state == JobState::Done).collect();
        for r in &done {
            for (k, n) in &r.body.findings {
                *findings.entry(k.clone()).or_default() += n;
            }
            repaired += r.body.repaired + r.body.orphans_deleted;
        }
        Ok(ConsistencyReport {
            hours,
            runs_done: done.len(),
            findings,
            repaired,
            runs,
        })
    }
}
