//! The SPEC §2 SQS / SNS mapping as pure functions: a `Message` becomes an `Entry` (body
//! = payload JSON text; String attributes `event_id`, `event_type`, `aggregate_type`,
//! `aggregate_id` + every `headers` entry; FIFO targets get `MessageGroupId` =
//! aggregate_id and `MessageDeduplicationId` = event_id), refused before sending when it
//! breaks a service limit (10 attributes, 256 KiB, names and characters), and the
//! services' error codes become `SinkError`s (`classify_code`).

use crate::model::Message;
use crate::sink::SinkError;

/// Most message attributes SQS accepts on one message (SNS → SQS delivery likewise).
pub const MAX_ATTRIBUTES: usize = 10;
/// Largest message (body + attribute names, types and values) SNS accepts, and the
/// classic SQS limit: the relay holds both services to it (also the most one batch
/// request may carry in total).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Most entries in one `SendMessageBatch` / `PublishBatch`.
pub const MAX_BATCH_ENTRIES: usize = 10;
/// Longest `MessageGroupId`.
const MAX_GROUP_ID: usize = 128;
/// Longest attribute name.
const MAX_ATTRIBUTE_NAME: usize = 256;
/// The data type of every attribute the relay sets.
pub const STRING: &str = "String";
/// Longest `last_error` carried on a dead-lettered message.
const MAX_DEAD_LETTER_ERROR: usize = 1024;

/// One message ready for a batch entry (service-neutral).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub body: String,
    /// (name, String value), the standard ones first.
    pub attributes: Vec<(String, String)>,
    /// FIFO targets only.
    pub group_id: Option<String>,
    /// FIFO targets only.
    pub dedup_id: Option<String>,
    /// Bytes counted against `MAX_MESSAGE_BYTES`.
    pub size: usize,
}

/// A queue URL or topic ARN naming a FIFO queue / topic.
pub fn is_fifo(target: &str) -> bool {
    target.trim_end_matches('/').ends_with(".fifo")
}

/// The entry for `m` going to `target` through `service` ("SQS" / "SNS"), or why it
/// cannot be sent (a rejection before sending, naming the limit).
pub fn entry(m: &Message, target: &str, service: &str) -> Result<Entry, String> {
    build(m, target, service, &[], false)
}

/// The entry for a dead-lettered `m`: as `entry`, plus attributes `last_error`
/// (truncated) and `original_target`; `headers` entries that would pass the attribute
/// limit are left out rather than refusing the dead letter.
pub fn dead_letter_entry(
    m: &Message,
    target: &str,
    service: &str,
    error: &str,
    original: &str,
) -> Result<Entry, String> {
    let error = truncate(error, MAX_DEAD_LETTER_ERROR);
    let extra = [("last_error", error), ("original_target", original)];
    build(m, target, service, &extra, true)
}

fn build(
    m: &Message,
    target: &str,
    service: &str,
    extra: &[(&str, &str)],
    drop_excess_headers: bool,
) -> Result<Entry, String> {
    let event_id = m.event_id.to_string();
    let mut attributes: Vec<(String, String)> = vec![
        ("event_id".into(), event_id.clone()),
        ("event_type".into(), m.event_type.clone()),
        ("aggregate_type".into(), m.aggregate_type.clone()),
        ("aggregate_id".into(), m.aggregate_id.clone()),
    ];
    attributes.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let fixed = attributes.len();
    for (k, v) in &m.headers {
        // The relay's own attributes win over a header of the same name.
        if attributes[..fixed].iter().any(|(n, _)| n == k) {
            continue;
        }
        if drop_excess_headers && attributes.len() >= MAX_ATTRIBUTES {
            break;
        }
        attributes.push((k.clone(), v.clone()));
    }
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(format!(
            "{} message attributes ({fixed} set by the relay + {} from headers): {service} allows at most {MAX_ATTRIBUTES} per message; move headers into the payload",
            attributes.len(),
            attributes.len() - fixed
        ));
    }
    for (k, v) in &attributes {
        check_attribute_name(k).map_err(|why| format!("headers key {k:?}: {why}"))?;
        if v.is_empty() {
            return Err(format!(
                "attribute {k:?} is empty: {service} refuses empty attribute values"
            ));
        }
        if let Some(c) = v.chars().find(|c| !allowed_char(*c)) {
            return Err(format!(
                "attribute {k:?} holds the character {c:?}, which {service} does not accept"
            ));
        }
    }
    if let Some(c) = m.payload.chars().find(|c| !allowed_char(*c)) {
        return Err(format!(
            "payload holds the character {c:?}, which {service} does not accept in a message body"
        ));
    }
    let size = m.payload.len()
        + attributes
            .iter()
            .map(|(k, v)| k.len() + STRING.len() + v.len())
            .sum::<usize>();
    if size > MAX_MESSAGE_BYTES {
        return Err(format!(
            "message is {size} bytes (payload {} + attributes): over the {service} limit of {MAX_MESSAGE_BYTES} bytes (256 KiB)",
            m.payload.len()
        ));
    }
    let (group_id, dedup_id) = if is_fifo(target) {
        check_group_id(&m.aggregate_id).map_err(|why| {
            format!("aggregate_id cannot be the MessageGroupId of FIFO target {target}: {why}")
        })?;
        (Some(m.aggregate_id.clone()), Some(event_id))
    } else {
        (None, None)
    };
    Ok(Entry {
        body: m.payload.clone(),
        attributes,
        group_id,
        dedup_id,
        size,
    })
}

