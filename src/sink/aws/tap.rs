//! The demo's SQS / SNS reader, and queue / topic administration for the demo and the
//! tests (the relay itself never creates a queue or topic). `Reader` long-polls one
//! queue and deletes what it read; for SNS the demo subscribes a temporary queue (raw
//! delivery) to the topic and removes both on `close`.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};

use super::{client, SnsConfig, SqsConfig};
use crate::sink::{Arrival, SinkError};

/// How long the demo's and the tests' admin calls may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

fn unavailable(what: &str, e: impl std::fmt::Display) -> SinkError {
    SinkError::Unavailable(format!("{what}: {e}"))
}

fn sdk_error<E, R>(e: &aws_sdk_sqs::error::SdkError<E, R>) -> String
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    aws_sdk_sqs::error::DisplayErrorContext(e).to_string()
}

/// SQS and SNS clients for one region / endpoint (the sinks' own configuration).
#[derive(Clone, Debug)]
pub struct Admin {
    pub sqs: aws_sdk_sqs::Client,
    pub sns: aws_sdk_sns::Client,
}

impl Admin {
    pub async fn new(region: &str, endpoint: &str) -> Self {
        let sdk = client::sdk_config(region, endpoint, ADMIN_TIMEOUT).await;
        Self {
            sqs: aws_sdk_sqs::Client::new(&sdk),
            sns: aws_sdk_sns::Client::new(&sdk),
        }
    }

    /// Create queue `name` (a FIFO queue when it ends `.fifo`); its URL.
    pub async fn create_queue(&self, name: &str) -> Result<String, SinkError> {
        let mut req = self.sqs.create_queue().queue_name(name);
        if name.ends_with(".fifo") {
            req = req.attributes(QueueAttributeName::FifoQueue, "true");
        }
        let out = req
            .send()
            .await
            .map_err(|e| unavailable(&format!("cannot create queue {name}"), sdk_error(&e)))?;
        out.queue_url()
            .map(str::to_string)
            .ok_or_else(|| unavailable(name, "CreateQueue returned no URL"))
    }

    /// The ARN of the queue at `url`.
    pub async fn queue_arn(&self, url: &str) -> Result<String, SinkError> {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| unavailable(&format!("cannot read queue {url}"), sdk_error(&e)))?;
        out.attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .cloned()
            .ok_or_else(|| unavailable(url, "no QueueArn attribute"))
    }

    pub async fn delete_queue(&self, url: &str) -> Result<(), SinkError> {
        self.sqs
            .delete_queue()
            .queue_url(url)
            .send()
            .await
            .map(drop)
            .map_err(|e| unavailable(&format!("cannot delete queue {url}"), sdk_error(&e)))
    }

    /// Create topic `name` (a FIFO topic when it ends `.fifo`); its ARN.
    pub async fn create_topic(&self, name: &str) -> Result<String, SinkError> {
        let mut req = self.sns.create_topic().name(name);
        if name.ends_with(".fifo") {
            req = req.attributes("FifoTopic", "true");
        }
        let out = req
            .send()
            .await
            .map_err(|e| unavailable(&format!("cannot create topic {name}"), sdk_error(&e)))?;
        out.topic_arn()
            .map(str::to_string)
            .ok_or_else(|| unavailable(name, "CreateTopic returned no ARN"))
    }

    pub async fn delete_topic(&self, arn: &str) -> Result<(), SinkError> {
        self.sns
            .delete_topic()
            .topic_arn(arn)
            .send()
            .await
            .map(drop)
            .map_err(|e| unavailable(&format!("cannot delete topic {arn}"), sdk_error(&e)))
    }

    /// Subscribe the queue at `queue_url` to `topic_arn` with raw delivery (the message
    /// attributes arrive as SQS attributes), allowing the topic to send to it. Returns
    /// the subscription ARN.
    pub async fn subscribe_queue(
        &self,
        topic_arn: &str,
        queue_url: &str,
    ) -> Result<String, SinkError> {
        let queue_arn = self.queue_arn(queue_url).await?;
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}}
            }]
        });
        self.sqs
            .set_queue_attributes()
            .queue_url(queue_url)
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .send()
            .await
            .map_err(|e| {
                unavailable(
                    &format!("cannot set the policy of {queue_url}"),
                    sdk_error(&e),
                )
            })?;
        let out = self
            .sns
            .subscribe()
            .topic_arn(topic_arn)
            .protocol("sqs")
            .endpoint(&queue_arn)
            .attributes("RawMessageDelivery", "true")
            .return_subscription_arn(true)
            .send()
            .await
            .map_err(|e| {
                unavailable(
                    &format!("cannot subscribe {queue_arn} to {topic_arn}"),
                    sdk_error(&e),
                )
            })?;
        Ok(out.subscription_arn().unwrap_or_default().to_string())
    }

    pub async fn unsubscribe(&self, subscription_arn: &str) -> Result<(), SinkError> {
        self.sns
            .unsubscribe()
            .subscription_arn(subscription_arn)
            .send()
            .await
            .map(drop)
            .map_err(|e| {
                unavailable(
                    &format!("cannot unsubscribe {subscription_arn}"),
                    sdk_error(&e),
                )
            })
    }

    /// A reader of the queue at `url`.
    pub fn reader(&self, url: &str) -> Reader {
        Reader {
            sqs: self.sqs.clone(),
            url: url.to_string(),
            buffered: VecDeque::new(),
        }
    }
}

