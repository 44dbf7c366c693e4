//! NATS JetStream sink (async-nats): the SPEC §2 mapping (subject = `destination` or the
//! `nats.subject` template, `Nats-Msg-Id` = event_id, metadata and row headers, payload
//! JSON as the body); `send` publishes one message and returns its JetStream publish
//! ack, so the engine keeps many outstanding.
//!
//! Invariants:
//! - a message is `Ok(())` only from its own JetStream publish ack (a `duplicate: true`
//!   ack is a success: the stream already holds that event_id);
//! - a subject is published to only after JetStream said a stream captures it (looked
//!   up, then trusted for a while): a subject no stream captures is `Rejected` by name,
//!   while JetStream not answering (down, restarting, recovering) is `Unavailable`;
//! - a message the server could not take whole (over its `max_payload`, a bad subject or
//!   header) is rejected before it is sent: the server would close the connection;
//! - an ack not back within `relay.publish_timeout` is the engine's stall verdict (the
//!   client's own ack timeout is a little longer): the engine closes the sink, so
//!   nothing more goes out through a connection that stopped answering;
//! - the client gives up after one failed reconnect, dropping what it still buffered;
//!   the engine then reconnects with a new client. A copy still buffered by an old
//!   client can only reach the stream with the same `Nats-Msg-Id`, which JetStream drops
//!   inside its duplicate window;
//! - credentials are taken out of the URL before the client sees it, and never printed.

mod config;
mod outcome;
pub mod tap;
pub mod wire;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::{self, Context};
use async_nats::{Client, ConnectOptions};

use super::{Confirm, Sink, SinkError};
use crate::model::Message;
use crate::secret::Secret;
pub use config::NatsConfig;
use outcome::{lookup_failed, publish_failed};
use wire::{check_subject, headers, subject_for, wire_size};

/// How long a subject seen captured by a stream is trusted without asking again.
const CAPTURED_TTL: Duration = Duration::from_secs(30);
/// Most subjects remembered as captured (rows' destinations may name many).
const CAPTURED_MAX: usize = 10_000;
/// Publish acks outstanding at once (above the engine's largest window).
const MAX_ACKS: usize = 100_000;
/// Slack of the client's own ack timeout past the engine's: a stalled connection is
/// the engine's verdict (it closes the sink, so nothing is re-sent through it).
const ACK_GRACE: Duration = Duration::from_secs(2);
/// How often the client pings an idle connection (two unanswered pings break it).
const PING_INTERVAL: Duration = Duration::from_secs(10);

/// Subjects JetStream said a stream captures, and when.
type Captured = Arc<Mutex<HashMap<String, Instant>>>;

/// The relay's JetStream publisher (invariants in the module doc).
pub struct NatsSink {
    url: Secret,
    ca_file: Option<PathBuf>,
    template: String,
    dead_letter_subject: Option<String>,
    timeout: Duration,
    client: Option<Client>,
    js: Option<Context>,
    captured: Captured,
}

