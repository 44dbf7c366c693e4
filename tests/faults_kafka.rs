//! The Kafka side attacked while the relay (the binary, `sink.kind = kafka`) publishes:
//! a real tansu broker killed with produce requests outstanding and restarted, and
//! librdkafka's mock cluster answering Produce with retriable errors or too slowly for
//! `message.timeout.ms`. For each: committed = delivered + failed, 0 lost, per-aggregate
//! order of first deliveries, duplicates counted. The tansu broker is a private instance
//! on its own port (same command line as `scripts/kafka-broker.sh`), so the shared one on
//! 9092 is never touched; it runs in the serial phase all the same.

use std::time::{Duration, Instant};

use outbox_relay_testkit::{db::*, faults::*, kafka::*, relay_proc::*, unique, wait::*};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

async fn processed_ids(table: &TestTable) -> Vec<String> {
    sqlx::query_scalar(&format!(
        "SELECT event_id::text FROM \"{}\" WHERE status = 'PROCESSED'",
        table.name
    ))
    .fetch_all(&table.pool)
    .await
    .unwrap()
}

/// tansu keeps its log in memory, so what it stored dies with it. To count exactly, the
/// relay is frozen (SIGSTOP) with its produce requests in flight, the consumer reads the
/// broker's log to the end, then the broker is SIGKILLed, the relay resumed into the
/// outage (no attempts spent while it lasts), and the broker started again with the topic
/// re-created the way an operator would. Every row must be delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tansu_killed_with_requests_outstanding_loses_nothing() {
    let mut tansu = Tansu::start();
    let brokers = tansu.brokers();
    let topic = unique("fkafka-restart").replace('_', "-");
    kafka_create_topic(&brokers, &topic, 4, Duration::from_secs(30)).await;
    let table = TestTable::new("fkrestart").await;
    table.produce(2_000, 40, 4).await;
    let (env, file) = kafka_env(
        &table.name,
        &brokers,
        &topic,
        &[("reconnect.backoff.max.ms", "500")],
        &[
            ("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT", "3s"),
            // The re-created topic may be missing for a moment after the restart: a row
            // refused then spends an attempt; it must never fail for it.
            ("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS", "20"),
        ],
    );
    let collector = KafkaCollector::start(&brokers, &topic);
    let relay = RelayProc::start_cmd(&env, &["run", "--config", file.path().to_str().unwrap()]);
    let producer = Producer::start(&table.pool, &table.name, 40, 2, Duration::from_millis(3));
    table
        .wait_processed_over(500, Duration::from_secs(60))
        .await;

    relay.signal("STOP");
    let frozen_at = table.count("PROCESSED").await;
    // Read the broker's log to its end (everything it acknowledged or will).
    wait_for(
        Duration::from_secs(60),
        "the consumer caught up",
        || async {
            let got = collector.distinct();
            let done = collector.quiet_for() > Duration::from_secs(2)
                && processed_ids(&table)
                    .await
                    .iter()
                    .all(|id| got.contains(id));
            done.then_some(())
        },
    )
    .await;
    // librdkafka (the consumer's metadata cache) can crash on the restarted broker's
    // first answers about a topic that vanished: read the new log with a new consumer.
    let before_kill = collector.ids();
    drop(collector);
    tansu.kill();
    relay.signal("CONT");
    let t0 = Instant::now();
    wait_broker_up(&relay, false, Duration::from_secs(60)).await;
    assert_eq!(relay.get("/livez").await.map(|r| r.0), Some(200));
    let attempts_during_outage = table.max_attempts_seen().await;
    tansu.restart();
    kafka_create_topic(&brokers, &topic, 4, Duration::from_secs(30)).await;
    let outage = t0.elapsed();
    let collector = KafkaCollector::start(&brokers, &topic);

    wait_broker_up(&relay, true, Duration::from_secs(60)).await;
    table
        .wait_progress(100, Duration::from_secs(60), "progress after the restart")
        .await;
    let (commits, _) = producer.stop().await;
    table
        .wait_no_pending(Duration::from_secs(120), "every committed row settled")
        .await;
    let processed = processed_ids(&table).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut got = collector.distinct();
        got.extend(before_kill.iter().cloned());
        let missing: Vec<String> = processed
            .iter()
            .filter(|id| !got.contains(*id))
            .cloned()
            .collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let rows: Vec<(i64, String)> = sqlx::query_as(&format!(
                "SELECT id, (processed_at - now())::text FROM \"{}\" WHERE event_id::text = ANY($1) ORDER BY id",
                table.name
            ))
            .bind(&missing)
            .fetch_all(&table.pool)
            .await
            .unwrap();
            panic!(
                "{} PROCESSED rows never consumed (before the kill: {} records, after: {}); first (id, processed_at - now): {:?}",
                missing.len(),
                before_kill.len(),
                collector.ids().len(),
                &rows[..rows.len().min(20)]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut ledger = Ledger::load(
        "Kafka (tansu) SIGKILL + restart with requests outstanding",
        &table.pool,
        &table.name,
    )
    .await;
    ledger.delivered(before_kill);
    ledger.delivered(collector.ids());
    let t = ledger.settle();
    assert_eq!(t.failed, 0);
    assert_eq!(
        attempts_during_outage, 0,
        "the outage itself spends no attempt"
    );
    println!(
        "frozen at {frozen_at} processed; broker down {outage:?}; rows that spent an attempt on the re-created topic: {}; producers committed {commits} (+2000)",
        t.rows_with_attempts
    );
    drop(relay);
    table.cleanup().await;
}

