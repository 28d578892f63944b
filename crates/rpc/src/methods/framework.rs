//! Framework methods: introspection, config, reactors, version, shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Methods, NoParams};
use crate::app::{App, Shutdown};
use crate::config;
use crate::error::RpcError;

pub(crate) fn register(m: &mut Methods) {
    m.add("rpc_get_methods", rpc_get_methods);
    m.add("spdk_get_version", |_app: &Arc<App>, _: NoParams| Ok(version()));
    m.add("framework_get_subsystems", |_app: &Arc<App>, _: NoParams| {
        Ok(Value::Array(
            config::subsystems().iter().map(|s| json!({ "subsystem": s.name, "depends_on": s.depends_on })).collect(),
        ))
    });
    m.add("framework_get_config", framework_get_config);
    m.add("framework_get_reactors", framework_get_reactors);
    // vstor initialises fully before it serves RPCs, so init is always complete.
    m.add("framework_wait_init", |_app: &Arc<App>, _: NoParams| Ok(json!(true)));
    m.add("spdk_kill_instance", spdk_kill_instance);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetMethods {
    #[serde(default)]
    current: bool,
    #[serde(default)]
    include_aliases: bool,
}

fn rpc_get_methods(app: &Arc<App>, p: GetMethods) -> Result<Value, RpcError> {
    // Every method may be called at any time (no startup-only state), and there are no aliases.
    let _ = (p.current, p.include_aliases);
    Ok(json!(app.methods().names()))
}

/// vstor's version in the shape of SPDK's `spdk_get_version`.
pub fn version() -> Value {
    let v = env!("CARGO_PKG_VERSION");
    let mut it = v.split(['.', '-']);
    let num = |s: Option<&str>| s.and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    let (major, minor, patch) = (num(it.next()), num(it.next()), num(it.next()));
    let suffix = v.find('-').map(|i| v[i..].to_string()).unwrap_or_default();
    json!({
        "version": format!("vstor v{v}"),
        "fields": { "major": major, "minor": minor, "patch": patch, "suffix": suffix },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetConfig {
    name: String,
    #[serde(default)]
    with_batches: bool,
}

fn framework_get_config(app: &Arc<App>, p: GetConfig) -> Result<Value, RpcError> {
    let _ = p.with_batches;
    let subs = config::subsystems();
    let s = subs
        .iter()
        .find(|s| s.name == p.name)
        .ok_or_else(|| RpcError::bad_param("name", format!("subsystem '{}' not found", p.name)))?;
    Ok(Value::Array((s.dump)(app)))
}

fn framework_get_reactors(app: &Arc<App>, _: NoParams) -> Result<Value, RpcError> {
    let mode = app.reactors.config().mode;
    let reactors: Vec<Value> = app
        .reactors
        .handles()
        .iter()
        .map(|h| {
            let s = h.stats();
            let busy = s.busy_ticks.load(Ordering::Relaxed);
            let idle = s.idle_ticks.load(Ordering::Relaxed);
            json!({
                "lcore": h.core(),
                "tid": s.tid.load(Ordering::Relaxed),
                "busy": busy,
                "idle": idle,
                "in_interrupt": mode != vstor_reactor::Mode::Poll,
                "mode": mode.to_string(),
                "sleeps": s.sleeps.load(Ordering::Relaxed),
                "pollers": s.pollers.load(Ordering::Relaxed),
                "lw_threads": [{
                    "name": format!("reactor_{}", h.core()),
                    "id": h.index() + 1,
                    "cpumask": vstor_reactor::CpuMask::from_cores([h.core()]).to_hex(),
                    "elapsed": busy + idle,
                }],
            })
        })
        .collect();
    Ok(json!({ "tick_rate": vstor_reactor::clock::ticks_per_sec(), "pid": std::process::id(), "reactors": reactors }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Kill {
    sig_name: String,
}

fn spdk_kill_instance(app: &Arc<App>, p: Kill) -> Result<Value, RpcError> {
    match p.sig_name.as_str() {
        "SIGINT" | "SIGTERM" => {
            app.request_shutdown(Shutdown::Rpc(p.sig_name));
            Ok(json!(true))
        }
        "SIGKILL" => {
            // As SPDK does: the process kills itself, right after the answer has been written.
            std::thread::spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                std::process::exit(137);
            });
            Ok(json!(true))
        }
        other => Err(RpcError::bad_param("sig_name", format!("'{other}' is not one of SIGINT, SIGTERM, SIGKILL"))),
    }
}