impl NatsSink {
    pub fn new(cfg: &NatsConfig, timeout: Duration) -> Result<Self, SinkError> {
        // Fails here (a config error) rather than at the first connect.
        server_addr(&cfg.url)?;
        Ok(Self {
            url: cfg.url.clone(),
            ca_file: cfg.ca_file.clone(),
            template: cfg.subject.clone(),
            dead_letter_subject: cfg.dead_letter_subject.clone(),
            timeout,
            client: None,
            js: None,
            captured: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The subject a message goes to (SPEC §2).
    pub fn subject_for(&self, m: &Message) -> String {
        subject_for(&self.template, m)
    }

    fn connected(&self) -> bool {
        self.client
            .as_ref()
            .is_some_and(|c| c.connection_state() == State::Connected)
    }

    /// The connection's client and JetStream context, connecting first if needed.
    async fn ensure(&mut self) -> Result<(Client, Context), SinkError> {
        if !self.connected() {
            self.open().await?;
        }
        match (&self.client, &self.js) {
            (Some(c), Some(js)) => Ok((c.clone(), js.clone())),
            _ => Err(SinkError::Unavailable("not connected".into())),
        }
    }

    async fn open(&mut self) -> Result<(), SinkError> {
        self.drop_client();
        let client = connect(&self.url, self.ca_file.as_ref(), self.timeout).await?;
        if !client.server_info().jetstream {
            return Err(SinkError::Unavailable(format!(
                "the NATS server at {} does not have JetStream enabled",
                display_url(&self.url)
            )));
        }
        let js = jetstream::ContextBuilder::new()
            .timeout(self.timeout + ACK_GRACE)
            .ack_timeout(self.timeout + ACK_GRACE)
            .max_ack_inflight(MAX_ACKS)
            .build(client.clone());
        self.client = Some(client);
        self.js = Some(js);
        Ok(())
    }

    /// Forget the connection: the client's handler ends once nothing uses it, dropping
    /// whatever it had not written.
    fn drop_client(&mut self) {
        self.js = None;
        self.client = None;
    }

    /// `Ok` when a stream captures `subject` (asking JetStream unless seen lately).
    async fn check_captured(&self, js: &Context, subject: &str) -> Result<(), SinkError> {
        let now = Instant::now();
        if let Ok(seen) = self.captured.lock() {
            if seen
                .get(subject)
                .is_some_and(|t| now.duration_since(*t) <= CAPTURED_TTL)
            {
                return Ok(());
            }
        }
        let asked = tokio::time::timeout(self.timeout, js.stream_by_subject(subject)).await;
        match asked {
            Err(_) => Err(SinkError::Unavailable(format!(
                "JetStream did not say within {:?} which stream captures subject {subject:?}",
                self.timeout
            ))),
            Ok(Err(e)) => Err(lookup_failed(&e, subject)),
            Ok(Ok(_stream)) => {
                if let Ok(mut seen) = self.captured.lock() {
                    if seen.len() >= CAPTURED_MAX {
                        seen.retain(|_, t| now.duration_since(*t) <= CAPTURED_TTL);
                    }
                    if seen.len() < CAPTURED_MAX {
                        seen.insert(subject.to_string(), now);
                    }
                }
                Ok(())
            }
        }
    }

    /// Publish `body` with `h` to `subject` (checked: captured, within `max_payload`) and
    /// return the confirm awaiting its ack.
    async fn publish(
        &mut self,
        subject: String,
        h: async_nats::HeaderMap,
        body: &str,
    ) -> Result<Confirm, SinkError> {
        let (client, js) = self.ensure().await?;
        let max = client.server_info().max_payload;
        let size = wire_size(&h, body.len());
        if max > 0 && size > max {
            return Err(SinkError::Rejected(format!(
                "message is {size} bytes with its headers ({} of payload), more than the NATS server's max_payload ({max} bytes)",
                body.len()
            )));
        }
        self.check_captured(&js, &subject).await?;
        let timeout = self.timeout + ACK_GRACE;
        let ack = js
            .publish_with_headers(subject.clone(), h, body.to_string().into())
            .await
            .map_err(|e| publish_failed(&e, &subject, timeout))?;
        let captured = self.captured.clone();
        Ok(Box::pin(async move {
            match ack.await {
                Ok(_ack) => Ok(()),
                Err(e) => {
                    if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                        if let Ok(mut seen) = captured.lock() {
                            seen.remove(&subject);
                        }
                    }
                    Err(publish_failed(&e, &subject, timeout))
                }
            }
        }))
    }
}

impl Sink for NatsSink {
    async fn connect(&mut self) -> Result<(), SinkError> {
        if self.connected() {
            return Ok(());
        }
        let (_, js) = self.ensure().await?;
        if let Some(dl) = self.dead_letter_subject.clone() {
            if let Err(e) = self.check_captured(&js, &dl).await {
                tracing::warn!(subject = %dl, error = %e, "nats.dead_letter_subject is not usable; failed rows will not be dead-lettered until it is");
            }
        }
        Ok(())
    }

    async fn send(&mut self, m: &Message) -> Result<Confirm, SinkError> {
        let subject = self.subject_for(m);
        check_subject(&subject).map_err(SinkError::Rejected)?;
        let h = headers(m, &[]).map_err(SinkError::Rejected)?;
        self.publish(subject, h, &m.payload).await
    }

    async fn dead_letter(
        &mut self,
        message: &Message,
        error: &str,
    ) -> Result<Option<Confirm>, SinkError> {
        let Some(dl) = self.dead_letter_subject.clone() else {
            return Ok(None);
        };
        let original = self.subject_for(message);
        let error = error.replace(['\r', '\n'], " ");
        let extra = [
            ("last_error", error.as_str()),
            ("original_subject", original.as_str()),
        ];
        let h = headers(message, &extra)
            .map_err(|why| SinkError::Rejected(format!("not dead-lettered: {why}")))?;
        self.publish(dl, h, &message.payload).await.map(Some)
    }

    fn is_connected(&self) -> bool {
        self.connected()
    }

    /// A PING/PONG round trip on the connection (`flush`).
    fn probe(&self, within: Duration) -> Confirm {
        let Some(client) = self.client.clone().filter(|_| self.connected()) else {
            return super::decided(Err(SinkError::Unavailable("not connected".into())));
        };
        Box::pin(async move {
            match tokio::time::timeout(within, client.flush()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(SinkError::Unavailable(format!("NATS probe failed: {e}"))),
                Err(_) => Err(SinkError::Unavailable(format!(
                    "no answer to a probe within {within:?}"
                ))),
            }
        })
    }

    async fn close(&mut self) {
        self.drop_client();
        if let Ok(mut seen) = self.captured.lock() {
            seen.clear();
        }
    }
}

/// Connect a client to `url` (credentials passed as options, never in the URL the
/// client sees), giving up after one failed reconnect. Shared by the sink, the demo's
/// tap, the tests and the tools.
pub async fn connect(
    url: &Secret,
    ca_file: Option<&PathBuf>,
    timeout: Duration,
) -> Result<Client, SinkError> {
    let (addr, auth) = server_addr(url)?;
    let mut opts = match auth {
        Auth::UserPassword(u, p) => ConnectOptions::with_user_and_password(u, p),
        Auth::Token(t) => ConnectOptions::with_token(t),
        Auth::None => ConnectOptions::new(),
    }
    .name("outbox-relay")
    .max_reconnects(1)
    .connection_timeout(timeout)
    .request_timeout(Some(timeout))
    .ping_interval(PING_INTERVAL);
    if let Some(ca) = ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    let shown = display_url(url);
    match tokio::time::timeout(timeout + Duration::from_secs(1), opts.connect(addr)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(SinkError::Unavailable(format!(
            "cannot connect to NATS at {shown}: {e}"
        ))),
        Err(_) => Err(SinkError::Unavailable(format!(
            "no answer from NATS at {shown} within {timeout:?}"
        ))),
    }
}

/// Credentials carried by a `nats.url`.
enum Auth {
    UserPassword(String, String),
    Token(String),
    None,
}

/// The URL without its userinfo, and the credentials it carried (`user:password@`, or a
/// lone `token@`), percent-decoded.
fn server_addr(url: &Secret) -> Result<(String, Auth), SinkError> {
    let mut u = url::Url::parse(url.expose())
        .map_err(|e| SinkError::Unavailable(format!("nats.url is not a URL: {e}")))?;
    let user = percent_decode(u.username());
    let auth = match u.password().map(percent_decode) {
        Some(p) => Auth::UserPassword(user, p),
        None if !user.is_empty() => Auth::Token(user),
        None => Auth::None,
    };
    // Infallible for URLs with a host (checked by the config).
    let _ = u.set_username("");
    let _ = u.set_password(None);
    Ok((u.to_string(), auth))
}

/// `url` fit for printing: scheme, `***@` when it carries credentials, host and port.
pub fn display_url(url: &Secret) -> String {
    match url::Url::parse(url.expose()) {
        Ok(u) => {
            let creds = if u.username().is_empty() && u.password().is_none() {
                ""
            } else {
                "***@"
            };
            format!(
                "{}://{creds}{}:{}",
                u.scheme(),
                u.host_str().unwrap_or(""),
                u.port().unwrap_or(4222)
            )
        }
        Err(_) => "(invalid nats.url)".into(),
    }
}

/// `%XX` sequences decoded (bytes that do not form UTF-8 are replaced).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url() {
        let (addr, auth) = server_addr(&Secret::new("nats://app:p%40ss@h:4222")).unwrap();
        assert_eq!(addr, "nats://h:4222");
        assert!(matches!(auth, Auth::UserPassword(u, p) if u == "app" && p == "p@ss"));
        let (addr, auth) = server_addr(&Secret::new("tls://tok3n@h:4443")).unwrap();
        assert_eq!(addr, "tls://h:4443");
        assert!(matches!(auth, Auth::Token(t) if t == "tok3n"));
        let (_, auth) = server_addr(&Secret::new("nats://h")).unwrap();
        assert!(matches!(auth, Auth::None));
    }

    #[test]
    fn urls_print_without_credentials() {
        for (url, shown) in [
            ("nats://app:hunter2@h:4222", "nats://***@h:4222"),
            ("nats://tok3n-hunter2@h", "nats://***@h:4222"),
            ("tls://h:4443", "tls://h:4443"),
        ] {
            assert_eq!(display_url(&Secret::new(url)), shown);
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%20c"), "a/b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
