//! The metadata server emulator keeps the real server's rules.

use http::Method;
use tokenbroker::emulator::{Emulator, EmulatorConfig};

use crate::common;
use crate::common::http::send_to;

const ACCOUNTS: &str = "/computeMetadata/v1/instance/service-accounts/";

async fn get(emulator: &Emulator, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let url = format!("http://{}{path}", emulator.host());
    let answer = send_to(Method::GET, &url, headers, "").await;
    assert_eq!(answer.headers["metadata-flavor"], "Google");
    (answer.status.as_u16(), answer.body)
}

const FLAVOR: (&str, &str) = ("Metadata-Flavor", "Google");

#[tokio::test]
async fn requires_the_flavor_header_and_refuses_proxied_requests() {
    let emulator = common::emulator(EmulatorConfig::default()).await;
    let token = format!("{ACCOUNTS}default/token");
    assert_eq!(get(&emulator, &token, &[]).await.0, 403);
    assert_eq!(
        get(&emulator, &token, &[("Metadata-Flavor", "Other")])
            .await
            .0,
        403
    );
    let proxied = [FLAVOR, ("X-Forwarded-For", "10.0.0.1")];
    assert_eq!(get(&emulator, &token, &proxied).await.0, 403);
    assert_eq!(emulator.stats().rejected_requests, 3);
    assert_eq!(emulator.stats().token_requests, 0);
    let (status, body) = get(&emulator, &token, &[FLAVOR]).await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["expires_in"], 3600);
}

#[tokio::test]
async fn lists_accounts_and_knows_their_emails() {
    let emulator = common::emulator(EmulatorConfig {
        accounts: vec![
            "a@p.iam.gserviceaccount.com".into(),
            "b@p.iam.gserviceaccount.com".into(),
        ],
        ..EmulatorConfig::default()
    })
    .await;
    let (status, listing) = get(&emulator, ACCOUNTS, &[FLAVOR]).await;
    assert_eq!(status, 200);
    assert_eq!(
        listing,
        "default/\na@p.iam.gserviceaccount.com/\nb@p.iam.gserviceaccount.com/\n"
    );
    let email = |account: &'static str| {
        let emulator = &emulator;
        async move { get(emulator, &format!("{ACCOUNTS}{account}/email"), &[FLAVOR]).await }
    };
    assert_eq!(
        email("default").await,
        (200, "a@p.iam.gserviceaccount.com".into())
    );
    assert_eq!(
        email("b@p.iam.gserviceaccount.com").await.1,
        "b@p.iam.gserviceaccount.com"
    );
    assert_eq!(email("nobody@p.iam.gserviceaccount.com").await.0, 404);
}

#[tokio::test]
async fn identity_needs_an_audience_and_signs_its_claims() {
    let emulator = common::emulator(EmulatorConfig::default()).await;
    let identity = format!("{ACCOUNTS}default/identity");
    let (status, body) = get(&emulator, &identity, &[FLAVOR]).await;
    assert_eq!(
        (status, body.as_str()),
        (400, "non-empty audience parameter required")
    );
    let (status, jwt) = get(
        &emulator,
        &format!("{identity}?audience=https%3A%2F%2Fa.run.app&format=full&licenses=TRUE"),
        &[FLAVOR],
    )
    .await;
    assert_eq!(status, 200);
    let claims = common::claims(&jwt);
    assert_eq!(claims["aud"], "https://a.run.app");
    assert_eq!(claims["iss"], "https://accounts.google.com");
    assert_eq!(claims["email"], tokenbroker::emulator::DEFAULT_ACCOUNT);
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        3600
    );
    assert!(claims["google"]["compute_engine"]["license_id"].is_array());
    assert_eq!(jwt.split('.').count(), 3);
}

// === The fake OAuth token endpoint and IAM Credentials API ===

mod google {
    use http::Method;
    use serde_json::{Value, json};
    use tokenbroker::emulator::{Emulator, EmulatorConfig};

    use super::common::{self, KEY_ACCOUNT, TEST_KEYS};
    use crate::common::http::send_to;

    const JWT_BEARER: &str = "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer";
    const TARGET: &str = "target@test-project.iam.gserviceaccount.com";

