//! The tombstone purge: deleted users' documents are kept for
//! `sync.tombstone_retention` (so a late or replayed older change finds the
//! tombstone and stays stale), then removed in bounded batches every
//! `sync.tombstone_purge_interval`. Every instance runs it; the batches are
//! idempotent. After the purge an event older than the delete would create
//! the user again: replaying further back than the retention is the
//! operator's call.

use super::pause;
use crate::{clients::mongo::MongoStore, telemetry::Stats};
use mongodb::bson::DateTime;
use std::{sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// Tombstones removed per batch.
const BATCH: usize = 1000;
/// Batches per round, so one round stays short.
const MAX_BATCHES: usize = 100;

/// Purges old tombstones every `every` until the engine stops.
pub async fn run(
    mongo: MongoStore,
    stats: Arc<Stats>,
    cancel: CancellationToken,
    retention: Duration,
    every: Duration,
) {
    while pause(&cancel, every).await {
        let cutoff = DateTime::from_millis(
            crate::model::now_ms() - retention.as_millis().min(i64::MAX as u128) as i64,
        );
        let mut purged = 0;
        for _ in 0..MAX_BATCHES {
            match mongo.purge_tombstones(cutoff, BATCH).await {
                Ok(0) => break,
                Ok(n) => purged += n,
                Err(e) => {
                    tracing::warn!(error = %e, "tombstone purge failed; retried next round");
                    break;
                }
            }
        }
        if purged > 0 {
            stats.tombstones_purged(purged);
            tracing::info!(purged, "tombstones purged");
        }
    }
}
