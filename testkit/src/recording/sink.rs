//! `RecordingSink`: the scriptable sink itself, recording each send into its `Ledger` and
//! handing out confirms that resolve as the script (or the test, for held ones) says.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use outbox_relay::model::Message;
use outbox_relay::sink::{Confirm, Sink, SinkError};
use tokio::sync::oneshot;

use super::{Event, Held, Ledger, Out, Script, SendInfo, Sent, Step};

/// Removes its send from the outstanding set when the confirm is done or dropped.
struct OutGuard {
    ledger: Ledger,
    send_seq: u64,
    sink: String,
    id: i64,
    dead_letter: bool,
    done: bool,
}

impl OutGuard {
    fn resolved(&mut self, result: &Result<(), SinkError>) {
        let mut st = self.ledger.lock();
        st.out.remove(&self.send_seq);
        let seq = st.seq();
        st.events.push(Event::Resolved {
            seq,
            at: Instant::now(),
            send_seq: self.send_seq,
            sink: self.sink.clone(),
            id: self.id,
            dead_letter: self.dead_letter,
            result: result.clone(),
        });
        self.done = true;
    }
}

impl Drop for OutGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.ledger.lock();
        st.out.remove(&self.send_seq);
        if st
            .held
            .get(&self.id)
            .is_some_and(|h| h.send_seq == self.send_seq)
        {
            st.held.remove(&self.id);
        }
        let seq = st.seq();
        st.events.push(Event::Dropped {
            seq,
            at: Instant::now(),
            send_seq: self.send_seq,
            sink: self.sink.clone(),
            id: self.id,
        });
    }
}

/// See the module doc.
#[derive(Clone)]
pub struct RecordingSink {
    pub name: String,
    pub ledger: Ledger,
    pub(super) script: Script,
    /// What a dead-letter publish does; `None`: no dead-letter target configured.
    pub(super) dead_letter: Option<Script>,
    pub(super) connected: Arc<AtomicBool>,
}

impl RecordingSink {
    /// A sink with a ledger of its own.
    pub fn new(script: impl Fn(&Message, &SendInfo) -> Step + Send + Sync + 'static) -> Self {
        Ledger::default().sink("sink", script)
    }

    /// Configure a dead-letter target whose publishes `script` decides (`Refuse` and
    /// `Down` make `dead_letter` return the error).
    pub fn with_dead_letter(
        mut self,
        script: impl Fn(&Message, &SendInfo) -> Step + Send + Sync + 'static,
    ) -> Self {
        self.dead_letter = Some(Arc::new(script));
        self
    }

    /// Record the send, run the script, and (for a confirm handed out) register it as
    /// outstanding and, if held, awaiting the test — all under one lock, so a test that
    /// changes what its script answers and then looks at `held` sees every held send.
    #[allow(clippy::type_complexity)]
    fn record_send(
        &self,
        m: &Message,
        dead_letter: bool,
    ) -> (u64, Step, Option<oneshot::Receiver<Result<(), SinkError>>>) {
        let mut st = self.ledger.lock();
        let calls = st.calls.get(&self.name).copied().unwrap_or(0);
        let nth = st.sends_of.get(&m.id).copied().unwrap_or(0);
        let info = SendInfo {
            nth,
            calls,
            sink: self.name.clone(),
        };
        let step = match (&self.dead_letter, dead_letter) {
            (Some(script), true) => script(m, &info),
            _ => (self.script)(m, &info),
        };
        if !dead_letter {
            *st.calls.entry(self.name.clone()).or_insert(0) += 1;
            *st.sends_of.entry(m.id).or_insert(0) += 1;
        }
        let out_sink = st.out.values().filter(|o| o.sink == self.name).count();
        let out_agg = st
            .out
            .values()
            .filter(|o| o.aggregate == m.aggregate_id)
            .count();
        let seq = st.seq();
        st.events.push(Event::Sent(Sent {
            seq,
            at: Instant::now(),
            sink: self.name.clone(),
            id: m.id,
            aggregate: m.aggregate_id.clone(),
            attempts: m.attempts,
            dead_letter,
            step: step.clone(),
            out_sink,
            out_agg,
        }));
        if matches!(step, Step::Refuse(_) | Step::Down(_)) {
            return (seq, step, None);
        }
        st.out.insert(
            seq,
            Out {
                sink: self.name.clone(),
                id: m.id,
                aggregate: m.aggregate_id.clone(),
            },
        );
        let mut rx = None;
        if step == Step::Hold {
            let (tx, r) = oneshot::channel();
            let h = Held {
                send_seq: seq,
                sink: self.name.clone(),
                tx,
            };
            st.held.insert(m.id, h);
            rx = Some(r);
        }
        (seq, step, rx)
    }

    fn hand_out(&mut self, m: &Message, dead_letter: bool) -> Result<Confirm, SinkError> {
        let (send_seq, step, held) = self.record_send(m, dead_letter);
        match &step {
            Step::Refuse(why) => return Err(SinkError::Rejected(why.clone())),
            Step::Down(why) => {
                self.connected.store(false, Ordering::SeqCst);
                return Err(SinkError::Unavailable(why.clone()));
            }
            _ => {}
        }
        // Like a real sink, sending (re)opens the connection.
        self.connected.store(true, Ordering::SeqCst);
        let mut guard = OutGuard {
            ledger: self.ledger.clone(),
            send_seq,
            sink: self.name.clone(),
            id: m.id,
            dead_letter,
            done: false,
        };
        let connected = self.connected.clone();
        Ok(Box::pin(async move {
            let result = match (step, held) {
                (Step::Hold, Some(rx)) => rx
                    .await
                    .unwrap_or_else(|_| Err(SinkError::Unavailable("connection closed".into()))),
                (Step::Reject(why), _) => Err(SinkError::Rejected(why)),
                (Step::Broken(why), _) => {
                    connected.store(false, Ordering::SeqCst);
                    Err(SinkError::Unavailable(why))
                }
                _ => Ok(()),
            };
            guard.resolved(&result);
            result
        }))
    }
}

impl Sink for RecordingSink {
    async fn connect(&mut self) -> Result<(), SinkError> {
        self.connected.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn send(&mut self, m: &Message) -> Result<Confirm, SinkError> {
        self.hand_out(m, false)
    }

    async fn dead_letter(
        &mut self,
        m: &Message,
        _error: &str,
    ) -> Result<Option<Confirm>, SinkError> {
        if self.dead_letter.is_none() {
            return Ok(None);
        }
        self.hand_out(m, true).map(Some)
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Drop the "connection": held confirms of this sink can no longer be answered.
    async fn close(&mut self) {
        self.connected.store(false, Ordering::SeqCst);
        let mut st = self.ledger.lock();
        st.held.retain(|_, h| h.sink != self.name);
        let seq = st.seq();
        st.events.push(Event::Closed {
            seq,
            at: Instant::now(),
            sink: self.name.clone(),
        });
    }
}
