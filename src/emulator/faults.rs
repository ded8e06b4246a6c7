//! Failure modes switched on for tests: a [`FaultRule`] names a [`Fault`],
//! the token endpoint it hits and how many requests; [`respond`] applies it
//! to the answer (a status, a delay, a cut connection, a bad token).

use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde::{Deserialize, Serialize};

use super::{Body, Shared, State, text};

/// A way for the emulator to misbehave, for tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Answer with this HTTP status (and `Retry-After`, if set).
    Status {
        /// The status code, e.g. 503.
        status: u16,
        /// Seconds for a `Retry-After` header.
        #[serde(default)]
        retry_after_secs: Option<u64>,
    },
    /// Wait this long, then answer normally.
    Delay {
        /// The added latency in milliseconds.
        millis: u64,
    },
    /// Never answer (until the emulator stops).
    Hang,
    /// Close the connection without answering.
    Reset,
    /// Announce a body, send part of it, close the connection.
    Truncated,
    /// A 200 with a 1 MiB body.
    Oversized,
    /// A 200 whose body is not a token.
    Garbage,
    /// A token without an expiry (`expires_in` or `exp` missing).
    NoExpiry,
    /// A token that has already expired.
    Expired,
    /// A valid token without the `Metadata-Flavor: Google` response header.
    NoFlavorHeader,
    /// An ID token for another audience.
    WrongAudience,
}

/// Which token endpoint a fault applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Both `token` and `identity`.
    #[default]
    Any,
    /// Only access tokens.
    Token,
    /// Only ID tokens.
    Identity,
}

/// A fault and how often it fires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRule {
    /// What goes wrong.
    #[serde(flatten)]
    pub fault: Fault,
    /// Which endpoint misbehaves.
    #[serde(default)]
    pub target: Target,
    /// How many requests it hits; unset means until cleared.
    #[serde(default)]
    pub times: Option<u32>,
}

impl FaultRule {
    /// `fault` on every token request until cleared.
    pub fn always(fault: Fault) -> Self {
        Self {
            fault,
            target: Target::Any,
            times: None,
        }
    }
}

impl State {
    /// The fault for a request to `target`, counting it down.
    pub(super) fn take_fault(&mut self, target: Target) -> Option<Fault> {
        let rule = self.fault.as_mut()?;
        if rule.target != Target::Any && rule.target != target {
            return None;
        }
        let fault = rule.fault.clone();
        match &mut rule.times {
            Some(0) => {
                self.fault = None;
                return None;
            }
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.fault = None;
                }
            }
            None => {}
        }
        Some(fault)
    }
}

/// Applies a transport-level fault, or builds the body with `token` (which
/// handles the token-level faults) and sends it.
pub(super) async fn respond(
    shared: &Shared,
    fault: Option<Fault>,
    token: impl FnOnce(Option<&Fault>) -> String,
) -> Result<Response<Body>, std::io::Error> {
    match fault {
        Some(Fault::Status {
            status,
            retry_after_secs,
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = text(status, "emulated failure");
            if let Some(secs) = retry_after_secs {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, secs.into());
            }
            Ok(response)
        }
        Some(Fault::Delay { millis }) => {
            tokio::time::sleep(Duration::from_millis(millis)).await;
            Ok(text(StatusCode::OK, &token(None)))
        }
        Some(Fault::Hang) => {
            shared.stop.cancelled().await;
            Err(std::io::Error::other("emulator stopped"))
        }
        Some(Fault::Reset) => Err(std::io::Error::other("emulated connection reset")),
        Some(Fault::Truncated) => {
            let body = token(None);
            let partial = Bytes::from(body[..body.len() / 2].to_string());
            // A pause after the first chunk makes hyper send the head and
            // that chunk before the error aborts the connection.
            let cut = async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Err(std::io::Error::other("emulated truncation"))
            };
            let chunks = stream::iter([Ok(Frame::data(partial))]).chain(stream::once(cut));
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_LENGTH, body.len().into());
            headers.insert("metadata-flavor", "Google".parse().expect("valid header"));
            Ok(response)
        }
        Some(Fault::Oversized) => Ok(text(StatusCode::OK, &"x".repeat(1 << 20))),
        Some(Fault::Garbage) => Ok(text(StatusCode::OK, "<html>this is not a token</html>")),
        Some(Fault::NoFlavorHeader) => {
            let mut response = text(StatusCode::OK, &token(None));
            response.headers_mut().remove("metadata-flavor");
            Ok(response)
        }
        other => Ok(text(StatusCode::OK, &token(other.as_ref()))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::{EmulatorConfig, aws, google};
    use super::*;

    #[test]
    fn faults_count_down_and_clear() {
        let mut state = State {
            config: EmulatorConfig::default(),
            fault: Some(FaultRule {
                fault: Fault::Garbage,
                target: Target::Identity,
                times: Some(2),
            }),
            issued: HashMap::new(),
            arrivals: Vec::new(),
            received: Vec::new(),
            google: google::Accounts::default(),
            aws: aws::AwsState::default(),
        };
        assert_eq!(state.take_fault(Target::Token), None);
        assert_eq!(state.take_fault(Target::Identity), Some(Fault::Garbage));
        assert_eq!(state.take_fault(Target::Identity), Some(Fault::Garbage));
        assert_eq!(state.take_fault(Target::Identity), None);
        assert!(state.fault.is_none());
    }

    #[test]
    fn fault_rules_read_from_json() {
        let rule: FaultRule = serde_json::from_str(
            r#"{"kind":"status","status":429,"retry_after_secs":2,"times":3}"#,
        )
        .unwrap();
        assert_eq!(
            rule,
            FaultRule {
                fault: Fault::Status {
                    status: 429,
                    retry_after_secs: Some(2)
                },
                target: Target::Any,
                times: Some(3),
            }
        );
        let hang: FaultRule =
            serde_json::from_str(r#"{"kind":"hang","target":"identity"}"#).unwrap();
        assert_eq!(hang.fault, Fault::Hang);
        assert_eq!(hang.target, Target::Identity);
    }
}
