//! Decoding a CDB into a validated [`Command`].
//!
//! Everything that can be checked from the CDB alone is checked here, once: the opcode (and
//! service action), the CDB length, reserved and unsupported bits, and fields whose values are
//! constrained by SPC-4/SBC-3 regardless of the medium. What depends on the logical unit's state
//! (capacity, write protection, limits from [`LunOptions`](crate::LunOptions)) is checked when the
//! command runs.
//!
//! Reserved bits are checked through one table ([`OPS`]): each supported command's *CDB usage data*
//! (SPC-4, REPORT SUPPORTED OPERATION CODES), the mask of bits the device server accepts. A set bit
//! outside the mask is INVALID FIELD IN CDB with a pointer to it (SPC-4, sense-key specific field
//! pointer). The same table answers REPORT SUPPORTED OPERATION CODES, so what vstor reports is
//! exactly what it checks. The mask of the CONTROL byte is zero: NACA (SAM-5, CONTROL byte) is not
//! supported, so NACA=1 must be refused with INVALID FIELD IN CDB (SPC-4, CONTROL byte); the
//! obsolete LINK bit and vendor bits are refused as well.

use crate::sense::{Asc, Sense};

/// Operation codes of the commands vstor implements (SPC-4, SBC-3).
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const VERIFY_10: u8 = 0x2F;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8A;
    pub const VERIFY_16: u8 = 0x8F;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    /// SERVICE ACTION IN(16); service action 10h is READ CAPACITY(16).
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    /// MAINTENANCE IN; service action 0Ch is REPORT SUPPORTED OPERATION CODES.
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const VERIFY_12: u8 = 0xAF;

    /// Service action of READ CAPACITY(16) under SERVICE ACTION IN(16).
    pub const SA_READ_CAPACITY_16: u16 = 0x10;
    /// Service action of REPORT SUPPORTED OPERATION CODES under MAINTENANCE IN.
    pub const SA_REPORT_SUPPORTED_OPCODES: u16 = 0x0C;
}

use opcode as op;

/// One supported command: opcode, service action (if the opcode has them) and the CDB usage data
/// (byte 0 is the opcode, the SERVICE ACTION field holds the service action code; the length is
/// the CDB length).
#[derive(Debug)]
pub(crate) struct OpInfo {
    pub opcode: u8,
    pub sa: Option<u16>,
    pub usage: &'static [u8],
}

const FF: u8 = 0xFF;

