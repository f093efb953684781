//! Waiting on conditions with a deadline, and picking free loopback ports.

use std::time::Duration;

use tokio::time::Instant;

use crate::TestkitError;

const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Wait until `check` returns `Ok(Some(value))`, polling about every 50 ms.
///
/// `check` runs at least once, even with a zero `timeout`. Use it as an
/// `assert_eventually` instead of sleeping: return `Ok(None)` or `Err(reason)`
/// while the condition does not hold yet.
///
/// # Errors
///
/// [`TestkitError::Timeout`] when the deadline passes, carrying `what` and the
/// last reason `check` gave.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> Result<T, TestkitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => "condition not met yet".to_owned(),
            Err(reason) => reason,
        };
        if Instant::now() >= deadline {
            return Err(TestkitError::Timeout {
                what: what.to_owned(),
                timeout,
                last,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A loopback TCP port that was free a moment ago.
///
/// The port is released before returning, so another process may take it;
/// callers that start servers on it must handle "address in use".
///
/// A loopback port nothing listens on, for "server unreachable" tests: port 1
/// (tcpmux) is privileged and never handed out as an ephemeral port, unlike a
/// [`free_port`], which a test running in parallel may take meanwhile.
pub const CLOSED_PORT: u16 = 1;

/// # Errors
///
/// [`TestkitError::Io`] when binding `127.0.0.1:0` fails.
pub fn free_port() -> Result<u16, TestkitError> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| TestkitError::io("bind 127.0.0.1:0 to find a free port", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| TestkitError::io("read local address of 127.0.0.1:0", e))?;
    Ok(addr.port())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_nonzero_and_bindable() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    }

    #[tokio::test]
    async fn eventually_returns_first_some() {
        let mut calls = 0;
        let got = eventually("third call", Duration::from_secs(5), || {
            calls += 1;
            let n = calls;
            async move { Ok(if n >= 3 { Some(n) } else { None }) }
        })
        .await
        .unwrap();
        assert_eq!(got, 3);
    }

    #[tokio::test]
    async fn eventually_times_out_with_last_reason() {
        let err = eventually::<(), _, _>("never", Duration::from_millis(120), || async {
            Err("still broken".to_owned())
        })
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("never") && text.contains("still broken"),
            "{text}"
        );
    }
}
