//! MODE SENSE data and MODE SELECT parameter lists (SPC-4, SBC-3).
//!
//! Pages: Caching (08h, WCE as the bdev allows) and Control (0Ah, fixed). Only WCE is changeable,
//! and only when the bdev has a volatile write cache: WCE=0 on such a bdev makes every write FUA
//! (and flushes what the cache holds); WCE=1 on a bdev without a cache is refused.

use crate::cdb::{page, PageControl};
use crate::lun::Lun;
use crate::sense::{Asc, Sense};

pub(crate) const CACHING_LEN: usize = 20;
pub(crate) const CONTROL_LEN: usize = 12;

/// Caching mode page (SBC-3): everything zero but WCE (byte 2 bit 2).
fn caching_page(lun: &Lun, pc: PageControl) -> [u8; CACHING_LEN] {
    let mut p = [0u8; CACHING_LEN];
    p[0] = page::CACHING;
    p[1] = 0x12; // CACHING_LEN - 2
    let wce = match pc {
        PageControl::Current => lun.write_cache_enabled(),
        // WCE can change only if there is a cache to enable; its default is "enabled".
        PageControl::Changeable | PageControl::Default => lun.bdev().write_cache(),
    };
    if wce {
        p[2] |= 0x04;
    }
    p
}

/// Control mode page (SPC-4): TST 000b, GLTSD=1 (no log parameters are saved), D_SENSE=0
/// (fixed-format sense), QUEUE ALGORITHM MODIFIER 1h (unrestricted reordering: commands run
/// concurrently), QERR 00b. Nothing is changeable.
fn control_page(pc: PageControl) -> [u8; CONTROL_LEN] {
    let mut p = [0u8; CONTROL_LEN];
    p[0] = page::CONTROL;
    p[1] = 0x0A; // CONTROL_LEN - 2
    if pc != PageControl::Changeable {
        p[2] = 0x02;
        p[3] = 0x10;
    }
    p
}

/// What MODE SENSE(6)/(10) asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SenseRequest {
    pub ten: bool,
    pub dbd: bool,
    pub llbaa: bool,
    pub pc: PageControl,
    pub page: u8,
}

/// MODE SENSE parameter data (SPC-4, mode parameter list): header, block descriptor unless DBD,
/// pages.
pub(crate) fn mode_sense(lun: &Lun, r: SenseRequest) -> Vec<u8> {
    let mut pages = Vec::with_capacity(CACHING_LEN + CONTROL_LEN);
    if r.page == page::CACHING || r.page == page::ALL {
        pages.extend_from_slice(&caching_page(lun, r.pc));
    }
    if r.page == page::CONTROL || r.page == page::ALL {
        pages.extend_from_slice(&control_page(r.pc));
    }
    let changeable = r.pc == PageControl::Changeable;
    let blocks = if changeable { 0 } else { lun.num_blocks() };
    let bs = if changeable { 0 } else { lun.block_size() };
    let mut desc = Vec::new();
    if !r.dbd {
        if r.llbaa {
            // Long LBA block descriptor (SBC-3).
            desc.extend_from_slice(&blocks.to_be_bytes());
            desc.extend_from_slice(&[0; 4]);
            desc.extend_from_slice(&bs.to_be_bytes());
        } else {
            // Short LBA block descriptor (SBC-3): FFFFFFFFh when the count does not fit.
            desc.extend_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
            desc.push(0);
            desc.extend_from_slice(&bs.to_be_bytes()[1..]);
        }
    }
    // Device-specific parameter (SBC-3): WP for a read-only bdev, DPOFUA (FUA honoured).
    let dev_spec = if lun.bdev().read_only() { 0x80 } else { 0 } | 0x10;
    let total = if r.ten { 8 } else { 4 } + desc.len() + pages.len();
    let mut d = Vec::with_capacity(total);
    if r.ten {
        d.extend_from_slice(&u16::try_from(total - 2).unwrap_or(0).to_be_bytes());
        d.extend_from_slice(&[0, dev_spec, u8::from(r.llbaa && !r.dbd), 0]);
        d.extend_from_slice(&u16::try_from(desc.len()).unwrap_or(0).to_be_bytes());
    } else {
        d.extend_from_slice(&[
            u8::try_from(total - 1).unwrap_or(0),
            0,
            dev_spec,
            u8::try_from(desc.len()).unwrap_or(0),
        ]);
    }
    d.extend_from_slice(&desc);
    d.extend_from_slice(&pages);
    d
}

fn be(d: &[u8], start: usize, n: usize) -> u64 {
    d.get(start..start.saturating_add(n)).map_or(0, |b| b.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
}

fn at(off: usize) -> u16 {
    u16::try_from(off).unwrap_or(u16::MAX)
}

fn length_error() -> Sense {
    Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR)
}

