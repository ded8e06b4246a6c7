//! Who may ask for which token. An operator's TOML file (`--policy`) lists
//! `[[allow]]` rules; a request is allowed only if one rule matches the
//! peer (uid/gid read from the socket) and covers everything it asks for.
//! Without a file every peer that can open the socket is allowed. The file
//! is re-read on SIGHUP; a bad file is reported and the old rules stay.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use crate::error::BrokerError;
use crate::request::boundary::{AccessBoundary, BoundaryEntry};
use crate::request::{ServiceAccount, TokenKey};

/// The identity of a connected process, from `SO_PEERCRED`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Effective user id.
    pub uid: u32,
    /// Effective (primary) group id; supplementary groups are not known.
    pub gid: u32,
    /// Process id, for logs.
    pub pid: Option<i32>,
}

/// Who sent a request, as far as its transport can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A process on a Unix socket; `None` if the kernel gave no credentials
    /// (then a policy, if there is one, denies).
    Local(Option<Peer>),
    /// A process on the loopback TCP port of the metadata-compatible
    /// endpoint. It cannot be identified, and the operator who opened that
    /// port chose to trust every local process: the policy does not apply.
    Loopback,
    /// The broker itself: its file sinks, which the operator configured.
    Broker,
}

impl Caller {
    /// The calling process, when the kernel named it.
    pub fn peer(&self) -> Option<&Peer> {
        match self {
            Self::Local(peer) => peer.as_ref(),
            Self::Loopback | Self::Broker => None,
        }
    }

    /// The calling process's uid, when the kernel named it.
    pub fn uid(&self) -> Option<u32> {
        self.peer().map(|peer| peer.uid)
    }
}

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("policy {path} is not valid: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the rule it is in.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    allow: Vec<Rule>,
}

/// One `[[allow]]` rule. Lists that are left out match any peer (`uids`,
/// `gids`) or allow nothing (`audiences`, `scopes`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    uids: Option<Vec<u32>>,
    gids: Option<Vec<u32>>,
    service_accounts: Vec<String>,
    audiences: Option<Vec<String>>,
    scopes: Option<Vec<String>>,
    /// Paths below `/computeMetadata/v1/` the metadata endpoint passes
    /// through to these peers beyond `--metadata-passthrough`: exact, or a
    /// prefix ending in `*`.
    metadata_paths: Option<Vec<String>>,
    /// Every access token these peers get is downscoped to this boundary.
    access_boundary: Option<Vec<BoundaryEntry>>,
    /// `access_boundary`, validated at load.
    #[serde(skip)]
    boundary: Option<Arc<AccessBoundary>>,
}

/// What the policy grants one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    /// The token asked for.
    AsAsked,
    /// Only the token under this key: the request limited to the matching
    /// rule's access boundary.
    Limited(TokenKey),
}

/// A parsed, validated policy.
#[derive(Debug)]
pub struct Policy {
    source: PathBuf,
    rules: Vec<Rule>,
}

impl Policy {
    /// Reads and validates the policy at `path`.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates policy text; `source` names it in messages.
    pub fn parse(source: &Path, text: &str) -> Result<Self, PolicyError> {
        let invalid = |message: String| PolicyError::Invalid {
            path: source.to_path_buf(),
            message,
        };
        let mut file: PolicyFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for (index, rule) in file.allow.iter_mut().enumerate() {
            rule.validate()
                .map_err(|message| invalid(format!("[[allow]] rule {}: {message}", index + 1)))?;
        }
        Ok(Self {
            source: source.to_path_buf(),
            rules: file.allow,
        })
    }

    /// How many rules the policy has.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// What the first rule (in file order) that matches `peer` and covers
    /// `key` (its account, scopes or audience) grants: the token asked
    /// for, or one limited to the rule's access boundary. That rule
    /// decides: a requested boundary it does not cover is denied, whatever
    /// later rules say. `Err` explains the denial: what that boundary does
    /// not cover, or nothing (no rule covers the key).
    pub fn grant(&self, peer: &Peer, key: &TokenKey) -> Result<Grant, Option<String>> {
        let source = key.source_key();
        for rule in self.rules.iter().filter(|rule| rule.matches(peer)) {
            if !rule.covers(&source) {
                continue;
            }
            let (Some(limit), TokenKey::Access(_) | TokenKey::Downscoped(_)) =
                (&rule.boundary, key)
            else {
                return Ok(Grant::AsAsked);
            };
            let limited = match key.boundary() {
                None => limit.clone(),
                Some(asked) => Arc::new(limit.narrow(asked).map_err(Some)?),
            };
            return Ok(Grant::Limited(key.clone().downscoped_to(limited)));
        }
        Err(None)
    }

