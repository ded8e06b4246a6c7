//! The command line: every flag has an environment fallback and its
//! default in `--help`.

pub mod file;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::cache::CacheConfig;
use crate::client::cli::{AccessTokenArgs, IdTokenArgs};
use crate::emulator::EmulatorConfig;
use crate::metadata_endpoint::MetadataAddr;
use crate::metadata_endpoint::reveal::Reveal;
use crate::socket::DEFAULT_SOCKET;
use crate::sources::SourceConfig;
use crate::telemetry::LogFormat;
use crate::workload::{UnmappedPods, WorkloadIdentity};

/// Default time the calls in flight get to finish once the broker drains
/// (5 s). `app` runs the drain; the default lives here because `app`
/// depends on this module, not the other way.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Shares Google Cloud access and ID tokens between every process on a
/// machine, over gRPC on a Unix socket.
///
/// Start the broker with `tokenbroker serve` (or `tokenbroker serve
/// --emulator` off Google Cloud), then ask it for tokens with any gRPC
/// client generated from proto/tokenbroker/v1/tokenbroker.proto, or with
/// `tokenbroker token access` / `tokenbroker token id`.
#[derive(Debug, Parser)]
#[command(name = "tokenbroker", version, propagate_version = true)]
pub struct Cli {
    /// Log format: text on a terminal and JSON otherwise (auto), or forced.
    #[arg(long, global = true, env = "TOKENBROKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process")]
pub enum Command {
    /// Run the broker: serve tokens on a Unix socket.
    Serve(ServeArgs),
    /// Run the metadata server emulator alone (for tests and demos).
    Emulator(EmulatorArgs),
    /// Print a token from a running broker (for shell scripts).
    #[command(subcommand, after_long_help = crate::client::cli::EXIT_CODES_HELP)]
    Token(TokenCommand),
    /// The old name of `token access`, kept for existing scripts.
    #[command(hide = true, after_long_help = crate::client::cli::EXIT_CODES_HELP)]
    PrintAccessToken(AccessTokenArgs),
    /// The old name of `token id`, kept for existing scripts.
    #[command(hide = true, after_long_help = crate::client::cli::EXIT_CODES_HELP)]
    PrintIdentityToken(IdTokenArgs),
    /// Answer docker, git or kubectl with an access token from a running
    /// broker, in the tool's own credential protocol.
    #[command(subcommand)]
    CredentialHelper(HelperCommand),
    /// Make docker ask the broker for Google registries' credentials: sets
    /// credHelpers in docker's config.json, keeping a backup.
    ConfigureDocker(crate::client::helpers::docker_config::ConfigureDockerArgs),
}

/// `tokenbroker credential-helper`: which tool asks.
#[derive(Debug, Subcommand)]
pub enum HelperCommand {
    /// docker's credential helper protocol (get, store, erase, list); also
    /// what the binary does when run as docker-credential-tokenbroker.
    #[command(after_long_help = HELPER_HELP)]
    Docker(crate::client::helpers::docker::DockerArgs),
    /// git's credential helper protocol: git config
    /// credential.https://source.developers.google.com.helper '!tokenbroker credential-helper git'
    #[command(after_long_help = HELPER_HELP)]
    Git(crate::client::helpers::git::GitArgs),
    /// kubectl's exec credential plugin (an ExecCredential on stdout).
    #[command(after_long_help = HELPER_HELP)]
    Kubectl(crate::client::helpers::kubectl::KubectlArgs),
}

/// What every helper's `--help` ends with.
const HELPER_HELP: &str = "\
Tokens come from the broker's cache (never from Google directly) and stay
valid at least 5 minutes. Errors are one line on stderr; stdout holds only
the tool's answer. Exit codes are those of `tokenbroker token` (see
`tokenbroker token access --help`); docker's helper also exits 1 with
docker's \"credentials not found\" answer for hosts that are not Google's.";

