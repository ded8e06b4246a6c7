//! Which paths besides tokens the endpoint passes through to the metadata
//! server (`--metadata-passthrough`): by default (`safe`) exactly what
//! Google's client libraries read; everything (`all`); or nothing
//! (`none`). The rest, instance attributes first (on a Kubernetes node
//! `kube-env` holds kubelet credentials), is concealed.

/// `--metadata-passthrough`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reveal {
    /// Every path under `/computeMetadata/v1/` (tokens aside).
    All,
    /// What Google's client libraries read, and nothing else.
    #[default]
    Safe,
    /// Tokens only.
    None,
}

/// The leaves `safe` passes, below `/computeMetadata/v1/`, exactly.
const SAFE_LEAVES: [&str; 7] = [
    "project/project-id",
    "project/numeric-project-id",
    "instance/zone",
    "instance/id",
    "instance/hostname",
    "instance/region",
    "universe/universe-domain",
];
/// Directories `safe` lists, names only (not `?recursive`): Node's
/// google-auth-library probes `instance` to decide it runs on Google Cloud.
const SAFE_DIRECTORIES: [&str; 4] = ["instance", "instance/", "project", "project/"];
/// The accounts' subtree; the endpoint's routing already limits it to the
/// listing and each account's directory, `email`, `aliases` and `scopes`.
const ACCOUNTS: &str = "instance/service-accounts/";

/// The body of a concealed path's 404.
pub const CONCEALED: &str = "not found: concealed by the broker, which passes through only what Google's client libraries read (--metadata-passthrough safe); --metadata-passthrough all passes everything\n";

impl Reveal {
    /// Whether `path` (below `/computeMetadata/v1/`, as routed: plain
    /// segments only) with `query` may be passed through.
    pub fn allows(self, path: &str, query: &str) -> bool {
        match self {
            Self::All => true,
            Self::None => false,
            Self::Safe => {
                path.starts_with(ACCOUNTS)
                    || SAFE_LEAVES.contains(&path)
                    || (SAFE_DIRECTORIES.contains(&path) && only_plain_parameters(query))
            }
        }
    }
}

/// The query parameters a listing may carry and still show names only.
const PLAIN_PARAMETERS: [&str; 4] = ["alt", "wait_for_change", "last_etag", "timeout_sec"];

/// Whether `query` holds only [`PLAIN_PARAMETERS`], spelled exactly: any
/// other name, or a spelling the metadata server might read as
/// `recursive` (another case, an escape, a `+`, a `;`), is refused rather
/// than guessed at.
pub fn only_plain_parameters(query: &str) -> bool {
    // Some servers split parameters on `;` too.
    !query.contains(';')
        && query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .all(|pair| PLAIN_PARAMETERS.contains(&pair.split('=').next().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_passes_what_the_libraries_read() {
        for (path, query) in [
            ("project/project-id", ""),
            ("project/numeric-project-id", "alt=json"),
            ("instance/zone", ""),
            ("instance/id", ""),
            ("instance/hostname", ""),
            ("instance/region", ""),
            ("universe/universe-domain", ""),
            ("instance", ""),
            ("instance/", ""),
            ("project/", "alt=json"),
            (
                "instance/",
                "wait_for_change=true&last_etag=x&timeout_sec=5",
            ),
            ("instance/service-accounts/", "recursive=true"),
            ("instance/service-accounts/default/", "recursive=true"),
            ("instance/service-accounts/default/email", ""),
        ] {
            assert!(Reveal::Safe.allows(path, query), "{path}?{query}");
            assert!(Reveal::All.allows(path, query));
            assert!(!Reveal::None.allows(path, query));
        }
    }

    #[test]
    fn safe_conceals_everything_else_in_every_spelling() {
        for (path, query) in [
            ("instance/attributes/kube-env", ""),
            ("instance/attributes/", ""),
            ("instance/attributes", ""),
            ("project/attributes/ssh-keys", ""),
            ("", ""),
            ("", "recursive=true"),
            ("instance", "recursive=true"),
            ("instance/", "RECURSIVE=true"),
            ("instance/", "recursive"),
            ("instance/", "alt=json&recursive=1"),
            ("instance/", "%72ecursive=true"),
            ("project", "x=1;recursive=true"),
            ("instance/", "?recursive=true"),
            ("instance/", "+recursive=true"),
            ("instance/", "recursive+=true"),
            ("instance/", "recur%C5%BFive=true"),
            ("instance/", "recursive%00=true"),
            ("instance/", "alt=json;recursive=true"),
            ("project/project-id/", ""),
            ("Project/project-id", ""),
            ("instance/Zone", ""),
            ("instance/zone/extra", ""),
        ] {
            assert!(!Reveal::Safe.allows(path, query), "{path}?{query}");
        }
        assert!(Reveal::All.allows("instance/attributes/kube-env", ""));
    }
}
