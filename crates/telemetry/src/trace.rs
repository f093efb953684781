//! OpenTelemetry traces: one LDAP change is one trace across the detector,
//! the correlator, the applier, the IDM and the provisioner.
//!
//! Off unless the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; then spans go by OTLP/gRPC
//! to that collector, in batches, named by `OTEL_SERVICE_NAME` or the
//! service. The context travels as a W3C `traceparent`: in a NATS header on
//! every bus message, in gRPC metadata on every IDM call, and with each
//! outbox record from the IDM's commit to the provisioner. When traces are
//! off nothing is added to messages or calls.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C trace-context header, in NATS headers and gRPC metadata alike.
pub const TRACEPARENT: &str = "traceparent";

const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const TRACES_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const SERVICE_NAME_ENV: &str = "OTEL_SERVICE_NAME";
const DISABLED_ENV: &str = "OTEL_SDK_DISABLED";

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("OpenTelemetry: cannot build the OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
}

/// Whether the environment asks for traces to be exported.
pub fn configured() -> bool {
    let set = |k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var(DISABLED_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set(ENDPOINT_ENV) || set(TRACES_ENDPOINT_ENV))
}

/// Whether spans are being exported (a provider was installed).
pub fn enabled() -> bool {
    PROVIDER.get().is_some()
}

/// The tracing layer that exports spans, when [`configured`]; `None`
/// otherwise. Must run inside a Tokio runtime (the gRPC channel lives there).
/// Installs the provider once per process: a second call returns `None`.
///
/// # Errors
/// [`TraceError::Exporter`] when the endpoint is unusable; the message names
/// it and the reason.
pub fn layer<S>(service: &str) -> Result<Option<impl tracing_subscriber::Layer<S>>, TraceError>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    if !configured() || PROVIDER.get().is_some() {
        return Ok(None);
    }
    let endpoint = std::env::var(TRACES_ENDPOINT_ENV)
        .or_else(|_| std::env::var(ENDPOINT_ENV))
        .unwrap_or_default();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| TraceError::Exporter {
            endpoint: without_userinfo(&endpoint),
            reason: e
                .to_string()
                .replace(&endpoint, &without_userinfo(&endpoint)),
        })?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var(SERVICE_NAME_ENV).is_err() {
        resource = resource.with_service_name(format!("idsync-{service}"));
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("idsync");
    if PROVIDER.set(provider).is_err() {
        return Ok(None);
    }
    Ok(Some(tracing_opentelemetry::layer().with_tracer(tracer)))
}

/// `endpoint` with any `user:password@` taken out, for messages.
fn without_userinfo(endpoint: &str) -> String {
    let Some((scheme, rest)) = endpoint.split_once("://") else {
        return endpoint.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}{path}"),
        None => endpoint.to_owned(),
    }
}

/// Exports what is still buffered; called once when the service stops.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.shutdown()
    {
        tracing::warn!(error = %e, "could not flush the last traces");
    }
}

/// The `traceparent` of the current span, when traces are exported and the
/// span is part of a sampled trace.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The `traceparent` of `span`, as [`current_traceparent`].
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` (not entered yet) a child of the remote span `traceparent`
/// names; a malformed value is ignored (the span starts a trace of its own).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if !enabled() {
        return;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        // Fails only for a span that is disabled or already started, which
        // then keeps the parent it has.
        let _ = span.set_parent(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_is_named_without_its_credentials() {
        assert_eq!(
            without_userinfo("http://otel:s3cret@collector:4317/x@y"),
            "http://***@collector:4317/x@y"
        );
        assert_eq!(
            without_userinfo("http://collector:4317/v1@x"),
            "http://collector:4317/v1@x"
        );
        assert_eq!(without_userinfo("collector:4317"), "collector:4317");
    }

    #[test]
    fn nothing_is_propagated_while_traces_are_off() {
        // No provider in this test process: no header, and a parent is ignored.
        assert!(!enabled());
        let span = tracing::info_span!("x");
        assert_eq!(traceparent_of(&span), None);
        set_parent(
            &span,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
    }
}
