//! Which message a `basic.return` belongs to. lapin hands each return to whichever
//! publisher confirm it resolves next, and one `basic.ack` with `multiple` resolves many
//! confirms in no set order: under load the return of an unroutable message reaches a
//! neighbour's confirm (seen: an unroutable row marked `PROCESSED`, a good one rejected).
//! A return carries no delivery tag, so the sink matches it by message id: every return
//! on a channel is kept here under its `message_id` (the row's `event_id`), and a
//! confirmed message is unroutable exactly when a return with its own id came in.
//! A return that arrives for a message already judged delivered (its confirm was judged
//! before the confirm carrying the return was polled) is reported, never dropped quietly.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lapin::message::BasicReturnMessage;
use lapin::publisher_confirm::Confirmation;

/// Returns no confirm has claimed are forgotten after this long (their message was
/// abandoned, or its own confirm had been judged before the return was seen).
const KEEP: Duration = Duration::from_secs(60);
/// Message ids judged delivered that a late return is checked against (the most recent).
const JUDGED: usize = 4096;

/// When a return came in, and why the message was unroutable.
type Returned = (Instant, String);

#[derive(Debug, Default)]
struct State {
    returned: HashMap<String, Vec<Returned>>,
    delivered: VecDeque<String>,
}

/// The returns of one channel, by message id (shared by its confirms' futures).
#[derive(Debug, Clone, Default)]
pub(super) struct Returns(Arc<Mutex<State>>);

impl Returns {
    /// Keep the return a confirm carried (whichever message it came with). Returns the
    /// message id when that message was already judged delivered.
    pub(super) fn keep(&self, c: &Confirmation) -> Option<String> {
        let ret = match c {
            Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)) => r,
            _ => return None,
        };
        let why = format!(
            "unroutable: no queue is bound to exchange {:?} for routing key {:?} (returned {} {})",
            ret.delivery.exchange.as_str(),
            ret.delivery.routing_key.as_str(),
            ret.reply_code,
            ret.reply_text.as_str()
        );
        self.add(message_id(ret), why)
    }

    fn add(&self, id: String, why: String) -> Option<String> {
        let mut state = self.lock();
        if state.delivered.contains(&id) {
            return Some(id);
        }
        let now = Instant::now();
        state.returned.retain(|_, v| {
            v.retain(|(at, _)| now.duration_since(*at) < KEEP);
            !v.is_empty()
        });
        state.returned.entry(id).or_default().push((now, why));
        None
    }

    /// Claim a return of message `id`: why it was unroutable, if it was. Otherwise the
    /// message counts as delivered from now on.
    pub(super) fn take(&self, id: &str) -> Option<String> {
        let mut state = self.lock();
        let Some(list) = state.returned.get_mut(id) else {
            if state.delivered.len() >= JUDGED {
                state.delivered.pop_front();
            }
            state.delivered.push_back(id.to_string());
            return None;
        };
        let (_, why) = list.remove(0);
        if list.is_empty() {
            state.returned.remove(id);
        }
        Some(why)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn message_id(ret: &BasicReturnMessage) -> String {
    ret.properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_return_is_claimed_by_its_own_message_whoever_carried_it() {
        let r = Returns::default();
        assert_eq!(r.add("m2".into(), "unroutable m2".into()), None);
        assert_eq!(
            r.take("m1"),
            None,
            "m1 carried m2's return: m1 is delivered"
        );
        assert_eq!(r.take("m2").as_deref(), Some("unroutable m2"));
        assert_eq!(r.take("m2"), None, "claimed once");
    }

    #[test]
    fn a_return_for_a_message_judged_delivered_is_reported() {
        let r = Returns::default();
        assert_eq!(r.take("m3"), None);
        assert_eq!(r.add("m3".into(), "late".into()).as_deref(), Some("m3"));
        assert_eq!(r.add("m4".into(), "x".into()), None);
    }

    #[test]
    fn the_judged_ids_are_bounded() {
        let r = Returns::default();
        for i in 0..(JUDGED + 10) {
            r.take(&format!("d{i}"));
        }
        assert_eq!(r.lock().delivered.len(), JUDGED);
        assert_eq!(r.add("d0".into(), "x".into()), None, "the oldest forgotten");
    }
}
