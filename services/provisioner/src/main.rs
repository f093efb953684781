//! The provisioner service binary.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    idsync_runtime::service_main("provisioner", idsync_provisioner::run).await
}
