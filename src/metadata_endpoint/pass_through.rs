//! Everything but tokens, passed through to the metadata server: within
//! the upstream rate and concurrency bounds token fetches obey, and a
//! long-poll within bounds of its own and for at most [`MAX_LONG_POLL`].

use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use super::{MetadataEndpoint, error_response, query, text, with_flavor};
use crate::error::{BrokerError, FetchError};
use crate::policy::Caller;
use crate::quota::{Exceeded, Quota};

/// Longest a long-poll (`wait_for_change=true`) waits (5 minutes): its
/// `timeout_sec` is lowered to this, so the metadata server answers by then,
/// and the client asks again.
pub const MAX_LONG_POLL: Duration = Duration::from_secs(300);
/// Most long-polls passed through at once (64); each holds an upstream
/// connection for up to [`MAX_LONG_POLL`].
pub const MAX_LONG_POLLS: usize = 64;
/// Most long-polls of one peer uid at once (8), on a `unix:` endpoint.
pub const MAX_LONG_POLLS_PER_UID: usize = 8;

/// Long-polls in flight, in all and per peer uid.
#[derive(Clone, Debug)]
pub struct LongPolls(Quota);

impl Default for LongPolls {
    fn default() -> Self {
        Self(Quota::new(MAX_LONG_POLLS, MAX_LONG_POLLS_PER_UID))
    }
}

impl MetadataEndpoint {
    /// Passes a request on to the metadata server, within the upstream
    /// bounds; a long-poll also within the long-poll bounds, and for at
    /// most [`MAX_LONG_POLL`].
    pub(super) async fn pass_through(
        &self,
        path: &str,
        query: &str,
        caller: Caller,
    ) -> Response<Full<Bytes>> {
        let Some(upstream) = &self.pass_through else {
            return text(
                StatusCode::NOT_FOUND,
                "not served: the broker's tokens do not come from a metadata server, so it answers only …/token and …/identity\n",
            );
        };
        let wait = long_poll(query);
        let (query, _place, _permit) = if wait.is_zero() {
            let permit = match self.upstream_limits.acquire().await {
                Ok(permit) => permit,
                Err(error) => return unavailable(path, &error),
            };
            (query.to_string(), None, Some(permit))
        } else {
            let place = match self.long_polls.0.acquire(caller.holder()) {
                Ok(place) => place,
                Err(exceeded) => return error_response(&long_polls_exceeded(exceeded)),
            };
            self.upstream_limits.turn().await;
            (with_timeout(query, wait), Some(place), None)
        };
        let path_and_query = if query.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{query}")
        };
        match upstream.forward(&path_and_query, self.timeout + wait).await {
            Ok(forwarded) => {
                let mut response = Response::new(Full::new(forwarded.body));
                *response.status_mut() = forwarded.status;
                *response.headers_mut() = forwarded.headers;
                with_flavor(response)
            }
            Err(error) => unavailable(path, &error),
        }
    }
}

/// 503 for a pass-through that could not be made.
fn unavailable(path: &str, error: &FetchError) -> Response<Full<Bytes>> {
    tracing::info!(path, %error, "metadata pass-through failed");
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("cannot pass the request on: {error}\n"),
    )
}

fn long_polls_exceeded(exceeded: Exceeded) -> BrokerError {
    exceeded.into_error(
        "too many long-polls (wait_for_change=true) in flight",
        "too many long-polls (wait_for_change=true) in flight for this uid",
        "too many long-polls (wait_for_change=true) in flight for this pod",
    )
}

/// How much longer than usual a long-polling pass-through may take.
pub fn long_poll(query: &str) -> Duration {
    let Ok(parameters) = query::parameters(query) else {
        return Duration::ZERO;
    };
    let waits = parameters
        .iter()
        .any(|(name, value)| name == "wait_for_change" && value == "true");
    if !waits {
        return Duration::ZERO;
    }
    parameters
        .iter()
        .find(|(name, _)| name == "timeout_sec")
        .and_then(|(_, value)| value.parse().ok())
        .map_or(MAX_LONG_POLL, Duration::from_secs)
        .min(MAX_LONG_POLL)
}

/// The query of a long-poll that waits `wait`: its `timeout_sec` set to
/// that (the metadata server then answers within it), its other parameters
/// as they came.
pub fn with_timeout(query: &str, wait: Duration) -> String {
    let kept = query
        .split('&')
        .filter(|pair| !pair.is_empty() && !pair.starts_with("timeout_sec="));
    let timeout = format!("timeout_sec={}", wait.as_secs());
    kept.chain(std::iter::once(timeout.as_str()))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_poll_asks_upstream_for_the_capped_timeout() {
        assert_eq!(
            with_timeout("wait_for_change=true", MAX_LONG_POLL),
            "wait_for_change=true&timeout_sec=300"
        );
        assert_eq!(
            with_timeout(
                "timeout_sec=999999&wait_for_change=true&last_etag=x",
                MAX_LONG_POLL
            ),
            "wait_for_change=true&last_etag=x&timeout_sec=300"
        );
        assert_eq!(
            with_timeout(
                "wait_for_change=true&timeout_sec=30",
                Duration::from_secs(30)
            ),
            "wait_for_change=true&timeout_sec=30"
        );
    }

    #[test]
    fn only_explicit_long_polls_wait_longer() {
        assert_eq!(long_poll(""), Duration::ZERO);
        assert_eq!(long_poll("recursive=true"), Duration::ZERO);
        assert_eq!(long_poll("wait_for_change=true"), MAX_LONG_POLL);
        assert_eq!(
            long_poll("wait_for_change=true&timeout_sec=30"),
            Duration::from_secs(30)
        );
        assert_eq!(
            long_poll("wait_for_change=true&timeout_sec=999999"),
            MAX_LONG_POLL
        );
    }
}
