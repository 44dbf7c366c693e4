//! What both AWS sinks share about the SDK: the `SdkConfig` (region, optional endpoint,
//! the standard credential chain, HTTPS through rustls with ring, timeouts bounded by
//! `relay.publish_timeout`) and the mapping of an SDK error to a `SinkError`.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

use super::wire;
use crate::sink::SinkError;

/// Longest wait for a TCP / TLS connection to the service.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Tries of one request inside the SDK (it backs off between them).
const SDK_ATTEMPTS: u32 = 3;

/// The SDK configuration for `region` and `endpoint` (empty = AWS itself). Credentials
/// come from the standard chain when the first request needs them.
pub async fn sdk_config(region: &str, endpoint: &str, timeout: Duration) -> SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT.min(timeout))
        .operation_attempt_timeout(timeout)
        .operation_timeout(timeout)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .http_client(http)
        .timeout_config(timeouts)
        .retry_config(RetryConfig::standard().with_max_attempts(SDK_ATTEMPTS));
    if !endpoint.trim().is_empty() {
        loader = loader.endpoint_url(endpoint.trim());
    }
    loader.load().await
}

/// What a failed request means for its messages, and whether the request may be split
/// to find the one message at fault (a service rejection other than a missing target).
pub fn classify<E>(service: &str, what: &str, e: &SdkError<E, HttpResponse>) -> (SinkError, bool)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match e {
        SdkError::ServiceError(ctx) => {
            let err = ctx.err();
            let status = ctx.raw().status().as_u16();
            let verdict =
                wire::classify_code(service, what, err.code(), err.message(), Some(status));
            let splittable = matches!(verdict, SinkError::Rejected(_))
                && !err.code().is_some_and(wire::is_missing_target);
            (verdict, splittable)
        }
        other => (
            SinkError::Unavailable(format!(
                "{service} request for {what} failed: {}",
                DisplayErrorContext(other)
            )),
            false,
        ),
    }
}
