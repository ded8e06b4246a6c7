//! End-to-end behaviour of the broker binary against the emulator: sharing,
//! keys, refresh, watch streams, outages, bad input.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use tokenbroker::emulator::{EmulatorConfig, Fault, FaultRule, Target};
use tokenbroker::proto::v1::{
    GetAccessTokenRequest, GetIdTokenRequest, IdTokenFormat, WatchTokenRequest,
};
use tonic::Code;

use crate::common::{
    Broker, access_request, claims, emulator, emulator_with_lifetime, id_request, next_token,
    watch_end, with_deadline,
};

const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

fn expire_time(token: &tokenbroker::proto::v1::IdToken) -> SystemTime {
    SystemTime::try_from(token.expire_time.expect("expire_time is set")).unwrap()
}

#[tokio::test]
async fn hundreds_of_concurrent_calls_cause_one_upstream_fetch() {
    let emulator = emulator(EmulatorConfig::default()).await;
    // Slow answers widen the window in which the calls pile up.
    emulator.set_fault(Some(FaultRule::always(Fault::Delay { millis: 300 })));
    let broker = Broker::start(&emulator, &[]).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(broker.typed_client().await);
    }
    let calls = (0..300).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        async move {
            if i % 2 == 0 {
                client
                    .id_token(id_request("https://svc.a.run.app"))
                    .await
                    .map(|token| token.token)
            } else {
                client
                    .access_token(access_request(&[CLOUD_PLATFORM]))
                    .await
                    .map(|token| token.token)
            }
        }
    });
    let tokens: Vec<String> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("every call gets a token");
    let distinct: HashSet<&String> = tokens.iter().collect();
    assert_eq!(distinct.len(), 2, "one ID token and one access token");
    let stats = emulator.stats();
    assert_eq!(stats.identity_requests, 1);
    assert_eq!(stats.token_requests, 1);
}

#[tokio::test]
async fn cache_keys_are_exact() {
    let emulator = emulator(EmulatorConfig {
        accounts: vec![
            "first@p.iam.gserviceaccount.com".into(),
            "second@p.iam.gserviceaccount.com".into(),
        ],
        ..EmulatorConfig::default()
    })
    .await;
    let broker = Broker::start(&emulator, &[]).await;
    let mut client = broker.typed_client().await;
    let access = |request: GetAccessTokenRequest| {
        let mut client = client.clone();
        async move { client.access_token(request).await.unwrap().token }
    };

    // Scopes are a set: order and duplicates do not matter.
    let ab = access(access_request(&["scope:a", "scope:b"])).await;
    let ba = access(access_request(&["scope:b", "scope:a", "scope:b"])).await;
    assert_eq!(ab, ba);
    assert_eq!(emulator.stats().token_requests, 1);
    assert_eq!(
        emulator.token_info(&ab).unwrap().scopes,
        vec!["scope:a", "scope:b"]
    );

    // Another scope set, another account: other tokens, minted for them.
    let a = access(access_request(&["scope:a"])).await;
    assert_ne!(a, ab);
    assert_eq!(emulator.token_info(&a).unwrap().scopes, vec!["scope:a"]);
    let second = access(GetAccessTokenRequest {
        service_account: "second@p.iam.gserviceaccount.com".into(),
        ..access_request(&["scope:a"])
    })
    .await;
    assert_eq!(
        emulator.token_info(&second).unwrap().email,
        "second@p.iam.gserviceaccount.com"
    );
    let default = access(access_request(&[])).await;
    assert_eq!(
        emulator.token_info(&default).unwrap().email,
        "first@p.iam.gserviceaccount.com"
    );
    assert_eq!(emulator.stats().token_requests, 4);

    // ID tokens are keyed by audience (sent verbatim), format and licenses.
    let audiences = [
        "https://a.run.app",
        "https://b.run.app",
        "https://x.app/p?q=1&r=2#frag with space ü",
    ];
    let mut seen = HashSet::new();
    for audience in audiences {
        let token = client.id_token(id_request(audience)).await.unwrap().token;
        assert_eq!(claims(&token)["aud"], audience);
        assert!(claims(&token).get("google").is_none());
        assert!(seen.insert(token));
    }
    let full = GetIdTokenRequest {
        format: IdTokenFormat::Full as i32,
        ..id_request("https://a.run.app")
    };
    let full_token = client.id_token(full.clone()).await.unwrap().token;
    let full_claims = claims(&full_token);
    assert!(full_claims["google"]["compute_engine"]["license_id"].is_null());
    let licensed = GetIdTokenRequest {
        include_licenses: true,
        ..full
    };
    let licensed_token = client.id_token(licensed).await.unwrap().token;
    assert!(claims(&licensed_token)["google"]["compute_engine"]["license_id"].is_array());
    assert!(seen.insert(full_token) && seen.insert(licensed_token));
    let second_account = GetIdTokenRequest {
        service_account: "second@p.iam.gserviceaccount.com".into(),
        ..id_request("https://a.run.app")
    };
    let token = client.id_token(second_account).await.unwrap().token;
    assert_eq!(claims(&token)["email"], "second@p.iam.gserviceaccount.com");
    assert_eq!(emulator.stats().identity_requests, 6);
}