/// The characters SQS accepts in a body or attribute value (XML 1.0's).
fn allowed_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// SQS's attribute-name rules.
fn check_attribute_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_ATTRIBUTE_NAME {
        return Err(format!(
            "attribute names must be 1 to {MAX_ATTRIBUTE_NAME} characters long"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err("attribute names may hold only letters, digits, '_', '-' and '.'".into());
    }
    if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return Err("attribute names must not start or end with '.' nor hold '..'".into());
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("aws.") || lower.starts_with("amazon.") {
        return Err("attribute names starting with \"AWS.\" or \"Amazon.\" are reserved".into());
    }
    Ok(())
}

/// `MessageGroupId`: 1 to 128 ASCII letters, digits and punctuation.
fn check_group_id(id: &str) -> Result<(), String> {
    if id.len() > MAX_GROUP_ID {
        return Err(format!(
            "it is {} bytes long; the limit is {MAX_GROUP_ID}",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || c.is_ascii_punctuation()))
    {
        return Err(format!(
            "it holds {c:?}; only ASCII letters, digits and punctuation are allowed"
        ));
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What a service error means for the messages of the request (`status`: the HTTP
/// status, when the service answered). `what` names the target (e.g. `queue <url>`).
pub fn classify_code(
    service: &str,
    what: &str,
    code: Option<&str>,
    message: Option<&str>,
    status: Option<u16>,
) -> SinkError {
    let code_s = code.unwrap_or("unknown error");
    let detail = match message {
        Some(m) if !m.is_empty() => format!("{code_s}: {m}"),
        _ => code_s.to_string(),
    };
    if code.is_some_and(is_missing_target) {
        return SinkError::Rejected(format!("{service} {what} does not exist ({detail})"));
    }
    if code.is_some_and(is_throttling) || code.is_some_and(is_credentials) {
        return SinkError::Unavailable(format!(
            "{service} refused the request for {what}: {detail}"
        ));
    }
    match status {
        Some(s) if s < 500 => SinkError::Rejected(format!(
            "{service} rejected the message for {what}: {detail}"
        )),
        _ => SinkError::Unavailable(format!("{service} failed the request for {what}: {detail}")),
    }
}

/// One failed entry of a batch answer: the sender's fault is a rejection; the
/// service's own fault is retried without spending an attempt.
pub fn entry_error(
    service: &str,
    what: &str,
    sender_fault: bool,
    code: &str,
    message: Option<&str>,
) -> SinkError {
    let detail = match message {
        Some(m) if !m.is_empty() => format!("{code}: {m}"),
        _ => code.to_string(),
    };
    if sender_fault && !is_throttling(code) {
        SinkError::Rejected(format!(
            "{service} rejected the message for {what}: {detail}"
        ))
    } else {
        SinkError::Unavailable(format!(
            "{service} could not take the message for {what}: {detail}"
        ))
    }
}

pub fn is_missing_target(code: &str) -> bool {
    matches!(
        code,
        "AWS.SimpleQueueService.NonExistentQueue"
            | "QueueDoesNotExist"
            | "NotFound"
            | "NotFoundException"
    )
}

fn is_throttling(code: &str) -> bool {
    matches!(
        code,
        "Throttling"
            | "ThrottlingException"
            | "ThrottledException"
            | "RequestThrottled"
            | "RequestThrottledException"
            | "TooManyRequestsException"
            | "RequestLimitExceeded"
            | "KMSThrottling"
            | "KMSThrottlingException"
            | "ServiceUnavailable"
            | "InternalError"
            | "InternalFailure"
    )
}

/// The credentials are wrong or expired: nothing about this message; the relay waits
/// for the credential chain to give working ones.
fn is_credentials(code: &str) -> bool {
    matches!(
        code,
        "InvalidClientTokenId"
            | "UnrecognizedClientException"
            | "ExpiredToken"
            | "ExpiredTokenException"
            | "SignatureDoesNotMatch"
            | "MissingAuthenticationToken"
            | "IncompleteSignature"
            | "InvalidSecurity"
            | "RequestExpired"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sample_row;

    const QUEUE: &str = "http://127.0.0.1:5000/123456789012/orders";

    fn message() -> Message {
        sample_row(1, "42").to_message().unwrap()
    }

    #[test]
    fn standard_entry_carries_spec_attributes() {
        let m = message();
        let e = entry(&m, QUEUE, "SQS").unwrap();
        assert_eq!(e.body, m.payload);
        let names: Vec<&str> = e.attributes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "event_id",
                "event_type",
                "aggregate_type",
                "aggregate_id",
                "traceparent"
            ]
        );
        assert_eq!(e.attributes[0].1, m.event_id.to_string());
        assert_eq!(e.attributes[3].1, "42");
        assert_eq!(e.group_id, None);
        assert_eq!(e.dedup_id, None);
        assert!(e.size > m.payload.len());
    }

    #[test]
    fn fifo_entry_has_group_and_dedup_ids() {
        let m = message();
        let e = entry(&m, &format!("{QUEUE}.fifo"), "SQS").unwrap();
        assert_eq!(e.group_id.as_deref(), Some("42"));
        assert_eq!(e.dedup_id, Some(m.event_id.to_string()));
        assert!(is_fifo("arn:aws:sns:us-east-1:1:t.fifo"));
        assert!(!is_fifo(QUEUE));
        let mut m = message();
        m.aggregate_id = "x".repeat(129);
        let why = entry(&m, "q.fifo", "SQS").unwrap_err();
        assert!(why.contains("limit is 128"), "{why}");
        m.aggregate_id = "a b".into();
        assert!(entry(&m, "q.fifo", "SQS").is_err());
        assert!(entry(&m, QUEUE, "SQS").is_ok());
    }

    #[test]
    fn limits_are_refused_before_sending() {
        let mut m = message();
        m.headers = (0..7).map(|i| (format!("h{i}"), "v".to_string())).collect();
        let why = entry(&m, QUEUE, "SQS").unwrap_err();
        assert!(why.contains("at most 10"), "{why}");
        m.headers.pop();
        assert_eq!(entry(&m, QUEUE, "SQS").unwrap().attributes.len(), 10);
        // A header named like a relay attribute does not add one.
        m.headers.push(("event_id".into(), "forged".into()));
        let e = entry(&m, QUEUE, "SQS").unwrap();
        assert_eq!(e.attributes[0].1, m.event_id.to_string());

        let mut m = message();
        m.payload = format!("\"{}\"", "x".repeat(MAX_MESSAGE_BYTES));
        let why = entry(&m, QUEUE, "SNS").unwrap_err();
        assert!(why.contains("262144 bytes (256 KiB)"), "{why}");

        let mut m = message();
        m.headers = vec![("AWS.trace".into(), "x".into())];
        assert!(entry(&m, QUEUE, "SQS").unwrap_err().contains("reserved"));
        m.headers = vec![("has space".into(), "x".into())];
        assert!(entry(&m, QUEUE, "SQS").is_err());
        m.headers = vec![("empty".into(), String::new())];
        assert!(entry(&m, QUEUE, "SQS").unwrap_err().contains("empty"));
        m.headers = vec![("ctl".into(), "a\u{1}b".into())];
        assert!(entry(&m, QUEUE, "SQS").is_err());
    }

    #[test]
    fn dead_letters_fit_the_limit() {
        let mut m = message();
        m.headers = (0..9).map(|i| (format!("h{i}"), "v".to_string())).collect();
        let e = dead_letter_entry(&m, QUEUE, "SQS", &"e".repeat(5000), QUEUE).unwrap();
        assert_eq!(e.attributes.len(), MAX_ATTRIBUTES);
        assert_eq!(e.attributes[4].0, "last_error");
        assert_eq!(e.attributes[4].1.len(), 1024);
        assert_eq!(e.attributes[5], ("original_target".into(), QUEUE.into()));
    }

    #[test]
    fn errors_are_classified() {
        let missing = classify_code(
            "SQS",
            "queue q",
            Some("AWS.SimpleQueueService.NonExistentQueue"),
            Some("The specified queue does not exist."),
            Some(400),
        );
        assert!(matches!(&missing, SinkError::Rejected(w) if w.contains("queue q does not exist")));
        let e = classify_code("SNS", "topic t", Some("NotFound"), None, Some(404));
        assert!(matches!(e, SinkError::Rejected(_)));
        let e = classify_code(
            "SQS",
            "queue q",
            Some("ThrottlingException"),
            None,
            Some(400),
        );
        assert!(e.is_retryable());
        let e = classify_code("SQS", "queue q", Some("ExpiredToken"), None, Some(403));
        assert!(e.is_retryable());
        let e = classify_code("SQS", "queue q", Some("InternalError"), None, Some(500));
        assert!(e.is_retryable());
        let e = classify_code("SQS", "queue q", None, None, Some(503));
        assert!(e.is_retryable());
        let e = classify_code(
            "SQS",
            "queue q",
            Some("InvalidParameterValue"),
            None,
            Some(400),
        );
        assert!(matches!(e, SinkError::Rejected(_)));
        let e = entry_error(
            "SQS",
            "queue q",
            true,
            "InvalidMessageContents",
            Some("bad"),
        );
        assert!(matches!(&e, SinkError::Rejected(w) if w.contains("InvalidMessageContents: bad")));
        assert!(entry_error("SQS", "queue q", false, "InternalError", None).is_retryable());
    }
}
