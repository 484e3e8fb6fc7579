//! The priority gate between a sink's two consumer loops: while a static
//! window is being written, the dynamic loop waits before it submits its
//! next one.

use std::sync::Arc;

/// Static windows in flight; the dynamic loop waits for none before it
/// submits a window, so a ban is not queued behind a dynamic backlog.
#[derive(Debug, Default)]
pub struct PriorityGate {
    in_flight: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Longest a dynamic window waits for static work, so a flood of static
/// changes cannot starve the dynamic path.
const MAX_PRIORITY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A static window in flight at the gate; leaving is dropping it, so a
/// window dropped by a loop that died (a panic unwinds through it) leaves the
/// gate too, and the dynamic loop is not slowed for good.
pub struct GateTicket(Arc<PriorityGate>);

impl Drop for GateTicket {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl PriorityGate {
    /// Enters a static window.
    pub fn enter(self: &Arc<Self>) -> GateTicket {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        GateTicket(self.clone())
    }

    /// Static windows in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn leave(&self) {
        if self
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.idle.notify_waiters();
        }
    }

    /// Waits until no static window is in flight (at most
    /// [`MAX_PRIORITY_WAIT`]); counts the waits in `stats`.
    pub(super) async fn wait_idle(&self, stats: &crate::telemetry::Stats) {
        if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return;
        }
        stats.priority_wait();
        let deadline = tokio::time::Instant::now() + MAX_PRIORITY_WAIT;
        loop {
            let notified = self.idle.notified();
            if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_static_window_leaves_the_gate() {
        let gate = Arc::new(PriorityGate::default());
        let a = gate.enter();
        let b = gate.enter();
        assert_eq!(gate.in_flight(), 2);
        drop(a);
        // A loop that panics drops its windows while unwinding.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = b;
            panic!("the static loop dies");
        }));
        assert_eq!(gate.in_flight(), 0);
    }
}
