//! The applier service binary.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    idsync_runtime::service_main("applier", idsync_applier::run).await
}
