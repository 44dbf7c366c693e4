//! `outbox-relay demo`: the newcomer's tour. Migrate, write sample order events the way
//! an order service would (business row + outbox row in one transaction, 8 concurrent
//! producers), relay them with the real relay loop, read them back from the broker, and
//! print what arrived and how fast.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::{Settings, SinkKind};
use crate::health::Health;
use crate::relay::Relay;
use crate::sink::{Arrival, Sink};
use crate::store::Store;
use crate::wiring::{build_sink, instance_id, AnySink, AppError};

const PRODUCERS: u32 = 8;
const ORDERS: u32 = 50;
const STEPS: [&str; 4] = [
    "order.created",
    "order.paid",
    "order.packed",
    "order.shipped",
];

/// One event as the producer committed it.
struct Committed {
    id: i64,
    aggregate_id: String,
    committed_at: Instant,
}

pub async fn run(settings: &Settings, events: u32, force: bool) -> Result<(), AppError> {
    super::migrate(settings).await?;
    let store = Store::connect(&settings.database, settings.table()?).await?;
    if !force {
        refuse_a_live_outbox(&store).await?;
    }
    let business = store.table().derived("_demo_orders");
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS {business} (order_id TEXT PRIMARY KEY, status TEXT NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    ))
    .execute(store.pool())
    .await
    .map_err(crate::store::StoreError::from)?;

    let cancel = CancellationToken::new();
    let mut sink = build_sink(settings)?;
    let mut tap = match settings.sink.kind {
        SinkKind::Rabbitmq => {
            sink.connect().await?;
            let tap = crate::sink::rabbitmq::tap::Tap::bind(
                &settings.rabbitmq.url,
                &settings.rabbitmq.exchange,
                "order.#",
            )
            .await?;
            println!(
                "consuming from queue {} bound to exchange {:?} with order.#",
                tap.queue, settings.rabbitmq.exchange
            );
            DemoTap::Rabbit(tap)
        }
        SinkKind::Kafka => DemoTap::Kafka(crate::sink::kafka::tap_for_demo(&settings.kafka).await?),
        SinkKind::Nats => {
            let subjects: Vec<String> = STEPS
                .iter()
                .map(|step| {
                    crate::sink::nats::wire::subject_from_template(
                        &settings.nats.subject,
                        "order",
                        step,
                    )
                })
                .collect();
            let tap = crate::sink::nats::tap::tap_for_demo(&settings.nats, &subjects).await?;
            println!("reading back from JetStream: {}", subjects.join(", "));
            DemoTap::Nats(tap)
        }
        SinkKind::Redis => {
            let r = &settings.redis;
            let key = crate::sink::redis::wire::key_from_template(&r.key, "order");
            let tap = crate::sink::redis::tap::Tap::open(&r.url, r.mode, &key).await?;
            println!("reading {} {key:?} ({})", r.mode, r.url);
            DemoTap::Redis(tap)
        }
        SinkKind::Sqs => DemoTap::Aws(crate::sink::aws::tap::DemoTap::sqs(&settings.sqs).await?),
        SinkKind::Sns => DemoTap::Aws(crate::sink::aws::tap::DemoTap::sns(&settings.sns).await?),
    };
    let relay = spawn_relay(&store, sink, settings, &cancel);

    // Read while the producers write, so arrival times are real (not when we got round
    // to reading them).
    let (arrivals_tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<(Arrival, Instant)>();
    let reader = tokio::spawn(async move {
        while !arrivals_tx.is_closed() {
            if let Some(a) = tap.next(Duration::from_millis(200)).await {
                if arrivals_tx.send((a, Instant::now())).is_err() {
                    break;
                }
            }
        }
        tap
    });
    let started = Instant::now();
    let committed = produce(&store, &business, events).await?;
    let produce_secs = started.elapsed().as_secs_f64();
    println!(
        "wrote {} outbox rows in {} transactions from {PRODUCERS} producers in {produce_secs:.2}s",
        committed.len(),
        committed.len()
    );

    let mut arrived: HashMap<String, (Instant, String)> = HashMap::new();
    let mut order_ok = true;
    let mut last_seen: HashMap<String, i64> = HashMap::new();
    let mut sample: Option<String> = None;
    let mut last_arrival = started;
    let deadline = Instant::now() + Duration::from_secs(90);
    while arrived.len() < committed.len() && Instant::now() < deadline {
        let Ok(Some((a, at))) = tokio::time::timeout(Duration::from_secs(1), arrivals.recv()).await
        else {
            continue;
        };
        let Some(c) = committed.get(&a.event_id) else {
            continue;
        };
        if arrived.contains_key(&a.event_id) {
            continue;
        }
        let prev = last_seen.insert(c.aggregate_id.clone(), c.id).unwrap_or(0);
        order_ok &= prev < c.id;
        sample.get_or_insert(a.summary.clone());
        last_arrival = last_arrival.max(at);
        arrived.insert(a.event_id, (at, a.aggregate_id));
    }
    let total_elapsed = last_arrival.saturating_duration_since(started);
    drop(arrivals);
    // Close the reader's and the relay's broker connections while the runtime runs.
    if let Ok(Ok(tap)) = tokio::time::timeout(Duration::from_secs(2), reader).await {
        tap.close().await;
    }
    cancel.cancel();
    let _ = tokio::time::timeout(settings.relay.shutdown_timeout, relay).await;

    let total = total_elapsed.as_secs_f64().max(1e-3);
    let mut latencies: Vec<Duration> = arrived
        .iter()
        .filter_map(|(eid, (at, _))| {
            committed
                .get(eid)
                .map(|c| at.saturating_duration_since(c.committed_at))
        })
        .collect();
    latencies.sort();
    let pct = |p: f64| -> f64 {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!();
    if let Some(s) = sample {
        println!("first message that arrived:\n{s}\n");
    }
    println!(
        "arrived: {}/{} events over {ORDERS} orders",
        arrived.len(),
        committed.len()
    );
    println!(
        "per-order order kept: {}",
        if order_ok { "yes" } else { "NO" }
    );
    println!(
        "throughput: {:.0} events/s end to end ({total:.2}s from first commit to last arrival)",
        arrived.len() as f64 / total
    );
    println!(
        "latency commit → arrival: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    let backlog = store.backlog().await?;
    store.pool().close().await;
    println!(
        "outbox now: PENDING {} PROCESSED {} FAILED {}",
        backlog.pending, backlog.processed, backlog.failed
    );
    if arrived.len() < committed.len() || !order_ok {
        return Err(AppError::Runtime(format!(
            "demo incomplete: {} of {} events arrived (order kept: {order_ok})",
            arrived.len(),
            committed.len()
        )));
    }
    Ok(())
}

/// The header every demo event carries; rows without it were written by someone else.
const DEMO_SOURCE: &str = "outbox-relay-demo";

/// Refuse to write sample `order.*` events into an outbox that holds rows the demo did
/// not write: pointed at a production config, they would reach the live broker.
async fn refuse_a_live_outbox(store: &Store) -> Result<(), AppError> {
    let foreign: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT id FROM {} WHERE headers->>'source' IS DISTINCT FROM $1 LIMIT 1",
        store.table().ident()
    ))
    .bind(DEMO_SOURCE)
    .fetch_optional(store.pool())
    .await
    .map_err(crate::store::StoreError::from)?;
    match foreign {
        None => Ok(()),
        Some(id) => Err(AppError::Usage(format!(
            "table {} holds rows the demo did not write (e.g. id {id}): the demo would add \
             sample order.* events to it and relay them to the configured broker. Point \
             database.table at a scratch table, or pass --force",
            store.table()
        ))),
    }
}

