//! The Kafka sink's producers: a bulk lane (`linger.ms` 5: full batches while a drain
//! sends many messages) and an express lane (`linger.ms` 0: a message sent while traffic
//! is light leaves at once instead of lingering), which lane a message takes, and their
//! replacement after a fatal error or a delivery that timed out.
//!
//! Light traffic is few messages outstanding *and* few sent lately (`EXPRESS_BELOW` in
//! the last `TICK` or two): a relay bound by Postgres may keep few outstanding while it
//! sends thousands a second, and at that rate `linger.ms` 0 costs CPU per row (many small
//! produce requests: one producer at 0 drained 16 % slower, `docs/benchmarks.md`
//! "2026-12-07 10:00"). The sink warms the express producer (connection, each topic's
//! metadata) with the bulk one's, so its first message does not wait for a lookup.
//!
//! Two lanes keep every order the relay promises: the engine sends an aggregate's next
//! row only after the previous one is confirmed, so no two messages outstanding at once
//! are ordered relative to each other; both producers are idempotent with `acks=all`
//! (the same configuration but `linger.ms`), and the same key lands on the same
//! partition through either. A user who sets `linger.ms` (or its alias) in
//! `kafka.properties` gets that one producer and no express lane.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::ClientConfig;

use super::props;
use crate::sink::SinkError;

/// A message takes the express lane while fewer than this many are outstanding and
/// fewer than this many were sent in the current and the last `TICK` (at 1 000
/// messages/s about 10 are; a drain sends hundreds).
pub const EXPRESS_BELOW: usize = 32;
/// The period the recent send count is kept for.
const TICK: Duration = Duration::from_millis(10);

