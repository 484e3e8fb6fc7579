//! Logs, metrics and per-engine counters.
//!
//! Each notable event is one method on [`Stats`]: it bumps the engine's own counter
//! (what tests and the load harness read) and the process-wide Prometheus metric
//! of the same name, with fixed low-cardinality labels — never a user id.

use hdrhistogram::Histogram;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::{
    Mutex, OnceLock,
    atomic::{AtomicU64, Ordering::Relaxed},
};

/// Names of the exported metrics.
pub mod names {
    pub const FLAGS_SCANNED: &str = "datasync_flags_scanned_total";
    pub const EVENTS_PUBLISHED: &str = "datasync_events_published_total";
    pub const PUBLISH_FAILURES: &str = "datasync_publish_failures_total";
    pub const ALREADY_APPLIED: &str = "datasync_already_applied_skipped_total";
    pub const LOAD_FAILURES: &str = "datasync_load_failures_total";
    pub const FLAGS_CLEARED: &str = "datasync_flags_cleared_total";
    pub const LEGACY_DRAINED: &str = "datasync_legacy_flags_drained_total";
    pub const EVENTS_APPLIED: &str = "datasync_events_applied_total";
    pub const STALE_SKIPPED: &str = "datasync_stale_events_skipped_total";
    pub const APPLY_FAILURES: &str = "datasync_apply_failures_total";
    pub const POISON_EVENTS: &str = "datasync_poison_events_total";
    pub const FLAGS_MARKED: &str = "datasync_flags_marked_total";
    pub const FLAG_TO_APPLIED: &str = "datasync_flag_to_applied_seconds";
    /// Seed 000's `profile.sync.success{type}` and its failure twin.
    pub const SYNC_SUCCESS: &str = "datasync_profile_sync_success_total";
    pub const SYNC_FAILURE: &str = "datasync_profile_sync_failure_total";
    pub const IMMEDIATE_ACK: &str = "datasync_immediate_ack_seconds";
    pub const DLQ_RECORDS: &str = "datasync_dlq_records_total";
    pub const DLQ_PARKED: &str = "datasync_dlq_parked_total";
    pub const DLQ_OPEN: &str = "datasync_dlq_open_entries";
    pub const DLQ_OUTBOX: &str = "datasync_dlq_outbox_records";
    pub const ACTOR_RESTARTS: &str = "datasync_actor_restarts_total";
    pub const SCANS_PAUSED: &str = "datasync_scans_paused_total";
    pub const OLDEST_FLAG_AGE: &str = "datasync_oldest_flag_age_seconds";
    pub const SHARD_LAST_SCAN: &str = "datasync_shard_last_scan_timestamp_seconds";
    pub const CYCLES: &str = "datasync_scan_cycles_total";
    pub const BACKEND_UP: &str = crate::health::BACKEND_UP;
    pub const SHARDS_OWNED: &str = "datasync_shards_owned";
    pub const MEMBERS: &str = "datasync_members";
    pub const LEASE_CHANGES: &str = "datasync_lease_changes_total";
    pub const FENCED_PAGES: &str = "datasync_fenced_pages_total";
    pub const PUBLISH_RETRIES: &str = "datasync_publish_retries_total";
    pub const PRIORITY_WAITS: &str = "datasync_applier_priority_waits_total";
    pub const LEGACY_RECOVERED: &str = "datasync_legacy_flags_recovered_total";
}

/// The actors, as named in metrics and logs.
pub const ACTORS: [&str; 6] = [
    "ShardScanner",
    "ProfileLoader",
    "VersionResolver",
    "KafkaPublisher",
    "MongoApplier",
    "DlqActor",
];

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn prometheus() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(names::FLAG_TO_APPLIED.to_string()),
                &[
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                    300.0,
                ],
            )
            .expect("bucket list is not empty")
            .set_buckets_for_metric(
                Matcher::Full(names::IMMEDIATE_ACK.to_string()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
                ],
            )
            .expect("bucket list is not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed by a host application; ours still renders.
        if metrics::set_global_recorder(recorder).is_ok() {
            register_zeroes();
        }
        handle
    })
}

