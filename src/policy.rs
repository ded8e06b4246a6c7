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
use crate::peer::{Holder, Peer};
use crate::request::boundary::{AccessBoundary, BoundaryEntry};
use crate::request::{ServiceAccount, TokenKey, is_service_account_email};
use crate::workload::{ByServiceAccount, Pod};

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

    /// Whom the places this caller takes are charged to, if anybody.
    pub fn holder(&self) -> Option<Holder> {
        self.peer().map(Peer::holder)
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
    #[serde(default)]
    workload: Vec<WorkloadBinding>,
}

/// One `[[workload]]` entry: with workload identity, the pods of this
/// Kubernetes service account get tokens of this Google service account
/// (over the account's `iam.gke.io/gcp-service-account` annotation).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadBinding {
    namespace: String,
    service_account: String,
    google_service_account: String,
}

/// One `[[allow]]` rule. Lists that are left out match any peer (`uids`,
/// `gids`, `namespaces`, `kubernetes_service_accounts`) or allow nothing
/// (`audiences`, `scopes`). A rule with `namespaces` or
/// `kubernetes_service_accounts` matches only peers in pods (workload
/// identity).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    uids: Option<Vec<u32>>,
    gids: Option<Vec<u32>>,
    /// Pods' namespaces.
    namespaces: Option<Vec<String>>,
    /// Pods' Kubernetes service accounts, as `namespace/name`.
    kubernetes_service_accounts: Option<Vec<String>>,
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
    /// `kubernetes_service_accounts` as (namespace, name), split at load.
    #[serde(skip)]
    pod_accounts: Option<Vec<(String, String)>>,
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
    /// `[[workload]]`: the Google service account of each Kubernetes
    /// service account it binds.
    workloads: ByServiceAccount<Arc<str>>,
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
        let mut workloads = ByServiceAccount::default();
        for (index, binding) in file.workload.into_iter().enumerate() {
            let at = |message: String| invalid(format!("[[workload]] {}: {message}", index + 1));
            if binding.namespace.is_empty() || binding.service_account.is_empty() {
                return Err(at("namespace and service_account must not be empty".into()));
            }
            if !is_service_account_email(&binding.google_service_account) {
                return Err(at(format!(
                    "google_service_account {:?} is not a service account email",
                    binding.google_service_account
                )));
            }
            if workloads
                .get(&binding.namespace, &binding.service_account)
                .is_some()
            {
                return Err(at(format!(
                    "{}/{} is bound twice",
                    binding.namespace, binding.service_account
                )));
            }
            let account = Arc::from(binding.google_service_account);
            workloads.insert(binding.namespace, binding.service_account, account);
        }
        Ok(Self {
            source: source.to_path_buf(),
            rules: file.allow,
            workloads,
        })
    }

    /// The Google service account `[[workload]]` binds the Kubernetes
    /// service account `namespace/service_account` to, if any.
    pub fn workload_account(&self, namespace: &str, service_account: &str) -> Option<&Arc<str>> {
        self.workloads.get(namespace, service_account)
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
    pub fn grant(
        &self,
        peer: &Peer,
        pod: Option<&Pod>,
        key: &TokenKey,
    ) -> Result<Grant, Option<String>> {
        let source = key.source_key();
        for rule in self.rules.iter().filter(|rule| rule.matches(peer, pod)) {
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
        self.grant(peer, None, key).is_ok()
    }

    /// Whether some rule matching `peer` lists `path` (below
    /// `/computeMetadata/v1/`) in its `metadata_paths`. A query beyond the
    /// plain parameters (`recursive` in any spelling) might show what lies
    /// below the path too, so only a prefix pattern (which covers all of
    /// that) allows one.
    pub fn reveals(&self, peer: &Peer, pod: Option<&Pod>, path: &str, recursive: bool) -> bool {
        self.rules
            .iter()
            .filter(|rule| rule.matches(peer, pod))
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
        if let Some(names) = &self.kubernetes_service_accounts {
            let split = |name: &String| match name.split_once('/') {
                Some((namespace, account)) if !namespace.is_empty() && !account.is_empty() => {
                    Ok((namespace.to_string(), account.to_string()))
                }
                _ => Err(format!(
                    "Kubernetes service account {name:?} is not namespace/name"
                )),
            };
            self.pod_accounts = Some(names.iter().map(split).collect::<Result<_, _>>()?);
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

    /// Whether the rule is about `peer` (in `pod`, with workload identity).
    /// A rule without pod matchers is about host processes only: a rule
    /// written for the host's uid 0 must not hand its tokens to every pod
    /// whose containers run as root.
    fn matches(&self, peer: &Peer, pod: Option<&Pod>) -> bool {
        let listed =
            |ids: &Option<Vec<u32>>, id: u32| ids.as_ref().is_none_or(|ids| ids.contains(&id));
        if !listed(&self.uids, peer.uid) || !listed(&self.gids, peer.gid) {
            return false;
        }
        let about_pods = self.namespaces.is_some() || self.kubernetes_service_accounts.is_some();
        let Some(pod) = pod else {
            return !about_pods;
        };
        let namespace_ok = self
            .namespaces
            .as_ref()
            .is_none_or(|namespaces| namespaces.contains(&pod.namespace));
        let account_ok = self.pod_accounts.as_ref().is_none_or(|accounts| {
            accounts.iter().any(|(namespace, account)| {
                *namespace == pod.namespace && *account == pod.service_account
            })
        });
        about_pods && namespace_ok && account_ok
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
    pub fn reveals(&self, caller: &Caller, pod: Option<&Pod>, path: &str, recursive: bool) -> bool {
        let Caller::Local(Some(peer)) = caller else {
            return false;
        };
        self.current()
            .is_some_and(|policy| policy.reveals(peer, pod, path, recursive))
    }

    /// The Google service account the policy's `[[workload]]` table binds
    /// the Kubernetes service account `namespace/service_account` to.
    pub fn workload_account(&self, namespace: &str, service_account: &str) -> Option<Arc<str>> {
        self.current()?
            .workload_account(namespace, service_account)
            .cloned()
    }

    fn current(&self) -> Option<Arc<Policy>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Allows the request, as asked or limited to an access boundary, or
    /// explains the denial (naming the policy file, never a token).
    pub fn check(
        &self,
        caller: &Caller,
        pod: Option<&Pod>,
        key: &TokenKey,
    ) -> Result<Grant, BrokerError> {
        let peer = match caller {
            Caller::Local(peer) => peer.as_ref(),
            Caller::Loopback | Caller::Broker => return Ok(Grant::AsAsked),
        };
        let Some(policy) = self.current() else {
            return Ok(Grant::AsAsked);
        };
        let who = |peer: Option<&Peer>| match (peer, pod) {
            (None, _) => "a peer whose credentials are unknown".to_string(),
            (Some(p), None) => format!("uid {} (gid {})", p.uid, p.gid),
            (Some(p), Some(pod)) => format!(
                "uid {} (gid {}) of pod {pod} (Kubernetes service account {})",
                p.uid,
                p.gid,
                pod.kubernetes_service_account()
            ),
        };
        let Some(peer) = peer else {
            return Err(BrokerError::PolicyDenied {
                policy: policy.source.display().to_string(),
                peer: who(None),
                request: describe(key),
            });
        };
        policy
            .grant(peer, pod, key)
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
    use crate::peer::Place;
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
            place: Place::Host,
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
            place: Place::Host,
        };
        assert!(policy.reveals(&peer(7), None, "instance/attributes/cluster-name", false));
        assert!(policy.reveals(&peer(7), None, "project/attributes/team-a", true));
        assert!(!policy.reveals(&peer(7), None, "instance/attributes/cluster-name", true));
        assert!(!policy.reveals(&peer(7), None, "instance/attributes/kube-env", false));
        assert!(!policy.reveals(&peer(7), None, "instance/attributes/cluster-name/", false));
        assert!(!policy.reveals(&peer(8), None, "instance/attributes/cluster-name", false));
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
            None,
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
                .check(&Caller::Local(None), None, &access("default", &[CLOUD]))
                .is_err()
        );

        std::fs::write(&path, "broken [").unwrap();
        assert!(store.reload().is_err());
        assert!(
            store
                .check(&local(peer(1000, 1)), None, &access("default", &[CLOUD]))
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
                    None,
                    &id("default", "https://api.example.com")
                )
                .is_ok()
        );
        assert!(
            store
                .check(&local(peer(1000, 1)), None, &access("default", &[CLOUD]))
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
        assert!(store.check(&local(peer(7, 7)), None, &key).is_err());
        assert!(store.check(&Caller::Loopback, None, &key).is_ok());
    }

    fn local(peer: Peer) -> Caller {
        Caller::Local(Some(peer))
    }

    #[test]
    fn without_a_file_everyone_is_allowed() {
        let store = PolicyStore::open(None).unwrap();
        assert!(
            store
                .check(&Caller::Local(None), None, &id("default", "x"))
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
        let limited = policy.grant(&peer(5, 5), None, &access("default", &[CLOUD]));
        assert_eq!(
            limited,
            Ok(Grant::Limited(
                access("default", &[CLOUD]).downscoped_to(boundary(BUCKET, VIEWER))
            )),
            "the first rule's boundary, although the second has none"
        );
        let id = id("default", "https://x.a.run.app");
        assert_eq!(policy.grant(&peer(5, 5), None, &id), Ok(Grant::AsAsked));
    }

    #[test]
    fn a_requested_boundary_beyond_the_rule_is_denied_naming_it() {
        // A later rule without a boundary does not widen what the first,
        // which decides, refused.
        let only = Policy::parse(Path::new("p.toml"), BOUNDED).unwrap();
        let asked = access("default", &[]).downscoped_to(boundary(BUCKET, "inRole:roles/owner"));
        let reason = only.grant(&peer(5, 5), None, &asked).unwrap_err().unwrap();
        assert!(reason.contains("inRole:roles/owner"), "{reason}");
        let within = access("default", &[]).downscoped_to(boundary(BUCKET, VIEWER));
        assert_eq!(
            only.grant(&peer(5, 5), None, &within),
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

    fn pod(namespace: &str, service_account: &str) -> Pod {
        Pod {
            uid: crate::peer::PodUid::parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").unwrap(),
            namespace: namespace.into(),
            name: "p-1".into(),
            service_account: service_account.into(),
        }
    }

    #[test]
    fn pod_matchers_match_only_peers_in_those_pods() {
        let policy = Policy::parse(
            Path::new("p.toml"),
            "[[allow]]\nnamespaces = [\"shop\"]\nservice_accounts = [\"default\"]\nscopes = [\"*\"]\n\n[[allow]]\nkubernetes_service_accounts = [\"batch/report\"]\nservice_accounts = [\"*\"]\nscopes = [\"*\"]\n",
        )
        .unwrap();
        let key = access("default", &[CLOUD]);
        let me = peer(5, 5);
        assert!(policy.grant(&me, Some(&pod("shop", "cart")), &key).is_ok());
        assert!(
            policy
                .grant(&me, Some(&pod("batch", "report")), &key)
                .is_ok()
        );
        assert!(
            policy
                .grant(&me, Some(&pod("batch", "other")), &key)
                .is_err()
        );
        assert!(
            policy
                .grant(&me, Some(&pod("other", "report")), &key)
                .is_err()
        );
        // A host process never matches a rule about pods, and a pod never
        // one about host processes.
        assert!(policy.grant(&me, None, &key).is_err());
        let host_only = Policy::parse(
            Path::new("p.toml"),
            "[[allow]]\nuids = [5]\nservice_accounts = [\"*\"]\nscopes = [\"*\"]\n",
        )
        .unwrap();
        assert!(host_only.grant(&me, None, &key).is_ok());
        assert!(
            host_only
                .grant(&me, Some(&pod("shop", "cart")), &key)
                .is_err()
        );
    }

    #[test]
    fn the_workload_table_binds_service_accounts_and_is_checked() {
        let policy = Policy::parse(
            Path::new("p.toml"),
            "[[workload]]\nnamespace = \"shop\"\nservice_account = \"cart\"\ngoogle_service_account = \"cart@p.iam.gserviceaccount.com\"\n",
        )
        .unwrap();
        assert_eq!(
            policy.workload_account("shop", "cart").map(|a| &**a),
            Some("cart@p.iam.gserviceaccount.com")
        );
        assert_eq!(policy.workload_account("shop", "other"), None);
        assert_eq!(policy.workload_account("other", "cart"), None);
        for (bad, says) in [
            (
                "namespace = \"\"\nservice_account = \"a\"\ngoogle_service_account = \"a@p.iam.gserviceaccount.com\"",
                "must not be empty",
            ),
            (
                "namespace = \"n\"\nservice_account = \"a\"\ngoogle_service_account = \"default\"",
                "not a service account email",
            ),
            (
                "namespace = \"n\"\nservice_account = \"a\"\ngoogle_service_account = \"nope\"",
                "not a service account email",
            ),
            (
                "namespace = \"n\"\nservice_account = \"a\"",
                "google_service_account",
            ),
        ] {
            let error = Policy::parse(Path::new("p.toml"), &format!("[[workload]]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
        let twice = "[[workload]]\nnamespace = \"n\"\nservice_account = \"a\"\ngoogle_service_account = \"a@p.iam.gserviceaccount.com\"\n";
        let error = Policy::parse(Path::new("p.toml"), &format!("{twice}{twice}"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("n/a is bound twice"), "{error}");
        let error = Policy::parse(
            Path::new("p.toml"),
            "[[allow]]\nkubernetes_service_accounts = [\"noslash\"]\nservice_accounts = []\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("not namespace/name"), "{error}");
    }
}
