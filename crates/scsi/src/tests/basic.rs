//! CDB validation, sense format, TEST UNIT READY, REQUEST SENSE, REPORT LUNS, START STOP UNIT,
//! REPORT SUPPORTED OPERATION CODES and the answers for absent LUNs.

use super::*;

#[test]
fn test_unit_ready_returns_good() {
    let mut h = H::new(malloc_bdev(512, 64));
    let r = h.cmd(&[0x00, 0, 0, 0, 0, 0]);
    assert_eq!(r, TaskResult { status: ScsiStatus::Good, sense: None, data_in_len: 0 });
    assert_eq!(r.status.as_u8(), 0x00);
    assert!(r.sense_bytes().is_none());
}

#[test]
fn test_unit_ready_with_naca_bit_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    // CONTROL byte, NACA (bit 2): ACA is not supported (SPC-4 4.3.4.4).
    let r = h.cmd(&[0x00, 0, 0, 0, 0, 0x04]);
    assert_check(&r, 0x05, 0x24, 0x00, Some([0xCA, 0x00, 0x05]));
    // LINK (bit 0) and vendor bits are refused as well.
    assert_invalid_cdb(&h.cmd(&[0x00, 0, 0, 0, 0, 0x01]), 5, Some(0));
    assert_invalid_cdb(&h.cmd(&[0x00, 0, 0, 0, 0, 0x80]), 5, Some(7));
}

#[test]
fn test_unit_ready_with_reserved_bit_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    let r = h.cmd(&[0x00, 0x80, 0, 0, 0, 0]);
    assert_check(&r, 0x05, 0x24, 0x00, Some([0xCF, 0x00, 0x01]));
    assert_invalid_cdb(&h.cmd(&[0x00, 0, 0, 0x10, 0, 0]), 3, Some(4));
}

#[test]
fn unsupported_opcode_returns_invalid_command_operation_code() {
    let mut h = H::new(malloc_bdev(512, 64));
    // FORMAT UNIT, PERSISTENT RESERVE IN, COMPARE AND WRITE, variable length, vendor specific.
    for cdb in [vec![0x04, 0, 0, 0, 0, 0], vec![0x5E; 10], cdb16(0x89, 0, 0, 1), vec![0x7F; 32], vec![0xFF; 16]] {
        let r = h.cmd(&cdb);
        assert_check(&r, 0x05, 0x20, 0x00, Some([0xC0, 0x00, 0x00]));
    }
}

#[test]
fn unsupported_service_action_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    // SERVICE ACTION IN(16) / GET LBA STATUS (12h), MAINTENANCE IN / REPORT TMFs (0Dh).
    let mut c = [0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x12;
    assert_check(&h.cmd(&c), 0x05, 0x24, 0x00, Some([0xCC, 0x00, 0x01]));
    let mut c = [0u8; 12];
    c[0] = 0xA3;
    c[1] = 0x0D;
    assert_invalid_cdb(&h.cmd(&c), 1, Some(4));
}

#[test]
fn empty_cdb_returns_invalid_field_in_cdb_without_pointer() {
    let mut h = H::new(malloc_bdev(512, 64));
    let r = h.cmd(&[]);
    assert_check(&r, 0x05, 0x24, 0x00, None);
}

#[test]
fn cdb_shorter_than_its_opcode_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    for (cdb, len) in
        [(cdb10(0x28, 0, 0, 1), 6), (cdb16(0x88, 0, 0, 1), 10), (inquiry(false, 0, 36), 5), (cdb12(0xA8, 0, 0, 1), 11)]
    {
        let mut t = ScsiTask::new(&cdb, IoVecs::new(), IoVecs::new());
        t.cdb_len = len;
        let tag = h.submit(t);
        assert_check(&h.wait(tag), 0x05, 0x24, 0x00, None);
    }
    // A single byte of a known opcode, too.
    assert_check(&h.cmd(&[0x9E]), 0x05, 0x24, 0x00, None);
}

