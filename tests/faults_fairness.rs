//! Engine fairness and bounds, black-box through the binary: a hot aggregate never starves
//! the others, an oversized row fails alone without pausing the relay, megabyte payloads
//! stay under a memory bound, and a stopped or killed replica neither breaks per-aggregate
//! order nor leaves its aggregates unserved for longer than `relay.lease_timeout`.
//! In the serial phase of `scripts/test.sh` (a `faults_` binary): it loads the machine
//! heavily and its deadlines are timing guarantees, so nothing else runs beside it.

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use outbox_relay_testkit::{db::*, order::*, rabbit::*, relay_proc::*, unique, wait::*};

const PUBLISHED: &str = "outbox_relay_published_total";
const HELD: &str = "outbox_relay_partitions_held";
const BROKER_UP: &str = "outbox_relay_broker_up";

/// Run `scenario`; drop the broker's queue/exchange and the table even if it panicked.
async fn guarded(table: &TestTable, broker: &TestBroker, scenario: impl Future<Output = ()>) {
    let outcome = AssertUnwindSafe(scenario).catch_unwind().await;
    broker.cleanup().await;
    table.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// One test per scenario: its own table, exchange and queue, dropped even on failure.
macro_rules! scenario {
    ($test:ident, $prefix:literal, $body:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $test() {
            let table = TestTable::new($prefix).await;
            let broker = TestBroker::new($prefix).await;
            guarded(&table, &broker, $body(&table, &broker)).await;
        }
    };
}

/// Insert `n` rows server-side, aggregate id given by the SQL expression `agg` over
/// `g` = 1..=n, in `g` order; returns the highest id inserted.
async fn insert_series(table: &TestTable, agg: &str, n: i64) -> i64 {
    let max: Option<i64> = sqlx::query_scalar(&format!(
        "WITH ins AS (
           INSERT INTO \"{}\" (aggregate_type, aggregate_id, event_type, payload)
           SELECT 'order', {agg}, 'order.created', jsonb_build_object('seq', g)
           FROM generate_series(1, {n}) g ORDER BY g RETURNING id)
         SELECT max(id) FROM ins",
        table.name
    ))
    .fetch_one(&table.pool)
    .await
    .expect("insert series");
    max.expect("rows inserted")
}

/// (PROCESSED rows with id > `after`, whether any row with id <= `after` is PENDING).
async fn progress(table: &TestTable, after: i64) -> (i64, bool) {
    sqlx::query_as(&format!(
        "SELECT (SELECT count(*) FROM \"{t}\" WHERE id > $1 AND status = 'PROCESSED'),
                EXISTS (SELECT 1 FROM \"{t}\" WHERE id <= $1 AND status = 'PENDING')",
        t = table.name
    ))
    .bind(after)
    .fetch_one(&table.pool)
    .await
    .expect("progress")
}

async fn pending_upto(table: &TestTable, upto: i64) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\" WHERE id <= $1 AND status = 'PENDING'",
        table.name
    ))
    .bind(upto)
    .fetch_one(&table.pool)
    .await
    .expect("pending")
}

/// When `/readyz` first answered 200.
async fn ready(relay: &RelayProc) -> Instant {
    wait_for(Duration::from_secs(30), "relay /readyz 200", || async {
        (relay.get("/readyz").await?.0 == 200).then(Instant::now)
    })
    .await
}

