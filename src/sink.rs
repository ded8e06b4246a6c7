//! File sinks: tokens kept written to files, for programs that can only
//! read a file (like Vault Agent's sinks).
//!
//! Each `[[sink]]` of the config file names one token and one path. The
//! sink watches the token's cache key (so it counts as a watcher and the
//! key keeps being refreshed) and rewrites the file atomically with every
//! new token: a temporary file in the same directory, given its mode and
//! owner before the token is written, then renamed over the path. On
//! shutdown the file is removed, or kept if so configured.

use std::fs::Permissions;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::unistd::{Gid, Uid, User};
use serde::Deserialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cache::TokenCache;
use crate::config::parse_mode;
use crate::error::BrokerError;
use crate::proto::v1 as pb;
use crate::quota::Owner;
use crate::request::TokenRequest;
use crate::schedule::{Backoff, DEFAULT_RETRY_INITIAL, DEFAULT_RETRY_MAX};
use crate::token::Token;

/// Mode of a sink's file unless configured (owner reads and writes, group
/// reads).
pub const DEFAULT_SINK_MODE: u32 = 0o640;
/// Prefix of the temporary files a sink writes before renaming.
const TEMP_PREFIX: &str = ".tokenbroker-sink-";

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
    /// Permissions of the file, octal (default `"0640"`).
    pub mode: Option<String>,
    /// Owner of the file, by name or uid (default: the broker's user).
    pub owner: Option<String>,
    /// Group of the file, by name or gid (default: the broker's group).
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

/// A checked sink, ready to run.
#[derive(Clone, Debug)]
pub struct Sink {
    path: PathBuf,
    request: TokenRequest,
    mode: u32,
    owner: Option<Uid>,
    group: Option<Gid>,
    on_shutdown: OnShutdown,
}

impl Sink {
    /// Checks a `[[sink]]` table: the token request with the same rules as
    /// a gRPC request, the mode, and that owner and group exist.
    pub fn from_config(config: SinkConfig) -> Result<Self, SinkError> {
        let path = config.path;
        let invalid = |reason: String| SinkError::Config {
            path: path.clone(),
            reason,
        };
        if !path.is_absolute() || path.file_name().is_none() {
            return Err(invalid("`path` must be an absolute path to a file".into()));
        }
        let request = match (config.access_token, config.id_token) {
            (Some(access), None) => TokenRequest::try_from(pb::GetAccessTokenRequest {
                service_account: access.service_account,
                scopes: access.scopes,
                min_valid_for: None,
            }),
            (None, Some(id)) => {
                let format = match id.format.as_deref() {
                    None | Some("standard") => pb::IdTokenFormat::Standard,
                    Some("full") => pb::IdTokenFormat::Full,
                    Some(other) => {
                        return Err(invalid(format!(
                            "id_token.format {other:?}: use \"standard\" or \"full\""
                        )));
                    }
                };
                TokenRequest::try_from(pb::GetIdTokenRequest {
                    audience: id.audience,
                    service_account: id.service_account,
                    format: format as i32,
                    include_licenses: id.include_licenses,
                    min_valid_for: None,
                })
            }
            _ => {
                return Err(invalid(
                    "set exactly one of `access_token = {...}` and `id_token = {...}`".into(),
                ));
            }
        }
        .map_err(|error: BrokerError| invalid(error.to_string()))?;
        let mode = match &config.mode {
            Some(mode) => parse_mode(mode).map_err(|e| invalid(format!("mode {e}")))?,
            None => DEFAULT_SINK_MODE,
        };
        if mode & 0o007 != 0 {
            return Err(invalid(format!(
                "mode {mode:04o} would let every user read or change the token; use at most 0660 (and a group)"
            )));
        }
        let owner = config
            .owner
            .as_deref()
            .map(lookup_user)
            .transpose()
            .map_err(|e| invalid(format!("owner: {e}")))?;
        let group = config
            .group
            .as_deref()
            .map(|g| crate::config::parse_group(g).map(Gid::from_raw))
            .transpose()
            .map_err(|e| invalid(format!("group: {e}")))?;
        Ok(Self {
            path,
            request,
            mode,
            owner,
            group,
            on_shutdown: config.on_shutdown,
        })
    }

    /// The file the sink keeps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks, before the broker serves, that the directory exists and a
    /// file with the sink's mode and owner can be created in it (a failed
    /// `chown` is reported here, not at the first token).
    pub fn check(&self) -> Result<(), SinkError> {
        let file = self.temp_file()?;
        drop(file);
        Ok(())
    }

    /// Writes `token` to the file atomically.
    pub fn write(&self, token: &Token) -> Result<(), SinkError> {
        let mut file = self.temp_file()?;
        file.write_all(token.secret().expose().as_bytes())
            .and_then(|()| file.as_file().sync_all())
            .map_err(self.io_error("write a temporary file", ""))?;
        file.persist(&self.path)
            .map_err(|error| error.error)
            .map_err(self.io_error("rename the temporary file into place", ""))?;
        Ok(())
    }

    /// An empty temporary file beside the path, with the final mode and
    /// owner already set (so the token is never readable by more).
    fn temp_file(&self) -> Result<tempfile::NamedTempFile, SinkError> {
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let file = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .permissions(Permissions::from_mode(0o600))
            .tempfile_in(dir)
            .map_err(self.io_error(
                "create a file in its directory",
                " (the directory must exist and be writable by the broker; under systemd add it to ReadWritePaths=)",
            ))?;
        if self.owner.is_some() || self.group.is_some() {
            std::os::unix::fs::fchown(
                file.as_file(),
                self.owner.map(Uid::as_raw),
                self.group.map(Gid::as_raw),
            )
            .map_err(self.io_error(
                "set the file's owner or group",
                " (giving a file to another user needs root or CAP_CHOWN, another group membership of it)",
            ))?;
        }
        file.as_file()
            .set_permissions(Permissions::from_mode(self.mode))
            .map_err(self.io_error("set the file's mode", ""))?;
        Ok(file)
    }