    /// Whether some rule matches `peer` and covers `key`.
    #[cfg(test)]
    pub fn allows(&self, peer: &Peer, key: &TokenKey) -> bool {
        self.grant(peer, key).is_ok()
    }

    /// Whether some rule matching `peer` lists `path` (below
    /// `/computeMetadata/v1/`) in its `metadata_paths`. A query beyond the
    /// plain parameters (`recursive` in any spelling) might show what lies
    /// below the path too, so only a prefix pattern (which covers all of
    /// that) allows one.
    pub fn reveals(&self, peer: &Peer, path: &str, recursive: bool) -> bool {
        self.rules
            .iter()
            .filter(|rule| rule.matches(peer))
            .any(|rule| {
                rule.metadata_paths.iter().flatten().any(|pattern| {
                    match pattern.strip_suffix('*') {
                        Some(prefix) => path.starts_with(prefix),
                        None => path == pattern && !recursive,
                    }
                })
            })
    }
}

impl Rule {
    fn validate(&mut self) -> Result<(), String> {
        if let Some(entries) = &self.access_boundary {
            let boundary = AccessBoundary::from_entries("access_boundary", entries)
                .map_err(|e| e.to_string())?;
            self.boundary = Some(Arc::new(boundary));
        }
        for account in &self.service_accounts {
            if account != "*" {
                ServiceAccount::parse("service_accounts", account.clone())
                    .map_err(|e| format!("service account {account:?}: {e}"))?;
            }
        }
        for audience in self.audiences.iter().flatten() {
            if audience.is_empty() {
                return Err("an audience pattern is empty".into());
            }
        }
        for scope in self.scopes.iter().flatten() {
            if scope.is_empty() || scope.chars().any(char::is_whitespace) {
                return Err(format!("scope {scope:?} is empty or holds spaces"));
            }
        }
        for path in self.metadata_paths.iter().flatten() {
            let exact = path.strip_suffix('*').unwrap_or(path);
            let plain = !exact.is_empty()
                && !exact.starts_with('/')
                && exact.split('/').enumerate().all(|(i, segment)| {
                    let last = i == exact.split('/').count() - 1;
                    (last && segment.is_empty() && exact.ends_with('/'))
                        || (!segment.is_empty()
                            && segment != "."
                            && segment != ".."
                            && segment
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"-_.@+".contains(&b)))
                });
            if !plain {
                return Err(format!(
                    "metadata path {path:?} is not a plain path below /computeMetadata/v1/ (e.g. \"instance/attributes/cluster-name\", or a prefix ending in *)"
                ));
            }
        }
        Ok(())
    }

    fn matches(&self, peer: &Peer) -> bool {
        let listed =
            |ids: &Option<Vec<u32>>, id: u32| ids.as_ref().is_none_or(|ids| ids.contains(&id));
        listed(&self.uids, peer.uid) && listed(&self.gids, peer.gid)
    }

    fn covers(&self, key: &TokenKey) -> bool {
        let account = key.account().as_str();
        if !self
            .service_accounts
            .iter()
            .any(|a| a == "*" || a == account)
        {
            return false;
        }
        match key {
            TokenKey::Id(key) => self
                .audiences
                .iter()
                .flatten()
                .any(|pattern| glob_matches(pattern, &key.audience)),
            // A rule covers a downscoped key by its source key.
            TokenKey::Downscoped(_) => false,
            TokenKey::Access(key) => {
                let Some(allowed) = &self.scopes else {
                    return false;
                };
                let any = allowed.iter().any(|s| s == "*");
                if key.scopes.is_empty() {
                    return any || allowed.iter().any(|s| s == "default");
                }
                any || key.scopes.iter().all(|scope| allowed.contains(scope))
            }
        }
    }
}

