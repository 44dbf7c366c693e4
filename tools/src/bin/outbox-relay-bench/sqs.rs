//! The SQS side, against a local emulator (moto): one standard queue per phase, the raw
//! broker ceiling (a bare `SendMessageBatch` publisher of the relay's attributes, batches
//! of 10 with a sliding window of unanswered batches), a `ReceiveMessage` reader that
//! timestamps arrivals and deletes what it read, and the count of messages delivered by a
//! drain. moto answers ever more slowly as a queue deepens, so the reader consumes the
//! ceiling's and the drain's queues while they are sent to: both measure the same shallow
//! queue. An emulator's figures say what the relay adds on top of the service, not what
//! AWS does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::pg::TRACE_VALUE;
use crate::rabbit::Arrivals;
use crate::window::{batched, Load, Registry};

/// Credentials the emulator accepts (it checks none); set for the relay too.
const KEY: &str = "testing";
const REGION: &str = "us-east-1";

pub struct Sqs {
    endpoint: String,
    prefix: String,
    client: Client,
    queues: Registry,
    /// The reader of each phase that is being consumed while it fills.
    readers: std::sync::Mutex<HashMap<String, (Arrivals, tokio::task::JoinHandle<()>)>>,
}

impl Sqs {
    pub async fn setup(endpoint: &str, prefix: &str) -> Result<Self> {
        let client = Client::new(&sdk_config(endpoint).await);
        client
            .list_queues()
            .send()
            .await
            .with_context(|| format!("no SQS endpoint at {endpoint} (scripts/aws-emulator.sh)"))?;
        Ok(Self {
            endpoint: endpoint.to_string(),
            prefix: prefix.to_string(),
            client,
            queues: Default::default(),
            readers: Default::default(),
        })
    }

    /// The ARN of `phase`'s queue (created on first use), for a topic subscription.
    pub async fn queue_arn(&self, phase: &str) -> Result<String> {
        let url = self.queue(phase).await?;
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .with_context(|| format!("the ARN of queue {url}"))?;
        out.attributes
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .context("GetQueueAttributes returned no QueueArn")
    }

    /// The URL of `phase`'s queue (created on first use).
    async fn queue(&self, phase: &str) -> Result<String> {
        let name = format!("{}_{phase}", self.prefix);
        if let Some(url) = self.queues.get(&name) {
            return Ok(url);
        }
        let out = self.client.create_queue().queue_name(&name).send().await;
        let url = out
            .with_context(|| format!("create queue {name}"))?
            .queue_url
            .context("CreateQueue returned no URL")?;
        self.queues.insert(name, url.clone());
        Ok(url)
    }

    /// The relay's `[sqs]` settings for `phase`, and the emulator's credentials.
    pub async fn relay_env(&self, phase: &str) -> Result<Vec<(String, String)>> {
        let url = self.queue(phase).await?;
        Ok(relay_env("SQS", ("QUEUE_URL", url), &self.endpoint))
    }

    /// The raw broker ceiling: `n` messages shaped as the relay sends them, in batches
    /// of 10, at most `window` messages unanswered. Returns seconds.
    pub async fn ceiling(&self, load: &Load<'_>) -> Result<f64> {
        let url = self.queue("ceiling").await?;
        let (_, reader) = self.arrivals("ceiling").await?;
        let make = |j| entry(j, load.payload, &load.aggregate(j));
        let secs = batched(load, 10, make, |batch| {
            let req = self.client.send_message_batch().queue_url(&url);
            let req = req.set_entries(Some(batch));
            async move {
                let out = req.send().await.context("raw SendMessageBatch")?;
                if let Some(f) = out.failed.first() {
                    bail!("raw publisher: entry refused: {f:?}");
                }
                Ok(out.successful.len() as u64)
            }
        })
        .await;
        reader.abort();
        self.delete("ceiling").await;
        secs
    }

