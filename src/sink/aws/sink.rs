//! The one AWS sink (`AwsSink<S>`): rows go to the target in `destination`, else the
//! configured default, as batch entries through the `Batcher`; `connect` and `probe` ask
//! the service about the default target. What differs between SQS and SNS (config keys,
//! client, the "does it exist" call, the batch request) is the `Service` `S`.

use std::future::Future;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};

use super::batcher::{self, Batcher, Publish};
use super::{client, wire, wire::Entry};
use crate::model::Message;
use crate::sink::{decided, Confirm, Sink, SinkError};

/// What one AWS messaging service brings to `AwsSink`.
pub trait Service: Send + 'static {
    type Config: Clone + Send + Sync + 'static;
    type Client: Clone + Send + Sync + 'static;
    /// Its batch request (which also names the service in messages).
    type Publisher: BatchRequest;
    /// The key of the default target (`sqs.queue_url`).
    const TARGET_KEY: &'static str;
    /// The key of the dead-letter target (`sqs.dead_letter_queue_url`).
    const DEAD_LETTER_KEY: &'static str;

    fn validate(cfg: &Self::Config) -> Result<(), String>;
    /// (default target, dead-letter target, region, endpoint).
    fn targets(cfg: &Self::Config) -> (&str, Option<&str>, &str, &str);
    fn client(sdk: &SdkConfig) -> Self::Client;
    fn publisher(client: Self::Client) -> Self::Publisher;
    /// Whether `target` is a well-formed queue URL / topic ARN.
    fn check_target(target: &str) -> Result<(), String>;
    /// Ask the service, within `within`, whether `target` exists: `Ok` when it answered
    /// that it does, `Rejected` when it answered that it does not.
    fn ask(
        client: &Self::Client,
        target: &str,
        within: Duration,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// The relay's publisher to one AWS service.
pub struct AwsSink<S: Service> {
    cfg: S::Config,
    timeout: Duration,
    client: Option<S::Client>,
    batcher: Option<Batcher>,
}

impl<S: Service> AwsSink<S> {
    /// The service's name in messages ("SQS").
    const NAME: &'static str = <S::Publisher as BatchRequest>::SERVICE;

    /// Validate the section; the client is made by `connect`.
    pub fn new(cfg: &S::Config, timeout: Duration) -> Result<Self, SinkError> {
        S::validate(cfg).map_err(SinkError::Rejected)?;
        Ok(Self {
            cfg: cfg.clone(),
            timeout,
            client: None,
            batcher: None,
        })
    }

    /// The queue / topic a message goes to (SPEC §2).
    pub fn target_for<'a>(&'a self, m: &'a Message) -> &'a str {
        m.destination.as_deref().unwrap_or(S::targets(&self.cfg).0)
    }

    async fn client(&mut self) -> S::Client {
        if let Some(c) = &self.client {
            return c.clone();
        }
        let (_, _, region, endpoint) = S::targets(&self.cfg);
        let sdk = client::sdk_config(region, endpoint, self.timeout).await;
        let c = S::client(&sdk);
        self.client = Some(c.clone());
        c
    }

    fn submit(&self, target: &str, entry: Result<Entry, String>) -> Result<Confirm, SinkError> {
        let batcher = self
            .batcher
            .as_ref()
            .ok_or_else(|| SinkError::Unavailable("not connected".into()))?;
        let entry = entry.map_err(SinkError::Rejected)?;
        batcher.submit(target.to_string(), entry)
    }
}

impl<S: Service> Sink for AwsSink<S> {
    async fn connect(&mut self) -> Result<(), SinkError> {
        let client = self.client().await;
        let (target, dead_letter, _, _) = S::targets(&self.cfg);
        let (target, dead_letter) = (target.to_string(), dead_letter.map(str::to_string));
        match S::ask(&client, &target, self.timeout).await {
            Ok(()) => {}
            // A missing default target: the service answers, but nothing can be sent;
            // keep waiting for it (no row spends an attempt on a configuration error).
            Err(SinkError::Rejected(why)) => {
                return Err(SinkError::Unavailable(format!("{}: {why}", S::TARGET_KEY)))
            }
            Err(e) => return Err(e),
        }
        if let Some(dl) = &dead_letter {
            if let Err(e) = S::ask(&client, dl, self.timeout).await {
                tracing::warn!(target = %dl, error = %e, "{} is not usable; failed rows will not be dead-lettered until it is", S::DEAD_LETTER_KEY);
            }
        }
        match &self.batcher {
            // The service answered: what is still in flight carries on.
            Some(b) if b.is_running() => b.mark_up(),
            _ => self.batcher = Some(Batcher::start(S::publisher(client))),
        }
        Ok(())
    }

    async fn send(&mut self, m: &Message) -> Result<Confirm, SinkError> {
        let target = self.target_for(m).to_string();
        S::check_target(&target)
            .map_err(|why| SinkError::Rejected(format!("destination: {why}")))?;
        self.submit(&target, wire::entry(m, &target, Self::NAME))
    }

    async fn dead_letter(
        &mut self,
        message: &Message,
        error: &str,
    ) -> Result<Option<Confirm>, SinkError> {
        let Some(dl) = S::targets(&self.cfg).1.map(str::to_string) else {
            return Ok(None);
        };
        let original = self.target_for(message).to_string();
        let entry = wire::dead_letter_entry(message, &dl, Self::NAME, error, &original);
        self.submit(&dl, entry).map(Some)
    }

    fn is_connected(&self) -> bool {
        self.batcher.as_ref().is_some_and(Batcher::is_up)
    }

    fn probe(&self, within: Duration) -> Confirm {
        let Some(client) = self.client.clone() else {
            return decided(Err(SinkError::Unavailable("not connected".into())));
        };
        let target = S::targets(&self.cfg).0.to_string();
        Box::pin(async move {
            match S::ask(&client, &target, within).await {
                // The service answered (even "no such queue / topic"): it is reachable.
                Ok(()) | Err(SinkError::Rejected(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    fn confirm_timeout(&self, publish_timeout: Duration) -> Duration {
        // The request itself is bounded by publish_timeout; add the batcher's linger.
        publish_timeout + batcher::LINGER + Duration::from_secs(1)
    }

    async fn close(&mut self) {
        if let Some(b) = self.batcher.take() {
            b.close();
        }
    }
}

/// Whether the service answered `call` about `what` within `within`: `Ok` on success,
/// its verdict on an error, `Unavailable` on silence.
pub async fn answered<T, E>(
    service: &str,
    what: &str,
    within: Duration,
    call: impl Future<Output = Result<T, SdkError<E, HttpResponse>>>,
) -> Result<(), SinkError>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match tokio::time::timeout(within, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(client::classify(service, what, &e).0),
        Err(_) => Err(SinkError::Unavailable(format!(
            "{service} did not answer about {what} within {within:?}"
        ))),
    }
}

/// The outcome of each entry of one batch request, filled from the reply by entry id
/// (the entry's index).
struct Outcomes {
    slots: Vec<Option<Result<(), SinkError>>>,
}

impl Outcomes {
    fn new(n: usize) -> Self {
        Self {
            slots: vec![None; n],
        }
    }

    /// Entry `i` could not even be built.
    fn refused(&mut self, i: usize, why: SinkError) {
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = Some(Err(why));
        }
    }

    /// The reply says entry `id` succeeded (`Ok`) or failed.
    fn answer(&mut self, id: &str, outcome: Result<(), SinkError>) {
        if let Some(slot) = id.parse::<usize>().ok().and_then(|i| self.slots.get_mut(i)) {
            *slot = Some(outcome);
        }
    }

    /// Every entry's outcome; one the reply left out is `Unavailable` (sent again).
    fn finish(self, service: &str, what: &str) -> Vec<Result<(), SinkError>> {
        self.slots
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(SinkError::Unavailable(format!(
                        "{service} did not answer for this message in its batch reply ({what})"
                    )))
                })
            })
            .collect()
    }
}

/// The reply to one batch request, in neutral terms: the ids of the entries that
/// succeeded, and of those that failed with why.
pub struct Reply {
    pub ok: Vec<String>,
    pub failed: Vec<(String, SinkError)>,
}

impl Reply {
    /// From an SDK's reply: the ids that succeeded, and (id, sender fault, code,
    /// message) of each entry that failed.
    pub fn read<'a>(
        service: &str,
        what: &str,
        ok: impl Iterator<Item = &'a str>,
        failed: impl Iterator<Item = (&'a str, bool, &'a str, Option<&'a str>)>,
    ) -> Reply {
        let failed = failed.map(|(id, sender_fault, code, message)| {
            let why = wire::entry_error(service, what, sender_fault, code, message);
            (id.to_string(), why)
        });
        Reply {
            ok: ok.map(str::to_string).collect(),
            failed: failed.collect(),
        }
    }
}

/// One service's batch request in its SDK's types; the request itself (entries refused
/// on their own, one call, outcomes by entry id, splitting) is written once, here.
pub trait BatchRequest: Clone + Send + Sync + 'static {
    /// The service's name in messages ("SQS").
    const SERVICE: &'static str;
    /// What a target is called in messages ("queue").
    const TARGET: &'static str;
    /// The SDK's batch entry.
    type Item: Send;
    /// The SDK entry for `e`, with id `id` (its index in the batch).
    fn item(id: usize, e: &Entry) -> Result<Self::Item, SinkError>;
    /// Send `batch` to `target` (`what` names it in errors): `Err((why, splittable))`
    /// when the whole request failed (`splittable`: for a reason that may be one
    /// message's).
    fn send(
        &self,
        target: &str,
        what: &str,
        batch: Vec<Self::Item>,
    ) -> impl Future<Output = Result<Reply, (SinkError, bool)>> + Send;
}