/// Makes every counter visible from the start, at zero.
fn register_zeroes() {
    for name in [
        names::FLAGS_MARKED,
        names::FLAGS_SCANNED,
        names::ALREADY_APPLIED,
        names::FLAGS_CLEARED,
        names::LEGACY_DRAINED,
        names::APPLY_FAILURES,
        names::POISON_EVENTS,
        names::DLQ_PARKED,
        names::CYCLES,
        names::PRIORITY_WAITS,
        names::LEGACY_RECOVERED,
    ] {
        counter!(name).increment(0);
    }
    for actor in ACTORS {
        counter!(names::ACTOR_RESTARTS, "actor" => actor).increment(0);
    }
    for stage in crate::model::DlqStage::ALL {
        counter!(names::DLQ_RECORDS, "stage" => stage.label()).increment(0);
    }
    for backend in ["kafka", "mongodb"] {
        counter!(names::SCANS_PAUSED, "backend" => backend).increment(0);
    }
    for event in ["acquired", "released", "lost"] {
        counter!(names::LEASE_CHANGES, "event" => event).increment(0);
    }
    counter!(names::FENCED_PAGES).increment(0);
    gauge!(names::SHARDS_OWNED).set(0.0);
    gauge!(names::MEMBERS).set(0.0);
    gauge!(names::DLQ_OPEN).set(0.0);
    gauge!(names::DLQ_OUTBOX).set(0.0);
    gauge!(names::OLDEST_FLAG_AGE).set(0.0);
    for t in ["static", "dynamic"] {
        counter!(names::EVENTS_PUBLISHED, "type" => t).increment(0);
        counter!(names::PUBLISH_FAILURES, "type" => t).increment(0);
        counter!(names::PUBLISH_RETRIES, "type" => t).increment(0);
        counter!(names::EVENTS_APPLIED, "section" => t).increment(0);
        counter!(names::STALE_SKIPPED, "section" => t).increment(0);
        counter!(names::SYNC_SUCCESS, "type" => t).increment(0);
        counter!(names::SYNC_FAILURE, "type" => t).increment(0);
    }
    for reason in ["missing", "bad_json", "not_an_object", "wrong_type"] {
        counter!(names::LOAD_FAILURES, "reason" => reason).increment(0);
    }
}

/// This process's resident memory and CPU time, from `/proc` (zero elsewhere).
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct ProcessUsage {
    pub rss_mb: f64,
    pub cpu_seconds: f64,
}

pub fn process_usage() -> ProcessUsage {
    let rss_kb = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0);
    // Fields 14 and 15 of /proc/self/stat (utime, stime), in clock ticks of 1/100 s.
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .unwrap_or(0.0);
    ProcessUsage {
        rss_mb: rss_kb / 1024.0,
        cpu_seconds: ticks / 100.0,
    }
}

/// Starts logging to stderr. `filter` is a tracing-subscriber filter; RUST_LOG
/// overrides it.
/// Colour is used only when stderr is a terminal: a log written to a file or a
/// pipe is plain text (or JSON).
pub fn init_logging(format: &str, filter: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Counters of one engine.
#[derive(Debug, Default)]
pub struct Stats {
    /// When each shard this process scanned was last scanned (Unix seconds).
    last_scans: dashmap::DashMap<u32, f64>,
    pub flags_marked: AtomicU64,
    pub flags_scanned: AtomicU64,
    pub events_published: AtomicU64,
    pub publish_failures: AtomicU64,
    pub already_applied: AtomicU64,
    pub load_failures: AtomicU64,
    pub flags_cleared: AtomicU64,
    pub legacy_drained: AtomicU64,
    pub events_applied: AtomicU64,
    pub stale_skipped: AtomicU64,
    pub apply_failures: AtomicU64,
    pub poison_events: AtomicU64,
    pub publish_held: AtomicU64,
    pub dlq_records: AtomicU64,
    pub dlq_parked: AtomicU64,
    pub actor_restarts: AtomicU64,
    pub scans_paused: AtomicU64,
    pub fenced_pages: AtomicU64,
    pub publish_retries: AtomicU64,
    pub priority_waits: AtomicU64,
    pub legacy_recovered: AtomicU64,
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

/// A latency histogram in milliseconds (1 ms to 1 h, 3 significant digits).
pub struct Latency(Mutex<Histogram<u64>>);

impl Default for Latency {
    fn default() -> Self {
        Self(Mutex::new(
            Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid bounds"),
        ))
    }
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Latency")
    }
}

/// Quantiles of a latency histogram, in milliseconds.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: u64,
    pub p95_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

impl Latency {
    pub fn record_ms(&self, ms: u64) {
        let mut h = self.0.lock().expect("not poisoned");
        h.saturating_record(ms.max(1));
    }

    /// A copy of the histogram, to merge several engines'.
    pub fn histogram(&self) -> Histogram<u64> {
        self.0.lock().expect("not poisoned").clone()
    }

    pub fn summarize(h: &Histogram<u64>) -> LatencySummary {
        LatencySummary {
            count: h.len(),
            p50_ms: h.value_at_quantile(0.50),
            p95_ms: h.value_at_quantile(0.95),
            p99_ms: h.value_at_quantile(0.99),
            max_ms: h.max(),
        }
    }
}

/// A plain copy of [`Stats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub flags_marked: u64,
    pub flags_scanned: u64,
    pub events_published: u64,
    pub publish_failures: u64,
    pub already_applied: u64,
    pub load_failures: u64,
    pub flags_cleared: u64,
    pub legacy_drained: u64,
    pub events_applied: u64,
    pub stale_skipped: u64,
    pub apply_failures: u64,
    pub poison_events: u64,
    /// Publish batches that found publishing paused and waited.
    pub publish_held: u64,
    /// Dead-letter records written (to Kafka or parked in Redis).
    pub dlq_records: u64,
    /// Dead-letter records parked in Redis while Kafka was unreachable.
    pub dlq_parked: u64,
    /// Actor restarts after a panic.
    pub actor_restarts: u64,
    /// Cycles or pages skipped because Kafka or MongoDB was down.
    pub scans_paused: u64,
    /// Pages whose flags were not cleared because the shard's lease was lost.
    pub fenced_pages: u64,
    /// Events re-sent by datasync's own retry policy after a failed delivery.
    pub publish_retries: u64,
    /// Dynamic windows that waited because a static window was being written.
    pub priority_waits: u64,
    /// Legacy members flagged again because their drainer never acknowledged them.
    pub legacy_recovered: u64,
}

