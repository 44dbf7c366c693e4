//! The sliding window every raw broker ceiling publishes through: at most `window`
//! messages handed over and not yet answered, a new one sent as each answer comes in —
//! the best a publisher with that window can do, whatever the broker.

use std::future::Future;
use std::time::Instant;

use anyhow::Result;
use futures::stream::FuturesUnordered;
use futures::StreamExt;

/// Publish messages `0..n`: `send(i)` hands over message `i` (and maybe the ones after
/// it, as one batch) and returns how many it took and the future of their answer, which
/// resolves to how many were confirmed (an error ends the run). Returns the seconds from
/// the first send to the last answer.
pub async fn sliding<S, SF, A>(n: u64, window: usize, mut send: S) -> Result<f64>
where
    S: FnMut(u64) -> SF,
    SF: Future<Output = Result<(u64, A)>>,
    A: Future<Output = Result<u64>>,
{
    let window = window.max(1) as u64;
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let (mut sent, mut answered, mut out) = (0u64, 0u64, 0u64);
    while answered < n {
        while sent < n && out < window {
            let (took, answer) = send(sent).await?;
            sent += took.max(1);
            out += took.max(1);
            inflight.push(answer);
        }
        match inflight.next().await {
            Some(answer) => {
                let done = answer?;
                answered += done;
                out = out.saturating_sub(done);
            }
            None => break,
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// `sliding` in batches of up to `size` messages: `entry(j)` builds message `j`, and
/// `send(batch)` hands one batch over, resolving to how many the broker took.
pub async fn batched<E, F>(
    load: &Load<'_>,
    size: u64,
    entry: impl Fn(u64) -> Result<E>,
    send: impl Fn(Vec<E>) -> F,
) -> Result<f64>
where
    F: Future<Output = Result<u64>>,
{
    let n = load.n;
    sliding(n, load.window, |i| {
        let batch: Result<Vec<E>> = (i..n.min(i + size)).map(&entry).collect();
        std::future::ready(batch.map(|b| (b.len() as u64, send(b))))
    })
    .await
}

/// The aggregate of a bare publisher's message `i` over `aggregates` aggregates.
pub fn aggregate(i: u64, aggregates: u32) -> String {
    format!("order-{}", i % u64::from(aggregates.max(1)))
}

/// What a raw broker ceiling sends: `n` messages of `payload` over `aggregates`
/// aggregates, at most `window` unanswered.
#[derive(Clone, Copy)]
pub struct Load<'a> {
    pub n: u64,
    pub payload: &'a str,
    pub aggregates: u32,
    pub window: usize,
}

impl Load<'_> {
    /// The aggregate of message `i`.
    pub fn aggregate(&self, i: u64) -> String {
        aggregate(i, self.aggregates)
    }
}

/// Names a side created (streams, keys, queues), to remove at teardown.
#[derive(Default)]
pub struct Created(std::sync::Mutex<Vec<String>>);

impl Created {
    fn names(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn add(&self, name: &str) {
        let mut names = self.names();
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }

    pub fn remove(&self, name: &str) {
        self.names().retain(|n| n != name);
    }

    /// Every name still there, forgotten here.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.names())
    }
}

/// What a side created, by name, with what it knows of each (a queue URL, a topic ARN).
#[derive(Default)]
pub struct Registry(std::sync::Mutex<std::collections::HashMap<String, String>>);

impl Registry {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self, name: &str) -> Option<String> {
        self.map().get(name).cloned()
    }

    pub fn insert(&self, name: String, value: String) {
        self.map().insert(name, value);
    }

    pub fn remove(&self, name: &str) -> Option<String> {
        self.map().remove(name)
    }

    /// Every value still there, forgotten here.
    pub fn take(&self) -> Vec<String> {
        self.map().drain().map(|(_, v)| v).collect()
    }
}
