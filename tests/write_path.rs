//! The producer's write path under schema 3 (`migrations/0003_order.sql`, SPEC §3.2): per
//! aggregate, `id` order is commit order by construction — shown at the lock level, then
//! end to end with unlocked producers sharing aggregates (RabbitMQ, three replicas,
//! Kafka); a rejected row with a 4 KB key fails alone; schema 2 upgrades online under load.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::relay::LATE_ROWS_TOTAL;
use outbox_relay::table::TableName;
use outbox_relay_testkit::{
    db::*, kafka, order::*, pg_url, rabbit::*, relay_proc::*, unique, wait::*,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sqlx::{Connection, PgConnection};

const ROWS: usize = 5_000;
const AGGREGATES: usize = 20;
const PRODUCERS: usize = 8;
const KAFKA: &str = "127.0.0.1:9092";
const MINUTE: Duration = Duration::from_secs(60);

async fn connect() -> PgConnection {
    PgConnection::connect(&pg_url()).await.unwrap()
}

/// Set `OUTBOX_RELAY__<key>` (later entries win).
fn set(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.push((format!("OUTBOX_RELAY__{key}"), value.to_string()));
}

/// `fut`'s output, or a panic saying `what` did not happen within 10 s.
async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    let r = tokio::time::timeout(Duration::from_secs(10), fut).await;
    r.unwrap_or_else(|_| panic!("{what} within 10 s"))
}

/// A writer of `agg` on its own connection, in its own task: (task → id, backend pid).
async fn spawn_writer(table: &str, agg: &str) -> (tokio::task::JoinHandle<i64>, i32) {
    let mut conn = connect().await;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let (table, agg) = (table.to_string(), agg.to_string());
    let task = tokio::spawn(async move {
        let mut tx = conn.begin().await.unwrap();
        let id = insert_row(&mut *tx, &table, &agg).await.unwrap();
        tx.commit().await.unwrap();
        id
    });
    (task, pid)
}

/// The one value `sql` selects.
async fn scalar<T>(table: &TestTable, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql)
        .fetch_one(&table.pool)
        .await
        .unwrap()
}

