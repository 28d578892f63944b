//! JSON-RPC errors. Codes follow JSON-RPC 2.0 for protocol errors and SPDK (negative errno) for
//! operational ones, so scripts written for SPDK see the same numbers.

use serde_json::{json, Value};
use vstor_bdev::BdevError;

pub const PARSE_ERROR: i32 = -32700;
pub const INVALID_REQUEST: i32 = -32600;
pub const METHOD_NOT_FOUND: i32 = -32601;
pub const INVALID_PARAMS: i32 = -32602;
pub const INTERNAL_ERROR: i32 = -32603;

/// An error answer: code and a message that says what was wrong, naming the parameter or object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    pub code: i32,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// A bad or missing parameter; the message must name it.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }

    /// `param` has a value vstor cannot accept.
    pub fn bad_param(param: &str, why: impl std::fmt::Display) -> Self {
        Self::new(INVALID_PARAMS, format!("invalid parameter '{param}': {why}"))
    }

    /// An operation failed with errno `errno` (SPDK reports `-errno`).
    pub fn errno(errno: i32, message: impl Into<String>) -> Self {
        Self::new(-errno, message)
    }

    pub fn to_json(&self) -> Value {
        json!({ "code": self.code, "message": self.message })
    }
}

impl From<vstor_vhost::VhostError> for RpcError {
    fn from(e: vstor_vhost::VhostError) -> Self {
        use vstor_vhost::VhostError as V;
        let msg = e.to_string();
        match e {
            V::Exists(_) => RpcError::errno(libc::EEXIST, msg),
            V::NotFound(_) => RpcError::errno(libc::ENODEV, msg),
            V::InUse(_) => RpcError::errno(libc::EBUSY, msg),
            V::InvalidParam { .. } => RpcError::invalid_params(msg),
            V::Socket { source, .. } => RpcError::errno(source.raw_os_error().unwrap_or(libc::EIO), msg),
            V::Bdev(b) => b.into(),
        }
    }
}

impl From<BdevError> for RpcError {
    fn from(e: BdevError) -> Self {
        let msg = e.to_string();
        match &e {
            BdevError::Exists(_) => RpcError::errno(libc::EEXIST, msg),
            BdevError::NotFound(_) => RpcError::errno(libc::ENODEV, msg),
            BdevError::Claimed { .. } => RpcError::errno(libc::EBUSY, msg),
            BdevError::WrongType { .. } => RpcError::errno(libc::EINVAL, msg),
            BdevError::InvalidParam { .. } => RpcError::invalid_params(msg),
            BdevError::Io { source, .. } => RpcError::errno(source.raw_os_error().unwrap_or(libc::EIO), msg),
        }
    }
}
