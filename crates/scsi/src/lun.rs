//! The shared logical unit: identity, limits and state common to every reactor.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vstor_bdev::{Bdev, BdevEvent, IoType};

/// How a LUN presents its bdev. `Default` gives sensible values for a virtual disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunOptions {
    /// INQUIRY PRODUCT IDENTIFICATION (printable ASCII, at most 16 characters; longer is cut).
    /// `None`: the bdev's product name ("Malloc disk", "URING bdev", ...), as SPDK does.
    pub product: Option<String>,
    /// PRODUCT SERIAL NUMBER of the Unit Serial Number VPD page (printable ASCII, at most 252
    /// characters). `None`: the bdev UUID as 32 hex digits.
    pub serial: Option<String>,
    /// Largest READ/WRITE/VERIFY in bytes (Block Limits MAXIMUM TRANSFER LENGTH, rounded down to
    /// whole blocks, at least one). 0 = no limit.
    pub max_transfer_bytes: u32,
    /// MAXIMUM UNMAP LBA COUNT: blocks one UNMAP command may unmap in total.
    pub max_unmap_blocks: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT (capped at 4095, what a 64 KiB parameter list holds).
    pub max_unmap_descriptors: u32,
    /// MAXIMUM WRITE SAME LENGTH in blocks.
    pub max_write_same_blocks: u32,
    /// Report LBPRZ (unmapped blocks read as zeroes). Only set it when the bdev guarantees it
    /// (malloc, null and file-backed uring bdevs do); the bdev layer cannot tell.
    pub unmap_reads_zeroes: bool,
}

impl Default for LunOptions {
    fn default() -> Self {
        Self {
            product: None,
            serial: None,
            max_transfer_bytes: 4 << 20,
            max_unmap_blocks: 4 << 20,
            max_unmap_descriptors: 256,
            max_write_same_blocks: 4 << 20,
            unmap_reads_zeroes: false,
        }
    }
}

/// Upper bound on UNMAP block descriptors: (65535 - 8) / 16.
const MAX_UNMAP_DESCRIPTORS: u32 = 4095;

/// One logical unit (LUN 0 of a target), shared across reactors. Per-reactor work goes through a
/// [`LunChannel`](crate::LunChannel).
pub struct Lun {
    bdev: Arc<Bdev>,
    target_id: u8,
    product: [u8; 16],
    serial: String,
    max_transfer_blocks: u32,
    max_unmap_blocks: u32,
    max_unmap_descriptors: u32,
    max_write_same_blocks: u32,
    unmap_reads_zeroes: bool,
    /// WCE of the caching mode page (MODE SELECT changes it for every channel).
    wce: AtomicBool,
    /// Bumped on every resize; each channel reports one UNIT ATTENTION per change it has not seen.
    capacity_gen: Arc<AtomicU64>,
    listener: u64,
}

impl std::fmt::Debug for Lun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lun(target {} on {})", self.target_id, self.bdev.name())
    }
}

/// Printable ASCII only (SPC-4); anything else becomes '?'.
fn ascii(s: &str, max: usize) -> Vec<u8> {
    s.bytes().take(max).map(|b| if (0x20..0x7F).contains(&b) { b } else { b'?' }).collect()
}

impl Lun {
    /// Creates the LUN over `bdev`. The write cache starts enabled when the bdev has one.
    pub fn new(bdev: Arc<Bdev>, target_id: u8, opts: LunOptions) -> Arc<Lun> {
        let mut product = [b' '; 16];
        let name = opts.product.as_deref().unwrap_or(bdev.product_name());
        let p = ascii(name, 16);
        product[..p.len()].copy_from_slice(&p);
        let serial = match &opts.serial {
            Some(s) => String::from_utf8(ascii(s, 252)).unwrap_or_default(),
            None => bdev.uuid().simple().to_string(),
        };
        let bs = bdev.block_size();
        let max_transfer_blocks = match opts.max_transfer_bytes {
            0 => 0,
            n => (n / bs).max(1),
        };
        let capacity_gen = Arc::new(AtomicU64::new(0));
        let gen = capacity_gen.clone();
        // Any capacity change is a UNIT ATTENTION; new event kinds must be considered here.
        let listener = bdev.listen(move |ev| match ev {
            BdevEvent::Resized { .. } => {
                gen.fetch_add(1, Ordering::AcqRel);
            }
            BdevEvent::RemoveRequested => {}
        });
        Arc::new(Lun {
            wce: AtomicBool::new(bdev.write_cache()),
            bdev,
            target_id,
            product,
            serial,
            max_transfer_blocks,
            max_unmap_blocks: opts.max_unmap_blocks,
            max_unmap_descriptors: opts.max_unmap_descriptors.min(MAX_UNMAP_DESCRIPTORS),
            max_write_same_blocks: opts.max_write_same_blocks,
            unmap_reads_zeroes: opts.unmap_reads_zeroes,
            capacity_gen,
            listener,
        })
    }

    /// The bdev.
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    /// The target this LUN belongs to (informational; the identifiers come from the bdev UUID).
    pub fn target_id(&self) -> u8 {
        self.target_id
    }

    /// Current capacity in blocks (changes on resize; the transport may send a virtio-scsi
    /// PARAM_CHANGE event with it).
    pub fn num_blocks(&self) -> u64 {
        self.bdev.num_blocks()
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.bdev.block_size()
    }

    /// Number of capacity changes seen so far; every change yields one UNIT ATTENTION per channel.
    pub fn capacity_generation(&self) -> u64 {
        self.capacity_gen.load(Ordering::Acquire)
    }

    /// The Block Limits MAXIMUM TRANSFER LENGTH in blocks (0 = no limit), e.g. for the virtio-scsi
    /// `max_sectors` configuration field.
    pub fn max_transfer_blocks(&self) -> u32 {
        self.max_transfer_blocks
    }

    /// The unit serial number (VPD page 80h).
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Whether the write cache is enabled (caching mode page WCE).
    pub fn write_cache_enabled(&self) -> bool {
        self.wce.load(Ordering::Acquire)
    }

    pub(crate) fn set_write_cache(&self, on: bool) -> bool {
        self.wce.swap(on, Ordering::AcqRel)
    }

    pub(crate) fn product(&self) -> &[u8; 16] {
        &self.product
    }

    pub(crate) fn max_unmap_blocks(&self) -> u32 {
        self.max_unmap_blocks
    }

    pub(crate) fn max_unmap_descriptors(&self) -> u32 {
        self.max_unmap_descriptors
    }

    pub(crate) fn max_write_same_blocks(&self) -> u32 {
        self.max_write_same_blocks
    }

    /// Whether UNMAP is offered (logical block provisioning management, LBPME).
    pub(crate) fn thin_provisioned(&self) -> bool {
        self.bdev.io_type_supported(IoType::Unmap)
    }

    /// LBPRZ: only meaningful when thin provisioned.
    pub(crate) fn lbprz(&self) -> bool {
        self.thin_provisioned() && self.unmap_reads_zeroes
    }
}

impl Drop for Lun {
    fn drop(&mut self) {
        self.bdev.unlisten(self.listener);
    }
}