/// One message as read from a queue.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: String,
    /// String message attributes.
    pub attributes: HashMap<String, String>,
    pub group_id: Option<String>,
    pub dedup_id: Option<String>,
}

impl Received {
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes.get(name).map(String::as_str)
    }
}

/// Reads one queue, deleting each message it hands out.
pub struct Reader {
    sqs: aws_sdk_sqs::Client,
    url: String,
    buffered: VecDeque<Received>,
}

impl Reader {
    /// The next message, waiting at most `wait` (long polling, whole seconds, at least 1).
    pub async fn next(&mut self, wait: Duration) -> Result<Option<Received>, SinkError> {
        if self.buffered.is_empty() {
            self.fill(wait).await?;
        }
        Ok(self.buffered.pop_front())
    }

    async fn fill(&mut self, wait: Duration) -> Result<(), SinkError> {
        let secs = wait.as_secs().clamp(1, 20) as i32;
        let out = self
            .sqs
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(10)
            .wait_time_seconds(secs)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .map_err(|e| {
                unavailable(&format!("cannot receive from {}", self.url), sdk_error(&e))
            })?;
        let mut handles = Vec::new();
        for m in out.messages() {
            let attributes = m
                .message_attributes()
                .map(|a| {
                    a.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.string_value()?.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            let system =
                |n: MessageSystemAttributeName| m.attributes().and_then(|a| a.get(&n)).cloned();
            self.buffered.push_back(Received {
                body: m.body().unwrap_or_default().to_string(),
                attributes,
                group_id: system(MessageSystemAttributeName::MessageGroupId),
                dedup_id: system(MessageSystemAttributeName::MessageDeduplicationId),
            });
            if let Some(h) = m.receipt_handle() {
                handles.push(h.to_string());
            }
        }
        // Read in order and deleted one by one: a FIFO queue hands out a group's next
        // message only once the earlier ones are gone.
        for h in handles {
            self.sqs
                .delete_message()
                .queue_url(&self.url)
                .receipt_handle(h)
                .send()
                .await
                .map_err(|e| {
                    unavailable(&format!("cannot delete from {}", self.url), sdk_error(&e))
                })?;
        }
        Ok(())
    }
}

/// The demo's reader: the configured queue (SQS), or a temporary queue subscribed to the
/// configured topic (SNS).
pub struct DemoTap {
    admin: Admin,
    reader: Reader,
    /// (subscription ARN, temporary queue URL) to remove on `close`.
    temporary: Option<(String, String)>,
}

impl DemoTap {
    pub async fn sqs(cfg: &SqsConfig) -> Result<Self, SinkError> {
        let admin = Admin::new(&cfg.region, &cfg.endpoint_url).await;
        let reader = admin.reader(&cfg.queue_url);
        println!("reading from queue {}", cfg.queue_url);
        Ok(Self {
            admin,
            reader,
            temporary: None,
        })
    }

    pub async fn sns(cfg: &SnsConfig) -> Result<Self, SinkError> {
        let admin = Admin::new(&cfg.region, &cfg.endpoint_url).await;
        let mut name = format!("outbox-relay-demo-{:08x}", rand::random::<u32>());
        if super::wire::is_fifo(&cfg.topic_arn) {
            name.push_str(".fifo");
        }
        let queue = admin.create_queue(&name).await?;
        let subscription = match admin.subscribe_queue(&cfg.topic_arn, &queue).await {
            Ok(s) => s,
            Err(e) => {
                let _ = admin.delete_queue(&queue).await;
                return Err(e);
            }
        };
        println!(
            "reading from temporary queue {name} subscribed to topic {}",
            cfg.topic_arn
        );
        Ok(Self {
            reader: admin.reader(&queue),
            admin,
            temporary: Some((subscription, queue)),
        })
    }

    pub async fn next(&mut self, timeout: Duration) -> Option<Arrival> {
        let r = self.reader.next(timeout).await.ok()??;
        let mut attributes: Vec<_> = r.attributes.iter().collect();
        attributes.sort();
        Some(Arrival {
            event_id: r.attribute("event_id").unwrap_or_default().to_string(),
            aggregate_id: r.attribute("aggregate_id").unwrap_or_default().to_string(),
            summary: format!(
                "  attributes   {attributes:?}\n  group id     {}\n  body         {}",
                r.group_id.as_deref().unwrap_or("-"),
                r.body
            ),
        })
    }

    /// Remove the temporary subscription and queue (SNS).
    pub async fn close(self) {
        if let Some((subscription, queue)) = self.temporary {
            let _ = self.admin.unsubscribe(&subscription).await;
            let _ = self.admin.delete_queue(&queue).await;
        }
    }
}
