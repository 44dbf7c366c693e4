//! Deterministic engine tests in-process against the real Postgres: the test holds
//! confirms and answers them in the order it likes (`testkit::recording`), then checks the
//! window bounds, per-aggregate order, how rejections and deadlines are recorded, and that
//! leases that lapse stop the sending. (Rebalancing while messages are out:
//! `engine_rebalance.rs`.)

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use outbox_relay_testkit::{db::insert_row, recording::*, wait::*};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Aggregates with a row the engine has not yet seen confirmed.
fn unconfirmed_aggs(ledger: &Ledger, rows: &[(i64, String)]) -> HashSet<String> {
    let done: HashSet<i64> = ledger.confirmed().into_iter().collect();
    rows.iter()
        .filter(|(id, _)| !done.contains(id))
        .map(|(_, a)| a.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_window_is_never_exceeded() {
    with_table("eng_win", |table| async move {
        let aggs: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
        let names: Vec<&str> = aggs.iter().map(String::as_str).collect();
        insert_round_robin(&table, &names, 4).await;
        let rows = rows(&table).await;
        let mut c = cfg();
        c.max_in_flight = 3;
        let sink = RecordingSink::new(|_, _| Step::Hold);
        let (relay, ledger) = start_recorded(&table, sink, c);
        let seed = 0x5eed_0001;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut rounds = 0;
        loop {
            let left = unconfirmed_aggs(&ledger, &rows).len();
            if left == 0 {
                break;
            }
            // The window refills to its bound (or to what is left) and no further.
            let held = ledger.wait_held(left.min(3), "window refilled").await;
            let aggs_out: HashSet<String> = held
                .iter()
                .map(|h| rows.iter().find(|r| r.0 == h.0).unwrap().1.clone())
                .collect();
            assert_eq!(aggs_out.len(), held.len(), "one per aggregate: {held:?}");
            let (id, _, _) = held[rng.gen_range(0..held.len())].clone();
            assert!(ledger.release_and_wait(id, Duration::from_secs(10)).await);
            rounds += 1;
        }
        table
            .wait_status("PROCESSED", 40, Duration::from_secs(10))
            .await;
        relay.stop(Duration::from_secs(5)).await;
        println!(
            "{rounds} releases (seed {seed:#x}); max outstanding {}",
            ledger.max_outstanding("sink")
        );
        assert_eq!(ledger.max_outstanding("sink"), 3);
        assert_eq!(ledger.sends().len(), 40, "each row sent once");
        assert_clean(&ledger, 3, &rows);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_out_of_order_across_aggregates() {
    with_table("eng_ooo", |table| async move {
        // b0: 5 rows, b1: 4, b2: 3, b3: 2, interleaved.
        for round in 0..5 {
            for (i, a) in ["b0", "b1", "b2", "b3"].iter().enumerate() {
                if round < 5 - i {
                    table.insert(a, "e", None, serde_json::json!({})).await;
                }
            }
        }
        let rows = rows(&table).await;
        let agg_of: HashMap<i64, String> = rows.iter().cloned().collect();
        let sink = RecordingSink::new(|_, _| Step::Hold);
        let (relay, ledger) = start_recorded(&table, sink, cfg());
        loop {
            let left = unconfirmed_aggs(&ledger, &rows).len();
            if left == 0 {
                break;
            }
            let held = ledger.wait_held(left, "every aggregate's head out").await;
            let (first, _, _) = held[0].clone();
            let first_agg = agg_of[&first].clone();
            // Answer the later-sent ones first, newest first; the oldest stays out.
            for (id, _, _) in held[1..].iter().rev() {
                assert!(ledger.release_and_wait(*id, Duration::from_secs(10)).await);
            }
            for (id, _, _) in &held[1..] {
                let t = table.clone();
                let id = *id;
                wait_for(
                    Duration::from_secs(10),
                    &format!("row {id} PROCESSED"),
                    || {
                        let t = t.clone();
                        async move { (status(&t, id).await == "PROCESSED").then_some(()) }
                    },
                )
                .await;
            }
            // Their aggregates move on while the oldest is still out…
            let movers: Vec<String> = held[1..]
                .iter()
                .map(|h| (h.0, agg_of[&h.0].clone()))
                .filter(|(sent, a)| rows.iter().any(|(id, b)| b == a && id > sent))
                .map(|(_, a)| a)
                .collect();
            wait_for(
                Duration::from_secs(10),
                "the released aggregates' next rows sent",
                || {
                    let now = ledger.held();
                    let ok = movers
                        .iter()
                        .all(|m| now.iter().any(|h| &agg_of[&h.0] == m));
                    async move { ok.then_some(()) }
                },
            )
            .await;
            // …and the oldest, still unconfirmed, is PENDING with nothing of its
            // aggregate sent after it.
            assert_eq!(table.row(first).await, ("PENDING".into(), 0, None));
            let later_sent = ledger
                .sends()
                .iter()
                .any(|s| s.aggregate == first_agg && s.id > first);
            assert!(
                !later_sent,
                "{first_agg}: a row after {first} was sent before its confirm"
            );
            assert!(
                ledger
                    .release_and_wait(first, Duration::from_secs(10))
                    .await
            );
        }
        table
            .wait_status("PROCESSED", rows.len() as i64, Duration::from_secs(10))
            .await;
        relay.stop(Duration::from_secs(5)).await;
        assert_eq!(ledger.sends().len(), rows.len(), "each row sent once");
        assert_clean(&ledger, cfg().max_in_flight as usize, &rows);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_mid_queue_fails_that_row_and_holds_back_the_rest() {
    rejection_mid_queue(None).await;
}

/// The same with a per-aggregate share of 2 rows: claims cap the aggregate and must
/// still bring its rows back in order around the rejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_mid_queue_with_a_small_per_aggregate_share() {
    rejection_mid_queue(Some(2)).await;
}

async fn rejection_mid_queue(max_rows_per_aggregate: Option<u32>) {
    with_table("eng_rej", |table| async move {
        let ids = insert_round_robin(&table, &["a", "b", "c"], 5).await;
        let a = ids["a"].clone();
        let a3 = a[2];
        let sink = RecordingSink::new(move |m, _| {
            if m.id == a3 {
                Step::Reject("nacked by the broker: a3".into())
            } else {
                Step::Confirm
            }
        });
        let mut c = cfg();
        c.max_attempts = 2;
        if let Some(n) = max_rows_per_aggregate {
            c.max_rows_per_aggregate = n;
        }
        let (relay, ledger) = start_recorded(&table, sink, c);
        table
            .wait_statuses(&[("FAILED", 1), ("PROCESSED", 12)], Duration::from_secs(20))
            .await;
        // A row written afterwards is relayed: claims went on past the FAILED row.
        let z = table.insert("z", "e", None, serde_json::json!({})).await;
        wait_for(Duration::from_secs(10), "the later row z PROCESSED", || {
            let t = table.clone();
            async move { (status(&t, z).await == "PROCESSED").then_some(()) }
        })
        .await;
        relay.stop(Duration::from_secs(5)).await;
        assert_eq!(status(&table, a[0]).await, "PROCESSED");
        assert_eq!(status(&table, a[1]).await, "PROCESSED");
        assert_eq!(
            table.row(a3).await,
            ("FAILED".into(), 2, Some("nacked by the broker: a3".into()))
        );
        assert_eq!(ledger.send_count(a3), 2, "one send per attempt");
        let attempts: Vec<i32> = ledger.sends_of(a3).iter().map(|s| s.attempts).collect();
        assert_eq!(attempts, vec![0, 1], "attempts as sent");
        for id in [a[3], a[4]] {
            assert_eq!(table.row(id).await, ("PENDING".into(), 0, None));
            assert_eq!(ledger.send_count(id), 0, "row {id} never sent");
        }
        for agg in ["b", "c"] {
            for id in &ids[agg] {
                assert_eq!(status(&table, *id).await, "PROCESSED", "{agg} row {id}");
            }
        }
        assert_eq!(table.count("PROCESSED").await, 13);
        assert_clean(&ledger, cfg().max_in_flight as usize, &rows(&table).await);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_mid_send_abandons_and_resends_without_an_attempt() {
    with_table("eng_ddl", |table| async move {
        let ids = insert_round_robin(&table, &["slow", "also", "o1", "o2"], 3).await;
        // s1 is never answered; t1 (another aggregate) is out at the same time and not
        // answered before the deadline either. Re-sends are held too, for the test to
        // answer.
        let (s1, t1) = (ids["slow"][0], ids["also"][0]);
        let sink = RecordingSink::new(hold_if(move |m, _| m.id == s1 || m.id == t1));
        let mut c = cfg();
        c.publish_timeout = Duration::from_millis(300);
        c.lease_timeout = Duration::from_secs(3);
        let (relay, ledger) = start_recorded(&table, sink, c);
        wait_for(Duration::from_secs(10), "s1 and t1 sent again", || {
            let n = ledger.send_count(s1).min(ledger.send_count(t1));
            async move { (n >= 2).then_some(()) }
        })
        .await;
        let closes = ledger.closes("sink");
        let events = ledger.events();
        for id in [s1, t1] {
            let sends = ledger.sends_of(id);
            let (first, again) = (&sends[0], &sends[1]);
            assert!(
                closes.iter().any(|t| *t >= first.at && *t <= again.at),
                "row {id}: the sink was closed between the send and the re-send"
            );
            assert!(
                events.iter().any(|e| matches!(
                    e,
                    Event::Dropped { send_seq, .. } if *send_seq == first.seq
                )),
                "row {id}: the first confirm was abandoned, not answered"
            );
            assert_eq!(again.attempts, 0, "row {id} re-sent with attempts = 0");
            assert_eq!(table.row(id).await, ("PENDING".into(), 0, None));
        }
        let first_s1 = &ledger.sends_of(s1)[0];
        let first_close = closes.iter().find(|t| **t >= first_s1.at).unwrap();
        let waited = *first_close - first_s1.at;
        println!("abandoned {waited:?} after s1 was sent");
        assert!(
            waited >= Duration::from_millis(250),
            "abandoned only at the deadline ({waited:?})"
        );
        // Answer whichever sends of s1 and t1 are awaited until the engine has taken an
        // Ok for both.
        wait_for(
            Duration::from_secs(10),
            "re-sends of s1 and t1 confirmed",
            || {
                ledger.release(s1, Ok(()));
                ledger.release(t1, Ok(()));
                let c = ledger.confirmed();
                let done = c.contains(&s1) && c.contains(&t1);
                async move { done.then_some(()) }
            },
        )
        .await;
        table
            .wait_status("PROCESSED", 12, Duration::from_secs(20))
            .await;
        relay.stop(Duration::from_secs(5)).await;
        table.assert_no_attempts("no attempt counted").await;
        println!(
            "s1 sent {} times, t1 {} times; sink closed {} times",
            ledger.send_count(s1),
            ledger.send_count(t1),
            ledger.closes("sink").len()
        );
        assert_clean(&ledger, cfg().max_in_flight as usize, &rows(&table).await);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapsing_leases_abandon_what_is_out_and_stop_sending() {
    with_table("eng_fence", |table| async move {
        let ids = insert_round_robin(&table, &["f", "g"], 2).await;
        let f1 = ids["f"][0];
        let sink = RecordingSink::new(hold_if(move |m, info| m.id == f1 && info.nth == 0));
        let mut c = cfg();
        // Leases written for 1 s, renewed every 500 ms, no send with < 250 ms left.
        c.lease_timeout = Duration::from_secs(2);
        c.publish_timeout = Duration::from_millis(1900);
        let (relay, ledger) = start_recorded(&table, sink, c);
        wait_for(Duration::from_secs(10), "f1 out, held", || {
            let h = ledger.held_by("sink");
            async move { (h == vec![f1]).then_some(()) }
        })
        .await;
        let sent_at = ledger.sends_of(f1)[0].at;
        // The database stops answering lease renewals (the lease table is locked).
        let mut lock = table.pool.begin().await.unwrap();
        sqlx::query(&format!(
            "LOCK TABLE \"{}_relay_leases\" IN ACCESS EXCLUSIVE MODE",
            table.name
        ))
        .execute(&mut *lock)
        .await
        .unwrap();
        let locked_at = Instant::now();
        table
            .insert("h", "e", None, serde_json::json!({}))
            .await;
        let closed = wait_for(Duration::from_secs(5), "the fence abandons f1", || {
            let c = ledger.closes("sink");
            async move { c.first().copied() }
        })
        .await;
        // Beyond the fence nothing is sent: watch for one more lease period.
        let sent_later = poll_within(Duration::from_millis(1200), || {
            let n = ledger.sends().iter().filter(|s| s.at > closed).count();
            async move { (n > 0).then_some(n) }
        })
        .await;
        lock.commit().await.unwrap();
        println!(
            "abandoned {:?} after the lock, {:?} after f1 was sent; sends while fenced: {sent_later:?}",
            closed - locked_at,
            closed - sent_at
        );
        assert!(
            closed - sent_at < Duration::from_millis(1900),
            "abandoned by the fence, before publish_timeout"
        );
        assert!(
            closed - locked_at <= Duration::from_millis(1600),
            "abandoned once the leases may have lapsed ({:?} after renewals stopped)",
            closed - locked_at
        );
        assert_eq!(sent_later, None, "nothing sent while the leases may have lapsed");
        table
            .wait_status("PROCESSED", 5, Duration::from_secs(20))
            .await;
        relay.stop(Duration::from_secs(5)).await;
        assert!(ledger.send_count(f1) >= 2, "f1 sent again");
        table.assert_no_attempts("no attempt counted").await;
        assert_clean(&ledger, cfg().max_in_flight as usize, &rows(&table).await);
    })
    .await;
}

/// A row committed after the sweep passed its id (its transaction was open while later
/// ids committed) still goes out before the rows its aggregate wrote after it: the sweep
/// never moves past an id that can still commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_after_the_sweep_passed_its_id_goes_out_first() {
    with_table("eng_late", |table| async move {
        // Row x of "late": its id is drawn, its transaction stays open.
        let mut open = table.pool.begin().await.unwrap();
        let x = insert_row(&mut *open, &table.name, "late").await.unwrap();
        // 600 later rows of other aggregates commit: more than one claim's scan page, so
        // the sweep is still under way when x commits.
        let others: Vec<String> = (0..60).map(|i| format!("o{i}")).collect();
        let names: Vec<&str> = others.iter().map(String::as_str).collect();
        insert_round_robin(&table, &names, 10).await;
        let mut c = cfg();
        c.max_in_flight = 3;
        // The first three sends wait for the test; every later one is confirmed at once.
        let sends = std::sync::atomic::AtomicUsize::new(0);
        let sink = RecordingSink::new(hold_if(move |_, _| {
            sends.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 3
        }));
        let (relay, ledger) = start_recorded(&table, sink, c);
        // The sweep is past x: three later rows are out, their confirms held.
        let held = ledger.wait_held(3, "the first rows after x out").await;
        open.commit().await.unwrap();
        let y = table.insert("late", "e", None, serde_json::json!({})).await;
        for (id, _, _) in held {
            ledger.release(id, Ok(()));
        }
        table
            .wait_status("PROCESSED", 602, Duration::from_secs(10))
            .await;
        relay.stop(Duration::from_secs(5)).await;
        let sent: Vec<i64> = ledger.sends().iter().map(|s| s.id).collect();
        let pos = |id: i64| sent.iter().position(|s| *s == id);
        assert!(
            pos(x) < pos(y),
            "row {x} (committed late) went out after row {y} of its aggregate: {sent:?}"
        );
        assert_clean(&ledger, 3, &rows(&table).await);
    })
    .await;
}

/// Rows held in memory do not hold the sweep's low water mark (a slow confirm would make
/// every wrap walk what was marked since); so rows that leave memory still `PENDING`
/// must bring the mark back. Here: row x's confirm is held throughout; r1 is out with r2
/// and r3 queued behind it while wraps pass them all; r1 is then rejected for good (skip
/// mode), r2 and r3 leave memory, and must be claimed and delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_dropped_after_a_rejection_come_back_while_a_slow_confirm_is_out() {
    with_table("eng_drop", |table| async move {
        let x = table.insert("slow", "e", None, serde_json::json!({})).await;
        let r = insert_round_robin(&table, &["r"], 3).await["r"].clone();
        let (r1, r2, r3) = (r[0], r[1], r[2]);
        let sink = RecordingSink::new(hold_if(move |m, _| m.id == x || m.id == r1));
        let mut c = cfg();
        c.on_failed = outbox_relay::config::OnFailed::Skip;
        c.max_attempts = 1;
        c.lease_timeout = Duration::from_secs(30);
        c.publish_timeout = Duration::from_secs(20);
        let (relay, ledger) = start_recorded(&table, sink, c);
        ledger.wait_held(2, "x and r1 out").await;
        wait_all_leases(&table, &relay.instance, Duration::from_secs(10)).await;
        // Claims wrap past x, r1, r2 and r3 (all held) while these flow.
        for round in 1..=3 {
            insert_round_robin(&table, &["a", "b", "c", "d", "e"], 10).await;
            table
                .wait_status("PROCESSED", round * 50, Duration::from_secs(20))
                .await;
        }
        assert_eq!(ledger.send_count(r2), 0, "r2 waits behind r1");
        assert!(ledger.release(
            r1,
            Err(outbox_relay::sink::SinkError::Rejected("nacked: r1".into()))
        ));
        wait_for(Duration::from_secs(10), "r2 and r3 PROCESSED", || {
            let t = table.clone();
            async move {
                let done =
                    status(&t, r2).await == "PROCESSED" && status(&t, r3).await == "PROCESSED";
                done.then_some(())
            }
        })
        .await;
        assert_eq!(status(&table, r1).await, "FAILED");
        assert_eq!(status(&table, x).await, "PENDING", "x still out");
        assert!(ledger.release_and_wait(x, Duration::from_secs(10)).await);
        table
            .wait_statuses(
                &[("FAILED", 1), ("PROCESSED", 153)],
                Duration::from_secs(20),
            )
            .await;
        relay.stop(Duration::from_secs(5)).await;
        assert_eq!(ledger.send_count(r2), 1, "r2 sent once, after r1's outcome");
        // (Skip mode: r2 follows r1's FAILED, which `assert_clean`'s order rule counts.)
        let bad = ledger.bound_violations(cfg().max_in_flight as usize);
        assert!(bad.is_empty(), "{bad:?}");
    })
    .await;
}
