//! Management: an SPDK-compatible JSON-RPC 2.0 server on a UNIX socket, the method table, and
//! SPDK-format JSON config files (load at start, `framework_get_config` to save).
//!
//! Parameters are serde structs: they are the schema. Each subsystem's methods live in one module
//! under [`methods`], next to the code that dumps its config, so that what `save_config` writes is
//! replayed by the same methods.

pub mod app;
pub mod config;
pub mod error;
pub mod methods;
pub mod server;

pub use app::{App, AppOptions, Shutdown};
pub use error::RpcError;
pub use methods::Methods;
