//! The tests' own hygiene: a test that fails before its last lines (where it removes what
//! it made) still leaves no table, exchange, queue, stream or key behind on the shared
//! services — the testkit's types remove them on drop while the test panics.

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::ExchangeKind;
use outbox_relay_testkit::{db::TestTable, nats, pg_url, rabbit, redis::TestKeys};
use redis::AsyncCommands;
use sqlx::Connection;

/// What the failing test made, by name.
struct Made {
    table: String,
    exchange: String,
    /// An exchange declared beside the broker's own (`declare_unbound`).
    unbound: String,
    queue: String,
    stream: String,
    key: String,
}

/// Run a "test" on a thread of its own (as the test harness does: a runtime, then
/// `block_on`) that makes one of each, writes a row, a message and a key, and panics.
fn a_failing_test() -> Made {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let table = TestTable::new("teardown").await;
            let broker = rabbit::TestBroker::new("teardown").await;
            let unbound = format!("{}_unbound", broker.exchange);
            broker.declare_unbound(&unbound).await;
            let stream = nats::TestStream::new("teardown").await;
            let keys = TestKeys::new("teardown");
            table.insert_series("'agg-1'", 1).await;
            let key = keys.key("left");
            let client = redis::Client::open(outbox_relay_testkit::redis::redis_url()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let _: () = conn.set(&key, "x").await.unwrap();
            tx.send(Made {
                table: table.name.clone(),
                exchange: broker.exchange.clone(),
                unbound,
                queue: broker.queue.clone(),
                stream: stream.name.clone(),
                key,
            })
            .unwrap();
            panic!("this test fails before its cleanup (on purpose)");
        })
    })
    .join();
    assert!(outcome.is_err(), "the failing test must have panicked");
    rx.recv().expect("the failing test named what it made")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_that_panics_leaves_nothing_behind() {
    let made = tokio::task::spawn_blocking(a_failing_test).await.unwrap();

    let mut pg = sqlx::PgConnection::connect(&pg_url()).await.unwrap();
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class WHERE starts_with(relname, $1)
         UNION ALL SELECT proname::text FROM pg_proc WHERE starts_with(proname, $1)",
    )
    .bind(&made.table)
    .fetch_all(&mut pg)
    .await
    .unwrap();
    assert!(left.is_empty(), "left in Postgres: {left:?}");

    // A passive declare of a missing queue or exchange closes the channel with 404.
    let amqp = rabbit::amqp_connect().await;
    let ch = amqp.create_channel().await.unwrap();
    let queue = ch
        .queue_declare(
            &made.queue,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(queue.is_err(), "queue {} left behind", made.queue);
    for name in [&made.exchange, &made.unbound] {
        let ch = amqp.create_channel().await.unwrap();
        let exchange = ch
            .exchange_declare(
                name,
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        assert!(exchange.is_err(), "exchange {name} left behind");
    }

    let js = nats::jetstream().await;
    assert!(
        js.get_stream(&made.stream).await.is_err(),
        "stream {} left behind",
        made.stream
    );

    let client = redis::Client::open(outbox_relay_testkit::redis::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let exists: bool = conn.exists(&made.key).await.unwrap();
    assert!(!exists, "key {} left behind", made.key);
}
