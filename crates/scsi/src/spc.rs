//! Parameter data of the non-I/O commands: INQUIRY and its VPD pages, READ CAPACITY, REPORT LUNS
//! and REPORT SUPPORTED OPERATION CODES. Pure functions of the LUN's state; the channel copies
//! what fits the allocation length into the data-in buffer.

use uuid::Uuid;

use crate::cdb::{has_service_actions, lookup, OPS, VPD_PAGES};
use crate::lun::Lun;
use crate::sense::Sense;

/// T10 VENDOR IDENTIFICATION (8 bytes, space padded).
pub const VENDOR: &[u8; 8] = b"VSTOR   ";

/// PRODUCT REVISION LEVEL: the crate version, cut to 4 characters without a trailing dot
/// ("0.1.0" becomes "0.1 ").
pub fn revision() -> [u8; 4] {
    let mut rev = [b' '; 4];
    let v = env!("CARGO_PKG_VERSION").as_bytes();
    let mut n = v.len().min(4);
    while n > 0 && v[n - 1] == b'.' {
        n -= 1;
    }
    rev[..n].copy_from_slice(&v[..n]);
    rev
}

/// Peripheral qualifier 000b, device type 00h (direct access block device).
const PDT_DISK: u8 = 0x00;

/// Length of the standard INQUIRY data vstor returns (SPC-4, with version descriptors).
pub(crate) const STD_INQUIRY_LEN: usize = 96;

/// Standard INQUIRY data (SPC-4).
pub(crate) fn standard_inquiry(lun: &Lun) -> Vec<u8> {
    let mut d = vec![0u8; STD_INQUIRY_LEN];
    d[0] = PDT_DISK;
    // RMB=0 (not removable), VERSION 06h (SPC-4).
    d[2] = 0x06;
    // HISUP=1 (hierarchical LUN addressing in REPORT LUNS), RESPONSE DATA FORMAT 2.
    d[3] = 0x12;
    d[4] = u8::try_from(STD_INQUIRY_LEN - 5).unwrap_or(0);
    // Byte 5: no SCCS, ACC, TPGS (no ALUA), 3PC or PROTECT. Byte 7: CMDQUE (command queuing).
    d[7] = 0x02;
    d[8..16].copy_from_slice(VENDOR);
    d[16..32].copy_from_slice(lun.product());
    d[32..36].copy_from_slice(&revision());
    // VERSION DESCRIPTORS (SPC-4): SAM-5, SPC-4, SBC-3, each "no version claimed".
    for (i, v) in [0x00A0u16, 0x0460, 0x04C0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// Standard INQUIRY data for a LUN that does not exist (SPC-4): peripheral qualifier 011b,
/// device type 1Fh.
pub(crate) fn not_present_inquiry() -> [u8; 36] {
    let mut d = [0u8; 36];
    d[0] = 0x7F;
    d[2] = 0x06;
    d[3] = 0x02;
    d[4] = 31;
    d
}

fn vpd(page: u8, body: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + body.len());
    d.push(PDT_DISK);
    d.push(page);
    // Bodies are at most a few hundred bytes (the serial is capped at 252).
    d.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
    d.extend_from_slice(body);
    d
}

/// The 8-byte NAA designator of the LUN: NAA 3h (locally assigned, SPC-4), whose
/// 60-bit value is the two halves of the bdev UUID XORed together. vstor has no IEEE company ID,
/// so the IEEE formats (NAA 5h/6h, EUI-64) would be false claims; the full UUID is also given in
/// a T10 vendor ID designator.
pub fn naa_designator(uuid: Uuid) -> [u8; 8] {
    let (hi, lo) = uuid.as_u64_pair();
    ((0x3u64 << 60) | ((hi ^ lo) & 0x0FFF_FFFF_FFFF_FFFF)).to_be_bytes()
}

/// A VPD page (the page code was validated against [`VPD_PAGES`] by the parser).
pub(crate) fn vpd_page(lun: &Lun, page: u8) -> Vec<u8> {
    match page {
        // SPC-4 Supported VPD Pages.
        0x00 => vpd(0x00, &VPD_PAGES),
        // SPC-4 Unit Serial Number.
        0x80 => vpd(0x80, lun.serial().as_bytes()),
        // SPC-4 Device Identification: designators with LU association.
        0x83 => {
            let uuid = lun.bdev().uuid();
            let mut b = Vec::with_capacity(64);
            // CODE SET 1h (binary), PIV=0, ASSOCIATION 00b (LU), DESIGNATOR TYPE 3h (NAA).
            b.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
            b.extend_from_slice(&naa_designator(uuid));
            // CODE SET 2h (ASCII), DESIGNATOR TYPE 1h (T10 vendor ID): vendor + UUID.
            let id = uuid.simple().to_string();
            b.extend_from_slice(&[0x02, 0x01, 0x00, u8::try_from(VENDOR.len() + id.len()).unwrap_or(0)]);
            b.extend_from_slice(VENDOR);
            b.extend_from_slice(id.as_bytes());
            vpd(0x83, &b)
        }
        // SBC-3 Block Limits (page length 3Ch).
        0xB0 => {
            let mut b = [0u8; 0x3C];
            let bs = lun.block_size();
            // Byte 4 (body offset 0): WSNZ=1, WRITE SAME with 0 blocks is refused.
            b[0] = 0x01;
            // MAXIMUM COMPARE AND WRITE LENGTH 0: not supported.
            // OPTIMAL TRANSFER LENGTH GRANULARITY: 4 KiB, the usual host page and sector size.
            let otlg = u16::try_from((4096 / bs).max(1)).unwrap_or(1);
            b[2..4].copy_from_slice(&otlg.to_be_bytes());
            b[4..8].copy_from_slice(&lun.max_transfer_blocks().to_be_bytes());
            if lun.thin_provisioned() {
                b[16..20].copy_from_slice(&lun.max_unmap_blocks().to_be_bytes());
                b[20..24].copy_from_slice(&lun.max_unmap_descriptors().to_be_bytes());
            }
            b[32..40].copy_from_slice(&u64::from(lun.max_write_same_blocks()).to_be_bytes());
            vpd(0xB0, &b)
        }
        // SBC-3 Block Device Characteristics: MEDIUM ROTATION RATE 0001h (non-rotating).
        0xB1 => {
            let mut b = [0u8; 0x3C];
            b[0..2].copy_from_slice(&1u16.to_be_bytes());
            vpd(0xB1, &b)
        }
        // SBC-3 Logical Block Provisioning.
        0xB2 => {
            let mut b = [0u8; 4];
            if lun.thin_provisioned() {
                // LBPU (UNMAP), LBPWS (WRITE SAME(16) with UNMAP), LBPWS10, LBPRZ.
                b[1] = 0x80 | 0x40 | 0x20 | if lun.lbprz() { 0x04 } else { 0 };
                // PROVISIONING TYPE 010b: thin provisioned.
                b[2] = 0x02;
            }
            vpd(0xB2, &b)
        }
        _ => Vec::new(),
    }
}

/// READ CAPACITY(10) data (SBC-3): FFFFFFFFh when the last LBA does not fit.
pub(crate) fn read_capacity_10(lun: &Lun) -> [u8; 8] {
    let last = lun.num_blocks().saturating_sub(1);
    let mut d = [0u8; 8];
    d[0..4].copy_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
    d[4..8].copy_from_slice(&lun.block_size().to_be_bytes());
    d
}

/// READ CAPACITY(16) data (SBC-3).
pub(crate) fn read_capacity_16(lun: &Lun) -> [u8; 32] {
    let mut d = [0u8; 32];
    d[0..8].copy_from_slice(&lun.num_blocks().saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&lun.block_size().to_be_bytes());
    // No protection, one logical block per physical block, lowest aligned LBA 0.
    if lun.thin_provisioned() {
        d[14] = 0x80 | if lun.lbprz() { 0x40 } else { 0 };
    }
    d
}

/// REPORT LUNS data (SPC-4) for a target whose only LUN is 0.
pub(crate) fn report_luns(select: u8, have_lun0: bool) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    // SELECT REPORT 01h asks for well-known LUNs only, of which there are none.
    if have_lun0 && select != 0x01 {
        d[3] = 8;
        d.extend_from_slice(&[0u8; 8]);
    }
    d
}

