//! `serve --config FILE`: a TOML file that sets any `serve` flag, and the
//! file sinks.
//!
//! The file is generic over the command line: a top-level key is a flag's
//! long name with `_` for `-` (`socket_mode = "0660"` for `--socket-mode`),
//! so every flag `serve` has, now or later, can be set there with no code of
//! its own. Values go through the flag's own parser. Precedence: a flag on
//! the command line, then its environment variable, then the file, then the
//! built-in default. `[[sink]]` tables configure the file sinks.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, CommandFactory, FromArgMatches};

use crate::config::{Cli, Command};
use crate::sink::SinkConfig;

/// The `serve` argument naming the file.
const CONFIG_ARG: &str = "config";
/// The key of the file sinks' tables.
const SINK_KEY: &str = "sink";
/// Arguments that cannot come from the file.
const NOT_IN_FILE: &[&str] = &[CONFIG_ARG, "help", "version"];

/// What `serve --help` says about the file.
pub const CONFIG_FILE_HELP: &str = "\
Config file (--config FILE, TOML):
  Any flag above, by its long name with '_' for '-', e.g.
      socket_mode = \"0660\"
      upstream_timeout = \"5s\"
      emulator = true
  and file sinks as [[sink]] tables (see deploy/tokenbroker.toml).
  A flag on the command line beats its environment variable, which beats
  the file, which beats the built-in default. Unknown keys are an error.";

/// Why the configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file cannot be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not TOML, or a `[[sink]]` table is malformed.
    #[error("config file {}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said.
        message: String,
    },
    /// A key names no `serve` flag.
    #[error(
        "config file {}: unknown key `{key}`{hint}; keys are `serve` flags with '_' for '-' (see `tokenbroker serve --help`) and [[sink]] tables",
        path.display()
    )]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// A suggestion, if the key is a near miss.
        hint: String,
    },
    /// A value has the wrong TOML type for its flag.
    #[error("config file {}: `{key}` {reason}", path.display())]
    WrongType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What was expected.
        reason: String,
    },
    /// A value failed the flag's own validation.
    #[error("config file {}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The flag parser's message.
        message: String,
    },
}

/// Why the command line cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Bad flags, or `--help`/`--version`: clap prints and exits.
    #[error(transparent)]
    Usage(#[from] clap::Error),
    /// A bad configuration file.
    #[error(transparent)]
    ConfigFile(#[from] ConfigFileError),
}

/// Parses the command line `args` (program name first), merging in the file
/// of `serve --config`, if any.
pub fn parse<I, T>(args: I) -> Result<Cli, ParseError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    parse_with(Cli::command(), args)
}

/// [`parse`] with the command line definition `command` (tests pass one
/// without environment fallbacks, so the developer's shell cannot change
/// their outcome).
fn parse_with<I, T>(mut command: clap::Command, args: I) -> Result<Cli, ParseError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    command.build();
    let matches = command.clone().try_get_matches_from(&args)?;
    let file = match matches.subcommand() {
        Some(("serve", serve)) => serve
            .get_one::<PathBuf>(CONFIG_ARG)
            .map(|path| (path.clone(), serve)),
        _ => None,
    };
    let Some((path, serve)) = file else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let serve_command = command
        .find_subcommand("serve")
        .expect("`serve` is a subcommand");
    let table = read(&path)?;
    let sinks = sinks(&path, &table)?;
    args.extend(file_arguments(&path, &table, serve_command, serve)?);
    let matches =
        command
            .try_get_matches_from(&args)
            .map_err(|error| ConfigFileError::Invalid {
                path: path.clone(),
                message: first_line(&error.render().to_string()),
            })?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let Command::Serve(serve) = &mut cli.command {
        serve.sinks = sinks;
    }
    Ok(cli)
}

fn read(path: &Path) -> Result<toml::Table, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    text.parse::<toml::Table>()
        .map_err(|error| ConfigFileError::Syntax {
            path: path.to_path_buf(),
            message: error.to_string(),
        })
}

fn sinks(path: &Path, table: &toml::Table) -> Result<Vec<SinkConfig>, ConfigFileError> {
    let Some(value) = table.get(SINK_KEY) else {
        return Ok(Vec::new());
    };
    let syntax = |message: String| ConfigFileError::Syntax {
        path: path.to_path_buf(),
        message,
    };
    let toml::Value::Array(tables) = value else {
        return Err(syntax(
            "`sink` must be a list of tables: write [[sink]]".into(),
        ));
    };
    tables
        .iter()
        .enumerate()
        .map(|(index, sink)| {
            sink.clone()
                .try_into::<SinkConfig>()
                .map_err(|error| syntax(format!("[[sink]] number {}: {error}", index + 1)))
        })
        .collect()
}

