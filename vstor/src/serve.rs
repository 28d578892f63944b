//! `vstor serve`: start reactors, apply the config, serve JSON-RPC, shut down cleanly on SIGTERM,
//! SIGINT or `spdk_kill_instance`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use vstor_reactor::{CpuMask, Mode, ReactorConfig, Reactors};
use vstor_rpc::server::RpcServer;
use vstor_rpc::{App, AppOptions, Shutdown};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// SPDK-format JSON config to apply at start (what `spdk-rpc save_config` writes).
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Start with the built-in default config: a 64 MiB RAM disk `Malloc0` served as the
    /// vhost-user-blk controller `vhost.0` (socket `<socket dir>/vhost.0`).
    #[arg(long, conflicts_with = "config")]
    default_config: bool,

    /// Cores to run reactors on: a hex mask as SPDK writes it (`0x3`) or a core list (`[0,1]`, `0-1`).
    #[arg(short = 'm', long, value_name = "MASK", default_value = "0x1")]
    cpumask: String,

    /// JSON-RPC socket path.
    #[arg(short = 'r', long, value_name = "PATH", default_value = "/var/tmp/vstor.sock")]
    rpc_socket: PathBuf,

    /// Directory for vhost-user controller sockets (SPDK's -S).
    #[arg(short = 'S', long, value_name = "DIR", default_value = "/var/tmp")]
    socket_dir: PathBuf,

    /// What reactors do when idle: `adaptive` (spin while busy, sleep when idle), `poll` (always
    /// spin), `interrupt` (sleep whenever idle).
    #[arg(long, value_name = "MODE", default_value = "adaptive")]
    reactor_mode: Mode,

    /// In adaptive mode, microseconds without work before a reactor sleeps.
    #[arg(long, value_name = "US", default_value_t = 300)]
    idle_us: u64,

    /// Do not pin reactor threads to their cores.
    #[arg(long)]
    no_pin: bool,

    /// Permissions of vhost-user controller sockets (octal). The socket's owner and group can
    /// attach a VM; nobody else can.
    #[arg(long, value_name = "OCTAL", default_value = "660", value_parser = parse_mode)]
    socket_mode: u32,

    /// Confine reactor threads (the ones that parse guest rings and requests) with a seccomp
    /// filter: only the system calls polling, io_uring and memory allocation need; any other
    /// kills the process. x86_64 only.
    #[arg(long)]
    seccomp: bool,

    /// Do not offer dirty logging to vhost-user frontends: QEMU then refuses to live-migrate VMs
    /// whose disks vstor serves (and says so).
    #[arg(long)]
    no_live_migration: bool,

    /// Permissions of the RPC socket (octal).
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = parse_mode)]
    rpc_socket_mode: u32,

    /// Largest JSON-RPC request accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    max_rpc_request: usize,

    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(short = 'L', long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| format!("'{s}' is not an octal file mode"))
}

/// The built-in default configuration.
pub fn default_config() -> serde_json::Value {
    json!({
        "subsystems": [
            { "subsystem": "bdev", "config": [
                { "method": "bdev_malloc_create",
                  "params": { "name": "Malloc0", "num_blocks": 131072, "block_size": 512, "memfd": false } }
            ]},
            { "subsystem": "vhost_blk", "config": [
                { "method": "vhost_create_blk_controller", "params": { "ctrlr": "vhost.0", "dev_name": "Malloc0" } }
            ]}
        ]
    })
}

pub fn run(a: ServeArgs) -> i32 {
    crate::init_logging(&a.log_level);
    let mask = match CpuMask::parse(&a.cpumask) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("vstor: --cpumask: {e}");
            return 2;
        }
    };
    let cfg = ReactorConfig {
        mode: a.reactor_mode,
        idle_threshold: Duration::from_micros(a.idle_us),
        pin: !a.no_pin,
        seccomp: a.seccomp,
    };
    let reactors = match Reactors::start(&mask, cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vstor: cannot start reactors: {e}");
            return 2;
        }
    };
    tracing::info!(cpumask = %mask, mode = %a.reactor_mode, "started {} reactor(s)", mask.len());
    let opts = AppOptions {
        rpc_socket: a.rpc_socket.clone(),
        socket_dir: a.socket_dir.clone(),
        max_request: a.max_rpc_request,
        socket_mode: a.socket_mode,
        live_migration: !a.no_live_migration,
    };
    let (app, shutdown_rx) = App::new(opts, reactors);

    let loaded = if let Some(path) = &a.config {
        vstor_rpc::config::load_file(&app, path)
    } else if a.default_config {
        vstor_rpc::config::load_value(&app, &default_config(), "(built-in default)")
    } else {
        Ok(0)
    };
    match loaded {
        Ok(n) if n > 0 => tracing::info!("applied {n} config call(s)"),
        Ok(_) => {}
        Err(e) => {
            eprintln!("vstor: {e}");
            app.shutdown();
            return 2;
        }
    }

    let mut server = match RpcServer::start(app.clone(), &a.rpc_socket, a.rpc_socket_mode) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vstor: {e}");
            app.shutdown();
            return 2;
        }
    };
    install_signal_handlers(&app);
    print_ready(&app);

    let why = shutdown_rx.recv().unwrap_or(Shutdown::Signal(0));
    tracing::info!(?why, "shutting down");
    server.stop();
    app.shutdown();
    tracing::info!("stopped cleanly");
    0
}

fn install_signal_handlers(app: &Arc<App>) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(mut signals) => {
            let app = app.clone();
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    if let Some(sig) = signals.forever().next() {
                        app.request_shutdown(Shutdown::Signal(sig));
                    }
                })
                .ok();
        }
        Err(e) => tracing::warn!("cannot install signal handlers: {e}"),
    }
}

fn print_ready(app: &Arc<App>) {
    let sock = app.opts.rpc_socket.display();
    tracing::info!("vstor {} ready; manage it with: vstor rpc -s {sock} bdev_get_bdevs", env!("CARGO_PKG_VERSION"));
    let ctrls = app.vhost.list();
    if ctrls.is_empty() {
        return;
    }
    let mut cmd = String::from(
        "qemu-system-x86_64 -machine q35 -accel kvm -smp 2 -m 1G \\\n  \
         -object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem \\\n  \
         -kernel bzImage -initrd initrd.img -append console=ttyS0 -nographic",
    );
    for (i, c) in ctrls.iter().enumerate() {
        cmd.push_str(&format!(
            " \\\n  -chardev socket,id=vstor{i},path={},reconnect=1 -device vhost-user-blk-pci,chardev=vstor{i},num-queues=2",
            c.socket().display()
        ));
    }
    // Printed on stdout so it can be copied; everything else goes to the log on stderr.
    println!("Attach a VM to vstor with:\n{cmd}");
}
