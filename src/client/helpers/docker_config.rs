//! `tokenbroker configure-docker`: names the broker's helper for Google's
//! registries in docker's `config.json` (`credHelpers`), keeping every
//! other key. The old file is kept as `config.json.bak`, the new one
//! replaces it atomically, and a file that is not JSON is never touched.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::{Map, Value, json};

use super::docker::{GOOGLE_REGISTRIES, HELPER_NAME};
use super::{HostPattern, any_matches, with_defaults};
use crate::client::cli::CliError;

/// The name `credHelpers` gives the helper (docker runs
/// `docker-credential-` + this).
pub const HELPER: &str = "tokenbroker";

/// Registries configured without `--registries`: Container Registry's
/// hosts, as `gcloud auth configure-docker` does.
pub const DEFAULT_REGISTRIES: [&str; 5] = [
    "gcr.io",
    "us.gcr.io",
    "eu.gcr.io",
    "asia.gcr.io",
    "marketplace.gcr.io",
];

/// Largest config file read (1 MiB).
const MAX_CONFIG: u64 = 1024 * 1024;

/// `tokenbroker configure-docker`.
#[derive(Debug, Args)]
pub struct ConfigureDockerArgs {
    /// Registry hosts to configure (repeat or separate with commas), e.g.
    /// us-docker.pkg.dev,europe-west1-docker.pkg.dev for Artifact
    /// Registry; default: gcr.io and its regional hosts.
    #[arg(long, value_delimiter = ',')]
    pub registries: Vec<HostPattern>,

    /// docker's configuration directory (default $DOCKER_CONFIG, else
    /// ~/.docker).
    #[arg(long, env = "DOCKER_CONFIG")]
    pub config_dir: Option<PathBuf>,
}

/// What `configure-docker` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every registry already named the helper: nothing was written.
    Unchanged,
    /// The file was written (the old one, if any, kept as a backup).
    Written {
        /// The backup of the old file, if there was one.
        backup: Option<PathBuf>,
    },
}

/// Runs `configure-docker` and says what it did on stderr.
pub fn run(args: ConfigureDockerArgs) -> Result<(), CliError> {
    // An empty DOCKER_CONFIG is unset, as docker reads it.
    let dir = match args.config_dir.filter(|dir| !dir.as_os_str().is_empty()) {
        Some(dir) => dir,
        None => std::env::var_os("HOME")
            .map(|home| Path::new(&home).join(".docker"))
            .ok_or_else(|| {
                CliError::Usage("HOME is not set; give --config-dir or DOCKER_CONFIG".into())
            })?,
    };
    let registries: Vec<String> = if args.registries.is_empty() {
        DEFAULT_REGISTRIES.iter().map(|r| r.to_string()).collect()
    } else {
        let wildcard = args.registries.iter().find(|r| !r.is_exact());
        if let Some(wildcard) = wildcard {
            return Err(CliError::Usage(format!(
                "--registries {}: docker looks credHelpers up by exact host, so name hosts without *",
                wildcard.as_str()
            )));
        }
        args.registries
            .iter()
            .map(|r| r.as_str().to_string())
            .collect()
    };
    let path = dir.join("config.json");
    match configure(&path, &registries)? {
        Outcome::Unchanged => eprintln!(
            "{} already sends {} to the tokenbroker helper; nothing changed",
            path.display(),
            registries.join(", ")
        ),
        Outcome::Written { backup } => {
            eprintln!(
                "{}: {} now use the tokenbroker helper{}",
                path.display(),
                registries.join(", "),
                backup.map_or_else(String::new, |b| format!(
                    " (the old file is {})",
                    b.display()
                ))
            );
        }
    }
    let google = with_defaults(&GOOGLE_REGISTRIES, &[]);
    for registry in registries.iter().filter(|r| !any_matches(&google, r)) {
        eprintln!(
            "note: {registry} is not a Google registry; the helper answers for it only with TOKENBROKER_DOCKER_REGISTRIES={registry} in docker's environment"
        );
    }
    if !on_path(HELPER_NAME) {
        eprintln!(
            "note: docker runs {HELPER_NAME}, which is not on PATH; link it: ln -s \"$(command -v tokenbroker)\" /usr/local/bin/{HELPER_NAME}"
        );
    }
    Ok(())
}

