//! The window: claimed rows held in memory, one FIFO per aggregate, bounded in rows and
//! bytes. Only an aggregate's head may be out at the broker; when it is confirmed the
//! next row of that aggregate becomes ready. Aggregates take turns (a ready queue), so a
//! hot aggregate gets one slot like any other.
//!
//! Invariants:
//! - each aggregate's queue is in `id` order, except that a head already sent stays first;
//! - an aggregate is in `ready` exactly when its queue is non-empty, its head is not out,
//!   and it is not held back (a rejection not yet recorded) or doomed (being dropped);
//! - `rows`, `bytes` and the per-hash counts always match the queues.

use std::collections::VecDeque;
use std::sync::Arc;

use super::aggkey::{AggKey, HashMap, HashSet, KeyMap};
use crate::model::Message;

/// What a held row turned into when it was claimed.
#[derive(Debug, Clone)]
pub enum Body {
    Message(Arc<Message>),
    /// The row cannot become a message (bad headers, empty key, …): fails on its own.
    Invalid(String),
}

/// One held row.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: i64,
    pub body: Body,
    pub bytes: usize,
    /// Its `hashtext(aggregate)`: fairness key (low 8 bits: the lease partition).
    pub hash: i32,
    /// Times the connection broke while this row was out alone (see `relay::outcome`).
    pub strikes: u8,
    /// Sent while something broke: goes out alone until it is judged.
    pub suspect: bool,
}

impl Entry {
    pub fn partition(&self) -> i32 {
        self.hash & (crate::store::PARTITIONS - 1)
    }
}

#[derive(Debug, Default)]
struct Agg {
    queue: VecDeque<Entry>,
    out: bool,
    held: bool,
    doomed: bool,
    in_ready: bool,
}

/// The rows this instance holds (see the module doc).
#[derive(Debug, Default)]
pub struct Window {
    aggs: KeyMap<Agg>,
    ready: VecDeque<AggKey>,
    ids: HashSet<i64>,
    per_hash: HashMap<i32, u32>,
    rows: usize,
    bytes: usize,
    out: usize,
    /// The lowest id dropped from memory still `PENDING` since `take_dropped_low`.
    dropped_low: Option<i64>,
}

/// Where an inserted row landed.
#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    Queued,
    /// Already held (claimed twice): ignored.
    Duplicate,
    /// A lower id than a row of its aggregate already sent: it committed late.
    Late,
}