fn spawn_relay(
    store: &Store,
    sink: AnySink,
    settings: &Settings,
    cancel: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let health = Arc::new(Health::new(Duration::from_secs(3600)));
    let mut cfg = settings.relay.clone();
    cfg.poll_interval = cfg.poll_interval.min(Duration::from_millis(100));
    let relay = Relay::new(
        store.clone(),
        sink,
        cfg,
        instance_id(),
        Default::default(),
        health,
    );
    tokio::spawn(relay.run(cancel.clone()))
}

/// Write `events` events as an order service would: each in its own transaction with its
/// business row. Returns what was committed, by event_id.
async fn produce(
    store: &Store,
    business: &str,
    events: u32,
) -> Result<HashMap<String, Committed>, AppError> {
    let outbox = store.table().ident();
    let run_tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let pool = store.pool().clone();
        let (outbox, business, run_tag) = (outbox.clone(), business.to_string(), run_tag.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            // Producer p owns the orders ≡ p (mod PRODUCERS): one writer per order, so
            // each order's events commit in id order, as with a locked business row.
            let mine: Vec<u32> = (0..ORDERS).filter(|o| o % PRODUCERS == p).collect();
            let my_events = (0..events).filter(|e| e % PRODUCERS == p).count();
            for n in 0..my_events {
                let order = mine[n % mine.len()];
                let step = STEPS[(n / mine.len()) % STEPS.len()];
                let order_id = format!("demo-{run_tag}-{order}");
                let mut tx = pool.begin().await?;
                sqlx::query(&format!(
                    "INSERT INTO {business} (order_id, status) VALUES ($1, $2)
                     ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status, updated_at = now()"
                ))
                .bind(&order_id)
                .bind(step)
                .execute(&mut *tx)
                .await?;
                let (id, event_id): (i64, uuid::Uuid) = sqlx::query_as(&format!(
                    "INSERT INTO {outbox} (aggregate_type, aggregate_id, event_type, payload, headers)
                     VALUES ('order', $1, $2, $3, $4) RETURNING id, event_id"
                ))
                .bind(&order_id)
                .bind(step)
                .bind(serde_json::json!({"orderId": order_id, "step": step, "total": 59.98, "seq": n}))
                .bind(serde_json::json!({"traceparent": format!("00-{:032x}-{:016x}-01", rand::random::<u128>(), rand::random::<u64>()), "source": DEMO_SOURCE}))
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                out.push((event_id.to_string(), Committed { id, aggregate_id: order_id, committed_at: Instant::now() }));
            }
            Ok::<_, sqlx::Error>(out)
        }));
    }
    let mut all = HashMap::new();
    for t in tasks {
        let rows = t
            .await
            .map_err(|e| AppError::Runtime(e.to_string()))?
            .map_err(crate::store::StoreError::from)?;
        all.extend(rows);
    }
    Ok(all)
}

