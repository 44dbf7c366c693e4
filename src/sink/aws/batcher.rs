//! The background batcher both AWS sinks send through: `submit` queues one entry for a
//! target (queue URL / topic ARN) and returns its `Confirm`; a task gathers entries per
//! target and flushes one batch request (`Publish::publish`) when a target holds
//! `MAX_BATCH_ENTRIES` entries, when the next would pass `MAX_MESSAGE_BYTES` in total, or
//! `LINGER` after the first entry of a round. Each `Confirm` resolves from its own
//! entry's outcome.
//!
//! Invariants: an entry's confirm is `Ok` only from the service's success for that entry;
//! `close` aborts the task and every request in flight (their confirms resolve to
//! `Unavailable`), so nothing of this sink is sent afterwards.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use super::wire::{Entry, MAX_BATCH_ENTRIES, MAX_MESSAGE_BYTES};
use crate::sink::{Confirm, SinkError};

/// How long the first entry of a round waits for others to join its batch.
pub const LINGER: Duration = Duration::from_millis(3);

/// One batch request to the service: the outcome of each entry, in `entries`' order.
pub trait Publish: Clone + Send + Sync + 'static {
    fn publish(
        &self,
        target: String,
        entries: Vec<Entry>,
    ) -> impl Future<Output = Vec<Result<(), SinkError>>> + Send;
}

struct Job {
    target: String,
    entry: Entry,
    reply: oneshot::Sender<Result<(), SinkError>>,
}

/// A running batcher (see the module doc).
pub struct Batcher {
    tx: mpsc::UnboundedSender<Job>,
    task: JoinHandle<()>,
    /// Cleared when a request finds the service unreachable; set by any success.
    up: Arc<AtomicBool>,
}

