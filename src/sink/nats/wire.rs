//! The SPEC §2 mapping for NATS JetStream, as pure functions: the subject (from
//! `destination` or the `nats.subject` template), NATS' subject rules, the message
//! headers (`Nats-Msg-Id` = event_id, the metadata, every row header), and the size the
//! server counts against its `max_payload`.

use async_nats::{HeaderMap, HeaderName, HeaderValue};

use crate::model::Message;

/// Headers the relay sets itself; a row's `headers` entry of the same name is dropped
/// so consumers never see two values.
const RESERVED_HEADERS: [&str; 4] = ["event_id", "event_type", "aggregate_type", "aggregate_id"];
/// The JetStream de-duplication header.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// Longest subject the relay publishes to: the server's default `max_control_line`
/// (4096 bytes) must hold `HPUB <subject> <reply inbox> <sizes>`.
pub const MAX_SUBJECT: usize = 3840;
/// The placeholders a subject template may hold.
const PLACEHOLDERS: [&str; 2] = ["{aggregate_type}", "{event_type}"];

/// `template` with `{aggregate_type}` and `{event_type}` substituted.
pub fn subject_from_template(template: &str, aggregate_type: &str, event_type: &str) -> String {
    template
        .replace("{aggregate_type}", aggregate_type)
        .replace("{event_type}", event_type)
}

/// The subject a message goes to (SPEC §2): `destination`, else the template.
pub fn subject_for(template: &str, m: &Message) -> String {
    match &m.destination {
        Some(d) => d.clone(),
        None => subject_from_template(template, &m.aggregate_type, &m.event_type),
    }
}

/// A subject a message can be published to: 1 to `MAX_SUBJECT` bytes, tokens separated
/// by `.` and none empty, no whitespace or control characters, no wildcard (`*`, `>`).
pub fn check_subject(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("subject is empty".into());
    }
    if s.len() > MAX_SUBJECT {
        return Err(format!(
            "subject is {} bytes long; the relay publishes to subjects of at most {MAX_SUBJECT} bytes (NATS' max_control_line must hold it)",
            s.len()
        ));
    }
    if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "subject {s:?} contains {c:?}; NATS subjects cannot hold whitespace or control characters"
        ));
    }
    if let Some(c) = s.chars().find(|c| matches!(c, '*' | '>')) {
        return Err(format!(
            "subject {s:?} contains the wildcard {c:?}; a message is published to one concrete subject"
        ));
    }
    if s.split('.').any(str::is_empty) {
        return Err(format!(
            "subject {s:?} has an empty token (a leading, trailing or doubled '.')"
        ));
    }
    Ok(())
}

/// A subject template: a valid subject once its placeholders are filled, and no `{…}`
/// other than `{aggregate_type}` and `{event_type}`.
pub fn check_template(t: &str) -> Result<(), String> {
    if t.trim().is_empty() {
        return Err("must not be empty".into());
    }
    let mut rest = t.to_string();
    for p in PLACEHOLDERS {
        rest = rest.replace(p, "x");
    }
    if rest.contains(['{', '}']) {
        return Err(format!(
            "{t:?} holds an unknown placeholder; only {{aggregate_type}} and {{event_type}} are substituted"
        ));
    }
    check_subject(&rest).map_err(|e| format!("{t:?}: {e}"))
}

/// The message headers: row headers (minus the reserved names), then `Nats-Msg-Id`,
/// `event_id`, `event_type`, `aggregate_type`, `aggregate_id`, then `extra`. A row header
/// NATS cannot carry, or one that would steer JetStream (`Nats-*`), is an error naming it.
pub fn headers(m: &Message, extra: &[(&str, &str)]) -> Result<HeaderMap, String> {
    let event_id = m.event_id.to_string();
    let mut h = HeaderMap::new();
    let taken = |k: &str| RESERVED_HEADERS.contains(&k) || extra.iter().any(|(n, _)| *n == k);
    for (k, v) in &m.headers {
        if taken(k) {
            continue;
        }
        if k.len() >= 5 && k[..5].eq_ignore_ascii_case("nats-") {
            return Err(format!(
                "headers key {k:?} is reserved: Nats-* headers steer JetStream (the relay sets {MSG_ID} itself); rename it"
            ));
        }
        let name: HeaderName = k.parse().map_err(|_| {
            format!("headers key {k:?} is not a valid NATS header name (printable ASCII, no ':' or spaces)")
        })?;
        let value: HeaderValue = v
            .parse()
            .map_err(|_| format!("headers value of {k:?} contains a line break (CR or LF), which a NATS header cannot carry"))?;
        h.append(name, value);
    }
    let identity = [(MSG_ID, event_id.as_str())]
        .into_iter()
        .chain(m.identity(&event_id));
    for (k, v) in identity.chain(extra.iter().copied()) {
        let value: HeaderValue = v.parse().map_err(|_| {
            format!("{k} contains a line break (CR or LF), which a NATS header cannot carry")
        })?;
        h.insert(k, value);
    }
    Ok(h)
}

