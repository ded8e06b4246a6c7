//! Fault injection: for every way the metadata server can misbehave, what
//! clients see, that no bad token is cached, that cached tokens keep
//! flowing (a failed refresh never replaces them), and recovery.

use std::time::{Duration, SystemTime};

use tokenbroker::emulator::{Fault, FaultRule, Target};
use tokenbroker::proto::v1::GetAccessTokenRequest;
use tokenbroker::proto::v1::watch_token_request::Request;
use tonic::Code;

use crate::common::{
    Broker, Scrape, claims, emulator_with_lifetime, id_request, next_token, scrape_until,
    with_deadline,
};

/// How soon a call for an uncached token fails during an outage.
const OUTAGE_REPORTED_WITHIN: Duration = Duration::from_millis(1500);
/// Tokens live 6 s (5 s usable with a 1 s skew): refreshed after 2-2.5 s.
const LIFETIME: Duration = Duration::from_secs(6);
/// Under a hanging server a failed refresh takes the whole retry budget
/// (2 s), which from a refresh after 2 s left the 6 s token (its `exp` in
/// whole seconds) no time to be replaced: its tokens live 10 s.
const HANG_LIFETIME: Duration = Duration::from_secs(10);

fn flags() -> Vec<&'static str> {
    vec![
        "--expiry-skew",
        "1s",
        "--upstream-timeout",
        "500ms",
        "--upstream-retry-budget",
        "2s",
        "--metrics-addr",
        "127.0.0.1:0",
    ]
}

#[derive(Clone, Copy)]
enum Kind {
    Id,
    Access,
}

/// Gets a token of `kind` for a key named `name`; the token string.
async fn get(broker: &Broker, kind: Kind, name: &str) -> Result<String, tonic::Status> {
    let mut client = broker.client().await;
    let deadline = Duration::from_secs(10);
    match request(kind, name) {
        Request::IdToken(request) => client
            .get_id_token(with_deadline(request, deadline))
            .await
            .map(|r| r.into_inner().token),
        Request::AccessToken(request) => client
            .get_access_token(with_deadline(request, deadline))
            .await
            .map(|r| r.into_inner().token),
    }
}

/// The request for a token of `kind` for a key named `name`.
fn request(kind: Kind, name: &str) -> Request {
    match kind {
        Kind::Id => id_request(&format!("https://{name}.run.app")).into(),
        Kind::Access => GetAccessTokenRequest {
            scopes: vec![format!("scope:{name}")],
            ..Default::default()
        }
        .into(),
    }
}

/// The whole story for one fault.
async fn survive(kind: Kind, fault: Fault, says: &str) {
    let lifetime = match fault {
        Fault::Hang => HANG_LIFETIME,
        _ => LIFETIME,
    };
    let emulator = emulator_with_lifetime(lifetime).await;
    let broker = Broker::start(&emulator, &flags()).await;
    let metrics = broker.metrics_addr().await;
    let target = match kind {
        Kind::Id => Target::Identity,
        Kind::Access => Target::Token,
    };

    // A cached key, watched so that its refreshes are seen.
    let mut watch = broker
        .typed_client()
        .await
        .watch(request(kind, "cached"))
        .await
        .unwrap();
    let cached = next_token(&mut watch).await.secret().to_string();
    emulator.set_fault(Some(FaultRule {
        fault: fault.clone(),
        target,
        times: None,
    }));

    // An uncached key: a clear error, before the caller's deadline.
    let error = get(&broker, kind, "uncached").await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{fault:?}: {error:?}");
    assert!(
        error.message().contains(says),
        "{fault:?}: {}",
        error.message()
    );

    // The cached token keeps flowing through failed refreshes.
    let refresh_failed =
        |s: &Scrape| s.value("tokenbroker_refreshes_total", &[("result", "error")]) >= 1.0;
    scrape_until(metrics, refresh_failed).await;
    assert_eq!(
        get(&broker, kind, "cached").await.unwrap(),
        cached,
        "{fault:?}"
    );

    // Recovery: the bad answers were never cached, and the watched key is
    // refreshed with a new, valid token before the old one expires.
    emulator.set_fault(None);
    let fresh = get(&broker, kind, "uncached").await.unwrap();
    check_valid(kind, &fresh, &emulator, "uncached");
    let refreshed = next_token(&mut watch).await.secret().to_string();
    assert_ne!(refreshed, cached);
    check_valid(kind, &refreshed, &emulator, "cached");
}