#[tokio::test]
async fn tokens_are_refreshed_before_expiry_and_streamed_to_watchers() {
    // 6 s tokens, usable for 5 s: refreshed after about 2 to 2.5 s.
    let emulator = emulator_with_lifetime(Duration::from_secs(6)).await;
    let broker = Broker::start(&emulator, &["--expiry-skew", "1s"]).await;
    let mut client = broker.typed_client().await;
    let mut first_watch = client.watch(id_request("https://a.run.app")).await.unwrap();
    let mut second_watch = client.watch(id_request("https://a.run.app")).await.unwrap();

    let mut previous = next_token(&mut first_watch).await;
    assert_eq!(
        next_token(&mut second_watch).await.secret(),
        previous.secret()
    );
    for refresh in 1..=2 {
        let next = next_token(&mut first_watch).await;
        assert!(
            SystemTime::now() < previous.expire_time().unwrap(),
            "refresh arrived after expiry"
        );
        assert_ne!(next.secret(), previous.secret());
        assert_eq!(
            claims(next.secret())["exp"].as_u64().unwrap(),
            next.expire_time()
                .unwrap()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        );
        assert_eq!(next_token(&mut second_watch).await.secret(), next.secret());
        assert_eq!(
            emulator.stats().identity_requests,
            1 + refresh,
            "watchers share one refresh"
        );
        // A unary call gets the refreshed token from the cache.
        let unary = client
            .id_token(id_request("https://a.run.app"))
            .await
            .unwrap();
        assert_eq!(unary.token, next.secret());
        assert_eq!(emulator.stats().identity_requests, 1 + refresh);
        previous = next;
    }
}

#[tokio::test]
async fn a_watch_ends_unavailable_when_its_token_expires_unreplaced() {
    let emulator = emulator_with_lifetime(Duration::from_secs(4)).await;
    let broker = Broker::start(&emulator, &["--expiry-skew", "1s"]).await;
    let mut client = broker.typed_client().await;
    let mut watch = client.watch(id_request("https://a.run.app")).await.unwrap();
    let first = next_token(&mut watch).await;
    emulator.set_fault(Some(FaultRule::always(Fault::Status {
        status: 503,
        retry_after_secs: None,
    })));
    let status = watch_end(&mut watch).await;
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("expired"), "{}", status.message());
    assert!(status.message().contains("503"), "{}", status.message());
    assert!(!status.message().contains(first.secret()));
    assert!(
        emulator.stats().identity_requests >= 2,
        "refresh was retried"
    );
}

#[tokio::test]
async fn during_an_outage_cached_tokens_flow_and_uncached_fail_fast() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;
    let mut tokens = broker.typed_client().await;
    let mut client = broker.client().await;
    let cached = tokens.id_token(id_request("https://cached")).await.unwrap();

    for status in [500, 503, 429] {
        emulator.set_fault(Some(FaultRule::always(Fault::Status {
            status,
            retry_after_secs: None,
        })));
        let again = tokens.id_token(id_request("https://cached")).await.unwrap();
        assert_eq!(again.token, cached.token);
        let error = client
            .get_id_token(with_deadline(
                id_request("https://uncached"),
                Duration::from_secs(20),
            ))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::Unavailable, "{error:?}");
        assert!(
            error.message().contains(&status.to_string()),
            "{}",
            error.message()
        );
    }
    emulator.set_fault(None);
    let recovered = tokens
        .id_token(id_request("https://uncached"))
        .await
        .unwrap();
    assert_eq!(claims(&recovered.token)["aud"], "https://uncached");
}

#[tokio::test]
async fn a_hanging_metadata_server_delays_no_cached_key() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &["--upstream-timeout", "1s"]).await;
    let mut client = broker.client().await;
    let cached = broker
        .typed_client()
        .await
        .access_token(access_request(&[]))
        .await
        .unwrap();
    emulator.set_fault(Some(FaultRule::always(Fault::Hang)));

    let again = client
        .get_access_token(with_deadline(
            access_request(&[]),
            Duration::from_millis(500),
        ))
        .await
        .expect("cached token is served while upstream hangs");
    assert_eq!(again.into_inner().token, cached.token);

    // Uncached: the caller's deadline or the upstream timeout, whichever first.
    let short = client
        .get_access_token(with_deadline(
            access_request(&["scope:x"]),
            Duration::from_millis(300),
        ))
        .await
        .unwrap_err();
    assert_eq!(short.code(), Code::DeadlineExceeded, "{short:?}");
    let long = client
        .get_access_token(access_request(&["scope:y"]))
        .await
        .unwrap_err();
    assert_eq!(long.code(), Code::Unavailable, "{long:?}");
    assert!(
        long.message().contains("did not answer within 1s"),
        "{}",
        long.message()
    );
}

