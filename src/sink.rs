//! File sinks: tokens kept written to files, for programs that can only
//! read a file (like Vault Agent's sinks).
//!
//! Each `[[sink]]` of the config file names one token and one path. The
//! sink watches the token's cache key (so it counts as a watcher and the
//! key keeps being refreshed) and rewrites the file atomically with every
//! new token: a temporary file in the same directory, given its mode and
//! owner before the token is written, then renamed over the path. The
//! directory is opened once at start and every write is made relative to
//! it ([`dir`]), so swapping a directory on the path for a link later
//! redirects nothing. On shutdown the file is removed, or kept if so
//! configured.

use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::unistd::Gid;
use serde::Deserialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::audit::{Event, EventKind, event};
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::permissions::{parse_group, parse_mode, parse_user};
use crate::policy::Caller;
use crate::request::boundary::{AccessBoundary, BoundaryEntry};
use crate::request::{IdTokenFormat, TokenRequest};
use crate::schedule::{Backoff, DEFAULT_RETRY_INITIAL, DEFAULT_RETRY_MAX};
use crate::telemetry::metrics::Rpc;
use crate::token::Token;

pub mod dir;

pub use dir::{DirError, FilePerms, SinkDir, Step};

/// Mode of a sink's file without `mode` and `group` (`0600`: only its
/// owner reads and writes it).
pub const DEFAULT_SINK_MODE: u32 = 0o600;
/// Mode of a sink's file with a `group` but no `mode` (`0640`: the group
/// reads it too).
pub const DEFAULT_SINK_GROUP_MODE: u32 = 0o640;

/// One `[[sink]]` table as written in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// The file to keep the token in (absolute).
    pub path: PathBuf,
    /// An access token: `access_token = { scopes = [...] }`.
    pub access_token: Option<AccessTokenSpec>,
    /// An ID token: `id_token = { audience = "..." }`.
    pub id_token: Option<IdTokenSpec>,
    /// Permissions of the file, octal (default `"0600"`, or `"0640"` with
    /// a `group`); group bits need a `group`.
    pub mode: Option<String>,
    /// Owner of the file, by name or uid (default: the broker's user).
    pub owner: Option<String>,
    /// Group of the file, by name or gid: the users who may read it. None
    /// by default (the file is created with the broker's group, which the
    /// mode then gives no access).
    pub group: Option<String>,
    /// What to do with the file on shutdown (default `remove`).
    #[serde(default)]
    pub on_shutdown: OnShutdown,
}

/// Which access token a sink holds.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessTokenSpec {
    /// Service account email or `default` (the default).
    #[serde(default)]
    pub service_account: String,
    /// OAuth2 scopes; none means the account's default scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// A downscoped token: limited to this Credential Access Boundary.
    #[serde(default)]
    pub access_boundary: Option<Vec<BoundaryEntry>>,
}

/// Which ID token a sink holds.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdTokenSpec {
    /// The audience (required).
    pub audience: String,
    /// Service account email or `default` (the default).
    #[serde(default)]
    pub service_account: String,
    /// `standard` (the default) or `full`.
    #[serde(default)]
    pub format: Option<String>,
    /// Include license codes (needs `format = "full"`).
    #[serde(default)]
    pub include_licenses: bool,
}

/// What happens to a sink's file when the broker stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnShutdown {
    /// Delete it, so nobody reads a token that will not be refreshed.
    #[default]
    Remove,
    /// Leave the last token in place.
    Keep,
}

/// Why a sink cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The configuration is wrong.
    #[error("sink {}: {reason}", path.display())]
    Config {
        /// The sink's path.
        path: PathBuf,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// The sink's directory cannot be used.
    #[error("sink {}: {source}", path.display())]
    Directory {
        /// The sink's path.
        path: PathBuf,
        /// What is wrong with the directory.
        source: DirError,
    },
    /// Writing the file failed.
    #[error("sink {}: cannot {action}: {source}{hint}", path.display())]
    Io {
        /// The sink's path.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The OS error.
        source: io::Error,
        /// How to fix it, if known.
        hint: &'static str,
    },
}

