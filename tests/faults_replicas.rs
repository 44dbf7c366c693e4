//! Replicas under faults, black-box through the binary: a replica stopped (SIGSTOP) past
//! its leases neither publishes concurrently with the one that took its partitions nor
//! breaks per-aggregate order when it resumes, and a SIGKILLed replica's aggregates are
//! served within `relay.lease_timeout` while the survivor drains a hot aggregate.
//! In the serial phase of `scripts/test.sh` (a `faults_` binary): its deadlines are
//! timing guarantees, so nothing else runs beside it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay_testkit::{db::*, order::*, rabbit::*, rabbit_scenario, relay_proc::*, wait::*};

const PUBLISHED: &str = "outbox_relay_published_total";
const HELD: &str = "outbox_relay_partitions_held";

rabbit_scenario! {
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
    a.signal("STOP");
    let at_stop = table.total().await;
    // The scenario itself: A is frozen for 2 x lease_timeout, its leases lapse meanwhile.
    tokio::time::sleep(Duration::from_secs(8)).await;
    a.signal("CONT");
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
    a.terminate().await;
    b.terminate().await;
    let got = broker.drain_all().await;
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

rabbit_scenario! {
    sigkilled_replica_is_served_within_lease_timeout_while_survivor_drains_hot_aggregate,
    "fair_kill", killed_replica
}

/// Replica B SIGKILLed while the survivor drains a hot aggregate: rows of 200 fresh
/// aggregates are PROCESSED within lease_timeout + 1 s of the kill, hot still draining.
async fn killed_replica(table: &TestTable, broker: &TestBroker) {
    // The hot backlog is there before the replicas start: they must share the partitions
    // although the first one up is already busy with it.
    let last_hot = table.insert_series("'hot'", 50_000).await;
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
        table.pending_upto(last_hot).await > 0,
        "hot aggregate still draining before the kill"
    );
    victim.signal("KILL");
    let killed_at = Instant::now();
    table.insert_series("'k-' || g", 200).await;
    let deadline = killed_at + Duration::from_secs(60);
    let (took, done, hot_still_pending) = loop {
        let (done, hot_pending) = table.progress_after(last_hot).await;
        if done >= 200 || Instant::now() > deadline {
            break (killed_at.elapsed(), done, hot_pending);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = victim.child.wait().await;
    let hot_left = table.pending_upto(last_hot).await;
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
