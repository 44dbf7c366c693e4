//! The outbox row as the store reads it, and the validated `Message` a sink publishes.
//! Validation is pure: a row that cannot become a message fails on its own, with a
//! readable reason, before any broker sees it.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A claimed `PENDING` row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub destination: Option<String>,
    pub routing_key: Option<String>,
    /// `payload::text`: the JSON exactly as Postgres renders the JSONB value.
    pub payload: String,
    /// `headers::text`: the JSONB value as Postgres renders it, parsed (and checked) when
    /// the row becomes a message — decoded as JSON while the row is read, a value serde
    /// refuses (nesting deeper than its recursion limit) failed every claim that read it.
    pub headers: String,
    pub attempts: i32,
    /// `None` when the stored time is one the relay cannot represent (`'infinity'`, or
    /// past year 262 000: `store::known_time`): the row fails with that reason.
    pub created_at: Option<DateTime<Utc>>,
    /// Why the row's text could not be read as it was stored (`store::unreadable`: a
    /// `SQL_ASCII` database holds bytes that are not UTF-8); its strings were read with
    /// those bytes replaced, and the row fails with this reason.
    #[sqlx(default)]
    pub flaw: Option<String>,
}

/// What goes on the wire; built only from a row that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: i64,
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub destination: Option<String>,
    pub routing_key: Option<String>,
    pub payload: String,
    /// The row's `headers` entries, in key order.
    pub headers: Vec<(String, String)>,
    pub created_at: DateTime<Utc>,
    /// Rejections so far (decides whether this try is the last).
    pub attempts: i32,
}

impl Message {
    /// The message's identity as SPEC §2 header pairs, in SPEC order: `event_id` (as
    /// rendered by the caller), `event_type`, `aggregate_type`, `aggregate_id`.
    pub fn identity<'a>(&'a self, event_id: &'a str) -> [(&'static str, &'a str); 4] {
        [
            ("event_id", event_id),
            ("event_type", &self.event_type),
            ("aggregate_type", &self.aggregate_type),
            ("aggregate_id", &self.aggregate_id),
        ]
    }

    /// The (aggregate_type, aggregate_id) ordering key.
    pub fn aggregate(&self) -> (&str, &str) {
        (&self.aggregate_type, &self.aggregate_id)
    }
}

/// Longest header name AMQP (short string) allows.
const MAX_HEADER_NAME: usize = 255;

impl OutboxRow {
    /// Validate the row and turn it into a message, or say what is wrong with it.
    pub fn to_message(&self) -> Result<Message, String> {
        self.clone().into_message()
    }

    /// Like `to_message`, moving the row's strings (the payload and the headers are not
    /// copied).
    pub fn into_message(self) -> Result<Message, String> {
        if let Some(flaw) = self.flaw {
            return Err(flaw);
        }
        self.check_fields()?;
        let created_at = self.created_at.ok_or(
            "created_at is not a time the relay can represent ('infinity', '-infinity' or past \
             year 262000): set it to the event's time (the column defaults to now()) and replay the row",
        )?;
        let headers = take_headers(&self.headers)?;
        Ok(Message {
            id: self.id,
            event_id: self.event_id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            event_type: self.event_type,
            destination: self.destination,
            routing_key: self.routing_key,
            payload: self.payload,
            headers,
            created_at,
            attempts: self.attempts,
        })
    }

    /// Check the fields a message needs besides `headers`.
    fn check_fields(&self) -> Result<(), String> {
        if self.aggregate_id.is_empty() {
            return Err(
                "aggregate_id is empty: it is the ordering key and the Kafka message key".into(),
            );
        }
        if self.aggregate_type.is_empty() {
            return Err("aggregate_type is empty".into());
        }
        if self.event_type.is_empty() {
            return Err(
                "event_type is empty: it is the message type and default routing key".into(),
            );
        }
        if matches!(self.destination.as_deref(), Some("")) {
            return Err(
                "destination is an empty string: use NULL for the configured default".into(),
            );
        }
        Ok(())
    }
}

/// The `headers` entries in key order, or what is wrong with them.
fn take_headers(headers: &str) -> Result<Vec<(String, String)>, String> {
    let headers: serde_json::Value = serde_json::from_str(headers).map_err(|e| {
        format!("headers must be a JSON object of string values; the relay cannot read them: {e}")
    })?;
    let map = match headers {
        serde_json::Value::Object(map) => map,
        other => {
            return Err(format!(
                "headers must be a JSON object of string values, got {}",
                json_kind(&other)
            ))
        }
    };
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        if k.is_empty() || k.len() > MAX_HEADER_NAME {
            return Err(format!(
                "headers key {k:?} must be 1 to {MAX_HEADER_NAME} bytes long"
            ));
        }
        match v {
            serde_json::Value::String(s) => out.push((k, s)),
            other => {
                return Err(format!(
                    "headers must be an object of string values: key {k:?} holds {}",
                    json_kind(&other)
                ))
            }
        }
    }
    Ok(out)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
pub(crate) fn sample_row(id: i64, aggregate_id: &str) -> OutboxRow {
    OutboxRow {
        id,
        event_id: Uuid::new_v4(),
        aggregate_type: "order".into(),
        aggregate_id: aggregate_id.into(),
        event_type: "order.created".into(),
        destination: None,
        routing_key: None,
        payload: r#"{"orderId": "42"}"#.into(),
        headers: r#"{"traceparent": "00-abc-def-01"}"#.into(),
        attempts: 0,
        created_at: Some(Utc::now()),
        flaw: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_row_becomes_message() {
        let m = sample_row(7, "42").to_message().unwrap();
        assert_eq!(
            m.headers,
            vec![("traceparent".into(), "00-abc-def-01".into())]
        );
        assert_eq!(m.aggregate(), ("order", "42"));
    }

    #[test]
    fn bad_rows_say_why() {
        let mut r = sample_row(1, "");
        assert!(r
            .to_message()
            .unwrap_err()
            .contains("aggregate_id is empty"));
        r.aggregate_id = "1".into();
        r.headers = serde_json::json!(["a"]).to_string();
        assert!(r.to_message().unwrap_err().contains("got an array"));
        r.headers = serde_json::json!({"n": 5}).to_string();
        assert!(r
            .to_message()
            .unwrap_err()
            .contains("key \"n\" holds a number"));
        r.headers = serde_json::json!({}).to_string();
        r.destination = Some(String::new());
        assert!(r.to_message().unwrap_err().contains("destination"));
    }
}
