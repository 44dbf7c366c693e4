//! This instance's view of its partition leases: heartbeat, renew, take a fair share,
//! hand extras back — and the fence that stops publishing before a lease could lapse.
//!
//! Timing (T = `relay.lease_timeout`): leases are written for T/2 and renewed every T/4,
//! so a SIGKILLed instance's partitions are free after at most T/2 and picked up by the
//! next renew of a survivor: takeover within ~3T/4 < T. An instance publishes only while
//! its leases have more than T/8 left, measured from *before* the renew was sent.

use std::time::{Duration, Instant};

use crate::store::{Store, StoreError, PARTITIONS};

pub struct LeaseKeeper {
    instance: String,
    ttl: Duration,
    renew_every: Duration,
    margin: Duration,
    held: Vec<i32>,
    valid_until: Option<Instant>,
    next_renew: Instant,
}

impl LeaseKeeper {
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

    pub fn held(&self) -> &[i32] {
        &self.held
    }

    /// When the next renew is due (the idle wait must not sleep past it).
    pub fn next_renew(&self) -> Instant {
        self.next_renew
    }

    /// Whether publishing is allowed now: leases held with time to spare.
    pub fn fence_ok(&self) -> bool {
        !self.held.is_empty()
            && self
                .valid_until
                .is_some_and(|until| Instant::now() + self.margin < until)
    }

    /// The claim filter: `None` when every partition is held (no filter needed).
    pub fn claim_filter(&self) -> Option<&[i32]> {
        if self.held.len() == PARTITIONS as usize {
            None
        } else {
            Some(&self.held)
        }
    }

    /// Renew if due. With `rebalance` (only between batches, never with rows in flight)
    /// also take or hand back partitions towards a fair share of the live members.
    pub async fn maintain(&mut self, store: &Store, rebalance: bool) -> Result<(), StoreError> {
        if Instant::now() < self.next_renew {
            return Ok(());
        }
        let started = Instant::now();
        let live = store.heartbeat(&self.instance, self.ttl).await?;
        let held = store.renew_leases(&self.instance, self.ttl).await?;
        let lost = self.held.iter().any(|p| !held.contains(p));
        self.held = held;
        if rebalance {
            let live = live.max(1);
            let share = (i64::from(PARTITIONS) + live - 1) / live;
            let have = self.held.len() as i64;
            if have > share {
                let extra: Vec<i32> = self.held.split_off(share as usize);
                store.release_leases(&self.instance, &extra).await?;
                tracing::info!(
                    released = extra.len(),
                    live,
                    "handed partitions back for rebalancing"
                );
            } else if have < share {
                let got = store
                    .acquire_leases(&self.instance, self.ttl, share - have)
                    .await?;
                if !got.is_empty() {
                    tracing::info!(acquired = got.len(), live, "took over partitions");
                    self.held.extend(got);
                    self.held.sort_unstable();
                }
            }
        }
        if lost {
            tracing::warn!("some partition leases lapsed and were taken by another instance");
        }
        self.valid_until = Some(started + self.ttl);
        self.next_renew = started + self.renew_every;
        metrics::gauge!(crate::metrics::PARTITIONS_HELD).set(self.held.len() as f64);
        Ok(())
    }

    /// Forget local state after a database error (the fence closes at once).
    pub fn invalidate(&mut self) {
        self.valid_until = None;
        self.next_renew = Instant::now();
    }

    /// Leave on shutdown so survivors take over at once instead of after expiry.
    pub async fn leave(&mut self, store: &Store) -> Result<(), StoreError> {
        self.held.clear();
        self.valid_until = None;
        store.leave(&self.instance).await
    }
}