/// A page from the parameter list must equal the current values except in changeable bits (SPC-4,
/// MODE SELECT: otherwise INVALID FIELD IN PARAMETER LIST). Byte 0 (PS, reserved in MODE SELECT)
/// and byte 1 (checked by the caller) are skipped.
fn compare(given: &[u8], current: &[u8], changeable: &[u8], off: usize) -> Result<(), Sense> {
    for (i, ((&g, &c), &m)) in given.iter().zip(current).zip(changeable).enumerate().skip(2) {
        let diff = (g ^ c) & !m;
        if diff != 0 {
            let bit = 7 - u8::try_from(diff.leading_zeros()).unwrap_or(0);
            return Err(Sense::invalid_param_field(at(off + i), Some(bit)));
        }
    }
    Ok(())
}

/// Validates a MODE SELECT parameter list (SPC-4, MODE SELECT and mode parameters). Returns the new
/// WCE if the caching page was given. Nothing is applied here, so an error leaves every parameter
/// unchanged.
pub(crate) fn mode_select(lun: &Lun, ten: bool, d: &[u8]) -> Result<Option<bool>, Sense> {
    let hdr = if ten { 8 } else { 4 };
    if d.len() < hdr {
        return Err(length_error());
    }
    // Mode parameter header (SPC-4): MODE DATA LENGTH and the device-specific parameter
    // are reserved in MODE SELECT (SBC-3); the medium type must be 00h.
    let (medium_at, bdl_at) = if ten { (2, 6) } else { (1, 3) };
    if d[medium_at] != 0 {
        return Err(Sense::invalid_param_field(at(medium_at), None));
    }
    let longlba = ten && d[4] & 0x01 != 0;
    if ten && d[4] & 0xFE != 0 {
        let bad = d[4] & 0xFE;
        return Err(Sense::invalid_param_field(4, Some(7 - u8::try_from(bad.leading_zeros()).unwrap_or(0))));
    }
    let bdl = usize::try_from(if ten { be(d, 6, 2) } else { u64::from(d[3]) }).unwrap_or(usize::MAX);
    if bdl != 0 && bdl != if longlba { 16 } else { 8 } {
        return Err(Sense::invalid_param_field(bdl_at, None));
    }
    if d.len() < hdr + bdl {
        return Err(length_error());
    }
    if bdl != 0 {
        // Block descriptor: the capacity and block size cannot change. A NUMBER OF LOGICAL BLOCKS
        // of zero means "no change" (SBC-3); a LOGICAL BLOCK LENGTH of zero is taken alike.
        let (blocks, current, len_at) = if longlba {
            (be(d, hdr, 8), lun.num_blocks(), hdr + 12)
        } else {
            (be(d, hdr, 4), lun.num_blocks().min(u64::from(u32::MAX)), hdr + 5)
        };
        if blocks != 0 && blocks != current {
            return Err(Sense::invalid_param_field(at(hdr), None));
        }
        let n = if longlba { 4 } else { 3 };
        let blen = be(d, len_at, n);
        if blen != 0 && blen != u64::from(lun.block_size()) {
            return Err(Sense::invalid_param_field(at(len_at), None));
        }
    }
    let mut off = hdr + bdl;
    let mut wce = None;
    // Each page moves `off` forward by at least 2 bytes: the loop ends within d.len()/2 rounds.
    while off < d.len() {
        let b0 = d[off];
        if b0 & 0x40 != 0 {
            // SPF=1: a subpage. vstor implements none.
            return Err(Sense::invalid_param_field(at(off), Some(6)));
        }
        let Some(&plen) = d.get(off + 1) else {
            return Err(length_error());
        };
        let end = off + 2 + usize::from(plen);
        let Some(given) = d.get(off..end) else {
            return Err(length_error());
        };
        match b0 & 0x3F {
            page::CACHING => {
                if usize::from(plen) != CACHING_LEN - 2 {
                    return Err(Sense::invalid_param_field(at(off + 1), None));
                }
                let cur = caching_page(lun, PageControl::Current);
                compare(given, &cur, &caching_page(lun, PageControl::Changeable), off)?;
                wce = Some(given[2] & 0x04 != 0);
            }
            page::CONTROL => {
                if usize::from(plen) != CONTROL_LEN - 2 {
                    return Err(Sense::invalid_param_field(at(off + 1), None));
                }
                compare(given, &control_page(PageControl::Current), &control_page(PageControl::Changeable), off)?;
            }
            _ => return Err(Sense::invalid_param_field(at(off), Some(5))),
        }
        off = end;
    }
    Ok(wce)
}