/// `tokenbroker token`: which token to print.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print an OAuth2 access token, e.g. for `Authorization: Bearer`.
    #[command(after_long_help = crate::client::cli::EXIT_CODES_HELP)]
    Access(AccessTokenArgs),
    /// Print an OIDC ID token for an audience (to call Cloud Run, Cloud
    /// Functions, IAP, ...).
    #[command(after_long_help = crate::client::cli::EXIT_CODES_HELP)]
    Id(IdTokenArgs),
}

/// `tokenbroker serve`.
#[derive(Debug, Args)]
#[command(after_long_help = crate::config::file::CONFIG_FILE_HELP)]
pub struct ServeArgs {
    /// Configuration file (TOML): any flag of `serve` by its long name with
    /// `_` for `-` (e.g. `socket_mode = "0660"`), and `[[sink]]` tables.
    /// Flags and environment variables override it.
    #[arg(long, env = "TOKENBROKER_CONFIG")]
    pub config: Option<PathBuf>,

    /// Unix socket to listen on; parent directories are created.
    #[arg(long, env = crate::client::SOCKET_ENV, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// Permissions of the socket (octal). Connecting needs write permission,
    /// so 0660 lets the owner and the socket's group in.
    #[arg(long, env = "TOKENBROKER_SOCKET_MODE", default_value = octal(crate::socket::DEFAULT_SOCKET_MODE), value_parser = crate::permissions::parse_mode)]
    pub socket_mode: u32,

    /// Group of the socket, by name or number (default: the broker's own).
    /// With mode 0660, members of this group may connect.
    #[arg(long, env = "TOKENBROKER_SOCKET_GROUP", value_parser = crate::permissions::parse_group)]
    pub socket_group: Option<u32>,

    /// Access policy (TOML): which uids/gids may get which tokens. Without
    /// it, every process that can open the socket gets any token. Re-read
    /// on SIGHUP.
    #[arg(long, env = "TOKENBROKER_POLICY")]
    pub policy: Option<PathBuf>,

    /// Metadata server as host[:port]: the token source (and the base of
    /// --impersonate) when no credentials file is given or found. Ignored
    /// with --emulator.
    #[arg(long, env = "GCE_METADATA_HOST", default_value = crate::sources::metadata::DEFAULT_METADATA_HOST)]
    pub metadata_host: String,

    /// Run a metadata server emulator in-process and fetch from it (for
    /// machines outside Google Cloud). Skips credentials discovery.
    #[arg(long, env = "TOKENBROKER_EMULATOR", conflicts_with = "credentials")]
    pub emulator: bool,

    /// With --emulator: also serve the emulator's control API (fault
    /// injection, token lifetimes, stats under /emulator/v1/). Off by
    /// default: any local process could reach it and disturb everyone's
    /// tokens.
    #[arg(long, env = "TOKENBROKER_EMULATOR_CONTROL", requires = "emulator")]
    pub emulator_control: bool,

    /// Credentials file, any type Google's libraries read: a
    /// service-account key, gcloud user credentials, Workload Identity
    /// Federation ("external_account", from a file, URL, program or AWS),
    /// workforce user credentials, or an impersonated account. Without it
    /// the broker looks, in order, at GOOGLE_APPLICATION_CREDENTIALS,
    /// gcloud's application_default_credentials.json (under $CLOUDSDK_CONFIG
    /// or ~/.config/gcloud), then the metadata server. The file must not be
    /// readable by every user. Google's endpoints are reached through
    /// HTTPS_PROXY unless NO_PROXY matches.
    #[arg(long, env = "TOKENBROKER_CREDENTIALS")]
    pub credentials: Option<PathBuf>,

    /// Mint every token for this service account through the IAM
    /// Credentials API, authorised by the access token of the source above
    /// (which needs roles/iam.serviceAccountTokenCreator on it).
    #[arg(long, env = "TOKENBROKER_IMPERSONATE", value_parser = parse_email)]
    pub impersonate: Option<String>,

    /// Delegation chain for --impersonate: service-account emails, each
    /// allowed to impersonate the next (repeat or separate with commas).
    #[arg(long, env = "TOKENBROKER_DELEGATES", value_delimiter = ',', requires = "impersonate", value_parser = parse_email)]
    pub delegates: Vec<String>,

