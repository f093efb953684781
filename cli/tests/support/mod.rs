//! Helpers shared by the CLI's end-to-end tests: a deployment, the `idsync`
//! binary run against it, and writes to its source directory.

#![allow(dead_code)]

pub mod compare;
pub mod replicas;

// Not every test binary uses them.
#[allow(unused_imports)]
pub use compare::*;
#[allow(unused_imports)]
pub use replicas::*;

use std::collections::HashSet;
use std::process::Output;
use std::time::Duration;

use idsync::dev::{Deployment, EXAMPLE_CONFIG, PEOPLE};
use idsync_core::model::Focus;
use idsync_idm_client::IdmClient;
use idsync_testkit::{Slapd, eventually};
use tokio::io::AsyncReadExt as _;

pub const WAIT: Duration = Duration::from_secs(30);

pub struct Env {
    pub d: Deployment,
    pub admin: IdmClient,
    pub _dir: tempfile::TempDir,
}

pub async fn start(config: &str) -> Env {
    idsync_testkit::logs::init();
    let dir = tempfile::tempdir().unwrap();
    let d = Deployment::start_with(dir.path(), config).await.unwrap();
    let admin = d.admin().unwrap();
    Env {
        d,
        admin,
        _dir: dir,
    }
}

/// As [`start`], with the servers set up as `options` say.
pub async fn start_with_options(config: &str, options: idsync::dev::Options) -> Env {
    idsync_testkit::logs::init();
    let dir = tempfile::tempdir().unwrap();
    let d = Deployment::start_with_options(dir.path(), config, options)
        .await
        .unwrap();
    let admin = d.admin().unwrap();
    Env {
        d,
        admin,
        _dir: dir,
    }
}

/// The example with one change to agreement hr's settings.
pub fn example_with(setting: &str) -> String {
    let halt = "on_error = \"halt\"\n";
    assert!(EXAMPLE_CONFIG.contains(halt));
    EXAMPLE_CONFIG.replace(halt, &format!("{halt}{setting}\n"))
}

impl Env {
    /// Runs `idsync args…` with this deployment's configuration and credential.
    pub async fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_input(args, "").await
    }

    pub async fn cli_with_input(&self, args: &[&str], input: &str) -> Output {
        use tokio::io::AsyncWriteExt as _;
        let mut child = self.cli_child(args);
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).await.unwrap();
        drop(stdin);
        cli_output(child).await
    }

    /// `idsync args…` started, not waited for (see [`cli_output`]).
    pub fn cli_child(&self, args: &[&str]) -> tokio::process::Child {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
            .args(args)
            .env("IDSYNC_CONFIG", self.d.dir.join("idsync.toml"))
            .env("IDSYNC_ADMIN_TOKEN_FILE", self.d.dir.join("secrets/admin"))
            .env_remove("IDSYNC_IDM_URL")
            .env_remove("IDSYNC_NATS_URL")
            .env_remove("IDSYNC_ADMIN_TOKEN")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// No bind password, administrator credential or sync token of this
    /// deployment is in any log line the services wrote, nor in anything
    /// the CLI printed on stderr.
    pub fn assert_no_secret_logged(&self) {
        let checked = idsync_testkit::logs::assert_no_secret_in_log(&self.d.dir.join("secrets"));
        assert!(checked >= 4, "passwords, credential and token checked");
    }

    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args).await;
        assert!(out.status.success(), "idsync {args:?}: {}", text(&out));
        text(&out)
    }

    pub async fn user(&self, name: &str) -> Option<Focus> {
        self.admin
            .find_focus("user", "name", name)
            .await
            .unwrap()
            .into_iter()
            .next()
    }

    pub async fn user_where(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&Focus) -> bool,
    ) -> Focus {
        let check = &check;
        eventually(&format!("user {name}: {what}"), WAIT, || async move {
            Ok(self.user(name).await.filter(|u| check(u)))
        })
        .await
        .unwrap()
    }

    pub async fn agreement_where(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&idsync_proto::v1::Agreement) -> bool,
    ) -> idsync_proto::v1::Agreement {
        let check = &check;
        eventually(&format!("agreement {name}: {what}"), WAIT, || async move {
            let a = self
                .admin
                .get_agreement(name)
                .await
                .map_err(|e| e.to_string())?;
            Ok(check(&a).then_some(a))
        })
        .await
        .unwrap()
    }

    /// What the agreement's TCP status listener answers.
    pub async fn status_word(&self, agreement: &str) -> String {
        let addr = self.d.config.agreements[agreement]
            .status_bind
            .clone()
            .unwrap();
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut word = String::new();
        conn.read_to_string(&mut word).await.unwrap();
        word
    }

    /// `GET path` on the IDM's status endpoint.
    pub async fn http_status(&self, path: &str) -> serde_json::Value {
        use tokio::io::AsyncWriteExt as _;
        let addr = self.d.config.idm.http_bind.clone().unwrap();
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 "), "{head}");
        serde_json::from_str(body).unwrap()
    }
}