/// `--flag=value` arguments for the file's keys whose flag was given
/// neither on the command line nor in the environment.
fn file_arguments(
    path: &Path,
    table: &toml::Table,
    serve: &clap::Command,
    matches: &ArgMatches,
) -> Result<Vec<OsString>, ConfigFileError> {
    let mut arguments = Vec::new();
    for (key, value) in table {
        if key == SINK_KEY {
            continue;
        }
        let arg = find_arg(serve, key).ok_or_else(|| ConfigFileError::UnknownKey {
            path: path.to_path_buf(),
            key: key.clone(),
            hint: hint(serve, key),
        })?;
        let given = |arg: &Arg| {
            matches!(
                matches.value_source(arg.get_id().as_str()),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        // A flag given beats the file's value for it, and for any flag it
        // excludes (`--emulator` given, the file's `credentials` yields).
        let excluded_by_given = serve.get_arguments().any(|other| {
            given(other)
                && (serve.get_arg_conflicts_with(arg).contains(&other)
                    || serve.get_arg_conflicts_with(other).contains(&arg))
        });
        let overridden = given(arg) || excluded_by_given;
        if overridden {
            continue;
        }
        let long = arg.get_long().expect("file keys are long flags");
        arguments.extend(
            flag_values(arg, value)
                .map_err(|reason| ConfigFileError::WrongType {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    reason,
                })?
                .into_iter()
                .map(|value| match value {
                    Some(value) => OsString::from(format!("--{long}={value}")),
                    None => OsString::from(format!("--{long}")),
                }),
        );
    }
    Ok(arguments)
}

/// The argument a file key names, if it may be set from the file.
fn find_arg<'a>(serve: &'a clap::Command, key: &str) -> Option<&'a Arg> {
    serve.get_arguments().find(|arg| {
        arg.get_long()
            .is_some_and(|long| long.replace('-', "_") == key)
            && !NOT_IN_FILE.contains(&arg.get_id().as_str())
    })
}

fn hint(serve: &clap::Command, key: &str) -> String {
    if NOT_IN_FILE.contains(&key) {
        return format!(" (`{key}` cannot be set in the file itself)");
    }
    match find_arg(serve, &key.replace('-', "_")) {
        Some(_) => format!(" (did you mean `{}`?)", key.replace('-', "_")),
        None => String::new(),
    }
}

/// The values to pass for one key: `Some(value)` as `--flag=value`, `None`
/// as a bare `--flag`.
fn flag_values(arg: &Arg, value: &toml::Value) -> Result<Vec<Option<String>>, String> {
    match arg.get_action() {
        ArgAction::SetTrue => match value {
            toml::Value::Boolean(true) => Ok(vec![None]),
            toml::Value::Boolean(false) => Ok(Vec::new()),
            _ => Err("must be true or false".into()),
        },
        ArgAction::Append => match value {
            toml::Value::Array(items) => items.iter().map(|v| scalar(v).map(Some)).collect(),
            other => Ok(vec![Some(scalar(other)?)]),
        },
        action if action.takes_values() => match (value, arg.get_value_delimiter()) {
            (toml::Value::Array(items), Some(delimiter)) => {
                let items = items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?;
                Ok(vec![Some(items.join(&delimiter.to_string()))])
            }
            (toml::Value::Array(_), None) => Err("takes one value, not a list".into()),
            (other, _) => Ok(vec![Some(scalar(other)?)]),
        },
        _ => Err("cannot be set in the config file".into()),
    }
}

/// A TOML scalar as the text a flag would be given.
fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => {
            Err("must be a string, number or boolean".into())
        }
    }
}

