//! The RabbitMQ side: a unique durable topic exchange bound to one durable queue, the
//! raw broker ceiling (a bare lapin publisher, no database), a consumer that timestamps
//! arrivals, and the textbook relay's publish-and-wait.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use lapin::options::*;
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use outbox_relay::sink::rabbitmq::declare_exchange;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::pg::{NaivePublisher, NaiveRow};
use crate::window::{sliding, Load};

pub struct Rabbit {
    pub conn: Connection,
    pub exchange: String,
    pub queue: String,
}

pub async fn connect(url: &str, name: &str) -> Result<Connection> {
    let props =
        outbox_relay::sink::rabbitmq::connection_properties().with_connection_name(name.into());
    Connection::connect(url, props)
        .await
        .context("connect to RabbitMQ")
}

async fn confirm_channel(conn: &Connection) -> Result<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

fn props_for(event_id: Uuid, agg: &str, traceparent: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("traceparent", traceparent),
        ("event_type", "order.created"),
        ("aggregate_type", "order"),
        ("aggregate_id", agg),
    ] {
        headers.insert(
            ShortString::from(k),
            AMQPValue::LongString(LongString::from(v.to_string())),
        );
    }
    BasicProperties::default()
        .with_message_id(ShortString::from(event_id.to_string()))
        .with_type(ShortString::from("order.created"))
        .with_content_type(ShortString::from("application/json"))
        .with_timestamp(chrono::Utc::now().timestamp() as u64)
        .with_delivery_mode(2)
        .with_headers(headers)
}

impl Rabbit {
    /// Declare the exchange exactly as the relay does (durable topic) and one durable
    /// queue bound with `#`.
    pub async fn setup(url: &str, exchange: &str) -> Result<Self> {
        let conn = connect(url, "outbox-relay-bench").await?;
        let ch = conn.create_channel().await?;
        declare_exchange(&ch, exchange).await?;
        let queue = format!("{exchange}_q");
        ch.queue_declare(
            &queue,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            &queue,
            exchange,
            "#",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let _ = ch.close(200, "setup done").await;
        Ok(Self {
            conn,
            exchange: exchange.to_string(),
            queue,
        })
    }

    pub async fn purge(&self) -> Result<u32> {
        let ch = self.conn.create_channel().await?;
        let n = ch
            .queue_purge(&self.queue, QueuePurgeOptions::default())
            .await?;
        let _ = ch.close(200, "purged").await;
        Ok(n)
    }

    /// Messages ready in the queue.
    pub async fn depth(&self) -> Result<u32> {
        let ch = self.conn.create_channel().await?;
        let q = ch
            .queue_declare(
                &self.queue,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = ch.close(200, "depth").await;
        Ok(q.message_count())
    }

    pub async fn teardown(&self) {
        if let Ok(ch) = self.conn.create_channel().await {
            let _ = ch
                .queue_delete(&self.queue, QueueDeleteOptions::default())
                .await;
            let _ = ch
                .exchange_delete(&self.exchange, ExchangeDeleteOptions::default())
                .await;
            let _ = ch.close(200, "bye").await;
        }
        let _ = self.conn.close(200, "bye").await;
    }

    /// The raw broker ceiling: `n` persistent messages of `payload`, mandatory, with
    /// publisher confirms, at most `window` unconfirmed at any time (a sliding window —
    /// the best a publisher with that window can do). Returns seconds.
    pub async fn ceiling(&self, load: &Load<'_>) -> Result<f64> {
        let Load {
            n, payload, window, ..
        } = *load;
        let publisher = self.publisher().await?;
        let p = &publisher;
        let secs = sliding(n, window, |i| async move {
            let confirm = p
                .publish(Uuid::new_v4(), "order.created", &load.aggregate(i), payload)
                .await?;
            let answer = async move {
                match confirm.await {
                    Ok(Confirmation::Ack(None)) => Ok(1),
                    other => bail!("raw publisher: not confirmed: {other:?}"),
                }
            };
            Ok((1, answer))
        })
        .await?;
        let _ = publisher.ch.close(200, "done").await;
        Ok(secs)
    }

    /// Consume the queue (auto-ack) and note when each `message_id` arrived.
    pub async fn arrivals(&self) -> Result<(Arrivals, tokio::task::JoinHandle<()>)> {
        let ch = self.conn.create_channel().await?;
        ch.basic_qos(2000, BasicQosOptions::default()).await?;
        let mut consumer = ch
            .basic_consume(
                &self.queue,
                "bench-latency",
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let seen: Arrivals = Arc::new(Mutex::new(HashMap::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let _ch = ch;
            while let Some(Ok(d)) = consumer.next().await {
                let at = Instant::now();
                if let Some(id) = d
                    .properties
                    .message_id()
                    .as_ref()
                    .and_then(|m| Uuid::parse_str(m.as_str()).ok())
                {
                    s.lock().await.entry(id).or_insert(at);
                }
            }
        });
        Ok((seen, task))
    }

    /// A bare publisher on the bench's exchange (a confirm channel, as the relay's): the
    /// raw ceiling's, the textbook relay's and the latency floor's.
    pub async fn publisher(&self) -> Result<BarePublisher> {
        Ok(BarePublisher {
            ch: confirm_channel(&self.conn).await?,
            exchange: self.exchange.clone(),
        })
    }
}

pub type Arrivals = Arc<Mutex<HashMap<Uuid, Instant>>>;

/// Publishes messages rendered as the relay renders them: persistent, `mandatory`.
pub struct BarePublisher {
    ch: Channel,
    exchange: String,
}

impl BarePublisher {
    /// Publish message `id`; the broker's confirm is returned, not awaited.
    async fn publish(
        &self,
        id: Uuid,
        routing_key: &str,
        agg: &str,
        payload: &str,
    ) -> Result<PublisherConfirm> {
        let confirm = self
            .ch
            .basic_publish(
                &self.exchange,
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                payload.as_bytes(),
                props_for(id, agg, crate::pg::TRACEPARENT),
            )
            .await?;
        Ok(confirm)
    }

    /// Hand message `id` over (the latency floor); its confirm is awaited aside.
    pub async fn send(&self, id: Uuid, agg: String, payload: &str) -> Result<()> {
        let confirm = self.publish(id, "order.created", &agg, payload).await?;
        tokio::spawn(confirm);
        Ok(())
    }
}

impl NaivePublisher for BarePublisher {
    async fn publish_one(&mut self, row: &NaiveRow) -> Result<()> {
        let _ = (&row.aggregate_type, row.created_at);
        let confirm = self
            .publish(
                row.event_id,
                &row.event_type,
                &row.aggregate_id,
                &row.payload,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            other => bail!("naive relay: not confirmed: {other:?}"),
        }
    }
}
