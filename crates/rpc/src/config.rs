//! SPDK-format JSON configuration: the subsystem list, the per-subsystem dump that
//! `framework_get_config` returns, and loading a file at start.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::app::App;

/// A configuration subsystem as `framework_get_subsystems` lists it.
pub struct Subsystem {
    pub name: &'static str,
    pub depends_on: &'static [&'static str],
    /// The calls that recreate the subsystem's current state.
    pub dump: fn(&App) -> Vec<Value>,
}

/// Subsystems in initialisation order (dependencies first).
pub fn subsystems() -> Vec<Subsystem> {
    vec![
        Subsystem { name: "bdev", depends_on: &[], dump: crate::methods::bdev::dump_config },
        Subsystem { name: "vhost_blk", depends_on: &["bdev"], dump: crate::methods::vhost::dump_blk_config },
        Subsystem { name: "vhost_scsi", depends_on: &["bdev"], dump: crate::methods::vhost::dump_scsi_config },
        Subsystem { name: "nvmf", depends_on: &["bdev"], dump: crate::methods::nvmf::dump_config },
    ]
}

/// Why a config file could not be applied. The message names the file, the entry and the
/// parameter.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Applies an SPDK JSON config file through the RPC methods.
pub fn load_file(app: &Arc<App>, path: &Path) -> Result<usize, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError(format!("config {}: {e}", path.display())))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| ConfigError(format!("config {}: not valid JSON: {e}", path.display())))?;
    load_value(app, &v, &path.display().to_string())
}

/// Applies a parsed config; `origin` names it in errors. Returns the number of calls made.
pub fn load_value(app: &Arc<App>, v: &Value, origin: &str) -> Result<usize, ConfigError> {
    let err = |m: String| ConfigError(format!("config {origin}: {m}"));
    let subs = v
        .get("subsystems")
        .and_then(Value::as_array)
        .ok_or_else(|| err("no \"subsystems\" array at the top level".into()))?;
    // Apply in our subsystem order, whatever order the file lists them in, so dependencies
    // (bdevs before the controllers that use them) are met.
    let order: Vec<&str> = subsystems().iter().map(|s| s.name).collect();
    let mut sorted: Vec<&Value> = subs.iter().collect();
    sorted.sort_by_key(|s| {
        let n = s.get("subsystem").and_then(Value::as_str).unwrap_or("");
        order.iter().position(|o| *o == n).unwrap_or(usize::MAX)
    });
    let mut calls = 0;
    for s in sorted {
        let name = s
            .get("subsystem")
            .and_then(Value::as_str)
            .ok_or_else(|| err("a subsystem entry has no \"subsystem\" name".into()))?;
        let config = match s.get("config") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a,
            Some(_) => return Err(err(format!("subsystem '{name}': \"config\" must be an array"))),
        };
        for (i, entry) in config.iter().enumerate() {
            // SPDK may write batches (arrays of calls); flatten them.
            let entries: Vec<&Value> = match entry {
                Value::Array(a) => a.iter().collect(),
                e => vec![e],
            };
            for e in entries {
                let method = e
                    .get("method")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err(format!("subsystem '{name}' entry {i}: no \"method\"")))?;
                let params = e.get("params").cloned();
                app.call(method, params)
                    .map_err(|r| err(format!("subsystem '{name}' entry {i}: method {method}: {}", r.message)))?;
                calls += 1;
            }
        }
    }
    Ok(calls)
}

/// The whole configuration, as `spdk-rpc save_config` would assemble it.
pub fn save(app: &App) -> Value {
    let subs: Vec<Value> =
        subsystems().iter().map(|s| json!({ "subsystem": s.name, "config": (s.dump)(app) })).collect();
    json!({ "subsystems": subs })
}
