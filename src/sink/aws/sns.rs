//! SNS as an `AwsSink` service: rows go to the topic ARN in `destination`, else
//! `sns.topic_arn`, as `PublishBatch` entries; "does it exist" is `GetTopicAttributes`.

use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use aws_sdk_sns::Client;

use super::config::{check_topic_arn, SnsConfig};
use super::sink::{answered, sdk_item, AwsSink, BatchRequest, Reply, Service};
use super::{client, wire::Entry};
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

impl BatchRequest for SnsPublisher {
    const SERVICE: &'static str = SERVICE;
    const TARGET: &'static str = "topic";
    type Item = PublishBatchRequestEntry;

    fn item(id: usize, e: &Entry) -> Result<PublishBatchRequestEntry, SinkError> {
        sdk_item!(
            SERVICE,
            aws_sdk_sns::error::BuildError,
            MessageAttributeValue,
            PublishBatchRequestEntry,
            message,
            id,
            e
        )
    }

    async fn send(
        &self,
        topic: &str,
        what: &str,
        batch: Vec<PublishBatchRequestEntry>,
    ) -> Result<Reply, (SinkError, bool)> {
        let out = self
            .client
            .publish_batch()
            .topic_arn(topic)
            .set_publish_batch_request_entries(Some(batch))
            .send()
            .await
            .map_err(|e| client::classify(SERVICE, what, &e))?;
        let failed = out.failed().iter();
        let failed = failed.map(|f| (f.id(), f.sender_fault(), f.code(), f.message()));
        let ok = out.successful().iter().filter_map(|o| o.id());
        Ok(Reply::read(SERVICE, what, ok, failed))
    }
}