/// The SDK batch entry of `$e` with id `$id`: SQS and SNS build the same entry from
/// differently named types (`$attr` the attribute value, `$entry` the entry, `$body` the
/// body setter), so it is written once here.
macro_rules! sdk_item {
    ($service:expr, $build_error:ty, $attr:ty, $entry:ty, $body:ident, $id:expr, $e:expr) => {{
        let e: &$crate::sink::aws::wire::Entry = $e;
        let invalid = |err: $build_error| {
            $crate::sink::SinkError::Rejected(format!(
                "cannot build the {} message: {err}",
                $service
            ))
        };
        let attributes = e
            .attributes
            .iter()
            .map(|(k, v)| {
                let value = <$attr>::builder()
                    .data_type($crate::sink::aws::wire::STRING)
                    .string_value(v)
                    .build();
                value.map(|v| (k.clone(), v)).map_err(invalid)
            })
            .collect::<Result<std::collections::HashMap<_, _>, _>>()?;
        <$entry>::builder()
            .id($id.to_string())
            .$body(&e.body)
            .set_message_attributes(Some(attributes))
            .set_message_group_id(e.group_id.clone())
            .set_message_deduplication_id(e.dedup_id.clone())
            .build()
            .map_err(invalid)
    }};
}
pub(super) use sdk_item;

