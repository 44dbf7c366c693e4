//! Embedded SQL migrations (`migrations/*.sql`, sqlx file format), and the checks of the
//! schema and of the role's privileges that `run` and `check` do at start.
//!
//! The files name the table `outbox`; for another configured table every `outbox` /
//! `outbox_*` identifier is rewritten to `<table>` / `<table>_*` and the migration runs
//! with `search_path` set to the table's schema. History goes to `<table>_relay_migrations`,
//! never sqlx's `_sqlx_migrations` (which may belong to the order service).

use sqlx::{Connection, PgConnection, Row};

use crate::table::TableName;

/// One embedded migration.
pub struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "outbox",
        sql: include_str!("../migrations/0001_outbox.sql"),
    },
    Migration {
        version: 2,
        description: "relay",
        sql: include_str!("../migrations/0002_relay.sql"),
    },
    Migration {
        version: 3,
        description: "order",
        sql: include_str!("../migrations/0003_order.sql"),
    },
    Migration {
        version: 4,
        description: "horizon",
        sql: include_str!("../migrations/0004_horizon.sql"),
    },
    Migration {
        version: 5,
        description: "hot",
        sql: include_str!("../migrations/0005_hot.sql"),
    },
    Migration {
        version: 6,
        description: "doorbell",
        sql: include_str!("../migrations/0006_doorbell.sql"),
    },
    Migration {
        version: 7,
        description: "when",
        sql: include_str!("../migrations/0007_when.sql"),
    },
    Migration {
        version: 8,
        description: "one trigger",
        sql: include_str!("../migrations/0008_one_trigger.sql"),
    },
    Migration {
        version: 9,
        description: "half pages",
        sql: include_str!("../migrations/0009_half_pages.sql"),
    },
    Migration {
        version: 10,
        description: "ids always",
        sql: include_str!("../migrations/0010_ids_always.sql"),
    },
];

/// The table comment the latest migration leaves; `run` refuses to start without it.
pub const SCHEMA_MARKER: &str = "relay schema 10";

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Db(#[from] crate::store::StoreError),
    #[error("table {table} is not migrated to the expected version ({found}): run `outbox-relay migrate`")]
    NotMigrated { table: String, found: String },
    /// The role of `database.url` lacks privileges the relay needs.
    #[error(
        "database.url's role {role} lacks privileges the relay needs: {missing} \
         (deploy/sql/relay-role.sql grants exactly what it needs)"
    )]
    NoAccess { role: String, missing: String },
    /// The session cannot write (a hot standby, or `default_transaction_read_only`).
    #[error(
        "database.url reaches a read-only session (transaction_read_only = on: a standby, \
         or default_transaction_read_only set for the role or database): the relay writes \
         (marks, leases); point it at the primary, or lift the setting"
    )]
    ReadOnly,
}

impl From<sqlx::Error> for MigrateError {
    fn from(e: sqlx::Error) -> Self {
        MigrateError::Db(e.into())
    }
}

/// The statements that remove every object the migrations create for the table named
/// `table` (in the search path): for tests and tools that create tables of their own.
pub fn drop_statements(table: &str) -> Vec<String> {
    let mut out = vec![format!("DROP TABLE IF EXISTS \"{table}\" CASCADE")];
    for t in [
        "relay_leases",
        "relay_members",
        "relay_migrations",
        "relay_floor",
    ] {
        out.push(format!("DROP TABLE IF EXISTS \"{table}_{t}\""));
    }
    // Trigger functions, every schema's (a table migrated by an older version may keep some).
    for f in ["notify", "insert", "guard", "ring", "order"] {
        out.push(format!("DROP FUNCTION IF EXISTS \"{table}_{f}\"() CASCADE"));
    }
    out
}

/// Rewrite the table identifiers of a migration for `table`: every word `outbox` or
/// `outbox_<suffix>` becomes the quoted name derived from `table`.
pub fn render(sql: &str, table: &TableName) -> String {
    if table.name() == "outbox" {
        return sql.to_string();
    }
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(sql.len() + 64);
    let mut rest = sql;
    while let Some(start) = rest.find(is_word) {
        out.push_str(&rest[..start]);
        let word_and_rest = &rest[start..];
        let len = word_and_rest
            .find(|c: char| !is_word(c))
            .unwrap_or(word_and_rest.len());
        let word = &word_and_rest[..len];
        match word.strip_prefix("outbox") {
            Some(suffix) if is_table_suffix(suffix) => {
                out.push('"');
                out.push_str(&table.derived_bare(suffix));
                out.push('"');
            }
            _ => out.push_str(word),
        }
        rest = &word_and_rest[len..];
    }
    out.push_str(rest);
    out
}