impl std::ops::AddAssign for StatsSnapshot {
    /// Sums the counters of several engines.
    fn add_assign(&mut self, o: StatsSnapshot) {
        self.flags_marked += o.flags_marked;
        self.flags_scanned += o.flags_scanned;
        self.events_published += o.events_published;
        self.publish_failures += o.publish_failures;
        self.already_applied += o.already_applied;
        self.load_failures += o.load_failures;
        self.flags_cleared += o.flags_cleared;
        self.legacy_drained += o.legacy_drained;
        self.events_applied += o.events_applied;
        self.stale_skipped += o.stale_skipped;
        self.apply_failures += o.apply_failures;
        self.poison_events += o.poison_events;
        self.publish_held += o.publish_held;
        self.dlq_records += o.dlq_records;
        self.dlq_parked += o.dlq_parked;
        self.actor_restarts += o.actor_restarts;
        self.scans_paused += o.scans_paused;
        self.fenced_pages += o.fenced_pages;
        self.publish_retries += o.publish_retries;
        self.priority_waits += o.priority_waits;
        self.legacy_recovered += o.legacy_recovered;
    }
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            flags_marked: self.flags_marked.load(Relaxed),
            flags_scanned: self.flags_scanned.load(Relaxed),
            events_published: self.events_published.load(Relaxed),
            publish_failures: self.publish_failures.load(Relaxed),
            already_applied: self.already_applied.load(Relaxed),
            load_failures: self.load_failures.load(Relaxed),
            flags_cleared: self.flags_cleared.load(Relaxed),
            legacy_drained: self.legacy_drained.load(Relaxed),
            events_applied: self.events_applied.load(Relaxed),
            stale_skipped: self.stale_skipped.load(Relaxed),
            apply_failures: self.apply_failures.load(Relaxed),
            poison_events: self.poison_events.load(Relaxed),
            publish_held: self.publish_held.load(Relaxed),
            dlq_records: self.dlq_records.load(Relaxed),
            dlq_parked: self.dlq_parked.load(Relaxed),
            actor_restarts: self.actor_restarts.load(Relaxed),
            scans_paused: self.scans_paused.load(Relaxed),
            fenced_pages: self.fenced_pages.load(Relaxed),
            publish_retries: self.publish_retries.load(Relaxed),
            priority_waits: self.priority_waits.load(Relaxed),
            legacy_recovered: self.legacy_recovered.load(Relaxed),
        }
    }

    pub fn flags_marked(&self, n: u64) {
        self.flags_marked.fetch_add(n, Relaxed);
        counter!(names::FLAGS_MARKED).increment(n);
    }

    pub fn flags_scanned(&self, n: u64) {
        self.flags_scanned.fetch_add(n, Relaxed);
        counter!(names::FLAGS_SCANNED).increment(n);
    }

    pub fn events_published(&self, sync_type: &'static str, n: u64) {
        self.events_published.fetch_add(n, Relaxed);
        counter!(names::EVENTS_PUBLISHED, "type" => sync_type).increment(n);
    }

    /// `n` events of one batch not published; `first` is one of the errors.
    pub fn publish_failed(&self, sync_type: &'static str, n: u64, first: &dyn std::fmt::Display) {
        self.publish_failures.fetch_add(n, Relaxed);
        counter!(names::PUBLISH_FAILURES, "type" => sync_type).increment(n);
        tracing::warn!(failed = n, error = %first, sync_type, "events not published; their flags stay for the next cycle");
    }

    pub fn already_applied(&self, n: u64) {
        self.already_applied.fetch_add(n, Relaxed);
        counter!(names::ALREADY_APPLIED).increment(n);
    }

    pub fn load_failed(&self, reason: &'static str, err: &dyn std::fmt::Display) {
        self.load_failures.fetch_add(1, Relaxed);
        counter!(names::LOAD_FAILURES, "reason" => reason).increment(1);
        tracing::warn!(error = %err, reason, "profile not loadable; the flag stays");
    }

    pub fn flags_cleared(&self, n: u64) {
        self.flags_cleared.fetch_add(n, Relaxed);
        counter!(names::FLAGS_CLEARED).increment(n);
    }

    pub fn legacy_drained(&self, n: u64) {
        self.legacy_drained.fetch_add(n, Relaxed);
        counter!(names::LEGACY_DRAINED).increment(n);
    }

    pub fn applied(&self, section: &'static str, n: u64) {
        self.events_applied.fetch_add(n, Relaxed);
        if section == "static" {
            self.static_applied.fetch_add(n, Relaxed);
        }
        counter!(names::EVENTS_APPLIED, "section" => section).increment(n);
        counter!(names::SYNC_SUCCESS, "type" => section).increment(n);
    }

    pub fn stale(&self, section: &'static str, n: u64) {
        self.stale_skipped.fetch_add(n, Relaxed);
        counter!(names::STALE_SKIPPED, "section" => section).increment(n);
    }

    pub fn apply_failed(&self, err: &dyn std::fmt::Display) {
        self.apply_failures.fetch_add(1, Relaxed);
        counter!(names::APPLY_FAILURES).increment(1);
        tracing::error!(error = %err, "change rejected by MongoDB");
    }

    pub fn poison(&self, err: &dyn std::fmt::Display) {
        self.poison_events.fetch_add(1, Relaxed);
        counter!(names::POISON_EVENTS).increment(1);
        tracing::error!(error = %err, "undecodable event skipped");
    }

    pub fn publish_retried(&self, sync_type: &'static str, n: u64) {
        self.publish_retries.fetch_add(n, Relaxed);
        counter!(names::PUBLISH_RETRIES, "type" => sync_type).increment(n);
    }

    pub fn priority_wait(&self) {
        self.priority_waits.fetch_add(1, Relaxed);
        counter!(names::PRIORITY_WAITS).increment(1);
    }

    pub fn legacy_recovered(&self, n: u64) {
        self.legacy_recovered.fetch_add(n, Relaxed);
        counter!(names::LEGACY_RECOVERED).increment(n);
    }

    pub fn publish_held(&self) {
        self.publish_held.fetch_add(1, Relaxed);
        tracing::info!("publishing is paused; batch waiting");
    }

    pub fn dlq_recorded(
        &self,
        stage: crate::model::DlqStage,
        section: crate::model::Section,
        n: u64,
    ) {
        self.dlq_records.fetch_add(n, Relaxed);
        counter!(names::DLQ_RECORDS, "stage" => stage.label()).increment(n);
        counter!(names::SYNC_FAILURE, "type" => section.label()).increment(n);
    }

    pub fn dlq_parked(&self, n: u64) {
        self.dlq_parked.fetch_add(n, Relaxed);
        counter!(names::DLQ_PARKED).increment(n);
    }

    pub fn dlq_open(&self, n: u64) {
        gauge!(names::DLQ_OPEN).set(n as f64);
    }

    pub fn dlq_outbox(&self, n: u64) {
        gauge!(names::DLQ_OUTBOX).set(n as f64);
    }

    pub fn actor_restarted(&self, actor: &'static str) {
        self.actor_restarts.fetch_add(1, Relaxed);
        counter!(names::ACTOR_RESTARTS, "actor" => actor).increment(1);
    }

    pub fn scan_paused(&self, backend: &'static str) {
        self.scans_paused.fetch_add(1, Relaxed);
        counter!(names::SCANS_PAUSED, "backend" => backend).increment(1);
    }

    pub fn immediate_acked(&self, seconds: f64) {
        histogram!(names::IMMEDIATE_ACK).record(seconds);
        self.latency_ack.record_ms((seconds * 1000.0) as u64);
    }

    pub fn fenced(&self, shard: u32) {
        self.fenced_pages.fetch_add(1, Relaxed);
        counter!(names::FENCED_PAGES).increment(1);
        tracing::warn!(shard, "lease lost mid-page: flags left for the new owner");
    }

    pub fn cycle_done(&self, oldest_flag_age_secs: f64) {
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
    fn the_shard_label_takes_at_most_64_values() {
        assert_eq!(shard_label(7, 64), ("7".to_string(), 7..8));
        assert_eq!(shard_label(130, 1024), ("128-143".to_string(), 128..144));
        let labels: std::collections::HashSet<String> =
            (0..16384).map(|s| shard_label(s, 16384).0).collect();
        assert_eq!(labels.len(), 64);
        assert_eq!(shard_label(99, 100).0, "98-99");
    }
}
