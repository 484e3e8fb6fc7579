//! The operation log: a Redis stream with one entry per admin action,
//! trimmed to about `operations.max_entries`.

use super::{RedisError, RedisStore};
use fred::prelude::*;
use std::collections::HashMap;

impl RedisStore {
    /// Appends an entry (field, value pairs); answers its stream id.
    pub async fn operation_append(
        &self,
        fields: Vec<(&'static str, String)>,
        max_entries: usize,
    ) -> Result<String, RedisError> {
        Ok(self
            .client()
            .xadd(
                self.keys.operations(),
                false,
                ("MAXLEN", "~", max_entries as i64),
                "*",
                fields,
            )
            .await?)
    }

    /// The newest `limit` entries, newest first: `(stream id, fields)`.
    pub async fn operations_recent(
        &self,
        limit: u64,
    ) -> Result<Vec<(String, HashMap<String, String>)>, RedisError> {
        Ok(self
            .client()
            .xrevrange(self.keys.operations(), "+", "-", Some(limit))
            .await?)
    }
}