/// Bytes the server counts against `max_payload`: the encoded header block plus the
/// payload (`NATS/1.0\r\n`, `name: value\r\n` per header, a blank line).
pub fn wire_size(h: &HeaderMap, payload_len: usize) -> usize {
    let mut size = "NATS/1.0\r\n".len() + 2;
    for (name, values) in h.iter() {
        for v in values {
            let name: &str = name.as_ref();
            size += name.len() + 2 + v.as_str().len() + 2;
        }
    }
    size + payload_len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_from_template_and_destination() {
        let mut m = crate::model::sample_row(1, "42").to_message().unwrap();
        let t = "outbox.{aggregate_type}.{event_type}";
        assert_eq!(subject_for(t, &m), "outbox.order.order.created");
        m.destination = Some("billing.events".into());
        assert_eq!(subject_for(t, &m), "billing.events");
    }

    #[test]
    fn subject_rules() {
        assert!(check_subject("outbox.order.created").is_ok());
        assert!(check_subject("a").is_ok());
        assert!(check_subject("").is_err());
        for (bad, says) in [
            ("outbox.*.x", "wildcard"),
            ("outbox.>", "wildcard"),
            ("out box", "whitespace"),
            ("tab\there", "whitespace"),
            (".outbox", "empty token"),
            ("outbox.", "empty token"),
            ("a..b", "empty token"),
        ] {
            let e = check_subject(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(check_subject(&"a".repeat(MAX_SUBJECT + 1))
            .unwrap_err()
            .contains("max_control_line"));
    }

    #[test]
    fn template_rules() {
        assert!(check_template("outbox.{aggregate_type}.{event_type}").is_ok());
        assert!(check_template("events").is_ok());
        assert!(check_template("  ").is_err());
        assert!(check_template("o.{aggregate}")
            .unwrap_err()
            .contains("placeholder"));
        assert!(check_template("o.{aggregate_type}.*")
            .unwrap_err()
            .contains("wildcard"));
        assert!(check_template("o..{event_type}").is_err());
    }

    #[test]
    fn headers_carry_id_and_metadata_once() {
        let mut m = crate::model::sample_row(1, "42").to_message().unwrap();
        m.headers.push(("event_type".into(), "spoofed".into()));
        let h = headers(&m, &[("last_error", "boom")]).unwrap();
        let all = |k: &str| -> Vec<String> {
            h.get_all(k)
                .map(|v| v.as_str().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(all(MSG_ID), vec![m.event_id.to_string()]);
        assert_eq!(all("event_id"), vec![m.event_id.to_string()]);
        assert_eq!(all("event_type"), vec!["order.created".to_string()]);
        assert_eq!(all("aggregate_type"), vec!["order".to_string()]);
        assert_eq!(all("aggregate_id"), vec!["42".to_string()]);
        assert_eq!(all("traceparent"), vec!["00-abc-def-01".to_string()]);
        assert_eq!(all("last_error"), vec!["boom".to_string()]);
    }

    #[test]
    fn headers_nats_cannot_carry_are_refused_by_name() {
        let base = crate::model::sample_row(1, "42").to_message().unwrap();
        for ((k, v), says) in [
            (("Nats-Rollup", "all"), "reserved"),
            (("nats-msg-id", "x"), "reserved"),
            (("bad name", "x"), "not a valid NATS header name"),
            (("a:b", "x"), "not a valid NATS header name"),
            (("ok", "line\r\nInjected: 1"), "line break"),
        ] {
            let mut m = base.clone();
            m.headers.push((k.into(), v.into()));
            let e = headers(&m, &[]).unwrap_err();
            assert!(e.contains(says) && e.contains(k), "{k}: {e}");
        }
    }

    #[test]
    fn wire_size_counts_the_header_block() {
        let mut h = HeaderMap::new();
        h.insert("a", "bc");
        // "NATS/1.0\r\n" + "a: bc\r\n" + "\r\n" + 5 payload bytes
        assert_eq!(wire_size(&h, 5), 10 + 7 + 2 + 5);
    }
}
