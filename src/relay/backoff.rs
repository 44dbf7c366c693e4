//! Exponential backoff with jitter: per-row retry delays and reconnect pauses.

use std::time::Duration;

use rand::Rng;

/// Delay before try number `attempt + 1`, after `attempt` (≥ 1) rejections:
/// `initial · 2^(attempt-1)` capped at `max`, with "equal jitter" (half fixed, half random)
/// so rows rejected together do not come back together.
pub fn retry_delay(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let capped = exp.min(max);
    let half = capped / 2;
    let jitter = rand::thread_rng().gen_range(0..=half.as_millis().max(1) as u64);
    half + Duration::from_millis(jitter)
}

/// Reconnect pacing for an unreachable broker or database (and the LISTEN connection):
/// doubles from 100 ms to 10 s with equal jitter (each pause between half and all of its
/// step, so replicas that lost the same broker do not reconnect in lockstep), resets on
/// success. Spends no row attempts. The one reconnect backoff of the crate.
#[derive(Debug, Clone)]
pub struct Pacer {
    next: Duration,
}

impl Default for Pacer {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Pacer {
    const FIRST: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(10);

    /// The pause to take now (between half and all of the current step); the following
    /// step is twice as long (capped).
    pub fn next_pause(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let half = step / 2;
        let jitter = rand::thread_rng().gen_range(0..=half.as_millis().max(1) as u64);
        (half + Duration::from_millis(jitter)).min(step)
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_and_caps() {
        let (i, m) = (Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..50 {
            let d1 = retry_delay(1, i, m);
            assert!(
                d1 >= Duration::from_millis(500) && d1 <= Duration::from_secs(1),
                "{d1:?}"
            );
            let d3 = retry_delay(3, i, m);
            assert!(
                d3 >= Duration::from_secs(2) && d3 <= Duration::from_secs(4),
                "{d3:?}"
            );
            let d30 = retry_delay(30, i, m);
            assert!(d30 >= Duration::from_secs(30) && d30 <= m, "{d30:?}");
        }
    }

    #[test]
    fn pacer_doubles_with_jitter_and_resets() {
        let within = |d: Duration, step: Duration| d >= step / 2 && d <= step;
        let mut p = Pacer::default();
        assert!(within(p.next_pause(), Duration::from_millis(100)));
        assert!(within(p.next_pause(), Duration::from_millis(200)));
        for _ in 0..20 {
            p.next_pause();
        }
        let capped: Vec<Duration> = (0..50).map(|_| p.next_pause()).collect();
        assert!(capped.iter().all(|d| within(*d, Duration::from_secs(10))));
        assert!(
            capped.windows(2).any(|w| w[0] != w[1]),
            "jittered, not lockstep"
        );
        p.reset();
        assert!(within(p.next_pause(), Duration::from_millis(100)));
    }
}
