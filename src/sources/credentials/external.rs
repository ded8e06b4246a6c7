//! `"type": "external_account"`: the Workload Identity Federation file that
//! `gcloud iam workload-identity-pools create-cred-config` writes. Its
//! fields are read as Google's libraries read them; where the subject
//! token comes from is [`SubjectSource`].

use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Uri};

use super::document::Object;
use super::{CredentialsError, DEFAULT_IMPERSONATED_LIFETIME, ImpersonationUrl, endpoint_field};
use crate::secret::Secret;

/// Google STS, unless the file names another `token_url`.
pub const DEFAULT_TOKEN_URL: &str = "https://sts.googleapis.com/v1/token";
/// An executable's time limit when the file names none (30 s).
pub const DEFAULT_EXECUTABLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The time limits Google's libraries accept for an executable (5 s to 2 min).
const EXECUTABLE_TIMEOUT_MILLIS: std::ops::RangeInclusive<u64> = 5_000..=120_000;
/// The impersonated token lifetimes Google accepts (10 min to 12 h).
const IMPERSONATED_LIFETIME_SECS: std::ops::RangeInclusive<u64> = 600..=43_200;
/// The environment variable that lets executables run.
pub const ALLOW_EXECUTABLES_ENV: &str = "GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES";

/// A Workload Identity Federation configuration.
#[derive(Debug)]
pub struct ExternalAccount {
    /// The workload identity pool provider (`//iam.googleapis.com/...`).
    pub audience: String,
    /// What the subject token is (`urn:ietf:params:oauth:token-type:jwt`, ...).
    pub subject_token_type: String,
    /// Where the subject token is exchanged (Google STS).
    pub token_url: Uri,
    /// The service account the federated token impersonates, if any.
    pub impersonation: Option<Impersonation>,
    /// The project billed for a workforce pool's STS calls.
    pub workforce_pool_user_project: Option<String>,
    /// The OAuth client STS calls authenticate as (`client_id`,
    /// `client_secret`), if the file names one.
    pub client: Option<(String, Secret)>,
    /// Where the subject token comes from.
    pub subject: SubjectSource,
    /// The file it came from.
    pub path: PathBuf,
}

/// `service_account_impersonation_url` and its token lifetime.
#[derive(Clone, Debug)]
pub struct Impersonation {
    /// The account and its IAM Credentials URLs.
    pub url: ImpersonationUrl,
    /// `service_account_impersonation.token_lifetime_seconds`.
    pub lifetime: Duration,
}

/// `credential_source`: where the external subject token is read.
#[derive(Debug)]
pub enum SubjectSource {
    /// A file, read again at every exchange (Kubernetes and CI rotate it).
    File {
        /// The file.
        path: PathBuf,
        /// How the token sits in it.
        format: SubjectFormat,
    },
    /// An HTTP GET.
    Url {
        /// The URL.
        url: Uri,
        /// Headers sent with it (values kept out of logs).
        headers: HeaderMap,
        /// How the token sits in the answer.
        format: SubjectFormat,
    },
    /// A program printing Google's executable-response JSON.
    Executable(Executable),
    /// AWS (`environment_id: aws1`): a signed `GetCallerIdentity` request.
    Aws(Aws),
}

/// `credential_source` with `environment_id: aws1`.
#[derive(Clone, Debug)]
pub struct Aws {
    /// Where the availability zone is read when `AWS_REGION` and
    /// `AWS_DEFAULT_REGION` are unset (EC2 instance metadata).
    pub region_url: Option<Uri>,
    /// Where the role's credentials are read when `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` are unset.
    pub credentials_url: Option<Uri>,
    /// The `GetCallerIdentity` URL, with `{region}` to fill in.
    pub verification_url: String,
    /// IMDSv2's session-token URL; without it, instance metadata is read
    /// with IMDSv1.
    pub session_token_url: Option<Uri>,
}

/// How a subject token sits in a file or an HTTP answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectFormat {
    /// The whole content, trimmed.
    Text,
    /// The string field of a JSON object.
    Json {
        /// `subject_token_field_name`.
        field: String,
    },
}

