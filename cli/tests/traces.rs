//! OpenTelemetry traces across processes: the five services each run as
//! their own `idsync serve` process exporting OTLP/gRPC to a collector this
//! test runs on loopback; one change at the source must be one trace —
//! detected, correlated, applied, committed in the IDM and provisioned —
//! its context carried in NATS headers, gRPC metadata and the IDM's outbox.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use idsync::dev::EXAMPLE_CONFIG;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

mod support;
use support::*;

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: BTreeMap<String, String>,
}

/// The smallest OTLP trace collector: it keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

#[tonic::codegen::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| text(a.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                let attributes = span
                    .attributes
                    .iter()
                    .filter_map(|a| Some((a.key.clone(), text(a.value.as_ref()?.value.as_ref()?)?)))
                    .collect();
                kept.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                    attributes,
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        _ => None,
    }
}

const SERVICES: [&str; 5] = ["idm", "detector", "correlator", "applier", "provisioner"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_change_is_one_trace_across_every_service() {
    let mut env = start(EXAMPLE_CONFIG).await;
    env.user_where("jack", "has an account on acme", |u| {
        u.link_to("acme").is_some()
    })
    .await;
    // The in-process services (traces off) make way for processes with traces on.
    for s in SERVICES.iter().rev() {
        env.d.stop_service(s).await.unwrap();
    }
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream_from(listener)),
    );
    let mut replicas = Replicas::new(&env.d.dir);
    replicas.env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone()),
        // Export every 100 ms rather than every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    for service in SERVICES {
        replicas.spawn(service, 0, 0);
        if service == "idm" {
            // The others retry until the IDM answers, but start in order.
            idsync_testkit::eventually("the IDM answers", WAIT, || async {
                Ok(env.admin.get_agreement("hr").await.ok().map(|_| ()))
            })
            .await
            .unwrap();
        }
    }

    set_cn(&env.d.source, "jack", "Jack Traced").await;
    target_where(&env, "cn=jack,o=Acme", "cn follows", |e| {
        values(e, "cn").contains(&"Jack Traced")
    })
    .await;

    // The detector's span for jack's change roots one trace; every service
    // has spans in it.
    let wanted: BTreeSet<String> = SERVICES.iter().map(|s| format!("idsync-{s}")).collect();
    let found = idsync_testkit::eventually("one trace across all services", WAIT, || async {
        let spans = collector.0.lock().unwrap().clone();
        let Some(root) = spans.iter().find(|s| {
            s.name == "change detected"
                && s.attributes
                    .get("dn")
                    .is_some_and(|dn| dn.starts_with("uid=jack,"))
        }) else {
            return Ok(None);
        };
        let trace: Vec<Received> = spans
            .iter()
            .filter(|s| s.trace_id == root.trace_id)
            .cloned()
            .collect();
        let services: BTreeSet<String> = trace.iter().map(|s| s.service.clone()).collect();
        // Services export in their own batches: wait until every parent
        // named has arrived too (a hop that lost the context never will).
        let ids: BTreeSet<&[u8]> = trace.iter().map(|s| s.span_id.as_slice()).collect();
        let whole = trace
            .iter()
            .all(|s| s.span_id == root.span_id || ids.contains(s.parent_span_id.as_slice()));
        // The IDM exports its commit span apart from its call's: wait for
        // it too (asserted below, so a trace without it still fails).
        let committed = trace
            .iter()
            .any(|s| s.service == "idsync-idm" && s.name == "commit");
        Ok((services == wanted && whole && committed).then(|| (root.clone(), trace.clone())))
    })
    .await;
    let (root, trace) = match found {
        Ok(f) => f,
        Err(e) => {
            let spans = collector.0.lock().unwrap().clone();
            let summary: Vec<String> = spans
                .iter()
                .map(|s| format!("{} {} {:02x?}", s.service, s.name, &s.trace_id[..4]))
                .collect();
            panic!("{e}; spans received: {summary:#?}");
        }
    };
    assert!(
        root.parent_span_id.is_empty(),
        "the detection starts the trace"
    );
    assert_eq!(root.service, "idsync-detector");
    // The correlator's handling is the detection's child, across NATS.
    let ids: BTreeSet<&[u8]> = trace.iter().map(|s| s.span_id.as_slice()).collect();
    let correlated = trace
        .iter()
        .find(|s| s.service == "idsync-correlator" && s.name == "message")
        .unwrap();
    assert_eq!(correlated.parent_span_id, root.span_id);
    // Every span but the root has its parent in the same trace: no hop lost.
    for s in trace.iter().filter(|s| s.span_id != root.span_id) {
        assert!(
            ids.contains(s.parent_span_id.as_slice()),
            "{} {}: parent outside the trace: {trace:#?}",
            s.service,
            s.name
        );
    }
    // The IDM's commit (its own span in the applier's batch) and the
    // provisioner's work (through the outbox) are in it.
    assert!(
        trace
            .iter()
            .any(|s| s.service == "idsync-idm" && s.name == "commit"),
        "{trace:#?}"
    );
    assert!(
        trace
            .iter()
            .any(|s| s.service == "idsync-provisioner" && s.name == "message"),
        "{trace:#?}"
    );

    replicas.record_logs();
    replicas.shutdown().await;
    server.abort();
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

/// The listener as the stream of connections tonic serves.
fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| s);
        Some((next, l))
    })
}
