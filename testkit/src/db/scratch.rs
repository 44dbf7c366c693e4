//! A database of a test's own (`ScratchDb`), for what the shared test database cannot
//! be: another encoding, or roles granted only there. Created on the test server with a
//! unique name, dropped (`WITH (FORCE)`, closing the relay's sessions) with the roles the
//! test made for it by `drop_all`, or from `Drop` when the test panics first.

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgPool};

use crate::{pg_url, unique};

/// A database created for one test; `url` reaches it as the test user.
pub struct ScratchDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    /// Roles to drop after the database (`drop_role_after`).
    roles: Vec<String>,
}

impl ScratchDb {
    /// A new database in `encoding` (with the `C` locale, from `template0`, so that any
    /// encoding is accepted).
    pub async fn with_encoding(prefix: &str, encoding: &str) -> Self {
        let name = unique(prefix);
        let mut admin = sqlx::PgConnection::connect(&pg_url())
            .await
            .expect("connect postgres");
        sqlx::query(&format!(
            "CREATE DATABASE \"{name}\" ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' \
             TEMPLATE template0"
        ))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        let url = url_of(&pg_url(), &name);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connect database {name}: {e}"));
        Self {
            name,
            url,
            pool,
            roles: Vec::new(),
        }
    }

    /// Drop role `name` (made by the test, cluster-wide) after the database.
    pub fn drop_role_after(&mut self, name: &str) {
        self.roles.push(name.to_string());
    }

    /// `url` connecting as `user` (no password: the test server trusts local users).
    pub fn url_as(&self, user: &str) -> String {
        with_user(&self.url, user)
    }

    /// Close the pool and drop the database and the roles (which must succeed).
    pub async fn drop_all(self) {
        self.pool.close().await;
        let mut admin = sqlx::PgConnection::connect(&pg_url())
            .await
            .expect("connect postgres");
        for sql in drop_statements(&self.name, &self.roles) {
            sqlx::query(&sql)
                .execute(&mut admin)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        let statements = drop_statements(&self.name, &self.roles);
        crate::teardown::after_panic(format!("database {}", self.name), async move {
            if let Ok(mut admin) = sqlx::PgConnection::connect(&pg_url()).await {
                for sql in statements {
                    let _ = sqlx::query(&sql).execute(&mut admin).await;
                }
            }
        });
    }
}

/// The database first (its grants go with it), then the roles.
fn drop_statements(name: &str, roles: &[String]) -> Vec<String> {
    let mut out = vec![format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")];
    out.extend(roles.iter().map(|r| format!("DROP ROLE IF EXISTS \"{r}\"")));
    out
}

/// `url` (a Postgres URL) with its database replaced by `db` (its query kept).
fn url_of(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).expect("TEST_DATABASE_URL is a URL");
    u.set_path(db);
    u.into()
}

/// `url` with its user info replaced by `user` (no password).
fn with_user(url: &str, user: &str) -> String {
    let mut u = url::Url::parse(url).expect("a Postgres URL");
    u.set_username(user).expect("a URL with a host");
    u.set_password(None).expect("a URL with a host");
    u.into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_database_of_a_url_is_replaced() {
        assert_eq!(
            super::url_of("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            super::url_of("postgres://u:p@h/test?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            super::url_of("postgres://h:5432", "x"),
            "postgres://h:5432/x"
        );
    }
}
