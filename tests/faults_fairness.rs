//! Engine fairness and bounds, black-box through the binary: a hot aggregate never starves
//! the others, nor does one type's burst the other types (one relay, and three replicas
//! with producers writing), an oversized row fails alone without pausing the relay, and
//! megabyte payloads stay under a memory bound. (Stopped and killed replicas:
//! `faults_replicas.rs`.)
//! In the serial phase of `scripts/test.sh` (a `faults_` binary): it loads the machine
//! heavily and its deadlines are timing guarantees, so nothing else runs beside it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use outbox_relay_testkit::{
    db::*, order::*, rabbit::*, rabbit_scenario, relay_proc::*, unique, wait::*,
};

const BROKER_UP: &str = "outbox_relay_broker_up";

/// A `/proc/<pid>/status` field in kB (`VmRSS:`, `VmHWM:`).
fn proc_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Consume `queue` (auto-ack, bodies dropped) until `target` distinct message ids arrived.
async fn consume_ids(queue: String, target: usize, timeout: Duration) -> HashSet<String> {
    let conn = amqp_connect().await;
    let ch = conn.create_channel().await.unwrap();
    let opts = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut consumer = ch
        .basic_consume(&queue, &unique("c"), opts, FieldTable::default())
        .await
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut ids = HashSet::new();
    while ids.len() < target {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(Ok(d))) = tokio::time::timeout(left, consumer.next()).await else {
            panic!("only {} of {target} messages within {timeout:?}", ids.len());
        };
        if let Some(id) = d.properties.message_id() {
            ids.insert(id.as_str().to_string());
        }
    }
    let _ = conn.close(200, "done").await;
    ids
}

/// What reached the queue once the relay stopped, checked for per-aggregate order.
struct Reached {
    deliveries: usize,
    /// Distinct rows whose `aggregate_id` `pick` selected.
    picked: usize,
    duplicates: usize,
    violations: Vec<String>,
}

/// Stop the relay, read the queue, check order; count the distinct rows `pick` selects.
async fn reached(
    mut relay: RelayProc,
    table: &TestTable,
    broker: &TestBroker,
    what: &str,
    pick: impl Fn(&str) -> bool,
) -> Reached {
    relay.terminate().await;
    let got = broker.drain_all().await;
    let index = table.index().await;
    let OrderReport {
        duplicates,
        violations,
    } = check_got(&got, &index);
    let picked: HashSet<&str> = got
        .iter()
        .filter(|g| pick(&index[&g.message_id].1))
        .map(|g| g.message_id.as_str())
        .collect();
    println!(
        "ledger: {} deliveries read, {} distinct {what}, {duplicates} duplicates, {} order violations",
        got.len(),
        picked.len(),
        violations.len()
    );
    Reached {
        deliveries: got.len(),
        picked: picked.len(),
        duplicates,
        violations,
    }
}

rabbit_scenario! { hot_aggregate_does_not_starve_others, "fair_hot", hot_aggregate }

