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

/// Every log line the services wrote in this test process, to search for
/// secrets (`Env::assert_no_secret_logged`).
static LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct LogCopy;

impl std::io::Write for LogCopy {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut log) = LOG.lock() {
            log.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Logs of the services go to the test's captured output (shown on failure),
/// and to a copy searched for secrets. Debug level, where most is said.
pub fn init_tracing() {
    use tracing_subscriber::fmt::writer::MakeWriterExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "debug,async_nats=warn,h2=info,tower=info,hyper=info,hyper_util=info",
        )
    });
    let writer = tracing_subscriber::fmt::TestWriter::default().and(|| LogCopy);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .try_init();
}

impl Env {
    /// No password or token of this deployment appears in any log line the
    /// services wrote: bind passwords, the administrator credential, sync
    /// tokens (and the secret part of each).
    pub fn assert_no_secret_logged(&self) {
        let log = LOG.lock().map(|l| l.clone()).unwrap_or_default();
        assert!(!log.is_empty(), "no log captured");
        let log = String::from_utf8_lossy(&log);
        let secrets = self.deployment.dir.join("secrets");
        let mut checked = 0;
        for entry in std::fs::read_dir(&secrets).unwrap() {
            let secret = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let secret = secret.trim();
            let parts = std::iter::once(secret).chain(secret.rsplit('.').next());
            for part in parts.filter(|p| p.len() >= 16) {
                assert!(!log.contains(part), "a secret is in the log");
                checked += 1;
            }
        }
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
