//! `jsonrpc` and `config`: bytes a client writes to the JSON-RPC socket, served by
//! `vstor_rpc::server::serve_connection` (the stream parser, batches, the method table and every
//! method) against an `App` on one reactor; and bytes as a JSON config file loaded by
//! `vstor_rpc::config::load_file`.
//!
//! After each input the harness deletes every vhost controller and bdev it created, so inputs do
//! not depend on each other.
//!
//! Two things are kept out of reach, by skipping inputs that contain them:
//! - a `"timeout"` key: `bdev_get_bdevs` then waits up to 60 s for a bdev to appear (by design),
//!   which would only slow the fuzzer down;
//! - a `"filename"` or `"traddr"` value with a `/`: file bdevs and vfio-user listeners may only
//!   use the harness's own directory (it holds `disk.img`), never the host's files.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value;
use vstor_reactor::{CpuMask, Mode, ReactorConfig, Reactors};
use vstor_rpc::{App, AppOptions, Shutdown};

struct Env {
    app: Arc<App>,
    dir: PathBuf,
    _shutdown: std::sync::mpsc::Receiver<Shutdown>,
}

static ENV: OnceLock<Mutex<Env>> = OnceLock::new();

impl Env {
    fn new() -> Self {
        let dir = crate::sandbox("rpc");
        std::fs::File::create(dir.join("disk.img")).and_then(|f| f.set_len(1 << 20)).expect("disk.img");
        // Relative filenames resolve inside the sandbox.
        std::env::set_current_dir(&dir).expect("chdir to the sandbox");
        let reactors = Reactors::start(
            &CpuMask::from_cores(0..1),
            ReactorConfig {
                mode: Mode::Adaptive,
                idle_threshold: std::time::Duration::from_micros(200),
                pin: false,
                ..Default::default()
            },
        )
        .expect("reactors");
        let opts = AppOptions {
            rpc_socket: dir.join("rpc.sock"),
            socket_dir: dir.clone(),
            max_request: 4 << 20,
            socket_mode: 0o600,
            live_migration: true,
        };
        let (app, rx) = App::new(opts, reactors);
        Self { app, dir, _shutdown: rx }
    }

    /// Deletes every controller, then every bdev (repeating while claims between bdevs, such as a
    /// delay bdev's on its base, let some go only after others).
    fn clean(&self) {
        // NVMe-oF subsystems, through the methods (their listeners hold bdevs). The transport
        // cannot be deleted and stays.
        if let Ok(Value::Array(subs)) = self.app.call("nvmf_get_subsystems", None) {
            for s in subs {
                if let Some(nqn) = s.get("nqn").and_then(Value::as_str).filter(|_| s["subtype"] != "Discovery") {
                    let _ = self.app.call("nvmf_delete_subsystem", Some(serde_json::json!({ "nqn": nqn })));
                }
            }
        }
        for c in self.app.vhost.list() {
            self.app.vhost.delete(c.name()).expect("delete a controller with no frontend");
        }
        loop {
            let all = self.app.bdevs.list();
            if all.is_empty() {
                break;
            }
            let mut progress = false;
            for b in all {
                progress |= self.app.bdevs.unregister(b.name(), b.product_name()).is_ok();
            }
            assert!(progress, "bdevs left that cannot be deleted: {:?}", self.app.bdevs.list());
        }
    }
}

fn env() -> std::sync::MutexGuard<'static, Env> {
    ENV.get_or_init(|| Mutex::new(Env::new())).lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `v` has a key the harness keeps away from (see the module documentation).
fn unwanted(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, v)| {
            let path = k == "filename" || k == "traddr";
            k == "timeout" || (path && v.as_str().is_some_and(|s| s.contains('/'))) || unwanted(v)
        }),
        Value::Array(a) => a.iter().any(unwanted),
        _ => false,
    }
}

/// Every JSON value the server would act on, in order (it stops at the first parse error).
fn stream_values(data: &[u8]) -> Vec<Value> {
    serde_json::Deserializer::from_slice(data).into_iter::<Value>().map_while(Result::ok).collect()
}

/// A JSON-RPC 2.0 response object.
fn check_response(v: &Value) {
    let Value::Object(m) = v else { panic!("response is not an object: {v}") };
    assert_eq!(m.get("jsonrpc"), Some(&Value::String("2.0".into())), "response {v}");
    assert!(m.contains_key("id"), "response without id: {v}");
    assert!(m.contains_key("result") != m.contains_key("error"), "response needs result xor error: {v}");
    if let Some(e) = m.get("error") {
        assert!(e.get("code").is_some_and(Value::is_i64), "error without a code: {v}");
        assert!(e.get("message").is_some_and(Value::is_string), "error without a message: {v}");
    }
}

pub fn jsonrpc(data: &[u8]) {
    if stream_values(data).iter().any(unwanted) {
        return;
    }
    let env = env();
    let (mut client, server) = UnixStream::pair().expect("socketpair");
    let app = env.app.clone();
    let t = std::thread::Builder::new()
        .name("rpc_conn".into())
        .stack_size(512 << 10)
        .spawn(move || vstor_rpc::server::serve_connection(&app, server))
        .expect("connection thread");
    // Inputs are far smaller than the socket buffer, so this does not wait for the server.
    client.write_all(data).expect("send request bytes");
    client.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut out = Vec::new();
    client.read_to_end(&mut out).expect("read responses");
    t.join().expect("connection thread panicked");
    for v in serde_json::Deserializer::from_slice(&out).into_iter::<Value>() {
        match v.unwrap_or_else(|e| panic!("server wrote invalid JSON ({e}): {}", String::from_utf8_lossy(&out))) {
            Value::Array(a) => {
                assert!(!a.is_empty(), "empty batch response");
                a.iter().for_each(check_response);
            }
            v => check_response(&v),
        }
    }
    env.clean();
}

pub fn config(data: &[u8]) {
    if serde_json::from_slice::<Value>(data).is_ok_and(|v| unwanted(&v)) {
        return;
    }
    let env = env();
    let path = env.dir.join("config.json");
    std::fs::write(&path, data).expect("write config file");
    let _ = vstor_rpc::config::load_file(&env.app, &path);
    // What was loaded must dump again (save_config after load_config).
    let _ = vstor_rpc::config::save(&env.app);
    env.clean();
}