/// The demo's reader, per broker (one per run: variant sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum DemoTap {
    Rabbit(crate::sink::rabbitmq::tap::Tap),
    Kafka(crate::sink::kafka::DemoTap),
    Nats(crate::sink::nats::tap::DemoTap),
    Redis(crate::sink::redis::tap::Tap),
    Aws(crate::sink::aws::tap::DemoTap),
}

impl DemoTap {
    /// Close the reader's broker connection (inside the runtime).
    async fn close(self) {
        match self {
            DemoTap::Rabbit(t) => t.close().await,
            DemoTap::Kafka(t) => t.close().await,
            DemoTap::Nats(t) => t.close().await,
            DemoTap::Redis(t) => drop(t),
            DemoTap::Aws(t) => t.close().await,
        }
    }

    async fn next(&mut self, timeout: Duration) -> Option<Arrival> {
        match self {
            DemoTap::Rabbit(t) => {
                let r = t.next(timeout).await?;
                let header = |k: &str| {
                    r.headers
                        .iter()
                        .find(|(n, _)| n == k)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                Some(Arrival {
                    event_id: r.message_id.clone().unwrap_or_default(),
                    aggregate_id: header("aggregate_id"),
                    summary: format!(
                        "  routing key  {}\n  message_id   {}\n  type         {}\n  content_type {}\n  headers      {:?}\n  body         {}",
                        r.routing_key,
                        r.message_id.unwrap_or_default(),
                        r.kind.unwrap_or_default(),
                        r.content_type.unwrap_or_default(),
                        r.headers,
                        String::from_utf8_lossy(&r.body)
                    ),
                })
            }
            DemoTap::Kafka(t) => t.next(timeout).await,
            DemoTap::Nats(t) => t.next(timeout).await,
            DemoTap::Redis(t) => t.next(timeout).await.map(|r| r.arrival()),
            DemoTap::Aws(t) => t.next(timeout).await,
        }
    }
}
