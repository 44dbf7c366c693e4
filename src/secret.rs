//! Secrets and their redaction: the `Secret` string type, redaction of URLs and free text
//! (userinfo passwords, `password=` / `sslpassword=` parameters), which Kafka properties
//! hold secrets, and the process-wide set of secret values that every log line and
//! error the binary prints is scrubbed of (`scrub`).
//!
//! Invariant: anything the relay prints about a URL or a configured secret goes through
//! `redact_url` / `redact_text` / `scrub`; the raw value only reaches client libraries
//! (`Secret::expose`).

use std::fmt;
use std::sync::{OnceLock, RwLock};

use regex::{Captures, Regex};
use serde::{Deserialize, Deserializer};

/// A string that holds credentials (a URL with a password). `Debug`/`Display` redact it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The real value: only for handing to a client library, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The value with any password replaced by `***`, fit for logs.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.redacted())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Replace every password in a URL (or in a text holding URLs) with `***`: the
/// userinfo password and the value of any secret query parameter (`password=`,
/// `sslpassword=`, …, also when the key is percent-encoded).
pub fn redact_url(s: &str) -> String {
    redact_text(s)
}

/// The three patterns `redact_text` masks (compiled once; `None` never happens with
/// these static patterns, and would make `redact_text` mask the whole text).
struct Patterns {
    /// A URL's `scheme://user:password@`: group 1 keeps up to the colon; the password
    /// runs to the last `@` of the token (over-masking is safe; quotes and the JSON
    /// escape character end it).
    userinfo: Regex,
    /// A query parameter `?key=value` / `&key=value` (the key is checked once decoded).
    param: Regex,
    /// A bare `password=value` (libpq key/value style, or a parameter in a message).
    bare: Regex,
}

fn patterns() -> Option<&'static Patterns> {
    static P: OnceLock<Option<Patterns>> = OnceLock::new();
    P.get_or_init(|| {
        Some(Patterns {
            userinfo: Regex::new(r#"([A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@"'`\\]*:)[^\s"'`\\]*@"#)
                .ok()?,
            param: Regex::new(r#"([?&;])([^=&#\s"'`\\]+)=([^&#\s"'`\\]*)"#).ok()?,
            bare: Regex::new(r#"(?i)\b((?:ssl)?pass(?:word|wd)\s*=\s*)('[^']*'|[^&#\s"'`\\,;)]+)"#)
                .ok()?,
        })
    })
    .as_ref()
}

/// Whether a URL query parameter (or connection-string key) carries a secret.
pub fn is_secret_key(key: &str) -> bool {
    let k = url::form_urlencoded::parse(format!("{key}=").as_bytes())
        .next()
        .map(|(k, _)| k.to_ascii_lowercase())
        .unwrap_or_else(|| key.to_ascii_lowercase());
    ["password", "passwd", "secret", "token", "apikey", "api_key"]
        .iter()
        .any(|s| k.contains(s))
}

/// Redact every URL password and secret parameter in `text`, leaving the rest as it is
/// (safe on JSON log lines: nothing is re-encoded).
pub fn redact_text(text: &str) -> String {
    let Some(p) = patterns() else {
        return "***".into();
    };
    let out = p.userinfo.replace_all(text, "${1}***@");
    let out = p.param.replace_all(&out, |c: &Captures| {
        if is_secret_key(&c[2]) && !c[3].is_empty() && &c[3] != "***" {
            format!("{}{}=***", &c[1], &c[2])
        } else {
            c[0].to_string()
        }
    });
    p.bare.replace_all(&out, "${1}***").into_owned()
}

/// Is this Kafka (librdkafka) property's value a secret (never to be printed)?
pub fn is_secret_property(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.ends_with(".pem")
        || (k.starts_with("ssl.") && k.contains("key") && !k.ends_with(".location"))
        || k.contains("oauthbearer.config")
        || k == "sasl.jaas.config"
}

/// Secret values shorter than this are masked only where they sit in a URL or a
/// `password=` parameter: masking a two-letter value everywhere would garble logs.
const MIN_KNOWN_LEN: usize = 4;

fn known() -> &'static RwLock<Vec<String>> {
    static KNOWN: OnceLock<RwLock<Vec<String>>> = OnceLock::new();
    KNOWN.get_or_init(|| RwLock::new(Vec::new()))
}

/// Remember secret values (passwords, Kafka secret properties) so `scrub` masks them
/// wherever they appear, also percent-decoded or escaped as in JSON and `Debug`.
pub fn register_secrets<I: IntoIterator<Item = String>>(values: I) {
    let mut forms = Vec::new();
    for v in values {
        let decoded = url::form_urlencoded::parse(format!("x={v}").as_bytes())
            .next()
            .map(|(_, d)| d.into_owned())
            .unwrap_or_default();
        for f in [v.clone(), decoded] {
            let json = unquote(serde_json::to_string(&f).unwrap_or_default());
            let debug = unquote(format!("{f:?}"));
            forms.extend([f, json, debug]);
        }
    }
    let Ok(mut set) = known().write() else { return };
    for f in forms {
        if f.chars().count() >= MIN_KNOWN_LEN && !set.contains(&f) {
            set.push(f);
        }
    }
    // Longest first, so a value containing another is masked whole.
    set.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// A quoted literal without its one opening and one closing quote.
fn unquote(s: String) -> String {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .map_or_else(String::new, str::to_string)
}

/// `redact_text`, then every registered secret value replaced by `***`: what every log
/// line and error the binary prints goes through.
pub fn scrub(text: &str) -> String {
    let mut out = redact_text(text);
    if let Ok(set) = known().read() {
        for v in set.iter() {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), "***");
            }
        }
    }
    out
}

