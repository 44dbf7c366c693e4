//! SQS as an `AwsSink` service: rows go to the queue URL in `destination`, else
//! `sqs.queue_url`, as `SendMessageBatch` entries; "does it exist" is
//! `GetQueueAttributes`.

use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;

use super::config::{check_queue_url, SqsConfig};
use super::sink::{answered, sdk_item, AwsSink, BatchRequest, Reply, Service};
use super::{client, wire::Entry};
use crate::sink::SinkError;

const SERVICE: &str = "SQS";

/// The relay's SQS publisher.
pub type SqsSink = AwsSink<Sqs>;

/// Amazon SQS.
pub struct Sqs;

impl Service for Sqs {
    type Config = SqsConfig;
    type Client = Client;
    type Publisher = SqsPublisher;
    const TARGET_KEY: &'static str = "sqs.queue_url";
    const DEAD_LETTER_KEY: &'static str = "sqs.dead_letter_queue_url";

    fn validate(cfg: &SqsConfig) -> Result<(), String> {
        cfg.validate().map_err(|e| e.to_string())
    }

    fn targets(cfg: &SqsConfig) -> (&str, Option<&str>, &str, &str) {
        let dlq = cfg.dead_letter_queue_url.as_deref();
        (&cfg.queue_url, dlq, &cfg.region, &cfg.endpoint_url)
    }

    fn client(sdk: &SdkConfig) -> Client {
        Client::new(sdk)
    }

    fn publisher(client: Client) -> SqsPublisher {
        SqsPublisher { client }
    }

    fn check_target(target: &str) -> Result<(), String> {
        check_queue_url(target)
    }

    /// `GetQueueAttributes` of `queue` within `within`.
    async fn ask(client: &Client, queue: &str, within: Duration) -> Result<(), SinkError> {
        let what = format!("queue {queue}");
        let call = client
            .get_queue_attributes()
            .queue_url(queue)
            .attribute_names(QueueAttributeName::QueueArn)
            .send();
        answered(SERVICE, &what, within, call).await
    }
}

/// One `SendMessageBatch` per flush.
#[derive(Clone)]
pub struct SqsPublisher {
    client: Client,
}

impl BatchRequest for SqsPublisher {
    const SERVICE: &'static str = SERVICE;
    const TARGET: &'static str = "queue";
    type Item = SendMessageBatchRequestEntry;

    fn item(id: usize, e: &Entry) -> Result<SendMessageBatchRequestEntry, SinkError> {
        sdk_item!(
            SERVICE,
            aws_sdk_sqs::error::BuildError,
            MessageAttributeValue,
            SendMessageBatchRequestEntry,
            message_body,
            id,
            e
        )
    }

    async fn send(
        &self,
        queue: &str,
        what: &str,
        batch: Vec<SendMessageBatchRequestEntry>,
    ) -> Result<Reply, (SinkError, bool)> {
        let out = self
            .client
            .send_message_batch()
            .queue_url(queue)
            .set_entries(Some(batch))
            .send()
            .await
            .map_err(|e| client::classify(SERVICE, what, &e))?;
        let failed = out.failed().iter();
        let failed = failed.map(|f| (f.id(), f.sender_fault(), f.code(), f.message()));
        let ok = out.successful().iter().map(|o| o.id());
        Ok(Reply::read(SERVICE, what, ok, failed))
    }
}
