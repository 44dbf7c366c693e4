//! Tests of the claimer's pick: shares, room, the cursor, due retries.

use super::*;

/// A plan for tests (no partitions, nothing held).
pub(in crate::relay) fn plan(max_per_aggregate: u32, room_rows: usize) -> Plan {
    Plan {
        generation: 0,
        epoch: None,
        after: 0,
        capped: HashSet::default(),
        only: None,
        skip_type: None,
        only_type: None,
        exclude: HashSet::default(),
        retried: Vec::new(),
        counts: HashMap::default(),
        max_per_aggregate,
        room_rows,
        room_bytes: 1 << 20,
        scan_limit: 100,
        examine: 1000,
        partitions: None,
        on_failed: OnFailed::Block,
        list_writers: false,
        horizon: i64::MAX,
        ahead: None,
    }
}

fn page(rows: &[(i64, i32)]) -> ScanPage {
    ScanPage {
        rows: rows
            .iter()
            .map(|&(id, hash)| Scanned { id, hash, size: 10 })
            .collect(),
        last_examined: rows.last().map_or(0, |r| r.0),
        examined: rows.len() as u32,
        ..ScanPage::default()
    }
}

#[test]
fn a_hot_aggregate_gets_its_share_and_the_others_come_through() {
    let mut rows: Vec<(i64, i32)> = (1..=50).map(|id| (id, 1)).collect();
    rows.extend((51..=55).map(|id| (id, id as i32)));
    let sel = select(&plan(3, 100), &page(&rows));
    assert_eq!(sel.take, vec![1, 2, 3, 51, 52, 53, 54, 55]);
    assert_eq!(sel.capped, vec![1]);
    assert!(sel.end);
}

#[test]
fn rows_in_memory_count_towards_the_share_and_are_skipped() {
    let mut p = plan(3, 100);
    p.exclude = [1, 2].into_iter().collect();
    p.counts = [(1, 2)].into_iter().collect();
    p.capped = [9].into_iter().collect();
    let sel = select(&p, &page(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 9), (6, 2)]));
    assert_eq!(sel.take, vec![3, 6]);
    assert_eq!(sel.cursor, 6);
}

#[test]
fn a_full_window_stops_before_the_row_it_cannot_take() {
    let sel = select(&plan(10, 2), &page(&[(1, 1), (2, 2), (3, 3), (4, 4)]));
    assert_eq!(sel.take, vec![1, 2]);
    assert_eq!(sel.cursor, 2, "row 3 is looked at again");
    assert!(!sel.end);
}

#[test]
fn rows_left_out_by_the_database_move_the_cursor_past_them() {
    let mut p = page(&[(5, 2)]);
    p.last_examined = 900;
    p.examined = 1000;
    let sel = select(&plan(10, 10), &p);
    assert_eq!(
        (sel.take.clone(), sel.cursor, sel.end),
        (vec![5], 900, false)
    );
    p.examined = 999;
    assert!(select(&plan(10, 10), &p).end);
}

#[test]
fn due_retries_below_the_cursor_are_taken_first_and_leave_it_alone() {
    let mut p = plan(10, 2);
    p.after = 500;
    let mut pg = page(&[(600, 1), (601, 2)]);
    pg.due = vec![Scanned {
        id: 7,
        hash: 3,
        size: 10,
    }];
    let sel = select(&p, &pg);
    assert_eq!(sel.take, vec![7, 600]);
    assert_eq!(sel.cursor, 600, "the walk goes on from its own rows");
}