fn check_valid(kind: Kind, token: &str, emulator: &tokenbroker::emulator::Emulator, name: &str) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    match kind {
        Kind::Id => {
            let claims = claims(token);
            assert_eq!(claims["aud"], format!("https://{name}.run.app"));
            assert!(claims["exp"].as_u64().unwrap() > now);
        }
        Kind::Access => {
            let info = emulator
                .token_info(token)
                .expect("a token the emulator issued");
            assert_eq!(info.scopes, vec![format!("scope:{name}")]);
            assert!(info.exp > now);
        }
    }
}

macro_rules! fault_tests {
    ($($name:ident: $kind:expr, $fault:expr, $says:expr;)*) => {$(
        #[tokio::test]
        async fn $name() {
            survive($kind, $fault, $says).await;
        }
    )*};
}

fault_tests! {
    http_500: Kind::Id, Fault::Status { status: 500, retry_after_secs: None }, "HTTP 500";
    http_503: Kind::Access, Fault::Status { status: 503, retry_after_secs: None }, "HTTP 503";
    rate_limited: Kind::Id, Fault::Status { status: 429, retry_after_secs: None }, "HTTP 429";
    rate_limited_with_retry_after: Kind::Access, Fault::Status { status: 429, retry_after_secs: Some(1) }, "HTTP 429";
    hang: Kind::Id, Fault::Hang, "did not answer within";
    connection_reset: Kind::Access, Fault::Reset, "cannot reach the metadata server";
    truncated_body: Kind::Id, Fault::Truncated, "connection broke while reading";
    oversized_body: Kind::Access, Fault::Oversized, "larger than 65536 bytes";
    garbage_jwt: Kind::Id, Fault::Garbage, "not a JWT";
    garbage_json: Kind::Access, Fault::Garbage, "not the expected JSON";
    jwt_without_exp: Kind::Id, Fault::NoExpiry, "numeric `exp`";
    json_without_expires_in: Kind::Access, Fault::NoExpiry, "not the expected JSON";
    expired_id_token: Kind::Id, Fault::Expired, "in the past";
    expired_access_token: Kind::Access, Fault::Expired, "not a sane lifetime";
    missing_flavor_header: Kind::Id, Fault::NoFlavorHeader, "Metadata-Flavor";
    wrong_audience: Kind::Id, Fault::WrongAudience, "aud claim";
}

#[tokio::test]
async fn transient_failures_are_retried_within_one_call() {
    let emulator = emulator_with_lifetime(Duration::from_secs(3600)).await;
    let broker = Broker::start(&emulator, &[]).await;
    emulator.set_fault(Some(FaultRule {
        fault: Fault::Status {
            status: 503,
            retry_after_secs: None,
        },
        target: Target::Any,
        times: Some(2),
    }));
    assert!(get(&broker, Kind::Id, "a").await.is_ok());
    assert_eq!(emulator.stats().identity_requests, 3);

    emulator.set_fault(Some(FaultRule {
        fault: Fault::Status {
            status: 429,
            retry_after_secs: Some(1),
        },
        target: Target::Any,
        times: Some(1),
    }));
    let started = std::time::Instant::now();
    assert!(get(&broker, Kind::Id, "b").await.is_ok());
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    let arrivals = emulator.arrivals();
    let gap = arrivals[arrivals.len() - 1] - arrivals[arrivals.len() - 2];
    assert!(gap >= Duration::from_secs(1), "{gap:?}");

    // Other client errors are not retried.
    emulator.set_fault(Some(FaultRule {
        fault: Fault::Status {
            status: 403,
            retry_after_secs: None,
        },
        target: Target::Any,
        times: Some(5),
    }));
    let before = emulator.stats().identity_requests;
    assert_eq!(
        get(&broker, Kind::Id, "c").await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(emulator.stats().identity_requests, before + 1);
}

#[tokio::test]
async fn an_outage_is_reported_within_about_a_second_not_at_the_callers_deadline() {
    let emulator = emulator_with_lifetime(Duration::from_secs(3600)).await;
    let broker = Broker::start(&emulator, &[]).await;
    let mut client = broker.client().await;
    emulator.stop().await;
    let started = std::time::Instant::now();
    let error = client
        .get_id_token(with_deadline(
            id_request("https://a.run.app"),
            Duration::from_secs(60),
        ))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    assert!(
        error.message().contains("cannot reach"),
        "{}",
        error.message()
    );
    // "Within about a second" (README): four attempts, each refused at
    // once, with at most 100 + 200 + 400 ms of backoff between them; far
    // from the 60 s deadline. The rest of the second is for a busy machine.
    assert!(
        started.elapsed() < OUTAGE_REPORTED_WITHIN,
        "{:?}",
        started.elapsed()
    );
}
