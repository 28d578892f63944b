//! Library half of the `vstor` binary: the benchmark (`vstor perf`) and the vhost-user-blk client
//! it and the integration tests use.

pub mod blkclient;
pub mod perf;

/// Sets up logging to stderr at `level` (or `RUST_LOG` when set).
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},vstor={level}")));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
