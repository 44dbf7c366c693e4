//! A row whose confirm takes long does not make every claim walk the rows marked since
//! it was sent: in-process against the real Postgres, with a recording sink that holds
//! that one row's confirm while hundreds of others flow, and the engine's own `claimed`
//! trace events (where each claim's scan started) read by a layer of this test.
//! (Its own file: the layer is the process's global subscriber.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_relay_testkit::{recording::*, wait::*};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// Where each claim's scan started (`after` of the engine's `claimed` events).
#[derive(Clone, Default)]
struct Starts(Arc<Mutex<Vec<i64>>>);

impl Starts {
    fn install(&self) {
        let filter = tracing_subscriber::filter::Targets::new()
            .with_target("outbox_relay::relay::claimer", tracing::Level::TRACE);
        let subscriber = tracing_subscriber::registry().with(self.clone().with_filter(filter));
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    }

    fn all(&self) -> Vec<i64> {
        self.0.lock().unwrap().clone()
    }
}

impl<S: tracing::Subscriber> Layer<S> for Starts {
    fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct After(Option<i64>);
        impl Visit for After {
            fn record_i64(&mut self, f: &Field, v: i64) {
                if f.name() == "after" {
                    self.0 = Some(v);
                }
            }
            fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
        }
        if e.metadata().fields().field("after").is_none() {
            return;
        }
        let mut after = After(None);
        e.record(&mut after);
        if let Some(a) = after.0 {
            self.0.lock().unwrap().push(a);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_confirm_does_not_hold_where_claims_start() {
    let starts = Starts::default();
    starts.install();
    with_table("eng_held", |table| async move {
        let x = table.insert("slow", "e", None, serde_json::json!({})).await;
        let sink = RecordingSink::new(hold_if(|m, _| m.aggregate_id == "slow"));
        let mut c = cfg();
        c.lease_timeout = Duration::from_secs(30);
        c.publish_timeout = Duration::from_secs(20);
        let (relay, ledger) = start_recorded(&table, sink, c);
        ledger.wait_held(1, "row x out, its confirm held").await;
        wait_all_leases(&table, &relay.instance, Duration::from_secs(10)).await;
        // Rows after x flow in rounds; each round's claims reach the end of the table and
        // wrap. Before the change, every wrap started just below x again.
        let aggs: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
        let names: Vec<&str> = aggs.iter().map(String::as_str).collect();
        let mut seen_from = 0;
        for round in 1..=12 {
            insert_round_robin(&table, &names, 5).await;
            table
                .wait_status("PROCESSED", round * 50, Duration::from_secs(20))
                .await;
            if round == 2 {
                seen_from = starts.all().len();
            }
        }
        let later = starts.all()[seen_from..].to_vec();
        println!("claims in rounds 3-12 started at {later:?} (x = {x})");
        assert!(later.len() >= 10, "claims ran: {later:?}");
        let below: Vec<i64> = later.iter().copied().filter(|a| *a < x).collect();
        assert!(
            below.is_empty(),
            "{} of {} claims started below the held row {x}: {below:?}",
            below.len(),
            later.len()
        );
        // x still pending and out; its aggregate's next row waits behind it.
        assert_eq!(status(&table, x).await, "PENDING");
        let y = table.insert("slow", "e", None, serde_json::json!({})).await;
        assert!(ledger.release_and_wait(x, Duration::from_secs(10)).await);
        wait_for(Duration::from_secs(10), "y held after x", || {
            let held = ledger.held_by("sink").contains(&y);
            async move { held.then_some(()) }
        })
        .await;
        assert!(ledger.release_and_wait(y, Duration::from_secs(10)).await);
        table
            .wait_status("PROCESSED", 602, Duration::from_secs(20))
            .await;
        relay.stop(Duration::from_secs(5)).await;
        assert_clean(&ledger, cfg().max_in_flight as usize, &rows(&table).await);
    })
    .await;
}