    async fn post(
        url: &str,
        content_type: &str,
        body: String,
        bearer: Option<&str>,
    ) -> (u16, Value) {
        let authorization = bearer.map(|bearer| format!("Bearer {bearer}"));
        let mut headers = vec![("content-type", content_type)];
        headers.extend(
            authorization
                .as_deref()
                .map(|value| ("authorization", value)),
        );
        let answer = send_to(Method::POST, url, &headers, body).await;
        (answer.status.as_u16(), answer.json())
    }

    fn now() -> u64 {
        common::unix_now()
    }

    fn sign(claims: &Value, kid: &str, key: usize) -> String {
        common::sign_with_test_key(claims, kid, key)
    }

    async fn exchange(emulator: &Emulator, assertion: &str) -> (u16, Value) {
        post(
            &emulator.token_uri(),
            "application/x-www-form-urlencoded",
            format!("grant_type={JWT_BEARER}&assertion={assertion}"),
            None,
        )
        .await
    }

    async fn trusting_emulator() -> Emulator {
        let emulator = common::emulator(EmulatorConfig::default()).await;
        emulator.add_service_account_key("kid-1", KEY_ACCOUNT, TEST_KEYS[0].1.to_vec());
        emulator
    }

    fn good_claims(emulator: &Emulator) -> Value {
        let now = now();
        json!({
            "iss": KEY_ACCOUNT,
            "sub": KEY_ACCOUNT,
            "aud": emulator.token_uri(),
            "iat": now,
            "exp": now + 3600,
            "scope": "scope:a scope:b",
        })
    }

    fn invalid_grant(answer: &(u16, Value), needle: &str) {
        assert_eq!(answer.0, 400, "{answer:?}");
        assert_eq!(answer.1["error"], "invalid_grant", "{answer:?}");
        let description = answer.1["error_description"].as_str().unwrap();
        assert!(description.contains(needle), "{description}");
    }

    #[tokio::test]
    async fn the_token_endpoint_accepts_only_well_signed_short_lived_assertions() {
        let emulator = trusting_emulator().await;
        let (status, body) = exchange(&emulator, &sign(&good_claims(&emulator), "kid-1", 0)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "Bearer");
        let info = emulator
            .token_info(body["access_token"].as_str().unwrap())
            .unwrap();
        assert_eq!(info.scopes, ["scope:a", "scope:b"]);

        let mut id = good_claims(&emulator);
        id.as_object_mut().unwrap().remove("scope");
        id["target_audience"] = "https://a.run.app".into();
        let (status, body) = exchange(&emulator, &sign(&id, "kid-1", 0)).await;
        assert_eq!(status, 200);
        let claims = common::claims(body["id_token"].as_str().unwrap());
        assert_eq!(
            (claims["aud"].as_str(), claims["email"].as_str()),
            (Some("https://a.run.app"), Some(KEY_ACCOUNT))
        );

        // Signed by another key, or under an unknown kid.
        invalid_grant(
            &exchange(&emulator, &sign(&good_claims(&emulator), "kid-1", 1)).await,
            "Invalid JWT Signature",
        );
        invalid_grant(
            &exchange(&emulator, &sign(&good_claims(&emulator), "kid-9", 0)).await,
            "Invalid JWT Signature",
        );
        // Claims changed after signing.
        let signed = sign(&good_claims(&emulator), "kid-1", 0);
        let mut parts: Vec<&str> = signed.split('.').collect();
        let mut forged = good_claims(&emulator);
        forged["scope"] = "scope:everything".into();
        use base64::Engine;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged.to_string());
        parts[1] = &payload;
        invalid_grant(
            &exchange(&emulator, &parts.join(".")).await,
            "Invalid JWT Signature",
        );