/// A sink whose configuration is valid; [`open`](Self::open) readies it.
#[derive(Clone, Debug)]
pub struct Sink {
    path: PathBuf,
    request: TokenRequest,
    mode: u32,
    owner: Option<String>,
    group: Option<String>,
    on_shutdown: OnShutdown,
}

impl Sink {
    /// Checks a `[[sink]]` table: the path, the token request with the same
    /// rules as a gRPC request, and the mode (owner and group are looked up
    /// by [`open`](Self::open), on the machine that runs the broker).
    pub fn from_config(config: SinkConfig) -> Result<Self, SinkError> {
        let path = config.path;
        let invalid = |reason: String| SinkError::Config {
            path: path.clone(),
            reason,
        };
        let plain = path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !path.is_absolute() || path.file_name().is_none() || !plain {
            return Err(invalid(
                "`path` must be an absolute path to a file, without `.` or `..`".into(),
            ));
        }
        let request = match (config.access_token, config.id_token) {
            (Some(access), None) => {
                let boundary = access
                    .access_boundary
                    .as_deref()
                    .map(|entries| {
                        AccessBoundary::from_entries("access_token.access_boundary", entries)
                    })
                    .transpose()
                    .map_err(|error| invalid(error.to_string()))?;
                TokenRequest::access(access.service_account, access.scopes, Duration::ZERO)
                    .map(|request| request.with_boundary(boundary))
            }
            (None, Some(id)) => {
                let format = match id.format.as_deref() {
                    None | Some("standard") => IdTokenFormat::Standard,
                    Some("full") => IdTokenFormat::Full,
                    Some(other) => {
                        return Err(invalid(format!(
                            "id_token.format {other:?}: use \"standard\" or \"full\""
                        )));
                    }
                };
                TokenRequest::id(
                    id.audience,
                    id.service_account,
                    format,
                    id.include_licenses,
                    Duration::ZERO,
                )
            }
            _ => {
                return Err(invalid(
                    "set exactly one of `access_token = {...}` and `id_token = {...}`".into(),
                ));
            }
        }
        .map_err(|error: BrokerError| invalid(error.to_string()))?;
        let mode = match (&config.mode, &config.group) {
            (Some(mode), _) => parse_mode(mode).map_err(|e| invalid(format!("mode {e}")))?,
            (None, None) => DEFAULT_SINK_MODE,
            (None, Some(_)) => DEFAULT_SINK_GROUP_MODE,
        };
        if mode & 0o007 != 0 {
            return Err(invalid(format!(
                "mode {mode:04o} would let every user read or change the token; use at most 0660 (and a group)"
            )));
        }
        if mode & 0o070 != 0 && config.group.is_none() {
            return Err(invalid(format!(
                "mode {mode:04o} gives the file's group access, but no `group` is set: name the group whose members may read the token (group = \"NAME\", not the socket's group), or use mode 0600"
            )));
        }
        Ok(Self {
            path,
            request,
            mode,
            owner: config.owner,
            group: config.group,
            on_shutdown: config.on_shutdown,
        })
    }

    /// The file the sink keeps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Looks up the owner and group, opens the sink's directory for good
    /// ([`SinkDir::open`]: no symbolic links, owned by the broker's user or
    /// root, writable by its owner only) and checks that a file with the
    /// sink's mode and owner can be created in it (a failed `chown` is
    /// reported here, not at the first token).
    pub fn open(self) -> Result<OpenSink, SinkError> {
        let invalid = |reason: String| SinkError::Config {
            path: self.path.clone(),
            reason,
        };
        let owner = self
            .owner
            .as_deref()
            .map(parse_user)
            .transpose()
            .map_err(|e| invalid(format!("owner: {e}")))?;
        let group = self
            .group
            .as_deref()
            .map(|g| parse_group(g).map(Gid::from_raw))
            .transpose()
            .map_err(|e| invalid(format!("group: {e}")))?;
        let perms = FilePerms {
            mode: self.mode,
            owner,
            group,
        };
        let parent = self.path.parent().unwrap_or(Path::new("/"));
        let dir = SinkDir::open(parent, nix::unistd::geteuid()).map_err(|source| {
            SinkError::Directory {
                path: self.path.clone(),
                source,
            }
        })?;
        let name = self.path.file_name().unwrap_or_default().to_os_string();
        let sink = OpenSink {
            sink: self,
            name,
            dir,
            perms,
        };
        sink.dir
            .probe(sink.perms)
            .map_err(|error| sink.write_error(error))?;
        Ok(sink)
    }
}