/// Command timeouts descriptor (SPC-4): no timeouts specified.
const TIMEOUTS: [u8; 12] = [0x00, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// REPORT SUPPORTED OPERATION CODES data (SPC-4).
pub(crate) fn report_opcodes(options: u8, rctd: bool, opcode: u8, sa: u16) -> Result<Vec<u8>, Sense> {
    let ctdp = if rctd { 0x80 } else { 0 };
    let info = match options {
        // All commands (6.35.2): header, then one descriptor per command.
        0 => {
            let mut d = vec![0u8; 4];
            for o in OPS {
                d.push(o.opcode);
                d.push(0);
                d.extend_from_slice(&o.sa.unwrap_or(0).to_be_bytes());
                d.push(0);
                d.push(if rctd { 0x02 } else { 0 } | u8::from(o.sa.is_some()));
                d.extend_from_slice(&u16::try_from(o.usage.len()).unwrap_or(0).to_be_bytes());
                if rctd {
                    d.extend_from_slice(&TIMEOUTS);
                }
            }
            let len = u32::try_from(d.len() - 4).unwrap_or(0);
            d[0..4].copy_from_slice(&len.to_be_bytes());
            return Ok(d);
        }
        // One command without service action: the opcode must not have service actions.
        1 => {
            if has_service_actions(opcode) {
                return Err(Sense::invalid_cdb_field(2, Some(2)));
            }
            lookup(opcode, None)
        }
        // One command with service action: the opcode must have service actions; an opcode
        // vstor does not know at all is simply "not supported".
        2 => {
            if lookup(opcode, None).is_some() && !has_service_actions(opcode) {
                return Err(Sense::invalid_cdb_field(2, Some(2)));
            }
            lookup(opcode, Some(sa)).filter(|o| o.sa.is_some())
        }
        // One command, with the service action if the opcode has them (011b, added by later SPC-4
        // revisions).
        _ => {
            if has_service_actions(opcode) {
                lookup(opcode, Some(sa))
            } else {
                lookup(opcode, None)
            }
        }
    };
    // One-command format (6.35.3): SUPPORT 011b (supported as in the standard) or 001b.
    Ok(match info {
        Some(o) => {
            let mut d = vec![0, ctdp | 0x03];
            d.extend_from_slice(&u16::try_from(o.usage.len()).unwrap_or(0).to_be_bytes());
            d.extend_from_slice(o.usage);
            if rctd {
                d.extend_from_slice(&TIMEOUTS);
            }
            d
        }
        None => vec![0, 0x01, 0, 0],
    })
}