/// Matches an audience against a pattern: `*` alone matches anything;
/// elsewhere `*` stands for any run of characters except `/ \ ? # @ %` and
/// whitespace, so `https://*.a.run.app` matches a host name but cannot be
/// stretched over a path (URL parsers read `\` as `/`), query, fragment,
/// user info or an escaped character.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let gap_ok = |gap: &str| {
        !gap.chars()
            .any(|c| matches!(c, '/' | '\\' | '?' | '#' | '@' | '%') || c.is_whitespace())
    };
    let mut segments = pattern.split('*');
    let first = segments.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let segments: Vec<&str> = segments.collect();
    let Some((last, middle)) = segments.split_last() else {
        return rest.is_empty();
    };
    // The leftmost place for each segment leaves the smallest gaps and the
    // most text for what follows, so it is the only one worth trying.
    for segment in middle {
        let Some(at) = rest.find(segment) else {
            return false;
        };
        if !gap_ok(&rest[..at]) {
            return false;
        }
        rest = &rest[at + segment.len()..];
    }
    rest.len() >= last.len() && rest.ends_with(last) && gap_ok(&rest[..rest.len() - last.len()])
}

/// The policy in force, if any; shared by every request and swapped on
/// reload.
pub struct PolicyStore {
    path: Option<PathBuf>,
    current: RwLock<Option<Arc<Policy>>>,
}

impl PolicyStore {
    /// Loads the policy at `path`; `None` allows every peer.
    pub fn open(path: Option<PathBuf>) -> Result<Self, PolicyError> {
        let current = path.as_deref().map(Policy::load).transpose()?.map(Arc::new);
        Ok(Self {
            path,
            current: RwLock::new(current),
        })
    }

    /// The policy file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Re-reads the file. On error the old policy stays in force.
    pub fn reload(&self) -> Result<Option<usize>, PolicyError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let policy = Policy::load(path)?;
        let rules = policy.len();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(policy));
        Ok(Some(rules))
    }

    /// Whether the policy lets `caller` read `path` (below
    /// `/computeMetadata/v1/`) through the metadata endpoint beyond
    /// `--metadata-passthrough`: only a known peer on a Unix socket whose
    /// rule lists it.
    pub fn reveals(&self, caller: &Caller, path: &str, recursive: bool) -> bool {
        let Caller::Local(Some(peer)) = caller else {
            return false;
        };
        let current = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        current.is_some_and(|policy| policy.reveals(peer, path, recursive))
    }

    /// Allows the request, as asked or limited to an access boundary, or
    /// explains the denial (naming the policy file, never a token).
    pub fn check(&self, caller: &Caller, key: &TokenKey) -> Result<Grant, BrokerError> {
        let peer = match caller {
            Caller::Local(peer) => peer.as_ref(),
            Caller::Loopback | Caller::Broker => return Ok(Grant::AsAsked),
        };
        let current = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(policy) = current else {
            return Ok(Grant::AsAsked);
        };
        let who = |peer: Option<&Peer>| {
            peer.map_or_else(
                || "a peer whose credentials are unknown".to_string(),
                |p| format!("uid {} (gid {})", p.uid, p.gid),
            )
        };
        let Some(peer) = peer else {
            return Err(BrokerError::PolicyDenied {
                policy: policy.source.display().to_string(),
                peer: who(None),
                request: describe(key),
            });
        };
        policy
            .grant(peer, key)
            .map_err(|uncovered| match uncovered {
                Some(reason) => BrokerError::BoundaryNotCovered {
                    policy: policy.source.display().to_string(),
                    peer: who(Some(peer)),
                    reason,
                },
                None => BrokerError::PolicyDenied {
                    policy: policy.source.display().to_string(),
                    peer: who(Some(peer)),
                    request: describe(key),
                },
            })
    }
}