/// `credential_source.executable`.
#[derive(Clone, Debug)]
pub struct Executable {
    /// The program and its arguments (split on white space, no shell).
    pub command: Vec<String>,
    /// How long it may run.
    pub timeout: Duration,
    /// Where it caches its answer, which is read first while valid.
    pub output_file: Option<PathBuf>,
}

/// Reads an `external_account` file's fields.
pub fn parse(
    fields: &Object<'_>,
    allow_executables: bool,
) -> Result<ExternalAccount, CredentialsError> {
    let audience = fields.text("audience")?;
    let subject_token_type = fields.text("subject_token_type")?;
    let token_url = match fields.optional_text("token_url")? {
        Some(url) => endpoint_field(fields, "token_url", url)?,
        None => DEFAULT_TOKEN_URL.parse().expect("a valid URL"),
    };
    let impersonation = if fields.has("service_account_impersonation_url") {
        let url = ImpersonationUrl::parse(fields, "service_account_impersonation_url")?;
        let lifetime = match fields.optional_object("service_account_impersonation")? {
            Some(options) => options
                .optional_u64("token_lifetime_seconds")?
                .map(|seconds| {
                    IMPERSONATED_LIFETIME_SECS
                        .contains(&seconds)
                        .then(|| Duration::from_secs(seconds))
                        .ok_or_else(|| {
                            options.error(
                                "token_lifetime_seconds",
                                "outside 600 to 43200 (10 minutes to 12 hours)",
                            )
                        })
                })
                .transpose()?,
            None => None,
        };
        Some(Impersonation {
            url,
            lifetime: lifetime.unwrap_or(DEFAULT_IMPERSONATED_LIFETIME),
        })
    } else {
        None
    };
    let workforce_pool_user_project = fields.optional_text("workforce_pool_user_project")?;
    if workforce_pool_user_project.is_some() && !is_workforce_pool(audience) {
        return Err(fields.error(
            "workforce_pool_user_project",
            "set, but the audience is not a workforce pool (//iam.googleapis.com/locations/LOCATION/workforcePools/...)",
        ));
    }
    // A client id alone authenticates with an empty secret, as in
    // Google's libraries.
    let client = match fields.optional_text("client_id")? {
        Some(id) => {
            let secret = fields.optional_text("client_secret")?.unwrap_or_default();
            Some((id.to_string(), Secret::new(secret.to_string())))
        }
        None if fields.has("client_secret") => {
            return Err(fields.error("client_id", "missing, though client_secret is set"));
        }
        None => None,
    };
    // Checked, not kept: it bills the API calls made with the tokens, which
    // clients make (with their own `x-goog-user-project`), not the broker.
    fields.optional_text("quota_project_id")?;
    let subject = subject_source(&fields.object("credential_source")?, allow_executables)?;
    Ok(ExternalAccount {
        audience: audience.to_string(),
        subject_token_type: subject_token_type.to_string(),
        token_url,
        impersonation,
        workforce_pool_user_project: workforce_pool_user_project.map(str::to_string),
        client,
        subject,
        path: fields.path().to_path_buf(),
    })
}

