//! The one per-aggregate order check: within each aggregate, the *first* delivery of
//! each event comes in `id` order (duplicates, at-least-once, are counted, not judged),
//! and, where the transport has partitions, all of an aggregate's events share one.

use std::collections::{HashMap, HashSet};

use crate::db::DbRow;
use crate::kafka::Received;
use crate::rabbit::Got;

/// One delivery in arrival order: its event (message) id, the row it is, if known
/// (`(id, aggregate)`; an unknown one is skipped), and its partition, if any.
pub struct Delivery<'a> {
    pub event: &'a str,
    pub row: Option<(i64, &'a str)>,
    pub partition: Option<i32>,
}

/// What the check found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OrderReport {
    /// Deliveries beyond the first of each event.
    pub duplicates: usize,
    /// First deliveries out of `id` order, or an aggregate spread over partitions.
    pub violations: Vec<String>,
}

impl OrderReport {
    /// Panic listing the violations (prefixed with `what`); the duplicate count.
    pub fn assert_clean(&self, what: &str) -> usize {
        assert!(
            self.violations.is_empty(),
            "{what}{} order violation(s):\n{}",
            self.violations.len(),
            self.violations.join("\n")
        );
        self.duplicates
    }
}

/// Check `deliveries` (in arrival order).
pub fn check<'a>(deliveries: impl IntoIterator<Item = Delivery<'a>>) -> OrderReport {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut newest: HashMap<&str, (i64, Option<i32>)> = HashMap::new();
    let mut report = OrderReport::default();
    for d in deliveries {
        if !seen.insert(d.event) {
            report.duplicates += 1;
            continue;
        }
        let Some((id, agg)) = d.row else { continue };
        match newest.get_mut(agg) {
            None => {
                newest.insert(agg, (id, d.partition));
            }
            Some((prev, _)) if id < *prev => report.violations.push(format!(
                "aggregate {agg}: row {id} first delivered after row {prev}"
            )),
            Some((prev, partition)) => {
                *prev = id;
                if *partition != d.partition {
                    report.violations.push(format!(
                        "aggregate {agg} spread over partitions ({partition:?} and {:?})",
                        d.partition
                    ));
                }
            }
        }
    }
    report
}

/// RabbitMQ deliveries against the table's `index` (event_id → (id, aggregate)); an
/// unknown message id panics.
pub fn check_got(got: &[Got], index: &HashMap<String, (i64, String)>) -> OrderReport {
    check(got.iter().map(|g| {
        let (id, agg) = index
            .get(&g.message_id)
            .unwrap_or_else(|| panic!("unknown message_id {}", g.message_id));
        Delivery {
            event: &g.message_id,
            row: Some((*id, agg.as_str())),
            partition: None,
        }
    }))
}

/// Assert the order of RabbitMQ deliveries; returns the number of duplicates.
pub fn assert_order(got: &[Got], index: &HashMap<String, (i64, String)>) -> usize {
    check_got(got, index).assert_clean("")
}

/// Assert the order of Kafka records against the table's rows: read in log order per
/// partition, first arrivals in `id` order, one partition per aggregate. Records of
/// other tables are skipped.
pub fn assert_kafka_order(db: &[DbRow], got: &[Received]) {
    let id_of: HashMap<&str, (i64, &str)> = db
        .iter()
        .map(|r| (r.event_id.as_str(), (r.id, r.aggregate_id.as_str())))
        .collect();
    let mut sorted: Vec<&Received> = got.iter().collect();
    sorted.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    check(sorted.into_iter().map(|r| {
        let event = r.header("event_id").expect("event_id header");
        Delivery {
            event,
            row: id_of.get(event).copied(),
            partition: Some(r.partition),
        }
    }))
    .assert_clean("");
}
