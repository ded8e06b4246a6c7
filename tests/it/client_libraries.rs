//! Unmodified Google auth libraries, pointed at the broker's
//! metadata-compatible endpoint with `GCE_METADATA_HOST`, share its cache:
//! many processes at once, in two languages, cause one upstream fetch per
//! key.

use std::path::Path;
use std::process::Output;

use tokenbroker::emulator::{DEFAULT_ACCOUNT, EmulatorConfig, Fault, FaultRule, PROJECT_ID};
use tokio::process::Command;

use crate::common::{self, Broker, claims, emulator, in_time};

const AUDIENCE: &str = "https://hello-abc123-uc.a.run.app";
/// Processes per language.
const PROCESSES: usize = 6;

/// A library program run as an unmodified application would be: only the
/// environment points it at the broker, and no other credentials exist.
fn library_program(program: &Path, script: &str, metadata: &str, home: &Path) -> Command {
    let mut command = Command::new(program);
    // Nothing of the developer's environment (project variables, proxies,
    // credentials) may steer the libraries.
    command
        .arg(common::root().join(script))
        .arg(AUDIENCE)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GCE_METADATA_HOST", metadata)
        .env("GCE_METADATA_IP", metadata)
        .env("HOME", home)
        .env("CLOUDSDK_CONFIG", home)
        .kill_on_drop(true);
    command
}

fn output_json(language: &str, output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{language} program failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "{language} printed no JSON: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[tokio::test]
async fn google_auth_libraries_in_many_processes_cause_one_fetch_per_key() {
    let (python, node_path) = (common::python().await, common::node_path().await);
    let emulator = emulator(EmulatorConfig::default()).await;
    // A slow metadata server, so that many requests arrive while the first
    // fetch is under way (how many overlap depends on the processes'
    // start-up; coalescing itself is unit-tested in src/cache.rs).
    emulator.set_fault(Some(FaultRule::always(Fault::Delay { millis: 500 })));
    let broker = Broker::start(&emulator, &["--metadata-addr", "127.0.0.1:0"]).await;
    let metadata = broker.metadata_addr().await.to_string();
    let home = tempfile::tempdir().unwrap();

    let mut runs = Vec::new();
    for _ in 0..PROCESSES {
        let mut python = library_program(
            &python,
            "tests/python/google_auth_client.py",
            &metadata,
            home.path(),
        );
        runs.push(("python", python.output()));
        let mut node = library_program(
            Path::new("node"),
            "tests/node/google_auth_client.js",
            &metadata,
            home.path(),
        );
        node.env("NODE_PATH", &node_path);
        runs.push(("node", node.output()));
    }
    let (languages, outputs): (Vec<_>, Vec<_>) = runs.into_iter().unzip();
    let outputs = in_time(
        "the programs finishing",
        futures_util::future::join_all(outputs),
    )
    .await;

    let mut access_tokens = Vec::new();
    let mut id_tokens = Vec::new();
    for (language, output) in languages.iter().zip(outputs) {
        let seen = output_json(language, &output.expect("the program runs"));
        assert_eq!(seen["project"], PROJECT_ID, "{language}: {seen}");
        access_tokens.push(seen["access_token"].as_str().unwrap().to_string());
        for field in ["fetch_id_token", "id_token_credentials", "id_token"] {
            if let Some(token) = seen[field].as_str() {
                id_tokens.push(token.to_string());
            }
        }
        if *language == "python" {
            assert_eq!(seen["credentials"], "Credentials", "{seen}");
            assert_eq!(seen["email"], DEFAULT_ACCOUNT);
        } else {
            assert_eq!(seen["client"], "Compute", "{seen}");
        }
    }
    assert_eq!(id_tokens.len(), 3 * PROCESSES);
    assert!(access_tokens.iter().all(|t| *t == access_tokens[0]));
    assert!(id_tokens.iter().all(|t| *t == id_tokens[0]));
    assert_eq!(claims(&id_tokens[0])["aud"], AUDIENCE);
    let info = emulator
        .token_info(&access_tokens[0])
        .expect("issued by the emulator");
    assert_eq!(info.email, DEFAULT_ACCOUNT);

    let stats = emulator.stats();
    assert_eq!(
        (stats.token_requests, stats.identity_requests),
        (1, 1),
        "{} processes, one fetch per key",
        2 * PROCESSES
    );
}
