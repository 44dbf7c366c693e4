//! Rebalancing in-process against the real Postgres, with recording sinks for relays A
//! and B: when B joins, A hands a partition over only once nothing of it is out at A — no
//! message in flight, no dead-letter publish held, no confirm left unrecorded — while a
//! watcher polls the lease table for a partition owned by B with a message of it out at A.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_relay::config::RelayConfig;
use outbox_relay_testkit::{db::*, inproc::Running, recording::*, wait::*};

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
    // A held send must outlive the steps that watch it: B joining, two of A's renewals
    // (lease_timeout / 4 apart) and a quarter lease more — ~5 s of 5.5 with a 6 s lease,
    // too thin when the machine is loaded (seen once in a parallel run).
    c.lease_timeout = Duration::from_secs(8);
    c.publish_timeout = Duration::from_millis(7500);
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

/// Start relay B beside A and wait for its heartbeat (two live members).
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
        let first = ledger
            .wait_held(aggs.len(), "A: every aggregate's head out")
            .await;
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
        let moved = poll_within(c.lease_timeout / 4 + Duration::from_millis(300), || {
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
        let moved = poll_within(c.lease_timeout / 4 + Duration::from_millis(500), || {
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
            poll_within(c.lease_timeout / 4 + Duration::from_millis(500), || {
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
