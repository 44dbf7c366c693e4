//! Which message a `basic.return` belongs to. lapin hands each return to whichever
//! publisher confirm it resolves next, and one `basic.ack` with `multiple` resolves many
//! confirms in no set order: under load the return of an unroutable message reaches a
//! neighbour's confirm (seen: an unroutable row marked `PROCESSED`, a good one rejected).
//! A return carries no delivery tag, so the sink matches it by message id: every return
//! on a channel is kept here under its `message_id` (the row's `event_id`), and a
//! confirmed message is unroutable exactly when a return with its own id came in.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lapin::message::BasicReturnMessage;
use lapin::publisher_confirm::Confirmation;

/// Returns no confirm has claimed are forgotten after this long (their message was
/// abandoned, or its own confirm had been judged before the return was seen).
const KEEP: Duration = Duration::from_secs(60);

/// When a return came in, and why the message was unroutable.
type Returned = (Instant, String);

/// The returns of one channel, by message id (shared by its confirms' futures).
#[derive(Debug, Clone, Default)]
pub(super) struct Returns(Arc<Mutex<HashMap<String, Vec<Returned>>>>);

impl Returns {
    /// Keep the return a confirm carried (whichever message it came with).
    pub(super) fn keep(&self, c: &Confirmation) {
        let ret = match c {
            Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)) => r,
            _ => return,
        };
        let id = message_id(ret);
        let why = format!(
            "unroutable: no queue is bound to exchange {:?} for routing key {:?} (returned {} {})",
            ret.delivery.exchange.as_str(),
            ret.delivery.routing_key.as_str(),
            ret.reply_code,
            ret.reply_text.as_str()
        );
        let now = Instant::now();
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, v| {
            v.retain(|(at, _)| now.duration_since(*at) < KEEP);
            !v.is_empty()
        });
        map.entry(id).or_default().push((now, why));
    }

    /// Claim a return of message `id`: why it was unroutable, if it was.
    pub(super) fn take(&self, id: &str) -> Option<String> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let list = map.get_mut(id)?;
        let (_, why) = list.remove(0);
        if list.is_empty() {
            map.remove(id);
        }
        Some(why)
    }
}

fn message_id(ret: &BasicReturnMessage) -> String {
    ret.properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .unwrap_or_default()
}
