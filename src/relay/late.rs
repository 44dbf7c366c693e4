//! Late rows: a row that commits after a later row of its aggregate was already delivered
//! (possible only with the order lock switched off and a producer that does not serialize
//! its aggregate). The window sees the case where that later row is still out; this
//! remembers, per aggregate, the highest id delivered recently, so a late row is counted
//! (`outbox_relay_late_rows_total`) after the later one was confirmed and left memory too.
//! Bounded: the `CAP` aggregates with the highest delivered ids are kept (ids grow with
//! time), keyed by a 64-bit hash of the aggregate.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use super::aggkey::{AggKey, KeyHasher};

/// Aggregates remembered (at most twice this many between prunes: ~4 MB).
const CAP: usize = 65_536;

#[derive(Debug, Default)]
pub struct Delivered {
    /// By `AggKey::hash64`.
    highest: HashMap<u64, i64, BuildHasherDefault<KeyHasher>>,
}

impl Delivered {
    /// Row `id` of `key` was confirmed by the broker.
    pub fn record(&mut self, key: &AggKey, id: i64) {
        let slot = self.highest.entry(key.hash64()).or_insert(id);
        *slot = (*slot).max(id);
        if self.highest.len() > 2 * CAP {
            self.prune();
        }
    }

    /// Whether a later row of `key` than `id` was delivered.
    pub fn is_behind(&self, key: &AggKey, id: i64) -> bool {
        self.highest.get(&key.hash64()).is_some_and(|h| *h > id)
    }

    /// Keep the `CAP` aggregates with the highest delivered ids.
    fn prune(&mut self) {
        let mut ids: Vec<i64> = self.highest.values().copied().collect();
        let nth = ids.len() - CAP;
        let (_, floor, _) = ids.select_nth_unstable(nth);
        let floor = *floor;
        self.highest.retain(|_, id| *id >= floor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(a: &str) -> AggKey {
        AggKey::new("order", a)
    }

    #[test]
    fn a_row_below_a_delivered_one_is_behind_it() {
        let mut d = Delivered::default();
        d.record(&key("a"), 12);
        assert!(d.is_behind(&key("a"), 10));
        assert!(
            !d.is_behind(&key("a"), 12),
            "the same row again is not late"
        );
        assert!(!d.is_behind(&key("a"), 14));
        assert!(!d.is_behind(&key("b"), 1));
    }

    #[test]
    fn memory_stays_bounded_and_keeps_the_newest() {
        let mut d = Delivered::default();
        for i in 0..(3 * CAP as i64) {
            d.record(&key(&format!("k{i}")), i + 1);
        }
        assert!(d.highest.len() <= 2 * CAP);
        let last = 3 * CAP as i64;
        assert!(d.is_behind(&key(&format!("k{}", last - 1)), 1));
    }
}
