//! This instance's partition leases, on their own clock: heartbeat, renew and take a fair
//! share run every `lease_timeout/4` whatever the engine is sending; partitions above the
//! share are handed back only once nothing of theirs is out at the broker. The fence:
//! nothing is sent unless the leases have more than `lease_timeout/8` left, and whatever
//! is still out when they would lapse is abandoned (the sink is closed).
//!
//! Timing (T = `relay.lease_timeout`): leases are written for T/2 and renewed every T/4,
//! so a SIGKILLed instance's partitions are free after at most T/2 and picked up by the
//! next renew of a survivor: takeover within ~3T/4 < T. Validity is measured from
//! *before* the renew was sent.

use std::time::{Duration, Instant};

use super::aggkey::HashSet;
use crate::store::{Store, StoreError, PARTITIONS};

/// What one maintenance round found.
#[derive(Debug)]
pub struct Renewal {
    started: Instant,
    live: i64,
    held: Vec<i32>,
    acquired: Vec<i32>,
}

/// Heartbeat, renew, and take free partitions up to `want_more` (run as its own task).
pub async fn renew(
    store: Store,
    instance: String,
    ttl: Duration,
    have: usize,
) -> Result<Renewal, StoreError> {
    let started = Instant::now();
    let live = store.heartbeat(&instance, ttl).await?.max(1);
    let held = store.renew_leases(&instance, ttl).await?;
    let share = share(live);
    let mut acquired = Vec::new();
    let have = have.max(held.len()) as i64;
    if have < share {
        acquired = store.acquire_leases(&instance, ttl, share - have).await?;
    }
    Ok(Renewal {
        started,
        live,
        held,
        acquired,
    })
}

#[cfg(test)]
impl Renewal {
    /// A renewal that found `live` members and `held` partitions ours, just now.
    pub fn at_once(live: i64, held: Vec<i32>) -> Self {
        Self {
            started: Instant::now(),
            live,
            held,
            acquired: Vec::new(),
        }
    }
}

fn share(live: i64) -> i64 {
    (i64::from(PARTITIONS) + live - 1) / live
}

/// The engine's view of its leases.
pub struct Leases {
    pub instance: String,
    ttl: Duration,
    renew_every: Duration,
    margin: Duration,
    held: Vec<i32>,
    valid_until: Option<Instant>,
    next_renew: Instant,
}

/// What changed with a renewal.
#[derive(Debug, Default)]
pub struct Changes {
    /// Partitions no longer ours (lapsed and taken by another instance).
    pub lost: HashSet<i32>,
    /// Partitions above the fair share, to hand back once nothing of theirs is out.
    pub surplus: HashSet<i32>,
    /// Partitions newly ours (their backlog starts before wherever the sweep is).
    pub gained: bool,
}

impl Leases {
    pub fn new(instance: String, lease_timeout: Duration) -> Self {
        Self {
            instance,
            ttl: lease_timeout / 2,
            renew_every: lease_timeout / 4,
            margin: lease_timeout / 8,
            held: Vec::new(),
            valid_until: None,
            next_renew: Instant::now(),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn held(&self) -> &[i32] {
        &self.held
    }

    pub fn next_renew(&self) -> Instant {
        self.next_renew
    }

    /// When whatever is still out must be abandoned.
    pub fn valid_until(&self) -> Option<Instant> {
        self.valid_until
    }

    /// Whether a new send may start now.
    pub fn fence_ok(&self) -> bool {
        !self.held.is_empty()
            && self
                .valid_until
                .is_some_and(|until| Instant::now() + self.margin < until)
    }

    /// Whether the leases may already have lapsed.
    pub fn lapsed(&self) -> bool {
        self.valid_until.is_none_or(|until| Instant::now() >= until)
    }

    /// Whether the partition of aggregate hash `hash` is held (`held` is kept sorted).
    pub fn holds(&self, hash: i32) -> bool {
        self.held.binary_search(&(hash & (PARTITIONS - 1))).is_ok()
    }

    /// The claim filter: `None` when every partition is held.
    pub fn claim_filter(&self) -> Option<Vec<i32>> {
        (self.held.len() != PARTITIONS as usize).then(|| self.held.clone())
    }

    /// Take a renewal in; `releasing` partitions are not counted as held.
    pub fn apply(&mut self, r: Renewal, releasing: &HashSet<i32>) -> Changes {
        let mut now_held: Vec<i32> = r
            .held
            .iter()
            .chain(r.acquired.iter())
            .copied()
            .filter(|p| !releasing.contains(p))
            .collect();
        now_held.sort_unstable();
        now_held.dedup();
        let mut changes = Changes {
            gained: now_held.iter().any(|p| !self.held.contains(p)),
            lost: self
                .held
                .iter()
                .filter(|p| !now_held.contains(p))
                .copied()
                .collect(),
            ..Changes::default()
        };
        if !changes.lost.is_empty() {
            tracing::warn!(
                lost = changes.lost.len(),
                "some partition leases lapsed and were taken by another instance"
            );
        }
        if !r.acquired.is_empty() {
            tracing::info!(
                acquired = r.acquired.len(),
                live = r.live,
                "took over partitions"
            );
        }
        let share = usize::try_from(share(r.live)).unwrap_or(usize::MAX);
        if now_held.len() > share {
            changes.surplus = now_held.split_off(share).into_iter().collect();
            tracing::info!(
                surplus = changes.surplus.len(),
                live = r.live,
                "handing partitions back for rebalancing"
            );
        }
        self.held = now_held;
        self.valid_until = Some(r.started + self.ttl);
        self.next_renew = r.started + self.renew_every;
        metrics::gauge!(crate::metrics::PARTITIONS_HELD).set(self.held.len() as f64);
        changes
    }

    /// A renewal failed: try again soon; the fence closes on its own when validity ends.
    pub fn retry_soon(&mut self) {
        self.next_renew = Instant::now() + (self.renew_every / 4).max(Duration::from_millis(100));
    }

    /// Forget everything (shutdown).
    pub fn clear(&mut self) {
        self.held.clear();
        self.valid_until = None;
        metrics::gauge!(crate::metrics::PARTITIONS_HELD).set(0.0);
    }
}
