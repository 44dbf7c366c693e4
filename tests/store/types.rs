//! The scan's filters by `aggregate_type` (a tenant's burst passed over, then refilled):
//! rows of a skipped type are left out, a refill keeps only its type (and, with hashes,
//! rows of either), each in `id` order.

use outbox_relay::store::{ScanQuery, Store};
use sqlx::PgPool;

/// Insert one row of (`t`, `agg`).
async fn insert_typed(pool: &PgPool, t: &str, agg: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ($1, $2, 'e', '{}') RETURNING id",
    )
    .bind(t)
    .bind(agg)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn scan(
    s: &Store,
    skip: &[i32],
    only: &[i32],
    skip_types: &[String],
    only_types: &[String],
) -> Vec<i64> {
    let some = |v: &[String]| (!v.is_empty()).then(|| v.to_vec());
    let (skip_types, only_types) = (some(skip_types), some(only_types));
    let page = s
        .scan(&ScanQuery {
            after: 0,
            partitions: None,
            limit: 100,
            examine: 100,
            skip: (!skip.is_empty()).then_some(skip),
            only: (!only.is_empty()).then_some(only),
            list_writers: false,
            skip_types: skip_types.as_deref(),
            only_types: only_types.as_deref(),
        })
        .await
        .unwrap();
    page.rows.iter().map(|r| r.id).collect()
}

#[sqlx::test(migrations = false)]
async fn a_type_is_left_out_of_the_sweep_or_refilled_alone(pool: PgPool) {
    let s = super::store(pool.clone()).await;
    let b1 = insert_typed(&pool, "bulk", "1").await;
    let o1 = insert_typed(&pool, "orders", "1").await;
    let b2 = insert_typed(&pool, "bulk", "2").await;
    let x1 = insert_typed(&pool, "other", "1").await;
    let o2 = insert_typed(&pool, "orders", "2").await;
    let bulk = vec!["bulk".to_string()];
    let none: Vec<String> = Vec::new();
    assert_eq!(
        scan(&s, &[], &[], &none, &none).await,
        vec![b1, o1, b2, x1, o2]
    );
    assert_eq!(
        scan(&s, &[], &[], &bulk, &none).await,
        vec![o1, x1, o2],
        "a skipped type is left out"
    );
    assert_eq!(
        scan(&s, &[], &[], &none, &bulk).await,
        vec![b1, b2],
        "a refill of a type"
    );
    let other: i32 = sqlx::query_scalar("SELECT hashtext('other/1')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        scan(&s, &[], &[other], &none, &bulk).await,
        vec![b1, b2, x1],
        "a refill of a type and of an aggregate"
    );
    assert_eq!(
        scan(&s, &[other], &[], &bulk, &none).await,
        vec![o1, o2],
        "a skipped type and a skipped aggregate"
    );
    // A type name that is not the type's: nothing left out (no pattern, no prefix).
    assert_eq!(
        scan(&s, &[], &[], &["bul".to_string(), "%".to_string()], &none)
            .await
            .len(),
        5
    );
}

#[sqlx::test(migrations = false)]
async fn the_tenant_probe_finds_other_types_behind_a_burst_within_its_reach(pool: PgPool) {
    let s = super::store(pool.clone()).await;
    for a in 0..5 {
        insert_typed(&pool, "bulk", &a.to_string()).await;
    }
    let probe = |after: i64, partitions: Option<&'static [i32]>, head: u32, tail: u32| {
        let s = &s;
        async move {
            s.other_type_after(after, partitions, "bulk", head, tail)
                .await
                .unwrap()
        }
    };
    assert!(!probe(0, None, 100, 10).await, "alone");
    let o = insert_typed(&pool, "orders", "1").await;
    insert_typed(&pool, "bulk", "9").await;
    assert!(probe(0, None, 100, 0).await, "after the cursor");
    assert!(probe(0, None, 0, 2).await, "near the end");
    assert!(!probe(0, None, 5, 1).await, "beyond both walks");
    assert!(!probe(o, None, 100, 10).await, "before the cursor");
    assert!(!probe(0, Some(&[]), 100, 10).await, "no partition held");
}
