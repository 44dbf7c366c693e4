//! SQS as an `AwsSink` service: rows go to the queue URL in `destination`, else
//! `sqs.queue_url`, as `SendMessageBatch` entries; "does it exist" is
//! `GetQueueAttributes`.

use std::collections::HashMap;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;

use super::batcher::Publish;
use super::config::{check_queue_url, SqsConfig};
use super::sink::{answered, publish_or_split, AwsSink, BatchRequest, Outcomes, Service};
use super::{client, wire, wire::Entry};
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
    const NAME: &'static str = SERVICE;
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

fn batch_entry(id: usize, e: &Entry) -> Result<SendMessageBatchRequestEntry, SinkError> {
    let invalid = |err: aws_sdk_sqs::error::BuildError| {
        SinkError::Rejected(format!("cannot build the SQS message: {err}"))
    };
    let mut attributes = HashMap::with_capacity(e.attributes.len());
    for (k, v) in &e.attributes {
        let value = MessageAttributeValue::builder()
            .data_type(wire::STRING)
            .string_value(v)
            .build()
            .map_err(invalid)?;
        attributes.insert(k.clone(), value);
    }
    SendMessageBatchRequestEntry::builder()
        .id(id.to_string())
        .message_body(&e.body)
        .set_message_attributes(Some(attributes))
        .set_message_group_id(e.group_id.clone())
        .set_message_deduplication_id(e.dedup_id.clone())
        .build()
        .map_err(invalid)
}

impl BatchRequest for SqsPublisher {
    /// One request for `entries`; `Err` when the whole request failed.
    async fn request(
        &self,
        queue: &str,
        entries: &[Entry],
    ) -> Result<Vec<Result<(), SinkError>>, (SinkError, bool)> {
        let what = format!("queue {queue}");
        let mut outcomes = Outcomes::new(entries.len());
        let mut batch = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            match batch_entry(i, e) {
                Ok(b) => batch.push(b),
                Err(err) => outcomes.refused(i, err),
            }
        }
        if !batch.is_empty() {
            let out = self
                .client
                .send_message_batch()
                .queue_url(queue)
                .set_entries(Some(batch))
                .send()
                .await
                .map_err(|e| client::classify(SERVICE, &what, &e))?;
            for ok in out.successful() {
                outcomes.answer(ok.id(), Ok(()));
            }
            for failed in out.failed() {
                let why = wire::entry_error(
                    SERVICE,
                    &what,
                    failed.sender_fault(),
                    failed.code(),
                    failed.message(),
                );
                outcomes.answer(failed.id(), Err(why));
            }
        }
        Ok(outcomes.finish(SERVICE, &what))
    }
}

impl Publish for SqsPublisher {
    async fn publish(&self, queue: String, entries: Vec<Entry>) -> Vec<Result<(), SinkError>> {
        publish_or_split(SERVICE, self, &queue, &entries).await
    }
}