impl Batcher {
    pub fn start<P: Publish>(publisher: P) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let up = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(run(publisher, rx, up.clone()));
        Self { tx, task, up }
    }

    /// Queue `entry` for `target`; the confirm resolves from its entry's outcome.
    pub fn submit(&self, target: String, entry: Entry) -> Result<Confirm, SinkError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job {
                target,
                entry,
                reply,
            })
            .map_err(|_| SinkError::Unavailable("the sink was closed".into()))?;
        Ok(Box::pin(async move {
            answer.await.unwrap_or_else(|_| {
                Err(SinkError::Unavailable(
                    "the sink was closed before the service answered".into(),
                ))
            })
        }))
    }

    /// No request has found the service unreachable since the last success.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst) && !self.task.is_finished()
    }

    /// The task runs (it was not closed and did not panic).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// The service was seen to answer (a successful probe).
    pub fn mark_up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Abandon everything queued or in flight.
    pub fn close(self) {
        self.task.abort();
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Entries gathered for one target.
#[derive(Default)]
struct Open {
    jobs: Vec<Job>,
    bytes: usize,
}

async fn run<P: Publish>(publisher: P, mut rx: mpsc::UnboundedReceiver<Job>, up: Arc<AtomicBool>) {
    // Dropping the set (when this task is aborted) aborts every request in flight.
    let mut flights = JoinSet::new();
    let mut open: HashMap<String, Open> = HashMap::new();
    let mut closed = false;
    while !closed {
        while flights.try_join_next().is_some() {}
        let Some(first) = rx.recv().await else { break };
        let deadline = tokio::time::Instant::now() + LINGER;
        add(&publisher, &up, &mut flights, &mut open, first);
        loop {
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => add(&publisher, &up, &mut flights, &mut open, job),
                    None => { closed = true; break; }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        for (target, o) in open.drain() {
            flights.spawn(flush(publisher.clone(), up.clone(), target, o.jobs));
        }
    }
    while flights.join_next().await.is_some() {}
}

/// Add `job` to its target's batch, flushing the batch first if `job` would not fit and
/// after if it is full.
fn add<P: Publish>(
    publisher: &P,
    up: &Arc<AtomicBool>,
    flights: &mut JoinSet<()>,
    open: &mut HashMap<String, Open>,
    job: Job,
) {
    let o = open.entry(job.target.clone()).or_default();
    if !o.jobs.is_empty() && o.bytes + job.entry.size > MAX_MESSAGE_BYTES {
        let jobs = std::mem::take(&mut o.jobs);
        o.bytes = 0;
        flights.spawn(flush(
            publisher.clone(),
            up.clone(),
            job.target.clone(),
            jobs,
        ));
    }
    o.bytes += job.entry.size;
    o.jobs.push(job);
    if o.jobs.len() >= MAX_BATCH_ENTRIES {
        let target = o.jobs[0].target.clone();
        if let Some(full) = open.remove(&target) {
            flights.spawn(flush(publisher.clone(), up.clone(), target, full.jobs));
        }
    }
}

/// One batch request; each job's confirm gets its entry's outcome.
async fn flush<P: Publish>(publisher: P, up: Arc<AtomicBool>, target: String, jobs: Vec<Job>) {
    let (entries, replies): (Vec<Entry>, Vec<_>) =
        jobs.into_iter().map(|j| (j.entry, j.reply)).unzip();
    let mut outcomes = publisher.publish(target, entries).await.into_iter();
    for reply in replies {
        let outcome = outcomes.next().unwrap_or_else(|| {
            Err(SinkError::Unavailable(
                "the service's batch answer did not mention this message".into(),
            ))
        });
        match &outcome {
            Ok(()) => up.store(true, Ordering::SeqCst),
            Err(SinkError::Unavailable(_)) => up.store(false, Ordering::SeqCst),
            Err(SinkError::Rejected(_)) => {}
        }
        let _ = reply.send(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records each batch's size; rejects entries whose body is "bad".
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(String, usize)>>>);

    impl Publish for Recorder {
        async fn publish(&self, target: String, entries: Vec<Entry>) -> Vec<Result<(), SinkError>> {
            if let Ok(mut b) = self.0.lock() {
                b.push((target, entries.len()));
            }
            entries
                .iter()
                .map(|e| {
                    if e.body == "bad" {
                        Err(SinkError::Rejected("bad".into()))
                    } else {
                        Ok(())
                    }
                })
                .collect()
        }
    }

    fn entry(body: &str, size: usize) -> Entry {
        Entry {
            body: body.into(),
            attributes: vec![],
            group_id: None,
            dedup_id: None,
            size,
        }
    }

    #[tokio::test]
    async fn batches_per_target_up_to_ten_and_by_size() {
        let rec = Recorder::default();
        let b = Batcher::start(rec.clone());
        let mut confirms = Vec::new();
        for i in 0..23 {
            let body = if i == 5 { "bad" } else { "ok" };
            confirms.push(b.submit("a".into(), entry(body, 10)).unwrap());
        }
        confirms.push(b.submit("b".into(), entry("ok", 10)).unwrap());
        // Two entries that together pass the byte limit go in two requests.
        confirms.push(
            b.submit("c".into(), entry("ok", MAX_MESSAGE_BYTES - 5))
                .unwrap(),
        );
        confirms.push(b.submit("c".into(), entry("ok", 10)).unwrap());
        let results = futures::future::join_all(confirms).await;
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
        assert!(results[5].is_err());
        let batches = rec.0.lock().unwrap().clone();
        let of = |t: &str| -> Vec<usize> {
            let mut v: Vec<usize> = batches
                .iter()
                .filter(|(x, _)| x == t)
                .map(|(_, n)| *n)
                .collect();
            v.sort();
            v
        };
        assert_eq!(of("a").iter().sum::<usize>(), 23);
        assert!(of("a").iter().all(|n| *n <= MAX_BATCH_ENTRIES));
        assert_eq!(of("b"), vec![1]);
        assert_eq!(of("c"), vec![1, 1]);
    }

    #[tokio::test]
    async fn close_abandons_outstanding() {
        #[derive(Clone)]
        struct Never;
        impl Publish for Never {
            async fn publish(&self, _: String, _: Vec<Entry>) -> Vec<Result<(), SinkError>> {
                futures::future::pending().await
            }
        }
        let b = Batcher::start(Never);
        let c = b.submit("a".into(), entry("x", 1)).unwrap();
        b.close();
        assert!(matches!(c.await, Err(SinkError::Unavailable(_))));
    }
}
