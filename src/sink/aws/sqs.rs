//! The SQS sink: rows go to the queue URL in `destination`, else `sqs.queue_url`, as
//! `SendMessageBatch` entries (through the `Batcher`); `connect` and `probe` ask
//! `GetQueueAttributes` of the default queue.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;

use super::batcher::{Batcher, Publish};
use super::config::{check_queue_url, SqsConfig};
use super::{client, wire, wire::Entry};
use crate::model::Message;
use crate::sink::{decided, Confirm, Sink, SinkError};

const SERVICE: &str = "SQS";

/// The relay's SQS publisher.
pub struct SqsSink {
    cfg: SqsConfig,
    timeout: Duration,
    client: Option<Client>,
    batcher: Option<Batcher>,
}

impl SqsSink {
    /// Validate the section; the client is made by `connect`.
    pub fn new(cfg: &SqsConfig, timeout: Duration) -> Result<Self, SinkError> {
        cfg.validate()
            .map_err(|e| SinkError::Rejected(e.to_string()))?;
        Ok(Self {
            cfg: cfg.clone(),
            timeout,
            client: None,
            batcher: None,
        })
    }

    /// The queue a message goes to (SPEC §2).
    pub fn queue_for<'a>(&'a self, m: &'a Message) -> &'a str {
        m.destination.as_deref().unwrap_or(&self.cfg.queue_url)
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

/// `GetQueueAttributes` of `queue` within `within`: `Ok` when the service answered
/// that the queue exists.
async fn ask_queue(client: &Client, queue: &str, within: Duration) -> Result<(), SinkError> {
    let what = format!("queue {queue}");
    let call = client
        .get_queue_attributes()
        .queue_url(queue)
        .attribute_names(QueueAttributeName::QueueArn)
        .send();
    match tokio::time::timeout(within, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(client::classify(SERVICE, &what, &e).0),
        Err(_) => Err(SinkError::Unavailable(format!(
            "{SERVICE} did not answer about {what} within {within:?}"
        ))),
    }
}

impl Sink for SqsSink {
    async fn connect(&mut self) -> Result<(), SinkError> {
        let client = self.client().await;
        let queue = self.cfg.queue_url.clone();
        match ask_queue(&client, &queue, self.timeout).await {
            Ok(()) => {}
            // A missing default queue: the service answers, but nothing can be sent;
            // keep waiting for it (no row spends an attempt on a configuration error).
            Err(SinkError::Rejected(why)) => {
                return Err(SinkError::Unavailable(format!("sqs.queue_url: {why}")))
            }
            Err(e) => return Err(e),
        }
        if let Some(dlq) = &self.cfg.dead_letter_queue_url {
            if let Err(e) = ask_queue(&client, dlq, self.timeout).await {
                tracing::warn!(queue = %dlq, error = %e, "sqs.dead_letter_queue_url is not usable; failed rows will not be dead-lettered until it is");
            }
        }
        match &self.batcher {
            // The service answered: what is still in flight carries on.
            Some(b) if b.is_running() => b.mark_up(),
            _ => self.batcher = Some(Batcher::start(SqsPublisher { client })),
        }
        Ok(())
    }

    async fn send(&mut self, m: &Message) -> Result<Confirm, SinkError> {
        let queue = self.queue_for(m).to_string();
        check_queue_url(&queue)
            .map_err(|why| SinkError::Rejected(format!("destination: {why}")))?;
        self.submit(&queue, wire::entry(m, &queue, SERVICE))
    }

    async fn dead_letter(
        &mut self,
        message: &Message,
        error: &str,
    ) -> Result<Option<Confirm>, SinkError> {
        let Some(dlq) = self.cfg.dead_letter_queue_url.clone() else {
            return Ok(None);
        };
        let original = self.queue_for(message).to_string();
        let entry = wire::dead_letter_entry(message, &dlq, SERVICE, error, &original);
        self.submit(&dlq, entry).map(Some)
    }

    fn is_connected(&self) -> bool {
        self.batcher.as_ref().is_some_and(Batcher::is_up)
    }

    fn probe(&self, within: Duration) -> Confirm {
        let Some(client) = self.client.clone() else {
            return decided(Err(SinkError::Unavailable("not connected".into())));
        };
        let queue = self.cfg.queue_url.clone();
        Box::pin(async move {
            match ask_queue(&client, &queue, within).await {
                // The service answered (even "no such queue"): it is reachable.
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

/// One `SendMessageBatch` per flush.
#[derive(Clone)]
struct SqsPublisher {
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

impl SqsPublisher {
    /// One request for `entries`; `Err` when the whole request failed.
    async fn request(
        &self,
        queue: &str,
        entries: &[Entry],
    ) -> Result<Vec<Result<(), SinkError>>, (SinkError, bool)> {
        let what = format!("queue {queue}");
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
                .send_message_batch()
                .queue_url(queue)
                .set_entries(Some(batch))
                .send()
                .await
                .map_err(|e| client::classify(SERVICE, &what, &e))?;
            for ok in out.successful() {
                if let Some(slot) = ok
                    .id()
                    .parse::<usize>()
                    .ok()
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

impl Publish for SqsPublisher {
    async fn publish(&self, queue: String, entries: Vec<Entry>) -> Vec<Result<(), SinkError>> {
        match self.request(&queue, &entries).await {
            Ok(outcomes) => outcomes,
            // The service refused the whole request: send each entry alone, so only the
            // message at fault spends an attempt.
            Err((_, true)) if entries.len() > 1 => {
                let mut out = Vec::with_capacity(entries.len());
                for e in &entries {
                    out.push(match self.request(&queue, std::slice::from_ref(e)).await {
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
