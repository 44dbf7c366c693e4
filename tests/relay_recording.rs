//! The relay loop in-process against the real Postgres, with a recording sink that can
//! reject or be "down" on cue: never two unconfirmed rows of one aggregate and
//! per-aggregate id order, a rejection holds back its aggregate only, an outage spends no
//! attempts, shutdown answers or hands back what is out and gives the leases back.
//! (Windows, out-of-order confirms and deadlines: `engine_recording.rs`; rebalancing:
//! `engine_rebalance.rs`.)

use std::time::Duration;

use outbox_relay_testkit::{recording::*, wait::*};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_row_per_aggregate_unconfirmed_and_id_order() {
    with_table("rwave", |table| async move {
        for i in 0..30 {
            table
                .insert(&format!("a{}", i % 3), "e", None, serde_json::json!({}))
                .await;
        }
        let sink = RecordingSink::new(|_, _| Step::Confirm);
        let (relay, ledger) = start_recorded(&table, sink, cfg());
        table
            .wait_status("PROCESSED", 30, Duration::from_secs(20))
            .await;
        relay.stop(Duration::from_secs(5)).await;
        let rows = rows(&table).await;
        assert_clean(&ledger, cfg().max_in_flight as usize, &rows);
        for agg in ["a0", "a1", "a2"] {
            let seq: Vec<i64> = ledger
                .sends()
                .iter()
                .filter(|s| s.aggregate == agg)
                .map(|s| s.id)
                .collect();
            assert!(
                seq.windows(2).all(|w| w[0] < w[1]),
                "{agg} sent once each, in id order: {seq:?}"
            );
        }
        let mut confirmed = ledger.confirmed();
        confirmed.sort_unstable();
        let all: Vec<i64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(confirmed, all, "every row confirmed exactly once");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_holds_back_its_aggregate_only_until_failed() {
    with_table("rrej", |table| async move {
        let a1 = table.insert("a", "ok", None, serde_json::json!({})).await;
        let a2 = table
            .insert("a", "poison", None, serde_json::json!({}))
            .await;
        let a3 = table.insert("a", "ok", None, serde_json::json!({})).await;
        let b1 = table.insert("b", "ok", None, serde_json::json!({})).await;
        let c1 = table
            .insert("c", "refused", None, serde_json::json!({}))
            .await;
        let c2 = table.insert("c", "ok", None, serde_json::json!({})).await;
        let b2 = table.insert("b", "ok", None, serde_json::json!({})).await;
        // a2: the broker nacks it (confirm); c1: the sink refuses it before sending.
        let sink = RecordingSink::new(|m, _| match m.event_type.as_str() {
            "poison" => Step::Reject("poisoned".into()),
            "refused" => Step::Refuse("too large".into()),
            _ => Step::Confirm,
        });
        let (relay, ledger) = start_recorded(&table, sink, cfg());
        table
            .wait_statuses(&[("FAILED", 2), ("PROCESSED", 3)], Duration::from_secs(20))
            .await;
        // A row written after the failures is relayed: claims went on past them.
        let d1 = table.insert("d", "ok", None, serde_json::json!({})).await;
        wait_for(
            Duration::from_secs(10),
            "the later row d1 PROCESSED",
            || {
                let t = table.clone();
                async move { (status(&t, d1).await == "PROCESSED").then_some(()) }
            },
        )
        .await;
        relay.stop(Duration::from_secs(5)).await;
        assert_eq!(status(&table, a1).await, "PROCESSED");
        assert_eq!(
            table.row(a2).await,
            ("FAILED".into(), 3, Some("poisoned".into()))
        );
        assert_eq!(ledger.send_count(a2), 3, "one send per attempt");
        assert_eq!(
            table.row(c1).await,
            ("FAILED".into(), 3, Some("too large".into()))
        );
        for held_back in [a3, c2] {
            assert_eq!(
                table.row(held_back).await,
                ("PENDING".into(), 0, None),
                "row {held_back} held back behind the FAILED row"
            );
            assert_eq!(
                ledger.send_count(held_back),
                0,
                "row {held_back} never sent"
            );
        }
        assert_eq!(status(&table, b1).await, "PROCESSED");
        assert_eq!(status(&table, b2).await, "PROCESSED");
        assert_clean(&ledger, cfg().max_in_flight as usize, &rows(&table).await);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_spends_no_attempts() {
    with_table("rdown", |table| async move {
        for i in 0..50 {
            table
                .insert(&format!("k{}", i % 5), "e", None, serde_json::json!({}))
                .await;
        }
        // The first 6 send calls find the broker down (k0 goes through: one message
        // confirmed between failures); the first send of each row among calls 6..12 is
        // handed over and then the connection breaks before its confirm.
        let sink = RecordingSink::new(|m, info| {
            if info.calls < 6 && m.aggregate_id != "k0" {
                Step::Down("connection refused".into())
            } else if info.calls < 12 && info.nth == 0 {
                Step::Broken("connection reset".into())
            } else {
                Step::Confirm
            }
        });
        let (relay, ledger) = start_recorded(&table, sink, cfg());
        table
            .wait_status("PROCESSED", 50, Duration::from_secs(30))
            .await;
        relay.stop(Duration::from_secs(5)).await;
        table.assert_no_attempts("no attempts spent").await;
        let sends = ledger.sends();
        let down = sends
            .iter()
            .filter(|s| matches!(s.step, Step::Down(_)))
            .count();
        let broken = sends
            .iter()
            .filter(|s| matches!(s.step, Step::Broken(_)))
            .count();
        println!("{} sends: {down} while down, {broken} broken", sends.len());
        assert!(down >= 1 && broken >= 1, "the outage was exercised");
        assert!(
            sends.iter().all(|s| s.attempts == 0),
            "every send went out with attempts = 0"
        );
        assert_clean(&ledger, cfg().max_in_flight as usize, &rows(&table).await);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_what_is_out_and_hands_leases_back() {
    with_table("rstop", |table| async move {
        let x = table.insert("x", "e", None, serde_json::json!({})).await;
        let y = table.insert("y", "e", None, serde_json::json!({})).await;
        let sink = RecordingSink::new(|_, _| Step::Hold);
        let (relay, ledger) = start_recorded(&table, sink, cfg());
        wait_all_leases(&table, &relay.instance, Duration::from_secs(10)).await;
        wait_for(Duration::from_secs(10), "x and y out, held", || {
            let n = ledger.held().len();
            async move { (n == 2).then_some(()) }
        })
        .await;
        // Stop with both out; x is answered during shutdown, y never is.
        relay.cancel.cancel();
        assert!(ledger.release(x, Ok(())), "x still awaited at shutdown");
        tokio::time::timeout(Duration::from_secs(5), relay.handle)
            .await
            .expect("stops within shutdown_timeout")
            .unwrap();
        assert_eq!(owned_count(&table).await, 0, "leases handed back");
        assert_eq!(status(&table, x).await, "PROCESSED", "answered in time");
        assert_eq!(
            table.row(y).await,
            ("PENDING".into(), 0, None),
            "unanswered: handed back, no attempt"
        );
        assert!(!ledger.closes("sink").is_empty(), "the sink was closed");
        assert!(ledger.outstanding("sink").is_empty(), "nothing left out");
    })
    .await;
}

/// A sweep that passes over a row waiting for its retry must not take a later row of that
/// aggregate once the retry falls due mid-sweep: the retry goes first, then the rest in
/// id order. (Rows a1, a2; a1 is rejected once and waits 2 s; then 100 rows of other
/// aggregates and a3 are written. The sweep passes a1, fills the window with held rows,
/// and is let go on only after a1 is due.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_falling_due_mid_sweep_still_goes_first() {
    with_table("rretry", |table| async move {
        let a1 = table.insert("a", "e", None, serde_json::json!({})).await;
        let a2 = table.insert("a", "e", None, serde_json::json!({})).await;
        let sink = RecordingSink::new(move |m, info| {
            if m.id == a1 && info.nth == 0 {
                Step::Reject("nacked once".into())
            } else if m.aggregate_id.starts_with('f') {
                Step::Hold
            } else {
                Step::Confirm
            }
        });
        let mut c = cfg();
        c.backoff_initial = Duration::from_secs(2);
        c.backoff_max = Duration::from_secs(2);
        // A window of 32 rows: the sweep stops among the f rows, short of a3.
        c.batch_size = 16;
        let (relay, ledger) = start_recorded(&table, sink, c);
        wait_for(Duration::from_secs(10), "a1's rejection recorded", || {
            let t = table.clone();
            async move { (t.row(a1).await.1 == 1).then_some(()) }
        })
        .await;
        for i in 0..100 {
            table
                .insert(&format!("f{i}"), "e", None, serde_json::json!({}))
                .await;
        }
        let a3 = table.insert("a", "e", None, serde_json::json!({})).await;
        // The window fills up with held rows of the f aggregates, past a1 and a2.
        wait_held(&ledger, cfg().max_in_flight as usize).await;
        let due_sql = format!(
            "SELECT next_attempt_at <= now() FROM \"{}\" WHERE id = $1",
            table.name
        );
        wait_for(Duration::from_secs(10), "a1 due again", || {
            let (t, sql) = (table.clone(), due_sql.clone());
            async move {
                let due: Option<bool> = sqlx::query_scalar(&sql)
                    .bind(a1)
                    .fetch_one(&t.pool)
                    .await
                    .expect("a1's schedule");
                due.unwrap_or(true).then_some(())
            }
        })
        .await;
        // Let the f rows through as they are sent; the sweep reaches a3.
        wait_for(Duration::from_secs(20), "every row PROCESSED", || {
            for (id, _, _) in ledger.held() {
                ledger.release(id, Ok(()));
            }
            let t = table.clone();
            async move { (t.count("PROCESSED").await == 103).then_some(()) }
        })
        .await;
        relay.stop(Duration::from_secs(5)).await;
        let a_sends: Vec<i64> = ledger
            .sends()
            .iter()
            .filter(|s| s.aggregate == "a")
            .map(|s| s.id)
            .collect();
        assert_eq!(a_sends, vec![a1, a1, a2, a3], "a's sends in order");
        assert_clean(&ledger, cfg().max_in_flight as usize, &rows(&table).await);
    })
    .await;
}

/// Wait until `want` confirms are held by the test.
async fn wait_held(ledger: &Ledger, want: usize) {
    wait_for(
        Duration::from_secs(10),
        &format!("{want} confirms held"),
        || {
            let n = ledger.held().len();
            async move { (n >= want).then_some(()) }
        },
    )
    .await;
}