    fn io_error(
        &self,
        action: &'static str,
        hint: &'static str,
    ) -> impl FnOnce(io::Error) -> SinkError {
        let path = self.path.clone();
        move |source| SinkError::Io {
            path,
            action,
            source,
            hint,
        }
    }

    /// Keeps the file up to date until `stop`, then removes it unless it is
    /// to be kept. A token that cannot be had is retried with backoff (the
    /// file keeps the last token, which may expire).
    async fn run(self: Arc<Self>, cache: TokenCache, stop: CancellationToken) {
        let mut backoff = Backoff::new(DEFAULT_RETRY_INITIAL, DEFAULT_RETRY_MAX);
        while !stop.is_cancelled() {
            let watched = tokio::select! {
                () = stop.cancelled() => break,
                // The broker's own keys are charged to nobody's quota.
                watched = cache.watch(&self.request, Owner::Broker) => watched,
            };
            match watched {
                Ok((served, mut watch)) => {
                    backoff.reset();
                    self.write_logged(served.token).await;
                    loop {
                        match watch.next(&stop).await {
                            Ok(token) => self.write_logged(token).await,
                            Err(BrokerError::ShuttingDown) => break,
                            Err(error) => {
                                tracing::warn!(sink = %self.path.display(), %error, "sink lost its token; asking again");
                                break;
                            }
                        }
                    }
                    continue;
                }
                Err(error) => {
                    tracing::warn!(sink = %self.path.display(), %error, "no token for the sink yet");
                }
            }
            let delay = backoff.next_delay(fastrand::f64());
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        if self.on_shutdown == OnShutdown::Remove {
            match std::fs::remove_file(&self.path) {
                Ok(()) => tracing::info!(sink = %self.path.display(), "sink removed"),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(sink = %self.path.display(), %error, "could not remove sink")
                }
            }
        }
    }

    async fn write_logged(self: &Arc<Self>, token: Arc<Token>) {
        let sink = self.clone();
        let expire_time = humantime::format_rfc3339_seconds(token.expire_time());
        let written = tokio::task::spawn_blocking(move || sink.write(&token)).await;
        match written {
            Ok(Ok(())) => {
                tracing::info!(sink = %self.path.display(), %expire_time, "sink written")
            }
            Ok(Err(error)) => tracing::error!(%error, "sink not written"),
            Err(error) => tracing::error!(sink = %self.path.display(), %error, "sink task failed"),
        }
    }
}

fn lookup_user(value: &str) -> Result<Uid, String> {
    if let Ok(uid) = value.parse::<u32>() {
        return Ok(Uid::from_raw(uid));
    }
    match User::from_name(value) {
        Ok(Some(user)) => Ok(user.uid),
        Ok(None) => Err(format!("no user named {value:?}")),
        Err(error) => Err(format!("cannot look up user {value:?}: {error}")),
    }
}

/// Running sinks; [`stop`](Self::stop) ends them and waits for their files
/// to be removed.
pub struct Sinks {
    tasks: JoinSet<()>,
    stop: CancellationToken,
}

impl Sinks {
    /// Starts one task per sink.
    pub fn start(sinks: Vec<Sink>, cache: &TokenCache) -> Self {
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for sink in sinks {
            tracing::info!(sink = %sink.path.display(), "keeping a token in a file");
            tasks.spawn(Arc::new(sink).run(cache.clone(), stop.clone()));
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

/// Checks every sink's configuration, and that no two share a path.
pub fn check_all(configs: Vec<SinkConfig>) -> Result<Vec<Sink>, SinkError> {
    let mut sinks: Vec<Sink> = Vec::with_capacity(configs.len());
    for config in configs {
        let sink = Sink::from_config(config)?;
        if sinks.iter().any(|other| other.path == sink.path) {
            return Err(SinkError::Config {
                path: sink.path,
                reason: "two sinks write this path".into(),
            });
        }
        sink.check()?;
        sinks.push(sink);
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
        let sink = Sink::from_config(config(&format!(
            "path = {path:?}\nid_token = {{ audience = \"https://a.run.app\" }}\n"
        )))
        .unwrap();
        sink.check().unwrap();
        assert!(!path.exists(), "check writes nothing at the path");
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
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let sink = Sink::from_config(config(&format!(
            "path = {path:?}\nmode = \"0600\"\nowner = \"{uid}\"\ngroup = \"{gid}\"\naccess_token = {{ scopes = [\"s:a\"] }}\n"
        )))
        .unwrap();
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
                "path = \"/x/t\"\nid_token = { audience = \"https://a\" }\nowner = \"no-such-user-here\"",
                "no user named",
            ),
            (
                "path = \"/x/t\"\nid_token = { audience = \"https://a\" }\nmode = \"0644\"",
                "every user",
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
    fn a_missing_directory_fails_the_check() {
        let sink = Sink::from_config(config(
            "path = \"/nonexistent-dir/t\"\nid_token = { audience = \"https://a\" }",
        ))
        .unwrap();
        let message = sink.check().unwrap_err().to_string();
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