    /// The IAM Credentials API for --impersonate (https://, or http:// to a
    /// loopback address for tests and emulators).
    #[arg(long, env = "TOKENBROKER_IAM_ENDPOINT", default_value = crate::sources::impersonate::DEFAULT_IAM_ENDPOINT)]
    pub iam_endpoint: String,

    /// Google STS, where access tokens are exchanged for downscoped ones
    /// (requests with an access_boundary, policy rules with one): https://,
    /// or http:// to a loopback address. With --emulator and this default,
    /// the emulator's fake STS.
    #[arg(long, env = "TOKENBROKER_STS_ENDPOINT", default_value = crate::sources::downscope::DEFAULT_STS_ENDPOINT)]
    pub sts_endpoint: String,

    /// Per-pod identity on a Kubernetes node: off (every peer gets the
    /// broker's own identity), or kubernetes (a peer whose cgroup names a
    /// pod gets tokens of the Google service account its Kubernetes
    /// service account maps to, by the iam.gke.io/gcp-service-account
    /// annotation or the policy's [[workload]] table; host processes are
    /// served as before). See docs/workload-identity.md.
    #[arg(long, env = "TOKENBROKER_WORKLOAD_IDENTITY", value_enum, default_value_t = WorkloadIdentity::Off)]
    pub workload_identity: WorkloadIdentity,

    /// This node's name, whose pods are followed (in a DaemonSet, from the
    /// downward API's spec.nodeName). Needed with --workload-identity
    /// kubernetes; with --emulator, the emulator's node is the default.
    #[arg(long, env = "TOKENBROKER_NODE_NAME")]
    pub node_name: Option<String>,

    /// The kubeconfig to reach the Kubernetes API with. Without it: the
    /// in-cluster configuration (the pod's service-account token and CA);
    /// with --emulator, the emulator's fake Kubernetes API.
    #[arg(long, env = "TOKENBROKER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Where /proc is: peers' cgroups are read at <proc-root>/<pid>/cgroup.
    #[arg(long, env = "TOKENBROKER_PROC_ROOT", default_value = crate::peer::cgroup::DEFAULT_PROC_ROOT)]
    pub proc_root: PathBuf,

    /// What a pod whose Kubernetes service account maps to no Google
    /// service account gets: deny (PERMISSION_DENIED, naming the
    /// annotation to add) or node (the broker's own identity).
    #[arg(long, env = "TOKENBROKER_UNMAPPED_PODS", value_enum, default_value_t = UnmappedPods::Deny)]
    pub unmapped_pods: UnmappedPods,

    /// Lifetime of the tokens the in-process emulator issues.
    #[arg(long, env = "TOKENBROKER_EMULATOR_TOKEN_LIFETIME", default_value = human(crate::emulator::DEFAULT_TOKEN_LIFETIME), value_parser = positive_at_most::<86_400>)]
    pub emulator_token_lifetime: Duration,

    /// Longest one request upstream (metadata server, OAuth, IAM) may take,
    /// connect to last byte. A request for an uncached token fails after
    /// this.
    #[arg(long, env = "TOKENBROKER_UPSTREAM_TIMEOUT", default_value = human(crate::sources::metadata::DEFAULT_UPSTREAM_TIMEOUT), value_parser = positive_at_most::<300>)]
    pub upstream_timeout: Duration,

    /// Most requests to the metadata server in any one second, all keys
    /// together (the metadata server itself allows about 50).
    #[arg(long, env = "TOKENBROKER_UPSTREAM_MAX_RPS", default_value_t = crate::upstream::limits::DEFAULT_UPSTREAM_MAX_RPS)]
    pub upstream_max_rps: u32,

    /// Most requests to the metadata server in flight at once.
    #[arg(long, env = "TOKENBROKER_UPSTREAM_MAX_CONCURRENCY", default_value_t = crate::upstream::limits::DEFAULT_UPSTREAM_MAX_CONCURRENCY)]
    pub upstream_max_concurrency: usize,

    /// Most attempts per fetch: connect errors, timeouts, 408, 429 and 5xx
    /// are retried with exponential backoff and full jitter.
    #[arg(long, env = "TOKENBROKER_UPSTREAM_MAX_ATTEMPTS", default_value_t = crate::upstream::retry::DEFAULT_MAX_ATTEMPTS)]
    pub upstream_max_attempts: u32,

