//! The service binary refuses a bad configuration with the same message as
//! `idsync config check`, before it touches anything.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn an_invalid_configuration_stops_the_service_with_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("idsync.toml");
    let example = include_str!("../../../deploy/local/idsync.toml");
    std::fs::write(
        &file,
        example.replace("template = \"default-user\" }", "template = \"nope\" }"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_idsync-detector"))
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is invalid"), "{err}");
    assert!(
        err.contains("resources[0] (hr).reactions.unmatched.template: names template \"nope\""),
        "{err}"
    );
    assert!(err.contains("line "), "{err}");
}

#[test]
fn a_missing_configuration_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_idsync-detector"))
        .arg("--config")
        .arg("/nonexistent/idsync.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/idsync.toml") && err.contains("cannot read"),
        "{err}"
    );
}
