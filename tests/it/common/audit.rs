//! Reading the audit log (`--audit-log`) a broker under test writes.

use std::path::Path;

use serde_json::Value;

use super::poll_until;

/// The complete lines of the audit log at `path`, parsed. A line still
/// being written (no newline yet) is left for the next read, as `tail -f`
/// would: a batch of lines is one write, but a reader may see part of it.
pub fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// Waits until the audit log at `path` holds `count` lines.
pub async fn wait_for_lines(path: &Path, count: usize) -> Vec<Value> {
    poll_until(
        "the audit lines",
        || lines(path).len() >= count,
        || format!("{:#?}", lines(path)),
    )
    .await;
    lines(path)
}

/// Waits until the audit log at `path` holds a line `matches`; returns the
/// first such line.
pub async fn wait_for_line(path: &Path, matches: impl Fn(&Value) -> bool) -> Value {
    poll_until(
        "the audit line",
        || lines(path).iter().any(&matches),
        || format!("{:#?}", lines(path)),
    )
    .await;
    lines(path).into_iter().find(|line| matches(line)).unwrap()
}
