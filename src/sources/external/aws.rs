//! The AWS subject token (`environment_id: aws1`): a `GetCallerIdentity`
//! request signed with SigV4 by the AWS SDK's own `aws-sigv4` crate and
//! serialised as Google specifies (the URL-encoded JSON of its URL, method
//! and headers), never sent to AWS: Google STS checks it there. The region
//! and credentials come from the standard AWS environment variables, else
//! from EC2 instance metadata (IMDSv2 when the file names its session-token
//! URL).

use std::time::SystemTime;

use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use http::{HeaderMap, HeaderValue, Method, Uri};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

use crate::error::FetchError;
use crate::secret::Secret;
use crate::sources::credentials::external::Aws;
use crate::sources::https::HttpsClient;

/// The header naming the pool provider, signed with the request.
pub const TARGET_RESOURCE_HEADER: &str = "x-goog-cloud-target-resource";
/// The AWS service the request is signed for.
pub const SIGNING_SERVICE: &str = "sts";
/// The header IMDSv2 session tokens are asked for with.
const SESSION_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// The header IMDSv2 session tokens are sent in.
const SESSION_HEADER: &str = "x-aws-ec2-metadata-token";
/// How long an IMDSv2 session token is asked to live, in seconds (as
/// Google's libraries ask).
const SESSION_TTL_SECONDS: &str = "300";
const SERVICE: &str = "EC2 instance metadata";

/// What Python's `urllib.parse.quote` leaves as it is, which Google's
/// libraries use to serialise the request: letters, digits, `_.-~/`.
const QUOTE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'_')
    .remove(b'.')
    .remove(b'-')
    .remove(b'~')
    .remove(b'/');

/// The AWS variables, read at every exchange as the AWS SDKs do.
#[derive(Default)]
pub struct Environment {
    /// `AWS_REGION`, else `AWS_DEFAULT_REGION`.
    pub region: Option<String>,
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<Secret>,
    /// `AWS_SESSION_TOKEN`.
    pub session_token: Option<Secret>,
}

impl Environment {
    /// Reads the process's environment.
    pub fn from_process() -> Self {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY").map(Secret::new),
            session_token: var("AWS_SESSION_TOKEN").map(Secret::new),
        }
    }
}

/// An AWS access key, with its session token if temporary.
pub struct AwsCredentials {
    /// The key's id.
    pub access_key_id: String,
    /// The secret.
    pub secret_access_key: Secret,
    /// The session token of temporary credentials.
    pub session_token: Option<Secret>,
}

/// The role credentials EC2 instance metadata answers with.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RoleCredentials {
    access_key_id: String,
    secret_access_key: String,
    token: Option<String>,
}

/// The subject token for `audience`: a signed `GetCallerIdentity` request.
pub async fn subject_token(
    source: &Aws,
    audience: &str,
    http: &HttpsClient,
    env: &Environment,
) -> Result<Secret, FetchError> {
    let credentials_in_env = env.access_key_id.is_some() && env.secret_access_key.is_some();
    let metadata = if env.region.is_none() || !credentials_in_env {
        InstanceMetadata::open(source, http).await?
    } else {
        InstanceMetadata::unused(http)
    };
    let region = match &env.region {
        Some(region) => region.clone(),
        None => metadata.region(source).await?,
    };
    let credentials = match (&env.access_key_id, &env.secret_access_key) {
        (Some(id), Some(secret)) => AwsCredentials {
            access_key_id: id.clone(),
            secret_access_key: secret.clone(),
            session_token: env.session_token.clone(),
        },
        _ => metadata.credentials(source).await?,
    };
    let url = source.verification_url.replace("{region}", &region);
    signed_request(&url, &region, audience, &credentials, SystemTime::now())
}

/// Signs the `GetCallerIdentity` POST to `url` at `time` and serialises it
/// as Google STS expects.
pub fn signed_request(
    url: &str,
    region: &str,
    audience: &str,
    credentials: &AwsCredentials,
    time: SystemTime,
) -> Result<Secret, FetchError> {
    let headers: Vec<_> = signed_headers(url, region, audience, credentials, time)?
        .iter()
        .map(|(key, value)| json!({"key": key, "value": value.as_str()}))
        .collect();
    let request =
        Zeroizing::new(json!({"url": url, "method": "POST", "headers": headers}).to_string());
    Ok(Secret::new(
        utf8_percent_encode(&request, QUOTE).to_string(),
    ))
}