#[test]
fn cdb_len_beyond_the_buffer_is_clamped_and_extra_bytes_are_ignored() {
    let mut h = H::new(malloc_bdev(512, 64));
    let mut t = ScsiTask::new(&[0x00, 0, 0, 0, 0, 0], IoVecs::new(), IoVecs::new());
    t.cdb_len = usize::MAX;
    t.cdb[6..].fill(0xFF);
    let tag = h.submit(t);
    assert_eq!(h.wait(tag), TaskResult::good(0));
    // READ(10) of zero blocks followed by 22 bytes of garbage.
    let mut c = [0xA5u8; 32];
    c[..10].copy_from_slice(&cdb10(0x28, 0, 0, 0));
    assert_eq!(h.cmd(&c), TaskResult::good(0));
}

#[test]
fn sense_data_has_fixed_format_layout() {
    let s = Sense::invalid_cdb_field(0x1234, Some(5));
    assert_eq!(s.to_bytes(), [0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0x00, 0, 0xCD, 0x12, 0x34]);
    let s = Sense::invalid_param_field(9, None);
    assert_eq!(s.to_bytes()[15..], [0x80, 0x00, 0x09]);
    let s = Sense { information: Some(0x0102_0304), ..Sense::new(SenseKey::Miscompare, Asc::MISCOMPARE_DURING_VERIFY) };
    assert_eq!(s.to_bytes(), [0xF0, 0, 0x0E, 1, 2, 3, 4, 10, 0, 0, 0, 0, 0x1D, 0x00, 0, 0, 0, 0]);
    // Descriptor format: header, information descriptor, sense-key specific descriptor.
    let s = Sense { information: Some(7), ..Sense::invalid_cdb_field(2, None) };
    assert_eq!(
        s.to_descriptor_bytes(),
        [
            0x72, 0x05, 0x24, 0x00, 0, 0, 0, 20, // header
            0x00, 0x0A, 0x80, 0x00, 0, 0, 0, 0, 0, 0, 0, 7, // information
            0x02, 0x06, 0x00, 0x00, 0xC0, 0x00, 0x02, 0x00, // sense key specific
        ]
    );
    assert_eq!(ScsiStatus::TaskAborted.as_u8(), 0x40);
    assert_eq!(ScsiStatus::Busy.as_u8(), 0x08);
}

#[test]
fn request_sense_without_pending_condition_returns_no_sense() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&[0x03, 0, 0, 0, 252, 0], 252);
    assert_eq!(r, TaskResult::good(18));
    assert_eq!(d, [0x70, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn request_sense_allocation_length_limits_the_data() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&[0x03, 0, 0, 0, 8, 0], 252);
    assert_eq!((r, d.len()), (TaskResult::good(8), 8));
    assert_eq!(&d[..3], &[0x70, 0, 0]);
    let (r, _) = h.cmd_in(&[0x03, 0, 0, 0, 0, 0], 252);
    assert_eq!(r, TaskResult::good(0));
    // A data-in buffer smaller than the allocation length: what fits.
    let (r, _) = h.cmd_in(&[0x03, 0, 0, 0, 255, 0], 5);
    assert_eq!(r, TaskResult::good(5));
}

#[test]
fn request_sense_desc_returns_descriptor_format() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&[0x03, 0x01, 0, 0, 252, 0], 252);
    assert_eq!(r, TaskResult::good(8));
    assert_eq!(d, [0x72, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn request_sense_with_reserved_bits_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_invalid_cdb(&h.cmd(&[0x03, 0x02, 0, 0, 18, 0]), 1, Some(1));
    assert_invalid_cdb(&h.cmd(&[0x03, 0, 0x01, 0, 18, 0]), 2, Some(0));
}

fn report_luns(select: u8, alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = 0xA0;
    c[2] = select;
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

#[test]
fn report_luns_lists_lun_0() {
    let mut h = H::new(malloc_bdev(512, 64));
    for select in [0, 2] {
        let (r, d) = h.cmd_in(&report_luns(select, 16), 64);
        assert_eq!(r, TaskResult::good(16));
        assert_eq!(d, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
    // A huge allocation length with a small buffer: the whole list, as it fits.
    let (r, d) = h.cmd_in(&report_luns(0, u32::MAX), 100);
    assert_eq!((r, d.len()), (TaskResult::good(16), 16));
    let (r, _) = h.cmd_in(&report_luns(0, u32::MAX), 12);
    assert_eq!(r, TaskResult::good(12));
}

#[test]
fn report_luns_well_known_only_returns_an_empty_list() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&report_luns(1, 64), 64);
    assert_eq!(r, TaskResult::good(8));
    assert_eq!(d, [0; 8]);
}

#[test]
fn report_luns_allocation_length_below_16_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    for alloc in [0, 8, 15] {
        let (r, _) = h.cmd_in(&report_luns(0, alloc), 64);
        assert_check(&r, 0x05, 0x24, 0x00, Some([0xC0, 0x00, 0x06]));
    }
}

#[test]
fn report_luns_unknown_select_report_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    for select in [3, 0x10, 0xFF] {
        let (r, _) = h.cmd_in(&report_luns(select, 64), 64);
        assert_invalid_cdb(&r, 2, None);
    }
}