    /// Receive from `phase`'s queue (long polls, deleting what arrived) and note when
    /// each `event_id` arrived.
    pub async fn arrivals(&self, phase: &str) -> Result<(Arrivals, tokio::task::JoinHandle<()>)> {
        let url = self.queue(phase).await?;
        let client = self.client.clone();
        let seen: Arrivals = Arc::new(Mutex::new(HashMap::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let got = client
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .message_attribute_names("event_id")
                    .send()
                    .await;
                let Ok(got) = got else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let at = Instant::now();
                let mut delete = client.delete_message_batch().queue_url(&url);
                let mut any = false;
                for (i, m) in got.messages.unwrap_or_default().into_iter().enumerate() {
                    let id = m
                        .message_attributes
                        .as_ref()
                        .and_then(|a| a.get("event_id"))
                        .and_then(|v| v.string_value.as_deref())
                        .and_then(|v| Uuid::parse_str(v).ok());
                    if let Some(id) = id {
                        s.lock().await.entry(id).or_insert(at);
                    }
                    if let Some(handle) = m.receipt_handle {
                        let e = aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(handle)
                            .build();
                        if let Ok(e) = e {
                            delete = delete.entries(e);
                            any = true;
                        }
                    }
                }
                if any {
                    let _ = delete.send().await;
                }
            }
        });
        Ok((seen, task))
    }

    /// Start consuming `phase`'s queue before the relay sends to it (see `delivered`).
    pub async fn consume(&self, phase: &str) -> Result<()> {
        let reader = self.arrivals(phase).await?;
        self.readers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(phase.to_string(), reader);
        Ok(())
    }

    /// Distinct messages `phase`'s reader received plus what the queue still holds
    /// (visible or received but not yet deleted); the queue is deleted afterwards.
    pub async fn delivered(&self, phase: &str) -> Result<u64> {
        let url = self.queue(phase).await?;
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await?;
        let attrs = out.attributes.unwrap_or_default();
        let left: u64 = [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        ]
        .iter()
        .filter_map(|k| attrs.get(k)?.parse::<u64>().ok())
        .sum();
        let reader = self
            .readers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(phase);
        let read = match reader {
            Some((seen, task)) => {
                task.abort();
                let n = seen.lock().await.len() as u64;
                n
            }
            None => 0,
        };
        self.delete(phase).await;
        Ok(read + left)
    }

    async fn delete(&self, phase: &str) {
        let name = format!("{}_{phase}", self.prefix);
        if let Some(url) = self.queues.remove(&name) {
            let _ = self.client.delete_queue().queue_url(url).send().await;
        }
    }

    pub async fn teardown(&self) {
        for url in self.queues.take() {
            let _ = self.client.delete_queue().queue_url(url).send().await;
        }
    }
}

/// The SDK configuration for the emulator at `endpoint` (rustls with ring, the
/// emulator's test credentials).
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let creds = aws_sdk_sqs::config::Credentials::new(KEY, KEY, None, None, "bench");
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .http_client(http)
        .credentials_provider(creds)
        .endpoint_url(endpoint)
        .load()
        .await
}

/// A relay child process's settings for `section` (`SQS` / `SNS`): its target key and
/// value, the region, the emulator's endpoint and credentials.
pub fn relay_env(section: &str, target: (&str, String), endpoint: &str) -> Vec<(String, String)> {
    vec![
        (format!("OUTBOX_RELAY__{section}__{}", target.0), target.1),
        (format!("OUTBOX_RELAY__{section}__REGION"), REGION.into()),
        (
            format!("OUTBOX_RELAY__{section}__ENDPOINT_URL"),
            endpoint.into(),
        ),
        ("AWS_ACCESS_KEY_ID".into(), KEY.into()),
        ("AWS_SECRET_ACCESS_KEY".into(), KEY.into()),
    ]
}

/// One batch entry with the relay's attributes (SPEC §2, SQS column).
fn entry(i: u64, payload: &str, agg: &str) -> Result<SendMessageBatchRequestEntry> {
    let attr = |v: &str| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
    };
    let mut e = SendMessageBatchRequestEntry::builder()
        .id(format!("m{}", i % 10))
        .message_body(payload);
    for (k, v) in [
        ("event_id", Uuid::new_v4().to_string().as_str()),
        ("event_type", "order.created"),
        ("aggregate_type", "order"),
        ("aggregate_id", agg),
        ("traceparent", TRACE_VALUE),
    ] {
        e = e.message_attributes(k, attr(v)?);
    }
    Ok(e.build()?)
}