/// One outstanding message, counted until its delivery report is in (or it is dropped).
pub(super) struct Outstanding(Arc<AtomicUsize>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The producers (module doc).
pub(super) struct Lanes {
    bulk_config: ClientConfig,
    express_config: Option<ClientConfig>,
    bulk: Option<FutureProducer>,
    express: Option<FutureProducer>,
    outstanding: Arc<AtomicUsize>,
    /// When the current `TICK` began, sends in it, sends in the one before.
    tick_start: Instant,
    tick_sends: usize,
    last_tick_sends: usize,
    /// Set by a delivery that timed out: both producers must be replaced.
    retire: Arc<AtomicBool>,
}

impl Lanes {
    /// `config` is the bulk lane's; `user` the user's `kafka.properties`.
    pub fn new(config: ClientConfig, user: &BTreeMap<String, String>) -> Self {
        Self {
            express_config: props::express_config(&config, user),
            bulk_config: config,
            bulk: None,
            express: None,
            outstanding: Arc::new(AtomicUsize::new(0)),
            tick_start: Instant::now(),
            tick_sends: 0,
            last_tick_sends: 0,
            retire: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The bulk producer, creating both lanes' producers if they are missing (they
    /// connect in the background).
    pub fn ensure(&mut self, user: &BTreeMap<String, String>) -> Result<FutureProducer, SinkError> {
        let create = |c: &ClientConfig| -> Result<FutureProducer, SinkError> {
            c.create().map_err(|e| props::config_refused(&e, user))
        };
        let bulk = match &self.bulk {
            Some(p) => p.clone(),
            None => {
                let p = create(&self.bulk_config)?;
                self.bulk = Some(p.clone());
                p
            }
        };
        if self.express.is_none() {
            if let Some(c) = &self.express_config {
                self.express = Some(create(c)?);
            }
        }
        Ok(bulk)
    }

    /// The bulk producer, if there is one (probes, the dead-letter topic).
    pub fn current(&self) -> Option<&FutureProducer> {
        self.bulk.as_ref()
    }

    /// The express producer, if there is one (to warm it up).
    pub fn express(&self) -> Option<FutureProducer> {
        self.express.clone()
    }

    /// The lane for the next message, given the bulk producer, and its count.
    pub fn pick(&mut self, bulk: FutureProducer) -> (FutureProducer, Outstanding) {
        let elapsed = self.tick_start.elapsed();
        if elapsed >= TICK {
            // A tick with no send in it lies between: nothing was sent lately.
            self.last_tick_sends = if elapsed < TICK * 2 {
                self.tick_sends
            } else {
                0
            };
            self.tick_sends = 0;
            self.tick_start = Instant::now();
        }
        let recent = self.last_tick_sends + self.tick_sends;
        self.tick_sends += 1;
        let before = self.outstanding.fetch_add(1, Ordering::Relaxed);
        let ticket = Outstanding(self.outstanding.clone());
        match &self.express {
            Some(p) if before < EXPRESS_BELOW && recent < EXPRESS_BELOW => (p.clone(), ticket),
            _ => (bulk, ticket),
        }
    }

    /// The flag a delivery that timed out sets.
    pub fn retire_flag(&self) -> Arc<AtomicBool> {
        self.retire.clone()
    }

    /// Whether a delivery timed out since the producers were last replaced.
    pub fn retiring(&self) -> bool {
        self.retire.load(Ordering::SeqCst)
    }

    /// Why the producers must be replaced before the next send, if they must: a
    /// delivery timed out inside librdkafka (the broker may have lost a producer's id),
    /// or a producer hit a fatal error (its code and text).
    pub fn needs_replacing(&self) -> Option<Replace> {
        let fatal = [&self.bulk, &self.express]
            .into_iter()
            .flatten()
            .find_map(|p| p.client().fatal_error());
        if let Some((code, why)) = fatal {
            self.retire.store(false, Ordering::SeqCst);
            return Some(Replace::Fatal(format!("{why} ({code:?})")));
        }
        let timed_out = self.retire.swap(false, Ordering::SeqCst);
        (timed_out && self.bulk.is_some()).then_some(Replace::TimedOut)
    }

    /// Drop both producers off the async runtime: each `Drop` purges its queue (so no
    /// stale copy is sent behind a later row of the same aggregate), flushes (bounded)
    /// and joins its polling thread.
    pub async fn drop_all(&mut self) {
        let producers = [self.bulk.take(), self.express.take()];
        if producers.iter().any(Option::is_some) {
            let _ = tokio::task::spawn_blocking(move || drop(producers)).await;
        }
    }
}

/// Why `Lanes::needs_replacing` says so.
pub(super) enum Replace {
    Fatal(String),
    TimedOut,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(user: &[(&str, &str)]) -> Lanes {
        let user: BTreeMap<String, String> = user
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", "127.0.0.1:1")
            .set("linger.ms", "5");
        Lanes::new(c, &user)
    }

    #[test]
    fn few_outstanding_take_the_express_lane_many_the_bulk_lane() {
        let mut l = lanes(&[]);
        let bulk = l.ensure(&BTreeMap::new()).unwrap();
        let express = l.express.clone().unwrap();
        let is = |a: &FutureProducer, b: &FutureProducer| std::ptr::eq(a.client(), b.client());
        let mut held = Vec::new();
        for i in 0..EXPRESS_BELOW + 3 {
            let (p, t) = l.pick(bulk.clone());
            assert_eq!(is(&p, &express), i < EXPRESS_BELOW, "message {i}");
            held.push(t);
        }
        // Reports in: the count falls, but as many were sent lately: still bulk.
        held.clear();
        assert_eq!(l.outstanding.load(Ordering::Relaxed), 0);
        let (p, _t) = l.pick(bulk.clone());
        assert!(!is(&p, &express));
        // Two ticks later nothing was sent lately: express again.
        l.tick_start -= TICK * 2;
        let (p, _t) = l.pick(bulk.clone());
        assert!(is(&p, &express));
        // Few sent lately but many outstanding (a slow broker): bulk.
        let mut held: Vec<_> = (0..EXPRESS_BELOW).map(|_| l.pick(bulk.clone()).1).collect();
        l.tick_start -= TICK * 2;
        let (p, t) = l.pick(bulk.clone());
        assert!(!is(&p, &express));
        held.push(t);
    }

    #[test]
    fn a_user_linger_means_one_lane() {
        for key in ["linger.ms", "queue.buffering.max.ms"] {
            let mut l = lanes(&[(key, "0")]);
            let bulk = l.ensure(&BTreeMap::new()).unwrap();
            assert!(l.express.is_none(), "{key}");
            let (p, _t) = l.pick(bulk.clone());
            assert!(std::ptr::eq(p.client(), bulk.client()));
        }
    }
}
