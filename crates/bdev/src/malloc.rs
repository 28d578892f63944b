//! `malloc` bdevs: a RAM disk. The memory is an anonymous mapping, or a memfd when asked for, so
//! it could be handed to another process later.

use std::sync::Arc;

use serde_json::{json, Value};
use vstor_reactor::Reactor;

use crate::mem::Mapping;
use crate::{Bdev, BdevBackend, BdevError, BdevParams, ChannelBackend, IoOp, IoToken, IoType};

/// Product name, as SPDK prints it.
pub const PRODUCT: &str = "Malloc disk";

struct MallocBackend {
    mem: Arc<Mapping>,
    block_size: u64,
}

impl BdevBackend for MallocBackend {
    fn product_name(&self) -> &'static str {
        PRODUCT
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(t, IoType::Read | IoType::Write | IoType::Flush | IoType::Reset | IoType::Unmap | IoType::WriteZeroes)
    }

    fn create_channel(&self, _bdev: &Arc<Bdev>, _r: &mut Reactor) -> Result<Box<dyn ChannelBackend>, BdevError> {
        Ok(Box::new(MallocChannel { mem: self.mem.clone(), block_size: self.block_size }))
    }

    fn driver_specific(&self) -> Value {
        json!({ "malloc": { "memfd": self.mem.fd().is_some() } })
    }

    fn config(&self, bdev: &Bdev) -> Option<(&'static str, Value)> {
        let mut p = json!({
            "name": bdev.name(),
            "uuid": bdev.uuid().to_string(),
            "num_blocks": bdev.num_blocks(),
            "block_size": bdev.block_size(),
        });
        if self.mem.fd().is_some() {
            p["memfd"] = json!(true);
        }
        Some(("bdev_malloc_create", p))
    }
}

struct MallocChannel {
    mem: Arc<Mapping>,
    block_size: u64,
}

impl MallocChannel {
    /// Pointer to block `offset_blocks`, valid for `num_blocks` blocks. The channel validated the
    /// range against the capacity, which equals the mapping's size.
    fn at(&self, offset_blocks: u64, num_blocks: u64) -> Option<(*mut u8, usize)> {
        let off = usize::try_from(offset_blocks.checked_mul(self.block_size)?).ok()?;
        let len = usize::try_from(num_blocks.checked_mul(self.block_size)?).ok()?;
        if off.checked_add(len)? > self.mem.len() {
            return None;
        }
        // SAFETY: `off + len <= mem.len()`, so the pointer stays inside the mapping.
        Some((unsafe { self.mem.as_ptr().add(off) }, len))
    }
}

impl ChannelBackend for MallocChannel {
    fn submit(&mut self, op: IoOp, token: IoToken) {
        let r = self.try_now(&op).unwrap_or(Ok(()));
        token.defer(r);
    }

    fn try_now(&mut self, op: &IoOp) -> Option<crate::IoResult> {
        Some(match op {
            IoOp::Read { offset_blocks, num_blocks, iovs } => match self.at(*offset_blocks, *num_blocks) {
                Some((p, len)) => {
                    // SAFETY: `p..p+len` is inside the mapping, which lives while `self.mem` does.
                    // Concurrent writers to the same blocks race as on a real disk; no Rust
                    // reference outlives this call.
                    let src = unsafe { std::slice::from_raw_parts(p, len) };
                    iovs.copy_from(src);
                    Ok(())
                }
                None => Err(crate::IoError::OutOfRange),
            },
            IoOp::Write { offset_blocks, num_blocks, iovs, .. } => match self.at(*offset_blocks, *num_blocks) {
                Some((p, len)) => {
                    // SAFETY: as for reads.
                    let dst = unsafe { std::slice::from_raw_parts_mut(p, len) };
                    iovs.copy_to(dst);
                    Ok(())
                }
                None => Err(crate::IoError::OutOfRange),
            },
            IoOp::WriteZeroes { offset_blocks, num_blocks } => self.zero(*offset_blocks, *num_blocks),
            IoOp::Unmap { ranges } => ranges.iter().try_for_each(|r| self.zero(r.offset_blocks, r.num_blocks)),
            IoOp::Flush | IoOp::Reset => Ok(()),
        })
    }
}

impl MallocChannel {
    fn zero(&self, offset_blocks: u64, num_blocks: u64) -> crate::IoResult {
        let (p, len) = self.at(offset_blocks, num_blocks).ok_or(crate::IoError::OutOfRange)?;
        // SAFETY: `p..p+len` is inside the mapping.
        unsafe { std::ptr::write_bytes(p, 0, len) };
        Ok(())
    }
}

/// Creates a malloc bdev (not yet registered). `memfd` backs it with a shareable memfd.
pub fn create(p: BdevParams, memfd: bool) -> Result<Arc<Bdev>, BdevError> {
    let size = p
        .num_blocks
        .checked_mul(u64::from(p.block_size))
        .and_then(|s| usize::try_from(s).ok())
        .ok_or_else(|| BdevError::InvalidParam { param: "num_blocks", msg: "size overflows".into() })?;
    let mem = if memfd { Mapping::memfd(&p.name, size) } else { Mapping::anonymous(size) }.map_err(|source| {
        BdevError::Io { context: format!("allocating {size} bytes for malloc bdev {}", p.name), source }
    })?;
    let block_size = u64::from(p.block_size);
    Bdev::new(p, Box::new(MallocBackend { mem: Arc::new(mem), block_size }))
}
