//! Each instance's sink reports, for `datasync sinks`: one hash, instance
//! id → the JSON its backlog sampler last wrote.

use super::{RedisError, RedisStore};
use fred::prelude::*;

impl RedisStore {
    /// Writes this instance's reports (a JSON array).
    pub async fn put_sink_reports(&self, instance: &str, json: &str) -> Result<(), RedisError> {
        let _: i64 = self
            .client()
            .hset(self.keys.sinks(), (instance, json))
            .await?;
        Ok(())
    }

    /// Every instance's reports: `(instance, JSON)`.
    pub async fn sink_reports(&self) -> Result<Vec<(String, String)>, RedisError> {
        let all: std::collections::HashMap<String, String> =
            self.client().hgetall(self.keys.sinks()).await?;
        let mut all: Vec<_> = all.into_iter().collect();
        all.sort();
        Ok(all)
    }

    /// Drops the reports of instances gone.
    pub async fn remove_sink_reports(&self, instances: &[String]) -> Result<(), RedisError> {
        if instances.is_empty() {
            return Ok(());
        }
        let _: i64 = self
            .client()
            .hdel(self.keys.sinks(), instances.to_vec())
            .await?;
        Ok(())
    }
}
