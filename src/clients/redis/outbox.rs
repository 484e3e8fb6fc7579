//! Dead-letter records parked in a Redis stream while Kafka is unreachable.

use super::{RedisError, RedisStore};
use fred::{prelude::*, types::Value as RValue};
use std::collections::HashMap;

impl RedisStore {
    /// Parks an encoded dead-letter record until Kafka is back.
    pub async fn outbox_push(&self, records: &[Vec<u8>]) -> Result<(), RedisError> {
        if records.is_empty() {
            return Ok(());
        }
        let pipe = self.client().pipeline();
        for r in records {
            let _: () = pipe
                .xadd(
                    self.keys.dlq_outbox(),
                    false,
                    None,
                    "*",
                    vec![("record", bytes::Bytes::copy_from_slice(r))],
                )
                .await?;
        }
        let _: Vec<RValue> = pipe.all().await?;
        Ok(())
    }

    /// The oldest `n` parked records: `(stream id, bytes)`.
    pub async fn outbox_read(&self, n: u64) -> Result<Vec<(String, Vec<u8>)>, RedisError> {
        let entries: Vec<(String, HashMap<String, bytes::Bytes>)> = self
            .client()
            .xrange(self.keys.dlq_outbox(), "-", "+", Some(n))
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|(id, mut f)| f.remove("record").map(|b| (id, b.to_vec())))
            .collect())
    }

    /// Drops forwarded records from the outbox.
    pub async fn outbox_ack(&self, ids: &[String]) -> Result<(), RedisError> {
        if ids.is_empty() {
            return Ok(());
        }
        let _: i64 = self
            .client()
            .xdel(self.keys.dlq_outbox(), ids.to_vec())
            .await?;
        Ok(())
    }

    /// Records parked in the outbox.
    pub async fn outbox_len(&self) -> Result<u64, RedisError> {
        Ok(self.client().xlen(self.keys.dlq_outbox()).await?)
    }
}