/// A sink ready to run: its directory is held open, and its file is
/// written, renamed and removed relative to it.
#[derive(Debug)]
pub struct OpenSink {
    sink: Sink,
    name: OsString,
    dir: SinkDir,
    perms: FilePerms,
}

impl OpenSink {
    /// The file the sink keeps.
    pub fn path(&self) -> &Path {
        &self.sink.path
    }

    /// Writes `token` to the file atomically.
    pub fn write(&self, token: &Token) -> Result<(), SinkError> {
        self.dir
            .replace(&self.name, token.secret().expose().as_bytes(), self.perms)
            .map_err(|error| self.write_error(error))
    }

    /// Whether members of `gid` may read the file: `gid` is its `group` and
    /// the mode gives the group access.
    pub fn readable_by_group(&self, gid: Gid) -> bool {
        self.perms.group == Some(gid) && self.perms.mode & 0o060 != 0
    }

    /// Removes the file; `false` if there was none.
    pub fn remove(&self) -> Result<bool, SinkError> {
        self.dir
            .remove(&self.name)
            .map_err(|error| self.write_error(error))
    }

    fn write_error(&self, error: dir::WriteError) -> SinkError {
        let hint = match error.step {
            Step::Create => {
                " (the directory must be writable by the broker; under systemd add it to ReadWritePaths=)"
            }
            Step::Chown => {
                " (giving a file to another user needs root or CAP_CHOWN, another group membership of it)"
            }
            _ => "",
        };
        SinkError::Io {
            path: self.sink.path.clone(),
            action: error.step.action(),
            source: error.source,
            hint,
        }
    }

    /// Keeps the file up to date until `stop`, then removes it unless it is
    /// to be kept. A token that cannot be had is retried with backoff (the
    /// file keeps the last token, which may expire).
    async fn run(self: Arc<Self>, broker: Broker, stop: CancellationToken) {
        let mut backoff = Backoff::new(DEFAULT_RETRY_INITIAL, DEFAULT_RETRY_MAX);
        let request = &self.sink.request;
        while !stop.is_cancelled() {
            let kind = Some(request.key.kind());
            // The broker's own sinks: no policy, charged to nobody's quota.
            let watch = broker.watch(Rpc::Sink, kind, Ok(request.clone()), Caller::Broker, None);
            let watched = tokio::select! {
                () = stop.cancelled() => break,
                watched = watch => watched,
            };
            match watched {
                Ok(mut watch) => {
                    backoff.reset();
                    loop {
                        let next = tokio::select! {
                            () = stop.cancelled() => break,
                            next = watch.next() => next,
                        };
                        match next {
                            Ok(token) => self.write_logged(&broker, token).await,
                            Err(BrokerError::ShuttingDown) => break,
                            Err(error) => {
                                tracing::warn!(sink = %self.path().display(), %error, "sink lost its token; asking again");
                                break;
                            }
                        }
                    }
                    continue;
                }
                Err(error) => {
                    tracing::warn!(sink = %self.path().display(), %error, "no token for the sink yet");
                }
            }
            let delay = backoff.next_delay(fastrand::f64());
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        if self.sink.on_shutdown == OnShutdown::Remove {
            match self.remove() {
                Ok(true) => tracing::info!(sink = %self.path().display(), "sink removed"),
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "could not remove sink"),
            }
        }
    }

