//! Liveness and readiness state shared by the relay loop and the HTTP server.
//!
//! Live: the loop has beaten within `stall_after` (it beats on every turn, including
//! idle waits and reconnect pauses, all of which are bounded). Ready: config valid,
//! database reached, schema at the expected version — and it stays ready through broker
//! outages (a sidecar must never take the order service out of its Service).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Health {
    started: Instant,
    last_beat_ms: AtomicU64,
    ready: AtomicBool,
    stall_after: Duration,
}

impl Health {
    pub fn new(stall_after: Duration) -> Self {
        Self {
            started: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            stall_after,
        }
    }

    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_beat_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn is_live(&self) -> bool {
        let last = Duration::from_millis(self.last_beat_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last) < self.stall_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_until_stalled() {
        let h = Health::new(Duration::from_millis(50));
        h.beat();
        assert!(h.is_live());
        assert!(!h.is_ready());
        h.set_ready();
        assert!(h.is_ready());
        std::thread::sleep(Duration::from_millis(80));
        assert!(!h.is_live());
        h.beat();
        assert!(h.is_live());
    }
}
