//! Configuration of healing: deletes, resync and the consistency check
//! (DESIGN §7).

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What the scanner does with a flagged user whose profile key is missing.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MissingProfile {
    /// A dead letter (stage `load`); the flag stays until the profile is
    /// written again or the user is deleted through the API.
    DeadLetter,
    /// The user was deleted upstream: publish a delete at the flag's version.
    Delete,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ResyncConfig {
    /// Profile keys per SCAN page (one marking round per page).
    pub page_size: usize,
    /// Users per second when a request gives no rate; 0 = as fast as Redis
    /// takes it.
    pub default_rate: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ConsistencyConfig {
    /// How often this instance checks the shards it owns; zero = only on
    /// request.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Re-flag users missing in MongoDB or different there.
    pub repair: bool,
    /// Delete (through a versioned delete) MongoDB documents that have no
    /// Redis profile.
    pub repair_orphans: bool,
    /// Users compared per page (one pipeline, one `$in` query).
    pub page_size: usize,
    /// Users compared per second at most, so live sync keeps its throughput;
    /// 0 = no limit.
    pub rate: u64,
    /// A flag older than this is reported as stuck.
    #[serde(with = "humantime_serde")]
    pub stuck_flag_after: Duration,
    /// An accepted immediate change still pending after this is reported.
    #[serde(with = "humantime_serde")]
    pub static_pending_after: Duration,
    /// Sample user ids kept per finding kind.
    pub samples: usize,
    /// How long finished runs (and resync jobs) stay in Redis for reports.
    #[serde(with = "humantime_serde")]
    pub report_retention: Duration,
}

impl ResyncConfig {
    /// The rate of a resync: the one requested, else `default_rate` (0 =
    /// none).
    pub fn rate(&self, requested: Option<u64>) -> Option<u64> {
        requested.or((self.default_rate > 0).then_some(self.default_rate))
    }

    pub(super) fn validate(&self, p: &mut Vec<String>) {
        if !(1..=10_000).contains(&self.page_size) {
            p.push("resync.page_size: must be between 1 and 10000".into());
        }
    }
}

impl ConsistencyConfig {
    pub(super) fn validate(&self, p: &mut Vec<String>) {
        if !(1..=10_000).contains(&self.page_size) {
            p.push("consistency.page_size: must be between 1 and 10000".into());
        }
        if self.samples > 1000 {
            p.push("consistency.samples: must be at most 1000".into());
        }
        if self.report_retention < Duration::from_secs(60) {
            p.push("consistency.report_retention: must be at least 1m".into());
        }
    }
}
