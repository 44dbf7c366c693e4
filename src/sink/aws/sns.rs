//! SNS as an `AwsSink` service: rows go to the topic ARN in `destination`, else
//! `sns.topic_arn`, as `PublishBatch` entries; "does it exist" is `GetTopicAttributes`.

use std::collections::HashMap;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use aws_sdk_sns::Client;

use super::batcher::Publish;
use super::config::{check_topic_arn, SnsConfig};
use super::sink::{answered, publish_or_split, AwsSink, BatchRequest, Outcomes, Service};
use super::{client, wire, wire::Entry};
use crate::sink::SinkError;

const SERVICE: &str = "SNS";

/// The relay's SNS publisher.
pub type SnsSink = AwsSink<Sns>;

/// Amazon SNS.
pub struct Sns;

impl Service for Sns {
    type Config = SnsConfig;
    type Client = Client;
    type Publisher = SnsPublisher;
    const NAME: &'static str = SERVICE;
    const TARGET_KEY: &'static str = "sns.topic_arn";
    const DEAD_LETTER_KEY: &'static str = "sns.dead_letter_topic_arn";

    fn validate(cfg: &SnsConfig) -> Result<(), String> {
        cfg.validate().map_err(|e| e.to_string())
    }

    fn targets(cfg: &SnsConfig) -> (&str, Option<&str>, &str, &str) {
        let dlt = cfg.dead_letter_topic_arn.as_deref();
        (&cfg.topic_arn, dlt, &cfg.region, &cfg.endpoint_url)
    }

    fn client(sdk: &SdkConfig) -> Client {
        Client::new(sdk)
    }

    fn publisher(client: Client) -> SnsPublisher {
        SnsPublisher { client }
    }

    fn check_target(target: &str) -> Result<(), String> {
        check_topic_arn(target)
    }

    /// `GetTopicAttributes` of `topic` within `within`.
    async fn ask(client: &Client, topic: &str, within: Duration) -> Result<(), SinkError> {
        let what = format!("topic {topic}");
        let call = client.get_topic_attributes().topic_arn(topic).send();
        answered(SERVICE, &what, within, call).await
    }
}

/// One `PublishBatch` per flush.
#[derive(Clone)]
pub struct SnsPublisher {
    client: Client,
}

fn batch_entry(id: usize, e: &Entry) -> Result<PublishBatchRequestEntry, SinkError> {
    let invalid = |err: aws_sdk_sns::error::BuildError| {
        SinkError::Rejected(format!("cannot build the SNS message: {err}"))
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
    PublishBatchRequestEntry::builder()
        .id(id.to_string())
        .message(&e.body)
        .set_message_attributes(Some(attributes))
        .set_message_group_id(e.group_id.clone())
        .set_message_deduplication_id(e.dedup_id.clone())
        .build()
        .map_err(invalid)
}

impl BatchRequest for SnsPublisher {
    /// One request for `entries`; `Err` when the whole request failed.
    async fn request(
        &self,
        topic: &str,
        entries: &[Entry],
    ) -> Result<Vec<Result<(), SinkError>>, (SinkError, bool)> {
        let what = format!("topic {topic}");
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
                .publish_batch()
                .topic_arn(topic)
                .set_publish_batch_request_entries(Some(batch))
                .send()
                .await
                .map_err(|e| client::classify(SERVICE, &what, &e))?;
            for ok in out.successful() {
                outcomes.answer(ok.id().unwrap_or_default(), Ok(()));
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

impl Publish for SnsPublisher {
    async fn publish(&self, topic: String, entries: Vec<Entry>) -> Vec<Result<(), SinkError>> {
        publish_or_split(SERVICE, self, &topic, &entries).await
    }
}
