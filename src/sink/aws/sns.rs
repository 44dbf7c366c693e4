//! The SNS sink: rows go to the topic ARN in `destination`, else `sns.topic_arn`, as
//! `PublishBatch` entries (through the `Batcher`); `connect` and `probe` ask
//! `GetTopicAttributes` of the default topic.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use aws_sdk_sns::Client;

use super::batcher::{Batcher, Publish};
use super::config::{check_topic_arn, SnsConfig};
use super::{client, wire, wire::Entry};
use crate::model::Message;
use crate::sink::{decided, Confirm, Sink, SinkError};

const SERVICE: &str = "SNS";

/// The relay's SNS publisher.
pub struct SnsSink {
    cfg: SnsConfig,
    timeout: Duration,
    client: Option<Client>,
    batcher: Option<Batcher>,
}

impl SnsSink {
    /// Validate the section; the client is made by `connect`.
    pub fn new(cfg: &SnsConfig, timeout: Duration) -> Result<Self, SinkError> {
        cfg.validate()
            .map_err(|e| SinkError::Rejected(e.to_string()))?;
        Ok(Self {
            cfg: cfg.clone(),
            timeout,
            client: None,
            batcher: None,
        })
    }

    /// The topic a message goes to (SPEC §2).
    pub fn topic_for<'a>(&'a self, m: &'a Message) -> &'a str {
        m.destination.as_deref().unwrap_or(&self.cfg.topic_arn)
    }

    async fn client(&mut self) -> Client {
        if let Some(c) = &self.client {
            return c.clone();
        }
        let sdk = client::sdk_config(&self.cfg.region, &self.cfg.endpoint_url, self.timeout).await;
        let c = Client::new(&sdk);
        self.client = Some(c.clone());
        c
    }

    fn submit(&self, target: &str, entry: Result<Entry, String>) -> Result<Confirm, SinkError> {
        let batcher = self
            .batcher
            .as_ref()
            .ok_or_else(|| SinkError::Unavailable("not connected".into()))?;
        let entry = entry.map_err(SinkError::Rejected)?;
        batcher.submit(target.to_string(), entry)
    }
}

/// `GetTopicAttributes` of `topic` within `within`: `Ok` when the service answered
/// that the topic exists.
async fn ask_topic(client: &Client, topic: &str, within: Duration) -> Result<(), SinkError> {
    let what = format!("topic {topic}");
    let call = client.get_topic_attributes().topic_arn(topic).send();
    match tokio::time::timeout(within, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(client::classify(SERVICE, &what, &e).0),
        Err(_) => Err(SinkError::Unavailable(format!(
            "{SERVICE} did not answer about {what} within {within:?}"
        ))),
    }
}

impl Sink for SnsSink {
    async fn connect(&mut self) -> Result<(), SinkError> {
        let client = self.client().await;
        let topic = self.cfg.topic_arn.clone();
        match ask_topic(&client, &topic, self.timeout).await {
            Ok(()) => {}
            // A missing default topic: the service answers, but nothing can be sent;
            // keep waiting for it (no row spends an attempt on a configuration error).
            Err(SinkError::Rejected(why)) => {
                return Err(SinkError::Unavailable(format!("sns.topic_arn: {why}")))
            }
            Err(e) => return Err(e),
        }
        if let Some(dlt) = &self.cfg.dead_letter_topic_arn {
            if let Err(e) = ask_topic(&client, dlt, self.timeout).await {
                tracing::warn!(topic = %dlt, error = %e, "sns.dead_letter_topic_arn is not usable; failed rows will not be dead-lettered until it is");
            }
        }
        match &self.batcher {
            // The service answered: what is still in flight carries on.
            Some(b) if b.is_running() => b.mark_up(),
            _ => self.batcher = Some(Batcher::start(SnsPublisher { client })),
        }
        Ok(())
    }

