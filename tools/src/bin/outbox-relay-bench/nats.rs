//! The NATS JetStream side: one stream per phase capturing that phase's subjects, the
//! raw broker ceiling (a bare async-nats JetStream publisher with the relay's headers and
//! a sliding window of unacknowledged publishes), a subscriber that timestamps arrivals,
//! and the stream's message count after a drain.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::pg::TRACE_VALUE;
use crate::rabbit::Arrivals;
use crate::window::{sliding, Created, Load};

pub struct Nats {
    url: String,
    prefix: String,
    client: async_nats::Client,
    js: jetstream::Context,
    streams: Created,
}

impl Nats {
    pub async fn setup(url: &str, prefix: &str) -> Result<Self> {
        let client = async_nats::connect(url)
            .await
            .with_context(|| format!("no NATS server at {url}"))?;
        let js = jetstream::new(client.clone());
        Ok(Self {
            url: url.to_string(),
            prefix: prefix.to_string(),
            client,
            js,
            streams: Default::default(),
        })
    }

    /// The stream of `phase` (created on first use) and its subject prefix.
    async fn stream(&self, phase: &str) -> Result<(String, String)> {
        let name = format!("{}_{phase}", self.prefix);
        let subjects = format!("{}.{phase}", self.prefix);
        self.js
            .get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("{subjects}.>")],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .with_context(|| format!("create stream {name}"))?;
        self.streams.add(&name);
        Ok((name, subjects))
    }

    /// The relay's `[nats]` settings for `phase`: its stream captures the subject.
    pub async fn relay_env(&self, phase: &str) -> Result<Vec<(String, String)>> {
        let (_, subjects) = self.stream(phase).await?;
        Ok(vec![
            ("OUTBOX_RELAY__NATS__URL".into(), self.url.clone()),
            (
                "OUTBOX_RELAY__NATS__SUBJECT".into(),
                format!("{subjects}.{{aggregate_type}}"),
            ),
        ])
    }

    /// The raw broker ceiling: `n` messages shaped as the relay sends them, at most
    /// `window` unacknowledged. Returns seconds.
    pub async fn ceiling(&self, load: &Load<'_>) -> Result<f64> {
        let Load {
            n, payload, window, ..
        } = *load;
        let (name, subjects) = self.stream("ceiling").await?;
        let subject = format!("{subjects}.order");
        let body = bytes::Bytes::copy_from_slice(payload.as_bytes());
        let (js, subject, body) = (&self.js, &subject, &body);
        let secs = sliding(n, window, |i| async move {
            let agg = load.aggregate(i);
            let headers = headers_for(Uuid::new_v4(), &agg);
            let ack = js
                .publish_with_headers(subject.clone(), headers, body.clone())
                .await?;
            let answer = async move {
                ack.await.context("raw publisher: not acknowledged")?;
                Ok(1)
            };
            Ok((1, answer))
        })
        .await?;
        self.delete(&name).await;
        Ok(secs)
    }

    /// Subscribe to `phase`'s subjects and note when each `event_id` arrived.
    pub async fn arrivals(&self, phase: &str) -> Result<(Arrivals, tokio::task::JoinHandle<()>)> {
        let (_, subjects) = self.stream(phase).await?;
        let mut sub = self.client.subscribe(format!("{subjects}.>")).await?;
        self.client.flush().await?;
        let seen: Arrivals = Arc::new(Mutex::new(HashMap::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let at = Instant::now();
                let id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("event_id"))
                    .and_then(|v| Uuid::parse_str(v.as_str()).ok());
                if let Some(id) = id {
                    s.lock().await.entry(id).or_insert(at);
                }
            }
        });
        Ok((seen, task))
    }

    /// Messages in `phase`'s stream; the stream is deleted afterwards.
    pub async fn count(&self, phase: &str) -> Result<u64> {
        let (name, _) = self.stream(phase).await?;
        let mut s = self.js.get_stream(&name).await?;
        let n = s.info().await?.state.messages;
        self.delete(&name).await;
        Ok(n)
    }

    async fn delete(&self, name: &str) {
        let _ = self.js.delete_stream(name).await;
        self.streams.remove(name);
    }

    pub async fn teardown(&self) {
        for name in self.streams.take() {
            self.delete(&name).await;
        }
    }
}

/// The headers the relay sets (SPEC §2, NATS column) plus the bench rows' one header.
fn headers_for(event_id: Uuid, agg: &str) -> async_nats::HeaderMap {
    let id = event_id.to_string();
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in [
        ("Nats-Msg-Id", id.as_str()),
        ("event_id", id.as_str()),
        ("event_type", "order.created"),
        ("aggregate_type", "order"),
        ("aggregate_id", agg),
        ("traceparent", TRACE_VALUE),
    ] {
        h.insert(k, v);
    }
    h
}
