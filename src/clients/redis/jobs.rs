//! Background jobs' records (resync, consistency checks): one JSON record
//! per job, an index per kind, a lock per kind (one running job per key
//! prefix unless forced) and a lease per running job, renewed at each
//! checkpoint so a job whose instance died is taken over. Every key carries
//! the `{jobs}` hash tag: each script is single-slot.

use super::{RedisError, RedisStore, lua_script};
use fred::{
    prelude::*,
    types::{Expiration, SetOptions, scripts::Script},
};
use std::{sync::LazyLock, time::Duration};

static JOB_START: LazyLock<Script> = lua_script!("job_start.lua");
static JOB_SAVE: LazyLock<Script> = lua_script!("job_save.lua");
static JOB_FINISH: LazyLock<Script> = lua_script!("job_finish.lua");
static JOB_UNLOCK: LazyLock<Script> = lua_script!("job_unlock.lua");

/// What a checkpoint found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// Saved; go on.
    Saved,
    /// Saved, and the job was asked to stop.
    CancelRequested,
    /// Another instance holds the job now: stop without writing.
    Lost,
}

fn ms(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

impl RedisStore {
    /// Creates a job; `Some(holder)` when the kind's lock is held by
    /// another job (nothing created).
    #[allow(clippy::too_many_arguments)]
    pub async fn job_start(
        &self,
        kind: &str,
        id: &str,
        json: &str,
        instance: &str,
        lease: Duration,
        retention: Duration,
        force: bool,
    ) -> Result<Option<String>, RedisError> {
        let k = &self.keys;
        let holder: Option<String> = JOB_START
            .evalsha_with_reload(
                self.client(),
                vec![
                    k.job_lock(kind),
                    k.job(kind, id),
                    k.jobs(kind),
                    k.job_lease(kind, id),
                    k.jobs_running(kind),
                ],
                vec![
                    id.to_string(),
                    json.to_string(),
                    crate::model::now_ms().to_string(),
                    ms(lease),
                    instance.to_string(),
                    if force { "1" } else { "" }.to_string(),
                    ms(retention),
                ],
            )
            .await?;
        Ok(holder)
    }

    /// A running job's checkpoint (see [`Checkpoint`]).
    pub async fn job_save(
        &self,
        kind: &str,
        id: &str,
        json: &str,
        instance: &str,
        lease: Duration,
    ) -> Result<Checkpoint, RedisError> {
        let k = &self.keys;
        let n: i64 = JOB_SAVE
            .evalsha_with_reload(
                self.client(),
                vec![
                    k.job(kind, id),
                    k.job_lease(kind, id),
                    k.job_cancel(kind, id),
                ],
                vec![instance.to_string(), json.to_string(), ms(lease)],
            )
            .await?;
        Ok(match n {
            0 => Checkpoint::Lost,
            2 => Checkpoint::CancelRequested,
            _ => Checkpoint::Saved,
        })
    }

    /// A job's last record, kept for `retention`. False when another
    /// instance holds the job (nothing written).
    pub async fn job_finish(
        &self,
        kind: &str,
        id: &str,
        json: &str,
        instance: &str,
        retention: Duration,
    ) -> Result<bool, RedisError> {
        let k = &self.keys;
        let n: i64 = JOB_FINISH
            .evalsha_with_reload(
                self.client(),
                vec![
                    k.job(kind, id),
                    k.job_lease(kind, id),
                    k.job_lock(kind),
                    k.jobs_running(kind),
                ],
                vec![
                    instance.to_string(),
                    json.to_string(),
                    ms(retention),
                    id.to_string(),
                ],
            )
            .await?;
        Ok(n == 1)
    }

    /// Releases a kind's lock if `id` still holds it.
    pub async fn job_unlock(&self, kind: &str, id: &str) -> Result<bool, RedisError> {
        let n: i64 = JOB_UNLOCK
            .evalsha_with_reload(self.client(), vec![self.keys.job_lock(kind)], vec![id])
            .await?;
        Ok(n == 1)
    }

    /// Takes over a job whose lease expired; false if someone holds it.
    pub async fn job_take(
        &self,
        kind: &str,
        id: &str,
        instance: &str,
        lease: Duration,
    ) -> Result<bool, RedisError> {
        let r: Option<String> = self
            .client()
            .set(
                self.keys.job_lease(kind, id),
                instance,
                Some(Expiration::PX(lease.as_millis().max(1) as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(r.is_some())
    }

    /// The instance holding a job's lease, if any.
    pub async fn job_lease_holder(
        &self,
        kind: &str,
        id: &str,
    ) -> Result<Option<String>, RedisError> {
        Ok(self.client().get(self.keys.job_lease(kind, id)).await?)
    }

    /// Asks a job to stop at its next checkpoint.
    pub async fn job_cancel(
        &self,
        kind: &str,
        id: &str,
        retention: Duration,
    ) -> Result<(), RedisError> {
        let _: () = self
            .client()
            .set(
                self.keys.job_cancel(kind, id),
                "1",
                Some(Expiration::PX(retention.as_millis().max(1) as i64)),
                None,
                false,
            )
            .await?;
        Ok(())
    }

    /// A job's record.
    pub async fn job_get(&self, kind: &str, id: &str) -> Result<Option<String>, RedisError> {
        Ok(self.client().get(self.keys.job(kind, id)).await?)
    }

    /// The records of a kind's jobs not finished (a record that expired is
    /// dropped from the set).
    pub async fn job_list_running(&self, kind: &str) -> Result<Vec<String>, RedisError> {
        let ids: Vec<String> = self.client().smembers(self.keys.jobs_running(kind)).await?;
        let records = self.job_records(kind, &ids).await?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, r) in ids.iter().zip(records) {
            match r {
                Some(r) => out.push(r),
                None => {
                    let _: i64 = self.client().srem(self.keys.jobs_running(kind), id).await?;
                }
            }
        }
        Ok(out)
    }

    async fn job_records(
        &self,
        kind: &str,
        ids: &[String],
    ) -> Result<Vec<Option<String>>, RedisError> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.job(kind, id)).collect();
        Ok(if keys.len() == 1 {
            vec![self.client().get(&keys[0]).await?]
        } else {
            self.client().mget(keys).await?
        })
    }

    /// The records of a kind's jobs created since `since_ms`, oldest first
    /// (records that expired are left out).
    pub async fn job_list(&self, kind: &str, since_ms: i64) -> Result<Vec<String>, RedisError> {
        let ids: Vec<String> = self
            .client()
            .zrangebyscore(self.keys.jobs(kind), since_ms, "+inf", false, None)
            .await?;
        Ok(self
            .job_records(kind, &ids)
            .await?
            .into_iter()
            .flatten()
            .collect())
    }
}