    /// Writes `token` to the file, then logs and audits the outcome: a
    /// `sink_write` line once the file holds the token, an `error` line
    /// (without the token, which did not leave) when it could not be
    /// written.
    async fn write_logged(self: &Arc<Self>, broker: &Broker, token: Arc<Token>) {
        let sink = self.clone();
        let expire_time = humantime::format_rfc3339_seconds(token.expire_time());
        let written = {
            let token = token.clone();
            tokio::task::spawn_blocking(move || sink.write(&token)).await
        };
        let ok = match written {
            Ok(Ok(())) => {
                tracing::info!(sink = %self.path().display(), %expire_time, "sink written");
                true
            }
            Ok(Err(error)) => {
                tracing::error!(%error, "sink not written");
                false
            }
            Err(error) => {
                tracing::error!(sink = %self.path().display(), %error, "sink task failed");
                false
            }
        };
        let key = Some(&self.sink.request.key);
        broker.audit(|| {
            if ok {
                Event {
                    token: Some(&token),
                    ..event(EventKind::SinkWrite, Rpc::Sink, &Caller::Broker, key)
                }
            } else {
                // The broker's own failure to write a file.
                Event {
                    code: tonic::Code::Internal,
                    ..event(EventKind::Error, Rpc::Sink, &Caller::Broker, key)
                }
            }
        });
    }
}

/// Running sinks; [`stop`](Self::stop) ends them and waits for their files
/// to be removed.
pub struct Sinks {
    tasks: JoinSet<()>,
    stop: CancellationToken,
}

impl Sinks {
    /// Starts one task per sink, each watching its token from `broker`.
    pub fn start(sinks: Vec<OpenSink>, broker: &Broker) -> Self {
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for sink in sinks {
            tracing::info!(sink = %sink.path().display(), "keeping a token in a file");
            tasks.spawn(Arc::new(sink).run(broker.clone(), stop.clone()));
        }
        Self { tasks, stop }
    }

    /// Stops every sink and waits (at most `grace`) for them to clean up.
    pub async fn stop(mut self, grace: Duration) {
        self.stop.cancel();
        let all_done = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all_done).await.is_err() {
            tracing::warn!("sinks did not stop within the shutdown grace period");
        }
    }
}

/// Warns about each sink whose file the members of `gid`, the group that
/// may connect to the socket, may read: the policy does not guard it.
pub fn warn_if_clients_can_read(sinks: &[OpenSink], gid: Gid) {
    for sink in sinks.iter().filter(|sink| sink.readable_by_group(gid)) {
        tracing::warn!(
            sink = %sink.path().display(),
            group = gid.as_raw(),
            "the sink's group is the socket's group: every client that may connect can read this token, whatever the policy allows it; give the sink a group of its own"
        );
    }
}