        // Each value is made from the good claims, so that times stay
        // relative to their `iat` whatever the clock does meanwhile.
        type Variant = (&'static str, fn(&Value) -> Value, &'static str);
        let variants: [Variant; 5] = [
            (
                "aud",
                |_| json!("https://oauth2.googleapis.com/token"),
                "audience",
            ),
            ("iss", |_| json!("other@p.iam.gserviceaccount.com"), "iss"),
            ("sub", |_| json!("other@p.iam.gserviceaccount.com"), "sub"),
            (
                "exp",
                |c| json!(c["iat"].as_u64().unwrap() + 3601),
                "short-lived",
            ),
            (
                "iat",
                |c| json!(c["iat"].as_u64().unwrap() + 3000),
                "short-lived",
            ),
        ];
        for (claim, value, needle) in variants {
            let mut claims = good_claims(&emulator);
            claims[claim] = value(&claims);
            invalid_grant(
                &exchange(&emulator, &sign(&claims, "kid-1", 0)).await,
                needle,
            );
        }
        let mut expired = good_claims(&emulator);
        let now = now();
        expired["iat"] = json!(now - 7200);
        expired["exp"] = json!(now - 3600);
        invalid_grant(
            &exchange(&emulator, &sign(&expired, "kid-1", 0)).await,
            "short-lived",
        );

        let mut neither = good_claims(&emulator);
        neither.as_object_mut().unwrap().remove("scope");
        let (status, body) = exchange(&emulator, &sign(&neither, "kid-1", 0)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_scope"))
        );

