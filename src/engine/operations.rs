//! The engine's operations calls (DESIGN §7): replay, the offset-range
//! index, the whitelist and the operation log. Every admin action names its
//! caller (`by`: the token name) for the operation log.

use super::Engine;
use crate::{
    error::EngineError,
    jobs::{
        self, Job,
        replay::{self, Replay, ReplayRequest},
    },
    model::validate_user_ids,
    offsets::{self, RangeView},
    operations::{Action, Operation, Requested, ids_param},
};
use serde::Serialize;
use serde_json::json;

/// `GET /v1/offsets`: the stored ranges of a query.
#[derive(Debug, Clone, Serialize)]
pub struct OffsetsAnswer {
    pub ranges: Vec<RangeView>,
    /// More ranges matched than the limit.
    pub truncated: bool,
    /// Ranges this instance recorded and has not written yet.
    pub pending_flush: usize,
}

/// What an offsets query asks for.
#[derive(Debug, Clone, Default)]
pub struct OffsetsQuery {
    /// `dynamic`, `static` or a topic name; every topic when `None`.
    pub topic: Option<String>,
    pub partition: Option<i32>,
    /// Unix ms.
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub limit: usize,
}

/// `GET /v1/whitelist`: this instance's copy.
#[derive(Debug, Clone, Serialize)]
pub struct WhitelistView {
    pub version: i64,
    pub size: usize,
    /// Sorted.
    pub user_ids: Vec<String>,
}

/// What a whitelist change did.
#[derive(Debug, Clone, Serialize)]
pub struct WhitelistChanged {
    /// Ids added (or removed) that were not (or were) listed.
    pub changed: u64,
    pub size: u64,
}

impl Engine {
    /// The topic a request names: `dynamic`, `static`, or as given.
    fn topic_named(&self, name: &str) -> String {
        let k = &self.config().kafka;
        match name {
            "dynamic" => k.dynamic_topic.clone(),
            "static" => k.static_topic.clone(),
            other => other.to_string(),
        }
    }

    /// Starts a replay (one at a time per key prefix unless `force`);
    /// answers its first record with its plan per partition.
    pub async fn start_replay(
        &self,
        request: ReplayRequest,
        force: bool,
        by: &str,
    ) -> Result<Job<Replay>, EngineError> {
        let requested = Requested {
            by: by.to_string(),
            params: request.params(force),
        };
        self.inner
            .jobs
            .start_replay(&request, force, requested)
            .await
    }

    /// A replay's record: state, plan and progress.
    pub async fn replay_job(&self, id: &str) -> Result<Job<Replay>, EngineError> {
        jobs::get(self.redis(), replay::KIND, id).await
    }

    /// Asks a replay to stop after its window; answers its record.
    pub async fn cancel_replay(&self, id: &str, by: &str) -> Result<Job<Replay>, EngineError> {
        self.cancel_job(replay::KIND, id, by).await
    }

    /// Asks a job of `kind` to stop at its next checkpoint (logged as
    /// `<kind>_cancel`); answers its record.
    pub(super) async fn cancel_job<B: serde::de::DeserializeOwned + Serialize>(
        &self,
        kind: &'static str,
        id: &str,
        by: &str,
    ) -> Result<Job<B>, EngineError> {
        let action = Action::begin(format!("{kind}_cancel"), by, json!({ "id": id }));
        let retention = self.config().consistency.report_retention;
        let r = jobs::cancel::<B>(self.redis(), kind, id, retention).await;
        let outcome = r
            .as_ref()
            .map(|j| json!({ "cancel_requested": !j.state.finished(), "state": j.state }))
            .map_err(|e| e.to_string());
        action.end(&self.inner.oplog, &outcome).await;
        r
    }

    /// The stored offset ranges a query matches, oldest first per partition.
    pub async fn offsets(&self, q: OffsetsQuery) -> Result<OffsetsAnswer, EngineError> {
        let topic = q.topic.as_deref().map(|t| self.topic_named(t));
        let (ranges, truncated) = offsets::list(
            self.redis(),
            topic.as_deref(),
            q.partition,
            q.from,
            q.to,
            q.limit,
        )
        .await?;
        Ok(OffsetsAnswer {
            ranges: ranges.iter().map(|r| r.view()).collect(),
            truncated,
            pending_flush: self.inner.ranges.pending(),
        })
    }

    /// Writes the offset ranges this instance holds now (they are written
    /// every `replay.flush_interval` anyway); answers how many.
    pub async fn flush_offset_ranges(&self) -> Result<usize, EngineError> {
        let n = self.inner.ranges.flush(self.redis()).await?;
        self.inner.stats.offset_ranges_flushed(n as u64);
        Ok(n)
    }

    /// This instance's copy of the whitelist.
    pub fn whitelist(&self) -> WhitelistView {
        let ids = self.inner.whitelist.snapshot();
        let mut user_ids: Vec<String> = ids.iter().cloned().collect();
        user_ids.sort();
        WhitelistView {
            version: self.inner.whitelist.version(),
            size: user_ids.len(),
            user_ids,
        }
    }

    /// Adds user ids to the whitelist (`add`) or removes them; every
    /// instance sees the change within `whitelist.refresh_interval`.
    pub async fn whitelist_change(
        &self,
        add: bool,
        user_ids: &[String],
        by: &str,
    ) -> Result<WhitelistChanged, EngineError> {
        if user_ids.is_empty() {
            return Err(EngineError::Invalid("user_ids: empty".into()));
        }
        validate_user_ids(user_ids.iter().map(String::as_str)).map_err(EngineError::Invalid)?;
        let kind = if add {
            "whitelist_add"
        } else {
            "whitelist_remove"
        };
        let action = Action::begin(kind, by, json!({ "user_ids": ids_param(user_ids) }));
        let max = self.config().whitelist.max_entries;
        let r = match self.redis().whitelist_change(add, user_ids, max).await {
            Ok(crate::clients::redis::WhitelistChange::Changed { changed, size }) => {
                Ok(WhitelistChanged { changed, size })
            }
            Ok(crate::clients::redis::WhitelistChange::Full { size }) => {
                Err(EngineError::Invalid(format!(
                    "user_ids: the whitelist holds {size} ids and may hold at most {max} (whitelist.max_entries)"
                )))
            }
            Err(e) => Err(e.into()),
        };
        action.end(&self.inner.oplog, &r).await;
        if r.is_ok()
            && let Err(e) = self.inner.whitelist.refresh().await
        {
            tracing::debug!(error = %e, "whitelist not reloaded yet");
        }
        r
    }

    /// The newest `limit` admin actions, newest first.
    pub async fn operations(&self, limit: u64) -> Result<Vec<Operation>, EngineError> {
        Ok(self.inner.oplog.recent(limit).await?)
    }
}