/// Checks every sink's configuration, that no two share a path, and opens
/// each ([`Sink::open`]).
pub fn check_all(configs: Vec<SinkConfig>) -> Result<Vec<OpenSink>, SinkError> {
    let mut sinks: Vec<OpenSink> = Vec::with_capacity(configs.len());
    for config in configs {
        let sink = Sink::from_config(config)?;
        if sinks.iter().any(|other| other.path() == sink.path()) {
            return Err(SinkError::Config {
                path: sink.path,
                reason: "two sinks write this path".into(),
            });
        }
        sinks.push(sink.open()?);
    }
    Ok(sinks)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::time::SystemTime;

    use super::*;
    use crate::secret::Secret;

    fn config(toml: &str) -> SinkConfig {
        toml::from_str(toml).unwrap()
    }

    /// The sink a TOML table configures, opened.
    fn opened(toml: &str) -> OpenSink {
        Sink::from_config(config(toml)).unwrap().open().unwrap()
    }

    fn token(secret: &str) -> Token {
        Token::expiring_at(
            Secret::new(secret.into()),
            String::new(),
            SystemTime::now() + Duration::from_secs(3600),
        )
    }

    #[test]
    fn writes_atomically_with_the_mode_and_no_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let sink = opened(&format!(
            "path = {path:?}\nid_token = {{ audience = \"https://a.run.app\" }}\n"
        ));
        assert!(!path.exists(), "opening writes nothing at the path");
        sink.write(&token("first")).unwrap();
        let inode = std::fs::metadata(&path).unwrap().ino();
        sink.write(&token("second")).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, DEFAULT_SINK_MODE);
        assert_ne!(
            meta.ino(),
            inode,
            "replaced by rename, not rewritten in place"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("token")]);
    }

    #[test]
    fn mode_and_owner_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let (uid, gid) = crate::permissions::foreign_owner();
        let (uid, gid) = (uid.as_raw(), gid.as_raw());
        let sink = opened(&format!(
            "path = {path:?}\nmode = \"0600\"\nowner = \"{uid}\"\ngroup = \"{gid}\"\naccess_token = {{ scopes = [\"s:a\"] }}\n"
        ));
        sink.write(&token("t")).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    }

    #[test]
    fn bad_configurations_are_refused() {
        let cases = [
            (
                "path = \"relative\"\nid_token = { audience = \"https://a\" }",
                "absolute",
            ),
            ("path = \"/x/t\"", "exactly one"),
            (
                "path = \"/x/t\"\nid_token = { audience = \"\" }",
                "invalid audience",
            ),
            (
                "path = \"/x/t\"\naccess_token = { scopes = [\"has space\"] }",
                "invalid scopes[0]",
            ),
            (
                "path = \"/x/t\"\nid_token = { audience = \"https://a\", format = \"huge\" }",
                "\"standard\" or \"full\"",
            ),
            (
                "path = \"/x/t\"\nid_token = { audience = \"https://a\" }\nmode = \"0999\"",
                "mode",
            ),
            (
                "path = \"/x/t\"\nid_token = { audience = \"https://a\" }\nmode = \"0640\"",
                "mode 0640 gives the file's group access, but no `group` is set",
            ),
            (
                "path = \"/x/t\"\nid_token = { audience = \"https://a\" }\nmode = \"0620\"\nowner = \"0\"",
                "name the group whose members may read the token",
            ),
            (
                "path = \"/x/t\"\nid_token = { audience = \"https://a\" }\nmode = \"0644\"",
                "every user",
            ),
            (
                "path = \"/x/../t\"\nid_token = { audience = \"https://a\" }",
                "without `.` or `..`",
            ),
        ];
        for (toml, expected) in cases {
            let message = Sink::from_config(config(toml)).unwrap_err().to_string();
            assert!(message.contains(expected), "{toml}: {message}");
        }
        let on_shutdown: Result<SinkConfig, _> = toml::from_str(
            "path = \"/x/t\"\nid_token = { audience = \"https://a\" }\non_shutdown = \"shred\"",
        );
        assert!(on_shutdown.is_err());
    }

    #[test]
    fn a_group_gets_read_access_by_default_and_nobody_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let (_, gid) = crate::permissions::foreign_owner();
        let sink = opened(&format!(
            "path = {path:?}\ngroup = \"{gid}\"\nid_token = {{ audience = \"https://a\" }}\n"
        ));
        sink.write(&token("t")).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, DEFAULT_SINK_GROUP_MODE);
        assert_eq!(meta.gid(), gid.as_raw());
        assert!(sink.readable_by_group(gid));
        assert!(!sink.readable_by_group(Gid::from_raw(gid.as_raw() + 1)));

        // Without a group: owner only, and no group can read it.
        let sink = opened(&format!(
            "path = {path:?}\nid_token = {{ audience = \"https://a\" }}\n"
        ));
        sink.write(&token("t")).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(!sink.readable_by_group(gid));
    }

    #[test]
    fn unknown_owners_and_groups_are_refused_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        for (key, expected) in [
            ("owner = \"no-such-user-here\"", "owner: no user named"),
            ("group = \"no-such-group-here\"", "group: no group named"),
        ] {
            let sink = Sink::from_config(config(&format!(
                "path = {path:?}\n{key}\nid_token = {{ audience = \"https://a\" }}\n"
            )))
            .expect("looked up only when opened");
            let message = sink.open().unwrap_err().to_string();
            assert!(message.contains(expected), "{message}");
        }
    }

    #[test]
    fn a_missing_directory_fails_to_open() {
        let sink = Sink::from_config(config(
            "path = \"/nonexistent-dir/t\"\nid_token = { audience = \"https://a\" }",
        ))
        .unwrap();
        let message = sink.open().unwrap_err().to_string();
        assert!(message.contains("/nonexistent-dir/t"), "{message}");
        assert!(message.contains("directory must exist"), "{message}");
    }

    #[test]
    fn two_sinks_on_one_path_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let one = config(&format!(
            "path = {path:?}\nid_token = {{ audience = \"https://a\" }}"
        ));
        let message = check_all(vec![one.clone(), one]).unwrap_err().to_string();
        assert!(message.contains("two sinks"), "{message}");
    }
}