/// Every supported command with the bits it accepts, ordered by opcode (REPORT SUPPORTED
/// OPERATION CODES lists them in this order).
///
/// Bits accepted but ignored: DPO, RARC and FUA_NV (caching hints with no meaning for a virtual
/// disk), GROUP NUMBER (no grouping function, SBC-3), SYNC_NV and IMMED of SYNCHRONIZE
/// CACHE (the command always completes after the flush). RDPROTECT/WRPROTECT/VRPROTECT, ANCHOR,
/// PBDATA, LBDATA, CMDDT, LOEJ and the power conditions are unsupported and therefore refused.
pub(crate) const OPS: &[OpInfo] = &[
    OpInfo { opcode: op::TEST_UNIT_READY, sa: None, usage: &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0] },
    OpInfo { opcode: op::REQUEST_SENSE, sa: None, usage: &[op::REQUEST_SENSE, 0x01, 0, 0, FF, 0] },
    OpInfo { opcode: op::READ_6, sa: None, usage: &[op::READ_6, 0x1F, FF, FF, FF, 0] },
    OpInfo { opcode: op::WRITE_6, sa: None, usage: &[op::WRITE_6, 0x1F, FF, FF, FF, 0] },
    OpInfo { opcode: op::INQUIRY, sa: None, usage: &[op::INQUIRY, 0x01, FF, FF, FF, 0] },
    OpInfo { opcode: op::MODE_SELECT_6, sa: None, usage: &[op::MODE_SELECT_6, 0x11, 0, 0, FF, 0] },
    OpInfo { opcode: op::MODE_SENSE_6, sa: None, usage: &[op::MODE_SENSE_6, 0x08, FF, FF, FF, 0] },
    OpInfo { opcode: op::START_STOP_UNIT, sa: None, usage: &[op::START_STOP_UNIT, 0x01, 0, 0, 0x05, 0] },
    OpInfo { opcode: op::READ_CAPACITY_10, sa: None, usage: &[op::READ_CAPACITY_10, 0, FF, FF, FF, FF, 0, 0, 0x01, 0] },
    OpInfo { opcode: op::READ_10, sa: None, usage: &[op::READ_10, 0x1E, FF, FF, FF, FF, 0x1F, FF, FF, 0] },
    OpInfo { opcode: op::WRITE_10, sa: None, usage: &[op::WRITE_10, 0x1A, FF, FF, FF, FF, 0x1F, FF, FF, 0] },
    OpInfo { opcode: op::VERIFY_10, sa: None, usage: &[op::VERIFY_10, 0x16, FF, FF, FF, FF, 0x1F, FF, FF, 0] },
    OpInfo {
        opcode: op::SYNCHRONIZE_CACHE_10,
        sa: None,
        usage: &[op::SYNCHRONIZE_CACHE_10, 0x06, FF, FF, FF, FF, 0x1F, FF, FF, 0],
    },
    OpInfo { opcode: op::WRITE_SAME_10, sa: None, usage: &[op::WRITE_SAME_10, 0x08, FF, FF, FF, FF, 0x1F, FF, FF, 0] },
    OpInfo { opcode: op::UNMAP, sa: None, usage: &[op::UNMAP, 0, 0, 0, 0, 0, 0x1F, FF, FF, 0] },
    OpInfo { opcode: op::MODE_SELECT_10, sa: None, usage: &[op::MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, FF, FF, 0] },
    OpInfo { opcode: op::MODE_SENSE_10, sa: None, usage: &[op::MODE_SENSE_10, 0x18, FF, FF, 0, 0, 0, FF, FF, 0] },
    OpInfo {
        opcode: op::READ_16,
        sa: None,
        usage: &[op::READ_16, 0x1E, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0],
    },
    OpInfo {
        opcode: op::WRITE_16,
        sa: None,
        usage: &[op::WRITE_16, 0x1A, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0],
    },
    OpInfo {
        opcode: op::VERIFY_16,
        sa: None,
        usage: &[op::VERIFY_16, 0x16, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0],
    },
    OpInfo {
        opcode: op::SYNCHRONIZE_CACHE_16,
        sa: None,
        usage: &[op::SYNCHRONIZE_CACHE_16, 0x06, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0],
    },
    OpInfo {
        opcode: op::WRITE_SAME_16,
        sa: None,
        usage: &[op::WRITE_SAME_16, 0x09, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0],
    },
    OpInfo {
        opcode: op::SERVICE_ACTION_IN_16,
        sa: Some(op::SA_READ_CAPACITY_16),
        usage: &[op::SERVICE_ACTION_IN_16, 0x10, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0x01, 0],
    },
    OpInfo { opcode: op::REPORT_LUNS, sa: None, usage: &[op::REPORT_LUNS, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, 0] },
    OpInfo {
        opcode: op::MAINTENANCE_IN,
        sa: Some(op::SA_REPORT_SUPPORTED_OPCODES),
        usage: &[op::MAINTENANCE_IN, 0x0C, 0x87, FF, FF, FF, FF, FF, FF, FF, 0, 0],
    },
    OpInfo { opcode: op::READ_12, sa: None, usage: &[op::READ_12, 0x1E, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0] },
    OpInfo { opcode: op::WRITE_12, sa: None, usage: &[op::WRITE_12, 0x1A, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0] },
    OpInfo { opcode: op::VERIFY_12, sa: None, usage: &[op::VERIFY_12, 0x16, FF, FF, FF, FF, FF, FF, FF, FF, 0x1F, 0] },
];

