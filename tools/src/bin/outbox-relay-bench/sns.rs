//! The SNS side, against the local emulator (moto): per phase a standard topic with an
//! SQS queue subscribed (raw delivery, so the relay's message attributes arrive as
//! attributes), the raw broker ceiling (a bare `PublishBatch` publisher of the relay's
//! attributes, batches of 10, a sliding window), and everything read back through the
//! subscribed queue by the SQS side's reader (consumed while it fills, as moto slows down
//! with queue depth). An emulator's figures say what the relay adds on top of the
//! service, not what AWS does.

use anyhow::{bail, Context, Result};
use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use aws_sdk_sns::Client;
use uuid::Uuid;

use crate::pg::TRACE_VALUE;
use crate::rabbit::Arrivals;
use crate::sqs::{relay_env, sdk_config, Sqs};
use crate::window::{batched, Load, Registry};

pub struct Sns {
    endpoint: String,
    prefix: String,
    client: Client,
    /// The subscribed queues (and their readers), one per phase.
    queues: Sqs,
    topics: Registry,
}

impl Sns {
    pub async fn setup(endpoint: &str, prefix: &str) -> Result<Self> {
        let client = Client::new(&sdk_config(endpoint).await);
        client
            .list_topics()
            .send()
            .await
            .with_context(|| format!("no SNS endpoint at {endpoint} (scripts/aws-emulator.sh)"))?;
        Ok(Self {
            endpoint: endpoint.to_string(),
            prefix: prefix.to_string(),
            client,
            queues: Sqs::setup(endpoint, &format!("{prefix}_sns")).await?,
            topics: Default::default(),
        })
    }

    /// The ARN of `phase`'s topic, created with its queue subscribed on first use.
    async fn topic(&self, phase: &str) -> Result<String> {
        let name = format!("{}_{phase}", self.prefix);
        if let Some(arn) = self.topics.get(&name) {
            return Ok(arn);
        }
        let out = self.client.create_topic().name(&name).send().await;
        let arn = out
            .with_context(|| format!("create topic {name}"))?
            .topic_arn
            .context("CreateTopic returned no ARN")?;
        let queue = self.queues.queue_arn(phase).await?;
        self.client
            .subscribe()
            .topic_arn(&arn)
            .protocol("sqs")
            .endpoint(queue)
            .attributes("RawMessageDelivery", "true")
            .send()
            .await
            .with_context(|| format!("subscribe {phase}'s queue to {arn}"))?;
        self.topics.insert(name, arn.clone());
        Ok(arn)
    }

    /// The relay's `[sns]` settings for `phase`, and the emulator's credentials.
    pub async fn relay_env(&self, phase: &str) -> Result<Vec<(String, String)>> {
        let arn = self.topic(phase).await?;
        Ok(relay_env("SNS", ("TOPIC_ARN", arn), &self.endpoint))
    }

    /// The raw broker ceiling: `n` messages shaped as the relay sends them, published
    /// in batches of 10, at most `window` unanswered, read from the subscribed queue
    /// meanwhile. Returns seconds.
    pub async fn ceiling(&self, load: &Load<'_>) -> Result<f64> {
        let arn = self.topic("ceiling").await?;
        self.queues.consume("ceiling").await?;
        let make = |j| entry(j, load.payload, &load.aggregate(j));
        let secs = batched(load, 10, make, |batch| {
            let req = self.client.publish_batch().topic_arn(&arn);
            let req = req.set_publish_batch_request_entries(Some(batch));
            async move {
                let out = req.send().await.context("raw PublishBatch")?;
                if let Some(f) = out.failed.as_ref().and_then(|f| f.first()) {
                    bail!("raw publisher: entry refused: {f:?}");
                }
                Ok(out.successful.map_or(0, |s| s.len()) as u64)
            }
        })
        .await;
        self.queues.delivered("ceiling").await?;
        secs
    }

    /// Start reading `phase`'s subscribed queue before the relay publishes.
    pub async fn consume(&self, phase: &str) -> Result<()> {
        self.topic(phase).await?;
        self.queues.consume(phase).await
    }

    /// Messages that reached `phase`'s subscribed queue.
    pub async fn delivered(&self, phase: &str) -> Result<u64> {
        self.queues.delivered(phase).await
    }

    /// Arrivals at `phase`'s subscribed queue, by `event_id`.
    pub async fn arrivals(&self, phase: &str) -> Result<(Arrivals, tokio::task::JoinHandle<()>)> {
        self.topic(phase).await?;
        self.queues.arrivals(phase).await
    }

    pub async fn teardown(&self) {
        for arn in self.topics.take() {
            let _ = self.client.delete_topic().topic_arn(arn).send().await;
        }
        self.queues.teardown().await;
    }
}

/// One batch entry with the relay's attributes (SPEC §2, SNS column).
fn entry(i: u64, payload: &str, agg: &str) -> Result<PublishBatchRequestEntry> {
    let attr = |v: &str| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
    };
    let mut e = PublishBatchRequestEntry::builder()
        .id(format!("m{}", i % 10))
        .message(payload);
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
