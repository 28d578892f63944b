//! The block-device layer.
//!
//! A [`Bdev`] is shared by every reactor (`Arc<Bdev>`): name, UUID, geometry, claims, statistics
//! and the backend's shared state. I/O goes through a [`BdevChannel`], one per user per reactor,
//! which validates each request (range, length, type, read-only), keeps per-channel statistics and
//! hands it to the backend's per-reactor half. Completions come back through an [`IoSink`] on the
//! same reactor, never re-entrantly from `submit`.
//!
//! Backends: [`null`], [`malloc`] (RAM, optionally a shareable memfd) and [`uring`] (a file or
//! block device through one io_uring per reactor; also serves SPDK's `aio` bdevs).

mod bdev;
mod channel;
pub mod delay;
pub mod error;
mod io;
pub mod malloc;
pub mod mem;
pub mod null;
mod registry;
mod stats;
pub mod uring;

pub use bdev::{validate_name, Bdev, BdevBackend, BdevEvent, BdevParams, Claim, MAX_BLOCK_SIZE};
pub use channel::{BdevChannel, ChannelBackend, IoToken};
pub use io::{BlockRange, IoCallback, IoError, IoOp, IoResult, IoSink, IoType, IoVecs};
pub use registry::BdevRegistry;
pub use smallvec::{smallvec, SmallVec};
pub use stats::{ChannelStats, StatsSnapshot};

/// Errors of bdev management (creation, deletion, claims). I/O errors are [`IoError`].
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    #[error("bdev '{0}' already exists")]
    Exists(String),
    #[error("bdev '{0}' not found")]
    NotFound(String),
    #[error("bdev '{name}' is in use by {owner}")]
    Claimed { name: String, owner: String },
    #[error("bdev '{name}' is a {is}, not a {expected}")]
    WrongType { name: String, is: &'static str, expected: String },
    #[error("invalid {param}: {msg}")]
    InvalidParam { param: &'static str, msg: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

impl BdevError {
    /// The parameter at fault, for RPC errors that must name it.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            BdevError::InvalidParam { param, .. } => Some(param),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
