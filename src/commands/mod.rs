//! The operator's commands besides `run`: `migrate`, `check`, `status`, `replay`,
//! `discard` (`check --offline` and `demo` in modules of their own). Each closes its
//! database and broker connections before it returns, so nothing is left for the
//! runtime's shutdown to tear down (lapin logs such a teardown as an ERROR).

pub mod check_offline;
pub mod demo;

pub use check_offline::check_offline;

use sqlx::Connection;

use crate::config::Settings;
use crate::sink::Sink;
use crate::store::Store;
use crate::wiring::{build_sink, AppError};

async fn connect_once(settings: &Settings) -> Result<Store, AppError> {
    Ok(Store::connect(&settings.database, settings.table()?).await?)
}

/// `outbox-relay migrate`: apply the embedded migrations (idempotent).
pub async fn migrate(settings: &Settings) -> Result<(), AppError> {
    let opts = crate::store::connect_options(settings.database.url.expose())?;
    let mut conn = sqlx::PgConnection::connect_with(&opts)
        .await
        .map_err(crate::store::StoreError::from)?;
    let table = settings.table()?;
    let applied = crate::migrate::migrate(&mut conn, &table).await?;
    let _ = conn.close().await;
    if applied.is_empty() {
        println!("{table}: schema up to date (nothing to apply)");
    } else {
        println!("{table}: applied migrations {applied:?}");
    }
    Ok(())
}

/// `outbox-relay check`: config valid (already, or we would not be here), database
/// reached, migrated, writable and granted what the relay uses, broker reached.
pub async fn check(settings: &Settings) -> Result<(), AppError> {
    let store = connect_once(settings).await?;
    let mut conn = store
        .pool()
        .acquire()
        .await
        .map_err(crate::store::StoreError::from)?;
    crate::migrate::check_schema(&mut conn, store.table()).await?;
    crate::migrate::check_access(&mut conn, store.table(), false).await?;
    drop(conn);
    store.pool().close().await;
    println!(
        "database: ok ({}, table {})",
        settings.database.url,
        store.table()
    );
    let mut sink = build_sink(settings)?;
    let reached = sink.connect().await;
    sink.close().await;
    reached?;
    println!("broker: ok ({})", settings.sink.kind);
    Ok(())
}

/// `outbox-relay status [--json]`.
pub async fn status(settings: &Settings, json: bool) -> Result<(), AppError> {
    let store = connect_once(settings).await?;
    let backlog = store.backlog().await?;
    let failures = store.recent_failures(10).await?;
    let blocked = store.blocked_aggregates(20).await?;
    store.pool().close().await;
    if json {
        let doc = serde_json::json!({
            "table": store.table().to_string(),
            "counts": {
                "PENDING": backlog.pending,
                "PROCESSED": backlog.processed,
                "FAILED": backlog.failed + backlog.discarded,
            },
            "pending": backlog.pending,
            "processed": backlog.processed,
            "failed": backlog.failed + backlog.discarded,
            "discarded": backlog.discarded,
            "oldest_pending_age_seconds": backlog.oldest_pending_age_seconds,
            "blocked_aggregates": blocked,
            "recent_failures": failures,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| AppError::Runtime(e.to_string()))?
        );
        return Ok(());
    }
    println!("table {}", store.table());
    println!("  PENDING    {}", backlog.pending);
    println!("  PROCESSED  {}", backlog.processed);
    println!(
        "  FAILED     {} ({} discarded)",
        backlog.failed + backlog.discarded,
        backlog.discarded
    );
    println!(
        "  oldest pending age: {:.1}s",
        backlog.oldest_pending_age_seconds
    );
    if !blocked.is_empty() {
        println!(
            "blocked aggregates (a FAILED row holds back later rows; `replay` or `discard` it):"
        );
        for b in &blocked {
            println!(
                "  {}/{}: failed row {} with {} waiting",
                shown(&b.aggregate_type, KEY_CHARS),
                shown(&b.aggregate_id, KEY_CHARS),
                b.failed_id,
                b.waiting
            );
        }
    }
    if !failures.is_empty() {
        println!("recent failures:");
        for f in &failures {
            println!(
                "  id {} {}/{} {} attempts={}{}: {}",
                f.id,
                shown(&f.aggregate_type, KEY_CHARS),
                shown(&f.aggregate_id, KEY_CHARS),
                shown(&f.event_type, KEY_CHARS),
                f.attempts,
                if f.discarded { " (discarded)" } else { "" },
                shown(f.last_error.as_deref().unwrap_or("-"), ERROR_CHARS)
            );
        }
    }
    Ok(())
}

