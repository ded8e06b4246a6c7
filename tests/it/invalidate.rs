//! InvalidateToken end to end: a client hands back a token a service
//! rejected; the broker drops it only if it is still the cached one, fetches
//! one replacement for everybody, and rate-limits invalidations per key.

use std::collections::HashSet;

use tokenbroker::emulator::EmulatorConfig;
use tokenbroker::proto::v1::{InvalidateTokenRequest, invalidate_token_request};
use tonic::Code;

use crate::common::{
    Broker, PATIENCE, Scrape, access_request, emulator, id_request, invalidate_id, invalidated,
    next_token, policy_rule, scrape_until, write_policy,
};

const AUDIENCE: &str = "https://svc.a.run.app";
const OTHER: &str = "https://other.a.run.app";

#[tokio::test]
async fn a_stale_token_is_dropped_and_fetched_again_once() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &["--metrics-addr", "127.0.0.1:0"]).await;
    let mut tokens = broker.typed_client().await;
    let mut client = broker.client().await;
    let first = tokens.id_token(id_request(AUDIENCE)).await.unwrap().token;
    assert_eq!(emulator.stats().identity_requests, 1);

    assert!(invalidated(&mut client, invalidate_id(AUDIENCE, &first)).await);
    let second = tokens.id_token(id_request(AUDIENCE)).await.unwrap().token;
    assert_ne!(second, first, "the rejected token is never served again");
    assert_eq!(emulator.stats().identity_requests, 2, "one refetch");

    // The old token once more: the cache holds another one, nothing happens.
    assert!(!invalidated(&mut client, invalidate_id(AUDIENCE, &first)).await);
    let third = tokens.id_token(id_request(AUDIENCE)).await.unwrap().token;
    assert_eq!(third, second);
    assert_eq!(emulator.stats().identity_requests, 2);

    // A key nobody asked for: no-op, and no fetch.
    assert!(!invalidated(&mut client, invalidate_id(OTHER, &first)).await);
    assert_eq!(emulator.stats().identity_requests, 2);

    let scrape = Scrape::of(broker.metrics_addr().await).await;
    let count = |result| {
        scrape.value(
            "tokenbroker_invalidations_total",
            &[("token_kind", "id_token"), ("result", result)],
        )
    };
    assert_eq!(count("invalidated"), 1.0);
    assert_eq!(count("stale"), 2.0);
}

#[tokio::test]
async fn concurrent_invalidations_of_one_token_cause_one_fetch() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;
    let client = broker.client().await;
    let tokens = broker.typed_client().await;
    let scopes = ["https://www.googleapis.com/auth/cloud-platform"];
    let first = tokens
        .clone()
        .access_token(access_request(&scopes))
        .await
        .unwrap()
        .token;
    let calls = (0..40).map(|_| {
        let mut client = client.clone();
        let mut tokens = tokens.clone();
        let request = InvalidateTokenRequest {
            request: Some(invalidate_token_request::Request::AccessToken(
                access_request(&scopes),
            )),
            token: first.clone(),
        };
        async move {
            let invalidated = invalidated(&mut client, request).await;
            let token = tokens
                .access_token(access_request(&scopes))
                .await
                .unwrap()
                .token;
            (invalidated, token)
        }
    });
    let results = futures_util::future::join_all(calls).await;
    assert_eq!(
        results
            .iter()
            .filter(|(invalidated, _)| *invalidated)
            .count(),
        1
    );
    let tokens: HashSet<&String> = results.iter().map(|(_, token)| token).collect();
    assert_eq!(tokens.len(), 1, "everybody shares the one new token");
    assert!(!tokens.contains(&first));
    assert_eq!(emulator.stats().token_requests, 2);
}

