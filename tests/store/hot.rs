//! The hot path's sessions plan each statement once (`store::pool`): the plans they build
//! on an empty, never analyzed table — the case that made generic plans a hazard — must
//! still walk indexes, and read about what they return, once the table is full.

use outbox_relay::store::HOT_SETTINGS;
use sqlx::{Executor, PgPool, Row};

use super::store;

/// Parameters for one run of each hot statement (ids 1 000–1 198, 100 rows, dense).
fn params(name: &str) -> String {
    let ids: Vec<String> = (0..100).map(|i| (1_000 + 2 * i).to_string()).collect();
    let ids = format!("'{{{}}}'", ids.join(","));
    match name {
        "scan" => "(990, NULL, 100, 100, NULL, NULL, true, NULL, NULL)".into(),
        "fetch" => format!("({ids}, true, NULL, '{{}}')"),
        "fetch_range" => format!(
            "({ids}, true, NULL, '{{}}', 1000, 1198, '\\x{}')",
            "55".repeat(25)
        ),
        "mark_processed" => format!("({ids})"),
        other => panic!("no parameters for {other}"),
    }
}

#[sqlx::test(migrations = false)]
async fn plans_built_on_an_empty_table_stay_on_indexes_once_it_is_full(pool: PgPool) {
    let s = store(pool.clone()).await;
    for (k, v) in HOT_SETTINGS {
        assert_eq!(s.hot_setting(k).await.unwrap(), v, "the hot sessions' {k}");
    }
    let mut conn = pool.acquire().await.unwrap();
    for (k, v) in HOT_SETTINGS {
        conn.execute(format!("SET {k} = {v}").as_str())
            .await
            .unwrap();
    }
    for (name, sql) in s.hot_statements() {
        conn.execute(format!("PREPARE hot_{name} AS {sql}").as_str())
            .await
            .unwrap();
        // The first run builds the session's plan, with no statistics and no rows.
        conn.execute(format!("EXECUTE hot_{name}{}", params(name)).as_str())
            .await
            .unwrap();
    }
    sqlx::raw_sql(
        "SET outboxrelay.order_lock = off;
         INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
         SELECT 'order', 'a' || (g % 1000), 'e', '{}' FROM generate_series(1, 30000) g;",
    )
    .execute(&pool)
    .await
    .unwrap();
    for (name, _) in s.hot_statements() {
        let lines: Vec<String> = sqlx::query(&format!(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) EXECUTE hot_{name}{}",
            params(name)
        ))
        .fetch_all(&mut *conn)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect();
        let plan = lines.join("\n");
        assert!(
            plan.contains("$1"),
            "{name}: not the session's generic plan:\n{plan}"
        );
        for bad in ["Seq Scan on outbox", "Bitmap", "Hash Join", "Merge Join"] {
            assert!(!plan.contains(bad), "{name}: {bad}:\n{plan}");
        }
        // Rows read by any node (rows × loops): about what the statement returns.
        let most = plan
            .split("actual rows=")
            .skip(1)
            .map(|t| {
                let n = |s: &str| -> u64 {
                    s.chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                        .parse()
                        .unwrap_or(0)
                };
                n(t) * t.split("loops=").nth(1).map_or(1, n)
            })
            .max()
            .unwrap_or(0);
        assert!(most <= 1_000, "{name}: a node read {most} rows:\n{plan}");
        assert!(plan.contains("outbox_pkey"), "{name}:\n{plan}");
    }
}

/// A fetch of ids close together walks their stretch of the key and keeps exactly the ids
/// asked for (a bitmap of them), in id order; scattered ids are looked up one by one.
#[sqlx::test(migrations = false)]
async fn a_fetch_returns_exactly_the_ids_asked_for(pool: PgPool) {
    let s = store(pool.clone()).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(super::insert(&pool, &format!("x{i}")).await);
    }
    let fetched = |want: Vec<i64>| {
        let s = s.clone();
        async move {
            let (rows, _) = s
                .fetch(
                    &want,
                    outbox_relay::config::OnFailed::Block,
                    1 << 20,
                    None,
                    &[],
                )
                .await
                .unwrap();
            rows.iter().map(|r| r.row.id).collect::<Vec<i64>>()
        }
    };
    // Every third id of the forty, unordered: a dense range with gaps, bits in 2+ bytes.
    let mut some: Vec<i64> = ids.iter().step_by(3).copied().rev().collect();
    let mut want = some.clone();
    want.sort_unstable();
    assert_eq!(fetched(some.clone()).await, want);
    // The two ends of the stretch only, then one id alone.
    assert_eq!(fetched(vec![ids[39], ids[0]]).await, vec![ids[0], ids[39]]);
    assert_eq!(fetched(vec![ids[17]]).await, vec![ids[17]]);
    // Far apart (not a range): the same rows.
    some.push(ids[39] + 1_000_000);
    assert_eq!(fetched(some).await, want);
}

/// Schema 9 fills pages to half: one statement marking every row of a page (a fast
/// drain's marks) finds room for each row's new version on its own page, so every mark
/// is a HOT update (at schema 5's 60 %, a loop like this kept 72 % of rows on their page).
#[sqlx::test(migrations = false)]
async fn marking_every_row_of_a_page_at_once_keeps_each_on_its_page(pool: PgPool) {
    let s = store(pool.clone()).await;
    // Rows of ~700 bytes (a 500-byte payload, a few headers): five or six to a page.
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
         SELECT 'order', 'order-' || g, 'order.created',
                jsonb_build_object('order', g, 'pad', repeat('x', 500)),
                '{\"trace\": \"0af7651916cd43dd8448eb211c80319c\", \"tenant\": \"t1\"}'
         FROM generate_series(1, 600) g RETURNING id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let blocks = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT id, ((ctid::text)::point)[0]::bigint FROM outbox ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let before = blocks().await;
    let pages = before.last().map_or(0, |r| r.1 + 1);
    assert!(
        (60..=150).contains(&pages),
        "600 rows on {pages} pages: four to ten to a page"
    );
    assert_eq!(s.mark_processed(&ids).await.unwrap(), 600);
    let after = blocks().await;
    let moved: Vec<i64> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b != a)
        .map(|(b, _)| b.0)
        .collect();
    assert!(moved.is_empty(), "rows moved off their page: {moved:?}");
}