#[test]
fn start_stop_unit_start_returns_good_without_io() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_eq!(h.cmd(&[0x1B, 0, 0, 0, 0x01, 0]), TaskResult::good(0));
    assert_eq!(h.cmd(&[0x1B, 0x01, 0, 0, 0x01, 0]), TaskResult::good(0), "IMMED");
    assert!(logged().is_empty());
}

#[test]
fn start_stop_unit_stop_flushes_unless_no_flush() {
    let mut h = H::new(malloc_bdev(512, 64));
    assert_eq!(h.cmd(&[0x1B, 0, 0, 0, 0x00, 0]), TaskResult::good(0));
    assert_eq!(logged_kinds(), [IoType::Flush]);
    clear_log();
    assert_eq!(h.cmd(&[0x1B, 0, 0, 0, 0x04, 0]), TaskResult::good(0));
    assert!(logged().is_empty());
}

#[test]
fn start_stop_unit_power_condition_or_eject_returns_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    // POWER CONDITION (byte 4 bits 7-4), pointer at its left-most bit.
    assert_check(&h.cmd(&[0x1B, 0, 0, 0, 0x30, 0]), 0x05, 0x24, 0x00, Some([0xCF, 0x00, 0x04]));
    assert_invalid_cdb(&h.cmd(&[0x1B, 0, 0, 0, 0x10, 0]), 4, Some(7));
    // LOEJ: the medium is not removable.
    assert_check(&h.cmd(&[0x1B, 0, 0, 0, 0x02, 0]), 0x05, 0x24, 0x00, Some([0xC9, 0x00, 0x04]));
    // POWER CONDITION MODIFIER.
    assert_invalid_cdb(&h.cmd(&[0x1B, 0, 0, 0x01, 0x01, 0]), 3, Some(0));
}

fn report_opcodes(options: u8, rctd: bool, opcode: u8, sa: u16, alloc: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = 0xA3;
    c[1] = 0x0C;
    c[2] = options | if rctd { 0x80 } else { 0 };
    c[3] = opcode;
    c[4..6].copy_from_slice(&sa.to_be_bytes());
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

#[test]
fn report_supported_opcodes_lists_every_command() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&report_opcodes(0, false, 0, 0, 4096), 4096);
    assert_eq!(r.status, ScsiStatus::Good);
    let len = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, d.len());
    assert_eq!(len % 8, 0);
    let descs: Vec<&[u8]> = d[4..].chunks(8).collect();
    let ops: Vec<u8> = descs.iter().map(|x| x[0]).collect();
    assert_eq!(
        ops,
        [
            0x00, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x1A, 0x1B, 0x25, 0x28, 0x2A, 0x2F, 0x35, 0x41, 0x42, 0x55, 0x5A, 0x88,
            0x8A, 0x8F, 0x91, 0x93, 0x9E, 0xA0, 0xA3, 0xA8, 0xAA, 0xAF
        ]
    );
    assert!(descs.contains(&&[0x28, 0, 0, 0, 0, 0x00, 0, 10][..]));
    assert!(descs.contains(&&[0x9E, 0, 0, 0x10, 0, 0x01, 0, 16][..]), "SERVACTV for READ CAPACITY(16)");
    assert!(descs.contains(&&[0xA3, 0, 0, 0x0C, 0, 0x01, 0, 12][..]));
    assert!(descs.contains(&&[0x00, 0, 0, 0, 0, 0x00, 0, 6][..]));
    // Allocation length cuts the list.
    let (r, d) = h.cmd_in(&report_opcodes(0, false, 0, 0, 20), 4096);
    assert_eq!(r, TaskResult::good(20));
    assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize, len);
}

