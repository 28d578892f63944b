//! virtio-blk (virtio 1.x section 5.2): feature bits, configuration space, and the request
//! handler that turns chains into bdev I/O with iovecs pointing into guest memory.

use std::rc::Rc;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use vstor_bdev::{Bdev, BdevChannel, BlockRange, IoCallback, IoError, IoOp, IoResult, IoType, IoVecs, SmallVec};
use vstor_reactor::Reactor;
use vstor_virtio::DescChain;

use crate::queue::{QueueCell, QueueCore, QueueHandler};

/// Sector size of the virtio-blk protocol (capacity and request sectors are in these units).
const SECTOR: u64 = 512;
/// Largest data segment announced (SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data segments per request announced (SEG_MAX); QEMU's own virtio-blk uses queue size - 2.
pub const SEG_MAX: u32 = 126;
/// Most discard segments per request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Largest discard / write-zeroes request in sectors.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
const GET_ID_BYTES: usize = 20;

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// A virtio-blk device: its bdev and what it offers. Shared by all queues and sessions.
#[derive(Debug)]
pub struct BlkDevice {
    pub bdev: Arc<Bdev>,
    pub readonly: bool,
    pub num_queues: u16,
    /// The controller's name: the owner its queues activate the bdev as.
    pub owner: String,
}

impl BlkDevice {
    pub fn new(bdev: Arc<Bdev>, readonly: bool, num_queues: u16, owner: &str) -> Self {
        Self { bdev, readonly, num_queues, owner: owner.to_string() }
    }

    fn ro(&self) -> bool {
        self.readonly || self.bdev.read_only()
    }