/// The mock cluster answers Produce with retriable errors (librdkafka retries them inside
/// `message.timeout.ms`) and then with a round-trip time longer than it (the relay times
/// out, reconnects, re-publishes). No attempt is spent; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_request_errors_and_timeouts_lose_nothing() {
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("fkafka-mock").replace('_', "-");
    cluster.create_topic(&topic, 4, 1).unwrap();
    let table = TestTable::new("fkmock").await;
    table.produce(1_000, 40, 4).await;
    let (env, file) = kafka_env(
        &table.name,
        &brokers,
        &topic,
        &[],
        &[("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT", "2s")],
    );
    let relay = RelayProc::start_cmd(&env, &["run", "--config", file.path().to_str().unwrap()]);
    let producer = Producer::start(&table.pool, &table.name, 40, 2, Duration::from_millis(3));
    table
        .wait_processed_over(300, Duration::from_secs(60))
        .await;

    // 1. Retriable broker errors on Produce.
    use RDKafkaRespErr::*;
    let errs = [
        RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
        RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    ];
    let burst: Vec<RDKafkaRespErr> = errs.iter().cycle().take(20).copied().collect();
    cluster.request_errors(RDKafkaApiKey::Produce, &burst);
    table
        .wait_progress(
            200,
            Duration::from_secs(60),
            "progress through the error burst",
        )
        .await;
    table
        .assert_no_attempts("retriable errors spend no attempt")
        .await;

    // 2. A broker slower than message.timeout.ms (2s): requests time out.
    cluster
        .broker_round_trip_time(1, Duration::from_secs(4))
        .unwrap();
    wait_broker_up(&relay, false, Duration::from_secs(60)).await;
    table.assert_no_attempts("timeouts spend no attempt").await;
    cluster
        .broker_round_trip_time(1, Duration::from_millis(0))
        .unwrap();
    table
        .wait_progress(
            200,
            Duration::from_secs(60),
            "progress after the slow spell",
        )
        .await;

    let (commits, _) = producer.stop().await;
    table
        .wait_no_pending(Duration::from_secs(90), "every committed row settled")
        .await;
    table.assert_no_attempts("no attempt spent").await;
    let t = tally_kafka(
        "Kafka (mock) retriable Produce errors x20 + RTT 4s > message.timeout.ms",
        &table,
        &brokers,
        &topic,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(t.failed, 0);
    println!("producers committed {commits} (+1000)");
    drop(relay);
    table.cleanup().await;
}
