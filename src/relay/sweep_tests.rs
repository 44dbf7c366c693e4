//! Tests of the sweep's state between claims: caps, the horizon, the low water mark,
//! the type passed over.

use super::*;
use crate::relay::horizon::tests::quiet;
use crate::store::Probe;
use crate::store::{Floor, Fresh};

#[test]
fn the_sweep_caps_until_it_wraps_and_refills_what_runs_low() {
    let mut s = Sweep::default();
    prime(&mut s, 1000);
    s.observe(s.generation(), &snap(quiet(1000)), none);
    assert!(s.refill(&HashMap::default(), 4).is_empty());
    assert_eq!(s.plan(false), (0, HashSet::default()));
    let g = s.generation();
    s.advance(g, 40, false, 1, &[7], Instant::now());
    assert!(s.more);
    assert!(
        s.refill(&[(7, 2)].into_iter().collect(), 4).is_empty(),
        "half its share held"
    );
    assert_eq!(s.refill(&[(7, 1)].into_iter().collect(), 4), vec![7]);
    assert_eq!(s.plan(true).0, 0);
    assert!(
        s.refill(&HashMap::default(), 4).is_empty(),
        "one refill at a time"
    );
    assert_eq!(s.plan(false), (40, [7].into_iter().collect()));
    s.advance(g, 90, false, 1, &[8], Instant::now());
    s.restart();
    s.advance(g, 120, false, 1, &[], Instant::now());
    assert_eq!(
        s.plan(false),
        (0, HashSet::default()),
        "a stale claim moves nothing"
    );
    s.advance(s.generation(), 90, true, 1, &[], Instant::now());
    assert_eq!(s.plan(false), (0, HashSet::default()));
}

/// Nothing held.
fn none(_: i64) -> bool {
    false
}

/// The first ids with no retry schedule a scan examined (all of them).
fn fresh(ids: &[i64]) -> Fresh {
    Fresh {
        ids: ids.to_vec(),
        more: false,
    }
}

/// A scan that started above the mark (says nothing about it).
fn snap(p: Probe) -> Seen {
    Seen {
        after: i64::MAX,
        probe: Some(p),
        ..Seen::default()
    }
}

/// Make `top` the horizon for the next statement (a probe with no writer listed).
fn prime(s: &mut Sweep, top: i64) {
    s.observe(s.generation(), &snap(quiet(top)), none);
}

#[test]
fn a_type_is_passed_over_until_the_sweep_wraps_and_not_probed_again_while_alone() {
    let mut s = Sweep::default();
    prime(&mut s, 1000);
    let t0 = Instant::now();
    let g = s.generation();
    assert!(s.may_probe("bulk", t0));
    assert!(s.cap_tenant("bulk"));
    assert!(!s.cap_tenant("orders"), "one type at a time");
    assert!(
        !s.may_probe("orders", t0),
        "no probe while one is passed over"
    );
    assert_eq!(s.tenant(), Some("bulk"));
    assert_eq!(s.refill_tenant(), None, "the sweep's claim first");
    s.plan(false);
    assert_eq!(s.refill_tenant().as_deref(), Some("bulk"));
    s.plan(true);
    assert_eq!(s.refill_tenant(), None, "every other claim");
    s.plan(false);
    // The sweep took rows of other types, then wrapped: not alone.
    s.advance(g, 400, false, 5, &[], t0);
    s.advance(g, 900, true, 0, &[], t0);
    assert_eq!(s.tenant(), None, "a wrap ends it");
    assert!(
        s.may_probe("bulk", t0),
        "others were behind it: may be probed again"
    );
    // A whole sweep passing over it took nothing: alone for SOLO_FOR.
    assert!(s.cap_tenant("bulk"));
    s.advance(g, 900, true, 0, &[], t0);
    assert_eq!(s.tenant(), None);
    assert!(
        !s.may_probe("bulk", t0 + SOLO_FOR / 2),
        "alone a moment ago"
    );
    assert!(s.may_probe("orders", t0), "another type may be");
    assert!(s.may_probe("bulk", t0 + SOLO_FOR));
    // Alone again: twice as long, up to SOLO_MAX.
    let t1 = t0 + SOLO_FOR;
    s.alone("bulk", t1);
    assert!(!s.may_probe("bulk", t1 + SOLO_FOR));
    assert!(s.may_probe("bulk", t1 + SOLO_FOR * 2));
    for _ in 0..10 {
        s.alone("bulk", t1);
    }
    assert!(s.may_probe("bulk", t1 + SOLO_MAX));
    s.cap_tenant("bulk");
    s.restart();
    assert_eq!(s.tenant(), None, "a restart ends it");
    assert!(
        s.may_probe("bulk", t1),
        "others were found: the period starts over"
    );
    assert!(!s.may_probe(&"t".repeat(MAX_TENANT_BYTES + 1), t0));
}

#[test]
fn the_cursor_stops_at_the_horizon() {
    let mut s = Sweep::default();
    prime(&mut s, 100);
    s.observe(s.generation(), &snap(quiet(100)), none);
    let g = s.generation();
    s.advance(g, 250, false, 3, &[4], Instant::now());
    assert_eq!(
        s.plan(false),
        (100, [4].into_iter().collect()),
        "rows above 100 looked at again"
    );
    assert!(s.more, "it took rows: claim again");
    s.advance(g, 250, false, 0, &[], Instant::now());
    assert!(!s.more, "held back and nothing taken: wait for the tick");
    prime(&mut s, 300);
    s.observe(s.generation(), &snap(quiet(300)), none);
    s.advance(g, 250, false, 0, &[], Instant::now());
    assert_eq!(s.plan(false).0, 250);
    assert!(s.more);
}

