//! `vstor rpc`: a JSON-RPC client for humans and scripts.

use std::path::PathBuf;

use clap::Args;
use serde_json::{Map, Value};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
vstor rpc bdev_malloc_create --name Malloc0 --num_blocks 131072 --block_size 512\n  \
vstor rpc bdev_get_bdevs\n  \
vstor rpc bdev_get_iostat '{\"names\": [\"Malloc0\"]}'\n  \
vstor rpc bdev_malloc_delete --name Malloc0\n  \
vstor rpc save_config > vstor.json   # the whole configuration, for `vstor serve --config`\n\n\
Values are read as JSON when they parse as JSON (numbers, true/false, arrays, objects) and as strings \
otherwise. Dashes in parameter names become underscores (--block-size = --block_size).")]
pub struct RpcArgs {
    /// Daemon's JSON-RPC socket.
    #[arg(short = 's', long, value_name = "PATH", default_value = "/var/tmp/vstor.sock")]
    socket: PathBuf,

    /// Method name (see `vstor rpc rpc_get_methods`).
    method: String,

    /// Parameters: `--name value` pairs, or one JSON object.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "PARAMS")]
    params: Vec<String>,
}

/// Builds the params object from `--key value` pairs or a single JSON object.
pub fn parse_params(args: &[String]) -> Result<Option<Value>, String> {
    if args.is_empty() {
        return Ok(None);
    }
    if args.len() == 1 && !args[0].starts_with("--") {
        return match serde_json::from_str::<Value>(&args[0]) {
            Ok(v @ Value::Object(_)) => Ok(Some(v)),
            Ok(_) => Err(format!("'{}' is not a JSON object", args[0])),
            Err(e) => Err(format!("'{}' is not valid JSON: {e}", args[0])),
        };
    }
    let mut m = Map::new();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        let Some(key) = a.strip_prefix("--") else {
            return Err(format!("expected --name before '{a}'"));
        };
        let (key, raw) = match key.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match it.peek() {
                Some(v) if !v.starts_with("--") => (key.to_string(), it.next().cloned().unwrap_or_default()),
                // A flag with no value is `true`.
                _ => (key.to_string(), "true".to_string()),
            },
        };
        let value = serde_json::from_str::<Value>(&raw).unwrap_or(Value::String(raw));
        m.insert(key.replace('-', "_"), value);
    }
    Ok(Some(Value::Object(m)))
}

pub fn run(a: RpcArgs) -> i32 {
    let params = match parse_params(&a.params) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vstor rpc: {e}");
            return 2;
        }
    };
    let result = if a.method == "save_config" && params.is_none() {
        save_config(&a.socket)
    } else {
        vstor_rpc::server::call(&a.socket, &a.method, params)
    };
    match result {
        Ok(v) => {
            match v {
                Value::String(s) => println!("{s}"),
                other => println!("{}", serde_json::to_string_pretty(&other).unwrap_or_default()),
            }
            0
        }
        Err(e) => {
            eprintln!("vstor rpc: {} failed: {} (code {})", a.method, e.message, e.code);
            1
        }
    }
}

/// `save_config`, as SPDK's client assembles it: every subsystem's `framework_get_config`.
fn save_config(socket: &std::path::Path) -> Result<Value, vstor_rpc::error::RpcError> {
    let subs = vstor_rpc::server::call(socket, "framework_get_subsystems", None)?;
    let mut out = Vec::new();
    for s in subs.as_array().into_iter().flatten() {
        let Some(name) = s.get("subsystem").and_then(Value::as_str) else { continue };
        let config =
            vstor_rpc::server::call(socket, "framework_get_config", Some(serde_json::json!({ "name": name })))?;
        out.push(serde_json::json!({ "subsystem": name, "config": config }));
    }
    Ok(serde_json::json!({ "subsystems": out }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn pairs_become_typed_params() {
        let p = parse_params(&s(&["--name", "Malloc0", "--num-blocks", "1024", "--memfd", "--x=[1,2]"])).unwrap();
        assert_eq!(p, Some(json!({"name": "Malloc0", "num_blocks": 1024, "memfd": true, "x": [1, 2]})));
    }

    #[test]
    fn a_json_object_is_passed_through() {
        assert_eq!(parse_params(&s(&[r#"{"a":1}"#])).unwrap(), Some(json!({"a": 1})));
        assert!(parse_params(&s(&["[1]"])).is_err());
        assert!(parse_params(&s(&["nope"])).is_err());
        assert_eq!(parse_params(&[]).unwrap(), None);
    }
}