/// What a key asks for, in words, for denial messages.
fn describe(key: &TokenKey) -> String {
    match key {
        TokenKey::Id(key) => format!(
            "an ID token of {:?} for audience {:?}",
            key.account.as_str(),
            key.audience
        ),
        TokenKey::Access(key) if key.scopes.is_empty() => format!(
            "an access token of {:?} with its default scopes",
            key.account.as_str()
        ),
        TokenKey::Access(key) => {
            let mut text = format!("an access token of {:?} with scopes", key.account.as_str());
            for scope in &key.scopes {
                let _ = write!(text, " {scope}");
            }
            text
        }
        TokenKey::Downscoped(key) => format!(
            "{} limited to {}",
            describe(&TokenKey::Access(key.source.clone())),
            key.boundary.describe()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{AccessTokenKey, IdTokenFormat, IdTokenKey};

    const POLICY: &str = r#"
        [[allow]]
        uids = [1000, 1001]
        service_accounts = ["default", "build@proj.iam.gserviceaccount.com"]
        audiences = ["https://api.example.com", "https://*.a.run.app"]
        scopes = ["https://www.googleapis.com/auth/cloud-platform"]

        [[allow]]
        gids = [2000]
        service_accounts = ["*"]
        scopes = ["*"]

        [[allow]]
        uids = [3000]
        gids = [3000]
        service_accounts = ["default"]
        scopes = ["default"]
    "#;

    fn policy() -> Policy {
        Policy::parse(Path::new("/etc/tokenbroker/policy.toml"), POLICY).unwrap()
    }

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid,
            gid,
            pid: Some(42),
        }
    }

    fn id(account: &str, audience: &str) -> TokenKey {
        TokenKey::Id(IdTokenKey {
            account: ServiceAccount::parse("t", account.into()).unwrap(),
            audience: audience.into(),
            format: IdTokenFormat::Standard,
            include_licenses: false,
        })
    }

    fn access(account: &str, scopes: &[&str]) -> TokenKey {
        TokenKey::Access(AccessTokenKey {
            account: ServiceAccount::parse("t", account.into()).unwrap(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        })
    }

    const CLOUD: &str = "https://www.googleapis.com/auth/cloud-platform";

    #[test]
    fn a_rule_must_match_the_peer_and_cover_the_request() {
        let policy = policy();
        assert!(policy.allows(&peer(1000, 1), &id("default", "https://api.example.com")));
        assert!(policy.allows(
            &peer(1001, 1),
            &id(
                "build@proj.iam.gserviceaccount.com",
                "https://svc-abc.a.run.app"
            )
        ));
        assert!(
            !policy.allows(&peer(1002, 1), &id("default", "https://api.example.com")),
            "uid not listed"
        );
        assert!(!policy.allows(
            &peer(1000, 1),
            &id(
                "other@proj.iam.gserviceaccount.com",
                "https://api.example.com"
            )
        ));
        assert!(!policy.allows(
            &peer(1000, 1),
            &id("default", "https://api.example.com/other")
        ));
        assert!(policy.allows(&peer(1000, 1), &access("default", &[CLOUD])));
        assert!(
            !policy.allows(&peer(1000, 1), &access("default", &[CLOUD, "openid"])),
            "one scope not covered"
        );
        assert!(
            !policy.allows(&peer(1000, 1), &access("default", &[])),
            "default scopes need * or default"
        );
    }

    #[test]
    fn metadata_paths_reveal_what_a_rule_lists_to_its_peers() {
        let policy = Policy::parse(
            Path::new("p.toml"),
            "[[allow]]\nuids = [7]\nservice_accounts = []\nmetadata_paths = [\"instance/attributes/cluster-name\", \"project/attributes/team-*\"]\n",
        )
        .unwrap();
        let peer = |uid| Peer {
            uid,
            gid: 0,
            pid: None,
        };
        assert!(policy.reveals(&peer(7), "instance/attributes/cluster-name", false));
        assert!(policy.reveals(&peer(7), "project/attributes/team-a", true));
        assert!(!policy.reveals(&peer(7), "instance/attributes/cluster-name", true));
        assert!(!policy.reveals(&peer(7), "instance/attributes/kube-env", false));
        assert!(!policy.reveals(&peer(7), "instance/attributes/cluster-name/", false));
        assert!(!policy.reveals(&peer(8), "instance/attributes/cluster-name", false));
        for bad in [
            "/instance/x",
            "instance/../x",
            "instance/%2e",
            "",
            "*x",
            "a//b",
            "a;b",
        ] {
            let text = format!("[[allow]]\nservice_accounts = []\nmetadata_paths = [{bad:?}]\n");
            let error = Policy::parse(Path::new("p.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(error.contains("metadata path"), "{bad}: {error}");
        }
    }

    #[test]
    fn a_rule_without_audiences_allows_no_id_tokens() {
        let policy = policy();
        assert!(policy.allows(
            &peer(5, 2000),
            &access("any@p.iam.gserviceaccount.com", &["x", "y"])
        ));
        assert!(policy.allows(&peer(5, 2000), &access("default", &[])));
        assert!(!policy.allows(&peer(5, 2000), &id("default", "https://api.example.com")));
    }

    #[test]
    fn uids_and_gids_both_apply() {
        let policy = policy();
        assert!(policy.allows(&peer(3000, 3000), &access("default", &[])));
        assert!(!policy.allows(&peer(3000, 1), &access("default", &[])));
        assert!(
            !policy.allows(&peer(3000, 3000), &access("default", &[CLOUD])),
            "only default scopes"
        );
    }

    #[test]
    fn globs_stay_within_a_host_or_segment() {
        assert!(glob_matches(
            "https://*.a.run.app",
            "https://svc-abc123-uc.a.run.app"
        ));
        assert!(glob_matches("https://*.a.run.app", "https://x.y.a.run.app"));
        for evil in [
            "https://evil.com/.a.run.app",
            "https://evil.com?.a.run.app",
            "https://evil.com#.a.run.app",
            "https://evil.com@x.a.run.app",
            "https://evil.com\\.a.run.app",
            "https://evil.com%2F.a.run.app",
            "https://evil.com .a.run.app",
            "https://svc.a.run.app.evil.com",
            "http://svc.a.run.app",
        ] {
            assert!(!glob_matches("https://*.a.run.app", evil), "{evil}");
        }
        assert!(glob_matches("*", "anything at all/?#@"));
        assert!(glob_matches(
            "https://api.example.com/*",
            "https://api.example.com/v1"
        ));
        assert!(!glob_matches(
            "https://api.example.com/*",
            "https://api.example.com/v1/admin"
        ));
        assert!(glob_matches("a*b*c", "aXXbYYc"));
        assert!(glob_matches("a*b*c", "abc"));
        assert!(!glob_matches("a*b*c", "aXXbYY"));
        assert!(glob_matches("exact", "exact"));
        assert!(!glob_matches("exact", "exactly"));
        assert!(glob_matches("a**b", "aXb"));
    }

    #[test]
    fn bad_files_are_refused_with_the_rule_named() {
        let path = Path::new("p.toml");
        let typo = "[[allow]]\nservice_accounts = [\"*\"]\naudience = [\"x\"]\n";
        let error = Policy::parse(path, typo).unwrap_err().to_string();
        assert!(error.contains("audience"), "{error}");
        let bad_account = "[[allow]]\nservice_accounts = [\"../x\"]\n";
        let error = Policy::parse(path, bad_account).unwrap_err().to_string();
        assert!(error.contains("rule 1"), "{error}");
        let missing = "[[allow]]\nuids = [1]\n";
        assert!(Policy::parse(path, missing).is_err());
        assert!(Policy::parse(path, "not toml [").is_err());
        assert_eq!(Policy::parse(path, "").unwrap().len(), 0);
    }

    #[test]
    fn the_store_denies_with_the_policy_named_and_keeps_rules_on_bad_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, POLICY).unwrap();
        let store = PolicyStore::open(Some(path.clone())).unwrap();
        let denied = store.check(
            &local(peer(7, 7)),
            &id("default", "https://api.example.com"),
        );
        let Err(error) = denied else {
            panic!("allowed")
        };
        let message = error.to_string();
        assert!(message.contains(path.to_str().unwrap()), "{message}");
        assert!(message.contains("uid 7"), "{message}");
        assert!(
            store
                .check(&Caller::Local(None), &access("default", &[CLOUD]))
                .is_err()
        );

        std::fs::write(&path, "broken [").unwrap();
        assert!(store.reload().is_err());
        assert!(
            store
                .check(&local(peer(1000, 1)), &access("default", &[CLOUD]))
                .is_ok()
        );

        std::fs::write(
            &path,
            "[[allow]]\nuids = [7]\nservice_accounts = [\"*\"]\naudiences = [\"*\"]\n",
        )
        .unwrap();
        assert_eq!(store.reload().unwrap(), Some(1));
        assert!(
            store
                .check(
                    &local(peer(7, 7)),
                    &id("default", "https://api.example.com")
                )
                .is_ok()
        );
        assert!(
            store
                .check(&local(peer(1000, 1)), &access("default", &[CLOUD]))
                .is_err()
        );
    }

    #[test]
    fn loopback_callers_are_not_subject_to_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, POLICY).unwrap();
        let store = PolicyStore::open(Some(path)).unwrap();
        let key = id("default", "https://api.example.com");
        assert!(store.check(&local(peer(7, 7)), &key).is_err());
        assert!(store.check(&Caller::Loopback, &key).is_ok());
    }

    fn local(peer: Peer) -> Caller {
        Caller::Local(Some(peer))
    }

    #[test]
    fn without_a_file_everyone_is_allowed() {
        let store = PolicyStore::open(None).unwrap();
        assert!(
            store
                .check(&Caller::Local(None), &id("default", "x"))
                .is_ok()
        );
        assert_eq!(store.reload().unwrap(), None);
    }

    const BUCKET: &str = "//storage.googleapis.com/projects/_/buckets/b";
    const VIEWER: &str = "inRole:roles/storage.objectViewer";

    fn boundary(resource: &str, permission: &str) -> Arc<AccessBoundary> {
        Arc::new(
            AccessBoundary::new(
                "b",
                vec![crate::request::boundary::RuleInput {
                    resource: resource.into(),
                    permissions: vec![permission.into()],
                    condition: None,
                }],
            )
            .unwrap(),
        )
    }

    const BOUNDED: &str = r#"
        [[allow]]
        uids = [5]
        service_accounts = ["default"]
        scopes = ["*"]
        audiences = ["*"]
        access_boundary = [{ available_resource = "//storage.googleapis.com/projects/_/buckets/b", available_permissions = ["inRole:roles/storage.objectViewer"] }]

        [[allow]]
        uids = [5]
        service_accounts = ["default"]
        scopes = ["*"]
    "#;

    #[test]
    fn the_first_covering_rule_decides_and_its_boundary_limits_access_tokens() {
        let policy = Policy::parse(Path::new("p.toml"), BOUNDED).unwrap();
        let limited = policy.grant(&peer(5, 5), &access("default", &[CLOUD]));
        assert_eq!(
            limited,
            Ok(Grant::Limited(
                access("default", &[CLOUD]).downscoped_to(boundary(BUCKET, VIEWER))
            )),
            "the first rule's boundary, although the second has none"
        );
        let id = id("default", "https://x.a.run.app");
        assert_eq!(policy.grant(&peer(5, 5), &id), Ok(Grant::AsAsked));
    }

    #[test]
    fn a_requested_boundary_beyond_the_rule_is_denied_naming_it() {
        // A later rule without a boundary does not widen what the first,
        // which decides, refused.
        let only = Policy::parse(Path::new("p.toml"), BOUNDED).unwrap();
        let asked = access("default", &[]).downscoped_to(boundary(BUCKET, "inRole:roles/owner"));
        let reason = only.grant(&peer(5, 5), &asked).unwrap_err().unwrap();
        assert!(reason.contains("inRole:roles/owner"), "{reason}");
        let within = access("default", &[]).downscoped_to(boundary(BUCKET, VIEWER));
        assert_eq!(
            only.grant(&peer(5, 5), &within),
            Ok(Grant::Limited(within.clone()))
        );
        let store_error = BrokerError::BoundaryNotCovered {
            policy: "p.toml".into(),
            peer: "uid 5 (gid 5)".into(),
            reason,
        };
        assert_eq!(store_error.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn a_bad_boundary_in_the_file_is_refused_at_load() {
        let error = Policy::parse(
            Path::new("p.toml"),
            "[[allow]]\nservice_accounts = []\naccess_boundary = [{ available_resource = \"b\", available_permissions = [\"inRole:r\"] }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("rule 1") && error.contains("available_resource"),
            "{error}"
        );
    }
}
