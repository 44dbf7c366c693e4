//! The relay itself killed: 20 consecutive runs over one table, each SIGKILLed at a random
//! point 100–800 ms after it started (during start-up, claim, publish, confirm or mark),
//! while producers keep committing; then one run drains everything. 0 lost, order of
//! first deliveries kept per aggregate, the duplicates a crash makes unavoidable counted.
//! In the serial phase: its many relay processes would only slow the parallel suites.

use std::time::{Duration, Instant};

use outbox_relay_testkit::{db::*, faults::*, rabbit::*, relay_proc::*};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_sigkills_at_random_points_lose_nothing() {
    let table = TestTable::new("fkill20").await;
    let broker = TestBroker::new("fkill20").await;
    // Short leases so each new run takes the killed one's partitions over quickly.
    let env = fault_env(
        &table.name,
        &broker.exchange,
        &[
            ("OUTBOX_RELAY__RELAY__LEASE_TIMEOUT", "1s"),
            // A send must fit inside the lease that fences it (config validation).
            ("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT", "800ms"),
            ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "200"),
        ],
    );
    table.produce(2_000, 50, 4).await;
    let producer = Producer::start(&table.pool, &table.name, 50, 4, Duration::from_millis(2));
    let t0 = Instant::now();
    let progress = kill_repeatedly(&env, &table, 20, 100..=800).await;
    println!(
        "20 runs in {:?}: (lifetime ms, processed after) {progress:?}",
        t0.elapsed()
    );

    let relay = RelayProc::start(&env);
    let attack = "relay SIGKILL x20 at random points";
    let quiet = Duration::from_secs(2);
    let Outcome { tally, commits, .. } =
        conclude(attack, relay, producer, table, broker, quiet).await;
    println!(
        "duplicates caused by 20 SIGKILLs: {} (producers committed {commits} + 2000 up front)",
        tally.duplicates
    );
}