#[test]
fn report_supported_opcodes_with_rctd_adds_timeouts_descriptors() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (_, d) = h.cmd_in(&report_opcodes(0, true, 0, 0, 4096), 4096);
    let len = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
    assert_eq!(len, 28 * 20);
    let first = &d[4..24];
    assert_eq!(first, [0x00, 0, 0, 0, 0, 0x02, 0, 6, 0x00, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let (r, d) = h.cmd_in(&report_opcodes(1, true, 0x00, 0, 64), 64);
    assert_eq!(r, TaskResult::good(4 + 6 + 12));
    assert_eq!(&d[..4], &[0, 0x83, 0, 6]);
}

#[test]
fn report_supported_opcodes_one_command_returns_usage_data() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (r, d) = h.cmd_in(&report_opcodes(1, false, 0x28, 0, 64), 64);
    assert_eq!(r, TaskResult::good(14));
    assert_eq!(d, [0, 0x03, 0, 10, 0x28, 0x1E, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x00]);
    let (r, d) = h.cmd_in(&report_opcodes(2, false, 0x9E, 0x10, 64), 64);
    assert_eq!(r, TaskResult::good(20));
    assert_eq!(&d[..6], &[0, 0x03, 0, 16, 0x9E, 0x10], "the service action in its field");
    // 011b: with the service action when the opcode has them, without otherwise.
    let (_, d) = h.cmd_in(&report_opcodes(3, false, 0xA3, 0x0C, 64), 64);
    assert_eq!(&d[..5], &[0, 0x03, 0, 12, 0xA3]);
    let (_, d) = h.cmd_in(&report_opcodes(3, false, 0x2A, 0x55, 64), 64);
    assert_eq!(&d[..6], &[0, 0x03, 0, 10, 0x2A, 0x1A]);
}

#[test]
fn report_supported_opcodes_unsupported_command_reports_not_supported() {
    let mut h = H::new(malloc_bdev(512, 64));
    for cdb in [
        report_opcodes(1, false, 0x5E, 0, 64),
        report_opcodes(2, false, 0x9E, 0x12, 64),
        report_opcodes(2, false, 0x7F, 1, 64),
    ] {
        let (r, d) = h.cmd_in(&cdb, 64);
        assert_eq!(r, TaskResult::good(4));
        assert_eq!(d, [0, 0x01, 0, 0]);
    }
}

#[test]
fn report_supported_opcodes_bad_reporting_options_return_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    // 001b for an opcode with service actions, 010b for one without.
    let (r, _) = h.cmd_in(&report_opcodes(1, false, 0x9E, 0, 64), 64);
    assert_check(&r, 0x05, 0x24, 0x00, Some([0xCA, 0x00, 0x02]));
    let (r, _) = h.cmd_in(&report_opcodes(2, false, 0x28, 0, 64), 64);
    assert_invalid_cdb(&r, 2, Some(2));
    // Reserved reporting options.
    for o in [4, 7] {
        let (r, _) = h.cmd_in(&report_opcodes(o, false, 0, 0, 64), 64);
        assert_invalid_cdb(&r, 2, Some(2));
    }
    // Reserved bits of byte 2.
    let mut c = report_opcodes(0, false, 0, 0, 64);
    c[2] |= 0x40;
    assert_invalid_cdb(&h.cmd(&c), 2, Some(6));
}

