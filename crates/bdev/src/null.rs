//! `null` bdevs: every I/O succeeds at once; reads return zeroes, writes are dropped.

use std::sync::Arc;

use serde_json::{json, Value};
use vstor_reactor::Reactor;

use crate::{Bdev, BdevBackend, BdevError, BdevParams, ChannelBackend, IoOp, IoToken, IoType};

/// Product name, as SPDK prints it.
pub const PRODUCT: &str = "Null disk";

struct NullBackend;

impl BdevBackend for NullBackend {
    fn product_name(&self) -> &'static str {
        PRODUCT
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        matches!(t, IoType::Read | IoType::Write | IoType::Flush | IoType::Reset | IoType::Unmap | IoType::WriteZeroes)
    }

    fn create_channel(&self, _bdev: &Arc<Bdev>, _r: &mut Reactor) -> Result<Box<dyn ChannelBackend>, BdevError> {
        Ok(Box::new(NullChannel))
    }

    fn config(&self, bdev: &Bdev) -> Option<(&'static str, Value)> {
        Some((
            "bdev_null_create",
            json!({
                "name": bdev.name(),
                "uuid": bdev.uuid().to_string(),
                "num_blocks": bdev.num_blocks(),
                "block_size": bdev.block_size(),
            }),
        ))
    }
}

struct NullChannel;

impl ChannelBackend for NullChannel {
    fn submit(&mut self, op: IoOp, token: IoToken) {
        let r = self.try_now(&op).unwrap_or(Ok(()));
        token.defer(r);
    }

    fn try_now(&mut self, op: &IoOp) -> Option<crate::IoResult> {
        if let IoOp::Read { iovs, .. } = op {
            iovs.zero();
        }
        Some(Ok(()))
    }
}

/// Creates a null bdev (not yet registered).
pub fn create(p: BdevParams) -> Result<Arc<Bdev>, BdevError> {
    Bdev::new(p, Box::new(NullBackend))
}