/// What a CLI process started by [`Env::cli_child`] printed, once it ended.
pub async fn cli_output(child: tokio::process::Child) -> Output {
    let out = child.wait_with_output().await.unwrap();
    // What the CLI says on errors is searched for secrets with the logs.
    idsync_testkit::logs::record(&out.stderr);
    out
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub async fn add_person(server: &Slapd, uid: &str, cn: &str) {
    let mut ldap = server.admin_conn().await.unwrap();
    let dn = format!("uid={uid},{PEOPLE}");
    let attrs = vec![
        ("objectClass", HashSet::from(["inetOrgPerson"])),
        ("uid", HashSet::from([uid])),
        ("cn", HashSet::from([cn])),
        ("sn", HashSet::from(["Person"])),
    ];
    ldap.add(&dn, attrs).await.unwrap().success().unwrap();
    let _ = ldap.unbind().await;
}

pub async fn set_cn(server: &Slapd, uid: &str, cn: &str) {
    let mut ldap = server.admin_conn().await.unwrap();
    let dn = format!("uid={uid},{PEOPLE}");
    ldap.modify(&dn, vec![ldap3::Mod::Replace("cn", HashSet::from([cn]))])
        .await
        .unwrap()
        .success()
        .unwrap();
    let _ = ldap.unbind().await;
}

pub async fn delete_person(server: &Slapd, uid: &str) {
    let mut ldap = server.admin_conn().await.unwrap();
    ldap.delete(&format!("uid={uid},{PEOPLE}"))
        .await
        .unwrap()
        .success()
        .unwrap();
    let _ = ldap.unbind().await;
}

/// The target's entry at `dn`, with every user attribute.
pub async fn target_entry(env: &Env, dn: &str) -> Option<ldap3::SearchEntry> {
    let mut ldap = env.d.target.admin_conn().await.unwrap();
    let result = ldap
        .search(dn, ldap3::Scope::Base, "(objectClass=*)", vec!["*"])
        .await
        .unwrap();
    let entries = result.success().map(|(e, _)| e).unwrap_or_default();
    let _ = ldap.unbind().await;
    entries
        .into_iter()
        .next()
        .map(ldap3::SearchEntry::construct)
}

/// Waits until the target's entry at `dn` passes `check` (`None`: it is absent).
pub async fn target_where(
    env: &Env,
    dn: &str,
    what: &str,
    check: impl Fn(Option<&ldap3::SearchEntry>) -> bool,
) {
    let check = &check;
    eventually(&format!("{dn}: {what}"), WAIT, || async move {
        let e = target_entry(env, dn).await;
        Ok(check(e.as_ref()).then_some(()))
    })
    .await
    .unwrap();
}

/// Adds an LDIF-like entry to the target: (attribute, values) pairs.
pub async fn add_target(env: &Env, dn: &str, attrs: &[(&str, &[&str])]) {
    let mut ldap = env.d.target.admin_conn().await.unwrap();
    let attrs: Vec<(&str, HashSet<&str>)> = attrs
        .iter()
        .map(|(a, v)| (*a, v.iter().copied().collect()))
        .collect();
    ldap.add(dn, attrs).await.unwrap().success().unwrap();
    let _ = ldap.unbind().await;
}

/// Values of `attribute` of `entry` (empty when it has none).
pub fn values<'a>(entry: Option<&'a ldap3::SearchEntry>, attribute: &str) -> Vec<&'a str> {
    entry
        .and_then(|e| e.attrs.get(attribute))
        .map(|v| v.iter().map(String::as_str).collect())
        .unwrap_or_default()
}

/// A small deterministic generator (xorshift64*), so a failing run can be
/// repeated with the same writes.
pub struct Rng(pub u64);

impl Rng {
    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        usize::try_from(x >> 33).unwrap() % n
    }
}
