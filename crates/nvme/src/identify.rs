//! Data structures the admin commands return: Identify Controller/Namespace, the active namespace
//! list, namespace identification descriptors, and the log pages.

use std::collections::BTreeMap;
use std::sync::Arc;

use vstor_bdev::IoType;

use crate::spec::*;
use crate::{Fixed, Namespace};

/// Maximum Data Transfer Size, as a power of two in units of the minimum memory page (4 KiB).
pub(crate) const MDTS: u8 = 8;
/// The same in bytes (1 MiB).
pub(crate) const MAX_TRANSFER: u64 = 4096 << MDTS;
/// Abort Command Limit and Asynchronous Event Request Limit (0-based).
pub(crate) const ACL: u8 = 3;
pub(crate) const AERL: u8 = 3;
/// Error log entries kept (ELPE + 1).
pub(crate) const ERROR_LOG_ENTRIES: usize = 16;
/// Optional Admin Command Support: Doorbell Buffer Config.
const OACS_DBBUF: u16 = 1 << 8;
/// Optional NVM Command Support: Compare, Dataset Management, Write Zeroes.
pub(crate) const ONCS: u16 = (1 << 0) | (1 << 2) | (1 << 3);
/// Composite temperature reported (Kelvin), and the thresholds.
pub(crate) const TEMPERATURE_K: u16 = 313;
pub(crate) const WCTEMP_K: u16 = 343;
const CCTEMP_K: u16 = 373;

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
fn put128(b: &mut [u8], off: usize, v: u128) {
    b[off..off + 16].copy_from_slice(&v.to_le_bytes());
}

/// An ASCII field padded with spaces.
fn put_str(b: &mut [u8], off: usize, len: usize, s: &str) {
    let f = &mut b[off..off + len];
    f.fill(b' ');
    for (d, c) in f.iter_mut().zip(s.bytes()) {
        *d = c;
    }
}

/// Identify Controller (CNS 01h).
pub(crate) fn controller(cfg: &Fixed) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    put16(&mut b, 0, cfg.ids.vendor);
    put16(&mut b, 2, cfg.ids.subsystem_vendor);
    put_str(&mut b, 4, 20, &cfg.serial);
    put_str(&mut b, 24, 40, &cfg.model);
    put_str(&mut b, 64, 8, &cfg.firmware);
    b[72] = 6; // recommended arbitration burst
    b[77] = MDTS;
    put16(&mut b, 78, cfg.cntlid);
    put32(&mut b, 80, NVME_VERSION);
    put32(&mut b, 92, 1 << 8); // OAES: namespace attribute notices
    b[111] = 1; // CNTRLTYPE: I/O controller
    let oacs = if cfg.shadow_doorbells { OACS_DBBUF } else { 0 };
    put16(&mut b, 256, oacs);
    b[258] = ACL;
    b[259] = AERL;
    b[260] = (1 << 1) | 1; // FRMW: one slot, slot 1 read-only
                           // LPA: commands supported and effects log, extended data for Get Log Page.
    b[261] = (1 << 1) | (1 << 2);
    b[262] = u8::try_from(ERROR_LOG_ENTRIES - 1).unwrap_or(0);
    b[263] = 0; // NPSS: one power state
    put16(&mut b, 266, WCTEMP_K);
    put16(&mut b, 268, CCTEMP_K);
    put16(&mut b, 320, 1); // KAS: 100 ms granularity
    b[512] = 0x66; // SQES
    b[513] = 0x44; // CQES
    put32(&mut b, 516, cfg.nn);
    put16(&mut b, 520, ONCS);
    // VWC: present; Flush with NSID FFFFFFFFh supported.
    b[525] = 0x07;
    put32(&mut b, 536, 1); // SGLS: supported, no alignment requirement
    let nqn = cfg.subnqn.as_bytes();
    b[768..768 + nqn.len().min(256)].copy_from_slice(&nqn[..nqn.len().min(256)]);
    // Power state 0: 25 W, entry/exit latency 10 us.
    put16(&mut b, 2048, 2500);
    put32(&mut b, 2048 + 4, 10);
    put32(&mut b, 2048 + 8, 10);
    b
}

/// Identify Namespace (CNS 00h) for an active namespace.
pub(crate) fn namespace(ns: &Namespace) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let bdev = &ns.bdev;
    let blocks = bdev.num_blocks();
    put64(&mut b, 0, blocks);
    put64(&mut b, 8, blocks);
    put64(&mut b, 16, blocks);
    b[25] = 0; // NLBAF: one format
    b[26] = 0; // FLBAS: format 0
               // DLFEAT: deallocated blocks read as zeroes (every backend zeroes on unmap).
    b[33] = if bdev.io_type_supported(IoType::Unmap) { 0x01 } else { 0 };
    put128(&mut b, 48, u128::from(bdev.size_bytes()));
    b[99] = u8::from(bdev.read_only()); // NSATTR: write protected
    if let Some(g) = ns.nguid {
        b[104..120].copy_from_slice(&g);
    }
    if let Some(e) = ns.eui64 {
        b[120..128].copy_from_slice(&e);
    }
    let lbads = bdev.block_size().trailing_zeros();
    put32(&mut b, 128, lbads << 16);
    b
}

