//! Whether this instance asks for NOTIFY wake-ups. A NOTIFY takes a database-wide lock
//! at the producer's commit, held through its WAL flush, so it is only worth its cost to
//! a relay that is waiting: while rows flow fast (or a backlog is being drained) the
//! relay finds the next rows by claiming again on a short tick instead, and producers'
//! commits carry no notification. The choice lives in the instance's member row
//! (`listening`), read by the insert trigger (migration 0003).
//!
//! The engine records each claim; `tick` writes the member row when the wish changes
//! (one statement at a time, in its own task).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::store::{Store, StoreError};

/// How far back the claim rate is measured.
pub const WINDOW: Duration = Duration::from_millis(250);
/// Claimed rows per second above which notifications stop: from there on a claim every
/// `BUSY_POLL` finds a row or more, so polling wastes nothing. It must stay well below
/// what producers reach while notifying (NOTIFY serializes their commits: ~700–1 100
/// commits/s on the bench machine); a threshold above that would hold them there, the
/// relay never seeing the rate that turns the notifications off.
pub const BUSY_RATE: usize = 200;
/// Rows per second below which they start again (hysteresis: no flapping in between).
pub const QUIET_RATE: usize = 50;
/// The claim tick while not listening.
pub const BUSY_POLL: Duration = Duration::from_millis(5);

#[derive(Debug)]
pub struct Doorbell {
    /// `relay.listen`: without it the relay never listens and polls on `poll_interval`.
    enabled: bool,
    /// What the member row says (as last written successfully).
    listening: bool,
    /// Claims within `WINDOW`: when, and how many rows each returned.
    recent: VecDeque<(Instant, usize)>,
    /// A claim said a backlog remains: busy at least until then.
    busy_until: Option<Instant>,
    /// The member row being written, and the value being written.
    writing: Option<(JoinHandle<Result<bool, StoreError>>, bool)>,
    /// After a failed write, not before then.
    retry_at: Option<Instant>,
    /// The member row was written once.
    started: bool,
}

impl Doorbell {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            listening: false,
            recent: VecDeque::new(),
            busy_until: None,
            writing: None,
            retry_at: None,
            started: false,
        }
    }

    /// Start writing the member row if what it should say changed.
    pub fn tick(&mut self, now: Instant, store: &Store, instance: &str) {
        if self.writing.is_some() || self.retry_at.is_some_and(|t| now < t) {
            return;
        }
        let want = self.wanted(now);
        // Written once at start even when disabled (a restart may find `true` there).
        if self.started && want == self.listening {
            return;
        }
        let (store, instance) = (store.clone(), instance.to_string());
        let task = tokio::spawn(async move { store.set_listening(&instance, want).await });
        self.writing = Some((task, want));
    }

    /// Wait for the running write (pending forever when there is none). Returns whether
    /// the relay should claim now: it just started listening, and a row committed while
    /// the flag was being written may have sent no notification.
    pub async fn written_next(&mut self) -> bool {
        let Some((task, want)) = self.writing.as_mut() else {
            return std::future::pending().await;
        };
        let want = *want;
        let r = task.await;
        self.writing = None;
        match r {
            Ok(Ok(false)) => {
                // No member row yet: the first heartbeat writes it.
                self.retry_at = Some(Instant::now() + Duration::from_millis(100));
                false
            }
            Ok(Ok(true)) => {
                self.started = true;
                self.retry_at = None;
                self.written(want);
                want
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "writing the listening flag failed; retrying");
                self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "listening flag task failed");
                self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                false
            }
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

    /// The value the member row should hold now.
    pub fn wanted(&mut self, now: Instant) -> bool {
        if !self.enabled {
            return false;
        }
        self.trim(now);
        let backlog = self.busy_until.is_some_and(|t| now < t);
        let rate = self.rate();
        if self.listening {
            !(backlog || rate >= BUSY_RATE)
        } else {
            !backlog && rate < QUIET_RATE
        }
    }

    /// The member row now says `listening`.
    pub fn written(&mut self, listening: bool) {
        self.listening = listening;
    }

    /// How long to wait before claiming again when nothing wakes the relay.
    pub fn poll_interval(&self, configured: Duration) -> Duration {
        if self.enabled && !self.listening {
            BUSY_POLL.min(configured)
        } else {
            configured
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_when_quiet_and_stops_under_load() {
        let t0 = Instant::now();
        let mut d = Doorbell::new(true);
        assert!(d.wanted(t0), "an idle relay asks for wake-ups");
        d.written(true);
        assert_eq!(
            d.poll_interval(Duration::from_millis(500)),
            Duration::from_millis(500)
        );
        // 100 rows/s: still listening (a notification per row costs producers little).
        for i in 0..25u64 {
            d.record(t0 + Duration::from_millis(10 * i), 1, false);
        }
        assert!(d.wanted(t0 + Duration::from_millis(250)));
        // 1 000 rows/s: stop.
        for i in 250..500u64 {
            d.record(t0 + Duration::from_millis(i), 1, false);
        }
        assert!(!d.wanted(t0 + Duration::from_millis(500)));
        d.written(false);
        assert_eq!(d.poll_interval(Duration::from_millis(500)), BUSY_POLL);
        // 100 rows/s: in between, stays off (hysteresis).
        let mut t = t0 + Duration::from_millis(500);
        for _ in 0..50 {
            t += Duration::from_millis(10);
            d.record(t, 1, false);
        }
        assert!(!d.wanted(t));
        // Quiet again: back on.
        assert!(d.wanted(t + WINDOW + Duration::from_millis(1)));
    }

    #[test]
    fn a_backlog_needs_no_wake_ups() {
        let t0 = Instant::now();
        let mut d = Doorbell::new(true);
        d.written(true);
        d.record(t0, 10, true);
        assert!(!d.wanted(t0));
        d.written(false);
        assert!(!d.wanted(t0 + WINDOW / 2));
        assert!(d.wanted(t0 + WINDOW * 2));
    }

    #[test]
    fn disabled_never_listens() {
        let mut d = Doorbell::new(false);
        assert!(!d.wanted(Instant::now()));
        assert_eq!(
            d.poll_interval(Duration::from_millis(500)),
            Duration::from_millis(500)
        );
    }
}
