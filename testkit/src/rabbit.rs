//! RabbitMQ side of the tests: a unique exchange and queue per test (`TestBroker`), the
//! messages a consumer got (`Got`), and draining a queue into message ids.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::Connection;
use outbox_relay::sink::rabbitmq::declare_exchange;

use crate::db::TestTable;
use crate::{amqp_url, unique};

/// A unique durable exchange with one queue bound to `#`, deleted by `cleanup` (or, if
/// the test panics first, when the value is dropped).
pub struct TestBroker {
    pub exchange: String,
    pub queue: String,
    conn: Connection,
    channel: lapin::Channel,
    /// Exchanges declared beside `exchange` (`add_exchange`, `declare_unbound`) and not
    /// deleted yet: `cleanup` (or the drop of a panicking test) deletes them too.
    extra: std::sync::Mutex<Vec<String>>,
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if self.exchange.is_empty() {
            return; // a handle from `attach`: the queue is another broker's
        }
        let queue = self.queue.clone();
        let mut exchanges = vec![self.exchange.clone()];
        exchanges.append(&mut self.extra());
        let what = format!("queue {queue} and exchanges {exchanges:?}");
        crate::teardown::after_panic(what, async move {
            let Ok(conn) = Connection::connect(
                &amqp_url(),
                outbox_relay::sink::rabbitmq::connection_properties(),
            )
            .await
            else {
                return;
            };
            if let Ok(ch) = conn.create_channel().await {
                delete_named(&ch, &queue, &exchanges).await;
            }
            let _ = conn.close(200, "teardown").await;
        });
    }
}

/// A fresh table and a broker of its own, both named from `prefix`: how most RabbitMQ
/// tests begin (`TestBroker::cleanup_with` ends them).
pub async fn table_and_broker(prefix: &str) -> (TestTable, TestBroker) {
    (TestTable::new(prefix).await, TestBroker::new(prefix).await)
}