    /// Time for all attempts of one fetch, waits (and Retry-After) included.
    #[arg(long, env = "TOKENBROKER_UPSTREAM_RETRY_BUDGET", default_value = human(crate::upstream::retry::DEFAULT_RETRY_BUDGET), value_parser = positive_at_most::<600>)]
    pub upstream_retry_budget: Duration,

    /// Refresh tokens this long before they expire (up to 20% later, for
    /// jitter). Tokens living less than twice this are refreshed at half
    /// their remaining life.
    #[arg(long, env = "TOKENBROKER_REFRESH_MARGIN", default_value = human(crate::schedule::DEFAULT_REFRESH_MARGIN), value_parser = positive_at_most::<3600>)]
    pub refresh_margin: Duration,

    /// Never hand out a token closer than this to its expiry.
    #[arg(long, env = "TOKENBROKER_EXPIRY_SKEW", default_value = human(crate::cache::DEFAULT_EXPIRY_SKEW), value_parser = at_most::<600>)]
    pub expiry_skew: Duration,

    /// Stop refreshing and forget a token nobody asked for or watched in this long.
    #[arg(long, env = "TOKENBROKER_IDLE_TIMEOUT", default_value = human(crate::cache::DEFAULT_IDLE_TIMEOUT), value_parser = positive_at_most::<2_592_000>)]
    pub idle_timeout: Duration,

    /// Least time between two InvalidateToken calls that drop the token of
    /// one key; a sooner one gets RESOURCE_EXHAUSTED, so a misbehaving
    /// client causes at most one upstream fetch per key in this time.
    #[arg(long, env = "TOKENBROKER_INVALIDATE_INTERVAL", default_value = human(crate::cache::DEFAULT_INVALIDATE_INTERVAL), value_parser = at_most::<3600>)]
    pub invalidate_interval: Duration,

    /// Most distinct tokens (keys) held at once; more gives RESOURCE_EXHAUSTED.
    #[arg(long, env = "TOKENBROKER_MAX_KEYS", default_value_t = crate::cache::DEFAULT_MAX_KEYS)]
    pub max_keys: usize,

    /// Most keys one peer uid may have created and still held; more gives
    /// that uid RESOURCE_EXHAUSTED, whatever the others do. Callers without
    /// a uid (the metadata endpoint on TCP) share one such quota; file
    /// sinks have none. A key stays charged to its creator.
    #[arg(long, env = "TOKENBROKER_MAX_KEYS_PER_UID", default_value_t = crate::cache::DEFAULT_MAX_KEYS_PER_UID)]
    pub max_keys_per_uid: usize,

