//! The correlator service binary.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    idsync_runtime::service_main("correlator", idsync_correlator::run).await
}