/// Active Namespace ID list (CNS 02h): active NSIDs greater than `after`, ascending.
pub(crate) fn active_list(nss: &BTreeMap<u32, Arc<Namespace>>, after: u32) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (i, nsid) in nss.keys().filter(|&&n| n > after).take(1024).enumerate() {
        put32(&mut b, i * 4, *nsid);
    }
    b
}

/// Namespace Identification Descriptor list (CNS 03h).
pub(crate) fn descriptors(ns: &Namespace) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let mut off = 0;
    let mut add = |kind: u8, id: &[u8]| {
        b[off] = kind;
        b[off + 1] = u8::try_from(id.len()).unwrap_or(0);
        b[off + 4..off + 4 + id.len()].copy_from_slice(id);
        off += 4 + id.len();
    };
    if let Some(e) = ns.eui64 {
        add(1, &e);
    }
    if let Some(g) = ns.nguid {
        add(2, &g);
    }
    if let Some(u) = ns.uuid {
        add(3, u.as_bytes());
    }
    b
}

/// One Error Information log entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ErrorEntry {
    pub count: u64,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
    pub lba: u64,
    pub nsid: u32,
}

/// The error log: the newest entries, and the total count.
#[derive(Default)]
pub(crate) struct ErrorLog {
    pub count: u64,
    pub entries: std::collections::VecDeque<ErrorEntry>,
}

impl ErrorLog {
    pub fn record(&mut self, sqid: u16, cid: u16, status: Status, nsid: u32, lba: u64) {
        self.count += 1;
        if self.entries.len() == ERROR_LOG_ENTRIES {
            self.entries.pop_back();
        }
        self.entries.push_front(ErrorEntry { count: self.count, sqid, cid, status, lba, nsid });
    }

    /// Log page 01h, newest first.
    pub fn page(&self) -> Vec<u8> {
        let mut b = vec![0u8; 64 * ERROR_LOG_ENTRIES];
        for (i, e) in self.entries.iter().enumerate() {
            let o = i * 64;
            put64(&mut b, o, e.count);
            put16(&mut b, o + 8, e.sqid);
            put16(&mut b, o + 10, e.cid);
            put16(&mut b, o + 12, hi16(e.status.dw3_bits()));
            put16(&mut b, o + 14, 0xffff);
            put64(&mut b, o + 16, e.lba);
            put32(&mut b, o + 24, e.nsid);
        }
        b
    }
}

/// Counters for the SMART / Health log.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct HealthCounters {
    pub read_cmds: u64,
    pub write_cmds: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    pub power_on_hours: u64,
}

/// SMART / Health Information (log 02h).
pub(crate) fn smart(c: &HealthCounters) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    put16(&mut b, 1, TEMPERATURE_K);
    b[3] = 100; // available spare
    b[4] = 10; // available spare threshold
               // Data units are thousands of 512-byte units, rounded up.
    let units = |bytes: u64| u128::from(bytes.div_ceil(512).div_ceil(1000));
    put128(&mut b, 32, units(c.read_bytes));
    put128(&mut b, 48, units(c.write_bytes));
    put128(&mut b, 64, u128::from(c.read_cmds));
    put128(&mut b, 80, u128::from(c.write_cmds));
    put128(&mut b, 112, 1); // power cycles
    put128(&mut b, 128, u128::from(c.power_on_hours));
    put128(&mut b, 176, u128::from(c.errors));
    b
}

/// Firmware Slot Information (log 03h).
pub(crate) fn firmware_slot(cfg: &Fixed) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0] = 1; // active slot 1
    put_str(&mut b, 8, 8, &cfg.firmware);
    b
}

/// Changed Namespace List (log 04h).
pub(crate) fn changed_ns(list: &std::collections::BTreeSet<u32>, overflow: bool) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    if overflow {
        put32(&mut b, 0, NSID_ALL);
        return b;
    }
    for (i, n) in list.iter().take(1024).enumerate() {
        put32(&mut b, i * 4, *n);
    }
    b
}

/// Commands Supported and Effects (log 05h).
pub(crate) fn command_effects(shadow: bool) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    const CSUPP: u32 = 1;
    const LBCC: u32 = 1 << 1;
    let mut admin = vec![
        ADM_DELETE_SQ,
        ADM_CREATE_SQ,
        ADM_GET_LOG_PAGE,
        ADM_DELETE_CQ,
        ADM_CREATE_CQ,
        ADM_IDENTIFY,
        ADM_ABORT,
        ADM_SET_FEATURES,
        ADM_GET_FEATURES,
        ADM_ASYNC_EVENT,
        ADM_KEEP_ALIVE,
    ];
    if shadow {
        admin.push(ADM_DOORBELL_BUFFER_CONFIG);
    }
    for op in admin {
        put32(&mut b, usize::from(op) * 4, CSUPP);
    }
    for (op, eff) in [
        (IO_FLUSH, CSUPP),
        (IO_WRITE, CSUPP | LBCC),
        (IO_READ, CSUPP),
        (IO_COMPARE, CSUPP),
        (IO_WRITE_ZEROES, CSUPP | LBCC),
        (IO_DSM, CSUPP | LBCC),
    ] {
        put32(&mut b, 1024 + usize::from(op) * 4, eff);
    }
    b
}