#[tokio::test]
async fn invalidations_are_rate_limited_per_key() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &["--invalidate-interval", "1h"]).await;
    let mut client = broker.client().await;
    let tokens = broker.typed_client().await;
    let get = async |audience: &str| {
        tokens
            .clone()
            .id_token(id_request(audience))
            .await
            .unwrap()
            .token
    };
    let first = get(AUDIENCE).await;
    let other = get(OTHER).await;
    // On another connection.
    let mut another = broker.client().await;
    assert!(invalidated(&mut another, invalidate_id(AUDIENCE, &first)).await);
    let second = get(AUDIENCE).await;
    let status = client
        .invalidate_token(invalidate_id(AUDIENCE, &second))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("--invalidate-interval"),
        "{status}"
    );
    assert_eq!(
        get(AUDIENCE).await,
        second,
        "a throttled call drops nothing"
    );
    // Another key is not held back by the first one's invalidation.
    assert!(invalidated(&mut client, invalidate_id(OTHER, &other)).await);
    // Three fetches before, and the other key's replacement.
    emulator
        .wait_for(|s| s.identity_requests == 4, PATIENCE)
        .await
        .expect("the other key's token is fetched again");
}

#[tokio::test]
async fn watchers_receive_the_replacement() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;
    let mut watch = broker
        .typed_client()
        .await
        .watch(id_request(AUDIENCE))
        .await
        .unwrap();
    let first = next_token(&mut watch).await;
    let mut client = broker.client().await;
    assert!(invalidated(&mut client, invalidate_id(AUDIENCE, first.secret())).await);
    assert_ne!(next_token(&mut watch).await.secret(), first.secret());
}

#[tokio::test]
async fn bad_invalidations_are_refused_and_change_nothing() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &["--metrics-addr", "127.0.0.1:0"]).await;
    let mut tokens = broker.typed_client().await;
    let mut client = broker.client().await;
    let first = tokens.id_token(id_request(AUDIENCE)).await.unwrap().token;
    for (request, field) in [
        (
            InvalidateTokenRequest {
                request: None,
                token: first.clone(),
            },
            "request",
        ),
        (invalidate_id(AUDIENCE, ""), "token"),
        (invalidate_id("", &first), "audience"),
    ] {
        let status = client.invalidate_token(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(field), "{status}");
        assert!(!status.message().contains(&first));
    }
    let again = tokens.id_token(id_request(AUDIENCE)).await.unwrap().token;
    assert_eq!(again, first);
    assert_eq!(emulator.stats().identity_requests, 1);
    // Counted by token kind: the call that names no key has none, and is
    // only logged (as for WatchToken).
    let addr = broker.metrics_addr().await;
    scrape_until(addr, |scrape| {
        scrape.value(
            "tokenbroker_request_errors_total",
            &[("rpc", "InvalidateToken"), ("code", "INVALID_ARGUMENT")],
        ) == 2.0
    })
    .await;
    assert!(!broker.logs().contains(&first), "a token reached the logs");
}

#[tokio::test]
async fn the_policy_applies_to_invalidations() {
    let me = nix::unistd::getuid().as_raw();
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), &policy_rule(me, "default", AUDIENCE));
    let broker = Broker::start(
        &emulator,
        &["--policy", &policy, "--metrics-addr", "127.0.0.1:0"],
    )
    .await;
    let mut client = broker.client().await;
    let first = broker
        .typed_client()
        .await
        .id_token(id_request(AUDIENCE))
        .await
        .unwrap()
        .token;
    let status = client
        .invalidate_token(InvalidateTokenRequest {
            request: Some(invalidate_token_request::Request::AccessToken(
                access_request(&[]),
            )),
            token: first.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("policy"), "{status}");
    let scrape = Scrape::of(broker.metrics_addr().await).await;
    assert_eq!(
        scrape.value(
            "tokenbroker_policy_denials_total",
            &[("rpc", "InvalidateToken")]
        ),
        1.0
    );
    // The allowed key still works.
    assert!(invalidated(&mut client, invalidate_id(AUDIENCE, &first)).await);
}
