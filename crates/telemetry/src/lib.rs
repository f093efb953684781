//! What a service tells its operators while it runs: Prometheus metrics and
//! health and readiness over a small HTTP listener (`/metrics`, `/healthz`,
//! `/readyz`), for Kubernetes probes and scraping, and OpenTelemetry traces
//! exported over OTLP when configured.
//!
//! The registry is process-wide and lock-protected: a handful of series
//! updated once per message costs nothing next to a message's LDAP and gRPC
//! round trips, and it needs no metrics framework.

pub mod health;
pub mod metrics;
pub mod trace;