/// The line of a clap error that says what is wrong (without usage text).
fn first_line(rendered: &str) -> String {
    rendered
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::ServeArgs;

    fn serve_with(file: &str, flags: &[&str]) -> Result<ServeArgs, ParseError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenbroker.toml");
        std::fs::write(&path, file).unwrap();
        let mut args = vec!["tokenbroker", "serve", "--config", path.to_str().unwrap()];
        args.extend(flags);
        match parse_with(without_env(), args)?.command {
            Command::Serve(serve) => Ok(serve),
            other => panic!("{other:?}"),
        }
    }

    /// The command line without environment fallbacks.
    fn without_env() -> clap::Command {
        Cli::command()
            .mut_args(|arg| arg.env(None))
            .mut_subcommand("serve", |serve| serve.mut_args(|arg| arg.env(None)))
    }

    fn error(file: &str) -> String {
        serve_with(file, &[]).unwrap_err().to_string()
    }

    #[test]
    fn the_file_sets_flags_by_their_long_names() {
        let serve = serve_with(
            r#"
            socket = "/tmp/from-file.sock"
            socket_mode = "0600"
            upstream_timeout = "7s"
            max_keys = 42
            emulator = true
            metrics_label_audience = false
            "#,
            &[],
        )
        .unwrap();
        assert_eq!(serve.socket, PathBuf::from("/tmp/from-file.sock"));
        assert_eq!(serve.socket_mode, 0o600);
        assert_eq!(serve.upstream_timeout, Duration::from_secs(7));
        assert_eq!(serve.max_keys, 42);
        assert!(serve.emulator);
        assert!(!serve.metrics_label_audience);
        // Not in the file: the default.
        assert_eq!(serve.refresh_margin, Duration::from_secs(300));
    }

    #[test]
    fn command_line_flags_beat_the_file() {
        let serve = serve_with(
            "socket_mode = \"0600\"\nmax_keys = 42\n",
            &["--socket-mode", "0666"],
        )
        .unwrap();
        assert_eq!(serve.socket_mode, 0o666);
        assert_eq!(serve.max_keys, 42);
    }

    #[test]
    fn a_flag_given_also_beats_the_file_values_it_excludes() {
        // `--emulator` conflicts with `--credentials`: given on the command
        // line, it wins over the file's `credentials` instead of clashing.
        let serve = serve_with("credentials = \"/etc/key.json\"\n", &["--emulator"]).unwrap();
        assert!(serve.emulator);
        assert_eq!(serve.credentials, None);
        let serve = serve_with("emulator = true\n", &["--credentials", "/etc/key.json"]).unwrap();
        assert!(!serve.emulator);
    }

    #[test]
    fn global_flags_can_be_set_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "log_format = \"json\"\n").unwrap();
        let cli = parse_with(
            without_env(),
            ["tokenbroker", "serve", "--config", path.to_str().unwrap()],
        )
        .unwrap();
        assert_eq!(cli.log_format, crate::telemetry::LogFormat::Json);
    }

    #[test]
    fn unknown_keys_are_named() {
        let message = error("socket_mod = \"0600\"\n");
        assert!(message.contains("unknown key `socket_mod`"), "{message}");
        let message = error("socket-mode = \"0600\"\n");
        assert!(message.contains("did you mean `socket_mode`?"), "{message}");
        let message = error("config = \"/etc/other.toml\"\n");
        assert!(message.contains("cannot be set in the file"), "{message}");
        let message = error("[policy]\npath = \"x\"\n");
        assert!(message.contains("`policy`"), "{message}");
    }

    #[test]
    fn bad_values_name_the_file_and_the_flag() {
        let message = error("socket_mode = \"999\"\n");
        assert!(message.contains("tokenbroker.toml"), "{message}");
        assert!(message.contains("--socket-mode"), "{message}");
        let message = error("idle_timeout = \"100000000000years\"\n");
        assert!(message.contains("--idle-timeout"), "{message}");
        let message = error("emulator = \"yes\"\n");
        assert!(
            message.contains("`emulator` must be true or false"),
            "{message}"
        );
        let message = error("socket = [\"a\", \"b\"]\n");
        assert!(message.contains("takes one value"), "{message}");
        let message = error("socket = \n");
        assert!(message.contains("tokenbroker.toml"), "{message}");
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let result = parse_with(
            without_env(),
            [
                "tokenbroker",
                "serve",
                "--config",
                "/nonexistent/tokenbroker.toml",
            ],
        );
        let message = result.unwrap_err().to_string();
        assert!(
            message.contains("cannot read config file /nonexistent/tokenbroker.toml"),
            "{message}"
        );
    }

    #[test]
    fn sinks_are_read_and_checked_for_unknown_keys() {
        let serve = serve_with(
            r#"
            [[sink]]
            path = "/run/app/token"
            id_token = { audience = "https://a.run.app" }
            "#,
            &[],
        )
        .unwrap();
        assert_eq!(serve.sinks.len(), 1);
        assert_eq!(serve.sinks[0].path, PathBuf::from("/run/app/token"));
        let message = error("[[sink]]\npath = \"/x\"\nmoed = \"0600\"\n");
        assert!(
            message.contains("[[sink]] number 1") && message.contains("moed"),
            "{message}"
        );
        let message = error("[sink]\npath = \"/x\"\n");
        assert!(message.contains("write [[sink]]"), "{message}");
    }

    #[test]
    fn the_annotated_example_is_valid() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tokenbroker.toml");
        let cli = parse_with(
            without_env(),
            [
                OsString::from("tokenbroker"),
                "serve".into(),
                "--config".into(),
                example.into(),
            ],
        )
        .unwrap();
        let Command::Serve(serve) = cli.command else {
            panic!()
        };
        assert!(!serve.sinks.is_empty());
        for sink in serve.sinks {
            crate::sink::Sink::from_config(sink).unwrap();
        }
    }

    #[test]
    fn other_subcommands_are_untouched() {
        let cli = parse_with(
            without_env(),
            ["tokenbroker", "token", "id", "--audience", "https://a"],
        )
        .unwrap();
        assert!(matches!(cli.command, Command::Token(_)));
    }
}