    /// Serve Prometheus metrics (/metrics), /healthz and /readyz over HTTP
    /// on this address, e.g. 127.0.0.1:9464. Off unless set.
    #[arg(long, env = "TOKENBROKER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Also answer as a metadata server over HTTP, so unmodified Google auth
    /// libraries share the cache: run them with GCE_METADATA_HOST (and
    /// GCE_METADATA_IP) set to this address. Tokens come from the cache;
    /// the rest of /computeMetadata/v1/ is passed through to the metadata
    /// server. A loopback IP:PORT (e.g. 127.0.0.1:8181) trusts every local
    /// process, since TCP peers cannot be identified: the policy does not
    /// apply there. unix:/PATH listens on a Unix socket (same mode and group
    /// as --socket) where the policy applies. Off unless set.
    #[arg(
        long,
        env = "TOKENBROKER_METADATA_ADDR",
        value_name = "IP:PORT|unix:PATH"
    )]
    pub metadata_addr: Option<MetadataAddr>,

    /// Audit trail: one JSON line for every token granted, denied, failed,
    /// invalidated, streamed to a watcher or written to a sink, with the
    /// peer (uid, gid, pid, binary) and a SHA-256 prefix of the token,
    /// never the token. A file (appended to, created 0600, reopened on
    /// SIGHUP for logrotate; its directory must not be writable by others)
    /// or - for standard output. Off unless set.
    #[arg(long, env = "TOKENBROKER_AUDIT_LOG", value_name = "PATH|-")]
    pub audit_log: Option<PathBuf>,

    /// Group that may read the audit log, by name or number: the file is
    /// then 0640 and owned by it.
    #[arg(long, env = "TOKENBROKER_AUDIT_LOG_GROUP", value_parser = crate::permissions::parse_group, requires = "audit_log")]
    pub audit_log_group: Option<u32>,

    /// What the metadata endpoint passes through besides tokens: safe
    /// (what Google's client libraries read: project and numeric project
    /// id, zone, region, instance id and hostname, the service accounts'
    /// listing, emails, aliases and scopes, the universe domain, and the
    /// instance and project directories without ?recursive), all
    /// (everything, instance attributes included: on a Kubernetes node
    /// they hold kubelet credentials), or none (tokens only). A concealed
    /// path gets 404.
    #[arg(
        long,
        env = "TOKENBROKER_METADATA_PASSTHROUGH",
        value_enum,
        default_value_t = Reveal::Safe
    )]
    pub metadata_passthrough: Reveal,

    /// Label ID-token request metrics with the audience. Off by default:
    /// every distinct audience becomes a time series.
    #[arg(long, env = "TOKENBROKER_METRICS_LABEL_AUDIENCE")]
    pub metrics_label_audience: bool,

    /// Most open WatchToken streams in all.
    #[arg(long, env = "TOKENBROKER_MAX_WATCHERS", default_value_t = crate::broker::DEFAULT_MAX_WATCHERS)]
    pub max_watchers: usize,

    /// Most open WatchToken streams of one peer uid.
    #[arg(long, env = "TOKENBROKER_MAX_WATCHERS_PER_UID", default_value_t = crate::broker::DEFAULT_MAX_WATCHERS_PER_UID)]
    pub max_watchers_per_uid: usize,

    /// Let the broker dump core. Off by default: a core dump would hold
    /// tokens and key material, so at start the broker sets RLIMIT_CORE to
    /// 0 (soft and hard) and makes itself non-dumpable (prctl
    /// PR_SET_DUMPABLE 0, which also keeps other processes of its user from
    /// reading its memory).
    #[arg(long, env = "TOKENBROKER_ALLOW_CORE_DUMPS")]
    pub allow_core_dumps: bool,

    /// Time in-flight calls get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "TOKENBROKER_SHUTDOWN_GRACE", default_value = human(DEFAULT_SHUTDOWN_GRACE), value_parser = at_most::<3600>)]
    pub shutdown_grace: Duration,

    /// Most connections to the gRPC socket at once. A connection over this
    /// bound, or over --max-connections-per-uid, or beyond what the file
    /// descriptor limit allows, is accepted and closed at once.
    #[arg(long, env = "TOKENBROKER_MAX_CONNECTIONS", default_value_t = crate::connections::DEFAULT_MAX_CONNECTIONS, value_parser = at_least_one)]
    pub max_connections: usize,

    /// Most connections one peer uid holds to the gRPC socket (and to a
    /// unix: metadata endpoint).
    #[arg(long, env = "TOKENBROKER_MAX_CONNECTIONS_PER_UID", default_value_t = crate::connections::DEFAULT_MAX_CONNECTIONS_PER_UID, value_parser = at_least_one)]
    pub max_connections_per_uid: usize,

    /// Most connections to the metadata-compatible endpoint at once.
    #[arg(long, env = "TOKENBROKER_METADATA_MAX_CONNECTIONS", default_value_t = crate::connections::DEFAULT_METADATA_MAX_CONNECTIONS, value_parser = at_least_one)]
    pub metadata_max_connections: usize,

    /// Most calls open at once on one gRPC connection; a client's further
    /// streams are refused (REFUSED_STREAM) until one ends.
    #[arg(long, env = "TOKENBROKER_MAX_CONCURRENT_STREAMS", default_value_t = crate::grpc::server::DEFAULT_MAX_CONCURRENT_STREAMS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// Close a gRPC connection that has had no call in flight this long
    /// (clients reconnect when they next call). A connection that sends
    /// nothing at all is closed after 10 s.
    #[arg(long, env = "TOKENBROKER_CONNECTION_IDLE_TIMEOUT", default_value = human(crate::connections::idle::DEFAULT_CONNECTION_IDLE_TIMEOUT), value_parser = positive_at_most::<86_400>)]
    pub connection_idle_timeout: Duration,

    /// The file sinks of the config file (`[[sink]]`); empty without one.
    #[arg(skip)]
    pub sinks: Vec<crate::sink::SinkConfig>,
}

