//! The `idsync` binary as an operator runs it: exit codes and messages.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

fn idsync(args: &[&str]) -> Output {
    idsync_with(args, &[])
}

fn idsync_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_idsync"));
    cmd.args(args);
    for var in [
        "IDSYNC_IDM_URL",
        "IDSYNC_NATS_URL",
        "IDSYNC_CONFIG",
        "IDSYNC_ADMIN_TOKEN",
        "IDSYNC_ADMIN_TOKEN_FILE",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn config_check_accepts_the_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/idsync.toml");
    let out = idsync(&["config", "check", example]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("valid (2 resources, 1 templates)"),
        "{}",
        text(&out)
    );
}

#[test]
fn config_check_lists_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    let example = include_str!("../../deploy/local/idsync.toml");
    let bad = example
        .replace("template = \"default-user\"", "template = \"nope\"")
        .replace("target = \"description\"", "target = \"\"");
    std::fs::write(&file, bad).unwrap();
    let out = idsync(&["config", "check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("bad.toml is invalid"), "{t}");
    assert!(
        t.contains("reactions.unmatched.template: names template \"nope\""),
        "{t}"
    );
    assert!(t.contains("outbound[3]: target is empty"), "{t}");
}

#[test]
fn config_check_names_the_line_of_a_syntax_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.toml");
    std::fs::write(&file, "version = 1\n[nats\nurl = 1\n").unwrap();
    let out = idsync(&["config", "check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    assert!(t.contains("broken.toml") && t.contains("line 2"), "{t}");
}

#[test]
fn users_list_names_an_unreachable_idm() {
    let port = idsync_testkit::CLOSED_PORT;
    let url = format!("http://127.0.0.1:{port}");
    let out = idsync_with(
        &["users", "list", "--idm", &url],
        &[("IDSYNC_ADMIN_TOKEN", "secret-credential")],
    );
    assert!(!out.status.success());
    assert!(!text(&out).contains("secret-credential"));
    let t = text(&out);
    assert!(t.contains(&url) && t.contains("unavailable"), "{t}");
}

#[test]
fn admin_commands_without_a_credential_say_how_to_give_one() {
    let out = idsync(&["sync", "list"]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("administrator credential") && t.contains("IDSYNC_ADMIN_TOKEN"),
        "{t}"
    );
}

#[test]
fn admin_new_credential_is_random_and_long() {
    let a = idsync(&["admin", "new-credential"]);
    let b = idsync(&["admin", "new-credential"]);
    assert!(a.status.success(), "{}", text(&a));
    let (a, b) = (text(&a), text(&b));
    assert!(a.starts_with("idsync-admin.") && a.trim().len() > 40, "{a}");
    assert_ne!(a, b);
}

#[test]
fn config_check_accepts_the_freeipa_example_with_its_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, "not read by config check, only found").unwrap();
    let example = include_str!("../../deploy/freeipa/idsync.toml")
        .replace("/etc/ipa/ca.crt", ca.to_str().unwrap());
    let file = dir.path().join("idsync.toml");
    std::fs::write(&file, example).unwrap();
    let out = idsync(&["config", "check", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn serve_runs_only_known_services_and_needs_a_configuration() {
    let unknown = idsync(&["serve", "mailer"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(text(&unknown).contains("mailer"), "{}", text(&unknown));
    let bare = idsync(&["serve", "correlator"]);
    assert_eq!(bare.status.code(), Some(2));
    assert!(
        text(&bare).contains("idsync-correlator: no configuration"),
        "{}",
        text(&bare)
    );
    let missing = idsync(&["serve", "applier", "--config", "/nonexistent/idsync.toml"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        text(&missing).contains("/nonexistent/idsync.toml"),
        "{}",
        text(&missing)
    );
}
