//! `tokenbroker configure-docker`: names the broker's helper for Google's
//! registries in docker's `config.json` (`credHelpers`), keeping every
//! other key. The old file is kept as `config.json.bak`, the new one
//! replaces it atomically, and a file that is not JSON is never touched.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::{Map, Value, json};

use super::HostPattern;
use super::docker::HELPER_NAME;
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
    let dir = match args.config_dir {
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
    let old = match fs::metadata(path) {
        Ok(meta) if meta.len() > MAX_CONFIG => {
            return Err(refuse(format!(
                "larger than {MAX_CONFIG} bytes; not changed"
            )));
        }
        Ok(_) => Some(fs::read(path).map_err(|e| refuse(e.to_string()))?),
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
    fs::create_dir_all(dir).map_err(|e| refuse(format!("cannot create its directory: {e}")))?;
    let mode = fs::metadata(path).map_or(0o600, |meta| meta.permissions().mode() & 0o7777);
    let backup = match &old {
        Some(bytes) => {
            let backup = path.with_extension("json.bak");
            write_new(&backup, bytes, mode)
                .map_err(|e| refuse(format!("cannot write the backup: {e}")))?;
            Some(backup)
        }
        None => None,
    };
    let mut text =
        serde_json::to_string_pretty(&Value::Object(config)).map_err(|e| refuse(e.to_string()))?;
    text.push('\n');
    write_new(path, text.as_bytes(), mode).map_err(|e| refuse(format!("cannot write it: {e}")))?;
    Ok(Outcome::Written { backup })
}

/// Replaces `path` with `contents` atomically: a new file beside it, with
/// `mode`, synced, then renamed over it.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = path.with_file_name(format!(".{name}.tokenbroker-{}", std::process::id()));
    let written = (|| {
        let mut file: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
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
