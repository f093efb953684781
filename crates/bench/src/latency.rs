//! `idsync-bench latency`: single modifications at a steady rate through live
//! sync, each timed from the source's modify to the IDM's commit and to the
//! target's entry, against the baseline of the source's own modify round
//! trip measured in the same run.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use idsync_idm_client::IdmClient;
use idsync_testkit::{NatsServer, Slapd, SlapdOptions, free_port};

use super::{ADMIN, PASSWORD, PEOPLE, SUFFIX, peak_kib, seed, spawn, tempfile_dir};

const TARGET: &str = "o=Acme";

fn config(
    nats: &str,
    idm_port: u16,
    source: &str,
    target: &str,
    secrets: &Path,
    data: &Path,
) -> String {
    format!(
        r#"version = 1
# As for a large import: the workers' commits and reads go in batches.
[workers]
inbound_concurrency = 256
provisioner_concurrency = 64
[nats]
url = "{nats}"
[idm]
url = "http://127.0.0.1:{idm_port}"
listen = "127.0.0.1:{idm_port}"
data_dir = "{data}"
admin_token_file = "{admin}"
[agreements.hr]
token_file = "{token}"
on_error = "quarantine"
[[templates]]
name = "default-user"
assignments = ["acme"]
[[resources]]
name = "hr"
agreement = "hr"
url = "{source}"
bind_dn = "cn=admin,{SUFFIX}"
bind_password_file = "{password}"
base_dn = "{PEOPLE}"
filter = "(objectClass=inetOrgPerson)"
live_sync = true
inbound = [
  {{ source = "uid", target = "name", strength = "strong" }},
  {{ source = "cn", target = "fullName" }},
  {{ source = "sn", target = "familyName" }},
]
correlation = [{{ conditions = [{{ focus_attribute = "name", source = "uid" }}] }}]
[resources.reactions]
linked = {{ action = "synchronize" }}
unlinked = {{ action = "link" }}
unmatched = {{ action = "add_focus", template = "default-user" }}
deleted = {{ action = "delete_focus" }}
[[resources]]
name = "acme"
url = "{target}"
bind_dn = "cn=admin,{TARGET}"
bind_password_file = "{password}"
base_dn = "{TARGET}"
filter = "(objectClass=inetOrgPerson)"
object_classes = ["inetOrgPerson"]
dn_template = "cn={{name}},{TARGET}"
outbound = [
  {{ source = "fullName", target = "cn" }},
  {{ source = "familyName", target = "sn" }},
]
"#,
        data = data.display(),
        admin = secrets.join("admin").display(),
        token = secrets.join("hr.token").display(),
        password = secrets.join("hr").display(),
    )
}

/// p50, p99 and max of `samples` (sorted in place), in milliseconds.
fn percentiles(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    (at(0.50), at(0.99), at(1.0))
}

async fn modify_cn(ldap: &mut ldap3::Ldap, uid: &str, cn: &str) -> Result<()> {
    ldap.modify(
        &format!("uid={uid},{PEOPLE}"),
        vec![ldap3::Mod::Replace(
            "cn",
            std::collections::HashSet::from([cn]),
        )],
    )
    .await?
    .success()?;
    Ok(())
}

async fn target_cn(ldap: &mut ldap3::Ldap, uid: &str) -> Result<Vec<String>> {
    let (entries, _) = ldap
        .search(
            &format!("cn={uid},{TARGET}"),
            ldap3::Scope::Base,
            "(objectClass=*)",
            vec!["cn"],
        )
        .await?
        .success()?;
    Ok(entries
        .into_iter()
        .next()
        .map(|e| {
            ldap3::SearchEntry::construct(e)
                .attrs
                .remove("cn")
                .unwrap_or_default()
        })
        .unwrap_or_default())
}

/// The whole pipeline: a source seeded with `people`, a target, NATS, and
/// the five services as processes, the detector in live sync.
pub(crate) struct Pipeline {
    work: std::path::PathBuf,
    source: Slapd,
    target: Slapd,
    _nats: NatsServer,
    idm: IdmClient,
    pub(crate) procs: Vec<super::Proc>,
}