/// Whether `audience` names a workforce pool, whose STS calls may name a
/// user project.
fn is_workforce_pool(audience: &str) -> bool {
    audience
        .strip_prefix("//iam.googleapis.com/locations/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, rest)| rest.starts_with("workforcePools/"))
}

const SOURCES: [&str; 3] = ["file", "url", "executable"];

fn subject_source(
    source: &Object<'_>,
    allow_executables: bool,
) -> Result<SubjectSource, CredentialsError> {
    // An AWS source has a `url` of its own (the role's credentials).
    if source.has("environment_id") {
        return aws(source).map(SubjectSource::Aws);
    }
    if source.has("certificate") {
        return Err(source.error(
            "certificate",
            "an X.509 workload identity source, which this broker does not read yet; use a file, url, executable or AWS source",
        ));
    }
    let named: Vec<&str> = SOURCES.into_iter().filter(|f| source.has(f)).collect();
    match named.as_slice() {
        ["file"] => Ok(SubjectSource::File {
            path: PathBuf::from(source.text("file")?),
            format: format(source)?,
        }),
        ["url"] => Ok(SubjectSource::Url {
            // Azure's instance metadata, like EC2's, is plain http to
            // 169.254.169.254.
            url: instance_metadata_url(source, "url", source.text("url")?)?,
            headers: headers(source)?,
            format: format(source)?,
        }),
        ["executable"] => executable(source, allow_executables).map(SubjectSource::Executable),
        [] => Err(source.error(
            "",
            "not a known source: it needs one of file, url, executable or environment_id",
        )),
        _ => Err(source.error(
            "",
            format!("ambiguous: it names {}; keep one", named.join(" and ")),
        )),
    }
}

fn aws(source: &Object<'_>) -> Result<Aws, CredentialsError> {
    match source.text("environment_id")? {
        "aws1" => {}
        id if id.starts_with("aws") => {
            return Err(source.error(
                "environment_id",
                "an AWS version this broker does not know (Google's libraries know \"aws1\")",
            ));
        }
        _ => {
            return Err(source.error(
                "environment_id",
                "not a known environment (Google's libraries know \"aws1\")",
            ));
        }
    }
    let metadata_url = |field: &str| -> Result<Option<Uri>, CredentialsError> {
        source
            .optional_text(field)?
            .map(|url| instance_metadata_url(source, field, url))
            .transpose()
    };
    let verification_url = source.text("regional_cred_verification_url")?;
    let filled = verification_url.replace("{region}", "us-east-1");
    endpoint_field(source, "regional_cred_verification_url", &filled)?;
    Ok(Aws {
        region_url: metadata_url("region_url")?,
        credentials_url: metadata_url("url")?,
        verification_url: verification_url.to_string(),
        session_token_url: metadata_url("imdsv2_session_token_url")?,
    })
}

/// The instance metadata addresses (EC2's, which Azure's shares) that may
/// be reached over plain http: an AWS source's `region_url`, `url` and
/// `imdsv2_session_token_url`, and a `url` source.
const INSTANCE_METADATA_HOSTS: [&str; 2] = ["169.254.169.254", "[fd00:ec2::254]"];

/// A URL that is `https://`, plain `http://` to a cloud's link-local
/// instance metadata address, or `http://` to loopback (tests); plain http
/// is never proxied.
fn instance_metadata_url(
    source: &Object<'_>,
    field: &str,
    url: &str,
) -> Result<Uri, CredentialsError> {
    let uri: Uri = url.parse().map_err(|_| source.error(field, "not a URL"))?;
    let host = uri.host().unwrap_or_default();
    if INSTANCE_METADATA_HOSTS.contains(&host) && uri.scheme_str() == Some("http") {
        return Ok(uri);
    }
    endpoint_field(source, field, url).map_err(|_| {
        source.error(
            field,
            "neither https://, nor plain http:// to instance metadata (169.254.169.254, [fd00:ec2::254]) or loopback",
        )
    })
}

fn format(source: &Object<'_>) -> Result<SubjectFormat, CredentialsError> {
    let Some(format) = source.optional_object("format")? else {
        return Ok(SubjectFormat::Text);
    };
    match format.optional_text("type")? {
        None | Some("text") => Ok(SubjectFormat::Text),
        Some("json") => Ok(SubjectFormat::Json {
            field: format.text("subject_token_field_name")?.to_string(),
        }),
        Some(_) => Err(format.error("type", "neither \"text\" nor \"json\"")),
    }
}

fn headers(source: &Object<'_>) -> Result<HeaderMap, CredentialsError> {
    let mut headers = HeaderMap::new();
    for (name, value) in source.text_map("headers")? {
        let name = HeaderName::try_from(name).map_err(|_| {
            source.error("headers", "holding a name that is not an HTTP header name")
        })?;
        let mut value = HeaderValue::try_from(value).map_err(|_| {
            source.error(
                "headers",
                "holding a value that is not a valid HTTP header value",
            )
        })?;
        // Such headers often carry a secret (an API key, a bearer token).
        value.set_sensitive(true);
        headers.append(name, value);
    }
    Ok(headers)
}

fn executable(
    source: &Object<'_>,
    allow_executables: bool,
) -> Result<Executable, CredentialsError> {
    let executable = source.object("executable")?;
    if !allow_executables {
        return Err(source.error(
            "executable",
            format!(
                "a program to run, and running it is not allowed: set {ALLOW_EXECUTABLES_ENV}=1 in the broker's environment to allow it, as Google's libraries require"
            ),
        ));
    }
    let command: Vec<String> = executable
        .text("command")?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if !command[0].starts_with('/') {
        return Err(executable.error("command", "not an absolute path to a program"));
    }
    let timeout = match executable.optional_u64("timeout_millis")? {
        None => DEFAULT_EXECUTABLE_TIMEOUT,
        Some(millis) if EXECUTABLE_TIMEOUT_MILLIS.contains(&millis) => {
            Duration::from_millis(millis)
        }
        Some(_) => {
            return Err(executable.error("timeout_millis", "outside 5000 to 120000"));
        }
    };
    let output_file = executable.optional_text("output_file")?.map(PathBuf::from);
    Ok(Executable {
        command,
        timeout,
        output_file,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::{Value, json};

    use super::*;
    use crate::sources::credentials::document::Document;

    const AUDIENCE: &str =
        "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/gh";

    fn config(source: Value) -> Value {
        json!({
            "type": "external_account",
            "audience": AUDIENCE,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": "https://sts.googleapis.com/v1/token",
            "credential_source": source,
        })
    }

    fn parse_json(json: &Value, allow: bool) -> Result<ExternalAccount, CredentialsError> {
        let path = Path::new("/etc/wif.json");
        let document = Document::parse(path, json.to_string().as_bytes()).unwrap();
        parse(&document.root(path), allow)
    }

    #[test]
    fn every_source_is_read_as_googles_libraries_read_it() {
        let account = parse_json(&config(json!({"file": "/var/run/token"})), false).unwrap();
        assert!(matches!(
            account.subject,
            SubjectSource::File {
                format: SubjectFormat::Text,
                ..
            }
        ));
        assert!(account.impersonation.is_none());
        let account = parse_json(
            &config(json!({
                "url": "http://127.0.0.1:9/token",
                "headers": {"Metadata": "True", "Authorization": "Bearer s3cr3t"},
                "format": {"type": "json", "subject_token_field_name": "access_token"},
            })),
            false,
        )
        .unwrap();
        let SubjectSource::Url {
            headers, format, ..
        } = account.subject
        else {
            panic!("not a url source");
        };
        assert_eq!(
            format,
            SubjectFormat::Json {
                field: "access_token".into()
            }
        );
        assert!(headers["authorization"].is_sensitive());
        assert!(!format!("{headers:?}").contains("s3cr3t"));
        let account = parse_json(
            &config(json!({"executable": {"command": "/bin/fetch --id 3", "timeout_millis": 5000, "output_file": "/tmp/out.json"}})),
            true,
        )
        .unwrap();
        let SubjectSource::Executable(executable) = account.subject else {
            panic!("not an executable");
        };
        assert_eq!(executable.command, ["/bin/fetch", "--id", "3"]);
        assert_eq!(executable.timeout, Duration::from_secs(5));
        let account = parse_json(
            &config(json!({
                "environment_id": "aws1",
                "region_url": "http://169.254.169.254/latest/meta-data/placement/availability-zone",
                "url": "http://169.254.169.254/latest/meta-data/iam/security-credentials",
                "regional_cred_verification_url": "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15",
                "imdsv2_session_token_url": "http://169.254.169.254/latest/api/token",
            })),
            false,
        )
        .unwrap();
        let SubjectSource::Aws(aws) = account.subject else {
            panic!("not an AWS source");
        };
        assert!(aws.session_token_url.is_some() && aws.credentials_url.is_some());
        assert!(aws.verification_url.contains("{region}"));
        let mut json = config(json!({"file": "/t"}));
        json["service_account_impersonation_url"] = "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/sa@p.iam.gserviceaccount.com:generateAccessToken".into();
        json["service_account_impersonation"] = json!({"token_lifetime_seconds": 600});
        let account = parse_json(&json, false).unwrap();
        let impersonation = account.impersonation.unwrap();
        assert_eq!(impersonation.url.target, "sa@p.iam.gserviceaccount.com");
        assert!(
            impersonation
                .url
                .id
                .path()
                .ends_with("sa@p.iam.gserviceaccount.com:generateIdToken")
        );
        assert_eq!(impersonation.lifetime, Duration::from_secs(600));
        let mut json = config(json!({"file": "/t"}));
        json.as_object_mut().unwrap().remove("token_url");
        assert_eq!(
            parse_json(&json, false).unwrap().token_url,
            DEFAULT_TOKEN_URL
        );
    }

    #[test]
    fn bad_configurations_name_the_field() {
        let expect = |json: Value, allow: bool, needle: &str| {
            let message = parse_json(&json, allow).unwrap_err().to_string();
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            assert!(message.contains("/etc/wif.json"), "{message}");
            assert!(!message.contains("s3cr3t"), "{message}");
        };
        expect(
            config(json!({"executable": {"command": "/bin/x"}})),
            false,
            ALLOW_EXECUTABLES_ENV,
        );
        expect(
            config(json!({"executable": {"command": "x"}})),
            true,
            "\"credential_source.executable.command\" is not an absolute path",
        );
        expect(
            config(json!({"executable": {"command": "/x", "timeout_millis": 10}})),
            true,
            "timeout_millis",
        );
        expect(
            config(json!({"environment_id": "aws1"})),
            false,
            "\"credential_source.regional_cred_verification_url\" is missing",
        );
        expect(
            config(
                json!({"environment_id": "aws2", "regional_cred_verification_url": "https://sts.{region}.amazonaws.com"}),
            ),
            false,
            "an AWS version",
        );
        expect(
            config(
                json!({"environment_id": "aws1", "regional_cred_verification_url": "https://sts.{region}.amazonaws.com", "url": "http://10.0.0.1/creds"}),
            ),
            false,
            "\"credential_source.url\" is neither https://",
        );
        expect(
            config(json!({"environment_id": "azure9"})),
            false,
            "\"credential_source.environment_id\"",
        );
        expect(config(json!({})), false, "needs one of file, url");
        expect(
            config(json!({"file": "/a", "url": "https://x/"})),
            false,
            "file and url",
        );
        expect(
            config(json!({"file": 7})),
            false,
            "\"credential_source.file\" is not a string",
        );
        expect(
            config(json!({"url": "http://10.0.0.1/s3cr3t"})),
            false,
            "loopback",
        );
        expect(
            config(json!({"url": "https://x/", "headers": {"Bad Name": "v"}})),
            false,
            "credential_source.headers",
        );
        expect(
            config(json!({"file": "/a", "format": {"type": "xml"}})),
            false,
            "credential_source.format.type",
        );
        expect(
            config(json!({"file": "/a", "format": {"type": "json"}})),
            false,
            "\"credential_source.format.subject_token_field_name\" is missing",
        );
        expect(
            config("s3cr3t".into()),
            false,
            "\"credential_source\" is not an object",
        );
        let mut json = config(json!({"file": "/a"}));
        json["token_url"] = "http://sts.example.com/v1/token".into();
        expect(json, false, "token_url");
        let mut json = config(json!({"file": "/a"}));
        json["service_account_impersonation_url"] =
            "https://iamcredentials.googleapis.com/v1/nothing".into();
        expect(json, false, "service_account_impersonation_url");
        let mut json = config(json!({"file": "/a"}));
        json["service_account_impersonation_url"] = "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/a@b:generateAccessToken".into();
        json["service_account_impersonation"] = json!({"token_lifetime_seconds": 99});
        expect(
            json,
            false,
            "service_account_impersonation.token_lifetime_seconds",
        );
        let mut json = config(json!({"file": "/a"}));
        json["client_secret"] = "s3cr3t".into();
        expect(
            json,
            false,
            "\"client_id\" is missing, though client_secret is set",
        );
        let mut json = config(json!({"file": "/a"}));
        json["workforce_pool_user_project"] = "p".into();
        expect(json, false, "workforce_pool_user_project");
        let mut json = config(json!({"file": "/a"}));
        json.as_object_mut().unwrap().remove("audience");
        expect(json, false, "\"audience\" is missing");
    }

    #[test]
    fn workforce_pools_are_told_from_workload_pools() {
        assert!(is_workforce_pool(
            "//iam.googleapis.com/locations/global/workforcePools/pool/providers/p"
        ));
        assert!(!is_workforce_pool(AUDIENCE));
    }
}
