//! Wake-ups end to end (schema 6): an idle relay holds the doorbell, so a producer's
//! commit notifies and the row goes out long before the poll tick (set to a minute here);
//! a second instance takes the bell over when the holder dies (its locks go with its
//! session), and is woken the same way.

use std::time::{Duration, Instant};

use outbox_relay_testkit::{db::*, rabbit::*, relay_proc::*};

/// The backend pid holding the table's doorbell (slot 16 of its advisory locks), waiting
/// up to `within` for one that is not `not`.
async fn bell_holder(table: &TestTable, not: Option<i32>, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND granted
               AND classid = to_regclass($1)::oid AND objid = 16",
        )
        .bind(format!("\"{}\"", table.name))
        .fetch_optional(&table.pool)
        .await
        .unwrap();
        if let Some(pid) = pid.filter(|p| Some(*p) != not) {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no relay took the doorbell within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_relay_is_woken_by_the_commit_and_a_survivor_takes_the_bell_over() {
    let (table, broker) = table_and_broker("wake_ups").await;
    guarded(&table, &broker, async {
        let env = fault_env(
            &table.name,
            &broker.exchange,
            &[("OUTBOX_RELAY__RELAY__POLL_INTERVAL", "60s")],
        );
        let first = RelayProc::start(&env);
        first.ready().await;
        let holder = bell_holder(&table, None, Duration::from_secs(20)).await;
        table.insert("w-1", "order.created", None, serde_json::json!({})).await;
        // The poll tick is a minute away: only the notification can bring the row now.
        table
            .wait_status("PROCESSED", 1, Duration::from_secs(10))
            .await;

        let second = RelayProc::start(&env);
        second.ready().await;
        first.signal("KILL");
        bell_holder(&table, Some(holder), Duration::from_secs(20)).await;
        // The survivor serves every partition once the dead one's leases lapse (4 s).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let owners: Vec<(Option<String>, i64)> = sqlx::query_as(&format!(
                "SELECT owner, count(*) FROM \"{}_relay_leases\" WHERE lease_until > now() GROUP BY owner",
                table.name
            ))
            .fetch_all(&table.pool)
            .await
            .unwrap();
            if owners.len() == 1 && owners[0].1 == i64::from(outbox_relay::store::PARTITIONS) {
                break;
            }
            assert!(Instant::now() < deadline, "the survivor did not take every partition");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Its takeover claims are done; let it settle into listening again.
        bell_holder(&table, Some(holder), Duration::from_secs(20)).await;
        for i in 2..=4 {
            table.insert(&format!("w-{i}"), "order.created", None, serde_json::json!({})).await;
            table
                .wait_status("PROCESSED", i64::from(i), Duration::from_secs(10))
                .await;
        }
        assert_eq!(broker.take(4, Duration::from_secs(10)).await.len(), 4);
        drop(second);
    })
    .await;
}