    async fn send(&mut self, m: &Message) -> Result<Confirm, SinkError> {
        let topic = self.topic_for(m).to_string();
        check_topic_arn(&topic)
            .map_err(|why| SinkError::Rejected(format!("destination: {why}")))?;
        self.submit(&topic, wire::entry(m, &topic, SERVICE))
    }

    async fn dead_letter(
        &mut self,
        message: &Message,
        error: &str,
    ) -> Result<Option<Confirm>, SinkError> {
        let Some(dlt) = self.cfg.dead_letter_topic_arn.clone() else {
            return Ok(None);
        };
        let original = self.topic_for(message).to_string();
        let entry = wire::dead_letter_entry(message, &dlt, SERVICE, error, &original);
        self.submit(&dlt, entry).map(Some)
    }

    fn is_connected(&self) -> bool {
        self.batcher.as_ref().is_some_and(Batcher::is_up)
    }

    fn probe(&self, within: Duration) -> Confirm {
        let Some(client) = self.client.clone() else {
            return decided(Err(SinkError::Unavailable("not connected".into())));
        };
        let topic = self.cfg.topic_arn.clone();
        Box::pin(async move {
            match ask_topic(&client, &topic, within).await {
                // The service answered (even "no such topic"): it is reachable.
                Ok(()) | Err(SinkError::Rejected(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    fn confirm_timeout(&self, publish_timeout: Duration) -> Duration {
        // The request itself is bounded by publish_timeout; add the batcher's linger.
        publish_timeout + super::batcher::LINGER + Duration::from_secs(1)
    }

    async fn close(&mut self) {
        if let Some(b) = self.batcher.take() {
            b.close();
        }
    }
}

/// One `PublishBatch` per flush.
#[derive(Clone)]
struct SnsPublisher {
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

impl SnsPublisher {
    /// One request for `entries`; `Err` when the whole request failed.
    async fn request(
        &self,
        topic: &str,
        entries: &[Entry],
    ) -> Result<Vec<Result<(), SinkError>>, (SinkError, bool)> {
        let what = format!("topic {topic}");
        let mut outcomes: Vec<Option<Result<(), SinkError>>> = vec![None; entries.len()];
        let mut batch = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            match batch_entry(i, e) {
                Ok(b) => batch.push(b),
                Err(err) => outcomes[i] = Some(Err(err)),
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
                if let Some(slot) = ok
                    .id()
                    .and_then(|id| id.parse::<usize>().ok())
                    .and_then(|i| outcomes.get_mut(i))
                {
                    *slot = Some(Ok(()));
                }
            }
            for failed in out.failed() {
                if let Some(slot) = failed
                    .id()
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| outcomes.get_mut(i))
                {
                    *slot = Some(Err(wire::entry_error(
                        SERVICE,
                        &what,
                        failed.sender_fault(),
                        failed.code(),
                        failed.message(),
                    )));
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(SinkError::Unavailable(format!(
                        "{SERVICE} did not answer for this message in its batch reply ({what})"
                    )))
                })
            })
            .collect())
    }
}

impl Publish for SnsPublisher {
    async fn publish(&self, topic: String, entries: Vec<Entry>) -> Vec<Result<(), SinkError>> {
        match self.request(&topic, &entries).await {
            Ok(outcomes) => outcomes,
            // The service refused the whole request: send each entry alone, so only the
            // message at fault spends an attempt.
            Err((_, true)) if entries.len() > 1 => {
                let mut out = Vec::with_capacity(entries.len());
                for e in &entries {
                    out.push(match self.request(&topic, std::slice::from_ref(e)).await {
                        Ok(mut one) => one.pop().unwrap_or_else(|| {
                            Err(SinkError::Unavailable(format!("{SERVICE} gave no answer")))
                        }),
                        Err((why, _)) => Err(why),
                    });
                }
                out
            }
            Err((why, _)) => vec![Err(why); entries.len()],
        }
    }
}
