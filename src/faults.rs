//! Fault injection for tests and drills: make the next N handler calls of an
//! actor panic, to prove that supervision restarts it and that the batch it held
//! is retried, not lost. Inert unless armed through [`crate::Engine::faults`].

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// The actors a fault can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Loader,
    Resolver,
    Publisher,
    Applier,
}

#[derive(Debug, Default)]
pub struct Faults {
    panics: [AtomicU32; 4],
    leases_paused: AtomicBool,
}

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
