//! Plumbing shared by the server wrappers: binaries, log files, helper commands, graceful stop.

use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::TestkitError;

/// How much of a log or command output goes into an error message.
const TAIL_BYTES: u64 = 2048;
/// How long a server gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// `path` if it exists, else the "run scripts/install-deps" error.
pub(crate) fn require_binary(path: &str) -> Result<PathBuf, TestkitError> {
    let path = PathBuf::from(path);
    if path.is_file() {
        Ok(path)
    } else {
        Err(TestkitError::MissingBinary { path })
    }
}

/// Current length of a log file (0 if absent), to read only what a new run appends.
pub(crate) fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Open `path` for appending, for a child's stdout and stderr.
pub(crate) fn log_stdio(path: &Path) -> Result<(Stdio, Stdio), TestkitError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TestkitError::io(format!("open log file {}", path.display()), e))?;
    let copy = file
        .try_clone()
        .map_err(|e| TestkitError::io(format!("duplicate log file {}", path.display()), e))?;
    Ok((Stdio::from(copy), Stdio::from(file)))
}

/// The last couple of KiB written to `path` after byte offset `from`.
pub(crate) fn log_tail(path: &Path, from: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let start = from.max(len.saturating_sub(TAIL_BYTES));
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) if text.trim().is_empty() => "(log empty)".to_owned(),
        Ok(text) => text.trim().to_owned(),
        Err(e) => format!("(log unreadable: {e})"),
    }
}

/// The last couple of KiB of some command output.
fn text_tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(TAIL_BYTES as usize);
    String::from_utf8_lossy(bytes.get(start..).unwrap_or_default())
        .trim()
        .to_owned()
}

/// Run a helper command to completion; a non-zero exit is an error carrying its output.
pub(crate) async fn run_tool(program: &Path, args: &[&OsStr]) -> Result<(), TestkitError> {
    let command = std::iter::once(program.as_os_str())
        .chain(args.iter().copied())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!(%command, "running helper command");
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| TestkitError::io(format!("run `{command}`"), e))?;
    if output.status.success() {
        return Ok(());
    }
    let mut combined = output.stderr;
    combined.extend_from_slice(&output.stdout);
    Err(TestkitError::CommandFailed {
        command,
        status: output.status,
        output_tail: text_tail(&combined),
    })
}

/// Stop a child: SIGTERM, wait up to five seconds, then SIGKILL and reap it.
pub(crate) async fn terminate(child: &mut Child, what: &str) -> Result<(), TestkitError> {
    if let Some(pid) = child.id() {
        // No `unsafe` and no libc binding: let kill(1) deliver the signal.
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .map(|s| s.success())
            .unwrap_or(false);
        if sent && tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            return Ok(());
        }
        tracing::warn!(what, pid, "server did not stop on SIGTERM; killing it");
    }
    // Already exited, or did not stop in time: SIGKILL (a no-op if reaped) and reap.
    if let Err(e) = child.start_kill()
        && e.kind() != std::io::ErrorKind::InvalidInput
    {
        return Err(TestkitError::io(format!("kill {what}"), e));
    }
    child
        .wait()
        .await
        .map_err(|e| TestkitError::io(format!("wait for {what} to exit"), e))?;
    Ok(())
}

/// Quote a path for a nats-server config string.
pub(crate) fn quoted(path: &Path) -> String {
    let text = path.display().to_string();
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}
