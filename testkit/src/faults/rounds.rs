//! Network attacks in rounds through the `Proxy` while producers write: the loop the
//! RabbitMQ and NATS fault suites share, and the scenario around it (`attack_through_proxy`).

use std::time::{Duration, Instant};

use crate::db::TestTable;
use crate::faults::{Producer, Proxy};
use crate::relay_proc::{wait_broker_up, RelayProc};

/// Three rounds of freezing (`cut = false`: sockets stay open, the relay must notice the
/// stall through its publish timeout, report the broker down, stay live and spend no
/// attempt) or cutting (`cut = true`: every connection closed) the relay's path through
/// `proxy`; after each, relaying must make progress again.
pub async fn proxy_rounds(
    proxy: &Proxy,
    relay: &RelayProc,
    table: &TestTable,
    attack: &str,
    cut: bool,
) {
    for round in 0..3 {
        let t0 = Instant::now();
        if cut {
            proxy.drop_all();
        } else {
            proxy.freeze();
            wait_broker_up(relay, false, Duration::from_secs(30)).await;
            assert_eq!(relay.get("/livez").await.map(|r| r.0), Some(200));
            table.assert_no_attempts("a stall spends no attempt").await;
            proxy.thaw();
        }
        let before = table.count("PROCESSED").await;
        // Progress after the round.
        table
            .wait_processed_over(before + 100, Duration::from_secs(60))
            .await;
        println!("{attack} round {round}: recovered in {:?}", t0.elapsed());
    }
}

/// A proxy attack up to its end: the relay started with `env` (whose broker URL points at
/// `proxy`) plus a 2 s publish timeout, 3,000 rows up front over 40 aggregates, producers
/// writing on (40 aggregates, 2 writers, 3 ms apart), more than 300 rows relayed within
/// 30 s; then `proxy_rounds`. Returns the relay and the producers, still writing.
pub async fn attack_through_proxy(
    proxy: &Proxy,
    table: &TestTable,
    mut env: Vec<(String, String)>,
    attack: &str,
    cut: bool,
) -> (RelayProc, Producer) {
    env.push(("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT".into(), "2s".into()));
    let relay = RelayProc::start(&env);
    table.produce(3_000, 40, 4).await;
    let producer = Producer::start(&table.pool, &table.name, 40, 2, Duration::from_millis(3));
    table
        .wait_processed_over(300, Duration::from_secs(30))
        .await;
    proxy_rounds(proxy, &relay, table, attack, cut).await;
    (relay, producer)
}
