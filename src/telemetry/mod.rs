//! Logs, metrics and per-engine counters.
//!
//! - [`stats`]: an engine's counters; each notable event of the data path is
//!   one method on [`Stats`] that bumps its counter and metric and logs once.
//! - [`events`]: the notable events of leases and backend health, one struct
//!   each whose `emit` logs and sets its metrics.
//! - Here: the metric names, the Prometheus recorder, logging setup, process
//!   usage and latency histograms.

mod events;
mod stats;

pub use events::{BackendDown, BackendUp, LeaseChange, LeaseChanged, LeasesHeld};
pub use stats::{SHARD_LABELS, Stats, StatsSnapshot};

use hdrhistogram::Histogram;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::{Mutex, OnceLock};

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
    /// 1 while a sink takes windows, 0 while it is down or not reached yet.
    pub const SINK_UP: &str = "datasync_sink_up";
    /// A sink's consumer lag over both topics.
    pub const SINK_LAG: &str = "datasync_sink_lag";
    /// Changes sent to a sink again after it refused them with a retryable error.
    pub const SINK_RETRIES: &str = "datasync_sink_retries_total";
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
    pub const BACKEND_UP: &str = "datasync_backend_up";
    pub const OUTAGE_SECONDS: &str = "datasync_backend_outage_seconds";
    pub const SHARDS_OWNED: &str = "datasync_shards_owned";
    pub const MEMBERS: &str = "datasync_members";
    pub const LEASE_CHANGES: &str = "datasync_lease_changes_total";
    pub const FENCED_PAGES: &str = "datasync_fenced_pages_total";
    pub const PUBLISH_RETRIES: &str = "datasync_publish_retries_total";
    pub const PRIORITY_WAITS: &str = "datasync_applier_priority_waits_total";
    pub const LEGACY_RECOVERED: &str = "datasync_legacy_flags_recovered_total";
    pub const USERS_DELETED: &str = "datasync_users_deleted_total";
    pub const TOMBSTONES_PURGED: &str = "datasync_tombstones_purged_total";
    pub const RESYNC_FLAGGED: &str = "datasync_resync_flagged_total";
    pub const OFFSET_RANGES_FLUSHED: &str = "datasync_offset_ranges_flushed_total";
    pub const OFFSET_RANGES_DELETED: &str = "datasync_offset_ranges_deleted_total";
    /// Label `outcome`: applied, stale, filtered, error.
    pub const REPLAY_EVENTS: &str = "datasync_replay_events_total";
    /// Label `reason`: unauthorized, forbidden, rate_limited.
    pub const HTTP_REFUSED: &str = "datasync_http_refused_total";
    pub const PENDING_FLAGS_TOTAL: &str = "datasync_pending_flags_total";
    pub const PENDING_FLAGS_OWNED: &str = "datasync_pending_flags_owned";
    pub const PENDING_STATIC: &str = "datasync_pending_static";
    /// 1 with Redis' append-only file on, 0 without, -1 when unknown.
    pub const REDIS_DURABLE: &str = "datasync_redis_durable";
    /// Labels `topic`, `partition`.
    pub const CONSUMER_LAG: &str = "datasync_consumer_lag";
    /// Label `kind`: missing, different, orphan, stuck_flag, static_pending.
    pub const CONSISTENCY_FINDINGS: &str = "datasync_consistency_findings_total";
    pub const CONSISTENCY_REPAIRED: &str = "datasync_consistency_repaired_total";
    pub const CONSISTENCY_RUNS: &str = "datasync_consistency_runs_total";
    /// Unix seconds of the last finished check (the alert on a check that
    /// has not run reads it).
    pub const CONSISTENCY_LAST_RUN: &str = "datasync_consistency_last_run_timestamp_seconds";
    pub const CONSISTENCY_DURATION: &str = "datasync_consistency_check_seconds";
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
                    300.0, 600.0, 1800.0,
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
        // Histogram samples are buffered until drained: by a scrape of
        // /metrics, or by this upkeep. Without it, a process nobody scrapes
        // would keep one sample of every change it applied.
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("datasync-metrics".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(METRICS_UPKEEP);
                    upkeep.run_upkeep();
                }
            });
        handle
    })
}

