//! One engine's counters, and the events that move them.
//!
//! Each notable event is one method on [`Stats`]: it bumps the engine's own
//! counter (what tests, the load harness and `/v1/stats` read) and the
//! process-wide Prometheus metric, with fixed low-cardinality labels (never a
//! user id), and logs once. Per-record errors (an unloadable profile, a change
//! MongoDB rejects, an undecodable event) log at most once a second each,
//! with how many were left out. The engine's counters are declared once, in
//! [`engine_counters!`]'s list: the atomics, the snapshot, its sum and the
//! copy all come from it.

use super::{Latency, names};
use metrics::{counter, gauge, histogram};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Declares the engine's counters: an atomic each in [`Counters`], a field
/// each in [`StatsSnapshot`], summed by `+=` and copied by
/// [`Stats::snapshot`].
macro_rules! engine_counters {
    ($( $(#[$doc:meta])* $name:ident, )*) => {
        /// The atomics behind [`StatsSnapshot`].
        #[derive(Debug, Default)]
        struct Counters {
            $( $name: AtomicU64, )*
        }

        /// A plain copy of an engine's counters at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct StatsSnapshot {
            $( $(#[$doc])* #[serde(default)] pub $name: u64, )*
        }

        impl std::ops::AddAssign for StatsSnapshot {
            /// Sums the counters of several engines.
            fn add_assign(&mut self, o: StatsSnapshot) {
                $( self.$name += o.$name; )*
            }
        }

        impl Counters {
            fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $( $name: self.$name.load(Relaxed), )* }
            }
        }
    };
}

engine_counters! {
    flags_marked,
    flags_scanned,
    events_published,
    publish_failures,
    already_applied,
    load_failures,
    flags_cleared,
    legacy_drained,
    events_applied,
    stale_skipped,
    apply_failures,
    poison_events,
    /// Publish batches that found publishing paused and waited.
    publish_held,
    /// Dead-letter records written (to Kafka or parked in Redis).
    dlq_records,
    /// Dead-letter records parked in Redis while Kafka was unreachable.
    dlq_parked,
    /// Actor restarts after a panic.
    actor_restarts,
    /// Cycles or pages skipped because Kafka or MongoDB was down.
    scans_paused,
    /// Pages whose flags were not cleared because the shard's lease was lost.
    fenced_pages,
    /// Events re-sent by datasync's own retry policy after a failed delivery.
    publish_retries,
    /// Dynamic windows that waited because a static window was being written.
    priority_waits,
    /// Legacy members flagged again because their drainer never acknowledged them.
    legacy_recovered,
    /// Users deleted (POST /v1/sync/delete, a delete redrive, an orphan repair).
    users_deleted,
    /// Tombstones purged after sync.tombstone_retention.
    tombstones_purged,
    /// Users flagged again by resync jobs.
    resync_flagged,
    /// Consistency findings, every kind.
    consistency_findings,
    /// Users flagged again (or orphans deleted) by consistency repairs.
    consistency_repaired,
    /// Applied offset ranges written to the index.
    offset_ranges_flushed,
    /// Offset ranges deleted after replay.retention.
    offset_ranges_deleted,
    /// Events a replay applied to MongoDB.
    replay_applied,
    /// Scan cycles finished with no shard paused by a backend down.
    scan_cycles,
}

/// Lets a log line through at most once a second; counts what it held back.
#[derive(Debug, Default)]
struct RateLimit {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// `Some(lines held back since the last one)` when this one may log.
    fn allow(&self) -> Option<u64> {
        let now = crate::model::now_ms() as u64;
        let last = self.last_ms.load(Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

/// Counters of one engine.
#[derive(Debug, Default)]
pub struct Stats {
    c: Counters,
    /// When each shard this process scanned was last scanned (Unix seconds).
    last_scans: dashmap::DashMap<u32, f64>,
    /// Rate limits of the per-record error logs: load, apply, decode.
    logs: [RateLimit; 3],
    /// Flag → applied latency of this engine's applied dynamic changes.
    pub latency: Latency,
    /// Request → applied latency of this engine's applied static changes.
    pub latency_static: Latency,
    pub static_applied: AtomicU64,
    /// Request → broker ack latency of immediate changes.
    pub latency_ack: Latency,
}

/// The most values the `shard` label of any metric takes.
pub const SHARD_LABELS: u32 = 64;

/// The `shard` label of a shard, and the shards that share it.
fn shard_label(shard: u32, shards: u32) -> (String, std::ops::Range<u32>) {
    if shards <= SHARD_LABELS {
        return (shard.to_string(), shard..shard + 1);
    }
    let per = shards.div_ceil(SHARD_LABELS);
    let first = shard / per * per;
    let end = (first + per).min(shards);
    (format!("{first}-{}", end - 1), first..end)
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        self.c.snapshot()
    }

    pub fn users_deleted(&self, n: u64) {
        self.c.users_deleted.fetch_add(n, Relaxed);
        counter!(names::USERS_DELETED).increment(n);
    }

    pub fn tombstones_purged(&self, n: u64) {
        self.c.tombstones_purged.fetch_add(n, Relaxed);
        counter!(names::TOMBSTONES_PURGED).increment(n);
    }

    pub fn offset_ranges_flushed(&self, n: u64) {
        self.c.offset_ranges_flushed.fetch_add(n, Relaxed);
        counter!(names::OFFSET_RANGES_FLUSHED).increment(n);
    }

    pub fn offset_ranges_deleted(&self, n: u64) {
        self.c.offset_ranges_deleted.fetch_add(n, Relaxed);
        counter!(names::OFFSET_RANGES_DELETED).increment(n);
    }

    /// A replay window's counts by outcome.
    pub fn replayed(&self, applied: u64, stale: u64, filtered: u64, errors: u64) {
        self.c.replay_applied.fetch_add(applied, Relaxed);
        for (outcome, n) in [
            ("applied", applied),
            ("stale", stale),
            ("filtered", filtered),
            ("error", errors),
        ] {
            if n > 0 {
                counter!(names::REPLAY_EVENTS, "outcome" => outcome).increment(n);
            }
        }
    }

    pub fn resync_flagged(&self, n: u64) {
        self.c.resync_flagged.fetch_add(n, Relaxed);
        counter!(names::RESYNC_FLAGGED).increment(n);
    }

    /// One finished consistency check: findings per kind, repairs, when it
    /// finished (Unix seconds) and how long it took.
    pub fn consistency_checked(
        &self,
        findings: &[(&'static str, u64)],
        repaired: u64,
        finished_at_s: f64,
        seconds: f64,
    ) {
        for &(kind, n) in findings {
            self.c.consistency_findings.fetch_add(n, Relaxed);
            counter!(names::CONSISTENCY_FINDINGS, "kind" => kind).increment(n);
        }
        self.c.consistency_repaired.fetch_add(repaired, Relaxed);
        counter!(names::CONSISTENCY_REPAIRED).increment(repaired);
        counter!(names::CONSISTENCY_RUNS).increment(1);
        gauge!(names::CONSISTENCY_LAST_RUN).set(finished_at_s);
        histogram!(names::CONSISTENCY_DURATION).record(seconds);
    }

    pub fn flags_marked(&self, n: u64) {
        self.c.flags_marked.fetch_add(n, Relaxed);
        counter!(names::FLAGS_MARKED).increment(n);
    }

    pub fn flags_scanned(&self, n: u64) {
        self.c.flags_scanned.fetch_add(n, Relaxed);
        counter!(names::FLAGS_SCANNED).increment(n);
    }

    pub fn events_published(&self, sync_type: &'static str, n: u64) {
        self.c.events_published.fetch_add(n, Relaxed);
        counter!(names::EVENTS_PUBLISHED, "type" => sync_type).increment(n);
    }

    /// `n` events of one batch not published; `first` is one of the errors.
    pub fn publish_failed(&self, sync_type: &'static str, n: u64, first: &dyn std::fmt::Display) {
        self.c.publish_failures.fetch_add(n, Relaxed);
        counter!(names::PUBLISH_FAILURES, "type" => sync_type).increment(n);
        tracing::warn!(failed = n, error = %first, sync_type, "events not published; their flags stay for the next cycle");
    }

    pub fn already_applied(&self, n: u64) {
        self.c.already_applied.fetch_add(n, Relaxed);
        counter!(names::ALREADY_APPLIED).increment(n);
    }

    pub fn load_failed(&self, reason: &'static str, err: &dyn std::fmt::Display) {
        self.c.load_failures.fetch_add(1, Relaxed);
        counter!(names::LOAD_FAILURES, "reason" => reason).increment(1);
        if let Some(suppressed) = self.logs[0].allow() {
            tracing::warn!(error = %err, reason, suppressed, "profile not loadable; the flag stays");
        }
    }

    pub fn flags_cleared(&self, n: u64) {
        self.c.flags_cleared.fetch_add(n, Relaxed);
        counter!(names::FLAGS_CLEARED).increment(n);
    }

    pub fn legacy_drained(&self, n: u64) {
        self.c.legacy_drained.fetch_add(n, Relaxed);
        counter!(names::LEGACY_DRAINED).increment(n);
    }

    /// Changes the primary sink applied (each sink's own count, with its
    /// `sink` label, is in [`crate::sinks::SinkStatus`]).
    pub fn applied(&self, section: &'static str, n: u64) {
        self.c.events_applied.fetch_add(n, Relaxed);
        if section == "static" {
            self.static_applied.fetch_add(n, Relaxed);
        }
        counter!(names::SYNC_SUCCESS, "type" => section).increment(n);
    }

    /// Changes the primary sink found stale (or superseded in a window).
    pub fn stale(&self, n: u64) {
        self.c.stale_skipped.fetch_add(n, Relaxed);
    }

    /// A change a sink refused for good (dead-lettered).
    pub fn apply_failed(&self, sink: &str, err: &dyn std::fmt::Display) {
        self.c.apply_failures.fetch_add(1, Relaxed);
        if let Some(suppressed) = self.logs[1].allow() {
            tracing::error!(sink, error = %err, suppressed, "change refused by a sink");
        }
    }

    pub fn poison(&self, err: &dyn std::fmt::Display) {
        self.c.poison_events.fetch_add(1, Relaxed);
        counter!(names::POISON_EVENTS).increment(1);
        if let Some(suppressed) = self.logs[2].allow() {
            tracing::error!(error = %err, suppressed, "undecodable event skipped");
        }
    }

    pub fn publish_retried(&self, sync_type: &'static str, n: u64) {
        self.c.publish_retries.fetch_add(n, Relaxed);
        counter!(names::PUBLISH_RETRIES, "type" => sync_type).increment(n);
    }

    pub fn priority_wait(&self) {
        self.c.priority_waits.fetch_add(1, Relaxed);
        counter!(names::PRIORITY_WAITS).increment(1);
    }

    pub fn legacy_recovered(&self, n: u64) {
        self.c.legacy_recovered.fetch_add(n, Relaxed);
        counter!(names::LEGACY_RECOVERED).increment(n);
    }

    pub fn publish_held(&self) {
        self.c.publish_held.fetch_add(1, Relaxed);
        tracing::info!("publishing is paused; batch waiting");
    }

    pub fn dlq_recorded(
        &self,
        stage: crate::model::DlqStage,
        section: crate::model::Section,
        n: u64,
    ) {
        self.c.dlq_records.fetch_add(n, Relaxed);
        counter!(names::DLQ_RECORDS, "stage" => stage.label()).increment(n);
        counter!(names::SYNC_FAILURE, "type" => section.label()).increment(n);
    }

    pub fn dlq_parked(&self, n: u64) {
        self.c.dlq_parked.fetch_add(n, Relaxed);
        counter!(names::DLQ_PARKED).increment(n);
    }

    pub fn dlq_open(&self, n: u64) {
        gauge!(names::DLQ_OPEN).set(n as f64);
    }

    pub fn dlq_outbox(&self, n: u64) {
        gauge!(names::DLQ_OUTBOX).set(n as f64);
    }

    pub fn actor_restarted(&self, actor: &'static str) {
        self.c.actor_restarts.fetch_add(1, Relaxed);
        counter!(names::ACTOR_RESTARTS, "actor" => actor).increment(1);
    }

    pub fn scan_paused(&self, backend: &'static str) {
        self.c.scans_paused.fetch_add(1, Relaxed);
        counter!(names::SCANS_PAUSED, "backend" => backend).increment(1);
    }

    pub fn immediate_acked(&self, seconds: f64) {
        histogram!(names::IMMEDIATE_ACK).record(seconds);
        self.latency_ack.record_ms((seconds * 1000.0) as u64);
    }

    pub fn fenced(&self, shard: u32) {
        self.c.fenced_pages.fetch_add(1, Relaxed);
        counter!(names::FENCED_PAGES).increment(1);
        tracing::warn!(shard, "lease lost mid-page: flags left for the new owner");
    }

    /// A cycle ended; `whole` when no shard of it was paused by a backend down.
    pub fn cycle_done(&self, oldest_flag_age_secs: f64, whole: bool) {
        if whole {
            self.c.scan_cycles.fetch_add(1, Relaxed);
        }
        counter!(names::CYCLES).increment(1);
        gauge!(names::OLDEST_FLAG_AGE).set(oldest_flag_age_secs);
    }

    /// A shard's scan finished at `unix_secs`. The gauge's `shard` label has
    /// at most [`SHARD_LABELS`] values: with more shards than that, each label
    /// is a range of shards (`"64-127"`), and its value the oldest last scan
    /// among the range's shards this process scanned, so a stalled shard still
    /// shows.
    pub fn shard_scanned(&self, shard: u32, shards: u32, unix_secs: f64) {
        self.last_scans.insert(shard, unix_secs);
        let (label, range) = shard_label(shard, shards);
        let oldest = range
            .filter_map(|s| self.last_scans.get(&s).map(|t| *t))
            .fold(f64::INFINITY, f64::min);
        gauge!(names::SHARD_LAST_SCAN, "shard" => label).set(oldest);
    }

    /// Latency of one applied change, from its version (flag or immediate
    /// request) to MongoDB.
    pub fn flag_to_applied(&self, sync_type: &'static str, seconds: f64) {
        histogram!(names::FLAG_TO_APPLIED, "type" => sync_type).record(seconds);
        if sync_type == "static" {
            self.latency_static.record_ms((seconds * 1000.0) as u64);
        } else {
            self.latency.record_ms((seconds * 1000.0) as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limited_log_lets_one_line_a_second_through() {
        let r = RateLimit::default();
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        r.last_ms.store(0, Relaxed);
        assert_eq!(r.allow(), Some(2), "the two held back are counted");
    }

    #[test]
    fn the_shard_label_takes_at_most_64_values() {
        assert_eq!(shard_label(7, 64), ("7".to_string(), 7..8));
        assert_eq!(shard_label(130, 1024), ("128-143".to_string(), 128..144));
        let labels: std::collections::HashSet<String> =
            (0..16384).map(|s| shard_label(s, 16384).0).collect();
        assert_eq!(labels.len(), 64);
        assert_eq!(shard_label(99, 100).0, "98-99");
    }
}