/// The headers of the `GetCallerIdentity` POST to `url` signed at `time`,
/// named and sorted as Google's libraries send them (`Authorization`
/// first). Also how the emulator checks a signature.
pub fn signed_headers(
    url: &str,
    region: &str,
    audience: &str,
    credentials: &AwsCredentials,
    time: SystemTime,
) -> Result<Vec<(String, Zeroizing<String>)>, FetchError> {
    if region.is_empty()
        || !region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(FetchError::Malformed(
            "the AWS region is not a region name (letters, digits and dashes)".into(),
        ));
    }
    let uri: Uri = url
        .parse()
        .map_err(|_| FetchError::Malformed("the AWS verification URL is not a URL".into()))?;
    // The host name alone, without a port, as Google's libraries sign it.
    let host = uri
        .host()
        .map(str::to_string)
        .ok_or_else(|| FetchError::Malformed("the AWS verification URL has no host".into()))?;
    let identity = aws_credential_types::Credentials::new(
        &credentials.access_key_id,
        credentials.secret_access_key.expose(),
        credentials
            .session_token
            .as_ref()
            .map(|t| t.expose().to_string()),
        None,
        "tokenbroker",
    )
    .into();
    let cannot_sign = |_| FetchError::Malformed("cannot sign the AWS request".into());
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SIGNING_SERVICE)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|_| FetchError::Malformed("cannot sign the AWS request".into()))?
        .into();
    let signed = [("host", host.as_str()), (TARGET_RESOURCE_HEADER, audience)];
    let request = SignableRequest::new(
        "POST",
        url,
        signed.iter().copied(),
        SignableBody::Bytes(&[]),
    )
    .map_err(cannot_sign)?;
    let (instructions, _signature) = sign(request, &params).map_err(cannot_sign)?.into_parts();
    let mut headers: Vec<(String, Zeroizing<String>)> = signed
        .iter()
        .map(|(name, value)| (name.to_string(), Zeroizing::new(value.to_string())))
        .collect();
    for (name, value) in instructions.headers() {
        let name = if name.eq_ignore_ascii_case("authorization") {
            "Authorization".to_string()
        } else {
            name.to_string()
        };
        headers.push((name, Zeroizing::new(value.to_string())));
    }
    // Sorted as Google's libraries sort them (byte order: "Authorization"
    // first).
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(headers)
}

/// EC2 instance metadata, with an IMDSv2 session when the file names the
/// session-token URL.
struct InstanceMetadata<'a> {
    http: &'a HttpsClient,
    headers: HeaderMap,
}

impl<'a> InstanceMetadata<'a> {
    /// Metadata that will not be asked (everything is in the environment).
    fn unused(http: &'a HttpsClient) -> Self {
        Self {
            http,
            headers: HeaderMap::new(),
        }
    }

    /// Opens an IMDSv2 session if the file names its URL.
    async fn open(source: &Aws, http: &'a HttpsClient) -> Result<Self, FetchError> {
        let mut headers = HeaderMap::new();
        if let Some(url) = &source.session_token_url {
            let mut ask = HeaderMap::new();
            ask.insert(
                SESSION_TTL_HEADER,
                HeaderValue::from_static(SESSION_TTL_SECONDS),
            );
            let token = http.fetch(SERVICE, Method::PUT, url, &ask).await?;
            let mut value = HeaderValue::from_bytes(token.trim_ascii()).map_err(|_| {
                FetchError::Malformed("the IMDSv2 session token is not a header value".into())
            })?;
            value.set_sensitive(true);
            headers.insert(SESSION_HEADER, value);
        }
        Ok(Self { http, headers })
    }

    async fn get(&self, url: &Uri) -> Result<String, FetchError> {
        let body = self
            .http
            .fetch(SERVICE, Method::GET, url, &self.headers)
            .await?;
        String::from_utf8(body.to_vec())
            .map(|text| text.trim().to_string())
            .map_err(|_| FetchError::Malformed("instance metadata answered with non-UTF-8".into()))
    }

