//! The SPEC §2 mapping for Redis, as pure functions: the target key (or channel) from
//! `destination` or the `redis.key` template, the stream entry's fields, the pub/sub
//! JSON envelope, and the size check against the server's `proto-max-bulk-len`.

use serde_json::{Map, Value};

use super::config::AGGREGATE_TYPE;
use crate::model::Message;

/// Redis' default `proto-max-bulk-len` (512 MB): the longest one argument may be.
pub const DEFAULT_MAX_BULK_LEN: u64 = 512 * 1024 * 1024;

/// `template` with `{aggregate_type}` substituted.
pub fn key_from_template(template: &str, aggregate_type: &str) -> String {
    template.replace(AGGREGATE_TYPE, aggregate_type)
}

/// The stream key or channel of `m`: its `destination`, else the template's.
pub fn target(template: &str, m: &Message) -> String {
    match &m.destination {
        Some(d) => d.clone(),
        None => key_from_template(template, &m.aggregate_type),
    }
}

/// The row's `headers` as JSON object text.
pub fn headers_json(m: &Message) -> String {
    let map: Map<String, Value> = m
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    Value::Object(map).to_string()
}

/// The field/value pairs of the stream entry (`XADD <key> * <pairs…>`), in SPEC order.
pub fn stream_fields(m: &Message) -> Vec<(&'static str, String)> {
    vec![
        ("event_id", m.event_id.to_string()),
        ("event_type", m.event_type.clone()),
        ("aggregate_type", m.aggregate_type.clone()),
        ("aggregate_id", m.aggregate_id.clone()),
        ("payload", m.payload.clone()),
        ("headers", headers_json(m)),
    ]
}

/// The pub/sub message: one JSON object with `event_id`, `event_type`,
/// `aggregate_type`, `aggregate_id`, `headers` (an object) and `payload` (the row's JSON
/// as it is, not re-encoded as a string).
pub fn envelope(m: &Message) -> String {
    let s = |v: &str| Value::String(v.to_string()).to_string();
    format!(
        "{{\"event_id\":{},\"event_type\":{},\"aggregate_type\":{},\"aggregate_id\":{},\"headers\":{},\"payload\":{}}}",
        s(&m.event_id.to_string()),
        s(&m.event_type),
        s(&m.aggregate_type),
        s(&m.aggregate_id),
        headers_json(m),
        m.payload
    )
}

/// Why `args` (one command's arguments: name, value) cannot be sent to a server whose
/// `proto-max-bulk-len` is `max_bulk_len`: sending it would make the server close the
/// connection under every other message. `None` when it fits.
pub fn too_big<'a>(
    args: impl IntoIterator<Item = (&'a str, usize)>,
    max_bulk_len: u64,
) -> Option<String> {
    args.into_iter()
        .find(|(_, len)| *len as u64 > max_bulk_len)
        .map(|(what, len)| {
            format!(
                "{what} is {len} bytes, more than the Redis server accepts in one argument (proto-max-bulk-len = {max_bulk_len} bytes)"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sample_row;

    fn msg() -> Message {
        let mut r = sample_row(1, "42");
        r.headers = serde_json::json!({"traceparent": "00-a-b-01", "b\"q": "x\\y"}).to_string();
        r.payload = r#"{"orderId": "42", "total": 59.98}"#.into();
        r.to_message().unwrap()
    }

    #[test]
    fn target_is_destination_else_template() {
        let mut m = msg();
        assert_eq!(target("outbox.{aggregate_type}", &m), "outbox.order");
        assert_eq!(target("all", &m), "all");
        m.destination = Some("custom".into());
        assert_eq!(target("outbox.{aggregate_type}", &m), "custom");
    }

    #[test]
    fn stream_entry_carries_the_spec_fields() {
        let m = msg();
        let f = stream_fields(&m);
        let names: Vec<&str> = f.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "event_id",
                "event_type",
                "aggregate_type",
                "aggregate_id",
                "payload",
                "headers"
            ]
        );
        assert_eq!(f[0].1, m.event_id.to_string());
        assert_eq!(f[4].1, m.payload);
        let h: Value = serde_json::from_str(&f[5].1).unwrap();
        assert_eq!(
            h,
            serde_json::json!({"traceparent": "00-a-b-01", "b\"q": "x\\y"})
        );
    }

    #[test]
    fn envelope_is_one_json_object_with_payload_as_json() {
        let m = msg();
        let v: Value = serde_json::from_str(&envelope(&m)).unwrap();
        assert_eq!(v["event_id"], m.event_id.to_string());
        assert_eq!(v["event_type"], "order.created");
        assert_eq!(v["aggregate_type"], "order");
        assert_eq!(v["aggregate_id"], "42");
        assert_eq!(v["headers"]["traceparent"], "00-a-b-01");
        assert_eq!(v["payload"]["total"], 59.98);
    }

    #[test]
    fn too_big_names_the_argument_and_the_limit() {
        assert_eq!(too_big([("payload", 10)], 10), None);
        let why = too_big([("key", 3), ("payload", 11)], 10).unwrap();
        assert!(why.contains("payload is 11 bytes"), "{why}");
        assert!(why.contains("proto-max-bulk-len = 10"), "{why}");
    }
}
