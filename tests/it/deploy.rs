//! The deployment files in `deploy/` and the `Dockerfile`: the systemd units
//! pass `systemd-analyze verify`, the Kubernetes manifests are well formed
//! and their broker configuration works, the Dockerfile builds a non-root
//! multi-stage image.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::common::http::get_local;
use crate::common::{self, BINARY, Broker, output, root, succeeds};

/// The units, copied with `ExecStart` pointing at the binary under test
/// (`verify` checks that the command exists).
fn units_for_verify(dir: &Path) -> Vec<PathBuf> {
    ["tokenbroker.socket", "tokenbroker.service"]
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(root().join("deploy/systemd").join(name)).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, text.replace("/usr/local/bin/tokenbroker", BINARY)).unwrap();
            path
        })
        .collect()
}

async fn systemd_analyze(args: &[&str], units: &[PathBuf]) -> std::process::Output {
    common::install_test_deps(&["tools"]).await;
    output(Command::new("systemd-analyze").args(args).args(units)).await
}

#[tokio::test]
async fn the_systemd_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let units = units_for_verify(dir.path());
    let output = systemd_analyze(&["verify"], &units).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // verify exits 0 on unknown keys and bad values, but reports them.
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "{stderr}"
    );

    let mut broken = std::fs::read_to_string(&units[1]).unwrap();
    broken = broken.replace("ProtectSystem=strict", "ProtectSystem=strickt");
    std::fs::write(&units[1], broken).unwrap();
    let output = systemd_analyze(&["verify"], &units).await;
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("strickt"),
        "verify catches a bad value"
    );
}

#[tokio::test]
async fn the_service_is_hardened_and_socket_activated() {
    let unit = std::fs::read_to_string(root().join("deploy/systemd/tokenbroker.service")).unwrap();
    for line in [
        "Type=notify",
        "Requires=tokenbroker.socket",
        "User=tokenbroker",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet=",
        "ExecStart=/usr/local/bin/tokenbroker serve --config /etc/tokenbroker/tokenbroker.toml",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line:?}");
    }
    let socket = std::fs::read_to_string(root().join("deploy/systemd/tokenbroker.socket")).unwrap();
    for line in [
        "ListenStream=/run/tokenbroker/tokenbroker.sock",
        "SocketMode=0660",
        "SocketGroup=tokenbroker",
    ] {
        assert!(socket.lines().any(|l| l == line), "missing {line:?}");
    }

    // systemd's own rating of the sandbox: 0 (locked down) to 10 (unsafe).
    let dir = tempfile::tempdir().unwrap();
    let units = units_for_verify(dir.path());
    let output = systemd_analyze(&["security", "--offline=yes"], &units[1..]).await;
    let report = String::from_utf8_lossy(&output.stdout);
    let exposure: f64 = report
        .split("Overall exposure level for tokenbroker.service: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|level| level.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(exposure <= 2.0, "exposure {exposure}:\n{report}");
}

/// What `tests/deploy/check_manifests.py` found in the manifests.
async fn checked_manifests() -> serde_json::Value {
    let checked = succeeds(
        Command::new(common::python().await)
            .arg(root().join("tests/deploy/check_manifests.py"))
            .arg(root().join("deploy/kubernetes")),
    )
    .await;
    serde_json::from_str(&checked).unwrap()
}

/// `kubernetes-validate --strict` (the API's JSON schemas, unknown fields
/// refused) on `files`.
async fn schema_check(files: &[PathBuf]) -> std::process::Output {
    let python = common::python().await;
    output(
        Command::new(python.with_file_name("kubernetes-validate"))
            .args(["--strict", "--quiet", "--kubernetes-version", "1.33"])
            .args(files),
    )
    .await
}

#[tokio::test]
async fn the_kubernetes_manifests_match_the_api_schemas() {
    let files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(files.len() >= 3);
    let output = schema_check(&files).await;
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // A misspelt field is caught.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("daemonset.yaml");
    let text = std::fs::read_to_string(root().join("deploy/kubernetes/daemonset.yaml")).unwrap();
    std::fs::write(&broken, text.replace("readinessProbe:", "readinesProbe:")).unwrap();
    let refused = schema_check(&[broken]).await;
    assert!(!refused.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        said.contains("readinesProbe"),
        "refused for another reason: {said}"
    );
}

