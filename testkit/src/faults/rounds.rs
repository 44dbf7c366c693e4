//! Network attacks in rounds through the `Proxy` while producers write: the loop the
//! RabbitMQ and NATS fault suites share.

use std::time::{Duration, Instant};

use crate::db::TestTable;
use crate::faults::Proxy;
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
