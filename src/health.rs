//! Which backends are reachable, as seen by the stages that call them, and
//! which of the engine's long-running tasks are not running.
//!
//! A stage that gives up on Kafka or MongoDB marks it down; the ShardScanner then
//! stops pulling new work (probing the backend before each page instead), and
//! readiness reports `degraded` with the reason. The first success marks the
//! backend up again, and the outage's length is logged and measured. A task
//! that ended unexpectedly makes readiness `unavailable`, naming it, until it
//! runs again (see [`crate::tasks`]).

use crate::telemetry::{BackendDown, BackendUp, names};
use dashmap::DashMap;
use metrics::gauge;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Redis,
    Kafka,
    Mongo,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Redis, Backend::Kafka, Backend::Mongo];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Redis => "redis",
            Backend::Kafka => "kafka",
            Backend::Mongo => "mongodb",
        }
    }
}

#[derive(Debug, Clone)]
struct Down {
    since: Instant,
    reason: String,
    /// Not reached yet since start: answering is not a recovery.
    starting: bool,
}

/// One outage seen and over.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outage {
    pub backend: Backend,
    pub seconds: f64,
}

/// Outages kept for `/v1/stats` (the oldest are dropped first).
const OUTAGES_KEPT: usize = 100;

#[derive(Debug, Default)]
pub struct Health {
    down: DashMap<Backend, Down>,
    recovered: std::sync::Mutex<std::collections::VecDeque<Outage>>,
    tasks_down: DashMap<&'static str, String>,
}

impl Health {
    pub fn new() -> Self {
        for b in Backend::ALL {
            gauge!(names::BACKEND_UP, "backend" => b.name()).set(1.0);
        }
        Self::default()
    }

    /// Marks `b` down (the first reason and time are kept until it recovers).
    pub fn set_down(&self, b: Backend, reason: impl std::fmt::Display) {
        if !self.down.contains_key(&b) {
            let reason = reason.to_string();
            BackendDown {
                backend: b.name(),
                reason: &reason,
            }
            .emit();
            self.down.entry(b).or_insert(Down {
                since: Instant::now(),
                reason,
                starting: false,
            });
        }
    }

    /// Marks `b` down at start, before it was ever reached: not an outage to
    /// warn about, only a reason for readiness until it answers.
    pub fn set_starting(&self, b: Backend, reason: impl std::fmt::Display) {
        gauge!(names::BACKEND_UP, "backend" => b.name()).set(0.0);
        self.down.entry(b).or_insert(Down {
            since: Instant::now(),
            reason: reason.to_string(),
            starting: true,
        });
    }

    /// Marks `b` up; returns how long it was down, if it was.
    pub fn set_up(&self, b: Backend) -> Option<Duration> {
        let (_, d) = self.down.remove(&b)?;
        let took = d.since.elapsed();
        if d.starting {
            gauge!(names::BACKEND_UP, "backend" => b.name()).set(1.0);
            tracing::info!(backend = b.name(), after = ?took, "backend reached");
            return Some(took);
        }
        BackendUp {
            backend: b.name(),
            outage: took,
        }
        .emit();
        let mut recovered = self.recovered.lock().expect("not poisoned");
        if recovered.len() == OUTAGES_KEPT {
            recovered.pop_front();
        }
        recovered.push_back(Outage {
            backend: b,
            seconds: took.as_secs_f64(),
        });
        Some(took)
    }

    /// Updates the reason of a backend that is down (the time it went down
    /// is kept).
    pub fn replace_reason(&self, b: Backend, reason: impl std::fmt::Display) {
        if let Some(mut d) = self.down.get_mut(&b) {
            d.reason = reason.to_string();
        }
    }

    /// Why a backend is down, if it is.
    pub fn reason(&self, b: Backend) -> Option<String> {
        self.down.get(&b).map(|d| d.reason.clone())
    }

    pub fn is_down(&self, b: Backend) -> bool {
        self.down.contains_key(&b)
    }

    /// Backends down, with the reason and for how long, sorted by backend.
    pub fn problems(&self) -> Vec<String> {
        let mut v: Vec<(Backend, String)> = self
            .down
            .iter()
            .map(|e| {
                (
                    *e.key(),
                    format!(
                        "{} down for {:.1}s: {}",
                        e.key().name(),
                        e.since.elapsed().as_secs_f64(),
                        e.reason
                    ),
                )
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// Outages that are over, oldest first (the last 100).
    pub fn outages(&self) -> Vec<Outage> {
        self.recovered
            .lock()
            .expect("not poisoned")
            .iter()
            .cloned()
            .collect()
    }

    /// A long-running task is not running (it ended, and is being restarted).
    pub fn task_down(&self, name: &'static str, reason: impl std::fmt::Display) {
        self.tasks_down.insert(name, reason.to_string());
    }

    /// The task runs again.
    pub fn task_up(&self, name: &'static str) {
        self.tasks_down.remove(name);
    }

    /// Tasks not running, with the reason, sorted by name.
    pub fn tasks_down(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .tasks_down
            .iter()
            .map(|e| format!("task {} is not running: {}", e.key(), e.value()))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_then_up_records_the_outage() {
        let h = Health::new();
        assert!(h.set_up(Backend::Kafka).is_none());
        h.set_down(Backend::Kafka, "broker gone");
        h.set_down(Backend::Kafka, "second reason is ignored");
        assert!(h.is_down(Backend::Kafka));
        let p = h.problems();
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("kafka down for") && p[0].ends_with("broker gone"),
            "{p:?}"
        );
        assert!(h.set_up(Backend::Kafka).is_some());
        assert!(!h.is_down(Backend::Kafka));
        assert_eq!(h.outages().len(), 1);
        for _ in 0..150 {
            h.set_down(Backend::Mongo, "again");
            h.set_up(Backend::Mongo);
        }
        assert_eq!(h.outages().len(), 100, "the outage list is bounded");
    }

    #[test]
    fn tasks_down_are_named_until_up() {
        let h = Health::new();
        h.task_down("lease keeper", "panicked: boom");
        assert_eq!(
            h.tasks_down(),
            vec!["task lease keeper is not running: panicked: boom".to_string()]
        );
        h.task_up("lease keeper");
        assert!(h.tasks_down().is_empty());
    }
}