#[tokio::test]
async fn the_kubernetes_manifests_are_valid_and_their_config_serves_the_probes() {
    let checked = checked_manifests().await;
    let configs = checked["configs"].as_array().unwrap();
    assert!(
        configs.len() >= 2,
        "both DaemonSets' ConfigMaps hold a tokenbroker.toml"
    );
    assert_eq!(
        checked["cluster_roles"],
        serde_json::json!(["tokenbroker-workload-identity"])
    );
    assert_eq!(
        checked["workload_identity"],
        serde_json::json!(["tokenbroker"])
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenbroker.toml");

    // Every broker's args parse, with its own ConfigMap's file in place.
    for broker in checked["brokers"].as_array().unwrap() {
        std::fs::write(&config, broker["config"].as_str().unwrap()).unwrap();
        let mut argv = vec!["tokenbroker".to_string()];
        let mut args = broker["args"].as_array().unwrap().iter();
        while let Some(arg) = args.next().map(|a| a.as_str().unwrap()) {
            argv.push(arg.to_string());
            if arg == "--config" {
                args.next();
                argv.push(config.to_str().unwrap().to_string());
            }
        }
        tokenbroker::config::file::parse(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    }

    for (index, text) in configs.iter().enumerate() {
        std::fs::write(&config, text.as_str().unwrap()).unwrap();
        // Each DaemonSet's configuration, run for real (on the emulator,
        // its fake Kubernetes API for workload identity, a free port
        // instead of 9464 and a metadata socket of its own in a temporary
        // directory): the probes' paths answer.
        let socket = dir.path().join(format!("metadata-{index}.sock"));
        let metadata = format!("unix:{}", socket.display());
        let broker = Broker::emulated(&[
            "--config",
            config.to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:0",
            "--metadata-addr",
            &metadata,
        ])
        .await;
        let addr = broker.metrics_addr().await;
        assert_eq!(get_local(addr, "/healthz").await.status, 200);
        // /readyz turns 200 once the start-up probe of the metadata server
        // succeeded (and the pods were read), which the broker logs.
        broker.wait_until_serving().await;
        assert_eq!(get_local(addr, "/readyz").await.status, 200);
    }
}

#[test]
fn the_dockerfile_builds_a_small_non_root_image_in_stages() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    // Instructions, with continuation lines joined and comments dropped.
    let joined = text.replace("\\\n", " ");
    let instructions: Vec<(String, String)> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (op, rest) = l.split_once(' ').unwrap_or((l, ""));
            (op.to_ascii_uppercase(), rest.trim().to_string())
        })
        .collect();
    let known = [
        "FROM",
        "RUN",
        "COPY",
        "WORKDIR",
        "USER",
        "ENV",
        "ENTRYPOINT",
        "CMD",
        "ARG",
        "LABEL",
    ];
    for (op, _) in &instructions {
        assert!(known.contains(&op.as_str()), "unknown instruction {op}");
    }
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (op, _))| op == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "multi-stage");
    for &i in &stages {
        let image = instructions[i].1.split_whitespace().next().unwrap();
        assert!(
            image.contains(':') && !image.ends_with(":latest"),
            "{image}: pin a tag"
        );
    }
    let build_stage = instructions[stages[0]].1.split_whitespace().last().unwrap();
    let runtime = &instructions[*stages.last().unwrap()..];
    assert!(
        runtime[0].1.starts_with("debian:") && runtime[0].1.contains("slim"),
        "small runtime base: {}",
        runtime[0].1
    );
    assert!(
        runtime
            .iter()
            .any(|(op, rest)| op == "COPY" && rest.starts_with(&format!("--from={build_stage} "))),
        "the runtime stage copies the binary from the build stage"
    );
    let user = runtime
        .iter()
        .rev()
        .find(|(op, _)| op == "USER")
        .map(|(_, user)| user.clone())
        .expect("the runtime stage sets USER");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("numeric uid");
    assert_ne!(uid, 0, "non-root");
    assert_eq!(uid, 10001, "the uid the Kubernetes manifests run as");
    let entrypoint = &runtime.iter().find(|(op, _)| op == "ENTRYPOINT").unwrap().1;
    let entrypoint: Vec<String> = serde_json::from_str(entrypoint).expect("exec form");
    assert_eq!(entrypoint, ["/usr/local/bin/tokenbroker"]);
    // Every COPY source from the build context exists.
    for (op, rest) in &instructions {
        if op == "COPY" && !rest.starts_with("--from") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            for source in &parts[..parts.len() - 1] {
                assert!(
                    root().join(source).exists(),
                    "COPY source {source} is missing"
                );
            }
        }
    }
    // The build stage's Rust is at least the crate's rust-version.
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let rust_version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    let image_version = instructions[stages[0]]
        .1
        .split(':')
        .nth(1)
        .unwrap()
        .split('-')
        .next()
        .unwrap();
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().unwrap()).collect() };
    assert!(parse(image_version) >= parse(rust_version));
}

