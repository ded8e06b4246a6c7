//! The soak at reduced scale: a minute of load on the real broker, with
//! 20-second tokens, key churn, 200 watch streams being reopened,
//! invalidations and an upstream fault every 10 s (`loadgen soak` runs the
//! same code at full scale). It fails on any bad token handed out, on any
//! descriptor or task not given back once the load stops and keys idle
//! out, and on any second with more upstream requests than the limit.

// `loadgen` uses the rest (the scale of a full run).
#[allow(dead_code)]
#[path = "../../examples/loadgen/soak.rs"]
mod engine;

use crate::common::{self, BINARY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_soak_hands_out_no_bad_token_and_leaks_nothing() {
    let mut broker = std::process::Command::new(BINARY);
    common::scrub_std_env(&mut broker);
    let config = engine::SoakConfig::reduced();
    let (watchers, intervals) = (
        config.watchers,
        config.duration.as_secs() / config.interval.as_secs(),
    );
    let report = engine::run(config, broker, |sample| eprintln!("soak: {sample:?}")).await;
    let summary = || {
        let log = std::fs::read_to_string(&report.broker_log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        format!(
            "{:#?}\n{:#?}\nbroker log (last lines, newest first):\n{}",
            report.checks,
            report.bad_examples,
            tail.join("\n")
        )
    };
    for target in [
        "no bad token",
        "upstream rate within the limit",
        "descriptors back to baseline",
        "tasks back to baseline",
        "keys and watchers gone",
    ] {
        let held = report
            .checks
            .iter()
            .any(|check| check.name == target && check.ok);
        assert!(held, "{target}: {}", summary());
    }
    // The load happened as meant: every interval, calls on cached keys
    // and refreshed tokens pushed to the watchers; the faults cost calls
    // on new keys.
    assert_eq!(report.samples.len() as u64, intervals);
    assert_eq!(report.faults.len() as u64, intervals);
    for sample in &report.samples {
        assert!(sample.hits > 0 && sample.watch_tokens > 0, "{sample:?}");
    }
    let refresh_generations =
        report.config.duration.as_secs() / report.config.token_lifetime.as_secs();
    assert!(
        report.tokens_checked > watchers as u64 * refresh_generations,
        "{} tokens checked",
        report.tokens_checked
    );
    assert!(
        report.errors.contains_key("Unavailable"),
        "{:?}",
        report.errors
    );
}