/// `""` or `_` followed by ASCII letters, digits and underscores.
fn is_table_suffix(suffix: &str) -> bool {
    suffix.is_empty()
        || suffix
            .strip_prefix('_')
            .is_some_and(|s| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

/// Apply every migration not yet recorded, each in its own transaction, serialized
/// across concurrent `migrate` runs by an advisory lock. Idempotent. Returns the
/// versions applied now.
pub async fn migrate(conn: &mut PgConnection, table: &TableName) -> Result<Vec<i64>, MigrateError> {
    let schema_sql = format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", table.schema());
    let history_sql = format!(
        "CREATE TABLE IF NOT EXISTS {} (
            version BIGINT PRIMARY KEY,
            description TEXT NOT NULL,
            installed_on TIMESTAMPTZ NOT NULL DEFAULT now())",
        table.history()
    );
    let lock_key = format!("outbox-relay migrate {table}");
    let mut applied = Vec::new();
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(&lock_key)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(&schema_sql).execute(&mut *tx).await?;
    sqlx::raw_sql(&history_sql).execute(&mut *tx).await?;
    let done: Vec<i64> = sqlx::query_scalar(&format!("SELECT version FROM {}", table.history()))
        .fetch_all(&mut *tx)
        .await?;
    let search_path = format!("SET LOCAL search_path TO \"{}\", public", table.schema());
    for m in MIGRATIONS {
        if done.contains(&m.version) {
            continue;
        }
        sqlx::raw_sql(&search_path).execute(&mut *tx).await?;
        sqlx::raw_sql(&render(m.sql, table))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "INSERT INTO {} (version, description) VALUES ($1, $2)",
            table.history()
        ))
        .bind(m.version)
        .bind(m.description)
        .execute(&mut *tx)
        .await?;
        applied.push(m.version);
    }
    tx.commit().await?;
    Ok(applied)
}

/// Check that the table exists and carries the latest schema marker.
pub async fn check_schema(conn: &mut PgConnection, table: &TableName) -> Result<(), MigrateError> {
    let row = sqlx::query(
        "SELECT to_regclass($1) IS NOT NULL AS present,
                obj_description(to_regclass($1), 'pg_class') AS marker",
    )
    .bind(table.ident())
    .fetch_one(conn)
    .await?;
    let present: bool = row.try_get("present")?;
    let marker: Option<String> = row.try_get("marker")?;
    if present && marker.as_deref() == Some(SCHEMA_MARKER) {
        return Ok(());
    }
    Err(MigrateError::NotMigrated {
        table: table.to_string(),
        found: if present {
            format!("marker {:?}", marker.unwrap_or_default())
        } else {
            "table missing".into()
        },
    })
}

/// The privileges the relay uses on each of its tables (`deploy/sql/relay-role.sql`).
fn needed(table: &TableName) -> Vec<(String, &'static str)> {
    const ALL: [&str; 4] = ["SELECT", "INSERT", "UPDATE", "DELETE"];
    let mut out = Vec::new();
    for (t, privileges) in [
        (table.ident(), &["SELECT", "UPDATE", "DELETE"][..]),
        (table.leases(), &ALL[..]),
        (table.members(), &ALL[..]),
        (table.floor(), &["SELECT", "UPDATE"][..]),
    ] {
        out.extend(privileges.iter().map(|p| (t.clone(), *p)));
    }
    out
}

/// Check that the session's role holds every privilege the relay uses on its tables
/// (one missing grant once made every claim fail for ever), and that the session can
/// write — except, with `standby_ok`, on a server in recovery (a standby about to be
/// promoted: `run` waits it out). Run after `check_schema` (the tables exist).
pub async fn check_access(
    conn: &mut PgConnection,
    table: &TableName,
    standby_ok: bool,
) -> Result<(), MigrateError> {
    let (tables, privileges): (Vec<String>, Vec<&str>) = needed(table).into_iter().unzip();
    let (role, missing, read_only, standby): (String, Vec<String>, bool, bool) = sqlx::query_as(
        "SELECT current_user::text,
                coalesce((SELECT array_agg(x.p || ' on ' || x.t ORDER BY x.n)
                          FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS x(t, p, n)
                          WHERE NOT has_table_privilege(x.t, x.p)), '{}'),
                current_setting('transaction_read_only') = 'on', pg_is_in_recovery()",
    )
    .bind(&tables)
    .bind(&privileges)
    .fetch_one(conn)
    .await?;
    if !missing.is_empty() {
        return Err(MigrateError::NoAccess {
            role,
            missing: missing.join(", "),
        });
    }
    if read_only && !(standby_ok && standby) {
        return Err(MigrateError::ReadOnly);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_rewrites_identifiers_only() {
        let t = TableName::parse("app.Events").unwrap();
        let sql = render(MIGRATIONS[1].sql, &t);
        assert!(sql.contains("ALTER TABLE \"Events\" ADD COLUMN"));
        assert!(sql.contains("\"Events_relay_leases\""));
        assert!(sql.contains("'relay_wake_'"));
        assert!(!sql.contains(" outbox "));
        let plain = render(MIGRATIONS[0].sql, &TableName::parse("outbox").unwrap());
        assert_eq!(plain, MIGRATIONS[0].sql);
    }

    #[test]
    fn render_takes_whole_words_only() {
        let t = TableName::parse("ev").unwrap();
        assert_eq!(
            render(
                "outbox outbox_x(outboxes, my_outbox) 'outbox_' outbox_é",
                &t
            ),
            "\"ev\" \"ev_x\"(outboxes, my_outbox) '\"ev_\"' outbox_é"
        );
    }

    #[test]
    fn versions_are_increasing() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
        assert!(MIGRATIONS.last().unwrap().sql.contains(SCHEMA_MARKER));
    }
}