    /// Device feature bits (transport and ring bits are added by the vhost layer).
    pub fn features(&self) -> u64 {
        let b = &self.bdev;
        let mut f = bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_MQ);
        if b.io_type_supported(IoType::Flush) && b.write_cache() {
            f |= bit(VIRTIO_BLK_F_FLUSH);
        }
        if self.ro() {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            if b.io_type_supported(IoType::Unmap) {
                f |= bit(VIRTIO_BLK_F_DISCARD);
            }
            if b.io_type_supported(IoType::WriteZeroes) {
                f |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
            }
        }
        f
    }

    /// `struct virtio_blk_config` (little-endian), 60 bytes.
    pub fn config(&self) -> Vec<u8> {
        let b = &self.bdev;
        let bs = b.block_size();
        let mut c = vec![0u8; 60];
        let put32 = |c: &mut Vec<u8>, off: usize, v: u32| c[off..off + 4].copy_from_slice(&v.to_le_bytes());
        c[0..8].copy_from_slice(&(b.size_bytes() / SECTOR).to_le_bytes()); // capacity
        put32(&mut c, 8, SIZE_MAX);
        put32(&mut c, 12, SEG_MAX);
        // geometry (16..20) not offered
        put32(&mut c, 20, bs); // blk_size
        c[24] = 0; // physical_block_exp
        c[25] = 0; // alignment_offset
        c[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size (blocks)
        put32(&mut c, 28, 0); // opt_io_size
        c[32] = u8::from(self.features() & bit(VIRTIO_BLK_F_FLUSH) != 0); // writeback
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        put32(&mut c, 36, MAX_DISCARD_SECTORS);
        put32(&mut c, 40, MAX_DISCARD_SEG);
        put32(&mut c, 44, bs / 512); // discard_sector_alignment
        put32(&mut c, 48, MAX_DISCARD_SECTORS); // max_write_zeroes_sectors
        put32(&mut c, 52, 1); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// The GET_ID string: the bdev name, cut to 20 bytes.
    fn id(&self) -> Vec<u8> {
        let mut v = self.bdev.name().as_bytes().to_vec();
        v.truncate(GET_ID_BYTES);
        v
    }
}

/// One request in flight. (The queue keeps the guest memory it points into mapped until no
/// request is in flight; see `QueueCore::set_memory`.)
struct Req {
    ndesc: u16,
    /// Bytes written to the driver on success (data + status).
    written: u32,
    /// The chain's device-writable buffers: read data, then the status byte (the last byte).
    /// Kept whole so the status needs no list of its own and a migration's dirty log can be
    /// told every page the device wrote.
    writable: IoVecs,
}

/// Per-queue virtio-blk handler.
pub struct BlkHandler {
    dev: Arc<BlkDevice>,
    ch: BdevChannel,
    reqs: Vec<Option<Req>>,
    features: u64,
}

impl BlkHandler {
    /// Opens this queue's bdev channel on reactor `r`.
    pub fn new(
        dev: Arc<BlkDevice>,
        r: &mut Reactor,
        queue_size: u16,
        features: u64,
    ) -> Result<Self, vstor_bdev::BdevError> {
        let ch = BdevChannel::new(dev.bdev.clone(), r)?;
        let mut reqs = Vec::new();
        reqs.resize_with(usize::from(queue_size), || None);
        Ok(Self { dev, ch, reqs, features })
    }

    /// Writes the status into the last byte of `writable` and returns the chain. Every page of
    /// `writable` is marked for a migration's dirty log: data the device (or io_uring, behind our
    /// back) wrote as well as the status; marking a page not written costs one more page copy.
    fn finish(core: &mut QueueCore, head: u16, ndesc: u16, writable: &IoVecs, status: u32, written: u32) {
        let byte = u8::try_from(status).unwrap_or(1); // VIRTIO_BLK_S_IOERR
        writable.set_last_byte(byte);
        core.mark_written(writable);
        core.complete(head, ndesc, written);
    }

    /// Maps a bdev result to the virtio-blk status byte. Exhaustive on purpose.
    fn status_of(r: &IoResult) -> u32 {
        match r {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(IoError::Unsupported) => VIRTIO_BLK_S_UNSUPP,
            Err(IoError::OutOfRange)
            | Err(IoError::InvalidLength)
            | Err(IoError::ReadOnly)
            | Err(IoError::Os(_))
            | Err(IoError::Aborted)
            | Err(IoError::NoMemory) => VIRTIO_BLK_S_IOERR,
        }
    }

    /// Converts a 512-byte-sector range to bdev blocks; `None` if misaligned or overflowing.
    fn blocks(&self, sector: u64, bytes: u64) -> Option<(u64, u64)> {
        let bs = u64::from(self.dev.bdev.block_size());
        let off = sector.checked_mul(SECTOR)?;
        if !off.is_multiple_of(bs) || !bytes.is_multiple_of(bs) {
            return None;
        }
        Some((off / bs, bytes / bs))
    }

    /// Parses discard / write-zeroes segments (virtio 5.2.6: 16 bytes each).
    fn segments(&self, chain: &DescChain, write_zeroes: bool) -> Result<SmallVec<[BlockRange; 1]>, u32> {
        let payload = chain.readable.total_len().saturating_sub(16);
        if payload == 0 || !payload.is_multiple_of(16) {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let n = payload / 16;
        let max = if write_zeroes { 1 } else { u64::from(MAX_DISCARD_SEG) };
        if n > max {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let mut out = SmallVec::new();
        for i in 0..n {
            let mut s = [0u8; 16];
            chain.readable.copy_to_at(16 + i * 16, &mut s);
            let sector = u64::from_le_bytes(s[0..8].try_into().unwrap_or_default());
            let num = u32::from_le_bytes(s[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(s[12..16].try_into().unwrap_or_default());
            // Only WRITE_ZEROES may carry the UNMAP flag (bit 0); other bits are reserved.
            let allowed = if write_zeroes { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } else { 0 };
            if flags & !allowed != 0 || num > MAX_DISCARD_SECTORS {
                return Err(VIRTIO_BLK_S_UNSUPP);
            }
            let (off, cnt) = self.blocks(sector, u64::from(num) * SECTOR).ok_or(VIRTIO_BLK_S_IOERR)?;
            out.push(BlockRange { offset_blocks: off, num_blocks: cnt });
        }
        Ok(out)
    }
}

impl QueueHandler for BlkHandler {
    fn handle(&mut self, core: &mut QueueCore, chain: DescChain, me: &Rc<QueueCell>) {
        let (head, ndesc) = (chain.head, chain.ndesc);
        let wlen = chain.writable.total_len();
        // virtio 5.2.6: the status byte is the last device-writable byte. Without one, the request
        // cannot be answered: return it with nothing written.
        if wlen == 0 || usize::from(head) >= self.reqs.len() {
            core.complete(head, ndesc, 0);
            return;
        }
        let writable = &chain.writable;
        let mut hdr = [0u8; 16];
        if chain.readable.total_len() < 16 {
            return Self::finish(core, head, ndesc, writable, VIRTIO_BLK_S_IOERR, 1);
        }
        chain.readable.copy_to(&mut hdr);
        let rtype = u32::from_le_bytes(hdr[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        let data_in_len = wlen - 1;
        let op = match rtype {
            VIRTIO_BLK_T_IN => {
                let Some((off, n)) = self.blocks(sector, data_in_len) else {
                    return Self::finish(core, head, ndesc, writable, VIRTIO_BLK_S_IOERR, 1);
                };
                let iovs = chain.writable.sub(0, data_in_len).unwrap_or_default();
                (IoOp::Read { offset_blocks: off, num_blocks: n, iovs }, u32::try_from(wlen).unwrap_or(u32::MAX))
            }
            VIRTIO_BLK_T_OUT => {
                if self.dev.ro() {
                    return Self::finish(core, head, ndesc, writable, VIRTIO_BLK_S_IOERR, 1);
                }
                let len = chain.readable.total_len() - 16;
                let Some((off, n)) = self.blocks(sector, len) else {
                    return Self::finish(core, head, ndesc, writable, VIRTIO_BLK_S_IOERR, 1);
                };
                let iovs = chain.readable.sub(16, len).unwrap_or_default();
                (IoOp::Write { offset_blocks: off, num_blocks: n, iovs, fua: false }, 1)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.dev.bdev.io_type_supported(IoType::Flush) {
                    return Self::finish(core, head, ndesc, writable, VIRTIO_BLK_S_OK, 1);
                }
                (IoOp::Flush, 1)
            }
            VIRTIO_BLK_T_GET_ID => {
                let id = self.dev.id();
                let mut buf = [0u8; GET_ID_BYTES];
                buf[..id.len()].copy_from_slice(&id);
                let n = usize::try_from(data_in_len).unwrap_or(0).min(GET_ID_BYTES);
                chain.writable.copy_from(&buf[..n]);
                let written = u32::try_from(n).unwrap_or(0) + 1;
                return Self::finish(core, head, ndesc, writable, VIRTIO_BLK_S_OK, written);
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let wz = rtype == VIRTIO_BLK_T_WRITE_ZEROES;
                let feature = if wz { VIRTIO_BLK_F_WRITE_ZEROES } else { VIRTIO_BLK_F_DISCARD };
                if self.features & bit(feature) == 0 || self.dev.ro() {
                    return Self::finish(core, head, ndesc, writable, VIRTIO_BLK_S_UNSUPP, 1);
                }
                let ranges = match self.segments(&chain, wz) {
                    Ok(r) => r,
                    Err(s) => return Self::finish(core, head, ndesc, writable, s, 1),
                };
                if wz {
                    let r = ranges[0];
                    (IoOp::WriteZeroes { offset_blocks: r.offset_blocks, num_blocks: r.num_blocks }, 1)
                } else {
                    (IoOp::Unmap { ranges }, 1)
                }
            }
            _ => return Self::finish(core, head, ndesc, writable, VIRTIO_BLK_S_UNSUPP, 1),
        };
        let (op, written) = op;
        if let IoOp::Read { num_blocks: 0, .. } | IoOp::Write { num_blocks: 0, .. } = op {
            return Self::finish(core, head, ndesc, writable, VIRTIO_BLK_S_OK, written);
        }
        self.reqs[usize::from(head)] = Some(Req { ndesc, written, writable: chain.writable });
        if let Some(result) = self.ch.try_submit(op, IoCallback { sink: me.clone(), tag: u64::from(head) }) {
            // Completed at once (RAM or null bdev, or refused): answer without a callback.
            self.io_done(core, u64::from(head), result);
        }
    }

    fn bad_chain(&mut self, core: &mut QueueCore, head: u16, ndesc: u16) {
        // Unusable (a buffer outside guest memory, say), but if it ends in a writable byte the
        // driver will read that as the status: report an error there rather than leave it be.
        match core.bad_chain_last_byte(head) {
            Some(status) => Self::finish(core, head, ndesc, &status, VIRTIO_BLK_S_IOERR, 1),
            None => core.complete(head, ndesc, 0),
        }
    }

    fn io_done(&mut self, core: &mut QueueCore, tag: u64, result: IoResult) {
        let Some(req) = usize::try_from(tag).ok().and_then(|i| self.reqs.get_mut(i)).and_then(Option::take) else {
            tracing::error!(ctrlr = %core.name, tag, "completion for a request not in flight");
            return;
        };
        let head = u16::try_from(tag).unwrap_or(0);
        let status = Self::status_of(&result);
        let written = if result.is_ok() { req.written } else { 1 };
        Self::finish(core, head, req.ndesc, &req.writable, status, written);
    }
}