/// How often the recorder's buffered histogram samples are drained.
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Makes every counter visible from the start, at zero.
fn register_zeroes() {
    for name in [
        names::FLAGS_MARKED,
        names::FLAGS_SCANNED,
        names::ALREADY_APPLIED,
        names::FLAGS_CLEARED,
        names::LEGACY_DRAINED,
        names::POISON_EVENTS,
        names::DLQ_PARKED,
        names::CYCLES,
        names::PRIORITY_WAITS,
        names::LEGACY_RECOVERED,
        names::USERS_DELETED,
        names::TOMBSTONES_PURGED,
        names::RESYNC_FLAGGED,
        names::OFFSET_RANGES_FLUSHED,
        names::OFFSET_RANGES_DELETED,
        names::CONSISTENCY_REPAIRED,
        names::CONSISTENCY_RUNS,
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
    for change in LeaseChange::ALL {
        counter!(names::LEASE_CHANGES, "event" => change.label()).increment(0);
    }
    counter!(names::FENCED_PAGES).increment(0);
    gauge!(names::SHARDS_OWNED).set(0.0);
    gauge!(names::MEMBERS).set(0.0);
    gauge!(names::DLQ_OPEN).set(0.0);
    gauge!(names::DLQ_OUTBOX).set(0.0);
    gauge!(names::OLDEST_FLAG_AGE).set(0.0);
    gauge!(names::CONSISTENCY_LAST_RUN).set(0.0);
    for kind in crate::jobs::consistency::KINDS {
        counter!(names::CONSISTENCY_FINDINGS, "kind" => kind).increment(0);
    }
    for t in ["static", "dynamic", "delete"] {
        counter!(names::EVENTS_PUBLISHED, "type" => t).increment(0);
        counter!(names::PUBLISH_FAILURES, "type" => t).increment(0);
        counter!(names::PUBLISH_RETRIES, "type" => t).increment(0);
        counter!(names::SYNC_SUCCESS, "type" => t).increment(0);
        counter!(names::SYNC_FAILURE, "type" => t).increment(0);
    }
    for reason in ["missing", "bad_json", "not_an_object", "wrong_type"] {
        counter!(names::LOAD_FAILURES, "reason" => reason).increment(0);
    }
    for outcome in ["applied", "stale", "filtered", "error"] {
        counter!(names::REPLAY_EVENTS, "outcome" => outcome).increment(0);
    }
    for reason in ["unauthorized", "forbidden", "rate_limited"] {
        counter!(names::HTTP_REFUSED, "reason" => reason).increment(0);
    }
    for name in [
        names::PENDING_FLAGS_TOTAL,
        names::PENDING_FLAGS_OWNED,
        names::PENDING_STATIC,
    ] {
        gauge!(name).set(0.0);
    }
    // Unknown until the first backlog sample reads Redis' settings.
    gauge!(names::REDIS_DURABLE).set(-1.0);
}

/// This process's resident memory and CPU time, from `/proc` (zero elsewhere).
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct ProcessUsage {
    pub rss_mb: f64,
    pub cpu_seconds: f64,
}

pub fn process_usage() -> ProcessUsage {
    process_usage_of("self").unwrap_or_default()
}

/// Another process's (`pid`, or `"self"`): `None` when `/proc/<pid>` cannot
/// be read (the process is gone, or there is no `/proc`).
pub fn process_usage_of(pid: &str) -> Option<ProcessUsage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0);
    // Fields 14 and 15 of /proc/<pid>/stat (utime, stime), in clock ticks of 1/100 s.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ProcessUsage {
        rss_mb: rss_kb / 1024.0,
        cpu_seconds: ticks / 100.0,
    })
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
    /// The histogram in HdrHistogram's compressed V2 encoding, base64: what
    /// `/v1/stats` gives under `histograms`, so a reader can merge several
    /// services' distributions instead of combining their quantiles.
    pub fn encode(h: &Histogram<u64>) -> String {
        use base64::Engine as _;
        use hdrhistogram::serialization::{Serializer, V2DeflateSerializer};
        let mut bytes = Vec::new();
        match V2DeflateSerializer::new().serialize(h, &mut bytes) {
            Ok(_) => base64::engine::general_purpose::STANDARD.encode(bytes),
            Err(e) => {
                tracing::warn!(error = ?e, "latency histogram not encoded");
                String::new()
            }
        }
    }

    /// The reverse of [`Latency::encode`].
    pub fn decode(text: &str) -> anyhow::Result<Histogram<u64>> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD.decode(text)?;
        hdrhistogram::serialization::Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| anyhow::anyhow!("latency histogram: {e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_histogram_decodes_to_the_same_distribution() {
        let l = Latency::default();
        for ms in [1, 5, 5, 80, 1200, 3_600_000] {
            l.record_ms(ms);
        }
        let h = l.histogram();
        let back = Latency::decode(&Latency::encode(&h)).unwrap();
        assert_eq!(back, h);
        assert_eq!(Latency::summarize(&back).count, 6);
        assert!(Latency::decode("not base64!").is_err());
    }
}
