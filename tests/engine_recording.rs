//! Deterministic engine tests in-process against the real Postgres: the test holds
//! confirms and answers them in the order it likes (`recording_support`), then checks the
//! window bounds, per-aggregate order, how rejections and deadlines are recorded, and that
//! a rebalance never hands a partition over while a message of it is out.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_relay::config::RelayConfig;
use outbox_relay_testkit::{db::*, inproc::Running, recording::*, wait::*};
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

/// Wait until the engine holds exactly `want` confirms out; returns them (send order).
async fn wait_held(ledger: &Ledger, want: usize, what: &str) -> Vec<(i64, u64, String)> {
    wait_for(
        Duration::from_secs(10),
        &format!("{want} confirms held ({what})"),
        || {
            let h = ledger.held();
            async move { (h.len() == want).then_some(h) }
        },
    )
    .await
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
            let held = wait_held(&ledger, left.min(3), "window refilled").await;
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
            let held = wait_held(&ledger, left, "every aggregate's head out").await;
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

/// Pick `n` aggregate names landing in partitions < 128 and `n` in partitions >= 128:
/// (aggregate, partition), the low ones first, and the same as a map.
async fn spread_aggregates(
    table: &TestTable,
    n: usize,
) -> (Vec<(String, i32)>, HashMap<String, i32>) {
    let (mut low, mut high) = (Vec::new(), Vec::new());
    for i in 0.. {
        let name = format!("r{i}");
        let p = partition_of(table, &name).await;
        if p < 128 && low.len() < n {
            low.push((name, p));
        } else if p >= 128 && high.len() < n {
            high.push((name, p));
        }
        if low.len() == n && high.len() == n {
            break;
        }
    }
    low.extend(high);
    let part_of = low.iter().cloned().collect();
    (low, part_of)
}

/// Two rows of each aggregate of `aggs` but `x`.
async fn two_rows_of_the_others(table: &TestTable, aggs: &[(String, i32)], x: &str) {
    for (a, _) in aggs.iter().filter(|(a, _)| *a != x) {
        for _ in 0..2 {
            table.insert(a, "e", None, serde_json::json!({})).await;
        }
    }
}

/// `cfg()` with the timings of the rebalance tests: `lease_timeout` 6 s and a publish
/// timeout just under it.
fn rebalance_cfg() -> RelayConfig {
    let mut c = cfg();
    c.lease_timeout = Duration::from_secs(6);
    c.publish_timeout = Duration::from_millis(5500);
    c
}

/// What the lease watcher saw.
#[derive(Default)]
struct Watched {
    /// Partitions owned by someone else while a message of them was out at A: the
    /// first sighting and how many polls saw it.
    violations: std::collections::BTreeMap<i32, (String, usize)>,
    /// (when, partition) A stopped owning a partition.
    handed_back: Vec<(Instant, i32)>,
    /// Polls that found a partition with a message out at A (the check had teeth).
    checks: usize,
}

/// Watches the lease table until `stop`: a violation is a partition owned by someone
/// other than `a_instance` while a confirm (or dead-letter publish) of that partition was
/// outstanding at sink "A" both before and after the lease table was read.
async fn watch_leases(
    table: Arc<TestTable>,
    ledger: Ledger,
    a_instance: String,
    part_of: HashMap<String, i32>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Watched>>,
) {
    let mut was_a: HashSet<i32> = HashSet::new();
    while !stop.load(Ordering::SeqCst) {
        let out_at_a = || -> HashSet<i32> {
            ledger
                .outstanding("A")
                .iter()
                .map(|(_, agg)| part_of[agg])
                .collect()
        };
        let before = out_at_a();
        let owners = owners(&table).await;
        let after = out_at_a();
        {
            let mut w = seen.lock().unwrap();
            for p in before.intersection(&after) {
                w.checks += 1;
                let owner = owners.get(p).cloned().flatten();
                if owner.as_deref() != Some(a_instance.as_str()) {
                    let out: Vec<(i64, String)> = ledger
                        .outstanding("A")
                        .into_iter()
                        .filter(|(_, agg)| part_of[agg] == *p)
                        .collect();
                    let first = format!(
                        "partition {p} owned by {owner:?} while {out:?} (id, aggregate) out at A"
                    );
                    w.violations.entry(*p).or_insert((first, 0)).1 += 1;
                }
            }
            for (p, o) in &owners {
                if o.as_deref() == Some(a_instance.as_str()) {
                    was_a.insert(*p);
                } else if was_a.remove(p) {
                    w.handed_back.push((Instant::now(), *p));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `watch_leases` in a task: its stop flag and what it saw.
struct Watcher {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Watched>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    fn start(
        table: &Arc<TestTable>,
        ledger: &Ledger,
        a_instance: &str,
        part_of: &HashMap<String, i32>,
    ) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Watched::default()));
        let task = tokio::spawn(watch_leases(
            table.clone(),
            ledger.clone(),
            a_instance.to_string(),
            part_of.clone(),
            stop.clone(),
            seen.clone(),
        ));
        Watcher { stop, seen, task }
    }

    /// Stop watching; what it saw.
    async fn finish(self) -> Watched {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// Start relay B beside A and wait for its heartbeat (two live members).
/// Start relay A and wait until it holds every partition.
async fn start_a(table: &Arc<TestTable>, sink_a: RecordingSink, c: RelayConfig) -> Running {
    let relay_a = start(table, sink_a, c);
    wait_all_leases(table, &relay_a.instance, Duration::from_secs(10)).await;
    relay_a
}

/// Wait until the one confirm A holds is row `id`'s.
async fn wait_held_at_a(ledger: &Ledger, id: i64, what: &str) {
    wait_for(Duration::from_secs(10), what, || {
        let h = ledger.held_by("A");
        async move { (h == vec![id]).then_some(()) }
    })
    .await;
}

async fn start_b(table: &Arc<TestTable>, sink_b: RecordingSink, c: RelayConfig) -> Running {
    let relay_b = start(table, sink_b, c);
    wait_for(Duration::from_secs(10), "B's heartbeat", || {
        let t = table.clone();
        async move { (live_members(&t).await == 2).then_some(()) }
    })
    .await;
    relay_b
}

fn assert_no_violations(w: &Watched) {
    let lines: Vec<String> = w
        .violations
        .values()
        .map(|(first, n)| format!("{first} (seen in {n} polls)"))
        .collect();
    assert!(
        lines.is_empty(),
        "handed over while out:\n{}",
        lines.join("\n")
    );
}

/// Wait until `instance` has renewed its leases `n` times more.
async fn wait_renewals(table: &Arc<TestTable>, instance: &str, n: usize) {
    for _ in 0..n {
        let mark = lease_mark(table, instance).await;
        wait_for(Duration::from_secs(10), "a lease renewal", || {
            let (t, a) = (table.clone(), instance.to_string());
            async move { (lease_mark(&t, &a).await > mark).then_some(()) }
        })
        .await;
    }
}

/// Poll `check` for at most `within`: `Some` as soon as it holds, `None` if it never did.
async fn within<T, F, Fut>(within: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Latest `lease_until` among `instance`'s leases (epoch seconds).
async fn lease_mark(table: &TestTable, instance: &str) -> f64 {
    sqlx::query_scalar(&format!(
        "SELECT coalesce(extract(epoch FROM max(lease_until))::float8, 0)
         FROM \"{}_relay_leases\" WHERE owner = $1",
        table.name
    ))
    .bind(instance)
    .fetch_one(&table.pool)
    .await
    .expect("lease mark")
}

async fn live_members(table: &TestTable) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}_relay_members\" WHERE alive_until > now()",
        table.name
    ))
    .fetch_one(&table.pool)
    .await
    .expect("members")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_waits_for_messages_in_flight() {
    with_table("eng_reb", |table| async move {
        let (aggs, part_of) = spread_aggregates(&table, 6).await;
        let names: Vec<&str> = aggs.iter().map(|(a, _)| a.as_str()).collect();
        insert_round_robin(&table, &names, 5).await;
        let rows = rows(&table).await;
        let c = rebalance_cfg();
        let ledger = Ledger::default();
        let a_holds = Arc::new(AtomicBool::new(true));
        let flag = a_holds.clone();
        let sink_a = ledger.sink("A", hold_if(move |_, _| flag.load(Ordering::SeqCst)));
        let sink_b = ledger.sink("B", |_, _| Step::Confirm);
        let relay_a = start_a(&table, sink_a, c.clone()).await;
        let first = wait_held(&ledger, aggs.len(), "A: every aggregate's head out").await;
        let t0 = Instant::now();

        let watcher = Watcher::start(&table, &ledger, &relay_a.instance, &part_of);

        let relay_b = start_b(&table, sink_b, c.clone()).await;
        // Two renewals of A after B joined: A's share is now 128 partitions.
        wait_renewals(&table, &relay_a.instance, 2).await;
        let owners_now = owners(&table).await;
        for (id, _, _) in &first {
            let agg = &rows.iter().find(|r| r.0 == *id).unwrap().1;
            assert_eq!(
                owners_now[&part_of[agg]].as_deref(),
                Some(relay_a.instance.as_str()),
                "partition {} of {agg} (row {id} out at A) still A's",
                part_of[agg]
            );
        }
        assert!(
            ledger.sends().iter().all(|s| s.sink == "A"),
            "B has no work yet"
        );
        assert!(ledger.closes("A").is_empty(), "nothing abandoned so far");
        println!(
            "A rebalancing with {} held after {:?}",
            first.len(),
            t0.elapsed()
        );

        // Answer A's held confirms one at a time (newest first); A keeps holding its
        // next sends until all of the first ones are answered.
        for (id, _, _) in first.iter().rev() {
            assert!(ledger.release_and_wait(*id, Duration::from_secs(10)).await);
        }
        a_holds.store(false, Ordering::SeqCst);
        for id in ledger.held_by("A") {
            ledger.release_and_wait(id, Duration::from_secs(10)).await;
        }
        table
            .wait_status("PROCESSED", rows.len() as i64, Duration::from_secs(30))
            .await;
        let w = watcher.finish().await;
        relay_b.stop(Duration::from_secs(5)).await;
        relay_a.stop(Duration::from_secs(5)).await;

        let back = w.handed_back.clone();
        let sends = ledger.sends();
        let by_b = sends.iter().filter(|s| s.sink == "B").count();
        println!(
            "A handed back {} partitions; {} checks; sends: A {}, B {by_b}; closes A {} B {}",
            back.len(),
            w.checks,
            sends.len() - by_b,
            ledger.closes("A").len(),
            ledger.closes("B").len()
        );
        assert_no_violations(&w);
        assert!(w.checks > 0, "the watcher saw messages out at A");
        assert!(!back.is_empty(), "A handed partitions back");
        assert!(by_b > 0, "B took a share of the work");
        assert_clean(&ledger, c.max_in_flight as usize, &rows);
        let mut confirmed = ledger.confirmed();
        confirmed.sort_unstable();
        assert_eq!(
            confirmed,
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            "each row confirmed once"
        );
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
async fn a_dead_letter_publish_in_flight_keeps_its_partition() {
    with_table("eng_dlq", |table| async move {
        // Two aggregates in the lower and two in the upper half of the partitions; the
        // poisoned row is in the upper half (what A hands back when B joins).
        let (aggs, part_of) = spread_aggregates(&table, 2).await;
        let (x, px) = aggs[2].clone();
        let r = table
            .insert(&x, "poison", None, serde_json::json!({}))
            .await;
        let r2 = table.insert(&x, "e", None, serde_json::json!({})).await;
        two_rows_of_the_others(&table, &aggs, &x).await;
        let rows = rows(&table).await;
        let mut c = rebalance_cfg();
        c.max_attempts = 1;
        let ledger = Ledger::default();
        let script = |m: &outbox_relay::model::Message, _: &SendInfo| {
            if m.event_type == "poison" {
                Step::Reject("nacked".into())
            } else {
                Step::Confirm
            }
        };
        let sink_a = ledger.sink("A", script).with_dead_letter(|_, _| Step::Hold);
        let sink_b = ledger
            .sink("B", script)
            .with_dead_letter(|_, _| Step::Confirm);
        let relay_a = start_a(&table, sink_a, c.clone()).await;
        // r is rejected on its last attempt: A dead-letters it and awaits that confirm.
        wait_held_at_a(&ledger, r, "A's dead-letter publish of r held").await;
        let t0 = Instant::now();
        let watcher = Watcher::start(&table, &ledger, &relay_a.instance, &part_of);
        let relay_b = start_b(&table, sink_b, c.clone()).await;
        wait_renewals(&table, &relay_a.instance, 2).await;
        // A knows it has 128 partitions too many. Give B one renewal period to take
        // whatever A hands back; r's partition must not be among it.
        let a = relay_a.instance.clone();
        let moved = within(c.lease_timeout / 4 + Duration::from_millis(300), || {
            let (t, a) = (table.clone(), a.clone());
            let b_sent_r = ledger.send_count(r) > 1;
            async move {
                let owner = owners(&t).await.get(&px).cloned().flatten();
                (owner.as_deref() != Some(a.as_str()) || b_sent_r).then_some(owner)
            }
        })
        .await;
        let dl_still_held = ledger.held_by("A") == vec![r];
        println!(
            "after {:?}: dead letter still held: {dl_still_held}; partition {px} moved: {moved:?}",
            t0.elapsed()
        );
        ledger.release(r, Ok(()));
        wait_for(Duration::from_secs(10), "r FAILED", || {
            let t = table.clone();
            async move { (status(&t, r).await == "FAILED").then_some(()) }
        })
        .await;
        table
            .wait_status("PROCESSED", rows.len() as i64 - 2, Duration::from_secs(20))
            .await;
        let w = watcher.finish().await;
        relay_b.stop(Duration::from_secs(5)).await;
        relay_a.stop(Duration::from_secs(5)).await;

        let by_sink = |sink: &str| -> Vec<(i64, bool)> {
            ledger
                .events()
                .iter()
                .filter_map(|e| match e {
                    Event::Sent(s) if s.sink == sink && s.id == r => Some((s.id, s.dead_letter)),
                    _ => None,
                })
                .collect()
        };
        println!(
            "r: A {:?}, B {:?}; watcher: {} checks, {} handed back",
            by_sink("A"),
            by_sink("B"),
            w.checks,
            w.handed_back.len()
        );
        assert!(dl_still_held, "the dead-letter confirm was still awaited");
        assert_no_violations(&w);
        assert_eq!(
            moved, None,
            "partition {px} stayed A's while r's dead letter was out"
        );
        assert_eq!(ledger.send_count(r), 1, "r sent once (by A)");
        assert_eq!(ledger.dead_letters().len(), 1, "r dead-lettered once");
        assert_eq!(
            table.row(r).await,
            ("FAILED".into(), 1, Some("nacked".into()))
        );
        assert_eq!(table.row(r2).await, ("PENDING".into(), 0, None));
        assert_clean(&ledger, c.max_in_flight as usize, &rows);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_is_handed_back_only_after_its_confirms_are_recorded() {
    with_table("eng_mark", |table| async move {
        let (aggs, part_of) = spread_aggregates(&table, 2).await;
        // x lives in the upper half of the partitions (what A hands back when B joins).
        let (x, px) = aggs[2].clone();
        let x1 = table.insert(&x, "e", None, serde_json::json!({})).await;
        let x2 = table.insert(&x, "e", None, serde_json::json!({})).await;
        two_rows_of_the_others(&table, &aggs, &x).await;
        let rows = rows(&table).await;
        let c = rebalance_cfg();
        let ledger = Ledger::default();
        let sink_a = ledger.sink("A", hold_if(move |m, _| m.id == x1));
        let sink_b = ledger.sink("B", |_, _| Step::Confirm);
        let relay_a = start_a(&table, sink_a, c.clone()).await;
        wait_held_at_a(&ledger, x1, "x1 out at A, held").await;
        // A slow database: recording x1 waits for the test's row lock.
        let mut lock = table.pool.begin().await.unwrap();
        sqlx::query(&format!(
            "SELECT id FROM \"{}\" WHERE id = $1 FOR UPDATE",
            table.name
        ))
        .bind(x1)
        .execute(&mut *lock)
        .await
        .unwrap();
        let watcher = Watcher::start(&table, &ledger, &relay_a.instance, &part_of);
        let relay_b = start_b(&table, sink_b, c.clone()).await;
        wait_renewals(&table, &relay_a.instance, 2).await;
        assert!(ledger.release_and_wait(x1, Duration::from_secs(10)).await);
        // x1 is confirmed but not recorded: B must not get x's partition (and send x1
        // again) before A has recorded it. One renewal period of B to find out.
        let a = relay_a.instance.clone();
        let moved = within(c.lease_timeout / 4 + Duration::from_millis(500), || {
            let (t, a) = (table.clone(), a.clone());
            let resent = ledger.send_count(x1) > 1;
            async move {
                let owner = owners(&t).await.get(&px).cloned().flatten();
                (owner.as_deref() != Some(a.as_str()) || resent).then_some((owner, resent))
            }
        })
        .await;
        let x1_status = status(&table, x1).await;
        if moved.is_some() {
            // Show what that leads to: B claims x1 (still PENDING) and sends it again.
            within(c.lease_timeout / 4 + Duration::from_millis(500), || {
                let resent = ledger.send_count(x1) > 1;
                async move { resent.then_some(()) }
            })
            .await;
        }
        lock.commit().await.unwrap();
        table
            .wait_status("PROCESSED", rows.len() as i64, Duration::from_secs(20))
            .await;
        let w = watcher.finish().await;
        relay_b.stop(Duration::from_secs(5)).await;
        relay_a.stop(Duration::from_secs(5)).await;
        let who: Vec<String> = ledger.sends_of(x1).iter().map(|s| s.sink.clone()).collect();
        println!(
            "x1 ({x1_status} while locked) sent by {who:?}; x2 sent by {:?}; \
             partition {px} moved while x1 unrecorded: {moved:?}",
            ledger
                .sends_of(x2)
                .iter()
                .map(|s| &s.sink)
                .collect::<Vec<_>>()
        );
        assert_no_violations(&w);
        assert_eq!(
            moved, None,
            "partition {px} stayed A's until x1 was recorded"
        );
        assert_eq!(who, vec!["A".to_string()], "x1 sent once");
        assert_clean(&ledger, c.max_in_flight as usize, &rows);
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
        let sent_later = within(Duration::from_millis(1200), || {
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