/// The password of a URL (userinfo, percent-decoded too) and its secret query
/// parameters' values: what `register_secrets` needs to know about a URL.
pub fn url_secrets(s: &str) -> Vec<String> {
    let Ok(u) = url::Url::parse(s) else {
        return Vec::new();
    };
    let mut out: Vec<String> = u.password().map(str::to_string).into_iter().collect();
    out.extend(
        u.query_pairs()
            .filter(|(k, v)| is_secret_key(k) && !v.is_empty())
            .map(|(_, v)| v.into_owned()),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints_password() {
        let s = Secret::new("postgres://app:hunter2@db:5432/x");
        assert!(!format!("{s} {s:?}").contains("hunter2"));
        assert!(s.redacted().contains("app:***@db"));
        assert_eq!(s.expose(), "postgres://app:hunter2@db:5432/x");
    }

    #[test]
    fn query_passwords_are_redacted() {
        for url in [
            "postgres://u@host/db?password=hunter2",
            "postgres://u@host/db?sslmode=require&password=hunter2&x=1",
            "postgres://u@host/db?sslpassword=hunter2",
            "postgres://u@host/db?PASSWORD=hunter2",
            "postgres://u@host/db?pass%77ord=hunter2",
            "postgres://u:hunter2@host/db?password=hunter2",
            "amqp://guest:hunter2@127.0.0.1:5672/%2f",
            "amqps://guest:hunter2@h/%2f?heartbeat=10",
        ] {
            let r = redact_url(url);
            assert!(!r.contains("hunter2"), "{url} → {r}");
            assert!(r.contains("***"), "{url} → {r}");
        }
        let r = redact_url("postgres://u@host/db?sslmode=require&password=x&application_name=a");
        assert_eq!(
            r,
            "postgres://u@host/db?sslmode=require&password=***&application_name=a"
        );
        assert_eq!(
            redact_url("postgres://u@host/db"),
            "postgres://u@host/db",
            "nothing secret, nothing changed"
        );
    }

    #[test]
    fn text_and_json_lines_are_redacted_in_place() {
        let line = r#"{"error":"cannot connect to amqp://app:s3cret-pw@mq:5672/%2f: refused","db":"postgres://x@h/d?password=s3cret-pw"}"#;
        let r = redact_text(line);
        assert!(!r.contains("s3cret-pw"), "{r}");
        assert!(r.contains(r#"amqp://app:***@mq:5672/%2f: refused""#), "{r}");
        assert!(r.contains(r#"?password=***"}"#), "{r}");
        let r = redact_text("host=db user=app password=s3cret-pw dbname=x");
        assert_eq!(r, "host=db user=app password=*** dbname=x");
    }

    #[test]
    fn registered_values_are_scrubbed_in_every_form() {
        register_secrets(["pa\"ss w%2Frd-9f3".to_string()]);
        for text in [
            "raw pa\"ss w%2Frd-9f3 here",
            "decoded pa\"ss w/rd-9f3 here",
            r#"{"json":"pa\"ss w%2Frd-9f3"}"#,
        ] {
            let s = scrub(text);
            assert!(!s.contains("w%2Frd-9f3") && !s.contains("w/rd-9f3"), "{s}");
        }
        assert!(url_secrets("postgres://u:a%40b@h/d?password=qq&sslmode=x")
            .iter()
            .any(|v| v == "a%40b"));
        assert!(url_secrets("postgres://u@h/d?password=qq")
            .iter()
            .any(|v| v == "qq"));
    }

    #[test]
    fn secret_properties() {
        for k in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
        ] {
            assert!(is_secret_property(k), "{k}");
        }
        for k in ["sasl.username", "ssl.key.location", "bootstrap.servers"] {
            assert!(!is_secret_property(k), "{k}");
        }
    }
}