impl Window {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Heads currently out at the broker.
    #[cfg(test)]
    pub fn out(&self) -> usize {
        self.out
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Whether this row is held (queued or out).
    pub fn holds(&self, id: i64) -> bool {
        self.ids.contains(&id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &i64> {
        self.ids.iter()
    }

    /// Held rows that were tried before (`attempts > 0`): in the database they may still
    /// carry their retry time, which must not hold back the rows claimed after them.
    pub fn retried_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.aggs.values().flat_map(|a| {
            a.queue.iter().filter_map(|e| match &e.body {
                Body::Message(m) if m.attempts > 0 => Some(e.id),
                _ => None,
            })
        })
    }

    /// Rows held per aggregate hash (a claim's per-aggregate caps start from these).
    pub fn per_hash(&self) -> &HashMap<i32, u32> {
        &self.per_hash
    }

    /// The `aggregate_type` holding the most rows, and how many (one walk over the
    /// aggregates held).
    pub fn top_type(&self) -> Option<(&str, usize)> {
        let mut counts: HashMap<&str, usize> = HashMap::default();
        for (key, agg) in &self.aggs {
            *counts.entry(key.aggregate_type()).or_insert(0) += agg.queue.len();
        }
        counts.into_iter().max_by_key(|(_, n)| *n)
    }

    /// Hashes of aggregates a claim must not add to (held back or being dropped).
    pub fn frozen_hashes(&self) -> impl Iterator<Item = i32> + '_ {
        self.aggs
            .values()
            .filter(|a| a.held || a.doomed)
            .filter_map(|a| a.queue.front().map(|e| e.hash))
    }

    /// Add a claimed row at its place in its aggregate's queue.
    pub fn insert(&mut self, key: AggKey, entry: Entry) -> Inserted {
        if !self.ids.insert(entry.id) {
            return Inserted::Duplicate;
        }
        self.rows += 1;
        self.bytes += entry.bytes;
        *self.per_hash.entry(entry.hash).or_insert(0) += 1;
        let agg = self.aggs.entry(key.clone()).or_default();
        let first_movable = usize::from(agg.out);
        let late = agg.out && agg.queue.front().is_some_and(|h| h.id > entry.id);
        let pos = agg
            .queue
            .iter()
            .skip(first_movable)
            .position(|e| e.id > entry.id)
            .map_or(agg.queue.len(), |p| p + first_movable);
        agg.queue.insert(pos, entry);
        self.make_ready(&key);
        if late {
            Inserted::Late
        } else {
            Inserted::Queued
        }
    }

    fn make_ready(&mut self, key: &AggKey) {
        if let Some(agg) = self.aggs.get_mut(key) {
            if !agg.in_ready && !agg.out && !agg.held && !agg.doomed && !agg.queue.is_empty() {
                agg.in_ready = true;
                self.ready.push_back(key.clone());
            }
        }
    }

    /// Take the next aggregate whose head may go out, round-robin; `accept` may refuse a
    /// head (e.g. a suspect while others are out), which keeps its turn for later.
    pub fn next(&mut self, mut accept: impl FnMut(&Entry) -> bool) -> Option<(AggKey, Entry)> {
        let n = self.ready.len();
        for _ in 0..n {
            let key = self.ready.pop_front()?;
            let Some(agg) = self.aggs.get_mut(&key) else {
                continue;
            };
            agg.in_ready = false;
            let Some(head) = agg.queue.front() else {
                continue;
            };
            if agg.out || agg.held || agg.doomed {
                continue;
            }
            if !accept(head) {
                agg.in_ready = true;
                self.ready.push_back(key);
                continue;
            }
            agg.out = true;
            self.out += 1;
            let head = head.clone();
            return Some((key, head));
        }
        None
    }

    /// A copy of the aggregate's head.
    pub fn head(&self, key: &AggKey) -> Option<Entry> {
        self.aggs.get(key).and_then(|a| a.queue.front()).cloned()
    }

    /// Strikes of the aggregate's head so far.
    pub fn head_strikes(&self, key: &AggKey) -> u8 {
        self.aggs
            .get(key)
            .and_then(|a| a.queue.front())
            .map_or(0, |e| e.strikes)
    }

    /// The head that was out is done (confirmed, or its outcome handed to the
    /// completer): remove it; the aggregate's next row becomes ready.
    pub fn finish(&mut self, key: &AggKey) -> Option<Entry> {
        let agg = self.aggs.get_mut(key)?;
        if !agg.out {
            return None;
        }
        agg.out = false;
        self.out -= 1;
        let head = agg.queue.pop_front()?;
        self.forget(&head);
        if self.aggs.get(key).is_some_and(|a| a.doomed) {
            self.drop_aggregate(key);
        } else {
            self.cleanup_or_ready(key);
        }
        Some(head)
    }

    /// The head that was out came back unjudged: it stays first, to be sent again.
    pub fn unsent(&mut self, key: &AggKey, strike: bool, suspect: bool) {
        let Some(agg) = self.aggs.get_mut(key) else {
            return;
        };
        if !agg.out {
            return;
        }
        agg.out = false;
        self.out -= 1;
        if let Some(head) = agg.queue.front_mut() {
            head.strikes = head.strikes.saturating_add(u8::from(strike));
            head.suspect = suspect;
        }
        if agg.doomed {
            self.drop_aggregate(key);
        } else {
            self.make_ready(key);
        }
    }

    /// The head was rejected: the aggregate waits (nothing of it goes out) until the
    /// rejection is recorded, then `drop_aggregate` lets the claim bring it back in order.
    pub fn hold(&mut self, key: &AggKey) {
        if let Some(agg) = self.aggs.get_mut(key) {
            agg.held = true;
            if agg.out {
                agg.out = false;
                self.out -= 1;
            }
        }
    }

    /// Forget an aggregate's rows (they stay `PENDING` in the database; the lowest id is
    /// kept for `take_dropped_low`); returns how many. If its head is out, the aggregate
    /// is doomed instead and dropped when the head comes back.
    pub fn drop_aggregate(&mut self, key: &AggKey) -> usize {
        let Some(agg) = self.aggs.get_mut(key) else {
            return 0;
        };
        if agg.out {
            agg.doomed = true;
            return 0;
        }
        let Some(agg) = self.aggs.remove(key) else {
            return 0;
        };
        for e in &agg.queue {
            self.forget(e);
            self.dropped_low = Some(self.dropped_low.map_or(e.id, |low| low.min(e.id)));
        }
        agg.queue.len()
    }

    /// The lowest id dropped (by `drop_aggregate`, or when a doomed aggregate's head came
    /// back) since the last call: the sweep must find those rows again.
    pub fn take_dropped_low(&mut self) -> Option<i64> {
        self.dropped_low.take()
    }

    /// Drop every aggregate whose rows live in one of `partitions` (released or lost);
    /// returns their keys (those with a head out are doomed, dropped when it returns).
    pub fn drop_partitions(&mut self, partitions: &HashSet<i32>) -> Vec<AggKey> {
        let keys: Vec<AggKey> = self
            .aggs
            .iter()
            .filter(|(_, a)| {
                a.queue
                    .front()
                    .is_some_and(|e| partitions.contains(&e.partition()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &keys {
            self.drop_aggregate(k);
        }
        keys
    }

    /// Heads out in one of `partitions`.
    pub fn out_in(&self, partitions: &HashSet<i32>) -> usize {
        self.aggs
            .values()
            .filter(|a| a.out)
            .filter(|a| {
                a.queue
                    .front()
                    .is_some_and(|e| partitions.contains(&e.partition()))
            })
            .count()
    }

    /// Forget everything not out (shutdown, fence lapse); heads out are doomed.
    pub fn clear(&mut self) {
        let keys: Vec<AggKey> = self.aggs.keys().cloned().collect();
        for k in keys {
            self.drop_aggregate(&k);
        }
    }

    fn forget(&mut self, e: &Entry) {
        self.ids.remove(&e.id);
        self.rows -= 1;
        self.bytes -= e.bytes;
        if let Some(c) = self.per_hash.get_mut(&e.hash) {
            *c -= 1;
            if *c == 0 {
                self.per_hash.remove(&e.hash);
            }
        }
    }

    fn cleanup_or_ready(&mut self, key: &AggKey) {
        let empty = self
            .aggs
            .get(key)
            .is_some_and(|a| a.queue.is_empty() && !a.held);
        if empty {
            self.aggs.remove(key);
        } else {
            self.make_ready(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(a: &str) -> AggKey {
        AggKey::new("order", a)
    }

    fn entry(id: i64, hash: i32) -> Entry {
        Entry {
            id,
            body: Body::Invalid(String::new()),
            bytes: 10,
            hash,
            strikes: 0,
            suspect: false,
        }
    }

    #[test]
    fn one_head_out_per_aggregate_and_turns_alternate() {
        let mut w = Window::default();
        for (id, a) in [(1, "a"), (2, "a"), (3, "b"), (4, "a")] {
            w.insert(key(a), entry(id, 7));
        }
        let (k1, e1) = w.next(|_| true).unwrap();
        let (k2, e2) = w.next(|_| true).unwrap();
        assert_eq!((e1.id, e2.id), (1, 3));
        assert!(w.next(|_| true).is_none(), "a's head is out");
        w.finish(&k1);
        assert_eq!(w.next(|_| true).unwrap().1.id, 2);
        w.finish(&k2);
        assert_eq!((w.rows(), w.out()), (2, 1));
        assert_eq!(w.per_hash().get(&7), Some(&2));
    }

    #[test]
    fn the_type_holding_the_most_rows_is_counted_over_its_aggregates() {
        let mut w = Window::default();
        assert_eq!(w.top_type(), None);
        for (id, t, a) in [
            (1, "bulk", "1"),
            (2, "bulk", "2"),
            (3, "orders", "1"),
            (4, "bulk", "1"),
        ] {
            w.insert(AggKey::new(t, a), entry(id, 7));
        }
        assert_eq!(w.top_type(), Some(("bulk", 3)));
        w.drop_aggregate(&AggKey::new("bulk", "1"));
        assert_eq!(w.top_type().map(|(_, n)| n), Some(1));
    }

    #[test]
    fn late_row_goes_before_unsent_rows_but_after_the_head_out() {
        let mut w = Window::default();
        w.insert(key("a"), entry(5, 1));
        w.insert(key("a"), entry(9, 1));
        let (k, _) = w.next(|_| true).unwrap();
        assert_eq!(w.insert(key("a"), entry(7, 1)), Inserted::Queued);
        assert_eq!(w.insert(key("a"), entry(3, 1)), Inserted::Late);
        assert_eq!(w.insert(key("a"), entry(7, 1)), Inserted::Duplicate);
        w.finish(&k);
        let order: Vec<i64> = std::iter::from_fn(|| {
            let (k, e) = w.next(|_| true)?;
            w.finish(&k);
            Some(e.id)
        })
        .collect();
        assert_eq!(order, vec![3, 7, 9]);
        assert!(w.is_empty());
    }

    #[test]
    fn held_aggregate_waits_and_dropping_a_head_out_dooms_it() {
        let mut w = Window::default();
        w.insert(key("a"), entry(1, 1));
        w.insert(key("a"), entry(2, 1));
        w.insert(key("b"), entry(3, 2));
        let (ka, _) = w.next(|_| true).unwrap();
        w.hold(&ka);
        let (kb, _) = w.next(|_| true).unwrap();
        assert!(w.next(|_| true).is_none());
        assert_eq!(w.frozen_hashes().collect::<Vec<_>>(), vec![1]);
        assert_eq!(w.drop_aggregate(&ka), 2);
        assert_eq!(w.drop_aggregate(&kb), 0, "b's head is out: doomed");
        assert_eq!(w.take_dropped_low(), Some(1));
        w.unsent(&kb, false, false);
        assert_eq!(
            w.take_dropped_low(),
            Some(3),
            "b dropped when its head came back"
        );
        assert_eq!(w.take_dropped_low(), None);
        assert!(w.is_empty());
        assert_eq!(w.bytes(), 0);
    }

    #[test]
    fn refused_heads_keep_their_turn() {
        let mut w = Window::default();
        let mut e = entry(1, 1);
        e.suspect = true;
        w.insert(key("a"), e);
        w.insert(key("b"), entry(2, 2));
        let (_, got) = w.next(|e| !e.suspect).unwrap();
        assert_eq!(got.id, 2);
        assert_eq!(w.next(|_| true).unwrap().1.id, 1);
    }
}