fn send(relay: &RelayProc, sig: libc::c_int) {
    let rc = unsafe { libc::kill(relay.pid() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", relay.pid());
}

/// SIGTERM, wait for the exit (SIGKILL if it takes longer than 15 s).
async fn stop(relay: &mut RelayProc) {
    send(relay, libc::SIGTERM);
    if tokio::time::timeout(Duration::from_secs(15), relay.child.wait())
        .await
        .is_err()
    {
        let _ = relay.child.kill().await;
    }
}

/// Everything in the queue (call with no relay running).
async fn drain(broker: &TestBroker) -> Vec<Got> {
    let n = broker.depth().await as usize;
    broker.take(n, Duration::from_secs(180)).await
}

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

scenario! { hot_aggregate_does_not_starve_others, "fair_hot", hot_aggregate }

/// 100 000 rows of one aggregate queued first: the 500 rows of 100 others are PROCESSED
/// within 5 s of ready while the hot one still drains, each aggregate in id order.
async fn hot_aggregate(table: &TestTable, broker: &TestBroker) {
    let t0 = Instant::now();
    let last_hot = insert_series(table, "'hot'", 100_000).await;
    insert_series(table, "'n-' || (g % 100)", 500).await;
    println!(
        "preloaded 100000 hot + 500 rows over 100 aggregates in {:?}",
        t0.elapsed()
    );
    let spawned = Instant::now();
    let mut relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    let ready_at = ready(&relay).await;
    let deadline = ready_at + Duration::from_secs(60);
    let mut first = None; // when the first non-hot row was PROCESSED
    let (took, done, hot_still_pending) = loop {
        let (done, hot_pending) = progress(table, last_hot).await;
        first = first.or((done > 0).then(|| ready_at.elapsed()));
        if done >= 500 || Instant::now() > deadline {
            break (ready_at.elapsed(), done, hot_pending);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let hot_left = pending_upto(table, last_hot).await;
    println!(
        "ledger: ready {:?} after spawn; first non-hot PROCESSED {first:?} after ready; \
         {done}/500 non-hot PROCESSED {took:?} after ready ({:?} after spawn); \
         hot PENDING then: {hot_still_pending} ({hot_left} a moment later)",
        ready_at - spawned,
        took + (ready_at - spawned),
    );
    stop(&mut relay).await;
    let got = drain(broker).await;
    let index = table.index().await;
    let OrderReport {
        duplicates: dups,
        violations: bad,
    } = check_got(&got, &index);
    let non_hot: HashSet<&str> = got
        .iter()
        .filter(|g| index[&g.message_id].1 != "hot")
        .map(|g| g.message_id.as_str())
        .collect();
    println!(
        "ledger: {} deliveries read, {} distinct non-hot, {dups} duplicates, {} order violations",
        got.len(),
        non_hot.len(),
        bad.len()
    );
    assert_eq!(done, 500, "every non-hot row PROCESSED");
    assert!(
        took <= Duration::from_secs(5),
        "the 500 non-hot rows took {took:?} after ready (limit 5s)"
    );
    assert!(hot_still_pending, "hot aggregate still draining then");
    assert_eq!(non_hot.len(), 500, "every non-hot row reached the queue");
    assert!(
        bad.is_empty(),
        "per-aggregate order: {:?}",
        &bad[..bad.len().min(5)]
    );
}

scenario! { huge_headers_row_fails_alone_without_pausing, "fair_hdr", huge_headers }

/// A row with 300 KB of headers (> frame_max) ends FAILED after 3 attempts with an error
/// naming the frame limit; the 300 rows around it are PROCESSED within 5 s; broker_up
/// never reads 0 meanwhile.
async fn huge_headers(table: &TestTable, broker: &TestBroker) {
    let mut relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    ready(&relay).await;
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
    insert_series(table, "'before-' || g", 150).await;
    let big = table
        .insert("big", "order.created", None, headers.into())
        .await;
    insert_series(table, "'after-' || g", 150).await;
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
    stop(&mut relay).await;
    let got = drain(broker).await;
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

scenario! { megabyte_payloads_stay_under_256mb_rss, "fair_mem", megabyte_payloads }

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
    stop(&mut relay).await;
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

scenario! {
    stopped_replica_resumes_without_concurrent_or_out_of_order_publishes,
    "fair_stop", stopped_replica
}

async fn both_hold_partitions(a: &RelayProc, b: &RelayProc) {
    wait_for(
        Duration::from_secs(60),
        "both replicas hold partitions",
        || async { (a.metric(HELD).await? > 0.0 && b.metric(HELD).await? > 0.0).then_some(()) },
    )
    .await;
}

/// Replica A frozen (SIGSTOP) for 2 x lease_timeout under a running producer, then
/// resumed: every row delivered, no first delivery out of its aggregate's id order.
async fn stopped_replica(table: &TestTable, broker: &TestBroker) {
    let env = relay_env(&table.name, &broker.exchange); // lease_timeout = 4s
    let mut a = RelayProc::start(&env);
    let mut b = RelayProc::start(&env);
    both_hold_partitions(&a, &b).await;
    let producing = Arc::new(AtomicBool::new(true));
    let producer = tokio::spawn({
        let t = TestTable {
            name: table.name.clone(),
            pool: table.pool.clone(),
        };
        let producing = producing.clone();
        async move {
            while producing.load(Ordering::Relaxed) {
                t.produce(250, 50, 5).await;
            }
        }
    });
    // Both replicas busy before A freezes, so A is stopped with work in hand.
    wait_for(
        Duration::from_secs(60),
        "both replicas published 100 rows",
        || async {
            (a.metric(PUBLISHED).await? >= 100.0 && b.metric(PUBLISHED).await? >= 100.0)
                .then_some(())
        },
    )
    .await;
    let a_before = a.metric(PUBLISHED).await.unwrap_or(0.0);
    send(&a, libc::SIGSTOP);
    let at_stop = table.total().await;
    // The scenario itself: A is frozen for 2 x lease_timeout, its leases lapse meanwhile.
    tokio::time::sleep(Duration::from_secs(8)).await;
    send(&a, libc::SIGCONT);
    let at_cont = table.total().await;
    wait_for(
        Duration::from_secs(120),
        "1500 more rows produced after SIGCONT",
        || async { (table.total().await >= at_cont + 1500).then_some(()) },
    )
    .await;
    producing.store(false, Ordering::Relaxed);
    producer.await.unwrap();
    let total = table.total().await;
    table
        .wait_status("PROCESSED", total, Duration::from_secs(180))
        .await;
    let a_after = a.metric(PUBLISHED).await.unwrap_or(0.0);
    let b_after = b.metric(PUBLISHED).await.unwrap_or(0.0);
    stop(&mut a).await;
    stop(&mut b).await;
    let got = drain(broker).await;
    let index = table.index().await;
    let delivered: HashSet<&str> = got.iter().map(|g| g.message_id.as_str()).collect();
    let OrderReport {
        duplicates: dups,
        violations: bad,
    } = check_got(&got, &index);
    println!(
        "ledger: {total} rows ({at_stop} at SIGSTOP, {at_cont} at SIGCONT); {} deliveries, \
         {} distinct, {dups} duplicates, {} order violations; A published {a_before} before \
         the stop, {a_after} at the end; B {b_after}",
        got.len(),
        delivered.len(),
        bad.len()
    );
    assert_eq!(delivered.len() as i64, total, "every row delivered");
    assert!(
        bad.is_empty(),
        "no first delivery out of order: {:?}",
        &bad[..bad.len().min(10)]
    );
}

scenario! {
    sigkilled_replica_is_served_within_lease_timeout_while_survivor_drains_hot_aggregate,
    "fair_kill", killed_replica
}

/// Replica B SIGKILLed while the survivor drains a hot aggregate: rows of 200 fresh
/// aggregates are PROCESSED within lease_timeout + 1 s of the kill, hot still draining.
async fn killed_replica(table: &TestTable, broker: &TestBroker) {
    // The hot backlog is there before the replicas start: they must share the partitions
    // although the first one up is already busy with it.
    let last_hot = insert_series(table, "'hot'", 50_000).await;
    let env = relay_env(&table.name, &broker.exchange); // lease_timeout = 4s
    let a = RelayProc::start(&env);
    let b = RelayProc::start(&env);
    both_hold_partitions(&a, &b).await;
    wait_for(
        Duration::from_secs(30),
        "hot aggregate draining",
        || async { (table.count("PROCESSED").await > 0).then_some(()) },
    )
    .await;
    let leases = format!("\"{}_relay_leases\"", table.name);
    // The hot aggregate's partition holder is the survivor; the other one is killed.
    let hot_owner: String = wait_for(
        Duration::from_secs(30),
        "the hot aggregate's partition leased",
        || async {
            sqlx::query_scalar(&format!(
                "SELECT owner FROM {leases} WHERE lease_until > now() AND owner IS NOT NULL
                   AND partition = hashtext('order/hot') & 255"
            ))
            .fetch_optional(&table.pool)
            .await
            .unwrap()
        },
    )
    .await;
    let (survivor, mut victim) = if hot_owner.contains(&format!("-{}-", a.pid())) {
        (a, b)
    } else {
        (b, a)
    };
    let victim_parts: Vec<i32> = sqlx::query_scalar(&format!(
        "SELECT partition FROM {leases} WHERE lease_until > now() AND owner LIKE $1"
    ))
    .bind(format!("%-{}-%", victim.pid()))
    .fetch_all(&table.pool)
    .await
    .unwrap();
    assert!(!victim_parts.is_empty(), "the victim holds partitions");
    assert!(
        pending_upto(table, last_hot).await > 0,
        "hot aggregate still draining before the kill"
    );
    send(&victim, libc::SIGKILL);
    let killed_at = Instant::now();
    insert_series(table, "'k-' || g", 200).await;
    let deadline = killed_at + Duration::from_secs(60);
    let (took, done, hot_still_pending) = loop {
        let (done, hot_pending) = progress(table, last_hot).await;
        if done >= 200 || Instant::now() > deadline {
            break (killed_at.elapsed(), done, hot_pending);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = victim.child.wait().await;
    let hot_left = pending_upto(table, last_hot).await;
    let on_victim: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM generate_series(1, 200) g
         WHERE (hashtext('order/k-' || g) & 255) = ANY($1)",
    )
    .bind(&victim_parts)
    .fetch_one(&table.pool)
    .await
    .unwrap();
    println!(
        "ledger: victim held {} partitions ({on_victim} of the 200 new aggregates hash there); \
         {done}/200 PROCESSED {took:?} after SIGKILL; hot PENDING then: {hot_still_pending} \
         ({hot_left} a moment later); survivor published {:?}",
        victim_parts.len(),
        survivor.metric(PUBLISHED).await
    );
    drop(survivor);
    assert_eq!(done, 200, "every new row PROCESSED");
    assert!(
        took <= Duration::from_secs(5),
        "new rows served {took:?} after the kill (limit lease_timeout 4s + 1s)"
    );
    assert!(
        hot_still_pending,
        "survivor still draining the hot aggregate"
    );
}
