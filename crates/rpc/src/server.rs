//! The JSON-RPC 2.0 server on a UNIX socket.
//!
//! Requests are JSON values one after another on the stream, with or without newlines between
//! them (SPDK's client sends pretty-printed objects with no separator), or batches (arrays). Each
//! connection has its own thread, so a client that stalls mid-request holds only that thread.
//! Requests are bounded in size; a malformed one gets a parse error and the connection is closed.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::{json, Value};

use crate::app::App;
use crate::error::{RpcError, INTERNAL_ERROR, INVALID_REQUEST, PARSE_ERROR};

/// Connections served at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 1024;

/// A running server. Dropping it (or [`stop`](Self::stop)) closes the socket and removes the file.
pub struct RpcServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RpcServer({})", self.path.display())
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("RPC socket {0} is in use by a running process (is another vstor running?)")]
    InUse(PathBuf),
    #[error("RPC socket {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Creates a UNIX socket at `path` with permissions `mode`, replacing a stale file but refusing
/// one a live process listens on.
pub fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, ServeError> {
    let io = |source| ServeError::Io { path: path.to_path_buf(), source };
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let l = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(l)
}

impl RpcServer {
    /// Starts serving `app` at `path`.
    pub fn start(app: Arc<App>, path: &Path, mode: u32) -> Result<Self, ServeError> {
        let listener = bind_unix(path, mode)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let active = Arc::new(AtomicUsize::new(0));
        let accept = std::thread::Builder::new()
            .name("rpc_accept".into())
            .spawn(move || accept_loop(app, listener, stop2, active))
            .map_err(|source| ServeError::Io { path: path.to_path_buf(), source })?;
        tracing::info!(socket = %path.display(), "JSON-RPC server listening");
        Ok(Self { path: path.to_path_buf(), stop, accept: Some(accept) })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, removes the socket file. Connections in progress finish their request.
    pub fn stop(&mut self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocking accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(j) = self.accept.take() {
            let _ = j.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(app: Arc<App>, listener: UnixListener, stop: Arc<AtomicBool>, active: Arc<AtomicUsize>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("RPC accept failed: {e}");
                // EMFILE and friends: back off instead of spinning.
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let e = RpcError::new(INTERNAL_ERROR, format!("too many RPC connections (limit {MAX_CONNECTIONS})"));
            let _ = write_value(&mut stream, &error_response(Value::Null, &e));
            continue;
        }
        let app = app.clone();
        let active2 = active.clone();
        let spawned = std::thread::Builder::new().name("rpc_conn".into()).stack_size(512 << 10).spawn(move || {
            serve_connection(&app, stream);
            active2.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("cannot start RPC connection thread: {e}");
        }
    }
}

fn write_value(stream: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut out = serde_json::to_vec_pretty(v).unwrap_or_default();
    out.push(b'\n');
    stream.write_all(&out)
}

fn error_response(id: Value, e: &RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() })
}

/// Serves one connection until the client closes it or sends something unparseable.
pub fn serve_connection(app: &Arc<App>, mut stream: UnixStream) {
    let max = app.opts.max_request;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        // Answer every complete request in the buffer.
        loop {
            let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            match it.next() {
                None => {
                    buf.clear();
                    break;
                }
                Some(Ok(v)) => {
                    let used = it.byte_offset();
                    buf.drain(..used);
                    if let Some(resp) = handle_value(app, v) {
                        if write_value(&mut stream, &resp).is_err() {
                            return; // the client went away
                        }
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    let err = RpcError::new(PARSE_ERROR, format!("Parse error: {e}"));
                    let _ = write_value(&mut stream, &error_response(Value::Null, &err));
                    return;
                }
            }
        }
        if buf.len() > max {
            let err = RpcError::new(INVALID_REQUEST, format!("request larger than the {max}-byte limit"));
            tracing::info!("closing RPC connection: {}", err.message);
            let _ = write_value(&mut stream, &error_response(Value::Null, &err));
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// Handles a request or a batch. `None` when nothing is to be sent (notifications only).
fn handle_value(app: &Arc<App>, v: Value) -> Option<Value> {
    match v {
        Value::Array(reqs) if reqs.is_empty() => {
            Some(error_response(Value::Null, &RpcError::new(INVALID_REQUEST, "Invalid request: empty batch")))
        }
        Value::Array(reqs) => {
            let out: Vec<Value> = reqs.into_iter().filter_map(|r| handle_one(app, r)).collect();
            if out.is_empty() {
                None
            } else {
                Some(Value::Array(out))
            }
        }
        other => handle_one(app, other),
    }
}

fn handle_one(app: &Arc<App>, req: Value) -> Option<Value> {
    let Value::Object(mut obj) = req else {
        return Some(error_response(Value::Null, &RpcError::new(INVALID_REQUEST, "Invalid request: not an object")));
    };
    let id = obj.remove("id");
    let reply_id = id.clone().unwrap_or(Value::Null);
    if let Some(v) = obj.get("jsonrpc") {
        if v != "2.0" {
            return Some(error_response(
                reply_id,
                &RpcError::new(INVALID_REQUEST, "Invalid request: jsonrpc must be \"2.0\""),
            ));
        }
    }
    let Some(Value::String(method)) = obj.remove("method") else {
        return Some(error_response(reply_id, &RpcError::new(INVALID_REQUEST, "Invalid request: no method name")));
    };
    let params = obj.remove("params");
    let app2 = app.clone();
    let m2 = method.clone();
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || app2.call(&m2, params))).unwrap_or_else(|_| {
            tracing::error!(method, "RPC handler panicked");
            Err(RpcError::new(INTERNAL_ERROR, format!("internal error in {method}")))
        });
    // No id: a notification, answered with nothing.
    id.as_ref()?;
    Some(match result {
        Ok(r) => json!({ "jsonrpc": "2.0", "id": reply_id, "result": r }),
        Err(e) => error_response(reply_id, &e),
    })
}

/// A minimal client: sends one request, returns the result or the error.
pub fn call(socket: &Path, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| RpcError::new(INTERNAL_ERROR, format!("cannot connect to {}: {e}", socket.display())))?;
    let mut req = json!({ "jsonrpc": "2.0", "id": 1, "method": method });
    if let Some(p) = params {
        req["params"] = p;
    }
    write_value(&mut s, &req).map_err(|e| RpcError::new(INTERNAL_ERROR, format!("sending request: {e}")))?;
    let mut de = serde_json::Deserializer::from_reader(&mut s).into_iter::<Value>();
    let resp = match de.next() {
        Some(Ok(v)) => v,
        Some(Err(e)) => return Err(RpcError::new(INTERNAL_ERROR, format!("reading response: {e}"))),
        None => return Err(RpcError::new(INTERNAL_ERROR, "connection closed without a response")),
    };
    if let Some(e) = resp.get("error") {
        return Err(RpcError::new(
            e.get("code").and_then(Value::as_i64).and_then(|c| i32::try_from(c).ok()).unwrap_or(INTERNAL_ERROR),
            e.get("message").and_then(Value::as_str).unwrap_or("unknown error").to_string(),
        ));
    }
    Ok(resp.get("result").cloned().unwrap_or(Value::Null))
}
