//! Agreement status for monitoring: a TCP listener per agreement that answers
//! one word (`Ok`, `Err` or `Unknown`) and nothing else, as Kanidm's sync
//! tools do, and an HTTP endpoint with the details as JSON.

use std::net::SocketAddr;

use idsync_core::config::Config;
use idsync_proto::v1;
use idsync_store::{Store, status_word};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// Binds every configured listener now (so a taken port fails the start),
/// then serves them until `shutdown`. The returned tasks end, and their
/// listeners close, once `shutdown` is cancelled: await them before the
/// service returns, so that a restart finds its ports free.
///
/// # Errors
/// An address cannot be bound.
pub(crate) async fn start(
    config: &Config,
    store: &Store,
    shutdown: &CancellationToken,
) -> Result<Vec<tokio::task::JoinHandle<()>>, Error> {
    let mut tasks = Vec::new();
    for (name, agreement) in &config.agreements {
        let Some(bind) = &agreement.status_bind else {
            continue;
        };
        let listener = bind_to(bind, &format!("agreements.{name}.status_bind")).await?;
        tracing::info!(agreement = %name, addr = %bind, "status listener");
        tasks.push(tokio::spawn(serve_word(
            listener,
            store.clone(),
            name.clone(),
            shutdown.clone(),
        )));
    }
    if let Some(bind) = &config.idm.http_bind {
        let listener = bind_to(bind, "idm.http_bind").await?;
        tracing::info!(addr = %bind, "status over HTTP");
        tasks.push(tokio::spawn(serve_http(
            listener,
            store.clone(),
            shutdown.clone(),
        )));
    }
    Ok(tasks)
}

async fn bind_to(bind: &str, field: &str) -> Result<TcpListener, Error> {
    let addr: SocketAddr = bind.parse().map_err(|e| Error::Listen {
        addr: bind.to_owned(),
        reason: format!("{field}: {e}"),
    })?;
    TcpListener::bind(addr).await.map_err(|e| Error::Listen {
        addr: bind.to_owned(),
        reason: format!("{field}: {e}"),
    })
}

/// The agreement's word; `Unknown` too when it does not exist (yet) or the
/// store cannot be read — a monitor must never see a stale `Ok`.
async fn word(store: &Store, name: &str) -> &'static str {
    let store = store.clone();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || store.agreement_record(&name))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .map_or("Unknown", |a| status_word(&a))
}

async fn serve_word(
    listener: TcpListener,
    store: Store,
    name: String,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((mut conn, _)) = accepted else {
            continue;
        };
        let w = word(&store, &name).await;
        let _ = conn.write_all(w.as_bytes()).await;
        let _ = conn.shutdown().await;
    }
}

fn to_json(a: &v1::Agreement) -> serde_json::Value {
    json!({
        "name": a.name,
        "status": status_word(a),
        "halted": a.halted,
        "created_at_ms": a.created_at_ms,
        "last_success_ms": (a.last_success_ms > 0).then_some(a.last_success_ms),
        "last_error": a.last_error.as_ref().map(|e| json!({
            "resource": e.resource,
            "dn": e.dn,
            "entry_uuid": e.entry_uuid,
            "attribute": e.attribute,
            "reason": e.reason,
            "at_ms": e.at_ms,
        })),
        "entries": a.entries,
        "yield_attributes": a.yield_attributes,
        "tokens": a.tokens.iter().map(|t| json!({
            "label": t.label,
            "id": t.id,
            "issued_at_ms": t.issued_at_ms,
        })).collect::<Vec<_>>(),
    })
}

/// The response to `GET <path>`: status code and JSON body.
async fn answer(store: &Store, path: &str) -> (u16, serde_json::Value) {
    let store = store.clone();
    let path = path.to_owned();
    let result = tokio::task::spawn_blocking(move || match path.as_str() {
        "/status" | "/status/" => store.list_agreements().map(|all| {
            (
                200,
                json!({ "agreements": all.iter().map(to_json).collect::<Vec<_>>() }),
            )
        }),
        p => match p.strip_prefix("/status/") {
            Some(name) => store.get_agreement(name).map(|a| match a {
                Some(a) => (200, to_json(&a)),
                None => (
                    404,
                    json!({ "error": format!("agreement {name:?} does not exist") }),
                ),
            }),
            None => Ok((
                404,
                json!({ "error": "try GET /status or GET /status/<agreement>" }),
            )),
        },
    })
    .await;
    match result {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => (500, json!({ "error": e.to_string() })),
        Err(e) => (500, json!({ "error": e.to_string() })),
    }
}

/// A minimal HTTP/1.1 server: one GET per connection.
async fn serve_http(listener: TcpListener, store: Store, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((mut conn, _)) = accepted else {
            continue;
        };
        let store = store.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // Read the request head (or give up at 4 KiB or after 5 s).
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while len < buf.len() {
                    match conn.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let mut parts = head.split_whitespace();
            let (code, body) = match (parts.next(), parts.next()) {
                (Some("GET"), Some(path)) => answer(&store, path).await,
                _ => (405, json!({ "error": "only GET is served" })),
            };
            let reason = match code {
                200 => "OK",
                404 => "Not Found",
                405 => "Method Not Allowed",
                _ => "Internal Server Error",
            };
            let body = body.to_string();
            let response = format!(
                "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