/// A CDB of each supported command that passes decoding.
fn base_cdb(opcode: u8) -> Vec<u8> {
    match opcode {
        0x00 => vec![0x00, 0, 0, 0, 0, 0],
        0x03 => vec![0x03, 0, 0, 0, 18, 0],
        0x08 | 0x0A => cdb6(opcode, 0, 1),
        0x12 => inquiry(false, 0, 36),
        0x15 => vec![0x15, 0x10, 0, 0, 0, 0],
        0x1A => vec![0x1A, 0, 0x3F, 0, 0xFF, 0],
        0x1B => vec![0x1B, 0, 0, 0, 0x01, 0],
        0x25 => vec![0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        0x28 | 0x2A | 0x2F | 0x35 | 0x41 => cdb10(opcode, 0, 0, 1),
        0x42 => vec![0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        0x55 => vec![0x55, 0x10, 0, 0, 0, 0, 0, 0, 0, 0],
        0x5A => vec![0x5A, 0, 0x3F, 0, 0, 0, 0, 0, 0xFF, 0],
        0x88 | 0x8A | 0x8F | 0x91 | 0x93 => cdb16(opcode, 0, 0, 1),
        0x9E => {
            let mut c = cdb16(0x9E, 0x10, 0, 32);
            c[2..10].fill(0);
            c
        }
        0xA0 => report_luns(0, 64),
        0xA3 => report_opcodes(0, false, 0, 0, 64),
        0xA8 | 0xAA | 0xAF => cdb12(opcode, 0, 0, 1),
        _ => panic!("no base CDB for {opcode:#04x}"),
    }
}

/// Every bit the CDB usage data (REPORT SUPPORTED OPERATION CODES) marks as unused is refused
/// with INVALID FIELD IN CDB pointing at it (at the left-most bit of a *PROTECT or POWER
/// CONDITION field).
#[test]
fn reserved_bits_of_every_command_return_invalid_field_in_cdb() {
    let mut h = H::new(malloc_bdev(512, 64));
    let (_, all) = h.cmd_in(&report_opcodes(0, false, 0, 0, 4096), 4096);
    let mut checked = 0;
    for desc in all[4..].chunks(8) {
        let (opcode, sa, servactv) = (desc[0], u16::from_be_bytes([desc[2], desc[3]]), desc[5] & 1 != 0);
        let q =
            if servactv { report_opcodes(2, false, opcode, sa, 64) } else { report_opcodes(1, false, opcode, 0, 64) };
        let (r, one) = h.cmd_in(&q, 64);
        assert_eq!(r.status, ScsiStatus::Good);
        assert_eq!(one[1] & 0x07, 0x03, "{opcode:#04x} supported");
        let len = u16::from_be_bytes([one[2], one[3]]) as usize;
        let usage = &one[4..4 + len];
        assert_eq!(usage[0], opcode);
        let base = base_cdb(opcode);
        assert_eq!(base.len(), len, "{opcode:#04x} CDB length");
        for (i, &m) in usage.iter().enumerate().skip(1) {
            for bit in 0..8u8 {
                if m & (1 << bit) != 0 {
                    continue;
                }
                let mut c = base.clone();
                c[i] |= 1 << bit;
                let protect =
                    matches!(opcode, 0x28 | 0x2A | 0x2F | 0x41 | 0x88 | 0x8A | 0x8F | 0x93 | 0xA8 | 0xAA | 0xAF)
                        && i == 1
                        && bit >= 5;
                let power = opcode == 0x1B && i == 4 && bit >= 4;
                // Another service action: the SERVICE ACTION field is reported as a whole.
                let service_action = servactv && i == 1 && bit <= 4;
                let want = if protect || power {
                    7
                } else if service_action {
                    4
                } else {
                    bit
                };
                let r = h.cmd(&c);
                assert_eq!(r.status, ScsiStatus::CheckCondition, "{opcode:#04x} byte {i} bit {bit}");
                let s = r.sense_bytes().unwrap();
                assert_eq!((s[2], s[12], s[13]), (0x05, 0x24, 0x00), "{opcode:#04x} byte {i} bit {bit}");
                assert_eq!([s[15], s[16], s[17]], [0xC8 | want, 0, i as u8], "{opcode:#04x} byte {i} bit {bit}");
                checked += 1;
            }
        }
    }
    assert!(checked > 300, "{checked}");
}

#[test]
fn lun_not_present_inquiry_reports_no_device() {
    let mut buf = vec![0xEEu8; 96];
    let t = ScsiTask::new(&inquiry(false, 0, 96), IoVecs::new(), iovs(&mut buf, &ODD));
    let r = lun_not_present(&t);
    assert_eq!(r, TaskResult::good(36));
    assert_eq!(buf[0], 0x7F, "peripheral qualifier 011b, device type 1Fh");
    assert_eq!(&buf[1..5], &[0, 0x06, 0x02, 31]);
    assert!(buf[5..36].iter().all(|&b| b == 0));
    // Allocation length 5.
    let t = ScsiTask::new(&inquiry(false, 0, 5), IoVecs::new(), iovs(&mut buf, &ODD));
    assert_eq!(lun_not_present(&t), TaskResult::good(5));
}

#[test]
fn lun_not_present_other_commands_return_logical_unit_not_supported() {
    for cdb in [vec![0x00, 0, 0, 0, 0, 0], cdb10(0x28, 0, 0, 1), inquiry(true, 0x00, 64), vec![0x5E; 10], vec![]] {
        let t = ScsiTask::new(&cdb, IoVecs::new(), IoVecs::new());
        assert_check(&lun_not_present(&t), 0x05, 0x25, 0x00, None);
    }
    // A malformed INQUIRY is still a malformed INQUIRY.
    let t = ScsiTask::new(&inquiry(false, 0x80, 64), IoVecs::new(), IoVecs::new());
    assert_invalid_cdb(&lun_not_present(&t), 2, None);
}

#[test]
fn lun_not_present_report_luns_returns_an_empty_list() {
    let mut buf = vec![0xEEu8; 64];
    let t = ScsiTask::new(&report_luns(0, 64), IoVecs::new(), iovs(&mut buf, &ODD));
    assert_eq!(lun_not_present(&t), TaskResult::good(8));
    assert_eq!(&buf[..8], &[0; 8]);
    let t = ScsiTask::new(&report_luns(0, 4), IoVecs::new(), IoVecs::new());
    assert_invalid_cdb(&lun_not_present(&t), 6, None);
}

#[test]
fn lun_not_present_request_sense_returns_logical_unit_not_supported_data() {
    let mut buf = vec![0xEEu8; 64];
    let t = ScsiTask::new(&[0x03, 0, 0, 0, 64, 0], IoVecs::new(), iovs(&mut buf, &ODD));
    assert_eq!(lun_not_present(&t), TaskResult::good(18));
    assert_eq!(&buf[..18], &[0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x25, 0x00, 0, 0, 0, 0]);
    let t = ScsiTask::new(&[0x03, 1, 0, 0, 64, 0], IoVecs::new(), iovs(&mut buf, &ODD));
    assert_eq!(lun_not_present(&t), TaskResult::good(8));
    assert_eq!(&buf[..8], &[0x72, 0x05, 0x25, 0x00, 0, 0, 0, 0]);
}

#[test]
fn lun_is_shareable_across_reactors_and_reports_its_identity() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Lun>();
    send_sync::<LunOptions>();
    let lun = Lun::new(malloc_bdev(4096, 10), 3, LunOptions::default());
    assert_eq!((lun.target_id(), lun.block_size(), lun.num_blocks()), (3, 4096, 10));
    assert_eq!(lun.serial(), "00112233445566778899aabbccddeeff");
    assert_eq!(lun.max_transfer_blocks(), 1024);
    assert!(!lun.write_cache_enabled(), "malloc has no volatile cache");
    assert_eq!(lun.bdev().name(), "d0");
    let d = LunOptions::default();
    assert_eq!(
        (d.max_transfer_bytes, d.max_unmap_blocks, d.max_unmap_descriptors, d.max_write_same_blocks),
        (4 << 20, 4 << 20, 256, 4 << 20)
    );
    assert!(!d.unmap_reads_zeroes && d.product.is_none() && d.serial.is_none());
}

#[test]
fn scsi_task_keeps_at_most_32_cdb_bytes() {
    let t = ScsiTask::new(&[0xAB; 40], IoVecs::new(), IoVecs::new());
    assert_eq!(t.cdb_len, 32);
    assert_eq!(t.cdb(), &[0xAB; 32]);
    let t = ScsiTask::new(&[0x00; 6], IoVecs::new(), IoVecs::new());
    assert_eq!(t.cdb(), &[0; 6]);
}

#[test]
fn dropping_a_lun_stops_listening_to_the_bdev() {
    let b = malloc_bdev(512, 64);
    let lun = Lun::new(b.clone(), 0, LunOptions::default());
    b.resize(32).unwrap();
    assert_eq!(lun.capacity_generation(), 1);
    drop(lun);
    // The listener is gone: resizing does not touch freed state (and nothing panics).
    b.resize(48).unwrap();
    let lun = Lun::new(b, 0, LunOptions::default());
    assert_eq!(lun.capacity_generation(), 0);
}
