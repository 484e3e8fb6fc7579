//! The engine's long-running tasks, each named and supervised: the scan loop,
//! the static and dynamic consumer loops, the lease keeper and the dead-letter
//! forwarder.
//!
//! [`supervise`] runs a task from a factory. When the task ends while the
//! engine is not stopping (it returned, or it panicked), that is logged with
//! the task's name, readiness turns `unavailable` naming it, and the task is
//! built and started again after a pause that doubles per restart (100 ms up
//! to 5 s). A factory that fails (say, a consumer that cannot be created) is
//! retried the same way. Restarts are counted in
//! `datasync_actor_restarts_total{actor=<task>}`.

use crate::{health::Health, telemetry::Stats};
use futures::FutureExt;
use std::{future::Future, panic::AssertUnwindSafe, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// What a supervisor needs to report on its task.
#[derive(Clone)]
pub struct Supervision {
    pub health: Arc<Health>,
    pub stats: Arc<Stats>,
    pub cancel: CancellationToken,
}

/// The pause before restart number `n` (from 1): 100 ms doubling to 5 s.
pub fn restart_backoff(n: u32) -> Duration {
    Duration::from_millis(100 << n.saturating_sub(1).min(6)).min(Duration::from_secs(5))
}

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

/// Runs the task `make` builds until the engine stops, restarting it whenever
/// it ends early. Returns once the engine is stopping and the task has ended.
pub async fn supervise<M, F, E>(name: &'static str, s: Supervision, mut make: M)
where
    M: FnMut() -> Result<F, E>,
    F: Future<Output = ()>,
    E: std::fmt::Display,
{
    let mut restarts = 0u32;
    loop {
        let why = match make() {
            Ok(task) => {
                s.health.task_up(name);
                match AssertUnwindSafe(task).catch_unwind().await {
                    Ok(()) if s.cancel.is_cancelled() => return,
                    Ok(()) => "it returned".to_string(),
                    Err(panic) => format!("it panicked: {}", panic_message(panic.as_ref())),
                }
            }
            Err(e) => format!("it could not be started: {e}"),
        };
        if s.cancel.is_cancelled() {
            return;
        }
        restarts += 1;
        let pause = restart_backoff(restarts);
        tracing::error!(task = name, reason = %why, restart_in = ?pause, "task ended unexpectedly; restarting it");
        s.health.task_down(name, &why);
        s.stats.actor_restarted(name);
        tokio::select! {
            _ = s.cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_task_that_dies_is_named_restarted_and_stops_with_the_engine() {
        let s = Supervision {
            health: Arc::new(Health::new()),
            stats: Arc::new(Stats::default()),
            cancel: CancellationToken::new(),
        };
        let runs = Arc::new(AtomicU32::new(0));
        let task = {
            let (runs, s) = (runs.clone(), s.clone());
            tokio::spawn(supervise("test task", s.clone(), move || {
                let n = runs.fetch_add(1, Ordering::SeqCst);
                let cancel = s.cancel.clone();
                Ok::<_, String>(async move {
                    match n {
                        0 => panic!("boom"),
                        1 => {}
                        _ => cancel.cancelled().await,
                    }
                })
            }))
        };
        while runs.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(s.health.tasks_down().is_empty(), "running again: up");
        assert_eq!(s.stats.snapshot().actor_restarts, 2);
        s.cancel.cancel();
        task.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn backoff_doubles_to_five_seconds() {
        assert_eq!(restart_backoff(1), Duration::from_millis(100));
        assert_eq!(restart_backoff(2), Duration::from_millis(200));
        assert_eq!(restart_backoff(20), Duration::from_secs(5));
    }
}
