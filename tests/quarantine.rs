//! Key-scoped quarantine (SPEC §3.2, §3.4) and the operator's commands: a failed row
//! holds back its own aggregate only; `replay` delivers the chain in order, `discard`
//! releases it, `skip` never holds it; a row in backoff holds back its aggregate only;
//! `status` / `status --json` report what happened.

use std::time::Duration;

use outbox_relay_testkit::{db::*, rabbit::*, relay_proc::*, unique, wait::*};

/// Aggregate "blocked": first row to a missing exchange, then 3 good rows. Aggregate
/// "free": 5 good rows. Returns (failed id, blocked chain ids, free ids).
async fn scenario(table: &TestTable, missing: &str) -> (i64, Vec<i64>, Vec<i64>) {
    let first = table
        .insert(
            "blocked",
            "order.created",
            Some(missing),
            serde_json::json!({}),
        )
        .await;
    let mut chain = Vec::new();
    let mut free = Vec::new();
    for i in 0..5 {
        if i < 3 {
            chain.push(
                table
                    .insert("blocked", "order.updated", None, serde_json::json!({}))
                    .await,
            );
        }
        free.push(
            table
                .insert("free", "order.updated", None, serde_json::json!({}))
                .await,
        );
    }
    (first, chain, free)
}

/// A table, a broker, a unique name (from `missing`) of an exchange that does not exist,
/// and the env of a relay on the two.
async fn setup(
    prefix: &str,
    missing: &str,
) -> (TestTable, TestBroker, String, Vec<(String, String)>) {
    let (table, broker) = table_and_broker(prefix).await;
    let env = relay_env(&table.name, &broker.exchange);
    (table, broker, unique(missing), env)
}

/// A relay on a fresh `scenario` table, once the blocked aggregate's head is FAILED and
/// the free aggregate PROCESSED: (table, broker, missing exchange, env, relay, (failed id,
/// blocked chain ids, free ids)).
type Blocked = (
    TestTable,
    TestBroker,
    String,
    Vec<(String, String)>,
    RelayProc,
    (i64, Vec<i64>, Vec<i64>),
);

async fn blocked(prefix: &str, missing: &str) -> Blocked {
    let (table, broker, missing, env) = setup(prefix, missing).await;
    let (first, chain, free) = scenario(&table, &missing).await;
    let relay = RelayProc::start(&env);
    table
        .wait_statuses(
            &[("FAILED", 1), ("PROCESSED", free.len() as i64)],
            Duration::from_secs(30),
        )
        .await;
    (table, broker, missing, env, relay, (first, chain, free))
}

/// A table, a broker, the name of an exchange that does not exist, and the env of a
/// relay whose retries wait an hour (so a rejected row stays in backoff for the whole
/// test), with the `relay.<key>` settings of `extra` on top.
async fn hour_backoff(
    prefix: &str,
    extra: &[(&str, &str)],
) -> (TestTable, TestBroker, String, Vec<(String, String)>) {
    let (table, broker, missing, mut env) = setup(prefix, &format!("{prefix}_exchange")).await;
    let hour = [("BACKOFF_INITIAL", "1h"), ("BACKOFF_MAX", "1h")];
    for (key, value) in hour.iter().chain(extra) {
        env.push((format!("OUTBOX_RELAY__RELAY__{key}"), value.to_string()));
    }
    (table, broker, missing, env)
}

/// `outbox-relay <args>` exits 0 and prints `said`; returns what it printed.
async fn run_ok(env: &[(String, String)], args: &[&str], said: &str) -> String {
    let (code, out, err) = run_cmd(env, args).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(said), "{out}");
    out
}