/// The first `sh` block in the section `heading` (a whole line, e.g.
/// `## Run on Kubernetes`) of the Markdown file `path`.
fn doc_block(path: &str, heading: &str) -> String {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    let section = text
        .split(&format!("\n{heading}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("{path} has no section {heading:?}"));
    let section = section.split("\n## ").next().unwrap();
    let block = section
        .split("```sh\n")
        .nth(1)
        .unwrap_or_else(|| panic!("{path}, {heading:?}: no sh block"));
    block.split("```").next().unwrap().to_string()
}

/// The install and deploy commands in docs/deploy.md need a systemd
/// machine, a Docker daemon or a cluster, which CI lacks: check that they
/// name files that exist and agree with the units and manifests they
/// install.
#[test]
fn the_documented_install_commands_match_the_deploy_files() {
    let install = doc_block("docs/deploy.md", "## Install as a systemd service");
    let service =
        std::fs::read_to_string(root().join("deploy/systemd/tokenbroker.service")).unwrap();
    let socket = std::fs::read_to_string(root().join("deploy/systemd/tokenbroker.socket")).unwrap();
    for word in install.split_whitespace() {
        if word.starts_with("deploy/") {
            assert!(root().join(word).exists(), "{word} does not exist");
        }
    }
    for (command, unit_line, unit) in [
        (
            "install -m 0755 target/release/tokenbroker /usr/local/bin/",
            "ExecStart=/usr/local/bin/tokenbroker serve --config /etc/tokenbroker/tokenbroker.toml",
            &service,
        ),
        (
            "deploy/tokenbroker.toml /etc/tokenbroker/tokenbroker.toml",
            "ExecStart=/usr/local/bin/tokenbroker serve --config /etc/tokenbroker/tokenbroker.toml",
            &service,
        ),
        (
            "--shell /usr/sbin/nologin tokenbroker",
            "User=tokenbroker",
            &service,
        ),
        (
            "usermod -aG tokenbroker",
            "SocketGroup=tokenbroker",
            &socket,
        ),
        (
            "/etc/systemd/system/",
            "Requires=tokenbroker.socket",
            &service,
        ),
    ] {
        assert!(
            install.contains(command),
            "docs/deploy.md lacks {command:?}"
        );
        assert!(
            unit.lines().any(|l| l == unit_line),
            "units lack {unit_line:?}"
        );
    }
    assert!(install.contains("enable --now tokenbroker.socket tokenbroker.service"));

    let kubernetes = doc_block("docs/deploy.md", "## Run on Kubernetes");
    let daemonset =
        std::fs::read_to_string(root().join("deploy/kubernetes/daemonset.yaml")).unwrap();
    for word in kubernetes.split_whitespace() {
        if word.starts_with("deploy/") {
            assert!(root().join(word).exists(), "{word} does not exist");
        }
    }
    assert!(kubernetes.contains("kubectl apply -f deploy/kubernetes/daemonset.yaml"));
    let container = doc_block("docs/deploy.md", "## The container image");
    let tag = "docker build -t REGISTRY/tokenbroker:VERSION .";
    assert!(container.contains(tag));
    assert!(daemonset.contains("image: REGISTRY/tokenbroker:VERSION"));
}
