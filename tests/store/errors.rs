//! Which database errors mean "the server cannot serve now" (recording retries them with
//! backoff, spending nothing) and which judge the statement.

use outbox_relay::store::StoreError;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgPool};

#[sqlx::test(migrations = false)]
async fn a_server_out_of_sessions_is_unavailable_and_a_refused_statement_is_not(pool: PgPool) {
    // A role allowed no session: the server refuses it with 53300, as it refuses anyone
    // once `max_connections` is reached (the relay's pool reconnecting at that moment).
    let role = format!(
        "relay_busy_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    sqlx::raw_sql(&format!("CREATE ROLE {role} LOGIN CONNECTION LIMIT 0"))
        .execute(&pool)
        .await
        .unwrap();
    let opts: PgConnectOptions = pool.connect_options().as_ref().clone().username(&role);
    let refused = opts.connect().await;
    sqlx::raw_sql(&format!("DROP ROLE {role}"))
        .execute(&pool)
        .await
        .unwrap();
    let err = refused.expect_err("a role with CONNECTION LIMIT 0 gets no session");
    let code = err
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("53300"), "{err}");
    let err = StoreError::from(err);
    assert!(err.is_unavailable(), "{err}");

    let err = sqlx::query("SELECT 1 / 0")
        .execute(&pool)
        .await
        .expect_err("division by zero");
    let err = StoreError::from(err);
    assert!(!err.is_unavailable(), "{err}");
}
