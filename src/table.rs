//! The configured outbox table name (optionally schema-qualified) and the names derived
//! from it: the relay's own tables share its schema and its name as prefix.
//!
//! Invariant: a `TableName` only holds `[A-Za-z_][A-Za-z0-9_]*` parts, and every SQL
//! identifier built from it is double-quoted, so it can never inject SQL.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

fn valid_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 48
}

impl TableName {
    /// Parse `name` or `schema.name`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (schema, name) = match s.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, s),
        };
        for part in schema.iter().chain(std::iter::once(&name)) {
            if !valid_ident(part) {
                return Err(format!(
                    "`{s}` is not a table name: use letters, digits and _ (at most 48), optionally schema-qualified as schema.table"
                ));
            }
        }
        Ok(Self {
            schema: schema.map(str::to_string),
            name: name.to_string(),
        })
    }

    /// The schema the table lives in (`public` unless qualified).
    pub fn schema(&self) -> &str {
        self.schema.as_deref().unwrap_or("public")
    }

    /// The unqualified table name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Quoted, schema-qualified SQL identifier of the outbox table.
    pub fn ident(&self) -> String {
        self.derived("")
    }

    /// Quoted, schema-qualified identifier of a relay table named `<table><suffix>`.
    pub fn derived(&self, suffix: &str) -> String {
        format!("\"{}\".\"{}{}\"", self.schema(), self.name, suffix)
    }

    /// The unquoted `<table><suffix>` (an index or trigger name).
    pub fn derived_bare(&self, suffix: &str) -> String {
        format!("{}{}", self.name, suffix)
    }

    /// The relay's migration history table.
    pub fn history(&self) -> String {
        self.derived("_relay_migrations")
    }

    /// The partition lease table.
    pub fn leases(&self) -> String {
        self.derived("_relay_leases")
    }

    /// The claim floor (schema 5): every pending, unparked row has an id above it.
    pub fn floor(&self) -> String {
        self.derived("_relay_floor")
    }

    /// The relay membership (heartbeat) table.
    pub fn members(&self) -> String {
        self.derived("_relay_members")
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema(), self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_qualified() {
        let t = TableName::parse("outbox").unwrap();
        assert_eq!(t.ident(), "\"public\".\"outbox\"");
        assert_eq!(t.leases(), "\"public\".\"outbox_relay_leases\"");
        let t = TableName::parse("app.events").unwrap();
        assert_eq!(t.ident(), "\"app\".\"events\"");
        assert_eq!(t.schema(), "app");
    }

    #[test]
    fn rejects_injection() {
        for bad in ["", "a b", "x;drop", "a.b.c", "\"q\"", "1abc", "a."] {
            assert!(TableName::parse(bad).is_err(), "{bad}");
        }
    }
}