/// Wait until backend `pid` waits for an advisory lock (the aggregate's order lock).
async fn wait_blocked(table: &TestTable, pid: i32) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
         WHERE a.pid = {pid} AND a.wait_event_type = 'Lock' AND a.wait_event = 'advisory'
           AND l.locktype = 'advisory' AND NOT l.granted"
    );
    let what = "the second writer waiting on the aggregate's advisory lock";
    wait_for(Duration::from_secs(10), what, || async {
        (scalar::<i64>(table, &sql).await > 0).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_aggregate_writers_commit_in_id_order() {
    let table = TestTable::new("wp_lock").await;
    let agg = unique("A");
    let mut c1 = connect().await;
    let mut t1 = c1.begin().await.unwrap();
    let id1 = insert_row(&mut *t1, &table.name, &agg).await.unwrap();
    let (t2, pid2) = spawn_writer(&table.name, &agg).await;
    wait_blocked(&table, pid2).await;
    // A writer of another aggregate neither waits nor is waited for.
    let writer = spawn_writer(&table.name, &unique("B")).await.0;
    let id3 = within("a writer of another aggregate completes", writer).await;
    let id3 = id3.unwrap();
    wait_blocked(&table, pid2).await;
    assert!(!t2.is_finished(), "T2 waits as long as T1 is open");
    t1.commit().await.unwrap();
    let id2 = within("T2 completes after T1's commit", t2).await.unwrap();
    println!("T1 id {id1}, T3 (other aggregate) id {id3}, T2 id {id2}");
    assert!(id1 < id2, "commit order is id order: T1 {id1}, T2 {id2}");
    assert!(id3 < id2, "T2 drew its id after its wait");

    // T1 rolls back: T2 goes on, and only its row exists.
    let agg = unique("R");
    let mut t1 = c1.begin().await.unwrap();
    let gone = insert_row(&mut *t1, &table.name, &agg).await.unwrap();
    let (t2, pid2) = spawn_writer(&table.name, &agg).await;
    wait_blocked(&table, pid2).await;
    t1.rollback().await.unwrap();
    let id2 = within("T2 after T1's rollback", t2).await.unwrap();
    let sql = format!(
        "SELECT array_agg(id) FROM \"{}\" WHERE aggregate_id = '{agg}'",
        table.name
    );
    let ids: Vec<i64> = scalar(&table, &sql).await;
    assert_eq!(ids, vec![id2]);
    assert!(gone < id2);
    table.cleanup().await;
}

/// `ROWS` rows over `AGGREGATES` shared aggregates from `PRODUCERS` producers, each on its
/// own connection, none taking a lock of its own. A transaction writes 1–3 rows and a
/// quarter of them stay open a few ms (the workload, not a wait), so commits interleave
/// out of id order. Within a transaction the aggregates are written in one global order:
/// the per-aggregate locks of schema 3 deadlock two transactions writing two aggregates
/// in opposite orders.
async fn shared_workload(table: &str) {
    let left = Arc::new(AtomicUsize::new(ROWS));
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let (table, left) = (table.to_string(), left.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = connect().await;
            let mut rng = StdRng::seed_from_u64(rand::random::<u64>() ^ p as u64);
            loop {
                let want = rng.gen_range(1..=3);
                let Ok(prev) = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                    (l > 0).then(|| l.saturating_sub(want))
                }) else {
                    break;
                };
                let mut aggs: Vec<usize> = (0..prev.min(want))
                    .map(|_| rng.gen_range(0..AGGREGATES))
                    .collect();
                aggs.sort_unstable();
                let hold = rng.gen_ratio(1, 4).then(|| rng.gen_range(1..=8));
                let mut tx = conn.begin().await.unwrap();
                for a in aggs {
                    insert_row(&mut *tx, &table, &format!("agg-{a:02}"))
                        .await
                        .unwrap();
                }
                if let Some(ms) = hold {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.expect("producer");
    }
}

/// Wait until `replicas` relay instances hold all 256 partitions between them.
async fn wait_leases(table: &TestTable, replicas: usize) {
    let sql = format!(
        "SELECT ARRAY[count(DISTINCT owner), count(*)] FROM \"{}_relay_leases\"
         WHERE owner IS NOT NULL AND lease_until > now()",
        table.name
    );
    wait_for(MINUTE, "relays holding all leases", || async {
        let held: Vec<i64> = scalar(table, &sql).await;
        (held == [replicas as i64, 256]).then_some(())
    })
    .await
}

/// The shared workload relayed to RabbitMQ by `replicas` relay processes while it runs:
/// every row PROCESSED and delivered exactly once, per aggregate in id order, no late row.
async fn relay_shared_workload_rabbitmq(prefix: &str, replicas: usize) {
    let (table, broker) = table_and_broker(prefix).await;
    let mut env = relay_env(&table.name, &broker.exchange);
    // Roomy leases: on a loaded 2-core box a 4 s lease can lapse and move partitions.
    set(&mut env, "RELAY__LEASE_TIMEOUT", "12s");
    // Postgres has 100 connections for every suite running in parallel.
    set(&mut env, "DATABASE__MAX_CONNECTIONS", "3");
    let relays: Vec<RelayProc> = (0..replicas).map(|_| RelayProc::start(&env)).collect();
    wait_leases(&table, replicas).await;
    let consumer = tokio::spawn({
        let queue = broker.queue.clone();
        async move {
            let b = TestBroker::attach(&queue).await;
            b.take(ROWS, Duration::from_secs(300)).await
        }
    });
    let started = Instant::now();
    shared_workload(&table.name).await;
    let produced = started.elapsed();
    let mut got = consumer.await.unwrap();
    table
        .wait_status("PROCESSED", ROWS as i64, Duration::from_secs(120))
        .await;
    assert_eq!(table.total().await, ROWS as i64);
    let extra = broker.depth().await as usize;
    if extra > 0 {
        got.extend(broker.take(extra, Duration::from_secs(30)).await);
    }
    let distinct: std::collections::HashSet<_> = got.iter().map(|g| &g.message_id).collect();
    assert_eq!(distinct.len(), ROWS, "every row arrived");
    let dups = assert_order(&got, &table.index().await);
    let (mut late, mut shares) = (0.0, Vec::new());
    for r in &relays {
        late += r.metric(LATE_ROWS_TOTAL).await.unwrap_or(0.0);
        let published = r.metric("outbox_relay_published_total").await;
        shares.push(published.unwrap_or(0.0));
    }
    println!(
        "{ROWS} rows from {PRODUCERS} unlocked producers in {produced:?}; {replicas} relay(s) \
         published {shares:?}; duplicates {dups}; late rows {late}"
    );
    assert_eq!(dups, 0, "no crash, so no re-publish");
    assert_eq!(late, 0.0, "rows committed late");
    assert!(shares.iter().sum::<f64>() >= ROWS as f64, "{shares:?}");
    drop(relays);
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unlocked_producers_on_shared_aggregates_arrive_in_id_order_rabbitmq() {
    relay_shared_workload_rabbitmq("wp_rmq", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unlocked_producers_on_shared_aggregates_arrive_in_id_order_three_replicas() {
    relay_shared_workload_rabbitmq("wp_rep3", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unlocked_producers_on_shared_aggregates_arrive_in_id_order_kafka() {
    let addr = KAFKA.parse().unwrap();
    if let Err(e) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        panic!("no Kafka broker at {KAFKA} ({e}): run scripts/kafka-broker.sh first");
    }
    let topic = unique("wp_kafka");
    let topics = kafka::TestTopics::new(KAFKA, &[&topic]);
    let cfg = kafka::kafka_config(KAFKA, &[]);
    outbox_relay::sink::kafka::tap::ensure_topic(&cfg, &topic, 4)
        .await
        .expect("create the test topic");
    let table = TestTable::new("wp_kafka").await;
    let mut env = relay_env(&table.name, "unused");
    set(&mut env, "SINK__KIND", "kafka");
    set(&mut env, "KAFKA__BROKERS", KAFKA);
    set(&mut env, "KAFKA__TOPIC", &topic);
    let relay = RelayProc::start(&env);
    wait_leases(&table, 1).await;
    shared_workload(&table.name).await;
    table
        .wait_status("PROCESSED", ROWS as i64, Duration::from_secs(240))
        .await;
    let late = relay.metric(LATE_ROWS_TOTAL).await.unwrap_or(0.0);
    drop(relay);

    let c = kafka::consumer(KAFKA, &[&topic]).await;
    let got = kafka::read_events(&c, Duration::from_secs(120), ROWS).await;
    let db = table.rows().await;
    let by_event = kafka::event_ids(&got);
    assert_eq!(by_event.len(), ROWS, "every row arrived");
    for r in &db {
        let k = &by_event[&r.event_id];
        assert_eq!(k.key.as_deref(), Some(r.aggregate_id.as_str()), "key");
    }
    assert_kafka_order(&db, &got);
    println!(
        "{ROWS} rows to Kafka: {} records read, late rows {late}",
        got.len()
    );
    assert_eq!(late, 0.0, "rows committed late");
    // Close the consumer (blocking, off the async threads) before its topic is deleted:
    // a consumer still assigned to a topic being deleted crashed the test process once.
    tokio::task::spawn_blocking(move || drop(c)).await.unwrap();
    topics.delete().await;
    table.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejected_row_with_a_4kb_key_fails_alone() {
    let (table, broker) = table_and_broker("wp_long").await;
    let missing = unique("wp_missing_exchange");
    // Incompressible, so no index entry could hold it (a btree entry holds 2 704 bytes).
    let long_key: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(4096)
        .map(char::from)
        .collect();
    let (mut good, mut bad, mut held) = (Vec::new(), 0, 0);
    for i in 0..300 {
        if i == 150 {
            let h = serde_json::json!({});
            bad = table
                .insert(&long_key, "order.created", Some(&missing), h)
                .await;
            // A later row of the failing aggregate, held back (on_failed = block).
            held = insert_row(&table.pool, &table.name, &long_key)
                .await
                .unwrap();
        }
        let agg = format!("ok-{}", i % 30);
        good.push(insert_row(&table.pool, &table.name, &agg).await.unwrap());
    }
    let mut env = relay_env(&table.name, &broker.exchange);
    set(&mut env, "RELAY__MAX_ATTEMPTS", "2");
    set(&mut env, "RELAY__BACKOFF_INITIAL", "50ms");
    let relay = RelayProc::start(&env);
    table.wait_status("PROCESSED", 300, MINUTE).await;
    table.wait_status("FAILED", 1, MINUTE).await;
    let (status, attempts, err) = table.row(bad).await;
    let err = err.unwrap_or_default();
    assert_eq!((status.as_str(), attempts), ("FAILED", 2), "{err}");
    assert!(err.contains(&missing), "names the exchange: {err}");
    assert_eq!(table.row(held).await.0, "PENDING", "on_failed = block");
    let got = broker.take(300, Duration::from_secs(30)).await;
    let index = table.index().await;
    let mut ids: Vec<i64> = got.iter().map(|g| index[&g.message_id].0).collect();
    ids.sort_unstable();
    good.sort_unstable();
    assert_eq!(ids, good, "the 300 good rows, each once");
    assert_eq!(assert_order(&got, &index), 0);
    drop(relay);
    broker.cleanup_with(&table).await;
}

/// One producer inserting single rows in autocommit until `stop`:
/// (start, latency) of every insert, and the errors.
type Timings = (Vec<(Instant, Duration)>, Vec<String>);

fn spawn_timed_producer(
    table: &str,
    p: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Timings> {
    let table = table.to_string();
    tokio::spawn(async move {
        let mut conn = connect().await;
        let (mut times, mut errors) = (Vec::new(), Vec::new());
        for i in 0.. {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let agg = format!("live-{}", (p * 7 + i) % 40);
            let t0 = Instant::now();
            let r = insert_row(&mut conn, &table, &agg).await;
            times.push((t0, t0.elapsed()));
            if let Err(e) = r {
                errors.push(e.to_string());
            }
            done.fetch_add(1, Ordering::SeqCst);
        }
        (times, errors)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schema_2_upgrades_online_under_load() {
    use outbox_relay::migrate::{render, MIGRATIONS};
    let table = TestTable::unmigrated("wp_up").await;
    let broker = TestBroker::new("wp_up").await;
    let env = relay_env(&table.name, &broker.exchange);
    let name = TableName::parse(&table.name).unwrap();
    // Schema 2, recorded the way `outbox-relay migrate` records it.
    let (h, t) = (name.history(), &table.name);
    let mut sql = format!(
        "BEGIN; CREATE TABLE {h} (version BIGINT PRIMARY KEY, description TEXT NOT NULL,
                                 installed_on TIMESTAMPTZ NOT NULL DEFAULT now());"
    );
    for m in &MIGRATIONS[..2] {
        sql += &render(m.sql, &name);
        let (v, d) = (m.version, m.description);
        sql += &format!(";\nINSERT INTO {h} (version, description) VALUES ({v}, '{d}');");
    }
    // 100 000 rows relayed long ago: the upgrade's index build reads them all.
    sql += &format!(
        "INSERT INTO \"{t}\" (aggregate_type, aggregate_id, event_type, payload, status, processed_at)
         SELECT 'order', 'old-' || (g % 1000), 'order.created', '{{}}', 'PROCESSED', now()
         FROM generate_series(1, 100000) AS g; COMMIT;"
    );
    sqlx::raw_sql(&sql).execute(&table.pool).await.unwrap();

    let (code, out, err) = within("`run` on schema 2 exits", run_cmd(&env, &["run"])).await;
    assert_eq!(code, 2, "run on schema 2: {out}{err}");
    assert!(err.contains("outbox-relay migrate"), "{out}{err}");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let producers: Vec<_> = (0..4)
        .map(|p| spawn_timed_producer(&table.name, p, stop.clone(), done.clone()))
        .collect();
    let inserted = || done.load(Ordering::SeqCst);
    wait_for(MINUTE, "producers under way", || async {
        (inserted() >= 200).then_some(())
    })
    .await;
    let began = Instant::now();
    let (code, out, err) = run_cmd(&env, &["migrate"]).await;
    let ended = Instant::now();
    let before = inserted();
    wait_for(MINUTE, "inserts after the upgrade", || async {
        (inserted() >= before + 200).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let (mut worst, mut overlapping, mut errors) = (Duration::ZERO, 0, Vec::new());
    for p in producers {
        let (times, errs) = p.await.unwrap();
        for (t0, d) in times {
            if t0 < ended && t0 + d > began {
                overlapping += 1;
                worst = worst.max(d);
            }
        }
        errors.extend(errs);
    }
    assert_eq!(code, 0, "migrate: {out}{err}");
    assert!(
        out.contains("applied migrations [3, 4, 5, 6, 7, 8, 9, 10]"),
        "{out}{err}"
    );
    eprintln!(
        "schema 2 → 10 under 4 producers (100 000 rows): migrate ran {:?}; longest insert \
         during it {worst:?} ({overlapping} inserts overlapped)",
        ended - began
    );
    assert!(errors.is_empty(), "producer inserts failed: {errors:?}");
    assert!(worst < Duration::from_secs(2), "insert stalled {worst:?}");
    let sql = format!(
        "SELECT obj_description('{}'::regclass, 'pg_class')",
        name.ident()
    );
    let marker: Option<String> = scalar(&table, &sql).await;
    assert_eq!(marker.as_deref(), Some("relay schema 10"));
    // Schema 9: pages half filled, so every row of a page can be marked HOT.
    let sql = format!(
        "SELECT array_to_string(reloptions, ',') FROM pg_class WHERE oid = '{}'::regclass",
        name.ident()
    );
    let options: Option<String> = scalar(&table, &sql).await;
    assert_eq!(options.as_deref(), Some("fillfactor=50"));
    // Schema 10: the database always draws the id.
    let sql = format!(
        "SELECT attidentity::text FROM pg_attribute WHERE attrelid = '{}'::regclass AND attname = 'id'",
        name.ident()
    );
    let identity: Option<String> = scalar(&table, &sql).await;
    assert_eq!(identity.as_deref(), Some("a"), "id GENERATED ALWAYS");

    let (code, out, err) = run_cmd(&env, &["migrate"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("up to date"), "{out}{err}");
    broker.cleanup_with(&table).await;
}