impl ServeArgs {
    /// What `tokenbroker serve` runs with when given no flag, no
    /// environment variable and no config file.
    pub fn defaults() -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let command =
            Cli::command().mut_subcommand("serve", |serve| serve.mut_args(|arg| arg.env(None)));
        let matches = command
            .try_get_matches_from(["tokenbroker", "serve"])
            .expect("`serve` with no flags parses");
        let serve = matches
            .subcommand_matches("serve")
            .expect("`serve` was given");
        Self::from_arg_matches(serve).expect("every default parses")
    }

    /// Where tokens come from, with `metadata_host` (the emulator's, when
    /// it runs) as the metadata server.
    pub fn source_config(&self, metadata_host: String) -> SourceConfig {
        SourceConfig {
            credentials: self.credentials.clone(),
            metadata_only: self.emulator,
            metadata_host,
            impersonate: self.impersonate.clone(),
            delegates: self.delegates.clone(),
            iam_endpoint: self.iam_endpoint.clone(),
            timeout: self.upstream_timeout,
        }
    }

    /// The cache settings these flags ask for.
    pub fn cache_config(&self) -> CacheConfig {
        CacheConfig {
            refresh_margin: self.refresh_margin,
            expiry_skew: self.expiry_skew,
            idle_timeout: self.idle_timeout,
            max_keys: self.max_keys,
            max_keys_per_uid: self.max_keys_per_uid,
            invalidate_interval: self.invalidate_interval,
            ..CacheConfig::default()
        }
    }
}

/// `tokenbroker emulator`.
#[derive(Debug, Args)]
pub struct EmulatorArgs {
    /// Address to listen on (loopback only, unless you mean it).
    #[arg(
        long,
        env = "TOKENBROKER_EMULATOR_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,

    /// Service account emails; the first is also `default`.
    #[arg(long = "account", env = "TOKENBROKER_EMULATOR_ACCOUNTS", value_delimiter = ',', default_value = crate::emulator::DEFAULT_ACCOUNT)]
    pub accounts: Vec<String>,

    /// Lifetime of issued access tokens.
    #[arg(long, env = "TOKENBROKER_EMULATOR_TOKEN_LIFETIME", default_value = "1h", value_parser = positive_at_most::<86_400>)]
    pub token_lifetime: Duration,

    /// Lifetime of issued ID tokens.
    #[arg(long, env = "TOKENBROKER_EMULATOR_ID_TOKEN_LIFETIME", default_value = "1h", value_parser = positive_at_most::<86_400>)]
    pub id_token_lifetime: Duration,
}

impl EmulatorArgs {
    /// The emulated VM these flags describe.
    pub fn emulator_config(&self) -> EmulatorConfig {
        EmulatorConfig {
            accounts: self.accounts.clone(),
            access_token_lifetime: self.token_lifetime,
            id_token_lifetime: self.id_token_lifetime,
            // The standalone emulator is a test tool: its control API is
            // what it is run for.
            control: true,
        }
    }
}

/// A duration of at most `MAX_SECS` seconds, e.g. `10s` or `4m30s`.
fn at_most<const MAX_SECS: u64>(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value).map_err(|e| format!("{value:?}: {e}"))?;
    let max = Duration::from_secs(MAX_SECS);
    if duration > max {
        return Err(format!(
            "{value:?} is more than {}",
            humantime::format_duration(max)
        ));
    }
    Ok(duration)
}

