//! The documentation agrees with the code: the flag table of
//! docs/configuration.md lists exactly the flags of `tokenbroker serve`,
//! with clap's environment variables and defaults, and the annotated
//! deploy/tokenbroker.toml shows exactly the keys the config file accepts.
//! Both sides come from clap, so a flag added to `serve` fails these tests
//! until it is documented. The module map of docs/architecture.md names
//! exactly the files under src/.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use clap::{ArgAction, CommandFactory};
use tokenbroker::config::Cli;
use tokenbroker::config::file::{ConfigFileError, ParseError};

const CONFIGURATION: &str = "docs/configuration.md";
const EXAMPLE: &str = "deploy/tokenbroker.toml";
const ARCHITECTURE: &str = "docs/architecture.md";

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// What clap says about one long flag of `serve`.
struct Flag {
    env: Option<String>,
    /// `None` without a default; `Some("false")` for a switch.
    default: Option<String>,
    switch: bool,
}

/// Every long flag of `serve` as `--help` shows it: global flags included,
/// hidden ones, `--help` and `--version` left out.
fn serve_flags() -> BTreeMap<String, Flag> {
    let mut cli = Cli::command();
    cli.build();
    let serve = cli
        .find_subcommand("serve")
        .expect("`serve` is a subcommand");
    serve
        .get_arguments()
        .filter(|arg| !arg.is_hide_set())
        .filter(|arg| {
            !matches!(
                arg.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
        })
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let defaults: Vec<_> = arg
                .get_default_values()
                .iter()
                .map(|value| value.to_string_lossy().into_owned())
                .collect();
            let flag = Flag {
                env: arg.get_env().map(|env| env.to_string_lossy().into_owned()),
                default: (!defaults.is_empty()).then(|| defaults.join(",")),
                switch: matches!(arg.get_action(), ArgAction::SetTrue),
            };
            Some((format!("--{long}"), flag))
        })
        .collect()
}

/// The cells of a Markdown table row (pipes escaped as `\|` stay in cells).
fn cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    let mut cells = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cells.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
    }
    cells.iter().map(|cell| cell.trim().to_string()).collect()
}

/// `text` without the backticks of a code span, if it is one.
fn code(text: &str) -> Option<&str> {
    text.strip_prefix('`')?.strip_suffix('`')
}

