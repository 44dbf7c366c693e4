//! Several relay instances on one table (SPEC §3.2, §3.5): work is shared through
//! partition leases in Postgres, every aggregate keeps its `id` order, and a SIGKILLed
//! instance's partitions are taken over within `relay.lease_timeout`.

use std::time::{Duration, Instant};

use outbox_relay_testkit::{db::*, order::*, rabbit::*, relay_proc::*, wait::*};

/// Owners of live leases → number of partitions each holds.
async fn lease_owners(table: &TestTable) -> Vec<(String, i64)> {
    sqlx::query_as(&format!(
        "SELECT owner, count(*) FROM \"{}_relay_leases\" WHERE owner IS NOT NULL AND lease_until > now() GROUP BY owner ORDER BY owner",
        table.name
    ))
    .fetch_all(&table.pool)
    .await
    .unwrap()
}

async fn wait_balanced(table: &TestTable, replicas: usize) {
    wait_for(
        Duration::from_secs(60),
        "partitions spread over the replicas",
        || async {
            let owners = lease_owners(table).await;
            let total: i64 = owners.iter().map(|o| o.1).sum();
            (owners.len() == replicas
                && total == 256
                && owners.iter().all(|o| o.1 >= 256 / replicas as i64 - 1))
            .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_thirty_thousand_rows_in_order() {
    let (table, broker) = table_and_broker("rep3").await;
    let mut env = relay_env(&table.name, &broker.exchange);
    // Roomier leases than the takeover test: on a loaded 2-core CI box a 4s lease can
    // lapse under load and move partitions around mid-run, which is correct but makes
    // the shares noisy.
    env.push(("OUTBOX_RELAY__RELAY__LEASE_TIMEOUT".into(), "12s".into()));
    let relays: Vec<RelayProc> = (0..3).map(|_| RelayProc::start(&env)).collect();
    wait_balanced(&table, 3).await;
    let consumer = tokio::spawn({
        let broker_queue = broker.queue.clone();
        async move {
            let b = TestBroker::attach(&broker_queue).await;
            b.take(30_000, Duration::from_secs(240)).await
        }
    });
    table.produce(30_000, 300, 8).await;
    let got = consumer.await.unwrap();
    table
        .wait_status("PROCESSED", 30_000, Duration::from_secs(180))
        .await;
    let unique: std::collections::HashSet<_> = got.iter().map(|g| g.message_id.clone()).collect();
    assert_eq!(unique.len(), 30_000, "nothing lost");
    let dups = assert_order(&got, &table.index().await);
    let mut shares = Vec::new();
    for r in &relays {
        shares.push(
            r.metric("outbox_relay_published_total")
                .await
                .unwrap_or(0.0),
        );
    }
    println!("published per replica: {shares:?}, duplicates {dups}");
    let total: f64 = shares.iter().sum();
    assert!(
        total >= 30_000.0,
        "replicas account for every row: {shares:?}"
    );
    for s in &shares {
        assert!(
            *s >= 0.15 * 30_000.0,
            "every replica did a real share: {shares:?}"
        );
    }
    drop(relays);
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_replica_is_taken_over_within_lease_timeout() {
    let (table, broker) = table_and_broker("repkill").await;
    let env = relay_env(&table.name, &broker.exchange); // lease_timeout = 4s
    let mut relays: Vec<RelayProc> = (0..3).map(|_| RelayProc::start(&env)).collect();
    wait_balanced(&table, 3).await;
    table.produce(6_000, 300, 8).await;
    table
        .wait_processed_over(500, Duration::from_secs(90))
        .await;
    let victim = relays.remove(0);
    let pid = victim.pid();
    victim.signal("KILL");
    let killed_at = Instant::now();
    let mut victim = victim;
    let _ = victim.child.wait().await;
    // Takeover: every partition is held by a survivor again.
    wait_for(
        Duration::from_secs(10),
        "survivors hold all partitions",
        || async {
            let owners = lease_owners(&table).await;
            let total: i64 = owners.iter().map(|o| o.1).sum();
            let victim_holds = owners.iter().any(|(o, _)| o.contains(&format!("-{pid}-")));
            (!victim_holds && total == 256 && owners.len() == 2).then_some(())
        },
    )
    .await;
    let takeover = killed_at.elapsed();
    println!("takeover after SIGKILL: {takeover:?}");
    assert!(
        takeover <= Duration::from_secs(4),
        "takeover within lease_timeout (4s): {takeover:?}"
    );
    table
        .wait_status("PROCESSED", 6_000, Duration::from_secs(180))
        .await;
    let n = broker.depth().await as usize;
    let got = broker.take(n, Duration::from_secs(90)).await;
    let unique: std::collections::HashSet<_> = got.iter().map(|g| g.message_id.clone()).collect();
    assert_eq!(unique.len(), 6_000, "nothing lost");
    let dups = assert_order(&got, &table.index().await);
    println!("duplicates after SIGKILL: {dups}");
    drop(relays);
    broker.cleanup_with(&table).await;
}