#[tokio::test]
async fn a_bad_response_is_an_error_never_a_token() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;
    let mut client = broker.client().await;
    let mut tokens = broker.typed_client().await;
    for fault in [
        Fault::Garbage,
        Fault::WrongAudience,
        Fault::Expired,
        Fault::NoExpiry,
    ] {
        let audience = format!("https://{fault:?}.run.app").to_lowercase();
        emulator.set_fault(Some(FaultRule {
            fault: fault.clone(),
            target: Target::Identity,
            times: Some(1),
        }));
        let error = client
            .get_id_token(id_request(&audience))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::Unavailable, "{fault:?}: {error:?}");
        assert!(
            error.message().contains("unusable response"),
            "{fault:?}: {}",
            error.message()
        );
        // Nothing was cached: the next call fetches again and gets a good token.
        let before = emulator.stats().identity_requests;
        let token = tokens.id_token(id_request(&audience)).await.unwrap();
        assert_eq!(emulator.stats().identity_requests, before + 1, "{fault:?}");
        assert_eq!(claims(&token.token)["aud"], audience);
    }
}

#[tokio::test]
async fn bad_input_is_rejected_before_the_metadata_server() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;
    let mut client = broker.client().await;
    let bad_access = [
        (
            "service_account",
            GetAccessTokenRequest {
                service_account: "../../token".into(),
                ..access_request(&[])
            },
        ),
        (
            "service_account",
            GetAccessTokenRequest {
                service_account: "a/b@c.com".into(),
                ..access_request(&[])
            },
        ),
        ("scopes[0]", access_request(&["a,b"])),
        ("scopes[1]", access_request(&["ok", "x&y=z"])),
        ("scopes[0]", access_request(&["with space"])),
        ("scopes[0]", access_request(&[""])),
        (
            "min_valid_for",
            GetAccessTokenRequest {
                min_valid_for: Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..access_request(&[])
            },
        ),
    ];
    for (field, request) in bad_access {
        let error = client.get_access_token(request).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
        assert!(
            error.message().contains(field),
            "{field}: {}",
            error.message()
        );
    }
    let bad_id = [
        ("audience", id_request("")),
        ("audience", id_request(&"a".repeat(2049))),
        (
            "include_licenses",
            GetIdTokenRequest {
                include_licenses: true,
                ..id_request("aud")
            },
        ),
        (
            "format",
            GetIdTokenRequest {
                format: 42,
                ..id_request("aud")
            },
        ),
        (
            "min_valid_for",
            GetIdTokenRequest {
                min_valid_for: Some(prost_types::Duration {
                    seconds: 7200,
                    nanos: 0,
                }),
                ..id_request("aud")
            },
        ),
    ];
    for (field, request) in bad_id {
        let error = client.get_id_token(request).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
        assert!(
            error.message().contains(field),
            "{field}: {}",
            error.message()
        );
    }
    let error = client
        .watch_token(WatchTokenRequest { request: None })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    let too_many: Vec<String> = (0..100).map(|i| format!("scope:{i}")).collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let error = client
        .get_access_token(access_request(&too_many))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted);

    let stats = emulator.stats();
    assert_eq!((stats.token_requests, stats.identity_requests), (0, 0));
}

#[tokio::test]
async fn upstream_refusals_keep_their_meaning() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let broker = Broker::start(&emulator, &[]).await;
    let mut client = broker.client().await;
    let unknown = GetAccessTokenRequest {
        service_account: "ghost@p.iam.gserviceaccount.com".into(),
        ..access_request(&[])
    };
    let error = client.get_access_token(unknown).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert!(error.message().contains("ghost@p.iam.gserviceaccount.com"));
    emulator.set_fault(Some(FaultRule::always(Fault::Status {
        status: 403,
        retry_after_secs: None,
    })));
    let error = client
        .get_access_token(access_request(&[]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn min_valid_for_is_honoured_or_refused() {
    let emulator = emulator_with_lifetime(Duration::from_secs(120)).await;
    let broker = Broker::start(&emulator, &["--expiry-skew", "1s"]).await;
    let mut client = broker.client().await;
    let min = |secs| {
        Some(prost_types::Duration {
            seconds: secs,
            nanos: 0,
        })
    };

    let token = broker
        .typed_client()
        .await
        .id_token(GetIdTokenRequest {
            min_valid_for: min(60),
            ..id_request("aud")
        })
        .await
        .unwrap();
    let left = expire_time(&token)
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(left >= Duration::from_secs(60), "{left:?}");

    // Longer than any token lives, and the key was fetched less than 10 s
    // ago: UNAVAILABLE at once, without a fetch (the fetch a call after
    // those 10 s makes is unit-tested in src/cache.rs).
    let before = emulator.stats().identity_requests;
    let error = client
        .get_id_token(GetIdTokenRequest {
            min_valid_for: min(600),
            ..id_request("aud")
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    assert!(
        error.message().contains("min_valid_for") && error.message().contains("less than 10s ago"),
        "{}",
        error.message()
    );
    assert_eq!(emulator.stats().identity_requests, before);
}