/// Run `scenario`; drop the broker's queue/exchange and the table even if it panicked.
pub async fn guarded(
    table: &TestTable,
    broker: &TestBroker,
    scenario: impl std::future::Future<Output = ()>,
) {
    use futures::FutureExt;
    let outcome = std::panic::AssertUnwindSafe(scenario).catch_unwind().await;
    broker.cleanup().await;
    table.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// One test per scenario `async fn body(&TestTable, &TestBroker)`: its own table, exchange
/// and queue named from the prefix, dropped even on failure.
#[macro_export]
macro_rules! rabbit_scenario {
    ($test:ident, $prefix:literal, $body:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $test() {
            let table = $crate::db::TestTable::new($prefix).await;
            let broker = $crate::rabbit::TestBroker::new($prefix).await;
            $crate::rabbit::guarded(&table, &broker, $body(&table, &broker)).await;
        }
    };
}

/// A message as a consumer got it.
#[derive(Debug, Clone)]
pub struct Got {
    pub message_id: String,
    pub kind: String,
    pub content_type: String,
    pub delivery_mode: u8,
    pub routing_key: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

pub async fn amqp_connect() -> Connection {
    Connection::connect(
        &amqp_url(),
        outbox_relay::sink::rabbitmq::connection_properties(),
    )
    .await
    .expect("connect rabbitmq")
}

impl TestBroker {
    pub async fn new(prefix: &str) -> Self {
        let conn = amqp_connect().await;
        let channel = conn.create_channel().await.unwrap();
        let exchange = unique(prefix);
        let queue = format!("{exchange}.q");
        channel
            .queue_declare(
                &queue,
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        bound_exchange(&channel, &exchange, &queue).await;
        Self {
            exchange,
            queue,
            conn,
            channel,
            extra: Default::default(),
        }
    }

    /// A handle on an existing queue (for a consumer in another task).
    pub async fn attach(queue: &str) -> Self {
        let conn = amqp_connect().await;
        let channel = conn.create_channel().await.unwrap();
        Self {
            exchange: String::new(),
            queue: queue.to_string(),
            conn,
            channel,
            extra: Default::default(),
        }
    }

    /// Open a fresh connection (after the broker was restarted).
    pub async fn reconnect(&mut self) {
        self.conn = amqp_connect().await;
        self.channel = self.conn.create_channel().await.unwrap();
    }

    /// Declare another exchange bound to this queue (an operator "fixing the cause").
    pub async fn add_exchange(&self, name: &str) {
        self.remember(name);
        bound_exchange(&self.channel, name, &self.queue).await;
    }

    /// Declare an exchange with no queue bound: what is published to it comes back
    /// (mandatory), i.e. unroutable. `delete_exchange` removes it.
    pub async fn declare_unbound(&self, name: &str) {
        self.remember(name);
        declare_exchange(&self.channel, name).await.unwrap();
    }

    fn remember(&self, name: &str) {
        self.extra().push(name.to_string());
    }

    /// The extra exchanges not deleted yet.
    fn extra(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.extra
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Everything in the queue (call with no relay running).
    pub async fn drain_all(&self) -> Vec<Got> {
        let n = self.depth().await as usize;
        self.take(n, Duration::from_secs(180)).await
    }

    pub async fn delete_exchange(&self, name: &str) {
        self.extra().retain(|n| n != name);
        let _ = self
            .channel
            .exchange_delete(name, ExchangeDeleteOptions::default())
            .await;
    }

    /// Consume until `n` messages arrived, or panic after `timeout`.
    pub async fn take(&self, n: usize, timeout: Duration) -> Vec<Got> {
        let ch = self.conn.create_channel().await.unwrap();
        ch.basic_qos(1000, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = ch
            .basic_consume(
                &self.queue,
                &unique("c"),
                // Manual acks: messages the broker pushed beyond the `n` we take are
                // requeued when the channel closes, not lost with it.
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, consumer.next()).await;
            let Ok(Some(Ok(d))) = next else {
                panic!(
                    "only {} of {n} messages arrived within {timeout:?}",
                    out.len()
                );
            };
            d.ack(BasicAckOptions::default()).await.expect("ack");
            out.push(to_got(&d));
        }
        let _ = ch.close(200, "done").await;
        out
    }

    /// Messages currently in the queue (without consuming).
    pub async fn depth(&self) -> u32 {
        let q = self
            .channel
            .queue_declare(
                &self.queue,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        q.message_count()
    }

    /// `cleanup`, then `table`'s: the end of a test that began with `table_and_broker`.
    pub async fn cleanup_with(&self, table: &TestTable) {
        self.cleanup().await;
        table.cleanup().await;
    }

    pub async fn cleanup(&self) {
        let ch = match self.conn.create_channel().await {
            Ok(c) => c,
            Err(_) => amqp_connect().await.create_channel().await.unwrap(),
        };
        let mut exchanges = vec![self.exchange.clone()];
        exchanges.append(&mut self.extra());
        delete_named(&ch, &self.queue, &exchanges).await;
    }
}

/// Delete `queue`, then `exchanges` (errors ignored: any may be gone).
async fn delete_named(ch: &lapin::Channel, queue: &str, exchanges: &[String]) {
    let _ = ch.queue_delete(queue, QueueDeleteOptions::default()).await;
    for name in exchanges {
        let _ = ch
            .exchange_delete(name, ExchangeDeleteOptions::default())
            .await;
    }
}

/// Declare the durable topic exchange `exchange` and bind `queue` to it with `#`.
async fn bound_exchange(channel: &lapin::Channel, exchange: &str, queue: &str) {
    declare_exchange(channel, exchange).await.unwrap();
    channel
        .queue_bind(
            queue,
            exchange,
            "#",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// A short-string property as text (`""` when absent).
fn text(s: &Option<lapin::types::ShortString>) -> String {
    s.as_ref()
        .map(|s| s.as_str().to_string())
        .unwrap_or_default()
}

fn to_got(d: &lapin::message::Delivery) -> Got {
    let p = &d.properties;
    let headers = outbox_relay::sink::rabbitmq::tap::header_strings(p)
        .into_iter()
        .collect();
    Got {
        message_id: text(p.message_id()),
        kind: text(p.kind()),
        content_type: text(p.content_type()),
        delivery_mode: p.delivery_mode().unwrap_or(0),
        routing_key: d.routing_key.as_str().to_string(),
        headers,
        body: d.data.clone(),
    }
}

/// After an outage: a row written now (aggregate `agg-after`) becomes `PROCESSED` and
/// reaches the broker's queue; returns the message.
pub async fn row_written_now_is_delivered(table: &TestTable, broker: &TestBroker) -> Got {
    table
        .insert("agg-after", "order.created", None, serde_json::json!({}))
        .await;
    table
        .wait_status("PROCESSED", 1, Duration::from_secs(30))
        .await;
    let got = broker.take(1, Duration::from_secs(30)).await;
    assert_eq!(
        got[0].headers.get("aggregate_id").map(String::as_str),
        Some("agg-after")
    );
    got.into_iter().next().expect("one message")
}

/// Everything in `queue` now, waiting until it has been empty for `quiet` (late copies
/// from a broken connection may still land). Message ids in arrival order.
pub async fn drain_queue(queue: &str, quiet: Duration, within: Duration) -> Vec<String> {
    let conn = amqp_connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(2000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            queue,
            &unique("drain"),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("consume the test queue");
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        match tokio::time::timeout(quiet, consumer.next()).await {
            Ok(Some(Ok(d))) => out.push(
                d.properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
            ),
            Ok(other) => panic!("consumer of {queue} ended: {other:?}"),
            Err(_) => break, // quiet for `quiet`: drained
        }
    }
    let _ = conn.close(200, "drained").await;
    out
}