/// Characters of a key or event type `status` prints before it cuts the rest.
const KEY_CHARS: usize = 100;
/// Characters of a `last_error` `status` prints.
const ERROR_CHARS: usize = 1000;

/// `s` for a person's terminal: control characters escaped (a producer's key may hold
/// newlines or terminal escapes), and cut after `max` characters with the full length
/// said (a 200 KB key printed in full buries the rest). `--json` prints values whole.
fn shown(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max * 2));
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push_str(&format!("… ({} bytes in all)", s.len()));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `outbox-relay replay (--id ID… | --all-failed)`.
pub async fn replay(settings: &Settings, ids: &[i64], all_failed: bool) -> Result<(), AppError> {
    if ids.is_empty() != all_failed {
        return Err(AppError::Usage(
            "replay needs either --id ID… or --all-failed".into(),
        ));
    }
    let store = connect_once(settings).await?;
    let done = store
        .replay(if all_failed { None } else { Some(ids) })
        .await?;
    store.pool().close().await;
    println!("replayed {} row(s): {}", done.len(), listed(&done));
    report_missing(ids, &done, "not FAILED (or discarded)");
    Ok(())
}

/// `outbox-relay discard --id ID…`.
pub async fn discard(settings: &Settings, ids: &[i64]) -> Result<(), AppError> {
    if ids.is_empty() {
        return Err(AppError::Usage("discard needs --id ID…".into()));
    }
    let store = connect_once(settings).await?;
    let done = store.discard(ids).await?;
    store.pool().close().await;
    println!("discarded {} row(s): {}", done.len(), listed(&done));
    report_missing(ids, &done, "not FAILED (or already discarded)");
    Ok(())
}

fn report_missing(asked: &[i64], done: &[i64], why: &str) {
    let done: std::collections::HashSet<i64> = done.iter().copied().collect();
    let missing: Vec<i64> = asked
        .iter()
        .copied()
        .filter(|i| !done.contains(i))
        .collect();
    if !missing.is_empty() {
        eprintln!("skipped {}: {why}", listed(&missing));
    }
}

/// Ids as a list, the first `LISTED_IDS` of them (`replay --all-failed` may touch
/// hundreds of thousands): `[1, 2, 3]`, `[1, 2, … and 99998 more]`.
fn listed(ids: &[i64]) -> String {
    const LISTED_IDS: usize = 100;
    let shown: Vec<String> = ids.iter().take(LISTED_IDS).map(i64::to_string).collect();
    match ids.len().checked_sub(LISTED_IDS) {
        Some(more) if more > 0 => format!("[{}, … and {more} more]", shown.join(", ")),
        _ => format!("[{}]", shown.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::{listed, shown};

    #[test]
    fn long_id_lists_are_cut() {
        assert_eq!(listed(&[]), "[]");
        assert_eq!(listed(&[3, 1]), "[3, 1]");
        let many: Vec<i64> = (1..=250).collect();
        let s = listed(&many);
        assert!(
            s.starts_with("[1, 2, 3,") && s.ends_with("100, … and 150 more]"),
            "{s}"
        );
        assert_eq!(listed(&many[..100]).matches(',').count(), 99);
    }

    #[test]
    fn status_shows_keys_bounded_and_escaped() {
        assert_eq!(shown("order-42", 100), "order-42");
        assert_eq!(shown("a\nb\u{1b}[2J", 100), "a\\nb\\u{1b}[2J");
        assert_eq!(shown(&"k".repeat(300), 5), "kkkkk… (300 bytes in all)");
        assert_eq!(shown("ééé", 2), "éé… (6 bytes in all)");
    }
}