fn ids_of(got: &[Got], index: &std::collections::HashMap<String, (i64, String)>) -> Vec<i64> {
    got.iter().map(|g| index[&g.message_id].0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_row_blocks_its_aggregate_until_replay_delivers_the_chain_in_order() {
    let (table, broker, missing, env, relay, (first, chain, free)) =
        blocked("qblock", "later_exchange").await;
    let got = broker.take(free.len(), Duration::from_secs(10)).await;
    assert_eq!(
        ids_of(&got, &table.index().await),
        free,
        "other aggregate flows"
    );
    for id in &chain {
        assert_eq!(
            table.row(*id).await.0,
            "PENDING",
            "later rows of the failed aggregate wait"
        );
    }

    // status shows the failure and the blocked aggregate.
    let out = run_ok(&env, &["status"], "FAILED     1").await;
    assert!(
        out.contains("order/blocked") && out.contains("3 waiting"),
        "{out}"
    );
    assert!(
        out.contains(&missing),
        "latest failure with its error: {out}"
    );
    let (code, out, _) = run_cmd(&env, &["status", "--json"]).await;
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
    assert_eq!(doc["counts"]["FAILED"], 1);
    assert_eq!(doc["counts"]["PENDING"], 3);
    assert_eq!(doc["counts"]["PROCESSED"], 5);
    assert!(doc["oldest_pending_age_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(doc["recent_failures"][0]["id"], first);
    assert!(doc["recent_failures"][0]["last_error"]
        .as_str()
        .unwrap()
        .contains(&missing));
    assert_eq!(doc["blocked_aggregates"][0]["aggregate_id"], "blocked");

    // Fix the cause, replay: the whole chain arrives, in order.
    broker.add_exchange(&missing).await;
    run_ok(&env, &["replay", "--id", &first.to_string()], "replayed 1").await;
    table
        .wait_status("PROCESSED", 9, Duration::from_secs(30))
        .await;
    let got = broker.take(4, Duration::from_secs(10)).await;
    let mut expected = vec![first];
    expected.extend(&chain);
    assert_eq!(
        ids_of(&got, &table.index().await),
        expected,
        "chain delivered in id order"
    );
    let (_, attempts, _) = table.row(first).await;
    assert_eq!(attempts, 0, "replay resets attempts");
    drop(relay);
    broker.delete_exchange(&missing).await;
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discard_releases_the_chain_and_keeps_the_row_for_audit() {
    let (table, broker, _, env, relay, (first, chain, _)) =
        blocked("qdisc", "never_exchange").await;
    run_ok(
        &env,
        &["discard", "--id", &first.to_string()],
        "discarded 1",
    )
    .await;
    table
        .wait_status("PROCESSED", 8, Duration::from_secs(30))
        .await;
    let got = broker.take(8, Duration::from_secs(10)).await;
    let ids = ids_of(&got, &table.index().await);
    let chain_got: Vec<i64> = ids.iter().copied().filter(|i| chain.contains(i)).collect();
    assert_eq!(chain_got, chain, "released chain in order");
    assert_eq!(
        table.row(first).await.0,
        "FAILED",
        "discarded row kept for audit"
    );
    let (_, out, _) = run_cmd(&env, &["status", "--json"]).await;
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["discarded"], 1);
    assert_eq!(doc["blocked_aggregates"].as_array().unwrap().len(), 0);
    // A second replay cannot resurrect a discarded row.
    run_ok(&env, &["replay", "--all-failed"], "replayed 0").await;
    drop(relay);
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skip_mode_lets_later_rows_flow_at_once() {
    let extra = [("ON_FAILED", "skip"), ("MAX_ATTEMPTS", "1")];
    let (table, broker, missing, env) = hour_backoff("qskip", &extra).await;
    let (first, _chain, _free) = scenario(&table, &missing).await;
    let relay = RelayProc::start(&env);
    table
        .wait_status("PROCESSED", 8, Duration::from_secs(30))
        .await;
    assert_eq!(table.row(first).await.0, "FAILED");
    drop(relay);
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn row_in_backoff_holds_back_its_own_aggregate_only() {
    let (table, broker, missing, env) = hour_backoff("qback", &[]).await;
    let (first, chain, free) = scenario(&table, &missing).await;
    let relay = RelayProc::start(&env);
    table
        .wait_status("PROCESSED", free.len() as i64, Duration::from_secs(30))
        .await;
    wait_for(
        Duration::from_secs(10),
        "first rejection recorded",
        || async { (table.row(first).await.1 == 1).then_some(()) },
    )
    .await;
    let (status, attempts, err) = table.row(first).await;
    assert_eq!(
        (status.as_str(), attempts),
        ("PENDING", 1),
        "waiting for its retry"
    );
    assert!(err.unwrap().contains(&missing));
    // More rows of both aggregates keep coming: only the free one moves.
    let late_free = table
        .insert("free", "order.updated", None, serde_json::json!({}))
        .await;
    let late_blocked = table
        .insert("blocked", "order.updated", None, serde_json::json!({}))
        .await;
    table
        .wait_status("PROCESSED", free.len() as i64 + 1, Duration::from_secs(30))
        .await;
    assert_eq!(table.row(late_free).await.0, "PROCESSED");
    for id in chain.iter().chain([&late_blocked]) {
        assert_eq!(table.row(*id).await.0, "PENDING");
    }
    let next_at: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(&format!(
        "SELECT next_attempt_at FROM \"{}\" WHERE id = $1",
        table.name
    ))
    .bind(first)
    .fetch_one(&table.pool)
    .await
    .unwrap();
    assert!(
        next_at.unwrap() > chrono::Utc::now() + chrono::Duration::minutes(20),
        "backoff scheduled"
    );
    drop(relay);
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_row_goes_to_the_dead_letter_exchange_with_its_error() {
    let (table, broker) = table_and_broker("qdlx").await;
    let dlx = TestBroker::new("qdlx_dead").await;
    let missing = unique("dlx_missing");
    let bad = table
        .insert(
            "d1",
            "order.created",
            Some(&missing),
            serde_json::json!({"traceparent": "t-1"}),
        )
        .await;
    table
        .insert("d2", "order.created", None, serde_json::json!({}))
        .await;
    let mut env = relay_env(&table.name, &broker.exchange);
    env.push((
        "OUTBOX_RELAY__RABBITMQ__DEAD_LETTER_EXCHANGE".into(),
        dlx.exchange.clone(),
    ));
    let relay = RelayProc::start(&env);
    table
        .wait_status("FAILED", 1, Duration::from_secs(30))
        .await;
    let got = dlx.take(1, Duration::from_secs(10)).await;
    let index = table.index().await;
    assert_eq!(
        index[&got[0].message_id].0, bad,
        "the failed row, same event_id"
    );
    assert!(
        got[0].headers["last_error"].contains(&missing),
        "{:?}",
        got[0].headers
    );
    assert_eq!(got[0].headers["traceparent"], "t-1");
    assert_eq!(table.row(bad).await.0, "FAILED");
    table
        .wait_status("PROCESSED", 1, Duration::from_secs(10))
        .await;
    drop(relay);
    dlx.cleanup().await;
    broker.cleanup_with(&table).await;
}