    /// The region: the availability zone without its last letter.
    async fn region(&self, source: &Aws) -> Result<String, FetchError> {
        let url = source.region_url.as_ref().ok_or_else(|| {
            FetchError::Malformed(
                "AWS_REGION is unset and the credentials file has no credential_source.region_url"
                    .into(),
            )
        })?;
        let mut zone = self.get(url).await?;
        zone.pop();
        Ok(zone)
    }

    /// The instance role's temporary credentials.
    async fn credentials(&self, source: &Aws) -> Result<AwsCredentials, FetchError> {
        let url = source.credentials_url.as_ref().ok_or_else(|| {
            FetchError::Malformed(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are unset and the credentials file has no credential_source.url".into(),
            )
        })?;
        let role = self.get(url).await?;
        if role.is_empty() || role.contains(['/', '?', '#']) || role.contains(char::is_whitespace) {
            return Err(FetchError::Malformed(
                "instance metadata names no usable IAM role".into(),
            ));
        }
        let role_url: Uri = format!("{}/{role}", url.to_string().trim_end_matches('/'))
            .parse()
            .map_err(|_| FetchError::Malformed("cannot build the role's URL".into()))?;
        let body = Zeroizing::new(self.get(&role_url).await?);
        let parsed: RoleCredentials = serde_json::from_str(&body).map_err(|_| {
            FetchError::Malformed(
                "instance metadata's role credentials are not the expected JSON (AccessKeyId, SecretAccessKey, Token)".into(),
            )
        })?;
        Ok(AwsCredentials {
            access_key_id: parsed.access_key_id,
            secret_access_key: Secret::new(parsed.secret_access_key),
            session_token: parsed.token.map(Secret::new),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    const URL: &str =
        "https://sts.us-east-1.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15";

    fn decode(token: &Secret) -> serde_json::Value {
        let json = percent_encoding::percent_decode_str(token.expose())
            .decode_utf8()
            .unwrap();
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn the_request_is_signed_and_serialised_as_google_specifies() {
        let credentials = AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
            session_token: Some(Secret::new("session-token-secret".into())),
        };
        let time = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
        let token = signed_request(
            URL,
            "us-east-1",
            "//iam.googleapis.com/pool",
            &credentials,
            time,
        )
        .unwrap();
        assert!(!token.expose().contains('{') && !token.expose().contains(' '));
        let request = decode(&token);
        assert_eq!(request["url"], URL);
        assert_eq!(request["method"], "POST");
        let keys: Vec<&str> = request["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["key"].as_str().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "Authorization",
                "host",
                "x-amz-date",
                "x-amz-security-token",
                TARGET_RESOURCE_HEADER
            ]
        );
        let header = |name: &str| {
            request["headers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h["key"] == name)
                .unwrap()["value"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let authorization = header("Authorization");
        assert!(
            authorization.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260528/us-east-1/sts/aws4_request"
            ),
            "{authorization}"
        );
        assert!(
            authorization.contains(TARGET_RESOURCE_HEADER),
            "the audience is signed"
        );
        assert!(!authorization.contains("wJalr"));
        assert_eq!(header("host"), "sts.us-east-1.amazonaws.com");
        assert_eq!(header(TARGET_RESOURCE_HEADER), "//iam.googleapis.com/pool");
        // The same inputs sign the same; another secret signs otherwise.
        let again = signed_request(
            URL,
            "us-east-1",
            "//iam.googleapis.com/pool",
            &credentials,
            time,
        )
        .unwrap();
        assert_eq!(again, token);
        let other = AwsCredentials {
            secret_access_key: Secret::new("other".into()),
            ..credentials
        };
        let forged =
            signed_request(URL, "us-east-1", "//iam.googleapis.com/pool", &other, time).unwrap();
        assert_ne!(forged, token);
    }

    #[test]
    fn a_region_that_is_not_a_name_is_refused() {
        let credentials = AwsCredentials {
            access_key_id: "AKID".into(),
            secret_access_key: Secret::new("s".into()),
            session_token: None,
        };
        for region in ["", "us-east-1/evil", "us east"] {
            assert!(signed_request(URL, region, "a", &credentials, SystemTime::now()).is_err());
        }
    }
}
