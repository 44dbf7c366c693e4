//! The SQS and SNS sinks end to end against an AWS emulator (moto, started by
//! `scripts/aws-emulator.sh`; `TEST_AWS_ENDPOINT`, default http://127.0.0.1:5000). Not
//! skipped when absent: the test fails and says so. Each test makes its own queues and
//! topics and deletes them.

use std::time::Duration;

use outbox_relay::sink::aws::{SnsSink, SqsConfig, SqsSink};
use outbox_relay_testkit::{aws::*, db::*, inproc::*};

/// `relay_until` with the SQS sink of `cfg`.
async fn relay_sqs(table: &TestTable, cfg: &SqsConfig, processed: i64, failed: i64) {
    let sink = SqsSink::new(cfg, Duration::from_secs(5)).expect("valid [sqs]");
    relay_until(table, sink, relay_config("5s"), processed, failed).await;
}

/// `relay_until` with the SNS sink publishing to `topic_arn`.
async fn relay_sns(table: &TestTable, topic_arn: &str, processed: i64, failed: i64) {
    let cfg = sns_config(&aws_endpoint(), topic_arn);
    let sink = SnsSink::new(&cfg, Duration::from_secs(5)).expect("valid [sns]");
    relay_until(table, sink, relay_config("5s"), processed, failed).await;
}

/// A standard queue gets every row, each with the SPEC §2 body and attributes, and no
/// attempt is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_queue_receives_every_row_with_spec_attributes() {
    require_emulator();
    let queue = TestQueue::new("at-std", false).await;
    let table = TestTable::new("awsstd").await;
    table.insert_rows(&Row::grid(40, 10)).await;
    relay_sqs(&table, &sqs_config(&aws_endpoint(), &queue.url), 400, 0).await;
    table.assert_all_clean().await;
    let got = queue.read(400, Duration::from_secs(60)).await;
    assert_all_delivered(&table.rows().await, &got, false);
    assert!(
        got.iter().all(|m| m.group_id.is_none()),
        "no group id on a standard queue"
    );
    queue.delete().await;
    table.drop_all().await;
}

/// A FIFO queue: group id = aggregate_id, deduplication id = event_id, and each
/// aggregate's rows read back in `id` order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_queue_is_read_back_in_aggregate_order() {
    require_emulator();
    let queue = TestQueue::new("at-fifo", true).await;
    let table = TestTable::new("awsfifo").await;
    table.produce(300, 12, 4).await;
    relay_sqs(&table, &sqs_config(&aws_endpoint(), &queue.url), 300, 0).await;
    let got = queue.read(300, Duration::from_secs(60)).await;
    let db = table.rows().await;
    assert_all_delivered(&db, &got, true);
    assert_fifo_order(&db, &got);
    queue.delete().await;
    table.drop_all().await;
}

/// A message over 256 KiB fails on its own before sending, naming the limit; the rows
/// around it (same batch, other aggregates) are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_message_fails_alone() {
    require_emulator();
    let queue = TestQueue::new("at-big", false).await;
    let table = TestTable::new("awsbig").await;
    let mut big = Row::new("big", 0);
    big.payload = serde_json::json!({"blob": "x".repeat(300 * 1024)});
    let mut rows: Vec<Row> = (0..10).map(|a| Row::new(&format!("o-{a}"), 0)).collect();
    rows.insert(5, big);
    table.insert_rows(&rows).await;
    relay_sqs(&table, &sqs_config(&aws_endpoint(), &queue.url), 10, 1).await;
    let (failed, why) = table.the_failed().await;
    assert_eq!(failed.aggregate_id, "big");
    assert!(why.contains("256 KiB") && why.contains("SQS"), "{why}");
    let got = queue.read(10, Duration::from_secs(30)).await;
    assert!(got
        .iter()
        .all(|m| m.attribute("aggregate_id") != Some("big")));
    queue.delete().await;
    table.drop_all().await;
}

