//! Notable events of leases and backend health, in the manner of vector's
//! `internal_events`: one struct per event; its `emit` logs it once and sets
//! its metrics, with fixed, low-cardinality labels. Adding a metric to an
//! event touches that event only.

use super::names;
use metrics::{counter, gauge, histogram};
use std::time::Duration;

/// What happened to one of this instance's leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseChange {
    Acquired,
    /// Handed back for rebalancing.
    Released,
    /// Renewal found it held by another instance.
    Lost,
}

impl LeaseChange {
    pub const ALL: [LeaseChange; 3] = [
        LeaseChange::Acquired,
        LeaseChange::Released,
        LeaseChange::Lost,
    ];

    pub fn label(self) -> &'static str {
        match self {
            LeaseChange::Acquired => "acquired",
            LeaseChange::Released => "released",
            LeaseChange::Lost => "lost",
        }
    }
}

/// A lease of this instance changed hands.
pub struct LeaseChanged {
    pub shard: u32,
    pub epoch: i64,
    pub change: LeaseChange,
}

impl LeaseChanged {
    pub fn emit(self) {
        let Self {
            shard,
            epoch,
            change,
        } = self;
        counter!(names::LEASE_CHANGES, "event" => change.label()).increment(1);
        match change {
            LeaseChange::Acquired => tracing::info!(shard, epoch, "lease acquired"),
            LeaseChange::Released => {
                tracing::info!(shard, epoch, "lease released for rebalancing")
            }
            LeaseChange::Lost => {
                tracing::warn!(shard, epoch, "lease lost to another instance")
            }
        }
    }
}

/// What this instance holds after a lease round.
pub struct LeasesHeld {
    pub shards: usize,
    /// Live members seen in the heartbeat, `None` when not read this round.
    pub members: Option<usize>,
}

impl LeasesHeld {
    pub fn emit(self) {
        gauge!(names::SHARDS_OWNED).set(self.shards as f64);
        if let Some(m) = self.members {
            gauge!(names::MEMBERS).set(m as f64);
        }
    }
}

/// A backend was marked down (logged once per outage).
pub struct BackendDown<'a> {
    pub backend: &'static str,
    pub reason: &'a str,
}

impl BackendDown<'_> {
    pub fn emit(self) {
        tracing::warn!(backend = self.backend, reason = %self.reason, "backend marked down; new work paused");
        gauge!(names::BACKEND_UP, "backend" => self.backend).set(0.0);
    }
}

/// A backend answers again after an outage of `outage`.
pub struct BackendUp {
    pub backend: &'static str,
    pub outage: Duration,
}

impl BackendUp {
    pub fn emit(self) {
        tracing::info!(backend = self.backend, outage = ?self.outage, "backend recovered");
        gauge!(names::BACKEND_UP, "backend" => self.backend).set(1.0);
        histogram!(names::OUTAGE_SECONDS, "backend" => self.backend)
            .record(self.outage.as_secs_f64());
    }
}
