//! `vstor`: the daemon (`serve`), an RPC client (`rpc`) and a benchmark (`perf`).

mod rpc_cli;
mod serve;

use vstor::{init_logging, perf};

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