/// Whether `opcode` is one vstor knows with service actions.
pub(crate) fn has_service_actions(opcode: u8) -> bool {
    OPS.iter().any(|o| o.opcode == opcode && o.sa.is_some())
}

/// The table entry for `opcode` (and `sa` when the opcode has service actions).
pub(crate) fn lookup(opcode: u8, sa: Option<u16>) -> Option<&'static OpInfo> {
    OPS.iter().find(|o| o.opcode == opcode && (o.sa.is_none() || o.sa == sa))
}

/// VPD pages vstor returns (SPC-4, vital product data parameters), in the order of the Supported
/// VPD Pages page.
pub(crate) const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];

/// Mode pages vstor returns (SPC-4, SBC-3).
pub(crate) mod page {
    pub const CACHING: u8 = 0x08;
    pub const CONTROL: u8 = 0x0A;
    pub const ALL: u8 = 0x3F;
    /// Subpage code for "all subpages".
    pub const ALL_SUBPAGES: u8 = 0xFF;
}

/// The PC field of MODE SENSE (SPC-4, MODE SENSE(6)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PageControl {
    Current,
    Changeable,
    Default,
}

/// BYTCHK of VERIFY (SBC-4, VERIFY(10); SBC-3 had a single bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ByteCheck {
    /// 00b: medium verification only (no data-out).
    None,
    /// 01b: compare the data-out buffer with every block.
    All,
    /// 11b: compare one block of data-out with each block in the range.
    SingleBlock,
}

/// A block range and transfer from a READ/WRITE/VERIFY/WRITE SAME CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transfer {
    pub lba: u64,
    pub blocks: u32,
    pub fua: bool,
    /// Byte offset of the TRANSFER LENGTH (or NUMBER OF LOGICAL BLOCKS) field, for sense pointers.
    pub len_field: u16,
}

/// A decoded, syntactically valid command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    TestUnitReady,
    RequestSense { desc: bool, alloc_len: u32 },
    Inquiry { evpd: bool, page: u8, alloc_len: u32 },
    ModeSense { ten: bool, dbd: bool, llbaa: bool, pc: PageControl, page: u8, subpage: u8, alloc_len: u32 },
    ModeSelect { ten: bool, param_len: u32, len_field: u16 },
    StartStopUnit { no_flush: bool, start: bool },
    ReadCapacity10,
    ReadCapacity16 { alloc_len: u32 },
    Read(Transfer),
    Write(Transfer),
    Verify { xfer: Transfer, bytchk: ByteCheck },
    SynchronizeCache { lba: u64, blocks: u32 },
    WriteSame { xfer: Transfer, unmap: bool, ndob: bool },
    Unmap { param_len: u32 },
    ReportLuns { select: u8, alloc_len: u32 },
    ReportOpcodes { options: u8, rctd: bool, opcode: u8, sa: u16, alloc_len: u32 },
}

/// The error for a CDB shorter than its opcode requires (or empty). No field pointer: the field
/// in error is not there to point at.
pub(crate) fn truncated_cdb() -> Sense {
    Sense::illegal(Asc::INVALID_FIELD_IN_CDB)
}

fn byte(c: &[u8], i: usize) -> u8 {
    c.get(i).copied().unwrap_or(0)
}

