//! The Kubernetes deployment, checked offline: `scripts/check-deploy`
//! renders the Helm chart (deploy/helm/idsync) with its value sets,
//! validates every object against the Kubernetes schemas and the platform's
//! rules, and runs this build's `idsync config check` on every idsync.toml
//! the chart writes. Its first run installs a pinned virtualenv (PyPI).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn the_helm_chart_renders_valid_manifests() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(format!("{root}/scripts/check-deploy"))
        .current_dir(root)
        .env("IDSYNC_BIN", env!("CARGO_BIN_EXE_idsync"))
        .output()
        .expect("scripts/check-deploy runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "scripts/check-deploy failed:\n{text}");
    assert!(
        text.contains("deploy: ") && text.contains(" passed, 0 failed"),
        "{text}"
    );
}