/// One request for `entries`: an entry that cannot be built is refused on its own, the
/// rest go in one call, and each outcome is read from the reply by entry id.
async fn request<R: BatchRequest>(
    requester: &R,
    target: &str,
    entries: &[Entry],
) -> Result<Vec<Result<(), SinkError>>, (SinkError, bool)> {
    let what = format!("{} {target}", R::TARGET);
    let mut outcomes = Outcomes::new(entries.len());
    let mut batch = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        match R::item(i, e) {
            Ok(b) => batch.push(b),
            Err(err) => outcomes.refused(i, err),
        }
    }
    if !batch.is_empty() {
        let reply = requester.send(target, &what, batch).await?;
        for id in reply.ok {
            outcomes.answer(&id, Ok(()));
        }
        for (id, why) in reply.failed {
            outcomes.answer(&id, Err(why));
        }
    }
    Ok(outcomes.finish(R::SERVICE, &what))
}

/// Publish `entries` to `target` in one request; a whole request the service refused for
/// a reason that may be one message's is sent again entry by entry, so only the message
/// at fault spends an attempt.
impl<R: BatchRequest> Publish for R {
    async fn publish(&self, target: String, entries: Vec<Entry>) -> Vec<Result<(), SinkError>> {
        match request(self, &target, &entries).await {
            Ok(outcomes) => outcomes,
            Err((_, true)) if entries.len() > 1 => {
                let mut out = Vec::with_capacity(entries.len());
                for e in &entries {
                    out.push(
                        match request(self, &target, std::slice::from_ref(e)).await {
                            Ok(mut one) => one.pop().unwrap_or_else(|| {
                                Err(SinkError::Unavailable(format!(
                                    "{} gave no answer",
                                    R::SERVICE
                                )))
                            }),
                            Err((why, _)) => Err(why),
                        },
                    );
                }
                out
            }
            Err((why, _)) => vec![Err(why); entries.len()],
        }
    }
}
