//! The demo's NATS reader, and stream creation for the demo: the relay itself never
//! creates a stream. The tap reads back from JetStream (an ordered consumer per demo
//! subject, delivering only messages stored after it started).

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{self, stream};
use async_nats::Client;
use futures::stream::{BoxStream, SelectAll};
use futures::StreamExt;

use super::{connect, NatsConfig};
use crate::sink::{Arrival, SinkError};

/// How long the demo's JetStream API calls may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

fn unavailable(why: impl std::fmt::Display) -> SinkError {
    SinkError::Unavailable(why.to_string())
}

/// The name of the stream the demo creates for `subjects` (stable for one set).
fn demo_stream_name(subjects: &[String]) -> String {
    // FNV-1a: stable across runs and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in subjects.join(" ").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("OUTBOX_RELAY_DEMO_{:08x}", h & 0xffff_ffff)
}

/// Make sure a stream captures each of `subjects`: those no stream captures get a stream
/// of their own, named after them. Returns the name of each subject's stream. For the
/// demo; never called by the relay.
pub async fn ensure_streams(
    js: &jetstream::Context,
    subjects: &[String],
) -> Result<Vec<(String, String)>, SinkError> {
    let mut missing = Vec::new();
    let mut found = Vec::new();
    for s in subjects {
        match js.stream_by_subject(s.clone()).await {
            Ok(name) => found.push((s.clone(), name)),
            Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {
                missing.push(s.clone())
            }
            Err(e) => {
                return Err(unavailable(format!(
                    "cannot look up the stream of {s:?}: {e}"
                )))
            }
        }
    }
    if !missing.is_empty() {
        let name = demo_stream_name(&missing);
        let cfg = stream::Config {
            name: name.clone(),
            subjects: missing.clone(),
            max_age: Duration::from_secs(24 * 3600),
            ..Default::default()
        };
        js.get_or_create_stream(cfg)
            .await
            .map_err(|e| unavailable(format!("cannot create stream {name:?}: {e}")))?;
        tracing::info!(stream = %name, subjects = ?missing, "created the demo stream");
        found.extend(missing.into_iter().map(|s| (s, name.clone())));
    }
    Ok(found)
}

type Messages = BoxStream<'static, Result<jetstream::Message, String>>;

/// The demo's reader: every message stored on the demo's subjects after it started.
pub struct DemoTap {
    _client: Client,
    messages: SelectAll<Messages>,
}

/// A tap on `subjects` (each captured by a stream, created if missing).
pub async fn tap_for_demo(cfg: &NatsConfig, subjects: &[String]) -> Result<DemoTap, SinkError> {
    let client = connect(&cfg.url, cfg.ca_file.as_ref(), ADMIN_TIMEOUT).await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(ADMIN_TIMEOUT)
        .build(client.clone());
    let streams = ensure_streams(&js, subjects).await?;
    let mut messages = SelectAll::new();
    for (subject, name) in streams {
        let stream = js
            .get_stream(&name)
            .await
            .map_err(|e| unavailable(format!("cannot read stream {name:?}: {e}")))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject.clone(),
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(format!("cannot read {subject:?} from {name:?}: {e}")))?;
        let ordered = consumer
            .messages()
            .await
            .map_err(|e| unavailable(format!("cannot read {subject:?} from {name:?}: {e}")))?;
        let s: Messages = ordered.map(|m| m.map_err(|e| e.to_string())).boxed();
        messages.push(s);
    }
    Ok(DemoTap {
        _client: client,
        messages,
    })
}

impl DemoTap {
    /// Stop reading (the ordered consumers are ephemeral: the server removes them).
    pub async fn close(self) {
        drop(self);
    }

    /// The next message, or `None` after `timeout` without one.
    pub async fn next(&mut self, timeout: Duration) -> Option<Arrival> {
        let msg = tokio::time::timeout(timeout, self.messages.next())
            .await
            .ok()??
            .ok()?;
        let headers: Vec<(String, String)> = msg
            .message
            .headers
            .as_ref()
            .map(|h| {
                let mut all: Vec<(String, String)> = h
                    .iter()
                    .flat_map(|(k, vs)| {
                        let k: &str = k.as_ref();
                        vs.iter()
                            .map(move |v| (k.to_string(), v.as_str().to_string()))
                    })
                    .collect();
                all.sort();
                all
            })
            .unwrap_or_default();
        let header = |k: &str| crate::sink::tap::header(&headers, k);
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let stream = msg.info().map(|i| i.stream.to_string()).unwrap_or_default();
        Some(Arrival {
            event_id: header("event_id"),
            aggregate_id: header("aggregate_id"),
            summary: format!(
                "  subject      {} (stream {stream}, sequence {seq})\n  headers      {:?}\n  body         {}",
                msg.message.subject,
                headers,
                String::from_utf8_lossy(&msg.message.payload)
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_stream_names_are_valid_and_stable() {
        let a = demo_stream_name(&["outbox.order.order.created".into()]);
        assert_eq!(a, demo_stream_name(&["outbox.order.order.created".into()]));
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    }
}