/// Sets `credHelpers[registry] = "tokenbroker"` for each registry in the
/// config file at `path` (created, with its directory, if missing).
pub fn configure(path: &Path, registries: &[String]) -> Result<Outcome, CliError> {
    let refuse = |reason: String| CliError::Usage(format!("{}: {reason}", path.display()));
    // A link (into a dotfiles repository) stays a link: its target changes.
    let path = &match fs::canonicalize(path) {
        Ok(target) => target,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => path.to_path_buf(),
        Err(error) => return Err(refuse(error.to_string())),
    };
    let old = match fs::metadata(path) {
        Ok(meta) if !meta.is_file() => {
            return Err(refuse("not a regular file; not changed".into()));
        }
        Ok(_) => Some(read_bounded(path).map_err(&refuse)?),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(refuse(error.to_string())),
    };
    let mut config = match &old {
        None => Map::new(),
        Some(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Map::new(),
        Some(bytes) => match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(config)) => config,
            Ok(_) | Err(_) => {
                return Err(refuse(
                    "not a JSON object; fix or move it first (it was not changed)".into(),
                ));
            }
        },
    };
    let helpers = config.entry("credHelpers").or_insert_with(|| json!({}));
    let Some(helpers) = helpers.as_object_mut() else {
        return Err(refuse(
            "credHelpers is not a JSON object; fix it first (the file was not changed)".into(),
        ));
    };
    let mut changed = false;
    for registry in registries {
        if helpers.get(registry).and_then(Value::as_str) != Some(HELPER) {
            helpers.insert(registry.clone(), json!(HELPER));
            changed = true;
        }
    }
    if !changed {
        return Ok(Outcome::Unchanged);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.exists() {
        // As docker creates it: only its user may look inside.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| refuse(format!("cannot create its directory: {e}")))?;
    }
    let kept = fs::metadata(path).ok().map(|meta| {
        use std::os::unix::fs::MetadataExt;
        (meta.permissions().mode() & 0o7777, meta.uid(), meta.gid())
    });
    let (mode, owner) = match kept {
        Some((mode, uid, gid)) => (mode, Some((uid, gid))),
        None => (0o600, None),
    };
    let backup = match &old {
        Some(bytes) => {
            let backup = free_backup_name(path);
            write_new(&backup, bytes, mode, owner)
                .map_err(|e| refuse(format!("cannot write the backup: {e}")))?;
            Some(backup)
        }
        None => None,
    };
    let mut text =
        serde_json::to_string_pretty(&Value::Object(config)).map_err(|e| refuse(e.to_string()))?;
    text.push('\n');
    write_new(path, text.as_bytes(), mode, owner)
        .map_err(|e| refuse(format!("cannot write it: {e}")))?;
    Ok(Outcome::Written { backup })
}

/// The file's bytes, refusing one larger than [`MAX_CONFIG`] however it
/// grows while read.
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|file| file.take(MAX_CONFIG + 1).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_CONFIG {
        return Err(format!("larger than {MAX_CONFIG} bytes; not changed"));
    }
    Ok(bytes)
}

/// `config.json.bak`, or if that is taken (an earlier run's, or the
/// user's own) `config.json.bak.N`: no backup is ever overwritten.
fn free_backup_name(path: &Path) -> PathBuf {
    let first = path.with_extension("json.bak");
    if !first.exists() {
        return first;
    }
    (1..=1000)
        .map(|n| path.with_extension(format!("json.bak.{n}")))
        .find(|candidate| !candidate.exists())
        .unwrap_or_else(|| path.with_extension(format!("json.bak.{}", std::process::id())))
}

/// Replaces `path` with `contents` atomically: a new file beside it, with
/// `mode` (whatever the umask) and `owner` (the old file's), synced, then
/// renamed over it.
fn write_new(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = path.with_file_name(format!(".{name}.tokenbroker-{}", std::process::id()));
    let written = (|| {
        let mut file: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            // Run by root for another user's file: it stays theirs.
            let ours = (nix_uid(), nix_gid());
            if ours != (uid, gid) {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
            }
        }
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

fn nix_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

fn nix_gid() -> u32 {
    nix::unistd::getgid().as_raw()
}

/// Whether a program named `name` is on `PATH`.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registries() -> Vec<String> {
        vec!["us-docker.pkg.dev".into()]
    }

    #[test]
    fn a_missing_file_is_created_with_the_helper() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker").join("config.json");
        assert_eq!(
            configure(&path, &registries()).unwrap(),
            Outcome::Written { backup: None }
        );
        let config: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            config,
            json!({"credHelpers": {"us-docker.pkg.dev": "tokenbroker"}})
        );
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn an_existing_file_keeps_its_keys_and_a_backup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let old = r#"{"auths": {"ghcr.io": {"auth": "x"}}, "credHelpers": {"gcr.io": "gcloud"}, "psFormat": "table"}"#;
        fs::write(&path, old).unwrap();
        let outcome = configure(&path, &registries()).unwrap();
        let backup = dir.path().join("config.json.bak");
        assert_eq!(
            outcome,
            Outcome::Written {
                backup: Some(backup.clone())
            }
        );
        assert_eq!(fs::read_to_string(&backup).unwrap(), old);
        let config: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(config["auths"]["ghcr.io"]["auth"], "x");
        assert_eq!(config["psFormat"], "table");
        assert_eq!(config["credHelpers"]["gcr.io"], "gcloud");
        assert_eq!(config["credHelpers"]["us-docker.pkg.dev"], "tokenbroker");
        let written = fs::read(&path).unwrap();
        assert_eq!(configure(&path, &registries()).unwrap(), Outcome::Unchanged);
        assert_eq!(
            fs::read(&path).unwrap(),
            written,
            "unchanged means not written"
        );
    }

    #[test]
    fn a_linked_file_keeps_its_link_and_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("dotfiles-config.json");
        fs::write(&target, "{}").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("config.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        configure(&link, &registries()).unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let config: Value = serde_json::from_slice(&fs::read(&target).unwrap()).unwrap();
        assert_eq!(config["credHelpers"]["us-docker.pkg.dev"], "tokenbroker");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }

    #[test]
    fn a_file_that_is_not_json_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        for bad in ["{\"auths\": ", "[1, 2]", "{\"credHelpers\": []}"] {
            fs::write(&path, bad).unwrap();
            let error = configure(&path, &registries()).unwrap_err().to_string();
            assert!(error.contains("config.json"), "{error}");
            assert_eq!(fs::read_to_string(&path).unwrap(), bad);
            assert!(!dir.path().join("config.json.bak").exists());
        }
    }
}
