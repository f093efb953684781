//! `idsync-bench store [--commits N]`: the IDM store's commit and read
//! latency on each backend, in process (no gRPC): N creations of a user with
//! a shadow, then N reads, on the embedded store and on a throwaway
//! PostgreSQL; then the same commits from two PostgreSQL replicas at once.
//! Writes `target/bench/store.json`.

use std::time::{Duration, Instant};

use anyhow::Result;
use idsync_proto::v1;
use idsync_store::{Store, Writer};

fn user_with_shadow(prefix: &str, i: usize) -> Vec<v1::Operation> {
    use v1::operation::Op;
    let id = format!("{prefix}{i:08}");
    let focus = v1::Focus {
        id: id.clone(),
        kind: "user".into(),
        attributes: [
            ("name".to_owned(), vec![id.clone()]),
            ("fullName".to_owned(), vec![format!("User {i}")]),
        ]
        .into_iter()
        .map(|(k, values)| (k, v1::Values { values }))
        .collect(),
        ..Default::default()
    };
    let shadow = v1::Shadow {
        resource: "hr".into(),
        entry_uuid: id.clone(),
        dn: format!("uid={id},ou=people,dc=example,dc=com"),
        focus_id: id,
        ..Default::default()
    };
    vec![
        v1::Operation {
            op: Some(Op::PutFocus(v1::PutFocus {
                focus: Some(focus),
                expected_version: 0,
            })),
        },
        v1::Operation {
            op: Some(Op::PutShadow(v1::PutShadow {
                shadow: Some(shadow),
                expected_version: 0,
            })),
        },
    ]
}

/// p50 and p99 of `samples`, in milliseconds.
fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    (at(0.5), at(0.99))
}

/// Commits then reads `n` users on `store`; one JSON object of numbers.
fn measure(name: &str, store: &Store, prefix: &str, n: usize) -> Result<serde_json::Value> {
    let mut commits = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        store.commit(&user_with_shadow(prefix, i), "", &Writer::admin())?;
        commits.push(t.elapsed());
    }
    let commit_rate = n as f64 / started.elapsed().as_secs_f64();
    let mut reads = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        store.get_focus(&format!("{prefix}{i:08}"))?;
        reads.push(t.elapsed());
    }
    let (c50, c99) = percentiles(&mut commits);
    let (r50, r99) = percentiles(&mut reads);
    println!(
        "{name}: {n} commits at {commit_rate:.0}/s (p50 {c50:.2} ms, p99 {c99:.2} ms); reads p50 {r50:.3} ms, p99 {r99:.3} ms"
    );
    Ok(serde_json::json!({
        "commits": n, "commits_per_s": commit_rate,
        "commit_p50_ms": c50, "commit_p99_ms": c99,
        "read_p50_ms": r50, "read_p99_ms": r99,
    }))
}

pub fn store(n: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let embedded = measure("embedded", &Store::open(dir.path())?, "e", n)?;

    let pg = idsync_testkit::Postgres::start()?;
    let url = pg.create_database()?;
    let postgres = measure("postgres", &Store::open_postgres(&url)?, "p", n)?;

    // Two replicas committing at once: the write lock serialises them.
    let replicas = [Store::open_postgres(&url)?, Store::open_postgres(&url)?];
    let started = Instant::now();
    let workers: Vec<_> = replicas
        .into_iter()
        .enumerate()
        .map(|(r, s)| {
            std::thread::spawn(move || -> Result<()> {
                for i in 0..n / 2 {
                    s.commit(
                        &user_with_shadow(&format!("r{r}-"), i),
                        "",
                        &Writer::admin(),
                    )?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a replica thread panicked"))??;
    }
    let two = (n / 2 * 2) as f64 / started.elapsed().as_secs_f64();
    println!(
        "postgres, two replicas at once: {} commits at {two:.0}/s",
        n / 2 * 2
    );

    let out = std::path::Path::new("target/bench");
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("store.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "embedded": embedded,
            "postgres": postgres,
            "postgres_two_replicas_commits_per_s": two,
        }))?,
    )?;
    Ok(())
}
