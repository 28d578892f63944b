//! Small bdevs for the harnesses: malloc and null from `vstor_bdev`, and a RAM disk that claims a
//! volatile write cache (so FLUSH, FUA and write-cache-enable paths are reachable without files).

use std::sync::Arc;

use serde_json::Value;
use vstor_bdev::{malloc, null, Bdev, BdevBackend, BdevError, BdevParams, ChannelBackend, IoType};
use vstor_reactor::Reactor;

/// Which bdev a harness runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Malloc,
    Null,
    /// Malloc with a (pretend) volatile write cache.
    Cached,
}

impl Kind {
    /// From two input bits.
    pub fn from_bits(b: u8) -> Self {
        match b & 3 {
            1 => Kind::Null,
            2 => Kind::Cached,
            _ => Kind::Malloc,
        }
    }
}

/// Creates bdev `name` of `bytes` bytes in `block_size`-byte blocks.
pub fn create(kind: Kind, name: &str, block_size: u32, bytes: u64, read_only: bool) -> Arc<Bdev> {
    let p = BdevParams {
        name: name.into(),
        uuid: Some(vstor_bdev_uuid()),
        block_size,
        num_blocks: bytes / u64::from(block_size),
        read_only,
    };
    match kind {
        Kind::Malloc => malloc::create(p, false).expect("malloc bdev"),
        Kind::Null => null::create(p).expect("null bdev"),
        Kind::Cached => {
            let inner = malloc::create(BdevParams { read_only: false, ..p.clone() }, false).expect("malloc bdev");
            Bdev::new(p, Box::new(Cached { inner })).expect("cached bdev")
        }
    }
}

/// A fixed UUID, so identify / INQUIRY data do not vary between runs.
fn vstor_bdev_uuid() -> uuid::Uuid {
    uuid::Uuid::from_u128(0x5eed_0000_0000_4000_8000_0000_0000_0001)
}

struct Cached {
    inner: Arc<Bdev>,
}

impl BdevBackend for Cached {
    fn product_name(&self) -> &'static str {
        "Malloc disk"
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        self.inner.io_type_supported(t)
    }

    fn create_channel(&self, _bdev: &Arc<Bdev>, r: &mut Reactor) -> Result<Box<dyn ChannelBackend>, BdevError> {
        self.inner.backend().create_channel(&self.inner, r)
    }

    fn write_cache(&self) -> bool {
        true
    }

    fn config(&self, _bdev: &Bdev) -> Option<(&'static str, Value)> {
        None
    }
}
