//! The detector service binary.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    idsync_runtime::service_main("detector", idsync_detector::run).await
}
