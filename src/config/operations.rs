//! Configuration of the operations tooling: the offset-range index and
//! replay, the whitelist and the operation log (DESIGN §7).

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ReplayConfig {
    /// How often the applier's applied offset ranges are written to Redis
    /// (also on partition revocation and on shutdown).
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Ranges whose newest record is older than this are deleted.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the cleanup runs; zero = never.
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
    /// Ranges deleted per cleanup script call, so Redis is never blocked.
    pub cleanup_batch: usize,
    /// Events read per second by a replay when the request gives no rate;
    /// 0 = as fast as MongoDB takes them.
    pub default_rate: u64,
    /// Events per replay window (one collapse and one bulk write each).
    pub window_events: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WhitelistConfig {
    /// How often each instance looks for a change of the whitelist.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// Most user ids the whitelist may hold.
    pub max_entries: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct OperationsConfig {
    /// Entries the operation log keeps (older ones are trimmed).
    pub max_entries: usize,
}

impl ReplayConfig {
    /// The rate of a replay: the one requested, else `default_rate` (0 =
    /// none).
    pub fn rate(&self, requested: Option<u64>) -> Option<u64> {
        requested.or((self.default_rate > 0).then_some(self.default_rate))
    }

    pub(super) fn validate(&self, p: &mut Vec<String>) {
        if self.flush_interval < Duration::from_millis(100) {
            p.push("replay.flush_interval: must be at least 100ms".into());
        }
        if self.retention < Duration::from_secs(1) {
            p.push("replay.retention: must be at least 1s".into());
        }
        if !(1..=100_000).contains(&self.cleanup_batch) {
            p.push("replay.cleanup_batch: must be between 1 and 100000".into());
        }
        if !(1..=100_000).contains(&self.window_events) {
            p.push("replay.window_events: must be between 1 and 100000".into());
        }
    }
}

impl WhitelistConfig {
    pub(super) fn validate(&self, p: &mut Vec<String>) {
        if self.refresh_interval < Duration::from_millis(10)
            || self.refresh_interval > Duration::from_secs(60)
        {
            p.push("whitelist.refresh_interval: must be between 10ms and 60s".into());
        }
        if self.max_entries == 0 {
            p.push("whitelist.max_entries: must be at least 1".into());
        }
    }
}

impl OperationsConfig {
    pub(super) fn validate(&self, p: &mut Vec<String>) {
        if self.max_entries < 10 {
            p.push("operations.max_entries: must be at least 10".into());
        }
    }
}