/// A row whose destination queue does not exist fails on its own, naming the queue;
/// the others go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_queue_fails_its_row_only() {
    require_emulator();
    let queue = TestQueue::new("at-miss", false).await;
    let missing = queue.missing_sibling();
    let table = TestTable::new("awsmiss").await;
    table
        .insert_rows(&[
            Row::new("a", 0),
            Row::new("typo", 0).to(&missing),
            Row::new("b", 0).to(&queue.url),
            Row::new("typo", 1),
        ])
        .await;
    relay_sqs(&table, &sqs_config(&aws_endpoint(), &queue.url), 2, 1).await;
    table.the_typo_failed(&[&missing, "does not exist"]).await;
    table.assert_later_row_waits(3).await;
    queue.delete().await;
    table.drop_all().await;
}

/// SNS: a FIFO topic with a subscribed FIFO queue (raw delivery) receives every row
/// with the SPEC attributes, in aggregate order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_topic_delivers_everything_to_its_subscriber() {
    require_emulator();
    let topic = TestTopic::new("at-sns", true).await;
    let table = TestTable::new("awssns").await;
    table.produce(120, 6, 3).await;
    relay_sns(&table, &topic.arn, 120, 0).await;
    let got = topic.queue.read(120, Duration::from_secs(60)).await;
    let db = table.rows().await;
    assert_all_delivered(&db, &got, true);
    assert_fifo_order(&db, &got);
    topic.delete().await;
    table.drop_all().await;
}

/// SNS: a standard topic, and a row for a topic that does not exist fails on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_topic_delivers_and_missing_topic_fails() {
    require_emulator();
    let topic = TestTopic::new("at-snsstd", false).await;
    let missing = format!("{}-missing", topic.arn);
    let table = TestTable::new("awssnsstd").await;
    let mut rows: Vec<Row> = (0..20).map(|a| Row::new(&format!("o-{a}"), 0)).collect();
    rows.push(Row::new("typo", 0).to(&missing));
    table.insert_rows(&rows).await;
    relay_sns(&table, &topic.arn, 20, 1).await;
    let got = topic.queue.read(20, Duration::from_secs(30)).await;
    let by_id = by_event_id(&got);
    for row in table.rows().await {
        if row.status == "FAILED" {
            let why = row.last_error.as_deref().unwrap();
            assert!(
                why.contains(&missing) && why.contains("does not exist"),
                "{why}"
            );
            continue;
        }
        assert_spec_mapping(&row, by_id[&row.event_id], false);
    }
    topic.delete().await;
    table.drop_all().await;
}

/// A row that ends FAILED is also sent to `sqs.dead_letter_queue_url`, carrying
/// `last_error` and `original_target` attributes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_row_goes_to_the_dead_letter_queue() {
    require_emulator();
    let queue = TestQueue::new("at-main", false).await;
    let dlq = TestQueue::new("at-dlq", false).await;
    let table = TestTable::new("awsdlq").await;
    let mut bad = Row::new("bad", 0);
    bad.headers = serde_json::json!({"AWS.reserved": "x"});
    table.insert_rows(&[Row::new("good", 0), bad]).await;
    let mut cfg = sqs_config(&aws_endpoint(), &queue.url);
    cfg.dead_letter_queue_url = Some(dlq.url.clone());
    relay_sqs(&table, &cfg, 1, 1).await;
    let dead = dlq.read(1, Duration::from_secs(30)).await;
    let (failed, _) = table.the_failed().await;
    let m = &dead[0];
    assert_eq!(m.attribute("event_id"), Some(failed.event_id.as_str()));
    assert_eq!(m.body, failed.payload);
    assert_eq!(m.attribute("original_target"), Some(queue.url.as_str()));
    let why = m.attribute("last_error").unwrap_or_default();
    assert!(why.contains("reserved"), "{why}");
    assert_eq!(
        m.attribute("AWS.reserved"),
        None,
        "the offending header is left out"
    );
    queue.delete().await;
    dlq.delete().await;
    table.drop_all().await;
}
