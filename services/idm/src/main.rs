//! The IDM service binary.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    idsync_runtime::service_main("idm", idsync_idm::run).await
}