        let (status, body) = post(
            &emulator.token_uri(),
            "application/x-www-form-urlencoded",
            "grant_type=password&username=x".into(),
            None,
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("unsupported_grant_type"))
        );
        assert_eq!(emulator.stats().google_rejected, 11);
    }

    fn iam_url(emulator: &Emulator, method: &str) -> String {
        format!(
            "{}/v1/projects/-/serviceAccounts/{TARGET}:{method}",
            emulator.iam_endpoint()
        )
    }

    fn api_error(answer: &(u16, Value), code: u16, status: &str) {
        assert_eq!(answer.0, code, "{answer:?}");
        assert_eq!(answer.1["error"]["code"], code);
        assert_eq!(answer.1["error"]["status"], status);
    }

    #[tokio::test]
    async fn the_iam_api_checks_the_bearer_token_and_the_request() {
        let emulator = trusting_emulator().await;
        let token_for = async |scope: &str| {
            let mut claims = good_claims(&emulator);
            claims["scope"] = scope.into();
            let (_, body) = exchange(&emulator, &sign(&claims, "kid-1", 0)).await;
            body["access_token"].as_str().unwrap().to_string()
        };
        let cloud = token_for("https://www.googleapis.com/auth/cloud-platform").await;
        let narrow = token_for("scope:a").await;
        let body = json!({"scope": ["scope:x"], "lifetime": "3600s"}).to_string();
        let access = iam_url(&emulator, "generateAccessToken");
        let json = "application/json";

        api_error(
            &post(&access, json, body.clone(), None).await,
            401,
            "UNAUTHENTICATED",
        );
        api_error(
            &post(&access, json, body.clone(), Some("ya29.made-up")).await,
            401,
            "UNAUTHENTICATED",
        );
        api_error(
            &post(&access, json, body.clone(), Some(&narrow)).await,
            403,
            "PERMISSION_DENIED",
        );
        // Not (yet) allowed to impersonate the target.
        api_error(
            &post(&access, json, body.clone(), Some(&cloud)).await,
            403,
            "PERMISSION_DENIED",
        );
        emulator.allow_impersonation(TARGET);
        let (status, answer) = post(&access, json, body, Some(&cloud)).await;
        assert_eq!(status, 200, "{answer}");
        let info = emulator
            .token_info(answer["accessToken"].as_str().unwrap())
            .unwrap();
        assert_eq!(info.email, TARGET);
        let expire_time = humantime::parse_rfc3339(answer["expireTime"].as_str().unwrap()).unwrap();
        let lifetime = expire_time
            .duration_since(std::time::SystemTime::now())
            .unwrap()
            .as_secs();
        assert!((3590..=3600).contains(&lifetime), "{lifetime}");

        let no_scope = json!({"lifetime": "3600s"}).to_string();
        api_error(
            &post(&access, json, no_scope, Some(&cloud)).await,
            400,
            "INVALID_ARGUMENT",
        );
        let too_long = json!({"scope": ["s"], "lifetime": "7200s"}).to_string();
        api_error(
            &post(&access, json, too_long, Some(&cloud)).await,
            400,
            "INVALID_ARGUMENT",
        );
        let unknown_delegate =
            json!({"scope": ["s"], "delegates": ["projects/-/serviceAccounts/x@p.iam.gserviceaccount.com"]})
                .to_string();
        api_error(
            &post(&access, json, unknown_delegate, Some(&cloud)).await,
            403,
            "PERMISSION_DENIED",
        );

        let id = iam_url(&emulator, "generateIdToken");
        let no_audience = json!({"includeEmail": true}).to_string();
        api_error(
            &post(&id, json, no_audience, Some(&cloud)).await,
            400,
            "INVALID_ARGUMENT",
        );
        let good = json!({"audience": "https://a.run.app", "includeEmail": true}).to_string();
        let (status, answer) = post(&id, json, good, Some(&cloud)).await;
        assert_eq!(status, 200);
        assert_eq!(
            common::claims(answer["token"].as_str().unwrap())["email"],
            TARGET
        );
        assert_eq!(emulator.iam_calls().len(), 2);
        assert!(emulator.iam_calls().iter().all(|c| c.caller == KEY_ACCOUNT));
    }

    async fn put(emulator: &Emulator, what: &str, body: String) -> u16 {
        let url = format!("{}/emulator/v1/{what}", emulator.iam_endpoint());
        send_to(Method::PUT, &url, &[], body).await.status.as_u16()
    }

    #[tokio::test]
    async fn keys_users_and_impersonable_accounts_are_set_over_http() {
        let emulator = common::emulator(EmulatorConfig::default()).await;
        let key = common::key_json(&emulator, "kid-http");
        assert_eq!(put(&emulator, "keys", key.to_string()).await, 200);
        let (status, _) = exchange(&emulator, &sign(&good_claims(&emulator), "kid-http", 0)).await;
        assert_eq!(status, 200, "the key is trusted");
        let mut broken = key.clone();
        broken["private_key"] = "not a key".into();
        assert_eq!(put(&emulator, "keys", broken.to_string()).await, 400);
        assert_eq!(put(&emulator, "keys", "{}".into()).await, 400);

        let user = json!({
            "client_id": "c", "client_secret": "s", "refresh_token": "r", "email": "dev@example.com",
        });
        assert_eq!(put(&emulator, "users", user.to_string()).await, 200);
        let (status, body) = post(
            &emulator.token_uri(),
            "application/x-www-form-urlencoded",
            "grant_type=refresh_token&client_id=c&client_secret=s&refresh_token=r".into(),
            None,
        )
        .await;
        assert_eq!(status, 200);
        let cloud = body["access_token"].as_str().unwrap().to_string();
        assert_eq!(
            emulator.token_info(&cloud).unwrap().email,
            "dev@example.com"
        );
        let (status, body) = post(
            &emulator.token_uri(),
            "application/x-www-form-urlencoded",
            "grant_type=refresh_token&client_id=c&client_secret=s&refresh_token=stolen".into(),
            None,
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_grant"))
        );

        let body = json!({"scope": ["s"]}).to_string();
        let access = iam_url(&emulator, "generateAccessToken");
        assert_eq!(
            post(&access, "application/json", body.clone(), Some(&cloud))
                .await
                .0,
            403
        );
        let target = json!({"email": TARGET}).to_string();
        assert_eq!(put(&emulator, "impersonable", target).await, 200);
        assert_eq!(
            post(&access, "application/json", body, Some(&cloud))
                .await
                .0,
            200
        );
    }
}

#[tokio::test]
async fn serve_emulator_has_its_control_api_only_when_asked() {
    for (flags, status) in [(vec![], 404), (vec!["--emulator-control"], 200)] {
        let broker = common::Broker::emulated(&flags).await;
        let url = format!("http://{}/emulator/v1/stats", broker.emulator_addr().await);
        let answer = send_to(Method::GET, &url, &[], "").await;
        assert_eq!(answer.status, status, "{flags:?}: {}", answer.body);
    }
}
