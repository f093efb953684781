//! Shared helpers: start a deployment, read the IDM and the directories, wait
//! on conditions with a deadline.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use idsync::dev::{Deployment, PEOPLE};
use idsync_core::model::Focus;
use idsync_idm_client::IdmClient;
use idsync_testkit::{Slapd, eventually};
use ldap3::{Mod, Scope, SearchEntry};

pub const WAIT: Duration = Duration::from_secs(30);

pub struct Env {
    pub deployment: Deployment,
    pub idm: IdmClient,
    _dir: tempfile::TempDir,
}

/// Logs of the services go to the test's output and to a copy searched for
/// secrets (`Env::assert_no_secret_logged`).
pub fn init_tracing() {
    idsync_testkit::logs::init();
}

impl Env {
    /// No password or token of this deployment appears in any log line the
    /// services wrote: bind passwords, the administrator credential, sync
    /// tokens (and the secret part of each).
    pub fn assert_no_secret_logged(&self) {
        let checked =
            idsync_testkit::logs::assert_no_secret_in_log(&self.deployment.dir.join("secrets"));
        assert!(
            checked >= 4,
            "passwords, admin credential and token checked"
        );
    }

    /// An environment around a deployment started otherwise (another config).
    pub fn from(deployment: Deployment, dir: tempfile::TempDir) -> Self {
        init_tracing();
        let idm = deployment.admin().unwrap();
        Env {
            deployment,
            idm,
            _dir: dir,
        }
    }
}

pub async fn start() -> Env {
    start_with(idsync::dev::EXAMPLE_CONFIG).await
}

/// The example, with agreement hr allowed to take over native IDM users that
/// correlation finds (midPoint's migration case).
pub fn adopting() -> String {
    let halt = "on_error = \"halt\"\n";
    assert!(idsync::dev::EXAMPLE_CONFIG.contains(halt));
    idsync::dev::EXAMPLE_CONFIG.replace(halt, &format!("{halt}adopt_native = true\n"))
}

pub async fn start_with(config: &str) -> Env {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let deployment = Deployment::start_with(dir.path(), config).await.unwrap();
    let idm = deployment.admin().unwrap();
    Env {
        deployment,
        idm,
        _dir: dir,
    }
}

impl Env {
    /// Waits until user `name` exists and `check` accepts it.
    pub async fn user_where(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&Focus) -> bool,
    ) -> Focus {
        let idm = self.idm.clone();
        eventually(&format!("user {name}: {what}"), WAIT, || {
            let idm = idm.clone();
            let found = async move { idm.find_focus("user", "name", name).await };
            let check = &check;
            async move {
                let users = found.await.map_err(|e| e.to_string())?;
                Ok(users.into_iter().find(|u| check(u)))
            }
        })
        .await
        .unwrap()
    }

    pub async fn user_gone(&self, name: &str) {
        let idm = self.idm.clone();
        eventually(&format!("user {name} deleted"), WAIT, || {
            let idm = idm.clone();
            async move {
                let users = idm
                    .find_focus("user", "name", name)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(users.is_empty().then_some(()))
            }
        })
        .await
        .unwrap();
    }

    /// Waits until the target entry `dn` satisfies `check` (None: absent).
    pub async fn target_where(
        &self,
        dn: &str,
        what: &str,
        check: impl Fn(Option<&BTreeMap<String, HashSet<String>>>) -> bool,
    ) -> Option<BTreeMap<String, HashSet<String>>> {
        let target = &self.deployment.target;
        eventually(&format!("target {dn}: {what}"), WAIT, || {
            let check = &check;
            async move {
                let entry = read(target, dn).await;
                Ok(check(entry.as_ref()).then_some(entry))
            }
        })
        .await
        .unwrap()
    }
}

/// The entry `dn` on `server`, attribute names lower-cased.
pub async fn read(server: &Slapd, dn: &str) -> Option<BTreeMap<String, HashSet<String>>> {
    let mut ldap = server.admin_conn().await.unwrap();
    let result = ldap
        .search(dn, Scope::Base, "(objectClass=*)", vec!["*"])
        .await
        .unwrap();
    let (entries, _) = match result.success() {
        Ok(r) => r,
        Err(ldap3::LdapError::LdapResult { result }) if result.rc == 32 => return None,
        Err(e) => panic!("read {dn}: {e}"),
    };
    let _ = ldap.unbind().await;
    entries.into_iter().next().map(|e| {
        SearchEntry::construct(e)
            .attrs
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.into_iter().collect()))
            .collect()
    })
}

pub fn set(values: &[&str]) -> HashSet<String> {
    values.iter().map(|v| (*v).to_owned()).collect()
}

pub fn person_dn(uid: &str) -> String {
    format!("uid={uid},{PEOPLE}")
}

pub async fn add_person(server: &Slapd, uid: &str, given: &str, sn: &str) {
    let mut ldap = server.admin_conn().await.unwrap();
    let cn = format!("{given} {sn}");
    let attrs = vec![
        ("objectClass", HashSet::from(["inetOrgPerson"])),
        ("uid", HashSet::from([uid])),
        ("cn", HashSet::from([cn.as_str()])),
        ("givenName", HashSet::from([given])),
        ("sn", HashSet::from([sn])),
    ];
    ldap.add(&person_dn(uid), attrs)
        .await
        .unwrap()
        .success()
        .unwrap();
    let _ = ldap.unbind().await;
}

pub async fn set_cn(server: &Slapd, uid: &str, cn: &str) {
    let mut ldap = server.admin_conn().await.unwrap();
    ldap.modify(
        &person_dn(uid),
        vec![Mod::Replace("cn", HashSet::from([cn]))],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    let _ = ldap.unbind().await;
}

pub async fn delete_person(server: &Slapd, uid: &str) {
    let mut ldap = server.admin_conn().await.unwrap();
    ldap.delete(&person_dn(uid))
        .await
        .unwrap()
        .success()
        .unwrap();
    let _ = ldap.unbind().await;
}

pub fn links_to(user: &Focus, resource: &str) -> bool {
    user.links.iter().any(|l| l.resource == resource)
}
