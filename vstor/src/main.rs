//! `vstor`: the daemon (`serve`), an RPC client (`rpc`) and a benchmark (`perf`).

mod perf;
mod rpc_cli;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vstor",
    version,
    about = "Userspace storage target: serves block devices to VMs over vhost-user and vfio-user",
    long_about = "vstor serves block devices (bdevs: RAM, null, files and block devices through io_uring) to \
virtual machines from per-core polled reactors. It is managed over JSON-RPC on a UNIX socket with SPDK's \
method names, so SPDK's own client (`spdk-rpc -s SOCK ...`) and JSON config files work with it."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Serve(serve::ServeArgs),
    /// Call a JSON-RPC method on a running daemon and print the result.
    Rpc(rpc_cli::RpcArgs),
    /// Benchmark a bdev inside this process (like SPDK's bdevperf).
    Perf(perf::PerfArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Serve(a) => serve::run(a),
        Cmd::Rpc(a) => rpc_cli::run(a),
        Cmd::Perf(a) => perf::run(a),
    };
    std::process::exit(code);
}

/// Sets up logging to stderr at `level` (or `RUST_LOG` when set).
pub(crate) fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},vstor={level}")));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}