/// Big-endian field `c[start..start+n]` (n <= 8); 0 if out of bounds, which `parse` rules out.
fn be(c: &[u8], start: usize, n: usize) -> u64 {
    c.get(start..start.saturating_add(n)).map_or(0, |b| b.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
}

fn be32(c: &[u8], start: usize, n: usize) -> u32 {
    u32::try_from(be(c, start, n)).unwrap_or(u32::MAX)
}

fn bit(c: &[u8], i: usize, mask: u8) -> bool {
    byte(c, i) & mask != 0
}

/// Decodes and validates `cdb` (already cut to the transport's CDB length).
pub(crate) fn parse(cdb: &[u8]) -> Result<Command, Sense> {
    let Some(&opcode) = cdb.first() else {
        return Err(truncated_cdb());
    };
    // SPC-4 (operation code): an opcode the device server does not implement is INVALID COMMAND
    // OPERATION CODE.
    let Some(first) = OPS.iter().find(|o| o.opcode == opcode) else {
        return Err(Sense::invalid_opcode());
    };
    // The CDB length is fixed by the opcode (SPC-4, CDB formats); more bytes than that are ignored.
    let Some(cdb) = cdb.get(..first.usage.len()) else {
        return Err(truncated_cdb());
    };
    let info = match first.sa {
        None => first,
        Some(_) => {
            // SPC-4 (service action): an unsupported service action of a supported opcode is
            // INVALID FIELD IN CDB, pointing at the SERVICE ACTION field (byte 1, bits 4-0).
            let sa = u16::from(byte(cdb, 1) & 0x1F);
            lookup(opcode, Some(sa)).ok_or_else(|| Sense::invalid_cdb_field(1, Some(4)))?
        }
    };
    check_fields(opcode, cdb)?;
    check_reserved(cdb, info.usage)?;
    decode(opcode, cdb)
}

/// Multi-bit fields that must be zero, reported with a pointer to their left-most bit (SPC-4,
/// sense-key specific field pointer) rather than to the first set bit as the generic check would.
fn check_fields(opcode: u8, cdb: &[u8]) -> Result<(), Sense> {
    match opcode {
        // SBC-3, READ/WRITE/VERIFY/WRITE SAME (10/12/16): RDPROTECT, WRPROTECT or
        // VRPROTECT other than 000b on a logical unit without protection information (PROTECT=0
        // in the INQUIRY data) is INVALID FIELD IN CDB.
        op::READ_10
        | op::READ_12
        | op::READ_16
        | op::WRITE_10
        | op::WRITE_12
        | op::WRITE_16
        | op::VERIFY_10
        | op::VERIFY_12
        | op::VERIFY_16
        | op::WRITE_SAME_10
        | op::WRITE_SAME_16
            if byte(cdb, 1) & 0xE0 != 0 =>
        {
            Err(Sense::invalid_cdb_field(1, Some(7)))
        }
        // SBC-3, START STOP UNIT: power conditions are not supported (no Power Condition mode
        // page), only START_VALID (0h).
        op::START_STOP_UNIT if byte(cdb, 4) & 0xF0 != 0 => Err(Sense::invalid_cdb_field(4, Some(7))),
        _ => Ok(()),
    }
}

/// SPC-4 (reserved fields, field pointer): a set reserved (or unsupported) bit is INVALID FIELD IN
/// CDB with SKSV, C/D=1, BPV=1 and the bit.
fn check_reserved(cdb: &[u8], usage: &[u8]) -> Result<(), Sense> {
    for (i, (&b, &m)) in cdb.iter().zip(usage).enumerate().skip(1) {
        let bad = b & !m;
        if bad != 0 {
            let bit = 7 - u8::try_from(bad.leading_zeros()).unwrap_or(0);
            return Err(Sense::invalid_cdb_field(u16::try_from(i).unwrap_or(u16::MAX), Some(bit)));
        }
    }
    Ok(())
}

fn rw6(cdb: &[u8]) -> Transfer {
    // SBC-3, READ(6)/WRITE(6): 21-bit LBA; TRANSFER LENGTH 0 means 256 blocks.
    let blocks = match byte(cdb, 4) {
        0 => 256,
        n => u32::from(n),
    };
    Transfer { lba: be(cdb, 1, 3) & 0x1F_FFFF, blocks, fua: false, len_field: 4 }
}

fn rw10(cdb: &[u8]) -> Transfer {
    Transfer { lba: be(cdb, 2, 4), blocks: be32(cdb, 7, 2), fua: bit(cdb, 1, 0x08), len_field: 7 }
}

fn rw12(cdb: &[u8]) -> Transfer {
    Transfer { lba: be(cdb, 2, 4), blocks: be32(cdb, 6, 4), fua: bit(cdb, 1, 0x08), len_field: 6 }
}

fn rw16(cdb: &[u8]) -> Transfer {
    Transfer { lba: be(cdb, 2, 8), blocks: be32(cdb, 10, 4), fua: bit(cdb, 1, 0x08), len_field: 10 }
}

fn decode(opcode: u8, c: &[u8]) -> Result<Command, Sense> {
    Ok(match opcode {
        op::TEST_UNIT_READY => Command::TestUnitReady,
        // SPC-4, REQUEST SENSE: DESC selects descriptor-format sense data; ALLOCATION LENGTH in
        // byte 4.
        op::REQUEST_SENSE => Command::RequestSense { desc: bit(c, 1, 0x01), alloc_len: u32::from(byte(c, 4)) },
        op::INQUIRY => {
            // SPC-4, INQUIRY: PAGE CODE must be zero when EVPD is zero; an unsupported VPD page is
            // INVALID FIELD IN CDB (both pointing at byte 2).
            let evpd = bit(c, 1, 0x01);
            let page = byte(c, 2);
            if (!evpd && page != 0) || (evpd && !VPD_PAGES.contains(&page)) {
                return Err(Sense::invalid_cdb_field(2, None));
            }
            Command::Inquiry { evpd, page, alloc_len: be32(c, 3, 2) }
        }
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
            let ten = opcode == op::MODE_SENSE_10;
            // SPC-4, MODE SENSE (PC field): saved values are not implemented → SAVING PARAMETERS
            // NOT SUPPORTED.
            let pc = match byte(c, 2) >> 6 {
                0 => PageControl::Current,
                1 => PageControl::Changeable,
                2 => PageControl::Default,
                _ => {
                    return Err(Sense {
                        field: Some(crate::sense::FieldPointer { in_cdb: true, byte: 2, bit: Some(7) }),
                        ..Sense::illegal(Asc::SAVING_PARAMETERS_NOT_SUPPORTED)
                    })
                }
            };
            let page = byte(c, 2) & 0x3F;
            let subpage = byte(c, 3);
            // SPC-4, MODE SENSE: a page or subpage the device server does not implement is INVALID
            // FIELD IN CDB. vstor has no subpages: 00h, or FFh (all subpages) is accepted.
            if ![page::CACHING, page::CONTROL, page::ALL].contains(&page) {
                return Err(Sense::invalid_cdb_field(2, Some(5)));
            }
            if subpage != 0 && subpage != page::ALL_SUBPAGES {
                return Err(Sense::invalid_cdb_field(3, None));
            }
            let alloc_len = if ten { be32(c, 7, 2) } else { u32::from(byte(c, 4)) };
            Command::ModeSense {
                ten,
                dbd: bit(c, 1, 0x08),
                llbaa: ten && bit(c, 1, 0x10),
                pc,
                page,
                subpage,
                alloc_len,
            }
        }
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
            // SPC-4, MODE SELECT: PF=0 (vendor-specific page format) is not supported; SP=1 needs
            // saved pages, which are not implemented. Both: INVALID FIELD IN CDB.
            if !bit(c, 1, 0x10) {
                return Err(Sense::invalid_cdb_field(1, Some(4)));
            }
            if bit(c, 1, 0x01) {
                return Err(Sense::invalid_cdb_field(1, Some(0)));
            }
            let ten = opcode == op::MODE_SELECT_10;
            let (param_len, len_field) = if ten { (be32(c, 7, 2), 7) } else { (u32::from(byte(c, 4)), 4) };
            Command::ModeSelect { ten, param_len, len_field }
        }
        op::START_STOP_UNIT => Command::StartStopUnit { no_flush: bit(c, 4, 0x04), start: bit(c, 4, 0x01) },
        op::READ_CAPACITY_10 => {
            // SBC-3, READ CAPACITY(10): with PMI=0 the LOGICAL BLOCK ADDRESS field must be zero.
            if !bit(c, 8, 0x01) && be(c, 2, 4) != 0 {
                return Err(Sense::invalid_cdb_field(2, None));
            }
            Command::ReadCapacity10
        }
        op::SERVICE_ACTION_IN_16 => {
            // SBC-3, READ CAPACITY(16): as for READ CAPACITY(10), PMI=0 requires LBA 0.
            if !bit(c, 14, 0x01) && be(c, 2, 8) != 0 {
                return Err(Sense::invalid_cdb_field(2, None));
            }
            Command::ReadCapacity16 { alloc_len: be32(c, 10, 4) }
        }
        op::READ_6 => Command::Read(rw6(c)),
        op::READ_10 => Command::Read(rw10(c)),
        op::READ_12 => Command::Read(rw12(c)),
        op::READ_16 => Command::Read(rw16(c)),
        op::WRITE_6 => Command::Write(rw6(c)),
        op::WRITE_10 => Command::Write(rw10(c)),
        op::WRITE_12 => Command::Write(rw12(c)),
        op::WRITE_16 => Command::Write(rw16(c)),
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => {
            // SBC-4, VERIFY: BYTCHK 10b is reserved.
            let bytchk = match (byte(c, 1) >> 1) & 0x03 {
                0 => ByteCheck::None,
                1 => ByteCheck::All,
                3 => ByteCheck::SingleBlock,
                _ => return Err(Sense::invalid_cdb_field(1, Some(2))),
            };
            let xfer = match opcode {
                op::VERIFY_10 => rw10(c),
                op::VERIFY_12 => rw12(c),
                _ => rw16(c),
            };
            Command::Verify { xfer: Transfer { fua: false, ..xfer }, bytchk }
        }
        op::SYNCHRONIZE_CACHE_10 => Command::SynchronizeCache { lba: be(c, 2, 4), blocks: be32(c, 7, 2) },
        op::SYNCHRONIZE_CACHE_16 => Command::SynchronizeCache { lba: be(c, 2, 8), blocks: be32(c, 10, 4) },
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => {
            let xfer = if opcode == op::WRITE_SAME_10 { rw10(c) } else { rw16(c) };
            // SBC-3, WRITE SAME: NUMBER OF LOGICAL BLOCKS 0 means "to the end of the medium" unless
            // WSNZ is set in the Block Limits VPD page, which vstor sets: then it is INVALID FIELD
            // IN CDB. (ANCHOR is refused by the usage mask: ANC_SUP is 0.)
            if xfer.blocks == 0 {
                return Err(Sense::invalid_cdb_field(xfer.len_field, None));
            }
            Command::WriteSame {
                xfer: Transfer { fua: false, ..xfer },
                unmap: bit(c, 1, 0x08),
                ndob: opcode == op::WRITE_SAME_16 && bit(c, 1, 0x01),
            }
        }
        op::UNMAP => Command::Unmap { param_len: be32(c, 7, 2) },
        op::REPORT_LUNS => {
            // SPC-4, REPORT LUNS: SELECT REPORT 00h, 01h and 02h are the ones defined for a target
            // without well-known LUNs; the allocation length must be at least 16 (SPC-3;
            // SPC-4 keeps the check as permitted).
            let select = byte(c, 2);
            if select > 2 {
                return Err(Sense::invalid_cdb_field(2, None));
            }
            let alloc_len = be32(c, 6, 4);
            if alloc_len < 16 {
                return Err(Sense::invalid_cdb_field(6, None));
            }
            Command::ReportLuns { select, alloc_len }
        }
        op::MAINTENANCE_IN => {
            // SPC-4, REPORT SUPPORTED OPERATION CODES: REPORTING OPTIONS 000b..011b.
            let options = byte(c, 2) & 0x07;
            if options > 3 {
                return Err(Sense::invalid_cdb_field(2, Some(2)));
            }
            Command::ReportOpcodes {
                options,
                rctd: bit(c, 2, 0x80),
                opcode: byte(c, 3),
                sa: u16::try_from(be(c, 4, 2)).unwrap_or(u16::MAX),
                alloc_len: be32(c, 6, 4),
            }
        }
        _ => return Err(Sense::invalid_opcode()),
    })
}