impl Pipeline {
    /// Starts it all and waits until every person has an account on the
    /// target; returns that initial import's wall time, from the services'
    /// start.
    pub(crate) async fn start(people: usize) -> Result<(Self, Duration)> {
        let work = tempfile_dir()?;
        let secrets = work.join("secrets");
        std::fs::create_dir_all(&secrets)?;
        for (file, value) in [("hr", PASSWORD), ("admin", ADMIN)] {
            std::fs::write(secrets.join(file), value)?;
        }
        let source = Slapd::start(SlapdOptions {
            suffix: SUFFIX.into(),
            admin_password: PASSWORD.into(),
            seed_ldif: seed(people),
            session_log: true,
        })
        .await?;
        let target = empty_target().await?;
        let nats = NatsServer::start_in(&work.join("nats")).await?;
        let idm_port = free_port()?;
        let config_path = work.join("idsync.toml");
        std::fs::write(
            &config_path,
            config(
                nats.url(),
                idm_port,
                source.url(),
                target.url(),
                &secrets,
                &work.join("idm"),
            ),
        )?;
        let (idm_proc, idm) = super::start_idm(&config_path, &work, idm_port, &secrets).await?;
        let mut procs = vec![idm_proc];
        let started = Instant::now();
        for (name, binary) in [
            ("correlator", "idsync-correlator"),
            ("applier", "idsync-applier"),
            ("provisioner", "idsync-provisioner"),
            ("detector", "idsync-detector"),
        ] {
            procs.push(spawn(name, binary, &config_path, &work).await?);
        }
        while idm.live_shadows("acme").await? < people as u64 {
            if started.elapsed() > Duration::from_secs(3600) {
                bail!("the initial import and provisioning did not finish");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let took = started.elapsed();
        let pipeline = Self {
            work,
            source,
            target,
            _nats: nats,
            idm,
            procs,
        };
        Ok((pipeline, took))
    }

    pub(crate) async fn stop(mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill().await;
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// A target directory holding only its suffix entry.
async fn empty_target() -> Result<Slapd> {
    Ok(Slapd::start(SlapdOptions {
        suffix: TARGET.into(),
        admin_password: PASSWORD.into(),
        seed_ldif: format!("dn: {TARGET}\nobjectClass: organization\no: Acme\n"),
        session_log: false,
    })
    .await?)
}

/// Import with provisioning: `people` entries from the source into the IDM
/// and on to a target, timed from the services' start until every account
/// is on the target, against `ldapadd` of the same entries (the accounts'
/// DNs and attributes) into another fresh target, in the same run.
pub async fn provisioning(people: usize) -> Result<serde_json::Value> {
    let fresh = empty_target().await?;
    let work = tempfile_dir()?;
    let ldif = work.join("accounts.ldif");
    let mut text = String::new();
    for i in 0..people {
        text.push_str(&format!(
            "dn: cn=u{i},{TARGET}\nobjectClass: inetOrgPerson\ncn: u{i}\ncn: User {i}\nsn: Number{i}\n\n"
        ));
    }
    std::fs::write(&ldif, text)?;
    let password = work.join("password");
    std::fs::write(&password, PASSWORD)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600))?;
    let t0 = Instant::now();
    let status = tokio::process::Command::new("ldapadd")
        .args(["-x", "-H", fresh.url(), "-D", &format!("cn=admin,{TARGET}")])
        .arg("-y")
        .arg(&password)
        .arg("-f")
        .arg(&ldif)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .context("cannot run ldapadd (scripts/install-deps installs ldap-utils)")?;
    if !status.success() {
        bail!("ldapadd failed: {status}");
    }
    let ldapadd = t0.elapsed();
    drop(fresh);
    let _ = std::fs::remove_dir_all(&work);

    let (pipeline, took) = Pipeline::start(people).await?;
    let mut peaks = serde_json::Map::new();
    for p in &pipeline.procs {
        peaks.insert(
            p.name.into(),
            serde_json::json!(peak_kib(p.child.id()).unwrap_or(0)),
        );
    }
    pipeline.stop().await;
    let ratio = took.as_secs_f64() / ldapadd.as_secs_f64();
    println!(
        "import with provisioning of {people} people: {:.1}s ({:.0}/s); ldapadd of the same accounts into a fresh target {:.2}s ({:.0}/s): {ratio:.1}x",
        took.as_secs_f64(),
        people as f64 / took.as_secs_f64(),
        ldapadd.as_secs_f64(),
        people as f64 / ldapadd.as_secs_f64(),
    );
    Ok(serde_json::json!({
        "people": people,
        "seconds": took.as_secs_f64(),
        "ldapadd_seconds": ldapadd.as_secs_f64(),
        "ratio": ratio,
        "peak_rss_kib": peaks,
    }))
}

pub async fn latency(people: usize, changes: usize, rate: f64) -> Result<serde_json::Value> {
    let (pipeline, took) = Pipeline::start(people).await?;
    println!(
        "initial import and provisioning of {people} people: {:.1}s",
        took.as_secs_f64()
    );
    let Pipeline {
        ref source,
        ref target,
        ref idm,
        ..
    } = pipeline;
    let mut src = source.admin_conn().await?;
    let mut tgt = target.admin_conn().await?;
    // The baseline: the source's own modify round trip, on the same entries.
    let mut baseline = Vec::with_capacity(changes);
    for i in 0..changes {
        let uid = format!("u{}", i % people);
        let t0 = Instant::now();
        modify_cn(&mut src, &uid, &format!("Baseline {i}")).await?;
        baseline.push(t0.elapsed());
    }
    // Let the baseline's own changes pass through before measuring.
    let last = format!("u{}", (changes - 1) % people);
    let settle = Instant::now();
    while !target_cn(&mut tgt, &last)
        .await?
        .iter()
        .any(|c| c == &format!("Baseline {}", changes - 1))
    {
        if settle.elapsed() > Duration::from_secs(600) {
            bail!("the baseline's changes did not settle");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let period = Duration::from_secs_f64(1.0 / rate);
    let (mut to_idm, mut to_target) = (Vec::new(), Vec::new());
    let run = Instant::now();
    for i in 0..changes {
        let slot = run + period * u32::try_from(i).unwrap_or(u32::MAX);
        tokio::time::sleep_until(slot.into()).await;
        let uid = format!("u{}", i % people);
        let cn = format!("User {i} changed");
        let t0 = Instant::now();
        modify_cn(&mut src, &uid, &cn).await?;
        let mut idm_done = None;
        loop {
            if idm_done.is_none() {
                let found = idm.find_focus("user", "name", &uid).await?;
                if found
                    .iter()
                    .any(|f| f.first("fullName") == Some(cn.as_str()))
                {
                    idm_done = Some(t0.elapsed());
                }
            }
            if idm_done.is_some() && target_cn(&mut tgt, &uid).await?.contains(&cn) {
                to_target.push(t0.elapsed());
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("change {i} of {uid} did not arrive within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        to_idm.extend(idm_done);
    }
    let (b50, b99, bmax) = percentiles(&mut baseline);
    let (i50, i99, imax) = percentiles(&mut to_idm);
    let (t50, t99, tmax) = percentiles(&mut to_target);
    println!("C. live sync, {changes} single modifications at {rate}/s over {people} people");
    println!(
        "  baseline source modify round trip: p50 {b50:.1} ms, p99 {b99:.1} ms, max {bmax:.1} ms"
    );
    println!(
        "  source modify → IDM commit:       p50 {i50:.1} ms, p99 {i99:.1} ms, max {imax:.1} ms"
    );
    println!(
        "  source modify → target modified:  p50 {t50:.1} ms, p99 {t99:.1} ms, max {tmax:.1} ms"
    );
    let mut peaks = serde_json::Map::new();
    for p in &pipeline.procs {
        let peak = peak_kib(p.child.id()).unwrap_or(0);
        println!("  peak RSS {}: {} MiB", p.name, peak / 1024);
        peaks.insert(p.name.into(), serde_json::json!(peak));
    }
    let report = serde_json::json!({
        "people": people,
        "changes": changes,
        "rate_per_s": rate,
        "baseline_modify_ms": {"p50": b50, "p99": b99, "max": bmax},
        "to_idm_ms": {"p50": i50, "p99": i99, "max": imax},
        "to_target_ms": {"p50": t50, "p99": t99, "max": tmax},
        "peak_rss_kib": peaks,
    });
    super::write_json("latency.json", &report)?;
    let _ = src.unbind().await;
    let _ = tgt.unbind().await;
    pipeline.stop().await;
    Ok(report)
}
