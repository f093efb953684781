//! Every log line the services of a test process write, kept beside the
//! test's captured output, so that a test can prove no secret was logged.

use std::path::Path;
use std::sync::Mutex;

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Copy;

impl std::io::Write for Copy {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        record(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Adds `bytes` to what is searched (for output of child processes).
pub fn record(bytes: &[u8]) {
    if let Ok(mut log) = LOG.lock() {
        log.extend_from_slice(bytes);
    }
}

/// Logs go to the test's captured output (shown on failure) and to the copy;
/// debug level, where most is said. A second call changes nothing.
pub fn init() {
    use tracing_subscriber::fmt::writer::MakeWriterExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "debug,async_nats=warn,h2=info,tower=info,hyper=info,hyper_util=info",
        )
    });
    let writer = tracing_subscriber::fmt::TestWriter::default().and(|| Copy);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .try_init();
}

/// Everything logged so far.
pub fn captured() -> String {
    let log = LOG.lock().map(|l| l.clone()).unwrap_or_default();
    String::from_utf8_lossy(&log).into_owned()
}

/// How many secrets of `secrets_dir` were searched for in the log: each
/// file's content, and for a token (`x.y.z`) its last part too.
///
/// # Panics
/// When the log is empty, or holds any of them (the message does not show
/// which value, only which file).
pub fn assert_no_secret_in_log(secrets_dir: &Path) -> usize {
    let log = captured();
    assert!(!log.is_empty(), "no log captured");
    let mut checked = 0;
    let entries = std::fs::read_dir(secrets_dir);
    assert!(entries.is_ok(), "cannot read {}", secrets_dir.display());
    for entry in entries.into_iter().flatten().flatten() {
        let Ok(secret) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let secret = secret.trim();
        let parts = std::iter::once(secret).chain(secret.rsplit('.').next());
        for part in parts.filter(|p| p.len() >= 16) {
            assert!(
                !log.contains(part),
                "the secret in {} is in the log",
                entry.path().display()
            );
            checked += 1;
        }
    }
    checked
}
