//! Whether this instance asks for NOTIFY wake-ups. A NOTIFY takes a database-wide lock
//! at the producer's commit, held through its WAL flush, so it is only worth its cost to
//! a relay that is waiting: while rows flow fast (or a backlog is being drained) the
//! relay finds the next rows by claiming again on a short tick instead, and producers'
//! commits carry no notification. The LISTEN task (`wake`) holds the doorbell's locks
//! while this asks for them (migration 0006; since 0008 the one insert trigger's function
//! notifies only when the shared lock of the producer's slot is refused).
//!
//! The engine records each claim; `tick` passes the wish on when it changes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::wake::{Bell, Ring};

/// How far back the claim rate is measured.
pub const WINDOW: Duration = Duration::from_millis(250);
/// Claimed rows per second above which notifications stop: from there on a claim every
/// `relay.busy_poll_interval` (5 ms by default) finds a row or more, so polling wastes
/// nothing. It must stay well below what producers reach while notifying (NOTIFY
/// serializes their commits: ~700–1 100 commits/s on the bench machine); a threshold
/// above that would hold them there, the relay never seeing the rate that turns the
/// notifications off.
pub const BUSY_RATE: usize = 200;
/// Rows per second below which they start again (hysteresis: no flapping in between).
pub const QUIET_RATE: usize = 50;
pub struct Doorbell {
    /// The LISTEN task (none with `relay.listen` off: never listens, polls on
    /// `poll_interval`).
    bell: Bell,
    /// What was last asked of it.
    asked: bool,
    /// The claim tick while not listening (`relay.busy_poll_interval`).
    busy_poll: Duration,
    /// Claims within `WINDOW`: when, and how many rows each returned.
    recent: VecDeque<(Instant, usize)>,
    /// A claim said a backlog remains: busy at least until then.
    busy_until: Option<Instant>,
}

impl Doorbell {
    pub fn new(bell: Bell, busy_poll: Duration) -> Self {
        Self {
            bell,
            asked: false,
            busy_poll,
            recent: VecDeque::new(),
            busy_until: None,
        }
    }

    /// Pass the wish on if it changed.
    pub fn tick(&mut self, now: Instant) {
        let want = self.wanted(now);
        if want != self.asked {
            self.asked = want;
            self.bell.ask(want);
        }
    }

    /// A claim returned `rows` rows; `more` = the sweep has not reached the table's end.
    pub fn record(&mut self, now: Instant, rows: usize, more: bool) {
        self.recent.push_back((now, rows));
        if more {
            self.busy_until = Some(now + WINDOW);
        }
        self.trim(now);
    }

    fn trim(&mut self, now: Instant) {
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > WINDOW)
        {
            self.recent.pop_front();
        }
    }

    /// Rows claimed per second over the last `WINDOW`.
    fn rate(&self) -> usize {
        let rows: usize = self.recent.iter().map(|(_, n)| n).sum();
        rows.saturating_mul(1000) / WINDOW.as_millis().max(1) as usize
    }

    /// Whether wake-ups are wanted now.
    pub fn wanted(&mut self, now: Instant) -> bool {
        if !self.bell.wired() {
            return false;
        }
        self.trim(now);
        let backlog = self.busy_until.is_some_and(|t| now < t);
        let rate = self.rate();
        if self.asked {
            !(backlog || rate >= BUSY_RATE)
        } else {
            !backlog && rate < QUIET_RATE
        }
    }

    /// How long to wait before claiming again when nothing wakes the relay: the short
    /// tick while producers' commits do not notify.
    pub fn poll_interval(&self, configured: Duration) -> Duration {
        if self.bell.wired() && self.bell.ring() == Ring::Off {
            self.busy_poll.min(configured)
        } else {
            configured
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::wake::{pair, Wire};

    const BUSY_POLL: Duration = Duration::from_millis(5);

    fn wired() -> (Doorbell, Wire) {
        let (bell, wire) = pair();
        (Doorbell::new(bell, BUSY_POLL), wire)
    }

    #[test]
    fn listens_when_quiet_and_stops_under_load() {
        let t0 = Instant::now();
        let (mut d, wire) = wired();
        assert_eq!(d.poll_interval(Duration::from_millis(500)), BUSY_POLL);
        d.tick(t0);
        assert!(wire.asked(), "an idle relay asks for wake-ups");
        wire.set(Ring::Held);
        assert_eq!(
            d.poll_interval(Duration::from_millis(500)),
            Duration::from_millis(500)
        );
        // 100 rows/s: still listening (a notification per row costs producers little).
        for i in 0..25u64 {
            d.record(t0 + Duration::from_millis(10 * i), 1, false);
        }
        d.tick(t0 + Duration::from_millis(250));
        assert!(wire.asked());
        // 1 000 rows/s: stop.
        for i in 250..500u64 {
            d.record(t0 + Duration::from_millis(i), 1, false);
        }
        d.tick(t0 + Duration::from_millis(500));
        assert!(!wire.asked());
        wire.set(Ring::Off);
        assert_eq!(d.poll_interval(Duration::from_millis(500)), BUSY_POLL);
        // 100 rows/s: in between, stays off (hysteresis).
        let mut t = t0 + Duration::from_millis(500);
        for _ in 0..50 {
            t += Duration::from_millis(10);
            d.record(t, 1, false);
        }
        d.tick(t);
        assert!(!wire.asked());
        // Quiet again: back on.
        d.tick(t + WINDOW + Duration::from_millis(1));
        assert!(wire.asked());
    }

    #[test]
    fn a_backlog_needs_no_wake_ups() {
        let t0 = Instant::now();
        let (mut d, wire) = wired();
        d.tick(t0);
        assert!(wire.asked());
        d.record(t0, 10, true);
        d.tick(t0);
        assert!(!wire.asked());
        d.tick(t0 + WINDOW / 2);
        assert!(!wire.asked());
        d.tick(t0 + WINDOW * 2);
        assert!(wire.asked());
    }

    #[test]
    fn another_instance_holding_the_bell_is_as_good_as_holding_it() {
        let (mut d, wire) = wired();
        d.tick(Instant::now());
        wire.set(Ring::Covered);
        assert_eq!(
            d.poll_interval(Duration::from_millis(500)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn the_busy_tick_is_the_configured_one_and_never_longer_than_the_poll_interval() {
        let (bell, wire) = pair();
        let d = Doorbell::new(bell, Duration::from_millis(20));
        wire.set(Ring::Off);
        assert_eq!(
            d.poll_interval(Duration::from_millis(500)),
            Duration::from_millis(20)
        );
        assert_eq!(
            d.poll_interval(Duration::from_millis(8)),
            Duration::from_millis(8)
        );
        wire.set(Ring::Held);
        assert_eq!(
            d.poll_interval(Duration::from_millis(500)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn unwired_never_listens() {
        let mut d = Doorbell::new(Bell::default(), BUSY_POLL);
        assert!(!d.wanted(Instant::now()));
        assert_eq!(
            d.poll_interval(Duration::from_millis(500)),
            Duration::from_millis(500)
        );
    }
}
