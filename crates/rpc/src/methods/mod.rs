//! The method table and parameter parsing.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::app::App;
use crate::error::{RpcError, INVALID_PARAMS, METHOD_NOT_FOUND};

pub mod bdev;
pub mod framework;
pub mod nvmf;
pub mod vhost;

type Handler = Box<dyn Fn(&Arc<App>, Option<Value>) -> Result<Value, RpcError> + Send + Sync>;

/// Every method vstor answers, by name.
pub struct Methods {
    map: BTreeMap<&'static str, Handler>,
}

impl std::fmt::Debug for Methods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Methods({})", self.map.len())
    }
}

/// Parses `params` into `P`. Absent params parse as `{}`; the error names the parameter at fault.
pub fn parse_params<P: DeserializeOwned>(method: &str, params: Option<Value>) -> Result<P, RpcError> {
    let v = match params {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(v @ Value::Object(_)) => v,
        Some(_) => return Err(RpcError::new(INVALID_PARAMS, format!("{method}: params must be a JSON object"))),
    };
    serde_path_to_error::deserialize::<_, P>(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let msg = if path == "." || path.is_empty() {
            // serde words these as "missing field `x`" / "unknown field `x`, expected ..."
            format!("{method}: {}", inner.replace("field", "parameter"))
        } else {
            format!("{method}: invalid parameter '{path}': {inner}")
        };
        RpcError::new(INVALID_PARAMS, msg)
    })
}

impl Methods {
    /// The full table.
    pub fn new() -> Self {
        let mut m = Self { map: BTreeMap::new() };
        framework::register(&mut m);
        bdev::register(&mut m);
        vhost::register(&mut m);
        nvmf::register(&mut m);
        m
    }

    /// Adds `name`, whose parameters parse into `P`.
    pub fn add<P, F>(&mut self, name: &'static str, f: F)
    where
        P: DeserializeOwned + 'static,
        F: Fn(&Arc<App>, P) -> Result<Value, RpcError> + Send + Sync + 'static,
    {
        let h: Handler = Box::new(move |app, params| {
            let p = parse_params::<P>(name, params)?;
            f(app, p)
        });
        self.map.insert(name, h);
    }

    /// Method names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.map.keys().copied().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Runs `method`.
    pub fn call(&self, app: &Arc<App>, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let h = self
            .map
            .get(method)
            .ok_or_else(|| RpcError::new(METHOD_NOT_FOUND, format!("Method not found: {method}")))?;
        h(app, params)
    }
}

impl Default for Methods {
    fn default() -> Self {
        Self::new()
    }
}

/// Parameters of methods that take none (any unknown parameter is refused).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}
