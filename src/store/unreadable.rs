//! Rows whose text Postgres cannot send to the relay. A `SQL_ASCII` database stores any
//! bytes in a text column; the relay's sessions are UTF-8, and Postgres refuses to send a
//! value that is not (`22021`, "invalid byte sequence for encoding UTF8"): one such row
//! failed every fetch that read it, and the instance stalled. After that error the fetch
//! is read again with its text columns as bytes (`fetch_raw`); a row holding bytes that
//! are not UTF-8 is read with them replaced and carries a `flaw`, so the engine fails it
//! alone and the rows around it go out. What the relay only shows (`status`) is read
//! through `sendable`.

use sqlx::postgres::PgRow;
use sqlx::Row;

use super::claim::ClaimedRow;
use crate::model::OutboxRow;

/// The encoding Postgres converts the text to on the way out of `stored_bytes`: none in
/// a `SQL_ASCII` database (the bytes as stored), UTF-8 in any other.
const RAW_ENCODING: &str =
    "CASE current_setting('server_encoding') WHEN 'SQL_ASCII' THEN 'SQL_ASCII' ELSE 'UTF8' END";

/// `col` (a text expression) as `bytea`: its bytes as stored in a `SQL_ASCII` database,
/// its UTF-8 bytes in any other (which cannot hold bytes that are not valid text).
pub(crate) fn stored_bytes(col: &str) -> String {
    format!("convert_to({col}, {RAW_ENCODING})")
}

/// `col` as text Postgres can always send in UTF-8: in a `SQL_ASCII` database its bytes
/// with every byte above 0x7f written `\ooo` (and `\` as `\\`), in any other itself. For
/// what the relay shows (`status`), never for what it publishes.
pub(crate) fn sendable(col: &str) -> String {
    format!(
        "CASE WHEN current_setting('server_encoding') = 'SQL_ASCII' \
         THEN encode(convert_to({col}, 'SQL_ASCII'), 'escape') ELSE {col} END"
    )
}

/// Whether Postgres refused to send a value in the session's encoding: `22021` (bytes
/// that are not valid in the database's encoding, which only `SQL_ASCII` lets in) or
/// `22P05` (a character the session's encoding has no code for).
pub(crate) fn is_unsendable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| c == "22021" || c == "22P05"))
}

/// A fetched row read with its text as bytes (`Sql::fetch_raw`, the columns in
/// `claim::FETCHED_COLUMNS` order).
pub(super) struct RawRow(pub(super) ClaimedRow);

impl<'r> sqlx::FromRow<'r, PgRow> for RawRow {
    fn from_row(r: &'r PgRow) -> Result<Self, sqlx::Error> {
        let mut flaws = Flaws::default();
        let id: i64 = r.try_get_unchecked(0)?;
        let mut text = |i: usize, name: &'static str| -> Result<String, sqlx::Error> {
            let bytes: Vec<u8> = r.try_get_unchecked(i)?;
            Ok(flaws.check(name, bytes))
        };
        let aggregate_type = text(2, "aggregate_type")?;
        let aggregate_id = text(3, "aggregate_id")?;
        let event_type = text(4, "event_type")?;
        let payload = text(7, "payload")?;
        let headers = text(8, "headers")?;
        let mut optional = |i: usize, name: &'static str| -> Result<_, sqlx::Error> {
            let bytes: Option<Vec<u8>> = r.try_get_unchecked(i)?;
            Ok(bytes.map(|b| flaws.check(name, b)))
        };
        let destination = optional(5, "destination")?;
        let routing_key = optional(6, "routing_key")?;
        Ok(Self(ClaimedRow {
            row: OutboxRow {
                id,
                event_id: r.try_get_unchecked(1)?,
                aggregate_type,
                aggregate_id,
                event_type,
                destination,
                routing_key,
                payload,
                headers,
                attempts: r.try_get_unchecked(9)?,
                created_at: r.try_get_unchecked(10)?,
                flaw: flaws.reason(),
            },
            hash: r.try_get_unchecked(11)?,
        }))
    }
}

/// The columns of one row that were not UTF-8, with where the first bad byte was.
#[derive(Default)]
struct Flaws(Vec<String>);

impl Flaws {
    /// `bytes` as a string: as they are when UTF-8, else with each bad sequence replaced
    /// by U+FFFD and the column noted.
    fn check(&mut self, name: &str, bytes: Vec<u8>) -> String {
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                let bytes = e.into_bytes();
                let byte = bytes.get(at).copied().unwrap_or_default();
                self.0
                    .push(format!("{name} (byte 0x{byte:02x} at offset {at})"));
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }

    fn reason(self) -> Option<String> {
        (!self.0.is_empty()).then(|| {
            format!(
                "{} {} not UTF-8: the database (SQL_ASCII) stored the bytes as given, and the \
                 relay reads and publishes text as UTF-8; rewrite the row in UTF-8 and replay it",
                self.0.join(", "),
                if self.0.len() == 1 { "is" } else { "are" }
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Flaws;

    #[test]
    fn a_flaw_names_each_column_and_its_first_bad_byte() {
        let mut f = Flaws::default();
        assert_eq!(f.check("event_type", b"ok".to_vec()), "ok");
        assert_eq!(f.check("aggregate_id", b"k\xffz".to_vec()), "k\u{fffd}z");
        assert_eq!(
            f.check("payload", b"{\"a\":\"\xfe\"}".to_vec()),
            "{\"a\":\"\u{fffd}\"}"
        );
        let why = f.reason().unwrap();
        assert!(
            why.starts_with(
                "aggregate_id (byte 0xff at offset 1), payload (byte 0xfe at offset 6) are not UTF-8"
            ),
            "{why}"
        );
        assert_eq!(Flaws::default().reason(), None);
        let mut one = Flaws::default();
        one.check("routing_key", b"\xc3".to_vec());
        assert!(one
            .reason()
            .unwrap()
            .starts_with("routing_key (byte 0xc3 at offset 0) is not UTF-8"));
    }
}
