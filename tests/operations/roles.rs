//! The least-privilege role of `deploy/sql/relay-role.sql` is all the relay needs: a relay
//! running as it relays, and `check` and `status` work. Until 2026-12-07 the script did
//! not grant the claim floor (schema 5), and a relay running as that role failed every
//! claim with "permission denied" while `check` said ok. Now `check` and `run` name a
//! missing grant at start (exit 2), and a session read-only by setting.

use std::time::Duration;

use outbox_relay::table::TableName;
use outbox_relay_testkit::{
    db::ScratchDb, rabbit::TestBroker, relay_proc::*, unique, wait::wait_until,
};
use sqlx::Connection as _;

/// Apply the role script as the test server's superuser (as the tables' owner would).
fn apply_role_script(db: &ScratchDb, relay: &str, producer: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/sql/relay-role.sql");
    let out = std::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &db.url])
        .args(["-v", &format!("relay_role={relay}")])
        .args(["-v", &format!("producer_role={producer}")])
        .args(["-f", script])
        .env("PGOPTIONS", "-c client_min_messages=warning")
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "relay-role.sql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run a one-shot command; a command that does not exit within 30 s fails the test.
async fn exits(env: &[(String, String)], args: &[&str]) -> (i32, String) {
    let (code, out, err) = tokio::time::timeout(Duration::from_secs(30), run_cmd(env, args))
        .await
        .unwrap_or_else(|_| panic!("`outbox-relay {}` did not exit within 30 s", args.join(" ")));
    (code, format!("{out}{err}"))
}

async fn as_owner(db: &ScratchDb, sql: &str) {
    sqlx::query(sql).execute(&db.pool).await.unwrap();
}

/// `check` and `run` both exit 2 at start, saying each of `says`.
async fn both_refuse(env: &[(String, String)], says: &[&str]) {
    for cmd in ["check", "run"] {
        let (code, out) = exits(env, &[cmd]).await;
        assert_eq!(code, 2, "{cmd}: {out}");
        for s in says {
            assert!(out.contains(s), "{cmd} should say {s:?}: {out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_least_privilege_role_relays_and_a_missing_grant_is_named_at_start() {
    let mut db = ScratchDb::with_encoding("relay_roles", "UTF8").await;
    let (relay, producer) = (unique("relay_role"), unique("producer_role"));
    db.drop_role_after(&relay);
    db.drop_role_after(&producer);
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    outbox_relay::migrate::migrate(&mut conn, &TableName::parse("outbox").unwrap())
        .await
        .unwrap();
    conn.close().await.unwrap();
    apply_role_script(&db, &relay, &producer);
    for i in 0..20 {
        sqlx::query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('order', $1, 'order.created', '{}')",
        )
        .bind(format!("o-{}", i % 4))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let broker = TestBroker::new("roles").await;
    let mut env = relay_env("outbox", &broker.exchange);
    env.push(("OUTBOX_RELAY__DATABASE__URL".into(), db.url_as(&relay)));

    let (code, out) = exits(&env, &["check"]).await;
    assert_eq!(code, 0, "check as the relay role: {out}");
    let mut proc = RelayProc::start(&env);
    wait_until(
        Duration::from_secs(60),
        "20 rows relayed as the relay role",
        || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'PROCESSED'")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            n == 20
        },
    )
    .await;
    assert_eq!(broker.take(20, Duration::from_secs(30)).await.len(), 20);
    proc.terminate().await;
    let (code, out) = exits(&env, &["status"]).await;
    assert_eq!(code, 0, "status as the relay role: {out}");
    assert!(
        !proc.logs().contains("permission denied"),
        "{}",
        proc.logs()
    );

    // One grant missing: both commands stop at start and name it.
    let lacks = format!("role {relay} lacks");
    as_owner(
        &db,
        &format!("REVOKE UPDATE ON outbox_relay_floor FROM \"{relay}\""),
    )
    .await;
    both_refuse(
        &env,
        &[&lacks, "UPDATE on ", "outbox_relay_floor", "relay-role.sql"],
    )
    .await;

    // A session read-only by setting (not a standby): both say so.
    apply_role_script(&db, &relay, &producer);
    as_owner(
        &db,
        &format!("ALTER ROLE \"{relay}\" SET default_transaction_read_only = on"),
    )
    .await;
    both_refuse(&env, &["read-only session"]).await;

    broker.cleanup().await;
    db.drop_all().await;
}