/// Like [`at_most`], and not zero.
fn positive_at_most<const MAX_SECS: u64>(value: &str) -> Result<Duration, String> {
    let duration = at_most::<MAX_SECS>(value)?;
    if duration.is_zero() {
        return Err(format!("{value:?} must be more than zero"));
    }
    Ok(duration)
}

/// A default duration as `--help` shows it and the parser reads it, from
/// the constant that defines it.
fn human(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// A default permission mode as `--help` shows it, e.g. `0660`.
fn octal(mode: u32) -> String {
    format!("{mode:04o}")
}

/// A count of at least one.
fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{value:?}: {e}")),
    }
}

fn parse_email(value: &str) -> Result<String, String> {
    match crate::request::ServiceAccount::parse("service account", value.to_string()) {
        Ok(crate::request::ServiceAccount::Email(email)) => Ok(email),
        Ok(
            crate::request::ServiceAccount::Default | crate::request::ServiceAccount::Workload(_),
        ) => Err("name a service account by its email, not \"default\"".into()),
        Err(error) => Err(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Each default is written once, as a constant next to the code it
    /// bounds; `--help` shows it and the parser reads it back unchanged.
    #[test]
    fn defaults_are_the_constants_they_are_written_from() {
        let serve = ServeArgs::defaults();
        assert_eq!(serve.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(serve.socket_mode, crate::socket::DEFAULT_SOCKET_MODE);
        assert_eq!(
            serve.emulator_token_lifetime,
            crate::emulator::DEFAULT_TOKEN_LIFETIME
        );
        assert_eq!(
            serve.upstream_timeout,
            crate::sources::metadata::DEFAULT_UPSTREAM_TIMEOUT
        );
        assert_eq!(
            serve.upstream_retry_budget,
            crate::upstream::retry::DEFAULT_RETRY_BUDGET
        );
        assert_eq!(
            serve.refresh_margin,
            crate::schedule::DEFAULT_REFRESH_MARGIN
        );
        assert_eq!(serve.expiry_skew, crate::cache::DEFAULT_EXPIRY_SKEW);
        assert_eq!(serve.idle_timeout, crate::cache::DEFAULT_IDLE_TIMEOUT);
        assert_eq!(
            serve.invalidate_interval,
            crate::cache::DEFAULT_INVALIDATE_INTERVAL
        );
        assert_eq!(
            serve.max_keys_per_uid,
            crate::cache::DEFAULT_MAX_KEYS_PER_UID
        );
        assert_eq!(serve.max_watchers, crate::broker::DEFAULT_MAX_WATCHERS);
        assert_eq!(serve.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(
            serve.connection_idle_timeout,
            crate::connections::idle::DEFAULT_CONNECTION_IDLE_TIMEOUT
        );
        assert!(serve.sinks.is_empty());
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(crate::permissions::parse_mode("0660"), Ok(0o660));
        assert_eq!(crate::permissions::parse_mode("600"), Ok(0o600));
        assert_eq!(crate::permissions::parse_mode("0o640"), Ok(0o640));
        assert!(crate::permissions::parse_mode("999").is_err());
        assert!(crate::permissions::parse_mode("1777").is_err());
    }

    #[test]
    fn groups_are_names_or_numbers() {
        assert_eq!(crate::permissions::parse_group("0"), Ok(0));
        assert_eq!(crate::permissions::parse_group("root"), Ok(0));
        assert!(crate::permissions::parse_group("no-such-group-here").is_err());
    }

    #[test]
    fn durations_are_bounded() {
        assert_eq!(at_most::<60>("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(at_most::<60>("0s"), Ok(Duration::ZERO));
        assert!(at_most::<60>("61s").is_err());
        assert!(at_most::<60>("soon").is_err());
        assert!(positive_at_most::<60>("0s").is_err());
        let huge = Cli::try_parse_from([
            "tokenbroker",
            "serve",
            "--idle-timeout",
            "100000000000years",
        ]);
        assert!(huge.is_err());
    }

    #[test]
    fn durations_are_human() {
        let cli =
            Cli::try_parse_from(["tokenbroker", "serve", "--refresh-margin", "4m30s"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.refresh_margin, Duration::from_secs(270));
    }
}