/// 100 000 rows of one aggregate queued first: the 500 rows of 100 others are PROCESSED
/// within 5 s of ready while the hot one still drains, each aggregate in id order.
async fn hot_aggregate(table: &TestTable, broker: &TestBroker) {
    let t0 = Instant::now();
    let last_hot = table.insert_series("'hot'", 100_000).await;
    table.insert_series("'n-' || (g % 100)", 500).await;
    println!(
        "preloaded 100000 hot + 500 rows over 100 aggregates in {:?}",
        t0.elapsed()
    );
    let spawned = Instant::now();
    let relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    let ready_at = relay.ready().await;
    let deadline = ready_at + Duration::from_secs(60);
    let mut first = None; // when the first non-hot row was PROCESSED
    let (took, done, hot_still_pending) = loop {
        let (done, hot_pending) = table.progress_after(last_hot).await;
        first = first.or((done > 0).then(|| ready_at.elapsed()));
        if done >= 500 || Instant::now() > deadline {
            break (ready_at.elapsed(), done, hot_pending);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let hot_left = table.pending_upto(last_hot).await;
    println!(
        "ledger: ready {:?} after spawn; first non-hot PROCESSED {first:?} after ready; \
         {done}/500 non-hot PROCESSED {took:?} after ready ({:?} after spawn); \
         hot PENDING then: {hot_still_pending} ({hot_left} a moment later)",
        ready_at - spawned,
        took + (ready_at - spawned),
    );
    let r = reached(relay, table, broker, "non-hot", |agg| agg != "hot").await;
    assert_eq!(done, 500, "every non-hot row PROCESSED");
    assert!(
        took <= Duration::from_secs(5),
        "the 500 non-hot rows took {took:?} after ready (limit 5s)"
    );
    assert!(hot_still_pending, "hot aggregate still draining then");
    assert_eq!(r.picked, 500, "every non-hot row reached the queue");
    let bad = &r.violations;
    assert!(
        bad.is_empty(),
        "per-aggregate order: {:?}",
        &bad[..bad.len().min(5)]
    );
}

rabbit_scenario! { tenant_burst_does_not_starve_other_types, "fair_type", tenant_burst }

/// One tenant's burst: 100 000 rows of `aggregate_type` 'bulk' over 10 000 aggregates
/// queued first, then 500 rows of type 'orders' over 100 aggregates. The 500 are
/// PROCESSED within 5 s of ready while at least half the burst is still PENDING; then
/// the burst drains to the end, each aggregate in id order. (Without fairness between types they wait for the whole burst:
/// it is not one hot aggregate, so no aggregate's share ever caps it.)
async fn tenant_burst(table: &TestTable, broker: &TestBroker) {
    let series = |t: &str, n: i64, aggs: i64| {
        format!(
            "WITH ins AS (
               INSERT INTO \"{}\" (aggregate_type, aggregate_id, event_type, payload)
               SELECT '{t}', '{t}-' || (g % {aggs}), '{t}.created', jsonb_build_object('seq', g)
               FROM generate_series(1, {n}) g ORDER BY g RETURNING id)
             SELECT max(id) FROM ins",
            table.name
        )
    };
    let t0 = Instant::now();
    let last_bulk: i64 = sqlx::query_scalar(&series("bulk", 100_000, 10_000))
        .fetch_one(&table.pool)
        .await
        .unwrap();
    sqlx::query_scalar::<_, i64>(&series("orders", 500, 100))
        .fetch_one(&table.pool)
        .await
        .unwrap();
    println!(
        "preloaded 100000 bulk + 500 orders rows in {:?}",
        t0.elapsed()
    );
    let relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    let ready_at = relay.ready().await;
    let deadline = ready_at + Duration::from_secs(120);
    let (took, done) = loop {
        let (done, _) = table.progress_after(last_bulk).await;
        if done >= 500 || Instant::now() > deadline {
            break (ready_at.elapsed(), done);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let bulk_left = table.pending_upto(last_bulk).await;
    println!("ledger: {done}/500 orders rows PROCESSED {took:?} after ready; bulk PENDING then: {bulk_left}");
    // The rest drains too, in order (the type passed over, refilled, then alone).
    wait_for(Duration::from_secs(300), "every row PROCESSED", || async {
        (table.count_where("status <> 'PROCESSED'").await == 0).then_some(())
    })
    .await;
    let r = reached(relay, table, broker, "orders rows", |agg| {
        agg.starts_with("orders-")
    })
    .await;
    assert_eq!(done, 500, "every orders row PROCESSED");
    assert!(
        took <= Duration::from_secs(5),
        "the 500 orders rows took {took:?} after ready (limit 5s)"
    );
    assert!(
        bulk_left >= 50_000,
        "the burst was still draining: {bulk_left} of 100000 PENDING"
    );
    assert_eq!(r.picked, 500, "every orders row reached the queue");
    assert_eq!(
        r.deliveries - r.duplicates,
        100_500,
        "every row reached the queue"
    );
    let bad = &r.violations;
    assert!(
        bad.is_empty(),
        "per-aggregate order: {:?}",
        &bad[..bad.len().min(5)]
    );
}

rabbit_scenario! { huge_headers_row_fails_alone_without_pausing, "fair_hdr", huge_headers }

/// A row with 300 KB of headers (> frame_max) ends FAILED after 3 attempts with an error
/// naming the frame limit; the 300 rows around it are PROCESSED within 5 s; broker_up
/// never reads 0 meanwhile.
async fn huge_headers(table: &TestTable, broker: &TestBroker) {
    let mut relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    relay.ready().await;
    wait_for(Duration::from_secs(30), "broker_up = 1", || async {
        (relay.metric(BROKER_UP).await? == 1.0).then_some(())
    })
    .await;
    // 30 keys x 10 KB = 300 KB of headers: more than RabbitMQ's frame_max (128 KiB).
    let headers: serde_json::Map<String, serde_json::Value> = (0..30)
        .map(|k| {
            let v: String = (0..5120)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect();
            (format!("h{k:02}"), v.into())
        })
        .collect();
    table.insert_series("'before-' || g", 150).await;
    let big = table
        .insert("big", "order.created", None, headers.into())
        .await;
    table.insert_series("'after-' || g", 150).await;
    let inserted = Instant::now();
    let normal_sql = format!(
        "SELECT count(*) FROM \"{}\" WHERE id <> $1 AND status = 'PROCESSED'",
        table.name
    );
    let deadline = inserted + Duration::from_secs(60);
    let (mut normal_took, mut samples, mut zeros) = (None, 0, 0);
    let (normal, big_row) = loop {
        // From here on the relay must never report the broker down.
        if let Some(up) = relay.metric(BROKER_UP).await {
            samples += 1;
            zeros += usize::from(up == 0.0);
        }
        let normal: i64 = sqlx::query_scalar(&normal_sql)
            .bind(big)
            .fetch_one(&table.pool)
            .await
            .unwrap();
        if normal >= 300 && normal_took.is_none() {
            normal_took = Some(inserted.elapsed());
        }
        let big_row = table.row(big).await;
        // Watch broker_up for at least 2 s: a relay that drops the connection over the
        // big row would show 0 while it reconnects, also after the row's last attempt.
        let settled = inserted.elapsed() >= Duration::from_secs(2);
        if (normal >= 300 && big_row.0 == "FAILED" && settled) || Instant::now() > deadline {
            break (normal, big_row);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let (status, attempts, err) = big_row;
    let err = err.unwrap_or_default();
    println!(
        "ledger: {normal}/300 normal PROCESSED after {normal_took:?}; big row {status} after \
         {attempts} attempts, last_error ({} bytes): {:.300}; broker_up polled {samples} \
         times, {zeros} at 0",
        err.len(),
        err
    );
    relay.terminate().await;
    let got = broker.drain_all().await;
    let delivered: HashSet<&str> = got.iter().map(|g| g.message_id.as_str()).collect();
    let index = table.index().await;
    let OrderReport {
        duplicates: dups,
        violations: bad,
    } = check_got(&got, &index);
    let big_event = index.iter().find(|(_, v)| v.0 == big).unwrap().0;
    println!("ledger: {} deliveries, {dups} duplicates", got.len());
    assert_eq!(normal, 300, "every normal row PROCESSED");
    let took = normal_took.unwrap();
    assert!(
        took <= Duration::from_secs(5),
        "the 300 took {took:?} (limit 5s)"
    );
    assert_eq!(status, "FAILED", "the oversized row fails");
    assert_eq!(attempts, 3, "after relay.max_attempts = 3");
    assert!(
        err.to_lowercase().contains("frame"),
        "last_error names the frame limit: {err:.300}"
    );
    assert!(err.len() < 1024, "last_error is readable, not a dump");
    assert!(samples >= 10, "broker_up was actually polled ({samples})");
    assert_eq!(zeros, 0, "the relay never paused: broker_up stayed 1");
    let missing = index
        .iter()
        .filter(|(e, v)| v.0 != big && !delivered.contains(e.as_str()))
        .count();
    assert_eq!(missing, 0, "every normal row reached the queue");
    assert!(
        !delivered.contains(big_event.as_str()),
        "big row not delivered"
    );
    assert!(bad.is_empty(), "per-aggregate order: {bad:?}");
}

rabbit_scenario! { megabyte_payloads_stay_under_256mb_rss, "fair_mem", megabyte_payloads }

/// 400 rows of 1 MiB each are all relayed with the relay's peak RSS under 256 MiB.
async fn megabyte_payloads(table: &TestTable, broker: &TestBroker) {
    let t0 = Instant::now();
    for chunk in 0..8 {
        // 1 MiB of random hex (32768 md5 digests: pglz finds nothing to compress) per
        // chunk, rotated by a different offset for every row.
        sqlx::query(&format!(
            "WITH b AS (SELECT string_agg(md5(s::text || random()::text), '') AS blob
                        FROM generate_series(1, 32768) s)
             INSERT INTO \"{}\" (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', 'm-' || (g % 40), 'order.created', jsonb_build_object('seq', g,
                    'blob', substr(blob, k) || substr(blob, 1, k - 1))
             FROM b, generate_series({}, {}) g, LATERAL (SELECT 1 + g * 2609 % 1048576 AS k) r
             ORDER BY g",
            table.name,
            chunk * 50,
            chunk * 50 + 49
        ))
        .execute(&table.pool)
        .await
        .expect("insert megabyte rows");
    }
    println!("preloaded 400 x 1 MiB rows in {:?}", t0.elapsed());
    let consumer = tokio::spawn(consume_ids(
        broker.queue.clone(),
        400,
        Duration::from_secs(600),
    ));
    let mut relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    let pid = relay.pid();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    let (mut peak_rss, mut samples) = (0u64, 0usize);
    let processed = loop {
        let Some(rss) = proc_kb(pid, "VmRSS:") else {
            break table.count("PROCESSED").await; // the relay died
        };
        (peak_rss, samples) = (peak_rss.max(rss), samples + 1);
        let n = table.count("PROCESSED").await;
        if n >= 400 || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = started.elapsed();
    let hwm = proc_kb(pid, "VmHWM:");
    println!(
        "ledger: {processed}/400 PROCESSED in {took:?}; peak RSS: VmHWM {} MiB, max sampled \
         VmRSS {} MiB ({samples} samples)",
        hwm.map_or(-1, |kb| (kb / 1024) as i64),
        peak_rss / 1024
    );
    relay.terminate().await;
    if processed < 400 {
        consumer.abort();
    }
    assert_eq!(processed, 400, "every megabyte row PROCESSED (relay alive)");
    let hwm = hwm.expect("VmHWM read");
    assert!(
        hwm < 256 * 1024 && peak_rss < 256 * 1024,
        "peak RSS {} MiB (limit 256 MiB)",
        hwm.max(peak_rss) / 1024
    );
    let ids = consumer.await.unwrap();
    assert_eq!(ids.len(), 400, "every row reached the queue");
}

/// Three replicas, one type's burst preloaded (40 000 rows over 4 000 `bulk` aggregates)
/// and 8 producers writing type `order` while it drains: each replica probes behind the
/// burst in its own partitions and passes over it; every aggregate of both types keeps its
/// `id` order and nothing is lost. (Here, in the serial phase, not in `replicas.rs`:
/// three more relays beside that binary's own exhausted the server's 100 connections.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_pass_over_a_type_s_burst_in_order() {
    let (table, broker) = table_and_broker("rep3t").await;
    let mut env = relay_env(&table.name, &broker.exchange);
    env.push(("OUTBOX_RELAY__RELAY__LEASE_TIMEOUT".into(), "12s".into()));
    env.retain(|(k, _)| k != "RUST_LOG");
    env.push((
        "RUST_LOG".into(),
        "info,outbox_relay::relay::tenants=debug".into(),
    ));
    sqlx::raw_sql(&format!(
        "INSERT INTO \"{}\" (aggregate_type, aggregate_id, event_type, payload)
         SELECT 'bulk', 'bulk-' || (g % 4000), 'bulk.created', jsonb_build_object('seq', g)
         FROM generate_series(1, 40000) g ORDER BY g",
        table.name
    ))
    .execute(&table.pool)
    .await
    .unwrap();
    let relays: Vec<RelayProc> = (0..3).map(|_| RelayProc::start(&env)).collect();
    let consumer = tokio::spawn({
        let broker_queue = broker.queue.clone();
        async move {
            let b = TestBroker::attach(&broker_queue).await;
            b.take(50_000, Duration::from_secs(300)).await
        }
    });
    table.produce(10_000, 300, 8).await;
    let got = consumer.await.unwrap();
    table
        .wait_status("PROCESSED", 50_000, Duration::from_secs(180))
        .await;
    let unique: std::collections::HashSet<_> = got.iter().map(|g| g.message_id.clone()).collect();
    assert_eq!(unique.len(), 50_000, "nothing lost");
    let dups = assert_order(&got, &table.index().await);
    let passed_over: usize = relays
        .iter()
        .map(|r| r.logs().matches("passing over it").count())
        .sum();
    println!(
        "50 000 rows over 3 replicas in order, {dups} duplicates; the burst passed over {passed_over} times"
    );
    assert!(passed_over >= 1, "some replica passed over the burst");
    drop(relays);
    broker.cleanup_with(&table).await;
}
