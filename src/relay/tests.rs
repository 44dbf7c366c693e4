//! The engine's bookkeeping between claims, without a database or a broker: what a claim
//! that lands after a rebalance leaves for the next claim's plan.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::aggkey::AggKey;
use super::claimer::{Claimed, Plan, Seen};
use super::{Engine, Relay, Renewal};
use crate::config::RelayConfig;
use crate::health::Health;
use crate::model::{Message, OutboxRow};
use crate::sink::{Confirm, Sink, SinkError};
use crate::store::{ClaimedRow, Store, PARTITIONS};
use crate::table::TableName;

/// A broker that is never reached (these tests send nothing).
struct Unreached;

impl Sink for Unreached {
    async fn connect(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn send(&mut self, _: &Message) -> Result<Confirm, SinkError> {
        Err(SinkError::Unavailable("not in this test".into()))
    }
    async fn dead_letter(&mut self, _: &Message, _: &str) -> Result<Option<Confirm>, SinkError> {
        Ok(None)
    }
    fn is_connected(&self) -> bool {
        true
    }
    async fn close(&mut self) {}
}

/// A broker that takes every message and never confirms.
struct Silent(usize);

impl Sink for Silent {
    async fn connect(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn send(&mut self, _: &Message) -> Result<Confirm, SinkError> {
        self.0 += 1;
        Ok(Box::pin(std::future::pending()))
    }
    async fn dead_letter(&mut self, _: &Message, _: &str) -> Result<Option<Confirm>, SinkError> {
        Ok(None)
    }
    fn is_connected(&self) -> bool {
        true
    }
    async fn close(&mut self) {}
}

/// An engine on a pool that never connects (nothing here runs a statement).
fn engine() -> Engine<Unreached> {
    engine_with(Unreached)
}

fn engine_with<S: Sink>(sink: S) -> Engine<S> {
    let opts = crate::store::connect_options("postgres://nobody@127.0.0.1:1/none").unwrap();
    let pool = crate::store::pool_options(1).connect_lazy_with(opts);
    let store = Store::from_pool(pool, TableName::parse("outbox").unwrap());
    let cfg: RelayConfig = serde_json::from_value(serde_json::json!({})).unwrap();
    let health = Arc::new(Health::new(Duration::from_secs(60)));
    let relay = Relay::new(store, sink, cfg, "t".into(), Default::default(), health);
    Engine::new(relay)
}

fn renewed<S: Sink>(e: &mut Engine<S>, live: i64) {
    let all: Vec<i32> = (0..PARTITIONS).collect();
    e.on_renewed(Ok(Ok(Renewal::at_once(live, all))));
}

/// Row `id` of aggregate `agg`, whose hash lands it in partition `hash`.
fn row(id: i64, agg: &str, hash: i32) -> ClaimedRow {
    ClaimedRow {
        row: OutboxRow {
            id,
            event_id: uuid::Uuid::new_v4(),
            aggregate_type: "order".into(),
            aggregate_id: agg.into(),
            event_type: "e".into(),
            destination: Some("q".into()),
            routing_key: None,
            payload: "{}".into(),
            headers: "{}".into(),
            attempts: 0,
            created_at: Some(chrono::Utc::now()),
            flaw: None,
        },
        hash,
    }
}

/// The result of the claim planned as `plan`: `rows`, the sweep going on after the last.
fn landed(plan: &Plan, rows: Vec<ClaimedRow>) -> Claimed {
    let cursor = rows.last().map_or(plan.after, |r| r.row.id);
    Claimed {
        refill: false,
        generation: plan.generation,
        rows,
        cursor,
        end: false,
        capped: Vec::new(),
        passed: Vec::new(),
        seen: Seen {
            after: plan.after,
            probe: None,
            fresh: crate::store::Fresh {
                ids: vec![1],
                more: false,
            },
            reach: cursor,
            floor: None,
        },
        ahead: None,
    }
}

fn skipping(plan: &Plan) -> bool {
    plan.examine > plan.scan_limit
}

/// Half the partitions are handed back (a second relay joined) while a claim planned
/// over all of them runs: its rows of those partitions are left to their new holder,
/// without capping their aggregates — a cap makes every later scan of the sweep a
/// skipping one (examining up to 100 000 rows: 4.5 k instead of 45 k rows/s in a drain).
#[tokio::test]
async fn rows_of_partitions_let_go_while_a_claim_ran_cap_nothing() {
    let mut e = engine();
    renewed(&mut e, 1);
    let plan = e.next_plan(Instant::now()).unwrap();
    assert!(!skipping(&plan) && plan.partitions.is_none(), "{plan:?}");
    renewed(&mut e, 2); // the fair share is half now: the upper half is let go
    let kept: Vec<i32> = (0..PARTITIONS / 2).collect();
    assert_eq!(e.leases.held(), kept.as_slice());
    let rows = vec![
        row(1, "a", 5),
        row(2, "b", 200),
        row(3, "c", 6),
        row(4, "d", 201),
    ];
    e.on_claimed(Ok(Ok(landed(&plan, rows))));
    let mut ids: Vec<i64> = e.window.ids().copied().collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        vec![1, 3],
        "the rows of partitions still held are kept"
    );
    let next = e.next_plan(Instant::now()).unwrap();
    assert!(
        !skipping(&next) && next.only.is_none(),
        "the next claim refills or skips aggregates of partitions let go: {next:?}"
    );
    assert_eq!(next.partitions.as_deref(), Some(kept.as_slice()));
}

/// The contrast that gives the test above its teeth: an aggregate of a partition still
/// held, dropped from memory while the claim ran, is capped — refilled by a claim of its
/// own, and skipped by the sweep's scans after that.
#[tokio::test]
async fn an_aggregate_dropped_while_its_claim_ran_is_refilled_then_skipped() {
    let mut e = engine();
    renewed(&mut e, 1);
    let plan = e.next_plan(Instant::now()).unwrap();
    e.dropped.insert(AggKey::new("order", "a"));
    let rows = vec![row(1, "a", 5), row(3, "c", 6)];
    e.on_claimed(Ok(Ok(landed(&plan, rows))));
    let ids: Vec<i64> = e.window.ids().copied().collect();
    assert_eq!(ids, vec![3]);
    let refill = e.next_plan(Instant::now()).unwrap();
    assert_eq!(refill.only, Some(vec![5]), "{refill:?}");
    e.on_claimed(Ok(Ok(Claimed {
        refill: true,
        ..landed(&refill, Vec::new())
    })));
    let next = e.next_plan(Instant::now()).unwrap();
    assert!(skipping(&next) && next.only.is_none(), "{next:?}");
    assert!(next.capped.contains(&5), "{:?}", next.capped);
}

/// A turn of the loop sends at most `TURN_SENDS` messages and says heads are left, so a
/// claim that finished meanwhile is taken in before the rest go; the next turns send
/// them all.
#[tokio::test]
async fn a_turn_sends_a_bounded_part_of_the_window_and_the_next_turns_the_rest() {
    let mut e = engine_with(Silent(0));
    renewed(&mut e, 1);
    let plan = e.next_plan(Instant::now()).unwrap();
    let total = super::dispatch::TURN_SENDS * 3 + 5;
    let rows = (1..=total as i64)
        .map(|id| row(id, &format!("a{id}"), (id % 256) as i32))
        .collect();
    e.on_claimed(Ok(Ok(landed(&plan, rows))));
    e.dispatch().await;
    assert_eq!(e.sink.0, super::dispatch::TURN_SENDS);
    assert!(e.sends_left);
    let mut turns = 1;
    while e.sends_left {
        e.dispatch().await;
        turns += 1;
    }
    assert_eq!((e.sink.0, e.flights.len(), turns), (total, total, 4));
    e.dispatch().await;
    assert_eq!(e.sink.0, total, "nothing left to send");
}

/// Rows 1..=`n` of type `bulk` over 100 aggregates, each with `payload`.
fn bulk(n: i64, payload: &str) -> Vec<ClaimedRow> {
    (1..=n)
        .map(|id| {
            let mut r = row(id, &format!("b{}", id % 100), (id % 256) as i32);
            r.row.aggregate_type = "bulk".into();
            r.row.payload = payload.into();
            r
        })
        .collect()
}

/// A burst of one `aggregate_type` fills the window while the sweep has more to read:
/// after `DOMINANT_FOR` a probe looks behind it; when it finds other types, the sweep
/// claims pass over the type and every other claim refills it from the low water mark.
#[tokio::test]
async fn a_type_s_burst_is_probed_then_passed_over_and_refilled_every_other_claim() {
    let mut e = engine();
    renewed(&mut e, 1);
    let t0 = Instant::now();
    let plan = e.next_plan(t0).unwrap();
    assert_eq!(
        (plan.skip_type.as_deref(), plan.only_type.as_deref()),
        (None, None)
    );
    // Over half the window (twice `max_in_flight`).
    let rows = bulk(1200, "{}");
    e.on_claimed(Ok(Ok(landed(&plan, rows))));
    let t1 = t0 + Duration::from_millis(200);
    let next = e.next_plan(t1).unwrap();
    assert!(
        next.skip_type.is_none() && e.tenants.probe.is_none(),
        "not yet: {next:?}"
    );
    let later = t1 + super::tenants::DOMINANT_FOR;
    let next = e.next_plan(later).unwrap();
    assert!(next.skip_type.is_none(), "{next:?}");
    assert!(e.tenants.probe.is_some(), "a probe looks behind the burst");
    // The probe found rows of other types.
    e.tenants.probe = None;
    e.on_tenant_probed(Ok(("bulk".into(), Ok(true))));
    let sweep = e.next_plan(later).unwrap();
    assert_eq!(sweep.skip_type.as_deref(), Some("bulk"), "{sweep:?}");
    assert!(!sweep.is_refill() && skipping(&sweep), "{sweep:?}");
    e.on_claimed(Ok(Ok(landed(&sweep, vec![row(1300, "o1", 9)]))));
    let refill = e.next_plan(later).unwrap();
    assert_eq!(refill.only_type.as_deref(), Some("bulk"), "{refill:?}");
    assert!(refill.is_refill() && refill.skip_type.is_none() && skipping(&refill));
    e.on_claimed(Ok(Ok(Claimed {
        refill: true,
        ..landed(&refill, Vec::new())
    })));
    let next = e.next_plan(later).unwrap();
    assert_eq!(next.skip_type.as_deref(), Some("bulk"), "{next:?}");
    assert!(!next.is_refill());
}

/// A probe that finds the type alone leaves it alone (no scan passes over it).
#[tokio::test]
async fn a_type_found_alone_is_not_passed_over() {
    let mut e = engine();
    renewed(&mut e, 1);
    let t0 = Instant::now();
    e.on_tenant_probed(Ok(("bulk".into(), Ok(false))));
    assert!(!e.sweep.may_probe("bulk", t0));
    let plan = e.next_plan(t0).unwrap();
    assert!(plan.skip_type.is_none() && plan.only_type.is_none());
    assert_eq!(e.sweep.tenant(), None);
}

/// A window half full in bytes (large payloads, few rows) counts as half full too.
#[tokio::test]
async fn a_burst_of_large_rows_is_probed_too() {
    let mut e = engine();
    renewed(&mut e, 1);
    let t0 = Instant::now();
    let plan = e.next_plan(t0).unwrap();
    let payload = format!("{{\"pad\": \"{}\"}}", "x".repeat(20_000));
    let rows = bulk(900, &payload);
    e.on_claimed(Ok(Ok(landed(&plan, rows))));
    assert!(e.window.rows() * 2 < e.max_rows, "under half the rows");
    let t1 = t0 + Duration::from_millis(200);
    e.next_plan(t1);
    e.next_plan(t1 + super::tenants::DOMINANT_FOR);
    assert!(e.tenants.probe.is_some(), "over half the bytes: probed");
}
