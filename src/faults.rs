//! Fault injection for tests and drills: make the next N handler calls of an
//! actor panic, to prove that supervision restarts it and that the batch it held
//! is retried, not lost; pause lease renewals; hold a task at a named point of
//! the data path to force a race. Inert unless armed through
//! [`crate::Engine::faults`].

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
};
use tokio::sync::{OwnedRwLockWriteGuard, RwLock};
use tokio_util::sync::CancellationToken;

/// The actors a fault can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Loader,
    Resolver,
    Publisher,
    Applier,
    /// The scan loop and on-demand cycles, with a page loaded and not yet
    /// published.
    Scanner,
    /// A consumer loop, before it submits a window.
    ConsumerLoop,
}

/// Points where a task can be held (see [`Faults::hold`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldPoint {
    /// The legacy drainer, after a pop and before it flags the members.
    LegacyPopped,
    /// The legacy drainer, after flagging and before it acknowledges the pop.
    LegacyMarked,
    /// The static consumer loop, with a window submitted (the priority gate
    /// entered) and before its outcome is taken.
    StaticWindow,
}

const HOLD_POINTS: usize = 3;

#[derive(Debug, Default)]
pub struct Faults {
    panics: [AtomicU32; 6],
    leases_paused: AtomicBool,
    holds: [Arc<RwLock<()>>; HOLD_POINTS],
    reached: [AtomicU64; HOLD_POINTS],
    cancel: CancellationToken,
}

/// Tasks reaching the point wait while this guard lives.
pub struct Hold(#[allow(dead_code)] OwnedRwLockWriteGuard<()>);

impl Faults {
    fn slot(&self, s: Stage) -> &AtomicU32 {
        &self.panics[s as usize]
    }

    /// The next `n` calls handled by `stage` panic.
    pub fn panic_next(&self, stage: Stage, n: u32) {
        self.slot(stage).store(n, Ordering::SeqCst);
    }

    /// Stops (or resumes) heartbeats and lease renewals, as a stalled process
    /// would: the leases run out while the rest of the engine goes on.
    pub fn pause_leases(&self, paused: bool) {
        self.leases_paused.store(paused, Ordering::SeqCst);
    }

    pub fn leases_paused(&self) -> bool {
        self.leases_paused.load(Ordering::SeqCst)
    }

    /// Holds every task that reaches `point` until the guard is dropped.
    pub async fn hold(&self, point: HoldPoint) -> Hold {
        Hold(self.holds[point as usize].clone().write_owned().await)
    }

    /// How many times a task reached `point` (held or not).
    pub fn reached(&self, point: HoldPoint) -> u64 {
        self.reached[point as usize].load(Ordering::SeqCst)
    }

    /// Waits at `point` while it is held. Returns false if the engine stopped
    /// meanwhile: the caller then gives up where it is, as a process killed at
    /// that point would.
    pub async fn pass(&self, point: HoldPoint) -> bool {
        self.reached[point as usize].fetch_add(1, Ordering::SeqCst);
        tokio::select! {
            biased;
            _ = self.holds[point as usize].read() => true,
            _ = self.cancel.cancelled() => false,
        }
    }

    /// Lets held tasks give up (the engine is stopping).
    pub fn release_all(&self) {
        self.cancel.cancel();
    }

    /// Panics if a fault is armed for `stage` (and disarms one).
    pub fn check(&self, stage: Stage) {
        let slot = self.slot(stage);
        if slot
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("injected fault in {stage:?}");
        }
    }
}