/// The rows of the table under `## Flags`: flag → (env cell, default cell).
fn documented_flags() -> BTreeMap<String, (String, String)> {
    let page = read(CONFIGURATION);
    let section = page
        .split("\n## Flags\n")
        .nth(1)
        .unwrap_or_else(|| panic!("{CONFIGURATION} has no `## Flags` section"));
    let section = section.split("\n## ").next().unwrap();
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `--")) {
        let cells = cells(line);
        assert!(cells.len() >= 3, "{CONFIGURATION}: short row {line:?}");
        let flag = code(&cells[0])
            .unwrap_or_else(|| panic!("{CONFIGURATION}: flag cell {:?}", cells[0]))
            .to_string();
        let previous = rows.insert(flag.clone(), (cells[1].clone(), cells[2].clone()));
        assert!(previous.is_none(), "{CONFIGURATION} lists {flag} twice");
    }
    assert!(!rows.is_empty(), "{CONFIGURATION}: no flag rows found");
    rows
}

#[test]
fn the_flag_table_lists_every_serve_flag_with_its_env_and_default() {
    let flags = serve_flags();
    let documented = documented_flags();
    let mut problems = Vec::new();
    for (name, flag) in &flags {
        let env = flag.env.as_deref().unwrap_or("none");
        let default = if flag.switch {
            "off".to_string()
        } else {
            match &flag.default {
                Some(default) => format!("`{default}`"),
                None => {
                    "no default (the cell says what happens instead: none, off, ...)".to_string()
                }
            }
        };
        let Some((env_cell, default_cell)) = documented.get(name) else {
            problems.push(format!(
                "{name} is missing: `serve` has it (env {env}, default {default})"
            ));
            continue;
        };
        let env_documented = code(env_cell).unwrap_or(env_cell);
        if env_documented != env {
            problems.push(format!(
                "{name}: env is {env_cell:?} in the table, but `serve` reads {env}"
            ));
        }
        let default_ok = if flag.switch {
            default_cell == "off"
        } else {
            match &flag.default {
                Some(value) => code(default_cell) == Some(value.as_str()),
                // Without a default the cell says what happens instead
                // ("none", "off", "the broker's"): any text but a value.
                None => code(default_cell).is_none(),
            }
        };
        if !default_ok {
            problems.push(format!(
                "{name}: default is {default_cell:?} in the table, but `serve` has {default}"
            ));
        }
    }
    for name in documented.keys().filter(|name| !flags.contains_key(*name)) {
        problems.push(format!(
            "{name} is in the table, but `serve` has no such flag (or it is hidden)"
        ));
    }
    assert!(
        problems.is_empty(),
        "{CONFIGURATION}'s flag table disagrees with `tokenbroker serve --help`:\n  {}",
        problems.join("\n  ")
    );
}

/// Whether the config file loader takes `key` as a key at all (whatever the
/// value): only an unknown key is refused before its value is looked at.
fn loader_accepts(key: &str) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenbroker.toml");
    std::fs::write(&path, format!("{key} = true\n")).unwrap();
    let args = [
        "tokenbroker".into(),
        "serve".into(),
        "--config".into(),
        path.into_os_string(),
    ];
    !matches!(
        tokenbroker::config::file::parse(args),
        Err(ParseError::ConfigFile(ConfigFileError::UnknownKey { .. }))
    )
}

/// The top-level keys of the annotated example: set ones, and commented-out
/// `# key = value` lines (before the first table, such as `[[sink]]`).
fn example_keys() -> BTreeSet<String> {
    let text = read(EXAMPLE);
    let table: toml::Table = text
        .parse()
        .unwrap_or_else(|error| panic!("{EXAMPLE}: {error}"));
    // Tables (`[[sink]]`) are not flags.
    let is_table = |value: &toml::Value| match value {
        toml::Value::Table(_) => true,
        toml::Value::Array(items) => items.first().is_some_and(toml::Value::is_table),
        _ => false,
    };
    let mut keys: BTreeSet<String> = table
        .iter()
        .filter(|(_, value)| !is_table(value))
        .map(|(key, _)| key.clone())
        .collect();
    for line in text.lines().take_while(|line| !line.starts_with('[')) {
        let Some(comment) = line.strip_prefix('#') else {
            continue;
        };
        let setting = comment.strip_prefix(' ').unwrap_or(comment);
        if !setting.starts_with(|c: char| c.is_ascii_lowercase()) {
            continue;
        }
        // Prose does not parse as TOML; a commented-out setting does.
        if let Ok(setting) = setting.parse::<toml::Table>() {
            keys.extend(setting.keys().cloned());
        }
    }
    keys
}

#[test]
fn the_annotated_config_file_shows_every_key() {
    let keys = example_keys();
    let mut problems = Vec::new();
    for (name, _) in serve_flags() {
        let key = name.trim_start_matches("--").replace('-', "_");
        if !keys.contains(&key) && loader_accepts(&key) {
            problems.push(format!(
                "`{key}` ({name}) is missing: add it, as `# {key} = ...` if setting it \
                 would change the default behaviour, with a one-line comment"
            ));
        }
    }
    for key in &keys {
        if !loader_accepts(key) {
            problems.push(format!(
                "`{key}` is not a key the config file accepts (no such `serve` flag, or one \
                 the file cannot set)"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{EXAMPLE} does not show exactly the config file's keys:\n  {}",
        problems.join("\n  ")
    );
}

/// The `.rs` files under `dir`, as paths relative to the crate root.
fn rust_files(dir: &Path, found: &mut BTreeSet<String>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(root.join(dir)).unwrap() {
        let path = dir.join(entry.unwrap().file_name());
        if root.join(&path).is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.insert(path.to_string_lossy().into_owned());
        }
    }
}

/// The files the module map lists: the first word of each line of the
/// code block after the `module-map` marker, under its `src/` heading.
fn mapped_files() -> BTreeSet<String> {
    let text = read(ARCHITECTURE);
    let (_, map) = text
        .split_once("<!-- module-map")
        .unwrap_or_else(|| panic!("{ARCHITECTURE} has no module-map marker"));
    let block = map.split("```").nth(1).expect("the map is a code block");
    block
        .lines()
        .skip_while(|line| line.trim() != "src/")
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .map(|file| format!("src/{file}"))
        .collect()
}

#[test]
fn the_module_map_names_every_source_file() {
    let mut files = BTreeSet::new();
    rust_files(Path::new("src"), &mut files);
    let mapped = mapped_files();
    let unmapped: Vec<_> = files.difference(&mapped).collect();
    let gone: Vec<_> = mapped.difference(&files).collect();
    assert!(
        unmapped.is_empty() && gone.is_empty(),
        "{ARCHITECTURE}'s module map is out of date: add {unmapped:?}, remove {gone:?}"
    );
}

/// The source and test files the README and docs/ name, as `src/...rs` or
/// `tests/...rs`, exist: files move, and prose is not compiled.
#[test]
fn every_file_the_docs_name_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        pages.push(entry.unwrap().path());
    }
    let mut missing = Vec::new();
    for page in pages {
        let text = std::fs::read_to_string(&page).unwrap();
        let names = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || "_/.-".contains(c)))
            .filter(|word| word.starts_with("src/") || word.starts_with("tests/"))
            .map(|word| word.trim_end_matches('.'))
            .filter(|word| word.ends_with(".rs"));
        for name in names {
            if !root.join(name).exists() {
                missing.push(format!("{}: {name}", page.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named but missing:\n  {}",
        missing.join("\n  ")
    );
}
