//! Each sink's state as its consumer loops see it: running or down (and
//! why), its counters, its last error and its consumer lag. Read by
//! readiness, `GET /v1/sinks` and the backlog sampler, which also writes it
//! to Redis so `datasync sinks` can show every instance's sinks.

use crate::{clients::kafka::PartitionLag, model::now_ms, telemetry::names};
use metrics::{counter, gauge};
use serde::{Deserialize, Serialize};
use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering::Relaxed},
};

/// `starting` (not reached yet), `running` or `down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkState {
    Starting,
    Running,
    Down,
}

#[derive(Debug)]
struct Inner {
    state: SinkState,
    /// Why it is starting or down.
    reason: Option<String>,
    since_ms: i64,
    last_error: Option<String>,
    last_error_at_ms: Option<i64>,
    lag: Option<Vec<PartitionLag>>,
}

/// One sink's live status.
#[derive(Debug)]
pub struct SinkStatus {
    pub name: String,
    pub kind: String,
    pub primary: bool,
    pub consumer_group: String,
    pub target: String,
    /// It writes `[mongo]` itself, whose health readiness reports already:
    /// its own reason is not repeated.
    covered_by_mongo: bool,
    applied: AtomicU64,
    stale: AtomicU64,
    dead_lettered: AtomicU64,
    retried: AtomicU64,
    inner: Mutex<Inner>,
}

/// What `GET /v1/sinks` and `datasync sinks` show of one sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SinkReport {
    pub name: String,
    pub kind: String,
    pub primary: bool,
    pub consumer_group: String,
    pub target: String,
    pub state: SinkState,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// Since when it is in this state (RFC 3339).
    pub since: String,
    pub applied: u64,
    pub stale: u64,
    pub dead_lettered: u64,
    /// Changes sent again after the sink refused them with a retryable
    /// error.
    pub retried: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_error_at: Option<String>,
    /// Records not yet applied, over its groups' partitions of both
    /// topics; `None` until sampled, or when the broker did not answer.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lag: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub partitions: Option<Vec<PartitionLag>>,
    /// The instance that reported it (set where reports of several
    /// instances are listed together).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub instance: Option<String>,
    /// When this report was taken (RFC 3339).
    pub reported_at: String,
}

impl SinkStatus {
    pub fn new(name: &str, kind: &str, primary: bool, consumer_group: &str, target: &str) -> Self {
        gauge!(names::SINK_UP, "sink" => name.to_string()).set(0.0);
        for section in ["static", "dynamic", "delete"] {
            counter!(names::EVENTS_APPLIED, "sink" => name.to_string(), "section" => section)
                .increment(0);
            counter!(names::STALE_SKIPPED, "sink" => name.to_string(), "section" => section)
                .increment(0);
        }
        counter!(names::APPLY_FAILURES, "sink" => name.to_string()).increment(0);
        counter!(names::SINK_RETRIES, "sink" => name.to_string()).increment(0);
        Self {
            name: name.into(),
            kind: kind.into(),
            primary,
            consumer_group: consumer_group.into(),
            target: target.into(),
            covered_by_mongo: false,
            applied: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                state: SinkState::Starting,
                reason: Some("not reached yet".into()),
                since_ms: now_ms(),
                last_error: None,
                last_error_at_ms: None,
                lag: None,
            }),
        }
    }

    /// Marks it as the sink that writes `[mongo]` (see `covered_by_mongo`).
    pub fn writing_mongo(mut self, yes: bool) -> Self {
        self.covered_by_mongo = yes;
        self
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("sink status lock")
    }

    pub fn state(&self) -> SinkState {
        self.inner().state
    }

    /// Marks it down (or still starting, if it was never reached), with
    /// the error as its reason and last error. Logs the first time.
    pub fn failed(&self, error: &str) {
        let mut i = self.inner();
        i.last_error = Some(error.to_string());
        i.last_error_at_ms = Some(now_ms());
        match i.state {
            SinkState::Running => {
                tracing::warn!(sink = %self.name, error, "sink down; its windows are retried until it takes them");
                i.state = SinkState::Down;
                i.since_ms = now_ms();
                gauge!(names::SINK_UP, "sink" => self.name.clone()).set(0.0);
            }
            SinkState::Starting | SinkState::Down => {}
        }
        i.reason = Some(error.to_string());
    }

    /// Marks it running (it took a window or got ready).
    pub fn up(&self) {
        let mut i = self.inner();
        if i.state != SinkState::Running {
            let seconds = (now_ms() - i.since_ms) as f64 / 1000.0;
            if i.state == SinkState::Down {
                tracing::info!(sink = %self.name, seconds, "sink back");
            } else {
                tracing::info!(sink = %self.name, "sink ready");
            }
            i.state = SinkState::Running;
            i.reason = None;
            i.since_ms = now_ms();
            gauge!(names::SINK_UP, "sink" => self.name.clone()).set(1.0);
        }
    }

    /// A change refused for good, recorded as a dead letter.
    pub fn note_error(&self, error: &str) {
        let mut i = self.inner();
        i.last_error = Some(error.to_string());
        i.last_error_at_ms = Some(now_ms());
    }

    pub fn applied(&self, section: &'static str, n: u64) {
        self.applied.fetch_add(n, Relaxed);
        counter!(names::EVENTS_APPLIED, "sink" => self.name.clone(), "section" => section)
            .increment(n);
    }

    pub fn stale(&self, section: &'static str, n: u64) {
        self.stale.fetch_add(n, Relaxed);
        counter!(names::STALE_SKIPPED, "sink" => self.name.clone(), "section" => section)
            .increment(n);
    }

    pub fn dead_lettered(&self, n: u64) {
        self.dead_lettered.fetch_add(n, Relaxed);
        counter!(names::APPLY_FAILURES, "sink" => self.name.clone()).increment(n);
    }

    pub fn retried(&self, n: u64) {
        self.retried.fetch_add(n, Relaxed);
        counter!(names::SINK_RETRIES, "sink" => self.name.clone()).increment(n);
    }

    pub fn set_lag(&self, lag: Option<Vec<PartitionLag>>) {
        if let Some(l) = &lag {
            let total: i64 = l.iter().map(|p| p.lag).sum();
            gauge!(names::SINK_LAG, "sink" => self.name.clone()).set(total as f64);
        }
        self.inner().lag = lag;
    }

    /// Readiness' reason while it is not running (none for the sink that
    /// writes `[mongo]`: MongoDB's own reason says it).
    pub fn problem(&self) -> Option<String> {
        if self.covered_by_mongo {
            return None;
        }
        let i = self.inner();
        (i.state != SinkState::Running).then(|| {
            format!(
                "sink {} ({}): {}",
                self.name,
                self.kind,
                i.reason.as_deref().unwrap_or("down")
            )
        })
    }

    pub fn report(&self) -> SinkReport {
        let i = self.inner();
        SinkReport {
            name: self.name.clone(),
            kind: self.kind.clone(),
            primary: self.primary,
            consumer_group: self.consumer_group.clone(),
            target: self.target.clone(),
            state: i.state,
            reason: i.reason.clone(),
            since: crate::model::rfc3339_ms(i.since_ms),
            applied: self.applied.load(Relaxed),
            stale: self.stale.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            retried: self.retried.load(Relaxed),
            last_error: i.last_error.clone(),
            last_error_at: i.last_error_at_ms.map(crate::model::rfc3339_ms),
            lag: i.lag.as_ref().map(|l| l.iter().map(|p| p.lag).sum()),
            partitions: i.lag.clone(),
            instance: None,
            reported_at: crate::model::rfc3339_ms(now_ms()),
        }
    }
}
