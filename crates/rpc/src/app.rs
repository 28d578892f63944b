//! The application state every RPC works on.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;
use vstor_bdev::BdevRegistry;
use vstor_reactor::Reactors;
use vstor_vfio_user::NvmfManager;
use vstor_vhost::VhostManager;

use crate::error::RpcError;
use crate::methods::Methods;

/// Settings fixed at start.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// The JSON-RPC socket.
    pub rpc_socket: PathBuf,
    /// Where vhost-user controller sockets go (`-S`).
    pub socket_dir: PathBuf,
    /// Largest request the RPC server reads, in bytes.
    pub max_request: usize,
    /// Permissions of vhost-user and vfio-user sockets.
    pub socket_mode: u32,
    /// Offer dirty logging so VMs can be live-migrated.
    pub live_migration: bool,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            rpc_socket: "/var/tmp/vstor.sock".into(),
            socket_dir: "/var/tmp".into(),
            max_request: 4 << 20,
            socket_mode: 0o660,
            live_migration: true,
        }
    }
}

/// Why the daemon is stopping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shutdown {
    /// A signal arrived (number).
    Signal(i32),
    /// `spdk_kill_instance` asked for it, with this signal name.
    Rpc(String),
}

/// Everything a running vstor holds.
pub struct App {
    pub opts: AppOptions,
    /// NVMe-oF (VFIOUSER) subsystems. Declared before `reactors` so it is dropped first.
    pub nvmf: NvmfManager,
    pub reactors: Reactors,
    pub bdevs: BdevRegistry,
    pub vhost: VhostManager,
    methods: Methods,
    shutdown_tx: Mutex<Option<Sender<Shutdown>>>,
    /// RPCs run one at a time, as in SPDK, so a create and a delete never interleave.
    rpc_lock: Mutex<()>,
    /// For generated names (`Malloc0`, `Malloc1`, ...).
    pub(crate) malloc_seq: AtomicU32,
    pub started: Instant,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "App({:?})", self.opts.rpc_socket)
    }
}

impl App {
    /// Creates the application over started reactors. The receiver yields the shutdown request.
    pub fn new(opts: AppOptions, reactors: Reactors) -> (Arc<App>, Receiver<Shutdown>) {
        let (tx, rx) = mpsc::channel();
        let vhost = VhostManager::new(
            opts.socket_dir.clone(),
            opts.socket_mode,
            reactors.handles().to_vec(),
            opts.live_migration,
        );
        let nvmf = NvmfManager::new(reactors.handles().to_vec(), opts.socket_mode);
        let app = Arc::new(App {
            nvmf,
            opts,
            reactors,
            vhost,
            bdevs: BdevRegistry::new(),
            methods: Methods::new(),
            shutdown_tx: Mutex::new(Some(tx)),
            rpc_lock: Mutex::new(()),
            malloc_seq: AtomicU32::new(0),
            started: Instant::now(),
        });
        (app, rx)
    }

    /// Runs one method, serialised with every other.
    pub fn call(self: &Arc<Self>, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let _g = self.rpc_lock.lock().unwrap_or_else(|e| e.into_inner());
        let r = self.methods.call(self, method, params);
        match &r {
            Ok(_) => tracing::debug!(method, "rpc ok"),
            Err(e) => tracing::info!(method, code = e.code, "rpc failed: {}", e.message),
        }
        r
    }

    /// The method table.
    pub fn methods(&self) -> &Methods {
        &self.methods
    }

    /// Asks the main thread to shut down. Later requests are ignored.
    pub fn request_shutdown(&self, why: Shutdown) {
        if let Some(tx) = self.shutdown_tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            tracing::info!(?why, "shutdown requested");
            let _ = tx.send(why);
        }
    }

    /// Next number for a generated bdev name.
    pub(crate) fn next_malloc_index(&self) -> u32 {
        self.malloc_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Orderly stop: disconnect frontends once their in-flight requests complete, disconnect
    /// vfio-user clients (resetting their controllers), flush every bdev
    /// that has a write cache, then stop the reactors.
    pub fn shutdown(&self) {
        self.vhost.shutdown();
        self.nvmf.shutdown();
        crate::methods::bdev::flush_all(self);
        self.reactors.stop();
    }
}