#[test]
fn a_wrap_starts_at_the_low_water_mark() {
    let mut s = Sweep::default();
    let g = s.generation();
    let floor = |floor, epoch| Some(Floor { floor, epoch });
    // Stored floor 10; the scan from 0 found pending rows from 40; nothing running.
    prime(&mut s, 100);
    s.observe(
        g,
        &Seen {
            after: 0,
            probe: Some(quiet(100)),
            fresh: fresh(&[40]),
            reach: i64::MAX,
            floor: floor(10, 0),
        },
        none,
    );
    assert_eq!(s.plan(true).0, 39, "a refill starts at the mark");
    s.advance(g, 90, true, 1, &[], Instant::now());
    assert_eq!(s.plan(false).0, 39, "so does a wrap");
    // A scan from the mark that found nothing: the mark goes to the horizon, no
    // further (ids above 200 may still commit).
    prime(&mut s, 200);
    s.observe(
        g,
        &Seen {
            after: 39,
            probe: Some(quiet(200)),
            fresh: fresh(&[]),
            reach: i64::MAX,
            floor: floor(10, 0),
        },
        none,
    );
    assert_eq!(s.plan(true).0, 200);
    // A scan that started above the mark says nothing about it.
    prime(&mut s, 900);
    s.observe(
        g,
        &Seen {
            after: 300,
            probe: Some(quiet(900)),
            fresh: fresh(&[800]),
            reach: i64::MAX,
            floor: floor(10, 0),
        },
        none,
    );
    assert_eq!(s.plan(true).0, 200);
    // The floor was lowered (rows re-opened): the mark follows it down, whatever
    // the scan that brought the news found.
    prime(&mut s, 900);
    s.observe(
        g,
        &Seen {
            after: 200,
            probe: Some(quiet(900)),
            fresh: fresh(&[850]),
            reach: i64::MAX,
            floor: floor(5, 1),
        },
        none,
    );
    assert_eq!(s.plan(true).0, 5);
    assert_eq!(
        s.plan(false),
        (5, HashSet::default()),
        "the sweep starts over there"
    );
    assert_ne!(s.generation(), g, "claims planned before it move nothing");
    let g = s.generation();
    // A raised floor lifts the mark; a restart goes back to the stored floor.
    s.observe(
        g,
        &Seen {
            after: 900,
            probe: None,
            fresh: fresh(&[]),
            reach: i64::MAX,
            floor: floor(60, 1),
        },
        none,
    );
    assert_eq!(s.plan(true).0, 60);
    prime(&mut s, 900);
    s.observe(
        g,
        &Seen {
            after: 60,
            probe: Some(quiet(900)),
            fresh: fresh(&[700]),
            reach: i64::MAX,
            floor: floor(60, 1),
        },
        none,
    );
    assert_eq!(s.plan(true).0, 699);
    s.restart();
    assert_eq!(s.plan(false).0, 60);
    // A scan planned before the restart is ignored.
    prime(&mut s, 900);
    s.observe(
        g,
        &Seen {
            after: 0,
            probe: Some(quiet(900)),
            fresh: fresh(&[800]),
            reach: i64::MAX,
            floor: floor(60, 1),
        },
        none,
    );
    assert_eq!(s.plan(true).0, 60);
}

#[test]
fn rows_held_do_not_hold_the_mark_until_they_leave_memory_pending() {
    let mut s = Sweep::default();
    let g = s.generation();
    // Row 5 is out at the broker (its confirm slow); 6-8 are held too; 40 is not.
    let held = |id: i64| (5..=8).contains(&id);
    prime(&mut s, 100);
    let seen = |fresh| Seen {
        after: 0,
        probe: Some(quiet(100)),
        fresh,
        reach: i64::MAX,
        floor: None,
    };
    s.observe(g, &seen(fresh(&[5, 6, 7, 8, 40, 41])), held);
    assert_eq!(s.plan(true).0, 39, "a wrap starts after the rows held");
    // All listed held and the list cut: as far as it listed.
    s.lower(1);
    let cut = Fresh {
        ids: vec![5, 6, 7, 8],
        more: true,
    };
    s.observe(g, &seen(cut), held);
    assert_eq!(s.plan(true).0, 8);
    // All listed held and nothing more examined: the horizon.
    s.observe(g, &seen(fresh(&[5, 6, 7, 8])), held);
    assert_eq!(s.plan(true).0, 100);
    // Row 6 left memory still pending (its aggregate dropped): the mark goes back,
    // and a scan that still lists it (not held now) keeps it there.
    s.lower(6);
    assert_eq!(s.plan(true).0, 5);
    s.observe(g, &seen(fresh(&[5, 6, 7, 8, 40])), |id| id == 5 || id == 7);
    assert_eq!(s.plan(true).0, 5);
    s.advance(g, 100, true, 0, &[], Instant::now());
    assert_eq!(s.plan(false).0, 5, "the next wrap finds it");
}

#[test]
fn a_scan_that_stopped_short_raises_the_mark_only_as_far_as_it_looked() {
    let mut s = Sweep::default();
    let g = s.generation();
    // Only rows waiting for a retry among the rows examined, and more after them.
    prime(&mut s, 900);
    s.observe(
        g,
        &Seen {
            after: 0,
            probe: Some(quiet(900)),
            fresh: fresh(&[]),
            reach: 300,
            floor: None,
        },
        none,
    );
    assert_eq!(s.plan(true).0, 300);
}
